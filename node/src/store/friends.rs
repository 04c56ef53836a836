//! Friendships and friend requests: `user | other` on both users' partitions, in the
//! `Friends` table. The value says what the link is, from the key owner's side:
//!
//! - empty: friends (mutual; the only value written before friend requests existed, so old
//!   rows stay friendships);
//! - `[1]`: an outgoing request (the owner asked `other`);
//! - `[2]`: an incoming request (`other` asked the owner).
//!
//! Both sides are written in one batch (one version), so last-writer-wins keeps them
//! consistent: two crossing requests end as one request, in one direction.

use client_proto::ids::UserId;

use super::{keys, Store, StoreError, Table, WriteBatch};

/// What links a user to another, from the first user's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Friends,
    /// The user asked the other to be friends.
    Outgoing,
    /// The other asked the user.
    Incoming,
}

const OUTGOING: u8 = 1;
const INCOMING: u8 = 2;

impl Link {
    fn encode(self) -> Vec<u8> {
        match self {
            Link::Friends => Vec::new(),
            Link::Outgoing => vec![OUTGOING],
            Link::Incoming => vec![INCOMING],
        }
    }

    fn decode(v: &[u8]) -> Result<Link, StoreError> {
        match v {
            [] => Ok(Link::Friends),
            [OUTGOING] => Ok(Link::Outgoing),
            [INCOMING] => Ok(Link::Incoming),
            _ => Err(StoreError::Corrupt("unknown friend link".into())),
        }
    }
}

impl Store {
    fn put_links(&self, a: UserId, b: UserId, a_side: Link, b_side: Link) -> WriteBatch {
        let mut batch = WriteBatch::default();
        batch.put(
            self,
            Table::Friends,
            &keys::user(a),
            keys::pair(a, b),
            a_side.encode(),
        );
        batch.put(
            self,
            Table::Friends,
            &keys::user(b),
            keys::pair(b, a),
            b_side.encode(),
        );
        batch
    }

    /// Makes `a` and `b` friends of each other (idempotent).
    pub async fn add_friends(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        self.write(self.put_links(a, b, Link::Friends, Link::Friends))
            .await
    }

    /// Records that `from` asked `to` to be friends (idempotent).
    pub async fn request_friend(&self, from: UserId, to: UserId) -> Result<(), StoreError> {
        self.write(self.put_links(from, to, Link::Outgoing, Link::Incoming))
            .await
    }

    /// Removes whatever links `a` and `b` (friendship or request), on both sides (idempotent).
    pub async fn remove_friends(&self, a: UserId, b: UserId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete(self, Table::Friends, &keys::user(a), keys::pair(a, b));
        batch.delete(self, Table::Friends, &keys::user(b), keys::pair(b, a));
        self.write(batch).await
    }

    /// What links `user` to `other`, from `user`'s side.
    pub async fn link(&self, user: UserId, other: UserId) -> Result<Option<Link>, StoreError> {
        self.get(Table::Friends, &keys::user(user), &keys::pair(user, other))
            .await?
            .map(|v| Link::decode(&v))
            .transpose()
    }

    /// Everyone linked to `user`, with the link, in id order.
    pub async fn links_of(&self, user: UserId) -> Result<Vec<(UserId, Link)>, StoreError> {
        let mut out = Vec::new();
        let range =
            keys::pair(user, UserId(0)).to_vec()..=keys::pair(user, UserId(u64::MAX)).to_vec();
        self.scan(Table::Friends, &keys::user(user), range, false, |k, v| {
            let Some(other) = keys::u64_suffix(k) else {
                return Ok(true);
            };
            out.push((UserId(other), Link::decode(v)?));
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// The friends of `user`.
    pub async fn friends_of(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        Ok(self
            .links_of(user)
            .await?
            .into_iter()
            .filter(|(_, l)| *l == Link::Friends)
            .map(|(u, _)| u)
            .collect())
    }

    /// Whether `a` and `b` are friends.
    pub async fn are_friends(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        Ok(self.link(a, b).await? == Some(Link::Friends))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_round_trip_and_old_rows_are_friendships() {
        for l in [Link::Friends, Link::Outgoing, Link::Incoming] {
            assert_eq!(Link::decode(&l.encode()).unwrap(), l);
        }
        // Rows written before friend requests existed hold an empty value.
        assert_eq!(Link::decode(&[]).unwrap(), Link::Friends);
        assert!(Link::decode(&[9]).is_err());
    }
}
