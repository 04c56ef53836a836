//! Stored records and their versioned encoding: one version byte, then bincode 2. A reader
//! that meets an unknown version refuses it instead of misreading it; a kind whose layout
//! changed keeps its old layout here and a [`Record::migrate`] from it (the migration path).

use bincode::{Decode, Encode};
use client_proto::ids::{ConversationId, DeviceId, GroupId, MessageId, UserId};

use super::StoreError;

/// A stored record kind: its current layout's version, and how older layouts are read.
pub trait Record: Encode + Decode<()> + Sized {
    /// The version byte this kind is written with.
    const VERSION: u8 = 1;
    /// Reads a record written with an older `version` (its bincode bytes `rest`).
    fn migrate(version: u8, rest: &[u8]) -> Result<Self, StoreError> {
        let _ = rest;
        Err(StoreError::Corrupt(format!(
            "unknown record version {version}"
        )))
    }
}

fn bincode_decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, StoreError> {
    bincode::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Encodes a record with its version byte.
pub fn encode<T: Record>(value: &T) -> Vec<u8> {
    let mut out = vec![T::VERSION];
    // Encoding into a Vec cannot fail for our record types.
    let _ = bincode::encode_into_std_write(value, &mut out, bincode::config::standard());
    out
}

/// Decodes a record written by [`encode`] (of this or an older version).
pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&v, rest)) if v == T::VERSION => bincode_decode(rest),
        Some((&v, rest)) if v < T::VERSION => T::migrate(v, rest),
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown record version {v}"))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

impl Record for client_proto::Message {}
impl Record for PushJob {}
impl Record for GroupRecord {}

/// An inbox entry that refers to its message's history entry instead of holding the body: the
/// message with an empty body, and the body's length (what the entry weighs in a page). A
/// large body is then not copied into every inbox it goes to (`Store::message_batch`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct InboxRef {
    pub header: client_proto::Message,
    pub body_len: u32,
}

impl Record for InboxRef {
    /// A byte of its own, unlike any `Message` version, so that an inbox value says which of
    /// the two it is ([`InboxEntry::decode`]).
    const VERSION: u8 = 0x80;
    fn migrate(version: u8, _rest: &[u8]) -> Result<Self, StoreError> {
        Err(StoreError::Corrupt(format!(
            "not an inbox reference (version {version})"
        )))
    }
}

/// What an inbox entry holds: the message, or a reference to its history entry.
#[derive(Debug, PartialEq, Eq)]
pub enum InboxEntry {
    Inline(client_proto::Message),
    Ref(InboxRef),
}

impl InboxEntry {
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.first() {
            Some(&InboxRef::VERSION) => Ok(InboxEntry::Ref(decode(bytes)?)),
            _ => Ok(InboxEntry::Inline(decode(bytes)?)),
        }
    }

    /// The body's length in bytes.
    pub fn body_len(&self) -> usize {
        match self {
            InboxEntry::Inline(m) => m.body.len(),
            InboxEntry::Ref(r) => r.body_len as usize,
        }
    }

    /// The message's client id.
    pub fn client_id(&self) -> &str {
        match self {
            InboxEntry::Inline(m) => &m.client_id,
            InboxEntry::Ref(r) => &r.header.client_id,
        }
    }
}

/// Who may do something to a user (a privacy setting; `client_proto::http::Audience`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub enum Audience {
    #[default]
    Everyone,
    /// Mutual friends only.
    Friends,
    Nobody,
}

/// A user's privacy settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Privacy {
    /// Who may send them direct messages.
    pub messages: Audience,
    /// Who may add them to a group.
    pub group_adds: Audience,
}

/// A user account. Version 2 added `privacy` and each device's `last_used`.
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
    pub privacy: Privacy,
}

impl Record for UserRecord {
    const VERSION: u8 = 2;
    fn migrate(version: u8, rest: &[u8]) -> Result<Self, StoreError> {
        match version {
            1 => Ok(bincode_decode::<UserRecordV1>(rest)?.into()),
            v => Err(StoreError::Corrupt(format!("unknown record version {v}"))),
        }
    }
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
    /// Unix ms the device last logged in or authenticated (noted at a coarse granularity:
    /// see `domain::accounts`). Idle devices expire; the oldest-idle one is evicted at the cap.
    pub last_used: u64,
}

