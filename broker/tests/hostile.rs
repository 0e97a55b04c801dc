//! Hostile clients against real brokers, single node and a one-voter cluster (issue 16):
//!
//! - a small Fetch naming one large partition 400 times must not make the broker read it 400
//!   times: its peak memory (VmHWM) stays bounded and the response stays near `max_bytes`;
//! - clients that send produce requests and drop their connection before the answers must not
//!   leak the produce-bytes and in-flight counts: afterwards a produce of nearly
//!   `--max-produce-bytes` succeeds, a normal producer is never THROTTLED, and (single node)
//!   shutdown does not wait for requests that are gone.
//!
//! Both need the broker's `/proc/PID/status` (Linux).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{block_on, vm_hwm_kb, Broker};
use skein_client::conn::Connection;
use skein_client::wire::{
    request_frame, ApiKey, ApiVersionsRequest, ErrorCode, FetchPartition, FetchRequest, FetchResponse,
    ProducePartition, ProduceRequest, ProduceResponse, RequestHeader,
};
use skein_client::Client;

/// Data in the partition the fetch names 400 times.
const DATA_BYTES: usize = 20 << 20;
/// Bytes of one stored batch (16 records of 1 KiB, plus framing).
const RECORDS_PER_BATCH: usize = 16;
const MAX_BYTES: u32 = 1 << 20;
/// The bound on the broker's peak resident memory after the fetch.
const PEAK_KB_MAX: u64 = 200 << 10;

#[test]
fn a_fetch_naming_a_large_partition_400_times_is_bounded_single_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    fetch_400_times(&broker, "single node");
}

#[test]
fn a_fetch_naming_a_large_partition_400_times_is_bounded_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_one_voter_cluster(dir.path(), &[]);
    fetch_400_times(&broker, "cluster");
}

#[test]
fn abandoned_produce_requests_give_their_budget_back_single_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One shard: every request runs on the shard that owns the partition (the task the
    // connection drops is the one appending). A long grace: shutdown waits for in-flight
    // requests, so a leaked count would show as a slow exit.
    let extra = ["--cores", "1", "--max-produce-bytes", "1048576", "--shutdown-grace-ms", "30000"];
    let mut broker = Broker::start(dir.path(), &extra);
    abandon_and_check(&broker, 1 << 20, "single node");
    let start = Instant::now();
    let status = broker.terminate();
    assert!(status.success(), "clean exit: {status}");
    let took = start.elapsed();
    eprintln!("single node: shutdown took {took:?}");
    assert!(took < Duration::from_secs(10), "shutdown waited {took:?} for in-flight requests that are gone");
}

#[test]
fn abandoned_produce_requests_give_their_budget_back_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_one_voter_cluster(dir.path(), &["--max-produce-bytes", "1048576"]);
    abandon_and_check(&broker, 1 << 20, "cluster");
}

/// Produces `DATA_BYTES` into `t`/0, then sends one Fetch naming it 400 times (max_bytes
/// 1 MiB, partition_max_bytes unbounded) and checks the broker's peak memory and the response.
fn fetch_400_times(broker: &Broker, mode: &str) {
    let pid = broker.child.id();
    block_on(async {
        let conn = setup(&broker.addr).await;
        let batch = batch_of(RECORDS_PER_BATCH, 1024);
        let per_request = (1 << 20) / batch.len();
        let mut written = 0;
        while written < DATA_BYTES {
            let records: Vec<u8> = batch.repeat(per_request);
            written += records.len();
            assert_eq!(produce(&conn, -1, records).await, ErrorCode::NONE, "{mode}: produce");
        }
        let before = vm_hwm_kb(pid);
        let part = FetchPartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch: 0,
            fetch_offset: 0,
            partition_max_bytes: u32::MAX,
            min_high_watermark: 0,
            min_leader_epoch: 0,
        };
        let req = FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: MAX_BYTES,
            isolation: 0,
            replica_read: false,
            partitions: vec![part; 400],
        };
        let resp: FetchResponse = conn.call(ApiKey::Fetch, &req).await.expect("fetch");
        let after = vm_hwm_kb(pid);
        eprintln!("{mode}: broker VmHWM {before} kB after producing {written} bytes, {after} kB after the fetch");
        assert_eq!(resp.partitions.len(), 400, "{mode}: every entry answered");
        assert!(resp.partitions.iter().all(|p| p.error == ErrorCode::NONE), "{mode}: no errors");
        let sizes: Vec<usize> = resp.partitions.iter().map(|p| p.records.len()).collect();
        let total: usize = sizes.iter().sum();
        eprintln!("{mode}: response carries {total} record bytes (first entry {})", sizes[0]);
        assert!(sizes[0] > 0, "{mode}: the first entry has data");
        assert!(
            total <= MAX_BYTES as usize + batch.len(),
            "{mode}: {total} record bytes for max_bytes {MAX_BYTES} (batches of {})",
            batch.len()
        );
        assert!(after < PEAK_KB_MAX, "{mode}: the broker's peak memory reached {after} kB (was {before} kB)");
    });
}

