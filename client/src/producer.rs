//! The producer: per-partition batching, key-hash and sticky partitioning, bounded in-flight
//! requests, retries that never reorder a partition, and one future per record.
//!
//! `send` puts the record into its partition's open batch and returns a [`Delivery`]. A batch
//! is sealed when it reaches `batch_bytes_max` or has waited `linger`. A background task sends
//! sealed batches to their partition's **leader** (from the client's metadata cache): the
//! ready partitions are grouped by leader and each leader gets its own Produce requests,
//! several partitions per request, at most `max_in_flight` requests per leader and at most
//! `max_in_flight_per_partition` per partition (one without idempotence). Each batch's response
//! resolves its records' futures with `(partition, offset)`.
//!
//! Order per partition with several requests in flight (Kafka's idempotent pipelining): a
//! partition's requests all go to one broker, in sequence order, so they are appended in that
//! order. If one fails, the partition stops sending (a barrier) until every request of it has
//! come back; the failed batches (including later ones the broker refused as out of order,
//! because an earlier one was missing) are then put back at the front of its queue in sequence
//! order and sent again, a retried batch alone and with nothing else of its partition in
//! flight. The broker's sequence check appends a batch only after its predecessor, and answers
//! a retried batch that is already in the log with its first offset, so order holds and
//! nothing is written twice.
//!
//! Failover: NOT_LEADER, FENCED_LEADER_EPOCH, UNKNOWN_TOPIC_OR_PARTITION, REQUEST_TIMED_OUT,
//! NOT_ENOUGH_REPLICAS, SHUTTING_DOWN, a lost connection, an IO error, or **no answer within
//! `response_timeout`** (the connection is then dropped, so nothing else queues behind it)
//! mark the topic's metadata stale; after `retry_backoff` (20 ms) the metadata is refreshed
//! and the batches go to whichever broker leads now. Retries are bounded by `retries` and by
//! `delivery_timeout` (30 s from the batch's first record), whichever ends first. Partitions
//! with no known leader wait for a refresh (one at a time) and are charged an attempt per
//! refresh that finds none.
//!
//! Idempotence (on by default): the producer gets a producer id (InitProducerId) before its
//! first record and stamps each batch with it and the per-partition sequence of its first
//! record; the broker appends a retried batch only once, so a retry after a lost response, a
//! timeout or a broker restart cannot duplicate a record. A batch that finally fails leaves a
//! gap in the sequence, so the producer then starts over with a new producer id.
//!
//! Sessions: with `ProducerConfig::session`, each acknowledged batch raises its partition's
//! session token to the batch's end offset and the answering leader's epoch, before its
//! records' futures resolve, so a consumer sharing the session reads its writes.
//!
//! Transactions (`txn.rs` drives this through a [`TxnGate`]): the producer identity comes
//! from the transaction coordinator (never from InitProducerId here) and changes with every
//! transaction, sequences restart at 0 with it, and batches are marked transactional. A
//! partition's batches are sent only once the partition has joined the ongoing transaction
//! (AddPartitionsToTxn, asked for as soon as a record is queued to it, all partitions wanted
//! meanwhile in one request); once a record of the transaction failed, or while it is being
//! aborted, batches not sent yet fail instead of going out, and a failure never takes a new
//! producer id (the transaction must be aborted, which gives a new epoch).

use crate::partitioning::{by_from, open_ranges, KeyRange, Partitioning};
use crate::wire::TopicMetadata;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::future::{select, Either};
use skein_log::batch::{Attributes, BatchBuilder, RecordBatch};
use skein_log::types::{ProducerEpoch, ProducerId, Sequence, Timestamp};

use crate::wire::{produce_frame, ApiKey, ErrorCode, ProduceResponse};
use crate::{group_by_leader, Client, ClientError, SessionHandle};

/// How much durability a produce waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// On disk (fdatasync) on every in-sync replica.
    All,
    /// Written to the leader's log (synced by its flush policy).
    Leader,
    /// No response; offsets are unknown (`u64::MAX`).
    None,
}

impl std::str::FromStr for Acks {
    type Err = String;
    /// `all`, `leader` or `none`, as the CLIs spell them.
    fn from_str(s: &str) -> Result<Acks, String> {
        match s {
            "all" => Ok(Acks::All),
            "leader" => Ok(Acks::Leader),
            "none" => Ok(Acks::None),
            _ => Err(format!("acks is all, leader or none, not '{s}'")),
        }
    }
}

impl Acks {
    fn wire(self) -> i8 {
        match self {
            Acks::All => -1,
            Acks::Leader => 1,
            Acks::None => 0,
        }
    }
}

/// Producer settings.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Durability to wait for.
    pub acks: Acks,
    /// Seal a batch at this size.
    pub batch_bytes_max: usize,
    /// Seal a batch after it waited this long.
    pub linger: Duration,
    /// Produce requests in flight at once to one broker.
    pub max_in_flight: usize,
    /// Produce requests in flight at once with batches of one partition (Kafka's
    /// `max.in.flight.requests.per.connection`, 5): a batch need not wait for the answer to the
    /// one before it. Used only with `idempotence` (the broker's sequence check keeps the
    /// order); without it one request per partition is in flight.
    pub max_in_flight_per_partition: usize,
    /// Attempts after the first for a retriable failure (see also `delivery_timeout`).
    pub retries: u32,
    /// Pause before a retry (the metadata refresh follows it).
    pub retry_backoff: Duration,
    /// A batch is failed once this long has passed since its first record was queued, even
    /// with retries left (Kafka's `delivery.timeout.ms`); it is checked when an attempt
    /// fails, so a batch can take up to one `response_timeout` longer.
    pub delivery_timeout: Duration,
    /// `send` waits while this many bytes are buffered.
    pub buffer_bytes_max: usize,
    /// The broker's timeout for acks=all (the request's `timeout_ms`): how long it may wait
    /// for durability before answering REQUEST_TIMED_OUT. Keep it below `response_timeout`.
    pub request_timeout_ms: u32,
    /// A Produce request not answered within this bound is treated as lost: its connection
    /// is dropped (later requests would queue behind it), the metadata refreshed and the
    /// batches retried. With acks=all the bound used is at least `request_timeout_ms` plus
    /// 500 ms, so a broker legitimately waiting for durability is never given up on.
    pub response_timeout: Duration,
    /// Idempotence (Kafka's default since 3.0): the producer gets a producer id from the
    /// broker and numbers its records per partition; the broker appends a retried batch only
    /// once and answers a duplicate with the offset it was first written at, so retries
    /// (after a timeout, a lost connection or a broker restart) never duplicate a record.
    pub idempotence: bool,
    /// A session to note acknowledged writes in (read-your-writes): every acknowledged batch
    /// raises its partition's token to the batch's end offset and the leader's epoch, so a
    /// consumer carrying the same session reads at least up to it. Not noted with
    /// `Acks::None` (no offsets are known).
    pub session: Option<SessionHandle>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            batch_bytes_max: 64 * 1024,
            linger: Duration::from_millis(5),
            max_in_flight: 5,
            max_in_flight_per_partition: 5,
            retries: 1_000,
            retry_backoff: Duration::from_millis(20),
            delivery_timeout: Duration::from_secs(30),
            buffer_bytes_max: 64 << 20,
            request_timeout_ms: 1_000,
            response_timeout: Duration::from_millis(1_500),
            idempotence: true,
            session: None,
        }
    }
}

/// The outcome of one record: its `(partition, offset)`, or why it failed.
pub type DeliveryResult = Result<(u32, u64), ClientError>;

/// Who learns a record's outcome: a [`Delivery`] future, a callback, or the producer's
/// delivery handler with the record's tag.
enum Reply {
    Future(oneshot::Sender<DeliveryResult>),
    Callback(Box<dyn FnOnce(DeliveryResult)>),
    Tagged(u64),
}

/// The function [`Producer::send_tagged`] records report to (see [`Producer::on_delivery`]).
type DeliveryHandler = Rc<dyn Fn(&[u64], DeliveryResult)>;

