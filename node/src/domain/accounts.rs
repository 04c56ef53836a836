//! Accounts: signup, login, logout, token checks, profiles, devices and privacy settings.
//!
//! Devices: a user has at most [`MAX_DEVICES`] logged-in devices. A device is *used* when it
//! logs in or its token is checked (an HTTP request, a new connection); that time is stored
//! at most every [`touch_interval`] per device, so that requests do not all write. A device
//! unused for the idle lifetime (`--device-idle-secs`) is removed when its token is next
//! checked or at the next login of the user; a login at the cap evicts the device that was
//! used least recently. A removed device's token stops working on every node and its
//! connections are closed (1008 `logged out`).
//!
//! Logins and signups pass the throttles (`throttle.rs`) before any password is hashed, and
//! hash on the bounded pool (`passwords.rs`); a login for a username that does not exist
//! hashes against a dummy hash, so its answer costs what a wrong password costs.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::http::{
    DeviceInfo, LoginRequest, LoginResponse, NodeInfo, PrivacyPatch, PrivacySettings,
    SignupRequest, UserProfile,
};
use client_proto::ids::{DeviceId, UserId};
use client_proto::limits::{valid_username, MAX_DISPLAY_NAME_BYTES, PASSWORD_LEN};

use crate::config::LoginLimits;
use crate::domain::auth::{Claims, Identity, Tokens};
use crate::domain::delivery::Delivery;
use crate::domain::error::ApiError;
use crate::domain::passwords::{HashError, Passwords};
use crate::domain::privacy;
use crate::domain::throttle::{LoginThrottle, Refusal, SignupLimit};
use crate::ids::{now_unix_ms, IdGen};
use crate::store::records::{DeviceRecord, Privacy, UserRecord};
use crate::store::Store;

/// Most devices one user may have logged in at once; a login past it evicts the device
/// used least recently.
pub const MAX_DEVICES: usize = 32;
/// Longest time between two stores of a device's `last_used`.
const MAX_TOUCH_INTERVAL: Duration = Duration::from_secs(3600);
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
    /// Which webhook targets may be registered (public addresses only by default).
    push_targets: Arc<crate::domain::push::TargetPolicy>,
    /// A device unused for this long is removed.
    device_idle: Duration,
    passwords: Passwords,
    /// Login failures by username and source. A `parking_lot` mutex: held for a map lookup
    /// or update, never across an await.
    throttle: parking_lot::Mutex<LoginThrottle>,
    /// Signups by source (same locking as `throttle`).
    signups: parking_lot::Mutex<SignupLimit>,
    failure_log: LogGate,
}

/// How stale a device's stored `last_used` may get before a use stores it again: an hour, or
/// an eighth of the idle lifetime if that is shorter (so a device in use never expires).
pub fn touch_interval(device_idle: Duration) -> Duration {
    MAX_TOUCH_INTERVAL.min(device_idle / 8)
}

/// Whether `d` was unused for `idle` at `now` (Unix ms).
fn idle(d: &DeviceRecord, idle: Duration, now: u64) -> bool {
    d.last_used.saturating_add(idle.as_millis() as u64) <= now
}

/// Removes the devices used least recently until a new one fits under [`MAX_DEVICES`];
/// returns their ids.
fn make_room(rec: &mut UserRecord) -> Vec<DeviceId> {
    let mut gone = Vec::new();
    while rec.devices.len() >= MAX_DEVICES {
        let Some(oldest) = rec
            .devices
            .iter()
            .min_by_key(|d| (d.last_used, d.created_at))
            .map(|d| d.device_id)
        else {
            break;
        };
        rec.devices.retain(|d| d.device_id != oldest);
        gone.push(oldest);
    }
    gone
}

