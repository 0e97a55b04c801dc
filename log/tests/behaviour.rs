//! Deterministic tests of the log's documented behaviour: group commit, epochs, faults,
//! rolling, retention, index rebuilds, read bounds and timestamp lookups.

mod common;

use common::{batch, read_all};
use skein_log::storage::{FaultKind, FileStorage, MemStorage, Storage};
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{AppendError, Durability, Log, LogConfig, LogError, ReadLimit};

const T0: Timestamp = Timestamp(1_000_000);
const E0: LeaderEpoch = LeaderEpoch(0);

fn config() -> LogConfig {
    common::small_config()
}

/// Appends `count` one-record batches with ids from `first`, value of 200 bytes.
fn fill<S: Storage>(log: &mut Log<S>, first: u64, count: u64, ts: Timestamp) {
    for id in first..first + count {
        log.append(batch(&[(id, ts)], 200, log_epoch(log)), ts).expect("append");
    }
}

/// Runs one write job inline (the appends so far reach the files), as an owner would.
fn write_behind<S: Storage>(log: &mut Log<S>) {
    let job = log.begin_write().expect("something to write");
    let result = job.run();
    log.finish_write(job, result).expect("write");
    assert_eq!(log.written_offset(), log.log_end_offset());
}

fn log_epoch<S: Storage>(log: &Log<S>) -> LeaderEpoch {
    log.epochs().latest().map_or(E0, |e| e.epoch)
}

#[test]
fn group_commit_shares_one_fdatasync() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 3, T0);
    assert_eq!(log.durable_offset(), Offset(0), "nothing is durable before a sync");
    assert!(log.sync_due(T0));
    let before = s.sync_count();
    assert_eq!(log.sync(T0).expect("sync"), Offset(3));
    assert_eq!(s.sync_count() - before, 1, "three appends, one fdatasync");
    assert!(!log.sync_due(T0));
    assert!(log.begin_sync(T0).is_none(), "nothing left to sync");
}

#[test]
fn group_commit_runs_off_thread_while_appends_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(FileStorage::new(dir.path()).expect("dir"), config(), T0).expect("open");
    fill(&mut log, 0, 2, T0);
    write_behind(&mut log);
    let job = log.begin_sync(T0).expect("job");
    assert_eq!(job.upto(), Offset(2));
    let syncing = std::thread::spawn(move || {
        let result = job.run();
        (job, result)
    });
    fill(&mut log, 2, 2, T0);
    let (job, result) = syncing.join().expect("sync thread");
    assert_eq!(log.finish_sync(job, result).expect("finish"), Offset(2), "later appends wait for the next sync");
    assert_eq!(log.log_end_offset(), Offset(4));
    assert_eq!(log.sync(T0).expect("sync"), Offset(4));
}

#[test]
fn a_sync_begun_before_a_truncation_does_not_vouch_for_what_follows() {
    let mut log = Log::open(MemStorage::new(), config(), T0).expect("open");
    fill(&mut log, 0, 4, T0);
    write_behind(&mut log);
    let job = log.begin_sync(T0).expect("job");
    assert_eq!(log.truncate_to(Offset(2)).expect("truncate"), Offset(2));
    assert_eq!(log.durable_offset(), Offset(2), "truncation syncs the cut");
    fill(&mut log, 10, 2, T0);
    let result = job.run();
    assert_eq!(log.finish_sync(job, result).expect("finish"), Offset(2));
}

#[test]
fn interval_and_never_policies() {
    let mut cfg = config();
    cfg.durability = Durability::IntervalMs(100);
    let mut log = Log::open(MemStorage::new(), cfg, T0).expect("open");
    fill(&mut log, 0, 1, T0);
    assert!(!log.sync_due(T0.add_millis(99)));
    assert!(log.sync_due(T0.add_millis(100)));
    let mut cfg = config();
    cfg.durability = Durability::Never;
    let mut log = Log::open(MemStorage::new(), cfg, T0).expect("open");
    fill(&mut log, 0, 1, T0);
    assert!(!log.sync_due(T0.add_millis(1_000_000)));
}

