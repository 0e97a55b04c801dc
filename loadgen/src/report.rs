//! Reports: the JSON other tools read (keys are a contract: keep them), the table people read,
//! and the helpers that turn histograms into both.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// Largest.
    pub max: u64,
}

/// Cores and kernel of the machine the run was on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Cores available to the process.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
}

/// A load run's report (`--report FILE.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `produce`, `consume` or `e2e`.
    pub mode: String,
    /// Records measured (after warm-up).
    pub messages: u64,
    /// Record value bytes measured.
    pub bytes: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Records per second.
    pub messages_per_sec: f64,
    /// Value bytes per second.
    pub bytes_per_sec: f64,
    /// Produce acknowledgement latency (produce), end-to-end latency (e2e), or fetch round
    /// trip (consume), in microseconds; open loop counts from the intended send time.
    pub latency_us: Latency,
    /// In e2e: the produce acknowledgement latency of the same records (from the intended send
    /// time), so the end-to-end figure can be split into publish and delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_latency_us: Option<Latency>,
    /// Transactional produce: the transaction commit latency (EndTxn round trip, every record
    /// already acknowledged), in microseconds; `latency_us` is then send to commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_latency_us: Option<Latency>,
    /// The settings of the run.
    pub config: serde_json::Value,
    /// The commit measured.
    pub commit: String,
    /// Where it ran.
    pub machine: Machine,
    /// `[percentile, latency_us]` points for plots.
    pub percentiles: Vec<[f64; 2]>,
    /// CPU seconds (user + system) of the broker process during the measured part, when known.
    pub broker_cpu_seconds: Option<f64>,
    /// CPU seconds (user + system) of the load generator itself over the same span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadgen_cpu_seconds: Option<f64>,
    /// Steal time over all CPUs during the same span (a virtual machine's host running
    /// something else): stalls no code in the guest can avoid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_seconds: Option<f64>,
    /// Records sent but not acknowledged (errors), over the whole run.
    pub errors: u64,
    /// The consumers' fetches (consume and e2e), over the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<Reads>,
}

impl Report {
    /// The run in one line, for a plot legend: the mode, then the settings from `config` that
    /// shape latency (partitions, replicas, producers and consumers as the mode uses them,
    /// value size, keys, acks, rate, read replica) and the commit, e.g. `produce: 8
    /// partitions, 3 replicas, 8 producers, 1024 B values, acks=all, closed loop, commit
    /// 06f506a`. `None` when `config` holds none of those settings (a report written by
    /// another tool): the caller has to name the run some other way.
    pub fn description(&self) -> Option<String> {
        let c = &self.config;
        let number = |key: &str| c.get(key).and_then(serde_json::Value::as_u64);
        let text = |key: &str| c.get(key).and_then(serde_json::Value::as_str);
        let (sends, reads) = (self.mode != "consume", self.mode != "produce");
        let mut parts = Vec::new();
        parts.extend(number("partitions").map(|n| count(n, "partition")));
        parts.extend(number("replicas").map(|n| count(n, "replica")));
        parts.extend(number("producers").filter(|_| sends).map(|n| count(n, "producer")));
        parts.extend(number("consumers").filter(|_| reads).map(|n| count(n, "consumer")));
        parts.extend(number("message_size").map(|n| format!("{n} B values")));
        parts.extend(text("key_distribution").filter(|k| *k != "None").map(|k| format!("keys {}", k.to_lowercase())));
        parts.extend(text("acks").filter(|_| sends).map(|a| format!("acks={a}")));
        if sends {
            match c.get("rate") {
                Some(serde_json::Value::Null) => parts.push("closed loop".into()),
                Some(rate) => parts.extend(rate.as_f64().map(|r| format!("{r:.0} records/s"))),
                None => {}
            }
        }
        if let Some(replica) = text("prefer_replica").filter(|r| reads && *r != "leader") {
            let rack = text("rack").map(|r| format!(" (rack {r})")).unwrap_or_default();
            let node = if replica.parse::<u32>().is_ok() { "node " } else { "" };
            parts.push(format!("reads from {node}{replica}{rack}"));
        }
        if parts.is_empty() {
            return None;
        }
        if !self.commit.is_empty() && self.commit != "unknown" {
            parts.push(format!("commit {}", self.commit));
        }
        Some(format!("{}: {}", self.mode, parts.join(", ")))
    }
}

