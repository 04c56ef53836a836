//! Friendships: `user | friend` on both users' partitions.

use client_proto::ids::UserId;

use super::{keys, Store, StoreError, Table, WriteBatch};

impl Store {
    /// Makes `a` and `b` friends of each other (idempotent).
    pub async fn add_friends(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(
            self,
            Table::Friends,
            &keys::user(a),
            keys::pair(a, b),
            Vec::new(),
        );
        batch.put(
            self,
            Table::Friends,
            &keys::user(b),
            keys::pair(b, a),
            Vec::new(),
        );
        self.write(batch).await
    }

    /// Ends the friendship of `a` and `b` on both sides (idempotent).
    pub async fn remove_friends(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete(self, Table::Friends, &keys::user(a), keys::pair(a, b));
        batch.delete(self, Table::Friends, &keys::user(b), keys::pair(b, a));
        self.write(batch).await
    }

    /// The friends of `user`.
    pub async fn friends_of(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        let mut out = Vec::new();
        let range =
            keys::pair(user, UserId(0)).to_vec()..=keys::pair(user, UserId(u64::MAX)).to_vec();
        self.scan(Table::Friends, &keys::user(user), range, false, |k, _| {
            out.push(UserId(keys::u64_suffix(k).unwrap_or(0)));
            Ok(true)
        })
        .await?;
        Ok(out)
    }
}
