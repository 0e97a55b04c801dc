//! `failover`: how long a partition is unavailable to an `acks=all` idempotent producer when
//! its leader is killed with SIGKILL, and (`--steady`) whether leadership stays put under load
//! without faults.
//!
//! One producer thread sends small records open loop (one every `send_interval`, 1 ms by
//! default) to partition 0 of a topic with 3 replicas and `min.insync.replicas=2`, recording
//! every acknowledgement. Each round: find the leader with [`Probe`] (newest leader epoch any
//! broker reports), note the instant, SIGKILL it, and wait for the first acknowledgement of a
//! record **sent after the kill** (it cannot come from the dead leader); the sample is that
//! acknowledgement's time minus the kill instant. Metadata must then show another leader at a
//! newer epoch (else the round fails). The node is restarted and the next round waits until
//! the ISR holds every replica again.
//!
//! Not measured: consumer-visible failover (fetches), the client's own metadata refresh
//! interval as a separate figure (it is inside the sample), clean shutdowns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use skein_client::wire::ErrorCode;
use skein_client::{Acks, Client, ClientConfig, ClientError, Producer, ProducerConfig};

use crate::cluster::{LocalCluster, PartitionView, Probe};

/// What `failover` runs.
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// Topic (created with 1 partition, `replicas` replicas, `min.insync.replicas`).
    pub topic: String,
    /// Replicas of the topic.
    pub replicas: u16,
    /// `min.insync.replicas` of the topic (0: not set).
    pub min_insync_replicas: u16,
    /// Leader kills.
    pub kills: usize,
    /// Time between two sends (open loop); `None`: as fast as the producer takes them.
    pub send_interval: Option<Duration>,
    /// Bound on one failover (kill to first new acknowledgement).
    pub failover_timeout: Duration,
    /// Bound on the wait for the restarted node to rejoin the ISR.
    pub isr_timeout: Duration,
    /// Pause after the ISR is full again, before the next kill.
    pub settle: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            topic: "failover".into(),
            replicas: 3,
            min_insync_replicas: 2,
            kills: 20,
            send_interval: Some(Duration::from_millis(1)),
            failover_timeout: Duration::from_secs(30),
            isr_timeout: Duration::from_secs(60),
            settle: Duration::from_millis(500),
        }
    }
}

/// The `--report` JSON of a failover run (**API boundary**: keys other tools read).
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    /// Kills made.
    pub kills: usize,
    /// Percentiles of the samples.
    pub failover_ms: FailoverPercentiles,
    /// Each kill's failover, in order.
    pub samples_ms: Vec<f64>,
}

/// Median, 90th percentile and maximum, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct FailoverPercentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Maximum.
    pub max: f64,
}

/// The `--steady` result: leadership under load without faults.
#[derive(Clone, Debug, Serialize)]
pub struct SteadyReport {
    /// Always `steady`.
    pub mode: String,
    /// Length of the run.
    pub seconds: f64,
    /// Records acknowledged.
    pub acked: u64,
    /// Records that failed.
    pub failed: u64,
    /// Acknowledgements per second.
    pub acked_per_sec: f64,
    /// Per partition `[partition, leader, epoch]` before the run.
    pub leaders_before: Vec<[u32; 3]>,
    /// The same after it.
    pub leaders_after: Vec<[u32; 3]>,
    /// Sum over partitions of the leader-epoch increase (goal: 0).
    pub leader_changes: u64,
}

/// Runs `cfg.kills` rounds of kill / measure / restart / wait-for-ISR against `cluster`.
pub fn run(cfg: &FailoverConfig, cluster: &mut LocalCluster) -> Result<FailoverReport> {
    let probe = Probe::new(cluster.addrs(), PROBE_TIMEOUT)?;
    create_topic(cfg, &cluster.bootstrap())?;
    wait_for_full_isr(&probe, &cfg.topic, cfg.isr_timeout)?;
    let load = Load::start(cluster.bootstrap(), cfg.topic.clone(), cfg.send_interval)?;
    let mut samples_ms = Vec::new();
    for round in 0..cfg.kills {
        let result = one_kill(cfg, cluster, &probe, &load);
        match result {
            Ok(ms) => {
                println!("kill {:>3}: {ms:>8.1} ms", round + 1);
                samples_ms.push(ms);
            }
            Err(e) => {
                // The round's error matters more than how the producer ended.
                let _ = load.stop();
                return Err(e.context(format!("kill {}", round + 1)));
            }
        }
    }
    let (acked, failed) = load.stop()?;
    tracing::info!(acked, failed, "producer done");
    let failover_ms = percentiles(&samples_ms).context("no kills made")?;
    Ok(FailoverReport { kills: samples_ms.len(), failover_ms, samples_ms })
}

