//! Frames: what travels on a WebSocket (JSON text or binary) or a QUIC stream (binary).
//!
//! JSON frames are objects tagged by `type`; the binary codec encodes the same enums with
//! bincode 2 (see [`crate::codec`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::ids::{ConversationId, DeviceId, GroupId, MessageId, Position, UserId};
use crate::limits::{truncate_utf8, MAX_ECHOED_REF_BYTES, MAX_ERROR_MESSAGE_BYTES};

/// Where a `send` goes: `{"user": id}` or `{"group": id}`.
#[derive(
    Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
#[serde(rename_all = "snake_case")]
pub enum Recipient {
    User(UserId),
    Group(GroupId),
}

/// A frame from a client to a node. `Debug` leaves tokens and bodies out (`redact.rs`).
#[derive(Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Must be the first frame of a connection.
    Auth { token: String },
    /// Send a message; `id` is the client message id (unique per sender, at most 64 bytes).
    Send {
        id: String,
        to: Recipient,
        body: String,
    },
    /// Everything in this user's inbox after position `after`: the last cursor this device
    /// was given (by a `sync_batch` or a `cursor` frame), `null` for everything.
    Sync {
        #[serde(default)]
        after: Option<Position>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// "Still here".
    Heartbeat,
    /// Receive `presence` frames for these users.
    SubscribePresence { users: Vec<UserId> },
    /// Stop receiving `presence` frames for these users.
    UnsubscribePresence { users: Vec<UserId> },
    /// A page of a conversation's history, newest first.
    History {
        conversation: ConversationId,
        #[serde(default)]
        before: Option<MessageId>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The largest message id this client has seen (acked or received): the node's clock is
    /// pulled past it, so that what the client sends next gets a larger id even on a node
    /// whose clock is a little behind. Sent after `auth`; optional.
    Seen { message_id: MessageId },
}

impl ClientFrame {
    /// Every `type` a client may send.
    pub const KINDS: [&'static str; 8] = [
        "auth",
        "send",
        "sync",
        "heartbeat",
        "subscribe_presence",
        "unsubscribe_presence",
        "history",
        "seen",
    ];

    /// The frame's `type` name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Sync { .. } => "sync",
            ClientFrame::Heartbeat => "heartbeat",
            ClientFrame::SubscribePresence { .. } => "subscribe_presence",
            ClientFrame::UnsubscribePresence { .. } => "unsubscribe_presence",
            ClientFrame::History { .. } => "history",
            ClientFrame::Seen { .. } => "seen",
        }
    }
}

/// A stored message as clients see it. `Debug` leaves the body out (`redact.rs`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Message {
    pub message_id: MessageId,
    pub conversation: ConversationId,
    pub from: UserId,
    /// The recipient of a direct message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<UserId>,
    /// The group of a group message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupId>,
    pub body: String,
    /// Unix milliseconds at which the node accepted the message.
    pub ts: u64,
    /// The sender's client message id.
    pub client_id: String,
}

/// A user's presence.
#[derive(
    Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    Online,
    Offline,
}

/// The `retry_after_ms` of an `error` frame: an optional number in JSON. The binary codec does
/// not carry it (it encodes as nothing and decodes as `None`), so that the binary layout of
/// `error` stays that of the clients already deployed; binary clients read the wait from the
/// message (`... retry in 120 ms`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RetryAfterMs(pub Option<u64>);

impl RetryAfterMs {
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl bincode::Encode for RetryAfterMs {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        _: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        Ok(())
    }
}

impl<C> bincode::Decode<C> for RetryAfterMs {
    fn decode<D: bincode::de::Decoder<Context = C>>(
        _: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(RetryAfterMs(None))
    }
}

bincode::impl_borrow_decode!(RetryAfterMs);

/// A frame from a node to a client.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Authentication succeeded.
    Ready {
        user_id: UserId,
        device_id: DeviceId,
        node_id: u16,
        heartbeat_interval_ms: u64,
    },
    /// The message with client id `ref` is durably stored.
    Ack {
        #[serde(rename = "ref")]
        reference: String,
        message_id: MessageId,
        conversation: ConversationId,
        ts: u64,
    },
    /// A new message for this user.
    Message { message: Arc<Message> },
    /// Part of the answer to `sync`, in inbox-position order. `cursor` is a position this
    /// device has everything up to (store it and sync from it next time).
    SyncBatch {
        messages: Vec<Message>,
        cursor: Option<Position>,
        done: bool,
        gap: bool,
    },
    /// A watched user's status changed.
    Presence {
        user_id: UserId,
        status: PresenceStatus,
        last_seen: Option<u64>,
    },
    /// The answer to `history`.
    History {
        conversation: ConversationId,
        messages: Vec<Message>,
        next_before: Option<MessageId>,
    },
    /// Something the client sent was refused.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// With `rate_limited`: milliseconds after which the same request will be accepted
        /// (JSON only; see [`RetryAfterMs`]).
        #[serde(default, skip_serializing_if = "RetryAfterMs::is_none")]
        retry_after_ms: RetryAfterMs,
    },
    /// The node is shutting down; reconnect elsewhere.
    Draining {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_to: Option<String>,
    },
    /// The node caught this connection up with the user's inbox: everything for the user at
    /// or below `cursor` has been sent on it. Store it and sync from it next time, like a
    /// `sync_batch` cursor. Sent only to a connection that has synced.
    Cursor { cursor: Position },
}

impl ServerFrame {
    /// An `error` frame. The message is cut to [`MAX_ERROR_MESSAGE_BYTES`] and a reference
    /// longer than [`MAX_ECHOED_REF_BYTES`] is left out (echoing it would let a client make the
    /// node send back what it sent, escaped larger).
    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_ERROR_MESSAGE_BYTES);
        ServerFrame::Error {
            code,
            message,
            reference: reference.filter(|r| r.len() <= MAX_ECHOED_REF_BYTES),
            retry_after_ms: RetryAfterMs(None),
        }
    }

    /// A `rate_limited` error with the time after which the request will be accepted.
    pub fn rate_limited(
        message: impl Into<String>,
        reference: Option<String>,
        retry_after_ms: u64,
    ) -> Self {
        let mut frame = ServerFrame::error(ErrorCode::RateLimited, message, reference);
        if let ServerFrame::Error {
            retry_after_ms: r, ..
        } = &mut frame
        {
            *r = RetryAfterMs(Some(retry_after_ms));
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_frames_are_bounded() {
        let f = ServerFrame::error(
            ErrorCode::InvalidFrame,
            "\u{1}".repeat(100_000),
            Some("r".repeat(300)),
        );
        match f {
            ServerFrame::Error {
                message, reference, ..
            } => {
                assert_eq!(message.len(), crate::limits::MAX_ERROR_MESSAGE_BYTES);
                assert_eq!(reference, None);
            }
            _ => unreachable!(),
        }
    }
}
