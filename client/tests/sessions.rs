//! Follower reads and session tokens against fake brokers: which replica each fetch goes to,
//! with which token, what NOT_CAUGHT_UP does, and how acknowledged writes raise the token.

mod common;

use std::time::{Duration, Instant};

use common::{fake_cluster, Behaviour, Fake};
use skein_client::wire::FetchRequest;
use skein_client::{
    Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ReadReplica, Session, SessionHandle, Token,
};
use skein_log::batch::BatchBuilder;
use skein_log::types::Timestamp;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    compio::runtime::Runtime::new().expect("runtime").block_on(f)
}

fn one_record_batch() -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    builder.push(None, b"hello", &[], Timestamp(1));
    builder.build().into_bytes()
}

/// A consumer of `t/0` from offset 0 with a short long poll.
async fn consumer(fakes: &[Fake], prefer: ReadReplica, rack: Option<&str>, session: Option<SessionHandle>) -> Consumer {
    consumer_with(fakes, prefer, rack, session, Duration::ZERO).await
}

/// [`consumer`] avoiding a follower that was not caught up for `backoff` (0: only the next
/// fetch goes to the leader).
async fn consumer_with(
    fakes: &[Fake],
    prefer: ReadReplica,
    rack: Option<&str>,
    session: Option<SessionHandle>,
    backoff: Duration,
) -> Consumer {
    let client = Client::connect(&fakes[0].addr()).await.expect("connect");
    let config = ConsumerConfig {
        max_wait: Duration::from_millis(50),
        prefer_replica: prefer,
        rack: rack.map(str::to_owned),
        session,
        lagging_replica_backoff: backoff,
        ..ConsumerConfig::default()
    };
    let mut consumer = Consumer::new(client, config);
    consumer.assign("t", &[0], Position::Offset(0)).await.expect("assign");
    consumer
}

/// Polls until a record arrives; every poll must succeed.
async fn poll_one(consumer: &mut Consumer) -> Vec<skein_client::ConsumerRecord> {
    let start = Instant::now();
    loop {
        let records = consumer.poll().await.expect("poll");
        if !records.is_empty() {
            return records;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "no record in time");
    }
}

/// `(replica_read, fetch_offset, token)` of every Fetch a fake saw.
fn fetches(fake: &Fake) -> Vec<(bool, u64, Token)> {
    fake.seen
        .fetch_requests
        .borrow()
        .iter()
        .map(|r: &FetchRequest| {
            let p = &r.partitions[0];
            let token = Token { min_high_watermark: p.min_high_watermark, min_leader_epoch: p.min_leader_epoch };
            (r.replica_read, p.fetch_offset, token)
        })
        .collect()
}

fn token(min_high_watermark: u64, min_leader_epoch: u32) -> Token {
    Token { min_high_watermark, min_leader_epoch }
}

#[test]
fn a_preferred_in_sync_follower_serves_reads_with_the_session_token() {
    block_on(async {
        let (fakes, _) =
            fake_cluster(&[(1, Behaviour::Lead), (2, Behaviour::Follow)], 1, 1, Some(one_record_batch())).await;
        fakes[1].script.token_wait_us.set(300);
        let mut session = Session::new();
        session.note_write("t", 0, 1, 1);
        let session = session.into_handle();
        let mut consumer = consumer(&fakes, ReadReplica::Node(2), None, Some(session.clone())).await;
        let records = poll_one(&mut consumer).await;
        assert_eq!((records[0].offset, &records[0].value[..]), (0, &b"hello"[..]));
        assert_eq!(fakes[0].seen.fetches.get(), 0, "the leader was not asked");
        let seen = fetches(&fakes[1]);
        assert_eq!(seen[0], (true, 0, token(1, 1)), "replica_read and the session's token");
        assert_eq!(consumer.high_watermark("t", 0), Some(1));
        let stats = consumer.read_stats();
        assert!(stats.fetches >= 1 && stats.follower_reads >= 1 && stats.waited >= 1, "{stats:?}");
        assert_eq!(stats.not_caught_up, 0);
        assert_eq!(session.borrow().token("t", 0), Some(token(1, 1)));
    });
}

