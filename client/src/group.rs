//! Consumer groups: a [`GroupConsumer`] that reads the partitions a group's coordinator
//! assigns it, and the group admin calls on [`Client`] (find the coordinator, list, describe,
//! fetch and commit offsets, reset offsets, delete).
//!
//! Assignment is server-side (as Kafka's KIP-848): one GroupHeartbeat request joins, stays in
//! and leaves the group, and each answer carries the full set of partitions the member should
//! own now. The member reconciles ([`reconcile`]): a partition it owns that is no longer
//! assigned is **revoked** (its consumed offset committed when auto-commit is on, the listener
//! told, its fetching stopped) and the next heartbeat goes at once, with the new owned set: that
//! acknowledges the revocation, and only then does the coordinator give the partition to
//! another member. A partition assigned and not owned is **added**: it starts at the group's
//! committed offset (OffsetFetch), or with none at the reset policy. A member fenced by the
//! coordinator (UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH), or whose heartbeats failed for a whole
//! session timeout, **loses** its partitions without committing (someone else may own them by
//! now) and joins again.
//!
//! Every group request but FindCoordinator goes to the group's coordinator, found from any
//! broker and cached in the [`Client`]; NOT_COORDINATOR or a broken connection forgets it.
//! Retriable failures (NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS, NOT_LEADER,
//! REQUEST_TIMED_OUT, a lost connection) are retried after [`COORDINATOR_RETRY_BACKOFF`]: by
//! the admin calls within the client's request timeout, by the consumer on its next heartbeat.
//!
//! Records are read by an ordinary [`Consumer`] (its sessions, replica choice and failover
//! all apply); this module only decides which partitions it reads and from where. It does not
//! assign partitions itself, and it does not reset a committed offset that fell out of the log
//! (the fetch fails with OFFSET_OUT_OF_RANGE; `skein group reset-offsets` repairs it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_channel::oneshot;

use crate::conn::{decode_body, Connection};
use crate::wire::{
    shown, ApiKey, DeleteGroupRequest, DeleteGroupResponse, DescribeGroupRequest, DescribeGroupResponse, ErrorCode,
    FindCoordinatorRequest, FindCoordinatorResponse, GroupHeartbeatRequest, GroupHeartbeatResponse, ListGroupsRequest,
    ListGroupsResponse, ListedGroup, OffsetCommitPartition, OffsetCommitRequest, OffsetCommitResponse,
    OffsetFetchPartition, OffsetFetchRequest, OffsetFetchResponse, TopicPartition, Wire, EARLIEST, GROUP_KEY,
    JOIN_EPOCH, LATEST, LEAVE_EPOCH, STATIC_LEAVE_EPOCH, TRANSACTION_KEY,
};
use crate::wire::{
    AbortTransactionResponse, AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, DescribeTransactionResponse,
    EndTxnResponse, InitProducerIdResponse, TxnOffsetCommitResponse,
};
use crate::{Client, ClientError, Consumer, ConsumerConfig, ConsumerRecord, Position};

/// A partition: topic and partition number.
pub type Partition = (String, u32);

/// How a group consumer joins its group.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// The group's name.
    pub group: String,
    /// A static member's identity (Kafka's `group.instance.id`): coming back with it within the
    /// session timeout gets the member its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// The coordinator fences a member it has not heard from for this long.
    pub session_timeout_ms: u32,
    /// How the coordinator spreads partitions over members.
    pub assignor: Assignor,
    /// Commit consumed offsets this often while polling, before a revocation and on close;
    /// `None`: only when the application commits.
    pub auto_commit: Option<Duration>,
    /// Where a partition without a committed offset starts.
    pub reset: OffsetReset,
}

impl GroupConfig {
    /// The defaults for group `group`: dynamic member, 10 s session, sticky assignor,
    /// auto-commit every second, earliest when nothing is committed.
    pub fn new(group: &str) -> GroupConfig {
        GroupConfig {
            group: group.to_owned(),
            instance_id: None,
            session_timeout_ms: 10_000,
            assignor: Assignor::Sticky,
            auto_commit: Some(Duration::from_secs(1)),
            reset: OffsetReset::Earliest,
        }
    }
}

pub use crate::wire::Assignor;

/// Where a partition without a committed offset starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OffsetReset {
    /// The log start.
    #[default]
    Earliest,
    /// The log end: only records written from now on.
    Latest,
}

/// Told of changes to a group consumer's partitions, during [`GroupConsumer::poll`].
pub trait RebalanceListener {
    /// These partitions were added; their records come from the next polls.
    fn on_assigned(&mut self, partitions: &[Partition]);
    /// These partitions are being given up (their offsets are committed first if auto-commit
    /// is on); no record of theirs is returned after this.
    fn on_revoked(&mut self, partitions: &[Partition]);
    /// These partitions were lost (the member was fenced or its session ran out): another
    /// member may own them already, so nothing was committed. By default, as a revocation.
    fn on_lost(&mut self, partitions: &[Partition]) {
        self.on_revoked(partitions);
    }
}

/// Counts of a group consumer's group activity since it was created (for load generators).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Heartbeats answered without error.
    pub heartbeats: u64,
    /// Heartbeat answers that changed the owned partitions.
    pub rebalances: u64,
    /// Partitions added.
    pub assigned: u64,
    /// Partitions revoked.
    pub revoked: u64,
    /// Partitions lost (fenced, or the session ran out).
    pub lost: u64,
    /// Times the member joined (the first join included).
    pub joins: u64,
    /// Offset commits answered without error.
    pub commits: u64,
    /// Offset commits that failed (as a whole or for a partition).
    pub commit_failures: u64,
}

/// Reads the partitions a group's coordinator assigns to this member.
///
/// Call [`GroupConsumer::subscribe`], then [`GroupConsumer::poll`] in a loop: each call
/// heartbeats when one is due (joining the first time), reconciles the assignment, commits when
/// auto-commit is due, and returns the next records of the owned partitions. It waits at most
/// the consumer's `max_wait` (at most [`GROUP_FETCH_WAIT_MAX`]) plus the time of a heartbeat,
/// so heartbeats stay on time. Call [`GroupConsumer::close`] to commit and leave; a consumer
/// dropped without it stays a member until its session times out.
pub struct GroupConsumer {
    client: Client,
    consumer: Consumer,
    config: GroupConfig,
    /// Sent in heartbeats: this machine's name, and the consumer's rack.
    host: String,
    rack: String,
    /// Sorted, without repeats.
    subscription: Vec<String>,
    /// The subscription changed since the last heartbeat answered.
    topics_dirty: bool,
    member_id: String,
    member_epoch: i32,
    heartbeat_interval: Duration,
    next_heartbeat: Instant,
    /// When a heartbeat was last answered without error.
    heartbeat_ok_at: Instant,
    /// The partitions this member owns (and its consumer reads).
    owned: BTreeSet<Partition>,
    /// The owned set changed since the last heartbeat answered.
    owned_dirty: bool,
    /// Per owned partition: the next offset to commit (the position after what was returned).
    consumed: BTreeMap<Partition, u64>,
    /// Per owned partition: the offset known to be committed.
    committed: BTreeMap<Partition, u64>,
    async_commits: VecDeque<AsyncCommit>,
    /// The failure of an async commit, returned by the next `commit_async`.
    async_error: Option<ClientError>,
    next_auto_commit: Instant,
    listener: Option<Box<dyn RebalanceListener>>,
    stats: GroupStats,
    closed: bool,
    /// When the subscribed ranged topics' lineage was last looked at (issue 21).
    lineage_at: Option<Instant>,
    /// Subscribed topics known to be hash-partitioned (no lineage to follow).
    hash_topics: BTreeSet<String>,
}

