//! Arbitrary bytes fed to recovery never panic (`prop_`): random files in place of segments,
//! indexes and checkpoints, and valid logs with random damage. Open either fails with an error
//! or yields a log whose reads return records or errors.

mod common;

use common::batch;
use proptest::prelude::*;
use skein_log::storage::{MemStorage, Storage};
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{Durability, Log, LogConfig, ReadLimit};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        segment_ms: None,
        index_interval_bytes: 128,
        durability: Durability::Never,
        retention_bytes: None,
        retention_ms: None,
        preallocate_bytes: 512,
        tail_cache_bytes: 300,
    }
}

const NAMES: &[&str] = &[
    "00000000000000000000.log",
    "00000000000000000000.index",
    "00000000000000000007.log",
    "00000000000000000007.index",
    "18446744073709551615.log",
    "18446744073709551615.index",
    "18446744073709551000.log",
    "04611686018427387904.log",
    "04611686018427387903.log",
    "log-start-offset",
    "leader-epoch-checkpoint",
    "clean-shutdown",
    "junk.tmp",
];

/// Opens and reads everything it can; must not panic.
fn exercise(storage: MemStorage) {
    let now = Timestamp(0);
    let Ok(mut log) = Log::open(storage, config(), now) else {
        return;
    };
    let mut at = log.log_start_offset();
    let mut buf = Vec::new();
    while at < log.log_end_offset() {
        match log.read_verified(at, ReadLimit { max_bytes: 512, end: None }, &mut buf) {
            Ok(r) if r.next_offset > at => at = r.next_offset,
            _ => break,
        }
    }
    let _ = log.offset_for_timestamp(Timestamp(5));
    let _ = log.end_offset_for_epoch(LeaderEpoch(1));
    let end = log.log_end_offset();
    let _ = log.append(batch(&[(1, now)], 10, LeaderEpoch(u32::MAX)), now);
    let _ = log.truncate_to(Offset(end.get() / 2));
    let _ = log.close(now);
}

fn valid_log() -> MemStorage {
    let s = MemStorage::new();
    let now = Timestamp(0);
    let mut log = Log::open(s.clone(), config(), now).expect("open");
    for id in 0..20 {
        log.append(batch(&[(id, Timestamp(id as i64)), (id + 100, now)], 60, LeaderEpoch(id as u32 / 7)), now)
            .expect("append");
    }
    log.close(now).expect("close");
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn prop_recovery_never_panics_on_arbitrary_files(
        files in prop::collection::vec((0..NAMES.len(), prop::collection::vec(any::<u8>(), 0..600)), 1..5),
    ) {
        let s = MemStorage::new();
        for (name, bytes) in files {
            s.put_file(NAMES[name], bytes);
        }
        exercise(s);
    }

    #[test]
    fn prop_recovery_never_panics_on_damaged_logs(
        damage in prop::collection::vec((0usize..16, any::<u64>(), any::<u8>()), 1..6),
        drop_marker in any::<bool>(),
    ) {
        let s = valid_log();
        if drop_marker {
            s.remove("clean-shutdown").expect("remove");
        }
        let names = s.list().expect("list");
        for (file, pos, mask) in damage {
            let name = &names[file % names.len()];
            let mut bytes = s.file_bytes(name).expect("exists");
            if bytes.is_empty() {
                continue;
            }
            let at = (pos % bytes.len() as u64) as usize;
            match mask % 3 {
                0 => bytes.truncate(at),
                1 => bytes[at] ^= mask | 1,
                _ => bytes[at..].iter_mut().take(8).for_each(|b| *b = mask),
            }
            s.put_file(name, bytes);
        }
        exercise(s);
    }
}
