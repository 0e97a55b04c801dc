//! Transactions against a real broker process, at the wire level: the partition check
//! (KIP-890 part 1), the epoch bump per transaction (part 2) fencing late writes and late ends,
//! the last stable offset and aborted index for read_committed, admin abort of a hanging
//! transaction, timeouts, and all of it surviving a kill -9.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::cluster::wait_for;
use common::{block_on, Broker};
use skein_client::conn::Connection;
use skein_client::wire::{
    AbortTransactionRequest, AbortTransactionResponse, AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey,
    DescribeTransactionRequest, DescribeTransactionResponse, EndTxnRequest, EndTxnResponse, ErrorCode, FetchPartition,
    FetchPartitionResponse, FetchRequest, FetchResponse, FindCoordinatorRequest, FindCoordinatorResponse,
    InitProducerIdRequest, InitProducerIdResponse, ListOffsetsPartition, ListOffsetsRequest, ListOffsetsResponse,
    ListTransactionsRequest, ListTransactionsResponse, ProducePartition, ProduceRequest, ProduceResponse,
    TopicPartition, LATEST, READ_COMMITTED, READ_UNCOMMITTED, TRANSACTION_KEY,
};
use skein_client::Client;
use skein_log::batch::{batches, Attributes, BatchBuilder};
use skein_log::types::{ProducerEpoch, ProducerId, Sequence, Timestamp};

async fn conn(addr: &str) -> Connection {
    Connection::connect(addr, "txn-test", Duration::from_secs(5)).await.expect("connect")
}

/// The transaction coordinator of `id`, asking until one is named.
async fn coordinator(addr: &str, id: &str) -> String {
    wait_for("a transaction coordinator", Duration::from_secs(15), async || {
        let c = Connection::connect(addr, "txn-test", Duration::from_secs(1)).await.ok()?;
        let r: FindCoordinatorResponse = c
            .call(ApiKey::FindCoordinator, &FindCoordinatorRequest { group: id.into(), key_type: TRANSACTION_KEY })
            .await
            .ok()?;
        (r.error == ErrorCode::NONE).then(|| format!("{}:{}", r.host, r.port))
    })
    .await
}

/// A request retried while the coordinator loads or finishes an earlier transaction.
async fn call<Q: skein_client::wire::Wire, R: skein_client::wire::Wire>(
    c: &Connection,
    key: ApiKey,
    req: &Q,
    error: impl Fn(&R) -> ErrorCode,
) -> R {
    for _ in 0..200 {
        let r: R = c.call(key, req).await.expect("answered");
        if !matches!(
            error(&r),
            ErrorCode::COORDINATOR_LOAD_IN_PROGRESS | ErrorCode::NOT_COORDINATOR | ErrorCode::CONCURRENT_TRANSACTIONS
        ) {
            return r;
        }
        compio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key:?} never got past a retriable error");
}

async fn init(c: &Connection, id: &str, timeout_ms: u32) -> (i64, i16) {
    let req = InitProducerIdRequest { transactional_id: Some(id.into()), transaction_timeout_ms: timeout_ms };
    let r: InitProducerIdResponse = call(c, ApiKey::InitProducerId, &req, |r: &InitProducerIdResponse| r.error).await;
    assert_eq!(r.error, ErrorCode::NONE, "{}", r.message);
    (r.producer_id, r.producer_epoch)
}

async fn add(c: &Connection, id: &str, (pid, epoch): (i64, i16), parts: &[u32]) -> Vec<ErrorCode> {
    let req = AddPartitionsToTxnRequest {
        transactional_id: id.into(),
        producer_id: pid,
        producer_epoch: epoch,
        partitions: parts.iter().map(|&p| TopicPartition { topic: "t".into(), partition: p }).collect(),
    };
    let r: AddPartitionsToTxnResponse =
        call(c, ApiKey::AddPartitionsToTxn, &req, |r: &AddPartitionsToTxnResponse| r.error).await;
    assert_eq!(r.error, ErrorCode::NONE, "{}", r.message);
    r.partitions.iter().map(|p| p.error).collect()
}

async fn end(c: &Connection, id: &str, (pid, epoch): (i64, i16), commit: bool) -> EndTxnResponse {
    let req = EndTxnRequest { transactional_id: id.into(), producer_id: pid, producer_epoch: epoch, commit };
    call(c, ApiKey::EndTxn, &req, |r: &EndTxnResponse| r.error).await
}

