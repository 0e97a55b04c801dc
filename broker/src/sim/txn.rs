//! The simulator's transaction workload (`SimConfig::transactions`): the real
//! [`TxnCoordinator`] over replicated `__transaction_state` partitions of the simulated
//! cluster, real markers between brokers, simulated transactional producers and consumers in
//! both isolation levels, judged by [`crate::check::txn`].
//!
//! Partitions: [`DATA_PARTITIONS`] transactional data partitions and [`STATE_PARTITIONS`]
//! transaction state partitions, after the plain data partitions (and the offsets partition
//! of the group workload). Every node keeps a coordinator per state partition, as
//! [`super::groups`] keeps the group coordinator: every replica applies the committed records
//! at its tick (`core::machine::feed`), so a new leader starts warm; a node that leads at a
//! new epoch starts the timeouts and completes what its predecessor left prepared
//! (`unfinished`). Requests run one at a time per state partition (a bounded queue behind the
//! one in flight), as a **job**: a list of steps (write a record with `acks=all` and apply it
//! from the log, send markers and wait for every partition's answer, complete a prepared
//! transaction, answer). Markers travel as `Message::TxnMarker` over the simulated network
//! (delayed, dropped, duplicated, cut like every message) and are sent again until answered;
//! partitions take duplicates as done. Open transactions past their timeout are aborted
//! from the leader's tick when it is idle.
//!
//! Producers (one transactional id each) init, then loop: add two or three data partitions,
//! sometimes read one partition read_committed (the transaction's reads, for write-read
//! edges), write one unique value per partition (idempotent sequences per epoch), then commit
//! or abort at random. A write or end whose outcome is unknown is retried as is; a write that
//! keeps failing aborts the transaction. During the fault phase, requests to brokers are
//! sometimes duplicated or delayed by up to [`LATE_US_MAX`] — late writes and ends of ended
//! transactions, which KIP-890's checks must fence — and producers restart (a new instance:
//! its init fences the old, whose messages may still arrive). Consumers read every data
//! partition, one read_committed and one read_uncommitted, filtering aborted transactions as
//! the runtime's clients do (`is_aborted` over the leader's `aborted_in`; control batches are
//! never returned; positions move past both). At the end, every data partition is read
//! read_committed from its start, and its last stable offset must have reached its high
//! watermark (nothing left open).
//!
//! Exactly-once pipelines ([`pipeline`]): [`pipeline::PIPELINES`] more transactional clients
//! consume data partition 0 read_committed from their group's committed offset, write a
//! transform of each input to the other data partitions and commit the offset after their
//! last input in the same transaction (AddOffsetsToTxn and TxnOffsetCommit to the real group
//! coordinator on the workload's `__consumer_offsets` partition). They restart, and their
//! requests come late or twice, as the producers'.
//!
//! Not done: coordinator snapshots.

mod pipeline;

use std::collections::{BTreeMap, VecDeque};

use skein_client::wire::{ErrorCode, TxnOffsetCommitRequest};
use skein_log::batch::{batches, Attributes, BatchBuilder, RecordBatch};
use skein_log::types::{ProducerEpoch, ProducerId, Sequence};

use super::{Event, Sim, CLIENT_TIMEOUT_MS, PRODUCE_DEADLINE_MS};
use crate::check::txn::{Isolation, TxnConsumed, TxnHistory, TxnOp, TxnOutcome, TxnWrite};
use crate::check::{Offset as CheckOffset, PartitionId as CheckPartition, ProcessId, Value};
use crate::core::group::{partition_for, OFFSETS_TOPIC};
use crate::core::machine::LogMachine;
use crate::core::txn::{EndStep, InitStep, TxnCoordinator, TxnRecord, TxnState};
use crate::core::txn_partition::{is_aborted, MarkerKind};
use crate::core::{
    Acks, LeaderEpoch, MarkerRequest, MarkerResult, Message, NodeId, Offset, PartitionId, Peer, ProduceError,
    ReadFailure, RequestId,
};

/// Transactional data partitions.
pub(super) const DATA_PARTITIONS: u32 = 3;
/// `__transaction_state` partitions.
pub(super) const STATE_PARTITIONS: u32 = 2;
/// Partitions the workload adds to the cluster (the last one is the pipelines'
/// `__consumer_offsets` partition).
pub(super) const PARTITIONS: u32 = DATA_PARTITIONS + STATE_PARTITIONS + 1;
const PRODUCERS: usize = 4;
const CONSUMERS: usize = 2;
pub(super) const TICK_US: u64 = 3_000;
/// Transaction timeout the producers ask for (virtual time).
const TXN_TIMEOUT_MS: u32 = 1_500;
/// A marker unanswered this long is sent again.
const MARKER_RESEND_US: u64 = 150_000;
const COORDINATOR_QUEUE_MAX: usize = 8;
/// The longest extra delay of a late client request (fault phase).
const LATE_US_MAX: u64 = 2_500_000;
/// Tries of one write before the transaction is aborted; of one end before giving up.
const WRITE_TRIES_MAX: u32 = 6;
const END_TRIES_MAX: u32 = 30;
const TOPIC: &str = "txn-data";
const PROCESS_BASE: u32 = 3_000;
const FINAL_PROCESS: u32 = 3_999;

/// A request of a transactional client to a broker.
#[derive(Clone, Debug)]
pub(super) enum TxnReq {
    Init {
        id: String,
    },
    Add {
        id: String,
        producer: i64,
        epoch: i16,
        partitions: Vec<PartitionId>,
    },
    End {
        id: String,
        producer: i64,
        epoch: i16,
        commit: bool,
    },
    Produce {
        partition: PartitionId,
        batch: Vec<u8>,
    },
    Fetch {
        partition: PartitionId,
        from: Offset,
        isolation: Isolation,
    },
    /// AddOffsetsToTxn: the group's offsets partition joins the transaction.
    AddOffsets {
        id: String,
        producer: i64,
        epoch: i16,
    },
    /// To the group coordinator.
    OffsetCommit(TxnOffsetCommitRequest),
    /// OffsetFetch with require_stable, of one partition.
    OffsetFetch {
        group: String,
        partition: PartitionId,
    },
}

/// Its answer.
#[derive(Clone, Debug)]
pub(super) enum TxnResp {
    Init(Result<(i64, i16), ErrorCode>),
    Add(Result<(), ErrorCode>),
    /// The epoch to use next.
    End(Result<i16, ErrorCode>),
    Produce(Result<Offset, ProduceError>),
    /// Records returned and the position after them.
    Fetch(Result<(Vec<(CheckOffset, Value)>, Offset), ()>),
    AddOffsets(Result<(), ErrorCode>),
    OffsetCommit(Result<(), ErrorCode>),
    /// The committed offset (`None`: none).
    OffsetFetch(Result<Option<Offset>, ErrorCode>),
}

