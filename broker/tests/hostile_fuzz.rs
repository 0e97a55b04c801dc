//! Arbitrary and oversized fields sent to every API, of a one-voter cluster broker and of a
//! single-node broker (issue 16): whatever a client sends, the broker keeps serving and its
//! memory stays bounded.
//!
//! Each case is one request frame on its own connection: a well-formed request of the API
//! with hostile field values (65,535-byte and multi-byte strings, names with `/` and NUL,
//! counts and offsets at 0 and at their maximum, thousands of entries, random record bytes),
//! that request with bytes flipped, cut or appended, or random bytes; now and then with a
//! hostile header (unknown API key or version, a long client id). The broker may answer, answer
//! with an error or close the connection; every 25 cases a fresh client must produce and read
//! back a record, and the process must be alive. The seed is printed (`SKEIN_FUZZ_SEED`
//! replays a run; `SKEIN_FUZZ_CASES` sets the number of cases per broker).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{block_on, vm_hwm_kb, Broker};
use skein_client::conn::Connection;
use skein_client::wire::{
    request_frame, AbortTransactionRequest, AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, ApiKey,
    ApiVersionsRequest, CreateTopicsRequest, DeleteGroupRequest, DeleteTopicsRequest, DescribeGroupRequest,
    DescribeTopicsRequest, DescribeTransactionRequest, EndTxnRequest, ErrorCode, FetchPartition, FetchRequest,
    FetchResponse, FindCoordinatorRequest, GroupHeartbeatRequest, InitProducerIdRequest, ListGroupsRequest,
    ListOffsetsPartition, ListOffsetsRequest, ListTransactionsRequest, MergePartitionsRequest, MetadataRequest,
    NewTopic, OffsetCommitPartition, OffsetCommitRequest, OffsetFetchRequest, ProducePartition, ProduceRequest,
    ProduceResponse, ReassignPartitionRequest, RequestHeader, SplitPartitionRequest, TableAbortRequest,
    TableCommitRequest, TableLockRequest, TableQueryRequest, TableRange, TableReadEntry, TableReadRequest, TableRecord,
    TableTxn, TableWrite, TopicConfig, TopicPartition, TxnOffsetCommitRequest, Wire, Writer,
};
use skein_client::Client;

/// Cases per broker unless `SKEIN_FUZZ_CASES` says otherwise.
const CASES: usize = 400;
/// The most bytes of strings and lists one case generates (the broker's frame limit is larger;
/// the point is hostile fields, not bandwidth).
const BODY_BYTES_MAX: usize = 4 << 20;
/// The broker's peak resident memory must stay below this.
const PEAK_KB_MAX: u64 = 512 << 10;
/// Extra broker flags: long polls and acks=all waits end within a second.
const FLAGS: [&str; 2] = ["--max-request-timeout-ms", "1000"];

#[test]
fn arbitrary_requests_to_every_api_leave_a_cluster_broker_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start_one_voter_cluster(dir.path(), &FLAGS);
    fuzz(&mut broker, "cluster");
}

#[test]
fn arbitrary_requests_to_every_api_leave_a_single_node_broker_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &FLAGS);
    fuzz(&mut broker, "single node");
}

