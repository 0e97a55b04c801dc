//! One client connection: read frames, run each request as a task, write responses in
//! request order.
//!
//! A reader loop decodes each frame's header and spawns the request's handler; the handle goes
//! into a bounded queue (`max_in_flight`), so reading pauses when a client pipelines too much.
//! A writer task awaits the handles in order and writes each response. A frame over the size
//! limit, or one too short for a header, closes the connection with a logged reason; an
//! unknown API or version and an undecodable body get an error response and the connection
//! goes on.
//!
//! A connection is dealt to a shard before anyone knows what it will ask for. On a broker with
//! several shards, the first produce or fetch request decides where it lives: when another
//! shard owns every partition the request names, the connection moves there (earlier answers
//! are written first; the request, already read, goes with it), so a producer or consumer of
//! one shard's partitions costs no cross-shard hop per request. It moves at most once; a
//! request that spans shards, or names this shard's partitions, settles it where it is.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use compio::net::TcpStream;
use compio::runtime::JoinHandle;
use skein_client::wire::io::{read_frame, write_frames, FrameError};
use skein_client::wire::{ApiKey, DecodeError, ErrorCode, HeaderError, Reader, RequestHeader};

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
    /// Whether connections may move to another shard (there is more than one).
    fn may_move(&self) -> bool;
    /// The shard a connection whose first data request is `req` should move to: `Some` when
    /// `req` is a produce or fetch whose partitions another shard owns, all of them.
    fn home(&self, req: &Request) -> Option<usize>;
    /// Hands `conn` to shard `to`, which serves it from its first request on.
    fn move_to(&self, to: usize, conn: Connection);
}

/// A client connection on its way to a shard: the socket, its place in the connection count,
/// and (when it moved from another shard) the request that shard read but did not run.
pub(crate) struct Connection {
    stream: std::net::TcpStream,
    guard: CountGuard,
    first: Option<(u32, Result<Request, DecodeError>)>,
}

impl Connection {
    /// A connection just accepted; `count` already includes it and is decremented when the
    /// connection ends, on whichever shard.
    pub(crate) fn new(stream: std::net::TcpStream, count: Arc<AtomicUsize>) -> Self {
        Connection { stream, guard: CountGuard(count), first: None }
    }
}

/// Serves a connection handed to this shard until the peer closes it, breaks the protocol or
/// moves to the shard that owns what it asks for.
pub(crate) async fn serve<S: Service>(shard: Rc<S>, conn: Connection) {
    let Connection { stream, guard, first } = conn;
    let peer = stream.peer_addr().ok();
    // A connection that may still move keeps a second descriptor of its socket: the runtime's
    // own is closed when this shard lets go of it.
    let mut spare = if first.is_none() && shard.may_move() { stream.try_clone().ok() } else { None };
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
    if let Some((id, request)) = first {
        if tx.send_async(run(&shard, id, request)).await.is_err() {
            return;
        }
    }
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
                spare = None; // an inter-broker link: its messages are routed one by one
                if shard.peer_message(peer, r) {
                    continue;
                }
                break;
            }
            Ok(header) => {
                let request = decode_request(header.api_key, r);
                if let (Some(_), Ok(req @ (Request::Produce(_) | Request::Fetch(_)))) = (&spare, &request) {
                    if let Some(to) = shard.home(req) {
                        // Answers to earlier requests go out from here first, in order.
                        drop(tx);
                        let _ = write_task.await;
                        drop(reader);
                        if let Some(stream) = spare.take() {
                            tracing::debug!(?peer, to, "connection moves to the shard that owns its partitions");
                            let first = Some((header.correlation_id, request));
                            shard.move_to(to, Connection { stream, guard, first });
                        }
                        return;
                    }
                    spare = None;
                }
                run(&shard, header.correlation_id, request)
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
    drop(guard);
}

/// Runs a decoded request (or answers an undecodable one) as a task of this shard.
fn run<S: Service>(shard: &Rc<S>, id: u32, request: Result<Request, DecodeError>) -> Pending {
    let shard = shard.clone();
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

fn error_reply(correlation_id: u32, code: ErrorCode) -> Pending {
    compio::runtime::spawn(async move { Some(vec![error_frame(correlation_id, code)]) })
}

struct CountGuard(Arc<AtomicUsize>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
