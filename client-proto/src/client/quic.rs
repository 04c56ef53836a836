//! The client side of the QUIC transport: ALPN `chat/1`, one bidirectional stream, 4-byte
//! big-endian length-prefixed frames in the binary codec.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::ClientError;
use crate::codec::length_prefix_codec;
pub use crate::codec::ALPN;
use crate::limits::MAX_FRAME_BYTES;

/// One QUIC connection with its single stream, split into framed halves.
pub struct QuicLink {
    pub conn: quinn::Connection,
    pub send: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
    pub recv: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
    /// Kept so the endpoint's driver lives as long as the connection.
    pub endpoint: quinn::Endpoint,
}

/// The length-prefix codec: server frames are at most the protocol's frame limit, like
/// client frames.
fn codec() -> LengthDelimitedCodec {
    length_prefix_codec(MAX_FRAME_BYTES)
}

/// The client configuration: TLS 1.3 with ALPN `chat/1`, trusting `ca_pem` (PEM, the cluster
/// CA) or the public web roots; keep-alives every 10 s. Build it once to open many
/// connections on one endpoint ([`connect_on`]).
pub fn client_config(ca_pem: Option<&[u8]>) -> Result<quinn::ClientConfig, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |e: String| ClientError::Transport(format!("TLS setup: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| bad(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Connects to `quic://host:port`, trusting `ca_pem` (PEM, the cluster CA) or the public web
/// roots, and opens the stream.
pub async fn connect(url: &str, ca_pem: Option<&[u8]>) -> Result<QuicLink, ClientError> {
    let hostport = url
        .strip_prefix("quic://")
        .ok_or_else(|| ClientError::Transport(format!("not a quic:// URL: {url}")))?
        .trim_end_matches('/');
    let host = hostport
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(hostport);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addr: SocketAddr = hostport
        .to_socket_addrs()
        .map_err(|e| ClientError::Transport(format!("cannot resolve {hostport}: {e}")))?
        .next()
        .ok_or_else(|| ClientError::Transport(format!("{hostport} has no address")))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .map_err(|_| ClientError::Transport("bind address".into()))?;
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Transport(e.to_string()))?;
    endpoint.set_default_client_config(client_config(ca_pem)?);
    connect_on(endpoint, addr, &host).await
}

/// Opens a connection to `addr` (whose certificate must name `server_name`) on `endpoint`,
/// which has a default client configuration ([`client_config`]), and opens the stream. Many
/// connections can share one endpoint (one UDP socket).
pub async fn connect_on(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<QuicLink, ClientError> {
    let conn = endpoint
        .connect(addr, server_name)
        .map_err(|e| ClientError::Transport(e.to_string()))?
        .await
        .map_err(|e| ClientError::Transport(format!("QUIC handshake with {addr}: {e}")))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    Ok(QuicLink {
        conn,
        send: FramedWrite::new(send, codec()),
        recv: FramedRead::new(recv, codec()),
        endpoint,
    })
}

/// Why the connection closed, as a close code and reason when the server said.
pub fn close_reason(conn: &quinn::Connection) -> ClientError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => ClientError::Closed(Some((
            u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ))),
        Some(other) => ClientError::Transport(other.to_string()),
        None => ClientError::Closed(None),
    }
}