/// The function told of retries (see [`Producer::on_retry`]).
type RetryHandler = Rc<dyn Fn(&Retry<'_>)>;

/// A partition's batches failed an attempt and will be sent again (or wait for a leader).
#[derive(Debug)]
pub struct Retry<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: u32,
    /// The attempt that failed, counting the first as 1 (of the oldest batch retried).
    pub attempt: u32,
    /// Why it failed.
    pub error: &'a ClientError,
}

/// Reports the outcome of `replies` (records `offset`, `offset + 1`, ... of `partition` on
/// success, or all failed with `error`): futures and callbacks one by one, and each run of
/// consecutive tagged records with one call of the delivery handler. `u64::MAX` offsets
/// (acks=none: unknown) stay `u64::MAX`.
fn complete_all(
    p: &Inner,
    replies: impl IntoIterator<Item = Reply>,
    partition: u32,
    mut offset: u64,
    error: Option<&ClientError>,
) {
    let handler = p.handler.borrow().clone();
    let mut tags = std::mem::take(&mut *p.tag_scratch.borrow_mut());
    let mut run_start = offset;
    let report = |tags: &mut Vec<u64>, first: u64| {
        if let (Some(h), false) = (handler.as_ref(), tags.is_empty()) {
            h(tags, error.map_or(Ok((partition, first)), |e| Err(e.clone())));
        }
        tags.clear();
    };
    for reply in replies {
        match reply {
            Reply::Tagged(tag) => {
                if tags.is_empty() {
                    run_start = offset;
                }
                tags.push(tag);
            }
            Reply::Future(tx) => {
                report(&mut tags, run_start);
                let _ = tx.send(error.map_or(Ok((partition, offset)), |e| Err(e.clone())));
            }
            Reply::Callback(f) => {
                report(&mut tags, run_start);
                f(error.map_or(Ok((partition, offset)), |e| Err(e.clone())));
            }
        }
        offset = offset.saturating_add(1);
    }
    report(&mut tags, run_start);
    *p.tag_scratch.borrow_mut() = tags;
}

/// A record to send with [`Producer::send_tagged`] or [`Producer::try_send_tagged`]: where it
/// goes and what it holds (Kafka's `ProducerRecord`).
#[derive(Clone, Copy, Debug)]
pub struct ProducerRecord<'a> {
    /// The topic.
    pub topic: &'a str,
    /// This partition if `Some`; else `hash(key) % partitions` for a keyed record, and the
    /// sticky partition for others.
    pub partition: Option<u32>,
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The value.
    pub value: &'a [u8],
    /// The create time; the time of the send if `None`.
    pub timestamp: Option<Timestamp>,
}

impl<'a> ProducerRecord<'a> {
    /// A keyless record with no partition or time given.
    pub fn new(topic: &'a str, value: &'a [u8]) -> ProducerRecord<'a> {
        ProducerRecord { topic, partition: None, key: None, value, timestamp: None }
    }
}

/// What [`Producer::try_send_tagged`] did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrySend {
    /// Added to its partition's open batch.
    Queued,
    /// Added, and it filled its batch, which is now ready: yield to the runtime soon, so the
    /// producer's sender task can send it.
    Sealed,
    /// Not queued: the producer must first wait (for its producer id, the topic's partition
    /// count or buffer space). Send it with [`Producer::send_tagged`], which waits.
    WouldBlock,
}

/// Why a record could not be queued without waiting.
enum Need {
    ProducerId,
    PartitionCount,
    BufferSpace,
}

/// The outcome of one attempt to queue a record.
enum Step {
    Queued { sealed: bool, partition: u32 },
    Wait(Reply, Need),
}

/// Resolves to the record's `(partition, offset)` once acknowledged.
pub struct Delivery {
    rx: oneshot::Receiver<DeliveryResult>,
    partition: u32,
}

impl Delivery {
    /// The partition the record was queued to (known before the outcome: also the one a
    /// failure is about).
    pub fn partition(&self) -> u32 {
        self.partition
    }
}

impl Future for Delivery {
    type Output = DeliveryResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(ClientError::ConnectionLost)))
    }
}

/// A producer; clones share batches and the connection.
#[derive(Clone)]
pub struct Producer {
    inner: Rc<Inner>,
}

struct Inner {
    client: Client,
    config: ProducerConfig,
    state: RefCell<State>,
    wake: flume::Sender<()>,
    handler: RefCell<Option<DeliveryHandler>>,
    /// Told of every retry (see [`Producer::on_retry`]).
    retry_handler: RefCell<Option<RetryHandler>>,
    /// Reused buffer for the tags of one delivery-handler call.
    tag_scratch: RefCell<Vec<u64>>,
}

type Key = (String, u32);

#[derive(Default)]
struct State {
    /// Per topic: partition count, sticky partition, open batches and sequences, so a record
    /// costs one map lookup.
    topics: HashMap<String, TopicState>,
    ready: HashMap<Key, VecDeque<Sealed>>,
    /// Partitions whose leader is being looked up (`route`): nothing of theirs is sent.
    busy: HashSet<Key>,
    /// Partitions with requests in flight, or failed batches waiting to be put back.
    flights: HashMap<Key, Flight>,
    /// Numbers batches in the order they are sealed (sequence order within a partition).
    sealed_count: u64,
    /// Per partition, the broker that last acknowledged a batch of it and the producer id of
    /// that batch. Requests are pipelined only to that broker under that id: a broker that
    /// does not know the producer yet takes its first batch at any sequence, so a refused
    /// first request followed by an accepted second one would land out of order.
    confirmed: HashMap<Key, (u32, i64)>,
    /// Produce requests awaiting an answer, per broker node id.
    in_flight: HashMap<u32, usize>,
    /// A task is refreshing metadata for partitions with no known leader.
    routing: bool,
    buffered_bytes: usize,
    /// Sends waiting for `buffered_bytes` to drop to `buffer_bytes_max` (woken by `settle`).
    space_waiters: Vec<Waker>,
    unresolved: usize,
    /// The idempotent producer identity, once the broker gave one.
    producer: Option<(i64, i16)>,
    /// A transactional producer's gate (`txn.rs`); `None` for others.
    txn: Option<TxnGate>,
}

/// Adds partitions to the ongoing transaction of producer identity `(id, epoch)`
/// (AddPartitionsToTxn, retried): each partition's outcome.
pub(crate) type AddPartitions =
    Rc<dyn Fn(Vec<(String, u32)>, (i64, i16)) -> Pin<Box<dyn Future<Output = Vec<AddOutcome>>>>>;

/// One partition's outcome of an [`AddPartitions`] call.
pub(crate) type AddOutcome = ((String, u32), Result<(), ClientError>);

/// A transactional producer's hold on its batches: a partition's batches are sent only once
/// it joined the ongoing transaction; after a failure, or while aborting, nothing more is
/// sent.
struct TxnGate {
    add: AddPartitions,
    /// Counts identities (one per transaction): an add answered for an earlier one is ignored.
    generation: u64,
    /// Partitions in the ongoing transaction: their batches may be sent.
    added: HashSet<Key>,
    /// Partitions records were queued to that have not been asked for yet.
    wanted: Vec<Key>,
    /// An AddPartitionsToTxn is in flight (one at a time).
    adding: bool,
    /// The first failure of the transaction's records or partitions: it cannot commit.
    failed: Option<ClientError>,
    /// The transaction is being aborted: batches not sent yet fail.
    aborting: bool,
}

#[derive(Default)]
struct TopicState {
    /// The partition count, once learned (forgotten after UNKNOWN_TOPIC_OR_PARTITION).
    partitions: Option<u32>,
    /// A ranged topic's open partitions by range (issue 21), as learned with the count and
    /// changed only where a partition turned out sealed (`reroute`); `None`: a hash topic.
    routes: Option<Routes>,
    /// Where keyless records go (sticky partitioning): moves on when its batch is sealed.
    sticky: u32,
    /// The open batch of each partition, by partition index.
    open: Vec<Option<Open>>,
    /// Next sequence per partition, by partition index (idempotence; 0 when absent).
    sequences: Vec<i32>,
    /// By partition index: asked to join the ongoing transaction (transactional producers).
    joined: Vec<bool>,
}

/// A ranged topic's routing table: open partitions by range, sorted, covering every point.
struct Routes {
    scheme: Partitioning,
    parts: Vec<(KeyRange, u32)>,
}

