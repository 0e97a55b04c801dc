//! What the coordinators on internal topics share (`groups` on `__consumer_offsets`, `txn` on
//! `__transaction_state`): creating the topic on first use, naming the leader of a key's
//! partition, deciding whether this shard may coordinate a partition, feeding a
//! [`LogMachine`] the partition's committed records, and appending records with `acks=all`.
//! Each coordinator keeps its own machine, requests and timers; this is the plumbing they
//! would otherwise each write.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytes::BytesMut;
use futures_util::lock::Mutex;
use skein_client::wire::{
    CreateTopicsRequest, ErrorCode, FindCoordinatorResponse, MetadataRequest, NewTopic, ProducePartition,
    ProduceRequest, TopicConfig,
};
use skein_log::batch::{Attributes, BatchBuilder};
use skein_log::types::Sequence;

use super::now;
use super::requests::ask;
use super::shard::{owner, Node};
use crate::core::group::partition_for;
use crate::core::machine::{catch_up, CatchUpError, LogMachine};
use crate::core::{LeaderEpoch, NodeId, Offset, PartitionId, ProduceError, ProducerEpoch, ProducerId};
use crate::service::{Request, Response};

thread_local! {
    /// This shard's client of the cluster (what a broker writes to tables through:
    /// `index_follower`, `table_seed`).
    static CLIENT: RefCell<Option<skein_client::Client>> = const { RefCell::new(None) };
}

/// This shard's client of the cluster, connected to the broker's own address.
pub(super) async fn client(node: &Node) -> Result<skein_client::Client, skein_client::ClientError> {
    if let Some(c) = CLIENT.with(|c| c.borrow().clone()) {
        return Ok(c);
    }
    let c = skein_client::Client::connect(&node.config.listen.to_string()).await?;
    CLIENT.with(|slot| *slot.borrow_mut() = Some(c.clone()));
    Ok(c)
}

/// A refusal: the error code and a message for the client.
pub(super) type Refusal = (ErrorCode, String);

/// Bound on one internal append.
const WRITE_TIMEOUT_MS: u32 = 10_000;

/// A control request on shard 0.
pub(super) async fn control(node: &Rc<Node>, req: Request) -> Response {
    if node.shard == 0 {
        node.clone().control_request(req).await
    } else {
        ask(node, 0, req).await
    }
}

/// The wall clock in ms (record timestamps, ages shown to people).
pub(super) fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Creates internal topic `topic` with `partitions` partitions if it does not exist:
/// replication min(3, brokers), min ISR min(2, replication), no retention (there is no
/// compaction yet, and no state may age out). `Ok` once this shard's topic map has it.
pub(super) async fn ensure_topic(node: &Rc<Node>, topic: &str, partitions: u32) -> Result<(), Refusal> {
    if node.topics.load().partitions(topic).is_some() {
        return Ok(());
    }
    let replicas = node.voters.len().min(3) as u16;
    let create = CreateTopicsRequest {
        topics: vec![NewTopic {
            name: topic.into(),
            partitions,
            replicas,
            partitioning: 0,
            configs: vec![
                TopicConfig { key: "min.insync.replicas".into(), value: replicas.min(2).to_string() },
                TopicConfig { key: "retention.ms".into(), value: "-1".into() },
            ],
        }],
    };
    if let Response::CreateTopics(c) = control(node, Request::CreateTopics(create)).await {
        if let Some(t) =
            c.results.first().filter(|t| !matches!(t.error, ErrorCode::NONE | ErrorCode::TOPIC_ALREADY_EXISTS))
        {
            return Err((t.error, format!("creating {topic}: {}", t.message)));
        }
    }
    match node.topics.load().partitions(topic) {
        Some(_) => Ok(()),
        None => Err((ErrorCode::COORDINATOR_LOAD_IN_PROGRESS, format!("{topic} is being created"))),
    }
}

/// Leaders of the named partitions (topic, index), with their partition ids, from the
/// controller state as this broker knows it; partitions without a leader are left out.
pub(super) async fn leaders(node: &Rc<Node>, parts: &[(String, u32)]) -> HashMap<(String, u32), (PartitionId, NodeId)> {
    let mut topics: Vec<String> = parts.iter().map(|(t, _)| t.clone()).collect();
    topics.sort();
    topics.dedup();
    let mut out = HashMap::new();
    let Response::Metadata(meta) = control(node, Request::Metadata(MetadataRequest { topics: Some(topics) })).await
    else {
        return out;
    };
    let map = node.topics.load();
    for t in &meta.topics {
        for p in t.partitions.iter().filter(|p| p.error == ErrorCode::NONE && p.leader != 0) {
            if let Some(id) = map.partition(&t.name, p.partition) {
                out.insert((t.name.clone(), p.partition), (id, NodeId(p.leader)));
            }
        }
    }
    out
}

