//! The nemesis: which faults a run suffers and when. [`plan`] draws a schedule from the seed
//! (a pure function, so a seed replays the same schedule); [`execute`] applies and heals each
//! step against the cluster, recording the times.
//!
//! | fault | what | for |
//! |---|---|---|
//! | `kill` | SIGKILL one node, restart it (same data dir, same addresses) | 2–8 s |
//! | `kill2` | SIGKILL two nodes (5-node clusters), restart both | 20 s |
//! | `pause` | SIGSTOP one node, then SIGCONT | 6 s |
//! | `partition` | drop packets between one node and the other nodes (iptables) | 15 s |
//! | `skew` | shift one node's clock (`--clock-offset-file`) 30 s back (past the nodes' 10 s bound: it must refuse to issue ids), or 7 s back or ahead (within it: ids must still sort right), then 0 | 15 s |
//! | `none` | nothing | |
//! | `mixed` | a random sequence of the faults available here | |

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::ChaosCluster;
use super::firewall::Firewall;
use super::recorder::Recorder;

/// The first fault starts this long (plus up to 2 s) after the workload, so every device
/// has sent and received a little first.
const WARMUP: Duration = Duration::from_secs(3);
/// The shifts of a skewed node's clock a schedule draws from: past the nodes' default bound
/// of 10 s (the node must refuse to issue ids), and within it, behind and ahead (its ids
/// must still sort after what came before them).
pub const SKEWS_MS: [i64; 3] = [-30_000, -7_000, 7_000];

/// A kind of fault, as `--fault` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    None,
    Kill,
    Kill2,
    Pause,
    Partition,
    Skew,
    Mixed,
}

impl FaultKind {
    /// Every kind, in `--fault` order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::None,
        FaultKind::Kill,
        FaultKind::Kill2,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Skew,
        FaultKind::Mixed,
    ];

    /// The name `--fault` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::None => "none",
            FaultKind::Kill => "kill",
            FaultKind::Kill2 => "kill2",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Skew => "skew",
            FaultKind::Mixed => "mixed",
        }
    }

    /// How many nodes it hits and for how long, drawn from `rng`.
    fn draw(self, nodes: usize, rng: &mut StdRng) -> (Vec<usize>, Duration) {
        let one = |rng: &mut StdRng| vec![rng.gen_range(0..nodes)];
        match self {
            FaultKind::Kill => (one(rng), Duration::from_millis(rng.gen_range(2000..=8000))),
            FaultKind::Kill2 => {
                let picked = rand::seq::index::sample(rng, nodes, 2.min(nodes)).into_vec();
                (picked, Duration::from_secs(20))
            }
            FaultKind::Pause => (one(rng), Duration::from_secs(6)),
            FaultKind::Partition | FaultKind::Skew => (one(rng), Duration::from_secs(15)),
            FaultKind::None | FaultKind::Mixed => (Vec::new(), Duration::ZERO),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault {s:?}; one of {}", names.join(", "))
            })
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When it is applied, from the workload's start.
    pub at: Duration,
    pub kind: FaultKind,
    pub nodes: Vec<usize>,
    /// How long it lasts before it is healed.
    pub hold: Duration,
    /// For `skew`: the clock shift, ms (0 otherwise).
    pub skew_ms: i64,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{:.1}s {} node {:?} for {:.1}s",
            self.at.as_secs_f64(),
            self.kind,
            self.nodes,
            self.hold.as_secs_f64()
        )?;
        if self.skew_ms != 0 {
            write!(f, " by {:+} ms", self.skew_ms)?;
        }
        Ok(())
    }
}

/// The schedule of a run of `duration` on `nodes` nodes: faults of kind `fault` (for
/// `mixed`, drawn from `available`), one at a time, 3–8 s apart, each healed before the
/// duration ends.
pub fn plan(
    seed: u64,
    fault: FaultKind,
    nodes: usize,
    duration: Duration,
    available: &[FaultKind],
) -> Vec<Step> {
    let kinds: Vec<FaultKind> = match fault {
        FaultKind::None => return Vec::new(),
        FaultKind::Mixed => available
            .iter()
            .copied()
            .filter(|k| !matches!(k, FaultKind::None | FaultKind::Mixed))
            .collect(),
        k => vec![k],
    };
    if kinds.is_empty() || nodes == 0 {
        return Vec::new();
    }
    // A stream of its own, so the workload's draws do not move the schedule.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut steps = Vec::new();
    let mut at = WARMUP + Duration::from_millis(rng.gen_range(0..2000));
    loop {
        let kind = kinds[rng.gen_range(0..kinds.len())];
        let (hit, hold) = kind.draw(nodes, &mut rng);
        let skew_ms = match kind {
            FaultKind::Skew => SKEWS_MS[rng.gen_range(0..SKEWS_MS.len())],
            _ => 0,
        };
        if at + hold > duration {
            return steps;
        }
        steps.push(Step {
            at,
            kind,
            nodes: hit,
            hold,
            skew_ms,
        });
        at += hold + Duration::from_millis(rng.gen_range(3000..=8000));
    }
}

