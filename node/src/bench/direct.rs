//! `direct` (and `relay-baseline`): P sender/receiver pairs. Each step sends for a while at a
//! fixed aggregate rate, or at `max` with a bounded window of unacked sends per sender, then
//! waits (up to a grace period) for the outstanding acks and deliveries. Deliveries are
//! matched by the message's `client_id`, which carries the step, the pair, the sequence
//! number and the scheduled send time, so no state is shared between tasks.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use client_proto::codec::Codec;
use client_proto::{ClientFrame, Recipient, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::conn::{self, Conn};
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
}

impl DirectArgs {
    /// What `--baseline` runs against the relay.
    pub fn baseline_defaults(codec: CodecArg, secs: u64) -> DirectArgs {
        DirectArgs {
            target: TargetArgs {
                servers: Vec::new(),
                spawn_node: false,
                node_args: Vec::new(),
                baseline: false,
                codec,
                node_pid: None,
            },
            pairs: 50,
            rate: vec!["max".into()],
            window: 64,
            duration_secs: secs,
            messages: None,
            grace_secs: 5,
            body_bytes: 100,
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
        let steps = measure(&target.endpoint, target.codec, &args, "direct").await;
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
            "{name}: {} pairs, window {}, {} B bodies (latencies in ms)",
            args.pairs, args.window, args.body_bytes
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
        ],
    );
    let base_rate = baseline.as_ref().map(|b| b.delivered_per_s);
    for s in steps.iter().chain(baseline.iter()) {
        let is_base = baseline.as_ref().is_some_and(|b| std::ptr::eq(b, s));
        table.row(vec![
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
        ]);
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
        json: serde_json::json!({ "steps": steps, "baseline": baseline }),
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
    let result = measure(&endpoint, args.target.codec.into(), args, "relay").await;
    relay.shutdown().await;
    result
}

/// Sets up the pairs, runs every step, closes the connections.
pub async fn measure(
    endpoint: &Endpoint,
    codec: Codec,
    args: &DirectArgs,
    label: &str,
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
            window: args.window,
            duration: Duration::from_secs(args.duration_secs),
            max_messages: args.messages,
            grace: Duration::from_secs(args.grace_secs),
            body: "x".repeat(args.body_bytes),
            codec,
        });
        let counters = Arc::new(Counters::default());
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
        results.push(summarize(step_name, rate, args.pairs, &plan, stats));
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

struct Plan {
    step: usize,
    /// The bench's time origin: send times in client ids are µs since it.
    t0: Instant,
    start: Instant,
    rate_per_pair: Option<f64>,
    window: usize,
    duration: Duration,
    max_messages: Option<u64>,
    grace: Duration,
    body: String,
    codec: Codec,
}

struct PairStats {
    sent: u64,
    acked: u64,
    errors: u64,
    delivered: u64,
    duplicated: u64,
    lost: u64,
    unacked: u64,
    ack: Histogram<u64>,
    delivery: Histogram<u64>,
    last_ack: Option<Instant>,
    last_delivery: Option<Instant>,
    first_error: Option<String>,
}

const ACKED: u8 = 1;
const DELIVERED: u8 = 2;

/// `step.pair.seq.sent_us` → its parts.
fn parse_id(id: &str) -> Option<(usize, usize, u64, u64)> {
    let mut it = id.split('.');
    let step = it.next()?.parse().ok()?;
    let pair = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    let sent = it.next()?.parse().ok()?;
    Some((step, pair, seq, sent))
}

