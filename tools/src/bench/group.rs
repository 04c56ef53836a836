//! `group`: G groups of M members, every member connected. In each group the first S members
//! send (together `--rate` msgs/s per group, or `max` with a window each); every member counts
//! what it receives. A message's fan-out latency is the time until its *last* member got it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use client_proto::codec::Codec;
use client_proto::ids::GroupId;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::arrivals::{arrivals_name, Arrivals};
use super::conn::{self, Conn};
use super::member::{member_task, GroupShared, MemberOut, Plan};
use super::report::{self, int, ms, ratio, Counters, Latency, Progress, Table};
use super::{Endpoint, Outcome, Target, TargetArgs};

/// `chatnode bench group`.
#[derive(clap::Args, Debug, Clone)]
pub struct GroupArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Number of groups.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Members per group (the protocol's limit is 100).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members of each group that send.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages/s into each group, or `max`; comma-separate for steps.
    #[arg(long, value_delimiter = ',', default_value = "max")]
    pub rate: Vec<String>,
    /// Most unacked sends per sender at `max`.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// How long each step sends, seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Stop each sender after this many messages per step.
    #[arg(long)]
    pub messages: Option<u64>,
    /// How long to wait for outstanding acks and deliveries after a step, seconds.
    #[arg(long, default_value_t = 5)]
    pub grace_secs: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// How the senders' sends spread over time at a fixed `--rate` (no effect at `max`).
    #[arg(long, value_enum, default_value_t)]
    pub arrivals: Arrivals,
}

/// One step's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupStep {
    pub step: String,
    pub messages_acked: u64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub errors: u64,
    pub acked_per_s: f64,
    pub deliveries_per_s: f64,
    pub delivery: Latency,
    pub last_member: Latency,
    /// What the step cost the node processes, per delivery.
    pub cost: Option<super::cost::Cost>,
    /// Messages acked in each group.
    #[serde(skip)]
    pub acked_by_group: Vec<u64>,
}