impl TxnReq {
    fn refused(&self, code: ErrorCode) -> TxnResp {
        match self {
            TxnReq::Init { .. } => TxnResp::Init(Err(code)),
            TxnReq::Add { .. } => TxnResp::Add(Err(code)),
            TxnReq::End { .. } => TxnResp::End(Err(code)),
            TxnReq::Produce { .. } => TxnResp::Produce(Err(ProduceError::NotLeader)),
            TxnReq::Fetch { .. } => TxnResp::Fetch(Err(())),
            TxnReq::AddOffsets { .. } => TxnResp::AddOffsets(Err(code)),
            TxnReq::OffsetCommit(_) => TxnResp::OffsetCommit(Err(code)),
            TxnReq::OffsetFetch { .. } => TxnResp::OffsetFetch(Err(code)),
        }
    }
}

/// One step of a coordinator job.
enum Step {
    /// Append the record (acks=all) and apply it from the log.
    Write(TxnRecord),
    /// Send these markers and wait until every partition answered.
    Markers { producer: i64, epoch: i16, kind: MarkerKind, partitions: Vec<PartitionId> },
    /// Markers and completing record of the id's prepared transaction, if it is prepared.
    Complete(String),
    /// Run the request again (an init that had to finish a transaction first).
    Rerun(TxnReq),
    /// Answer the client.
    Answer(TxnResp),
    /// Answer an end with the id's epoch now.
    AnswerEnd(String),
}

enum Stage {
    Ready,
    Writing {
        request: u64,
    },
    /// Unanswered markers: partition -> (correlation, when sent).
    Markers {
        request: MarkerRequest,
        waiting: BTreeMap<PartitionId, (u64, u64)>,
    },
}

struct Job {
    client: Option<(usize, u64)>,
    steps: VecDeque<Step>,
    stage: Stage,
}

impl Job {
    /// A job of no client that completes the prepared transactions `ids` (markers, then the
    /// completing record), as a coordinator does on taking over and on every tick.
    fn completing(ids: Vec<String>) -> Job {
        Job { client: None, steps: ids.into_iter().map(Step::Complete).collect(), stage: Stage::Ready }
    }
}

/// A node's coordinator of one state partition.
#[derive(Default)]
struct Coordinator {
    machine: Option<TxnCoordinator>,
    leading: Option<LeaderEpoch>,
    job: Option<Job>,
    queue: VecDeque<(usize, u64, TxnReq)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Init,
    Idle,
    Adding,
    Reading,
    Writing,
    Ending {
        commit: bool,
    },
    /// A pipeline fetches its group's committed offset.
    Offsets,
    /// A pipeline reads its input from its committed offset.
    Consuming {
        from: Offset,
    },
    /// A pipeline adds the offsets partition, then commits its offset.
    AddingOffsets,
    CommittingOffsets,
}

struct Current {
    partitions: Vec<PartitionId>,
    writes: Vec<TxnWrite>,
    reads: Vec<Value>,
    invoke_us: u64,
    commit_us: Option<u64>,
    next_write: usize,
    tries: u32,
    /// A pipeline's input and the offset it commits.
    consumed: Option<TxnConsumed>,
}

struct Client {
    producer: bool,
    isolation: Isolation,
    id: String,
    process: u32,
    phase: Phase,
    producer_id: i64,
    epoch: i16,
    /// Per partition: the epoch of its sequences and the next sequence.
    sequences: BTreeMap<PartitionId, (i16, i32)>,
    current: Option<Current>,
    /// (request, invoke time, the request for a retry)
    pending: Option<(u64, u64, TxnReq)>,
    idle_until: u64,
    positions: BTreeMap<PartitionId, Offset>,
    next_partition: u32,
    /// A pipeline's group (`None`: a producer or a consumer).
    group: Option<String>,
    /// When a pipeline began its current transaction (its offset fetch).
    started_us: u64,
}

/// The workload's state in the simulator.
#[derive(Default)]
pub(super) struct TxnSim {
    clients: Vec<Client>,
    /// Per node: a coordinator per state partition.
    coordinators: Vec<BTreeMap<PartitionId, Coordinator>>,
    /// Client produces in flight: (node index, core request) -> (client, client request).
    produces: BTreeMap<(usize, u64), (usize, u64)>,
    pub(super) history: TxnHistory,
    next_value: u64,
    next_producer_id: i64,
    next_correlation: u64,
    next_process: u32,
    last_commit_us: Option<u64>,
    /// Per node: the pipelines' group coordinator.
    offsets: Vec<pipeline::OffsetsCoordinator>,
}

impl TxnSim {
    pub(super) fn new(nodes: usize) -> TxnSim {
        let mut s = TxnSim {
            coordinators: (0..nodes).map(|_| BTreeMap::new()).collect(),
            offsets: (0..nodes).map(|_| pipeline::OffsetsCoordinator::default()).collect(),
            next_value: 1 << 40,
            next_producer_id: 50_000,
            next_process: PROCESS_BASE,
            ..TxnSim::default()
        };
        for c in 0..PRODUCERS + CONSUMERS + pipeline::PIPELINES {
            let process = s.next_process;
            s.next_process += 1;
            let pipe = c.checked_sub(PRODUCERS + CONSUMERS);
            s.clients.push(Client {
                producer: c < PRODUCERS || pipe.is_some(),
                isolation: if c == PRODUCERS { Isolation::ReadUncommitted } else { Isolation::ReadCommitted },
                id: pipe.map_or_else(|| format!("tx-{c}"), |k| format!("pipe-{k}")),
                process,
                phase: Phase::Init,
                producer_id: -1,
                epoch: -1,
                sequences: BTreeMap::new(),
                current: None,
                pending: None,
                idle_until: 0,
                positions: BTreeMap::new(),
                next_partition: c as u32,
                group: pipe.map(pipeline::group),
                started_us: 0,
            });
        }
        s
    }

    /// The coordinators alone, without the workload's clients (the table workload's
    /// two-phase commits use them).
    pub(super) fn coordinators_only(nodes: usize) -> TxnSim {
        TxnSim {
            coordinators: (0..nodes).map(|_| BTreeMap::new()).collect(),
            offsets: (0..nodes).map(|_| pipeline::OffsetsCoordinator::default()).collect(),
            next_producer_id: 80_000,
            ..TxnSim::default()
        }
    }

    pub(super) fn clients(&self) -> usize {
        self.clients.len()
    }
}

impl Sim {
    fn txn_base(&self) -> u32 {
        self.cfg.partitions + u32::from(self.cfg.groups)
    }

    fn data_partition(&self, k: u32) -> PartitionId {
        PartitionId(self.txn_base() + k)
    }

    pub(super) fn state_partition(&self, id: &str) -> PartitionId {
        PartitionId(self.txn_base() + DATA_PARTITIONS + partition_for(id, STATE_PARTITIONS))
    }

    pub(super) fn leader_of(&self, p: PartitionId) -> Option<NodeId> {
        self.view().and_then(|v| v.partition(p)).and_then(|s| s.leader)
    }

    /// A node crashed or started: its coordinators and requests are gone.
    pub(super) fn txn_reset_node(&mut self, i: usize) {
        if let Some(c) = self.txn.coordinators.get_mut(i) {
            c.clear();
        }
        if let Some(c) = self.txn.offsets.get_mut(i) {
            *c = pipeline::OffsetsCoordinator::default();
        }
        self.txn.produces.retain(|(n, _), _| *n != i);
    }

