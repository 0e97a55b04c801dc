//! Tables on the log: a [`Table`] is a topic whose configs hold `table=true` (and
//! `table.isolation=LEVEL`), hash-partitioned by key with the producer's partitioner
//! ([`key_partition`]). A [`TableTxn`] reads, scans and buffers writes, then commits them as
//! one transaction at its isolation [`Level`] (PROTOCOL.md, "Tables").
//!
//! Every request of a transaction goes to the leader of the key's partition (TableRead,
//! TableLock, TableCommit, TableAbort); NOT_LEADER and the like refresh the metadata and retry,
//! as the producer does. Per partition the transaction keeps what its commit carries there:
//! the snapshot it was first answered at (snapshot, serializable and ssi read at it;
//! read-committed, 2pl and serial read the latest, and name it only so a new leader knows it
//! lost their locks or tracking), the keys read with the version
//! seen (first read only), the ranges scanned; writes are buffered (a read of a key this
//! transaction wrote answers from the buffer and is not recorded).
//!
//! Commit:
//! - no partition touched: committed at offset 0, nothing sent;
//! - one partition: one TableCommit without a producer (`producer_id` -1); the leader
//!   validates and appends the part and answers the outcome;
//! - several, none writing: a TableCommit without producer to each (each validates its
//!   read-only part, and releases its locks or tracking); committed when all are;
//! - several with writes: two-phase commit through the transaction coordinator. A
//!   transactional id `skein-table-<hex>` per [`Table`] handle (taken from a small pool, so
//!   concurrent transactions use different ids) joins the writing partitions
//!   (AddPartitionsToTxn), every participant gets a TableCommit carrying the producer id and
//!   epoch (its vote: 2 prepared, 0 committed for a read-only part, 1 aborted), and EndTxn
//!   commits iff every vote is yes. The offset reported is the lowest writing partition's
//!   record offset.
//!
//! Under 2pl and serial a write first takes its lock (TableLock, answered once granted),
//! and reads may wait for locks: those transactions talk to each leader on connections of
//! their own, so a request blocked at a leader never holds up another transaction's. A
//! transaction takes them from its [`Table`]'s pool of idle ones and gives them back when it
//! is dropped (a connection per transaction would cost a TCP handshake each and, at
//! thousands of transactions a second, run the machine out of ports in TIME_WAIT).
//!
//! Not done here: dropping an open [`TableTxn`] sends nothing (the leaders end it at its
//! timeout; call [`TableTxn::abort`]); a commit whose answer was lost on a single partition
//! reports the [`ClientError`] (its outcome is unknown).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use crate::conn::Connection;
use crate::consumer::ReadReplica;
use crate::partitioning::{route, KeyRange, Partitioning};
use crate::session::SessionHandle;
use crate::txn::{add_partitions, coordinator_error, txn_call};
use crate::wire::{
    ApiKey, EndTxnRequest, EndTxnResponse, ErrorCode, InitProducerIdRequest, InitProducerIdResponse, Level,
    TableAbortRequest, TableAbortResponse, TableCommitRequest, TableCommitResponse, TableLockRequest,
    TableLockResponse, TableRange, TableReadEntry, TableReadRequest, TableReadResponse, TableRecord, TableStep,
    TableWrite, TopicConfig, Wire,
};
use crate::{key_partition, Client, ClientError, TxnError};

/// The longest key a table takes (bytes).
pub const KEY_BYTES_MAX: usize = 1024;
/// The largest value a table takes (bytes).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// The table record format version written.
pub const RECORD_VERSION: u8 = 1;
/// The topic config marking a topic as a table (`true`).
pub const TABLE_CONFIG: &str = "table";
/// The topic config naming a table's default isolation level.
pub const ISOLATION_CONFIG: &str = "table.isolation";
/// A transaction's timeout unless set otherwise.
pub const DEFAULT_TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// A key.
pub type Key = Vec<u8>;
/// A value.
pub type Value = Vec<u8>;

/// Why a table call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The transaction was aborted; the reason word (user, stale-read, phantom,
    /// write-conflict, prepared-conflict, dangerous-structure, wounded, timeout,
    /// leader-changed, other-partition, snapshot-too-old). It is over: begin a new one.
    #[error("aborted {0}")]
    Aborted(String),
    /// A key longer than [`KEY_BYTES_MAX`]; nothing changed.
    #[error("key of {0} bytes is longer than the {KEY_BYTES_MAX} allowed")]
    KeyTooLarge(usize),
    /// A value larger than [`VALUE_BYTES_MAX`]; nothing changed.
    #[error("value of {0} bytes is larger than the {VALUE_BYTES_MAX} allowed")]
    ValueTooLarge(usize),
    /// The topic is not a table.
    #[error("{0} is not a table")]
    NotATable(String),
    /// The transaction committed or aborted already.
    #[error("the transaction has ended")]
    Ended,
    /// Talking to the cluster failed (after retries).
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The call does not make sense (its arguments, the table's configs).
    #[error("{0}")]
    Invalid(String),
}

/// A committed transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Its record's offset (the lowest writing partition's, for a multi-partition
    /// transaction; the log's end for a read-only one; 0 when it touched nothing).
    pub offset: u64,
}

/// A procedure that ran ([`Table::run`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// Its record's offset.
    pub offset: u64,
    /// One result per step (see [`Step`]).
    pub results: Vec<Option<Value>>,
}

/// One step of a deterministic procedure ([`Table::run`], serial execution): every replica
/// runs it at the record's log position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Sets `key`; the result is the value.
    Put {
        /// Key.
        key: Key,
        /// Value.
        value: Value,
    },
    /// Deletes `key`.
    Delete {
        /// Key.
        key: Key,
    },
    /// Sets `key` to `value` (None: deletes) if it holds `expect` (None: absent); the result
    /// is the value found.
    CompareAndSet {
        /// Key.
        key: Key,
        /// The value it must hold (None: absent).
        expect: Option<Value>,
        /// The new value (None: delete).
        value: Option<Value>,
    },
    /// Adds `amount` to the decimal integer at `key` (absent: 0); the result is the new value.
    Increment {
        /// Key.
        key: Key,
        /// Added.
        amount: i64,
    },
    /// Moves `amount` from `from` to `to` when `from` holds at least `amount`; the result is
    /// `from`'s new value, or None when nothing moved.
    Transfer {
        /// Debited key.
        from: Key,
        /// Credited key.
        to: Key,
        /// Amount.
        amount: i64,
    },
    /// Appends `value` to the comma-separated list at `key`; the result is the new list.
    Append {
        /// Key.
        key: Key,
        /// Appended item.
        value: Value,
    },
}

impl Step {
    /// The keys it touches.
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Step::Put { key, .. }
            | Step::Delete { key }
            | Step::CompareAndSet { key, .. }
            | Step::Increment { key, .. }
            | Step::Append { key, .. } => vec![key],
            Step::Transfer { from, to, .. } => vec![from, to],
        }
    }

    /// The values it carries.
    fn values(&self) -> Vec<&[u8]> {
        match self {
            Step::Put { value, .. } | Step::Append { value, .. } => vec![value],
            Step::CompareAndSet { expect, value, .. } => expect.iter().chain(value.iter()).map(Vec::as_slice).collect(),
            Step::Delete { .. } | Step::Increment { .. } | Step::Transfer { .. } => vec![],
        }
    }

    /// Its wire form.
    pub fn to_wire(&self) -> TableStep {
        let b = |v: &[u8]| BytesMut::from(v);
        let step = |kind, key: &[u8]| TableStep {
            kind,
            key: b(key),
            key2: BytesMut::new(),
            value: None,
            expect: None,
            amount: 0,
        };
        match self {
            Step::Put { key, value } => TableStep { value: Some(b(value)), ..step(0, key) },
            Step::Delete { key } => step(1, key),
            Step::CompareAndSet { key, expect, value } => {
                TableStep { expect: expect.as_deref().map(b), value: value.as_deref().map(b), ..step(2, key) }
            }
            Step::Increment { key, amount } => TableStep { amount: *amount, ..step(3, key) },
            Step::Transfer { from, to, amount } => TableStep { key2: b(to), amount: *amount, ..step(4, from) },
            Step::Append { key, value } => TableStep { value: Some(b(value)), ..step(5, key) },
        }
    }
}

impl Client {
    /// Creates a table: a topic with `table=true` and, when given, `table.isolation=LEVEL`
    /// (the default level of its transactions; serializable when not set).
    pub async fn create_table(
        &self,
        name: &str,
        partitions: u32,
        replicas: u16,
        level: Option<Level>,
    ) -> Result<(), ClientError> {
        self.create_table_with(name, partitions, replicas, Partitioning::Hash, level).await
    }

