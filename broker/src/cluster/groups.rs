//! Consumer group coordinators on a broker's shards: the driver of `core::group`.
//!
//! A group lives in partition `partition_for(group)` of the internal `__consumer_offsets`
//! topic (created by the first FindCoordinator, replicated like any topic); the broker that
//! leads that partition coordinates the group, on the shard that owns the partition. There a
//! [`GroupCoordinator`] is rebuilt from the partition's committed records when the shard
//! first serves a request for it at a leader epoch (a new leader, after a failover or a
//! restart, replays the log), requests of one partition run one at a time (an async mutex per
//! partition, never a thread lock), and every change is appended with `acks=all` through the
//! ordinary produce path before it is applied and answered. A failed append drops the
//! machine: the next request rebuilds it from what the log committed. A loop per shard
//! expires members whose session ended and starts a new epoch when a subscribed topic's
//! partition count changes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::lock::Mutex;
use skein_client::wire::{
    CreateTopicsRequest, DeleteGroupResponse, DescribeGroupResponse, ErrorCode, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupHeartbeatResponse, ListGroupsResponse, ListedGroup, MetadataRequest, NewTopic,
    OffsetCommitResponse, OffsetFetchResponse, ProducePartition, ProduceRequest, TopicConfig,
};
use skein_log::batch::{batches, BatchBuilder};

use super::now;
use super::requests::ask;
use super::shard::{owner, Node};
use crate::core::group::{check_group_id, partition_for, GroupCoordinator, GroupRecord, LogMachine, OFFSETS_TOPIC};
use crate::core::{LeaderEpoch, Offset, PartitionId, ProduceError, ReadFailure};
use crate::service::{Request, Response};

/// How often a shard expires sessions and checks subscribed topics' sizes.
const EXPIRY_TICK_MS: u64 = 50;
/// Bound on one internal append.
const WRITE_TIMEOUT_MS: u32 = 10_000;

/// A coordinator rebuilt at a leader epoch.
struct Loaded {
    epoch: LeaderEpoch,
    machine: GroupCoordinator,
}

type Slot = Rc<Mutex<Option<Loaded>>>;

/// This shard's coordinators, by offsets partition.
#[derive(Default)]
pub(crate) struct Coordinators {
    slots: RefCell<HashMap<PartitionId, Slot>>,
}

impl Coordinators {
    fn slot(&self, p: PartitionId) -> Slot {
        self.slots.borrow_mut().entry(p).or_default().clone()
    }
}

/// A group request on the shard it arrived on.
pub(super) async fn dispatch(node: Rc<Node>, req: Request) -> Response {
    match req {
        Request::FindCoordinator(r) => Response::FindCoordinator(find_coordinator(&node, r).await),
        Request::ListGroups => {
            let mut groups = Vec::new();
            for shard in 0..node.shard_count() {
                let answer = if shard == node.shard {
                    list_here(&node).await
                } else {
                    ask(&node, shard, Request::ListGroups).await
                };
                if let Response::ListGroups(r) = answer {
                    groups.extend(r.groups);
                }
            }
            groups.sort_by(|a, b| a.group.cmp(&b.group));
            Response::ListGroups(ListGroupsResponse { groups })
        }
        req => {
            let Some((_, pid)) = group_partition(&node, &req) else {
                return refusal(&req, ErrorCode::NOT_COORDINATOR, "find the group's coordinator first".into());
            };
            let shard = owner(pid, node.shard_count());
            if shard == node.shard {
                here(node, req).await
            } else {
                ask(&node, shard, req).await
            }
        }
    }
}

/// A group request for a partition this shard owns.
pub(super) async fn here(node: Rc<Node>, req: Request) -> Response {
    if matches!(req, Request::ListGroups) {
        return list_here(&node).await;
    }
    match group_partition(&node, &req) {
        Some((index, pid)) => serve(&node, index, pid, req).await,
        None => refusal(&req, ErrorCode::NOT_COORDINATOR, "find the group's coordinator first".into()),
    }
}

/// The group a request names.
fn group_of(req: &Request) -> Option<&str> {
    Some(match req {
        Request::GroupHeartbeat(r) => &r.group,
        Request::OffsetCommit(r) => &r.group,
        Request::OffsetFetch(r) => &r.group,
        Request::DescribeGroup(r) => &r.group,
        Request::DeleteGroup(r) => &r.group,
        _ => return None,
    })
}