fn fuzz(broker: &mut Broker, mode: &str) {
    let seed = std::env::var("SKEIN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let cases = std::env::var("SKEIN_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(CASES);
    eprintln!("{mode}: seed {seed} (SKEIN_FUZZ_SEED={seed} replays it), {cases} cases");
    let mut rng = Rng::new(seed);
    // The frames built here are the client library's when their fields are.
    let header = RequestHeader { api_key: ApiKey::Metadata, api_version: 0, correlation_id: 7, client_id: "x".into() };
    let mut body = Writer::default();
    MetadataRequest { topics: None }.encode(&mut body);
    assert_eq!(
        frame(ApiKey::Metadata as u16, 0, 7, "x", &body.buf),
        request_frame(&header, &MetadataRequest { topics: None })
    );
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("t", 2, 1, &[]).await.expect("create t");
        client.create_table("tb", 2, 1, None).await.expect("create table tb");
    });
    healthy(broker, mode, "before any case");
    let mut per_api = [0usize; ApiKey::ALL.len()];
    let mut outcomes = [0usize; 3]; // answered, closed, no answer within the wait
    let start = Instant::now();
    for case in 0..cases {
        let api = ApiKey::ALL[rng.below(ApiKey::ALL.len() as u64) as usize];
        per_api[api as usize] += 1;
        let frame = hostile_frame(&mut rng, api, case as u32);
        let outcome = send(&broker.addr, &frame).unwrap_or_else(|e| {
            let status = broker.child.try_wait().expect("try_wait");
            panic!("{mode}: case {case} ({api:?}): connect: {e}; the broker process: {status:?} (None: running)")
        });
        outcomes[outcome] += 1;
        if case % 25 == 24 {
            healthy(broker, mode, &format!("case {case} ({api:?})"));
        }
    }
    healthy(broker, mode, "after every case");
    let peak = vm_hwm_kb(broker.child.id());
    eprintln!(
        "{mode}: {cases} cases in {:?}; per API {per_api:?}; answered {}, closed {}, unanswered {}; peak RSS {peak} kB",
        start.elapsed(),
        outcomes[0],
        outcomes[1],
        outcomes[2]
    );
    assert!(per_api.iter().all(|&n| n > 0) || cases < 100, "{mode}: every API was sent something: {per_api:?}");
    assert!(peak < PEAK_KB_MAX, "{mode}: the broker's peak memory reached {peak} kB");
    let status = broker.terminate();
    assert!(status.success(), "{mode}: a clean exit after the cases: {status}");
}

/// Sends one frame on a new connection and waits briefly for an answer: 0 answered, 1 the
/// connection was closed (or reset), 2 nothing came (acks=0, a long poll, a one-way message).
fn send(addr: &str, frame: &[u8]) -> std::io::Result<usize> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_millis(1500))).expect("timeout");
    if c.write_all(frame).is_err() {
        return Ok(1);
    }
    let mut len = [0u8; 4];
    Ok(match c.read_exact(&mut len) {
        Ok(()) => {
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            if c.read_exact(&mut body).is_ok() {
                0
            } else {
                1
            }
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => 2,
        Err(_) => 1,
    })
}

/// The broker process is alive and serves a produce to `t`/0 and a fetch of what it wrote.
fn healthy(broker: &mut Broker, mode: &str, after: &str) {
    if let Some(status) = broker.child.try_wait().expect("try_wait") {
        panic!("{mode}: the broker exited ({status}) after {after}");
    }
    block_on(async {
        let conn = Connection::connect(&broker.addr, "fuzz-check", Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{mode}: connect after {after}: {e}"));
        let value = format!("alive after {after}");
        let mut b = skein_log::batch::BatchBuilder::new();
        b.push(None, value.as_bytes(), &[], skein_log::types::Timestamp(0));
        let records = BytesMut::from(&b.build().into_bytes()[..]);
        let part = ProducePartition { topic: "t".into(), partition: 0, leader_epoch: 0, records };
        let req = ProduceRequest { acks: -1, timeout_ms: 1000, partitions: vec![part] };
        let deadline = Instant::now() + Duration::from_secs(20);
        let offset = loop {
            let resp: ProduceResponse =
                conn.call(ApiKey::Produce, &req).await.unwrap_or_else(|e| panic!("{mode}: produce after {after}: {e}"));
            let p = &resp.partitions[0];
            if p.error == ErrorCode::NONE {
                break p.base_offset;
            }
            assert!(
                p.error.is_retriable() && Instant::now() < deadline,
                "{mode}: produce after {after}: {:?}",
                p.error
            );
            compio::time::sleep(Duration::from_millis(50)).await;
        };
        let part = FetchPartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch: 0,
            fetch_offset: offset,
            partition_max_bytes: 1 << 20,
            min_high_watermark: 0,
            min_leader_epoch: 0,
        };
        let req = FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 1 << 20,
            isolation: 0,
            replica_read: false,
            partitions: vec![part],
        };
        let resp: FetchResponse =
            conn.call(ApiKey::Fetch, &req).await.unwrap_or_else(|e| panic!("{mode}: fetch after {after}: {e}"));
        let p = &resp.partitions[0];
        assert_eq!(p.error, ErrorCode::NONE, "{mode}: fetch after {after}");
        let found = p.records.windows(value.len()).any(|w| w == value.as_bytes());
        assert!(found, "{mode}: the record written after {after} reads back at offset {offset}");
    });
}