impl GroupConsumer {
    /// A member of `group.group`, not joined yet (the first poll after
    /// [`GroupConsumer::subscribe`] joins). The consumer's `max_wait` is capped at
    /// [`GROUP_FETCH_WAIT_MAX`] so polls return in time for heartbeats.
    pub fn new(client: Client, mut config: ConsumerConfig, group: GroupConfig) -> GroupConsumer {
        config.max_wait = config.max_wait.min(GROUP_FETCH_WAIT_MAX);
        let rack = config.rack.clone().unwrap_or_default();
        let now = Instant::now();
        GroupConsumer {
            consumer: Consumer::new(client.clone(), config),
            client,
            host: local_host_name(),
            rack,
            subscription: Vec::new(),
            topics_dirty: true,
            member_id: String::new(),
            member_epoch: JOIN_EPOCH,
            heartbeat_interval: HEARTBEAT_INTERVAL_DEFAULT,
            next_heartbeat: now,
            heartbeat_ok_at: now,
            owned: BTreeSet::new(),
            owned_dirty: true,
            consumed: BTreeMap::new(),
            committed: BTreeMap::new(),
            async_commits: VecDeque::new(),
            async_error: None,
            next_auto_commit: now + group.auto_commit.unwrap_or_default(),
            listener: None,
            stats: GroupStats::default(),
            closed: false,
            lineage_at: None,
            hash_topics: BTreeSet::new(),
            config: group,
        }
    }

    /// Subscribes to these topics (replacing the subscription); the next poll tells the
    /// coordinator.
    pub fn subscribe(&mut self, topics: &[&str]) {
        let mut topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        topics.sort();
        topics.dedup();
        if topics != self.subscription {
            self.subscription = topics;
            self.topics_dirty = true;
            self.next_heartbeat = Instant::now();
        }
    }

    /// Called on every change to the owned partitions, from within `poll` (and `close`).
    pub fn set_listener(&mut self, listener: Box<dyn RebalanceListener>) {
        self.listener = Some(listener);
    }

