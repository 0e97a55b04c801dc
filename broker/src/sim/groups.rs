//! The simulator's consumer group workload (`SimConfig::groups`): the real
//! [`GroupCoordinator`] over a real replicated partition of the simulated cluster, driven as
//! `cluster::groups` drives it, and simulated group members.
//!
//! One extra partition of the cluster is the offsets partition. Every node keeps a
//! coordinator for it, as the runtime does: every replica, leader or follower, applies the
//! partition's committed records (below its high watermark, through `core::machine::feed`)
//! at its tick, so a new leader is warm; a node that leads at a new epoch (and whose high
//! watermark reached the epoch's start) starts every member's session and serves. Requests
//! run one at a time (a bounded queue behind the one in flight); a request's records are
//! appended as one batch with `acks=all` through `BrokerNode::handle_produce` and, once the
//! produce is acknowledged, applied from the log like everything else before the answer; a
//! failed append drops the machine (rebuilt from the log) and answers NOT_COORDINATOR.
//! Expiry and refresh run from the leader's tick when the machine is idle. Every
//! [`GROUP_SNAPSHOT_RECORDS`] records a node snapshots its machine (kept across crashes) and an
//! empty slot starts from that snapshot, as the runtime's does from its file.
//!
//! Members (two static, two dynamic) of one group consume a fake topic of
//! [`TOPIC_PARTITIONS`] partitions, which grows to [`TOPIC_PARTITIONS_GROWN`] at
//! [`GROW_AT_US`] (the coordinator's `refresh` must give the new ones out): they join,
//! heartbeat with what they own, reconcile (commit a revoked partition, then acknowledge it),
//! fetch the committed offset of a partition they gain, consume (their position grows) and
//! commit. During the fault phase
//! they sometimes leave, crash (and rejoin later, static members with their instance id) or
//! pause for longer than their session; a paused member resumes as a zombie that first
//! commits its stale positions with its old id and epoch. Coordinator failover comes from
//! the cluster's own faults on the offsets partition's leader.
//!
//! What members are told and acknowledged goes to a [`GroupHistory`] judged by
//! [`crate::check::groups`]; after every change of a coordinator's state its `owners()` must
//! list at most one owner per partition (invariant `group-exclusive-ownership`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use skein_client::wire::{
    ErrorCode, GroupHeartbeatRequest, GroupHeartbeatResponse, OffsetCommitPartition, OffsetCommitPartitionResponse,
    OffsetCommitRequest, OffsetFetchPartition, TopicPartition, JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH,
};
use skein_log::batch::{BatchBuilder, RecordBatch};

use super::{Event, Sim, CLIENT_TIMEOUT_MS, PRODUCE_DEADLINE_MS};
use crate::check::groups::{CommitOutcome, GroupHistory, GroupOp};
use crate::check::{PartitionId as CheckPartition, ProcessId};
use crate::core::group::{GroupCoordinator, GroupRecord, LogMachine};
use crate::core::machine::feed;
use crate::core::{Acks, LeaderEpoch, NodeId, Offset, PartitionId, ProduceError, ReadFailure, RequestId};

/// The group's id.
pub(super) const GROUP: &str = "sim-group";
/// The topic its members subscribe to (not a partition of the cluster: only its size matters).
pub(super) const TOPIC: &str = "events";
/// Partitions of [`TOPIC`].
pub(super) const TOPIC_PARTITIONS: u32 = 6;
/// Partitions of [`TOPIC`] from [`GROW_AT_US`] on: partitions added under a live group.
pub(super) const TOPIC_PARTITIONS_GROWN: u32 = 8;
/// When [`TOPIC`] grows (virtual time, during the fault phase).
pub(super) const GROW_AT_US: u64 = 2_500_000;
/// Members of the group (the first `STATIC_MEMBERS` static).
pub(super) const MEMBERS: usize = 4;
const STATIC_MEMBERS: usize = 2;
const HEARTBEAT_INTERVAL_MS: u32 = 100;
/// A node snapshots its group state every this many offsets-partition records (the
/// runtime's default is 1,000; small here so seeds write, and restart from, many).
const GROUP_SNAPSHOT_RECORDS: u64 = 20;
/// The smallest session the coordinator accepts: pauses longer than it make zombies.
const SESSION_TIMEOUT_MS: u32 = 1_000;
/// Requests waiting behind the one in flight on a coordinator; more are refused (retriable).
const COORDINATOR_QUEUE_MAX: usize = 8;
/// Process ids of members in the group history (final reads use `FINAL_PROCESS`).
const MEMBER_PROCESS_BASE: u32 = 2_000;
const FINAL_PROCESS: u32 = 2_999;

/// The topics' sizes at virtual time `now_us`, as the coordinator's topology.
fn sizes_at(now_us: u64) -> impl Fn(&str) -> Option<u32> {
    move |topic| {
        (topic == TOPIC).then_some(if now_us >= GROW_AT_US { TOPIC_PARTITIONS_GROWN } else { TOPIC_PARTITIONS })
    }
}

