//! The CI-size chaos runs: 3 nodes, 10 users × 2 devices, 20 sends/s for 25 s, under each
//! fault, then up to 30 s for devices to catch up by themselves. Any lost, duplicated,
//! unexpected or out-of-order message, or nodes that disagree after healing, fail the test
//! (the run dir with the nodes' logs and `history.json` is kept and named).
//!
//! Runs take turns (one chaos run per machine at a time). `partition` needs iptables as
//! root and `skew` a `chatnode` with `--clock-offset-file`; without them those tests say
//! "skipped ..." and pass. `CHAOS_SEED` replays a seed.

use chat_tests::chaos::{run, FaultKind, RunOptions, RunOutcome};
use chat_tests::chatnode_bin;

async fn ci_run(fault: FaultKind) {
    let outcome = match run(RunOptions::ci(fault, chatnode_bin())).await {
        Ok(o) => o,
        Err(e) => panic!("the {fault} run broke: {e:#}"),
    };
    match outcome {
        RunOutcome::Skipped(why) => println!("skipped {fault}: {why}"),
        RunOutcome::Finished(f) => {
            assert!(
                f.verdict.is_clean(),
                "the {fault} run failed the check (seed {}; logs and history.json in {}):\n{}",
                f.history.seed,
                f.dir.display(),
                f.report
            );
            println!("{}", f.report);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_none() {
    ci_run(FaultKind::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill() {
    ci_run(FaultKind::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_pause() {
    ci_run(FaultKind::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_partition() {
    ci_run(FaultKind::Partition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_skew() {
    ci_run(FaultKind::Skew).await;
}
