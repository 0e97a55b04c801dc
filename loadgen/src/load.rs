//! Produce, consume and end-to-end runs.
//!
//! Each producer and consumer is a thread with its own compio runtime and connection. With
//! `rate`, producers are open loop: record `k` of a producer is due at `start + k / rate` and
//! its latency counts from that intended time, so a stall that delays sending shows up in the
//! latency instead of hiding (no coordinated omission). Without `rate`, producers send as fast
//! as the producer's buffer allows (closed loop) and latency counts from the send call.
//!
//! Records sent during the warm-up are neither counted nor timed. Every thread sends its
//! latency histogram once per second (the interval log) and at the end; the main thread
//! merges them, prints progress and builds the report.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use skein_client::wire::ErrorCode;
use skein_client::{
    yield_now, Acks, Client, ClientError, Consumer, ConsumerConfig, DeliveryResult, Isolation, Position, Producer,
    ProducerConfig, ProducerRecord, ReadReplica, ReadStats, SessionHandle, TransactionalProducer, TrySend, TxnConfig,
};
use skein_log::types::Timestamp;

use crate::keys::{KeyDistribution, KeyGen};
use crate::report::{self, histogram, Report};

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Producers only; latency is the acknowledgement latency.
    Produce,
    /// Consumers only, reading what is there; latency is the fetch round trip.
    Consume,
    /// Producers and consumers at once; latency is send (intended) to receipt.
    E2e,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Produce => "produce",
            Mode::Consume => "consume",
            Mode::E2e => "e2e",
        }
    }
}

/// Settings of a load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
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
    /// Producer threads.
    pub producers: usize,
    /// Consumer threads.
    pub consumers: usize,
    /// Value bytes per record (at least 8: the send time rides in the first 8).
    pub message_size: usize,
    /// Keys.
    pub keys: KeyDistribution,
    /// Producer batch size.
    pub batch_bytes: usize,
    /// Producer linger.
    pub linger: Duration,
    /// Bytes a producer may buffer before sends wait.
    pub buffer_bytes: usize,
    /// Produce requests a producer keeps in flight per partition.
    pub in_flight_per_partition: usize,
    /// Durability to wait for.
    pub acks: Acks,
    /// Records to measure (across all producers, or consumers in consume mode).
    pub messages: Option<u64>,
    /// How long to measure when `messages` is not set.
    pub duration: Duration,
    /// Not measured, first.
    pub warmup: Duration,
    /// Records per second over all producers (open loop); `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Print a live progress line.
    pub progress: bool,
    /// Broker process whose CPU time to report.
    pub broker_pid: Option<u32>,
    /// Which replica consumers read from (followers serve with `closest` or a node id).
    pub prefer_replica: ReadReplica,
    /// The consumers' rack, for `closest`.
    pub rack: Option<String>,
    /// Producers are transactional, producer `i` with transactional id `ID-i`; each commits
    /// every `commit_interval` (and at the end). Only records of committed transactions count,
    /// and their latency runs to the commit's acknowledgement.
    pub transactional_id: Option<String>,
    /// With `transactional_id`: how long a transaction stays open.
    pub commit_interval: Duration,
    /// Which records of transactions consumers read.
    pub isolation: Isolation,
}

impl LoadConfig {
    /// The settings as JSON, for the report.
    pub fn to_json(&self, mode: Mode) -> serde_json::Value {
        serde_json::json!({
            "mode": mode.name(), "brokers": self.brokers, "topic": self.topic, "partitions": self.partitions,
            "replicas": self.replicas, "topic_configs": self.topic_configs, "producers": self.producers, "consumers": self.consumers,
            "message_size": self.message_size, "key_distribution": format!("{:?}", self.keys),
            "batch_bytes": self.batch_bytes, "linger_ms": self.linger.as_millis() as u64,
            "buffer_bytes": self.buffer_bytes, "in_flight_per_partition": self.in_flight_per_partition,
            "acks": format!("{:?}", self.acks).to_lowercase(), "messages": self.messages,
            "duration_s": self.duration.as_secs_f64(), "warmup_s": self.warmup.as_secs_f64(), "rate": self.rate,
            "prefer_replica": self.prefer_replica.to_string(), "rack": self.rack,
            "transactional_id": self.transactional_id,
            "commit_interval_ms": self.transactional_id.as_ref().map(|_| self.commit_interval.as_millis() as u64),
            "isolation": self.isolation.name(),
        })
    }
}