/// Removes `rec`'s devices unused for `idle_for`; returns their ids.
fn expire_idle(rec: &mut UserRecord, idle_for: Duration, now: u64) -> Vec<DeviceId> {
    let gone: Vec<DeviceId> = rec
        .devices
        .iter()
        .filter(|d| idle(d, idle_for, now))
        .map(|d| d.device_id)
        .collect();
    rec.devices.retain(|d| !gone.contains(&d.device_id));
    gone
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
        device_idle: Duration,
        limits: &LoginLimits,
    ) -> Self {
        Accounts {
            store,
            tokens,
            ids,
            delivery,
            token_ttl,
            push_targets: Arc::default(),
            device_idle,
            passwords: Passwords::new(limits.hash_workers, limits.hash_queue),
            throttle: parking_lot::Mutex::new(LoginThrottle::new(limits)),
            signups: parking_lot::Mutex::new(SignupLimit::new(limits.signups_per_ip_per_hour)),
            failure_log: LogGate::default(),
        }
    }

    /// Closes the connections of devices that were removed (expired or evicted) everywhere.
    fn close_removed(&self, user: UserId, removed: &[(DeviceId, &'static str)]) {
        for &(device, why) in removed {
            metrics::counter!("accounts_devices_removed_total", "why" => why).increment(1);
            tracing::info!(%user, %device, why, "device removed");
            self.delivery.close_device(user, device, "logged out");
        }
    }

    /// Checks webhook targets against `policy` (the default allows public addresses only).
    pub fn with_push_targets(mut self, policy: Arc<crate::domain::push::TargetPolicy>) -> Self {
        self.push_targets = policy;
        self
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
            privacy: Privacy::default(),
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
        let idle_for = self.device_idle;
        // Devices this login removed (the closure may run again on contention: reset each time).
        let mut removed: Vec<(DeviceId, &'static str)> = Vec::new();
        let rec = self
            .store
            .update_user(user_id, |rec| {
                removed.clear();
                rec.token_counter += 1;
                let token_id = rec.token_counter;
                for gone in expire_idle(rec, idle_for, now) {
                    if gone != device_id {
                        removed.push((gone, "idle"));
                    }
                }
                if let Some(d) = rec.devices.iter_mut().find(|d| d.device_id == device_id) {
                    d.token_id = token_id;
                    d.last_used = now;
                    return Ok::<_, ApiError>(());
                }
                for gone in make_room(rec) {
                    removed.push((gone, "evicted"));
                }
                rec.devices.push(DeviceRecord {
                    device_id,
                    name: device_name.clone(),
                    token_id,
                    created_at: now,
                    push_target: None,
                    last_used: now,
                });
                Ok(())
            })
            .await?
            .ok_or_else(refused)?;
        self.close_removed(user_id, &removed);
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

    /// Removes `user`'s `device` (its token stops working everywhere) and closes its
    /// connections. `Ok(false)` if the user had no such device.
    async fn remove_device(
        &self,
        user: UserId,
        device: DeviceId,
        why: &'static str,
    ) -> Result<bool, ApiError> {
        let mut found = false;
        self.store
            .update_user(user, |rec| {
                found = rec.devices.iter().any(|d| d.device_id == device);
                rec.devices.retain(|d| d.device_id != device);
                Ok::<_, ApiError>(())
            })
            .await?;
        if found {
            self.close_removed(user, &[(device, why)]);
        }
        Ok(found)
    }

    /// Notes that `user`'s `device` was used at `now`. Best effort: a failure only means the
    /// device looks idle a little longer, so it is logged, not returned.
    async fn touch(&self, user: UserId, device: DeviceId, now: u64) {
        let stored = self
            .store
            .update_user(user, |rec| {
                if let Some(d) = rec.devices.iter_mut().find(|d| d.device_id == device) {
                    d.last_used = d.last_used.max(now);
                }
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
        if let Err(e) = stored {
            tracing::debug!(%user, %device, error = %e, "could not note a device's use");
        }
    }

    /// The caller's logged-in devices (idle ones that are due to expire left out).
    pub async fn devices(&self, who: Identity) -> Result<Vec<DeviceInfo>, ApiError> {
        let rec = self
            .store
            .user(who.user)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the token's user does not exist"))?;
        let now = now_unix_ms();
        Ok(rec
            .devices
            .iter()
            .filter(|d| !idle(d, self.device_idle, now))
            .map(|d| DeviceInfo {
                device_id: d.device_id,
                name: d.name.clone(),
                created_at: d.created_at,
                last_seen: d.last_used,
                current: d.device_id == who.device,
                push: d.push_target.is_some(),
            })
            .collect())
    }

    /// Logs out one of the caller's devices (any of them, the calling one included): its
    /// token stops working on every node and its connections everywhere are closed.
    pub async fn revoke_device(&self, who: Identity, device: DeviceId) -> Result<(), ApiError> {
        if self.remove_device(who.user, device, "revoked").await? {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "you have no logged-in device {device}"
            )))
        }
    }

    /// The caller's privacy settings.
    pub async fn privacy(&self, who: Identity) -> Result<PrivacySettings, ApiError> {
        let rec = self
            .store
            .user(who.user)
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        Ok(privacy::to_wire(rec.privacy))
    }

    /// Changes the caller's privacy settings named in `patch`.
    pub async fn set_privacy(
        &self,
        who: Identity,
        patch: PrivacyPatch,
    ) -> Result<PrivacySettings, ApiError> {
        let rec = self
            .store
            .update_user(who.user, |rec| {
                if let Some(a) = patch.messages {
                    rec.privacy.messages = privacy::audience_from_wire(a);
                }
                if let Some(a) = patch.group_adds {
                    rec.privacy.group_adds = privacy::audience_from_wire(a);
                }
                Ok::<_, ApiError>(())
            })
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        Ok(privacy::to_wire(rec.privacy))
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
        let device = rec
            .devices
            .iter()
            .find(|d| d.device_id == claims.device && d.token_id == claims.token_id)
            .ok_or_else(|| ApiError::unauthorized("the token was revoked"))?;
        let now = now_unix_ms();
        if idle(device, self.device_idle, now) {
            self.remove_device(claims.user, claims.device, "idle")
                .await?;
            return Err(ApiError::unauthorized(
                "the device was unused too long and was logged out; log in again",
            ));
        }
        let touch = touch_interval(self.device_idle).as_millis() as u64;
        if device.last_used.saturating_add(touch) <= now {
            self.touch(claims.user, claims.device, now).await;
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
        crate::domain::push::validate_target(&self.push_targets, &target)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn user_with(devices: &[(u64, u64)]) -> UserRecord {
        UserRecord {
            user_id: UserId(1),
            username: "a".into(),
            display_name: "a".into(),
            password_hash: String::new(),
            created_at: 0,
            last_seen: 0,
            devices: devices
                .iter()
                .map(|&(id, last_used)| DeviceRecord {
                    device_id: DeviceId(id),
                    name: String::new(),
                    token_id: id,
                    created_at: 0,
                    push_target: None,
                    last_used,
                })
                .collect(),
            token_counter: 0,
            privacy: Privacy::default(),
        }
    }

    #[test]
    fn the_cap_evicts_the_least_recently_used_device() {
        let mut devices: Vec<(u64, u64)> = (0..MAX_DEVICES as u64).map(|i| (i, 100 + i)).collect();
        devices[7].1 = 5; // device 7 was used least recently
        let mut rec = user_with(&devices);
        assert_eq!(make_room(&mut rec), vec![DeviceId(7)]);
        assert_eq!(rec.devices.len(), MAX_DEVICES - 1);
        // Under the cap nothing goes.
        assert!(make_room(&mut rec).is_empty());
    }

    #[test]
    fn idle_devices_expire_and_used_ones_stay() {
        let day = 24 * 3600 * 1000;
        let mut rec = user_with(&[(1, 0), (2, 89 * day), (3, 10 * day)]);
        let gone = expire_idle(&mut rec, Duration::from_secs(90 * 24 * 3600), 99 * day);
        assert_eq!(gone, vec![DeviceId(1)]);
        let left: Vec<u64> = rec.devices.iter().map(|d| d.device_id.0).collect();
        assert_eq!(left, vec![2, 3]);
        // A device in use is noted often enough never to look idle.
        let idle_for = Duration::from_secs(8);
        assert!(touch_interval(idle_for) <= idle_for / 8);
        assert_eq!(
            touch_interval(Duration::from_secs(90 * 24 * 3600)),
            MAX_TOUCH_INTERVAL
        );
    }
}
