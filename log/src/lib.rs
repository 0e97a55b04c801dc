//! Skein's partition log: a directory of segments holding record batches, owned by one core.
//!
//! - [`batch`]: the record batch format (header + rkyv records), written to disk unchanged.
//! - [`Log`]: append, read, sync (group commit), roll, truncate, retention, recovery.
//! - [`storage`]: the `Storage` trait and its file and memory (crash- and fault-injecting)
//!   backends.
//!
//! The log knows nothing of replication or networking; it never reads a clock (time is an
//! argument) and never locks. The byte layouts are in `log/FORMAT.md`.
#![warn(missing_docs)]

pub mod batch;
pub mod checkpoint;
mod config;
pub mod epoch;
mod error;
pub mod index;
mod log;
mod segment;
pub mod storage;
pub mod types;

pub use crate::config::{Durability, LogConfig, SEGMENT_BYTES_MAX, TAIL_CACHE_BATCHES_MAX};
pub use crate::error::{AppendError, Corruption, LogError, OpenError, OutOfRange, ReadError};
pub use crate::log::{
    hint_writeback, AppendInfo, Log, ReadLimit, ReadRange, RecoveryReport, RetentionReport, SyncJob, WriteJob,
    OFFSET_MAX, WRITEBACK_BYTES,
};