/// A group request over the simulated network.
#[derive(Debug)]
pub(super) enum GroupReq {
    Heartbeat(GroupHeartbeatRequest),
    Commit(OffsetCommitRequest),
    Fetch(Vec<TopicPartition>),
}

/// Its answer (`Err`: the whole request refused with this code).
#[derive(Debug)]
pub(super) enum GroupResp {
    Heartbeat(Result<GroupHeartbeatResponse, ErrorCode>),
    Commit(Result<Vec<OffsetCommitPartitionResponse>, ErrorCode>),
    Fetch(Result<Vec<OffsetFetchPartition>, ErrorCode>),
}

/// A node's coordinator of the offsets partition.
#[derive(Default)]
pub(super) struct NodeCoordinator {
    /// The group state this replica applied from the committed log (leader or follower).
    machine: Option<GroupCoordinator>,
    /// The leader epoch it coordinates at, sessions started (`None`: not leading).
    leading: Option<LeaderEpoch>,
    /// The append in flight.
    write: Option<Write>,
    /// Requests waiting for it: (member, member request, request).
    queue: VecDeque<(usize, u64, GroupReq)>,
    /// Records applied since the last snapshot.
    since_snapshot: u64,
}

struct Write {
    /// The core's produce request id.
    request: u64,
    records: Vec<GroupRecord>,
    /// The answer to send once the records are committed: (member, member request, answer).
    reply: Option<(usize, u64, GroupResp)>,
}

/// A member's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Running,
    /// Stopped (SIGSTOP): its state and sockets wait.
    Paused {
        until: u64,
    },
    /// Crashed or left: it starts over (a new process) at `until`.
    Down {
        until: u64,
    },
}

#[derive(Debug)]
enum PendingKind {
    Heartbeat { leaving: bool },
    Commit { epoch: i32, offsets: Vec<(u32, u64)> },
    Fetch,
}

#[derive(Debug)]
struct Pending {
    request: u64,
    invoked: u64,
    kind: PendingKind,
}

/// A simulated group member (one client process at a time).
pub(super) struct Member {
    process: ProcessId,
    instance_id: String,
    client_id: String,
    member_id: String,
    epoch: i32,
    joined: bool,
    /// Owned partitions and the member's position in each (`None`: fetch the committed offset
    /// first).
    owned: BTreeMap<u32, Option<u64>>,
    /// Owned partitions the coordinator asked back: commit them, then acknowledge.
    revoking: BTreeSet<u32>,
    coordinator: Option<NodeId>,
    pending: Option<Pending>,
    next_heartbeat: u64,
    next_commit: u64,
    life: Life,
    /// Resumed from a pause: commits its (stale) positions before anything else.
    zombie: bool,
}

impl Member {
    fn new(k: usize) -> Member {
        Member {
            process: ProcessId(MEMBER_PROCESS_BASE + k as u32),
            instance_id: if k < STATIC_MEMBERS { format!("static-{k}") } else { String::new() },
            client_id: format!("m{k}"),
            member_id: String::new(),
            epoch: JOIN_EPOCH,
            joined: false,
            owned: BTreeMap::new(),
            revoking: BTreeSet::new(),
            coordinator: None,
            pending: None,
            next_heartbeat: 0,
            next_commit: 0,
            life: Life::Running,
            zombie: false,
        }
    }

    /// The owner identity the checks use: the instance id of a static member.
    fn identity(&self) -> String {
        if self.instance_id.is_empty() {
            self.member_id.clone()
        } else {
            self.instance_id.clone()
        }
    }

    /// A new process: nothing owned, nothing known but its instance id.
    fn start_over(&mut self) {
        self.member_id.clear();
        self.lose_membership();
        self.pending = None;
        self.zombie = false;
        self.life = Life::Running;
    }

    /// Fenced or unknown to the coordinator: everything owned is lost; join again.
    fn lose_membership(&mut self) {
        self.epoch = JOIN_EPOCH;
        self.joined = false;
        self.owned.clear();
        self.revoking.clear();
    }
}

/// The group workload's state in the simulator.
#[derive(Default)]
pub(super) struct GroupSim {
    pub(super) members: Vec<Member>,
    pub(super) history: GroupHistory,
    /// When a commit was last acknowledged (for the liveness check).
    pub(super) last_commit_ack: Option<u64>,
}

impl GroupSim {
    pub(super) fn new() -> GroupSim {
        GroupSim { members: (0..MEMBERS).map(Member::new).collect(), ..GroupSim::default() }
    }
}

impl Sim {
    /// The offsets partition (the one after the data partitions).
    pub(super) fn offsets_partition(&self) -> PartitionId {
        PartitionId(self.cfg.partitions)
    }

