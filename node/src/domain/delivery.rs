//! The one way out of the domain for a stored message or a logout: [`Delivery`] hands it to
//! the devices connected here (the [`Hub`]) and to the other nodes through a [`Forward`]
//! port, which the cluster (`mesh`) implements, as [`super::presence::Directory`] is for
//! presence. Chat and accounts call `deliver` / `close_device` and never choose a road.

use std::sync::Arc;

use client_proto::ids::{DeviceId, UserId};
use client_proto::{Message, ServerFrame};

use super::hub::Hub;

/// How a delivery reaches devices connected to other nodes.
pub trait Forward: Send + Sync {
    /// Queues delivery of `message` to the devices of `users` on other nodes.
    fn forward(&self, users: &[UserId], message: &Message);
    /// Closes `user`'s `device` on other nodes (logout).
    fn close_device(&self, user: UserId, device: DeviceId);
    /// `a` and `b` became friends (`true`) or stopped being friends (`false`): their
    /// connections on other nodes start or stop watching each other's presence.
    fn friendship_changed(&self, a: UserId, b: UserId, friends: bool);
}

/// No other nodes: everything is local (unit tests, tools).
pub struct LocalOnly;

impl Forward for LocalOnly {
    fn forward(&self, _: &[UserId], _: &Message) {}
    fn close_device(&self, _: UserId, _: DeviceId) {}
    fn friendship_changed(&self, _: UserId, _: UserId, _: bool) {}
}

/// The delivery port; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    hub: Hub,
    forward: Arc<dyn Forward>,
}

impl Delivery {
    pub fn new(hub: Hub, forward: Arc<dyn Forward>) -> Self {
        Delivery { hub, forward }
    }

    /// Delivers a stored `message` to every connected device of `users`, here and on other
    /// nodes, except the connection `except_conn` (the sender's own).
    pub fn deliver(&self, users: &[UserId], message: &Message, except_conn: Option<u64>) {
        let frame = ServerFrame::Message {
            message: Arc::new(message.clone()),
        };
        self.hub.deliver(users, &frame, except_conn);
        self.forward.forward(users, message);
    }

    /// Tells the other nodes that `a` and `b` became friends or stopped being friends (this
    /// node's connections are the caller's to update: see `friends::apply_friendship`).
    pub fn friendship_changed(&self, a: UserId, b: UserId, friends: bool) {
        self.forward.friendship_changed(a, b, friends);
    }

    /// Closes every connection of `user`'s `device`, here and on other nodes (logout).
    pub fn close_device(&self, user: UserId, device: DeviceId, reason: &str) {
        self.hub.close_device(user, device, reason);
        self.forward.close_device(user, device);
    }
}
