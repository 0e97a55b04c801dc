//! Integration tests against the real `skein-broker` binary, driven through the client
//! library: ordering, durability across SIGTERM and kill -9 restarts, many connections, and
//! malformed input.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{block_on, Broker};
use skein_client::wire::{
    request_frame, ApiKey, ApiVersionsRequest, ErrorCode, ProducePartition, ProduceRequest, RequestHeader, Wire, Writer,
};
use skein_client::{Acks, Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};

/// Reads every record of `partitions` from the beginning until `expect` records arrived.
async fn read_all(client: &Client, topic: &str, partitions: u32, expect: usize) -> Vec<skein_client::ConsumerRecord> {
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() },
    );
    consumer.assign(topic, &(0..partitions).collect::<Vec<_>>(), Position::Beginning).await.expect("assign");
    let mut out = Vec::new();
    let mut idle = 0;
    while out.len() < expect && idle < 50 {
        let records = consumer.poll().await.expect("poll");
        idle = if records.is_empty() { idle + 1 } else { 0 };
        out.extend(records);
    }
    out
}

#[test]
fn round_trip_100k_keyed_records_over_8_partitions_in_per_key_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("orders", 8, 1, &[]).await.expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig { acks: Acks::All, ..ProducerConfig::default() });
        let mut deliveries = Vec::with_capacity(100_000);
        for i in 0..100_000u32 {
            let key = format!("key-{}", i % 1000);
            let value = format!("{key}:{}", i / 1000);
            deliveries.push(producer.send("orders", Some(key.as_bytes()), value.as_bytes()).await.expect("send"));
        }
        producer.flush().await;
        let mut acked: HashMap<(u32, u64), usize> = HashMap::new();
        for (i, d) in deliveries.into_iter().enumerate() {
            let (p, o) = d.await.expect("acknowledged");
            assert!(acked.insert((p, o), i).is_none(), "offset {p}/{o} given twice");
        }
        let records = read_all(&client, "orders", 8, 100_000).await;
        assert_eq!(records.len(), 100_000);
        let mut next_seq: HashMap<String, u32> = HashMap::new();
        let mut key_partition: HashMap<String, u32> = HashMap::new();
        for r in &records {
            let value = String::from_utf8(r.value.clone()).expect("utf8");
            let (key, seq) = value.split_once(':').expect("key:seq");
            assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
            let expect = next_seq.entry(key.to_owned()).or_insert(0);
            assert_eq!(seq.parse::<u32>().expect("seq"), *expect, "{key} out of order at {}/{}", r.partition, r.offset);
            *expect += 1;
            assert_eq!(
                *key_partition.entry(key.to_owned()).or_insert(r.partition),
                r.partition,
                "{key} moved partition"
            );
            assert!(acked.contains_key(&(r.partition, r.offset)), "record at an offset no ack named");
        }
        assert!(next_seq.values().all(|&n| n == 100), "every key's 100 records, in order");
    });
}

#[test]
fn sigterm_restart_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &[]);
    let acked = block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("t", 4, 1, &[]).await.expect("create");
        produce_acked(&client, "t", 0..5000).await
    });
    let status = broker.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    // The topic's four partitions are the first (ids 0..4); each log was closed cleanly.
    for p in 0..4 {
        let marker = dir.path().join(format!("partitions/{p}/clean-shutdown"));
        assert!(marker.exists(), "partition {p} closed cleanly: {}", marker.display());
    }
    broker.restart();
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("reconnect");
        check_present(&client, "t", 4, &acked).await;
    });
}