    /// A member's tick: timeouts, faults, then at most one request.
    pub(super) fn member_tick(&mut self, g: usize) {
        let now = self.now;
        if !self.member_awake(g) {
            return;
        }
        for pos in self.group.members[g].owned.values_mut().flatten() {
            *pos += self.rng.range(0, 8);
        }
        if let Some(p) = &self.group.members[g].pending {
            if now.saturating_sub(p.invoked) / 1000 < CLIENT_TIMEOUT_MS {
                return;
            }
            let p = self.group.members[g].pending.take().expect("checked above");
            self.record_commits(g, &p, |_| CommitOutcome::Unknown);
            self.group.members[g].coordinator = None;
        }
        if self.faults_on && self.group.members[g].joined && self.member_fault(g) {
            return;
        }
        if self.group.members[g].coordinator.is_none() {
            self.group.members[g].coordinator =
                self.view().and_then(|v| v.partition(self.offsets_partition())).and_then(|s| s.leader);
        }
        if self.group.members[g].coordinator.is_none() {
            return;
        }
        self.member_next_request(g);
    }

    /// Whether the member runs now (a pause that ended makes it a zombie).
    fn member_awake(&mut self, g: usize) -> bool {
        let now = self.now;
        let m = &mut self.group.members[g];
        match m.life {
            Life::Running => true,
            Life::Paused { until } if now >= until => {
                m.life = Life::Running;
                m.zombie = m.joined && m.owned.values().any(Option::is_some);
                true
            }
            Life::Down { until } if now >= until => {
                m.start_over();
                true
            }
            Life::Paused { .. } | Life::Down { .. } => false,
        }
    }

    /// Maybe crash, pause or leave; true if the member does nothing more this tick.
    fn member_fault(&mut self, g: usize) -> bool {
        let now = self.now;
        if self.rng.chance(1) {
            tracing::debug!(member = g, at_ms = now / 1000, "sim: group member crashes");
            let until = now + self.rng.range(200_000, 2_000_000);
            let m = &mut self.group.members[g];
            m.pending = None;
            m.life = Life::Down { until };
            return true;
        }
        if self.rng.chance(2) {
            // Longer than the session: the coordinator expires it and moves its partitions.
            tracing::debug!(member = g, at_ms = now / 1000, "sim: group member pauses");
            let until = now + self.rng.range(1_500_000, 3_000_000);
            self.group.members[g].life = Life::Paused { until };
            return true;
        }
        if self.group.members[g].pending.is_none() && self.rng.chance(1) {
            tracing::debug!(member = g, at_ms = now / 1000, "sim: group member leaves");
            let m = &self.group.members[g];
            let epoch = if m.instance_id.is_empty() { LEAVE_EPOCH } else { STATIC_LEAVE_EPOCH };
            let req = self.heartbeat_request(g, epoch);
            self.group_send(g, GroupReq::Heartbeat(req), PendingKind::Heartbeat { leaving: true });
            return true;
        }
        false
    }

    /// The member's next request, in priority order.
    fn member_next_request(&mut self, g: usize) {
        let now = self.now;
        let m = &self.group.members[g];
        if !m.joined {
            let req = self.heartbeat_request(g, JOIN_EPOCH);
            self.group_send(g, GroupReq::Heartbeat(req), PendingKind::Heartbeat { leaving: false });
            return;
        }
        if m.zombie {
            // Its stale positions, with its old id and epoch: correct fencing refuses them.
            let offsets: Vec<(u32, u64)> = m.owned.iter().filter_map(|(&p, &pos)| Some((p, pos?))).collect();
            self.group.members[g].zombie = false;
            if !offsets.is_empty() {
                self.commit(g, offsets);
                return;
            }
        }
        let m = &self.group.members[g];
        if !m.revoking.is_empty() {
            // Commit what is revoked, then give it up and say so at once.
            let offsets: Vec<(u32, u64)> =
                m.revoking.iter().filter_map(|p| Some((*p, m.owned.get(p).copied().flatten()?))).collect();
            let m = &mut self.group.members[g];
            for p in std::mem::take(&mut m.revoking) {
                m.owned.remove(&p);
            }
            m.next_heartbeat = now;
            if !offsets.is_empty() {
                self.commit(g, offsets);
                return;
            }
        }
        let m = &self.group.members[g];
        let unknown: Vec<TopicPartition> = m
            .owned
            .iter()
            .filter(|(_, pos)| pos.is_none())
            .map(|(&p, _)| TopicPartition { topic: TOPIC.into(), partition: p })
            .collect();
        if !unknown.is_empty() {
            self.group_send(g, GroupReq::Fetch(unknown), PendingKind::Fetch);
        } else if now >= m.next_heartbeat {
            let req = self.heartbeat_request(g, m.epoch);
            self.group_send(g, GroupReq::Heartbeat(req), PendingKind::Heartbeat { leaving: false });
        } else if now >= m.next_commit && !self.draining {
            let offsets: Vec<(u32, u64)> = m.owned.iter().filter_map(|(&p, &pos)| Some((p, pos?))).collect();
            self.group.members[g].next_commit = now + self.rng.range(30_000, 80_000);
            if !offsets.is_empty() {
                self.commit(g, offsets);
            }
        }
    }

