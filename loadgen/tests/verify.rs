//! `skein-loadgen verify` against a real broker process that is killed (-9) and restarted,
//! paused (SIGSTOP/SIGCONT) and cut off by an nft rule while the workload runs: every check passes, faults happened,
//! and the history file re-reads to the same verdict.

mod common;

use std::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn verify_passes_against_a_broker_killed_and_paused_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, pid, start) = start_broker(dir.path());
    let history = dir.path().join("history.jsonl");
    let cfg = skein_loadgen::verify::VerifyConfig {
        brokers: addr.clone(),
        topic: "verify".into(),
        partitions: 3,
        replicas: 1,
        producers: 2,
        consumers: 2,
        rate: 300.0,
        acks: skein_client::Acks::All,
        duration: std::time::Duration::from_secs(8),
        faults: vec![
            skein_loadgen::verify::Fault::Kill,
            skein_loadgen::verify::Fault::Pause,
            skein_loadgen::verify::Fault::Partition,
        ],
        pids: vec![pid],
        restart: vec![start.clone()],
        fault_interval: std::time::Duration::from_millis(1200),
        partition_addrs: vec![],
        history: Some(history.clone()),
        ..skein_loadgen::verify::VerifyConfig::default()
    };
    let verdict = skein_loadgen::verify::run(cfg);
    // Stop whichever broker process is current (the last restart's).
    let _ = Command::new("pkill").args(["-KILL", "-f", &format!("skein-broker --listen {addr}")]).status();
    let verdict = verdict.expect("verify ran");
    assert!(verdict.report.ok(), "{}", verdict.report);
    assert!(verdict.report.not_run().is_empty(), "every check ran: {}", verdict.report);
    assert!(verdict.faults >= 4, "faults injected: {}", verdict.faults);
    let acked = verdict
        .history
        .ops
        .iter()
        .filter(|op| matches!(op, skein_broker::check::Op::Send(s) if s.ack().is_some()))
        .count();
    assert!(acked >= 500, "the workload made progress through the faults: {acked} acknowledged");
    let reread = skein_broker::check::History::from_json_lines(std::fs::File::open(&history).expect("history written"))
        .expect("history parses");
    assert_eq!(reread.ops.len(), verdict.history.ops.len());
    assert!(skein_broker::check::check(&reread).ok());
}

/// Starts a broker on a free port in `dir`; returns its address, pid and restart command.
fn start_broker(dir: &std::path::Path) -> (String, u32, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let start = format!(
        "{} --listen {addr} --data-dir {} >>{} 2>&1 & echo $!",
        common::broker_binary().display(),
        dir.join("data").display(),
        dir.join("broker.log").display()
    );
    let out = Command::new("sh").arg("-c").arg(&start).output().expect("start broker");
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("pid printed");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (addr, pid, start)
}

/// Keyed producers and slow readers on a hash-range topic that splits and merges six times:
/// with the broker killed (-9) and paused meanwhile, every check passes, key order included;
/// readers that take each new partition without reading its parents first (the planted bug)
/// fail the key-order check.
#[test]
fn verify_checks_key_order_through_splits_and_merges_and_catches_readers_ignoring_the_lineage() {
    use skein_broker::check::Check;
    use skein_loadgen::verify::{run, Fault, VerifyConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, pid, start) = start_broker(dir.path());
    let ranged = |topic: &str| VerifyConfig {
        brokers: addr.clone(),
        topic: topic.into(),
        partitions: 2,
        rate: 60.0,
        duration: std::time::Duration::from_secs(8),
        partitioning: skein_client::partitioning::Partitioning::HashRange,
        resizes: 6,
        keys: 16,
        reader_pause: std::time::Duration::from_millis(30),
        ..VerifyConfig::default()
    };
    let cfg = VerifyConfig {
        faults: vec![Fault::Kill, Fault::Pause],
        pids: vec![pid],
        restart: vec![start],
        fault_interval: std::time::Duration::from_millis(2500),
        ..ranged("lineage")
    };
    let verdict = run(cfg);
    let planted = verdict.as_ref().ok().map(|_| run(VerifyConfig { unsafe_ignore_lineage: true, ..ranged("planted") }));
    let _ = Command::new("pkill").args(["-KILL", "-f", &format!("skein-broker --listen {addr}")]).status();
    let verdict = verdict.expect("verify ran");
    assert!(verdict.report.ok(), "{}", verdict.report);
    assert!(verdict.report.not_run().is_empty(), "every check ran: {}", verdict.report);
    assert!(verdict.faults >= 2, "faults injected: {}", verdict.faults);
    assert_eq!(verdict.resizes.len(), 6, "{:?}", verdict.resizes);
    let keyed_reads = verdict.report.result(Check::KeyOrder).map_or(0, |r| r.counted);
    assert!(keyed_reads >= 500, "the readers read {keyed_reads} keyed values");
    let planted = planted.expect("the first run passed").expect("verify ran");
    assert!(planted.report.violated(Check::KeyOrder), "{}", planted.report);
    let others = planted.report.results.iter().filter(|r| r.failed() && r.check != Check::KeyOrder).count();
    assert_eq!(others, 0, "only key order fails: {}", planted.report);
}