/// Runs the producer for `duration` without faults against `brokers` and reports leader
/// changes (from the leader epochs before and after).
pub fn steady(cfg: &FailoverConfig, brokers: &str, duration: Duration) -> Result<SteadyReport> {
    let addrs = resolve(brokers)?;
    let probe = Probe::new(addrs, PROBE_TIMEOUT)?;
    create_topic(cfg, brokers)?;
    wait_for_full_isr(&probe, &cfg.topic, cfg.isr_timeout)?;
    let before = probe.partitions(&cfg.topic)?;
    let load = Load::start(brokers.to_owned(), cfg.topic.clone(), cfg.send_interval)?;
    let started = Instant::now();
    std::thread::sleep(duration);
    let (acked, failed) = load.stop()?;
    let seconds = started.elapsed().as_secs_f64();
    let after = probe.partitions(&cfg.topic)?;
    let leader_changes = after
        .iter()
        .map(|(p, a)| u64::from(a.leader_epoch.saturating_sub(before.get(p).map_or(0, |b| b.leader_epoch))))
        .sum();
    let table = |m: &std::collections::BTreeMap<u32, PartitionView>| {
        m.iter().map(|(&p, v)| [p, v.leader, v.leader_epoch]).collect::<Vec<_>>()
    };
    Ok(SteadyReport {
        mode: "steady".into(),
        seconds,
        acked,
        failed,
        acked_per_sec: acked as f64 / seconds.max(1e-9),
        leaders_before: table(&before),
        leaders_after: table(&after),
        leader_changes,
    })
}

/// The table printed after a run: one line per kill, then the percentiles.
pub fn table(report: &FailoverReport) -> String {
    let mut out = String::from("kill   failover ms\n");
    for (i, ms) in report.samples_ms.iter().enumerate() {
        out.push_str(&format!("{:>4} {:>13.1}\n", i + 1, ms));
    }
    let p = report.failover_ms;
    out.push_str(&format!("kills {}  p50 {:.1} ms  p90 {:.1} ms  max {:.1} ms\n", report.kills, p.p50, p.p90, p.max));
    out
}

/// Nearest-rank percentiles; `None` without samples.
pub fn percentiles(samples: &[f64]) -> Option<FailoverPercentiles> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    Some(FailoverPercentiles { p50: rank(0.5), p90: rank(0.9), max: sorted[sorted.len() - 1] })
}

/// One round: returns the failover in milliseconds.
fn one_kill(cfg: &FailoverConfig, cluster: &mut LocalCluster, probe: &Probe, load: &Load) -> Result<f64> {
    wait_for_full_isr(probe, &cfg.topic, cfg.isr_timeout)?;
    std::thread::sleep(cfg.settle);
    let (leader, epoch) = probe.leader(&cfg.topic, 0)?.context("partition 0 has no leader")?;
    let killed_at = Instant::now();
    cluster.kill(leader)?;
    // Only records sent after the kill returned count: none of them can reach the dead leader.
    load.watch_from(Instant::now());
    let acked_at = load.wait_first_ack(killed_at + cfg.failover_timeout).with_context(|| {
        format!("no record sent after killing node {leader} was acknowledged within {:?}", cfg.failover_timeout)
    })?;
    let ms = acked_at.duration_since(killed_at).as_secs_f64() * 1000.0;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A broker that does not answer yet (just failed over) is asked again, not fatal.
        match probe.leader(&cfg.topic, 0).ok().flatten() {
            Some((now, e)) if now != leader && e > epoch => break,
            _ if Instant::now() > deadline => {
                bail!("a record was acknowledged after node {leader} was killed, but no newer leader shows in metadata")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    cluster.restart(leader)?;
    Ok(ms)
}

fn create_topic(cfg: &FailoverConfig, brokers: &str) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::connect(brokers).await.with_context(|| format!("connecting to {brokers}"))?;
        let configs: Vec<(String, String)> = (cfg.min_insync_replicas > 0)
            .then(|| ("min.insync.replicas".to_owned(), cfg.min_insync_replicas.to_string()))
            .into_iter()
            .collect();
        match client.create_topic(&cfg.topic, 1, cfg.replicas, &configs).await {
            Ok(()) | Err(ClientError::Broker(ErrorCode::TOPIC_ALREADY_EXISTS, _)) => Ok(()),
            Err(e) => Err(e).context("creating the topic"),
        }
    })
}

