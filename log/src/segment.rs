//! One segment: a file of batches back to back, named by its base offset, plus its sparse
//! index. Only the log's last segment (the active one) is appended to; the others are sealed:
//! written, synced, indexed on disk, read-only. The active segment's newest batches may not be
//! in the file yet (the log writes behind, see `log.rs`): they are held in memory, in
//! `pending`, and every read here ([`Segment::read_exact`]) takes them from there. Once
//! written, the newest of them stay in memory a while longer (`recent`, up to
//! `LogConfig::tail_cache_bytes`), so a read of the tail makes no file read either.
//!
//! This module reads headers and scans files; it decides nothing about recovery policy (the
//! log does). Positions are `u32`: a segment never exceeds 4 GiB (checked by `LogConfig`).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::batch::{check_crc, BatchHeader, HEADER_BYTES};
use crate::config::TAIL_CACHE_BATCHES_MAX;
use crate::index::{IndexEntry, SegmentIndex, SegmentMeta};
use crate::storage::{read_exact_at, StorageError, StorageFile};
use crate::types::{LeaderEpoch, Offset, Timestamp};

/// A segment in memory: file handle, extent and index.
#[derive(Debug)]
pub(crate) struct Segment<F> {
    pub base: Offset,
    pub file: F,
    pub path: String,
    /// Bytes of whole batches in the segment (appends go here), written to the file or not.
    pub bytes: u32,
    /// Bytes at the start of the segment known to be in the file (`<= bytes`).
    pub written: u32,
    /// Batches at `written..bytes` not known to be in the file, by position, back to back.
    pub pending: VecDeque<(u32, Bytes)>,
    /// The newest batches already in the file, by position, back to back and ending at
    /// `written`: the tail cache (see `LogConfig::tail_cache_bytes`).
    pub recent: VecDeque<(u32, Bytes)>,
    /// Bytes held in `recent`.
    pub recent_bytes: usize,
    /// Offset after the segment's last batch (`base` when empty).
    pub next_offset: Offset,
    pub max_timestamp: Timestamp,
    pub index: SegmentIndex,
    /// When the segment became active (for rolling by age).
    pub created_at: Timestamp,
    /// Disk space reserved from the start of the file (see `LogConfig::preallocate_bytes`);
    /// `u64::MAX` once reserving failed, so it is not tried again for this segment.
    pub reserved: u64,
    /// Rolled but not yet sealed: its bytes are not all synced and it has no index file. A
    /// sync job seals it (the log's next sync covers it before the active segment).
    pub unsealed: bool,
    /// Bytes from the start whose writeback a write job has already asked for
    /// ([`crate::WriteJob::writeback`]).
    pub writeback_from: u32,
}

/// A problem found while reading a segment: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub position: u32,
    pub reason: String,
    /// A torn write can look like this (incomplete or unreadable tail); otherwise the bytes
    /// are complete and wrong.
    pub maybe_torn: bool,
    /// The header at `position`, if it decoded.
    pub header: Option<BatchHeader>,
}

/// Result of a full scan of a segment file.
#[derive(Debug)]
pub(crate) struct Scan {
    pub bytes: u32,
    pub next_offset: Offset,
    pub max_timestamp: Timestamp,
    pub index: SegmentIndex,
    /// (epoch, first offset, position) each time the batch epoch changed.
    pub epochs: Vec<(LeaderEpoch, Offset, u32)>,
    pub problem: Option<Problem>,
}

pub(crate) fn segment_name(base: Offset) -> String {
    format!("{:020}.log", base.0)
}

pub(crate) fn index_name(base: Offset) -> String {
    format!("{:020}.index", base.0)
}

/// The base offset of a segment file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Offset)
}

impl<F: StorageFile> Segment<F> {
    /// The unwritten batches as (position in the file, bytes), consecutive: what a write job
    /// (or a write-and-sync job) writes; the buffers are shared, not copied.
    pub fn pending_writes(&self) -> Vec<(u64, Bytes)> {
        self.pending.iter().map(|(p, b)| (u64::from(*p), b.clone())).collect()
    }

    /// The metadata persisted in the index file's trailer.
    pub fn meta(&self) -> SegmentMeta {
        SegmentMeta {
            segment_bytes: self.bytes,
            offset_count: self.rel(self.next_offset),
            max_timestamp: self.max_timestamp,
        }
    }

