//! The single-node runtime's request handlers, on typed messages ([`Request`] in, [`Response`]
//! out; the Skein frame codec is `crate::service::codec`, so another wire protocol, Kafka's,
//! can reuse them). Each handler splits work per partition, sends it to the owning shard, and
//! assembles the response in request order; topic creation and deletion are the shard's
//! (`topics`). Memory a request holds is bounded by `crate::service::budget`. What is not
//! bounded here: a response handed to its connection is no longer counted while it waits to be
//! written (`--max-in-flight` per connection bounds that).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use skein_client::wire::{
    BrokerInfo, DescribeTopicsRequest, DescribeTopicsResponse, ErrorCode, FetchPartition, FetchRequest,
    InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest,
    MetadataResponse, PartitionMetadata, ProduceRequest, ProduceResponse, Reader, TopicConfig, TopicDescription,
    TopicMetadata,
};

use super::shard::ask;
use super::{Shard, ShardMsg};
use crate::service::budget::FetchBudget;
use crate::service::conn::Service;
use crate::service::{api_versions, fetch_response, FetchResult, Request, Response};

impl Service for Shard {
    fn max_in_flight(&self) -> usize {
        self.config.max_in_flight
    }
    fn max_frame_bytes(&self) -> u32 {
        self.config.max_frame_bytes
    }
    fn handle(self: Rc<Self>, req: Request) -> Pin<Box<dyn Future<Output = Response>>> {
        Box::pin(handle(self, req))
    }
    fn peer_message(self: &Rc<Self>, _from: Option<std::net::SocketAddr>, _body: Reader) -> bool {
        tracing::warn!("closing connection: inter-broker message to a broker without --voters");
        false
    }
}

/// Handles one request.
pub(crate) async fn handle(shard: Rc<Shard>, req: Request) -> Response {
    // Counted down on drop: the connection drops this future unfinished when it fails.
    let _in_flight = InFlight::enter(&shard.in_flight);
    dispatch(&shard, req).await
}

async fn dispatch(shard: &Rc<Shard>, req: Request) -> Response {
    if shard.stopping.get() {
        // acks=0 producers expect no response at all, not even an error.
        if let Request::Produce(ProduceRequest { acks: 0, .. }) = req {
            return Response::Nothing;
        }
        return Response::Error(ErrorCode::SHUTTING_DOWN);
    }
    match req {
        Request::ApiVersions => Response::ApiVersions(api_versions()),
        Request::Metadata(r) => Response::Metadata(metadata(shard, r)),
        Request::CreateTopics(r) => Response::CreateTopics(shard.create_topics(r).await),
        Request::DeleteTopics(r) => Response::DeleteTopics(shard.delete_topics(r).await),
        Request::DescribeTopics(r) => Response::DescribeTopics(describe_topics(shard, r).await),
        Request::Produce(r) => produce(shard, r).await,
        Request::Fetch(r) => fetch(shard, r).await,
        Request::ListOffsets(r) => Response::ListOffsets(list_offsets(shard, r).await),
        Request::InitProducerId(r) => Response::InitProducerId(init_producer_id(shard, r).await),
        Request::ReassignPartition(_) => Response::ReassignPartition(skein_client::wire::ReassignPartitionResponse {
            error: ErrorCode::INVALID_REQUEST,
            message: "a single-node broker has nowhere to move replicas (start brokers with --voters)".into(),
        }),
    }
}

async fn init_producer_id(shard: &Rc<Shard>, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let fail = |error| InitProducerIdResponse { error, producer_id: -1, producer_epoch: -1 };
    if req.transactional_id.is_some() {
        return fail(ErrorCode::INVALID_REQUEST); // transactions are not built yet
    }
    match ask(shard, 0, |reply| ShardMsg::InitProducerId { reply }).await {
        Some(Ok(id)) => InitProducerIdResponse { error: ErrorCode::NONE, producer_id: id, producer_epoch: 0 },
        Some(Err(code)) => fail(code),
        None => fail(ErrorCode::SHUTTING_DOWN),
    }
}

fn metadata(shard: &Rc<Shard>, req: MetadataRequest) -> MetadataResponse {
    let topics = shard.topics.borrow().clone();
    let node = shard.config.node_id;
    let names: Vec<String> = req.topics.unwrap_or_else(|| topics.topics.keys().cloned().collect());
    let topics = names
        .into_iter()
        .map(|name| match topics.topics.get(&name) {
            Some(t) => TopicMetadata {
                name,
                error: ErrorCode::NONE,
                partitions: (0..t.partitions)
                    .map(|p| PartitionMetadata {
                        partition: p,
                        error: ErrorCode::NONE,
                        leader: node,
                        leader_epoch: 0,
                        replicas: vec![node],
                        isr: vec![node],
                    })
                    .collect(),
            },
            None => TopicMetadata { name, error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, partitions: vec![] },
        })
        .collect();
    let listen = shard.config.listen;
    let host = listen.ip().to_string();
    MetadataResponse {
        brokers: vec![BrokerInfo { node_id: node, host, port: listen.port(), rack: String::new() }],
        controller: node,
        topics,
    }
}

