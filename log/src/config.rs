//! Per-log settings: segment size and age, index density, durability, retention.

use crate::batch::BATCH_BYTES_MAX;

/// When appended bytes are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every append is synced before it counts as durable; appends waiting together share one
    /// fdatasync (group commit).
    Always,
    /// Synced when this many milliseconds passed since the last sync.
    IntervalMs(u64),
    /// Left to the OS; synced only on roll and clean close.
    Never,
}

/// Settings of one partition log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment when the active one would exceed this (default 1 GiB).
    pub segment_bytes: u32,
    /// Roll when the active segment is this old, in milliseconds (default 7 days).
    pub segment_ms: Option<u64>,
    /// Bytes between sparse index entries (default 4 KiB).
    pub index_interval_bytes: u32,
    /// Sync policy (default `Always`).
    pub durability: Durability,
    /// Delete the oldest sealed segments while the log stays at least this big (default: off).
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this, in ms (default 7 days).
    pub retention_ms: Option<u64>,
    /// Reserve disk space in the active segment this many bytes ahead of the appends
    /// (`fallocate`), given back when the segment is sealed; 0 turns it off (the default).
    pub preallocate_bytes: u32,
    /// Keep the newest batches of the active segment in memory after they are written, up to
    /// this many bytes (and [`TAIL_CACHE_BATCHES_MAX`] batches), so reads of the tail (a
    /// follower's fetch, a consumer or a state machine catching up) copy them from there and
    /// make no file read; 0 turns it off (the default). A cached batch shares the buffer it
    /// arrived in, so the batch bound also bounds the buffers a slow partition keeps alive.
    pub tail_cache_bytes: u32,
}

/// The most batches [`LogConfig::tail_cache_bytes`] keeps, whatever their size.
pub const TAIL_CACHE_BATCHES_MAX: usize = 256;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: Some(WEEK_MS),
            index_interval_bytes: 4096,
            durability: Durability::Always,
            retention_bytes: None,
            retention_ms: Some(WEEK_MS),
            preallocate_bytes: 0,
            tail_cache_bytes: 0,
        }
    }
}

impl LogConfig {
    /// Checks the settings; the error names the bad one.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.segment_bytes < 1024 {
            return Err("segment_bytes must be at least 1024");
        }
        if self.segment_bytes > SEGMENT_BYTES_MAX {
            return Err("segment_bytes too large: positions are 32-bit");
        }
        if self.index_interval_bytes == 0 {
            return Err("index_interval_bytes must be positive");
        }
        Ok(())
    }
}

/// The largest segment: a full segment plus one maximal batch must still fit a `u32` position.
pub const SEGMENT_BYTES_MAX: u32 = u32::MAX - BATCH_BYTES_MAX;
const WEEK_MS: u64 = 7 * 24 * 3600 * 1000;
