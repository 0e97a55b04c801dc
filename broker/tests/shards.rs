//! Requests that span shards, against a real broker with two shards (`--cores 2`): a topic's
//! partitions 0 and 1 are owned by shards 0 and 1 (partition id modulo the shard count, and a
//! fresh broker's first topic gets ids 0 and 1). Entries come back in request order whatever
//! shard served them, a bad `acks` fails the whole request once, and a fetch long-polling on
//! both shards is woken by an append on either. A connection whose first produce names only
//! the other shard's partition moves there, and requests pipelined across the move are all
//! answered, in order.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{block_on, Broker};
use skein_client::wire::{
    decode_response, request_frame, ApiKey, ErrorCode, FetchPartition, FetchRequest, FetchResponse, ProducePartition,
    ProduceRequest, ProduceResponse, RequestHeader, Wire,
};
use skein_client::Client;
use skein_log::batch::BatchBuilder;
use skein_log::types::Timestamp;

/// One request on a blocking connection; the body's own result (a top-level error is `Err`).
fn call<Req: Wire, Resp: Wire>(c: &mut TcpStream, key: ApiKey, id: u32, req: &Req) -> Result<Resp, ErrorCode> {
    c.write_all(&frame(key, id, req)).expect("send");
    let (got, resp) = decode_response::<Resp>(answer(c)).expect("decodes");
    assert_eq!(got, id, "correlation id");
    resp
}

fn frame<Req: Wire>(key: ApiKey, id: u32, req: &Req) -> Vec<u8> {
    let header = RequestHeader { api_key: key, api_version: 0, correlation_id: id, client_id: "shards".into() };
    request_frame(&header, req)
}

/// One response frame's body (after its length).
fn answer(c: &mut TcpStream) -> bytes::BytesMut {
    let mut len = [0u8; 4];
    c.read_exact(&mut len).expect("response length");
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    c.read_exact(&mut body).expect("response body");
    bytes::BytesMut::from(&body[..])
}

fn records(value: &str) -> bytes::BytesMut {
    let mut b = BatchBuilder::new();
    b.push(None, value.as_bytes(), &[], Timestamp(0));
    bytes::BytesMut::from(&b.build().into_bytes()[..])
}

fn produce(partitions: &[u32], acks: i8, value: &str) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 5_000,
        partitions: partitions
            .iter()
            .map(|&p| ProducePartition { topic: "s".into(), partition: p, leader_epoch: 0, records: records(value) })
            .collect(),
    }
}

fn fetch(partitions: &[(u32, u64)], min_bytes: u32, max_wait_ms: u32) -> FetchRequest {
    FetchRequest {
        max_wait_ms,
        min_bytes,
        max_bytes: 1 << 20,
        isolation: 0,
        replica_read: false,
        partitions: partitions
            .iter()
            .map(|&(partition, fetch_offset)| FetchPartition {
                topic: "s".into(),
                partition,
                leader_epoch: 0,
                fetch_offset,
                partition_max_bytes: 1 << 20,
                min_high_watermark: 0,
                min_leader_epoch: 0,
            })
            .collect(),
    }
}