/// One second of latencies from one thread (index 0 is the first measured second).
struct Interval {
    index: usize,
    histogram: Histogram<u64>,
}

/// Counters the progress line reads.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    measured: AtomicU64,
    errors: AtomicU64,
    received: AtomicU64,
    /// The consumers' fetch statistics, added when each finishes.
    reads: std::sync::Mutex<ReadStats>,
    /// In e2e, the producers' acknowledgement latencies, added when each finishes.
    publish: std::sync::Mutex<Option<Histogram<u64>>>,
    /// Transactional producers' commit latencies, added when each finishes.
    commits: std::sync::Mutex<Option<Histogram<u64>>>,
}

/// A finished run: the report and the per-second histograms (for `--hdr`).
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// Merged latency histogram per measured second.
    pub intervals: Vec<Histogram<u64>>,
}

/// Runs a load and returns its report.
pub fn run(mode: Mode, cfg: LoadConfig) -> Result<Outcome> {
    if cfg.message_size < 8 {
        bail!("--message-size must be at least 8 bytes (the send time rides in the value)");
    }
    let partitions = ensure_topic(&cfg)?;
    let cfg = Arc::new(cfg);
    let counters = Arc::new(Counters::default());
    let (tx, rx) = flume::unbounded::<Interval>();
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let consumers = if mode == Mode::Produce { 0 } else { cfg.consumers.max(1) };
    let producers = if mode == Mode::Consume { 0 } else { cfg.producers.max(1) };
    let barrier = Arc::new(Barrier::new(consumers + producers + 1));
    let base_slot: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let mut threads = Vec::new();
    for i in 0..consumers {
        let parts: Vec<u32> = (0..partitions).filter(|p| *p as usize % consumers == i).collect();
        let from = if mode == Mode::E2e { Position::End } else { Position::Beginning };
        let (cfg, counters, tx, stop, barrier, base) =
            (cfg.clone(), counters.clone(), tx.clone(), stop_consumers.clone(), barrier.clone(), base_slot.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("consumer-{i}"))
                .spawn(move || consumer_thread(mode, cfg, parts, from, counters, tx, stop, barrier, base))?,
        );
    }
    let quota = cfg.messages.map(|m| m.div_ceil(producers.max(consumers) as u64));
    for i in 0..producers {
        let (cfg, counters, tx, barrier, base) =
            (cfg.clone(), counters.clone(), tx.clone(), barrier.clone(), base_slot.clone());
        let transactional = cfg.transactional_id.is_some();
        threads.push(std::thread::Builder::new().name(format!("producer-{i}")).spawn(move || {
            if transactional {
                txn_producer_thread(i, cfg, quota, counters, tx, barrier, base)
            } else {
                producer_thread(mode, i, cfg, quota, counters, tx, barrier, base)
            }
        })?);
    }
    drop(tx);
    barrier.wait();
    let base = *base_slot.get_or_init(Instant::now);
    let measure_start = base + cfg.warmup;
    // CPU seconds of (the broker, this process) over the measured part: from the end of the
    // warm-up (to the 50 ms of this loop) until the producers finish (or the consumers do).
    let cpu_now = || (cfg.broker_pid.and_then(cpu_seconds), cpu_seconds(std::process::id()), steal_seconds());
    let (mut cpu_start, mut cpu_end) = (None, None);
    let mut merged = Merge::default();
    let mut progress = Progress::new(cfg.progress, measure_start, &cfg);
    let mut producers_done_at = None;
    let mut threads_left = threads;
    let grace_deadline = |done: Instant| done + Duration::from_secs(10);
    loop {
        merged.drain(&rx);
        progress.tick(&counters, &merged);
        if cpu_start.is_none() && Instant::now() >= measure_start {
            cpu_start = Some(cpu_now());
        }
        let producers_done = threads_left
            .iter()
            .filter(|t| t.thread().name().is_some_and(|n| n.starts_with("producer")))
            .all(|t| t.is_finished());
        if producers_done && producers_done_at.is_none() {
            producers_done_at = Some(Instant::now());
            cpu_end = Some(cpu_now());
        }
        let all_done = threads_left.iter().all(|t| t.is_finished());
        if all_done {
            break;
        }
        if let Some(done) = producers_done_at {
            let consumed_enough = mode != Mode::E2e
                || counters.received.load(Ordering::Relaxed) >= counters.measured.load(Ordering::Relaxed)
                || Instant::now() >= grace_deadline(done);
            if mode == Mode::E2e && consumed_enough {
                stop_consumers.store(true, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let end = match mode {
        Mode::E2e | Mode::Produce => producers_done_at.unwrap_or_else(Instant::now),
        Mode::Consume => Instant::now(),
    };
    let (start, end_cpu) = (cpu_start.unwrap_or_else(cpu_now), cpu_end.unwrap_or_else(cpu_now));
    let used = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    let (cpu, own_cpu, steal) = (used(start.0, end_cpu.0), used(start.1, end_cpu.1), used(start.2, end_cpu.2));
    let mut failures = Vec::new();
    for t in threads_left.drain(..) {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("a load thread panicked".into()),
        }
    }
    merged.drain(&rx);
    progress.finish();
    if let Some(f) = failures.first() {
        bail!("load failed: {f}");
    }
    let messages = match mode {
        Mode::Produce => {
            counters.measured.load(Ordering::Relaxed)
                - counters.errors.load(Ordering::Relaxed).min(counters.measured.load(Ordering::Relaxed))
        }
        Mode::Consume | Mode::E2e => counters.received.load(Ordering::Relaxed),
    };
    let seconds = end.saturating_duration_since(measure_start).as_secs_f64().max(1e-9);
    let bytes = messages * cfg.message_size as u64;
    let report = Report {
        mode: mode.name().into(),
        messages,
        bytes,
        seconds,
        messages_per_sec: messages as f64 / seconds,
        bytes_per_sec: bytes as f64 / seconds,
        latency_us: report::latency(&merged.total),
        publish_latency_us: counters
            .publish
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(report::latency),
        commit_latency_us: counters
            .commits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(report::latency),
        config: cfg.to_json(mode),
        commit: report::commit(),
        machine: report::machine(),
        percentiles: report::percentile_points(&merged.total),
        broker_cpu_seconds: cpu,
        loadgen_cpu_seconds: own_cpu,
        steal_seconds: steal,
        errors: counters.errors.load(Ordering::Relaxed),
        reads: (mode != Mode::Produce)
            .then(|| report::Reads::from(&*counters.reads.lock().unwrap_or_else(|e| e.into_inner()))),
    };
    Ok(Outcome { report, intervals: merged.intervals })
}

/// Creates the topic if missing; returns its partition count.
fn ensure_topic(cfg: &LoadConfig) -> Result<u32> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::connect(&cfg.brokers).await.with_context(|| format!("connecting to {}", cfg.brokers))?;
        match client.create_topic(&cfg.topic, cfg.partitions, cfg.replicas, &cfg.topic_configs).await {
            Ok(()) | Err(ClientError::Broker(ErrorCode::TOPIC_ALREADY_EXISTS, _)) => {}
            Err(e) => return Err(e).context("creating the topic"),
        }
        Ok(client.partition_count(&cfg.topic).await?)
    })
}

