//! Criterion micro-benchmarks of the partition log: append (1, 16 and 1024 records of 1 KiB
//! per batch), verified read, index lookup and batch validation. Appends go to real files in
//! a temporary directory with durability `Never` (the page cache), so they measure the log's
//! own cost on top of `pwrite`; `log-vs-raw` measures against the raw disk.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skein_bench::batch_of;
use skein_log::batch::RecordBatch;
use skein_log::index::{IndexEntry, SegmentIndex};
use skein_log::storage::FileStorage;
use skein_log::types::{Offset, Timestamp};
use skein_log::{Durability, Log, LogConfig, ReadLimit};

const KIB: usize = 1024;
/// Appends restart from an empty log every this many bytes, outside the timed part.
const APPEND_RESET_BYTES: u64 = 256 << 20;

fn config() -> LogConfig {
    LogConfig { durability: Durability::Never, segment_bytes: 128 << 20, ..LogConfig::default() }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    for records in [1usize, 16, 1024] {
        let batch = batch_of(records, KIB);
        group.throughput(Throughput::Bytes(batch.as_bytes().len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(records), &batch, |b, batch| {
            let dir = tempfile::tempdir().expect("tempdir");
            b.iter_custom(|iters| append_iters(dir.path(), batch, iters));
        });
    }
    group.finish();
}

/// Appends `iters` times and writes them (a write job, run inline, after every 64 appends:
/// what the broker's write-behind does off the shard), timing only the appends and writes; the
/// log is recreated every `APPEND_RESET_BYTES` so the benchmark does not fill the disk. The log
/// keeps each appended buffer until it is written, so every append gets its own copy of the
/// batch, made before the clock starts.
fn append_iters(dir: &std::path::Path, batch: &RecordBatch<Vec<u8>>, iters: u64) -> Duration {
    let now = Timestamp(0);
    let open = || Log::open(FileStorage::new(dir.join("log")).expect("dir"), config(), now).expect("open");
    let per_reset = (APPEND_RESET_BYTES / batch.as_bytes().len() as u64).max(1);
    let mut elapsed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(per_reset);
        left -= n;
        let copies: Vec<RecordBatch<Vec<u8>>> = (0..n).map(|_| batch.clone()).collect();
        let mut log = open();
        let started = Instant::now();
        for (i, b) in copies.into_iter().enumerate() {
            log.append(b, now).expect("append");
            if i % 64 == 63 {
                write_behind(&mut log);
            }
        }
        write_behind(&mut log);
        elapsed += started.elapsed();
        log.delete().expect("delete");
    }
    elapsed
}

/// Runs one write job inline, if anything is unwritten.
fn write_behind(log: &mut Log<FileStorage>) {
    if let Some(job) = log.begin_write() {
        let result = job.run();
        log.finish_write(job, result).expect("write");
    }
}

fn read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Timestamp(0);
    let mut log = Log::open(FileStorage::new(dir.path()).expect("dir"), config(), now).expect("open");
    let batch = batch_of(16, KIB);
    for _ in 0..4096 {
        log.append(batch.clone(), now).expect("append");
    }
    write_behind(&mut log);
    let end = log.log_end_offset().get();
    let mut group = c.benchmark_group("read");
    for max_bytes in [64 * KIB, 1024 * KIB] {
        group.throughput(Throughput::Bytes(max_bytes as u64));
        group.bench_function(BenchmarkId::new("verified", max_bytes), |b| {
            let mut buf = Vec::with_capacity(max_bytes + 64 * KIB);
            let mut at = 0u64;
            b.iter(|| {
                at = (at + 7919) % (end - 2048);
                let limit = ReadLimit { max_bytes: max_bytes as u32, end: None };
                black_box(log.read_verified(Offset(at), limit, &mut buf).expect("read"))
            });
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("range_lookup", |b| {
        let mut at = 0u64;
        b.iter(|| {
            at = (at + 7919) % end;
            black_box(log.read(Offset(at), ReadLimit { max_bytes: 1 << 20, end: None }).expect("read"))
        });
    });
    group.finish();
}

fn index_lookup(c: &mut Criterion) {
    // A full 1 GiB segment indexed every 4 KiB: 262,144 entries.
    let mut index = SegmentIndex::new();
    for i in 1..=262_144u32 {
        index.note_batch(
            IndexEntry { rel_offset: i * 4, position: i * 4096, max_ts_before: Timestamp(i64::from(i)) },
            4096,
        );
    }
    let mut probe = 0u32;
    c.bench_function("index_lookup/offset", |b| {
        b.iter(|| {
            probe = probe.wrapping_mul(1_103_515_245).wrapping_add(12_345) % (262_144 * 4);
            black_box(index.lookup_offset(black_box(probe)))
        })
    });
    c.bench_function("index_lookup/timestamp", |b| {
        b.iter(|| {
            probe = probe.wrapping_mul(1_103_515_245).wrapping_add(12_345) % 262_144;
            black_box(index.lookup_timestamp(Timestamp(i64::from(black_box(probe)))))
        })
    });
}

fn validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("validate");
    for records in [1usize, 16, 1024] {
        let bytes = batch_of(records, KIB).into_bytes();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(records), &bytes, |b, bytes| {
            b.iter(|| black_box(RecordBatch::parse(&bytes[..]).expect("valid")))
        });
    }
    group.finish();
}

criterion_group!(benches, append, read, index_lookup, validate);
criterion_main!(benches);