    fn heartbeat_request(&self, g: usize, epoch: i32) -> GroupHeartbeatRequest {
        let m = &self.group.members[g];
        GroupHeartbeatRequest {
            group: GROUP.into(),
            member_id: m.member_id.clone(),
            member_epoch: epoch,
            instance_id: m.instance_id.clone(),
            client_id: m.client_id.clone(),
            host: String::new(),
            rack: String::new(),
            session_timeout_ms: SESSION_TIMEOUT_MS,
            assignor: String::new(),
            topics: Some(vec![TOPIC.into()]),
            owned: (epoch != JOIN_EPOCH)
                .then(|| m.owned.keys().map(|&p| TopicPartition { topic: TOPIC.into(), partition: p }).collect()),
        }
    }

    fn commit(&mut self, g: usize, offsets: Vec<(u32, u64)>) {
        let m = &self.group.members[g];
        let req = OffsetCommitRequest {
            group: GROUP.into(),
            member_id: m.member_id.clone(),
            member_epoch: m.epoch,
            offsets: offsets
                .iter()
                .map(|&(p, offset)| OffsetCommitPartition {
                    topic: TOPIC.into(),
                    partition: p,
                    offset,
                    metadata: String::new(),
                })
                .collect(),
        };
        let epoch = m.epoch;
        self.group_send(g, GroupReq::Commit(req), PendingKind::Commit { epoch, offsets });
    }

    fn group_send(&mut self, g: usize, req: GroupReq, kind: PendingKind) {
        let request = self.next_request;
        self.next_request += 1;
        self.group.members[g].pending = Some(Pending { request, invoked: self.now, kind });
        let Some(to) = self.group.members[g].coordinator else { return };
        if self.client_cut.contains(&to) {
            return; // lost; the member times out
        }
        let delay = self.rng.range(100, 1_500);
        self.schedule(delay, Event::GroupRequest { member: g, request, to, req });
    }

    /// Records a commit's per-partition outcomes.
    fn record_commits(&mut self, g: usize, p: &Pending, outcome: impl Fn(u32) -> CommitOutcome) {
        let PendingKind::Commit { epoch, offsets } = &p.kind else { return };
        let m = &self.group.members[g];
        let (process, member) = (m.process, m.identity());
        for &(partition, offset) in offsets {
            let outcome = outcome(partition);
            if outcome == CommitOutcome::Ok {
                self.group.last_commit_ack = Some(self.now);
            }
            self.group.history.push(GroupOp::Commit {
                process,
                member: member.clone(),
                epoch: *epoch,
                partition: CheckPartition(partition),
                offset,
                invoke_us: p.invoked,
                complete_us: self.now,
                outcome,
            });
        }
    }

    /// An answer reaches a member.
    pub(super) fn member_response(&mut self, g: usize, request: u64, resp: GroupResp) {
        if let Life::Paused { until } = self.group.members[g].life {
            if self.now < until {
                // A stopped process reads its socket when it resumes.
                self.schedule(until - self.now, Event::GroupResponse { member: g, request, resp });
                return;
            }
        }
        if !self.member_awake(g) {
            return; // the process is gone
        }
        let m = &mut self.group.members[g];
        if m.pending.as_ref().is_none_or(|p| p.request != request) {
            return; // a late answer to a request that timed out
        }
        let pending = m.pending.take().expect("checked above");
        match resp {
            GroupResp::Heartbeat(r) => self.heartbeat_answer(g, &pending, r),
            GroupResp::Commit(r) => self.commit_answer(g, &pending, r),
            GroupResp::Fetch(r) => self.fetch_answer(g, &pending, r),
        }
    }