#[test]
fn appends_are_read_from_memory_until_written_and_a_process_kill_keeps_what_was_written() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 3, T0);
    assert_eq!(log.written_offset(), Offset(0), "an append writes nothing");
    assert_eq!(s.file_bytes("00000000000000000000.log").map(|b| b.len()), Some(0));
    let ids = |log: &Log<MemStorage>| read_all(log, Offset(0), 1 << 20).iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(&log), vec![0, 1, 2], "unwritten batches are read from memory");
    let job = log.begin_write().expect("a write job");
    assert_eq!(job.upto(), Offset(3));
    assert!(log.begin_write().is_none(), "one write job at a time");
    fill(&mut log, 3, 2, T0);
    assert!(log.begin_sync(T0).is_none(), "nothing written yet, nothing to sync");
    let result = job.run();
    assert_eq!(log.finish_write(job, result).expect("write"), Offset(3));
    assert_eq!(ids(&log), vec![0, 1, 2, 3, 4], "partly from the file, partly from memory");
    let job = log.begin_sync(T0).expect("a sync job");
    assert_eq!(job.upto(), Offset(3), "a sync covers what is written");
    let result = job.run();
    assert_eq!(log.finish_sync(job, result).expect("sync"), Offset(3));
    // A write job out while the segment rolls: the roll leaves it be, and the next segment's
    // batches wait for it.
    let job = log.begin_write().expect("a write job");
    log.roll(T0).expect("roll");
    assert_eq!(log.durable_offset(), Offset(3), "a roll syncs nothing itself");
    fill(&mut log, 5, 1, T0);
    assert!(log.begin_write().is_none(), "one write job at a time");
    let result = job.run();
    assert_eq!(log.finish_write(job, result).expect("write"), Offset(5));
    assert_eq!(ids(&log), vec![0, 1, 2, 3, 4, 5]);
    drop(log);
    let log = Log::open(s.restart(), config(), T0).expect("reopen after a process kill");
    assert_eq!(ids(&log), vec![0, 1, 2, 3, 4], "the unwritten batch is gone, the written ones stay");
}

#[test]
fn the_tail_cache_serves_the_newest_written_batches_and_gives_up_the_oldest_and_a_rolled_segment_s() {
    let name = "00000000000000000000.log";
    let batch_bytes = {
        let s = MemStorage::new();
        let mut log = Log::open(s.clone(), config(), T0).expect("open");
        fill(&mut log, 0, 1, T0);
        write_behind(&mut log);
        s.file_bytes(name).expect("the segment").len() as u32
    };
    // Room for three batches, not four.
    let cfg = LogConfig { tail_cache_bytes: 3 * batch_bytes + batch_bytes / 2, ..config() };
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), cfg.clone(), T0).expect("open");
    fill(&mut log, 0, 6, T0);
    write_behind(&mut log);
    let len = s.file_bytes(name).expect("the segment").len() as u64;
    // Damage every batch in the file: what the cache holds still reads whole; what it gave
    // up is read from the file, and its damage is found.
    for pos in (30..len).step_by(64) {
        s.flip_byte(name, pos, 0x40);
    }
    let ids =
        |log: &Log<MemStorage>, from| read_all(log, Offset(from), 1 << 20).iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(&log, 3), vec![3, 4, 5], "the newest three come from the cache");
    let mut buf = Vec::new();
    let err = log.read_verified(Offset(2), ReadLimit { max_bytes: 1 << 20, end: None }, &mut buf);
    assert!(err.is_err(), "the oldest batches were given up and are read from the damaged file: {err:?}");
    // A roll empties the cache of the segment it seals.
    log.roll(T0).expect("roll");
    let err = log.read_verified(Offset(4), ReadLimit { max_bytes: 1 << 20, end: None }, &mut buf);
    assert!(err.is_err(), "after the roll the sealed segment is read from its file: {err:?}");
    // Off, every written batch is read from the file.
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 2, T0);
    write_behind(&mut log);
    s.flip_byte(name, u64::from(batch_bytes) + 100, 0x40);
    let err = log.read_verified(Offset(1), ReadLimit { max_bytes: 1 << 20, end: None }, &mut buf);
    assert!(err.is_err(), "no cache: the file is read: {err:?}");
}

#[test]
fn a_write_and_sync_job_carries_the_unwritten_batches_to_disk_and_counts_as_the_write_job_out() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    assert!(log.begin_write_sync(T0).is_none(), "nothing to write");
    fill(&mut log, 0, 3, T0);
    let job = log.begin_write_sync(T0).expect("a write-and-sync job");
    assert_eq!((job.upto(), job.writes().len()), (Offset(3), 3), "every unwritten batch, the whole log");
    assert!(log.writing(), "it is the write job out");
    assert!(log.begin_write().is_none() && log.begin_write_sync(T0).is_none(), "one write at a time");
    fill(&mut log, 3, 2, T0);
    assert!(log.begin_sync(T0).is_none(), "nothing written yet, nothing else to sync");
    let result = job.run();
    assert_eq!(log.finish_sync(job, result).expect("write and sync"), Offset(3));
    assert_eq!((log.written_offset(), log.durable_offset()), (Offset(3), Offset(3)));
    assert!(!log.writing());
    // Batches appended while it ran go with the next one.
    let job = log.begin_write_sync(T0).expect("the next job");
    assert_eq!((job.upto(), job.writes().len()), (Offset(5), 2));
    let result = job.run();
    assert_eq!(log.finish_sync(job, result).expect("write and sync"), Offset(5));
    // What a finished job carried survives a machine crash whatever the seed drops.
    let durable = log.durable_offset();
    drop(log);
    for seed in 0..8 {
        let log = Log::open(s.crash(seed), config(), T0).expect("reopen after a crash");
        assert!(log.log_end_offset() >= durable, "seed {seed}: lost synced batches");
    }
}

