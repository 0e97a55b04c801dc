//! The `skein` CLI's output contract under faults, against three real brokers: `produce
//! --print-offsets` gives every input line exactly one output line, in input order, while the
//! partition's leader is killed (SIGKILL) and restarted again and again.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{leader, settled, wait_for, Cluster};
use common::{block_on, sibling};
use skein_client::{Client, Consumer, ConsumerConfig, Position};

/// Input lines per second (the run used 200,000 with release binaries; the test
/// binaries are debug builds on a 2-core machine).
const RATE: u64 = 40_000;
/// How long the input runs.
const INPUT: Duration = Duration::from_secs(16);
const KILLS: usize = 3;
const KILL_INTERVAL: Duration = Duration::from_secs(4);

fn value(i: u64) -> String {
    format!("v{i:09}")
}

#[test]
fn produce_print_offsets_gives_each_input_line_its_own_output_line_through_leader_kills() {
    let mut c = Cluster::start(81, 19581);
    let bootstrap = c.addrs.join(",");
    block_on(settled(&c));
    let mut cli = Command::new(sibling("skein", &["--bin", "skein"]))
        .args(["--brokers", &bootstrap, "produce", "t", "--partition", "0", "--acks", "all", "--print-offsets"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skein produce");
    // A paced writer: RATE lines per second in 10 ms steps, line i (from 1) is value(i).
    let mut stdin = cli.stdin.take().expect("stdin");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut sent = 0u64;
            let mut chunk = String::new();
            while start.elapsed() < INPUT {
                let due = (start.elapsed().as_secs_f64() * RATE as f64) as u64;
                chunk.clear();
                while sent < due {
                    sent += 1;
                    chunk.push_str(&value(sent));
                    chunk.push('\n');
                }
                stdin.write_all(chunk.as_bytes()).expect("write stdin");
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(stdin);
            done.store(true, Ordering::SeqCst);
            sent
        })
    };
    let stdout = cli.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || BufReader::new(stdout).lines().map(|l| l.expect("utf8 line")).collect());
    let stderr = cli.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr).lines().map(|l| l.expect("utf8 line")).collect::<Vec<String>>()
    });
    // Kill the leader KILLS times, KILL_INTERVAL apart, restarting it each time.
    std::thread::sleep(Duration::from_secs(2));
    for kill in 0..KILLS {
        let lead = block_on(wait_for("a leader", Duration::from_secs(15), async || {
            let l = leader(&c.addrs[(kill + 1) % 3]).await.0;
            (l != 0).then_some(l)
        }));
        let i = c.index(lead);
        c.brokers[i].take().expect("running").kill9();
        std::thread::sleep(Duration::from_millis(500));
        c.brokers[i] = Some(c.spawn(i));
        std::thread::sleep(KILL_INTERVAL);
    }
    let lines_in = writer.join().expect("writer");
    assert!(done.load(Ordering::SeqCst));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = cli.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "skein produce still running 120 s after its input ended");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out: Vec<String> = reader.join().expect("stdout reader");
    let stderr: Vec<String> = errors.join().expect("stderr reader");
    let log = block_on(read_partition(&bootstrap));
    check_output(lines_in, &out, &stderr, status.code(), &log);
}

/// Every record of `t`/0, by offset.
async fn read_partition(bootstrap: &str) -> Vec<String> {
    let client = Client::connect(bootstrap).await.expect("connect");
    let end = wait_for("the high watermark", Duration::from_secs(20), async || {
        client.list_offset("t", 0, skein_client::wire::LATEST).await.ok()
    })
    .await;
    let config = ConsumerConfig { max_wait: Duration::from_millis(200), ..ConsumerConfig::default() };
    let mut consumer = Consumer::new(client, config);
    consumer.assign("t", &[0], Position::Beginning).await.expect("assign");
    let mut log = Vec::new();
    let start = Instant::now();
    while (log.len() as u64) < end {
        assert!(start.elapsed() < Duration::from_secs(60), "read {} of {end} records", log.len());
        for r in consumer.poll().await.expect("poll") {
            assert_eq!(r.offset, log.len() as u64, "dense offsets");
            log.push(String::from_utf8(r.value).expect("utf8"));
        }
    }
    log
}

/// Output line i (from 1) describes input line i: `0 OFFSET` where the log holds value(i),
/// or `error 0 CODE` with a stderr line naming input line i (and exit status 1).
fn check_output(lines_in: u64, out: &[String], stderr: &[String], code: Option<i32>, log: &[String]) {
    assert_eq!(
        out.len() as u64,
        lines_in,
        "one output line per input line; stderr: {:?}",
        &stderr[..stderr.len().min(5)]
    );
    let mut failed = 0u64;
    for (n, line) in out.iter().enumerate() {
        let i = n as u64 + 1;
        if let Some(rest) = line.strip_prefix("error ") {
            let (partition, error) = rest.split_once(' ').expect("error PARTITION CODE");
            assert_eq!(partition, "0", "line {i}: {line}");
            assert_ne!(error, "OUT_OF_ORDER_SEQUENCE", "line {i}: a retried batch not recognised: {line}");
            assert!(stderr.iter().any(|e| e.starts_with(&format!("skein: line {i}: "))), "line {i} named on stderr");
            failed += 1;
            continue;
        }
        let (partition, offset) = line.split_once(' ').expect("PARTITION OFFSET");
        assert_eq!(partition, "0", "line {i}: {line}");
        let offset: usize = offset.parse().expect("offset");
        assert_eq!(log.get(offset).map(String::as_str), Some(value(i).as_str()), "line {i}: {line}");
    }
    assert_eq!(code, Some(if failed == 0 { 0 } else { 1 }), "exit status with {failed} failed records");
    let retries = stderr.iter().filter(|l| l.contains("retrying t/0")).count();
    println!("{lines_in} lines, {} records in the log, {failed} failed, {retries} retry lines", log.len());
}

/// Below `min.insync.replicas` an `acks=all` produce says what it is retrying and why while it
/// retries, and `--timeout` ends it with one `error PARTITION CODE` line per input line.
#[test]
fn produce_below_min_insync_replicas_reports_retries_and_each_line_at_the_timeout() {
    let mut c = Cluster::start(87, 19587);
    let bootstrap = c.addrs.join(",");
    let (lead, _) = block_on(settled(&c));
    for node in (1..=3).filter(|&n| n != lead) {
        let i = c.index(node);
        c.brokers[i].take().expect("running").kill9();
    }
    let start = Instant::now();
    let mut child = Command::new(sibling("skein", &["--bin", "skein"]))
        .args(["--brokers", &bootstrap, "--timeout", "4s", "produce", "t", "--partition", "0", "--print-offsets"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skein produce");
    child.stdin.take().expect("stdin").write_all(b"a\nb\nc\n").expect("stdin");
    let out = child.wait_with_output().expect("output");
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(15), "bounded by --timeout: {took:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "one line per input line: {stdout:?}; stderr: {stderr}");
    assert!(lines.iter().all(|l| l.starts_with("error 0 ")), "{stdout:?}");
    assert!(stderr.contains("retrying t/0 (attempt "), "retries are reported: {stderr}");
    for i in 1..=3 {
        assert!(stderr.contains(&format!("skein: line {i}: partition 0: ")), "line {i} on stderr: {stderr}");
    }
    println!("{stdout}{stderr}");
}
