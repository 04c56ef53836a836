//! Writes that span partitions, sent as one request per replica node instead of one per
//! partition per replica: a group message touches ~100 inbox partitions, but only RF-or-so
//! nodes. Each partition still needs its own write quorum; a node's ack counts for every
//! partition of its request.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use super::coordinator::{quorums_in, Inner};
use super::error::{FailureReason, QuorumError};
use super::quorum::{Decision, JointTally};
use super::record::ReplicaOp;
use super::replica::{LocalReplica, ReplicaClient};
use super::rpc::ApplyBatch;
use super::topology::ReplicaNode;
use crate::placement::{NodeId, Partition};

/// One replica node's share of a multi-partition write.
struct NodeShare {
    node: ReplicaNode,
    partition: Partition,
    ops: Vec<ReplicaOp>,
    /// Indexes of the partitions (in the caller's list) this node replicates.
    serves: Vec<usize>,
}

impl<L: LocalReplica, C: ReplicaClient> Inner<L, C> {
    /// Writes every `(partition, ops)` at its replicas with one apply per node, and waits
    /// until every partition has its write quorum (or one cannot, or the write timeout).
    pub(super) async fn replicate_grouped(
        self: &Arc<Self>,
        batches: Vec<(Partition, Vec<ReplicaOp>)>,
    ) -> Result<(), QuorumError> {
        let mut tallies = Vec::with_capacity(batches.len());
        let mut shares: Vec<NodeShare> = Vec::new();
        // One view for the whole write, held until it is decided (see `Inner::quorums`).
        let view = self.topology();
        for (i, (partition, ops)) in batches.into_iter().enumerate() {
            let target = quorums_in(&view, partition)?;
            tallies.push(JointTally::new(&target.sets));
            for node in target.nodes {
                match shares.iter_mut().find(|s| s.node.id == node.id) {
                    Some(share) => {
                        share.ops.extend(ops.iter().cloned());
                        share.serves.push(i);
                    }
                    None => shares.push(NodeShare {
                        node,
                        partition,
                        ops: ops.clone(),
                        serves: vec![i],
                    }),
                }
            }
        }
        let (tx, mut rx) = mpsc::channel(shares.len().max(1));
        let mut pending: Vec<(NodeId, Vec<usize>)> = Vec::with_capacity(shares.len());
        for share in shares {
            let id = share.node.id;
            pending.push((id, share.serves));
            let batch = ApplyBatch::new(share.partition, share.ops);
            let (inner, tx, cancel) = (self.clone(), tx.clone(), self.cancel.clone());
            self.tasks.spawn(async move {
                let result = tokio::select! {
                    r = inner.apply_job(share.node, batch) => r,
                    _ = cancel.cancelled() => Err(FailureReason::ShutDown),
                };
                let _ = tx.send((id, result)).await; // nobody listens once decided
            });
        }
        drop(tx);
        let deadline = Instant::now() + self.config.write_timeout;
        loop {
            if tallies.iter().all(|t| t.decision() == Decision::Reached) {
                return Ok(());
            }
            if let Some(t) = tallies
                .iter()
                .find(|t| t.decision() == Decision::Impossible)
            {
                return Err(t.clone().unavailable(&[]));
            }
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some((id, result))) => {
                    let Some(pos) = pending.iter().position(|(n, _)| *n == id) else {
                        continue;
                    };
                    let (_, serves) = pending.swap_remove(pos);
                    for i in serves {
                        match &result {
                            Ok(()) => tallies[i].ack(id),
                            Err(reason) => tallies[i].fail(id, reason.clone()),
                        };
                    }
                }
                Ok(None) | Err(_) => {
                    let waiting: Vec<NodeId> = pending.iter().map(|(n, _)| *n).collect();
                    return match tallies
                        .into_iter()
                        .find(|t| t.decision() != Decision::Reached)
                    {
                        Some(stuck) => Err(stuck.unavailable(&waiting)),
                        None => Ok(()),
                    };
                }
            }
        }
    }
}