#[test]
fn a_write_and_sync_job_waits_for_a_rolled_segment_s_sealing_sync_and_for_a_write_job_out() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 2, T0);
    let write = log.begin_write().expect("a write job");
    fill(&mut log, 2, 1, T0);
    assert!(log.begin_write_sync(T0).is_none(), "a write job is out");
    let result = write.run();
    log.finish_write(write, result).expect("write");
    log.roll(T0).expect("roll");
    fill(&mut log, 3, 1, T0);
    assert!(log.begin_write_sync(T0).is_none(), "the rolled segment is not sealed yet");
    let rest = log.begin_write().expect("the rolled segment's rest");
    assert_eq!(rest.upto(), Offset(3));
    let result = rest.run();
    log.finish_write(rest, result).expect("write");
    assert!(log.begin_write_sync(T0).is_none(), "the rolled segment is whole but not sealed yet");
    let seal = log.begin_sync(T0).expect("the sealing sync");
    let result = seal.run();
    assert_eq!(log.finish_sync(seal, result).expect("seal"), Offset(3));
    let job = log.begin_write_sync(T0).expect("now one job for the active segment");
    assert_eq!(job.upto(), Offset(4));
    let result = job.run();
    assert_eq!(log.finish_sync(job, result).expect("write and sync"), Offset(4));
}

#[test]
fn a_rolled_segment_is_written_then_sealed_by_jobs_in_log_order_and_a_crash_before_the_seal_drops_what_follows() {
    let s = MemStorage::new();
    let mut cfg = config();
    cfg.durability = Durability::Never;
    let mut log = Log::open(s.clone(), cfg.clone(), T0).expect("open");
    fill(&mut log, 0, 30, T0); // ~ 300 bytes each: 4 KiB segments hold 13
    assert_eq!(log.segment_bases(), vec![Offset(0), Offset(13), Offset(26)]);
    assert_eq!((log.written_offset(), log.durable_offset()), (Offset(0), Offset(0)), "rolls block on nothing");
    assert!(!log.sync_due(T0), "nothing written: no seal is due, and flush.ms=never syncs nothing else");
    assert!(log.begin_sync(T0).is_none());
    // Write jobs go segment by segment, oldest first: the written offset is a prefix.
    let job = log.begin_write().expect("a write job");
    assert_eq!(job.upto(), Offset(13), "the first rolled segment's batches only");
    let result = job.run();
    assert_eq!(log.finish_write(job, result).expect("write"), Offset(13));
    assert!(log.sync_due(T0), "a written rolled segment wants its seal under any flush policy");
    let seal = log.begin_sync(T0).expect("a sealing sync");
    assert_eq!((seal.seals(), seal.upto()), (Some(Offset(0)), Offset(13)));
    assert_eq!(s.file_bytes("00000000000000000000.index"), None, "no index before the bytes are synced");
    // The next segment is written while the seal runs.
    let job = log.begin_write().expect("a write job");
    assert_eq!(job.upto(), Offset(26));
    let result = job.run();
    assert_eq!(log.finish_write(job, result).expect("write"), Offset(26));
    let result = seal.run();
    assert_eq!(log.finish_sync(seal, result).expect("seal"), Offset(13), "durable up to the sealed segment");
    assert!(s.file_bytes("00000000000000000000.index").is_some(), "sealed: index written");
    // A machine crash now: segment 13 is written but never synced. Whatever prefix of it
    // survives, the open keeps the sealed segment, cuts segment 13 at a batch boundary and
    // drops the active segment after it.
    for seed in 0..20 {
        let crashed = Log::open(s.crash(seed), cfg.clone(), T0).expect("open after a crash");
        let end = crashed.log_end_offset();
        assert!(end >= Offset(13) && end <= Offset(26), "seed {seed}: end {end}");
        assert!(crashed.segment_bases().len() <= 2, "seed {seed}: {:?}", crashed.segment_bases());
        let ids: Vec<u64> = read_all(&crashed, Offset(0), 1 << 20).iter().map(|r| r.id).collect();
        assert_eq!(ids, (0..end.get()).collect::<Vec<_>>(), "seed {seed}");
    }
    // A process kill instead: segment 13's bytes are all in the file; the open rebuilds its
    // index and keeps it, and drops the active segment, whose batches were never written.
    let mut killed = Log::open(s.restart(), cfg.clone(), T0).expect("open after a kill");
    assert_eq!(killed.log_end_offset(), Offset(26));
    assert_eq!(killed.recovery().truncated, None);
    fill(&mut killed, 26, 1, T0);
    assert_eq!(killed.sync(T0).expect("sync"), Offset(27));
    // Without a crash: the second seal, then the active segment as the policy says.
    let seal = log.begin_sync(T0).expect("a sealing sync");
    assert_eq!(seal.seals(), Some(Offset(13)));
    let result = seal.run();
    assert_eq!(log.finish_sync(seal, result).expect("seal"), Offset(26));
    assert!(!log.sync_due(T0) && log.begin_sync(T0).is_none(), "flush.ms=never: the active segment is not synced");
    assert_eq!(log.sync(T0).expect("sync"), Offset(30), "an explicit sync covers everything");
}