/// 1,000 connections each send an ApiVersions request (answered at once) and three
/// acks=all produce requests of 64 KiB, then reset the connection: the broker's first write
/// fails and it drops the requests still waiting for durability. Then an entry larger than
/// `max_produce_bytes` must be THROTTLED, one of nearly `max_produce_bytes` must succeed (within a few seconds: requests that were not dropped
/// finish), and 200 more produce requests must all succeed.
fn abandon_and_check(broker: &Broker, max_produce_bytes: usize, mode: &str) {
    block_on(async {
        drop(setup(&broker.addr).await);
    });
    let small = batch_of(4, 16 << 10);
    let frames: Vec<u8> = [
        api_versions_frame(1),
        produce_frame(2, -1, small.clone()),
        produce_frame(3, -1, small.clone()),
        produce_frame(4, -1, small.clone()),
    ]
    .concat();
    for i in 0..1000 {
        let mut c = TcpStream::connect(&broker.addr).unwrap_or_else(|e| panic!("{mode}: connection {i}: {e}"));
        c.write_all(&frames).unwrap_or_else(|e| panic!("{mode}: connection {i}: {e}"));
        // Close with a reset (SO_LINGER 0), so the broker's next write fails.
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(c);
    }
    let big = batch_of(60, 16 << 10);
    assert!(big.len() <= max_produce_bytes, "the big batch fits the budget");
    assert!(big.len() + small.len() > max_produce_bytes, "one leaked small entry would throttle the big one");
    block_on(async {
        let conn = Connection::connect(&broker.addr, "hostile", Duration::from_secs(30)).await.expect("connect");
        // The limit applies (in cluster mode too): an entry larger than it never fits.
        let too_big = [big.clone(), small.clone()].concat();
        assert_eq!(produce(&conn, -1, too_big).await, ErrorCode::THROTTLED, "{mode}: past --max-produce-bytes");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let code = produce(&conn, -1, big.clone()).await;
            if code == ErrorCode::NONE {
                break;
            }
            assert_eq!(code, ErrorCode::THROTTLED, "{mode}");
            assert!(Instant::now() < deadline, "{mode}: a produce of {} bytes stays THROTTLED", big.len());
            compio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 0..200 {
            // On a loaded machine the broker may still be reading the last abandoned
            // connections' requests, which take budget for a moment (CI saw THROTTLED once at
            // a small produce after the big one passed); a leaked budget stays THROTTLED.
            let mut code = produce(&conn, -1, small.clone()).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while code == ErrorCode::THROTTLED && Instant::now() < deadline {
                compio::time::sleep(Duration::from_millis(50)).await;
                code = produce(&conn, -1, small.clone()).await;
            }
            assert_eq!(code, ErrorCode::NONE, "{mode}: produce {i} afterwards");
        }
    });
}

/// Creates `t` (one partition, one replica) and waits until it takes writes (a cluster elects
/// its leader first); a connection to the broker.
async fn setup(addr: &str) -> Connection {
    Client::connect(addr).await.expect("connect").create_topic("t", 1, 1, &[]).await.expect("create");
    let conn = Connection::connect(addr, "hostile", Duration::from_secs(30)).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let code = produce(&conn, -1, batch_of(1, 10)).await;
        if code == ErrorCode::NONE {
            return conn;
        }
        assert!(code.is_retriable(), "{code:?}");
        assert!(Instant::now() < deadline, "no leader for t/0: {code:?}");
        compio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Produces `records` to `t`/0; the entry's error code.
async fn produce(conn: &Connection, acks: i8, records: Vec<u8>) -> ErrorCode {
    let resp: ProduceResponse = conn.call(ApiKey::Produce, &produce_request(acks, records)).await.expect("produce");
    resp.partitions[0].error
}

fn produce_request(acks: i8, records: Vec<u8>) -> ProduceRequest {
    let part =
        ProducePartition { topic: "t".into(), partition: 0, leader_epoch: 0, records: BytesMut::from(&records[..]) };
    ProduceRequest { acks, timeout_ms: 30_000, partitions: vec![part] }
}

fn produce_frame(id: u32, acks: i8, records: Vec<u8>) -> Vec<u8> {
    let header = RequestHeader { api_key: ApiKey::Produce, api_version: 0, correlation_id: id, client_id: "h".into() };
    request_frame(&header, &produce_request(acks, records))
}

fn api_versions_frame(id: u32) -> Vec<u8> {
    let header =
        RequestHeader { api_key: ApiKey::ApiVersions, api_version: 0, correlation_id: id, client_id: "h".into() };
    request_frame(&header, &ApiVersionsRequest {})
}

/// One record batch of `records` values of `value_bytes` bytes.
fn batch_of(records: usize, value_bytes: usize) -> Vec<u8> {
    let mut b = skein_log::batch::BatchBuilder::new();
    let value = vec![b'x'; value_bytes];
    for _ in 0..records {
        b.push(None, &value, &[], skein_log::types::Timestamp(0));
    }
    b.build().into_bytes()
}
