//! Partitions that split and merge (issue 21) on a real broker process: a keyed producer
//! keeps writing through ten splits and merges without an error reaching it, nothing it was
//! told is acknowledged is lost or duplicated, no partition holds a record past its seal, every
//! record sits in the partition owning its key, and per key the records of a parent all come
//! before those of its children (what a reader finishing parents first relies on). Plus the
//! CLI contract: `topic create --partitioning`, `topic split`, `topic merge`, `describe --json`,
//! and their refusals.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Output};
use std::rc::Rc;
use std::time::Duration;

use common::cluster::Cluster;
use common::{block_on, sibling, Broker};
use skein_client::partitioning::{open_ranges, KeyRange, Partitioning};
use skein_client::{Client, Consumer, ConsumerConfig, GroupConfig, GroupConsumer, Position, Producer, ProducerConfig};

fn skein(bin: &Path, addr: &str, args: &[&str]) -> Output {
    Command::new(bin).args(["--brokers", addr]).args(args).output().expect("run skein")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim_end().to_owned()
}

/// Acknowledged records: (key, value, partition, offset).
type Acked = Rc<RefCell<Vec<(String, u64, u32, u64)>>>;
/// A partition's records: (offset, key, value).
type Stored = Vec<(u64, Vec<u8>, Vec<u8>)>;

/// What a group delivered: (key, value), in delivery order.
type Delivered = Rc<RefCell<Vec<(Vec<u8>, u64)>>>;

