//! The controller's state machine: broker liveness, leader election, ISR changes.
//!
//! Deterministic and sans-IO: messages and ticks in, messages out. In the simulator it runs on
//! one controller node (standing in for the Raft quorum of the cluster issue, whose replicated
//! log will carry exactly these decisions). Decisions:
//!
//! - A broker is alive while its heartbeats arrive within `session_timeout_ms`; a silent
//!   broker is fenced: it leaves every ISR (never emptying one: the last member stays, so the
//!   controller remembers who holds the committed data) and the partitions it led get a new
//!   leader from the live ISR members, with the epoch bumped. With no live ISR member the
//!   partition is offline (leader `None`, epoch bumped) until one returns.
//! - A leader's `AlterIsr` is accepted only if its epoch and ISR version are current and every
//!   added member is alive; accepted or not, the leader gets the current state back.
//! - Every change is sent to the partition's replicas; heartbeat responses repeat the state,
//!   so a lost message only delays a replica.
//! - Ranged topics (issue 21) split and merge: the parent is sealed ([`Seal`]) and children
//!   with new ids and indexes take its range at once; the parent's leader reports its seal
//!   offset (`Message::Sealed`), accepted only from the current leader at its epoch.
//!
//! Decisions are logged as they are applied, except history: a restarted broker's voter first
//! applies inputs decided before it was back (its own Raft log, then what was committed while
//! it was down). Those decisions were news when they were made and were logged then by the
//! voters that were up; logged again with the current time they would read as new events (the
//! broker would log itself fenced right after starting). [`Narration::Replay`] logs them at
//! debug level and counts them instead. The controller has no notion of log indexes and does
//! not log a summary: its driver does.
//!
//! Snapshots: [`Controller::snapshot`] encodes the state (versioned, checksummed bytes; the
//! format is on [`ControllerSnapshot`]) and [`Controller::restore`] replaces the state with a
//! decoded one, so a Raft voter can compact its log. Settings and narration are not part of a
//! snapshot: they belong to the process that restores it.

use std::collections::{BTreeMap, BTreeSet};

use skein_client::partitioning::{KeyRange, Partitioning};

use super::{IsrVersion, LeaderEpoch, Message, NodeId, Offset, PartitionId, PartitionState, Seal, Time};

/// Logs a controller decision at `$level`, or, while the controller applies history
/// ([`Narration::Replay`]), at debug level with `replayed = true`, and counts it. A macro, not
/// a method: callers hold borrows of other fields of the controller.
macro_rules! decision {
    ($controller:expr, $level:ident, $($field:tt)+) => {
        if $controller.narration == Narration::Live {
            tracing::$level!($($field)+);
        } else {
            $controller.decisions_replayed += 1;
            tracing::debug!(replayed = true, $($field)+);
        }
    };
}

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// A broker silent this long is fenced.
    pub session_timeout_ms: u64,
    /// How often leadership goes back to each partition's preferred replica (its first),
    /// when that replica is alive and in the ISR; `None`: never (the simulator's default).
    pub rebalance_interval_ms: Option<u64>,
    /// When leadership moves away from a live leader (rebalancing, controlled shutdown,
    /// reassignment), the partition stays leaderless this long: the brokers' lease plus a
    /// margin. The old leader learns it lost leadership from the same heartbeat response that
    /// would renew its lease, so after this long it has either stepped down or stopped
    /// acknowledging; only then may another leader acknowledge (no two leaders at once).
    pub handover_ms: u64,
}

/// Default session timeout (ms).
pub const DEFAULT_SESSION_TIMEOUT_MS: u64 = 400;

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            session_timeout_ms: DEFAULT_SESSION_TIMEOUT_MS,
            rebalance_interval_ms: None,
            handover_ms: super::node::DEFAULT_LEASE_MS + 50,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Broker {
    last_heartbeat: Option<Time>,
    alive: bool,
    incarnation: Option<u64>,
    /// Asked for a controlled shutdown: it leads nothing (unless it is the only live ISR
    /// member) until it restarts.
    shutting_down: bool,
}

/// A topic: a name for its partitions (index → id), with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topic {
    /// How keys map to partitions.
    pub partitioning: Partitioning,
    /// The topic's partitions by index: a new topic's first, then every split's and merge's
    /// children in the order they were made (indexes are never reused).
    pub parts: Vec<TopicPart>,
    /// Replicas per partition.
    pub replication: u16,
    /// Config overrides, as given at creation.
    pub configs: Vec<(String, String)>,
}

/// One partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPart {
    /// Its id (global, never reused).
    pub id: PartitionId,
    /// The points it owns (ranged schemes); `None` for [`Partitioning::Hash`].
    pub range: Option<KeyRange>,
    /// The indexes of the partitions it was split or merged from (read before it).
    pub parents: Vec<u32>,
}

impl Topic {
    /// The id of the topic's partition `index`, if it has one.
    pub fn partition(&self, index: u32) -> Option<PartitionId> {
        self.parts.get(index as usize).map(|p| p.id)
    }

    /// How many partitions (indexes) the topic has, sealed ones included.
    pub fn count(&self) -> u32 {
        u32::try_from(self.parts.len()).expect("at most PARTITIONS_PER_TOPIC_MAX partitions")
    }

    /// The index of partition `id` in this topic.
    pub fn index_of(&self, id: PartitionId) -> Option<u32> {
        self.parts.iter().position(|p| p.id == id).map(|i| i as u32)
    }
}

/// Whether the controller's decisions are news (see the module header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narration {
    /// Decisions are logged at their own level as they are applied.
    Live,
    /// History: decisions are logged at debug level and counted until the heartbeat of
    /// `broker`'s process `incarnation` (or a later one) is applied. That input was proposed
    /// after the process started, and so was every input after it in the log; every input
    /// before it is either history or was decided while the process was still joining.
    Replay {
        /// The broker whose voter this controller is.
        broker: NodeId,
        /// That broker's process incarnation.
        incarnation: u64,
    },
}

/// The longest split point of a key-range topic (it is repeated in every metadata answer).
pub const SPLIT_POINT_BYTES_MAX: usize = 1_024;

/// Most partitions of one topic.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;
/// Most configs of one topic, and the longest key and value.
pub const CONFIGS_PER_TOPIC_MAX: usize = 64;
/// The longest topic config key, in bytes.
pub const CONFIG_KEY_BYTES_MAX: usize = 255;
/// The longest topic config value, in bytes.
pub const CONFIG_VALUE_BYTES_MAX: usize = 4_096;

/// Whether `name` is a valid topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or
/// `..` (it names directories on every broker).
pub fn valid_topic_name(name: &str) -> bool {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    !name.is_empty() && name.len() <= 249 && ok_chars && name != "." && name != ".."
}

/// The checks of a new topic that need no state: its name, partition count and configs'
/// count and sizes. The voter runs them before proposing a CreateTopic, and the controller
/// again when applying one, whatever sent it.
pub fn check_new_topic(name: &str, partitions: u32, configs: &[(String, String)]) -> Result<(), CreateTopicError> {
    if !valid_topic_name(name) {
        return Err(CreateTopicError::Invalid(format!("invalid topic name ({} bytes)", name.len())));
    }
    if partitions > PARTITIONS_PER_TOPIC_MAX {
        return Err(CreateTopicError::Invalid(format!("{partitions} partitions (at most {PARTITIONS_PER_TOPIC_MAX})")));
    }
    let too_large = |(k, v): &(String, String)| k.len() > CONFIG_KEY_BYTES_MAX || v.len() > CONFIG_VALUE_BYTES_MAX;
    if configs.len() > CONFIGS_PER_TOPIC_MAX || configs.iter().any(too_large) {
        return Err(CreateTopicError::Invalid(format!(
            "{} configs (at most {CONFIGS_PER_TOPIC_MAX}; keys up to {CONFIG_KEY_BYTES_MAX} bytes, values up to \
             {CONFIG_VALUE_BYTES_MAX})",
            configs.len()
        )));
    }
    Ok(())
}

/// Why a split or merge was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// No such topic.
    #[error("unknown topic")]
    NoTopic,
    /// No such partition index in the topic.
    #[error("partition {0} does not exist")]
    NoPartition(u32),
    /// The partition was split or merged already.
    #[error("partition {0} is sealed (split or merged already)")]
    Sealed(u32),
    /// Anything else: a hash topic, a point outside the range, ranges that do not touch.
    #[error("{0}")]
    Invalid(String),
}

/// Why a topic could not be created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateTopicError {
    /// A topic with this name exists.
    Exists,
    /// Zero partitions, or replication outside `1..=brokers`.
    Invalid(String),
}

/// The controller state machine.
pub struct Controller {
    config: ControllerConfig,
    /// Planted bug: accept stale ISR changes.
    no_fencing: bool,
    brokers: BTreeMap<NodeId, Broker>,
    partitions: BTreeMap<PartitionId, PartitionState>,
    topics: BTreeMap<String, Topic>,
    next_partition: u32,
    /// Partitions of topics with `unclean.leader.election.enable=true`.
    unclean: BTreeSet<PartitionId>,
    last_rebalance: Option<Time>,
    /// Reassignments in progress: partition → target replicas.
    reassigning: BTreeMap<PartitionId, Vec<NodeId>>,
    /// Partitions of deleted topics (ids are never reused): brokers delete their replicas.
    deleted: BTreeSet<PartitionId>,
    /// Partitions handed over from a live leader: no election before this time.
    held: BTreeMap<PartitionId, Time>,
    /// The latest time an input carried.
    last_now: Time,
    /// Whether decisions are logged as news.
    narration: Narration,
    /// Decisions logged at debug level as history (kept after the replay ends).
    decisions_replayed: u64,
}

impl Controller {
    /// A controller for these brokers and partition assignments (first replica preferred).
    /// No broker is alive until it heartbeats.
    pub fn new(config: ControllerConfig, brokers: &[NodeId], assignments: &[(PartitionId, Vec<NodeId>)]) -> Self {
        let brokers = brokers
            .iter()
            .map(|&b| (b, Broker { last_heartbeat: None, alive: false, incarnation: None, shutting_down: false }))
            .collect();
        let partitions = assignments
            .iter()
            .map(|(p, replicas)| {
                assert!(!replicas.is_empty(), "partition {p} has no replicas");
                let state = PartitionState {
                    partition: *p,
                    epoch: LeaderEpoch(0),
                    leader: None,
                    isr: replicas.clone(),
                    isr_version: IsrVersion(0),
                    replicas: replicas.clone(),
                    seal: Seal::Open,
                };
                (*p, state)
            })
            .collect();
        let next_partition = assignments.iter().map(|(p, _)| p.0 + 1).max().unwrap_or(0);
        Controller {
            config,
            no_fencing: false,
            brokers,
            partitions,
            topics: BTreeMap::new(),
            next_partition,
            unclean: BTreeSet::new(),
            last_rebalance: None,
            reassigning: BTreeMap::new(),
            deleted: BTreeSet::new(),
            held: BTreeMap::new(),
            last_now: Time(0),
            narration: Narration::Live,
            decisions_replayed: 0,
        }
    }

