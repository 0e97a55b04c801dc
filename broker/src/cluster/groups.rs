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
//!
//! TxnOffsetCommit is served like OffsetCommit, but its records are appended as one
//! transactional batch of the request's producer: the partition's leader refuses it
//! (INVALID_TXN_STATE) unless the transaction coordinator added this offsets partition to the
//! producer's transaction (AddOffsetsToTxn, [`offsets_partition_for`]), or (PRODUCER_FENCED)
//! for an old epoch; those codes reach the client unchanged. The offsets take effect at the
//! producer's commit marker; until it comes (or an abort marker) OffsetFetch of those
//! partitions answers UNSTABLE_OFFSET_COMMIT.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use skein_client::wire::{
    DeleteGroupResponse, DescribeGroupResponse, ErrorCode, FindCoordinatorRequest, FindCoordinatorResponse,
    GroupHeartbeatResponse, ListGroupsResponse, ListedGroup, OffsetCommitResponse, OffsetFetchResponse,
    TxnOffsetCommitResponse,
};

use super::control::TopicMap;
use super::internal;
use super::now;
use super::requests::ask;
use super::shard::{owner, Node};
use crate::core::group::{
    check_group_id, partition_for, GroupCoordinator, GroupRecord, LogMachine, Topology, OFFSETS_TOPIC,
};
use crate::core::NodeId;
use crate::core::{LeaderEpoch, Offset, PartitionId, ProducerEpoch, ProducerId};
use crate::meta::write_atomically;
use crate::service::{Request, Response};

/// How often a shard expires sessions and checks subscribed topics' sizes.
const EXPIRY_TICK_MS: u64 = 50;

/// Partition counts and replica racks for the assignors, from this shard's topic map.
struct Topo<'a> {
    map: &'a TopicMap,
    racks: &'a BTreeMap<NodeId, String>,
}

impl Topology for Topo<'_> {
    fn partitions(&self, topic: &str) -> Option<u32> {
        self.map.partitions(topic)
    }

    fn racks(&self, topic: &str, partition: u32) -> Vec<String> {
        self.map
            .replicas(topic, partition)
            .iter()
            .filter_map(|n| self.racks.get(n))
            .filter(|r| !r.is_empty())
            .cloned()
            .collect()
    }
}

/// The group state of one offsets partition on this broker (leader or follower).
pub(crate) struct Loaded {
    /// The leader epoch this replica leads at, sessions started (`None`: not leading).
    leading: Option<LeaderEpoch>,
    machine: GroupCoordinator,
    /// Records applied since the last snapshot.
    since_snapshot: u64,
}

/// This shard's coordinator state, by internal-topic partition.
pub(crate) type Coordinators = internal::Slots<Loaded>;

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
        Request::TxnOffsetCommit(r) => &r.group,
        Request::OffsetFetch(r) => &r.group,
        Request::DescribeGroup(r) => &r.group,
        Request::DeleteGroup(r) => &r.group,
        _ => return None,
    })
}

/// The offsets partition (index and id) of the request's group.
fn group_partition(node: &Node, req: &Request) -> Option<(u32, PartitionId)> {
    offsets_partition_for(node, group_of(req)?)
}

