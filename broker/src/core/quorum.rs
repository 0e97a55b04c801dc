//! The controller quorum: the [`Controller`] state machine replicated with Raft (raft-rs, the
//! TiKV implementation, driven sans-IO through `RawNode`: step, tick, ready, advance).
//!
//! What is replicated are the controller's *inputs*, not its decisions: the Raft leader (the
//! active controller) proposes every broker heartbeat and ISR change it receives, and a clock
//! tick every `tick_interval_ms`, each stamped with its own clock; every voter applies the
//! committed inputs in log order to its own `Controller`, which is deterministic, so all voters
//! hold the same metadata (leaders, epochs, ISRs, broker liveness). Only the active controller
//! sends the outputs (partition states, heartbeat responses that grant leases), and only after
//! the input that caused them is committed: a deposed controller can grant no lease and elect
//! no leader, because it can commit nothing. A new active controller first commits a
//! `NewLeader` input that restarts every live broker's session (its predecessor's last
//! heartbeat times may be stale), as KRaft does.
//!
//! Call protocol: `handle_message` for Raft messages from other voters and for controller
//! inputs from brokers, `handle_tick` every few milliseconds; after each, send the pushed
//! messages in order. The Raft log lives in a [`RaftStorage`] that the driver keeps across
//! restarts (the simulator treats it as durable on append; cluster mode loads it from disk).
//!
//! Snapshots: every `snapshot_interval_entries` applied entries a voter snapshots its
//! `Controller` ([`Controller::snapshot`]) at its applied index, makes the snapshot durable
//! ([`RaftPersist::persist_snapshot`]: the log then holds only the entries after it) and
//! compacts the in-memory log up to it, keeping `snapshot_tail_entries` before it for
//! followers slightly behind. A follower whose next entry was compacted away gets the
//! leader's latest snapshot (raft-rs `MsgSnapshot`), checked before it is stepped (bad bytes
//! are dropped like a lost message), then persisted and restored into its `Controller` before
//! any entry after it is applied. A restarted voter restores the snapshot in its storage and
//! replays only the entries after it. A snapshot is sent fire-and-forget: the leader reports
//! it delivered at once, and a follower that did not get it rejects the next append, which
//! makes the leader send it again.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use raft::prelude::{ConfState, Entry, EntryType, HardState, Message as RaftMessage, MessageType, Snapshot};
use raft::{Config, GetEntriesContext, RaftState, RawNode, SnapshotStatus, StateRole, Storage, StorageError};
use serde::{Deserialize, Serialize};

use super::autosplit::AutoSplit;
use super::controller::{Controller, ControllerSnapshot, SnapshotError};
use super::{IsrVersion, LeaderEpoch, Message, NodeId, Offset, PartitionId, Time};
use skein_client::partitioning::Partitioning;

/// Quorum settings.
#[derive(Clone, Debug)]
pub struct QuorumConfig {
    /// Raft ticks without a leader's message before an election (one tick per `handle_tick`);
    /// each wait is drawn from `election_ticks..election_ticks_max`. raft-rs draws it with a
    /// thread-local RNG, so the simulator passes a range of one value (chosen from its seed,
    /// different per voter) to stay deterministic.
    pub election_ticks: usize,
    /// Upper bound (exclusive) of the randomized election wait.
    pub election_ticks_max: usize,
    /// Raft ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// How often the active controller commits the time (fencing granularity).
    pub tick_interval_ms: u64,
    /// A voter snapshots its controller and compacts its log every this many applied entries.
    pub snapshot_interval_entries: u64,
    /// Entries kept in memory before a snapshot's index, for followers slightly behind (one
    /// further behind gets the snapshot instead).
    pub snapshot_tail_entries: u64,
}

/// Default interval at which the active controller commits the time (ms).
pub const DEFAULT_TICK_INTERVAL_MS: u64 = 50;
/// Default number of applied entries between snapshots.
pub const DEFAULT_SNAPSHOT_INTERVAL_ENTRIES: u64 = 10_000;
/// Default number of entries kept before a snapshot's index.
pub const DEFAULT_SNAPSHOT_TAIL_ENTRIES: u64 = 1_000;

impl Default for QuorumConfig {
    fn default() -> Self {
        QuorumConfig {
            election_ticks: 10,
            election_ticks_max: 20,
            heartbeat_ticks: 2,
            tick_interval_ms: DEFAULT_TICK_INTERVAL_MS,
            snapshot_interval_entries: DEFAULT_SNAPSHOT_INTERVAL_ENTRIES,
            snapshot_tail_entries: DEFAULT_SNAPSHOT_TAIL_ENTRIES,
        }
    }
}