    // ---- clients ----

    pub(super) fn txn_client_tick(&mut self, c: usize) {
        let now = self.now;
        if let Some((_, invoked, _)) = &self.txn.clients[c].pending {
            if now.saturating_sub(*invoked) / 1000 < CLIENT_TIMEOUT_MS {
                return;
            }
            let (_, _, req) = self.txn.clients[c].pending.take().expect("checked above");
            self.txn_timed_out(c, req);
            return;
        }
        if now < self.txn.clients[c].idle_until {
            return;
        }
        if !self.txn.clients[c].producer {
            self.txn_consume(c);
            return;
        }
        if self.faults_on && self.rng.chance(3) {
            self.txn_restart(c);
            return;
        }
        self.txn_next_request(c);
    }

    /// A new producer instance: what the old one had open is unknown; its messages may still
    /// arrive.
    fn txn_restart(&mut self, c: usize) {
        tracing::debug!(client = c, at_ms = self.now / 1000, "sim: transactional producer restarts");
        self.txn_finish(c, TxnOutcome::Unknown);
        let process = self.txn.next_process;
        self.txn.next_process += 1;
        let cl = &mut self.txn.clients[c];
        cl.process = process;
        cl.phase = Phase::Init;
        cl.pending = None;
        cl.sequences.clear();
        cl.positions.clear();
        cl.idle_until = self.now + self.rng.range(50_000, 400_000);
    }

    fn txn_next_request(&mut self, c: usize) {
        let cl = &self.txn.clients[c];
        let (id, producer, epoch) = (cl.id.clone(), cl.producer_id, cl.epoch);
        match cl.phase {
            Phase::Init => self.txn_send(c, TxnReq::Init { id }),
            Phase::Idle => {
                if self.draining {
                    return;
                }
                if let Some(group) = cl.group.clone() {
                    let cl = &mut self.txn.clients[c];
                    cl.phase = Phase::Offsets;
                    cl.started_us = self.now;
                    return self.pipeline_fetch_offset(c, group);
                }
                let mut partitions: Vec<PartitionId> = (0..DATA_PARTITIONS).map(|k| self.data_partition(k)).collect();
                let drop = self.rng.below(u64::from(DATA_PARTITIONS) + 1) as usize;
                if drop < partitions.len() {
                    partitions.remove(drop);
                }
                let writes = partitions
                    .iter()
                    .map(|p| {
                        self.txn.next_value += 1;
                        TxnWrite { partition: CheckPartition(p.0), value: Value(self.txn.next_value), offset: None }
                    })
                    .collect();
                self.txn.clients[c].current = Some(Current {
                    partitions: partitions.clone(),
                    writes,
                    reads: Vec::new(),
                    invoke_us: self.now,
                    commit_us: None,
                    next_write: 0,
                    tries: 0,
                    consumed: None,
                });
                self.txn.clients[c].phase = Phase::Adding;
                self.txn_send(c, TxnReq::Add { id, producer, epoch, partitions });
            }
            Phase::Adding => {
                let partitions = self.txn.clients[c].current.as_ref().map(|t| t.partitions.clone()).unwrap_or_default();
                self.txn_send(c, TxnReq::Add { id, producer, epoch, partitions });
            }
            Phase::Reading => {
                let k = self.rng.below(u64::from(DATA_PARTITIONS)) as u32;
                let p = self.data_partition(k);
                let from = self.txn.clients[c].positions.get(&p).copied().unwrap_or(Offset(0));
                self.txn_send(c, TxnReq::Fetch { partition: p, from, isolation: Isolation::ReadCommitted });
            }
            Phase::Writing => self.txn_write(c),
            Phase::Offsets | Phase::Consuming { .. } if self.draining => self.txn.clients[c].phase = Phase::Idle,
            Phase::Offsets => {
                let group = cl.group.clone().unwrap_or_default();
                self.pipeline_fetch_offset(c, group);
            }
            Phase::Consuming { from } => {
                let partition = self.pipeline_input();
                self.txn_send(c, TxnReq::Fetch { partition, from, isolation: Isolation::ReadCommitted });
            }
            Phase::AddingOffsets => self.txn_send(c, TxnReq::AddOffsets { id, producer, epoch }),
            Phase::CommittingOffsets => self.pipeline_commit_offset(c),
            Phase::Ending { commit } => {
                if commit {
                    if let Some(t) = self.txn.clients[c].current.as_mut() {
                        t.commit_us.get_or_insert(self.now);
                    }
                }
                self.txn_send(c, TxnReq::End { id, producer, epoch, commit });
            }
        }
    }

    fn txn_write(&mut self, c: usize) {
        let cl = &mut self.txn.clients[c];
        let Some(t) = cl.current.as_mut() else { return };
        let Some(w) = t.writes.get(t.next_write) else {
            if cl.group.is_some() {
                cl.phase = Phase::AddingOffsets;
            } else {
                let commit = self.rng.chance(700);
                self.txn.clients[c].phase = Phase::Ending { commit };
            }
            self.txn_next_request(c);
            return;
        };
        let p = PartitionId(w.partition.0);
        let value = w.value.0;
        t.tries += 1;
        let epoch = cl.epoch;
        let seq = match cl.sequences.get(&p) {
            Some(&(e, s)) if e == epoch => s,
            _ => 0,
        };
        cl.sequences.insert(p, (epoch, seq));
        let mut b = BatchBuilder::new()
            .producer(ProducerId(cl.producer_id), ProducerEpoch(epoch), Sequence(seq))
            .attributes(Attributes::default().with_transactional(true));
        b.push(None, &value.to_le_bytes(), &[], crate::core::Time(self.now).timestamp());
        self.txn_send(c, TxnReq::Produce { partition: p, batch: b.build().into_bytes() });
    }

    fn txn_consume(&mut self, c: usize) {
        let cl = &mut self.txn.clients[c];
        let k = cl.next_partition % DATA_PARTITIONS;
        cl.next_partition += 1;
        let isolation = cl.isolation;
        let p = self.data_partition(k);
        let from = self.txn.clients[c].positions.get(&p).copied().unwrap_or(Offset(0));
        self.txn_send(c, TxnReq::Fetch { partition: p, from, isolation });
    }

    /// Sends a request to the broker it is for; in the fault phase it may be duplicated or
    /// arrive late.
    fn txn_send(&mut self, c: usize, req: TxnReq) {
        let target = match &req {
            TxnReq::Init { id } | TxnReq::Add { id, .. } | TxnReq::End { id, .. } | TxnReq::AddOffsets { id, .. } => {
                self.leader_of(self.state_partition(id))
            }
            TxnReq::Produce { partition, .. } | TxnReq::Fetch { partition, .. } => self.leader_of(*partition),
            TxnReq::OffsetCommit(_) | TxnReq::OffsetFetch { .. } => self.leader_of(self.offsets_partition_txn()),
        };
        let request = self.next_request;
        self.next_request += 1;
        self.txn.clients[c].pending = Some((request, self.now, req.clone()));
        let Some(to) = target.filter(|n| !self.client_cut.contains(n)) else { return };
        let client_request = !matches!(req, TxnReq::Fetch { .. } | TxnReq::OffsetFetch { .. });
        if self.faults_on && client_request && self.rng.chance(50) {
            let late = self.rng.range(1_000, LATE_US_MAX);
            self.schedule(late, Event::TxnRequest { client: c, request, to, req: req.clone() });
            if self.rng.chance(500) {
                return; // only the late copy
            }
        }
        let delay = self.rng.range(100, 1_500);
        self.schedule(delay, Event::TxnRequest { client: c, request, to, req });
    }

