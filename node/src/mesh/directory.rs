//! The gossip-backed presence directory: a user is online while any live node publishes
//! their key. Local transitions are coalesced in a feed and published by one task.

use std::sync::Arc;

use client_proto::ids::UserId;
use client_proto::PresenceStatus;

use super::Mesh;
use crate::domain::presence::{Directory, Feed};
use crate::ids::now_unix_ms;

/// The [`Directory`] over gossip keys.
pub struct GossipDirectory {
    mesh: Arc<Mesh>,
    outgoing: Arc<Feed>,
}

impl GossipDirectory {
    /// Starts the publisher task (owned by the mesh's tracker).
    pub fn new(mesh: Arc<Mesh>) -> Self {
        let outgoing = Arc::new(Feed::default());
        let (m, out) = (mesh.clone(), outgoing.clone());
        mesh.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = m.stop.cancelled() => break,
                    _ = out.notified() => {}
                }
                for (user, (status, _)) in out.take() {
                    match status {
                        PresenceStatus::Online => m.membership.set_user_online(user.0).await,
                        PresenceStatus::Offline => m.membership.set_user_offline(user.0).await,
                    }
                }
            }
        });
        GossipDirectory { mesh, outgoing }
    }
}

impl Directory for GossipDirectory {
    fn publish(&self, user: UserId, online: bool) {
        let status = if online {
            PresenceStatus::Online
        } else {
            PresenceStatus::Offline
        };
        self.outgoing.push(user, status, now_unix_ms());
    }

    fn online_elsewhere(&self, user: UserId) -> bool {
        let me = self.mesh.self_id;
        self.mesh
            .membership
            .user_nodes(user.0)
            .iter()
            .any(|n| *n != me)
    }
}