/// The offsets partition (index and id) of the request's group.
fn group_partition(node: &Node, req: &Request) -> Option<(u32, PartitionId)> {
    let group = group_of(req)?;
    let topics = node.topics.load();
    let index = partition_for(group, topics.partitions(OFFSETS_TOPIC)?);
    Some((index, topics.partition(OFFSETS_TOPIC, index)?))
}

/// The answer to `req` carrying only an error.
fn refusal(req: &Request, error: ErrorCode, message: String) -> Response {
    match req {
        Request::GroupHeartbeat(_) => Response::GroupHeartbeat(GroupHeartbeatResponse {
            error,
            message,
            member_id: String::new(),
            member_epoch: -1,
            heartbeat_interval_ms: 0,
            assignment: Vec::new(),
        }),
        Request::OffsetCommit(_) => {
            Response::OffsetCommit(OffsetCommitResponse { error, message, partitions: Vec::new() })
        }
        Request::OffsetFetch(_) => Response::OffsetFetch(OffsetFetchResponse { error, message, offsets: Vec::new() }),
        Request::DescribeGroup(r) => Response::DescribeGroup(DescribeGroupResponse {
            error,
            message,
            group: r.group.clone(),
            state: String::new(),
            generation: 0,
            protocol: String::new(),
            members: Vec::new(),
            offsets: Vec::new(),
        }),
        Request::DeleteGroup(_) => Response::DeleteGroup(DeleteGroupResponse { error, message }),
        _ => Response::Error(error),
    }
}

/// The epoch this shard leads `pid` at, with a valid lease.
fn leading_epoch(node: &Node, pid: PartitionId) -> Option<LeaderEpoch> {
    let st = node.st.borrow();
    if !st.core.lease_valid(now()) {
        return None;
    }
    st.core.replica(pid)?.leader_epoch()
}

/// Runs one group request on the coordinator of offsets partition `pid`.
async fn serve(node: &Rc<Node>, index: u32, pid: PartitionId, req: Request) -> Response {
    let slot = node.groups.slot(pid);
    let mut guard = slot.lock().await;
    let Some(epoch) = leading_epoch(node, pid) else {
        *guard = None;
        return refusal(&req, ErrorCode::NOT_COORDINATOR, format!("this broker does not lead {OFFSETS_TOPIC}/{index}"));
    };
    if guard.as_ref().map(|l| l.epoch) != Some(epoch) {
        match load(node, index, pid, epoch) {
            Ok(l) => *guard = Some(l),
            Err((code, message)) => {
                *guard = None;
                return refusal(&req, code, message);
            }
        }
    }
    let loaded = guard.as_mut().expect("loaded above");
    let topics = node.topics.load();
    let sizes = |t: &str| topics.partitions(t);
    let t = now();
    let written = match &req {
        Request::GroupHeartbeat(r) => match loaded.machine.heartbeat(t, r, &sizes) {
            Ok(out) => Ok((out.records, Response::GroupHeartbeat(out.reply))),
            Err(e) => Err(e),
        },
        Request::OffsetCommit(r) => loaded.machine.commit(r).map(|out| {
            let reply = OffsetCommitResponse { error: ErrorCode::NONE, message: String::new(), partitions: out.reply };
            (out.records, Response::OffsetCommit(reply))
        }),
        Request::DeleteGroup(r) => loaded.machine.delete(&r.group).map(|out| {
            let reply = DeleteGroupResponse { error: ErrorCode::NONE, message: String::new() };
            (out.records, Response::DeleteGroup(reply))
        }),
        Request::OffsetFetch(r) => {
            let offsets = match check_group_id(&r.group) {
                Ok(()) => loaded.machine.fetch_offsets(&r.group, r.partitions.as_deref()),
                Err((code, message)) => return refusal(&req, code, message),
            };
            return Response::OffsetFetch(OffsetFetchResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                offsets,
            });
        }
        Request::DescribeGroup(r) => {
            return match loaded.machine.describe(&r.group) {
                Ok(d) => Response::DescribeGroup(d),
                Err((code, message)) => refusal(&req, code, message),
            };
        }
        Request::ListGroups => {
            return Response::ListGroups(ListGroupsResponse { groups: loaded.machine.list() });
        }
        _ => return Response::Error(ErrorCode::INVALID_REQUEST),
    };
    let (records, reply) = match written {
        Ok(x) => x,
        Err((code, message)) => return refusal(&req, code, message),
    };
    match write(node, index, epoch, &records).await {
        Ok(()) => {
            for r in records {
                loaded.machine.apply_record(r);
            }
            reply
        }
        Err((code, message)) => {
            // Whether the records will commit is unknown: rebuild from the log next time.
            *guard = None;
            refusal(&req, code, message)
        }
    }
}

