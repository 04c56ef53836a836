//! Accounts: user records and username claims.

use client_proto::ids::UserId;

use super::records::{decode, encode, UserRecord};
use super::{keys, Store, StoreError, Table};

impl Store {
    /// Claims `record.username` for `record.user_id` and stores the record. Returns false if
    /// the name is taken (the unclaimed record is left unreachable). The claim is a compare-and-swap, so two racing signups of one name
    /// cannot both win.
    pub async fn create_user(&self, rec: UserRecord) -> Result<bool, StoreError> {
        let key = keys::user(rec.user_id);
        let name = rec.username.as_bytes();
        // The user record first (a fresh id: the swap from "absent" cannot conflict), so a
        // claim never points at a missing record. Both keys are only ever compare-and-swapped.
        self.compare_and_swap(Table::Users, &key, &key, None, Some(encode(&rec)))
            .await?
            .map_err(|_| StoreError::Contention)?;
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
    pub async fn user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        self.get(Table::Users, &keys::user(id), &keys::user(id))
            .await?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The id that holds `username`.
    pub async fn user_id_by_name(&self, username: &str) -> Result<Option<UserId>, StoreError> {
        let name = username.as_bytes();
        Ok(self.get(Table::Usernames, name, name).await?.and_then(|v| {
            let b: [u8; 8] = v.as_slice().try_into().ok()?;
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
