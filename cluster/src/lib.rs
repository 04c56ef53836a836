//! Everything node-to-node: the cluster directory (CA, node certificates, secret), the
//! mutual-TLS QUIC peer transport, gossip membership, and partition placement (which
//! partition a key lives in and which nodes hold a partition). Quorum replication builds on
//! these.

pub mod certs;
pub mod placement;

pub use certs::{ClusterSecret, NodeTls};
pub use placement::{partition_of, replicas, NodeId, Partition};