async fn describe_topics(shard: &Rc<Shard>, req: DescribeTopicsRequest) -> DescribeTopicsResponse {
    let topics = shard.topics.borrow().clone();
    let names: Vec<String> = if req.names.is_empty() { topics.topics.keys().cloned().collect() } else { req.names };
    let mut out = Vec::new();
    for name in names {
        let Some(t) = topics.topics.get(&name) else {
            out.push(TopicDescription {
                name,
                error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                configs: vec![],
                partitions: vec![],
            });
            continue;
        };
        let mut partitions = Vec::new();
        for p in 0..t.partitions {
            let topic = name.clone();
            let d = ask(shard, shard.owner(&name, p), |reply| ShardMsg::Describe { topic, partition: p, reply }).await;
            partitions.extend(d);
        }
        let configs = t.configs.iter().map(|(k, v)| TopicConfig { key: k.clone(), value: v.clone() }).collect();
        out.push(TopicDescription { name, error: ErrorCode::NONE, configs, partitions });
    }
    DescribeTopicsResponse { topics: out }
}

async fn produce(shard: &Rc<Shard>, req: ProduceRequest) -> Response {
    if !(-1..=1).contains(&req.acks) {
        return Response::Error(ErrorCode::INVALID_REQUEST);
    }
    let timeout = req.timeout_ms.min(shard.config.max_request_timeout_ms);
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout));
    let acks = req.acks;
    let names: Vec<(String, u32)> = req.partitions.iter().map(|p| (p.topic.clone(), p.partition)).collect();
    let groups = by_owner(shard, req.partitions, |p| (p.topic.as_str(), p.partition));
    // One message per other shard; this shard's own partitions are produced to in place.
    let mut remote = Vec::new();
    let mut local = None;
    for (owner, (indices, parts)) in groups {
        if owner == shard.id {
            local = Some((indices, parts));
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if shard.peers[owner].send_async(ShardMsg::Produce { parts, acks, deadline, reply: tx }).await.is_err() {
            return if acks == 0 { Response::Nothing } else { Response::Error(ErrorCode::SHUTTING_DOWN) };
        }
        remote.push((indices, rx));
    }
    let mut answers: Vec<Option<skein_client::wire::ProducePartitionResponse>> = vec![None; names.len()];
    if let Some((indices, parts)) = local {
        for (i, r) in indices.into_iter().zip(shard.produce_all(parts, acks, deadline).await) {
            answers[i] = Some(r);
        }
    }
    for (indices, rx) in remote {
        if let Ok(rs) = rx.await {
            for (i, r) in indices.into_iter().zip(rs) {
                answers[i] = Some(r);
            }
        }
    }
    if acks == 0 {
        return Response::Nothing;
    }
    let partitions = answers
        .into_iter()
        .zip(names)
        .map(|(answer, (topic, partition))| {
            answer.unwrap_or(skein_client::wire::ProducePartitionResponse {
                topic,
                partition,
                error: ErrorCode::SHUTTING_DOWN,
                base_offset: 0,
                leader_epoch: 0,
                log_start: 0,
            })
        })
        .collect();
    Response::Produce(ProduceResponse { partitions })
}

/// Splits a request's partition entries by owner shard, keeping each entry's index in the
/// request (groups in shard order, entries in request order within a group).
fn by_owner<T>(
    shard: &Shard,
    items: Vec<T>,
    name: impl Fn(&T) -> (&str, u32),
) -> std::collections::BTreeMap<usize, (Vec<usize>, Vec<T>)> {
    let mut groups: std::collections::BTreeMap<usize, (Vec<usize>, Vec<T>)> = std::collections::BTreeMap::new();
    for (i, item) in items.into_iter().enumerate() {
        let (topic, partition) = name(&item);
        let group = groups.entry(shard.owner(topic, partition)).or_default();
        group.0.push(i);
        group.1.push(item);
    }
    groups
}

