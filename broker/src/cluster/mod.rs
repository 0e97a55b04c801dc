//! Cluster mode (`--voters`): the sans-IO core ([`crate::core`]) driven by a thread-per-core
//! runtime.
//!
//! A broker runs one shard per core (`--cores`; `shard`): a thread with its own compio
//! runtime and a [`crate::core::node::BrokerNode`] holding the replicas that shard owns
//! (`shard::owner`: partition id modulo the shard count). Shard 0 runs on the main thread and
//! also hosts the controller voter (`control`; its Raft log on disk: `raftlog`), the broker's
//! heartbeats and lease (shared with the other shards through its answers), and the control
//! requests. An acceptor thread deals connections (clients' and peers') to shards
//! round-robin; a request or inter-broker message that concerns a partition another shard owns
//! is passed to that shard (`requests`, `shard`). Every shard has its own outgoing link to
//! every peer (`peer`), bound to this broker's own address.
//!
//! Everything the core asks for is done on the shard that asked: messages go to peers, sync
//! jobs run on blocking threads and report back, produce replies complete the waiting client
//! requests.
//!
//! Time is `CLOCK_MONOTONIC` in microseconds, one clock for every shard: leases are compared
//! only with the same broker's clock, and a new active controller restarts every session on
//! its own clock.
//!
//! At startup the voter loads its controller snapshot, if any (`raftlog::start_voter`), and
//! replays the Raft log's entries after it, then applies what was committed while this broker
//! was down. Those are old decisions: the controller logs them at debug level only
//! ([`crate::core::controller::Narration`]), until this process's own first heartbeat is
//! applied, and `control` logs summary lines instead (snapshot index and entries replayed
//! from disk; caught up).
//!
//! Retention runs in the core (`BrokerNode::handle_retention`, from every shard's tick, with
//! the wall clock for `retention.ms`).

mod control;
mod groups;
mod index_follower;
mod internal;
mod peer;
mod raftlog;
mod replicas;
mod requests;
mod shard;
mod storage_io;
mod table_seed;
mod tables;
mod txn;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use futures_channel::oneshot;

use crate::core::controller::{Controller, ControllerConfig};
use crate::core::node::{BrokerNode, NodeConfig};
use crate::core::quorum::QuorumConfig;
use crate::core::{NodeId, PartitionId, Time};
use crate::meta::ProducerIds;
use crate::service::conn::Connection;
use crate::BrokerConfig;
use control::{Control, TopicMap};
use replicas::{next_incarnation, open_replica, scan_replicas, ReplicaMeta};
use shard::{owner, Node, ShardMsg};

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

