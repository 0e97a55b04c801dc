//! The sparse segment index: offset lookups and timestamp lookups from one sorted table.
//!
//! Every `index_interval_bytes` of log the segment records an [`IndexEntry`]: the batch
//! starting at `position` has relative base offset `rel_offset`, and every batch *before* it
//! has timestamps `<= max_ts_before`. Both columns only grow, so one binary search answers
//! "where does the batch holding offset O start, or an earlier one" and "where may the first
//! batch with a timestamp >= T start, or an earlier one"; a short scan of batch headers
//! finishes the lookup. Entries live in memory while a segment is active and are persisted
//! (with the segment's metadata and a CRC) when it is sealed or the log is closed cleanly.
//!
//! Invariants: `rel_offset` and `position` strictly increase; `max_ts_before` never
//! decreases; no entry at position 0 (the segment start is the implicit first entry).

use crate::types::Timestamp;

/// One sparse index entry; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The batch's base offset minus the segment's base offset.
    pub rel_offset: u32,
    /// The batch's byte position in the segment file.
    pub position: u32,
    /// Largest timestamp of all batches before this one in the segment.
    pub max_ts_before: Timestamp,
}

/// A segment's metadata, persisted in the index file's trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentMeta {
    /// Bytes of batches in the segment file.
    pub segment_bytes: u32,
    /// Offsets in the segment (next offset minus base offset).
    pub offset_count: u32,
    /// Largest timestamp in the segment, `Timestamp::NONE` when empty.
    pub max_timestamp: Timestamp,
}

/// Why an index file cannot be used (it is then rebuilt from the segment).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Too short, wrong magic or wrong length.
    #[error("index file malformed: {0}")]
    Malformed(&'static str),
    /// The CRC does not match.
    #[error("index file crc mismatch")]
    Crc,
    /// Entries out of order or beyond the segment.
    #[error("index entries inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// The in-memory sparse index of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    entries: Vec<IndexEntry>,
}

impl SegmentIndex {
    /// An empty index.
    pub fn new() -> SegmentIndex {
        SegmentIndex::default()
    }

    /// Records the batch at `entry.position` if at least `interval_bytes` passed since the
    /// last entry (or the segment start).
    pub fn note_batch(&mut self, entry: IndexEntry, interval_bytes: u32) {
        let last = self.entries.last().map_or(0, |e| e.position);
        if entry.position == 0 || entry.position - last < interval_bytes {
            return;
        }
        if let Some(prev) = self.entries.last() {
            assert!(prev.rel_offset < entry.rel_offset, "index offsets must increase");
            assert!(prev.max_ts_before <= entry.max_ts_before, "index timestamps must not decrease");
        }
        self.entries.push(entry);
    }

    /// The last entry at or before relative offset `rel` (the segment start if none).
    pub fn lookup_offset(&self, rel: u32) -> (u32, u32) {
        let i = self.entries.partition_point(|e| e.rel_offset <= rel);
        start_of(self.entries[..i].last())
    }

    /// The last entry before which every timestamp is `< ts` (the segment start if none):
    /// the first batch with a timestamp `>= ts` starts at or after it.
    pub fn lookup_timestamp(&self, ts: Timestamp) -> (u32, u32) {
        let i = self.entries.partition_point(|e| e.max_ts_before < ts);
        start_of(self.entries[..i].last())
    }

    /// The last entry with `position <= pos` and `rel_offset < rel_end`, if any: every batch
    /// between the segment start and it ends at or before `pos` and below `rel_end`.
    pub fn last_within(&self, pos: u32, rel_end: u32) -> Option<IndexEntry> {
        let i = self.entries.partition_point(|e| e.position <= pos && e.rel_offset < rel_end);
        self.entries[..i].last().copied()
    }

    /// Drops entries for batches at or after `pos` (truncation).
    pub fn truncate_to_position(&mut self, pos: u32) {
        let i = self.entries.partition_point(|e| e.position < pos);
        self.entries.truncate(i);
    }

    /// The entries.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Encodes the index file: entries, then the segment's metadata, then a CRC.
    pub fn encode(&self, meta: &SegmentMeta) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.entries.len() * ENTRY_BYTES + TRAILER_BYTES);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        let count = u32::try_from(self.entries.len()).expect("fewer than 2^32 index entries");
        out.extend_from_slice(&count.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.rel_offset.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
            out.extend_from_slice(&e.max_ts_before.0.to_le_bytes());
        }
        out.extend_from_slice(&meta.segment_bytes.to_le_bytes());
        out.extend_from_slice(&meta.offset_count.to_le_bytes());
        out.extend_from_slice(&meta.max_timestamp.0.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks an index file. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<(SegmentIndex, SegmentMeta), IndexError> {
        if bytes.len() < HEADER_BYTES + TRAILER_BYTES {
            return Err(IndexError::Malformed("too short"));
        }
        if le_u32(bytes, 0) != MAGIC {
            return Err(IndexError::Malformed("bad magic"));
        }
        let count = le_u32(bytes, 4) as usize;
        let expected = count.checked_mul(ENTRY_BYTES).and_then(|n| n.checked_add(HEADER_BYTES + TRAILER_BYTES));
        if expected != Some(bytes.len()) {
            return Err(IndexError::Malformed("length does not match entry count"));
        }
        let crc_pos = bytes.len() - 4;
        if crc32c::crc32c(&bytes[..crc_pos]) != le_u32(bytes, crc_pos) {
            return Err(IndexError::Crc);
        }
        let t = HEADER_BYTES + count * ENTRY_BYTES;
        let meta = SegmentMeta {
            segment_bytes: le_u32(bytes, t),
            offset_count: le_u32(bytes, t + 4),
            max_timestamp: Timestamp(le_u64(bytes, t + 8) as i64),
        };
        let entries: Vec<IndexEntry> = (0..count)
            .map(|i| {
                let p = HEADER_BYTES + i * ENTRY_BYTES;
                IndexEntry {
                    rel_offset: le_u32(bytes, p),
                    position: le_u32(bytes, p + 4),
                    max_ts_before: Timestamp(le_u64(bytes, p + 8) as i64),
                }
            })
            .collect();
        check_entries(&entries, &meta)?;
        Ok((SegmentIndex { entries }, meta))
    }
}

