//! The session-guarantee cases of `acceptance/isolation_cases.md` (appendix) against three
//! real brokers, through the client library and the `skein` CLI:
//!
//! - read-after-write: a value acknowledged at offset o is read at o by the writer's session,
//!   from a follower, from another process holding the serialized session, and after the
//!   leader is killed;
//! - monotonic reads: a session switching replicas on every poll, through a follower cut off
//!   from the leader (needs root and nftables) and a leader kill, never sees the high
//!   watermark go back and reads consecutive offsets;
//! - consistent prefix: readers on the leader, on a follower and on the closest replica (by
//!   rack) agree on the value at every offset, with no gaps;
//! - fencing: a leader replaced while paused refuses the write it finds on resuming, and no
//!   read ever shows it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{leader, settled, wait_for, Cluster};
use common::{block_on, sibling};
use skein_client::wire::{ApiKey, ErrorCode, ProducePartition, ProduceRequest, ProduceResponse};
use skein_client::{
    Acks, Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ReadReplica, Session, SessionHandle,
};
use skein_log::batch::BatchBuilder;
use skein_log::types::Timestamp;

fn bootstrap(c: &Cluster) -> String {
    c.addrs.join(",")
}

async fn producer(c: &Cluster, session: Option<SessionHandle>) -> Producer {
    let client = Client::connect(&bootstrap(c)).await.expect("connect");
    Producer::new(
        client,
        ProducerConfig { acks: Acks::All, linger: Duration::ZERO, session, ..ProducerConfig::default() },
    )
}

async fn consumer(c: &Cluster, prefer: ReadReplica, rack: Option<&str>, session: Option<SessionHandle>) -> Consumer {
    let client = Client::connect(&bootstrap(c)).await.expect("connect");
    let config = ConsumerConfig {
        max_wait: Duration::from_millis(100),
        prefer_replica: prefer,
        rack: rack.map(str::to_owned),
        session,
        // One batch per answer: readers lag the high watermark, so a replica behind what they
        // have seen would show it.
        partition_max_bytes: 1,
        // A follower found behind sends reads to the leader for this long: short, so a run
        // (which long polls make brief) goes back to the followers many times.
        lagging_replica_backoff: Duration::from_millis(100),
        ..ConsumerConfig::default()
    };
    Consumer::new(client, config)
}

/// Sends `value` to `t`/0 and waits for its acknowledgement; its offset.
async fn send(p: &Producer, value: u32) -> u64 {
    let delivery = p.send_to("t", Some(0), None, value.to_string().as_bytes()).await.expect("queued");
    delivery.await.expect("acknowledged").1
}

/// Polls until `n` records were read (or 15 s passed); the (offset, value) pairs. Every
/// answer must report a high watermark of at least `min_high_watermark` (the session's
/// guarantee) and above every offset it returned (only committed records are served).
async fn read_n(consumer: &mut Consumer, n: usize, min_high_watermark: u64) -> Vec<(u64, String)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < Duration::from_secs(15) {
        let records = consumer.poll().await.expect("poll");
        let hw = consumer.high_watermark("t", 0);
        if let Some(hw) = hw {
            assert!(hw >= min_high_watermark, "an answer reported high watermark {hw}, below {min_high_watermark}");
        }
        for r in records {
            assert!(hw.is_some_and(|hw| r.offset < hw), "offset {} served at or above high watermark {hw:?}", r.offset);
            out.push((r.offset, String::from_utf8(r.value).expect("utf8")));
        }
    }
    out
}

fn texts(values: impl IntoIterator<Item = u32>) -> Vec<String> {
    values.into_iter().map(|v| v.to_string()).collect()
}

/// A node other than `a` and `b`.
fn other(a: u32, b: u32) -> u32 {
    (1..=3).find(|&n| n != a && n != b).expect("three nodes")
}

