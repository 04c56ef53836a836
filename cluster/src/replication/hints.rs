//! Hinted handoff: writes a replica missed, kept (bounded) by the coordinator that sent them
//! and replayed when the replica is live again.
//!
//! Hints live in memory: a coordinator that restarts forgets its hints, and a replica that
//! missed more than the bound loses the oldest ones. Both cases need anti-entropy between
//! replicas to converge (not built yet); [`HintStore::dropped`] counts what was lost.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use super::rpc::ApplyBatch;
use crate::placement::NodeId;

/// Bounds on the hints kept for one replica.
#[derive(Clone, Copy, Debug)]
pub struct HintLimits {
    /// Batches kept per replica; the oldest go first.
    pub max_batches: usize,
    /// Bytes (roughly) kept per replica; the oldest go first.
    pub max_bytes: usize,
}

impl Default for HintLimits {
    fn default() -> Self {
        Self {
            max_batches: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<(ApplyBatch, usize)>,
    bytes: usize,
    dropped: u64,
}

impl Queue {
    fn push_back(&mut self, batch: ApplyBatch, limits: HintLimits) {
        let size = batch_size(&batch);
        self.bytes += size;
        self.batches.push_back((batch, size));
        self.trim(limits);
    }

    fn trim(&mut self, limits: HintLimits) {
        while self.batches.len() > limits.max_batches
            || (self.bytes > limits.max_bytes && self.batches.len() > 1)
        {
            match self.batches.pop_front() {
                Some((_, size)) => {
                    self.bytes -= size;
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }
}

fn batch_size(batch: &ApplyBatch) -> usize {
    batch.ops.iter().map(|op| op.size()).sum::<usize>() + 8
}

/// The hints of one coordinator, per replica.
pub struct HintStore {
    limits: HintLimits,
    queues: Mutex<HashMap<NodeId, Queue>>,
}

impl HintStore {
    /// An empty store with `limits` per replica.
    pub fn new(limits: HintLimits) -> Self {
        Self {
            limits,
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps `batch` for `node`, dropping the oldest hints past the limits.
    pub fn record(&self, node: NodeId, batch: ApplyBatch) {
        let mut queues = self.queues.lock();
        let queue = queues.entry(node).or_default();
        let dropped = queue.dropped;
        queue.push_back(batch, self.limits);
        let newly_dropped = queue.dropped - dropped;
        if newly_dropped > 0 {
            metrics::counter!("cluster_hints_dropped_total").increment(newly_dropped);
        }
        Self::record_backlog(&queues);
    }

    /// `cluster_hints_pending` and `cluster_hints_pending_bytes`: the hinted-handoff backlog
    /// this coordinator holds for replicas that were down, over all of them.
    fn record_backlog(queues: &HashMap<NodeId, Queue>) {
        let (batches, bytes) = queues
            .values()
            .fold((0, 0), |(n, b), q| (n + q.batches.len(), b + q.bytes));
        metrics::gauge!("cluster_hints_pending").set(batches as f64);
        metrics::gauge!("cluster_hints_pending_bytes").set(bytes as f64);
    }

    /// The oldest hint for `node`, removed.
    pub fn take(&self, node: NodeId) -> Option<ApplyBatch> {
        let mut queues = self.queues.lock();
        let queue = queues.get_mut(&node)?;
        let (batch, size) = queue.batches.pop_front()?;
        queue.bytes -= size;
        Self::record_backlog(&queues);
        Some(batch)
    }

    /// Puts back a hint whose replay failed, as the oldest.
    pub fn restore(&self, node: NodeId, batch: ApplyBatch) {
        let mut queues = self.queues.lock();
        let queue = queues.entry(node).or_default();
        let size = batch_size(&batch);
        queue.bytes += size;
        queue.batches.push_front((batch, size));
        queue.trim(self.limits);
        Self::record_backlog(&queues);
    }

    /// Hints waiting for `node`.
    pub fn pending(&self, node: NodeId) -> usize {
        self.queues.lock().get(&node).map_or(0, |q| q.batches.len())
    }

    /// Hints for `node` dropped because of the limits (it needs anti-entropy to catch up).
    pub fn dropped(&self, node: NodeId) -> u64 {
        self.queues.lock().get(&node).map_or(0, |q| q.dropped)
    }

    /// Drops every hint for `node` (it left placement for good); how many there were.
    pub fn forget(&self, node: NodeId) -> usize {
        let mut queues = self.queues.lock();
        let n = queues.remove(&node).map_or(0, |q| q.batches.len());
        Self::record_backlog(&queues);
        n
    }

    /// Nodes with hints waiting.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.queues
            .lock()
            .iter()
            .filter(|(_, q)| !q.batches.is_empty())
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Partition;
    use crate::replication::record::ReplicaOp;

    fn batch(i: u8) -> ApplyBatch {
        ApplyBatch::new(
            Partition(0),
            vec![ReplicaOp::put(1, vec![i], vec![0; 100], 1)],
        )
    }

    #[test]
    fn hints_are_bounded_and_replayed_oldest_first() {
        let store = HintStore::new(HintLimits {
            max_batches: 3,
            max_bytes: 1 << 20,
        });
        for i in 0..5 {
            store.record(7, batch(i));
        }
        assert_eq!(store.pending(7), 3);
        assert_eq!(store.dropped(7), 2);
        let first = store.take(7).unwrap();
        assert_eq!(first.ops[0].key, vec![2]);
        store.restore(7, first);
        assert_eq!(store.take(7).unwrap().ops[0].key, vec![2]);
        assert_eq!(store.nodes(), vec![7]);
        assert_eq!(store.forget(7), 2);
        assert_eq!(store.pending(7), 0);
        assert!(store.nodes().is_empty());

        let small = HintStore::new(HintLimits {
            max_batches: 100,
            max_bytes: 250,
        });
        for i in 0..4 {
            small.record(1, batch(i));
        }
        assert_eq!(small.pending(1), 2);
    }
}
