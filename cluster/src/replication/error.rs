//! What a coordinator reports when a quorum or a compare-and-swap fails, and why each
//! replica that did not answer failed.

use std::error::Error;
use std::future::Future;
use std::time::Duration;

use std::fmt;
use std::sync::Arc;
use tokio::time::timeout;

use crate::placement::NodeId;

/// Why one replica did not ack or answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FailureReason {
    /// Membership says it is down; it was not contacted (writes keep a hint for it).
    #[error("not live")]
    NotLive,
    /// No answer within the timeout; it may still apply the write.
    #[error("no answer in time")]
    TimedOut,
    /// It refused a conditional write: it holds a newer copy of the key.
    #[error("holds a newer version")]
    Stale,
    /// It refused a fresh write to a sealed position (the write's position is older than
    /// the replica's seal: the coordinator's clock is behind, or the write was delayed);
    /// retry at a new position.
    #[error("the position is sealed on this replica")]
    Sealed {
        /// The replica's seal.
        seal: u64,
    },
    /// The coordinator is shutting down.
    #[error("coordinator shut down")]
    ShutDown,
    /// The call or the replica's store failed.
    #[error("{0}")]
    Failed(Arc<dyn Error + Send + Sync>),
}

impl FailureReason {
    /// Wraps any error as [`FailureReason::Failed`].
    pub fn failed(error: impl Error + Send + Sync + 'static) -> Self {
        FailureReason::Failed(Arc::new(error))
    }
}

/// One replica that failed, and why.
#[derive(Clone, Debug)]
pub struct ReplicaFailure {
    /// The replica.
    pub node: NodeId,
    /// Why.
    pub reason: FailureReason,
}

impl fmt::Display for ReplicaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.reason)
    }
}

/// The failures, formatted as `node 1: not live; node 2: no answer in time`.
pub struct Failures<'a>(pub &'a [ReplicaFailure]);

impl fmt::Display for Failures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

/// A read or write could not reach its quorum.
#[derive(Clone, Debug, thiserror::Error)]
pub enum QuorumError {
    /// Fewer than `needed` replicas acked (writes) or answered (reads) within the timeout.
    /// A failed write was not acknowledged, but may be applied on the replicas that acked
    /// (and, through hints, later on others): retrying it is safe, since writes are
    /// idempotent by key and version.
    #[error(
        "only {acked} of the {needed} replicas needed answered ({})",
        Failures(failed)
    )]
    Unavailable {
        /// Replicas that acked or answered.
        acked: usize,
        /// The quorum.
        needed: usize,
        /// Every replica that did not, and why.
        failed: Vec<ReplicaFailure>,
    },
    /// The topology has no node to place the partition on.
    #[error("partition {0} has no replicas (no active members)")]
    NoReplicas(u32),
}

impl QuorumError {
    /// Whether some replica refused the write because its position is sealed: a write to a
    /// sealed table that fails so is worth retrying at a new position.
    pub fn any_sealed(&self) -> bool {
        match self {
            QuorumError::Unavailable { failed, .. } => failed
                .iter()
                .any(|f| matches!(f.reason, FailureReason::Sealed { .. })),
            QuorumError::NoReplicas(_) => false,
        }
    }
}

/// A compare-and-swap failed without a definite answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CasError {
    /// The primary could not reach a read or write quorum. The swap may be partly applied
    /// (and may surface later); the caller should re-read before retrying.
    #[error("compare-and-swap: only {acked} of the {needed} replicas needed answered")]
    Unavailable {
        /// Replicas that answered or acked.
        acked: usize,
        /// The quorum.
        needed: usize,
    },
    /// Another write to the key won at some replica while this one was in flight (two
    /// primaries during a membership change, or a plain write to a CAS key). This swap did
    /// not reach a quorum but may be partly applied; re-read before retrying.
    #[error("compare-and-swap lost a race with a concurrent write")]
    Conflict,
    /// No live replica to act as primary.
    #[error("partition {0} has no live replica to act as primary")]
    NoPrimary(u32),
    /// The node asked to act as primary thinks another one is (membership views differ for
    /// a moment); retry after membership settles.
    #[error("node {asked} is not the primary (it names {named:?})")]
    NotPrimary {
        /// The node that was asked.
        asked: NodeId,
        /// The primary it names.
        named: Option<NodeId>,
    },
    /// The request to the primary failed; it may or may not have run.
    #[error("cannot reach primary {primary}: {reason}")]
    Forward {
        /// The primary.
        primary: NodeId,
        /// Why.
        reason: FailureReason,
    },
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