fn check_entries(entries: &[IndexEntry], meta: &SegmentMeta) -> Result<(), IndexError> {
    let mut prev = IndexEntry { rel_offset: 0, position: 0, max_ts_before: Timestamp::NONE };
    for e in entries {
        if e.position <= prev.position || e.rel_offset <= prev.rel_offset {
            return Err(IndexError::Inconsistent("entries do not increase"));
        }
        if e.max_ts_before < prev.max_ts_before || e.max_ts_before > meta.max_timestamp {
            return Err(IndexError::Inconsistent("timestamps out of order"));
        }
        if e.position >= meta.segment_bytes || e.rel_offset >= meta.offset_count {
            return Err(IndexError::Inconsistent("entry beyond the segment"));
        }
        prev = *e;
    }
    Ok(())
}

fn start_of(e: Option<&IndexEntry>) -> (u32, u32) {
    e.map_or((0, 0), |e| (e.rel_offset, e.position))
}

fn le_u32(b: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(b[pos..pos + 4].try_into().expect("4-byte slice"))
}

fn le_u64(b: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(b[pos..pos + 8].try_into().expect("8-byte slice"))
}

/// "SKX1" little-endian.
const MAGIC: u32 = u32::from_le_bytes(*b"SKX1");
const HEADER_BYTES: usize = 8;
const ENTRY_BYTES: usize = 16;
const TRAILER_BYTES: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn index(points: &[(u32, u32, i64)]) -> SegmentIndex {
        let mut ix = SegmentIndex::new();
        for &(rel_offset, position, ts) in points {
            ix.note_batch(IndexEntry { rel_offset, position, max_ts_before: Timestamp(ts) }, 100);
        }
        ix
    }

    #[test]
    fn sparse_entries_only_every_interval() {
        let ix = index(&[(0, 0, 0), (5, 50, 10), (9, 120, 20), (12, 180, 20), (15, 260, 30)]);
        let positions: Vec<u32> = ix.entries().iter().map(|e| e.position).collect();
        assert_eq!(positions, vec![120, 260]);
    }

    #[test]
    fn lookups_return_the_entry_at_or_before() {
        let ix = index(&[(9, 120, 20), (15, 260, 30)]);
        let check = |rel, expect| assert_eq!(ix.lookup_offset(rel), expect, "offset {rel}");
        check(0, (0, 0));
        check(8, (0, 0));
        check(9, (9, 120));
        check(14, (9, 120));
        check(100, (15, 260));
        let check_ts = |ts, expect| assert_eq!(ix.lookup_timestamp(Timestamp(ts)), expect, "ts {ts}");
        check_ts(5, (0, 0));
        check_ts(20, (0, 0));
        check_ts(21, (9, 120));
        check_ts(31, (15, 260));
        assert_eq!(ix.last_within(200, 100).map(|e| e.position), Some(120));
        assert_eq!(ix.last_within(300, 15).map(|e| e.position), Some(120));
        assert_eq!(ix.last_within(100, 100), None);
    }

    #[test]
    fn encode_decode_round_trip_and_damage_is_detected() {
        let ix = index(&[(9, 120, 20), (15, 260, 30)]);
        let meta = SegmentMeta { segment_bytes: 300, offset_count: 20, max_timestamp: Timestamp(40) };
        let bytes = ix.encode(&meta);
        assert_eq!(SegmentIndex::decode(&bytes), Ok((ix, meta)));
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 1;
            assert!(SegmentIndex::decode(&bad).is_err(), "flip at {pos}");
        }
        assert!(SegmentIndex::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn prop_index_decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = SegmentIndex::decode(&bytes);
        }

        #[test]
        fn prop_offset_lookup_matches_linear_scan(
            gaps in proptest::collection::vec((1u32..50, 1u32..500), 1..60),
            probe in 0u32..5000,
        ) {
            let mut ix = SegmentIndex::new();
            let (mut rel, mut pos) = (0u32, 0u32);
            for (dr, dp) in gaps {
                rel += dr;
                pos += dp;
                ix.note_batch(IndexEntry { rel_offset: rel, position: pos, max_ts_before: Timestamp(0) }, 64);
            }
            let expect = ix.entries().iter().rev().find(|e| e.rel_offset <= probe).map_or((0, 0), |e| (e.rel_offset, e.position));
            proptest::prop_assert_eq!(ix.lookup_offset(probe), expect);
        }
    }
}
