//! One broker as a sans-IO state machine: its partition replicas, its controller session and
//! lease, and message routing.
//!
//! Call protocol: `handle_message` for every message from a peer, `handle_produce` /
//! `read_committed` for clients, `handle_io_done` for finished sync jobs, `handle_tick`
//! every few milliseconds; then execute the commands pushed onto `out`, in order.
//!
//! The lease: a heartbeat sent at `t` and answered by the controller makes the broker's lease
//! valid until `t + lease_ms`. `lease_ms` is shorter than the controller's session timeout,
//! so by the time the controller fences a silent broker (and elects new leaders), the
//! broker's lease has run out and it accepts no more writes: two leaders never both
//! acknowledge writes, even with `acks=leader`.

use std::collections::{BTreeMap, HashMap};

use skein_log::batch::RecordBatch;
use skein_log::storage::{Storage, StorageError};

use super::replica::{Job, Replica};
use super::{
    Acks, Command, LeaderEpoch, MarkerRequest, MarkerResult, Message, NodeId, Offset, PartitionId, Peer, ProduceError,
    ReadFailure, RequestId, Time,
};

/// How long a marker append may wait for its commit before it is answered `Abandoned` (the
/// coordinator sends it again).
pub const MARKER_TIMEOUT_MS: u64 = 5_000;
/// Request ids this node gives marker appends start here; drivers number theirs from 0.
const MARKER_REQUESTS: u64 = 1 << 62;

/// Broker settings for the core.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lease length from a heartbeat's send time (shorter than the session timeout).
    pub lease_ms: u64,
    /// Whether this `BrokerNode` sends the broker's heartbeats. A thread-per-core broker runs
    /// one `BrokerNode` per shard, each with the replicas that shard owns; only shard 0's
    /// heartbeats, and the others get their share of every controller answer from it (the
    /// lease and registration arrive with it, so every shard fences itself at the same time).
    pub heartbeats: bool,
}

/// Default lease length (ms): shorter than the controller's default session timeout (400 ms).
pub const DEFAULT_LEASE_MS: u64 = 250;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { heartbeat_ms: 50, lease_ms: DEFAULT_LEASE_MS, heartbeats: true }
    }
}

/// A broker's core.
pub struct BrokerNode<S: Storage> {
    id: NodeId,
    config: NodeConfig,
    replicas: BTreeMap<PartitionId, Replica<S>>,
    lease_until: Option<Time>,
    next_heartbeat: Time,
    incarnation: u64,
    /// Partitions whose logs were replaced (damaged) at this start; told to the controller.
    lost: Vec<PartitionId>,
    /// Set by the first heartbeat response to this incarnation; partition states are
    /// ignored before it (one sent before a restart could name this broker leader of an
    /// epoch whose unsynced records it lost).
    registered: bool,
    /// Planted bug: ignore the lease.
    no_fencing: bool,
    /// Marker appends in progress: request id to the request (answered to its coordinator).
    markers: HashMap<RequestId, MarkerRequest>,
    next_marker: u64,
}

impl<S: Storage> BrokerNode<S> {
    /// A broker with these replicas (opened logs). `incarnation` must differ at every start;
    /// `lost` names partitions whose damaged logs were replaced by empty ones at this start.
    pub fn new(
        id: NodeId,
        incarnation: u64,
        lost: Vec<PartitionId>,
        config: NodeConfig,
        replicas: Vec<Replica<S>>,
        no_fencing: bool,
    ) -> Self {
        let replicas = replicas.into_iter().map(|r: Replica<S>| (r.partition(), r)).collect();
        BrokerNode {
            id,
            config,
            replicas,
            lease_until: None,
            next_heartbeat: Time(0),
            incarnation,
            lost,
            registered: false,
            no_fencing,
            markers: HashMap::new(),
            next_marker: MARKER_REQUESTS,
        }
    }

    /// Adds a replica (a partition newly assigned to this broker); it waits for its state.
    pub fn add_replica(&mut self, replica: Replica<S>) {
        self.replicas.entry(replica.partition()).or_insert(replica);
    }

