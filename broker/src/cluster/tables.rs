//! Tables on a broker's shards: the driver of `core::table`.
//!
//! Every replica of a table partition on this shard keeps a [`TableMachine`] fed with the
//! partition's committed records (restored from its snapshot file at first use, then the
//! tail), so a follower serves reads and a new leader starts warm. On the leader a
//! [`PartitionLeader`] per leader epoch holds the concurrency control of the transactions
//! using the partition (locks, SSI read tracking, the serial turn): a request the core
//! answers `Wait` parks until the core names its transaction in `take_wakes`, and is then
//! asked again. A commit's part is appended with `acks=all` through the ordinary produce
//! path (inside the client's log transaction for a multi-partition one) and answered with
//! the outcome the machine decided when it applied it, which every replica decides alike.
//! A loop per shard feeds machines, ends prepared parts whose marker came, expires
//! transactions past their timeout and writes snapshots.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures_channel::oneshot;
use skein_client::index::IndexKind;
use skein_client::wire::{
    shown, ErrorCode, TableAbortResponse, TableCommitRequest, TableCommitResponse, TableLockResponse,
    TableQueryRequest, TableQueryResponse, TableReadRequest, TableReadResponse, TableRow, TableTxn,
};

use super::internal::{self, Refusal};
use super::now;
use super::requests::ask;
use super::shard::{owner, Node};
use crate::core::table::leader::{Answer, Decision, PartitionLeader, TxnInfo};
use crate::core::table::store::{Outcome, TableMachine};
use crate::core::table::{range_of, version_code, AbortReason, Key, Level, Part, Priority, TxnId};
use crate::core::{LeaderEpoch, Offset, PartitionId, ProducerEpoch, ProducerId, Seal};
use crate::meta::write_atomically;
use crate::service::{Request, Response};

/// How often a shard feeds its table machines and expires transactions.
const TICK_MS: u64 = 10;
/// How long a parked request sleeps before it looks again (a missed wake costs this much).
const WAIT_POLL_MS: u64 = 200;
/// Polls a parked request waits through a lapsed lease at its epoch before it gives up.
const BLIP_WAITS_MAX: u32 = 25;

/// One table partition replica on this shard.
pub(crate) struct Host {
    pub(super) topic: String,
    pub(super) index: u32,
    pub(super) machine: TableMachine,
    /// The leader-side state at the epoch this replica leads at (None: not leading).
    leader: Option<PartitionLeader>,
    since_snapshot: u64,
}

/// This shard's table partitions and the requests parked on them.
#[derive(Default)]
pub(crate) struct Tables {
    hosts: RefCell<HashMap<PartitionId, Rc<RefCell<Host>>>>,
    parked: RefCell<HashMap<TxnId, Vec<oneshot::Sender<()>>>>,
    /// The term index followers running on this shard (`index_follower`), by table
    /// partition and index name, with the epoch they follow at.
    pub(super) followers: RefCell<HashMap<(PartitionId, String), LeaderEpoch>>,
    /// The child partitions being seeded on this shard (`table_seed`), with the epoch.
    pub(super) seeders: RefCell<HashMap<PartitionId, LeaderEpoch>>,
}

