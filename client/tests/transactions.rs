//! The transactional producer against a fake broker that is its own transaction coordinator
//! and checks what a real one checks: a transactional write only to a partition already
//! added to the transaction, only under the current epoch, sequences from 0 in every epoch;
//! EndTxn bumps the epoch and answers a retry of an end it already made with the new epoch.
//! Scripted faults: refused writes, lost EndTxn answers, CONCURRENT_TRANSACTIONS.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use compio::net::TcpListener;
use skein_client::wire::io::{read_frame, write_frames};
use skein_client::wire::{
    decode_exact, response_frame, AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, ApiKey, BrokerInfo, EndTxnRequest, EndTxnResponse, ErrorCode, FindCoordinatorRequest,
    FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse, MetadataRequest, MetadataResponse,
    OffsetCommitPartitionResponse, PartitionMetadata, ProducePartitionResponse, ProduceRequest, ProduceResponse,
    Reader, RequestHeader, TopicMetadata, TxnOffsetCommitRequest, TxnOffsetCommitResponse, TxnPartitionResult,
    FRAME_BYTES_MAX_DEFAULT, GROUP_KEY, TRANSACTION_KEY,
};
use skein_client::{Client, GroupMetadata, ProducerConfig, TransactionalProducer, TxnConfig, TxnError};

const PRODUCER_ID: i64 = 7;

/// What the fake saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// AddPartitionsToTxn: the partitions asked for, under this epoch.
    Add(Vec<u32>, i16),
    /// A transactional batch appended: partition, epoch, base sequence, records.
    Write(u32, i16, i32, u32),
    /// EndTxn: commit?, epoch sent.
    End(bool, i16),
    /// AddOffsetsToTxn: group, epoch.
    AddOffsets(String, i16),
    /// TxnOffsetCommit: group, epoch, member epoch, (partition, offset).
    Offsets(String, i16, i32, Vec<(u32, u64)>),
}

#[derive(Default)]
struct Fake {
    port: Cell<u16>,
    events: RefCell<Vec<Event>>,
    /// The producer's current epoch (bumped by every end).
    epoch: Cell<i16>,
    /// The last end made: (commit?, the epoch it ended).
    last_end: Cell<Option<(bool, i16)>>,
    added: RefCell<BTreeSet<u32>>,
    /// Next sequence per partition under the current epoch.
    sequences: RefCell<HashMap<u32, i32>>,
    ends: RefCell<HashMap<u32, u64>>,
    /// Answer the next writes with this code (appending nothing).
    refuse_writes: Cell<Option<ErrorCode>>,
    /// Answer this many AddPartitionsToTxn with CONCURRENT_TRANSACTIONS per partition.
    busy_adds: Cell<u32>,
    /// Make this many ends, then answer NOT_COORDINATOR as if the answer were lost.
    lost_ends: Cell<u32>,
}