    fn heartbeat_answer(&mut self, g: usize, p: &Pending, r: Result<GroupHeartbeatResponse, ErrorCode>) {
        let now = self.now;
        let leaving = matches!(p.kind, PendingKind::Heartbeat { leaving: true });
        let resp = match r {
            Ok(resp) => resp,
            Err(ErrorCode::UNKNOWN_MEMBER_ID | ErrorCode::FENCED_MEMBER_EPOCH) if leaving => {
                self.member_down(g, 100_000, 1_000_000);
                return;
            }
            Err(code) => {
                let m = &mut self.group.members[g];
                match code {
                    ErrorCode::UNKNOWN_MEMBER_ID => {
                        m.member_id.clear();
                        m.lose_membership();
                    }
                    ErrorCode::FENCED_MEMBER_EPOCH => m.lose_membership(),
                    _ => m.coordinator = None,
                }
                return;
            }
        };
        if leaving {
            self.member_down(g, 100_000, 1_000_000);
            return;
        }
        let m = &mut self.group.members[g];
        m.member_id = resp.member_id;
        m.epoch = resp.member_epoch;
        m.joined = true;
        m.next_heartbeat = now + u64::from(resp.heartbeat_interval_ms.max(10)) * 1000;
        let assigned: BTreeSet<u32> =
            resp.assignment.iter().filter(|tp| tp.topic == TOPIC).map(|tp| tp.partition).collect();
        let gone: Vec<u32> = m.owned.keys().filter(|p| !assigned.contains(*p)).copied().collect();
        m.revoking.extend(gone);
        for &p in &assigned {
            m.owned.entry(p).or_insert(None);
        }
        let op = GroupOp::Assignment {
            process: m.process,
            member: m.identity(),
            epoch: m.epoch,
            partitions: assigned.iter().map(|&p| CheckPartition(p)).collect(),
            complete_us: now,
        };
        self.group.history.push(op);
    }

    fn member_down(&mut self, g: usize, lo: u64, hi: u64) {
        let until = self.now + self.rng.range(lo, hi);
        self.group.members[g].life = Life::Down { until };
    }

    fn commit_answer(&mut self, g: usize, p: &Pending, r: Result<Vec<OffsetCommitPartitionResponse>, ErrorCode>) {
        match r {
            Ok(parts) => {
                let code = |q: u32| parts.iter().find(|x| x.partition == q).map_or(ErrorCode::UNKNOWN, |x| x.error);
                self.record_commits(g, p, |q| match code(q) {
                    ErrorCode::NONE => CommitOutcome::Ok,
                    _ => CommitOutcome::Failed,
                });
                let m = &mut self.group.members[g];
                for x in parts.iter().filter(|x| x.error == ErrorCode::PARTITION_NOT_OWNED) {
                    m.owned.remove(&x.partition);
                }
            }
            Err(code @ (ErrorCode::UNKNOWN_MEMBER_ID | ErrorCode::FENCED_MEMBER_EPOCH)) => {
                self.record_commits(g, p, |_| CommitOutcome::Failed);
                let m = &mut self.group.members[g];
                if code == ErrorCode::UNKNOWN_MEMBER_ID {
                    m.member_id.clear();
                }
                m.lose_membership();
            }
            Err(_) => {
                // Refused before or after the append: the records may commit.
                self.record_commits(g, p, |_| CommitOutcome::Unknown);
                self.group.members[g].coordinator = None;
            }
        }
    }

    fn fetch_answer(&mut self, g: usize, p: &Pending, r: Result<Vec<OffsetFetchPartition>, ErrorCode>) {
        let Ok(found) = r else {
            self.group.members[g].coordinator = None;
            return;
        };
        let process = self.group.members[g].process;
        for f in found.iter().filter(|f| f.topic == TOPIC) {
            let offset = u64::try_from(f.offset).ok();
            self.group.history.push(GroupOp::Read {
                process,
                partition: CheckPartition(f.partition),
                offset,
                invoke_us: p.invoked,
                complete_us: self.now,
                final_read: false,
            });
            if let Some(pos) = self.group.members[g].owned.get_mut(&f.partition) {
                if pos.is_none() {
                    *pos = Some(offset.unwrap_or(0));
                }
            }
        }
    }

    /// A group request reaches node `to`.
    pub(super) fn serve_group(&mut self, member: usize, request: u64, to: NodeId, req: GroupReq) {
        let i = self.idx(to);
        if self.nodes[i].core.is_none() {
            // The process is gone: its port refuses the connection at once.
            self.group_reply(i, member, request, refusal(&req, ErrorCode::NOT_COORDINATOR));
            return;
        }
        let c = &mut self.nodes[i].coordinator;
        if c.write.is_some() {
            if c.queue.len() < COORDINATOR_QUEUE_MAX {
                c.queue.push_back((member, request, req));
            } else {
                self.group_reply(i, member, request, refusal(&req, ErrorCode::COORDINATOR_LOAD_IN_PROGRESS));
            }
            return;
        }
        self.group_run(i, member, request, req);
    }

    /// Runs one request on node `i`'s coordinator (none in flight).
    fn group_run(&mut self, i: usize, member: usize, request: u64, req: GroupReq) {
        let epoch = match self.coordinator_ready(i) {
            Ok(e) => e,
            Err(code) => {
                self.group_reply(i, member, request, refusal(&req, code));
                return;
            }
        };
        let now = self.local(i);
        let plant = self.cfg.plant;
        let sizes = sizes_at(self.now);
        let machine = self.nodes[i].coordinator.machine.as_mut().expect("ready");
        let (records, resp) = match req {
            GroupReq::Heartbeat(r) => match machine.heartbeat(now, &r, &sizes) {
                Ok(out) => (out.records, GroupResp::Heartbeat(Ok(out.reply))),
                Err((code, _)) => (Vec::new(), GroupResp::Heartbeat(Err(code))),
            },
            GroupReq::Commit(r) => match machine.commit_planted(&r, plant) {
                Ok(out) => (out.records, GroupResp::Commit(Ok(out.reply))),
                Err((code, _)) => (Vec::new(), GroupResp::Commit(Err(code))),
            },
            GroupReq::Fetch(parts) => (Vec::new(), GroupResp::Fetch(Ok(machine.fetch_offsets(GROUP, Some(&parts))))),
        };
        self.group_write(i, epoch, records, Some((member, request, resp)));
    }

