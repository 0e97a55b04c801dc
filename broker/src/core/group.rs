//! The consumer group coordinator: a state machine fed by the committed records of one
//! `__consumer_offsets` partition (the first [`LogMachine`]; transactions and tables follow
//! the same shape).
//!
//! Call protocol (one coordinator partition, on the shard that leads it):
//! 1. On becoming leader: a new [`GroupCoordinator`], then [`LogMachine::apply`] for every
//!    committed record from the log start (or from a snapshot's offset) to the high watermark.
//! 2. Each request (`heartbeat`, `commit`, `delete`) computes, without changing the machine,
//!    the records that say what changes and the answer to give once they are committed. The
//!    driver appends the records (`acks=all`) and, once they are committed, applies them with
//!    [`LogMachine::apply`] and sends the answer; if the append fails the machine is dropped
//!    and rebuilt from the log. Requests of one partition run one at a time, so each sees the
//!    state its predecessors committed. Reads (`fetch_offsets`, `describe`, `list`) change
//!    nothing.
//! 3. [`GroupCoordinator::expire`] on a timer: members whose session timed out leave.
//!
//! Liveness (when each member was last heard from) is not in the log: a new coordinator gives
//! every member a full session from the moment it loaded.
//!
//! Transactional offset commits (Kafka's KIP-98 and KIP-447): [`GroupCoordinator::txn_commit`]
//! validates like a plain commit; the driver writes its `Offset` records as one transactional
//! batch of the producer, which the machine keeps pending per producer, invisible, until that
//! producer's commit marker (then they become committed offsets) or abort marker (dropped).
//! While an offset of a partition is pending, [`GroupCoordinator::fetch_offsets_stable`]
//! answers `UNSTABLE_OFFSET_COMMIT`, so a consumer never starts from an offset a transaction
//! is about to change. A pending offset superseded by a later-written committed offset of the
//! same partition is dropped at once: it could never take effect (Kafka compares the records'
//! log offsets when the marker comes; dropping early gives the same result and ends the
//! instability sooner).
//!
//! Assignment is server-side (Kafka's KIP-848): the group epoch is bumped by every membership
//! or subscription change and a target assignment computed for it; each member converges to
//! its target at its own heartbeats. A partition moves only once its current owner has
//! acknowledged revoking it, so no partition is ever owned by two members, and partitions that
//! do not move are never revoked (incremental rebalancing).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use skein_client::wire::{
    DescribeGroupResponse, ErrorCode, GroupHeartbeatRequest, GroupHeartbeatResponse, GroupMemberDescription,
    ListedGroup, OffsetCommitPartition, OffsetCommitPartitionResponse, OffsetCommitRequest, OffsetFetchPartition,
    TopicPartition, TxnOffsetCommitRequest, JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH,
};

use super::txn_partition::MarkerKind;
use super::{Offset, ProducerId, Time};

/// The internal topic holding groups and committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// The longest group id, instance id, client id or host accepted.
pub const NAME_BYTES_MAX: usize = 255;
/// The longest commit metadata accepted.
pub const METADATA_BYTES_MAX: usize = 4096;
/// Most topics in one subscription.
pub const SUBSCRIPTION_MAX: usize = 1000;
/// Session timeouts accepted (ms).
pub const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 1_000..=300_000;

pub use super::machine::{LogMachine, RecordError};

/// A group's epoch, or a member's (the generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Generation(pub i32);

/// A partition of a topic.
pub type Tp = (String, u32);

/// What the assignors know of the topics: partition counts and where replicas live.
pub trait Topology {
    /// The partition count of `topic` (`None`: no such topic).
    fn partitions(&self, topic: &str) -> Option<u32>;
    /// The racks of the brokers holding replicas of a partition (empty: unknown, or no
    /// racks): a member in one of them is preferred, as a follower read stays in its rack.
    fn racks(&self, _topic: &str, _partition: u32) -> Vec<String> {
        Vec::new()
    }
}

impl<F: Fn(&str) -> Option<u32>> Topology for F {
    fn partitions(&self, topic: &str) -> Option<u32> {
        self(topic)
    }
}

pub use skein_client::wire::Assignor;

/// An assignor name from a heartbeat (`""`: none given; `None`: unknown).
fn parse_assignor(s: &str) -> Option<Option<Assignor>> {
    if s.is_empty() {
        return Some(None);
    }
    s.parse().ok().map(Some)
}

/// Group records name the assignor as on the wire (`range`, `roundrobin`, `sticky`).
mod assignor_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Assignor;

    pub fn serialize<S: Serializer>(a: &Assignor, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Assignor, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A member, as the log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Given by the coordinator at join.
    pub id: String,
    /// Static membership: the same instance id gets its partitions back.
    pub instance_id: String,
    /// For describe.
    pub client_id: String,
    /// For describe.
    pub host: String,
    /// Its rack (reserved for rack-aware assignment).
    pub rack: String,
    /// Subscribed topics, sorted.
    pub topics: Vec<String>,
    /// Its session timeout.
    pub session_timeout_ms: u32,
    /// Its epoch: the group epoch whose target it has converged to (revocations done).
    pub epoch: Generation,
    /// Its epoch before the last bump (a commit racing the bump is still accepted).
    pub previous_epoch: Generation,
    /// What it owns, as far as the coordinator knows (including partitions being revoked).
    pub assigned: BTreeSet<Tp>,
    /// Owned partitions it has been asked to give up, not acknowledged yet.
    pub revoking: BTreeSet<Tp>,
    /// What it should own at the group epoch.
    pub target: BTreeSet<Tp>,
    /// A static member that left for a restart: it keeps its partitions until its session
    /// times out or its instance joins again.
    pub away: bool,
}