#[test]
#[should_panic(expected = "truncation with a write job out")]
fn truncation_with_a_write_job_out_is_refused() {
    let mut log = Log::open(MemStorage::new(), config(), T0).expect("open");
    fill(&mut log, 0, 3, T0);
    let _job = log.begin_write().expect("a write job");
    let _ = log.truncate_to(Offset(1));
}

#[test]
fn epochs_are_recorded_and_stale_epochs_rejected() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    log.append(batch(&[(0, T0), (1, T0)], 10, LeaderEpoch(1)), T0).expect("append");
    log.append(batch(&[(2, T0)], 10, LeaderEpoch(3)), T0).expect("append");
    let stale = log.append(batch(&[(3, T0)], 10, LeaderEpoch(2)), T0);
    assert!(matches!(stale, Err(AppendError::StaleEpoch { batch: LeaderEpoch(2), latest: LeaderEpoch(3) })));
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(1)), Some((LeaderEpoch(1), Offset(2))));
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(2)), Some((LeaderEpoch(1), Offset(2))));
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(3)), Some((LeaderEpoch(3), Offset(3))));
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(0)), None);
    write_behind(&mut log);
    drop(log);
    let log = Log::open(s.restart(), config(), T0).expect("reopen");
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(3)), Some((LeaderEpoch(3), Offset(3))), "persisted");
}

#[test]
fn replicated_appends_keep_offsets_and_must_start_at_the_end() {
    let mut leader = Log::open(MemStorage::new(), config(), T0).expect("open");
    let mut follower = Log::open(MemStorage::new(), config(), T0).expect("open");
    let b = batch(&[(0, T0), (1, T0)], 10, LeaderEpoch(2));
    leader.append(b.clone(), T0).expect("append");
    follower.append_replicated(b.clone(), T0).expect("replicate");
    assert_eq!(follower.log_end_offset(), Offset(2));
    let err = follower.append_replicated(b, T0);
    assert!(matches!(err, Err(AppendError::OffsetMismatch { batch: Offset(0), log_end: Offset(2) })));
}

#[test]
fn a_failed_write_poisons_the_log_and_reopen_recovers() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 3, T0);
    log.sync(T0).expect("sync");
    s.fail_op(1, FaultKind::DiskFull);
    log.append(batch(&[(3, T0)], 200, E0), T0).expect("an append writes nothing itself");
    let job = log.begin_write().expect("a write job");
    let result = job.run();
    assert!(result.is_err(), "{result:?}");
    assert!(matches!(log.finish_write(job, result), Err(LogError::Storage(_))));
    assert!(matches!(log.append(batch(&[(4, T0)], 200, E0), T0), Err(AppendError::Poisoned(_))));
    assert!(matches!(log.sync(T0), Err(LogError::Poisoned(_))));
    drop(log);
    let log = Log::open(s.crash(7), config(), T0).expect("reopen");
    assert_eq!(log.log_end_offset(), Offset(3), "the half-written batch is cut as a torn tail");
    assert_eq!(read_all(&log, Offset(0), 1 << 20).iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn a_failed_sync_reports_nothing_durable() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 2, T0);
    s.fail_op(1, FaultKind::Io);
    assert!(matches!(log.sync(T0), Err(LogError::Storage(_))));
    assert_eq!(log.durable_offset(), Offset(0));
}

#[test]
fn machine_crash_cuts_the_torn_tail_and_keeps_durable_records() {
    let mut torn = 0;
    for seed in 0..50 {
        let s = MemStorage::new();
        let mut log = Log::open(s.clone(), config(), T0).expect("open");
        fill(&mut log, 0, 5, T0);
        log.sync(T0).expect("sync");
        log.append(batch(&[(5, T0), (6, T0), (7, T0)], 300, E0), T0).expect("append");
        write_behind(&mut log);
        drop(log);
        let log = Log::open(s.crash(seed), config(), T0).expect("reopen");
        let end = log.log_end_offset();
        assert!(end == Offset(5) || end == Offset(8), "whole batches only, got end {end}");
        torn += usize::from(log.recovery().truncated.is_some());
        let ids: Vec<u64> = read_all(&log, Offset(0), 1 << 20).iter().map(|r| r.id).collect();
        assert_eq!(ids, (0..end.get()).collect::<Vec<_>>());
    }
    assert!(torn > 10, "crashes should tear the unsynced batch often, got {torn}/50");
}

