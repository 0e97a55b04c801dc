//! Multi-process chaos against a local 3-node cluster of real `skein-broker` processes:
//! `verify` with leader kills, pauses, isolation, the leader cut from the other brokers and
//! one-way cuts (acks=all, 3 replicas, min.insync.replicas=2, idempotent producers) passes
//! every check; and `failover` measures kill -9 of the leader to the first new
//! acknowledgement. Both need the broker's cluster mode (`--voters`) and root with nftables.

mod common;

use std::time::Duration;

use skein_broker::check::Check;
use skein_loadgen::cluster::{ClusterConfig, LocalCluster};
use skein_loadgen::failover::{self, FailoverConfig};
use skein_loadgen::verify::{self, Fault, ReadFrom, VerifyConfig};

/// The tests of this file share the nft table and the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn cluster(dir: &std::path::Path) -> LocalCluster {
    let config = ClusterConfig::new(common::broker_binary(), dir, 3).expect("free ports");
    LocalCluster::start(config).expect("3 brokers ready")
}

#[test]
fn verify_passes_under_leader_kills_pauses_and_network_cuts() {
    let _serial = serial();
    assert!(skein_loadgen::chaos::nft_available(), "needs the `nft` command (nftables) and root");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster(dir.path());
    let cfg = chaos_workload("chaos", Duration::from_secs(45), dir.path());
    let verdict = verify::run_cluster(cfg, &mut cluster);
    drop(cluster);
    let verdict = verdict.expect("verify ran");
    let logs = dir.path().display();
    assert!(verdict.report.ok(), "{} (history and broker logs in {logs})", verdict.report);
    assert!(verdict.report.not_run().is_empty(), "every check ran: {}", verdict.report);
    assert!(verdict.faults >= 8, "faults injected: {} ({:?})", verdict.faults, verdict.fault_log);
    assert_eq!(verdict.excused, 0, "acks=all excuses nothing");
    let kinds: std::collections::BTreeSet<&str> = verdict.fault_log.iter().map(|f| f.fault.name()).collect();
    assert!(kinds.len() >= 3, "several kinds of fault were injected: {kinds:?}");
    let acked = verdict
        .history
        .ops
        .iter()
        .filter(|op| matches!(op, skein_broker::check::Op::Send(s) if s.ack().is_some()))
        .count();
    assert!(acked >= 2_000, "the workload made progress through the faults: {acked} acknowledged");
}

#[test]
fn failover_after_a_leader_kill_takes_under_a_second_at_the_median() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster(dir.path());
    let cfg = FailoverConfig { kills: 5, ..FailoverConfig::default() };
    let report = failover::run(&cfg, &mut cluster);
    drop(cluster);
    let report = report.expect("failover ran");
    assert_eq!(report.kills, 5);
    assert_eq!(report.samples_ms.len(), 5);
    assert!(report.failover_ms.p50 < 1_000.0, "median failover {} ms: {:?}", report.failover_ms.p50, report.samples_ms);
    assert!(report.failover_ms.max < 2_000.0, "max failover {} ms: {:?}", report.failover_ms.max, report.samples_ms);
}

#[test]
fn acks_leader_loses_only_records_inside_the_documented_window() {
    let _serial = serial();
    assert!(skein_loadgen::chaos::nft_available(), "needs the `nft` command (nftables) and root");
    let dir = tempfile::tempdir().expect("tempdir");
    // Preferred-leader rebalancing (every 30 s by default) moves leadership without a fault,
    // and that loses acks=leader records above the high watermark as any leader change does:
    // this test judges losses against the faults it injects, so it turns rebalancing off. (With
    // it on, the test failed 3 of 9 runs at the 30 s default and 2 of 2 at 10 s: losses with no
    // fault in progress, whose offsets later sends got again.)
    let mut config = ClusterConfig::new(common::broker_binary(), dir.path(), 3).expect("free ports");
    config.extra_args = vec!["--leader-rebalance-interval-ms".into(), "0".into()];
    let mut cluster = LocalCluster::start(config).expect("3 brokers ready");
    let cfg = VerifyConfig {
        topic: "chaos-leader".into(),
        partitions: 3,
        replicas: 3,
        topic_configs: vec![("min.insync.replicas".into(), "2".into())],
        producers: 2,
        consumers: 2,
        rate: 300.0,
        acks: skein_client::Acks::Leader,
        duration: Duration::from_secs(30),
        fault_interval: Duration::from_secs(3),
        faults: vec![Fault::KillLeader, Fault::Pause, Fault::CutLeader, Fault::OneWay],
        ..VerifyConfig::default()
    };
    let verdict = verify::run_cluster(cfg, &mut cluster);
    drop(cluster);
    let verdict = verdict.expect("verify ran");
    // A lost acknowledgement outside the window (lease + margin around a fault on its leader)
    // stays a lost write and fails this; inside it, it is excused and counted.
    assert!(
        verdict.report.ok(),
        "acks=leader: only losses inside the window ({} excused):\n{}\nfaults: {:?}",
        verdict.excused,
        verdict.report,
        verdict.fault_log
    );
    assert!(verdict.faults >= 6, "faults injected: {}", verdict.faults);
    eprintln!("acks=leader: {} acknowledged records lost inside the window", verdict.excused);
}

