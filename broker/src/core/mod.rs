//! The sans-IO core: replication and controller logic as deterministic state machines.
//!
//! Nothing here reads a clock, opens a socket, spawns or blocks. Every input is a method
//! named `handle_*` taking the current time; every output is a [`Command`] drained by the
//! driver (the simulator in `sim`, later the thread-per-core runtime). Logs are
//! `skein_log::Log<S>` for any storage, so the simulator runs the same code on
//! `MemStorage`, whose crashes lose unsynced bytes. Durability is reported back
//! ([`replica::Replica::handle_io_done`]), never assumed.
//!
//! - [`replica`]: one partition replica: leader (appends, follower tracking, high watermark,
//!   ISR proposals, `acks=all` completion) or follower (fetch, divergence truncation).
//! - [`node`]: one broker: its replicas, its controller session and lease, message routing.
//! - [`controller`]: the metadata state machine: broker liveness, leader election from the
//!   ISR with epoch bumps, ISR changes.
//! - [`quorum`]: that state machine replicated with Raft (raft-rs) over the voters.

pub mod autosplit;
pub mod controller;
pub mod group;
pub mod machine;
pub mod node;
pub mod producers;
pub mod quorum;
pub mod replica;
pub mod table;
pub mod txn;
pub mod txn_partition;

use std::fmt;

pub use skein_log::types::{LeaderEpoch, Offset, ProducerEpoch, ProducerId};

/// A broker (and replica) id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A partition of the simulated/managed topic set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// Time in microseconds since an arbitrary origin (virtual in the simulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// `self + ms` milliseconds.
    pub fn plus_ms(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms.saturating_mul(1000)))
    }

    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn ms_since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0) / 1000
    }

    /// The log's timestamp type (milliseconds).
    pub fn timestamp(self) -> skein_log::types::Timestamp {
        skein_log::types::Timestamp((self.0 / 1000) as i64)
    }
}

/// A request id chosen by the driver, echoed in the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Version of a partition's ISR (bumped by every accepted ISR change and every election), so
/// a leader's ISR proposal based on an old state is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IsrVersion(pub u32);

/// Produce durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// After the leader's own append (asynchronous replication).
    Leader,
    /// After every ISR member has the records on disk (the high watermark passed them).
    All,
}

/// A partition's replication state as the controller decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    /// The partition.
    pub partition: PartitionId,
    /// Leader epoch; bumped by every leader change.
    pub epoch: LeaderEpoch,
    /// The leader, if any ISR member is alive.
    pub leader: Option<NodeId>,
    /// In-sync replicas. The last member stays when it dies (it holds the committed data);
    /// the set is empty only if that member lost its log (then the partition is offline).
    pub isr: Vec<NodeId>,
    /// Version of `isr`.
    pub isr_version: IsrVersion,
    /// All assigned replicas.
    pub replicas: Vec<NodeId>,
    /// Whether the partition still takes records (issue 21: a split or merge seals it).
    pub seal: Seal,
}

/// Whether a partition takes records. A split or merge of a ranged topic seals the parent:
/// its leader refuses data from then on (`PARTITION_SEALED`; producers route to the
/// children), waits until everything it appended is committed and no transaction is open
/// on it, and reports its log end, which the controller records as the seal offset. Readers
/// finish a parent at that offset before reading its children. Never reopened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seal {
    /// Takes records.
    #[default]
    Open,
    /// Sealed by a split or merge; the offset is not known yet.
    Sealing,
    /// Sealed at this offset (the log end: no record at or after it, ever).
    Sealed(Offset),
}

impl Seal {
    /// Whether the partition refuses new data.
    pub fn refuses_data(self) -> bool {
        self != Seal::Open
    }

    /// The seal offset, once known.
    pub fn offset(self) -> Option<Offset> {
        match self {
            Seal::Sealed(o) => Some(o),
            _ => None,
        }
    }
}

/// Why a client read (`read_committed`, `read_follower`) returned no records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadFailure {
    /// Refused as a produce would be (not the leader, not ready, a failed replica).
    Refused(ProduceError),
    /// The offset is outside the log (below its start).
    OffsetOutOfRange,
    /// A damaged batch, not served (the client gets STORAGE_ERROR; the bytes stay for an
    /// operator, as on a single node).
    Corrupt(String),
    /// The storage under the log failed: its state is unknown. The driver stops the process
    /// (exit status 74), as for `Command::Fail` (a read takes `&self` and cannot emit one).
    Storage(String),
}

