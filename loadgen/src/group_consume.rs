//! `consume --group G --consumers N`: N group members (threads of this process, joining
//! `join_interval` apart) read a topic while a steady producer writes `produce_rate`
//! records/s over all its partitions; with `churn_interval`, the oldest member leaves (close:
//! commit and leave) and a new one joins that often. After `duration` the producer stops, the
//! members read until the group's lag is 0 (or `drain_timeout` passes) and close; the lag is
//! then read from the group's committed offsets against each partition's log end.
//!
//! The report counts records and rebalances (the members' own count of answers that changed
//! their partitions, and the rebalance windows [`crate::groups::analyze`] finds), and gives
//! the longest pause of a partition that kept its owner during a window, the longest pause of
//! a moved one, and the steady-state delivery gaps for comparison. Windows and pauses are
//! measured up to the moment the producer stops (afterwards partitions have no new records).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use skein_client::{Assignor, Client, GroupStats};

use crate::groups::{
    self, analyze, max_of, now_us, Event, EventKind, Feeder, GapSummary, MemberConfig, PartitionLag, WindowReport,
};
use crate::report::{self, Machine};

/// What `consume --group` runs.
#[derive(Clone, Debug)]
pub struct GroupLoadConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Topic (created if missing).
    pub topic: String,
    /// Partitions when creating the topic.
    pub partitions: u32,
    /// Replicas when creating the topic.
    pub replicas: u16,
    /// Configs when creating the topic.
    pub topic_configs: Vec<(String, String)>,
    /// The group.
    pub group: String,
    /// Members at a time.
    pub consumers: usize,
    /// Members' session timeout.
    pub session_timeout_ms: u32,
    /// Assignor.
    pub assignor: Assignor,
    /// Members' auto-commit interval.
    pub auto_commit: Duration,
    /// Records per second the producer writes over all partitions.
    pub produce_rate: f64,
    /// Value bytes per record.
    pub message_size: usize,
    /// How long the producer runs.
    pub duration: Duration,
    /// Time between the first members' joins.
    pub join_interval: Duration,
    /// Replace the oldest member this often (`None`: never).
    pub churn_interval: Option<Duration>,
    /// How long the members may take to read the rest once the producer stopped.
    pub drain_timeout: Duration,
    /// Print a progress line.
    pub progress: bool,
}

impl GroupLoadConfig {
    /// The settings as JSON, for the report.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": "consume-group", "brokers": self.brokers, "topic": self.topic,
            "partitions": self.partitions, "replicas": self.replicas, "topic_configs": self.topic_configs,
            "group": self.group, "consumers": self.consumers, "session_timeout_ms": self.session_timeout_ms,
            "assignor": self.assignor.name(), "auto_commit_ms": self.auto_commit.as_millis() as u64,
            "produce_rate": self.produce_rate, "message_size": self.message_size,
            "duration_s": self.duration.as_secs_f64(), "join_interval_ms": self.join_interval.as_millis() as u64,
            "churn_interval_ms": self.churn_interval.map(|d| d.as_millis() as u64),
            "drain_timeout_s": self.drain_timeout.as_secs_f64(),
        })
    }
}

/// The `--report` JSON of `consume --group` (**API boundary**: keys other tools read).
#[derive(Clone, Debug, Serialize)]
pub struct GroupLoadReport {
    /// Always `consume-group`.
    pub mode: String,
    /// The group.
    pub group: String,
    /// From the first member's start to the producer's stop.
    pub seconds: f64,
    /// Records the producer had acknowledged.
    pub records_produced: u64,
    /// Records the producer failed to write.
    pub produce_failures: u64,
    /// Records the members read, the drain after the producer stopped included.
    pub records_consumed: u64,
    /// Of those, records read while the producer ran.
    pub records_consumed_in_run: u64,
    /// `records_consumed_in_run / seconds`.
    pub records_per_sec: f64,
    /// The same in value bytes.
    pub bytes_per_sec: f64,
    /// Per partition at the end: log end, committed offset, lag.
    pub lag: Vec<PartitionLag>,
    /// Sum of the lags.
    pub lag_total: u64,
    /// Group activity.
    pub rebalances: Rebalances,
    /// The rebalance windows.
    pub windows: Vec<WindowReport>,
    /// The longest pause of a partition that kept its owner during a window (ms).
    pub unmoved_pause_ms_max: Option<f64>,
    /// The longest release-to-first-record pause of a moved partition (ms).
    pub moved_pause_ms_max: Option<f64>,
    /// Delivery gaps outside windows.
    pub steady_gap_ms: GapSummary,
    /// The settings.
    pub config: serde_json::Value,
    /// The commit measured.
    pub commit: String,
    /// Where it ran.
    pub machine: Machine,
}

