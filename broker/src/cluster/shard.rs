//! One shard of a cluster broker: a thread with its own compio runtime, a [`BrokerNode`]
//! holding the replicas this shard owns ([`owner`]), its own peer links, the requests of the
//! connections dealt to it, and (shard 0 only) the controller voter ([`super::control`]).
//!
//! Everything here is single-threaded (`Rc`, `RefCell`, `Cell`); no borrow is held across an
//! `.await`. Shards talk over unbounded `flume` channels ([`ShardMsg`]): the core's work never
//! waits for a full channel (a shard that waited on another's channel could deadlock with it),
//! and what flows is bounded upstream (connections' in-flight limits, peer links' queues).
//!
//! Routing of the core's messages: a `Fetch` or `FetchResponse` goes to the shard that owns
//! its partition; Raft and controller inputs go to shard 0's voter; the controller's decisions
//! for this broker (`HeartbeatResponse`, `PartitionState`) go to shard 0, which creates the
//! replicas they name on their owners and splits a heartbeat response by owner, so every
//! shard's `BrokerNode` gets the lease and the states of its own partitions. Sync jobs run on
//! the owning shard's blocking pool; produce replies complete requests waiting on that shard.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_channel::oneshot;
use skein_client::wire::{FetchPartition, Reader};
use skein_log::storage::{FileStorage, StorageError};

use super::control::{Control, TopicMap};
use super::peer::{self, PeerFrame, PeerLink};
use super::replicas::{create_replica, ReplicaMeta};
use super::{now, wall_clock, TICK_MS};
use crate::core::node::BrokerNode;
use crate::core::replica::Job;
use crate::core::{Command, MarkerRequest, Message, NodeId, Offset, PartitionId, Peer, ProduceError, RequestId, Time};
use crate::service::budget::{Budgets, FetchBudget};
use crate::service::conn::{self, Service};
use crate::service::{fail_stop, FetchResult, Request, Response};
use crate::BrokerConfig;

/// The shard that owns partition `p` among `shards` (partition ids are dense and assigned in
/// creation order, so consecutive partitions of a topic land on consecutive shards).
pub(crate) fn owner(p: PartitionId, shards: usize) -> usize {
    p.0 as usize % shards.max(1)
}

/// Work sent to a shard.
pub(super) enum ShardMsg {
    /// A connection to serve on this shard: a new one, or one that moved here with its first
    /// request (this shard owns what it asks for).
    Connection(conn::Connection),
    /// A message for this shard's core (already routed: its partition is owned here, or it is
    /// this shard's share of a controller decision).
    Core(Peer, Message),
    /// For shard 0: a Raft message or controller input for the voter, from broker `NodeId`.
    Voter(NodeId, Message),
    /// For shard 0: a controller decision addressed to this broker, to create replicas for
    /// and split among the shards.
    Decision(Message),
    /// For shard 0: a message from a shard's replicas to the active controller (`AlterIsr`).
    ToController(Message),
    /// Create (and open) a replica of a partition this shard owns.
    CreateReplica(ReplicaMeta),
    /// Delete this shard's replica of a partition (its topic was deleted, or it moved away).
    DropReplica(PartitionId),
    /// A client request to run here: its partitions are this shard's, or it is a control
    /// request (metadata, topics, producer ids) for shard 0.
    Request(Request, oneshot::Sender<Response>),
    /// One read pass over partitions owned here (`replica_read`, the partitions, `max_bytes`);
    /// the budget holds the bytes read until dropped.
    FetchOnce((bool, u8), Vec<FetchPartition>, u32, oneshot::Sender<(Vec<(FetchResult, bool)>, FetchBudget)>),
    /// Answered after this shard's next pump (something may have moved a high watermark).
    Wake(oneshot::Sender<()>),
    /// Log start, high watermark and log end of replicas owned here (`None`: no replica).
    Offsets(Vec<PartitionId>, oneshot::Sender<Vec<Option<ReplicaOffsets>>>),
    /// How many partitions this shard's replicas lead.
    Leading(oneshot::Sender<usize>),
    /// Which of these partitions this shard serves as leader now (replica leading, lease valid).
    Serving(Vec<PartitionId>, oneshot::Sender<Vec<bool>>),
    /// Refuse new requests, close every log cleanly and end the message loop.
    Shutdown(oneshot::Sender<()>),
}

