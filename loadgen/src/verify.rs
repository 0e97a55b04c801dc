//! `verify`: a Jepsen-style workload against a running cluster, checked by
//! [`skein_broker::check`].
//!
//! Producers send unique values (one record per batch) to partitions in turn, idempotently
//! and with retries (so a duplicate in the history is an idempotence failure); consumers read every partition from the
//! beginning; an optional fault thread kills (then restarts with the operator's command) or
//! pauses broker processes. After the run every fault is healed, the producers drain, and a
//! final read takes every partition from its start to its end. The history (JSON lines) and
//! the checker's verdict per property are the output.
//!
//! Against a [`LocalCluster`] ([`run_cluster`]) the fault thread also hits partition leaders
//! (found with [`Probe`], the newest leader epoch any broker reports): `kill-leader`,
//! `pause-leader`, `isolate`, `cut-leader` (the leader cut off from the other brokers while
//! clients still reach it) and `one-way` (leader to follower or back), the network faults with
//! [`NetChaos`]. Every fault is logged with its start time and the partitions its node led.
//! With `acks=leader` an acknowledged record may be lost when its leader stops leading within
//! a lease period of the acknowledgement; [`excuse_losses`] turns exactly those losses into
//! unknown outcomes before the check (as the simulator does) and counts them; any other loss
//! still fails `lost-write`.
//!
//! Outcomes: an acknowledgement is `Ok`; an error the broker returns before appending
//! (NOT_LEADER, NOT_ENOUGH_REPLICAS, FENCED_LEADER_EPOCH, THROTTLED, ...) is `Failed`;
//! anything else (timeout, lost connection, REQUEST_TIMED_OUT, STORAGE_ERROR) is `Unknown`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skein_broker::check::{self, History, PollOp, SendOp, SendOutcome};
use skein_client::partitioning::{open_ranges, Partitioning};
use skein_client::wire::ErrorCode;
use skein_client::{
    Acks, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Isolation, Position, Producer, ProducerConfig,
    ReadReplica, ReadStats, SessionHandle,
};

use crate::chaos::{nft, NetChaos};
use crate::cluster::{signal, LocalCluster, PartitionView, Probe};
use crate::txn_check::{self, Reached, Txn};
use crate::txn_verify;

/// A fault the verifier injects into broker processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then the restart command for that process.
    Kill,
    /// SIGSTOP for a while, then SIGCONT.
    Pause,
    /// Drop every TCP packet to one broker address for a while (an `nft` rule; needs root
    /// and nftables), then heal.
    Partition,
    /// Cluster only: SIGKILL the leader of a random partition, then restart it.
    KillLeader,
    /// Cluster only: SIGSTOP the leader of a random partition for a while, then SIGCONT.
    PauseLeader,
    /// Cluster only: cut a random node off from every broker and client for a while.
    Isolate,
    /// Cluster only: cut the leader of a random partition off from the other brokers for a
    /// while; clients still reach it.
    CutLeader,
    /// Cluster only: drop packets one way between the leader of a random partition and one
    /// of its followers (either direction) for a while.
    OneWay,
    /// Cluster only, with transactions: SIGKILL the transaction coordinator of a random
    /// producer's transactional id (the leader of its `__transaction_state` partition), then
    /// restart it.
    KillCoordinator,
}

impl Fault {
    /// Every fault, in the order `--faults` lists them.
    pub const ALL: [Fault; 9] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Partition,
        Fault::KillLeader,
        Fault::PauseLeader,
        Fault::Isolate,
        Fault::CutLeader,
        Fault::OneWay,
        Fault::KillCoordinator,
    ];

    /// The name `--faults` takes.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::KillLeader => "kill-leader",
            Fault::PauseLeader => "pause-leader",
            Fault::Isolate => "isolate",
            Fault::CutLeader => "cut-leader",
            Fault::OneWay => "one-way",
            Fault::KillCoordinator => "kill-coordinator",
        }
    }

    /// Whether the fault needs a [`LocalCluster`] (leaders, node addresses).
    pub fn needs_cluster(self) -> bool {
        !matches!(self, Fault::Kill | Fault::Pause | Fault::Partition)
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault {s:?} ({})", names.join(", "))
        })
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One injected fault, for the report and the `acks=leader` loss window.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FaultEvent {
    /// What was done.
    pub fault: Fault,
    /// The node hit (cluster node id; without a cluster, the index in `pids` or
    /// `partition_addrs` plus one).
    pub node: u32,
    /// The partitions that node led when the fault began; empty when unknown (then the fault
    /// counts for every partition).
    pub partitions: Vec<u32>,
    /// When it began, in the history's microseconds.
    pub start_us: u64,
    /// When it was healed.
    pub end_us: u64,
}

impl serde::Serialize for Fault {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The `acks=leader` loss window: a lost acknowledged record is excused if a fault hit its
/// partition's leader at most `before` after the acknowledgement and at most `detection`
/// before it (the leader keeps acknowledging until its lease runs out), or while the
/// request was in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossWindow {
    /// How long before a fault an acknowledgement may still be lost: the lease plus a margin
    /// for replication.
    pub before: Duration,
    /// How long after the fault began its leader may still acknowledge: the lease plus a
    /// margin for scheduling.
    pub detection: Duration,
}

impl LossWindow {
    /// `lease + margin` on both sides.
    pub fn new(lease: Duration, margin: Duration) -> LossWindow {
        LossWindow { before: lease + margin, detection: lease + margin }
    }
}

