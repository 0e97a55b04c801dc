//! Tables against real broker processes: the `skein table` / `skein txn --table` contract
//! with bad input (a command outside a transaction, a key too large, an unknown table or
//! level, a transaction past its timeout: error lines, nothing half-applied), and list-append
//! histories from three brokers whose processes are SIGKILLed and restarted under the load,
//! checked with the Elle-style checker at each serializable level.

mod common;

use std::cell::RefCell;
use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{block_on, sibling, spawn_talking, Broker};
use skein_broker::check::elle::{self, CheckOptions, Model};
use skein_client::table::TableError;
use skein_client::wire::Level;
use skein_client::Client;

fn skein(bin: &Path, addr: &str, args: &[&str]) -> Output {
    Command::new(bin).args(["--brokers", addr]).args(args).output().expect("run skein")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_owned()
}

/// A `skein txn --table` session fed one line at a time.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Session {
    fn start(bin: &Path, addr: &str, extra: &[&str]) -> Session {
        let mut cmd = Command::new(bin);
        cmd.args(["--brokers", addr, "txn"]).args(extra);
        let (child, stdin, lines) = spawn_talking(&mut cmd);
        Session { child, stdin, lines }
    }

    /// Sends `line` and returns its answer's first line.
    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write");
        self.stdin.flush().expect("flush");
        self.lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no answer to {line:?}"))
    }

    fn end(mut self) {
        drop(self.stdin);
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "skein txn exited {status}");
    }
}

#[test]
fn bad_input_gets_error_lines_and_nothing_half_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let bin = sibling("skein", &["--bin", "skein"]);
    let addr = broker.addr.as_str();
    let created = skein(&bin, addr, &["table", "create", "acc", "--partitions", "3", "--replicas", "1"]);
    assert_eq!(out(&created), "created acc", "{}", String::from_utf8_lossy(&created.stderr));
    assert_eq!(out(&skein(&bin, addr, &["table", "put", "acc", "a", "1"])), "ok");
    assert_eq!(out(&skein(&bin, addr, &["table", "get", "acc", "a"])), "value a 1");
    assert_eq!(out(&skein(&bin, addr, &["table", "get", "acc", "zz"])), "value zz nil");

    // An unknown table: status 1 and a message naming it, nothing on stdout.
    for args in [&["table", "get", "nope", "a"][..], &["txn", "--table", "nope"]] {
        let o = skein(&bin, addr, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("nope"), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }

    let mut s = Session::start(&bin, addr, &["--table", "acc"]);
    // Outside a transaction.
    for line in ["get a", "put a 2", "commit", "abort", "scan a b"] {
        assert_eq!(s.ask(line), "error no transaction (begin first)", "{line}");
    }
    // An unknown level, an unknown command.
    assert!(s.ask("begin chaos").starts_with("error "), "begin chaos");
    assert!(s.ask("frobnicate x").starts_with("error "));
    // A key too large: an error line, and the transaction goes on without it.
    assert_eq!(s.ask("begin serializable"), "ok");
    assert_eq!(s.ask("put b 5"), "ok");
    let big = "k".repeat(2000);
    let answer = s.ask(&format!("put {big} 1"));
    assert!(answer.starts_with("error key of 2000 bytes"), "{answer}");
    assert!(s.ask(&format!("get {big}")).starts_with("error key of 2000 bytes"));
    assert_eq!(s.ask("begin"), "error a transaction is open");
    assert!(s.ask("commit").starts_with("committed "));
    assert_eq!(out(&skein(&bin, addr, &["table", "get", "acc", "b"])), "value b 5");
    s.end();

    // Past its timeout: the commit answers `aborted timeout` and none of its writes (over
    // three partitions) shows; a lock it held (2pl) is free again.
    for level in ["serializable", "2pl", "snapshot", "serial"] {
        let mut s = Session::start(&bin, addr, &["--table", "acc", "--timeout-ms", "400"]);
        assert_eq!(s.ask(&format!("begin {level}")), "ok");
        for k in ["t1", "t2", "t3", "t4", "t5", "a"] {
            assert_eq!(s.ask(&format!("put {k} {level}")), "ok", "{level}");
        }
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(s.ask("commit"), "aborted timeout", "{level}");
        assert_eq!(s.ask("get a"), "error no transaction (begin first)");
        s.end();
        let scan = skein(&bin, addr, &["table", "scan", "acc", "t", "u"]);
        assert_eq!(out(&scan), "end", "{level}: a timed-out transaction's writes showed");
        assert_eq!(out(&skein(&bin, addr, &["table", "get", "acc", "a"])), "value a 1", "{level}");
        let mut s = Session::start(&bin, addr, &["--table", "acc"]);
        assert_eq!(s.ask(&format!("begin {level}")), "ok");
        assert_eq!(s.ask("put a 1"), "ok", "{level}: the timed-out transaction's lock");
        assert!(s.ask("commit").starts_with("committed "), "{level}");
        s.end();
    }
}