/// One request frame for `api`: hostile fields, then maybe damage, maybe a hostile header.
fn hostile_frame(rng: &mut Rng, api: ApiKey, id: u32) -> Vec<u8> {
    rng.budget = BODY_BYTES_MAX;
    let body = loop {
        let body = match rng.below(10) {
            0..=5 => typed_body(rng, api),
            6..=8 => {
                let body = typed_body(rng, api);
                damaged(rng, body)
            }
            _ => rng.bytes_below(4096),
        };
        if body.len() <= BODY_BYTES_MAX {
            break body;
        }
    };
    let (key, version, client_id) = match rng.below(12) {
        0 => (rng.pick(&[25u16, 99, u16::MAX]), 0u16, "fuzz".to_owned()),
        1 => (api as u16, rng.pick(&[1u16, 7, u16::MAX]), "fuzz".to_owned()),
        2 => (api as u16, 0, rng.string()),
        _ => (api as u16, 0, "fuzz".to_owned()),
    };
    frame(key, version, id, &client_id, &body)
}

/// A frame: length, header (API key, version, correlation id, client id), body.
fn frame(key: u16, version: u16, id: u32, client_id: &str, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    key.encode(&mut w);
    version.encode(&mut w);
    id.encode(&mut w);
    client_id.to_owned().encode(&mut w);
    w.buf.extend_from_slice(body);
    let mut frame = Writer::default();
    (w.buf.len() as u32).encode(&mut frame);
    frame.buf.extend_from_slice(&w.buf);
    frame.buf
}