    /// `offset` relative to the base. Offsets in a segment fit `u32` (the log rolls first).
    pub fn rel(&self, offset: Offset) -> u32 {
        u32::try_from(offset.distance(self.base)).expect("segment spans fewer than 2^32 offsets")
    }

    /// Records a batch just written at `position`.
    pub fn note_appended(&mut self, header: &BatchHeader, position: u32, interval_bytes: u32) {
        assert_eq!(position, self.bytes, "batches are appended at the segment end");
        assert_eq!(header.base_offset, self.next_offset, "batch offsets are dense");
        let entry =
            IndexEntry { rel_offset: self.rel(header.base_offset), position, max_ts_before: self.max_timestamp };
        self.index.note_batch(entry, interval_bytes);
        self.bytes = position.checked_add(header.batch_length).expect("segment under 4 GiB");
        self.next_offset = header.next_offset();
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
    }

    /// Reads and decodes the header at `position` (framing only).
    pub fn read_header(&self, position: u32) -> Result<BatchHeader, SegmentReadError> {
        if u64::from(position) + HEADER_BYTES as u64 > u64::from(self.bytes) {
            return Err(SegmentReadError::Problem(Problem {
                position,
                reason: "batch header past the end of the segment".into(),
                maybe_torn: false,
                header: None,
            }));
        }
        let mut buf = [0u8; HEADER_BYTES];
        self.read_exact(&mut buf, position)?;
        let header = BatchHeader::decode(&buf).map_err(|e| {
            SegmentReadError::Problem(Problem { position, reason: e.to_string(), maybe_torn: false, header: None })
        })?;
        if u64::from(position) + u64::from(header.batch_length) > u64::from(self.bytes) {
            return Err(SegmentReadError::Problem(Problem {
                position,
                reason: "batch extends past the end of the segment".into(),
                maybe_torn: false,
                header: Some(header),
            }));
        }
        Ok(header)
    }

    /// Reads `buf.len()` bytes at `position` (within `bytes`): what is in memory (the tail
    /// cache and the unwritten batches) from there, the rest from the file.
    pub fn read_exact(&self, buf: &mut [u8], position: u32) -> Result<(), StorageError> {
        let end = u64::from(position) + buf.len() as u64;
        assert!(end <= u64::from(self.bytes), "read past the end of segment {}", self.path);
        let in_memory = self.recent.front().map_or(self.written, |(p, _)| *p);
        let from_file = u64::from(in_memory).saturating_sub(u64::from(position)).min(buf.len() as u64) as usize;
        if from_file > 0 {
            read_exact_at(&self.file, &mut buf[..from_file], u64::from(position), &self.path)?;
        }
        let mut at = position as usize + from_file;
        let mut out = from_file;
        for batches in [&self.recent, &self.pending] {
            let first = batches.partition_point(|(p, b)| *p as usize + b.len() <= at);
            for (p, b) in batches.range(first..) {
                if out == buf.len() {
                    break;
                }
                let skip = at - *p as usize;
                let n = (b.len() - skip).min(buf.len() - out);
                buf[out..out + n].copy_from_slice(&b[skip..skip + n]);
                out += n;
                at += n;
            }
        }
        assert_eq!(out, buf.len(), "memory holds {in_memory}..{} of {}", self.bytes, self.path);
        Ok(())
    }

    /// Moves the unwritten batches that `written` now covers to the tail cache, which then
    /// keeps its newest `keep` bytes (and at most [`TAIL_CACHE_BATCHES_MAX`] batches).
    pub fn settle_written(&mut self, keep: usize) {
        while self.pending.front().is_some_and(|(p, b)| *p as usize + b.len() <= self.written as usize) {
            let batch = self.pending.pop_front().expect("a front batch");
            if keep > 0 {
                self.recent_bytes += batch.1.len();
                self.recent.push_back(batch);
            }
        }
        while self.recent_bytes > keep || self.recent.len() > TAIL_CACHE_BATCHES_MAX {
            let (_, b) = self.recent.pop_front().expect("counted bytes are held");
            self.recent_bytes -= b.len();
        }
    }

    /// Drops the batches at or after `position` from memory (a cut).
    pub fn forget_from(&mut self, position: u32) {
        self.pending.retain(|(p, _)| *p < position);
        self.recent.retain(|(p, _)| *p < position);
        self.recent_bytes = self.recent.iter().map(|(_, b)| b.len()).sum();
    }