#[test]
fn segments_roll_by_size_and_by_age() {
    let mut cfg = config();
    cfg.segment_ms = Some(1000);
    let mut log = Log::open(MemStorage::new(), cfg, T0).expect("open");
    fill(&mut log, 0, 30, T0); // ~ 300 bytes each: 4 KiB segments hold 13
    assert_eq!(log.segment_count(), 3);
    fill(&mut log, 30, 1, T0.add_millis(999));
    assert_eq!(log.segment_count(), 3);
    fill(&mut log, 31, 1, T0.add_millis(2500));
    assert_eq!(log.segment_count(), 4, "rolled by age");
    assert_eq!(log.durable_offset(), Offset(0), "rolled segments are sealed later, by sync jobs");
    assert_eq!(log.sync(T0.add_millis(2500)).expect("sync"), Offset(32));
    let ids: Vec<u64> = read_all(&log, Offset(0), 1000).iter().map(|r| r.id).collect();
    assert_eq!(ids, (0..32).collect::<Vec<_>>());
}

#[test]
fn retention_by_age_and_size_deletes_whole_sealed_segments() {
    let mut cfg = config();
    cfg.retention_ms = Some(10_000);
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), cfg, T0).expect("open");
    fill(&mut log, 0, 13, T0);
    fill(&mut log, 13, 13, T0.add_millis(20_000));
    fill(&mut log, 26, 5, T0.add_millis(20_000));
    assert_eq!(log.segment_bases(), vec![Offset(0), Offset(13), Offset(26)]);
    let report = log.apply_retention(T0.add_millis(25_000)).expect("retention");
    assert_eq!((report.segments_deleted, report.log_start_offset), (1, Offset(13)));
    assert_eq!(log.segment_bases(), vec![Offset(13), Offset(26)]);
    assert!(s.file_bytes("00000000000000000000.log").is_none(), "file deleted");
    assert!(log.read(Offset(5), ReadLimit { max_bytes: 100, end: None }).is_err(), "below log start");
    let report = log.apply_retention(T0.add_millis(100_000)).expect("retention");
    assert_eq!(report.segments_deleted, 1, "the active segment is never deleted");
    assert_eq!(log.log_start_offset(), Offset(26));
}

#[test]
fn clean_close_skips_the_scan_and_bad_indexes_are_rebuilt() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 40, T0);
    log.close(T0).expect("close");
    let log = Log::open(s.clone(), config(), T0).expect("reopen");
    assert!(log.recovery().clean_shutdown);
    assert_eq!((log.recovery().segments_scanned, log.recovery().indexes_rebuilt), (0, 0));
    drop(log);
    s.remove("00000000000000000000.index").expect("remove");
    s.flip_byte("00000000000000000013.index", 9, 0x40);
    let log = Log::open(s.clone(), config(), T0).expect("reopen");
    assert!(!log.recovery().clean_shutdown, "no marker: the last open did not close");
    assert_eq!(log.recovery().indexes_rebuilt, 2);
    assert_eq!(log.recovery().segments_scanned, 3, "two rebuilt indexes and the tail");
    assert_eq!(read_all(&log, Offset(0), 777).len(), 40);
    assert!(s.file_bytes("00000000000000000000.index").is_some(), "rebuilt index persisted");
}

#[test]
fn reads_respect_the_end_bound_and_byte_limit() {
    let mut log = Log::open(MemStorage::new(), config(), T0).expect("open");
    fill(&mut log, 0, 10, T0);
    let r = log.read(Offset(2), ReadLimit { max_bytes: 1 << 20, end: Some(Offset(5)) }).expect("read");
    assert_eq!((r.first_offset, r.next_offset), (Offset(2), Offset(5)));
    let r = log.read(Offset(5), ReadLimit { max_bytes: 1 << 20, end: Some(Offset(5)) }).expect("read");
    assert_eq!(r.bytes, 0, "nothing at or past the bound");
    let r = log.read(Offset(0), ReadLimit { max_bytes: 1, end: None }).expect("read");
    assert_eq!(r.next_offset, Offset(1), "one batch even when larger than the limit");
    assert!(log.read(Offset(11), ReadLimit { max_bytes: 1, end: None }).is_err());
    assert_eq!(log.read(Offset(10), ReadLimit { max_bytes: 1, end: None }).expect("at end").bytes, 0);
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let mut log = Log::open(MemStorage::new(), config(), T0).expect("open");
    for i in 0..30u64 {
        let ts = T0.add_millis(i * 10);
        log.append(batch(&[(i, ts)], 200, E0), ts).expect("append");
    }
    assert_eq!(log.offset_for_timestamp(Timestamp(0)).expect("lookup"), Some(Offset(0)));
    assert_eq!(log.offset_for_timestamp(T0.add_millis(155)).expect("lookup"), Some(Offset(16)));
    assert_eq!(log.offset_for_timestamp(T0.add_millis(290)).expect("lookup"), Some(Offset(29)));
    assert_eq!(log.offset_for_timestamp(T0.add_millis(291)).expect("lookup"), None);
}