impl Routes {
    /// The routing table of a topic's metadata: its open partitions (`None`: a hash topic).
    fn of(t: &TopicMetadata) -> Option<Routes> {
        let scheme = Partitioning::from_wire(t.partitioning).filter(|s| s.ranged())?;
        Some(Routes { scheme, parts: open_ranges(t) })
    }

    /// The partition owning `key`'s point.
    fn route(&self, key: &[u8]) -> u32 {
        crate::partitioning::route(self.scheme, &self.parts, key)
    }

    /// Replaces the entries of sealed `partition` with the open partitions of `fresh` that
    /// cover its range (each cut to it); other entries stay, so keys of partitions not yet
    /// known to be sealed keep going where their earlier records went.
    fn replace(&mut self, partition: u32, fresh: &[(KeyRange, u32)]) {
        let mut parts = Vec::with_capacity(self.parts.len() + fresh.len());
        for (range, p) in self.parts.drain(..) {
            if p != partition {
                parts.push((range, p));
                continue;
            }
            for (f, child) in fresh.iter().filter(|(_, c)| *c != partition) {
                if let Some(cut) = intersect(&range, f) {
                    parts.push((cut, *child));
                }
            }
        }
        parts.sort_by(|a, b| by_from(&a.0, &b.0));
        self.parts = parts;
    }
}

/// The overlap of two ranges, if any.
fn intersect(a: &KeyRange, b: &KeyRange) -> Option<KeyRange> {
    let from = a.from.clone().max(b.from.clone());
    let to = match (&a.to, &b.to) {
        (None, t) | (t, None) => t.clone(),
        (Some(x), Some(y)) => Some(x.clone().min(y.clone())),
    };
    to.as_ref().is_none_or(|t| *t > from).then_some(KeyRange { from, to })
}

impl State {
    /// Forgets every sequence (a new producer id starts each partition at 0).
    fn reset_sequences(&mut self) {
        self.topics.values_mut().for_each(|t| t.sequences.clear());
    }

    /// The batches no longer to be sent because the transaction failed or is being aborted
    /// (with the error to fail them with), taken out of their queues.
    fn take_doomed(&mut self) -> Vec<(Key, Vec<Sealed>, ClientError)> {
        let Some(gate) = self.txn.as_ref() else {
            return Vec::new();
        };
        let error = match (&gate.failed, gate.aborting) {
            (_, true) => ClientError::Invalid("the transaction was aborted before this record was sent".into()),
            (Some(e), false) => e.clone(),
            (None, false) => return Vec::new(),
        };
        let keys: Vec<Key> = self.ready.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| k.clone()).collect();
        keys.into_iter()
            .filter_map(|k| {
                let batches: Vec<Sealed> = self.ready.remove(&k)?.into();
                Some((k, batches, error.clone()))
            })
            .collect()
    }

    /// The partitions with an open batch, and when each was opened.
    fn open_batches(&self) -> impl Iterator<Item = (&str, u32, Instant)> {
        self.topics.iter().flat_map(|(t, ts)| {
            ts.open.iter().enumerate().filter_map(move |(p, o)| o.as_ref().map(|o| (t.as_str(), p as u32, o.since)))
        })
    }
}

struct Open {
    builder: BatchBuilder,
    bytes: usize,
    replies: Vec<Reply>,
    since: Instant,
}

/// A partition's requests in flight.
struct Flight {
    /// Requests with batches of this partition awaiting an answer.
    requests: usize,
    /// The broker they went to: later ones go only there, so they arrive in order.
    node: u32,
    /// Batches whose attempt failed retriably, waiting for the partition's other requests to
    /// come back before they are put back in order (the barrier).
    failed: Vec<Sealed>,
    /// The first of those failures, for the retry report and the metadata refresh.
    error: Option<ClientError>,
}

struct Sealed {
    /// Sealing order (see `State::sealed_count`).
    order: u64,
    /// The producer id it was sealed under (idempotence).
    producer: Option<i64>,
    bytes: Bytes,
    replies: Vec<Reply>,
    attempts: u32,
    /// When its first record was queued (for `delivery_timeout`).
    created: Instant,
    /// What these records added to `buffered_bytes`.
    accounted: usize,
}