    /// Empties the tail cache (the segment is no longer the active one).
    pub fn forget_recent(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
    }

    /// The batch holding `target`: its position and header. `target` must be in the segment.
    pub fn find_batch(&self, target: Offset) -> Result<(u32, BatchHeader), SegmentReadError> {
        assert!(target >= self.base && target < self.next_offset, "offset {target} not in segment {}", self.path);
        let (rel, mut position) = self.index.lookup_offset(self.rel(target));
        let mut expected = self.base.plus(u64::from(rel));
        // A target in memory is found from there: no header is read from the file.
        if let Some((at, first)) = self.first_in_memory() {
            if at > position && first.base_offset <= target {
                (position, expected) = (at, first.base_offset);
            }
        }
        loop {
            let header = self.read_header(position)?;
            self.check_continuity(position, &header, expected)?;
            if header.last_offset() >= target {
                return Ok((position, header));
            }
            expected = header.next_offset();
            position += header.batch_length;
        }
    }

    /// The position and header of the oldest batch held in memory (cached or unwritten).
    fn first_in_memory(&self) -> Option<(u32, BatchHeader)> {
        let (at, bytes) = self.recent.front().or_else(|| self.pending.front())?;
        let header = BatchHeader::decode(bytes.get(..HEADER_BYTES)?).ok()?;
        Some((*at, header))
    }

    /// Fails if the batch at `position` does not start at `expected`.
    pub fn check_continuity(&self, position: u32, h: &BatchHeader, expected: Offset) -> Result<(), SegmentReadError> {
        if h.base_offset == expected {
            return Ok(());
        }
        Err(SegmentReadError::Problem(Problem {
            position,
            reason: format!("batch base offset {} where {expected} was expected", h.base_offset),
            maybe_torn: false,
            header: Some(*h),
        }))
    }
}

/// Reading a segment failed: an IO error, or bytes that are not what the log wrote.
#[derive(Debug)]
pub(crate) enum SegmentReadError {
    Storage(StorageError),
    Problem(Problem),
}

impl From<StorageError> for SegmentReadError {
    fn from(e: StorageError) -> Self {
        SegmentReadError::Storage(e)
    }
}

/// Scans a whole segment file from the start, checking framing, offset continuity and the
/// CRC of every batch, and rebuilds its index. Stops at the first problem.
pub(crate) fn scan<F: StorageFile>(
    file: &F,
    path: &str,
    base: Offset,
    file_bytes: u64,
    interval_bytes: u32,
) -> Result<Scan, StorageError> {
    let mut scan = Scan {
        bytes: 0,
        next_offset: base,
        max_timestamp: Timestamp::NONE,
        index: SegmentIndex::new(),
        epochs: Vec::new(),
        problem: None,
    };
    let mut buf = Vec::new();
    let file_bytes = file_bytes.min(u64::from(u32::MAX));
    while u64::from(scan.bytes) < file_bytes {
        match scan_one(file, path, base, file_bytes, &mut scan, &mut buf)? {
            Ok(header) => {
                let rel = u32::try_from(scan.next_offset.distance(base)).expect("checked in scan_one");
                let entry = IndexEntry { rel_offset: rel, position: scan.bytes, max_ts_before: scan.max_timestamp };
                scan.index.note_batch(entry, interval_bytes);
                if scan.epochs.last().is_none_or(|&(e, _, _)| e != header.leader_epoch) {
                    scan.epochs.push((header.leader_epoch, header.base_offset, scan.bytes));
                }
                scan.bytes += header.batch_length;
                scan.next_offset = header.next_offset();
                scan.max_timestamp = scan.max_timestamp.max(header.max_timestamp);
            }
            Err(problem) => {
                scan.problem = Some(problem);
                break;
            }
        }
    }
    Ok(scan)
}

