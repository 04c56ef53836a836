//! Ids. Every 64-bit id is a decimal string in JSON (JavaScript loses precision above 2^53)
//! and a plain integer in the binary codec.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an id did not parse: ids are canonical decimal strings, `0` to `18446744073709551615`,
/// digits only (no sign, no leading zeros, no spaces).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: ids are decimal strings of digits, without sign or leading zeros")]
pub struct InvalidId(pub String);

/// Parses a canonical decimal id.
pub fn parse_id(s: &str) -> Result<u64, InvalidId> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    let bad = || InvalidId(s.chars().take(32).collect());
    if !canonical {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

/// Serde helpers for a `u64` written as a decimal string. Only strings are accepted: a JSON
/// number would be silently rounded by JavaScript clients above 2^53.
mod decimal {
    use super::*;

    pub fn serialize<S: Serializer>(v: u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an id as a string of decimal digits, such as \"42\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
                parse_id(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
            bincode::Encode, bincode::Decode,
        )]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_id(s).map($name)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                decimal::serialize(self.0, s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                decimal::deserialize(d).map($name)
            }
        }
    };
}

define_id!(
    /// A user account.
    UserId
);
define_id!(
    /// One device (login) of a user; each has its own token.
    DeviceId
);
define_id!(
    /// A group conversation.
    GroupId
);
define_id!(
    /// A message: time-ordered, `[41 bits ms since 2025-01-01][10 bits node][12 bits counter]`.
    MessageId
);
define_id!(
    /// A position in a user's inbox (the message sync queue): where an inbox entry was
    /// written, in the same 64-bit time-ordered layout as message ids (the hybrid logical
    /// clock of the node that wrote it). A sync cursor is a position: everything for the user
    /// at or below it has been sent. A message keeps its id for good; a retried send that
    /// completes an earlier attempt writes its inbox entries at a new position.
    Position
);

/// Milliseconds from the Unix epoch to 2025-01-01T00:00:00Z, the epoch of message ids.
pub const ID_EPOCH_MS: u64 = 1_735_689_600_000;
/// Bits of the per-millisecond counter.
pub const COUNTER_BITS: u32 = 12;
/// Bits of the node id.
pub const NODE_BITS: u32 = 10;
/// Shift of the millisecond part.
pub const TIME_SHIFT: u32 = COUNTER_BITS + NODE_BITS;

impl MessageId {
    /// Builds an id from its parts: milliseconds since [`ID_EPOCH_MS`], node id, counter.
    pub fn from_parts(ms_since_epoch: u64, node: u16, counter: u16) -> Self {
        MessageId(
            (ms_since_epoch << TIME_SHIFT)
                | (u64::from(node & 0x3ff) << COUNTER_BITS)
                | u64::from(counter & 0xfff),
        )
    }

    /// Milliseconds since [`ID_EPOCH_MS`].
    pub fn ms_since_epoch(self) -> u64 {
        self.0 >> TIME_SHIFT
    }

    /// Unix time in milliseconds at which the id was issued.
    pub fn unix_ms(self) -> u64 {
        self.ms_since_epoch() + ID_EPOCH_MS
    }

    /// The node that issued the id.
    pub fn node(self) -> u16 {
        ((self.0 >> COUNTER_BITS) & 0x3ff) as u16
    }

    /// The per-millisecond counter.
    pub fn counter(self) -> u16 {
        (self.0 & 0xfff) as u16
    }

    /// The smallest id that any node could issue at `ms` milliseconds earlier than this id.
    pub fn minus_ms(self, ms: u64) -> MessageId {
        MessageId(self.ms_since_epoch().saturating_sub(ms) << TIME_SHIFT)
    }
}

/// A conversation: `d:<low user id>:<high user id>` or `g:<group id>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, bincode::Encode, bincode::Decode)]
pub enum ConversationId {
    /// A 1:1 conversation; `low <= high`.
    Direct { low: UserId, high: UserId },
    /// A group conversation.
    Group(GroupId),
}

impl ConversationId {
    /// The direct conversation between two users, in canonical order.
    pub fn direct(a: UserId, b: UserId) -> Self {
        ConversationId::Direct {
            low: a.min(b),
            high: a.max(b),
        }
    }

