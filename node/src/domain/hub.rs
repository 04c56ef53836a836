//! The local hub: which devices are connected to this node, and delivery to them.
//!
//! Each connection registers a bounded outbound queue. Delivery never blocks and never drops
//! silently: a device whose queue is full is disconnected (it reconnects and syncs, and the
//! message is in its inbox), so one slow client cannot hold up anyone else. The hub also
//! wakes connections to catch up with their inboxes when deliveries may have been missed
//! ([`Hub::catch_up_all`], [`Hub::catch_up_users`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use client_proto::codec::{self, CloseCode, Codec};
use client_proto::ids::{DeviceId, UserId};
use client_proto::ServerFrame;
use parking_lot::RwLock;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::logging::RateLimitedLog;

/// Slow-device kicks logged: a burst of 10 per 10 s, the rest counted.
static SLOW_DEVICE_LOG: RateLimitedLog =
    RateLimitedLog::new(10, std::time::Duration::from_secs(10));

/// Room in one connection's outbound queue.
pub const OUTBOUND_QUEUE: usize = 256;

/// Something for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// Boxed so that a queue slot is small: each connection's queue allocates its slots in
    /// blocks, and idle connections are what the node holds most of.
    Frame(Box<ServerFrame>),
    /// A frame queued for several connections (a delivery), encoded once per codec.
    Shared(Arc<SharedFrame>),
    /// One page of a catch-up: a `message` frame each, but one queue slot for the page. Most
    /// of a catch-up's messages were delivered live already (the writer drops those), and a
    /// slot each would crowd live deliveries out of the queue: the device was disconnected
    /// as a slow consumer when it was not.
    CatchUp(Box<CatchUpPage>),
    /// Close with this WebSocket close code and reason (boxed for the same reason: a slot is
    /// then two words).
    Close(Box<(u16, String)>),
}

/// A page of a catch-up, for the connection's writer.
#[derive(Debug)]
pub struct CatchUpPage {
    pub messages: Vec<client_proto::Message>,
    /// Dropped when the writer has taken the page: the catch-up reads its next page only then,
    /// so a client that does not read holds one page of its catch-up in the node's memory,
    /// not a queue of them.
    pub taken: tokio::sync::oneshot::Sender<()>,
}

impl Outbound {
    /// A close with this WebSocket close code and reason.
    pub fn close(code: u16, reason: impl Into<String>) -> Self {
        Outbound::Close(Box::new((code, reason.into())))
    }
}

/// A frame on its way to several connections: the first writer that needs it in a codec
/// encodes it, the others copy those bytes (a group message is encoded once, not per member).
#[derive(Debug)]
pub struct SharedFrame {
    frame: ServerFrame,
    json: OnceLock<codec::Encoded>,
    binary: OnceLock<codec::Encoded>,
}

impl SharedFrame {
    pub fn new(frame: ServerFrame) -> Self {
        SharedFrame {
            frame,
            json: OnceLock::new(),
            binary: OnceLock::new(),
        }
    }

    /// The frame itself.
    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The frame in `codec` (JSON as text), encoded on first use.
    pub fn encoded(&self, codec: Codec) -> &codec::Encoded {
        let cell = match codec {
            Codec::Json => &self.json,
            Codec::Binary => &self.binary,
        };
        cell.get_or_init(|| codec::encode_as(codec, &self.frame))
    }
}

/// A connected device, as the hub sees it.
struct DeviceConn {
    conn_id: u64,
    device_id: DeviceId,
    tx: mpsc::Sender<Outbound>,
    /// Cancelled to end the connection (logout, slow consumer).
    kick: CancellationToken,
    /// Wakes the session to catch up with its inbox (it may have missed deliveries).
    catch_up: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    users: RwLock<HashMap<UserId, Vec<DeviceConn>>>,
    next_conn: AtomicU64,
    connections: AtomicU64,
}

/// The registry of local connections; cheap to clone.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// Keeps a connection registered; unregisters on drop.
pub struct Registration {
    hub: Hub,
    user: UserId,
    conn_id: u64,
    catch_up: Arc<Notify>,
}

impl Registration {
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// Notified when this connection should catch up with its inbox ([`Hub::catch_up_all`],
    /// [`Hub::catch_up_users`]).
    pub fn catch_up(&self) -> Arc<Notify> {
        self.catch_up.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut users = self.hub.inner.users.write();
        if let Some(devs) = users.get_mut(&self.user) {
            devs.retain(|d| d.conn_id != self.conn_id);
            if devs.is_empty() {
                users.remove(&self.user);
            }
        }
        drop(users);
        self.hub.inner.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("gateway_connections").decrement(1.0);
    }
}

