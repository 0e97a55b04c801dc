//! Request handling on typed messages ([`Request`] in, [`Response`] out); the Skein frame
//! codec lives in `codec`, so another wire protocol (Kafka's) can reuse these handlers. Each
//! handler splits work per partition, sends it to the owning shard, and assembles the
//! response in request order.
//!
//! Memory a request makes the broker hold is bounded by configuration, not by the request:
//! produce bytes count against `--max-produce-bytes` and fetch record bytes against
//! `--max-fetch-bytes` ([`Budgets`], one per shard; cluster mode: one per broker) through
//! holds ([`PoolHold`]) that give the bytes back when dropped, so a request task dropped
//! mid-await (its connection failed) releases them too. A fetch reads partitions in request
//! order against what is left of its own budget ([`FetchBudget`]), sizing each range before
//! reading it. What is not bounded here: a response handed to its connection is no longer
//! counted while it waits to be written (`--max-in-flight` per connection bounds that).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::core::controller::PARTITIONS_PER_TOPIC_MAX;
use crate::meta::{self, TopicMeta, Topics};
use crate::BrokerConfig;

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
    if t.partitions == 0 || t.partitions > PARTITIONS_PER_TOPIC_MAX {
        return Err((ErrorCode::INVALID_PARTITIONS, format!("partitions must be 1..={PARTITIONS_PER_TOPIC_MAX}")));
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

/// The byte pools that bound what requests hold in memory on one shard (cluster mode: on the
/// broker): produce bytes being appended or awaiting their answers, and fetch record bytes
/// being read or assembled.
pub(crate) struct Budgets {
    /// `--max-produce-bytes`: past it, produce entries get THROTTLED.
    pub produce: BytePool,
    /// `--max-fetch-bytes`: past it, fetches read no more records (and wait, or get less).
    pub fetch: BytePool,
}

impl Budgets {
    pub(crate) fn new(config: &BrokerConfig) -> Budgets {
        Budgets { produce: BytePool::new(config.max_produce_bytes), fetch: BytePool::new(config.max_fetch_bytes) }
    }
}

/// Bytes in use against a limit. The count is shared with the holds taken from the pool,
/// which may be dropped on another shard's thread (a fetch's records travel to the shard
/// that asked for them), hence an atomic.
#[derive(Clone)]
pub(crate) struct BytePool {
    used: Arc<AtomicU64>,
    limit: u64,
}

impl BytePool {
    pub(crate) fn new(limit: u64) -> BytePool {
        BytePool { used: Arc::new(AtomicU64::new(0)), limit }
    }

    /// Bytes that may still be taken before the pool is full.
    pub(crate) fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used.load(Ordering::Relaxed))
    }

    /// Takes `bytes` if they fit under the limit; `None` if not (nothing taken).
    pub(crate) fn try_hold(&self, bytes: u64) -> Option<PoolHold> {
        let fits = |used: u64| used.checked_add(bytes).filter(|u| *u <= self.limit);
        self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits).ok()?;
        Some(PoolHold { used: self.used.clone(), bytes })
    }

    /// A hold of nothing yet, grown with [`PoolHold::add`].
    fn empty_hold(&self) -> PoolHold {
        PoolHold { used: self.used.clone(), bytes: 0 }
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes taken from a [`BytePool`], given back when the hold is dropped: on every path,
/// including a request future dropped unfinished.
pub(crate) struct PoolHold {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl PoolHold {
    /// Takes `bytes` more, past the pool's limit if need be (the caller bounds by how much).
    fn add(&mut self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.bytes += bytes;
    }
}

impl Drop for PoolHold {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One fetch's read budget on one shard, spent as its partitions are read in request order:
/// the request's `max_bytes` (0 counts as 1) capped at `--max-fetch-bytes`, drawn from the
/// shard's fetch pool, which every response being built shares.
///
/// Per partition: [`FetchBudget::limit`] gives the byte limit to read with (the partition's
/// `partition_max_bytes` clamped to what is left), or `None` (read no records: the budget is
/// spent or the pool is full); the caller sizes the range that limit gives without reading it
/// and asks [`FetchBudget::fits`]; then hands what it read to [`FetchBudget::take`]. The first
/// partition with records gets at least one whole batch even past both limits (so a consumer
/// always progresses; the pool overshoots by at most that batch, since a full pool stops
/// every later read); later partitions get only what fits. Duplicate entries share the
/// budget like any others. The bytes taken stay counted in the pool until the budget drops.
pub(crate) struct FetchBudget {
    pool: BytePool,
    /// Bytes the response may still take.
    left: u64,
    /// Some partition's records were taken: later ones must fit.
    taken: bool,
    /// A read was skipped or cut short because the pool was full: records may be there.
    pub(crate) starved: bool,
    hold: PoolHold,
}

impl FetchBudget {
    pub(crate) fn new(max_bytes: u32, pool: &BytePool) -> FetchBudget {
        let left = u64::from(max_bytes.max(1)).min(pool.limit.max(1));
        FetchBudget { pool: pool.clone(), left, taken: false, starved: false, hold: pool.empty_hold() }
    }

    /// The byte limit for the next partition's read, or `None`: read no records for it.
    pub(crate) fn limit(&mut self, partition_max_bytes: u32) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        let wanted = u64::from(partition_max_bytes.max(1)).min(self.left);
        let available = self.pool.available();
        if available < wanted {
            self.starved = true;
        }
        let limit = wanted.min(available);
        (limit > 0).then(|| u32::try_from(limit).expect("at most partition_max_bytes"))
    }

    /// Whether a range of `bytes`, found with the limit [`FetchBudget::limit`] gave, may be
    /// read (it is larger than that limit only when its first batch is).
    pub(crate) fn fits(&mut self, bytes: u64) -> bool {
        if !self.taken || bytes <= self.left.min(self.pool.available()) {
            return true;
        }
        if bytes <= self.left {
            self.starved = true;
        }
        false
    }

    /// Counts the records read for a partition against the budget and the pool. Records the
    /// budget has no room for (a read not sized first) are dropped here.
    pub(crate) fn take(&mut self, records: &mut Vec<u8>) {
        let bytes = records.len() as u64;
        if bytes == 0 {
            return;
        }
        if !self.fits(bytes) {
            *records = Vec::new();
            return;
        }
        self.taken = true;
        self.left = self.left.saturating_sub(bytes);
        self.hold.add(bytes);
    }
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

    /// Reads partitions `(partition_max_bytes, bytes there, batch bytes)` in order with a
    /// fresh budget, as the shards do (a read returns all the bytes there if under its limit,
    /// else whole batches up to it, at least one); the bytes each read returned, and the
    /// budget (holding them).
    fn check(max_bytes: u32, pool: &BytePool, parts: &[(u32, u64, u64)]) -> (Vec<u64>, FetchBudget) {
        let mut budget = FetchBudget::new(max_bytes, pool);
        let mut got = Vec::new();
        for &(partition_max_bytes, size, batch) in parts {
            let Some(limit) = budget.limit(partition_max_bytes) else {
                got.push(0);
                continue;
            };
            let range = if size <= u64::from(limit) { size } else { (u64::from(limit) / batch).max(1) * batch };
            if !budget.fits(range) {
                got.push(0);
                continue;
            }
            let mut records = vec![0u8; range as usize];
            budget.take(&mut records);
            got.push(records.len() as u64);
        }
        (got, budget)
    }

    #[test]
    fn a_fetch_reads_no_more_than_its_budget_plus_the_first_batch() {
        let pool = BytePool::new(1 << 20);
        // The same partition four times, max_bytes 100, partition_max_bytes huge: the first
        // entry takes 100, the others share what is left (nothing).
        let (got, budget) = check(100, &pool, &[(u32::MAX, 1000, 10); 4]);
        assert_eq!(got, vec![100, 0, 0, 0]);
        assert_eq!(pool.used(), 100);
        drop(budget);
        assert_eq!(pool.used(), 0, "given back on drop");
        // A first batch larger than the budget is still read, and spends it all.
        let (got, _b) = check(100, &pool, &[(u32::MAX, 500, 500), (u32::MAX, 80, 80), (u32::MAX, 50, 50)]);
        assert_eq!(got, vec![500, 0, 0]);
        // A later partition whose first batch does not fit what is left is not read; a later,
        // smaller one still is.
        let (got, _b) = check(100, &pool, &[(u32::MAX, 60, 60), (u32::MAX, 80, 80), (u32::MAX, 30, 30)]);
        assert_eq!(got, vec![60, 0, 30]);
        // partition_max_bytes clamps each read; 0 counts as 1 (a whole first batch).
        let (got, _b) = check(100, &pool, &[(20, 1000, 10), (0, 1000, 10)]);
        assert_eq!(got, vec![20, 10]);
        // max_bytes 0 counts as 1: one batch.
        let (got, _b) = check(0, &pool, &[(u32::MAX, 1000, 10), (u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![10, 0]);
    }

    #[test]
    fn a_full_pool_starves_later_fetches_and_a_request_is_capped_at_the_pool() {
        let pool = BytePool::new(100);
        let (got, first) = check(u32::MAX, &pool, &[(u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![100], "max_bytes capped at the pool");
        assert!(!first.starved);
        let (got, second) = check(1000, &pool, &[(u32::MAX, 1000, 10), (u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![0, 0]);
        assert!(second.starved, "records were there but the pool was full");
        drop((first, second));
        let (got, _b) = check(1000, &pool, &[(u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![100], "the pool came back");
    }

    #[test]
    fn produce_holds_fit_under_the_limit_and_come_back_on_drop() {
        let pool = BytePool::new(100);
        let a = pool.try_hold(60).expect("fits");
        assert!(pool.try_hold(41).is_none(), "past the limit");
        let b = pool.try_hold(40).expect("exactly fills it");
        assert_eq!(pool.available(), 0);
        drop((a, b));
        assert_eq!(pool.used(), 0);
        assert!(pool.try_hold(101).is_none(), "larger than the pool: never");
    }

    #[test]
    fn in_flight_counts_down_when_the_request_is_dropped() {
        let count = Cell::new(0);
        let guard = InFlight::enter(&count);
        assert_eq!(count.get(), 1);
        drop(guard);
        assert_eq!(count.get(), 0);
    }
}
