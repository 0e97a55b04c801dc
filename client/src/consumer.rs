//! The consumer: assigned partitions, pipelined long-polling fetches, records with offsets,
//! and seeking to the beginning, the end, an offset or a timestamp.
//!
//! Each partition is fetched from its leader (the client's metadata cache): partitions with
//! different leaders go in separate Fetch requests, in flight at the same time, each on a
//! connection of this consumer's own (a long poll holds back every later response on its
//! connection, so it shares none with producers or other consumers). `poll` waits for the
//! first answer (or the end of the long poll), takes every answer already there, and merges
//! their records.
//!
//! After each answer the next fetch to that leader is sent at once, before the records are
//! handed back, so the broker works on the next fetch while the application works on this
//! one. A seek drops the fetches in flight; [`Consumer::unassign`] drops one partition from them
//! (the others of the same fetch are still taken).
//!
//! Failover: a partition answered with NOT_LEADER, FENCED_LEADER_EPOCH or
//! UNKNOWN_TOPIC_OR_PARTITION, or whose fetch failed (lost connection, IO error, or no answer
//! within `max_wait + response_timeout`, which also drops the connection), has its topic's
//! metadata marked stale and is fetched again, from the leader a refresh finds, on the next
//! poll. `poll` does not fail for these; only errors retrying cannot fix (OFFSET_OUT_OF_RANGE,
//! STORAGE_ERROR, damaged batches) are returned.
//!
//! Follower reads (`ConsumerConfig::prefer_replica`): with [`ReadReplica::Node`] or
//! [`ReadReplica::Closest`] a partition is fetched from an in-sync replica (the cached ISR)
//! instead of its leader, with `replica_read` set; a follower serves records only up to the
//! high watermark it learned from the leader, so what it serves is a prefix of the committed
//! log, possibly an older one than the leader's. A replica not in the cached ISR is never
//! asked. A fetch to a follower that failed as a whole sends the partition's next fetch to the
//! leader.
//!
//! Sessions (`ConsumerConfig::session`, see [`crate::Session`]): every fetch carries the
//! session's token for its partition, and every answer without error raises the token to the
//! answer's high watermark and leader epoch. The replica answers only once it has caught up
//! with the token (it waits a bounded time, then answers NOT_CAUGHT_UP), so a consumer sharing
//! a session with a producer reads that producer's acknowledged writes (read-your-writes), and
//! the high watermark it sees never goes back, across replica switches and failovers
//! (monotonic reads). An answer reporting a lower high watermark or leader epoch than the
//! token asked for is not taken (as if NOT_CAUGHT_UP). A partition answered NOT_CAUGHT_UP by a
//! follower has its fetches sent to the leader (`replica_read` off) for
//! `lagging_replica_backoff` (at least the next one), then to the preferred replica again;
//! answered so by the leader, it is fetched again after
//! `retry_backoff`. Without a session no token is sent and neither guarantee holds when reads
//! move between replicas. [`Consumer::read_stats`] counts follower reads, waits and redirects.
//!
//! Transactions (`ConsumerConfig::isolation`, default [`Isolation::ReadCommitted`]): a
//! read_committed fetch is answered up to the partition's last stable offset (below it every
//! transaction is decided), with the aborted transactions of the range listed; the consumer
//! drops every transactional batch of an aborted transaction ([`is_aborted`]) and never hands
//! out control batches (commit and abort markers) under either isolation, but moves its
//! position past both, so a reader waiting for the end of a partition
//! ([`Consumer::end_offset`]: the last stable offset, or the high watermark for
//! read_uncommitted) is never stuck on a marker's offset.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_channel::oneshot;
use skein_log::batch::{BatchError, BatchHeader, RecordBatch, HEADER_BYTES};

use crate::conn::{decode_body, Connection};
use crate::wire::{
    AbortedTransaction, ApiKey, ErrorCode, FetchPartition, FetchPartitionResponse, FetchRequest, FetchResponse,
    PartitionMetadata, TopicMetadata, EARLIEST, LATEST, READ_COMMITTED, READ_UNCOMMITTED,
};
use crate::{Client, ClientError, SessionHandle, Token};

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// How long the broker may hold a fetch waiting for `min_bytes`.
    pub max_wait: Duration,
    /// Bytes the broker waits for before answering.
    pub min_bytes: u32,
    /// Bytes per fetch response (at least one batch is always returned).
    pub max_bytes: u32,
    /// Bytes per partition per fetch.
    pub partition_max_bytes: u32,
    /// A fetch not answered within `max_wait` plus this is treated as lost: its connection
    /// is dropped, the metadata refreshed, and its partitions fetched again on the next poll.
    pub response_timeout: Duration,
    /// How long `poll` pauses before returning nothing when every fetch failed (no leader,
    /// unreachable brokers), so a caller polling in a loop does not spin.
    pub retry_backoff: Duration,
    /// Which replica serves reads (default: the leader).
    pub prefer_replica: ReadReplica,
    /// This consumer's rack, for [`ReadReplica::Closest`].
    pub rack: Option<String>,
    /// The session whose tokens fetches carry and whose tokens answers raise (read-your-writes,
    /// monotonic reads); `None`: no tokens are sent.
    pub session: Option<SessionHandle>,
    /// After a follower answers NOT_CAUGHT_UP (or fails), the partition is read from the
    /// leader for this long before the preferred follower is tried again (the next fetch goes
    /// to the leader in any case), so a follower that stays behind does not cost a read wait
    /// on every return to it.
    pub lagging_replica_backoff: Duration,
    /// Which records of transactions are read (default: only committed ones).
    pub isolation: Isolation,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 8 << 20,
            partition_max_bytes: 1 << 20,
            response_timeout: Duration::from_millis(1_500),
            retry_backoff: Duration::from_millis(50),
            prefer_replica: ReadReplica::Leader,
            rack: None,
            session: None,
            lagging_replica_backoff: Duration::from_secs(1),
            isolation: Isolation::ReadCommitted,
        }
    }
}

