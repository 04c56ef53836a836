//! The two encodings of frames: JSON text (WebSocket text frames) and bincode 2 (WebSocket
//! binary frames and QUIC). Decoding never panics; sizes are checked before parsing.
//!
//! Also the other facts of the wire that node and clients must agree on: the QUIC ALPN
//! ([`ALPN`]), the length prefix of QUIC frames ([`length_prefix_codec`]) and the close codes
//! ([`CloseCode`]).

use bincode::config::Configuration;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::LengthDelimitedCodec;

use crate::limits::MAX_FRAME_BYTES;

/// The ALPN of the client protocol over QUIC.
pub const ALPN: &[u8] = b"chat/1";

/// The bytes of the big-endian length that precedes each frame on the QUIC stream.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// The framing of the QUIC stream: each frame (binary codec) is preceded by its length,
/// [`LENGTH_PREFIX_BYTES`] bytes big-endian. A frame longer than `max_frame_bytes` is an error
/// (the node reads client frames up to [`MAX_FRAME_BYTES`]; clients leave server frames slack).
pub fn length_prefix_codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX_BYTES)
        .big_endian()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// The close codes a node uses: the WebSocket close frame's code, and the application error
/// code of a QUIC connection close.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u16)]
pub enum CloseCode {
    /// The session ended normally.
    Normal = 1000,
    /// The node is shutting down, or the client stopped heartbeating.
    GoingAway = 1001,
    /// A WebSocket protocol violation (a reserved opcode or bits, an unmasked client frame,
    /// a broken fragment sequence).
    ProtocolError = 1002,
    /// A text frame that is not UTF-8.
    InvalidData = 1007,
    /// Not authenticated in time, authentication failed, the device logged out, the Origin is
    /// not allowed, or the token expired.
    PolicyViolation = 1008,
    /// A frame over [`MAX_FRAME_BYTES`].
    TooBig = 1009,
}

impl CloseCode {
    /// The number on the wire.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The close code numbered `code`, if it is one of these.
    pub fn from_u16(code: u16) -> Option<CloseCode> {
        [
            CloseCode::Normal,
            CloseCode::GoingAway,
            CloseCode::ProtocolError,
            CloseCode::InvalidData,
            CloseCode::PolicyViolation,
            CloseCode::TooBig,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }
}

impl From<CloseCode> for u16 {
    fn from(c: CloseCode) -> u16 {
        c.code()
    }
}

/// Which encoding a connection uses; chosen by the first frame the client sends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Codec {
    Json,
    Binary,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// More bytes on the wire than [`MAX_FRAME_BYTES`] (checked before parsing).
    #[error("frame is {0} bytes; the limit is {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// A well-formed frame whose `type` (binary: variant) is not one of the protocol's.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// A known frame type with a field that is missing or of the wrong shape; names the field.
    #[error("{kind} frame: {message}")]
    InvalidField { kind: String, message: String },
    /// Not a frame at all (not JSON, not an object, truncated binary, trailing bytes).
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Longest detail kept from a parser's error (they can quote the input).
const MAX_DETAIL_BYTES: usize = 256;

fn detail(e: impl std::fmt::Display) -> String {
    let mut s = e.to_string();
    crate::limits::truncate_utf8(&mut s, MAX_DETAIL_BYTES);
    s
}

/// The most memory one client frame's binary decoding may claim, which bincode checks before
/// each allocation (a length prefix cannot make the decoder reserve more). It is not the
/// frame limit: bincode counts a `Vec<UserId>` at 8 bytes an id that may be one byte on the
/// wire, so it is 8 times the frame limit, which no frame within [`MAX_FRAME_BYTES`] can
/// reach (strings claim their length, at most their wire bytes); frames are refused by their
/// wire size first ([`decode`]).
const CLIENT_DECODE_MEMORY: usize = 8 * MAX_FRAME_BYTES;
/// The same for server frames: a `Vec<Message>` claims `size_of::<Message>()` (128 bytes) a
/// message of at least 10 bytes on the wire.
const SERVER_DECODE_MEMORY: usize = 16 * MAX_FRAME_BYTES;

fn bin_decode<T: bincode::Decode<()>, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    let config = bincode::config::standard()
        .with_big_endian()
        .with_limit::<LIMIT>();
    bincode::decode_from_slice(bytes, config)
}

fn bin_encode_config() -> Configuration<bincode::config::BigEndian, bincode::config::Varint> {
    bincode::config::standard().with_big_endian()
}