    /// Creates a table with a partitioning scheme: `hash`, or `hash-range` / `key-range`
    /// (partitions owning ranges of the key hash or of the keys; a key-range table's scans
    /// read only the partitions their range overlaps).
    pub async fn create_table_with(
        &self,
        name: &str,
        partitions: u32,
        replicas: u16,
        partitioning: Partitioning,
        level: Option<Level>,
    ) -> Result<(), ClientError> {
        self.create_topic_with(name, partitions, replicas, partitioning, &table_configs(level)).await
    }

    /// A handle to table `name` (its partition count and configured level, from Metadata
    /// and DescribeTopics). A topic that is not a table: [`TableError::NotATable`].
    pub async fn table(&self, name: &str) -> Result<Table, TableError> {
        let description = self.describe_topic(name).await?;
        let level = match table_level(&description.configs) {
            Err(e) => return Err(TableError::Invalid(format!("table {name}: {e}"))),
            Ok(None) => return Err(TableError::NotATable(name.to_owned())),
            Ok(Some(level)) => level,
        };
        let md = self.topic_metadata(name).await?;
        let partitions = md.partitions.len() as u32;
        let routes = Partitioning::from_wire(md.partitioning)
            .filter(|s| s.ranged())
            .map(|scheme| (scheme, crate::partitioning::open_ranges(&md)));
        Ok(Table {
            inner: Rc::new(TableInner {
                client: self.clone(),
                name: name.to_owned(),
                partitions: std::cell::Cell::new(partitions),
                routes: RefCell::new(routes),
                stale: std::cell::Cell::new(false),
                level,
                timeout: std::cell::Cell::new(DEFAULT_TXN_TIMEOUT),
                coordinators: RefCell::default(),
                idle_conns: RefCell::default(),
                session: RefCell::default(),
                rack: RefCell::default(),
            }),
        })
    }
}

/// The configs of a new table.
pub fn table_configs(level: Option<Level>) -> Vec<(String, String)> {
    let mut configs = vec![(TABLE_CONFIG.to_owned(), "true".to_owned())];
    if let Some(level) = level {
        configs.push((ISOLATION_CONFIG.to_owned(), level.name().to_owned()));
    }
    configs
}

/// What a topic's configs say: `Ok(None)` not a table, `Ok(Some(level))` a table with its
/// configured level (None: not set); an unknown level name is an error.
pub fn table_level(configs: &[TopicConfig]) -> Result<Option<Option<Level>>, String> {
    let get = |k: &str| configs.iter().rev().find(|c| c.key == k).map(|c| c.value.as_str());
    if get(TABLE_CONFIG) != Some("true") {
        return Ok(None);
    }
    match get(ISOLATION_CONFIG) {
        None | Some("") => Ok(Some(None)),
        Some(name) => match Level::parse(name) {
            Some(level) => Ok(Some(Some(level))),
            None => Err(format!("unknown isolation level {name}")),
        },
    }
}

/// A table: clones share the handle (and its pool of transactional ids).
#[derive(Clone)]
pub struct Table {
    inner: Rc<TableInner>,
}

struct TableInner {
    client: Client,
    name: String,
    partitions: std::cell::Cell<u32>,
    /// A ranged table's scheme and open partitions by range (None: hash-partitioned).
    routes: RefCell<Option<Routes>>,
    /// A transaction found a partition sealed: the next one looks the partitions up again.
    stale: std::cell::Cell<bool>,
    level: Option<Level>,
    timeout: std::cell::Cell<Duration>,
    /// Transactional ids (with their producer id and epoch) free for a two-phase commit.
    coordinators: RefCell<Vec<TxnCoordinator>>,
    /// Idle connections of ended 2pl and serial transactions, by node id.
    idle_conns: RefCell<HashMap<u32, Vec<Rc<Connection>>>>,
    /// The session its single-partition commits are noted in and its replica reads wait for.
    session: RefCell<Option<SessionHandle>>,
    /// The rack replica reads prefer with [`ReadReplica::Closest`].
    rack: RefCell<Option<String>>,
}

/// The abort reason of a transaction that used a partition a split or merge sealed.
const SEALED: &str = "partition-sealed";

/// How many times [`Table::get`], `put`, `delete` and `scan` begin again after their
/// partition was sealed.
pub const SEALED_RETRIES: u32 = 3;

/// Whether `e` is an abort for a sealed partition.
fn sealed(e: &TableError) -> bool {
    matches!(e, TableError::Aborted(r) if r == SEALED)
}

/// A ranged table's scheme and its open partitions sorted by range.
type Routes = (Partitioning, Vec<(KeyRange, u32)>);

/// Most idle connections a [`Table`] keeps per node.
const IDLE_CONNS_MAX: usize = 64;

/// A transactional id registered with its coordinator, between two-phase commits.
struct TxnCoordinator {
    id: String,
    identity: (i64, i16),
}