impl Fake {
    fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }

    fn note(&self, e: Event) {
        self.events.borrow_mut().push(e);
    }

    fn answer(&self, header: &RequestHeader, r: Reader) -> Vec<u8> {
        let id = header.correlation_id;
        match header.api_key {
            ApiKey::Metadata => {
                let req: MetadataRequest = decode_exact(r).expect("metadata");
                response_frame(id, Ok(&self.metadata(req.topics)))
            }
            ApiKey::FindCoordinator => {
                let req: FindCoordinatorRequest = decode_exact(r).expect("find coordinator");
                let expected = if req.group == "tx" { TRANSACTION_KEY } else { GROUP_KEY };
                assert_eq!(req.key_type, expected, "{}", req.group);
                let resp = FindCoordinatorResponse {
                    error: ErrorCode::NONE,
                    message: String::new(),
                    node_id: 1,
                    host: "127.0.0.1".into(),
                    port: self.port.get(),
                };
                response_frame(id, Ok(&resp))
            }
            ApiKey::InitProducerId => {
                let req: InitProducerIdRequest = decode_exact(r).expect("init");
                assert_eq!(req.transactional_id.as_deref(), Some("tx"));
                let resp = InitProducerIdResponse {
                    error: ErrorCode::NONE,
                    message: String::new(),
                    producer_id: PRODUCER_ID,
                    producer_epoch: self.epoch.get(),
                };
                response_frame(id, Ok(&resp))
            }
            ApiKey::AddPartitionsToTxn => {
                let req: AddPartitionsToTxnRequest = decode_exact(r).expect("add partitions");
                response_frame(id, Ok(&self.add(req)))
            }
            ApiKey::Produce => {
                let req: ProduceRequest = decode_exact(r).expect("produce");
                response_frame(id, Ok(&self.produce(req)))
            }
            ApiKey::EndTxn => {
                let req: EndTxnRequest = decode_exact(r).expect("end");
                response_frame(id, Ok(&self.end(req)))
            }
            ApiKey::AddOffsetsToTxn => {
                let req: AddOffsetsToTxnRequest = decode_exact(r).expect("add offsets");
                self.note(Event::AddOffsets(req.group, req.producer_epoch));
                response_frame(id, Ok(&AddOffsetsToTxnResponse { error: ErrorCode::NONE, message: String::new() }))
            }
            ApiKey::TxnOffsetCommit => {
                let req: TxnOffsetCommitRequest = decode_exact(r).expect("txn offset commit");
                let offsets = req.partitions.iter().map(|p| (p.partition, p.offset)).collect();
                self.note(Event::Offsets(req.group, req.producer_epoch, req.member_epoch, offsets));
                let partitions = req
                    .partitions
                    .iter()
                    .map(|p| OffsetCommitPartitionResponse {
                        topic: p.topic.clone(),
                        partition: p.partition,
                        error: ErrorCode::NONE,
                    })
                    .collect();
                response_frame(
                    id,
                    Ok(&TxnOffsetCommitResponse { error: ErrorCode::NONE, message: String::new(), partitions }),
                )
            }
            _ => response_frame::<MetadataResponse>(id, Err(ErrorCode::UNSUPPORTED_VERSION)),
        }
    }

    fn metadata(&self, topics: Option<Vec<String>>) -> MetadataResponse {
        let brokers =
            vec![BrokerInfo { node_id: 1, host: "127.0.0.1".into(), port: self.port.get(), rack: String::new() }];
        let names = topics.unwrap_or_else(|| vec!["t".into()]);
        let topics = names
            .into_iter()
            .map(|name| TopicMetadata {
                error: if name == "t" { ErrorCode::NONE } else { ErrorCode::UNKNOWN_TOPIC_OR_PARTITION },
                partitioning: 0,
                partitions: if name == "t" {
                    (0..2)
                        .map(|partition| PartitionMetadata {
                            partition,
                            error: ErrorCode::NONE,
                            leader: 1,
                            leader_epoch: 1,
                            replicas: vec![1],
                            isr: vec![1],
                            lineage: Default::default(),
                        })
                        .collect()
                } else {
                    vec![]
                },
                name,
            })
            .collect();
        MetadataResponse { brokers, controller: 1, topics }
    }

    fn add(&self, req: AddPartitionsToTxnRequest) -> AddPartitionsToTxnResponse {
        let busy = self.busy_adds.get() > 0;
        if busy {
            self.busy_adds.set(self.busy_adds.get() - 1);
        }
        let epoch_ok = req.producer_id == PRODUCER_ID && req.producer_epoch == self.epoch.get();
        if !busy {
            self.note(Event::Add(req.partitions.iter().map(|p| p.partition).collect(), req.producer_epoch));
        }
        let partitions = req
            .partitions
            .iter()
            .map(|p| {
                let error = match (busy, epoch_ok) {
                    (true, _) => ErrorCode::CONCURRENT_TRANSACTIONS,
                    (false, false) => ErrorCode::PRODUCER_FENCED,
                    (false, true) => {
                        self.added.borrow_mut().insert(p.partition);
                        ErrorCode::NONE
                    }
                };
                TxnPartitionResult { topic: p.topic.clone(), partition: p.partition, error }
            })
            .collect();
        AddPartitionsToTxnResponse { error: ErrorCode::NONE, message: String::new(), partitions }
    }

    fn produce(&self, req: ProduceRequest) -> ProduceResponse {
        assert_eq!(req.acks, -1, "transactional writes are acks=all");
        let partitions = req
            .partitions
            .into_iter()
            .map(|p| {
                let (error, base_offset) = match self.refuse_writes.get() {
                    Some(code) => (code, 0),
                    None => self.write(p.partition, &p.records),
                };
                ProducePartitionResponse {
                    topic: p.topic,
                    partition: p.partition,
                    error,
                    base_offset,
                    leader_epoch: 1,
                    log_start: 0,
                }
            })
            .collect();
        ProduceResponse { partitions }
    }

    /// Checks and appends one partition's batches as a transactional broker would.
    fn write(&self, partition: u32, records: &[u8]) -> (ErrorCode, u64) {
        let mut first = None;
        for batch in skein_log::batch::batches(records) {
            let h = *batch.expect("valid batch").header();
            assert!(h.attributes.is_transactional(), "a transactional producer's batch");
            assert_eq!(h.producer_id.0, PRODUCER_ID);
            if h.producer_epoch.0 < self.epoch.get() {
                return (ErrorCode::PRODUCER_FENCED, 0);
            }
            assert_eq!(h.producer_epoch.0, self.epoch.get(), "no write ahead of the coordinator's epoch");
            if !self.added.borrow().contains(&partition) {
                return (ErrorCode::INVALID_TXN_STATE, 0);
            }
            let mut sequences = self.sequences.borrow_mut();
            let next = sequences.entry(partition).or_insert(0);
            if h.base_sequence.0 != *next {
                return (ErrorCode::OUT_OF_ORDER_SEQUENCE, 0);
            }
            *next += h.record_count as i32;
            self.note(Event::Write(partition, h.producer_epoch.0, h.base_sequence.0, h.record_count));
            let mut ends = self.ends.borrow_mut();
            let end = ends.entry(partition).or_default();
            first.get_or_insert(*end);
            *end += u64::from(h.record_count) + 1; // room for a marker after each batch
        }
        (ErrorCode::NONE, first.unwrap_or(0))
    }

    fn end(&self, req: EndTxnRequest) -> EndTxnResponse {
        let answer = |error, producer_epoch| EndTxnResponse {
            error,
            message: String::new(),
            producer_id: PRODUCER_ID,
            producer_epoch,
        };
        self.note(Event::End(req.commit, req.producer_epoch));
        if req.producer_epoch + 1 == self.epoch.get() && self.last_end.get() == Some((req.commit, req.producer_epoch)) {
            return answer(ErrorCode::NONE, self.epoch.get()); // a retry of the end just made
        }
        if req.producer_epoch != self.epoch.get() {
            return answer(ErrorCode::PRODUCER_FENCED, -1);
        }
        self.last_end.set(Some((req.commit, req.producer_epoch)));
        self.epoch.set(self.epoch.get() + 1);
        self.added.borrow_mut().clear();
        self.sequences.borrow_mut().clear();
        if self.lost_ends.get() > 0 {
            self.lost_ends.set(self.lost_ends.get() - 1);
            return answer(ErrorCode::NOT_COORDINATOR, -1);
        }
        answer(ErrorCode::NONE, self.epoch.get())
    }
}

