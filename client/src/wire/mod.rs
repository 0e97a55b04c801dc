//! Skein's wire protocol, shared by the client and the broker (`client/PROTOCOL.md`).
//!
//! A connection carries length-prefixed frames: `u32 length | body`. A request body is a
//! [`RequestHeader`] (api key, api version, correlation id, client id) followed by the
//! request; a response body is the correlation id, a top-level [`ErrorCode`], and, when that
//! code is `NONE`, the response. Requests on one connection are answered in order.
//!
//! Decoding happens once, at the edge, into these typed messages; it never panics on any
//! input and splits record batches off the frame without copying them. The broker's request
//! handling works on these types, not on bytes, so another wire protocol can share it.

pub mod codec;
pub mod io;
mod level;
// Message fields are documented field by field in client/PROTOCOL.md.
#[allow(missing_docs)]
mod messages;

pub use codec::{shown, DecodeError, Reader, Wire, Writer};
pub use level::Level;
pub use messages::*;

/// The largest frame a peer accepts by default (64 MiB).
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 64 << 20;

/// Identifies a request type. Numbers are stable and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ApiKey {
    /// Supported API versions.
    ApiVersions = 0,
    /// Brokers, topics, partitions and leaders.
    Metadata = 1,
    /// Create topics.
    CreateTopics = 2,
    /// Delete topics.
    DeleteTopics = 3,
    /// Per-partition offsets and leaders.
    DescribeTopics = 4,
    /// Append record batches.
    Produce = 5,
    /// Read record batches.
    Fetch = 6,
    /// Earliest, latest or by-timestamp offsets.
    ListOffsets = 7,
    /// A new idempotent producer id (and epoch).
    InitProducerId = 8,
    /// Between brokers of a cluster: one replication or controller message, one way (no
    /// response). See PROTOCOL.md, "Inter-broker messages".
    Cluster = 9,
    /// Move a partition to other replicas (cluster mode).
    ReassignPartition = 10,
    /// The broker that coordinates a consumer group.
    FindCoordinator = 11,
    /// Join, stay in, or leave a consumer group; get the member's assignment.
    GroupHeartbeat = 12,
    /// Commit a group's offsets.
    OffsetCommit = 13,
    /// Read a group's committed offsets.
    OffsetFetch = 14,
    /// The groups a broker coordinates.
    ListGroups = 15,
    /// A group's state, members, assignment and offsets.
    DescribeGroup = 16,
    /// Delete an empty group and its offsets.
    DeleteGroup = 17,
    /// Add partitions to a producer's ongoing transaction (before writing to them).
    AddPartitionsToTxn = 18,
    /// Add a group's offsets partition to a producer's ongoing transaction.
    AddOffsetsToTxn = 19,
    /// Commit or abort a producer's transaction.
    EndTxn = 20,
    /// Commit a group's offsets inside a transaction (to the group coordinator).
    TxnOffsetCommit = 21,
    /// The transactions a broker coordinates.
    ListTransactions = 22,
    /// One transaction's state, partitions and age.
    DescribeTransaction = 23,
    /// Abort a transaction from outside (a hanging one) and fence its producer.
    AbortTransaction = 24,
    /// Read keys or a range of a table partition inside a table transaction.
    TableRead = 25,
    /// Take write locks (2pl) or the execution turn (serial) on a table partition.
    TableLock = 26,
    /// Commit (or prepare) a table transaction's part in one partition.
    TableCommit = 27,
    /// End a table transaction's part in one partition without committing.
    TableAbort = 28,
    /// Split a partition of a ranged topic (issue 21).
    SplitPartition = 29,
    /// Merge two adjacent partitions of a ranged topic (issue 21).
    MergePartitions = 30,
    /// Rows of a table partition by a document index (issue 21).
    TableQuery = 31,
}

impl ApiKey {
    /// Every API, in key order.
    pub const ALL: [ApiKey; 32] = [
        ApiKey::ApiVersions,
        ApiKey::Metadata,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::DescribeTopics,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::InitProducerId,
        ApiKey::Cluster,
        ApiKey::ReassignPartition,
        ApiKey::FindCoordinator,
        ApiKey::GroupHeartbeat,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroup,
        ApiKey::DeleteGroup,
        ApiKey::AddPartitionsToTxn,
        ApiKey::AddOffsetsToTxn,
        ApiKey::EndTxn,
        ApiKey::TxnOffsetCommit,
        ApiKey::ListTransactions,
        ApiKey::DescribeTransaction,
        ApiKey::AbortTransaction,
        ApiKey::TableRead,
        ApiKey::TableLock,
        ApiKey::TableCommit,
        ApiKey::TableAbort,
        ApiKey::SplitPartition,
        ApiKey::MergePartitions,
        ApiKey::TableQuery,
    ];

