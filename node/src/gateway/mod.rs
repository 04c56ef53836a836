//! How clients reach the node: the TCP listener with its connection caps and timeouts
//! ([`listener`]), the HTTP API ([`http`]), WebSocket ([`ws`]) and QUIC
//! ([`quic`]) transports, which both adapt their socket to one device [`session`], and the
//! per-connection rate limit ([`ratelimit`]), the drain state the listeners and sessions
//! share while the node drains ([`drain`]), and the web client the node serves at `/`
//! ([`web`]). Gateways call the domain services through
//! [`crate::node::Node`]; they never touch the store or the cluster directly.

pub mod admin;
pub mod drain;
pub mod http;
pub mod listener;
pub mod quic;
pub mod ratelimit;
pub mod session;
pub mod web;
pub mod ws;
