//! The client programs of the `chatnode` binary. They speak to nodes only through the wire
//! contract (`client-proto`), like any third-party client, and know nothing of the server's
//! internals; `chatnode`'s `main.rs` parses the command line and calls their `run`.
//!
//! # Layout
//!
//! - [`bench`]: `chatnode bench`, the load generator: scenarios (direct pairs, groups,
//!   presence, idle connections, the relay baseline) against running nodes or a node it
//!   spawns, with a table and a `BENCH_JSON` line for each run.
//! - [`client_cli`]: `chatnode client`, the terminal chat client: slash commands and lines
//!   sent to the open conversation, over WebSocket or QUIC.

pub mod bench;
pub mod client_cli;
