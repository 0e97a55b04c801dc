//! `verify --transactions` against a local 3-node cluster of real `skein-broker` processes:
//! transactional producers writing 2 to 5 partitions per transaction (one in five aborted),
//! read_committed readers and one read_uncommitted reader, under leader kills, kills of a
//! transaction coordinator and pauses. Every base check and every transaction check (aborted
//! read, dirty read, torn transaction, lost write, duplicate, inconsistent offset, stuck last
//! stable offset) must pass.
//!
//! The brokers listen on 127.0.0.121 to 127.0.0.123 (no other test uses them), so this test
//! can run beside the other cluster tests.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use skein_loadgen::cluster::{ClusterConfig, LocalCluster};
use skein_loadgen::txn_check::TxnCheck;
use skein_loadgen::verify::{self, Fault, VerifyConfig};

#[test]
fn transactions_stay_atomic_under_leader_and_coordinator_kills_and_pauses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ClusterConfig::new(common::broker_binary(), dir.path().join("cluster"), 3).expect("free ports");
    config.addrs = (0..3u8)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, 0, 121 + i);
            let port = std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("a free port").port();
            SocketAddrV4::new(ip, port)
        })
        .collect();
    let mut cluster = LocalCluster::start(config).expect("3 brokers ready");
    let cfg = VerifyConfig {
        topic: "txn-chaos".into(),
        partitions: 4,
        replicas: 3,
        producers: 2,
        consumers: 2,
        rate: 100.0,
        duration: Duration::from_secs(36),
        faults: vec![Fault::KillLeader, Fault::KillCoordinator, Fault::Pause],
        fault_interval: Duration::from_secs(4),
        topic_configs: vec![("min.insync.replicas".into(), "2".into())],
        history: Some(dir.path().join("history.jsonl")),
        transactions: true,
        ..VerifyConfig::default()
    };
    let verdict = verify::run_cluster(cfg, &mut cluster);
    drop(cluster);
    let logs = dir.keep();
    let verdict = verdict.unwrap_or_else(|e| panic!("verify ran: {e:#} (broker logs in {})", logs.display()));
    let txn = verdict.txn.as_ref().expect("a transaction report");
    let shown = format!("{}{txn}(history and broker logs in {})", verdict.report, logs.display());
    assert!(verdict.report.ok(), "{shown}");
    assert!(verdict.report.not_run().is_empty(), "every base check ran: {shown}");
    assert!(txn.ok(), "{shown}");
    let kinds: std::collections::BTreeSet<&str> = verdict.fault_log.iter().map(|f| f.fault.name()).collect();
    assert_eq!(kinds.len(), 3, "every kind of fault was injected: {:?}", verdict.fault_log);
    assert!(txn.counts.committed >= 200, "transactions committed through the faults: {shown}");
    assert!(txn.counts.aborted >= 30, "transactions aborted on purpose: {shown}");
    let torn = txn.result(TxnCheck::TornTransaction).expect("present");
    assert!(torn.counted >= 300, "committed transactions were seen by read_committed readers: {shown}");
    std::fs::remove_dir_all(&logs).ok();
}
