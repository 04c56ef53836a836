//! `presence`: P friend pairs. One side (the watcher) stays connected; the other connects and
//! disconnects `--rounds` times. Reported: the time from the start of the connect (or from
//! the close) until the watcher's `presence` frame for that change arrives.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use client_proto::{ClientFrame, PresenceStatus, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::conn::{self, Conn};
use std::sync::Arc;

use super::report::{self, int, ms, ratio, Counters, Latency, Progress, Table};
use super::{Account, Outcome, Target, TargetArgs};

/// `chatnode bench presence`.
#[derive(clap::Args, Debug, Clone)]
pub struct PresenceArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Friend pairs.
    #[arg(long, default_value_t = 20)]
    pub pairs: usize,
    /// Connect/disconnect cycles per pair.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// How long to wait for one presence frame before counting it missing.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

/// The scenario's figures.
#[derive(Debug, Default, Serialize)]
pub struct PresenceResult {
    pub pairs: usize,
    pub rounds: usize,
    pub changes: u64,
    pub missing: u64,
    pub online: Latency,
    pub offline: Latency,
    pub changes_per_s: f64,
}

struct PairOut {
    online: Histogram<u64>,
    offline: Histogram<u64>,
    missing: u64,
}

/// `chatnode bench presence`.
pub async fn run(args: PresenceArgs) -> Result<Outcome> {
    if args.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let mut target = Target::open(&args.target)?;
    target.settle().await?;
    let result = measure(&target, &args).await;
    target.check_alive()?;
    let r = result?;
    let baseline = if args.target.baseline {
        Some(super::baseline(args.target.codec, 10).await?)
    } else {
        None
    };
    let mut table = Table::new(
        format!(
            "presence: {} friend pairs, {} rounds (latencies in ms)",
            r.pairs, r.rounds
        ),
        &["change", "count", "p50", "p99", "p999", "max", "vs relay"],
    );
    for (name, l) in [("online", &r.online), ("offline", &r.offline)] {
        table.row(vec![
            name.into(),
            int(l.count as f64),
            ms(l.p50_ms),
            ms(l.p99_ms),
            ms(l.p999_ms),
            ms(l.max_ms),
            // The relay has no presence; its delivery p99 is the nearest figure.
            baseline
                .as_ref()
                .map_or("-".into(), |b| ratio(l.p99_ms, Some(b.delivery.p99_ms))),
        ]);
    }
    table.row(vec![
        "missing".into(),
        r.missing.to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    let mut failures = Vec::new();
    if r.missing > 0 {
        failures.push(format!("{} presence changes never arrived", r.missing));
    }
    Ok(Outcome {
        scenario: "presence",
        tables: vec![table],
        lost: r.missing,
        json: serde_json::json!({ "result": r, "baseline": baseline }),
        failures,
    })
}

async fn measure(target: &Target, args: &PresenceArgs) -> Result<PresenceResult> {
    let accounts = target.endpoint.accounts(2 * args.pairs, "bp").await?;
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(
        "presence (sent=connects, delivered=changes seen)".into(),
        counters.clone(),
    );
    for pair in accounts.chunks(2) {
        let (w, c) = (pair[0].clone(), pair[1].clone());
        let api = target.endpoint.api(w.server).context("no HTTP server")?;
        // Friendship is mutual: one asks, the other accepts.
        api.befriend(&w.token, c.user_id)
            .await
            .context("asking to be friends")?;
        let state = api
            .befriend(&c.token, w.user_id)
            .await
            .context("accepting a friend request")?;
        anyhow::ensure!(
            state == client_proto::http::FriendState::Friends,
            "the friend request was not accepted: {state:?}"
        );
        let watcher = conn::connect(&w.ws_url, &w.token, target.codec).await?;
        tasks.spawn(pair_task(
            watcher,
            c,
            target.codec,
            args.rounds,
            Duration::from_secs(args.timeout_secs),
            counters.clone(),
        ));
    }
    let mut r = PresenceResult {
        pairs: args.pairs,
        rounds: args.rounds,
        ..PresenceResult::default()
    };
    let (mut online, mut offline) = (report::histogram(), report::histogram());
    while let Some(j) = tasks.join_next().await {
        let out = match j.context("a presence task panicked")? {
            Ok(o) => o,
            Err(e) => {
                progress.stop().await;
                return Err(e);
            }
        };
        let _ = online.add(&out.online);
        let _ = offline.add(&out.offline);
        r.missing += out.missing;
    }
    progress.stop().await;
    r.changes = online.len() + offline.len();
    r.changes_per_s = r.changes as f64 / started.elapsed().as_secs_f64().max(1e-3);
    r.online = Latency::of(&online);
    r.offline = Latency::of(&offline);
    eprintln!(
        "bench: presence done: {} changes, {} missing",
        r.changes, r.missing
    );
    Ok(r)
}

/// Waits on the watcher for `user`'s change to `status`; `false` on timeout.
async fn wait_presence(
    w: &mut Conn,
    user: client_proto::ids::UserId,
    status: PresenceStatus,
    timeout: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let msg = match tokio::time::timeout_at(deadline, w.stream.next()).await {
            Ok(m) => m,
            Err(_) => return Ok(false),
        };
        if let Some(ServerFrame::Presence {
            user_id, status: s, ..
        }) = conn::decode(msg).context("watcher connection")?
        {
            if user_id == user && s == status {
                return Ok(true);
            }
        }
    }
}

async fn pair_task(
    mut w: Conn,
    churner: Account,
    codec: client_proto::codec::Codec,
    rounds: usize,
    timeout: Duration,
    counters: Arc<Counters>,
) -> Result<PairOut> {
    let mut out = PairOut {
        online: report::histogram(),
        offline: report::histogram(),
        missing: 0,
    };
    for _ in 0..rounds {
        w.sink
            .send(conn::encode(codec, &ClientFrame::Heartbeat))
            .await
            .context("heartbeat")?;
        let t = Instant::now();
        let mut c = conn::connect(&churner.ws_url, &churner.token, codec).await?;
        Counters::add(&counters.sent, 1);
        if wait_presence(&mut w, churner.user_id, PresenceStatus::Online, timeout).await? {
            report::record(&mut out.online, t.elapsed());
            Counters::add(&counters.delivered, 1);
        } else {
            out.missing += 1;
            Counters::add(&counters.errors, 1);
        }
        let t = Instant::now();
        let _ = c.sink.close().await;
        drop(c);
        if wait_presence(&mut w, churner.user_id, PresenceStatus::Offline, timeout).await? {
            report::record(&mut out.offline, t.elapsed());
            Counters::add(&counters.delivered, 1);
        } else {
            out.missing += 1;
            Counters::add(&counters.errors, 1);
        }
    }
    let _ = w.sink.close().await;
    Ok(out)
}