#[test]
fn kill9_restart_keeps_every_record_acknowledged_with_acks_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &[]);
    let addr = broker.addr.clone();
    block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        client.create_topic("t", 4, 1, &[]).await.expect("create");
    });
    // Produce from a thread while the broker is killed under it; keep what was acknowledged.
    let producer = std::thread::spawn(move || {
        block_on(async {
            let client = Client::connect(&addr).await.expect("connect");
            let producer =
                Producer::new(client, ProducerConfig { acks: Acks::All, retries: 0, ..ProducerConfig::default() });
            let mut acked = Vec::new();
            'produce: for chunk in 0..100_000u64 {
                let mut deliveries = Vec::with_capacity(64);
                for i in chunk * 64..(chunk + 1) * 64 {
                    match producer.send("t", Some(&i.to_le_bytes()), format!("v{i}").as_bytes()).await {
                        Ok(d) => deliveries.push((i, d)),
                        Err(_) => break 'produce,
                    }
                }
                producer.flush().await;
                for (i, d) in deliveries {
                    match d.await {
                        Ok(at) => acked.push((at, i)),
                        Err(_) => break 'produce,
                    }
                }
            }
            acked
        })
    });
    std::thread::sleep(Duration::from_millis(700));
    broker.kill9();
    let acked = producer.join().expect("producer thread");
    eprintln!("acknowledged before the kill: {}", acked.len());
    assert!(acked.len() > 100, "the producer made progress before the kill: {}", acked.len());
    broker.restart();
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("reconnect");
        let expected: HashMap<(u32, u64), String> = acked.into_iter().map(|(at, i)| (at, format!("v{i}"))).collect();
        check_present(&client, "t", 4, &expected).await;
    });
}

async fn produce_acked(client: &Client, topic: &str, ids: std::ops::Range<u64>) -> HashMap<(u32, u64), String> {
    let producer = Producer::new(client.clone(), ProducerConfig { acks: Acks::All, ..ProducerConfig::default() });
    let mut deliveries = Vec::new();
    for i in ids {
        let value = format!("v{i}");
        deliveries
            .push((value.clone(), producer.send(topic, Some(&i.to_le_bytes()), value.as_bytes()).await.expect("send")));
    }
    producer.flush().await;
    let mut acked = HashMap::new();
    for (value, d) in deliveries {
        acked.insert(d.await.expect("ack"), value);
    }
    acked
}

async fn check_present(client: &Client, topic: &str, partitions: u32, acked: &HashMap<(u32, u64), String>) {
    let records = read_all(client, topic, partitions, acked.len()).await;
    let found: HashMap<(u32, u64), Vec<u8>> = records.into_iter().map(|r| ((r.partition, r.offset), r.value)).collect();
    for (at, value) in acked {
        assert_eq!(
            found.get(at).map(|v| String::from_utf8_lossy(v).into_owned()).as_deref(),
            Some(value.as_str()),
            "acknowledged record at {at:?}"
        );
    }
}

#[test]
fn thousand_concurrent_connections_are_served() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(&broker.addr).expect("connect")).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&api_versions_frame(i as u32)).expect("send");
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let (id, code) = read_response(c);
        assert_eq!((id, code), (i as u32, ErrorCode::NONE), "connection {i}");
    }
}