/// `chatnode bench group`.
pub async fn run(args: GroupArgs) -> Result<Outcome> {
    if args.members < 2 || args.senders == 0 || args.senders > args.members {
        bail!("need --members ≥ 2 and 1 ≤ --senders ≤ --members");
    }
    let mut target = Target::open(&args.target)?;
    target.settle().await?;
    let measured = measure(
        &target.endpoint,
        target.codec,
        Some(&target.meter),
        None,
        &args,
    )
    .await;
    target.check_alive()?;
    let (steps, sync) = measured?;
    // The baseline: the same groups, members and steps against the in-process relay, which
    // fans each send out to the other members and stores nothing.
    let baseline = if args.target.baseline {
        let relay = super::relay::Relay::start().await?;
        let endpoint = Endpoint::Relay {
            ws_url: relay.ws_url(),
        };
        let steps = measure(&endpoint, target.codec, None, Some(&relay), &args).await;
        relay.shutdown().await;
        Some(steps?.0)
    } else {
        None
    };
    let mut table = Table::new(
        format!(
            "group: {} group(s) of {} members, {} senders each, {} arrivals at a fixed rate (latencies in ms)",
            args.groups,
            args.members,
            args.senders,
            arrivals_name(args.arrivals)
        ),
        &[
            "step",
            "msgs acked/s",
            "deliveries/s",
            "vs relay",
            "lost",
            "dup",
            "errors",
            "dlv p50",
            "dlv p99",
            "last p50",
            "last p99",
            "last max",
            super::cost::HEADERS[0],
            super::cost::HEADERS[1],
            super::cost::HEADERS[2],
        ],
    );
    for (i, s) in steps.iter().enumerate() {
        let base = baseline
            .as_ref()
            .and_then(|b| b.get(i))
            .map(|b| b.deliveries_per_s);
        table.row(
            vec![
                s.step.clone(),
                int(s.acked_per_s),
                int(s.deliveries_per_s),
                ratio(s.deliveries_per_s, base),
                s.lost.to_string(),
                s.duplicated.to_string(),
                s.errors.to_string(),
                ms(s.delivery.p50_ms),
                ms(s.delivery.p99_ms),
                ms(s.last_member.p50_ms),
                ms(s.last_member.p99_ms),
                ms(s.last_member.max_ms),
            ]
            .into_iter()
            .chain(super::cost::cells(s.cost.as_ref()))
            .collect(),
        );
    }
    for b in baseline.iter().flatten() {
        table.row(
            vec![
                format!("relay {}", b.step),
                int(b.acked_per_s),
                int(b.deliveries_per_s),
                "1.00x".into(),
                b.lost.to_string(),
                b.duplicated.to_string(),
                b.errors.to_string(),
                ms(b.delivery.p50_ms),
                ms(b.delivery.p99_ms),
                ms(b.last_member.p50_ms),
                ms(b.last_member.p99_ms),
                ms(b.last_member.max_ms),
            ]
            .into_iter()
            .chain(super::cost::cells(None))
            .collect(),
        );
    }
    let mut tables = vec![table];
    let mut failures = Vec::new();
    if let Some(sync) = &sync {
        tables.push(sync.table());
        if sync.messages < sync.expected {
            failures.push(format!(
                "sync: {} of the member's {} messages came back",
                sync.messages, sync.expected
            ));
        }
    }
    let mut lost = 0;
    for s in &steps {
        lost += s.lost;
        if s.lost > 0 {
            failures.push(format!("step {}: {} deliveries missing", s.step, s.lost));
        }
        if s.errors > 0 {
            failures.push(format!("step {}: {} sends refused", s.step, s.errors));
        }
    }
    Ok(Outcome {
        scenario: "group",
        tables,
        json: serde_json::json!({ "arrivals": args.arrivals, "steps": steps, "baseline": baseline, "sync": sync }),
        lost,
        failures,
    })
}

/// After the steps, one member's whole inbox read back with one `sync` from nothing, on a
/// connection of its own (what a new device does): every message the member's group had
/// acknowledged, each body read from the store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncFigures {
    /// Messages acknowledged in the member's group over every step.
    pub expected: u64,
    /// Messages the sync returned.
    pub messages: u64,
    /// `sync_batch` frames.
    pub batches: u64,
    /// Body bytes returned.
    pub body_bytes: u64,
    pub ms: f64,
    pub messages_per_s: f64,
    pub body_mb_per_s: f64,
    /// What the sync cost the node processes, per message returned.
    pub cost: Option<super::cost::Cost>,
}

impl SyncFigures {
    fn table(&self) -> Table {
        let mut table = Table::new(
            String::from(
                "sync: one member's whole inbox from nothing, one `sync` on a new connection",
            ),
            &[
                "messages",
                "of acked",
                "batches",
                "body MB",
                "ms",
                "msgs/s",
                "body MB/s",
                super::cost::HEADERS[0],
            ],
        );
        table.row(vec![
            self.messages.to_string(),
            self.expected.to_string(),
            self.batches.to_string(),
            format!("{:.1}", self.body_bytes as f64 / 1e6),
            format!("{:.0}", self.ms),
            int(self.messages_per_s),
            format!("{:.1}", self.body_mb_per_s),
            super::cost::cells(self.cost.as_ref())[0].clone(),
        ]);
        table
    }
}

