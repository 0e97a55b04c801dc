//! One partition replica as a sans-IO state machine.
//!
//! Call protocol (the driver's side):
//! - `handle_state` with every [`PartitionState`] from the controller (stale ones are
//!   ignored: their epoch or ISR version is older than the replica's);
//! - `handle_produce` for a client's batch (the node checks its lease first);
//! - `handle_fetch` on the leader for a follower's [`FetchRequest`]; a returned
//!   [`FetchResponse`] goes back to that follower. A follower that has everything (its fetch
//!   is at the log end and names the leader's high watermark) gets `None`: the fetch is parked
//!   (a long poll) and answered by a [`Command::Send`] when a batch is appended, the high
//!   watermark moves or `fetch_wait_max_ms` passes, whichever is first; a newer fetch from the
//!   same follower replaces it. So records reach followers as soon as they are written, with
//!   no polling interval, and an idle follower costs one round trip per `fetch_wait_max_ms`;
//! - `handle_fetch_response` on the follower;
//! - `handle_io_done` when a [`Command::Io`] job finished: a write job (the batches appended
//!   since the last one reach the file; the log writes behind, `skein_log::Log`) or a sync
//!   job (group commit). At most one of each is out per replica; a sync covers what is written.
//! - `handle_tick` every few milliseconds (fetch scheduling, ISR shrink, produce deadlines).
//!
//! After each call, the commands pushed onto `out` are executed in order.
//!
//! Invariants: the high watermark never passes the log end (asserted) and never moves
//! backwards while the replica runs (checked by the simulator after every event); a leader only completes `acks=all` below its high watermark,
//! which is the smallest *durable* offset over the ISR (including proposed additions), and
//! `acks=leader` once its batch is written (in the OS's hands: it survives a process kill);
//! followers append only batches starting at their log end, and never truncate while a write
//! job is out (a write landing after a cut would bring cut batches back): an answer asking for
//! a truncation then waits, and so does the next fetch, until the job lands.

use std::collections::{BTreeMap, VecDeque};

use skein_log::batch::{batches_shared, RecordBatch};
use skein_log::storage::{Storage, StorageError, StorageFile};
use skein_log::types::{ProducerEpoch, ProducerId, Timestamp};
use skein_log::{Durability, Log, ReadLimit, SyncJob, WriteJob};

use super::autosplit::LoadMeter;
use super::producers::{ProducerStates, SequenceCheck};
use super::txn_partition::{marker_batch, marker_of, AbortedTxn, MarkerCheck, MarkerKind, PartitionTxns, WriteRefusal};
use super::{
    Acks, Command, FetchRequest, FetchResponse, IsrVersion, LeaderEpoch, Message, NodeId, Offset, PartitionId,
    PartitionState, Peer, ProduceError, ReadFailure, RequestId, Seal, Time,
};

type Handle<S> = <<S as Storage>::File as StorageFile>::SyncHandle;

/// A storage job of a replica's log, for the driver to run and report with `handle_io_done`.
pub enum Job<S: Storage> {
    /// Write the batches appended since the last write job.
    Write(WriteJob<Handle<S>>),
    /// fdatasync what is written (group commit).
    Sync(SyncJob<Handle<S>>),
}

impl<S: Storage> std::fmt::Debug for Job<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Write(j) => write!(f, "Write {{ upto: {}, bytes: {} }}", j.upto(), j.bytes()),
            Job::Sync(j) => write!(f, "Sync {{ upto: {} }}", j.upto()),
        }
    }
}

impl<S: Storage> Job<S> {
    /// Runs the job with blocking IO on the calling thread.
    pub fn run(&self) -> Result<(), StorageError> {
        match self {
            Job::Write(j) => j.run(),
            Job::Sync(j) => j.run(),
        }
    }
}

/// Settings of a replica.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// `acks=all` produces fail with NOT_ENOUGH_REPLICAS below this ISR size.
    pub min_insync_replicas: usize,
    /// A follower not caught up for this long leaves the ISR.
    pub replica_lag_max_ms: u64,
    /// Bytes per replication fetch.
    pub fetch_max_bytes: u32,
    /// A follower whose fetch got no records waits this long before the next.
    pub fetch_backoff_ms: u64,
    /// A fetch unanswered for this long is sent again (lost message, dead leader). Must be
    /// above `fetch_wait_max_ms`.
    pub fetch_timeout_ms: u64,
    /// Longest a leader holds a caught-up follower's fetch before answering it empty (a long
    /// poll); 0 answers at once (the follower then backs off `fetch_backoff_ms`).
    pub fetch_wait_max_ms: u64,
    /// An ISR proposal unanswered for this long is sent again.
    pub alter_isr_retry_ms: u64,
    /// How often the log's retention limits (`retention.ms`, `retention.bytes`) are applied,
    /// on leader and followers alike, each deleting only whole segments below its high
    /// watermark.
    pub retention_check_ms: u64,
    /// With `flush.ms=always`, the batches appended while a sync is out wait for the next one
    /// and go to disk in its job (`Log::begin_write_sync`: one job per commit group), unless an
    /// `acks=leader` produce waits for a write. Off: every batch gets a write job at once and a
    /// sync follows it, as with `acks=leader` (unit tests that step the two apart use that).
    pub write_with_sync: bool,
    /// A leader measures its load over windows of this many milliseconds and reports each to
    /// the controller (`Message::Load`), for automatic splits and merges
    /// ([`super::autosplit`]); `None` (topics without automatic settings): no measuring.
    pub load_window_ms: Option<u64>,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            min_insync_replicas: 2,
            replica_lag_max_ms: 300,
            fetch_max_bytes: 1 << 20,
            fetch_backoff_ms: 5,
            fetch_timeout_ms: 100,
            fetch_wait_max_ms: 50,
            alter_isr_retry_ms: 100,
            retention_check_ms: 100,
            write_with_sync: true,
            load_window_ms: None,
        }
    }
}

/// Bugs the simulator can plant to prove its checks catch them. Outside the crate a planted
/// bug can only be made with [`Plant::named`], which exists only with the `sim` feature: every
/// other build has `Plant::default()`, no bug.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plant {
    /// Epoch checks off: stale partition states, fetches and responses are accepted.
    pub(crate) no_fencing: bool,
    /// A follower told its log diverges does not truncate.
    pub(crate) no_truncation: bool,
    /// `acks=all` is acknowledged right after the leader's own append.
    pub(crate) early_ack: bool,
    /// Idempotent producers' retries are appended again instead of recognized.
    pub(crate) no_idempotence: bool,
    /// The group coordinator accepts offset commits from anyone: no member id, member epoch
    /// or ownership check (`GroupCoordinator::commit_planted`).
    pub(crate) no_generation_fencing: bool,
    /// The transaction coordinator keeps a producer's epoch across its transactions (no
    /// KIP-890 part 2 bump), so a delayed end or write of one can land on the next.
    pub(crate) no_txn_epoch_bump: bool,
    /// Partitions accept transactional writes without the producer's transaction having
    /// begun there (no KIP-890 part 1 check).
    pub(crate) no_partition_check: bool,
    /// Table machines skip read validation for serializable and SSI parts (stale reads and
    /// phantoms commit): `TableMachine::with_plant`.
    pub(crate) no_read_validation: bool,
    /// Table levels serializable, SSI, 2PL and serial run as snapshot isolation (no read
    /// validation, locks, SSI tracking or serial turn; first committer wins): write skew
    /// commits. `TableMachine::with_plant`, `PartitionLeader::with_plant`.
    pub(crate) snapshot_as_serializable: bool,
    /// The simulator's consumers of a splitting topic read every partition at once, without
    /// reading its parents to their seals first (a client-side bug: per-key order breaks).
    pub(crate) ignore_lineage: bool,
    /// A sealing partition refuses data before the idempotent duplicate check: a retry of a
    /// batch written before the seal is refused, and the producer writes it again in a child.
    pub(crate) seal_before_dedup: bool,
}

