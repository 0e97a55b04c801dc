//! Damaged bytes on disk (`corrupt_`): a flipped byte is reported with the segment file and
//! byte position and never served. The documented behaviour (log/FORMAT.md, "Recovery"):
//!
//! - sealed segment: detected when a read touches the batch (reads check CRCs), or at open if
//!   the segment has to be scanned (its index is missing): an error either way;
//! - tail segment after an unclean shutdown: a damaged batch followed by an intact one is an
//!   error; a damaged *last* batch is indistinguishable from a torn write and is cut, with the
//!   cut reported in `Log::recovery()` and logged;
//! - tail segment after a clean shutdown: not scanned; detected by reads.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{batch, read_all};
use skein_log::storage::FileStorage;
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{Log, LogConfig, OpenError, ReadError, ReadLimit};

const T0: Timestamp = Timestamp(1_000_000);

fn config() -> LogConfig {
    common::small_config()
}

/// A log of 3 segments (offsets 0..13, 13..26, 26..36) of 300-byte batches, closed cleanly.
fn build(dir: &Path) {
    let mut log = Log::open(FileStorage::new(dir).expect("dir"), config(), T0).expect("open");
    for id in 0..36 {
        log.append(batch(&[(id, T0)], 200, LeaderEpoch(0)), T0).expect("append");
    }
    assert_eq!(log.segment_count(), 3);
    log.close(T0).expect("close");
}

fn open(dir: &Path) -> Result<Log<FileStorage>, OpenError> {
    Log::open(FileStorage::new(dir).expect("dir"), config(), T0)
}

/// The file and byte position of the batch holding `offset`.
fn locate(dir: &Path, offset: u64) -> (String, u64) {
    let log = open(dir).expect("open");
    let r = log.read(Offset(offset), ReadLimit { max_bytes: 1, end: None }).expect("read");
    let name = format!("{:020}.log", r.segment_base.get());
    log.close(T0).expect("close");
    (name, r.position)
}

fn flip(dir: &Path, name: &str, pos: u64) {
    let f = OpenOptions::new().read(true).write(true).open(dir.join(name)).expect("open segment");
    let mut b = [0u8];
    f.read_exact_at(&mut b, pos).expect("read byte");
    b[0] ^= 0x20;
    f.write_all_at(&b, pos).expect("write byte");
}

fn unclean(dir: &Path) {
    std::fs::remove_file(dir.join("clean-shutdown")).expect("marker present after close");
}

#[test]
fn corrupt_middle_segment_is_reported_by_reads_with_file_and_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 17);
    assert_eq!(name, "00000000000000000013.log");
    flip(dir.path(), &name, pos + 100);
    for clean in [true, false] {
        if !clean {
            unclean(dir.path());
        }
        let log = open(dir.path()).expect("a sealed segment with an intact index is not scanned at open");
        let mut buf = Vec::new();
        let err = log.read_verified(Offset(15), ReadLimit { max_bytes: 1 << 20, end: None }, &mut buf);
        match err {
            Err(ReadError::Corrupt(c)) => {
                assert!(c.file.ends_with(&name), "names the file: {c}");
                assert_eq!(c.position, pos, "names the damaged batch's position");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        assert!(buf.is_empty(), "nothing from a damaged read is served");
        let ok = log.read_verified(Offset(13), ReadLimit { max_bytes: 1, end: None }, &mut buf).expect("intact batch");
        assert_eq!(ok.next_offset, Offset(14));
        assert_eq!(read_all(&log, Offset(26), 1 << 20).len(), 10, "later segments still serve");
        log.close(T0).expect("close");
    }
}

#[test]
fn corrupt_middle_segment_without_index_fails_open_naming_file_and_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 20);
    flip(dir.path(), &name, pos + 70);
    std::fs::remove_file(dir.path().join("00000000000000000013.index")).expect("index");
    match open(dir.path()) {
        Err(OpenError::Corrupt(c)) => {
            assert!(c.file.ends_with(&name), "{c}");
            assert_eq!(c.position, pos);
            assert!(c.to_string().contains(&format!("at byte {pos}")), "{c}");
        }
        other => panic!("expected corruption, got {:?}", other.map(|l| l.log_end_offset())),
    }
}

#[test]
fn corrupt_tail_segment_before_intact_batches_fails_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 30);
    assert_eq!(name, "00000000000000000026.log");
    flip(dir.path(), &name, pos + 90);
    unclean(dir.path());
    match open(dir.path()) {
        Err(OpenError::Corrupt(c)) => {
            assert!(c.file.ends_with(&name), "{c}");
            assert_eq!(c.position, pos);
        }
        other => panic!("expected corruption, got {:?}", other.map(|l| l.log_end_offset())),
    }
}

#[test]
fn corrupt_tail_segment_last_batch_is_cut_as_a_torn_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 35);
    flip(dir.path(), &name, pos + 90);
    unclean(dir.path());
    let log = open(dir.path()).expect("open");
    assert_eq!(log.log_end_offset(), Offset(35));
    let (file, at, bytes) = log.recovery().truncated.clone().expect("cut reported");
    assert!(file.ends_with(&name));
    assert_eq!(at, pos);
    assert!(bytes > 0);
    assert_eq!(read_all(&log, Offset(0), 4096).len(), 35);
}

#[test]
fn corrupt_tail_segment_after_clean_shutdown_is_caught_by_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 28);
    flip(dir.path(), &name, pos + 64);
    let log = open(dir.path()).expect("clean open does not scan");
    let mut buf = Vec::new();
    let err = log.read_verified(Offset(27), ReadLimit { max_bytes: 1 << 20, end: None }, &mut buf);
    assert!(matches!(err, Err(ReadError::Corrupt(ref c)) if c.position == pos), "{err:?}");
}

#[test]
fn corrupt_tail_batch_header_before_intact_batches_fails_open() {
    // Damage to the header (magic, length) hides where the next batch starts; recovery must
    // still find the intact batches after it and refuse to cut them as a torn tail.
    for (field, at) in [("magic", 4u64), ("length", 1), ("record count", 61)] {
        let dir = tempfile::tempdir().expect("tempdir");
        build(dir.path());
        let (name, pos) = locate(dir.path(), 29);
        flip(dir.path(), &name, pos + at);
        unclean(dir.path());
        match open(dir.path()) {
            Err(OpenError::Corrupt(c)) => assert_eq!(c.position, pos, "{field}: {c}"),
            other => panic!("{field}: expected corruption, got {:?}", other.map(|l| l.log_end_offset())),
        }
    }
}

#[test]
fn corrupt_base_offset_outside_the_crc_is_caught_by_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 16);
    flip(dir.path(), &name, pos + 8);
    let log = open(dir.path()).expect("open");
    let mut buf = Vec::new();
    let err = log.read_verified(Offset(13), ReadLimit { max_bytes: 1 << 20, end: None }, &mut buf);
    assert!(matches!(err, Err(ReadError::Corrupt(ref c)) if c.position == pos), "{err:?}");
}

#[test]
fn corrupt_leader_epoch_raised_in_the_tail_fails_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    let (name, pos) = locate(dir.path(), 35);
    flip(dir.path(), &name, pos + 18);
    unclean(dir.path());
    match open(dir.path()) {
        Err(OpenError::Corrupt(c)) => assert_eq!(c.position, pos, "{c}"),
        other => panic!("expected corruption, got {:?}", other.map(|l| l.log_end_offset())),
    }
}
