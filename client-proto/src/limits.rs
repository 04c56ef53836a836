//! The limits of docs/protocol.md, in one place so that client and server agree.

/// Largest message body, in bytes of UTF-8 (the decoded string, whatever the codec: one body
/// rule for JSON and binary clients).
pub const MAX_BODY_BYTES: usize = 100_000;
/// Largest single WebSocket message or QUIC frame, either direction (640 KiB). Sized so that
/// a body at [`MAX_BODY_BYTES`] fits in any frame that carries it even in the worst JSON
/// escaping ([`JSON_ESCAPE_FACTOR`]: 100,000 bytes of U+0001 are 600,000 bytes of
/// `\u0001`): a client can send any valid body, and every frame the node sends stays under
/// the limit it asks of clients (checked by the tests below and in `codec.rs`).
pub const MAX_FRAME_BYTES: usize = 655_360;
/// The most bytes one byte of a string can become in JSON: a control character is written
/// `\u00XX` (serde_json; JavaScript's `JSON.stringify` the same; no encoder needs more).
pub const JSON_ESCAPE_FACTOR: usize = 6;
/// Bound on what a message takes in a frame besides its escaped body and client id: the ids,
/// the conversation, `ts`, the field names and punctuation (about 200 bytes in JSON at
/// the largest ids).
pub const MESSAGE_OVERHEAD_BYTES: usize = 320;
/// Bound on what a `sync_batch`, `history` or `message` frame takes besides its messages.
pub const FRAME_ENVELOPE_BYTES: usize = 1_024;
/// Largest `message` of an `error` frame, in bytes (longer ones are cut at a character
/// boundary), so that an error never echoes a whole frame back.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1_024;
/// Longest `ref` an `error` frame echoes (a client id over [`MAX_CLIENT_ID_BYTES`] is still
/// echoed so the client can match the refusal; a longer one is left out).
pub const MAX_ECHOED_REF_BYTES: usize = 4 * MAX_CLIENT_ID_BYTES;
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
/// Budget for the messages of one server frame (`sync_batch`, `history`), counted with
/// [`message_weight`], so that every frame stays under [`MAX_FRAME_BYTES`] in either codec
/// whatever its bodies hold. A page always takes its first message, which fits alone.
pub const FRAME_PAYLOAD_BUDGET: usize = MAX_FRAME_BYTES - FRAME_ENVELOPE_BYTES;

/// An upper bound on the bytes a message with a body of `body_len` bytes and a client id of
/// `client_id_len` bytes takes in any frame, in either codec (JSON escaping at its worst).
pub const fn message_weight(body_len: usize, client_id_len: usize) -> usize {
    JSON_ESCAPE_FACTOR * (body_len + client_id_len) + MESSAGE_OVERHEAD_BYTES
}

// A message at the limits fits in a frame with its envelope, and so does a `send` carrying it.
const _: () = assert!(
    FRAME_ENVELOPE_BYTES + message_weight(MAX_BODY_BYTES, MAX_CLIENT_ID_BYTES) <= MAX_FRAME_BYTES
);

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

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

    #[test]
    fn truncation_keeps_whole_characters() {
        let mut s = "aé".repeat(3);
        truncate_utf8(&mut s, 2);
        assert_eq!(s, "a");
        let mut s = "abc".to_string();
        truncate_utf8(&mut s, 10);
        assert_eq!(s, "abc");
    }
}