/// Applies and heals each step at its time (from `start`), recording both.
pub async fn execute(
    steps: &[Step],
    cluster: &mut ChaosCluster,
    firewall: Option<&Firewall>,
    rec: &Recorder,
    start: tokio::time::Instant,
) -> Result<()> {
    for step in steps {
        tokio::time::sleep_until(start + step.at).await;
        println!("[{:>6.1}s] nemesis: {step}", rec.now_ms() as f64 / 1000.0);
        let fault = rec.fault_applied(step.kind.name(), &step.nodes);
        apply(step, cluster, firewall)
            .await
            .with_context(|| format!("nemesis step {step}"))?;
        rec.fault_healed(fault);
        println!(
            "[{:>6.1}s] nemesis: healed {} node {:?}",
            rec.now_ms() as f64 / 1000.0,
            step.kind,
            step.nodes
        );
    }
    Ok(())
}

/// Applies one step, holds it, heals it.
async fn apply(step: &Step, cluster: &mut ChaosCluster, firewall: Option<&Firewall>) -> Result<()> {
    let hold = || tokio::time::sleep(step.hold);
    match step.kind {
        FaultKind::Kill | FaultKind::Kill2 => {
            for &n in &step.nodes {
                cluster.kill(n);
            }
            hold().await;
            for &n in &step.nodes {
                cluster.restart(n).await?;
            }
        }
        FaultKind::Pause => {
            for &n in &step.nodes {
                cluster.pause(n)?;
            }
            hold().await;
            for &n in &step.nodes {
                cluster.resume(n)?;
            }
        }
        FaultKind::Partition => {
            let fw = firewall.context("partition without a usable iptables")?;
            let mut cuts = Vec::new();
            for &n in &step.nodes {
                let others: Vec<_> = (0..cluster.len())
                    .filter(|o| !step.nodes.contains(o))
                    .map(|o| cluster.ip(o))
                    .collect();
                cuts.push(fw.isolate(cluster.ip(n), &others).map_err(|e| anyhow!(e))?);
            }
            hold().await;
            for cut in cuts {
                cut.heal().map_err(|e| anyhow!(e))?;
            }
        }
        FaultKind::Skew => {
            for &n in &step.nodes {
                cluster.set_clock_offset(n, step.skew_ms)?;
            }
            hold().await;
            for &n in &step.nodes {
                cluster.set_clock_offset(n, 0)?;
            }
        }
        FaultKind::None | FaultKind::Mixed => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let all = FaultKind::ALL;
        let d = Duration::from_secs(180);
        let a = plan(7, FaultKind::Mixed, 5, d, &all);
        assert_eq!(a, plan(7, FaultKind::Mixed, 5, d, &all));
        assert_ne!(a, plan(8, FaultKind::Mixed, 5, d, &all));
        assert!(a.iter().all(|s| s.at + s.hold <= d));
        assert!(a.windows(2).all(|w| w[0].at + w[0].hold < w[1].at));
    }

    #[test]
    fn every_fault_fits_a_short_run() {
        for kind in [
            FaultKind::Kill,
            FaultKind::Kill2,
            FaultKind::Pause,
            FaultKind::Partition,
            FaultKind::Skew,
        ] {
            let steps = plan(1, kind, 5, Duration::from_secs(25), &[kind]);
            assert!(!steps.is_empty(), "{kind}");
            assert!(steps.iter().all(|s| s.kind == kind), "{kind}");
        }
        assert!(plan(1, FaultKind::None, 3, Duration::from_secs(60), &[]).is_empty());
        let mixed = plan(
            3,
            FaultKind::Mixed,
            3,
            Duration::from_secs(600),
            &[FaultKind::Pause],
        );
        assert!(mixed.iter().all(|s| s.kind == FaultKind::Pause));
    }

    #[test]
    fn names_round_trip() {
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
        }
        assert!("boom".parse::<FaultKind>().is_err());
    }
}
