//! A shard: one thread, one compio runtime, the partitions it owns, and its message loop.
//!
//! Everything here is single-threaded (`Rc`, `RefCell`, `Cell`); no borrow is held across an
//! `.await`. Cross-shard work arrives as [`ShardMsg`] on a bounded channel and answers on a
//! oneshot.
//!
//! Group commit: appends that need durability register a waiter `(offset, sender)` and start
//! the partition's sync task if it is idle. The task takes a `SyncJob` (every append so far),
//! runs its fdatasync on compio's blocking pool so the shard keeps serving, reports it, and
//! wakes every waiter it covers; appends that arrived meanwhile are covered by the next round.
//! A storage failure fail-stops the process (exit status 74): the log's state is unknown.
//!
//! Back-pressure: a produce entry holds its bytes of the shard's produce budget, and a fetch
//! the record bytes it read of the shard's fetch budget (`service::budget::Budgets`), through holds
//! that give them back when dropped, so no path (a request future dropped when its connection
//! fails included) can leak them. A fetch's reads are sized before they are made.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::BytesMut;
use futures_channel::oneshot;
use skein_client::wire::{
    CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse, ErrorCode, FetchPartition,
    ListOffsetsPartition, ListOffsetsPartitionResponse, PartitionDescription, ProducePartition,
    ProducePartitionResponse, EARLIEST, LATEST,
};
use skein_log::batch::RecordBatch;
use skein_log::storage::FileStorage;
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{AppendError, Log, ReadError, ReadLimit};

use crate::core::producers::{ProducerStates, SequenceCheck};
use crate::meta::{self, Topics};
use crate::service::budget::{Budgets, FetchBudget};
use crate::service::{fail_stop, split_batches, FetchResult};
use crate::BrokerConfig;

/// Work sent to the shard that owns it.
pub(crate) enum ShardMsg {
    /// A new client connection to serve on this shard.
    Connection(std::net::TcpStream, Arc<AtomicUsize>),
    /// Append batches to owned partitions: one message (and one reply) per request and owner
    /// shard, however many of its partitions the request names, so that a request crossing
    /// shards wakes the other shard once. Answers in the order of `parts`.
    Produce {
        parts: Vec<ProducePartition>,
        acks: i8,
        deadline: Instant,
        reply: oneshot::Sender<Vec<ProducePartitionResponse>>,
    },
    /// Read from owned partitions (one message per request and owner shard, as `Produce`),
    /// in order, against the request's `max_bytes` and this shard's fetch budget; the budget
    /// comes back with the results and holds their bytes until dropped.
    Fetch { parts: Vec<FetchPartition>, max_bytes: u32, reply: oneshot::Sender<(Vec<FetchResult>, FetchBudget)> },
    /// Answer when the partition's end passes `offset` (or drop the reply at the deadline).
    WaitForData { topic: String, partition: u32, offset: u64, reply: oneshot::Sender<()> },
    /// Look up an offset.
    ListOffsets { part: ListOffsetsPartition, reply: oneshot::Sender<ListOffsetsPartitionResponse> },
    /// Describe an owned partition.
    Describe { topic: String, partition: u32, reply: oneshot::Sender<PartitionDescription> },
    /// Open (creating if needed) an owned partition's log.
    OpenPartition { topic: String, partition: u32, reply: oneshot::Sender<Result<(), String>> },
    /// Delete an owned partition's log.
    DeletePartition { topic: String, partition: u32, reply: oneshot::Sender<()> },
    /// A new idempotent producer id (shard 0 owns the allocator).
    InitProducerId { reply: oneshot::Sender<Result<i64, ErrorCode>> },
    /// Create topics (shard 0 owns the metadata).
    Create { req: CreateTopicsRequest, reply: oneshot::Sender<CreateTopicsResponse> },
    /// Delete topics (shard 0 owns the metadata).
    Delete { req: DeleteTopicsRequest, reply: oneshot::Sender<DeleteTopicsResponse> },
    /// A new topic metadata snapshot.
    Topics(Arc<Topics>),
    /// Drain, close every log, and stop.
    Shutdown,
}