/// Version 1 of [`UserRecord`] (no privacy settings, devices without `last_used`).
#[derive(Decode)]
#[cfg_attr(test, derive(Encode))]
struct UserRecordV1 {
    user_id: UserId,
    username: String,
    display_name: String,
    password_hash: String,
    created_at: u64,
    last_seen: u64,
    devices: Vec<DeviceRecordV1>,
    token_counter: u64,
}

/// Version 1 of [`DeviceRecord`].
#[derive(Decode)]
#[cfg_attr(test, derive(Encode))]
struct DeviceRecordV1 {
    device_id: DeviceId,
    name: String,
    token_id: u64,
    created_at: u64,
    push_target: Option<String>,
}

impl From<UserRecordV1> for UserRecord {
    fn from(v: UserRecordV1) -> Self {
        UserRecord {
            user_id: v.user_id,
            username: v.username,
            display_name: v.display_name,
            password_hash: v.password_hash,
            created_at: v.created_at,
            last_seen: v.last_seen,
            devices: v
                .devices
                .into_iter()
                .map(|d| DeviceRecord {
                    device_id: d.device_id,
                    name: d.name,
                    token_id: d.token_id,
                    created_at: d.created_at,
                    push_target: d.push_target,
                    // Unknown: counted from its first login.
                    last_used: d.created_at,
                })
                .collect(),
            token_counter: v.token_counter,
            privacy: Privacy::default(),
        }
    }
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
                last_used: 7,
            }],
            token_counter: 5,
            privacy: Privacy {
                messages: Audience::Friends,
                group_adds: Audience::Nobody,
            },
        };
        let bytes = encode(&u);
        assert_eq!(bytes[0], 2);
        assert_eq!(decode::<UserRecord>(&bytes).unwrap(), u);
        let mut future = bytes.clone();
        future[0] = 3;
        assert!(decode::<UserRecord>(&future).is_err());
        assert!(decode::<UserRecord>(&[]).is_err());
        assert!(decode::<UserRecord>(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn inbox_entries_are_messages_or_references() {
        let m = client_proto::Message {
            message_id: MessageId(1 << 30),
            conversation: ConversationId::Group(GroupId(3)),
            from: UserId(1),
            to: None,
            group: Some(GroupId(3)),
            body: "b".repeat(5000),
            ts: 9,
            client_id: "c-1".into(),
        };
        let inline = InboxEntry::decode(&encode(&m)).unwrap();
        assert_eq!((inline.body_len(), inline.client_id()), (5000, "c-1"));
        assert_eq!(inline, InboxEntry::Inline(m.clone()));
        let r = InboxRef {
            header: client_proto::Message {
                body: String::new(),
                ..m.clone()
            },
            body_len: 5000,
        };
        let bytes = encode(&r);
        assert_eq!(bytes[0], 0x80);
        let entry = InboxEntry::decode(&bytes).unwrap();
        assert_eq!((entry.body_len(), entry.client_id()), (5000, "c-1"));
        assert_eq!(entry, InboxEntry::Ref(r));
        // A reference is not a message, and a message is not a reference.
        assert!(decode::<client_proto::Message>(&bytes).is_err());
        assert!(decode::<InboxRef>(&encode(&m)).is_err());
    }

    #[test]
    fn version_1_user_records_migrate() {
        let v1 = UserRecordV1 {
            user_id: UserId(1),
            username: "a".into(),
            display_name: "A".into(),
            password_hash: "h".into(),
            created_at: 2,
            last_seen: 3,
            devices: vec![DeviceRecordV1 {
                device_id: DeviceId(4),
                name: "phone".into(),
                token_id: 5,
                created_at: 6,
                push_target: None,
            }],
            token_counter: 5,
        };
        let mut bytes = vec![1];
        bincode::encode_into_std_write(&v1, &mut bytes, bincode::config::standard()).unwrap();
        let u = decode::<UserRecord>(&bytes).unwrap();
        assert_eq!(u.username, "a");
        assert_eq!(
            u.devices[0].last_used, 6,
            "a migrated device counts from its login"
        );
        assert_eq!(u.privacy, Privacy::default());
        assert_eq!(decode::<UserRecord>(&encode(&u)).unwrap(), u);
    }
}