    /// Makes the pre-assigned partitions `ids` (from [`Controller::new`]'s assignments) one
    /// topic `name` with `partitioning`'s initial ranges, in that order. For a driver that
    /// assigns partitions before any topic exists (the simulator); every voter must call it
    /// the same way before applying its log.
    pub fn adopt_topic(
        &mut self,
        name: &str,
        partitioning: Partitioning,
        ids: &[PartitionId],
        replication: u16,
        configs: Vec<(String, String)>,
    ) {
        let mut ranges = partitioning.initial_ranges(ids.len() as u32).into_iter();
        let parts = ids.iter().map(|&id| TopicPart { id, range: ranges.next(), parents: Vec::new() }).collect();
        self.topics.insert(name.to_owned(), Topic { partitioning, parts, replication, configs });
    }

    /// Treats every input as history until the heartbeat of `broker`'s process `incarnation`
    /// is applied ([`Narration::Replay`]). Called once, on a new controller, by a voter's
    /// driver that is about to replay the Raft log.
    pub fn replay_until(&mut self, broker: NodeId, incarnation: u64) {
        self.narrate(Narration::Replay { broker, incarnation });
    }

    /// Whether the controller is applying history ([`Narration::Replay`]).
    pub fn replaying(&self) -> bool {
        self.narration != Narration::Live
    }

    /// How many decisions were logged at debug level as history.
    pub fn decisions_replayed(&self) -> u64 {
        self.decisions_replayed
    }

