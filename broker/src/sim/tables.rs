//! The simulator's table workload (`SimConfig::tables`): a table of [`PARTITIONS`] partitions
//! on the simulated brokers, driven by the same core as the runtime's `cluster::tables`, with
//! list-append transactions judged by [`crate::check::elle`].
//!
//! Hosts: every node keeps a [`TableMachine`] per table partition fed with the partition's
//! committed records at its tick (`core::machine::catch_up`, the runtime's `feed`), so every
//! replica decides every part alike; the leader (a valid lease, its high watermark at its
//! epoch's start: `BrokerNode::coordinating`) holds a [`PartitionLeader`] per leader epoch.
//! Requests the leader answers `Wait` are parked and asked again at every tick (the runtime
//! parks them until a wake or 200 ms); a parked request whose node stopped leading at that
//! epoch is answered `leader-changed`, as the runtime's `wait` does. A commit the leader
//! answers `Append` is appended with `acks=all` through `handle_produce` (inside the
//! client's log transaction for a two-phase commit: producer id and epoch, no sequence, as
//! `cluster::internal::append`), and answered with the outcome the machine decided when the
//! leader applied it. After every catch-up the machine's snapshot bytes are hashed: two
//! replicas at the same applied offset must agree (`table-divergence`).
//!
//! Clients ([`CLIENTS`]), one level per seed (serializable, ssi, 2pl, serial in turn): each
//! transaction is 1-4 micro-operations over [`KEYS`] keys, a read (the key's comma-separated
//! list) or an append of a unique integer (a read of the key, then a buffered write of the
//! longer list, after TableLock under 2pl and serial), as `client::table::TableTxn` does
//! (per-partition snapshot, reads with the versions seen, locked keys and turn). The commit
//! is `client::table::plan_parts`'s plan: one part, a TableCommit without producer; several,
//! two-phase commit through the simulated transaction coordinators of the transaction
//! workload ([`super::txn`], hosted on its `__transaction_state` partitions even without its
//! clients): InitProducerId once, AddPartitionsToTxn of every participant (their begin
//! markers), every part's vote with the producer (`PartitionLeader::commit_in_txn`: a
//! read-only part is appended and held until the marker too), and EndTxn commits iff
//! `client::table::decide` says so (seed 12 showed the write skew across partitions that
//! committing read-only parts at once allowed; `client::table` joins them too now). One
//! difference remains: `client::table` commits a transaction over several partitions that
//! writes nothing by read-only votes, each committed at once, which the simulated client
//! does not (votes validated at different moments could mix into a read skew). A known abort
//! is `fail`; an unanswered commit, an EndTxn without answer, or an append that failed after
//! it was sent is `info`. At the end, a table transaction must have committed in the last
//! half of the healed phase, and the history goes to Elle at the seed's level.
//!
//! Not done: scans (range reads), procedures, follower reads, client restarts, late or
//! duplicated table requests (the coordinator's requests get them in the transaction
//! workload). Nodes write a machine snapshot every [`TABLE_SNAPSHOT_RECORDS`] records (kept
//! across crashes) and a restarted node starts from it, as the runtime does; the divergence
//! check then compares the restored machine with the others. Pruning runs at every tick on
//! every replica with a small snapshot window ([`SNAPSHOT_WINDOW`]), so parts older than it
//! abort as `snapshot-too-old` and replicas that kept different versions must still decide
//! alike.

use std::collections::BTreeMap;

use skein_client::key_partition;
use skein_client::table::{decide, plan_parts, Decision as Votes, PartState, PlannedPart, Vote};
use skein_client::wire::{ErrorCode, TableRecord};
use skein_client::ClientError;
use skein_log::batch::{Attributes, BatchBuilder, RecordBatch};
use skein_log::types::{ProducerEpoch, ProducerId, Sequence};

use super::txn::{TxnReq, TxnResp};
use super::{fnv, Event, Sim, PRODUCE_DEADLINE_MS};
use crate::check::elle::{self, CheckOptions, Model, Mop, ReadValue, TxnType};
use crate::core::table::leader::{Answer, Decision, PartitionLeader, TxnInfo};
use crate::core::table::store::{Outcome, TableMachine};
use crate::core::table::{version_code, AbortReason, Key, Level, Part, Priority, TxnId};
use crate::core::{Acks, LeaderEpoch, NodeId, Offset, PartitionId, RequestId};

/// Table partitions.
pub(super) const PARTITIONS: u32 = 3;

/// A node snapshots a table partition's machine every this many records it applied (the
/// runtime's `--table-snapshot-records`; small here so seeds restart from many).
const TABLE_SNAPSHOT_RECORDS: u64 = 10;

/// The table machines' snapshot window (`store::SNAPSHOT_WINDOW` in the runtime), small so
/// that pruning runs and slow transactions meet it: every replica prunes at its tick.
const SNAPSHOT_WINDOW: u64 = 8;
/// Keys the transactions use.
const KEYS: u32 = 9;
const CLIENTS: usize = 5;
pub(super) const TICK_US: u64 = 3_000;
/// A table request unanswered this long is given up (a read or lock is sent again).
const REQUEST_TIMEOUT_US: u64 = 1_000_000;
/// The leader-side timeout of a transaction.
const TXN_TIMEOUT_MS: u32 = 2_500;
/// A client gives up a transaction still running its operations after this long.
const TXN_DEADLINE_US: u64 = 3_000_000;
const END_TRIES_MAX: u32 = 20;
/// Coordinator replies for table clients carry their index plus this.
pub(super) const CLIENT_BASE: usize = 1 << 20;
const PROCESS_BASE: u64 = 5_000;
/// The levels the seeds cycle through.
const LEVELS: [Level; 4] = [Level::Serializable, Level::Ssi, Level::TwoPl, Level::Serial];

