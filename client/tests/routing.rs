//! Leader routing against a real single-node `skein-broker`: it leads every partition, and
//! everything the client does must keep working through the metadata cache.

mod common;

use std::time::{Duration, Instant};

use skein_client::wire::{ErrorCode, LATEST};
use skein_client::{Client, ClientError, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};

#[test]
fn a_single_node_leads_every_partition_and_serves_them_all() {
    let broker = common::Broker::start();
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("r", 3, 1, &[]).await.expect("create");
        let node = client.metadata(None).await.expect("metadata").brokers[0].node_id;
        for p in 0..3 {
            assert_eq!(client.leader("r", p).await, Ok(node));
            client.leader_connection("r", p).await.expect("leader connection");
        }
        assert!(matches!(
            client.leader("r", 3).await,
            Err(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _))
        ));
        assert!(matches!(
            client.leader("nope", 0).await,
            Err(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _))
        ));

        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut deliveries = Vec::new();
        for i in 0..30u32 {
            deliveries
                .push(producer.send("r", Some(&i.to_le_bytes()), format!("v{i}").as_bytes()).await.expect("send"));
        }
        producer.flush().await;
        for d in deliveries {
            d.await.expect("acknowledged");
        }
        assert!(producer.send("nope", None, b"x").await.is_err(), "an unknown topic fails the send");

        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() },
        );
        consumer.assign("r", &[0, 1, 2], Position::Beginning).await.expect("assign");
        let mut values = Vec::new();
        let start = Instant::now();
        while values.len() < 30 && start.elapsed() < Duration::from_secs(10) {
            values.extend(consumer.poll().await.expect("poll").into_iter().map(|r| r.value));
        }
        values.sort();
        let mut want: Vec<Vec<u8>> = (0..30).map(|i| format!("v{i}").into_bytes()).collect();
        want.sort();
        assert_eq!(values, want);

        let described = client.describe_topic("r").await.expect("describe");
        assert_eq!(described.partitions.len(), 3);
        assert!(described.partitions.iter().all(|p| p.leader == node));
        assert_eq!(described.partitions.iter().map(|p| p.high_watermark).sum::<u64>(), 30);
        let mut ends = 0;
        for p in 0..3 {
            ends += client.list_offset("r", p, LATEST).await.expect("list offset");
        }
        assert_eq!(ends, 30);
        assert_eq!(client.partition_count("r").await, Ok(3));
        assert!(client.describe_topic("nope").await.is_err());
    });
}

#[test]
fn producer_and_consumer_ride_out_a_broker_restart() {
    let mut broker = common::Broker::start();
    let addr = broker.addr.clone();
    let rt = compio::runtime::Runtime::new().expect("runtime");
    let (client, producer) = rt.block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        client.create_topic("k", 1, 1, &[]).await.expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        producer.send("k", None, b"before").await.expect("send").await.expect("acknowledged");
        (client, producer)
    });
    // Same port, same data: the client's connections break and must be replaced.
    broker.restart();
    rt.block_on(async {
        let d = producer.send("k", None, b"after").await.expect("send");
        assert_eq!(d.await.map(|(_, offset)| offset), Ok(1));
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() },
        );
        consumer.assign("k", &[0], Position::Beginning).await.expect("assign");
        let mut values = Vec::new();
        let start = Instant::now();
        while values.len() < 2 && start.elapsed() < Duration::from_secs(10) {
            values.extend(consumer.poll().await.expect("poll").into_iter().map(|r| r.value));
        }
        assert_eq!(values, vec![b"before".to_vec(), b"after".to_vec()]);
    });
    drop(broker);
}

#[test]
fn tagged_sends_report_each_outcome_with_its_tag() {
    let broker = common::Broker::start();
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("t", 2, 1, &[]).await.expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        assert!(
            matches!(producer.send_tagged("t", None, None, b"x", 1).await, Err(ClientError::Invalid(_))),
            "no handler, no send"
        );
        let outcomes = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let seen = outcomes.clone();
        producer.on_delivery(move |tag, r| seen.borrow_mut().push((tag, r)));
        for i in 0..20u64 {
            producer.send_tagged("t", Some((i % 2) as u32), None, &i.to_le_bytes(), 1000 + i).await.expect("send");
        }
        producer.send_tagged("t", Some(7), None, b"x", 99).await.expect_err("partition 7 does not exist");
        producer.flush().await;
        let mut got = outcomes.borrow().clone();
        got.sort_by_key(|(tag, _)| *tag);
        assert_eq!(got.iter().map(|(tag, _)| *tag).collect::<Vec<_>>(), (1000..1020).collect::<Vec<_>>());
        for (tag, r) in &got {
            let (partition, offset) = r.clone().expect("acknowledged");
            assert_eq!(u64::from(partition), (tag - 1000) % 2, "tag {tag}");
            assert_eq!(offset, (tag - 1000) / 2, "tag {tag}: in order within its partition");
        }
    });
}
