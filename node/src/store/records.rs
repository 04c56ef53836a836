//! Stored records and their versioned encoding: one version byte, then bincode 2. A reader
//! that meets an unknown version refuses it instead of misreading it; a new version adds a
//! decoder here (the migration path).

use bincode::{Decode, Encode};
use client_proto::ids::{ConversationId, DeviceId, GroupId, MessageId, UserId};

use super::StoreError;

/// The current version of every record kind.
const VERSION: u8 = 1;

/// Encodes a record with its version byte.
pub fn encode<T: Encode>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Encoding into a Vec cannot fail for our record types.
    let _ = bincode::encode_into_std_write(value, &mut out, bincode::config::standard());
    out
}

/// Decodes a record written by [`encode`].
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => bincode::decode_from_slice(rest, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown record version {v}"))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct UserRecord {
    pub user_id: UserId,
    pub username: String,
    pub display_name: String,
    /// PHC string of the argon2id hash.
    pub password_hash: String,
    pub created_at: u64,
    /// Unix ms the user was last seen online (0: never).
    pub last_seen: u64,
    /// Logged-in devices; a device's token is valid only while it is listed here with the
    /// same `token_id`.
    pub devices: Vec<DeviceRecord>,
    /// Source of `token_id`s; only grows, so a token from before a logout never matches again.
    pub token_counter: u64,
}

/// One logged-in device of a user.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub name: String,
    pub token_id: u64,
    pub created_at: u64,
    /// Webhook URL for this device's push notifications.
    pub push_target: Option<String>,
}

/// A pending push notification for one target of one offline recipient.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct PushJob {
    pub job_id: u64,
    pub recipient: UserId,
    pub device_id: DeviceId,
    pub target: String,
    pub conversation: ConversationId,
    pub sender: UserId,
    pub message_id: MessageId,
    /// At most 100 characters of the body, unless previews are off.
    pub preview: Option<String>,
    pub ts: u64,
    /// Failed deliveries so far.
    pub attempts: u32,
}

/// A group conversation.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct GroupRecord {
    pub group_id: GroupId,
    pub name: String,
    pub owner: UserId,
    /// Members in the order they joined; at most 100.
    pub members: Vec<GroupMember>,
    pub created_at: u64,
}

/// One member of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct GroupMember {
    pub user: UserId,
    /// An id issued when the member joined: the member reads only history after it.
    pub joined_at: MessageId,
}

impl GroupRecord {
    /// The member entry of `user`, if `user` is a member.
    pub fn member(&self, user: UserId) -> Option<&GroupMember> {
        self.members.iter().find(|m| m.user == user)
    }

    /// Member ids, in join order.
    pub fn member_ids(&self) -> Vec<UserId> {
        self.members.iter().map(|m| m.user).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_versions() {
        let u = UserRecord {
            user_id: UserId(1),
            username: "a".into(),
            display_name: "A".into(),
            password_hash: "h".into(),
            created_at: 2,
            last_seen: 3,
            devices: vec![DeviceRecord {
                device_id: DeviceId(4),
                name: "phone".into(),
                token_id: 5,
                created_at: 6,
                push_target: Some("http://x".into()),
            }],
            token_counter: 5,
        };
        let bytes = encode(&u);
        assert_eq!(decode::<UserRecord>(&bytes).unwrap(), u);
        let mut future = bytes.clone();
        future[0] = 2;
        assert!(decode::<UserRecord>(&future).is_err());
        assert!(decode::<UserRecord>(&[]).is_err());
        assert!(decode::<UserRecord>(&bytes[..bytes.len() - 3]).is_err());
    }
}
