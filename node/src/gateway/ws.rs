//! The WebSocket transport: checks the upgrade (a WebSocket request, from an allowed
//! `Origin`), then adapts an axum WebSocket to the session's frame stream and sink. A peer
//! that breaks the WebSocket rules is told why with the close code RFC 6455 gives (1002,
//! 1007, 1009) before the connection is dropped.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use client_proto::codec::{CloseCode, Codec, Encoded};
use client_proto::limits::MAX_FRAME_BYTES;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

use crate::domain::error::ApiError;
use crate::gateway::drain::Transport;
use crate::gateway::session::{self, Inbound, OutFrame};
use crate::node::Node;

/// Read buffer per connection. tungstenite's default is 128 KiB, which at 50,000 idle
/// connections would be 6 GiB; frames larger than this are still read, in several chunks.
/// 2 KiB holds several typical frames per read and is most of an idle connection's memory.
const READ_BUFFER: usize = 2 * 1024;
/// Write buffer per connection before a flush is forced.
const WRITE_BUFFER: usize = 4 * 1024;
/// Most bytes queued for a slow reader before writes fail.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// How long a connection the server closed waits for the client's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /v1/ws`.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if node.drain.is_draining() {
        metrics::counter!("gateway_drain_refused_total", "transport" => "ws").increment(1);
        tracing::debug!(%peer, "WebSocket upgrade refused: draining");
        return ApiError::new(
            client_proto::ErrorCode::Unavailable,
            "this node is draining; connect to another node (GET /v1/discover)",
        )
        .retry_after(std::time::Duration::from_secs(1))
        .into_response();
    }
    if let Err(why) = check_origin(&headers, &node.cfg.allowed_origins) {
        // A page served by another member of the cluster (the web client moving to this node
        // when its own is gone) is as much ours as a page served here.
        let members: Vec<String> = node.members().await.into_iter().map(|m| m.ws_url).collect();
        if !from_a_member(&headers, &members) {
            metrics::counter!("gateway_origin_refused_total").increment(1);
            tracing::debug!(%peer, why, "WebSocket origin refused");
            return ApiError::forbidden(why).into_response();
        }
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::bad_request(format!(
                "this is the WebSocket endpoint; open it with a WebSocket upgrade ({})",
                e.body_text()
            ))
            .into_response()
        }
    };
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve(node, peer, socket))
}

async fn serve(node: Arc<Node>, peer: SocketAddr, socket: WebSocket) {
    let _tracked = node.connection_guard();
    let (sink, stream) = socket.split();
    let mut reader = stream
        .filter_map(|item| async move {
            match item {
                Ok(Message::Text(t)) => Some(Inbound::Data(Codec::Json, t.into())),
                Ok(Message::Binary(b)) => Some(Inbound::Data(Codec::Binary, b)),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => None,
                Ok(Message::Close(_)) => Some(Inbound::Closed),
                Err(e) => Some(classify(e)),
            }
        })
        .boxed();
    let writer = sink.with(|out: OutFrame| async move {
        Ok::<_, axum::Error>(match out {
            OutFrame::Data(Encoded::Text(text)) => Message::Text(text.into()),
            OutFrame::Data(Encoded::Binary(bytes)) => Message::Binary(bytes.into()),
            OutFrame::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        })
    });
    session::run(
        node,
        peer,
        Transport::WebSocket,
        &mut reader,
        Box::pin(writer),
    )
    .await;
    // Wait (briefly) for the client's answer to our close frame before the socket goes:
    // closing a TCP socket with unread bytes in it sends a reset, which can make the
    // client lose the close frame (it then sees 1006 instead of our code). A session the
    // client ended has nothing more to read, and this returns at once.
    let linger = tokio::time::Instant::now() + CLOSE_LINGER;
    while let Ok(Some(_)) = tokio::time::timeout_at(linger, reader.next()).await {}
}