    fn txn_timed_out(&mut self, c: usize, req: TxnReq) {
        match req {
            TxnReq::Produce { .. } => {
                // A write whose outcome is unknown: retried as is, or (as a delivery timeout
                // would) the transaction aborts with the write still in flight.
                let tries = self.txn.clients[c].current.as_ref().map_or(0, |t| t.tries);
                if tries >= WRITE_TRIES_MAX || self.rng.chance(500) {
                    self.txn.clients[c].phase = Phase::Ending { commit: false };
                }
            }
            TxnReq::End { .. } => self.txn_end_retry(c),
            TxnReq::OffsetCommit(_) => {
                // Written or not: retried as is (the same offset again), or the transaction
                // aborts.
                let tries = self.txn.clients[c].current.as_ref().map_or(0, |t| t.tries);
                if tries >= WRITE_TRIES_MAX {
                    self.txn.clients[c].phase = Phase::Ending { commit: false };
                }
            }
            TxnReq::Fetch { .. } if self.txn.clients[c].phase == Phase::Reading => {
                self.txn.clients[c].phase = Phase::Writing;
            }
            _ => {}
        }
    }

    fn txn_end_retry(&mut self, c: usize) {
        let Some(t) = self.txn.clients[c].current.as_mut() else {
            self.txn.clients[c].phase = Phase::Idle;
            return;
        };
        t.tries += 1;
        if t.tries > END_TRIES_MAX {
            self.txn_finish(c, TxnOutcome::Unknown);
            self.txn.clients[c].phase = Phase::Init;
        }
    }

    /// Records the current transaction with `outcome`.
    fn txn_finish(&mut self, c: usize, outcome: TxnOutcome) {
        let cl = &mut self.txn.clients[c];
        let Some(t) = cl.current.take() else { return };
        if outcome == TxnOutcome::Committed {
            self.txn.last_commit_us = Some(self.now);
        }
        self.txn.history.push(TxnOp::Txn {
            process: ProcessId(cl.process),
            writes: t.writes,
            reads: t.reads,
            invoke_us: t.invoke_us,
            commit_us: t.commit_us,
            complete_us: self.now,
            outcome,
            consumed: t.consumed,
        });
    }

    pub(super) fn txn_client_response(&mut self, c: usize, request: u64, resp: TxnResp) {
        let Some((id, invoked, req)) = self.txn.clients[c].pending.take() else { return };
        if id != request {
            self.txn.clients[c].pending = Some((id, invoked, req));
            return; // a late answer to a request that already timed out
        }
        let backoff = self.now + self.rng.range(5_000, 40_000);
        match resp {
            TxnResp::Init(Ok((producer, epoch))) => {
                let cl = &mut self.txn.clients[c];
                cl.producer_id = producer;
                cl.epoch = epoch;
                cl.phase = Phase::Idle;
            }
            TxnResp::Init(Err(_)) => self.txn.clients[c].idle_until = backoff,
            TxnResp::Add(Ok(())) => {
                let pipeline = self.txn.clients[c].group.is_some();
                self.txn.clients[c].phase =
                    if !pipeline && self.rng.chance(500) { Phase::Reading } else { Phase::Writing };
            }
            TxnResp::AddOffsets(Ok(())) => {
                let cl = &mut self.txn.clients[c];
                cl.phase = Phase::CommittingOffsets;
                if let Some(t) = cl.current.as_mut() {
                    t.tries = 0;
                }
            }
            TxnResp::AddOffsets(Err(code)) => self.txn_refused(c, code, backoff),
            TxnResp::OffsetCommit(Ok(())) => {
                let commit = self.rng.chance(800);
                self.txn.clients[c].phase = Phase::Ending { commit };
            }
            TxnResp::OffsetCommit(Err(code)) => {
                tracing::debug!(client = c, ?code, "sim: pipeline offset commit refused");
                let tries = self.txn.clients[c].current.as_ref().map_or(0, |t| t.tries);
                let retriable = matches!(
                    code,
                    ErrorCode::NOT_COORDINATOR | ErrorCode::COORDINATOR_LOAD_IN_PROGRESS | ErrorCode::REQUEST_TIMED_OUT
                );
                if !retriable || tries >= WRITE_TRIES_MAX {
                    // Fenced or not in the transaction here: the end tells how it ended.
                    self.txn.clients[c].phase = Phase::Ending { commit: false };
                }
                self.txn.clients[c].idle_until = backoff;
            }
            TxnResp::OffsetFetch(got) => {
                if self.txn.clients[c].phase == Phase::Offsets {
                    self.pipeline_offset(c, invoked, got);
                }
            }
            TxnResp::Add(Err(code)) => self.txn_refused(c, code, backoff),
            TxnResp::Produce(Ok(offset)) => {
                let cl = &mut self.txn.clients[c];
                let Some(t) = cl.current.as_mut() else { return };
                let Some(w) = t.writes.get_mut(t.next_write) else { return };
                w.offset = Some(CheckOffset(offset.0));
                if let Some((_, s)) = cl.sequences.get_mut(&PartitionId(w.partition.0)) {
                    *s += 1;
                }
                t.next_write += 1;
                t.tries = 0;
            }
            TxnResp::Produce(Err(e)) => {
                let tries = self.txn.clients[c].current.as_ref().map_or(0, |t| t.tries);
                let retriable = matches!(
                    e,
                    ProduceError::NotLeader
                        | ProduceError::FencedLeaderEpoch
                        | ProduceError::NotEnoughReplicas
                        | ProduceError::LeaderNotReady
                );
                if !retriable || tries >= WRITE_TRIES_MAX {
                    self.txn.clients[c].phase = Phase::Ending { commit: false };
                }
                self.txn.clients[c].idle_until = backoff;
            }
            TxnResp::Fetch(Ok((records, next))) => {
                let TxnReq::Fetch { partition, from, isolation } = req else { return };
                if self.txn.clients[c].phase == (Phase::Consuming { from }) {
                    self.pipeline_consumed(c, from, &records, next);
                }
                self.txn.clients[c].positions.insert(partition, next);
                let cl = &mut self.txn.clients[c];
                if cl.phase == Phase::Reading {
                    if let Some(t) = cl.current.as_mut() {
                        t.reads.extend(records.iter().map(|&(_, v)| v));
                    }
                    cl.phase = Phase::Writing;
                }
                self.txn.history.push(TxnOp::Poll {
                    process: ProcessId(self.txn.clients[c].process),
                    partition: CheckPartition(partition.0),
                    isolation,
                    from: CheckOffset(from.0),
                    next: CheckOffset(next.0),
                    records,
                    invoke_us: invoked,
                    complete_us: self.now,
                    final_read: false,
                });
            }
            TxnResp::Fetch(Err(())) => {
                if self.txn.clients[c].phase == Phase::Reading {
                    self.txn.clients[c].phase = Phase::Writing;
                }
                self.txn.clients[c].idle_until = backoff;
            }
            TxnResp::End(Ok(epoch)) => {
                let Phase::Ending { commit } = self.txn.clients[c].phase else { return };
                self.txn_finish(c, if commit { TxnOutcome::Committed } else { TxnOutcome::Aborted });
                let cl = &mut self.txn.clients[c];
                cl.epoch = epoch;
                cl.phase = Phase::Idle;
            }
            TxnResp::End(Err(code)) => {
                let Phase::Ending { commit } = self.txn.clients[c].phase else { return };
                match code {
                    ErrorCode::PRODUCER_FENCED | ErrorCode::INVALID_PRODUCER_ID_MAPPING => {
                        // The coordinator aborted it (a timeout) or a newer instance took over.
                        let outcome = if commit { TxnOutcome::Unknown } else { TxnOutcome::Aborted };
                        self.txn_finish(c, outcome);
                        self.txn.clients[c].phase = Phase::Init;
                    }
                    ErrorCode::INVALID_TXN_STATE => {
                        // Being decided the other way: an abort when we asked to commit.
                        let outcome = if commit { TxnOutcome::Aborted } else { TxnOutcome::Unknown };
                        self.txn_finish(c, outcome);
                        self.txn.clients[c].phase = Phase::Init;
                    }
                    _ => {
                        self.txn_end_retry(c);
                        self.txn.clients[c].idle_until = backoff;
                    }
                }
            }
        }
    }

