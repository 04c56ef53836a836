#![allow(clippy::unwrap_used)]
//! The QUIC peer transport on 127.0.0.1: mutual TLS, framing limits, reconnects.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::certs::{self, NodeTls};
use cluster::transport::{
    BoxFuture, PeerConfig, PeerEndpoint, PeerError, RemoteError, Request, Response, RpcHandler,
};

/// Echoes kind 1, answers kind 2 with a body of the requested size, refuses anything else.
#[derive(Default)]
struct TestHandler {
    calls: AtomicUsize,
}

impl RpcHandler for TestHandler {
    fn handle(
        &self,
        _from: SocketAddr,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, RemoteError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match request.kind {
                1 => Ok(Response { body: request.body }),
                2 => {
                    let len = u32::from_be_bytes(request.body[..4].try_into().unwrap());
                    Ok(Response {
                        body: vec![7; len as usize],
                    })
                }
                _ => Err(RemoteError::new(42, "unknown kind")),
            }
        })
    }
}

fn cluster_dir(dir: &Path, names: &[&str]) {
    certs::init_cluster_dir(dir).unwrap();
    for name in names {
        certs::issue_node_cert(dir, name, &["127.0.0.1".to_string()]).unwrap();
    }
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config() -> PeerConfig {
    PeerConfig {
        connect_timeout: Duration::from_millis(1500),
        request_timeout: Duration::from_secs(3),
        ..PeerConfig::default()
    }
}

fn start(tls: &NodeTls, config: PeerConfig) -> (PeerEndpoint, Arc<TestHandler>, SocketAddr) {
    let handler = Arc::new(TestHandler::default());
    let endpoint = PeerEndpoint::bind(local(), tls, config, handler.clone()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, handler, addr)
}

fn echo(body: &[u8]) -> Request {
    Request {
        kind: 1,
        body: body.to_vec(),
    }
}

fn sized(len: u32) -> Request {
    Request {
        kind: 2,
        body: len.to_be_bytes().to_vec(),
    }
}

#[tokio::test]
async fn endpoints_of_one_cluster_exchange_requests() {
    let dir = tempfile::tempdir().unwrap();
    cluster_dir(dir.path(), &["node-a", "node-b"]);
    let (a, a_handler, a_addr) = start(&certs::load(dir.path(), "node-a").unwrap(), config());
    let (b, b_handler, b_addr) = start(&certs::load(dir.path(), "node-b").unwrap(), config());

    let reply = a.request(b_addr, "node-b", echo(b"ping")).await.unwrap();
    assert_eq!(reply.body, b"ping");
    let reply = b.request(a_addr, "127.0.0.1", echo(b"pong")).await.unwrap();
    assert_eq!(reply.body, b"pong");

    // Many at once over the one pooled connection.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let a = a.clone();
        calls.spawn(async move {
            let body = i.to_be_bytes();
            let reply = a.request(b_addr, "node-b", echo(&body)).await.unwrap();
            assert_eq!(reply.body, body);
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    assert_eq!(b_handler.calls.load(Ordering::SeqCst), 101);
    assert_eq!(a_handler.calls.load(Ordering::SeqCst), 1);

    let err = a
        .request(
            b_addr,
            "node-b",
            Request {
                kind: 9,
                body: vec![],
            },
        )
        .await
        .unwrap_err();
    match err {
        PeerError::Remote { error, .. } => assert_eq!(error.code, 42),
        other => panic!("expected a remote error, got {other}"),
    }

    // A name the peer's certificate does not carry is refused by the client.
    let err = a.request(b_addr, "node-x", echo(b"x")).await.unwrap_err();
    assert!(matches!(err, PeerError::Handshake { .. }), "{err}");
    assert!(err.not_sent());

    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_cannot_connect() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    cluster_dir(ours.path(), &["node-a"]);
    cluster_dir(theirs.path(), &["node-a"]);
    let (a, a_handler, a_addr) = start(&certs::load(ours.path(), "node-a").unwrap(), config());
    let (intruder, intruder_handler, intruder_addr) =
        start(&certs::load(theirs.path(), "node-a").unwrap(), config());

    // The intruder cannot call us: our server refuses its client certificate.
    for _ in 0..3 {
        let result = intruder.request(a_addr, "node-a", echo(b"hi")).await;
        assert!(result.is_err(), "intruder got a reply");
    }
    assert_eq!(a_handler.calls.load(Ordering::SeqCst), 0);

    // And we refuse to talk to a server whose certificate is not from our CA.
    let err = a
        .request(intruder_addr, "node-a", echo(b"hi"))
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::Handshake { .. }), "{err}");
    assert_eq!(intruder_handler.calls.load(Ordering::SeqCst), 0);

    intruder.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    cluster_dir(dir.path(), &["node-a", "node-b"]);
    let big = PeerConfig {
        max_frame: 4 << 20,
        ..config()
    };
    let small = PeerConfig {
        max_frame: 64 << 10,
        ..config()
    };
    let (a, a_handler, a_addr) = start(&certs::load(dir.path(), "node-a").unwrap(), big);
    let (b, b_handler, b_addr) = start(&certs::load(dir.path(), "node-b").unwrap(), small);

    // Over our own limit: refused locally, nothing sent.
    let err = a
        .request(b_addr, "node-b", echo(&vec![0; 5 << 20]))
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::FrameTooLarge { .. }), "{err}");
    assert!(err.not_sent());

    // Within ours, over the server's: the server refuses it without calling the handler.
    let err = a
        .request(b_addr, "node-b", echo(&vec![0; 1 << 20]))
        .await
        .unwrap_err();
    match &err {
        PeerError::Remote { error, .. } => {
            assert_eq!(error.code, RemoteError::FRAME_TOO_LARGE)
        }
        other => panic!("expected FRAME_TOO_LARGE, got {other}"),
    }
    assert!(err.not_sent());
    assert_eq!(b_handler.calls.load(Ordering::SeqCst), 0);

    // A reply over the server's own limit is replaced by an error.
    let err = a
        .request(b_addr, "node-b", sized(100 << 10))
        .await
        .unwrap_err();
    match err {
        PeerError::Remote { error, .. } => assert_eq!(error.code, RemoteError::REPLY_TOO_LARGE),
        other => panic!("expected REPLY_TOO_LARGE, got {other}"),
    }

    // A reply over the client's limit is refused by the client before it is read.
    let err = b
        .request(a_addr, "node-a", sized(1 << 20))
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::ReplyTooLarge { .. }), "{err}");
    assert_eq!(a_handler.calls.load(Ordering::SeqCst), 1);

    // The connection survives all of that.
    let reply = a.request(b_addr, "node-b", echo(b"ok")).await.unwrap();
    assert_eq!(reply.body, b"ok");

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_restarted_peer_is_reconnected_to() {
    let dir = tempfile::tempdir().unwrap();
    cluster_dir(dir.path(), &["node-a", "node-b"]);
    let b_tls = certs::load(dir.path(), "node-b").unwrap();
    let (a, _, _) = start(&certs::load(dir.path(), "node-a").unwrap(), config());
    let (b, _, b_addr) = start(&b_tls, config());
    a.request(b_addr, "node-b", echo(b"1")).await.unwrap();

    b.shutdown().await;
    let err = a.request(b_addr, "node-b", echo(b"2")).await.unwrap_err();
    assert!(err.is_connection_failure(), "{err}");

    // Same address again; the socket is released once the old endpoint's driver exits.
    let handler = Arc::new(TestHandler::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    let b = loop {
        match PeerEndpoint::bind(b_addr, &b_tls, config(), handler.clone()) {
            Ok(b) => break b,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {b_addr}: {e}"),
        }
    };
    let reply = a.request(b_addr, "node-b", echo(b"3")).await.unwrap();
    assert_eq!(reply.body, b"3");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);

    // After shutdown, requests fail at once.
    let a2 = a.clone();
    a.shutdown().await;
    let err = a2.request(b_addr, "node-b", echo(b"4")).await.unwrap_err();
    assert!(matches!(err, PeerError::Closed), "{err}");
    b.shutdown().await;
}