impl Plant {
    /// The names `named` knows.
    #[cfg(feature = "sim")]
    pub const NAMES: [&'static str; 11] = [
        "no-fencing",
        "no-truncation",
        "early-ack",
        "no-idempotence",
        "no-generation-fencing",
        "no-txn-epoch-bump",
        "no-partition-check",
        "no-read-validation",
        "snapshot-as-serializable",
        "ignore-lineage",
        "seal-before-dedup",
    ];

    /// A planted bug by name (simulator builds only).
    #[cfg(feature = "sim")]
    pub fn named(name: &str) -> Option<Plant> {
        let mut p = Plant::default();
        match name {
            "no-fencing" => p.no_fencing = true,
            "no-truncation" => p.no_truncation = true,
            "early-ack" => p.early_ack = true,
            "no-idempotence" => p.no_idempotence = true,
            "no-generation-fencing" => p.no_generation_fencing = true,
            "no-txn-epoch-bump" => p.no_txn_epoch_bump = true,
            "no-partition-check" => p.no_partition_check = true,
            "no-read-validation" => p.no_read_validation = true,
            "snapshot-as-serializable" => p.snapshot_as_serializable = true,
            "ignore-lineage" => p.ignore_lineage = true,
            "seal-before-dedup" => p.seal_before_dedup = true,
            _ => return None,
        }
        Some(p)
    }

    /// Whether the no-fencing bug is planted.
    pub fn no_fencing(&self) -> bool {
        self.no_fencing
    }

    /// Whether the no-txn-epoch-bump bug is planted.
    pub fn no_txn_epoch_bump(&self) -> bool {
        self.no_txn_epoch_bump
    }
}

/// A replica's role.
#[derive(Debug)]
enum Role {
    /// No leader known, not a replica, or stepped down.
    Offline,
    Leader(LeaderState),
    Follower(FollowerState),
}

#[derive(Debug)]
struct LeaderState {
    /// The log end when this replica became leader: followers must pass it to join the ISR.
    epoch_start: Offset,
    followers: BTreeMap<NodeId, FollowerProgress>,
    /// An ISR change sent to the controller and not yet answered: (proposal, sent at).
    pending_isr: Option<(Vec<NodeId>, Time)>,
    /// When this leader last reported a sealing partition's log end to the controller.
    seal_reported: Option<Time>,
    /// What this leader appended per window (with `load_window_ms`).
    load: LoadMeter,
    /// `acks=all` produces waiting for the high watermark: (batch end, request, base, deadline).
    waiting: VecDeque<(Offset, RequestId, Offset, Time)>,
}

#[derive(Debug, Clone, Copy)]
struct FollowerProgress {
    /// Known only from fetches of this epoch; zero until then.
    log_end: Offset,
    durable: Offset,
    last_caught_up: Time,
    last_fetch_leader_end: Offset,
    last_fetch_at: Time,
    /// Its fetch, held until there is something to send (a long poll).
    parked: Option<Parked>,
}

/// A follower's fetch the leader holds.
#[derive(Debug, Clone, Copy)]
struct Parked {
    correlation: u64,
    fetch_offset: Offset,
    since: Time,
}

#[derive(Debug)]
struct FollowerState {
    leader: NodeId,
    /// When the outstanding fetch was sent.
    in_flight: Option<Time>,
    /// Earliest time of the next fetch.
    next_fetch: Time,
    /// Planted no-truncation: the epoch the follower pretends to have truncated to.
    pretend_epoch: Option<LeaderEpoch>,
    /// Correlation of the latest fetch.
    correlation: u64,
    /// The durable offset the outstanding fetch reported: a sync that moves it past this
    /// sends a new fetch at once (the leader's high watermark waits for it), replacing the
    /// outstanding one, which the leader may be holding.
    durable_reported: Offset,
    /// An answer asking for a truncation came while a write job was out: no fetch until the
    /// job lands (a truncation must not overtake a write; the fetch asks again then).
    truncation_waits: bool,
}

/// One partition replica. See the module docs for the call protocol.
pub struct Replica<S: Storage> {
    id: NodeId,
    partition: PartitionId,
    config: ReplicaConfig,
    plant: Plant,
    log: Log<S>,
    state: Option<PartitionState>,
    role: Role,
    high_watermark: Offset,
    sync_in_flight: bool,
    /// `acks=leader` produces waiting for their batch to be written: (batch end, request, base).
    written_waiting: VecDeque<(Offset, RequestId, Offset)>,
    failed: bool,
    /// Fetch correlations, increasing over the replica's life (across leader changes).
    fetch_correlation: u64,
    /// Idempotent producers' recent batches, from this replica's log.
    producers: ProducerStates,
    /// Transactions open, ended and aborted here, from this replica's log.
    txns: PartitionTxns,
    /// When retention is applied next.
    next_retention: Time,
}

impl<S: Storage> Replica<S> {
    /// A replica over an opened log. It does nothing until it receives a partition state.
    pub fn new(id: NodeId, partition: PartitionId, config: ReplicaConfig, plant: Plant, log: Log<S>) -> Self {
        // After a restart the high watermark is unknown; the log start is safe (the leader
        // tells followers the real one; a new leader recomputes it from its ISR).
        let high_watermark = log.log_start_offset();
        let mut replica = Replica {
            id,
            partition,
            config,
            plant,
            log,
            state: None,
            role: Role::Offline,
            high_watermark,
            sync_in_flight: false,
            written_waiting: VecDeque::new(),
            failed: false,
            fetch_correlation: 0,
            producers: ProducerStates::default(),
            txns: PartitionTxns::planted(plant.no_partition_check, plant.no_txn_epoch_bump),
            next_retention: Time(0),
        };
        if let Err(e) = replica.rebuild_producers() {
            tracing::error!(node = %id, %partition, error = %e, "reading producer state from the log failed");
            replica.failed = true;
        }
        replica
    }

    /// Rebuilds the idempotent producer and transaction states from the log (after opening
    /// and truncating), in one pass over its batches. Reads the whole log; a producer-state
    /// snapshot (as Kafka's) is the remedy if that ever shows in restart times.
    fn rebuild_producers(&mut self) -> Result<(), skein_log::ReadError> {
        self.producers.clear();
        self.txns.clear();
        let mut from = self.log.log_start_offset();
        let end = self.log.log_end_offset();
        let mut buf = Vec::new();
        while from < end {
            buf.clear();
            let limit = ReadLimit { max_bytes: 1 << 20, end: None };
            let range = self.log.read_verified(from, limit, &mut buf)?;
            for b in skein_log::batch::batches(&buf).flatten() {
                self.producers.note(b.header());
                self.txns.note(&b, b.header().base_offset);
            }
            if range.next_offset <= from {
                break;
            }
            from = range.next_offset;
        }
        Ok(())
    }