/// Group activity over a run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rebalances {
    /// Rebalance windows (see the module header).
    pub windows: usize,
    /// Sum over members of heartbeat answers that changed their partitions.
    pub member_rebalances: u64,
    /// Members started.
    pub members_started: usize,
    /// Sum over members: joins.
    pub joins: u64,
    /// Partitions assigned.
    pub assigned: u64,
    /// Partitions revoked.
    pub revoked: u64,
    /// Partitions lost.
    pub lost: u64,
    /// Heartbeats answered.
    pub heartbeats: u64,
    /// Offset commits answered.
    pub commits: u64,
    /// Offset commits that failed.
    pub commit_failures: u64,
}

impl Rebalances {
    fn add(&mut self, s: &GroupStats) {
        self.member_rebalances += s.rebalances;
        self.joins += s.joins;
        self.assigned += s.assigned;
        self.revoked += s.revoked;
        self.lost += s.lost;
        self.heartbeats += s.heartbeats;
        self.commits += s.commits;
        self.commit_failures += s.commit_failures;
    }
}

/// Runs `consume --group`.
pub fn run(cfg: &GroupLoadConfig) -> Result<GroupLoadReport> {
    let partitions = groups::ensure_topic(&cfg.brokers, &cfg.topic, cfg.partitions, cfg.replicas, &cfg.topic_configs)?;
    let member_cfg = MemberConfig {
        brokers: cfg.brokers.clone(),
        topic: cfg.topic.clone(),
        group: cfg.group.clone(),
        session_timeout_ms: cfg.session_timeout_ms,
        assignor: cfg.assignor,
        auto_commit: cfg.auto_commit,
    };
    let feeder = Feeder::start(&cfg.brokers, &cfg.topic, partitions, cfg.produce_rate, cfg.message_size)?;
    let (tx, rx) = flume::unbounded::<Event>();
    let origin = now_us();
    let mut crew = Crew { cfg: member_cfg, tx, live: VecDeque::new(), gone: Vec::new(), started: 0 };
    let mut events = Vec::new();
    let started = Instant::now();
    let run_result = crew.run_schedule(cfg, started, &rx, &mut events);
    let horizon = now_us();
    let seconds = started.elapsed().as_secs_f64();
    let fed = feeder.stop();
    run_result?;
    let (records_produced, produce_failures) = fed?;
    let rt = compio::runtime::Runtime::new()?;
    let client =
        rt.block_on(Client::connect(&cfg.brokers)).with_context(|| format!("connecting to {}", cfg.brokers))?;
    let drain_deadline = Instant::now() + cfg.drain_timeout;
    while Instant::now() < drain_deadline {
        events.extend(rx.try_iter());
        let lag = rt.block_on(groups::lags(&client, &cfg.group, &cfg.topic, partitions))?;
        if lag.iter().all(|l| l.lag == 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rebalances, records_consumed) = crew.finish()?;
    events.extend(rx.try_iter());
    let lag = rt.block_on(groups::lags(&client, &cfg.group, &cfg.topic, partitions))?;
    if cfg.progress {
        eprintln!();
    }
    let records_consumed_in_run = delivered_until(&events, horizon);
    let analysis = analyze(&mut events, partitions, horizon);
    let windows: Vec<WindowReport> = analysis.windows.iter().map(|w| WindowReport::new(w, origin)).collect();
    let seconds = seconds.max(1e-9);
    Ok(GroupLoadReport {
        mode: "consume-group".into(),
        group: cfg.group.clone(),
        seconds,
        records_produced,
        produce_failures,
        records_consumed,
        records_consumed_in_run,
        records_per_sec: records_consumed_in_run as f64 / seconds,
        bytes_per_sec: (records_consumed_in_run * cfg.message_size as u64) as f64 / seconds,
        lag_total: lag.iter().map(|l| l.lag).sum(),
        lag,
        rebalances: Rebalances { windows: windows.len(), ..rebalances },
        unmoved_pause_ms_max: max_of(windows.iter().map(|w| w.unmoved_pause_ms)),
        moved_pause_ms_max: max_of(windows.iter().map(|w| w.moved_pause_ms)),
        windows,
        steady_gap_ms: GapSummary::of_sorted_us(&analysis.steady_gaps_us),
        config: cfg.to_json(),
        commit: report::commit(),
        machine: report::machine(),
    })
}

/// The table printed after a run.
pub fn table(r: &GroupLoadReport) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    let b = &r.rebalances;
    let mut out = format!("consume --group {}: {} members started, {:.1} s\n", r.group, b.members_started, r.seconds);
    out.push_str(&format!(
        "records      produced {}  consumed {} ({} while producing)  {:.0} rec/s  {:.2} MB/s\n",
        r.records_produced,
        r.records_consumed,
        r.records_consumed_in_run,
        r.records_per_sec,
        r.bytes_per_sec / 1e6
    ));
    let per: Vec<String> = r.lag.iter().map(|l| format!("{}:{}", l.partition, l.lag)).collect();
    out.push_str(&format!("lag          {} in total (partition:lag {})\n", r.lag_total, per.join(" ")));
    out.push_str(&format!(
        "rebalances   {} windows; members: {} rebalances, {} joins, {} assigned, {} revoked, {} lost, {} commits ({} failed)\n",
        b.windows, b.member_rebalances, b.joins, b.assigned, b.revoked, b.lost, b.commits, b.commit_failures
    ));
    out.push_str(&format!(
        "pauses       unmoved partitions during a rebalance: max {}; moved (release to first record): max {}\n",
        opt(r.unmoved_pause_ms_max),
        opt(r.moved_pause_ms_max)
    ));
    let s = r.steady_gap_ms;
    out.push_str(&format!(
        "steady gaps  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms ({} gaps outside windows)\n",
        s.p50, s.p99, s.max, s.count
    ));
    out.push_str(&groups::windows_table(&r.windows));
    out
}