/// Reads `account`'s whole inbox with one `sync` on a new connection.
async fn sync_inbox(
    account: &super::Account,
    codec: Codec,
    expected: u64,
    meter: Option<&super::cost::Meter>,
) -> Result<SyncFigures> {
    let mut c = conn::connect(&account.ws_url, &account.token, codec).await?;
    let before = match meter {
        Some(m) => Some(m.read().await),
        None => None,
    };
    let started = Instant::now();
    let sync = client_proto::ClientFrame::Sync {
        after: None,
        limit: None,
    };
    c.sink
        .send(conn::encode(codec, &sync))
        .await
        .context("sending sync")?;
    let mut out = SyncFigures {
        expected,
        ..SyncFigures::default()
    };
    let deadline = started + Duration::from_secs(300);
    loop {
        let msg = tokio::time::timeout_at(deadline, c.stream.next())
            .await
            .map_err(|_| anyhow!("the sync did not end within 300 s"))?;
        match conn::decode(msg)? {
            Some(client_proto::ServerFrame::SyncBatch { messages, done, .. }) => {
                out.batches += 1;
                out.messages += messages.len() as u64;
                out.body_bytes += messages.iter().map(|m| m.body.len() as u64).sum::<u64>();
                if done {
                    break;
                }
            }
            Some(client_proto::ServerFrame::Error { code, message, .. }) => {
                bail!("sync refused: {code}: {message}")
            }
            _ => {}
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    out.ms = secs * 1e3;
    out.messages_per_s = out.messages as f64 / secs;
    out.body_mb_per_s = out.body_bytes as f64 / 1e6 / secs;
    if let (Some(meter), Some(before)) = (meter, before) {
        let after = meter.read().await;
        out.cost = meter.cost(&before, &after, out.messages, secs);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), c.sink.close()).await;
    Ok(out)
}

/// Sets up the groups (on the nodes, or in `relay`), connects every member, runs the steps;
/// `meter` reads each step's cost. On the nodes, then syncs one member's inbox.
async fn measure(
    endpoint: &Endpoint,
    codec: Codec,
    meter: Option<&super::cost::Meter>,
    relay: Option<&super::relay::Relay>,
    args: &GroupArgs,
) -> Result<(Vec<GroupStep>, Option<SyncFigures>)> {
    let (g, m) = (args.groups, args.members);
    let accounts = endpoint.accounts(g * m, "bg").await?;
    let mut groups = Vec::with_capacity(g);
    for (i, members) in accounts.chunks(m).enumerate() {
        if let Some(relay) = relay {
            let id = GroupId(i as u64 + 1);
            relay.add_group(id, members.iter().map(|a| a.user_id).collect());
            groups.push(id);
            continue;
        }
        let owner = &members[0];
        let api = endpoint.api(owner.server).context("no HTTP server")?;
        let others: Vec<_> = members[1..].iter().map(|a| a.user_id).collect();
        let info = api
            .create_group(&owner.token, &format!("bench group {i}"), &others)
            .await
            .context("creating a group")?;
        groups.push(info.group_id);
    }
    let conns = futures_util::stream::iter(accounts.iter())
        .map(|a| conn::connect(&a.ws_url, &a.token, codec))
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut members: Vec<(usize, usize, Conn)> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i / m, i % m, c))
        .collect();
    let t0 = Instant::now();
    let mut out = Vec::new();
    for (step, raw) in args.rate.iter().enumerate() {
        let rate = match raw.trim() {
            "max" => None,
            n => Some(
                n.parse::<f64>()
                    .ok()
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| anyhow!("--rate {n}: a positive number or `max`"))?,
            ),
        };
        let name = rate.map_or("max".to_string(), |r| format!("{}/s", int(r)));
        let start = Instant::now();
        let plan = Arc::new(Plan {
            step,
            t0,
            start,
            rate_per_sender: rate.map(|r| r / args.senders as f64),
            arrivals: args.arrivals,
            groups: g,
            window: args.window.max(1),
            send_end: start + Duration::from_secs(args.duration_secs),
            max_messages: args.messages,
            grace: Duration::from_secs(args.grace_secs),
            body: "x".repeat(args.body_bytes),
            codec,
            senders: args.senders,
        });
        let shared: Arc<Vec<GroupShared>> =
            Arc::new((0..g).map(|_| GroupShared::default()).collect());
        let counters = Arc::new(Counters::default());
        let before = match meter {
            Some(m) => Some(m.read().await),
            None => None,
        };
        let progress = Progress::start(format!("group {name}"), counters.clone());
        let mut tasks = JoinSet::new();
        for (gi, k, c) in members.drain(..) {
            tasks.spawn(member_task(
                gi,
                k,
                groups[gi],
                c,
                plan.clone(),
                shared.clone(),
                counters.clone(),
            ));
        }
        let mut outs: Vec<(usize, usize, MemberOut)> = Vec::new();
        let mut first_err = None;
        while let Some(j) = tasks.join_next().await {
            match j.context("a member task panicked")? {
                Ok((gi, k, c, o)) => {
                    members.push((gi, k, c));
                    outs.push((gi, k, o));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        progress.stop().await;
        if let Some(e) = first_err {
            return Err(e.context(format!("step {name}")));
        }
        let mut step = summarize(name, m, &plan, outs);
        if let (Some(meter), Some(before)) = (meter, before) {
            let after = meter.read().await;
            let secs = plan.start.elapsed().as_secs_f64();
            step.cost = meter.cost(&before, &after, step.deliveries, secs);
        }
        out.push(step);
    }
    for (_, _, mut c) in members {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.sink.close()).await;
    }
    // The last member of the first group (a receiver unless every member sends).
    let sync = match (relay, accounts.get(m - 1)) {
        (None, Some(account)) => {
            let expected = out
                .iter()
                .map(|s| s.acked_by_group.first().copied().unwrap_or(0))
                .sum();
            Some(sync_inbox(account, codec, expected, meter).await?)
        }
        _ => None,
    };
    Ok((out, sync))
}