    /// The controller's state as snapshot bytes (see [`ControllerSnapshot`] for the format):
    /// everything its decisions depend on, not its settings (`ControllerConfig`, planted bugs)
    /// nor its narration, which belong to the process. Deterministic: two controllers that
    /// applied the same inputs give the same bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut body = Vec::new();
        encode_state(self, &mut body);
        let body_bytes = u32::try_from(body.len()).expect("a controller state is far below 4 GiB");
        let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len());
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&body_bytes.to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        debug_assert!(ControllerSnapshot::decode(&bytes).is_ok(), "a snapshot just encoded decodes");
        bytes
    }

    /// Replaces the state with a snapshot's (taken by this or another voter's controller at a
    /// Raft index this controller has not applied past). Settings and narration stay; if the
    /// snapshot already holds the heartbeat a replay waits for, the replay ends. Fails, changing
    /// nothing, if the snapshot names other brokers (the voters differ: a configuration error).
    pub fn restore(&mut self, snapshot: ControllerSnapshot) -> Result<(), SnapshotError> {
        self.fits(&snapshot)?;
        let ControllerSnapshot {
            brokers,
            partitions,
            topics,
            next_partition,
            unclean,
            last_rebalance,
            reassigning,
            deleted,
            held,
            last_now,
        } = snapshot;
        self.brokers = brokers;
        self.partitions = partitions;
        self.topics = topics;
        self.next_partition = next_partition;
        self.unclean = unclean;
        self.last_rebalance = last_rebalance;
        self.reassigning = reassigning;
        self.deleted = deleted;
        self.held = held;
        self.last_now = last_now;
        if let Narration::Replay { broker, .. } = self.narration {
            if let Some(i) = self.brokers.get(&broker).and_then(|b| b.incarnation) {
                self.end_replay(broker, i);
            }
        }
        Ok(())
    }

    /// Whether `snapshot` would restore into this controller: it names the same brokers.
    pub fn fits(&self, snapshot: &ControllerSnapshot) -> Result<(), SnapshotError> {
        let mine: Vec<NodeId> = self.brokers.keys().copied().collect();
        let theirs: Vec<NodeId> = snapshot.brokers.keys().copied().collect();
        if mine != theirs {
            return Err(SnapshotError::Brokers { snapshot: theirs, controller: mine });
        }
        Ok(())
    }

    /// Every topic, by name.
    pub fn topics(&self) -> &BTreeMap<String, Topic> {
        &self.topics
    }

    /// The brokers (every voter), with whether each is alive.
    pub fn brokers(&self) -> impl Iterator<Item = (NodeId, bool)> + '_ {
        self.brokers.iter().map(|(&id, b)| (id, b.alive))
    }

    /// Creates a topic: new partition ids, replicas spread round-robin over the brokers (the
    /// first replica of each partition is its preferred leader), every replica in the ISR, and
    /// leaders elected among the live ones. Deterministic: every voter applying the same
    /// inputs assigns the same ids and replicas.
    pub fn create_topic(
        &mut self,
        name: &str,
        partitions: u32,
        replication: u16,
        partitioning: Partitioning,
        configs: Vec<(String, String)>,
        out: &mut Vec<(NodeId, Message)>,
    ) -> Result<(), CreateTopicError> {
        // Checked here whatever the request's path (the voter also checks before proposing):
        // a command in the Raft log is applied at every start.
        check_new_topic(name, partitions, &configs)?;
        if self.topics.contains_key(name) {
            return Err(CreateTopicError::Exists);
        }
        let brokers: Vec<NodeId> = self.brokers.keys().copied().collect();
        if partitions == 0 || replication == 0 || usize::from(replication) > brokers.len() {
            return Err(CreateTopicError::Invalid(format!(
                "{partitions} partitions with {replication} replicas on {} brokers",
                brokers.len()
            )));
        }
        let first = self.next_partition;
        let end =
            first.checked_add(partitions).ok_or_else(|| CreateTopicError::Invalid("too many partitions".into()))?;
        let unclean = configs.iter().any(|(k, v)| k == "unclean.leader.election.enable" && v == "true");
        let ids: Vec<PartitionId> = (first..end).map(PartitionId).collect();
        for &p in &ids {
            self.add_partition(p, replication, unclean);
        }
        let mut ranges = partitioning.initial_ranges(partitions).into_iter();
        let parts = ids.into_iter().map(|id| TopicPart { id, range: ranges.next(), parents: Vec::new() }).collect();
        self.topics.insert(name.to_owned(), Topic { partitioning, parts, replication, configs });
        self.elect_all(out);
        Ok(())
    }

    /// A new partition `p` (the next id): `replication` replicas round-robin over the brokers
    /// from `p`'s id (the first is its preferred leader), all in the ISR, no leader yet.
    fn add_partition(&mut self, p: PartitionId, replication: u16, unclean: bool) {
        let brokers: Vec<NodeId> = self.brokers.keys().copied().collect();
        let replicas: Vec<NodeId> =
            (0..usize::from(replication)).map(|j| brokers[(p.0 as usize + j) % brokers.len()]).collect();
        let state = PartitionState {
            partition: p,
            epoch: LeaderEpoch(0),
            leader: None,
            isr: replicas.clone(),
            isr_version: IsrVersion(0),
            replicas,
            seal: Seal::Open,
        };
        self.partitions.insert(p, state);
        self.next_partition = self.next_partition.max(p.0 + 1);
        if unclean {
            self.unclean.insert(p);
        }
    }

    /// Splits partition `index` of a ranged topic at point `at` (its range's middle if
    /// `None`): the parent is sealed and two children with the next indexes take the lower
    /// and upper halves. Returns the children's indexes. Refused (changing nothing) for a
    /// hash topic, a sealed partition, a point outside the range or a topic at its partition
    /// limit. Deterministic, as every decision.
    pub fn split(
        &mut self,
        topic: &str,
        index: u32,
        at: Option<Vec<u8>>,
        out: &mut Vec<(NodeId, Message)>,
    ) -> Result<[u32; 2], ResizeError> {
        let (parent, low, high) = self.plan_split(topic, index, at)?;
        let children = self.add_children(topic, &[index], vec![low, high], out);
        self.seal(parent, out);
        decision!(self, info, topic, partition = index, ?children, "partition split");
        Ok([children[0], children[1]])
    }

    /// The checks of [`Controller::split`], changing nothing: the parent's id and the two
    /// halves.
    pub fn plan_split(
        &self,
        topic: &str,
        index: u32,
        at: Option<Vec<u8>>,
    ) -> Result<(PartitionId, KeyRange, KeyRange), ResizeError> {
        let t = self.resizable(topic, 2)?;
        let part = t.parts.get(index as usize).ok_or(ResizeError::NoPartition(index))?;
        let range = part.range.clone().expect("a ranged topic's partitions have ranges");
        self.open(part.id, index)?;
        let at = match at {
            Some(at) if t.partitioning == Partitioning::HashRange && at.len() != 8 => {
                return Err(ResizeError::Invalid(format!("a hash-range split point is 8 bytes, not {}", at.len())))
            }
            Some(at) if at.len() > SPLIT_POINT_BYTES_MAX => {
                return Err(ResizeError::Invalid(format!(
                    "a split point of {} bytes (at most {SPLIT_POINT_BYTES_MAX})",
                    at.len()
                )))
            }
            Some(at) if range.splits_at(&at) => at,
            Some(_) => {
                return Err(ResizeError::Invalid(format!("the split point is not inside partition {index}'s range")))
            }
            None => range
                .midpoint(t.partitioning)
                .ok_or_else(|| ResizeError::Invalid(format!("partition {index}'s range holds one point")))?,
        };
        let (low, high) = range.split(&at);
        Ok((part.id, low, high))
    }

    /// Merges two adjacent partitions of a ranged topic (`indexes` in either order): both are
    /// sealed and one child with the next index takes their joined range. Returns the
    /// child's index. Refused as [`Controller::split`] is, and for partitions whose ranges
    /// do not touch.
    pub fn merge(
        &mut self,
        topic: &str,
        indexes: [u32; 2],
        out: &mut Vec<(NodeId, Message)>,
    ) -> Result<u32, ResizeError> {
        let (order, ids, joined) = self.plan_merge(topic, indexes)?;
        let child = self.add_children(topic, &order, vec![joined], out)[0];
        self.seal(ids[0], out);
        self.seal(ids[1], out);
        decision!(self, info, topic, partitions = ?order, child, "partitions merged");
        Ok(child)
    }

    /// The checks of [`Controller::merge`], changing nothing: the indexes in range order,
    /// their ids, and the joined range.
    pub fn plan_merge(
        &self,
        topic: &str,
        indexes: [u32; 2],
    ) -> Result<([u32; 2], [PartitionId; 2], KeyRange), ResizeError> {
        let t = self.resizable(topic, 1)?;
        let [a, b] = indexes;
        if a == b {
            return Err(ResizeError::Invalid(format!("partition {a} cannot merge with itself")));
        }
        let part = |i: u32| t.parts.get(i as usize).ok_or(ResizeError::NoPartition(i));
        let (pa, pb) = (part(a)?, part(b)?);
        let (ra, rb) = (pa.range.as_ref().expect("ranged"), pb.range.as_ref().expect("ranged"));
        self.open(pa.id, a)?;
        self.open(pb.id, b)?;
        let (low, high, order, ids) = if ra.precedes(rb) {
            (ra, rb, [a, b], [pa.id, pb.id])
        } else if rb.precedes(ra) {
            (rb, ra, [b, a], [pb.id, pa.id])
        } else {
            return Err(ResizeError::Invalid(format!("partitions {a} and {b} are not neighbours")));
        };
        Ok((order, ids, KeyRange { from: low.from.clone(), to: high.to.clone() }))
    }

    /// The topic, if it may gain `new` partitions by a split or merge.
    fn resizable(&self, topic: &str, new: u32) -> Result<&Topic, ResizeError> {
        let t = self.topics.get(topic).ok_or(ResizeError::NoTopic)?;
        if !t.partitioning.ranged() {
            return Err(ResizeError::Invalid(
                "a hash-partitioned topic has a fixed partition count; create it with --partitioning hash-range or \
                 key-range to split and merge"
                    .into(),
            ));
        }
        if t.count() + new > PARTITIONS_PER_TOPIC_MAX {
            return Err(ResizeError::Invalid(format!("the topic has {PARTITIONS_PER_TOPIC_MAX} partitions already")));
        }
        if self.next_partition.checked_add(new).is_none() {
            return Err(ResizeError::Invalid("partition ids are exhausted".into()));
        }
        Ok(t)
    }

    /// Ok if partition `p` (index `index`) still takes records.
    fn open(&self, p: PartitionId, index: u32) -> Result<(), ResizeError> {
        match self.partitions.get(&p).map(|s| s.seal) {
            Some(Seal::Open) => Ok(()),
            _ => Err(ResizeError::Sealed(index)),
        }
    }

    /// New partitions of `topic` with these ranges and parents; returns their indexes.
    fn add_children(
        &mut self,
        topic: &str,
        parents: &[u32],
        ranges: Vec<KeyRange>,
        out: &mut Vec<(NodeId, Message)>,
    ) -> Vec<u32> {
        let t = self.topics.get(topic).expect("checked by resizable");
        let (replication, unclean, first_index) = (t.replication, self.unclean.contains(&t.parts[0].id), t.count());
        let mut made = Vec::new();
        for (k, range) in ranges.into_iter().enumerate() {
            let id = PartitionId(self.next_partition);
            self.add_partition(id, replication, unclean);
            let t = self.topics.get_mut(topic).expect("checked by resizable");
            t.parts.push(TopicPart { id, range: Some(range), parents: parents.to_vec() });
            made.push(first_index + k as u32);
        }
        self.elect_all(out);
        made
    }

    /// Seals partition `p`: its replicas learn it refuses data; its leader reports the offset.
    fn seal(&mut self, p: PartitionId, out: &mut Vec<(NodeId, Message)>) {
        let state = self.partitions.get_mut(&p).expect("an open partition exists");
        state.seal = Seal::Sealing;
        state.isr_version = IsrVersion(state.isr_version.0 + 1);
        let state = state.clone();
        self.broadcast(&state, out);
    }

    /// The leader of a sealing partition reports its log end: everything it appended is
    /// committed and no transaction is open on it. Taken only from the current leader at its
    /// epoch (a deposed leader's log end may include records its successor truncates).
    fn sealed(
        &mut self,
        leader: NodeId,
        epoch: LeaderEpoch,
        p: PartitionId,
        at: Offset,
        out: &mut Vec<(NodeId, Message)>,
    ) {
        let Some(state) = self.partitions.get_mut(&p) else { return };
        if state.seal != Seal::Sealing || state.leader != Some(leader) || state.epoch != epoch {
            return; // ignore_*: stale, repeated, or not sealing
        }
        state.seal = Seal::Sealed(at);
        state.isr_version = IsrVersion(state.isr_version.0 + 1);
        let state = state.clone();
        decision!(self, info, partition = %p, offset = at.0, "partition sealed");
        self.broadcast(&state, out);
    }

    /// Plants the no-fencing bug (simulator only).
    pub fn plant_no_fencing(&mut self) {
        self.no_fencing = true;
    }

    /// The current state of a partition.
    pub fn partition(&self, p: PartitionId) -> Option<&PartitionState> {
        self.partitions.get(&p)
    }

    /// The open (unsealed) partitions of ranged topic `topic`, as (index, id, range), in range
    /// order; empty for an unknown or hash topic.
    pub fn open_parts(&self, topic: &str) -> Vec<(u32, PartitionId, &KeyRange)> {
        let Some(t) = self.topics.get(topic) else { return Vec::new() };
        let mut open: Vec<(u32, PartitionId, &KeyRange)> = t
            .parts
            .iter()
            .enumerate()
            .filter(|(_, part)| self.partitions.get(&part.id).is_some_and(|s| s.seal == Seal::Open))
            .filter_map(|(index, part)| part.range.as_ref().map(|r| (index as u32, part.id, r)))
            .collect();
        open.sort_by(|a, b| skein_client::partitioning::by_from(a.2, b.2));
        open
    }

    /// Every partition's state.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionState> {
        self.partitions.values()
    }

    /// A new active controller took over: every live broker's session restarts at `now` (the
    /// previous controller's last heartbeat times may be stale by an election's length).
    pub fn restart_sessions(&mut self, now: Time) {
        for b in self.brokers.values_mut().filter(|b| b.alive) {
            b.last_heartbeat = Some(now);
        }
    }

    /// Controlled shutdown of `broker` (incarnation `incarnation`): leadership moves to other
    /// ISR members and it leaves the ISRs (never as the last member), so acks=all no longer
    /// waits for it; it stays out of elections until it restarts.
    pub fn controlled_shutdown(&mut self, broker: NodeId, incarnation: u64, out: &mut Vec<(NodeId, Message)>) {
        let Some(b) = self.brokers.get_mut(&broker) else { return };
        if b.incarnation != Some(incarnation) || b.shutting_down {
            return; // ignore_*: another process of this broker, or already done
        }
        b.shutting_down = true;
        decision!(self, info, %broker, "controlled shutdown");
        let ids: Vec<PartitionId> = self.partitions.keys().copied().collect();
        for p in ids {
            let led = self.partitions.get(&p).is_some_and(|s| s.leader == Some(broker));
            self.remove_members(p, &[broker], true, out);
            if led {
                self.hold(p);
            }
        }
        self.elect_all(out);
    }

    /// Keeps `p` (just made leaderless while its leader lives) without a leader for
    /// `handover_ms`.
    fn hold(&mut self, p: PartitionId) {
        self.held.insert(p, self.last_now.plus_ms(self.config.handover_ms));
    }

    /// Starts moving partition `p` to the `target` replicas (first = preferred leader), as
    /// Kafka's KIP-455: the replica set becomes old ∪ target, new replicas catch up and join
    /// the ISR through their leader; once every target replica is in the ISR the set becomes
    /// `target`, replicas outside it leave (and a leader outside it hands over).
    pub fn reassign(
        &mut self,
        p: PartitionId,
        target: Vec<NodeId>,
        out: &mut Vec<(NodeId, Message)>,
    ) -> Result<(), String> {
        let Some(state) = self.partitions.get_mut(&p) else { return Err(format!("unknown partition {p}")) };
        let mut dedup = target.clone();
        dedup.sort();
        dedup.dedup();
        if target.is_empty() || dedup.len() != target.len() {
            return Err("the target replica list is empty or repeats a broker".into());
        }
        if let Some(b) = target.iter().find(|b| !self.brokers.contains_key(b)) {
            return Err(format!("unknown broker {b}"));
        }
        let mut replicas = target.clone();
        replicas.extend(state.replicas.iter().filter(|r| !target.contains(r)));
        state.replicas = replicas;
        state.isr_version = IsrVersion(state.isr_version.0 + 1);
        decision!(self, info, partition = %p, ?target, "reassignment started");
        self.reassigning.insert(p, target);
        let state = state.clone();
        self.broadcast(&state, out);
        self.finish_reassignment(p, out);
        Ok(())
    }

    /// Deletes a topic: its partitions leave the metadata and join `deleted`, so every
    /// broker deletes its replicas of them. Returns whether the topic existed.
    pub fn delete_topic(&mut self, name: &str) -> bool {
        let Some(t) = self.topics.remove(name) else { return false };
        for p in t.parts.iter().map(|p| p.id) {
            self.partitions.remove(&p);
            self.reassigning.remove(&p);
            self.unclean.remove(&p);
            self.held.remove(&p);
            self.deleted.insert(p);
        }
        decision!(self, info, topic = %name, "topic deleted");
        true
    }

    /// Partitions of deleted topics.
    pub fn deleted(&self) -> &BTreeSet<PartitionId> {
        &self.deleted
    }

    /// The target replicas of partition `p`'s reassignment in progress, if any.
    pub fn reassignment(&self, p: PartitionId) -> Option<&Vec<NodeId>> {
        self.reassigning.get(&p)
    }

    /// Ends partition `p`'s reassignment if every target replica is in the ISR.
    fn finish_reassignment(&mut self, p: PartitionId, out: &mut Vec<(NodeId, Message)>) {
        let (Some(target), Some(state)) = (self.reassigning.get(&p), self.partitions.get_mut(&p)) else { return };
        if !target.iter().all(|r| state.isr.contains(r)) {
            return;
        }
        let removed: Vec<NodeId> = state.replicas.iter().filter(|r| !target.contains(r)).copied().collect();
        state.replicas = target.clone();
        state.isr.retain(|r| target.contains(r));
        state.isr_version = IsrVersion(state.isr_version.0 + 1);
        let handed_over = state.leader.is_some_and(|l| !target.contains(&l));
        if handed_over {
            state.leader = None;
            state.epoch = LeaderEpoch(state.epoch.0 + 1);
        }
        decision!(self, info, partition = %p, replicas = ?state.replicas, "reassignment done");
        self.reassigning.remove(&p);
        let state = state.clone();
        if handed_over {
            self.hold(p);
        }
        // The removed replicas learn they are out (heartbeat responses no longer name them).
        for r in removed {
            out.push((r, Message::PartitionState(state.clone())));
        }
        self.broadcast(&state, out);
        self.elect_all(out);
    }

    /// Whether a broker asked for a controlled shutdown (and has not restarted since).
    pub fn shutting_down(&self, b: NodeId) -> bool {
        self.brokers.get(&b).is_some_and(|x| x.shutting_down)
    }

    /// Moves leadership back to preferred replicas (the first of each partition's replicas)
    /// that are alive, in the ISR and not shutting down.
    fn rebalance(&mut self, out: &mut Vec<(NodeId, Message)>) {
        let ready: Vec<NodeId> =
            self.brokers.iter().filter(|(_, b)| b.alive && !b.shutting_down).map(|(&id, _)| id).collect();
        let ids: Vec<PartitionId> = self.partitions.keys().copied().collect();
        for p in ids {
            let state = self.partitions.get_mut(&p).expect("listed above");
            let preferred = state.replicas[0];
            if state.leader.is_none_or(|l| l == preferred)
                || !state.isr.contains(&preferred)
                || !ready.contains(&preferred)
            {
                continue;
            }
            // The current leader steps down first; the preferred replica (first in the
            // election order) takes over after the handover hold.
            decision!(self, info, partition = %p, from = ?state.leader, to = %preferred, "preferred leader");
            state.leader = None;
            state.epoch = LeaderEpoch(state.epoch.0 + 1);
            state.isr_version = IsrVersion(state.isr_version.0 + 1);
            let state = state.clone();
            self.broadcast(&state, out);
            self.hold(p);
        }
    }

    /// Whether the controller considers a broker alive.
    pub fn alive(&self, b: NodeId) -> bool {
        self.brokers.get(&b).is_some_and(|x| x.alive)
    }

    /// A message from a broker. Outgoing messages are pushed as (destination, message).
    pub fn handle_message(&mut self, now: Time, from: NodeId, msg: Message, out: &mut Vec<(NodeId, Message)>) {
        self.last_now = self.last_now.max(now);
        match msg {
            Message::Heartbeat { broker, incarnation, lost, sent } => {
                if broker != from || !self.brokers.contains_key(&broker) {
                    return; // ignore_*: unknown or spoofed broker
                }
                let b = self.brokers.get_mut(&broker).expect("checked above");
                if b.incarnation.is_some_and(|i| incarnation < i) {
                    return; // ignore_*: a late heartbeat of a process that has since restarted
                }
                b.last_heartbeat = Some(now);
                let restarted = b.incarnation.is_some_and(|i| i != incarnation);
                if restarted {
                    b.shutting_down = false;
                }
                let first = b.incarnation.is_none();
                b.incarnation = Some(incarnation);
                let was_alive = std::mem::replace(&mut b.alive, true);
                // Before the decisions below: they are news.
                self.end_replay(broker, incarnation);
                if (restarted || first) && !lost.is_empty() {
                    self.lost_logs(broker, &lost, out);
                }
                if restarted {
                    // It may have lost records it had shown followers: what it led gets a
                    // new epoch (possibly with itself as leader again).
                    decision!(self, info, %broker, incarnation, "broker restarted");
                    self.restarted(broker, out);
                } else if !was_alive {
                    tracing::debug!(%broker, "broker alive");
                    self.elect_all(out);
                }
                let partitions = self.partitions.values().filter(|s| s.replicas.contains(&broker)).cloned().collect();
                out.push((broker, Message::HeartbeatResponse { incarnation, sent, alive: true, partitions }));
            }
            Message::AlterIsr { leader, epoch, isr_version, partition, isr } => {
                let Some(state) = self.partitions.get(&partition) else { return };
                let current = state.leader == Some(leader) && state.epoch == epoch && state.isr_version == isr_version;
                let members_ok = !isr.is_empty()
                    && isr.contains(&leader)
                    && isr.iter().all(|r| state.replicas.contains(r))
                    && isr.iter().all(|r| state.isr.contains(r) || self.alive(*r));
                if (current || self.no_fencing) && members_ok {
                    let state = self.partitions.get_mut(&partition).expect("checked above");
                    let mut isr = isr;
                    isr.sort();
                    isr.dedup();
                    state.isr = isr;
                    state.isr_version = IsrVersion(state.isr_version.0 + 1);
                    let state = state.clone();
                    self.broadcast(&state, out);
                    self.finish_reassignment(partition, out);
                } else {
                    out.push((from, Message::PartitionState(state.clone())));
                }
            }
            Message::Sealed { leader, epoch, partition, offset } if leader == from => {
                self.sealed(leader, epoch, partition, offset, out);
            }
            _ => {} // not for the controller
        }
    }

    /// Periodic work: fence silent brokers.
    pub fn handle_tick(&mut self, now: Time, out: &mut Vec<(NodeId, Message)>) {
        self.last_now = self.last_now.max(now);
        if !self.held.is_empty() {
            self.elect_all(out);
        }
        if let Some(every) = self.config.rebalance_interval_ms {
            match self.last_rebalance {
                None => self.last_rebalance = Some(now),
                Some(t) if now.ms_since(t) >= every => {
                    self.last_rebalance = Some(now);
                    self.rebalance(out);
                }
                Some(_) => {}
            }
        }
        let silent: Vec<NodeId> = self
            .brokers
            .iter()
            .filter(|(_, b)| {
                b.alive && b.last_heartbeat.is_some_and(|t| now.ms_since(t) >= self.config.session_timeout_ms)
            })
            .map(|(&id, _)| id)
            .collect();
        if silent.is_empty() {
            return;
        }
        for id in &silent {
            decision!(self, warn, broker = %id, "broker fenced (session timeout)");
            self.brokers.get_mut(id).expect("listed above").alive = false;
        }
        let ids: Vec<PartitionId> = self.partitions.keys().copied().collect();
        for p in ids {
            self.remove_members(p, &silent, true, out);
        }
        self.elect_all(out);
    }

    /// A broker replaced damaged logs with empty ones: it leaves those ISRs even as the last
    /// member (then the partition is offline: its only in-sync copy is gone).
    fn lost_logs(&mut self, broker: NodeId, lost: &[PartitionId], out: &mut Vec<(NodeId, Message)>) {
        for &p in lost {
            if self.partitions.get(&p).is_some_and(|s| s.isr.contains(&broker)) {
                decision!(self, warn, %broker, partition = %p, "replica lost its log; removed from the ISR");
                self.remove_members(p, &[broker], false, out);
            }
        }
    }

    /// A broker restarted: it may have lost records (unsynced, or synced on a lying disk), so
    /// it leaves every ISR it is in (unless it is the last member) and every leadership ends
    /// (epoch bumped); then leaders are elected again. It rejoins ISRs by catching up.
    fn restarted(&mut self, broker: NodeId, out: &mut Vec<(NodeId, Message)>) {
        let ids: Vec<PartitionId> = self.partitions.keys().copied().collect();
        for p in ids {
            self.remove_members(p, &[broker], true, out);
        }
        self.elect_all(out);
    }

    /// Takes `brokers` out of partition `p`'s ISR (but never its last member when `keep_last`)
    /// and ends their leadership (epoch bumped); announces the new state if anything changed.
    fn remove_members(
        &mut self,
        p: PartitionId,
        brokers: &[NodeId],
        keep_last: bool,
        out: &mut Vec<(NodeId, Message)>,
    ) {
        let Some(state) = self.partitions.get_mut(&p) else { return };
        let mut changed = false;
        for b in brokers {
            if state.isr.contains(b) && (!keep_last || state.isr.len() > 1) {
                state.isr.retain(|r| r != b);
                changed = true;
            }
        }
        if state.leader.is_some_and(|l| brokers.contains(&l)) {
            state.leader = None;
            state.epoch = LeaderEpoch(state.epoch.0 + 1);
            changed = true;
        }
        if changed {
            state.isr_version = IsrVersion(state.isr_version.0 + 1);
            let state = state.clone();
            self.broadcast(&state, out);
        }
    }

    /// Elects a leader for every partition without one, from its live ISR members.
    fn elect_all(&mut self, out: &mut Vec<(NodeId, Message)>) {
        let alive: Vec<NodeId> = self.brokers.iter().filter(|(_, b)| b.alive).map(|(&id, _)| id).collect();
        let leaving: Vec<NodeId> = self.brokers.iter().filter(|(_, b)| b.shutting_down).map(|(&id, _)| id).collect();
        let ids: Vec<PartitionId> = self.partitions.keys().copied().collect();
        for p in ids {
            let state = self.partitions.get_mut(&p).expect("listed above");
            if state.leader.is_some() {
                continue;
            }
            match self.held.get(&p) {
                Some(&until) if until > self.last_now => continue, // handover: the old leader's lease
                Some(_) => {
                    self.held.remove(&p);
                }
                None => {}
            }
            // Preferred order: the assignment's; a broker shutting down only as a last resort.
            let live_isr = |r: &&NodeId| state.isr.contains(r) && alive.contains(r);
            let clean = state
                .replicas
                .iter()
                .filter(live_isr)
                .find(|r| !leaving.contains(r))
                .or_else(|| state.replicas.iter().find(live_isr));
            let leader = match clean {
                Some(&l) => l,
                None if self.unclean.contains(&p) => {
                    // Unclean election (the topic allows it): a live replica outside the ISR
                    // leads; records only the ISR held are lost.
                    let Some(&l) = state.replicas.iter().find(|r| alive.contains(r)) else { continue };
                    decision!(self, warn, partition = %p, leader = %l, isr = ?state.isr,
                        "UNCLEAN leader election: a replica outside the ISR leads; acknowledged records may be lost");
                    state.isr = vec![l];
                    l
                }
                None => continue,
            };
            state.leader = Some(leader);
            state.epoch = LeaderEpoch(state.epoch.0 + 1);
            // Members fenced since were removed then; ones that never registered stay (they
            // hold nothing yet, and the leader shrinks the ISR if they never catch up).
            assert!(state.isr.contains(&leader), "the new leader {leader} is in the ISR");
            state.isr_version = IsrVersion(state.isr_version.0 + 1);
            decision!(self, info, partition = %p, %leader, epoch = %state.epoch, "leader elected");
            let state = state.clone();
            self.broadcast(&state, out);
        }
    }

    /// Ends the replay if this heartbeat is the one it waits for.
    fn end_replay(&mut self, broker: NodeId, incarnation: u64) {
        let Narration::Replay { broker: me, incarnation: mine } = self.narration else { return };
        if broker == me && incarnation >= mine {
            self.narrate(Narration::Live);
        }
    }

    /// The one place the narration changes: live → replay before any input, replay → live once.
    fn narrate(&mut self, to: Narration) {
        match (self.narration, to) {
            (Narration::Live, Narration::Replay { .. }) => {
                assert_eq!(self.last_now, Time(0), "a replay starts before the first input");
            }
            (Narration::Replay { .. }, Narration::Live) => {}
            (from, to) => panic!("narration {from:?} cannot become {to:?}"),
        }
        self.narration = to;
    }

    fn broadcast(&self, state: &PartitionState, out: &mut Vec<(NodeId, Message)>) {
        for &r in &state.replicas {
            out.push((r, Message::PartitionState(state.clone())));
        }
    }
}

