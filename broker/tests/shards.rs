//! Requests that span shards, against a real broker with two shards (`--cores 2`): a topic's
//! partitions 0 and 1 are owned by shards 0 and 1 (partition id modulo the shard count, and a
//! fresh broker's first topic gets ids 0 and 1). Entries come back in request order whatever
//! shard served them, a bad `acks` fails the whole request once, and a fetch long-polling on
//! both shards is woken by an append on either.

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
    let header = RequestHeader { api_key: key, api_version: 0, correlation_id: id, client_id: "shards".into() };
    c.write_all(&request_frame(&header, req)).expect("send");
    let mut len = [0u8; 4];
    c.read_exact(&mut len).expect("response length");
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    c.read_exact(&mut body).expect("response body");
    let (got, resp) = decode_response::<Resp>(bytes::BytesMut::from(&body[..])).expect("decodes");
    assert_eq!(got, id, "correlation id");
    resp
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