impl Producer {
    /// A producer on `client`'s connection; starts its sender task.
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let (wake, woken) = flume::bounded(1);
        let inner = Rc::new(Inner {
            client,
            config,
            state: RefCell::new(State::default()),
            wake,
            handler: RefCell::new(None),
            retry_handler: RefCell::new(None),
            tag_scratch: RefCell::new(Vec::new()),
        });
        compio::runtime::spawn(sender_loop(Rc::downgrade(&inner), woken)).detach();
        Producer { inner }
    }

    /// Queues a record; the returned future resolves when it is acknowledged. Records with a
    /// key go to `hash(key) % partitions`; others stick to one partition per batch.
    pub async fn send(&self, topic: &str, key: Option<&[u8]>, value: &[u8]) -> Result<Delivery, ClientError> {
        self.send_to(topic, None, key, value).await
    }

    /// Like [`Producer::send`], to an explicit partition when `partition` is `Some`.
    pub async fn send_to(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery, ClientError> {
        let (tx, rx) = oneshot::channel();
        let record = ProducerRecord { topic, partition, key, value, timestamp: None };
        let partition = self.enqueue(record, Reply::Future(tx)).await?;
        Ok(Delivery { rx, partition })
    }

    /// Like [`Producer::send_to`], but calls `on_done` with the outcome instead of returning a
    /// future: cheaper per record (one allocation instead of a channel and a task) for callers
    /// that send millions. `on_done` runs on the producer's task; it must not block.
    pub async fn send_with(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: &[u8],
        on_done: impl FnOnce(DeliveryResult) + 'static,
    ) -> Result<(), ClientError> {
        let record = ProducerRecord { topic, partition, key, value, timestamp: None };
        self.enqueue(record, Reply::Callback(Box::new(on_done))).await.map(drop)
    }

    /// Sets the function that learns the outcome of records sent with [`Producer::send_tagged`]
    /// or [`Producer::try_send_tagged`]; replaces any earlier one. It is called once per run of
    /// such records that share an outcome (usually a whole batch): with their tags, in send
    /// order, and `(partition, offset of the first)`, the others following at consecutive
    /// offsets (`u64::MAX`, unknown, with acks=none), or the error. It runs on the producer's
    /// task and must not block.
    pub fn on_delivery(&self, handler: impl Fn(&[u64], DeliveryResult) + 'static) {
        *self.inner.handler.borrow_mut() = Some(Rc::new(handler));
    }

    /// Sets the function told of every retry: a partition's request failed with a retriable
    /// error (or no leader was found for it) and its batches will be tried again after
    /// `retry_backoff`. For progress reports (the CLI prints them, rate-limited); it runs on
    /// the producer's task and must not block. Replaces any earlier one.
    pub fn on_retry(&self, handler: impl Fn(&Retry<'_>) + 'static) {
        *self.inner.retry_handler.borrow_mut() = Some(Rc::new(handler));
    }

    /// Like [`Producer::send_with`], but the outcome goes to the [`Producer::on_delivery`]
    /// handler with `tag`: nothing is allocated per record. Fails with `Invalid` if no handler
    /// is set.
    pub async fn send_tagged(&self, record: ProducerRecord<'_>, tag: u64) -> Result<(), ClientError> {
        self.check_handler()?;
        self.enqueue(record, Reply::Tagged(tag)).await.map(drop)
    }

    /// [`Producer::send_tagged`] without waiting: queues the record if that needs no wait,
    /// else answers [`TrySend::WouldBlock`] and the caller sends it with `send_tagged`. It is
    /// the cheapest way to send (no future per record); a caller looping over it must yield
    /// to the runtime after a [`TrySend::Sealed`], so the sender task can send the batch.
    pub fn try_send_tagged(&self, record: ProducerRecord<'_>, tag: u64) -> Result<TrySend, ClientError> {
        self.check_handler()?;
        Ok(match self.try_enqueue(record, Reply::Tagged(tag))? {
            Step::Queued { sealed: false, .. } => TrySend::Queued,
            Step::Queued { sealed: true, .. } => TrySend::Sealed,
            Step::Wait(..) => TrySend::WouldBlock,
        })
    }

    fn check_handler(&self) -> Result<(), ClientError> {
        match *self.inner.handler.borrow() {
            Some(_) => Ok(()),
            None => Err(ClientError::Invalid("send_tagged needs a delivery handler (on_delivery)".into())),
        }
    }

    /// Queues a record, first waiting for whatever it needs (producer id, partition count,
    /// buffer space); returns the partition it was queued to.
    async fn enqueue(&self, record: ProducerRecord<'_>, mut reply: Reply) -> Result<u32, ClientError> {
        let topic = record.topic;
        loop {
            match self.try_enqueue(record, reply)? {
                Step::Queued { sealed, partition } => {
                    if sealed {
                        // Let the sender task take the sealed batch before more records are queued.
                        yield_now().await;
                    }
                    return Ok(partition);
                }
                Step::Wait(r, need) => {
                    reply = r;
                    match need {
                        Need::ProducerId => {
                            if self.inner.state.borrow().txn.is_some() {
                                // Its identity comes from the transaction coordinator only.
                                return Err(ClientError::Invalid("no transaction started".into()));
                            }
                            let id = self.inner.client.init_producer_id().await?;
                            let mut st = self.inner.state.borrow_mut();
                            if st.producer.is_none() {
                                st.producer = Some(id);
                                st.reset_sequences();
                            }
                        }
                        Need::PartitionCount => {
                            let t = self.inner.client.topic_metadata(topic).await?;
                            let n = t.partitions.len() as u32;
                            let routes = Routes::of(&t);
                            if n == 0 || routes.as_ref().is_some_and(|r| r.parts.is_empty()) {
                                return Err(ClientError::Invalid(format!("topic {topic} has no open partitions")));
                            }
                            let mut st = self.inner.state.borrow_mut();
                            let ts = st.topics.entry(topic.to_owned()).or_default();
                            if ts.partitions.is_none() {
                                ts.partitions = Some(n);
                                // Routes learned before stay: they change only where a
                                // partition was refused as sealed (`reroute`), after its
                                // requests came back, or a key's newer records could pass
                                // its older ones.
                                if ts.routes.is_none() {
                                    ts.routes = routes;
                                }
                            }
                        }
                        Need::BufferSpace => {
                            let _ = self.inner.wake.try_send(());
                            let max = self.inner.config.buffer_bytes_max;
                            std::future::poll_fn(|cx| {
                                let mut st = self.inner.state.borrow_mut();
                                if st.buffered_bytes <= max {
                                    return Poll::Ready(());
                                }
                                if !st.space_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                                    st.space_waiters.push(cx.waker().clone());
                                }
                                Poll::Pending
                            })
                            .await;
                        }
                    }
                }
            }
        }
    }

    /// Queues a record into its partition's open batch if nothing must be waited for first:
    /// one map lookup and one copy of the record's bytes.
    fn try_enqueue(&self, record: ProducerRecord<'_>, reply: Reply) -> Result<Step, ClientError> {
        let ProducerRecord { topic, partition, key, value, timestamp } = record;
        let config = &self.inner.config;
        let mut guard = self.inner.state.borrow_mut();
        let st = &mut *guard;
        if config.idempotence && st.producer.is_none() {
            return Ok(Step::Wait(reply, Need::ProducerId));
        }
        let Some(ts) = st.topics.get_mut(topic) else {
            return Ok(Step::Wait(reply, Need::PartitionCount));
        };
        let Some(count) = ts.partitions else {
            return Ok(Step::Wait(reply, Need::PartitionCount));
        };
        let partition = match (partition, key, &ts.routes) {
            (Some(p), _, _) if p < count => p,
            (Some(p), _, _) => return Err(ClientError::Invalid(format!("{topic} has {count} partitions, not {p}"))),
            (None, Some(k), None) => key_partition(k, count),
            (None, None, None) => ts.sticky % count,
            (None, Some(k), Some(routes)) => routes.route(k),
            (None, None, Some(routes)) => routes.parts[ts.sticky as usize % routes.parts.len()].1,
        };
        if st.buffered_bytes > config.buffer_bytes_max {
            return Ok(Step::Wait(reply, Need::BufferSpace));
        }
        let full = enqueue_at(st, config, &self.inner.wake, topic, partition, key, value, timestamp, reply);
        Ok(Step::Queued { sealed: full, partition })
    }

    /// A transactional producer (`txn.rs`): batches marked transactional, sent only to
    /// partitions `add` has added to the ongoing transaction; no identity until
    /// [`Producer::start_transaction`] gives one.
    pub(crate) fn transactional(client: Client, mut config: ProducerConfig, add: AddPartitions) -> Producer {
        config.idempotence = true;
        config.acks = Acks::All;
        let producer = Producer::new(client, config);
        producer.inner.state.borrow_mut().txn = Some(TxnGate {
            add,
            generation: 0,
            added: HashSet::new(),
            wanted: Vec::new(),
            adding: false,
            failed: None,
            aborting: false,
        });
        producer
    }

    /// Starts a transaction under `identity` (producer id, epoch): sequences restart at 0, no
    /// partition is in it yet, nothing has failed. Every record of the previous transaction
    /// must be resolved (after [`Producer::flush`]).
    pub(crate) fn start_transaction(&self, identity: (i64, i16)) -> Result<(), ClientError> {
        let mut st = self.inner.state.borrow_mut();
        if st.unresolved > 0 {
            return Err(ClientError::Invalid(format!(
                "{} records of the previous transaction are not resolved",
                st.unresolved
            )));
        }
        st.producer = Some(identity);
        st.reset_sequences();
        st.topics.values_mut().for_each(|t| t.joined.clear());
        let gate = st.txn.as_mut().ok_or_else(|| ClientError::Invalid("not a transactional producer".into()))?;
        gate.generation += 1;
        gate.added.clear();
        gate.wanted.clear();
        gate.adding = false;
        gate.failed = None;
        gate.aborting = false;
        Ok(())
    }

    /// The first failure of the ongoing transaction's records (it cannot commit), if any.
    pub(crate) fn transaction_failure(&self) -> Option<ClientError> {
        self.inner.state.borrow().txn.as_ref().and_then(|g| g.failed.clone())
    }

    /// Fails the ongoing transaction with `e` (the offsets of a transaction failed): it
    /// cannot commit, and nothing more of it is sent.
    pub(crate) fn fail_transaction(&self, e: ClientError) {
        if let Some(gate) = self.inner.state.borrow_mut().txn.as_mut() {
            gate.failed.get_or_insert(e);
        }
        let _ = self.inner.wake.try_send(());
    }

    /// The partitions in the ongoing transaction so far.
    pub(crate) fn transaction_partitions(&self) -> Vec<(String, u32)> {
        let st = self.inner.state.borrow();
        let mut out: Vec<(String, u32)> =
            st.txn.as_ref().map(|g| g.added.iter().cloned().collect()).unwrap_or_default();
        out.sort();
        out
    }

    /// Aborting: records not sent yet fail at once (requests in flight are still answered);
    /// [`Producer::flush`] then waits for those.
    pub(crate) fn abort_unsent(&self) {
        let mut st = self.inner.state.borrow_mut();
        if let Some(gate) = st.txn.as_mut() {
            gate.aborting = true;
        }
        let open: Vec<(String, u32)> = st.open_batches().map(|(t, p, _)| (t.to_owned(), p)).collect();
        for (t, p) in open {
            seal(&mut st, &t, p);
        }
        drop(st);
        let _ = self.inner.wake.try_send(());
    }

    /// Sends everything buffered and waits until every record so far is resolved.
    pub async fn flush(&self) {
        {
            let mut st = self.inner.state.borrow_mut();
            let open: Vec<(String, u32)> = st.open_batches().map(|(t, p, _)| (t.to_owned(), p)).collect();
            for (t, p) in open {
                seal(&mut st, &t, p);
            }
        }
        while self.inner.state.borrow().unresolved > 0 {
            let _ = self.inner.wake.try_send(());
            compio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

/// The partition of a key: FNV-1a (32-bit) of its bytes, modulo the partition count. Stable
/// across processes and versions, so every producer sends a key to the same partition.
///
/// ```
/// use skein_client::key_partition;
/// let p = key_partition(b"user-42", 8);
/// assert!(p < 8);
/// assert_eq!(p, key_partition(b"user-42", 8));
/// assert_eq!(key_partition(b"", 8), 0x811c_9dc5 % 8);
/// ```
pub fn key_partition(key: &[u8], partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in key {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// Queues a record into `partition`'s open batch (opening it, and asking for the partition
/// to join the ongoing transaction, first if needed) and accounts for it; seals the batch if
/// it is full, returning whether it did.
#[allow(clippy::too_many_arguments)]
fn enqueue_at(
    st: &mut State,
    config: &ProducerConfig,
    wake: &flume::Sender<()>,
    topic: &str,
    partition: u32,
    key: Option<&[u8]>,
    value: &[u8],
    timestamp: Option<Timestamp>,
    reply: Reply,
) -> bool {
    let ts = st.topics.get_mut(topic).expect("the caller found the topic");
    let size = value.len() + key.map_or(0, <[u8]>::len) + RECORD_OVERHEAD_BYTES;
    let index = partition as usize;
    let transactional = st.txn.is_some();
    if let Some(gate) = st.txn.as_mut() {
        // The partition joins the transaction before its first batch may go: asked for at
        // once, so the add overlaps the batch's linger.
        if !ts.joined.get(index).copied().unwrap_or(false) {
            if ts.joined.len() <= index {
                ts.joined.resize(index + 1, false);
            }
            ts.joined[index] = true;
            gate.wanted.push((topic.to_owned(), partition));
            let _ = wake.try_send(());
        }
    }
    if ts.open.len() <= index {
        ts.open.resize_with(index + 1, || None);
    }
    let open = ts.open[index].get_or_insert_with(|| {
        // Sized once: the batch is sealed as soon as it reaches batch_bytes_max.
        let bytes = config.batch_bytes_max.saturating_add(size).min(1 << 20);
        let records = (bytes / size).saturating_add(1);
        let builder = BatchBuilder::with_capacities(bytes, records);
        let builder = match st.producer {
            Some((id, epoch)) => {
                let seq = ts.sequences.get(index).copied().unwrap_or(0);
                builder.producer(ProducerId(id), ProducerEpoch(epoch), Sequence(seq))
            }
            None => builder,
        };
        let builder = match transactional {
            true => builder.attributes(Attributes::default().with_transactional(true)),
            false => builder,
        };
        Open { builder, bytes: 0, replies: Vec::with_capacity(records), since: Instant::now() }
    });
    open.builder.push(key, value, &[], timestamp.unwrap_or_else(now));
    open.bytes += size;
    open.replies.push(reply);
    let full = open.bytes >= config.batch_bytes_max;
    st.buffered_bytes += size;
    st.unresolved += 1;
    if full {
        seal(st, topic, partition);
        let _ = wake.try_send(());
    }
    full
}

/// Moves a partition's open batch to its ready queue; keyless records move to the next
/// partition (sticky partitioning).
fn seal(st: &mut State, topic: &str, partition: u32) {
    let Some(ts) = st.topics.get_mut(topic) else {
        return;
    };
    let index = partition as usize;
    let Some(open) = ts.open.get_mut(index).and_then(Option::take) else {
        return;
    };
    if st.producer.is_some() {
        // The next batch of this partition continues the sequence (one open batch per
        // partition, sealed in order).
        let records = i32::try_from(open.builder.len()).unwrap_or(i32::MAX);
        if ts.sequences.len() <= index {
            ts.sequences.resize(index + 1, 0);
        }
        ts.sequences[index] = ts.sequences[index].wrapping_add(records);
    }
    match (&ts.routes, ts.partitions) {
        // A ranged topic's sticky is an index into its open partitions.
        (Some(r), _) if r.parts.get(ts.sticky as usize % r.parts.len().max(1)).is_some_and(|e| e.1 == partition) => {
            ts.sticky = ts.sticky.wrapping_add(1);
        }
        (None, Some(n)) if ts.sticky == partition => ts.sticky = (partition + 1) % n.max(1),
        _ => {}
    }
    let batch = open.builder.build();
    st.sealed_count += 1;
    let sealed = Sealed {
        order: st.sealed_count,
        producer: st.producer.map(|(id, _)| id),
        bytes: Bytes::from(batch.into_bytes()),
        replies: open.replies,
        attempts: 0,
        created: open.since,
        accounted: open.bytes,
    };
    st.ready.entry((topic.to_owned(), partition)).or_default().push_back(sealed);
}

/// The background task: seals lingering batches and sends ready ones.
async fn sender_loop(inner: std::rc::Weak<Inner>, woken: flume::Receiver<()>) {
    loop {
        let Some(p) = inner.upgrade() else {
            return;
        };
        let next_deadline = seal_lingering(&p);
        dispatch(&p);
        let linger = p.config.linger;
        drop(p);
        let wait = next_deadline.map_or(linger, |d| d.saturating_duration_since(Instant::now()));
        let woke = woken.recv_async();
        let nap = compio::time::sleep(wait.max(Duration::from_micros(100)));
        if let Either::Left((Err(_), _)) = select(Box::pin(woke), Box::pin(nap)).await {
            return; // every producer handle is gone
        }
    }
}

/// Seals batches older than `linger`; returns when the next one will be due.
fn seal_lingering(p: &Inner) -> Option<Instant> {
    let mut st = p.state.borrow_mut();
    let now = Instant::now();
    let due: Vec<(String, u32)> = st
        .open_batches()
        .filter(|(_, _, since)| now >= *since + p.config.linger)
        .map(|(t, p, _)| (t.to_owned(), p))
        .collect();
    for (t, partition) in due {
        seal(&mut st, &t, partition);
    }
    st.open_batches().map(|(_, _, since)| since + p.config.linger).min()
}

/// Sends requests while there is room: the ready batches of partitions that may send
/// (not being routed; with requests in flight, only first attempts behind requests that have
/// not failed, up to the partition's limit), grouped by their leader, one request (of up to
/// `REQUEST_BYTES_MAX`) per leader at a time while that leader has fewer than `max_in_flight`
/// requests outstanding. Partitions with no known leader are handed to a routing task (one at a
/// time).
fn dispatch(p: &Rc<Inner>) {
    let doomed = p.state.borrow_mut().take_doomed();
    if !doomed.is_empty() {
        for (key, batches, e) in doomed {
            fail(p, &key, batches, &e);
        }
        return;
    }
    let mut st = p.state.borrow_mut();
    if let Some(gate) = st.txn.as_mut().filter(|g| !g.adding && !g.wanted.is_empty()) {
        gate.adding = true;
        let keys = std::mem::take(&mut gate.wanted);
        compio::runtime::spawn(add_to_transaction(p.clone(), keys)).detach();
    }
    let limit = if p.config.idempotence { p.config.max_in_flight_per_partition.max(1) } else { 1 };
    let ready: Vec<Key> = st
        .ready
        .iter()
        .filter(|(k, q)| {
            let Some(front) = q.front() else {
                return false;
            };
            !st.busy.contains(*k)
                && st.txn.as_ref().is_none_or(|g| g.added.contains(*k))
                && st.flights.get(*k).is_none_or(|f| {
                    let known = st.producer.is_some_and(|(id, _)| st.confirmed.get(*k) == Some(&(f.node, id)));
                    known && f.failed.is_empty() && f.error.is_none() && f.requests < limit && front.attempts == 0
                })
        })
        .map(|(k, _)| k.clone())
        .collect();
    if ready.is_empty() {
        return;
    }
    let grouped = group_by_leader(ready, |k| p.client.cached_leader(&k.0, k.1));
    // A partition with requests out learns its new leader from their answers.
    let unrouted: Vec<Key> = grouped.unrouted.into_iter().filter(|k| !st.flights.contains_key(k)).collect();
    if !unrouted.is_empty() && !st.routing {
        st.routing = true;
        st.busy.extend(unrouted.iter().cloned());
        compio::runtime::spawn(route(p.clone(), unrouted)).detach();
    }
    for (node, keys) in grouped.by_leader {
        // A partition's requests all go to one broker, so they arrive in sequence order.
        let keys: Vec<Key> = keys.into_iter().filter(|k| st.flights.get(k).is_none_or(|f| f.node == node)).collect();
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() && st.in_flight.get(&node).copied().unwrap_or(0) < p.config.max_in_flight {
            let parts = take_request(&mut st, node, &mut keys);
            *st.in_flight.entry(node).or_default() += 1;
            compio::runtime::spawn(send_request(p.clone(), node, parts)).detach();
        }
    }
}

/// One partition's share of a Produce request.
struct Part {
    key: Key,
    batches: Vec<Sealed>,
    /// Sent while an earlier request of the partition was unanswered: the broker may refuse it
    /// as out of order if that one never arrives, which is then retriable.
    behind: bool,
}

/// Takes the ready batches of `keys`, in order, until the request holds `REQUEST_BYTES_MAX`,
/// and counts the request in their partitions' flights (to `node`).
fn take_request(st: &mut State, node: u32, keys: &mut impl Iterator<Item = Key>) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut request_bytes = 0usize;
    while request_bytes < REQUEST_BYTES_MAX {
        let Some(k) = keys.next() else {
            break;
        };
        let q = st.ready.get_mut(&k).expect("key listed from the map");
        let mut batches: Vec<Sealed> = Vec::new();
        // A retried batch goes alone: it may already be in the log (its first answer was
        // lost), and the broker answers a duplicate with its original offset while appending
        // the batches after it at the log end; the response has one base offset per
        // partition, so only batches that are certainly appended back to back (first
        // attempts) may share a request. However many they are, they are appended back to
        // back, one run of this producer's sequences, which the broker remembers whole: after
        // a lost answer each of them, retried alone, is recognised as a duplicate
        // (PROTOCOL.md §3.6).
        while q.front().is_some_and(|b| batches.is_empty() || (b.attempts == 0 && batches[0].attempts == 0)) {
            let b = q.pop_front().expect("front checked");
            request_bytes += b.bytes.len();
            batches.push(b);
            if request_bytes >= REQUEST_BYTES_MAX {
                break;
            }
        }
        let flight = st.flights.entry(k.clone()).or_insert_with(|| Flight {
            requests: 0,
            node,
            failed: Vec::new(),
            error: None,
        });
        let behind = flight.requests > 0;
        flight.requests += 1;
        parts.push(Part { key: k, batches, behind });
    }
    parts
}

/// Adds partitions to the ongoing transaction (one call at a time); those added may send,
/// a failure fails the transaction. An answer for an earlier transaction is ignored.
async fn add_to_transaction(p: Rc<Inner>, keys: Vec<Key>) {
    let (add, generation, identity) = {
        let st = p.state.borrow();
        let gate = st.txn.as_ref().expect("only transactional producers add partitions");
        (gate.add.clone(), gate.generation, st.producer)
    };
    let outcomes = match identity {
        Some(identity) => add(keys, identity).await,
        None => keys.into_iter().map(|k| (k, Err(ClientError::Invalid("no transaction started".into())))).collect(),
    };
    // A partition sealed by a split or merge takes no transaction (its leader writes no
    // Begin): its queued records, none sent yet, go to the partitions now owning their keys,
    // which join the transaction in turn, as a non-transactional producer's do.
    let sealed = |r: &Result<(), ClientError>| matches!(r, Err(ClientError::Broker(ErrorCode::PARTITION_SEALED, _)));
    let topics = outcomes.iter().filter(|o| sealed(&o.1)).map(|((topic, _), _)| topic.as_str());
    let fresh = successors_metadata(&p, topics).await;
    let mut broken = Vec::new();
    {
        let mut st = p.state.borrow_mut();
        if st.txn.as_ref().is_none_or(|g| g.generation != generation) {
            return;
        }
        for (key, outcome) in outcomes {
            let rerouted = sealed(&outcome)
                && fresh
                    .get(&key.0)
                    .is_some_and(|t| reroute(&mut st, &p, &key, t, &mut Vec::new(), &mut broken).is_ok());
            let gate = st.txn.as_mut().expect("checked above");
            match outcome {
                Ok(()) => {
                    gate.added.insert(key);
                }
                Err(_) if rerouted => {}
                Err(e) => {
                    tracing::debug!(topic = %key.0, partition = key.1, error = %e, "partition not added to the transaction");
                    gate.failed.get_or_insert(e);
                }
            }
        }
        if let Some(gate) = st.txn.as_mut() {
            gate.adding = false;
        }
    }
    fail_unparsed(&p, broken);
    let _ = p.wake.try_send(());
}

/// Fresh metadata of `topics` (the cache keeps leaders only), where sealed partitions'
/// successors are found.
async fn successors_metadata(p: &Inner, topics: impl Iterator<Item = &str>) -> HashMap<String, TopicMetadata> {
    let mut fresh: HashMap<String, TopicMetadata> = HashMap::new();
    for topic in topics {
        if fresh.contains_key(topic) {
            continue;
        }
        p.client.invalidate_metadata(topic);
        match p.client.topic_metadata(topic).await {
            Ok(t) => {
                fresh.insert(topic.to_owned(), t);
            }
            Err(e) => tracing::debug!(%topic, error = %e, "metadata for a sealed partition's children"),
        }
    }
    fresh
}

/// Fails the replies of batches `reroute` could not parse (built by this producer: cannot
/// happen, but the replies are not lost).
fn fail_unparsed(p: &Inner, broken: Vec<Vec<Reply>>) {
    let e = ClientError::Protocol("a batch of a sealed partition does not parse".into());
    for replies in broken {
        complete_all(p, replies, 0, u64::MAX, Some(&e));
    }
}

/// Finds leaders for partitions that have none cached: one metadata refresh, then each is
/// looked up; those still without a leader are charged an attempt after `retry_backoff`, and
/// their batches that ran out of attempts or time fail.
async fn route(p: Rc<Inner>, keys: Vec<Key>) {
    // Invalidating also makes the refresh ask for each of these topics.
    keys.iter().for_each(|k| p.client.invalidate_metadata(&k.0));
    let refreshed = p.client.refresh_metadata().await;
    let mut failed = Vec::new();
    for k in &keys {
        let found = match &refreshed {
            Ok(()) => p.client.leader(&k.0, k.1).await.map(drop),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = found {
            tracing::debug!(topic = %k.0, partition = k.1, error = %e, "no leader for partition");
            let attempt = p.state.borrow().ready.get(k).and_then(|q| q.front()).map_or(0, |b| b.attempts + 1);
            p.note_retry(k, attempt, &e);
            p.client.invalidate_metadata(&k.0);
            failed.push((k.clone(), e));
        }
    }
    if !failed.is_empty() {
        compio::time::sleep(p.config.retry_backoff).await;
    }
    let mut expired = Vec::new();
    {
        let mut st = p.state.borrow_mut();
        for (k, e) in failed {
            let Some(q) = st.ready.get_mut(&k) else {
                continue;
            };
            q.iter_mut().for_each(|b| b.attempts += 1);
            let mut gone = Vec::new();
            while q.front().is_some_and(|b| !may_retry(&p.config, b, &e, false)) {
                gone.extend(q.pop_front());
            }
            if !gone.is_empty() {
                expired.push((k, gone, e));
            }
        }
        for k in &keys {
            st.busy.remove(k);
        }
        st.routing = false;
    }
    for (k, batches, e) in expired {
        fail(&p, &k, batches, &e);
    }
    let _ = p.wake.try_send(());
}

async fn send_request(p: Rc<Inner>, node: u32, parts: Vec<Part>) {
    // Batches go out from their own buffers (`Bytes` clones), so a retry resends them
    // without any copy having been made.
    let batch_bytes: Vec<Vec<Bytes>> =
        parts.iter().map(|part| part.batches.iter().map(|b| b.bytes.clone()).collect()).collect();
    let entries: Vec<(&str, u32, u32, &[Bytes])> = parts
        .iter()
        .zip(&batch_bytes)
        .map(|(part, bs)| {
            let (topic, partition) = (&part.key.0, part.key.1);
            (topic.as_str(), partition, p.client.cached_leader_epoch(topic, partition), &bs[..])
        })
        .collect();
    let (acks, timeout) = (p.config.acks.wire(), p.config.request_timeout_ms);
    let response_timeout = p.response_timeout();
    let outcome: Result<Option<ProduceResponse>, ClientError> = async {
        let conn = p.client.node_connection(node).await?;
        let reply = p.config.acks != Acks::None;
        let rx = conn.send_frame(ApiKey::Produce, reply, |h| produce_frame(h, acks, timeout, &entries)).await?;
        match rx {
            // Past the bound the connection is dropped: whatever follows it would wait too.
            Some(rx) => Ok(Some(conn.wait_for(ApiKey::Produce, rx, response_timeout).await?)),
            None => Ok(None),
        }
    }
    .await;
    drop(entries);
    if let Some(n) = p.state.borrow_mut().in_flight.get_mut(&node) {
        *n -= 1;
    }
    let mut drained = Vec::new();
    for (i, Part { key, batches, behind }) in parts.into_iter().enumerate() {
        let result = match &outcome {
            Ok(None) => Ok((u64::MAX, 0)),
            Ok(Some(resp)) => match resp.partitions.get(i) {
                Some(r) if r.error == ErrorCode::NONE => Ok((r.base_offset, r.leader_epoch)),
                Some(r) => {
                    Err(ClientError::Broker(r.error, format!("produce to {}/{} at broker {node}", key.0, key.1)))
                }
                None => Err(ClientError::Protocol("produce response shorter than the request".into())),
            },
            Err(e) => Err(e.clone()),
        };
        match result {
            Ok((base, leader_epoch)) => {
                {
                    // The broker knows the partition under this id now (the key is cloned only
                    // when that changes, not for every answer).
                    let mut st = p.state.borrow_mut();
                    let current = st.producer.map(|(id, _)| id);
                    if let Some(id) = current.filter(|id| batches.first().and_then(|b| b.producer) == Some(*id)) {
                        if st.confirmed.get(&key) != Some(&(node, id)) {
                            st.confirmed.insert(key.clone(), (node, id));
                        }
                    }
                }
                resolve(&p, &key, batches, base, leader_epoch)
            }
            Err(e) => {
                // Refused as out of order while an earlier batch of the partition was missing
                // (unanswered when this was sent, or failed since): it comes back after that
                // one, in order.
                let gap = behind || p.state.borrow().flights.get(&key).is_some_and(|f| !f.failed.is_empty());
                let out_of_order = matches!(e, ClientError::Broker(ErrorCode::OUT_OF_ORDER_SEQUENCE, _));
                // A split or merge sealed the partition: its records go to its children
                // (`requeue`), after every request of it came back.
                let sealed = matches!(e, ClientError::Broker(ErrorCode::PARTITION_SEALED, _));
                if batches.iter().all(|b| may_retry(&p.config, b, &e, (gap && out_of_order) || sealed)) {
                    let mut st = p.state.borrow_mut();
                    let flight = st.flights.get_mut(&key).expect("a request's partitions have a flight");
                    flight.failed.extend(batches);
                    flight.error.get_or_insert(e);
                } else {
                    fail(&p, &key, batches, &e);
                }
            }
        }
        let mut st = p.state.borrow_mut();
        let flight = st.flights.get_mut(&key).expect("a request's partitions have a flight");
        flight.requests -= 1;
        if flight.requests == 0 {
            if flight.failed.is_empty() {
                st.flights.remove(&key);
            } else {
                drained.push(key);
            }
        }
    }
    if !drained.is_empty() {
        requeue(&p, drained).await;
    }
    let _ = p.wake.try_send(());
}

/// Puts the failed batches of partitions whose requests have all come back at the front of
/// their queues, in sequence order, after `retry_backoff`, refreshing the metadata first if a
/// failure suggests it is stale. Until then the partitions send nothing.
async fn requeue(p: &Inner, keys: Vec<Key>) {
    let mut stale = false;
    for key in &keys {
        let (attempt, error) = {
            let st = p.state.borrow();
            let Some(f) = st.flights.get(key) else {
                continue;
            };
            (f.failed.iter().map(|b| b.attempts + 1).min().unwrap_or(0), f.error.clone())
        };
        let Some(e) = error else {
            continue;
        };
        tracing::debug!(topic = %key.0, partition = key.1, error = %e, "retrying produce");
        if !matches!(e, ClientError::Broker(ErrorCode::PARTITION_SEALED, _)) {
            // A sealed partition's records move to its children: a redirect, not a retry.
            p.note_retry(key, attempt, &e);
        }
        if e.refreshes_metadata() {
            // At once, so other partitions of the topic stop going to the old leader.
            p.client.invalidate_metadata(&key.0);
            stale = true;
        }
    }
    compio::time::sleep(p.config.retry_backoff).await;
    if stale {
        // Failing here is fine: the partitions then wait for a leader in `route`.
        if let Err(e) = p.client.refresh_metadata().await {
            tracing::debug!(error = %e, "metadata refresh before a produce retry failed");
        }
    }
    // Sealed partitions' successors, from fresh metadata.
    let sealed_topics: Vec<String> = {
        let st = p.state.borrow();
        let sealed = |k: &&Key| {
            st.flights
                .get(*k)
                .is_some_and(|f| matches!(f.error, Some(ClientError::Broker(ErrorCode::PARTITION_SEALED, _))))
        };
        keys.iter().filter(sealed).map(|k| k.0.clone()).collect()
    };
    let fresh = successors_metadata(p, sealed_topics.iter().map(String::as_str)).await;
    let mut broken = Vec::new();
    let mut st = p.state.borrow_mut();
    for key in keys {
        let Some(mut flight) = st.flights.remove(&key) else {
            continue;
        };
        if let Some(t) = fresh.get(&key.0) {
            match reroute(&mut st, p, &key, t, &mut flight.failed, &mut broken) {
                Ok(()) => continue,
                // The metadata does not show the children yet: sent again, refused again.
                Err(()) => tracing::debug!(topic = %key.0, partition = key.1, "sealed; children not known yet"),
            }
        }
        if matches!(flight.error, Some(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _))) {
            if let Some(ts) = st.topics.get_mut(&key.0) {
                ts.partitions = None;
            }
        }
        flight.failed.sort_by_key(|b| b.order);
        let q = st.ready.entry(key).or_default();
        for mut b in flight.failed.into_iter().rev() {
            b.attempts += 1;
            q.push_front(b);
        }
    }
    drop(st);
    fail_unparsed(p, broken);
}

/// Moves the records of sealed partition `key` (its failed batches, then its queued ones,
/// then its open batch, in the order they were queued) to the open partitions that now own
/// their keys, per `t`, and routes the partition's range there from now on. Per-key order
/// holds: nothing of the range went to a child before (the routes still named the sealed
/// partition until now), and every batch sent to it after the seal came back refused. Fails,
/// changing nothing, if `t` does not show open partitions covering the sealed one's range.
fn reroute(
    st: &mut State,
    p: &Inner,
    key: &Key,
    t: &TopicMetadata,
    failed: &mut Vec<Sealed>,
    broken: &mut Vec<Vec<Reply>>,
) -> Result<(), ()> {
    let (topic, sealed) = (key.0.as_str(), key.1);
    let fresh: Vec<(KeyRange, u32)> = open_ranges(t).into_iter().filter(|(_, c)| *c != sealed).collect();
    let ts = st.topics.get_mut(topic).ok_or(())?;
    let routes = ts.routes.as_mut().ok_or(())?;
    let mut mine: Vec<KeyRange> = routes.parts.iter().filter(|(_, q)| *q == sealed).map(|(r, _)| r.clone()).collect();
    if mine.is_empty() {
        // Sent to by index (the routes never named it): its own range.
        let own = t.partitions.iter().find(|q| q.partition == sealed).and_then(|q| q.lineage.range.as_ref());
        mine.extend(own.map(KeyRange::of_wire));
    }
    if mine.is_empty() || !mine.iter().all(|r| covered(r, &fresh)) {
        return Err(());
    }
    routes.replace(sealed, &fresh);
    seal(st, topic, sealed);
    failed.sort_by_key(|b| b.order);
    let mut batches: Vec<Sealed> = std::mem::take(failed);
    batches.extend(st.ready.remove(key).unwrap_or_default());
    for b in batches {
        st.buffered_bytes = st.buffered_bytes.saturating_sub(b.accounted);
        st.unresolved -= b.replies.len();
        let batch = match RecordBatch::parse(b.bytes.clone()) {
            Ok(batch) => batch,
            Err(e) => {
                // Built by this producer: cannot happen; fail rather than lose the replies.
                tracing::error!(topic, partition = sealed, error = %e, "a sealed batch does not parse");
                broken.push(b.replies);
                continue;
            }
        };
        let first = batch.header().first_timestamp.0;
        for (r, reply) in batch.records().iter().zip(b.replies) {
            let k = r.key.as_ref().map(|k| k.as_slice());
            let routes = st.topics[topic].routes.as_ref().expect("checked above");
            // Keyless records stay in the sealed partition's range: its first child.
            let to = match k {
                Some(k) => routes.route(k),
                None => fresh.iter().find(|(f, _)| mine.iter().any(|m| intersect(m, f).is_some())).map_or(0, |e| e.1),
            };
            let ts = Timestamp(first.wrapping_add(r.timestamp_delta.to_native()));
            enqueue_at(st, &p.config, &p.wake, topic, to, k, r.value.as_slice(), Some(ts), reply);
        }
    }
    tracing::debug!(topic, partition = sealed, "sealed: records rerouted to its children");
    Ok(())
}

/// Whether the ranges in `by` cover every point of `range`.
fn covered(range: &KeyRange, by: &[(KeyRange, u32)]) -> bool {
    let mut cuts: Vec<KeyRange> = by.iter().filter_map(|(r, _)| intersect(range, r)).collect();
    cuts.sort_by(by_from);
    let mut at = range.from.clone();
    for c in cuts {
        if c.from > at {
            return false;
        }
        match c.to {
            None => return true,
            Some(to) if to > at => at = to,
            Some(_) => {}
        }
    }
    range.to.as_ref().is_some_and(|to| at >= *to)
}

/// Whether a batch that failed with `e` may be sent again (`also`: the caller knows the error
/// is retriable here although it is not in general).
fn may_retry(config: &ProducerConfig, batch: &Sealed, e: &ClientError, also: bool) -> bool {
    (e.is_retriable() || also) && batch.attempts < config.retries && batch.created.elapsed() < config.delivery_timeout
}

/// Completes an acknowledged entry's records (`base`: the first one's offset, `u64::MAX` if
/// unknown) and notes the write in the session, before any caller learns of it.
fn resolve(p: &Inner, key: &Key, batches: Vec<Sealed>, base: u64, leader_epoch: u32) {
    if let Some(session) = p.config.session.as_ref().filter(|_| base != u64::MAX) {
        let records: usize = batches.iter().map(|b| b.replies.len()).sum();
        let end = base.saturating_add(records as u64);
        session.borrow_mut().note_write(&key.0, key.1, end, leader_epoch);
    }
    settle(p, &batches);
    // Outside the borrow: a callback may call back into the producer.
    complete_all(p, batches.into_iter().flat_map(|b| b.replies), key.1, base, None);
}

fn fail(p: &Inner, key: &Key, batches: Vec<Sealed>, e: &ClientError) {
    settle(p, &batches);
    {
        let mut st = p.state.borrow_mut();
        if let Some(gate) = st.txn.as_mut() {
            // The transaction cannot commit now; it keeps its identity until it is aborted
            // (which gives the next transaction a new epoch and fresh sequences).
            gate.failed.get_or_insert_with(|| e.clone());
        } else if st.producer.is_some() {
            // A failed batch leaves a gap in this producer's sequence, so later batches would
            // be rejected as out of order: start over with a new producer id (as Kafka's
            // KIP-360 bumps the epoch). Batches already sealed keep the old id and its order.
            tracing::debug!(topic = %key.0, partition = key.1, error = %e, "batch failed; new producer id");
            st.producer = None;
            st.reset_sequences();
        }
    }
    complete_all(p, batches.into_iter().flat_map(|b| b.replies), key.1, u64::MAX, Some(e));
}

/// Takes finished batches off the producer's accounts.
fn settle(p: &Inner, batches: &[Sealed]) {
    let waiters = {
        let mut st = p.state.borrow_mut();
        for b in batches {
            st.buffered_bytes = st.buffered_bytes.saturating_sub(b.accounted);
            st.unresolved -= b.replies.len();
        }
        if st.buffered_bytes <= p.config.buffer_bytes_max {
            std::mem::take(&mut st.space_waiters)
        } else {
            Vec::new()
        }
    };
    waiters.into_iter().for_each(Waker::wake);
}

impl Inner {
    /// Tells the retry handler, if any, outside every borrow of the state.
    fn note_retry(&self, key: &Key, attempt: u32, error: &ClientError) {
        let handler = self.retry_handler.borrow().clone();
        if let Some(h) = handler {
            h(&Retry { topic: &key.0, partition: key.1, attempt, error });
        }
    }

    /// The client-side bound on a Produce answer: never below what the broker may wait.
    fn response_timeout(&self) -> Duration {
        match self.config.acks {
            Acks::All => self
                .config
                .response_timeout
                .max(Duration::from_millis(u64::from(self.config.request_timeout_ms)) + RESPONSE_MARGIN),
            Acks::Leader | Acks::None => self.config.response_timeout,
        }
    }
}

/// Lets the runtime run other tasks (such as a producer's sender) before continuing.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Archive overhead per record, for batch size accounting.
const RECORD_OVERHEAD_BYTES: usize = 40;
const REQUEST_BYTES_MAX: usize = 4 << 20;
/// How much longer than the broker's own timeout (acks=all) an answer may take to arrive.
const RESPONSE_MARGIN: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_partitioning_is_stable_and_spread() {
        assert_eq!(key_partition(b"user-1", 8), key_partition(b"user-1", 8));
        let used: HashSet<u32> = (0..100).map(|i| key_partition(format!("k{i}").as_bytes(), 8)).collect();
        assert_eq!(used.len(), 8);
        assert_eq!(key_partition(b"x", 1), 0);
    }

    fn sealed(attempts: u32) -> Sealed {
        Sealed {
            order: 0,
            producer: None,
            bytes: Bytes::from_static(b"batch"),
            replies: Vec::new(),
            attempts,
            created: Instant::now(),
            accounted: 5,
        }
    }

    /// First attempts of a partition share a request (one run of sequences); a retried batch
    /// goes alone.
    #[test]
    fn first_attempts_share_a_request_and_a_retried_batch_goes_alone() {
        let key: Key = ("t".into(), 0);
        let mut st = State::default();
        st.ready.insert(key.clone(), (0..12).map(|_| sealed(0)).collect());
        let parts = take_request(&mut st, 1, &mut std::iter::once(key.clone()));
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].batches.len(), 12, "every ready first attempt");
        assert_eq!(st.flights[&key].requests, 1);
        st.flights.clear();
        st.ready.insert(key.clone(), [sealed(1), sealed(1), sealed(0)].into_iter().collect());
        let parts = take_request(&mut st, 1, &mut std::iter::once(key.clone()));
        assert_eq!(parts[0].batches.len(), 1, "a retried batch goes alone");
    }

    /// A second request of a partition counts in its flight and is marked as sent behind the
    /// first (so an out-of-order refusal of it is retriable).
    #[test]
    fn a_request_sent_behind_another_of_its_partition_is_marked() {
        let key: Key = ("t".into(), 0);
        let mut st = State::default();
        st.ready.insert(key.clone(), [sealed(0)].into_iter().collect());
        let first = take_request(&mut st, 7, &mut std::iter::once(key.clone()));
        st.ready.get_mut(&key).unwrap().push_back(sealed(0));
        let second = take_request(&mut st, 7, &mut std::iter::once(key.clone()));
        assert!(!first[0].behind);
        assert!(second[0].behind);
        assert_eq!((st.flights[&key].requests, st.flights[&key].node), (2, 7));
    }
}
