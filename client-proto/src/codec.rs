//! The two encodings of frames: JSON text (WebSocket text frames) and bincode 2 (WebSocket
//! binary frames and QUIC). Decoding never panics; sizes are checked before parsing.

use bincode::config::{Configuration, Limit};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::limits::MAX_FRAME_BYTES;

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
            let (frame, used) = bincode::decode_from_slice(bytes, bin_config())
                .map_err(|e| DecodeError::Malformed(e.to_string()))?;
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

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<ClientFrame>(Codec::Binary, &bytes);
            let _ = decode::<ClientFrame>(Codec::Json, &bytes);
        }
    }
}
