//! The partition log: a directory of segments with one owner.
//!
//! Call protocol (one owner, no locks, no clock: time is passed in):
//! - [`Log::open`] recovers the directory and returns the log with `durable_offset ==
//!   log_end_offset` (open syncs the tail).
//! - [`Log::append`] (leader: assigns offsets) or [`Log::append_replicated`] (follower: keeps
//!   the leader's offsets) places a validated batch at the end of the active segment. It takes
//!   the batch's buffer, not a copy, and writes nothing: the batch is readable at once (reads
//!   take it from memory) and is *written behind*.
//! - Writing: the owner calls [`Log::begin_write`], runs the returned [`WriteJob`] (inline, on
//!   another thread, or through io_uring: it holds a file handle and the batches' buffers),
//!   and reports the result with [`Log::finish_write`]; at most one write job is out at a time,
//!   and it carries every batch appended since the last one. [`Log::written_offset`] is the
//!   offset below which everything is in the OS's hands (it survives a process kill, not a
//!   machine crash).
//! - Durability: when [`Log::sync_due`] says so (per the [`Durability`] policy), the owner calls
//!   [`Log::begin_sync`], runs the returned [`SyncJob`] (inline, or on another thread: it only
//!   holds file handles), and reports the result with [`Log::finish_sync`]. Every append
//!   written before `begin_sync` becomes durable with that one fdatasync: this is group commit.
//!   A sync job may run while a write job is out. [`Log::sync`] writes and syncs inline.
//! - Truncation ([`Log::truncate_to`], [`Log::truncate_fully_and_start_at`]) needs no write
//!   job out: a write landing after the cut would bring cut batches back into the file.
//! - [`Log::read`] returns the file range of whole batches for a zero-copy send;
//!   [`Log::read_range_into`] copies a range and checks every CRC.
//! - [`Log::close`] syncs, persists the active segment's index and writes the clean-shutdown
//!   marker, so the next open scans nothing.
//!
//! Invariants: offsets are dense across batches and segments; `log_start <= durable <= written
//! <= log_end`; sealed segments are written, synced and their index is on disk (a roll writes
//! and syncs the sealed segment's rest inline); only the active segment can hold unwritten or
//! unsynced bytes. A storage error in a mutating operation poisons the log: every
//! later mutation fails until it is reopened, since the state of the files is unknown.
//!
//! Not done here: replication, high watermark (callers pass a read bound), compaction.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::batch::{check_crc, BatchHeader, RecordBatch, HEADER_BYTES};
use crate::checkpoint::{self, CheckpointError};
use crate::config::{Durability, LogConfig};
use crate::epoch::EpochCache;
use crate::error::{AppendError, Corruption, LogError, OpenError, OutOfRange, ReadError};
use crate::index::SegmentIndex;
use crate::segment::{
    index_name, intact_batch_follows, only_zeros_from, parse_segment_name, scan, segment_name, Problem, Segment,
    SegmentReadError,
};
use crate::storage::{read_exact_at, Storage, StorageError, StorageFile, SyncHandle};
use crate::types::{LeaderEpoch, Offset, Timestamp};

/// A partition log. See the module docs for the call protocol.
#[derive(Debug)]
pub struct Log<S: Storage> {
    storage: S,
    config: LogConfig,
    /// Sorted by base offset, never empty; the last one is active.
    segments: Vec<Segment<S::File>>,
    log_start: Offset,
    durable: Offset,
    /// Everything below is in the files (see the module docs).
    written: Offset,
    /// A [`WriteJob`] is out.
    writing: bool,
    /// Tells this log's jobs from another log's (a partition deleted and created again).
    id: u64,
    epochs: EpochCache,
    /// Set by the first failed mutation; see the module docs.
    poisoned: Option<String>,
    last_sync_at: Timestamp,
    /// Bumped by truncation, so a sync begun before it cannot vouch for bytes written after.
    generation: u64,
    recovery: RecoveryReport,
}

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: Offset,
    /// Offset of its last record.
    pub last_offset: Offset,
    /// The log end offset after the append.
    pub log_end_offset: Offset,
}

/// Bounds of a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimit {
    /// Stop before a batch that would take the result past this many bytes; the first batch
    /// is returned even if larger, so a consumer always makes progress (Kafka's KIP-74).
    pub max_bytes: u32,
    /// Return only batches that end before this offset (e.g. the high watermark); `None` for
    /// the log end.
    pub end: Option<Offset>,
}

/// Whole batches in one segment file: `bytes` bytes from `position`. The first batch may
/// start before the offset asked for (offsets inside a batch are not addressable on disk);
/// consumers skip records below their position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRange {
    /// Base offset of the segment holding the range.
    pub segment_base: Offset,
    /// Byte position in the segment file.
    pub position: u64,
    /// Length in bytes (0: nothing to read).
    pub bytes: u64,
    /// Base offset of the first batch.
    pub first_offset: Offset,
    /// Offset after the last batch: where the next read starts.
    pub next_offset: Offset,
}

/// What the last open found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// A clean-shutdown marker was found: no segment was scanned unless its index was bad.
    pub clean_shutdown: bool,
    /// Segments scanned batch by batch.
    pub segments_scanned: usize,
    /// Index files rebuilt (missing, damaged or stale).
    pub indexes_rebuilt: usize,
    /// Bytes cut from the tail as a torn write, with the file and position (zeros alone past
    /// the last batch, such as reserved space, are cut without being reported here).
    pub truncated: Option<(String, u64, u64)>,
}

/// What retention deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes deleted.
    pub bytes_deleted: u64,
    /// The log start offset afterwards.
    pub log_start_offset: Offset,
}

/// Gives each opened log its own id, for [`WriteJob`]s and [`SyncJob`]s.
static NEXT_LOG_ID: AtomicU64 = AtomicU64::new(1);

/// Starts the writeback of `(position, length)` of `handle`'s file ([`WriteJob::writeback`]);
/// a failure is logged, not returned: it is only a hint.
pub fn hint_writeback<H: SyncHandle>(handle: &H, (pos, len): (u64, u64)) {
    if let Err(e) = handle.start_writeback(pos, len) {
        tracing::warn!(error = %e, "could not start writeback");
    }
}

/// Writes of the batches appended since the last write job, back to back in the active
/// segment's file: every buffer is a batch as it arrived, shared with the log (no copy).
/// Holds only a file handle and the buffers, so it can run inline, on another thread, or as
/// io_uring writes; report the outcome with [`Log::finish_write`].
#[derive(Debug)]
pub struct WriteJob<H> {
    handle: H,
    /// (position in the file, batch), consecutive.
    writes: Vec<(u64, Bytes)>,
    segment_base: Offset,
    upto_position: u32,
    upto: Offset,
    log: u64,
    writeback: Option<(u64, u64)>,
}

impl<H: SyncHandle> WriteJob<H> {
    /// Writes every batch with blocking `pwrite`s, then starts the writeback it asks for
    /// (a failure there is logged: it is only a hint).
    pub fn run(&self) -> Result<(), StorageError> {
        for (pos, bytes) in &self.writes {
            self.handle.write_at(bytes, *pos)?;
        }
        if let Some(range) = self.writeback {
            hint_writeback(&self.handle, range);
        }
        Ok(())
    }

    /// The range (position, length) whose writeback to start once the writes landed, every
    /// [`WRITEBACK_BYTES`] of a segment: the kernel then writes a segment out as it fills
    /// instead of all at once when the segment is sealed, which made every other fdatasync
    /// on the disk (the Raft log's among them) wait a quarter of a second (bench/RESULTS.md,
    /// "Storage IO off the shards"). RocksDB's `bytes_per_sync` does the same.
    pub fn writeback(&self) -> Option<(u64, u64)> {
        self.writeback
    }

    /// The file to write.
    pub fn handle(&self) -> &H {
        &self.handle
    }

    /// The writes: (position, batch bytes), consecutive in the file.
    pub fn writes(&self) -> &[(u64, Bytes)] {
        &self.writes
    }

    /// The log end offset once these writes land.
    pub fn upto(&self) -> Offset {
        self.upto
    }

    /// Bytes to write.
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// The id of the log that made the job ([`Log::id`]).
    pub fn log_id(&self) -> u64 {
        self.log
    }
}