    /// Whether `user` takes part in this direct conversation (always false for groups: group
    /// membership lives in the group record).
    pub fn is_direct_participant(&self, user: UserId) -> bool {
        matches!(self, ConversationId::Direct { low, high } if *low == user || *high == user)
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ConversationId::Direct { low, high } => write!(f, "d:{low}:{high}"),
            ConversationId::Group(g) => write!(f, "g:{g}"),
        }
    }
}

/// Why a conversation id did not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid conversation id {0:?}: expected d:<low user id>:<high user id> or g:<group id>")]
pub struct InvalidConversationId(pub String);

impl FromStr for ConversationId {
    type Err = InvalidConversationId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidConversationId(s.chars().take(100).collect());
        let mut parts = s.split(':');
        let conv = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("d"), Some(a), Some(b), None) => {
                let low: UserId = a.parse().map_err(|_| bad())?;
                let high: UserId = b.parse().map_err(|_| bad())?;
                if low > high {
                    return Err(bad());
                }
                ConversationId::Direct { low, high }
            }
            (Some("g"), Some(g), None, None) => {
                ConversationId::Group(g.parse().map_err(|_| bad())?)
            }
            _ => return Err(bad()),
        };
        // Reject non-canonical spellings such as leading zeros or "+1".
        if conv.to_string() != s {
            return Err(bad());
        }
        Ok(conv)
    }
}

impl Serialize for ConversationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConversationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_are_decimal_strings_in_json() {
        let json = serde_json::to_string(&UserId(7301820283641856)).unwrap();
        assert_eq!(json, "\"7301820283641856\"");
        let back: UserId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, UserId(7301820283641856));
        assert!(serde_json::from_str::<UserId>("\"12x\"").is_err());
        assert!(serde_json::from_str::<UserId>("\"-1\"").is_err());
    }

    #[test]
    fn ids_are_canonical_digit_strings_only() {
        for bad in [
            "42",
            "\"+42\"",
            "\"042\"",
            "\"\"",
            "\" 1\"",
            "\"1 \"",
            "\"1e3\"",
            "\"0x10\"",
            "\"18446744073709551616\"",
            "null",
            "4.2",
            "true",
        ] {
            let e = serde_json::from_str::<UserId>(bad).unwrap_err().to_string();
            assert!(e.contains("decimal"), "{bad}: {e}");
        }
        assert_eq!(serde_json::from_str::<UserId>("\"0\"").unwrap(), UserId(0));
        assert_eq!(
            serde_json::from_str::<UserId>("\"18446744073709551615\"").unwrap(),
            UserId(u64::MAX)
        );
        assert!("+1".parse::<GroupId>().is_err());
        assert!("007".parse::<MessageId>().is_err());
        assert_eq!("7".parse::<MessageId>().unwrap(), MessageId(7));
    }

    #[test]
    fn conversation_ids() {
        let c = ConversationId::direct(UserId(9), UserId(3));
        assert_eq!(c.to_string(), "d:3:9");
        assert_eq!("d:3:9".parse::<ConversationId>().unwrap(), c);
        assert_eq!(
            "g:42".parse::<ConversationId>().unwrap(),
            ConversationId::Group(GroupId(42))
        );
        for bad in [
            "d:9:3", "d:3", "d:3:9:1", "g:", "g:01", "x:1", "", "d:+3:9", "g:1:2",
        ] {
            assert!(bad.parse::<ConversationId>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn message_id_parts_round_trip(ms in 0u64..(1 << 41), node in 0u16..1024, counter in 0u16..4096) {
            let id = MessageId::from_parts(ms, node, counter);
            prop_assert_eq!(id.ms_since_epoch(), ms);
            prop_assert_eq!(id.node(), node);
            prop_assert_eq!(id.counter(), counter);
        }

        #[test]
        fn conversation_id_round_trips(a: u64, b: u64, g: u64) {
            let d = ConversationId::direct(UserId(a), UserId(b));
            prop_assert_eq!(d.to_string().parse::<ConversationId>().unwrap(), d);
            let g = ConversationId::Group(GroupId(g));
            prop_assert_eq!(g.to_string().parse::<ConversationId>().unwrap(), g);
        }
    }
}
