//! Idempotent producers against the real broker: a retried batch is appended once and
//! answered with its first offset, out-of-order sequences are rejected, and both hold across a
//! kill -9 restart (the producer state is rebuilt from the log); producer ids are never reused.

mod common;

use bytes::BytesMut;
use common::{block_on, Broker};
use skein_client::wire::{ApiKey, ErrorCode, ProducePartition, ProduceRequest, ProduceResponse};
use skein_client::{Acks, Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};
use skein_log::batch::BatchBuilder;
use skein_log::types::{ProducerEpoch, ProducerId, Sequence, Timestamp};

fn batch(pid: i64, seq: i32, value: &str) -> BytesMut {
    let mut b = BatchBuilder::new().producer(ProducerId(pid), ProducerEpoch(0), Sequence(seq));
    b.push(None, value.as_bytes(), &[], Timestamp(1_000));
    BytesMut::from(&b.build().into_bytes()[..])
}

async fn produce(client: &Client, records: BytesMut) -> (ErrorCode, u64) {
    let req = ProduceRequest {
        acks: -1,
        timeout_ms: 5_000,
        partitions: vec![ProducePartition { topic: "t".into(), partition: 0, leader_epoch: 0, records }],
    };
    let conn = client.connection().await.expect("connection");
    let resp: ProduceResponse = conn.call(ApiKey::Produce, &req).await.expect("produce");
    (resp.partitions[0].error, resp.partitions[0].base_offset)
}

async fn values(client: &Client) -> Vec<String> {
    let config = ConsumerConfig { max_wait: std::time::Duration::from_millis(50), ..ConsumerConfig::default() };
    let mut consumer = Consumer::new(client.clone(), config);
    consumer.assign("t", &[0], Position::Beginning).await.expect("assign");
    let mut out = Vec::new();
    for _ in 0..20 {
        out.extend(consumer.poll().await.expect("poll").into_iter().map(|r| String::from_utf8(r.value).expect("utf8")));
    }
    out
}

#[test]
fn retries_are_appended_once_and_gaps_rejected_across_a_kill9_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &[]);
    let pid = block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("t", 1, 1, &[]).await.expect("create");
        let (pid, epoch) = client.init_producer_id().await.expect("producer id");
        assert_eq!(epoch, 0);
        assert_eq!(produce(&client, batch(pid, 0, "a")).await, (ErrorCode::NONE, 0));
        assert_eq!(produce(&client, batch(pid, 0, "a")).await, (ErrorCode::NONE, 0), "a retry: same offset");
        assert_eq!(produce(&client, batch(pid, 1, "b")).await, (ErrorCode::NONE, 1));
        assert_eq!(produce(&client, batch(pid, 3, "d")).await.0, ErrorCode::OUT_OF_ORDER_SEQUENCE, "a gap");
        assert_eq!(
            produce(&client, batch(pid + 1, 7, "x")).await,
            (ErrorCode::NONE, 2),
            "a new producer may start anywhere"
        );
        pid
    });
    broker.kill9();
    broker.restart();
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("reconnect");
        assert_eq!(produce(&client, batch(pid, 1, "b")).await, (ErrorCode::NONE, 1), "recognized after the restart");
        assert_eq!(produce(&client, batch(pid, 2, "c")).await, (ErrorCode::NONE, 3));
        assert_eq!(produce(&client, batch(pid, 4, "e")).await.0, ErrorCode::OUT_OF_ORDER_SEQUENCE);
        assert_eq!(values(&client).await, vec!["a", "b", "x", "c"]);
        let (again, _) = client.init_producer_id().await.expect("producer id");
        assert!(again > pid + 1, "ids are never reused across restarts: {again} after {pid}");
    });
}

