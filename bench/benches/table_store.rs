//! The store behind a table partition's machine, chosen by measurement (issue 20): an
//! in-memory multi-version map (`BTreeMap<key, Vec<(offset, Option<value>)>>`, the layout of
//! `skein-broker`'s `core::table::store::TableMachine`) against two embedded engines, redb (a
//! copy-on-write B-tree) and fjall (an LSM tree), each holding one row per version keyed by
//! (key, offset).
//!
//! The log is the durable copy, so a store is a cache of the applied prefix: the engines
//! commit without an fsync (redb `Durability::None`, fjall batches with no persist mode),
//! batched per 100 applies, in files in a temporary directory (the page cache).
//!
//! Operations, with 16-byte keys and 100-byte values:
//! - `apply`: 10,000 writes of one version each to 10,000 keys that already hold one version;
//! - `get`: a point read at a snapshot (newest version below it) of a random key, out of
//!   10,000 keys with 3 versions each, the value copied into a response buffer;
//! - `scan`: the 100 keys of a range at a snapshot, same data;
//! - `snapshot`: a dump of 100,000 keys (one version each) into the byte layout of
//!   `TableMachine::snapshot` (length-prefixed fields, CRC32C of the body).

use std::hint::black_box;
use std::ops::Bound;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;
/// Keys of the apply, read and scan data sets.
const KEYS: u64 = 10_000;
/// Versions per key in the read and scan data set; reads are at the snapshot that sees the
/// second of them.
const READ_VERSIONS: u64 = 3;
/// Applies per engine commit.
const COMMIT_EVERY: usize = 100;
/// Keys of a scan.
const SCAN_KEYS: u64 = 100;
/// Keys of the snapshot dump.
const DUMP_KEYS: u64 = 100_000;

/// A key: `k` then the big-endian index, zero padded to 16 bytes, so key order is index order.
fn key(i: u64) -> [u8; KEY_BYTES] {
    let mut k = [0u8; KEY_BYTES];
    k[0] = b'k';
    k[KEY_BYTES - 8..].copy_from_slice(&i.to_be_bytes());
    k
}

fn value(offset: u64) -> Vec<u8> {
    let mut v = vec![b'v'; VALUE_BYTES];
    v[..8].copy_from_slice(&offset.to_le_bytes());
    v
}

/// One applied write: the offset of its record, the key, the value (None: a delete).
struct Write {
    offset: u64,
    key: [u8; KEY_BYTES],
    value: Option<Vec<u8>>,
}

/// Writes at offsets `from..from + n`, key `offset % keys`, a value each.
fn writes(from: u64, n: u64, keys: u64) -> Vec<Write> {
    (from..from + n).map(|o| Write { offset: o, key: key(o % keys), value: Some(value(o)) }).collect()
}

/// The operations each store offers the table machine.
trait Store {
    /// Applies `writes` (one engine commit: at most `COMMIT_EVERY`).
    fn apply(&mut self, writes: &[Write]);
    /// The newest version of `key` below `at`: its offset, the value appended to `out`.
    fn get(&self, key: &[u8], at: u64, out: &mut Vec<u8>) -> Option<u64>;
    /// The rows present at `at` among keys `[from, to)`, each appended to `out`; their number.
    fn scan(&self, from: &[u8], to: &[u8], at: u64, out: &mut Vec<u8>) -> usize;
    /// Every version, in the snapshot layout.
    fn dump(&self) -> Vec<u8>;
}

/// The snapshot body's encoder, as `TableMachine::snapshot` writes it.
struct Dump {
    body: Vec<u8>,
    keys: u64,
}

impl Dump {
    fn new() -> Dump {
        // Room for the applied offset and the key count, patched at the end.
        Dump { body: vec![0; 16], keys: 0 }
    }

    fn short(&mut self, b: &[u8]) {
        self.body.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.body.extend_from_slice(b);
    }

    /// A key and its versions (offset, value) in ascending offset order.
    fn key<'a>(&mut self, key: &[u8], versions: impl ExactSizeIterator<Item = (u64, Option<&'a [u8]>)>) {
        self.keys += 1;
        self.short(key);
        self.body.extend_from_slice(&(versions.len() as u64).to_le_bytes());
        for (offset, value) in versions {
            self.version(offset, value);
        }
    }

    fn version(&mut self, offset: u64, value: Option<&[u8]>) {
        self.body.extend_from_slice(&offset.to_le_bytes());
        match value {
            None => self.body.push(0),
            Some(v) => {
                self.body.push(1);
                self.short(v);
            }
        }
    }

    fn finish(mut self, applied: u64) -> Vec<u8> {
        self.body[..8].copy_from_slice(&applied.to_le_bytes());
        self.body[8..16].copy_from_slice(&self.keys.to_le_bytes());
        let mut out = Vec::with_capacity(20 + self.body.len());
        out.extend_from_slice(b"SKTS");
        out.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&self.body).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Appends a row (key, offset, value) to a response buffer.
