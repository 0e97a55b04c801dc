//! The log against an in-memory model over random operation sequences (`prop_`), on the
//! memory backend, including machine crashes that lose unsynced bytes.

mod common;

use common::{batch, read_all, Rec};
use proptest::prelude::*;
use skein_log::batch::batches;
use skein_log::storage::{MemFile, MemStorage, StorageFile};
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{Durability, Log, LogConfig, ReadLimit, SyncJob};

#[derive(Clone, Debug)]
enum Op {
    Append { timestamps: Vec<i64>, value_bytes: usize },
    Read { at: u16, max_bytes: u32 },
    TimeLookup { ts: i64 },
    Truncate { at: u16 },
    Roll,
    BeginWrite,
    FinishWrite,
    BeginSync,
    BeginWriteSync,
    FinishSync,
    Sync,
    NewEpoch,
    Retention,
    DeleteBefore { at: u16 },
    CloseReopen,
    ProcessKill,
    MachineCrash { seed: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (prop::collection::vec(0i64..1000, 1..6), 0usize..200)
            .prop_map(|(timestamps, value_bytes)| Op::Append { timestamps, value_bytes }),
        4 => (any::<u16>(), 1u32..2000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        2 => (0i64..1100).prop_map(|ts| Op::TimeLookup { ts }),
        2 => any::<u16>().prop_map(|at| Op::Truncate { at }),
        1 => Just(Op::Roll),
        3 => Just(Op::BeginWrite),
        3 => Just(Op::FinishWrite),
        2 => Just(Op::BeginSync),
        2 => Just(Op::BeginWriteSync),
        2 => Just(Op::FinishSync),
        3 => Just(Op::Sync),
        1 => Just(Op::NewEpoch),
        1 => Just(Op::Retention),
        1 => any::<u16>().prop_map(|at| Op::DeleteBefore { at }),
        1 => Just(Op::CloseReopen),
        1 => Just(Op::ProcessKill),
        1 => any::<u64>().prop_map(|seed| Op::MachineCrash { seed }),
    ]
}

/// What the log should hold.
struct Model {
    /// Records from the log start to the log end, with the batch each belongs to.
    records: Vec<(Rec, Offset, LeaderEpoch)>,
    log_start: Offset,
    log_end: Offset,
    durable: Offset,
    epoch: LeaderEpoch,
    next_id: u64,
}

impl Model {
    fn pick(&self, at: u16) -> Offset {
        let span = self.log_end.distance(self.log_start) + 1;
        self.log_start.plus(u64::from(at) % span)
    }

    fn keep_below(&mut self, end: Offset) {
        self.records.retain(|(r, _, _)| r.offset < end);
        self.log_end = end;
        self.durable = self.durable.min(end);
    }

    fn expected(&self) -> Vec<Rec> {
        self.records.iter().map(|(r, _, _)| *r).collect()
    }
}

fn config(segment_bytes: u32, retention_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_ms: None,
        index_interval_bytes: 256,
        durability: Durability::Never,
        retention_bytes: Some(retention_bytes),
        retention_ms: None,
        // Reserving space is an operation faults can hit; a failed reservation must not
        // change what the log holds.
        preallocate_bytes: 1000,
        // A few batches' worth: reads cross from the file into the cache and the pending
        // batches, and the cache gives batches up as it goes.
        tail_cache_bytes: 700,
    }
}