    /// Appends `records` (acks=all) and answers once they commit; answers at once if none.
    fn group_write(
        &mut self,
        i: usize,
        epoch: LeaderEpoch,
        records: Vec<GroupRecord>,
        reply: Option<(usize, u64, GroupResp)>,
    ) {
        if records.is_empty() {
            if let Some((member, request, resp)) = reply {
                self.group_reply(i, member, request, resp);
            }
            return;
        }
        let now = self.local(i);
        let mut b = BatchBuilder::new();
        for r in &records {
            let (key, value) = r.encode();
            b.push(Some(&key), &value, &[], now.timestamp());
        }
        let Ok(batch) = RecordBatch::parse(b.build().into_bytes()) else { unreachable!("a built batch parses") };
        let id = self.next_request;
        self.next_request += 1;
        self.nodes[i].coordinator.write = Some(Write { request: id, records, reply });
        let partition = self.offsets_partition();
        let deadline = now.plus_ms(PRODUCE_DEADLINE_MS);
        let mut out = Vec::new();
        let core = self.nodes[i].core.as_mut().expect("a coordinator runs on a live node");
        core.handle_produce(now, RequestId(id), partition, Some(epoch), batch, Acks::All, deadline, &mut out);
        self.execute(i, out);
    }

    /// Whether `request` is node `i`'s group append.
    pub(super) fn is_group_write(&self, i: usize, request: RequestId) -> bool {
        self.nodes[i].coordinator.write.as_ref().is_some_and(|w| w.request == request.0)
    }

    /// The group append of node `i` finished: apply and answer, or drop the machine.
    pub(super) fn group_written(&mut self, i: usize, result: Result<Offset, ProduceError>) {
        let Some(w) = self.nodes[i].coordinator.write.take() else { return };
        // Acknowledged: the records are committed; apply them from the log, as every replica.
        let end = result.ok().map(|base| Offset(base.0 + w.records.len() as u64));
        let applied = match end {
            Some(end) => match self.catch_up(i) {
                Ok(()) => self.nodes[i].coordinator.machine.as_ref().is_some_and(|m| m.applied() >= end),
                Err(reason) => {
                    self.fail_stop(i, reason);
                    false
                }
            },
            None => false,
        };
        if applied {
            self.check_owners(i);
            if let Some((member, request, resp)) = w.reply {
                self.group_reply(i, member, request, resp);
            }
        } else {
            // Whether the records will commit is unknown: rebuild from the log. (A node that
            // stopped answers nothing: its members time out.)
            self.nodes[i].coordinator.machine = None;
            self.nodes[i].coordinator.leading = None;
            if let Some((member, request, resp)) = w.reply.filter(|_| self.nodes[i].core.is_some()) {
                let refused = match resp {
                    GroupResp::Heartbeat(_) => GroupResp::Heartbeat(Err(ErrorCode::NOT_COORDINATOR)),
                    GroupResp::Commit(_) => GroupResp::Commit(Err(ErrorCode::NOT_COORDINATOR)),
                    GroupResp::Fetch(_) => GroupResp::Fetch(Err(ErrorCode::NOT_COORDINATOR)),
                };
                self.group_reply(i, member, request, refused);
            }
        }
        while self.nodes[i].coordinator.write.is_none() && self.nodes[i].core.is_some() {
            let Some((member, request, req)) = self.nodes[i].coordinator.queue.pop_front() else { break };
            self.group_run(i, member, request, req);
        }
    }

    /// Node `i`'s tick: load the coordinator when it leads at a new epoch, then expire
    /// sessions and follow topic sizes when idle.
    pub(super) fn coordinator_tick(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        let c = &self.nodes[i].coordinator;
        if c.write.is_some() || !c.queue.is_empty() {
            return;
        }
        let Ok(epoch) = self.coordinator_ready(i) else {
            // Not leading: a follower applies what is committed, to be warm when it leads.
            if let Err(reason) = self.catch_up(i) {
                self.fail_stop(i, reason);
            }
            return;
        };
        let now = self.local(i);
        let sizes = sizes_at(self.now);
        let machine = self.nodes[i].coordinator.machine.as_ref().expect("ready");
        let mut records = machine.expire(now, &sizes);
        if records.is_empty() {
            records = machine.refresh(&sizes);
        }
        if !records.is_empty() {
            tracing::debug!(node = i + 1, expired = ?machine.expired(now), "sim: group expiry");
            self.group_write(i, epoch, records, None);
        }
    }