pub(crate) struct Partition {
    log: Log<FileStorage>,
    epoch: LeaderEpoch,
    /// Producers waiting for durability: (offset that must be durable, wake-up).
    durable_waiters: Vec<(Offset, oneshot::Sender<()>)>,
    syncing: bool,
    /// Long-polling fetches waiting for the log end to pass an offset.
    data_waiters: Vec<(Offset, oneshot::Sender<()>)>,
    /// Idempotent producers' recent batches (rebuilt from the log at open).
    producers: ProducerStates,
}

type PartitionCell = Rc<RefCell<Partition>>;

pub(crate) struct Shard {
    pub id: usize,
    pub config: Arc<BrokerConfig>,
    pub peers: Vec<flume::Sender<ShardMsg>>,
    partitions: RefCell<HashMap<(String, u32), PartitionCell>>,
    pub topics: RefCell<Arc<Topics>>,
    /// Produce and fetch bytes held by requests on this shard.
    budgets: Budgets,
    pub in_flight: Cell<usize>,
    pub stopping: Cell<bool>,
    /// Serialises topic creation and deletion (shard 0 only; not on the data path).
    pub admin: futures_util::lock::Mutex<()>,
    /// Producer id allocation (shard 0 only).
    producer_ids: RefCell<Option<meta::ProducerIds>>,
}

impl Shard {
    /// Opens (recovering) every partition this shard owns.
    pub fn open(
        id: usize,
        config: Arc<BrokerConfig>,
        topics: Arc<Topics>,
        peers: Vec<flume::Sender<ShardMsg>>,
    ) -> Result<Rc<Shard>> {
        let shard = Shard {
            id,
            budgets: Budgets::new(&config),
            config,
            peers,
            partitions: RefCell::new(HashMap::new()),
            topics: RefCell::new(topics.clone()),
            in_flight: Cell::new(0),
            stopping: Cell::new(false),
            admin: futures_util::lock::Mutex::new(()),
            producer_ids: RefCell::new(None),
        };
        if id == 0 {
            *shard.producer_ids.borrow_mut() = Some(meta::ProducerIds::load(&shard.config.data_dir)?);
        }
        for t in topics.topics.values() {
            for p in 0..t.partitions {
                if shard.owner(&t.name, p) == id {
                    shard.open_partition(&t.name, p).map_err(anyhow::Error::msg)?;
                }
            }
        }
        Ok(Rc::new(shard))
    }

    /// The shard owning a partition.
    pub fn owner(&self, topic: &str, partition: u32) -> usize {
        owner(topic, partition, self.peers.len())
    }