/// A broker on `dir` with table `name` of one partition, and the `skein` binary.
fn one_partition_table(dir: &Path, name: &str) -> (Broker, std::path::PathBuf) {
    let broker = Broker::start(dir, &[]);
    let bin = sibling("skein", &["--bin", "skein"]);
    let created = skein(&bin, &broker.addr, &["table", "create", name, "--partitions", "1", "--replicas", "1"]);
    assert_eq!(out(&created), format!("created {name}"), "{}", String::from_utf8_lossy(&created.stderr));
    (broker, bin)
}

/// A transaction whose snapshot falls more than the snapshot window (10,000 offsets) behind
/// its partition's log aborts `snapshot-too-old`, as every replica would decide it (a follower
/// prunes versions that far back whatever the leader's transactions read); one begun after
/// the flood commits, and the aborted one's write never shows.
#[test]
fn a_transaction_left_behind_by_the_snapshot_window_aborts_snapshot_too_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, bin) = one_partition_table(dir.path(), "win");
    let addr = broker.addr.as_str();
    assert_eq!(out(&skein(&bin, addr, &["table", "put", "win", "a", "1"])), "ok");
    let mut old = Session::start(&bin, addr, &["--table", "win", "--timeout-ms", "300000"]);
    assert_eq!(old.ask("begin serializable"), "ok");
    assert_eq!(old.ask("get a"), "value a 1");
    // 16 writers x 626 puts: 10,016 records on the partition after the snapshot.
    block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let table = client.table("win").await.expect("table");
        let tasks: Vec<_> = (0..16)
            .map(|w| {
                let table = table.clone();
                compio::runtime::spawn(async move {
                    for i in 0..626 {
                        table.put(format!("f{w}").as_bytes(), i.to_string().as_bytes()).await.expect("put");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("a writer ran to its end");
        }
    });
    assert_eq!(old.ask("put b 2"), "ok");
    assert_eq!(old.ask("commit"), "aborted snapshot-too-old");
    old.end();
    let mut fresh = Session::start(&bin, addr, &["--table", "win"]);
    assert_eq!(fresh.ask("begin serializable"), "ok");
    assert_eq!(fresh.ask("get b"), "value b nil", "the aborted transaction's write");
    assert_eq!(fresh.ask("put b 3"), "ok");
    assert!(fresh.ask("commit").starts_with("committed "));
    fresh.end();
    assert_eq!(out(&skein(&bin, addr, &["table", "get", "win", "b"])), "value b 3");
}

/// A read-only transaction (the library's `Table::get`) commits without a record: a
/// session must not then wait for a write at the partition's next offset, which an idle
/// partition never reaches (a read from the leader with that session was refused as not
/// caught up until another write came).
#[test]
fn a_read_only_commit_leaves_the_session_waiting_for_no_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, _) = one_partition_table(dir.path(), "ro");
    let addr = broker.addr.as_str();
    block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let table = client.table("ro").await.expect("table");
        let session = skein_client::Session::new().into_handle();
        table.set_session(Some(session.clone()));
        let put = table.put(b"a", b"1").await.expect("put");
        let after_put = session.borrow().token("ro", 0).expect("the put noted").min_high_watermark;
        assert_eq!(after_put, put.offset + 1);
        assert_eq!(table.get(b"a").await.expect("get").as_deref(), Some(&b"1"[..]));
        let after_get = session.borrow().token("ro", 0).expect("a token").min_high_watermark;
        assert_eq!(after_get, after_put, "a read-only commit asked the session for a write that never happens");
        let read =
            compio::time::timeout(Duration::from_secs(5), table.get_from(b"a", skein_client::ReadReplica::Leader));
        let read = read.await.expect("answered within 5 s").expect("read with the session");
        assert_eq!(read.as_deref(), Some(&b"1"[..]));
    });
}