/// Appends `records` to offsets partition `index` at `epoch` with acks=all.
async fn write(
    node: &Rc<Node>,
    index: u32,
    epoch: LeaderEpoch,
    records: &[GroupRecord],
) -> Result<(), (ErrorCode, String)> {
    if records.is_empty() {
        return Ok(());
    }
    let mut b = BatchBuilder::new();
    let stamp = skein_log::types::Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
    );
    for r in records {
        let (key, value) = r.encode();
        b.push(Some(&key), &value, &[], stamp);
    }
    let bytes = b.build().into_bytes();
    let req = ProduceRequest {
        acks: -1,
        timeout_ms: WRITE_TIMEOUT_MS,
        partitions: vec![ProducePartition {
            topic: OFFSETS_TOPIC.into(),
            partition: index,
            leader_epoch: epoch.0,
            records: BytesMut::from(&bytes[..]),
        }],
    };
    let error = match node.produce_here(req).await {
        Response::Produce(r) => r.partitions.first().map_or(ErrorCode::UNKNOWN, |p| p.error),
        Response::Error(code) => code,
        _ => ErrorCode::UNKNOWN,
    };
    match error {
        ErrorCode::NONE => Ok(()),
        ErrorCode::NOT_LEADER | ErrorCode::FENCED_LEADER_EPOCH | ErrorCode::UNKNOWN_TOPIC_OR_PARTITION => {
            Err((ErrorCode::NOT_COORDINATOR, format!("{OFFSETS_TOPIC}/{index} moved to another broker")))
        }
        code => Err((code, format!("writing to {OFFSETS_TOPIC}/{index} failed: {}", code.name()))),
    }
}

