//! An async client: the HTTP API ([`HttpClient`]), one connection over WebSocket or QUIC
//! ([`Connection`]), and [`ChatClient`], which keeps a connection alive across failures
//! (reconnect with jittered backoff, `sync` from the stored cursor, dedup by message id,
//! retried sends with stable client ids).
//!
//! ```no_run
//! # async fn demo() -> Result<(), client_proto::client::ClientError> {
//! use client_proto::client::{ChatClient, ClientOptions, Event, HttpClient};
//! use client_proto::Recipient;
//!
//! let api = HttpClient::new("http://127.0.0.1:8080");
//! let login = api.login("alice", "correct horse", None).await?;
//! let bob = api.user(&login.token, "bob").await?;
//! let mut chat = ChatClient::start(ClientOptions::new(api.ws_url(), login.token.clone()));
//! let ack = chat.send(Recipient::User(bob.user_id), "hello").await?;
//! println!("stored as {}", ack.message_id);
//! while let Some(event) = chat.next_event().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.from, m.body);
//!     }
//! }
//! # Ok(()) }
//! ```

mod chat;
mod conn;
mod http;
pub mod quic;

pub use chat::{ChatClient, ChatSender, ClientOptions, ClientStats, Event};
pub use conn::{connect_raw, Ack, ConnectOptions, Connection, SyncResult, WsConnection};
pub use http::HttpClient;

use crate::error::{ErrorBody, ErrorCode};

/// Anything that can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the server refused: {0}")]
    Refused(ErrorBody),
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("the connection closed{}", .0.as_ref().map(|(c, r)| format!(" with code {c}: {r}")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(b) => Some(b.code),
            _ => None,
        }
    }
}
