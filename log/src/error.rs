//! Errors of the log's operations. Each operation has its own enum; all wrap the shared
//! [`StorageError`] and [`Corruption`].

use crate::storage::StorageError;
use crate::types::{LeaderEpoch, Offset};

/// Bytes on disk that are not what the log wrote: names the file and byte position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt log: {file} at byte {position}: {reason}")]
pub struct Corruption {
    /// The segment file.
    pub file: String,
    /// Byte position of the damaged batch in the file.
    pub position: u64,
    /// What is wrong.
    pub reason: String,
}

/// An offset outside `[log_start, log_end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {requested} out of range [{log_start}, {log_end}]")]
pub struct OutOfRange {
    /// The offset asked for.
    pub requested: Offset,
    /// First offset present.
    pub log_start: Offset,
    /// Log end offset.
    pub log_end: Offset,
}

/// Opening (and recovering) a log failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// IO failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Damage that recovery must not repair silently.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
    /// The configuration is invalid.
    #[error("invalid log config: {0}")]
    Config(&'static str),
}

/// Appending a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// IO failed; the log is now poisoned and must be reopened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An earlier IO failure poisoned the log.
    #[error("log poisoned by an earlier failure: {0}")]
    Poisoned(String),
    /// The batch carries an epoch older than the log's latest.
    #[error("batch epoch {batch} is older than the log's epoch {latest}")]
    StaleEpoch {
        /// The batch's epoch.
        batch: LeaderEpoch,
        /// The log's latest epoch.
        latest: LeaderEpoch,
    },
    /// The batch would take offsets past `OFFSET_MAX` (2^62).
    #[error("offsets past 2^62 from log end {0}")]
    OffsetLimit(Offset),
    /// A replicated batch does not start at the log end.
    #[error("batch starts at {batch}, log ends at {log_end}")]
    OffsetMismatch {
        /// The batch's base offset.
        batch: Offset,
        /// The log end offset.
        log_end: Offset,
    },
}

/// Reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offset is below the log start or above the log end.
    #[error(transparent)]
    OffsetOutOfRange(#[from] OutOfRange),
    /// IO failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The bytes are damaged; nothing from the damaged batch is returned.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
}

/// A maintenance operation (sync, roll, truncate, retention, close, delete) failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// IO failed; the log is now poisoned and must be reopened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An earlier IO failure poisoned the log.
    #[error("log poisoned by an earlier failure: {0}")]
    Poisoned(String),
    /// The offset is outside the log.
    #[error(transparent)]
    OffsetOutOfRange(#[from] OutOfRange),
    /// The bytes are damaged.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
}
