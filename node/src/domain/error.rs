//! The one place where failures become protocol error codes (`docs/protocol.md`), for HTTP
//! answers and `error` frames alike. (The gateway turns an [`ApiError`] into an HTTP
//! answer; nothing here knows about HTTP.)

use client_proto::ErrorCode;

use crate::ids::ClockSkew;
use crate::store::StoreError;

/// A refusal a client sees: a stable code and a sentence.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// When a retry may succeed (`Retry-After` on HTTP), for refusals that know it.
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// The same refusal, saying when to retry.
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
}

impl From<ClockSkew> for ApiError {
    fn from(e: ClockSkew) -> Self {
        metrics::counter!("chat_clock_skew_refusals_total").increment(1);
        ApiError::new(ErrorCode::Unavailable, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            e if e.is_unavailable() => {
                metrics::counter!("store_write_failures_total").increment(1);
                ApiError::new(ErrorCode::Unavailable, format!("{e}; retrying is safe"))
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::new(
                    ErrorCode::Internal,
                    "the node could not read or write its store",
                )
            }
        }
    }
}
