//! The request and response messages. Each encodes as its fields in order (see
//! `client/PROTOCOL.md`). Partition-level lists are flat: every entry names its topic.

use bytes::BytesMut;

use super::ErrorCode;
use crate::wire_struct;

wire_struct! {
    /// ApiVersions request: no fields.
    pub struct ApiVersionsRequest {}
}

wire_struct! {
    /// One supported API and its version range.
    pub struct ApiVersion { pub api_key: u16, pub min_version: u16, pub max_version: u16 }
}

wire_struct! {
    /// ApiVersions response.
    pub struct ApiVersionsResponse { pub apis: Vec<ApiVersion> }
}

wire_struct! {
    /// Metadata request: `None` asks for every topic.
    pub struct MetadataRequest { pub topics: Option<Vec<String>> }
}

wire_struct! {
    /// A broker of the cluster. `rack`: its `--rack` (empty: none); a consumer preferring the
    /// closest replica reads from an in-sync replica in its own rack.
    pub struct BrokerInfo { pub node_id: u32, pub host: String, pub port: u16, pub rack: String }
}

wire_struct! {
    /// A partition's half-open range of points (`crate::partitioning`): `[from, to)`; no
    /// `to`: unbounded above.
    pub struct PartitionRange { pub from: BytesMut, pub to: Option<BytesMut> }
}

wire_struct! {
    /// Where a partition sits in its topic (issue 21): its range (ranged schemes), the
    /// indexes it was split or merged from, and its seal: `seal` 0 open, 1 sealing (refuses
    /// records; offset not known yet), 2 sealed at `sealed_at` (its log end, for good).
    pub struct Lineage { pub range: Option<PartitionRange>, pub parents: Vec<u32>, pub seal: u8, pub sealed_at: u64 }
}

impl Default for Lineage {
    /// A hash topic's partition: no range, no parents, open.
    fn default() -> Lineage {
        Lineage { range: None, parents: Vec::new(), seal: 0, sealed_at: 0 }
    }
}

wire_struct! {
    /// Leadership of one partition.
    pub struct PartitionMetadata {
        pub partition: u32,
        pub error: ErrorCode,
        pub leader: u32,
        pub leader_epoch: u32,
        pub replicas: Vec<u32>,
        pub isr: Vec<u32>,
        pub lineage: Lineage,
    }
}

wire_struct! {
    /// One topic's metadata. `partitioning`: `crate::partitioning::Partitioning`'s wire byte.
    pub struct TopicMetadata {
        pub name: String,
        pub error: ErrorCode,
        pub partitioning: u8,
        pub partitions: Vec<PartitionMetadata>,
    }
}

wire_struct! {
    /// Metadata response.
    pub struct MetadataResponse { pub brokers: Vec<BrokerInfo>, pub controller: u32, pub topics: Vec<TopicMetadata> }
}

wire_struct! {
    /// A topic to create.
    pub struct NewTopic {
        pub name: String,
        pub partitions: u32,
        pub replicas: u16,
        pub configs: Vec<TopicConfig>,
        pub partitioning: u8,
    }
}

wire_struct! {
    /// A topic config entry.
    pub struct TopicConfig { pub key: String, pub value: String }
}

wire_struct! {
    /// CreateTopics request.
    pub struct CreateTopicsRequest { pub topics: Vec<NewTopic> }
}

wire_struct! {
    /// The outcome for one topic.
    pub struct TopicResult { pub name: String, pub error: ErrorCode, pub message: String }
}

wire_struct! {
    /// CreateTopics response.
    pub struct CreateTopicsResponse { pub results: Vec<TopicResult> }
}

wire_struct! {
    /// DeleteTopics request.
    pub struct DeleteTopicsRequest { pub names: Vec<String> }
}

wire_struct! {
    /// DeleteTopics response.
    pub struct DeleteTopicsResponse { pub results: Vec<TopicResult> }
}

wire_struct! {
    /// DescribeTopics request: empty asks for every topic.
    pub struct DescribeTopicsRequest { pub names: Vec<String> }
}