/// A group, as the log records it (committed offsets are kept beside it).
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Bumped by every membership or subscription change.
    pub epoch: Generation,
    /// The assignor (the first member's choice; later members may change it).
    #[serde(with = "assignor_name")]
    pub assignor: Assignor,
    /// Members by id.
    pub members: BTreeMap<String, Member>,
    /// The next member number (member ids are unique for the group's life).
    pub next_member: u64,
    /// Partition counts of the subscribed topics the targets were computed for (a change,
    /// such as a topic created after its consumers joined, starts a new epoch).
    pub sizes: BTreeMap<String, u32>,
}

/// A committed offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The next offset the group reads.
    pub offset: u64,
    /// The committer's metadata.
    pub metadata: String,
}

/// One record of the offsets topic (JSON in the record's value; the key names the group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRecord {
    /// The whole membership state of a group after a change.
    Group {
        /// Group id.
        group: String,
        /// Its state.
        meta: GroupMeta,
    },
    /// A committed offset.
    Offset {
        /// Group id.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The offset and metadata.
        committed: Committed,
    },
    /// The group and its offsets are gone.
    GroupDeleted {
        /// Group id.
        group: String,
    },
}

impl GroupRecord {
    /// The record's key (the group id) and value.
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        (self.group().as_bytes().to_vec(), serde_json::to_vec(self).expect("group records serialize"))
    }

    /// Decodes a record's value.
    pub fn decode(offset: Offset, value: &[u8]) -> Result<GroupRecord, RecordError> {
        serde_json::from_slice(value).map_err(|e| RecordError { offset: offset.0, reason: e.to_string() })
    }

    fn group(&self) -> &str {
        match self {
            GroupRecord::Group { group, .. }
            | GroupRecord::Offset { group, .. }
            | GroupRecord::GroupDeleted { group } => group,
        }
    }
}

/// A refusal: the code and a message for the user.
pub type Refusal = (ErrorCode, String);

/// Who commits offsets, as a commit request says.
struct Committer<'a> {
    group: &'a str,
    member_id: &'a str,
    member_epoch: i32,
}

/// What a request produced: records to commit, then the answer.
#[derive(Debug)]
pub struct Outcome<T> {
    /// Append these (acks=all), apply them once committed, then answer.
    pub records: Vec<GroupRecord>,
    /// The answer.
    pub reply: T,
}

/// Version 2 added `pending` (transactional offsets); version 1 snapshots (none pending)
/// still restore. A build that knows only version 1 refuses a version 2 snapshot and replays
/// the log instead of silently dropping pending offsets.
const SNAPSHOT_VERSION: u32 = 2;
const SNAPSHOT_VERSIONS_READ: [u32; 2] = [1, 2];

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    applied: u64,
    groups: Vec<SnapshotGroup>,
    #[serde(default)]
    pending: Vec<SnapshotPending>,
}

/// One pending transactional offset in a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotPending {
    producer: i64,
    group: String,
    topic: String,
    partition: u32,
    committed: Committed,
    /// The log offset of its record.
    at: u64,
}

#[derive(Serialize, Deserialize)]
struct SnapshotGroup {
    group: String,
    meta: GroupMeta,
    offsets: Vec<(String, u32, Committed)>,
}

#[derive(Clone, Debug, Default)]
struct Group {
    meta: GroupMeta,
    offsets: BTreeMap<Tp, Committed>,
}

/// An offset written inside a transaction, not decided yet.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    committed: Committed,
    /// The log offset of its record: a committed offset written later supersedes it.
    at: Offset,
}

/// One producer's pending offsets by (group, partition).
type PendingOffsets = BTreeMap<(String, Tp), Pending>;

/// The coordinator of the groups hashed to one offsets partition.
#[derive(Debug, Default)]
pub struct GroupCoordinator {
    groups: BTreeMap<String, Group>,
    /// Session deadlines by (group, member id): liveness, not in the log.
    deadlines: HashMap<(String, String), Time>,
    /// Transactional offsets by producer, until its commit or abort marker. Invariant: each
    /// was written after the committed offset of its partition (a later one drops it).
    pending: BTreeMap<ProducerId, PendingOffsets>,
    applied: Offset,
    /// The heartbeat interval members are told.
    heartbeat_interval_ms: u32,
}

impl LogMachine for GroupCoordinator {
    fn apply(&mut self, offset: Offset, _key: &[u8], value: &[u8]) -> Result<(), RecordError> {
        self.applied = Offset(offset.0 + 1);
        let record = GroupRecord::decode(offset, value)?;
        self.apply_record(offset, record);
        Ok(())
    }

    /// Only `Offset` records are written inside transactions (`txn_commit`); they stay
    /// pending until `producer`'s marker.
    fn apply_transactional(
        &mut self,
        offset: Offset,
        producer: ProducerId,
        _key: &[u8],
        value: &[u8],
    ) -> Result<(), RecordError> {
        self.applied = Offset(offset.0 + 1);
        let GroupRecord::Offset { group, topic, partition, committed } = GroupRecord::decode(offset, value)? else {
            return Err(RecordError {
                offset: offset.0,
                reason: "a group record other than an offset in a transaction".into(),
            });
        };
        let pending = Pending { committed, at: offset };
        self.pending.entry(producer).or_default().insert((group, (topic, partition)), pending);
        Ok(())
    }