/// What `verify` runs.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Topic (created if missing).
    pub topic: String,
    /// Partitions when creating it.
    pub partitions: u32,
    /// Replicas when creating it.
    pub replicas: u16,
    /// Producer threads.
    pub producers: usize,
    /// Consumer threads.
    pub consumers: usize,
    /// Records per second per producer.
    pub rate: f64,
    /// Durability asked for.
    pub acks: Acks,
    /// How long the workload runs (faults included).
    pub duration: Duration,
    /// Faults to inject (none: a plain run).
    pub faults: Vec<Fault>,
    /// Broker process ids the faults hit.
    pub pids: Vec<u32>,
    /// Per pid, a shell command that restarts the broker after a kill; it must print the new
    /// process id on its first line of output.
    pub restart: Vec<String>,
    /// Time between faults.
    pub fault_interval: Duration,
    /// Broker addresses `partition` cuts off (default: the bootstrap list).
    pub partition_addrs: Vec<std::net::SocketAddr>,
    /// Where to write the history (JSON lines).
    pub history: Option<PathBuf>,
    /// Topic configs when creating it (e.g. `min.insync.replicas`).
    pub topic_configs: Vec<(String, String)>,
    /// With `acks=leader`, the losses excused (see [`excuse_losses`]); ignored otherwise.
    pub loss_window: LossWindow,
    /// Which replicas readers read from.
    pub read_from: ReadFrom,
    /// Each producer also reads every partition in the same session (its process id), so
    /// that the read-after-write check has its own writes to look for.
    pub read_your_writes: bool,
    /// TEST ONLY: readers keep no session (no tokens: no read-after-write or monotonic reads
    /// across replicas). With a cluster started for it, brokers also serve follower reads past
    /// the high watermark (`--unsafe-follower-reads-past-high-watermark`). The read checks must
    /// then fail.
    pub unsafe_reads: bool,
    /// Nodes to spread reads over with [`ReadFrom::Any`] (ids 1..=nodes; set by
    /// [`run_cluster`]).
    pub nodes: u32,
    /// Producers are transactional ([`crate::txn_verify`]): several partitions per
    /// transaction, some aborted; readers read committed, plus one more reading uncommitted;
    /// the transaction checks ([`crate::txn_check`]) run besides the base checks.
    pub transactions: bool,
    /// With `transactions`: the producers' transaction timeout (the coordinator aborts a
    /// transaction open longer, and the end-of-run wait for stable offsets is this plus a
    /// margin).
    pub transaction_timeout: Duration,
    /// The topic's partitioning scheme. With a ranged one ([`Partitioning::ranged`]) producers
    /// send keyed records routed by the range map (the key-order check has something to
    /// check) and readers follow the topic through its lineage.
    pub partitioning: Partitioning,
    /// Splits and merges of the topic during the run (ranged topics only), spread evenly:
    /// splits of the last open partition and merges of the first two open neighbours,
    /// alternating.
    pub resizes: u32,
    /// Distinct keys the producers write with a ranged topic.
    pub keys: u64,
    /// Readers pause this long after each poll (slow readers, behind the producers: a split
    /// then finds a backlog in the parent, which a reader must finish before the children).
    pub reader_pause: Duration,
    /// TEST ONLY: readers of a ranged topic take every partition as soon as it appears, from
    /// its beginning, without waiting for its parents (the lineage ignored); the key-order
    /// check must then fail.
    pub unsafe_ignore_lineage: bool,
}

/// The broker flag that makes followers serve past their high watermark (with
/// [`VerifyConfig::unsafe_reads`], for a cluster started for the run).
pub const UNSAFE_READS_BROKER_ARG: &str = "--unsafe-follower-reads-past-high-watermark";

/// One line on the readers' fetches: answers, how many a follower served, waited for a
/// session token, or were redirected to the leader.
pub fn reads_line(r: &ReadStats) -> String {
    let share = |n: u64| if r.fetches == 0 { 0.0 } else { 100.0 * n as f64 / r.fetches as f64 };
    format!(
        "reads: {} partition answers, {:.1} % by followers, {:.2} % waited for a session token, {:.2} % redirected to the leader (NOT_CAUGHT_UP)",
        r.fetches,
        share(r.follower_reads),
        share(r.waited),
        share(r.not_caught_up)
    )
}

/// Which replicas `verify`'s readers read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadFrom {
    /// Partition leaders only.
    #[default]
    Leader,
    /// Every replica in turn: each poll prefers the next node (a follower in the ISR serves
    /// it; others fall back to the leader).
    Any,
}

impl std::str::FromStr for ReadFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<ReadFrom, String> {
        match s {
            "leader" => Ok(ReadFrom::Leader),
            "any" => Ok(ReadFrom::Any),
            _ => Err(format!("'{s}': expected leader or any")),
        }
    }
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "verify".into(),
            partitions: 3,
            replicas: 1,
            producers: 2,
            consumers: 2,
            rate: 200.0,
            acks: Acks::All,
            duration: Duration::from_secs(10),
            faults: Vec::new(),
            pids: Vec::new(),
            restart: Vec::new(),
            fault_interval: Duration::from_secs(2),
            partition_addrs: Vec::new(),
            history: None,
            topic_configs: Vec::new(),
            loss_window: LossWindow::new(Duration::from_millis(LEASE_MS_DEFAULT), Duration::from_millis(250)),
            read_from: ReadFrom::Leader,
            read_your_writes: false,
            unsafe_reads: false,
            nodes: 1,
            transactions: false,
            transaction_timeout: Duration::from_secs(10),
            partitioning: Partitioning::Hash,
            resizes: 0,
            keys: 32,
            reader_pause: Duration::ZERO,
            unsafe_ignore_lineage: false,
        }
    }
}

/// The broker's default `--lease-ms`.
pub const LEASE_MS_DEFAULT: u64 = 250;

/// The verdict.
pub struct Verdict {
    /// The recorded history (excused losses already turned into unknown outcomes).
    pub history: History,
    /// The checker's report.
    pub report: check::Report,
    /// Faults injected.
    pub faults: usize,
    /// Each fault, in order.
    pub fault_log: Vec<FaultEvent>,
    /// Acknowledged records lost inside the `acks=leader` window, excused (always 0 with
    /// `acks=all`).
    pub excused: u64,
    /// The readers' fetches (final read excluded): answers, follower answers, waits for a
    /// session token, redirects to the leader.
    pub reads: ReadStats,
    /// With transactions: the transaction checks' report.
    pub txn: Option<crate::txn_check::TxnReport>,
    /// The splits and merges made, one line each (`split P into C1, C2` or `merge P, Q into
    /// C`, with the time).
    pub resizes: Vec<String>,
}

impl Verdict {
    /// True if no check failed (base checks and, with transactions, the transaction checks).
    pub fn ok(&self) -> bool {
        self.report.ok() && self.txn.as_ref().is_none_or(crate::txn_check::TxnReport::ok)
    }
}