wire_struct! {
    /// One partition's leadership and offsets.
    pub struct PartitionDescription {
        pub partition: u32,
        pub error: ErrorCode,
        pub leader: u32,
        pub leader_epoch: u32,
        pub replicas: Vec<u32>,
        pub isr: Vec<u32>,
        pub log_start: u64,
        pub high_watermark: u64,
        pub log_end: u64,
        pub last_stable: u64,
        pub lineage: Lineage,
    }
}

wire_struct! {
    /// One topic's description.
    pub struct TopicDescription {
        pub name: String,
        pub error: ErrorCode,
        pub partitioning: u8,
        pub configs: Vec<TopicConfig>,
        pub partitions: Vec<PartitionDescription>,
    }
}

wire_struct! {
    /// SplitPartition request: split partition `partition` of a ranged topic at `at` (a
    /// hash's 8 big-endian bytes, or a key; absent: the range's middle).
    pub struct SplitPartitionRequest { pub topic: String, pub partition: u32, pub at: Option<BytesMut> }
}

wire_struct! {
    /// MergePartitions request: merge two adjacent partitions of a ranged topic.
    pub struct MergePartitionsRequest { pub topic: String, pub partitions: Vec<u32> }
}

wire_struct! {
    /// SplitPartition and MergePartitions response: the children's indexes, once the
    /// controller applied the change (the parents are sealing; their seal offsets follow in
    /// the metadata).
    pub struct ResizeResponse { pub error: ErrorCode, pub message: String, pub children: Vec<u32> }
}

wire_struct! {
    /// DescribeTopics response.
    pub struct DescribeTopicsResponse { pub topics: Vec<TopicDescription> }
}

wire_struct! {
    /// Record batches for one partition (one or more batches back to back). `leader_epoch`:
    /// the leader epoch the client's metadata names (0: not given); a leader of a newer epoch
    /// answers FENCED_LEADER_EPOCH.
    pub struct ProducePartition { pub topic: String, pub partition: u32, pub leader_epoch: u32, pub records: BytesMut }
}

wire_struct! {
    /// Produce request. `acks`: -1 all, 1 leader, 0 none (no response is sent).
    pub struct ProduceRequest { pub acks: i8, pub timeout_ms: u32, pub partitions: Vec<ProducePartition> }
}

wire_struct! {
    /// The outcome for one partition: the first offset assigned.
    pub struct ProducePartitionResponse {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub base_offset: u64,
        pub leader_epoch: u32,
        pub log_start: u64,
    }
}

wire_struct! {
    /// Produce response, entries in request order.
    pub struct ProduceResponse { pub partitions: Vec<ProducePartitionResponse> }
}

wire_struct! {
    /// Where to read one partition. `leader_epoch` as in `ProducePartition` (a follower
    /// compares it with the epoch it follows). The session token (`min_high_watermark`,
    /// `min_leader_epoch`; 0 = none): the replica serves the read only once its high watermark
    /// is at least `min_high_watermark` and it knows epoch `min_leader_epoch` or a newer one;
    /// it waits up to its read wait for that, then answers NOT_CAUGHT_UP.
    pub struct FetchPartition {
        pub topic: String,
        pub partition: u32,
        pub leader_epoch: u32,
        pub fetch_offset: u64,
        pub partition_max_bytes: u32,
        pub min_high_watermark: u64,
        pub min_leader_epoch: u32,
    }
}

wire_struct! {
    /// Fetch request: waits up to `max_wait_ms` for `min_bytes`. `isolation`:
    /// [`READ_UNCOMMITTED`] (up to the high watermark) or [`READ_COMMITTED`] (up to the last
    /// stable offset, with the aborted transactions of the range listed).
    /// `replica_read`: a follower of a partition may serve it (up to the high watermark it
    /// learned from the leader); false: only the leader serves, others answer NOT_LEADER.
    pub struct FetchRequest {
        pub max_wait_ms: u32,
        pub min_bytes: u32,
        pub max_bytes: u32,
        pub isolation: u8,
        pub replica_read: bool,
        pub partitions: Vec<FetchPartition>,
    }
}