/// A controller state decoded from snapshot bytes ([`Controller::snapshot`]), not yet
/// restored ([`Controller::restore`]). Decoding checks everything a controller relies on, so a
/// value of this type is safe to restore: bad bytes give a [`SnapshotError`], never a panic.
///
/// Format (version 2, little-endian):
///
/// ```text
/// snapshot = magic "SKCS" | version u32 | body_len u32 | body_crc u32 | body     16 + body_len bytes
///   body_crc   crc32c over body
/// body     = last_now u64 | next_partition u32 | last_rebalance opt_u64
///            brokers:     n u32, n × (id u32 | last_heartbeat opt_u64 | alive u8 | incarnation opt_u64 | shutting_down u8)
///            partitions:  n u32, n × (id u32 | epoch u32 | leader opt_u32 | isr ids | isr_version u32 | replicas ids | seal)
///            topics:      n u32, n × (name str | scheme u8 | replication u16 | parts | n u32, n × (key str | value str))
/// seal     = 0 u8 (open) | 1 u8 (sealing) | 2 u8 offset u64 (sealed)
/// parts    = n u32, n × (id u32 | range | parents ids)      (index order)
/// range    = 0 u8 (hash scheme) | 1 u8 from bytes | opt_bytes to     bytes = len u32 | bytes
///            unclean:     ids
///            reassigning: n u32, n × (partition u32 | target ids)
///            deleted:     ids
///            held:        n u32, n × (partition u32 | until u64)
/// opt_T    = 0 u8 | 1 u8 T          ids = n u32, n × u32          str = len u32 | UTF-8 bytes
/// ```
///
/// Maps and sets are written in key order, so equal states give equal bytes.
#[derive(Debug)]
pub struct ControllerSnapshot {
    brokers: BTreeMap<NodeId, Broker>,
    partitions: BTreeMap<PartitionId, PartitionState>,
    topics: BTreeMap<String, Topic>,
    next_partition: u32,
    unclean: BTreeSet<PartitionId>,
    last_rebalance: Option<Time>,
    reassigning: BTreeMap<PartitionId, Vec<NodeId>>,
    deleted: BTreeSet<PartitionId>,
    held: BTreeMap<PartitionId, Time>,
    last_now: Time,
}