/// The level of a seed's table transactions.
pub fn level_for(seed: u64) -> Level {
    LEVELS[(seed % LEVELS.len() as u64) as usize]
}

/// A table client's request to a partition leader.
#[derive(Clone, Debug)]
pub(super) enum TableReq {
    Read {
        partition: PartitionId,
        info: TxnInfo,
        snapshot: Option<Offset>,
        key: Key,
    },
    /// `used`: the transaction read this partition before (TableLockRequest's `snapshot`).
    Lock {
        partition: PartitionId,
        info: TxnInfo,
        key: Key,
        used: bool,
    },
    Commit {
        partition: PartitionId,
        info: TxnInfo,
        record: TableRecord,
        producer: Option<(i64, i16)>,
    },
    Abort {
        partition: PartitionId,
        txn: TxnId,
    },
}

impl TableReq {
    fn partition(&self) -> PartitionId {
        match self {
            TableReq::Read { partition, .. }
            | TableReq::Lock { partition, .. }
            | TableReq::Commit { partition, .. }
            | TableReq::Abort { partition, .. } => *partition,
        }
    }
}

/// Why a table request was not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The transaction is over here.
    Aborted(AbortReason),
    /// Not the leader (nothing done).
    NotLeader,
    /// The commit's append failed after it was sent: its outcome is unknown.
    Unknown,
}

/// A leader's answer.
#[derive(Clone, Debug)]
pub(super) enum TableResp {
    Read(Result<ReadRow, Refused>),
    Lock(Result<(), Refused>),
    Commit(Result<Outcome, Refused>),
    Abort,
}

/// A read's answer: the snapshot read at, the value and its version.
type ReadRow = (Offset, Option<Vec<u8>>, Option<Offset>);

/// One node's state of one table partition.
#[derive(Default)]
struct Host {
    machine: Option<TableMachine>,
    /// Records applied since the last snapshot.
    since_snapshot: u64,
    leader: Option<PartitionLeader>,
    /// Requests answered `Wait`: (client, request, request).
    parked: Vec<(usize, u64, TableReq)>,
}

/// A commit part being appended.
struct Appending {
    client: usize,
    request: u64,
    partition: PartitionId,
    txn: TxnId,
    epoch: LeaderEpoch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Running micro-operation `next`.
    Ops,
    /// Two-phase: getting a producer id, adding the writing partitions.
    Init,
    Add,
    /// Asking each part's vote in turn.
    Votes,
    /// Two-phase: EndTxn.
    End {
        commit: bool,
        tries: u32,
    },
}

struct Txn {
    id: TxnId,
    begin_us: u64,
    mops: Vec<Mop>,
    next: usize,
    parts: BTreeMap<u32, PartState>,
    writes: BTreeMap<Key, Option<Vec<u8>>>,
    /// Values read (None: absent), for appends.
    known: BTreeMap<Key, Option<Vec<u8>>>,
    stage: Stage,
    plan: Vec<PlannedPart>,
    votes: Vec<(u32, Vote)>,
    two_phase: bool,
}

#[derive(Clone, Debug)]
enum Req {
    Table(TableReq),
    Coord(TxnReq),
}

struct Client {
    process: u64,
    id: String,
    producer: Option<(i64, i16)>,
    current: Option<Txn>,
    /// (request, when sent, what)
    pending: Option<(u64, u64, Req)>,
    idle_until: u64,
}

/// The workload's state in the simulator.
#[derive(Default)]
pub(super) struct TableSim {
    level: Level,
    clients: Vec<Client>,
    /// Per node: a host per table partition.
    hosts: Vec<BTreeMap<PartitionId, Host>>,
    /// Per node: its snapshot file per table partition (the runtime's `table.snapshot`,
    /// written whole; kept across crashes).
    snapshots: Vec<BTreeMap<PartitionId, Vec<u8>>>,
    /// Commit parts being appended: (node index, core request) -> whose.
    appends: BTreeMap<(usize, u64), Appending>,
    pub(super) history: elle::History,
    next_value: i64,
    next_txn: u64,
    /// Per partition and applied offset: the first replica's state hash there.
    digests: BTreeMap<(PartitionId, Offset), (NodeId, u64)>,
    last_commit_us: Option<u64>,
}

impl TableSim {
    pub(super) fn new(nodes: usize, level: Level) -> TableSim {
        let clients = (0..CLIENTS)
            .map(|c| Client {
                process: PROCESS_BASE + c as u64,
                id: format!("table-{c}"),
                producer: None,
                current: None,
                pending: None,
                idle_until: 0,
            })
            .collect();
        TableSim {
            level,
            clients,
            hosts: (0..nodes).map(|_| BTreeMap::new()).collect(),
            snapshots: (0..nodes).map(|_| BTreeMap::new()).collect(),
            next_value: 1,
            next_txn: 1,
            ..TableSim::default()
        }
    }

    pub(super) fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Elle's verdict on the history at the seed's level.
    pub(super) fn check(&self) -> elle::Report {
        let opts = CheckOptions { realtime: false, level: self.level.name().to_owned() };
        elle::check(&self.history, Model::ListAppend, &opts)
    }
}

