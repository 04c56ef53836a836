//! The two unauthenticated attacks of issue 13, measured: while an attacker runs, a victim
//! logs in and sends a message every second, and the node's resident memory is sampled.
//!
//! - `attack-login`: rounds of many concurrent logins with wrong passwords for names that do
//!   not exist (each costs the node a full password hash);
//! - `attack-idle`: thousands of TCP connections that send nothing, plus slowloris
//!   connections that dribble a request head one byte a second.
//!
//! The attacker's sockets come from 127.0.0.2 and up (`--sources`; slowloris from 127.0.1.x),
//! the victim's from 127.0.0.1, so per-address limits hit the attacker only (as they would on a network). A
//! spawned node gets the default per-address connection cap back (the bench lifts it for its
//! other scenarios) unless `--node-arg` sets it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use client_proto::client::{Connection, HttpClient};
use client_proto::Recipient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::report::{int, Table};
use super::{Account, Outcome, Target, TargetArgs, PASSWORD};

/// `chatnode bench attack-login`.
#[derive(clap::Args, Debug, Clone)]
pub struct AttackLoginArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Concurrent wrong logins per round.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Rounds, one after the other.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Attacker source addresses (127.0.0.2 and up), used in turn.
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Sign up this many real accounts first and guess their passwords (round-robin);
    /// 0: guess names that do not exist.
    #[arg(long, default_value_t = 0)]
    pub accounts: usize,
}

/// `chatnode bench attack-idle`.
#[derive(clap::Args, Debug, Clone)]
pub struct AttackIdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Idle TCP connections to open (they send nothing).
    #[arg(long, default_value_t = 5000)]
    pub idle: usize,
    /// Slowloris connections (a request head, one byte a second).
    #[arg(long, default_value_t = 200)]
    pub slowloris: usize,
    /// How long the attack lasts, seconds.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    /// Attacker source addresses (127.0.0.2 and up), used in turn.
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
}

/// What the victim saw.
#[derive(Default)]
struct Victim {
    logins_ok: AtomicU64,
    logins_failed: AtomicU64,
    sends_ok: AtomicU64,
    sends_failed: AtomicU64,
    /// Logins answered `busy` and retried (as `Retry-After` asks).
    busy_retries: AtomicU64,
    first_error: parking_lot::Mutex<Option<String>>,
}

impl Victim {
    fn failed(&self, counter: &AtomicU64, e: impl std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().get_or_insert_with(|| e.to_string());
    }
}

/// Every second until `stop`: log `alice` in, connect, send one message to `bob`, wait for
/// its ack, log out.
async fn victim_loop(
    api: HttpClient,
    alice: Account,
    bob: Account,
    codec: client_proto::codec::Codec,
    victim: Arc<Victim>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        // A well-behaved client: on `busy`, wait and retry (within the 10 s budget).
        let login = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match api.login(&alice.username, PASSWORD, None).await {
                    Err(e) if e.code() == Some(client_proto::ErrorCode::Busy) => {
                        victim.busy_retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    other => return other,
                }
            }
        })
        .await;
        let login = match login {
            Ok(Ok(l)) => {
                victim.logins_ok.fetch_add(1, Ordering::Relaxed);
                l
            }
            Ok(Err(e)) => {
                victim.failed(&victim.logins_failed, format!("login: {e}"));
                continue;
            }
            Err(_) => {
                victim.failed(&victim.logins_failed, "login: no answer within 10 s");
                continue;
            }
        };
        let sent = async {
            let mut conn = Connection::connect(&alice.ws_url, &login.token, codec).await?;
            let r = conn
                .send_message(&format!("victim-{n}"), Recipient::User(bob.user_id), "hi")
                .await;
            conn.close().await;
            r
        };
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(_)) => {
                victim.sends_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => victim.failed(&victim.sends_failed, format!("send: {e}")),
            Err(_) => victim.failed(&victim.sends_failed, "send: no ack within 10 s"),
        }
        let _ = api.logout(&login.token).await;
    }
}

