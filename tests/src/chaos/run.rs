//! One chaos run from start to verdict:
//!
//! 1. print the seed; take the run lock; find what this machine and binary allow (iptables
//!    for `partition`, `--clock-offset-file` for `skew`), removing iptables leftovers of dead
//!    runs; draw the nemesis schedule;
//! 2. start the cluster and the workload in a fresh run dir;
//! 3. send for the run's duration while the nemesis applies and heals its faults;
//! 4. stop sending, then wait (bounded) for every device to get every acked message by
//!    itself: nothing forces a client to sync or reconnect;
//! 5. read every inbox and every conversation through every node;
//! 6. check the history, write `history.json` and `report.txt`, and keep the run dir (nodes'
//!    logs included) when the check fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use super::checker::{self, Verdict};
use super::cluster::{self, ChaosCluster};
use super::firewall::Firewall;
use super::history::History;
use super::lock::RunLock;
use super::nemesis::{self, FaultKind};
use super::reads;
use super::recorder::Recorder;
use super::report;
use super::workload::{Workload, WorkloadConfig};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub fault: FaultKind,
    pub nodes: usize,
    /// How long the workload sends (the faults all happen within it).
    pub duration: Duration,
    /// Sends per second, all users together.
    pub rate: f64,
    pub users: usize,
    pub groups: usize,
    pub group_size: usize,
    pub seed: u64,
    /// Every n-th send of a user has a body large enough to be stored by reference (0: none).
    pub large_body_every: u64,
    /// A send with no ack by then is indeterminate.
    pub send_timeout: Duration,
    /// The longest wait, after the workload, for devices to get every acked message.
    pub catch_up: Duration,
    /// The `chatnode` binary.
    pub chatnode: PathBuf,
    /// Print a progress line this often.
    pub progress_every: Option<Duration>,
    /// Keep the run dir even when the check passes.
    pub keep_dir: bool,
}

impl RunOptions {
    /// A long run's defaults: 3 nodes, 180 s, 100 sends/s, 30 users × 2 devices, 3 groups of
    /// 10, every second send with a 5,000-byte body (stored by reference, read back on
    /// sync); the seed from `CHAOS_SEED` or random.
    pub fn new(fault: FaultKind, chatnode: PathBuf) -> Self {
        RunOptions {
            fault,
            nodes: 3,
            duration: Duration::from_secs(180),
            rate: 100.0,
            users: 30,
            groups: 3,
            group_size: 10,
            seed: seed_from_env(),
            large_body_every: 2,
            send_timeout: Duration::from_secs(60),
            catch_up: Duration::from_secs(60),
            chatnode,
            progress_every: Some(Duration::from_secs(5)),
            keep_dir: false,
        }
    }

    /// The CI size: 3 nodes, 25 s at 20 sends/s from 10 users, 30 s of catch-up.
    pub fn ci(fault: FaultKind, chatnode: PathBuf) -> Self {
        RunOptions {
            duration: Duration::from_secs(25),
            rate: 20.0,
            users: 10,
            catch_up: Duration::from_secs(30),
            ..RunOptions::new(fault, chatnode)
        }
    }
}

/// `CHAOS_SEED` when set (and a number), else a fresh random seed.
pub fn seed_from_env() -> u64 {
    if let Some(seed) = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return seed;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// The fault cannot run here; the reason says why.
    Skipped(String),
    Finished(Box<Finished>),
}

/// A run that got to its verdict.
#[derive(Debug)]
pub struct Finished {
    pub history: History,
    pub verdict: Verdict,
    /// The table and details ([`report::render`]).
    pub report: String,
    /// The run dir (removed unless kept).
    pub dir: PathBuf,
    pub kept: bool,
}

