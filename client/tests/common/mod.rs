//! Helpers for the client's integration tests: a real single-node `skein-broker` process,
//! and tiny fake brokers speaking the wire protocol with scripted behaviour (to stage leader
//! changes a single node cannot).
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;

use bytes::BytesMut;
use compio::net::TcpListener;
use skein_client::wire::io::{read_frame, write_frames};
use skein_client::wire::{
    decode_exact, response_frame, ApiKey, BrokerInfo, ErrorCode, FetchPartitionResponse, FetchRequest, FetchResponse,
    InitProducerIdResponse, MetadataResponse, PartitionMetadata, ProducePartitionResponse, ProduceRequest,
    ProduceResponse, Reader, RequestHeader, TopicMetadata, FRAME_BYTES_MAX_DEFAULT,
};

/// A real broker process on a temporary directory; killed on drop.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: PathBuf,
}

impl Broker {
    /// Starts `skein-broker --listen 127.0.0.1:0` and waits for its `ready ADDR` line.
    pub fn start() -> Broker {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("skein-client-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("data dir");
        let (child, addr) = spawn(&dir, "127.0.0.1:0").expect("skein-broker started");
        Broker { child, addr, dir }
    }

    /// Kills the process (SIGKILL) and starts a new one on the same directory and port.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for attempt in 0..50 {
            // The old socket may linger briefly; retry the bind.
            if let Some((child, _)) = spawn(&self.dir, &self.addr) {
                self.child = child;
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20 * (attempt + 1)));
        }
        panic!("broker did not restart on {}", self.addr);
    }
}

