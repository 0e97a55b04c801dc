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
