//! What the store's index operations cost on sled and on fjall, with the node's allocator
//! (mimalloc, no THP) and the node's sled settings (256 MiB cache, no periodic flush).
//!
//! `index-engines-probe [KEYS] [THREADS] [ENGINE...]` inserts KEYS records of 200 bytes
//! (half inbox-like keys, 8-byte user + 8-byte position; half history-like, 16-byte
//! conversation + 8-byte id; users spread over 100,000) into two tables, the way a replica
//! stores a new record: insert-if-absent (sled: `compare_and_swap(key, None, value)`, as
//! `store_versioned` does; fjall has no compare-and-swap, so a striped lock, `get`, then
//! `insert`, which a `LocalReplica` on it would need for the merge rule). Then it makes the
//! index durable (sled: `flush` + `fsync` of its file; fjall: `persist(SyncAll)`), reads
//! 200,000 keys and scans 2,000 users' inboxes.
//!
//! CPU is the whole process's (utime + stime from /proc/self/stat, so the engines'
//! background threads count); disk writes are /proc/self/io `write_bytes`.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VALUE: [u8; 200] = [7; 200];
const GETS: u64 = 200_000;
const SCANNED_USERS: u64 = 2_000;

fn key(i: u64) -> Vec<u8> {
    let user = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100_000;
    let pos = (1_700_000_000_000u64 << 16) | i;
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&user.to_be_bytes());
    if i.is_multiple_of(2) {
        k.extend_from_slice(&(user ^ 7).to_be_bytes());
    }
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

fn table(i: u64) -> usize {
    (i % 2) as usize
}

/// Process CPU seconds (utime + stime).
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes this process caused to be written to storage.
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

trait Engine: Sync {
    fn insert_if_absent(&self, t: usize, k: &[u8], v: &[u8]);
    fn get(&self, t: usize, k: &[u8]) -> bool;
    fn scan_prefix(&self, t: usize, prefix: &[u8]) -> usize;
    fn make_durable(&self);
}

struct Sled {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    dir: std::path::PathBuf,
}

impl Engine for Sled {
    fn insert_if_absent(&self, t: usize, k: &[u8], v: &[u8]) {
        let _ = self.trees[t]
            .compare_and_swap(k, None::<&[u8]>, Some(v))
            .expect("sled");
    }
    fn get(&self, t: usize, k: &[u8]) -> bool {
        self.trees[t].get(k).expect("sled").is_some()
    }
    fn scan_prefix(&self, t: usize, prefix: &[u8]) -> usize {
        // Every value is read, as a sync reads it.
        let mut n = 0;
        for item in self.trees[t].scan_prefix(prefix) {
            let (_, v) = item.expect("sled");
            n += usize::from(!v.is_empty());
        }
        n
    }
    fn make_durable(&self) {
        self.db.flush().expect("sled flush");
        std::fs::File::open(self.dir.join("db"))
            .and_then(|f| f.sync_all())
            .expect("fsync");
    }
}

struct Fjall {
    db: fjall::Database,
    keyspaces: Vec<fjall::Keyspace>,
    stripes: Vec<Mutex<()>>,
}

impl Engine for Fjall {
    fn insert_if_absent(&self, t: usize, k: &[u8], v: &[u8]) {
        let h = k
            .iter()
            .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(*b)));
        let _g = self.stripes[(h % self.stripes.len() as u64) as usize]
            .lock()
            .expect("stripe");
        if self.keyspaces[t].get(k).expect("fjall").is_none() {
            self.keyspaces[t].insert(k, v).expect("fjall");
        }
    }
    fn get(&self, t: usize, k: &[u8]) -> bool {
        self.keyspaces[t].get(k).expect("fjall").is_some()
    }
    fn scan_prefix(&self, t: usize, prefix: &[u8]) -> usize {
        let mut n = 0;
        for guard in self.keyspaces[t].prefix(prefix) {
            let (_, v) = guard.into_inner().expect("fjall");
            n += usize::from(!v.is_empty());
        }
        n
    }
    fn make_durable(&self) {
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .expect("fjall persist");
    }
}