    /// The key for a number, if known.
    pub fn from_u16(v: u16) -> Option<ApiKey> {
        ApiKey::ALL.get(usize::from(v)).copied()
    }

    /// Highest version of this API this build speaks (all start at 0).
    pub fn max_version(self) -> u16 {
        0
    }
}

/// The server-side assignor a group uses (`GroupHeartbeatRequest::assignor` carries its name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Assignor {
    /// Contiguous ranges of each topic's partitions per member.
    Range,
    /// Partitions dealt out in turn.
    RoundRobin,
    /// Balanced, moving as few partitions as possible.
    #[default]
    Sticky,
}

impl Assignor {
    /// The name on the wire: `range`, `roundrobin`, `sticky`.
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::Sticky => "sticky",
        }
    }
}

impl std::str::FromStr for Assignor {
    type Err = String;
    fn from_str(s: &str) -> Result<Assignor, String> {
        match s {
            "range" => Ok(Assignor::Range),
            "roundrobin" => Ok(Assignor::RoundRobin),
            "sticky" => Ok(Assignor::Sticky),
            _ => Err(format!("assignor is range, roundrobin or sticky, not '{s}'")),
        }
    }
}

impl std::fmt::Display for Assignor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A stable numeric error code. Codes are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Success.
    pub const NONE: ErrorCode = ErrorCode(0);
    /// The topic or partition does not exist.
    pub const UNKNOWN_TOPIC_OR_PARTITION: ErrorCode = ErrorCode(1);
    /// This broker does not lead the partition.
    pub const NOT_LEADER: ErrorCode = ErrorCode(2);
    /// The offset is outside the log.
    pub const OFFSET_OUT_OF_RANGE: ErrorCode = ErrorCode(3);
    /// A record batch failed validation (CRC, framing, archive).
    pub const CORRUPT_BATCH: ErrorCode = ErrorCode(4);
    /// A batch or request is larger than allowed.
    pub const TOO_LARGE: ErrorCode = ErrorCode(5);
    /// The broker is over a limit; retry later.
    pub const THROTTLED: ErrorCode = ErrorCode(6);
    /// The topic already exists.
    pub const TOPIC_ALREADY_EXISTS: ErrorCode = ErrorCode(7);
    /// The topic name is not allowed.
    pub const INVALID_TOPIC: ErrorCode = ErrorCode(8);
    /// Partition or replica count not allowed.
    pub const INVALID_PARTITIONS: ErrorCode = ErrorCode(9);
    /// The API key or version is not supported.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(10);
    /// The request could not be decoded.
    pub const INVALID_REQUEST: ErrorCode = ErrorCode(11);
    /// The request did not complete in time (durability not confirmed).
    pub const REQUEST_TIMED_OUT: ErrorCode = ErrorCode(12);
    /// Fewer in-sync replicas than required.
    pub const NOT_ENOUGH_REPLICAS: ErrorCode = ErrorCode(13);
    /// The broker's storage failed.
    pub const STORAGE_ERROR: ErrorCode = ErrorCode(14);
    /// The request carried a stale leader epoch.
    pub const FENCED_LEADER_EPOCH: ErrorCode = ErrorCode(15);
    /// A topic config key or value is invalid.
    pub const INVALID_CONFIG: ErrorCode = ErrorCode(16);
    /// Unexpected broker error.
    pub const UNKNOWN: ErrorCode = ErrorCode(17);
    /// The broker is shutting down.
    pub const SHUTTING_DOWN: ErrorCode = ErrorCode(18);
    /// An idempotent producer's batch does not continue its sequence; nothing was written.
    pub const OUT_OF_ORDER_SEQUENCE: ErrorCode = ErrorCode(19);
    /// An idempotent producer's epoch is older than the newest seen; nothing was written.
    pub const PRODUCER_FENCED: ErrorCode = ErrorCode(20);
    /// The replica asked to serve a read has not caught up with the read's session token (its
    /// high watermark or leader epoch is behind) within the bounded wait: read from the leader.
    pub const NOT_CAUGHT_UP: ErrorCode = ErrorCode(21);
    /// This broker does not coordinate the group (find the coordinator again).
    pub const NOT_COORDINATOR: ErrorCode = ErrorCode(22);
    /// The coordinator is loading the group's state from its log; retry shortly.
    pub const COORDINATOR_LOAD_IN_PROGRESS: ErrorCode = ErrorCode(23);
    /// The member id is not a member of the group (it left, timed out or was replaced):
    /// join again.
    pub const UNKNOWN_MEMBER_ID: ErrorCode = ErrorCode(24);
    /// The member epoch (generation) is not the member's current one: a zombie or a late
    /// request; join again.
    pub const FENCED_MEMBER_EPOCH: ErrorCode = ErrorCode(25);
    /// The group has members (reset-offsets and delete need an empty group).
    pub const GROUP_NOT_EMPTY: ErrorCode = ErrorCode(26);
    /// No such group.
    pub const GROUP_ID_NOT_FOUND: ErrorCode = ErrorCode(27);
    /// A commit names a partition the member does not own.
    pub const PARTITION_NOT_OWNED: ErrorCode = ErrorCode(28);
    /// The group id is empty or too long.
    pub const INVALID_GROUP_ID: ErrorCode = ErrorCode(29);
    /// The assignor named is not one of range, roundrobin, sticky.
    pub const UNSUPPORTED_ASSIGNOR: ErrorCode = ErrorCode(30);
    /// The request does not fit the transaction's state (a write to a partition not added to
    /// the ongoing transaction, an end of a transaction that is not ongoing).
    pub const INVALID_TXN_STATE: ErrorCode = ErrorCode(31);
    /// The transactional id's previous transaction is still being completed: retry shortly.
    pub const CONCURRENT_TRANSACTIONS: ErrorCode = ErrorCode(32);
    /// The producer id does not belong to the transactional id.
    pub const INVALID_PRODUCER_ID_MAPPING: ErrorCode = ErrorCode(33);
    /// No transaction with that transactional id.
    pub const TRANSACTIONAL_ID_NOT_FOUND: ErrorCode = ErrorCode(34);
    /// Offsets of the requested partitions are part of an undecided transaction: retry.
    pub const UNSTABLE_OFFSET_COMMIT: ErrorCode = ErrorCode(35);
    /// A transaction timeout outside the broker's bounds.
    pub const INVALID_TRANSACTION_TIMEOUT: ErrorCode = ErrorCode(36);
    /// The table transaction is no longer live on this partition's leader (wounded by an
    /// older one, past its timeout, or its leader changed): the message says why; begin again.
    pub const TABLE_TXN_ABORTED: ErrorCode = ErrorCode(37);
    /// The topic is not a table.
    pub const NOT_A_TABLE: ErrorCode = ErrorCode(38);
    /// The partition was split or merged (issue 21) and takes no more records: its range
    /// belongs to its children (refresh the metadata and route there).
    pub const PARTITION_SEALED: ErrorCode = ErrorCode(39);

    /// Whether a client should retry (after refreshing metadata).
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NOT_LEADER
                | ErrorCode::THROTTLED
                | ErrorCode::REQUEST_TIMED_OUT
                | ErrorCode::NOT_ENOUGH_REPLICAS
                | ErrorCode::FENCED_LEADER_EPOCH
                | ErrorCode::SHUTTING_DOWN
                | ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
                | ErrorCode::NOT_CAUGHT_UP
                | ErrorCode::NOT_COORDINATOR
                | ErrorCode::COORDINATOR_LOAD_IN_PROGRESS
                | ErrorCode::CONCURRENT_TRANSACTIONS
                | ErrorCode::UNSTABLE_OFFSET_COMMIT
        )
    }

    /// A stable name, as in PROTOCOL.md.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 40] = [
            "NONE",
            "UNKNOWN_TOPIC_OR_PARTITION",
            "NOT_LEADER",
            "OFFSET_OUT_OF_RANGE",
            "CORRUPT_BATCH",
            "TOO_LARGE",
            "THROTTLED",
            "TOPIC_ALREADY_EXISTS",
            "INVALID_TOPIC",
            "INVALID_PARTITIONS",
            "UNSUPPORTED_VERSION",
            "INVALID_REQUEST",
            "REQUEST_TIMED_OUT",
            "NOT_ENOUGH_REPLICAS",
            "STORAGE_ERROR",
            "FENCED_LEADER_EPOCH",
            "INVALID_CONFIG",
            "UNKNOWN",
            "SHUTTING_DOWN",
            "OUT_OF_ORDER_SEQUENCE",
            "PRODUCER_FENCED",
            "NOT_CAUGHT_UP",
            "NOT_COORDINATOR",
            "COORDINATOR_LOAD_IN_PROGRESS",
            "UNKNOWN_MEMBER_ID",
            "FENCED_MEMBER_EPOCH",
            "GROUP_NOT_EMPTY",
            "GROUP_ID_NOT_FOUND",
            "PARTITION_NOT_OWNED",
            "INVALID_GROUP_ID",
            "UNSUPPORTED_ASSIGNOR",
            "INVALID_TXN_STATE",
            "CONCURRENT_TRANSACTIONS",
            "INVALID_PRODUCER_ID_MAPPING",
            "TRANSACTIONAL_ID_NOT_FOUND",
            "UNSTABLE_OFFSET_COMMIT",
            "INVALID_TRANSACTION_TIMEOUT",
            "TABLE_TXN_ABORTED",
            "NOT_A_TABLE",
            "PARTITION_SEALED",
        ];
        NAMES.get(usize::from(self.0)).copied().unwrap_or("UNRECOGNIZED")
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl Wire for ErrorCode {
    fn encode(&self, w: &mut Writer) {
        self.0.encode(w);
    }
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(ErrorCode(u16::decode(r)?))
    }
}