/// Checks the batch at `scan.bytes`; the outer error is IO, the inner one a bad batch.
fn scan_one<F: StorageFile>(
    file: &F,
    path: &str,
    base: Offset,
    file_bytes: u64,
    scan: &mut Scan,
    buf: &mut Vec<u8>,
) -> Result<Result<BatchHeader, Problem>, StorageError> {
    let position = scan.bytes;
    let remaining = file_bytes - u64::from(position);
    let problem = |reason: String, maybe_torn: bool, header: Option<BatchHeader>| {
        Ok(Err(Problem { position, reason, maybe_torn, header }))
    };
    if remaining < HEADER_BYTES as u64 {
        return problem(format!("{remaining} bytes after the last batch, less than a header"), true, None);
    }
    let mut head = [0u8; HEADER_BYTES];
    read_exact_at(file, &mut head, u64::from(position), path)?;
    let header = match BatchHeader::decode(&head) {
        Ok(h) => h,
        Err(e) => return problem(e.to_string(), true, None),
    };
    if u64::from(header.batch_length) > remaining {
        return problem(
            format!("batch of {} bytes, file has {remaining} left", header.batch_length),
            true,
            Some(header),
        );
    }
    buf.resize(header.batch_length as usize, 0);
    read_exact_at(file, buf, u64::from(position), path)?;
    if let Err(e) = check_crc(&header, buf) {
        return problem(e.to_string(), true, Some(header));
    }
    if header.base_offset != scan.next_offset {
        let reason = format!("batch base offset {} where {} was expected", header.base_offset, scan.next_offset);
        return problem(reason, false, Some(header));
    }
    if scan.epochs.last().is_some_and(|&(e, _, _)| header.leader_epoch < e) {
        // The epoch is outside the CRC; a log's epochs never go down, so this is damage.
        return problem(
            format!("leader epoch {} after a batch of a later epoch", header.leader_epoch),
            false,
            Some(header),
        );
    }
    if header.next_offset().distance(base) > u64::from(u32::MAX) {
        return problem("segment spans more than 2^32 offsets".into(), false, Some(header));
    }
    Ok(Ok(header))
}

/// True if a complete batch with a valid CRC and a later base offset than `expected` lies
/// anywhere after the damaged one at `problem`: the damage is then in the middle of the log,
/// not a torn write at its end. Searches byte by byte, because the damaged header's length
/// cannot be trusted; only runs when recovery finds a problem.
pub(crate) fn intact_batch_follows<F: StorageFile>(
    file: &F,
    path: &str,
    problem: &Problem,
    expected: Offset,
    file_bytes: u64,
) -> Result<bool, StorageError> {
    let mut chunk = vec![0u8; SEARCH_CHUNK_BYTES];
    let mut batch = Vec::new();
    let mut start = u64::from(problem.position) + 1;
    while start + HEADER_BYTES as u64 <= file_bytes {
        let n = (file_bytes - start).min(SEARCH_CHUNK_BYTES as u64) as usize;
        read_exact_at(file, &mut chunk[..n], start, path)?;
        for at in 0..=(n - HEADER_BYTES) {
            let Ok(h) = BatchHeader::decode(&chunk[at..at + HEADER_BYTES]) else {
                continue;
            };
            let pos = start + at as u64;
            if h.base_offset <= expected || pos + u64::from(h.batch_length) > file_bytes {
                continue;
            }
            batch.resize(h.batch_length as usize, 0);
            read_exact_at(file, &mut batch, pos, path)?;
            if check_crc(&h, &batch).is_ok() {
                return Ok(true);
            }
        }
        // Overlap by a header so a header straddling two chunks is still seen.
        start += (n - HEADER_BYTES + 1) as u64;
    }
    Ok(false)
}

const SEARCH_CHUNK_BYTES: usize = 1 << 20;

/// Whether the file holds only zeros from `from` to `file_bytes`: space reserved past the last
/// batch (`LogConfig::preallocate_bytes` grows the file), not a torn write's leftovers.
pub(crate) fn only_zeros_from<F: StorageFile>(
    file: &F,
    path: &str,
    from: u64,
    file_bytes: u64,
) -> Result<bool, StorageError> {
    let mut chunk = vec![0u8; SEARCH_CHUNK_BYTES];
    let mut at = from;
    while at < file_bytes {
        let n = (file_bytes - at).min(SEARCH_CHUNK_BYTES as u64) as usize;
        read_exact_at(file, &mut chunk[..n], at, path)?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_name(Offset(42)), "00000000000000000042.log");
        assert_eq!(parse_segment_name("00000000000000000042.log"), Some(Offset(42)));
        assert_eq!(parse_segment_name("42.log"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_name("00000000000000000042.index"), None);
    }
}