#[test]
fn the_producer_numbers_its_batches_and_stays_exactly_once_through_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &[]);
    let addr = broker.addr.clone();
    block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        client.create_topic("t", 1, 1, &[]).await.expect("create");
        let config = ProducerConfig { acks: Acks::All, linger: std::time::Duration::ZERO, ..ProducerConfig::default() };
        let producer = Producer::new(client.clone(), config);
        for i in 0..50 {
            producer.send("t", None, format!("v{i}").as_bytes()).await.expect("send").await.expect("acked");
        }
    });
    broker.kill9();
    broker.restart();
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("reconnect");
        let got = values(&client).await;
        let want: Vec<String> = (0..50).map(|i| format!("v{i}")).collect();
        assert_eq!(got, want);
    });
}

/// Acknowledged records must not come back as failures: a Produce request whose answer is
/// lost after the leader appended it (here: acks=all times out at the broker while a paused
/// follower is still in the ISR) has its batches retried one by one, and the broker must
/// recognise every one of them as a duplicate. It remembers a producer's last five runs of
/// batches appended back to back (before: its last five batches, and the retries of the
/// oldest of a forty-batch request were refused as OUT_OF_ORDER_SEQUENCE although they were
/// in the log).
#[test]
fn batches_of_a_request_lost_after_the_append_are_all_recognised_on_retry() {
    use common::cluster::{leader, settled, Cluster};
    use skein_client::ProducerRecord;
    let c = Cluster::start(84, 19584);
    block_on(async {
        let (lead, _) = settled(&c).await;
        let client = Client::connect(&c.addrs.join(",")).await.expect("connect");
        let controller = client.metadata(None).await.expect("metadata").controller;
        let paused =
            (1..=3).find(|&n| n != lead && n != controller).unwrap_or((1..=3).find(|&n| n != lead).expect("3"));
        let pid = c.brokers[c.index(paused)].as_ref().expect("running").child.id();
        let signal = |sig: &str| {
            let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill");
            assert!(ok.success(), "kill {sig} {pid}");
        };
        let config = ProducerConfig {
            acks: Acks::All,
            batch_bytes_max: 1_024,
            request_timeout_ms: 200,
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client.clone(), config);
        let outcomes = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let sink = outcomes.clone();
        producer.on_delivery(move |tags, result| {
            let mut out = sink.borrow_mut();
            for (k, &tag) in tags.iter().enumerate() {
                out.push((tag, result.clone().map(|(_, first)| first + k as u64)));
            }
        });
        // The producer id first, so nothing below waits.
        producer.send_tagged(ProducerRecord::new("t", b"first"), 0).await.expect("queued");
        producer.flush().await;
        signal("-STOP");
        // Forty batches sealed before the sender task runs (no yield): they are all ready when
        // it picks the partition's next request, and that request's answer is lost (acks=all
        // times out while the paused follower is in the ISR) after the leader appended it.
        let records = 40 * 10;
        for i in 1..=records {
            let value = format!("{i:08}-{}", "x".repeat(90));
            let mut record = ProducerRecord::new("t", value.as_bytes());
            record.partition = Some(0);
            let queued = producer.try_send_tagged(record, i).expect("queued");
            assert!(!matches!(queued, skein_client::TrySend::WouldBlock), "record {i} would wait");
        }
        producer.flush().await;
        signal("-CONT");
        let outcomes = outcomes.borrow().clone();
        assert_eq!(outcomes.len() as u64, records + 1, "every record has an outcome");
        let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
        assert!(failed.is_empty(), "{} of {records} records failed, first: {:?}", failed.len(), failed.first());
        let offsets: Vec<(u64, u64)> = outcomes.iter().map(|(t, r)| (*t, *r.as_ref().expect("ok"))).collect();
        let i = records as u32 + 1;
        let end = client.list_offset("t", 0, skein_client::wire::LATEST).await.expect("end");
        assert_eq!(end, u64::from(i), "each record once");
        let log = values(&client).await;
        for (n, o) in offsets.into_iter().filter(|(n, _)| *n > 0) {
            assert!(log[o as usize].starts_with(&format!("{n:08}-")), "record {n} acknowledged at {o}");
        }
        assert_ne!(leader(&c.addrs[0]).await.0, 0);
    });
}