    /// An add refused: retry what may pass later, abort the rest (a fenced producer starts
    /// over with init).
    fn txn_refused(&mut self, c: usize, code: ErrorCode, backoff: u64) {
        self.txn.clients[c].idle_until = backoff;
        match code {
            ErrorCode::PRODUCER_FENCED | ErrorCode::INVALID_PRODUCER_ID_MAPPING => {
                self.txn_finish(c, TxnOutcome::Aborted);
                self.txn.clients[c].phase = Phase::Init;
            }
            ErrorCode::NOT_COORDINATOR
            | ErrorCode::COORDINATOR_LOAD_IN_PROGRESS
            | ErrorCode::CONCURRENT_TRANSACTIONS => {}
            _ => self.txn.clients[c].phase = Phase::Ending { commit: false },
        }
    }

    fn txn_reply(&mut self, i: usize, client: usize, request: u64, resp: TxnResp) {
        if self.client_cut.contains(&self.nodes[i].id) {
            return;
        }
        let delay = self.rng.range(100, 1_500);
        self.schedule(delay, Event::TxnResponse { client, request, resp });
    }

    // ---- brokers ----

    pub(super) fn serve_txn(&mut self, client: usize, request: u64, to: NodeId, req: TxnReq) {
        let i = self.idx(to);
        let now = self.local(i);
        if self.nodes[i].core.is_none() {
            let resp = req.refused(ErrorCode::NOT_COORDINATOR);
            self.txn_reply(i, client, request, resp);
            return;
        }
        match req {
            TxnReq::Produce { partition, batch } => {
                let Ok(batch) = RecordBatch::parse(batch) else { return };
                let id = self.next_request;
                self.next_request += 1;
                self.txn.produces.insert((i, id), (client, request));
                let mut out = Vec::new();
                let deadline = now.plus_ms(PRODUCE_DEADLINE_MS);
                let core = self.nodes[i].core.as_mut().expect("checked above");
                core.handle_produce(now, RequestId(id), partition, None, batch, Acks::All, deadline, &mut out);
                self.execute(i, out);
            }
            TxnReq::Fetch { partition, from, isolation } => {
                let resp = self.txn_fetch(i, partition, from, isolation);
                self.txn_reply(i, client, request, TxnResp::Fetch(resp));
            }
            TxnReq::OffsetCommit(_) | TxnReq::OffsetFetch { .. } => self.offsets_serve(i, client, request, req),
            TxnReq::Init { ref id }
            | TxnReq::Add { ref id, .. }
            | TxnReq::End { ref id, .. }
            | TxnReq::AddOffsets { ref id, .. } => {
                let p = self.state_partition(id);
                let c = self.txn.coordinators[i].entry(p).or_default();
                if c.job.is_some() {
                    if c.queue.len() < COORDINATOR_QUEUE_MAX {
                        c.queue.push_back((client, request, req));
                    } else {
                        let resp = req.refused(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS);
                        self.txn_reply(i, client, request, resp);
                    }
                    return;
                }
                self.txn_run(i, p, client, request, req);
            }
        }
    }

    /// A fetch as the runtime serves it: up to the last stable offset in read_committed, with
    /// aborted transactions filtered and control batches dropped.
    fn txn_fetch(
        &mut self,
        i: usize,
        p: PartitionId,
        from: Offset,
        isolation: Isolation,
    ) -> Result<(Vec<(CheckOffset, Value)>, Offset), ()> {
        let now = self.local(i);
        let core = self.nodes[i].core.as_ref().ok_or(())?;
        let stable = isolation == Isolation::ReadCommitted;
        let (bytes, _hw) = match core.read_leader(now, p, from, 64 * 1024, stable) {
            Ok(x) => x,
            Err(ReadFailure::Storage(reason)) => {
                self.txn_fail_stop(i, reason.to_string());
                return Err(());
            }
            Err(_) => return Err(()),
        };
        let mut next = from;
        let mut all = Vec::new();
        for b in batches(&bytes) {
            let Ok(b) = b else { break };
            let h = *b.header();
            next = next.max(h.next_offset());
            if h.attributes.is_control() {
                continue;
            }
            for (k, r) in b.records().iter().enumerate() {
                let o = Offset(h.base_offset.0 + k as u64);
                if o < from {
                    continue;
                }
                let v = r.value.as_slice();
                let value = if v.len() == 8 { u64::from_le_bytes(v.try_into().expect("8 bytes")) } else { 0 };
                all.push((h.producer_id, o, value));
            }
        }
        let replica = core.replica(p).ok_or(())?;
        let aborted = if stable { replica.aborted_in(from, next) } else { Vec::new() };
        let records = all
            .into_iter()
            .filter(|&(producer, o, _)| !stable || !is_aborted(&aborted, producer, o))
            .map(|(_, o, v)| (CheckOffset(o.0), Value(v)))
            .collect();
        Ok((records, next))
    }

    fn txn_fail_stop(&mut self, i: usize, reason: String) {
        tracing::debug!(node = i + 1, %reason, "fail-stop (transaction workload)");
        self.crash(i);
        let back = self.rng.range(100_000, 1_000_000);
        let id = self.nodes[i].id;
        self.schedule(back, Event::Restart(id));
    }

