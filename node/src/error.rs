//! The one place where failures become PROTOCOL.md error codes, for HTTP answers and
//! `error` frames alike.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use client_proto::{ErrorBody, ErrorCode};

use crate::store::StoreError;

/// A refusal a client sees: a stable code and a sentence.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Timeout(_) | StoreError::Contention | StoreError::Unavailable(_) => {
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}
