//! Compare-and-swap (username claims and other read-modify-writes): routed to the
//! partition's primary, which serialises the swaps of a key, checks against a read quorum and
//! writes the winner at `W` with replica-side version checks.

use std::sync::Arc;

use tokio::time::timeout;
use xxhash_rust::xxh3::xxh3_64;

use super::coordinator::{Coordinator, Inner, CAS_STRIPES};
use super::error::{CasError, FailureReason, QuorumError};
use super::quorum::merge_reads;
use super::record::{ReplicaOp, TableId, Versioned};
use super::replica::{LocalReplica, ReplicaClient};
use super::rpc::{CasReply, CasRequest, ConditionalApply, ReadRequest};
use crate::placement::Partition;

/// A compare-and-swap of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cas {
    /// The table.
    pub table: TableId,
    /// The key.
    pub key: Vec<u8>,
    /// The value the key must hold for the swap (`None`: absent or deleted).
    pub expected: Option<Vec<u8>>,
    /// The value to store (`None`: delete).
    pub new: Option<Vec<u8>>,
    /// The lowest version to write at (the caller's clock); the primary uses at least one
    /// more than the version it read.
    pub min_version: u64,
}

/// The definite answer of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key held the expected value; the new one is stored at a write quorum.
    Swapped {
        /// The version it was stored at.
        version: u64,
    },
    /// The key held something else (`current`, tombstones included); nothing was written.
    Mismatch {
        /// The newest copy a read quorum had.
        current: Option<Versioned>,
    },
}

impl<L: LocalReplica, C: ReplicaClient> Coordinator<L, C> {
    /// Sets a key to `cas.new` if it holds `cas.expected`, through the partition's primary
    /// (its first live replica in rendezvous order), which serialises the compare-and-swaps
    /// of a key, checks against a read quorum and writes the winner at `W` with a version
    /// above the one it read.
    ///
    /// **Guarantee.** While every node agrees on the primary, the swaps of a key are
    /// linearizable: of two racing claims of a free username, exactly one gets
    /// [`CasOutcome::Swapped`]. When views differ for a moment (a membership change, a
    /// primary declared dead while still running), two primaries may run at once; the
    /// replicas then accept only writes made from the newest version they hold, so at most
    /// one of the racing swaps reaches `W` and the other fails with [`CasError::Conflict`]
    /// or [`CasError::Unavailable`]. Those failures are indeterminate: the losing value may
    /// stay on a minority of replicas and could win a later merge if it carries the higher
    /// version, so callers re-read before retrying. Plain [`Coordinator::write`]s to the same
    /// key bypass all this (last writer wins): keep CAS keys CAS-only.
    pub async fn compare_and_swap(
        &self,
        partition: Partition,
        cas: Cas,
    ) -> Result<CasOutcome, CasError> {
        let inner = &self.inner;
        let topology = inner.topology();
        let primary = topology
            .primary(partition)
            .ok_or(CasError::NoPrimary(partition.0))?;
        let request = CasRequest {
            partition: partition.0,
            table: cas.table,
            key: cas.key,
            expected: cas.expected,
            new: cas.new,
            min_version: cas.min_version,
        };
        let (mut asked, mut reply) = (
            primary.clone(),
            self.cas_at(&primary, request.clone()).await?,
        );
        // Views differ for a moment while membership changes (a node joins, leaves, or
        // restarts): the node this view names may name another. Follow that once; the
        // replicas' version checks keep two primaries from both winning (see above).
        if let CasReply::NotPrimary {
            primary: Some(named),
        } = reply
        {
            if named != asked.id {
                if let Some(next) = topology.node(named).filter(|n| n.live).cloned() {
                    metrics::counter!("cluster_cas_redirects_total").increment(1);
                    reply = self.cas_at(&next, request).await?;
                    asked = next;
                }
            }
        }
        let primary = asked;
        match reply {
            CasReply::Swapped { version } => Ok(CasOutcome::Swapped { version }),
            CasReply::Mismatch { current } => Ok(CasOutcome::Mismatch { current }),
            CasReply::NotPrimary { primary: named } => Err(CasError::NotPrimary {
                asked: primary.id,
                named,
            }),
            CasReply::Conflict => Err(CasError::Conflict),
            CasReply::Unavailable { acked, needed } => Err(CasError::Unavailable {
                acked: acked as usize,
                needed: needed as usize,
            }),
        }
    }
}

