//! Shared helpers for Skein's benchmarks: building batches of a given shape.

use skein_log::batch::{BatchBuilder, RecordBatch};
use skein_log::types::Timestamp;

/// A batch of `records` records with values of `value_bytes` bytes each.
pub fn batch_of(records: usize, value_bytes: usize) -> RecordBatch<Vec<u8>> {
    let value = vec![0xA5u8; value_bytes];
    let mut b = BatchBuilder::new();
    for i in 0..records {
        b.push(None, &value, &[], Timestamp(1_700_000_000_000 + i as i64));
    }
    b.build()
}

/// The largest batch of `value_bytes`-byte records that is at most `batch_bytes` long
/// (at least one record).
pub fn batch_fitting(batch_bytes: usize, value_bytes: usize) -> RecordBatch<Vec<u8>> {
    let mut records = (batch_bytes / value_bytes.max(1)).max(1);
    loop {
        let b = batch_of(records, value_bytes);
        if b.as_bytes().len() <= batch_bytes || records == 1 {
            return b;
        }
        records -= 1;
    }
}

/// A batch of `records` equal records whose total length is the largest not above
/// `batch_bytes` (within a few bytes of it).
pub fn batch_sized(batch_bytes: usize, records: usize) -> RecordBatch<Vec<u8>> {
    let records = records.max(1);
    let (mut lo, mut hi) = (0usize, batch_bytes);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if batch_of(records, mid).as_bytes().len() <= batch_bytes {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    batch_of(records, lo)
}