wire_struct! {
    /// Whole batches of one partition, as stored, all below `high_watermark` (below
    /// `last_stable` for read_committed). `aborted`: for read_committed, the aborted
    /// transactions overlapping the batches (drop a transactional batch of `producer_id` at an
    /// offset in `first_offset..last_offset`; control batches are never records). `leader_epoch`:
    /// the newest epoch the serving replica knows (for session tokens; 0 if unknown).
    /// `token_wait_us`: how long the read waited for the replica to catch up with its session
    /// token (0: it had).
    pub struct FetchPartitionResponse {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub high_watermark: u64,
        pub leader_epoch: u32,
        pub log_start: u64,
        pub token_wait_us: u32,
        pub last_stable: u64,
        pub aborted: Vec<AbortedTransaction>,
        pub records: BytesMut,
    }
}

wire_struct! {
    /// An aborted transaction of one producer in one partition: its records lie in
    /// `first_offset..last_offset`; `last_offset` is its abort marker's offset.
    pub struct AbortedTransaction { pub producer_id: i64, pub first_offset: u64, pub last_offset: u64 }
}

/// `FetchRequest::isolation` / `ListOffsetsRequest::isolation`: every committed record,
/// transactional or not, decided or not.
pub const READ_UNCOMMITTED: u8 = 0;
/// `FetchRequest::isolation` / `ListOffsetsRequest::isolation`: only records below the last
/// stable offset, aborted transactions listed for the client to drop.
pub const READ_COMMITTED: u8 = 1;

wire_struct! {
    /// Fetch response, entries in request order.
    pub struct FetchResponse { pub partitions: Vec<FetchPartitionResponse> }
}

wire_struct! {
    /// Which offset to look up: `timestamp` -2 earliest, -1 latest, else the first offset
    /// with a timestamp at or after it.
    pub struct ListOffsetsPartition { pub topic: String, pub partition: u32, pub timestamp: i64 }
}

wire_struct! {
    /// ListOffsets request; with `isolation` [`READ_COMMITTED`] "latest" is the last stable
    /// offset.
    pub struct ListOffsetsRequest { pub isolation: u8, pub partitions: Vec<ListOffsetsPartition> }
}

wire_struct! {
    /// The offset found (the log end if no record is that recent).
    pub struct ListOffsetsPartitionResponse { pub topic: String, pub partition: u32, pub error: ErrorCode, pub offset: u64 }
}

wire_struct! {
    /// ListOffsets response.
    pub struct ListOffsetsResponse { pub partitions: Vec<ListOffsetsPartitionResponse> }
}

/// `ListOffsetsPartition::timestamp` for the earliest offset.
pub const EARLIEST: i64 = -2;
/// `ListOffsetsPartition::timestamp` for the latest offset (the log end).
pub const LATEST: i64 = -1;

wire_struct! {
    /// InitProducerId request: a new idempotent producer identity (`transactional_id` `None`,
    /// any broker), or a transactional producer's (its coordinator): the id's producer id with a
    /// new epoch, fencing earlier instances and aborting their unfinished transaction.
    /// `transaction_timeout_ms` (0: the broker default) bounds each transaction.
    pub struct InitProducerIdRequest { pub transactional_id: Option<String>, pub transaction_timeout_ms: u32 }
}

wire_struct! {
    /// InitProducerId response: a producer id unique in the cluster's lifetime, epoch 0.
    pub struct InitProducerIdResponse {
        pub error: ErrorCode,
        pub message: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
    }
}

wire_struct! {
    /// ReassignPartition request: move one partition to `replicas` (the first is the preferred
    /// leader). Answered once the controller has started the move; new replicas then catch up
    /// and the old ones leave (watch it with DescribeTopics).
    pub struct ReassignPartitionRequest { pub topic: String, pub partition: u32, pub replicas: Vec<u32> }
}

wire_struct! {
    /// ReassignPartition response.
    pub struct ReassignPartitionResponse { pub error: ErrorCode, pub message: String }
}

// ---- Consumer groups (PROTOCOL.md, "Consumer groups") ----

