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
use skein_client::wire::ErrorCode;
use skein_client::{Acks, Client, ClientError, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};

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
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        match s {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "partition" => Ok(Fault::Partition),
            other => Err(format!("unknown fault {other:?} (kill, pause, partition)")),
        }
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
}

/// The verdict.
pub struct Verdict {
    /// The recorded history.
    pub history: History,
    /// The checker's report.
    pub report: check::Report,
    /// Faults injected.
    pub faults: usize,
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

/// Runs the workload and checks its history.
pub fn run(cfg: VerifyConfig) -> Result<Verdict> {
    if cfg.faults.contains(&Fault::Kill) && cfg.restart.len() != cfg.pids.len() {
        bail!("--faults kill needs one --restart command per --pids entry");
    }
    let process_faults = cfg.faults.iter().any(|f| *f != Fault::Partition);
    if process_faults && cfg.pids.is_empty() {
        bail!("--faults kill or pause needs --pids");
    }
    let mut cfg = cfg;
    if cfg.faults.contains(&Fault::Partition) && cfg.partition_addrs.is_empty() {
        use std::net::ToSocketAddrs;
        for b in cfg.brokers.split(',') {
            let addr = b.trim().to_socket_addrs().with_context(|| format!("resolving {b}"))?.next();
            cfg.partition_addrs.extend(addr);
        }
    }
    let cfg = cfg;
    let partitions = {
        let rt = compio::runtime::Runtime::new()?;
        rt.block_on(async {
            let client =
                Client::connect(&cfg.brokers).await.with_context(|| format!("connecting to {}", cfg.brokers))?;
            match client.create_topic(&cfg.topic, cfg.partitions, cfg.replicas, &[]).await {
                Ok(()) | Err(ClientError::Broker(ErrorCode::TOPIC_ALREADY_EXISTS, _)) => {}
                Err(e) => return Err(e).context("creating the topic"),
            }
            Ok::<_, anyhow::Error>(client.partition_count(&cfg.topic).await?)
        })?
    };
    let start = Instant::now();
    let ops: Arc<Mutex<Vec<check::Op>>> = Arc::default();
    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..cfg.producers {
        let (cfg, ops, stop) = (cfg.clone(), ops.clone(), stop_producers.clone());
        threads.push(std::thread::spawn(move || producer(i, &cfg, partitions, start, &ops, &stop)));
    }
    for i in 0..cfg.consumers {
        let (cfg, ops, stop) = (cfg.clone(), ops.clone(), stop_consumers.clone());
        let process = (cfg.producers + i) as u32;
        threads.push(std::thread::spawn(move || consumer(process, &cfg, partitions, start, &ops, &stop, false)));
    }
    let faults = inject_faults(&cfg, start)?;
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
    // The final read: every partition from its start to its end.
    let final_process = (cfg.producers + cfg.consumers) as u32;
    let done = Arc::new(AtomicBool::new(false));
    consumer(final_process, &cfg, partitions, start, &ops, &done, true).context("final read")?;
    let mut history = History::new();
    let mut all = std::mem::take(&mut *ops.lock().expect("no thread panicked holding the lock"));
    all.sort_by_key(|op| match op {
        check::Op::Send(s) => s.invoke_us,
        check::Op::Poll(p) => p.invoke_us,
        check::Op::Gap(_) => 0,
    });
    for op in all {
        history.push(op);
    }
    if let Some(path) = &cfg.history {
        let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        history.write_json_lines(std::io::BufWriter::new(f)).with_context(|| format!("writing {}", path.display()))?;
    }
    let report = check::check(&history);
    Ok(Verdict { history, report, faults })
}

fn producer(
    index: usize,
    cfg: &VerifyConfig,
    partitions: u32,
    start: Instant,
    ops: &Mutex<Vec<check::Op>>,
    stop: &AtomicBool,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::connect(&cfg.brokers).await?;
        let config = ProducerConfig {
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
        while !stop.load(Ordering::Relaxed) {
            let partition = ((k + index as u64) % u64::from(partitions)) as u32;
            let value = ((index as u64 + 1) << 40) | k;
            k += 1;
            let invoke_us = micros(start);
            let op = move |r: &Result<(u32, u64), ClientError>| {
                check::Op::Send(SendOp {
                    process,
                    partition: Some(check::PartitionId(partition)),
                    key: None,
                    value: check::Value(value),
                    invoke_us,
                    complete_us: micros(start).max(invoke_us),
                    outcome: outcome(r),
                })
            };
            let log = sent.clone();
            let result = producer
                .send_with(&cfg.topic, Some(partition), None, &value.to_le_bytes(), move |r| {
                    log.borrow_mut().push(op(&r))
                })
                .await;
            if let Err(e) = result {
                sent.borrow_mut().push(op(&Err(e)));
            }
            next += gap;
            let now = Instant::now();
            if next > now {
                compio::time::sleep(next - now).await;
            } else {
                next = now;
                skein_client::yield_now().await;
            }
        }
        producer.flush().await;
        ops.lock().expect("no thread panicked holding the lock").extend(sent.take());
        Ok(())
    })
}