fn run(ops: Vec<Op>, segment_bytes: u32, retention_bytes: u64) -> Result<(), TestCaseError> {
    let now = Timestamp(0);
    let cfg = config(segment_bytes, retention_bytes);
    let mut storage = MemStorage::new();
    let mut log = Log::open(storage.clone(), cfg.clone(), now).expect("open empty");
    // A write job out (the owner runs at most one; it ends before a truncation).
    let mut job = None;
    // A sync job out (at most one), which may seal a rolled segment; a truncation may overtake it.
    let mut sync_job: Option<SyncJob<<MemFile as StorageFile>::SyncHandle>> = None;
    let mut m = Model {
        records: Vec::new(),
        log_start: Offset(0),
        log_end: Offset(0),
        durable: Offset(0),
        epoch: LeaderEpoch(0),
        next_id: 0,
    };
    for op in ops {
        match op {
            Op::Append { timestamps, value_bytes } => {
                let ids: Vec<(u64, Timestamp)> =
                    timestamps.iter().enumerate().map(|(i, &t)| (m.next_id + i as u64, Timestamp(t))).collect();
                m.next_id += ids.len() as u64;
                let b = batch(&ids, value_bytes, m.epoch);
                let info = log.append(b, now).expect("append");
                prop_assert_eq!(info.base_offset, m.log_end);
                for (i, &(id, ts)) in ids.iter().enumerate() {
                    let offset = m.log_end.plus(i as u64);
                    m.records.push((Rec { offset, id, ts }, m.log_end, m.epoch));
                }
                m.log_end = info.log_end_offset;
            }
            Op::Read { at, max_bytes } => check_read(&log, &m, m.pick(at), max_bytes)?,
            Op::TimeLookup { ts } => {
                let expect = m.records.iter().find(|(r, _, _)| r.ts.0 >= ts).map(|(r, _, _)| r.offset);
                prop_assert_eq!(log.offset_for_timestamp(Timestamp(ts)).expect("lookup"), expect, "ts {}", ts);
            }
            Op::BeginWrite => {
                if job.is_none() {
                    let combined_out = sync_job.as_ref().is_some_and(|j| !j.writes().is_empty());
                    job = log.begin_write();
                    prop_assert_eq!(job.is_some(), log.written_offset() < log.log_end_offset() && !combined_out);
                }
            }
            Op::BeginWriteSync => {
                if job.is_none() && sync_job.is_none() {
                    sync_job = log.begin_write_sync(now);
                    if let Some(j) = &sync_job {
                        prop_assert_eq!(j.upto(), log.log_end_offset(), "a write-and-sync job covers the whole log");
                        prop_assert!(log.writing());
                        prop_assert!(log.begin_write().is_none(), "it counts as the write job out");
                    }
                }
            }
            Op::FinishWrite => {
                if let Some(j) = job.take() {
                    let upto = j.upto();
                    let result = j.run();
                    prop_assert!(log.finish_write(j, result).expect("write") >= upto);
                }
            }
            Op::BeginSync => {
                if sync_job.is_none() {
                    sync_job = log.begin_sync(now);
                }
            }
            Op::FinishSync => {
                if let Some(j) = sync_job.take() {
                    let before = log.durable_offset();
                    let result = j.run();
                    let durable = log.finish_sync(j, result).expect("sync");
                    prop_assert!(durable >= before && durable <= log.written_offset());
                }
            }
            Op::Truncate { at } => {
                if let Some(j) = job.take() {
                    let result = j.run();
                    log.finish_write(j, result).expect("write before a truncation");
                }
                // A write-and-sync job is a write job too: it ends before a truncation.
                if let Some(j) = sync_job.take_if(|j| !j.writes().is_empty()) {
                    let result = j.run();
                    log.finish_sync(j, result).expect("write and sync before a truncation");
                }
                let target = m.pick(at);
                let new_end = log.truncate_to(target).expect("truncate");
                let expect = m.records.iter().find(|(r, _, _)| r.offset == target).map_or(m.log_end, |(_, b, _)| *b);
                prop_assert_eq!(new_end, expect.max(m.log_start.min(expect)));
                if target < m.log_end {
                    // A real cut is synced; truncating at the log end is a no-op.
                    m.keep_below(new_end);
                    m.log_start = m.log_start.min(new_end);
                    m.durable = new_end;
                }
            }
            Op::Roll => {
                // The rolled segment is sealed later by write and sync jobs; a roll promises
                // no durability.
                log.roll(now).expect("roll");
            }
            Op::Sync => {
                prop_assert_eq!(log.sync(now).expect("sync"), m.log_end);
                m.durable = m.log_end;
            }
            Op::NewEpoch => m.epoch = LeaderEpoch(m.epoch.0 + 1),
            Op::Retention => {
                let report = log.apply_retention(now).expect("retention");
                prop_assert!(report.log_start_offset >= m.log_start);
                m.log_start = report.log_start_offset;
                m.records.retain(|(r, _, _)| r.offset >= m.log_start);
                if report.segments_deleted > 0 {
                    prop_assert!(log.size_bytes() >= retention_bytes, "deleted below the retention size");
                }
                prop_assert_eq!(log.apply_retention(now).expect("retention").segments_deleted, 0, "not idempotent");
            }
            Op::DeleteBefore { at } => {
                let target = m.pick(at);
                prop_assert_eq!(log.delete_records_before(target, now).expect("delete"), target.max(m.log_start));
                m.log_start = target.max(m.log_start);
                m.records.retain(|(r, _, _)| r.offset >= m.log_start);
            }
            Op::CloseReopen => {
                job = None;
                sync_job = None;
                log.close(now).expect("close");
                log = Log::open(storage.clone(), cfg.clone(), now).expect("reopen");
                prop_assert!(log.recovery().clean_shutdown);
                prop_assert_eq!(log.recovery().segments_scanned, 0, "clean open scans nothing");
                m.durable = m.log_end;
            }
            Op::ProcessKill => {
                // A write job out never ran: what was written survives, nothing else.
                job = None;
                sync_job = None;
                let written = log.written_offset();
                prop_assert!(written >= log.durable_offset());
                drop(log);
                storage = storage.restart();
                log = Log::open(storage.clone(), cfg.clone(), now).expect("reopen after kill");
                prop_assert_eq!(log.recovery().truncated.clone(), None);
                prop_assert_eq!(log.log_end_offset(), written.max(m.log_start));
                m.keep_below(written.max(m.log_start));
                m.durable = m.log_end;
            }
            Op::MachineCrash { seed } => {
                job = None;
                sync_job = None;
                let reported_durable = log.durable_offset();
                drop(log);
                storage = storage.crash(seed);
                log = Log::open(storage.clone(), cfg.clone(), now).expect("reopen after crash");
                let end = log.log_end_offset();
                prop_assert!(end >= reported_durable, "lost durable data: end {} durable {}", end, reported_durable);
                prop_assert!(end <= m.log_end);
                m.keep_below(end);
                // A log start past the surviving end is pulled back to it (the log is empty).
                m.log_start = m.log_start.min(end);
                m.durable = end;
            }
        }
        check_state(&log, &m)?;
    }
    prop_assert_eq!(read_all(&log, m.log_start, 700), m.expected());
    Ok(())
}