/// One fdatasync covering every append written before [`Log::begin_sync`], or, while a rolled
/// segment is still unsealed, that segment's written bytes (its completion then writes the
/// segment's index file). A job from [`Log::begin_write_sync`] first writes the batches not
/// yet written, so one job (one worker wake, one completion) carries a whole commit group to
/// disk. Holds only file handles and shared buffers, so it can run on another thread when the
/// storage's handles allow. When the active segment has less than
/// `LogConfig::preallocate_bytes` reserved ahead of its end, the job also reserves more, so the
/// shard rarely calls `fallocate` itself.
#[derive(Debug)]
pub struct SyncJob<H> {
    handle: H,
    upto: Offset,
    generation: u64,
    log: u64,
    reserve: Option<(u64, u64)>,
    /// The base of the rolled segment this sync makes whole on disk.
    seals: Option<Offset>,
    /// What to write before the sync; `None` for a plain sync. Boxed: one per commit group,
    /// and it keeps the job (carried in the replica's commands) small.
    writes: Option<Box<SyncWrites>>,
}

/// The batches a write-and-sync job writes before its sync.
#[derive(Debug)]
struct SyncWrites {
    /// (position, batch), consecutive in the file.
    writes: Vec<(u64, Bytes)>,
    /// The segment they go to and where they end in it.
    segment_base: Offset,
    upto_position: u32,
}

impl<H: SyncHandle> SyncJob<H> {
    /// Reserves space ahead if asked (a failure is logged: appends then allocate as they go),
    /// writes the batches it carries with blocking `pwrite`s, then runs the fdatasync.
    pub fn run(&self) -> Result<(), StorageError> {
        if let Some((pos, len)) = self.reserve {
            if let Err(e) = self.handle.preallocate(pos, len) {
                tracing::warn!(error = %e, "could not reserve disk space ahead of the appends");
            }
        }
        for (pos, bytes) in self.writes() {
            self.handle.write_at(bytes, *pos)?;
        }
        self.handle.sync()
    }

    /// Whether the job reserves disk space before its sync (a blocking `fallocate`).
    pub fn reserves(&self) -> bool {
        self.reserve.is_some()
    }

    /// The batches the job writes before its sync: (position, bytes), consecutive in the
    /// file; empty for a plain sync.
    pub fn writes(&self) -> &[(u64, Bytes)] {
        self.writes.as_ref().map_or(&[], |w| &w.writes)
    }

    /// The file to sync.
    pub fn handle(&self) -> &H {
        &self.handle
    }

    /// The log end offset this sync makes durable.
    pub fn upto(&self) -> Offset {
        self.upto
    }

    /// The id of the log that made the job ([`Log::id`]).
    pub fn log_id(&self) -> u64 {
        self.log
    }

    /// The base offset of the rolled segment this sync seals, if it seals one.
    pub fn seals(&self) -> Option<Offset> {
        self.seals
    }
}

impl<S: Storage> Log<S> {
    /// Opens the log in `storage`, creating it if empty and recovering it otherwise.
    pub fn open(storage: S, config: LogConfig, now: Timestamp) -> Result<Log<S>, OpenError> {
        config.validate().map_err(OpenError::Config)?;
        let names = storage.list()?;
        for tmp in names.iter().filter(|n| n.ends_with(".tmp")) {
            storage.remove(tmp)?;
        }
        let clean_shutdown = matches!(checkpoint::read(&storage, CLEAN_MARKER, CLEAN_MAGIC), Ok(Some(_)));
        storage.remove(CLEAN_MARKER)?;
        storage.sync_dir()?;
        let mut bases: Vec<Offset> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        bases.sort();
        let mut log = Log {
            storage,
            config,
            segments: Vec::with_capacity(bases.len() + 1),
            log_start: Offset::ZERO,
            durable: Offset::ZERO,
            written: Offset::ZERO,
            writing: false,
            id: NEXT_LOG_ID.fetch_add(1, Ordering::Relaxed),
            epochs: EpochCache::default(),
            poisoned: None,
            last_sync_at: now,
            generation: 0,
            recovery: RecoveryReport { clean_shutdown, ..RecoveryReport::default() },
        };
        let mut tail_epochs: Vec<(LeaderEpoch, Offset, u32)> = Vec::new();
        // Whether the last loaded segment is a rolled one that was never sealed (no index
        // file): a crash can have cut it short, and then what follows it was never durable.
        let mut prev_unsealed = false;
        for (i, &base) in bases.iter().enumerate() {
            let is_tail = i + 1 == bases.len();
            let sealed = names.contains(&index_name(base));
            if let Some(prev) = log.segments.last() {
                if prev.next_offset != base {
                    if prev_unsealed {
                        log.drop_unsealed_successors(&bases[i..])?;
                        break;
                    }
                    let reason =
                        format!("segment starts at {} but the previous one ends at {}", base, prev.next_offset);
                    let file = log.storage.path_of(&segment_name(base));
                    return Err(Corruption { file, position: 0, reason }.into());
                }
            }
            let (segment, epochs, cut) = log.load_segment(base, is_tail, sealed, now)?;
            tail_epochs = epochs;
            prev_unsealed = !is_tail && !sealed;
            log.segments.push(segment);
            if cut && !is_tail {
                log.drop_unsealed_successors(&bases[i + 1..])?;
                break;
            }
        }
        log.load_log_start()?;
        log.load_epochs(&tail_epochs)?;
        if log.segments.is_empty() {
            let segment = log.create_segment(log.log_start, now)?;
            log.segments.push(segment);
        } else if names.contains(&index_name(log.active().base)) {
            // An index file marks a sealed segment; the active one's (written at a clean
            // close) goes stale with the next append, and a roll must not find it.
            log.storage.remove(&index_name(log.active().base))?;
            log.storage.sync_dir()?;
        }
        log.active().file.sync()?;
        log.durable = log.log_end_offset();
        log.written = log.durable;
        Ok(log)
    }

    /// First offset present.
    pub fn log_start_offset(&self) -> Offset {
        self.log_start
    }

    /// Offset the next append gets (one past the last record written).
    pub fn log_end_offset(&self) -> Offset {
        self.active().next_offset
    }

    /// One past the last record known to be on stable storage. Never ahead of the truth.
    pub fn durable_offset(&self) -> Offset {
        self.durable
    }

    /// Offset up to which appends are written to the files (durable or not).
    pub fn written_offset(&self) -> Offset {
        self.written
    }

    /// Whether a [`WriteJob`] is out.
    pub fn writing(&self) -> bool {
        self.writing
    }

    /// This opened log's id, unique in the process: a job finishing after its log was
    /// deleted and the partition created again can be told apart ([`WriteJob::log_id`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The settings.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The leader-epoch history.
    pub fn epochs(&self) -> &EpochCache {
        &self.epochs
    }

    /// KIP-101's OffsetsForLeaderEpoch answer; see [`EpochCache::end_offset_for`].
    pub fn end_offset_for_epoch(&self, epoch: LeaderEpoch) -> Option<(LeaderEpoch, Offset)> {
        self.epochs.end_offset_for(epoch, self.log_end_offset())
    }

