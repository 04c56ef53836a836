//! Request and response bodies of the HTTP API (`/v1/...`).

use serde::{Deserialize, Serialize};

use crate::frames::Message;
use crate::ids::{DeviceId, MessageId, UserId};

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
