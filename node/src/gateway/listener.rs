//! The HTTP/WebSocket listener: accepts TCP connections itself so that it can bound them,
//! and serves each with hyper's HTTP/1.1 connection (WebSocket upgrades included).
//!
//! Limits, all from `--max-connections*` and `--http-*` (`config::ConnLimits`):
//!
//! - a global cap and a per-source-address cap (IPv4 address, IPv6 /64) on open connections. A connection over the
//!   per-address cap is answered with a one-line 429 JSON error and closed at once, before
//!   hyper sees it. At the global cap the oldest connection that has not yet sent a whole
//!   request is closed to make room (so silent or slowloris sockets from many addresses
//!   cannot keep real clients out); only when there is none is the newcomer answered 503
//!   `busy`. The caps hold for a connection's whole life, WebSocket included: the permits
//!   live in the socket wrapper ([`Tracked`]), which moves into the upgraded WebSocket and
//!   is dropped when that closes;
//! - a request-head timeout (hyper's `header_read_timeout`: it runs whenever the connection
//!   waits for a request, so it also closes idle keep-alive connections and slowloris heads);
//! - an idle timeout while the connection is HTTP: no byte read or written for that long (a
//!   stalled body, a client that stopped reading) closes it. After a WebSocket upgrade the
//!   session's own deadlines take over (authentication, then heartbeats).
//!
//! HTTP/2 is not served on this port (no client uses h2c; TLS and HTTP/2 belong to a proxy in
//! front). Shutdown: stop accepting, ask every connection to finish its current request
//! (hyper's graceful shutdown), and wait for them; `server.rs` bounds the wait.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_layer::Layer;

use crate::config::ConnLimits;
use crate::domain::throttle::source_key;