/// A controller input as it is stored in the Raft log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
enum Input {
    /// A new active controller took over at `now`: every live broker's session restarts.
    NewLeader { now: u64 },
    /// The time passed.
    Tick { now: u64 },
    /// A broker's heartbeat.
    Heartbeat { now: u64, broker: u32, incarnation: u64, lost: Vec<u32>, sent: u64 },
    /// A leader's ISR change.
    AlterIsr { now: u64, from: u32, leader: u32, epoch: u32, isr_version: u32, partition: u32, isr: Vec<u32> },
    /// A topic deletion.
    DeleteTopic { name: String },
    /// A partition reassignment.
    Reassign { partition: u32, replicas: Vec<u32> },
    /// A broker's controlled shutdown.
    ControlledShutdown { broker: u32, incarnation: u64 },
    /// A new topic (`partitioning`: the wire byte; absent in inputs logged before issue 21).
    CreateTopic {
        name: String,
        partitions: u32,
        replication: u16,
        configs: Vec<(String, String)>,
        #[serde(default)]
        partitioning: u8,
    },
    /// A split of a ranged topic's partition.
    Split { topic: String, index: u32, at: Option<Vec<u8>> },
    /// A merge of two adjacent partitions of a ranged topic.
    Merge { topic: String, indexes: [u32; 2] },
    /// A sealing partition's leader reports its log end.
    Sealed { now: u64, from: u32, leader: u32, epoch: u32, partition: u32, offset: u64 },
}

/// Makes the Raft log durable: called with the entries and hard state of every Raft `Ready`
/// before any message that depends on them is sent (raft-rs's contract). Must not return
/// until they are on disk; an implementation that cannot write stops the process.
pub trait RaftPersist {
    /// Appends `entries` (replacing any suffix from the first one's index) and records
    /// `hard_state` if given.
    fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>);

    /// Makes `snapshot` durable and replaces the log with `entries` (those after the
    /// snapshot's index) and `hard_state`: the entries up to its index are no longer needed.
    /// Called when the voter takes a snapshot and when it installs one from the leader; a
    /// crash at any point must leave the old snapshot and log or the new ones (or the new
    /// snapshot with the old log, whose entries up to it are then ignored).
    fn persist_snapshot(&mut self, snapshot: &Snapshot, entries: &[Entry], hard_state: &HardState);
}

/// Why a voter could not start.
#[derive(Debug, thiserror::Error)]
pub enum VoterError {
    /// raft-rs refused the configuration or the storage.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The snapshot in the storage does not restore.
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
}

/// One voter of the controller quorum (co-located with a broker).
pub struct ControllerVoter {
    id: NodeId,
    config: QuorumConfig,
    raw: RawNode<RaftStorage>,
    /// The same storage as `raw`'s.
    storage: RaftStorage,
    controller: Controller,
    last_tick_proposed: Option<Time>,
    was_leader: bool,
    /// Automatic splits and merges (active voter only).
    auto: AutoSplit,
    applied: u64,
    /// The index of the latest snapshot (taken or installed; 0: none).
    snapshot_index: u64,
    /// Voters a snapshot was sent to in the current `process` (reported to raft-rs after it).
    snapshots_sent: Vec<u64>,
    /// The commit index of the last hard state given to `persist`.
    commit_persisted: u64,
    persist: Option<Box<dyn RaftPersist>>,
}

fn raft_id(n: NodeId) -> u64 {
    u64::from(n.0)
}

impl ControllerVoter {
    /// A voter over `storage` (empty for a new cluster; the same one after a restart) with a
    /// fresh `controller`, which the storage's snapshot (if any) is restored into and the
    /// log's entries after it are applied to. `voters` must be the same on every voter.
    pub fn new(
        id: NodeId,
        voters: &[NodeId],
        config: QuorumConfig,
        mut controller: Controller,
        storage: RaftStorage,
    ) -> Result<ControllerVoter, VoterError> {
        assert!(config.snapshot_interval_entries > 0, "snapshot interval of zero entries");
        if storage.initial_state()?.conf_state.voters.is_empty() {
            let ids: Vec<u64> = voters.iter().map(|&v| raft_id(v)).collect();
            storage.set_conf_state(ConfState::from((ids, vec![])));
        }
        let snapshot_index = match storage.latest_snapshot() {
            Some(snapshot) => {
                controller.restore(ControllerSnapshot::decode(&snapshot.data)?)?;
                snapshot.get_metadata().index
            }
            None => 0,
        };
        let raft_config = Config {
            id: raft_id(id),
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config.election_ticks_max,
            heartbeat_tick: config.heartbeat_ticks,
            check_quorum: true,
            pre_vote: true,
            // The controller holds the snapshot's state: entries up to it are not applied again.
            applied: snapshot_index,
            ..Config::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config, storage.clone(), &logger)?;
        Ok(ControllerVoter {
            id,
            config,
            raw,
            storage,
            controller,
            last_tick_proposed: None,
            was_leader: false,
            auto: AutoSplit::default(),
            applied: snapshot_index,
            snapshot_index,
            snapshots_sent: Vec::new(),
            commit_persisted: 0,
            persist: None,
        })
    }

    /// Makes the Raft log durable through `persist` (the runtime's; the simulator keeps the
    /// in-memory log across crashes instead).
    pub fn set_persist(&mut self, persist: Box<dyn RaftPersist>) {
        self.persist = Some(persist);
    }

    /// The active controller as this voter knows it.
    pub fn leader(&self) -> Option<NodeId> {
        let l = self.raw.raft.leader_id;
        (l != raft::INVALID_ID).then(|| NodeId(u32::try_from(l).unwrap_or(0)))
    }