async fn start() -> Rc<Fake> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let fake = Rc::new(Fake::default());
    fake.port.set(listener.local_addr().expect("local addr").port());
    let serving = fake.clone();
    compio::runtime::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            compio::runtime::spawn(serve(stream, serving.clone())).detach();
        }
    })
    .detach();
    fake
}

/// Answers each request at once, in order.
async fn serve(stream: compio::net::TcpStream, fake: Rc<Fake>) {
    let (mut reader, mut writer) = stream.into_split();
    while let Ok(body) = read_frame(&mut reader, FRAME_BYTES_MAX_DEFAULT).await {
        let mut r = Reader::new(body);
        let Ok(header) = RequestHeader::decode(&mut r) else {
            return;
        };
        let frame = fake.answer(&header, r);
        if write_frames(&mut writer, vec![frame]).await.is_err() {
            return;
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    compio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async { compio::time::timeout(Duration::from_secs(20), f).await.expect("the test finished in time") })
}

async fn producer(fake: &Fake) -> TransactionalProducer {
    let client = Client::connect(&format!("127.0.0.1:{}", fake.port.get())).await.expect("connect");
    let mut config = TxnConfig::new("tx");
    config.producer = ProducerConfig { linger: Duration::from_millis(1), ..ProducerConfig::default() };
    config.coordinator_timeout = Duration::from_secs(5);
    TransactionalProducer::init(client, config).await.expect("init")
}

/// The events of kind Write, in order.
fn writes(events: &[Event]) -> Vec<Event> {
    events.iter().filter(|e| matches!(e, Event::Write(..))).cloned().collect()
}

/// Every partition is added before its first write in each epoch.
fn check_added_before_written(events: &[Event]) {
    let mut added: BTreeSet<(u32, i16)> = BTreeSet::new();
    for e in events {
        match e {
            Event::Add(ps, epoch) => added.extend(ps.iter().map(|&p| (p, *epoch))),
            Event::Write(p, epoch, ..) => {
                assert!(added.contains(&(*p, *epoch)), "write {e:?} before its add: {events:?}")
            }
            _ => {}
        }
    }
}

#[test]
fn each_transaction_adds_its_partitions_first_and_ends_with_a_new_epoch() {
    block_on(async {
        let fake = start().await;
        let mut p = producer(&fake).await;
        assert_eq!(p.identity(), (PRODUCER_ID, 0));
        p.begin().expect("begin");
        let a = p.send("t", Some(0), None, b"a").await.expect("queued");
        let b = p.send("t", Some(1), None, b"b").await.expect("queued");
        let c = p.send("t", Some(0), None, b"c").await.expect("queued");
        p.commit().await.expect("commit");
        assert_eq!((a.await, b.await), (Ok((0, 0)), Ok((1, 0))));
        assert!(c.await.is_ok());
        assert_eq!(p.identity(), (PRODUCER_ID, 1), "the next transaction has the next epoch");
        assert!(!p.in_transaction());
        p.begin().expect("begin");
        p.send("t", Some(1), None, b"d").await.expect("queued");
        p.commit().await.expect("commit");
        let events = fake.events();
        check_added_before_written(&events);
        // Sequences restart at 0 in every transaction.
        let w = writes(&events);
        assert!(w.contains(&Event::Write(1, 1, 0, 1)), "{events:?}");
        assert_eq!(w.iter().filter(|e| matches!(e, Event::Write(_, 0, 0, _))).count(), 2, "{events:?}");
        let ends: Vec<&Event> = events.iter().filter(|e| matches!(e, Event::End(..))).collect();
        assert_eq!(ends, vec![&Event::End(true, 0), &Event::End(true, 1)]);
        assert_eq!(p.identity(), (PRODUCER_ID, 2));
    });
}

#[test]
fn an_empty_transaction_commits_and_misuse_is_refused() {
    block_on(async {
        let fake = start().await;
        let mut p = producer(&fake).await;
        assert!(matches!(p.commit().await, Err(TxnError::Invalid(_))), "nothing to commit before begin");
        assert!(matches!(p.send("t", None, None, b"x").await, Err(TxnError::Invalid(_))), "no send before begin");
        p.begin().expect("begin");
        assert!(matches!(p.begin(), Err(TxnError::Invalid(_))), "one transaction at a time");
        let bad = p.send("t", Some(9), None, b"x").await.err();
        assert!(matches!(bad, Some(TxnError::Invalid(_))), "{bad:?}");
        p.commit().await.expect("an empty transaction commits");
        assert_eq!(fake.events(), vec![Event::End(true, 0)]);
    });
}

#[test]
fn a_refused_write_makes_the_transaction_abortable_and_abort_recovers() {
    block_on(async {
        let fake = start().await;
        let mut p = producer(&fake).await;
        p.begin().expect("begin");
        fake.refuse_writes.set(Some(ErrorCode::INVALID_TXN_STATE));
        let d = p.send("t", Some(0), None, b"lost").await.expect("queued");
        let e = p.commit().await.expect_err("cannot commit");
        assert!(e.is_abortable(), "{e:?}");
        assert_eq!(e.code_name(), "INVALID_TXN_STATE");
        assert!(d.await.is_err());
        assert!(p.send("t", Some(1), None, b"x").await.err().expect("doomed").is_abortable());
        fake.refuse_writes.set(None);
        p.abort().await.expect("abort");
        p.begin().expect("begin");
        let d = p.send("t", Some(0), None, b"next").await.expect("queued");
        p.commit().await.expect("the next transaction commits");
        assert!(d.await.is_ok());
        let events = fake.events();
        let ends: Vec<&Event> = events.iter().filter(|e| matches!(e, Event::End(..))).collect();
        assert_eq!(ends, vec![&Event::End(false, 0), &Event::End(true, 1)]);
        assert_eq!(writes(&events), vec![Event::Write(0, 1, 0, 1)], "only the second transaction wrote");
    });
}

#[test]
fn a_lost_end_answer_is_retried_with_the_same_epoch() {
    block_on(async {
        let fake = start().await;
        let mut p = producer(&fake).await;
        fake.lost_ends.set(1);
        p.begin().expect("begin");
        p.send("t", Some(0), None, b"a").await.expect("queued");
        p.commit().await.expect("commit, answered on the retry");
        let events = fake.events();
        let ends: Vec<&Event> = events.iter().filter(|e| matches!(e, Event::End(..))).collect();
        assert_eq!(ends, vec![&Event::End(true, 0), &Event::End(true, 0)], "the retry carries the same epoch");
        assert_eq!(p.identity(), (PRODUCER_ID, 1));
    });
}

#[test]
fn busy_adds_are_retried_and_offsets_go_with_the_transaction() {
    block_on(async {
        let fake = start().await;
        let mut p = producer(&fake).await;
        fake.busy_adds.set(2);
        p.begin().expect("begin");
        let d = p.send("t", Some(1), None, b"a").await.expect("queued");
        let group = GroupMetadata { group: "g".into(), member_id: "m".into(), member_epoch: 4 };
        p.send_offsets(&group, &[("in".into(), 3, 42)]).await.expect("offsets");
        p.send_offsets(&group, &[("in".into(), 3, 43)]).await.expect("offsets again");
        p.commit().await.expect("commit");
        assert!(d.await.is_ok());
        assert_eq!(p.partitions(), Vec::<(String, u32)>::new(), "the next transaction starts empty");
        let events = fake.events();
        check_added_before_written(&events);
        assert_eq!(
            events.iter().filter(|e| !matches!(e, Event::Write(..) | Event::Add(..))).cloned().collect::<Vec<_>>(),
            vec![
                Event::AddOffsets("g".into(), 0),
                Event::Offsets("g".into(), 0, 4, vec![(3, 42)]),
                Event::Offsets("g".into(), 0, 4, vec![(3, 43)]),
                Event::End(true, 0),
            ],
            "the group joins the transaction once"
        );
    });
}

#[test]
fn a_fenced_producer_stays_dead() {
    block_on(async {
        let fake = start().await;
        let mut p = producer(&fake).await;
        p.begin().expect("begin");
        fake.refuse_writes.set(Some(ErrorCode::PRODUCER_FENCED));
        p.send("t", Some(0), None, b"a").await.expect("queued");
        let e = p.commit().await.expect_err("fenced");
        assert!(matches!(e, TxnError::Fenced(_)), "{e:?}");
        assert!(e.is_fatal());
        assert!(matches!(p.abort().await, Err(TxnError::Fenced(_))));
        assert!(matches!(p.begin(), Err(TxnError::Fenced(_))));
    });
}