fn spawn(dir: &Path, listen: &str) -> Option<(Child, String)> {
    let mut child = Command::new(broker_binary())
        .args(["--listen", listen, "--data-dir"])
        .arg(dir)
        .env("SKEIN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start skein-broker");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    match line.trim().strip_prefix("ready ") {
        Some(addr) if read.is_ok() => Some((child, addr.to_owned())),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `skein-broker` binary next to this test's (`target/<profile>/`), built first if it
/// is not there (`cargo test -p skein-client` alone does not build other packages' binaries).
fn broker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir: &Path = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join(format!("skein-broker{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "skein-broker", "--bin", "skein-broker"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building skein-broker failed");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// What the fake cluster says in Metadata: every fake answers the same.
#[derive(Debug)]
pub struct View {
    /// `(node id, port)` of every fake.
    pub nodes: Vec<(u32, u16)>,
    /// Leader of every partition of topic `t` (0: none).
    pub leader: u32,
    /// Its epoch.
    pub epoch: u32,
    /// Partitions of topic `t`.
    pub partitions: u32,
    /// In-sync replicas of every partition (`None`: every fake).
    pub isr: Option<Vec<u32>>,
    /// Racks by node id (nodes not listed have none).
    pub racks: HashMap<u32, String>,
}

impl View {
    fn metadata(&self, topics: Option<Vec<String>>) -> MetadataResponse {
        let names = topics.unwrap_or_else(|| vec!["t".into()]);
        MetadataResponse {
            brokers: self
                .nodes
                .iter()
                .map(|&(node_id, port)| BrokerInfo {
                    node_id,
                    host: "127.0.0.1".into(),
                    port,
                    rack: self.racks.get(&node_id).cloned().unwrap_or_default(),
                })
                .collect(),
            controller: self.nodes[0].0,
            topics: names
                .into_iter()
                .map(|name| {
                    if name != "t" {
                        return TopicMetadata {
                            name,
                            error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                            partitioning: 0,
                            partitions: vec![],
                        };
                    }
                    let partitions = (0..self.partitions)
                        .map(|partition| PartitionMetadata {
                            partition,
                            error: if self.leader == 0 { ErrorCode::NOT_LEADER } else { ErrorCode::NONE },
                            leader: self.leader,
                            leader_epoch: self.epoch,
                            replicas: self.nodes.iter().map(|n| n.0).collect(),
                            isr: self.isr.clone().unwrap_or_else(|| self.nodes.iter().map(|n| n.0).collect()),
                            lineage: Default::default(),
                        })
                        .collect();
                    TopicMetadata { name, error: ErrorCode::NONE, partitioning: 0, partitions }
                })
                .collect(),
        }
    }
}

/// How a fake answers Produce and Fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Leads: appends (counting offsets per partition) and serves fetches.
    Lead,
    /// Answers NOT_LEADER, and moves the cluster's leadership to `to` (new epoch).
    NotLeader { to: u32 },
    /// Never answers a Produce or Fetch (nor anything after it on that connection), and
    /// moves the leadership to `to`.
    Silent { to: u32 },
    /// A follower: serves fetches with `replica_read` set (the same data as a leader),
    /// answers NOT_LEADER to other fetches and to Produce, and moves no leadership.
    Follow,
}

/// What a fake saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// Metadata requests.
    pub metadata: Cell<usize>,
    /// Produce requests.
    pub produces: Cell<usize>,
    /// Records appended (Lead only).
    pub records: Cell<usize>,
    /// Fetch requests.
    pub fetches: Cell<usize>,
    /// Every Fetch request, as decoded.
    pub fetch_requests: RefCell<Vec<FetchRequest>>,
    /// Connections the client closed.
    pub closed: Cell<usize>,
    /// Most Produce requests read and not yet answered at once (on one connection).
    pub max_outstanding: Cell<usize>,
    /// Records in each Produce request, in arrival order.
    pub produce_records: RefCell<Vec<usize>>,
    /// Record values appended (Lead only), per partition, in log order.
    pub values: RefCell<HashMap<u32, Vec<Vec<u8>>>>,
}

/// One fake broker.
pub struct Fake {
    /// Node id.
    pub node: u32,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// What it saw.
    pub seen: Rc<Seen>,
    /// How it answers fetches (changeable while it runs).
    pub script: Rc<Script>,
}

/// Knobs for a fake's Fetch answers.
#[derive(Default, Debug)]
pub struct Script {
    /// Answer this many partition reads NOT_CAUGHT_UP (no records) before serving again.
    pub not_caught_up: Cell<usize>,
    /// The high watermark to report (default: 1 with a fetch batch, else 0).
    pub high_watermark: Cell<Option<u64>>,
    /// `token_wait_us` to report.
    pub token_wait_us: Cell<u32>,
    /// Hold every Produce answer this long (answers stay in request order; later requests
    /// are read meanwhile).
    pub hold_produce_ms: Cell<u64>,
    /// Answer these Produce requests (counting from 1 on this fake) NOT_LEADER, appending
    /// nothing and moving no leadership.
    pub refuse_produce: RefCell<Vec<usize>>,
}

impl Fake {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Starts fakes with these node ids and behaviours, sharing one view whose leader is
/// `leader` at epoch 1. Call inside a compio runtime; they serve until it ends.
pub async fn fake_cluster(
    nodes: &[(u32, Behaviour)],
    leader: u32,
    partitions: u32,
    fetch_batch: Option<Vec<u8>>,
) -> (Vec<Fake>, Rc<RefCell<View>>) {
    let view =
        Rc::new(RefCell::new(View { nodes: vec![], leader, epoch: 1, partitions, isr: None, racks: HashMap::new() }));
    let mut fakes = Vec::new();
    for &(node, behaviour) in nodes {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        view.borrow_mut().nodes.push((node, port));
        let seen = Rc::new(Seen::default());
        let script = Rc::new(Script::default());
        let state = Rc::new(FakeState {
            node,
            behaviour,
            view: view.clone(),
            seen: seen.clone(),
            script: script.clone(),
            ends: RefCell::default(),
            fetch_batch: fetch_batch.clone(),
            sequences: RefCell::default(),
        });
        compio::runtime::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                compio::runtime::spawn(serve(stream, state.clone())).detach();
            }
        })
        .detach();
        fakes.push(Fake { node, port, seen, script });
    }
    (fakes, view)
}

struct FakeState {
    node: u32,
    behaviour: Behaviour,
    view: Rc<RefCell<View>>,
    seen: Rc<Seen>,
    script: Rc<Script>,
    /// Next offset per partition (Lead).
    ends: RefCell<HashMap<u32, u64>>,
    /// One batch (base offset 0) served to fetches at offset 0 (Lead).
    fetch_batch: Option<Vec<u8>>,
    /// Idempotence, as a broker checks it (Lead): per (producer id, partition) the next
    /// sequence and the offset each appended sequence went to.
    sequences: RefCell<HashMap<(i64, u32), Sequences>>,
}