/// Records delivered at or before `horizon_us`.
fn delivered_until(events: &[Event], horizon_us: u64) -> u64 {
    events
        .iter()
        .filter(|e| e.t_us <= horizon_us)
        .map(|e| match &e.kind {
            EventKind::Delivered(ds) => ds.iter().map(|(_, n)| n).sum(),
            _ => 0,
        })
        .sum()
}

/// The member threads.
struct Crew {
    cfg: MemberConfig,
    tx: flume::Sender<Event>,
    live: VecDeque<MemberThread>,
    gone: Vec<MemberThread>,
    started: usize,
}

struct MemberThread {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<(GroupStats, u64)>>,
}

impl Crew {
    /// Joins, churns and prints progress until `cfg.duration` passed (an event loop, bounded
    /// by the duration).
    fn run_schedule(
        &mut self,
        cfg: &GroupLoadConfig,
        started: Instant,
        rx: &flume::Receiver<Event>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let end = started + cfg.duration;
        let mut next_join = started;
        let mut next_churn = cfg.churn_interval.map(|c| started + cfg.join_interval * cfg.consumers as u32 + c);
        let mut last_progress = Instant::now();
        loop {
            events.extend(rx.try_iter());
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            if self.live.len() < cfg.consumers && now >= next_join {
                self.spawn()?;
                next_join += cfg.join_interval;
            }
            if let (Some(at), Some(every)) = (next_churn, cfg.churn_interval) {
                if now >= at {
                    self.retire_oldest();
                    self.spawn()?;
                    next_churn = Some(at + every);
                }
            }
            if let Some(failed) = self.live.iter().position(|m| m.handle.is_finished()) {
                let m = self.live.remove(failed).expect("index from position");
                return match m.handle.join() {
                    Ok(Ok(_)) => Err(anyhow::anyhow!("a member stopped on its own")),
                    Ok(Err(e)) => Err(e.context("a member failed")),
                    Err(_) => Err(anyhow::anyhow!("a member thread panicked")),
                };
            }
            if cfg.progress && last_progress.elapsed() >= Duration::from_millis(500) {
                last_progress = Instant::now();
                let read: u64 = delivered_until(events, u64::MAX);
                eprint!(
                    "\r{:>5.1}s  {} members  {} records read   ",
                    started.elapsed().as_secs_f64(),
                    self.live.len(),
                    read
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let index = self.started;
        let stop = Arc::new(AtomicBool::new(false));
        let (cfg, tx, flag) = (self.cfg.clone(), self.tx.clone(), stop.clone());
        let handle = std::thread::Builder::new().name(format!("member-{index}")).spawn(move || {
            groups::run_member(&cfg, index, &flag, &mut |e| {
                let _ = tx.send(e);
            })
        })?;
        self.live.push_back(MemberThread { stop, handle });
        self.started += 1;
        Ok(())
    }

    fn retire_oldest(&mut self) {
        if let Some(m) = self.live.pop_front() {
            m.stop.store(true, Ordering::Relaxed);
            self.gone.push(m);
        }
    }

    /// Closes every member; returns the sum of their statistics and records read.
    fn finish(&mut self) -> Result<(Rebalances, u64)> {
        while !self.live.is_empty() {
            self.retire_oldest();
        }
        let mut total = Rebalances { members_started: self.started, ..Rebalances::default() };
        let mut records = 0;
        let mut first_error = None;
        for m in self.gone.drain(..) {
            match m.handle.join() {
                Ok(Ok((stats, n))) => {
                    total.add(&stats);
                    records += n;
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow::anyhow!("a member thread panicked"));
                }
            }
        }
        match first_error {
            Some(e) => Err(e.context("a member failed")),
            None => Ok((total, records)),
        }
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        for m in self.live.iter().chain(&self.gone) {
            m.stop.store(true, Ordering::Relaxed);
        }
    }
}