#[test]
fn read_after_write_holds_on_followers_in_other_processes_and_across_failover() {
    let mut c = Cluster::start(61, 19561);
    block_on(async {
        let (lead, _) = settled(&c).await;
        let follower = other(lead, 0);
        let writes = Session::new().into_handle();
        let p = producer(&c, Some(writes.clone())).await;
        // A reader that gets the writer's serialized session (as another process would) reads
        // from a follower right after each acknowledgement, from the log start, so only the
        // token asks for the write: every answer must cover it.
        let session = Session::new().into_handle();
        let mut reader = consumer(&c, ReadReplica::Node(follower), None, Some(session.clone())).await;
        reader.assign("t", &[0], Position::Beginning).await.expect("assign");
        for round in 0..20u32 {
            let offset = send(&p, round).await;
            let text = writes.borrow().to_text();
            session.borrow_mut().merge(&Session::parse(&text).expect("a session parses back"));
            reader.seek("t", 0, Position::Offset(0)).await.expect("seek");
            let got = read_n(&mut reader, offset as usize + 1, offset + 1).await;
            let own = got.get(offset as usize);
            assert_eq!(own, Some(&(offset, round.to_string())), "round {round}: the write at {offset}, read back");
        }
        let stats = reader.read_stats();
        assert!(stats.follower_reads > 0, "the follower served reads: {stats:?}");
        println!("read-after-write from a follower: {stats:?}");

        // Another process: `skein produce --session F` then `skein consume --session F` on a
        // follower.
        let file = c.dirs[0].path().join("session.txt");
        let skein = sibling("skein", &["--bin", "skein"]);
        let f = file.to_str().expect("utf8 path");
        let out = Command::new(&skein)
            .args(["--brokers", &bootstrap(&c), "produce", "t", "--partition", "0", "--session", f, "--print-offsets"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("stdin").write_all(b"cli-value\n")?;
                child.wait_with_output()
            })
            .expect("skein produce");
        assert!(out.status.success(), "skein produce: {}", String::from_utf8_lossy(&out.stdout));
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let offset = printed.split_whitespace().nth(1).expect("PARTITION OFFSET").to_owned();
        let node = follower.to_string();
        let read = Command::new(&skein)
            .args(["--brokers", &bootstrap(&c), "consume", "t", "--partition", "0", "--from", &offset])
            .args(["--count", "1", "--timeout-ms", "5000", "--session", f, "--prefer-replica", &node])
            .output()
            .expect("skein consume");
        assert!(read.status.success(), "skein consume: {}", String::from_utf8_lossy(&read.stderr));
        assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "cli-value");

        // Failover: the leader is killed; the next acknowledged writes (to the new leader) are
        // read back through the remaining follower with the session, and nothing was lost.
        let i = c.index(lead);
        c.brokers[i].take().expect("running").kill9();
        let mut last = 0;
        for value in 100..110u32 {
            last = send(&p, value).await;
        }
        let (new_leader, _) = leader(&c.addrs[c.index(follower)]).await;
        let survivor = other(lead, new_leader);
        let prefer = if survivor == lead { new_leader } else { survivor };
        let mut reader = consumer(&c, ReadReplica::Node(prefer), None, Some(writes.clone())).await;
        reader.assign("t", &[0], Position::Offset(last)).await.expect("assign");
        let got = read_n(&mut reader, 1, last + 1).await;
        assert_eq!(got.first(), Some(&(last, "109".to_owned())), "the write after the failover");
        let mut all = consumer(&c, ReadReplica::Leader, None, None).await;
        all.assign("t", &[0], Position::Beginning).await.expect("assign");
        let values: Vec<String> = read_n(&mut all, 31, 0).await.into_iter().map(|(_, v)| v).collect();
        let mut expected = texts(0..20);
        expected.push("cli-value".into());
        expected.extend(texts(100..110));
        assert_eq!(values, expected, "every acknowledged value once, in order");
    });
}

/// Drops the TCP traffic between two addresses, both ways, while it lives (an nft table of
/// its own; needs root and nftables).
struct Cut {
    table: &'static str,
}

impl Cut {
    fn new(table: &'static str, a: &str, b: &str) -> Cut {
        let ip = |addr: &str| addr.split(':').next().expect("HOST:PORT").to_owned();
        let (a, b) = (ip(a), ip(b));
        let chain = "{ type filter hook output priority 0 ; }";
        nft(&format!("add table inet {table}"));
        nft(&format!("add chain inet {table} out {chain}"));
        nft(&format!("add rule inet {table} out ip saddr {a} ip daddr {b} drop"));
        nft(&format!("add rule inet {table} out ip saddr {b} ip daddr {a} drop"));
        Cut { table }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", self.table]).status();
    }
}

fn nft(command: &str) {
    let status = Command::new("nft").args(command.split_whitespace()).status().expect("the nft command (nftables)");
    assert!(status.success(), "nft {command}");
}