    /// Whether `request` is a transactional client's produce on node `i`; answers it if so.
    pub(super) fn txn_produce_reply(
        &mut self,
        i: usize,
        request: RequestId,
        result: &Result<Offset, ProduceError>,
    ) -> bool {
        if let Some((client, creq)) = self.txn.produces.remove(&(i, request.0)) {
            self.txn_reply(i, client, creq, TxnResp::Produce(*result));
            return true;
        }
        if self.offsets_produce_reply(i, request, *result) {
            return true;
        }
        let writing = self.txn.coordinators.get(i).and_then(|cs| {
            cs.iter().find_map(|(p, c)| match c.job.as_ref().map(|j| &j.stage) {
                Some(Stage::Writing { request: r }) if *r == request.0 => Some(*p),
                _ => None,
            })
        });
        let Some(p) = writing else { return false };
        self.txn_written(i, p, *result);
        true
    }

    /// The epoch node `i` coordinates state partition `p` at (its machine caught up), or the
    /// code refusing requests.
    fn txn_ready(&mut self, i: usize, p: PartitionId) -> Result<LeaderEpoch, ErrorCode> {
        let now = self.local(i);
        // A leader with a valid lease whose high watermark reached its epoch's start.
        let epoch = match self.nodes[i].core.as_ref().map(|core| core.coordinating(now, p)) {
            Some(Ok(epoch)) => epoch,
            None | Some(Err(ProduceError::NotLeader)) => {
                self.txn.coordinators[i].entry(p).or_default().leading = None;
                return Err(ErrorCode::NOT_COORDINATOR);
            }
            Some(Err(_)) => return Err(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS),
        };
        if let Err(reason) = self.txn_catch_up(i, p) {
            self.txn_fail_stop(i, reason);
            return Err(ErrorCode::NOT_COORDINATOR);
        }
        let c = self.txn.coordinators[i].entry(p).or_default();
        if c.leading != Some(epoch) {
            c.leading = Some(epoch);
            let machine = c.machine.as_mut().expect("caught up");
            machine.start_timers(now);
            let unfinished = machine.unfinished();
            tracing::debug!(node = i + 1, %p, epoch = epoch.0, ?unfinished, "sim: coordinating transactions");
            if !unfinished.is_empty() && c.job.is_none() {
                c.job = Some(Job::completing(unfinished));
            }
        }
        Ok(epoch)
    }

    /// Applies the state partition's records below node `i`'s high watermark.
    fn txn_catch_up(&mut self, i: usize, p: PartitionId) -> Result<(), String> {
        let no_bump = self.cfg.plant.no_txn_epoch_bump;
        let Some(core) = self.nodes[i].core.as_ref() else { return Ok(()) };
        let c = self.txn.coordinators[i].entry(p).or_default();
        let Some(replica) = core.replica(p) else {
            c.machine = None;
            return Ok(());
        };
        let log = replica.log();
        if c.machine.as_ref().is_some_and(|m| m.applied() < log.log_start_offset()) {
            c.machine = None;
            c.leading = None;
        }
        let machine = c.machine.get_or_insert_with(|| TxnCoordinator::new(no_bump));
        crate::core::machine::catch_up(replica, machine)
            .map_err(|e| format!("reading the transaction state partition: {e}"))?;
        Ok(())
    }

    /// Runs one client request on node `i`'s coordinator of `p` (nothing in flight).
    fn txn_run(&mut self, i: usize, p: PartitionId, client: usize, request: u64, req: TxnReq) {
        if let Err(code) = self.txn_ready(i, p) {
            let resp = req.refused(code);
            self.txn_reply(i, client, request, resp);
            return;
        }
        let c = self.txn.coordinators[i].get_mut(&p).expect("ready");
        if c.job.is_some() {
            // The load queued completions first.
            c.queue.push_front((client, request, req));
            return self.txn_advance(i, p);
        }
        c.job = Some(Job {
            client: Some((client, request)),
            steps: VecDeque::from([Step::Rerun(req)]),
            stage: Stage::Ready,
        });
        self.txn_advance(i, p);
    }

    /// The steps of one request.
    fn txn_steps(&mut self, i: usize, p: PartitionId, req: TxnReq) -> Vec<Step> {
        let wall_ms = self.now / 1000;
        let data = |ps: &[PartitionId]| -> Vec<(String, u32)> { ps.iter().map(|q| (TOPIC.to_string(), q.0)).collect() };
        let mut next_pid = self.txn.next_producer_id;
        let offsets = self.offsets_partition_txn();
        let machine = self.txn.coordinators[i][&p].machine.as_ref().expect("ready");
        let steps = match &req {
            TxnReq::Init { id } => match machine.init(id, TXN_TIMEOUT_MS, || {
                next_pid += 1;
                Some(next_pid)
            }) {
                Ok(InitStep::Done(rec)) => {
                    let resp = TxnResp::Init(Ok((rec.meta.producer_id, rec.meta.epoch)));
                    vec![Step::Write(rec), Step::Answer(resp)]
                }
                Ok(InitStep::FinishFirst(rec)) => {
                    let mut s: Vec<Step> = rec.into_iter().map(Step::Write).collect();
                    s.push(Step::Complete(id.clone()));
                    s.push(Step::Rerun(req.clone()));
                    s
                }
                Err((code, _)) => vec![Step::Answer(TxnResp::Init(Err(code)))],
            },
            TxnReq::Add { id, producer, epoch, partitions } => {
                match machine.add_partitions(id, *producer, *epoch, &data(partitions), wall_ms) {
                    Ok(rec) => {
                        let mut s: Vec<Step> = rec.into_iter().map(Step::Write).collect();
                        s.push(Step::Markers {
                            producer: *producer,
                            epoch: *epoch,
                            kind: MarkerKind::Begin,
                            partitions: partitions.clone(),
                        });
                        s.push(Step::Answer(TxnResp::Add(Ok(()))));
                        s
                    }
                    Err((code, _)) => vec![Step::Answer(TxnResp::Add(Err(code)))],
                }
            }
            TxnReq::End { id, producer, epoch, commit } => match machine.end(id, *producer, *epoch, *commit) {
                Ok(EndStep::Write(rec)) => {
                    let prepares = matches!(rec.meta.state, TxnState::PrepareCommit | TxnState::PrepareAbort);
                    let mut s = vec![Step::Write(rec)];
                    if prepares {
                        s.push(Step::Complete(id.clone()));
                    }
                    s.push(Step::AnswerEnd(id.clone()));
                    s
                }
                Ok(EndStep::Complete) => vec![Step::Complete(id.clone()), Step::AnswerEnd(id.clone())],
                Ok(EndStep::Done(_, e)) => vec![Step::Answer(TxnResp::End(Ok(e)))],
                Err((code, _)) => vec![Step::Answer(TxnResp::End(Err(code)))],
            },
            TxnReq::AddOffsets { id, producer, epoch } => {
                // The runtime's AddOffsetsToTxn: the group's offsets partition joins, with its
                // Begin marker.
                let parts = [(OFFSETS_TOPIC.to_string(), offsets.0)];
                match machine.add_partitions(id, *producer, *epoch, &parts, wall_ms) {
                    Ok(rec) => {
                        let mut s: Vec<Step> = rec.into_iter().map(Step::Write).collect();
                        s.push(Step::Markers {
                            producer: *producer,
                            epoch: *epoch,
                            kind: MarkerKind::Begin,
                            partitions: vec![offsets],
                        });
                        s.push(Step::Answer(TxnResp::AddOffsets(Ok(()))));
                        s
                    }
                    Err((code, _)) => vec![Step::Answer(TxnResp::AddOffsets(Err(code)))],
                }
            }
            TxnReq::Produce { .. } | TxnReq::Fetch { .. } | TxnReq::OffsetCommit(_) | TxnReq::OffsetFetch { .. } => {
                Vec::new()
            }
        };
        self.txn.next_producer_id = next_pid;
        steps
    }