    /// The epoch this replica serves reads (and coordinates) at: it leads, and its high
    /// watermark reached its epoch's start, so everything earlier leaders showed readers is
    /// below it (`LeaderNotReady` until then).
    pub fn serving(&self) -> Result<LeaderEpoch, ProduceError> {
        if self.failed {
            return Err(ProduceError::Storage);
        }
        let Role::Leader(l) = &self.role else { return Err(ProduceError::NotLeader) };
        if self.high_watermark < l.epoch_start {
            return Err(ProduceError::LeaderNotReady);
        }
        Ok(self.epoch())
    }

    /// The last stable offset: below it, every transaction is decided (the high watermark
    /// when none is open).
    pub fn last_stable(&self) -> Offset {
        self.txns.last_stable(self.high_watermark)
    }

    /// The aborted transactions overlapping `from..to` (for read_committed fetches).
    pub fn aborted_in(&self, from: Offset, to: Offset) -> Vec<AbortedTxn> {
        self.txns.aborted_in(from, to)
    }

    /// The transaction state (for checks and tools).
    pub fn txns(&self) -> &PartitionTxns {
        &self.txns
    }

    /// The partition.
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// The log (read-only; for invariant checks and reads).
    pub fn log(&self) -> &Log<S> {
        &self.log
    }

    /// The high watermark: records below it are committed (on disk on every ISR member).
    pub fn high_watermark(&self) -> Offset {
        self.high_watermark
    }

    /// The latest partition state accepted.
    pub fn state(&self) -> Option<&PartitionState> {
        self.state.as_ref()
    }

    /// The epoch this replica leads, if it is the leader.
    pub fn leader_epoch(&self) -> Option<LeaderEpoch> {
        match (&self.role, &self.state) {
            (Role::Leader(_), Some(s)) => Some(s.epoch),
            _ => None,
        }
    }

    /// Whether a storage error stopped this replica.
    pub fn failed(&self) -> bool {
        self.failed
    }

    fn epoch(&self) -> LeaderEpoch {
        self.state.as_ref().map_or(LeaderEpoch(0), |s| s.epoch)
    }

    /// A new partition state from the controller.
    pub fn handle_state(&mut self, now: Time, new: PartitionState, out: &mut Vec<Command<Job<S>>>) {
        assert_eq!(new.partition, self.partition, "state for another partition routed here");
        if self.failed {
            return;
        }
        if let Some(old) = &self.state {
            let stale = new.epoch < old.epoch || (new.epoch == old.epoch && new.isr_version <= old.isr_version);
            if stale && !self.plant.no_fencing {
                return;
            }
            if new == *old {
                return;
            }
        }
        let same_epoch_leader =
            matches!(self.role, Role::Leader(_)) && self.state.as_ref().is_some_and(|o| o.epoch == new.epoch);
        let me = self.id;
        self.state = Some(new.clone());
        if new.leader == Some(me) && new.replicas.contains(&me) {
            if same_epoch_leader {
                // An ISR change of our own epoch: the proposal was answered (or superseded). A
                // reassignment may have added replicas (tracked from now) or removed some.
                let log_end = self.log.log_end_offset();
                if let Role::Leader(l) = &mut self.role {
                    l.pending_isr = None;
                    l.followers.retain(|r, _| new.replicas.contains(r));
                    for &r in new.replicas.iter().filter(|&&r| r != me) {
                        l.followers.entry(r).or_insert(FollowerProgress {
                            log_end: Offset(0),
                            durable: Offset(0),
                            last_caught_up: now,
                            last_fetch_leader_end: log_end,
                            last_fetch_at: now,
                            parked: None,
                        });
                    }
                }
            } else {
                self.abandon_waiting(out);
                let log_end = self.log.log_end_offset();
                let followers = new
                    .replicas
                    .iter()
                    .filter(|&&r| r != me)
                    .map(|&r| {
                        let p = FollowerProgress {
                            log_end: Offset(0),
                            durable: Offset(0),
                            last_caught_up: now,
                            last_fetch_leader_end: log_end,
                            last_fetch_at: now,
                            parked: None,
                        };
                        (r, p)
                    })
                    .collect();
                tracing::debug!(node = %me, partition = %self.partition, epoch = %new.epoch, %log_end, "leader");
                self.role = Role::Leader(LeaderState {
                    epoch_start: log_end,
                    followers,
                    pending_isr: None,
                    seal_reported: None,
                    load: LoadMeter::default(),
                    waiting: VecDeque::new(),
                });
            }
            self.advance_high_watermark(now, out);
            self.report_seal(now, out);
        } else if let Some(leader) = new.leader.filter(|_| new.replicas.contains(&me)) {
            self.abandon_waiting(out);
            let keep_pretend = match &self.role {
                Role::Follower(f) if f.leader == leader => f.pretend_epoch,
                _ => None,
            };
            tracing::debug!(node = %me, partition = %self.partition, epoch = %new.epoch, %leader, "follower");
            self.role = Role::Follower(FollowerState {
                leader,
                in_flight: None,
                next_fetch: now,
                pretend_epoch: keep_pretend,
                correlation: self.fetch_correlation,
                durable_reported: Offset(0),
                truncation_waits: false,
            });
            self.maybe_fetch(now, out);
        } else {
            tracing::debug!(node = %me, partition = %self.partition, epoch = %new.epoch, "offline");
            self.abandon_waiting(out);
            self.role = Role::Offline;
        }
    }

