//! Draining the client connections of a node about to stop ([`crate::node::Node::drain`]):
//! the state the gateways share while it runs.
//!
//! A drain has two phases, each a token the sessions and listeners watch:
//!
//! 1. **started**: new WebSocket upgrades and QUIC connections are refused, `/readyz` says
//!    `draining`, and every session is sent one `draining` frame naming another node to move
//!    to ([`Targets::pick`]). Sessions keep serving (sends are stored and acked) until the
//!    client leaves.
//! 2. **closing** (the drain timeout passed): each remaining session stops reading, lets the
//!    sends it already took finish (ack or error), then closes with 1001 `going away`.
//!
//! How sessions ended is counted here (`moved`: the client left after `draining`; `closed`:
//! closed at the timeout) and in the metric `gateway_drain_sessions_total{outcome}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use client_proto::http::NodeInfo;
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// The transport of a session: the `draining` hint names the same transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Quic,
}

/// What a finished drain reports (logged, and for an admin endpoint to return).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    /// Sessions connected when the drain started.
    pub sessions_at_start: u64,
    /// Sessions whose client left after its `draining` frame.
    pub moved: u64,
    /// Sessions closed (1001) when the drain timeout passed.
    pub closed: u64,
    /// Sessions still running when the drain gave up waiting (the shutdown ends them).
    pub left_over: u64,
    /// Whether the drain timeout passed before every session had left.
    pub timed_out: bool,
    /// The node the hints pointed to, if any (`None`: no other active member).
    pub moved_to: Vec<u16>,
    /// How long the drain took, ms.
    pub elapsed_ms: u64,
}

/// The other active members sessions are sent to, least loaded first. Each pick counts one
/// more device on the node picked, so that one drain spreads its sessions over the others
/// by their published load instead of sending all of them to the one with the lowest.
#[derive(Debug, Default)]
pub struct Targets {
    /// (estimated load, node).
    nodes: Mutex<Vec<(u64, NodeInfo)>>,
}

impl Targets {
    /// `members`: (published load, where its clients connect), this node excluded.
    pub fn new(members: Vec<(u64, NodeInfo)>) -> Self {
        Targets {
            nodes: Mutex::new(members),
        }
    }

    /// Where the next session of `transport` should go: the WebSocket URL or the QUIC
    /// address of the least-loaded other member; `None` when there is none.
    pub fn pick(&self, transport: Transport) -> Option<String> {
        // A parking_lot mutex held for a scan of a few members, never across an await.
        let mut nodes = self.nodes.lock();
        let (load, node) = nodes
            .iter_mut()
            .min_by_key(|(load, n)| (*load, n.node_id))?;
        *load = load.saturating_add(1);
        Some(match transport {
            Transport::WebSocket => node.ws_url.clone(),
            Transport::Quic => node.quic_addr.clone(),
        })
    }

    /// The node ids hints can point to.
    pub fn node_ids(&self) -> Vec<u16> {
        self.nodes.lock().iter().map(|(_, n)| n.node_id).collect()
    }
}

/// The drain state of one node; shared by the node, its listeners and its sessions.
#[derive(Debug, Default)]
pub struct Drain {
    started: CancellationToken,
    closing: CancellationToken,
    targets: OnceLock<Targets>,
    moved: AtomicU64,
    closed: AtomicU64,
    /// The first drain's report; later callers wait for it.
    pub(crate) report: tokio::sync::OnceCell<DrainReport>,
}

impl Drain {
    /// Whether the node is draining (or has drained): new client connections are refused.
    pub fn is_draining(&self) -> bool {
        self.started.is_cancelled()
    }

    /// Starts phase 1 with these targets. Only the first call counts.
    pub(crate) fn start(&self, targets: Targets) {
        let _ = self.targets.set(targets);
        self.started.cancel();
    }

    /// Starts phase 2: the remaining sessions close.
    pub(crate) fn close_remaining(&self) {
        self.closing.cancel();
    }

    /// Cancelled when the drain starts.
    pub fn started(&self) -> &CancellationToken {
        &self.started
    }

    /// Cancelled when the remaining sessions must close.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// The `reconnect_to` of the next `draining` frame for a session of `transport`.
    pub fn pick(&self, transport: Transport) -> Option<String> {
        self.targets.get().and_then(|t| t.pick(transport))
    }

    /// The node ids the hints point to.
    pub(crate) fn target_ids(&self) -> Vec<u16> {
        self.targets
            .get()
            .map(Targets::node_ids)
            .unwrap_or_default()
    }

    /// A session whose client left after its `draining` frame.
    pub fn session_moved(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("gateway_drain_sessions_total", "outcome" => "moved").increment(1);
    }

    /// A session closed at the drain timeout.
    pub fn session_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("gateway_drain_sessions_total", "outcome" => "closed").increment(1);
    }

    /// (moved, closed) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.moved.load(Ordering::Relaxed),
            self.closed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u16) -> NodeInfo {
        NodeInfo {
            node_id: id,
            ws_url: format!("ws://127.0.0.1:900{id}/v1/ws"),
            quic_addr: format!("127.0.0.1:910{id}"),
        }
    }

    #[test]
    fn picks_spread_by_load_and_keep_the_transport() {
        let t = Targets::new(vec![(3, node(1)), (1, node(2))]);
        // Node 2 has 1, node 1 has 3: two to node 2, then they alternate (ties by id).
        let picks: Vec<_> = (0..4).map(|_| t.pick(Transport::WebSocket)).collect();
        assert_eq!(
            picks,
            vec![
                Some(node(2).ws_url),
                Some(node(2).ws_url),
                Some(node(1).ws_url),
                Some(node(2).ws_url),
            ]
        );
        assert_eq!(t.pick(Transport::Quic), Some(node(1).quic_addr));
        assert_eq!(Targets::new(Vec::new()).pick(Transport::Quic), None);
    }

    #[test]
    fn nothing_is_picked_before_a_drain() {
        let d = Drain::default();
        assert!(!d.is_draining());
        assert_eq!(d.pick(Transport::WebSocket), None);
        d.start(Targets::new(vec![(0, node(1))]));
        assert!(d.is_draining());
        assert_eq!(d.pick(Transport::WebSocket), Some(node(1).ws_url));
    }
}