/// The header of every request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Which API.
    pub api_key: ApiKey,
    /// Which version of it.
    pub api_version: u16,
    /// Echoed in the response.
    pub correlation_id: u32,
    /// Free-form client name, for logs.
    pub client_id: String,
}

/// Why a request header cannot be served; the broker answers with the code when it knows the
/// correlation id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Too short to hold a correlation id: the connection is closed.
    Malformed,
    /// Unknown API or version: answered with `UNSUPPORTED_VERSION`.
    Unsupported {
        /// The request's correlation id.
        correlation_id: u32,
    },
    /// Bad client id: answered with `INVALID_REQUEST`.
    Invalid {
        /// The request's correlation id.
        correlation_id: u32,
    },
}

impl RequestHeader {
    /// Decodes the header at the start of a request body.
    pub fn decode(r: &mut Reader) -> Result<RequestHeader, HeaderError> {
        let key = u16::decode(r).map_err(|_| HeaderError::Malformed)?;
        let version = u16::decode(r).map_err(|_| HeaderError::Malformed)?;
        let correlation_id = u32::decode(r).map_err(|_| HeaderError::Malformed)?;
        let Some(api_key) = ApiKey::from_u16(key).filter(|k| version <= k.max_version()) else {
            return Err(HeaderError::Unsupported { correlation_id });
        };
        let client_id = String::decode(r).map_err(|_| HeaderError::Invalid { correlation_id })?;
        Ok(RequestHeader { api_key, api_version: version, correlation_id, client_id })
    }