    /// The voter's copy of the controller state (as of its last applied input).
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Whether this voter is the active controller (the Raft leader).
    pub fn is_active(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The index of the last applied Raft entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The Raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The index of the latest snapshot this voter took or installed (0: none). Right after
    /// [`ControllerVoter::new`], the snapshot the storage held, which the controller starts from.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// The voter's Raft log (a handle to the storage it was created with).
    pub fn storage(&self) -> &RaftStorage {
        &self.storage
    }

    /// A message from `from` (a Raft message from another voter, or a controller input from a
    /// broker). Outgoing messages are pushed as (destination, message).
    pub fn handle_message(&mut self, now: Time, from: NodeId, msg: Message, out: &mut Vec<(NodeId, Message)>) {
        match msg {
            Message::Raft(m) => {
                if m.to != raft_id(self.id) {
                    return; // ignore_*: misrouted
                }
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    if let Err(e) = self.check_snapshot(m.get_snapshot()) {
                        // ignore_*: a snapshot this voter could not restore is dropped before
                        // raft-rs takes it; the leader sends it again (and it fails again: the
                        // voter stays behind rather than apply a state it cannot read).
                        tracing::error!(from = m.from, error = %e, "controller snapshot from the leader refused");
                        return;
                    }
                }
                // Errors are about stale or misaddressed messages: dropping them is Raft's rule.
                let _ = self.raw.step(*m);
            }
            Message::Heartbeat { broker, incarnation, lost, sent } if self.is_active() => {
                let lost = lost.iter().map(|p| p.0).collect();
                self.propose(Input::Heartbeat { now: now.0, broker: broker.0, incarnation, lost, sent: sent.0 });
            }
            Message::ControlledShutdown { broker, incarnation } if self.is_active() && broker == from => {
                self.propose(Input::ControlledShutdown { broker: broker.0, incarnation });
            }
            Message::DeleteTopic { name } if self.is_active() => self.propose(Input::DeleteTopic { name }),
            Message::Reassign { partition, replicas } if self.is_active() => {
                let replicas = replicas.iter().map(|r| r.0).collect();
                self.propose(Input::Reassign { partition: partition.0, replicas });
            }
            Message::CreateTopic { name, partitions, replication, partitioning, configs } if self.is_active() => {
                // Nothing the controller would refuse anyway enters the Raft log.
                match crate::core::controller::check_new_topic(&name, partitions, &configs) {
                    Ok(()) => self.propose(Input::CreateTopic {
                        name,
                        partitions,
                        replication,
                        configs,
                        partitioning: partitioning.to_wire(),
                    }),
                    Err(e) => tracing::warn!(error = ?e, "CreateTopic refused"),
                }
            }
            Message::Split { topic, index, at } if self.is_active() => self.propose(Input::Split { topic, index, at }),
            Message::Merge { topic, indexes } if self.is_active() => self.propose(Input::Merge { topic, indexes }),
            Message::Load { leader, epoch, partition, load } if self.is_active() => {
                // Soft state: from the partition's current leader only, never in the log.
                let current = self
                    .controller
                    .partition(partition)
                    .is_some_and(|s| s.leader == Some(leader) && leader == from && s.epoch == epoch);
                if current {
                    self.auto.note(now, partition, load);
                }
            }
            Message::Sealed { leader, epoch, partition, offset } if self.is_active() => {
                let input = Input::Sealed {
                    now: now.0,
                    from: from.0,
                    leader: leader.0,
                    epoch: epoch.0,
                    partition: partition.0,
                    offset: offset.0,
                };
                self.propose(input);
            }
            Message::AlterIsr { leader, epoch, isr_version, partition, isr } if self.is_active() => {
                let isr = isr.iter().map(|r| r.0).collect();
                let input = Input::AlterIsr {
                    now: now.0,
                    from: from.0,
                    leader: leader.0,
                    epoch: epoch.0,
                    isr_version: isr_version.0,
                    partition: partition.0,
                    isr,
                };
                self.propose(input);
            }
            _ => {} // not the active controller, or not a controller input
        }
        self.process(out);
    }

    /// Periodic work: the Raft clock, and committing the time on the active controller.
    pub fn handle_tick(&mut self, now: Time, out: &mut Vec<(NodeId, Message)>) {
        self.raw.tick();
        self.process(out);
        if !self.is_active() {
            self.was_leader = false;
            self.auto.clear();
            return;
        }
        // Automatic splits and merges, proposed like an operator's (the controller's checks
        // apply when the entry is applied).
        for change in self.auto.decide(now, &self.controller) {
            tracing::info!(?change, "automatic resize");
            match change {
                Message::Split { topic, index, at } => self.propose(Input::Split { topic, index, at }),
                Message::Merge { topic, indexes } => self.propose(Input::Merge { topic, indexes }),
                _ => {}
            }
        }
        if !self.was_leader {
            // First, before any tick: restart the sessions, so the time this voter commits
            // next does not fence brokers whose heartbeats went to no one during the election.
            self.was_leader = true;
            self.last_tick_proposed = Some(now);
            self.propose(Input::NewLeader { now: now.0 });
        } else if self.last_tick_proposed.is_none_or(|t| now.ms_since(t) >= self.config.tick_interval_ms) {
            self.last_tick_proposed = Some(now);
            self.propose(Input::Tick { now: now.0 });
        }
        self.process(out);
    }

