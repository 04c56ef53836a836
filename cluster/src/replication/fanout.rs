//! The two ways a coordinator waits on replicas: a write fanned out to every replica of a set
//! until `W` ack, and a read gathered from `R` replicas with fail-over to the next candidate.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use super::coordinator::Inner;
use super::error::{FailureReason, QuorumError, ReplicaFailure};
use super::quorum::{read_quorum, Decision, JointTally};
use super::replica::{LocalReplica, ReplicaClient};
use super::topology::{Quorums, ReplicaNode};
use crate::placement::NodeId;

impl<L: LocalReplica, C: ReplicaClient> Inner<L, C> {
    /// Runs `job` for every replica of `target` in background tasks and waits for `W` of
    /// each of its sets to succeed (or for that to become impossible, or the write timeout).
    /// The jobs left running go on to the end.
    pub(super) async fn replicate<F, Fut>(
        self: &Arc<Self>,
        target: Quorums,
        job: F,
    ) -> Result<JointTally, QuorumError>
    where
        F: Fn(Arc<Self>, ReplicaNode) -> Fut,
        Fut: Future<Output = Result<(), FailureReason>> + Send + 'static,
    {
        let mut tally = JointTally::new(&target.sets);
        let (tx, mut rx) = mpsc::channel(target.nodes.len().max(1));
        let mut pending: Vec<NodeId> = Vec::with_capacity(target.nodes.len());
        for node in target.nodes {
            let id = node.id;
            pending.push(id);
            let work = job(self.clone(), node);
            let tx = tx.clone();
            let cancel = self.cancel.clone();
            self.tasks.spawn(async move {
                let result = tokio::select! {
                    result = work => result,
                    _ = cancel.cancelled() => Err(FailureReason::ShutDown),
                };
                // Once the quorum is decided nobody listens any more; the job itself has
                // already done what matters (the write, or the hint).
                let _ = tx.send((id, result)).await;
            });
        }
        drop(tx);
        let deadline = Instant::now() + self.config.write_timeout;
        loop {
            match tally.decision() {
                Decision::Reached => return Ok(tally),
                Decision::Impossible => return Err(tally.unavailable(&[])),
                Decision::Pending => {}
            }
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some((id, result))) => {
                    pending.retain(|n| *n != id);
                    match result {
                        Ok(()) => tally.ack(id),
                        Err(reason) => tally.fail(id, reason),
                    };
                }
                Ok(None) | Err(_) => return Err(tally.unavailable(&pending)),
            }
        }
    }

    /// Asks replicas of `target` until `R` of each of its sets have answered. With one set:
    /// this node first, then live ones in rendezvous order, a failed one replaced by the next
    /// candidate. While a node joins (two sets): every live node of both, at once.
    pub(super) async fn read_quorum_of<'a, T, F, Fut>(
        &'a self,
        target: &Quorums,
        read: F,
    ) -> Result<Vec<(NodeId, T)>, QuorumError>
    where
        F: Fn(ReplicaNode) -> Fut,
        Fut: Future<Output = Result<T, FailureReason>> + 'a,
    {
        if target.in_transition() {
            return self.read_all_of(target, read).await;
        }
        let set = &target.nodes;
        let needed = read_quorum(set.len());
        let mut failed = Vec::new();
        let mut candidates = VecDeque::with_capacity(set.len());
        for node in set {
            if self.is_self(node) && node.live {
                candidates.push_front(node.clone());
            } else if node.live {
                candidates.push_back(node.clone());
            } else {
                failed.push(ReplicaFailure {
                    node: node.id,
                    reason: FailureReason::NotLive,
                });
            }
        }
        let start = |node: ReplicaNode| {
            let id = node.id;
            let call = read(node);
            async move { (id, call.await) }
        };
        let mut running = FuturesUnordered::new();
        let mut in_flight = Vec::new();
        while running.len() < needed {
            let Some(node) = candidates.pop_front() else {
                break;
            };
            in_flight.push(node.id);
            running.push(start(node));
        }
        let deadline = Instant::now() + self.config.read_timeout;
        let mut answers = Vec::with_capacity(needed);
        while answers.len() < needed {
            match timeout_at(deadline, running.next()).await {
                Ok(Some((id, result))) => {
                    in_flight.retain(|n| *n != id);
                    match result {
                        Ok(answer) => answers.push((id, answer)),
                        Err(reason) => {
                            failed.push(ReplicaFailure { node: id, reason });
                            if let Some(node) = candidates.pop_front() {
                                in_flight.push(node.id);
                                running.push(start(node));
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    failed.extend(in_flight.drain(..).map(|node| ReplicaFailure {
                        node,
                        reason: FailureReason::TimedOut,
                    }));
                    break;
                }
            }
        }
        if answers.len() >= needed {
            Ok(answers)
        } else {
            Err(QuorumError::Unavailable {
                acked: answers.len(),
                needed,
                failed,
            })
        }
    }
}

impl<L: LocalReplica, C: ReplicaClient> Inner<L, C> {
    /// Reads every live node of `target` and checks that each set has `R` answers.
    async fn read_all_of<'a, T, F, Fut>(
        &'a self,
        target: &Quorums,
        read: F,
    ) -> Result<Vec<(NodeId, T)>, QuorumError>
    where
        F: Fn(ReplicaNode) -> Fut,
        Fut: Future<Output = Result<T, FailureReason>> + 'a,
    {
        let mut failed = Vec::new();
        let mut running = FuturesUnordered::new();
        for node in &target.nodes {
            if node.live {
                let (id, call) = (node.id, read(node.clone()));
                running.push(async move { (id, call.await) });
            } else {
                failed.push(ReplicaFailure {
                    node: node.id,
                    reason: FailureReason::NotLive,
                });
            }
        }
        let deadline = Instant::now() + self.config.read_timeout;
        let mut answers = Vec::with_capacity(target.nodes.len());
        let mut in_flight: Vec<NodeId> = target.nodes.iter().map(|n| n.id).collect();
        in_flight.retain(|id| !failed.iter().any(|f: &ReplicaFailure| f.node == *id));
        loop {
            match timeout_at(deadline, running.next()).await {
                Ok(Some((id, result))) => {
                    in_flight.retain(|n| *n != id);
                    match result {
                        Ok(answer) => answers.push((id, answer)),
                        Err(reason) => failed.push(ReplicaFailure { node: id, reason }),
                    }
                    if short_of(target, &answers).is_none() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    failed.extend(in_flight.drain(..).map(|node| ReplicaFailure {
                        node,
                        reason: FailureReason::TimedOut,
                    }));
                    break;
                }
            }
        }
        match short_of(target, &answers) {
            None => Ok(answers),
            Some((acked, needed)) => Err(QuorumError::Unavailable {
                acked,
                needed,
                failed,
            }),
        }
    }
}

/// The first set of `target` with fewer than `R` answers: `(answers, R)`.
fn short_of<T>(target: &Quorums, answers: &[(NodeId, T)]) -> Option<(usize, usize)> {
    target.sets.iter().find_map(|set| {
        let needed = read_quorum(set.len());
        let got = answers.iter().filter(|(id, _)| set.contains(id)).count();
        (got < needed).then_some((got, needed))
    })
}
