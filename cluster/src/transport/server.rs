//! The serving half of an endpoint: accepts connections from peers, and runs the handler
//! for each request stream, a bounded number at a time per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, Instrument};

use super::frame::{self, FrameError, Reply, Request, Response};
use super::{RemoteError, Shared};

/// A boxed, sendable future: what [`RpcHandler::handle`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Serves requests from peers. One call per request; calls for different requests run
/// concurrently.
pub trait RpcHandler: Send + Sync + 'static {
    /// Handles `request` from the peer at `from`. An `Err` goes back to the caller as
    /// [`super::PeerError::Remote`]; use codes below [`RemoteError::RESERVED`].
    fn handle(
        &self,
        from: SocketAddr,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, RemoteError>>;
}

/// Stream error code sent when this endpoint refuses to read a request.
const STOP_TOO_LARGE: u32 = 1;

/// Accepts connections until the endpoint is cancelled or closed.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            incoming = shared.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let span = tracing::debug_span!("peer_conn", remote = %remote);
        shared
            .tasks
            .spawn(serve_connection(shared.clone(), incoming).instrument(span));
    }
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let handshake = tokio::time::timeout(shared.config.connect_timeout, incoming);
    let conn = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        result = handshake => match result {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                debug!(%error, "peer handshake failed");
                return;
            }
            Err(_) => {
                debug!("peer handshake timed out");
                return;
            }
        },
    };
    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight as usize));
    loop {
        // Take a permit first: with all in use we stop accepting streams, and quinn's stream
        // limit stops the peer from opening more.
        let permit = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (send, recv) = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(%error, "peer connection ended");
                    break;
                }
            },
        };
        let span = tracing::debug_span!("peer_req", remote = %remote, stream = %send.id());
        shared
            .tasks
            .spawn(serve_stream(shared.clone(), remote, send, recv, permit).instrument(span));
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    remote: SocketAddr,
    mut send: SendStream,
    mut recv: RecvStream,
    _permit: OwnedSemaphorePermit,
) {
    let max = shared.config.max_frame;
    let read = tokio::time::timeout(
        shared.config.request_timeout,
        frame::read_frame(&mut recv, max),
    );
    let payload = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        read = read => read,
    };
    let reply = match payload {
        Err(_) => {
            debug!("request not received in time");
            return;
        }
        Ok(Err(FrameError::Read(error))) => {
            debug!(%error, "request stream broke");
            return;
        }
        Ok(Err(FrameError::TooLarge { len })) => {
            let _ = recv.stop(VarInt::from_u32(STOP_TOO_LARGE));
            Reply::Err(RemoteError::new(
                RemoteError::FRAME_TOO_LARGE,
                format!("request frame of {len} bytes exceeds the {max}-byte limit"),
            ))
        }
        Ok(Ok(payload)) => match frame::decode::<Request>(&payload) {
            Err(error) => Reply::Err(RemoteError::new(RemoteError::BAD_FRAME, error.to_string())),
            Ok(request) => {
                let handled = shared.handler.handle(remote, request);
                let result = tokio::select! {
                    _ = shared.cancel.cancelled() => Err(RemoteError::new(
                        RemoteError::SHUTTING_DOWN,
                        "peer shutting down",
                    )),
                    result = handled => result,
                };
                match result {
                    Ok(response) => Reply::Ok(response),
                    Err(error) => Reply::Err(error),
                }
            }
        },
    };
    let bytes = match encode_reply(&reply, max) {
        Ok(bytes) => bytes,
        Err(error) => match encode_reply(&Reply::Err(error), max) {
            Ok(bytes) => bytes,
            Err(_) => return,
        },
    };
    if let Err(error) = send.write_all(&bytes).await {
        debug!(%error, "cannot send reply");
        return;
    }
    let _ = send.finish();
}

/// Encodes a reply frame, or says why it cannot be sent.
fn encode_reply(reply: &Reply, max: usize) -> Result<Vec<u8>, RemoteError> {
    let bytes = frame::encode(reply)
        .map_err(|error| RemoteError::new(RemoteError::REPLY_TOO_LARGE, error.to_string()))?;
    if bytes.len() - 4 > max {
        return Err(RemoteError::new(
            RemoteError::REPLY_TOO_LARGE,
            format!(
                "reply of {} bytes exceeds the {max}-byte limit",
                bytes.len() - 4
            ),
        ));
    }
    Ok(bytes)
}