fn micros(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn outcome(r: &Result<(u32, u64), ClientError>) -> SendOutcome {
    match r {
        Ok((p, o)) => SendOutcome::Ok { partition: check::PartitionId(*p), offset: check::Offset(*o) },
        Err(ClientError::Broker(code, _))
            if [
                ErrorCode::NOT_LEADER,
                ErrorCode::NOT_ENOUGH_REPLICAS,
                ErrorCode::FENCED_LEADER_EPOCH,
                ErrorCode::THROTTLED,
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                ErrorCode::INVALID_REQUEST,
                ErrorCode::TOO_LARGE,
                ErrorCode::CORRUPT_BATCH,
                ErrorCode::SHUTTING_DOWN,
            ]
            .contains(code) =>
        {
            SendOutcome::Failed
        }
        Err(ClientError::Invalid(_)) => SendOutcome::Failed,
        Err(_) => SendOutcome::Unknown,
    }
}

/// Runs the workload against `cfg.brokers` and checks its history. Faults hit `cfg.pids`
/// (kill, pause) and `cfg.partition_addrs` (partition); cluster faults need [`run_cluster`].
pub fn run(cfg: VerifyConfig) -> Result<Verdict> {
    if let Some(f) = cfg.faults.iter().find(|f| f.needs_cluster()) {
        bail!("--faults {f} needs a cluster started by skein-loadgen (--cluster-bin)");
    }
    run_with(cfg, None)
}

/// Runs the workload against `cluster` (its addresses replace `cfg.brokers`): faults hit its
/// nodes and their network, every fault is healed at the end (paused nodes resumed, dead ones
/// restarted, cuts removed) before the final read.
pub fn run_cluster(cfg: VerifyConfig, cluster: &mut LocalCluster) -> Result<Verdict> {
    let nodes = u32::try_from(cluster.ids().count()).unwrap_or(u32::MAX);
    let cfg = VerifyConfig { brokers: cluster.bootstrap(), nodes, ..cfg };
    run_with(cfg, Some(cluster))
}

fn run_with(cfg: VerifyConfig, cluster: Option<&mut LocalCluster>) -> Result<Verdict> {
    if cfg.faults.contains(&Fault::KillCoordinator) && !cfg.transactions {
        bail!("--faults kill-coordinator needs --transactions");
    }
    if cfg.resizes > 0 && !cfg.partitioning.ranged() {
        bail!("--resizes needs a ranged topic (--partitioning hash-range or key-range)");
    }
    if cfg.partitioning.ranged() && (cfg.transactions || cfg.read_your_writes || cfg.keys == 0) {
        bail!("a ranged topic takes neither --transactions nor --read-your-writes, and needs --keys of at least 1");
    }
    if cluster.is_none() {
        check_process_targets(&cfg)?;
    }
    let partitions = create_topic(&cfg)?;
    if let Some(cluster) = cluster.as_deref() {
        wait_for_leaders(&cfg.topic, partitions, cluster)?;
    }
    let start = Instant::now();
    let ops: Arc<Mutex<Vec<check::Op>>> = Arc::default();
    let reads: Arc<Mutex<ReadStats>> = Arc::default();
    let txns: Arc<Mutex<Vec<Txn>>> = Arc::default();
    let reached: Arc<Mutex<Vec<Reached>>> = Arc::default();
    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..cfg.producers {
        let (cfg, ops, stop, reads) = (cfg.clone(), ops.clone(), stop_producers.clone(), reads.clone());
        let stop_reads = stop_consumers.clone();
        if cfg.transactions {
            let txns = txns.clone();
            threads.push(std::thread::spawn(move || txn_producer(i, &cfg, partitions, start, &txns, &stop)));
            continue;
        }
        threads
            .push(std::thread::spawn(move || producer(i, &cfg, partitions, start, &ops, &stop, (&reads, &stop_reads))));
    }
    // With transactions, one more reader reads uncommitted.
    let uncommitted = cfg.transactions.then_some((cfg.producers + cfg.consumers) as u32);
    for i in 0..cfg.consumers + usize::from(cfg.transactions) {
        let (cfg, ops, stop, reads) = (cfg.clone(), ops.clone(), stop_consumers.clone(), reads.clone());
        let reached = reached.clone();
        let process = (cfg.producers + i) as u32;
        let isolation =
            if Some(process) == uncommitted { Isolation::ReadUncommitted } else { Isolation::ReadCommitted };
        threads.push(std::thread::spawn(move || {
            let rt = compio::runtime::Runtime::new()?;
            rt.block_on(async {
                let reader = Reader {
                    process,
                    cfg: &cfg,
                    partitions,
                    start,
                    final_read: false,
                    session: session(&cfg),
                    isolation,
                    reached: Some(&*reached),
                };
                reader.run(&ops, &stop, &reads).await
            })
        }));
    }
    let resizer = (cfg.resizes > 0).then(|| {
        let cfg = cfg.clone();
        std::thread::spawn(move || resize(&cfg, start))
    });
    let faults = match cluster {
        Some(cluster) => inject_cluster_faults(&cfg, cluster, partitions, start),
        None => inject_faults(&cfg, start),
    };
    let resizes = match resizer.map(std::thread::JoinHandle::join) {
        None => Vec::new(),
        Some(Ok(r)) => r?,
        Some(Err(_)) => bail!("the resizing thread panicked"),
    };
    stop_producers.store(true, Ordering::Relaxed);
    // Let consumers see the tail, then stop them.
    std::thread::sleep(Duration::from_secs(2));
    stop_consumers.store(true, Ordering::Relaxed);
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => bail!("a workload thread panicked"),
        }
    }
    let fault_log = faults?;
    let rt = compio::runtime::Runtime::new()?;
    // With transactions: every producer ended its transactions, so every partition's last
    // stable offset must reach its high watermark (at the latest when the coordinator aborts
    // a transaction left open, after its timeout).
    let stuck = if cfg.transactions {
        rt.block_on(async {
            let client = Client::with_config(client_config(&cfg)).await?;
            let bound = cfg.transaction_timeout + STABLE_MARGIN;
            Ok::<_, anyhow::Error>(txn_verify::wait_stable(&client, &cfg.topic, partitions, bound).await)
        })
        .context("waiting for stable offsets")?
    } else {
        Vec::new()
    };
    // The final read: every partition from its start to its end (with resizes, every one the
    // topic has now, sealed ones included).
    let partitions = if cfg.partitioning.ranged() { create_topic(&cfg)? } else { partitions };
    let final_process = (cfg.producers + cfg.consumers + usize::from(cfg.transactions)) as u32;
    let done = Arc::new(AtomicBool::new(false));
    let final_cfg = VerifyConfig { read_from: ReadFrom::Leader, ..cfg.clone() };
    rt.block_on(async {
        let reader = Reader {
            process: final_process,
            cfg: &final_cfg,
            partitions,
            start,
            final_read: true,
            session: None,
            isolation: Isolation::ReadCommitted,
            reached: Some(&*reached),
        };
        reader.run(&ops, &done, &Mutex::default()).await
    })
    .context("final read")?;
    // With transactions, a second final read, uncommitted: where the markers and the aborted
    // records are (declared gaps for the base checks).
    let final_uncommitted = cfg.transactions.then_some(final_process + 1);
    if let Some(process) = final_uncommitted {
        rt.block_on(async {
            let reader = Reader {
                process,
                cfg: &final_cfg,
                partitions,
                start,
                final_read: true,
                session: None,
                isolation: Isolation::ReadUncommitted,
                reached: Some(&*reached),
            };
            reader.run(&ops, &done, &Mutex::default()).await
        })
        .context("final uncommitted read")?;
    }
    let reads = *reads.lock().expect("no thread panicked holding the lock");
    let mut all = std::mem::take(&mut *ops.lock().expect("no thread panicked holding the lock"));
    let txns = std::mem::take(&mut *txns.lock().expect("no thread panicked holding the lock"));
    all.extend(txn_verify::sends(&txns));
    // The read_uncommitted reader's polls show aborted values: the base checks take the
    // read_committed reads only, the transaction checks take both.
    let uncommitted: Vec<u32> = uncommitted.into_iter().chain(final_uncommitted).collect();
    let txn_reads = txn_reads(&all, &uncommitted);
    if let Some(process) = final_uncommitted {
        let reached = reached.lock().expect("no thread panicked holding the lock");
        all.extend(txn_verify::gaps(&txns, &txn_reads, &reached, process));
    }
    all.retain(|op| !matches!(op, check::Op::Poll(p) if uncommitted.contains(&p.process.0)));
    all.sort_by_key(|op| match op {
        check::Op::Send(s) => s.invoke_us,
        check::Op::Poll(p) => p.invoke_us,
        check::Op::Gap(_) => 0,
    });
    let mut history = History::new();
    for op in all {
        history.push(op);
    }
    let excused = if cfg.acks == Acks::Leader { excuse_losses(&mut history, &fault_log, cfg.loss_window) } else { 0 };
    if let Some(path) = &cfg.history {
        let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        history.write_json_lines(std::io::BufWriter::new(f)).with_context(|| format!("writing {}", path.display()))?;
    }
    let report = check::check(&history);
    let txn = cfg.transactions.then(|| {
        let reached = reached.lock().expect("no thread panicked holding the lock");
        txn_check::check(&txns, &txn_reads, &reached, &stuck, partitions)
    });
    Ok(Verdict { history, report, faults: fault_log.len(), fault_log, excused, reads, txn, resizes })
}

