//! Accounts: signup, login, logout, token checks and profiles.
//!
//! Logins and signups pass the throttles (`throttle.rs`) before any password is hashed, and
//! hash on the bounded pool (`passwords.rs`); a login for a username that does not exist
//! hashes against a dummy hash, so its answer costs what a wrong password costs.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::http::{LoginRequest, LoginResponse, NodeInfo, SignupRequest, UserProfile};
use client_proto::ids::{DeviceId, UserId};
use client_proto::limits::{valid_username, MAX_DISPLAY_NAME_BYTES, PASSWORD_LEN};

use crate::config::LoginLimits;
use crate::domain::auth::{Claims, Identity, Tokens};
use crate::domain::delivery::Delivery;
use crate::domain::error::ApiError;
use crate::domain::passwords::{HashError, Passwords};
use crate::domain::throttle::{LoginThrottle, Refusal, SignupLimit};
use crate::ids::{now_unix_ms, IdGen};
use crate::store::records::{DeviceRecord, UserRecord};
use crate::store::Store;

/// Most devices one user may have logged in at once.
pub const MAX_DEVICES: usize = 32;
/// Longest device name, in bytes.
const MAX_DEVICE_NAME_BYTES: usize = 64;

/// How long a client told `busy` (the hashing queue was full) should wait.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The account service.
pub struct Accounts {
    store: Store,
    tokens: Tokens,
    ids: Arc<IdGen>,
    delivery: Delivery,
    token_ttl: Duration,
    passwords: Passwords,
    /// Login failures by username and source. A `parking_lot` mutex: held for a map lookup
    /// or update, never across an await.
    throttle: parking_lot::Mutex<LoginThrottle>,
    /// Signups by source (same locking as `throttle`).
    signups: parking_lot::Mutex<SignupLimit>,
    failure_log: LogGate,
}

/// At most one WARN per second for failed logins; the ones in between are counted and the
/// next line says how many were not logged (`accounts_login_failures_total` counts all).
#[derive(Default)]
struct LogGate {
    /// Seconds since `origin` of the last line written, plus one (0: none yet).
    last: AtomicU64,
    skipped: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl LogGate {
    /// Whether to write a line now, and how many were skipped since the last one.
    fn admit(&self, now: Instant) -> Option<u64> {
        let origin = *self.origin.get_or_init(|| now);
        let second = now.saturating_duration_since(origin).as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last < second
            && self
                .last
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn busy(e: HashError) -> ApiError {
    match e {
        HashError::Busy => {
            ApiError::new(client_proto::ErrorCode::Busy, e.to_string()).retry_after(BUSY_RETRY)
        }
        HashError::Failed(_) => {
            tracing::error!(error = %e, "password hashing failed");
            ApiError::new(client_proto::ErrorCode::Internal, "password hashing failed")
        }
    }
}

fn throttled(r: Refusal) -> ApiError {
    let scope = match r {
        Refusal::Account(_) => "account",
        Refusal::Source(_) => "source",
    };
    metrics::counter!("accounts_login_throttled_total", "scope" => scope).increment(1);
    // Whole seconds, rounded up, at least 1 (what `Retry-After` carries).
    let secs = r.retry_after().as_millis().div_ceil(1000).max(1) as u64;
    ApiError::new(
        client_proto::ErrorCode::RateLimited,
        format!("too many failed logins; retry in {secs} s"),
    )
    .retry_after(Duration::from_secs(secs))
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
        limits: &LoginLimits,
    ) -> Self {
        Accounts {
            store,
            tokens,
            ids,
            delivery,
            token_ttl,
            passwords: Passwords::new(limits.hash_workers, limits.hash_queue),
            throttle: parking_lot::Mutex::new(LoginThrottle::new(limits)),
            signups: parking_lot::Mutex::new(SignupLimit::new(limits.signups_per_ip_per_hour)),
            failure_log: LogGate::default(),
        }
    }

    /// Signs up a user; `source` is the client's address (signups per address are limited).
    pub async fn signup(
        &self,
        req: SignupRequest,
        source: IpAddr,
    ) -> Result<UserProfile, ApiError> {
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
        if let Err(r) = self.signups.lock().take(source, Instant::now()) {
            metrics::counter!("accounts_signups_refused_total").increment(1);
            let secs = r.retry_after().as_secs().max(1);
            return Err(ApiError::new(
                client_proto::ErrorCode::RateLimited,
                format!("too many signups from this address; retry in {secs} s"),
            )
            .retry_after(Duration::from_secs(secs)));
        }
        if self.store.user_id_by_name(&req.username).await?.is_some() {
            return Err(ApiError::new(
                client_proto::ErrorCode::Conflict,
                "that username is taken",
            ));
        }
        let password_hash = self.passwords.hash(req.password).await.map_err(busy)?;
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

    /// Logs a device in; `source` is the client's address (failures are throttled by
    /// username and by address).
    pub async fn login(
        &self,
        req: LoginRequest,
        node: NodeInfo,
        source: IpAddr,
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
        self.throttle
            .lock()
            .check(&req.username, source, Instant::now())
            .map_err(throttled)?;
        let user = match self.store.user_id_by_name(&req.username).await? {
            Some(id) => self.store.user(id).await?,
            None => None,
        };
        let stored = user.as_ref().map(|rec| rec.password_hash.clone());
        let ok = self
            .passwords
            .verify(req.password, stored)
            .await
            .map_err(busy)?;
        let Some(user_id) = user.filter(|_| ok).map(|rec| rec.user_id) else {
            self.login_failed(&req.username, source);
            return Err(refused());
        };
        self.throttle.lock().succeeded(&req.username);
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

    /// Counts, throttles and (rate-limited) logs a failed login.
    fn login_failed(&self, username: &str, source: IpAddr) {
        metrics::counter!("accounts_login_failures_total").increment(1);
        let now = Instant::now();
        let locked = self.throttle.lock().failed(username, source, now);
        if let Some(skipped) = self.failure_log.admit(now) {
            tracing::warn!(
                username,
                %source,
                locked,
                not_logged_since_last = skipped,
                "login failed: wrong username or password"
            );
        }
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