/// A table's state survives SIGKILL: restored from its snapshot (written every 100 records
/// here) plus the log's tail, and again after a clean stop.
#[test]
fn a_table_restarts_from_its_snapshot_and_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("broker.log");
    let data = dir.path().join("data");
    let mut broker = Broker::start_logging(&data, &["--table-snapshot-records", "100"], "skein_broker=info", &log);
    let expect = |addr: &str, upto: u64| {
        block_on(async {
            let client = Client::connect(addr).await.expect("connect");
            let t = client.table("kv").await.expect("table");
            let rows = t.scan(b"", b"").await.expect("scan");
            assert_eq!(rows.len() as u64, upto.min(40), "keys");
            for (k, v) in rows {
                let k: u64 = String::from_utf8_lossy(&k).trim_start_matches('k').parse().expect("key");
                let v: u64 = String::from_utf8_lossy(&v).parse().expect("value");
                // Key k was last written by the largest i < upto with i % 40 == k.
                let last = (0..upto).rev().find(|i| i % 40 == k).expect("written");
                assert_eq!(v, last, "k{k:02}");
            }
        })
    };
    let write = |addr: &str, from: u64, to: u64| {
        block_on(async {
            let client = Client::connect(addr).await.expect("connect");
            let t = client.table("kv").await.expect("table");
            for i in from..to {
                t.put(format!("k{:02}", i % 40).as_bytes(), i.to_string().as_bytes()).await.expect("put");
            }
        })
    };
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_table("kv", 2, 1, None).await.expect("create");
    });
    write(&broker.addr, 0, 450);
    // A snapshot is written by the tick after the 100th record: give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    broker.kill9();
    broker.restart_logging("skein_broker=info", &log);
    expect(&broker.addr, 450);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("table state restored from its snapshot"), "no snapshot was restored:\n{text}");
    write(&broker.addr, 450, 520);
    assert!(broker.terminate().success());
    broker.restart_logging("skein_broker=info", &log);
    expect(&broker.addr, 520);
}

