//! Everything node-to-node. Today: partition placement (which partition a key lives in and
//! which nodes hold a partition). Membership, the QUIC peer transport and quorum replication
//! build on these functions.

pub mod placement;

pub use placement::{partition_of, replicas, NodeId, Partition};
