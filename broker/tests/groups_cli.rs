//! Consumer groups through the `skein` CLI against three real brokers: a group of CLI
//! consumers shares a 12-partition topic of 200,000 keyed records while one member is killed
//! with SIGKILL midway and a fourth joins. Every record is printed at least once, duplicates
//! come only from the killed member's uncommitted window, each key's records stay in order
//! within every consumer's output, and `group describe --json` ends with lag 0 everywhere.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{block_on, sibling};
use skein_client::Client;

const RECORDS: u64 = 200_000;
const PARTITIONS: u32 = 12;
const KEYS: u64 = 500;

/// A running `skein consume --group` and the lines it printed (`PARTITION OFFSET KEY VALUE`).
struct Member {
    child: Child,
    lines: JoinHandle<Vec<String>>,
}

fn member(bootstrap: &str, printed: &Arc<AtomicU64>) -> Member {
    let mut child = Command::new(sibling("skein", &["--bin", "skein"]))
        .args(["--brokers", bootstrap, "consume", "k", "--group", "g", "--format", "%p %o %k %v"])
        .args(["--session-timeout-ms", "3000", "--timeout-ms", "8000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run skein consume --group");
    let stdout = child.stdout.take().expect("stdout");
    let printed = printed.clone();
    let lines = std::thread::spawn(move || {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            printed.fetch_add(1, Ordering::Relaxed);
            out.push(line);
        }
        out
    });
    Member { child, lines }
}

