//! Presence: who is online, and the fan-out of status transitions to watching devices.
//!
//! A user is online while any of their devices is connected (and heartbeating) anywhere. This
//! node counts its own devices per user and publishes the 0↔1 transitions to a [`Directory`]
//! (in a cluster: the user's home replicas, `cluster::directory`), which knows who has
//! devices on other nodes. The users local connections watch are watched in the directory
//! too (the first watcher here subscribes, the last one leaving unsubscribes). Local
//! transitions and the directory's reports of remote ones mark users in a [`Feed`]; one
//! fan-out task re-reads each marked user's status and sends the transitions as `presence`
//! frames to the local watchers only.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use client_proto::http::PresenceInfo;
use client_proto::ids::UserId;
use client_proto::{PresenceStatus, ServerFrame};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::hub::Outbound;
use crate::ids::now_unix_ms;
use crate::store::Store;

/// Most users one connection may watch (friends included).
pub const MAX_WATCHED_PER_CONNECTION: usize = 5_000;

/// The granularity of the `last_seen` times others see: a watcher learns when someone came
/// or went to the minute, not to the millisecond.
pub const LAST_SEEN_GRANULARITY_MS: u64 = 60_000;

/// `t` (Unix ms) rounded down to [`LAST_SEEN_GRANULARITY_MS`].
pub fn coarse(t: u64) -> u64 {
    t - t % LAST_SEEN_GRANULARITY_MS
}

/// A boxed future (the [`Directory`] port is used as a trait object).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where online users are known, cluster-wide.
pub trait Directory: Send + Sync {
    /// This node gained its first device of `user` (`true`) or lost its last one (`false`).
    fn publish(&self, user: UserId, online: bool);
    /// This node's connections started watching `users` (each named once per new
    /// watcher): keep their status current here and report changes to the feed.
    fn watch(&self, users: &[UserId]);
    /// A watcher of each of `users` left.
    fn unwatch(&self, users: &[UserId]);
    /// Whether `user` has a device connected to another live node, when known here
    /// (watched, or looked up before); `None` when not. (This node's own devices are
    /// counted by [`Presence`] itself, without the directory's lag.)
    fn online_elsewhere(&self, user: UserId) -> Option<bool>;
    /// Makes `users` known here (within a bounded wait; those still unknown after it
    /// count as offline).
    fn lookup<'a>(&'a self, users: &'a [UserId]) -> BoxFuture<'a, ()>;
}

/// Users whose status may have changed, coalesced per user (only the latest matters), so
/// the backlog is bounded by the number of users, not the number of changes.
#[derive(Default)]
pub struct Feed {
    pending: Mutex<HashMap<UserId, (PresenceStatus, u64)>>,
    wake: Notify,
}

impl Feed {
    /// Records that `user` is now `status` (at `at`, Unix ms).
    pub fn push(&self, user: UserId, status: PresenceStatus, at: u64) {
        self.pending.lock().insert(user, (status, at));
        self.wake.notify_one();
    }

    /// Takes everything pending.
    pub fn take(&self) -> HashMap<UserId, (PresenceStatus, u64)> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Resolves when something was pushed.
    pub async fn notified(&self) {
        self.wake.notified().await
    }
}

struct Watcher {
    tx: mpsc::Sender<Outbound>,
    kick: CancellationToken,
}

#[derive(Default)]
struct Watchers {
    /// watched user → watching connection → its queue
    by_user: HashMap<UserId, HashMap<u64, Watcher>>,
    /// connection → users it watches
    by_conn: HashMap<u64, HashSet<UserId>>,
}

/// The presence service.
pub struct Presence {
    directory: Arc<dyn Directory>,
    feed: Arc<Feed>,
    local_devices: Mutex<HashMap<UserId, usize>>,
    watchers: RwLock<Watchers>,
    store: Store,
}