/// What the consumers' fetches needed: partition answers, how many followers served, how many
/// waited for the replica to catch up with the session token, how many were sent to the
/// leader after NOT_CAUGHT_UP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reads {
    /// Partition answers received.
    pub fetches: u64,
    /// Answers a follower served.
    pub follower_reads: u64,
    /// Answers that waited for a session token.
    pub waited: u64,
    /// NOT_CAUGHT_UP answers (each redirected that partition's next fetch to the leader).
    pub redirected: u64,
    /// `waited / fetches`.
    pub waited_share: f64,
    /// `redirected / fetches`.
    pub redirected_share: f64,
}

impl From<&skein_client::ReadStats> for Reads {
    fn from(r: &skein_client::ReadStats) -> Reads {
        let share = |n: u64| if r.fetches == 0 { 0.0 } else { n as f64 / r.fetches as f64 };
        Reads {
            fetches: r.fetches,
            follower_reads: r.follower_reads,
            waited: r.waited,
            redirected: r.not_caught_up,
            waited_share: share(r.waited),
            redirected_share: share(r.not_caught_up),
        }
    }
}

/// The machine's ceilings (`limits --report FILE.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitsReport {
    /// Always `limits`.
    pub mode: String,
    /// Loopback TCP, one connection.
    pub tcp_bytes_per_sec: f64,
    /// Loopback TCP, one connection per core, all together.
    pub tcp_bytes_per_sec_all_cores: f64,
    /// Sequential buffered writes plus one final fdatasync.
    pub disk_write_bytes_per_sec: f64,
    /// One write of `chunk_bytes` plus fdatasync, repeated.
    pub fdatasync_us: SyncLatency,
    /// The settings.
    pub config: serde_json::Value,
    /// The commit.
    pub commit: String,
    /// Where it ran.
    pub machine: Machine,
}

/// fdatasync latency percentiles in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncLatency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

/// A latency histogram in microseconds (1 µs to 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration in microseconds (at least 1, saturating at the top).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, h.high());
    h.saturating_record(us);
}

/// The standard percentiles of a histogram.
pub fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        p9999: h.value_at_quantile(0.9999),
        max: h.max(),
    }
}

/// Points for a latency-by-percentile plot, from the median to 99.999%.
pub fn percentile_points(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=20)
        .map(|i| {
            let nines = 0.301 + f64::from(i) * (5.0 - 0.301) / 20.0;
            let q = 1.0 - 10f64.powf(-nines);
            [q * 100.0, h.value_at_quantile(q) as f64]
        })
        .collect()
}

/// The machine's cores and kernel.
pub fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    Machine { cores, kernel }
}

/// The commit of the working tree, if git knows it.
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// The final table of a load run.
pub fn table(r: &Report) -> String {
    let l = &r.latency_us;
    let mut out = String::new();
    out.push_str(&format!("{:<12} {:>14} {:>10} {:>10}\n", "mode", "records/s", "MB/s", "records"));
    out.push_str(&format!(
        "{:<12} {:>14.0} {:>10.1} {:>10}\n",
        r.mode,
        r.messages_per_sec,
        r.bytes_per_sec / 1e6,
        r.messages
    ));
    let row = |label: &str, cells: [String; 6]| {
        let [a, b, c, d, e, f] = cells;
        format!("{label:<12} {a:>8} {b:>8} {c:>8} {d:>8} {e:>8} {f:>8}\n")
    };
    let numbers = |l: &Latency| [l.p50, l.p90, l.p99, l.p999, l.p9999, l.max].map(|v| v.to_string());
    out.push_str(&row("latency µs", ["p50", "p90", "p99", "p99.9", "p99.99", "max"].map(String::from)));
    out.push_str(&row("", numbers(l)));
    if let Some(p) = &r.publish_latency_us {
        out.push_str(&row("publish ack", numbers(p)));
    }
    if let Some(c) = &r.commit_latency_us {
        out.push_str(&row("txn commit", numbers(c)));
    }
    let gb = r.bytes as f64 / 1e9;
    for (who, cpu) in [("broker", r.broker_cpu_seconds), ("loadgen", r.loadgen_cpu_seconds)] {
        if let Some(cpu) = cpu {
            out.push_str(&format!("{who} cpu {cpu:.2} s, {:.2} s per GB\n", if gb > 0.0 { cpu / gb } else { 0.0 }));
        }
    }
    if let Some(steal) = r.steal_seconds.filter(|s| *s > 0.0) {
        out.push_str(&format!("steal {:.0} ms (the host ran something else on this machine's CPUs)\n", steal * 1e3));
    }
    if let Some(reads) = r.reads.as_ref().filter(|reads| reads.fetches > 0) {
        out.push_str(&format!(
            "reads: {} answers, {:.1} % from followers, {:.2} % waited for the session token, {:.2} % redirected to the leader\n",
            reads.fetches,
            100.0 * reads.follower_reads as f64 / reads.fetches as f64,
            100.0 * reads.waited_share,
            100.0 * reads.redirected_share
        ));
    }
    if r.errors > 0 {
        out.push_str(&format!("errors: {} records failed\n", r.errors));
    }
    out
}

