//! Push notifications for offline users: jobs go into the durable outbox with the message
//! (see `Store::store_message`); this worker POSTs each to its webhook with a timeout, retries
//! with capped exponential backoff, and dead-letters after the last attempt. It runs beside
//! chat delivery and never blocks it: a slow webhook only occupies one of the worker's slots.
//!
//! Targets are restricted to public addresses unless the operator allows more ([`target`]),
//! checked at registration and again, on every resolved address, at send time. Every POST
//! is signed: `X-Chat-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>." + body)>`
//! (the key: `--push-signing-secret`, or one derived from the cluster secret, printed by
//! `chatnode certs push-secret`). A receiver recomputes the HMAC over the timestamp, a dot
//! and the raw body, compares in constant time, and refuses timestamps older than a few
//! minutes. Logs name a target by scheme and host only.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use client_proto::ids::UserId;
use client_proto::Message;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub use crate::config::PushConfig;
use crate::domain::error::ApiError;
use crate::ids::{now_unix_ms, IdGen};
use crate::logging::RateLimitedLog;
use crate::store::records::PushJob;
use crate::store::Store;

pub mod target;

use target::{redacted, GuardedResolver};
pub use target::{TargetError, TargetPolicy, MAX_TARGET_BYTES};

/// The header that carries a notification's signature.
pub const SIGNATURE_HEADER: &str = "x-chat-signature";

/// Characters of the body a notification carries.
pub const PREVIEW_CHARS: usize = 100;
/// Deliveries in flight at once.
const MAX_CONCURRENT: usize = 16;
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a POST did not succeed.
enum Failure {
    /// The target is not allowed (never retried).
    Refused(TargetError),
    /// Anything else (retried).
    Other(String),
}

/// The JSON body POSTed to a webhook.
#[derive(Serialize, Debug)]
pub struct Notification<'a> {
    pub recipient: UserId,
    pub device_id: client_proto::DeviceId,
    pub conversation: client_proto::ConversationId,
    pub sender: UserId,
    pub message_id: client_proto::MessageId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<&'a str>,
    pub ts: u64,
}

/// The push service.
pub struct Push {
    store: Store,
    ids: Arc<IdGen>,
    cfg: PushConfig,
    http: reqwest::Client,
    policy: Arc<TargetPolicy>,
    signing: hmac::Hmac<sha2::Sha256>,
    wake: Notify,
    /// Repeated failure warnings, rate limited.
    warn_limit: RateLimitedLog,
}