/// Every poll as the transaction checks take it (`uncommitted`: the read_uncommitted reader).
fn txn_reads(ops: &[check::Op], uncommitted: &[u32]) -> Vec<txn_check::Read> {
    ops.iter()
        .filter_map(|op| match op {
            check::Op::Poll(p) => Some(txn_check::Read {
                process: p.process.0,
                committed: !uncommitted.contains(&p.process.0),
                partition: p.partition.0,
                records: p.records.iter().map(|(o, v)| (o.0, v.0)).collect(),
                complete_us: p.complete_us,
            }),
            _ => None,
        })
        .collect()
}

/// A transactional producer thread: its transactions go to `txns`.
fn txn_producer(
    index: usize,
    cfg: &VerifyConfig,
    partitions: u32,
    start: Instant,
    txns: &Mutex<Vec<Txn>>,
    stop: &AtomicBool,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    let producer = txn_verify::TxnProducerConfig {
        index,
        topic: &cfg.topic,
        client: client_config(cfg),
        partitions,
        rate: cfg.rate,
        start,
        transaction_timeout: cfg.transaction_timeout,
    };
    let done = rt.block_on(txn_verify::produce(&producer, stop))?;
    txns.lock().expect("no thread panicked holding the lock").extend(done);
    Ok(())
}

/// Added to the transaction timeout for the end-of-run wait for stable offsets (the
/// coordinator's timeout check runs on its tick, and its abort markers must be written).
const STABLE_MARGIN: Duration = Duration::from_secs(15);

/// With `acks=leader`: turns every acknowledged send missing from the final read whose
/// acknowledgement falls in a fault's loss window into an unknown outcome, and returns how
/// many. A fault counts for a send if it hit a node leading the send's partition (or a node
/// of unknown leadership) and began
///
/// - at most `window.before` after the acknowledgement (the leader acknowledged within a
///   lease of losing its place), with the acknowledgement arriving before the fault ended plus
///   `window.detection` (a paused or cut-off leader's answer to a record it appended just
///   before the fault arrives when the fault ends), or
/// - after the send was invoked and before it was acknowledged (the leader appended it, then
///   stopped; the answer left when it resumed).
///
/// Losses outside every window stay acknowledged, so `lost-write` reports them.
pub fn excuse_losses(history: &mut History, faults: &[FaultEvent], window: LossWindow) -> u64 {
    let mut read: BTreeMap<u32, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for op in &history.ops {
        if let check::Op::Poll(p) = op {
            if p.final_read {
                read.entry(p.partition.0).or_default().extend(p.records.iter().map(|(_, v)| v.0));
            }
        }
    }
    let before_us = u64::try_from(window.before.as_micros()).unwrap_or(u64::MAX);
    let detection_us = u64::try_from(window.detection.as_micros()).unwrap_or(u64::MAX);
    let mut excused = 0;
    for op in &mut history.ops {
        let check::Op::Send(s) = op else { continue };
        let SendOutcome::Ok { partition, .. } = s.outcome else { continue };
        if read.get(&partition.0).is_some_and(|r| r.contains(&s.value.0)) {
            continue;
        }
        let (invoked, acked) = (s.invoke_us, s.complete_us);
        let in_window = faults.iter().any(|f| {
            let hits = f.partitions.is_empty() || f.partitions.contains(&partition.0);
            let until = f.start_us.max(f.end_us).saturating_add(detection_us);
            let near_ack = acked <= until && f.start_us <= acked.saturating_add(before_us);
            let in_flight = f.start_us >= invoked && f.start_us <= acked;
            hits && (near_ack || in_flight)
        });
        if in_window {
            s.outcome = SendOutcome::Unknown;
            excused += 1;
        } else {
            tracing::warn!(
                value = s.value.0,
                partition = partition.0,
                acked_us = acked,
                "acks=leader loss outside every window"
            );
        }
    }
    excused
}

fn check_process_targets(cfg: &VerifyConfig) -> Result<()> {
    if cfg.faults.contains(&Fault::Kill) && cfg.restart.len() != cfg.pids.len() {
        bail!("--faults kill needs one --restart command per --pids entry");
    }
    let process_faults = cfg.faults.iter().any(|f| *f != Fault::Partition);
    if process_faults && cfg.pids.is_empty() {
        bail!("--faults kill or pause needs --pids");
    }
    if cfg.faults.contains(&Fault::Partition) && cfg.partition_addrs.is_empty() && broker_addrs(cfg)?.is_empty() {
        bail!("--faults partition needs --partition-addrs or --brokers");
    }
    Ok(())
}

fn broker_addrs(cfg: &VerifyConfig) -> Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut addrs = Vec::new();
    for b in cfg.brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        addrs.extend(b.to_socket_addrs().with_context(|| format!("resolving {b}"))?.next());
    }
    Ok(addrs)
}

/// Creates the topic (if missing) and returns its partition count.
fn create_topic(cfg: &VerifyConfig) -> Result<u32> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::connect(&cfg.brokers).await.with_context(|| format!("connecting to {}", cfg.brokers))?;
        let created =
            client.create_topic_with(&cfg.topic, cfg.partitions, cfg.replicas, cfg.partitioning, &cfg.topic_configs);
        match created.await {
            Ok(()) | Err(ClientError::Broker(ErrorCode::TOPIC_ALREADY_EXISTS, _)) => {}
            Err(e) => return Err(e).context("creating the topic"),
        }
        Ok::<_, anyhow::Error>(client.partition_count(&cfg.topic).await?)
    })
}

