//! Push notifications for offline users: jobs go into the durable outbox with the message
//! (see `Store::store_message`); this worker POSTs each to its webhook with a timeout, retries
//! with capped exponential backoff, and dead-letters after the last attempt. It runs beside
//! chat delivery and never blocks it: a slow webhook only occupies one of the worker's slots.

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
use crate::store::records::PushJob;
use crate::store::Store;

/// Characters of the body a notification carries.
pub const PREVIEW_CHARS: usize = 100;
/// Deliveries in flight at once.
const MAX_CONCURRENT: usize = 16;
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest accepted webhook URL.
pub const MAX_TARGET_BYTES: usize = 2048;

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
    wake: Notify,
}

/// Checks a webhook target before it is stored.
pub fn validate_target(target: &str) -> Result<(), ApiError> {
    let ok = target.len() <= MAX_TARGET_BYTES
        && (target.starts_with("http://") || target.starts_with("https://"))
        && reqwest::Url::parse(target).is_ok_and(|u| u.host().is_some());
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "target must be an http:// or https:// URL of at most {MAX_TARGET_BYTES} bytes"
        )))
    }
}

impl Push {
    pub fn new(store: Store, ids: Arc<IdGen>, cfg: PushConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Push {
            store,
            ids,
            cfg,
            http,
            wake: Notify::new(),
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
        let result = self.http.post(&job.target).json(&body).send().await;
        let failure = match result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status())),
            Err(e) => Some(e.to_string()),
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
                    tracing::warn!(recipient = %job.recipient, target = %job.target, attempts = job.attempts, %why, "push dead-lettered");
                    self.store.finish_push(key, None).await
                } else {
                    let due = now_unix_ms() + self.backoff(job.attempts - 1).as_millis() as u64;
                    tracing::debug!(target = %job.target, attempts = job.attempts, %why, "push failed; will retry");
                    self.store.finish_push(key, Some((&job, due))).await
                }
            }
        };
        if let Err(e) = outcome {
            tracing::error!(error = %e, "cannot update the push outbox");
        }
    }
}