#[test]
fn requests_spanning_two_shards_answer_in_request_order_and_wake_on_either() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &["--cores", "2"]);
    block_on(async {
        Client::connect(&broker.addr).await.expect("connect").create_topic("s", 2, 1, &[]).await.expect("create");
    });
    let mut c = TcpStream::connect(&broker.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");

    // Partition 1 (shard 1) first, then 0 (shard 0): answered in that order.
    let resp: ProduceResponse = call(&mut c, ApiKey::Produce, 1, &produce(&[1, 0], -1, "a")).expect("produce");
    let got: Vec<(u32, ErrorCode, u64)> =
        resp.partitions.iter().map(|p| (p.partition, p.error, p.base_offset)).collect();
    assert_eq!(got, vec![(1, ErrorCode::NONE, 0), (0, ErrorCode::NONE, 0)]);
    let resp: ProduceResponse = call(&mut c, ApiKey::Produce, 2, &produce(&[0, 1], -1, "b")).expect("produce");
    let got: Vec<(u32, u64)> = resp.partitions.iter().map(|p| (p.partition, p.base_offset)).collect();
    assert_eq!(got, vec![(0, 1), (1, 1)]);

    // A bad acks fails the request as a whole, not once per shard.
    let bad = call::<_, ProduceResponse>(&mut c, ApiKey::Produce, 3, &produce(&[1, 0], 5, "x"));
    assert_eq!(bad.map(|_| ()), Err(ErrorCode::INVALID_REQUEST));

    // A fetch over both shards: request order, both partitions' records.
    let resp: FetchResponse = call(&mut c, ApiKey::Fetch, 4, &fetch(&[(1, 0), (0, 0)], 1, 1_000)).expect("fetch");
    let got: Vec<(u32, ErrorCode, u64, bool)> =
        resp.partitions.iter().map(|p| (p.partition, p.error, p.high_watermark, !p.records.is_empty())).collect();
    assert_eq!(got, vec![(1, ErrorCode::NONE, 2, true), (0, ErrorCode::NONE, 2, true)]);

    // min_bytes 0 answers at once, with nothing past the end.
    let start = Instant::now();
    let resp: FetchResponse = call(&mut c, ApiKey::Fetch, 5, &fetch(&[(0, 2), (1, 2)], 0, 20_000)).expect("fetch");
    assert!(resp.partitions.iter().all(|p| p.records.is_empty() && p.error == ErrorCode::NONE));
    assert!(start.elapsed() < Duration::from_secs(10), "not held for max_wait: {:?}", start.elapsed());

    // A long poll on both shards is woken by an append to either (here shard 1's partition).
    let addr = broker.addr.clone();
    let poll = std::thread::spawn(move || {
        let mut c = TcpStream::connect(&addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let start = Instant::now();
        let resp: FetchResponse = call(&mut c, ApiKey::Fetch, 1, &fetch(&[(0, 2), (1, 2)], 1, 20_000)).expect("fetch");
        (resp, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let resp: ProduceResponse = call(&mut c, ApiKey::Produce, 6, &produce(&[1], -1, "c")).expect("produce");
    assert_eq!(resp.partitions[0].error, ErrorCode::NONE);
    let (resp, took) = poll.join().expect("poll thread");
    assert!(took < Duration::from_secs(10), "woken by the append, not by max_wait: {took:?}");
    let got: Vec<(u32, bool)> = resp.partitions.iter().map(|p| (p.partition, !p.records.is_empty())).collect();
    assert_eq!(got, vec![(0, false), (1, true)]);
}

/// Writes `frames` at once (pipelined) and reads one response per frame: the correlation ids,
/// in the order they came back, and the response bodies.
fn pipeline(c: &mut TcpStream, frames: &[Vec<u8>]) -> Vec<(u32, bytes::BytesMut)> {
    c.write_all(&frames.concat()).expect("send");
    (0..frames.len())
        .map(|_| {
            let body = answer(c);
            (u32::from_le_bytes(body[..4].try_into().expect("4 bytes")), body)
        })
        .collect()
}

#[test]
fn a_connection_moves_to_the_shard_of_its_first_produce_and_pipelined_requests_stay_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("broker.log");
    let broker = Broker::start_logging(&dir.path().join("data"), &["--cores", "2"], "skein_broker=debug", &log);
    block_on(async {
        Client::connect(&broker.addr).await.expect("connect").create_topic("s", 2, 1, &[]).await.expect("create");
    });
    // Connections are dealt to the shards in turn: of two new ones, one lands on each shard,
    // so one of them starts on shard 0 and its first produce (partition 1: shard 1's) moves it.
    let mut conns: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&broker.addr).expect("connect")).collect();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    }
    let versions = skein_client::wire::ApiVersionsRequest {};
    let frames = vec![
        frame(ApiKey::ApiVersions, 1, &versions),
        frame(ApiKey::Produce, 2, &produce(&[1], -1, "p1-a")),
        frame(ApiKey::Produce, 3, &produce(&[0], -1, "p0")),
        frame(ApiKey::Fetch, 4, &fetch(&[(1, 0)], 1, 1_000)),
        frame(ApiKey::Produce, 5, &produce(&[1], -1, "p1-b")),
    ];
    let mut p1_offsets = Vec::new();
    for c in &mut conns {
        let answers = pipeline(c, &frames);
        assert_eq!(answers.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "answer order");
        let mut offsets = Vec::new();
        for (id, body) in answers.into_iter().filter(|(id, _)| [2, 3, 5].contains(id)) {
            let (_, resp) = decode_response::<ProduceResponse>(body).expect("decodes");
            let p = &resp.expect("produce answered").partitions[0];
            assert_eq!(p.error, ErrorCode::NONE, "request {id}");
            offsets.push((p.partition, p.base_offset));
        }
        assert!(offsets[0].1 < offsets[2].1, "one connection's writes to partition 1 keep their order: {offsets:?}");
        p1_offsets.extend([offsets[0].1, offsets[2].1]);
    }
    p1_offsets.sort_unstable();
    assert_eq!(p1_offsets, vec![0, 1, 2, 3], "every write to partition 1 took its own offset");
    // Still serving on the shard it moved to, and a new fetch sees all four records.
    let resp: FetchResponse = call(&mut conns[0], ApiKey::Fetch, 6, &fetch(&[(1, 0)], 1, 1_000)).expect("fetch");
    assert_eq!(resp.partitions[0].high_watermark, 4);
    drop(conns);
    drop(broker);
    let text = std::fs::read_to_string(&log).expect("log");
    let moves = text.lines().filter(|l| l.contains("connection moves to the shard that owns its partitions")).count();
    assert!(moves >= 1, "no connection moved; log:\n{text}");
}
