//! The client QUIC transport (docs/protocol.md, "QUIC"): ALPN `chat/1`, one bidirectional stream
//! per connection carrying 4-byte big-endian length-prefixed frames in the binary codec. It
//! adapts the stream to the same session as WebSocket (`session::run`).
//!
//! Bounds: one stream per connection (QUIC stream limit), frames up to the protocol limit
//! (larger: the connection is closed with code 1009), 10 s to open the stream and
//! authenticate (else code 1008), and at most `MAX_CONNECTIONS_PER_IP` connections from one
//! address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use client_proto::codec::{length_prefix_codec, CloseCode, Codec, ALPN};
use client_proto::limits::MAX_FRAME_BYTES;
use cluster::NodeTls;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use quinn::{Endpoint, VarInt};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodecError};
use tokio_util::sync::CancellationToken;

use crate::gateway::drain::Transport;
use crate::gateway::session::{self, Inbound, OutFrame};
use crate::node::Node;

/// Most QUIC connections from one IP address.
pub const MAX_CONNECTIONS_PER_IP: usize = 10_000;
/// A connection with no packets for this long is gone (heartbeats keep live ones busy).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

fn server_config(tls: &NodeTls) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_no_client_auth()
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .context("the node certificate")?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto).context("QUIC TLS config")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().context("idle timeout")?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Counts connections per IP address.
#[derive(Default, Clone)]
struct PerIp(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct PerIpGuard(PerIp, IpAddr);

impl PerIp {
    fn try_acquire(&self, ip: IpAddr) -> Option<PerIpGuard> {
        let mut m = self.0.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(PerIpGuard(self.clone(), ip))
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Binds the client QUIC listener. Returns the bound address and the accept loop, which ends
/// when `shutdown` is cancelled (sessions end with it, through the node's shutdown token).
pub fn bind(addr: SocketAddr, tls: &NodeTls) -> anyhow::Result<Endpoint> {
    let context = || format!("cannot listen on {addr} for client QUIC");
    let (socket, _) = cluster::transport::udp::bind(addr, "client QUIC").with_context(context)?;
    Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config(tls)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(context)
}

/// Runs the accept loop of `endpoint` until shutdown.
pub fn spawn_accept(
    node: Arc<Node>,
    endpoint: Endpoint,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let per_ip = PerIp::default();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                inc = endpoint.accept() => match inc {
                    Some(i) => i,
                    None => break,
                },
            };
            if node.drain.is_draining() {
                // Refused before the handshake, like a connection over the per-IP cap.
                metrics::counter!("gateway_drain_refused_total", "transport" => "quic")
                    .increment(1);
                incoming.refuse();
                continue;
            }
            let Some(guard) = per_ip.try_acquire(incoming.remote_address().ip()) else {
                metrics::counter!("quic_refused_total").increment(1);
                incoming.refuse();
                continue;
            };
            let node2 = node.clone();
            node.spawn_session(async move {
                let _guard = guard;
                serve(node2, incoming).await;
            });
        }
        endpoint.close(CloseCode::GoingAway.code().into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    })
}

async fn serve(node: Arc<Node>, incoming: quinn::Incoming) {
    let auth_deadline = node.cfg.auth_timeout;
    let conn = match tokio::time::timeout(auth_deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => return,
    };
    let peer = conn.remote_address();
    let (send, recv) = match tokio::time::timeout(auth_deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return,
        Err(_) => {
            conn.close(
                CloseCode::PolicyViolation.code().into(),
                b"authenticate within 10 s",
            );
            return;
        }
    };
    let reader = FramedRead::new(recv, length_prefix_codec(MAX_FRAME_BYTES))
        .map(|item| match item {
            Ok(b) => Inbound::Data(Codec::Binary, b.freeze()),
            Err(e)
                if e.get_ref()
                    .is_some_and(|i| i.is::<LengthDelimitedCodecError>()) =>
            {
                Inbound::TooLarge
            }
            Err(_) => Inbound::Closed,
        })
        .boxed();
    let writer = futures_util::sink::unfold(
        (
            FramedWrite::new(send, length_prefix_codec(MAX_FRAME_BYTES)),
            conn.clone(),
        ),
        |(mut w, conn), out: OutFrame| async move {
            match out {
                OutFrame::Data(frame) => w.send(Bytes::from(frame.into_bytes())).await?,
                OutFrame::Close(code, reason) => {
                    // Let queued frames (an error saying why) reach the client before the
                    // close discards whatever is still unsent.
                    let _ = SinkExt::<Bytes>::flush(&mut w).await;
                    let stream = w.get_mut();
                    let _ = stream.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.stopped()).await;
                    conn.close(VarInt::from_u32(u32::from(code)), reason.as_bytes());
                }
            }
            Ok::<_, std::io::Error>((w, conn))
        },
    );
    session::run(node, peer, Transport::Quic, reader, Box::pin(writer)).await;
    conn.close(CloseCode::Normal.code().into(), b"session ended");
}