/// Follower reads: `skein table get --prefer-replica NODE --session FILE` on each follower
/// right after `skein table put --session FILE` reads the write back (the follower waits
/// until it applied the session's token), and a follower read never goes back.
#[test]
fn follower_reads_with_a_session_read_their_writes() {
    let c = Cluster::start(131, 19631);
    let addrs = c.addrs.join(",");
    let bin = sibling("skein", &["--bin", "skein"]);
    let created = skein(&bin, &addrs, &["table", "create", "fr", "--partitions", "1", "--replicas", "3"]);
    assert_eq!(out(&created), "created fr", "{}", String::from_utf8_lossy(&created.stderr));
    let leader = block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        client.table("fr").await.expect("table");
        client.leader("fr", 0).await.expect("a leader")
    });
    let followers: Vec<String> = (1..=3).filter(|n| *n != leader).map(|n| n.to_string()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let session = dir.path().join("session");
    let session = session.to_str().expect("utf-8 path");
    for i in 0..15 {
        let put = skein(&bin, &addrs, &["table", "put", "fr", "k", &format!("v{i}"), "--session", session]);
        assert_eq!(out(&put), "ok", "{}", String::from_utf8_lossy(&put.stderr));
        for f in &followers {
            let args = ["table", "get", "fr", "k", "--prefer-replica", f.as_str(), "--session", session];
            let got = skein(&bin, &addrs, &args);
            assert_eq!(out(&got), format!("value k v{i}"), "follower {f}: {}", String::from_utf8_lossy(&got.stderr));
        }
    }
    // Without the table (a bad replica choice is a usage error).
    let bad = skein(&bin, &addrs, &["table", "get", "fr", "k", "--prefer-replica", "nobody"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Tiny deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const KEYS: u64 = 8;
const CLIENTS: u64 = 6;

/// One list-append transaction: 1-3 distinct keys, each read, or read and appended to (the
/// list is the comma-separated value); its history line.
async fn one_txn(
    table: &skein_client::table::Table,
    level: Level,
    rng: &mut Rng,
    process: u64,
    next: &mut i64,
    t0: Instant,
) -> String {
    let start_us = t0.elapsed().as_micros() as u64;
    let mut txn = table.begin(Some(level));
    let mut ops: Vec<String> = Vec::new();
    let n = 1 + rng.below(3);
    let mut keys: Vec<u64> = Vec::new();
    while keys.len() < n as usize {
        let k = rng.below(KEYS);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut failed: Option<TableError> = None;
    for k in keys {
        let key = format!("k{k}");
        let read = match txn.get(key.as_bytes()).await {
            Ok(v) => v,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        let list: Vec<i64> = match &read {
            None => Vec::new(),
            Some(v) => String::from_utf8_lossy(v).split(',').map(|x| x.parse().expect("a list element")).collect(),
        };
        let items = list.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        ops.push(format!("[\"r\",\"{key}\",[{items}]]"));
        if rng.below(2) == 0 {
            *next += 1;
            let v = process as i64 * 1_000_000 + *next;
            let new = if items.is_empty() { v.to_string() } else { format!("{items},{v}") };
            if let Err(e) = txn.put(key.as_bytes(), new.as_bytes()).await {
                failed = Some(e);
                break;
            }
            ops.push(format!("[\"append\",\"{key}\",{v}]"));
        }
    }
    let kind = match failed {
        Some(_) => {
            let _ = txn.abort().await;
            "fail"
        }
        None => match txn.commit().await {
            Ok(_) => "ok",
            Err(TableError::Aborted(_)) => "fail",
            // Lost in a crash: it may or may not have committed.
            Err(_) => "info",
        },
    };
    let end_us = t0.elapsed().as_micros() as u64;
    format!(
        "{{\"process\":{process},\"type\":\"{kind}\",\"ops\":[{}],\"start_us\":{start_us},\"end_us\":{end_us},\"level\":\"{}\"}}",
        ops.join(","),
        level.name()
    )
}

/// Three brokers; a table of three partitions, three replicas; six clients appending at
/// `level` for `secs` while one broker at a time is SIGKILLed and restarted. The history
/// must hold no anomaly `level` forbids, and enough transactions must commit.
fn list_append_under_kills(ip: u8, port: u16, level: Level, secs: u64) {
    let cluster = Cluster::start(ip, port);
    let addrs = cluster.addrs.join(",");
    let t0 = Instant::now();
    block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        client.create_table("la", 3, 3, Some(level)).await.expect("create table");
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ms = Duration::from_millis;
    let faults = cluster.kill_in_turn(stop.clone(), ms(2000), ms(1500), ms(2000));
    let history: Rc<RefCell<Vec<String>>> = Rc::default();
    block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        let table = client.table("la").await.expect("table");
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for p in 0..CLIENTS {
            let table = table.clone();
            let history = history.clone();
            tasks.push(compio::runtime::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (p + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                let mut next = 0;
                while Instant::now() < deadline {
                    let line = one_txn(&table, level, &mut rng, p, &mut next, t0).await;
                    history.borrow_mut().push(line);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    stop.store(true, Ordering::Relaxed);
    let (_cluster, kills) = faults.join().expect("fault thread");
    let text = history.borrow().join("\n");
    let parsed = elle::parse_history(&text).expect("a well-formed history");
    let opts = CheckOptions { realtime: false, level: level.name().to_owned() };
    let report = elle::check(&parsed, Model::ListAppend, &opts);
    println!(
        "{}: {kills} kills, {} txns, {} ok, {} fail, {} info",
        level.name(),
        report.txns,
        report.ok,
        report.fail,
        report.info
    );
    if !report.valid {
        let path = std::env::temp_dir().join(format!("skein-tables-{}.jsonl", level.name()));
        std::fs::write(&path, &text).expect("save history");
        panic!("{}: {report}\nhistory: {}", level.name(), path.display());
    }
    assert!(kills >= 2, "the faults ran ({kills} kills)");
    assert!(report.ok >= 50, "{}: only {} transactions committed", level.name(), report.ok);
}

#[test]
fn list_append_is_serializable_under_kills_log_order() {
    list_append_under_kills(161, 19661, Level::Serializable, 15);
}

#[test]
fn list_append_is_serializable_under_kills_ssi() {
    list_append_under_kills(171, 19671, Level::Ssi, 15);
}

#[test]
fn list_append_is_serializable_under_kills_2pl() {
    list_append_under_kills(181, 19681, Level::TwoPl, 15);
}

#[test]
fn list_append_is_serializable_under_kills_serial() {
    list_append_under_kills(191, 19691, Level::Serial, 15);
}