/// Waits until partition 0 has a leader and every replica is in its ISR.
fn wait_for_full_isr(probe: &Probe, topic: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let view = probe.partitions(topic).ok().and_then(|m| m.get(&0).cloned());
        if let Some(v) = &view {
            if v.leader != 0 && !v.replicas.is_empty() && v.isr.len() == v.replicas.len() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{topic}/0 did not get a leader and a full ISR within {timeout:?}: {view:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn resolve(brokers: &str) -> Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut addrs = Vec::new();
    for b in brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        addrs.extend(b.to_socket_addrs().with_context(|| format!("resolving {b}"))?.next());
    }
    Ok(addrs)
}

/// The producer thread and what it saw.
struct Load {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

#[derive(Default)]
struct Shared {
    watch: Mutex<Watch>,
    acked: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// The first acknowledgement of a record invoked at or after `from`.
#[derive(Default)]
struct Watch {
    from: Option<Instant>,
    first_ack: Option<Instant>,
}

impl Load {
    fn start(brokers: String, topic: String, interval: Option<Duration>) -> Result<Load> {
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("failover-producer".into())
                .spawn(move || produce(&brokers, &topic, interval, &shared, &stop))?
        };
        Ok(Load { shared, stop, thread: Some(thread) })
    }

    fn watch_from(&self, from: Instant) {
        *self.shared.watch.lock().expect("no thread panicked holding the lock") =
            Watch { from: Some(from), first_ack: None };
    }

    fn wait_first_ack(&self, deadline: Instant) -> Option<Instant> {
        loop {
            if let Some(at) = self.shared.watch.lock().expect("no thread panicked holding the lock").first_ack {
                return Some(at);
            }
            if Instant::now() > deadline || self.thread.as_ref().is_none_or(std::thread::JoinHandle::is_finished) {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops the producer (after it flushed); returns (acknowledged, failed).
    fn stop(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(r) => r.context("the producer failed")?,
                Err(_) => bail!("the producer thread panicked"),
            }
        }
        Ok((self.shared.acked.load(Ordering::Relaxed), self.shared.failed.load(Ordering::Relaxed)))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn produce(
    brokers: &str,
    topic: &str,
    interval: Option<Duration>,
    shared: &Arc<Shared>,
    stop: &AtomicBool,
) -> Result<()> {
    let rt = compio::runtime::Runtime::new()?;
    rt.block_on(async {
        let config = ClientConfig {
            brokers: brokers.to_owned(),
            request_timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        };
        let client = Client::with_config(config).await.with_context(|| format!("connecting to {brokers}"))?;
        let producer = Producer::new(
            client,
            ProducerConfig {
                acks: Acks::All,
                linger: Duration::ZERO,
                retries: 1_000,
                retry_backoff: Duration::from_millis(10),
                request_timeout_ms: 2_000,
                idempotence: true,
                ..ProducerConfig::default()
            },
        );
        let mut next = Instant::now();
        let mut k: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let invoked = Instant::now();
            let shared_cb = shared.clone();
            let on_done = move |r: Result<(u32, u64), ClientError>| on_result(&shared_cb, invoked, r.is_ok());
            if let Err(e) = producer.send_with(topic, Some(0), None, &k.to_le_bytes(), on_done).await {
                tracing::debug!(error = %e, "send failed");
                shared.failed.fetch_add(1, Ordering::Relaxed);
                compio::time::sleep(Duration::from_millis(1)).await;
            }
            k += 1;
            match interval {
                Some(gap) => crate::verify::pace(&mut next, gap).await,
                None => skein_client::yield_now().await,
            }
        }
        producer.flush().await;
        Ok(())
    })
}

fn on_result(shared: &Shared, invoked: Instant, ok: bool) {
    if !ok {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    shared.acked.fetch_add(1, Ordering::Relaxed);
    let mut watch = shared.watch.lock().expect("no thread panicked holding the lock");
    if watch.first_ack.is_none() && watch.from.is_some_and(|from| invoked >= from) {
        watch.first_ack = Some(Instant::now());
    }
}

/// Each broker's metadata answer is awaited this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentiles(&[]), None);
        let p = percentiles(&[300.0, 100.0, 200.0]).expect("samples");
        assert_eq!((p.p50, p.p90, p.max), (200.0, 300.0, 300.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let p = percentiles(&ten).expect("samples");
        assert_eq!((p.p50, p.p90, p.max), (5.0, 9.0, 10.0));
    }

    #[test]
    fn the_report_has_the_documented_keys() {
        let samples_ms = vec![120.0, 340.5];
        let r = FailoverReport { kills: 2, failover_ms: percentiles(&samples_ms).expect("samples"), samples_ms };
        let v = serde_json::to_value(&r).expect("serialises");
        assert_eq!(v["kills"], 2);
        assert_eq!(v["failover_ms"]["p50"], 120.0);
        assert_eq!(v["failover_ms"]["p90"], 340.5);
        assert_eq!(v["failover_ms"]["max"], 340.5);
        assert_eq!(v["samples_ms"][1], 340.5);
        assert!(table(&r).contains("p50 120.0 ms"), "{}", table(&r));
    }
}
