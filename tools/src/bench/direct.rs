//! `direct` (and `relay-baseline`): P sender/receiver pairs. Each step sends for a while at a
//! fixed aggregate rate, or at `max` with a bounded window of unacked sends per sender, then
//! waits (up to a grace period) for the outstanding acks and deliveries. Deliveries are
//! matched by the message's `client_id`, which carries the step, the pair, the sequence
//! number and the scheduled send time, so no state is shared between tasks.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use client_proto::codec::Codec;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::arrivals::{arrivals_name, Arrivals};
use super::conn::{self, Conn};
use super::pair::{pair_task, PairStats, Plan};
use super::report::{self, int, ms, ratio, Counters, Latency, Progress, Table};
use super::{CodecArg, Endpoint, Outcome, Target, TargetArgs};

/// `chatnode bench direct` / `relay-baseline`.
#[derive(clap::Args, Debug, Clone)]
pub struct DirectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Aggregate msgs/s, or `max`; repeat or comma-separate for steps (`--rate 1000,5000,max`).
    #[arg(long, value_delimiter = ',', default_value = "max")]
    pub rate: Vec<String>,
    /// Most unacked sends per sender (pipelining depth).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// How long each step sends.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Stop each sender after this many messages per step (whichever comes first).
    #[arg(long)]
    pub messages: Option<u64>,
    /// How long to wait for outstanding acks and deliveries after a step.
    #[arg(long, default_value_t = 5)]
    pub grace_secs: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// How the pairs' sends spread over time at a fixed `--rate` (no effect at `max`).
    #[arg(long, value_enum, default_value_t)]
    pub arrivals: Arrivals,
}

impl DirectArgs {
    /// What `--baseline` runs against the relay.
    pub fn baseline_defaults(codec: CodecArg, secs: u64) -> DirectArgs {
        DirectArgs {
            target: TargetArgs {
                servers: Vec::new(),
                spawn_node: false,
                spawn_cluster: None,
                node_args: Vec::new(),
                node_bin: None,
                baseline: false,
                codec,
                node_pid: None,
                cost_pids: Vec::new(),
            },
            pairs: 50,
            rate: vec!["max".into()],
            window: 64,
            duration_secs: secs,
            messages: None,
            grace_secs: 5,
            body_bytes: 100,
            arrivals: Arrivals::default(),
        }
    }
}

/// One step's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepResult {
    pub step: String,
    pub target_rate: Option<f64>,
    pub pairs: usize,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    pub unacked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    pub ack: Latency,
    pub delivery: Latency,
    pub first_error: Option<String>,
    /// What the step cost the node processes (not measured for the in-process relay).
    pub cost: Option<super::cost::Cost>,
}

#[derive(Clone, Copy, Debug)]
enum Rate {
    Max,
    PerSec(f64),
}

fn parse_rates(raw: &[String]) -> Result<Vec<Rate>> {
    raw.iter()
        .map(|r| match r.trim() {
            "max" => Ok(Rate::Max),
            n => n
                .parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0)
                .map(Rate::PerSec)
                .ok_or_else(|| anyhow!("--rate {n}: expected a positive number or `max`")),
        })
        .collect()
}