#[test]
fn monotonic_reads_hold_while_switching_replicas_through_a_lagging_follower_and_a_leader_kill() {
    let mut c = Cluster::start(64, 19564);
    block_on(async {
        let (lead, _) = settled(&c).await;
        // Not the active controller: cut off from the leader, it must lag, not take over.
        let client = Client::connect(&bootstrap(&c)).await.expect("connect");
        let controller = client.metadata(None).await.expect("metadata").controller;
        let lagging = other(lead, controller);
        let p = producer(&c, None).await;
        for v in 0..50 {
            send(&p, v).await;
        }
        compio::time::sleep(Duration::from_millis(300)).await;
        // The reader knows all three replicas in sync; then one follower stops hearing from the
        // leader (its high watermark stays at 50) while the next 100 writes commit without it.
        let mut reader = consumer(&c, ReadReplica::Leader, None, Some(Session::new().into_handle())).await;
        reader.assign("t", &[0], Position::Beginning).await.expect("assign");
        let cut = Cut::new("skein_session_test", &c.addrs[c.index(lead)], &c.addrs[c.index(lagging)]);
        for v in 50..150 {
            send(&p, v).await;
        }
        // Reading one batch per answer and switching replica at every poll, the reader sees the
        // leader's high watermark (150) early; the lagging follower's (50) must never show.
        let mut next_offset = 0u64;
        let mut seen_hw = 0u64;
        let mut polls = 0u32;
        let mut read = async |reader: &mut Consumer, until: u64| {
            let start = Instant::now();
            while next_offset < until && start.elapsed() < Duration::from_secs(40) {
                polls += 1;
                reader.set_prefer_replica(ReadReplica::Node(1 + polls % 3));
                for r in reader.poll().await.expect("poll") {
                    assert_eq!(r.offset, next_offset, "consecutive offsets");
                    next_offset += 1;
                }
                if let Some(hw) = reader.high_watermark("t", 0) {
                    assert!(hw >= seen_hw, "poll {polls}: high watermark {hw} after {seen_hw}");
                    assert!(hw >= next_offset, "poll {polls}: high watermark {hw} below what was read");
                    seen_hw = hw;
                }
            }
            assert_eq!(next_offset, until, "read everything");
        };
        read(&mut reader, 150).await;
        drop(cut);
        // Failover: the leader is killed; a new leader's high watermark may lag for a moment.
        let i = c.index(lead);
        c.brokers[i].take().expect("running").kill9();
        for v in 150..200 {
            send(&p, v).await;
        }
        read(&mut reader, 200).await;
        let stats = reader.read_stats();
        assert!(stats.follower_reads > 10, "followers served reads: {stats:?}");
        println!("monotonic reads over {polls} polls: {stats:?}");
    });
}

#[test]
fn readers_on_every_replica_see_one_consistent_prefix() {
    let _c = Cluster::start_in_racks(67, 19567, &["east", "west", "north"]);
    let c = &_c;
    block_on(async {
        let (lead, _) = settled(c).await;
        let follower = other(lead, 0);
        let p = producer(c, None).await;
        let mut readers = [
            consumer(c, ReadReplica::Leader, None, Some(Session::new().into_handle())).await,
            consumer(c, ReadReplica::Node(follower), None, Some(Session::new().into_handle())).await,
            consumer(c, ReadReplica::Closest, Some("north"), Some(Session::new().into_handle())).await,
        ];
        for r in readers.iter_mut() {
            r.assign("t", &[0], Position::Beginning).await.expect("assign");
        }
        let mut logs: Vec<Vec<(u64, String)>> = vec![Vec::new(); 3];
        for round in 0..30u32 {
            for v in 0..10 {
                drop(p.send_to("t", Some(0), None, (round * 10 + v).to_string().as_bytes()).await.expect("queued"));
            }
            for (r, log) in readers.iter_mut().zip(logs.iter_mut()) {
                let records = r.poll().await.expect("poll");
                let hw = r.high_watermark("t", 0);
                for rec in records {
                    assert!(hw.is_some_and(|hw| rec.offset < hw), "offset {} at or above {hw:?}", rec.offset);
                    log.push((rec.offset, String::from_utf8(rec.value).expect("utf8")));
                }
            }
        }
        p.flush().await;
        for (r, log) in readers.iter_mut().zip(logs.iter_mut()) {
            let more = 300 - log.len();
            log.extend(read_n(r, more, 0).await);
        }
        for (i, log) in logs.iter().enumerate() {
            let offsets: Vec<u64> = log.iter().map(|x| x.0).collect();
            assert_eq!(offsets, (0..300).collect::<Vec<u64>>(), "reader {i}: consecutive from 0, no gaps");
            assert_eq!(log, &logs[0], "reader {i} and the leader reader agree at every offset");
        }
        assert!(readers[1].read_stats().follower_reads > 0, "node {follower} served as a follower");
        let closest = readers[2].read_stats();
        assert!(lead == 3 || closest.follower_reads > 0, "the reader in rack north read from node 3: {closest:?}");
    });
}

