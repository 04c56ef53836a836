//! Sending: one outbox and one task per peer and lane, one request in flight, retried with
//! backoff until the peer answers or is declared dead; and the statements a node sends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use super::wire::{self, DirReply, DirRequest, MAX_USERS_PER_REQUEST};
use super::{home_partition, Inner};
use crate::placement::NodeId;

/// Longest wait between attempts to reach a peer.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What is queued for one peer.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) regs: HashMap<u64, bool>,
    pub(super) subs: HashMap<u64, bool>,
    pub(super) pushes: HashMap<u64, (Vec<NodeId>, u64)>,
    /// Send a full statement of what this node holds and watches at the peer.
    pub(super) statement: bool,
    /// Ask the peer for its statement.
    pub(super) resend: bool,
    /// Told when the pushes queued before them were sent (dropped, which tells too, when
    /// a send failed: the home replica waits for them a bounded time only).
    pub(super) waiters: Vec<oneshot::Sender<()>>,
}

/// Users per request the sender puts in one `Update` or `Push` (half the receiver's bound).
const CHUNK: usize = MAX_USERS_PER_REQUEST / 2;

impl Outbox {
    pub(super) fn is_empty(&self) -> bool {
        self.regs.is_empty()
            && self.subs.is_empty()
            && self.pushes.is_empty()
            && !self.statement
            && !self.resend
            && self.waiters.is_empty()
    }

    /// Queues a push of `user`'s node set as of the counter `seq`, unless a newer one is
    /// queued (two requests served at once may queue their pushes in either order).
    pub(super) fn add_push(&mut self, user: u64, nodes: Vec<NodeId>, seq: u64) {
        match self.pushes.get(&user) {
            Some((_, queued)) if *queued > seq => {}
            _ => {
                self.pushes.insert(user, (nodes, seq));
            }
        }
    }