    /// Heartbeats and reconciles when due, auto-commits when due, then returns the next
    /// records of the owned partitions (none while it owns none: it waits up to the
    /// consumer's `max_wait` instead, or less if a heartbeat is due sooner). Each partition's
    /// consumed offset becomes the position after the records returned (lower it with
    /// [`GroupConsumer::set_consumed`] for records not processed). Fails for errors retrying
    /// cannot fix: a bad group id or assignor, or the consumer's own (OFFSET_OUT_OF_RANGE ...).
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        if self.closed {
            return Err(ClientError::Invalid("the group consumer is closed".into()));
        }
        if self.subscription.is_empty() {
            return Err(ClientError::Invalid("subscribe to a topic before polling".into()));
        }
        self.reap_async_commits();
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat().await?;
        }
        if self.config.auto_commit.is_some() && Instant::now() >= self.next_auto_commit {
            self.auto_commit().await;
        }
        self.follow_lineage().await;
        if !self.consumer.is_assigned_any() {
            let now = Instant::now();
            let wait = self.next_heartbeat.saturating_duration_since(now).min(GROUP_FETCH_WAIT_MAX);
            compio::time::sleep(wait.max(IDLE_WAIT_MIN)).await;
            return Ok(Vec::new());
        }
        let before: Vec<Option<u64>> = self.owned.iter().map(|(t, p)| self.consumer.position(t, *p)).collect();
        let records = self.consumer.poll().await?;
        // Every partition whose position moved: by records returned, or past batches that are
        // not handed out (transaction markers, aborted transactions), so a commit covers them
        // and a group that read everything has nothing left to read.
        for (key, before) in self.owned.iter().zip(before) {
            let position = self.consumer.position(&key.0, key.1);
            if let Some(position) = position.filter(|_| position != before) {
                self.consumed.insert(key.clone(), position);
            }
        }
        Ok(records)
    }

    /// Commits the consumed offsets of the owned partitions that changed since their last
    /// commit, and waits for the answer.
    pub async fn commit_sync(&mut self) -> Result<(), ClientError> {
        let owned: Vec<Partition> = self.owned.iter().cloned().collect();
        self.commit_partitions(&owned).await
    }

    /// Sends a commit of the consumed offsets (as [`GroupConsumer::commit_sync`]) without
    /// waiting for its answer. A failure is logged and returned by the next call of this
    /// method (the commit asked for now is still sent).
    pub async fn commit_async(&mut self) -> Result<(), ClientError> {
        self.reap_async_commits();
        let earlier = self.async_error.take();
        let offsets = self.pending_offsets(self.owned.iter());
        if !offsets.is_empty() {
            self.send_async_commit(offsets).await?;
        }
        earlier.map_or(Ok(()), Err)
    }

    /// Commits these offsets (`offset`: the next one to read) of owned partitions, and waits.
    pub async fn commit_offsets(&mut self, offsets: &[(String, u32, u64, String)]) -> Result<(), ClientError> {
        let offsets: Vec<OffsetCommitPartition> = offsets
            .iter()
            .map(|(topic, partition, offset, metadata)| OffsetCommitPartition {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                metadata: metadata.clone(),
            })
            .collect();
        self.commit_now(offsets).await
    }

    /// Sets the offset commits use for an owned partition: the next offset to read, e.g. the
    /// first record returned by a poll that was not processed.
    pub fn set_consumed(&mut self, topic: &str, partition: u32, next_offset: u64) -> Result<(), ClientError> {
        let key = (topic.to_owned(), partition);
        if !self.owned.contains(&key) {
            return Err(ClientError::Invalid(format!("{topic}/{partition} is not owned by this member")));
        }
        self.consumed.insert(key, next_offset);
        Ok(())
    }

    /// Moves an owned partition's reads to `offset` (the next record returned is the one
    /// there), and its consumed offset with them: e.g. back to the first record of an aborted
    /// transaction's input, so it is processed again.
    pub async fn seek(&mut self, topic: &str, partition: u32, offset: u64) -> Result<(), ClientError> {
        let key = (topic.to_owned(), partition);
        if !self.owned.contains(&key) {
            return Err(ClientError::Invalid(format!("{topic}/{partition} is not owned by this member")));
        }
        self.consumer.seek(topic, partition, Position::Offset(offset)).await?;
        self.consumed.insert(key, offset);
        Ok(())
    }

    /// The offset commits use for an owned partition.
    pub fn consumed(&self, topic: &str, partition: u32) -> Option<u64> {
        self.consumed.get(&(topic.to_owned(), partition)).copied()
    }

    /// The group's committed offset of a partition (asked of the coordinator); `None` if none.
    pub async fn committed(&self, topic: &str, partition: u32) -> Result<Option<u64>, ClientError> {
        let asked = vec![(topic.to_owned(), partition)];
        let offsets = self.client.fetch_offsets(&self.config.group, Some(&asked)).await?;
        Ok(offsets
            .iter()
            .find(|o| o.topic == topic && o.partition == partition)
            .and_then(|o| u64::try_from(o.offset).ok()))
    }

    /// The consumed offsets of the owned partitions (the next offset to read of each, as a
    /// commit would send them), sorted: what a transactional producer passes to
    /// `TransactionalProducer::send_offsets` with [`GroupConsumer::group_metadata`].
    pub fn consumed_offsets(&self) -> Vec<(String, u32, u64)> {
        self.owned.iter().filter_map(|key| self.consumed.get(key).map(|&o| (key.0.clone(), key.1, o))).collect()
    }

    /// The group, member id and member epoch, as a transactional offset commit names them
    /// (the coordinator refuses offsets from a member it fenced).
    pub fn group_metadata(&self) -> GroupMetadata {
        GroupMetadata {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.member_epoch,
        }
    }

    /// Notes offsets committed by other means (a transaction that committed them): they are
    /// not committed again by auto-commit or `commit_sync`.
    pub fn note_committed(&mut self, offsets: &[(String, u32, u64)]) {
        for (topic, partition, offset) in offsets {
            let key = (topic.clone(), *partition);
            if self.owned.contains(&key) {
                self.committed.insert(key, *offset);
            }
        }
    }

    /// The owned partitions, sorted.
    pub fn assignment(&self) -> Vec<Partition> {
        self.owned.iter().cloned().collect()
    }

    /// The member id the coordinator gave (empty before joining).
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The member epoch (0 before joining).
    pub fn member_epoch(&self) -> i32 {
        self.member_epoch
    }

    /// Counts of group activity.
    pub fn stats(&self) -> GroupStats {
        self.stats
    }

    /// The underlying consumer (read stats, session lag, positions).
    pub fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// Commits (with auto-commit on), gives up the owned partitions (the listener is told, as
    /// revoked) and leaves the group: a static member with [`STATIC_LEAVE_EPOCH`] (it keeps
    /// its partitions until its session times out), others with [`LEAVE_EPOCH`]. Returns the
    /// commit's failure, if any; a failed leave is only logged (the session then times out).
    pub async fn close(&mut self) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let committed = match self.config.auto_commit {
            Some(_) => self.commit_sync().await,
            None => Ok(()),
        };
        self.reap_async_commits();
        let owned: Vec<Partition> = self.owned.iter().cloned().collect();
        if !owned.is_empty() {
            if let Some(l) = self.listener.as_mut() {
                l.on_revoked(&owned);
            }
            self.drop_partitions(&owned);
        }
        if !self.member_id.is_empty() {
            let static_member = self.config.instance_id.as_deref().is_some_and(|i| !i.is_empty());
            let epoch = if static_member { STATIC_LEAVE_EPOCH } else { LEAVE_EPOCH };
            let req = self.heartbeat_request(epoch);
            if let Err(e) =
                self.client.group_call::<_, GroupHeartbeatResponse>(&req.group, ApiKey::GroupHeartbeat, &req).await
            {
                tracing::warn!(group = %self.config.group, error = %e, "leaving the group failed; the session will time out");
            }
            self.member_id.clear();
            self.member_epoch = JOIN_EPOCH;
        }
        committed
    }

    /// Sends heartbeats until the owned set the coordinator knows is current (a revocation or
    /// an addition is acknowledged at once), reconciling each answer.
    async fn heartbeat(&mut self) -> Result<(), ClientError> {
        let session_timeout = Duration::from_millis(u64::from(self.config.session_timeout_ms));
        if self.member_epoch > JOIN_EPOCH && self.heartbeat_ok_at.elapsed() > session_timeout {
            // The coordinator has fenced this member by now and may have given its partitions away.
            tracing::warn!(group = %self.config.group, "no heartbeat answered for a session timeout; rejoining");
            self.lose_all();
            self.member_id.clear();
            self.member_epoch = JOIN_EPOCH;
        }
        for _ in 0..HEARTBEATS_PER_POLL_MAX {
            let req = self.heartbeat_request(self.member_epoch);
            let bound = self.client.config().request_timeout.min(session_timeout);
            match self
                .client
                .group_call_once::<_, GroupHeartbeatResponse>(&req.group, ApiKey::GroupHeartbeat, &req, bound)
                .await
            {
                Ok(resp) => {
                    self.heartbeat_answered(&req, &resp);
                    self.reconcile_to(&resp.assignment).await;
                }
                Err(ClientError::Broker(code @ (ErrorCode::UNKNOWN_MEMBER_ID | ErrorCode::FENCED_MEMBER_EPOCH), _)) => {
                    tracing::info!(group = %self.config.group, member = %self.member_id, %code, "fenced; rejoining");
                    self.lose_all();
                    // A fenced member rejoins under its id; an unknown one as a new member.
                    if code == ErrorCode::UNKNOWN_MEMBER_ID {
                        self.member_id.clear();
                    }
                    self.member_epoch = JOIN_EPOCH;
                    self.next_heartbeat = Instant::now();
                    continue;
                }
                Err(e) if e.is_retriable() => {
                    tracing::debug!(group = %self.config.group, error = %e, "heartbeat failed; retrying");
                    self.next_heartbeat = Instant::now() + COORDINATOR_RETRY_BACKOFF;
                    return Ok(());
                }
                Err(e) => {
                    self.next_heartbeat = Instant::now() + COORDINATOR_RETRY_BACKOFF;
                    return Err(e);
                }
            }
            if !self.owned_dirty {
                break;
            }
        }
        Ok(())
    }

    fn heartbeat_request(&self, member_epoch: i32) -> GroupHeartbeatRequest {
        let joining = member_epoch == JOIN_EPOCH;
        GroupHeartbeatRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch,
            instance_id: self.config.instance_id.clone().unwrap_or_default(),
            client_id: self.client.config().client_id.clone(),
            host: self.host.clone(),
            rack: self.rack.clone(),
            session_timeout_ms: self.config.session_timeout_ms,
            assignor: self.config.assignor.name().to_owned(),
            topics: (joining || self.topics_dirty).then(|| self.subscription.clone()),
            owned: (joining || self.owned_dirty).then(|| {
                self.owned
                    .iter()
                    .map(|(topic, partition)| TopicPartition { topic: topic.clone(), partition: *partition })
                    .collect()
            }),
        }
    }

    fn heartbeat_answered(&mut self, req: &GroupHeartbeatRequest, resp: &GroupHeartbeatResponse) {
        let now = Instant::now();
        self.stats.heartbeats += 1;
        if req.member_epoch == JOIN_EPOCH {
            self.stats.joins += 1;
        }
        self.heartbeat_ok_at = now;
        if req.topics.as_ref() == Some(&self.subscription) {
            self.topics_dirty = false;
        }
        if req.owned.is_some() {
            self.owned_dirty = false;
        }
        if !resp.member_id.is_empty() {
            self.member_id.clone_from(&resp.member_id);
        }
        self.member_epoch = resp.member_epoch;
        if resp.heartbeat_interval_ms > 0 {
            self.heartbeat_interval = Duration::from_millis(u64::from(resp.heartbeat_interval_ms));
        }
        self.next_heartbeat = now + self.heartbeat_interval;
    }

    /// Revokes what is owned but not assigned, adds what is assigned but not owned. An
    /// addition that fails (no committed offsets, no log start) is left for the next answer.
    async fn reconcile_to(&mut self, assignment: &[TopicPartition]) {
        let target: BTreeSet<Partition> = assignment.iter().map(|tp| (tp.topic.clone(), tp.partition)).collect();
        let (revoked, added) = reconcile(&self.owned, &target);
        if revoked.is_empty() && added.is_empty() {
            return;
        }
        self.stats.rebalances += 1;
        if !revoked.is_empty() {
            self.revoke(&revoked).await;
        }
        if !added.is_empty() {
            if let Err(e) = self.add(&added).await {
                tracing::warn!(group = %self.config.group, error = %e, "starting assigned partitions failed; retrying on the next heartbeat");
            }
        }
    }

    async fn revoke(&mut self, revoked: &[Partition]) {
        if self.config.auto_commit.is_some() {
            if let Err(e) = self.commit_partitions(revoked).await {
                tracing::warn!(group = %self.config.group, error = %e, "committing revoked partitions failed");
            }
        }
        if let Some(l) = self.listener.as_mut() {
            l.on_revoked(revoked);
        }
        self.stats.revoked += revoked.len() as u64;
        self.drop_partitions(revoked);
    }

    /// Starts added partitions at their committed offsets (else at the reset policy). The
    /// offsets are asked for at most a heartbeat interval (UNSTABLE_OFFSET_COMMIT while a
    /// transaction holding offsets of them is undecided is retried meanwhile); past it the
    /// partitions wait for the next heartbeat, which is sent soon, so heartbeats stay on time
    /// however long the transaction takes.
    async fn add(&mut self, added: &[Partition]) -> Result<(), ClientError> {
        let bound = self.heartbeat_interval.min(self.client.config().request_timeout);
        let deadline = Instant::now() + bound;
        let asked = Some(added);
        let group = self.config.group.as_str();
        let fetched = self
            .client
            .retrying_until(deadline, COORDINATOR_RETRY_BACKOFF, || self.client.fetch_offsets_once(group, asked, bound))
            .await;
        let committed = match fetched {
            Ok(c) => c,
            Err(e) => {
                if e.is_retriable() {
                    self.next_heartbeat = self.next_heartbeat.min(Instant::now() + COORDINATOR_RETRY_BACKOFF);
                }
                return Err(e);
            }
        };
        // A partition split or merged from others holds only records written after its
        // parents' seals: with no committed offset it is read from its beginning whatever the
        // reset policy (else `latest` would skip what follows the parents' records).
        // Their lineage is noted before their first fetch (below), so a child never goes
        // ahead of its parents; without the metadata nothing is added (the next answer tries).
        let mut children: BTreeSet<Partition> = BTreeSet::new();
        let mut lineages = Vec::new();
        let topics: BTreeSet<&String> =
            added.iter().map(|(t, _)| t).filter(|t| !self.hash_topics.contains(*t)).collect();
        for topic in topics {
            let t = self.client.topic_metadata(topic).await?;
            if t.partitioning == 0 {
                continue;
            }
            // A broker whose metadata lags the coordinator's may not show a new child yet:
            // nothing is added until it does (its parents are unknown till then).
            if let Some((_, p)) =
                added.iter().find(|(at, p)| at == topic && !t.partitions.iter().any(|q| q.partition == *p))
            {
                return Err(ClientError::Broker(
                    crate::wire::ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    format!("{topic}/{p} is not in the metadata yet"),
                ));
            }
            let with_parents = t.partitions.iter().filter(|p| !p.lineage.parents.is_empty());
            children.extend(with_parents.map(|p| (topic.clone(), p.partition)));
            lineages.push(t);
        }
        self.lineage_at = None; // and the group's committed offsets of their parents looked up
        let mut started = Vec::with_capacity(added.len());
        let mut failed = None;
        for (topic, partition) in added {
            let at = committed.iter().find(|o| &o.topic == topic && o.partition == *partition).map(|o| o.offset);
            let child = children.contains(&(topic.clone(), *partition));
            let from = match at.and_then(|o| u64::try_from(o).ok()) {
                Some(o) => Position::Offset(o),
                None if self.config.reset == OffsetReset::Latest && !child => Position::End,
                None => Position::Beginning,
            };
            if let Err(e) = self.consumer.assign(topic, &[*partition], from).await {
                failed.get_or_insert(e);
                continue;
            }
            let key = (topic.clone(), *partition);
            let position = self.consumer.position(topic, *partition).expect("just assigned");
            self.consumed.insert(key.clone(), position);
            if let Position::Offset(o) = from {
                self.committed.insert(key.clone(), o);
            }
            self.owned.insert(key.clone());
            started.push(key);
        }
        for t in &lineages {
            self.consumer.note_lineage(t);
        }
        if !started.is_empty() {
            self.owned_dirty = true;
            self.stats.assigned += started.len() as u64;
            if let Some(l) = self.listener.as_mut() {
                l.on_assigned(&started);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Drops every owned partition without committing, telling the listener they are lost.
    fn lose_all(&mut self) {
        let lost: Vec<Partition> = self.owned.iter().cloned().collect();
        if lost.is_empty() {
            return;
        }
        self.stats.lost += lost.len() as u64;
        if let Some(l) = self.listener.as_mut() {
            l.on_lost(&lost);
        }
        self.drop_partitions(&lost);
    }

    fn drop_partitions(&mut self, parts: &[Partition]) {
        for key in parts {
            self.consumer.unassign(&key.0, key.1);
            self.owned.remove(key);
            self.consumed.remove(key);
            self.committed.remove(key);
        }
        self.owned_dirty = true;
    }

    /// Ranged topics (issue 21), as the Kinesis client library does with shard leases: an
    /// owned partition is fetched only after the partitions it was split or merged from are
    /// read to their seals, here or by another member (whose commit of the seal offset says
    /// so); an owned partition read to its seal is committed at once, so the members owning
    /// its children go on. Every `LINEAGE_REFRESH`.
    async fn follow_lineage(&mut self) {
        if self.lineage_at.is_some_and(|t| t.elapsed() < crate::consumer::LINEAGE_REFRESH) {
            return;
        }
        self.lineage_at = Some(Instant::now());
        let topics: Vec<String> =
            self.subscription.iter().filter(|t| !self.hash_topics.contains(*t)).cloned().collect();
        let mut asked: Vec<(Partition, Option<u64>)> = Vec::new();
        for topic in topics {
            let t = match self.client.topic_metadata(&topic).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "a subscribed topic's lineage");
                    continue;
                }
            };
            if t.partitioning == 0 {
                self.hash_topics.insert(topic);
                continue;
            }
            for (parent, seal) in self.consumer.note_lineage(&t) {
                asked.push(((topic.clone(), parent), seal));
            }
        }
        let finished: Vec<Partition> = self
            .consumer
            .finished()
            .into_iter()
            .map(|(t, p, _)| (t.to_string(), p))
            .filter(|key| self.owned.contains(key))
            .collect();
        if let Err(e) = self.commit_partitions(&finished).await {
            tracing::debug!(group = %self.config.group, error = %e, "committing partitions read to their seals");
        }
        let parents: Vec<Partition> = asked.iter().filter(|(_, seal)| seal.is_some()).map(|(k, _)| k.clone()).collect();
        if parents.is_empty() {
            return;
        }
        let bound = self.client.config().request_timeout;
        match self.client.fetch_offsets_once(&self.config.group, Some(&parents), bound).await {
            Ok(committed) => {
                for ((topic, parent), seal) in asked {
                    let Some(seal) = seal else { continue };
                    let at = committed.iter().find(|o| o.topic == topic && o.partition == parent).map(|o| o.offset);
                    // Its owner commits the seal offset only once the parent's own parents
                    // are done (even an empty one, sealed at 0): that commit is the signal.
                    if at.is_some_and(|o| o >= 0 && o as u64 >= seal) {
                        self.consumer.note_done(&topic, parent);
                    }
                }
            }
            Err(e) => tracing::debug!(group = %self.config.group, error = %e, "looking up the parents' offsets"),
        }
    }

    async fn auto_commit(&mut self) {
        self.next_auto_commit = Instant::now() + self.config.auto_commit.unwrap_or_default();
        let offsets = self.pending_offsets(self.owned.iter());
        if offsets.is_empty() {
            return;
        }
        if let Err(e) = self.send_async_commit(offsets).await {
            tracing::debug!(group = %self.config.group, error = %e, "auto-commit not sent; next interval");
        }
    }

    /// The consumed offsets of `parts` that differ from their committed ones.
    fn pending_offsets<'a>(&self, parts: impl Iterator<Item = &'a Partition>) -> Vec<OffsetCommitPartition> {
        parts
            .filter(|key| !self.consumer.waits_for_parents(&key.0, key.1))
            .filter_map(|key| {
                let consumed = *self.consumed.get(key)?;
                (self.committed.get(key) != Some(&consumed)).then(|| OffsetCommitPartition {
                    topic: key.0.clone(),
                    partition: key.1,
                    offset: consumed,
                    metadata: String::new(),
                })
            })
            .collect()
    }

    async fn commit_partitions(&mut self, parts: &[Partition]) -> Result<(), ClientError> {
        let offsets = self.pending_offsets(parts.iter());
        if offsets.is_empty() {
            return Ok(());
        }
        self.commit_now(offsets).await
    }

    /// Commits as this member and waits (retrying a moved or loading coordinator within the
    /// request timeout); notes what was committed.
    async fn commit_now(&mut self, offsets: Vec<OffsetCommitPartition>) -> Result<(), ClientError> {
        let req = self.commit_request(offsets);
        let result =
            match self.client.group_call::<_, OffsetCommitResponse>(&req.group, ApiKey::OffsetCommit, &req).await {
                Ok(resp) => self.commit_answered(&req, &resp),
                Err(e) => Err(e),
            };
        if result.is_err() {
            self.stats.commit_failures += 1;
        }
        result
    }

    fn commit_request(&self, offsets: Vec<OffsetCommitPartition>) -> OffsetCommitRequest {
        OffsetCommitRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.member_epoch,
            offsets,
        }
    }

    /// Notes the partitions committed; the first partition's error is returned.
    fn commit_answered(&mut self, req: &OffsetCommitRequest, resp: &OffsetCommitResponse) -> Result<(), ClientError> {
        let mut failed = None;
        for p in &resp.partitions {
            let Some(sent) = req.offsets.iter().find(|o| o.topic == p.topic && o.partition == p.partition) else {
                continue;
            };
            if p.error == ErrorCode::NONE {
                self.committed.insert((p.topic.clone(), p.partition), sent.offset);
            } else {
                let what = format!("committing {}/{} for group '{}'", p.topic, p.partition, shown(&req.group));
                failed.get_or_insert(ClientError::Broker(p.error, what));
            }
        }
        match failed {
            Some(e) => Err(e),
            None => {
                self.stats.commits += 1;
                Ok(())
            }
        }
    }

    async fn send_async_commit(&mut self, offsets: Vec<OffsetCommitPartition>) -> Result<(), ClientError> {
        if self.async_commits.len() >= ASYNC_COMMITS_MAX {
            return Err(ClientError::Invalid(format!("{ASYNC_COMMITS_MAX} async commits unanswered")));
        }
        let req = self.commit_request(offsets);
        let conn = self.client.coordinator_connection(&req.group).await?;
        let rx = conn.send(ApiKey::OffsetCommit, &req).await?;
        self.async_commits.push_back(AsyncCommit { req, rx, sent_at: Instant::now() });
        Ok(())
    }

    /// Takes in the answers of async commits that came; one unanswered for the request
    /// timeout is given up. Failures are logged and kept for `commit_async`.
    fn reap_async_commits(&mut self) {
        let timeout = self.client.config().request_timeout;
        while let Some(mut c) = self.async_commits.pop_front() {
            let result = match c.rx.try_recv() {
                Ok(None) if c.sent_at.elapsed() < timeout => {
                    self.async_commits.push_front(c);
                    return;
                }
                Ok(None) => Err(ClientError::Timeout("async offset commit".into())),
                Err(_) => Err(ClientError::ConnectionLost),
                Ok(Some(body)) => body
                    .and_then(|b| decode_body::<OffsetCommitResponse>(ApiKey::OffsetCommit, b))
                    .and_then(|resp| match resp.error {
                        ErrorCode::NONE => Ok(resp),
                        code => Err(ClientError::Broker(code, group_what(&c.req.group, &resp.message))),
                    }),
            };
            let result = result.and_then(|resp| self.commit_answered(&c.req, &resp));
            if let Err(e) = result {
                if matches!(e, ClientError::Broker(ErrorCode::NOT_COORDINATOR, _))
                    || !matches!(e, ClientError::Broker(..))
                {
                    self.client.forget_coordinator(GROUP_KEY, &c.req.group);
                }
                tracing::warn!(group = %c.req.group, error = %e, "async offset commit failed");
                self.stats.commit_failures += 1;
                self.async_error = Some(e);
            }
        }
    }
}