#[test]
fn a_leader_replaced_while_paused_refuses_the_write_it_finds_and_no_read_shows_it() {
    let mut c = Cluster::start(71, 19571);
    block_on(async {
        let (lead, epoch) = settled(&c).await;
        let p = producer(&c, None).await;
        for v in 0..10 {
            send(&p, v).await;
        }
        let old_addr = c.addrs[c.index(lead)].clone();
        let pid = c.brokers[c.index(lead)].as_ref().expect("running").child.id();
        let old = skein_client::conn::Connection::connect(&old_addr, "fencing", Duration::from_secs(2))
            .await
            .expect("connect to the leader");
        let signal = |sig: &str| {
            let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
            assert!(ok, "kill {sig} {pid}");
        };
        signal("-STOP");
        // A write to the paused leader, naming its epoch: it sits in the socket until it
        // resumes, after a new leader took over.
        let mut b = BatchBuilder::new();
        b.push(None, b"999", &[], Timestamp(1_000));
        let req = ProduceRequest {
            acks: 1,
            timeout_ms: 2_000,
            partitions: vec![ProducePartition {
                topic: "t".into(),
                partition: 0,
                leader_epoch: epoch,
                records: bytes::BytesMut::from(&b.build().into_bytes()[..]),
            }],
        };
        let pending = old.send(ApiKey::Produce, &req).await.expect("sent");
        let other_addr = c.addrs[c.index(other(lead, 0))].clone();
        let (new_leader, new_epoch) = wait_for("a new leader", Duration::from_secs(10), async || {
            let l = leader(&other_addr).await;
            (l.0 != 0 && l.0 != lead && l.1 > epoch).then_some(l)
        })
        .await;
        send(&p, 10).await;
        signal("-CONT");
        let answer = compio::time::timeout(Duration::from_secs(5), pending).await;
        if let Ok(Ok(Ok(body))) = answer {
            let resp: ProduceResponse =
                skein_client::conn::decode_body(ApiKey::Produce, body).expect("a produce response");
            assert_ne!(
                resp.partitions[0].error,
                ErrorCode::NONE,
                "the old leader (epoch {epoch}) accepted a write after epoch {new_epoch}"
            );
        }
        // Whatever the old leader did, the value never shows in a read, from any replica.
        compio::time::sleep(Duration::from_secs(1)).await;
        for node in [lead, new_leader, other(lead, new_leader)] {
            let mut r = consumer(&c, ReadReplica::Node(node), None, Some(Session::new().into_handle())).await;
            r.assign("t", &[0], Position::Beginning).await.expect("assign");
            let values: Vec<String> = read_n(&mut r, 11, 0).await.into_iter().map(|x| x.1).collect();
            assert_eq!(values, texts(0..11), "read through node {node}");
        }
        let _ = &mut c;
    });
}

/// Cuts the link between two addresses in `window` long slices, on and off, until dropped:
/// the follower at one end keeps falling behind and catching up.
struct FlappingCut {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl FlappingCut {
    fn new(table: &'static str, a: String, b: String, window: Duration) -> FlappingCut {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut cuts = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let cut = Cut::new(table, &a, &b);
                cuts += 1;
                std::thread::sleep(window);
                drop(cut);
                std::thread::sleep(window);
            }
            cuts
        });
        FlappingCut { stop, thread: Some(thread) }
    }

    /// Stops flapping (the link ends up whole); how many cuts were made.
    fn stop(mut self) -> u32 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().expect("running").join().expect("flapping thread")
    }
}

