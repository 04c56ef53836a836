//! The two encodings of frames: JSON text (WebSocket text frames) and bincode 2 (WebSocket
//! binary frames and QUIC). Decoding never panics; sizes are checked before parsing.
//!
//! Also the other facts of the wire that node and clients must agree on: the QUIC ALPN
//! ([`ALPN`]), the length prefix of QUIC frames ([`length_prefix_codec`]) and the close codes
//! ([`CloseCode`]).

use bincode::config::{Configuration, Limit};
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
    /// Not authenticated in time, authentication failed, or the device logged out.
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
    #[error("frame is {0} bytes; the limit is {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

type BinConfig =
    Configuration<bincode::config::BigEndian, bincode::config::Varint, Limit<MAX_FRAME_BYTES>>;

fn bin_config() -> BinConfig {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<MAX_FRAME_BYTES>()
}

/// Encodes a frame.
pub fn encode<T: Serialize + bincode::Encode>(codec: Codec, frame: &T) -> Vec<u8> {
    match codec {
        // Serialising our own frame types cannot fail: no maps with non-string keys, no
        // custom serialisers that error.
        Codec::Json => serde_json::to_vec(frame).unwrap_or_default(),
        Codec::Binary => bincode::encode_to_vec(frame, bin_config()).unwrap_or_default(),
    }
}

/// Decodes a frame of type `T`, refusing anything over the frame limit before parsing.
pub fn decode<T: DeserializeOwned + bincode::Decode<()>>(
    codec: Codec,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    match codec {
        Codec::Json => serde_json::from_slice(bytes).map_err(|e| classify_json_error(bytes, e)),
        Codec::Binary => {
            let (frame, used) =
                bincode::decode_from_slice(bytes, bin_config()).map_err(|e| match e {
                    bincode::error::DecodeError::UnexpectedVariant { found, .. } => {
                        DecodeError::UnknownType(format!("binary frame variant {found}"))
                    }
                    e => DecodeError::Malformed(e.to_string()),
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

/// Tells an unknown `type` apart from malformed JSON (only on the error path).
fn classify_json_error(bytes: &[u8], err: serde_json::Error) -> DecodeError {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(bytes) {
        match map.get("type") {
            Some(serde_json::Value::String(t)) if err.to_string().contains("unknown variant") => {
                return DecodeError::UnknownType(t.chars().take(64).collect());
            }
            None => return DecodeError::Malformed("missing \"type\"".into()),
            _ => {}
        }
    }
    DecodeError::Malformed(err.to_string())
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
    }

    #[test]
    fn close_codes_are_the_websocket_numbers() {
        for (c, n) in [
            (CloseCode::Normal, 1000),
            (CloseCode::GoingAway, 1001),
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

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<ClientFrame>(Codec::Binary, &bytes);
            let _ = decode::<ClientFrame>(Codec::Json, &bytes);
        }
    }
}