/// An offset commit sent without waiting.
struct AsyncCommit {
    req: OffsetCommitRequest,
    rx: oneshot::Receiver<Result<BytesMut, ClientError>>,
    sent_at: Instant,
}

/// Which partitions to give up and which to start, going from `owned` to `assignment`:
/// `(owned − assignment, assignment − owned)`, each sorted.
pub fn reconcile(owned: &BTreeSet<Partition>, assignment: &BTreeSet<Partition>) -> (Vec<Partition>, Vec<Partition>) {
    let revoked = owned.difference(assignment).cloned().collect();
    let added = assignment.difference(owned).cloned().collect();
    (revoked, added)
}

/// Who commits offsets in a transaction: the group, and the member as the group's
/// coordinator knows it (`GroupConsumer::group_metadata`; Kafka's `ConsumerGroupMetadata`).
/// An empty member id with epoch -1 commits for a group without members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMetadata {
    /// The group.
    pub group: String,
    /// The member's id.
    pub member_id: String,
    /// The member's epoch.
    pub member_epoch: i32,
}

/// A group's coordinator, as FindCoordinator names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coordinator {
    /// Broker node id.
    pub node_id: u32,
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
}

/// The groups of a cluster ([`Client::list_groups`]).
#[derive(Clone, Debug, Default)]
pub struct GroupList {
    /// Every group found, sorted by name, each once.
    pub groups: Vec<ListedGroup>,
    /// Brokers that could not be asked (their groups may be missing).
    pub failed: Vec<(u32, ClientError)>,
}