    /// What the last open found.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes of batches in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.bytes)).sum()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_bases(&self) -> Vec<Offset> {
        self.segments.iter().map(|s| s.base).collect()
    }

    /// The file of the segment starting at `base`, for zero-copy sends of a [`ReadRange`].
    pub fn segment_file(&self, base: Offset) -> Option<&S::File> {
        self.segment_at(base).map(|i| &self.segments[i].file)
    }

    /// Appends a validated batch as leader: stamps the next offsets into it and takes its
    /// buffer, to be written behind (see the module docs).
    pub fn append<B>(&mut self, mut batch: RecordBatch<B>, now: Timestamp) -> Result<AppendInfo, AppendError>
    where
        B: AsRef<[u8]> + AsMut<[u8]> + Into<Bytes>,
    {
        self.check_writable()?;
        if self.log_end_offset().get() + batch.header().offset_count() > OFFSET_MAX {
            return Err(AppendError::OffsetLimit(self.log_end_offset()));
        }
        batch.set_base_offset(self.log_end_offset());
        let header = *batch.header();
        self.append_bytes(&header, batch.into_bytes().into(), now)
    }

    /// Appends a batch as follower, unchanged: it must start at the log end.
    pub fn append_replicated<B: AsRef<[u8]> + Into<Bytes>>(
        &mut self,
        batch: RecordBatch<B>,
        now: Timestamp,
    ) -> Result<AppendInfo, AppendError> {
        self.check_writable()?;
        if batch.header().base_offset != self.log_end_offset() {
            return Err(AppendError::OffsetMismatch {
                batch: batch.header().base_offset,
                log_end: self.log_end_offset(),
            });
        }
        if batch.header().next_offset().get() > OFFSET_MAX {
            return Err(AppendError::OffsetLimit(self.log_end_offset()));
        }
        let header = *batch.header();
        self.append_bytes(&header, batch.into_bytes().into(), now)
    }

    /// Starts writing the unwritten batches of the oldest segment that has any (a rolled
    /// segment's rest goes before the active segment's batches, so what is written is always
    /// a prefix of the log); `None` if none is unwritten, a job is already out, or the log is
    /// poisoned.
    pub fn begin_write(&mut self) -> Option<WriteJob<<S::File as StorageFile>::SyncHandle>> {
        if self.writing || self.poisoned.is_some() {
            return None;
        }
        let seg = self.segments.iter_mut().find(|s| !s.pending.is_empty())?;
        self.writing = true;
        let unhinted = seg.bytes.saturating_sub(seg.writeback_from);
        let writeback = (unhinted >= WRITEBACK_BYTES || seg.unsealed).then(|| {
            let from = std::mem::replace(&mut seg.writeback_from, seg.bytes);
            (u64::from(from), u64::from(seg.bytes - from))
        });
        Some(WriteJob {
            handle: seg.file.sync_handle(),
            writes: seg.pending_writes(),
            segment_base: seg.base,
            upto_position: seg.bytes,
            upto: seg.next_offset,
            log: self.id,
            writeback: writeback.filter(|&(_, len)| len > 0),
        })
    }

    /// Completes a write job with its result; returns the written offset.
    pub fn finish_write(
        &mut self,
        job: WriteJob<<S::File as StorageFile>::SyncHandle>,
        result: Result<(), StorageError>,
    ) -> Result<Offset, LogError> {
        assert_eq!(job.log, self.id, "a write job of another log");
        assert!(self.writing, "a write job finished with none out");
        self.writing = false;
        if let Err(e) = result {
            return Err(self.poison(e).into());
        }
        if let Some(reason) = &self.poisoned {
            return Err(LogError::Poisoned(reason.clone()));
        }
        self.note_written(job.segment_base, job.upto_position, job.upto);
        Ok(self.written)
    }

    /// Batches up to `upto_position` of segment `segment_base` (ending at offset `upto`) are
    /// in the file.
    fn note_written(&mut self, segment_base: Offset, upto_position: u32, upto: Offset) {
        // The segment may have rolled meanwhile (its rest was then written inline).
        if let Some(i) = self.segment_at(segment_base) {
            let keep = self.tail_keep(i);
            let seg = &mut self.segments[i];
            seg.written = seg.written.max(upto_position);
            seg.settle_written(keep);
        }
        self.written = self.written.max(upto).min(self.log_end_offset());
    }

    /// Whether the durability policy wants a sync now. A rolled segment whose bytes are all
    /// written wants its sealing sync under every policy (Kafka flushes a rolled segment in the
    /// background whatever `flush.ms` says).
    pub fn sync_due(&self, now: Timestamp) -> bool {
        let behind = self.durable < self.log_end_offset();
        let seal_due = self.unsealed().is_some_and(|i| self.written >= self.segments[i].next_offset);
        seal_due
            || match self.config.durability {
                Durability::Always => behind,
                Durability::IntervalMs(ms) => behind && now.millis_since(self.last_sync_at) >= ms,
                Durability::Never => false,
            }
    }

    /// Starts a group commit covering every append written so far; `None` if all that is
    /// written is durable. While a rolled segment is unsealed, the job syncs that segment
    /// instead (up to what is written of it), and seals it once it covers the whole segment:
    /// the durable offset never passes a segment that is not whole on disk.
    pub fn begin_sync(&mut self, now: Timestamp) -> Option<SyncJob<<S::File as StorageFile>::SyncHandle>> {
        if self.poisoned.is_some() {
            return None;
        }
        if let Some(i) = self.unsealed() {
            let seg = &self.segments[i];
            let upto = self.written.min(seg.next_offset);
            let whole = upto == seg.next_offset;
            if !whole && self.durable >= upto {
                return None;
            }
            self.last_sync_at = now;
            return Some(SyncJob {
                handle: seg.file.sync_handle(),
                upto,
                generation: self.generation,
                log: self.id,
                reserve: None,
                seals: whole.then_some(seg.base),
                writes: None,
            });
        }
        if self.durable >= self.written {
            return None;
        }
        self.last_sync_at = now;
        let reserve = self.reserve_ahead();
        let active = self.segments.last().expect("a log has an active segment");
        Some(SyncJob {
            handle: active.file.sync_handle(),
            upto: self.written,
            generation: self.generation,
            log: self.id,
            reserve,
            seals: None,
            writes: None,
        })
    }

    /// Starts one job that writes every unwritten batch and then syncs, covering the whole log
    /// ([`SyncJob`]); report it with [`Log::finish_sync`]. Counts as the write job out
    /// ([`Log::writing`]) until then. `None` (use [`Log::begin_write`] and [`Log::begin_sync`])
    /// when nothing is unwritten, a write job is out, a rolled segment is unsealed (its sealing
    /// sync goes first), or the log is poisoned.
    pub fn begin_write_sync(&mut self, now: Timestamp) -> Option<SyncJob<<S::File as StorageFile>::SyncHandle>> {
        if self.writing || self.poisoned.is_some() || self.unsealed().is_some() {
            return None;
        }
        let (active, rolled) = self.segments.split_last().expect("a log has an active segment");
        if active.pending.is_empty() || rolled.iter().any(|s| !s.pending.is_empty()) {
            return None;
        }
        self.writing = true;
        self.last_sync_at = now;
        let reserve = self.reserve_ahead();
        let active = self.segments.last_mut().expect("a log has an active segment");
        // The sync writes these bytes back itself: no writeback hint is due for them.
        active.writeback_from = active.bytes;
        Some(SyncJob {
            handle: active.file.sync_handle(),
            upto: active.next_offset,
            generation: self.generation,
            log: self.id,
            reserve,
            seals: None,
            writes: Some(Box::new(SyncWrites {
                writes: active.pending_writes(),
                segment_base: active.base,
                upto_position: active.bytes,
            })),
        })
    }

    /// The space to reserve ahead of the active segment's end with the next sync, if it has
    /// less than `LogConfig::preallocate_bytes` reserved; counted as reserved from now on.
    fn reserve_ahead(&mut self) -> Option<(u64, u64)> {
        let step = u64::from(self.config.preallocate_bytes);
        let segment_bytes = u64::from(self.config.segment_bytes);
        let active = self.segments.last_mut().expect("a log has an active segment");
        let ahead = u64::from(active.bytes).saturating_add(step);
        (step > 0 && active.reserved < ahead.min(segment_bytes)).then(|| {
            // Counted as reserved now: an append that overtakes the job just allocates its
            // blocks the usual way, which is slower but the same bytes.
            let upto = ahead.saturating_add(step).min(segment_bytes);
            let from = std::mem::replace(&mut active.reserved, upto);
            (from, upto - from)
        })
    }

    /// Completes a group commit with the job's result; returns the durable offset.
    pub fn finish_sync(
        &mut self,
        job: SyncJob<<S::File as StorageFile>::SyncHandle>,
        result: Result<(), StorageError>,
    ) -> Result<Offset, LogError> {
        assert_eq!(job.log, self.id, "a sync job of another log");
        if job.writes.is_some() {
            assert!(self.writing, "a write-and-sync job finished with no write out");
            self.writing = false;
        }
        if let Err(e) = result {
            return Err(self.poison(e).into());
        }
        if let Some(reason) = &self.poisoned {
            // Linux reports a failed writeback once per open file: a sync that "succeeds"
            // after another one failed proves nothing.
            return Err(LogError::Poisoned(reason.clone()));
        }
        if let Some(w) = &job.writes {
            self.note_written(w.segment_base, w.upto_position, job.upto);
        }
        // A truncation since `begin_sync` may have replaced the bytes the job covered.
        if job.generation == self.generation {
            self.durable = self.durable.max(job.upto.min(self.log_end_offset()));
            let sealed = job.seals.and_then(|base| self.segment_at(base));
            if let Some(i) = sealed.filter(|&i| self.segments[i].unsealed) {
                self.seal(i).map_err(|e| self.poison(e))?;
            }
        }
        if let Some(i) = self.unsealed() {
            assert!(
                self.durable <= self.segments[i].next_offset,
                "durable offset {} past an unsealed segment",
                self.durable
            );
        }
        assert!(self.durable <= self.log_end_offset(), "durable offset {} past log end", self.durable);
        Ok(self.durable)
    }

    /// Writes and syncs every append so far, inline (rolled segments are sealed first);
    /// returns the durable offset. A write job still out is written again (the same bytes at
    /// the same places).
    pub fn sync(&mut self, now: Timestamp) -> Result<Offset, LogError> {
        self.check_writable().map_err(to_log_error)?;
        self.write_inline().map_err(|e| self.poison(e))?;
        while let Some(job) = self.begin_sync(now) {
            let result = job.run();
            self.finish_sync(job, result)?;
        }
        Ok(self.durable)
    }

    /// Whole batches from the one holding `from`, within `limit`, as a file range.
    pub fn read(&self, from: Offset, limit: ReadLimit) -> Result<ReadRange, ReadError> {
        let log_end = self.log_end_offset();
        if from < self.log_start || from > log_end {
            return Err(OutOfRange { requested: from, log_start: self.log_start, log_end }.into());
        }
        let end = limit.end.map_or(log_end, |e| e.min(log_end));
        let empty = ReadRange { segment_base: from, position: 0, bytes: 0, first_offset: from, next_offset: from };
        if from >= end {
            return Ok(empty);
        }
        let i = self.segment_for(from);
        let seg = &self.segments[i];
        let (start, first) = seg.find_batch(from).map_err(|e| self.read_error(seg, e))?;
        if first.next_offset() > end {
            return Ok(empty);
        }
        let (stop, next) = self.extend_range(seg, start, &first, limit.max_bytes, end)?;
        Ok(ReadRange {
            segment_base: seg.base,
            position: u64::from(start),
            bytes: u64::from(stop - start),
            first_offset: first.base_offset,
            next_offset: next,
        })
    }

    /// Copies a range into `buf` (replacing its contents) and checks every batch's framing and
    /// CRC; damage is reported with file and position and nothing is returned.
    pub fn read_range_into(&self, range: &ReadRange, buf: &mut Vec<u8>) -> Result<(), ReadError> {
        buf.clear();
        if range.bytes == 0 {
            return Ok(());
        }
        let seg = self.segment_at(range.segment_base).map(|i| &self.segments[i]);
        let seg = seg.ok_or_else(|| self.out_of_range(range.first_offset))?;
        if range.position + range.bytes > u64::from(seg.bytes) {
            return Err(self.out_of_range(range.first_offset).into());
        }
        buf.resize(range.bytes as usize, 0);
        seg.read_exact(buf, range.position as u32)?;
        if let Err(c) = check_range(buf, range, &seg.path) {
            buf.clear();
            return Err(c.into());
        }
        Ok(())
    }

    /// [`Log::read`] then [`Log::read_range_into`].
    pub fn read_verified(&self, from: Offset, limit: ReadLimit, buf: &mut Vec<u8>) -> Result<ReadRange, ReadError> {
        let range = self.read(from, limit)?;
        self.read_range_into(&range, buf)?;
        Ok(range)
    }

    /// The first offset at or after the log start whose record timestamp is `>= ts`, or
    /// `None` if every record is older.
    pub fn offset_for_timestamp(&self, ts: Timestamp) -> Result<Option<Offset>, ReadError> {
        let Some(i) = self.segments.iter().position(|s| s.max_timestamp >= ts && s.next_offset > self.log_start) else {
            return Ok(None);
        };
        for seg in &self.segments[i..] {
            if let Some(offset) = self.offset_for_timestamp_in(seg, ts)? {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Seals the active segment and starts a new one at the log end.
    pub fn roll(&mut self, now: Timestamp) -> Result<(), LogError> {
        self.check_writable().map_err(to_log_error)?;
        self.roll_inner(now).map_err(|e| self.poison(e).into())
    }

    /// Removes every record at or after `offset`; if `offset` falls inside a batch, that whole
    /// batch goes. Returns the new log end. The cut is synced before returning.
    pub fn truncate_to(&mut self, offset: Offset) -> Result<Offset, LogError> {
        self.check_writable().map_err(to_log_error)?;
        assert!(!self.writing, "truncation with a write job out");
        if offset >= self.log_end_offset() {
            return Ok(self.log_end_offset());
        }
        if offset < self.log_start {
            return Err(self.out_of_range(offset).into());
        }
        let i = self.segment_for(offset);
        let (cut, batch) = {
            let seg = &self.segments[i];
            seg.find_batch(offset).map_err(|e| to_log_error_read(self.read_error(seg, e)))?
        };
        // Before any IO: a sync in flight must not vouch for bytes being cut, even if the
        // cut fails half-way.
        self.generation += 1;
        self.durable = self.durable.min(batch.base_offset);
        // What stays must be in the file before the cut is synced as the new end, and rolled
        // segments before the cut whole on disk.
        self.write_inline().map_err(|e| self.poison(e))?;
        self.seal_inline(i).map_err(|e| self.poison(e))?;
        self.segments[i].unsealed = false;
        self.truncate_segments_after(i).map_err(|e| self.poison(e))?;
        self.cut_active(cut, batch.base_offset).map_err(|e| self.poison(e))?;
        if batch.base_offset < self.log_start {
            self.log_start = batch.base_offset;
            self.write_log_start().map_err(|e| self.poison(e))?;
        }
        if self.epochs.truncate_end(batch.base_offset) {
            self.write_epochs().map_err(|e| self.poison(e))?;
        }
        // `cut_active` synced the tail; the segments before it are sealed.
        self.durable = self.log_end_offset();
        self.written = self.durable;
        Ok(self.log_end_offset())
    }

    /// Deletes everything and restarts the log empty at `offset` (a follower whose log has
    /// nothing in common with its leader's).
    pub fn truncate_fully_and_start_at(&mut self, offset: Offset, now: Timestamp) -> Result<(), LogError> {
        self.check_writable().map_err(to_log_error)?;
        assert!(!self.writing, "truncation with a write job out");
        if offset.get() > OFFSET_MAX {
            return Err(self.out_of_range(offset).into());
        }
        self.reset_at(offset, now).map_err(|e| self.poison(e).into())
    }

    /// Advances the log start to `offset` (Kafka's DeleteRecords) and deletes the sealed
    /// segments wholly below it. Returns the new log start.
    pub fn delete_records_before(&mut self, offset: Offset, now: Timestamp) -> Result<Offset, LogError> {
        self.check_writable().map_err(to_log_error)?;
        if offset > self.log_end_offset() {
            return Err(self.out_of_range(offset).into());
        }
        if offset <= self.log_start {
            return Ok(self.log_start);
        }
        if offset > self.durable {
            // Keep `log_start <= durable`: a crash must not leave a start past the surviving end.
            self.sync(now)?;
        }
        self.advance_start(offset, now).map_err(|e| self.poison(e))?;
        Ok(self.log_start)
    }

    /// Deletes whole sealed segments past the retention limits (age of their newest record,
    /// total size). The active segment is never deleted.
    pub fn apply_retention(&mut self, now: Timestamp) -> Result<RetentionReport, LogError> {
        let end = self.log_end_offset();
        self.apply_retention_below(now, end)
    }

    /// [`Log::apply_retention`], deleting only segments wholly below `limit` (a replica passes
    /// its high watermark: records not yet committed are never deleted).
    pub fn apply_retention_below(&mut self, now: Timestamp, limit: Offset) -> Result<RetentionReport, LogError> {
        self.check_writable().map_err(to_log_error)?;
        let mut report = RetentionReport::default();
        let mut total = self.size_bytes();
        let mut keep_from = 0;
        while keep_from + 1 < self.segments.len() && self.segments[keep_from + 1].base <= limit {
            let seg = &self.segments[keep_from];
            let expired = self.config.retention_ms.is_some_and(|ms| now.millis_since(seg.max_timestamp) > ms);
            let oversize = self.config.retention_bytes.is_some_and(|limit| total - u64::from(seg.bytes) >= limit);
            if !expired && !oversize {
                break;
            }
            total -= u64::from(seg.bytes);
            report.segments_deleted += 1;
            report.bytes_deleted += u64::from(seg.bytes);
            keep_from += 1;
        }
        if keep_from > 0 {
            let start = self.segments[keep_from].base.max(self.log_start);
            self.advance_start(start, now).map_err(|e| self.poison(e))?;
        }
        report.log_start_offset = self.log_start;
        Ok(report)
    }

    /// Clean shutdown: syncs, persists the active segment's index and the clean marker.
    pub fn close(mut self, now: Timestamp) -> Result<(), LogError> {
        self.sync(now)?;
        let last = self.segments.len() - 1;
        self.give_back_reserved(last).map_err(|e| self.poison(e))?;
        self.write_index(last)?;
        checkpoint::write(&self.storage, CLEAN_MARKER, CLEAN_MAGIC, &self.log_end_offset().0.to_le_bytes())?;
        Ok(())
    }

    /// Deletes the whole partition log: every file and the directory.
    pub fn delete(self) -> Result<(), LogError> {
        drop(self.segments);
        self.storage.destroy()?;
        Ok(())
    }
}

// Private helpers: opening.
impl<S: Storage> Log<S> {
    /// Loads one segment: from its index file if valid, else by scanning it. Returns the epoch
    /// changes seen if it was scanned, and whether a torn tail was cut off. A torn tail is
    /// accepted in the last segment and in a rolled segment that was never sealed (`sealed`:
    /// it has an index file); anywhere else it is corruption.
    fn load_segment(
        &mut self,
        base: Offset,
        is_tail: bool,
        sealed: bool,
        now: Timestamp,
    ) -> Result<LoadedSegment<S::File>, OpenError> {
        let name = segment_name(base);
        let path = self.storage.path_of(&name);
        if base.get() > OFFSET_MAX {
            return Err(
                Corruption { file: path, position: 0, reason: format!("base offset {base} beyond 2^62") }.into()
            );
        }
        let mut file = self.storage.open(&name)?;
        let file_bytes = file.len()?;
        let trust_index = !is_tail || self.recovery.clean_shutdown;
        if trust_index && file_bytes <= u64::from(u32::MAX) {
            let index = self.read_index(base, &file, &path, file_bytes);
            if let Some((index, meta)) = index.filter(|(_, m)| base.get() + u64::from(m.offset_count) <= OFFSET_MAX) {
                if u64::from(meta.segment_bytes) < file_bytes {
                    tracing::debug!(file = %path, bytes = file_bytes - u64::from(meta.segment_bytes), "cutting zeros past a sealed segment");
                    file.set_len(u64::from(meta.segment_bytes))?;
                    file.sync()?;
                }
                let segment = Segment {
                    base,
                    file,
                    path,
                    bytes: meta.segment_bytes,
                    written: meta.segment_bytes,
                    pending: VecDeque::new(),
                    recent: VecDeque::new(),
                    recent_bytes: 0,
                    next_offset: base.plus(u64::from(meta.offset_count)),
                    max_timestamp: meta.max_timestamp,
                    index,
                    created_at: now,
                    reserved: 0,
                    unsealed: false,
                    writeback_from: meta.segment_bytes,
                };
                return Ok((segment, Vec::new(), false));
            }
        }
        self.recovery.segments_scanned += 1;
        let interval = self.config.index_interval_bytes;
        let scanned = scan(&file, &path, base, file_bytes, interval)?;
        let mut cut = false;
        if let Some(problem) = &scanned.problem {
            let torn = (is_tail || !sealed)
                && problem.maybe_torn
                && !intact_batch_follows(&file, &path, problem, scanned.next_offset, file_bytes)?;
            if !torn {
                return Err(corruption(&path, problem).into());
            }
            let cut_bytes = file_bytes - u64::from(scanned.bytes);
            if only_zeros_from(&file, &path, u64::from(problem.position), file_bytes)? {
                // Space reserved past the last batch (a reservation grows the file), or a
                // write of which nothing reached the medium: no byte of a batch is lost, so
                // this is not a cut (a batch missing as zeros at the end of a rolled segment
                // shows as a gap before the next segment, which drops what follows).
                tracing::debug!(file = %path, position = problem.position, bytes = cut_bytes, "cutting zeros past the last batch");
            } else {
                tracing::warn!(file = %path, position = problem.position, reason = %problem.reason,
                    bytes = cut_bytes, "truncating torn tail");
                self.recovery.truncated = Some((path.clone(), u64::from(problem.position), cut_bytes));
                cut = true;
            }
            file.set_len(u64::from(scanned.bytes))?;
            file.sync()?;
        } else if u64::from(scanned.bytes) != file_bytes {
            let reason = "segment longer than 4 GiB".to_owned();
            return Err(Corruption { file: path, position: u64::from(u32::MAX), reason }.into());
        }
        let segment = Segment {
            base,
            file,
            path,
            bytes: scanned.bytes,
            written: scanned.bytes,
            pending: VecDeque::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            next_offset: scanned.next_offset,
            max_timestamp: scanned.max_timestamp,
            index: scanned.index,
            created_at: now,
            reserved: 0,
            unsealed: false,
            writeback_from: 0,
        };
        if !is_tail && !cut {
            self.recovery.indexes_rebuilt += 1;
            // The index vouches for the bytes: they go to disk first (an unsealed segment's
            // may be only in the page cache).
            segment.file.sync()?;
            write_index_file(&self.storage, &segment)?;
        }
        Ok((segment, scanned.epochs, cut))
    }

    /// After a crash cut an unsealed rolled segment short: the segments from `bases` on start
    /// past its end and were never durable (the durable offset never passes an unsealed
    /// segment), so they go and the cut segment becomes the tail.
    fn drop_unsealed_successors(&mut self, bases: &[Offset]) -> Result<(), OpenError> {
        let tail = self.segments.last().expect("a segment before the dropped ones");
        tracing::warn!(file = %tail.path, end = %tail.next_offset, dropped = bases.len(),
            "rolled segment was not sealed before the crash; dropping the segments after it");
        let tail_base = tail.base;
        for &base in bases {
            self.remove_segment_files(base)?;
        }
        self.storage.remove(&index_name(tail_base))?;
        self.storage.sync_dir()?;
        Ok(())
    }

    /// The segment's index and metadata, if the file is present, intact and current.
    fn read_index(
        &mut self,
        base: Offset,
        segment: &S::File,
        segment_path: &str,
        file_bytes: u64,
    ) -> Option<(SegmentIndex, crate::index::SegmentMeta)> {
        let name = index_name(base);
        let file = self.storage.open(&name).ok()?;
        let len = file.len().ok()?;
        let mut bytes = vec![0u8; usize::try_from(len).ok()?.min(INDEX_FILE_BYTES_MAX)];
        read_exact_at(&file, &mut bytes, 0, &name).ok()?;
        match SegmentIndex::decode(&bytes) {
            // A file longer than the index says, by zeros only, is space a reservation grew
            // after the segment was sealed or closed (a sync job begun earlier reserves when
            // it runs): the caller cuts them.
            Ok((index, meta)) if u64::from(meta.segment_bytes) == file_bytes => Some((index, meta)),
            Ok((index, meta))
                if u64::from(meta.segment_bytes) < file_bytes
                    && only_zeros_from(segment, segment_path, u64::from(meta.segment_bytes), file_bytes).ok()? =>
            {
                Some((index, meta))
            }
            other => {
                tracing::info!(file = %self.storage.path_of(&name), ok = other.is_ok(), "index file unusable; rebuilding");
                None
            }
        }
    }

    fn load_log_start(&mut self) -> Result<(), OpenError> {
        let first = self.segments.first().map_or(Offset::ZERO, |s| s.base);
        let stored = match checkpoint::read(&self.storage, LOG_START_FILE, LOG_START_MAGIC) {
            Ok(Some(p)) if p.len() == 8 && u64::from_le_bytes(p[..].try_into().expect("8 bytes")) <= OFFSET_MAX => {
                Offset(u64::from_le_bytes(p[..].try_into().expect("8 bytes")))
            }
            Ok(_) => first,
            Err(CheckpointError::Storage(e)) => return Err(e.into()),
            Err(CheckpointError::Damaged(path)) => {
                tracing::warn!(file = %path, "log start checkpoint damaged; using the first segment");
                first
            }
        };
        let end = self.segments.last().map_or(stored, |s| s.next_offset);
        self.log_start = stored.max(first).min(end);
        if self.log_start != stored {
            // A crash lost the tail past the stored start: persist the pulled-back start, or
            // records appended from here would vanish below it at the next open.
            self.write_log_start()?;
        }
        Ok(())
    }

    fn load_epochs(&mut self, tail_epochs: &[(LeaderEpoch, Offset, u32)]) -> Result<(), OpenError> {
        let stored = match checkpoint::read(&self.storage, EPOCH_FILE, EPOCH_MAGIC) {
            Ok(Some(p)) => EpochCache::decode(&p),
            Ok(None) => None,
            Err(CheckpointError::Storage(e)) => return Err(e.into()),
            Err(CheckpointError::Damaged(_)) => None,
        };
        let nonempty = self.segments.iter().any(|s| s.bytes > 0);
        let checkpoint_valid = stored.is_some();
        let mut cache = match stored {
            Some(c) => c,
            None if nonempty => {
                tracing::warn!("leader epoch checkpoint missing or damaged; rebuilding from batch headers");
                self.rebuild_epochs()?
            }
            None => EpochCache::default(),
        };
        let log_end = self.segments.last().map_or(self.log_start, |s| s.next_offset);
        let mut changed = cache.truncate_end(log_end);
        for (epoch, start, position) in visible_epochs(tail_epochs, self.log_start, log_end) {
            match cache.latest() {
                // An older epoch after the latest began, or a newer one before it: the epoch
                // fields (outside the CRC) or the checkpoint are damaged. Epochs are
                // checkpointed before their first batch is written, so with a valid
                // checkpoint any newer epoch in the tail is damage too.
                Some(l)
                    if (epoch < l.epoch && start >= l.start_offset)
                        || (epoch > l.epoch && (start < l.start_offset || checkpoint_valid)) =>
                {
                    let tail = self.segments.last().expect("tail epochs come from a segment");
                    let reason = format!(
                        "batch epoch {epoch} at offset {start} contradicts epoch {} from {}",
                        l.epoch, l.start_offset
                    );
                    return Err(Corruption { file: tail.path.clone(), position: u64::from(position), reason }.into());
                }
                Some(l) if epoch <= l.epoch => {}
                _ => changed |= cache.assign(epoch, start),
            }
        }
        // The checkpoint must agree with the batches it describes: a lost fsync after a
        // truncation can bring back older batches under a checkpoint written since (seen in
        // the cluster simulator). The batches are what will be served, so rebuild from them.
        let tail_base = self.segments.last().map_or(self.log_start, |s| s.base);
        let runs: Vec<(LeaderEpoch, Offset, u32)> = visible_epochs(tail_epochs, self.log_start, log_end).collect();
        let epoch_at =
            |c: &EpochCache, o: Offset| c.entries().iter().rev().find(|e| e.start_offset <= o).map(|e| e.epoch);
        // Only a scanned tail (after an unclean shutdown) says what its batches hold; after a
        // clean one the checkpoint was written with the batches synced.
        let scanned = !tail_epochs.is_empty();
        let disagrees = scanned
            && (runs.iter().any(|&(epoch, start, _)| epoch_at(&cache, start) != Some(epoch))
                || cache
                    .entries()
                    .iter()
                    .filter(|e| e.start_offset >= tail_base.max(self.log_start) && e.start_offset < log_end)
                    .any(|e| !runs.iter().any(|&(epoch, start, _)| start == e.start_offset && epoch == e.epoch)));
        if disagrees {
            tracing::warn!("leader epoch checkpoint disagrees with the batches; rebuilding from batch headers");
            cache = self.rebuild_epochs()?;
            changed = true;
        }
        changed |= cache.truncate_start(self.log_start);
        self.epochs = cache;
        if changed {
            self.write_epochs()?;
        }
        Ok(())
    }

    fn rebuild_epochs(&self) -> Result<EpochCache, OpenError> {
        let mut cache = EpochCache::default();
        for seg in &self.segments {
            let (mut position, mut expected) = (0, seg.base);
            while position < seg.bytes {
                let h = seg.read_header(position).map_err(|e| to_open_error(seg, e))?;
                seg.check_continuity(position, &h, expected).map_err(|e| to_open_error(seg, e))?;
                match cache.latest() {
                    Some(l) if h.leader_epoch < l.epoch => {
                        let reason = format!("leader epoch {} after a batch of epoch {}", h.leader_epoch, l.epoch);
                        return Err(Corruption { file: seg.path.clone(), position: u64::from(position), reason }.into());
                    }
                    Some(l) if h.leader_epoch == l.epoch => {}
                    _ => {
                        cache.assign(h.leader_epoch, h.base_offset);
                    }
                }
                expected = h.next_offset();
                position += h.batch_length;
            }
        }
        Ok(cache)
    }
}

// Private helpers: writing.
impl<S: Storage> Log<S> {
    fn append_bytes(&mut self, header: &BatchHeader, bytes: Bytes, now: Timestamp) -> Result<AppendInfo, AppendError> {
        assert_eq!(header.base_offset, self.log_end_offset(), "append at the log end");
        assert_eq!(bytes.len(), header.batch_length as usize, "batch length matches its bytes");
        if let Some(latest) = self.epochs.latest() {
            if header.leader_epoch < latest.epoch {
                return Err(AppendError::StaleEpoch { batch: header.leader_epoch, latest: latest.epoch });
            }
        }
        if self.should_roll(header, now) {
            self.roll_inner(now).map_err(|e| self.poison(e))?;
        }
        if self.epochs.assign(header.leader_epoch, header.base_offset) {
            // Persisted before the batch: a crash leaves an epoch entry past the log end,
            // which open drops, never a batch whose epoch the cache does not know.
            self.write_epochs().map_err(|e| self.poison(e))?;
        }
        let interval = self.config.index_interval_bytes;
        let step = u64::from(self.config.preallocate_bytes);
        let segment_bytes = u64::from(self.config.segment_bytes);
        let active = self.segments.last_mut().expect("a log has an active segment");
        let position = active.bytes;
        let end = u64::from(position) + bytes.len() as u64;
        if step > 0 && end > active.reserved {
            reserve(active, end, step, segment_bytes);
        }
        active.note_appended(header, position, interval);
        active.pending.push_back((position, bytes));
        Ok(AppendInfo {
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
            log_end_offset: header.next_offset(),
        })
    }

    fn should_roll(&self, header: &BatchHeader, now: Timestamp) -> bool {
        let active = self.active();
        if active.bytes == 0 {
            return false;
        }
        let too_big = u64::from(active.bytes) + u64::from(header.batch_length) > u64::from(self.config.segment_bytes);
        let too_old = self.config.segment_ms.is_some_and(|ms| now.millis_since(active.created_at) >= ms);
        let too_many_offsets = header.next_offset().distance(active.base) > u64::from(u32::MAX);
        too_big || too_old || too_many_offsets
    }

    /// Closes the active segment to appends and creates the next one. An empty active
    /// segment stays: two segments never share a base offset. The rolled segment is sealed
    /// later, without blocking the caller: its unwritten batches go out in the next write
    /// jobs, and a sync job makes it whole on disk and then writes its index file
    /// ([`Log::begin_sync`]). Until then the durable offset stays within it, and an open after
    /// a crash treats it like a tail (see `Log::open`).
    fn roll_inner(&mut self, now: Timestamp) -> Result<(), StorageError> {
        let last = self.segments.len() - 1;
        if self.segments[last].bytes == 0 {
            return Ok(());
        }
        self.segments[last].unsealed = true;
        self.segments[last].forget_recent();
        let segment = self.create_segment(self.log_end_offset(), now)?;
        self.segments.push(segment);
        Ok(())
    }

    /// The oldest rolled segment not yet sealed. Seals go oldest first, so the unsealed
    /// segments are the ones right before the active segment: only those are looked at (this
    /// runs for every write and sync job).
    fn unsealed(&self) -> Option<usize> {
        let active = self.segments.len() - 1;
        let count = self.segments[..active].iter().rev().take_while(|s| s.unsealed).count();
        (count > 0).then(|| active - count)
    }

    /// Seals every rolled segment before `before`, inline (a truncation); its bytes must be
    /// written.
    fn seal_inline(&mut self, before: usize) -> Result<(), StorageError> {
        for i in 0..before.min(self.segments.len()) {
            if self.segments[i].unsealed {
                self.segments[i].file.sync()?;
                self.seal(i)?;
            }
        }
        Ok(())
    }

    /// Completes the seal of rolled segment `i` once its bytes are synced: gives back the space
    /// reserved past its end and writes its index file, which promises a whole segment. Runs on
    /// the owner's thread, never in a job: a truncation may cut the file while a job is out.
    fn seal(&mut self, i: usize) -> Result<(), StorageError> {
        self.give_back_reserved(i)?;
        self.write_index(i)?;
        self.segments[i].unsealed = false;
        Ok(())
    }

    /// Cuts segment `i`'s file back to its batches when space is reserved past them (the
    /// reservation grew the file) and syncs the new length: an index file (seal, close) vouches
    /// for a file exactly that long, and one left longer by a crash would be scanned and its
    /// zeros taken for damage in a sealed segment.
    ///
    /// The file's length is what counts, not `reserved`: a sync job begun before a truncation
    /// may reserve (grow the file) after it.
    fn give_back_reserved(&mut self, i: usize) -> Result<(), StorageError> {
        let seg = &mut self.segments[i];
        if self.config.preallocate_bytes > 0 && seg.file.len()? != u64::from(seg.bytes) {
            seg.file.set_len(u64::from(seg.bytes))?;
            seg.file.sync()?;
        }
        seg.reserved = u64::from(seg.bytes);
        Ok(())
    }

    /// The tail cache segment `i` keeps (`LogConfig::tail_cache_bytes`): only the active
    /// segment has one.
    fn tail_keep(&self, i: usize) -> usize {
        if i + 1 == self.segments.len() {
            self.config.tail_cache_bytes as usize
        } else {
            0
        }
    }

    /// Writes every pending batch with blocking writes on this thread (a roll, a truncation,
    /// [`Log::sync`]); a write job still out writes some of them again, harmlessly.
    fn write_inline(&mut self) -> Result<(), StorageError> {
        for i in 0..self.segments.len() {
            let keep = self.tail_keep(i);
            let seg = &mut self.segments[i];
            for (position, bytes) in &seg.pending {
                seg.file.write_at(bytes, u64::from(*position))?;
                seg.written = *position + bytes.len() as u32;
            }
            seg.settle_written(keep);
        }
        self.written = self.log_end_offset();
        Ok(())
    }

    fn create_segment(&self, base: Offset, now: Timestamp) -> Result<Segment<S::File>, StorageError> {
        let name = segment_name(base);
        let file = self.storage.create(&name)?;
        self.storage.remove(&index_name(base))?;
        self.storage.sync_dir()?;
        Ok(Segment {
            base,
            file,
            path: self.storage.path_of(&name),
            bytes: 0,
            written: 0,
            pending: VecDeque::new(),
            recent: VecDeque::new(),
            recent_bytes: 0,
            next_offset: base,
            max_timestamp: Timestamp::NONE,
            index: SegmentIndex::new(),
            created_at: now,
            reserved: 0,
            unsealed: false,
            writeback_from: 0,
        })
    }

    fn write_index(&self, i: usize) -> Result<(), StorageError> {
        write_index_file(&self.storage, &self.segments[i])
    }

    /// Deletes the segments after `i`; segment `i` becomes the active one.
    fn truncate_segments_after(&mut self, i: usize) -> Result<(), StorageError> {
        while self.segments.len() > i + 1 {
            let seg = self.segments.pop().expect("more than i + 1 segments");
            self.remove_segment_files(seg.base)?;
        }
        self.storage.remove(&index_name(self.segments[i].base))?;
        self.storage.sync_dir()
    }

    /// Cuts the active segment at `position`, where the batch starting at `base` was.
    fn cut_active(&mut self, position: u32, base: Offset) -> Result<(), StorageError> {
        let seg = self.segments.last_mut().expect("a log has an active segment");
        seg.file.set_len(u64::from(position))?;
        seg.reserved = seg.reserved.min(u64::from(position));
        seg.file.sync()?;
        seg.index.truncate_to_position(position);
        seg.bytes = position;
        seg.written = seg.written.min(position);
        seg.writeback_from = seg.writeback_from.min(position);
        seg.forget_from(position);
        seg.next_offset = base;
        // The index gives the newest timestamp before its last entry; scan the rest.
        let last_entry = seg.index.entries().last();
        let mut at = last_entry.map_or(0, |e| e.position);
        let mut max = last_entry.map_or(Timestamp::NONE, |e| e.max_ts_before);
        while at < position {
            let h = seg.read_header(at).map_err(|e| match e {
                SegmentReadError::Storage(s) => s,
                SegmentReadError::Problem(p) => {
                    StorageError { op: "rescan", path: seg.path.clone(), source: std::io::Error::other(p.reason) }
                }
            })?;
            max = max.max(h.max_timestamp);
            at += h.batch_length;
        }
        seg.max_timestamp = max;
        Ok(())
    }

    /// Order matters for crashes: segments go first, then the epochs, then the new start,
    /// and only then the new segment; an open after a crash at any step finds either the old
    /// state minus some segments (an empty log at the old start) or the new one.
    fn reset_at(&mut self, offset: Offset, now: Timestamp) -> Result<(), StorageError> {
        self.generation += 1;
        self.durable = self.durable.min(offset);
        // The in-memory segments stay until the new one exists, so a failure half-way leaves
        // a poisoned log that still answers `log_end_offset` (and reads fail as IO errors).
        for base in self.segment_bases() {
            self.remove_segment_files(base)?;
        }
        self.storage.sync_dir()?;
        self.epochs = EpochCache::default();
        self.write_epochs()?;
        self.log_start = offset;
        self.write_log_start()?;
        let segment = self.create_segment(offset, now)?;
        self.segments = vec![segment];
        self.durable = offset;
        self.written = offset;
        Ok(())
    }

    /// Moves the log start forward and deletes sealed segments wholly below it.
    fn advance_start(&mut self, offset: Offset, now: Timestamp) -> Result<(), StorageError> {
        assert!(offset >= self.log_start && offset <= self.log_end_offset(), "log start {offset} out of range");
        if self.active().bytes > 0 && self.active().next_offset <= offset {
            self.roll_inner(now)?;
        }
        if offset > self.log_start {
            self.log_start = offset;
            self.write_log_start()?;
        }
        if self.epochs.truncate_start(offset) {
            self.write_epochs()?;
        }
        let doomed = self.segments.iter().take_while(|s| s.next_offset <= offset).count().min(self.segments.len() - 1);
        for seg in self.segments.drain(..doomed).collect::<Vec<_>>() {
            self.remove_segment_files(seg.base)?;
        }
        self.storage.sync_dir()
    }

    fn remove_segment_files(&self, base: Offset) -> Result<(), StorageError> {
        self.storage.remove(&segment_name(base))?;
        self.storage.remove(&index_name(base))
    }

    fn write_log_start(&self) -> Result<(), StorageError> {
        checkpoint::write(&self.storage, LOG_START_FILE, LOG_START_MAGIC, &self.log_start.0.to_le_bytes())
    }

    fn write_epochs(&self) -> Result<(), StorageError> {
        checkpoint::write(&self.storage, EPOCH_FILE, EPOCH_MAGIC, &self.epochs.encode())
    }

    fn check_writable(&self) -> Result<(), AppendError> {
        match &self.poisoned {
            Some(reason) => Err(AppendError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Marks the log unusable after a failed mutation and hands the error back.
    fn poison(&mut self, e: StorageError) -> StorageError {
        tracing::error!(error = %e, "storage failure; log poisoned until reopened");
        self.poisoned = Some(e.to_string());
        self.generation += 1;
        self.durable = self.durable.min(self.log_end_offset());
        e
    }
}

// Private helpers: reading.
impl<S: Storage> Log<S> {
    fn active(&self) -> &Segment<S::File> {
        self.segments.last().expect("a log has an active segment")
    }

    /// Index of the segment holding `offset` (which is within the log).
    fn segment_for(&self, offset: Offset) -> usize {
        let i = self.segments.partition_point(|s| s.base <= offset);
        assert!(i > 0, "offset {offset} below the first segment");
        i - 1
    }

    fn segment_at(&self, base: Offset) -> Option<usize> {
        self.segments.binary_search_by_key(&base, |s| s.base).ok()
    }

    /// Grows a range that starts with `first` at `start` by whole batches while they fit
    /// `max_bytes` and end by `end`. Jumps over indexed stretches without reading them.
    fn extend_range(
        &self,
        seg: &Segment<S::File>,
        start: u32,
        first: &BatchHeader,
        max_bytes: u32,
        end: Offset,
    ) -> Result<(u32, Offset), ReadError> {
        let mut stop = start + first.batch_length;
        let mut next = first.next_offset();
        let limit = start.saturating_add(max_bytes);
        let rel_end = u32::try_from(end.distance(seg.base)).unwrap_or(u32::MAX);
        if let Some(e) = seg.index.last_within(limit, rel_end) {
            if e.position > stop {
                stop = e.position;
                next = seg.base.plus(u64::from(e.rel_offset));
            }
        }
        while stop < seg.bytes {
            let h = seg.read_header(stop).map_err(|e| self.read_error(seg, e))?;
            seg.check_continuity(stop, &h, next).map_err(|e| self.read_error(seg, e))?;
            if u64::from(stop) + u64::from(h.batch_length) > u64::from(limit) || h.next_offset() > end {
                break;
            }
            stop += h.batch_length;
            next = h.next_offset();
        }
        Ok((stop, next))
    }

    fn offset_for_timestamp_in(&self, seg: &Segment<S::File>, ts: Timestamp) -> Result<Option<Offset>, ReadError> {
        let (rel, mut position) = seg.index.lookup_timestamp(ts);
        let mut expected = seg.base.plus(u64::from(rel));
        let mut buf = Vec::new();
        while position < seg.bytes {
            let h = seg.read_header(position).map_err(|e| self.read_error(seg, e))?;
            seg.check_continuity(position, &h, expected).map_err(|e| self.read_error(seg, e))?;
            if h.max_timestamp >= ts && h.next_offset() > self.log_start {
                buf.resize(h.batch_length as usize, 0);
                seg.read_exact(&mut buf, position)?;
                let batch = RecordBatch::parse(&buf[..]).map_err(|e| Corruption {
                    file: seg.path.clone(),
                    position: u64::from(position),
                    reason: e.to_string(),
                })?;
                let first_ts = h.first_timestamp.0;
                let found = batch.records().iter().find_map(|r| {
                    let offset = h.base_offset.plus(u64::from(r.offset_delta.to_native()));
                    let record_ts = first_ts.wrapping_add(r.timestamp_delta.to_native());
                    (record_ts >= ts.0 && offset >= self.log_start).then_some(offset)
                });
                if found.is_some() {
                    return Ok(found);
                }
            }
            expected = h.next_offset();
            position += h.batch_length;
        }
        Ok(None)
    }

    fn read_error(&self, seg: &Segment<S::File>, e: SegmentReadError) -> ReadError {
        match e {
            SegmentReadError::Storage(s) => ReadError::Storage(s),
            SegmentReadError::Problem(p) => ReadError::Corrupt(corruption(&seg.path, &p)),
        }
    }

    fn out_of_range(&self, offset: Offset) -> OutOfRange {
        OutOfRange { requested: offset, log_start: self.log_start, log_end: self.log_end_offset() }
    }
}

/// The epoch changes seen in a scan, clipped to `[log_start, log_end)`: an epoch whose
/// batches all lie below the log start (still in the file, logically deleted) says nothing
/// about the log, and one that spans the start begins, for the log, at the start.
/// Reserves disk space in the active segment through `end` and up to `step` beyond it (never
/// past the segment size), so appends write into allocated blocks: on ext4 an append into
/// unallocated space takes the inode's block-map lock, which the kernel's writeback holds
/// while it allocates blocks for the previous appends, and such appends waited 1-4 ms
/// (bench/RESULTS.md). Failing to reserve costs only that, so it is logged, not fatal.
fn reserve<F: StorageFile>(seg: &mut Segment<F>, end: u64, step: u64, segment_bytes: u64) {
    let upto = end.max(end.saturating_add(step).min(segment_bytes));
    match seg.file.preallocate(seg.reserved, upto - seg.reserved) {
        Ok(true) => seg.reserved = upto,
        Ok(false) => seg.reserved = u64::MAX,
        Err(e) => {
            tracing::warn!(file = %seg.path, error = %e, "could not reserve disk space; appending without");
            seg.reserved = u64::MAX;
        }
    }
}

fn visible_epochs(
    scanned: &[(LeaderEpoch, Offset, u32)],
    log_start: Offset,
    log_end: Offset,
) -> impl Iterator<Item = (LeaderEpoch, Offset, u32)> + '_ {
    scanned.iter().enumerate().filter_map(move |(i, &(epoch, start, position))| {
        let end = scanned.get(i + 1).map_or(log_end, |next| next.1);
        let start = start.max(log_start);
        (start < end).then_some((epoch, start, position))
    })
}

/// Checks every batch of a range read into `buf`: framing, CRC, and offsets continuing from
/// `range.first_offset` to `range.next_offset` (base offsets are outside the CRC).
fn check_range(buf: &[u8], range: &ReadRange, path: &str) -> Result<(), Corruption> {
    let mut at = 0usize;
    let mut expected = range.first_offset;
    while at < buf.len() {
        let corrupt =
            |reason: String| Corruption { file: path.to_owned(), position: range.position + at as u64, reason };
        let header = BatchHeader::decode(&buf[at..]).map_err(|e| corrupt(e.to_string()))?;
        check_crc(&header, &buf[at..]).map_err(|e| corrupt(e.to_string()))?;
        if header.base_offset != expected {
            return Err(corrupt(format!("batch base offset {} where {expected} was expected", header.base_offset)));
        }
        expected = header.next_offset();
        at += header.batch_length as usize;
    }
    if expected != range.next_offset {
        let reason = format!("range ends at offset {expected}, expected {}", range.next_offset);
        return Err(Corruption { file: path.to_owned(), position: range.position, reason });
    }
    Ok(())
}

fn write_index_file<S: Storage>(storage: &S, seg: &Segment<S::File>) -> Result<(), StorageError> {
    let mut file = storage.create(&index_name(seg.base))?;
    file.write_at(&seg.index.encode(&seg.meta()), 0)?;
    file.sync()
}

fn corruption(path: &str, p: &Problem) -> Corruption {
    Corruption { file: path.to_owned(), position: u64::from(p.position), reason: p.reason.clone() }
}

fn to_open_error<F>(seg: &Segment<F>, e: SegmentReadError) -> OpenError {
    match e {
        SegmentReadError::Storage(s) => OpenError::Storage(s),
        SegmentReadError::Problem(p) => OpenError::Corrupt(corruption(&seg.path, &p)),
    }
}

fn to_log_error(e: AppendError) -> LogError {
    match e {
        AppendError::Poisoned(r) => LogError::Poisoned(r),
        AppendError::Storage(s) => LogError::Storage(s),
        other => unreachable!("check_writable only fails with Poisoned, got {other}"),
    }
}

fn to_log_error_read(e: ReadError) -> LogError {
    match e {
        ReadError::Storage(s) => LogError::Storage(s),
        ReadError::Corrupt(c) => LogError::Corrupt(c),
        ReadError::OffsetOutOfRange(r) => LogError::OffsetOutOfRange(r),
    }
}

/// A segment loaded at open, with the epoch changes seen if it was scanned and whether a torn
/// tail was cut off.
type LoadedSegment<F> = (Segment<F>, Vec<(LeaderEpoch, Offset, u32)>, bool);

/// How many written bytes of a segment a write job lets accumulate before it starts their
/// writeback ([`WriteJob::writeback`]).
pub const WRITEBACK_BYTES: u32 = 8 << 20;

/// Offsets stop at 2^62: far beyond any real log, and far enough from `u64::MAX` that offset
/// arithmetic on values read from disk cannot overflow.
pub const OFFSET_MAX: u64 = 1 << 62;
const CLEAN_MARKER: &str = "clean-shutdown";
const CLEAN_MAGIC: u32 = u32::from_le_bytes(*b"SKCS");
const LOG_START_FILE: &str = "log-start-offset";
const LOG_START_MAGIC: u32 = u32::from_le_bytes(*b"SKLS");
const EPOCH_FILE: &str = "leader-epoch-checkpoint";
const EPOCH_MAGIC: u32 = u32::from_le_bytes(*b"SKLE");
/// An index of a 4 GiB segment at one entry per batch of 64 bytes would be 1 GiB; a larger
/// file is damage, and is not read whole.
const INDEX_FILE_BYTES_MAX: usize = 1 << 30;
const _: () = assert!(HEADER_BYTES == 64);