/// The `__consumer_offsets` partition (index and id) holding `group`; `None` while the topic
/// does not exist (see [`ensure_offsets_topic`]). The transaction driver adds it to a
/// transaction at AddOffsetsToTxn.
pub(super) fn offsets_partition_for(node: &Node, group: &str) -> Option<(u32, PartitionId)> {
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
        Request::TxnOffsetCommit(_) => {
            Response::TxnOffsetCommit(TxnOffsetCommitResponse { error, message, partitions: Vec::new() })
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

/// Brings the slot of `pid` up to this replica's high watermark: restored from the snapshot
/// file when it was empty, then fed the committed records after it. `Ok(false)`: no replica
/// of `pid` here (the slot is emptied).
async fn catch_up(node: &Node, pid: PartitionId, slot: &mut Option<Loaded>) -> Result<bool, (ErrorCode, String)> {
    let Some(log_end) = node.st.borrow().core.replica(pid).map(|r| r.log().log_end_offset()) else {
        *slot = None;
        return Ok(false);
    };
    if slot.is_none() {
        *slot = Some(restore(node, pid, log_end).await);
    }
    let loaded = slot.as_mut().expect("filled above");
    let fed = match internal::feed_committed(node, pid, OFFSETS_TOPIC, &mut loaded.machine) {
        Err((ErrorCode::STORAGE_ERROR, m)) if loaded.machine.applied() > Offset(0) => {
            tracing::warn!(partition = %pid, m, "rebuilding the group state from the log start");
            loaded.machine = GroupCoordinator::new(node.config.group_heartbeat_ms);
            loaded.leading = None;
            internal::feed_committed(node, pid, OFFSETS_TOPIC, &mut loaded.machine)?
        }
        r => r?,
    };
    let Some(read) = fed else { return Ok(false) };
    loaded.since_snapshot += read;
    if loaded.since_snapshot >= node.config.group_snapshot_records {
        loaded.since_snapshot = 0;
        save_snapshot(node, pid, &loaded.machine);
    }
    Ok(true)
}

const SNAPSHOT_FILE: &str = "groups.snapshot";
const SNAPSHOT_MAGIC: &[u8; 8] = b"SKGRPS1\n";

fn partition_dir(node: &Node, pid: PartitionId) -> PathBuf {
    node.config.data_dir.join("partitions").join(pid.0.to_string())
}

/// Writes the machine's snapshot (magic, crc32c, JSON) on the blocking pool: a cache of the
/// log, so a failure is only logged.
fn save_snapshot(node: &Node, pid: PartitionId, machine: &GroupCoordinator) {
    let json = machine.snapshot();
    let mut bytes = Vec::with_capacity(json.len() + 12);
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    bytes.extend_from_slice(&json);
    let dir = partition_dir(node, pid);
    let applied = machine.applied();
    compio::runtime::spawn_blocking(move || match write_atomically(&dir, SNAPSHOT_FILE, &bytes) {
        Ok(()) => tracing::debug!(partition = %pid, %applied, bytes = bytes.len(), "group state snapshot written"),
        Err(e) => tracing::warn!(partition = %pid, error = %e, "writing the group state snapshot failed"),
    })
    .detach();
}

/// The state of `pid` from its snapshot file (read on the blocking pool), or an empty one when
/// there is none, it is damaged, or it is past this replica's log end.
async fn restore(node: &Node, pid: PartitionId, log_end: Offset) -> Loaded {
    let path = partition_dir(node, pid).join(SNAPSHOT_FILE);
    let interval = node.config.group_heartbeat_ms;
    let read = compio::runtime::spawn_blocking(move || std::fs::read(&path)).await;
    let empty = || Loaded { leading: None, machine: GroupCoordinator::new(interval), since_snapshot: 0 };
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return empty(),
        Ok(Err(e)) => {
            tracing::warn!(partition = %pid, error = %e, "reading the group state snapshot failed; replaying the log");
            return empty();
        }
        Err(_) => return empty(),
    };
    let parsed = (bytes.len() >= 12 && &bytes[..8] == SNAPSHOT_MAGIC)
        .then(|| (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")), &bytes[12..]))
        .filter(|(crc, json)| crc32c::crc32c(json) == *crc)
        .map(|(_, json)| GroupCoordinator::restore(json, interval));
    match parsed {
        Some(Ok(machine)) if machine.applied() <= log_end => {
            tracing::info!(partition = %pid, offset = %machine.applied(), "group state restored from its snapshot");
            Loaded { leading: None, machine, since_snapshot: 0 }
        }
        Some(Ok(machine)) => {
            tracing::warn!(partition = %pid, offset = %machine.applied(), %log_end, "group state snapshot is past the log end; replaying the log");
            empty()
        }
        Some(Err(e)) => {
            tracing::warn!(partition = %pid, error = %e, "group state snapshot does not decode; replaying the log");
            empty()
        }
        None => {
            tracing::warn!(partition = %pid, "group state snapshot is damaged; replaying the log");
            empty()
        }
    }
}

/// The slot of `pid`, caught up, leading at the current epoch (sessions started on a new
/// leadership); a refusal when this broker does not coordinate it or is still catching up.
async fn lead(
    node: &Node,
    pid: PartitionId,
    index: u32,
    slot: &mut Option<Loaded>,
) -> Result<LeaderEpoch, (ErrorCode, String)> {
    let not_here = || (ErrorCode::NOT_COORDINATOR, format!("this broker does not lead {OFFSETS_TOPIC}/{index}"));
    let epoch = internal::coordinating(node, pid, OFFSETS_TOPIC, index).inspect_err(|_| {
        if let Some(l) = slot.as_mut() {
            l.leading = None;
        }
    })?;
    if !catch_up(node, pid, slot).await? {
        return Err(not_here());
    }
    let loaded = slot.as_mut().expect("caught up");
    if loaded.leading != Some(epoch) {
        loaded.machine.start_sessions(now());
        loaded.leading = Some(epoch);
        tracing::info!(partition = index, epoch = epoch.0, applied = %loaded.machine.applied(), groups = loaded.machine.list().len(), "coordinating the groups of this offsets partition");
    }
    Ok(epoch)
}

/// Runs one group request on the coordinator of offsets partition `pid`.
async fn serve(node: &Rc<Node>, index: u32, pid: PartitionId, req: Request) -> Response {
    let slot = node.groups.slot(pid);
    let mut guard = slot.lock().await;
    let epoch = match lead(node, pid, index, &mut guard).await {
        Ok(e) => e,
        Err((code, message)) => return refusal(&req, code, message),
    };
    let loaded = guard.as_mut().expect("led above");
    let topics = node.topics.load();
    let sizes = Topo { map: &topics, racks: &node.racks };
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
        Request::TxnOffsetCommit(r) => loaded.machine.txn_commit(r).map(|out| {
            let reply =
                TxnOffsetCommitResponse { error: ErrorCode::NONE, message: String::new(), partitions: out.reply };
            (out.records, Response::TxnOffsetCommit(reply))
        }),
        Request::DeleteGroup(r) => loaded.machine.delete(&r.group).map(|out| {
            let reply = DeleteGroupResponse { error: ErrorCode::NONE, message: String::new() };
            (out.records, Response::DeleteGroup(reply))
        }),
        Request::OffsetFetch(r) => {
            return match loaded.machine.fetch_offsets_stable(&r.group, r.partitions.as_deref()) {
                Ok(offsets) => Response::OffsetFetch(OffsetFetchResponse {
                    error: ErrorCode::NONE,
                    message: String::new(),
                    offsets,
                }),
                Err((code, message)) => refusal(&req, code, message),
            };
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
    drop(topics);
    let (records, reply) = match written {
        Ok(x) => x,
        Err((code, message)) => return refusal(&req, code, message),
    };
    let txn = match &req {
        Request::TxnOffsetCommit(r) => Some((ProducerId(r.producer_id), ProducerEpoch(r.producer_epoch))),
        _ => None,
    };
    match commit(node, index, pid, epoch, &records, txn, &mut guard).await {
        Ok(()) => reply,
        Err((code, message)) => refusal(&req, code, message),
    }
}

/// Appends `records` (acks=all; with `txn`, as one transactional batch of that producer)
/// and applies them from the log, as every replica does; on a failure the state is dropped
/// (whether the records will commit is unknown) and rebuilt from the log at the next request,
/// except after a transactional batch the leader refused before appending it.
async fn commit(
    node: &Rc<Node>,
    index: u32,
    pid: PartitionId,
    epoch: LeaderEpoch,
    records: &[GroupRecord],
    txn: Option<(ProducerId, ProducerEpoch)>,
    slot: &mut Option<Loaded>,
) -> Result<(), (ErrorCode, String)> {
    if records.is_empty() {
        return Ok(());
    }
    let result = match write(node, index, epoch, records, txn).await {
        Ok(end) => match catch_up(node, pid, slot).await {
            Ok(true) if slot.as_ref().is_some_and(|l| l.machine.applied() >= end) => return Ok(()),
            Ok(_) => Err((ErrorCode::NOT_COORDINATOR, format!("{OFFSETS_TOPIC}/{index} moved to another broker"))),
            Err(e) => Err(e),
        },
        // The leader checks the producer's transaction before it appends: nothing was written.
        Err(e) if txn.is_some() && matches!(e.0, ErrorCode::INVALID_TXN_STATE | ErrorCode::PRODUCER_FENCED) => {
            return Err(e)
        }
        Err(e) => Err(e),
    };
    *slot = None;
    result
}

/// Appends `records` to offsets partition `index` at `epoch` with acks=all (inside `txn`'s
/// transaction when given); the offset after them.
async fn write(
    node: &Rc<Node>,
    index: u32,
    epoch: LeaderEpoch,
    records: &[GroupRecord],
    txn: Option<(ProducerId, ProducerEpoch)>,
) -> Result<Offset, (ErrorCode, String)> {
    let records: Vec<(Vec<u8>, Vec<u8>)> = records.iter().map(GroupRecord::encode).collect();
    internal::append(node, OFFSETS_TOPIC, index, epoch, &records, txn).await
}

/// FindCoordinator: creates the offsets topic on first use, then names the leader of the
/// group's partition.
async fn find_coordinator(node: &Rc<Node>, r: FindCoordinatorRequest) -> FindCoordinatorResponse {
    internal::find_coordinator(node, OFFSETS_TOPIC, node.config.offsets_partitions, &r.group, check_group_id(&r.group))
        .await
}

/// Creates `__consumer_offsets` if this shard's topic map does not have it; `Ok` once the map
/// has it, COORDINATOR_LOAD_IN_PROGRESS (retriable) while the creation has not reached this
/// shard, or the controller's refusal.
pub(super) async fn ensure_offsets_topic(node: &Rc<Node>) -> Result<(), (ErrorCode, String)> {
    internal::ensure_topic(node, OFFSETS_TOPIC, node.config.offsets_partitions).await
}

/// The groups of the offsets partitions this shard leads (each loaded if it was not).
async fn list_here(node: &Rc<Node>) -> Response {
    let mut groups: Vec<ListedGroup> = Vec::new();
    for (index, pid) in internal::led(node, OFFSETS_TOPIC) {
        if let Response::ListGroups(r) = serve(node, index, pid, Request::ListGroups).await {
            groups.extend(r.groups);
        }
    }
    Response::ListGroups(ListGroupsResponse { groups })
}

/// On every offsets partition this shard hosts: applies newly committed records (leaders and
/// followers alike, so a new leader starts warm, and each writes its own snapshots), and on
/// the ones it leads expires sessions and follows topic sizes.
pub(super) async fn expiry_loop(node: Rc<Node>) {
    loop {
        compio::time::sleep(Duration::from_millis(EXPIRY_TICK_MS)).await;
        if node.stopping.get() {
            return;
        }
        let hosted = internal::hosted(&node, OFFSETS_TOPIC);
        node.groups.retain(&hosted);
        for (index, pid) in hosted {
            let slot = node.groups.slot(pid);
            let Some(mut guard) = slot.try_lock() else { continue };
            if internal::leading_epoch(&node, pid).is_none() {
                if let Some(l) = guard.as_mut() {
                    l.leading = None;
                }
                if let Err((code, message)) = catch_up(&node, pid, &mut guard).await {
                    tracing::warn!(partition = index, code = code.name(), message, "applying group records failed");
                    *guard = None;
                }
                continue;
            }
            let Ok(epoch) = lead(&node, pid, index, &mut guard).await else { continue };
            let Some(loaded) = guard.as_mut() else { continue };
            let t = now();
            let topics = node.topics.load();
            let sizes = Topo { map: &topics, racks: &node.racks };
            let mut records = loaded.machine.expire(t, &sizes);
            if !records.is_empty() {
                for (group, member) in loaded.machine.expired(t) {
                    tracing::info!(group, member, "group member's session expired; it leaves the group");
                }
            } else {
                records = loaded.machine.refresh(&sizes);
            }
            drop(topics);
            if let Err((code, message)) = commit(&node, index, pid, epoch, &records, None, &mut guard).await {
                tracing::warn!(partition = index, code = code.name(), message, "group expiry write failed");
            }
        }
    }
}