impl Table {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its partition count.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions.get()
    }

    /// The level its configs name, if any.
    pub fn configured_level(&self) -> Option<Level> {
        self.inner.level
    }

    /// The level of its transactions unless told otherwise: the configured one, else
    /// serializable.
    pub fn level(&self) -> Level {
        self.inner.level.unwrap_or(Level::Serializable)
    }

    /// The partition holding `key`.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        match &*self.inner.routes.borrow() {
            None => key_partition(key, self.inner.partitions.get()),
            Some((scheme, parts)) => route(*scheme, parts, key),
        }
    }

    /// How its keys map to partitions.
    pub fn partitioning(&self) -> Partitioning {
        self.inner.routes.borrow().as_ref().map_or(Partitioning::Hash, |(s, _)| *s)
    }

    /// The partitions a scan of `[from, to)` (empty `to`: to the end) reads: every one of
    /// a hash or hash-range table, only those whose ranges overlap it in a key-range table.
    pub fn scan_partitions(&self, from: &[u8], to: &[u8]) -> Vec<u32> {
        match &*self.inner.routes.borrow() {
            None => (0..self.inner.partitions.get()).collect(),
            Some((Partitioning::KeyRange, parts)) => {
                let mut ps: Vec<u32> = parts
                    .iter()
                    .filter(|(r, _)| {
                        (to.is_empty() || r.from.as_slice() < to) && r.to.as_deref().is_none_or(|t| from < t)
                    })
                    .map(|(_, p)| *p)
                    .collect();
                ps.sort_unstable();
                ps
            }
            Some((_, parts)) => {
                let mut ps: Vec<u32> = parts.iter().map(|(_, p)| *p).collect();
                ps.sort_unstable();
                ps
            }
        }
    }

    /// The timeout of transactions begun from now on (default 60 s).
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner.timeout.set(timeout);
    }

    /// Starts a transaction (nothing is sent yet) at `level`, else the table's level.
    pub fn begin(&self, level: Option<Level>) -> TableTxn {
        let begin_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        TableTxn {
            table: self.clone(),
            id: next_txn_id(),
            level: level.unwrap_or_else(|| self.level()),
            begin_us,
            started: Instant::now(),
            timeout: self.inner.timeout.get(),
            state: State::Open,
            parts: BTreeMap::new(),
            writes: BTreeMap::new(),
            conns: RefCell::default(),
        }
    }

    /// Notes in `session` what this handle commits in one partition (transactions and
    /// procedures: the partition's end after the commit), and makes [`Table::get_from`] wait
    /// for the session's tokens: read-your-writes and monotonic reads across replicas. A
    /// transaction over several partitions becomes visible at its markers, whose offsets
    /// the client does not learn: it is not noted.
    pub fn set_session(&self, session: Option<SessionHandle>) {
        *self.inner.session.borrow_mut() = session;
    }

    /// The rack [`ReadReplica::Closest`] prefers (the broker's `--rack`).
    pub fn set_rack(&self, rack: Option<String>) {
        *self.inner.rack.borrow_mut() = rack;
    }

    fn note_commit(&self, partition: u32, offset: u64) {
        if let Some(s) = self.inner.session.borrow().as_ref() {
            let epoch = self.inner.client.cached_leader_epoch(&self.inner.name, partition);
            s.borrow_mut().note_write(&self.inner.name, partition, offset + 1, epoch);
        }
    }

    /// Reads `key` outside any transaction from the replica `replica` picks among the
    /// partition's in-sync replicas (a follower, or the leader), at the newest offset that
    /// replica applied: read committed, possibly older than the leader's. With a session
    /// ([`Table::set_session`]) the replica answers only once it applied the session's
    /// token for the partition, and the token rises to what was read; a replica still
    /// behind after a few tries is left for the leader.
    pub async fn get_from(&self, key: &[u8], replica: ReadReplica) -> Result<Option<Value>, TableError> {
        check_key(key)?;
        let client = &self.inner.client;
        let name = self.inner.name.as_str();
        let p = self.partition_of(key);
        let timeout = client.config().request_timeout;
        let deadline = Instant::now() + timeout;
        let mut to_leader = replica == ReadReplica::Leader;
        let mut attempt = 0;
        loop {
            let token = self.inner.session.borrow().as_ref().and_then(|s| s.borrow().token(name, p));
            let answer = async {
                let leader = client.leader(name, p).await?;
                let node = if to_leader {
                    leader
                } else {
                    let isr = client.cached_isr(name, p).unwrap_or_default();
                    let rack = self.inner.rack.borrow().clone();
                    crate::consumer::read_replica(replica, leader, &isr, |n| {
                        rack.is_some() && client.broker_rack(n) == rack
                    })
                };
                let req = TableReadRequest {
                    txn: crate::wire::TableTxn {
                        txn: next_txn_id(),
                        level: Level::ReadCommitted.code(),
                        begin_us: 0,
                        timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
                    },
                    topic: name.to_owned(),
                    partition: p,
                    snapshot: -1,
                    min_offset: token.map_or(0, |t| t.min_high_watermark),
                    follower: true,
                    keys: vec![BytesMut::from(key)],
                    range: None,
                };
                let conn = client.node_connection(node).await?;
                let resp: TableReadResponse = conn.call_for(ApiKey::TableRead, &req, timeout).await?;
                check_status(&resp, name, p).map(|()| resp)
            };
            match answer.await {
                Ok(resp) => {
                    if let Some(s) = self.inner.session.borrow().as_ref() {
                        s.borrow_mut().note_read(name, p, resp.snapshot, token.map_or(0, |t| t.min_leader_epoch));
                    }
                    return Ok(resp.rows.into_iter().next().and_then(|r| r.value).map(|v| v.to_vec()));
                }
                Err(e) if attempt < RETRIES && Instant::now() + BACKOFF < deadline => {
                    let lagging = matches!(e, ClientError::Broker(ErrorCode::NOT_CAUGHT_UP, _));
                    if !(lagging || e.is_retriable() || e.refreshes_metadata()) {
                        return Err(plain_error(name, e));
                    }
                    if e.refreshes_metadata() {
                        client.invalidate_metadata(name);
                    }
                    attempt += 1;
                    // A follower behind the session twice: the leader has applied it.
                    to_leader |= lagging && attempt >= 2;
                    compio::time::sleep(BACKOFF * attempt).await;
                }
                Err(e) => return Err(plain_error(name, e)),
            }
        }
    }

    /// Runs `op` in a transaction of its own at the table's level and commits it; begun
    /// again, up to [`SEALED_RETRIES`] times, when a split or merge sealed a partition it
    /// used first (nothing of it was written there).
    async fn on_its_own<T>(
        &self,
        mut op: impl AsyncFnMut(&mut TableTxn) -> Result<T, TableError>,
    ) -> Result<(T, Committed), TableError> {
        let mut attempt = 0;
        loop {
            let mut txn = self.begin(None);
            let done = op(&mut txn).await;
            match txn.finish(done).await {
                Err(e) if sealed(&e) && attempt < SEALED_RETRIES => attempt += 1,
                r => return r,
            }
        }
    }

    /// Reads `key` in a transaction of its own.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Value>, TableError> {
        self.on_its_own(async |t| t.get(key).await).await.map(|(v, _)| v)
    }

    /// Writes `key` in a transaction of its own.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Committed, TableError> {
        self.on_its_own(async |t| t.put(key, value).await).await.map(|((), c)| c)
    }

    /// Deletes `key` in a transaction of its own.
    pub async fn delete(&self, key: &[u8]) -> Result<Committed, TableError> {
        self.on_its_own(async |t| t.delete(key).await).await.map(|((), c)| c)
    }

    /// The rows of `[from, to)` (empty `to`: to the end) in a transaction of its own.
    pub async fn scan(&self, from: &[u8], to: &[u8]) -> Result<Vec<(Key, Value)>, TableError> {
        self.on_its_own(async |t| t.scan(from, to).await).await.map(|(rows, _)| rows)
    }

    /// Every row of partition `partition` at offset `at` of it, as its leader's committed
    /// state holds them there (a sealed partition's too, up to its seal: what a split's or
    /// merge's children start from). The leader must have applied `at` (`NOT_CAUGHT_UP`,
    /// retried, otherwise).
    pub async fn rows_at(&self, partition: u32, at: u64) -> Result<Vec<(Key, Value)>, TableError> {
        self.begin(Some(Level::ReadCommitted)).read_at(partition, at).await
    }

    /// Looks up the table's partitions again (after a split or merge).
    pub async fn refresh(&self) -> Result<(), TableError> {
        let client = &self.inner.client;
        client.invalidate_metadata(&self.inner.name);
        let md = client.topic_metadata(&self.inner.name).await?;
        self.inner.partitions.set(md.partitions.len() as u32);
        *self.inner.routes.borrow_mut() = Partitioning::from_wire(md.partitioning)
            .filter(|s| s.ranged())
            .map(|scheme| (scheme, crate::partitioning::open_ranges(&md)));
        self.inner.stale.set(false);
        Ok(())
    }

    /// Runs a deterministic procedure (serial execution): one record of `steps`, run by every
    /// replica at its log position; never aborts on conflict. Every key must be in one
    /// partition.
    pub async fn run(&self, steps: Vec<Step>) -> Result<RunResult, TableError> {
        let partition = procedure_partition(&steps, |k| self.partition_of(k))?;
        let txn = self.begin(Some(Level::Serial));
        let record = TableRecord {
            version: RECORD_VERSION,
            txn: txn.id,
            level: Level::Serial.code(),
            snapshot: 0,
            reads: vec![],
            ranges: vec![],
            writes: vec![],
            steps: steps.iter().map(Step::to_wire).collect(),
        };
        let req = TableCommitRequest {
            txn: txn.wire_txn(),
            topic: self.inner.name.clone(),
            partition,
            producer_id: -1,
            producer_epoch: -1,
            record,
        };
        let resp: TableCommitResponse = match txn.call(partition, ApiKey::TableCommit, &req, Retry::Commit).await {
            Ok(resp) => resp,
            Err(e) => return Err(plain_error(&self.inner.name, e)),
        };
        match resp.outcome {
            OUTCOME_COMMITTED => Ok(RunResult {
                offset: {
                    self.note_commit(partition, resp.offset);
                    resp.offset
                },
                results: resp.results.into_iter().map(|r| r.map(|v| v.to_vec())).collect(),
            }),
            OUTCOME_ABORTED => Err(TableError::Aborted(reason_word(&resp.reason))),
            other => Err(ClientError::Protocol(format!("TableCommit outcome {other} for a procedure")).into()),
        }
    }
}

/// The partition every key of a procedure is in, after checking its sizes.
pub fn procedure_partition(steps: &[Step], partition_of: impl Fn(&[u8]) -> u32) -> Result<u32, TableError> {
    let mut partition = None;
    for step in steps {
        for key in step.keys() {
            check_key(key)?;
            let p = partition_of(key);
            match partition {
                Some(q) if q != p => {
                    return Err(TableError::Invalid(format!(
                        "a procedure runs in one partition: its keys are in partitions {q} and {p}"
                    )))
                }
                _ => partition = Some(p),
            }
        }
        for value in step.values() {
            check_value(value)?;
        }
    }
    partition.ok_or_else(|| TableError::Invalid("a procedure needs at least one step".into()))
}

/// Where a transaction is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Open,
    Committed(u64),
    Aborted(String),
    /// Its commit's outcome is not known (the answer was lost).
    Unknown,
}

/// What a transaction did in one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartState {
    /// The snapshot first answered (snapshot, serializable and ssi read at it).
    pub snapshot: Option<u64>,
    /// Keys read and the version seen (-1: absent), first read only.
    pub reads: BTreeMap<Key, i64>,
    /// Ranges scanned `[from, to)` (empty `to`: unbounded).
    pub ranges: Vec<(Key, Key)>,
    /// Keys locked (2pl).
    pub locked: BTreeSet<Key>,
    /// Holds the partition's turn (serial).
    pub turn: bool,
}

/// How a request may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Reads, locks, aborts: any retriable failure.
    Idempotent,
    /// Commits: only answers that say nothing was done.
    Commit,
}

/// One transaction on a table (see the module documentation). Calls take `&mut self`: one
/// operation at a time.
pub struct TableTxn {
    table: Table,
    id: u64,
    level: Level,
    begin_us: u64,
    started: Instant,
    timeout: Duration,
    state: State,
    parts: BTreeMap<u32, PartState>,
    /// Buffered writes (None: delete), by key.
    writes: BTreeMap<Key, Option<Value>>,
    /// Connections of its own by node id (2pl and serial: requests that may block).
    conns: RefCell<HashMap<u32, Rc<Connection>>>,
}

