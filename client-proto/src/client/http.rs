//! The HTTP API of one node.

use std::time::Duration;

use super::ClientError;
use crate::error::ErrorBody;
use crate::http::*;
use crate::ids::{ConversationId, DeviceId, GroupId, MessageId, UserId};

/// The HTTP API of one node.
#[derive(Clone, Debug)]
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
}

impl HttpClient {
    /// `base` is the node's HTTP root, such as `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>) -> Self {
        HttpClient {
            base: base.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The node's HTTP root.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The WebSocket URL of this node (`ws://.../v1/ws`).
    pub fn ws_url(&self) -> String {
        format!("{}/v1/ws", self.base.replacen("http", "ws", 1))
    }

    /// Sends a request and decodes a JSON answer, turning error bodies into [`ClientError`].
    pub async fn request<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let text = self.request_raw(method, path, token, body).await?;
        let text = if text.is_empty() {
            "null".to_string()
        } else {
            text
        };
        serde_json::from_str(&text).map_err(|e| ClientError::Unexpected(format!("{e}: {text}")))
    }

    /// Like [`HttpClient::request`] but returns the body text unparsed.
    pub async fn request_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<String, ClientError> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(ClientError::Refused(b)),
            Err(_) => Err(ClientError::Http { status, body: text }),
        }
    }

    pub async fn signup(
        &self,
        username: &str,
        password: &str,
    ) -> Result<SignupResponse, ClientError> {
        let req = SignupRequest {
            username: username.into(),
            password: password.into(),
            display_name: None,
        };
        self.request(reqwest::Method::POST, "/v1/signup", None, Some(&req))
            .await
    }

    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_id: Option<DeviceId>,
    ) -> Result<LoginResponse, ClientError> {
        let req = LoginRequest {
            username: username.into(),
            password: password.into(),
            device_id,
            device_name: None,
        };
        self.request(reqwest::Method::POST, "/v1/login", None, Some(&req))
            .await
    }

    pub async fn logout(&self, token: &str) -> Result<(), ClientError> {
        self.request_raw(
            reqwest::Method::POST,
            "/v1/logout",
            Some(token),
            None::<&()>,
        )
        .await
        .map(|_| ())
    }

    pub async fn me(&self, token: &str) -> Result<UserProfile, ClientError> {
        self.request(reqwest::Method::GET, "/v1/me", Some(token), None::<&()>)
            .await
    }

    /// A user's profile by id.
    pub async fn user_by_id(&self, token: &str, user: UserId) -> Result<UserProfile, ClientError> {
        let path = format!("/v1/users/id/{user}");
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }

    pub async fn user(&self, token: &str, username: &str) -> Result<UserProfile, ClientError> {
        let path = format!("/v1/users/{username}");
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }

    pub async fn create_group(
        &self,
        token: &str,
        name: &str,
        members: &[UserId],
    ) -> Result<GroupInfo, ClientError> {
        let req = CreateGroupRequest {
            name: name.into(),
            members: members.to_vec(),
        };
        self.request(reqwest::Method::POST, "/v1/groups", Some(token), Some(&req))
            .await
    }

    pub async fn groups(&self, token: &str) -> Result<Vec<GroupInfo>, ClientError> {
        self.request(reqwest::Method::GET, "/v1/groups", Some(token), None::<&()>)
            .await
    }

    pub async fn group(&self, token: &str, group: GroupId) -> Result<GroupInfo, ClientError> {
        let path = format!("/v1/groups/{group}");
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }

    pub async fn add_member(
        &self,
        token: &str,
        group: GroupId,
        user: UserId,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/groups/{group}/members");
        let req = AddMemberRequest { user_id: user };
        self.request_raw(reqwest::Method::POST, &path, Some(token), Some(&req))
            .await
            .map(|_| ())
    }

    pub async fn remove_member(
        &self,
        token: &str,
        group: GroupId,
        user: UserId,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/groups/{group}/members/{user}");
        self.request_raw(reqwest::Method::DELETE, &path, Some(token), None::<&()>)
            .await
            .map(|_| ())
    }

    /// One page of a conversation's history, newest first.
    pub async fn history(
        &self,
        token: &str,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        let mut path = format!("/v1/conversations/{conversation}/messages?");
        if let Some(b) = before {
            path.push_str(&format!("before={b}&"));
        }
        if let Some(l) = limit {
            path.push_str(&format!("limit={l}"));
        }
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }
    /// The caller's logged-in devices.
    pub async fn devices(&self, token: &str) -> Result<Vec<DeviceInfo>, ClientError> {
        self.request(
            reqwest::Method::GET,
            "/v1/devices",
            Some(token),
            None::<&()>,
        )
        .await
    }

    /// Logs out one of the caller's devices (its token stops working, its connections close).
    pub async fn revoke_device(&self, token: &str, device: DeviceId) -> Result<(), ClientError> {
        let path = format!("/v1/devices/{device}");
        self.request_raw(reqwest::Method::DELETE, &path, Some(token), None::<&()>)
            .await
            .map(|_| ())
    }

    /// Asks `user` to be friends, or accepts their request if they asked first.
    pub async fn befriend(&self, token: &str, user: UserId) -> Result<FriendState, ClientError> {
        let path = format!("/v1/friends/{user}");
        let r: FriendResponse = self
            .request(reqwest::Method::POST, &path, Some(token), None::<&()>)
            .await?;
        Ok(r.state)
    }

    /// Ends a friendship, or declines or cancels a friend request, on both sides.
    pub async fn unfriend(&self, token: &str, user: UserId) -> Result<(), ClientError> {
        let path = format!("/v1/friends/{user}");
        self.request_raw(reqwest::Method::DELETE, &path, Some(token), None::<&()>)
            .await
            .map(|_| ())
    }

    /// Pending friend requests, to and from the caller.
    pub async fn friend_requests(&self, token: &str) -> Result<FriendRequests, ClientError> {
        self.request(
            reqwest::Method::GET,
            "/v1/friends/requests",
            Some(token),
            None::<&()>,
        )
        .await
    }

    /// The caller's privacy settings.
    pub async fn privacy(&self, token: &str) -> Result<PrivacySettings, ClientError> {
        self.request(
            reqwest::Method::GET,
            "/v1/me/privacy",
            Some(token),
            None::<&()>,
        )
        .await
    }

    /// Changes some of the caller's privacy settings; answers all of them.
    pub async fn set_privacy(
        &self,
        token: &str,
        patch: &PrivacyPatch,
    ) -> Result<PrivacySettings, ClientError> {
        self.request(
            reqwest::Method::PUT,
            "/v1/me/privacy",
            Some(token),
            Some(patch),
        )
        .await
    }
}
