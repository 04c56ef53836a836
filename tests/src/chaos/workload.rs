//! The workload: U users with two devices each and G groups, every device a `ChatClient` of
//! its own on a node chosen round-robin (with every node listed for `/v1/discover`, so it
//! moves when its node dies), and users sending at a total rate.
//!
//! Each user sends one message at a time (the next starts after the previous one's ack or
//! final failure, so per-sender order can be checked), from one of its devices, to a random
//! other user or to one of its groups, with a body naming the seed, the user and the sequence
//! number. Every send goes through `ChatClient::send` (which retries with the same client id
//! across reconnects and after `unavailable`) under a timeout; the outcome and every event
//! each device reports go to the [`Recorder`].
//!
//! A device's task owns its `ChatClient` and records its events as they come, while its
//! sends wait for their acks on their own (through a `ChatSender`): receive times are when
//! the device got the message, even while one of its own sends hangs.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use client_proto::client::{ChatClient, ClientError, ClientOptions, HttpClient};
use client_proto::http::LoginResponse;
use client_proto::{ConversationId, GroupId, Recipient, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::history::{self, Outcome, Target};
use super::recorder::Recorder;

/// Devices per user.
pub const DEVICES_PER_USER: usize = 2;
/// The share of sends that go to a group, for users in one.
const GROUP_SHARE: f64 = 0.3;
/// The longest wait between a device's reconnect attempts (the library's default is 30 s;
/// shorter keeps the catch-up wait of short runs short).
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The workload's shape.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub users: usize,
    pub groups: usize,
    pub group_size: usize,
    /// Sends per second, all users together.
    pub rate: f64,
    /// A send with no ack by then is indeterminate.
    pub send_timeout: Duration,
    /// Every n-th send of a user (0: none) has a body of [`LARGE_BODY_BYTES`], which the node
    /// does not copy into the inboxes: their entries refer to the history entry.
    pub large_body_every: u64,
}

/// The size of a large body: above the node's default `--inline-body-bytes` (4096).
pub const LARGE_BODY_BYTES: usize = 5_000;

/// One send for a device's task to make.
struct SendJob {
    to: Recipient,
    body: String,
    timeout: Duration,
    reply: oneshot::Sender<Outcome>,
}

/// A running workload.
pub struct Workload {
    cfg: WorkloadConfig,
    rec: Recorder,
    user_ids: Vec<UserId>,
    group_ids: Vec<GroupId>,
    /// Per user, the groups (indices) it is in.
    groups_of: Vec<Vec<usize>>,
    logins: Vec<LoginResponse>,
    jobs: Vec<mpsc::Sender<SendJob>>,
    devices: Vec<JoinHandle<()>>,
    stop_devices: watch::Sender<bool>,
}