impl Tables {
    fn wake(&self, txns: Vec<TxnId>) {
        if txns.is_empty() {
            return;
        }
        let mut parked = self.parked.borrow_mut();
        for t in txns {
            for tx in parked.remove(&t).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }

    async fn park(&self, txn: TxnId) {
        let (tx, rx) = oneshot::channel();
        self.parked.borrow_mut().entry(txn).or_default().push(tx);
        let _ = compio::time::timeout(Duration::from_millis(WAIT_POLL_MS), rx).await;
    }
}

/// Whether `req` is a table request.
pub(super) fn handles(req: &Request) -> bool {
    matches!(
        req,
        Request::TableRead(_)
            | Request::TableLock(_)
            | Request::TableCommit(_)
            | Request::TableAbort(_)
            | Request::TableQuery(_)
    )
}

fn names(req: &Request) -> (&str, u32) {
    match req {
        Request::TableRead(r) => (&r.topic, r.partition),
        Request::TableLock(r) => (&r.topic, r.partition),
        Request::TableCommit(r) => (&r.topic, r.partition),
        Request::TableAbort(r) => (&r.topic, r.partition),
        Request::TableQuery(r) => (&r.topic, r.partition),
        _ => ("", 0),
    }
}

fn refusal(req: &Request, (error, message): Refusal) -> Response {
    match req {
        Request::TableRead(_) => {
            Response::TableRead(TableReadResponse { error, message, snapshot: 0, rows: Vec::new() })
        }
        Request::TableLock(_) => Response::TableLock(TableLockResponse { error, message }),
        Request::TableCommit(_) => Response::TableCommit(TableCommitResponse {
            error,
            message,
            outcome: 1,
            offset: 0,
            reason: String::new(),
            results: Vec::new(),
        }),
        Request::TableAbort(_) => Response::TableAbort(TableAbortResponse { error, message }),
        Request::TableQuery(_) => Response::TableQuery(TableQueryResponse {
            error,
            message,
            snapshot: 0,
            indexed: 0,
            keys: 0,
            rows: Vec::new(),
        }),
        _ => Response::Error(error),
    }
}

fn aborted(reason: &AbortReason) -> Refusal {
    (ErrorCode::TABLE_TXN_ABORTED, reason.name().to_owned())
}

/// A table request on the shard it arrived on: run on the shard owning its partition.
pub(super) async fn dispatch(node: Rc<Node>, req: Request) -> Response {
    let (topic, index) = names(&req);
    let Some(pid) = node.topics.load().partition(topic, index) else {
        let msg = format!("no partition {index} of '{}'", skein_client::wire::shown(topic));
        return refusal(&req, (ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, msg));
    };
    let shard = owner(pid, node.shard_count());
    if shard == node.shard {
        here(node, req).await
    } else {
        ask(&node, shard, req).await
    }
}

/// A table request for a partition this shard owns.
pub(super) async fn here(node: Rc<Node>, req: Request) -> Response {
    match serve(&node, &req).await {
        Ok(resp) => resp,
        Err(refused) => refusal(&req, refused),
    }
}

fn info_of(t: &TableTxn) -> Result<TxnInfo, Refusal> {
    let level = Level::from_code(t.level)
        .ok_or_else(|| (ErrorCode::INVALID_REQUEST, format!("unknown isolation level code {}", t.level)))?;
    Ok(TxnInfo {
        txn: TxnId(t.txn),
        level,
        priority: Priority { begin_us: t.begin_us, txn: TxnId(t.txn) },
        timeout_ms: t.timeout_ms.clamp(1, crate::core::txn::MAX_TIMEOUT_MS),
    })
}

fn keys_of(keys: &[BytesMut]) -> Result<Vec<Key>, Refusal> {
    keys.iter()
        .map(|k| {
            if k.len() > crate::core::table::KEY_BYTES_MAX {
                Err((
                    ErrorCode::TOO_LARGE,
                    format!(
                        "key of {} bytes is longer than the {} allowed",
                        k.len(),
                        crate::core::table::KEY_BYTES_MAX
                    ),
                ))
            } else {
                Ok(k.to_vec())
            }
        })
        .collect()
}

async fn serve(node: &Rc<Node>, req: &Request) -> Result<Response, Refusal> {
    let (topic, index) = names(req);
    let not_table = || (ErrorCode::NOT_A_TABLE, format!("'{}' is not a table", skein_client::wire::shown(topic)));
    let (pid, _) = {
        let topics = node.topics.load();
        let pid = topics.partition(topic, index).ok_or((ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, String::new()))?;
        (pid, topics.table(topic).ok_or_else(not_table)?)
    };
    let host = host(node, pid, topic, index).await.ok_or((ErrorCode::NOT_LEADER, "no replica here".into()))?;
    // A sealed partition's keys live in its children: only a read at an offset up to the
    // seal (a child's seed) and aborts are taken.
    let seal = node.st.borrow().core.replica(pid).and_then(|r| r.state()).map(|s| s.seal);
    let at_offset = matches!(req, Request::TableRead(r) if r.follower && r.snapshot >= 0);
    if seal.is_some_and(|s| s != Seal::Open) && !at_offset && !matches!(req, Request::TableAbort(_)) {
        return Err(aborted(&AbortReason::Sealed));
    }
    if node.topics.load().has_parents(pid) && !seeded(node, &host, pid).await? {
        return Err((ErrorCode::NOT_CAUGHT_UP, "this partition has not taken its parents' rows yet".into()));
    }
    if let Request::TableRead(r) = req {
        if r.follower && !matches!(Level::from_code(r.txn.level), Some(Level::TwoPl | Level::Serial | Level::Ssi)) {
            return follower_read(node, &host, pid, r).map(Response::TableRead);
        }
    }
    let epoch = leading(node, &host, pid)?;
    match req {
        Request::TableRead(r) => {
            let info = info_of(&r.txn)?;
            let keys = keys_of(&r.keys)?;
            let range = r.range.as_ref().map(|r| range_of(&r.from, &r.to)).transpose().map_err(bad)?;
            let snapshot = u64::try_from(r.snapshot).ok().map(Offset);
            let rows =
                wait(node, &host, pid, epoch, info.txn, |l, m, t| l.read(t, m, &info, snapshot, &keys, range.as_ref()))
                    .await?;
            Ok(Response::TableRead(TableReadResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                snapshot: rows.snapshot.0,
                rows: rows
                    .rows
                    .into_iter()
                    .map(|r| TableRow {
                        key: BytesMut::from(&r.key[..]),
                        value: r.value.map(|v| BytesMut::from(&v[..])),
                        version: version_code(r.version),
                    })
                    .collect(),
            }))
        }
        Request::TableLock(r) => {
            let info = info_of(&r.txn)?;
            let keys = keys_of(&r.keys)?;
            // A transaction that read here names that read's snapshot: a leader that does not
            // know it lost its read locks (a leader change) and must not admit it afresh.
            let used = r.snapshot >= 0;
            wait(node, &host, pid, epoch, info.txn, |l, _, t| l.lock(t, &info, used, &keys)).await?;
            Ok(Response::TableLock(TableLockResponse { error: ErrorCode::NONE, message: String::new() }))
        }
        Request::TableCommit(r) => commit(node, &host, pid, epoch, r).await.map(Response::TableCommit),
        Request::TableQuery(r) => query(node, &host, r).map(Response::TableQuery),
        Request::TableAbort(r) => {
            let mut h = host.borrow_mut();
            let wakes = h.leader.as_mut().map(|l| {
                l.abort(TxnId(r.txn));
                l.take_wakes()
            });
            drop(h);
            node.tables.wake(wakes.unwrap_or_default());
            Ok(Response::TableAbort(TableAbortResponse { error: ErrorCode::NONE, message: String::new() }))
        }
        _ => Err((ErrorCode::INVALID_REQUEST, String::new())),
    }
}