    /// The epoch node `i` leads the offsets partition at, with a valid lease, its machine
    /// loaded for it; or the code refusing group requests.
    fn coordinator_ready(&mut self, i: usize) -> Result<LeaderEpoch, ErrorCode> {
        let now = self.local(i);
        let p = self.offsets_partition();
        // A leader with a valid lease whose high watermark reached its epoch's start.
        let epoch = match self.nodes[i].core.as_ref().map(|core| core.coordinating(now, p)) {
            Some(Ok(epoch)) => epoch,
            None | Some(Err(ProduceError::NotLeader)) => {
                self.nodes[i].coordinator.leading = None;
                return Err(ErrorCode::NOT_COORDINATOR);
            }
            Some(Err(_)) => return Err(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS),
        };
        if let Err(reason) = self.catch_up(i) {
            self.fail_stop(i, reason);
            return Err(ErrorCode::NOT_COORDINATOR);
        }
        let c = &mut self.nodes[i].coordinator;
        if c.leading != Some(epoch) {
            let machine = c.machine.as_mut().expect("caught up");
            machine.start_sessions(now);
            tracing::debug!(node = i + 1, epoch = epoch.0, applied = machine.applied().0, "sim: coordinating");
            c.leading = Some(epoch);
            self.check_owners(i);
        }
        Ok(epoch)
    }

    /// As the runtime: the log's state is unknown, the node stops (and restarts later).
    fn fail_stop(&mut self, i: usize, reason: String) {
        tracing::debug!(node = i + 1, %reason, "fail-stop applying group records");
        self.crash(i);
        let back = self.rng.range(100_000, 1_000_000);
        let id = self.nodes[i].id;
        self.schedule(back, Event::Restart(id));
    }

    /// Applies to node `i`'s machine the offsets partition's records below its replica's
    /// high watermark (a new machine when it has none, or when the log now starts after it).
    fn catch_up(&mut self, i: usize) -> Result<(), String> {
        let p = self.offsets_partition();
        let n = &mut self.nodes[i];
        let Some(core) = n.core.as_ref() else { return Ok(()) };
        let Some(replica) = core.replica(p) else {
            n.coordinator.machine = None;
            return Ok(());
        };
        let log = replica.log();
        let c = &mut n.coordinator;
        if c.machine.as_ref().is_some_and(|m| m.applied() < log.log_start_offset()) {
            c.machine = None;
            c.leading = None;
        }
        // As the runtime does (`cluster::groups::restore`): an empty slot starts from this
        // node's snapshot, unless it is past the log's end or before its start.
        let mut restored = false;
        if c.machine.is_none() {
            if let Some(bytes) = &n.group_snapshot {
                let m = GroupCoordinator::restore(bytes, HEARTBEAT_INTERVAL_MS)
                    .map_err(|e| format!("the group snapshot does not restore: {e}"))?;
                if m.applied() <= log.log_end_offset() && m.applied() >= log.log_start_offset() {
                    c.machine = Some(m);
                    restored = true;
                }
            }
        }
        let machine = c.machine.get_or_insert_with(|| GroupCoordinator::new(HEARTBEAT_INTERVAL_MS));
        let read = crate::core::machine::catch_up(replica, machine)
            .map_err(|e| format!("reading the offsets partition: {e}"))?;
        c.since_snapshot += read;
        if c.since_snapshot >= GROUP_SNAPSHOT_RECORDS {
            c.since_snapshot = 0;
            n.group_snapshot = Some(machine.snapshot());
        }
        if restored && !n.lied {
            // Restore equivalence: the snapshot plus the tail is the state the whole log makes.
            let (from_snapshot, applied) = (machine.snapshot(), machine.applied());
            if let Ok(scratch) = self.load(i) {
                if scratch.applied() == applied && scratch.snapshot() != from_snapshot {
                    self.violation(format!(
                        "group-snapshot-divergence: node {i}'s group state restored from its snapshot and caught \
                         up to {applied} differs from the state its log makes"
                    ));
                }
            }
        }
        Ok(())
    }

    /// A coordinator rebuilt from the committed records node `i` serves (`Err(Some)`: the
    /// storage failed; `Err(None)`: not ready or not the leader).
    fn load(&self, i: usize) -> Result<GroupCoordinator, Option<String>> {
        let now = self.local(i);
        let p = self.offsets_partition();
        let core = self.nodes[i].core.as_ref().ok_or(None)?;
        let replica = core.replica(p).ok_or(None)?;
        let mut machine = GroupCoordinator::new(HEARTBEAT_INTERVAL_MS);
        let mut from = replica.log().log_start_offset();
        loop {
            let (bytes, hw) = match core.read_committed(now, p, from, 1 << 20) {
                Ok(x) => x,
                Err(ReadFailure::Storage(e)) => return Err(Some(e.to_string())),
                Err(_) => return Err(None),
            };
            if from >= hw {
                return Ok(machine);
            }
            let before = from;
            from = feed(&mut machine, &bytes, from).map_err(|e| Some(e.to_string()))?.next;
            let progressed = from > before;
            if !progressed {
                return Ok(machine);
            }
        }
    }