fn check_state(log: &Log<MemStorage>, m: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.log_end_offset(), m.log_end);
    prop_assert_eq!(log.log_start_offset(), m.log_start);
    prop_assert!(log.durable_offset() >= m.durable, "durable {} < {} promised", log.durable_offset(), m.durable);
    prop_assert!(log.durable_offset() <= m.log_end);
    let mut epoch_starts: Vec<(LeaderEpoch, Offset)> = Vec::new();
    for (r, _, e) in &m.records {
        if epoch_starts.last().is_none_or(|(last, _)| last != e) {
            epoch_starts.push((*e, r.offset));
        }
    }
    for (i, (e, _)) in epoch_starts.iter().enumerate() {
        let end = epoch_starts.get(i + 1).map_or(m.log_end, |(_, s)| *s);
        prop_assert_eq!(log.end_offset_for_epoch(*e), Some((*e, end)), "epoch {}", e);
    }
    Ok(())
}

fn check_read(log: &Log<MemStorage>, m: &Model, from: Offset, max_bytes: u32) -> Result<(), TestCaseError> {
    let mut buf = Vec::new();
    let range = log.read_verified(from, ReadLimit { max_bytes, end: None }, &mut buf).expect("read");
    if from == m.log_end {
        prop_assert_eq!(range.bytes, 0);
        return Ok(());
    }
    prop_assert!(range.first_offset <= from && from < range.next_offset);
    let found: Vec<_> = batches(&buf).map(|b| b.expect("valid").header().base_offset).collect();
    prop_assert!(found.len() == 1 || range.bytes <= u64::from(max_bytes), "{} bytes > {}", range.bytes, max_bytes);
    // The first batch may start below the log start (delete_records_before cuts mid-batch).
    let visible = |r: &Rec| r.offset >= m.log_start && r.offset >= range.first_offset && r.offset < range.next_offset;
    let got: Vec<Rec> = read_range_records(&buf).into_iter().filter(|r| r.offset >= m.log_start).collect();
    let want: Vec<Rec> = m.records.iter().map(|(r, _, _)| *r).filter(visible).collect();
    prop_assert!(!want.is_empty());
    prop_assert_eq!(got, want);
    Ok(())
}

fn read_range_records(buf: &[u8]) -> Vec<Rec> {
    let mut out = Vec::new();
    for b in batches(buf) {
        let b = b.expect("valid");
        let h = *b.header();
        for r in b.records().iter() {
            out.push(Rec {
                offset: h.base_offset.plus(u64::from(r.offset_delta.to_native())),
                id: common::id_of(r.value.as_slice()),
                ts: Timestamp(h.first_timestamp.0 + r.timestamp_delta.to_native()),
            });
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn prop_log_matches_model(
        ops in prop::collection::vec(op(), 1..100),
        segment_bytes in 1024u32..4096,
        retention_bytes in 1000u64..20_000,
    ) {
        run(ops, segment_bytes, retention_bytes)?;
    }
}