    fn propose(&mut self, input: Input) {
        let data = serde_json::to_vec(&input).expect("controller inputs serialize");
        // Fails only when not the leader (or a leadership transfer is in progress): the
        // broker's next heartbeat or the leader's next ISR proposal comes soon.
        let _ = self.raw.propose(vec![], data);
    }

    /// Handles Raft's ready state: install a snapshot, apply, persist, send; then takes a
    /// snapshot if one is due, and reports the snapshots sent (which may make more ready
    /// state: an event loop bounded by raft-rs's work).
    fn process(&mut self, out: &mut Vec<(NodeId, Message)>) {
        loop {
            while self.raw.has_ready() {
                self.process_ready(out);
            }
            if self.applied >= self.snapshot_index + self.config.snapshot_interval_entries {
                self.take_snapshot();
            }
            if self.snapshots_sent.is_empty() {
                return;
            }
            for to in std::mem::take(&mut self.snapshots_sent) {
                // Sent, not known delivered: a follower that lost it rejects the next append,
                // and the leader, finding the entries it needs compacted, sends it again.
                self.raw.report_snapshot(to, SnapshotStatus::Finish);
            }
        }
    }

    /// One Raft `Ready`, in raft-rs's order: the snapshot before any entry.
    fn process_ready(&mut self, out: &mut Vec<(NodeId, Message)>) {
        let mut ready = self.raw.ready();
        self.send(ready.take_messages(), out);
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone());
        }
        let committed = ready.take_committed_entries();
        self.apply(committed, out);
        if let Some(p) = self.persist.as_mut() {
            // raft-rs puts a commit index that moved while it persisted (a leader's, always a
            // lone voter's) in no Ready; recorded with the next entries at no extra sync, it
            // lets a restart apply those entries before it hears from a leader.
            let commit = self.storage.hard_state();
            let hard_state = match ready.hs() {
                Some(hs) => Some(hs),
                None if !ready.entries().is_empty() && commit.commit > self.commit_persisted => Some(&commit),
                None => None,
            };
            if !ready.entries().is_empty() || hard_state.is_some() {
                p.persist(ready.entries(), hard_state);
            }
            if let Some(hs) = hard_state {
                self.commit_persisted = hs.commit;
            }
        }
        self.storage.append(ready.entries());
        if let Some(hs) = ready.hs() {
            self.storage.set_hard_state(hs.clone());
        }
        self.send(ready.take_persisted_messages(), out);
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit);
        }
        self.send(light.take_messages(), out);
        let committed = light.take_committed_entries();
        self.apply(committed, out);
        self.raw.advance_apply();
    }

    /// Whether a snapshot from the leader would restore: its data decodes and names this
    /// controller's brokers.
    fn check_snapshot(&self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let decoded = ControllerSnapshot::decode(&snapshot.data)?;
        self.controller.fits(&decoded)
    }

    /// Installs a snapshot raft-rs accepted from the leader: durable first, then the
    /// in-memory log (its entries are dropped), then the controller's state.
    fn install_snapshot(&mut self, snapshot: Snapshot) {
        let (index, term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        assert!(index > self.applied, "snapshot {index} is ahead of the applied index {}", self.applied);
        let decoded = ControllerSnapshot::decode(&snapshot.data).expect("checked before it was stepped");
        let mut hard_state = self.storage.hard_state();
        hard_state.commit = hard_state.commit.max(index);
        hard_state.term = hard_state.term.max(term);
        if let Some(p) = self.persist.as_mut() {
            p.persist_snapshot(&snapshot, &[], &hard_state);
            self.commit_persisted = hard_state.commit;
        }
        self.storage.install_snapshot(snapshot);
        self.controller.restore(decoded).expect("checked before it was stepped");
        self.applied = index;
        self.snapshot_index = index;
        tracing::info!(index, term, "installed a controller snapshot from the leader");
    }

    /// Snapshots the controller at the applied index, makes it durable, compacts the log.
    fn take_snapshot(&mut self) {
        let index = self.applied;
        let term = self.storage.term(index).expect("an applied entry is in the log or is its snapshot");
        let mut snapshot = Snapshot::default();
        snapshot.data = self.controller.snapshot().into();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.storage.initial_state().expect("infallible").conf_state);
        if let Some(p) = self.persist.as_mut() {
            let (after, hard_state) = (self.storage.entries_after(index), self.storage.hard_state());
            p.persist_snapshot(&snapshot, &after, &hard_state);
            self.commit_persisted = hard_state.commit;
        }
        let keep_from = index.saturating_sub(self.config.snapshot_tail_entries) + 1;
        let bytes = snapshot.data.len();
        self.storage.compact(snapshot, keep_from);
        self.snapshot_index = index;
        tracing::debug!(index, term, bytes, "controller snapshot taken");
    }

    fn send(&mut self, msgs: Vec<RaftMessage>, out: &mut Vec<(NodeId, Message)>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent.push(m.to);
            }
            let to = NodeId(u32::try_from(m.to).expect("voter ids are u32"));
            out.push((to, Message::Raft(Box::new(m))));
        }
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Vec<(NodeId, Message)>) {
        for e in entries {
            self.applied = e.index;
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            let Ok(input) = serde_json::from_slice::<Input>(&e.data) else {
                tracing::error!(index = e.index, "undecodable controller input in the Raft log; skipped");
                continue;
            };
            let mut outputs = Vec::new();
            match input {
                Input::NewLeader { now } => self.controller.restart_sessions(Time(now)),
                Input::Tick { now } => self.controller.handle_tick(Time(now), &mut outputs),
                Input::Heartbeat { now, broker, incarnation, lost, sent } => {
                    let msg = Message::Heartbeat {
                        broker: NodeId(broker),
                        incarnation,
                        lost: lost.into_iter().map(PartitionId).collect(),
                        sent: Time(sent),
                    };
                    self.controller.handle_message(Time(now), NodeId(broker), msg, &mut outputs);
                }
                Input::AlterIsr { now, from, leader, epoch, isr_version, partition, isr } => {
                    let msg = Message::AlterIsr {
                        leader: NodeId(leader),
                        epoch: LeaderEpoch(epoch),
                        isr_version: IsrVersion(isr_version),
                        partition: PartitionId(partition),
                        isr: isr.into_iter().map(NodeId).collect(),
                    };
                    self.controller.handle_message(Time(now), NodeId(from), msg, &mut outputs);
                }
                Input::DeleteTopic { name } => {
                    if !self.controller.delete_topic(&name) {
                        tracing::debug!(topic = %name, "no such topic to delete");
                    }
                }
                Input::Reassign { partition, replicas } => {
                    let target = replicas.into_iter().map(NodeId).collect();
                    if let Err(e) = self.controller.reassign(PartitionId(partition), target, &mut outputs) {
                        tracing::debug!(partition, error = %e, "reassignment refused");
                    }
                }
                Input::ControlledShutdown { broker, incarnation } => {
                    self.controller.controlled_shutdown(NodeId(broker), incarnation, &mut outputs);
                }
                Input::CreateTopic { name, partitions, replication, configs, partitioning } => {
                    let Some(scheme) = Partitioning::from_wire(partitioning) else {
                        tracing::debug!(topic = %name, partitioning, "topic not created: unknown partitioning");
                        continue;
                    };
                    let result =
                        self.controller.create_topic(&name, partitions, replication, scheme, configs, &mut outputs);
                    if let Err(e) = result {
                        tracing::debug!(topic = %name, error = ?e, "topic not created");
                    }
                }
                Input::Split { topic, index, at } => {
                    if let Err(e) = self.controller.split(&topic, index, at, &mut outputs) {
                        tracing::debug!(%topic, index, error = %e, "split refused");
                    }
                }
                Input::Merge { topic, indexes } => {
                    if let Err(e) = self.controller.merge(&topic, indexes, &mut outputs) {
                        tracing::debug!(%topic, ?indexes, error = %e, "merge refused");
                    }
                }
                Input::Sealed { now, from, leader, epoch, partition, offset } => {
                    let msg = Message::Sealed {
                        leader: NodeId(leader),
                        epoch: LeaderEpoch(epoch),
                        partition: PartitionId(partition),
                        offset: Offset(offset),
                    };
                    self.controller.handle_message(Time(now), NodeId(from), msg, &mut outputs);
                }
            }
            // Every voter applies; only the active one speaks for the controller.
            if self.is_active() {
                out.extend(outputs);
            }
        }
    }
}