    /// A commit marker makes `producer`'s pending offsets committed ones, an abort marker drops
    /// them; a begin marker changes nothing.
    fn apply_marker(&mut self, offset: Offset, producer: ProducerId, kind: MarkerKind) {
        self.applied = Offset(offset.0 + 1);
        match kind {
            MarkerKind::Begin => {}
            MarkerKind::Abort => {
                self.pending.remove(&producer);
            }
            MarkerKind::Commit => {
                for ((group, tp), p) in self.pending.remove(&producer).unwrap_or_default() {
                    self.apply_offset(group, tp, p.committed, p.at);
                }
            }
        }
    }

    fn applied(&self) -> Offset {
        self.applied
    }
}

/// The partition of the offsets topic a group lives in (FNV-1a of its id: stable across
/// builds and platforms).
pub fn partition_for(group: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in group.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// Checks a group id.
pub fn check_group_id(group: &str) -> Result<(), Refusal> {
    if group.is_empty() || group.len() > NAME_BYTES_MAX {
        return Err((ErrorCode::INVALID_GROUP_ID, format!("group ids are 1 to {NAME_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn tps(set: &BTreeSet<Tp>) -> Vec<TopicPartition> {
    set.iter().map(|(topic, partition)| TopicPartition { topic: topic.clone(), partition: *partition }).collect()
}

impl GroupCoordinator {
    /// An empty coordinator telling members to heartbeat every `heartbeat_interval_ms`.
    pub fn new(heartbeat_interval_ms: u32) -> GroupCoordinator {
        GroupCoordinator { heartbeat_interval_ms, ..GroupCoordinator::default() }
    }

    /// Applies the committed record at log offset `at` (the same path for replay and for live
    /// writes).
    pub fn apply_record(&mut self, at: Offset, record: GroupRecord) {
        let name = record.group().to_owned();
        match record {
            GroupRecord::Group { meta, .. } => {
                let g = self.groups.entry(name.clone()).or_default();
                self.deadlines.retain(|(gr, m), _| gr != &name || meta.members.contains_key(m));
                g.meta = meta;
            }
            GroupRecord::Offset { topic, partition, committed, .. } => {
                self.apply_offset(name, (topic, partition), committed, at);
            }
            GroupRecord::GroupDeleted { .. } => {
                self.groups.remove(&name);
                self.deadlines.retain(|(gr, _), _| gr != &name);
                // As Kafka does: a deleted group's transactional offsets go with it (`delete`
                // refuses while there are any, so this only matters for a log written otherwise).
                for offsets in self.pending.values_mut() {
                    offsets.retain(|(gr, _), _| gr != &name);
                }
                self.pending.retain(|_, offsets| !offsets.is_empty());
            }
        }
    }

    /// Makes `committed`, written at log offset `at`, the group's offset of `tp`, and drops the
    /// pending transactional offsets of `tp` written before it: they can never take effect.
    fn apply_offset(&mut self, group: String, tp: Tp, committed: Committed, at: Offset) {
        let key = (group, tp);
        for offsets in self.pending.values_mut() {
            if offsets.get(&key).is_some_and(|p| p.at < at) {
                offsets.remove(&key);
            }
        }
        self.pending.retain(|_, offsets| !offsets.is_empty());
        let (group, tp) = key;
        self.groups.entry(group).or_default().offsets.insert(tp, committed);
    }

    /// The machine's state at [`LogMachine::applied`], as bytes for a snapshot file (versioned
    /// JSON; the driver frames it with a checksum).
    pub fn snapshot(&self) -> Vec<u8> {
        let groups = self
            .groups
            .iter()
            .map(|(name, g)| SnapshotGroup {
                group: name.clone(),
                meta: g.meta.clone(),
                offsets: g.offsets.iter().map(|((t, p), c)| (t.clone(), *p, c.clone())).collect(),
            })
            .collect();
        let pending = self
            .pending
            .iter()
            .flat_map(|(producer, offsets)| {
                offsets.iter().map(|((group, (topic, partition)), p)| SnapshotPending {
                    producer: producer.0,
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    committed: p.committed.clone(),
                    at: p.at.0,
                })
            })
            .collect();
        let snap = Snapshot { version: SNAPSHOT_VERSION, applied: self.applied.0, groups, pending };
        serde_json::to_vec(&snap).expect("snapshots serialize")
    }

    /// A machine from [`GroupCoordinator::snapshot`]'s bytes; it continues at the snapshot's
    /// offset.
    pub fn restore(bytes: &[u8], heartbeat_interval_ms: u32) -> Result<GroupCoordinator, RecordError> {
        let snap: Snapshot =
            serde_json::from_slice(bytes).map_err(|e| RecordError { offset: 0, reason: e.to_string() })?;
        if !SNAPSHOT_VERSIONS_READ.contains(&snap.version) {
            return Err(RecordError { offset: snap.applied, reason: format!("snapshot version {}", snap.version) });
        }
        let groups = snap
            .groups
            .into_iter()
            .map(|g| {
                let offsets = g.offsets.into_iter().map(|(t, p, c)| ((t, p), c)).collect();
                (g.group, Group { meta: g.meta, offsets })
            })
            .collect();
        let mut pending: BTreeMap<ProducerId, PendingOffsets> = BTreeMap::new();
        for p in snap.pending {
            if p.at >= snap.applied {
                return Err(RecordError {
                    offset: p.at,
                    reason: "a pending offset at or past the snapshot's offset".into(),
                });
            }
            let key = (p.group, (p.topic, p.partition));
            pending
                .entry(ProducerId(p.producer))
                .or_default()
                .insert(key, Pending { committed: p.committed, at: Offset(p.at) });
        }
        Ok(GroupCoordinator {
            groups,
            deadlines: HashMap::new(),
            pending,
            applied: Offset(snap.applied),
            heartbeat_interval_ms,
        })
    }

    /// Gives every member a full session from `now` (after a load: liveness is not logged).
    pub fn start_sessions(&mut self, now: Time) {
        for (name, g) in &self.groups {
            for m in g.meta.members.values() {
                self.deadlines.insert((name.clone(), m.id.clone()), now.plus_ms(u64::from(m.session_timeout_ms)));
            }
        }
    }

    /// Group ids with their state and member count.
    pub fn list(&self) -> Vec<ListedGroup> {
        self.groups
            .iter()
            .map(|(name, g)| ListedGroup {
                group: name.clone(),
                state: state_name(&g.meta).into(),
                members: g.meta.members.len() as u32,
            })
            .collect()
    }

    /// OffsetFetch: [`GroupCoordinator::fetch_offsets`], refused with the retriable
    /// `UNSTABLE_OFFSET_COMMIT` while an undecided transaction holds an offset of one of
    /// `partitions` (`None`: of any partition of the group), as KIP-447's `require_stable`: a
    /// consumer must not start from an offset a transaction is about to change.
    pub fn fetch_offsets_stable(
        &self,
        group: &str,
        partitions: Option<&[TopicPartition]>,
    ) -> Result<Vec<OffsetFetchPartition>, Refusal> {
        check_group_id(group)?;
        if let Some(producer) = self.pending_producer(group, partitions) {
            return Err((
                ErrorCode::UNSTABLE_OFFSET_COMMIT,
                format!(
                    "offsets of group '{}' are in the open transaction of producer {}; retry once it ends",
                    shown(group),
                    producer.0
                ),
            ));
        }
        Ok(self.fetch_offsets(group, partitions))
    }

    /// A group's committed offsets (`None`: every one), -1 where none. Pending transactional
    /// offsets are not shown (answer OffsetFetch with
    /// [`GroupCoordinator::fetch_offsets_stable`]).
    pub fn fetch_offsets(&self, group: &str, partitions: Option<&[TopicPartition]>) -> Vec<OffsetFetchPartition> {
        let g = self.groups.get(group);
        let found = |topic: &str, partition: u32| g.and_then(|g| g.offsets.get(&(topic.to_owned(), partition)));
        match partitions {
            Some(ps) => ps
                .iter()
                .map(|p| {
                    let c = found(&p.topic, p.partition);
                    OffsetFetchPartition {
                        topic: p.topic.clone(),
                        partition: p.partition,
                        offset: c.map_or(-1, |c| c.offset as i64),
                        metadata: c.map(|c| c.metadata.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            None => g
                .map(|g| {
                    g.offsets
                        .iter()
                        .map(|((topic, partition), c)| OffsetFetchPartition {
                            topic: topic.clone(),
                            partition: *partition,
                            offset: c.offset as i64,
                            metadata: c.metadata.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Describes a group.
    pub fn describe(&self, group: &str) -> Result<DescribeGroupResponse, Refusal> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| (ErrorCode::GROUP_ID_NOT_FOUND, format!("group '{}' not found", shown(group))))?;
        Ok(DescribeGroupResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            group: group.to_owned(),
            state: state_name(&g.meta).into(),
            generation: g.meta.epoch.0,
            protocol: g.meta.assignor.name().into(),
            members: g
                .meta
                .members
                .values()
                .map(|m| GroupMemberDescription {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    member_epoch: m.epoch.0,
                    assignment: tps(&m.assigned),
                })
                .collect(),
            offsets: self.fetch_offsets(group, None),
        })
    }

    /// A heartbeat (join, stay, leave). `partitions` gives a topic's partition count (`None`:
    /// no such topic).
    pub fn heartbeat(
        &mut self,
        now: Time,
        req: &GroupHeartbeatRequest,
        partitions: &dyn Topology,
    ) -> Result<Outcome<GroupHeartbeatResponse>, Refusal> {
        check_group_id(&req.group)?;
        let assignor = parse_assignor(&req.assignor).ok_or_else(|| {
            (
                ErrorCode::UNSUPPORTED_ASSIGNOR,
                format!("assignor '{}' (range, roundrobin or sticky)", shown(&req.assignor)),
            )
        })?;
        for s in [&req.instance_id, &req.client_id, &req.host, &req.rack] {
            if s.len() > NAME_BYTES_MAX {
                return Err((ErrorCode::INVALID_REQUEST, format!("a member field over {NAME_BYTES_MAX} bytes")));
            }
        }
        if let Some(t) = &req.topics {
            if t.len() > SUBSCRIPTION_MAX || t.iter().any(|t| t.is_empty() || t.len() > NAME_BYTES_MAX) {
                return Err((
                    ErrorCode::INVALID_REQUEST,
                    format!("a subscription is 1 to {SUBSCRIPTION_MAX} topic names"),
                ));
            }
        }
        let old = self.groups.get(&req.group).map(|g| g.meta.clone());
        let mut meta = old.clone().unwrap_or_default();
        let mut bump = false;
        let id = match req.member_epoch {
            JOIN_EPOCH => {
                let Some(topics) = &req.topics else {
                    return Err((ErrorCode::INVALID_REQUEST, "a join names its topics".into()));
                };
                if !SESSION_TIMEOUT_MS.contains(&req.session_timeout_ms) {
                    return Err((
                        ErrorCode::INVALID_REQUEST,
                        format!("session timeout {} ms (allowed: {SESSION_TIMEOUT_MS:?})", req.session_timeout_ms),
                    ));
                }
                let mut topics = topics.clone();
                topics.sort();
                topics.dedup();
                meta.next_member += 1;
                let short: String = req.client_id.chars().take(64).collect();
                let new_id = format!("{short}-{}-{}", meta.epoch.0, meta.next_member);
                // A member id sent with epoch 0 is a member starting over: it leaves first.
                if !req.member_id.is_empty() && meta.members.remove(&req.member_id).is_some() {
                    bump = true;
                }
                let previous = (!req.instance_id.is_empty())
                    .then(|| meta.members.values().find(|m| m.instance_id == req.instance_id).map(|m| m.id.clone()))
                    .flatten()
                    .and_then(|old_id| meta.members.remove(&old_id));
                let member = match previous {
                    // The static member is back: same partitions, a new id (its old process
                    // is fenced), no rebalance unless its subscription changed.
                    Some(prev) => {
                        if prev.topics != topics {
                            bump = true;
                        }
                        Member { id: new_id.clone(), topics, away: false, ..prev }
                    }
                    None => {
                        bump = true;
                        Member {
                            id: new_id.clone(),
                            instance_id: req.instance_id.clone(),
                            client_id: req.client_id.clone(),
                            host: req.host.clone(),
                            rack: req.rack.clone(),
                            topics,
                            session_timeout_ms: req.session_timeout_ms,
                            epoch: Generation(0),
                            previous_epoch: Generation(0),
                            assigned: BTreeSet::new(),
                            revoking: BTreeSet::new(),
                            target: BTreeSet::new(),
                            away: false,
                        }
                    }
                };
                meta.members.insert(new_id.clone(), member);
                if let Some(a) = assignor {
                    if meta.members.len() == 1 || a != meta.assignor {
                        bump |= a != meta.assignor;
                        meta.assignor = a;
                    }
                }
                new_id
            }
            LEAVE_EPOCH | STATIC_LEAVE_EPOCH => {
                let Some(m) = meta.members.get_mut(&req.member_id) else {
                    return Err(unknown_member(&req.member_id));
                };
                if req.member_epoch == STATIC_LEAVE_EPOCH && !m.instance_id.is_empty() {
                    m.away = true;
                } else {
                    meta.members.remove(&req.member_id);
                    meta.epoch = Generation(meta.epoch.0 + 1);
                    retarget(&mut meta, partitions);
                }
                let key = (req.group.clone(), req.member_id.clone());
                match meta.members.get(&req.member_id) {
                    // Away: its session runs from now; back before it ends, it keeps everything.
                    Some(m) => {
                        let until = now.plus_ms(u64::from(m.session_timeout_ms));
                        self.deadlines.insert(key, until);
                    }
                    None => {
                        self.deadlines.remove(&key);
                    }
                }
                let records = self.record_if_changed(&req.group, old.as_ref(), meta);
                return Ok(Outcome {
                    records,
                    reply: GroupHeartbeatResponse {
                        error: ErrorCode::NONE,
                        message: String::new(),
                        member_id: req.member_id.clone(),
                        member_epoch: req.member_epoch,
                        heartbeat_interval_ms: self.heartbeat_interval_ms,
                        assignment: Vec::new(),
                    },
                });
            }
            e if e > 0 => {
                let Some(m) = meta.members.get_mut(&req.member_id) else {
                    return Err(unknown_member(&req.member_id));
                };
                if Generation(e) != m.epoch && Generation(e) != m.previous_epoch {
                    return Err(fenced(&req.member_id, e, m.epoch));
                }
                if let Some(topics) = &req.topics {
                    let mut topics = topics.clone();
                    topics.sort();
                    topics.dedup();
                    if topics != m.topics {
                        m.topics = topics;
                        bump = true;
                    }
                }
                if let Some(owned) = &req.owned {
                    let owned: BTreeSet<Tp> = owned.iter().map(|p| (p.topic.clone(), p.partition)).collect();
                    // Revocations acknowledged: those partitions are free for their new owners.
                    let done: Vec<Tp> = m.revoking.iter().filter(|p| !owned.contains(*p)).cloned().collect();
                    for p in done {
                        m.revoking.remove(&p);
                        m.assigned.remove(&p);
                    }
                }
                m.away = false;
                req.member_id.clone()
            }
            e => return Err((ErrorCode::INVALID_REQUEST, format!("member epoch {e}"))),
        };
        if bump {
            meta.epoch = Generation(meta.epoch.0 + 1);
            retarget(&mut meta, partitions);
        }
        reconcile(&mut meta, &id);
        let member = &meta.members[&id];
        let reply = GroupHeartbeatResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            member_id: id.clone(),
            member_epoch: member.epoch.0,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            assignment: tps(&member.assigned.difference(&member.revoking).cloned().collect()),
        };
        let timeout = member.session_timeout_ms;
        let records = self.record_if_changed(&req.group, old.as_ref(), meta);
        self.deadlines.insert((req.group.clone(), id), now.plus_ms(u64::from(timeout)));
        Ok(Outcome { records, reply })
    }

    fn record_if_changed(&self, group: &str, old: Option<&GroupMeta>, meta: GroupMeta) -> Vec<GroupRecord> {
        if old == Some(&meta) {
            Vec::new()
        } else {
            vec![GroupRecord::Group { group: group.to_owned(), meta }]
        }
    }

    /// An offset commit: by a member for partitions it owns, or administrative (empty member
    /// id, epoch -1) on a group without members.
    pub fn commit(&self, req: &OffsetCommitRequest) -> Result<Outcome<Vec<OffsetCommitPartitionResponse>>, Refusal> {
        self.commit_fenced(req, true)
    }

    /// Simulator builds only: [`GroupCoordinator::commit`], unless the planted
    /// `no-generation-fencing` bug accepts the commit from anyone (no member id, epoch or
    /// ownership check), so that the simulator can show its group checks catch zombies.
    #[cfg(feature = "sim")]
    pub fn commit_planted(
        &self,
        req: &OffsetCommitRequest,
        plant: super::replica::Plant,
    ) -> Result<Outcome<Vec<OffsetCommitPartitionResponse>>, Refusal> {
        self.commit_fenced(req, !plant.no_generation_fencing)
    }

    fn commit_fenced(
        &self,
        req: &OffsetCommitRequest,
        fencing: bool,
    ) -> Result<Outcome<Vec<OffsetCommitPartitionResponse>>, Refusal> {
        let who = Committer { group: &req.group, member_id: &req.member_id, member_epoch: req.member_epoch };
        self.offset_records(who, &req.offsets, fencing)
    }

    /// A transactional offset commit (Kafka's TxnOffsetCommit), checked as an offset commit
    /// (member id, member epoch and ownership; empty member id and epoch -1 only on a group
    /// without members). The driver writes the records as one transactional batch of
    /// `req.producer_id` / `req.producer_epoch`: they take effect at that producer's commit
    /// marker ([`LogMachine::apply_marker`]). Whether the offsets partition is in the
    /// producer's transaction is the partition leader's check, not this one.
    pub fn txn_commit(
        &self,
        req: &TxnOffsetCommitRequest,
    ) -> Result<Outcome<Vec<OffsetCommitPartitionResponse>>, Refusal> {
        super::txn::check_id(&req.transactional_id)?;
        if req.producer_id < 0 || req.producer_epoch < 0 {
            return Err((
                ErrorCode::INVALID_REQUEST,
                format!("producer id {} epoch {}: a transaction needs both", req.producer_id, req.producer_epoch),
            ));
        }
        let who = Committer { group: &req.group, member_id: &req.member_id, member_epoch: req.member_epoch };
        self.offset_records(who, &req.partitions, true)
    }

    /// The records and per-partition answers of a commit of `offsets` by `who`; a refusal of
    /// the whole commit when `who` may not commit (with `fencing` off, a planted bug, anyone
    /// may).
    fn offset_records(
        &self,
        who: Committer<'_>,
        offsets: &[OffsetCommitPartition],
        fencing: bool,
    ) -> Result<Outcome<Vec<OffsetCommitPartitionResponse>>, Refusal> {
        check_group_id(who.group)?;
        let member = if fencing { self.committer(&who)? } else { None };
        let mut records = Vec::new();
        let mut reply = Vec::with_capacity(offsets.len());
        for o in offsets {
            let tp = (o.topic.clone(), o.partition);
            let error = if member.is_some_and(|m| !m.assigned.contains(&tp)) {
                ErrorCode::PARTITION_NOT_OWNED
            } else if o.metadata.len() > METADATA_BYTES_MAX || o.topic.is_empty() || o.topic.len() > NAME_BYTES_MAX {
                ErrorCode::INVALID_REQUEST
            } else {
                records.push(GroupRecord::Offset {
                    group: who.group.to_owned(),
                    topic: o.topic.clone(),
                    partition: o.partition,
                    committed: Committed { offset: o.offset, metadata: o.metadata.clone() },
                });
                ErrorCode::NONE
            };
            reply.push(OffsetCommitPartitionResponse { topic: o.topic.clone(), partition: o.partition, error });
        }
        Ok(Outcome { records, reply })
    }

    /// The member committing (`None`: an administrative commit, empty member id and epoch -1,
    /// allowed only on a group without members); a refusal for an unknown member or a stale
    /// epoch.
    fn committer(&self, who: &Committer<'_>) -> Result<Option<&Member>, Refusal> {
        let g = self.groups.get(who.group);
        if who.member_id.is_empty() && who.member_epoch == -1 {
            if let Some(g) = g.filter(|g| !g.meta.members.is_empty()) {
                return Err((
                    ErrorCode::GROUP_NOT_EMPTY,
                    format!("group '{}' has {} members; stop them first", shown(who.group), g.meta.members.len()),
                ));
            }
            return Ok(None);
        }
        let m = g.and_then(|g| g.meta.members.get(who.member_id)).ok_or_else(|| unknown_member(who.member_id))?;
        if Generation(who.member_epoch) != m.epoch && Generation(who.member_epoch) != m.previous_epoch {
            return Err(fenced(who.member_id, who.member_epoch, m.epoch));
        }
        Ok(Some(m))
    }

    /// Deletes a group without members, with its offsets; refused while a transaction holds
    /// pending offsets of it (end or abort that transaction first).
    pub fn delete(&self, group: &str) -> Result<Outcome<()>, Refusal> {
        check_group_id(group)?;
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| (ErrorCode::GROUP_ID_NOT_FOUND, format!("group '{}' not found", shown(group))))?;
        if !g.meta.members.is_empty() {
            return Err((
                ErrorCode::GROUP_NOT_EMPTY,
                format!("group '{}' has {} members; stop them first", shown(group), g.meta.members.len()),
            ));
        }
        if let Some(producer) = self.pending_producer(group, None) {
            return Err((
                ErrorCode::GROUP_NOT_EMPTY,
                format!(
                    "group '{}' has offsets in the open transaction of producer {}; end or abort it first",
                    shown(group),
                    producer.0
                ),
            ));
        }
        Ok(Outcome { records: vec![GroupRecord::GroupDeleted { group: group.to_owned() }], reply: () })
    }

    /// A producer with a pending transactional offset of `group` for one of `partitions`
    /// (`None`: for any partition).
    fn pending_producer(&self, group: &str, partitions: Option<&[TopicPartition]>) -> Option<ProducerId> {
        let wanted = |(topic, partition): &Tp| {
            partitions.is_none_or(|ps| ps.iter().any(|p| p.partition == *partition && &p.topic == topic))
        };
        let start = (group.to_owned(), (String::new(), 0));
        self.pending.iter().find_map(|(producer, offsets)| {
            let mut of_group = offsets.range(&start..).take_while(|((g, _), _)| g == group);
            of_group.any(|((_, tp), _)| wanted(tp)).then_some(*producer)
        })
    }

    /// Members whose session ended by `now` leave their groups: one record per group changed.
    pub fn expire(&self, now: Time, partitions: &dyn Topology) -> Vec<GroupRecord> {
        let mut gone: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for ((group, member), deadline) in &self.deadlines {
            if *deadline <= now {
                gone.entry(group).or_default().push(member);
            }
        }
        let mut out = Vec::new();
        for (group, members) in gone {
            let Some(g) = self.groups.get(group) else { continue };
            let mut meta = g.meta.clone();
            let before = meta.members.len();
            for m in members {
                meta.members.remove(m);
            }
            if meta.members.len() != before {
                meta.epoch = Generation(meta.epoch.0 + 1);
                retarget(&mut meta, partitions);
                out.push(GroupRecord::Group { group: group.to_owned(), meta });
            }
        }
        out
    }

    /// Groups whose subscribed topics changed partition counts (a topic created or deleted
    /// after its consumers joined) start a new epoch: one record per group changed.
    pub fn refresh(&self, partitions: &dyn Topology) -> Vec<GroupRecord> {
        let mut out = Vec::new();
        for (name, g) in &self.groups {
            if g.meta.members.is_empty() || sizes(&g.meta, partitions) == g.meta.sizes {
                continue;
            }
            let mut meta = g.meta.clone();
            meta.epoch = Generation(meta.epoch.0 + 1);
            retarget(&mut meta, partitions);
            out.push(GroupRecord::Group { group: name.clone(), meta });
        }
        out
    }

    /// Members whose session ended by `now` (for logs).
    pub fn expired(&self, now: Time) -> Vec<(String, String)> {
        self.deadlines.iter().filter(|(_, d)| **d <= now).map(|(k, _)| k.clone()).collect()
    }

    /// Every group's members' owned partitions (for invariant checks: no partition owned twice).
    pub fn owners(&self) -> BTreeMap<(String, Tp), Vec<String>> {
        let mut out: BTreeMap<(String, Tp), Vec<String>> = BTreeMap::new();
        for (name, g) in &self.groups {
            for m in g.meta.members.values() {
                for p in &m.assigned {
                    out.entry((name.clone(), p.clone())).or_default().push(m.id.clone());
                }
            }
        }
        out
    }
}

fn shown(s: &str) -> String {
    skein_client::wire::shown(s)
}

fn unknown_member(id: &str) -> Refusal {
    (
        ErrorCode::UNKNOWN_MEMBER_ID,
        format!("member '{}' is not in the group (it left, timed out or was replaced); join again", shown(id)),
    )
}

fn fenced(id: &str, got: i32, current: Generation) -> Refusal {
    (
        ErrorCode::FENCED_MEMBER_EPOCH,
        format!("member '{}' sent epoch {got}, its epoch is {}: a stale generation; join again", shown(id), current.0),
    )
}

fn state_name(meta: &GroupMeta) -> &'static str {
    if meta.members.is_empty() {
        "Empty"
    } else if meta.members.values().all(|m| m.epoch == meta.epoch && m.revoking.is_empty() && m.assigned == m.target) {
        "Stable"
    } else {
        "Reconciling"
    }
}

fn sizes(meta: &GroupMeta, partitions: &dyn Topology) -> BTreeMap<String, u32> {
    let topics: BTreeSet<&String> = meta.members.values().flat_map(|m| m.topics.iter()).collect();
    topics.into_iter().filter_map(|t| Some((t.clone(), partitions.partitions(t)?))).collect()
}

/// Recomputes every member's target for the group's (new) epoch.
fn retarget(meta: &mut GroupMeta, partitions: &dyn Topology) {
    meta.sizes = sizes(meta, partitions);
    let members: Vec<(String, Vec<String>, BTreeSet<Tp>)> =
        meta.members.values().map(|m| (m.id.clone(), m.topics.clone(), m.assigned.clone())).collect();
    let racks: BTreeMap<String, String> =
        meta.members.values().filter(|m| !m.rack.is_empty()).map(|m| (m.id.clone(), m.rack.clone())).collect();
    let targets = assign(meta.assignor, &members, &racks, partitions);
    for m in meta.members.values_mut() {
        m.target = targets.get(&m.id).cloned().unwrap_or_default();
    }
}

/// Moves one member towards its target: first it gives up what it should not own (and is
/// not given anything until it acknowledged that), then it takes what its target holds that
/// nobody else owns. Its epoch becomes the group's once its revocations are done.
fn reconcile(meta: &mut GroupMeta, id: &str) {
    let owned_by_others: BTreeSet<Tp> =
        meta.members.values().filter(|m| m.id != id).flat_map(|m| m.assigned.iter().cloned()).collect();
    let group_epoch = meta.epoch;
    let m = meta.members.get_mut(id).expect("reconciling a member of the group");
    if !m.revoking.is_empty() {
        return;
    }
    let extra: BTreeSet<Tp> = m.assigned.difference(&m.target).cloned().collect();
    if !extra.is_empty() {
        m.revoking = extra;
        return;
    }
    if m.epoch != group_epoch {
        m.previous_epoch = m.epoch;
        m.epoch = group_epoch;
    }
    let free: Vec<Tp> =
        m.target.iter().filter(|p| !m.assigned.contains(*p) && !owned_by_others.contains(*p)).cloned().collect();
    m.assigned.extend(free);
}

/// Target assignment of every member (id, subscribed topics, currently owned). `racks`:
/// members' racks by id; the sticky assignor gives a partition it places to a member in a
/// rack holding one of its replicas when one is among the least loaded (rack-aware without
/// giving up balance).
pub fn assign(
    assignor: Assignor,
    members: &[(String, Vec<String>, BTreeSet<Tp>)],
    racks: &BTreeMap<String, String>,
    partitions: &dyn Topology,
) -> BTreeMap<String, BTreeSet<Tp>> {
    let mut out: BTreeMap<String, BTreeSet<Tp>> =
        members.iter().map(|(id, _, _)| (id.clone(), BTreeSet::new())).collect();
    let topics: BTreeSet<&String> = members.iter().flat_map(|(_, t, _)| t.iter()).collect();
    let subscribers = |topic: &str| -> Vec<&String> {
        let mut s: Vec<&String> =
            members.iter().filter(|(_, t, _)| t.iter().any(|x| x == topic)).map(|(id, _, _)| id).collect();
        s.sort();
        s
    };
    let all: Vec<Tp> = topics
        .iter()
        .flat_map(|t| (0..partitions.partitions(t).unwrap_or(0)).map(move |p| ((*t).clone(), p)))
        .collect();
    match assignor {
        Assignor::Range => {
            for t in &topics {
                let subs = subscribers(t);
                let n = partitions.partitions(t).unwrap_or(0) as usize;
                if subs.is_empty() {
                    continue;
                }
                let (each, extra) = (n / subs.len(), n % subs.len());
                let mut next = 0;
                for (i, id) in subs.iter().enumerate() {
                    let count = each + usize::from(i < extra);
                    for p in next..next + count {
                        out.get_mut(*id).expect("member").insert(((*t).clone(), p as u32));
                    }
                    next += count;
                }
            }
        }
        Assignor::RoundRobin => {
            let mut ids: Vec<&String> = members.iter().map(|(id, _, _)| id).collect();
            ids.sort();
            let mut turn = 0usize;
            for (t, p) in &all {
                for k in 0..ids.len() {
                    let id = ids[(turn + k) % ids.len()];
                    if subscribers(t).contains(&id) {
                        out.get_mut(id).expect("member").insert((t.clone(), *p));
                        turn = (turn + k + 1) % ids.len();
                        break;
                    }
                }
            }
        }
        Assignor::Sticky => {
            let count = all.len();
            let eligible: Vec<&(String, Vec<String>, BTreeSet<Tp>)> = members
                .iter()
                .filter(|(_, t, _)| t.iter().any(|t| partitions.partitions(t).unwrap_or(0) > 0))
                .collect();
            if eligible.is_empty() {
                return out;
            }
            let floor = count / eligible.len();
            let mut extra = count % eligible.len();
            let valid: BTreeSet<&Tp> = all.iter().collect();
            let mut taken: BTreeSet<Tp> = BTreeSet::new();
            let mut sorted: Vec<&&(String, Vec<String>, BTreeSet<Tp>)> = eligible.iter().collect();
            sorted.sort_by(|a, b| b.2.len().cmp(&a.2.len()).then(a.0.cmp(&b.0)));
            // Keep what each member owns, up to its share (the first `extra` keep one more).
            for (id, topics, owned) in sorted.iter().map(|m| (&m.0, &m.1, &m.2)) {
                let mut quota = floor;
                let keep: Vec<&Tp> = owned
                    .iter()
                    .filter(|p| valid.contains(p) && topics.contains(&p.0) && !taken.contains(*p))
                    .collect();
                if keep.len() > floor && extra > 0 {
                    quota += 1;
                    extra -= 1;
                }
                for p in keep.into_iter().take(quota) {
                    taken.insert(p.clone());
                    out.get_mut(id).expect("member").insert(p.clone());
                }
            }
            // The rest, each to the subscribed member owning fewest (ties: lowest id).
            for (t, p) in &all {
                if taken.contains(&(t.clone(), *p)) {
                    continue;
                }
                let subs = subscribers(t);
                let fewest = subs.iter().map(|id| out[*id].len()).min();
                let replica_racks = partitions.racks(t, *p);
                let local = subs.iter().copied().find(|id| {
                    Some(out[*id].len()) == fewest && racks.get(*id).is_some_and(|r| replica_racks.contains(r))
                });
                let best = local.or_else(|| subs.into_iter().min_by_key(|id| (out[*id].len(), (*id).clone())));
                if let Some(id) = best {
                    out.get_mut(id).expect("member").insert((t.clone(), *p));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