impl Sim {
    fn table_base(&self) -> u32 {
        self.cfg.partitions + u32::from(self.cfg.groups) + super::txn::PARTITIONS
    }

    fn table_partition(&self, index: u32) -> PartitionId {
        PartitionId(self.table_base() + index)
    }

    /// A node crashed or started: its table state and appends are gone.
    pub(super) fn table_reset_node(&mut self, i: usize) {
        if let Some(h) = self.tables.hosts.get_mut(i) {
            h.clear();
        }
        self.tables.appends.retain(|(n, _), _| *n != i);
    }

    // ---- hosts ----

    /// Node `i`'s tick: every replica catches up; the leader expires transactions, ends
    /// decided prepared parts and asks its parked requests again.
    pub(super) fn table_host_tick(&mut self, i: usize) {
        for k in 0..PARTITIONS {
            let p = self.table_partition(k);
            if self.nodes[i].core.is_none() {
                return;
            }
            if let Err(reason) = self.table_catch_up(i, p) {
                self.table_fail_stop(i, reason);
                return;
            }
            // Every replica prunes as the runtime's tick does: behind the oldest snapshot its
            // live transactions read at, if it leads, or behind what it applied.
            let host = self.tables.hosts[i].entry(p).or_default();
            if let Some(m) = host.machine.as_mut() {
                m.prune_behind(host.leader.as_ref().and_then(PartitionLeader::oldest_snapshot));
            }
            let now = self.local(i);
            let coordinating = self.nodes[i].core.as_ref().map(|c| c.coordinating(now, p));
            let host = self.tables.hosts[i].entry(p).or_default();
            let epoch = host.leader.as_ref().map(PartitionLeader::epoch);
            let leads = matches!(coordinating, Some(Ok(e)) if Some(e) == epoch);
            // A lease blip: the epoch's locks and waits stay.
            let blip = !leads && epoch.is_some() && self.table_still_leads(i, p, epoch);
            let host = self.tables.hosts[i].entry(p).or_default();
            if !leads && !blip {
                host.leader = None;
                for (client, request, req) in std::mem::take(&mut host.parked) {
                    let resp = refusal(&req, Refused::Aborted(AbortReason::LeaderChanged));
                    self.table_reply(i, client, request, resp);
                }
                continue;
            }
            // Leading, or through a blip as the runtime's tick does: transactions past their
            // timeout expire and decided parts end.
            let Host { machine, leader, parked, .. } = host;
            if let (Some(m), Some(l)) = (machine.as_ref(), leader.as_mut()) {
                l.expire(now);
                l.decided(m);
                l.take_wakes();
            }
            if blip {
                continue; // parked requests are asked again once the lease is back
            }
            for (client, request, req) in std::mem::take(parked) {
                self.table_run(i, client, request, req);
            }
        }
    }

    /// Applies the partition's committed records on node `i`; then compares the machine with
    /// every other replica's at the same applied offset.
    fn table_catch_up(&mut self, i: usize, p: PartitionId) -> Result<(), String> {
        let plant = self.cfg.plant;
        let Some(core) = self.nodes[i].core.as_ref() else { return Ok(()) };
        let id = core.id();
        let host = self.tables.hosts[i].entry(p).or_default();
        let Some(replica) = core.replica(p) else {
            host.machine = None;
            return Ok(());
        };
        if host.machine.is_none() {
            // As the runtime's `cluster::tables::restore`: from this node's snapshot unless it
            // does not decode or is past the log's end, else from the log's start.
            let log_end = replica.log().log_end_offset();
            let restored = self.tables.snapshots[i].get(&p).map(|bytes| TableMachine::restore(bytes));
            let machine = match restored {
                Some(Ok(m)) if m.applied() <= log_end => m,
                Some(Err(e)) => return Err(format!("the table snapshot of {p} does not restore: {e}")),
                _ => TableMachine::new(),
            };
            host.machine = Some(machine.with_plant(plant).with_window(SNAPSHOT_WINDOW));
        }
        let machine = host.machine.as_mut().expect("made above");
        let read = crate::core::machine::catch_up(replica, machine)
            .map_err(|e| format!("reading table partition {p}: {e}"))?;
        if read == 0 {
            return Ok(());
        }
        host.since_snapshot += read;
        if host.since_snapshot >= TABLE_SNAPSHOT_RECORDS {
            host.since_snapshot = 0;
            self.tables.snapshots[i].insert(p, machine.snapshot());
        }
        if let Some(l) = host.leader.as_mut() {
            l.decided(machine);
        }
        let applied = machine.applied();
        // Replicas prune differently (a leader keeps what its transactions read at): compare
        // each as pruned to its window, which every replica's decisions may depend on.
        let digest = {
            let mut canonical = machine.clone();
            canonical.prune_behind(None);
            fnv(&canonical.snapshot())
        };
        match self.tables.digests.get(&(p, applied)) {
            Some(&(first, d)) if d != digest => {
                self.violation(format!(
                    "table-divergence: {p} at applied offset {applied}: {id}'s table state differs from {first}'s"
                ));
            }
            Some(_) => {}
            None => {
                self.tables.digests.insert((p, applied), (id, digest));
            }
        }
        Ok(())
    }

    fn table_fail_stop(&mut self, i: usize, reason: String) {
        tracing::debug!(node = i + 1, %reason, "fail-stop (table workload)");
        self.crash(i);
        let back = self.rng.range(100_000, 1_000_000);
        let id = self.nodes[i].id;
        self.schedule(back, Event::Restart(id));
    }