fn respond(out: &mut Vec<u8>, key: &[u8], offset: u64, value: &[u8]) {
    out.extend_from_slice(key);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(value);
}

/// A key's versions, ascending by offset: (offset, value; None: a delete).
type Versions = Vec<(u64, Option<Vec<u8>>)>;

/// (a) The in-memory multi-version map.
#[derive(Default)]
struct Memory {
    rows: std::collections::BTreeMap<Vec<u8>, Versions>,
    applied: u64,
}

impl Store for Memory {
    fn apply(&mut self, writes: &[Write]) {
        for w in writes {
            // The machine decodes a part into owned buffers; copy here so both sides pay it.
            let versions = match self.rows.get_mut(w.key.as_slice()) {
                Some(v) => v,
                None => self.rows.entry(w.key.to_vec()).or_default(),
            };
            versions.push((w.offset, w.value.as_deref().map(<[u8]>::to_vec)));
            self.applied = w.offset + 1;
        }
    }

    fn get(&self, key: &[u8], at: u64, out: &mut Vec<u8>) -> Option<u64> {
        let versions = self.rows.get(key)?;
        let visible = versions.partition_point(|(o, _)| *o < at);
        let (offset, value) = versions.get(visible.checked_sub(1)?)?;
        if let Some(v) = value {
            out.extend_from_slice(v);
        }
        Some(*offset)
    }

    fn scan(&self, from: &[u8], to: &[u8], at: u64, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        for (key, versions) in self.rows.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to))) {
            let visible = versions.partition_point(|(o, _)| *o < at);
            if let Some((offset, Some(value))) = visible.checked_sub(1).and_then(|i| versions.get(i)) {
                respond(out, key, *offset, value);
                n += 1;
            }
        }
        n
    }

    fn dump(&self) -> Vec<u8> {
        let mut d = Dump::new();
        for (key, versions) in &self.rows {
            d.key(key, versions.iter().map(|(o, v)| (*o, v.as_deref())));
        }
        d.finish(self.applied)
    }
}

const REDB_TABLE: redb::TableDefinition<(&[u8], u64), Option<&[u8]>> = redb::TableDefinition::new("rows");

/// (b) redb, one row per version keyed by (key, offset).
struct Redb {
    db: redb::Database,
    applied: u64,
    _dir: tempfile::TempDir,
}

impl Redb {
    fn new() -> Redb {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = redb::Database::create(dir.path().join("table.redb")).expect("redb create");
        let txn = db.begin_write().expect("begin");
        txn.open_table(REDB_TABLE).expect("table");
        txn.commit().expect("commit");
        Redb { db, applied: 0, _dir: dir }
    }
}

impl Store for Redb {
    fn apply(&mut self, writes: &[Write]) {
        let mut txn = self.db.begin_write().expect("begin");
        txn.set_durability(redb::Durability::None).expect("durability");
        {
            let mut table = txn.open_table(REDB_TABLE).expect("table");
            for w in writes {
                table.insert((w.key.as_slice(), w.offset), w.value.as_deref()).expect("insert");
            }
        }
        txn.commit().expect("commit");
        if let Some(w) = writes.last() {
            self.applied = w.offset + 1;
        }
    }

