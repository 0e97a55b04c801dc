//! Skein's partition log.
#![warn(missing_docs)]

pub mod batch;
pub mod storage;
pub mod types;