/// One shard of a cluster broker.
pub(crate) struct Node {
    pub(super) id: NodeId,
    pub(super) shard: usize,
    pub(super) config: Arc<BrokerConfig>,
    pub(super) voters: Arc<Vec<(NodeId, SocketAddr)>>,
    /// Racks from `--voters`.
    pub(super) racks: Arc<BTreeMap<NodeId, String>>,
    /// Every shard's channel, this one's included.
    pub(super) shards: Vec<flume::Sender<ShardMsg>>,
    /// Topic names to partition ids, published by shard 0 whenever topics change.
    pub(super) topics: Arc<ArcSwap<TopicMap>>,
    pub(super) st: RefCell<State>,
    /// Fetches waiting for new data: woken after every event that may move a high watermark.
    pub(super) fetch_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Produce and fetch bytes held by this shard's client requests.
    pub(super) budgets: Budgets,
    pub(super) stopping: Cell<bool>,
    /// Consumer group coordinators of the offsets partitions this shard owns.
    pub(super) groups: super::groups::Coordinators,
    /// Transaction coordinators of the `__transaction_state` partitions this shard owns.
    pub(super) txns: super::txn::Coordinators,
    /// Table partitions this shard hosts and the table requests parked on them.
    pub(super) tables: super::tables::Tables,
}

/// A replica's log start, high watermark, log end and last stable offset.
pub(super) type ReplicaOffsets = (u64, u64, u64, u64);

pub(super) struct State {
    pub core: BrokerNode<FileStorage>,
    links: BTreeMap<NodeId, PeerLink>,
    pub pending: HashMap<RequestId, oneshot::Sender<Result<Offset, ProduceError>>>,
    next_request: u64,
    /// Transaction markers this shard's coordinators sent, by correlation.
    markers: HashMap<u64, oneshot::Sender<Result<(), ProduceError>>>,
    next_marker: u64,
    /// Shard 0 only: the controller voter and what goes with it.
    pub control: Option<Control>,
}

/// Work for [`Node::pump`].
pub(super) enum Work {
    /// A message for this shard's core.
    Node(Peer, Message),
    /// A message for the controller voter (shard 0).
    Voter(NodeId, Message),
    /// A controller decision for this broker (shard 0).
    Decision(Message),
}

thread_local! {
    /// The node of this shard's thread (for tasks that call back into it).
    static SELF: RefCell<Option<std::rc::Weak<Node>>> = const { RefCell::new(None) };
}

