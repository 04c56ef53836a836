//! The node-to-node transport: request/response RPC over QUIC with mutual TLS.
//!
//! Every node runs one [`PeerEndpoint`] on its peer address. It serves requests from other
//! nodes with an [`RpcHandler`] and sends its own with [`PeerEndpoint::request`]. Both ends
//! must present a certificate signed by the cluster CA ([`crate::certs`]); anything else is
//! refused during the handshake, before any request is read.
//!
//! One connection per peer is kept and reused; one bidirectional stream carries one
//! request and its reply (see [`frame`](self) for the wire format). Frames are bounded
//! ([`PeerConfig::max_frame`]) and checked before anything is allocated; a connection may
//! have at most [`PeerConfig::max_in_flight`] requests being served at once.
//!
//! Delivery is at most once: a failed request is never resent by the transport.
//! [`PeerError::not_sent`] tells the caller when retrying is safe.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quinn::{Connection, ReadError, ReadExactError, VarInt, WriteError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::certs::{ClusterSecret, NodeTls};

mod error;
pub(crate) mod frame;
mod server;
mod tls;
pub mod udp;

pub use error::{BindError, PeerError};
pub use frame::{RemoteError, Request, Response, HARD_MAX_FRAME};
pub use server::{BoxFuture, RpcHandler};
pub use tls::ALPN;

use frame::{FrameError, Reply};

/// Limits and timers of a [`PeerEndpoint`].
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Largest frame payload sent or accepted, in bytes (capped at [`HARD_MAX_FRAME`]).
    pub max_frame: usize,
    /// Requests served at once per incoming connection (also the QUIC stream limit).
    pub max_in_flight: u32,
    /// How long a request may take, from opening its stream to the whole reply; the server
    /// side also gives a peer this long to send a request.
    pub request_timeout: Duration,
    /// How long a QUIC + TLS handshake may take.
    pub connect_timeout: Duration,
    /// A connection that hears nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive interval, so idle connections to live peers stay open and dead ones are
    /// noticed.
    pub keep_alive: Duration,
    /// The cluster secret, from which stateless-reset tokens are derived (see
    /// [`PeerEndpoint::bind`]). `None` uses a random key per endpoint.
    pub reset_secret: Option<ClusterSecret>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            max_frame: 4 << 20,
            max_in_flight: 512,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(6),
            keep_alive: Duration::from_secs(1),
            reset_secret: None,
        }
    }
}

/// A node's peer endpoint: serves requests from other nodes and sends its own. Cheap to
/// clone; all clones share one endpoint, and [`PeerEndpoint::shutdown`] on any of them stops
/// it for all.
#[derive(Clone)]
pub struct PeerEndpoint {
    shared: Arc<Shared>,
}