impl Drop for FlappingCut {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A read with a session does not end (idle timeout) before it reached the session's own
/// write, even when it goes to a follower that keeps falling behind: forty times, a CLI write
/// (`acks=leader`) then at once a CLI read from that follower with a 50 ms idle timeout.
#[test]
fn a_cli_session_read_from_a_lagging_follower_does_not_end_without_its_own_write() {
    let c = Cluster::start(74, 19574);
    let cli = sibling("skein", &["--bin", "skein"]);
    let bootstrap = bootstrap(&c);
    let session_dir = tempfile::tempdir().expect("tempdir");
    let session = session_dir.path().join("session");
    let (lagging, flapping) = block_on(async {
        let (lead, _) = settled(&c).await;
        let client = Client::connect(&bootstrap).await.expect("connect");
        let controller = client.metadata(None).await.expect("metadata").controller;
        let lagging = other(lead, controller);
        let (a, b) = (c.addrs[c.index(lead)].clone(), c.addrs[c.index(lagging)].clone());
        (lagging, FlappingCut::new("skein_flap_test", a, b, Duration::from_millis(250)))
    });
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(&cli)
            .args(["--brokers", &bootstrap])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run skein");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), stdin.as_bytes()).expect("stdin");
        child.wait_with_output().expect("skein output")
    };
    let s = session.to_str().expect("utf8 path");
    let follower = lagging.to_string();
    for i in 0..40 {
        let value = format!("w{i}");
        let wrote =
            run(&["produce", "t", "--partition", "0", "--acks", "leader", "--session", s, "--print-offsets"], &value);
        assert!(wrote.status.success(), "write {i}: {}", String::from_utf8_lossy(&wrote.stderr));
        let read = run(
            &["consume", "t", "--partition", "0", "--from", "beginning", "--timeout-ms", "50", "--session", s]
                .into_iter()
                .chain(["--prefer-replica", &follower])
                .collect::<Vec<_>>(),
            "",
        );
        let stderr = String::from_utf8_lossy(&read.stderr);
        assert!(read.status.success(), "read {i}: {stderr}");
        let values: Vec<String> = String::from_utf8_lossy(&read.stdout).lines().map(str::to_owned).collect();
        let expected: Vec<String> = (0..=i).map(|v| format!("w{v}")).collect();
        assert_eq!(values, expected, "read {i} (after write w{i} at {})", String::from_utf8_lossy(&wrote.stdout));
    }
    let cuts = flapping.stop();
    assert!(cuts >= 2, "the follower's link was cut {cuts} times");
}

/// In the library, an empty poll below the session's token is told apart from "no new
/// records" by `Consumer::behind_session`; a read past its deadline fails naming the token.
#[test]
fn behind_session_tells_an_empty_poll_below_the_token_from_no_new_records() {
    let c = Cluster::start(77, 19577);
    block_on(async {
        settled(&c).await;
        let session = Session::new().into_handle();
        let p = producer(&c, Some(session.clone())).await;
        for v in 0..5 {
            send(&p, v).await;
        }
        let mut r = consumer(&c, ReadReplica::Leader, None, Some(session.clone())).await;
        r.assign("t", &[0], Position::Beginning).await.expect("assign");
        let lag = r.behind_session();
        assert_eq!(lag.len(), 1, "below the session's write before reading");
        assert_eq!((lag[0].partition, lag[0].position, lag[0].token.min_high_watermark), (0, 0, 5));
        let read = read_n(&mut r, 5, 5).await;
        assert_eq!(read.len(), 5);
        assert!(r.behind_session().is_empty(), "caught up: an empty poll now means no new records");
        // A token no replica can reach (another process claims a write at offset 1000).
        session.borrow_mut().note_write("t", 0, 1_000, 1);
        let lag = r.behind_session();
        assert_eq!(lag.len(), 1);
        assert_eq!(lag[0].token.min_high_watermark, 1_000);
        assert!(r.poll().await.expect("poll").is_empty());
        assert_eq!(r.behind_session().len(), 1, "still behind: not 'no new records'");
    });
    // The CLI fails past its session deadline instead of ending quietly.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("session");
    let mut s = Session::new();
    s.note_write("t", 0, 1_000, 1);
    s.save(&file).expect("save session");
    let out = Command::new(sibling("skein", &["--bin", "skein"]))
        .args(["--brokers", &bootstrap(&c), "consume", "t", "--partition", "0", "--timeout-ms", "50"])
        .args(["--session-deadline-ms", "1500", "--session"])
        .arg(&file)
        .output()
        .expect("run skein");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("t/0") && stderr.contains("offset 1000"), "names partition and token: {stderr}");
}