fn bad(e: crate::core::table::PartError) -> Refusal {
    let code = match e {
        crate::core::table::PartError::KeyTooLarge(_) | crate::core::table::PartError::ValueTooLarge(_) => {
            ErrorCode::TOO_LARGE
        }
        _ => ErrorCode::INVALID_REQUEST,
    };
    (code, e.to_string())
}

/// Asks the leader `op` until it is not `Wait` (parked in between), feeding the machine
/// first each time; the core's wakes are delivered after every call.
async fn wait<T>(
    node: &Rc<Node>,
    host: &Rc<RefCell<Host>>,
    pid: PartitionId,
    epoch: LeaderEpoch,
    txn: TxnId,
    mut op: impl FnMut(&mut PartitionLeader, &TableMachine, crate::core::Time) -> Answer<T>,
) -> Result<T, Refusal> {
    loop {
        feed(node, host, pid)?;
        let (answer, wakes) = {
            let mut h = host.borrow_mut();
            let h = &mut *h;
            let Some(leader) = h.leader.as_mut().filter(|l| l.epoch() == epoch) else {
                return Err(aborted(&AbortReason::LeaderChanged));
            };
            let answer = op(leader, &h.machine, now());
            (answer, leader.take_wakes())
        };
        node.tables.wake(wakes);
        match answer {
            Answer::Ready(t) => return Ok(t),
            Answer::Aborted(r) => return Err(aborted(&r)),
            Answer::Wait => {
                // Asked again only under a valid lease at the same epoch; through a lease blip
                // the wait goes on (for at most BLIP_WAITS_MAX polls), once the epoch is over
                // the transaction lost what it held here.
                let mut blips = 0;
                loop {
                    node.tables.park(txn).await;
                    if node.stopping.get() {
                        return Err((ErrorCode::SHUTTING_DOWN, String::new()));
                    }
                    if internal::leading_epoch(node, pid) == Some(epoch) {
                        break;
                    }
                    blips += 1;
                    if internal::led_epoch(node, pid) != Some(epoch) || blips > BLIP_WAITS_MAX {
                        return Err(aborted(&AbortReason::LeaderChanged));
                    }
                }
            }
        }
    }
}

