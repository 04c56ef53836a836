//! Ids for new records (messages, users, devices, groups, push jobs) and the versions of
//! replicated writes: readings of the node's hybrid logical clock (`cluster::clock::Hlc`),
//! time-ordered 64-bit values (`[41 bits ms since 2025-01-01][10 bits node][12 bits
//! counter]`) that never decrease on one node, not across a clock step back and not across
//! a restart, and that are pulled forward by every peer timestamp the node sees.
//!
//! A node whose wall clock is off from its peers' by more than the configured bound refuses
//! to issue them ([`ClockSkew`]): the request fails with `unavailable` and says why, rather
//! than storing records whose ids sort wrongly.

use std::sync::Arc;

use client_proto::ids::MessageId;
use cluster::clock::{Hlc, SkewGuard};

pub use cluster::clock::ClockSkew;

/// Issues ids for one node. Cheap to call from many tasks.
pub struct IdGen {
    hlc: Arc<Hlc>,
    guard: Arc<SkewGuard>,
}

impl IdGen {
    /// Ids from `hlc`, refused while `guard` says this node's clock is off.
    pub fn new(hlc: Arc<Hlc>, guard: Arc<SkewGuard>) -> Self {
        IdGen { hlc, guard }
    }

    /// The next id, or why this node may not issue one now.
    pub fn next(&self) -> Result<MessageId, ClockSkew> {
        self.guard.check()?;
        Ok(MessageId(self.hlc.tick()))
    }

    /// `Err` while this node's clock is too far from its peers'.
    pub fn check(&self) -> Result<(), ClockSkew> {
        self.guard.check()
    }

    /// The node's clock.
    pub fn hlc(&self) -> &Arc<Hlc> {
        &self.hlc
    }

    /// The clock-skew guard.
    pub fn guard(&self) -> &Arc<SkewGuard> {
        &self.guard
    }
}

/// The wall clock in Unix milliseconds (shifted in tests by `--clock-offset-file`).
pub fn now_unix_ms() -> u64 {
    cluster::clock::wall_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_a_skewed_node_refuses_to_issue_them() {
        let guard = Arc::new(SkewGuard::new(10_000));
        let ids = IdGen::new(Arc::new(Hlc::unleased(3)), guard.clone());
        let a = ids.next().unwrap();
        let b = ids.next().unwrap();
        assert!(b > a);
        assert_eq!(b.node(), 3);
        // Two peers agree with each other and are 30 s ahead of this node.
        let now = now_unix_ms();
        for port in [1, 2] {
            let peer = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            guard.record(peer, now + 30_000, now);
        }
        let refused = ids.next().unwrap_err();
        assert!(refused.to_string().contains("behind"), "{refused}");
        assert!(ids.check().is_err());
    }
}
