//! Exactly once through crashes: the `eos_pipeline` example (client/examples) copies topic A to
//! topic B as `t:VALUE`, committing its output and its input offsets in one transaction, on a
//! local 3-node cluster of real `skein-broker` processes. The pipeline process is SIGKILLed
//! and restarted several times and a broker is SIGKILLed and restarted meanwhile; at the end a
//! read_committed reader of B must see each A record's transform exactly once (none lost, none
//! twice).
//!
//! The brokers listen on 127.0.0.124 to 127.0.0.126 (no other test uses them).

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skein_client::{Acks, Client, Consumer, ConsumerConfig, Isolation, Position, Producer, ProducerConfig};
use skein_loadgen::cluster::{ClusterConfig, LocalCluster};

const RECORDS: usize = 20_000;
const PARTITIONS: u32 = 4;

#[test]
fn a_pipeline_killed_again_and_again_writes_each_transform_exactly_once() {
    let pipeline_bin = pipeline_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ClusterConfig::new(common::broker_binary(), dir.path().join("cluster"), 3).expect("free ports");
    config.addrs = (0..3u8)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, 0, 124 + i);
            let port = std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("a free port").port();
            SocketAddrV4::new(ip, port)
        })
        .collect();
    let mut cluster = LocalCluster::start(config).expect("3 brokers ready");
    let brokers = cluster.bootstrap();
    let rt = compio::runtime::Runtime::new().expect("runtime");
    rt.block_on(create_topics(&brokers));
    // The input arrives while the pipeline runs (about 500 records a second, 40 s in all), so
    // that it commits many transactions and the kills land between and inside them: a restarted
    // pipeline waits out the killed one's 10 s group session, and must still find input.
    let input = {
        let brokers = brokers.clone();
        std::thread::spawn(move || compio::runtime::Runtime::new().expect("runtime").block_on(produce_input(&brokers)))
    };
    let log = dir.path().join("pipeline.log");
    let spawn = || {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("pipeline log");
        Command::new(&pipeline_bin)
            .args(["--bootstrap", &brokers, "--input", "a", "--output", "b", "--group", "pipeline"])
            .args(["--transactional-id", "pipeline-1", "--idle-ms", "8000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start eos_pipeline")
    };
    let mut counts = Vec::new();
    // Kills as B grows (the pipeline is fast: timed kills would all come after the end): the
    // pipeline at four points, a broker with the second. Progress is B's last stable offsets
    // summed (records and markers committed so far).
    for (round, target) in [2_000u64, 6_000, 10_000, 14_000].into_iter().enumerate() {
        let mut child = spawn();
        let deadline = Instant::now() + Duration::from_secs(90);
        while rt.block_on(stable_sum(&brokers)) < target {
            assert!(Instant::now() < deadline, "B did not reach {target} within 90 s (logs in {})", log.display());
            assert!(child.try_wait().expect("pipeline status").is_none(), "the pipeline exited early");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().expect("SIGKILL the pipeline");
        child.wait().expect("reap the pipeline");
        let count = rt.block_on(read_output(&brokers)).values().sum::<usize>();
        eprintln!("pipeline killed past {target}; B holds {count} transforms");
        counts.push(count);
        if round == 1 {
            cluster.kill(2).expect("SIGKILL broker 2");
            std::thread::sleep(Duration::from_millis(500));
            cluster.restart(2).expect("broker 2 back");
        }
    }
    input.join().expect("the input producer finished");
    // Then runs to the end: until it has been idle (owning partitions) for 8 s.
    let mut finished = None;
    for _ in 0..3 {
        let child = spawn();
        let out = wait_with_timeout(child, Duration::from_secs(120));
        let count = rt.block_on(read_output(&brokers)).values().sum::<usize>();
        eprintln!("pipeline run ended ({out:?}); B holds {count} transforms");
        if count >= RECORDS {
            finished = Some(out);
            break;
        }
    }
    let seen = rt.block_on(read_output(&brokers));
    drop(cluster);
    let logs = dir.keep();
    assert!(finished.is_some(), "the pipeline did not finish (logs in {})", logs.display());
    assert!(
        counts.iter().filter(|&&c| c < RECORDS).count() == 4,
        "every kill came before the pipeline was done: B held {counts:?} after them"
    );
    let missing: Vec<usize> = (0..RECORDS).filter(|i| !seen.contains_key(&format!("t:v{i}"))).collect();
    let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let foreign: Vec<&String> = seen.keys().filter(|v| !is_transform(v)).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && foreign.is_empty(),
        "{} missing (first {:?}), {} twice (first {:?}), {} unexpected (first {:?}); logs in {}",
        missing.len(),
        &missing[..missing.len().min(10)],
        twice.len(),
        &twice[..twice.len().min(10)],
        foreign.len(),
        &foreign[..foreign.len().min(10)],
        logs.display()
    );
    assert_eq!(seen.len(), RECORDS);
    std::fs::remove_dir_all(&logs).ok();
}

