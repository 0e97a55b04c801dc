//! One connection to a broker: pipelined requests, responses matched in order.
//!
//! A writer task sends frames in the order requests were made and records, for each, who
//! waits for the answer; a reader task hands each response frame to the oldest waiter and
//! checks its correlation id. A broken connection fails every waiting request with
//! `ConnectionLost`; callers reconnect.
//!
//! A caller that gives up on a response ([`Connection::wait_for`] past its bound, or
//! [`Connection::mark_broken`]) breaks the whole connection: responses come back in request
//! order, so every later request would queue behind the lost one. Breaking it fails the
//! waiting requests at once and stops both tasks, which closes the socket.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use compio::net::TcpStream;
use futures_channel::oneshot;
use futures_util::future::{select, Either};

use crate::wire::io::{read_frame, write_frames};
use crate::wire::{decode_response, request_frame, ApiKey, ErrorCode, RequestHeader, Wire, FRAME_BYTES_MAX_DEFAULT};
use crate::ClientError;

type Waiter = (u32, oneshot::Sender<Result<BytesMut, ClientError>>);

struct Outgoing {
    frame: Vec<Bytes>,
    waiter: Option<Waiter>,
}

/// A connection to one broker.
pub struct Connection {
    outgoing: flume::Sender<Outgoing>,
    next_id: Cell<u32>,
    client_id: String,
    broken: Rc<Cell<bool>>,
    request_timeout: Duration,
    /// Dropped to stop the reader and writer tasks (see [`Connection::mark_broken`]).
    close: RefCell<Option<flume::Sender<()>>>,
    /// The writer's queue, drained when the connection is given up.
    queued: flume::Receiver<Outgoing>,
    pending: Rc<RefCell<VecDeque<Waiter>>>,
}

impl Connection {
    /// Connects (with TCP_NODELAY) and starts the reader and writer tasks.
    pub async fn connect(addr: &str, client_id: &str, request_timeout: Duration) -> Result<Connection, ClientError> {
        let stream = compio::time::timeout(request_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(format!("connecting to {addr}")))?
            .map_err(|e| ClientError::Io(format!("connecting to {addr}: {e}")))?;
        stream.set_nodelay(true).map_err(|e| ClientError::Io(e.to_string()))?;
        let (mut reader, mut writer) = stream.into_split();
        let (tx, rx) = flume::bounded::<Outgoing>(1024);
        let (close, closed) = flume::bounded::<()>(1);
        let queued = rx.clone();
        let pending: Rc<RefCell<VecDeque<Waiter>>> = Rc::default();
        let broken = Rc::new(Cell::new(false));
        {
            let (pending, broken, closed) = (pending.clone(), broken.clone(), closed.clone());
            compio::runtime::spawn(async move {
                loop {
                    let first = match select(rx.recv_async(), closed.recv_async()).await {
                        Either::Left((Ok(first), _)) => first,
                        _ => break, // every sender is gone, or the connection was closed
                    };
                    // Batch whatever else is queued into one vectored write.
                    let mut frames = Vec::new();
                    for out in std::iter::once(first).chain(rx.try_iter().take(255)) {
                        if let Some(w) = out.waiter {
                            pending.borrow_mut().push_back(w);
                        }
                        frames.extend(out.frame);
                    }
                    if write_frames(&mut writer, frames).await.is_err() {
                        break;
                    }
                }
                broken.set(true);
                fail_all(&pending, "write failed");
            })
            .detach();
        }
        {
            let (pending, broken) = (pending.clone(), broken.clone());
            compio::runtime::spawn(async move {
                loop {
                    let read = Box::pin(read_frame(&mut reader, FRAME_BYTES_MAX_DEFAULT));
                    let body = match select(read, closed.recv_async()).await {
                        Either::Left((Ok(b), _)) => b,
                        _ => break, // read failed, or the connection was closed
                    };
                    let Some((id, waiter)) = pending.borrow_mut().pop_front() else {
                        break; // a response nobody asked for: the stream is out of step
                    };
                    let got = body.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    if got != Some(id) {
                        let _ = waiter.send(Err(ClientError::Protocol(format!("response for {got:?}, expected {id}"))));
                        break;
                    }
                    let _ = waiter.send(Ok(body));
                }
                broken.set(true);
                fail_all(&pending, "connection closed");
            })
            .detach();
        }
        Ok(Connection {
            outgoing: tx,
            next_id: Cell::new(1),
            client_id: client_id.to_owned(),
            broken,
            request_timeout,
            close: RefCell::new(Some(close)),
            queued,
            pending,
        })
    }

    /// Whether the connection failed (reconnect to go on).
    pub fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// Whether it works and no request on it is waiting to be written or answered: it may
    /// be handed to another user, whose requests would otherwise queue behind an answer.
    pub fn is_idle(&self) -> bool {
        !self.is_broken() && self.pending.borrow().is_empty() && self.queued.is_empty()
    }

    /// Gives up on this connection: every waiting request fails with `ConnectionLost` now,
    /// new requests are refused, and the socket is closed once its tasks notice (at once,
    /// unless a write is blocked). Used when a response did not come in time, since every
    /// later response on the connection would wait behind it.
    pub fn mark_broken(&self) {
        self.broken.set(true);
        drop(self.close.borrow_mut().take());
        fail_all(&self.pending, "given up");
        // Requests not written yet: dropping their waiters fails them with ConnectionLost.
        drop(self.queued.try_iter().collect::<Vec<_>>());
    }