/// Fetch with long polling: read every partition; if fewer than `min_bytes` came back and
/// time is left, wait until any partition grows (or the deadline), then read again. A fetch
/// that found the shard's fetch budget full waits for at least one byte, re-reading every
/// `FETCH_STARVED_RETRY_MS`, and at its deadline is answered with what fits (maybe nothing).
async fn fetch(shard: &Rc<Shard>, req: FetchRequest) -> Response {
    let wait = Duration::from_millis(u64::from(req.max_wait_ms.min(shard.config.max_request_timeout_ms)));
    let deadline = Instant::now() + wait;
    loop {
        // The budgets hold the bytes read until the response is handed to the connection.
        let (results, budgets) = fetch_once(shard, &req.partitions, req.max_bytes).await;
        let total: usize = results.iter().map(|r| r.records.len()).sum();
        let failed = results.iter().any(|r| r.error != ErrorCode::NONE);
        let starved = budgets.iter().any(|b| b.starved);
        let min_bytes = if starved { req.min_bytes.max(1) } else { req.min_bytes };
        if total >= min_bytes as usize || failed || req.partitions.is_empty() || Instant::now() >= deadline {
            return fetch_response(req, results);
        }
        // Wake on growth past what this round saw, not on data already returned (which
        // would spin until the deadline when some, but under `min_bytes`, is there).
        let seen: Vec<u64> = results.iter().map(|r| r.high_watermark).collect();
        // Nothing read is kept while waiting: the next round reads again.
        drop((results, budgets));
        let mut waits = Vec::new();
        for (p, seen) in req.partitions.iter().zip(seen) {
            let (topic, partition, offset) = (p.topic.clone(), p.partition, p.fetch_offset.max(seen));
            let (tx, rx) = oneshot::channel();
            let msg = ShardMsg::WaitForData { topic, partition, offset, reply: tx };
            let owner = shard.owner(&p.topic, p.partition);
            if owner == shard.id {
                compio::runtime::spawn(shard.clone().on_msg_pub(msg)).detach();
            } else if shard.peers[owner].send_async(msg).await.is_err() {
                let (results, _budgets) = fetch_once(shard, &req.partitions, req.max_bytes).await;
                return fetch_response(req, results);
            }
            waits.push(rx);
        }
        let mut left = deadline.saturating_duration_since(Instant::now());
        if starved {
            left = left.min(Duration::from_millis(FETCH_STARVED_RETRY_MS));
        }
        let _ = compio::time::timeout(left, futures_util::future::select_all(waits)).await;
    }
}

/// Reads every partition once: each owner shard reads its partitions in request order
/// against the request's `max_bytes` and its own fetch budget. The budgets hold the bytes
/// read (of every shard) until dropped.
async fn fetch_once(
    shard: &Rc<Shard>,
    parts: &[FetchPartition],
    max_bytes: u32,
) -> (Vec<FetchResult>, Vec<FetchBudget>) {
    let groups = by_owner(shard, parts.to_vec(), |p| (p.topic.as_str(), p.partition));
    let mut out: Vec<Option<FetchResult>> = (0..parts.len()).map(|_| None).collect();
    let mut budgets = Vec::with_capacity(groups.len());
    let mut remote = Vec::new();
    for (owner, (indices, parts)) in groups {
        if owner == shard.id {
            let (results, budget) = shard.fetch_all(&parts, max_bytes);
            for (i, r) in indices.into_iter().zip(results) {
                out[i] = Some(r);
            }
            budgets.push(budget);
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if shard.peers[owner].send_async(ShardMsg::Fetch { parts, max_bytes, reply: tx }).await.is_ok() {
            remote.push((indices, rx));
        }
    }
    for (indices, rx) in remote {
        if let Ok((results, budget)) = rx.await {
            for (i, r) in indices.into_iter().zip(results) {
                out[i] = Some(r);
            }
            budgets.push(budget);
        }
    }
    let results = out.into_iter().map(|r| r.unwrap_or_else(|| FetchResult::empty(ErrorCode::SHUTTING_DOWN))).collect();
    (results, budgets)
}

async fn list_offsets(shard: &Rc<Shard>, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut partitions = Vec::with_capacity(req.partitions.len());
    for part in req.partitions {
        let owner = shard.owner(&part.topic, part.partition);
        let fallback = skein_client::wire::ListOffsetsPartitionResponse {
            topic: part.topic.clone(),
            partition: part.partition,
            error: ErrorCode::SHUTTING_DOWN,
            offset: 0,
        };
        let r = ask(shard, owner, |reply| ShardMsg::ListOffsets { part, reply }).await;
        partitions.push(r.unwrap_or(fallback));
    }
    ListOffsetsResponse { partitions }
}

/// A request counted in its shard's in-flight requests while its future lives.
struct InFlight<'a>(&'a Cell<usize>);

impl<'a> InFlight<'a> {
    fn enter(count: &'a Cell<usize>) -> InFlight<'a> {
        count.set(count.get() + 1);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// How often a fetch that found the fetch budget full reads again while it waits.
const FETCH_STARVED_RETRY_MS: u64 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_down_when_the_request_is_dropped() {
        let count = Cell::new(0);
        let guard = InFlight::enter(&count);
        assert_eq!(count.get(), 1);
        drop(guard);
        assert_eq!(count.get(), 0);
    }
}
