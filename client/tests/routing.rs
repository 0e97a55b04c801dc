//! Leader routing against a real single-node `skein-broker`: it leads every partition, and
//! everything the client does must keep working through the metadata cache.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use skein_client::wire::{ErrorCode, LATEST};
use skein_client::{
    Client, ClientError, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ProducerRecord, TrySend,
};
use skein_log::types::Timestamp;

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
            matches!(producer.send_tagged(ProducerRecord::new("t", b"x"), 1).await, Err(ClientError::Invalid(_))),
            "no handler, no send"
        );
        assert!(matches!(producer.try_send_tagged(ProducerRecord::new("t", b"x"), 1), Err(ClientError::Invalid(_))));
        let calls = Rc::new(RefCell::new(Vec::new()));
        let seen = calls.clone();
        producer.on_delivery(move |tags: &[u64], r| seen.borrow_mut().push((tags.to_vec(), r)));
        // Before the producer id and the topic's partition count are known, a send must wait.
        assert_eq!(producer.try_send_tagged(to("t", 0, b"x", None), 1), Ok(TrySend::WouldBlock));
        producer.send_tagged(to("t", 0, &0u64.to_le_bytes(), Some(Timestamp(1_000))), 1000).await.expect("send");
        let mut futures = Vec::new();
        for i in 1..20u64 {
            let partition = Some((i % 2) as u32);
            if i == 9 {
                // A future in the middle of partition 1's tagged records splits their run.
                futures.push(producer.send_to("t", partition, None, b"untagged").await.expect("send"));
            }
            let (value, ts) = (i.to_le_bytes(), Some(Timestamp(1_000 + i as i64)));
            assert_eq!(
                producer.try_send_tagged(
                    ProducerRecord { partition, timestamp: ts, ..ProducerRecord::new("t", &value) },
                    1000 + i
                ),
                Ok(TrySend::Queued)
            );
        }
        assert!(matches!(producer.try_send_tagged(to("t", 7, b"x", None), 99), Err(ClientError::Invalid(_))));
        producer.flush().await;
        assert_eq!(futures.pop().expect("one").await, Ok((1, 4)), "after tags 1, 3, 5, 7 at offsets 0-3");
        // Each call is a run of records with consecutive offsets from the one given.
        let mut offsets = Vec::new();
        for (tags, r) in calls.borrow().iter() {
            let (partition, first) = r.clone().expect("acknowledged");
            assert!(!tags.is_empty());
            offsets.extend(tags.iter().enumerate().map(|(i, tag)| (*tag, partition, first + i as u64)));
        }
        assert!(calls.borrow().len() >= 3, "partition 1's run is split by the untagged record");
        offsets.sort();
        let want: Vec<(u64, u32, u64)> = (0..20u64)
            .map(|i| {
                let p = i % 2;
                let offset = i / 2 + u64::from(p == 1 && i >= 9);
                (1000 + i, p as u32, offset)
            })
            .collect();
        assert_eq!(offsets, want);
        // The timestamps given are the records' create times.
        let mut consumer = Consumer::new(
            client.clone(),
            ConsumerConfig { max_wait: Duration::from_millis(100), ..ConsumerConfig::default() },
        );
        consumer.assign("t", &[0], Position::Beginning).await.expect("assign");
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 10 && start.elapsed() < Duration::from_secs(10) {
            times.extend(consumer.poll().await.expect("poll").into_iter().map(|r| r.timestamp));
        }
        assert_eq!(times, (0..10).map(|i| 1_000 + 2 * i).collect::<Vec<i64>>());
    });
}

/// A record for an explicit partition.
fn to<'a>(topic: &'a str, partition: u32, value: &'a [u8], timestamp: Option<Timestamp>) -> ProducerRecord<'a> {
    ProducerRecord { partition: Some(partition), timestamp, ..ProducerRecord::new(topic, value) }
}

#[test]
fn a_full_buffer_holds_sends_until_answers_free_it() {
    let broker = common::Broker::start();
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("b", 1, 1, &[]).await.expect("create");
        // Room for about one 4 KiB batch: every batch after the first waits for an answer.
        let config = ProducerConfig { batch_bytes_max: 4096, buffer_bytes_max: 4096, ..ProducerConfig::default() };
        let producer = Producer::new(client.clone(), config);
        let done = Rc::new(RefCell::new(0u64));
        let counted = done.clone();
        producer.on_delivery(move |tags: &[u64], r| {
            r.expect("acknowledged");
            *counted.borrow_mut() += tags.len() as u64;
        });
        let value = [7u8; 1000];
        let sender = producer.clone();
        // A task of its own (the runtime may poll the root future on any event, which would
        // hide a lost wake-up).
        let sends = compio::runtime::spawn(async move {
            let (producer, mut would_block) = (sender, 0);
            for i in 0..400u64 {
                if producer.try_send_tagged(ProducerRecord::new("b", &value), i).expect("send") == TrySend::WouldBlock {
                    would_block += 1;
                    // Woken when an answer frees buffer space (nothing polls a timer).
                    producer.send_tagged(ProducerRecord::new("b", &value), i).await.expect("send");
                }
            }
            producer.flush().await;
            would_block
        });
        let would_block = compio::time::timeout(Duration::from_secs(20), sends)
            .await
            .expect("waiting sends were woken")
            .expect("task");
        assert_eq!(*done.borrow(), 400);
        assert!(would_block > 50, "the buffer filled: {would_block} sends had to wait");
        assert_eq!(client.list_offset("b", 0, LATEST).await, Ok(400));
    });
}