/// The voter's Raft log in memory, raft-rs's `Storage`: the entries after a compaction point,
/// the hard and configuration state, and the latest snapshot *with its data* (raft-rs's
/// `MemStorage` keeps only a snapshot's metadata, so a leader could not send one). A handle:
/// clones share the log (the simulator keeps one across a voter's crashes; cluster mode builds
/// one from disk). Invariants: the entries are consecutive and start right after `offset`;
/// `offset` is at most the snapshot's index; with no snapshot, `offset` is 0.
#[derive(Clone, Default)]
pub struct RaftStorage {
    inner: Arc<RwLock<Stored>>,
}

#[derive(Default)]
struct Stored {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot (an empty one, index 0, before the first).
    snapshot: Snapshot,
    /// The index and term of the entry before `entries[0]`.
    offset: u64,
    offset_term: u64,
    entries: Vec<Entry>,
}

impl Stored {
    fn last_index(&self) -> u64 {
        self.offset + self.entries.len() as u64
    }
}

impl RaftStorage {
    /// An empty log.
    pub fn new() -> RaftStorage {
        RaftStorage::default()
    }

    /// Appends `entries`, replacing the log's suffix from the first one's index. The caller
    /// checks that they follow the log: the first index is within `first_index..=last_index + 1`.
    pub fn append(&self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let mut s = self.wl();
        assert!(first.index > s.offset, "entry {} is compacted (log after {})", first.index, s.offset);
        assert!(first.index <= s.last_index() + 1, "entry {} leaves a gap after {}", first.index, s.last_index());
        let keep = (first.index - s.offset - 1) as usize;
        s.entries.truncate(keep);
        s.entries.extend_from_slice(entries);
    }

    /// Drops the entries after `index` (a new leader's entries replace them).
    pub fn truncate_after(&self, index: u64) {
        let mut s = self.wl();
        assert!(index >= s.offset, "truncating to {index}, before the log's start {}", s.offset);
        let keep = (index - s.offset) as usize;
        s.entries.truncate(keep);
    }