/// Produces one transactional record (`value`) to t/`partition`; the partition's error and
/// the record's offset.
async fn produce(c: &Connection, (pid, epoch): (i64, i16), seq: i32, partition: u32, value: &str) -> (ErrorCode, u64) {
    let mut b = BatchBuilder::new()
        .producer(ProducerId(pid), ProducerEpoch(epoch), Sequence(seq))
        .attributes(Attributes::default().with_transactional(true));
    b.push(None, value.as_bytes(), &[], Timestamp(1));
    let bytes = b.build().into_bytes();
    let req = ProduceRequest {
        acks: -1,
        timeout_ms: 5_000,
        partitions: vec![ProducePartition {
            topic: "t".into(),
            partition,
            leader_epoch: 0,
            records: BytesMut::from(&bytes[..]),
        }],
    };
    let r: ProduceResponse = c.call(ApiKey::Produce, &req).await.expect("produce answered");
    (r.partitions[0].error, r.partitions[0].base_offset)
}

async fn fetch(c: &Connection, partition: u32, isolation: u8) -> FetchPartitionResponse {
    let req = FetchRequest {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        isolation,
        replica_read: false,
        partitions: vec![FetchPartition {
            topic: "t".into(),
            partition,
            leader_epoch: 0,
            fetch_offset: 0,
            partition_max_bytes: 1 << 20,
            min_high_watermark: 0,
            min_leader_epoch: 0,
        }],
    };
    let mut r: FetchResponse = c.call(ApiKey::Fetch, &req).await.expect("fetch answered");
    let p = r.partitions.remove(0);
    assert_eq!(p.error, ErrorCode::NONE);
    p
}

/// The values a read_committed consumer keeps from a fetch: data records of batches that are
/// not control batches and not in an aborted transaction.
fn visible(p: &FetchPartitionResponse) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches(&p.records) {
        let b = b.expect("batch parses");
        let h = b.header();
        if h.attributes.is_control() {
            continue;
        }
        let aborted = h.attributes.is_transactional()
            && p.aborted.iter().any(|a| {
                a.producer_id == h.producer_id.0 && a.first_offset <= h.base_offset.0 && h.base_offset.0 < a.last_offset
            });
        if aborted {
            continue;
        }
        for r in b.records().iter() {
            out.push(String::from_utf8_lossy(r.value.as_slice()).into_owned());
        }
    }
    out
}

async fn latest(c: &Connection, partition: u32, isolation: u8) -> u64 {
    let req = ListOffsetsRequest {
        isolation,
        partitions: vec![ListOffsetsPartition { topic: "t".into(), partition, timestamp: LATEST }],
    };
    let r: ListOffsetsResponse = c.call(ApiKey::ListOffsets, &req).await.expect("list offsets");
    assert_eq!(r.partitions[0].error, ErrorCode::NONE);
    r.partitions[0].offset
}

async fn describe(c: &Connection, id: &str) -> DescribeTransactionResponse {
    let req = DescribeTransactionRequest { transactional_id: id.into() };
    call(c, ApiKey::DescribeTransaction, &req, |r: &DescribeTransactionResponse| r.error).await
}

