//! Consumer groups under load: `consume --group` (N [`GroupConsumer`]s in this process while a
//! steady producer writes to every partition) and the pieces [`crate::rebalance`] shares.
//!
//! Every member reports what happened to it as [`Event`]s stamped with the wall clock in µs
//! (the one clock child processes share with this one): a heartbeat answered (stamped when the
//! poll that sent it began, i.e. no later than the coordinator saw it), partitions assigned,
//! revoked or lost (stamped in the listener), and per poll the partitions it delivered records
//! of. [`analyze`] replays the events of all members in time order and finds the **rebalance
//! windows**: a window opens at any change of ownership (assigned, revoked, lost, or a killed
//! member's session expiry) and closes when every partition is owned again by a live member.
//! For each partition it measures the gaps between consecutive deliveries: a gap overlapping a
//! window counts for that window (as the pause of an *unmoved* partition if the partition kept
//! its owner through the window), a gap overlapping no window is a steady-state gap. A moved
//! partition's pause runs from its release (revoked, lost, or its owner's expiry) to its first
//! delivery at the new owner.
//!
//! Members here are threads, each with its own compio runtime (on 2 vCPUs with three brokers,
//! a thread per member keeps one slow member from delaying the others' heartbeats). Membership
//! changes during a run are graceful: `--churn-interval` closes the oldest member (it commits
//! and leaves) and starts a new one. Kills are the business of [`crate::rebalance`].
//!
//! Not measured: end-to-end latency of records (see `e2e`), several topics per group.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use skein_client::wire::{ErrorCode, LATEST};
use skein_client::{
    Acks, Assignor, Client, ClientError, ConsumerConfig, GroupConfig, GroupConsumer, GroupStats, Partition, Producer,
    ProducerConfig, RebalanceListener,
};

