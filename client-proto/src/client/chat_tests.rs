//! [`ChatClient`] against fake nodes on loopback: what it does when a node drains.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use super::*;
use crate::codec::{self, Codec};
use crate::ids::{ConversationId, DeviceId};

const WAIT: Duration = Duration::from_secs(10);

type FakeConn = WebSocketStream<TcpStream>;

/// A fake node: accepts one WebSocket, answers `auth` with `ready`.
async fn accept(listener: &TcpListener, node_id: u16) -> FakeConn {
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    assert!(matches!(next(&mut ws).await, ClientFrame::Auth { .. }));
    let ready = ServerFrame::Ready {
        user_id: UserId(1),
        device_id: DeviceId(2),
        node_id,
        heartbeat_interval_ms: 60_000,
    };
    put(&mut ws, &ready).await;
    ws
}

async fn put(ws: &mut FakeConn, frame: &ServerFrame) {
    let text = String::from_utf8(codec::encode(Codec::Json, frame)).unwrap();
    ws.send(WsMessage::Text(text.into())).await.unwrap();
}

/// The next client frame.
async fn next(ws: &mut FakeConn) -> ClientFrame {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Text(t))) => {
                return codec::decode(Codec::Json, t.as_bytes()).unwrap()
            }
            Some(Ok(_)) => continue,
            other => panic!("the client went away: {other:?}"),
        }
    }
}

/// The next `send` frame's client id (skipping `seen`, `sync`, heartbeats).
async fn next_send(ws: &mut FakeConn) -> String {
    loop {
        if let ClientFrame::Send { id, .. } = next(ws).await {
            return id;
        }
    }
}

#[tokio::test]
async fn a_draining_hint_moves_the_client_which_resends_unacked_sends_with_their_ids() {
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_url = format!("ws://{}/v1/ws", a.local_addr().unwrap());
    let b_url = format!("ws://{}/v1/ws", b.local_addr().unwrap());
    let mut client = ChatClient::start(ClientOptions::new(a_url, "token"));
    let mut on_a = accept(&a, 0).await;

    // Node A takes a send and, before acking it, starts draining.
    let sender = client.sender();
    let send = tokio::spawn(async move {
        sender
            .send_with_id("c-1".into(), Recipient::User(UserId(9)), "hi")
            .await
    });
    assert_eq!(next_send(&mut on_a).await, "c-1");
    put(
        &mut on_a,
        &ServerFrame::Draining {
            reconnect_to: Some(b_url.clone()),
        },
    )
    .await;

    // The client leaves A (a close frame, then the end) and goes to B at once, where it
    // syncs and sends c-1 again, with the same id.
    let mut on_b = accept(&b, 1).await;
    let left_a = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = on_a.next().await {
            if m.is_close() {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(
        left_a,
        Ok(true),
        "the client did not close its connection to A"
    );
    let mut synced = false;
    let resent = loop {
        match next(&mut on_b).await {
            ClientFrame::Sync { .. } => synced = true,
            ClientFrame::Send { id, .. } => break id,
            _ => {}
        }
    };
    assert!(synced, "no sync before the resend");
    assert_eq!(resent, "c-1");
    let ack = ServerFrame::Ack {
        reference: "c-1".into(),
        message_id: MessageId(77),
        conversation: ConversationId::direct(UserId(1), UserId(9)),
        ts: 5,
    };
    put(&mut on_b, &ack).await;
    let acked = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
    assert_eq!(acked.unwrap().message_id, MessageId(77));

    let mut events = Vec::new();
    while events.len() < 3 {
        events.push(
            tokio::time::timeout(WAIT, client.next_event())
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        events,
        vec![
            Some(Event::Connected { node_id: 0 }),
            Some(Event::Moving {
                to: Some(b_url.clone())
            }),
            Some(Event::Connected { node_id: 1 }),
        ]
    );
    let stats = client.stats();
    assert_eq!(
        (
            stats.connects,
            stats.moves_by_hint,
            stats.lost,
            stats.resent
        ),
        (2, 1, 0, 1),
        "{stats:?}"
    );
    client.shutdown().await;
}

#[test]
fn a_quic_hint_is_a_quic_url() {
    let (events, _ev_rx) = mpsc::channel(1);
    let driver = |url: &str| Driver {
        opts: ClientOptions::new(url, "t"),
        cmds: mpsc::channel(1).1,
        events: events.clone(),
        cursor: Arc::default(),
        seen_max: 0,
        told_seen: 0,
        syncing: false,
        unacked: HashMap::new(),
        order: Vec::new(),
        seen: HashSet::new(),
        seen_order: VecDeque::new(),
        stop: CancellationToken::new(),
        stats: Arc::default(),
    };
    let quic = driver("quic://127.0.0.1:1");
    assert_eq!(quic.hinted_url("10.0.0.3:9100"), "quic://10.0.0.3:9100");
    assert_eq!(
        quic.hinted_url("quic://10.0.0.3:9100"),
        "quic://10.0.0.3:9100"
    );
    let ws = driver("ws://127.0.0.1:1/v1/ws");
    assert_eq!(
        ws.hinted_url("ws://10.0.0.3:9002/v1/ws"),
        "ws://10.0.0.3:9002/v1/ws"
    );
}
