//! A data directory belongs to one broker process: a second broker on it exits at once
//! (status 1, naming the directory and the holder's pid) in single-node and cluster mode, a
//! lock left by a killed broker does not block its restart, and a broker that cannot listen
//! leaves no data directory behind.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{block_on, free_port, Broker};
use skein_client::{Acks, Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};

/// Runs a broker that is expected to exit on its own; kills it (and fails) after 10 s.
fn run_to_exit(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein-broker"))
        .args(args)
        .env("SKEIN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skein-broker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("second broker still running after 10 s; stdout: {}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn assert_refused(out: &Output, dir: &std::path::Path, holder: u32) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"), "it must not have served");
    assert!(stderr.contains(&dir.display().to_string()), "names the directory: {stderr}");
    assert!(stderr.contains(&format!("pid {holder}")), "names the holder's pid {holder}: {stderr}");
}

async fn produce(addr: &str, topic: &str, values: std::ops::Range<u32>) -> Vec<u64> {
    let client = Client::connect(addr).await.expect("connect");
    let producer = Producer::new(client, ProducerConfig { acks: Acks::All, ..ProducerConfig::default() });
    let mut deliveries = Vec::new();
    for i in values {
        deliveries.push(producer.send_to(topic, Some(0), None, format!("v{i}").as_bytes()).await.expect("send"));
    }
    producer.flush().await;
    let mut offsets = Vec::new();
    for d in deliveries {
        offsets.push(d.await.expect("acknowledged").1);
    }
    offsets
}

async fn read_values(addr: &str, topic: &str, expect: usize) -> Vec<String> {
    let client = Client::connect(addr).await.expect("connect");
    let config = ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() };
    let mut consumer = Consumer::new(client, config);
    consumer.assign(topic, &[0], Position::Beginning).await.expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < expect && Instant::now() < deadline {
        out.extend(consumer.poll().await.expect("poll").into_iter().map(|r| String::from_utf8(r.value).expect("utf8")));
    }
    out
}

#[test]
fn a_second_single_node_broker_on_a_held_directory_exits_and_a_killed_holder_does_not_block_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let mut first = Broker::start(&dir, &[]);
    block_on(async {
        Client::connect(&first.addr).await.expect("connect").create_topic("t", 1, 1, &[]).await.expect("create");
        assert_eq!(produce(&first.addr, "t", 0..100).await, (0..100).collect::<Vec<u64>>());
    });
    let second = run_to_exit(&["--listen", "127.0.0.1:0", "--data-dir", dir.to_str().expect("utf8")]);
    assert_refused(&second, &dir, first.child.id());
    block_on(async {
        assert_eq!(produce(&first.addr, "t", 100..200).await, (100..200).collect::<Vec<u64>>(), "first still owns it");
    });
    // A crash leaves the lock file behind with a dead pid: it must not block the restart.
    first.kill9();
    assert!(dir.join(".lock").exists());
    let restarted = Broker::start(&dir, &[]);
    let values = block_on(read_values(&restarted.addr, "t", 200));
    assert_eq!(values, (0..200).map(|i| format!("v{i}")).collect::<Vec<_>>(), "every acknowledged record, once");
}

#[test]
fn a_second_cluster_broker_on_a_held_directory_exits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let (p1, p2) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{p1}");
    let first = Broker::start_at(&dir, &listen, &["--voters", &format!("1@{listen}")]);
    let other = format!("127.0.0.1:{p2}");
    let voters = format!("1@{other}");
    let second = run_to_exit(&["--listen", &other, "--voters", &voters, "--data-dir", dir.to_str().expect("utf8")]);
    assert_refused(&second, &dir, first.child.id());
}

#[test]
fn a_broker_that_cannot_listen_leaves_no_data_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tmp.path().join("never");
    let out = run_to_exit(&["--listen", &addr, "--data-dir", dir.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&addr), "names the address: {stderr}");
    assert!(!dir.exists(), "no data directory was created");
    let voters = format!("1@{addr}");
    let out = run_to_exit(&["--listen", &addr, "--voters", &voters, "--data-dir", dir.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.exists(), "no data directory was created in cluster mode either");
}

#[test]
fn broker_logs_written_to_a_file_are_plain_text() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein-broker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("SKEIN_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skein-broker");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut line)
        .expect("ready line");
    assert!(line.starts_with("ready "), "{line}");
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(ok.success());
    let out = child.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("broker ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "no terminal colour codes in a log file: {log:?}");
}
