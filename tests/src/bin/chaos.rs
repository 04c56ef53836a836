//! `chaos`: one long chaos run against real `chatnode` processes, with progress lines and the
//! final table; exits 1 when the checker finds anything, 2 when the run itself broke.
//!
//! ```sh
//! cargo run -p chat-tests --bin chaos -- --fault pause --nodes 3 --duration 180 --rate 100 \
//!     --users 30 --seed 7
//! cargo run -p chat-tests --bin chaos -- --recheck /tmp/chatnode-chaos-XXXX/history.json
//! ```
//!
//! Partitions need iptables as root; skew needs a `chatnode` with `--clock-offset-file`.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chat_tests::chaos::history::History;
use chat_tests::chaos::{checker, report, run, FaultKind, RunOptions, RunOutcome};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Run chatnode under a nemesis and check that no acked message goes missing")]
struct Args {
    /// none, kill, kill2 (5 nodes), pause, partition, skew or mixed.
    #[arg(long, default_value = "mixed")]
    fault: FaultKind,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of sending (the faults happen within them).
    #[arg(long, default_value_t = 180)]
    duration: u64,
    /// Sends per second, all users together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 30)]
    users: usize,
    #[arg(long, default_value_t = 3)]
    groups: usize,
    #[arg(long, default_value_t = 10)]
    group_size: usize,
    /// Every n-th send of a user carries a 5,000-byte body, which the nodes store by
    /// reference (0: only short bodies).
    #[arg(long, default_value_t = 2)]
    large_body_every: u64,
    /// The seed of the schedule and the workload [default: CHAOS_SEED, else random].
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds before a send with no ack counts as indeterminate.
    #[arg(long, default_value_t = 60)]
    send_timeout: u64,
    /// Longest wait, in seconds, for devices to catch up after the workload.
    #[arg(long, default_value_t = 60)]
    catch_up: u64,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 5)]
    progress: u64,
    /// Keep the run dir even when the check passes.
    #[arg(long)]
    keep: bool,
    /// The chatnode binary [default: CHATNODE_BIN, else built next to this binary].
    #[arg(long)]
    chatnode: Option<PathBuf>,
    /// Check a history.json of an earlier run instead of running.
    #[arg(long)]
    recheck: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.recheck {
        Some(path) => recheck(path),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start the runtime")
            .and_then(|rt| rt.block_on(run_once(&args))),
    };
    match result {
        Ok(clean) => {
            if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs once; `Ok(false)` when the checker found something.
async fn run_once(args: &Args) -> Result<bool> {
    let chatnode = match &args.chatnode {
        Some(p) => p.clone(),
        None => chatnode_bin()?,
    };
    let mut opts = RunOptions::new(args.fault, chatnode);
    opts.nodes = args.nodes;
    opts.duration = Duration::from_secs(args.duration);
    opts.rate = args.rate;
    opts.users = args.users;
    opts.groups = args.groups;
    opts.group_size = args.group_size;
    opts.large_body_every = args.large_body_every;
    if let Some(seed) = args.seed {
        opts.seed = seed;
    }
    opts.send_timeout = Duration::from_secs(args.send_timeout);
    opts.catch_up = Duration::from_secs(args.catch_up);
    opts.progress_every = (args.progress > 0).then(|| Duration::from_secs(args.progress));
    opts.keep_dir = args.keep;
    // Ctrl-C drops the run: the cluster's guard kills its nodes, the partition's guard
    // removes its iptables chain, and the run dir stays.
    let outcome = tokio::select! {
        r = run(opts) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    match outcome {
        RunOutcome::Skipped(why) => {
            println!("skipped {}: {why}", args.fault);
            Ok(true)
        }
        RunOutcome::Finished(f) => {
            println!("{}", f.report);
            Ok(f.verdict.is_clean())
        }
    }
}

/// Checks a saved history and prints its report.
fn recheck(path: &PathBuf) -> Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let history = History::from_json(&text).with_context(|| format!("parse {}", path.display()))?;
    let verdict = checker::check(&history);
    println!("{}", report::render(&history, &verdict));
    Ok(verdict.is_clean())
}

/// `CHATNODE_BIN`, or `chatnode` next to this binary (`target/<profile>/`), brought up to date
/// with `cargo build` first so a run never uses a stale node.
fn chatnode_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CHATNODE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("find this binary")?;
    let profile_dir = exe
        .parent()
        .context("this binary has no directory")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "chatnode", "--bin", "chatnode"]);
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd.status().context("run cargo build -p chatnode")?;
    if !status.success() {
        bail!("cargo build -p chatnode failed: {status}");
    }
    Ok(profile_dir.join("chatnode"))
}
