//! One member of a `group` step: sends its share of the group's messages (if it is one of the
//! senders), heartbeats, and records every delivery by key (`step.group.sender.seq.sent_us`)
//! until everything acked in its group has arrived or the grace period ends.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use client_proto::codec::Codec;
use client_proto::ids::GroupId;
use client_proto::{ClientFrame, Recipient, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::arrivals::{Arrivals, Schedule};
use super::conn::{self, Conn};
use super::report::{self, Counters};

pub(super) struct Plan {
    pub(super) step: usize,
    pub(super) t0: Instant,
    pub(super) start: Instant,
    pub(super) rate_per_sender: Option<f64>,
    pub(super) arrivals: Arrivals,
    /// Groups in the step (for the senders' phases).
    pub(super) groups: usize,
    pub(super) window: usize,
    pub(super) send_end: Instant,
    pub(super) max_messages: Option<u64>,
    pub(super) grace: Duration,
    pub(super) body: String,
    pub(super) codec: Codec,
    pub(super) senders: usize,
}

/// Shared per group: how many messages were acked, how many senders finished.
#[derive(Default)]
pub(super) struct GroupShared {
    pub(super) acked: AtomicU64,
    pub(super) senders_done: AtomicUsize,
}

pub(super) struct MemberOut {
    pub(super) acked: Vec<u64>,
    /// (message key, latency µs) for every delivery.
    pub(super) got: Vec<(u64, u32)>,
    pub(super) errors: u64,
    pub(super) delivery: Histogram<u64>,
    pub(super) last_delivery: Option<Instant>,
    pub(super) last_ack: Option<Instant>,
}

/// Message key inside a group: sender index and sequence number.
fn key(sender: usize, seq: u64) -> u64 {
    ((sender as u64) << 40) | seq
}

/// `step.group.sender.seq.sent_us` → (step, group, key, sent_us).
fn parse_id(id: &str) -> Option<(usize, usize, u64, u64)> {
    let mut it = id.split('.');
    let step = it.next()?.parse().ok()?;
    let group = it.next()?.parse().ok()?;
    let sender: usize = it.next()?.parse().ok()?;
    let seq: u64 = it.next()?.parse().ok()?;
    let sent = it.next()?.parse().ok()?;
    Some((step, group, key(sender, seq), sent))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn member_task(
    gi: usize,
    k: usize,
    group: GroupId,
    mut c: Conn,
    plan: Arc<Plan>,
    shared: Arc<Vec<GroupShared>>,
    counters: Arc<Counters>,
) -> Result<(usize, usize, Conn, MemberOut)> {
    let mine = &shared[gi];
    let sender = k < plan.senders;
    let mut o = MemberOut {
        acked: Vec::new(),
        got: Vec::new(),
        errors: 0,
        delivery: report::histogram(),
        last_delivery: None,
        last_ack: None,
    };
    let (mut seq, mut in_flight, mut done_sending) = (0u64, 0usize, !sender);
    let hb_every = Duration::from_millis(c.heartbeat_interval_ms.clamp(500, 60_000));
    let mut hb = tokio::time::interval_at(Instant::now() + hb_every, hb_every);
    let mut check = tokio::time::interval(Duration::from_millis(50));
    let grace_end = plan.send_end + plan.grace;
    // Every sender of every group is one of the step's senders: groups × senders of them.
    let mut schedule = Schedule::new(
        plan.arrivals,
        plan.start,
        plan.rate_per_sender,
        gi * plan.senders + k,
        plan.groups * plan.senders,
        plan.step as u64,
    );
    loop {
        let now = Instant::now();
        if !done_sending
            && (now >= plan.send_end || matches!(plan.max_messages, Some(m) if seq >= m))
            && in_flight == 0
        {
            done_sending = true;
            mine.senders_done.fetch_add(1, Ordering::SeqCst);
        }
        if done_sending && mine.senders_done.load(Ordering::SeqCst) >= plan.senders {
            let expected = mine.acked.load(Ordering::SeqCst) - o.acked.len() as u64;
            if o.got.len() as u64 >= expected || now >= grace_end {
                break;
            }
        }
        if now >= grace_end + plan.grace {
            break;
        }
        let can_send = sender
            && !done_sending
            && now < plan.send_end
            && in_flight < plan.window
            && !matches!(plan.max_messages, Some(m) if seq >= m);
        tokio::select! {
            _ = tokio::time::sleep_until(schedule.due()), if can_send => {
                let now = Instant::now();
                let mut n = 0;
                while in_flight < plan.window && schedule.due() <= now && n < 64
                    && !matches!(plan.max_messages, Some(m) if seq >= m)
                {
                    let sched = if schedule.paced() { schedule.due() } else { now };
                    schedule.advance();
                    let id = format!("{}.{gi}.{k}.{seq}.{}", plan.step, sched.saturating_duration_since(plan.t0).as_micros());
                    let f = ClientFrame::Send { id, to: Recipient::Group(group), body: plan.body.clone() };
                    c.sink.feed(conn::encode(plan.codec, &f)).await.context("sending")?;
                    seq += 1;
                    in_flight += 1;
                    n += 1;
                }
                c.sink.flush().await.context("sending")?;
                Counters::add(&counters.sent, n);
            }
            msg = c.stream.next() => match conn::decode(msg).context("member connection")? {
                Some(ServerFrame::Ack { reference, .. }) => {
                    if let Some((step, _, key, _)) = parse_id(&reference) {
                        if step == plan.step {
                            in_flight = in_flight.saturating_sub(1);
                            o.acked.push(key);
                            o.last_ack = Some(Instant::now());
                            mine.acked.fetch_add(1, Ordering::SeqCst);
                            Counters::add(&counters.acked, 1);
                        }
                    }
                }
                Some(ServerFrame::Error { reference: Some(r), .. })
                    if parse_id(&r).is_some_and(|(s, ..)| s == plan.step) =>
                {
                    in_flight = in_flight.saturating_sub(1);
                    o.errors += 1;
                    Counters::add(&counters.errors, 1);
                }
                Some(ServerFrame::Message { message }) => {
                    if let Some((step, g2, key, sent)) = parse_id(&message.client_id) {
                        if step == plan.step && g2 == gi {
                            let now = Instant::now();
                            let lat = now.saturating_duration_since(plan.t0).saturating_sub(Duration::from_micros(sent));
                            report::record(&mut o.delivery, lat);
                            o.got.push((key, lat.as_micros().min(u32::MAX as u128) as u32));
                            o.last_delivery = Some(now);
                            Counters::add(&counters.delivered, 1);
                        }
                    }
                }
                _ => {}
            },
            _ = hb.tick() => {
                c.sink.send(conn::encode(plan.codec, &ClientFrame::Heartbeat)).await.context("heartbeat")?;
            }
            _ = check.tick() => {}
        }
    }
    Ok((gi, k, c, o))
}