/// A task sending `value i` under key `k{i % keys}` to `topic` until `stop`, pausing 2 ms every
/// `pause` records; then it notes each acknowledgement in `acked` and each failure in `errors`.
fn keyed_producer(
    producer: &Producer,
    topic: &'static str,
    keys: u64,
    pause: u64,
    stop: &Rc<RefCell<bool>>,
    acked: &Acked,
    errors: &Rc<RefCell<Vec<String>>>,
) -> compio::runtime::JoinHandle<()> {
    let (producer, stop, acked, errors) = (producer.clone(), stop.clone(), acked.clone(), errors.clone());
    compio::runtime::spawn(async move {
        let mut deliveries = Vec::new();
        let mut i = 0u64;
        while !*stop.borrow() {
            let key = format!("k{}", i % keys);
            match producer.send(topic, Some(key.as_bytes()), i.to_string().as_bytes()).await {
                Ok(d) => deliveries.push((key, i, d)),
                Err(e) => errors.borrow_mut().push(e.to_string()),
            }
            i += 1;
            if i.is_multiple_of(pause) {
                compio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        producer.flush().await;
        for (key, i, d) in deliveries {
            match d.await {
                Ok((p, offset)) => acked.borrow_mut().push((key, i, p, offset)),
                Err(e) => errors.borrow_mut().push(format!("record {i}: {e}")),
            }
        }
    })
}

/// Reads partition `p` of `topic` from its start to `end`.
async fn read_all(client: &Client, topic: &str, p: u32, end: u64) -> Stored {
    let mut got = Vec::new();
    if end == 0 {
        return got;
    }
    let mut c = Consumer::new(client.clone(), ConsumerConfig::default());
    c.assign(topic, &[p], Position::Beginning).await.expect("assign");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.last().is_none_or(|(o, _, _)| o + 1 < end) {
        assert!(std::time::Instant::now() < deadline, "{topic}/{p}: read {} records, not up to {end}", got.len());
        for r in c.poll().await.expect("poll") {
            got.push((r.offset, r.key.expect("keyed"), r.value));
        }
    }
    got
}

#[test]
fn a_keyed_producer_writes_through_ten_splits_and_merges_without_loss_error_or_reorder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic_with("lin", 2, 1, Partitioning::HashRange, &[]).await.expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let stop = Rc::new(RefCell::new(false));
        let acked: Acked = Rc::default();
        let errors: Rc<RefCell<Vec<String>>> = Rc::default();
        // A reader following the topic from the start, while it splits and merges.
        let reader_stop = Rc::new(RefCell::new(None::<usize>));
        let reader = {
            let (client, reader_stop) = (client.clone(), reader_stop.clone());
            compio::runtime::spawn(async move {
                let mut c = Consumer::new(client, ConsumerConfig::default());
                c.follow("lin", Position::Beginning).await.expect("follow");
                let mut seen: Vec<(u32, u64, Vec<u8>, u64)> = Vec::new();
                loop {
                    if reader_stop.borrow().is_some_and(|n| seen.len() >= n) {
                        break seen;
                    }
                    for r in c.poll().await.expect("poll") {
                        let v = String::from_utf8_lossy(&r.value).parse().expect("a number");
                        seen.push((r.partition, r.offset, r.key.expect("keyed"), v));
                    }
                }
            })
        };
        let task = keyed_producer(&producer, "lin", 40, 20, &stop, &acked, &errors);
        // Ten changes while the producer runs: splits of the widest open partition, and
        // merges of the first two open neighbours, alternating.
        for change in 0..10 {
            compio::time::sleep(Duration::from_millis(150)).await;
            let t = client.topic_metadata("lin").await.expect("metadata");
            let parts = open_ranges(&t);
            if change % 2 == 0 || parts.len() < 2 {
                let (_, p) = parts.last().expect("an open partition");
                client.split_partition("lin", *p, None).await.expect("split");
            } else {
                let pair = parts.windows(2).find(|w| w[0].0.precedes(&w[1].0)).expect("neighbours");
                client.merge_partitions("lin", [pair[0].1, pair[1].1]).await.expect("merge");
            }
        }
        compio::time::sleep(Duration::from_millis(300)).await;
        *stop.borrow_mut() = true;
        task.await.expect("the producer task");
        assert!(errors.borrow().is_empty(), "errors reached the producer: {:?}", &errors.borrow()[..]);
        let acked = acked.borrow().clone();
        assert!(acked.len() > 1_000, "only {} records acknowledged", acked.len());

        // Wait for every seal to be reported, then read every partition whole.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let t = loop {
            let t = client.topic_metadata("lin").await.expect("metadata");
            if t.partitions.iter().all(|p| p.lineage.seal != 1) {
                break t;
            }
            assert!(std::time::Instant::now() < deadline, "seals not reported");
            compio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(t.partitions.len(), 2 + 10 + 5, "five splits (+2) and five merges (+1)");
        let d = client.describe_topic("lin").await.expect("describe");
        let mut stored: BTreeMap<u32, Stored> = BTreeMap::new();
        for p in &d.partitions {
            if p.lineage.seal == 2 {
                assert_eq!(p.log_end, p.lineage.sealed_at, "partition {}: nothing past its seal", p.partition);
            }
            stored.insert(p.partition, read_all(&client, "lin", p.partition, p.high_watermark).await);
        }
        // Every acknowledged record once, where it was acknowledged; nothing else stored.
        let mut at: HashMap<(u32, u64), (Vec<u8>, Vec<u8>)> = HashMap::new();
        for (p, records) in &stored {
            for (o, k, v) in records {
                assert!(at.insert((*p, *o), (k.clone(), v.clone())).is_none());
            }
        }
        assert_eq!(at.len(), acked.len(), "stored records = acknowledged records");
        for (key, i, p, offset) in acked.iter() {
            let (k, v) = at.get(&(*p, *offset)).unwrap_or_else(|| panic!("record {i} lost from {p}@{offset}"));
            assert_eq!((k.as_slice(), v.as_slice()), (key.as_bytes(), i.to_string().as_bytes()));
        }
        // Each record in the partition owning its key's hash.
        let range = |p: u32| KeyRange::of_wire(t.partitions[p as usize].lineage.range.as_ref().expect("ranged"));
        for (p, records) in &stored {
            for (_, k, _) in records {
                let point = Partitioning::HashRange.point(k).expect("ranged");
                assert!(range(*p).contains(point.bytes()), "a record of {p} outside its range");
            }
        }
        // Per key: increasing within a partition, and a parent's all before its children's.
        let values = |p: u32, key: &[u8]| -> Vec<u64> {
            stored[&p]
                .iter()
                .filter(|(_, k, _)| k == key)
                .map(|(_, _, v)| String::from_utf8_lossy(v).parse().expect("a number"))
                .collect()
        };
        let mut checked = 0;
        for k in 0..40 {
            let key = format!("k{k}");
            for p in &t.partitions {
                let own = values(p.partition, key.as_bytes());
                assert!(own.windows(2).all(|w| w[0] < w[1]), "{key} out of order in {}", p.partition);
                for parent in &p.lineage.parents {
                    let before = values(*parent, key.as_bytes());
                    if let (Some(last), Some(first)) = (before.last(), own.first()) {
                        assert!(
                            last < first,
                            "{key}: parent {parent} has {last} after child {}'s {first}",
                            p.partition
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 40, "only {checked} parent-child key pairs compared");

        // The follower read every record once, each key's in the order written.
        *reader_stop.borrow_mut() = Some(acked.len());
        let seen = compio::time::timeout(Duration::from_secs(30), reader).await.expect("the reader caught up");
        let seen = seen.expect("the reader task");
        assert_eq!(seen.len(), acked.len(), "read each acknowledged record once");
        let in_order = |seen: &[(u32, u64, Vec<u8>, u64)]| {
            let mut last: HashMap<Vec<u8>, u64> = HashMap::new();
            for (p, o, k, v) in seen {
                if let Some(before) = last.insert(k.clone(), *v) {
                    assert!(before < *v, "{}: {v} (at {p}@{o}) read after {before}", String::from_utf8_lossy(k));
                }
            }
        };
        in_order(&seen);
        // And one that starts when everything is written, with small fetches (every
        // partition has records to read at once, a few batches per fetch: only the lineage
        // keeps a child behind its parents).
        let small = ConsumerConfig { partition_max_bytes: 512, max_bytes: 4096, ..ConsumerConfig::default() };
        let mut c = Consumer::new(client.clone(), small);
        c.follow("lin", Position::Beginning).await.expect("follow");
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < acked.len() {
            assert!(std::time::Instant::now() < deadline, "read {} of {}", seen.len(), acked.len());
            for r in c.poll().await.expect("poll") {
                let v = String::from_utf8_lossy(&r.value).parse().expect("a number");
                seen.push((r.partition, r.offset, r.key.expect("keyed"), v));
            }
        }
        assert_eq!(seen.len(), acked.len());
        in_order(&seen);
    });
    drop(broker);
}

#[test]
fn the_cli_creates_splits_merges_and_describes_ranged_topics_and_refuses_bad_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let bin = sibling("skein", &["--bin", "skein"]);
    let addr = broker.addr.as_str();
    let run = |args: &[&str]| skein(&bin, addr, args);

    let o = run(&["topic", "create", "kr", "--partitioning", "key-range", "--partitions", "2"]);
    assert_eq!(out(&o), "created topic kr with 2 partitions", "{}", err(&o));
    let o = run(&["topic", "create", "h", "--partitions", "2"]);
    assert!(o.status.success(), "{}", err(&o));
    let o = run(&["topic", "create", "bad", "--partitioning", "round-robin"]);
    assert_eq!(o.status.code(), Some(2), "clap refuses an unknown scheme");
    assert!(err(&o).contains("hash, hash-range or key-range"), "{}", err(&o));

    // Records before the split stay in the parent, which is sealed at its log end.
    let o = Command::new(&bin)
        .args(["--brokers", addr, "produce", "kr", "--partition", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(b"a\nb\nc\n")?;
            c.wait_with_output()
        })
        .expect("produce");
    assert!(o.status.success(), "{}", err(&o));
    let o = run(&["topic", "split", "kr", "--partition", "0", "--at", "m"]);
    assert_eq!(
        out(&o),
        "split kr partitions 0 into 2 [, m) and 3 [m, 0x80)\nsealed kr partitions 0 at 3",
        "{}",
        err(&o)
    );
    let o = run(&["topic", "merge", "kr", "--partitions", "3,2"]);
    assert_eq!(out(&o), "merged kr partitions 3,2 into 4 [, 0x80)\nsealed kr partitions 3,2 at 0,0", "{}", err(&o));

    let o = run(&["topic", "describe", "kr", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out(&o)).expect("json");
    assert_eq!(j["partitioning"], "key-range");
    let p = |i: usize| &j["partitions"][i];
    assert_eq!(p(0)["range"], serde_json::json!({"from": "", "to": "0x80"}));
    assert_eq!(p(0)["sealed_at"], 3);
    assert_eq!(p(0)["state"], "sealed");
    assert_eq!(p(1)["range"], serde_json::json!({"from": "0x80", "to": null}));
    assert_eq!(p(1)["sealed_at"], serde_json::Value::Null);
    assert_eq!(p(4)["parents"], serde_json::json!([2, 3]));
    assert_eq!(p(4)["range"], serde_json::json!({"from": "", "to": "0x80"}));
    let o = run(&["topic", "describe", "h", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out(&o)).expect("json");
    assert_eq!((j["partitioning"].as_str(), &j["partitions"][0]["range"]), (Some("hash"), &serde_json::Value::Null));

    // Refusals: status 1, a message saying why, nothing changed.
    for (args, says) in [
        (&["topic", "split", "h", "--partition", "0"][..], "hash-range or key-range"),
        (&["topic", "split", "kr", "--partition", "0"], "sealed"),
        (&["topic", "split", "kr", "--partition", "9"], "partition 9 does not exist"),
        (&["topic", "split", "kr", "--partition", "1", "--at", "0x10"], "not inside"),
        (&["topic", "split", "nope", "--partition", "0"], "nope"),
        (&["topic", "merge", "kr", "--partitions", "1,2"], "PARTITION_SEALED"),
        (&["topic", "merge", "kr", "--partitions", "4,4"], "itself"),
        (&["topic", "merge", "kr", "--partitions", "1"], "two partitions"),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", out(&o));
        assert!(err(&o).contains(says), "{args:?}: {}", err(&o));
    }
    let o = run(&["topic", "describe", "kr", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out(&o)).expect("json");
    assert_eq!(j["partitions"].as_array().map(Vec::len), Some(5), "no refused change was applied");

    // A record a producer sends to a sealed partition by index goes to the open partition
    // that now owns the range (keyless: the first); a keyed one to its key's owner.
    block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let producer = Producer::new(client, ProducerConfig::default());
        let d = producer.send_to("kr", Some(0), None, b"late").await.expect("queued");
        assert_eq!(d.await.expect("delivered").0, 4, "0's range is 4's now");
        let d = producer.send_to("kr", Some(2), Some(b"zebra"), b"z").await.expect("queued");
        assert_eq!(d.await.expect("delivered").0, 4, "zebra < 0x80 is 4's");
        let d = producer.send_to("kr", Some(2), Some("été".as_bytes()), b"e").await.expect("queued");
        assert_eq!(d.await.expect("delivered").0, 1, "0xc3 >= 0x80 is 1's");
    });
    drop(broker);
}

/// A split whose parent's leader is SIGKILLed right after: the seal comes from whichever
/// leader reports it at its epoch, everything acknowledged is kept once, nothing sits past the
/// seal, and each key's records in the parent come before those in the children.
#[test]
fn a_split_survives_a_kill_of_the_parents_leader() {
    let mut cluster = Cluster::start(201, 19701);
    let addrs = cluster.addrs.join(",");
    block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        let configs = [("min.insync.replicas".to_owned(), "2".to_owned())];
        client.create_topic_with("s", 1, 3, Partitioning::HashRange, &configs).await.expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let stop = Rc::new(RefCell::new(false));
        let acked: Acked = Rc::default();
        let errors: Rc<RefCell<Vec<String>>> = Rc::default();
        let task = keyed_producer(&producer, "s", 30, 10, &stop, &acked, &errors);
        compio::time::sleep(Duration::from_millis(500)).await;
        let leader = client.topic_metadata("s").await.expect("metadata").partitions[0].leader;
        assert_ne!(leader, 0, "partition 0 has a leader");
        client.split_partition("s", 0, None).await.expect("split");
        let victim = cluster.index(leader);
        cluster.brokers[victim].take().expect("running").kill9();
        compio::time::sleep(Duration::from_millis(1_500)).await;
        cluster.brokers[victim] = Some(cluster.spawn(victim));
        compio::time::sleep(Duration::from_millis(500)).await;
        *stop.borrow_mut() = true;
        task.await.expect("the producer task");
        assert!(errors.borrow().is_empty(), "errors reached the producer: {:?}", &errors.borrow()[..]);
        let acked = acked.borrow().clone();

        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let t = loop {
            let t = client.topic_metadata("s").await.expect("metadata");
            if t.partitions[0].lineage.seal == 2 && t.partitions.iter().all(|p| p.leader != 0) {
                break t;
            }
            assert!(std::time::Instant::now() < deadline, "no seal, or a partition without a leader");
            compio::time::sleep(Duration::from_millis(50)).await;
        };
        let sealed_at = t.partitions[0].lineage.sealed_at;
        let d = client.describe_topic("s").await.expect("describe");
        assert_eq!(d.partitions[0].log_end, sealed_at, "the leader holds nothing past the seal");
        let mut stored: BTreeMap<u32, Stored> = BTreeMap::new();
        for p in &d.partitions {
            stored.insert(p.partition, read_all(&client, "s", p.partition, p.high_watermark).await);
        }
        let mut at: HashMap<(u32, u64), Vec<u8>> = HashMap::new();
        for (p, records) in &stored {
            for (o, _, v) in records {
                at.insert((*p, *o), v.clone());
            }
        }
        for (_, i, p, offset) in &acked {
            assert_eq!(at.get(&(*p, *offset)).map(Vec::as_slice), Some(i.to_string().as_bytes()), "record {i}");
        }
        assert!(acked.iter().any(|a| a.2 == 0) && acked.iter().any(|a| a.2 != 0), "records on both sides");
        // No record twice (a retry of a batch the dead leader had written, refused as sealed
        // rather than answered as a duplicate, was once written again in a child).
        let mut values: Vec<&Vec<u8>> = at.values().collect();
        values.sort();
        let len = values.len();
        values.dedup();
        assert_eq!(values.len(), len, "a record stored twice");
        for k in 0..30 {
            let key = format!("k{k}");
            let values = |p: u32| -> Vec<u64> {
                stored[&p]
                    .iter()
                    .filter(|(_, kk, _)| kk == key.as_bytes())
                    .map(|(_, _, v)| String::from_utf8_lossy(v).parse().expect("a number"))
                    .collect()
            };
            let parent_last = values(0).last().copied();
            for child in [1, 2] {
                if let (Some(last), Some(first)) = (parent_last, values(child).first().copied()) {
                    assert!(last < first, "{key}: {last} in the parent after {first} in child {child}");
                }
            }
        }
    });
}

/// A consumer group of two members reads a ranged topic through splits and merges made while
/// a keyed producer writes: every acknowledged record is delivered, and per key the first
/// deliveries come in the order written, although a parent and its children may be owned by
/// different members (a member holds a child back until the group committed its parents'
/// seal offsets).
#[test]
fn a_consumer_group_reads_through_the_lineage_in_key_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic_with("grp", 2, 1, Partitioning::HashRange, &[]).await.expect("create");
        let delivered: Delivered = Rc::default();
        let stop = Rc::new(RefCell::new(false));
        let members: Vec<_> = (0..2)
            .map(|_| {
                let (client, delivered, stop) = (client.clone(), delivered.clone(), stop.clone());
                compio::runtime::spawn(async move {
                    let config = ConsumerConfig { partition_max_bytes: 512, ..ConsumerConfig::default() };
                    let mut m = GroupConsumer::new(client, config, GroupConfig::new("readers"));
                    m.subscribe(&["grp"]);
                    while !*stop.borrow() {
                        for r in m.poll().await.expect("poll") {
                            let v = String::from_utf8_lossy(&r.value).parse().expect("a number");
                            delivered.borrow_mut().push((r.key.expect("keyed"), v));
                        }
                    }
                    m.close().await.expect("close");
                })
            })
            .collect();
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut deliveries = Vec::new();
        let mut i = 0u64;
        for change in 0..6 {
            for _ in 0..300 {
                let key = format!("k{}", i % 20);
                let d = producer.send("grp", Some(key.as_bytes()), i.to_string().as_bytes()).await.expect("send");
                deliveries.push((key, i, d));
                i += 1;
                if i.is_multiple_of(20) {
                    compio::time::sleep(Duration::from_millis(3)).await;
                }
            }
            let parts = open_ranges(&client.topic_metadata("grp").await.expect("metadata"));
            if change % 3 == 2 {
                let pair = parts.windows(2).find(|w| w[0].0.precedes(&w[1].0)).expect("neighbours");
                client.merge_partitions("grp", [pair[0].1, pair[1].1]).await.expect("merge");
            } else {
                client.split_partition("grp", parts[0].1, None).await.expect("split");
            }
        }
        producer.flush().await;
        let mut acked: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
        for (key, i, d) in deliveries {
            d.await.expect("acknowledged");
            acked.entry(key.into_bytes()).or_default().push(i);
        }
        let total: usize = acked.values().map(Vec::len).sum();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let firsts: std::collections::HashSet<(Vec<u8>, u64)> = delivered.borrow().iter().cloned().collect();
            if firsts.len() >= total {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the group delivered {} of {total}", firsts.len());
            compio::time::sleep(Duration::from_millis(100)).await;
        }
        *stop.borrow_mut() = true;
        for m in members {
            m.await.expect("a member");
        }
        // Per key, the first deliveries are exactly the acknowledged values, in order.
        let mut firsts: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in delivered.borrow().iter() {
            if seen.insert((k.clone(), *v)) {
                firsts.entry(k.clone()).or_default().push(*v);
            }
        }
        for (k, values) in &acked {
            assert_eq!(firsts.get(k), Some(values), "key {}", String::from_utf8_lossy(k));
        }
    });
    drop(broker);
}