    /// Receives messages until shutdown, then drains and closes the logs.
    pub async fn message_loop(self: Rc<Self>, rx: flume::Receiver<ShardMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            if let ShardMsg::Shutdown = msg {
                break;
            }
            compio::runtime::spawn(self.clone().on_msg(msg)).detach();
        }
        self.stopping.set(true);
        let grace = Instant::now() + Duration::from_millis(self.config.shutdown_grace_ms);
        while self.in_flight.get() > 0 && Instant::now() < grace {
            compio::time::sleep(Duration::from_millis(5)).await;
        }
        // Let running group commits finish, so every log can be closed cleanly (a sync task
        // holds its partition; `close_all` could only sync that one, without the marker).
        while self.partitions.borrow().values().any(|p| p.borrow().syncing) && Instant::now() < grace {
            compio::time::sleep(Duration::from_millis(2)).await;
        }
        self.close_all();
    }

    /// Handles one message (also used directly for work this shard owns).
    pub async fn on_msg_pub(self: Rc<Self>, msg: ShardMsg) {
        self.on_msg(msg).await
    }

    async fn on_msg(self: Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Connection(stream, count) => crate::service::conn::serve(self, stream, count).await,
            ShardMsg::Produce { parts, acks, deadline, reply } => {
                let _ = reply.send(self.produce_all(parts, acks, deadline).await);
            }
            ShardMsg::Fetch { parts, max_bytes, reply } => {
                let _ = reply.send(self.fetch_all(&parts, max_bytes));
            }
            ShardMsg::WaitForData { topic, partition, offset, reply } => {
                self.wait_for_data(&topic, partition, offset, reply)
            }
            ShardMsg::ListOffsets { part, reply } => {
                let _ = reply.send(self.list_offsets(&part));
            }
            ShardMsg::Describe { topic, partition, reply } => {
                let _ = reply.send(self.describe(&topic, partition));
            }
            ShardMsg::OpenPartition { topic, partition, reply } => {
                let _ = reply.send(self.open_partition(&topic, partition));
            }
            ShardMsg::DeletePartition { topic, partition, reply } => {
                self.delete_partition(&topic, partition);
                let _ = reply.send(());
            }
            ShardMsg::InitProducerId { reply } => {
                let id = match self.producer_ids.borrow_mut().as_mut() {
                    Some(ids) => ids.allocate().map_err(|e| {
                        tracing::error!(error = %format!("{e:#}"), "allocating a producer id failed");
                        ErrorCode::STORAGE_ERROR
                    }),
                    None => Err(ErrorCode::UNKNOWN),
                };
                let _ = reply.send(id);
            }
            ShardMsg::Create { req, reply } => {
                let _ = reply.send(self.create_topics(req).await);
            }
            ShardMsg::Delete { req, reply } => {
                let _ = reply.send(self.delete_topics(req).await);
            }
            ShardMsg::Topics(t) => *self.topics.borrow_mut() = t,
            ShardMsg::Shutdown => {}
        }
    }

    /// Applies the flush policy and retention every few milliseconds.
    pub async fn tick_loop(self: Rc<Self>) {
        let mut ticks: u64 = 0;
        while !self.stopping.get() {
            compio::time::sleep(Duration::from_millis(TICK_MS)).await;
            ticks += 1;
            let now = now();
            let parts: Vec<PartitionCell> = self.partitions.borrow().values().cloned().collect();
            for p in parts {
                let due = p.borrow().log.sync_due(now);
                if due {
                    start_sync(&p);
                }
                if ticks.is_multiple_of(RETENTION_EVERY_TICKS) {
                    if let Err(e) = p.borrow_mut().log.apply_retention(now) {
                        fail_stop("retention", &e);
                    }
                }
            }
        }
    }

    fn partition(&self, topic: &str, partition: u32) -> Option<PartitionCell> {
        self.partitions.borrow().get(&(topic.to_owned(), partition)).cloned()
    }

    pub fn open_partition(&self, topic: &str, partition: u32) -> Result<(), String> {
        if self.partition(topic, partition).is_some() {
            return Ok(());
        }
        let topics = self.topics.borrow().clone();
        let configs = topics.topics.get(topic).map(|t| t.configs.clone()).unwrap_or_default();
        let config = meta::log_config(&configs)?;
        let dir = meta::partition_dir(&self.config.data_dir, topic, partition);
        let log = open_log(&dir, config).map_err(|e| format!("{e:#}"))?;
        let report = log.recovery();
        tracing::info!(shard = self.id, topic, partition, log_end = %log.log_end_offset(),
            clean = report.clean_shutdown, scanned = report.segments_scanned, truncated = ?report.truncated, "partition open");
        let epoch = log.epochs().latest().map_or(LeaderEpoch(0), |e| e.epoch);
        let producers = ProducerStates::rebuild(&log).map_err(|e| format!("reading producer state: {e}"))?;
        let p =
            Partition { log, epoch, durable_waiters: Vec::new(), syncing: false, data_waiters: Vec::new(), producers };
        self.partitions.borrow_mut().insert((topic.to_owned(), partition), Rc::new(RefCell::new(p)));
        Ok(())
    }

    fn delete_partition(&self, topic: &str, partition: u32) {
        let Some(p) = self.partitions.borrow_mut().remove(&(topic.to_owned(), partition)) else {
            return;
        };
        let dir = meta::partition_dir(&self.config.data_dir, topic, partition);
        drop(p);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not delete a partition directory");
        }
    }

    fn close_all(&self) {
        let parts: Vec<((String, u32), PartitionCell)> = self.partitions.borrow_mut().drain().collect();
        for ((topic, partition), p) in parts {
            match Rc::try_unwrap(p) {
                Ok(cell) => {
                    if let Err(e) = cell.into_inner().log.close(now()) {
                        tracing::error!(topic, partition, error = %e, "closing a log failed");
                    }
                }
                Err(p) => {
                    // A sync task still holds it: sync through the shared handle instead.
                    if let Err(e) = p.borrow_mut().log.sync(now()) {
                        tracing::error!(topic, partition, error = %e, "final sync failed");
                    }
                }
            }
        }
    }

    /// Produces to owned partitions: every partition's append happens at once (the first poll
    /// of each), then the answers wait together (for durability with `acks=all`).
    pub(crate) async fn produce_all(
        &self,
        parts: Vec<ProducePartition>,
        acks: i8,
        deadline: Instant,
    ) -> Vec<ProducePartitionResponse> {
        if parts.len() == 1 {
            let part = parts.into_iter().next().expect("one part");
            return vec![self.produce(part, acks, deadline).await];
        }
        futures_util::future::join_all(parts.into_iter().map(|part| self.produce(part, acks, deadline))).await
    }

    /// Reads owned partitions, in order, against `max_bytes` and this shard's fetch budget.
    pub(crate) fn fetch_all(&self, parts: &[FetchPartition], max_bytes: u32) -> (Vec<FetchResult>, FetchBudget) {
        let mut budget = FetchBudget::new(max_bytes, &self.budgets.fetch);
        let results = parts.iter().map(|part| self.fetch(part, &mut budget)).collect();
        (results, budget)
    }

    async fn produce(&self, part: ProducePartition, acks: i8, deadline: Instant) -> ProducePartitionResponse {
        let (topic, partition) = (part.topic.clone(), part.partition);
        let mut resp = ProducePartitionResponse {
            topic,
            partition,
            error: ErrorCode::NONE,
            base_offset: 0,
            leader_epoch: 0,
            log_start: 0,
        };
        if self.stopping.get() {
            resp.error = ErrorCode::SHUTTING_DOWN;
            return resp;
        }
        let Some(p) = self.partition(&part.topic, part.partition) else {
            resp.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
            return resp;
        };
        // Held until this future ends, however it ends (a dropped request gives it back).
        let Some(_held) = self.budgets.produce.try_hold(part.records.len() as u64) else {
            resp.error = ErrorCode::THROTTLED;
            return resp;
        };
        let batches = match split_batches(part.records) {
            Ok(b) => b,
            Err(code) => {
                resp.error = code;
                return resp;
            }
        };
        let appended = append_all(&p, batches);
        resp.leader_epoch = p.borrow().epoch.0;
        resp.log_start = p.borrow().log.log_start_offset().get();
        match appended {
            Ok((base, end)) => {
                resp.base_offset = base.get();
                wake_data_waiters(&p, end);
                if acks == -1 {
                    resp.error = wait_durable(&p, end, deadline).await;
                }
            }
            Err(code) => resp.error = code,
        }
        resp
    }

    fn fetch(&self, part: &FetchPartition, budget: &mut FetchBudget) -> FetchResult {
        let mut out = FetchResult::empty(ErrorCode::NONE);
        let Some(p) = self.partition(&part.topic, part.partition) else {
            out.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
            return out;
        };
        let p = p.borrow();
        // One node: everything written is committed, so the high watermark is the log end.
        let hw = p.log.log_end_offset();
        out.high_watermark = hw.get();
        out.log_start = p.log.log_start_offset().get();
        out.leader_epoch = p.epoch.0;
        // Everything acknowledged is in the log, so a session token beyond the log end names
        // writes this log does not hold (lost with an unsynced tail, or from another log):
        // waiting cannot help.
        if part.min_high_watermark > hw.get() || part.min_leader_epoch > p.epoch.0 {
            out.error = ErrorCode::NOT_CAUGHT_UP;
            return out;
        }
        // The range is sized before a byte is read, and read only if the budget has room for
        // it; without room the offset is still checked (the entry reports its error).
        let limit = budget.limit(part.partition_max_bytes);
        let range = p.log.read(Offset(part.fetch_offset), ReadLimit { max_bytes: limit.unwrap_or(1), end: Some(hw) });
        let read = match range {
            Ok(range) if limit.is_some() && budget.fits(range.bytes) => p.log.read_range_into(&range, &mut out.records),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match read {
            Ok(()) => budget.take(&mut out.records),
            Err(ReadError::OffsetOutOfRange(_)) => out.error = ErrorCode::OFFSET_OUT_OF_RANGE,
            Err(ReadError::Corrupt(c)) => {
                tracing::error!(error = %c, "corrupt batch not served");
                out.error = ErrorCode::STORAGE_ERROR;
            }
            Err(ReadError::Storage(e)) => fail_stop("read", &e),
        }
        out
    }

    fn wait_for_data(&self, topic: &str, partition: u32, offset: u64, reply: oneshot::Sender<()>) {
        let Some(p) = self.partition(topic, partition) else {
            let _ = reply.send(());
            return;
        };
        let mut pb = p.borrow_mut();
        if pb.log.log_end_offset().get() > offset {
            let _ = reply.send(());
            return;
        }
        pb.data_waiters.retain(|(_, w)| !w.is_canceled());
        pb.data_waiters.push((Offset(offset), reply));
    }

    fn list_offsets(&self, part: &ListOffsetsPartition) -> ListOffsetsPartitionResponse {
        let mut resp = ListOffsetsPartitionResponse {
            topic: part.topic.clone(),
            partition: part.partition,
            error: ErrorCode::NONE,
            offset: 0,
        };
        let Some(p) = self.partition(&part.topic, part.partition) else {
            resp.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
            return resp;
        };
        let p = p.borrow();
        resp.offset = match part.timestamp {
            EARLIEST => p.log.log_start_offset().get(),
            LATEST => p.log.log_end_offset().get(),
            ts => match p.log.offset_for_timestamp(Timestamp(ts)) {
                Ok(found) => found.unwrap_or(p.log.log_end_offset()).get(),
                Err(e) => {
                    tracing::error!(error = %e, "timestamp lookup failed");
                    resp.error = ErrorCode::STORAGE_ERROR;
                    0
                }
            },
        };
        resp
    }

    fn describe(&self, topic: &str, partition: u32) -> PartitionDescription {
        let node = self.config.node_id;
        let mut d = PartitionDescription {
            partition,
            error: ErrorCode::NONE,
            leader: node,
            leader_epoch: 0,
            replicas: vec![node],
            isr: vec![node],
            log_start: 0,
            high_watermark: 0,
            log_end: 0,
        };
        match self.partition(topic, partition) {
            Some(p) => {
                let p = p.borrow();
                d.leader_epoch = p.epoch.0;
                d.log_start = p.log.log_start_offset().get();
                d.log_end = p.log.log_end_offset().get();
                d.high_watermark = d.log_end;
            }
            None => d.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
        }
        d
    }
}