/// `1 partition`, `8 partitions`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_points_follow_the_histogram() {
        let mut h = histogram();
        for us in 1..=10_000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let l = latency(&h);
        assert!((4_990..=5_010).contains(&l.p50), "{l:?}");
        assert!((9_890..=9_910).contains(&l.p99), "{l:?}");
        assert_eq!(l.max, h.max());
        let pts = percentile_points(&h);
        assert_eq!(pts.len(), 21);
        assert!(pts.windows(2).all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1]));
        assert_eq!(latency(&histogram()), Latency::default());
    }

    #[test]
    fn description_names_the_settings_the_mode_uses() {
        let check = |mode: &str, config: serde_json::Value, commit: &str, expect: Option<&str>| {
            let r = Report { mode: mode.into(), config, commit: commit.into(), ..report() };
            assert_eq!(r.description().as_deref(), expect, "{mode}");
        };
        let config = serde_json::json!({
            "mode": "x", "brokers": "127.0.0.1:9092", "topic": "t", "partitions": 8, "replicas": 3,
            "producers": 8, "consumers": 1, "message_size": 1024, "key_distribution": "Zipf(50, 1.1)",
            "acks": "all", "rate": null, "prefer_replica": "closest", "rack": "r2",
        });
        check(
            "produce",
            config.clone(),
            "06f506a",
            Some("produce: 8 partitions, 3 replicas, 8 producers, 1024 B values, keys zipf(50, 1.1), acks=all, closed loop, commit 06f506a"),
        );
        check(
            "consume",
            config.clone(),
            "unknown",
            Some("consume: 8 partitions, 3 replicas, 1 consumer, 1024 B values, keys zipf(50, 1.1), reads from closest (rack r2)"),
        );
        let mut e2e = config;
        e2e["rate"] = 50_000.0.into();
        e2e["key_distribution"] = "None".into();
        e2e["prefer_replica"] = "2".into();
        e2e["rack"] = serde_json::Value::Null;
        check(
            "e2e",
            e2e,
            "06f506a",
            Some("e2e: 8 partitions, 3 replicas, 8 producers, 1 consumer, 1024 B values, acks=all, 50000 records/s, reads from node 2, commit 06f506a"),
        );
        check("produce", serde_json::json!({"mode": "produce"}), "06f506a", None);
        check("produce", serde_json::Value::Null, "06f506a", None);
    }

    fn report() -> Report {
        Report {
            commit_latency_us: None,
            mode: "produce".into(),
            messages: 0,
            bytes: 0,
            seconds: 1.0,
            messages_per_sec: 0.0,
            bytes_per_sec: 0.0,
            latency_us: Latency::default(),
            publish_latency_us: None,
            config: serde_json::Value::Null,
            commit: "unknown".into(),
            machine: Machine { cores: 1, kernel: "test".into() },
            percentiles: Vec::new(),
            broker_cpu_seconds: None,
            loadgen_cpu_seconds: None,
            steal_seconds: None,
            errors: 0,
            reads: None,
        }
    }
}