#[allow(clippy::too_many_arguments)]
fn producer_thread(
    mode: Mode,
    index: usize,
    cfg: Arc<LoadConfig>,
    quota: Option<u64>,
    counters: Arc<Counters>,
    tx: flume::Sender<Interval>,
    barrier: Arc<Barrier>,
    base: Arc<std::sync::OnceLock<Instant>>,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = Client::connect(&cfg.brokers).await?;
        let config = ProducerConfig {
            acks: cfg.acks,
            batch_bytes_max: cfg.batch_bytes,
            linger: cfg.linger,
            buffer_bytes_max: cfg.buffer_bytes,
            max_in_flight_per_partition: cfg.in_flight_per_partition,
            // A benchmark measures queueing, not retries: the broker may hold an acks=all
            // produce this long (the client's default is 1 s, for fast failover).
            request_timeout_ms: 30_000,
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let mut keys = KeyGen::new(cfg.keys.clone(), 0x5EED + index as u64);
        let mut value = vec![b'x'; cfg.message_size];
        let rate = cfg.rate.map(|r| r / cfg.producers.max(1) as f64);
        barrier.wait();
        let base = *base.get_or_init(Instant::now);
        // Records carry a create time in wall-clock milliseconds: `base` on the wall clock plus
        // the record's intended send time, so sending reads no clock beyond the one below.
        let base_wall_ms = wall_ms_at(base);
        let measure_start = base + cfg.warmup;
        let end = measure_start + cfg.duration;
        // Shared with the per-record callbacks (same thread): latency histogram and counters.
        let tally = Rc::new(RefCell::new(Tally {
            clock: IntervalClock::new(measure_start),
            tx: tx.clone(),
            counters: counters.clone(),
            publish: histogram(),
        }));
        // Each record's tag is its intended send time in ns since `base`, with the top bit set
        // if it is measured: the outcome needs no allocation per record.
        {
            let tally = tally.clone();
            producer.on_delivery(move |tags, r| tally.borrow_mut().done(mode, base, tags, r));
        }
        let mut k: u64 = 0;
        let mut measured: u64 = 0;
        let mut key_buf = String::new();
        loop {
            let now = Instant::now();
            let finished = match quota {
                Some(q) => measured >= q,
                None => now >= end,
            };
            if finished {
                break;
            }
            // Open loop: record k is due at base + k / rate.
            let due = match rate {
                Some(r) => ((now.duration_since(base).as_secs_f64() * r) as u64 + 1).saturating_sub(k),
                None => BURST,
            };
            // Shared counters are updated once per burst: an atomic add per record on a cache
            // line every producer thread writes cost ~10 % of the load generator's CPU.
            let (sent_before, measured_before) = (k, measured);
            for _ in 0..due.min(BURST) {
                if quota.is_some_and(|q| measured >= q) {
                    break;
                }
                let intended = match rate {
                    Some(r) => base + Duration::from_secs_f64(k as f64 / r),
                    None => Instant::now(),
                };
                let nanos = u64::try_from(intended.duration_since(base).as_nanos()).unwrap_or(u64::MAX);
                value[..8].copy_from_slice(&nanos.to_le_bytes());
                let key = keys.next_key().map(|k| {
                    key_buf.clear();
                    key_buf.push_str("key-");
                    key_buf.push_str(&k.to_string());
                    key_buf.as_bytes()
                });
                let is_measured = intended >= measure_start;
                let tag = (nanos & !MEASURED) | if is_measured { MEASURED } else { 0 };
                let timestamp = Some(Timestamp(base_wall_ms + (nanos / 1_000_000) as i64));
                let record = ProducerRecord { key, timestamp, ..ProducerRecord::new(&cfg.topic, &value) };
                match producer.try_send_tagged(record, tag)? {
                    TrySend::Queued => {}
                    // Let the sender task take the full batch before more records are queued.
                    TrySend::Sealed => yield_now().await,
                    TrySend::WouldBlock => producer.send_tagged(record, tag).await?,
                }
                measured += u64::from(is_measured);
                k += 1;
            }
            counters.sent.fetch_add(k - sent_before, Ordering::Relaxed);
            counters.measured.fetch_add(measured - measured_before, Ordering::Relaxed);
            if let (Some(r), 0) = (rate, due) {
                let next = base + Duration::from_secs_f64(k as f64 / r);
                compio::time::sleep(next.saturating_duration_since(Instant::now()).max(Duration::from_micros(50)))
                    .await;
            } else {
                yield_now().await;
            }
        }
        producer.flush().await;
        let mut t = tally.borrow_mut();
        t.clock.flush(&tx);
        if mode == Mode::E2e {
            let mut total = counters.publish.lock().unwrap_or_else(|e| e.into_inner());
            let _ = total.get_or_insert_with(histogram).add(&t.publish);
        }
        Ok(())
    })
}

