//! Secondary indexes against real broker processes: a document and an asynchronous term
//! index built online on a table with rows, kept under a steady keyed write load, through
//! SIGKILLs of the brokers leading the table's partitions; the index checker
//! (`Client::check_index`, `skein table index check`) confirms each agrees with the table
//! (the document index at every snapshot it is checked at, during the load; the term index
//! after its lag), and catches the planted index bugs. Also: the `skein table index` /
//! `table query --explain` contract, and key-range tables.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{block_on, sibling, Broker};
use skein_client::index::{IndexDef, IndexKind, IndexMode};
use skein_client::partitioning::Partitioning;
use skein_client::table::{IndexCheck, TableError};
use skein_client::{Client, Table};

const CITIES: [&str; 4] = ["Oslo", "Bergen", "Paris", "Lima"];

fn skein(bin: &Path, addr: &str, args: &[&str]) -> Output {
    Command::new(bin).args(["--brokers", addr]).args(args).output().expect("run skein")
}

fn lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect()
}

fn row(city: &str, n: u64) -> String {
    format!(r#"{{"city":"{city}","n":{n}}}"#)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Waits until every partition of the index finished its first pass.
async fn built(client: &Client, def: &IndexDef) {
    let start = Instant::now();
    loop {
        if let Ok(state) = client.index_state(def).await {
            if state.iter().all(|p| p.built) {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "index {} not built", def.name);
        compio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The check once it can run (a term index caught up, no failover in the way).
async fn checked(client: &Client, def: &IndexDef, limit: Duration) -> IndexCheck {
    let start = Instant::now();
    loop {
        match client.check_index(def).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(start.elapsed() < limit, "index {} never checkable: {e}", def.name);
                compio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One write: a random key set to a random city, or deleted (one in eight).
async fn write_one(table: &Table, rng: &mut Rng, n: u64) -> Result<(), TableError> {
    let key = format!("k{:03}", rng.next() % 300);
    if rng.next().is_multiple_of(8) {
        table.delete(key.as_bytes()).await.map(drop)
    } else {
        let city = CITIES[(rng.next() % CITIES.len() as u64) as usize];
        table.put(key.as_bytes(), row(city, n).as_bytes()).await.map(drop)
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn indexes_agree_with_their_table_through_leader_kills() {
    let cluster = Cluster::start(211, 19711);
    let addrs = cluster.addrs.join(",");
    // A table with rows, then both indexes built online over them.
    let (doc, term) = block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        client.create_table("people", 3, 3, None).await.expect("create table");
        let table = client.table("people").await.expect("table");
        for i in 0..200u64 {
            let city = CITIES[(i % 4) as usize];
            table.put(format!("k{i:03}").as_bytes(), row(city, i).as_bytes()).await.expect("seed");
        }
        let doc = client
            .create_index("people", "by_city", "city", IndexKind::Document, IndexMode::Sync)
            .await
            .expect("document index");
        let term = client
            .create_index("people", "city_t", "city", IndexKind::Term, IndexMode::Async)
            .await
            .expect("term index");
        built(&client, &doc).await;
        built(&client, &term).await;
        let first = checked(&client, &term, Duration::from_secs(30)).await;
        assert!(first.disagreements.is_empty(), "after the online build: {:?}", first.disagreements);
        assert_eq!(first.rows, 200);
        (doc, term)
    });

    // A steady load with lag probes: a unique value written, then looked up by the term
    // index until it shows.
    let mut lags_ms = Vec::new();
    let mut doc_checks = 0;
    block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        let table = client.table("people").await.expect("table");
        let writer = {
            let table = table.clone();
            compio::runtime::spawn(async move {
                let mut rng = Rng(0x5eed);
                let end = Instant::now() + Duration::from_secs(8);
                let mut n = 0;
                while Instant::now() < end {
                    write_one(&table, &mut rng, n).await.expect("a write without faults");
                    n += 1;
                    compio::time::sleep(Duration::from_millis(15)).await;
                }
                n
            })
        };
        let end = Instant::now() + Duration::from_secs(8);
        let mut i = 0;
        while Instant::now() < end {
            let probe = format!("probe-{i}");
            table.put(probe.as_bytes(), row(&probe, i).as_bytes()).await.expect("probe write");
            let written = Instant::now();
            loop {
                let found = table.query(&term, probe.as_bytes()).await.expect("term lookup");
                if found.rows.iter().any(|(k, _)| k == probe.as_bytes()) {
                    assert_eq!(found.touched.len(), 1, "a term lookup reads one partition");
                    break;
                }
                assert!(written.elapsed() < Duration::from_secs(30), "{probe} never indexed");
                compio::time::sleep(Duration::from_millis(5)).await;
            }
            lags_ms.push(written.elapsed().as_millis() as u64);
            if i.is_multiple_of(5) {
                let c = client.check_index(&doc).await.expect("document check");
                assert!(c.disagreements.is_empty(), "document index under load: {:?}", c.disagreements);
                doc_checks += 1;
            }
            i += 1;
            compio::time::sleep(Duration::from_millis(100)).await;
        }
        let writes = writer.await.expect("writer");
        lags_ms.sort_unstable();
        println!(
            "steady load: {writes} writes, {} probes, term index lag p50 {} ms, p99 {} ms, max {} ms; {doc_checks} \
             document checks agreed",
            lags_ms.len(),
            percentile(&lags_ms, 0.5),
            percentile(&lags_ms, 0.99),
            lags_ms.last().copied().unwrap_or(0)
        );
    });
    assert!(lags_ms.len() >= 10, "only {} probes", lags_ms.len());

    // The same load while the brokers are SIGKILLed in turn (each leads some partition).
    let stop = Arc::new(AtomicBool::new(false));
    let ms = Duration::from_millis;
    let faults = cluster.kill_in_turn(stop.clone(), ms(1000), ms(1500), ms(2500));
    let (writes, failed, agreed) = block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        let table = client.table("people").await.expect("table");
        let mut rng = Rng(0xfa17);
        let (mut writes, mut failed, mut agreed) = (0u64, 0u64, 0u64);
        let end = Instant::now() + Duration::from_secs(14);
        while Instant::now() < end {
            match write_one(&table, &mut rng, writes).await {
                Ok(()) => writes += 1,
                Err(_) => failed += 1,
            }
            if writes.is_multiple_of(40) {
                // A failover may make a check fail to run; what it finds must agree.
                if let Ok(c) = client.check_index(&doc).await {
                    assert!(c.disagreements.is_empty(), "document index under kills: {:?}", c.disagreements);
                    agreed += 1;
                }
            }
            compio::time::sleep(Duration::from_millis(15)).await;
        }
        (writes, failed, agreed)
    });
    stop.store(true, Ordering::Relaxed);
    let (cluster, kills) = faults.join().expect("fault thread");
    let addrs = cluster.addrs.join(",");
    block_on(async {
        let client = Client::connect(&addrs).await.expect("connect");
        let d = checked(&client, &doc, Duration::from_secs(30)).await;
        assert!(d.disagreements.is_empty(), "document index after kills: {:?}", d.disagreements);
        let t = checked(&client, &term, Duration::from_secs(60)).await;
        assert!(t.disagreements.is_empty(), "term index after kills: {:?}", t.disagreements);
        println!(
            "under {kills} kills: {writes} writes ({failed} failed), {agreed} document checks agreed; after: document \
             {} rows in {} lookups, term {} rows in {} index rows agree",
            d.rows, d.compared, t.rows, t.compared
        );
        assert!(t.rows > 100 && t.compared > 100, "the check compared little: {t:?}");
    });
    assert!(kills >= 3, "the faults ran ({kills} kills)");
    assert!(writes >= 100, "only {writes} writes under kills");
    drop(cluster);
}

/// A broker with a planted index bug, a table with one row moved from one city to another,
/// and the check of `kind`'s index.
fn planted(plant: &str, kind: IndexKind) -> IndexCheck {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &["--unsafe-index-plant", plant]);
    let check = block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_table("t", 2, 1, None).await.expect("create table");
        let table = client.table("t").await.expect("table");
        let mode = if kind == IndexKind::Term { IndexMode::Async } else { IndexMode::Sync };
        let def = client.create_index("t", "ix", "city", kind, mode).await.expect("index");
        built(&client, &def).await;
        table.put(b"a", row("Oslo", 1).as_bytes()).await.expect("put");
        table.put(b"b", row("Oslo", 2).as_bytes()).await.expect("put");
        // Indexed in Oslo (a term index's follower has caught up) before a moves.
        let start = Instant::now();
        while table.query(&def, b"Oslo").await.expect("lookup").rows.len() < 2 {
            assert!(start.elapsed() < Duration::from_secs(30), "a and b never indexed");
            compio::time::sleep(Duration::from_millis(20)).await;
        }
        table.put(b"a", row("Lima", 3).as_bytes()).await.expect("move a");
        checked(&client, &def, Duration::from_secs(30)).await
    });
    drop(broker);
    check
}