/// Waits until every partition of `topic` has a leader (topic creation goes through the
/// controller, so a new topic's partitions get leaders a moment later).
fn wait_for_leaders(topic: &str, partitions: u32, cluster: &LocalCluster) -> Result<()> {
    let probe = Probe::new(cluster.addrs(), PROBE_TIMEOUT)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views = probe.partitions(topic).unwrap_or_default();
        let led = views.values().filter(|v| v.leader != 0).count();
        if led as u32 >= partitions {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{topic}: {led} of {partitions} partitions have a leader after 30 s: {views:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn producer(
    index: usize,
    cfg: &VerifyConfig,
    partitions: u32,
    start: Instant,
    ops: &Arc<Mutex<Vec<check::Op>>>,
    stop: &AtomicBool,
    (reads, stop_reads): (&Arc<Mutex<ReadStats>>, &Arc<AtomicBool>),
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::with_config(client_config(cfg)).await?;
        let session = session(cfg);
        // Reads in the producer's own session, under its process id (read-after-write).
        let own_reads = cfg.read_your_writes.then(|| {
            let (cfg, ops, reads, stop) = (cfg.clone(), ops.clone(), reads.clone(), stop_reads.clone());
            let session = session.clone();
            compio::runtime::spawn(async move {
                let process = index as u32;
                let reader = Reader {
                    process,
                    cfg: &cfg,
                    partitions,
                    start,
                    final_read: false,
                    session,
                    isolation: Isolation::ReadCommitted,
                    reached: None,
                };
                reader.run(&ops, &stop, &reads).await
            })
        });
        let config = ProducerConfig {
            session: session.clone(),
            acks: cfg.acks,
            linger: Duration::ZERO,
            retries: 20,
            retry_backoff: Duration::from_millis(100),
            request_timeout_ms: 5_000,
            idempotence: true,
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let sent: Rc<RefCell<Vec<check::Op>>> = Rc::default();
        let gap = Duration::from_secs_f64(1.0 / cfg.rate.max(0.001));
        let mut next = Instant::now();
        let mut k: u64 = 0;
        let process = check::ProcessId(index as u32);
        let ranged = cfg.partitioning.ranged();
        while !stop.load(Ordering::Relaxed) {
            let partition = ((k + index as u64) % u64::from(partitions)) as u32;
            let value = ((index as u64 + 1) << 40) | k;
            // Keyed by the range map (ranged topics), else aimed at partitions in turn.
            let key = ranged.then(|| (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) % cfg.keys);
            let key_bytes = key.map(|n| format!("k{n}"));
            let aim = (!ranged).then_some(partition);
            k += 1;
            let invoke_us = micros(start);
            let op = move |r: &Result<(u32, u64), ClientError>| {
                check::Op::Send(SendOp {
                    process,
                    partition: aim.map(check::PartitionId),
                    key: key.map(check::Key),
                    value: check::Value(value),
                    invoke_us,
                    complete_us: micros(start).max(invoke_us),
                    outcome: outcome(r),
                })
            };
            let log = sent.clone();
            let result = producer
                .send_with(&cfg.topic, aim, key_bytes.as_deref().map(str::as_bytes), &value.to_le_bytes(), move |r| {
                    log.borrow_mut().push(op(&r))
                })
                .await;
            if let Err(e) = result {
                sent.borrow_mut().push(op(&Err(e)));
            }
            pace(&mut next, gap).await;
        }
        producer.flush().await;
        ops.lock().expect("no thread panicked holding the lock").extend(sent.take());
        match own_reads {
            Some(task) => task.await.unwrap_or_else(|_| Err(anyhow::anyhow!("a producer's reader panicked"))),
            None => Ok(()),
        }
    })
}

/// A new session for a reader or producer, none with [`VerifyConfig::unsafe_reads`].
fn session(cfg: &VerifyConfig) -> Option<SessionHandle> {
    (!cfg.unsafe_reads).then(SessionHandle::default)
}

/// One reading session of `verify`: every partition from the beginning, recording each poll
/// that returned records (with the high watermark its answer reported).
///
/// The consumer pipelines (the next fetch leaves before a poll returns), so a poll's answer
/// may come from a fetch sent during the previous poll: each poll is recorded as invoked when
/// the previous one was, which only makes the read-after-write check count fewer writes as
/// "before" it, never one its fetch could not have known.
struct Reader<'a> {
    process: u32,
    cfg: &'a VerifyConfig,
    partitions: u32,
    start: Instant,
    final_read: bool,
    session: Option<SessionHandle>,
    isolation: Isolation,
    /// Where each partition's reading ended, with transactions (for the torn-transaction
    /// check).
    reached: Option<&'a Mutex<Vec<Reached>>>,
}

impl Reader<'_> {
    async fn run(self, ops: &Mutex<Vec<check::Op>>, stop: &AtomicBool, stats: &Mutex<ReadStats>) -> Result<()> {
        let cfg = self.cfg;
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = loop {
            match Client::with_config(client_config(cfg)).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "consumer connect failed; retrying");
                    compio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("connecting"),
            }
        };
        let all: Vec<u32> = (0..self.partitions).collect();
        let mut ends = BTreeMap::new();
        if self.final_read {
            for &p in &all {
                let end = loop {
                    // With transactions the end a read_committed reader reaches is the last
                    // stable offset.
                    let isolation = if cfg.transactions { self.isolation } else { Isolation::ReadUncommitted };
                    match client.list_offset_isolated(&cfg.topic, p, skein_client::wire::LATEST, isolation).await {
                        Ok(o) => break o,
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(error = %e, "list offsets failed; retrying");
                            compio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e).context("reading the end offsets"),
                    }
                };
                ends.insert(p, end);
            }
        }
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(200),
            session: self.session.clone(),
            // One batch per answer while the workload runs: readers then often know a high
            // watermark beyond their position, which a replica further behind must not undo.
            partition_max_bytes: if self.final_read { ConsumerConfig::default().partition_max_bytes } else { 1 },
            isolation: self.isolation,
            ..ConsumerConfig::default()
        };
        let lookup = client.clone();
        let mut consumer = Consumer::new(client, config);
        // A ranged topic is followed through its lineage (parents read to their seals before
        // their children); the final read takes every partition as it stands.
        let follow = cfg.partitioning.ranged() && !self.final_read;
        let mut looked_up = Instant::now();
        if follow && !cfg.unsafe_ignore_lineage {
            consumer.follow(&cfg.topic, Position::Beginning).await?;
        } else {
            consumer.assign(&cfg.topic, &all, Position::Beginning).await?;
        }
        let mut recorded = Vec::new();
        let mut previous_invoke_us = micros(self.start);
        let mut polls: u32 = 0;
        loop {
            if self.final_read {
                let reached = all.iter().all(|&p| consumer.position(&cfg.topic, p).unwrap_or(0) >= ends[&p]);
                if reached {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the final read did not reach the end offsets {ends:?} within 60 s");
                }
            } else if stop.load(Ordering::Relaxed) {
                break;
            }
            if cfg.read_from == ReadFrom::Any {
                // Spread over every node, starting at a different one per session.
                let node = 1 + (polls + self.process) % cfg.nodes.max(1);
                consumer.set_prefer_replica(ReadReplica::Node(node));
            }
            polls = polls.wrapping_add(1);
            if follow && cfg.unsafe_ignore_lineage && looked_up.elapsed() > Duration::from_millis(250) {
                // The planted bug: new partitions taken at once, parents or not.
                looked_up = Instant::now();
                lookup.invalidate_metadata(&cfg.topic);
                if let Ok(count) = lookup.partition_count(&cfg.topic).await {
                    let assigned = consumer.assignment().len() as u32;
                    let new: Vec<u32> = (assigned..count).collect();
                    consumer.assign(&cfg.topic, &new, Position::Beginning).await?;
                }
            }
            // Positions before the poll (a partition the consumer starts following starts at 0).
            let before: BTreeMap<u32, u64> = consumer
                .assignment()
                .into_iter()
                .filter(|(t, _)| *t == cfg.topic)
                .map(|(_, p)| (p, consumer.position(&cfg.topic, p).unwrap_or(0)))
                .collect();
            let invoke_us = std::mem::replace(&mut previous_invoke_us, micros(self.start));
            let records = match consumer.poll().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "poll failed; retrying");
                    compio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let complete_us = micros(self.start);
            if !self.final_read && !cfg.reader_pause.is_zero() {
                compio::time::sleep(cfg.reader_pause).await;
            }
            let mut by_partition: BTreeMap<u32, Vec<(check::Offset, check::Value)>> = BTreeMap::new();
            for r in records {
                let value = r.value.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
                by_partition.entry(r.partition).or_default().push((check::Offset(r.offset), check::Value(value)));
            }
            for (p, records) in by_partition {
                recorded.push(check::Op::Poll(PollOp {
                    process: check::ProcessId(self.process),
                    partition: check::PartitionId(p),
                    from: check::Offset(before.get(&p).copied().unwrap_or(0)),
                    records,
                    // The answer that carried these records reported it.
                    high_watermark: consumer.high_watermark(&cfg.topic, p).map(check::Offset),
                    invoke_us,
                    complete_us,
                    final_read: self.final_read,
                }));
            }
        }
        ops.lock().expect("no thread panicked holding the lock").extend(recorded);
        if let (Some(reached), true) = (self.reached, cfg.transactions) {
            let mut reached = reached.lock().expect("no thread panicked holding the lock");
            for &p in &all {
                reached.push(Reached {
                    process: self.process,
                    committed: self.isolation == Isolation::ReadCommitted,
                    partition: p,
                    start: 0,
                    end: consumer.position(&cfg.topic, p).unwrap_or(0),
                });
            }
        }
        stats.lock().expect("no thread panicked holding the lock").add(&consumer.read_stats());
        Ok(())
    }
}

