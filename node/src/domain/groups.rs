//! Groups of up to 100 members: create, list, read, add, remove/leave.
//!
//! Rules: any member may add (if the added user's `group_adds` setting allows it: see
//! `privacy`); the owner removes anyone; anyone may remove themselves; the
//! owner leaving hands ownership to the longest-standing member; the last member leaving
//! deletes the group. A member reads only history from after they joined.

use std::sync::Arc;

use client_proto::http::GroupInfo;
use client_proto::ids::{GroupId, UserId};
use client_proto::limits::MAX_GROUP_MEMBERS;
use client_proto::ErrorCode;

use crate::domain::error::ApiError;
use crate::domain::privacy::{self, Action};
use crate::ids::{now_unix_ms, IdGen};
use crate::store::records::{GroupMember, GroupRecord};
use crate::store::Store;

/// Longest group name, in bytes.
const MAX_GROUP_NAME_BYTES: usize = 64;
/// Most groups one user may belong to (keeps `GET /v1/groups` bounded).
const MAX_GROUPS_PER_USER: usize = 1_000;

/// The group service.
pub struct Groups {
    store: Store,
    ids: Arc<IdGen>,
}

fn full() -> ApiError {
    ApiError::new(
        ErrorCode::GroupFull,
        format!("a group has at most {MAX_GROUP_MEMBERS} members, the creator included"),
    )
}

fn no_group(id: GroupId) -> ApiError {
    ApiError::not_found(format!("no group {id}"))
}

/// The API view of a group record.
pub fn info(rec: &GroupRecord) -> GroupInfo {
    GroupInfo {
        group_id: rec.group_id,
        name: rec.name.clone(),
        owner: rec.owner,
        members: rec.member_ids(),
        presence: None,
    }
}

impl Groups {
    pub fn new(store: Store, ids: Arc<IdGen>) -> Self {
        Groups { store, ids }
    }

    /// `user` exists and lets `adder` add them to a group (their `group_adds` setting).
    async fn check_user(&self, adder: UserId, user: UserId) -> Result<(), ApiError> {
        match self.store.user(user).await? {
            Some(rec) => {
                privacy::check(
                    &self.store,
                    rec.privacy.group_adds,
                    Action::GroupAdd,
                    user,
                    adder,
                )
                .await
            }
            None => Err(ApiError::not_found(format!("no user {user}"))),
        }
    }

    async fn check_room(&self, user: UserId) -> Result<(), ApiError> {
        if self.store.groups_of(user).await?.len() >= MAX_GROUPS_PER_USER {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("user {user} is already in {MAX_GROUPS_PER_USER} groups"),
            ));
        }
        Ok(())
    }

    /// Creates a group owned by `owner` with `members` (the owner is added if missing).
    pub async fn create(
        &self,
        owner: UserId,
        name: String,
        members: Vec<UserId>,
    ) -> Result<GroupRecord, ApiError> {
        if name.trim().is_empty()
            || name.len() > MAX_GROUP_NAME_BYTES
            || name.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(format!(
                "the group name must be 1 to {MAX_GROUP_NAME_BYTES} bytes with no control characters"
            )));
        }
        let mut ids = vec![owner];
        for m in members {
            if !ids.contains(&m) {
                ids.push(m);
            }
            if ids.len() > MAX_GROUP_MEMBERS {
                return Err(full());
            }
        }
        for &m in &ids {
            self.check_user(owner, m).await?;
            self.check_room(m).await?;
        }
        let joined_at = self.ids.next()?;
        let rec = GroupRecord {
            group_id: GroupId(self.ids.next()?.0),
            name,
            owner,
            members: ids
                .into_iter()
                .map(|user| GroupMember { user, joined_at })
                .collect(),
            created_at: now_unix_ms(),
        };
        let id = rec.group_id;
        let created = self
            .store
            .update_group(id, |old| match old {
                None => Ok(Some(rec.clone())),
                Some(_) => Err(ApiError::new(ErrorCode::Internal, "group id collision")),
            })
            .await?;
        created.ok_or_else(|| no_group(id))
    }

    /// The group, if `who` is a member.
    pub async fn get(&self, who: UserId, id: GroupId) -> Result<GroupRecord, ApiError> {
        let rec = self.store.group(id).await?.ok_or_else(|| no_group(id))?;
        if rec.member(who).is_none() {
            return Err(ApiError::forbidden("only members may see a group"));
        }
        Ok(rec)
    }

    /// The groups `who` is a member of.
    pub async fn list(&self, who: UserId) -> Result<Vec<GroupRecord>, ApiError> {
        let mut out = Vec::new();
        for id in self.store.groups_of(who).await? {
            if let Some(rec) = self.store.group(id).await? {
                if rec.member(who).is_some() {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// `who` (a member) adds `user`. Adding a member twice is a no-op.
    pub async fn add(&self, who: UserId, id: GroupId, user: UserId) -> Result<(), ApiError> {
        self.check_user(who, user).await?;
        self.check_room(user).await?;
        let joined_at = self.ids.next()?;
        self.store
            .update_group(id, |old| {
                let mut rec = old.ok_or_else(|| no_group(id))?;
                if rec.member(who).is_none() {
                    return Err(ApiError::forbidden("only members may add members"));
                }
                if rec.member(user).is_some() {
                    return Ok(Some(rec));
                }
                if rec.members.len() >= MAX_GROUP_MEMBERS {
                    return Err(full());
                }
                rec.members.push(GroupMember { user, joined_at });
                Ok(Some(rec))
            })
            .await?;
        Ok(())
    }

    /// `who` removes `user`: the owner removes anyone, anyone removes themselves.
    pub async fn remove(&self, who: UserId, id: GroupId, user: UserId) -> Result<(), ApiError> {
        self.store
            .update_group(id, |old| {
                let mut rec = old.ok_or_else(|| no_group(id))?;
                if rec.member(who).is_none() {
                    return Err(ApiError::forbidden("only members may remove members"));
                }
                if who != user && who != rec.owner {
                    return Err(ApiError::forbidden(
                        "only the owner removes others; members may leave",
                    ));
                }
                if rec.member(user).is_none() {
                    return Err(ApiError::not_found(format!("user {user} is not a member")));
                }
                rec.members.retain(|m| m.user != user);
                if rec.members.is_empty() {
                    return Ok(None); // the last member left: the group is gone
                }
                if rec.owner == user {
                    rec.owner = rec.members[0].user; // the longest-standing member
                }
                Ok(Some(rec))
            })
            .await?;
        Ok(())
    }
}