/// Tells a peer that broke the rules (a frame over the size limit: 1009; a text frame that
/// is not UTF-8: 1007; any other protocol violation: 1002) apart from a broken connection.
fn classify(e: axum::Error) -> Inbound {
    use tungstenite::error::ProtocolError;
    let Ok(e) = e.into_inner().downcast::<tungstenite::Error>() else {
        return Inbound::Closed;
    };
    match *e {
        tungstenite::Error::Capacity(_) => Inbound::TooLarge,
        tungstenite::Error::Utf8(_) => {
            Inbound::Violation(CloseCode::InvalidData, "text frame is not UTF-8")
        }
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Inbound::Closed
        }
        tungstenite::Error::Protocol(ProtocolError::UnmaskedFrameFromClient) => {
            Inbound::Violation(CloseCode::ProtocolError, "client frames must be masked")
        }
        tungstenite::Error::Protocol(
            ProtocolError::UnknownDataFrameType(_) | ProtocolError::UnknownControlFrameType(_),
        ) => Inbound::Violation(CloseCode::ProtocolError, "reserved opcode"),
        tungstenite::Error::Protocol(_) => {
            Inbound::Violation(CloseCode::ProtocolError, "WebSocket protocol error")
        }
        _ => Inbound::Closed,
    }
}

/// Whether the request's `Origin` is a cluster member's HTTP origin (`ws_urls` are the
/// members' WebSocket URLs, `ws://host:port/v1/ws`).
fn from_a_member(headers: &HeaderMap, ws_urls: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return false;
    };
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    ws_urls.iter().any(|url| {
        url.strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|member| member.eq_ignore_ascii_case(authority))
    })
}

/// Whether a WebSocket request may come from its `Origin`: no `Origin` (a native client);
/// the node's own origin (its host and port are the request's `Host`); or one of `allowed`
/// (`*`: any). Browsers always send `Origin` on WebSocket requests, so this stops another
/// site's page from using a visitor's token here.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| "the Origin header is not ASCII".to_string())?;
    let shown: String = origin.chars().take(100).collect();
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (authority, host) {
        (Some(a), Some(h)) if !a.contains('/') && a.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(format!(
            "WebSocket connections from origin {shown:?} are not allowed (see --allowed-origins)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins_of_members() {
        let members = vec![
            "ws://127.0.0.1:9001/v1/ws".to_string(),
            "wss://chat-2.example:443/v1/ws".to_string(),
        ];
        let h = |o: &str| headers(Some(o), "127.0.0.1:9000");
        assert!(from_a_member(&h("http://127.0.0.1:9001"), &members));
        assert!(from_a_member(&h("https://CHAT-2.example:443"), &members));
        assert!(!from_a_member(&h("http://127.0.0.1:9002"), &members));
        assert!(!from_a_member(&h("http://evil.example"), &members));
        assert!(!from_a_member(&h("null"), &members));
        assert!(!from_a_member(&headers(None, "x"), &members));
    }

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        assert!(check_origin(&headers(None, "chat.example:8080"), &none).is_ok());
        assert!(check_origin(
            &headers(Some("http://chat.example:8080"), "chat.example:8080"),
            &none
        )
        .is_ok());
        assert!(check_origin(
            &headers(Some("https://Chat.Example:8080"), "chat.example:8080"),
            &none
        )
        .is_ok());
        for bad in [
            "http://evil.example",
            "http://chat.example",
            "null",
            "http://chat.example:8080/x",
            "ftp://chat.example:8080",
        ] {
            assert!(
                check_origin(&headers(Some(bad), "chat.example:8080"), &none).is_err(),
                "{bad}"
            );
        }
        let some = vec!["https://app.example".to_string()];
        assert!(check_origin(
            &headers(Some("https://app.example"), "chat.example:8080"),
            &some
        )
        .is_ok());
        assert!(check_origin(
            &headers(Some("http://app.example"), "chat.example:8080"),
            &some
        )
        .is_err());
        let any = vec!["*".to_string()];
        assert!(check_origin(
            &headers(Some("http://evil.example"), "chat.example:8080"),
            &any
        )
        .is_ok());
    }
}