/// Splits and merges the topic `cfg.resizes` times, evenly over the run: splits of the last
/// open partition and merges of the first two open neighbours, alternating (a split when only
/// one partition is open). Returns one line per change.
fn resize(cfg: &VerifyConfig, start: Instant) -> Result<Vec<String>> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::with_config(client_config(cfg)).await?;
        let gap = cfg.duration / (cfg.resizes + 1);
        let mut done = Vec::new();
        for change in 0..cfg.resizes {
            compio::time::sleep((start + gap * (change + 1)).saturating_duration_since(Instant::now())).await;
            // The controller may be between leaders (faults): retry for a while.
            let deadline = Instant::now() + Duration::from_secs(30);
            let line = loop {
                let attempt = async {
                    let t = client.topic_metadata(&cfg.topic).await?;
                    let parts = open_ranges(&t);
                    let pair = parts.windows(2).find(|w| w[0].0.precedes(&w[1].0));
                    match pair {
                        Some(w) if change % 2 == 1 => {
                            let child = client.merge_partitions(&cfg.topic, [w[0].1, w[1].1]).await?;
                            Ok::<_, ClientError>(format!("merge {}, {} into {child}", w[0].1, w[1].1))
                        }
                        _ => {
                            let p = parts.last().map_or(0, |(_, p)| *p);
                            let children = client.split_partition(&cfg.topic, p, None).await?;
                            Ok(format!("split {p} into {children:?}"))
                        }
                    }
                };
                match attempt.await {
                    Ok(line) => break line,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "resize failed; retrying");
                        client.invalidate_metadata(&cfg.topic);
                        compio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e).context("splitting or merging the topic"),
                }
            };
            done.push(format!("{line} at {:.3} s", start.elapsed().as_secs_f64()));
        }
        Ok(done)
    })
}

/// Injects faults into `cfg.pids` / `cfg.partition_addrs` until the run's duration is over;
/// each fault heals itself before the next.
fn inject_faults(cfg: &VerifyConfig, start: Instant) -> Result<Vec<FaultEvent>> {
    let partition_addrs = if cfg.partition_addrs.is_empty() { broker_addrs(cfg)? } else { cfg.partition_addrs.clone() };
    let mut pids = cfg.pids.clone();
    let mut log = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut schedule = FaultSchedule::new(cfg, start);
    while let Some(fault) = schedule.next(&mut seed) {
        let targets = if fault == Fault::Partition { partition_addrs.len() } else { pids.len() };
        let i = random(&mut seed, targets.max(1));
        let start_us = micros(start);
        match fault {
            Fault::Partition => {
                let addr = partition_addrs[i];
                let ms = hold_ms(&mut seed);
                let cut = NetCut::new(addr)?;
                tracing::info!(%addr, ms, "partitioned");
                std::thread::sleep(Duration::from_millis(ms));
                drop(cut);
            }
            Fault::Pause => {
                signal(pids[i], "STOP")?;
                let ms = hold_ms(&mut seed);
                std::thread::sleep(Duration::from_millis(ms));
                signal(pids[i], "CONT")?;
                tracing::info!(pid = pids[i], ms, "paused");
            }
            Fault::Kill => {
                signal(pids[i], "KILL")?;
                // Reap it if it is our child (tests); otherwise the operator's supervisor does.
                std::thread::sleep(Duration::from_millis(100));
                let out = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&cfg.restart[i])
                    .output()
                    .with_context(|| format!("running the restart command {:?}", cfg.restart[i]))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let pid = text.lines().next().and_then(|l| l.trim().parse::<u32>().ok());
                let Some(pid) = pid else {
                    bail!("restart command {:?} printed no process id (stdout: {text:?})", cfg.restart[i]);
                };
                tracing::info!(old = pids[i], new = pid, "killed and restarted");
                pids[i] = pid;
            }
            other => bail!("--faults {other} needs a cluster started by skein-loadgen (--cluster-bin)"),
        }
        let node = i as u32 + 1;
        log.push(FaultEvent { fault, node, partitions: Vec::new(), start_us, end_us: micros(start) });
    }
    Ok(log)
}

