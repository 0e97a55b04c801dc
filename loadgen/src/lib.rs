//! `skein-loadgen`: open-loop load against Skein, HDR latency histograms, reports for people
//! (tables, SVG plots) and programs (JSON, HdrHistogram interval logs), and the machine's own
//! ceilings measured with the same sizes.
//!
//! - [`keys`]: key distributions (none, uniform, zipf).
//! - [`report`]: the JSON report (keys other tools rely on) and the final table.
//! - [`load`]: produce, consume and end-to-end runs.
//! - [`limits`]: loopback TCP and disk ceilings.
//! - [`plot`]: latency-by-percentile SVG charts.
//! - [`verify`]: a checked workload (history + [`skein_broker::check`]) with faults;
//!   [`txn_verify`]: its transactional producers; [`txn_check`]: the transaction checks.
//! - [`cluster`]: a local cluster of real broker processes (start, kill, restart, pause).
//! - [`chaos`]: network faults between those brokers with nftables.
//! - [`failover`]: failover time under kill -9 of the leader, and leader stability.
//! - [`groups`]: consumer group members' events, a steady producer, rebalance windows and
//!   pauses; [`group_consume`]: `consume --group`; [`rebalance`]: rebalance after SIGKILL.
//! - [`tables`]: PostgreSQL's peer benchmark workloads (transfer, list append) on a table.
#![warn(missing_docs)]

pub mod chaos;
pub mod cluster;
pub mod failover;
pub mod group_consume;
pub mod groups;
pub mod keys;
pub mod limits;
pub mod load;
pub mod plot;
pub mod rebalance;
pub mod report;
pub mod tables;
pub mod txn_check;
pub mod txn_verify;
pub mod verify;