/// What one member saw, stamped with [`now_us`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Wall-clock µs since the Unix epoch.
    pub t_us: u64,
    /// The member (numbered by the run, from 0, never reused).
    pub member: usize,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of [`Event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A heartbeat was answered (stamped when the poll that sent it began).
    Heartbeat,
    /// These partitions were added.
    Assigned(Vec<u32>),
    /// These partitions were given up.
    Revoked(Vec<u32>),
    /// These partitions were lost (fenced, or the session ran out).
    Lost(Vec<u32>),
    /// A killed member's session ran out (added by the experiment, not by the member).
    Expired,
    /// One poll returned records of these partitions: `(partition, records)`.
    Delivered(Vec<(u32, u64)>),
}

impl Event {
    /// One line of a member process's standard output: `KIND T_US ARGS`.
    pub fn to_line(&self) -> String {
        let list = |ps: &[u32]| ps.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        match &self.kind {
            EventKind::Heartbeat => format!("hb {}", self.t_us),
            EventKind::Assigned(ps) => format!("assigned {} {}", self.t_us, list(ps)),
            EventKind::Revoked(ps) => format!("revoked {} {}", self.t_us, list(ps)),
            EventKind::Lost(ps) => format!("lost {} {}", self.t_us, list(ps)),
            EventKind::Expired => format!("expired {}", self.t_us),
            EventKind::Delivered(ds) => {
                let ds: Vec<String> = ds.iter().map(|(p, n)| format!("{p}:{n}")).collect();
                format!("d {} {}", self.t_us, ds.join(","))
            }
        }
    }

    /// Parses [`Event::to_line`] for `member`; `None` for any other line.
    pub fn from_line(member: usize, line: &str) -> Option<Event> {
        let mut words = line.split(' ');
        let kind = words.next()?;
        let t_us: u64 = words.next()?.parse().ok()?;
        let rest = words.next().unwrap_or("");
        let list =
            || -> Option<Vec<u32>> { rest.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().ok()).collect() };
        let kind = match kind {
            "hb" => EventKind::Heartbeat,
            "assigned" => EventKind::Assigned(list()?),
            "revoked" => EventKind::Revoked(list()?),
            "lost" => EventKind::Lost(list()?),
            "expired" => EventKind::Expired,
            "d" => EventKind::Delivered(
                rest.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let (p, n) = s.split_once(':')?;
                        Some((p.parse().ok()?, n.parse().ok()?))
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
            _ => return None,
        };
        Some(Event { t_us, member, kind })
    }
}

/// Wall-clock µs since the Unix epoch (comparable across processes of this machine).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// How a member joins.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// The topic subscribed to.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Session timeout asked for.
    pub session_timeout_ms: u32,
    /// Assignor asked for.
    pub assignor: Assignor,
    /// Auto-commit interval.
    pub auto_commit: Duration,
}

/// Runs one group member until `stop` is set, reporting every [`Event`] to `sink`; then
/// closes it (commit and leave). Returns its group statistics and the records it read.
pub fn run_member(
    cfg: &MemberConfig,
    member: usize,
    stop: &AtomicBool,
    sink: &mut dyn FnMut(Event),
) -> Result<(GroupStats, u64)> {
    let rt = compio::runtime::Runtime::new().context("starting a runtime")?;
    rt.block_on(async {
        let client = Client::connect(&cfg.brokers).await.with_context(|| format!("connecting to {}", cfg.brokers))?;
        let consumer = ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() };
        let group = GroupConfig {
            session_timeout_ms: cfg.session_timeout_ms,
            assignor: cfg.assignor,
            auto_commit: Some(cfg.auto_commit),
            ..GroupConfig::new(&cfg.group)
        };
        let mut gc = GroupConsumer::new(client, consumer, group);
        let changes = Rc::new(RefCell::new(Vec::new()));
        gc.set_listener(Box::new(Recorder { member, changes: changes.clone() }));
        gc.subscribe(&[&cfg.topic]);
        let mut records = 0u64;
        let mut failures = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let (began, heartbeats) = (now_us(), gc.stats().heartbeats);
            let polled = gc.poll().await;
            if gc.stats().heartbeats > heartbeats {
                sink(Event { t_us: began, member, kind: EventKind::Heartbeat });
            }
            for e in changes.borrow_mut().drain(..) {
                sink(e);
            }
            let batch = match polled {
                Ok(batch) => batch,
                Err(e) => {
                    failures += 1;
                    if failures > POLL_FAILURES_MAX {
                        return Err(e).context("polling the group");
                    }
                    tracing::warn!(member, error = %e, "poll failed");
                    compio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                continue;
            }
            let delivered = now_us();
            let mut per: Vec<(u32, u64)> = Vec::new();
            for r in &batch {
                match per.iter_mut().find(|(p, _)| *p == r.partition) {
                    Some(slot) => slot.1 += 1,
                    None => per.push((r.partition, 1)),
                }
            }
            records += batch.len() as u64;
            sink(Event { t_us: delivered, member, kind: EventKind::Delivered(per) });
        }
        let closed = gc.close().await;
        for e in changes.borrow_mut().drain(..) {
            sink(e);
        }
        if let Err(e) = closed {
            tracing::warn!(member, error = %e, "the final commit failed");
        }
        Ok((gc.stats(), records))
    })
}

/// The listener: stamps each change as it happens.
struct Recorder {
    member: usize,
    changes: Rc<RefCell<Vec<Event>>>,
}

impl Recorder {
    fn push(&self, kind: fn(Vec<u32>) -> EventKind, parts: &[Partition]) {
        let ps = parts.iter().map(|(_, p)| *p).collect();
        self.changes.borrow_mut().push(Event { t_us: now_us(), member: self.member, kind: kind(ps) });
    }
}

impl RebalanceListener for Recorder {
    fn on_assigned(&mut self, partitions: &[Partition]) {
        self.push(EventKind::Assigned, partitions);
    }
    fn on_revoked(&mut self, partitions: &[Partition]) {
        self.push(EventKind::Revoked, partitions);
    }
    fn on_lost(&mut self, partitions: &[Partition]) {
        self.push(EventKind::Lost, partitions);
    }
}

/// A producer thread writing `rate` records per second, dealt over every partition in turn,
/// so that every partition always has new records.
pub struct Feeder {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Feeder {
    /// Starts writing `rate` records/s of `message_size` bytes to `partitions` partitions.
    pub fn start(brokers: &str, topic: &str, partitions: u32, rate: f64, message_size: usize) -> Result<Feeder> {
        if rate.is_nan() || rate <= 0.0 {
            bail!("the produce rate must be above 0 records/s");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (acked, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
        let thread = {
            let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
            std::thread::Builder::new()
                .name("group-feeder".into())
                .spawn(move || feed(&brokers, &topic, partitions, rate, message_size, &stop, &acked, &failed))?
        };
        Ok(Feeder { stop, acked, failed, thread: Some(thread) })
    }

    /// Records acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops (after flushing); returns (acknowledged, failed).
    pub fn stop(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(r) => r.context("the producer failed")?,
                Err(_) => bail!("the producer thread panicked"),
            }
        }
        Ok((self.acked.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed)))
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn feed(
    brokers: &str,
    topic: &str,
    partitions: u32,
    rate: f64,
    message_size: usize,
    stop: &AtomicBool,
    acked: &Arc<AtomicU64>,
    failed: &Arc<AtomicU64>,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::connect(brokers).await.with_context(|| format!("connecting to {brokers}"))?;
        let config =
            ProducerConfig { acks: Acks::Leader, linger: Duration::from_millis(1), ..ProducerConfig::default() };
        let producer = Producer::new(client, config);
        let value = vec![b'g'; message_size];
        let start = Instant::now();
        let mut k: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            // Bounded work per turn: at most a burst of records, then the timer.
            for _ in 0..due.saturating_sub(k).min(FEED_BURST_MAX) {
                let counter = (acked.clone(), failed.clone());
                let on_done = move |r: skein_client::DeliveryResult| {
                    let counter = if r.is_ok() { &counter.0 } else { &counter.1 };
                    counter.fetch_add(1, Ordering::Relaxed);
                };
                let partition = (k % u64::from(partitions)) as u32;
                if let Err(e) = producer.send_with(topic, Some(partition), None, &value, on_done).await {
                    tracing::debug!(error = %e, "send failed");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                k += 1;
            }
            compio::time::sleep(FEED_TICK).await;
        }
        producer.flush().await;
        Ok(())
    })
}

/// Creates the topic if missing; returns its partition count.
pub fn ensure_topic(
    brokers: &str,
    topic: &str,
    partitions: u32,
    replicas: u16,
    configs: &[(String, String)],
) -> Result<u32> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::connect(brokers).await.with_context(|| format!("connecting to {brokers}"))?;
        match client.create_topic(topic, partitions, replicas, configs).await {
            Ok(()) | Err(ClientError::Broker(ErrorCode::TOPIC_ALREADY_EXISTS, _)) => {}
            Err(e) => return Err(e).context("creating the topic"),
        }
        Ok(client.partition_count(topic).await?)
    })
}

/// One partition's committed offset and log end at the end of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Partition.
    pub partition: u32,
    /// Log end (high watermark).
    pub log_end: u64,
    /// The group's committed offset (`None`: nothing committed).
    pub committed: Option<u64>,
    /// `log_end − committed` (the whole log if nothing is committed).
    pub lag: u64,
}

/// Per partition of `topic`: the group's committed offset against the log end.
pub async fn lags(client: &Client, group: &str, topic: &str, partitions: u32) -> Result<Vec<PartitionLag>> {
    let offsets = client.fetch_offsets(group, None).await.context("fetching the group's offsets")?;
    let mut out = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        let log_end = client.list_offset(topic, partition, LATEST).await.context("listing offsets")?;
        let committed = offsets
            .iter()
            .find(|o| o.topic == topic && o.partition == partition)
            .and_then(|o| u64::try_from(o.offset).ok());
        out.push(PartitionLag { partition, log_end, committed, lag: log_end.saturating_sub(committed.unwrap_or(0)) });
    }
    Ok(out)
}

/// What [`analyze`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Analysis {
    /// The rebalance windows, in time order.
    pub windows: Vec<Window>,
    /// Gaps between deliveries of a partition that overlap no window (µs), sorted.
    pub steady_gaps_us: Vec<u64>,
}

/// One rebalance window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    /// When it opened (wall-clock µs).
    pub start_us: u64,
    /// When every partition was owned again (`None`: still open at the end of the run).
    pub end_us: Option<u64>,
    /// Partitions that changed owner (or were released or assigned) in it.
    pub moved: Vec<u32>,
    /// Partitions that kept their owner.
    pub unmoved: u32,
    /// The longest delivery gap overlapping the window of a partition that kept its owner.
    pub unmoved_pause_us: Option<u64>,
    /// The longest release-to-first-delivery of a moved partition released in it.
    pub moved_pause_us: Option<u64>,
}

/// Replays `events` (sorted here by time; ties keep their order) up to `horizon_us` for a
/// topic of `partitions` partitions.
pub fn analyze(events: &mut [Event], partitions: u32, horizon_us: u64) -> Analysis {
    events.sort_by_key(|e| e.t_us);
    let mut a = Replay::new(partitions as usize);
    for e in events.iter().take_while(|e| e.t_us <= horizon_us) {
        a.step(e);
    }
    a.finish(horizon_us)
}

/// [`analyze`]'s state.
struct Replay {
    owner: Vec<Option<usize>>,
    last_delivery: Vec<Option<u64>>,
    /// Per partition: when it was released and in which window.
    released: Vec<Option<(u64, usize)>>,
    windows: Vec<OpenWindow>,
    steady: Vec<u64>,
}

struct OpenWindow {
    start: u64,
    end: Option<u64>,
    moved: BTreeSet<u32>,
    /// Per partition: the longest gap overlapping the window.
    gap_max: Vec<u64>,
    moved_pause: Option<u64>,
}

impl Replay {
    fn new(partitions: usize) -> Replay {
        Replay {
            owner: vec![None; partitions],
            last_delivery: vec![None; partitions],
            released: vec![None; partitions],
            windows: Vec::new(),
            steady: Vec::new(),
        }
    }

    fn step(&mut self, e: &Event) {
        let t = e.t_us;
        match &e.kind {
            EventKind::Heartbeat => return,
            EventKind::Delivered(ds) => {
                for &(p, _) in ds {
                    self.delivered(p as usize, t);
                }
                return;
            }
            EventKind::Assigned(ps) => {
                let w = self.open(t);
                let count = self.owner.len();
                for &p in ps.iter().filter(|p| (**p as usize) < count) {
                    if self.owner[p as usize] != Some(e.member) {
                        self.windows[w].moved.insert(p);
                        self.owner[p as usize] = Some(e.member);
                    }
                }
            }
            EventKind::Revoked(ps) | EventKind::Lost(ps) => {
                let w = self.open(t);
                for &p in ps {
                    self.release(p, e.member, t, w);
                }
            }
            EventKind::Expired => {
                let w = self.open(t);
                let owned: Vec<u32> = (0..self.owner.len() as u32).collect();
                for p in owned {
                    self.release(p, e.member, t, w);
                }
            }
        }
        if self.owner.iter().all(Option::is_some) {
            if let Some(w) = self.windows.last_mut().filter(|w| w.end.is_none()) {
                w.end = Some(t);
            }
        }
    }

    /// The open window's index (opened at `t` if none is).
    fn open(&mut self, t: u64) -> usize {
        if self.windows.last().is_none_or(|w| w.end.is_some()) {
            self.windows.push(OpenWindow {
                start: t,
                end: None,
                moved: BTreeSet::new(),
                gap_max: vec![0; self.owner.len()],
                moved_pause: None,
            });
        }
        self.windows.len() - 1
    }

    fn release(&mut self, p: u32, member: usize, t: u64, w: usize) {
        let i = p as usize;
        if self.owner.get(i).copied().flatten() == Some(member) {
            self.owner[i] = None;
            self.windows[w].moved.insert(p);
            self.released[i] = Some((t, w));
        }
    }

    fn delivered(&mut self, i: usize, t: u64) {
        if i >= self.owner.len() {
            return;
        }
        if let Some(from) = self.last_delivery[i] {
            if !self.gap(i, from, t) {
                self.steady.push(t - from);
            }
        }
        if let Some((at, w)) = self.released[i].take() {
            let pause = t.saturating_sub(at);
            let slot = &mut self.windows[w].moved_pause;
            *slot = Some(slot.map_or(pause, |m| m.max(pause)));
        }
        self.last_delivery[i] = Some(t);
    }

    /// Notes the gap `from..to` of partition `i` in every window it overlaps; whether any.
    fn gap(&mut self, i: usize, from: u64, to: u64) -> bool {
        let mut overlaps = false;
        for w in self.windows.iter_mut().rev() {
            if w.end.is_some_and(|end| end <= from) {
                break; // earlier windows end earlier still
            }
            if w.start < to {
                w.gap_max[i] = w.gap_max[i].max(to - from);
                overlaps = true;
            }
        }
        overlaps
    }

    fn finish(mut self, horizon: u64) -> Analysis {
        // A partition with no delivery since its last one, up to the end, paused that long.
        for i in 0..self.owner.len() {
            if let Some(from) = self.last_delivery[i] {
                self.gap(i, from, horizon);
            }
        }
        self.steady.sort_unstable();
        let windows = self
            .windows
            .into_iter()
            .map(|w| {
                let unmoved: Vec<usize> = (0..w.gap_max.len()).filter(|i| !w.moved.contains(&(*i as u32))).collect();
                Window {
                    start_us: w.start,
                    end_us: w.end,
                    unmoved: unmoved.len() as u32,
                    unmoved_pause_us: unmoved.iter().map(|i| w.gap_max[*i]).filter(|g| *g > 0).max(),
                    moved: w.moved.into_iter().collect(),
                    moved_pause_us: w.moved_pause,
                }
            })
            .collect();
        Analysis { windows, steady_gaps_us: self.steady }
    }
}

/// Median, 99th percentile and maximum of sorted samples (nearest rank), in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GapSummary {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl GapSummary {
    /// From µs samples sorted ascending.
    pub fn of_sorted_us(sorted: &[u64]) -> GapSummary {
        if sorted.is_empty() {
            return GapSummary::default();
        }
        let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        GapSummary { count: sorted.len(), p50: ms(rank(0.5)), p99: ms(rank(0.99)), max: ms(sorted[sorted.len() - 1]) }
    }
}

/// A window as reported: times in ms from the run's start.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowReport {
    /// When it opened, ms after the run started.
    pub start_ms: f64,
    /// How long until every partition was owned again (`None`: open at the end).
    pub length_ms: Option<f64>,
    /// Partitions that moved (or were released or assigned).
    pub moved: usize,
    /// Partitions that kept their owner.
    pub unmoved: u32,
    /// The longest delivery gap of an unmoved partition overlapping the window.
    pub unmoved_pause_ms: Option<f64>,
    /// The longest release-to-first-delivery of a moved partition.
    pub moved_pause_ms: Option<f64>,
}

impl WindowReport {
    /// `w` with times from `origin_us`.
    pub fn new(w: &Window, origin_us: u64) -> WindowReport {
        WindowReport {
            start_ms: ms(w.start_us.saturating_sub(origin_us)),
            length_ms: w.end_us.map(|e| ms(e - w.start_us)),
            moved: w.moved.len(),
            unmoved: w.unmoved,
            unmoved_pause_ms: w.unmoved_pause_us.map(ms),
            moved_pause_ms: w.moved_pause_us.map(ms),
        }
    }
}

/// The windows' table.
pub fn windows_table(windows: &[WindowReport]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let mut out = format!(
        "{:>10} {:>10} {:>6} {:>8} {:>17} {:>15}\n",
        "start s", "length ms", "moved", "unmoved", "unmoved pause ms", "moved pause ms"
    );
    for w in windows {
        out.push_str(&format!(
            "{:>10.3} {:>10} {:>6} {:>8} {:>17} {:>15}\n",
            w.start_ms / 1000.0,
            w.length_ms.map_or_else(|| "open".to_owned(), |l| format!("{l:.1}")),
            w.moved,
            w.unmoved,
            opt(w.unmoved_pause_ms),
            opt(w.moved_pause_ms)
        ));
    }
    out
}

/// The maximum of some optional values (`None` if all are).
pub fn max_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.flatten().reduce(f64::max)
}

/// µs as ms.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Failed polls (in all) after which a member gives up.
const POLL_FAILURES_MAX: u32 = 50;
/// The feeder's timer tick.
const FEED_TICK: Duration = Duration::from_millis(2);
/// Records the feeder sends per tick at most.
const FEED_BURST_MAX: u64 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// Events from a compact script: `(t_ms, member, kind)`; `horizon_ms` ends the run.
    fn check(
        partitions: u32,
        script: &[(u64, usize, EventKind)],
        horizon_ms: u64,
        expect: &[Window],
        steady_ms: &[u64],
    ) {
        let mut events: Vec<Event> =
            script.iter().map(|(t, m, k)| Event { t_us: t * 1000, member: *m, kind: k.clone() }).collect();
        let a = analyze(&mut events, partitions, horizon_ms * 1000);
        assert_eq!(a.windows, expect);
        assert_eq!(a.steady_gaps_us, steady_ms.iter().map(|m| m * 1000).collect::<Vec<_>>());
    }

    fn d(ps: &[u32]) -> EventKind {
        EventKind::Delivered(ps.iter().map(|p| (*p, 1)).collect())
    }

    fn w(
        start_ms: u64,
        end_ms: Option<u64>,
        moved: &[u32],
        unmoved: u32,
        unmoved_ms: Option<u64>,
        moved_ms: Option<u64>,
    ) -> Window {
        Window {
            start_us: start_ms * 1000,
            end_us: end_ms.map(|e| e * 1000),
            moved: moved.to_vec(),
            unmoved,
            unmoved_pause_us: unmoved_ms.map(|m| m * 1000),
            moved_pause_us: moved_ms.map(|m| m * 1000),
        }
    }

    #[test]
    fn a_revocation_opens_a_window_that_the_new_owner_closes() {
        use EventKind::*;
        check(
            2,
            &[
                (0, 0, Assigned(vec![0, 1])),
                (10, 0, d(&[0, 1])),
                (20, 0, d(&[0, 1])),
                (25, 0, Revoked(vec![1])),
                (40, 0, d(&[0])),
                (60, 1, Assigned(vec![1])),
                (70, 1, d(&[1])),
                (75, 0, d(&[0])),
                (85, 0, d(&[0])),
            ],
            90,
            // Startup closes at once; partition 0 stays with member 0: its gap 20..40 is
            // inside the window, 40..75 overlaps it (ends at 60); 1 moved: 25 → 70.
            &[w(0, Some(0), &[0, 1], 0, None, None), w(25, Some(60), &[1], 1, Some(35), Some(45))],
            &[10, 10, 10],
        );
    }

    #[test]
    fn an_expiry_releases_only_the_dead_members_partitions() {
        use EventKind::*;
        check(
            3,
            &[
                (0, 0, Assigned(vec![0])),
                (0, 1, Assigned(vec![1, 2])),
                (5, 0, d(&[0])),
                (5, 1, d(&[1, 2])),
                (10, 0, d(&[0])),
                (15, 1, d(&[1])),
                (100, 1, Expired), // member 1 was killed; 0 never expires
                (103, 0, d(&[0])),
                (150, 0, Assigned(vec![1, 2])),
                (160, 0, d(&[0, 1, 2])),
            ],
            200,
            &[w(0, Some(0), &[0, 1, 2], 0, None, None), w(100, Some(150), &[1, 2], 1, Some(93), Some(60))],
            &[5, 10],
        );
    }

    #[test]
    fn a_window_still_open_at_the_end_counts_gaps_to_the_end() {
        use EventKind::*;
        check(
            1,
            &[(0, 0, Assigned(vec![0])), (10, 0, d(&[0])), (20, 0, Lost(vec![0])), (30, 0, d(&[0]))],
            50,
            &[w(0, Some(0), &[0], 0, None, None), w(20, None, &[0], 0, None, Some(10))],
            &[],
        );
    }

    #[test]
    fn events_survive_their_line_format() {
        for kind in [
            EventKind::Heartbeat,
            EventKind::Assigned(vec![0, 5]),
            EventKind::Revoked(vec![3]),
            EventKind::Lost(vec![]),
            EventKind::Expired,
            EventKind::Delivered(vec![(1, 40), (2, 1)]),
        ] {
            let e = Event { t_us: 1_700_000_000_123_456, member: 4, kind };
            assert_eq!(Event::from_line(4, &e.to_line()), Some(e.clone()), "{}", e.to_line());
        }
        for bad in ["", "hb", "hb x", "assigned 5 1,x", "d 5 1", "other 5"] {
            assert_eq!(Event::from_line(0, bad), None, "{bad}");
        }
    }

    #[test]
    fn gap_summaries_use_nearest_rank() {
        let s = GapSummary::of_sorted_us(&(1..=100).map(|i| i * 1000).collect::<Vec<_>>());
        assert_eq!((s.count, s.p50, s.p99, s.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(GapSummary::of_sorted_us(&[]), GapSummary::default());
    }
}