    /// The epoch node `i` leads `p` at, its machine caught up and its leader made for it.
    fn table_leading(&mut self, i: usize, p: PartitionId) -> Option<LeaderEpoch> {
        let now = self.local(i);
        let epoch = match self.nodes[i].core.as_ref()?.coordinating(now, p) {
            Ok(e) => e,
            Err(_) => {
                let epoch = self.tables.hosts[i].entry(p).or_default().leader.as_ref().map(PartitionLeader::epoch);
                if !self.table_still_leads(i, p, epoch) {
                    self.tables.hosts[i].entry(p).or_default().leader = None;
                }
                return None;
            }
        };
        if let Err(reason) = self.table_catch_up(i, p) {
            self.table_fail_stop(i, reason);
            return None;
        }
        let plant = self.cfg.plant;
        let host = self.tables.hosts[i].entry(p).or_default();
        if host.leader.as_ref().map(PartitionLeader::epoch) != Some(epoch) {
            tracing::debug!(node = i + 1, %p, epoch = epoch.0, "sim: leading a table partition");
            host.leader = Some(PartitionLeader::new(epoch).with_plant(plant));
        }
        host.machine.is_some().then_some(epoch)
    }

    /// Whether node `i`'s replica of `p` still leads at `epoch` (it may not serve now: its
    /// lease lapsed). The leader-side state of an epoch is kept until the epoch ends: dropped
    /// and rebuilt at the same epoch, it forgot the locks of transactions whose parts were
    /// still being appended (seed 50, 2pl: a lost update).
    fn table_still_leads(&self, i: usize, p: PartitionId, epoch: Option<LeaderEpoch>) -> bool {
        let replica = self.nodes[i].core.as_ref().and_then(|c| c.replica(p));
        epoch.is_some() && replica.and_then(|r| r.leader_epoch()) == epoch
    }

    pub(super) fn serve_table(&mut self, client: usize, request: u64, to: NodeId, req: TableReq) {
        let i = self.idx(to);
        if self.nodes[i].core.is_none() {
            let resp = refusal(&req, Refused::NotLeader);
            self.table_reply(i, client, request, resp);
            return;
        }
        self.table_run(i, client, request, req);
    }

    /// Asks node `i`'s leader of the request's partition; parks it on `Wait`.
    fn table_run(&mut self, i: usize, client: usize, request: u64, req: TableReq) {
        let p = req.partition();
        let Some(epoch) = self.table_leading(i, p) else {
            let resp = refusal(&req, Refused::NotLeader);
            return self.table_reply(i, client, request, resp);
        };
        let now = self.local(i);
        let host = self.tables.hosts[i].get_mut(&p).expect("leading");
        let (Some(m), Some(l)) = (host.machine.as_ref(), host.leader.as_mut()) else { return };
        let answer: Answer<TableResp> = match &req {
            TableReq::Read { info, snapshot, key, .. } => {
                match l.read(now, m, info, *snapshot, std::slice::from_ref(key), None) {
                    Answer::Ready(rows) => {
                        let row = rows.rows.into_iter().next();
                        let (value, version) = row.map_or((None, None), |r| (r.value, r.version));
                        Answer::Ready(TableResp::Read(Ok((rows.snapshot, value, version))))
                    }
                    Answer::Wait => Answer::Wait,
                    Answer::Aborted(r) => Answer::Aborted(r),
                }
            }
            TableReq::Lock { info, key, used, .. } => match l.lock(now, info, *used, std::slice::from_ref(key)) {
                Answer::Ready(()) => Answer::Ready(TableResp::Lock(Ok(()))),
                Answer::Wait => Answer::Wait,
                Answer::Aborted(r) => Answer::Aborted(r),
            },
            TableReq::Commit { info, record, producer, .. } => {
                let Ok(part) = Part::from_wire(record) else {
                    return self.table_reply(i, client, request, TableResp::Commit(Err(Refused::Unknown)));
                };
                // As the runtime: the transaction was answered here before.
                let used = part.snapshot != Offset(0) || !part.reads.is_empty() || !part.ranges.is_empty();
                // Inside a log transaction a read-only part is appended too (held until the
                // marker).
                let answer = if producer.is_some() {
                    l.commit_in_txn(now, m, info, used, &part)
                } else {
                    l.commit(now, m, info, used, &part)
                };
                match answer {
                    Answer::Ready(Decision::Nothing) => {
                        let outcome = Outcome::Committed { offset: m.applied(), results: Vec::new() };
                        Answer::Ready(TableResp::Commit(Ok(outcome)))
                    }
                    Answer::Ready(Decision::Append) => {
                        l.take_wakes();
                        let producer = *producer;
                        return self.table_append(i, p, epoch, client, request, part, producer);
                    }
                    Answer::Wait => Answer::Wait,
                    Answer::Aborted(r) => Answer::Aborted(r),
                }
            }
            TableReq::Abort { txn, .. } => {
                l.abort(*txn);
                Answer::Ready(TableResp::Abort)
            }
        };
        // Waiting requests are asked again at every tick, woken or not.
        l.take_wakes();
        match answer {
            Answer::Ready(resp) => self.table_reply(i, client, request, resp),
            Answer::Aborted(r) => {
                let resp = refusal(&req, Refused::Aborted(r));
                self.table_reply(i, client, request, resp);
            }
            Answer::Wait => host.parked.push((client, request, req)),
        }
    }