/// Which shard owns a partition: a stable hash (FNV-1a) of topic and partition.
pub(crate) fn owner(topic: &str, partition: u32, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes().chain(partition.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// Appends every batch (stamping the leader epoch); returns the first offset and the end
/// the request must wait for (for acks=all). An idempotent producer's retried batch is not
/// appended again: its original offsets answer.
fn append_all(p: &PartitionCell, batches: Vec<RecordBatch<BytesMut>>) -> Result<(Offset, Offset), ErrorCode> {
    let mut pb = p.borrow_mut();
    let epoch = pb.epoch;
    let mut first = None;
    let mut end = pb.log.log_end_offset();
    for mut batch in batches {
        match pb.producers.check(batch.header()) {
            SequenceCheck::Append => {}
            SequenceCheck::Duplicate { base, end: dup_end } => {
                first.get_or_insert(base);
                end = end.max(dup_end);
                continue;
            }
            SequenceCheck::OutOfOrder => return Err(ErrorCode::OUT_OF_ORDER_SEQUENCE),
            SequenceCheck::Fenced => return Err(ErrorCode::PRODUCER_FENCED),
        }
        batch.set_leader_epoch(epoch);
        match pb.log.append(&mut batch, now()) {
            Ok(info) => {
                first.get_or_insert(info.base_offset);
                end = end.max(info.log_end_offset);
                pb.producers.note(batch.header());
            }
            Err(AppendError::Storage(e)) => fail_stop("append", &e),
            Err(AppendError::Poisoned(e)) => fail_stop("append", &e),
            Err(AppendError::OffsetLimit(_)) => return Err(ErrorCode::TOO_LARGE),
            Err(e) => {
                tracing::error!(error = %e, "append rejected");
                return Err(ErrorCode::UNKNOWN);
            }
        }
    }
    let base = first.unwrap_or_else(|| pb.log.log_end_offset());
    Ok((base, end))
}

fn wake_data_waiters(p: &PartitionCell, end: Offset) {
    let mut pb = p.borrow_mut();
    let waiters = std::mem::take(&mut pb.data_waiters);
    for (offset, w) in waiters {
        if end > offset {
            let _ = w.send(());
        } else if !w.is_canceled() {
            pb.data_waiters.push((offset, w));
        }
    }
}

/// Waits until `end` is durable (group commit), or the deadline.
async fn wait_durable(p: &PartitionCell, end: Offset, deadline: Instant) -> ErrorCode {
    let rx = {
        let mut pb = p.borrow_mut();
        if pb.log.durable_offset() >= end {
            return ErrorCode::NONE;
        }
        let (tx, rx) = oneshot::channel();
        pb.durable_waiters.push((end, tx));
        rx
    };
    start_sync(p);
    let wait = deadline.saturating_duration_since(Instant::now());
    match compio::time::timeout(wait, rx).await {
        Ok(Ok(())) => ErrorCode::NONE,
        _ => ErrorCode::REQUEST_TIMED_OUT,
    }
}

/// Starts the partition's sync task unless it is running.
fn start_sync(p: &PartitionCell) {
    {
        let mut pb = p.borrow_mut();
        if pb.syncing {
            return;
        }
        pb.syncing = true;
    }
    compio::runtime::spawn(sync_task(p.clone())).detach();
}

/// Group commit: one fdatasync per round, off the shard thread, covering every append made
/// before the round began; loops while appends wait for durability.
async fn sync_task(p: PartitionCell) {
    loop {
        let job = p.borrow_mut().log.begin_sync(now());
        let Some(job) = job else {
            let mut pb = p.borrow_mut();
            let durable = pb.log.durable_offset();
            wake_durable(&mut pb, durable);
            pb.syncing = false;
            return;
        };
        let (job, result) = match compio::runtime::spawn_blocking(move || {
            let r = job.run();
            (job, r)
        })
        .await
        {
            Ok(done) => done,
            Err(_) => fail_stop("sync", &"the sync thread panicked"),
        };
        let mut pb = p.borrow_mut();
        match pb.log.finish_sync(job, result) {
            Ok(durable) => wake_durable(&mut pb, durable),
            Err(e) => fail_stop("sync", &e),
        }
        if pb.durable_waiters.is_empty() {
            pb.syncing = false;
            return;
        }
    }
}

fn wake_durable(pb: &mut Partition, durable: Offset) {
    let waiters = std::mem::take(&mut pb.durable_waiters);
    for (offset, w) in waiters {
        if offset <= durable {
            let _ = w.send(());
        } else {
            pb.durable_waiters.push((offset, w));
        }
    }
}

fn open_log(dir: &Path, config: skein_log::LogConfig) -> Result<Log<FileStorage>> {
    let storage = FileStorage::new(dir).with_context(|| format!("opening {}", dir.display()))?;
    Log::open(storage, config, now()).with_context(|| format!("recovering {}", dir.display()))
}

/// Sends `msg` to the shard owning the work (or runs it here) and waits for the reply.
pub(crate) async fn ask<T>(
    shard: &Rc<Shard>,
    owner: usize,
    make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let msg = make(tx);
    if owner == shard.id {
        compio::runtime::spawn(shard.clone().on_msg_pub(msg)).detach();
    } else if shard.peers[owner].send_async(msg).await.is_err() {
        return None;
    }
    rx.await.ok()
}

pub(crate) fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

const TICK_MS: u64 = 10;
const RETENTION_EVERY_TICKS: u64 = 6000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_and_are_stable() {
        let owners: Vec<usize> = (0..64).map(|p| owner("t", p, 2)).collect();
        assert!(owners.contains(&0) && owners.contains(&1));
        assert_eq!(owner("orders", 7, 4), owner("orders", 7, 4));
        assert_eq!(owner("x", 3, 1), 0);
    }
}