    fn encode(&self, w: &mut Writer) {
        (self.api_key as u16).encode(w);
        self.api_version.encode(w);
        self.correlation_id.encode(w);
        self.client_id.encode(w);
    }
}

/// Encodes a whole request frame (length prefix included).
///
/// ```
/// use skein_client::wire::{request_frame, ApiKey, MetadataRequest, Reader, RequestHeader};
/// let header = RequestHeader { api_key: ApiKey::Metadata, api_version: 0, correlation_id: 7, client_id: "me".into() };
/// let frame = request_frame(&header, &MetadataRequest { topics: None });
/// assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
/// let mut r = Reader::new(bytes::BytesMut::from(&frame[4..]));
/// assert_eq!(RequestHeader::decode(&mut r).unwrap(), header);
/// ```
pub fn request_frame<T: Wire>(header: &RequestHeader, body: &T) -> Vec<u8> {
    let mut w = Writer { buf: vec![0; 4] };
    header.encode(&mut w);
    body.encode(&mut w);
    finish_frame(w.buf)
}

/// Encodes a produce request frame in several buffers: the record batches are sent from their
/// own buffers instead of being copied into the frame. The bytes are exactly those of
/// `request_frame(header, &ProduceRequest { .. })` with the same batches.
pub fn produce_frame(
    header: &RequestHeader,
    acks: i8,
    timeout_ms: u32,
    parts: &[(&str, u32, u32, &[bytes::Bytes])],
) -> Vec<bytes::Bytes> {
    let mut chunks = Vec::with_capacity(parts.len() * 2 + 1);
    let mut w = Writer { buf: vec![0; 4] };
    header.encode(&mut w);
    acks.encode(&mut w);
    timeout_ms.encode(&mut w);
    u32::try_from(parts.len()).expect("fewer than 2^32 partitions").encode(&mut w);
    let mut total = 0usize;
    for (topic, partition, leader_epoch, batches) in parts {
        topic.to_string().encode(&mut w);
        partition.encode(&mut w);
        leader_epoch.encode(&mut w);
        let len: usize = batches.iter().map(|b| b.len()).sum();
        u32::try_from(len).expect("partition data under 4 GiB").encode(&mut w);
        total += w.buf.len();
        chunks.push(bytes::Bytes::from(std::mem::take(&mut w.buf)));
        for b in batches.iter() {
            total += b.len();
            chunks.push(b.clone());
        }
    }
    total += w.buf.len();
    let mut first = chunks.first().map_or_else(|| std::mem::take(&mut w.buf), |c| c.to_vec());
    let frame_len = u32::try_from(total - 4).expect("frames under 4 GiB");
    first[..4].copy_from_slice(&frame_len.to_le_bytes());
    if chunks.is_empty() {
        chunks.push(bytes::Bytes::from(first));
    } else {
        chunks[0] = bytes::Bytes::from(first);
        if !w.buf.is_empty() {
            chunks.push(bytes::Bytes::from(w.buf));
        }
    }
    chunks
}