    fn get(&self, key: &[u8], at: u64, out: &mut Vec<u8>) -> Option<u64> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read().expect("read");
        let table = txn.open_table(REDB_TABLE).expect("table");
        let (k, v) = table.range((key, 0)..(key, at)).expect("range").next_back()?.expect("row");
        if let Some(v) = v.value() {
            out.extend_from_slice(v);
        }
        Some(k.value().1)
    }

    fn scan(&self, from: &[u8], to: &[u8], at: u64, out: &mut Vec<u8>) -> usize {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read().expect("read");
        let table = txn.open_table(REDB_TABLE).expect("table");
        let mut n = 0;
        // The newest visible row of the current key, held as redb's guards (no copy).
        type Row<'a> = (redb::AccessGuard<'a, (&'static [u8], u64)>, redb::AccessGuard<'a, Option<&'static [u8]>>);
        let mut last: Option<Row<'_>> = None;
        let mut emit = |row: Option<Row<'_>>, out: &mut Vec<u8>| {
            if let Some((k, v)) = row {
                if let Some(value) = v.value() {
                    let (key, offset) = k.value();
                    respond(out, key, offset, value);
                    n += 1;
                }
            }
        };
        for row in table.range((from, 0)..(to, 0)).expect("range") {
            let (k, v) = row.expect("row");
            let (key, offset) = k.value();
            if offset >= at {
                continue;
            }
            if last.as_ref().is_some_and(|(l, _)| l.value().0 != key) {
                emit(last.take(), out);
            }
            last = Some((k, v));
        }
        emit(last, out);
        n
    }

    fn dump(&self) -> Vec<u8> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read().expect("read");
        let table = txn.open_table(REDB_TABLE).expect("table");
        let mut d = Dump::new();
        // The current key's versions, held as redb's guards (no copy).
        type Row<'a> = (redb::AccessGuard<'a, (&'static [u8], u64)>, redb::AccessGuard<'a, Option<&'static [u8]>>);
        let mut current: Vec<Row<'_>> = Vec::new();
        let flush = |d: &mut Dump, rows: &mut Vec<Row<'_>>| {
            if let Some((k, _)) = rows.first() {
                d.key(k.value().0, rows.iter().map(|(k, v)| (k.value().1, v.value())));
            }
            rows.clear();
        };
        for row in table.iter().expect("iter") {
            let (k, v) = row.expect("row");
            if current.first().is_some_and(|(c, _)| c.value().0 != k.value().0) {
                flush(&mut d, &mut current);
            }
            current.push((k, v));
        }
        flush(&mut d, &mut current);
        d.finish(self.applied)
    }
}

/// (c) fjall, one row per version keyed by key ++ big-endian offset (keys here are all 16
/// bytes; variable keys would need a length or an escape), the value behind a tag byte (0: a
/// delete, 1: a value).
struct Fjall {
    db: fjall::Database,
    rows: fjall::Keyspace,
    applied: u64,
    _dir: tempfile::TempDir,
}

fn fjall_key(key: &[u8], offset: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 8);
    k.extend_from_slice(key);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn fjall_split(k: &[u8]) -> (&[u8], u64) {
    let (key, offset) = k.split_at(k.len() - 8);
    (key, u64::from_be_bytes(offset.try_into().expect("8 bytes")))
}

fn fjall_value(v: &[u8]) -> Option<&[u8]> {
    match v.split_first() {
        Some((1, rest)) => Some(rest),
        _ => None,
    }
}

impl Fjall {
    fn new() -> Fjall {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = fjall::Database::builder(dir.path()).open().expect("fjall open");
        let rows = db.keyspace("rows", fjall::KeyspaceCreateOptions::default).expect("keyspace");
        Fjall { db, rows, applied: 0, _dir: dir }
    }
}

impl Store for Fjall {
    fn apply(&mut self, writes: &[Write]) {
        let mut batch = self.db.batch();
        for w in writes {
            let mut v = Vec::with_capacity(1 + VALUE_BYTES);
            match &w.value {
                Some(value) => {
                    v.push(1);
                    v.extend_from_slice(value);
                }
                None => v.push(0),
            }
            batch.insert(&self.rows, fjall_key(&w.key, w.offset), v);
        }
        batch.commit().expect("commit");
        if let Some(w) = writes.last() {
            self.applied = w.offset + 1;
        }
    }

    fn get(&self, key: &[u8], at: u64, out: &mut Vec<u8>) -> Option<u64> {
        let row = self.rows.range(fjall_key(key, 0)..fjall_key(key, at)).next_back()?;
        let (k, v) = row.into_inner().expect("row");
        if let Some(v) = fjall_value(&v) {
            out.extend_from_slice(v);
        }
        Some(fjall_split(&k).1)
    }

    fn scan(&self, from: &[u8], to: &[u8], at: u64, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        let mut last: Option<(fjall::UserKey, fjall::UserValue)> = None;
        let mut emit = |row: Option<(fjall::UserKey, fjall::UserValue)>, out: &mut Vec<u8>| {
            if let Some((k, v)) = row {
                if let Some(value) = fjall_value(&v) {
                    let (key, offset) = fjall_split(&k);
                    respond(out, key, offset, value);
                    n += 1;
                }
            }
        };
        for row in self.rows.range(fjall_key(from, 0)..fjall_key(to, 0)) {
            let (k, v) = row.into_inner().expect("row");
            let (key, offset) = fjall_split(&k);
            if offset >= at {
                continue;
            }
            if last.as_ref().is_some_and(|(l, _)| fjall_split(l).0 != key) {
                emit(last.take(), out);
            }
            last = Some((k, v));
        }
        emit(last, out);
        n
    }