/// Where `reset-offsets` moves a group's offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetTarget {
    /// Each partition's log start.
    Earliest,
    /// Each partition's log end (high watermark).
    Latest,
    /// This offset (clamped to each partition's log).
    Offset(u64),
    /// The first record at or after this time (ms since the Unix epoch).
    Timestamp(i64),
}

impl std::str::FromStr for OffsetTarget {
    type Err = String;
    /// `earliest`, `latest`, an offset, `@MS` (a time in ms since the Unix epoch) or an RFC
    /// 3339 time such as `2026-12-05T10:00:00Z`.
    fn from_str(s: &str) -> Result<OffsetTarget, String> {
        match s {
            "earliest" => return Ok(OffsetTarget::Earliest),
            "latest" => return Ok(OffsetTarget::Latest),
            _ => {}
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(OffsetTarget::Offset).map_err(|_| format!("offset '{s}' is too large"));
        }
        if let Some(ms) = s.strip_prefix('@') {
            return ms.parse().map(OffsetTarget::Timestamp).map_err(|_| format!("'{s}' is not @MS (ms since 1970)"));
        }
        parse_rfc3339_ms(s).map(OffsetTarget::Timestamp).ok_or_else(|| {
            format!("'{s}' is not earliest, latest, an offset, @MS or a time such as 2026-12-05T10:00:00Z")
        })
    }
}

