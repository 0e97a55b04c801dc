//! Request handling on typed messages ([`Request`] in, [`Response`] out); the Skein frame
//! codec lives in `codec`, so another wire protocol (Kafka's) can reuse these handlers. Each handler splits work per partition, sends it to the owning
//! shard, and assembles the response in request order.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use skein_client::wire::{
    ApiKey, ApiVersion, ApiVersionsResponse, BrokerInfo, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeTopicsRequest, DescribeTopicsResponse, ErrorCode,
    FetchPartition, FetchRequest, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, PartitionMetadata, ProduceRequest, ProduceResponse,
    TopicConfig, TopicDescription, TopicMetadata, TopicResult,
};

use super::shard::FetchResult;
use super::{Shard, ShardMsg};
use crate::meta::{self, TopicMeta, Topics};

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
    /// The whole request failed with this code.
    Error(ErrorCode),
    /// No response is due (produce with acks=0).
    Nothing,
}

/// Handles one request.
pub(crate) async fn handle(shard: Rc<Shard>, req: Request) -> Response {
    shard.in_flight.set(shard.in_flight.get() + 1);
    let out = dispatch(&shard, req).await;
    shard.in_flight.set(shard.in_flight.get() - 1);
    out
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
        Request::CreateTopics(r) => Response::CreateTopics(create_topics(shard, r).await),
        Request::DeleteTopics(r) => Response::DeleteTopics(delete_topics(shard, r).await),
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

/// Sends `msg` to the shard owning the work (or runs it here) and waits for the reply.
async fn ask<T>(shard: &Rc<Shard>, owner: usize, make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let msg = make(tx);
    if owner == shard.id {
        compio::runtime::spawn(shard.clone().on_msg_pub(msg)).detach();
    } else if shard.peers[owner].send_async(msg).await.is_err() {
        return None;
    }
    rx.await.ok()
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

pub(crate) fn api_versions() -> ApiVersionsResponse {
    let apis = ApiKey::ALL
        .iter()
        .map(|k| ApiVersion { api_key: *k as u16, min_version: 0, max_version: k.max_version() })
        .collect();
    ApiVersionsResponse { apis }
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

pub(crate) async fn create_topics(shard: &Rc<Shard>, req: CreateTopicsRequest) -> CreateTopicsResponse {
    if shard.id != 0 {
        return ask(shard, 0, |reply| ShardMsg::Create { req, reply })
            .await
            .unwrap_or(CreateTopicsResponse { results: vec![] });
    }
    let _serial = shard.admin.lock().await;
    let mut results = Vec::new();
    for t in req.topics {
        let (error, message) = match create_one(shard, &t).await {
            Ok(()) => (ErrorCode::NONE, String::new()),
            Err((code, msg)) => (code, msg),
        };
        results.push(TopicResult { name: t.name, error, message });
    }
    CreateTopicsResponse { results }
}

async fn create_one(shard: &Rc<Shard>, t: &skein_client::wire::NewTopic) -> Result<(), (ErrorCode, String)> {
    meta::validate_name(&t.name).map_err(|c| (c, "names are 1-249 characters of [A-Za-z0-9._-]".to_owned()))?;
    if t.partitions == 0 || t.partitions > PARTITIONS_MAX {
        return Err((ErrorCode::INVALID_PARTITIONS, format!("partitions must be 1..={PARTITIONS_MAX}")));
    }
    if t.replicas != 1 {
        return Err((ErrorCode::INVALID_PARTITIONS, "this is a single-node cluster: replicas must be 1".to_owned()));
    }
    let configs: BTreeMap<String, String> = t.configs.iter().map(|c| (c.key.clone(), c.value.clone())).collect();
    meta::log_config(&configs).map_err(|m| (ErrorCode::INVALID_CONFIG, m))?;
    let mut topics = (**shard.topics.borrow()).clone();
    if topics.topics.contains_key(&t.name) {
        return Err((ErrorCode::TOPIC_ALREADY_EXISTS, format!("topic '{}' already exists", t.name)));
    }
    let meta = TopicMeta { name: t.name.clone(), partitions: t.partitions, replicas: t.replicas, configs };
    topics.topics.insert(t.name.clone(), meta);
    publish(shard, topics).await.map_err(|e| (ErrorCode::STORAGE_ERROR, e))?;
    for p in 0..t.partitions {
        let (topic, owner) = (t.name.clone(), shard.owner(&t.name, p));
        let opened = ask(shard, owner, |reply| ShardMsg::OpenPartition { topic, partition: p, reply }).await;
        match opened {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err((ErrorCode::STORAGE_ERROR, e)),
            None => return Err((ErrorCode::SHUTTING_DOWN, "broker stopping".to_owned())),
        }
    }
    Ok(())
}

pub(crate) async fn delete_topics(shard: &Rc<Shard>, req: DeleteTopicsRequest) -> DeleteTopicsResponse {
    if shard.id != 0 {
        return ask(shard, 0, |reply| ShardMsg::Delete { req, reply })
            .await
            .unwrap_or(DeleteTopicsResponse { results: vec![] });
    }
    let _serial = shard.admin.lock().await;
    let mut results = Vec::new();
    for name in req.names {
        let mut topics = (**shard.topics.borrow()).clone();
        let Some(t) = topics.topics.remove(&name) else {
            results.push(TopicResult {
                name,
                error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                message: "no such topic".into(),
            });
            continue;
        };
        if let Err(e) = publish(shard, topics).await {
            results.push(TopicResult { name, error: ErrorCode::STORAGE_ERROR, message: e });
            continue;
        }
        for p in 0..t.partitions {
            let (topic, owner) = (name.clone(), shard.owner(&name, p));
            ask(shard, owner, |reply| ShardMsg::DeletePartition { topic, partition: p, reply }).await;
        }
        results.push(TopicResult { name, error: ErrorCode::NONE, message: String::new() });
    }
    DeleteTopicsResponse { results }
}

/// Persists a new metadata snapshot, then hands it to every shard.
async fn publish(shard: &Rc<Shard>, topics: Topics) -> Result<(), String> {
    topics.save(&shard.config.data_dir).map_err(|e| format!("{e:#}"))?;
    let topics = Arc::new(topics);
    *shard.topics.borrow_mut() = topics.clone();
    for (i, peer) in shard.peers.iter().enumerate() {
        if i != shard.id {
            let _ = peer.send_async(ShardMsg::Topics(topics.clone())).await;
        }
    }
    Ok(())
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
/// time is left, wait until any partition grows (or the deadline), then read again.
async fn fetch(shard: &Rc<Shard>, req: FetchRequest) -> Response {
    let wait = Duration::from_millis(u64::from(req.max_wait_ms.min(shard.config.max_request_timeout_ms)));
    let deadline = Instant::now() + wait;
    loop {
        let results = fetch_once(shard, &req.partitions).await;
        let total: usize = results.iter().map(|r| r.records.len()).sum();
        let failed = results.iter().any(|r| r.error != ErrorCode::NONE);
        if total >= req.min_bytes as usize || failed || Instant::now() >= deadline {
            return fetch_response(req, results);
        }
        let mut waits = Vec::new();
        for (p, r) in req.partitions.iter().zip(&results) {
            // Wake on growth past what this round saw, not on data already returned (which
            // would spin until the deadline when some, but under `min_bytes`, is there).
            let (topic, partition, offset) = (p.topic.clone(), p.partition, p.fetch_offset.max(r.high_watermark));
            let (tx, rx) = oneshot::channel();
            let msg = ShardMsg::WaitForData { topic, partition, offset, reply: tx };
            let owner = shard.owner(&p.topic, p.partition);
            if owner == shard.id {
                compio::runtime::spawn(shard.clone().on_msg_pub(msg)).detach();
            } else if shard.peers[owner].send_async(msg).await.is_err() {
                return fetch_response(req, results);
            }
            waits.push(rx);
        }
        if waits.is_empty() {
            return fetch_response(req, results);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = compio::time::timeout(left, futures_util::future::select_all(waits)).await;
    }
}

async fn fetch_once(shard: &Rc<Shard>, parts: &[FetchPartition]) -> Vec<FetchResult> {
    let groups = by_owner(shard, parts.to_vec(), |p| (p.topic.as_str(), p.partition));
    let mut out: Vec<Option<FetchResult>> = (0..parts.len()).map(|_| None).collect();
    let mut remote = Vec::new();
    for (owner, (indices, parts)) in groups {
        if owner == shard.id {
            for (i, r) in indices.into_iter().zip(shard.fetch_all(&parts)) {
                out[i] = Some(r);
            }
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if shard.peers[owner].send_async(ShardMsg::Fetch { parts, reply: tx }).await.is_ok() {
            remote.push((indices, rx));
        }
    }
    for (indices, rx) in remote {
        if let Ok(rs) = rx.await {
            for (i, r) in indices.into_iter().zip(rs) {
                out[i] = Some(r);
            }
        }
    }
    out.into_iter().map(|r| r.unwrap_or_else(|| FetchResult::empty(ErrorCode::SHUTTING_DOWN))).collect()
}

/// Pairs results with their partitions, leaving out whole partitions' data past `max_bytes`
/// (the first partition with data is always sent, so a consumer progresses).
pub(crate) fn fetch_response(req: FetchRequest, results: Vec<FetchResult>) -> Response {
    let mut total = 0usize;
    let mut out = Vec::with_capacity(results.len());
    for (p, mut r) in req.partitions.into_iter().zip(results) {
        if total > 0 && total + r.records.len() > req.max_bytes as usize {
            r.records.clear();
        }
        total += r.records.len();
        out.push((p, r));
    }
    Response::Fetch(out)
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

const PARTITIONS_MAX: u32 = 10_000;