wire_struct! {
    /// One partition of a topic.
    pub struct TopicPartition { pub topic: String, pub partition: u32 }
}

wire_struct! {
    /// FindCoordinator request: which broker coordinates `group` (`key_type` [`GROUP_KEY`],
    /// creates `__consumer_offsets` on first use) or transactional id `group` (`key_type`
    /// [`TRANSACTION_KEY`], creates `__transaction_state` on first use).
    pub struct FindCoordinatorRequest { pub group: String, pub key_type: u8 }
}

wire_struct! {
    /// FindCoordinator response: the leader of the group's `__consumer_offsets` partition.
    pub struct FindCoordinatorResponse {
        pub error: ErrorCode,
        pub message: String,
        pub node_id: u32,
        pub host: String,
        pub port: u16,
    }
}

/// `FindCoordinatorRequest::key_type` of a consumer group.
pub const GROUP_KEY: u8 = 0;
/// `FindCoordinatorRequest::key_type` of a transactional id.
pub const TRANSACTION_KEY: u8 = 1;

/// `GroupHeartbeatRequest::member_epoch` to join (a new member, or a static member coming back).
pub const JOIN_EPOCH: i32 = 0;
/// `GroupHeartbeatRequest::member_epoch` to leave the group for good.
pub const LEAVE_EPOCH: i32 = -1;
/// `GroupHeartbeatRequest::member_epoch` for a static member that leaves for a restart: it
/// keeps its partitions (no rebalance) until its session times out.
pub const STATIC_LEAVE_EPOCH: i32 = -2;

wire_struct! {
    /// GroupHeartbeat request (server-side assignment, as Kafka's KIP-848): joins with
    /// `member_epoch` 0 (and an empty `member_id`), then heartbeats with the epoch and id the
    /// coordinator gave; `topics` `None` keeps the subscription; `owned` is what the member
    /// consumes now (`None`: unchanged since the last heartbeat).
    pub struct GroupHeartbeatRequest {
        pub group: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub instance_id: String,
        pub client_id: String,
        pub host: String,
        pub rack: String,
        pub session_timeout_ms: u32,
        pub assignor: String,
        pub topics: Option<Vec<String>>,
        pub owned: Option<Vec<TopicPartition>>,
    }
}

