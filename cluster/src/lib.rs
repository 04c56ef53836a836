//! Everything node-to-node: the cluster directory (CA, node certificates, secret), the
//! mutual-TLS QUIC peer transport, gossip membership, and partition placement (which
//! partition a key lives in and which nodes hold a partition), quorum replication on top of
//! them ([`replication`]), and a node's lifecycle in the cluster: entering it as the first
//! node, a returning member or a joining one, anti-entropy, and following membership
//! ([`lifecycle`]).

pub mod certs;
pub mod clock;
pub mod lifecycle;
pub mod membership;
pub mod placement;
pub mod replication;
pub mod transport;

pub use certs::{ClusterSecret, NodeTls};
pub use membership::{Lifecycle, Member, Membership, MembershipConfig, NodeAddrs};
pub use placement::{partition_of, replicas, NodeId, Partition};
pub use replication::{
    Coordinator, CoordinatorConfig, LocalReplica, PeerReplicaClient, QuorumError, ReplicaClient,
    ReplicaService, Topology,
};
pub use transport::{PeerConfig, PeerEndpoint, PeerError, Request, Response, RpcHandler};