/// Keys `k0, k1, ...` whose hash falls in each of a hash-range topic's `n` initial ranges,
/// `per_range` per range.
fn keys_by_range(n: u32, per_range: usize) -> Vec<Vec<String>> {
    let ranges = Partitioning::HashRange.initial_ranges(n);
    let mut keys = vec![Vec::new(); ranges.len()];
    let mut i = 0u64;
    while keys.iter().any(|k: &Vec<String>| k.len() < per_range) {
        let key = format!("k{i}");
        let point = Partitioning::HashRange.point(key.as_bytes()).expect("ranged");
        let r = ranges.iter().position(|r| r.contains(point.bytes())).expect("the ranges cover every point");
        if keys[r].len() < per_range {
            keys[r].push(key);
        }
        i += 1;
    }
    keys
}

/// Records per second of each partition between two descriptions `secs` apart.
fn rates(
    before: &skein_client::wire::TopicDescription,
    after: &skein_client::wire::TopicDescription,
    secs: f64,
) -> BTreeMap<u32, f64> {
    let start: HashMap<u32, u64> = before.partitions.iter().map(|p| (p.partition, p.log_end)).collect();
    after
        .partitions
        .iter()
        .map(|p| (p.partition, (p.log_end - start.get(&p.partition).copied().unwrap_or(0)) as f64 / secs))
        .collect()
}

