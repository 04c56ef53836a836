//! One bench connection: a WebSocket opened with `client_proto::client::connect_raw` (or, for
//! the `connections` scenario, over a TCP socket bound to a chosen source address),
//! authenticated, then split into a sink and a stream so that a task can send and receive at
//! once (pipelining). `client_proto::client::WsConnection` has no split, which is why this
//! lives here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use client_proto::client::connect_raw;
use client_proto::codec::{self, Codec};
use client_proto::ids::UserId;
use client_proto::{ClientFrame, ServerFrame};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a connection may take to open and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// An authenticated connection, split into halves.
pub struct Conn {
    pub sink: SplitSink<Ws, WsMessage>,
    pub stream: SplitStream<Ws>,
    pub codec: Codec,
    pub user_id: UserId,
    pub heartbeat_interval_ms: u64,
}

/// Opens `url` and authenticates with `token`.
pub async fn connect(url: &str, token: &str, codec: Codec) -> Result<Conn> {
    let ws = tokio::time::timeout(CONNECT_TIMEOUT, connect_raw(url))
        .await
        .map_err(|_| anyhow!("connecting to {url} timed out"))?
        .with_context(|| format!("connecting to {url}"))?;
    authenticate(ws, token, codec).await
}

/// Opens `url` from the local address `source` (a 127.0.0.x address, so that many
/// connections do not exhaust one source address's ports) and authenticates. Uses small
/// buffers: this is for holding many idle connections.
pub async fn connect_from(url: &str, source: IpAddr, token: &str, codec: Codec) -> Result<Conn> {
    let addr = socket_addr_of(url)?;
    let open = async {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .context("creating a TCP socket")?;
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding to {source}"))?;
        let tcp = socket
            .connect(addr)
            .await
            .with_context(|| format!("connecting from {source} to {addr}"))?;
        let mut cfg = WebSocketConfig::default();
        cfg.read_buffer_size = 4096;
        cfg.write_buffer_size = 0;
        cfg.max_message_size = Some(4 * client_proto::limits::MAX_FRAME_BYTES);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(tcp), Some(cfg))
                .await
                .context("WebSocket handshake")?;
        Ok::<_, anyhow::Error>(ws)
    };
    let ws = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| anyhow!("connecting to {url} from {source} timed out"))??;
    authenticate(ws, token, codec).await
}

/// `ws://host:port/...` → the socket address.
fn socket_addr_of(url: &str) -> Result<SocketAddr> {
    let rest = url
        .split("://")
        .nth(1)
        .ok_or_else(|| anyhow!("{url} has no scheme"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport.parse().with_context(|| {
        format!("{hostport} is not an IP:port (the connections scenario needs one)")
    })
}

async fn authenticate(ws: Ws, token: &str, codec: Codec) -> Result<Conn> {
    let (mut sink, mut stream) = ws.split();
    sink.send(encode(
        codec,
        &ClientFrame::Auth {
            token: token.into(),
        },
    ))
    .await
    .context("sending auth")?;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| anyhow!("no ready frame within {CONNECT_TIMEOUT:?}"))?;
        let frame = match decode(msg)? {
            Some(f) => f,
            None => continue,
        };
        match frame {
            ServerFrame::Ready {
                user_id,
                heartbeat_interval_ms,
                ..
            } => {
                return Ok(Conn {
                    sink,
                    stream,
                    codec,
                    user_id,
                    heartbeat_interval_ms,
                })
            }
            ServerFrame::Error { code, message, .. } => {
                bail!("authentication refused: {code}: {message}")
            }
            other => bail!("unexpected frame before ready: {other:?}"),
        }
    }
}

/// A client frame as a WebSocket message in `codec`.
pub fn encode(codec: Codec, frame: &ClientFrame) -> WsMessage {
    let bytes = codec::encode(codec, frame);
    match codec {
        Codec::Json => WsMessage::Text(String::from_utf8(bytes).unwrap_or_default().into()),
        Codec::Binary => WsMessage::Binary(bytes.into()),
    }
}

/// Decodes what the stream yielded: `Ok(None)` for control messages (ping, pong), an error
/// when the connection ended or the frame is malformed.
pub fn decode(
    msg: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<ServerFrame>> {
    let msg = match msg {
        None => bail!("the connection closed"),
        Some(Err(e)) => bail!("transport: {e}"),
        Some(Ok(m)) => m,
    };
    let frame = match msg {
        WsMessage::Text(t) => codec::decode(Codec::Json, t.as_bytes()),
        WsMessage::Binary(b) => codec::decode(Codec::Binary, &b),
        WsMessage::Close(c) => bail!(
            "the server closed the connection{}",
            c.map(|c| format!(" with code {}: {}", u16::from(c.code), c.reason))
                .unwrap_or_default()
        ),
        _ => return Ok(None),
    };
    frame.map(Some).context("decoding a server frame")
}