/// One pair for one step: sends on `s`, reads acks on `s` and deliveries on `r`.
async fn pair_task(
    pair: usize,
    mut s: Conn,
    mut r: Conn,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
) -> Result<(Conn, Conn, PairStats)> {
    let mut st = PairStats {
        sent: 0,
        acked: 0,
        errors: 0,
        delivered: 0,
        duplicated: 0,
        lost: 0,
        unacked: 0,
        ack: report::histogram(),
        delivery: report::histogram(),
        last_ack: None,
        last_delivery: None,
        first_error: None,
    };
    let mut state: Vec<u8> = Vec::new();
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    let to = Recipient::User(r.user_id);
    let send_end = plan.start + plan.duration;
    let hb_every = Duration::from_millis(s.heartbeat_interval_ms.clamp(500, 60_000));
    let mut hb = tokio::time::interval_at(Instant::now() + hb_every, hb_every);
    let mut grace_end: Option<Instant> = None;
    let due = |seq: u64| match plan.rate_per_pair {
        None => plan.start,
        Some(rate) => plan.start + Duration::from_secs_f64(seq as f64 / rate),
    };
    loop {
        let now = Instant::now();
        let done_sending = now >= send_end || plan.max_messages.is_some_and(|m| seq >= m);
        if done_sending && grace_end.is_none() {
            grace_end = Some(now + plan.grace);
        }
        if done_sending && in_flight == 0 && st.delivered >= st.acked {
            break;
        }
        let can_send = !done_sending && in_flight < plan.window;
        tokio::select! {
            _ = tokio::time::sleep_until(due(seq).max(plan.start)), if can_send => {
                let now = Instant::now();
                let mut n = 0u64;
                while in_flight < plan.window
                    && due(seq) <= now
                    && now < send_end
                    && !matches!(plan.max_messages, Some(m) if seq >= m)
                    && n < 256
                {
                    let sched = if plan.rate_per_pair.is_some() { due(seq) } else { now };
                    let id = format!(
                        "{}.{pair}.{seq}.{}",
                        plan.step,
                        sched.saturating_duration_since(plan.t0).as_micros()
                    );
                    let frame = ClientFrame::Send { id, to, body: plan.body.clone() };
                    s.sink.feed(conn::encode(plan.codec, &frame)).await.context("sending")?;
                    state.push(0);
                    seq += 1;
                    in_flight += 1;
                    n += 1;
                }
                s.sink.flush().await.context("sending")?;
                st.sent += n;
                Counters::add(&counters.sent, n);
            }
            _ = tokio::time::sleep_until(send_end), if !done_sending => {}
            _ = tokio::time::sleep_until(grace_end.unwrap_or(send_end)), if grace_end.is_some() => break,
            msg = s.stream.next() => {
                match conn::decode(msg).context("sender connection")? {
                    Some(ServerFrame::Ack { reference, .. }) => {
                        let Some((step, _, n, sent)) = parse_id(&reference) else { continue };
                        if step != plan.step { continue; }
                        let now = Instant::now();
                        in_flight = in_flight.saturating_sub(1);
                        if let Some(flag) = state.get_mut(n as usize) {
                            *flag |= ACKED;
                        }
                        st.acked += 1;
                        st.last_ack = Some(now);
                        report::record(&mut st.ack, since(plan.t0, now, sent));
                        Counters::add(&counters.acked, 1);
                    }
                    Some(ServerFrame::Error { code, message, reference: Some(reference) })
                        if parse_id(&reference).is_some_and(|(step, ..)| step == plan.step) =>
                    {
                        in_flight = in_flight.saturating_sub(1);
                        st.errors += 1;
                        st.first_error.get_or_insert_with(|| format!("{code}: {message}"));
                        Counters::add(&counters.errors, 1);
                    }
                    _ => {}
                }
            }
            msg = r.stream.next() => {
                if let Some(ServerFrame::Message { message }) = conn::decode(msg).context("receiver connection")? {
                    let Some((step, p, n, sent)) = parse_id(&message.client_id) else { continue };
                    if step != plan.step || p != pair { continue; }
                    let now = Instant::now();
                    match state.get_mut(n as usize) {
                        Some(flag) if *flag & DELIVERED != 0 => st.duplicated += 1,
                        Some(flag) => {
                            *flag |= DELIVERED;
                            st.delivered += 1;
                            st.last_delivery = Some(now);
                            report::record(&mut st.delivery, since(plan.t0, now, sent));
                            Counters::add(&counters.delivered, 1);
                        }
                        None => {}
                    }
                }
            }
            _ = hb.tick() => {
                s.sink.send(conn::encode(plan.codec, &ClientFrame::Heartbeat)).await.context("heartbeat")?;
                r.sink.send(conn::encode(plan.codec, &ClientFrame::Heartbeat)).await.context("heartbeat")?;
            }
        }
    }
    st.unacked = in_flight as u64;
    st.lost = state.iter().filter(|f| **f == ACKED).count() as u64;
    Ok((s, r, st))
}

/// Time from `sent_us` (µs since `t0`) to `now`.
fn since(t0: Instant, now: Instant, sent_us: u64) -> Duration {
    now.saturating_duration_since(t0)
        .saturating_sub(Duration::from_micros(sent_us))
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
    fn ids_round_trip() {
        assert_eq!(parse_id("2.17.40.123456"), Some((2, 17, 40, 123456)));
        assert_eq!(parse_id("2.17.40"), None);
        assert_eq!(parse_id("a.b.c.d"), None);
    }

    #[test]
    fn rates_parse() {
        let r = parse_rates(&["1000".into(), "max".into()]).unwrap();
        assert!(matches!(r[0], Rate::PerSec(v) if v == 1000.0));
        assert!(matches!(r[1], Rate::Max));
        assert!(parse_rates(&["-1".into()]).is_err());
    }
}
