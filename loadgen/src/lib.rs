//! `skein-loadgen`: open-loop load generation with HDR latency reports.
//!
//! Skeleton: arrives with the loadgen issue, after the single-node broker.
#![warn(missing_docs)]