#[test]
fn truncate_fully_restarts_at_an_offset_and_delete_removes_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p0");
    let mut log = Log::open(FileStorage::new(&path).expect("dir"), config(), T0).expect("open");
    fill(&mut log, 0, 20, T0);
    log.truncate_fully_and_start_at(Offset(100), T0).expect("reset");
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (Offset(100), Offset(100)));
    fill(&mut log, 0, 1, T0);
    assert_eq!(log.log_end_offset(), Offset(101));
    log.delete().expect("delete");
    assert!(!path.exists());
}

#[test]
fn a_sync_finishing_after_the_log_was_poisoned_vouches_for_nothing() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 3, T0);
    write_behind(&mut log);
    let job = log.begin_sync(T0).expect("job");
    s.fail_op(1, FaultKind::Io);
    assert!(log.sync(T0).is_err(), "the inline sync fails and poisons the log");
    let result = job.run();
    assert!(result.is_ok(), "the second fdatasync 'succeeds', as Linux reports an error once");
    assert!(matches!(log.finish_sync(job, result), Err(LogError::Poisoned(_))));
    assert_eq!(log.durable_offset(), Offset(0));
}

#[test]
fn a_failed_truncation_leaves_no_durability_claim_past_the_end() {
    let s = MemStorage::new();
    let mut log = Log::open(s.clone(), config(), T0).expect("open");
    fill(&mut log, 0, 26, T0);
    log.sync(T0).expect("sync");
    fill(&mut log, 26, 2, T0);
    write_behind(&mut log);
    let job = log.begin_sync(T0).expect("job");
    s.fail_op(1, FaultKind::Io);
    assert!(log.truncate_to(Offset(5)).is_err());
    assert!(log.durable_offset() <= log.log_end_offset());
    let result = job.run();
    assert!(log.finish_sync(job, result).is_err(), "poisoned");
    assert!(log.durable_offset() <= Offset(5));
}

#[test]
fn offsets_stop_at_the_limit_with_an_error() {
    let mut log = Log::open(MemStorage::new(), config(), T0).expect("open");
    log.truncate_fully_and_start_at(Offset(skein_log::OFFSET_MAX), T0).expect("reset");
    let err = log.append(batch(&[(0, T0)], 10, E0), T0);
    assert!(matches!(err, Err(AppendError::OffsetLimit(_))), "{err:?}");
    assert!(log.truncate_fully_and_start_at(Offset(skein_log::OFFSET_MAX + 1), T0).is_err());
}

#[test]
fn a_failure_during_a_full_reset_poisons_without_panicking() {
    for fail_at in 1..6 {
        let s = MemStorage::new();
        let mut log = Log::open(s.clone(), config(), T0).expect("open");
        fill(&mut log, 0, 20, T0);
        log.sync(T0).expect("sync");
        s.fail_op(fail_at, FaultKind::Io);
        if log.truncate_fully_and_start_at(Offset(100), T0).is_ok() {
            continue; // the fault landed after the reset's last mutation
        }
        assert!(log.durable_offset() <= log.log_end_offset(), "fault at op {fail_at}");
        assert!(matches!(log.append(batch(&[(0, T0)], 10, E0), T0), Err(AppendError::Poisoned(_))));
        drop(log);
        let log = Log::open(s.restart(), config(), T0).expect("reopen after a failed reset");
        let end = log.log_end_offset();
        assert!(end == Offset(20) || end == Offset(100) || end == log.log_start_offset(), "fault at op {fail_at}");
    }
}