#[test]
fn transactions_commit_abort_fence_and_survive_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &["--txn-partitions", "2"]);
    let addr = broker.addr.clone();
    block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        client.create_topic("t", 2, 1, &[]).await.expect("create t");
        let c = conn(&coordinator(&addr, "tx").await).await;
        let p0 = init(&c, "tx", 0).await;

        // KIP-890 part 1: no write before the partition was added to the transaction.
        assert_eq!(produce(&c, p0, 0, 0, "early").await.0, ErrorCode::INVALID_TXN_STATE);
        assert_eq!(add(&c, "tx", p0, &[0, 1]).await, vec![ErrorCode::NONE, ErrorCode::NONE]);
        let (e, first) = produce(&c, p0, 0, 0, "a").await;
        assert_eq!(e, ErrorCode::NONE);
        assert_eq!(produce(&c, p0, 0, 1, "b").await.0, ErrorCode::NONE);
        // Undecided: read_committed sees nothing and its end is the Begin marker.
        let rc = fetch(&c, 0, READ_COMMITTED).await;
        assert!(visible(&rc).is_empty(), "nothing before the commit: {:?}", visible(&rc));
        assert_eq!(rc.last_stable, first - 1, "the last stable offset is the transaction's Begin marker");
        assert!(rc.last_stable < rc.high_watermark);
        assert_eq!(latest(&c, 0, READ_COMMITTED).await, rc.last_stable);
        assert_eq!(latest(&c, 0, READ_UNCOMMITTED).await, rc.high_watermark);
        assert_eq!(visible(&fetch(&c, 0, READ_UNCOMMITTED).await), vec!["a"]);
        let d = describe(&c, "tx").await;
        assert_eq!((d.state.as_str(), d.partitions.len()), ("ongoing", 2), "{d:?}");

        let done = end(&c, "tx", p0, true).await;
        assert_eq!(done.error, ErrorCode::NONE, "{}", done.message);
        let p1 = (done.producer_id, done.producer_epoch);
        assert_eq!(p1, (p0.0, p0.1 + 1), "every transaction bumps the epoch (KIP-890 part 2)");
        let rc = fetch(&c, 0, READ_COMMITTED).await;
        assert_eq!(visible(&rc), vec!["a"]);
        assert_eq!(rc.last_stable, rc.high_watermark);
        assert_eq!(visible(&fetch(&c, 1, READ_COMMITTED).await), vec!["b"]);
        // A retried end is answered as the first was; a late abort of it is fenced.
        assert_eq!(end(&c, "tx", p0, true).await.producer_epoch, p1.1);
        assert_eq!(end(&c, "tx", p0, false).await.error, ErrorCode::PRODUCER_FENCED);
        // A late write of the ended transaction: fenced, even though the next one is open.
        assert_eq!(add(&c, "tx", p1, &[0]).await, vec![ErrorCode::NONE]);
        assert_eq!(produce(&c, p0, 1, 0, "late").await.0, ErrorCode::PRODUCER_FENCED);
        let (e, aborted_at) = produce(&c, p1, 0, 0, "x").await;
        assert_eq!(e, ErrorCode::NONE);
        let done = end(&c, "tx", p1, false).await;
        assert_eq!(done.error, ErrorCode::NONE, "{}", done.message);
        let p2 = (done.producer_id, done.producer_epoch);
        let rc = fetch(&c, 0, READ_COMMITTED).await;
        assert_eq!(visible(&rc), vec!["a"], "the aborted record is filtered");
        assert!(
            rc.aborted.iter().any(|a| a.first_offset < aborted_at && aborted_at < a.last_offset),
            "{:?}",
            rc.aborted
        );
        assert_eq!(visible(&fetch(&c, 0, READ_UNCOMMITTED).await), vec!["a", "x"], "read_uncommitted sees it");

        // A hanging transaction pins the last stable offset until an admin aborts it.
        assert_eq!(add(&c, "tx", p2, &[1]).await, vec![ErrorCode::NONE]);
        assert_eq!(produce(&c, p2, 0, 1, "hang").await.0, ErrorCode::NONE);
        let pinned = fetch(&c, 1, READ_COMMITTED).await;
        assert!(pinned.last_stable < pinned.high_watermark);
        let listed: ListTransactionsResponse =
            c.call(ApiKey::ListTransactions, &ListTransactionsRequest {}).await.expect("list");
        assert!(listed.transactions.iter().any(|t| t.transactional_id == "tx" && t.state == "ongoing"), "{listed:?}");
        let req = AbortTransactionRequest { transactional_id: "tx".into() };
        let r: AbortTransactionResponse =
            call(&c, ApiKey::AbortTransaction, &req, |r: &AbortTransactionResponse| r.error).await;
        assert_eq!(r.error, ErrorCode::NONE, "{}", r.message);
        let freed = fetch(&c, 1, READ_COMMITTED).await;
        assert_eq!(freed.last_stable, freed.high_watermark);
        assert_eq!(visible(&freed), vec!["b"]);
        let fenced = end(&c, "tx", p2, true).await;
        assert_eq!(fenced.error, ErrorCode::PRODUCER_FENCED, "the aborted transaction's producer is fenced");
        assert!(fenced.message.contains("administrator"), "{}", fenced.message);

        // A transaction past its timeout is aborted by the coordinator.
        let q = init(&c, "short", 1_000).await;
        let c2 = conn(&coordinator(&addr, "short").await).await;
        assert_eq!(add(&c2, "short", q, &[0]).await, vec![ErrorCode::NONE]);
        assert_eq!(produce(&c2, q, 0, 0, "slow").await.0, ErrorCode::NONE);
        let d = wait_for("the timeout abort", Duration::from_secs(10), async || {
            let d = describe(&c2, "short").await;
            (d.state == "complete_abort").then_some(d)
        })
        .await;
        assert!(d.producer_epoch > q.1);
        assert_eq!(end(&c2, "short", q, true).await.error, ErrorCode::PRODUCER_FENCED);
    });

    // kill -9: the coordinator's state and every partition's aborted index come back.
    broker.kill9();
    broker.restart();
    let addr = broker.addr.clone();
    block_on(async {
        let c = conn(&coordinator(&addr, "tx").await).await;
        let d = describe(&c, "tx").await;
        assert_eq!(d.state, "complete_abort", "{d:?}");
        let rc = fetch(&c, 0, READ_COMMITTED).await;
        assert_eq!(visible(&rc), vec!["a"], "the aborted index is rebuilt from the log");
        assert_eq!(rc.last_stable, rc.high_watermark);
        // A new instance fences the old one and starts past its epochs.
        let p = init(&c, "tx", 0).await;
        assert!(p.1 > d.producer_epoch);
        assert_eq!(add(&c, "tx", p, &[0]).await, vec![ErrorCode::NONE]);
        assert_eq!(produce(&c, p, 0, 0, "again").await.0, ErrorCode::NONE);
        // ... and a second new instance aborts that open transaction at once.
        let p_next = init(&c, "tx", 0).await;
        assert!(p_next.1 > p.1 + 1);
        let rc = fetch(&c, 0, READ_COMMITTED).await;
        assert_eq!(rc.last_stable, rc.high_watermark, "the fenced instance's transaction was aborted");
        assert_eq!(visible(&rc), vec!["a"]);
    });
}