/// Which records of transactions a consumer reads (Kafka's `isolation.level`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Records of committed transactions and records written outside transactions, up to
    /// the last stable offset: nothing of an aborted or undecided transaction.
    #[default]
    ReadCommitted,
    /// Every record up to the high watermark, whatever becomes of its transaction.
    ReadUncommitted,
}

impl Isolation {
    /// The value of `FetchRequest::isolation` and `ListOffsetsRequest::isolation`.
    pub fn wire(self) -> u8 {
        match self {
            Isolation::ReadCommitted => READ_COMMITTED,
            Isolation::ReadUncommitted => READ_UNCOMMITTED,
        }
    }

    /// `read_committed` or `read_uncommitted`, as the CLI spells them.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        }
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    /// `read_committed` or `read_uncommitted`.
    fn from_str(s: &str) -> Result<Isolation, String> {
        match s {
            "read_committed" => Ok(Isolation::ReadCommitted),
            "read_uncommitted" => Ok(Isolation::ReadUncommitted),
            _ => Err(format!("isolation is read_committed or read_uncommitted, not '{s}'")),
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which replica of a partition a consumer reads from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadReplica {
    /// The leader (newest high watermark).
    #[default]
    Leader,
    /// An in-sync replica in the consumer's rack (`ConsumerConfig::rack`): the leader if it is
    /// one, else the lowest node id; the leader if none is.
    Closest,
    /// This broker if it is in the partition's in-sync replicas, else the leader.
    Node(u32),
}

/// A `--prefer-replica` value that is not `leader`, `closest` or a node id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("prefer-replica is leader, closest or a node id (1 or more), not '{0}'")]
pub struct ReadReplicaParseError(pub String);

impl std::str::FromStr for ReadReplica {
    type Err = ReadReplicaParseError;
    /// `leader`, `closest` or a node id, as the CLI spells them.
    fn from_str(s: &str) -> Result<ReadReplica, ReadReplicaParseError> {
        match s {
            "leader" => Ok(ReadReplica::Leader),
            "closest" => Ok(ReadReplica::Closest),
            _ => match s.parse::<u32>() {
                // Node id 0 means "no node" on the wire.
                Ok(node) if node != 0 => Ok(ReadReplica::Node(node)),
                _ => Err(ReadReplicaParseError(s.to_owned())),
            },
        }
    }
}

impl std::fmt::Display for ReadReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadReplica::Leader => f.write_str("leader"),
            ReadReplica::Closest => f.write_str("closest"),
            ReadReplica::Node(node) => write!(f, "{node}"),
        }
    }
}

/// Counts of this consumer's partition answers, since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Partition answers received (with or without error).
    pub fetches: u64,
    /// Answers without error from a replica that was not the partition's leader.
    pub follower_reads: u64,
    /// Answers whose replica waited to catch up with the session token (`token_wait_us > 0`).
    pub waited: u64,
    /// NOT_CAUGHT_UP answers (and answers behind the token), each sending the partition's
    /// next fetch to the leader.
    pub not_caught_up: u64,
}

impl ReadStats {
    /// Adds another consumer's counts (for totals over several consumers).
    pub fn add(&mut self, other: &ReadStats) {
        self.fetches += other.fetches;
        self.follower_reads += other.follower_reads;
        self.waited += other.waited;
        self.not_caught_up += other.not_caught_up;
    }
}

/// Where to start reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// The log start.
    Beginning,
    /// The log end: only new records.
    End,
    /// This offset.
    Offset(u64),
    /// The first record with a timestamp (ms) at or after this.
    Timestamp(i64),
}

/// A record read from a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: Rc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp in ms since the Unix epoch.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A partition whose reads are behind the session's token ([`Consumer::behind_session`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The next offset this consumer reads.
    pub position: u64,
    /// The session's token for the partition: reads reach it at `min_high_watermark`.
    pub token: Token,
}

/// One fetched batch of a partition, read in place from the response.
#[derive(Debug)]
pub struct FetchedBatch {
    /// Topic.
    pub topic: Rc<str>,
    /// Partition.
    pub partition: u32,
    /// Records below this offset were delivered before; skip them.
    pub from_offset: u64,
    /// The batch, fully checked.
    pub batch: RecordBatch<BytesMut>,
}

type Body = Result<BytesMut, ClientError>;

/// One partition of a Fetch request, as asked.
struct Asked {
    topic: Rc<str>,
    partition: u32,
    /// The fetch offset.
    offset: u64,
    /// Sent to a replica that was not the cached leader.
    follower: bool,
    /// The session token sent (`None`: no session, or nothing noted yet).
    token: Option<Token>,
}

/// A Fetch request awaiting its answer.
struct InFlight {
    node: u32,
    conn: Rc<Connection>,
    parts: Vec<Asked>,
    rx: oneshot::Receiver<Body>,
    deadline: Instant,
}

/// An assigned partition.
struct Assigned {
    topic: Rc<str>,
    partition: u32,
    /// The next offset to read.
    position: u64,
    /// The high watermark the last answer without error reported.
    high_watermark: Option<u64>,
    /// The last stable offset the last answer without error reported.
    last_stable: Option<u64>,
    /// The next fetch goes to the leader (a follower was not caught up, or failed).
    to_leader: bool,
    /// Until then every fetch goes to the leader (`lagging_replica_backoff` after the follower
    /// was not caught up, or failed).
    leader_until: Option<Instant>,
    /// A followed topic's partition (issue 21): the partitions it was split or merged from,
    /// which are read to their seals before it is fetched.
    after: Vec<u32>,
    /// Its seal offset, once known: read to there, it is done.
    sealed_at: Option<u64>,
}

impl Assigned {
    /// Read to its seal: nothing more will ever come.
    fn finished(&self) -> bool {
        self.sealed_at.is_some_and(|s| self.position >= s)
    }
}

/// How often a consumer following ranged topics looks for seals and new partitions.
pub(crate) const LINEAGE_REFRESH: Duration = Duration::from_millis(250);