/// Found by the cluster simulator: a lying disk (fsyncs lost) undoes a truncation, so after a
/// crash the old batches are back under an epoch checkpoint written since. The log must
/// describe the batches it will serve: epochs are rebuilt from their headers.
#[test]
fn epochs_follow_the_batches_when_a_lost_fsync_undid_a_truncation() {
    let s = MemStorage::new();
    let ts = Timestamp(1_000);
    let mut log = Log::open(s.clone(), config(), ts).expect("open");
    for i in 0..5 {
        log.append(batch(&[(i, ts)], 16, LeaderEpoch(1)), ts).expect("append");
    }
    log.sync(ts).expect("sync");
    // The truncation's fsync is lost; the epoch checkpoint written after it is not.
    s.set_lying(true);
    log.truncate_to(Offset(3)).expect("truncate");
    s.set_lying(false);
    log.append(batch(&[(100, ts)], 16, LeaderEpoch(3)), ts).expect("append");
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(3)), Some((LeaderEpoch(3), Offset(4))));
    drop(log);
    let after = s.crash(7);
    let log = Log::open(after, config(), ts).expect("reopen");
    let ids: Vec<u64> = read_all(&log, Offset(0), 1 << 20).iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4], "the truncated batches came back");
    assert_eq!(log_epoch(&log), LeaderEpoch(1), "so the epochs describe them, not the checkpoint");
    assert_eq!(log.end_offset_for_epoch(LeaderEpoch(3)), Some((LeaderEpoch(1), Offset(5))));
}

/// Bytes of disk the file holds (`st_blocks`), which reserved space counts in.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn space_is_reserved_ahead_of_appends_and_given_back_when_the_segment_is_sealed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig { segment_bytes: 256 << 10, preallocate_bytes: 64 << 10, ..config() };
    let mut log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg.clone(), T0).expect("open");
    let first = dir.path().join("00000000000000000000.log");
    fill(&mut log, 0, 3, T0);
    let len = std::fs::metadata(&first).expect("stat").len();
    assert!(len >= 64 << 10, "the reservation grows the file ({len} bytes for three small batches)");
    assert!(allocated(&first) >= 64 << 10, "an append reserves a step ahead: {} bytes", allocated(&first));
    // A group commit keeps the reservation a step ahead, from its own thread.
    fill(&mut log, 3, 300, T0);
    write_behind(&mut log);
    let job = log.begin_sync(T0).expect("job");
    let result = std::thread::spawn(move || {
        let r = job.run();
        (job, r)
    })
    .join()
    .expect("sync thread");
    log.finish_sync(result.0, result.1).expect("finish");
    let written = log.size_bytes();
    assert!(allocated(&first) >= written + (64 << 10), "{} allocated for {written} written", allocated(&first));
    // Sealing (a sync job after the roll) gives the rest back; the next segment reserves its own.
    log.roll(T0).expect("roll");
    fill(&mut log, 303, 1000, T0);
    assert!(log.segment_count() > 2);
    log.sync(T0).expect("sync: writes and seals the rolled segments");
    let len = std::fs::metadata(&first).expect("stat").len();
    assert!(len <= 256 << 10, "a sealed segment is cut back to its batches: {len} bytes");
    assert!(allocated(&first) < len + 8192, "a sealed segment keeps {} bytes for {len}", allocated(&first));
    let end = log.log_end_offset();
    log.close(T0).expect("close");
    let log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg, T0).expect("reopen");
    assert_eq!(log.log_end_offset(), end, "reserved space past the end is not read as records");
    assert_eq!(read_all(&log, Offset(0), 1 << 30).len() as u64, end.get());
    let report = log.recovery();
    assert!(report.clean_shutdown && report.segments_scanned == 0, "close cut the tail back: {report:?}");
}

#[test]
fn reserved_space_left_by_a_kill_is_cut_at_open_and_appends_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig { segment_bytes: 1 << 20, preallocate_bytes: 64 << 10, ..config() };
    let mut log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg.clone(), T0).expect("open");
    fill(&mut log, 0, 50, T0);
    assert_eq!(log.sync(T0).expect("sync"), Offset(50));
    let first = dir.path().join("00000000000000000000.log");
    let grown = std::fs::metadata(&first).expect("stat").len();
    assert!(grown >= log.size_bytes() + (32 << 10), "{grown} bytes of file for {} of batches", log.size_bytes());
    drop(log); // no close: the process was killed, the zeros of the reservation stay
    let mut log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg.clone(), T0).expect("reopen");
    assert_eq!(log.log_end_offset(), Offset(50), "the reservation's zeros are no records");
    assert_eq!(log.recovery().truncated, None, "zeros alone are no torn write: {:?}", log.recovery());
    assert_eq!(std::fs::metadata(&first).expect("stat").len(), log.size_bytes(), "the zeros are cut");
    fill(&mut log, 50, 10, T0);
    assert_eq!(log.sync(T0).expect("sync"), Offset(60));
    drop(log);
    let log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg, T0).expect("reopen again");
    assert_eq!(
        read_all(&log, Offset(0), 1 << 30).iter().map(|r| r.id).collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>()
    );
}