/// FindCoordinator for `key` (already checked: `key_check`) on internal topic `topic`
/// (created on first use with `partitions`): the leader of partition `partition_for(key)`.
pub(super) async fn find_coordinator(
    node: &Rc<Node>,
    topic: &str,
    partitions: u32,
    key: &str,
    key_check: Result<(), Refusal>,
) -> FindCoordinatorResponse {
    let found = match key_check {
        Ok(()) => leader_of(node, topic, partitions, key).await,
        Err(e) => Err(e),
    };
    found.unwrap_or_else(|(error, message)| FindCoordinatorResponse {
        error,
        message,
        node_id: 0,
        host: String::new(),
        port: 0,
    })
}

async fn leader_of(
    node: &Rc<Node>,
    topic: &str,
    partitions: u32,
    key: &str,
) -> Result<FindCoordinatorResponse, Refusal> {
    ensure_topic(node, topic, partitions).await?;
    let count = node.topics.load().partitions(topic).unwrap_or(partitions);
    let index = partition_for(key, count);
    let found = leaders(node, &[(topic.to_owned(), index)]).await;
    let Some(&(_, leader)) = found.get(&(topic.to_owned(), index)) else {
        return Err((ErrorCode::NOT_COORDINATOR, format!("{topic}/{index} has no leader now")));
    };
    let Some((_, addr)) = node.voters.iter().find(|(n, _)| *n == leader) else {
        return Err((ErrorCode::NOT_COORDINATOR, format!("{topic}/{index}: leader {leader} is not a known broker")));
    };
    Ok(FindCoordinatorResponse {
        error: ErrorCode::NONE,
        message: String::new(),
        node_id: leader.0,
        host: addr.ip().to_string(),
        port: addr.port(),
    })
}

/// A coordinator's state per partition of its internal topic on one shard: each behind an
/// async mutex, so requests of one partition run one at a time (never a thread lock).
pub(super) struct Slots<L> {
    slots: RefCell<HashMap<PartitionId, Rc<Mutex<Option<L>>>>>,
}

impl<L> Default for Slots<L> {
    fn default() -> Self {
        Slots { slots: RefCell::new(HashMap::new()) }
    }
}

impl<L> Slots<L> {
    /// The slot of `p` (empty at first).
    pub(super) fn slot(&self, p: PartitionId) -> Rc<Mutex<Option<L>>> {
        self.slots.borrow_mut().entry(p).or_insert_with(|| Rc::new(Mutex::new(None))).clone()
    }

    /// Drops the slots of partitions no longer in `hosted`.
    pub(super) fn retain(&self, hosted: &[(u32, PartitionId)]) {
        self.slots.borrow_mut().retain(|p, _| hosted.iter().any(|(_, h)| h == p));
    }
}

/// The partitions of `topic` this shard hosts a replica of: (index, id).
pub(super) fn hosted(node: &Node, topic: &str) -> Vec<(u32, PartitionId)> {
    let topics = node.topics.load();
    let st = node.st.borrow();
    (0..topics.partitions(topic).unwrap_or(0))
        .filter_map(|i| Some((i, topics.partition(topic, i)?)))
        .filter(|(_, p)| owner(*p, node.shard_count()) == node.shard && st.core.replica(*p).is_some())
        .collect()
}

/// The partitions of `topic` this shard leads now (with a valid lease): (index, id).
pub(super) fn led(node: &Node, topic: &str) -> Vec<(u32, PartitionId)> {
    hosted(node, topic).into_iter().filter(|(_, p)| leading_epoch(node, *p).is_some()).collect()
}

/// The epoch this shard leads `pid` at, with a valid lease.
/// The epoch this shard's replica of `pid` leads at, its lease valid or not: state kept per
/// leader epoch outlives a lease that lapses for a moment (a lease blip is not a new epoch).
pub(super) fn led_epoch(node: &Node, pid: PartitionId) -> Option<LeaderEpoch> {
    node.st.borrow().core.replica(pid)?.leader_epoch()
}