/// Encodes a frame.
pub fn encode<T: Serialize + bincode::Encode>(codec: Codec, frame: &T) -> Vec<u8> {
    match codec {
        // Serialising our own frame types cannot fail: no maps with non-string keys, no
        // custom serialisers that error, and no size limit on the way out (frames are kept
        // under the limit by construction: see `limits::message_weight`).
        Codec::Json => serde_json::to_vec(frame).unwrap_or_default(),
        Codec::Binary => bincode::encode_to_vec(frame, bin_encode_config()).unwrap_or_default(),
    }
}

/// A frame encoded in `codec`, JSON as text: made from a `String`, a JSON frame needs no UTF-8
/// check on its way into a WebSocket text message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Encoded {
    Text(String),
    Binary(Vec<u8>),
}

impl Encoded {
    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Encoded::Text(t) => t.as_bytes(),
            Encoded::Binary(b) => b,
        }
    }

    /// The encoded bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Encoded::Text(t) => t.into_bytes(),
            Encoded::Binary(b) => b,
        }
    }
}

/// [`encode`], keeping a JSON frame as text.
pub fn encode_as<T: Serialize + bincode::Encode>(codec: Codec, frame: &T) -> Encoded {
    match codec {
        // As in `encode`: serialising our frame types cannot fail.
        Codec::Json => Encoded::Text(serde_json::to_string(frame).unwrap_or_default()),
        Codec::Binary => Encoded::Binary(encode(codec, frame)),
    }
}