/// `chatnode bench direct` (or, with `relay`, `relay-baseline`).
pub async fn run(args: DirectArgs, relay: bool) -> Result<Outcome> {
    let steps = if relay {
        measure_relay(&args).await?
    } else {
        let mut target = Target::open(&args.target)?;
        target.settle().await?;
        let steps = measure(
            &target.endpoint,
            target.codec,
            &args,
            "direct",
            Some(&target.meter),
        )
        .await;
        target.check_alive()?;
        steps?
    };
    let baseline = if args.target.baseline && !relay {
        Some(super::baseline(args.target.codec, args.duration_secs).await?)
    } else {
        None
    };
    let name = if relay { "relay-baseline" } else { "direct" };
    let mut table = Table::new(
        format!(
            "{name}: {} pairs, window {}, {} B bodies, {} arrivals at a fixed rate (latencies in ms)",
            args.pairs,
            args.window,
            args.body_bytes,
            arrivals_name(args.arrivals)
        ),
        &[
            "step",
            "sent",
            "acked/s",
            "delivered/s",
            "vs relay",
            "lost",
            "dup",
            "errors",
            "ack p50",
            "ack p99",
            "ack p999",
            "ack max",
            "dlv p50",
            "dlv p99",
            "dlv p999",
            "dlv max",
            super::cost::HEADERS[0],
            super::cost::HEADERS[1],
            super::cost::HEADERS[2],
        ],
    );
    let base_rate = baseline.as_ref().map(|b| b.delivered_per_s);
    for s in steps.iter().chain(baseline.iter()) {
        let is_base = baseline.as_ref().is_some_and(|b| std::ptr::eq(b, s));
        table.row(
            vec![
                if is_base {
                    format!("relay {}", s.step)
                } else {
                    s.step.clone()
                },
                int(s.sent as f64),
                int(s.acked_per_s),
                int(s.delivered_per_s),
                if is_base {
                    "1.00x".into()
                } else {
                    ratio(s.delivered_per_s, base_rate)
                },
                s.lost.to_string(),
                s.duplicated.to_string(),
                s.errors.to_string(),
                ms(s.ack.p50_ms),
                ms(s.ack.p99_ms),
                ms(s.ack.p999_ms),
                ms(s.ack.max_ms),
                ms(s.delivery.p50_ms),
                ms(s.delivery.p99_ms),
                ms(s.delivery.p999_ms),
                ms(s.delivery.max_ms),
            ]
            .into_iter()
            .chain(super::cost::cells(s.cost.as_ref()))
            .collect(),
        );
    }
    let mut failures = Vec::new();
    let mut lost = 0;
    for s in &steps {
        lost += s.lost;
        if s.lost > 0 {
            failures.push(format!(
                "step {}: {} acked messages never delivered",
                s.step, s.lost
            ));
        }
        if s.unacked > 0 {
            failures.push(format!(
                "step {}: {} sends never answered",
                s.step, s.unacked
            ));
        }
        if s.errors > 0 {
            failures.push(format!(
                "step {}: {} sends refused (first: {})",
                s.step,
                s.errors,
                s.first_error.as_deref().unwrap_or("?")
            ));
        }
        if s.duplicated > 0 {
            // At-least-once allows duplicates; they are reported, not failed.
            eprintln!(
                "bench: step {}: {} duplicate deliveries",
                s.step, s.duplicated
            );
        }
    }
    Ok(Outcome {
        scenario: name,
        tables: vec![table],
        json: serde_json::json!({ "arrivals": args.arrivals, "steps": steps, "baseline": baseline }),
        lost,
        failures,
    })
}

/// Runs the steps against an in-process relay.
pub async fn measure_relay(args: &DirectArgs) -> Result<Vec<StepResult>> {
    let relay = super::relay::Relay::start().await?;
    let endpoint = Endpoint::Relay {
        ws_url: relay.ws_url(),
    };
    let result = measure(&endpoint, args.target.codec.into(), args, "relay", None).await;
    relay.shutdown().await;
    result
}