impl Hub {
    /// Registers a connection of `user`'s `device`.
    pub fn register(
        &self,
        user: UserId,
        device_id: DeviceId,
        tx: mpsc::Sender<Outbound>,
        kick: CancellationToken,
    ) -> Registration {
        let conn_id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let catch_up = Arc::new(Notify::new());
        self.inner
            .users
            .write()
            .entry(user)
            .or_default()
            .push(DeviceConn {
                conn_id,
                device_id,
                tx,
                kick,
                catch_up: catch_up.clone(),
            });
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("gateway_connections").increment(1.0);
        Registration {
            hub: self.clone(),
            user,
            conn_id,
            catch_up,
        }
    }

    /// Tells every connection here to catch up with its inbox: this node may have missed
    /// deliveries (it was paused or cut off, a peer died or came back). Returns how many.
    pub fn catch_up_all(&self, why: &str) -> usize {
        let map = self.inner.users.read();
        let mut n = 0;
        for dev in map.values().flatten() {
            dev.catch_up.notify_one();
            n += 1;
        }
        drop(map);
        metrics::counter!("gateway_catch_ups_requested_total").increment(n as u64);
        tracing::info!(
            connections = n,
            reason = why,
            "catching up every connected device"
        );
        n
    }

    /// Tells the connections of `users` here to catch up with their inboxes (a peer could
    /// not forward them some deliveries). Returns how many.
    pub fn catch_up_users(&self, users: &[UserId]) -> usize {
        let map = self.inner.users.read();
        let mut n = 0;
        for dev in users.iter().filter_map(|u| map.get(u)).flatten() {
            dev.catch_up.notify_one();
            n += 1;
        }
        drop(map);
        metrics::counter!("gateway_catch_ups_requested_total").increment(n as u64);
        n
    }

    /// Queues `frame` for every connected device of `users`, except the connection
    /// `except_conn`. Returns how many devices it was queued for.
    pub fn deliver(
        &self,
        users: &[UserId],
        frame: &ServerFrame,
        except_conn: Option<u64>,
    ) -> usize {
        let map = self.inner.users.read();
        let mut delivered = 0;
        let mut shared: Option<Arc<SharedFrame>> = None;
        for user in users {
            for dev in map.get(user).into_iter().flatten() {
                if Some(dev.conn_id) == except_conn {
                    continue;
                }
                let shared = shared
                    .get_or_insert_with(|| Arc::new(SharedFrame::new(frame.clone())))
                    .clone();
                match dev.tx.try_send(Outbound::Shared(shared)) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // Once per kick: deliveries keep finding the queue full until the
                        // session is gone.
                        if dev.kick.is_cancelled() {
                            continue;
                        }
                        metrics::counter!("gateway_slow_consumer_kicks_total").increment(1);
                        dev.kick.cancel();
                        if let Some(suppressed) = SLOW_DEVICE_LOG.allow() {
                            tracing::warn!(user = %user, device = %dev.device_id, suppressed, "outbound queue full; disconnecting the slow device");
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        metrics::counter!("chat_deliveries_total").increment(delivered as u64);
        delivered
    }

    /// Closes every connection of `user`'s `device` (logout).
    pub fn close_device(&self, user: UserId, device: DeviceId, reason: &str) {
        let map = self.inner.users.read();
        for dev in map
            .get(&user)
            .into_iter()
            .flatten()
            .filter(|d| d.device_id == device)
        {
            let close = Outbound::close(CloseCode::PolicyViolation.code(), reason);
            if dev.tx.try_send(close).is_err() {
                dev.kick.cancel();
            }
        }
    }

    /// The connections of `user` here: id, outbound queue, kick token.
    pub fn connections_of(
        &self,
        user: UserId,
    ) -> Vec<(u64, mpsc::Sender<Outbound>, CancellationToken)> {
        let map = self.inner.users.read();
        map.get(&user)
            .into_iter()
            .flatten()
            .map(|d| (d.conn_id, d.tx.clone(), d.kick.clone()))
            .collect()
    }

    /// Whether `user` has a device connected here.
    pub fn is_connected(&self, user: UserId) -> bool {
        self.inner.users.read().contains_key(&user)
    }

    /// Number of connected devices.
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use client_proto::ErrorCode;

    use super::*;

    #[test]
    fn a_queue_slot_is_two_words() {
        // Every connection's queue allocates a block of 32 slots up front.
        assert_eq!(
            std::mem::size_of::<Outbound>(),
            2 * std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn a_shared_frame_encodes_like_the_frame() {
        let frame = ServerFrame::error(ErrorCode::RateLimited, "slow down", Some("c1".into()));
        let shared = SharedFrame::new(frame.clone());
        for c in [Codec::Json, Codec::Binary] {
            assert_eq!(
                shared.encoded(c).as_bytes(),
                codec::encode(c, &frame).as_slice()
            );
            assert_eq!(shared.encoded(c), shared.encoded(c));
        }
    }
}
