//! Accounts: signup, login, logout, token checks and profiles.

use std::sync::Arc;
use std::time::Duration;

use client_proto::http::{LoginRequest, LoginResponse, NodeInfo, SignupRequest, UserProfile};
use client_proto::ids::{DeviceId, UserId};
use client_proto::limits::{valid_username, MAX_DISPLAY_NAME_BYTES, PASSWORD_LEN};

use crate::domain::auth::{hash_password, verify_password, Claims, Identity, Tokens};
use crate::domain::delivery::Delivery;
use crate::domain::error::ApiError;
use crate::ids::{now_unix_ms, IdGen};
use crate::store::records::{DeviceRecord, UserRecord};
use crate::store::Store;

/// Most devices one user may have logged in at once.
pub const MAX_DEVICES: usize = 32;
/// Longest device name, in bytes.
const MAX_DEVICE_NAME_BYTES: usize = 64;

/// The account service.
pub struct Accounts {
    store: Store,
    tokens: Tokens,
    ids: Arc<IdGen>,
    delivery: Delivery,
    token_ttl: Duration,
}

fn profile(rec: &UserRecord) -> UserProfile {
    UserProfile {
        user_id: rec.user_id,
        username: rec.username.clone(),
        display_name: rec.display_name.clone(),
    }
}

fn check_display_name(name: &str) -> Result<(), ApiError> {
    if name.len() > MAX_DISPLAY_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "display_name must be at most {MAX_DISPLAY_NAME_BYTES} bytes with no control characters"
        )));
    }
    Ok(())
}

impl Accounts {
    pub fn new(
        store: Store,
        tokens: Tokens,
        ids: Arc<IdGen>,
        delivery: Delivery,
        token_ttl: Duration,
    ) -> Self {
        Accounts {
            store,
            tokens,
            ids,
            delivery,
            token_ttl,
        }
    }

    pub async fn signup(&self, req: SignupRequest) -> Result<UserProfile, ApiError> {
        if !valid_username(&req.username) {
            return Err(ApiError::bad_request(
                "username must be 3 to 32 characters of a-z 0-9 _ . -",
            ));
        }
        if !PASSWORD_LEN.contains(&req.password.len()) {
            return Err(ApiError::bad_request("password must be 8 to 1024 bytes"));
        }
        let display_name = req.display_name.unwrap_or_else(|| req.username.clone());
        check_display_name(&display_name)?;
        if self.store.user_id_by_name(&req.username).await?.is_some() {
            return Err(ApiError::new(
                client_proto::ErrorCode::Conflict,
                "that username is taken",
            ));
        }
        let password_hash = hash_password(req.password)
            .await
            .map_err(|e| ApiError::new(client_proto::ErrorCode::Internal, e.to_string()))?;
        let rec = UserRecord {
            user_id: UserId(self.ids.next()?.0),
            username: req.username,
            display_name,
            password_hash,
            created_at: now_unix_ms(),
            last_seen: 0,
            devices: Vec::new(),
            token_counter: 0,
        };
        let out = profile(&rec);
        if !self.store.create_user(rec).await? {
            return Err(ApiError::new(
                client_proto::ErrorCode::Conflict,
                "that username is taken",
            ));
        }
        metrics::counter!("accounts_signups_total").increment(1);
        Ok(out)
    }