impl Node {
    /// A shard over `core` (its replicas opened); shard 0 gets `control`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shard: usize,
        config: Arc<BrokerConfig>,
        voters: Arc<Vec<(NodeId, SocketAddr)>>,
        racks: Arc<BTreeMap<NodeId, String>>,
        shards: Vec<flume::Sender<ShardMsg>>,
        topics: Arc<ArcSwap<TopicMap>>,
        core: BrokerNode<FileStorage>,
        control: Option<Control>,
        ip: std::net::IpAddr,
    ) -> Rc<Node> {
        let me = core.id();
        let links = voters.iter().filter(|(n, _)| *n != me).map(|&(n, a)| (n, PeerLink::start(me, ip, n, a))).collect();
        let node = Rc::new(Node {
            id: me,
            shard,
            budgets: Budgets::new(&config),
            config,
            voters,
            racks,
            shards,
            topics,
            st: RefCell::new(State {
                core,
                links,
                pending: HashMap::new(),
                next_request: 0,
                markers: HashMap::new(),
                next_marker: 0,
                control,
            }),
            fetch_waiters: RefCell::new(Vec::new()),
            stopping: Cell::new(false),
            groups: Default::default(),
            txns: Default::default(),
            tables: Default::default(),
        });
        SELF.with(|s| *s.borrow_mut() = Some(Rc::downgrade(&node)));
        node
    }

    /// The number of shards.
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Sends `msg` to shard `to` (never waits: the channels are unbounded). A shard that is
    /// gone is stopping with the process.
    pub(super) fn to_shard(&self, to: usize, msg: ShardMsg) {
        let _ = self.shards[to].send(msg);
    }

    /// Serves this shard's channel until a `Shutdown`.
    pub(super) async fn message_loop(self: Rc<Self>, rx: flume::Receiver<ShardMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            match msg {
                ShardMsg::Connection(c) => {
                    compio::runtime::spawn(conn::serve(self.clone(), c)).detach();
                }
                ShardMsg::Core(from, msg) => self.run(Work::Node(from, msg)),
                ShardMsg::Voter(from, msg) => self.run(Work::Voter(from, msg)),
                ShardMsg::Decision(msg) => self.run(Work::Decision(msg)),
                ShardMsg::ToController(msg) => {
                    let mut st = self.st.borrow_mut();
                    let mut work = VecDeque::new();
                    self.commands(&mut st, vec![Command::Send { to: Peer::Controller, msg }], &mut work);
                    self.pump(&mut st, now(), work);
                }
                ShardMsg::CreateReplica(meta) => {
                    let mut st = self.st.borrow_mut();
                    self.create_replica(&mut st, &meta);
                }
                ShardMsg::DropReplica(p) => {
                    let mut st = self.st.borrow_mut();
                    let mut work = VecDeque::new();
                    self.drop_replica(&mut st, p, &mut work);
                    self.pump(&mut st, now(), work);
                }
                ShardMsg::Request(req, reply) => {
                    let node = self.clone();
                    compio::runtime::spawn(async move {
                        let _ = reply.send(super::requests::here(node, req).await);
                    })
                    .detach();
                }
                ShardMsg::FetchOnce((replica_read, isolation), parts, max_bytes, reply) => {
                    let mut budget = FetchBudget::new(max_bytes, &self.budgets.fetch);
                    let results = self.fetch_once(replica_read, isolation, &parts, &mut budget);
                    let _ = reply.send((results, budget));
                }
                ShardMsg::Wake(tx) => self.fetch_waiters.borrow_mut().push(tx),
                ShardMsg::Offsets(ids, reply) => {
                    let _ = reply.send(self.replica_offsets(&ids));
                }
                ShardMsg::Leading(reply) => {
                    let _ = reply.send(self.leading());
                }
                ShardMsg::Serving(ids, reply) => {
                    let _ = reply.send(self.serving(&ids));
                }
                ShardMsg::Shutdown(reply) => {
                    self.stopping.set(true);
                    self.close_logs();
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    /// Partitions this shard's replicas lead.
    pub(super) fn leading(&self) -> usize {
        let st = self.st.borrow();
        st.core.replicas().filter(|(_, r)| r.state().is_some_and(|s| s.leader == Some(self.id))).count()
    }

    /// Log start, high watermark, log end and last stable offset of this shard's replicas of
    /// `ids` (`None`: none).
    pub(super) fn replica_offsets(&self, ids: &[PartitionId]) -> Vec<Option<ReplicaOffsets>> {
        let st = self.st.borrow();
        ids.iter()
            .map(|p| {
                st.core.replica(*p).map(|r| {
                    let log = r.log();
                    (log.log_start_offset().0, r.high_watermark().0, log.log_end_offset().0, r.last_stable().0)
                })
            })
            .collect()
    }

    /// A message for the core of shard `shard`: onto `work` if that is this one.
    pub(super) fn to_core(&self, shard: usize, from: Peer, msg: Message, work: &mut VecDeque<Work>) {
        if shard == self.shard {
            work.push_back(Work::Node(from, msg));
        } else {
            self.to_shard(shard, ShardMsg::Core(from, msg));
        }
    }

    /// Sends a transaction marker to `leader` (this broker included) for this shard's
    /// coordinator of `m.coordinator_partition`; the receiver gets the partition's answer (it
    /// is dropped unanswered if the message or its answer is lost: the caller's timeout).
    pub(super) fn send_marker(
        &self,
        leader: NodeId,
        mut m: MarkerRequest,
    ) -> (u64, oneshot::Receiver<Result<(), ProduceError>>) {
        let (tx, rx) = oneshot::channel();
        let mut st = self.st.borrow_mut();
        st.next_marker += 1;
        m.correlation = st.next_marker;
        m.coordinator = self.id;
        let correlation = m.correlation;
        st.markers.insert(correlation, tx);
        let mut work = VecDeque::new();
        let out = vec![Command::Send { to: Peer::Node(leader), msg: Message::TxnMarker(m) }];
        self.commands(&mut st, out, &mut work);
        self.pump(&mut st, now(), work);
        (correlation, rx)
    }

    /// Forgets a marker's waiter (its caller gave up on it).
    pub(super) fn forget_marker(&self, correlation: u64) {
        self.st.borrow_mut().markers.remove(&correlation);
    }

    /// Which of `ids` this shard serves as leader now: the replica leads and the lease is valid.
    pub(super) fn serving(&self, ids: &[PartitionId]) -> Vec<bool> {
        let st = self.st.borrow();
        let lease = st.core.lease_valid(now());
        ids.iter().map(|p| lease && st.core.replica(*p).is_some_and(|r| r.leader_epoch().is_some())).collect()
    }

    fn run(&self, w: Work) {
        let mut st = self.st.borrow_mut();
        self.pump(&mut st, now(), VecDeque::from([w]));
    }

    /// Ticks this shard's core (heartbeats on shard 0, fetches, ISR checks, retention) and, on
    /// shard 0, the voter.
    pub(super) async fn tick_loop(self: Rc<Self>) {
        loop {
            compio::time::sleep(Duration::from_millis(TICK_MS)).await;
            if self.stopping.get() {
                return;
            }
            let t = now();
            let mut st = self.st.borrow_mut();
            let mut work = VecDeque::new();
            let mut out = Vec::new();
            st.core.handle_tick(t, &mut out);
            st.core.handle_retention(t, wall_clock(), &mut out);
            self.commands(&mut st, out, &mut work);
            if st.control.is_some() {
                self.control_tick(&mut st, t, &mut work);
            }
            self.pump(&mut st, t, work);
        }
    }

    /// Runs queued work (and the work it makes) to completion, then wakes waiting fetches.
    pub(super) fn pump(&self, st: &mut State, t: Time, mut work: VecDeque<Work>) {
        while let Some(w) = work.pop_front() {
            match w {
                Work::Node(from, msg) => {
                    let mut out = Vec::new();
                    st.core.handle_message(t, from, msg, &mut out);
                    self.commands(st, out, &mut work);
                }
                Work::Voter(from, msg) => {
                    let Some(control) = st.control.as_mut() else {
                        tracing::error!(shard = self.shard, "a controller message reached a shard without the voter");
                        continue;
                    };
                    let mut out = Vec::new();
                    control.voter.handle_message(t, from, msg, &mut out);
                    self.voter_out(st, out, &mut work);
                }
                Work::Decision(msg) => self.decision(st, msg, &mut work),
            }
        }
        for w in self.fetch_waiters.borrow_mut().drain(..) {
            let _ = w.send(());
        }
        if st.control.is_some() {
            self.after_pump(st);
        }
    }

    fn send_peer(&self, st: &State, to: NodeId, from_controller: bool, msg: Message) {
        if let Some(link) = st.links.get(&to) {
            match peer::try_encode_frame(&PeerFrame { from: self.id, from_controller, msg }) {
                Ok(frame) => link.send(frame),
                // Dropped like a lost message, which Raft and replication retry; never sent
                // as an empty stand-in, which would decode as another message.
                Err(e) => tracing::error!(%to, error = %e, "an inter-broker message does not encode; not sent"),
            }
        }
    }

    /// Executes the core's commands.
    pub(super) fn commands(&self, st: &mut State, out: Vec<Command<Job<FileStorage>>>, work: &mut VecDeque<Work>) {
        for c in out {
            match c {
                Command::Send { to: Peer::Node(n), msg } if n == self.id => self.route(Peer::Node(n), msg, work),
                Command::Send { to: Peer::Node(n), msg } => self.send_peer(st, n, false, msg),
                Command::Send { to: Peer::Controller, msg } => {
                    let Some(control) = st.control.as_ref() else {
                        self.to_shard(0, ShardMsg::ToController(msg));
                        continue;
                    };
                    match control.voter.leader() {
                        Some(l) if l == self.id => work.push_back(Work::Voter(self.id, msg)),
                        Some(l) => self.send_peer(st, l, false, msg),
                        None => {
                            // No known active controller: every voter gets it (only the active
                            // one acts on controller inputs).
                            for &(v, _) in self.voters.iter() {
                                if v == self.id {
                                    work.push_back(Work::Voter(v, msg.clone()));
                                } else {
                                    self.send_peer(st, v, false, msg.clone());
                                }
                            }
                        }
                    }
                }
                Command::Io { partition, job } => self.spawn_io(partition, job),
                Command::ProduceReply { request, result } => {
                    if let Some(tx) = st.pending.remove(&request) {
                        let _ = tx.send(result);
                    }
                }
                Command::MarkerDone(m) => {
                    if let Some(tx) = st.markers.remove(&m.correlation) {
                        let _ = tx.send(m.result);
                    }
                }
                Command::Fail { reason } => fail_stop("a replicated partition", &reason),
            }
        }
    }

    /// Routes the voter's output (shard 0): Raft messages to voters, decisions to brokers.
    pub(super) fn voter_out(&self, st: &mut State, out: Vec<(NodeId, Message)>, work: &mut VecDeque<Work>) {
        for (to, msg) in out {
            let raft = matches!(msg, Message::Raft(_));
            if to == self.id {
                work.push_back(if raft { Work::Voter(to, msg) } else { Work::Decision(msg) });
            } else {
                self.send_peer(st, to, !raft, msg);
            }
        }
    }

    /// Routes a message addressed to this broker to the shard that handles it (this one:
    /// onto `work`). `from` is the sending broker, or the controller for decisions.
    fn route(&self, from: Peer, msg: Message, work: &mut VecDeque<Work>) {
        let to_shard = |p: PartitionId| owner(p, self.shard_count());
        match msg {
            Message::Raft(_)
            | Message::Heartbeat { .. }
            | Message::AlterIsr { .. }
            | Message::CreateTopic { .. }
            | Message::ControlledShutdown { .. }
            | Message::Reassign { .. }
            | Message::Sealed { .. }
            | Message::Load { .. }
            | Message::Split { .. }
            | Message::Merge { .. }
            | Message::DeleteTopic { .. } => {
                let Peer::Node(sender) = from else { return };
                if self.shard == 0 {
                    work.push_back(Work::Voter(sender, msg));
                } else {
                    self.to_shard(0, ShardMsg::Voter(sender, msg));
                }
            }
            Message::Fetch(ref f) => self.to_core(to_shard(f.partition), from, msg, work),
            Message::TxnMarker(ref m) => self.to_core(to_shard(m.partition), from, msg, work),
            Message::TxnMarkerResult(ref m) => self.to_core(to_shard(m.coordinator_partition), from, msg, work),
            Message::FetchResponse(ref r) => self.to_core(to_shard(r.partition()), from, msg, work),
            Message::HeartbeatResponse { .. } | Message::PartitionState(_) => {
                if self.shard == 0 {
                    work.push_back(Work::Decision(msg));
                } else {
                    self.to_shard(0, ShardMsg::Decision(msg));
                }
            }
        }
    }

    /// Creates and opens a replica this shard owns (named by a controller decision).
    pub(super) fn create_replica(&self, st: &mut State, meta: &ReplicaMeta) {
        let p = PartitionId(meta.partition);
        if st.core.replica(p).is_some() {
            return;
        }
        match create_replica(&self.config, self.id, meta) {
            Ok(r) => {
                tracing::info!(partition = %p, topic = %meta.topic, index = meta.index, shard = self.shard, "replica created");
                st.core.add_replica(r);
            }
            Err(e) => fail_stop("creating a replica", &format!("{e:#}")),
        }
    }

    /// Deletes this shard's replica of `p` (log and directory).
    pub(super) fn drop_replica(&self, st: &mut State, p: PartitionId, work: &mut VecDeque<Work>) {
        let mut out = Vec::new();
        if let Some(log) = st.core.remove_replica(p, &mut out) {
            match log.delete() {
                Ok(()) => tracing::info!(partition = %p, "replica removed"),
                Err(e) => fail_stop("deleting a replica", &e),
            }
        }
        self.commands(st, out, work);
    }

    /// Runs a replica's write or sync job off the shard (`storage_io`), then reports it.
    fn spawn_io(&self, partition: PartitionId, job: Job<FileStorage>) {
        let Some(me) = SELF.with(|s| s.borrow().clone()) else { return };
        compio::runtime::spawn(async move {
            let (job, result) = super::storage_io::run(job).await;
            let Some(node) = me.upgrade() else { return };
            node.io_done(partition, job, result);
        })
        .detach();
    }

    fn io_done(&self, partition: PartitionId, job: Job<FileStorage>, result: Result<(), StorageError>) {
        let t = now();
        let mut st = self.st.borrow_mut();
        let mut out = Vec::new();
        st.core.handle_io_done(t, partition, job, result, &mut out);
        let mut work = VecDeque::new();
        self.commands(&mut st, out, &mut work);
        self.pump(&mut st, t, work);
    }

    /// A frame from a peer broker, received on this shard's connection.
    fn peer_frame(&self, frame: PeerFrame) {
        let PeerFrame { from, from_controller, msg } = frame;
        if from == self.id || !self.voters.iter().any(|(n, _)| *n == from) {
            tracing::warn!(%from, "inter-broker message from an unknown node; dropped");
            return;
        }
        // A decision is taken only from a sender's voter.
        if matches!(msg, Message::HeartbeatResponse { .. } | Message::PartitionState(_)) && !from_controller {
            return;
        }
        let mut work = VecDeque::new();
        self.route(Peer::Node(from), msg, &mut work);
        if !work.is_empty() {
            let mut st = self.st.borrow_mut();
            self.pump(&mut st, now(), work);
        }
    }

    /// A fresh request id for the core.
    pub(super) fn request_id(st: &mut State) -> RequestId {
        st.next_request += 1;
        RequestId(st.next_request)
    }

    /// Closes every log of this shard cleanly (indexes written), so the next start need not
    /// scan.
    pub(super) fn close_logs(&self) {
        let mut st = self.st.borrow_mut();
        let ids: Vec<PartitionId> = st.core.replicas().map(|(p, _)| *p).collect();
        let mut out = Vec::new();
        for p in ids {
            if let Some(log) = st.core.remove_replica(p, &mut out) {
                if let Err(e) = log.close(now().timestamp()) {
                    tracing::warn!(partition = %p, error = %e, "closing a log failed; the next start recovers it");
                }
            }
        }
        for c in out {
            if let Command::ProduceReply { request, result } = c {
                if let Some(tx) = st.pending.remove(&request) {
                    let _ = tx.send(result);
                }
            }
        }
    }
}

impl Service for Node {
    fn max_in_flight(&self) -> usize {
        self.config.max_in_flight
    }
    fn max_frame_bytes(&self) -> u32 {
        self.config.max_frame_bytes
    }
    fn handle(self: Rc<Self>, req: Request) -> Pin<Box<dyn Future<Output = Response>>> {
        Box::pin(super::requests::dispatch(self, req))
    }
    fn may_move(&self) -> bool {
        self.shard_count() > 1
    }
    fn home(&self, req: &Request) -> Option<usize> {
        super::requests::home(self, req)
    }
    fn move_to(&self, to: usize, c: conn::Connection) {
        self.to_shard(to, ShardMsg::Connection(c));
    }
    fn peer_message(self: &Rc<Self>, from_addr: Option<SocketAddr>, body: Reader) -> bool {
        match skein_client::wire::decode_exact::<PeerFrame>(body) {
            Ok(frame) => {
                // Inter-broker traffic is taken only from the brokers of --voters: the frame's
                // sender must be a voter, and the connection must come from that voter's own
                // address (peer links bind their source address to it).
                let expected = self.voters.iter().find(|(n, _)| *n == frame.from).map(|(_, a)| a.ip());
                if expected.is_none() || from_addr.map(|a| a.ip()) != expected {
                    tracing::warn!(claimed = %frame.from, ?from_addr, ?expected,
                        "closing connection: inter-broker message not from the claimed voter's address");
                    return false;
                }
                self.peer_frame(frame);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "closing connection: undecodable inter-broker message");
                false
            }
        }
    }
}