fn consumer(
    process: u32,
    cfg: &VerifyConfig,
    partitions: u32,
    start: Instant,
    ops: &Mutex<Vec<check::Op>>,
    stop: &AtomicBool,
    final_read: bool,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = loop {
            match Client::connect(&cfg.brokers).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "consumer connect failed; retrying");
                    compio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("connecting"),
            }
        };
        let all: Vec<u32> = (0..partitions).collect();
        let mut ends = BTreeMap::new();
        if final_read {
            for &p in &all {
                let end = loop {
                    match client.list_offset(&cfg.topic, p, skein_client::wire::LATEST).await {
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
        let config = ConsumerConfig { max_wait: Duration::from_millis(200), ..ConsumerConfig::default() };
        let mut consumer = Consumer::new(client, config);
        consumer.assign(&cfg.topic, &all, Position::Beginning).await?;
        let mut recorded = Vec::new();
        loop {
            if final_read {
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
            let before: Vec<u64> = all.iter().map(|&p| consumer.position(&cfg.topic, p).unwrap_or(0)).collect();
            let invoke_us = micros(start);
            let records = match consumer.poll().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "poll failed; retrying");
                    compio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let complete_us = micros(start);
            let mut by_partition: BTreeMap<u32, Vec<(check::Offset, check::Value)>> = BTreeMap::new();
            for r in records {
                let value = r.value.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
                by_partition.entry(r.partition).or_default().push((check::Offset(r.offset), check::Value(value)));
            }
            for (p, records) in by_partition {
                recorded.push(check::Op::Poll(PollOp {
                    process: check::ProcessId(process),
                    partition: check::PartitionId(p),
                    from: check::Offset(before[p as usize]),
                    records,
                    high_watermark: None,
                    invoke_us,
                    complete_us,
                    final_read,
                }));
            }
        }
        ops.lock().expect("no thread panicked holding the lock").extend(recorded);
        Ok(())
    })
}

/// Injects faults until the run's duration is over, then heals everything. Returns how many.
fn inject_faults(cfg: &VerifyConfig, start: Instant) -> Result<usize> {
    let mut pids = cfg.pids.clone();
    let mut count = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut next = start + cfg.fault_interval;
    while start.elapsed() < cfg.duration {
        std::thread::sleep(Duration::from_millis(50));
        if cfg.faults.is_empty() || Instant::now() < next {
            continue;
        }
        next += cfg.fault_interval;
        let fault = cfg.faults[(skein_log::storage::splitmix(&mut seed) % cfg.faults.len() as u64) as usize];
        let targets = if fault == Fault::Partition { cfg.partition_addrs.len() } else { pids.len() };
        let i = (skein_log::storage::splitmix(&mut seed) % targets.max(1) as u64) as usize;
        count += 1;
        match fault {
            Fault::Partition => {
                let addr = cfg.partition_addrs[i];
                let ms = 300 + skein_log::storage::splitmix(&mut seed) % 1500;
                let cut = NetCut::new(addr)?;
                tracing::info!(%addr, ms, "partitioned");
                std::thread::sleep(Duration::from_millis(ms));
                drop(cut);
            }
            Fault::Pause => {
                signal(pids[i], "STOP")?;
                let ms = 300 + skein_log::storage::splitmix(&mut seed) % 1500;
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
        }
    }
    Ok(count)
}

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

fn nft(script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("nft -f - failed for:\n{script}");
    }
    Ok(())
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}