/// Issue 21: a range taking 5 times its neighbours' load is split by the controller on its
/// own within 5 s (its leader reports the load each second; the topic sets
/// `auto.split.records.per.sec`), at the median of the keys it saw, and afterwards the
/// per-partition rates are closer: each child takes about half, no partition crosses the
/// threshold, and nothing else changes (the rate limit and the threshold hold). No error
/// reaches the producer.
#[test]
fn a_range_with_five_times_its_neighbours_load_splits_by_itself_and_the_load_evens_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        let configs = [("auto.split.records.per.sec".to_owned(), "1500".to_owned())];
        client.create_topic_with("hot", 4, 1, Partitioning::HashRange, &configs).await.expect("create");
        let keys = keys_by_range(4, 40);
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let stop = Rc::new(RefCell::new(false));
        // Every 10 ms: 25 records to partition 1's keys, 5 to each other's (2,500/s against
        // 500/s), over 40 keys per range.
        let task = {
            let (producer, stop) = (producer.clone(), stop.clone());
            compio::runtime::spawn(async move {
                let mut deliveries = Vec::new();
                let mut next = std::time::Instant::now();
                let mut tick = 0usize;
                while !*stop.borrow() {
                    for (range, keys) in keys.iter().enumerate() {
                        let count = if range == 1 { 25 } else { 5 };
                        for j in 0..count {
                            let key = &keys[(tick * count + j) % keys.len()];
                            let d = producer.send("hot", Some(key.as_bytes()), b"x").await;
                            deliveries.push(d);
                        }
                    }
                    tick += 1;
                    next += Duration::from_millis(10);
                    compio::time::sleep(next.saturating_duration_since(std::time::Instant::now())).await;
                }
                producer.flush().await;
                let mut errors = Vec::new();
                for d in deliveries {
                    match d {
                        Ok(d) => {
                            if let Err(e) = d.await {
                                errors.push(e.to_string());
                            }
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors
            })
        };
        let started = std::time::Instant::now();
        let initial = client.describe_topic("hot").await.expect("describe");
        let (split_after, at_split) = loop {
            compio::time::sleep(Duration::from_millis(100)).await;
            client.invalidate_metadata("hot");
            let now = client.describe_topic("hot").await.expect("describe");
            if now.partitions.len() > 4 {
                break (started.elapsed(), now);
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no split after 10 s");
        };
        // Until the split (the parent's log end stops at its seal, a moment before).
        let hot_rates = rates(&initial, &at_split, split_after.as_secs_f64());
        let t = client.topic_metadata("hot").await.expect("metadata");
        let children: Vec<u32> =
            t.partitions.iter().filter(|p| p.lineage.parents == [1]).map(|p| p.partition).collect();
        assert_eq!(children.len(), 2, "partition 1 split: {:?}", t.partitions);
        // The per-partition rates over 3 s once the children took over.
        compio::time::sleep(Duration::from_millis(500)).await;
        client.invalidate_metadata("hot");
        let from = client.describe_topic("hot").await.expect("describe");
        compio::time::sleep(Duration::from_secs(3)).await;
        client.invalidate_metadata("hot");
        let to = client.describe_topic("hot").await.expect("describe");
        *stop.borrow_mut() = true;
        let errors = task.await.expect("the producer task");
        assert!(errors.is_empty(), "errors reached the producer: {:?}", &errors[..errors.len().min(5)]);
        let after = rates(&from, &to, 3.0);
        let open: Vec<u32> = to.partitions.iter().filter(|p| p.lineage.seal == 0).map(|p| p.partition).collect();
        let spread = |rates: &BTreeMap<u32, f64>, parts: &[u32]| {
            let r: Vec<f64> = parts.iter().map(|p| rates[p]).collect();
            r.iter().cloned().fold(0.0, f64::max) / r.iter().cloned().fold(f64::MAX, f64::min).max(1.0)
        };
        let before_spread = spread(&hot_rates, &[0, 1, 2, 3]);
        let after_spread = spread(&after, &open);
        println!(
            "split after {:.2} s; records/s before {:?} (max/min {before_spread:.2}); after {:?} (open {open:?}, max/min {after_spread:.2})",
            split_after.as_secs_f64(),
            hot_rates,
            after
        );
        assert!(split_after <= Duration::from_secs(5), "split after {split_after:?}");
        assert_eq!(open.len(), 5, "one split only: {open:?}");
        for child in &children {
            assert!((700.0..=1_800.0).contains(&after[child]), "child {child} takes {} records/s", after[child]);
        }
        assert!(after_spread < 4.0, "rates after the split: {after:?}");
        assert!(before_spread > 3.0, "the hot range took {hot_rates:?} before the split");
        assert!(after_spread < before_spread, "max/min {after_spread:.2} not below {before_spread:.2}");
    });
    drop(broker);
}

/// The other automatic triggers on a real broker: a partition whose log passes
/// `auto.split.bytes` splits, and neighbours taking fewer records per second than
/// `auto.merge.records.per.sec` merge, one change per `auto.split.interval.ms`, until one
/// partition is left; a hash topic refuses the settings.
#[test]
fn a_large_partition_splits_and_cold_neighbours_merge_by_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        let c = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let refused = client.create_topic("plain", 2, 1, &c(&[("auto.split.bytes", "1000")])).await;
        assert!(refused.is_err_and(|e| e.to_string().contains("ranged")), "a hash topic takes no auto settings");
        let bad = c(&[("auto.split.bytes", "lots")]);
        assert!(client.create_topic_with("bad", 2, 1, Partitioning::HashRange, &bad).await.is_err());
        let big = c(&[("auto.split.bytes", "300000"), ("auto.split.partitions.max", "2")]);
        client.create_topic_with("big", 1, 1, Partitioning::HashRange, &big).await.expect("create");
        let cold = c(&[("auto.merge.records.per.sec", "100"), ("auto.split.interval.ms", "1000")]);
        client.create_topic_with("cold", 4, 1, Partitioning::HashRange, &cold).await.expect("create");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let value = vec![b'v'; 1000];
        let started = std::time::Instant::now();
        let mut i = 0u64;
        let (mut big_split, mut cold_open) = (None, 4);
        while started.elapsed() < Duration::from_secs(15) {
            // 400 KB/s to "big", 20 records/s to "cold".
            for j in 0..4 {
                let key = format!("k{}", i * 4 + j);
                producer.send("big", Some(key.as_bytes()), &value).await.expect("queued");
            }
            if i.is_multiple_of(5) {
                producer.send("cold", Some(format!("c{i}").as_bytes()), b"x").await.expect("queued");
            }
            i += 1;
            compio::time::sleep(Duration::from_millis(10)).await;
            if i.is_multiple_of(25) {
                client.invalidate_metadata("big");
                client.invalidate_metadata("cold");
                let b = client.topic_metadata("big").await.expect("metadata");
                if b.partitions.len() > 1 && big_split.is_none() {
                    big_split = Some(started.elapsed());
                }
                let t = client.topic_metadata("cold").await.expect("metadata");
                cold_open = open_ranges(&t).len();
                if big_split.is_some() && cold_open == 1 {
                    break;
                }
            }
        }
        producer.flush().await;
        println!("big split after {big_split:?}; cold open partitions {cold_open} after {:?}", started.elapsed());
        assert!(big_split.is_some_and(|t| t < Duration::from_secs(5)), "big split after {big_split:?}");
        assert_eq!(cold_open, 1, "the cold partitions merged into one");
        let b = client.topic_metadata("big").await.expect("metadata");
        assert_eq!(open_ranges(&b).len(), 2, "auto.split.partitions.max holds");
    });
    drop(broker);
}