async fn commit(
    node: &Rc<Node>,
    host: &Rc<RefCell<Host>>,
    pid: PartitionId,
    epoch: LeaderEpoch,
    r: &TableCommitRequest,
) -> Result<TableCommitResponse, Refusal> {
    let info = info_of(&r.txn)?;
    let part = Part::from_wire(&r.record).map_err(bad)?;
    if part.txn != info.txn || part.level != info.level {
        return Err((ErrorCode::INVALID_REQUEST, "the record names another transaction or level".into()));
    }
    // The transaction was answered here before: it names a snapshot, or reads.
    let used = part.snapshot != Offset(0) || !part.reads.is_empty() || !part.ranges.is_empty();
    let answer = |outcome: u8, offset: Offset, reason: String, results: Vec<Option<BytesMut>>| TableCommitResponse {
        error: ErrorCode::NONE,
        message: String::new(),
        outcome,
        offset: offset.0,
        reason,
        results,
    };
    // Inside a log transaction (a two-phase commit) a part that reads is appended and held
    // until the marker, like one that writes (`PartitionLeader::commit_in_txn`).
    let in_txn = r.producer_id >= 0;
    let decide = |l: &mut PartitionLeader, m: &TableMachine, t| {
        if in_txn {
            l.commit_in_txn(t, m, &info, used, &part)
        } else {
            l.commit(t, m, &info, used, &part)
        }
    };
    let decision = match wait(node, host, pid, epoch, info.txn, decide).await {
        Ok(d) => d,
        Err((ErrorCode::TABLE_TXN_ABORTED, reason)) => return Ok(answer(1, Offset(0), reason, Vec::new())),
        Err(e) => return Err(e),
    };
    if decision == Decision::Nothing {
        let at = host.borrow().machine.applied();
        return Ok(answer(0, at, String::new(), Vec::new()));
    }
    let txn = (r.producer_id >= 0).then_some((ProducerId(r.producer_id), ProducerEpoch(r.producer_epoch)));
    let record_key = part.written_keys().first().map(|k| k.to_vec()).unwrap_or_default();
    let (topic, index) = (r.topic.as_str(), r.partition);
    let appended = internal::append(node, topic, index, epoch, &[(record_key, part.encode())], txn).await;
    let was_appended = appended.is_ok();
    let fed = appended.and_then(|_| feed(node, host, pid));
    let outcome = {
        let (outcome, wakes) = {
            let mut h = host.borrow_mut();
            let h = &mut *h;
            let outcome = if fed.is_ok() { h.machine.outcome(info.txn).cloned() } else { None };
            let wakes = h.leader.as_mut().filter(|l| l.epoch() == epoch).map(|l| {
                l.applied(info.txn, outcome.as_ref());
                l.take_wakes()
            });
            (outcome, wakes)
        };
        node.tables.wake(wakes.unwrap_or_default());
        outcome
    };
    match (outcome, fed) {
        (Some(Outcome::Committed { offset, results }), _) => Ok(answer(
            0,
            offset,
            String::new(),
            results.into_iter().map(|v| v.map(|v| BytesMut::from(&v[..]))).collect(),
        )),
        (Some(Outcome::Prepared { offset }), _) => Ok(answer(2, offset, String::new(), Vec::new())),
        (Some(Outcome::Aborted(reason)), _) => Ok(answer(1, Offset(0), reason.name().to_owned(), Vec::new())),
        // Appended, then the replica went (moved or deleted) before its machine applied the
        // part: the outcome is in the log, not "nothing done", which a client would retry.
        (None, Err((_, message))) if was_appended => {
            Err((ErrorCode::UNKNOWN, format!("the commit was appended but its outcome is not known here: {message}")))
        }
        (None, Err(e)) => Err(e),
        (None, Ok(_)) => Err((ErrorCode::UNKNOWN, "the commit's outcome is not known yet".into())),
    }
}

/// How long a request to a child partition waits for its seed (`table_seed`).
const SEED_WAIT_MS: u64 = 10_000;