impl From<ProduceError> for ReadFailure {
    fn from(e: ProduceError) -> ReadFailure {
        ReadFailure::Refused(e)
    }
}

impl ReadFailure {
    pub(crate) fn from_log(e: skein_log::ReadError) -> ReadFailure {
        match e {
            skein_log::ReadError::OffsetOutOfRange(_) => ReadFailure::OffsetOutOfRange,
            skein_log::ReadError::Corrupt(c) => ReadFailure::Corrupt(c.to_string()),
            skein_log::ReadError::Storage(e) => ReadFailure::Storage(e.to_string()),
        }
    }
}

/// Errors a produce or read can end with. Codes match `skein_client::wire::ErrorCode` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProduceError {
    /// Not the leader (or the lease ran out); nothing was written.
    NotLeader,
    /// The request's leader epoch is older than the replica's; nothing was written.
    FencedLeaderEpoch,
    /// Fewer than `min_insync_replicas` in the ISR; nothing was written.
    NotEnoughReplicas,
    /// Written on the leader, but leadership was lost or the deadline passed before the
    /// durability asked for: the outcome is unknown to the client.
    Abandoned,
    /// The leader's storage failed; nothing acknowledged.
    Storage,
    /// An idempotent producer's sequence does not follow its last one; nothing was written.
    OutOfOrderSequence,
    /// An idempotent producer's epoch is older than its newest; nothing was written.
    ProducerFenced,
    /// (Reads) a new leader's high watermark has not yet reached its epoch's start, so it
    /// could be below what an earlier leader showed readers; retry shortly.
    LeaderNotReady,
    /// A transactional write to a partition its producer's transaction has not begun on (or
    /// that ended), or a control batch from a client; nothing was written.
    InvalidTxnState,
    /// The partition was split or merged ([`Seal`]) and takes no more records; nothing was
    /// written (its range belongs to its children).
    Sealed,
}

impl ProduceError {
    /// Whether the records were certainly not written (the client may report a failure);
    /// otherwise the outcome is unknown.
    pub fn definitely_not_written(self) -> bool {
        matches!(
            self,
            ProduceError::NotLeader
                | ProduceError::FencedLeaderEpoch
                | ProduceError::NotEnoughReplicas
                | ProduceError::OutOfOrderSequence
                | ProduceError::ProducerFenced
                | ProduceError::InvalidTxnState
                | ProduceError::Sealed
        )
    }
}

/// A transaction coordinator's marker for one partition (see `core::txn_partition`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkerRequest {
    /// The coordinating broker (the answer goes there).
    pub coordinator: NodeId,
    /// The coordinator's `__transaction_state` partition (routes the answer to its shard).
    pub coordinator_partition: PartitionId,
    /// Echoed in the answer.
    pub correlation: u64,
    /// The partition to write the marker to.
    pub partition: PartitionId,
    /// The transaction's producer.
    pub producer: ProducerId,
    /// The transaction's producer epoch.
    pub epoch: ProducerEpoch,
    /// Begin, commit or abort.
    pub kind: txn_partition::MarkerKind,
}

/// The outcome of a [`MarkerRequest`]: `Ok` once the marker (or the one it duplicates) is
/// committed in the partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkerResult {
    /// Echo of the request's.
    pub coordinator_partition: PartitionId,
    /// Echo of the request's.
    pub correlation: u64,
    /// The partition.
    pub partition: PartitionId,
    /// Committed, or why not.
    pub result: Result<(), ProduceError>,
}

/// A follower's fetch from its leader (pull replication).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// Partition.
    pub partition: PartitionId,
    /// The follower.
    pub replica: NodeId,
    /// The leader epoch the follower follows.
    pub epoch: LeaderEpoch,
    /// The follower's log end: it has every record below.
    pub fetch_offset: Offset,
    /// The epoch of the follower's last record (`None` for an empty log), for the
    /// divergence check (KIP-320).
    pub last_fetched_epoch: Option<LeaderEpoch>,
    /// The follower's durable offset: every record below is on its disk.
    pub durable_offset: Offset,
    /// The high watermark the follower knows: a leader holds a fetch at its log end only
    /// if this is its own (else the answer brings news).
    pub high_watermark: Offset,
    /// Echoed in the response; the follower applies only the answer to its latest fetch (a
    /// duplicated or late answer could otherwise truncate records fetched since).
    pub correlation: u64,
}