/// Checks a webhook target before it is stored.
pub fn validate_target(policy: &TargetPolicy, target: &str) -> Result<(), ApiError> {
    policy
        .check_url(target)
        .map(drop)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 over "<t>." and the body>`.
pub fn signature(mac: &hmac::Hmac<sha2::Sha256>, unix_secs: u64, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = mac.clone();
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_secs},v1={hex}")
}

/// The default signing secret: derived from the cluster secret, so every node of a cluster
/// signs with the same key (`chatnode certs push-secret` prints it). Like a
/// `--push-signing-secret`, the HMAC key is this text's bytes.
pub fn derive_signing_key(cluster_secret: &[u8]) -> String {
    crate::domain::auth::derive_hex(cluster_secret, b"chatnode push signing v1")
}

impl Push {
    /// The push service; targets are checked against `policy` and POSTs signed with
    /// `signing_key`.
    pub fn new(
        store: Store,
        ids: Arc<IdGen>,
        cfg: PushConfig,
        policy: Arc<TargetPolicy>,
        signing_key: &[u8],
    ) -> Self {
        use hmac::Mac;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve (and reach) the target itself, past the policy.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .build()
            .unwrap_or_default();
        let signing = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(signing_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        Push {
            store,
            ids,
            cfg,
            http,
            policy,
            signing,
            wake: Notify::new(),
            warn_limit: RateLimitedLog::new(5, Duration::from_secs(10)),
        }
    }

    /// One job per registered target of each of `offline` (who get `msg` but have no device
    /// connected).
    pub async fn jobs_for(
        &self,
        msg: &Message,
        offline: &[UserId],
    ) -> Result<Vec<PushJob>, ApiError> {
        let preview: Option<String> = self
            .cfg
            .preview
            .then(|| msg.body.chars().take(PREVIEW_CHARS).collect());
        let mut jobs = Vec::new();
        for &user in offline {
            let Some(rec) = self.store.user(user).await? else {
                continue;
            };
            for dev in &rec.devices {
                let Some(target) = &dev.push_target else {
                    continue;
                };
                jobs.push(PushJob {
                    job_id: self.ids.next()?.0,
                    recipient: user,
                    device_id: dev.device_id,
                    target: target.clone(),
                    conversation: msg.conversation,
                    sender: msg.from,
                    message_id: msg.message_id,
                    preview: preview.clone(),
                    ts: msg.ts,
                    attempts: 0,
                });
            }
        }
        Ok(jobs)
    }

    /// Tells the worker that jobs were queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let exp = self.cfg.retry_base.saturating_mul(1u32 << attempts.min(20));
        let base = exp.min(MAX_BACKOFF);
        base + base.mul_f64(rand::thread_rng().gen_range(0.0..0.25))
    }

    /// Starts the worker; it stops when `shutdown` is cancelled (jobs in flight stay queued
    /// and are sent after the next start).
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut running: JoinSet<Vec<u8>> = JoinSet::new();
            let mut inflight: HashSet<Vec<u8>> = HashSet::new();
            loop {
                if running.len() < MAX_CONCURRENT {
                    match this.store.due_pushes(now_unix_ms(), MAX_CONCURRENT * 4) {
                        Ok(due) => {
                            for (key, job) in due {
                                if running.len() >= MAX_CONCURRENT {
                                    break;
                                }
                                if inflight.insert(key.clone()) {
                                    let worker = this.clone();
                                    running.spawn(async move {
                                        worker.deliver(&key, job).await;
                                        key
                                    });
                                }
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot read the push outbox"),
                    }
                }
                metrics::gauge!("push_outbox_pending").set(this.store.pending_pushes() as f64);
                let next = this
                    .store
                    .next_push_due()
                    .ok()
                    .flatten()
                    .unwrap_or(u64::MAX);
                let wait = Duration::from_millis(next.saturating_sub(now_unix_ms()).min(1_000));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(wait), if running.len() < MAX_CONCURRENT => {}
                    Some(done) = running.join_next(), if !running.is_empty() => {
                        if let Ok(key) = done {
                            inflight.remove(&key);
                        }
                    }
                }
            }
            running.shutdown().await;
        })
    }

    /// Checks the target, then POSTs the signed body. Host names are checked as they are
    /// resolved ([`GuardedResolver`]); IP literals, which are not resolved, here.
    async fn post(&self, target: &str, body: &Notification<'_>) -> Result<(), Failure> {
        let url = self.policy.check_url(target).map_err(Failure::Refused)?;
        let bytes = serde_json::to_vec(body).map_err(|e| Failure::Other(e.to_string()))?;
        let sig = signature(&self.signing, now_unix_ms() / 1000, &bytes);
        let result = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sig)
            .body(bytes)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(Failure::Other(format!("HTTP {}", r.status()))),
            Err(e) => {
                // The resolver's refusal is somewhere in the error's sources.
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(s) = source {
                    if let Some(refused) = s.downcast_ref::<TargetError>() {
                        return Err(Failure::Refused(refused.clone()));
                    }
                    source = s.source();
                }
                // reqwest's error text includes the URL: keep the scheme and host only.
                Err(Failure::Other(e.without_url().to_string()))
            }
        }
    }

    /// Sends one job and records the outcome in the outbox.
    async fn deliver(&self, key: &[u8], mut job: PushJob) {
        let body = Notification {
            recipient: job.recipient,
            device_id: job.device_id,
            conversation: job.conversation,
            sender: job.sender,
            message_id: job.message_id,
            preview: job.preview.as_deref(),
            ts: job.ts,
        };
        let host = redacted(&job.target);
        let failure = match self.post(&job.target, &body).await {
            Ok(()) => None,
            Err(Failure::Refused(e)) => {
                // Permanent until the operator's policy changes: no retries.
                metrics::counter!("push_refused_total").increment(1);
                if let Some(suppressed) = self.warn_limit.allow() {
                    tracing::warn!(recipient = %job.recipient, target = %host, error = %e, suppressed, "push target refused");
                }
                job.attempts = self.cfg.max_attempts.saturating_sub(1);
                Some(e.to_string())
            }
            Err(Failure::Other(why)) => Some(why),
        };
        let outcome = match failure {
            None => {
                metrics::counter!("push_sent_total").increment(1);
                tracing::debug!(recipient = %job.recipient, message = %job.message_id, "push delivered");
                self.store.finish_push(key, None).await
            }
            Some(why) => {
                job.attempts += 1;
                metrics::counter!("push_failures_total").increment(1);
                if job.attempts >= self.cfg.max_attempts {
                    metrics::counter!("push_dead_letters_total").increment(1);
                    if let Some(suppressed) = self.warn_limit.allow() {
                        tracing::warn!(recipient = %job.recipient, target = %host, attempts = job.attempts, %why, suppressed, "push dead-lettered");
                    }
                    self.store.finish_push(key, None).await
                } else {
                    let due = now_unix_ms() + self.backoff(job.attempts - 1).as_millis() as u64;
                    tracing::debug!(target = %host, attempts = job.attempts, %why, "push failed; will retry");
                    self.store.finish_push(key, Some((&job, due))).await
                }
            }
        };
        if let Err(e) = outcome {
            tracing::error!(error = %e, "cannot update the push outbox");
        }
    }
}