/// The read guarantees of the session-guarantee appendix under the faults above, with every
/// poll preferring the next node (followers serve most reads) and producers reading their own
/// writes in their session: read-after-write, monotonic reads and consistent prefix pass (and
/// each examined many polls).
#[test]
fn reads_spread_over_all_replicas_keep_the_session_guarantees_under_faults() {
    let _serial = serial();
    assert!(skein_loadgen::chaos::nft_available(), "needs the `nft` command (nftables) and root");
    let dir = tempfile::tempdir().expect("tempdir");
    let verdict = run_in(cluster(dir.path()), read_workload("reads", false, dir.path()));
    let logs = dir.path().display();
    assert!(verdict.report.ok(), "{} (history and broker logs in {logs})", verdict.report);
    for check in [Check::ReadAfterWrite, Check::MonotonicRead, Check::ConsistentPrefix] {
        let counted = verdict.report.result(check).map_or(0, |r| r.counted);
        assert!(counted >= 200, "{check} examined only {counted}: {}", verdict.report);
    }
    assert!(verdict.faults >= 5, "faults injected: {}", verdict.faults);
    let r = &verdict.reads;
    // A third of the polls prefer the leader, and answers older than the session's newest
    // write (fetches sent before its acknowledgement) are asked again.
    assert!(r.follower_reads * 5 >= r.fetches, "followers served at least a fifth: {r:?}");
    eprintln!("{}", verify::reads_line(r));
}

/// The same workload with the guarantees switched off (no session tokens; brokers serving
/// follower reads past the high watermark): each of the three read checks must fail, which
/// shows they can.
#[test]
fn switching_the_read_guarantees_off_fails_the_read_checks() {
    let _serial = serial();
    assert!(skein_loadgen::chaos::nft_available(), "needs the `nft` command (nftables) and root");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ClusterConfig::new(common::broker_binary(), dir.path(), 3).expect("free ports");
    config.extra_args.push(verify::UNSAFE_READS_BROKER_ARG.to_owned());
    let cluster = LocalCluster::start(config).expect("3 brokers ready");
    let verdict = run_in(cluster, read_workload("unsafe-reads", true, dir.path()));
    for check in [Check::ReadAfterWrite, Check::MonotonicRead, Check::ConsistentPrefix] {
        assert!(verdict.report.violated(check), "{check} did not fail without the guarantees: {}", verdict.report);
    }
}

/// Runs `cfg` against `cluster`, then stops the brokers.
fn run_in(mut cluster: LocalCluster, cfg: VerifyConfig) -> verify::Verdict {
    let verdict = verify::run_cluster(cfg, &mut cluster);
    drop(cluster);
    verdict.expect("verify ran")
}

/// acks=all, 3 partitions with 3 replicas and min ISR 2, 2 producers and 2 consumers at 200
/// records/s, every fault kind (one every 3 s); the history kept in `dir`.
fn chaos_workload(topic: &str, duration: Duration, dir: &std::path::Path) -> VerifyConfig {
    VerifyConfig {
        topic: topic.into(),
        partitions: 3,
        replicas: 3,
        topic_configs: vec![("min.insync.replicas".into(), "2".into())],
        producers: 2,
        consumers: 2,
        rate: 200.0,
        duration,
        fault_interval: Duration::from_secs(3),
        faults: vec![Fault::KillLeader, Fault::Pause, Fault::Isolate, Fault::CutLeader, Fault::OneWay],
        history: Some(dir.join("history.jsonl")),
        ..VerifyConfig::default()
    }
}

/// [`chaos_workload`] with reads over every replica and producers reading their own writes.
fn read_workload(topic: &str, unsafe_reads: bool, dir: &std::path::Path) -> VerifyConfig {
    let duration = Duration::from_secs(if unsafe_reads { 15 } else { 30 });
    VerifyConfig {
        read_from: ReadFrom::Any,
        read_your_writes: true,
        unsafe_reads,
        ..chaos_workload(topic, duration, dir)
    }
}