/// A producer's next sequence on a partition, and the offset each appended sequence went to.
type Sequences = (i32, HashMap<i32, u64>);

impl FakeState {
    fn move_leadership(&self, to: u32) {
        let mut view = self.view.borrow_mut();
        if view.leader != to {
            view.leader = to;
            view.epoch += 1;
        }
    }
}

async fn serve(stream: compio::net::TcpStream, st: Rc<FakeState>) {
    let (mut reader, mut writer) = stream.into_split();
    // Answers go out in request order from a writer task, each no earlier than its time, so
    // a held answer lets the reader take later requests meanwhile (pipelining).
    let (tx, rx) = flume::unbounded::<(std::time::Instant, bool, Vec<u8>)>();
    let outstanding = Rc::new(Cell::new(0usize));
    let writer_task = {
        let outstanding = outstanding.clone();
        compio::runtime::spawn(async move {
            while let Ok((at, produce, frame)) = rx.recv_async().await {
                let wait = at.saturating_duration_since(std::time::Instant::now());
                if !wait.is_zero() {
                    compio::time::sleep(wait).await;
                }
                if produce {
                    outstanding.set(outstanding.get() - 1);
                }
                if write_frames(&mut writer, vec![frame]).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut silent = false;
    while let Ok(body) = read_frame(&mut reader, FRAME_BYTES_MAX_DEFAULT).await {
        if silent {
            continue; // read and drop until the client closes
        }
        let mut r = Reader::new(body);
        let Ok(header) = RequestHeader::decode(&mut r) else {
            break;
        };
        let id = header.correlation_id;
        let mut at = std::time::Instant::now();
        let mut is_produce = false;
        let frame = match header.api_key {
            ApiKey::Metadata => {
                st.seen.metadata.set(st.seen.metadata.get() + 1);
                let req: skein_client::wire::MetadataRequest = decode_exact(r).expect("metadata request");
                response_frame(id, Ok(&st.view.borrow().metadata(req.topics)))
            }
            ApiKey::InitProducerId => response_frame(
                id,
                Ok(&InitProducerIdResponse {
                    error: ErrorCode::NONE,
                    message: String::new(),
                    producer_id: 7,
                    producer_epoch: 0,
                }),
            ),
            ApiKey::Produce => {
                st.seen.produces.set(st.seen.produces.get() + 1);
                let req: ProduceRequest = decode_exact(r).expect("produce request");
                let records = req
                    .partitions
                    .iter()
                    .flat_map(|p| skein_log::batch::batches(&p.records))
                    .map(|b| b.map_or(0, |b| b.header().offset_count() as usize))
                    .sum();
                st.seen.produce_records.borrow_mut().push(records);
                match st.behaviour {
                    Behaviour::Silent { to } => {
                        st.move_leadership(to);
                        silent = true;
                        continue;
                    }
                    Behaviour::NotLeader { to } => st.move_leadership(to),
                    Behaviour::Lead | Behaviour::Follow => {}
                }
                is_produce = true;
                outstanding.set(outstanding.get() + 1);
                st.seen.max_outstanding.set(st.seen.max_outstanding.get().max(outstanding.get()));
                at += std::time::Duration::from_millis(st.script.hold_produce_ms.get());
                let refused = st.script.refuse_produce.borrow().contains(&st.seen.produces.get());
                response_frame(id, Ok(&produce(&st, req, refused)))
            }
            ApiKey::Fetch => {
                st.seen.fetches.set(st.seen.fetches.get() + 1);
                let req: FetchRequest = decode_exact(r).expect("fetch request");
                st.seen.fetch_requests.borrow_mut().push(req.clone());
                match st.behaviour {
                    Behaviour::Silent { to } => {
                        st.move_leadership(to);
                        silent = true;
                        continue;
                    }
                    Behaviour::NotLeader { to } => st.move_leadership(to),
                    Behaviour::Lead | Behaviour::Follow => {}
                }
                let resp = fetch(&st, &req);
                if resp.partitions.iter().all(|p| p.records.is_empty()) {
                    // A short long poll.
                    compio::time::sleep(std::time::Duration::from_millis(u64::from(req.max_wait_ms.min(50)))).await;
                }
                response_frame(id, Ok(&resp))
            }
            _ => response_frame::<MetadataResponse>(id, Err(ErrorCode::UNSUPPORTED_VERSION)),
        };
        if tx.send((at, is_produce, frame)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer_task.await;
    st.seen.closed.set(st.seen.closed.get() + 1);
}

fn produce(st: &FakeState, req: ProduceRequest, refused: bool) -> ProduceResponse {
    let leads = st.behaviour == Behaviour::Lead && !refused;
    let partitions = req
        .partitions
        .into_iter()
        .map(|p| {
            let (error, base_offset) =
                if leads { append(st, p.partition, &p.records) } else { (ErrorCode::NOT_LEADER, 0) };
            ProducePartitionResponse {
                topic: p.topic,
                partition: p.partition,
                error,
                base_offset,
                leader_epoch: st.view.borrow().epoch,
                log_start: 0,
            }
        })
        .collect();
    ProduceResponse { partitions }
}

/// Appends a partition's batches as a broker would: a producer's batch only at its next
/// sequence (a gap is OUT_OF_ORDER_SEQUENCE, a sequence already written is answered with its
/// offset and appended again never). Returns the error and the first batch's offset.
fn append(st: &FakeState, partition: u32, records: &[u8]) -> (ErrorCode, u64) {
    let mut first = None;
    for batch in skein_log::batch::batches(records) {
        let batch = batch.expect("valid batch");
        let h = *batch.header();
        let count = h.offset_count();
        if h.producer_id.0 >= 0 {
            let mut seqs = st.sequences.borrow_mut();
            let known = seqs.contains_key(&(h.producer_id.0, partition));
            let (next, offsets) =
                seqs.entry((h.producer_id.0, partition)).or_insert((h.base_sequence.0, HashMap::new()));
            if known && h.base_sequence.0 < *next {
                match offsets.get(&h.base_sequence.0) {
                    Some(&o) => {
                        first.get_or_insert(o);
                        continue;
                    }
                    None => return (ErrorCode::OUT_OF_ORDER_SEQUENCE, 0),
                }
            }
            if h.base_sequence.0 != *next {
                return (ErrorCode::OUT_OF_ORDER_SEQUENCE, 0);
            }
            let base = st.ends.borrow().get(&partition).copied().unwrap_or(0);
            offsets.insert(h.base_sequence.0, base);
            *next = h.base_sequence.0.wrapping_add(count as i32);
        }
        st.seen.records.set(st.seen.records.get() + count as usize);
        let mut ends = st.ends.borrow_mut();
        let end = ends.entry(partition).or_default();
        first.get_or_insert(*end);
        *end += count;
        let mut values = st.seen.values.borrow_mut();
        let log = values.entry(partition).or_default();
        log.extend(batch.records().iter().map(|r| r.value.to_vec()));
    }
    (ErrorCode::NONE, first.unwrap_or(0))
}

fn fetch(st: &FakeState, req: &FetchRequest) -> FetchResponse {
    let serves = st.behaviour == Behaviour::Lead || (st.behaviour == Behaviour::Follow && req.replica_read);
    let partitions = req
        .partitions
        .iter()
        .map(|p| {
            let behind = serves && st.script.not_caught_up.get() > 0;
            if behind {
                st.script.not_caught_up.set(st.script.not_caught_up.get() - 1);
            }
            let serves = serves && !behind;
            let records = match (&st.fetch_batch, serves && p.fetch_offset == 0) {
                (Some(batch), true) => BytesMut::from(&batch[..]),
                _ => BytesMut::new(),
            };
            let error = match (serves, behind) {
                (true, _) => ErrorCode::NONE,
                (false, true) => ErrorCode::NOT_CAUGHT_UP,
                (false, false) => ErrorCode::NOT_LEADER,
            };
            FetchPartitionResponse {
                topic: p.topic.clone(),
                partition: p.partition,
                error,
                high_watermark: st.script.high_watermark.get().unwrap_or(u64::from(st.fetch_batch.is_some())),
                leader_epoch: st.view.borrow().epoch,
                log_start: 0,
                token_wait_us: st.script.token_wait_us.get(),
                last_stable: st.script.high_watermark.get().unwrap_or(u64::from(st.fetch_batch.is_some())),
                aborted: Vec::new(),
                records,
            }
        })
        .collect();
    FetchResponse { partitions }
}
