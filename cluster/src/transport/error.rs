//! Errors of the peer transport: binding an endpoint, and making a request.

use std::io;
use std::net::SocketAddr;

use super::frame::RemoteError;

/// An endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be bound (address in use, not local, ...).
    #[error("cannot bind peer QUIC on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The reason.
        source: io::Error,
    },
    /// The certificate, key or CA was refused by rustls.
    #[error("peer TLS configuration rejected: {0}")]
    Tls(rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("cannot verify client certificates with the cluster CA: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// `bind` was called outside a Tokio runtime.
    #[error("the peer endpoint must be started inside a Tokio runtime")]
    NoRuntime,
    /// The crypto provider lacks the cipher suite QUIC needs for its initial packets.
    #[error("the TLS provider has no cipher suite usable for QUIC")]
    NoQuicCipherSuite,
}

/// A request to a peer failed. [`PeerError::not_sent`] tells whether the peer can have seen
/// it.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// This endpoint has been shut down.
    #[error("the peer endpoint is shut down")]
    Closed,
    /// The request frame is larger than the configured maximum; it was not sent.
    #[error("request frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The encoded frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(bincode::error::EncodeError),
    /// No connection attempt could be started (bad server name, endpoint stopping, ...).
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// The reason.
        source: quinn::ConnectError,
    },
    /// The QUIC or TLS handshake failed (unreachable, wrong CA, wrong name, ...).
    #[error("handshake with peer {addr} failed: {source}")]
    Handshake {
        /// The peer.
        addr: SocketAddr,
        /// The reason.
        source: quinn::ConnectionError,
    },
    /// The handshake did not finish within the connect timeout.
    #[error("connecting to peer {addr} timed out")]
    ConnectTimeout {
        /// The peer.
        addr: SocketAddr,
    },
    /// The connection broke during the request; the peer may have handled it.
    #[error("connection to peer {addr} lost: {source}")]
    ConnectionLost {
        /// The peer.
        addr: SocketAddr,
        /// The reason.
        source: quinn::ConnectionError,
    },
    /// The peer reset or stopped the stream without a reply.
    #[error("peer {addr} abandoned the request stream (code {code})")]
    StreamReset {
        /// The peer.
        addr: SocketAddr,
        /// The application error code it gave (0 when none).
        code: u64,
    },
    /// The stream ended before a whole reply arrived.
    #[error("peer {addr} sent a truncated reply")]
    Truncated {
        /// The peer.
        addr: SocketAddr,
    },
    /// The reply announced more bytes than this endpoint accepts; it was not read.
    #[error("reply of {len} bytes from peer {addr} exceeds the {max}-byte limit")]
    ReplyTooLarge {
        /// The peer.
        addr: SocketAddr,
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The reply could not be decoded.
    #[error("undecodable reply from peer {addr}: {source}")]
    Decode {
        /// The peer.
        addr: SocketAddr,
        /// The reason.
        source: bincode::error::DecodeError,
    },
    /// No reply within the request timeout; the peer may have handled the request.
    #[error("request to peer {addr} timed out")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
    },
    /// The peer answered with an error.
    #[error("peer {addr} refused the request: {error}")]
    Remote {
        /// The peer.
        addr: SocketAddr,
        /// What it said.
        error: RemoteError,
    },
}

impl PeerError {
    /// True when the request certainly never reached the peer's handler, so sending it
    /// again cannot make it run twice.
    pub fn not_sent(&self) -> bool {
        match self {
            PeerError::Closed
            | PeerError::FrameTooLarge { .. }
            | PeerError::Encode(_)
            | PeerError::Connect { .. }
            | PeerError::Handshake { .. }
            | PeerError::ConnectTimeout { .. } => true,
            PeerError::Remote { error, .. } => matches!(
                error.code,
                RemoteError::FRAME_TOO_LARGE | RemoteError::BAD_FRAME
            ),
            _ => false,
        }
    }

    /// True when the connection itself failed (rather than this one request), so the next
    /// request will use a new connection.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            PeerError::Connect { .. }
                | PeerError::Handshake { .. }
                | PeerError::ConnectTimeout { .. }
                | PeerError::ConnectionLost { .. }
        )
    }
}