    /// Invariant: a coordinator never lists two owners of one partition.
    fn check_owners(&mut self, i: usize) {
        let (Some(epoch), Some(machine)) = (self.nodes[i].coordinator.leading, &self.nodes[i].coordinator.machine)
        else {
            return;
        };
        let twice: Vec<String> = machine
            .owners()
            .into_iter()
            .filter(|(_, owners)| owners.len() > 1)
            .map(|((group, (topic, p)), owners)| format!("{group} {topic}/{p} owned by {owners:?}"))
            .collect();
        let id = self.nodes[i].id;
        let epoch = epoch.0;
        for t in twice {
            self.violation(format!("group-exclusive-ownership: coordinator on {id} (epoch {epoch}): {t}"));
        }
    }

    fn group_reply(&mut self, i: usize, member: usize, request: u64, resp: GroupResp) {
        let from = self.nodes[i].id;
        if self.client_cut.contains(&from) {
            return;
        }
        let delay = self.rng.range(100, 1_500);
        self.schedule(delay, Event::GroupResponse { member, request, resp });
    }

    /// The end of the run: commits still unanswered are unknown; the committed offsets are
    /// read from a coordinator rebuilt from the offsets partition's leader (as a failover
    /// would); the group must have acknowledged a commit in the last half of the healed phase.
    pub(super) fn group_final_read(&mut self, healed_half_us: u64) {
        for g in 0..self.group.members.len() {
            if let Some(p) = self.group.members[g].pending.take() {
                self.record_commits(g, &p, |_| CommitOutcome::Unknown);
            }
        }
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for op in &self.group.history.ops {
            let kind = match op {
                GroupOp::Assignment { .. } => "assignment",
                GroupOp::Commit { outcome: CommitOutcome::Ok, .. } => "commit-ok",
                GroupOp::Commit { outcome: CommitOutcome::Failed, .. } => "commit-failed",
                GroupOp::Commit { outcome: CommitOutcome::Unknown, .. } => "commit-unknown",
                GroupOp::Read { .. } => "read",
                GroupOp::Reset { .. } => "reset",
            };
            *kinds.entry(kind).or_default() += 1;
        }
        tracing::debug!(?kinds, "sim: group history");
        if self.group.last_commit_ack.is_none_or(|t| t < healed_half_us) {
            self.violation("liveness: the group acknowledged no commit in the last half of the healed phase".into());
        }
        let p = self.offsets_partition();
        let Some(leader) = self.view().and_then(|v| v.partition(p)).and_then(|s| s.leader) else {
            self.violation(format!("liveness: the offsets partition {p} has no leader at the end"));
            return;
        };
        let machine = match self.load(self.idx(leader)) {
            Ok(m) => m,
            Err(e) => {
                self.violation(format!("liveness: the offsets partition {p} does not load from {leader}: {e:?}"));
                return;
            }
        };
        let all: Vec<TopicPartition> =
            (0..TOPIC_PARTITIONS_GROWN).map(|q| TopicPartition { topic: TOPIC.into(), partition: q }).collect();
        let fetched = machine.fetch_offsets(GROUP, Some(&all));
        if self.now >= GROW_AT_US + 1_000_000 {
            // The partitions added under the live group were given out and consumed.
            let unowned: Vec<u32> = fetched
                .iter()
                .filter(|f| f.partition >= TOPIC_PARTITIONS && f.offset < 0)
                .map(|f| f.partition)
                .collect();
            if !unowned.is_empty() {
                self.violation(format!(
                    "liveness: partitions {unowned:?} added to {TOPIC} under the group have no committed offset at the \
                     end"
                ));
            }
        }
        for f in fetched {
            self.group.history.push(GroupOp::Read {
                process: ProcessId(FINAL_PROCESS),
                partition: CheckPartition(f.partition),
                offset: u64::try_from(f.offset).ok(),
                invoke_us: self.now,
                complete_us: self.now,
                final_read: true,
            });
        }
    }
}

/// The answer to `req` carrying only an error.
fn refusal(req: &GroupReq, code: ErrorCode) -> GroupResp {
    match req {
        GroupReq::Heartbeat(_) => GroupResp::Heartbeat(Err(code)),
        GroupReq::Commit(_) => GroupResp::Commit(Err(code)),
        GroupReq::Fetch(_) => GroupResp::Fetch(Err(code)),
    }
}
