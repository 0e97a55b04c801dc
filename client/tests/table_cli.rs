//! The `skein table` and `skein txn --table` commands: usage errors (no broker needed), and
//! their behaviour against a fake broker that speaks the table protocol with a trivial
//! store (no validation: it commits what it is sent, except scripted aborts), so what is
//! checked here is the client's side: routing, buffering, merging, two-phase commit
//! messages and the CLI's answer lines. Isolation itself is tested against real brokers.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use compio::net::TcpListener;
use skein_client::wire::io::{read_frame, write_frames};
use skein_client::wire::{
    decode_exact, response_frame, AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey, BrokerInfo,
    CreateTopicsRequest, CreateTopicsResponse, DescribeTopicsRequest, DescribeTopicsResponse, EndTxnRequest,
    EndTxnResponse, ErrorCode, FindCoordinatorResponse, InitProducerIdResponse, MetadataRequest, MetadataResponse,
    PartitionDescription, PartitionMetadata, Reader, RequestHeader, TableAbortRequest, TableAbortResponse,
    TableCommitRequest, TableCommitResponse, TableLockRequest, TableLockResponse, TableReadRequest, TableReadResponse,
    TableRow, TopicConfig, TopicDescription, TopicMetadata, TopicResult, TxnPartitionResult, FRAME_BYTES_MAX_DEFAULT,
};

const PARTITIONS: u32 = 4;

