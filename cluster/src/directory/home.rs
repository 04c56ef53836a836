//! Serving: what a home replica does with registrations, subscriptions and statements, its
//! pushes to subscribers, and following membership.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use super::pipeline::Lane;
use super::table::Changed;
use super::wire::{DirReply, DirRequest};
use super::{home_partition, Inner, Placement};
use crate::lifecycle::ClusterView;
use crate::membership::{newest_by_node, Lifecycle};
use crate::placement::{replicas, NodeId, Partition};

impl Inner {
    /// Serves a request (from a peer, or from this node to itself).
    pub(super) async fn serve(self: &Arc<Self>, req: DirRequest) -> DirReply {
        let from = req.from();
        let mut reply = DirReply::default();
        let mut changed: Vec<Changed> = Vec::new();
        let seq;
        match req {
            DirRequest::Update {
                gen, regs, subs, ..
            } => {
                let mut s = self.state.lock();
                seq = match admit(&mut s, from, gen, &mut changed) {
                    Ok(seq) => seq,
                    Err(refused) => return refused,
                };
                for (u, on) in regs {
                    let p = home_partition(&self.cfg, u).0;
                    changed.extend(s.table.update(p, u, |e| {
                        if on {
                            e.nodes.insert(from)
                        } else {
                            e.nodes.remove(from)
                        }
                    }));
                }
                for (u, on) in subs {
                    let p = home_partition(&self.cfg, u).0;
                    s.table.update(p, u, |e| {
                        if on {
                            e.subs.insert(from);
                        } else {
                            e.subs.remove(from);
                        }
                        false
                    });
                    if on {
                        let nodes = s.table.get(p, u).map(|e| e.nodes.to_vec());
                        reply.current.push((u, nodes.unwrap_or_default()));
                    }
                }
            }
            DirRequest::Statement {
                gen,
                partitions,
                regs,
                subs,
                ..
            } => {
                let regs: HashSet<u64> = regs.into_iter().collect();
                let subs: HashSet<u64> = subs.into_iter().collect();
                let mut s = self.state.lock();
                seq = match admit(&mut s, from, gen, &mut changed) {
                    Ok(seq) => seq,
                    Err(refused) => return refused,
                };
                let cfg = &self.cfg;
                changed.extend(s.table.replace(from, &partitions, &regs, &subs, |u| {
                    home_partition(cfg, u).0
                }));
                for &u in &subs {
                    let p = home_partition(cfg, u).0;
                    let nodes = s.table.get(p, u).map(|e| e.nodes.to_vec());
                    reply.current.push((u, nodes.unwrap_or_default()));
                }
            }
            DirRequest::Push { changes, .. } => {
                self.apply_answers(from, changes);
                return reply;
            }
            DirRequest::Resend { .. } => {
                self.queue(from, Lane::Control, |out| out.statement = true);
                return reply;
            }
        }
        reply.seq = seq;
        metrics::gauge!("directory_entries").set(self.state.lock().table.len() as f64);
        // Tell the subscribers before answering, so that a registration, once answered,
        // is known wherever the user is watched or routed to.
        let waits = self.push(changed, seq);
        if !waits.is_empty() {
            let all = futures_util::future::join_all(waits);
            let _ = tokio::time::timeout(self.cfg.push_wait, all).await;
        }
        reply
    }

    /// Queues pushes of `changed` to their subscribers; the receivers resolve when each
    /// subscriber's push was sent.
    pub(super) fn push(
        self: &Arc<Self>,
        changed: Vec<Changed>,
        seq: u64,
    ) -> Vec<oneshot::Receiver<()>> {
        let mut per_node: HashMap<NodeId, Vec<(u64, Vec<NodeId>, u64)>> = HashMap::new();
        for c in changed {
            for s in c.subs {
                per_node
                    .entry(s)
                    .or_default()
                    .push((c.user, c.nodes.clone(), seq));
            }
        }
        let mut waits = Vec::new();
        for (node, changes) in per_node {
            if node == self.cfg.self_id {
                // This node's own subscription: apply at once.
                self.apply_answers(node, changes);
                continue;
            }
            let (tx, rx) = oneshot::channel();
            self.queue(node, Lane::Push, |out| {
                for (u, nodes, seq) in changes {
                    out.add_push(u, nodes, seq);
                }
                out.waiters.push(tx);
            });
            waits.push(rx);
        }
        waits
    }