    /// Runs node `i`'s job on `p` until it waits (a write, markers) or ends; then the next
    /// queued request.
    fn txn_advance(&mut self, i: usize, p: PartitionId) {
        loop {
            if self.nodes[i].core.is_none() {
                return;
            }
            let Some(c) = self.txn.coordinators[i].get_mut(&p) else { return };
            let Some(job) = c.job.as_mut() else {
                let Some((client, request, req)) = c.queue.pop_front() else { return };
                c.job = Some(Job {
                    client: Some((client, request)),
                    steps: VecDeque::from([Step::Rerun(req)]),
                    stage: Stage::Ready,
                });
                continue;
            };
            if !matches!(job.stage, Stage::Ready) {
                return;
            }
            let Some(step) = job.steps.pop_front() else {
                c.job = None;
                continue;
            };
            let client = job.client;
            match step {
                Step::Write(rec) => self.txn_write_record(i, p, rec),
                Step::Markers { producer, epoch, kind, partitions } => {
                    self.txn_markers(i, p, producer, epoch, kind, partitions)
                }
                Step::Complete(id) => {
                    let machine = c.machine.as_ref().expect("a job runs on a loaded machine");
                    if let Some(done) = machine.completion(&id) {
                        let partitions = done.partitions.iter().map(|(_, q)| PartitionId(*q)).collect();
                        job.steps.push_front(Step::Write(done.record));
                        job.steps.push_front(Step::Markers {
                            producer: done.producer.0,
                            epoch: done.epoch,
                            kind: done.kind,
                            partitions,
                        });
                    }
                }
                Step::Rerun(req) => {
                    let steps = self.txn_steps(i, p, req);
                    let job = self.txn.coordinators[i].get_mut(&p).and_then(|c| c.job.as_mut()).expect("running");
                    for s in steps.into_iter().rev() {
                        job.steps.push_front(s);
                    }
                }
                Step::Answer(resp) => {
                    if let Some((cl, r)) = client {
                        self.txn_reply(i, cl, r, resp);
                    }
                }
                Step::AnswerEnd(id) => {
                    let epoch = c.machine.as_ref().and_then(|m| m.get(&id)).map(|m| m.epoch);
                    let resp = TxnResp::End(epoch.ok_or(ErrorCode::NOT_COORDINATOR));
                    if let Some((cl, r)) = client {
                        self.txn_reply(i, cl, r, resp);
                    }
                }
            }
        }
    }

    fn txn_write_record(&mut self, i: usize, p: PartitionId, rec: TxnRecord) {
        let Some(epoch) = self.txn.coordinators[i][&p].leading else {
            return self.txn_abandon(i, p);
        };
        let now = self.local(i);
        let (key, value) = rec.encode();
        let mut b = BatchBuilder::new();
        b.push(Some(&key), &value, &[], now.timestamp());
        let Ok(batch) = RecordBatch::parse(b.build().into_bytes()) else { unreachable!("a built batch parses") };
        let id = self.next_request;
        self.next_request += 1;
        if let Some(job) = self.txn.coordinators[i].get_mut(&p).and_then(|c| c.job.as_mut()) {
            job.stage = Stage::Writing { request: id };
        }
        let deadline = now.plus_ms(PRODUCE_DEADLINE_MS);
        let mut out = Vec::new();
        let core = self.nodes[i].core.as_mut().expect("a coordinator runs on a live node");
        core.handle_produce(now, RequestId(id), p, Some(epoch), batch, Acks::All, deadline, &mut out);
        self.execute(i, out);
    }

    /// The coordinator's record append finished: apply it from the log and go on, or drop
    /// the machine (rebuilt from the log) and the job (its client times out or retries).
    fn txn_written(&mut self, i: usize, p: PartitionId, result: Result<Offset, ProduceError>) {
        let applied = match result {
            Ok(base) => match self.txn_catch_up(i, p) {
                Ok(()) => self.txn.coordinators[i][&p].machine.as_ref().is_some_and(|m| m.applied() > base),
                Err(reason) => {
                    self.txn_fail_stop(i, reason);
                    return;
                }
            },
            Err(_) => false,
        };
        if !applied {
            return self.txn_abandon(i, p);
        }
        let now = self.local(i);
        let c = self.txn.coordinators[i].get_mut(&p).expect("writing");
        if let Some(m) = c.machine.as_mut() {
            m.start_timers(now);
        }
        if let Some(job) = c.job.as_mut() {
            job.stage = Stage::Ready;
        }
        self.txn_advance(i, p);
    }

    /// Drops node `i`'s machine, job and queue for `p`, answering NOT_COORDINATOR.
    fn txn_abandon(&mut self, i: usize, p: PartitionId) {
        let Some(c) = self.txn.coordinators[i].get_mut(&p) else { return };
        c.machine = None;
        c.leading = None;
        let mut refused: Vec<(usize, u64, TxnResp)> = Vec::new();
        if let Some((cl, r)) = c.job.take().and_then(|j| j.client) {
            refused.push((cl, r, TxnResp::Init(Err(ErrorCode::NOT_COORDINATOR))));
        }
        for (cl, r, req) in std::mem::take(&mut c.queue) {
            refused.push((cl, r, req.refused(ErrorCode::NOT_COORDINATOR)));
        }
        if self.nodes[i].core.is_none() {
            return;
        }
        for (cl, r, resp) in refused {
            // The job's kind is not kept: a refusal of the wrong kind is taken as a timeout.
            self.txn_reply(i, cl, r, resp);
        }
    }

    fn txn_markers(
        &mut self,
        i: usize,
        p: PartitionId,
        producer: i64,
        epoch: i16,
        kind: MarkerKind,
        partitions: Vec<PartitionId>,
    ) {
        let me = self.nodes[i].id;
        let request = MarkerRequest {
            coordinator: me,
            coordinator_partition: p,
            correlation: 0,
            partition: p,
            producer: ProducerId(producer),
            epoch: ProducerEpoch(epoch),
            kind,
        };
        let mut waiting = BTreeMap::new();
        for q in partitions {
            self.txn.next_correlation += 1;
            waiting.insert(q, (self.txn.next_correlation, 0));
        }
        if let Some(job) = self.txn.coordinators[i].get_mut(&p).and_then(|c| c.job.as_mut()) {
            job.stage = Stage::Markers { request, waiting };
        }
        self.txn_send_markers(i, p);
    }

