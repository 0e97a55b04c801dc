//! Helpers shared by the log's integration tests: deterministic batches and full reads.
#![allow(dead_code, missing_docs)]

use skein_log::batch::{batches, BatchBuilder, RecordBatch};
use skein_log::storage::Storage;
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{Durability, Log, LogConfig, ReadLimit};

/// A record as tests see it: its offset, the unique id in its value, its timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rec {
    pub offset: Offset,
    pub id: u64,
    pub ts: Timestamp,
}

/// A batch whose record values are `ids` (8 bytes each, padded to `value_bytes`).
pub fn batch(ids: &[(u64, Timestamp)], value_bytes: usize, epoch: LeaderEpoch) -> RecordBatch<Vec<u8>> {
    let mut b = BatchBuilder::new();
    for &(id, ts) in ids {
        b.push(None, &value(id, value_bytes), &[], ts);
    }
    let mut batch = b.build();
    batch.set_leader_epoch(epoch);
    batch
}

/// The value of record `id`: its id, then filler derived from it.
pub fn value(id: u64, value_bytes: usize) -> Vec<u8> {
    let mut v = id.to_le_bytes().to_vec();
    v.extend((0..value_bytes.saturating_sub(8)).map(|i| (id as usize).wrapping_add(i) as u8));
    v
}

/// Decodes a record value back to its id, checking the filler.
pub fn id_of(value: &[u8]) -> u64 {
    let id = u64::from_le_bytes(value[..8].try_into().expect("value holds an id"));
    assert_eq!(value, &self::value(id, value.len())[..], "record {id} has damaged filler");
    id
}

/// Every record from `from` to the log end, read through `read_verified`.
pub fn read_all<S: Storage>(log: &Log<S>, from: Offset, max_bytes: u32) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut at = from;
    let mut buf = Vec::new();
    while at < log.log_end_offset() {
        let range = log.read_verified(at, ReadLimit { max_bytes, end: None }, &mut buf).expect("read");
        assert!(range.bytes > 0, "no progress reading at {at}");
        for b in batches(&buf) {
            let b = b.expect("read_verified returns valid batches");
            let h = *b.header();
            for r in b.records().iter() {
                let offset = h.base_offset.plus(u64::from(r.offset_delta.to_native()));
                if offset >= at {
                    let ts = Timestamp(h.first_timestamp.0 + r.timestamp_delta.to_native());
                    out.push(Rec { offset, id: id_of(r.value.as_slice()), ts });
                }
            }
        }
        at = range.next_offset;
    }
    out
}

/// Small segments (4 KiB), dense index, durability `Always`, no retention: the shape most
/// tests want.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        segment_ms: None,
        index_interval_bytes: 512,
        durability: Durability::Always,
        retention_bytes: None,
        retention_ms: None,
        preallocate_bytes: 0,
        tail_cache_bytes: 0,
    }
}