/// Rebuilds the coordinator of `pid` from its committed records.
fn load(node: &Node, index: u32, pid: PartitionId, epoch: LeaderEpoch) -> Result<Loaded, (ErrorCode, String)> {
    let started = Instant::now();
    let mut machine = GroupCoordinator::new(node.config.group_heartbeat_ms);
    let st = node.st.borrow();
    let replica = st.core.replica(pid).ok_or((ErrorCode::NOT_COORDINATOR, "no replica here".to_string()))?;
    let mut from = replica.log().log_start_offset();
    let (mut records, mut skipped) = (0u64, 0u64);
    loop {
        let (bytes, hw) = match st.core.read_committed(now(), pid, from, 1 << 20) {
            Ok(x) => x,
            Err(ReadFailure::Refused(ProduceError::LeaderNotReady)) => {
                return Err((ErrorCode::COORDINATOR_LOAD_IN_PROGRESS, "the new leader is catching up".into()))
            }
            Err(ReadFailure::Storage(e)) => crate::service::fail_stop("reading the offsets topic", &e),
            Err(e) => return Err((ErrorCode::NOT_COORDINATOR, format!("reading {OFFSETS_TOPIC}/{index}: {e:?}"))),
        };
        if from >= hw {
            break;
        }
        let mut progressed = false;
        for batch in batches(&bytes) {
            let batch = batch.map_err(|e| (ErrorCode::STORAGE_ERROR, format!("{OFFSETS_TOPIC}/{index}: {e}")))?;
            let base = batch.header().base_offset.get();
            for r in batch.records().iter() {
                let offset = Offset(base + u64::from(r.offset_delta.to_native()));
                if offset < from {
                    continue;
                }
                let key = r.key.as_ref().map_or(&[][..], |k| k.as_slice());
                match machine.apply(offset, key, r.value.as_slice()) {
                    Ok(()) => records += 1,
                    Err(e) => {
                        skipped += 1;
                        tracing::warn!(partition = index, error = %e, "skipping a group record that does not decode");
                    }
                }
            }
            from = batch.header().next_offset();
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    drop(st);
    machine.start_sessions(now());
    tracing::info!(
        partition = index,
        epoch = epoch.0,
        records,
        skipped,
        groups = machine.list().len(),
        ms = started.elapsed().as_millis() as u64,
        "group coordinator loaded"
    );
    Ok(Loaded { epoch, machine })
}

/// FindCoordinator: creates the offsets topic on first use, then names the leader of the
/// group's partition.
async fn find_coordinator(node: &Rc<Node>, r: FindCoordinatorRequest) -> FindCoordinatorResponse {
    let fail =
        |error, message: String| FindCoordinatorResponse { error, message, node_id: 0, host: String::new(), port: 0 };
    if let Err((code, message)) = check_group_id(&r.group) {
        return fail(code, message);
    }
    if node.topics.load().partitions(OFFSETS_TOPIC).is_none() {
        let replicas = node.voters.len().min(3) as u16;
        let create = CreateTopicsRequest {
            topics: vec![NewTopic {
                name: OFFSETS_TOPIC.into(),
                partitions: node.config.offsets_partitions,
                replicas,
                // Kept forever: there is no compaction yet, and a commit must not age out.
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
                return fail(t.error, format!("creating {OFFSETS_TOPIC}: {}", t.message));
            }
        }
    }
    let Some(count) = node.topics.load().partitions(OFFSETS_TOPIC) else {
        return fail(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS, format!("{OFFSETS_TOPIC} is being created"));
    };
    let index = partition_for(&r.group, count);
    let meta = control(node, Request::Metadata(MetadataRequest { topics: Some(vec![OFFSETS_TOPIC.into()]) })).await;
    let Response::Metadata(meta) = meta else {
        return fail(ErrorCode::NOT_COORDINATOR, "no metadata".into());
    };
    let leader = meta
        .topics
        .iter()
        .flat_map(|t| &t.partitions)
        .find(|p| p.partition == index && p.error == ErrorCode::NONE)
        .map(|p| p.leader);
    match leader.and_then(|l| meta.brokers.iter().find(|b| b.node_id == l)) {
        Some(b) => FindCoordinatorResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            node_id: b.node_id,
            host: b.host.clone(),
            port: b.port,
        },
        None => fail(ErrorCode::NOT_COORDINATOR, format!("{OFFSETS_TOPIC}/{index} has no leader now")),
    }
}

/// A control request on shard 0.
async fn control(node: &Rc<Node>, req: Request) -> Response {
    if node.shard == 0 {
        node.clone().control_request(req).await
    } else {
        ask(node, 0, req).await
    }
}

/// The groups of the offsets partitions this shard leads (each loaded if it was not).
async fn list_here(node: &Rc<Node>) -> Response {
    let Some(count) = node.topics.load().partitions(OFFSETS_TOPIC) else {
        return Response::ListGroups(ListGroupsResponse { groups: Vec::new() });
    };
    let mut groups: Vec<ListedGroup> = Vec::new();
    for index in 0..count {
        let Some(pid) = node.topics.load().partition(OFFSETS_TOPIC, index) else { continue };
        if owner(pid, node.shard_count()) != node.shard || leading_epoch(node, pid).is_none() {
            continue;
        }
        if let Response::ListGroups(r) = serve(node, index, pid, Request::ListGroups).await {
            groups.extend(r.groups);
        }
    }
    Response::ListGroups(ListGroupsResponse { groups })
}

/// Expires sessions and follows topic sizes on this shard's loaded coordinators.
pub(super) async fn expiry_loop(node: Rc<Node>) {
    loop {
        compio::time::sleep(Duration::from_millis(EXPIRY_TICK_MS)).await;
        if node.stopping.get() {
            return;
        }
        let slots: Vec<(PartitionId, Slot)> = node.groups.slots.borrow().iter().map(|(p, s)| (*p, s.clone())).collect();
        for (pid, slot) in slots {
            let Some(mut guard) = slot.try_lock() else { continue };
            let Some(loaded) = guard.as_mut() else { continue };
            let Some(epoch) = leading_epoch(&node, pid).filter(|e| *e == loaded.epoch) else {
                *guard = None;
                continue;
            };
            let t = now();
            let topics = node.topics.load();
            let sizes = |t: &str| topics.partitions(t);
            let mut records = loaded.machine.expire(t, &sizes);
            if !records.is_empty() {
                for (group, member) in loaded.machine.expired(t) {
                    tracing::info!(group, member, "group member's session expired; it leaves the group");
                }
            } else {
                records = loaded.machine.refresh(&sizes);
            }
            if records.is_empty() {
                continue;
            }
            let Some(index) = (0..topics.partitions(OFFSETS_TOPIC).unwrap_or(0))
                .find(|i| topics.partition(OFFSETS_TOPIC, *i) == Some(pid))
            else {
                continue;
            };
            drop(topics);
            match write(&node, index, epoch, &records).await {
                Ok(()) => {
                    for r in records {
                        loaded.machine.apply_record(r);
                    }
                }
                Err((code, message)) => {
                    tracing::warn!(partition = index, code = code.name(), message, "group expiry write failed");
                    *guard = None;
                }
            }
        }
    }
}
