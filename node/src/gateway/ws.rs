//! The WebSocket transport: adapts an axum WebSocket to the session's frame stream and sink.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use client_proto::codec::Codec;
use client_proto::limits::MAX_FRAME_BYTES;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

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

/// `GET /v1/ws`.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
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
    let reader = stream
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
            OutFrame::Data(Codec::Json, bytes) => {
                Message::Text(String::from_utf8(bytes).unwrap_or_default().into())
            }
            OutFrame::Data(Codec::Binary, bytes) => Message::Binary(bytes.into()),
            OutFrame::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        })
    });
    session::run(node, peer, reader, Box::pin(writer)).await;
}

/// Tells "frame over the size limit" (close 1009) apart from a broken connection.
fn classify(e: axum::Error) -> Inbound {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) if matches!(*e, tungstenite::Error::Capacity(_)) => Inbound::TooLarge,
        _ => Inbound::Closed,
    }
}
