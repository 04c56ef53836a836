//! The limits of docs/protocol.md, in one place so that client and server agree.

/// Largest message body, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 100_000;
/// Largest single WebSocket message or QUIC frame, either direction.
pub const MAX_FRAME_BYTES: usize = 131_072;
/// Largest group, the creator included.
pub const MAX_GROUP_MEMBERS: usize = 100;
/// Username length bounds (characters of `a-z 0-9 _ . -`).
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;
/// Password length bounds, in bytes.
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;
/// Display name bound, in bytes.
pub const MAX_DISPLAY_NAME_BYTES: usize = 64;
/// Client message id bound, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;
/// Time a new connection has to send `auth`, in milliseconds.
pub const AUTH_TIMEOUT_MS: u64 = 10_000;
/// Largest `limit` on a history page.
pub const MAX_HISTORY_LIMIT: u32 = 200;
/// Default `limit` on a history page.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// Largest and default `limit` of one `sync_batch`.
pub const MAX_SYNC_LIMIT: u32 = 500;
/// Largest number of users in one `subscribe_presence`.
pub const MAX_SUBSCRIBE_USERS: usize = 1000;
/// Budget for the messages of one server frame (`sync_batch`, `history`), so that every frame
/// stays under [`MAX_FRAME_BYTES`] even when each message is at the body limit.
pub const FRAME_PAYLOAD_BUDGET: usize = 110_000;

/// Whether `name` is a valid username: 3 to 32 chars of `a-z 0-9 _ . -`.
pub fn valid_username(name: &str) -> bool {
    USERNAME_LEN.contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(valid_username("alice"));
        assert!(valid_username("a.b-c_9"));
        assert!(!valid_username("al"));
        assert!(!valid_username("Alice"));
        assert!(!valid_username("a b c"));
        assert!(!valid_username(&"a".repeat(33)));
        assert!(!valid_username("élan"));
    }
}