pub(super) fn leading_epoch(node: &Node, pid: PartitionId) -> Option<LeaderEpoch> {
    let st = node.st.borrow();
    if !st.core.lease_valid(now()) {
        return None;
    }
    st.core.replica(pid)?.leader_epoch()
}

/// The epoch at which this shard may coordinate `topic`/`index` now: it leads it with a
/// valid lease, and (as for consumers) its high watermark reached its epoch's start, so every
/// record of earlier epochs is committed and will be applied.
pub(super) fn coordinating(node: &Node, pid: PartitionId, topic: &str, index: u32) -> Result<LeaderEpoch, Refusal> {
    match node.st.borrow().core.coordinating(now(), pid) {
        Ok(epoch) => Ok(epoch),
        Err(ProduceError::LeaderNotReady) => {
            Err((ErrorCode::COORDINATOR_LOAD_IN_PROGRESS, "the new leader is catching up".into()))
        }
        Err(_) => Err((ErrorCode::NOT_COORDINATOR, format!("this broker does not lead {topic}/{index}"))),
    }
}

/// Feeds `machine` the committed records of `pid` from where it stands to this replica's high
/// watermark. `Ok(None)`: no replica of `pid` here; `Ok(Some(n))`: `n` records read (applied
/// or skipped). A machine behind the log start (retention) must be rebuilt by the caller:
/// `Err` with STORAGE_ERROR says so, as does a damaged batch.
pub(super) fn feed_committed<M: LogMachine>(
    node: &Node,
    pid: PartitionId,
    topic: &str,
    machine: &mut M,
) -> Result<Option<u64>, Refusal> {
    let st = node.st.borrow();
    let Some(replica) = st.core.replica(pid) else { return Ok(None) };
    match catch_up(replica, machine) {
        Ok(read) => Ok(Some(read)),
        Err(CatchUpError::Read(skein_log::ReadError::Storage(e))) => {
            crate::service::fail_stop("reading an internal topic", &e)
        }
        Err(e) => Err((ErrorCode::STORAGE_ERROR, format!("{topic} ({pid}): {e}"))),
    }
}

/// Appends `records` (key, value) as one batch to `topic`/`index` at leader `epoch` with
/// `acks=all` through the ordinary produce path (inside `txn`'s transaction when given); the
/// offset after them. A lost leadership is NOT_COORDINATOR.
pub(super) async fn append(
    node: &Rc<Node>,
    topic: &str,
    index: u32,
    epoch: LeaderEpoch,
    records: &[(Vec<u8>, Vec<u8>)],
    txn: Option<(ProducerId, ProducerEpoch)>,
) -> Result<Offset, Refusal> {
    let mut b = match txn {
        Some((producer, producer_epoch)) => BatchBuilder::new()
            .producer(producer, producer_epoch, Sequence::NONE)
            .attributes(Attributes::default().with_transactional(true)),
        None => BatchBuilder::new(),
    };
    let stamp = skein_log::types::Timestamp(wall_ms() as i64);
    for (key, value) in records {
        b.push(Some(key), value, &[], stamp);
    }
    let bytes = b.build().into_bytes();
    let req = ProduceRequest {
        acks: -1,
        timeout_ms: WRITE_TIMEOUT_MS,
        partitions: vec![ProducePartition {
            topic: topic.into(),
            partition: index,
            leader_epoch: epoch.0,
            records: BytesMut::from(&bytes[..]),
        }],
    };
    let (error, base) = match node.produce_here(req).await {
        Response::Produce(r) => r.partitions.first().map_or((ErrorCode::UNKNOWN, 0), |p| (p.error, p.base_offset)),
        Response::Error(code) => (code, 0),
        _ => (ErrorCode::UNKNOWN, 0),
    };
    match error {
        ErrorCode::NONE => Ok(Offset(base + records.len() as u64)),
        ErrorCode::NOT_LEADER | ErrorCode::FENCED_LEADER_EPOCH | ErrorCode::UNKNOWN_TOPIC_OR_PARTITION => {
            Err((ErrorCode::NOT_COORDINATOR, format!("{topic}/{index} moved to another broker")))
        }
        code => Err((code, format!("writing to {topic}/{index} failed: {}", code.name()))),
    }
}
