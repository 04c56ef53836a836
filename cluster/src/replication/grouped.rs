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
            let batches = split_ops(share.partition, share.ops, self.config.max_apply_bytes);
            let (inner, tx, cancel) = (self.clone(), tx.clone(), self.cancel.clone());
            self.tasks.spawn(async move {
                // Every request is sent at once (a failed one leaves a hint); the node acks
                // only if all of them were applied.
                let all = async {
                    let jobs = batches
                        .into_iter()
                        .map(|batch| inner.apply_job(share.node.clone(), batch));
                    futures_util::future::join_all(jobs)
                        .await
                        .into_iter()
                        .find(Result::is_err)
                        .unwrap_or(Ok(()))
                };
                let result = tokio::select! {
                    r = all => r,
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

/// `ops` as fresh apply batches of at most about `max_bytes` each (an op larger than that
/// alone).
fn split_ops(partition: Partition, ops: Vec<ReplicaOp>, max_bytes: usize) -> Vec<ApplyBatch> {
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.size();
        if !current.is_empty() && bytes + size > max_bytes {
            batches.push(ApplyBatch::fresh(partition, std::mem::take(&mut current)));
            bytes = 0;
        }
        bytes += size;
        current.push(op);
    }
    if !current.is_empty() || batches.is_empty() {
        batches.push(ApplyBatch::fresh(partition, current));
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_shares_split_under_the_byte_bound() {
        let op = |n: usize| ReplicaOp::put(1, vec![0; 8], vec![0; n], 1);
        let sizes = |batches: &[ApplyBatch]| -> Vec<usize> {
            batches.iter().map(|b| b.ops.len()).collect()
        };
        let ops: Vec<ReplicaOp> = (0..10).map(|_| op(100_000)).collect();
        let one = op(100_000).size();
        let batches = split_ops(Partition(3), ops, 3 * one);
        assert_eq!(sizes(&batches), [3, 3, 3, 1]);
        assert!(batches.iter().all(|b| b.partition == 3));
        // An op over the bound goes alone; nothing is ever dropped.
        let batches = split_ops(Partition(0), vec![op(10), op(500), op(10)], 100);
        assert_eq!(sizes(&batches), [1, 1, 1]);
        assert_eq!(sizes(&split_ops(Partition(0), Vec::new(), 100)), [0]);
    }
}