fn is_transform(v: &str) -> bool {
    v.strip_prefix("t:v").and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n < RECORDS)
}

/// Topics A and B (4 partitions, 3 replicas, min.insync.replicas 2).
async fn create_topics(brokers: &str) {
    let client = Client::connect(brokers).await.expect("connect");
    let configs = [("min.insync.replicas".to_owned(), "2".to_owned())];
    for topic in ["a", "b"] {
        client.create_topic(topic, PARTITIONS, 3, &configs).await.expect("create topic");
    }
    wait_for_leaders(&client).await;
}

/// A's records `v0` ..., keyed `k0` ..., 100 every 200 ms.
async fn produce_input(brokers: &str) {
    let client = Client::connect(brokers).await.expect("connect");
    let producer = Producer::new(client, ProducerConfig { acks: Acks::All, ..ProducerConfig::default() });
    let mut deliveries = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        deliveries.push(producer.send("a", Some(key.as_bytes()), value.as_bytes()).await.expect("queued"));
        if i % 100 == 99 {
            compio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    producer.flush().await;
    for d in deliveries {
        d.await.expect("input record acknowledged");
    }
}

async fn wait_for_leaders(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = async {
            for topic in ["a", "b"] {
                let t = client.describe_topic(topic).await.ok()?;
                if t.partitions.len() != PARTITIONS as usize || t.partitions.iter().any(|p| p.leader == 0) {
                    return None;
                }
            }
            Some(())
        };
        if ready.await.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "topics a and b have no leaders after 30 s");
        compio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// B's values as a read_committed reader sees them, counted, from the start to the last
/// stable offset.
async fn read_output(brokers: &str) -> BTreeMap<String, usize> {
    let client = Client::connect(brokers).await.expect("connect");
    let mut ends = Vec::new();
    for p in 0..PARTITIONS {
        let end = client
            .list_offset_isolated("b", p, skein_client::wire::LATEST, Isolation::ReadCommitted)
            .await
            .expect("last stable offset");
        ends.push(end);
    }
    let config = ConsumerConfig { isolation: Isolation::ReadCommitted, ..ConsumerConfig::default() };
    let mut consumer = Consumer::new(client, config);
    let all: Vec<u32> = (0..PARTITIONS).collect();
    consumer.assign("b", &all, Position::Beginning).await.expect("assign");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !all.iter().all(|&p| consumer.position("b", p).unwrap_or(0) >= ends[p as usize]) {
        assert!(Instant::now() < deadline, "reading b did not reach {ends:?} within 60 s");
        for r in consumer.poll().await.unwrap_or_default() {
            *seen.entry(String::from_utf8_lossy(&r.value).into_owned()).or_default() += 1;
        }
    }
    seen
}

/// B's last stable offsets, summed.
async fn stable_sum(brokers: &str) -> u64 {
    let Ok(client) = Client::connect(brokers).await else { return 0 };
    let mut sum = 0;
    for p in 0..PARTITIONS {
        let r = client.list_offset_isolated("b", p, skein_client::wire::LATEST, Isolation::ReadCommitted).await;
        sum += r.unwrap_or(0);
    }
    sum
}

/// Waits for the pipeline to exit (killing it after `bound`); its stdout.
fn wait_with_timeout(mut child: Child, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    while child.try_wait().expect("pipeline status").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("pipeline output");
    format!("{} {}", out.status, String::from_utf8_lossy(&out.stdout).trim())
}

/// The `eos_pipeline` example of this build (cargo builds it if it is stale; not when
/// `tests/run` built every target just before and says so with SKEIN_TESTS_PREBUILT, since
/// `-p skein-client` resolves other features and would rebuild dependencies).
fn pipeline_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps/..");
    let path = dir.join("examples").join("eos_pipeline");
    if std::env::var_os("SKEIN_TESTS_PREBUILT").is_some() && path.exists() {
        return path;
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "skein-client", "--example", "eos_pipeline"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the eos_pipeline example failed");
    path
}
