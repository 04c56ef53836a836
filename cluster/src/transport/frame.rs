//! The peer wire format: one request and one reply per bidirectional QUIC stream, each a
//! frame of a 4-byte big-endian length followed by that many bytes of bincode-2 payload.
//!
//! The ALPN `chat-peer/1` versions this format; a change to it gets a new ALPN.

use bincode::config::{Configuration, Limit};
use bincode::{Decode, Encode};
use quinn::{ReadExactError, RecvStream};

/// No frame is ever larger than this, whatever the configuration says; it is also the limit
/// bincode decodes under, so a forged length inside a frame cannot make it allocate more.
pub const HARD_MAX_FRAME: usize = 16 << 20;

/// bincode's standard configuration with the hard frame limit.
type WireConfig =
    Configuration<bincode::config::LittleEndian, bincode::config::Varint, Limit<HARD_MAX_FRAME>>;

const fn wire_config() -> WireConfig {
    bincode::config::standard().with_limit::<HARD_MAX_FRAME>()
}

/// A request to a peer: the node crate defines what `kind` values mean and how `body` is
/// encoded.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Request {
    /// Which RPC this is (defined by the caller's protocol).
    pub kind: u16,
    /// The RPC's arguments.
    pub body: Vec<u8>,
}

/// A successful reply from a peer's handler.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Response {
    /// The RPC's result.
    pub body: Vec<u8>,
}

/// An error a peer sent back instead of a [`Response`]: either from its handler (any code
/// below [`RemoteError::RESERVED`]) or from its transport (the constants below).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, thiserror::Error)]
#[error("peer error {code}: {message}")]
pub struct RemoteError {
    /// A code the caller's protocol defines, or one of the transport's reserved codes.
    pub code: u16,
    /// Human-readable detail, for logs.
    pub message: String,
}

impl RemoteError {
    /// Codes from this one up are reserved to the transport.
    pub const RESERVED: u16 = 0xff00;
    /// The request frame was larger than the peer accepts.
    pub const FRAME_TOO_LARGE: u16 = 0xff01;
    /// The request frame could not be decoded.
    pub const BAD_FRAME: u16 = 0xff02;
    /// The handler's reply was larger than the peer may send.
    pub const REPLY_TOO_LARGE: u16 = 0xff03;
    /// The peer is shutting down and did not finish the request.
    pub const SHUTTING_DOWN: u16 = 0xff04;

    /// An error with the given code and message.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What travels back on a stream.
#[derive(Debug, Encode, Decode)]
pub(crate) enum Reply {
    Ok(Response),
    Err(RemoteError),
}

/// A frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The length header announced more than the allowed maximum; nothing more was read.
    TooLarge { len: usize },
    /// The stream ended or broke before the whole frame arrived.
    Read(ReadExactError),
}

/// Encodes `value` as a complete frame (length header included).
pub(crate) fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    let mut frame = vec![0u8; 4];
    bincode::encode_into_std_write(value, &mut frame, wire_config())?;
    let len = u32::try_from(frame.len() - 4)
        .map_err(|_| bincode::error::EncodeError::Other("frame longer than 4 GiB"))?;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

/// Decodes a frame payload (without its header); trailing bytes are an error.
pub(crate) fn decode<T: Decode<()>>(payload: &[u8]) -> Result<T, bincode::error::DecodeError> {
    let (value, used) = bincode::decode_from_slice(payload, wire_config())?;
    if used != payload.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes after the frame",
            payload.len() - used
        )));
    }
    Ok(value)
}

/// The payload length announced by a header, refused when over `max` (before any
/// allocation).
pub(crate) fn payload_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max.min(HARD_MAX_FRAME) {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Reads one frame's payload from `recv`, refusing a length over `max` before allocating.
pub(crate) async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(FrameError::Read)?;
    let len = payload_len(header, max)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(FrameError::Read)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_a_frame() {
        let req = Request {
            kind: 7,
            body: b"hello".to_vec(),
        };
        let frame = encode(&req).unwrap();
        let len = payload_len(frame[..4].try_into().unwrap(), 1024).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode::<Request>(&frame[4..]).unwrap(), req);
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Ok(Response { body: vec![1, 2] }),
            Reply::Err(RemoteError::new(3, "no")),
        ] {
            let frame = encode(&reply).unwrap();
            let back: Reply = decode(&frame[4..]).unwrap();
            assert_eq!(format!("{back:?}"), format!("{reply:?}"));
        }
    }

    #[test]
    fn oversized_header_is_refused() {
        let header = 1025u32.to_be_bytes();
        assert!(matches!(
            payload_len(header, 1024),
            Err(FrameError::TooLarge { len: 1025 })
        ));
        let header = u32::MAX.to_be_bytes();
        assert!(payload_len(header, usize::MAX).is_err());
    }

    #[test]
    fn garbage_never_panics_and_forged_lengths_do_not_allocate() {
        // A body claiming u64::MAX bytes inside a tiny frame.
        let mut forged = vec![0x07, 0xfd];
        forged.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Request>(&forged).is_err());
        for len in 0..64u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Reply>(&bytes);
        }
        let frame = encode(&Request {
            kind: 1,
            body: vec![],
        })
        .unwrap();
        let mut trailing = frame[4..].to_vec();
        trailing.push(0);
        assert!(decode::<Request>(&trailing).is_err());
    }
}
