//! The request path below the runtime, importing nothing of it: typed requests and responses
//! ([`Request`], [`Response`], [`FetchResult`]), the Skein wire codec (`codec`), the
//! connection loop (`conn`, generic over the [`conn::Service`] that answers requests: a
//! cluster shard), the byte budgets that bound what requests hold (`budget`), and helpers for
//! the produce path ([`split_batches`]) and storage failure ([`fail_stop`]). A second wire
//! protocol (a Kafka front end) would be another codec over the same typed requests.
//!
//! Dependencies point one way: `cluster` uses `service`; `service` does not use `cluster`.
//! Inside it, `conn` uses `codec`, and both use the types here.

pub(crate) mod budget;
pub(crate) mod codec;
pub(crate) mod conn;

use bytes::BytesMut;
use skein_client::wire;
use skein_client::wire::{
    ApiKey, ApiVersion, ApiVersionsResponse, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, DescribeTopicsRequest, DescribeTopicsResponse, ErrorCode, FetchPartition, FetchRequest,
    InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest,
    MetadataResponse, ProduceRequest, ProduceResponse,
};
use skein_log::batch::{BatchHeader, RecordBatch, HEADER_BYTES};

/// Exit status when storage fails under the broker (fsync EIO and the like): fail-stop.
pub const EXIT_STORAGE_FAILURE: i32 = 74;