    /// Records the hard state.
    pub fn set_hard_state(&self, hard_state: HardState) {
        self.wl().hard_state = hard_state;
    }

    /// The hard state.
    pub fn hard_state(&self) -> HardState {
        self.rl().hard_state.clone()
    }

    /// Records a commit index raft-rs reported after a `Ready`.
    pub fn set_commit(&self, commit: u64) {
        self.wl().hard_state.commit = commit;
    }

    /// Records the voters.
    pub fn set_conf_state(&self, conf_state: ConfState) {
        self.wl().conf_state = conf_state;
    }

    /// Replaces the log with `snapshot` (loaded from disk, or received from the leader): every
    /// entry goes, the commit index and term are at least the snapshot's.
    pub fn install_snapshot(&self, snapshot: Snapshot) {
        let mut s = self.wl();
        let meta = snapshot.get_metadata();
        assert!(meta.index >= s.snapshot.get_metadata().index, "an older snapshot replaces a newer one");
        s.hard_state.commit = s.hard_state.commit.max(meta.index);
        s.hard_state.term = s.hard_state.term.max(meta.term);
        s.conf_state = meta.get_conf_state().clone();
        s.offset = meta.index;
        s.offset_term = meta.term;
        s.entries.clear();
        s.snapshot = snapshot;
    }

    /// Keeps `snapshot` (taken at an index in the log) and drops the entries before
    /// `keep_from` (at most the snapshot's index + 1).
    pub fn compact(&self, snapshot: Snapshot, keep_from: u64) {
        let mut s = self.wl();
        let index = snapshot.get_metadata().index;
        assert!(index <= s.last_index(), "snapshot {index} past the log's last entry {}", s.last_index());
        assert!(keep_from <= index + 1, "compaction to {keep_from} past snapshot {index}");
        if keep_from > s.offset + 1 {
            let drop = (keep_from - s.offset - 1) as usize;
            s.offset_term = s.entries[drop - 1].term;
            s.offset = keep_from - 1;
            s.entries.drain(..drop);
        }
        s.snapshot = snapshot;
    }

    /// The latest snapshot, if any.
    pub fn latest_snapshot(&self) -> Option<Snapshot> {
        let s = self.rl();
        (s.snapshot.get_metadata().index > 0).then(|| s.snapshot.clone())
    }

    /// The entries after `index` (which must not be before the first entry's predecessor).
    pub fn entries_after(&self, index: u64) -> Vec<Entry> {
        let s = self.rl();
        assert!(index >= s.offset, "entries after {index} are compacted (log after {})", s.offset);
        let from = ((index - s.offset) as usize).min(s.entries.len());
        s.entries[from..].to_vec()
    }