/// One partition's committed offset and lag ([`offset_lags`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The committed offset (the next the group reads).
    pub committed: u64,
    /// The partition's log end (high watermark), if it could be read.
    pub log_end: Option<u64>,
    /// `max(0, log_end − committed)`, if the log end is known.
    pub lag: Option<u64>,
}

/// The committed offsets (those with one, `offset` ≥ 0) with their log ends and lags, sorted
/// by topic then partition.
pub fn offset_lags(offsets: &[OffsetFetchPartition], log_end: impl Fn(&str, u32) -> Option<u64>) -> Vec<OffsetLag> {
    let mut out: Vec<OffsetLag> = offsets
        .iter()
        .filter_map(|o| {
            let committed = u64::try_from(o.offset).ok()?;
            let end = log_end(&o.topic, o.partition);
            Some(OffsetLag {
                topic: o.topic.clone(),
                partition: o.partition,
                committed,
                log_end: end,
                lag: end.map(|e| e.saturating_sub(committed)),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    out.dedup_by(|a, b| a.topic == b.topic && a.partition == b.partition);
    out
}

impl Client {
    /// The coordinator of `group`, asked of any broker (retrying NOT_COORDINATOR,
    /// COORDINATOR_LOAD_IN_PROGRESS and other retriable answers within the request timeout).
    pub async fn find_coordinator(&self, group: &str) -> Result<Coordinator, ClientError> {
        self.retrying(|| self.find_coordinator_once(CoordinatorKind::Group, group)).await
    }

    /// The transaction coordinator of a transactional id (FindCoordinator with
    /// `TRANSACTION_KEY`), retried as [`Client::find_coordinator`].
    pub async fn find_transaction_coordinator(&self, transactional_id: &str) -> Result<Coordinator, ClientError> {
        self.retrying(|| self.find_coordinator_once(CoordinatorKind::Transaction, transactional_id)).await
    }

    /// Every group of the cluster: ListGroups sent to every broker (each answers for the
    /// groups it coordinates), merged.
    pub async fn list_groups(&self) -> Result<GroupList, ClientError> {
        let (answers, failed) =
            self.ask_every_broker::<_, ListGroupsResponse>(ApiKey::ListGroups, &ListGroupsRequest {}).await?;
        Ok(GroupList { groups: merge_group_lists(answers.into_iter().map(|r| r.groups).collect()), failed })
    }

    /// `req` to every broker at once, each retried: the answers, and the brokers that failed
    /// (for the list calls, which merge what each broker coordinates).
    pub(crate) async fn ask_every_broker<Req: Wire, Resp: Wire>(
        &self,
        key: ApiKey,
        req: &Req,
    ) -> Result<(Vec<Resp>, Vec<(u32, ClientError)>), ClientError> {
        let md = self.metadata(Some(Vec::new())).await?;
        let timeout = self.config().request_timeout;
        let asks = md.brokers.iter().map(|b| async move {
            let answer = self
                .retrying(|| async {
                    let conn = self.node_connection(b.node_id).await?;
                    conn.call_for::<_, Resp>(key, req, timeout).await
                })
                .await;
            (b.node_id, answer)
        });
        let mut answers = Vec::new();
        let mut failed = Vec::new();
        for (node, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Ok(resp) => answers.push(resp),
                Err(e) => failed.push((node, e)),
            }
        }
        Ok((answers, failed))
    }

    /// A group's state, members and committed offsets; GROUP_ID_NOT_FOUND if it is unknown.
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse, ClientError> {
        let req = DescribeGroupRequest { group: group.to_owned() };
        self.group_call(group, ApiKey::DescribeGroup, &req).await
    }

    /// A group's committed offsets of `partitions` (`None`: all it has); offset −1: none.
    /// An unknown group has none. UNSTABLE_OFFSET_COMMIT (a transaction holding offsets of
    /// them is undecided) is retried, as other retriable answers, within the request timeout.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: Option<&[Partition]>,
    ) -> Result<Vec<OffsetFetchPartition>, ClientError> {
        let partitions = partitions.map(|ps| {
            ps.iter().map(|(topic, partition)| TopicPartition { topic: topic.clone(), partition: *partition }).collect()
        });
        let req = OffsetFetchRequest { group: group.to_owned(), partitions };
        let resp: OffsetFetchResponse = self.group_call(group, ApiKey::OffsetFetch, &req).await?;
        Ok(resp.offsets)
    }

    /// One try of [`Client::fetch_offsets`], bounded by `bound` (UNSTABLE_OFFSET_COMMIT is
    /// returned, not waited out).
    pub(crate) async fn fetch_offsets_once(
        &self,
        group: &str,
        partitions: Option<&[Partition]>,
        bound: Duration,
    ) -> Result<Vec<OffsetFetchPartition>, ClientError> {
        let partitions = partitions.map(|ps| {
            ps.iter().map(|(topic, partition)| TopicPartition { topic: topic.clone(), partition: *partition }).collect()
        });
        let req = OffsetFetchRequest { group: group.to_owned(), partitions };
        let resp: OffsetFetchResponse = self.group_call_once(group, ApiKey::OffsetFetch, &req, bound).await?;
        Ok(resp.offsets)
    }

    /// Commits offsets `(topic, partition, next offset)` for a group administratively (no
    /// member: refused with GROUP_NOT_EMPTY while the group has members).
    pub async fn commit_offsets_admin(&self, group: &str, offsets: &[(String, u32, u64)]) -> Result<(), ClientError> {
        let req = OffsetCommitRequest {
            group: group.to_owned(),
            member_id: String::new(),
            member_epoch: -1,
            offsets: offsets
                .iter()
                .map(|(topic, partition, offset)| OffsetCommitPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    metadata: String::new(),
                })
                .collect(),
        };
        let resp: OffsetCommitResponse = self.group_call(group, ApiKey::OffsetCommit, &req).await?;
        for p in &resp.partitions {
            if p.error != ErrorCode::NONE {
                return Err(ClientError::Broker(
                    p.error,
                    format!("committing {}/{} for {}", p.topic, p.partition, group_what(group, "")),
                ));
            }
        }
        Ok(())
    }

    /// Deletes an empty group and its offsets (GROUP_NOT_EMPTY while it has members,
    /// GROUP_ID_NOT_FOUND if unknown).
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let req = DeleteGroupRequest { group: group.to_owned() };
        self.group_call::<_, DeleteGroupResponse>(group, ApiKey::DeleteGroup, &req).await.map(drop)
    }

    /// Moves a group's committed offsets of every partition of `topic` to `to`, each resolved
    /// with ListOffsets and clamped to the partition's log (log start to high watermark), and
    /// commits them administratively (refused with GROUP_NOT_EMPTY while the group has
    /// members). Returns `(partition, offset)` as committed, in partition order.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: OffsetTarget,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let count = self.partition_count(topic).await?;
        let mut offsets = Vec::with_capacity(count as usize);
        for partition in 0..count {
            let start = self.list_offset(topic, partition, EARLIEST).await?;
            let end = self.list_offset(topic, partition, LATEST).await?;
            let wanted = match to {
                OffsetTarget::Earliest => start,
                OffsetTarget::Latest => end,
                OffsetTarget::Offset(o) => o,
                OffsetTarget::Timestamp(ms) => self.list_offset(topic, partition, ms).await?,
            };
            offsets.push((partition, clamp_offset(wanted, start, end)));
        }
        let commits: Vec<(String, u32, u64)> = offsets.iter().map(|&(p, o)| (topic.to_owned(), p, o)).collect();
        self.commit_offsets_admin(group, &commits).await?;
        Ok(offsets)
    }

    /// A group request to its coordinator, retried (finding the coordinator again when it
    /// moved) within the request timeout. An answer's own error becomes `ClientError::Broker`
    /// with the group and the broker's message.
    pub(crate) async fn group_call<Req: Wire, Resp: Wire + GroupAnswer>(
        &self,
        group: &str,
        key: ApiKey,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.coordinator_call(CoordinatorKind::Group, group, key, req).await
    }

    /// One try of a group request, its answer bounded by `bound`.
    pub(crate) async fn group_call_once<Req: Wire, Resp: Wire + GroupAnswer>(
        &self,
        group: &str,
        key: ApiKey,
        req: &Req,
        bound: Duration,
    ) -> Result<Resp, ClientError> {
        self.coordinator_call_once(CoordinatorKind::Group, group, key, req, bound).await
    }

    /// A request to the coordinator of a group or transactional id `name`, retried (finding
    /// the coordinator again when it moved) within the request timeout.
    pub(crate) async fn coordinator_call<Req: Wire, Resp: Wire + GroupAnswer>(
        &self,
        kind: CoordinatorKind,
        name: &str,
        key: ApiKey,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let bound = self.config().request_timeout;
        self.retrying(|| self.coordinator_call_once(kind, name, key, req, bound)).await
    }

    /// One try of a coordinator request, its answer bounded by `bound`. An answer's own error
    /// becomes `ClientError::Broker` with the group or transactional id and the broker's
    /// message; NOT_COORDINATOR and failures that are not answers forget the coordinator.
    pub(crate) async fn coordinator_call_once<Req: Wire, Resp: Wire + GroupAnswer>(
        &self,
        kind: CoordinatorKind,
        name: &str,
        key: ApiKey,
        req: &Req,
        bound: Duration,
    ) -> Result<Resp, ClientError> {
        let conn = self.coordinator_connection_of(kind, name).await?;
        let result = conn.call_for::<_, Resp>(key, req, bound).await.and_then(|resp| {
            let (code, message) = resp.status();
            match code {
                ErrorCode::NONE => Ok(resp),
                code => Err(ClientError::Broker(code, kind.what(name, message))),
            }
        });
        if let Err(e) = &result {
            if matches!(e, ClientError::Broker(ErrorCode::NOT_COORDINATOR, _)) || !matches!(e, ClientError::Broker(..))
            {
                self.forget_coordinator(kind.key_type(), name);
            }
        }
        result
    }

    /// The connection to a group's coordinator (found and cached if not known).
    pub(crate) async fn coordinator_connection(&self, group: &str) -> Result<Rc<Connection>, ClientError> {
        self.coordinator_connection_of(CoordinatorKind::Group, group).await
    }

    /// The connection to the coordinator of a group or transactional id (found and cached
    /// if not known).
    pub(crate) async fn coordinator_connection_of(
        &self,
        kind: CoordinatorKind,
        name: &str,
    ) -> Result<Rc<Connection>, ClientError> {
        let node = match self.cached_coordinator(kind.key_type(), name) {
            Some(node) => node,
            None => self.find_coordinator_once(kind, name).await?.node_id,
        };
        if !self.knows_node(node) {
            self.refresh_metadata().await?;
        }
        self.node_connection(node).await.inspect_err(|_| self.forget_coordinator(kind.key_type(), name))
    }

    async fn find_coordinator_once(&self, kind: CoordinatorKind, name: &str) -> Result<Coordinator, ClientError> {
        let req = FindCoordinatorRequest { group: name.to_owned(), key_type: kind.key_type() };
        let conn = self.connection().await?;
        let resp: FindCoordinatorResponse =
            conn.call_for(ApiKey::FindCoordinator, &req, self.config().request_timeout).await?;
        if resp.error != ErrorCode::NONE {
            return Err(ClientError::Broker(resp.error, kind.what(name, &resp.message)));
        }
        self.remember_coordinator(kind.key_type(), name, resp.node_id);
        Ok(Coordinator { node_id: resp.node_id, host: resp.host, port: resp.port })
    }

    /// Runs `attempt` until it succeeds, fails for good, or the request timeout passes,
    /// pausing [`COORDINATOR_RETRY_BACKOFF`] after each retriable failure.
    pub(crate) async fn retrying<T, F: std::future::Future<Output = Result<T, ClientError>>>(
        &self,
        attempt: impl Fn() -> F,
    ) -> Result<T, ClientError> {
        self.retrying_until(Instant::now() + self.config().request_timeout, COORDINATOR_RETRY_BACKOFF, attempt).await
    }

    /// Runs `attempt` until it succeeds, fails for good, or `deadline` passes, pausing
    /// `backoff` after each retriable failure.
    pub(crate) async fn retrying_until<T, F: std::future::Future<Output = Result<T, ClientError>>>(
        &self,
        deadline: Instant,
        backoff: Duration,
        attempt: impl Fn() -> F,
    ) -> Result<T, ClientError> {
        loop {
            match attempt().await {
                Err(e) if e.is_retriable() && Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, "coordinator request failed; retrying");
                    compio::time::sleep(backoff).await;
                }
                other => return other,
            }
        }
    }
}

