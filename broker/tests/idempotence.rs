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
