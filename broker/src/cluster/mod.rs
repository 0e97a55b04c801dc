//! Cluster mode (`--voters`): the sans-IO core ([`crate::core`]) driven by a real runtime.
//!
//! One broker process runs, on one compio runtime thread, its [`BrokerNode`] (partition
//! replicas, controller session and lease) and its [`ControllerVoter`] (the Raft quorum's
//! member, whose log is on disk: `raftlog`). Everything the core asks for is done here:
//! messages go to peers over `peer` links (one outgoing TCP connection per peer, from this
//! broker's own address), sync jobs run on blocking threads and report back, produce replies
//! complete the waiting client requests. Client requests (the same wire protocol as the
//! single-node broker) become core calls: produce → `handle_produce`, fetch →
//! `read_committed` (the leader, with a valid lease, below its high watermark).
//!
//! Time is `CLOCK_MONOTONIC` in microseconds: leases are compared only with the same
//! broker's clock, and a new active controller restarts every session on its own clock.
//!
//! At startup the voter loads its controller snapshot, if any (`raftlog::start_voter`), and
//! replays the Raft log's entries after it, then applies what was committed while this broker
//! was down. Those are old decisions: the controller logs them at debug level only
//! ([`crate::core::controller::Narration`]), until this process's own first heartbeat is
//! applied, and this module logs summary lines instead (snapshot index and entries replayed
//! from disk; caught up).
//!
//! Retention runs in the core (`BrokerNode::handle_retention`, from the tick loop, with the wall
//! clock for `retention.ms`).
//!
//! Limits of this first version (ARCHITECTURE.md): every replicated partition of a broker is
//! served by this one thread (no thread-per-core yet).

mod peer;
mod raftlog;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_channel::oneshot;
use serde::{Deserialize, Serialize};
use skein_client::wire::{
    BrokerInfo, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsResponse, DescribeTopicsRequest,
    DescribeTopicsResponse, ErrorCode, FetchRequest as WireFetch, InitProducerIdResponse, ListOffsetsPartitionResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, PartitionDescription,
    PartitionMetadata, ProducePartitionResponse, ProduceRequest, ProduceResponse, Reader, TopicConfig,
    TopicDescription, TopicMetadata, TopicResult, EARLIEST, LATEST,
};
use skein_log::storage::{FileStorage, StorageError};
use skein_log::types::Timestamp;
use skein_log::Log;

use crate::core::controller::{Controller, ControllerConfig, Topic, PARTITIONS_PER_TOPIC_MAX};
use crate::core::node::{BrokerNode, NodeConfig};
use crate::core::quorum::{ControllerVoter, QuorumConfig};
use crate::core::replica::{Job, Plant, Replica, ReplicaConfig};
use crate::core::{
    Acks, Command, LeaderEpoch, Message, NodeId, Offset, PartitionId, Peer, ProduceError, ReadFailure, RequestId, Time,
};
use crate::meta::{self, ProducerIds};
use crate::service::budget::{Budgets, FetchBudget};
use crate::service::conn::{self, Service};
use crate::service::{api_versions, fail_stop, fetch_response, split_batches, FetchResult, Request, Response};
use crate::BrokerConfig;
use peer::{PeerFrame, PeerLink};

/// Topic configs the cluster understands besides the log's own (`meta::log_config`).
const MIN_ISR: &str = "min.insync.replicas";
const UNCLEAN: &str = "unclean.leader.election.enable";

/// How often the core and the voter tick.
const TICK_MS: u64 = 5;

/// Parses `--voters`: `ID@HOST:PORT[/RACK],...` (racks: [`parse_racks`]).
pub fn parse_voters(s: &str) -> Result<Vec<(NodeId, SocketAddr)>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let item = item.split_once('/').map_or(item, |(voter, _)| voter);
        let (id, addr) = item.split_once('@').with_context(|| format!("voter '{item}' is not ID@HOST:PORT"))?;
        let id: u32 = id.parse().with_context(|| format!("voter id '{id}'"))?;
        anyhow::ensure!(id > 0, "voter ids start at 1 (0 means no leader on the wire)");
        let addr: SocketAddr = addr.parse().with_context(|| format!("voter address '{addr}'"))?;
        anyhow::ensure!(out.iter().all(|(n, _): &(NodeId, SocketAddr)| n.0 != id), "voter {id} listed twice");
        out.push((NodeId(id), addr));
    }
    anyhow::ensure!(!out.is_empty(), "--voters lists no voter");
    out.sort();
    Ok(out)
}

/// The racks `--voters` names (`ID@HOST:PORT/RACK`); a voter without one is not listed.
pub fn parse_racks(s: &str) -> BTreeMap<NodeId, String> {
    s.split(',')
        .filter_map(|item| {
            let (voter, rack) = item.trim().split_once('/')?;
            let id = voter.split_once('@')?.0.parse().ok()?;
            Some((NodeId(id), rack.trim().to_owned())).filter(|(_, r)| !r.is_empty())
        })
        .collect()
}