/// A transactional producer writing keyed records through splits and merges: a partition
/// sealed before it joined a transaction is answered PARTITION_SEALED by the coordinator, and
/// its queued records go to the partitions now owning their keys, which join the transaction
/// instead; no transaction fails, and a read_committed reader following the lineage gets every
/// committed record once, each key's in order.
#[test]
fn a_transactional_producer_commits_through_splits_and_merges() {
    use skein_client::{Isolation, TransactionalProducer, TxnConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic_with("tx", 2, 1, Partitioning::HashRange, &[]).await.expect("create");
        let mut p = TransactionalProducer::init(client.clone(), TxnConfig::new("tx-split")).await.expect("init");
        let mut committed: Vec<(String, u64)> = Vec::new();
        let mut i = 0u64;
        for txn in 0..40 {
            if txn % 4 == 2 {
                // A change between transactions, or while one is open (odd ones).
                let t = client.topic_metadata("tx").await.expect("metadata");
                let parts = open_ranges(&t);
                match parts.windows(2).find(|w| w[0].0.precedes(&w[1].0)).filter(|_| txn % 8 == 6) {
                    Some(w) => drop(client.merge_partitions("tx", [w[0].1, w[1].1]).await.expect("merge")),
                    None => drop(client.split_partition("tx", parts[0].1, None).await.expect("split")),
                }
            }
            p.begin().expect("begin");
            let mut sent = Vec::new();
            for _ in 0..20 {
                let key = format!("k{}", i % 16);
                p.send("tx", None, Some(key.as_bytes()), i.to_string().as_bytes()).await.expect("send");
                sent.push((key, i));
                i += 1;
            }
            p.commit().await.unwrap_or_else(|e| panic!("transaction {txn}: {e}"));
            committed.extend(sent);
        }
        let t = client.topic_metadata("tx").await.expect("metadata");
        assert!(t.partitions.len() >= 2 + 10, "splits and merges happened: {} partitions", t.partitions.len());
        let config = ConsumerConfig { isolation: Isolation::ReadCommitted, ..ConsumerConfig::default() };
        let mut c = Consumer::new(client.clone(), config);
        c.follow("tx", Position::Beginning).await.expect("follow");
        let mut seen: Vec<(String, u64)> = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < committed.len() {
            assert!(std::time::Instant::now() < deadline, "read {} of {}", seen.len(), committed.len());
            for r in c.poll().await.expect("poll") {
                let key = String::from_utf8(r.key.expect("keyed")).expect("utf8");
                seen.push((key, String::from_utf8_lossy(&r.value).parse().expect("a number")));
            }
        }
        let mut sorted = seen.clone();
        sorted.sort_by_key(|(_, v)| *v);
        assert_eq!(sorted, committed, "every committed record once");
        let mut last: HashMap<String, u64> = HashMap::new();
        for (k, v) in &seen {
            if let Some(before) = last.insert(k.clone(), *v) {
                assert!(before < *v, "{k}: {v} read after {before}");
            }
        }
    });
    drop(broker);
}