/// A transactional producer (see [`LoadConfig::transactional_id`]): sends through
/// [`TransactionalProducer::send`] (keyless records, sticky partitioning), commits every
/// `commit_interval`. A record counts once its transaction commits; its latency runs from its
/// intended send time to that commit's acknowledgement. The commit latency is the EndTxn round
/// trip: every record is flushed (acknowledged) before the commit call is timed.
#[allow(clippy::too_many_arguments)]
fn txn_producer_thread(
    index: usize,
    cfg: Arc<LoadConfig>,
    quota: Option<u64>,
    counters: Arc<Counters>,
    tx: flume::Sender<Interval>,
    barrier: Arc<Barrier>,
    base: Arc<std::sync::OnceLock<Instant>>,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = Client::connect(&cfg.brokers).await?;
        let id = format!("{}-{index}", cfg.transactional_id.as_deref().unwrap_or("loadgen"));
        let config = TxnConfig {
            producer: ProducerConfig {
                batch_bytes_max: cfg.batch_bytes,
                linger: cfg.linger,
                buffer_bytes_max: cfg.buffer_bytes,
                max_in_flight_per_partition: cfg.in_flight_per_partition,
                request_timeout_ms: 30_000,
                ..ProducerConfig::default()
            },
            ..TxnConfig::new(&id)
        };
        let mut p = TransactionalProducer::init(client, config)
            .await
            .map_err(|e| anyhow::anyhow!("initialising transactional id '{id}': {e}"))?;
        let mut value = vec![b'x'; cfg.message_size];
        let rate = cfg.rate.map(|r| r / cfg.producers.max(1) as f64);
        // Yield to the sender task about once per batch's worth of records.
        let per_yield = (cfg.batch_bytes / cfg.message_size.max(1)).max(1) as u64;
        barrier.wait();
        let base = *base.get_or_init(Instant::now);
        let measure_start = base + cfg.warmup;
        let end = measure_start + cfg.duration;
        let mut open = Open { clock: IntervalClock::new(measure_start), commits: histogram(), pending: Vec::new() };
        let (mut k, mut measured) = (0u64, 0u64);
        p.begin().map_err(|e| anyhow::anyhow!("begin: {e}"))?;
        let mut began = Instant::now();
        loop {
            let now = Instant::now();
            if quota.map_or(now >= end, |q| measured >= q) {
                break;
            }
            if now >= began + cfg.commit_interval {
                open.commit(&mut p, base, measure_start, &counters, &tx).await?;
                p.begin().map_err(|e| anyhow::anyhow!("begin: {e}"))?;
                began = Instant::now();
            }
            let intended = match rate {
                Some(r) => {
                    let due = base + Duration::from_secs_f64(k as f64 / r);
                    let wake = due.min(began + cfg.commit_interval);
                    if wake > Instant::now() {
                        compio::time::sleep(wake - Instant::now()).await;
                        continue;
                    }
                    due
                }
                None => now,
            };
            let nanos = u64::try_from(intended.duration_since(base).as_nanos()).unwrap_or(u64::MAX);
            value[..8].copy_from_slice(&nanos.to_le_bytes());
            // The delivery is not awaited: the commit (after a flush) says every record landed.
            drop(p.send(&cfg.topic, None, None, &value).await.map_err(|e| anyhow::anyhow!("send: {e}"))?);
            if intended >= measure_start {
                open.pending.push(nanos);
                measured += 1;
            }
            k += 1;
            if k % per_yield == 0 {
                counters.sent.fetch_add(per_yield, Ordering::Relaxed);
                yield_now().await;
            }
        }
        open.commit(&mut p, base, measure_start, &counters, &tx).await?;
        open.clock.flush(&tx);
        let mut total = counters.commits.lock().unwrap_or_else(|e| e.into_inner());
        let _ = total.get_or_insert_with(histogram).add(&open.commits);
        Ok(())
    })
}

