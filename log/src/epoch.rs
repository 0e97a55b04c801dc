//! The leader-epoch cache: for each leader epoch, the first offset it wrote (Kafka's KIP-101).
//!
//! A follower that takes a new leader asks it for the end offset of the follower's latest
//! epoch ([`EpochCache::end_offset_for`]) and truncates there, instead of trusting its own
//! high watermark; KIP-279 repeats the question until both logs agree. The cache is kept in
//! memory and persisted as a checkpoint file whenever it changes (rarely: once per leader change).
//!
//! Invariants: epochs strictly increase and start offsets never decrease along the list.

use crate::types::{LeaderEpoch, Offset};

/// One epoch and the first offset written in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochEntry {
    /// The leader epoch.
    pub epoch: LeaderEpoch,
    /// The first offset written by a leader of this epoch.
    pub start_offset: Offset,
}

/// The epoch history of one partition log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    /// The latest epoch, if any batch was ever written.
    pub fn latest(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    /// All entries, oldest first.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// Records that `epoch` starts at `start`. Returns whether the cache changed.
    ///
    /// Panics if `epoch` is older than the latest one: the log rejects such appends first.
    pub fn assign(&mut self, epoch: LeaderEpoch, start: Offset) -> bool {
        if let Some(last) = self.entries.last() {
            assert!(epoch >= last.epoch, "epoch {epoch} assigned after newer epoch {}", last.epoch);
            if epoch == last.epoch {
                return false;
            }
            assert!(start >= last.start_offset, "epoch {epoch} starts at {start} before epoch {}", last.epoch);
        }
        self.entries.push(EpochEntry { epoch, start_offset: start });
        true
    }

    /// The answer to a follower's OffsetsForLeaderEpoch: the largest epoch `<= epoch` this log
    /// knows, and the offset where that epoch ends (the next epoch's start, or `log_end` for
    /// the latest). `None` if the log knows no epoch that old (the follower truncates fully).
    pub fn end_offset_for(&self, epoch: LeaderEpoch, log_end: Offset) -> Option<(LeaderEpoch, Offset)> {
        let i = self.entries.partition_point(|e| e.epoch <= epoch);
        let found = self.entries[..i].last()?;
        let end = self.entries.get(i).map_or(log_end, |next| next.start_offset);
        Some((found.epoch, end))
    }

    /// Forgets epochs that start at or after `end` (the log was truncated to `end`).
    /// Returns whether the cache changed.
    pub fn truncate_end(&mut self, end: Offset) -> bool {
        let keep = self.entries.partition_point(|e| e.start_offset < end);
        let changed = keep != self.entries.len();
        self.entries.truncate(keep);
        changed
    }

    /// Moves the history's start to `start` (the log start advanced): epochs that ended before
    /// it are dropped, the one that spans it starts at `start`. Returns whether it changed.
    pub fn truncate_start(&mut self, start: Offset) -> bool {
        let spanning = self.entries.partition_point(|e| e.start_offset <= start);
        if spanning == 0 {
            return false;
        }
        let changed = spanning > 1 || self.entries[0].start_offset != start;
        self.entries.drain(..spanning - 1);
        self.entries[0].start_offset = start;
        changed
    }

    /// Encodes the entries as the checkpoint payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 12);
        for e in &self.entries {
            out.extend_from_slice(&e.epoch.0.to_le_bytes());
            out.extend_from_slice(&e.start_offset.0.to_le_bytes());
        }
        out
    }

    /// Decodes a checkpoint payload; `None` if malformed or out of order. Never panics.
    pub fn decode(payload: &[u8]) -> Option<EpochCache> {
        if !payload.len().is_multiple_of(12) {
            return None;
        }
        let mut cache = EpochCache::default();
        for chunk in payload.chunks_exact(12) {
            let epoch = LeaderEpoch(u32::from_le_bytes(chunk[..4].try_into().ok()?));
            let start_offset = Offset(u64::from_le_bytes(chunk[4..].try_into().ok()?));
            if let Some(last) = cache.entries.last() {
                if epoch <= last.epoch || start_offset < last.start_offset {
                    return None;
                }
            }
            cache.entries.push(EpochEntry { epoch, start_offset });
        }
        Some(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: &[(u32, u64)]) -> EpochCache {
        let mut c = EpochCache::default();
        for &(e, o) in entries {
            c.assign(LeaderEpoch(e), Offset(o));
        }
        c
    }

    #[test]
    fn end_offset_for_follows_kip_101() {
        let c = cache(&[(1, 0), (3, 10), (4, 25)]);
        let check = |epoch, expect: Option<(u32, u64)>| {
            let got = c.end_offset_for(LeaderEpoch(epoch), Offset(40)).map(|(e, o)| (e.0, o.0));
            assert_eq!(got, expect, "epoch {epoch}");
        };
        check(0, None);
        check(1, Some((1, 10)));
        check(2, Some((1, 10)));
        check(3, Some((3, 25)));
        check(4, Some((4, 40)));
        check(9, Some((4, 40)));
    }

    #[test]
    fn truncation_at_both_ends() {
        let mut c = cache(&[(1, 0), (3, 10), (4, 25)]);
        assert!(c.truncate_end(Offset(25)));
        assert_eq!(c, cache(&[(1, 0), (3, 10)]));
        assert!(!c.truncate_end(Offset(30)));
        assert!(c.truncate_start(Offset(12)));
        assert_eq!(c, cache(&[(3, 12)]));
        assert!(!c.truncate_start(Offset(5)));
    }

    #[test]
    fn encode_decode_round_trip() {
        let c = cache(&[(1, 0), (3, 10)]);
        assert_eq!(EpochCache::decode(&c.encode()), Some(c));
        assert_eq!(EpochCache::decode(&[1, 2, 3]), None);
        assert_eq!(EpochCache::decode(&cache(&[(3, 10)]).encode().repeat(2)), None);
    }
}