    /// Appends a commit's part with acks=all (inside the producer's log transaction).
    #[allow(clippy::too_many_arguments)]
    fn table_append(
        &mut self,
        i: usize,
        p: PartitionId,
        epoch: LeaderEpoch,
        client: usize,
        request: u64,
        part: Part,
        producer: Option<(i64, i16)>,
    ) {
        let now = self.local(i);
        let mut b = match producer {
            Some((id, e)) => BatchBuilder::new()
                .producer(ProducerId(id), ProducerEpoch(e), Sequence::NONE)
                .attributes(Attributes::default().with_transactional(true)),
            None => BatchBuilder::new(),
        };
        let key = part.written_keys().first().map(|k| k.to_vec()).unwrap_or_default();
        b.push(Some(&key), &part.encode(), &[], now.timestamp());
        let Ok(batch) = RecordBatch::parse(b.build().into_bytes()) else { unreachable!("a built batch parses") };
        let id = self.next_request;
        self.next_request += 1;
        self.tables.appends.insert((i, id), Appending { client, request, partition: p, txn: part.txn, epoch });
        let deadline = now.plus_ms(PRODUCE_DEADLINE_MS);
        let mut out = Vec::new();
        let core = self.nodes[i].core.as_mut().expect("a leader runs on a live node");
        core.handle_produce(now, RequestId(id), p, Some(epoch), batch, Acks::All, deadline, &mut out);
        self.execute(i, out);
    }

    /// Whether `request` is a table commit's append on node `i`; answers it with the outcome
    /// the machine decided if so.
    pub(super) fn table_produce_reply(
        &mut self,
        i: usize,
        request: RequestId,
        result: &Result<Offset, crate::core::ProduceError>,
    ) -> bool {
        let Some(a) = self.tables.appends.remove(&(i, request.0)) else { return false };
        let mut outcome = None;
        if result.is_ok() {
            if let Err(reason) = self.table_catch_up(i, a.partition) {
                self.table_fail_stop(i, reason);
                return true;
            }
            let host = self.tables.hosts[i].get(&a.partition);
            outcome = host.and_then(|h| h.machine.as_ref()).and_then(|m| m.outcome(a.txn)).cloned();
        }
        if let Some(host) = self.tables.hosts[i].get_mut(&a.partition) {
            if let Some(l) = host.leader.as_mut().filter(|l| l.epoch() == a.epoch) {
                l.applied(a.txn, outcome.as_ref());
                l.take_wakes();
            }
        }
        tracing::debug!(node = i + 1, p = %a.partition, txn = %a.txn, ?outcome, "sim: table part applied");
        let resp = TableResp::Commit(outcome.ok_or(Refused::Unknown));
        self.table_reply(i, a.client, a.request, resp);
        true
    }

    fn table_reply(&mut self, i: usize, client: usize, request: u64, resp: TableResp) {
        if self.client_cut.contains(&self.nodes[i].id) {
            return;
        }
        let delay = self.rng.range(100, 1_500);
        self.schedule(delay, Event::TableResponse { client, request, resp });
    }

    // ---- clients ----

    pub(super) fn table_client_tick(&mut self, c: usize) {
        let now = self.now;
        if let Some((_, sent, _)) = &self.tables.clients[c].pending {
            if now.saturating_sub(*sent) < REQUEST_TIMEOUT_US {
                return;
            }
            let (_, _, req) = self.tables.clients[c].pending.take().expect("checked above");
            return self.table_timed_out(c, req);
        }
        if now < self.tables.clients[c].idle_until {
            return;
        }
        if self.tables.clients[c].current.is_none() {
            if self.draining {
                return;
            }
            self.table_begin(c);
        }
        self.table_next(c);
    }

    fn table_begin(&mut self, c: usize) {
        let n = 1 + self.rng.below(4) as usize;
        let mut mops = Vec::with_capacity(n);
        for _ in 0..n {
            let key = format!("k{}", self.rng.below(u64::from(KEYS)));
            if self.rng.chance(500) {
                mops.push(Mop::Read { key, value: ReadValue::Nil });
            } else {
                let value = self.tables.next_value;
                self.tables.next_value += 1;
                mops.push(Mop::Append { key, value });
            }
        }
        let id = TxnId((self.tables.next_txn << 8) | c as u64);
        self.tables.next_txn += 1;
        self.tables.clients[c].current = Some(Txn {
            id,
            begin_us: self.now,
            mops,
            next: 0,
            parts: BTreeMap::new(),
            writes: BTreeMap::new(),
            known: BTreeMap::new(),
            stage: Stage::Ops,
            plan: Vec::new(),
            votes: Vec::new(),
            two_phase: false,
        });
    }

    fn table_info(&self, t: &Txn) -> TxnInfo {
        TxnInfo {
            txn: t.id,
            level: self.tables.level,
            priority: Priority { begin_us: t.begin_us, txn: t.id },
            timeout_ms: TXN_TIMEOUT_MS,
        }
    }