impl Presence {
    pub fn new(directory: Arc<dyn Directory>, feed: Arc<Feed>, store: Store) -> Self {
        Presence {
            directory,
            feed,
            local_devices: Mutex::default(),
            watchers: RwLock::default(),
            store,
        }
    }

    /// A device of `user` connected to this node.
    pub fn device_up(&self, user: UserId) {
        let mut devices = self.local_devices.lock();
        let n = devices.entry(user).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.directory.publish(user, true);
            self.feed.push(user, PresenceStatus::Online, now_unix_ms());
        }
    }

    /// A device of `user` left this node (closed or timed out). When it was the last one, the
    /// user's last_seen is stored.
    pub async fn device_down(&self, user: UserId) {
        let last = {
            let mut devices = self.local_devices.lock();
            let n = devices.entry(user).or_insert(1);
            *n -= 1;
            if *n == 0 {
                devices.remove(&user);
                self.directory.publish(user, false);
                self.feed.push(user, PresenceStatus::Offline, now_unix_ms());
                true
            } else {
                false
            }
        };
        if last {
            let now = now_unix_ms();
            let saved = self
                .store
                .update_user(user, |rec| {
                    rec.last_seen = rec.last_seen.max(now);
                    Ok::<_, crate::store::StoreError>(())
                })
                .await;
            if let Err(e) = saved {
                tracing::warn!(%user, error = %e, "could not store last_seen");
            }
        }
    }

    /// Whether `user` is online anywhere (asking the directory when it does not know).
    pub async fn is_online(&self, user: UserId) -> bool {
        if self.local_devices.lock().contains_key(&user) {
            return true;
        }
        if let Some(online) = self.directory.online_elsewhere(user) {
            return online;
        }
        self.directory.lookup(&[user]).await;
        self.directory.online_elsewhere(user).unwrap_or(false)
    }

    /// Makes those of `users` this node knows nothing of known (one directory lookup for
    /// all of them), so that reading their status next costs no request each.
    pub async fn look_up(&self, users: &[UserId]) {
        let unknown: Vec<UserId> = users
            .iter()
            .copied()
            .filter(|u| {
                !self.local_devices.lock().contains_key(u)
                    && self.directory.online_elsewhere(*u).is_none()
            })
            .collect();
        if !unknown.is_empty() {
            self.directory.lookup(&unknown).await;
        }
    }

    /// Those of `users` with no device connected anywhere (one directory lookup for all
    /// those not known here).
    pub async fn offline_among(&self, users: &[UserId]) -> Vec<UserId> {
        self.look_up(users).await;
        users
            .iter()
            .copied()
            .filter(|u| !self.is_online_known(*u))
            .collect()
    }

    /// Whether `user` is online, as far as this node knows now (its own devices, and the
    /// directory's picture of watched and looked-up users).
    fn is_online_known(&self, user: UserId) -> bool {
        // This node's own devices count at once; the directory may lag.
        self.local_devices.lock().contains_key(&user)
            || self.directory.online_elsewhere(user).unwrap_or(false)
    }

    /// The status of `user`, with last_seen from the user record (to the minute). Callers
    /// show it only to those who may see it (friends, group co-members).
    pub async fn status(&self, user: UserId) -> PresenceInfo {
        let online = self.is_online(user).await;
        let last_seen = self
            .store
            .user(user)
            .await
            .ok()
            .flatten()
            .map(|r| r.last_seen)
            .filter(|t| *t > 0);
        PresenceInfo {
            user_id: user,
            status: if online {
                PresenceStatus::Online
            } else {
                PresenceStatus::Offline
            },
            last_seen: if online {
                Some(coarse(now_unix_ms()))
            } else {
                last_seen.map(coarse)
            },
        }
    }

    /// Connection `conn` watches `users`. Returns false (and watches none of them) if that
    /// would pass the per-connection limit. Callers pass only users the connection's user
    /// may see (`Friends::visible`).
    pub fn watch(
        &self,
        conn: u64,
        tx: &mpsc::Sender<Outbound>,
        kick: &CancellationToken,
        users: &[UserId],
    ) -> bool {
        let mut w = self.watchers.write();
        let current = w.by_conn.get(&conn).map_or(0, HashSet::len);
        let new: Vec<UserId> = users
            .iter()
            .copied()
            .filter(|u| !w.by_conn.get(&conn).is_some_and(|s| s.contains(u)))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if current + new.len() > MAX_WATCHED_PER_CONNECTION {
            return false;
        }
        let mut first = Vec::new();
        for u in new {
            w.by_conn.entry(conn).or_default().insert(u);
            let watchers = w.by_user.entry(u).or_default();
            if watchers.is_empty() {
                first.push(u);
            }
            watchers.insert(
                conn,
                Watcher {
                    tx: tx.clone(),
                    kick: kick.clone(),
                },
            );
        }
        drop(w);
        if !first.is_empty() {
            self.directory.watch(&first);
        }
        true
    }

    /// Connection `conn` stops watching `users`.
    pub fn unwatch(&self, conn: u64, users: &[UserId]) {
        let mut w = self.watchers.write();
        let mut last = Vec::new();
        for u in users {
            let watched = w.by_conn.get_mut(&conn).is_some_and(|set| set.remove(u));
            if watched && remove_watcher(&mut w.by_user, *u, conn) {
                last.push(*u);
            }
        }
        drop(w);
        if !last.is_empty() {
            self.directory.unwatch(&last);
        }
    }

    /// Connection `conn` is gone: drop all its watches.
    pub fn forget(&self, conn: u64) {
        let mut w = self.watchers.write();
        let mut last = Vec::new();
        for u in w.by_conn.remove(&conn).unwrap_or_default() {
            if remove_watcher(&mut w.by_user, u, conn) {
                last.push(u);
            }
        }
        drop(w);
        if !last.is_empty() {
            self.directory.unwatch(&last);
        }
    }

    /// Starts the fan-out task: feed → `presence` frames for local watchers, one per watching
    /// connection per transition.
    pub fn spawn_fanout(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            // Users announced online (absent: offline), so only transitions go out.
            let mut announced: HashSet<UserId> = HashSet::new();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = this.feed.wake.notified() => {}
                }
                // The feed says who may have changed; the current state decides.
                for (user, (_, at)) in this.feed.take() {
                    let online = this.is_online_known(user);
                    let status = if online {
                        PresenceStatus::Online
                    } else {
                        PresenceStatus::Offline
                    };
                    let changed = if online {
                        announced.insert(user)
                    } else {
                        announced.remove(&user)
                    };
                    if changed {
                        this.announce(user, status, at);
                    }
                }
            }
        })
    }

    fn announce(&self, user: UserId, status: PresenceStatus, at: u64) {
        let frame = ServerFrame::Presence {
            user_id: user,
            status,
            last_seen: Some(coarse(at)),
        };
        let w = self.watchers.read();
        let mut sent = 0u64;
        // Watchers were checked when they started watching: friends and group co-members.
        for watcher in w.by_user.get(&user).into_iter().flat_map(HashMap::values) {
            match watcher
                .tx
                .try_send(Outbound::Frame(Box::new(frame.clone())))
            {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_)) => watcher.kick.cancel(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        metrics::counter!("presence_transitions_total").increment(1);
        metrics::counter!("presence_frames_total").increment(sent);
    }
}

/// Drops `conn`'s watch of `user`; true when it was the user's last watcher here.
fn remove_watcher(
    by_user: &mut HashMap<UserId, HashMap<u64, Watcher>>,
    user: UserId,
    conn: u64,
) -> bool {
    let Some(m) = by_user.get_mut(&user) else {
        return false;
    };
    if m.remove(&conn).is_none() {
        return false;
    }
    if m.is_empty() {
        by_user.remove(&user);
        return true;
    }
    false
}
