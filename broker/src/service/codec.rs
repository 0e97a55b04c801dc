//! The Skein wire protocol's side of request handling: frame body to [`Request`], and
//! [`Response`] to frames. The handlers never see bytes, so another protocol can sit next to
//! this one.

use skein_client::wire::{
    decode_exact, response_frame, ApiKey, ApiVersionsRequest, ApiVersionsResponse, DecodeError, ErrorCode, Reader,
    Wire, Writer,
};

use super::{FetchResult, Request, Response};

/// Decodes a request body (after its header) for `key`.
pub(crate) fn decode_request(key: ApiKey, body: Reader) -> Result<Request, DecodeError> {
    Ok(match key {
        ApiKey::ApiVersions => {
            decode_exact::<ApiVersionsRequest>(body)?;
            Request::ApiVersions
        }
        ApiKey::Metadata => Request::Metadata(decode_exact(body)?),
        ApiKey::CreateTopics => Request::CreateTopics(decode_exact(body)?),
        ApiKey::DeleteTopics => Request::DeleteTopics(decode_exact(body)?),
        ApiKey::DescribeTopics => Request::DescribeTopics(decode_exact(body)?),
        ApiKey::Produce => Request::Produce(decode_exact(body)?),
        ApiKey::Fetch => Request::Fetch(decode_exact(body)?),
        ApiKey::ListOffsets => Request::ListOffsets(decode_exact(body)?),
        ApiKey::InitProducerId => Request::InitProducerId(decode_exact(body)?),
        // Inter-broker messages are one-way and handled by the connection (cluster mode).
        ApiKey::ReassignPartition => Request::ReassignPartition(decode_exact(body)?),
        ApiKey::FindCoordinator => Request::FindCoordinator(decode_exact(body)?),
        ApiKey::GroupHeartbeat => Request::GroupHeartbeat(decode_exact(body)?),
        ApiKey::OffsetCommit => Request::OffsetCommit(decode_exact(body)?),
        ApiKey::OffsetFetch => Request::OffsetFetch(decode_exact(body)?),
        ApiKey::ListGroups => {
            decode_exact::<skein_client::wire::ListGroupsRequest>(body)?;
            Request::ListGroups
        }
        ApiKey::DescribeGroup => Request::DescribeGroup(decode_exact(body)?),
        ApiKey::DeleteGroup => Request::DeleteGroup(decode_exact(body)?),
        ApiKey::AddPartitionsToTxn => Request::AddPartitionsToTxn(decode_exact(body)?),
        ApiKey::AddOffsetsToTxn => Request::AddOffsetsToTxn(decode_exact(body)?),
        ApiKey::EndTxn => Request::EndTxn(decode_exact(body)?),
        ApiKey::TxnOffsetCommit => Request::TxnOffsetCommit(decode_exact(body)?),
        ApiKey::ListTransactions => {
            decode_exact::<skein_client::wire::ListTransactionsRequest>(body)?;
            Request::ListTransactions
        }
        ApiKey::DescribeTransaction => Request::DescribeTransaction(decode_exact(body)?),
        ApiKey::AbortTransaction => Request::AbortTransaction(decode_exact(body)?),
        ApiKey::TableRead => Request::TableRead(decode_exact(body)?),
        ApiKey::TableLock => Request::TableLock(decode_exact(body)?),
        ApiKey::TableCommit => Request::TableCommit(decode_exact(body)?),
        ApiKey::TableAbort => Request::TableAbort(decode_exact(body)?),
        ApiKey::TableQuery => Request::TableQuery(decode_exact(body)?),
        ApiKey::SplitPartition => Request::SplitPartition(decode_exact(body)?),
        ApiKey::MergePartitions => Request::MergePartitions(decode_exact(body)?),
        ApiKey::Cluster => return Err(DecodeError::Invalid("an inter-broker message as a request")),
    })
}