/// Which coordinator a request goes to: a consumer group's or a transactional id's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CoordinatorKind {
    /// A consumer group's (`__consumer_offsets`).
    Group,
    /// A transactional id's (`__transaction_state`).
    Transaction,
}

impl CoordinatorKind {
    /// `FindCoordinatorRequest::key_type`.
    pub(crate) fn key_type(self) -> u8 {
        match self {
            CoordinatorKind::Group => GROUP_KEY,
            CoordinatorKind::Transaction => TRANSACTION_KEY,
        }
    }

    /// `group 'NAME'` or `transactional id 'NAME'`, and the broker's message.
    pub(crate) fn what(self, name: &str, message: &str) -> String {
        match self {
            CoordinatorKind::Group => group_what(name, message),
            CoordinatorKind::Transaction if message.is_empty() => format!("transactional id '{}'", shown(name)),
            CoordinatorKind::Transaction => format!("transactional id '{}': {message}", shown(name)),
        }
    }
}

/// A coordinator response's own error code and message.
pub(crate) trait GroupAnswer {
    fn status(&self) -> (ErrorCode, &str);
}

macro_rules! group_answer {
    ($($t:ty),*) => {$(
        impl GroupAnswer for $t {
            fn status(&self) -> (ErrorCode, &str) {
                (self.error, &self.message)
            }
        }
    )*};
}
group_answer!(
    FindCoordinatorResponse,
    GroupHeartbeatResponse,
    OffsetCommitResponse,
    OffsetFetchResponse,
    DescribeGroupResponse,
    DeleteGroupResponse,
    InitProducerIdResponse,
    AddPartitionsToTxnResponse,
    AddOffsetsToTxnResponse,
    EndTxnResponse,
    TxnOffsetCommitResponse,
    DescribeTransactionResponse,
    AbortTransactionResponse
);

/// `group 'NAME'`, and the broker's message after a colon if it gave one.
fn group_what(group: &str, message: &str) -> String {
    if message.is_empty() {
        format!("group '{}'", shown(group))
    } else {
        format!("group '{}': {message}", shown(group))
    }
}

