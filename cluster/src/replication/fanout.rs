//! The two ways a coordinator waits on replicas: a write fanned out to every replica of a set
//! until `W` ack, and a read gathered from `R` replicas with fail-over to the next candidate.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

use super::coordinator::Inner;
use super::error::{FailureReason, QuorumError, ReplicaFailure};
use super::quorum::{read_quorum, write_quorum, Decision, WriteTally};
use super::replica::{LocalReplica, ReplicaClient};
use super::topology::ReplicaNode;
use crate::placement::NodeId;

impl<L: LocalReplica, C: ReplicaClient> Inner<L, C> {
    /// Runs `job` for every replica of `set` in background tasks and waits for `W` of them
    /// to succeed (or for that to become impossible, or the write timeout). The jobs left
    /// running go on to the end.
    pub(super) async fn replicate<F, Fut>(
        self: &Arc<Self>,
        set: Vec<ReplicaNode>,
        job: F,
    ) -> Result<Vec<NodeId>, QuorumError>
    where
        F: Fn(Arc<Self>, ReplicaNode) -> Fut,
        Fut: Future<Output = Result<(), FailureReason>> + Send + 'static,
    {
        let mut tally = WriteTally::new(set.len(), write_quorum(set.len()));
        let (tx, mut rx) = mpsc::channel(set.len().max(1));
        let mut pending: Vec<NodeId> = Vec::with_capacity(set.len());
        for node in set {
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
                Decision::Reached => return Ok(tally.acked().to_vec()),
                Decision::Impossible => return Err(tally.unavailable([])),
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
                Ok(None) | Err(_) => return Err(tally.unavailable(pending)),
            }
        }
    }

    /// Asks replicas of `set` (this node first, then live ones in rendezvous order) until
    /// `R` have answered; a failed one is replaced by the next candidate.
    pub(super) async fn read_quorum_of<'a, T, F, Fut>(
        &'a self,
        set: &[ReplicaNode],
        read: F,
    ) -> Result<Vec<(NodeId, T)>, QuorumError>
    where
        F: Fn(ReplicaNode) -> Fut,
        Fut: Future<Output = Result<T, FailureReason>> + 'a,
    {
        let needed = read_quorum(set.len());
        let mut failed = Vec::new();
        let mut candidates = VecDeque::with_capacity(set.len());
        for node in set {
            if self.is_self(node) {
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

/// Runs `call` for at most `limit`, mapping its error into a [`FailureReason`].
pub(super) async fn bounded<T, E>(
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, FailureReason>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(FailureReason::failed(error)),
        Err(_) => Err(FailureReason::TimedOut),
    }
}