/// `field` (`VmHWM`, `VmRSS`) of `pid`, in KiB.
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the node's VmRSS every 200 ms until `stop`; returns the largest.
fn sample_rss(pid: Option<u32>, stop: CancellationToken) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0;
        let Some(pid) = pid else { return 0 };
        loop {
            max = max.max(proc_kib(pid, "VmRSS:").unwrap_or(0));
            tokio::select! {
                _ = stop.cancelled() => return max,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
}

/// The i-th attacker source address.
fn source(i: usize, sources: u8) -> IpAddr {
    let k = (i % usize::from(sources.max(1))) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k))
}

/// Opens the target, with the default per-address connection cap back on a spawned node.
fn open_target(args: &TargetArgs) -> Result<(Target, Vec<String>)> {
    let mut args = args.clone();
    if !args
        .node_args
        .iter()
        .any(|a| a.contains("max-connections-per-ip"))
    {
        args.node_args.push("--max-connections-per-ip=1000".into());
    }
    let node_args = args.node_args.clone();
    Ok((Target::open(&args)?, node_args))
}

/// The victim's accounts and loop, and the memory sampler.
struct Watch {
    victim: Arc<Victim>,
    stop: CancellationToken,
    victim_task: tokio::task::JoinHandle<()>,
    rss: tokio::task::JoinHandle<u64>,
}

async fn watch(target: &Target) -> Result<Watch> {
    let accounts = target.endpoint.accounts(2, "victim").await?;
    let api = target
        .endpoint
        .api(0)
        .context("attack scenarios need a node")?
        .clone();
    let victim = Arc::new(Victim::default());
    let stop = CancellationToken::new();
    let victim_task = tokio::spawn(victim_loop(
        api,
        accounts[0].clone(),
        accounts[1].clone(),
        target.codec,
        victim.clone(),
        stop.clone(),
    ));
    let rss = sample_rss(target.node_pid, stop.clone());
    Ok(Watch {
        victim,
        stop,
        victim_task,
        rss,
    })
}

impl Watch {
    /// Stops the victim and the sampler; adds their rows to `table`, returns failures.
    async fn finish(self, target: &Target, table: &mut Table) -> (Vec<String>, serde_json::Value) {
        self.stop.cancel();
        let _ = self.victim_task.await;
        let peak_sampled = self.rss.await.unwrap_or(0);
        let hwm = target.node_pid.and_then(|p| proc_kib(p, "VmHWM:"));
        let v = &self.victim;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        table.row(vec![
            "victim logins ok / failed".into(),
            format!("{} / {}", get(&v.logins_ok), get(&v.logins_failed)),
        ]);
        table.row(vec![
            "victim logins retried after busy".into(),
            int(get(&v.busy_retries) as f64),
        ]);
        table.row(vec![
            "victim sends ok / failed".into(),
            format!("{} / {}", get(&v.sends_ok), get(&v.sends_failed)),
        ]);
        table.row(vec![
            "node peak RSS, VmHWM (MiB)".into(),
            hwm.map_or("-".into(), |k| int(k as f64 / 1024.0)),
        ]);
        table.row(vec![
            "node largest sampled VmRSS (MiB)".into(),
            int(peak_sampled as f64 / 1024.0),
        ]);
        let first_error = v.first_error.lock().clone();
        if let Some(e) = &first_error {
            table.row(vec!["victim's first error".into(), e.clone()]);
        }
        let mut failures = Vec::new();
        if get(&v.logins_ok) == 0 || get(&v.sends_ok) == 0 {
            failures.push("the victim never logged in and sent during the attack".into());
        }
        let json = serde_json::json!({
            "victim_logins_ok": get(&v.logins_ok),
            "victim_logins_failed": get(&v.logins_failed),
            "victim_sends_ok": get(&v.sends_ok),
            "victim_sends_failed": get(&v.sends_failed),
            "victim_busy_retries": get(&v.busy_retries),
            "node_vm_hwm_kib": hwm,
            "node_max_sampled_rss_kib": peak_sampled,
            "victim_first_error": first_error,
        });
        (failures, json)
    }
}