/// Encodes a whole response frame: correlation id, error code, and the body if the code is
/// `NONE`.
pub fn response_frame<T: Wire>(correlation_id: u32, body: Result<&T, ErrorCode>) -> Vec<u8> {
    let mut w = Writer { buf: vec![0; 4] };
    correlation_id.encode(&mut w);
    match body {
        Ok(b) => {
            ErrorCode::NONE.encode(&mut w);
            b.encode(&mut w);
        }
        Err(code) => code.encode(&mut w),
    }
    finish_frame(w.buf)
}

/// Writes the length prefix into the first four bytes.
pub fn finish_frame(mut buf: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(buf.len() - 4).expect("frames under 4 GiB");
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf
}

/// Decodes a response body: correlation id, error code, then `T` if the code is `NONE`.
pub fn decode_response<T: Wire>(body: bytes::BytesMut) -> Result<(u32, Result<T, ErrorCode>), DecodeError> {
    let mut r = Reader::new(body);
    let correlation_id = u32::decode(&mut r)?;
    let code = ErrorCode::decode(&mut r)?;
    if code != ErrorCode::NONE {
        return Ok((correlation_id, Err(code)));
    }
    let value = T::decode(&mut r)?;
    r.finish()?;
    Ok((correlation_id, Ok(value)))
}

