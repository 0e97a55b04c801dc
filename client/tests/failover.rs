//! Leader routing and failover against fake brokers that stage leader changes: a leader
//! that answers NOT_LEADER, one that never answers, and many callers wanting metadata at once.

mod common;

use std::time::{Duration, Instant};

use common::{fake_cluster, Behaviour};
use skein_client::{Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};
use skein_log::batch::BatchBuilder;
use skein_log::types::Timestamp;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    compio::runtime::Runtime::new().expect("runtime").block_on(f)
}

#[test]
fn producer_follows_not_leader_to_the_new_leader_and_is_acknowledged_once() {
    block_on(async {
        let (fakes, view) =
            fake_cluster(&[(1, Behaviour::NotLeader { to: 2 }), (2, Behaviour::Lead)], 1, 1, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let producer = Producer::new(client, ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() });
        let delivery = producer.send("t", None, b"v").await.expect("queued");
        let acked = compio::time::timeout(Duration::from_secs(5), delivery).await.expect("acknowledged in time");
        assert_eq!(acked, Ok((0, 0)));
        assert_eq!(fakes[0].seen.produces.get(), 1, "the old leader was asked once");
        assert_eq!(fakes[1].seen.produces.get(), 1, "the new leader was asked once");
        assert_eq!(fakes[1].seen.records.get(), 1, "the record was appended once");
        assert_eq!(view.borrow().leader, 2);
    });
}

#[test]
fn producer_gives_up_on_a_silent_leader_within_the_response_timeout() {
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Silent { to: 2 }), (2, Behaviour::Lead)], 1, 1, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        // Defaults: acks=all, broker-side timeout 1 s, client-side bound 1.5 s.
        let config = ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() };
        let bound = config.response_timeout;
        let producer = Producer::new(client, config);
        let start = Instant::now();
        let delivery = producer.send("t", None, b"v").await.expect("queued");
        let acked = compio::time::timeout(Duration::from_secs(10), delivery).await.expect("resolved");
        let took = start.elapsed();
        assert_eq!(acked, Ok((0, 0)));
        assert!(took >= bound, "it waited for the bound: {took:?}");
        assert!(took < bound + Duration::from_millis(800), "no stall beyond the bound: {took:?}");
        assert_eq!(fakes[0].seen.produces.get(), 1);
        assert_eq!(fakes[1].seen.records.get(), 1);
        // The client dropped the silent connection.
        for _ in 0..100 {
            if fakes[0].seen.closed.get() > 0 {
                break;
            }
            compio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(fakes[0].seen.closed.get() > 0, "the silent connection was closed");
    });
}

#[test]
fn a_retried_batch_is_sent_without_the_partitions_later_batches() {
    // The first batch goes to a leader that never answers (it may have appended it); two
    // later batches of the same partition wait behind it. The retry goes to the new leader
    // alone: a broker that finds it a duplicate answers with its old offset while the batches
    // after it would land at the log end, and the response has one base offset per partition.
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Silent { to: 2 }), (2, Behaviour::Lead)], 1, 1, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig {
            linger: Duration::ZERO,
            acks: skein_client::Acks::Leader,
            response_timeout: Duration::from_millis(200),
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let first = producer.send("t", None, b"a").await.expect("queued");
        // Let the first batch leave before the others are sealed.
        while fakes[0].seen.produces.get() == 0 {
            compio::time::sleep(Duration::from_millis(5)).await;
        }
        let later = [
            producer.send("t", None, b"b").await.expect("queued"),
            producer.send("t", None, b"c").await.expect("queued"),
        ];
        let timeout = Duration::from_secs(5);
        assert_eq!(compio::time::timeout(timeout, first).await.expect("resolved"), Ok((0, 0)));
        for d in later {
            assert!(compio::time::timeout(timeout, d).await.expect("resolved").is_ok());
        }
        assert_eq!(fakes[1].seen.records.get(), 3);
        // The later batches were pipelined to the silent leader too, so they are retries as
        // well: each goes alone, in order.
        assert_eq!(fakes[1].seen.produce_records.borrow().first(), Some(&1), "the retried batch alone");
        assert_eq!(fakes[1].seen.values.borrow()[&0], [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    });
}

