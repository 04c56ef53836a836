//! Quorum replication: every record lives on the `n = min(RF, members)` replicas of its
//! partition ([`crate::placement`]), is written at `W = n/2 + 1` durable acks and read from
//! `R = n - W + 1` replicas, so every read quorum meets every write quorum and an acked
//! write is seen by every later read.
//!
//! The parts, innermost first:
//!
//! - [`record`]: [`Versioned`] values and [`ReplicaOp`]s; one merge rule (highest version,
//!   tombstones for deletes) that makes immutable records a union by key.
//! - [`quorum`]: quorum sizes, the write tally and the read/scan merges. Pure, no I/O.
//! - [`rpc`]: the replica messages and their request kinds (bincode 2).
//! - [`replica`]: how a coordinator reaches replicas: [`LocalReplica`] (this node's store)
//!   and [`ReplicaClient`] (other nodes; [`PeerReplicaClient`] over the QUIC transport).
//! - [`coordinator`]: [`Coordinator`], which fans writes out, gathers read quorums, merges,
//!   repairs and hints; compare-and-swaps run on a partition's primary ([`Cas`]).
//! - [`service`]: [`ReplicaService`], the request handler other nodes' coordinators call.
//! - [`hints`]: hinted handoff for replicas that missed writes.
//! - [`memory`]: in-memory twins of the store and the network, for tests.
//! - [`pull`]: copying partitions from their replicas: a joining node before it counts
//!   ([`topology`] explains the two quorums while it joins), a member catching up.
//!
//! Not here yet: removing a member for good (placement counts dead members, so failures move
//! nothing; a decommission would stream a leaving node's partitions to their next replicas),
//! digests to make anti-entropy cheaper than a full pull, and garbage collection of
//! tombstones.

mod cas;
pub mod coordinator;
pub mod error;
mod fanout;
mod grouped;
pub mod hints;
mod lanes;
#[cfg(test)]
mod lanes_tests;
pub mod memory;
pub mod pull;
pub mod quorum;
pub mod record;
pub mod replica;
pub mod rpc;
pub mod seal;
pub mod service;
pub mod topology;

pub use cas::{Cas, CasOutcome};
pub use coordinator::{Coordinator, CoordinatorConfig, ScanPage, ScanSpec, WriteAck};
pub use error::{CasError, FailureReason, QuorumError, ReplicaFailure};
pub use hints::HintLimits;
pub use pull::{PullMode, PullPlan, PullReport};
pub use quorum::{read_quorum, write_quorum};
pub use record::{ReplicaOp, ScanEntry, TableId, Versioned};
pub use replica::{
    CallError, LocalReplica, PeerCall, PeerReplicaClient, ReplicaClient, RpcReplicaClient,
};
pub use rpc::{
    is_replication_kind, ApplyBatch, ApplyOutcome, ApplyReply, CasReply, CasRequest,
    ConditionalApply, ConditionalOutcome, PullReply, PullRequest, ReadRequest, ScanReply,
    ScanRequest,
};
pub use seal::{SealPolicy, Sealed, Sealer};
pub use service::ReplicaService;
pub use topology::{Quorums, ReplicaNode, Topology};