/// A request of `api` with hostile field values, encoded.
fn typed_body(rng: &mut Rng, api: ApiKey) -> Vec<u8> {
    let mut w = Writer::default();
    match api {
        ApiKey::ApiVersions => ApiVersionsRequest {}.encode(&mut w),
        ApiKey::Metadata => {
            let topics = rng.chance(2).then(|| rng.list(|r| r.topic()));
            MetadataRequest { topics }.encode(&mut w)
        }
        ApiKey::CreateTopics => {
            let topics = rng.list(|r| NewTopic {
                name: r.new_topic_name(),
                partitions: r.pick(&[0, 1, 2, 10_001, 12_000, u32::MAX]),
                replicas: r.pick(&[0, 1, 2, u16::MAX]),
                configs: r.list(|r| TopicConfig { key: r.config_key(), value: r.string() }),
                partitioning: r.pick(&[0, 1, 2, 3, u8::MAX]),
            });
            CreateTopicsRequest { topics }.encode(&mut w)
        }
        // Never "t", which the health check writes to.
        ApiKey::DeleteTopics => DeleteTopicsRequest { names: rng.list(|r| r.new_topic_name()) }.encode(&mut w),
        ApiKey::DescribeTopics => DescribeTopicsRequest { names: rng.list(|r| r.topic()) }.encode(&mut w),
        ApiKey::Produce => {
            let partitions = rng.list(|r| ProducePartition {
                topic: r.topic(),
                partition: r.partition(),
                leader_epoch: r.u32(),
                records: BytesMut::from(&r.records()[..]),
            });
            let acks = rng.pick(&[-1i8, 0, 1, 2, i8::MIN, i8::MAX]);
            ProduceRequest { acks, timeout_ms: rng.u32(), partitions }.encode(&mut w)
        }
        ApiKey::Fetch => {
            let partitions = rng.list(|r| FetchPartition {
                topic: r.topic(),
                partition: r.partition(),
                leader_epoch: r.u32(),
                fetch_offset: r.u64(),
                partition_max_bytes: r.u32(),
                min_high_watermark: r.u64(),
                min_leader_epoch: r.u32(),
            });
            FetchRequest {
                max_wait_ms: rng.u32(),
                min_bytes: rng.u32(),
                max_bytes: rng.u32(),
                isolation: rng.pick(&[0, 1, u8::MAX]),
                replica_read: rng.chance(2),
                partitions,
            }
            .encode(&mut w)
        }
        ApiKey::ListOffsets => {
            let partitions = rng.list(|r| ListOffsetsPartition {
                topic: r.topic(),
                partition: r.partition(),
                timestamp: r.pick(&[-2, -1, 0, i64::MIN, i64::MAX, -3]),
            });
            ListOffsetsRequest { isolation: rng.pick(&[0, 1, u8::MAX]), partitions }.encode(&mut w)
        }
        ApiKey::InitProducerId => InitProducerIdRequest {
            transactional_id: rng.chance(2).then(|| rng.string()),
            transaction_timeout_ms: rng.pick(&[0, 1, 60_000, 900_001, u32::MAX]),
        }
        .encode(&mut w),
        // A client claiming to be a broker: any bytes (the peer-frame decoder is fuzzed by the
        // broker's unit tests; here the connection must be closed without harm).
        ApiKey::Cluster => {
            let from = rng.pick(&[1u32, 2, 0, u32::MAX]);
            from.encode(&mut w);
            w.buf.extend(rng.bytes_below(512));
        }
        ApiKey::ReassignPartition => {
            let replicas = rng.list(|r| r.pick(&[1u32, 2, 0, 99, u32::MAX]));
            ReassignPartitionRequest { topic: rng.topic(), partition: rng.partition(), replicas }.encode(&mut w)
        }
        ApiKey::FindCoordinator => {
            FindCoordinatorRequest { group: rng.group(), key_type: rng.pick(&[0, 1, 2, u8::MAX]) }.encode(&mut w)
        }
        ApiKey::GroupHeartbeat => GroupHeartbeatRequest {
            group: rng.group(),
            member_id: rng.string(),
            member_epoch: rng.pick(&[0, -1, -2, -3, 1, 7, i32::MIN, i32::MAX]),
            instance_id: rng.string(),
            client_id: rng.string(),
            host: rng.string(),
            rack: rng.string(),
            session_timeout_ms: rng.pick(&[0, 1, 3_000, 10_000, u32::MAX]),
            assignor: rng.pick(&["", "range", "roundrobin", "sticky", "nope"]).to_owned(),
            topics: rng.chance(2).then(|| rng.list(|r| r.topic())),
            owned: rng.chance(2).then(|| rng.list(|r| TopicPartition { topic: r.topic(), partition: r.partition() })),
        }
        .encode(&mut w),
        ApiKey::OffsetCommit => OffsetCommitRequest {
            group: rng.group(),
            member_id: rng.pick(&["", "x"]).to_owned(),
            member_epoch: rng.pick(&[-1, 0, 1, i32::MAX]),
            offsets: rng.list(|r| OffsetCommitPartition {
                topic: r.topic(),
                partition: r.partition(),
                offset: r.u64(),
                metadata: r.string(),
            }),
        }
        .encode(&mut w),
        ApiKey::OffsetFetch => OffsetFetchRequest {
            group: rng.group(),
            partitions: rng
                .chance(2)
                .then(|| rng.list(|r| TopicPartition { topic: r.topic(), partition: r.partition() })),
        }
        .encode(&mut w),
        ApiKey::ListGroups => ListGroupsRequest {}.encode(&mut w),
        ApiKey::DescribeGroup => DescribeGroupRequest { group: rng.group() }.encode(&mut w),
        ApiKey::DeleteGroup => DeleteGroupRequest { group: rng.group() }.encode(&mut w),
        ApiKey::AddPartitionsToTxn => AddPartitionsToTxnRequest {
            transactional_id: rng.group(),
            producer_id: rng.pick(&[-1, 0, 1, i64::MAX]),
            producer_epoch: rng.pick(&[-1, 0, 1, i16::MAX]),
            partitions: rng.list(|r| TopicPartition { topic: r.topic(), partition: r.partition() }),
        }
        .encode(&mut w),
        ApiKey::AddOffsetsToTxn => AddOffsetsToTxnRequest {
            transactional_id: rng.group(),
            producer_id: rng.pick(&[-1, 0, 1, i64::MAX]),
            producer_epoch: rng.pick(&[-1, 0, 1, i16::MAX]),
            group: rng.group(),
        }
        .encode(&mut w),
        ApiKey::EndTxn => EndTxnRequest {
            transactional_id: rng.group(),
            producer_id: rng.pick(&[-1, 0, 1, i64::MAX]),
            producer_epoch: rng.pick(&[-1, 0, 1, i16::MAX]),
            commit: rng.chance(2),
        }
        .encode(&mut w),
        ApiKey::TxnOffsetCommit => TxnOffsetCommitRequest {
            transactional_id: rng.group(),
            group: rng.group(),
            producer_id: rng.pick(&[-1, 0, 1, i64::MAX]),
            producer_epoch: rng.pick(&[-1, 0, 1, i16::MAX]),
            member_id: rng.pick(&["", "x"]).to_owned(),
            member_epoch: rng.pick(&[-1, 0, 1, i32::MAX]),
            partitions: rng.list(|r| OffsetCommitPartition {
                topic: r.topic(),
                partition: r.partition(),
                offset: r.u64(),
                metadata: r.string(),
            }),
        }
        .encode(&mut w),
        ApiKey::ListTransactions => ListTransactionsRequest {}.encode(&mut w),
        ApiKey::DescribeTransaction => DescribeTransactionRequest { transactional_id: rng.group() }.encode(&mut w),
        ApiKey::AbortTransaction => AbortTransactionRequest { transactional_id: rng.group() }.encode(&mut w),
        ApiKey::TableRead => TableReadRequest {
            txn: table_txn(rng),
            topic: rng.topic(),
            partition: rng.partition(),
            snapshot: rng.u64() as i64,
            min_offset: rng.u64(),
            follower: rng.chance(2),
            keys: rng.list(|r| BytesMut::from(&r.bytes_below(2000)[..])),
            range: rng.chance(2).then(|| table_range(rng)),
        }
        .encode(&mut w),
        ApiKey::TableLock => TableLockRequest {
            txn: table_txn(rng),
            topic: rng.topic(),
            partition: rng.partition(),
            keys: rng.list(|r| BytesMut::from(&r.bytes_below(2000)[..])),
            snapshot: rng.u64() as i64,
        }
        .encode(&mut w),
        ApiKey::TableCommit => TableCommitRequest {
            txn: table_txn(rng),
            topic: rng.topic(),
            partition: rng.partition(),
            producer_id: rng.u64() as i64,
            producer_epoch: rng.below(3) as i16 - 1,
            record: TableRecord {
                version: rng.below(3) as u8,
                txn: rng.u64(),
                level: rng.below(8) as u8,
                snapshot: rng.u64(),
                reads: rng
                    .list(|r| TableReadEntry { key: BytesMut::from(&r.bytes_below(40)[..]), version: r.u64() as i64 }),
                ranges: rng.list(table_range),
                writes: rng.list(|r| TableWrite {
                    key: BytesMut::from(&r.bytes_below(2000)[..]),
                    value: r.chance(2).then(|| BytesMut::from(&r.bytes_below(100)[..])),
                }),
                steps: Vec::new(),
            },
        }
        .encode(&mut w),
        ApiKey::TableAbort => {
            TableAbortRequest { txn: rng.u64(), topic: rng.topic(), partition: rng.partition() }.encode(&mut w)
        }
        ApiKey::SplitPartition => SplitPartitionRequest {
            topic: rng.topic(),
            partition: rng.partition(),
            at: rng.chance(2).then(|| BytesMut::from(&rng.bytes_below(20)[..])),
        }
        .encode(&mut w),
        ApiKey::MergePartitions => {
            MergePartitionsRequest { topic: rng.topic(), partitions: rng.list(|r| r.partition()) }.encode(&mut w)
        }
        ApiKey::TableQuery => TableQueryRequest {
            topic: rng.topic(),
            partition: rng.partition(),
            index: rng.topic(),
            value: BytesMut::from(&rng.bytes_below(2000)[..]),
            snapshot: rng.u64() as i64,
            rows: rng.chance(2),
        }
        .encode(&mut w),
    }
    w.buf
}

