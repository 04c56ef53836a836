//! Accounts: user records and username claims.

use client_proto::ids::UserId;

use super::records::{decode, encode, UserRecord};
use super::{keys, Store, StoreError, Table};

impl Store {
    /// Claims `record.username` for `record.user_id` and stores the record. Returns false if
    /// the name is taken (the unclaimed record is left unreachable). The claim is a compare-and-swap, so two racing signups of one name
    /// cannot both win.
    pub async fn create_user(&self, rec: UserRecord) -> Result<bool, StoreError> {
        let name = rec.username.as_bytes();
        // Write the user record first: a claim must never point at a missing record.
        let mut batch = super::WriteBatch::default();
        batch.put(
            self,
            Table::Users,
            &keys::user(rec.user_id),
            keys::user(rec.user_id).to_vec(),
            encode(&rec),
        );
        self.write(batch).await?;
        let claimed = self
            .compare_and_swap(
                Table::Usernames,
                name,
                name,
                None,
                Some(rec.user_id.0.to_be_bytes().to_vec()),
            )
            .await?;
        Ok(claimed.is_ok())
    }

    /// The user with this id.
    pub fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.get(Table::Users, &keys::user(id), &keys::user(id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The id that holds `username`.
    pub fn user_id_by_name(&self, username: &str) -> Result<Option<UserId>, StoreError> {
        let name = username.as_bytes();
        Ok(self.get(Table::Usernames, name, name)?.and_then(|v| {
            let b: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(UserId(u64::from_be_bytes(b)))
        }))
    }

    /// Applies `change` to the user record atomically and durably (see [`Store::update`]).
    /// Returns the new record, or `None` if the user does not exist.
    pub async fn update_user<E: From<StoreError>>(
        &self,
        id: UserId,
        mut change: impl FnMut(&mut UserRecord) -> Result<(), E>,
    ) -> Result<Option<UserRecord>, E> {
        let key = keys::user(id);
        self.update(
            Table::Users,
            &key,
            &key,
            |rec: Option<UserRecord>| match rec {
                None => Ok(None),
                Some(mut r) => change(&mut r).map(|()| Some(r)),
            },
        )
        .await
    }
}