type ConnectionSlot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// State shared by the endpoint handle and its tasks.
pub(crate) struct Shared {
    pub(crate) endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    pub(crate) config: PeerConfig,
    pub(crate) handler: Arc<dyn RpcHandler>,
    /// One slot per peer address and the name its certificate was verified for; the async
    /// lock is held while connecting, so concurrent requests to a peer share one handshake.
    pool: Mutex<HashMap<(SocketAddr, String), ConnectionSlot>>,
    /// The connections of `pool`, for their statistics (a slot is locked while requests
    /// take its connection).
    opened: Mutex<HashMap<(SocketAddr, String), Connection>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl PeerEndpoint {
    /// Binds `addr` (UDP) and starts serving requests with `handler`. Must be called inside
    /// a Tokio runtime, whose tasks then run the endpoint.
    ///
    /// With [`PeerConfig::reset_secret`] set to the cluster secret, every node derives the
    /// same stateless-reset key, so a node restarted on the same address makes its peers drop
    /// their stale connections to it at the first packet.
    pub fn bind(
        addr: SocketAddr,
        tls: &NodeTls,
        mut config: PeerConfig,
        handler: Arc<dyn RpcHandler>,
    ) -> Result<Self, BindError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BindError::NoRuntime);
        }
        config.max_frame = config.max_frame.min(HARD_MAX_FRAME);
        config.max_in_flight = config.max_in_flight.max(1);
        let server = tls::server_config(tls, &config)?;
        let client = tls::client_config(tls, &config)?;
        let bind_err = |source| BindError::Bind { addr, source };
        let (socket, _) = udp::bind(addr, "peer").map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(config.reset_secret.as_ref()),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let shared = Arc::new(Shared {
            endpoint,
            client,
            config,
            handler,
            pool: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        shared.tasks.spawn(server::accept_loop(shared.clone()));
        Ok(Self { shared })
    }

    /// The bound UDP address (useful after binding port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Sends `request` to the peer at `peer`, whose certificate must be valid for
    /// `server_name` (its node name, DNS name or IP), and waits for the reply.
    ///
    /// Reuses the pooled connection to `peer`, or opens one if there is none or it has
    /// failed. Never resends: see [`PeerError::not_sent`].
    pub async fn request(
        &self,
        peer: SocketAddr,
        server_name: &str,
        request: Request,
    ) -> Result<Response, PeerError> {
        let span = tracing::debug_span!("peer_call", peer = %peer, kind = request.kind);
        let shared = &self.shared;
        let call = async {
            let bytes = frame::encode(&request).map_err(PeerError::Encode)?;
            let max = shared.config.max_frame;
            if bytes.len() - 4 > max {
                return Err(PeerError::FrameTooLarge {
                    len: bytes.len() - 4,
                    max,
                });
            }
            let conn = self.connection(peer, server_name).await?;
            match tokio::time::timeout(
                shared.config.request_timeout,
                exchange(&conn, peer, &bytes, max),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(PeerError::Timeout { addr: peer }),
            }
        };
        if shared.cancel.is_cancelled() {
            return Err(PeerError::Closed);
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => Err(PeerError::Closed),
            result = call.instrument(span) => result,
        }
    }

    /// The pooled connection to `peer`, (re)connecting when there is none or it is closed.
    async fn connection(
        &self,
        peer: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, PeerError> {
        let shared = &self.shared;
        let slot = shared
            .pool
            .lock()
            .entry((peer, server_name.to_string()))
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            let Some(reason) = conn.close_reason() else {
                return Ok(conn.clone());
            };
            // Every request to the peer waits for the new handshake: worth seeing.
            metrics::counter!("cluster_peer_reconnects_total").increment(1);
            tracing::info!(peer = %peer, %reason, "pooled peer connection closed; reconnecting");
        }
        *slot = None;
        let connecting = shared
            .endpoint
            .connect_with(shared.client.clone(), peer, server_name)
            .map_err(|source| PeerError::Connect { addr: peer, source })?;
        let conn = match tokio::time::timeout(shared.config.connect_timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(source)) => return Err(PeerError::Handshake { addr: peer, source }),
            Err(_) => return Err(PeerError::ConnectTimeout { addr: peer }),
        };
        *slot = Some(conn.clone());
        shared
            .opened
            .lock()
            .insert((peer, server_name.to_string()), conn.clone());
        Ok(conn)
    }

    /// Sets gauges from the QUIC state of this node's connections to its peers: round-trip
    /// time and congestion window (the worst of them), and packets lost and congestion events
    /// (summed over the open connections since they opened). A loss on a connection slows
    /// every request on it: replication, reads and forwards share one connection per peer.
    pub fn export_gauges(&self) {
        let conns: Vec<Connection> = self.shared.opened.lock().values().cloned().collect();
        let (mut rtt, mut cwnd, mut lost, mut events) = (0f64, u64::MAX, 0u64, 0u64);
        let mut open = 0;
        for conn in conns.iter().filter(|c| c.close_reason().is_none()) {
            let path = conn.stats().path;
            open += 1;
            rtt = rtt.max(path.rtt.as_secs_f64());
            cwnd = cwnd.min(path.cwnd);
            lost += path.lost_packets;
            events += path.congestion_events;
        }
        metrics::gauge!("cluster_peer_connections").set(f64::from(open));
        metrics::gauge!("cluster_peer_rtt_seconds_max").set(rtt);
        metrics::gauge!("cluster_peer_cwnd_bytes_min").set(if open > 0 {
            cwnd as f64
        } else {
            0.0
        });
        metrics::gauge!("cluster_peer_lost_packets").set(lost as f64);
        metrics::gauge!("cluster_peer_congestion_events").set(events as f64);
    }

    /// Stops serving, closes every connection and waits for all of the endpoint's tasks.
    /// Requests in progress (here or through clones) fail with [`PeerError::Closed`].
    pub async fn shutdown(self) {
        let shared = &self.shared;
        shared.cancel.cancel();
        shared.endpoint.close(VarInt::from_u32(0), b"shutdown");
        shared.tasks.close();
        shared.tasks.wait().await;
        shared.pool.lock().clear();
        shared.opened.lock().clear();
        // Give the close frames a moment to leave (the full draining period is ~3 PTO, which
        // nobody needs to wait for); peers that miss them time out anyway.
        let _ = tokio::time::timeout(Duration::from_millis(100), shared.endpoint.wait_idle()).await;
    }
}

/// One request on its own stream: send the frame, read the reply frame.
async fn exchange(
    conn: &Connection,
    addr: SocketAddr,
    bytes: &[u8],
    max: usize,
) -> Result<Response, PeerError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|source| PeerError::ConnectionLost { addr, source })?;
    match send.write_all(bytes).await {
        Ok(()) => {
            let _ = send.finish();
        }
        // The peer stopped reading (e.g. the frame is too large for it): its reply says why.
        Err(WriteError::Stopped(_)) => {}
        Err(WriteError::ConnectionLost(source)) => {
            return Err(PeerError::ConnectionLost { addr, source })
        }
        Err(WriteError::ClosedStream | WriteError::ZeroRttRejected) => {
            return Err(PeerError::StreamReset { addr, code: 0 })
        }
    }
    let payload = match frame::read_frame(&mut recv, max).await {
        Ok(payload) => payload,
        Err(FrameError::TooLarge { len }) => {
            let _ = recv.stop(VarInt::from_u32(0));
            return Err(PeerError::ReplyTooLarge { addr, len, max });
        }
        Err(FrameError::Read(error)) => return Err(read_error(addr, error)),
    };
    match frame::decode::<Reply>(&payload) {
        Ok(Reply::Ok(response)) => Ok(response),
        Ok(Reply::Err(error)) => Err(PeerError::Remote { addr, error }),
        Err(source) => Err(PeerError::Decode { addr, source }),
    }
}

fn read_error(addr: SocketAddr, error: ReadExactError) -> PeerError {
    match error {
        ReadExactError::FinishedEarly(_) => PeerError::Truncated { addr },
        ReadExactError::ReadError(ReadError::ConnectionLost(source)) => {
            PeerError::ConnectionLost { addr, source }
        }
        ReadExactError::ReadError(ReadError::Reset(code)) => PeerError::StreamReset {
            addr,
            code: code.into_inner(),
        },
        ReadExactError::ReadError(_) => PeerError::StreamReset { addr, code: 0 },
    }
}