    /// Sends a request and waits for its response (bounded by the request timeout).
    pub async fn call<Req: Wire, Resp: Wire>(&self, key: ApiKey, req: &Req) -> Result<Resp, ClientError> {
        let rx = self.send(key, req).await?;
        self.wait(key, rx).await
    }

    /// Sends a request; the returned receiver resolves to its response body. Requests sent
    /// one after another are pipelined on the connection.
    pub async fn send<Req: Wire>(
        &self,
        key: ApiKey,
        req: &Req,
    ) -> Result<oneshot::Receiver<Result<BytesMut, ClientError>>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let frame = self.frame(key, req);
        self.enqueue(Outgoing { frame: vec![Bytes::from(frame.1)], waiter: Some((frame.0, tx)) }).await?;
        Ok(rx)
    }

    /// Sends a frame built by `build` from a fresh request header (for frames encoded in
    /// several buffers, like `wire::produce_frame`). With `reply`, returns the receiver of the
    /// response body.
    pub async fn send_frame(
        &self,
        key: ApiKey,
        reply: bool,
        build: impl FnOnce(&RequestHeader) -> Vec<Bytes>,
    ) -> Result<Option<oneshot::Receiver<Result<BytesMut, ClientError>>>, ClientError> {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let header =
            RequestHeader { api_key: key, api_version: 0, correlation_id: id, client_id: self.client_id.clone() };
        let frame = build(&header);
        if !reply {
            self.enqueue(Outgoing { frame, waiter: None }).await?;
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(Outgoing { frame, waiter: Some((id, tx)) }).await?;
        Ok(Some(rx))
    }

    /// Sends a request that gets no response (produce with acks=0).
    pub async fn send_no_reply<Req: Wire>(&self, key: ApiKey, req: &Req) -> Result<(), ClientError> {
        let frame = self.frame(key, req).1;
        self.enqueue(Outgoing { frame: vec![Bytes::from(frame)], waiter: None }).await
    }

    /// Waits for a response from [`Connection::send`] and decodes it.
    pub async fn wait<Resp: Wire>(
        &self,
        key: ApiKey,
        rx: oneshot::Receiver<Result<BytesMut, ClientError>>,
    ) -> Result<Resp, ClientError> {
        let body = match compio::time::timeout(self.request_timeout, rx).await {
            Err(_) => return Err(ClientError::Timeout(format!("{key:?} request"))),
            Ok(Err(_)) => return Err(ClientError::ConnectionLost),
            Ok(Ok(body)) => body?,
        };
        decode_body(key, body)
    }

    /// Like [`Connection::wait`], bounded by `timeout` instead of the request timeout; a
    /// response that does not come in time **breaks the connection** ([`Connection::mark_broken`]),
    /// so later requests do not queue behind the lost one. For requests whose answer is due
    /// soon (produce, fetch), where silence means the broker is gone or stuck.
    pub async fn wait_for<Resp: Wire>(
        &self,
        key: ApiKey,
        rx: oneshot::Receiver<Result<BytesMut, ClientError>>,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let body = match compio::time::timeout(timeout, rx).await {
            Err(_) => {
                self.mark_broken();
                return Err(ClientError::Timeout(format!("{key:?} request: no answer in {timeout:?}")));
            }
            Ok(Err(_)) => return Err(ClientError::ConnectionLost),
            Ok(Ok(body)) => body?,
        };
        decode_body(key, body)
    }

    /// A request and its bounded wait in one: [`Connection::send`], then
    /// [`Connection::wait_for`].
    pub async fn call_for<Req: Wire, Resp: Wire>(
        &self,
        key: ApiKey,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let rx = self.send(key, req).await?;
        self.wait_for(key, rx, timeout).await
    }

    fn frame<Req: Wire>(&self, key: ApiKey, req: &Req) -> (u32, Vec<u8>) {
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let header =
            RequestHeader { api_key: key, api_version: 0, correlation_id: id, client_id: self.client_id.clone() };
        (id, request_frame(&header, req))
    }

    async fn enqueue(&self, out: Outgoing) -> Result<(), ClientError> {
        if self.broken.get() {
            return Err(ClientError::ConnectionLost);
        }
        self.outgoing.send_async(out).await.map_err(|_| ClientError::ConnectionLost)
    }
}

/// Decodes a response body of `key`; a top-level error code becomes `ClientError::Broker`.
pub fn decode_body<Resp: Wire>(key: ApiKey, body: BytesMut) -> Result<Resp, ClientError> {
    match decode_response::<Resp>(body) {
        Ok((_, Ok(resp))) => Ok(resp),
        Ok((_, Err(code))) => Err(ClientError::Broker(code, format!("{key:?} request"))),
        Err(e) => Err(ClientError::Protocol(e.to_string())),
    }
}

fn fail_all(pending: &RefCell<VecDeque<Waiter>>, _why: &str) {
    for (_, w) in pending.borrow_mut().drain(..) {
        let _ = w.send(Err(ClientError::ConnectionLost));
    }
}

/// The error code a broker put in a response, as a client error.
pub fn broker_error(code: ErrorCode, what: impl Into<String>) -> Result<(), ClientError> {
    if code == ErrorCode::NONE {
        Ok(())
    } else {
        Err(ClientError::Broker(code, what.into()))
    }
}
