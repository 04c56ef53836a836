//! Pulling partitions: how a node that joins gets the data of the partitions it will hold
//! before it serves them, and how a node that restarts (or runs anti-entropy) catches up on
//! writes it missed.
//!
//! A pull asks the *current* replicas of each partition for every record of it (tombstones
//! too) and applies them locally, newest copy winning, so pulling twice or from several
//! replicas is harmless. A partition is complete when enough of its replicas answered in
//! full that, with `W + R > n`, every acked write is among the answers: a read quorum of the
//! set for a joining node, one replica fewer for a member (its own copy is the last one).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::coordinator::Coordinator;
use super::error::bounded;
use super::error::FailureReason;
use super::quorum::read_quorum;
use super::record::{ReplicaOp, TableId};
use super::replica::{LocalReplica, ReplicaClient};
use super::rpc::{ApplyBatch, PullRequest};
use super::topology::ReplicaNode;
use crate::placement::{NodeId, Partition};

/// Why this node pulls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullMode {
    /// It is joining: it holds none of the partitions yet and needs a read quorum of each.
    Join,
    /// It is a replica already and catches up (after a restart, or anti-entropy).
    CatchUp,
}

/// What a pull needs to know about the data.
#[derive(Clone, Debug)]
pub struct PullPlan {
    /// The replicated tables to copy.
    pub tables: Vec<TableId>,
    /// The cluster's partition count.
    pub partition_count: u32,
    /// Keys a source looks at per request.
    pub max_keys: u32,
    /// Bytes a source returns per request, about.
    pub max_bytes: u32,
    /// How long one request may take.
    pub page_timeout: Duration,
    /// Only records written (versioned) after this clock reading; `None`: every record.
    pub since: Option<u64>,
}

impl PullPlan {
    /// A plan for `tables` of a cluster of `partition_count` partitions, with default page
    /// sizes.
    pub fn new(tables: Vec<TableId>, partition_count: u32) -> Self {
        Self {
            tables,
            partition_count,
            max_keys: 20_000,
            max_bytes: 1 << 20,
            page_timeout: Duration::from_secs(10),
            since: None,
        }
    }

    /// This plan, copying only records versioned after `since` (`None`: every record).
    pub fn since(&self, since: Option<u64>) -> Self {
        Self {
            since,
            ..self.clone()
        }
    }
}

/// What a pull did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullReport {
    /// Partitions asked for.
    pub partitions: usize,
    /// Replicas that answered in full.
    pub sources_done: usize,
    /// Replicas that failed part-way (their partitions may still be complete through others).
    pub sources_failed: usize,
    /// Records received and applied (a record newer locally is kept, but counted).
    pub records: u64,
    /// Partitions that did not get enough complete answers: pull them again.
    pub incomplete: Vec<Partition>,
}

impl<L: LocalReplica, C: ReplicaClient> Coordinator<L, C> {
    /// Copies every record of `plan.tables` in `partitions` from their current replicas into
    /// this node's store (see the module docs), one source at a time, and reports which
    /// partitions got enough complete answers. Progress goes to the log once per source.
    pub async fn pull(
        &self,
        partitions: &[Partition],
        plan: &PullPlan,
        mode: PullMode,
    ) -> PullReport {
        let inner = &self.inner;
        // Not held during the pull: a long pull must not hold up `set_topology_drained`.
        let view = self.topology();
        let mut needed: BTreeMap<Partition, usize> = BTreeMap::new();
        let mut sources: BTreeMap<NodeId, (ReplicaNode, Vec<u32>)> = BTreeMap::new();
        for &p in partitions {
            let set = view.replica_set(p);
            let need = match mode {
                PullMode::Join => read_quorum(set.len()),
                PullMode::CatchUp => read_quorum(set.len()).saturating_sub(1),
            };
            needed.insert(p, need);
            for node in set {
                if node.id != inner.self_id && node.live {
                    sources
                        .entry(node.id)
                        .or_insert_with(|| (node.clone(), Vec::new()))
                        .1
                        .push(p.0);
                }
            }
        }
        drop(view);
        let mut report = PullReport {
            partitions: partitions.len(),
            ..PullReport::default()
        };
        let mut complete: BTreeMap<Partition, usize> = BTreeMap::new();
        let total = sources.len();
        for (i, (id, (node, mut wanted))) in sources.into_iter().enumerate() {
            wanted.sort_unstable();
            wanted.dedup();
            // Only what still lacks complete answers: with R of n needed, the last sources
            // of a partition are skipped.
            wanted.retain(|p| {
                let p = Partition(*p);
                complete.get(&p).copied().unwrap_or(0) < needed.get(&p).copied().unwrap_or(0)
            });
            if wanted.is_empty() {
                continue;
            }
            let started = Instant::now();
            match self.pull_from(&node, &wanted, plan).await {
                Ok(records) => {
                    report.sources_done += 1;
                    report.records += records;
                    for p in &wanted {
                        *complete.entry(Partition(*p)).or_default() += 1;
                    }
                    info!(
                        source = id,
                        partitions = wanted.len(),
                        records,
                        ms = started.elapsed().as_millis() as u64,
                        "pulled partitions ({}/{total} sources)",
                        i + 1
                    );
                }
                Err(reason) => {
                    report.sources_failed += 1;
                    warn!(source = id, %reason, "pull from a replica failed");
                }
            }
        }
        report.incomplete = needed
            .into_iter()
            .filter(|(p, need)| complete.get(p).copied().unwrap_or(0) < *need)
            .map(|(p, _)| p)
            .collect();
        report
    }

    /// Pulls `partitions` of every table from `node`; the records it applied.
    async fn pull_from(
        &self,
        node: &ReplicaNode,
        partitions: &[u32],
        plan: &PullPlan,
    ) -> Result<u64, FailureReason> {
        let inner = &self.inner;
        let mut records = 0u64;
        for &table in &plan.tables {
            let mut after = None;
            loop {
                let request = PullRequest {
                    table,
                    partition_count: plan.partition_count,
                    partitions: partitions.to_vec(),
                    after,
                    max_keys: plan.max_keys,
                    max_bytes: plan.max_bytes,
                    since: plan.since,
                };
                let reply = tokio::select! {
                    r = bounded(plan.page_timeout, inner.client.pull(node, request)) => r?,
                    _ = inner.cancel.cancelled() => return Err(FailureReason::ShutDown),
                };
                if !reply.entries.is_empty() {
                    records += reply.entries.len() as u64;
                    let ops = reply
                        .entries
                        .into_iter()
                        .map(|e| ReplicaOp::from_record(table, e.key, e.record))
                        .collect();
                    // The batch's partition is informational: stores place by key.
                    let batch = ApplyBatch::new(Partition(partitions[0]), ops);
                    bounded(plan.page_timeout, inner.local.apply(batch)).await?;
                }
                match reply.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(records)
    }
}