impl ControllerSnapshot {
    /// Decodes snapshot bytes: header, checksum, then the state, checked.
    pub fn decode(bytes: &[u8]) -> Result<ControllerSnapshot, SnapshotError> {
        let Some(header) = bytes.get(..SNAPSHOT_HEADER_BYTES) else {
            return Err(SnapshotError::Header(format!("{} bytes, shorter than the header", bytes.len())));
        };
        if &header[..4] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::Header(format!("magic {:02x?} is not {SNAPSHOT_MAGIC:?}", &header[..4])));
        }
        let version = le_u32(&header[4..8]);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        let body = &bytes[SNAPSHOT_HEADER_BYTES..];
        let body_bytes = le_u32(&header[8..12]);
        if u64::from(body_bytes) != body.len() as u64 {
            let what = format!("the header gives {body_bytes} body bytes, {} follow it", body.len());
            return Err(SnapshotError::Header(what));
        }
        let (expected, actual) = (le_u32(&header[12..16]), crc32c::crc32c(body));
        if expected != actual {
            return Err(SnapshotError::Checksum { expected, actual });
        }
        let mut r = Reader { bytes: body, at: 0 };
        let snapshot = decode_state(&mut r).map_err(|what| SnapshotError::Body { at: r.at, what })?;
        if r.at != body.len() {
            return Err(SnapshotError::Body { at: r.at, what: "bytes after the state".into() });
        }
        Ok(snapshot)
    }
}

/// Why snapshot bytes could not be decoded or restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The header is short, has another magic, or a length that does not match the bytes.
    #[error("bad controller snapshot header: {0}")]
    Header(String),
    /// A version this controller does not read.
    #[error("controller snapshot version {0} (this broker reads version {SNAPSHOT_VERSION})")]
    Version(u32),
    /// The body's checksum does not match.
    #[error("controller snapshot checksum mismatch (header {expected:#010x}, body {actual:#010x})")]
    Checksum {
        /// The checksum in the header.
        expected: u32,
        /// The body's.
        actual: u32,
    },
    /// The checksum matches but the state does not decode or breaks an invariant.
    #[error("controller snapshot body byte {at}: {what}")]
    Body {
        /// Where in the body.
        at: usize,
        /// What is wrong.
        what: String,
    },
    /// The snapshot's brokers are not this controller's (the voter lists differ).
    #[error("the controller snapshot names brokers {snapshot:?}, this controller {controller:?}")]
    Brokers {
        /// The snapshot's.
        snapshot: Vec<NodeId>,
        /// This controller's.
        controller: Vec<NodeId>,
    },
}

fn encode_state(c: &Controller, w: &mut Vec<u8>) {
    put_u64(w, c.last_now.0);
    put_u32(w, c.next_partition);
    put_opt_u64(w, c.last_rebalance.map(|t| t.0));
    put_len(w, c.brokers.len());
    for (id, b) in &c.brokers {
        put_u32(w, id.0);
        put_opt_u64(w, b.last_heartbeat.map(|t| t.0));
        w.push(u8::from(b.alive));
        put_opt_u64(w, b.incarnation);
        w.push(u8::from(b.shutting_down));
    }
    put_len(w, c.partitions.len());
    for (id, s) in &c.partitions {
        put_u32(w, id.0);
        put_u32(w, s.epoch.0);
        match s.leader {
            None => w.push(0),
            Some(l) => {
                w.push(1);
                put_u32(w, l.0);
            }
        }
        put_ids(w, s.isr.iter().map(|n| n.0), s.isr.len());
        put_u32(w, s.isr_version.0);
        put_ids(w, s.replicas.iter().map(|n| n.0), s.replicas.len());
        match s.seal {
            Seal::Open => w.push(0),
            Seal::Sealing => w.push(1),
            Seal::Sealed(at) => {
                w.push(2);
                put_u64(w, at.0);
            }
        }
    }
    put_len(w, c.topics.len());
    for (name, t) in &c.topics {
        put_str(w, name);
        w.push(t.partitioning.to_wire());
        w.extend_from_slice(&t.replication.to_le_bytes());
        put_len(w, t.parts.len());
        for part in &t.parts {
            put_u32(w, part.id.0);
            match &part.range {
                None => w.push(0),
                Some(r) => {
                    w.push(1);
                    put_bytes(w, &r.from);
                    match &r.to {
                        None => w.push(0),
                        Some(to) => {
                            w.push(1);
                            put_bytes(w, to);
                        }
                    }
                }
            }
            put_ids(w, part.parents.iter().copied(), part.parents.len());
        }
        put_len(w, t.configs.len());
        for (k, v) in &t.configs {
            put_str(w, k);
            put_str(w, v);
        }
    }
    put_ids(w, c.unclean.iter().map(|p| p.0), c.unclean.len());
    put_len(w, c.reassigning.len());
    for (p, target) in &c.reassigning {
        put_u32(w, p.0);
        put_ids(w, target.iter().map(|n| n.0), target.len());
    }
    put_ids(w, c.deleted.iter().map(|p| p.0), c.deleted.len());
    put_len(w, c.held.len());
    for (p, until) in &c.held {
        put_u32(w, p.0);
        put_u64(w, until.0);
    }
}

/// Decodes a body; the error says what is wrong, the reader's offset where.
fn decode_state(r: &mut Reader<'_>) -> Result<ControllerSnapshot, String> {
    let last_now = Time(r.u64()?);
    let next_partition = r.u32()?;
    let last_rebalance = r.opt_u64()?.map(Time);
    let mut brokers = BTreeMap::new();
    for _ in 0..r.count(BROKER_BYTES_MIN)? {
        let id = NodeId(r.u32()?);
        let last_heartbeat = r.opt_u64()?.map(Time);
        let alive = r.bool()?;
        let incarnation = r.opt_u64()?;
        let shutting_down = r.bool()?;
        let b = Broker { last_heartbeat, alive, incarnation, shutting_down };
        if brokers.insert(id, b).is_some() {
            return Err(format!("broker {id} twice"));
        }
    }
    let mut partitions = BTreeMap::new();
    for _ in 0..r.count(PARTITION_BYTES_MIN)? {
        let partition = PartitionId(r.u32()?);
        let epoch = LeaderEpoch(r.u32()?);
        let leader = match r.u8()? {
            0 => None,
            1 => Some(NodeId(r.u32()?)),
            b => return Err(format!("leader tag {b}")),
        };
        let isr = r.ids()?.into_iter().map(NodeId).collect();
        let isr_version = IsrVersion(r.u32()?);
        let replicas: Vec<NodeId> = r.ids()?.into_iter().map(NodeId).collect();
        // The controller indexes a partition's first replica (its preferred leader).
        if replicas.is_empty() {
            return Err(format!("partition {partition} has no replicas"));
        }
        let seal = match r.u8()? {
            0 => Seal::Open,
            1 => Seal::Sealing,
            2 => Seal::Sealed(Offset(r.u64()?)),
            b => return Err(format!("partition {partition}: seal tag {b}")),
        };
        let state = PartitionState { partition, epoch, leader, isr, isr_version, replicas, seal };
        if partitions.insert(partition, state).is_some() {
            return Err(format!("partition {partition} twice"));
        }
    }
    let mut topics = BTreeMap::new();
    for _ in 0..r.count(TOPIC_BYTES_MIN)? {
        let name = r.str()?;
        let scheme = r.u8()?;
        let partitioning =
            Partitioning::from_wire(scheme).ok_or_else(|| format!("topic {name:?}: partitioning {scheme}"))?;
        let replication = u16::from_le_bytes([r.u8()?, r.u8()?]);
        let mut parts: Vec<TopicPart> = Vec::new();
        for _ in 0..r.count(PART_BYTES_MIN)? {
            let id = PartitionId(r.u32()?);
            let range = match r.u8()? {
                0 => None,
                1 => {
                    let from = r.bytes()?;
                    let to = match r.u8()? {
                        0 => None,
                        1 => Some(r.bytes()?),
                        b => return Err(format!("topic {name:?}: range end tag {b}")),
                    };
                    Some(KeyRange { from, to })
                }
                b => return Err(format!("topic {name:?}: range tag {b}")),
            };
            let parents = r.ids()?;
            if id.0 >= next_partition || !partitions.contains_key(&id) {
                return Err(format!("topic {name:?}: partition {id} unknown or past the next id {next_partition}"));
            }
            if range.is_some() != partitioning.ranged() || parents.iter().any(|&i| i as usize >= parts.len()) {
                return Err(format!("topic {name:?}: partition {id}'s range or parents do not fit the topic"));
            }
            parts.push(TopicPart { id, range, parents });
        }
        if parts.is_empty() {
            return Err(format!("topic {name:?} has no partitions"));
        }
        let mut configs = Vec::new();
        for _ in 0..r.count(8)? {
            configs.push((r.str()?, r.str()?));
        }
        let topic = Topic { partitioning, parts, replication, configs };
        if topics.insert(name.clone(), topic).is_some() {
            return Err(format!("topic {name:?} twice"));
        }
    }
    let unclean = r.ids()?.into_iter().map(PartitionId).collect();
    let mut reassigning = BTreeMap::new();
    for _ in 0..r.count(8)? {
        let p = PartitionId(r.u32()?);
        let target = r.ids()?.into_iter().map(NodeId).collect();
        reassigning.insert(p, target);
    }
    let deleted = r.ids()?.into_iter().map(PartitionId).collect();
    let mut held = BTreeMap::new();
    for _ in 0..r.count(12)? {
        let p = PartitionId(r.u32()?);
        held.insert(p, Time(r.u64()?));
    }
    Ok(ControllerSnapshot {
        brokers,
        partitions,
        topics,
        next_partition,
        unclean,
        last_rebalance,
        reassigning,
        deleted,
        held,
        last_now,
    })
}

/// Reads a snapshot body; every read is bounded by the bytes left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else { return Err(format!("{n} bytes wanted, {} left", self.bytes.len() - self.at)) };
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(le_u32(self.take(4)?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("boolean byte {b}")),
        }
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            b => Err(format!("option tag {b}")),
        }
    }

    /// A count of items of at least `item_bytes_min` bytes each, checked against the bytes
    /// left, so no count allocates or loops more than the snapshot holds.
    fn count(&mut self, item_bytes_min: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        let left = self.bytes.len() - self.at;
        if n.saturating_mul(item_bytes_min) > left {
            return Err(format!("{n} items of {item_bytes_min}+ bytes in {left} bytes"));
        }
        Ok(n)
    }

    fn ids(&mut self) -> Result<Vec<u32>, String> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }

    fn str(&mut self) -> Result<String, String> {
        let n = self.count(1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "a string that is not UTF-8".to_owned())
    }
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_opt_u64(w: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put_u64(w, v);
        }
    }
}

