//! The wire contract between chat clients and nodes (docs/protocol.md, version 1).
//!
//! # Layout
//!
//! - [`ids`]: 64-bit ids (decimal strings in JSON) and conversation ids.
//! - [`frames`]: every WebSocket/QUIC frame, client to server and server to client.
//! - [`error`]: the stable error codes and the error body.
//! - [`limits`]: the limits every node enforces.
//! - [`codec`]: the JSON and binary (bincode 2) encodings of frames, the QUIC ALPN and framing,
//!   and the close codes.
//! - [`client`]: an async client (HTTP API and WebSocket) used by tests, the CLI and the bench.
//! - [`ready`]: the `chatnode ready` line a node logs once it serves, and its parser.

pub mod client;
pub mod codec;
pub mod error;
pub mod frames;
pub mod http;
pub mod ids;
pub mod limits;
pub mod ready;
mod redact;

pub use error::{ErrorBody, ErrorCode};
pub use frames::{ClientFrame, Message, PresenceStatus, Recipient, ServerFrame};
pub use ids::{ConversationId, DeviceId, GroupId, MessageId, Position, UserId};
pub use ready::ReadyLine;
