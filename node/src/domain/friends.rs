//! Friends: mutual, each one subscribed to the other's presence automatically.

use std::sync::Arc;

use client_proto::ids::UserId;
use serde::Serialize;

use crate::domain::error::ApiError;
use crate::domain::hub::Hub;
use crate::domain::presence::Presence;
use crate::store::Store;

/// Most friends one user may have.
pub const MAX_FRIENDS: usize = 1_000;

/// One entry of `GET /v1/friends`.
#[derive(Serialize)]
pub struct FriendInfo {
    pub user_id: UserId,
    pub username: String,
    pub display_name: String,
    pub status: client_proto::PresenceStatus,
    pub last_seen: Option<u64>,
}

/// The friends service.
pub struct Friends {
    store: Store,
    hub: Hub,
    presence: Arc<Presence>,
}

impl Friends {
    pub fn new(store: Store, hub: Hub, presence: Arc<Presence>) -> Self {
        Friends {
            store,
            hub,
            presence,
        }
    }

    /// Makes `who` and `other` friends; their connected devices start watching each other.
    pub async fn add(&self, who: UserId, other: UserId) -> Result<(), ApiError> {
        if who == other {
            return Err(ApiError::bad_request("you cannot befriend yourself"));
        }
        if self.store.user(other).await?.is_none() {
            return Err(ApiError::not_found(format!("no user {other}")));
        }
        for u in [who, other] {
            if self.store.friends_of(u).await?.len() >= MAX_FRIENDS {
                return Err(ApiError::new(
                    client_proto::ErrorCode::Conflict,
                    format!("user {u} already has {MAX_FRIENDS} friends"),
                ));
            }
        }
        self.store.add_friends(who, other).await?;
        for (watcher, watched) in [(who, other), (other, who)] {
            for (conn, tx, kick) in self.hub.connections_of(watcher) {
                self.presence.watch(conn, &tx, &kick, &[watched]);
            }
        }
        Ok(())
    }

    /// Ends the friendship on both sides.
    pub async fn remove(&self, who: UserId, other: UserId) -> Result<(), ApiError> {
        self.store.remove_friends(who, other).await?;
        for (watcher, watched) in [(who, other), (other, who)] {
            for (conn, _, _) in self.hub.connections_of(watcher) {
                self.presence.unwatch(conn, &[watched]);
            }
        }
        Ok(())
    }

    /// The ids of `who`'s friends.
    pub async fn ids(&self, who: UserId) -> Result<Vec<UserId>, ApiError> {
        Ok(self.store.friends_of(who).await?)
    }

    /// `who`'s friends with their status.
    pub async fn list(&self, who: UserId) -> Result<Vec<FriendInfo>, ApiError> {
        let mut out = Vec::new();
        for id in self.store.friends_of(who).await? {
            let Some(rec) = self.store.user(id).await? else {
                continue;
            };
            let p = self.presence.status(id).await;
            out.push(FriendInfo {
                user_id: id,
                username: rec.username,
                display_name: rec.display_name,
                status: p.status,
                last_seen: p.last_seen,
            });
        }
        Ok(out)
    }
}
