//! The chat node: the `chatnode` server library.
//!
//! # Layout
//!
//! Each folder is one concern, and imports point down only (`server` → `gateway`/`mesh` →
//! `domain` → `store`; `node/tests/layout.rs` checks it):
//!
//! - [`server`]: wiring and ordered shutdown, the only module that knows every part.
//! - [`node`]: [`node::Node`], the handles the gateways share.
//! - [`gateway`]: how clients reach the node: HTTP API, WebSocket, QUIC, the per-device
//!   session, rate limits, and the mapping of API errors to HTTP answers.
//! - [`domain`]: the chat rules: accounts and tokens, chat (send, sync, history), friends,
//!   groups, presence, push, the local hub of connections and the delivery port. No sockets,
//!   no HTTP, no cluster code: the cluster plugs in behind `domain::delivery::Forward` and
//!   `domain::presence::Directory`.
//! - [`mesh`]: the node's place in the cluster: membership, the peer endpoint, forwarding
//!   deliveries to other nodes, the gossip presence directory.
//! - [`store`]: every record, partitioned and replicated through `cluster::replication`,
//!   with this node's replica in sled.
//! - [`config`] and [`ids`]: settings, and the time-ordered id generator; [`logging`]:
//!   rate limits for warnings a client or peer can repeat.

pub mod admin_cli;
pub mod config;
pub mod domain;
pub mod gateway;
pub mod ids;
pub mod logging;
pub mod mesh;
pub mod node;
pub mod server;
pub mod store;