#[test]
fn not_caught_up_sends_the_next_fetch_to_the_leader_then_back_to_the_follower() {
    block_on(async {
        let (fakes, _) =
            fake_cluster(&[(1, Behaviour::Lead), (2, Behaviour::Follow)], 1, 1, Some(one_record_batch())).await;
        fakes[1].script.not_caught_up.set(1);
        let session = Session::new().into_handle();
        let mut consumer = consumer(&fakes, ReadReplica::Node(2), None, Some(session)).await;
        let records = poll_one(&mut consumer).await;
        assert_eq!(records.len(), 1);
        consumer.poll().await.expect("poll");
        assert_eq!(fetches(&fakes[0]), vec![(false, 0, token(0, 0))], "one redirect, without replica_read");
        let follower = fetches(&fakes[1]);
        assert_eq!(follower[0], (true, 0, token(0, 0)));
        assert_eq!(follower.get(1), Some(&(true, 1, token(1, 1))), "back to the follower: {follower:?}");
        let stats = consumer.read_stats();
        assert_eq!(stats.not_caught_up, 1, "{stats:?}");
        assert!(stats.follower_reads >= 1, "{stats:?}");
    });
}

#[test]
fn a_follower_that_was_not_caught_up_is_avoided_for_the_backoff() {
    block_on(async {
        let (fakes, _) =
            fake_cluster(&[(1, Behaviour::Lead), (2, Behaviour::Follow)], 1, 1, Some(one_record_batch())).await;
        fakes[1].script.not_caught_up.set(1);
        let session = Session::new().into_handle();
        let backoff = Duration::from_secs(1);
        let mut consumer = consumer_with(&fakes, ReadReplica::Node(2), None, Some(session), backoff).await;
        assert_eq!(poll_one(&mut consumer).await.len(), 1);
        let redirected = Instant::now();
        let mut polls = 0;
        while redirected.elapsed() < Duration::from_millis(500) {
            consumer.poll().await.expect("poll");
            polls += 1;
        }
        assert_eq!(fetches(&fakes[1]).len(), 1, "the follower is not asked within the backoff ({polls} polls)");
        compio::time::sleep(Duration::from_millis(600)).await;
        for _ in 0..3 {
            consumer.poll().await.expect("poll");
        }
        assert!(fetches(&fakes[1]).len() >= 2, "the follower is asked again after the backoff");
    });
}

#[test]
fn a_follower_out_of_sync_is_not_read_from() {
    block_on(async {
        let (fakes, view) =
            fake_cluster(&[(1, Behaviour::Lead), (2, Behaviour::Follow)], 1, 1, Some(one_record_batch())).await;
        view.borrow_mut().isr = Some(vec![1]);
        let mut consumer = consumer(&fakes, ReadReplica::Node(2), None, None).await;
        assert_eq!(poll_one(&mut consumer).await.len(), 1);
        assert_eq!(fakes[1].seen.fetches.get(), 0, "node 2 is not in the ISR");
        assert!(fakes[0].seen.fetches.get() >= 1);
        assert_eq!(consumer.read_stats().follower_reads, 0);
    });
}

#[test]
fn closest_reads_from_the_lowest_in_sync_replica_in_the_consumers_rack() {
    block_on(async {
        let nodes = [(1, Behaviour::Lead), (2, Behaviour::Follow), (3, Behaviour::Follow)];
        let (fakes, view) = fake_cluster(&nodes, 1, 1, Some(one_record_batch())).await;
        view.borrow_mut().racks = [(1, "a".to_owned()), (2, "b".to_owned()), (3, "b".to_owned())].into();
        let mut consumer = consumer(&fakes, ReadReplica::Closest, Some("b"), None).await;
        assert_eq!(poll_one(&mut consumer).await.len(), 1);
        assert_eq!((fakes[0].seen.fetches.get(), fakes[2].seen.fetches.get()), (0, 0));
        assert_eq!(fetches(&fakes[1])[0], (true, 0, token(0, 0)), "no session, no token");
        // Switched to the leader on a live consumer.
        consumer.set_prefer_replica(ReadReplica::Leader);
        assert_eq!(consumer.prefer_replica(), ReadReplica::Leader);
        let before = fakes[0].seen.fetches.get();
        for _ in 0..3 {
            consumer.poll().await.expect("poll");
        }
        assert!(fakes[0].seen.fetches.get() > before, "the leader serves now");
        assert!(fetches(&fakes[0]).iter().all(|f| !f.0), "leader reads go without replica_read");
    });
}