    /// This broker's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Removes a replica (its partition was deleted), returning its log.
    pub fn remove_replica(&mut self, p: PartitionId, out: &mut Vec<Command<Job<S>>>) -> Option<skein_log::Log<S>> {
        let start = out.len();
        let log = self.replicas.remove(&p).map(|r| r.into_log(out));
        self.answer_markers(start, out);
        log
    }

    /// This process's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Its replicas.
    pub fn replicas(&self) -> impl Iterator<Item = (&PartitionId, &Replica<S>)> {
        self.replicas.iter()
    }

    /// One replica.
    pub fn replica(&self, p: PartitionId) -> Option<&Replica<S>> {
        self.replicas.get(&p)
    }

    /// Whether the controller lease is valid at `now`.
    pub fn lease_valid(&self, now: Time) -> bool {
        self.no_fencing || self.lease_until.is_some_and(|t| now < t)
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, now: Time, from: Peer, msg: Message, out: &mut Vec<Command<Job<S>>>) {
        let start = out.len();
        self.message(now, from, msg, out);
        self.answer_markers(start, out);
    }

    fn message(&mut self, now: Time, from: Peer, msg: Message, out: &mut Vec<Command<Job<S>>>) {
        match msg {
            Message::Fetch(req) => {
                let Some(r) = self.replicas.get_mut(&req.partition) else { return };
                if let Some(resp) = r.handle_fetch(now, &req, out) {
                    out.push(Command::Send { to: Peer::Node(req.replica), msg: Message::FetchResponse(resp) });
                }
            }
            Message::FetchResponse(resp) => {
                let p = resp.partition();
                if let Some(r) = self.replicas.get_mut(&p) {
                    r.handle_fetch_response(now, resp, out);
                }
            }
            Message::HeartbeatResponse { incarnation, sent, alive, partitions } => {
                if from != Peer::Controller || incarnation != self.incarnation {
                    return; // an answer to an earlier process
                }
                self.registered = true;
                if alive {
                    let until = sent.plus_ms(self.config.lease_ms);
                    self.lease_until = Some(self.lease_until.map_or(until, |t| t.max(until)));
                }
                for s in partitions {
                    if let Some(r) = self.replicas.get_mut(&s.partition) {
                        r.handle_state(now, s, out);
                    }
                }
            }
            Message::PartitionState(s) => {
                if from != Peer::Controller || (!self.registered && !self.no_fencing) {
                    return;
                }
                if let Some(r) = self.replicas.get_mut(&s.partition) {
                    r.handle_state(now, s, out);
                }
            }
            Message::Heartbeat { .. }
            | Message::AlterIsr { .. }
            | Message::Raft(_)
            | Message::CreateTopic { .. }
            | Message::ControlledShutdown { .. }
            | Message::Reassign { .. }
            | Message::Sealed { .. }
            | Message::Load { .. }
            | Message::Split { .. }
            | Message::Merge { .. }
            | Message::DeleteTopic { .. } => {} // for the controller
            Message::TxnMarker(m) => {
                let request = RequestId(self.next_marker);
                self.next_marker += 1;
                let lease_ok = self.lease_valid(now);
                let deadline = now.plus_ms(MARKER_TIMEOUT_MS);
                let (partition, producer, epoch, kind) = (m.partition, m.producer, m.epoch, m.kind);
                self.markers.insert(request, m);
                match self.replicas.get_mut(&partition) {
                    Some(r) => r.handle_marker(now, request, producer, epoch, kind, deadline, lease_ok, out),
                    None => out.push(Command::ProduceReply { request, result: Err(ProduceError::NotLeader) }),
                }
            }
            Message::TxnMarkerResult(r) => out.push(Command::MarkerDone(r)),
        }
    }