fn put_len(w: &mut Vec<u8>, n: usize) {
    put_u32(w, u32::try_from(n).expect("controller collections hold far fewer than 2^32 items"));
}

fn put_ids(w: &mut Vec<u8>, ids: impl Iterator<Item = u32>, n: usize) {
    put_len(w, n);
    for id in ids {
        put_u32(w, id);
    }
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_len(w, b.len());
    w.extend_from_slice(b);
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_len(w, s.len());
    w.extend_from_slice(s.as_bytes());
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"SKCS";
/// 2: seals, partitioning schemes and topic partition lists (issue 21); 1 is not read.
const SNAPSHOT_VERSION: u32 = 2;
/// magic, version, body length, body checksum.
const SNAPSHOT_HEADER_BYTES: usize = 16;
/// id, two empty options, two flags.
const BROKER_BYTES_MIN: usize = 8;
/// id, epoch, no leader, empty ISR, ISR version, one replica, seal.
const PARTITION_BYTES_MIN: usize = 26;
/// empty name, scheme, replication, no partitions, no configs.
const TOPIC_BYTES_MIN: usize = 15;
/// id, no range, no parents.
const PART_BYTES_MIN: usize = 9;

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u32) -> NodeId {
        NodeId(i)
    }

    fn setup() -> (Controller, Vec<(NodeId, Message)>) {
        let mut c = Controller::new(
            ControllerConfig::default(),
            &[n(1), n(2), n(3)],
            &[(PartitionId(0), vec![n(1), n(2), n(3)])],
        );
        let mut out = Vec::new();
        for i in 1..=3 {
            c.handle_message(
                Time(0),
                n(i),
                Message::Heartbeat { broker: n(i), incarnation: 1, lost: vec![], sent: Time(0) },
                &mut out,
            );
        }
        (c, out)
    }

    fn heartbeat_all(c: &mut Controller, at: Time, incarnation: u64, out: &mut Vec<(NodeId, Message)>) {
        for i in 1..=3 {
            let msg = Message::Heartbeat { broker: n(i), incarnation, lost: vec![], sent: at };
            c.handle_message(at, n(i), msg, out);
        }
    }

    #[test]
    fn controlled_shutdown_moves_leadership_and_preferred_leaders_come_back() {
        let mut c = Controller::new(
            ControllerConfig { rebalance_interval_ms: Some(1_000), ..ControllerConfig::default() },
            &[n(1), n(2), n(3)],
            &[],
        );
        let mut out = Vec::new();
        heartbeat_all(&mut c, Time(0), 1, &mut out);
        c.create_topic("t", 3, 3, Partitioning::Hash, vec![], &mut out).expect("created");
        let leaders = |c: &Controller| c.partitions().map(|s| s.leader).collect::<Vec<_>>();
        assert_eq!(leaders(&c), vec![Some(n(1)), Some(n(2)), Some(n(3))], "preferred leaders, round-robin");
        assert_eq!(c.create_topic("t", 1, 1, Partitioning::Hash, vec![], &mut out), Err(CreateTopicError::Exists));
        assert!(matches!(
            c.create_topic("u", 1, 4, Partitioning::Hash, vec![], &mut out),
            Err(CreateTopicError::Invalid(_))
        ));
        // Whatever sent them (a forged peer frame reached the controller once), commands the
        // clients' API would refuse are refused here too, before they change anything.
        let huge = c.create_topic("big", PARTITIONS_PER_TOPIC_MAX + 1, 1, Partitioning::Hash, vec![], &mut out);
        assert!(matches!(huge, Err(CreateTopicError::Invalid(_))), "{huge:?}");
        for bad in ["", "..", "a/b", &"x".repeat(250)] {
            assert!(
                matches!(
                    c.create_topic(bad, 1, 1, Partitioning::Hash, vec![], &mut out),
                    Err(CreateTopicError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        let long_value = vec![("k".to_owned(), "v".repeat(CONFIG_VALUE_BYTES_MAX + 1))];
        assert!(matches!(
            c.create_topic("v", 1, 1, Partitioning::Hash, long_value, &mut out),
            Err(CreateTopicError::Invalid(_))
        ));
        assert!(!c.topics().contains_key("big") && !c.topics().contains_key("v"));

        // Broker 1 shuts down: it leads nothing and leaves the ISRs; a stale incarnation is ignored.
        c.controlled_shutdown(n(1), 7, &mut out);
        assert_eq!(c.partitions().next().expect("p").leader, Some(n(1)), "wrong incarnation ignored");
        c.controlled_shutdown(n(1), 1, &mut out);
        // Its partition is leaderless for the handover (its lease may still run), then elected.
        assert_eq!(leaders(&c), vec![None, Some(n(2)), Some(n(3))]);
        assert!(c.partitions().all(|s| !s.isr.contains(&n(1))));
        c.handle_tick(Time(100_000), &mut out);
        assert_eq!(leaders(&c)[0], None, "still within the handover");
        // While it is shutting down, rebalancing does not move leadership back to it.
        for t in [2_000_000, 4_000_000] {
            heartbeat_all(&mut c, Time(t), 1, &mut out);
            c.handle_tick(Time(t), &mut out);
        }
        let s0 = c.partitions().next().expect("p");
        assert!(s0.leader.is_some() && s0.leader != Some(n(1)), "{s0:?}");

        // It restarts (new incarnation) and catches up into the ISR: the next rebalance
        // makes it leader of its preferred partition again, with a new epoch.
        heartbeat_all(&mut c, Time(5_000_000), 2, &mut out);
        let s = c.partitions().next().expect("p").clone();
        let msg = Message::AlterIsr {
            leader: s.leader.expect("led"),
            epoch: s.epoch,
            isr_version: s.isr_version,
            partition: s.partition,
            isr: vec![n(1), n(2), n(3)],
        };
        c.handle_message(Time(5_000_000), s.leader.expect("led"), msg, &mut out);
        heartbeat_all(&mut c, Time(7_000_000), 2, &mut out);
        c.handle_tick(Time(7_000_000), &mut out);
        // The rebalance first takes leadership away (the old leader's lease may still run)...
        assert_eq!(c.partitions().next().expect("p").leader, None, "handover: nobody leads");
        heartbeat_all(&mut c, Time(7_400_000), 2, &mut out);
        c.handle_tick(Time(7_400_000), &mut out);
        // ...then the preferred replica leads.
        let after = c.partitions().next().expect("p");
        assert_eq!(after.leader, Some(n(1)), "preferred leader restored");
        assert!(after.epoch > s.epoch);
    }

    #[test]
    fn unclean_election_only_where_the_topic_allows_it() {
        let mut c = Controller::new(ControllerConfig::default(), &[n(1), n(2), n(3)], &[]);
        let mut out = Vec::new();
        heartbeat_all(&mut c, Time(0), 1, &mut out);
        c.create_topic("clean", 1, 2, Partitioning::Hash, vec![], &mut out).expect("created");
        let unclean = vec![("unclean.leader.election.enable".to_owned(), "true".to_owned())];
        c.create_topic("dirty", 1, 2, Partitioning::Hash, unclean, &mut out).expect("created");
        // Shrink both ISRs to their leader, then only the other replica stays alive.
        for s in c.partitions().cloned().collect::<Vec<_>>() {
            let l = s.leader.expect("led");
            let msg = Message::AlterIsr {
                leader: l,
                epoch: s.epoch,
                isr_version: s.isr_version,
                partition: s.partition,
                isr: vec![l],
            };
            c.handle_message(Time(1), l, msg, &mut out);
        }
        let (p0, p1) = (PartitionId(0), PartitionId(1));
        let dead0 = c.partition(p0).expect("p0").leader.expect("led");
        let dead1 = c.partition(p1).expect("p1").leader.expect("led");
        let survivors: Vec<NodeId> = (1..=3).map(n).filter(|b| *b != dead0 && *b != dead1).collect();
        for t in [100_000u64, 300_000, 500_000] {
            for b in &survivors {
                let msg = Message::Heartbeat { broker: *b, incarnation: 1, lost: vec![], sent: Time(t) };
                c.handle_message(Time(t), *b, msg, &mut out);
            }
            c.handle_tick(Time(t), &mut out);
        }
        let clean = c.partition(p0).expect("p0");
        let dirty = c.partition(p1).expect("p1");
        assert_eq!(clean.leader, None, "no live ISR member: offline, not unclean");
        assert_eq!(survivors, vec![n(3)]);
        assert_eq!(dirty.leader, Some(n(3)), "unclean election picked the live replica outside the ISR");
        assert_eq!(dirty.isr, vec![n(3)]);
    }

    #[test]
    fn history_is_decided_alike_and_logged_as_history_until_the_brokers_own_heartbeat() {
        let new = || {
            let p0 = (PartitionId(0), vec![n(1), n(2), n(3)]);
            Controller::new(ControllerConfig::default(), &[n(1), n(2), n(3)], &[p0])
        };
        // What a restarted broker 3 (incarnation 2) replays: its first process ran, then died
        // and was fenced.
        let history = |c: &mut Controller| {
            let mut out = Vec::new();
            heartbeat_all(c, Time(0), 1, &mut out); // leader elected
            for t in [200, 400, 600] {
                for i in 1..=2 {
                    let hb = Message::Heartbeat { broker: n(i), incarnation: 1, lost: vec![], sent: Time(0) };
                    c.handle_message(Time(0).plus_ms(t), n(i), hb, &mut out);
                }
                c.handle_tick(Time(0).plus_ms(t), &mut out); // broker 3 fenced
            }
            out
        };
        let mut live = new();
        let mut replay = new();
        replay.replay_until(n(3), 2);
        assert_eq!(history(&mut live), history(&mut replay), "the narration changes no decision");
        assert_eq!(live.partitions().collect::<Vec<_>>(), replay.partitions().collect::<Vec<_>>());
        assert!(!replay.alive(n(3)));
        assert!(!live.replaying());
        assert_eq!(live.decisions_replayed(), 0);
        assert!(replay.replaying(), "other brokers' and the old process's heartbeats are history");
        assert_eq!(replay.decisions_replayed(), 2, "leader elected, broker fenced");

        // Another broker's restart is history too.
        let mut out = Vec::new();
        let t = Time(0).plus_ms(700);
        let hb = Message::Heartbeat { broker: n(2), incarnation: 2, lost: vec![], sent: t };
        replay.handle_message(t, n(2), hb, &mut out);
        assert!(replay.replaying());
        assert_eq!(replay.decisions_replayed(), 3, "broker 2 restarted");

        // The new process's first heartbeat ends the replay; it and what follows are news.
        let hb = Message::Heartbeat { broker: n(3), incarnation: 2, lost: vec![], sent: t };
        replay.handle_message(t, n(3), hb, &mut out);
        assert!(!replay.replaying());
        replay.handle_tick(Time(0).plus_ms(2_000), &mut out); // everyone fenced
        assert!(replay.brokers().all(|(_, alive)| !alive));
        assert_eq!(replay.decisions_replayed(), 3, "'broker restarted' and the fencing are news");
    }

    #[test]
    fn first_heartbeat_elects_the_preferred_leader() {
        let (c, _) = setup();
        let s = c.partition(PartitionId(0)).expect("exists");
        assert_eq!(s.leader, Some(n(1)));
        assert_eq!(s.epoch, LeaderEpoch(1));
    }

    #[test]
    fn silent_leader_is_fenced_and_replaced_from_the_isr_with_a_new_epoch() {
        let (mut c, _) = setup();
        let mut out = Vec::new();
        let t = Time(0).plus_ms(300);
        for i in 2..=3 {
            c.handle_message(
                t,
                n(i),
                Message::Heartbeat { broker: n(i), incarnation: 1, lost: vec![], sent: t },
                &mut out,
            );
        }
        c.handle_tick(Time(0).plus_ms(450), &mut out);
        let s = c.partition(PartitionId(0)).expect("exists");
        assert_eq!(s.leader, Some(n(2)));
        assert_eq!(s.epoch, LeaderEpoch(3), "fencing bumps once (offline), election once more");
        assert_eq!(s.isr, vec![n(2), n(3)]);
        assert!(out
            .iter()
            .any(|(to, m)| *to == n(3) && matches!(m, Message::PartitionState(p) if p.leader == Some(n(2)))));
    }

    #[test]
    fn stale_isr_change_is_rejected_and_answered_with_the_current_state() {
        let (mut c, _) = setup();
        let mut out = Vec::new();
        let s = c.partition(PartitionId(0)).expect("exists").clone();
        let msg = Message::AlterIsr {
            leader: n(1),
            epoch: s.epoch,
            isr_version: IsrVersion(s.isr_version.0 - 1),
            partition: PartitionId(0),
            isr: vec![n(1)],
        };
        c.handle_message(Time(1), n(1), msg, &mut out);
        assert_eq!(c.partition(PartitionId(0)).expect("exists").isr, vec![n(1), n(2), n(3)]);
        assert_eq!(out, vec![(n(1), Message::PartitionState(s.clone()))]);
        let ok = Message::AlterIsr {
            leader: n(1),
            epoch: s.epoch,
            isr_version: s.isr_version,
            partition: PartitionId(0),
            isr: vec![n(1), n(3)],
        };
        out.clear();
        c.handle_message(Time(2), n(1), ok, &mut out);
        assert_eq!(c.partition(PartitionId(0)).expect("exists").isr, vec![n(1), n(3)]);
        assert_eq!(out.len(), 3, "broadcast to every replica");
    }

    #[test]
    fn a_restarted_leader_leaves_the_isr_and_a_new_leader_gets_a_new_epoch() {
        let (mut c, _) = setup();
        let mut out = Vec::new();
        c.handle_message(
            Time(5),
            n(1),
            Message::Heartbeat { broker: n(1), incarnation: 2, lost: vec![], sent: Time(5) },
            &mut out,
        );
        let s = c.partition(PartitionId(0)).expect("exists");
        assert_eq!(s.leader, Some(n(2)), "the restarted broker may have lost records: not elected");
        assert_eq!(s.isr, vec![n(2), n(3)]);
        assert_eq!(s.epoch, LeaderEpoch(3), "deposed: 2, elected: 3");
    }

    #[test]
    fn a_replica_that_lost_its_log_leaves_the_isr_even_as_its_last_member() {
        let (mut c, _) = setup();
        let mut out = Vec::new();
        c.handle_tick(Time(0).plus_ms(500), &mut out); // everyone silent: ISR keeps one
        let last = c.partition(PartitionId(0)).expect("exists").isr[0];
        let t = Time(0).plus_ms(600);
        let hb = Message::Heartbeat { broker: last, incarnation: 2, lost: vec![PartitionId(0)], sent: t };
        c.handle_message(t, last, hb, &mut out);
        let s = c.partition(PartitionId(0)).expect("exists");
        assert!(s.isr.is_empty(), "the only in-sync copy is gone");
        assert_eq!(s.leader, None, "no replica may lead: all would serve a log missing committed records");
    }

    #[test]
    fn a_late_heartbeat_of_an_earlier_process_is_ignored() {
        let (mut c, _) = setup();
        let mut out = Vec::new();
        let hb = |i| Message::Heartbeat { broker: n(2), incarnation: i, lost: vec![], sent: Time(5) };
        c.handle_message(Time(5), n(2), hb(2), &mut out);
        let before = c.partition(PartitionId(0)).expect("exists").clone();
        out.clear();
        c.handle_message(Time(6), n(2), hb(1), &mut out);
        assert_eq!(c.partition(PartitionId(0)).expect("exists"), &before, "no restart seen, no election");
        assert!(out.is_empty(), "and no answer to the dead process");
    }

    #[test]
    fn the_last_isr_member_stays_and_returns_as_leader() {
        let (mut c, _) = setup();
        let mut out = Vec::new();
        c.handle_tick(Time(0).plus_ms(500), &mut out); // everyone silent
        let s = c.partition(PartitionId(0)).expect("exists").clone();
        assert_eq!(s.leader, None);
        assert_eq!(s.isr.len(), 1, "the ISR never empties");
        let last = s.isr[0];
        let other = if last == n(2) { n(3) } else { n(2) };
        let t = Time(0).plus_ms(600);
        c.handle_message(
            t,
            other,
            Message::Heartbeat { broker: other, incarnation: 1, lost: vec![], sent: t },
            &mut out,
        );
        assert_eq!(c.partition(PartitionId(0)).expect("exists").leader, None, "only an ISR member may lead");
        c.handle_message(t, last, Message::Heartbeat { broker: last, incarnation: 1, lost: vec![], sent: t }, &mut out);
        assert_eq!(c.partition(PartitionId(0)).expect("exists").leader, Some(last));
    }

    /// A ranged topic "r" (hash-range, `n` partitions, replication 2) on three live brokers.
    fn ranged(scheme: Partitioning, n_parts: u32) -> (Controller, Vec<(NodeId, Message)>) {
        let mut c = Controller::new(ControllerConfig::default(), &[n(1), n(2), n(3)], &[]);
        let mut out = Vec::new();
        heartbeat_all(&mut c, Time(0), 1, &mut out);
        c.create_topic("r", n_parts, 2, scheme, vec![], &mut out).expect("created");
        (c, out)
    }

    fn part(c: &Controller, index: u32) -> (TopicPart, PartitionState) {
        let t = &c.topics()["r"];
        let p = t.parts[index as usize].clone();
        let s = c.partition(p.id).expect("exists").clone();
        (p, s)
    }

    #[test]
    fn a_split_seals_the_parent_and_its_children_take_the_two_halves() {
        let (mut c, _) = ranged(Partitioning::HashRange, 2);
        let (p0, s0) = part(&c, 0);
        let mut out = Vec::new();
        assert_eq!(c.split("r", 0, None, &mut out), Ok([2, 3]));
        let (a, sa) = part(&c, 2);
        let (b, _) = part(&c, 3);
        let whole = p0.range.clone().unwrap();
        assert_eq!(a.range.as_ref().unwrap().from, whole.from);
        assert!(a.range.as_ref().unwrap().precedes(b.range.as_ref().unwrap()));
        assert_eq!(b.range.as_ref().unwrap().to, whole.to);
        assert_eq!(a.range.as_ref().unwrap().to, Some((1u64 << 62).to_be_bytes().to_vec()), "the middle of [0, 2^63)");
        assert_eq!((a.parents.clone(), b.parents.clone()), (vec![0], vec![0]));
        assert!(sa.leader.is_some(), "children get leaders at once");
        assert_eq!(sa.replicas.len(), 2);
        // The parent: sealing, same epoch and leader, its replicas told.
        let (_, s0_now) = part(&c, 0);
        assert_eq!(s0_now.seal, Seal::Sealing);
        assert_eq!((s0_now.epoch, s0_now.leader), (s0.epoch, s0.leader));
        assert!(out.iter().any(|(to, m)| *to == s0.replicas[0]
            && matches!(m, Message::PartitionState(s) if s.partition == p0.id && s.seal == Seal::Sealing)));
        // A second split of the parent, or one outside the range, is refused and changes nothing.
        let before = c.snapshot();
        assert_eq!(c.split("r", 0, None, &mut out), Err(ResizeError::Sealed(0)));
        let outside = Some(u64::MAX.to_be_bytes().to_vec());
        assert!(matches!(c.split("r", 2, outside, &mut out), Err(ResizeError::Invalid(_))));
        assert_eq!(c.split("r", 9, None, &mut out), Err(ResizeError::NoPartition(9)));
        assert_eq!(c.split("nope", 0, None, &mut out), Err(ResizeError::NoTopic));
        assert_eq!(c.snapshot(), before);
    }

    #[test]
    fn the_seal_offset_comes_only_from_the_current_leader_at_its_epoch() {
        let (mut c, _) = ranged(Partitioning::KeyRange, 1);
        let mut out = Vec::new();
        c.split("r", 0, Some(b"m".to_vec()), &mut out).expect("split");
        let (p0, s0) = part(&c, 0);
        let leader = s0.leader.unwrap();
        let other = s0.replicas.iter().copied().find(|&r| r != leader).unwrap();
        let sealed =
            |leader, epoch, offset| Message::Sealed { leader, epoch, partition: p0.id, offset: Offset(offset) };
        c.handle_message(Time(1), other, sealed(other, s0.epoch, 5), &mut out);
        c.handle_message(Time(1), leader, sealed(leader, LeaderEpoch(s0.epoch.0 - 1), 6), &mut out);
        c.handle_message(Time(1), other, sealed(leader, s0.epoch, 7), &mut out); // spoofed sender
        assert_eq!(part(&c, 0).1.seal, Seal::Sealing, "a follower, an old epoch, a forged sender: ignored");
        c.handle_message(Time(1), leader, sealed(leader, s0.epoch, 42), &mut out);
        assert_eq!(part(&c, 0).1.seal, Seal::Sealed(Offset(42)));
        c.handle_message(Time(1), leader, sealed(leader, s0.epoch, 50), &mut out);
        assert_eq!(part(&c, 0).1.seal, Seal::Sealed(Offset(42)), "a seal never moves");
        let (low, high) = (part(&c, 1).0.range.unwrap(), part(&c, 2).0.range.unwrap());
        assert_eq!((low.to.as_deref(), high.from.as_slice()), (Some(&b"m"[..]), &b"m"[..]));
    }

    #[test]
    fn a_merge_joins_neighbours_only() {
        let (mut c, _) = ranged(Partitioning::HashRange, 4);
        let mut out = Vec::new();
        assert!(matches!(c.merge("r", [0, 2], &mut out), Err(ResizeError::Invalid(_))), "not neighbours");
        assert!(matches!(c.merge("r", [1, 1], &mut out), Err(ResizeError::Invalid(_))));
        assert_eq!(c.merge("r", [2, 1], &mut out), Ok(4));
        let (child, _) = part(&c, 4);
        assert_eq!(child.parents, vec![1, 2], "in range order");
        assert_eq!(child.range.as_ref().unwrap().from, part(&c, 1).0.range.unwrap().from);
        assert_eq!(child.range.as_ref().unwrap().to, part(&c, 2).0.range.unwrap().to);
        assert_eq!((part(&c, 1).1.seal, part(&c, 2).1.seal), (Seal::Sealing, Seal::Sealing));
        assert_eq!(c.merge("r", [0, 1], &mut out), Err(ResizeError::Sealed(1)));
        // The child merges on: its neighbours are 0 and 3.
        assert_eq!(c.merge("r", [0, 4], &mut out), Ok(5));
        assert_eq!(c.split("r", 5, None, &mut out), Ok([6, 7]));
    }

    #[test]
    fn a_hash_topic_neither_splits_nor_merges() {
        let (mut c, _) = ranged(Partitioning::Hash, 2);
        let mut out = Vec::new();
        assert!(matches!(c.split("r", 0, None, &mut out), Err(ResizeError::Invalid(m)) if m.contains("hash-range")));
        assert!(matches!(c.merge("r", [0, 1], &mut out), Err(ResizeError::Invalid(_))));
        assert_eq!(c.topics()["r"].count(), 2);
        assert!(c.topics()["r"].parts.iter().all(|p| p.range.is_none()));
    }

    #[test]
    fn a_deleted_topic_takes_its_children_along() {
        let (mut c, _) = ranged(Partitioning::HashRange, 1);
        let mut out = Vec::new();
        c.split("r", 0, None, &mut out).expect("split");
        let ids: Vec<PartitionId> = c.topics()["r"].parts.iter().map(|p| p.id).collect();
        assert!(c.delete_topic("r"));
        assert!(ids.iter().all(|p| c.deleted().contains(p) && c.partition(*p).is_none()));
    }

    /// A controller input, for the snapshot property test.
    #[derive(Clone, Debug)]
    enum Input {
        Heartbeat { broker: u32, incarnation: u64, lost: Vec<u32> },
        Tick,
        AlterIsr { partition: u32, isr: Vec<u32>, stale: bool },
        CreateTopic { name: u8, partitions: u32, replication: u16, unclean: bool, scheme: u8 },
        DeleteTopic { name: u8 },
        Split { name: u8, index: u32, at: Option<Vec<u8>> },
        Merge { name: u8, indexes: [u32; 2] },
        Sealed { partition: u32, offset: u64, stale: bool },
        Reassign { partition: u32, replicas: Vec<u32> },
        ControlledShutdown { broker: u32, incarnation: u64 },
    }

    fn input() -> impl proptest::strategy::Strategy<Value = Input> {
        use proptest::prelude::*;
        let ids = || proptest::collection::vec(1u32..=4, 0..4);
        prop_oneof![
            4 => (1u32..=4, 1u64..=3, proptest::collection::vec(0u32..6, 0..2))
                .prop_map(|(broker, incarnation, lost)| Input::Heartbeat { broker, incarnation, lost }),
            3 => Just(Input::Tick),
            2 => (0u32..6, ids(), any::<bool>())
                .prop_map(|(partition, isr, stale)| Input::AlterIsr { partition, isr, stale }),
            1 => (0u8..3, 0u32..3, 0u16..4, any::<bool>(), 0u8..4).prop_map(
                |(name, partitions, replication, unclean, scheme)| {
                    Input::CreateTopic { name, partitions, replication, unclean, scheme }
                }
            ),
            1 => (0u8..3, 0u32..6, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..3)))
                .prop_map(|(name, index, at)| Input::Split { name, index, at }),
            1 => (0u8..3, 0u32..6, 0u32..6).prop_map(|(name, a, b)| Input::Merge { name, indexes: [a, b] }),
            1 => (0u32..12, 0u64..100, any::<bool>())
                .prop_map(|(partition, offset, stale)| Input::Sealed { partition, offset, stale }),
            1 => (0u8..3).prop_map(|name| Input::DeleteTopic { name }),
            1 => (0u32..6, ids()).prop_map(|(partition, replicas)| Input::Reassign { partition, replicas }),
            1 => (1u32..=4, 1u64..=3)
                .prop_map(|(broker, incarnation)| Input::ControlledShutdown { broker, incarnation }),
        ]
    }

    /// Applies `input` at `now` (advanced by each input), returning the decisions as text.
    fn apply(c: &mut Controller, now: &mut Time, input: &Input) -> String {
        *now = now.plus_ms(90);
        let mut out = Vec::new();
        let result = match input.clone() {
            Input::Heartbeat { broker, incarnation, lost } => {
                let lost = lost.into_iter().map(PartitionId).collect();
                let hb = Message::Heartbeat { broker: n(broker), incarnation, lost, sent: *now };
                c.handle_message(*now, n(broker), hb, &mut out);
                String::new()
            }
            Input::Tick => {
                c.handle_tick(*now, &mut out);
                String::new()
            }
            Input::AlterIsr { partition, isr, stale } => {
                let Some(s) = c.partition(PartitionId(partition)).cloned() else { return "no partition".into() };
                let leader = s.leader.unwrap_or(n(1));
                let isr_version = IsrVersion(s.isr_version.0.saturating_sub(u32::from(stale)));
                let msg = Message::AlterIsr {
                    leader,
                    epoch: s.epoch,
                    isr_version,
                    partition: s.partition,
                    isr: isr.into_iter().map(n).collect(),
                };
                c.handle_message(*now, leader, msg, &mut out);
                String::new()
            }
            Input::CreateTopic { name, partitions, replication, unclean, scheme } => {
                let configs = if unclean {
                    vec![("unclean.leader.election.enable".to_owned(), "true".to_owned())]
                } else {
                    vec![]
                };
                let scheme = Partitioning::from_wire(scheme % 3).expect("three schemes");
                format!("{:?}", c.create_topic(&format!("t{name}"), partitions, replication, scheme, configs, &mut out))
            }
            Input::Split { name, index, at } => format!("{:?}", c.split(&format!("t{name}"), index, at, &mut out)),
            Input::Merge { name, indexes } => format!("{:?}", c.merge(&format!("t{name}"), indexes, &mut out)),
            Input::Sealed { partition, offset, stale } => {
                let Some(s) = c.partition(PartitionId(partition)).cloned() else { return "no partition".into() };
                let leader = s.leader.unwrap_or(n(1));
                let epoch = LeaderEpoch(s.epoch.0.saturating_sub(u32::from(stale)));
                let msg = Message::Sealed { leader, epoch, partition: s.partition, offset: Offset(offset) };
                c.handle_message(*now, leader, msg, &mut out);
                String::new()
            }
            Input::DeleteTopic { name } => format!("{}", c.delete_topic(&format!("t{name}"))),
            Input::Reassign { partition, replicas } => {
                format!("{:?}", c.reassign(PartitionId(partition), replicas.into_iter().map(n).collect(), &mut out))
            }
            Input::ControlledShutdown { broker, incarnation } => {
                c.controlled_shutdown(n(broker), incarnation, &mut out);
                String::new()
            }
        };
        format!("{result} {out:?}")
    }

    fn four_brokers() -> Controller {
        let config = ControllerConfig { rebalance_interval_ms: Some(500), ..ControllerConfig::default() };
        Controller::new(config, &[n(1), n(2), n(3), n(4)], &[(PartitionId(0), vec![n(1), n(2), n(3)])])
    }

    use proptest::prelude::any;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Snapshot, restore into a new controller, apply the same further inputs: the same
        /// decisions and the same state as the controller that never snapshotted.
        #[test]
        fn a_restored_snapshot_decides_as_the_original(
            inputs in proptest::collection::vec(input(), 0..80),
            at in any::<proptest::sample::Index>(),
        ) {
            let at = at.index(inputs.len() + 1);
            let (mut original, mut now) = (four_brokers(), Time(0));
            for i in &inputs[..at] {
                apply(&mut original, &mut now, i);
            }
            let bytes = original.snapshot();
            let mut restored = four_brokers();
            restored.restore(ControllerSnapshot::decode(&bytes).expect("decodes")).expect("restores");
            proptest::prop_assert_eq!(restored.snapshot(), bytes.clone(), "the same state");
            let mut restored_now = now;
            for i in &inputs[at..] {
                let a = apply(&mut original, &mut now, i);
                let b = apply(&mut restored, &mut restored_now, i);
                proptest::prop_assert_eq!(a, b, "the same decisions for {:?}", i);
            }
            proptest::prop_assert_eq!(original.snapshot(), restored.snapshot());
        }

        /// Damaged or arbitrary snapshot bytes decode to an error, never a panic; a single
        /// flipped bit is always caught.
        #[test]
        fn damaged_snapshots_are_errors(
            inputs in proptest::collection::vec(input(), 0..40),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (mut c, mut now) = (four_brokers(), Time(0));
            for i in &inputs {
                apply(&mut c, &mut now, i);
            }
            let mut bytes = c.snapshot();
            let at = flip.index(bytes.len());
            bytes[at] ^= 1 << bit;
            proptest::prop_assert!(ControllerSnapshot::decode(&bytes).is_err(), "flip at byte {}", at);
            let _ = ControllerSnapshot::decode(&junk);
            let mut valid_header = c.snapshot()[..SNAPSHOT_HEADER_BYTES].to_vec();
            valid_header[8..12].copy_from_slice(&(junk.len() as u32).to_le_bytes());
            valid_header[12..16].copy_from_slice(&crc32c::crc32c(&junk).to_le_bytes());
            valid_header.extend_from_slice(&junk);
            let _ = ControllerSnapshot::decode(&valid_header);
        }
    }

    #[test]
    fn a_snapshot_restores_only_onto_the_same_brokers_and_ends_a_replay_it_holds() {
        let (mut c, mut out) = setup();
        heartbeat_all(&mut c, Time(1_000), 2, &mut out);
        let bytes = c.snapshot();
        let mut other = Controller::new(ControllerConfig::default(), &[n(1), n(2)], &[]);
        let err = other.restore(ControllerSnapshot::decode(&bytes).expect("decodes")).expect_err("other brokers");
        assert!(matches!(err, SnapshotError::Brokers { .. }), "{err}");
        // Broker 3's process 2 restarted and its heartbeat is in the snapshot: no replay left.
        let mut restarted = Controller::new(ControllerConfig::default(), &[n(1), n(2), n(3)], &[]);
        restarted.replay_until(n(3), 2);
        restarted.restore(ControllerSnapshot::decode(&bytes).expect("decodes")).expect("restores");
        assert!(!restarted.replaying());
        assert_eq!(restarted.partitions().collect::<Vec<_>>(), c.partitions().collect::<Vec<_>>());
        // Process 3's replay goes on.
        let mut later = Controller::new(ControllerConfig::default(), &[n(1), n(2), n(3)], &[]);
        later.replay_until(n(3), 3);
        later.restore(ControllerSnapshot::decode(&bytes).expect("decodes")).expect("restores");
        assert!(later.replaying());
        for cut in 0..bytes.len() {
            assert!(ControllerSnapshot::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