/// Whether child partition `pid`'s seed is applied here; on its leader, waits for it (up to
/// [`SEED_WAIT_MS`]), seeding if nobody does.
async fn seeded(node: &Rc<Node>, host: &Rc<RefCell<Host>>, pid: PartitionId) -> Result<bool, Refusal> {
    let start = now();
    loop {
        feed(node, host, pid)?;
        if host.borrow().machine.seeded() {
            return Ok(true);
        }
        let Some(epoch) = internal::leading_epoch(node, pid) else { return Ok(false) };
        if now().ms_since(start) > SEED_WAIT_MS {
            return Ok(false);
        }
        super::table_seed::ensure(node, host, pid, epoch);
        compio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Keys a document index's first pass indexes per tick of a partition (a 10 ms tick: about
/// 100,000 keys a second, in steps short enough not to stall the shard).
const INDEX_BUILD_KEYS_PER_TICK: usize = 1_000;

/// Defines on `host`'s machine the document indexes the topic map names for its table (and
/// drops the others).
fn sync_indexes(node: &Node, host: &mut Host) {
    let topics = node.topics.load();
    let docs: Vec<(String, String)> = topics
        .indexes(&host.topic)
        .iter()
        .filter(|d| d.kind == IndexKind::Document)
        .map(|d| (d.name.clone(), d.field.clone()))
        .collect();
    drop(topics);
    host.machine.keep_indexes(&docs.iter().map(|(n, _)| n.clone()).collect());
    for (name, field) in &docs {
        host.machine.define_index(name, field);
    }
}

/// The rows of a document index query at the leader's latest committed offset.
fn query(node: &Rc<Node>, host: &Rc<RefCell<Host>>, r: &TableQueryRequest) -> Result<TableQueryResponse, Refusal> {
    if r.value.len() > crate::core::table::KEY_BYTES_MAX {
        return Err((ErrorCode::TOO_LARGE, format!("an index value of {} bytes", r.value.len())));
    }
    let mut h = host.borrow_mut();
    sync_indexes(node, &mut h);
    let applied = h.machine.applied();
    let at = u64::try_from(r.snapshot).map_or(applied, Offset);
    if at > applied {
        return Err((ErrorCode::NOT_CAUGHT_UP, format!("this replica applied {applied}, before {at}")));
    }
    let recheck = node.config.unsafe_index_plant != Some(crate::IndexPlant::DocumentNoRecheck);
    let found = if r.rows {
        h.machine.query_index(&r.index, &r.value, at, recheck)
    } else {
        h.machine.index_progress(&r.index).map(|_| Vec::new())
    };
    let Some(found) = found else {
        let m = format!("'{}' has no document index '{}'", shown(&h.topic), shown(&r.index));
        return Err((ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, m));
    };
    let rows = found
        .into_iter()
        .map(|(k, v, value)| TableRow {
            key: BytesMut::from(k),
            value: Some(BytesMut::from(value)),
            version: v.0 as i64,
        })
        .collect();
    let (indexed, keys) = h.machine.index_progress(&r.index).unwrap_or_default();
    Ok(TableQueryResponse { error: ErrorCode::NONE, message: String::new(), snapshot: at.0, indexed, keys, rows })
}

/// A read on a follower (or the leader) at its latest applied offset, once it applied the
/// session's `min_offset`; no leader-side state is touched.
fn follower_read(
    node: &Rc<Node>,
    host: &Rc<RefCell<Host>>,
    pid: PartitionId,
    r: &TableReadRequest,
) -> Result<TableReadResponse, Refusal> {
    feed(node, host, pid)?;
    let keys = keys_of(&r.keys)?;
    let range = r.range.as_ref().map(|r| range_of(&r.from, &r.to)).transpose().map_err(bad)?;
    let h = host.borrow();
    let applied = h.machine.applied();
    if applied.0 < r.min_offset {
        return Err((ErrorCode::NOT_CAUGHT_UP, format!("this replica applied {applied}, before {}", r.min_offset)));
    }
    let at = u64::try_from(r.snapshot).ok().map_or(applied, Offset).min(applied);
    let mut rows = Vec::new();
    for k in &keys {
        let (version, value) = match h.machine.get(k, at) {
            Some((v, value)) => (Some(v), value.map(BytesMut::from)),
            None => (None, None),
        };
        rows.push(TableRow { key: BytesMut::from(&k[..]), value, version: version_code(version) });
    }
    if let Some(range) = &range {
        for (k, v, value) in h.machine.scan(range, at) {
            rows.push(TableRow { key: BytesMut::from(k), value: Some(BytesMut::from(value)), version: v.0 as i64 });
        }
    }
    Ok(TableReadResponse { error: ErrorCode::NONE, message: String::new(), snapshot: at.0, rows })
}

/// The epoch this replica leads `pid` at, its leader-side state made for that epoch.
fn leading(node: &Node, host: &Rc<RefCell<Host>>, pid: PartitionId) -> Result<LeaderEpoch, Refusal> {
    let (topic, index) = {
        let h = host.borrow();
        (h.topic.clone(), h.index)
    };
    let epoch = match internal::coordinating(node, pid, &topic, index) {
        Ok(e) => e,
        Err((ErrorCode::COORDINATOR_LOAD_IN_PROGRESS, m)) => return Err((ErrorCode::NOT_LEADER, m)),
        Err((_, m)) => {
            // Dropped only once the epoch is over: through a lease blip the epoch's locks and
            // waits stay (rebuilt at the same epoch, the state would forget the locks of a part
            // still being appended: a lost update, simulator seed 50).
            let mut h = host.borrow_mut();
            if h.leader.as_ref().map(PartitionLeader::epoch) != internal::led_epoch(node, pid) {
                h.leader = None;
            }
            return Err((ErrorCode::NOT_LEADER, m));
        }
    };
    feed(node, host, pid)?;
    let mut h = host.borrow_mut();
    if h.leader.as_ref().map(PartitionLeader::epoch) != Some(epoch) {
        tracing::info!(topic, partition = index, epoch = epoch.0, applied = %h.machine.applied(), "leading a table partition");
        h.leader = Some(PartitionLeader::new(epoch));
    }
    Ok(epoch)
}

/// Applies the committed records of `pid` the machine has not applied yet.
fn feed(node: &Node, host: &Rc<RefCell<Host>>, pid: PartitionId) -> Result<(), Refusal> {
    let mut h = host.borrow_mut();
    let h = &mut *h;
    let read = match internal::feed_committed(node, pid, &h.topic, &mut h.machine) {
        Ok(Some(read)) => read,
        Ok(None) => return Err((ErrorCode::NOT_LEADER, "no replica here".into())),
        Err((ErrorCode::STORAGE_ERROR, m)) if h.machine.applied() > Offset(0) => {
            tracing::warn!(partition = %pid, m, "rebuilding a table partition's state from its log start");
            // The leader-side state stays: the locks and the parts still being appended at this
            // epoch are held whatever the machine is, and a table's log is never trimmed, so the
            // rebuilt machine replays the same committed records and decides alike. Dropped
            // here, `leading` would make a fresh one at the same epoch that forgets those locks
            // (the lost update of simulator seed 50); it goes only when the epoch is over.
            h.machine = TableMachine::new();
            internal::feed_committed(node, pid, &h.topic, &mut h.machine)?.unwrap_or(0)
        }
        Err(e) => return Err(e),
    };
    h.since_snapshot += read;
    if read > 0 {
        if let Some(l) = h.leader.as_mut() {
            l.decided(&h.machine);
        }
    }
    Ok(())
}

const SNAPSHOT_FILE: &str = "table.snapshot";

fn partition_dir(node: &Node, pid: PartitionId) -> PathBuf {
    node.config.data_dir.join("partitions").join(pid.0.to_string())
}

/// The host of `pid` (restored from its snapshot file at first use), if this shard has a
/// replica of it.
async fn host(node: &Rc<Node>, pid: PartitionId, topic: &str, index: u32) -> Option<Rc<RefCell<Host>>> {
    if let Some(h) = node.tables.hosts.borrow().get(&pid) {
        return Some(h.clone());
    }
    let log_end = node.st.borrow().core.replica(pid).map(|r| r.log().log_end_offset())?;
    let machine = restore(node, pid, log_end).await;
    let host = Rc::new(RefCell::new(Host { topic: topic.to_owned(), index, machine, leader: None, since_snapshot: 0 }));
    Some(node.tables.hosts.borrow_mut().entry(pid).or_insert(host).clone())
}

/// The machine of `pid` from its snapshot file (read on the blocking pool), or an empty one
/// when there is none, it is damaged, or it is past this replica's log end.
async fn restore(node: &Node, pid: PartitionId, log_end: Offset) -> TableMachine {
    let path = partition_dir(node, pid).join(SNAPSHOT_FILE);
    let bytes = match compio::runtime::spawn_blocking(move || std::fs::read(&path)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return TableMachine::new(),
        Ok(Err(e)) => {
            tracing::warn!(partition = %pid, error = %e, "reading a table snapshot failed; replaying the log");
            return TableMachine::new();
        }
        Err(_) => return TableMachine::new(),
    };
    match TableMachine::restore(&bytes) {
        Ok(m) if m.applied() <= log_end => {
            tracing::info!(partition = %pid, offset = %m.applied(), "table state restored from its snapshot");
            m
        }
        Ok(m) => {
            tracing::warn!(partition = %pid, offset = %m.applied(), %log_end, "table snapshot is past the log end; replaying the log");
            TableMachine::new()
        }
        Err(e) => {
            tracing::warn!(partition = %pid, error = %e, "table snapshot does not decode; replaying the log");
            TableMachine::new()
        }
    }
}

/// Writes the machine's snapshot on the blocking pool: a cache of the log, so a failure is
/// only logged.
fn save_snapshot(node: &Node, pid: PartitionId, machine: &TableMachine) {
    let bytes = machine.snapshot();
    let dir = partition_dir(node, pid);
    let applied = machine.applied();
    compio::runtime::spawn_blocking(move || match write_atomically(&dir, SNAPSHOT_FILE, &bytes) {
        Ok(()) => tracing::debug!(partition = %pid, %applied, bytes = bytes.len(), "table snapshot written"),
        Err(e) => tracing::warn!(partition = %pid, error = %e, "writing a table snapshot failed"),
    })
    .detach();
}

/// The partitions of every table this shard hosts: (topic, index, id).
fn hosted_tables(node: &Node) -> Vec<(String, u32, PartitionId)> {
    let topics = node.topics.load();
    let names: Vec<String> = topics.table_names();
    drop(topics);
    let mut out = Vec::new();
    for name in names {
        for (index, pid) in internal::hosted(node, &name) {
            out.push((name.clone(), index, pid));
        }
    }
    out
}

/// On every table partition this shard hosts: applies newly committed records, ends decided
/// prepared parts, expires transactions past their timeout, prunes old versions and writes
/// snapshots.
pub(super) async fn tick_loop(node: Rc<Node>) {
    loop {
        compio::time::sleep(Duration::from_millis(TICK_MS)).await;
        if node.stopping.get() {
            return;
        }
        let hosted = hosted_tables(&node);
        node.tables.hosts.borrow_mut().retain(|p, _| hosted.iter().any(|(_, _, h)| h == p));
        for (topic, index, pid) in hosted {
            let Some(host) = host(&node, pid, &topic, index).await else { continue };
            {
                let mut h = host.borrow_mut();
                if h.leader.as_ref().map(PartitionLeader::epoch) != internal::led_epoch(&node, pid) {
                    h.leader = None;
                }
            }
            if let Err((code, message)) = feed(&node, &host, pid) {
                tracing::debug!(topic, partition = index, code = code.name(), message, "applying table records failed");
                continue;
            }
            let wakes = {
                let mut h = host.borrow_mut();
                let h = &mut *h;
                let wakes = h.leader.as_mut().map(|l| {
                    l.expire(now());
                    l.decided(&h.machine);
                    l.take_wakes()
                });
                h.machine.prune_behind(h.leader.as_ref().and_then(PartitionLeader::oldest_snapshot));
                sync_indexes(&node, h);
                h.machine.build_indexes(INDEX_BUILD_KEYS_PER_TICK);
                if h.since_snapshot >= node.config.table_snapshot_records {
                    h.since_snapshot = 0;
                    save_snapshot(&node, pid, &h.machine);
                }
                wakes
            };
            node.tables.wake(wakes.unwrap_or_default());
            if let Some(epoch) = internal::leading_epoch(&node, pid) {
                if !node.topics.load().has_parents(pid) || host.borrow().machine.seeded() {
                    super::index_follower::ensure(&node, &host, pid, epoch);
                } else {
                    super::table_seed::ensure(&node, &host, pid, epoch);
                }
            }
        }
    }
}