    /// Puts back what `older` held under what was queued since: registrations and
    /// subscriptions queued since are newer; pushes go by their counter. The older
    /// waiters are dropped (which tells them): their home replica stopped waiting.
    pub(super) fn merge_older(&mut self, older: Outbox) {
        for (u, v) in older.regs {
            self.regs.entry(u).or_insert(v);
        }
        for (u, v) in older.subs {
            self.subs.entry(u).or_insert(v);
        }
        for (u, (nodes, seq)) in older.pushes {
            self.add_push(u, nodes, seq);
        }
        self.statement |= older.statement;
        self.resend |= older.resend;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Lane {
    Control,
    Push,
}

pub(super) struct PeerQueue {
    pub(super) out: Outbox,
    pub(super) kick: Arc<Notify>,
}

impl Inner {
    /// Adds to `node`'s outbox and wakes its task (started on first use).
    pub(super) fn queue(self: &Arc<Self>, node: NodeId, lane: Lane, f: impl FnOnce(&mut Outbox)) {
        let kick = {
            let mut queues = self.queues.lock();
            let q = queues.entry((node, lane)).or_insert_with(|| {
                let kick = Arc::new(Notify::new());
                self.spawn_peer_task(node, lane, kick.clone());
                PeerQueue {
                    out: Outbox::default(),
                    kick,
                }
            });
            f(&mut q.out);
            q.kick.clone()
        };
        kick.notify_one();
    }

    /// The task that sends `node` what is queued for it, one request at a time.
    pub(super) fn spawn_peer_task(self: &Arc<Self>, node: NodeId, lane: Lane, kick: Arc<Notify>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut failures = 0u32;
            let mut retry_at: Option<tokio::time::Instant> = None;
            loop {
                let far = tokio::time::Instant::now() + Duration::from_secs(3600);
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    _ = kick.notified() => {}
                    _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {}
                }
                let out = {
                    let mut queues = this.queues.lock();
                    match queues.get_mut(&(node, lane)) {
                        Some(q) => std::mem::take(&mut q.out),
                        None => continue,
                    }
                };
                if out.is_empty() {
                    retry_at = None;
                    continue;
                }
                let live = node == this.cfg.self_id
                    || this.state.lock().placement.live.contains_key(&node);
                if !live {
                    // What it missed goes in the statement it gets when it is back.
                    retry_at = None;
                    failures = 0;
                    continue;
                }
                let sent = tokio::select! {
                    _ = this.stop.cancelled() => break,
                    sent = this.send_out(node, out) => sent,
                };
                match sent {
                    Ok(()) => {
                        failures = 0;
                        retry_at = None;
                        // More may have been queued while this was in flight.
                        kick.notify_one();
                    }
                    Err((back, error)) => {
                        tracing::debug!(node, %error, "a directory request failed; retrying");
                        metrics::counter!("directory_request_failures_total").increment(1);
                        if let Some(q) = this.queues.lock().get_mut(&(node, lane)) {
                            q.out.merge_older(back);
                        }
                        failures += 1;
                        let backoff =
                            Duration::from_millis(100) * 2u32.saturating_pow(failures.min(6));
                        retry_at = Some(tokio::time::Instant::now() + backoff.min(MAX_BACKOFF));
                    }
                }
            }
        });
    }

    /// Sends `out` to `node`: the resend request, then a statement or the updates, then the
    /// pushes. On failure, gives back what must be sent again.
    pub(super) async fn send_out(
        self: &Arc<Self>,
        node: NodeId,
        mut out: Outbox,
    ) -> Result<(), (Outbox, String)> {
        let me = self.cfg.self_id;
        if out.resend {
            if let Err(e) = self.call(node, DirRequest::Resend { from: me }).await {
                return Err((out, e));
            }
            out.resend = false;
        }
        if out.statement {
            // Whole partitions per request (a statement replaces them).
            for request in self.statements_for(node) {
                match self.call(node, request).await {
                    Ok(reply) => self.take_answers(node, reply),
                    Err(e) => return Err((out, e)),
                }
            }
            out.statement = false;
            // The statement said everything the updates would have.
            out.regs.clear();
            out.subs.clear();
        }
        // Updates in chunks; what a chunk carried leaves the outbox once answered.
        while !out.regs.is_empty() || !out.subs.is_empty() {
            let regs: Vec<(u64, bool)> = out
                .regs
                .iter()
                .take(CHUNK)
                .map(|(u, on)| (*u, *on))
                .collect();
            let subs: Vec<(u64, bool)> = out
                .subs
                .iter()
                .take(CHUNK - regs.len().min(CHUNK))
                .map(|(u, on)| (*u, *on))
                .collect();
            let request = DirRequest::Update {
                from: me,
                gen: self.cfg.generation,
                regs: regs.clone(),
                subs: subs.clone(),
            };
            match self.call(node, request).await {
                Ok(reply) => self.take_answers(node, reply),
                Err(e) => return Err((out, e)),
            }
            for (u, _) in regs {
                out.regs.remove(&u);
            }
            for (u, _) in subs {
                out.subs.remove(&u);
            }
        }
        while !out.pushes.is_empty() {
            let users: Vec<u64> = out.pushes.keys().take(CHUNK).copied().collect();
            let changes: Vec<(u64, Vec<NodeId>, u64)> = users
                .iter()
                .filter_map(|u| {
                    out.pushes
                        .get(u)
                        .map(|(nodes, seq)| (*u, nodes.clone(), *seq))
                })
                .collect();
            let request = DirRequest::Push { from: me, changes };
            if let Err(e) = self.call(node, request).await {
                return Err((out, e));
            }
            for u in users {
                out.pushes.remove(&u);
            }
        }
        for w in out.waiters.drain(..) {
            let _ = w.send(());
        }
        Ok(())
    }

    /// One request to `node` (served here when it is this node).
    pub(super) async fn call(
        self: &Arc<Self>,
        node: NodeId,
        request: DirRequest,
    ) -> Result<DirReply, String> {
        if node == self.cfg.self_id {
            return Ok(self.serve(request).await);
        }
        let body = wire::encode(&request)?;
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("directory_requests_sent_total").increment(1);
        let answer = self.peers.call(node, body).await?;
        wire::decode(&answer)
    }

    /// Everything this node holds and watches in the partitions homed at `node`, in
    /// requests of whole partitions.
    pub(super) fn statements_for(&self, node: NodeId) -> Vec<DirRequest> {
        let s = self.state.lock();
        let mut by_partition: BTreeMap<u32, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
        for (p, homes) in s.placement.homes.iter().enumerate() {
            if homes.contains(&node) {
                by_partition.insert(p as u32, (Vec::new(), Vec::new()));
            }
        }
        for &u in &s.local {
            if let Some(e) = by_partition.get_mut(&home_partition(&self.cfg, u).0) {
                e.0.push(u);
            }
        }
        for &u in s.wanted.keys() {
            if let Some(e) = by_partition.get_mut(&home_partition(&self.cfg, u).0) {
                e.1.push(u);
            }
        }
        let me = self.cfg.self_id;
        let mut out = Vec::new();
        let gen = self.cfg.generation;
        let mut current = DirRequest::Statement {
            from: me,
            gen,
            partitions: Vec::new(),
            regs: Vec::new(),
            subs: Vec::new(),
        };
        for (p, (regs, subs)) in by_partition {
            if current.users() + regs.len() + subs.len() > MAX_USERS_PER_REQUEST / 2 {
                out.push(std::mem::replace(
                    &mut current,
                    DirRequest::Statement {
                        from: me,
                        gen,
                        partitions: Vec::new(),
                        regs: Vec::new(),
                        subs: Vec::new(),
                    },
                ));
            }
            if let DirRequest::Statement {
                partitions,
                regs: r,
                subs: s,
                ..
            } = &mut current
            {
                partitions.push(p);
                r.extend(regs);
                s.extend(subs);
            }
        }
        out.push(current);
        out
    }
}