fn table_txn(rng: &mut Rng) -> TableTxn {
    TableTxn { txn: rng.u64(), level: rng.below(8) as u8, begin_us: rng.u64(), timeout_ms: rng.u32() }
}

fn table_range(rng: &mut Rng) -> TableRange {
    TableRange { from: BytesMut::from(&rng.bytes_below(40)[..]), to: BytesMut::from(&rng.bytes_below(40)[..]) }
}

/// `body` with bytes flipped, cut short or followed by garbage.
fn damaged(rng: &mut Rng, mut body: Vec<u8>) -> Vec<u8> {
    match rng.below(3) {
        0 if !body.is_empty() => {
            for _ in 0..=rng.below(4) {
                let at = rng.below(body.len() as u64) as usize;
                body[at] ^= 1 << rng.below(8);
            }
        }
        1 => body.truncate(rng.below(body.len() as u64 + 1) as usize),
        _ => {
            let mut tail = rng.bytes_below(64);
            tail.push(0xff);
            body.extend(tail);
        }
    }
    body
}

/// SplitMix64: a small deterministic generator, so a seed replays a run. It also keeps a
/// case's generated bytes under a budget: past it, strings are short and lists empty.
struct Rng {
    state: u64,
    budget: usize,
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng { state: seed, budget: BODY_BYTES_MAX }
    }

    /// Spends `n` bytes of the case's budget; false if they are not there.
    fn spend(&mut self, n: usize) -> bool {
        let ok = n <= self.budget;
        if ok {
            self.budget -= n;
        }
        ok
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = if self.spend(n) { n } else { 0 };
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Fewer than `n` random bytes.
    fn bytes_below(&mut self, n: u64) -> Vec<u8> {
        let len = self.below(n) as usize;
        self.bytes(len)
    }

    fn u32(&mut self) -> u32 {
        match self.below(4) {
            0 => 0,
            1 => u32::MAX,
            2 => self.below(1 << 20) as u32,
            _ => self.next() as u32,
        }
    }

    fn u64(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => u64::MAX,
            2 => self.below(1000),
            _ => self.next(),
        }
    }

    /// A list length: usually short, sometimes thousands (entries stay small then).
    fn list<T>(&mut self, mut item: impl FnMut(&mut Rng) -> T) -> Vec<T> {
        let n = match self.below(8) {
            0 => 0,
            1 => 400,
            2 => 3000,
            _ => 1 + self.below(4) as usize,
        };
        let mut out = Vec::new();
        // Every entry costs at least a few bytes: no list of a million empty entries either.
        while out.len() < n && self.spend(8) {
            out.push(item(self));
        }
        out
    }

    /// A hostile string: empty, huge, multi-byte, path-like, control characters.
    fn string(&mut self) -> String {
        match self.below(9) {
            0 => String::new(),
            1 if self.spend(65_535) => "a".repeat(65_535),
            2 if self.spend(65_534) => "é".repeat(32_767),
            3 => "../../etc/passwd".to_owned(),
            4 => "a/b\0c".to_owned(),
            5 if self.spend(250) => "x".repeat(250),
            6 => "\u{feff}\u{202e}".to_owned(),
            7 => "ok-name".to_owned(),
            1 | 2 | 5 => "x".to_owned(),
            _ => String::from_utf8_lossy(&self.bytes_below(40)).into_owned(),
        }
    }

    /// A topic for produce, fetch and the like: usually the real one.
    /// A group id: a few real names, empty, or any string (long ones included).
    fn group(&mut self) -> String {
        match self.below(4) {
            0 => "g".into(),
            1 => String::new(),
            _ => self.string(),
        }
    }

    fn topic(&mut self) -> String {
        if self.chance(2) {
            "t".to_owned()
        } else if self.chance(3) {
            "tb".to_owned()
        } else {
            self.string()
        }
    }

    /// A name to create or delete: never "t".
    fn new_topic_name(&mut self) -> String {
        let name = if self.chance(3) { format!("f{}", self.below(4)) } else { self.string() };
        if name == "t" {
            "f0".to_owned()
        } else {
            name
        }
    }

    fn config_key(&mut self) -> String {
        if self.chance(2) {
            self.pick(&["retention.ms", "segment.bytes", "min.insync.replicas", "unclean.leader.election.enable"])
                .to_owned()
        } else {
            self.string()
        }
    }

    fn partition(&mut self) -> u32 {
        self.pick(&[0, 1, 2, 10_000, u32::MAX])
    }

    /// Record bytes: a real batch, a damaged one, or noise.
    fn records(&mut self) -> Vec<u8> {
        let mut b = skein_log::batch::BatchBuilder::new();
        for _ in 0..=self.below(3) {
            let value = self.bytes_below(100);
            b.push(None, &value, &[], skein_log::types::Timestamp(self.next() as i64));
        }
        let batch = b.build().into_bytes();
        match self.below(4) {
            0 => batch,
            1 => damaged(self, batch),
            2 => Vec::new(),
            _ => self.bytes_below(300),
        }
    }
}