/// Sets up the pairs, runs every step, closes the connections.
pub async fn measure(
    endpoint: &Endpoint,
    codec: Codec,
    args: &DirectArgs,
    label: &str,
    meter: Option<&super::cost::Meter>,
) -> Result<Vec<StepResult>> {
    let rates = parse_rates(&args.rate)?;
    if args.pairs == 0 || args.window == 0 {
        bail!("--pairs and --window must be at least 1");
    }
    let accounts = endpoint.accounts(2 * args.pairs, "bd").await?;
    let conns = futures_util::stream::iter(accounts.iter())
        .map(|a| conn::connect(&a.ws_url, &a.token, codec))
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut pairs: Vec<(Conn, Conn)> = Vec::with_capacity(args.pairs);
    let mut it = conns.into_iter();
    while let (Some(s), Some(r)) = (it.next(), it.next()) {
        pairs.push((s, r));
    }
    let t0 = Instant::now();
    let mut results = Vec::new();
    for (i, rate) in rates.iter().enumerate() {
        let step_name = match rate {
            Rate::Max => "max".to_string(),
            Rate::PerSec(r) => format!("{}/s", int(*r)),
        };
        let plan = Arc::new(Plan {
            step: i,
            t0,
            start: Instant::now(),
            rate_per_pair: match rate {
                Rate::Max => None,
                Rate::PerSec(r) => Some(r / args.pairs as f64),
            },
            arrivals: args.arrivals,
            pairs: args.pairs,
            window: args.window,
            duration: Duration::from_secs(args.duration_secs),
            max_messages: args.messages,
            grace: Duration::from_secs(args.grace_secs),
            body: "x".repeat(args.body_bytes),
            codec,
        });
        let counters = Arc::new(Counters::default());
        let before = match meter {
            Some(m) => Some(m.read().await),
            None => None,
        };
        let progress = Progress::start(format!("{label} {step_name}"), counters.clone());
        let mut tasks = JoinSet::new();
        for (p, (s, r)) in pairs.drain(..).enumerate() {
            tasks.spawn(pair_task(p, s, r, plan.clone(), counters.clone()));
        }
        let mut stats = Vec::new();
        let mut first_err = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.context("a pair task panicked")? {
                Ok((s, r, st)) => {
                    pairs.push((s, r));
                    stats.push(st);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        progress.stop().await;
        if let Some(e) = first_err {
            return Err(e.context(format!("step {step_name}")));
        }
        let mut result = summarize(step_name, rate, args.pairs, &plan, stats);
        if let (Some(m), Some(before)) = (meter, before) {
            let after = m.read().await;
            let secs = plan.start.elapsed().as_secs_f64();
            result.cost = m.cost(&before, &after, result.delivered, secs);
        }
        results.push(result);
    }
    for (s, r) in pairs {
        close(s).await;
        close(r).await;
    }
    Ok(results)
}

async fn close(mut c: Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(1), c.sink.close()).await;
}

fn summarize(
    step: String,
    rate: &Rate,
    pairs: usize,
    plan: &Plan,
    stats: Vec<PairStats>,
) -> StepResult {
    let mut out = StepResult {
        step,
        target_rate: match rate {
            Rate::Max => None,
            Rate::PerSec(r) => Some(*r),
        },
        pairs,
        ..StepResult::default()
    };
    let mut ack = report::histogram();
    let mut delivery = report::histogram();
    let (mut last_ack, mut last_delivery) = (plan.start, plan.start);
    for st in stats {
        out.sent += st.sent;
        out.acked += st.acked;
        out.delivered += st.delivered;
        out.errors += st.errors;
        out.unacked += st.unacked;
        out.lost += st.lost;
        out.duplicated += st.duplicated;
        let _ = ack.add(&st.ack);
        let _ = delivery.add(&st.delivery);
        last_ack = last_ack.max(st.last_ack.unwrap_or(plan.start));
        last_delivery = last_delivery.max(st.last_delivery.unwrap_or(plan.start));
        if out.first_error.is_none() {
            out.first_error = st.first_error;
        }
    }
    let secs = |t: Instant| {
        t.saturating_duration_since(plan.start)
            .as_secs_f64()
            .max(1e-3)
    };
    out.acked_per_s = out.acked as f64 / secs(last_ack);
    out.delivered_per_s = out.delivered as f64 / secs(last_delivery);
    out.ack = Latency::of(&ack);
    out.delivery = Latency::of(&delivery);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let r = parse_rates(&["1000".into(), "max".into()]).unwrap();
        assert!(matches!(r[0], Rate::PerSec(v) if v == 1000.0));
        assert!(matches!(r[1], Rate::Max));
        assert!(parse_rates(&["-1".into()]).is_err());
    }
}
