//! Skein's client library: the wire protocol (shared with the broker), an admin [`Client`],
//! a batching [`Producer`] and a [`Consumer`], all on compio (call them from inside a compio
//! runtime). The `skein` CLI is built on it.
//!
//! ```no_run
//! # compio::runtime::Runtime::new().unwrap().block_on(async {
//! use skein_client::{Client, Consumer, ConsumerConfig, Position, Producer, ProducerConfig};
//!
//! let client = Client::connect("127.0.0.1:9092").await?;
//! client.create_topic("greetings", 4, 1, &[]).await?;
//! let producer = Producer::new(client.clone(), ProducerConfig::default());
//! let delivery = producer.send("greetings", Some(b"key"), b"hello").await?;
//! let (partition, offset) = delivery.await?;
//! let mut consumer = Consumer::new(client, ConsumerConfig::default());
//! consumer.assign("greetings", &[partition], Position::Offset(offset)).await?;
//! let records = consumer.poll().await?;
//! assert_eq!(records[0].value, b"hello");
//! # Ok::<(), skein_client::ClientError>(())
//! # });
//! ```
//!
//! Consumer groups: a [`GroupConsumer`] reads the partitions its group's coordinator assigns
//! it (server-side assignment, one heartbeat RPC), committing its offsets; the group admin
//! calls (`list_groups`, `describe_group`, `reset_offsets`, ...) are on [`Client`]. See
//! `group.rs` and PROTOCOL.md, "Consumer groups".
//!
//! Transactions: a [`TransactionalProducer`] writes to several partitions, and commits a
//! group's offsets, as one unit that commits or aborts whole; consumers read only committed
//! transactions by default ([`Isolation`]). The transaction admin calls
//! (`list_transactions`, `describe_transaction`, `abort_transaction`) are on [`Client`]. See
//! `txn.rs` and PROTOCOL.md, "Transactions".
//!
//! Tables: a [`Table`] is a topic with `table=true`, read and written in [`TableTxn`]
//! transactions at an isolation level (`wire::Level`: read-committed, snapshot,
//! serializable, serial, 2pl, ssi); see `table.rs` and PROTOCOL.md, "Tables".
//!
//! Reads may be served by followers (`ConsumerConfig::prefer_replica`), and a [`Session`]
//! shared by producers and consumers (`session` in both configs) gives read-your-writes and
//! monotonic reads across replicas and failovers; see `consumer.rs` and PROTOCOL.md §9.
#![warn(missing_docs)]

mod admin;
pub mod conn;
mod consumer;
mod group;
pub mod index;
pub mod partitioning;
mod producer;
mod session;
pub mod table;
mod txn;
pub mod wire;

pub use admin::{group_by_leader, parse_topic_config, Client, ClientConfig, GroupedByLeader};
pub use consumer::{
    is_aborted, Consumer, ConsumerConfig, ConsumerRecord, FetchedBatch, Isolation, Position, ReadReplica,
    ReadReplicaParseError, ReadStats, SessionLag,
};
pub use group::{
    offset_lags, parse_rfc3339_ms, reconcile, Assignor, Coordinator, GroupConfig, GroupConsumer, GroupList,
    GroupMetadata, GroupStats, OffsetLag, OffsetReset, OffsetTarget, Partition, RebalanceListener,
    COORDINATOR_RETRY_BACKOFF, GROUP_FETCH_WAIT_MAX,
};
pub use producer::{
    key_partition, yield_now, Acks, Delivery, DeliveryResult, Producer, ProducerConfig, ProducerRecord, Retry, TrySend,
};
pub use session::{Session, SessionError, SessionHandle, Token};
pub use table::{Committed, RunResult, Step, Table, TableError, TableTxn};
pub use txn::{TransactionList, TransactionalProducer, TxnConfig, TxnError};

use crate::wire::ErrorCode;

/// What went wrong talking to a broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A socket operation failed.
    #[error("io: {0}")]
    Io(String),
    /// The connection broke while the request was outstanding.
    #[error("connection lost")]
    ConnectionLost,
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The broker answered with an error code.
    #[error("broker error {0} for {1}")]
    Broker(ErrorCode, String),
    /// The broker's bytes did not decode, or a batch failed its checks.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The caller asked for something impossible (unknown partition, bad argument).
    #[error("invalid: {0}")]
    Invalid(String),
}

impl ClientError {
    /// A stable upper-case name for the failure: the broker's error code name (PROTOCOL.md),
    /// or `IO_ERROR`, `CONNECTION_LOST`, `TIMED_OUT`, `PROTOCOL_ERROR`, `INVALID` for failures
    /// on the client's side. The CLI prints it in `error PARTITION CODE` lines.
    pub fn code_name(&self) -> &'static str {
        match self {
            ClientError::Io(_) => "IO_ERROR",
            ClientError::ConnectionLost => "CONNECTION_LOST",
            ClientError::Timeout(_) => "TIMED_OUT",
            ClientError::Broker(code, _) => code.name(),
            ClientError::Protocol(_) => "PROTOCOL_ERROR",
            ClientError::Invalid(_) => "INVALID",
        }
    }

    /// Whether retrying (after refreshing metadata or reconnecting) may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::ConnectionLost | ClientError::Timeout(_) => true,
            ClientError::Broker(code, _) => code.is_retriable(),
            ClientError::Protocol(_) | ClientError::Invalid(_) => false,
        }
    }

    /// Whether the failure suggests the client's metadata is out of date (the partition moved
    /// to another leader, or the broker is gone or stuck), so it should be refreshed before a
    /// retry: NOT_LEADER, FENCED_LEADER_EPOCH, UNKNOWN_TOPIC_OR_PARTITION, REQUEST_TIMED_OUT,
    /// NOT_ENOUGH_REPLICAS, SHUTTING_DOWN, a lost connection, an IO error or no answer in
    /// time. (THROTTLED is retried without a refresh.)
    pub fn refreshes_metadata(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::ConnectionLost | ClientError::Timeout(_) => true,
            ClientError::Broker(code, _) => matches!(
                *code,
                ErrorCode::NOT_LEADER
                    | ErrorCode::FENCED_LEADER_EPOCH
                    | ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
                    | ErrorCode::REQUEST_TIMED_OUT
                    | ErrorCode::NOT_ENOUGH_REPLICAS
                    | ErrorCode::SHUTTING_DOWN
                    | ErrorCode::PARTITION_SEALED
            ),
            ClientError::Protocol(_) | ClientError::Invalid(_) => false,
        }
    }
}
