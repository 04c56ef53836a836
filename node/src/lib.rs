//! The chat node: configuration, HTTP API, the WebSocket gateway, chat logic and the store.
//! `main.rs` only parses the command line and calls [`node::serve`].

pub mod accounts;
pub mod auth;
pub mod chat;
pub mod config;
pub mod error;
pub mod friends;
pub mod groups;
pub mod http;
pub mod hub;
pub mod ids;
pub mod mesh;
pub mod node;
pub mod presence;
pub mod push;
pub mod quic;
pub mod ratelimit;
pub mod session;
pub mod store;
pub mod ws;