impl TableTxn {
    /// Its id (unique per process and transaction).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its isolation level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Its start, microseconds of wall time (its wound-wait priority: older wins).
    pub fn begin_us(&self) -> u64 {
        self.begin_us
    }

    /// Sets its timeout (default: the table's, 60 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether it is still open (not committed, aborted or lost).
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// The partitions it touched so far.
    pub fn participants(&self) -> Vec<u32> {
        participants(&self.parts, &self.writes, |k| self.table.partition_of(k))
    }

    /// Reads `key`: its own buffered write if any, else the partition's answer at its
    /// snapshot.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Value>, TableError> {
        check_key(key)?;
        self.check().await?;
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        let p = self.table.partition_of(key);
        let req = self.read_request(p, vec![BytesMut::from(key)], None);
        self.parts.entry(p).or_default();
        let resp: TableReadResponse = match self.call(p, ApiKey::TableRead, &req, Retry::Idempotent).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.failed(e).await),
        };
        let Some(row) = resp.rows.into_iter().next() else {
            return Err(ClientError::Protocol("TableRead answered no row for the key".into()).into());
        };
        let part = self.parts.entry(p).or_default();
        note_snapshot(part, self.level, resp.snapshot);
        part.reads.entry(key.to_vec()).or_insert(row.version);
        Ok(row.value.map(|v| v.to_vec()))
    }

    /// Reads several keys at once: one TableRead per partition, all sent together, so a
    /// transaction reading two accounts pays one round trip; the values in `keys`' order
    /// (a key it wrote: its own write).
    pub async fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Value>>, TableError> {
        for k in keys {
            check_key(k)?;
        }
        self.check().await?;
        let mut out: Vec<Option<Option<Value>>> = keys.iter().map(|k| self.writes.get(*k).cloned()).collect();
        let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            if out[i].is_none() {
                by_partition.entry(self.table.partition_of(k)).or_default().push(i);
            }
        }
        for p in by_partition.keys() {
            self.parts.entry(*p).or_default();
        }
        let this = &*self;
        let asks = by_partition.iter().map(|(&p, index)| {
            let req = this.read_request(p, index.iter().map(|&i| BytesMut::from(keys[i])).collect(), None);
            async move { (p, this.call::<_, TableReadResponse>(p, ApiKey::TableRead, &req, Retry::Idempotent).await) }
        });
        let answers = futures_util::future::join_all(asks).await;
        for (p, answer) in answers {
            let resp = match answer {
                Ok(resp) => resp,
                Err(e) => return Err(self.failed(e).await),
            };
            let index = &by_partition[&p];
            if resp.rows.len() < index.len() {
                return Err(ClientError::Protocol("TableRead answered fewer rows than keys".into()).into());
            }
            let part = self.parts.entry(p).or_default();
            note_snapshot(part, self.level, resp.snapshot);
            for (&i, row) in index.iter().zip(resp.rows) {
                part.reads.entry(keys[i].to_vec()).or_insert(row.version);
                out[i] = Some(row.value.map(|v| v.to_vec()));
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }

    /// Buffers a write of `key` (under 2pl and serial after taking its lock).
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), TableError> {
        check_value(value)?;
        self.write(key, Some(value)).await
    }

    /// Buffers a delete of `key` (under 2pl and serial after taking its lock).
    pub async fn delete(&mut self, key: &[u8]) -> Result<(), TableError> {
        self.write(key, None).await
    }

    /// The rows of `[from, to)` (empty `to`: to the end) in key order, from every partition,
    /// with this transaction's own writes laid over them.
    pub async fn scan(&mut self, from: &[u8], to: &[u8]) -> Result<Vec<(Key, Value)>, TableError> {
        check_key(from)?;
        check_key(to)?;
        self.check().await?;
        let range = TableRange { from: BytesMut::from(from), to: BytesMut::from(to) };
        let partitions = self.table.scan_partitions(from, to);
        for &p in &partitions {
            self.parts.entry(p).or_default();
        }
        let answers = {
            let this = &*self;
            let asks = partitions.iter().map(|&p| {
                let req = this.read_request(p, vec![], Some(range.clone()));
                async move { this.call::<_, TableReadResponse>(p, ApiKey::TableRead, &req, Retry::Idempotent).await }
            });
            futures_util::future::join_all(asks).await
        };
        let mut per_partition = Vec::with_capacity(answers.len());
        let mut answered = Vec::with_capacity(answers.len());
        for (p, answer) in partitions.iter().zip(answers) {
            match answer {
                Ok(resp) => answered.push((*p, resp)),
                Err(e) => return Err(self.failed(e).await),
            }
        }
        for (p, resp) in answered {
            let part = self.parts.entry(p).or_default();
            note_snapshot(part, self.level, resp.snapshot);
            part.ranges.push((from.to_vec(), to.to_vec()));
            per_partition.push(
                resp.rows.into_iter().filter_map(|r| Some((r.key.to_vec(), r.value?.to_vec()))).collect::<Vec<_>>(),
            );
        }
        Ok(overlay(merge_rows(per_partition), &self.writes, from, to))
    }

    /// Commits: see the module documentation. [`TableError::Aborted`] says why it did not.
    pub async fn commit(&mut self) -> Result<Committed, TableError> {
        self.check().await?;
        let plan = plan_parts(self.id, self.level, &self.parts, &self.writes, |k| self.table.partition_of(k));
        let writers = plan.iter().filter(|p| !p.record.writes.is_empty()).count();
        match (plan.len(), writers) {
            (0, _) => {
                self.state = State::Committed(0);
                Ok(Committed { offset: 0 })
            }
            (1, _) => match plan.into_iter().next() {
                Some(part) => self.commit_single(part).await,
                None => Err(TableError::Ended),
            },
            (_, 0) => self.commit_read_only(plan).await,
            _ => self.commit_two_phase(plan).await,
        }
    }

    /// Aborts: every partition it touched is told (its locks and tracking released).
    pub async fn abort(&mut self) -> Result<(), TableError> {
        if self.state != State::Open {
            return Err(TableError::Ended);
        }
        self.abort_everywhere().await;
        self.state = State::Aborted("user".into());
        Ok(())
    }

    /// Commits after an autocommit step that worked, else aborts.
    async fn finish<T>(&mut self, step: Result<T, TableError>) -> Result<(T, Committed), TableError> {
        match step {
            Ok(v) => Ok((v, self.commit().await?)),
            Err(e) => {
                if self.is_open() {
                    let _ = self.abort().await;
                }
                Err(e)
            }
        }
    }

    async fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), TableError> {
        check_key(key)?;
        self.check().await?;
        let p = self.table.partition_of(key);
        let part = self.parts.entry(p).or_default();
        let needs_lock = match self.level {
            Level::TwoPl => !part.locked.contains(key),
            Level::Serial => !part.turn,
            _ => false,
        };
        let needs_snapshot = matches!(self.level, Level::Snapshot | Level::Ssi) && part.snapshot.is_none();
        let read_at = part.snapshot.map_or(-1, |s| s as i64);
        if needs_lock {
            let req = TableLockRequest {
                txn: self.wire_txn(),
                topic: self.table.name().to_owned(),
                partition: p,
                keys: vec![BytesMut::from(key)],
                snapshot: read_at,
            };
            if let Err(e) = self.call::<_, TableLockResponse>(p, ApiKey::TableLock, &req, Retry::Idempotent).await {
                return Err(self.failed(e).await);
            }
            let part = self.parts.entry(p).or_default();
            part.locked.insert(key.to_vec());
            part.turn = true;
        }
        if needs_snapshot {
            // A write conflicts with versions at or after the partition's snapshot: a
            // partition only written takes one now.
            let req = self.read_request(p, vec![], None);
            match self.call::<_, TableReadResponse>(p, ApiKey::TableRead, &req, Retry::Idempotent).await {
                Ok(resp) => note_snapshot(self.parts.entry(p).or_default(), self.level, resp.snapshot),
                Err(e) => return Err(self.failed(e).await),
            }
        }
        self.writes.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        Ok(())
    }

    async fn commit_single(&mut self, part: PlannedPart) -> Result<Committed, TableError> {
        let partition = part.partition;
        // A part that writes nothing is answered without a record, at the partition's next
        // offset: no write for the session to wait for (its reads are noted already).
        let writes = !part.record.writes.is_empty() || !part.record.steps.is_empty();
        let req = self.commit_request(partition, part.record, (-1, -1));
        let resp: TableCommitResponse = match self.call(partition, ApiKey::TableCommit, &req, Retry::Commit).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.commit_failed(e).await),
        };
        match resp.outcome {
            OUTCOME_COMMITTED => {
                self.state = State::Committed(resp.offset);
                if writes {
                    self.table.note_commit(partition, resp.offset);
                }
                Ok(Committed { offset: resp.offset })
            }
            OUTCOME_ABORTED => Err(self.ended_aborted(&reason_word(&resp.reason))),
            other => {
                self.state = State::Unknown;
                Err(ClientError::Protocol(format!("TableCommit outcome {other} without a producer")).into())
            }
        }
    }

    async fn commit_read_only(&mut self, plan: Vec<PlannedPart>) -> Result<Committed, TableError> {
        let votes = self.collect_votes(plan, (-1, -1)).await;
        match decide(&votes) {
            Decision::Commit => {
                let offset = votes.iter().find_map(|(_, v)| v.offset()).unwrap_or(0);
                self.state = State::Committed(offset);
                Ok(Committed { offset })
            }
            Decision::Abort(no) => {
                self.abort_failed_voters(&votes).await;
                Err(self.ended_with(no))
            }
        }
    }

    async fn commit_two_phase(&mut self, plan: Vec<PlannedPart>) -> Result<Committed, TableError> {
        let client = self.table.inner.client.clone();
        let bound = client.config().request_timeout;
        let coordinator = match self.table.coordinator(self.timeout).await {
            Ok(c) => c,
            Err(e) => {
                self.abort_everywhere().await;
                self.state = State::Aborted("other-partition".into());
                return Err(TableError::Client(e.client_error().clone()));
            }
        };
        // Every part that writes or reads joins the log transaction: a part that only reads
        // is appended too and held (prepared) until the marker, so nothing it read can be
        // overwritten before the other partitions' parts commit (a write skew across
        // partitions otherwise: simulator seed 12 of `skein-sim --tables`).
        let joined: Vec<(String, u32)> = plan
            .iter()
            .filter(|p| !p.record.writes.is_empty() || !p.record.reads.is_empty() || !p.record.ranges.is_empty())
            .map(|p| (self.table.name().to_owned(), p.partition))
            .collect();
        let added = add_partitions(&client, &coordinator.id, coordinator.identity, joined, bound).await;
        if let Some((_, Err(e))) = added.into_iter().find(|(_, r)| r.is_err()) {
            self.abort_everywhere().await;
            self.end_coordinator(coordinator, false).await.ok();
            if matches!(e, ClientError::Broker(ErrorCode::PARTITION_SEALED, _)) {
                return Err(self.ended_aborted(SEALED));
            }
            self.state = State::Aborted("other-partition".into());
            return Err(TableError::Client(e));
        }
        let votes = self.collect_votes(plan, coordinator.identity).await;
        let decision = decide(&votes);
        let commit = decision == Decision::Commit;
        let ended = self.end_coordinator(coordinator, commit).await;
        match (decision, ended) {
            (Decision::Commit, Ok(())) => {
                let offset = votes.iter().find(|(_, v)| matches!(v, Vote::Prepared(_))).and_then(|(_, v)| v.offset());
                let offset = offset.unwrap_or(0);
                self.state = State::Committed(offset);
                Ok(Committed { offset })
            }
            (Decision::Commit, Err(e)) => {
                if matches!(e, TxnError::Fenced(_)) {
                    // The coordinator aborted the transaction (its timeout) and fenced the id.
                    return Err(self.ended_aborted("timeout"));
                }
                self.state = State::Unknown;
                Err(TableError::Client(e.client_error().clone()))
            }
            (Decision::Abort(no), _) => {
                self.abort_failed_voters(&votes).await;
                Err(self.ended_with(no))
            }
        }
    }

    /// TableCommit of every planned part at once (with `producer` (-1, -1): none); the
    /// votes in partition order.
    async fn collect_votes(&self, plan: Vec<PlannedPart>, producer: (i64, i16)) -> Vec<(u32, Vote)> {
        let asks = plan.into_iter().map(|p| {
            let req = self.commit_request(p.partition, p.record, producer);
            async move {
                let answer = self.call::<_, TableCommitResponse>(p.partition, ApiKey::TableCommit, &req, Retry::Commit);
                (p.partition, vote_of(answer.await))
            }
        });
        futures_util::future::join_all(asks).await
    }

    /// TableAbort to the participants whose vote failed (the others decided already).
    async fn abort_failed_voters(&self, votes: &[(u32, Vote)]) {
        let failed: Vec<u32> = votes.iter().filter(|(_, v)| matches!(v, Vote::Failed(_))).map(|(p, _)| *p).collect();
        self.abort_partitions(&failed).await;
    }

    async fn end_coordinator(&self, mut coordinator: TxnCoordinator, commit: bool) -> Result<(), TxnError> {
        let client = &self.table.inner.client;
        let (producer_id, producer_epoch) = coordinator.identity;
        let req = EndTxnRequest { transactional_id: coordinator.id.clone(), producer_id, producer_epoch, commit };
        let bound = client.config().request_timeout;
        let resp: EndTxnResponse =
            txn_call(client, &coordinator.id, bound, ApiKey::EndTxn, &req).await.map_err(coordinator_error)?;
        coordinator.identity = (resp.producer_id, resp.producer_epoch);
        self.table.inner.coordinators.borrow_mut().push(coordinator);
        Ok(())
    }

    /// Open, and within its timeout (else aborted everywhere: `timeout`).
    async fn check(&mut self) -> Result<(), TableError> {
        if self.state != State::Open {
            return Err(TableError::Ended);
        }
        // A transaction before its first request routes by the partitions as they are now.
        if self.table.inner.stale.get() && self.parts.is_empty() && self.writes.is_empty() {
            self.table.refresh().await?;
        }
        if self.started.elapsed() > self.timeout {
            return Err(self.fail("timeout").await);
        }
        Ok(())
    }

    /// Aborts everywhere for `reason`.
    async fn fail(&mut self, reason: &str) -> TableError {
        self.abort_everywhere().await;
        self.ended_aborted(reason)
    }

    fn ended_aborted(&mut self, reason: &str) -> TableError {
        if reason == SEALED {
            self.table.inner.stale.set(true);
        }
        self.state = State::Aborted(reason.to_owned());
        TableError::Aborted(reason.to_owned())
    }

    fn ended_with(&mut self, no: NoVote) -> TableError {
        match no {
            NoVote::Reason(r) => self.ended_aborted(&r),
            NoVote::Error(e) => {
                self.state = State::Aborted("other-partition".into());
                TableError::Client(e)
            }
        }
    }

    /// A failed read or lock: the server's abort ends the transaction everywhere.
    async fn failed(&mut self, e: ClientError) -> TableError {
        match e {
            ClientError::Broker(ErrorCode::TABLE_TXN_ABORTED, msg) => self.fail(&reason_word(&msg)).await,
            ClientError::Broker(ErrorCode::NOT_A_TABLE, _) => TableError::NotATable(self.table.name().to_owned()),
            ClientError::Timeout(_) if self.started.elapsed() > self.timeout => self.fail("timeout").await,
            e => TableError::Client(e),
        }
    }

    /// A failed single-partition commit: an abort, or an unknown outcome.
    async fn commit_failed(&mut self, e: ClientError) -> TableError {
        match e {
            ClientError::Broker(ErrorCode::TABLE_TXN_ABORTED, msg) => self.ended_aborted(&reason_word(&msg)),
            ClientError::Broker(ErrorCode::NOT_A_TABLE, _) => TableError::NotATable(self.table.name().to_owned()),
            e => {
                self.state = State::Unknown;
                TableError::Client(e)
            }
        }
    }

    async fn abort_everywhere(&self) {
        self.abort_partitions(&self.participants()).await;
    }

    /// TableAbort to these partitions' leaders, at once; failures are ignored (the leaders
    /// end the transaction at its timeout anyway).
    async fn abort_partitions(&self, partitions: &[u32]) {
        let asks = partitions.iter().map(|&p| {
            let req = TableAbortRequest { txn: self.id, topic: self.table.name().to_owned(), partition: p };
            async move {
                let client = &self.table.inner.client;
                let bound = client.config().request_timeout.min(ABORT_BOUND);
                let answer = async {
                    let conn = client.leader_connection(self.table.name(), p).await?;
                    let resp: TableAbortResponse = conn.call_for(ApiKey::TableAbort, &req, bound).await?;
                    check_status(&resp, self.table.name(), p)
                };
                if let Err(e) = answer.await {
                    tracing::debug!(table = self.table.name(), partition = p, error = %e, "table abort not delivered");
                }
            }
        });
        futures_util::future::join_all(asks).await;
    }

    fn wire_txn(&self) -> crate::wire::TableTxn {
        crate::wire::TableTxn {
            txn: self.id,
            level: self.level.code(),
            begin_us: self.begin_us,
            timeout_ms: u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX),
        }
    }

    fn read_request(&self, p: u32, keys: Vec<BytesMut>, range: Option<TableRange>) -> TableReadRequest {
        // Every level names the snapshot it was first answered at: snapshot levels read at it,
        // the others read the latest, and a leader that does not know the transaction then
        // knows it lost its locks or tracking (leader-changed).
        let snapshot = self.parts.get(&p).and_then(|s| s.snapshot);
        TableReadRequest {
            txn: self.wire_txn(),
            topic: self.table.name().to_owned(),
            partition: p,
            snapshot: snapshot.map_or(-1, |s| s as i64),
            min_offset: 0,
            follower: false,
            keys,
            range,
        }
    }

    fn commit_request(&self, partition: u32, record: TableRecord, producer: (i64, i16)) -> TableCommitRequest {
        TableCommitRequest {
            txn: self.wire_txn(),
            topic: self.table.name().to_owned(),
            partition,
            producer_id: producer.0,
            producer_epoch: producer.1,
            record,
        }
    }

    /// Whether its requests may wait at the leader (locks), so go on connections of its own.
    fn blocking(&self) -> bool {
        matches!(self.level, Level::TwoPl | Level::Serial)
    }

    fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.started.elapsed())
    }

    /// The connection to a partition's leader for this transaction's requests.
    async fn connection(&self, partition: u32) -> Result<Rc<Connection>, ClientError> {
        let client = &self.table.inner.client;
        let node = client.leader(self.table.name(), partition).await?;
        if !self.blocking() {
            return client.node_connection(node).await;
        }
        if let Some(c) = self.conns.borrow().get(&node).filter(|c| !c.is_broken()) {
            return Ok(c.clone());
        }
        let pooled = {
            let mut pool = self.table.inner.idle_conns.borrow_mut();
            let idle = pool.entry(node).or_default();
            std::iter::from_fn(|| idle.pop()).find(|c| c.is_idle())
        };
        let conn = match pooled {
            Some(c) => c,
            None => Rc::new(client.connect_node(node).await?),
        };
        self.conns.borrow_mut().insert(node, conn.clone());
        Ok(conn)
    }

    /// A request to a partition's leader, retried after refreshing metadata as `retry`
    /// allows, within the request timeout (or the transaction's, if longer). An answer with
    /// an error code is `ClientError::Broker(code, message)` (TABLE_TXN_ABORTED: the
    /// message is the reason word).
    async fn call<Req: Wire, Resp: Wire + Answer>(
        &self,
        partition: u32,
        key: ApiKey,
        req: &Req,
        retry: Retry,
    ) -> Result<Resp, ClientError> {
        let client = &self.table.inner.client;
        let topic = self.table.name();
        let request_timeout = client.config().request_timeout;
        let deadline = Instant::now() + request_timeout.max(self.remaining());
        let mut attempt = 0;
        loop {
            let result = match self.connection(partition).await {
                // Nothing was sent: any retriable failure may be retried.
                Err(e) => {
                    let again = e.is_retriable();
                    Err((e, again))
                }
                Ok(conn) => {
                    let bound = if self.blocking() {
                        request_timeout.max(self.remaining() + LOCK_SLACK)
                    } else {
                        request_timeout
                    };
                    let answer = conn.call_for::<_, Resp>(key, req, bound).await;
                    let answer = answer.and_then(|resp| check_status(&resp, topic, partition).map(|()| resp));
                    answer.map_err(|e| {
                        let again = match retry {
                            Retry::Idempotent => e.is_retriable() || e.refreshes_metadata(),
                            Retry::Commit => nothing_done(&e),
                        };
                        (e, again)
                    })
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err((e, true)) if attempt < RETRIES && Instant::now() + BACKOFF < deadline => {
                    tracing::debug!(topic, partition, ?key, error = %e, "table request failed; retrying");
                    if e.refreshes_metadata() {
                        client.invalidate_metadata(topic);
                    }
                    attempt += 1;
                    compio::time::sleep(BACKOFF * attempt).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

impl Drop for TableTxn {
    /// Gives its own connections that are idle back to the table's pool.
    fn drop(&mut self) {
        let mut pool = self.table.inner.idle_conns.borrow_mut();
        for (node, conn) in self.conns.get_mut().drain() {
            let idle = pool.entry(node).or_default();
            if idle.len() < IDLE_CONNS_MAX && Rc::strong_count(&conn) == 1 && conn.is_idle() {
                idle.push(conn);
            }
        }
    }
}

impl Table {
    /// A registered transactional id from the pool, or a new one (InitProducerId).
    async fn coordinator(&self, timeout: Duration) -> Result<TxnCoordinator, TxnError> {
        if let Some(c) = self.inner.coordinators.borrow_mut().pop() {
            return Ok(c);
        }
        let client = &self.inner.client;
        let id = format!("skein-table-{:016x}", next_txn_id());
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX).max(1);
        let req = InitProducerIdRequest { transactional_id: Some(id.clone()), transaction_timeout_ms: timeout_ms };
        let bound = client.config().request_timeout;
        let resp: InitProducerIdResponse =
            txn_call(client, &id, bound, ApiKey::InitProducerId, &req).await.map_err(coordinator_error)?;
        Ok(TxnCoordinator { id, identity: (resp.producer_id, resp.producer_epoch) })
    }
}

mod query;
pub use query::{IndexCheck, PartitionIndexState, QueryAnswer, Touched};

/// The status of a table response.
trait Answer {
    fn status(&self) -> (ErrorCode, &str);
}

macro_rules! answer {
    ($($t:ty),*) => {$(
        impl Answer for $t {
            fn status(&self) -> (ErrorCode, &str) {
                (self.error, &self.message)
            }
        }
    )*};
}
answer!(TableReadResponse, TableLockResponse, TableCommitResponse, TableAbortResponse, crate::wire::TableQueryResponse);

/// A response's error code as an error: TABLE_TXN_ABORTED keeps the bare message (the reason
/// word); others name the partition.
fn check_status<R: Answer>(resp: &R, topic: &str, partition: u32) -> Result<(), ClientError> {
    match resp.status() {
        (ErrorCode::NONE, _) => Ok(()),
        (code @ ErrorCode::TABLE_TXN_ABORTED, message) => Err(ClientError::Broker(code, message.to_owned())),
        (code, "") => Err(ClientError::Broker(code, format!("{topic}/{partition}"))),
        (code, message) => Err(ClientError::Broker(code, format!("{topic}/{partition}: {message}"))),
    }
}

/// A failure outside a transaction's bookkeeping ([`Table::run`]).
fn plain_error(name: &str, e: ClientError) -> TableError {
    match e {
        ClientError::Broker(ErrorCode::TABLE_TXN_ABORTED, msg) => TableError::Aborted(reason_word(&msg)),
        ClientError::Broker(ErrorCode::NOT_A_TABLE, _) => TableError::NotATable(name.to_owned()),
        e => TableError::Client(e),
    }
}

/// Whether a failed commit certainly did nothing (so it may be sent again).
fn nothing_done(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Broker(
            ErrorCode::NOT_LEADER
                | ErrorCode::FENCED_LEADER_EPOCH
                | ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
                | ErrorCode::THROTTLED,
            _
        )
    )
}

/// The reason word of an abort message.
pub fn reason_word(message: &str) -> String {
    message.split_whitespace().next().unwrap_or("unknown").to_owned()
}

/// Remembers the snapshot a read answered, for the levels whose reads stay at one.
fn note_snapshot(part: &mut PartState, _level: Level, snapshot: u64) {
    if part.snapshot.is_none() {
        part.snapshot = Some(snapshot);
    }
}

/// `Ok` if `key` fits.
pub fn check_key(key: &[u8]) -> Result<(), TableError> {
    if key.len() > KEY_BYTES_MAX {
        Err(TableError::KeyTooLarge(key.len()))
    } else {
        Ok(())
    }
}

/// `Ok` if `value` fits.
pub fn check_value(value: &[u8]) -> Result<(), TableError> {
    if value.len() > VALUE_BYTES_MAX {
        Err(TableError::ValueTooLarge(value.len()))
    } else {
        Ok(())
    }
}

/// Whether `key` is in `[from, to)` (empty `to`: unbounded).
pub fn in_range(key: &[u8], from: &[u8], to: &[u8]) -> bool {
    key >= from && (to.is_empty() || key < to)
}

/// Rows of several partitions (each in key order) merged into key order.
pub fn merge_rows(partitions: Vec<Vec<(Key, Value)>>) -> Vec<(Key, Value)> {
    let mut all: Vec<(Key, Value)> = partitions.into_iter().flatten().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.dedup_by(|a, b| a.0 == b.0);
    all
}

/// `rows` of `[from, to)` in key order with the transaction's own writes laid over them: a
/// buffered put in the range replaces or adds its row, a buffered delete removes it.
pub fn overlay(
    rows: Vec<(Key, Value)>,
    writes: &BTreeMap<Key, Option<Value>>,
    from: &[u8],
    to: &[u8],
) -> Vec<(Key, Value)> {
    let mut merged: BTreeMap<Key, Value> = rows.into_iter().collect();
    for (k, w) in writes.iter().filter(|(k, _)| in_range(k, from, to)) {
        match w {
            Some(v) => {
                merged.insert(k.clone(), v.clone());
            }
            None => {
                merged.remove(k);
            }
        }
    }
    merged.into_iter().collect()
}

/// The partitions a transaction touched: read, scanned, locked or written.
pub fn participants(
    parts: &BTreeMap<u32, PartState>,
    writes: &BTreeMap<Key, Option<Value>>,
    partition_of: impl Fn(&[u8]) -> u32,
) -> Vec<u32> {
    let mut all: BTreeSet<u32> = parts.keys().copied().collect();
    all.extend(writes.keys().map(|k| partition_of(k)));
    all.into_iter().collect()
}

/// A transaction's part in one partition, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPart {
    /// The partition.
    pub partition: u32,
    /// What its TableCommit carries.
    pub record: TableRecord,
}

/// Every participant's part, in partition order: its reads, ranges and writes; its snapshot
/// (the one its reads used under snapshot, serializable and ssi; else 0).
pub fn plan_parts(
    txn: u64,
    level: Level,
    parts: &BTreeMap<u32, PartState>,
    writes: &BTreeMap<Key, Option<Value>>,
    partition_of: impl Fn(&[u8]) -> u32,
) -> Vec<PlannedPart> {
    let mut by_partition: BTreeMap<u32, Vec<TableWrite>> = BTreeMap::new();
    for (k, v) in writes {
        by_partition
            .entry(partition_of(k))
            .or_default()
            .push(TableWrite { key: BytesMut::from(&k[..]), value: v.as_deref().map(BytesMut::from) });
    }
    let list = participants(parts, writes, &partition_of);
    // Snapshot and SSI over one partition: one snapshot, checked by the leader (first
    // committer wins, SSI's tracking); over several, their per-partition snapshots could mix
    // into a read skew, so the parts carry their reads for the machine to check.
    let alone = list.len() == 1 && matches!(level, Level::Snapshot | Level::Ssi);
    list.into_iter()
        .map(|partition| {
            let mut state = parts.get(&partition).cloned().unwrap_or_default();
            if alone {
                state.reads.clear();
                state.ranges.clear();
            }
            let snapshot = state.snapshot.unwrap_or(0);
            let record = TableRecord {
                version: RECORD_VERSION,
                txn,
                level: level.code(),
                snapshot,
                reads: state
                    .reads
                    .iter()
                    .map(|(k, v)| TableReadEntry { key: BytesMut::from(&k[..]), version: *v })
                    .collect(),
                ranges: state
                    .ranges
                    .iter()
                    .map(|(f, t)| TableRange { from: BytesMut::from(&f[..]), to: BytesMut::from(&t[..]) })
                    .collect(),
                writes: by_partition.remove(&partition).unwrap_or_default(),
                steps: vec![],
            };
            PlannedPart { partition, record }
        })
        .collect()
}

/// TableCommit outcomes.
const OUTCOME_COMMITTED: u8 = 0;
const OUTCOME_ABORTED: u8 = 1;
const OUTCOME_PREPARED: u8 = 2;

/// One participant's answer to a TableCommit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Committed (a part without producer, or a read-only part): at this offset.
    Committed(u64),
    /// Prepared inside the log transaction: its record's offset.
    Prepared(u64),
    /// Aborted, with the reason word.
    Aborted(String),
    /// No answer, or an error: counts as no.
    Failed(ClientError),
}

impl Vote {
    fn offset(&self) -> Option<u64> {
        match self {
            Vote::Committed(o) | Vote::Prepared(o) => Some(*o),
            Vote::Aborted(_) | Vote::Failed(_) => None,
        }
    }
}

/// Why the votes say no.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoVote {
    /// A participant aborted (or its leader is gone: `leader-changed`).
    Reason(String),
    /// A participant failed otherwise.
    Error(ClientError),
}

