//! Stable error codes and the error body shared by HTTP answers and `error` frames.

use serde::{Deserialize, Serialize};

/// A machine-readable error code (docs/protocol.md, "Conventions").
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Debug,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidFrame,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    MessageTooLarge,
    GroupFull,
    RateLimited,
    Unavailable,
    Internal,
    /// The node is at a capacity limit (password hashing): retry after `Retry-After`
    /// seconds. Nothing was done. (Last, so that the binary codec's numbers of the others stay.)
    Busy,
}

impl ErrorCode {
    /// The HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidFrame => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::GroupFull => 409,
            ErrorCode::MessageTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Busy | ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Busy => "busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every HTTP error and the payload of an `error` frame:
/// a stable code and a human sentence.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}