/// A decoded request, independent of the wire protocol that carried it.
pub(crate) enum Request {
    ApiVersions,
    Metadata(MetadataRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(DeleteTopicsRequest),
    DescribeTopics(DescribeTopicsRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    InitProducerId(InitProducerIdRequest),
    ReassignPartition(skein_client::wire::ReassignPartitionRequest),
    FindCoordinator(wire::FindCoordinatorRequest),
    GroupHeartbeat(wire::GroupHeartbeatRequest),
    OffsetCommit(wire::OffsetCommitRequest),
    OffsetFetch(wire::OffsetFetchRequest),
    ListGroups,
    DescribeGroup(wire::DescribeGroupRequest),
    DeleteGroup(wire::DeleteGroupRequest),
    AddPartitionsToTxn(wire::AddPartitionsToTxnRequest),
    AddOffsetsToTxn(wire::AddOffsetsToTxnRequest),
    EndTxn(wire::EndTxnRequest),
    TxnOffsetCommit(wire::TxnOffsetCommitRequest),
    ListTransactions,
    DescribeTransaction(wire::DescribeTransactionRequest),
    AbortTransaction(wire::AbortTransactionRequest),
    TableRead(wire::TableReadRequest),
    TableLock(wire::TableLockRequest),
    TableCommit(wire::TableCommitRequest),
    TableAbort(wire::TableAbortRequest),
    TableQuery(wire::TableQueryRequest),
    SplitPartition(wire::SplitPartitionRequest),
    MergePartitions(wire::MergePartitionsRequest),
}

/// A response, for the codec of the protocol the request came in on to encode.
pub(crate) enum Response {
    ApiVersions(ApiVersionsResponse),
    Metadata(MetadataResponse),
    CreateTopics(CreateTopicsResponse),
    DeleteTopics(DeleteTopicsResponse),
    DescribeTopics(DescribeTopicsResponse),
    Produce(ProduceResponse),
    /// Per partition, in request order; record bytes stay in their own buffers.
    Fetch(Vec<(FetchPartition, FetchResult)>),
    ListOffsets(ListOffsetsResponse),
    InitProducerId(InitProducerIdResponse),
    ReassignPartition(skein_client::wire::ReassignPartitionResponse),
    FindCoordinator(wire::FindCoordinatorResponse),
    GroupHeartbeat(wire::GroupHeartbeatResponse),
    OffsetCommit(wire::OffsetCommitResponse),
    OffsetFetch(wire::OffsetFetchResponse),
    ListGroups(wire::ListGroupsResponse),
    DescribeGroup(wire::DescribeGroupResponse),
    DeleteGroup(wire::DeleteGroupResponse),
    AddPartitionsToTxn(wire::AddPartitionsToTxnResponse),
    AddOffsetsToTxn(wire::AddOffsetsToTxnResponse),
    EndTxn(wire::EndTxnResponse),
    TxnOffsetCommit(wire::TxnOffsetCommitResponse),
    ListTransactions(wire::ListTransactionsResponse),
    DescribeTransaction(wire::DescribeTransactionResponse),
    AbortTransaction(wire::AbortTransactionResponse),
    TableRead(wire::TableReadResponse),
    TableLock(wire::TableLockResponse),
    TableCommit(wire::TableCommitResponse),
    TableAbort(wire::TableAbortResponse),
    TableQuery(wire::TableQueryResponse),
    /// SplitPartition and MergePartitions.
    Resize(wire::ResizeResponse),
    /// The whole request failed with this code.
    Error(ErrorCode),
    /// No response is due (produce with acks=0).
    Nothing,
}

/// A fetch's result: the partition's answer and the record bytes read for it.
pub(crate) struct FetchResult {
    pub error: ErrorCode,
    pub high_watermark: u64,
    /// The newest leader epoch the serving replica knows.
    pub leader_epoch: u32,
    pub log_start: u64,
    /// How long the read waited for the replica to catch up with its session token.
    pub token_wait_us: u32,
    /// The last stable offset (read_committed) or the high watermark.
    pub last_stable: u64,
    /// Read_committed: the aborted transactions overlapping the records.
    pub aborted: Vec<skein_client::wire::AbortedTransaction>,
    pub records: Vec<u8>,
}

impl FetchResult {
    /// A result with no records.
    pub(crate) fn empty(error: ErrorCode) -> FetchResult {
        FetchResult {
            error,
            high_watermark: 0,
            leader_epoch: 0,
            log_start: 0,
            token_wait_us: 0,
            last_stable: 0,
            aborted: Vec::new(),
            records: Vec::new(),
        }
    }

    /// The same result with another error code.
    pub(crate) fn with_error(self, error: ErrorCode) -> FetchResult {
        FetchResult { error, ..self }
    }
}

pub(crate) fn api_versions() -> ApiVersionsResponse {
    let apis = ApiKey::ALL
        .iter()
        .map(|k| ApiVersion { api_key: *k as u16, min_version: 0, max_version: k.max_version() })
        .collect();
    ApiVersionsResponse { apis }
}

/// Pairs results with their partitions, leaving out whole partitions' data past `max_bytes`
/// (the first partition with data is always sent, so a consumer progresses). Partitions read
/// on different shards were each read against the whole `max_bytes`; this is where the
/// response comes down to it.
pub(crate) fn fetch_response(req: FetchRequest, results: Vec<FetchResult>) -> Response {
    let mut total = 0usize;
    let mut out = Vec::with_capacity(results.len());
    for (p, mut r) in req.partitions.into_iter().zip(results) {
        if total > 0 && total + r.records.len() > req.max_bytes as usize {
            r.records = Vec::new(); // freed now, not when the response is written
        }
        total += r.records.len();
        out.push((p, r));
    }
    Response::Fetch(out)
}

/// Splits a partition's records into fully validated batches, sharing the frame's memory.
pub(crate) fn split_batches(mut records: BytesMut) -> Result<Vec<RecordBatch<BytesMut>>, ErrorCode> {
    let mut out = Vec::new();
    if records.is_empty() {
        return Err(ErrorCode::CORRUPT_BATCH);
    }
    while !records.is_empty() {
        let header =
            BatchHeader::decode(&records[..records.len().min(HEADER_BYTES)]).map_err(|_| ErrorCode::CORRUPT_BATCH)?;
        let len = header.batch_length as usize;
        if len > records.len() {
            return Err(ErrorCode::CORRUPT_BATCH);
        }
        out.push(RecordBatch::parse(records.split_to(len)).map_err(|_| ErrorCode::CORRUPT_BATCH)?);
    }
    Ok(out)
}

/// Storage failed under a log: its state is unknown, so the process stops (STYLE: fail-stop).
pub(crate) fn fail_stop(what: &str, e: &dyn std::fmt::Display) -> ! {
    tracing::error!(operation = what, error = %e, "storage failure; stopping the broker");
    eprintln!("skein-broker: fatal storage failure during {what}: {e}");
    std::process::exit(EXIT_STORAGE_FAILURE);
}