/// Pause after an accept error such as "too many open files", so that the loop does not spin
/// while descriptors are short.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a newcomer at the global cap waits for the connection evicted for it to let go
/// of its slot (it does so at once unless the runtime is very busy).
const EVICT_WAIT: Duration = Duration::from_millis(100);
/// Largest buffered request head (hyper's default is ~400 KiB; API heads are small).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Starts serving `app` on `listener` until `shutdown`; the task ends once every connection
/// has finished (or was dropped by the caller's timeout).
pub fn spawn(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(accept_loop(listener, app, limits, shutdown))
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = PerIp::new(limits.max_per_ip);
    let waiting = Waiting::default();
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Per-connection failures (reset before accept) are nothing; running out of
                // descriptors is worth a line now and then, and a pause.
                metrics::counter!("http_accept_errors_total").increment(1);
                if !matches!(last_accept_warning, Some(t) if t.elapsed() < Duration::from_secs(10))
                {
                    tracing::warn!(error = %e, "cannot accept HTTP connections");
                    last_accept_warning = Some(Instant::now());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Some(ip_slot) = per_ip.take(source_key(peer.ip())) else {
            refuse(tcp, Refused::PerIp);
            continue;
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match make_room(&slots, &waiting).await {
                Some(slot) => slot,
                None => {
                    refuse(tcp, Refused::Global);
                    continue;
                }
            },
        };
        // Frames are small and latency-bound: no Nagle delay on client sockets.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        metrics::counter!("http_connections_accepted_total").increment(1);
        let io = Tracked::new(tcp, slot, ip_slot);
        connections.spawn(serve_connection(
            http.clone(),
            io,
            peer,
            app.clone(),
            limits.idle_timeout,
            waiting.register(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes, upgrades, idles out or shutdown ends it.
async fn serve_connection(
    http: hyper::server::conn::http1::Builder,
    io: Tracked,
    peer: SocketAddr,
    app: Router,
    idle_timeout: Duration,
    waiting: WaitingGuard,
    shutdown: CancellationToken,
) {
    let activity = io.activity.clone();
    let evicted = waiting.evict.clone();
    let app = TowerToHyperService::new(Extension(ConnectInfo(peer)).layer(app));
    // The first request head has arrived: the connection is no longer a candidate for
    // eviction.
    let service = hyper::service::service_fn(move |req| {
        waiting.served();
        hyper::service::Service::call(&app, req)
    });
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let idle_at = tokio::time::Instant::from_std(activity.last() + idle_timeout);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() {
                        metrics::counter!("http_connections_timed_out_total", "phase" => "header")
                            .increment(1);
                        tracing::debug!(%peer, "request head not received in time; closing");
                    } else {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                }
                return;
            }
            _ = evicted.cancelled() => {
                metrics::counter!("http_connections_evicted_total").increment(1);
                tracing::debug!(%peer, "closed to make room: no request yet at the connection cap");
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = tokio::time::sleep_until(idle_at) => {
                if activity.last().elapsed() >= idle_timeout {
                    metrics::counter!("http_connections_timed_out_total", "phase" => "idle")
                        .increment(1);
                    tracing::debug!(%peer, "HTTP connection idle; closing");
                    return; // dropping the connection closes the socket
                }
            }
        }
    }
}

/// At the global cap: closes the oldest connection still waiting for its first request and
/// takes its slot; `None` if there is no such connection (or its slot did not come back in
/// time).
async fn make_room(slots: &Arc<Semaphore>, waiting: &Waiting) -> Option<OwnedSemaphorePermit> {
    let victim = waiting.oldest()?;
    victim.cancel();
    tokio::time::timeout(EVICT_WAIT, slots.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

/// Connections that have not yet sent a whole request head, oldest first: the candidates
/// for eviction at the global cap.
#[derive(Clone, Default)]
struct Waiting {
    /// A std `Mutex`: held for one map update, never across an await.
    inner: Arc<std::sync::Mutex<WaitingInner>>,
}

#[derive(Default)]
struct WaitingInner {
    next: u64,
    by_age: std::collections::BTreeMap<u64, CancellationToken>,
}

impl Waiting {
    fn register(&self) -> WaitingGuard {
        let evict = CancellationToken::new();
        let seq = match self.inner.lock() {
            Ok(mut w) => {
                let seq = w.next;
                w.next += 1;
                w.by_age.insert(seq, evict.clone());
                seq
            }
            Err(_) => u64::MAX,
        };
        WaitingGuard {
            seq,
            evict,
            waiting: self.clone(),
        }
    }

    /// Takes the oldest waiting connection's eviction token out of the set.
    fn oldest(&self) -> Option<CancellationToken> {
        self.inner.lock().ok()?.by_age.pop_first().map(|(_, t)| t)
    }

    fn remove(&self, seq: u64) {
        if let Ok(mut w) = self.inner.lock() {
            w.by_age.remove(&seq);
        }
    }
}

/// One connection's place among the waiting; leaves on its first request or when dropped.
struct WaitingGuard {
    seq: u64,
    evict: CancellationToken,
    waiting: Waiting,
}

impl WaitingGuard {
    fn served(&self) {
        self.waiting.remove(self.seq);
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.waiting.remove(self.seq);
    }
}

/// Why a connection was turned away at accept.
#[derive(Clone, Copy)]
enum Refused {
    Global,
    PerIp,
}

/// Answers a refused connection with a one-line JSON error (best effort: the socket is not
/// waited on) and closes it.
fn refuse(tcp: TcpStream, why: Refused) {
    let (reason, status, code, message) = match why {
        Refused::Global => (
            "global",
            "503 Service Unavailable",
            client_proto::ErrorCode::Busy,
            "the node has too many connections; retry shortly",
        ),
        Refused::PerIp => (
            "per_ip",
            "429 Too Many Requests",
            client_proto::ErrorCode::RateLimited,
            "too many connections from this address",
        ),
    };
    metrics::counter!("http_connections_refused_total", "reason" => reason).increment(1);
    let body =
        serde_json::to_string(&client_proto::ErrorBody::new(code, message)).unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(answer.as_bytes());
    drop(tcp);
}

/// Open connections per source address.
#[derive(Clone)]
struct PerIp {
    max: usize,
    /// A std `Mutex`: held for one map update, never across an await.
    open: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    fn new(max: usize) -> Self {
        PerIp {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `ip`, if it has fewer than the cap open.
    fn take(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            open: self.open.clone(),
        })
    }
}

/// One connection's place in its address's count; given back on drop.
struct IpSlot {
    ip: IpAddr,
    open: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// When a connection last moved a byte: ms since a process-wide origin, shared between the
/// socket wrapper and the connection's idle check.
#[derive(Clone)]
struct Activity(Arc<AtomicU64>);

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Activity {
    fn new() -> Self {
        let a = Activity(Arc::new(AtomicU64::new(0)));
        a.touch();
        a
    }
    fn touch(&self) {
        let ms = origin().elapsed().as_millis() as u64;
        self.0.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        origin() + Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// A client socket that holds its connection slots and records when it last moved a byte.
struct Tracked {
    tcp: TcpStream,
    activity: Activity,
    _slot: OwnedSemaphorePermit,
    _ip_slot: IpSlot,
    _open: OpenGauge,
}

/// Keeps `http_connections_open` right, wherever the connection ends.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::gauge!("http_connections_open").increment(1.0);
        OpenGauge
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!("http_connections_open").decrement(1.0);
    }
}

impl Tracked {
    fn new(tcp: TcpStream, slot: OwnedSemaphorePermit, ip_slot: IpSlot) -> Self {
        Tracked {
            tcp,
            activity: Activity::new(),
            _slot: slot,
            _ip_slot: ip_slot,
            _open: OpenGauge::new(),
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn per_ip_slots_are_given_back() {
        let p = PerIp::new(2);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let a = p.take(ip).unwrap();
        let _b = p.take(ip).unwrap();
        assert!(p.take(ip).is_none());
        assert!(p.take([127, 0, 0, 2].into()).is_some());
        drop(a);
        assert!(p.take(ip).is_some());
    }

    #[test]
    fn the_oldest_waiting_connection_is_evicted_first() {
        let w = Waiting::default();
        let first = w.register();
        let second = w.register();
        let third = w.register();
        first.served(); // it sent a request: no longer a candidate
        let victim = w.oldest().unwrap();
        victim.cancel();
        assert!(second.evict.is_cancelled());
        assert!(!third.evict.is_cancelled());
        drop(third);
        assert!(w.oldest().is_none());
    }
}