/// Runs `skein ARGS...` against `brokers` with `stdin`.
fn skein(brokers: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein"))
        .args(["--brokers", brokers])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("skein ran");
    // A command that fails early does not read its input: a broken pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(stdin.as_bytes());
    child.wait_with_output().expect("skein ended")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command is refused as a usage error (status 2) naming `mentions` on stderr.
fn check_usage_error(args: &[&str], mentions: &str) {
    let out = skein("127.0.0.1:1", args, "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
}

#[test]
fn table_usage_errors_exit_2() {
    check_usage_error(&["txn"], "--table");
    check_usage_error(&["txn", "--table", "t", "list"], "list");
    check_usage_error(&["txn", "--isolation", "ssi"], "--table");
    check_usage_error(&["txn", "--table", "t", "--isolation", "chaos"], "unknown isolation level chaos");
    check_usage_error(&["table", "create", "t", "--isolation", "chaos"], "unknown isolation level chaos");
    check_usage_error(&["table", "get", "t"], "<KEY>");
    check_usage_error(&["table", "put", "t", "k"], "<VALUE>");
    check_usage_error(&["table", "frobnicate"], "frobnicate");
}

#[test]
fn table_commands_without_a_broker_fail_with_status_1() {
    for args in [&["table", "get", "t", "k"][..], &["txn", "--table", "t"], &["table", "create", "t"]] {
        let out = skein("127.0.0.1:1", args, "begin\n");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// What the fake saw: one line per table request, e.g. `commit 2 pid=-1 writes=a`.
type Log = Arc<Mutex<Vec<String>>>;

/// Starts the fake on a thread of its own; its address and log.
fn fake() -> (String, Log) {
    let log: Log = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let seen = log.clone();
    std::thread::spawn(move || {
        compio::runtime::Runtime::new().expect("runtime").block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            tx.send(port).expect("port sent");
            let state = std::rc::Rc::new(std::cell::RefCell::new(Store { port, log: seen, ..Store::default() }));
            while let Ok((stream, _)) = listener.accept().await {
                compio::runtime::spawn(serve(stream, state.clone())).detach();
            }
        });
    });
    let port = rx.recv().expect("fake started");
    (format!("127.0.0.1:{port}"), log)
}

/// A partition's rows: key -> (value, version).
type Rows = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;
/// Writes (None: delete).
type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

#[derive(Default)]
struct Store {
    port: u16,
    log: Log,
    /// Tables created (name -> configs); `t` (a table) and `plain` (not) always exist.
    created: HashMap<String, Vec<TopicConfig>>,
    /// Per partition: key -> (value, version), and the next offset.
    rows: HashMap<u32, Rows>,
    ends: HashMap<u32, u64>,
    /// Prepared writes by producer id.
    prepared: HashMap<i64, Vec<(u32, Writes)>>,
}

impl Store {
    fn note(&self, line: String) {
        self.log.lock().expect("log").push(line);
    }

    fn configs(&self, name: &str) -> Option<Vec<TopicConfig>> {
        let c = |k: &str, v: &str| TopicConfig { key: k.into(), value: v.into() };
        match name {
            "t" => Some(vec![c("table", "true")]),
            "plain" => Some(vec![c("retention.ms", "1000")]),
            other => self.created.get(other).cloned(),
        }
    }

    fn apply(&mut self, partition: u32, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> u64 {
        let end = self.ends.entry(partition).or_default();
        let offset = *end;
        *end += 1;
        let rows = self.rows.entry(partition).or_default();
        for (k, v) in writes {
            match v {
                Some(v) => rows.insert(k, (v, offset as i64)),
                None => rows.remove(&k),
            };
        }
        offset
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn serve(stream: compio::net::TcpStream, st: std::rc::Rc<std::cell::RefCell<Store>>) {
    let (mut reader, mut writer) = stream.into_split();
    while let Ok(body) = read_frame(&mut reader, FRAME_BYTES_MAX_DEFAULT).await {
        let mut r = Reader::new(body);
        let Ok(header) = RequestHeader::decode(&mut r) else { break };
        let frame = respond(&mut st.borrow_mut(), header, r);
        if write_frames(&mut writer, vec![frame]).await.is_err() {
            break;
        }
    }
}

/// The answer to one request.
fn respond(st: &mut Store, header: RequestHeader, r: Reader) -> Vec<u8> {
    let id = header.correlation_id;
    match header.api_key {
        ApiKey::Metadata => {
            let req: MetadataRequest = decode_exact(r).expect("metadata");
            let topics = req.topics.unwrap_or_default().into_iter().map(|name| {
                if st.configs(&name).is_none() {
                    return TopicMetadata {
                        name,
                        error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                        partitioning: 0,
                        partitions: vec![],
                    };
                }
                let partitions = (0..PARTITIONS)
                    .map(|partition| PartitionMetadata {
                        partition,
                        error: ErrorCode::NONE,
                        leader: 1,
                        leader_epoch: 1,
                        replicas: vec![1],
                        isr: vec![1],
                        lineage: Default::default(),
                    })
                    .collect();
                TopicMetadata { name, error: ErrorCode::NONE, partitioning: 0, partitions }
            });
            let brokers = vec![BrokerInfo { node_id: 1, host: "127.0.0.1".into(), port: st.port, rack: String::new() }];
            response_frame(id, Ok(&MetadataResponse { brokers, controller: 1, topics: topics.collect() }))
        }
        ApiKey::DescribeTopics => {
            let req: DescribeTopicsRequest = decode_exact(r).expect("describe");
            let topics = req
                .names
                .into_iter()
                .map(|name| match st.configs(&name) {
                    None => TopicDescription {
                        name,
                        error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                        partitioning: 0,
                        configs: vec![],
                        partitions: vec![],
                    },
                    Some(configs) => TopicDescription {
                        name,
                        error: ErrorCode::NONE,
                        partitioning: 0,
                        configs,
                        partitions: (0..PARTITIONS)
                            .map(|partition| PartitionDescription {
                                partition,
                                error: ErrorCode::NONE,
                                leader: 1,
                                leader_epoch: 1,
                                replicas: vec![1],
                                isr: vec![1],
                                log_start: 0,
                                high_watermark: 0,
                                log_end: 0,
                                last_stable: 0,
                                lineage: Default::default(),
                            })
                            .collect(),
                    },
                })
                .collect();
            response_frame(id, Ok(&DescribeTopicsResponse { topics }))
        }
        ApiKey::CreateTopics => {
            let req: CreateTopicsRequest = decode_exact(r).expect("create");
            let results = req
                .topics
                .into_iter()
                .map(|t| {
                    let shown: Vec<String> = t.configs.iter().map(|c| format!("{}={}", c.key, c.value)).collect();
                    st.note(format!("create {} {} {} {}", t.name, t.partitions, t.replicas, shown.join(",")));
                    st.created.insert(t.name.clone(), t.configs);
                    TopicResult { name: t.name, error: ErrorCode::NONE, message: String::new() }
                })
                .collect();
            response_frame(id, Ok(&CreateTopicsResponse { results }))
        }
        ApiKey::FindCoordinator => {
            let resp = FindCoordinatorResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                node_id: 1,
                host: "127.0.0.1".into(),
                port: st.port,
            };
            response_frame(id, Ok(&resp))
        }
        ApiKey::InitProducerId => {
            st.note("init-producer".into());
            let resp = InitProducerIdResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                producer_id: 42,
                producer_epoch: 0,
            };
            response_frame(id, Ok(&resp))
        }
        ApiKey::AddPartitionsToTxn => {
            let req: AddPartitionsToTxnRequest = decode_exact(r).expect("add partitions");
            let mut ps: Vec<u32> = req.partitions.iter().map(|p| p.partition).collect();
            ps.sort();
            st.note(format!("add-partitions {ps:?}"));
            let partitions = req
                .partitions
                .into_iter()
                .map(|p| TxnPartitionResult { topic: p.topic, partition: p.partition, error: ErrorCode::NONE })
                .collect();
            response_frame(
                id,
                Ok(&AddPartitionsToTxnResponse { error: ErrorCode::NONE, message: String::new(), partitions }),
            )
        }
        ApiKey::EndTxn => {
            let req: EndTxnRequest = decode_exact(r).expect("end txn");
            st.note(format!("end-txn commit={}", req.commit));
            let prepared = st.prepared.remove(&req.producer_id).unwrap_or_default();
            if req.commit {
                for (p, writes) in prepared {
                    st.apply(p, writes);
                }
            }
            let resp = EndTxnResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                producer_id: req.producer_id,
                producer_epoch: req.producer_epoch + 1,
            };
            response_frame(id, Ok(&resp))
        }
        ApiKey::TableRead => {
            let req: TableReadRequest = decode_exact(r).expect("table read");
            let keys: Vec<String> = req.keys.iter().map(|k| text(k)).collect();
            st.note(format!("read {} keys={} range={}", req.partition, keys.join(","), req.range.is_some()));
            let rows = st.rows.get(&req.partition).cloned().unwrap_or_default();
            let mut out: Vec<TableRow> = req
                .keys
                .iter()
                .map(|k| {
                    let found = rows.get(&k[..]);
                    TableRow {
                        key: k.clone(),
                        value: found.map(|(v, _)| BytesMut::from(&v[..])),
                        version: found.map_or(-1, |(_, o)| *o),
                    }
                })
                .collect();
            if let Some(range) = &req.range {
                for (k, (v, o)) in &rows {
                    if k[..] >= range.from[..] && (range.to.is_empty() || k[..] < range.to[..]) {
                        out.push(TableRow {
                            key: BytesMut::from(&k[..]),
                            value: Some(BytesMut::from(&v[..])),
                            version: *o,
                        });
                    }
                }
            }
            let snapshot = st.ends.get(&req.partition).copied().unwrap_or(0);
            response_frame(
                id,
                Ok(&TableReadResponse { error: ErrorCode::NONE, message: String::new(), snapshot, rows: out }),
            )
        }
        ApiKey::TableLock => {
            let req: TableLockRequest = decode_exact(r).expect("table lock");
            let keys: Vec<String> = req.keys.iter().map(|k| text(k)).collect();
            st.note(format!("lock {} {}", req.partition, keys.join(",")));
            let (error, message) = if keys.iter().any(|k| k == "wound-me") {
                (ErrorCode::TABLE_TXN_ABORTED, "wounded".to_owned())
            } else {
                (ErrorCode::NONE, String::new())
            };
            response_frame(id, Ok(&TableLockResponse { error, message }))
        }
        ApiKey::TableAbort => {
            let req: TableAbortRequest = decode_exact(r).expect("table abort");
            st.note(format!("abort {}", req.partition));
            response_frame(id, Ok(&TableAbortResponse { error: ErrorCode::NONE, message: String::new() }))
        }
        ApiKey::TableCommit => {
            let req: TableCommitRequest = decode_exact(r).expect("table commit");
            let rec = &req.record;
            let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                rec.writes.iter().map(|w| (w.key.to_vec(), w.value.as_ref().map(|v| v.to_vec()))).collect();
            let shown: Vec<String> = writes.iter().map(|(k, _)| text(k)).collect();
            let reads: Vec<String> = rec.reads.iter().map(|e| format!("{}@{}", text(&e.key), e.version)).collect();
            st.note(format!(
                "commit {} pid={} level={} reads={} ranges={} writes={}",
                req.partition,
                req.producer_id,
                rec.level,
                reads.join(","),
                rec.ranges.len(),
                shown.join(",")
            ));
            let mut resp = TableCommitResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                outcome: 0,
                offset: 0,
                reason: String::new(),
                results: vec![],
            };
            if shown.iter().any(|k| k == "abort-me") {
                resp.outcome = 1;
                resp.reason = "write-conflict".into();
            } else if writes.is_empty() {
                resp.offset = st.ends.get(&req.partition).copied().unwrap_or(0);
            } else if req.producer_id >= 0 {
                let offset = {
                    let end = st.ends.entry(req.partition).or_default();
                    let o = *end;
                    *end += 1;
                    o
                };
                st.prepared.entry(req.producer_id).or_default().push((req.partition, writes));
                resp.outcome = 2;
                resp.offset = offset;
            } else {
                resp.offset = st.apply(req.partition, writes);
            }
            response_frame(id, Ok(&resp))
        }
        _ => response_frame::<MetadataResponse>(id, Err(ErrorCode::UNSUPPORTED_VERSION)),
    }
}

/// Keys of `t` in pairwise different partitions, and one more in the first's partition.
fn keys() -> (String, String, String) {
    let p = |k: &str| skein_client::key_partition(k.as_bytes(), PARTITIONS);
    let a = "a".to_owned();
    let b = (0..100).map(|i| format!("b{i}")).find(|k| p(k) != p(&a)).expect("a key elsewhere");
    let a2 = (0..100).map(|i| format!("a{i}")).find(|k| p(k) == p(&a)).expect("a key with a");
    (a, b, a2)
}

fn log_lines(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().expect("log"))
}