    /// Sends every marker of node `i`'s job on `p` not answered within the resend time.
    fn txn_send_markers(&mut self, i: usize, p: PartitionId) {
        let now = self.now;
        let Some(Job { stage: Stage::Markers { request, waiting }, .. }) =
            self.txn.coordinators[i].get_mut(&p).and_then(|c| c.job.as_mut())
        else {
            return;
        };
        if waiting.is_empty() {
            if let Some(job) = self.txn.coordinators[i].get_mut(&p).and_then(|c| c.job.as_mut()) {
                job.stage = Stage::Ready;
            }
            return self.txn_advance(i, p);
        }
        let mut due = Vec::new();
        for (q, (corr, sent)) in waiting.iter_mut() {
            if *sent == 0 || now >= *sent + MARKER_RESEND_US {
                *sent = now.max(1);
                due.push(MarkerRequest { correlation: *corr, partition: *q, ..request.clone() });
            }
        }
        let me = Peer::Node(self.nodes[i].id);
        for m in due {
            if let Some(leader) = self.leader_of(m.partition) {
                self.send(me, Peer::Node(leader), Message::TxnMarker(m));
            }
        }
    }

    /// A marker answer reached node `i`.
    pub(super) fn txn_marker_done(&mut self, i: usize, r: MarkerResult) {
        let p = r.coordinator_partition;
        let Some(Job { stage: Stage::Markers { waiting, .. }, .. }) =
            self.txn.coordinators.get_mut(i).and_then(|cs| cs.get_mut(&p)).and_then(|c| c.job.as_mut())
        else {
            return;
        };
        if waiting.get(&r.partition).is_none_or(|(corr, _)| *corr != r.correlation) {
            return; // an answer to an earlier marker
        }
        match r.result {
            // Fenced: the partition is past this transaction (a newer epoch began or ended).
            Ok(()) | Err(ProduceError::ProducerFenced) => {
                waiting.remove(&r.partition);
            }
            Err(_) => {
                if let Some(w) = waiting.get_mut(&r.partition) {
                    w.1 = w.1.min(self.now.saturating_sub(MARKER_RESEND_US * 2 / 3).max(1));
                }
                return;
            }
        }
        if waiting.is_empty() {
            if let Some(job) = self.txn.coordinators[i].get_mut(&p).and_then(|c| c.job.as_mut()) {
                job.stage = Stage::Ready;
            }
            self.txn_advance(i, p);
        }
    }

    /// Node `i`'s tick: followers stay warm; the leader resends markers, completes what it
    /// found prepared and aborts expired transactions when idle.
    pub(super) fn txn_coordinator_tick(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        self.offsets_tick(i);
        if self.nodes[i].core.is_none() {
            return;
        }
        let base = self.txn_base() + DATA_PARTITIONS;
        for p in (base..base + STATE_PARTITIONS).map(PartitionId) {
            let ready = self.txn_ready(i, p);
            if ready.is_err() {
                if let Err(reason) = self.txn_catch_up(i, p) {
                    self.txn_fail_stop(i, reason);
                    return;
                }
                let c = self.txn.coordinators[i].entry(p).or_default();
                if c.job.is_some() || !c.queue.is_empty() {
                    self.txn_abandon(i, p);
                }
                continue;
            }
            let c = &self.txn.coordinators[i][&p];
            match c.job.as_ref().map(|j| &j.stage) {
                Some(Stage::Markers { .. }) => self.txn_send_markers(i, p),
                Some(Stage::Ready) => self.txn_advance(i, p),
                Some(Stage::Writing { .. }) => {}
                None => {
                    let now = self.local(i);
                    let machine = c.machine.as_ref().expect("ready");
                    // Prepared transactions are completed on every tick, not only when this
                    // node starts leading (as the runtime's tick does): a record written by a
                    // job that was abandoned (a lease lapse) can still commit after the load
                    // looked, and nothing else would complete it (seed 212 of --transactions,
                    // once commit groups went to disk in one job and commits took a little
                    // longer).
                    let unfinished = machine.unfinished();
                    if !unfinished.is_empty() {
                        self.txn.coordinators[i].get_mut(&p).expect("ready").job = Some(Job::completing(unfinished));
                        self.txn_advance(i, p);
                        continue;
                    }
                    let Some(id) = machine.expired(now).into_iter().min() else { continue };
                    let Ok(Some(rec)) = machine.abort(&id, "transaction timeout") else { continue };
                    tracing::debug!(node = i + 1, %id, "sim: transaction timed out");
                    let steps = VecDeque::from([Step::Write(rec), Step::Complete(id)]);
                    self.txn.coordinators[i].get_mut(&p).expect("ready").job =
                        Some(Job { client: None, steps, stage: Stage::Ready });
                    self.txn_advance(i, p);
                }
            }
        }
    }

    /// The end of the run: unanswered transactions are unknown; every data partition is read
    /// read_committed from its start, and must have nothing left open; then the pipelines'
    /// committed offsets.
    pub(super) fn txn_final_read(&mut self, healed_half_us: u64) {
        for c in 0..self.txn.clients.len() {
            self.txn_finish(c, TxnOutcome::Unknown);
        }
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for op in &self.txn.history.ops {
            let kind = match op {
                TxnOp::Txn { outcome, writes, .. } => {
                    let acked = writes.iter().filter(|w| w.offset.is_some()).count();
                    format!("txn-{outcome:?}-{acked}/{}", writes.len())
                }
                TxnOp::Poll { isolation, records, .. } => format!("poll-{isolation:?}-{}", records.is_empty()),
                TxnOp::OffsetRead { offset, .. } => format!("offset-read-{}", offset.is_some()),
            };
            *kinds.entry(kind).or_default() += 1;
        }
        tracing::debug!(?kinds, "sim: transaction history");
        if self.txn.last_commit_us.is_none_or(|t| t < healed_half_us) {
            self.violation("liveness: no transaction committed in the last half of the healed phase".into());
        }
        for k in 0..DATA_PARTITIONS {
            let p = self.data_partition(k);
            let Some(leader) = self.leader_of(p) else {
                self.violation(format!("liveness: transactional {p} has no leader at the end"));
                continue;
            };
            let i = self.idx(leader);
            if let Some(r) = self.nodes[i].core.as_ref().and_then(|c| c.replica(p)) {
                if r.last_stable() < r.high_watermark() {
                    let open = r.txns().open();
                    let (lso, hw) = (r.last_stable(), r.high_watermark());
                    self.violation(format!("liveness: transactional {p} last stable offset {lso} below its high watermark {hw} at the end (open: {open:?})"));
                }
            }
            let mut from = Offset(0);
            loop {
                let now = self.now;
                match self.txn_fetch(i, p, from, Isolation::ReadCommitted) {
                    Ok((records, next)) => {
                        self.txn.history.push(TxnOp::Poll {
                            process: ProcessId(FINAL_PROCESS),
                            partition: CheckPartition(p.0),
                            isolation: Isolation::ReadCommitted,
                            from: CheckOffset(from.0),
                            next: CheckOffset(next.0),
                            records,
                            invoke_us: now,
                            complete_us: now,
                            final_read: true,
                        });
                        if next <= from {
                            break;
                        }
                        from = next;
                    }
                    Err(()) => {
                        self.violation(format!("liveness: final read of transactional {p} from {leader} failed"));
                        break;
                    }
                }
            }
        }
        self.pipeline_final_read();
    }
}