    /// Follows membership: forgets dead and restarted nodes, and sends statements where
    /// partitions moved or a node came back.
    pub(super) fn follow(self: &Arc<Self>, mut view: watch::Receiver<ClusterView>) {
        let this = self.clone();
        let first = view.borrow_and_update().clone();
        this.apply_view(&first);
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    changed = view.changed() => if changed.is_err() { break },
                }
                let v = view.borrow_and_update().clone();
                this.apply_view(&v);
            }
        });
    }

    pub(super) fn apply_view(self: &Arc<Self>, view: &ClusterView) {
        let me = self.cfg.self_id;
        let newest = newest_by_node(&view.members);
        let live: BTreeMap<NodeId, u64> = newest
            .values()
            .filter(|m| m.live || m.node_id == me)
            .map(|m| (m.node_id, m.generation))
            .collect();
        let mut candidates: Vec<NodeId> = newest
            .values()
            .filter(|m| {
                (m.live || m.node_id == me)
                    && m.state == Lifecycle::Active
                    && !view.topology.is_outgoing(m.node_id)
            })
            .map(|m| m.node_id)
            .collect();
        candidates.sort_unstable();
        let homes: Vec<Vec<NodeId>> = (0..self.cfg.partitions.max(1))
            .map(|p| replicas(Partition(p), &candidates, self.cfg.copies))
            .collect();
        let mut statement_to: HashSet<NodeId> = HashSet::new();
        let mut resend_from: HashSet<NodeId> = HashSet::new();
        let mut changed_homes: Vec<Changed> = Vec::new();
        let mut changed_users: Vec<u64> = Vec::new();
        let forget_seq;
        {
            let mut s = self.state.lock();
            let old = std::mem::take(&mut s.placement);
            if old.live == live && old.homes == homes {
                s.placement = old;
                return;
            }
            let gone: Vec<NodeId> = old
                .live
                .iter()
                .filter(|(n, g)| live.get(n) != Some(g))
                .map(|(n, _)| *n)
                .collect();
            let back: Vec<NodeId> = live
                .iter()
                .filter(|(n, g)| **n != me && old.live.get(n) != Some(g))
                .map(|(n, _)| *n)
                .collect();
            for &g in &gone {
                // A node that restarted and already registered here with its new generation
                // keeps what it registered; an older incarnation's entries go.
                let registered_as_new = live
                    .get(&g)
                    .is_some_and(|new| s.reg_gen.get(&g).is_some_and(|r| r >= new));
                if !registered_as_new {
                    changed_homes.extend(s.table.forget_node(g));
                    s.reg_gen.remove(&g);
                }
            }
            s.seq += 1;
            forget_seq = s.seq;
            for (p, new) in homes.iter().enumerate() {
                let before = old.homes.get(p);
                for n in new {
                    if before.is_none_or(|b| !b.contains(n)) {
                        statement_to.insert(*n);
                    }
                }
            }
            for &b in &back {
                statement_to.insert(b);
                resend_from.insert(b);
            }
            s.table
                .retain_partitions(|p| homes.get(p as usize).is_some_and(|h| h.contains(&me)));
            let cfg = &self.cfg;
            for (u, w) in s.wanted.iter_mut() {
                let h = &homes[home_partition(cfg, *u).0 as usize];
                let before = w.answers.len();
                w.answers
                    .retain(|(r, _, _)| h.contains(r) && !gone.contains(r));
                // Users on nodes that died go offline here at once (and come back with them).
                let touched = w.answers.len() != before
                    || w.answers.iter().any(|(_, set, _)| {
                        set.iter().any(|n| gone.contains(&n) || back.contains(&n))
                    });
                if touched {
                    changed_users.push(*u);
                }
            }
            s.placement = Placement { live, homes };
        }
        // This node too: a partition it gains starts empty here, its own users included.
        for node in statement_to {
            let resend = resend_from.contains(&node);
            self.queue(node, Lane::Control, |out| {
                out.statement = true;
                out.resend |= resend;
            });
        }
        let _ = self.push(changed_homes, forget_seq);
        if !changed_users.is_empty() {
            self.hooks.changed(&changed_users);
        }
        metrics::gauge!("directory_entries").set(self.state.lock().table.len() as f64);
    }
}

/// Admits a registering request from `from` at generation `gen` and bumps the change
/// counter (its value is the request's). A newer generation than the one it registered with
/// before means it restarted, so what the older one registered is forgotten first (into
/// `changed`); an older generation is a late request from a dead incarnation, refused with
/// an empty answer.
fn admit(
    s: &mut super::State,
    from: NodeId,
    gen: u64,
    changed: &mut Vec<Changed>,
) -> Result<u64, DirReply> {
    s.seq += 1;
    match s.reg_gen.get(&from).copied() {
        Some(known) if known > gen => {
            return Err(DirReply {
                seq: s.seq,
                current: Vec::new(),
            })
        }
        Some(known) if known < gen => {
            changed.extend(s.table.forget_node(from));
            s.reg_gen.insert(from, gen);
        }
        Some(_) => {}
        None => {
            s.reg_gen.insert(from, gen);
        }
    }
    Ok(s.seq)
}
