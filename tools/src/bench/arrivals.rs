//! When each sender's sends are due at a fixed rate (`--arrivals`). The latency of a send is
//! measured from its due time, so a sender that falls behind still pays for its lateness
//! (no coordinated omission) whatever the model.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// How the sends of many senders at a fixed aggregate rate spread over time.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// Each sender's gaps are exponential (random, seeded per sender): together a Poisson
    /// process at the aggregate rate, as from many independent users.
    #[default]
    Poisson,
    /// Even gaps, the senders' phases spread across one gap: one send every
    /// 1/(aggregate rate).
    Uniform,
    /// Even gaps, every sender at the same phase: all senders send at once, in bursts of one
    /// send per sender (the bench's only model before `--arrivals`).
    Lockstep,
}

/// The model's name as `--arrivals` spells it (clap's name for the value).
pub fn arrivals_name(model: Arrivals) -> String {
    use clap::ValueEnum;
    model
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// One sender's due times at a fixed rate, or always `start` at `max`.
pub(super) struct Schedule {
    next: Instant,
    /// Mean gap between this sender's sends (`None` at `max`).
    gap: Option<Duration>,
    model: Arrivals,
    rng: StdRng,
}

impl Schedule {
    /// The schedule of sender `index` of `senders`, each at `rate_per_sender` msgs/s
    /// (`None`: as fast as its window allows), from `start`. `seed` varies it per step.
    pub(super) fn new(
        model: Arrivals,
        start: Instant,
        rate_per_sender: Option<f64>,
        index: usize,
        senders: usize,
        seed: u64,
    ) -> Schedule {
        let gap = rate_per_sender
            .filter(|r| r.is_finite() && *r > 0.0)
            // A rate so small that its gap overflows a Duration never sends within a step.
            .map(|r| Duration::try_from_secs_f64(1.0 / r).unwrap_or(Duration::from_secs(1 << 32)));
        let mut s = Schedule {
            next: start,
            gap,
            model,
            rng: StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        if let Some(gap) = gap {
            let first = match model {
                Arrivals::Poisson => s.exponential(gap),
                Arrivals::Uniform => gap.mul_f64(index as f64 / senders.max(1) as f64),
                Arrivals::Lockstep => Duration::ZERO,
            };
            s.next += first;
        }
        s
    }

    /// When the next send is due.
    pub(super) fn due(&self) -> Instant {
        self.next
    }

    /// Whether sends are paced (a fixed rate) rather than as fast as the window allows.
    pub(super) fn paced(&self) -> bool {
        self.gap.is_some()
    }

    /// Moves to the send after the one due now.
    pub(super) fn advance(&mut self) {
        let Some(gap) = self.gap else { return };
        let step = match self.model {
            Arrivals::Poisson => self.exponential(gap),
            Arrivals::Uniform | Arrivals::Lockstep => gap,
        };
        self.next += step;
    }

    /// An exponentially distributed gap with mean `mean`.
    fn exponential(&mut self, mean: Duration) -> Duration {
        // 1 - U is in (0, 1], so its logarithm is finite.
        let u: f64 = 1.0 - self.rng.gen::<f64>();
        mean.mul_f64(-u.ln())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Due times of `senders` senders over `secs`, merged and sorted, as offsets from start.
    fn merged(model: Arrivals, senders: usize, rate_per_sender: f64, secs: f64) -> Vec<f64> {
        let start = Instant::now();
        let mut all = Vec::new();
        for i in 0..senders {
            let mut s = Schedule::new(model, start, Some(rate_per_sender), i, senders, 7);
            while s.due() < start + Duration::from_secs_f64(secs) {
                all.push((s.due() - start).as_secs_f64());
                s.advance();
            }
        }
        all.sort_by(f64::total_cmp);
        all
    }

    /// Sends due less than 0.5 ms after the one before.
    fn crowded(times: &[f64]) -> usize {
        times.windows(2).filter(|w| w[1] - w[0] < 0.000_5).count()
    }

    #[test]
    fn every_model_keeps_the_aggregate_rate() {
        for model in [Arrivals::Poisson, Arrivals::Uniform, Arrivals::Lockstep] {
            let n = merged(model, 50, 20.0, 20.0).len() as f64;
            // 1,000/s for 20 s; Poisson's count has a standard deviation of ~141.
            assert!((n - 20_000.0).abs() < 1_000.0, "{model:?}: {n}");
        }
    }

    #[test]
    fn uniform_spreads_the_senders_and_lockstep_bunches_them() {
        let uniform = merged(Arrivals::Uniform, 50, 20.0, 2.0);
        let gaps: Vec<f64> = uniform.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| (g - 0.001).abs() < 1e-6), "{gaps:?}");
        let lockstep = merged(Arrivals::Lockstep, 50, 20.0, 2.0);
        // Each round of 50 is one instant: 49 of every 50 sends share it.
        assert_eq!(crowded(&lockstep), 49 * 40);
        let poisson = merged(Arrivals::Poisson, 50, 20.0, 20.0);
        // A Poisson process at 1/ms has a gap under 0.5 ms with probability 1 - e^-0.5 ≈ 39%.
        let share = crowded(&poisson) as f64 / poisson.len() as f64;
        assert!((0.35..0.44).contains(&share), "{share}");
    }

    #[test]
    fn max_is_never_paced() {
        let start = Instant::now();
        let mut s = Schedule::new(Arrivals::Poisson, start, None, 3, 10, 1);
        assert!(!s.paced());
        s.advance();
        assert_eq!(s.due(), start);
    }
}
