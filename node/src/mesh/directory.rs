//! The domain's presence [`Directory`] port over the cluster's partitioned directory
//! ([`cluster::directory`]): a user's connected nodes live on the user's home replicas;
//! this node registers its own users there, and subscribes to the users its connections
//! watch or its senders route to.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use client_proto::ids::UserId;
use client_proto::PresenceStatus;
use cluster::directory::{Directory as ClusterDirectory, DirectoryHooks};
use cluster::transport::BoxFuture;
use cluster::NodeId;

use crate::domain::presence::{Directory, Feed};
use crate::ids::now_unix_ms;

use super::Forwarder;

/// What the directory tells this node: watched users whose nodes changed go to the presence
/// feed; a node a route gained is told to catch the user up (what this node stored before
/// it knew went to the old route only).
pub(super) struct Hooks {
    pub(super) feed: Arc<Feed>,
    /// Set once the forwarder exists (it is made with the directory).
    pub(super) forwarder: Arc<OnceLock<Forwarder>>,
}

impl DirectoryHooks for Hooks {
    fn changed(&self, users: &[u64]) {
        let now = now_unix_ms();
        for &u in users {
            // The fan-out re-reads the status; the one given here is not used.
            self.feed.push(UserId(u), PresenceStatus::Online, now);
        }
    }

    fn gained(&self, gained: &[(u64, NodeId)]) {
        let Some(forwarder) = self.forwarder.get() else {
            return;
        };
        let mut per_node: HashMap<NodeId, Vec<UserId>> = HashMap::new();
        for (u, n) in gained {
            per_node.entry(*n).or_default().push(UserId(*u));
        }
        for (node, users) in per_node {
            forwarder.catch_up_at(node, users);
        }
    }
}

/// The [`Directory`] port.
pub struct PartitionedDirectory {
    pub(super) dir: ClusterDirectory,
    pub(super) self_id: NodeId,
}

impl Directory for PartitionedDirectory {
    fn publish(&self, user: UserId, online: bool) {
        self.dir.publish(user.0, online);
    }

    fn watch(&self, users: &[UserId]) {
        let ids: Vec<u64> = users.iter().map(|u| u.0).collect();
        self.dir.watch(&ids);
    }

    fn unwatch(&self, users: &[UserId]) {
        let ids: Vec<u64> = users.iter().map(|u| u.0).collect();
        self.dir.unwatch(&ids);
    }

    fn online_elsewhere(&self, user: UserId) -> Option<bool> {
        self.dir
            .known(user.0)
            .map(|nodes| nodes.iter().any(|n| *n != self.self_id))
    }

    fn lookup<'a>(&'a self, users: &'a [UserId]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ids: Vec<u64> = users.iter().map(|u| u.0).collect();
            self.dir.resolve(&ids).await;
        })
    }
}