/// Encodes a response as length-prefixed frames (several buffers for one frame when record
/// bytes are involved); `None` when no response is due.
pub(crate) fn encode_response(id: u32, resp: Response) -> Option<Vec<Vec<u8>>> {
    let frame = match resp {
        Response::ApiVersions(r) => response_frame(id, Ok(&r)),
        Response::Metadata(r) => response_frame(id, Ok(&r)),
        Response::CreateTopics(r) => response_frame(id, Ok(&r)),
        Response::DeleteTopics(r) => response_frame(id, Ok(&r)),
        Response::DescribeTopics(r) => response_frame(id, Ok(&r)),
        Response::Produce(r) => response_frame(id, Ok(&r)),
        Response::ListOffsets(r) => response_frame(id, Ok(&r)),
        Response::InitProducerId(r) => response_frame(id, Ok(&r)),
        Response::ReassignPartition(r) => response_frame(id, Ok(&r)),
        Response::FindCoordinator(r) => response_frame(id, Ok(&r)),
        Response::GroupHeartbeat(r) => response_frame(id, Ok(&r)),
        Response::OffsetCommit(r) => response_frame(id, Ok(&r)),
        Response::OffsetFetch(r) => response_frame(id, Ok(&r)),
        Response::ListGroups(r) => response_frame(id, Ok(&r)),
        Response::DescribeGroup(r) => response_frame(id, Ok(&r)),
        Response::DeleteGroup(r) => response_frame(id, Ok(&r)),
        Response::AddPartitionsToTxn(r) => response_frame(id, Ok(&r)),
        Response::AddOffsetsToTxn(r) => response_frame(id, Ok(&r)),
        Response::EndTxn(r) => response_frame(id, Ok(&r)),
        Response::TxnOffsetCommit(r) => response_frame(id, Ok(&r)),
        Response::ListTransactions(r) => response_frame(id, Ok(&r)),
        Response::DescribeTransaction(r) => response_frame(id, Ok(&r)),
        Response::AbortTransaction(r) => response_frame(id, Ok(&r)),
        Response::TableRead(r) => response_frame(id, Ok(&r)),
        Response::TableLock(r) => response_frame(id, Ok(&r)),
        Response::TableCommit(r) => response_frame(id, Ok(&r)),
        Response::TableAbort(r) => response_frame(id, Ok(&r)),
        Response::TableQuery(r) => response_frame(id, Ok(&r)),
        Response::Resize(r) => response_frame(id, Ok(&r)),
        Response::Fetch(parts) => return Some(encode_fetch(id, parts)),
        Response::Error(code) => error_frame(id, code),
        Response::Nothing => return None,
    };
    Some(vec![frame])
}

/// A response frame carrying only an error code.
pub(crate) fn error_frame(id: u32, code: ErrorCode) -> Vec<u8> {
    response_frame::<ApiVersionsResponse>(id, Err(code))
}

/// The fetch response as one frame in several buffers: record bytes are sent from the
/// buffers they were read into, never copied into the header buffer. The layout is exactly
/// `FetchResponse`'s encoding.
fn encode_fetch(id: u32, parts: Vec<(skein_client::wire::FetchPartition, FetchResult)>) -> Vec<Vec<u8>> {
    let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(parts.len() * 2 + 1);
    let mut w = Writer { buf: vec![0; 4] };
    id.encode(&mut w);
    ErrorCode::NONE.encode(&mut w);
    (parts.len() as u32).encode(&mut w);
    for (p, r) in parts {
        p.topic.encode(&mut w);
        p.partition.encode(&mut w);
        r.error.encode(&mut w);
        r.high_watermark.encode(&mut w);
        r.leader_epoch.encode(&mut w);
        r.log_start.encode(&mut w);
        r.token_wait_us.encode(&mut w);
        r.last_stable.encode(&mut w);
        r.aborted.encode(&mut w);
        (r.records.len() as u32).encode(&mut w);
        if !r.records.is_empty() {
            chunks.push(std::mem::take(&mut w.buf));
            chunks.push(r.records);
        }
    }
    chunks.push(w.buf);
    let len: usize = chunks.iter().map(Vec::len).sum::<usize>() - 4;
    let len = u32::try_from(len).expect("fetch responses are bounded by max_bytes");
    chunks[0][..4].copy_from_slice(&len.to_le_bytes());
    chunks
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use skein_client::wire::{decode_response, FetchPartition, FetchResponse};

    use super::*;

    #[test]
    fn vectored_fetch_frames_decode_as_fetch_responses() {
        let part = |name: &str, records: &[u8]| {
            (
                FetchPartition {
                    topic: name.into(),
                    partition: 1,
                    leader_epoch: 0,
                    fetch_offset: 0,
                    partition_max_bytes: 10,
                    min_high_watermark: 0,
                    min_leader_epoch: 0,
                },
                FetchResult {
                    error: ErrorCode::NONE,
                    high_watermark: 5,
                    leader_epoch: 3,
                    log_start: 0,
                    token_wait_us: 7,
                    last_stable: 4,
                    aborted: vec![skein_client::wire::AbortedTransaction {
                        producer_id: 9,
                        first_offset: 1,
                        last_offset: 2,
                    }],
                    records: records.to_vec(),
                },
            )
        };
        let chunks = encode_fetch(42, vec![part("a", b"xyz"), part("b", b""), part("c", b"12")]);
        let frame: Vec<u8> = chunks.concat();
        assert_eq!(u32::from_le_bytes(frame[..4].try_into().expect("4")) as usize, frame.len() - 4);
        let (id, resp) = decode_response::<FetchResponse>(BytesMut::from(&frame[4..])).expect("decodes");
        let resp = resp.expect("no error");
        assert_eq!(id, 42);
        let got: Vec<(&str, &[u8])> = resp.partitions.iter().map(|p| (p.topic.as_str(), &p.records[..])).collect();
        assert_eq!(got, vec![("a", &b"xyz"[..]), ("b", &b""[..]), ("c", &b"12"[..])]);
        assert!(resp.partitions.iter().all(|p| (p.high_watermark, p.leader_epoch, p.token_wait_us) == (5, 3, 7)));
        assert!(resp.partitions.iter().all(|p| p.last_stable == 4 && p.aborted.len() == 1));
    }
}