/// Runs one chaos run. `Err` means the run itself broke (a node that would not start, a
/// setup call that failed); the run dir is then kept and named in the error.
pub async fn run(opts: RunOptions) -> Result<RunOutcome> {
    println!(
        "chaos: seed {} (replay with --seed {0} or CHAOS_SEED={0})",
        opts.seed
    );
    if !cfg!(target_os = "linux") {
        return Ok(RunOutcome::Skipped(
            "chaos runs need Linux (127.0.0.x aliases on loopback, iptables, kill(1))".into(),
        ));
    }
    if !opts.chatnode.is_file() {
        bail!("no chatnode binary at {}", opts.chatnode.display());
    }
    if opts.fault == FaultKind::Kill2 && opts.nodes < 5 {
        bail!("kill2 needs 5 nodes, not {}", opts.nodes);
    }
    let _lock = RunLock::acquire().await?;

    let skew = cluster::supports_clock_offset_file(&opts.chatnode)?;
    let firewall = Firewall::probe();
    let mut available = vec![FaultKind::Kill, FaultKind::Pause];
    if opts.nodes >= 5 {
        available.push(FaultKind::Kill2);
    }
    let mut unavailable = Vec::new();
    match &firewall {
        Ok(_) => available.push(FaultKind::Partition),
        Err(why) => unavailable.push((FaultKind::Partition, why.clone())),
    }
    if skew {
        available.push(FaultKind::Skew);
    } else {
        let why = format!(
            "{} has no --clock-offset-file (serve --help does not list it)",
            opts.chatnode.display()
        );
        unavailable.push((FaultKind::Skew, why));
    }
    for (kind, why) in &unavailable {
        if *kind == opts.fault {
            return Ok(RunOutcome::Skipped(why.clone()));
        }
        if opts.fault == FaultKind::Mixed {
            println!("chaos: mixed runs without {kind}: {why}");
        }
    }
    let steps = nemesis::plan(opts.seed, opts.fault, opts.nodes, opts.duration, &available);
    if steps.is_empty() && opts.fault != FaultKind::None {
        bail!(
            "{:?} is too short for one {} fault",
            opts.duration,
            opts.fault
        );
    }
    println!(
        "chaos: {} on {} nodes for {:?}, {} sends/s from {} users",
        opts.fault, opts.nodes, opts.duration, opts.rate, opts.users
    );
    for s in &steps {
        println!("chaos: schedule {s}");
    }

    let mut dir = tempfile::Builder::new()
        .prefix("chatnode-chaos-")
        .tempdir()
        .context("make the run dir")?;
    // Kept unless the run passes: a crash or an error leaves the logs behind.
    dir.disable_cleanup(true);
    let path = dir.path().to_path_buf();
    println!("chaos: run dir {}", path.display());
    let history = run_in(&opts, &path, &steps, firewall.ok())
        .await
        .with_context(|| format!("the run's logs are kept in {}", path.display()))?;

    let verdict = checker::check(&history);
    let report = report::render(&history, &verdict);
    let json = history.to_json().context("encode the history")?;
    std::fs::write(path.join("history.json"), json).context("write history.json")?;
    std::fs::write(path.join("report.txt"), &report).context("write report.txt")?;
    let kept = !verdict.is_clean() || opts.keep_dir;
    dir.disable_cleanup(kept);
    drop(dir);
    if kept {
        println!(
            "chaos: kept {} (history.json, report.txt, node-*/node.log)",
            path.display()
        );
    }
    Ok(RunOutcome::Finished(Box::new(Finished {
        history,
        verdict,
        report,
        dir: path,
        kept,
    })))
}