/// The open transaction of [`txn_producer_thread`]: its measured records' intended send times
/// (ns since the run's base), and the thread's latency clocks.
struct Open {
    clock: IntervalClock,
    commits: Histogram<u64>,
    pending: Vec<u64>,
}

impl Open {
    /// Flushes and commits; on success counts the measured records and times them to now.
    async fn commit(
        &mut self,
        p: &mut TransactionalProducer,
        base: Instant,
        measure_start: Instant,
        counters: &Counters,
        tx: &flume::Sender<Interval>,
    ) -> Result<()> {
        p.flush().await.map_err(|e| anyhow::anyhow!("flushing the transaction: {e}"))?;
        let asked = Instant::now();
        p.commit().await.map_err(|e| anyhow::anyhow!("committing: {e}"))?;
        let now = Instant::now();
        if asked >= measure_start {
            report::record(&mut self.commits, now - asked);
        }
        for nanos in self.pending.drain(..) {
            let latency = now.saturating_duration_since(base + Duration::from_nanos(nanos));
            self.clock.record(now, latency, tx);
            counters.measured.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The tag bit of a measured record (the rest of the tag is its intended send time).
const MEASURED: u64 = 1 << 63;

/// A producer thread's outcomes, fed by the per-record callbacks.
struct Tally {
    clock: IntervalClock,
    tx: flume::Sender<Interval>,
    counters: Arc<Counters>,
    /// Acknowledgement latencies in e2e (where `clock` is not used by producers).
    publish: Histogram<u64>,
}

impl Tally {
    /// The outcome of records sent together (one clock read for all of them): each tag is a
    /// record's intended send time in ns since `base`, with [`MEASURED`] set if it counts.
    fn done(&mut self, mode: Mode, base: Instant, tags: &[u64], result: DeliveryResult) {
        if let Err(e) = result {
            if self.counters.errors.fetch_add(tags.len() as u64, Ordering::Relaxed) == 0 {
                tracing::warn!(error = %e, "a record failed");
            }
            return;
        }
        let now = Instant::now();
        for tag in tags.iter().filter(|t| *t & MEASURED != 0) {
            let latency = now.saturating_duration_since(base + Duration::from_nanos(tag & !MEASURED));
            match mode {
                Mode::Produce => self.clock.record(now, latency, &self.tx),
                Mode::E2e => report::record(&mut self.publish, latency),
                Mode::Consume => {}
            }
        }
    }
}

/// `at` on the wall clock, in milliseconds since the Unix epoch.
fn wall_ms_at(at: Instant) -> i64 {
    let wall = std::time::SystemTime::now() - Instant::now().saturating_duration_since(at);
    wall.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[allow(clippy::too_many_arguments)]
fn consumer_thread(
    mode: Mode,
    cfg: Arc<LoadConfig>,
    partitions: Vec<u32>,
    from: Position,
    counters: Arc<Counters>,
    tx: flume::Sender<Interval>,
    stop: Arc<AtomicBool>,
    barrier: Arc<Barrier>,
    base: Arc<std::sync::OnceLock<Instant>>,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = Client::connect(&cfg.brokers).await?;
        // Each consumer keeps a session, so its reads stay monotonic when they move between
        // replicas (a follower behind what it has seen waits, or sends it to the leader).
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(100),
            prefer_replica: cfg.prefer_replica,
            rack: cfg.rack.clone(),
            session: Some(SessionHandle::default()),
            isolation: cfg.isolation,
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client, config);
        if !partitions.is_empty() {
            consumer.assign(&cfg.topic, &partitions, from).await?;
        }
        barrier.wait();
        let base = *base.get_or_init(Instant::now);
        let measure_start = base + cfg.warmup;
        let end = measure_start + cfg.duration;
        let mut clock = IntervalClock::new(measure_start);
        let quota = cfg.messages;
        let mut idle_polls = 0u32;
        while !partitions.is_empty() && !stop.load(Ordering::Relaxed) {
            if mode == Mode::Consume && (quota.is_none() && Instant::now() >= end) {
                break;
            }
            if mode == Mode::Consume && quota.is_some_and(|q| counters.received.load(Ordering::Relaxed) >= q) {
                break;
            }
            let asked = Instant::now();
            // Batches read in place: the send time is read from each value without copying it.
            let batches = consumer.poll_batches().await?;
            let now = Instant::now();
            if batches.is_empty() {
                idle_polls += 1;
                if mode == Mode::Consume && idle_polls >= 20 {
                    break; // two seconds without data: everything was read
                }
                continue;
            }
            idle_polls = 0;
            if mode == Mode::Consume && now >= measure_start {
                clock.record(now, now - asked, &tx);
            }
            let mut counted = 0u64;
            for fetched in &batches {
                let base_offset = fetched.batch.header().base_offset.get();
                for r in fetched.batch.records().iter() {
                    if base_offset + u64::from(r.offset_delta.to_native()) < fetched.from_offset {
                        continue;
                    }
                    let Some(sent) =
                        r.value.as_slice().get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    else {
                        continue;
                    };
                    let intended = base + Duration::from_nanos(sent);
                    match mode {
                        Mode::E2e if intended >= measure_start => {
                            clock.record(now, now.saturating_duration_since(intended), &tx);
                            counted += 1;
                        }
                        Mode::Consume if now >= measure_start => counted += 1,
                        _ => {}
                    }
                }
            }
            counters.received.fetch_add(counted, Ordering::Relaxed);
        }
        clock.flush(&tx);
        counters.reads.lock().unwrap_or_else(|e| e.into_inner()).add(&consumer.read_stats());
        Ok(())
    })
}

/// Per-thread latency histogram, sent to the main thread once per measured second.
struct IntervalClock {
    start: Instant,
    index: usize,
    histogram: Histogram<u64>,
}

impl IntervalClock {
    fn new(start: Instant) -> IntervalClock {
        IntervalClock { start, index: 0, histogram: histogram() }
    }