    /// A client's batch. `client_epoch` is the leader epoch the client's metadata names, if any;
    /// `lease_ok` says whether the node's controller lease is valid.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_produce<B: AsRef<[u8]> + AsMut<[u8]> + Into<bytes::Bytes>>(
        &mut self,
        now: Time,
        request: RequestId,
        client_epoch: Option<LeaderEpoch>,
        batch: RecordBatch<B>,
        acks: Acks,
        deadline: Time,
        lease_ok: bool,
        out: &mut Vec<Command<Job<S>>>,
    ) {
        let epoch = self.epoch();
        let reject = |out: &mut Vec<Command<Job<S>>>, e| out.push(Command::ProduceReply { request, result: Err(e) });
        if self.failed {
            return reject(out, ProduceError::Storage);
        }
        let Role::Leader(_) = &self.role else { return reject(out, ProduceError::NotLeader) };
        if !lease_ok && !self.plant.no_fencing {
            return reject(out, ProduceError::NotLeader);
        }
        if let Some(ce) = client_epoch {
            if ce < epoch && !self.plant.no_fencing {
                return reject(out, ProduceError::FencedLeaderEpoch);
            }
        }
        let isr_len = self.state.as_ref().map_or(0, |s| s.isr.len());
        if acks == Acks::All && isr_len < self.config.min_insync_replicas {
            return reject(out, ProduceError::NotEnoughReplicas);
        }
        // Only coordinators write markers (`handle_marker`).
        if batch.header().attributes.is_control() {
            return reject(out, ProduceError::InvalidTxnState);
        }
        if self.plant.seal_before_dedup && self.state.as_ref().is_some_and(|s| s.seal.refuses_data()) {
            return reject(out, ProduceError::Sealed);
        }
        if !self.plant.no_idempotence {
            match self.producers.check(batch.header()) {
                SequenceCheck::Append => {}
                SequenceCheck::Duplicate { base, end } => {
                    // A retry of a batch already written: answer as the original would be.
                    let committed = end <= self.high_watermark;
                    match (acks, &mut self.role) {
                        (Acks::All, Role::Leader(l)) if !committed && !self.plant.early_ack => {
                            l.waiting.push_back((end, request, base, deadline));
                        }
                        _ => out.push(Command::ProduceReply { request, result: Ok(base) }),
                    }
                    return;
                }
                SequenceCheck::OutOfOrder => return reject(out, ProduceError::OutOfOrderSequence),
                SequenceCheck::Fenced => return reject(out, ProduceError::ProducerFenced),
            }
        }
        // After the duplicate check: a retry of a batch written before the seal (its answer
        // lost with a leader) gets its offset, not a refusal that would send it elsewhere too.
        if self.state.as_ref().is_some_and(|s| s.seal.refuses_data()) {
            return reject(out, ProduceError::Sealed);
        }
        match self.txns.check_write(batch.header()) {
            Ok(()) => {}
            Err(WriteRefusal::Fenced) => return reject(out, ProduceError::ProducerFenced),
            Err(WriteRefusal::NotInTransaction | WriteRefusal::Control) => {
                return reject(out, ProduceError::InvalidTxnState)
            }
        }
        self.append_as_leader(now, request, batch, acks, deadline, out);
    }

    /// A transaction marker from a coordinator. An end marker is answered once committed (the
    /// coordinator counts a partition decided only then); a duplicate once everything in the
    /// log now is committed (the original may still be uncommitted). A `Begin` is answered
    /// once written here (`acks=leader`): the producer's writes that follow it are appended
    /// after it in this log, so none of them commits without it, and if it is lost with this
    /// leader they are refused by the next one (no open transaction there), which aborts the
    /// transaction. It saves the producer a commit round per partition and transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_marker(
        &mut self,
        now: Time,
        request: RequestId,
        producer: ProducerId,
        producer_epoch: ProducerEpoch,
        kind: MarkerKind,
        deadline: Time,
        lease_ok: bool,
        out: &mut Vec<Command<Job<S>>>,
    ) {
        let reject = |out: &mut Vec<Command<Job<S>>>, e| out.push(Command::ProduceReply { request, result: Err(e) });
        if self.failed {
            return reject(out, ProduceError::Storage);
        }
        let Role::Leader(_) = &self.role else { return reject(out, ProduceError::NotLeader) };
        if !lease_ok && !self.plant.no_fencing {
            return reject(out, ProduceError::NotLeader);
        }
        let isr_len = self.state.as_ref().map_or(0, |s| s.isr.len());
        if isr_len < self.config.min_insync_replicas {
            return reject(out, ProduceError::NotEnoughReplicas);
        }
        // A sealing partition still takes the end markers of transactions open on it (it
        // reports its seal once none is) and begins none; an end for a transaction not open
        // here (its Begin refused, or a sealed partition, where none is open) is answered
        // without writing, so nothing lands past the seal and the coordinator's transaction
        // completes. Retries of markers already written are answered as before.
        let seal = self.state.as_ref().map_or(Seal::Open, |s| s.seal);
        let check = self.txns.check_marker(producer, producer_epoch, kind);
        if seal != Seal::Open && check == MarkerCheck::Append {
            if kind == MarkerKind::Begin {
                return reject(out, ProduceError::Sealed);
            }
            if !self.txns.open().iter().any(|(p, _, _)| *p == producer) {
                out.push(Command::ProduceReply { request, result: Ok(self.log.log_end_offset()) });
                return;
            }
        }
        match check {
            MarkerCheck::Append => {
                let batch = marker_batch(producer, producer_epoch, kind, now.timestamp());
                let acks = if kind == MarkerKind::Begin { Acks::Leader } else { Acks::All };
                self.append_as_leader(now, request, batch, acks, deadline, out);
            }
            MarkerCheck::Done if kind == MarkerKind::Begin => {
                out.push(Command::ProduceReply { request, result: Ok(self.log.log_end_offset()) });
            }
            MarkerCheck::Done => {
                let end = self.log.log_end_offset();
                match &mut self.role {
                    Role::Leader(l) if end > self.high_watermark && !self.plant.early_ack => {
                        l.waiting.push_back((end, request, end, deadline));
                    }
                    _ => out.push(Command::ProduceReply { request, result: Ok(end) }),
                }
            }
            MarkerCheck::Stale => reject(out, ProduceError::ProducerFenced),
        }
    }

    /// Appends a checked batch as leader and queues its answer as `acks` asks.
    fn append_as_leader<B: AsRef<[u8]> + AsMut<[u8]> + Into<bytes::Bytes>>(
        &mut self,
        now: Time,
        request: RequestId,
        mut batch: RecordBatch<B>,
        acks: Acks,
        deadline: Time,
        out: &mut Vec<Command<Job<S>>>,
    ) {
        let reject = |out: &mut Vec<Command<Job<S>>>, e| out.push(Command::ProduceReply { request, result: Err(e) });
        batch.set_leader_epoch(self.epoch());
        let marker = marker_of(&batch);
        if let (Some(_), Role::Leader(l), None) = (self.config.load_window_ms, &mut self.role, marker) {
            // One key copied for one batch in a few; nothing per record.
            let records = u64::from(batch.header().record_count);
            let sample = l.load.sample_index(records as usize);
            let key = sample.and_then(|i| batch.records().get(i).and_then(|r| r.key.as_ref()));
            l.load.note(now, records, u64::from(batch.len_bytes()), key.map(|k| k.as_slice()));
        }
        let mut header = *batch.header();
        let info = match self.log.append(batch, now.timestamp()) {
            Ok(info) => info,
            Err(e) => {
                self.fail(format!("append failed: {e}"), out);
                return reject(out, ProduceError::Storage);
            }
        };
        header.base_offset = info.base_offset; // as the log stamped it
        self.producers.note(&header);
        if let Some(kind) = marker {
            self.txns.note_marker(header.producer_id, header.producer_epoch, kind, info.base_offset);
        }
        match acks {
            Acks::All if !self.plant.early_ack => {
                if let Role::Leader(l) = &mut self.role {
                    l.waiting.push_back((info.log_end_offset, request, info.base_offset, deadline));
                }
            }
            Acks::Leader => self.written_waiting.push_back((info.log_end_offset, request, info.base_offset)),
            Acks::All => out.push(Command::ProduceReply { request, result: Ok(info.base_offset) }),
        }
        // A roll writes the sealed segment's rest inline, so the batch may be written already.
        self.answer_written(out);
        self.maybe_sync(now, out);
        self.advance_high_watermark(now, out);
        // The new batch goes to the followers whose fetches are held.
        self.answer_parked(now, true, out);
    }

    /// A follower's fetch (leader side). Returns the response for the follower, or `None` if
    /// the fetch is parked (see the module docs): it is answered later by a `Command::Send`.
    pub fn handle_fetch(
        &mut self,
        now: Time,
        req: &FetchRequest,
        out: &mut Vec<Command<Job<S>>>,
    ) -> Option<FetchResponse> {
        let partition = self.partition;
        let epoch = self.epoch();
        let correlation = req.correlation;
        let fenced = FetchResponse::Fenced { partition, correlation, epoch };
        if self.failed || !matches!(self.role, Role::Leader(_)) {
            return Some(fenced);
        }
        if req.epoch != epoch && !self.plant.no_fencing {
            if req.epoch > epoch {
                // Someone follows a newer epoch: this leader is stale. Step down at once.
                tracing::debug!(node = %self.id, partition = %partition, %epoch, newer = %req.epoch, "step down");
                self.abandon_waiting(out);
                self.role = Role::Offline;
            }
            return Some(fenced);
        }
        let log_end = self.log.log_end_offset();
        // Divergence check (KIP-320): the follower's last epoch must end at or after its
        // fetch offset here, with the same epoch.
        let diverging =
            |end_epoch, end_offset| FetchResponse::Diverging { partition, correlation, epoch, end_epoch, end_offset };
        let log_start = self.log.log_start_offset();
        if req.fetch_offset < log_start {
            // Retention deleted what the follower asks for: it starts over at the log start.
            return Some(FetchResponse::OutOfRange { partition, correlation, epoch, log_start });
        }
        match req.last_fetched_epoch.map(|last| (last, self.log.end_offset_for_epoch(last))) {
            Some((last, Some((e, end)))) if e == last && end >= req.fetch_offset => {}
            Some((_, Some((e, end)))) => return Some(diverging(e, end)),
            // The follower's epochs are all older than this log's, or it is empty but claims
            // records: it starts over from the log start.
            Some((_, None)) => return Some(diverging(LeaderEpoch(0), log_start)),
            None if req.fetch_offset > log_start => return Some(diverging(LeaderEpoch(0), log_start)),
            None => {}
        }
        if req.fetch_offset > log_end {
            return Some(FetchResponse::Diverging {
                partition,
                correlation,
                epoch,
                end_epoch: self.log.epochs().latest().map_or(LeaderEpoch(0), |e| e.epoch),
                end_offset: log_end,
            });
        }
        // Track the follower.
        let mut expand = None;
        if let Role::Leader(l) = &mut self.role {
            if let Some(p) = l.followers.get_mut(&req.replica) {
                // A newer fetch replaces a held one (the follower ignores answers to it).
                p.parked = None;
                if req.fetch_offset >= log_end {
                    p.last_caught_up = now;
                } else if req.fetch_offset >= p.last_fetch_leader_end {
                    p.last_caught_up = p.last_caught_up.max(p.last_fetch_at);
                }
                p.last_fetch_leader_end = log_end;
                p.last_fetch_at = now;
                p.log_end = req.fetch_offset;
                p.durable = req.durable_offset.min(req.fetch_offset);
                let in_isr = self.state.as_ref().is_some_and(|s| s.isr.contains(&req.replica));
                if !in_isr && p.durable >= self.high_watermark && p.log_end >= l.epoch_start && l.pending_isr.is_none()
                {
                    expand = Some(req.replica);
                }
            }
        }
        if let Some(r) = expand {
            let mut isr = self.state.as_ref().map(|s| s.isr.clone()).unwrap_or_default();
            isr.push(r);
            isr.sort();
            self.propose_isr(now, isr, out);
        }
        self.advance_high_watermark(now, out);
        // Nothing to send (no records, no news of the high watermark): hold the fetch.
        let hw = self.high_watermark;
        let wait = self.config.fetch_wait_max_ms;
        if let Role::Leader(l) = &mut self.role {
            if let Some(p) = l.followers.get_mut(&req.replica) {
                if wait > 0 && req.fetch_offset >= log_end && req.high_watermark == hw {
                    p.parked = Some(Parked { correlation, fetch_offset: req.fetch_offset, since: now });
                    return None;
                }
            }
        }
        Some(self.fetch_answer(correlation, req.fetch_offset, out))
    }

    /// The records from `fetch_offset` and the high watermark, for a follower's fetch that
    /// passed the checks.
    fn fetch_answer(
        &mut self,
        correlation: u64,
        fetch_offset: Offset,
        out: &mut Vec<Command<Job<S>>>,
    ) -> FetchResponse {
        let (partition, epoch) = (self.partition, self.epoch());
        let mut batches = Vec::new();
        if fetch_offset < self.log.log_end_offset() {
            let limit = ReadLimit { max_bytes: self.config.fetch_max_bytes, end: None };
            if let Err(e) = self.log.read_verified(fetch_offset, limit, &mut batches) {
                self.fail(format!("read for replication failed: {e}"), out);
                return FetchResponse::Fenced { partition, correlation, epoch };
            }
        }
        FetchResponse::Records { partition, correlation, epoch, batches, high_watermark: self.high_watermark }
    }

    /// Answers held fetches: all of them (`all`: a batch was appended or the high watermark
    /// moved), or those held for `fetch_wait_max_ms`.
    fn answer_parked(&mut self, now: Time, all: bool, out: &mut Vec<Command<Job<S>>>) {
        let wait = self.config.fetch_wait_max_ms;
        let Role::Leader(l) = &mut self.role else { return };
        let due: Vec<(NodeId, Parked)> = l
            .followers
            .iter_mut()
            .filter(|(_, p)| p.parked.is_some_and(|k| all || now.ms_since(k.since) >= wait))
            .filter_map(|(&r, p)| p.parked.take().map(|k| (r, k)))
            .collect();
        for (replica, k) in due {
            let resp = self.fetch_answer(k.correlation, k.fetch_offset, out);
            if self.failed {
                return;
            }
            out.push(Command::Send { to: Peer::Node(replica), msg: Message::FetchResponse(resp) });
        }
    }

    /// The leader's answer to this follower's fetch.
    pub fn handle_fetch_response(&mut self, now: Time, resp: FetchResponse, out: &mut Vec<Command<Job<S>>>) {
        if self.failed {
            return;
        }
        let my_epoch = self.epoch();
        let Role::Follower(f) = &mut self.role else { return };
        let (resp_epoch, correlation) = match &resp {
            FetchResponse::Records { epoch, correlation, .. }
            | FetchResponse::Diverging { epoch, correlation, .. }
            | FetchResponse::OutOfRange { epoch, correlation, .. }
            | FetchResponse::Fenced { epoch, correlation, .. } => (*epoch, *correlation),
        };
        if f.in_flight.is_none() || correlation != f.correlation {
            return; // a duplicate, or the answer to a fetch given up on
        }
        let sent = f.in_flight.take().expect("checked above");
        if resp_epoch != my_epoch && !self.plant.no_fencing {
            // A late answer from an older leader, or the leader moved on: wait for state.
            f.next_fetch = now.plus_ms(self.config.fetch_backoff_ms);
            return;
        }
        if self.log.writing() && matches!(resp, FetchResponse::Diverging { .. } | FetchResponse::OutOfRange { .. }) {
            // A truncation waits for the write job out; the fetch goes again once it lands.
            f.truncation_waits = true;
            f.next_fetch = now;
            return;
        }
        match resp {
            FetchResponse::Fenced { .. } => {
                f.next_fetch = now.plus_ms(self.config.fetch_backoff_ms);
            }
            FetchResponse::OutOfRange { log_start, .. } => {
                f.next_fetch = now;
                f.pretend_epoch = None;
                if self.log.log_end_offset() < log_start {
                    // Nothing this log holds is on the leader any more: empty it and start at
                    // the leader's log start (the records before it are deleted everywhere).
                    tracing::info!(node = %self.id, partition = %self.partition, %log_start, log_end = %self.log.log_end_offset(), "behind the leader's log start: starting over there");
                    if let Err(e) = self.log.truncate_fully_and_start_at(log_start, now.timestamp()) {
                        return self.fail(format!("restarting the log at {log_start} failed: {e}"), out);
                    }
                    self.abandon_unwritten(out);
                    self.high_watermark = log_start;
                    if let Err(e) = self.rebuild_producers() {
                        return self.fail(format!("reading producer state after restarting the log failed: {e}"), out);
                    }
                }
            }
            FetchResponse::Diverging { end_epoch, end_offset, .. } => {
                if self.plant.no_truncation {
                    let _ = end_epoch;
                    f.pretend_epoch = Some(my_epoch);
                    f.next_fetch = now;
                } else {
                    let own_end = self.log.end_offset_for_epoch(end_epoch).map(|(_, o)| o);
                    let to = own_end.map_or(self.log.log_start_offset(), |o| o.min(end_offset));
                    let to = to.max(self.log.log_start_offset());
                    f.next_fetch = now;
                    f.pretend_epoch = None;
                    tracing::debug!(node = %self.id, partition = %self.partition, %end_epoch, %end_offset, %to, log_end = %self.log.log_end_offset(), "truncate");
                    if let Err(e) = self.log.truncate_to(to) {
                        return self.fail(format!("truncation to {to} failed: {e}"), out);
                    }
                    self.answer_cut_written(out);
                    self.high_watermark = self.high_watermark.min(self.log.log_end_offset());
                    if let Err(e) = self.rebuild_producers() {
                        return self.fail(format!("reading producer state after truncation failed: {e}"), out);
                    }
                }
            }
            FetchResponse::Records { batches: bytes, high_watermark, .. } => {
                let mut got = 0;
                // The log keeps each batch as a slice of the response's buffer.
                let bytes = bytes::Bytes::from(bytes);
                for b in batches_shared(&bytes) {
                    let Ok(b) = b else { break };
                    // A stale answer (the log moved since it was asked): drop the rest.
                    let header = *b.header();
                    if header.base_offset != self.log.log_end_offset() {
                        break;
                    }
                    let marker = marker_of(&b);
                    if let Err(e) = self.log.append_replicated(b, now.timestamp()) {
                        return self.fail(format!("replicated append failed: {e}"), out);
                    }
                    self.producers.note(&header);
                    if let Some(kind) = marker {
                        self.txns.note_marker(header.producer_id, header.producer_epoch, kind, header.base_offset);
                    }
                    got += 1;
                }
                tracing::trace!(node = %self.id, partition = %self.partition, got, log_end = %self.log.log_end_offset(), %high_watermark, "fetched");
                let hw = high_watermark.min(self.log.log_end_offset());
                let news = hw > self.high_watermark;
                if news {
                    self.high_watermark = hw;
                }
                self.maybe_sync(now, out);
                let long_poll = self.config.fetch_wait_max_ms > 0;
                let Role::Follower(f) = &mut self.role else { unreachable!("still a follower") };
                if got > 0 {
                    f.pretend_epoch = None;
                }
                // After records, fetch again at once, also while they are being written and
                // synced: the leader holds that fetch until it has more (a long poll), and
                // when the sync lands a new fetch replaces it to report the records durable
                // (`commit_basis_moved`), so the follower's round trip overlaps its sync.
                // After an empty answer: with a long poll, at once if it brought a new high
                // watermark or was held (it took at least the back-off), else after the
                // back-off: a leader that holds nothing (its wait is 0, or it no longer counts
                // this replica as a follower) must not be polled in a tight loop. Without: after
                // the back-off.
                let backoff = self.config.fetch_backoff_ms;
                let held = now.ms_since(sent) >= backoff;
                f.next_fetch = match got > 0 {
                    true => now,
                    false if long_poll && (news || held) => now,
                    false => now.plus_ms(backoff),
                };
            }
        }
        self.maybe_fetch(now, out);
    }

    /// A write or sync job finished. A job of an earlier log of the partition (deleted and
    /// created again meanwhile) is ignored.
    pub fn handle_io_done(
        &mut self,
        now: Time,
        job: Job<S>,
        result: Result<(), StorageError>,
        out: &mut Vec<Command<Job<S>>>,
    ) {
        let job = match job {
            Job::Write(j) if j.log_id() == self.log.id() => {
                if self.failed {
                    return;
                }
                if let Err(e) = self.log.finish_write(j, result) {
                    return self.fail(format!("write failed: {e}"), out);
                }
                self.answer_written(out);
                // What is written can be synced now; the next write goes out.
                self.maybe_sync(now, out);
                if !self.commits_synced() {
                    // Commits count written records: this write moved them.
                    return self.commit_basis_moved(now, out);
                }
                self.maybe_fetch(now, out);
                return;
            }
            Job::Sync(j) if j.log_id() == self.log.id() => j,
            _ => return,
        };
        self.sync_in_flight = false;
        if self.failed {
            return;
        }
        if let Err(e) = self.log.finish_sync(job, result) {
            return self.fail(format!("sync failed: {e}"), out);
        }
        // A write-and-sync job also wrote: `acks=leader` produces that came meanwhile.
        self.answer_written(out);
        self.maybe_sync(now, out);
        if self.commits_synced() {
            self.commit_basis_moved(now, out);
        } else {
            self.maybe_fetch(now, out);
        }
    }

    /// Whether commits (the high watermark, `acks=all`) count only synced records: the log's
    /// durability policy is `Always` (`flush.ms=always`, the default). Otherwise (`flush.ms`
    /// an interval or `never`, Kafka's model) they count written records, in the page cache
    /// of every ISR member, and the log syncs only when its policy says so.
    fn commits_synced(&self) -> bool {
        self.log.config().durability == Durability::Always
    }

    /// The offset this replica counts toward commits: durable or written (`commits_synced`).
    fn commit_basis(&self) -> Offset {
        if self.commits_synced() {
            self.log.durable_offset()
        } else {
            self.log.written_offset()
        }
    }

    /// The commit basis moved: the leader's high watermark may move; a follower reports the
    /// new basis with its next fetch, at once (the leader's high watermark and `acks=all` wait
    /// for it). With long polls, an outstanding fetch that reported less (the leader may be
    /// holding it) is replaced.
    fn commit_basis_moved(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        self.advance_high_watermark(now, out);
        let basis = self.commit_basis();
        let long_poll = self.config.fetch_wait_max_ms > 0;
        if let Role::Follower(f) = &mut self.role {
            f.next_fetch = f.next_fetch.min(now);
            if long_poll && f.in_flight.is_some() && basis > f.durable_reported {
                f.in_flight = None;
            }
        }
        self.maybe_fetch(now, out);
    }

    /// Periodic work.
    pub fn handle_tick(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        if self.failed {
            return;
        }
        match &mut self.role {
            Role::Follower(f) => {
                if f.in_flight.is_some_and(|sent| now.ms_since(sent) >= self.config.fetch_timeout_ms) {
                    f.in_flight = None;
                }
                // Interval syncs (`flush.ms`) come due with time alone.
                self.maybe_sync(now, out);
                self.maybe_fetch(now, out);
            }
            Role::Leader(l) => {
                while let Some(&(_, request, _, deadline)) = l.waiting.front() {
                    if deadline > now {
                        break;
                    }
                    l.waiting.pop_front();
                    out.push(Command::ProduceReply { request, result: Err(ProduceError::Abandoned) });
                }
                if l.pending_isr.as_ref().is_some_and(|(_, at)| now.ms_since(*at) >= self.config.alter_isr_retry_ms) {
                    l.pending_isr = None;
                }
                let Some(state) = &self.state else { return };
                let lagging: Vec<NodeId> = state
                    .isr
                    .iter()
                    .filter(|&&r| r != self.id)
                    .filter(|r| {
                        l.followers
                            .get(r)
                            .is_some_and(|p| now.ms_since(p.last_caught_up) > self.config.replica_lag_max_ms)
                    })
                    .copied()
                    .collect();
                if !lagging.is_empty() && l.pending_isr.is_none() {
                    let isr = state.isr.iter().filter(|r| !lagging.contains(r)).copied().collect();
                    self.propose_isr(now, isr, out);
                }
                self.maybe_sync(now, out);
                self.answer_parked(now, false, out);
                self.report_seal(now, out);
                self.report_load(now, out);
            }
            Role::Offline => {}
        }
    }

    /// Leader of a sealing partition: once everything appended is committed and no
    /// transaction is open here, reports the log end to the controller as the seal offset
    /// (again every `alter_isr_retry_ms` until the controller's state says sealed).
    fn report_seal(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        let Some(state) = &self.state else { return };
        let Role::Leader(l) = &mut self.role else { return };
        if state.seal != Seal::Sealing
            || l.seal_reported.is_some_and(|t| now.ms_since(t) < self.config.alter_isr_retry_ms)
        {
            return;
        }
        let end = self.log.log_end_offset();
        if self.high_watermark < end || self.txns.last_stable(self.high_watermark) < self.high_watermark {
            return;
        }
        l.seal_reported = Some(now);
        let msg = Message::Sealed { leader: self.id, epoch: state.epoch, partition: self.partition, offset: end };
        out.push(Command::Send { to: Peer::Controller, msg });
    }

    /// Leader of an open partition with `load_window_ms`: at the end of each window, reports
    /// its load to the controller.
    fn report_load(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        let Some(window_ms) = self.config.load_window_ms else { return };
        let Some(state) = &self.state else { return };
        let Role::Leader(l) = &mut self.role else { return };
        if state.seal != Seal::Open {
            return;
        }
        let Some(load) = l.load.take(now, window_ms, self.log.size_bytes()) else { return };
        let msg = Message::Load { leader: self.id, epoch: state.epoch, partition: self.partition, load };
        out.push(Command::Send { to: Peer::Controller, msg });
    }

    /// Applies the log's retention limits at most every `retention_check_ms`: deletes whole
    /// segments past them, below the high watermark only (an uncommitted record is never
    /// deleted; a follower uses the high watermark it learned). `wall` is the wall clock,
    /// against which `retention.ms` compares record timestamps (`now` is the driver's clock,
    /// which need not be the wall clock).
    pub fn handle_retention(&mut self, now: Time, wall: Timestamp, out: &mut Vec<Command<Job<S>>>) {
        if self.failed || now < self.next_retention {
            return;
        }
        self.next_retention = now.plus_ms(self.config.retention_check_ms);
        let cfg = self.log.config();
        if cfg.retention_ms.is_none() && cfg.retention_bytes.is_none() {
            return;
        }
        match self.log.apply_retention_below(wall, self.high_watermark) {
            Ok(r) if r.segments_deleted > 0 => {
                self.txns.retain_from(r.log_start_offset);
                tracing::debug!(node = %self.id, partition = %self.partition, segments = r.segments_deleted, bytes = r.bytes_deleted, log_start = %r.log_start_offset, "retention");
            }
            Ok(_) => {}
            Err(e) => self.fail(format!("retention failed: {e}"), out),
        }
    }

    /// Committed batches from `from` (for consumers), with the high watermark. Only the
    /// leader serves them.
    pub fn read_committed(&self, from: Offset, max_bytes: u32) -> Result<(Vec<u8>, Offset), ReadFailure> {
        self.read_leader(from, max_bytes, false)
    }

    /// As [`Replica::read_committed`]; with `stable_only` (read_committed isolation) up to the
    /// last stable offset only. The high watermark is returned either way.
    pub fn read_leader(
        &self,
        from: Offset,
        max_bytes: u32,
        stable_only: bool,
    ) -> Result<(Vec<u8>, Offset), ReadFailure> {
        self.serving()?;
        let mut buf = Vec::new();
        let end = if stable_only { self.last_stable() } else { self.high_watermark };
        if from < end {
            let limit = ReadLimit { max_bytes, end: Some(end) };
            self.log.read_verified(from, limit, &mut buf).map_err(ReadFailure::from_log)?;
        }
        Ok((buf, self.high_watermark))
    }

    /// Committed batches from `from` served by a follower (a follower read), with the high
    /// watermark bounding them: the one this follower learned from its leader, capped at its
    /// own log end. Every record below it is committed and this log matches the leader's up
    /// to it, so the read is a prefix of the partition's committed log even when the leader is
    /// gone. `past_high_watermark` (a test switch that breaks consistent prefix on purpose)
    /// serves up to the log end instead.
    pub fn read_follower(
        &self,
        from: Offset,
        max_bytes: u32,
        past_high_watermark: bool,
        stable_only: bool,
    ) -> Result<(Vec<u8>, Offset), ReadFailure> {
        if self.failed {
            return Err(ProduceError::Storage.into());
        }
        let Role::Follower(_) = &self.role else { return Err(ProduceError::NotLeader.into()) };
        assert!(self.high_watermark <= self.log.log_end_offset(), "follower high watermark past its log end");
        let end = match (past_high_watermark, stable_only) {
            (true, _) => self.log.log_end_offset(),
            (false, true) => self.last_stable(),
            (false, false) => self.high_watermark,
        };
        let mut buf = Vec::new();
        if from < end {
            let limit = ReadLimit { max_bytes, end: Some(end) };
            self.log.read_verified(from, limit, &mut buf).map_err(ReadFailure::from_log)?;
        }
        Ok((buf, self.high_watermark))
    }

    /// The newest leader epoch this replica knows (0 before any partition state).
    pub fn known_epoch(&self) -> LeaderEpoch {
        self.epoch()
    }

    /// Whether this replica follows a leader (and so may serve follower reads).
    pub fn is_follower(&self) -> bool {
        matches!(self.role, Role::Follower(_))
    }

    fn propose_isr(&mut self, now: Time, isr: Vec<NodeId>, out: &mut Vec<Command<Job<S>>>) {
        let Some(state) = &self.state else { return };
        let Role::Leader(l) = &mut self.role else { return };
        // The controller never names a leader outside the ISR; only stale states (accepted
        // with the planted no-fencing bug) can.
        assert!(self.plant.no_fencing || isr.contains(&self.id), "a leader never proposes an ISR without itself");
        if !isr.contains(&self.id) {
            return;
        }
        if isr == state.isr {
            return;
        }
        l.pending_isr = Some((isr.clone(), now));
        out.push(Command::Send {
            to: Peer::Controller,
            msg: Message::AlterIsr {
                leader: self.id,
                epoch: state.epoch,
                isr_version: state.isr_version,
                partition: self.partition,
                isr,
            },
        });
    }

    /// Leader: recomputes the high watermark and completes `acks=all` produces below it.
    fn advance_high_watermark(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        let basis = self.commit_basis();
        let Role::Leader(l) = &mut self.role else { return };
        let Some(state) = &self.state else { return };
        // The ISR in effect is the committed one plus any proposed addition, so a shrink
        // only takes effect once the controller accepted it (KIP-497's maximal ISR).
        let mut members: Vec<NodeId> = state.isr.clone();
        if let Some((p, _)) = &l.pending_isr {
            members.extend(p.iter().filter(|r| !state.isr.contains(r)));
        }
        let mut hw = basis;
        for r in members.iter().filter(|&&r| r != self.id) {
            hw = hw.min(l.followers.get(r).map_or(Offset(0), |p| p.durable));
        }
        let hw = hw.min(self.log.log_end_offset());
        // KIP-966: nothing is committed while the ISR is below min_insync_replicas, so an
        // `acks=all` record is never acknowledged with fewer copies than asked (and replicas
        // leaving a too-small ISR still hold everything committed).
        let moved = hw > self.high_watermark && state.isr.len() >= self.config.min_insync_replicas;
        if moved {
            self.high_watermark = hw;
        }
        assert!(self.high_watermark <= self.log.log_end_offset(), "high watermark past the log end");
        while let Some(&(end, request, base, _)) = l.waiting.front() {
            if end > self.high_watermark {
                break;
            }
            l.waiting.pop_front();
            out.push(Command::ProduceReply { request, result: Ok(base) });
        }
        // Followers learn the new high watermark now (their reads are bounded by it).
        if moved {
            self.answer_parked(now, true, out);
        }
    }

    /// Ends the replica (its partition was deleted): waiting produces are answered
    /// `Abandoned`; the log is returned for the driver to delete.
    pub fn into_log(mut self, out: &mut Vec<Command<Job<S>>>) -> Log<S> {
        self.abandon_waiting(out);
        self.abandon_unwritten(out);
        self.log
    }

    /// Answers the `acks=leader` produces whose batches are written.
    fn answer_written(&mut self, out: &mut Vec<Command<Job<S>>>) {
        let written = self.log.written_offset();
        while let Some(&(end, request, base)) = self.written_waiting.front() {
            if end > written {
                break;
            }
            self.written_waiting.pop_front();
            out.push(Command::ProduceReply { request, result: Ok(base) });
        }
    }

    /// After a truncation, which wrote every batch before cutting: an `acks=leader` produce
    /// still waiting whose batch the cut kept is answered with its offset; one whose batch
    /// was cut gets `Abandoned` (its offset now holds another record).
    fn answer_cut_written(&mut self, out: &mut Vec<Command<Job<S>>>) {
        let end = self.log.log_end_offset();
        for (batch_end, request, base) in self.written_waiting.drain(..) {
            let result = if batch_end <= end { Ok(base) } else { Err(ProduceError::Abandoned) };
            out.push(Command::ProduceReply { request, result });
        }
    }

    /// `acks=leader` produces whose batch will never be written (the log failed or goes away).
    fn abandon_unwritten(&mut self, out: &mut Vec<Command<Job<S>>>) {
        for (_, request, _) in self.written_waiting.drain(..) {
            out.push(Command::ProduceReply { request, result: Err(ProduceError::Abandoned) });
        }
    }

    fn abandon_waiting(&mut self, out: &mut Vec<Command<Job<S>>>) {
        if let Role::Leader(l) = &mut self.role {
            for (_, request, _, _) in l.waiting.drain(..) {
                out.push(Command::ProduceReply { request, result: Err(ProduceError::Abandoned) });
            }
        }
    }

    /// Starts the next storage jobs there is something for, none of the kind being out.
    /// When commits count synced records and no `acks=leader` produce waits for a write, the
    /// unwritten batches wait for the next sync and go to disk with it, one job per commit
    /// group (`Log::begin_write_sync`): a worker wake and a completion fewer per group, and a
    /// sync covers every batch appended before it starts (bench/RESULTS.md, "One job per
    /// commit group"). Otherwise a write job goes out at once and a sync follows it.
    fn maybe_sync(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        if self.failed {
            return;
        }
        let write_alone = !self.config.write_with_sync || !self.commits_synced() || !self.written_waiting.is_empty();
        if !write_alone && !self.sync_in_flight {
            if let Some(job) = self.log.begin_write_sync(now.timestamp()) {
                self.sync_in_flight = true;
                out.push(Command::Io { partition: self.partition, job: Job::Sync(job) });
                return;
            }
        }
        if write_alone || !self.sync_in_flight {
            if let Some(job) = self.log.begin_write() {
                out.push(Command::Io { partition: self.partition, job: Job::Write(job) });
            }
        }
        if self.sync_in_flight || (!self.commits_synced() && !self.log.sync_due(now.timestamp())) {
            return;
        }
        if let Some(job) = self.log.begin_sync(now.timestamp()) {
            self.sync_in_flight = true;
            out.push(Command::Io { partition: self.partition, job: Job::Sync(job) });
        }
    }

    fn maybe_fetch(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        let epoch = self.epoch();
        let basis = self.commit_basis();
        let Role::Follower(f) = &mut self.role else { return };
        // With a long poll a fetch goes out while a write job is out (its records are
        // appended behind the job and go to disk with the next one), except after an answer
        // that asked for a truncation, which waits for the job. Without one (every fetch
        // answered at once) the next fetch waits for the job, which it then reports.
        let long_poll = self.config.fetch_wait_max_ms > 0;
        if f.in_flight.is_some() || now < f.next_fetch || (self.log.writing() && (f.truncation_waits || !long_poll)) {
            return;
        }
        f.truncation_waits = false;
        f.in_flight = Some(now);
        f.durable_reported = basis;
        self.fetch_correlation += 1;
        f.correlation = self.fetch_correlation;
        let last = self.log.epochs().latest().map(|e| e.epoch);
        let last_fetched_epoch = f.pretend_epoch.or(last);
        out.push(Command::Send {
            to: Peer::Node(f.leader),
            msg: Message::Fetch(FetchRequest {
                partition: self.partition,
                replica: self.id,
                epoch,
                fetch_offset: self.log.log_end_offset(),
                last_fetched_epoch,
                durable_offset: basis,
                high_watermark: self.high_watermark,
                correlation: self.fetch_correlation,
            }),
        });
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Command<Job<S>>>) {
        self.abandon_waiting(out);
        self.abandon_unwritten(out);
        self.failed = true;
        self.role = Role::Offline;
        out.push(Command::Fail { reason });
    }

    /// The ISR version of the latest state (for tests and the simulator).
    pub fn isr_version(&self) -> IsrVersion {
        self.state.as_ref().map_or(IsrVersion(0), |s| s.isr_version)
    }
}