    /// Sends the current transaction's next request (nothing pending).
    fn table_next(&mut self, c: usize) {
        let Some(t) = self.tables.clients[c].current.as_ref() else { return };
        let level = self.tables.level;
        let info = self.table_info(t);
        match t.stage {
            Stage::Ops => {
                if self.now >= t.begin_us + TXN_DEADLINE_US {
                    return self.table_abort(c, TxnType::Fail);
                }
                let Some(mop) = t.mops.get(t.next) else { return self.table_commit(c) };
                let key = mop.key().as_bytes().to_vec();
                let index = key_partition(&key, PARTITIONS);
                let partition = self.table_partition(index);
                let part = t.parts.get(&index).cloned().unwrap_or_default();
                let append = matches!(mop, Mop::Append { .. });
                if !t.writes.contains_key(&key) && !t.known.contains_key(&key) {
                    let snapshot = part.snapshot.map(Offset);
                    return self.table_send(c, Req::Table(TableReq::Read { partition, info, snapshot, key }));
                }
                let needs_lock = match level {
                    Level::TwoPl => !part.locked.contains(&key),
                    Level::Serial => !part.turn,
                    _ => false,
                };
                if append && needs_lock {
                    let used = part.snapshot.is_some();
                    return self.table_send(c, Req::Table(TableReq::Lock { partition, info, key, used }));
                }
                self.table_do_mop(c);
                self.table_next(c);
            }
            Stage::Init => {
                let id = self.tables.clients[c].id.clone();
                self.table_send(c, Req::Coord(TxnReq::Init { id }));
            }
            Stage::Add => {
                let cl = &self.tables.clients[c];
                let Some((producer, epoch)) = cl.producer else {
                    self.tables.clients[c].current.as_mut().expect("current").stage = Stage::Init;
                    return self.table_next(c);
                };
                // Every participant joins, read-only ones too: their parts are held until
                // the marker (`PartitionLeader::commit_in_txn`).
                let partitions = t.plan.iter().map(|p| self.table_partition(p.partition)).collect();
                let id = cl.id.clone();
                self.table_send(c, Req::Coord(TxnReq::Add { id, producer, epoch, partitions }));
            }
            Stage::Votes => {
                let Some(p) = t.plan.get(t.votes.len()) else { return self.table_decide(c) };
                let producer = if t.two_phase { self.tables.clients[c].producer } else { None };
                let req = TableReq::Commit {
                    partition: self.table_partition(p.partition),
                    info,
                    record: p.record.clone(),
                    producer,
                };
                self.table_send(c, Req::Table(req));
            }
            Stage::End { commit, .. } => {
                let cl = &self.tables.clients[c];
                let Some((producer, epoch)) = cl.producer else {
                    return self.table_finish(c, if commit { TxnType::Info } else { TxnType::Fail });
                };
                let id = cl.id.clone();
                self.table_send(c, Req::Coord(TxnReq::End { id, producer, epoch, commit }));
            }
        }
    }

    /// Completes micro-operation `next` from what the transaction knows (its value read, its
    /// lock held): a read takes its value, an append buffers the longer list.
    fn table_do_mop(&mut self, c: usize) {
        let t = self.tables.clients[c].current.as_mut().expect("current");
        let next = t.next;
        t.next += 1;
        let Some(mop) = t.mops.get_mut(next) else { return };
        let key = mop.key().as_bytes().to_vec();
        let current = t.writes.get(&key).or_else(|| t.known.get(&key)).cloned().flatten();
        match mop {
            Mop::Read { value, .. } => *value = list(current.as_deref()),
            Mop::Append { value, .. } => {
                let mut longer = current.unwrap_or_default();
                if !longer.is_empty() {
                    longer.push(b',');
                }
                longer.extend_from_slice(value.to_string().as_bytes());
                t.writes.insert(key, Some(longer));
            }
            Mop::Write { .. } => {}
        }
    }

    /// Plans the commit, as `TableTxn::commit`.
    fn table_commit(&mut self, c: usize) {
        let level = self.tables.level;
        let t = self.tables.clients[c].current.as_mut().expect("current");
        t.plan = plan_parts(t.id.0, level, &t.parts, &t.writes, |k| key_partition(k, PARTITIONS));
        // Several partitions: two-phase even without writes (the client commits read-only
        // votes at once; read at different moments, they could mix into a read skew).
        t.two_phase = t.plan.len() > 1;
        t.stage = if t.two_phase { Stage::Add } else { Stage::Votes };
        self.table_next(c);
    }

    /// Every vote is in: a single part's answer is the outcome; two-phase ends at the
    /// coordinator; read-only votes commit iff every one is yes.
    fn table_decide(&mut self, c: usize) {
        let t = self.tables.clients[c].current.as_mut().expect("current");
        let decision = decide(&t.votes);
        if t.two_phase {
            t.stage = Stage::End { commit: decision == Votes::Commit, tries: 0 };
            return self.table_next(c);
        }
        match decision {
            Votes::Commit => self.table_finish(c, TxnType::Ok),
            Votes::Abort(_) => self.table_abort(c, TxnType::Fail),
        }
    }

    /// Ends the transaction as `kind`, telling every participant (their locks, turn and
    /// tracking go).
    fn table_abort(&mut self, c: usize, kind: TxnType) {
        let Some(t) = self.tables.clients[c].current.as_ref() else { return };
        let txn = t.id;
        let mut partitions: Vec<u32> = t.parts.keys().copied().collect();
        partitions.extend(t.writes.keys().map(|k| key_partition(k, PARTITIONS)));
        partitions.sort_unstable();
        partitions.dedup();
        for index in partitions {
            let partition = self.table_partition(index);
            self.table_send(c, Req::Table(TableReq::Abort { partition, txn }));
        }
        self.table_finish(c, kind);
    }