wire_struct! {
    /// GroupHeartbeat response: the partitions the member should own now (revoke what is not
    /// listed, after committing it; start what is new), its id and epoch.
    pub struct GroupHeartbeatResponse {
        pub error: ErrorCode,
        pub message: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub heartbeat_interval_ms: u32,
        pub assignment: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// An offset to commit: the next offset the group reads from the partition.
    pub struct OffsetCommitPartition { pub topic: String, pub partition: u32, pub offset: u64, pub metadata: String }
}

wire_struct! {
    /// OffsetCommit request. A member commits with its id and epoch, only partitions it owns;
    /// an administrative commit (reset-offsets) has an empty `member_id` and epoch -1 and is
    /// refused while the group has members.
    pub struct OffsetCommitRequest {
        pub group: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub offsets: Vec<OffsetCommitPartition>,
    }
}

wire_struct! {
    /// One partition's commit result.
    pub struct OffsetCommitPartitionResponse { pub topic: String, pub partition: u32, pub error: ErrorCode }
}

wire_struct! {
    /// OffsetCommit response: answered once the commit is replicated (acks=all).
    pub struct OffsetCommitResponse {
        pub error: ErrorCode,
        pub message: String,
        pub partitions: Vec<OffsetCommitPartitionResponse>,
    }
}

wire_struct! {
    /// OffsetFetch request: committed offsets of `partitions` (`None`: every partition the
    /// group has an offset for).
    pub struct OffsetFetchRequest { pub group: String, pub partitions: Option<Vec<TopicPartition>> }
}

wire_struct! {
    /// A committed offset; `offset` -1: none committed.
    pub struct OffsetFetchPartition { pub topic: String, pub partition: u32, pub offset: i64, pub metadata: String }
}

wire_struct! {
    /// OffsetFetch response.
    pub struct OffsetFetchResponse { pub error: ErrorCode, pub message: String, pub offsets: Vec<OffsetFetchPartition> }
}

wire_struct! {
    /// ListGroups request: the groups this broker coordinates.
    pub struct ListGroupsRequest {}
}

wire_struct! {
    /// A group in a listing.
    pub struct ListedGroup { pub group: String, pub state: String, pub members: u32 }
}

wire_struct! {
    /// ListGroups response.
    pub struct ListGroupsResponse { pub groups: Vec<ListedGroup> }
}

wire_struct! {
    /// DescribeGroup request.
    pub struct DescribeGroupRequest { pub group: String }
}

wire_struct! {
    /// A member of a described group.
    pub struct GroupMemberDescription {
        pub member_id: String,
        pub instance_id: String,
        pub client_id: String,
        pub host: String,
        pub member_epoch: i32,
        pub assignment: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// DescribeGroup response: `state` is `Empty`, `Reconciling` or `Stable`; `generation`
    /// the group epoch; `protocol` the assignor.
    pub struct DescribeGroupResponse {
        pub error: ErrorCode,
        pub message: String,
        pub group: String,
        pub state: String,
        pub generation: i32,
        pub protocol: String,
        pub members: Vec<GroupMemberDescription>,
        pub offsets: Vec<OffsetFetchPartition>,
    }
}

wire_struct! {
    /// DeleteGroup request: refused while the group has members.
    pub struct DeleteGroupRequest { pub group: String }
}

wire_struct! {
    /// DeleteGroup response.
    pub struct DeleteGroupResponse { pub error: ErrorCode, pub message: String }
}

// ---- Transactions (PROTOCOL.md, "Transactions") ----

wire_struct! {
    /// AddPartitionsToTxn request (to the transaction coordinator): the partitions join the
    /// producer's ongoing transaction (one starts if none is); each is answered once the
    /// partition's leader has recorded the transaction's start, and only then may the
    /// producer write to it.
    pub struct AddPartitionsToTxnRequest {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub partitions: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// One partition's answer.
    pub struct TxnPartitionResult { pub topic: String, pub partition: u32, pub error: ErrorCode }
}

wire_struct! {
    /// AddPartitionsToTxn response: `error` for the whole request, else one entry per partition.
    pub struct AddPartitionsToTxnResponse {
        pub error: ErrorCode,
        pub message: String,
        pub partitions: Vec<TxnPartitionResult>,
    }
}

wire_struct! {
    /// AddOffsetsToTxn request: the group's `__consumer_offsets` partition joins the
    /// transaction, so a TxnOffsetCommit can follow.
    pub struct AddOffsetsToTxnRequest {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub group: String,
    }
}

wire_struct! {
    /// AddOffsetsToTxn response.
    pub struct AddOffsetsToTxnResponse { pub error: ErrorCode, pub message: String }
}

wire_struct! {
    /// EndTxn request: commit (`commit` true) or abort the producer's transaction. Answered
    /// once every partition of the transaction holds its marker (decided, visible to
    /// read_committed readers).
    pub struct EndTxnRequest {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub commit: bool,
    }
}

wire_struct! {
    /// EndTxn response: the producer id and epoch for the next transaction (the epoch is
    /// bumped by every transaction, so nothing of an ended one can touch a later one).
    pub struct EndTxnResponse {
        pub error: ErrorCode,
        pub message: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
    }
}

wire_struct! {
    /// TxnOffsetCommit request (to the group's coordinator): the offsets are written as part
    /// of the producer's transaction and take effect when it commits. `member_id` /
    /// `member_epoch` as in OffsetCommit (empty / -1: not a member, only for empty groups).
    pub struct TxnOffsetCommitRequest {
        pub transactional_id: String,
        pub group: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub member_id: String,
        pub member_epoch: i32,
        pub partitions: Vec<OffsetCommitPartition>,
    }
}

wire_struct! {
    /// TxnOffsetCommit response.
    pub struct TxnOffsetCommitResponse {
        pub error: ErrorCode,
        pub message: String,
        pub partitions: Vec<OffsetCommitPartitionResponse>,
    }
}

wire_struct! {
    /// ListTransactions request: every transactional id the broker coordinates.
    pub struct ListTransactionsRequest {}
}

wire_struct! {
    /// One transactional id. `state`: `empty`, `ongoing`, `prepare_commit`, `prepare_abort`,
    /// `complete_commit`, `complete_abort`; `age_ms`: since its transaction started (0 when
    /// none is open).
    pub struct ListedTransaction {
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub state: String,
        pub age_ms: u64,
    }
}

wire_struct! {
    /// ListTransactions response.
    pub struct ListTransactionsResponse { pub transactions: Vec<ListedTransaction> }
}

wire_struct! {
    /// DescribeTransaction request.
    pub struct DescribeTransactionRequest { pub transactional_id: String }
}

wire_struct! {
    /// DescribeTransaction response.
    pub struct DescribeTransactionResponse {
        pub error: ErrorCode,
        pub message: String,
        pub transactional_id: String,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub state: String,
        pub timeout_ms: u32,
        pub age_ms: u64,
        pub partitions: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// AbortTransaction request: abort the id's open transaction now (its markers are
    /// written) and fence its producer (epoch bump), as a timeout does.
    pub struct AbortTransactionRequest { pub transactional_id: String }
}

wire_struct! {
    /// AbortTransaction response.
    pub struct AbortTransactionResponse { pub error: ErrorCode, pub message: String }
}

// ---- Tables (PROTOCOL.md, "Tables") ----

wire_struct! {
    /// Who is asking, on every table request: the transaction's id (unique per client
    /// process and transaction), its isolation level (`table::Level` codes: 0 read-committed,
    /// 1 snapshot, 2 serializable, 3 serial, 4 2pl, 5 ssi), its start in microseconds of wall
    /// time (wound-wait priority: older wins, ties by id) and its timeout.
    pub struct TableTxn { pub txn: u64, pub level: u8, pub begin_us: u64, pub timeout_ms: u32 }
}

wire_struct! {
    /// A half-open key range `[from, to)`; an empty `to` is the end of the key space.
    pub struct TableRange { pub from: BytesMut, pub to: BytesMut }
}

wire_struct! {
    /// One row as read: `value` None when the key is absent (or deleted) at the snapshot;
    /// `version` the offset of the commit that wrote what was read, -1 when none did.
    pub struct TableRow { pub key: BytesMut, pub value: Option<BytesMut>, pub version: i64 }
}

wire_struct! {
    /// A key read inside a transaction and the version seen (-1: absent).
    pub struct TableReadEntry { pub key: BytesMut, pub version: i64 }
}

wire_struct! {
    /// A write: `value` None deletes the key.
    pub struct TableWrite { pub key: BytesMut, pub value: Option<BytesMut> }
}

wire_struct! {
    /// One step of a deterministic procedure (serial execution), run in log order by every
    /// replica. `kind`: 0 put (key, value), 1 delete (key), 2 compare-and-set (key, expect,
    /// value; None = absent), 3 increment (key, amount; decimal text values), 4 transfer
    /// (key to key2 by amount, when key holds at least amount), 5 append (value to the
    /// comma-separated list at key).
    pub struct TableStep {
        pub kind: u8,
        pub key: BytesMut,
        pub key2: BytesMut,
        pub value: Option<BytesMut>,
        pub expect: Option<BytesMut>,
        pub amount: i64,
    }
}

wire_struct! {
    /// The record a table partition's log holds (its value; `version` 1): one transaction's
    /// part in this partition. Validated by every replica at its log position (`level`),
    /// then applied: writes become versions at the record's offset, or, inside a log
    /// transaction, at its commit marker's.
    pub struct TableRecord {
        pub version: u8,
        pub txn: u64,
        pub level: u8,
        pub snapshot: u64,
        pub reads: Vec<TableReadEntry>,
        pub ranges: Vec<TableRange>,
        pub writes: Vec<TableWrite>,
        pub steps: Vec<TableStep>,
    }
}

wire_struct! {
    /// TableRead request (to the partition's leader; a follower when `follower` is set and
    /// the level allows it): read `keys` and the rows of `range` at the transaction's
    /// `snapshot` of this partition (-1: the leader picks its latest committed offset), once
    /// the replica applied `min_offset` (a session token). Under 2pl and serial it waits for
    /// its locks.
    pub struct TableReadRequest {
        pub txn: TableTxn,
        pub topic: String,
        pub partition: u32,
        pub snapshot: i64,
        pub min_offset: u64,
        pub follower: bool,
        pub keys: Vec<BytesMut>,
        pub range: Option<TableRange>,
    }
}

wire_struct! {
    /// TableRead response: `snapshot` the offset read at; the rows of `keys` in order, then
    /// the present rows of the range in key order.
    pub struct TableReadResponse { pub error: ErrorCode, pub message: String, pub snapshot: u64, pub rows: Vec<TableRow> }
}

wire_struct! {
    /// TableLock request: write intent on `keys` before a write (2pl: exclusive locks;
    /// serial: the partition's execution turn), answered once granted. `snapshot`: the
    /// snapshot of the transaction's first read of this partition (-1: it has not read it),
    /// so a leader that does not know the transaction knows it lost its read locks.
    pub struct TableLockRequest { pub txn: TableTxn, pub topic: String, pub partition: u32, pub keys: Vec<BytesMut>, pub snapshot: i64 }
}

wire_struct! {
    /// TableLock response.
    pub struct TableLockResponse { pub error: ErrorCode, pub message: String }
}

wire_struct! {
    /// TableCommit request: the transaction's part in this partition. Without `producer_id`
    /// (-1) the partition is the transaction's only one: the leader checks the part, appends
    /// it when it writes anything, and answers the outcome. With a producer (a multi-partition
    /// transaction, coordinated by the transaction coordinator) the part is appended inside
    /// that producer's log transaction and the answer is this partition's vote; the producer's
    /// commit or abort marker decides. `check_only`: validate a read-only part, append nothing.
    pub struct TableCommitRequest {
        pub txn: TableTxn,
        pub topic: String,
        pub partition: u32,
        pub producer_id: i64,
        pub producer_epoch: i16,
        pub record: TableRecord,
    }
}

wire_struct! {
    /// TableCommit response. `outcome`: 0 committed, 1 aborted (`reason`), 2 prepared (a
    /// yes vote). `offset`: the record's offset (the log's end for a part that appended
    /// nothing); `results`: one per procedure step (new value, or None).
    pub struct TableCommitResponse {
        pub error: ErrorCode,
        pub message: String,
        pub outcome: u8,
        pub offset: u64,
        pub reason: String,
        pub results: Vec<Option<BytesMut>>,
    }
}

wire_struct! {
    /// TableAbort request: the transaction ends here without committing; its locks and
    /// read tracking on this partition's leader are released.
    pub struct TableAbortRequest { pub txn: u64, pub topic: String, pub partition: u32 }
}

wire_struct! {
    /// TableAbort response.
    pub struct TableAbortResponse { pub error: ErrorCode, pub message: String }
}

wire_struct! {
    /// TableQuery request (to a table partition's leader): the rows whose field indexed by
    /// document index `index` holds `value`, at offset `snapshot` of the partition (-1: its
    /// latest committed offset; a later one than the leader applied: NOT_CAUGHT_UP), or
    /// (`rows` false) only the index's build progress.
    pub struct TableQueryRequest {
        pub topic: String,
        pub partition: u32,
        pub index: String,
        pub value: BytesMut,
        pub snapshot: i64,
        pub rows: bool,
    }
}

wire_struct! {
    /// TableQuery response: `snapshot` the offset read at; the rows in key order; `indexed`
    /// of the partition's `keys` keys indexed so far (fewer while the index is built: the
    /// partition then checks every row).
    pub struct TableQueryResponse {
        pub error: ErrorCode,
        pub message: String,
        pub snapshot: u64,
        pub indexed: u64,
        pub keys: u64,
        pub rows: Vec<TableRow>,
    }
}