/// Injects faults into `cluster` until the run's duration is over, then heals everything
/// (also when a fault failed).
fn inject_cluster_faults(
    cfg: &VerifyConfig,
    cluster: &mut LocalCluster,
    partitions: u32,
    start: Instant,
) -> Result<Vec<FaultEvent>> {
    let network = cfg.faults.iter().any(|f| matches!(f, Fault::Isolate | Fault::CutLeader | Fault::OneWay));
    let mut chaos = if network { Some(NetChaos::new(cluster.ips())?) } else { None };
    let mut log = Vec::new();
    let result = cluster_fault_loop(cfg, cluster, chaos.as_mut(), partitions, start, &mut log);
    let healed = chaos.as_mut().map_or(Ok(()), NetChaos::heal).and_then(|()| cluster.heal());
    result?;
    healed.context("healing the cluster")?;
    Ok(log)
}

fn cluster_fault_loop(
    cfg: &VerifyConfig,
    cluster: &mut LocalCluster,
    mut chaos: Option<&mut NetChaos>,
    partitions: u32,
    start: Instant,
    log: &mut Vec<FaultEvent>,
) -> Result<()> {
    let probe = Probe::new(cluster.addrs(), PROBE_TIMEOUT)?;
    let nodes = cluster.ids().count();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut schedule = FaultSchedule::new(cfg, start);
    while let Some(fault) = schedule.next(&mut seed) {
        let views = probe.partitions(&cfg.topic).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no leadership known before the fault");
            BTreeMap::new()
        });
        let partition = random(&mut seed, partitions as usize) as u32;
        let random_node = random(&mut seed, nodes) as u32 + 1;
        let leader = views.get(&partition).map_or(0, |v| v.leader);
        let node = match fault {
            Fault::KillLeader | Fault::PauseLeader | Fault::CutLeader | Fault::OneWay if leader != 0 => leader,
            Fault::KillCoordinator => {
                let id = txn_verify::transactional_id(&cfg.topic, random(&mut seed, cfg.producers));
                probe.transaction_coordinator(&id).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, id, "no transaction coordinator known; killing a random node");
                    random_node
                })
            }
            _ => random_node,
        };
        let controller = probe.controller();
        let follower =
            (fault == Fault::OneWay).then(|| follower_of(views.get(&partition), node, nodes as u32, &mut seed));
        let touched: Vec<u32> = std::iter::once(node).chain(follower).collect();
        // The partitions whose leadership the fault can end: those led by a node it touches
        // and, when it touches the active controller (whose loss delays every broker's lease
        // renewal, so any leader may be fenced), all of them.
        let led = if controller.is_some_and(|c| touched.contains(&c)) {
            Vec::new()
        } else {
            let mut led: Vec<u32> = touched.iter().flat_map(|&n| led_by(&views, n)).collect();
            if touched.iter().any(|&n| led_by(&views, n).is_empty()) {
                led.clear(); // unknown or no leadership for a touched node: every partition
            }
            led.sort_unstable();
            led.dedup();
            led
        };
        let hold = Duration::from_millis(hold_ms(&mut seed));
        let start_us = micros(start);
        tracing::info!(%fault, node, ?led, ?hold, "fault");
        match fault {
            Fault::Kill | Fault::KillLeader | Fault::KillCoordinator => {
                cluster.kill(node)?;
                std::thread::sleep(hold / 2);
                cluster.restart(node)?;
            }
            Fault::Pause | Fault::PauseLeader => {
                cluster.pause(node)?;
                std::thread::sleep(hold);
                cluster.resume(node)?;
            }
            Fault::Partition => {
                let cut = NetCut::new(cluster.addr(node))?;
                std::thread::sleep(hold);
                drop(cut);
            }
            Fault::Isolate | Fault::CutLeader | Fault::OneWay => {
                let chaos = chaos.as_deref_mut().context("network faults need the nft table")?;
                match fault {
                    Fault::Isolate => chaos.isolate(node)?,
                    Fault::CutLeader => chaos.cut_from_brokers(node)?,
                    _ => {
                        let follower = follower.context("a one-way fault has a follower")?;
                        if random(&mut seed, 2) == 0 {
                            chaos.one_way(node, follower)?;
                        } else {
                            chaos.one_way(follower, node)?;
                        }
                    }
                }
                std::thread::sleep(hold);
                chaos.heal()?;
            }
        }
        log.push(FaultEvent { fault, node, partitions: led, start_us, end_us: micros(start) });
    }
    Ok(())
}

/// The partitions `node` leads in `views`; empty (meaning: all) if leadership is unknown.
fn led_by(views: &BTreeMap<u32, PartitionView>, node: u32) -> Vec<u32> {
    if views.is_empty() {
        return Vec::new();
    }
    views.iter().filter(|(_, v)| v.leader == node).map(|(&p, _)| p).collect()
}

/// A replica of the partition other than `leader` (any other node if unknown).
fn follower_of(view: Option<&PartitionView>, leader: u32, nodes: u32, seed: &mut u64) -> u32 {
    let replicas: Vec<u32> =
        view.map(|v| v.replicas.iter().copied().filter(|&r| r != leader).collect()).unwrap_or_default();
    if replicas.is_empty() {
        let others: Vec<u32> = (1..=nodes).filter(|&n| n != leader).collect();
        return others.get(random(seed, others.len().max(1))).copied().unwrap_or(leader);
    }
    replicas[random(seed, replicas.len())]
}

/// When the fault threads inject their next fault, and which kind: every `fault_interval`
/// until `duration` has passed, the kinds of `faults` in turn from a random one (so a run of
/// at least as many faults as kinds injects every kind).
struct FaultSchedule<'a> {
    cfg: &'a VerifyConfig,
    start: Instant,
    next: Instant,
    turn: Option<usize>,
}

impl<'a> FaultSchedule<'a> {
    fn new(cfg: &'a VerifyConfig, start: Instant) -> Self {
        FaultSchedule { cfg, start, next: start + cfg.fault_interval, turn: None }
    }

    /// Sleeps until the next fault is due and returns its kind; `None` once the run is over.
    fn next(&mut self, seed: &mut u64) -> Option<Fault> {
        while self.start.elapsed() < self.cfg.duration {
            std::thread::sleep(Duration::from_millis(50));
            if self.cfg.faults.is_empty() || Instant::now() < self.next {
                continue;
            }
            self.next += self.cfg.fault_interval;
            let n = self.cfg.faults.len();
            let turn = self.turn.map_or_else(|| random(seed, n), |t| (t + 1) % n);
            self.turn = Some(turn);
            return Some(self.cfg.faults[turn]);
        }
        None
    }
}

/// Open-loop pacing: waits until `next + gap` (and moves `next` there); when behind
/// schedule, only yields and restarts the schedule from now.
pub(crate) async fn pace(next: &mut Instant, gap: Duration) {
    *next += gap;
    let now = Instant::now();
    if *next > now {
        compio::time::sleep(*next - now).await;
    } else {
        *next = now;
        skein_client::yield_now().await;
    }
}

fn random(seed: &mut u64, n: usize) -> usize {
    (skein_log::storage::splitmix(seed) % n.max(1) as u64) as usize
}

