//! Transactions through the `skein` CLI, exactly as the contract spells it, against
//! three real brokers: `produce --transactional-id --transaction-size --print-offsets` (one
//! line per input line, printed once its transaction committed), `--abort`, `consume
//! --isolation read_committed|read_uncommitted`, `topic describe --json` with `last_stable`, and
//! `txn list|describe --json|abort` ending a hanging transaction that holds back read_committed
//! readers (its producer is fenced).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{block_on, sibling};
use skein_client::Client;

fn skein(bin: &Path, bootstrap: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(bin)
        .arg("--brokers")
        .arg(bootstrap)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skein");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("skein ran")
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// The values a `consume` with `isolation` prints, sorted.
fn consume(bin: &Path, bootstrap: &str, isolation: &str) -> Vec<String> {
    let out = skein(bin, bootstrap, &["consume", "tc", "--isolation", isolation, "--timeout-ms", "1500"], None);
    assert!(out.status.success(), "consume failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut v = lines(&out);
    v.sort();
    v
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn the_cli_commits_aborts_and_ends_a_hanging_transaction() {
    let c = Cluster::start(151, 19651);
    let bootstrap = c.addrs.join(",");
    let bin = sibling("skein", &["--bin", "skein"]);
    block_on(async {
        let client = Client::connect(&bootstrap).await.expect("connect");
        client.create_topic("tc", 3, 3, &[("min.insync.replicas".into(), "2".into())]).await.expect("create tc");
    });

    // 250 lines, committed every 100 lines and at the end of input: one output line each.
    let input: String = (0..250).map(|i| format!("c{i:03}\n")).collect();
    let out = skein(
        &bin,
        &bootstrap,
        &["produce", "tc", "--transactional-id", "loader", "--transaction-size", "100", "--print-offsets"],
        Some(&input),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = lines(&out);
    assert_eq!(printed.len(), 250, "one line per input line");
    let offsets: BTreeSet<(u32, u64)> = printed
        .iter()
        .map(|l| {
            let (p, o) = l.split_once(' ').expect("PARTITION OFFSET");
            (p.parse().expect("partition"), o.parse().expect("offset"))
        })
        .collect();
    assert_eq!(offsets.len(), 250, "distinct offsets");

    // Aborted transactions: invisible to read_committed, in the log for read_uncommitted.
    let aborted: String = (0..30).map(|i| format!("a{i:03}\n")).collect();
    let out = skein(
        &bin,
        &bootstrap,
        &["produce", "tc", "--transactional-id", "loader", "--transaction-size", "10", "--abort", "--print-offsets"],
        Some(&aborted),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out).len(), 30);
    let committed: Vec<String> = (0..250).map(|i| format!("c{i:03}")).collect();
    assert_eq!(consume(&bin, &bootstrap, "read_committed"), committed);
    let everything = consume(&bin, &bootstrap, "read_uncommitted");
    assert_eq!(everything.len(), 280);
    assert!(everything.iter().filter(|v| v.starts_with('a')).count() == 30);

    // Nothing open: every partition's last stable offset is its high watermark.
    let d = json(&skein(&bin, &bootstrap, &["topic", "describe", "tc", "--json"], None));
    for p in d["partitions"].as_array().expect("partitions") {
        assert_eq!(p["last_stable"], p["high_watermark"], "{p}");
    }

    // A transaction held open (its producer waits for input) pins the last stable offset:
    // read_committed stops before its records; `txn abort` ends it and fences the producer.
    let mut hanging = Command::new(&bin)
        .args(["--brokers", &bootstrap, "produce", "tc", "--transactional-id", "stuck"])
        .args(["--transaction-size", "1000", "--print-offsets"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skein produce");
    let mut stdin = hanging.stdin.take().expect("stdin");
    stdin.write_all(b"h1\nh2\n").expect("write");
    stdin.flush().expect("flush");
    let started = Instant::now();
    let listed = loop {
        let out = skein(&bin, &bootstrap, &["txn", "describe", "stuck", "--json"], None);
        if out.status.success() {
            let d = json(&out);
            if d["state"] == "ongoing" && !d["partitions"].as_array().is_none_or(|p| p.is_empty()) {
                break d;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the transaction never showed as ongoing");
        std::thread::sleep(Duration::from_millis(100));
    };
    for key in ["transactional_id", "producer_id", "producer_epoch", "state", "timeout_ms", "age_ms", "partitions"] {
        assert!(listed.get(key).is_some(), "describe --json has {key}: {listed}");
    }
    // Its records reach the log; the partition's last stable offset stays below them.
    let pinned = loop {
        let d = json(&skein(&bin, &bootstrap, &["topic", "describe", "tc", "--json"], None));
        let p = d["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .find(|p| p["last_stable"].as_u64() < p["high_watermark"].as_u64())
            .cloned();
        if let Some(p) = p {
            if consume(&bin, &bootstrap, "read_uncommitted").iter().any(|v| v == "h2") {
                break p;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the open transaction never pinned a partition");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!consume(&bin, &bootstrap, "read_committed").iter().any(|v| v.starts_with('h')), "{pinned}");
    let list = skein(&bin, &bootstrap, &["txn", "list"], None);
    assert!(String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with("stuck") && l.contains("ongoing")));

    let out = skein(&bin, &bootstrap, &["txn", "abort", "stuck"], None);
    assert!(out.status.success(), "txn abort: {}", String::from_utf8_lossy(&out.stderr));
    let d = json(&skein(&bin, &bootstrap, &["txn", "describe", "stuck", "--json"], None));
    assert_eq!(d["state"], "complete_abort");
    let d = json(&skein(&bin, &bootstrap, &["topic", "describe", "tc", "--json"], None));
    for p in d["partitions"].as_array().expect("partitions") {
        assert_eq!(p["last_stable"], p["high_watermark"], "the abort freed every partition: {p}");
    }
    // The fenced producer fails its next write (each line gets its error line) and exits 1.
    stdin.write_all(b"h3\n").expect("write");
    drop(stdin);
    let out = hanging.wait_with_output().expect("producer exits");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = lines(&out);
    assert_eq!(printed.len(), 3, "one line per input line: {printed:?}");
    assert!(printed.iter().all(|l| l.starts_with("error ")), "{printed:?}");
    assert!(!consume(&bin, &bootstrap, "read_committed").iter().any(|v| v.starts_with('h')));

    // Unknown ids: exit 1 with a message.
    let out = skein(&bin, &bootstrap, &["txn", "describe", "nope"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
    drop(c);
}
