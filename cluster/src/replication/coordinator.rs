//! The coordinator: runs one client-facing read or write against a partition's replicas.
//!
//! - **Write**: sent to every replica of the partition at once (this node's own replica
//!   through [`LocalReplica`], no network hop); returns at `W = n/2 + 1` durable acks. The
//!   sends go on in the background after that, and a replica that is down or fails gets a
//!   hint ([`super::hints`]).
//! - **Read**: asks `R = n - W + 1` replicas (this node first), asking the next one whenever
//!   one fails, and merges: the newest copy of a key, a union by key for scans. Replicas that
//!   answered with older copies are repaired in the background (read repair).
//! - **Compare-and-swap**: runs on the partition's primary (see [`Coordinator::compare_and_swap`]).

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::error::bounded;
use super::error::{FailureReason, QuorumError, ReplicaFailure};
use super::hints::{HintLimits, HintStore};
use super::quorum::{merge_reads, merge_scans, scan_repairs, stale_replicas};
use super::record::{ReplicaOp, ScanEntry, TableId, Versioned};
use super::replica::{LocalReplica, ReplicaClient};
use super::rpc::{
    ApplyBatch, ApplyOutcome, ConditionalApply, ConditionalOutcome, ReadRequest, ScanReply,
    ScanRequest,
};
use super::topology::{Quorums, ReplicaNode, Topology};
use crate::clock::Hlc;
use crate::placement::{NodeId, Partition};

/// Timers and limits of a [`Coordinator`].
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How long a write waits for its quorum (also each replica's apply in the background).
    pub write_timeout: Duration,
    /// How long a read waits for its quorum; each replica gets half of it before the next
    /// candidate is asked in its place.
    pub read_timeout: Duration,
    /// Bytes a replica puts in one scan answer (keep well under the transport's frame limit).
    pub scan_max_bytes: u32,
    /// Repair replicas that answered a read with older copies.
    pub read_repair: bool,
    /// Bounds on the hints kept per replica.
    pub hints: HintLimits,
    /// Bytes of ops one apply request carries at most (a multi-partition write to a node is
    /// split above it; keep it well under the transport's frame limit). A single op larger
    /// than this still goes alone.
    pub max_apply_bytes: usize,
    /// This node's clock: it stamps fresh writes and is pulled forward by replicas'
    /// readings. `None`: a clock of the coordinator's own (tests).
    pub clock: Option<Arc<Hlc>>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            write_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(2),
            scan_max_bytes: 1 << 20,
            read_repair: true,
            hints: HintLimits::default(),
            max_apply_bytes: 1 << 20,
            clock: None,
        }
    }
}

/// A write that reached its quorum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteAck {
    /// The replicas whose durable acks made the quorum.
    pub acked: Vec<NodeId>,
}

/// What to scan: `table` keys in `start..=end` of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanSpec {
    /// The table.
    pub table: TableId,
    /// Lowest key, inclusive.
    pub start: Vec<u8>,
    /// Highest key, inclusive.
    pub end: Vec<u8>,
    /// Continue strictly after this key (in scan direction): the last key of a previous page.
    pub after: Option<Vec<u8>>,
    /// Highest key first.
    pub descending: bool,
    /// Live records to return at most.
    pub limit: usize,
}

/// The answer of [`Coordinator::scan_sealed`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The live records, in scan order.
    pub entries: Vec<ScanEntry>,
    /// The smallest seal among every replica answer the page was read from; `None` when any
    /// of them reported none (the table is not sealed).
    pub seal: Option<u64>,
}

impl ScanPage {
    fn new(entries: Vec<ScanEntry>, seal: Seal) -> Self {
        ScanPage {
            entries,
            seal: seal.min(),
        }
    }
}

/// The running minimum of the seals of a scan's answers.
#[derive(Default)]
struct Seal {
    min: Option<u64>,
    unsealed: bool,
}

impl Seal {
    fn add(&mut self, seal: Option<u64>) {
        match seal {
            Some(s) => self.min = Some(self.min.map_or(s, |m| m.min(s))),
            None => self.unsealed = true,
        }
    }

    fn min(&self) -> Option<u64> {
        if self.unsealed {
            None
        } else {
            self.min
        }
    }
}