/// `chatnode bench attack-login`.
pub async fn run_login(args: AttackLoginArgs) -> Result<Outcome> {
    if args.concurrency == 0 || args.rounds == 0 {
        bail!("--concurrency and --rounds must be at least 1");
    }
    let (mut target, _) = open_target(&args.target)?;
    let base = target
        .endpoint
        .api(0)
        .context("attack-login needs a node")?
        .base()
        .to_string();
    let targets: Vec<String> = if args.accounts > 0 {
        let made = target.endpoint.accounts(args.accounts, "target").await?;
        made.into_iter().map(|a| a.username).collect()
    } else {
        Vec::new()
    };
    let watch = watch(&target).await?;
    let clients: Vec<reqwest::Client> = (0..args.sources.max(1))
        .map(|i| {
            reqwest::Client::builder()
                .local_address(Some(source(usize::from(i), args.sources)))
                .build()
                .context("building an attacker HTTP client")
        })
        .collect::<Result<_>>()?;
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    let run: u32 = rand::random();
    let started = std::time::Instant::now();
    for round in 0..args.rounds {
        let mut set = JoinSet::new();
        for i in 0..args.concurrency {
            let http = clients[i % clients.len()].clone();
            let url = format!("{base}/v1/login");
            let name = if targets.is_empty() {
                format!("ghost{run:08x}r{round}n{i}")
            } else {
                targets[(round * args.concurrency + i) % targets.len()].clone()
            };
            set.spawn(async move {
                let resp = http
                    .post(url)
                    .json(&serde_json::json!({"username": name, "password": "wrong-password"}))
                    .send()
                    .await;
                match resp {
                    Err(e) if e.is_connect() => "connect refused".to_string(),
                    Err(_) => "transport error".to_string(),
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        format!("{status} {}", body["code"].as_str().unwrap_or("-"))
                    }
                }
            });
        }
        while let Some(kind) = set.join_next().await {
            *kinds
                .entry(kind.unwrap_or_else(|_| "panic".into()))
                .or_default() += 1;
        }
        target.check_alive()?;
        eprintln!(
            "[attack-login] round {}/{} done at t={:.1}s: {kinds:?}",
            round + 1,
            args.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    // Let the victim try once more after the flood.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attack_secs = started.elapsed().as_secs_f64();
    let mut table = Table::new(
        format!(
            "attack-login: {} rounds x {} concurrent wrong logins ({}), {:.1} s",
            args.rounds,
            args.concurrency,
            if targets.is_empty() {
                "names that do not exist".to_string()
            } else {
                format!("{} real accounts", targets.len())
            },
            attack_secs
        ),
        &["figure", "value"],
    );
    table.row(vec![
        "attacker requests".into(),
        int((args.rounds * args.concurrency) as f64),
    ]);
    for (kind, n) in &kinds {
        table.row(vec![format!("  answered {kind}"), int(*n as f64)]);
    }
    let (failures, victim) = watch.finish(&target, &mut table).await;
    Ok(Outcome {
        scenario: "attack-login",
        tables: vec![table],
        json: serde_json::json!({
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "seconds": attack_secs,
            "answers": kinds,
            "victim": victim,
        }),
        lost: 0,
        failures,
    })
}

/// How one attacker connection ended.
#[derive(Default)]
struct Ends {
    connect_failed: AtomicU64,
    /// Still connecting when the attack ended (the listen backlog was full).
    connect_pending: AtomicU64,
    refused_with_answer: AtomicU64,
    closed_by_node: AtomicU64,
    still_open: AtomicU64,
}

/// Opens a TCP connection from `source` to `addr`.
async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(source, 0))?;
    s.connect(addr).await
}