/// The wall clock in milliseconds, for `retention.ms` (record timestamps are wall-clock).
fn wall_clock() -> skein_log::types::Timestamp {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    skein_log::types::Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The monotonic clock in microseconds (the same origin for every thread and process on the
/// machine).
fn now() -> Time {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Time(u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000)
}

/// A shard's compio runtime, on the driver `--io-driver` asks for.
fn new_runtime(config: &BrokerConfig) -> Result<compio::runtime::Runtime> {
    let mut proactor = compio::driver::ProactorBuilder::new();
    if config.io_driver == crate::IoDriver::Poll {
        proactor.driver_type(compio::driver::DriverType::Poll);
    }
    compio::runtime::Runtime::builder().with_proactor(proactor).build().context("starting a compio runtime")
}

/// Logs the I/O driver shard 0 runs (every shard runs the same).
fn log_driver(config: &BrokerConfig, runtime: &compio::runtime::Runtime) {
    let driver = runtime.driver_type();
    match (driver.is_iouring(), config.io_driver) {
        (true, _) => tracing::info!("I/O driver: io_uring"),
        (false, crate::IoDriver::Poll) => {
            tracing::info!(?driver, "I/O driver: epoll (polling), as --io-driver poll asks")
        }
        (false, crate::IoDriver::Auto) => tracing::warn!(
            ?driver,
            "io_uring is not available here (an old kernel, or blocked by a container's seccomp policy): \
             the shards run the epoll (polling) driver, file IO on blocking threads"
        ),
    }
}

/// What every shard starts from.
struct Start {
    config: Arc<BrokerConfig>,
    me: NodeId,
    incarnation: u64,
    voters: Arc<Vec<(NodeId, SocketAddr)>>,
    racks: Arc<BTreeMap<NodeId, String>>,
    shards: Vec<flume::Sender<ShardMsg>>,
    topics: Arc<ArcSwap<TopicMap>>,
}

/// Runs a cluster broker until `shutdown` resolves. `on_ready` gets the bound address once
/// the broker listens and every shard has opened its replicas.
pub fn run<F>(config: BrokerConfig, shutdown: F, on_ready: impl FnOnce(SocketAddr)) -> Result<()>
where
    F: std::future::Future<Output = ()> + 'static,
{
    let me = NodeId(config.node_id);
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
    raise_fd_limit();
    // Bound first, so a broker that cannot listen leaves no data directory behind; the lock
    // is held until this function returns.
    let listener = TcpListener::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let _data_dir = crate::datadir::DataDirLock::acquire(&config.data_dir)?;
    let addr = listener.local_addr()?;
    // Without --voters this broker is a cluster of one voter, at the address it listens on.
    let voters = match config.voters.as_deref() {
        Some(v) => parse_voters(v)?,
        None => vec![(me, addr)],
    };
    let Some(&(_, my_addr)) = voters.iter().find(|(n, _)| *n == me) else {
        bail!("--node-id {} is not one of the --voters", config.node_id);
    };
    crate::datadir::refuse_single_node_layout(&config.data_dir)?;
    // Metadata advertises the bound address (port 0 becomes the port picked).
    let config = BrokerConfig { listen: addr, ..config };
    let incarnation = next_incarnation(&config.data_dir)?;
    let found = scan_replicas(&config)?;
    let n = config.shard_count();
    let racks = Arc::new(parse_racks(config.voters.as_deref().unwrap_or_default()));
    let (shards, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| flume::unbounded::<ShardMsg>()).unzip();
    let start = Start {
        config: Arc::new(config),
        me,
        incarnation,
        voters: Arc::new(voters),
        racks,
        shards,
        topics: Arc::new(ArcSwap::from_pointee(TopicMap::default())),
    };
    let hosted: BTreeSet<PartitionId> = found.iter().map(|(_, m)| PartitionId(m.partition)).collect();
    let mut mine: Vec<Vec<(std::path::PathBuf, ReplicaMeta)>> = (0..n).map(|_| Vec::new()).collect();
    for (dir, meta) in found {
        mine[owner(PartitionId(meta.partition), n)].push((dir, meta));
    }
    tracing::info!(node = %me, incarnation, shards = n, replicas = hosted.len(), "cluster broker starting");
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let mut receivers = receivers.into_iter();
    let rx0 = receivers.next().expect("at least one shard");
    let mut mine = mine.into_iter();
    let mine0 = mine.next().expect("at least one shard");
    let mut threads = Vec::new();
    for (i, (rx, replicas)) in receivers.zip(mine).enumerate() {
        let shard = i + 1;
        let start = start.clone_for_shard();
        let ready = ready_tx.clone();
        let ip = my_addr.ip();
        threads.push(std::thread::Builder::new().name(format!("shard-{shard}")).spawn(move || {
            let runtime = match new_runtime(&start.config) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let node = match open_shard(&start, shard, replicas, None, ip) {
                    Ok(node) => node,
                    Err(e) => {
                        let _ = ready.send(Err(e.context(format!("shard {shard}"))));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                drop(ready);
                compio::runtime::spawn(node.clone().tick_loop()).detach();
                compio::runtime::spawn(groups::expiry_loop(node.clone())).detach();
                compio::runtime::spawn(txn::tick_loop(node.clone())).detach();
                compio::runtime::spawn(tables::tick_loop(node.clone())).detach();
                node.message_loop(rx).await;
            });
        })?);
    }
    drop(ready_tx);
    let runtime = new_runtime(&start.config)?;
    log_driver(&start.config, &runtime);
    let result = runtime.block_on(async {
        let control = start_control(&start, hosted)?;
        let node = open_shard(&start, 0, mine0, Some(control), my_addr.ip())?;
        for _ in 1..n {
            ready_rx.recv().context("a shard thread died during startup")??;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        {
            let (shards, stopping) = (start.shards.clone(), stopping.clone());
            let max = start.config.max_connections;
            std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || accept_thread(listener, shards, max, stopping))?;
        }
        let loop_task = compio::runtime::spawn(node.clone().message_loop(rx0));
        compio::runtime::spawn(node.clone().tick_loop()).detach();
        compio::runtime::spawn(groups::expiry_loop(node.clone())).detach();
        compio::runtime::spawn(txn::tick_loop(node.clone())).detach();
        compio::runtime::spawn(tables::tick_loop(node.clone())).detach();
        if start.voters.len() == 1 {
            // A cluster of one is ready when it serves its partitions again: its voter elected
            // itself, applied this process's first heartbeat, and every partition it leads has
            // its new epoch on its shard.
            if !node.until_serving(None, now().plus_ms(10_000)).await {
                tracing::warn!("not every partition is served 10 s after the start; ready anyway");
            }
        }
        on_ready(addr);
        shutdown.await;
        node.controlled_shutdown().await;
        stopping.store(true, Ordering::Relaxed);
        // Wake the acceptor so it sees the flag (a connection to ourselves).
        let _ = std::net::TcpStream::connect(addr);
        for shard in 0..n {
            let (tx, rx) = oneshot::channel();
            node.to_shard(shard, ShardMsg::Shutdown(tx));
            let _ = rx.await;
        }
        let _ = loop_task.await;
        Ok::<(), anyhow::Error>(())
    });
    for t in threads {
        let _ = t.join();
    }
    result
}

impl Start {
    fn clone_for_shard(&self) -> Start {
        Start {
            config: self.config.clone(),
            me: self.me,
            incarnation: self.incarnation,
            voters: self.voters.clone(),
            racks: self.racks.clone(),
            shards: self.shards.clone(),
            topics: self.topics.clone(),
        }
    }
}

/// Starts the controller voter (snapshot, then the Raft log after it) and publishes the topic
/// map it holds, so every shard routes by it from the first request on.
fn start_control(start: &Start, hosted: BTreeSet<PartitionId>) -> Result<Control> {
    let config = &start.config;
    let ids: Vec<NodeId> = start.voters.iter().map(|(n, _)| *n).collect();
    let controller_config = ControllerConfig {
        session_timeout_ms: config.session_timeout_ms,
        handover_ms: config.lease_ms + 50,
        rebalance_interval_ms: (config.leader_rebalance_interval_ms > 0).then_some(config.leader_rebalance_interval_ms),
    };
    let mut controller = Controller::new(controller_config, &ids, &[]);
    controller.replay_until(start.me, start.incarnation);
    let ticks = (config.election_timeout_ms / TICK_MS).max(3) as usize;
    let quorum = QuorumConfig {
        election_ticks: ticks,
        election_ticks_max: 2 * ticks,
        heartbeat_ticks: (ticks / 5).max(1),
        ..QuorumConfig::default()
    };
    let (voter, _) =
        raftlog::start_voter(&config.data_dir.join("controller"), start.me, &ids, quorum, controller, now())?;
    let producer_ids = ProducerIds::load(&config.data_dir)?;
    let mut control = Control::new(voter, hosted, producer_ids);
    if let Some(map) = control.changed_topics() {
        start.topics.store(Arc::new(map));
    }
    Ok(control)
}

/// Opens shard `shard`'s replicas and makes its node (on the calling shard's thread).
fn open_shard(
    start: &Start,
    shard: usize,
    replicas: Vec<(std::path::PathBuf, ReplicaMeta)>,
    control: Option<Control>,
    ip: std::net::IpAddr,
) -> Result<Rc<Node>> {
    let opened = replicas
        .iter()
        .map(|(dir, meta)| open_replica(&start.config, start.me, dir, meta))
        .collect::<Result<Vec<_>>>()?;
    let node_config =
        NodeConfig { heartbeat_ms: start.config.heartbeat_ms, lease_ms: start.config.lease_ms, heartbeats: shard == 0 };
    let core = BrokerNode::new(start.me, start.incarnation, Vec::new(), node_config, opened, false);
    Ok(Node::new(
        shard,
        start.config.clone(),
        start.voters.clone(),
        start.racks.clone(),
        start.shards.clone(),
        start.topics.clone(),
        core,
        control,
        ip,
    ))
}

/// Accepts connections on a dedicated thread (blocking `accept`) and deals them to shards
/// round-robin; each shard registers its sockets with its own runtime.
fn accept_thread(listener: TcpListener, shards: Vec<flume::Sender<ShardMsg>>, max: usize, stopping: Arc<AtomicBool>) {
    let count = Arc::new(AtomicUsize::new(0));
    let mut next = 0usize;
    for stream in listener.incoming() {
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            // Out of descriptors and the like: back off (this is the acceptor's own thread,
            // not a shard's) instead of spinning on the same error.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if count.load(Ordering::Relaxed) >= max {
            tracing::warn!(peer = ?stream.peer_addr().ok(), max, "connection limit reached; closing new connection");
            continue;
        }
        count.fetch_add(1, Ordering::Relaxed);
        let target = next % shards.len();
        next = next.wrapping_add(1);
        // A shard that is gone drops the connection, and with it its place in the count.
        if shards[target].send(ShardMsg::Connection(Connection::new(stream, count.clone()))).is_err() {
            return;
        }
    }
}

fn raise_fd_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < hard {
            let _ = rlimit::Resource::NOFILE.set(hard, hard);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::path::Path;

    use super::replicas::{replica_settings, MIN_ISR, UNCLEAN};
    use super::*;
    use crate::core::quorum::ControllerVoter;
    use crate::core::Message;

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
        let table = |unclean: &str| {
            let mut configs = c(UNCLEAN, unclean);
            configs.insert(crate::core::table::TABLE_CONFIG.into(), "true".into());
            replica_settings(&config, &configs, 3)
        };
        let refused = table("true").map(|_| ()).expect_err("an unclean election would part a table's replicas");
        assert!(refused.contains(UNCLEAN), "{refused}");
        assert!(table("false").is_ok());
        let (r, _) = replica_settings(&config, &BTreeMap::new(), 3).expect("defaults");
        assert_eq!(r.min_insync_replicas, 1);
    }
}