    fn record(&mut self, now: Instant, latency: Duration, tx: &flume::Sender<Interval>) {
        let index = (now.saturating_duration_since(self.start).as_secs()) as usize;
        if index != self.index {
            self.flush(tx);
            self.index = index;
        }
        report::record(&mut self.histogram, latency);
    }

    fn flush(&mut self, tx: &flume::Sender<Interval>) {
        if !self.histogram.is_empty() {
            let h = std::mem::replace(&mut self.histogram, histogram());
            let _ = tx.send(Interval { index: self.index, histogram: h });
        }
    }
}

/// The main thread's merge of every thread's intervals.
struct Merge {
    total: Histogram<u64>,
    intervals: Vec<Histogram<u64>>,
}

impl Default for Merge {
    fn default() -> Self {
        Merge { total: histogram(), intervals: Vec::new() }
    }
}

impl Merge {
    fn drain(&mut self, rx: &flume::Receiver<Interval>) {
        for i in rx.try_iter() {
            while self.intervals.len() <= i.index {
                self.intervals.push(histogram());
            }
            let _ = self.intervals[i.index].add(&i.histogram);
            let _ = self.total.add(&i.histogram);
        }
    }
}

/// The live progress line on stderr.
struct Progress {
    on: bool,
    measure_start: Instant,
    total: Option<Duration>,
    last: Instant,
    last_count: u64,
}

impl Progress {
    fn new(on: bool, measure_start: Instant, cfg: &LoadConfig) -> Progress {
        let total = cfg.messages.is_none().then_some(cfg.duration);
        Progress { on, measure_start, total, last: Instant::now(), last_count: 0 }
    }