    /// A client's produce of one batch.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_produce<B: AsRef<[u8]> + AsMut<[u8]> + Into<bytes::Bytes>>(
        &mut self,
        now: Time,
        request: RequestId,
        partition: PartitionId,
        client_epoch: Option<LeaderEpoch>,
        batch: RecordBatch<B>,
        acks: Acks,
        deadline: Time,
        out: &mut Vec<Command<Job<S>>>,
    ) {
        assert!(request.0 < MARKER_REQUESTS, "driver request ids stay below the markers'");
        let start = out.len();
        let lease_ok = self.lease_valid(now);
        match self.replicas.get_mut(&partition) {
            Some(r) => r.handle_produce(now, request, client_epoch, batch, acks, deadline, lease_ok, out),
            None => out.push(Command::ProduceReply { request, result: Err(ProduceError::NotLeader) }),
        }
        self.answer_markers(start, out);
    }

    /// Turns the answers to marker appends among `out[start..]` into messages to their
    /// coordinators.
    fn answer_markers(&mut self, start: usize, out: &mut [Command<Job<S>>]) {
        if self.markers.is_empty() {
            return;
        }
        for c in &mut out[start..] {
            let Command::ProduceReply { request, result } = c else { continue };
            let Some(m) = self.markers.remove(request) else { continue };
            let result = MarkerResult {
                coordinator_partition: m.coordinator_partition,
                correlation: m.correlation,
                partition: m.partition,
                result: result.map(|_| ()),
            };
            *c = Command::Send { to: Peer::Node(m.coordinator), msg: Message::TxnMarkerResult(result) };
        }
    }

    /// Committed batches of a partition from `from`, and its high watermark (leader with a
    /// valid lease only).
    pub fn read_committed(
        &self,
        now: Time,
        partition: PartitionId,
        from: Offset,
        max_bytes: u32,
    ) -> Result<(Vec<u8>, Offset), ReadFailure> {
        // Like writes, reads need the lease: a leader without one may have been replaced, and
        // its high watermark would then be behind what readers saw from its successor.
        if !self.lease_valid(now) {
            return Err(ProduceError::NotLeader.into());
        }
        self.read_leader(now, partition, from, max_bytes, false)
    }

    /// As [`BrokerNode::read_committed`]; `stable_only` (read_committed isolation) reads up to
    /// the last stable offset.
    pub fn read_leader(
        &self,
        now: Time,
        partition: PartitionId,
        from: Offset,
        max_bytes: u32,
        stable_only: bool,
    ) -> Result<(Vec<u8>, Offset), ReadFailure> {
        if !self.lease_valid(now) {
            return Err(ProduceError::NotLeader.into());
        }
        let r: &Replica<S> = self.replicas.get(&partition).ok_or(ProduceError::NotLeader)?;
        r.read_leader(from, max_bytes, stable_only)
    }

    /// The epoch at which this broker may coordinate (serve a state machine of) `partition`
    /// now: it leads it with a valid lease and serves reads ([`Replica::serving`]).
    pub fn coordinating(&self, now: Time, partition: PartitionId) -> Result<LeaderEpoch, ProduceError> {
        if !self.lease_valid(now) {
            return Err(ProduceError::NotLeader);
        }
        self.replicas.get(&partition).ok_or(ProduceError::NotLeader)?.serving()
    }

    /// A sync job finished.
    pub fn handle_io_done(
        &mut self,
        now: Time,
        partition: PartitionId,
        job: Job<S>,
        result: Result<(), StorageError>,
        out: &mut Vec<Command<Job<S>>>,
    ) {
        let start = out.len();
        if let Some(r) = self.replicas.get_mut(&partition) {
            r.handle_io_done(now, job, result, out);
        }
        self.answer_markers(start, out);
    }

    /// Periodic work: heartbeats, then every replica's tick.
    pub fn handle_tick(&mut self, now: Time, out: &mut Vec<Command<Job<S>>>) {
        let start = out.len();
        if self.config.heartbeats && now >= self.next_heartbeat {
            self.next_heartbeat = now.plus_ms(self.config.heartbeat_ms);
            out.push(Command::Send {
                to: Peer::Controller,
                msg: Message::Heartbeat {
                    broker: self.id,
                    incarnation: self.incarnation,
                    lost: self.lost.clone(),
                    sent: now,
                },
            });
        }
        for r in self.replicas.values_mut() {
            r.handle_tick(now, out);
        }
        self.answer_markers(start, out);
    }

    /// Applies retention to every replica (see [`Replica::handle_retention`]); `wall` is the
    /// wall clock, for `retention.ms`.
    pub fn handle_retention(&mut self, now: Time, wall: skein_log::types::Timestamp, out: &mut Vec<Command<Job<S>>>) {
        let start = out.len();
        for r in self.replicas.values_mut() {
            r.handle_retention(now, wall, out);
        }
        self.answer_markers(start, out);
    }
}