impl Workload {
    /// Signs the users up, logs their devices in, makes the groups, starts every device's
    /// `ChatClient` and waits until all are connected.
    pub async fn setup(cfg: WorkloadConfig, http: &[String], rec: Recorder) -> Result<Workload> {
        if http.is_empty() || cfg.users < 2 {
            bail!("the workload needs a node and at least 2 users");
        }
        let n = http.len();
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x776f_726b_6c6f_6164);
        // Users and their devices, a few at a time.
        let mut accounts: Vec<(UserId, String, Vec<LoginResponse>)> = Vec::new();
        for chunk in (0..cfg.users).collect::<Vec<_>>().chunks(8) {
            let batch = chunk
                .iter()
                .map(|&u| account(HttpClient::new(http[u % n].clone()), format!("user{u:03}")));
            for a in futures_util::future::join_all(batch).await {
                accounts.push(a?);
            }
        }
        // Groups: members drawn from the seed, the first one the owner.
        let size = cfg.group_size.min(cfg.users);
        let mut group_ids = Vec::new();
        let mut members_of = Vec::new();
        for g in 0..cfg.groups {
            let members = rand::seq::index::sample(&mut rng, cfg.users, size).into_vec();
            let ids: Vec<UserId> = members.iter().map(|&m| accounts[m].0).collect();
            let token = &accounts[members[0]].2[0].token;
            let api = HttpClient::new(http[g % n].clone());
            let name = format!("group{g}");
            let info = retry(|| api.create_group(token, &name, &ids[1..]))
                .await
                .with_context(|| format!("create group {g}"))?;
            group_ids.push(info.group_id);
            members_of.push(members);
        }
        let mut groups_of = vec![Vec::new(); cfg.users];
        for (g, members) in members_of.iter().enumerate() {
            for &m in members {
                groups_of[m].push(g);
            }
        }
        let logins: Vec<LoginResponse> = accounts.iter().flat_map(|a| a.2.clone()).collect();
        rec.setup(|h| {
            for (u, (id, name, _)) in accounts.iter().enumerate() {
                h.users.push(history::User {
                    id: *id,
                    name: name.clone(),
                    devices: (0..DEVICES_PER_USER)
                        .map(|k| u * DEVICES_PER_USER + k)
                        .collect(),
                });
            }
            for (d, login) in logins.iter().enumerate() {
                h.devices.push(history::Device {
                    user: d / DEVICES_PER_USER,
                    device_id: login.device_id,
                    first_node: d % n,
                });
            }
            for (g, members) in members_of.iter().enumerate() {
                h.groups.push(history::Group {
                    id: group_ids[g],
                    members: members.clone(),
                });
            }
        });
        // Devices.
        let (stop_devices, stop_rx) = watch::channel(false);
        let mut jobs = Vec::new();
        let mut devices = Vec::new();
        for (d, login) in logins.iter().enumerate() {
            let mut opts =
                ClientOptions::new(HttpClient::new(http[d % n].clone()).ws_url(), &login.token);
            opts.discover = http.to_vec();
            opts.max_backoff = MAX_BACKOFF;
            let client = ChatClient::start(opts);
            let (tx, rx) = mpsc::channel(4);
            jobs.push(tx);
            devices.push(tokio::spawn(device_loop(
                d,
                client,
                rx,
                rec.clone(),
                stop_rx.clone(),
            )));
        }
        let w = Workload {
            user_ids: accounts.iter().map(|a| a.0).collect(),
            cfg,
            rec,
            group_ids,
            groups_of,
            logins,
            jobs,
            devices,
            stop_devices,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !w.rec.all_connected() {
            if tokio::time::Instant::now() > deadline {
                let p = w.rec.progress();
                bail!(
                    "only {} of {} devices connected within 60 s",
                    p.connected,
                    p.devices
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(w)
    }

    /// A token of user `u`'s first device (for the final reads).
    pub fn token(&self, u: usize) -> Option<&str> {
        self.logins
            .get(u * DEVICES_PER_USER)
            .map(|l| l.token.as_str())
    }

    /// Starts every user's sending loop; they stop starting sends once `stop` turns true and
    /// end when their last send has ended.
    pub fn start_senders(&self, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        (0..self.user_ids.len())
            .map(|u| {
                let sender = UserLoop {
                    u,
                    cfg: self.cfg.clone(),
                    user_ids: self.user_ids.clone(),
                    group_ids: self.group_ids.clone(),
                    groups: self.groups_of[u].clone(),
                    devices: (0..DEVICES_PER_USER)
                        .map(|k| u * DEVICES_PER_USER + k)
                        .filter_map(|d| self.jobs.get(d).map(|j| (d, j.clone())))
                        .collect(),
                    rec: self.rec.clone(),
                };
                tokio::spawn(sender.run(stop.clone()))
            })
            .collect()
    }

    /// Stops every device (its `ChatClient` shuts down) and waits for them.
    pub async fn stop_devices(self) {
        let _ = self.stop_devices.send(true);
        for d in self.devices {
            if tokio::time::timeout(Duration::from_secs(10), d)
                .await
                .is_err()
            {
                self.rec.note("a device task did not stop within 10 s");
            }
        }
    }
}

/// Signs `name` up and logs in its devices.
async fn account(api: HttpClient, name: String) -> Result<(UserId, String, Vec<LoginResponse>)> {
    let password = format!("password-{name}");
    let id = retry(|| api.signup(&name, &password))
        .await
        .with_context(|| format!("sign {name} up through {}", api.base()))?
        .user_id;
    let mut logins = Vec::new();
    for _ in 0..DEVICES_PER_USER {
        logins.push(
            retry(|| api.login(&name, &password, None))
                .await
                .with_context(|| format!("log {name} in through {}", api.base()))?,
        );
    }
    Ok((id, name, logins))
}

/// Retries a setup call a few times while the cluster reports `unavailable` or the transport
/// fails (a fresh cluster may still be settling).
async fn retry<T, F, Fut>(mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e)
                if tries < 10
                    && matches!(e.code(), Some(client_proto::ErrorCode::Unavailable) | None) =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}

/// One device: records its events, and makes the sends its user hands it. A send waits for
/// its ack on its own (through the client's `ChatSender`), so the device keeps recording
/// what it receives meanwhile.
async fn device_loop(
    device: usize,
    mut client: ChatClient,
    mut jobs: mpsc::Receiver<SendJob>,
    rec: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let sender = client.sender();
    let mut sending = futures_util::stream::FuturesUnordered::new();
    let mut listening = true;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            event = client.next_event(), if listening => match event {
                Some(event) => rec.event(device, event),
                None => {
                    rec.note(format!("device {device}: its ChatClient stopped for good"));
                    listening = false;
                }
            },
            Some(()) = futures_util::StreamExt::next(&mut sending), if !sending.is_empty() => {}
            job = jobs.recv(), if open => match job {
                Some(job) => {
                    let sender = sender.clone();
                    sending.push(async move {
                        let answer =
                            tokio::time::timeout(job.timeout, sender.send(job.to, job.body)).await;
                        let outcome = match answer {
                            Ok(Ok(ack)) => Outcome::Acked {
                                message_id: ack.message_id,
                                conversation: ack.conversation,
                                ts: ack.ts,
                            },
                            Ok(Err(ClientError::Refused(body))) => Outcome::Refused {
                                code: body.code,
                                message: body.message,
                            },
                            Ok(Err(e)) => Outcome::Indeterminate { reason: e.to_string() },
                            Err(_) => Outcome::Indeterminate {
                                reason: format!("no answer within {:?}", job.timeout),
                            },
                        };
                        // The user loop may have given up waiting; nothing to tell then.
                        let _ = job.reply.send(outcome);
                    });
                }
                None => open = false,
            },
        }
    }
    client.shutdown().await;
}

