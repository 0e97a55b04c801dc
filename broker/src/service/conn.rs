//! One client connection: read frames, run each request as a task, write responses in
//! request order.
//!
//! A reader loop decodes each frame's header and spawns the request's handler; the handle goes
//! into a bounded queue (`max_in_flight`), so reading pauses when a client pipelines too much.
//! A writer task awaits the handles in order and writes each response. A frame over the size
//! limit, or one too short for a header, closes the connection with a logged reason; an
//! unknown API or version and an undecodable body get an error response and the connection
//! goes on.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use compio::net::TcpStream;
use compio::runtime::JoinHandle;
use skein_client::wire::io::{read_frame, write_frames, FrameError};
use skein_client::wire::{ApiKey, ErrorCode, HeaderError, Reader, RequestHeader};

use super::codec::{decode_request, encode_response, error_frame};
use super::{Request, Response};

type Pending = JoinHandle<Option<Vec<Vec<u8>>>>;

/// What serves the requests of a connection: a shard of a cluster broker (tests can plug in
/// another).
pub(crate) trait Service: 'static {
    /// Most requests in flight per connection.
    fn max_in_flight(&self) -> usize;
    /// Largest frame accepted.
    fn max_frame_bytes(&self) -> u32;
    /// Handles one request.
    fn handle(self: Rc<Self>, req: Request) -> Pin<Box<dyn Future<Output = Response>>>;
    /// A one-way inter-broker message (`ApiKey::Cluster`) from the connection's remote
    /// address; `false` closes the connection.
    fn peer_message(self: &Rc<Self>, from: Option<std::net::SocketAddr>, body: Reader) -> bool;
}

/// Serves a connection handed to this shard until the peer closes it or breaks the protocol.
pub(crate) async fn serve<S: Service>(shard: Rc<S>, stream: std::net::TcpStream, count: Arc<AtomicUsize>) {
    let _guard = CountGuard(count);
    let peer = stream.peer_addr().ok();
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not register a connection");
            return;
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    let (mut reader, mut writer) = stream.into_split();
    let (tx, rx) = flume::bounded::<Pending>(shard.max_in_flight().max(1));
    let write_task = compio::runtime::spawn(async move {
        while let Ok(pending) = rx.recv_async().await {
            let Ok(Some(frames)) = pending.await else {
                continue;
            };
            if write_frames(&mut writer, frames).await.is_err() {
                break;
            }
        }
    });
    loop {
        let body = match read_frame(&mut reader, shard.max_frame_bytes()).await {
            Ok(b) => b,
            Err(FrameError::Closed) => break,
            Err(FrameError::TooLarge(n)) => {
                tracing::warn!(
                    ?peer,
                    bytes = n,
                    limit = shard.max_frame_bytes(),
                    "closing connection: frame too large"
                );
                break;
            }
            Err(FrameError::Io(e)) => {
                tracing::debug!(?peer, error = %e, "connection read failed");
                break;
            }
        };
        let mut r = Reader::new(body);
        let pending = match RequestHeader::decode(&mut r) {
            Ok(header) if header.api_key == ApiKey::Cluster => {
                if shard.peer_message(peer, r) {
                    continue;
                }
                break;
            }
            Ok(header) => {
                let (shard, id) = (shard.clone(), header.correlation_id);
                let request = decode_request(header.api_key, r);
                compio::runtime::spawn(async move {
                    let response = match request {
                        Ok(req) => shard.handle(req).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "undecodable request body");
                            Response::Error(ErrorCode::INVALID_REQUEST)
                        }
                    };
                    encode_response(id, response)
                })
            }
            Err(HeaderError::Malformed) => {
                tracing::warn!(?peer, "closing connection: frame too short for a request header");
                break;
            }
            Err(HeaderError::Unsupported { correlation_id }) => {
                error_reply(correlation_id, ErrorCode::UNSUPPORTED_VERSION)
            }
            Err(HeaderError::Invalid { correlation_id }) => error_reply(correlation_id, ErrorCode::INVALID_REQUEST),
        };
        if tx.send_async(pending).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = write_task.await;
}

fn error_reply(correlation_id: u32, code: ErrorCode) -> Pending {
    compio::runtime::spawn(async move { Some(vec![error_frame(correlation_id, code)]) })
}

struct CountGuard(Arc<AtomicUsize>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