/// How long a pause or a cut lasts: 0.3 to 1.8 s, around the session timeout.
fn hold_ms(seed: &mut u64) -> u64 {
    300 + skein_log::storage::splitmix(seed) % 1500
}

/// The workload's connection settings: a request a paused or cut-off broker never answers
/// ends after [`CLIENT_REQUEST_TIMEOUT`] (recorded as unknown), not after the client's default
/// 30 s, so the workload keeps going through network faults.
fn client_config(cfg: &VerifyConfig) -> ClientConfig {
    ClientConfig { brokers: cfg.brokers.clone(), request_timeout: CLIENT_REQUEST_TIMEOUT, ..ClientConfig::default() }
}

/// Longer than the producers' own produce timeout (5 s), so the broker answers first when it
/// can.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(6);

/// Each broker's metadata answer is awaited this long before the fault thread moves on.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// An `nft` table dropping TCP packets to one address while it lives.
struct NetCut {
    table: String,
}

impl NetCut {
    fn new(addr: std::net::SocketAddr) -> Result<NetCut> {
        let table = format!("skein_verify_{}", std::process::id());
        let family = if addr.is_ipv4() { "ip" } else { "ip6" };
        let script = format!(
            "add table inet {table}\nadd chain inet {table} input {{ type filter hook input priority 0; }}\n\
             add rule inet {table} input {family} daddr {} tcp dport {} drop\n",
            addr.ip(),
            addr.port()
        );
        let cut = NetCut { table };
        nft(&script).context("installing the partition rule (needs root and nftables)")?;
        Ok(cut)
    }
}

impl Drop for NetCut {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
            tracing::error!(error = %e, table = %self.table, "could not remove the partition rule; delete the nft table by hand");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(value: u64, invoke_us: u64, complete_us: u64) -> check::Op {
        check::Op::Send(SendOp {
            process: check::ProcessId(0),
            partition: Some(check::PartitionId(0)),
            key: None,
            value: check::Value(value),
            invoke_us,
            complete_us,
            outcome: SendOutcome::Ok { partition: check::PartitionId(0), offset: check::Offset(value) },
        })
    }

    fn fault(start_us: u64, partitions: Vec<u32>) -> FaultEvent {
        FaultEvent { fault: Fault::KillLeader, node: 1, partitions, start_us, end_us: start_us + 1 }
    }

    /// Sends of values 0..n acknowledged at `acks[i]` (invoked 1 ms earlier), of which the
    /// final read saw `read`; returns which were excused.
    fn check(acks: &[u64], read: &[u64], faults: &[FaultEvent]) -> Vec<u64> {
        let mut history = History::new();
        for (v, &at) in acks.iter().enumerate() {
            history.push(send(v as u64, at.saturating_sub(1_000), at));
        }
        history.push(check::Op::Poll(PollOp {
            process: check::ProcessId(1),
            partition: check::PartitionId(0),
            from: check::Offset(0),
            records: read.iter().map(|&v| (check::Offset(v), check::Value(v))).collect(),
            high_watermark: None,
            invoke_us: 0,
            complete_us: 0,
            final_read: true,
        }));
        let window = LossWindow::new(Duration::from_millis(250), Duration::from_millis(100));
        let n = excuse_losses(&mut history, faults, window);
        let excused: Vec<u64> = history
            .ops
            .iter()
            .filter_map(|op| match op {
                check::Op::Send(s) if s.outcome == SendOutcome::Unknown => Some(s.value.0),
                _ => None,
            })
            .collect();
        assert_eq!(n as usize, excused.len());
        excused
    }

    #[test]
    fn losses_acknowledged_within_a_lease_of_the_fault_are_excused() {
        // Fault at 10 s; window 350 ms on both sides.
        let acks = [9_000_000, 9_700_000, 10_000_000, 10_300_000, 10_400_000];
        assert_eq!(check(&acks, &[], &[fault(10_000_000, vec![0])]), [1, 2, 3]);
    }

    #[test]
    fn records_read_back_or_on_other_partitions_are_not_excused() {
        let acks = [9_900_000, 9_950_000];
        assert_eq!(check(&acks, &[0], &[fault(10_000_000, vec![0])]), [1]);
        assert!(check(&acks, &[], &[fault(10_000_000, vec![2])]).is_empty());
        // Unknown leadership counts for every partition.
        assert_eq!(check(&acks, &[], &[fault(10_000_000, vec![])]), [0, 1]);
    }

    #[test]
    fn an_answer_delayed_by_the_fault_is_excused_until_the_fault_ends() {
        // Invoked just after the fault began (the leader appended it before it stopped), its
        // answer arrives when the 1 s pause ends; a later loss is not excused.
        let mut history = History::new();
        history.push(send(0, 10_002_000, 11_050_000));
        history.push(send(1, 11_500_000, 11_600_000));
        let window = LossWindow::new(Duration::from_millis(250), Duration::from_millis(100));
        let pause =
            FaultEvent { fault: Fault::Pause, node: 1, partitions: vec![0], start_us: 10_000_000, end_us: 11_000_000 };
        assert_eq!(excuse_losses(&mut history, &[pause], window), 1);
        let outcomes: Vec<bool> = history
            .ops
            .iter()
            .map(|op| matches!(op, check::Op::Send(s) if s.outcome == SendOutcome::Unknown))
            .collect();
        assert_eq!(outcomes, [true, false]);
    }

    #[test]
    fn a_request_in_flight_across_the_fault_is_excused() {
        // Invoked at 9.999 s, acknowledged after a 2 s pause of the leader.
        let mut history = History::new();
        history.push(send(0, 9_999_000, 12_000_000));
        let window = LossWindow::new(Duration::from_millis(250), Duration::from_millis(100));
        assert_eq!(excuse_losses(&mut history, &[fault(10_000_000, vec![0])], window), 1);
    }

    fn view(leader: u32, replicas: &[u32]) -> PartitionView {
        PartitionView { leader, leader_epoch: 1, replicas: replicas.to_vec(), isr: replicas.to_vec() }
    }

    #[test]
    fn faults_are_attributed_to_the_partitions_their_node_led() {
        let views: BTreeMap<u32, PartitionView> =
            [(0, view(1, &[1, 2, 3])), (1, view(2, &[2, 3, 1])), (2, view(1, &[3, 1, 2]))].into();
        assert_eq!(led_by(&views, 1), [0, 2]);
        assert!(led_by(&views, 3).is_empty());
        assert!(led_by(&BTreeMap::new(), 3).is_empty(), "unknown leadership: every partition");
        let mut seed = 7;
        for _ in 0..20 {
            let f = follower_of(views.get(&1), 2, 3, &mut seed);
            assert!(f == 3 || f == 1, "a replica other than the leader: {f}");
            let f = follower_of(None, 2, 3, &mut seed);
            assert!(f == 3 || f == 1, "without metadata, another node: {f}");
        }
    }

    #[test]
    fn fault_names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
        assert!("kill-everything".parse::<Fault>().unwrap_err().contains("cut-leader"));
    }
}