#[test]
fn malformed_frames_leave_the_broker_serving_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &["--max-frame-bytes", "1048576"]);
    block_on(async {
        Client::connect(&broker.addr).await.expect("connect").create_topic("t", 1, 1, &[]).await.expect("create");
    });
    // Oversized frame: the connection is closed.
    let mut c = TcpStream::connect(&broker.addr).expect("connect");
    c.write_all(&(64u32 << 20).to_le_bytes()).expect("send");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert_eq!(c.read(&mut [0u8; 8]).unwrap_or(0), 0, "closed after an oversized frame");
    // Too short for a header: closed.
    let mut c = TcpStream::connect(&broker.addr).expect("connect");
    c.write_all(&[2, 0, 0, 0, 1, 0]).expect("send");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert_eq!(c.read(&mut [0u8; 8]).unwrap_or(0), 0, "closed after a short frame");
    // Unknown API, garbage body, corrupt batch: error codes, and the connection goes on.
    let mut c = TcpStream::connect(&broker.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c.write_all(&raw_frame(&[99, 0, 0, 0, 7, 0, 0, 0, 0, 0])).expect("send");
    assert_eq!(read_response(&mut c), (7, ErrorCode::UNSUPPORTED_VERSION));
    c.write_all(&raw_frame(&[ApiKey::Produce as u8, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0xff, 0xff])).expect("send");
    assert_eq!(read_response(&mut c), (8, ErrorCode::INVALID_REQUEST));
    let mut batch = skein_log::batch::BatchBuilder::new();
    batch.push(None, b"x", &[], skein_log::types::Timestamp(0));
    let mut bytes = batch.build().into_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let req = ProduceRequest {
        acks: 1,
        timeout_ms: 1000,
        partitions: vec![ProducePartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch: 0,
            records: bytes::BytesMut::from(&bytes[..]),
        }],
    };
    let header = RequestHeader { api_key: ApiKey::Produce, api_version: 0, correlation_id: 9, client_id: "t".into() };
    c.write_all(&request_frame(&header, &req)).expect("send");
    let body = read_body(&mut c);
    let resp: skein_client::wire::ProduceResponse =
        skein_client::wire::decode_response(bytes::BytesMut::from(&body[..])).expect("decodes").1.expect("ok");
    assert_eq!(resp.partitions[0].error, ErrorCode::CORRUPT_BATCH);
    c.write_all(&api_versions_frame(10)).expect("send");
    assert_eq!(read_response(&mut c), (10, ErrorCode::NONE), "same connection still served");
    // Random bytes on other connections, then a healthy client.
    for seed in 0..20u64 {
        let mut c = TcpStream::connect(&broker.addr).expect("connect");
        let junk: Vec<u8> = (0..200).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect();
        let _ = c.write_all(&junk);
    }
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        assert_eq!(client.list_topics().await.expect("list"), vec!["t".to_owned()]);
        assert_eq!(
            client.describe_topic("t").await.expect("describe").partitions[0].log_end,
            0,
            "the corrupt batch was not stored"
        );
    });
}

fn api_versions_frame(id: u32) -> Vec<u8> {
    let header =
        RequestHeader { api_key: ApiKey::ApiVersions, api_version: 0, correlation_id: id, client_id: "t".into() };
    request_frame(&header, &ApiVersionsRequest {})
}

fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    (body.len() as u32).encode(&mut w);
    w.buf.extend_from_slice(body);
    w.buf
}

fn read_body(c: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    c.read_exact(&mut len).expect("response length");
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    c.read_exact(&mut body).expect("response body");
    body
}

fn read_response(c: &mut TcpStream) -> (u32, ErrorCode) {
    let body = read_body(c);
    let id = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
    (id, ErrorCode(u16::from_le_bytes([body[4], body[5]])))
}

#[test]
fn connections_past_the_limit_are_closed_and_the_others_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &["--max-connections", "3"]);
    let mut open: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&broker.addr).expect("connect")).collect();
    for (i, c) in open.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        c.write_all(&api_versions_frame(i as u32)).expect("send");
        assert_eq!(read_response(c), (i as u32, ErrorCode::NONE));
    }
    let mut extra = TcpStream::connect(&broker.addr).expect("the kernel accepts the connection");
    extra.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = extra.write_all(&api_versions_frame(99));
    assert_eq!(extra.read(&mut [0u8; 8]).unwrap_or(0), 0, "the fourth connection is closed");
    for (i, c) in open.iter_mut().enumerate() {
        c.write_all(&api_versions_frame(10 + i as u32)).expect("send");
        assert_eq!(read_response(c), (10 + i as u32, ErrorCode::NONE), "connection {i} still served");
    }
}

/// The epoll fallback (what a container that blocks io_uring gets) serves the same broker, and
/// the broker says at start which driver it runs.
#[test]
fn the_polling_driver_serves_and_is_named_at_start() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skein-broker"))
        .args(["--listen", "127.0.0.1:0", "--io-driver", "poll", "--cores", "2", "--data-dir"])
        .arg(dir.path())
        .env("SKEIN_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start skein-broker");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let addr = line.trim().strip_prefix("ready ").expect("ready ADDR").to_owned();
    let acked = block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        client.create_topic("t", 2, 1, &[]).await.expect("create");
        let acked = produce_acked(&client, "t", 0..500).await;
        check_present(&client, "t", 2, &acked).await;
        acked
    });
    assert_eq!(acked.len(), 500);
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("exit");
    assert!(out.status.success(), "clean exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("I/O driver: epoll (polling)"), "names its driver: {err}");
}