/// One user's sending loop.
struct UserLoop {
    u: usize,
    cfg: WorkloadConfig,
    user_ids: Vec<UserId>,
    group_ids: Vec<GroupId>,
    /// The groups (indices) this user is in.
    groups: Vec<usize>,
    /// (device index, its job queue) of this user's devices.
    devices: Vec<(usize, mpsc::Sender<SendJob>)>,
    rec: Recorder,
}

impl UserLoop {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let u = self.u;
        // Each user's choices come from a stream of its own: the same seed makes the same
        // choices whatever the timing.
        let salt = (u as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = StdRng::seed_from_u64(self.cfg.seed ^ salt);
        let per_user = (self.cfg.rate / self.user_ids.len() as f64).max(1e-3);
        let interval = Duration::from_secs_f64(1.0 / per_user);
        let mut next = tokio::time::Instant::now() + interval.mul_f64(rng.gen::<f64>());
        let mut seq = 0u64;
        while !*stop.borrow() {
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            let to = if !self.groups.is_empty() && rng.gen_bool(GROUP_SHARE) {
                Target::Group(self.groups[rng.gen_range(0..self.groups.len())])
            } else {
                let other = rng.gen_range(0..self.user_ids.len() - 1);
                Target::User(if other >= u { other + 1 } else { other })
            };
            let Some((device, queue)) = self.devices.get(rng.gen_range(0..self.devices.len()))
            else {
                return;
            };
            let (recipient, conversation) = match to {
                Target::User(v) => (
                    Recipient::User(self.user_ids[v]),
                    ConversationId::direct(self.user_ids[u], self.user_ids[v]),
                ),
                Target::Group(g) => (
                    Recipient::Group(self.group_ids[g]),
                    ConversationId::Group(self.group_ids[g]),
                ),
            };
            let mut body = format!("chaos seed={} user={u} seq={seq}", self.cfg.seed);
            if self.cfg.large_body_every > 0 && seq.is_multiple_of(self.cfg.large_body_every) {
                body.push(' ');
                let pad = LARGE_BODY_BYTES.saturating_sub(body.len());
                body.extend(std::iter::repeat_n('x', pad));
            }
            let start_ms = self.rec.now_ms();
            self.rec.send_started();
            let (reply, answer) = oneshot::channel();
            let job = SendJob {
                to: recipient,
                body: body.clone(),
                timeout: self.cfg.send_timeout,
                reply,
            };
            let outcome = match queue.send(job).await {
                Ok(()) => answer.await.unwrap_or_else(|_| Outcome::Indeterminate {
                    reason: "the device task ended".into(),
                }),
                Err(_) => Outcome::Indeterminate {
                    reason: "the device task ended".into(),
                },
            };
            self.rec.send_ended(history::Send {
                user: u,
                device: *device,
                seq,
                body,
                to,
                conversation,
                start_ms,
                end_ms: self.rec.now_ms(),
                outcome,
            });
            seq += 1;
            next = (next + interval).max(tokio::time::Instant::now());
        }
    }
}