    pub async fn login(
        &self,
        req: LoginRequest,
        node: NodeInfo,
    ) -> Result<LoginResponse, ApiError> {
        let refused = || ApiError::unauthorized("wrong username or password");
        if !valid_username(&req.username) || !PASSWORD_LEN.contains(&req.password.len()) {
            return Err(refused());
        }
        let device_name = req.device_name.unwrap_or_default();
        if device_name.len() > MAX_DEVICE_NAME_BYTES {
            return Err(ApiError::bad_request(
                "device_name must be at most 64 bytes",
            ));
        }
        let user_id = self
            .store
            .user_id_by_name(&req.username)
            .await?
            .ok_or_else(refused)?;
        let rec = self.store.user(user_id).await?.ok_or_else(refused)?;
        if !verify_password(req.password, rec.password_hash.clone()).await {
            return Err(refused());
        }
        let device_id = match req.device_id {
            Some(d) => d,
            None => DeviceId(self.ids.next()?.0),
        };
        let now = now_unix_ms();
        let rec = self
            .store
            .update_user(user_id, |rec| {
                rec.token_counter += 1;
                let token_id = rec.token_counter;
                if let Some(d) = rec.devices.iter_mut().find(|d| d.device_id == device_id) {
                    d.token_id = token_id;
                    return Ok(());
                }
                if rec.devices.len() >= MAX_DEVICES {
                    return Err(ApiError::new(
                        client_proto::ErrorCode::Conflict,
                        format!(
                            "at most {MAX_DEVICES} devices may be logged in; log one out first"
                        ),
                    ));
                }
                rec.devices.push(DeviceRecord {
                    device_id,
                    name: device_name.clone(),
                    token_id,
                    created_at: now,
                    push_target: None,
                });
                Ok(())
            })
            .await?
            .ok_or_else(refused)?;
        let expires_at = now + self.token_ttl.as_millis() as u64;
        let token = self.tokens.issue(&Claims {
            user: user_id,
            device: device_id,
            token_id: rec.token_counter,
            expires_at,
        });
        metrics::counter!("accounts_logins_total").increment(1);
        Ok(LoginResponse {
            token,
            user_id,
            device_id,
            expires_at,
            node,
        })
    }

    /// Revokes the caller's device token and closes its live connections.
    pub async fn logout(&self, who: Identity) -> Result<(), ApiError> {
        self.store
            .update_user(who.user, |rec| {
                rec.devices.retain(|d| d.device_id != who.device);
                Ok::<_, ApiError>(())
            })
            .await?;
        self.delivery
            .close_device(who.user, who.device, "logged out");
        Ok(())
    }

    /// Checks a bearer token: signature, expiry, and that the device is still logged in.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, ApiError> {
        let claims = self
            .tokens
            .verify(token, now_unix_ms())
            .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let rec = self
            .store
            .user(claims.user)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the token's user does not exist"))?;
        let live = rec
            .devices
            .iter()
            .any(|d| d.device_id == claims.device && d.token_id == claims.token_id);
        if !live {
            return Err(ApiError::unauthorized("the token was revoked"));
        }
        Ok(Identity {
            user: claims.user,
            device: claims.device,
        })
    }

    /// When `token` expires (Unix ms), if it is a valid token: a session authenticated with
    /// it ends then.
    pub fn token_expires_at(&self, token: &str) -> Option<u64> {
        self.tokens
            .verify(token, now_unix_ms())
            .ok()
            .map(|c| c.expires_at)
    }

    /// Sets where `device` (one of the caller's devices) gets push notifications.
    pub async fn set_push_target(
        &self,
        who: Identity,
        device: DeviceId,
        target: String,
    ) -> Result<(), ApiError> {
        crate::domain::push::validate_target(&target)?;
        self.store
            .update_user(who.user, |rec| {
                let dev = rec
                    .devices
                    .iter_mut()
                    .find(|d| d.device_id == device)
                    .ok_or_else(|| {
                        ApiError::not_found(format!("you have no logged-in device {device}"))
                    })?;
                dev.push_target = Some(target.clone());
                Ok::<_, ApiError>(())
            })
            .await?;
        Ok(())
    }

    pub async fn me(&self, who: Identity) -> Result<UserProfile, ApiError> {
        self.profile(who.user).await
    }

    pub async fn profile(&self, user: UserId) -> Result<UserProfile, ApiError> {
        let rec = self
            .store
            .user(user)
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        Ok(profile(&rec))
    }

    pub async fn by_username(&self, username: &str) -> Result<UserProfile, ApiError> {
        if !valid_username(username) {
            return Err(ApiError::not_found("no such user"));
        }
        let id = self
            .store
            .user_id_by_name(username)
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        self.profile(id).await
    }

    pub async fn set_display_name(
        &self,
        who: Identity,
        name: String,
    ) -> Result<UserProfile, ApiError> {
        check_display_name(&name)?;
        let rec = self
            .store
            .update_user(who.user, |rec| {
                rec.display_name = name.clone();
                Ok::<_, ApiError>(())
            })
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        Ok(profile(&rec))
    }
}
