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

/// `Debug` leaves the password out (`redact.rs`).
#[derive(Clone, Serialize, Deserialize)]
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

/// `Debug` leaves the password out (`redact.rs`).
#[derive(Clone, Serialize, Deserialize)]
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

/// `Debug` leaves the token out (`redact.rs`).
#[derive(Clone, Serialize, Deserialize)]
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

/// One logged-in device of the caller (`GET /v1/devices`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: DeviceId,
    /// The `device_name` given at its first login (may be empty).
    pub name: String,
    /// Unix ms of its first login.
    pub created_at: u64,
    /// Unix ms it was last used (login, or a request or connection with its token), to
    /// within the server's bookkeeping granularity (at most an hour).
    pub last_seen: u64,
    /// Whether this is the device whose token made the request.
    pub current: bool,
    /// Whether a push target is set for it.
    pub push: bool,
}

/// Where a friendship stands, as `POST /v1/friends/{user_id}` answers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FriendState {
    /// Both sides agreed: they are friends.
    Friends,
    /// The caller asked; the other user has not accepted yet.
    Requested,
}

/// The answer of `POST /v1/friends/{user_id}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FriendResponse {
    pub user_id: UserId,
    pub state: FriendState,
}

/// Pending friend requests (`GET /v1/friends/requests`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct FriendRequests {
    /// Users who asked the caller (accept with `POST`, decline with `DELETE`).
    pub incoming: Vec<UserProfile>,
    /// Users the caller asked (cancel with `DELETE`).
    pub outgoing: Vec<UserProfile>,
}

/// Who may do something to a user (privacy settings).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Any user.
    #[default]
    Everyone,
    /// Mutual friends only.
    Friends,
    /// No one (the user themselves excepted).
    Nobody,
}

/// A user's privacy settings (`GET`/`PUT /v1/me/privacy`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PrivacySettings {
    /// Who may send this user direct messages.
    pub messages: Audience,
    /// Who may add this user to a group (creating a group with them included).
    pub group_adds: Audience,
}

/// `PUT /v1/me/privacy`: the settings to change; absent ones stay as they are.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PrivacyPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_adds: Option<Audience>,
}