/// Reads every partition of `t` to its end (the last stable offset for read_committed): the
/// values, in order per partition.
async fn read_all(addrs: &str, partitions: u32, isolation: skein_client::Isolation) -> Vec<String> {
    use skein_client::{Consumer, ConsumerConfig, Position};
    let client = Client::connect(addrs).await.expect("connect");
    let config = ConsumerConfig { isolation, ..ConsumerConfig::default() };
    let mut consumer = Consumer::new(client, config);
    consumer.assign("t", &(0..partitions).collect::<Vec<_>>(), Position::Beginning).await.expect("assign");
    let mut out = Vec::new();
    let mut idle = 0;
    while idle < 10 {
        let got = consumer.poll().await.expect("poll");
        if got.is_empty() {
            idle += 1;
        } else {
            idle = 0;
        }
        out.extend(got.into_iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()));
    }
    out
}

#[test]
fn transactions_complete_through_kills_of_their_coordinator_and_a_partition_leader() {
    use skein_client::Isolation;
    use skein_client::{TransactionalProducer, TxnConfig};

    let mut c = common::cluster::Cluster::start(141, 19641);
    let addrs = c.addrs.clone();
    let all = addrs.join(",");
    // Transactions 0..6: commit the even ones, abort the odd ones; after the writes of
    // transaction 2 the coordinator is killed, after those of 4 the leader of t/0.
    let mut expected = Vec::new();
    let mut aborted = Vec::new();
    block_on(async {
        let client = Client::connect(&all).await.expect("connect");
        let configs = [("min.insync.replicas".to_owned(), "2".to_owned())];
        client.create_topic("t", 3, 3, &configs).await.expect("create t");
        let mut p = TransactionalProducer::init(client.clone(), TxnConfig::new("eos")).await.expect("init");
        for round in 0..6u32 {
            p.begin().expect("begin");
            let values: Vec<String> = (0..3).map(|part| format!("r{round}-p{part}")).collect();
            for (part, v) in values.iter().enumerate() {
                p.send("t", Some(part as u32), None, v.as_bytes()).await.expect("send");
            }
            p.flush().await.expect("flush");
            let victim = match round {
                2 => {
                    let at = coordinator(&addrs[0], "eos").await;
                    addrs.iter().position(|a| *a == at)
                }
                4 => {
                    let meta = client.describe_topic("t").await.expect("describe");
                    let leader = meta.partitions.iter().find(|x| x.partition == 0).expect("t/0").leader;
                    Some(leader as usize - 1)
                }
                _ => None,
            };
            if let Some(i) = victim {
                c.brokers[i].take().expect("running").kill9();
            }
            if round % 2 == 0 {
                p.commit().await.expect("commit through the failover");
                expected.extend(values);
            } else {
                p.abort().await.expect("abort");
                aborted.extend(values);
            }
            if let Some(i) = victim {
                c.brokers[i] = Some(c.spawn(i));
            }
        }
    });
    let seen = block_on(read_all(&all, 3, Isolation::ReadCommitted));
    let mut sorted = seen.clone();
    sorted.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(sorted, want, "read_committed sees every committed record once and nothing aborted");
    let everything = block_on(read_all(&all, 3, Isolation::ReadUncommitted));
    assert!(aborted.iter().all(|v| everything.contains(v)), "aborted records are in the log for read_uncommitted");
}
