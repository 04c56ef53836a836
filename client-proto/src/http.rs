//! Request and response bodies of the HTTP API (`/v1/...`).

use serde::{Deserialize, Serialize};

use crate::frames::{Message, PresenceStatus};
use crate::ids::{DeviceId, GroupId, MessageId, UserId};

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
