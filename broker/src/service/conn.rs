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
    // A request once read runs to its end, whatever becomes of the connection: dropping a
    // compio task's handle cancels the task wherever it waits, and a request cancelled half
    // way (a group's or a table's append under way, a table transaction left appending with
    // its locks held) leaves its coordinator's state behind its log. Once the socket fails,
    // the answers still coming are let go of (`detach`), not dropped.
    let write_task = compio::runtime::spawn(async move {
        let mut broken = false;
        while let Ok(pending) = rx.recv_async().await {
            if broken {
                pending.detach();
                continue;
            }
            let Ok(Some(frames)) = pending.await else {
                continue;
            };
            if write_frames(&mut writer, frames).await.is_err() {
                broken = true;
            }
        }
    });
    if let Some((id, request)) = first {
        if let Err(unsent) = tx.send_async(run(&shard, id, request)).await {
            unsent.into_inner().detach();
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
        if let Err(unsent) = tx.send_async(pending).await {
            unsent.into_inner().detach();
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

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;
    use std::io::Write;
    use std::time::Duration;

    use futures_channel::oneshot;
    use skein_client::wire::{request_frame, ApiKey, ApiVersionsRequest, RequestHeader};

    use super::*;

    /// Answers each request when its gate opens, counting the requests that ran to their end.
    struct Gated {
        gates: RefCell<VecDeque<oneshot::Receiver<()>>>,
        finished: Cell<usize>,
    }

    impl Service for Gated {
        fn max_in_flight(&self) -> usize {
            8
        }
        fn max_frame_bytes(&self) -> u32 {
            1 << 20
        }
        fn handle(self: Rc<Self>, _req: Request) -> Pin<Box<dyn Future<Output = Response>>> {
            let gate = self.gates.borrow_mut().pop_front();
            Box::pin(async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                self.finished.set(self.finished.get() + 1);
                Response::ApiVersions(super::super::api_versions())
            })
        }
        fn peer_message(self: &Rc<Self>, _from: Option<std::net::SocketAddr>, _body: Reader) -> bool {
            false
        }
        fn may_move(&self) -> bool {
            false
        }
        fn home(&self, _req: &Request) -> Option<usize> {
            None
        }
        fn move_to(&self, _to: usize, _conn: Connection) {
            unreachable!("one shard")
        }
    }

    #[test]
    fn requests_of_a_connection_that_breaks_still_run_to_their_end() {
        let runtime = compio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let (open, gates): (Vec<_>, VecDeque<_>) = (0..3).map(|_| oneshot::channel::<()>()).unzip();
            let service = Rc::new(Gated { gates: RefCell::new(gates), finished: Cell::new(0) });
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            let count = Arc::new(AtomicUsize::new(1));
            let serving = compio::runtime::spawn(serve(service.clone(), Connection::new(server, count.clone())));
            // Three pipelined requests, then the client goes away without reading an answer.
            for id in 1..=3 {
                let header = RequestHeader {
                    api_key: ApiKey::ApiVersions,
                    api_version: 0,
                    correlation_id: id,
                    client_id: "t".into(),
                };
                client.write_all(&request_frame(&header, &ApiVersionsRequest {})).expect("send");
            }
            compio::time::sleep(Duration::from_millis(50)).await;
            drop(client);
            // The first answer meets the closed socket (its reset comes back), the second's
            // write fails: the connection is broken while the third is still running.
            let mut open = open.into_iter();
            for _ in 0..2 {
                let _ = open.next().expect("gate").send(());
                compio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(service.finished.get(), 2);
            let _ = open.next().expect("gate").send(());
            compio::time::timeout(Duration::from_secs(10), serving).await.expect("the connection ends").ok();
            compio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(service.finished.get(), 3, "the third request ran to its end after the connection broke");
            assert_eq!(count.load(Ordering::Relaxed), 0, "the connection was counted out");
        });
    }
}
