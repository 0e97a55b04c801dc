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
//! messages in order. The Raft log lives in a `raft::storage::MemStorage` that the driver keeps
//! across restarts (the simulator treats it as durable on append); a restarted voter replays
//! the log from the start to rebuild its `Controller` (no snapshots yet).

use raft::prelude::{Entry, EntryType, Message as RaftMessage};
use raft::storage::{MemStorage, Storage as _};
use raft::{Config, RawNode, StateRole};
use serde::{Deserialize, Serialize};

use super::controller::Controller;
use super::{IsrVersion, LeaderEpoch, Message, NodeId, PartitionId, Time};

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
}

/// Default interval at which the active controller commits the time (ms).
pub const DEFAULT_TICK_INTERVAL_MS: u64 = 50;

impl Default for QuorumConfig {
    fn default() -> Self {
        QuorumConfig {
            election_ticks: 10,
            election_ticks_max: 20,
            heartbeat_ticks: 2,
            tick_interval_ms: DEFAULT_TICK_INTERVAL_MS,
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
    /// A new topic.
    CreateTopic { name: String, partitions: u32, replication: u16, configs: Vec<(String, String)> },
}

/// Makes the Raft log durable: called with the entries and hard state of every Raft `Ready`
/// before any message that depends on them is sent (raft-rs's contract). Must not return
/// until they are on disk; an implementation that cannot write stops the process.
pub trait RaftPersist {
    /// Appends `entries` (replacing any suffix from the first one's index) and records
    /// `hard_state` if given.
    fn persist(&mut self, entries: &[Entry], hard_state: Option<&raft::prelude::HardState>);
}

/// One voter of the controller quorum (co-located with a broker).
pub struct ControllerVoter {
    id: NodeId,
    config: QuorumConfig,
    raw: RawNode<MemStorage>,
    controller: Controller,
    last_tick_proposed: Option<Time>,
    was_leader: bool,
    applied: u64,
    persist: Option<Box<dyn RaftPersist>>,
}

fn raft_id(n: NodeId) -> u64 {
    u64::from(n.0)
}

impl ControllerVoter {
    /// A voter over `storage` (empty for a new cluster; the same one after a restart) with a
    /// fresh `controller` that the log's inputs are applied to. `voters` must be the same on
    /// every voter.
    pub fn new(
        id: NodeId,
        voters: &[NodeId],
        config: QuorumConfig,
        controller: Controller,
        storage: MemStorage,
    ) -> Result<ControllerVoter, raft::Error> {
        if storage.initial_state()?.conf_state.voters.is_empty() {
            let ids: Vec<u64> = voters.iter().map(|&v| raft_id(v)).collect();
            storage.wl().set_conf_state(raft::prelude::ConfState::from((ids, vec![])));
        }
        let raft_config = Config {
            id: raft_id(id),
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config.election_ticks_max,
            heartbeat_tick: config.heartbeat_ticks,
            check_quorum: true,
            pre_vote: true,
            applied: 0,
            ..Config::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config, storage, &logger)?;
        Ok(ControllerVoter {
            id,
            config,
            raw,
            controller,
            last_tick_proposed: None,
            was_leader: false,
            applied: 0,
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

    /// A message from `from` (a Raft message from another voter, or a controller input from a
    /// broker). Outgoing messages are pushed as (destination, message).
    pub fn handle_message(&mut self, now: Time, from: NodeId, msg: Message, out: &mut Vec<(NodeId, Message)>) {
        match msg {
            Message::Raft(m) => {
                if m.to != raft_id(self.id) {
                    return; // ignore_*: misrouted
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
            Message::CreateTopic { name, partitions, replication, configs } if self.is_active() => {
                // Nothing the controller would refuse anyway enters the Raft log.
                match crate::core::controller::check_new_topic(&name, partitions, &configs) {
                    Ok(()) => self.propose(Input::CreateTopic { name, partitions, replication, configs }),
                    Err(e) => tracing::warn!(error = ?e, "CreateTopic refused"),
                }
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
            return;
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

    /// Handles Raft's ready state: persist, send, apply.
    fn process(&mut self, out: &mut Vec<(NodeId, Message)>) {
        while self.raw.has_ready() {
            let mut ready = self.raw.ready();
            self.send(ready.take_messages(), out);
            let committed = ready.take_committed_entries();
            self.apply(committed, out);
            if let Some(p) = self.persist.as_mut() {
                if !ready.entries().is_empty() || ready.hs().is_some() {
                    p.persist(ready.entries(), ready.hs());
                }
            }
            if !ready.entries().is_empty() {
                self.raw.raft.raft_log.store.wl().append(ready.entries()).expect("appending to the Raft log in memory");
            }
            if let Some(hs) = ready.hs() {
                self.raw.raft.raft_log.store.wl().set_hardstate(hs.clone());
            }
            self.send(ready.take_persisted_messages(), out);
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.raft.raft_log.store.wl().mut_hard_state().set_commit(commit);
            }
            self.send(light.take_messages(), out);
            let committed = light.take_committed_entries();
            self.apply(committed, out);
            self.raw.advance_apply();
        }
    }

    fn send(&self, msgs: Vec<RaftMessage>, out: &mut Vec<(NodeId, Message)>) {
        for m in msgs {
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
                Input::CreateTopic { name, partitions, replication, configs } => {
                    if let Err(e) = self.controller.create_topic(&name, partitions, replication, configs, &mut outputs)
                    {
                        tracing::debug!(topic = %name, error = ?e, "topic not created");
                    }
                }
            }
            // Every voter applies; only the active one speaks for the controller.
            if self.is_active() {
                out.extend(outputs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::controller::ControllerConfig;

    fn voters() -> Vec<NodeId> {
        vec![NodeId(1), NodeId(2), NodeId(3)]
    }

    fn voter(id: u32, storage: MemStorage) -> ControllerVoter {
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
        let mut vs: Vec<ControllerVoter> = (1..=3).map(|i| voter(i, MemStorage::new())).collect();
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
        let storages: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
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
}