    /// Records the current transaction as `kind`.
    fn table_finish(&mut self, c: usize, kind: TxnType) {
        let cl = &mut self.tables.clients[c];
        cl.pending = None;
        let Some(t) = cl.current.take() else { return };
        if kind == TxnType::Ok {
            self.tables.last_commit_us = Some(self.now);
        }
        let level = self.tables.level.name().to_owned();
        tracing::debug!(index = self.tables.history.txns.len(), txn = %t.id, client = c, ?kind, mops = ?t.mops, two_phase = t.two_phase, votes = ?t.votes, begin_us = t.begin_us, "sim: table transaction");
        self.tables.history.txns.push(elle::Txn {
            process: cl.process,
            kind,
            ops: t.mops,
            start_us: Some(t.begin_us),
            end_us: Some(self.now),
            level: Some(level),
            line: 0,
        });
        cl.idle_until = self.now + self.rng.range(1_000, 30_000);
    }

    fn table_send(&mut self, c: usize, req: Req) {
        let target = match &req {
            Req::Table(r) => self.leader_of(r.partition()),
            Req::Coord(TxnReq::Init { id } | TxnReq::Add { id, .. } | TxnReq::End { id, .. }) => {
                self.leader_of(self.state_partition(id))
            }
            Req::Coord(_) => None,
        };
        let request = self.next_request;
        self.next_request += 1;
        if !matches!(req, Req::Table(TableReq::Abort { .. })) {
            self.tables.clients[c].pending = Some((request, self.now, req.clone()));
        }
        let Some(to) = target.filter(|n| !self.client_cut.contains(n)) else { return };
        let delay = self.rng.range(100, 1_500);
        match req {
            Req::Table(req) => self.schedule(delay, Event::TableRequest { client: c, request, to, req }),
            Req::Coord(req) => {
                self.schedule(delay, Event::TxnRequest { client: CLIENT_BASE + c, request, to, req });
            }
        }
    }

    /// No answer in time: reads and locks are sent again, coordinator requests too; a
    /// vote is a no (a single part's: unknown); an end is retried.
    fn table_timed_out(&mut self, c: usize, req: Req) {
        let Some(t) = self.tables.clients[c].current.as_mut() else { return };
        match (req, t.stage) {
            (Req::Table(TableReq::Commit { partition, .. }), Stage::Votes) => {
                if !t.two_phase && t.plan.iter().any(|p| !p.record.writes.is_empty()) {
                    return self.table_abort(c, TxnType::Info);
                }
                let index = partition.0 - self.table_base();
                let e = ClientError::Timeout("table commit".into());
                self.tables.clients[c].current.as_mut().expect("current").votes.push((index, Vote::Failed(e)));
            }
            (_, Stage::End { commit, tries }) => {
                if tries >= END_TRIES_MAX {
                    self.tables.clients[c].producer = None;
                    return self.table_finish(c, if commit { TxnType::Info } else { TxnType::Fail });
                }
                t.stage = Stage::End { commit, tries: tries + 1 };
            }
            _ => {}
        }
        self.table_next(c);
    }

    pub(super) fn table_client_response(&mut self, c: usize, request: u64, resp: TableResp) {
        let Some((id, _, req)) = self.tables.clients[c].pending.take() else { return };
        if id != request {
            self.tables.clients[c].pending = Some((id, 0, req));
            return; // a late answer to a request that timed out
        }
        let Req::Table(req) = req else { return };
        let backoff = self.now + self.rng.range(5_000, 40_000);
        let index = req.partition().0 - self.table_base();
        let Some(t) = self.tables.clients[c].current.as_mut() else { return };
        match resp {
            TableResp::Read(Ok((snapshot, value, version))) => {
                let TableReq::Read { key, .. } = req else { return };
                let part = t.parts.entry(index).or_default();
                part.snapshot.get_or_insert(snapshot.0);
                part.reads.entry(key.clone()).or_insert(version_code(version));
                t.known.entry(key).or_insert(value);
            }
            TableResp::Lock(Ok(())) => {
                let TableReq::Lock { key, .. } = req else { return };
                let part = t.parts.entry(index).or_default();
                part.locked.insert(key);
                part.turn = true;
            }
            TableResp::Read(Err(Refused::Aborted(_))) | TableResp::Lock(Err(Refused::Aborted(_))) => {
                return self.table_abort(c, TxnType::Fail);
            }
            TableResp::Read(Err(_)) | TableResp::Lock(Err(_)) => {
                self.tables.clients[c].idle_until = backoff;
                return;
            }
            TableResp::Commit(answer) => return self.table_voted(c, index, answer),
            TableResp::Abort => return,
        }
        self.table_next(c);
    }

    /// A part's TableCommit answer.
    fn table_voted(&mut self, c: usize, index: u32, answer: Result<Outcome, Refused>) {
        let t = self.tables.clients[c].current.as_mut().expect("current");
        if !t.two_phase && t.plan.len() == 1 {
            let kind = match answer {
                Ok(Outcome::Committed { .. }) => TxnType::Ok,
                Ok(Outcome::Aborted(_)) | Err(Refused::Aborted(_) | Refused::NotLeader) => TxnType::Fail,
                Ok(Outcome::Prepared { .. }) | Err(Refused::Unknown) => TxnType::Info,
            };
            return if kind == TxnType::Fail { self.table_abort(c, kind) } else { self.table_finish(c, kind) };
        }
        let vote = match answer {
            Ok(Outcome::Committed { offset, .. }) => Vote::Committed(offset.0),
            Ok(Outcome::Prepared { offset }) => Vote::Prepared(offset.0),
            Ok(Outcome::Aborted(r)) | Err(Refused::Aborted(r)) => Vote::Aborted(r.name().to_owned()),
            Err(Refused::NotLeader) => Vote::Failed(ClientError::Broker(ErrorCode::NOT_LEADER, String::new())),
            Err(Refused::Unknown) => Vote::Failed(ClientError::Broker(ErrorCode::UNKNOWN, String::new())),
        };
        t.votes.push((index, vote));
        self.table_next(c);
    }