    fn rl(&self) -> RwLockReadGuard<'_, Stored> {
        self.inner.read().expect("never poisoned: a panic aborts the process")
    }

    fn wl(&self) -> RwLockWriteGuard<'_, Stored> {
        self.inner.write().expect("never poisoned: a panic aborts the process")
    }
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.rl();
        Ok(RaftState { hard_state: s.hard_state.clone(), conf_state: s.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let s = self.rl();
        if low <= s.offset {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > s.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let (lo, hi) = ((low - s.offset - 1) as usize, (high - s.offset - 1) as usize);
        let mut entries = s.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let s = self.rl();
        if index == s.offset {
            return Ok(s.offset_term);
        }
        if index == s.snapshot.get_metadata().index {
            return Ok(s.snapshot.get_metadata().term);
        }
        if index < s.offset {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > s.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(s.entries[(index - s.offset - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().offset + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // raft-rs asks only for a follower whose next entry is compacted, which needs a
        // snapshot to have been taken; before one exists there is nothing to send yet.
        self.latest_snapshot().ok_or(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::controller::ControllerConfig;

    fn voters() -> Vec<NodeId> {
        vec![NodeId(1), NodeId(2), NodeId(3)]
    }

    fn voter(id: u32, storage: RaftStorage) -> ControllerVoter {
        let c = Controller::new(ControllerConfig::default(), &voters(), &[(PartitionId(0), voters())]);
        let ticks = 8 + 3 * id as usize; // distinct fixed waits: deterministic tests
        let config = QuorumConfig { election_ticks: ticks, election_ticks_max: ticks + 1, ..QuorumConfig::default() };
        ControllerVoter::new(NodeId(id), &voters(), config, c, storage).expect("voter")
    }

    /// Runs three voters with instant delivery until `until` ticks, returning them.
    fn run(
        vs: &mut [ControllerVoter],
        ticks: u64,
        mut inject: impl FnMut(u64, &mut [ControllerVoter]) -> Vec<(NodeId, NodeId, Message)>,
    ) -> Vec<(NodeId, Message)> {
        let mut to_brokers = Vec::new();
        let mut queue: Vec<(NodeId, NodeId, Message)> = Vec::new();
        for t in 0..ticks {
            let now = Time(t * 5_000);
            queue.extend(inject(t, vs));
            for v in vs.iter_mut() {
                let mut out = Vec::new();
                v.handle_tick(now, &mut out);
                let from = v.id;
                queue.extend(out.into_iter().map(|(to, m)| (from, to, m)));
            }
            while let Some((from, to, m)) = queue.pop() {
                match m {
                    Message::Raft(_) | Message::Heartbeat { .. } | Message::AlterIsr { .. } => {
                        let v = &mut vs[(to.0 - 1) as usize];
                        let mut out = Vec::new();
                        v.handle_message(now, from, m, &mut out);
                        let me = v.id;
                        queue.extend(out.into_iter().map(|(to, m)| (me, to, m)));
                    }
                    other => to_brokers.push((to, other)),
                }
            }
        }
        to_brokers
    }

    #[test]
    fn one_voter_becomes_active_and_every_voter_applies_the_same_decisions() {
        let mut vs: Vec<ControllerVoter> = (1..=3).map(|i| voter(i, RaftStorage::new())).collect();
        let out = run(&mut vs, 100, |t, _| {
            if t % 10 == 0 && t > 30 {
                (1..=3)
                    .flat_map(|b| {
                        (1..=3).map(move |v| {
                            (
                                NodeId(b),
                                NodeId(v),
                                Message::Heartbeat {
                                    broker: NodeId(b),
                                    incarnation: 1,
                                    lost: vec![],
                                    sent: Time(t * 5_000),
                                },
                            )
                        })
                    })
                    .collect()
            } else {
                vec![]
            }
        });
        assert_eq!(vs.iter().filter(|v| v.is_active()).count(), 1, "exactly one active controller");
        let states: Vec<_> = vs.iter().map(|v| v.controller().partition(PartitionId(0)).cloned()).collect();
        assert!(states[0].as_ref().is_some_and(|s| s.leader.is_some()), "a leader was elected: {states:?}");
        assert!(states.iter().all(|s| *s == states[0]), "voters agree: {states:?}");
        assert!(out.iter().any(|(_, m)| matches!(m, Message::HeartbeatResponse { .. })), "brokers got leases");
    }

    #[test]
    fn a_restarted_voter_replays_its_log_to_the_same_state() {
        let storages: Vec<RaftStorage> = (0..3).map(|_| RaftStorage::new()).collect();
        let mut vs: Vec<ControllerVoter> = (1..=3).map(|i| voter(i, storages[i as usize - 1].clone())).collect();
        run(&mut vs, 80, |t, _| {
            if t == 40 {
                (1..=3)
                    .map(|v| {
                        (
                            NodeId(2),
                            NodeId(v),
                            Message::Heartbeat { broker: NodeId(2), incarnation: 1, lost: vec![], sent: Time(0) },
                        )
                    })
                    .collect()
            } else {
                vec![]
            }
        });
        let before = vs[0].controller().partition(PartitionId(0)).cloned();
        assert!(before.as_ref().is_some_and(|s| s.leader == Some(NodeId(2))));
        let again = voter(1, storages[0].clone());
        let mut again = [again];
        // Replay happens as the restarted voter processes its committed log.
        let mut out = Vec::new();
        again[0].handle_tick(Time(1), &mut out);
        assert_eq!(again[0].controller().partition(PartitionId(0)).cloned(), before);
    }
    /// Runs three voters from tick `from` to `to` with instant delivery, brokers 1 and 2
    /// heartbeating every tick; every message to or from `cut` is dropped. Returns how many
    /// snapshots were delivered.
    fn run_cut(vs: &mut [ControllerVoter], from: u64, to: u64, cut: Option<NodeId>) -> usize {
        let mut snapshots = 0;
        for t in from..to {
            let now = Time(t * 5_000);
            let mut queue: Vec<(NodeId, NodeId, Message)> = Vec::new();
            for b in 1..=2 {
                for v in 1..=3 {
                    let hb = Message::Heartbeat { broker: NodeId(b), incarnation: 1, lost: vec![], sent: now };
                    queue.push((NodeId(b), NodeId(v), hb));
                }
            }
            for v in vs.iter_mut() {
                let mut out = Vec::new();
                v.handle_tick(now, &mut out);
                let from = v.id;
                queue.extend(out.into_iter().map(|(to, m)| (from, to, m)));
            }
            while let Some((from, to, m)) = queue.pop() {
                let for_voter = matches!(m, Message::Raft(_) | Message::Heartbeat { .. });
                if !for_voter || cut.is_some_and(|c| c == from || c == to) {
                    continue;
                }
                if let Message::Raft(r) = &m {
                    snapshots += usize::from(r.get_msg_type() == MessageType::MsgSnapshot);
                }
                let v = &mut vs[(to.0 - 1) as usize];
                let mut out = Vec::new();
                v.handle_message(now, from, m, &mut out);
                let me = v.id;
                queue.extend(out.into_iter().map(|(to, m)| (me, to, m)));
            }
        }
        snapshots
    }

    #[test]
    fn a_voter_cut_off_while_the_others_compact_gets_a_snapshot_and_converges() {
        let storages: Vec<RaftStorage> = (0..3).map(|_| RaftStorage::new()).collect();
        let small = |id: u32, storage: RaftStorage| {
            let c = Controller::new(ControllerConfig::default(), &voters(), &[(PartitionId(0), voters())]);
            let ticks = 8 + 3 * id as usize;
            let config = QuorumConfig {
                election_ticks: ticks,
                election_ticks_max: ticks + 1,
                snapshot_interval_entries: 20,
                snapshot_tail_entries: 5,
                ..QuorumConfig::default()
            };
            ControllerVoter::new(NodeId(id), &voters(), config, c, storage).expect("voter")
        };
        let mut vs: Vec<ControllerVoter> = (1..=3).map(|i| small(i, storages[i as usize - 1].clone())).collect();
        assert_eq!(run_cut(&mut vs, 0, 40, None), 0, "no one is behind");
        let active = vs.iter().position(|v| v.is_active()).expect("a leader");
        // Cut off a follower; the other two go on committing and compact their logs.
        let behind = (active + 1) % 3;
        let cut_at = vs[behind].applied();
        let cut = vs[behind].id;
        run_cut(&mut vs, 40, 200, Some(cut));
        let leader = &vs[active];
        assert!(leader.snapshot_index() > cut_at + 5, "the leader compacted past the cut-off voter");
        assert!(leader.storage().first_index().expect("infallible") > cut_at + 1, "its entries are gone");
        assert_eq!(vs[behind].applied(), cut_at);
        // Healed: the entries it needs are compacted, so it gets a snapshot.
        let delivered = run_cut(&mut vs, 200, 260, None);
        assert!(delivered >= 1, "a snapshot was sent");
        let v = &vs[behind];
        assert!(v.snapshot_index() > cut_at, "it installed a snapshot past its old log");
        assert!(v.storage().first_index().expect("infallible") > cut_at + 1, "its old entries were dropped");
        // Converged: the same state at the same index (stop proposing, let the commit spread).
        for t in 260..300 {
            if vs.iter().all(|v| v.applied() == vs[0].applied()) {
                break;
            }
            run_cut(&mut vs, t, t + 1, None);
        }
        let applied: Vec<u64> = vs.iter().map(|v| v.applied()).collect();
        assert!(applied.iter().all(|&a| a == applied[0]), "{applied:?}");
        let states: Vec<Vec<u8>> = vs.iter().map(|v| v.controller().snapshot()).collect();
        assert!(states.iter().all(|s| *s == states[0]), "every voter holds the same controller state");
        assert!(
            vs[behind].controller().alive(NodeId(1)) && vs[behind].controller().partition(PartitionId(0)).is_some()
        );

        // Restarted from its storage, a voter starts from its snapshot and replays the tail.
        let restarted = small(3, storages[2].clone());
        assert_eq!(restarted.snapshot_index(), vs[2].snapshot_index());
        let mut restarted = [restarted];
        restarted[0].handle_tick(Time(300 * 5_000), &mut Vec::new());
        assert!(restarted[0].applied() >= vs[2].snapshot_index());
    }
    #[test]
    fn raft_storage_keeps_a_tail_before_its_snapshot_and_answers_as_raft_rs_expects() {
        let compacted = raft::Error::Store(StorageError::Compacted);
        let unavailable = raft::Error::Store(StorageError::Unavailable);
        let entry = |index: u64, term: u64| Entry { index, term, ..Default::default() };
        let snapshot = |index: u64, term: u64| {
            let mut s = Snapshot { data: vec![index as u8].into(), ..Default::default() };
            s.mut_metadata().index = index;
            s.mut_metadata().term = term;
            s
        };
        let s = RaftStorage::new();
        assert!(s.latest_snapshot().is_none());
        assert_eq!(s.snapshot(0, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)));
        s.append(&(1..=10).map(|i| entry(i, 1 + i / 6)).collect::<Vec<_>>());
        s.append(&[entry(9, 3), entry(10, 3)]); // a new leader's suffix
        assert_eq!((s.first_index(), s.last_index(), s.term(10)), (Ok(1), Ok(10), Ok(3)));
        // A snapshot at 8 keeping 3 entries before it (6, 7, 8).
        s.compact(snapshot(8, 2), 6);
        assert_eq!((s.first_index(), s.term(5), s.term(4)), (Ok(6), Ok(1), Err(compacted)));
        let compacted = raft::Error::Store(StorageError::Compacted);
        assert_eq!(s.entries(5, 7, None, GetEntriesContext::empty(false)), Err(compacted));
        let kept = s.entries(6, 11, None, GetEntriesContext::empty(false)).expect("kept");
        assert_eq!(kept.iter().map(|e| e.index).collect::<Vec<_>>(), vec![6, 7, 8, 9, 10]);
        assert_eq!(s.entries(6, 12, None, GetEntriesContext::empty(false)), Err(unavailable));
        assert_eq!(s.term(11), Err(raft::Error::Store(StorageError::Unavailable)));
        assert_eq!(s.snapshot(0, 2).map(|x| x.get_metadata().index), Ok(8));
        assert_eq!(s.entries_after(8).iter().map(|e| e.index).collect::<Vec<_>>(), vec![9, 10]);
        // A snapshot from the leader replaces everything.
        s.set_hard_state(HardState { term: 3, vote: 2, commit: 9, ..Default::default() });
        s.install_snapshot(snapshot(20, 4));
        assert_eq!((s.first_index(), s.last_index(), s.term(20)), (Ok(21), Ok(20), Ok(4)));
        assert_eq!((s.hard_state().term, s.hard_state().vote, s.hard_state().commit), (4, 2, 20));
        s.append(&[entry(21, 4)]);
        s.truncate_after(20);
        assert_eq!(s.last_index(), Ok(20));
    }
}