/// Holds one attacker connection until the node closes it or `stop`; `slow` dribbles a
/// request head one byte a second.
async fn hold(
    source: IpAddr,
    addr: SocketAddr,
    slow: bool,
    ends: Arc<Ends>,
    stop: CancellationToken,
) {
    let connected = tokio::select! {
        r = connect_from(source, addr) => r,
        _ = stop.cancelled() => {
            ends.connect_pending.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut s = match connected {
        Ok(s) => s,
        Err(_) => {
            ends.connect_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if slow
        && s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .is_err()
    {
        ends.closed_by_node.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = [0u8; 512];
    let mut answer: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                ends.still_open.fetch_add(1, Ordering::Relaxed);
                return;
            }
            r = s.read(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    answer.get_or_insert_with(|| buf[..n].to_vec());
                }
                _ => break,
            },
            _ = tick.tick(), if slow => {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
            }
        }
    }
    // "HTTP/1.1 429" or "503": turned away at accept; anything else (hyper's 408, or
    // nothing) is a close after a timeout.
    let status = answer.as_deref().and_then(|a| a.get(9..12));
    if matches!(status, Some(b"429") | Some(b"503")) {
        ends.refused_with_answer.fetch_add(1, Ordering::Relaxed);
    } else {
        ends.closed_by_node.fetch_add(1, Ordering::Relaxed);
    }
}

/// `chatnode bench attack-idle`.
pub async fn run_idle(args: AttackIdleArgs) -> Result<Outcome> {
    let (mut target, _) = open_target(&args.target)?;
    let base = target
        .endpoint
        .api(0)
        .context("attack-idle needs a node")?
        .base()
        .to_string();
    let addr: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("attack-idle needs an http://IP:PORT server, not {base}"))?;
    let watch = watch(&target).await?;
    let stop = CancellationToken::new();
    let idle = Arc::new(Ends::default());
    let slow = Arc::new(Ends::default());
    let mut set = JoinSet::new();
    let started = std::time::Instant::now();
    for i in 0..args.idle {
        set.spawn(hold(
            source(i, args.sources),
            addr,
            false,
            idle.clone(),
            stop.clone(),
        ));
        if i % 500 == 499 {
            // Do not outrun the listen backlog.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Slowloris from addresses of their own (127.0.1.x), so that the idle sockets' cap
    // does not refuse them before the header timeout can be seen.
    for i in 0..args.slowloris {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 2 + (i % 200) as u8));
        set.spawn(hold(from, addr, true, slow.clone(), stop.clone()));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.secs);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        target.check_alive()?;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        eprintln!(
            "[attack-idle] t={:>3.0}s idle: refused {} closed {} connect-failed {}; slowloris closed {}",
            started.elapsed().as_secs_f64(),
            g(&idle.refused_with_answer),
            g(&idle.closed_by_node),
            g(&idle.connect_failed),
            g(&slow.closed_by_node) + g(&slow.refused_with_answer),
        );
    }
    stop.cancel();
    while set.join_next().await.is_some() {}
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut table = Table::new(
        format!(
            "attack-idle: {} idle + {} slowloris connections for {} s",
            args.idle, args.slowloris, args.secs
        ),
        &["figure", "value"],
    );
    table.row(vec![
        "attacker connections".into(),
        int((args.idle + args.slowloris) as f64),
    ]);
    for (what, ends) in [("idle", &idle), ("slowloris", &slow)] {
        table.row(vec![
            format!("  {what}: refused at once (429/503 answer)"),
            int(g(&ends.refused_with_answer) as f64),
        ]);
        table.row(vec![
            format!("  {what}: closed by the node (timeout, or evicted at the cap)"),
            int(g(&ends.closed_by_node) as f64),
        ]);
        table.row(vec![
            format!("  {what}: could not connect"),
            int(g(&ends.connect_failed) as f64),
        ]);
        table.row(vec![
            format!("  {what}: still connecting at the end (backlog full)"),
            int(g(&ends.connect_pending) as f64),
        ]);
        table.row(vec![
            format!("  {what}: still open at the end"),
            int(g(&ends.still_open) as f64),
        ]);
    }
    let (failures, victim) = watch.finish(&target, &mut table).await;
    let counts = |e: &Ends| {
        serde_json::json!({
            "refused": g(&e.refused_with_answer),
            "closed": g(&e.closed_by_node),
            "connect_failed": g(&e.connect_failed),
            "connect_pending": g(&e.connect_pending),
            "still_open": g(&e.still_open),
        })
    };
    Ok(Outcome {
        scenario: "attack-idle",
        tables: vec![table],
        json: serde_json::json!({
            "idle": args.idle,
            "slowloris": args.slowloris,
            "seconds": args.secs,
            "idle_ends": counts(&idle),
            "slowloris_ends": counts(&slow),
            "victim": victim,
        }),
        lost: 0,
        failures,
    })
}