fn run(name: &str, engine: &dyn Engine, dir: &Path, keys: u64, threads: u64) {
    let (c0, w0, t0) = (cpu_s(), written(), Instant::now());
    std::thread::scope(|s| {
        for th in 0..threads {
            s.spawn(move || {
                for i in (th..keys).step_by(threads as usize) {
                    engine.insert_if_absent(table(i), &key(i), &VALUE);
                }
            });
        }
    });
    let (wall, c1) = (t0.elapsed(), cpu_s());
    let t1 = Instant::now();
    engine.make_durable();
    let (durable, c2, w2) = (t1.elapsed(), cpu_s(), written());
    let t2 = Instant::now();
    for j in 0..GETS {
        let i = j * 7 % keys;
        assert!(engine.get(table(i), &key(i)), "a stored key is missing");
    }
    let gets = t2.elapsed();
    let t3 = Instant::now();
    let scanned: usize = (0..SCANNED_USERS)
        .map(|u| engine.scan_prefix(1, &u.to_be_bytes()))
        .sum();
    let scans = t3.elapsed();
    let n = keys as f64;
    println!(
        "{name:6} {keys:>9} {threads:>7} {:>14.2} {:>12.0} {:>11.0} {:>14.0} {:>13.2} {:>10.1} {:>11.2} {:>9}",
        (c1 - c0) * 1e6 / n,
        n / wall.as_secs_f64(),
        durable.as_secs_f64() * 1e3,
        (c2 - c1) * 1e6 / n * 1e3,
        (w2 - w0) as f64 / n,
        dir_size(dir) as f64 / 1e6,
        gets.as_secs_f64() * 1e6 / GETS as f64,
        format!("{:.1}", scans.as_secs_f64() * 1e3) + &format!("/{scanned}"),
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--help") {
        println!("index-engines-probe [KEYS=1000000] [THREADS=1] [sled|fjall ...] (data in $PROBE_DIR or ./probe-data)");
        return;
    }
    let keys: u64 = first.and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let threads: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let mut engines: Vec<String> = args.collect();
    if engines.is_empty() {
        engines = vec!["sled".into(), "fjall".into()];
    }
    let base = std::env::var("PROBE_DIR").unwrap_or_else(|_| "probe-data".into());
    println!("engine      keys threads  insert µs cpu   inserts/s  durable ms  durable cpu ns/insert  disk B/insert  on disk MB  get µs wall  scan ms/items");
    for e in engines {
        let dir = Path::new(&base).join(&e);
        let _ = std::fs::remove_dir_all(&dir);
        match e.as_str() {
            "sled" => {
                let db = sled::Config::new()
                    .path(&dir)
                    .cache_capacity(256 * 1024 * 1024)
                    .flush_every_ms(None)
                    .open()
                    .expect("open sled");
                let trees = (0..2)
                    .map(|t| db.open_tree(format!("t{t}")).expect("tree"))
                    .collect();
                run(
                    "sled",
                    &Sled {
                        db,
                        trees,
                        dir: dir.clone(),
                    },
                    &dir,
                    keys,
                    threads,
                );
            }
            "fjall" => {
                let db = fjall::Database::builder(&dir)
                    .cache_size(256 * 1024 * 1024)
                    .manual_journal_persist(true)
                    .open()
                    .expect("open fjall");
                let keyspaces = (0..2)
                    .map(|t| {
                        db.keyspace(&format!("t{t}"), fjall::KeyspaceCreateOptions::default)
                            .expect("keyspace")
                    })
                    .collect();
                let stripes = (0..256).map(|_| Mutex::new(())).collect();
                run(
                    "fjall",
                    &Fjall {
                        db,
                        keyspaces,
                        stripes,
                    },
                    &dir,
                    keys,
                    threads,
                );
            }
            other => eprintln!("unknown engine {other}: sled or fjall"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
