//! Friends: mutual, by request and acceptance; each one subscribed to the other's presence
//! automatically. Also who may see whose presence ([`Friends::visible`]): the user, their
//! friends, and the members of groups they share.

use std::collections::HashSet;
use std::sync::Arc;

use client_proto::http::{FriendRequests, FriendState, UserProfile};
use client_proto::ids::UserId;
use serde::Serialize;

use crate::domain::delivery::Delivery;
use crate::domain::error::ApiError;
use crate::domain::hub::Hub;
use crate::domain::presence::Presence;
use crate::store::{Link, Store};

/// Most friends one user may have.
pub const MAX_FRIENDS: usize = 1_000;
/// Most pending friend requests one user may have sent, and (separately) received. Bounds
/// the `Friends` rows per user and `GET /v1/friends/requests`.
pub const MAX_PENDING_REQUESTS: usize = 1_000;

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
    delivery: Delivery,
}

/// Makes this node's connections of `a` and `b` start (`friends`) or stop watching each
/// other's presence. Run by the node that changed the friendship, and by every other node
/// where either has a device when it hears of the change.
pub fn apply_friendship(hub: &Hub, presence: &Presence, a: UserId, b: UserId, friends: bool) {
    for (watcher, watched) in [(a, b), (b, a)] {
        for (conn, tx, kick) in hub.connections_of(watcher) {
            if friends {
                presence.watch(conn, &tx, &kick, &[watched]);
            } else {
                presence.unwatch(conn, &[watched]);
            }
        }
    }
}

fn conflict(message: String) -> ApiError {
    ApiError::new(client_proto::ErrorCode::Conflict, message)
}

impl Friends {
    pub fn new(store: Store, hub: Hub, presence: Arc<Presence>, delivery: Delivery) -> Self {
        Friends {
            store,
            hub,
            presence,
            delivery,
        }
    }

    /// Updates who watches whom, here and on the other nodes.
    fn friendship_changed(&self, a: UserId, b: UserId, friends: bool) {
        apply_friendship(&self.hub, &self.presence, a, b, friends);
        self.delivery.friendship_changed(a, b, friends);
    }

    /// `who` asks `other` to be friends, or accepts `other`'s request. Idempotent: asking
    /// again, or befriending a friend, changes nothing.
    pub async fn request(&self, who: UserId, other: UserId) -> Result<FriendState, ApiError> {
        if who == other {
            return Err(ApiError::bad_request("you cannot befriend yourself"));
        }
        if self.store.user(other).await?.is_none() {
            return Err(ApiError::not_found(format!("no user {other}")));
        }
        match self.store.link(who, other).await? {
            Some(Link::Friends) => Ok(FriendState::Friends),
            Some(Link::Outgoing) => Ok(FriendState::Requested),
            Some(Link::Incoming) => {
                for u in [who, other] {
                    if self.store.friends_of(u).await?.len() >= MAX_FRIENDS {
                        return Err(conflict(format!(
                            "user {u} already has {MAX_FRIENDS} friends"
                        )));
                    }
                }
                self.store.add_friends(who, other).await?;
                metrics::counter!("friends_accepted_total").increment(1);
                self.friendship_changed(who, other, true);
                Ok(FriendState::Friends)
            }
            None => {
                let count = |links: &[(UserId, Link)], kind: Link| {
                    links.iter().filter(|(_, l)| *l == kind).count()
                };
                if count(&self.store.links_of(who).await?, Link::Outgoing) >= MAX_PENDING_REQUESTS {
                    return Err(conflict(format!(
                        "you have {MAX_PENDING_REQUESTS} unanswered friend requests; cancel some \
                         (DELETE /v1/friends/{{user_id}})"
                    )));
                }
                if count(&self.store.links_of(other).await?, Link::Incoming) >= MAX_PENDING_REQUESTS
                {
                    return Err(conflict(format!(
                        "user {other} has {MAX_PENDING_REQUESTS} friend requests waiting"
                    )));
                }
                self.store.request_friend(who, other).await?;
                metrics::counter!("friends_requests_total").increment(1);
                Ok(FriendState::Requested)
            }
        }
    }

    /// Ends the friendship, or declines or cancels a request, on both sides.
    pub async fn remove(&self, who: UserId, other: UserId) -> Result<(), ApiError> {
        self.store.remove_friends(who, other).await?;
        self.friendship_changed(who, other, false);
        Ok(())
    }

    /// The ids of `who`'s friends.
    pub async fn ids(&self, who: UserId) -> Result<Vec<UserId>, ApiError> {
        Ok(self.store.friends_of(who).await?)
    }

    /// `who`'s pending requests, both ways.
    pub async fn requests(&self, who: UserId) -> Result<FriendRequests, ApiError> {
        let mut out = FriendRequests::default();
        for (id, link) in self.store.links_of(who).await? {
            let list = match link {
                Link::Friends => continue,
                Link::Incoming => &mut out.incoming,
                Link::Outgoing => &mut out.outgoing,
            };
            if let Some(rec) = self.store.user(id).await? {
                list.push(UserProfile {
                    user_id: id,
                    username: rec.username,
                    display_name: rec.display_name,
                });
            }
        }
        Ok(out)
    }

    /// `who`'s friends with their status.
    pub async fn list(&self, who: UserId) -> Result<Vec<FriendInfo>, ApiError> {
        let mut out = Vec::new();
        let friends = self.store.friends_of(who).await?;
        self.presence.look_up(&friends).await;
        for id in friends {
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

    /// Splits `users` into those whose presence `watcher` may see (itself, its friends, the
    /// members of groups it is in) and those it may not. Costs one scan of `watcher`'s
    /// friends and, only if someone is not a friend, one read per group `watcher` is in:
    /// bounded by `watcher`'s own records, not by how many users it asks about.
    pub async fn visible(
        &self,
        watcher: UserId,
        users: &[UserId],
    ) -> Result<(Vec<UserId>, Vec<UserId>), ApiError> {
        let friends: HashSet<UserId> = self.store.friends_of(watcher).await?.into_iter().collect();
        let mut co_members: Option<HashSet<UserId>> = None;
        let (mut seen, mut hidden) = (Vec::new(), Vec::new());
        for &u in users {
            if u == watcher || friends.contains(&u) {
                seen.push(u);
                continue;
            }
            if co_members.is_none() {
                let mut set = HashSet::new();
                for g in self.store.groups_of(watcher).await? {
                    if let Some(rec) = self.store.group(g).await? {
                        if rec.member(watcher).is_some() {
                            set.extend(rec.member_ids());
                        }
                    }
                }
                co_members = Some(set);
            }
            if co_members.as_ref().is_some_and(|s| s.contains(&u)) {
                seen.push(u);
            } else {
                hidden.push(u);
            }
        }
        Ok((seen, hidden))
    }
}