impl<L: LocalReplica, C: ReplicaClient> Coordinator<L, C> {
    /// Sends `request` to `primary` (runs it here when that is this node).
    async fn cas_at(
        &self,
        primary: &super::topology::ReplicaNode,
        request: CasRequest,
    ) -> Result<CasReply, CasError> {
        let inner = &self.inner;
        if primary.id == inner.self_id {
            return Ok(inner.cas_as_primary(request).await);
        }
        let limit = inner.config.read_timeout + inner.config.write_timeout;
        match timeout(limit, inner.client.cas(primary, request)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => Err(CasError::Forward {
                primary: primary.id,
                reason: FailureReason::failed(error),
            }),
            Err(_) => Err(CasError::Forward {
                primary: primary.id,
                reason: FailureReason::TimedOut,
            }),
        }
    }
}

impl<L: LocalReplica, C: ReplicaClient> Inner<L, C> {
    fn cas_lock(&self, table: TableId, key: &[u8]) -> &tokio::sync::Mutex<()> {
        let mut buf = Vec::with_capacity(key.len() + 1);
        buf.push(table);
        buf.extend_from_slice(key);
        &self.cas_locks[(xxh3_64(&buf) % CAS_STRIPES as u64) as usize]
    }

    /// Runs a compare-and-swap as the partition's primary (see
    /// [`Coordinator::compare_and_swap`]).
    pub(crate) async fn cas_as_primary(self: &Arc<Self>, request: CasRequest) -> CasReply {
        let partition = Partition(request.partition);
        let topology = self.topology();
        match topology.primary(partition) {
            Some(primary) if primary.id == self.self_id => {}
            other => {
                return CasReply::NotPrimary {
                    primary: other.map(|p| p.id),
                }
            }
        }
        let _serialised = self.cas_lock(request.table, &request.key).lock().await;
        let target = topology.quorums(partition);
        let read = ReadRequest {
            partition: request.partition,
            table: request.table,
            key: request.key.clone(),
        };
        let answers = match self
            .read_quorum_of(&target, |node| self.read_on(node, read.clone()))
            .await
        {
            Ok(answers) => answers,
            Err(error) => return unavailable_reply(&error),
        };
        let current = merge_reads(&answers);
        if current.as_ref().and_then(|v| v.value.as_deref()) != request.expected.as_deref() {
            return CasReply::Mismatch { current };
        }
        let observed = current.as_ref().map_or(0, |v| v.version);
        let version = request.min_version.max(observed.saturating_add(1));
        let conditional = ConditionalApply {
            partition: request.partition,
            op: ReplicaOp {
                table: request.table,
                key: request.key,
                value: request.new,
                version,
            },
            if_version_at_most: observed,
        };
        let result = self
            .replicate(target, move |inner, node| {
                let conditional = conditional.clone();
                async move { inner.apply_if_job(node, conditional).await }
            })
            .await;
        match result {
            Ok(_) => CasReply::Swapped { version },
            Err(QuorumError::Unavailable { failed, .. })
                if failed
                    .iter()
                    .any(|f| matches!(f.reason, FailureReason::Stale)) =>
            {
                CasReply::Conflict
            }
            Err(error) => unavailable_reply(&error),
        }
    }
}

fn unavailable_reply(error: &QuorumError) -> CasReply {
    match error {
        QuorumError::Unavailable { acked, needed, .. } => CasReply::Unavailable {
            acked: *acked as u32,
            needed: *needed as u32,
        },
        QuorumError::NoReplicas(_) => CasReply::NotPrimary { primary: None },
    }
}