/// Runs reads, writes and compare-and-swaps against replica quorums. Cheap to clone; all
/// clones share one set of background tasks, stopped by [`Coordinator::shutdown`].
pub struct Coordinator<L: LocalReplica, C: ReplicaClient> {
    pub(super) inner: Arc<Inner<L, C>>,
}

impl<L: LocalReplica, C: ReplicaClient> Clone for Coordinator<L, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Stripes of the primary's per-key compare-and-swap lock.
pub(super) const CAS_STRIPES: usize = 256;

/// The state all clones of a [`Coordinator`] share (and its background tasks hold).
pub(crate) struct Inner<L, C> {
    pub(super) self_id: NodeId,
    pub(super) local: Arc<L>,
    pub(super) client: C,
    pub(super) config: CoordinatorConfig,
    pub(super) clock: Arc<Hlc>,
    topology: RwLock<Arc<Topology>>,
    pub(super) hints: HintStore,
    pub(super) cas_locks: Vec<tokio::sync::Mutex<()>>,
    replaying: Mutex<HashSet<NodeId>>,
    pub(super) tasks: TaskTracker,
    pub(super) cancel: CancellationToken,
}

impl<L: LocalReplica, C: ReplicaClient> Coordinator<L, C> {
    /// A coordinator for the node `topology.self_id()`, whose own replica is `local`, reaching
    /// the others through `client`. Must be used inside a Tokio runtime.
    pub fn new(local: Arc<L>, client: C, topology: Topology, config: CoordinatorConfig) -> Self {
        let clock = config
            .clock
            .clone()
            .unwrap_or_else(|| Arc::new(Hlc::unleased(topology.self_id())));
        Self {
            inner: Arc::new(Inner {
                self_id: topology.self_id(),
                local,
                client,
                clock,
                hints: HintStore::new(config.hints),
                config,
                topology: RwLock::new(Arc::new(topology)),
                cas_locks: (0..CAS_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                replaying: Mutex::new(HashSet::new()),
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// The topology operations use now.
    pub fn topology(&self) -> Arc<Topology> {
        self.inner.topology()
    }

    /// Replaces the topology (after a membership change) and returns the one it replaced.
    /// Replicas that are live again and have hints waiting get them replayed in the
    /// background; the hints of a node whose removal is done are dropped.
    pub fn set_topology(&self, topology: Topology) -> Arc<Topology> {
        // Hints for a node no view holds any more (its removal is done) would never be
        // replayed.
        for id in self.inner.hints.nodes() {
            let done = topology.removals().state(id) == Some(crate::membership::RemovalState::Done);
            if topology.node(id).is_none() && done {
                let dropped = self.inner.hints.forget(id);
                debug!(node = id, dropped, "dropped the hints of a removed node");
            }
        }
        let revived: Vec<NodeId> = self
            .inner
            .hints
            .nodes()
            .into_iter()
            .filter(|id| topology.node(*id).is_some_and(|n| n.live))
            .collect();
        let old = std::mem::replace(&mut *self.inner.topology.write(), Arc::new(topology));
        for id in revived {
            if !self.inner.replaying.lock().insert(id) {
                continue;
            }
            let inner = self.inner.clone();
            self.inner.tasks.spawn(async move {
                tokio::select! {
                    result = inner.replay(id) => match result {
                        Ok(sent) => debug!(node = id, sent, "replayed hints"),
                        Err(failure) => debug!(%failure, "hint replay stopped"),
                    },
                    _ = inner.cancel.cancelled() => {}
                }
                inner.replaying.lock().remove(&id);
            });
        }
        old
    }

    /// Replaces the topology if it differs from the current one, then waits (at most the
    /// read plus write timeout) until no operation still runs under the old one. Returns
    /// whether it changed. A joining node relies on this: once every member has published
    /// that it sees the node pending, no write that bypasses the node is still in flight.
    pub async fn set_topology_drained(&self, topology: Topology) -> bool {
        if *self.topology() == topology {
            return false;
        }
        let old = Arc::downgrade(&self.set_topology(topology));
        let deadline = tokio::time::Instant::now()
            + self.inner.config.read_timeout
            + self.inner.config.write_timeout;
        while old.strong_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Writes `ops` (all in `partition`) to its replicas; returns once `W` of them have made
    /// them durable, or [`QuorumError::Unavailable`] naming every replica that failed.
    pub async fn write(
        &self,
        partition: Partition,
        ops: Vec<ReplicaOp>,
    ) -> Result<WriteAck, QuorumError> {
        let (_view, target) = self.inner.quorums(partition)?;
        let batch = ApplyBatch::fresh(partition, ops);
        let tally = self
            .inner
            .replicate(target, move |inner, node| {
                let batch = batch.clone();
                async move { inner.apply_job(node, batch).await }
            })
            .await?;
        Ok(WriteAck {
            acked: tally.acked(),
        })
    }

    /// Writes several partitions' ops at once, with one apply per replica node (not per
    /// partition); succeeds when every partition reached its quorum (the first partition that
    /// cannot is reported; the applies go on regardless).
    pub async fn write_all(
        &self,
        batches: Vec<(Partition, Vec<ReplicaOp>)>,
    ) -> Result<(), QuorumError> {
        self.inner.replicate_grouped(batches).await
    }

    /// The newest copy of one key a read quorum has (tombstones included: a deleted key
    /// reads as `Some` with no value; `None` when no replica has it).
    pub async fn get(
        &self,
        partition: Partition,
        table: TableId,
        key: &[u8],
    ) -> Result<Option<Versioned>, QuorumError> {
        let inner = &self.inner;
        let (_view, set) = inner.quorums(partition)?;
        let request = ReadRequest {
            partition: partition.0,
            table,
            key: key.to_vec(),
        };
        let answers = inner
            .read_quorum_of(&set, |node| inner.read_on(node, request.clone()))
            .await?;
        let merged = merge_reads(&answers);
        if let (true, Some(newest)) = (inner.config.read_repair, &merged) {
            for stale in stale_replicas(&answers, Some(newest)) {
                let op = ReplicaOp::from_record(table, key.to_vec(), newest.clone());
                inner.repair(&set.nodes, stale, ApplyBatch::new(partition, vec![op]));
            }
        }
        Ok(merged)
    }

    /// The live records of a range of one partition, merged from read quorums (union by key,
    /// newest copy wins, deleted keys left out), in scan order, at most `spec.limit`. Page
    /// on by passing the last key returned as `after`.
    pub async fn scan(
        &self,
        partition: Partition,
        spec: ScanSpec,
    ) -> Result<Vec<ScanEntry>, QuorumError> {
        Ok(self.scan_sealed(partition, spec).await?.entries)
    }

    /// [`Coordinator::scan`], with the smallest seal among the replicas that answered (for a
    /// sealed table, see [`super::seal`]): every write acknowledged at a position at or below
    /// it is among the entries (or beyond the last one returned, when the limit cut the
    /// page short).
    pub async fn scan_sealed(
        &self,
        partition: Partition,
        spec: ScanSpec,
    ) -> Result<ScanPage, QuorumError> {
        let inner = &self.inner;
        let (_view, set) = inner.quorums(partition)?;
        let limit = spec.limit.max(1);
        let mut out = Vec::new();
        let mut seal = Seal::default();
        let mut after = spec.after;
        loop {
            let request = ScanRequest {
                partition: partition.0,
                table: spec.table,
                start: spec.start.clone(),
                end: spec.end.clone(),
                after: after.take(),
                descending: spec.descending,
                limit: u32::try_from(limit - out.len()).unwrap_or(u32::MAX),
                max_bytes: inner.config.scan_max_bytes,
            };
            if request.key_bounds().is_none() {
                return Ok(ScanPage::new(out, seal));
            }
            let answers = inner
                .read_quorum_of(&set, |node| inner.scan_on(node, request.clone()))
                .await?;
            for (_, answer) in &answers {
                seal.add(answer.seal);
            }
            let merged = merge_scans(&answers, spec.descending);
            if inner.config.read_repair {
                for (node, entries) in scan_repairs(&answers, &merged) {
                    let ops = entries
                        .into_iter()
                        .map(|e| ReplicaOp::from_record(spec.table, e.key, e.record))
                        .collect();
                    inner.repair(&set.nodes, node, ApplyBatch::new(partition, ops));
                }
            }
            for entry in merged.entries {
                if !entry.record.is_tombstone() {
                    out.push(entry);
                    if out.len() >= limit {
                        return Ok(ScanPage::new(out, seal));
                    }
                }
            }
            match merged.frontier {
                Some(frontier) => after = Some(frontier),
                None => return Ok(ScanPage::new(out, seal)),
            }
        }
    }

    /// Sends `node` its hints now (they are also replayed in the background when
    /// [`Coordinator::set_topology`] sees it live again). Returns how many batches went.
    pub async fn replay_hints(&self, node: NodeId) -> Result<usize, ReplicaFailure> {
        self.inner.replay(node).await
    }

    /// Hint batches waiting for `node`.
    pub fn hints_pending(&self, node: NodeId) -> usize {
        self.inner.hints.pending(node)
    }

    /// Hint batches for `node` dropped at the limits (it needs anti-entropy to catch up).
    pub fn hints_dropped(&self, node: NodeId) -> u64 {
        self.inner.hints.dropped(node)
    }

    /// Waits until the background work started so far (writes past their quorum, read
    /// repairs, hint replays) has finished. For tests and orderly shutdown.
    pub async fn settle(&self) {
        let tasks = &self.inner.tasks;
        tasks.close();
        tasks.wait().await;
        if !self.inner.cancel.is_cancelled() {
            tasks.reopen();
        }
    }

    /// Stops the background work and waits for it. Hints still waiting are lost.
    pub async fn shutdown(self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    pub(crate) fn downgrade(&self) -> Weak<Inner<L, C>> {
        Arc::downgrade(&self.inner)
    }
}

impl<L: LocalReplica, C: ReplicaClient> Inner<L, C> {
    pub(super) fn topology(&self) -> Arc<Topology> {
        self.topology.read().clone()
    }

    /// The view an operation runs under and the replicas it must reach. The operation keeps
    /// the view (`Arc`) until it has its quorum, so [`Coordinator::set_topology_drained`]
    /// can wait for the operations of an older view to end.
    pub(super) fn quorums(
        &self,
        partition: Partition,
    ) -> Result<(Arc<Topology>, Quorums), QuorumError> {
        let view = self.topology();
        let target = quorums_in(&view, partition)?;
        Ok((view, target))
    }

    /// How long one replica may take to answer a read: half the read timeout, so a replica
    /// that hangs (while membership still says it is live) leaves time to ask the next one.
    fn replica_read_timeout(&self) -> Duration {
        self.config.read_timeout / 2
    }

    pub(super) fn is_self(&self, node: &ReplicaNode) -> bool {
        node.id == self.self_id
    }

    /// Sends `batch` to `node` (the local store when it is this node); a remote replica that
    /// fails gets it as a hint. A fresh write refused as sealed gets no hint (it is retried
    /// at a new position by its caller), and the replica's clock reading pulls ours forward.
    pub(super) async fn apply_job(
        &self,
        node: ReplicaNode,
        mut batch: ApplyBatch,
    ) -> Result<(), FailureReason> {
        batch.hlc = self.clock.peek();
        let result = if self.is_self(&node) {
            bounded(self.config.write_timeout, self.local.apply(batch.clone())).await
        } else if !node.live {
            Err(FailureReason::NotLive)
        } else {
            bounded(
                self.config.write_timeout,
                self.client.apply(&node, batch.clone()),
            )
            .await
            .map(|reply| {
                self.clock.observe(reply.hlc);
                reply.outcome
            })
        };
        match result {
            Ok(ApplyOutcome::Applied) => Ok(()),
            Ok(ApplyOutcome::Sealed { seal }) => {
                metrics::counter!("replication_sealed_refusals_total").increment(1);
                Err(FailureReason::Sealed { seal })
            }
            Err(reason) => {
                if !self.is_self(&node) {
                    // A hint copies what the write placed elsewhere: never refused as sealed.
                    batch.fresh = false;
                    self.hints.record(node.id, batch);
                }
                Err(reason)
            }
        }
    }

    /// A conditional apply on `node`; a transport failure leaves a (plain) hint.
    pub(super) async fn apply_if_job(
        &self,
        node: ReplicaNode,
        request: ConditionalApply,
    ) -> Result<(), FailureReason> {
        let result = if self.is_self(&node) {
            bounded(
                self.config.write_timeout,
                self.local.apply_if(request.clone()),
            )
            .await
        } else if !node.live {
            Err(FailureReason::NotLive)
        } else {
            bounded(
                self.config.write_timeout,
                self.client.apply_if(&node, request.clone()),
            )
            .await
        };
        match result {
            Ok(ConditionalOutcome::Applied) => Ok(()),
            Ok(ConditionalOutcome::Stale { .. }) => Err(FailureReason::Stale),
            Err(reason) => {
                if !self.is_self(&node) {
                    let batch = ApplyBatch {
                        fresh: false,
                        hlc: 0,
                        partition: request.partition,
                        ops: vec![request.op],
                    };
                    self.hints.record(node.id, batch);
                }
                Err(reason)
            }
        }
    }

    pub(super) async fn read_on(
        &self,
        node: ReplicaNode,
        request: ReadRequest,
    ) -> Result<Option<Versioned>, FailureReason> {
        if self.is_self(&node) {
            bounded(self.replica_read_timeout(), self.local.read(request)).await
        } else {
            bounded(
                self.replica_read_timeout(),
                self.client.read(&node, request),
            )
            .await
        }
    }

    pub(super) async fn scan_on(
        &self,
        node: ReplicaNode,
        request: ScanRequest,
    ) -> Result<ScanReply, FailureReason> {
        if self.is_self(&node) {
            bounded(self.replica_read_timeout(), self.local.scan(request)).await
        } else {
            bounded(
                self.replica_read_timeout(),
                self.client.scan(&node, request),
            )
            .await
        }
    }

    /// Sends `batch` to `node` in the background, best effort (read repair).
    fn repair(self: &Arc<Self>, set: &[ReplicaNode], node: NodeId, batch: ApplyBatch) {
        let Some(target) = set.iter().find(|n| n.id == node).cloned() else {
            return;
        };
        let inner = self.clone();
        self.tasks.spawn(async move {
            let result = tokio::select! {
                result = inner.repair_on(target, batch) => result,
                _ = inner.cancel.cancelled() => Ok(()),
            };
            if let Err(reason) = result {
                debug!(node, %reason, "read repair failed");
            }
        });
    }

    async fn repair_on(&self, node: ReplicaNode, batch: ApplyBatch) -> Result<(), FailureReason> {
        if self.is_self(&node) {
            bounded(self.config.write_timeout, self.local.apply(batch))
                .await
                .map(drop)
        } else {
            bounded(self.config.write_timeout, self.client.apply(&node, batch))
                .await
                .map(|reply| {
                    self.clock.observe(reply.hlc);
                })
        }
    }

    /// Sends `id` its hints, oldest first, until they are gone or one fails (it is kept).
    async fn replay(&self, id: NodeId) -> Result<usize, ReplicaFailure> {
        let node = self.topology().node(id).cloned();
        let Some(node) = node.filter(|n| n.live && !self.is_self(n)) else {
            return Err(ReplicaFailure {
                node: id,
                reason: FailureReason::NotLive,
            });
        };
        let mut sent = 0;
        while let Some(batch) = self.hints.take(id) {
            let result = bounded(
                self.config.write_timeout,
                self.client.apply(&node, batch.clone()),
            )
            .await;
            if let Err(reason) = result.map(|reply| self.clock.observe(reply.hlc)) {
                self.hints.restore(id, batch);
                return Err(ReplicaFailure { node: id, reason });
            }
            sent += 1;
        }
        Ok(sent)
    }
}

/// What an operation on `partition` must reach in `view`; an error when a set is empty.
pub(super) fn quorums_in(view: &Topology, partition: Partition) -> Result<Quorums, QuorumError> {
    let target = view.quorums(partition);
    if target.nodes.is_empty() || target.sets.iter().any(Vec::is_empty) {
        return Err(QuorumError::NoReplicas(partition.0));
    }
    Ok(target)
}