fn summarize(
    step: String,
    members: usize,
    plan: &Plan,
    outs: Vec<(usize, usize, MemberOut)>,
) -> GroupStep {
    let mut s = GroupStep {
        step,
        ..GroupStep::default()
    };
    // (group, key) → (receivers, slowest latency µs)
    let mut per_msg: HashMap<(usize, u64), (u64, u32)> = HashMap::new();
    let mut delivery = report::histogram();
    let (mut last_ack, mut last_dlv) = (plan.start, plan.start);
    for (g, _, o) in &outs {
        s.errors += o.errors;
        s.messages_acked += o.acked.len() as u64;
        if s.acked_by_group.len() <= *g {
            s.acked_by_group.resize(*g + 1, 0);
        }
        s.acked_by_group[*g] += o.acked.len() as u64;
        for key in &o.acked {
            per_msg.entry((*g, *key)).or_insert((0, 0));
        }
    }
    for (g, _, mut o) in outs {
        let _ = delivery.add(&o.delivery);
        last_ack = last_ack.max(o.last_ack.unwrap_or(plan.start));
        last_dlv = last_dlv.max(o.last_delivery.unwrap_or(plan.start));
        o.got.sort_unstable();
        let before = o.got.len();
        o.got.dedup_by_key(|(k, _)| *k);
        s.duplicated += (before - o.got.len()) as u64;
        s.deliveries += o.got.len() as u64;
        for (key, lat) in o.got {
            let e = per_msg.entry((g, key)).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(lat);
        }
    }
    let fan = members as u64 - 1;
    s.expected_deliveries = s.messages_acked * fan;
    let mut last = report::histogram();
    for (count, lat) in per_msg.values() {
        if *count >= fan {
            report::record(&mut last, Duration::from_micros(u64::from(*lat)));
        } else {
            s.lost += fan - count;
        }
    }
    let secs = |t: Instant| {
        t.saturating_duration_since(plan.start)
            .as_secs_f64()
            .max(1e-3)
    };
    s.acked_per_s = s.messages_acked as f64 / secs(last_ack);
    s.deliveries_per_s = s.deliveries as f64 / secs(last_dlv);
    s.delivery = Latency::of(&delivery);
    s.last_member = Latency::of(&last);
    s
}