/// Sends `n` records to partition 0 of `t` one after another (each queued as the previous is
/// sealed, linger 0) and waits for every delivery: their offsets, in send order.
async fn send_numbered(producer: &Producer, n: usize) -> Vec<Result<u64, skein_client::ClientError>> {
    let mut deliveries = Vec::new();
    for i in 0..n {
        deliveries.push(producer.send_to("t", Some(0), None, format!("v{i}").as_bytes()).await.expect("queued"));
        // Give the sender task a turn, so batches stay small and requests overlap.
        compio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut out = Vec::new();
    for d in deliveries {
        out.push(compio::time::timeout(Duration::from_secs(10), d).await.expect("resolved").map(|(_, o)| o));
    }
    out
}

fn numbered(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("v{i}").into_bytes()).collect()
}

#[test]
fn several_requests_of_one_partition_are_in_flight_and_land_in_order() {
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Lead)], 1, 1, None).await;
        fakes[0].script.hold_produce_ms.set(30);
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() };
        let producer = Producer::new(client, config);
        let offsets = send_numbered(&producer, 60).await;
        assert_eq!(offsets, (0..60).map(Ok).collect::<Vec<_>>());
        let outstanding = fakes[0].seen.max_outstanding.get();
        assert!((2..=5).contains(&outstanding), "requests in flight at once: {outstanding}");
        assert_eq!(fakes[0].seen.values.borrow()[&0], numbered(60));
    });
}

#[test]
fn without_idempotence_one_request_per_partition_is_in_flight() {
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Lead)], 1, 1, None).await;
        fakes[0].script.hold_produce_ms.set(10);
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig { linger: Duration::ZERO, idempotence: false, ..ProducerConfig::default() };
        let producer = Producer::new(client, config);
        let offsets = send_numbered(&producer, 30).await;
        assert_eq!(offsets, (0..30).map(Ok).collect::<Vec<_>>());
        assert_eq!(fakes[0].seen.max_outstanding.get(), 1);
    });
}

/// One request of a pipeline is refused (NOT_LEADER, nothing appended): the requests behind
/// it are refused as out of order by the sequence check; all of them come back, then go again
/// in sequence order, so every record lands once, in send order, at the offset reported.
#[test]
fn a_failed_request_in_a_pipeline_is_retried_before_the_batches_behind_it() {
    for refused in [1, 2, 4] {
        block_on(async {
            let (fakes, _) = fake_cluster(&[(1, Behaviour::Lead)], 1, 1, None).await;
            fakes[0].script.hold_produce_ms.set(20);
            fakes[0].script.refuse_produce.borrow_mut().push(refused);
            let client = Client::connect(&fakes[0].addr()).await.expect("connect");
            let config = ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() };
            let producer = Producer::new(client, config);
            let offsets = send_numbered(&producer, 40).await;
            assert_eq!(offsets, (0..40).map(Ok).collect::<Vec<_>>(), "refused request {refused}");
            assert_eq!(fakes[0].seen.values.borrow()[&0], numbered(40), "refused request {refused}");
            if refused > 1 {
                // (A first request goes alone: pipelining starts once the broker knows the
                // producer.)
                assert!(fakes[0].seen.max_outstanding.get() >= 2, "refused request {refused}: no pipeline");
            }
        });
    }
}

#[test]
fn producer_response_timeout_is_configurable() {
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Silent { to: 2 }), (2, Behaviour::Lead)], 1, 1, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig {
            linger: Duration::ZERO,
            acks: skein_client::Acks::Leader,
            response_timeout: Duration::from_millis(200),
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let start = Instant::now();
        let delivery = producer.send("t", None, b"v").await.expect("queued");
        let acked = compio::time::timeout(Duration::from_secs(5), delivery).await.expect("resolved");
        assert_eq!(acked, Ok((0, 0)));
        assert!(start.elapsed() < Duration::from_millis(800), "took {:?}", start.elapsed());
    });
}

#[test]
fn concurrent_lookups_share_one_metadata_refresh() {
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Lead)], 1, 16, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        assert_eq!(client.leader("t", 0).await, Ok(1));
        let before = fakes[0].seen.metadata.get();
        client.invalidate_metadata("t");
        let lookups = (0..16).map(|p| {
            let client = client.clone();
            async move { client.leader("t", p).await }
        });
        let leaders = futures_util::future::join_all(lookups).await;
        assert!(leaders.iter().all(|l| *l == Ok(1)), "{leaders:?}");
        assert_eq!(fakes[0].seen.metadata.get() - before, 1, "one Metadata request for all of them");
        // Cached now: no request at all.
        assert_eq!(client.leader("t", 3).await, Ok(1));
        assert_eq!(client.cached_leader("t", 3), Some(1));
        assert_eq!(fakes[0].seen.metadata.get() - before, 1);
    });
}