/// A type of frame this codec decodes: its `type` names, and the shape of each one's fields
/// (to say which field is wrong when a frame of a known type does not decode).
pub trait Frame: DeserializeOwned + bincode::Decode<()> {
    /// The binary codec's name of the enum (bincode's `type_name`).
    const ENUM_NAME: &'static str;
    /// Decodes one frame from the start of `bytes` in the binary codec, with this type's
    /// memory limit.
    fn decode_binary(bytes: &[u8]) -> Result<(Self, usize), bincode::error::DecodeError>;
    /// Whether `kind` is one of this enum's `type`s.
    fn is_kind(kind: &str) -> bool;
    /// The first field of a `kind` frame in `fields` that does not decode, with why.
    fn field_error(
        _kind: &str,
        _fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<String> {
        None
    }
}

/// Checks field `name` of `fields` as a `T`: `None` if it is absent or fine.
fn check_field<T: DeserializeOwned>(
    fields: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Option<String> {
    let v = fields.get(name)?;
    T::deserialize(v)
        .err()
        .map(|e| format!("field `{name}`: {}", detail(e)))
}

impl Frame for crate::frames::ClientFrame {
    const ENUM_NAME: &'static str = "ClientFrame";

    fn decode_binary(bytes: &[u8]) -> Result<(Self, usize), bincode::error::DecodeError> {
        bin_decode::<Self, CLIENT_DECODE_MEMORY>(bytes)
    }

    fn is_kind(kind: &str) -> bool {
        Self::KINDS.contains(&kind)
    }

    fn field_error(kind: &str, f: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
        use crate::frames::Recipient;
        use crate::ids::{ConversationId, MessageId, Position, UserId};
        match kind {
            "auth" => check_field::<String>(f, "token"),
            "send" => check_field::<String>(f, "id")
                .or_else(|| check_field::<Recipient>(f, "to"))
                .or_else(|| check_field::<String>(f, "body")),
            "sync" => check_field::<Option<Position>>(f, "after")
                .or_else(|| check_field::<Option<u32>>(f, "limit")),
            "subscribe_presence" | "unsubscribe_presence" => check_field::<Vec<UserId>>(f, "users"),
            "history" => check_field::<ConversationId>(f, "conversation")
                .or_else(|| check_field::<Option<MessageId>>(f, "before"))
                .or_else(|| check_field::<Option<u32>>(f, "limit")),
            "seen" => check_field::<MessageId>(f, "message_id"),
            _ => None,
        }
    }
}

impl Frame for crate::frames::ServerFrame {
    const ENUM_NAME: &'static str = "ServerFrame";

    fn decode_binary(bytes: &[u8]) -> Result<(Self, usize), bincode::error::DecodeError> {
        bin_decode::<Self, SERVER_DECODE_MEMORY>(bytes)
    }

    fn is_kind(kind: &str) -> bool {
        [
            "ready",
            "ack",
            "message",
            "sync_batch",
            "presence",
            "history",
            "error",
            "draining",
            "cursor",
        ]
        .contains(&kind)
    }
}

/// Decodes a frame of type `T`, refusing anything over the frame limit (in bytes on the
/// wire) before parsing.
pub fn decode<T: Frame>(codec: Codec, bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    match codec {
        Codec::Json => {
            serde_json::from_slice(bytes).map_err(|e| classify_json_error::<T>(bytes, e))
        }
        Codec::Binary => {
            let (frame, used) = T::decode_binary(bytes).map_err(|e| match e {
                bincode::error::DecodeError::UnexpectedVariant {
                    found, type_name, ..
                } if type_name == T::ENUM_NAME => {
                    DecodeError::UnknownType(format!("binary frame variant {found}"))
                }
                e => DecodeError::Malformed(detail(e)),
            })?;
            if used != bytes.len() {
                return Err(DecodeError::Malformed(format!(
                    "{} trailing bytes after the frame",
                    bytes.len() - used
                )));
            }
            Ok(frame)
        }
    }
}

/// Tells an unknown `type` and a bad field of a known type apart from malformed JSON (only
/// on the error path).
fn classify_json_error<T: Frame>(bytes: &[u8], err: serde_json::Error) -> DecodeError {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return DecodeError::Malformed(detail(err));
    };
    let serde_json::Value::Object(map) = value else {
        return DecodeError::Malformed("a frame is a JSON object".into());
    };
    match map.get("type") {
        None => DecodeError::Malformed("missing \"type\"".into()),
        Some(serde_json::Value::String(t)) if !T::is_kind(t) => {
            let mut t = t.clone();
            crate::limits::truncate_utf8(&mut t, 64);
            DecodeError::UnknownType(t)
        }
        Some(serde_json::Value::String(t)) => DecodeError::InvalidField {
            kind: t.clone(),
            message: T::field_error(t, &map).unwrap_or_else(|| detail(err)),
        },
        Some(_) => DecodeError::Malformed("\"type\" must be a string".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{ClientFrame, Recipient, ServerFrame};
    use crate::ids::{ConversationId, MessageId, UserId};

    #[test]
    fn json_frames_match_the_protocol() {
        let f: ClientFrame = decode(
            Codec::Json,
            br#"{"type":"send","id":"c1","to":{"user":"42"},"body":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Send {
                id: "c1".into(),
                to: Recipient::User(UserId(42)),
                body: "hi".into()
            }
        );
        let f: ClientFrame = decode(Codec::Json, br#"{"type":"sync","after":null}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Sync {
                after: None,
                limit: None
            }
        );
        let f: ClientFrame = decode(Codec::Json, br#"{"type":"heartbeat"}"#).unwrap();
        assert_eq!(f, ClientFrame::Heartbeat);

        let ack = ServerFrame::Ack {
            reference: "c1".into(),
            message_id: MessageId(5),
            conversation: ConversationId::direct(UserId(2), UserId(1)),
            ts: 7,
        };
        let text = String::from_utf8(encode(Codec::Json, &ack)).unwrap();
        assert_eq!(
            text,
            r#"{"type":"ack","ref":"c1","message_id":"5","conversation":"d:1:2","ts":7}"#
        );
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(
            decode::<ClientFrame>(Codec::Json, br#"{"type":"dance"}"#),
            Err(DecodeError::UnknownType(t)) if t == "dance"
        ));
        assert!(matches!(
            decode::<ClientFrame>(Codec::Json, b"{not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<ClientFrame>(Codec::Json, br#"{"type":"send","id":"x"}"#),
            Err(DecodeError::InvalidField { kind, message }) if kind == "send" && message.contains("missing field `to`")
        ));
        for (frame, field) in [
            (
                &br#"{"type":"send","id":"x","to":{"foo":"1"},"body":"b"}"#[..],
                "to",
            ),
            (
                br#"{"type":"send","id":"x","to":{"user":"+42"},"body":"b"}"#,
                "to",
            ),
            (
                br#"{"type":"send","id":"x","to":{"user":42},"body":"b"}"#,
                "to",
            ),
            (br#"{"type":"send","id":"x","to":"42","body":"b"}"#, "to"),
            (
                br#"{"type":"send","id":7,"to":{"user":"1"},"body":"b"}"#,
                "id",
            ),
            (br#"{"type":"seen","message_id":"01"}"#, "message_id"),
            (
                br#"{"type":"history","conversation":"d:2:1"}"#,
                "conversation",
            ),
            (br#"{"type":"subscribe_presence","users":[1]}"#, "users"),
        ] {
            match decode::<ClientFrame>(Codec::Json, frame) {
                Err(e @ DecodeError::InvalidField { .. }) => {
                    assert!(e.to_string().contains(&format!("field `{field}`")), "{e}")
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(frame)),
            }
        }
        assert!(matches!(
            decode::<ClientFrame>(Codec::Json, b"[1,2]"),
            Err(DecodeError::Malformed(_))
        ));
        let big = vec![b' '; MAX_FRAME_BYTES + 1];
        assert_eq!(
            decode::<ClientFrame>(Codec::Json, &big),
            Err(DecodeError::TooLarge(MAX_FRAME_BYTES + 1))
        );
    }

    #[test]
    fn binary_round_trip_and_garbage() {
        let f = ClientFrame::Send {
            id: "c".into(),
            to: Recipient::User(UserId(u64::MAX)),
            body: "é".repeat(10),
        };
        let bytes = encode(Codec::Binary, &f);
        assert_eq!(decode::<ClientFrame>(Codec::Binary, &bytes).unwrap(), f);
        for garbage in [
            &b""[..],
            b"\xff\xff\xff\xff\xff",
            b"\x01\xfd\xff\xff\xff\xff\xff\xff\xff\x7f",
        ] {
            assert!(decode::<ClientFrame>(Codec::Binary, garbage).is_err());
        }
        // A bad recipient variant is a bad field, not an unknown frame type.
        let mut bytes = encode(Codec::Binary, &f);
        bytes[1] = 7;
        assert!(matches!(
            decode::<ClientFrame>(Codec::Binary, &bytes),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn the_retry_hint_is_json_only_and_keeps_the_binary_error_layout() {
        let f = ServerFrame::rate_limited("too many sends; retry in 120 ms", Some("a".into()), 120);
        let json = String::from_utf8(encode(Codec::Json, &f)).unwrap();
        assert!(
            json.ends_with(r#""ref":"a","retry_after_ms":120}"#),
            "{json}"
        );
        assert_eq!(
            decode::<ServerFrame>(Codec::Json, json.as_bytes()).unwrap(),
            f
        );
        // Binary: variant 6, code 8 (rate_limited), the message, the ref; nothing more.
        let bin = encode(Codec::Binary, &f);
        let plain = ServerFrame::error(
            crate::ErrorCode::RateLimited,
            "too many sends; retry in 120 ms",
            Some("a".into()),
        );
        assert_eq!(bin, encode(Codec::Binary, &plain));
        assert_eq!(&bin[..2], &[6, 8]);
        assert_eq!(decode::<ServerFrame>(Codec::Binary, &bin).unwrap(), plain);
    }

    #[test]
    fn decode_memory_limits_cover_the_worst_ratio() {
        // The smallest message on the wire is 10 bytes (ten one-byte fields).
        assert!(16 * 10 >= std::mem::size_of::<crate::frames::Message>());
        assert!(8 >= std::mem::size_of::<UserId>());
    }

    #[test]
    fn a_binary_send_up_to_the_frame_limit_decodes_whatever_its_body() {
        // bincode's own limit counts claimed memory, not wire bytes: a frame under the wire
        // limit must decode (and then be judged by the body rule), one over it must not.
        for len in [131_058, 131_072, 200_000, MAX_FRAME_BYTES] {
            let mut f = ClientFrame::Send {
                id: "c".into(),
                to: Recipient::User(UserId(1)),
                body: String::new(),
            };
            let overhead = encode(Codec::Binary, &f).len() + 4;
            if let ClientFrame::Send { body, .. } = &mut f {
                *body = "x".repeat(len - overhead);
            }
            let bytes = encode(Codec::Binary, &f);
            assert!(
                bytes.len() <= len && bytes.len() + 4 >= len,
                "{}",
                bytes.len()
            );
            assert_eq!(decode::<ClientFrame>(Codec::Binary, &bytes).unwrap(), f);
        }
        let ids = ClientFrame::SubscribePresence {
            users: (0..(MAX_FRAME_BYTES as u64 - 8))
                .map(|_| UserId(1))
                .collect(),
        };
        let bytes = encode(Codec::Binary, &ids);
        assert!(bytes.len() <= MAX_FRAME_BYTES);
        assert!(decode::<ClientFrame>(Codec::Binary, &bytes).is_ok());
    }

    #[test]
    fn close_codes_are_the_websocket_numbers() {
        for (c, n) in [
            (CloseCode::Normal, 1000),
            (CloseCode::GoingAway, 1001),
            (CloseCode::ProtocolError, 1002),
            (CloseCode::InvalidData, 1007),
            (CloseCode::PolicyViolation, 1008),
            (CloseCode::TooBig, 1009),
        ] {
            assert_eq!(c.code(), n);
            assert_eq!(u16::from(c), n);
            assert_eq!(CloseCode::from_u16(n), Some(c));
        }
        assert_eq!(CloseCode::from_u16(0), None);
        assert_eq!(CloseCode::from_u16(1011), None);
    }

    #[test]
    fn quic_frames_have_a_four_byte_big_endian_length() {
        use bytes::{Bytes, BytesMut};
        use tokio_util::codec::{Decoder, Encoder};
        let mut codec = length_prefix_codec(8);
        let mut buf = BytesMut::new();
        codec.encode(Bytes::from_static(b"abc"), &mut buf).unwrap();
        assert_eq!(&buf[..], b"\0\0\0\x03abc");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abc");
        let mut big = BytesMut::from(&b"\0\0\0\x09123456789"[..]);
        assert!(codec.decode(&mut big).is_err());
    }

    /// The worst case of every frame that carries a body: the body and client id at their
    /// limits, made of the character JSON escapes the most, the largest ids. Each fits the
    /// frame limit in both codecs, and a page of messages within the budget does too.
    #[test]
    fn frames_at_the_limits_fit_the_frame_limit_in_both_codecs() {
        use crate::frames::Message;
        use crate::ids::{GroupId, Position};
        use crate::limits::{
            message_weight, FRAME_PAYLOAD_BUDGET, MAX_BODY_BYTES, MAX_CLIENT_ID_BYTES,
        };
        use std::sync::Arc;
        let body = "\u{1}".repeat(MAX_BODY_BYTES);
        let client_id = "\u{1}".repeat(MAX_CLIENT_ID_BYTES);
        let m = |body: &str| Message {
            message_id: MessageId(u64::MAX),
            conversation: ConversationId::direct(UserId(u64::MAX - 1), UserId(u64::MAX)),
            from: UserId(u64::MAX),
            to: Some(UserId(u64::MAX)),
            group: Some(GroupId(u64::MAX)),
            body: body.into(),
            ts: u64::MAX,
            client_id: client_id.clone(),
        };
        let max = m(&body);
        // A page of smaller messages filling the budget.
        let small = m(&"\u{1}".repeat(1000));
        let per_page = FRAME_PAYLOAD_BUDGET / message_weight(1000, MAX_CLIENT_ID_BYTES);
        let frames = [
            ServerFrame::Message {
                message: Arc::new(max.clone()),
            },
            ServerFrame::SyncBatch {
                messages: vec![max.clone()],
                cursor: Some(Position(u64::MAX)),
                done: false,
                gap: true,
            },
            ServerFrame::History {
                conversation: ConversationId::direct(UserId(u64::MAX - 1), UserId(u64::MAX)),
                messages: vec![max.clone()],
                next_before: Some(MessageId(u64::MAX)),
            },
            ServerFrame::SyncBatch {
                messages: vec![small; per_page],
                cursor: Some(Position(u64::MAX)),
                done: false,
                gap: true,
            },
        ];
        for f in &frames {
            for c in [Codec::Json, Codec::Binary] {
                let n = encode(c, f).len();
                assert!(n <= MAX_FRAME_BYTES, "{c:?} {n}");
            }
        }
        let weight = message_weight(MAX_BODY_BYTES, MAX_CLIENT_ID_BYTES);
        assert!(encode(Codec::Json, &max).len() <= weight);
        let send = ClientFrame::Send {
            id: client_id.clone(),
            to: Recipient::Group(GroupId(u64::MAX)),
            body,
        };
        let n = encode(Codec::Json, &send).len();
        assert!(n <= MAX_FRAME_BYTES, "{n}");
        assert_eq!(
            decode::<ClientFrame>(Codec::Json, &encode(Codec::Json, &send)).unwrap(),
            send
        );
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<ClientFrame>(Codec::Binary, &bytes);
            let _ = decode::<ClientFrame>(Codec::Json, &bytes);
        }
    }
}