#[test]
fn a_cli_group_reads_every_record_through_a_kill_and_a_join_and_ends_with_no_lag() {
    let c = Cluster::start(114, 19614);
    let bootstrap = c.addrs.join(",");
    let skein = sibling("skein", &["--bin", "skein"]);
    block_on(async {
        let client = Client::connect(&bootstrap).await.expect("connect");
        client.create_topic("k", PARTITIONS, 3, &[]).await.expect("create k");
    });
    // 200,000 keyed records: value `KEY:N` is the N-th record of KEY.
    let mut input = String::with_capacity(RECORDS as usize * 16);
    let mut seq: HashMap<u64, u64> = HashMap::new();
    for i in 0..RECORDS {
        let key = i % KEYS;
        let n = seq.entry(key).or_default();
        *n += 1;
        input.push_str(&format!("key{key} key{key}:{n}\n"));
    }
    let produce = |lines: &str| {
        let mut produce = Command::new(&skein)
            .args(["--brokers", &bootstrap, "produce", "k", "--key-separator", " ", "--acks", "all"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run skein produce");
        produce.stdin.take().expect("stdin").write_all(lines.as_bytes()).expect("write records");
        assert!(produce.wait().expect("produce exits").success(), "skein produce failed");
    };
    // Half before the group starts, the rest in ten parts while it reads.
    let lines: Vec<&str> = input.lines().collect();
    let half = RECORDS as usize / 2;
    produce(&(lines[..half].join("\n") + "\n"));
    let rest: Vec<String> = lines[half..].chunks(half / 10).map(|c| c.join("\n") + "\n").collect();

    let counts: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut members: Vec<Member> = (0..3).map(|i| member(&bootstrap, &counts[i])).collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for part in &rest {
                std::thread::sleep(Duration::from_millis(300));
                produce(part);
            }
        });
        // Kill one member with SIGKILL midway: every member has printed records, its
        // auto-commit (every second) has run, and the group has printed a third.
        loop {
            let n: Vec<u64> = counts.iter().take(3).map(|c| c.load(Ordering::Relaxed)).collect();
            if n.iter().all(|&n| n > 0)
                && n.iter().sum::<u64>() >= RECORDS / 3
                && started.elapsed() > Duration::from_secs(2)
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "the group printed only {n:?} records");
            std::thread::sleep(Duration::from_millis(20));
        }
        members[1].child.kill().expect("SIGKILL");
        let _ = members[1].child.wait();
        // A fourth member joins while the rest is still being produced.
        members.push(member(&bootstrap, &counts[3]));
    });
    let mut outputs = Vec::new();
    for (i, mut m) in members.into_iter().enumerate() {
        let status = m.child.wait().expect("consumer exits");
        if i != 1 {
            assert!(status.success(), "consumer {i} exited with {status}");
        }
        outputs.push(m.lines.join().expect("reader"));
    }

    // Every record at least once; duplicates only where the killed member printed one copy.
    let mut seen: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
    for (i, lines) in outputs.iter().enumerate() {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for line in lines {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "consumer {i} printed {line:?}");
            let (p, o): (u32, u64) = (f[0].parse().expect("partition"), f[1].parse().expect("offset"));
            seen.entry((p, o)).or_default().push(i);
            let (key, n) = f[3].split_once(':').expect("KEY:N");
            assert_eq!(key, f[2], "{line}");
            let n: u64 = n.parse().expect("N");
            if let Some(prev) = last.insert(f[2], n) {
                assert!(n > prev, "consumer {i}: {key} printed {n} after {prev}: per-key order broken");
            }
        }
    }
    assert_eq!(seen.len() as u64, RECORDS, "every record printed at least once");
    let duplicates: Vec<(&(u32, u64), &Vec<usize>)> = seen.iter().filter(|(_, by)| by.len() > 1).collect();
    for (at, by) in &duplicates {
        assert!(by.len() == 2 && by.contains(&1), "{at:?} printed by {by:?}: only the killed member's window repeats");
    }
    eprintln!(
        "printed {} lines for {RECORDS} records: {} duplicates (killed member printed {})",
        outputs.iter().map(Vec::len).sum::<usize>(),
        duplicates.len(),
        outputs[1].len()
    );

    // The group's committed offsets reach every log end.
    let out = Command::new(&skein)
        .args(["--brokers", &bootstrap, "group", "describe", "g", "--json"])
        .output()
        .expect("run skein group describe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in ["group", "state", "generation", "protocol", "members", "offsets"] {
        assert!(d.get(key).is_some(), "describe --json has no {key}: {d}");
    }
    let offsets = d["offsets"].as_array().expect("offsets");
    assert_eq!(offsets.len(), PARTITIONS as usize, "{d}");
    let mut total = 0;
    for o in offsets {
        assert_eq!(o["lag"], 0, "{o}");
        assert_eq!(o["committed"], o["log_end"], "{o}");
        total += o["log_end"].as_u64().expect("log_end");
    }
    assert_eq!(total, RECORDS);
    assert_eq!(d["state"], "Empty", "every member left: {d}");

    // Sessions keep working in a group: records written with a session are read by a group
    // member with that session, from followers (`--prefer-replica 2`, or the leader where
    // node 2 is not in sync or behind the session's token).
    let dir = tempfile::tempdir().expect("tempdir");
    let session = dir.path().join("session");
    let session = session.to_str().expect("utf8 path");
    let mut produce = Command::new(&skein)
        .args(["--brokers", &bootstrap, "produce", "k", "--key-separator", " ", "--session", session])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run skein produce --session");
    let mine: String = (0..10).map(|i| format!("key{i} mine:{i}\n")).collect();
    produce.stdin.take().expect("stdin").write_all(mine.as_bytes()).expect("write");
    assert!(produce.wait().expect("produce exits").success());
    let out = Command::new(&skein)
        .args(["--brokers", &bootstrap, "consume", "k", "--group", "g2", "--session", session])
        .args(["--prefer-replica", "2", "--timeout-ms", "500", "--format", "%v"])
        .output()
        .expect("run skein consume --group --session");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count() as u64, RECORDS + 10);
    for i in 0..10 {
        assert!(text.lines().any(|l| l == format!("mine:{i}")), "the session's own write mine:{i} was read");
    }
    drop(c);
}