#[test]
fn a_failed_reservation_is_not_a_failed_append() {
    // A one-byte step: every append reserves first, then writes.
    let s = MemStorage::new();
    let cfg = LogConfig { preallocate_bytes: 1, ..config() };
    let mut log = Log::open(s.clone(), cfg.clone(), T0).expect("open");
    fill(&mut log, 0, 1, T0);
    s.fail_op(1, FaultKind::DiskFull); // the next append's reservation
    fill(&mut log, 1, 2, T0);
    assert_eq!(log.sync(T0).expect("sync"), Offset(3), "appends and syncs go on without the reservation");
    // A group commit's reservation: a step ahead of the end, which the second append passed.
    let s = MemStorage::new();
    let cfg = LogConfig { preallocate_bytes: 1024, ..config() };
    let mut log = Log::open(s.clone(), cfg.clone(), T0).expect("open");
    fill(&mut log, 0, 2, T0);
    write_behind(&mut log);
    s.fail_op(1, FaultKind::Io);
    let job = log.begin_sync(T0).expect("job");
    let result = job.run();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(log.finish_sync(job, result).expect("finish"), Offset(2));
    fill(&mut log, 2, 40, T0);
    log.sync(T0).expect("sync");
    drop(log);
    let log = Log::open(s.crash(3), cfg, T0).expect("reopen");
    assert_eq!(
        read_all(&log, Offset(0), 1 << 20).iter().map(|r| r.id).collect::<Vec<_>>(),
        (0..42).collect::<Vec<_>>()
    );
}

#[test]
fn write_jobs_start_writeback_every_few_mebibytes_and_at_a_segments_end() {
    let mut cfg = config();
    cfg.segment_bytes = 64 << 20;
    let mut log = Log::open(MemStorage::new(), cfg, T0).expect("open");
    let big = |log: &mut Log<MemStorage>, id: u64| {
        log.append(batch(&[(id, T0)], 3 << 20, log_epoch(log)), T0).expect("append");
    };
    big(&mut log, 0);
    let job = log.begin_write().expect("a write job");
    assert_eq!(job.writeback(), None, "3 MiB is below the writeback step");
    let result = job.run();
    log.finish_write(job, result).expect("write");
    big(&mut log, 1);
    big(&mut log, 2);
    let job = log.begin_write().expect("a write job");
    let (pos, len) = job.writeback().expect("9 MiB written: writeback starts");
    assert_eq!(pos, 0, "from where the last writeback ended (none yet)");
    assert_eq!(len, job.writes().last().map(|(p, b)| p + b.len() as u64).expect("writes"));
    assert!(len >= u64::from(skein_log::WRITEBACK_BYTES));
    let result = job.run();
    log.finish_write(job, result).expect("write");
    fill(&mut log, 3, 1, T0);
    let job = log.begin_write().expect("a write job");
    assert_eq!(job.writeback(), None, "a small write after a writeback");
    let result = job.run();
    log.finish_write(job, result).expect("write");
    // The rest of a rolled segment goes out with its last write job.
    fill(&mut log, 4, 1, T0);
    log.roll(T0).expect("roll");
    let job = log.begin_write().expect("a write job");
    let (from, _) = job.writeback().expect("a rolled segment's rest is written back");
    assert_eq!(from, pos + len);
    assert_eq!(log.sync(T0).expect("sync"), Offset(5));
}

#[test]
fn a_reservation_landing_after_the_seal_is_cut_at_open() {
    // A group commit's reservation runs when its job runs: here after the segment it grows
    // was sealed (cut back to its batches) by an inline sync and a roll.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig { segment_bytes: 1 << 20, preallocate_bytes: 64 << 10, ..config() };
    let mut log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg.clone(), T0).expect("open");
    fill(&mut log, 0, 3, T0);
    write_behind(&mut log);
    let first = dir.path().join("00000000000000000000.log");
    // Give the reservation back so the group commit reserves again, late.
    std::fs::OpenOptions::new().write(true).open(&first).expect("open").set_len(log.size_bytes()).expect("cut");
    let job = log.begin_sync(T0).expect("a sync job");
    log.roll(T0).expect("roll");
    fill(&mut log, 3, 5, T0);
    log.sync(T0).expect("sync: seals the rolled segment");
    let sealed = std::fs::metadata(&first).expect("stat").len();
    let result = job.run();
    let late = std::fs::metadata(&first).expect("stat").len();
    assert!(late > sealed, "the job reserved after the seal: {late} bytes, sealed at {sealed}");
    log.finish_sync(job, result).expect("finish");
    log.close(T0).expect("close");
    let log = Log::open(FileStorage::new(dir.path()).expect("dir"), cfg, T0).expect("reopen");
    assert_eq!(read_all(&log, Offset(0), 1 << 30).iter().map(|r| r.id).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
    assert!(log.recovery().clean_shutdown && log.recovery().truncated.is_none(), "{:?}", log.recovery());
    assert_eq!(std::fs::metadata(&first).expect("stat").len(), sealed, "the late reservation ({late} bytes) is cut");
}