/// Merges ListGroups answers: one entry per group (the one with most members, if brokers
/// disagree while a coordinator moves), sorted by name.
fn merge_group_lists(answers: Vec<Vec<ListedGroup>>) -> Vec<ListedGroup> {
    let mut by_name: BTreeMap<String, ListedGroup> = BTreeMap::new();
    for g in answers.into_iter().flatten() {
        match by_name.get(&g.group) {
            Some(seen) if seen.members >= g.members => {}
            _ => {
                by_name.insert(g.group.clone(), g);
            }
        }
    }
    by_name.into_values().collect()
}

/// `wanted` moved into `[start, end]` (the log start and the high watermark).
fn clamp_offset(wanted: u64, start: u64, end: u64) -> u64 {
    wanted.min(end).max(start)
}

/// This machine's name, sent in heartbeats as the member's host ("" if unknown).
fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Parses an RFC 3339 time (`2026-12-05T10:00:00Z`, `2026-12-05T10:00:00.250+01:00`; a
/// space or `t` may stand for `T`, `z` for `Z`) into ms since the Unix epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let ms: String = frac[..digits].chars().chain("00".chars()).take(3).collect();
        millis = ms.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return None;
            }
            let h = num_in(rest, 1, 3)?;
            let m = num_in(rest, 4, 6)?;
            if h > 23 || m > 59 {
                return None;
            }
            let sign = if rb[0] == b'-' { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_s;
    Some(seconds * 1000 + millis)
}

fn num_in(s: &str, from: usize, to: usize) -> Option<i64> {
    let part = s.get(from..to)?;
    if part.bytes().all(|c| c.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The longest fetch wait of a group consumer: a poll must come back in time for the next
/// heartbeat.
pub const GROUP_FETCH_WAIT_MAX: Duration = Duration::from_millis(100);
/// The pause after a retriable group failure (coordinator moved, loading, unreachable).
pub const COORDINATOR_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The heartbeat interval until the coordinator names one.
const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(3);
/// Heartbeats one poll may send (a join, then the acknowledgements of its changes).
const HEARTBEATS_PER_POLL_MAX: usize = 4;
/// Unanswered async commits; past it an auto-commit waits for the next interval.
const ASYNC_COMMITS_MAX: usize = 16;
/// The shortest idle wait of a poll that owns nothing (so a caller polling in a loop does
/// not spin).
const IDLE_WAIT_MIN: Duration = Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn set(parts: &[(&str, u32)]) -> BTreeSet<Partition> {
        parts.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect()
    }

    fn list(parts: &[(&str, u32)]) -> Vec<Partition> {
        parts.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect()
    }

    /// Reconciling `owned` to `assignment` revokes and adds exactly these.
    fn check(owned: &[(&str, u32)], assignment: &[(&str, u32)], revoked: &[(&str, u32)], added: &[(&str, u32)]) {
        let got = reconcile(&set(owned), &set(assignment));
        assert_eq!(got, (list(revoked), list(added)), "owned {owned:?} assignment {assignment:?}");
    }

    #[test]
    fn reconciling_revokes_what_is_gone_and_adds_what_is_new() {
        check(&[], &[], &[], &[]);
        check(&[], &[("t", 0), ("t", 1)], &[], &[("t", 0), ("t", 1)]);
        check(&[("t", 0), ("t", 1)], &[("t", 0), ("t", 1)], &[], &[]);
        check(&[("t", 0), ("t", 1)], &[("t", 1), ("t", 2)], &[("t", 0)], &[("t", 2)]);
        check(&[("t", 0), ("u", 0)], &[], &[("t", 0), ("u", 0)], &[]);
        // Same partition number, other topic: a different partition.
        check(&[("t", 3)], &[("u", 3)], &[("t", 3)], &[("u", 3)]);
    }

    #[test]
    fn offset_targets_parse() {
        let ok = |s: &str, want: OffsetTarget| assert_eq!(s.parse::<OffsetTarget>(), Ok(want), "{s}");
        ok("earliest", OffsetTarget::Earliest);
        ok("latest", OffsetTarget::Latest);
        ok("0", OffsetTarget::Offset(0));
        ok("42", OffsetTarget::Offset(42));
        ok("@1764928800000", OffsetTarget::Timestamp(1_764_928_800_000));
        ok("2026-12-05T10:00:00Z", OffsetTarget::Timestamp(1_796_464_800_000));
        ok("2026-12-05T11:00:00+01:00", OffsetTarget::Timestamp(1_796_464_800_000));
        ok("2026-12-05 09:30:00.5-00:30", OffsetTarget::Timestamp(1_796_464_800_500));
        ok("1970-01-01T00:00:00Z", OffsetTarget::Timestamp(0));
        ok("2024-02-29T00:00:00.123Z", OffsetTarget::Timestamp(1_709_164_800_123));
        for bad in [
            "",
            "Earliest",
            "-1",
            "1.5",
            "@x",
            "2026-12-05",
            "2026-13-05T10:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-05T24:00:00Z",
            "2026-12-05T10:00:00",
            "2026-12-05T10:00:00+1:00",
            "99999999999999999999",
        ] {
            let err = bad.parse::<OffsetTarget>().expect_err(bad);
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn offsets_are_clamped_to_the_log() {
        assert_eq!(clamp_offset(5, 10, 20), 10);
        assert_eq!(clamp_offset(15, 10, 20), 15);
        assert_eq!(clamp_offset(25, 10, 20), 20);
        assert_eq!(clamp_offset(0, 0, 0), 0);
    }

    #[test]
    fn lags_are_per_committed_partition_in_order() {
        let o = |topic: &str, partition, offset| OffsetFetchPartition {
            topic: topic.into(),
            partition,
            offset,
            metadata: String::new(),
        };
        let offsets = vec![o("u", 0, 3), o("t", 1, 10), o("t", 0, -1), o("t", 2, 9), o("gone", 0, 4)];
        let ends = |t: &str, p: u32| match (t, p) {
            ("t", 1) => Some(15),
            ("t", 2) => Some(7), // truncated below the commit: no negative lag
            ("u", 0) => Some(3),
            _ => None,
        };
        let lag = |topic: &str, partition, committed, log_end: Option<u64>, lag: Option<u64>| OffsetLag {
            topic: topic.into(),
            partition,
            committed,
            log_end,
            lag,
        };
        assert_eq!(
            offset_lags(&offsets, ends),
            vec![
                lag("gone", 0, 4, None, None),
                lag("t", 1, 10, Some(15), Some(5)),
                lag("t", 2, 9, Some(7), Some(0)),
                lag("u", 0, 3, Some(3), Some(0)),
            ]
        );
    }

    #[test]
    fn group_lists_merge_by_name() {
        let g = |group: &str, members| ListedGroup { group: group.into(), state: "Stable".into(), members };
        let merged = merge_group_lists(vec![vec![g("b", 1), g("a", 2)], vec![], vec![g("b", 3), g("c", 0)]]);
        assert_eq!(merged, vec![g("a", 2), g("b", 3), g("c", 0)]);
        assert!(merge_group_lists(vec![]).is_empty());
    }

    #[test]
    fn assignors_parse_and_print() {
        for a in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
            assert_eq!(a.name().parse::<Assignor>(), Ok(a));
        }
        assert!("Sticky".parse::<Assignor>().is_err());
        assert_eq!(Assignor::default(), Assignor::Sticky);
    }
}
