//! One sender/receiver pair for one `direct` step: sends on the sender's connection (at the
//! step's rate, or keeping a window of unacked sends), reads acks there and deliveries on the
//! receiver's, and matches them by client id: `step.pair.seq.sent_us`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use client_proto::codec::Codec;
use client_proto::{ClientFrame, Recipient, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::arrivals::{Arrivals, Schedule};
use super::conn::{self, Conn};
use super::report::{self, Counters};

pub(super) struct Plan {
    pub(super) step: usize,
    /// The bench's time origin: send times in client ids are µs since it.
    pub(super) t0: Instant,
    pub(super) start: Instant,
    pub(super) rate_per_pair: Option<f64>,
    pub(super) arrivals: Arrivals,
    /// How many pairs send (for the senders' phases).
    pub(super) pairs: usize,
    pub(super) window: usize,
    pub(super) duration: Duration,
    pub(super) max_messages: Option<u64>,
    pub(super) grace: Duration,
    pub(super) body: String,
    pub(super) codec: Codec,
}

pub(super) struct PairStats {
    pub(super) sent: u64,
    pub(super) acked: u64,
    pub(super) errors: u64,
    pub(super) delivered: u64,
    pub(super) duplicated: u64,
    pub(super) lost: u64,
    pub(super) unacked: u64,
    pub(super) ack: Histogram<u64>,
    pub(super) delivery: Histogram<u64>,
    pub(super) last_ack: Option<Instant>,
    pub(super) last_delivery: Option<Instant>,
    pub(super) first_error: Option<String>,
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
pub(super) async fn pair_task(
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
    let mut schedule = Schedule::new(
        plan.arrivals,
        plan.start,
        plan.rate_per_pair,
        pair,
        plan.pairs,
        plan.step as u64,
    );
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
            _ = tokio::time::sleep_until(schedule.due()), if can_send => {
                let now = Instant::now();
                let mut n = 0u64;
                while in_flight < plan.window
                    && schedule.due() <= now
                    && now < send_end
                    && !matches!(plan.max_messages, Some(m) if seq >= m)
                    && n < 256
                {
                    let sched = if schedule.paced() { schedule.due() } else { now };
                    schedule.advance();
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
                    Some(ServerFrame::Error { code, message, reference: Some(reference), .. })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        assert_eq!(parse_id("2.17.40.123456"), Some((2, 17, 40, 123456)));
        assert_eq!(parse_id("2.17.40"), None);
        assert_eq!(parse_id("a.b.c.d"), None);
    }
}