#[test]
fn the_index_checker_catches_planted_index_bugs() {
    let term = planted("term-keeps-old-entries", IndexKind::Term);
    assert!(
        term.disagreements.iter().any(|d| d == "extra entry Oslo=a"),
        "a term index keeping a's old entry: {term:?}"
    );
    let doc = planted("document-no-recheck", IndexKind::Document);
    assert!(
        doc.disagreements.iter().any(|d| d.contains("city=Oslo gives [\"a\"], the rows holding it are []")),
        "a document index answering a's old value: {doc:?}"
    );
}

#[test]
fn the_index_cli_contract_and_key_range_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let bin = sibling("skein", &["-p", "skein-client", "--bin", "skein"]);
    let s = |args: &[&str]| skein(&bin, &broker.addr, args);
    let ok = |args: &[&str]| {
        let o = s(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        lines(&o)
    };
    // A key-range table: keys by interval, a scan reads only the partitions it overlaps.
    ok(&["table", "create", "users", "--partitions", "4", "--partitioning", "key-range"]);
    for (k, city) in [("ann", "Oslo"), ("bob", "Lima"), ("kim", "Oslo"), ("tom", "Paris"), ("zoe", "Oslo")] {
        let v = row(city, 1);
        assert_eq!(ok(&["table", "put", "users", k, &v]), ["ok"]);
    }
    assert_eq!(ok(&["table", "scan", "users", "a", "c"]).len(), 3, "ann, bob, end");
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        let t = client.table("users").await.expect("table");
        assert_eq!(t.partitioning(), Partitioning::KeyRange);
        assert_eq!(t.scan_partitions(b"a", b"c").len(), 1, "[a, c) is inside the first quarter of the key space");
        assert_eq!(t.scan_partitions(b"", b"").len(), 4);
        assert_eq!(t.scan_partitions(b"", b"A").len(), 2, "[\"\", A) spans the first two quarters");
        assert_ne!(t.partition_of(b"\x01"), t.partition_of(b"ann"));
    });
    // Indexes, exactly as the issue spells the commands.
    assert_eq!(
        ok(&["table", "index", "create", "users", "by_city", "--field", "city", "--kind", "document"]),
        ["created index by_city"]
    );
    assert_eq!(
        ok(&["table", "index", "create", "users", "city_t", "--field", "city", "--kind", "term", "--async"]),
        ["created index city_t"]
    );
    let want =
        [r#"row ann {"city":"Oslo","n":1}"#, r#"row kim {"city":"Oslo","n":1}"#, r#"row zoe {"city":"Oslo","n":1}"#];
    let doc = ok(&["table", "query", "users", "--index", "by_city", "--value", "Oslo", "--explain"]);
    assert_eq!(doc.iter().filter(|l| l.starts_with("partition users ")).count(), 4, "{doc:?}");
    assert!(doc.contains(&"touched 4".to_owned()), "{doc:?}");
    assert_eq!(doc[doc.len() - 4..], [want[0], want[1], want[2], "end"]);
    let term = ok(&["table", "query", "users", "--index", "city_t", "--value", "Oslo", "--explain"]);
    assert!(term[0].starts_with("partition users.index.city_t "), "{term:?}");
    assert_eq!(term[1], "touched 1");
    assert_eq!(term[2..], [want[0], want[1], want[2], "end"]);
    assert_eq!(ok(&["table", "index", "check", "users", "by_city"])[0].split(' ').next(), Some("agree"));
    assert_eq!(ok(&["table", "index", "check", "users", "city_t"])[0].split(' ').next(), Some("agree"));
    let list = ok(&["table", "index", "list", "users"]);
    assert_eq!(list[0], "index by_city document sync city built 5/5");
    assert!(list[1].starts_with("index city_t term async city built 5/5 lag-ms 0 behind 0"), "{list:?}");
    // Bad input: clear errors, nothing made.
    for (args, says) in [
        (&["table", "index", "create", "nope", "x", "--field", "city", "--kind", "term"][..], "not found"),
        (&["table", "index", "create", "users", "x", "--field", "city", "--kind", "term", "--sync"][..], "--async"),
        (&["table", "index", "create", "users", "x", "--field", "city", "--kind", "btree"][..], "document or term"),
        (&["table", "index", "create", "users", "by_city", "--field", "n", "--kind", "document"][..], "exists"),
        (&["table", "query", "users", "--index", "nope", "--value", "x"][..], "no index nope"),
    ] {
        let o = s(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(ok(&["table", "index", "list", "users"]).len(), 2, "nothing half made");
    // Read-your-writes on the asynchronous index: a lookup with the session of a write
    // answers it at the first try.
    let session = dir.path().join("session.txt");
    let session = session.to_str().expect("utf-8 path");
    for i in 0..10 {
        let (key, city) = (format!("s{i}"), format!("Rome{i}"));
        assert_eq!(ok(&["table", "put", "users", &key, &row(&city, i), "--session", session]), ["ok"]);
        let found = ok(&["table", "query", "users", "--index", "city_t", "--value", &city, "--session", session]);
        assert_eq!(found, [format!("row {key} {}", row(&city, i)), "end".to_owned()]);
    }
    // A split of the partition holding ann and bob between them: both keep their rows, and
    // the indexes follow.
    let split = ok(&["topic", "split", "users", "--partition", "1", "--at", "b"]);
    assert!(split[0].starts_with("split users partitions 1 into 4 [@, b) and 5 [b, 0x80)"), "{split:?}");
    assert_eq!(
        ok(&["table", "scan", "users", "a", "c"]),
        [r#"row ann {"city":"Oslo","n":1}"#, r#"row bob {"city":"Lima","n":1}"#, "end"]
    );
    assert_eq!(ok(&["table", "put", "users", "bob", &row("Oslo", 2)]), ["ok"]);
    let doc = ok(&["table", "query", "users", "--index", "by_city", "--value", "Oslo", "--explain"]);
    assert!(doc.contains(&"touched 5".to_owned()), "five open partitions: {doc:?}");
    assert_eq!(doc.iter().filter(|l| l.starts_with("row ")).count(), 4, "{doc:?}");
    let start = Instant::now();
    loop {
        let term = ok(&["table", "query", "users", "--index", "city_t", "--value", "Oslo"]);
        if term.len() == 5 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "bob never indexed in Oslo: {term:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    // Until the children's followers took the parent's entries over, the check says the
    // index is behind (and exits 1).
    while !lines(&s(&["table", "index", "check", "users", "city_t"])).first().is_some_and(|l| l.starts_with("agree ")) {
        assert!(start.elapsed() < Duration::from_secs(30), "the term index never agreed after the split");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_table_splits_and_merges_under_writes_carrying_its_rows_and_indexes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_table_with("orders", 2, 1, Partitioning::KeyRange, None).await.expect("create table");
        let table = client.table("orders").await.expect("table");
        let mut model = std::collections::BTreeMap::new();
        let mut rng = Rng(0x5b1e);
        let mut put = async |table: &Table, model: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>, n: u64| {
            let key = format!("k{:03}", rng.next() % 200).into_bytes();
            let value = row(CITIES[(rng.next() % 4) as usize], n).into_bytes();
            // Sealed partitions on the way are retried inside: no error reaches the writer.
            table.put(&key, &value).await.unwrap_or_else(|e| panic!("write {n}: {e}"));
            model.insert(key, value);
        };
        for n in 0..150 {
            put(&table, &mut model, n).await;
        }
        let doc = client
            .create_index("orders", "by_city", "city", IndexKind::Document, IndexMode::Sync)
            .await
            .expect("document index");
        let term = client
            .create_index("orders", "city_t", "city", IndexKind::Term, IndexMode::Async)
            .await
            .expect("term index");
        built(&client, &doc).await;
        built(&client, &term).await;
        // Six splits and merges, with writes between them (each split at a key, so children
        // hold rows; each merge of the first two open neighbours).
        let mut n = 150;
        for round in 0..6 {
            let md = client.topic_metadata("orders").await.expect("metadata");
            let open = skein_client::partitioning::open_ranges(&md);
            if round % 2 == 0 {
                let (range, p) = open.iter().find(|(r, _)| r.splits_at(b"k1")).or(open.first()).expect("open");
                let at = if range.splits_at(b"k1") {
                    b"k1".to_vec()
                } else {
                    range.midpoint(Partitioning::KeyRange).expect("mid")
                };
                client.split_partition("orders", *p, Some(&at)).await.expect("split");
            } else {
                client.merge_partitions("orders", [open[0].1, open[1].1]).await.expect("merge");
            }
            for _ in 0..40 {
                put(&table, &mut model, n).await;
                n += 1;
            }
        }
        let md = client.topic_metadata("orders").await.expect("metadata");
        assert_eq!(md.partitions.len(), 2 + 3 * 2 + 3, "three splits and three merges made nine partitions");
        let rows: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
            table.scan(b"", b"").await.expect("scan").into_iter().collect();
        assert_eq!(rows, model, "every write kept, through the splits and merges");
        for def in [&doc, &term] {
            let c = checked(&client, def, Duration::from_secs(30)).await;
            assert!(c.disagreements.is_empty(), "{} after splits: {:?}", def.name, c.disagreements);
            assert_eq!(c.rows, model.len() as u64);
        }
        let oslo: Vec<Vec<u8>> =
            model.iter().filter(|(_, v)| v.starts_with(br#"{"city":"Oslo""#)).map(|(k, _)| k.clone()).collect();
        let found = table.query(&term, b"Oslo").await.expect("lookup");
        assert_eq!(found.rows.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), oslo);
        assert_eq!(found.touched.len(), 1);
        println!("{n} writes through 3 splits and 3 merges; {} rows; both indexes agree", model.len());
    });
}