#[test]
fn metadata_skips_an_unreachable_bootstrap_broker() {
    block_on(async {
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Lead)], 1, 1, None).await;
        // A port nothing listens on (bound, then released).
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let client = Client::connect(&format!("{dead},{}", fakes[0].addr())).await.expect("connect");
        assert_eq!(client.leader("t", 0).await, Ok(1));
        let missing = client.leader("nope", 0).await;
        assert!(
            matches!(
                missing,
                Err(skein_client::ClientError::Broker(skein_client::wire::ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _))
            ),
            "{missing:?}"
        );
    });
}

fn one_record_batch() -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    builder.push(None, b"hello", &[], Timestamp(1));
    builder.build().into_bytes()
}

/// Polls until a record arrives; every poll must succeed.
async fn poll_one(consumer: &mut Consumer, within: Duration) -> (Vec<skein_client::ConsumerRecord>, Duration) {
    let start = Instant::now();
    loop {
        let records = consumer.poll().await.expect("poll does not fail during a leader change");
        if !records.is_empty() {
            return (records, start.elapsed());
        }
        assert!(start.elapsed() < within, "no record within {within:?}");
    }
}

#[test]
fn consumer_moves_to_the_new_leader_without_failing_poll() {
    block_on(async {
        let (fakes, _) =
            fake_cluster(&[(1, Behaviour::NotLeader { to: 2 }), (2, Behaviour::Lead)], 1, 1, Some(one_record_batch()))
                .await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() };
        let mut consumer = Consumer::new(client, config);
        consumer.assign("t", &[0], Position::Offset(0)).await.expect("assign");
        let (records, _) = poll_one(&mut consumer, Duration::from_secs(3)).await;
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].offset, &records[0].value[..]), (0, &b"hello"[..]));
        assert_eq!(consumer.position("t", 0), Some(1));
        assert!(fakes[0].seen.fetches.get() >= 1);
    });
}

#[test]
fn consumer_gives_up_on_a_silent_leader() {
    block_on(async {
        let (fakes, _) =
            fake_cluster(&[(1, Behaviour::Silent { to: 2 }), (2, Behaviour::Lead)], 1, 1, Some(one_record_batch()))
                .await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(100),
            response_timeout: Duration::from_millis(300),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client, config);
        consumer.assign("t", &[0], Position::Offset(0)).await.expect("assign");
        let (records, took) = poll_one(&mut consumer, Duration::from_secs(3)).await;
        assert_eq!(records.len(), 1);
        assert!(took < Duration::from_millis(1_000), "took {took:?}");
        assert_eq!(fakes[0].seen.fetches.get(), 1);
    });
}

#[test]
fn producer_retries_are_bounded_by_count_and_by_delivery_timeout() {
    block_on(async {
        // A broker that answers NOT_LEADER yet names itself the leader: every retry fails.
        let (fakes, _) = fake_cluster(&[(1, Behaviour::NotLeader { to: 1 })], 1, 1, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig { linger: Duration::ZERO, retries: 3, ..ProducerConfig::default() };
        let producer = Producer::new(client.clone(), config);
        let failed = producer.send("t", None, b"v").await.expect("queued").await;
        assert!(matches!(failed, Err(skein_client::ClientError::Broker(skein_client::wire::ErrorCode::NOT_LEADER, _))));
        assert_eq!(fakes[0].seen.produces.get(), 4, "the first attempt and 3 retries");

        // No leader at all: the batch waits for one until its delivery timeout.
        let (fakes, _) = fake_cluster(&[(1, Behaviour::Lead)], 0, 1, None).await;
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig {
            linger: Duration::ZERO,
            delivery_timeout: Duration::from_millis(300),
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let start = Instant::now();
        let failed = producer.send("t", None, b"v").await.expect("queued").await;
        assert!(failed.is_err(), "{failed:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        assert_eq!(fakes[0].seen.produces.get(), 0, "nothing is sent without a leader");
    });
}