/// Reads assigned partitions.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assigned: Vec<Assigned>,
    /// At most one fetch per partition.
    in_flight: Vec<InFlight>,
    /// This consumer's connections, by broker node id.
    conns: HashMap<u32, Rc<Connection>>,
    /// An error found while other partitions returned records: returned by the next poll.
    deferred: Option<ClientError>,
    stats: ReadStats,
    /// A leader answered NOT_CAUGHT_UP: pause `retry_backoff` before a poll returns nothing.
    backoff: bool,
    /// Topics read whole through their splits and merges ([`Consumer::follow`]).
    followed: Vec<Rc<str>>,
    /// Partitions not assigned here known to be read to their seals elsewhere (a group's
    /// committed offsets, [`Consumer::note_done`]): they gate their children no more.
    done_elsewhere: HashSet<(Rc<str>, u32)>,
    /// When the followed topics' lineage was last looked up.
    lineage_at: Option<Instant>,
}

impl Consumer {
    /// A consumer with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            assigned: Vec::new(),
            in_flight: Vec::new(),
            conns: HashMap::new(),
            deferred: None,
            stats: ReadStats::default(),
            backoff: false,
            followed: Vec::new(),
            done_elsewhere: HashSet::new(),
            lineage_at: None,
        }
    }

    /// Notes each assigned partition's parents and seal from `t` (a topic's metadata), so a
    /// partition is fetched only after its parents are read to their seals: here, or
    /// elsewhere ([`Consumer::note_done`]). Returns the assigned partitions whose parents
    /// are neither assigned here nor known done, with those parents' seal offsets (unknown
    /// while sealing): for a group consumer to look up in the group's committed offsets.
    pub fn note_lineage(&mut self, t: &TopicMetadata) -> Vec<(u32, Option<u64>)> {
        let sealed_at = |p: &PartitionMetadata| (p.lineage.seal == 2).then_some(p.lineage.sealed_at);
        for p in &t.partitions {
            if let Some(a) = self.assigned.iter_mut().find(|a| *a.topic == *t.name && a.partition == p.partition) {
                a.after.clone_from(&p.lineage.parents);
                a.sealed_at = sealed_at(p);
            }
        }
        let mut waiting: Vec<(u32, Option<u64>)> = Vec::new();
        for a in self.assigned.iter().filter(|a| *a.topic == *t.name) {
            for parent in &a.after {
                let here = self.assigned.iter().any(|b| b.topic == a.topic && b.partition == *parent);
                if here || self.done_elsewhere.contains(&(a.topic.clone(), *parent)) {
                    continue;
                }
                let seal = t.partitions.iter().find(|q| q.partition == *parent).and_then(sealed_at);
                if !waiting.iter().any(|(q, _)| q == parent) {
                    waiting.push((*parent, seal));
                }
            }
        }
        waiting
    }

    /// Whether an assigned partition waits for its parents (nothing of it is read yet, so a
    /// group must not commit its position: a commit at its seal would tell other members it
    /// is done).
    pub fn waits_for_parents(&self, topic: &str, partition: u32) -> bool {
        self.assigned.iter().any(|a| &*a.topic == topic && a.partition == partition && !self.parents_done(a))
    }

    /// Partition `partition` of `topic`, not assigned here, was read to its seal (a group
    /// committed its seal offset): its children may be fetched.
    pub fn note_done(&mut self, topic: &str, partition: u32) {
        self.done_elsewhere.insert((Rc::from(topic), partition));
    }

    /// The assigned partitions read to their seals whose parents are done too (their final
    /// offsets, for a group to commit promptly so the members reading the children may go on).
    pub fn finished(&self) -> Vec<(Rc<str>, u32, u64)> {
        let done = |a: &&Assigned| a.finished() && self.parents_done(a);
        self.assigned.iter().filter(done).map(|a| (a.topic.clone(), a.partition, a.position)).collect()
    }

    /// Reads every partition of `topic`, those its splits and merges make later included,
    /// each partition after the ones it came from are read to their seals (so records of a key
    /// come in the order they were written across any number of splits and merges). The
    /// partitions it has now start at `from`; later ones at their beginning. For a hash topic
    /// it is [`Consumer::assign`] of every partition.
    pub async fn follow(&mut self, topic: &str, from: Position) -> Result<(), ClientError> {
        if !self.followed.iter().any(|t| &**t == topic) {
            self.followed.push(Rc::from(topic));
        }
        self.learn_lineage(topic, Some(from)).await
    }

    /// Looks up the followed topics' seals and new partitions, at most every
    /// `LINEAGE_REFRESH`.
    async fn refresh_lineage(&mut self) {
        if self.followed.is_empty() || self.lineage_at.is_some_and(|t| t.elapsed() < LINEAGE_REFRESH) {
            return;
        }
        for topic in self.followed.clone() {
            if let Err(e) = self.learn_lineage(&topic, None).await {
                tracing::debug!(%topic, error = %e, "looking up a followed topic's partitions failed");
            }
        }
    }

    /// Assigns `topic`'s partitions not assigned yet (at `from`, else at their beginning) and
    /// notes every partition's parents and seal.
    async fn learn_lineage(&mut self, topic: &str, from: Option<Position>) -> Result<(), ClientError> {
        self.lineage_at = Some(Instant::now());
        let t = self.client.topic_metadata(topic).await?;
        for p in &t.partitions {
            if self.find(topic, p.partition).is_none() {
                self.assign(topic, &[p.partition], from.unwrap_or(Position::Beginning)).await?;
            }
            if let Some(a) = self.assigned.iter_mut().find(|a| &*a.topic == topic && a.partition == p.partition) {
                a.after.clone_from(&p.lineage.parents);
                a.sealed_at = (p.lineage.seal == 2).then_some(p.lineage.sealed_at);
            }
        }
        Ok(())
    }

    /// Whether `a` waits: read to its seal, or a parent is not (assigned here and not
    /// finished; or, outside [`Consumer::follow`], not assigned here and not known done).
    fn gated(&self, a: &Assigned) -> bool {
        a.finished() || !self.parents_done(a)
    }

    /// Whether every parent of `a` is done: read to its seal with its own parents done (an
    /// empty parent sealed at 0 is at its seal before anything above it is read), here, or
    /// (outside [`Consumer::follow`]) known done elsewhere. Parents have lower indexes than
    /// their children, so the recursion ends.
    fn parents_done(&self, a: &Assigned) -> bool {
        let following = self.followed.contains(&a.topic);
        a.after.iter().all(|p| match self.assigned.iter().find(|b| b.topic == a.topic && b.partition == *p) {
            Some(b) => b.finished() && self.parents_done(b),
            None => following || self.done_elsewhere.contains(&(a.topic.clone(), *p)),
        })
    }

    /// Adds partitions of a topic, each starting at `from`.
    pub async fn assign(&mut self, topic: &str, partitions: &[u32], from: Position) -> Result<(), ClientError> {
        for &p in partitions {
            let offset = self.resolve(topic, p, from).await?;
            match self.assigned.iter_mut().find(|a| &*a.topic == topic && a.partition == p) {
                Some(entry) => entry.position = offset,
                None => self.assigned.push(Assigned {
                    topic: Rc::from(topic),
                    partition: p,
                    position: offset,
                    high_watermark: None,
                    last_stable: None,
                    to_leader: false,
                    leader_until: None,
                    after: Vec::new(),
                    sealed_at: None,
                }),
            }
        }
        self.in_flight.clear();
        Ok(())
    }

    /// Moves an assigned partition to `to`.
    pub async fn seek(&mut self, topic: &str, partition: u32, to: Position) -> Result<(), ClientError> {
        if self.find(topic, partition).is_none() {
            return Err(ClientError::Invalid(format!("{topic}/{partition} is not assigned")));
        }
        self.assign(topic, &[partition], to).await
    }

    /// Drops an assigned partition: it is fetched no more, and the answer of a fetch in
    /// flight for it is ignored (the other partitions of that fetch are still taken). Returns
    /// whether it was assigned. A consumer left with nothing assigned must not be polled
    /// ([`Consumer::poll`] fails then): check [`Consumer::is_assigned_any`] first.
    pub fn unassign(&mut self, topic: &str, partition: u32) -> bool {
        let before = self.assigned.len();
        self.assigned.retain(|a| !(&*a.topic == topic && a.partition == partition));
        for f in &mut self.in_flight {
            f.parts.retain(|x| !(&*x.topic == topic && x.partition == partition));
        }
        // A fetch left asking for nothing still holds its place on its connection; its answer
        // is ignored (take_batches finds no asked partition in it).
        self.assigned.len() != before
    }

    /// The assigned partitions, in assignment order.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.assigned.iter().map(|a| (a.topic.to_string(), a.partition)).collect()
    }

    /// Whether any partition is assigned (polling needs one).
    pub fn is_assigned_any(&self) -> bool {
        !self.assigned.is_empty()
    }

    /// The next offset to be read from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition).map(|a| a.position)
    }

    /// The high watermark the last answer without error reported for a partition (`None`
    /// before the first). With a session it never goes back.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition).and_then(|a| a.high_watermark)
    }

    /// The last stable offset the last answer without error reported for a partition (below
    /// it every transaction is decided; `None` before the first answer).
    pub fn last_stable(&self, topic: &str, partition: u32) -> Option<u64> {
        self.find(topic, partition).and_then(|a| a.last_stable)
    }

    /// Where this consumer's reads of a partition end for now, as of the last answer: the
    /// last stable offset with [`Isolation::ReadCommitted`], the high watermark with
    /// [`Isolation::ReadUncommitted`]. A reader that wants "everything so far" reads until its
    /// position reaches it (markers are skipped, so the position does reach it).
    pub fn end_offset(&self, topic: &str, partition: u32) -> Option<u64> {
        let a = self.find(topic, partition)?;
        match self.config.isolation {
            Isolation::ReadCommitted => a.last_stable,
            Isolation::ReadUncommitted => a.high_watermark,
        }
    }

    /// The isolation level of this consumer's reads.
    pub fn isolation(&self) -> Isolation {
        self.config.isolation
    }

    /// Counts of partition answers so far.
    pub fn read_stats(&self) -> ReadStats {
        self.stats
    }

    /// Which replica serves reads.
    pub fn prefer_replica(&self) -> ReadReplica {
        self.config.prefer_replica
    }

    /// Changes which replica serves reads, from the next fetch of each partition on (fetches
    /// in flight are answered by the replica they went to).
    pub fn set_prefer_replica(&mut self, prefer: ReadReplica) {
        self.config.prefer_replica = prefer;
    }

    /// The assigned partitions whose reads have not reached the session's token yet: their
    /// position is below the end offset the session has written or seen there. Empty without
    /// a session. An empty [`Consumer::poll`] while this is not empty means "not caught up
    /// with the session yet" (a replica was still waiting for the token, or the read was being
    /// redirected to the leader), not "no new records": a reader that stops after an idle
    /// timeout must not stop then, or it would miss the session's own writes.
    pub fn behind_session(&self) -> Vec<SessionLag> {
        let Some(session) = &self.config.session else {
            return Vec::new();
        };
        let session = session.borrow();
        self.assigned
            .iter()
            .filter_map(|a| {
                let token = session.token(&a.topic, a.partition)?;
                (a.position < token.min_high_watermark).then(|| SessionLag {
                    topic: a.topic.to_string(),
                    partition: a.partition,
                    position: a.position,
                    token,
                })
            })
            .collect()
    }

    /// The next records (possibly none, after `max_wait` without new data, or while a
    /// partition is still behind the session's token: see [`Consumer::behind_session`]).
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        let fetched = self.poll_batches().await?;
        let mut out = Vec::new();
        for f in &fetched {
            let h = *f.batch.header();
            for r in f.batch.records().iter() {
                let offset = h.base_offset.get() + u64::from(r.offset_delta.to_native());
                if offset < f.from_offset {
                    continue;
                }
                out.push(ConsumerRecord {
                    topic: f.topic.clone(),
                    partition: f.partition,
                    offset,
                    timestamp: h.first_timestamp.0.wrapping_add(r.timestamp_delta.to_native()),
                    key: r.key.as_ref().map(|k| k.as_slice().to_vec()),
                    value: r.value.as_slice().to_vec(),
                    headers: r
                        .headers
                        .iter()
                        .map(|x| (x.key.as_str().to_owned(), x.value.as_slice().to_vec()))
                        .collect(),
                });
            }
        }
        Ok(out)
    }

    /// The next batches, checked (framing, CRC, archive) and read in place: no record is
    /// copied. Records below `from_offset` in a batch were already delivered (or asked to be
    /// skipped) and should be ignored.
    pub async fn poll_batches(&mut self) -> Result<Vec<FetchedBatch>, ClientError> {
        if self.assigned.is_empty() {
            return Err(ClientError::Invalid("no partitions assigned".into()));
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        self.refresh_lineage().await;
        self.send_fetches().await;
        if self.in_flight.is_empty() {
            // Nothing could be sent (no leader known, brokers unreachable): next poll.
            compio::time::sleep(self.config.retry_backoff).await;
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut error = None;
        let mut failed = false;
        for (f, body) in self.wait_any().await {
            match body.and_then(|b| decode_body::<FetchResponse>(ApiKey::Fetch, b)) {
                Ok(resp) => {
                    if let Err(e) = self.take_batches(&f, resp, &mut out) {
                        error.get_or_insert(e);
                    }
                }
                Err(e) if e.is_retriable() => {
                    failed = true;
                    self.lost(&f, &e);
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            Some(e) if out.is_empty() => return Err(e),
            Some(e) => self.deferred = Some(e),
            None => {}
        }
        // Pipelining: the next fetches go out before the records are handed back.
        self.send_fetches().await;
        let backoff = std::mem::take(&mut self.backoff);
        if out.is_empty() && (failed || backoff) {
            compio::time::sleep(self.config.retry_backoff).await;
        }
        Ok(out)
    }

    /// Sends a fetch to each replica chosen for the assigned partitions that have none in
    /// flight (see [`read_replica`]), refreshing metadata first if a leader is unknown.
    /// Failures only mark metadata stale: those partitions are tried again on the next poll.
    async fn send_fetches(&mut self) {
        let todo: Vec<usize> = (0..self.assigned.len())
            .filter(|&i| {
                let a = &self.assigned[i];
                !self.gated(a)
                    && !self
                        .in_flight
                        .iter()
                        .any(|f| f.parts.iter().any(|x| x.topic == a.topic && x.partition == a.partition))
            })
            .collect();
        if todo.is_empty() {
            return;
        }
        let unknown: Vec<Rc<str>> = todo
            .iter()
            .map(|&i| &self.assigned[i])
            .filter(|a| self.client.cached_leader(&a.topic, a.partition).is_none())
            .map(|a| a.topic.clone())
            .collect();
        if !unknown.is_empty() {
            // Invalidating also makes the refresh ask for topics not looked up before.
            unknown.iter().for_each(|t| self.client.invalidate_metadata(t));
            if let Err(e) = self.client.refresh_metadata().await {
                tracing::debug!(error = %e, "metadata refresh for fetching failed");
            }
        }
        // By (node, replica_read): a redirect to the leader goes without replica_read, so a
        // stale leader that is a follower now refuses it instead of serving it.
        let mut routed: BTreeMap<(u32, bool), Vec<Asked>> = BTreeMap::new();
        for i in todo {
            let a = &self.assigned[i];
            let Some(leader) = self.client.cached_leader(&a.topic, a.partition) else {
                tracing::debug!(topic = %a.topic, partition = a.partition, "no leader to fetch from");
                self.client.invalidate_metadata(&a.topic);
                continue;
            };
            let (node, replica_read) = self.route(a, leader);
            let token = self.config.session.as_ref().and_then(|s| s.borrow().token(&a.topic, a.partition));
            let asked = Asked {
                topic: a.topic.clone(),
                partition: a.partition,
                offset: a.position,
                follower: node != leader,
                token,
            };
            routed.entry((node, replica_read)).or_default().push(asked);
        }
        for ((node, replica_read), parts) in routed {
            let sent: Vec<(Rc<str>, u32, bool)> =
                parts.iter().map(|x| (x.topic.clone(), x.partition, x.follower)).collect();
            match self.send_fetch(node, replica_read, parts).await {
                Ok(f) => self.in_flight.push(f),
                Err(e) => {
                    tracing::debug!(node, error = %e, "sending a fetch failed");
                    for (topic, partition, follower) in sent {
                        self.client.invalidate_metadata(&topic);
                        // An unreachable follower: the leader serves the next fetch.
                        if let Some(a) = self.assigned.iter_mut().find(|a| a.topic == topic && a.partition == partition)
                        {
                            if follower {
                                a.to_leader = true;
                                a.leader_until = Some(Instant::now() + self.config.lagging_replica_backoff);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The replica to fetch a partition from, and whether the request may be served by a
    /// follower.
    fn route(&self, a: &Assigned, leader: u32) -> (u32, bool) {
        let prefer = self.config.prefer_replica;
        if prefer == ReadReplica::Leader || a.to_leader || a.leader_until.is_some_and(|t| Instant::now() < t) {
            return (leader, false);
        }
        let isr = self.client.cached_isr(&a.topic, a.partition).unwrap_or_default();
        let rack = self.config.rack.as_deref();
        let node =
            read_replica(prefer, leader, &isr, |n| rack.is_some() && self.client.broker_rack(n).as_deref() == rack);
        (node, true)
    }

    async fn send_fetch(&mut self, node: u32, replica_read: bool, parts: Vec<Asked>) -> Result<InFlight, ClientError> {
        let conn = match self.conns.get(&node).filter(|c| !c.is_broken()) {
            Some(c) => c.clone(),
            None => {
                let c = Rc::new(self.client.connect_node(node).await?);
                self.conns.insert(node, c.clone());
                c
            }
        };
        let req = FetchRequest {
            max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: self.config.min_bytes,
            max_bytes: self.config.max_bytes,
            isolation: self.config.isolation.wire(),
            replica_read,
            partitions: parts
                .iter()
                .map(|x| {
                    let token = x.token.unwrap_or_default();
                    FetchPartition {
                        topic: x.topic.to_string(),
                        partition: x.partition,
                        leader_epoch: self.client.cached_leader_epoch(&x.topic, x.partition),
                        fetch_offset: x.offset,
                        partition_max_bytes: self.config.partition_max_bytes,
                        min_high_watermark: token.min_high_watermark,
                        min_leader_epoch: token.min_leader_epoch,
                    }
                })
                .collect(),
        };
        let rx = conn.send(ApiKey::Fetch, &req).await?;
        let deadline = Instant::now() + self.config.max_wait + self.config.response_timeout;
        Ok(InFlight { node, conn, parts, rx, deadline })
    }

    /// Waits until at least one fetch is answered or the earliest deadline passes; returns
    /// every fetch answered by then, and those past their deadline as timed out (their
    /// connections dropped: everything behind them on it would wait as long).
    async fn wait_any(&mut self) -> Vec<(InFlight, Body)> {
        let deadline = self.in_flight.iter().map(|f| f.deadline).min().expect("called with fetches in flight");
        let in_flight = &mut self.in_flight;
        let ready = std::future::poll_fn(|cx| {
            let done: Vec<(usize, Body)> = in_flight
                .iter_mut()
                .enumerate()
                .filter_map(|(i, f)| match Pin::new(&mut f.rx).poll(cx) {
                    Poll::Ready(body) => Some((i, body.unwrap_or(Err(ClientError::ConnectionLost)))),
                    Poll::Pending => None,
                })
                .collect();
            if done.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(done)
            }
        });
        let done = match compio::time::timeout(deadline.saturating_duration_since(Instant::now()), ready).await {
            Ok(done) => done,
            Err(_) => {
                let now = Instant::now();
                let late: Vec<usize> =
                    (0..self.in_flight.len()).filter(|&i| self.in_flight[i].deadline <= now).collect();
                late.into_iter().map(|i| (i, Err(ClientError::Timeout("fetch: no answer in time".into())))).collect()
            }
        };
        // Remove from the back so the indices stay valid.
        let mut out = Vec::with_capacity(done.len());
        for (i, body) in done.into_iter().rev() {
            let f = self.in_flight.remove(i);
            if matches!(body, Err(ClientError::Timeout(_))) {
                f.conn.mark_broken();
            }
            out.push((f, body));
        }
        out.reverse();
        out
    }

    /// A fetch that failed as a whole: its partitions are fetched again on the next poll,
    /// from the leader if this fetch went to a follower.
    fn lost(&mut self, f: &InFlight, e: &ClientError) {
        tracing::debug!(node = f.node, error = %e, "fetch failed; retrying on the next poll");
        if e.refreshes_metadata() {
            f.parts.iter().for_each(|x| self.client.invalidate_metadata(&x.topic));
        }
        for x in f.parts.iter().filter(|x| x.follower) {
            if let Some(a) = self.assigned.iter_mut().find(|a| a.topic == x.topic && a.partition == x.partition) {
                a.to_leader = true;
                a.leader_until = Some(Instant::now() + self.config.lagging_replica_backoff);
            }
        }
        if f.conn.is_broken() {
            self.conns.retain(|_, c| !c.is_broken());
        }
    }

    /// Takes the batches of a fetch's answer into `out`, advancing positions. A partition
    /// with a retriable error is skipped (its metadata marked stale if that may be why; sent to
    /// the leader next if a follower was not caught up); the first non-retriable error is
    /// returned after every partition was taken.
    fn take_batches(
        &mut self,
        f: &InFlight,
        resp: FetchResponse,
        out: &mut Vec<FetchedBatch>,
    ) -> Result<(), ClientError> {
        let mut error = None;
        for part in resp.partitions {
            let Some(asked) = f.parts.iter().find(|x| *x.topic == *part.topic && x.partition == part.partition) else {
                continue; // not asked
            };
            let Some(i) = self
                .assigned
                .iter()
                .position(|a| a.topic == asked.topic && a.partition == asked.partition && a.position == asked.offset)
            else {
                continue; // moved by a seek since
            };
            self.stats.fetches += 1;
            if part.token_wait_us > 0 {
                self.stats.waited += 1;
            }
            let code = if part.error == ErrorCode::NONE && behind_token(&part, asked.token) {
                // The broker should have waited for the token: take nothing older than it.
                tracing::debug!(topic = %part.topic, partition = part.partition, node = f.node,
                    high_watermark = part.high_watermark, "answer behind the session token");
                ErrorCode::NOT_CAUGHT_UP
            } else {
                part.error
            };
            let entry = &mut self.assigned[i];
            entry.to_leader = code == ErrorCode::NOT_CAUGHT_UP && asked.follower;
            if entry.to_leader {
                entry.leader_until = Some(Instant::now() + self.config.lagging_replica_backoff);
            }
            match code {
                ErrorCode::NONE => {}
                ErrorCode::NOT_CAUGHT_UP => {
                    self.stats.not_caught_up += 1;
                    // From the leader there is nowhere better to go: pause before asking again.
                    self.backoff |= !asked.follower;
                    continue;
                }
                code if code.is_retriable() => {
                    let e = ClientError::Broker(code, String::new());
                    if e.refreshes_metadata() {
                        tracing::debug!(topic = %part.topic, partition = part.partition, %code, "refreshing metadata");
                        self.client.invalidate_metadata(&part.topic);
                    }
                    continue;
                }
                code => {
                    let what = format!("fetch {}/{} at {}", part.topic, part.partition, entry.position);
                    error.get_or_insert(ClientError::Broker(code, what));
                    continue;
                }
            }
            // A pipelined fetch left before the session's latest write or read was noted: its
            // answer met the token it carried but may be older than what the session knows
            // now (a poll after an acknowledgement must not show less). Ask again, with the
            // current token, from the same replica.
            let current = self.config.session.as_ref().and_then(|s| s.borrow().token(&part.topic, part.partition));
            if behind_token(&part, current) {
                tracing::trace!(topic = %part.topic, partition = part.partition, "answer older than the session; fetching again");
                continue;
            }
            if asked.follower {
                self.stats.follower_reads += 1;
            }
            entry.high_watermark = Some(part.high_watermark);
            entry.last_stable = Some(part.last_stable);
            if let Some(session) = &self.config.session {
                session.borrow_mut().note_read(&part.topic, part.partition, part.high_watermark, part.leader_epoch);
            }
            // Aborted transactions are listed only for read_committed; a broker listing them
            // otherwise is not obeyed (read_uncommitted shows every record).
            let aborted = match self.config.isolation {
                Isolation::ReadCommitted => &part.aborted[..],
                Isolation::ReadUncommitted => &[],
            };
            if let Err(e) = take_partition(entry, part.records, aborted, out) {
                error.get_or_insert(ClientError::Protocol(format!("{}/{}: {e}", part.topic, part.partition)));
            }
        }
        error.map_or(Ok(()), Err)
    }

    async fn resolve(&self, topic: &str, partition: u32, from: Position) -> Result<u64, ClientError> {
        let isolation = self.config.isolation;
        match from {
            Position::Offset(o) => Ok(o),
            Position::Beginning => self.client.list_offset(topic, partition, EARLIEST).await,
            // The end this consumer can read to: the last stable offset for read_committed.
            Position::End => self.client.list_offset_isolated(topic, partition, LATEST, isolation).await,
            Position::Timestamp(ts) => self.client.list_offset_isolated(topic, partition, ts, isolation).await,
        }
    }

    fn find(&self, topic: &str, partition: u32) -> Option<&Assigned> {
        self.assigned.iter().find(|a| &*a.topic == topic && a.partition == partition)
    }
}

/// The replica to read a partition from, given its leader and in-sync replicas, and which
/// nodes are in the consumer's rack (see [`ReadReplica`]). The leader whenever the preferred
/// replica is not in sync: only in-sync replicas know a recent high watermark.
/// The replica `prefer` picks among a partition's in-sync replicas (tables' follower reads
/// pick the same way).
pub(crate) fn read_replica(prefer: ReadReplica, leader: u32, isr: &[u32], in_my_rack: impl Fn(u32) -> bool) -> u32 {
    match prefer {
        ReadReplica::Leader => leader,
        ReadReplica::Node(node) if isr.contains(&node) => node,
        ReadReplica::Node(_) => leader,
        ReadReplica::Closest if isr.contains(&leader) && in_my_rack(leader) => leader,
        ReadReplica::Closest => isr.iter().copied().filter(|&n| in_my_rack(n)).min().unwrap_or(leader),
    }
}

/// Whether an answer reports less than the session token asked for: a lower high watermark,
/// or a lower leader epoch (an epoch of 0 is "unknown", as from a single-node broker).
fn behind_token(part: &FetchPartitionResponse, token: Option<Token>) -> bool {
    token.is_some_and(|t| {
        part.high_watermark < t.min_high_watermark || (part.leader_epoch != 0 && part.leader_epoch < t.min_leader_epoch)
    })
}

/// Parses the batches of one partition's records into `out`, advancing its position past
/// each, also past those not handed out: control batches (transaction markers) and batches of
/// the `aborted` transactions (empty but for read_committed).
fn take_partition(
    entry: &mut Assigned,
    mut records: BytesMut,
    aborted: &[AbortedTransaction],
    out: &mut Vec<FetchedBatch>,
) -> Result<(), BatchError> {
    while !records.is_empty() {
        let header = BatchHeader::decode(&records[..records.len().min(HEADER_BYTES)])?;
        let len = header.batch_length as usize;
        if len > records.len() {
            return Err(BatchError::Truncated { needed: len as u64, available: records.len() as u64 });
        }
        let batch = RecordBatch::parse(records.split_to(len))?;
        let from_offset = entry.position;
        entry.position = entry.position.max(batch.header().next_offset().get());
        if is_delivered(batch.header(), aborted) {
            out.push(FetchedBatch { topic: entry.topic.clone(), partition: entry.partition, from_offset, batch });
        }
    }
    Ok(())
}

/// Whether a fetched batch holds records for the application: not a control batch (a
/// transaction marker), and not a batch of one of the `aborted` transactions.
fn is_delivered(header: &BatchHeader, aborted: &[AbortedTransaction]) -> bool {
    !header.attributes.is_control() && !is_aborted(header, aborted)
}

/// Whether a batch belongs to one of the `aborted` transactions of a read_committed fetch
/// answer: a transactional batch of the same producer id whose base offset lies in the
/// transaction's `first_offset..last_offset` (its abort marker at `last_offset`). Another
/// transaction of the same producer outside that range, committed, is kept; so are batches
/// written outside transactions.
pub fn is_aborted(header: &BatchHeader, aborted: &[AbortedTransaction]) -> bool {
    if !header.attributes.is_transactional() {
        return false;
    }
    let base = header.base_offset.get();
    aborted.iter().any(|t| t.producer_id == header.producer_id.0 && t.first_offset <= base && base < t.last_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replica chosen for leader 1, ISR `isr`, with nodes `rack_b` in the consumer's rack.
    fn check(prefer: ReadReplica, isr: &[u32], rack_b: &[u32], expect: u32) {
        let got = read_replica(prefer, 1, isr, |n| rack_b.contains(&n));
        assert_eq!(got, expect, "{prefer:?} isr {isr:?} in rack {rack_b:?}");
    }

    #[test]
    fn reads_go_to_an_in_sync_replica_or_the_leader() {
        check(ReadReplica::Leader, &[1, 2, 3], &[2], 1);
        check(ReadReplica::Node(2), &[1, 2, 3], &[], 2);
        check(ReadReplica::Node(2), &[1, 3], &[], 1);
        check(ReadReplica::Node(4), &[1, 2, 3], &[], 1);
        check(ReadReplica::Node(1), &[1, 2], &[], 1);
        check(ReadReplica::Node(2), &[], &[], 1);
        // Closest: the leader if it is in the rack, else the lowest in-sync id in the rack.
        check(ReadReplica::Closest, &[1, 2, 3], &[1, 3], 1);
        check(ReadReplica::Closest, &[1, 3, 2], &[3, 2], 2);
        check(ReadReplica::Closest, &[1, 3], &[2], 1);
        check(ReadReplica::Closest, &[1, 3], &[], 1);
        check(ReadReplica::Closest, &[2, 3], &[1, 3], 3);
    }

    #[test]
    fn read_replica_parses_and_prints() {
        for (text, want) in
            [("leader", ReadReplica::Leader), ("closest", ReadReplica::Closest), ("7", ReadReplica::Node(7))]
        {
            assert_eq!(text.parse::<ReadReplica>(), Ok(want));
            assert_eq!(want.to_string(), text);
        }
        for bad in ["", "0", "-1", "Leader", "4294967296", "2,3", " 2"] {
            let err = bad.parse::<ReadReplica>().expect_err(bad);
            assert!(err.to_string().contains(&format!("'{bad}'")), "{err}");
        }
        assert_eq!(ReadReplica::default(), ReadReplica::Leader);
    }

    /// One batch of a fetch answer: `(base offset, records, producer id, transactional,
    /// control)`.
    type Spec = (u64, u32, i64, bool, bool);

    fn batch_bytes(specs: &[Spec]) -> BytesMut {
        use skein_log::batch::{Attributes, BatchBuilder};
        use skein_log::types::{Offset, ProducerEpoch, ProducerId, Sequence, Timestamp};
        let mut out = BytesMut::new();
        for &(base, records, pid, transactional, control) in specs {
            let attributes = Attributes::default().with_transactional(transactional).with_control(control);
            let mut b =
                BatchBuilder::new().producer(ProducerId(pid), ProducerEpoch(0), Sequence(0)).attributes(attributes);
            for i in 0..records {
                b.push(None, format!("v{}", base + u64::from(i)).as_bytes(), &[], Timestamp(1));
            }
            let mut batch = b.build();
            batch.set_base_offset(Offset(base));
            out.extend_from_slice(batch.as_bytes());
        }
        out
    }

    /// Takes an answer holding `specs` with these aborted transactions, from position
    /// `from`: the base offsets of the batches handed out, and the position after.
    fn check_taken(specs: &[Spec], aborted: &[(i64, u64, u64)], from: u64, delivered: &[u64], position: u64) {
        let mut entry = Assigned {
            topic: Rc::from("t"),
            partition: 0,
            position: from,
            high_watermark: None,
            last_stable: None,
            to_leader: false,
            leader_until: None,
            after: Vec::new(),
            sealed_at: None,
        };
        let aborted: Vec<AbortedTransaction> = aborted
            .iter()
            .map(|&(producer_id, first_offset, last_offset)| AbortedTransaction {
                producer_id,
                first_offset,
                last_offset,
            })
            .collect();
        let mut out = Vec::new();
        take_partition(&mut entry, batch_bytes(specs), &aborted, &mut out).expect("valid batches");
        let bases: Vec<u64> = out.iter().map(|f| f.batch.header().base_offset.get()).collect();
        assert_eq!(bases, delivered, "batches {specs:?} aborted {aborted:?}");
        assert_eq!(entry.position, position, "position after {specs:?}");
    }

    #[test]
    fn markers_are_skipped_and_aborted_transactions_dropped() {
        // Plain batches pass; the position moves past every batch taken.
        check_taken(&[(0, 2, -1, false, false), (2, 1, -1, false, false)], &[], 0, &[0, 2], 3);
        // A committed transaction: its data passes, its marker does not, the position passes both.
        check_taken(&[(0, 2, 7, true, false), (2, 1, 7, true, true)], &[], 0, &[0], 3);
        // An aborted one (its marker at 3): data and marker dropped, position past the marker.
        check_taken(&[(0, 2, 7, true, false), (2, 1, 7, true, false), (3, 1, 7, true, true)], &[(7, 0, 3)], 0, &[], 4);
        // Interleaved: producer 8's committed batch inside 7's aborted range passes.
        let specs = [(0, 1, 7, true, false), (1, 1, 8, true, false), (2, 1, 7, true, false), (3, 1, 7, true, true)];
        check_taken(&specs, &[(7, 0, 3)], 0, &[1], 4);
        // A later transaction of the same producer, after its abort marker, passes.
        let specs = [(0, 1, 7, true, false), (1, 1, 7, true, true), (2, 1, 7, true, false)];
        check_taken(&specs, &[(7, 0, 1)], 0, &[2], 3);
        // A non-transactional batch of the same producer id in the range is not a transaction's.
        check_taken(&[(0, 1, 7, false, false)], &[(7, 0, 5)], 0, &[0], 1);
        // Only markers: nothing delivered, and the position reaches the end (no stall on a marker).
        check_taken(&[(5, 1, 7, true, true), (6, 1, 9, true, true)], &[], 5, &[], 7);
    }

    #[test]
    fn isolation_parses_and_prints() {
        for i in [Isolation::ReadCommitted, Isolation::ReadUncommitted] {
            assert_eq!(i.name().parse::<Isolation>(), Ok(i));
            assert_eq!(i.to_string(), i.name());
        }
        assert_eq!(Isolation::default(), Isolation::ReadCommitted);
        assert_eq!(Isolation::ReadCommitted.wire(), READ_COMMITTED);
        assert!("committed".parse::<Isolation>().unwrap_err().contains("'committed'"));
    }

    #[test]
    fn answers_behind_the_token_are_detected() {
        let part = |high_watermark, leader_epoch| FetchPartitionResponse {
            topic: "t".into(),
            partition: 0,
            error: ErrorCode::NONE,
            high_watermark,
            leader_epoch,
            log_start: 0,
            token_wait_us: 0,
            last_stable: high_watermark,
            aborted: Vec::new(),
            records: BytesMut::new(),
        };
        let token = Some(Token { min_high_watermark: 10, min_leader_epoch: 3 });
        assert!(!behind_token(&part(5, 1), None), "no token, nothing to be behind");
        assert!(!behind_token(&part(10, 3), token));
        assert!(!behind_token(&part(11, 4), token));
        assert!(behind_token(&part(9, 3), token));
        assert!(behind_token(&part(10, 2), token));
        assert!(!behind_token(&part(10, 0), token), "epoch 0 is unknown");
    }
}
