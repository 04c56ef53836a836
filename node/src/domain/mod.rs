//! The chat rules. Nothing here knows about sockets, HTTP or the cluster: a gateway calls
//! these services, and they reach other nodes only through the ports they are given
//! ([`delivery::Forward`], [`presence::Directory`]).

pub mod accounts;
pub mod auth;
pub mod chat;
pub mod delivery;
pub mod error;
pub mod friends;
pub mod groups;
pub mod hub;
pub mod passwords;
pub mod presence;
pub mod privacy;
pub mod push;
pub mod throttle;
