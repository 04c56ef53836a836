//! Groups: the group record (partition key: group id) and each member's index entry
//! `user | group` (partition key: user id).

use client_proto::ids::{GroupId, UserId};

use super::records::{decode, GroupRecord};
use super::{keys, Store, StoreError, Table, WriteBatch};

impl Store {
    /// The group with this id.
    pub async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StoreError> {
        let key = keys::group(id);
        self.get(Table::Groups, &key, &key)
            .await?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Applies `change` to a group record atomically and durably (see [`Store::update`]);
    /// `Ok(None)` from `change` deletes the group. Then brings the members' index entries in
    /// line with the new member list (adding new members', removing departed ones').
    pub async fn update_group<E: From<StoreError>>(
        &self,
        id: GroupId,
        mut change: impl FnMut(Option<GroupRecord>) -> Result<Option<GroupRecord>, E>,
    ) -> Result<Option<GroupRecord>, E> {
        let key = keys::group(id);
        let mut before: Vec<UserId> = Vec::new();
        let new = self
            .update(Table::Groups, &key, &key, |old: Option<GroupRecord>| {
                before = old
                    .as_ref()
                    .map(GroupRecord::member_ids)
                    .unwrap_or_default();
                change(old)
            })
            .await?;
        let after = new
            .as_ref()
            .map(GroupRecord::member_ids)
            .unwrap_or_default();
        let mut batch = WriteBatch::default();
        for u in after.iter().filter(|u| !before.contains(u)) {
            batch.put(
                self,
                Table::UserGroups,
                &keys::user(*u),
                keys::user_group(*u, id),
                Vec::new(),
            );
        }
        for u in before.iter().filter(|u| !after.contains(u)) {
            batch.delete(
                self,
                Table::UserGroups,
                &keys::user(*u),
                keys::user_group(*u, id),
            );
        }
        if batch.partitions() > 0 {
            self.write(batch).await?;
        }
        Ok(new)
    }

    /// The groups `user` belongs to. The index may briefly name a group the user just left
    /// (the group record is written first); callers check the record.
    pub async fn groups_of(&self, user: UserId) -> Result<Vec<GroupId>, StoreError> {
        let mut out = Vec::new();
        let range = keys::user_group(user, GroupId(0)).to_vec()
            ..=keys::user_group(user, GroupId(u64::MAX)).to_vec();
        self.scan(
            Table::UserGroups,
            &keys::user(user),
            range,
            false,
            |k, _| {
                if let Some(g) = keys::u64_suffix(k) {
                    out.push(GroupId(g));
                }
                Ok(true)
            },
        )
        .await?;
        Ok(out)
    }
}