/// What the votes decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every vote is yes.
    Commit,
    /// The first no (in partition order).
    Abort(NoVote),
}

fn vote_of(answer: Result<TableCommitResponse, ClientError>) -> Vote {
    match answer {
        Ok(resp) => match resp.outcome {
            OUTCOME_COMMITTED => Vote::Committed(resp.offset),
            OUTCOME_PREPARED => Vote::Prepared(resp.offset),
            OUTCOME_ABORTED => Vote::Aborted(reason_word(&resp.reason)),
            other => Vote::Failed(ClientError::Protocol(format!("TableCommit outcome {other}"))),
        },
        Err(ClientError::Broker(ErrorCode::TABLE_TXN_ABORTED, msg)) => Vote::Aborted(reason_word(&msg)),
        Err(e) => Vote::Failed(e),
    }
}

/// Commit iff every vote is yes; else the first no's reason (a leader that could not be
/// reached or moved: `leader-changed`).
pub fn decide(votes: &[(u32, Vote)]) -> Decision {
    for (_, vote) in votes {
        match vote {
            Vote::Committed(_) | Vote::Prepared(_) => {}
            Vote::Aborted(reason) => return Decision::Abort(NoVote::Reason(reason.clone())),
            Vote::Failed(e) if e.refreshes_metadata() => {
                return Decision::Abort(NoVote::Reason("leader-changed".into()))
            }
            Vote::Failed(e) => return Decision::Abort(NoVote::Error(e.clone())),
        }
    }
    Decision::Commit
}