/// The monotonic clock in microseconds (the same origin for every process on the machine).
/// The wall clock in milliseconds, for `retention.ms` (record timestamps are wall-clock).
fn wall_clock() -> skein_log::types::Timestamp {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    skein_log::types::Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn now() -> Time {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Time(u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000)
}

/// What a partition directory records about itself (`replica.json`), so a restart reopens
/// it with its topic's settings before the controller's log is replayed.
#[derive(Serialize, Deserialize)]
struct ReplicaMeta {
    partition: u32,
    topic: String,
    index: u32,
    replication: u16,
    configs: BTreeMap<String, String>,
}

/// Runs a cluster broker until `shutdown` resolves. `on_ready` gets the bound address once
/// the broker listens.
pub fn run<F>(config: BrokerConfig, shutdown: F, on_ready: impl FnOnce(SocketAddr)) -> Result<()>
where
    F: Future<Output = ()> + 'static,
{
    let voters = parse_voters(config.voters.as_deref().unwrap_or_default())?;
    let me = NodeId(config.node_id);
    let Some(&(_, my_addr)) = voters.iter().find(|(n, _)| *n == me) else {
        bail!("--node-id {} is not one of the --voters", config.node_id);
    };
    if config.lease_ms >= config.session_timeout_ms {
        bail!(
            "--lease-ms {} must be below --session-timeout-ms {}: a fenced leader must stop before another is elected",
            config.lease_ms,
            config.session_timeout_ms
        );
    }
    if config.replica_lag_max_ms < 2 * config.replica_fetch_wait_max_ms + 100 {
        bail!(
            "--replica-lag-max-ms {} must be at least twice --replica-fetch-wait-max-ms {} plus 100: a follower whose \
             fetch the leader holds would otherwise leave the ISR while idle",
            config.replica_lag_max_ms,
            config.replica_fetch_wait_max_ms
        );
    }
    // Bound first, so a broker that cannot listen leaves no data directory behind; the lock
    // is held until this function returns.
    let listener = TcpListener::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let _data_dir = crate::datadir::DataDirLock::acquire(&config.data_dir)?;
    let addr = listener.local_addr()?;
    let runtime = compio::runtime::Runtime::new().context("starting a compio runtime")?;
    runtime.block_on(async move {
        let node = Node::open(config, me, my_addr.ip(), voters)?;
        SELF.with(|s| *s.borrow_mut() = Some(Rc::downgrade(&node)));
        let (tx, rx) = flume::bounded::<std::net::TcpStream>(1024);
        std::thread::Builder::new().name("acceptor".into()).spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if tx.send(stream).is_err() {
                            return;
                        }
                    }
                    // Out of descriptors and the like: back off (this is the acceptor's own
                    // thread, not the runtime's) instead of spinning on the same error.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
        {
            let node = node.clone();
            compio::runtime::spawn(async move {
                let count = Arc::new(AtomicUsize::new(0));
                while let Ok(stream) = rx.recv_async().await {
                    if count.load(Ordering::Relaxed) >= node.config.max_connections {
                        tracing::warn!("connection limit reached; closing new connection");
                        continue;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    compio::runtime::spawn(conn::serve(node.clone(), stream, count.clone())).detach();
                }
            })
            .detach();
        }
        compio::runtime::spawn(node.clone().tick_loop()).detach();
        on_ready(addr);
        shutdown.await;
        node.controlled_shutdown().await;
        node.stopping.set(true);
        node.close_logs();
        Ok(())
    })
}

/// One cluster broker.
pub(crate) struct Node {
    id: NodeId,
    config: BrokerConfig,
    voters: Vec<(NodeId, SocketAddr)>,
    /// Racks from `--voters`.
    racks: BTreeMap<NodeId, String>,
    st: RefCell<State>,
    producer_ids: RefCell<ProducerIds>,
    /// Fetches waiting for new data: woken after every event that may move a high watermark.
    fetch_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Produce and fetch bytes held by client requests (`--max-produce-bytes`,
    /// `--max-fetch-bytes`: this one thread is the broker's only shard).
    budgets: Budgets,
    stopping: Cell<bool>,
}

struct State {
    core: BrokerNode<FileStorage>,
    voter: ControllerVoter,
    links: BTreeMap<NodeId, PeerLink>,
    pending: HashMap<RequestId, oneshot::Sender<Result<Offset, ProduceError>>>,
    next_request: u64,
    /// The voter's controller applies history and "caught up" is not logged yet.
    replaying: bool,
}

/// Work for [`Node::pump`].
enum Work {
    /// A message for this broker's core.
    Node(Peer, Message),
    /// A message for this broker's controller voter.
    Voter(NodeId, Message),
}

impl Node {
    fn open(config: BrokerConfig, me: NodeId, ip: IpAddr, voters: Vec<(NodeId, SocketAddr)>) -> Result<Rc<Node>> {
        let data = config.data_dir.clone();
        let incarnation = next_incarnation(&data)?;
        let ids: Vec<NodeId> = voters.iter().map(|(n, _)| *n).collect();
        let controller_config = ControllerConfig {
            session_timeout_ms: config.session_timeout_ms,
            handover_ms: config.lease_ms + 50,
            rebalance_interval_ms: (config.leader_rebalance_interval_ms > 0)
                .then_some(config.leader_rebalance_interval_ms),
        };
        let mut controller = Controller::new(controller_config, &ids, &[]);
        controller.replay_until(me, incarnation);
        let ticks = (config.election_timeout_ms / TICK_MS).max(3) as usize;
        let quorum = QuorumConfig {
            election_ticks: ticks,
            election_ticks_max: 2 * ticks,
            heartbeat_ticks: (ticks / 5).max(1),
            ..QuorumConfig::default()
        };
        let (voter, _) = raftlog::start_voter(&data.join("controller"), me, &ids, quorum, controller, now())?;
        let replicas = open_replicas(&config, me)?;
        tracing::info!(node = %me, incarnation, replicas = replicas.len(), "cluster broker starting");
        let node_config = NodeConfig { heartbeat_ms: config.heartbeat_ms, lease_ms: config.lease_ms };
        let core = BrokerNode::new(me, incarnation, Vec::new(), node_config, replicas, false);
        let links = voters.iter().filter(|(n, _)| *n != me).map(|&(n, a)| (n, PeerLink::start(me, ip, n, a))).collect();
        let producer_ids = ProducerIds::load(&data)?;
        let racks = parse_racks(config.voters.as_deref().unwrap_or_default());
        Ok(Rc::new(Node {
            id: me,
            budgets: Budgets::new(&config),
            config,
            voters,
            racks,
            st: RefCell::new(State { core, voter, links, pending: HashMap::new(), next_request: 0, replaying: true }),
            producer_ids: RefCell::new(producer_ids),
            fetch_waiters: RefCell::new(Vec::new()),
            stopping: Cell::new(false),
        }))
    }

    /// Asks the controller to move leadership away (again every 200 ms) until this broker
    /// leads no partition or the shutdown grace period ends; clients meanwhile get NOT_LEADER
    /// and move to the new leaders.
    async fn controlled_shutdown(&self) {
        let grace = now().plus_ms(self.config.shutdown_grace_ms);
        tracing::info!("controlled shutdown: moving leadership away");
        loop {
            let t = now();
            {
                let mut st = self.st.borrow_mut();
                let leads =
                    st.core.replicas().filter(|(_, r)| r.state().is_some_and(|s| s.leader == Some(self.id))).count();
                if leads == 0 || t >= grace {
                    tracing::info!(still_leading = leads, "controlled shutdown done; stopping");
                    return;
                }
                let msg = Message::ControlledShutdown { broker: self.id, incarnation: st.core.incarnation() };
                let mut work = VecDeque::new();
                self.commands(&mut st, vec![Command::Send { to: Peer::Controller, msg }], &mut work);
                self.pump(&mut st, t, work);
            }
            compio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Closes every log cleanly (indexes written), so the next start need not scan.
    fn close_logs(&self) {
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

    async fn tick_loop(self: Rc<Self>) {
        loop {
            compio::time::sleep(Duration::from_millis(TICK_MS)).await;
            let t = now();
            let mut st = self.st.borrow_mut();
            let mut work = VecDeque::new();
            let mut out = Vec::new();
            st.core.handle_tick(t, &mut out);
            st.core.handle_retention(t, wall_clock(), &mut out);
            self.commands(&mut st, out, &mut work);
            let mut vout = Vec::new();
            st.voter.handle_tick(t, &mut vout);
            self.voter_out(&mut st, vout, &mut work);
            self.drop_deleted(&mut st, &mut work);
            self.pump(&mut st, t, work);
        }
    }

    /// Runs queued work (and the work it makes) to completion.
    fn pump(&self, st: &mut State, t: Time, mut work: VecDeque<Work>) {
        while let Some(w) = work.pop_front() {
            match w {
                Work::Node(from, msg) => {
                    if from == Peer::Controller {
                        self.ensure_replicas(st, &msg);
                    }
                    let mut out = Vec::new();
                    st.core.handle_message(t, from, msg, &mut out);
                    self.commands(st, out, &mut work);
                }
                Work::Voter(from, msg) => {
                    let mut out = Vec::new();
                    st.voter.handle_message(t, from, msg, &mut out);
                    self.voter_out(st, out, &mut work);
                }
            }
        }
        for w in self.fetch_waiters.borrow_mut().drain(..) {
            let _ = w.send(());
        }
        if st.replaying && !st.voter.controller().replaying() {
            st.replaying = false;
            Self::log_caught_up(&st.voter);
        }
    }

    /// The voter applied this process's first heartbeat: the controller's decisions from here
    /// on are logged as they are applied.
    fn log_caught_up(voter: &ControllerVoter) {
        // The heartbeat was applied in the batch that ended at this index, not necessarily last.
        let index = voter.applied();
        let decisions = voter.controller().decisions_replayed();
        if decisions == 0 {
            // Nothing was held back (a new broker, usually).
            tracing::debug!(index, "controller log caught up");
            return;
        }
        tracing::info!(
            index,
            decisions_replayed = decisions,
            "controller log caught up by index {index}; {decisions} earlier decisions were logged at debug level only"
        );
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
    fn commands(&self, st: &mut State, out: Vec<Command<Job<FileStorage>>>, work: &mut VecDeque<Work>) {
        for c in out {
            match c {
                Command::Send { to: Peer::Node(n), msg } if n == self.id => {
                    work.push_back(Work::Node(Peer::Node(n), msg))
                }
                Command::Send { to: Peer::Node(n), msg } => self.send_peer(st, n, false, msg),
                Command::Send { to: Peer::Controller, msg } => match st.voter.leader() {
                    Some(l) if l == self.id => work.push_back(Work::Voter(self.id, msg)),
                    Some(l) => self.send_peer(st, l, false, msg),
                    None => {
                        // No known active controller: every voter gets it (only the active
                        // one acts on controller inputs).
                        for &(v, _) in &self.voters {
                            if v == self.id {
                                work.push_back(Work::Voter(v, msg.clone()));
                            } else {
                                self.send_peer(st, v, false, msg.clone());
                            }
                        }
                    }
                },
                Command::Sync { partition, job } => self.spawn_sync(partition, job),
                Command::ProduceReply { request, result } => {
                    if let Some(tx) = st.pending.remove(&request) {
                        let _ = tx.send(result);
                    }
                }
                Command::Fail { reason } => fail_stop("a replicated partition", &reason),
            }
        }
    }

    /// Routes the voter's output: Raft messages to voters, controller decisions to brokers.
    fn voter_out(&self, st: &mut State, out: Vec<(NodeId, Message)>, work: &mut VecDeque<Work>) {
        for (to, msg) in out {
            let raft = matches!(msg, Message::Raft(_));
            if to == self.id {
                work.push_back(if raft { Work::Voter(to, msg) } else { Work::Node(Peer::Controller, msg) });
            } else {
                self.send_peer(st, to, !raft, msg);
            }
        }
    }

    fn spawn_sync(&self, partition: PartitionId, job: Job<FileStorage>) {
        let Some(me) = self.weak_self() else { return };
        compio::runtime::spawn(async move {
            let done = compio::runtime::spawn_blocking(move || {
                let result = job.run();
                (job, result)
            })
            .await;
            let Some(node) = me.upgrade() else { return };
            match done {
                Ok((job, result)) => node.sync_done(partition, job, result),
                Err(_) => fail_stop("a sync job", &"the sync thread panicked"),
            }
        })
        .detach();
    }

    fn sync_done(&self, partition: PartitionId, job: Job<FileStorage>, result: Result<(), StorageError>) {
        let t = now();
        let mut st = self.st.borrow_mut();
        let mut out = Vec::new();
        st.core.handle_sync_done(t, partition, job, result, &mut out);
        let mut work = VecDeque::new();
        self.commands(&mut st, out, &mut work);
        self.pump(&mut st, t, work);
    }

    fn weak_self(&self) -> Option<std::rc::Weak<Node>> {
        SELF.with(|s| s.borrow().clone())
    }

    /// A frame from a peer broker.
    fn peer_frame(&self, frame: PeerFrame) {
        let PeerFrame { from, from_controller, msg } = frame;
        if from == self.id || !self.voters.iter().any(|(n, _)| *n == from) {
            tracing::warn!(%from, "inter-broker message from an unknown node; dropped");
            return;
        }
        let work = match msg {
            Message::Raft(_)
            | Message::Heartbeat { .. }
            | Message::AlterIsr { .. }
            | Message::CreateTopic { .. }
            | Message::ControlledShutdown { .. }
            | Message::Reassign { .. }
            | Message::DeleteTopic { .. } => Work::Voter(from, msg),
            Message::Fetch(_) | Message::FetchResponse(_) => Work::Node(Peer::Node(from), msg),
            Message::HeartbeatResponse { .. } | Message::PartitionState(_) if from_controller => {
                Work::Node(Peer::Controller, msg)
            }
            Message::HeartbeatResponse { .. } | Message::PartitionState(_) => return,
        };
        let t = now();
        let mut st = self.st.borrow_mut();
        self.pump(&mut st, t, VecDeque::from([work]));
    }

    /// Opens the logs of partitions newly assigned to this broker (named in controller
    /// messages) before the core sees their state.
    fn ensure_replicas(&self, st: &mut State, msg: &Message) {
        let states = match msg {
            Message::HeartbeatResponse { partitions, .. } => partitions.iter().collect::<Vec<_>>(),
            Message::PartitionState(s) => vec![s],
            _ => return,
        };
        for s in states {
            if !s.replicas.contains(&self.id) || st.core.replica(s.partition).is_some() {
                continue;
            }
            // The active controller committed the topic; this voter may not have applied it
            // yet: then the next heartbeat response brings the partition again.
            let Some((name, topic)) = topic_of(st.voter.controller(), s.partition) else { continue };
            let meta = ReplicaMeta {
                partition: s.partition.0,
                topic: name.clone(),
                index: s.partition.0 - topic.first.0,
                replication: topic.replication,
                configs: topic.configs.iter().cloned().collect(),
            };
            match create_replica(&self.config, self.id, &meta) {
                Ok(r) => {
                    tracing::info!(partition = %s.partition, topic = %name, index = meta.index, "replica created");
                    st.core.add_replica(r);
                }
                Err(e) => fail_stop("creating a replica", &format!("{e:#}")),
            }
        }
    }

    fn request_id(st: &mut State) -> RequestId {
        st.next_request += 1;
        RequestId(st.next_request)
    }

    async fn dispatch(self: Rc<Self>, req: Request) -> Response {
        if self.stopping.get() {
            return Response::Error(ErrorCode::SHUTTING_DOWN);
        }
        match req {
            Request::ApiVersions => Response::ApiVersions(api_versions()),
            Request::Metadata(r) => Response::Metadata(self.metadata(r)),
            Request::CreateTopics(r) => Response::CreateTopics(self.create_topics(r).await),
            Request::DeleteTopics(r) => {
                let mut results = Vec::with_capacity(r.names.len());
                for name in r.names {
                    let (error, message) = match self.delete_topic(&name).await {
                        Ok(()) => (ErrorCode::NONE, String::new()),
                        Err((code, msg)) => (code, msg),
                    };
                    results.push(TopicResult { name, error, message });
                }
                Response::DeleteTopics(DeleteTopicsResponse { results })
            }
            Request::DescribeTopics(r) => Response::DescribeTopics(self.describe(r)),
            Request::ReassignPartition(r) => {
                let (error, message) = match self.reassign(r).await {
                    Ok(()) => (ErrorCode::NONE, String::new()),
                    Err((code, msg)) => (code, msg),
                };
                Response::ReassignPartition(skein_client::wire::ReassignPartitionResponse { error, message })
            }
            Request::Produce(r) => self.produce(r).await,
            Request::Fetch(r) => self.fetch(r).await,
            Request::ListOffsets(r) => Response::ListOffsets(self.list_offsets(r)),
            Request::InitProducerId(r) => {
                let fail = |error| InitProducerIdResponse { error, producer_id: -1, producer_epoch: -1 };
                if r.transactional_id.is_some() {
                    return Response::InitProducerId(fail(ErrorCode::INVALID_REQUEST));
                }
                // Ids are unique per broker (persisted blocks) and carry the broker id in
                // their high bits, so they are unique in the cluster.
                let id = self.producer_ids.borrow_mut().allocate();
                Response::InitProducerId(match id {
                    Ok(id) => InitProducerIdResponse {
                        error: ErrorCode::NONE,
                        producer_id: (i64::from(self.id.0) << 40) | id,
                        producer_epoch: 0,
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "allocating a producer id failed");
                        fail(ErrorCode::STORAGE_ERROR)
                    }
                })
            }
        }
    }

    fn brokers(&self) -> Vec<BrokerInfo> {
        let rack = |n: &NodeId| self.racks.get(n).cloned().unwrap_or_default();
        self.voters
            .iter()
            .map(|(n, a)| BrokerInfo { node_id: n.0, host: a.ip().to_string(), port: a.port(), rack: rack(n) })
            .collect()
    }

    fn metadata(&self, req: MetadataRequest) -> MetadataResponse {
        let st = self.st.borrow();
        let c = st.voter.controller();
        let names: Vec<String> = req.topics.unwrap_or_else(|| c.topics().keys().cloned().collect());
        let topics = names
            .into_iter()
            .map(|name| match c.topics().get(&name) {
                None => TopicMetadata { name, error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, partitions: vec![] },
                Some(t) => {
                    let partitions = (0..t.partitions)
                        .filter_map(|i| {
                            let (error, leader, leader_epoch, replicas, isr) =
                                wire_state(c.partition(t.partition(i)?)?);
                            Some(PartitionMetadata { partition: i, error, leader, leader_epoch, replicas, isr })
                        })
                        .collect();
                    TopicMetadata { name, error: ErrorCode::NONE, partitions }
                }
            })
            .collect();
        MetadataResponse { brokers: self.brokers(), controller: st.voter.leader().map_or(0, |l| l.0), topics }
    }

    fn describe(&self, req: DescribeTopicsRequest) -> DescribeTopicsResponse {
        let st = self.st.borrow();
        let c = st.voter.controller();
        let names: Vec<String> =
            if req.names.is_empty() { c.topics().keys().cloned().collect() } else { req.names.clone() };
        let topics = names
            .into_iter()
            .map(|name| {
                let Some(t) = c.topics().get(&name) else {
                    return TopicDescription {
                        name,
                        error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                        configs: vec![],
                        partitions: vec![],
                    };
                };
                let partitions = (0..t.partitions)
                    .filter_map(|i| {
                        let p = t.partition(i)?;
                        let s = c.partition(p)?;
                        // Offsets are this broker's replica's (the leader's when asked there).
                        let (log_start, hw, log_end) = st.core.replica(p).map_or((0, 0, 0), |r| {
                            (r.log().log_start_offset().0, r.high_watermark().0, r.log().log_end_offset().0)
                        });
                        let (error, leader, leader_epoch, replicas, isr) = wire_state(s);
                        Some(PartitionDescription {
                            partition: i,
                            error,
                            leader,
                            leader_epoch,
                            replicas,
                            isr,
                            log_start,
                            high_watermark: hw,
                            log_end,
                        })
                    })
                    .collect();
                let configs = t.configs.iter().map(|(k, v)| TopicConfig { key: k.clone(), value: v.clone() }).collect();
                TopicDescription { name, error: ErrorCode::NONE, configs, partitions }
            })
            .collect();
        DescribeTopicsResponse { topics }
    }

    async fn create_topics(&self, req: CreateTopicsRequest) -> CreateTopicsResponse {
        let mut results = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let (error, message) = match self.create_one(&t).await {
                Ok(()) => (ErrorCode::NONE, String::new()),
                Err((code, msg)) => (code, msg),
            };
            results.push(TopicResult { name: t.name, error, message });
        }
        CreateTopicsResponse { results }
    }

    async fn create_one(&self, t: &skein_client::wire::NewTopic) -> Result<(), (ErrorCode, String)> {
        meta::validate_name(&t.name)
            .map_err(|c| (c, format!("invalid topic name '{}'", skein_client::wire::shown(&t.name))))?;
        if t.partitions == 0 || t.partitions > PARTITIONS_PER_TOPIC_MAX {
            let e = format!("{} partitions (1..={PARTITIONS_PER_TOPIC_MAX})", t.partitions);
            return Err((ErrorCode::INVALID_PARTITIONS, e));
        }
        if t.replicas == 0 || usize::from(t.replicas) > self.voters.len() {
            return Err((
                ErrorCode::INVALID_PARTITIONS,
                format!("replication {} on a cluster of {} brokers", t.replicas, self.voters.len()),
            ));
        }
        let configs: BTreeMap<String, String> = t.configs.iter().map(|c| (c.key.clone(), c.value.clone())).collect();
        replica_settings(&self.config, &configs, t.replicas).map_err(|m| (ErrorCode::INVALID_CONFIG, m))?;
        if self.st.borrow().voter.controller().topics().contains_key(&t.name) {
            return Err((ErrorCode::TOPIC_ALREADY_EXISTS, format!("topic '{}' exists", t.name)));
        }
        let msg = Message::CreateTopic {
            name: t.name.clone(),
            partitions: t.partitions,
            replication: t.replicas,
            configs: configs.into_iter().collect(),
        };
        self.until_applied(msg, |c| c.topics().contains_key(&t.name)).await?;
        let st = self.st.borrow();
        match st.voter.controller().topics().get(&t.name) {
            Some(got) if got.partitions == t.partitions && got.replication == t.replicas => Ok(()),
            _ => Err((ErrorCode::TOPIC_ALREADY_EXISTS, "created concurrently with other settings".into())),
        }
    }

    /// Sends `msg` to the active controller every 500 ms until `done` holds on this broker's
    /// voter (it applied the change) or 10 s pass.
    async fn until_applied(&self, msg: Message, done: impl Fn(&Controller) -> bool) -> Result<(), (ErrorCode, String)> {
        let deadline = now().plus_ms(10_000);
        let mut next_send = now();
        loop {
            let t = now();
            {
                let mut st = self.st.borrow_mut();
                if done(st.voter.controller()) {
                    return Ok(());
                }
                if t >= deadline {
                    return Err((ErrorCode::REQUEST_TIMED_OUT, "no active controller applied the change".into()));
                }
                if t >= next_send {
                    next_send = t.plus_ms(500);
                    let mut work = VecDeque::new();
                    self.commands(&mut st, vec![Command::Send { to: Peer::Controller, msg: msg.clone() }], &mut work);
                    self.pump(&mut st, t, work);
                }
            }
            compio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn delete_topic(&self, name: &str) -> Result<(), (ErrorCode, String)> {
        if !self.st.borrow().voter.controller().topics().contains_key(name) {
            return Err((
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                format!("no topic '{}'", skein_client::wire::shown(name)),
            ));
        }
        let msg = Message::DeleteTopic { name: name.to_owned() };
        self.until_applied(msg, |c| !c.topics().contains_key(name)).await
    }

    /// Deletes the local replicas (and their data) of deleted topics' partitions and of
    /// partitions reassigned away from this broker. (A voter that lags shows an older state,
    /// which still names this broker; if a newer one names it again, the replica is created
    /// anew and catches up before it can rejoin the ISR.)
    fn drop_deleted(&self, st: &mut State, work: &mut VecDeque<Work>) {
        let c = st.voter.controller();
        let gone: Vec<PartitionId> = st
            .core
            .replicas()
            .map(|(p, _)| *p)
            .filter(|p| c.deleted().contains(p) || c.partition(*p).is_some_and(|s| !s.replicas.contains(&self.id)))
            .collect();
        for p in gone {
            let mut out = Vec::new();
            if let Some(log) = st.core.remove_replica(p, &mut out) {
                match log.delete() {
                    Ok(()) => tracing::info!(partition = %p, "replica of a deleted topic removed"),
                    Err(e) => fail_stop("deleting a replica", &e),
                }
            }
            self.commands(st, out, work);
        }
    }

    async fn reassign(&self, r: skein_client::wire::ReassignPartitionRequest) -> Result<(), (ErrorCode, String)> {
        let p = {
            let st = self.st.borrow();
            self.partition_id(&st, &r.topic, r.partition)
        }
        .ok_or((ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, format!("{}/{}", r.topic, r.partition)))?;
        let target: Vec<NodeId> = r.replicas.iter().map(|&n| NodeId(n)).collect();
        let mut sorted = target.clone();
        sorted.sort();
        sorted.dedup();
        if target.is_empty() || sorted.len() != target.len() {
            return Err((ErrorCode::INVALID_REQUEST, "the replica list is empty or repeats a broker".into()));
        }
        if let Some(b) = target.iter().find(|b| !self.voters.iter().any(|(n, _)| n == *b)) {
            return Err((ErrorCode::INVALID_REQUEST, format!("broker {} is not in the cluster", b.0)));
        }
        let msg = Message::Reassign { partition: p, replicas: target.clone() };
        // Started (the target is pending) or already done (the replica set is the target).
        self.until_applied(msg, |c| {
            c.reassignment(p) == Some(&target) || c.partition(p).is_some_and(|s| s.replicas == target)
        })
        .await
    }

    fn partition_id(&self, st: &State, topic: &str, index: u32) -> Option<PartitionId> {
        st.voter.controller().topics().get(topic).and_then(|t| t.partition(index))
    }

    async fn produce(&self, req: ProduceRequest) -> Response {
        let acks = match req.acks {
            -1 => Acks::All,
            0 | 1 => Acks::Leader,
            _ => return Response::Error(ErrorCode::INVALID_REQUEST),
        };
        let timeout = u64::from(req.timeout_ms.min(self.config.max_request_timeout_ms));
        let mut waits = Vec::with_capacity(req.partitions.len());
        {
            let t = now();
            let deadline = t.plus_ms(timeout);
            let mut st = self.st.borrow_mut();
            let mut work = VecDeque::new();
            for part in req.partitions {
                let mut rxs = Vec::new();
                let pid = self.partition_id(&st, &part.topic, part.partition);
                // Back-pressure, as on a single node: the entry's bytes are held until its
                // answers are in, or until this future is dropped (its connection failed).
                let held = pid.and_then(|_| self.budgets.produce.try_hold(part.records.len() as u64));
                let error = match (pid, &held, split_batches(part.records)) {
                    (None, _, _) => Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION),
                    (_, None, _) => Some(ErrorCode::THROTTLED),
                    (_, _, Err(code)) => Some(code),
                    (Some(p), Some(_), Ok(batches)) => {
                        for batch in batches {
                            let id = Self::request_id(&mut st);
                            let (tx, rx) = oneshot::channel();
                            st.pending.insert(id, tx);
                            let mut out = Vec::new();
                            let epoch = (part.leader_epoch != 0).then_some(LeaderEpoch(part.leader_epoch));
                            st.core.handle_produce(t, id, p, epoch, batch, acks, deadline, &mut out);
                            self.commands(&mut st, out, &mut work);
                            rxs.push(rx);
                        }
                        None
                    }
                };
                waits.push((part.topic, part.partition, error, rxs, held));
            }
            self.pump(&mut st, t, work);
        }
        let mut partitions = Vec::with_capacity(waits.len());
        for (topic, partition, error, rxs, _held) in waits {
            let mut resp = ProducePartitionResponse {
                topic,
                partition,
                error: error.unwrap_or(ErrorCode::NONE),
                base_offset: 0,
                leader_epoch: 0,
                log_start: 0,
            };
            for (i, rx) in rxs.into_iter().enumerate() {
                match rx.await {
                    Ok(Ok(base)) if i == 0 => resp.base_offset = base.0,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if resp.error == ErrorCode::NONE => resp.error = produce_error(e),
                    Ok(Err(_)) => {}
                    Err(_) if resp.error == ErrorCode::NONE => resp.error = ErrorCode::REQUEST_TIMED_OUT,
                    Err(_) => {}
                }
            }
            let st = self.st.borrow();
            if let Some(r) = self.partition_id(&st, &resp.topic, partition).and_then(|p| st.core.replica(p)) {
                resp.leader_epoch = r.leader_epoch().map_or(0, |e| e.0);
                resp.log_start = r.log().log_start_offset().0;
            }
            partitions.push(resp);
        }
        if req.acks == 0 {
            return Response::Nothing;
        }
        Response::Produce(ProduceResponse { partitions })
    }

    /// One pass over a fetch's partitions. A partition whose replica is behind the read's
    /// session token (or, on a follower, behind the fetch offset) comes back with no records
    /// and `behind` set; the caller waits for it or answers NOT_CAUGHT_UP. Partitions are read
    /// in request order against `budget` (see [`FetchBudget`]), which holds what was read.
    fn fetch_once(&self, req: &WireFetch, budget: &mut FetchBudget) -> Vec<(FetchResult, bool)> {
        let t = now();
        let st = self.st.borrow();
        req.partitions
            .iter()
            .map(|p| {
                let fail = |error| (FetchResult::empty(error), false);
                let Some(pid) = self.partition_id(&st, &p.topic, p.partition) else {
                    return fail(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
                };
                let Some(r) = st.core.replica(pid) else { return fail(ErrorCode::NOT_LEADER) };
                let log_start = r.log().log_start_offset().0;
                if p.fetch_offset < log_start {
                    return (FetchResult { log_start, ..FetchResult::empty(ErrorCode::OFFSET_OUT_OF_RANGE) }, false);
                }
                let leads = r.leader_epoch().is_some();
                let known = r.known_epoch().0;
                if !(leads || req.replica_read && r.is_follower()) {
                    return fail(ErrorCode::NOT_LEADER);
                }
                // A client naming an older leader epoch than this replica knows is refused; one
                // naming a newer epoch knows more than this broker yet (retriable): a leader
                // answers NOT_LEADER, a follower is behind.
                if p.leader_epoch != 0 && p.leader_epoch < known {
                    return fail(ErrorCode::FENCED_LEADER_EPOCH);
                }
                if p.leader_epoch > known && leads {
                    return fail(ErrorCode::NOT_LEADER);
                }
                let past = !leads && self.config.unsafe_follower_reads_past_high_watermark;
                // The budget: the range is sized first (no bytes read) and read only if it fits;
                // if not, an offset past every log reads nothing but still checks lease and role.
                let end = if past { r.log().log_end_offset() } else { r.high_watermark() };
                let sized = |max_bytes| {
                    r.log().read(Offset(p.fetch_offset), skein_log::ReadLimit { max_bytes, end: Some(end) })
                };
                let max_bytes = budget
                    .limit(p.partition_max_bytes)
                    .filter(|&max_bytes| sized(max_bytes).map_or(true, |range| budget.fits(range.bytes)));
                let (from, max_bytes) = max_bytes.map_or((Offset(u64::MAX), 1), |m| (Offset(p.fetch_offset), m));
                let read = if leads {
                    st.core.read_committed(t, pid, from, max_bytes)
                } else {
                    r.read_follower(from, max_bytes, past)
                };
                let (records, hw) = match read {
                    Ok((records, hw)) => (records, hw.0),
                    Err(ReadFailure::Refused(e)) => return fail(produce_error(e)),
                    Err(ReadFailure::OffsetOutOfRange) => return fail(ErrorCode::OFFSET_OUT_OF_RANGE),
                    Err(ReadFailure::Corrupt(c)) => {
                        tracing::error!(partition = %pid, error = %c, "corrupt batch not served");
                        return fail(ErrorCode::STORAGE_ERROR);
                    }
                    // The log's state is unknown: stop, as for an append or sync failure.
                    Err(ReadFailure::Storage(e)) => fail_stop("a replicated partition's read", &e),
                };
                let mut result = FetchResult {
                    high_watermark: hw,
                    leader_epoch: known,
                    log_start,
                    records,
                    ..FetchResult::empty(ErrorCode::NONE)
                };
                // The session token: this replica must have seen the session's writes and
                // reads (their high watermark and leader epoch) before it answers.
                let behind = hw < p.min_high_watermark
                    || known < p.min_leader_epoch.max(p.leader_epoch)
                    || (!leads && p.fetch_offset > hw);
                if behind {
                    return (FetchResult { records: Vec::new(), ..result }, true);
                }
                if leads && p.fetch_offset > r.log().log_end_offset().0 {
                    return (
                        FetchResult { records: Vec::new(), ..result.with_error(ErrorCode::OFFSET_OUT_OF_RANGE) },
                        false,
                    );
                }
                budget.take(&mut result.records);
                (result, false)
            })
            .collect()
    }

    /// A fetch: long-polls up to `max_wait_ms` for `min_bytes`; partitions behind their
    /// session token are waited for up to `--read-wait-ms` (within the fetch's wait), then
    /// answered NOT_CAUGHT_UP.
    async fn fetch(&self, req: WireFetch) -> Response {
        let wait = u64::from(req.max_wait_ms.min(self.config.max_request_timeout_ms));
        let start = now();
        let deadline = start.plus_ms(wait);
        let token_deadline = start.plus_ms(wait.min(self.config.read_wait_ms));
        let mut waited: Vec<bool> = vec![false; req.partitions.len()];
        loop {
            let t = now();
            let elapsed_us = u32::try_from(t.0.saturating_sub(start.0)).unwrap_or(u32::MAX);
            let mut results = Vec::with_capacity(req.partitions.len());
            let mut behind_any = false;
            // Holds the bytes read until the response is handed to the connection.
            let mut budget = FetchBudget::new(req.max_bytes, &self.budgets.fetch);
            for (i, (mut r, behind)) in self.fetch_once(&req, &mut budget).into_iter().enumerate() {
                if behind {
                    waited[i] = true;
                    behind_any = true;
                    if t >= token_deadline {
                        r.error = ErrorCode::NOT_CAUGHT_UP;
                    }
                }
                if waited[i] {
                    r.token_wait_us = elapsed_us;
                }
                results.push(r);
            }
            let total: usize = results.iter().map(|r| r.records.len()).sum();
            let failed = results.iter().any(|r| r.error != ErrorCode::NONE);
            let waiting_for_token = behind_any && t < token_deadline;
            if !waiting_for_token && (total >= req.min_bytes.max(1) as usize || failed || t >= deadline) {
                return fetch_response(req, results);
            }
            // Nothing read is kept while waiting (a fetch whose budget was full waits for room
            // like for data: the next round reads again).
            drop((results, budget));
            let (tx, rx) = oneshot::channel();
            self.fetch_waiters.borrow_mut().push(tx);
            let until = if waiting_for_token { token_deadline } else { deadline };
            let left = Duration::from_micros(until.0.saturating_sub(t.0)).min(Duration::from_millis(20));
            let _ = compio::time::timeout(left, rx).await;
        }
    }

    fn list_offsets(&self, req: ListOffsetsRequest) -> ListOffsetsResponse {
        let st = self.st.borrow();
        let partitions = req
            .partitions
            .into_iter()
            .map(|part| {
                let mut resp = ListOffsetsPartitionResponse {
                    topic: part.topic.clone(),
                    partition: part.partition,
                    error: ErrorCode::NONE,
                    offset: 0,
                };
                let Some(pid) = self.partition_id(&st, &part.topic, part.partition) else {
                    resp.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
                    return resp;
                };
                // Like reads, offsets come from a leader with a valid lease only.
                let leads = st.core.lease_valid(now())
                    && st.core.replica(pid).is_some_and(|r| {
                        r.state().is_some_and(|s| s.leader == Some(self.id)) && r.leader_epoch().is_some()
                    });
                let Some(r) = st.core.replica(pid).filter(|_| leads) else {
                    resp.error = ErrorCode::NOT_LEADER;
                    return resp;
                };
                // Readers see committed records only: "latest" is the high watermark.
                resp.offset = match part.timestamp {
                    EARLIEST => r.log().log_start_offset().0,
                    LATEST => r.high_watermark().0,
                    ts => match r.log().offset_for_timestamp(Timestamp(ts)) {
                        Ok(found) => found.map_or(r.high_watermark(), |o| o.min(r.high_watermark())).0,
                        Err(e) => {
                            tracing::error!(error = %e, "timestamp lookup failed");
                            resp.error = ErrorCode::STORAGE_ERROR;
                            0
                        }
                    },
                };
                resp
            })
            .collect();
        ListOffsetsResponse { partitions }
    }
}

thread_local! {
    /// The node of this runtime thread (for tasks that call back into it).
    static SELF: RefCell<Option<std::rc::Weak<Node>>> = const { RefCell::new(None) };
}

impl Service for Node {
    fn max_in_flight(&self) -> usize {
        self.config.max_in_flight
    }
    fn max_frame_bytes(&self) -> u32 {
        self.config.max_frame_bytes
    }
    fn handle(self: Rc<Self>, req: Request) -> Pin<Box<dyn Future<Output = Response>>> {
        Box::pin(self.dispatch(req))
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

fn produce_error(e: ProduceError) -> ErrorCode {
    match e {
        ProduceError::NotLeader | ProduceError::LeaderNotReady => ErrorCode::NOT_LEADER,
        ProduceError::FencedLeaderEpoch => ErrorCode::FENCED_LEADER_EPOCH,
        ProduceError::NotEnoughReplicas => ErrorCode::NOT_ENOUGH_REPLICAS,
        ProduceError::Abandoned => ErrorCode::REQUEST_TIMED_OUT,
        ProduceError::Storage => ErrorCode::STORAGE_ERROR,
        ProduceError::OutOfOrderSequence => ErrorCode::OUT_OF_ORDER_SEQUENCE,
        ProduceError::ProducerFenced => ErrorCode::PRODUCER_FENCED,
    }
}

/// A partition state's wire fields: error (NOT_LEADER when leaderless), leader (0: none),
/// epoch, replicas, ISR.
fn wire_state(s: &crate::core::PartitionState) -> (ErrorCode, u32, u32, Vec<u32>, Vec<u32>) {
    let error = if s.leader.is_some() { ErrorCode::NONE } else { ErrorCode::NOT_LEADER };
    let ids = |v: &[NodeId]| v.iter().map(|r| r.0).collect();
    (error, s.leader.map_or(0, |l| l.0), s.epoch.0, ids(&s.replicas), ids(&s.isr))
}

fn topic_of(c: &Controller, p: PartitionId) -> Option<(&String, &Topic)> {
    c.topics().iter().find(|(_, t)| p.0 >= t.first.0 && p.0 - t.first.0 < t.partitions)
}

/// The replica settings for a topic's configs (and the log's, checked).
fn replica_settings(
    config: &BrokerConfig,
    configs: &BTreeMap<String, String>,
    replication: u16,
) -> Result<(ReplicaConfig, skein_log::LogConfig), String> {
    let mut log_configs = configs.clone();
    let min_isr = match log_configs.remove(MIN_ISR) {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or(format!("{MIN_ISR}: '{}' is not a count >= 1", skein_client::wire::shown(&v)))?,
        None => config.min_insync_replicas.max(1),
    };
    if min_isr > usize::from(replication) && configs.contains_key(MIN_ISR) {
        return Err(format!("{MIN_ISR} {min_isr} is above the replication factor {replication}"));
    }
    if let Some(v) = log_configs.remove(UNCLEAN) {
        if v != "true" && v != "false" {
            return Err(format!("{UNCLEAN}: '{}' is not true or false", skein_client::wire::shown(&v)));
        }
    }
    let log = meta::log_config(&log_configs)?;
    let replica = ReplicaConfig {
        min_insync_replicas: min_isr.min(usize::from(replication)),
        replica_lag_max_ms: config.replica_lag_max_ms,
        fetch_timeout_ms: 500,
        fetch_wait_max_ms: config.replica_fetch_wait_max_ms,
        ..ReplicaConfig::default()
    };
    Ok((replica, log))
}

fn partitions_dir(config: &BrokerConfig) -> PathBuf {
    config.data_dir.join("partitions")
}

fn create_replica(config: &BrokerConfig, me: NodeId, meta: &ReplicaMeta) -> Result<Replica<FileStorage>> {
    let dir = partitions_dir(config).join(meta.partition.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(meta)?;
    let tmp = dir.join("replica.json.tmp");
    std::fs::write(&tmp, &json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("replica.json")).with_context(|| format!("renaming {}", tmp.display()))?;
    std::fs::File::open(&dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    open_replica(config, me, &dir, meta)
}

fn open_replica(config: &BrokerConfig, me: NodeId, dir: &Path, meta: &ReplicaMeta) -> Result<Replica<FileStorage>> {
    let (replica_config, log_config) =
        replica_settings(config, &meta.configs, meta.replication).map_err(|m| anyhow::anyhow!(m))?;
    let storage = FileStorage::new(dir).with_context(|| format!("opening {}", dir.display()))?;
    // The same clock as the core's appends (segment ages compare the two).
    let log =
        Log::open(storage, log_config, now().timestamp()).with_context(|| format!("recovering {}", dir.display()))?;
    Ok(Replica::new(me, PartitionId(meta.partition), replica_config, Plant::default(), log))
}

/// Opens every partition directory of this broker.
fn open_replicas(config: &BrokerConfig, me: NodeId) -> Result<Vec<Replica<FileStorage>>> {
    let root = partitions_dir(config);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let dir = entry?.path();
        let meta_path = dir.join("replica.json");
        let bytes = match std::fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Created but never described (a crash in between): it holds nothing.
                tracing::warn!(dir = %dir.display(), "partition directory without replica.json; ignored");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", meta_path.display())),
        };
        let meta: ReplicaMeta =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", meta_path.display()))?;
        out.push(open_replica(config, me, &dir, &meta)?);
    }
    Ok(out)
}

/// Reads, bumps and durably stores the process incarnation (it grows at every start).
fn next_incarnation(dir: &Path) -> Result<u64> {
    let path = dir.join("incarnation");
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().with_context(|| format!("parsing {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let next = last + 1;
    let tmp = dir.join("incarnation.tmp");
    std::fs::write(&tmp, next.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voters_parse_and_bad_lists_are_errors() {
        let v = parse_voters("2@127.0.0.12:9093, 1@127.0.0.11:9092").expect("parses");
        assert_eq!(v[0], (NodeId(1), "127.0.0.11:9092".parse().expect("addr")));
        assert_eq!(v.len(), 2);
        let spec = "1@127.0.0.11:9092/east,2@127.0.0.12:9092,3@127.0.0.13:9092/west";
        assert_eq!(parse_voters(spec).expect("racks are allowed").len(), 3);
        let racks = parse_racks(spec);
        assert_eq!(racks.into_iter().collect::<Vec<_>>(), vec![(NodeId(1), "east".into()), (NodeId(3), "west".into())]);
        for bad in ["", "1@", "x@127.0.0.1:1", "1@127.0.0.1:1,1@127.0.0.2:1", "0@127.0.0.1:1", "127.0.0.1:1"] {
            assert!(parse_voters(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_incarnation_grows_at_every_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = next_incarnation(dir.path()).expect("first");
        let b = next_incarnation(dir.path()).expect("second");
        assert!(b > a);
    }

    /// Voter `id` of a three-voter cluster for process `incarnation` of its broker, over the
    /// Raft log in `dir`, after the startup replay.
    fn voter_at(dir: &Path, id: u32, incarnation: u64) -> ControllerVoter {
        let ids = [NodeId(1), NodeId(2), NodeId(3)];
        let mut c = Controller::new(ControllerConfig::default(), &ids, &[(PartitionId(0), ids.to_vec())]);
        c.replay_until(NodeId(id), incarnation);
        // Distinct fixed election waits: a deterministic test.
        let ticks = 3 + 2 * id as usize;
        let quorum = QuorumConfig { election_ticks: ticks, election_ticks_max: ticks + 1, ..QuorumConfig::default() };
        let dir = dir.join(id.to_string());
        raftlog::start_voter(&dir, NodeId(id), &ids, quorum, c, now()).expect("starts the voter").0
    }

    /// Runs the voters that are up (`Some`) for `ms` from `from`, a tick every 5 ms with
    /// instant delivery, the brokers of `heartbeats` (id, incarnation) heartbeating at every
    /// tick; returns the time reached. Messages to brokers are dropped.
    fn run_voters(vs: &mut [Option<ControllerVoter>], from: Time, ms: u64, heartbeats: &[(u32, u64)]) -> Time {
        let mut t = from;
        while t < from.plus_ms(ms) {
            let mut queue = VecDeque::new();
            for &(b, incarnation) in heartbeats {
                for v in 1..=3 {
                    let hb = Message::Heartbeat { broker: NodeId(b), incarnation, lost: vec![], sent: t };
                    queue.push_back((NodeId(b), NodeId(v), hb));
                }
            }
            for (me, v) in (1..).map(NodeId).zip(vs.iter_mut()) {
                let Some(v) = v else { continue };
                let mut out = Vec::new();
                v.handle_tick(t, &mut out);
                queue.extend(out.into_iter().map(|(to, m)| (me, to, m)));
            }
            while let Some((from, to, m)) = queue.pop_front() {
                let for_voter = matches!(m, Message::Raft(_) | Message::Heartbeat { .. });
                let Some(Some(v)) = vs.get_mut(to.0 as usize - 1).filter(|_| for_voter) else { continue };
                let mut out = Vec::new();
                v.handle_message(t, from, m, &mut out);
                queue.extend(out.into_iter().map(|(next, m)| (to, next, m)));
            }
            t = t.plus_ms(5);
        }
        t
    }

    #[test]
    fn a_restarted_voter_applies_history_quietly_until_its_own_heartbeat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut vs: Vec<Option<ControllerVoter>> = (1..=3).map(|i| Some(voter_at(dir.path(), i, 1))).collect();
        let all = [(1, 1), (2, 1), (3, 1)];
        let t = run_voters(&mut vs, Time(0), 300, &all);
        let c = vs[2].as_ref().expect("up").controller();
        assert_eq!(c.partition(PartitionId(0)).and_then(|s| s.leader), Some(NodeId(1)), "elected");
        assert!(!c.replaying(), "its own heartbeat was applied");
        // Broker 1's heartbeat came first in the log and elected it: to broker 3, that was
        // decided before it joined (history, even on a new cluster).
        assert_eq!(c.decisions_replayed(), 1);

        // Broker 3 dies and is fenced.
        vs[2] = None;
        let t = run_voters(&mut vs, t, 1_000, &[(1, 1), (2, 1)]);
        assert!(!vs[0].as_ref().expect("up").controller().alive(NodeId(3)));

        // Its next process applies its own Raft log at startup, as history...
        vs[2] = Some(voter_at(dir.path(), 3, 2));
        let c = vs[2].as_ref().expect("up").controller();
        assert!(vs[2].as_ref().expect("up").applied() > 0);
        assert!(c.replaying());
        assert_eq!(c.decisions_replayed(), 1, "the election");
        // ...then what was committed while it was down...
        let t = run_voters(&mut vs, t, 200, &[(1, 1), (2, 1)]);
        let c = vs[2].as_ref().expect("up").controller();
        assert!(!c.alive(NodeId(3)), "caught up");
        assert!(c.replaying());
        assert_eq!(c.decisions_replayed(), 2, "the election, its fencing");
        // ...and from its own first heartbeat on, decisions are news.
        run_voters(&mut vs, t, 200, &[(1, 1), (2, 1), (3, 2)]);
        let c = vs[2].as_ref().expect("up").controller();
        assert!(c.alive(NodeId(3)));
        assert!(!c.replaying());
        assert_eq!(c.decisions_replayed(), 2, "'broker restarted' is news");
    }

    #[test]
    fn topic_settings_are_checked() {
        let config = BrokerConfig::parse_with_file(["skein-broker"]).expect("defaults");
        let c = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        let (r, _) = replica_settings(&config, &c(MIN_ISR, "2"), 3).expect("ok");
        assert_eq!(r.min_insync_replicas, 2);
        assert!(replica_settings(&config, &c(MIN_ISR, "4"), 3).is_err());
        assert!(replica_settings(&config, &c(MIN_ISR, "zero"), 3).is_err());
        assert!(replica_settings(&config, &c(UNCLEAN, "maybe"), 3).is_err());
        assert!(replica_settings(&config, &c("colour", "blue"), 3).is_err());
        let (r, _) = replica_settings(&config, &BTreeMap::new(), 3).expect("defaults");
        assert_eq!(r.min_insync_replicas, 1);
    }
}
