//! Mutual-TLS QUIC configuration: both ends present a certificate from the cluster CA and
//! trust nothing else.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use quinn_proto::HashedConnectionIdGenerator;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, SupportedProtocolVersion};

use super::{BindError, PeerConfig};
use crate::certs::{ClusterSecret, NodeTls};

/// The ALPN protocol of the peer transport; it versions the wire format.
pub const ALPN: &[u8] = b"chat-peer/1";

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // The process default is set too, for any other rustls user in the process; an error
    // only means some provider was installed first, and ours is passed explicitly anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(tls: &NodeTls) -> Result<Arc<RootCertStore>, BindError> {
    let mut roots = RootCertStore::empty();
    roots.add(tls.ca.clone()).map_err(BindError::Tls)?;
    Ok(Arc::new(roots))
}

/// Transport parameters for one side. `accept_streams` is how many concurrent bidirectional
/// streams the other side may open towards us.
fn transport(config: &PeerConfig, accept_streams: u32) -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport.max_concurrent_bidi_streams(VarInt::from_u32(accept_streams));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    let idle_ms = u32::try_from(config.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    transport.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(idle_ms))));
    transport.keep_alive_interval(Some(config.keep_alive));
    transport
}

/// The server side: requires a client certificate signed by the cluster CA.
pub(crate) fn server_config(
    tls: &NodeTls,
    config: &PeerConfig,
) -> Result<quinn::ServerConfig, BindError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(tls)?, provider.clone())
        .build()
        .map_err(BindError::Verifier)?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)
        .map_err(BindError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(BindError::Tls)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).map_err(|_| BindError::NoQuicCipherSuite)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport(config, config.max_in_flight)));
    Ok(server)
}

/// The client side: verifies the server against the cluster CA and presents our own
/// certificate.
pub(crate) fn client_config(
    tls: &NodeTls,
    config: &PeerConfig,
) -> Result<quinn::ClientConfig, BindError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13_ONLY)
        .map_err(BindError::Tls)?
        .with_root_certificates(roots(tls)?)
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(BindError::Tls)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).map_err(|_| BindError::NoQuicCipherSuite)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    // We never accept streams on connections we opened: requests to us come on the
    // connections the other node opens.
    client.transport_config(Arc::new(transport(config, 0)));
    Ok(client)
}

/// The endpoint configuration. With a cluster secret, stateless-reset tokens and the keyed
/// connection-id check are derived from it, so a node restarted on the same address
/// recognises its previous run's connection ids and resets its peers' stale connections at
/// the first packet, instead of leaving them to time out.
pub(crate) fn endpoint_config(secret: Option<&ClusterSecret>) -> EndpointConfig {
    let Some(secret) = secret else {
        return EndpointConfig::default();
    };
    let derive = |label: &[u8]| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        ring::hmac::sign(&key, label)
    };
    let reset = derive(b"chat-peer stateless reset key");
    let mut config = EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    let cid = derive(b"chat-peer connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    config
}