    fn dump(&self) -> Vec<u8> {
        use fjall::Readable;
        let snapshot = self.db.snapshot();
        let mut d = Dump::new();
        // The current key and its versions.
        type Rows = (Vec<u8>, Vec<(u64, fjall::UserValue)>);
        let mut current: Option<Rows> = None;
        for row in snapshot.iter(&self.rows) {
            let (k, v) = row.into_inner().expect("row");
            let (key, offset) = fjall_split(&k);
            match &mut current {
                Some((ck, versions)) if ck.as_slice() == key => versions.push((offset, v)),
                _ => {
                    if let Some((ck, versions)) = current.take() {
                        d.key(&ck, versions.iter().map(|(o, v)| (*o, fjall_value(v))));
                    }
                    current = Some((key.to_vec(), vec![(offset, v)]));
                }
            }
        }
        if let Some((ck, versions)) = current {
            d.key(&ck, versions.iter().map(|(o, v)| (*o, fjall_value(v))));
        }
        d.finish(self.applied)
    }
}

const STORES: [&str; 3] = ["memory", "redb", "fjall"];

fn store(name: &str) -> Box<dyn Store> {
    match name {
        "memory" => Box::new(Memory::default()),
        "redb" => Box::new(Redb::new()),
        _ => Box::new(Fjall::new()),
    }
}

fn load(s: &mut dyn Store, writes: &[Write]) {
    for chunk in writes.chunks(COMMIT_EVERY) {
        s.apply(chunk);
    }
}

/// A store holding `versions` versions of each of `keys` keys (offsets in key round-robin).
fn loaded(name: &str, keys: u64, versions: u64) -> Box<dyn Store> {
    let mut s = store(name);
    load(s.as_mut(), &writes(0, keys * versions, keys));
    s
}

/// xorshift64: the keys read, the same sequence for every store.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_store/apply");
    group.throughput(Throughput::Elements(KEYS));
    let batch = writes(KEYS, KEYS, KEYS);
    for name in STORES {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let mut s = loaded(name, KEYS, 1);
                    let started = Instant::now();
                    load(s.as_mut(), &batch);
                    elapsed += started.elapsed();
                    black_box(&s);
                }
                elapsed
            });
        });
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let at = KEYS * (READ_VERSIONS - 1);
    let mut group = c.benchmark_group("table_store/get");
    group.throughput(Throughput::Elements(1));
    for name in STORES {
        let s = loaded(name, KEYS, READ_VERSIONS);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::with_capacity(4096);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                out.clear();
                let i = rng.below(KEYS);
                let version = s.get(&key(i), at, &mut out);
                debug_assert_eq!(version, Some(KEYS + i));
                black_box(version)
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("table_store/scan100");
    group.throughput(Throughput::Elements(SCAN_KEYS));
    for name in STORES {
        let s = loaded(name, KEYS, READ_VERSIONS);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::with_capacity(SCAN_KEYS as usize * 256);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                out.clear();
                let from = rng.below(KEYS - SCAN_KEYS);
                let n = s.scan(&key(from), &key(from + SCAN_KEYS), at, &mut out);
                assert_eq!(n, SCAN_KEYS as usize);
                black_box(out.len())
            });
        });
    }
    group.finish();
}

fn snapshot(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_store/snapshot100k");
    group.throughput(Throughput::Elements(DUMP_KEYS));
    let mut sizes = Vec::new();
    for name in STORES {
        let s = loaded(name, DUMP_KEYS, 1);
        sizes.push((name, s.dump().len()));
        group.bench_function(BenchmarkId::from_parameter(name), |b| b.iter(|| black_box(s.dump().len())));
    }
    group.finish();
    // Every store dumps the same bytes.
    assert!(sizes.windows(2).all(|w| w[0].1 == w[1].1), "dump sizes differ: {sizes:?}");
}

/// Every store answers the same reads and dumps the same bytes (checked once, before timing).
fn same_answers(_: &mut Criterion) {
    let at = KEYS * (READ_VERSIONS - 1) - KEYS / 2;
    let stores: Vec<Box<dyn Store>> = STORES.iter().map(|n| loaded(n, KEYS, READ_VERSIONS)).collect();
    let answers: Vec<_> = stores
        .iter()
        .map(|s| {
            let mut out = Vec::new();
            let gets: Vec<_> = (0..KEYS).step_by(97).map(|i| s.get(&key(i), at, &mut out)).collect();
            let n = s.scan(&key(4990), &key(5090), at, &mut out);
            (gets, n, out, s.dump())
        })
        .collect();
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "stores disagree");
}

criterion_group!(benches, same_answers, apply, read, snapshot);
criterion_main!(benches);