/// A peer that dies without closing its connections and comes back on the same address:
/// with the cluster secret as reset key, the stale connection is reset at once instead of
/// lingering until the idle timeout.
#[tokio::test]
async fn a_crashed_and_restarted_peer_resets_stale_connections() {
    let dir = tempfile::tempdir().unwrap();
    cluster_dir(dir.path(), &["node-a", "node-b"]);
    let secret = certs::load_secret(dir.path()).unwrap();
    let config = PeerConfig {
        reset_secret: Some(secret),
        idle_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(8),
        ..config()
    };
    let b_tls = certs::load(dir.path(), "node-b").unwrap();
    let (a, _, _) = start(&certs::load(dir.path(), "node-a").unwrap(), config.clone());

    // Node B runs on its own runtime, so that it can be killed without any goodbye.
    let b_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = {
        let _guard = b_runtime.enter();
        PeerEndpoint::bind(
            local(),
            &b_tls,
            config.clone(),
            Arc::new(TestHandler::default()),
        )
        .unwrap()
    };
    let b_addr = b.local_addr().unwrap();
    a.request(b_addr, "node-b", echo(b"before")).await.unwrap();
    b_runtime.shutdown_background();
    drop(b);

    let handler = Arc::new(TestHandler::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    let b = loop {
        match PeerEndpoint::bind(b_addr, &b_tls, config.clone(), handler.clone()) {
            Ok(b) => break b,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {b_addr}: {e}"),
        }
    };
    let restarted = Instant::now();
    let mut failures = 0;
    loop {
        match a.request(b_addr, "node-b", echo(b"after")).await {
            Ok(reply) => {
                assert_eq!(reply.body, b"after");
                break;
            }
            Err(err) => {
                assert!(err.is_connection_failure(), "{err}");
                failures += 1;
                assert!(failures < 5, "still failing: {err}");
            }
        }
    }
    let took = restarted.elapsed();
    eprintln!("reconnected after {took:?} and {failures} failed request(s)");
    assert!(took < Duration::from_secs(3), "reconnect took {took:?}");
    a.shutdown().await;
    b.shutdown().await;
}
