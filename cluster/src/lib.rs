//! Everything node-to-node: the cluster directory (CA, node certificates, secret), the
//! mutual-TLS QUIC peer transport, gossip membership, and partition placement (which
//! partition a key lives in and which nodes hold a partition), quorum replication on top of
//! them ([`replication`]), and a node's lifecycle in the cluster: entering it as the first
//! node, a returning member or a joining one, anti-entropy, and following membership
//! ([`lifecycle`]).
//!
//! # Layout
//!
//! Each module depends only on the ones above it in this list:
//!
//! - [`clock`]: time across nodes: the wall clock, each node's hybrid logical clock, the
//!   clock-skew guard.
//! - [`certs`]: the cluster dir (CA, node certificates, secret).
//! - [`placement`]: key to partition, partition to replicas (rendezvous hashing).
//! - [`transport`]: the mutual-TLS QUIC request/response transport between nodes.
//! - [`membership`]: gossip (chitchat, sealed with the cluster secret): members, their
//!   state and load, joins and moves; an in-memory twin for tests.
//! - [`replication`]: records and their merge, quorums, the coordinator, the replica
//!   service, hints, seals, pulls; in-memory replica and network twins for tests.
//! - [`lifecycle`]: how a node enters the cluster and keeps its place (join barrier and
//!   pull, anti-entropy, following membership).
//! - [`directory`]: which nodes hold each user's devices, kept by the user's home
//!   replicas and pushed to the nodes that watch or route to the user.

pub mod certs;
pub mod clock;
pub mod directory;
pub mod lifecycle;
pub mod membership;
pub mod placement;
pub mod replication;
pub mod transport;

#[cfg(test)]
mod fuzz_tests;

pub use certs::{ClusterSecret, NodeTls};
pub use membership::{Lifecycle, Member, Membership, MembershipConfig, NodeAddrs};
pub use placement::{partition_of, replicas, NodeId, Partition};
pub use replication::{
    Coordinator, CoordinatorConfig, LocalReplica, PeerReplicaClient, QuorumError, ReplicaClient,
    ReplicaService, Topology,
};
pub use transport::{PeerConfig, PeerEndpoint, PeerError, Request, Response, RpcHandler};