/// Reads from the leader (high watermark 10), then prefers a follower that reports 4: the
/// high watermark each poll sees, and the follower's fetches.
async fn switch_to_a_lagging_follower(with_session: bool) -> (Vec<Option<u64>>, Vec<(bool, u64, Token)>) {
    let (fakes, _) =
        fake_cluster(&[(1, Behaviour::Lead), (2, Behaviour::Follow)], 1, 1, Some(one_record_batch())).await;
    fakes[0].script.high_watermark.set(Some(10));
    fakes[1].script.high_watermark.set(Some(4));
    let session = with_session.then(|| Session::new().into_handle());
    let mut consumer = consumer(&fakes, ReadReplica::Leader, None, session).await;
    poll_one(&mut consumer).await;
    let mut seen = vec![consumer.high_watermark("t", 0)];
    consumer.set_prefer_replica(ReadReplica::Node(2));
    for _ in 0..8 {
        consumer.poll().await.expect("poll");
        seen.push(consumer.high_watermark("t", 0));
    }
    (seen, fetches(&fakes[1]))
}

#[test]
fn with_a_session_the_high_watermark_never_goes_back_across_replicas() {
    block_on(async {
        let (seen, follower) = switch_to_a_lagging_follower(true).await;
        assert!(seen.iter().all(|h| *h == Some(10)), "{seen:?}");
        assert!(!follower.is_empty(), "the follower was asked");
        assert!(follower.iter().all(|f| f.2 == token(10, 1)), "with the token: {follower:?}");
        // Without a session nothing stops the follower's older view from being reported.
        let (seen, follower) = switch_to_a_lagging_follower(false).await;
        assert!(seen.contains(&Some(4)), "{seen:?}");
        assert!(follower.iter().all(|f| f.2 == token(0, 0)), "no token: {follower:?}");
    });
}

#[test]
fn acknowledged_writes_raise_the_session_token_and_reads_carry_it() {
    block_on(async {
        let (fakes, _) =
            fake_cluster(&[(1, Behaviour::Lead), (2, Behaviour::Follow)], 1, 2, Some(one_record_batch())).await;
        let session = Session::new().into_handle();
        let client = Client::connect(&fakes[0].addr()).await.expect("connect");
        let config = ProducerConfig {
            linger: Duration::from_millis(20),
            session: Some(session.clone()),
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config);
        let mut deliveries = Vec::new();
        for v in [b"a", b"b", b"c"] {
            deliveries.push(producer.send_to("t", Some(0), None, v).await.expect("queued"));
        }
        producer.flush().await;
        for d in deliveries {
            d.await.expect("acknowledged");
        }
        assert_eq!(fakes[0].seen.produces.get(), 1, "one batch of three records");
        assert_eq!(session.borrow().token("t", 0), Some(token(3, 1)), "base offset + record count");
        assert_eq!(session.borrow().token("t", 1), None, "nothing written there");
        producer.send_to("t", Some(0), None, b"d").await.expect("queued").await.expect("acknowledged");
        assert_eq!(session.borrow().token("t", 0), Some(token(4, 1)));

        // Read-your-writes: a follower read carries the token.
        fakes[1].script.high_watermark.set(Some(4));
        let mut consumer = consumer(&fakes, ReadReplica::Node(2), None, Some(session.clone())).await;
        poll_one(&mut consumer).await;
        assert_eq!(fetches(&fakes[1])[0], (true, 0, token(4, 1)));
    });
}