/// Steps 2 to 5, in `dir`.
async fn run_in(
    opts: &RunOptions,
    dir: &std::path::Path,
    steps: &[nemesis::Step],
    firewall: Option<Firewall>,
) -> Result<History> {
    let skew = steps.iter().any(|s| s.kind == FaultKind::Skew);
    let mut cluster = ChaosCluster::start(dir, &opts.chatnode, opts.nodes, skew).await?;
    let http = cluster.http_urls();
    println!("chaos: cluster up: {}", http.join(" "));
    let rec = Recorder::new(History {
        seed: opts.seed,
        fault: opts.fault.name().to_string(),
        nodes: opts.nodes,
        ..History::default()
    });
    let cfg = WorkloadConfig {
        seed: opts.seed,
        users: opts.users,
        groups: opts.groups,
        group_size: opts.group_size,
        rate: opts.rate,
        send_timeout: opts.send_timeout,
        large_body_every: opts.large_body_every,
    };
    let workload = Workload::setup(cfg, &http, rec.clone()).await?;
    println!(
        "chaos: {} devices connected; sending for {:?}",
        opts.users * 2,
        opts.duration
    );
    let progress = opts.progress_every.map(|every| {
        let rec = rec.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                print_progress(&rec);
            }
        })
    });

    // Send while the nemesis works.
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = tokio::time::Instant::now();
    let workload_start = rec.now_ms();
    rec.update(|h| h.workload_start_ms = workload_start);
    let senders = workload.start_senders(stop_rx);
    let (nemesis_result, ()) = tokio::join!(
        nemesis::execute(steps, &mut cluster, firewall.as_ref(), &rec, start),
        tokio::time::sleep_until(start + opts.duration),
    );
    let _ = stop_tx.send(true);
    if let Err(e) = &nemesis_result {
        rec.note(format!("the nemesis failed: {e:#}"));
    }
    for s in senders {
        if tokio::time::timeout(opts.send_timeout + Duration::from_secs(10), s)
            .await
            .is_err()
        {
            rec.note("a sender did not finish its last send in time");
        }
    }
    let workload_end = rec.now_ms();
    rec.update(|h| h.workload_end_ms = workload_end);
    println!(
        "chaos: sending stopped at {:.1}s",
        workload_end as f64 / 1000.0
    );

    // Catch-up: the devices get everything by themselves, or not.
    let deadline = tokio::time::Instant::now() + opts.catch_up;
    let mut missing = rec.missing();
    while missing > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        missing = rec.missing();
    }
    let caught_up = rec.now_ms() - workload_end;
    println!(
        "chaos: after {:.1}s of catch-up, {missing} (device, acked message) pairs missing",
        caught_up as f64 / 1000.0
    );
    let tokens: Vec<(usize, String)> = (0..opts.users)
        .filter_map(|u| workload.token(u).map(|t| (u, t.to_string())))
        .collect();
    workload.stop_devices().await;
    let end = rec.now_ms();
    rec.update(|h| h.end_ms = end);
    if let Some(p) = progress {
        p.abort();
    }
    if let Err(e) = nemesis_result {
        // The history so far may still tell what happened.
        if let Ok(json) = rec.history().to_json() {
            let _ = std::fs::write(dir.join("history.json"), json);
        }
        return Err(e);
    }

    // Final reads through every node.
    if let Err(e) = cluster
        .wait_members(opts.nodes, Duration::from_secs(60))
        .await
    {
        rec.note(format!("before the final reads: {e:#}"));
    }
    let so_far = rec.history();
    let mut conversations = BTreeMap::new();
    for s in &so_far.sends {
        if let Some((_, token)) = tokens.iter().find(|(u, _)| *u == s.user) {
            conversations
                .entry(s.conversation.to_string())
                .or_insert((s.conversation, token.clone()));
        }
    }
    let conversations: Vec<_> = conversations.into_values().collect();
    let (inboxes, histories) = reads::read_all(&http, &tokens, &conversations).await;
    rec.update(|h| {
        h.inbox_reads = inboxes;
        h.history_reads = histories;
    });
    drop(cluster);
    Ok(rec.history())
}

fn print_progress(rec: &Recorder) {
    let p = rec.progress();
    let missing = rec.missing();
    println!(
        "[{:>6.1}s] {} | acked {} refused {} indeterminate {} in flight {} | deliveries {} | \
         connected {}/{} | missing {missing}",
        p.at_ms as f64 / 1000.0,
        p.fault.as_deref().unwrap_or("no fault"),
        p.acked,
        p.refused,
        p.indeterminate,
        p.in_flight,
        p.deliveries,
        p.connected,
        p.devices
    );
}
