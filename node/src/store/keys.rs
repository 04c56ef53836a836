//! Key encoders for every tree, written once. Ids are big-endian so that range scans return
//! records in id order. Each function also names the record's partition key.

use client_proto::ids::{ConversationId, GroupId, MessageId, Position, UserId};

/// The bytes that identify a conversation; a prefix of its history keys and its partition key.
pub fn conversation(conv: &ConversationId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    match conv {
        ConversationId::Direct { low, high } => {
            k.push(b'd');
            k.extend_from_slice(&low.0.to_be_bytes());
            k.extend_from_slice(&high.0.to_be_bytes());
        }
        ConversationId::Group(g) => {
            k.push(b'g');
            k.extend_from_slice(&g.0.to_be_bytes());
        }
    }
    k
}

/// `conversation | message id`: one message of a conversation's history.
pub fn history(conv: &ConversationId, id: MessageId) -> Vec<u8> {
    let mut k = conversation(conv);
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

/// The partition key of everything owned by a user (record, inbox, idempotency).
pub fn user(user: UserId) -> [u8; 8] {
    user.0.to_be_bytes()
}

/// `user | position`: one entry of a user's inbox, at the position it was written at (a
/// sealed stream: see `cluster::replication::seal`).
pub fn inbox(user: UserId, pos: Position) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&user.0.to_be_bytes());
    k[8..].copy_from_slice(&pos.0.to_be_bytes());
    k
}

/// `sender | client message id`: the idempotency record of one send.
pub fn idempotency(sender: UserId, client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + client_id.len());
    k.extend_from_slice(&sender.0.to_be_bytes());
    k.extend_from_slice(client_id.as_bytes());
    k
}

/// A group record's key and partition key.
pub fn group(group: GroupId) -> [u8; 8] {
    group.0.to_be_bytes()
}

/// `user | group`: one entry of a user's group index.
pub fn user_group(user: UserId, group: GroupId) -> [u8; 16] {
    pair(user, UserId(group.0))
}

/// `user | other user`: one entry of a per-user set of users (friends).
pub fn pair(user: UserId, other: UserId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&user.0.to_be_bytes());
    k[8..].copy_from_slice(&other.0.to_be_bytes());
    k
}

/// `due ms | job id`: one pending push job, in due order.
pub fn push_job(due_ms: u64, job: u64) -> [u8; 16] {
    pair(UserId(due_ms), UserId(job))
}

/// The 64-bit id at the end of a key.
pub fn u64_suffix(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The message id at the end of a history key.
pub fn message_id_suffix(key: &[u8]) -> Option<MessageId> {
    u64_suffix(key).map(MessageId)
}

/// The position at the end of an inbox key.
pub fn position_suffix(key: &[u8]) -> Option<Position> {
    u64_suffix(key).map(Position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_message_id_within_their_prefix() {
        let c = ConversationId::direct(UserId(1), UserId(300));
        let a = history(&c, MessageId(255));
        let b = history(&c, MessageId(256));
        assert!(a < b);
        assert!(a.starts_with(&conversation(&c)));
        assert_eq!(message_id_suffix(&b), Some(MessageId(256)));
        assert!(inbox(UserId(1), Position(u64::MAX)) < inbox(UserId(2), Position(0)));
        assert_eq!(
            position_suffix(&inbox(UserId(1), Position(9))),
            Some(Position(9))
        );
        let g = ConversationId::Group(GroupId(1));
        assert!(!history(&g, MessageId(1)).starts_with(&conversation(&c)));
        assert_eq!(message_id_suffix(b"short"), None);
    }
}