/// The leader's answer to a [`FetchRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchResponse {
    /// Whole batches from the fetch offset (possibly none), and the leader's high watermark.
    Records {
        /// Partition.
        partition: PartitionId,
        /// The request's correlation.
        correlation: u64,
        /// The leader's epoch.
        epoch: LeaderEpoch,
        /// Batches, back to back, starting at the fetch offset.
        batches: Vec<u8>,
        /// The leader's high watermark.
        high_watermark: Offset,
    },
    /// The follower's log diverges: truncate to where `epoch` ends, then fetch again.
    Diverging {
        /// Partition.
        partition: PartitionId,
        /// The request's correlation.
        correlation: u64,
        /// The leader's epoch.
        epoch: LeaderEpoch,
        /// The largest leader epoch `<=` the follower's last fetched epoch.
        end_epoch: LeaderEpoch,
        /// Where that epoch ends on the leader.
        end_offset: Offset,
    },
    /// The fetch offset is below the leader's log start (retention deleted those records):
    /// the follower empties its log and starts it at `log_start` (Kafka's
    /// OFFSET_OUT_OF_RANGE to a follower).
    OutOfRange {
        /// Partition.
        partition: PartitionId,
        /// The request's correlation.
        correlation: u64,
        /// The leader's epoch.
        epoch: LeaderEpoch,
        /// The leader's log start.
        log_start: Offset,
    },
    /// The request's epoch is not the replica's: `epoch` is the replica's (or it is not the
    /// leader). The follower waits for new partition state from the controller.
    Fenced {
        /// Partition.
        partition: PartitionId,
        /// The request's correlation.
        correlation: u64,
        /// The replica's epoch.
        epoch: LeaderEpoch,
    },
}

impl FetchResponse {
    /// The partition it answers for.
    pub fn partition(&self) -> PartitionId {
        match self {
            FetchResponse::Records { partition, .. }
            | FetchResponse::Diverging { partition, .. }
            | FetchResponse::OutOfRange { partition, .. }
            | FetchResponse::Fenced { partition, .. } => *partition,
        }
    }
}