#[test]
fn table_commands_answer_one_line_each() {
    let (addr, log) = fake();
    let out = skein(
        &addr,
        &["table", "create", "accounts", "--partitions", "3", "--replicas", "2", "--isolation", "2pl"],
        "",
    );
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "created accounts\n"));
    assert_eq!(log_lines(&log), vec!["create accounts 3 2 table=true,table.isolation=2pl"]);

    let out = skein(&addr, &["table", "put", "t", "k1", "v1"], "");
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "ok\n"));
    let p = skein_client::key_partition(b"k1", PARTITIONS);
    assert_eq!(log_lines(&log), vec![format!("commit {p} pid=-1 level=2 reads= ranges=0 writes=k1")]);
    let out = skein(&addr, &["table", "get", "t", "k1"], "");
    assert_eq!(stdout(&out), "value k1 v1\n");
    let out = skein(&addr, &["table", "get", "t", "nope"], "");
    assert_eq!(stdout(&out), "value nope nil\n");
    for (k, v) in [("k3", "v3"), ("k2", "v2"), ("z", "last")] {
        assert_eq!(stdout(&skein(&addr, &["table", "put", "t", k, v], "")), "ok\n");
    }
    assert_eq!(stdout(&skein(&addr, &["table", "delete", "t", "k3"], "")), "ok\n");
    log_lines(&log);
    let out = skein(&addr, &["table", "scan", "t", "k", "y"], "");
    assert_eq!(stdout(&out), "row k1 v1\nrow k2 v2\nend\n");
    let reads = log_lines(&log).into_iter().filter(|l| l.starts_with("read ")).count();
    assert_eq!(reads, PARTITIONS as usize, "a scan asks every partition");
    assert_eq!(stdout(&skein(&addr, &["table", "scan", "t", "k2"], "")), "row k2 v2\nrow z last\nend\n");

    for (name, mentions) in [("plain", "is not a table"), ("missing", "not found")] {
        let out = skein(&addr, &["table", "get", name, "k"], "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(mentions), "{stderr}");
        assert!(out.stdout.is_empty());
        let out = skein(&addr, &["txn", "--table", name], "begin\n");
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn txn_sessions_buffer_merge_and_commit() {
    let (addr, log) = fake();
    let (a, b, a2) = keys();
    let long = "k".repeat(1025);
    let input = format!(
        "get {a}\nbegin\nbegin\n\nput {a} one two\nget {a}\nput {long} x\nput {b} 2\nscan \"\" \"\"\ndelete {b}\nscan\nfrobnicate\nbegin chaos\ncommit\nget {a}\n"
    );
    let out = skein(&addr, &["txn", "--table", "t"], &input);
    let expect = [
        "error no transaction (begin first)".to_owned(),
        "ok".into(),
        "error a transaction is open".into(),
        "ok".into(),
        format!("value {a} one two"),
        "error key of 1025 bytes is longer than the 1024 allowed".into(),
        "ok".into(),
        format!("row {a} one two"),
        format!("row {b} 2"),
        "end".into(),
        "ok".into(),
        format!("row {a} one two"),
        "end".into(),
        "error unknown command frobnicate (begin, get, put, delete, scan, commit, abort)".into(),
        "error unknown isolation level chaos".into(),
    ];
    let got = stdout(&out);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines[..expect.len()], expect.iter().map(String::as_str).collect::<Vec<_>>()[..], "{got}");
    // Two partitions written (a put, then a delete): a two-phase commit.
    assert!(lines[expect.len()].starts_with("committed "), "{got}");
    assert_eq!(lines[expect.len() + 1], "error no transaction (begin first)");
    assert_eq!(lines.len(), expect.len() + 2);
    let seen = log_lines(&log);
    assert!(!seen.iter().any(|l| l.starts_with(&format!("read {} keys={a}", skein_client::key_partition(a.as_bytes(), PARTITIONS)))), "own writes are read from the buffer: {seen:?}");
    let commits: Vec<&String> = seen.iter().filter(|l| l.starts_with("commit ")).collect();
    assert_eq!(commits.len(), PARTITIONS as usize, "every partition scanned takes part: {seen:?}");
    assert!(commits.iter().all(|l| l.contains("pid=42") && l.contains("ranges=2")), "{seen:?}");
    assert!(seen.contains(&"end-txn commit=true".to_owned()), "{seen:?}");
    assert!(seen.iter().any(|l| l.starts_with("add-partitions")), "{seen:?}");

    // Committed: visible to the next transaction; a key read twice is recorded once; a
    // scripted abort ends the transaction; at EOF an open transaction is aborted.
    let input =
        format!("begin\nget {a}\nget {a}\nget {a2}\ncommit\nbegin\nput abort-me 1\ncommit\nget {a}\nbegin\nget {b}\n");
    let out = skein(&addr, &["txn", "--table", "t"], &input);
    assert_eq!(
        stdout(&out),
        format!(
            "ok\nvalue {a} one two\nvalue {a} one two\nvalue {a2} nil\ncommitted 2\nok\nok\naborted write-conflict\nerror no transaction (begin first)\nok\nvalue {b} nil\n"
        )
    );
    let seen = log_lines(&log);
    let pa = skein_client::key_partition(a.as_bytes(), PARTITIONS);
    assert!(seen.contains(&format!("commit {pa} pid=-1 level=2 reads={a}@1,{a2}@-1 ranges=0 writes=")), "{seen:?}");
    let pb = skein_client::key_partition(b.as_bytes(), PARTITIONS);
    assert_eq!(seen.last(), Some(&format!("abort {pb}")), "{seen:?}");
}

#[test]
fn txn_sessions_take_locks_and_learn_of_server_aborts() {
    let (addr, log) = fake();
    let input = "begin 2pl\nput x 1\nput x 2\nput wound-me 1\nput y 1\nbegin\nabort\nabort\n";
    let out = skein(&addr, &["txn", "--table", "t", "--isolation", "serializable"], input);
    assert_eq!(
        stdout(&out),
        "ok\nok\nok\naborted wounded\nerror no transaction (begin first)\nok\naborted user\nerror no transaction (begin first)\n"
    );
    let seen = log_lines(&log);
    let locks: Vec<&String> = seen.iter().filter(|l| l.starts_with("lock ")).collect();
    assert_eq!(locks.len(), 2, "a key is locked once: {seen:?}");
    // The server's abort is passed on to every partition the transaction touched.
    assert!(seen.iter().any(|l| l.starts_with("abort ")), "{seen:?}");
}