    fn tick(&mut self, c: &Counters, m: &Merge) {
        if !self.on || self.last.elapsed() < Duration::from_millis(500) {
            return;
        }
        let count = c.sent.load(Ordering::Relaxed).max(c.received.load(Ordering::Relaxed));
        let rate = (count - self.last_count.min(count)) as f64 / self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.last_count = count;
        let elapsed = Instant::now().saturating_duration_since(self.measure_start);
        let phase = if Instant::now() < self.measure_start { "warm-up" } else { "measuring" };
        let p99 = if m.total.is_empty() { 0 } else { m.total.value_at_quantile(0.99) };
        let remaining = self.total.map_or_else(String::new, |t| format!(" / {:.0}s", t.as_secs_f64()));
        eprint!(
            "\r{phase} {:>5.1}s{remaining}  {:>10.0} rec/s  p99 {:>7} µs  errors {}   ",
            elapsed.as_secs_f64(),
            rate,
            p99,
            c.errors.load(Ordering::Relaxed)
        );
    }

    fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// Seconds of steal time over all CPUs (`/proc/stat`): time the hypervisor ran something
/// else while this machine's CPUs had work. Latency stalls of tens of ms line up with it.
pub fn steal_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: f64 = cpu.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// `getconf CLK_TCK`, asked once: CPU snapshots are taken as the measured part starts, and a
/// process spawned per reading would land in it.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Records sent per loop turn before yielding.
const BURST: u64 = 256;