    /// A transaction coordinator's answer to table client `c`.
    pub(super) fn table_coord_response(&mut self, c: usize, request: u64, resp: TxnResp) {
        let Some((id, _, req)) = self.tables.clients[c].pending.take() else { return };
        if id != request {
            self.tables.clients[c].pending = Some((id, 0, req));
            return;
        }
        let backoff = self.now + self.rng.range(5_000, 40_000);
        let Some(t) = self.tables.clients[c].current.as_mut() else { return };
        let retriable = |code: ErrorCode| {
            matches!(
                code,
                ErrorCode::NOT_COORDINATOR
                    | ErrorCode::COORDINATOR_LOAD_IN_PROGRESS
                    | ErrorCode::CONCURRENT_TRANSACTIONS
            )
        };
        let proceed = match (resp, t.stage) {
            (TxnResp::Init(Ok(identity)), Stage::Init) => {
                t.stage = Stage::Add;
                self.tables.clients[c].producer = Some(identity);
                true
            }
            (TxnResp::Add(Ok(())), Stage::Add) => {
                t.stage = Stage::Votes;
                true
            }
            (TxnResp::Add(Err(code)), Stage::Add) if !retriable(code) => {
                if matches!(code, ErrorCode::PRODUCER_FENCED | ErrorCode::INVALID_PRODUCER_ID_MAPPING) {
                    self.tables.clients[c].producer = None;
                    return self.table_abort(c, TxnType::Fail);
                }
                t.stage = Stage::End { commit: false, tries: 0 };
                true
            }
            (TxnResp::End(Ok(epoch)), Stage::End { commit, .. }) => {
                if let Some((_, e)) = self.tables.clients[c].producer.as_mut() {
                    *e = epoch;
                }
                if commit {
                    return self.table_finish(c, TxnType::Ok);
                }
                return self.table_abort(c, TxnType::Fail);
            }
            (TxnResp::End(Err(code)), Stage::End { commit, tries }) => {
                if retriable(code) && tries < END_TRIES_MAX {
                    t.stage = Stage::End { commit, tries: tries + 1 };
                    false
                } else {
                    // Fenced (the coordinator aborted it at its timeout, or another end won)
                    // or being decided the other way: a commit asked for is unknown.
                    self.tables.clients[c].producer = None;
                    let kind =
                        if commit && code != ErrorCode::INVALID_TXN_STATE { TxnType::Info } else { TxnType::Fail };
                    return if kind == TxnType::Fail { self.table_abort(c, kind) } else { self.table_finish(c, kind) };
                }
            }
            // Refused for now (or an answer of another kind: a dropped coordinator job).
            _ => false,
        };
        if proceed {
            self.table_next(c);
        } else {
            self.tables.clients[c].idle_until = backoff;
        }
    }

    /// The end of the run: what is open is unknown (or failed, before its commit); every
    /// live replica catches up (so the convergence check covers the final state); a table
    /// transaction must have committed in the last half of the healed phase.
    pub(super) fn table_final(&mut self, healed_half_us: u64) {
        for c in 0..self.tables.clients.len() {
            let ops = self.tables.clients[c].current.as_ref().map(|t| t.stage);
            match ops {
                Some(Stage::Ops) => self.table_finish(c, TxnType::Fail),
                Some(_) => self.table_finish(c, TxnType::Info),
                None => {}
            }
        }
        for i in 0..self.nodes.len() {
            for k in 0..PARTITIONS {
                let p = self.table_partition(k);
                if let Err(reason) = self.table_catch_up(i, p) {
                    self.violation(format!("liveness: node {} cannot read table {p} at the end: {reason}", i + 1));
                }
            }
        }
        let kinds = self.tables.history.txns.iter().fold([0u64; 3], |mut n, t| {
            n[t.kind as usize] += 1;
            n
        });
        tracing::debug!(ok = kinds[0], fail = kinds[1], info = kinds[2], "sim: table history");
        if self.tables.last_commit_us.is_none_or(|t| t < healed_half_us) {
            self.violation("liveness: no table transaction committed in the last half of the healed phase".into());
        }
    }
}

/// A refusal of the request's kind.
fn refusal(req: &TableReq, r: Refused) -> TableResp {
    match req {
        TableReq::Read { .. } => TableResp::Read(Err(r)),
        TableReq::Lock { .. } => TableResp::Lock(Err(r)),
        TableReq::Commit { .. } => TableResp::Commit(Err(r)),
        TableReq::Abort { .. } => TableResp::Abort,
    }
}

/// A stored comma-separated list as Elle's read value (absent: nil).
fn list(value: Option<&[u8]>) -> ReadValue {
    let Some(v) = value else { return ReadValue::Nil };
    let text = String::from_utf8_lossy(v);
    ReadValue::List(text.split(',').filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect())
}