/// A new transaction id: unique in this process (a bijection of a counter), unpredictable
/// across processes (the base mixes the time, the process id and an address); never 0.
pub fn next_txn_id() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let local = 0u8;
        let addr = std::ptr::addr_of!(local) as usize as u64;
        splitmix64(nanos ^ (u64::from(std::process::id()) << 32) ^ splitmix64(addr))
    });
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = splitmix64(base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        if id != 0 {
            return id;
        }
    }
}

/// SplitMix64's finaliser: a bijection on u64 that mixes well.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Retries of a table request.
const RETRIES: u32 = 5;
/// The pause before the first retry (then twice as long, ...).
const BACKOFF: Duration = Duration::from_millis(50);
/// A blocking request's bound past the transaction's timeout (the leader answers then).
const LOCK_SLACK: Duration = Duration::from_secs(2);
/// Bound on one TableAbort.
const ABORT_BOUND: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (Key, Value) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn writes(ws: &[(&str, Option<&str>)]) -> BTreeMap<Key, Option<Value>> {
        ws.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))).collect()
    }

    #[test]
    fn scans_merge_partitions_in_key_order() {
        let merged = merge_rows(vec![vec![kv("b", "2"), kv("d", "4")], vec![], vec![kv("a", "1"), kv("c", "3")]]);
        assert_eq!(merged, vec![kv("a", "1"), kv("b", "2"), kv("c", "3"), kv("d", "4")]);
        assert!(merge_rows(vec![]).is_empty());
    }

    #[test]
    fn own_writes_overlay_scanned_rows_inside_the_range_only() {
        let rows = vec![kv("b", "old"), kv("c", "3"), kv("d", "4")];
        let w = writes(&[("a", Some("new-a")), ("b", Some("new-b")), ("c", None), ("e", Some("5")), ("z", Some("x"))]);
        let got = overlay(rows.clone(), &w, b"a", b"z");
        assert_eq!(got, vec![kv("a", "new-a"), kv("b", "new-b"), kv("d", "4"), kv("e", "5")]);
        // `to` is exclusive; an empty `to` is unbounded; `from` is inclusive.
        let got = overlay(rows.clone(), &w, b"b", b"");
        assert_eq!(got, vec![kv("b", "new-b"), kv("d", "4"), kv("e", "5"), kv("z", "x")]);
        assert_eq!(overlay(rows, &BTreeMap::new(), b"a", b"z"), vec![kv("b", "old"), kv("c", "3"), kv("d", "4")]);
        assert!(in_range(b"a", b"a", b"b") && !in_range(b"b", b"a", b"b") && in_range(b"zzz", b"a", b""));
        assert!(!in_range(b"a", b"b", b""));
    }

    #[test]
    fn participants_are_the_partitions_touched_and_written() {
        // FNV-1a, as the producer routes keyed records.
        assert_eq!(key_partition(b"", 8), 0x811c_9dc5 % 8);
        assert_eq!(key_partition(b"anything", 1), 0);
        let parts: BTreeMap<u32, PartState> = [(7, PartState::default()), (2, PartState::default())].into();
        let w = writes(&[("3x", Some("v")), ("2y", None), ("0z", Some("w"))]);
        assert_eq!(participants(&parts, &w, digit), vec![0, 2, 3, 7]);
        assert!(participants(&BTreeMap::new(), &BTreeMap::new(), digit).is_empty());
    }

    #[test]
    fn sizes_are_checked_before_anything_changes() {
        assert_eq!(check_key(&[0; KEY_BYTES_MAX]), Ok(()));
        assert_eq!(check_key(&[0; KEY_BYTES_MAX + 1]), Err(TableError::KeyTooLarge(1025)));
        assert_eq!(check_value(&vec![0; VALUE_BYTES_MAX]), Ok(()));
        assert_eq!(check_value(&vec![0; VALUE_BYTES_MAX + 1]), Err(TableError::ValueTooLarge(VALUE_BYTES_MAX + 1)));
        assert_eq!(TableError::KeyTooLarge(2000).to_string(), "key of 2000 bytes is longer than the 1024 allowed");
        assert_eq!(TableError::Aborted("wounded".into()).to_string(), "aborted wounded");
        assert_eq!(TableError::NotATable("t".into()).to_string(), "t is not a table");
    }

    fn part(snapshot: Option<u64>, reads: &[(&str, i64)], ranges: &[(&str, &str)]) -> PartState {
        PartState {
            snapshot,
            reads: reads.iter().map(|(k, v)| (k.as_bytes().to_vec(), *v)).collect(),
            ranges: ranges.iter().map(|(f, t)| (f.as_bytes().to_vec(), t.as_bytes().to_vec())).collect(),
            ..PartState::default()
        }
    }

    /// Partition of a test key: its first byte's digit.
    fn digit(k: &[u8]) -> u32 {
        u32::from(k[0] - b'0')
    }

    #[test]
    fn commit_parts_carry_each_partitions_reads_ranges_and_writes() {
        let parts: BTreeMap<u32, PartState> = [
            (1, part(Some(10), &[("1a", 4), ("1b", -1)], &[("1", "2")])),
            (3, part(Some(7), &[], &[])),
            (2, part(None, &[], &[])),
        ]
        .into_iter()
        .collect();
        let w = writes(&[("1c", Some("x")), ("5z", None), ("1a", Some("y"))]);
        let plan = plan_parts(9, Level::Serializable, &parts, &w, digit);
        assert_eq!(plan.iter().map(|p| p.partition).collect::<Vec<_>>(), vec![1, 2, 3, 5]);
        let p1 = &plan[0].record;
        assert_eq!((p1.txn, p1.level, p1.snapshot, p1.version), (9, Level::Serializable.code(), 10, RECORD_VERSION));
        assert_eq!(
            p1.reads.iter().map(|r| (r.key.to_vec(), r.version)).collect::<Vec<_>>(),
            vec![(b"1a".to_vec(), 4), (b"1b".to_vec(), -1)]
        );
        assert_eq!(p1.ranges.len(), 1);
        let keys = |r: &TableRecord| r.writes.iter().map(|w| w.key.to_vec()).collect::<Vec<_>>();
        assert_eq!(keys(p1), vec![b"1a".to_vec(), b"1c".to_vec()], "writes in key order");
        assert!(plan[1].record.writes.is_empty() && plan[1].record.snapshot == 0, "a partition never read: 0");
        assert_eq!(plan[3].record.writes[0].value, None, "a delete");
        // Every level names its snapshot (the leader knows a transaction it lost by it).
        let plan = plan_parts(9, Level::TwoPl, &parts, &w, digit);
        assert_eq!(plan[0].record.snapshot, 10);
        // Snapshot and SSI carry their reads only over several partitions.
        let plan = plan_parts(9, Level::Snapshot, &parts, &w, digit);
        assert_eq!(plan[0].record.reads.len(), 2);
        let one = plan_parts(9, Level::Ssi, &parts, &writes(&[("1c", Some("x"))]), digit);
        assert_eq!(one.len(), 3, "partitions 1, 2 and 3 were touched");
        let only: BTreeMap<u32, PartState> = [(1, part(Some(10), &[("1a", 4)], &[("1", "2")]))].into_iter().collect();
        let one = plan_parts(9, Level::Ssi, &only, &writes(&[("1c", Some("x"))]), digit);
        assert_eq!(one.len(), 1);
        assert!(one[0].record.reads.is_empty() && one[0].record.ranges.is_empty());
        assert_eq!(one[0].record.snapshot, 10);
        assert!(plan_parts(9, Level::Ssi, &BTreeMap::new(), &BTreeMap::new(), digit).is_empty());
    }

    #[test]
    fn votes_commit_only_when_all_say_yes() {
        let yes = vec![(0, Vote::Prepared(5)), (2, Vote::Committed(9))];
        assert_eq!(decide(&yes), Decision::Commit);
        let no =
            vec![(0, Vote::Prepared(5)), (1, Vote::Aborted("stale-read".into())), (2, Vote::Aborted("phantom".into()))];
        assert_eq!(decide(&no), Decision::Abort(NoVote::Reason("stale-read".into())));
        let lost = vec![(0, Vote::Failed(ClientError::ConnectionLost)), (1, Vote::Aborted("phantom".into()))];
        assert_eq!(decide(&lost), Decision::Abort(NoVote::Reason("leader-changed".into())));
        let odd = vec![(0, Vote::Failed(ClientError::Protocol("x".into())))];
        assert_eq!(decide(&odd), Decision::Abort(NoVote::Error(ClientError::Protocol("x".into()))));
        let server = Err(ClientError::Broker(ErrorCode::TABLE_TXN_ABORTED, "wounded by t1".into()));
        assert_eq!(vote_of(server), Vote::Aborted("wounded".into()));
    }

    #[test]
    fn table_configs_round_trip() {
        let configs = |cs: Vec<(String, String)>| -> Vec<TopicConfig> {
            cs.into_iter().map(|(key, value)| TopicConfig { key, value }).collect()
        };
        assert_eq!(table_level(&configs(table_configs(Some(Level::TwoPl)))), Ok(Some(Some(Level::TwoPl))));
        assert_eq!(table_level(&configs(table_configs(None))), Ok(Some(None)));
        assert_eq!(table_level(&[]), Ok(None));
        let bad = configs(vec![("table".into(), "true".into()), ("table.isolation".into(), "chaos".into())]);
        assert!(table_level(&bad).is_err());
        let off = configs(vec![("table".into(), "false".into())]);
        assert_eq!(table_level(&off), Ok(None));
    }

    #[test]
    fn procedures_run_in_one_partition() {
        let put = |k: &str| Step::Put { key: k.as_bytes().to_vec(), value: b"1".to_vec() };
        // Find two keys in different partitions of 4.
        let p4 = |k: &[u8]| key_partition(k, 4);
        let a = "k0";
        let b = (1..100).map(|i| format!("k{i}")).find(|k| key_partition(k.as_bytes(), 4) != key_partition(b"k0", 4));
        let b = b.expect("a key elsewhere");
        assert_eq!(procedure_partition(&[put(a)], p4), Ok(key_partition(b"k0", 4)));
        assert!(matches!(procedure_partition(&[put(a), put(&b)], p4), Err(TableError::Invalid(_))));
        let transfer = Step::Transfer { from: a.into(), to: b.clone().into_bytes(), amount: 5 };
        assert!(matches!(procedure_partition(&[transfer], p4), Err(TableError::Invalid(_))));
        assert!(matches!(procedure_partition(&[], p4), Err(TableError::Invalid(_))));
        let big = Step::Append { key: b"k".to_vec(), value: vec![0; VALUE_BYTES_MAX + 1] };
        assert_eq!(procedure_partition(&[big], p4), Err(TableError::ValueTooLarge(VALUE_BYTES_MAX + 1)));
        let wire = Step::Transfer { from: b"x".to_vec(), to: b"y".to_vec(), amount: -3 }.to_wire();
        assert_eq!((wire.kind, &wire.key[..], &wire.key2[..], wire.amount), (4, &b"x"[..], &b"y"[..], -3));
        let cas = Step::CompareAndSet { key: b"x".to_vec(), expect: None, value: Some(b"v".to_vec()) }.to_wire();
        assert_eq!((cas.kind, cas.expect, cas.value.as_deref()), (2, None, Some(&b"v"[..])));
    }

    #[test]
    fn transaction_ids_are_unique_and_nonzero() {
        let ids: BTreeSet<u64> = (0..10_000).map(|_| next_txn_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!ids.contains(&0));
        assert_eq!(reason_word("wounded by an older transaction"), "wounded");
        assert_eq!(reason_word(""), "unknown");
    }
}