/// Every message between nodes (brokers, the controller). Clients talk to brokers through
/// the node's produce/read methods, not messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Between controller voters: Raft's own messages (votes, appends, heartbeats).
    Raft(Box<raft::prelude::Message>),
    /// Follower to leader.
    Fetch(FetchRequest),
    /// Leader to follower.
    FetchResponse(FetchResponse),
    /// Broker to controller: alive; grants the broker a lease from `sent`.
    Heartbeat {
        /// The broker.
        broker: NodeId,
        /// Grows at every process start (Kafka's broker epoch): a broker that restarted may
        /// have lost unsynced records, so the partitions it led get a new leader epoch; a
        /// heartbeat with a smaller one is a late message from a dead process.
        incarnation: u64,
        /// Partitions whose log this process found damaged and replaced with an empty one:
        /// the broker no longer holds what it had acknowledged for them.
        lost: Vec<PartitionId>,
        /// The broker's clock when it sent the heartbeat (echoed back).
        sent: Time,
    },
    /// Controller to broker: the lease from `sent` and the state of the broker's partitions.
    HeartbeatResponse {
        /// Echo of the heartbeat's `incarnation`.
        incarnation: u64,
        /// Echo of the heartbeat's `sent`.
        sent: Time,
        /// Whether the controller considers the broker alive (unfenced).
        alive: bool,
        /// Current state of every partition the broker replicates.
        partitions: Vec<PartitionState>,
    },
    /// Leader to controller: change the ISR (shrink or expand).
    AlterIsr {
        /// The proposing leader.
        leader: NodeId,
        /// Its epoch.
        epoch: LeaderEpoch,
        /// The ISR version the proposal is based on.
        isr_version: IsrVersion,
        /// Partition.
        partition: PartitionId,
        /// Proposed ISR.
        isr: Vec<NodeId>,
    },
    /// Controller to replicas: new partition state (after an election or ISR change).
    PartitionState(PartitionState),
    /// Leader to controller: a sealing partition's log end (everything appended is
    /// committed and no transaction is open on it): its seal offset.
    Sealed {
        /// The reporting leader.
        leader: NodeId,
        /// Its epoch.
        epoch: LeaderEpoch,
        /// The partition.
        partition: PartitionId,
        /// Its log end.
        offset: Offset,
    },
    /// Leader to controller: the partition's load over the leader's last window (partitions
    /// of topics with automatic splits or merges only; see [`autosplit`]).
    Load {
        /// The reporting leader.
        leader: NodeId,
        /// Its epoch.
        epoch: LeaderEpoch,
        /// The partition.
        partition: PartitionId,
        /// What it measured.
        load: autosplit::Load,
    },
    /// Broker to controller: move leadership away from me and take me out of the ISRs, I am
    /// stopping (controlled shutdown).
    ControlledShutdown {
        /// The broker.
        broker: NodeId,
        /// Its process incarnation (a later process of the same broker is not affected).
        incarnation: u64,
    },
    /// Broker to controller: move a partition to these replicas (the first is the preferred
    /// leader). New replicas catch up first; the old ones leave when all new ones are in sync.
    Reassign {
        /// Partition.
        partition: PartitionId,
        /// The target replica set.
        replicas: Vec<NodeId>,
    },
    /// Transaction coordinator to a partition's leader: write a transaction marker.
    TxnMarker(MarkerRequest),
    /// Partition leader to transaction coordinator: the marker's outcome.
    TxnMarkerResult(MarkerResult),
    /// Broker to controller: delete a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// Broker to controller: create a topic (the answer is the topic in the metadata).
    CreateTopic {
        /// Name.
        name: String,
        /// Partitions.
        partitions: u32,
        /// Replicas per partition.
        replication: u16,
        /// How keys map to partitions.
        partitioning: skein_client::partitioning::Partitioning,
        /// Config overrides.
        configs: Vec<(String, String)>,
    },
    /// Broker to controller: split a ranged topic's partition (the answer is the split in
    /// the metadata).
    Split {
        /// Topic.
        topic: String,
        /// The partition's index.
        index: u32,
        /// The split point (a hash's 8 big-endian bytes, or a key); `None`: the middle.
        at: Option<Vec<u8>>,
    },
    /// Broker to controller: merge two adjacent partitions of a ranged topic.
    Merge {
        /// Topic.
        topic: String,
        /// The partitions' indexes.
        indexes: [u32; 2],
    },
}

impl Message {
    /// Whether the message is for the controller quorum (a broker's voter), not for a
    /// broker's core. Exhaustive, so a new message must be placed here.
    pub fn for_controller(&self) -> bool {
        match self {
            Message::Raft(_)
            | Message::Heartbeat { .. }
            | Message::AlterIsr { .. }
            | Message::CreateTopic { .. }
            | Message::ControlledShutdown { .. }
            | Message::Reassign { .. }
            | Message::Sealed { .. }
            | Message::Load { .. }
            | Message::Split { .. }
            | Message::Merge { .. }
            | Message::DeleteTopic { .. } => true,
            Message::Fetch(_)
            | Message::FetchResponse(_)
            | Message::HeartbeatResponse { .. }
            | Message::PartitionState(_)
            | Message::TxnMarker(_)
            | Message::TxnMarkerResult(_) => false,
        }
    }
}

/// Destinations of outgoing messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// A broker.
    Node(NodeId),
    /// The controller (quorum).
    Controller,
}

/// Work for the driver.
#[derive(Debug)]
pub enum Command<J> {
    /// Send a message.
    Send {
        /// Destination.
        to: Peer,
        /// Message.
        msg: Message,
    },
    /// Run this storage job (a write of appended batches, or an fdatasync) and report it with
    /// `handle_io_done`.
    Io {
        /// Partition.
        partition: PartitionId,
        /// The job.
        job: J,
    },
    /// Answer a produce.
    ProduceReply {
        /// The request.
        request: RequestId,
        /// Offset of the first record, or why not.
        result: Result<Offset, ProduceError>,
    },
    /// A marker this broker's transaction coordinator asked for was answered.
    MarkerDone(MarkerResult),
    /// A log failed: the driver stops the node (fail-stop), as the runtime's exit code 74.
    Fail {
        /// What failed.
        reason: String,
    },
}

#[cfg(test)]
mod tests;
