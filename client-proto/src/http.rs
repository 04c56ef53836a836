//! Request and response bodies of the HTTP API (`/v1/...`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::frames::{Message, PresenceStatus};
use crate::ids::{DeviceId, GroupId, MessageId, UserId};

/// Why a request body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object (an array would match fields by position).
    #[error("the body must be a JSON object")]
    NotObject,
    /// An object with a field missing or of the wrong shape (`field` is its path, empty when
    /// the object as a whole is wrong, e.g. a missing field).
    #[error("{}{message}", if field.is_empty() { String::new() } else { format!("field `{field}`: ") })]
    Field { field: String, message: String },
}

/// Decodes a request body of the HTTP API: a JSON object, nothing else (refused before any
/// field is looked at), with errors that name the field. Never panics.
pub fn decode_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    let short = |e: &dyn std::fmt::Display| {
        let mut s = e.to_string();
        crate::limits::truncate_utf8(&mut s, 256);
        s
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Tell "not JSON" from "JSON of the wrong kind" (only on the error path).
        return match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => Err(BodyError::NotObject),
            Err(e) => Err(BodyError::NotJson(short(&e))),
        };
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return BodyError::NotJson(short(&inner));
        }
        BodyError::Field {
            field: if field == "." { String::new() } else { field },
            message: short(&inner),
        }
    })?;
    de.end().map_err(|e| BodyError::NotJson(short(&e)))?;
    Ok(value)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignupRequest {
    pub username: String,
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignupResponse {
    pub user_id: UserId,
    pub username: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
}

/// Where a client should connect.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: u16,
    pub ws_url: String,
    pub quic_addr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub expires_at: u64,
    pub node: NodeInfo,
}

/// A user's public profile.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserProfile {
    pub user_id: UserId,
    pub username: String,
    pub display_name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct PatchMeRequest {
    #[serde(default)]
    pub display_name: Option<String>,
}

/// A page of history, newest first; `next_before` continues it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub next_before: Option<MessageId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateGroupRequest {
    pub name: String,
    #[serde(default)]
    pub members: Vec<UserId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMemberRequest {
    pub user_id: UserId,
}

/// A group as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupInfo {
    pub group_id: GroupId,
    pub name: String,
    pub owner: UserId,
    /// Members in join order, the owner included.
    pub members: Vec<UserId>,
    /// Each member's presence (only on `GET /v1/groups/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<Vec<PresenceInfo>>,
}

/// One user's presence.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceInfo {
    pub user_id: UserId,
    pub status: PresenceStatus,
    /// Unix ms the user was last seen online, if ever.
    pub last_seen: Option<u64>,
}