/// Decodes a request payload (after the header), requiring that nothing trails it.
pub fn decode_exact<T: Wire>(mut r: Reader) -> Result<T, DecodeError> {
    let value = T::decode(&mut r)?;
    r.finish()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    fn round_trip<T: Wire + PartialEq + std::fmt::Debug>(value: T) {
        let mut w = Writer::default();
        value.encode(&mut w);
        let decoded = decode_exact::<T>(Reader::new(BytesMut::from(&w.buf[..]))).expect("decodes");
        assert_eq!(decoded, value);
    }

    #[test]
    fn an_over_long_string_is_cut_at_a_character_boundary_not_a_panic() {
        let long = format!("{}é{}", "a".repeat(65_534), "b".repeat(10)); // é straddles the limit
        let mut w = Writer::default();
        long.encode(&mut w);
        let decoded = decode_exact::<String>(Reader::new(BytesMut::from(&w.buf[..]))).expect("decodes");
        assert_eq!(decoded, "a".repeat(65_534));
        round_trip("é".repeat(1000));
        assert_eq!(shown("orders"), "orders");
        assert_eq!(shown(&"a".repeat(65_535)), format!("{}... (65535 bytes)", "a".repeat(64)));
    }

    #[test]
    fn messages_round_trip() {
        round_trip(ProduceRequest {
            acks: -1,
            timeout_ms: 100,
            partitions: vec![ProducePartition {
                topic: "t".into(),
                partition: 3,
                leader_epoch: 2,
                records: BytesMut::from(&b"abc"[..]),
            }],
        });
        round_trip(FetchRequest {
            max_wait_ms: 5,
            min_bytes: 1,
            max_bytes: 1 << 20,
            isolation: 0,
            replica_read: true,
            partitions: vec![FetchPartition {
                topic: "t".into(),
                partition: 0,
                leader_epoch: 4,
                fetch_offset: 9,
                min_high_watermark: 12,
                min_leader_epoch: 3,
                partition_max_bytes: 7,
            }],
        });
        round_trip(MetadataRequest { topics: Some(vec!["a".into()]) });
        round_trip(CreateTopicsRequest {
            topics: vec![NewTopic { name: "x".into(), partitions: 8, replicas: 1, configs: vec![], partitioning: 1 }],
        });
    }

    #[test]
    fn vectored_produce_frames_match_the_plain_encoding() {
        let header =
            RequestHeader { api_key: ApiKey::Produce, api_version: 0, correlation_id: 3, client_id: "c".into() };
        let b1 = bytes::Bytes::from_static(b"batch-one");
        let b2 = bytes::Bytes::from_static(b"two");
        let both = [b1.clone(), b2.clone()];
        let parts: Vec<(&str, u32, u32, &[bytes::Bytes])> = vec![("t", 0, 3, &both[..]), ("u", 5, 0, &[][..])];
        let chunks = produce_frame(&header, -1, 500, &parts);
        let plain = request_frame(
            &header,
            &ProduceRequest {
                acks: -1,
                timeout_ms: 500,
                partitions: vec![
                    ProducePartition {
                        topic: "t".into(),
                        partition: 0,
                        leader_epoch: 3,
                        records: BytesMut::from(&b"batch-onetwo"[..]),
                    },
                    ProducePartition { topic: "u".into(), partition: 5, leader_epoch: 0, records: BytesMut::new() },
                ],
            },
        );
        assert_eq!(chunks.concat(), plain);
        assert!(chunks.iter().any(|c| c.as_ptr() == b1.as_ptr()), "batches are not copied");
    }

    #[test]
    fn error_codes_have_stable_names() {
        assert_eq!(ErrorCode::CORRUPT_BATCH.name(), "CORRUPT_BATCH");
        assert_eq!(ErrorCode(9999).name(), "UNRECOGNIZED");
        assert_eq!(ErrorCode::SHUTTING_DOWN.name(), "SHUTTING_DOWN");
    }

    proptest::proptest! {
        #[test]
        fn prop_every_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let r = || Reader::new(BytesMut::from(&bytes[..]));
            let _ = RequestHeader::decode(&mut r());
            let _ = decode_exact::<ApiVersionsRequest>(r());
            let _ = decode_exact::<ApiVersionsResponse>(r());
            let _ = decode_exact::<MetadataRequest>(r());
            let _ = decode_exact::<MetadataResponse>(r());
            let _ = decode_exact::<CreateTopicsRequest>(r());
            let _ = decode_exact::<CreateTopicsResponse>(r());
            let _ = decode_exact::<DeleteTopicsRequest>(r());
            let _ = decode_exact::<DeleteTopicsResponse>(r());
            let _ = decode_exact::<DescribeTopicsRequest>(r());
            let _ = decode_exact::<DescribeTopicsResponse>(r());
            let _ = decode_exact::<ProduceRequest>(r());
            let _ = decode_exact::<ProduceResponse>(r());
            let _ = decode_exact::<FetchRequest>(r());
            let _ = decode_exact::<FetchResponse>(r());
            let _ = decode_exact::<ListOffsetsRequest>(r());
            let _ = decode_exact::<ListOffsetsResponse>(r());
            let _ = decode_response::<MetadataResponse>(BytesMut::from(&bytes[..]));
        }
    }
}
