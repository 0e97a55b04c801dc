//! Shard 0's part of a cluster broker: the controller voter ([`ControllerVoter`], its Raft log
//! in `raftlog`), the replicas this broker hosts on any shard (created and deleted as the
//! controller's decisions say, on the shard that owns each), the topic map every shard routes
//! by, producer ids, and the control requests (metadata, describe, topic creation, deletion
//! and reassignment, producer ids, controlled shutdown).
//!
//! Topic changes go to the active controller and are resent every 500 ms until this broker's
//! voter has applied them (for up to 10 s).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use skein_client::wire::{
    BrokerInfo, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsResponse, DescribeTopicsRequest,
    DescribeTopicsResponse, ErrorCode, InitProducerIdResponse, Lineage, MetadataRequest, MetadataResponse,
    PartitionDescription, PartitionMetadata, PartitionRange, ResizeResponse, TopicConfig, TopicDescription,
    TopicMetadata, TopicResult,
};

use super::now;
use super::replicas::{replica_settings, topic_of, ReplicaMeta};
use super::shard::{owner, Node, ShardMsg, State, Work};
use crate::core::controller::{Controller, ResizeError, Topic, PARTITIONS_PER_TOPIC_MAX};
use crate::core::quorum::ControllerVoter;
use crate::core::table::Level;
use crate::core::{Command, Message, NodeId, PartitionId, Peer, Seal, Time};
use crate::meta::{self, ProducerIds};
use crate::service::{api_versions, Request, Response};
use bytes::BytesMut;
use skein_client::index::IndexDef;
use skein_client::partitioning::Partitioning;

/// Shard 0's controller state.
pub(crate) struct Control {
    pub voter: ControllerVoter,
    /// Partitions with a replica on some shard of this broker.
    hosted: BTreeSet<PartitionId>,
    /// The voter's controller applies history and "caught up" is not logged yet.
    replaying: bool,
    producer_ids: ProducerIds,
    /// The topic, deleted-partition and partition counts of the last published topic map.
    published: (usize, usize, usize),
}

impl Control {
    /// Shard 0's state over a started voter; `hosted` are the replicas found on disk.
    pub(super) fn new(voter: ControllerVoter, hosted: BTreeSet<PartitionId>, producer_ids: ProducerIds) -> Control {
        Control { voter, hosted, replaying: true, producer_ids, published: (usize::MAX, usize::MAX, usize::MAX) }
    }

    /// The topic map if topics changed since the last one published (topics are created,
    /// deleted and gain partitions by splits and merges, never lose one, and deleted partition
    /// ids are never reused: the three counts change whenever the map does).
    pub(super) fn changed_topics(&mut self) -> Option<TopicMap> {
        let c = self.voter.controller();
        let parts = c.topics().values().map(|t| t.parts.len()).sum();
        let now = (c.topics().len(), c.deleted().len(), parts);
        (now != self.published).then(|| {
            self.published = now;
            TopicMap::of(c)
        })
    }
}

/// Topic names to their partition ids (by index), as shard 0's voter last applied them;
/// every shard routes produce, fetch and list-offsets requests by it.
#[derive(Default)]
pub(crate) struct TopicMap {
    topics: HashMap<String, Vec<PartitionId>>,
    /// Each partition's replicas when the map was made (for rack-aware group assignment; a
    /// later reassignment is not reflected until topics change).
    replicas: HashMap<PartitionId, Vec<NodeId>>,
    /// Tables and their default isolation level.
    tables: HashMap<String, Level>,
    /// Each table's indexes, by name.
    indexes: HashMap<String, Vec<IndexDef>>,
    /// The partitions made by a split or merge (they have parents).
    children: HashSet<PartitionId>,
}

impl TopicMap {
    fn of(c: &Controller) -> TopicMap {
        let topics: HashMap<String, Vec<PartitionId>> =
            c.topics().iter().map(|(n, t)| (n.clone(), t.parts.iter().map(|p| p.id).collect())).collect();
        let replicas = topics.values().flatten().filter_map(|&p| Some((p, c.partition(p)?.replicas.clone()))).collect();
        let tables = c
            .topics()
            .iter()
            .filter_map(|(n, t)| {
                let mut configs: BTreeMap<String, String> = t.configs.iter().cloned().collect();
                Some((n.clone(), crate::core::table::table_config(&mut configs).ok()??))
            })
            .collect();
        let mut indexes: HashMap<String, Vec<IndexDef>> = HashMap::new();
        for (n, t) in c.topics() {
            let mut configs: BTreeMap<String, String> = t.configs.iter().cloned().collect();
            if let Ok(Some(def)) = skein_client::index::index_config(n, &mut configs) {
                indexes.entry(def.table.clone()).or_default().push(def);
            }
        }
        for defs in indexes.values_mut() {
            defs.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let children =
            c.topics().values().flat_map(|t| t.parts.iter()).filter(|p| !p.parents.is_empty()).map(|p| p.id).collect();
        TopicMap { topics, replicas, tables, indexes, children }
    }

    /// Whether partition `pid` was made by a split or merge.
    pub(crate) fn has_parents(&self, pid: PartitionId) -> bool {
        self.children.contains(&pid)
    }

    /// The indexes of table `table`, by name.
    pub(crate) fn indexes(&self, table: &str) -> &[IndexDef] {
        self.indexes.get(table).map_or(&[], Vec::as_slice)
    }

    /// Every table's name.
    pub(crate) fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tables.keys().cloned().collect();
        names.sort();
        names
    }

    /// The default isolation level of table `topic` (None: not a table).
    pub(crate) fn table(&self, topic: &str) -> Option<Level> {
        self.tables.get(topic).copied()
    }

    /// The replicas of partition `index` of `topic`.
    pub(crate) fn replicas(&self, topic: &str, index: u32) -> &[NodeId] {
        self.partition(topic, index).and_then(|p| self.replicas.get(&p)).map_or(&[], Vec::as_slice)
    }

    /// The partition count of `topic` (indexes, sealed partitions included).
    pub(crate) fn partitions(&self, topic: &str) -> Option<u32> {
        self.topics.get(topic).map(|t| t.len() as u32)
    }

    /// Partition `index` of `topic`.
    pub(crate) fn partition(&self, topic: &str, index: u32) -> Option<PartitionId> {
        self.topics.get(topic)?.get(index as usize).copied()
    }
}

impl Node {
    fn control<'a>(&self, st: &'a mut State) -> &'a mut Control {
        st.control.as_mut().expect("controller work runs on shard 0")
    }

    /// A controller decision for this broker: creates the replicas it names that this broker
    /// does not host yet (on their owning shards), then gives each shard its share.
    pub(super) fn decision(&self, st: &mut State, msg: Message, work: &mut VecDeque<Work>) {
        self.ensure_replicas(st, &msg);
        let n = self.shard_count();
        match msg {
            Message::HeartbeatResponse { incarnation, sent, alive, partitions } => {
                // Every shard gets the lease, with the states of its own partitions.
                let mut shares: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
                for s in partitions {
                    shares[owner(s.partition, n)].push(s);
                }
                for (shard, partitions) in shares.into_iter().enumerate() {
                    let msg = Message::HeartbeatResponse { incarnation, sent, alive, partitions };
                    self.to_core(shard, Peer::Controller, msg, work);
                }
            }
            Message::PartitionState(s) => {
                self.to_core(owner(s.partition, n), Peer::Controller, Message::PartitionState(s), work)
            }
            _ => {}
        }
    }

    /// Creates the replicas of partitions newly assigned to this broker (named in controller
    /// messages) before their shards' cores see their state: the shard's channel keeps order.
    fn ensure_replicas(&self, st: &mut State, msg: &Message) {
        let states = match msg {
            Message::HeartbeatResponse { partitions, .. } => partitions.iter().collect::<Vec<_>>(),
            Message::PartitionState(s) => vec![s],
            _ => return,
        };
        for s in states {
            let control = self.control(st);
            if !s.replicas.contains(&self.id) || control.hosted.contains(&s.partition) {
                continue;
            }
            // The active controller committed the topic; this voter may not have applied it
            // yet: then the next heartbeat response brings the partition again.
            let Some((name, topic)) = topic_of(control.voter.controller(), s.partition) else { continue };
            let meta = ReplicaMeta::of(name, topic, s.partition);
            control.hosted.insert(s.partition);
            let shard = owner(s.partition, self.shard_count());
            if shard == self.shard {
                self.create_replica(st, &meta);
            } else {
                self.to_shard(shard, ShardMsg::CreateReplica(meta));
            }
        }
    }

    /// Shard 0's periodic work: the voter's tick, and deleting replicas of deleted topics'
    /// partitions and of partitions reassigned away from this broker. (A voter that lags shows
    /// an older state, which still names this broker; if a newer one names it again, the
    /// replica is created anew and catches up before it can rejoin the ISR.)
    pub(super) fn control_tick(&self, st: &mut State, t: Time, work: &mut VecDeque<Work>) {
        let control = self.control(st);
        let mut vout = Vec::new();
        control.voter.handle_tick(t, &mut vout);
        let c = control.voter.controller();
        let gone: Vec<PartitionId> = control
            .hosted
            .iter()
            .copied()
            .filter(|p| c.deleted().contains(p) || c.partition(*p).is_some_and(|s| !s.replicas.contains(&self.id)))
            .collect();
        for p in &gone {
            control.hosted.remove(p);
        }
        self.voter_out(st, vout, work);
        for p in gone {
            let shard = owner(p, self.shard_count());
            if shard == self.shard {
                self.drop_replica(st, p, work);
            } else {
                self.to_shard(shard, ShardMsg::DropReplica(p));
            }
        }
    }

    /// After shard 0's pump: publishes a changed topic map, and logs when the voter has caught
    /// up with history.
    pub(super) fn after_pump(&self, st: &mut State) {
        let control = self.control(st);
        if let Some(map) = control.changed_topics() {
            self.topics.store(Arc::new(map));
        }
        if control.replaying && !control.voter.controller().replaying() {
            control.replaying = false;
            log_caught_up(&control.voter);
        }
    }

    /// A control request, on shard 0.
    pub(super) async fn control_request(self: Rc<Self>, req: Request) -> Response {
        match req {
            Request::ApiVersions => Response::ApiVersions(api_versions()),
            Request::Metadata(r) => Response::Metadata(self.metadata(r)),
            Request::CreateTopics(r) => Response::CreateTopics(self.create_topics(r).await),
            Request::DeleteTopics(r) => {
                let mut results = Vec::with_capacity(r.names.len());
                for name in r.names {
                    let (error, message) = match self.delete_topic(&name).await {
                        Ok(()) => (ErrorCode::NONE, String::new()),
                        Err((code, msg)) => (code, msg),
                    };
                    results.push(TopicResult { name, error, message });
                }
                Response::DeleteTopics(DeleteTopicsResponse { results })
            }
            Request::DescribeTopics(r) => Response::DescribeTopics(self.describe(r).await),
            Request::SplitPartition(r) => {
                let at = r.at.map(|b| b.to_vec());
                Response::Resize(resize_response(self.resize(r.topic, Resize::Split(r.partition, at)).await))
            }
            Request::MergePartitions(r) => {
                let resize = match r.partitions[..] {
                    [a, b] => Resize::Merge([a, b]),
                    _ => Resize::Bad(format!("a merge names two partitions, not {}", r.partitions.len())),
                };
                Response::Resize(resize_response(self.resize(r.topic, resize).await))
            }
            Request::ReassignPartition(r) => {
                let (error, message) = match self.reassign(r).await {
                    Ok(()) => (ErrorCode::NONE, String::new()),
                    Err((code, msg)) => (code, msg),
                };
                Response::ReassignPartition(skein_client::wire::ReassignPartitionResponse { error, message })
            }
            Request::InitProducerId(r) => {
                let fail = |error| InitProducerIdResponse {
                    error,
                    message: String::new(),
                    producer_id: -1,
                    producer_epoch: -1,
                };
                if r.transactional_id.is_some() {
                    // A transactional producer's init goes to its coordinator (`cluster::txn`).
                    return Response::InitProducerId(fail(ErrorCode::NOT_COORDINATOR));
                }
                // Ids are unique per broker (persisted blocks) and carry the broker id in
                // their high bits, so they are unique in the cluster.
                let id = self.control(&mut self.st.borrow_mut()).producer_ids.allocate();
                Response::InitProducerId(match id {
                    Ok(id) => InitProducerIdResponse {
                        error: ErrorCode::NONE,
                        message: String::new(),
                        producer_id: (i64::from(self.id.0) << 40) | id,
                        producer_epoch: 0,
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "allocating a producer id failed");
                        fail(ErrorCode::STORAGE_ERROR)
                    }
                })
            }
            Request::Produce(_)
            | Request::Fetch(_)
            | Request::ListOffsets(_)
            | Request::FindCoordinator(_)
            | Request::GroupHeartbeat(_)
            | Request::OffsetCommit(_)
            | Request::OffsetFetch(_)
            | Request::ListGroups
            | Request::DescribeGroup(_)
            | Request::DeleteGroup(_)
            | Request::AddPartitionsToTxn(_)
            | Request::AddOffsetsToTxn(_)
            | Request::EndTxn(_)
            | Request::TxnOffsetCommit(_)
            | Request::ListTransactions
            | Request::DescribeTransaction(_)
            | Request::AbortTransaction(_)
            | Request::TableRead(_)
            | Request::TableLock(_)
            | Request::TableCommit(_)
            | Request::TableAbort(_)
            | Request::TableQuery(_) => Response::Error(ErrorCode::INVALID_REQUEST),
        }
    }

    fn brokers(&self) -> Vec<BrokerInfo> {
        let rack = |n: &NodeId| self.racks.get(n).cloned().unwrap_or_default();
        self.voters
            .iter()
            .map(|(n, a)| BrokerInfo { node_id: n.0, host: a.ip().to_string(), port: a.port(), rack: rack(n) })
            .collect()
    }

    fn metadata(&self, req: MetadataRequest) -> MetadataResponse {
        let mut st = self.st.borrow_mut();
        let voter = &self.control(&mut st).voter;
        let c = voter.controller();
        let names: Vec<String> = req.topics.unwrap_or_else(|| c.topics().keys().cloned().collect());
        let topics = names
            .into_iter()
            .map(|name| match c.topics().get(&name) {
                None => TopicMetadata {
                    name,
                    error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    partitioning: 0,
                    partitions: vec![],
                },
                Some(t) => {
                    let partitions = (0..t.count())
                        .filter_map(|i| {
                            let s = c.partition(t.partition(i)?)?;
                            let (error, leader, leader_epoch, replicas, isr) = wire_state(s);
                            let lineage = lineage(t, i, s);
                            Some(PartitionMetadata {
                                partition: i,
                                error,
                                leader,
                                leader_epoch,
                                replicas,
                                isr,
                                lineage,
                            })
                        })
                        .collect();
                    TopicMetadata { name, error: ErrorCode::NONE, partitioning: t.partitioning.to_wire(), partitions }
                }
            })
            .collect();
        MetadataResponse { brokers: self.brokers(), controller: voter.leader().map_or(0, |l| l.0), topics }
    }

    /// Log start, high watermark and log end of this broker's replicas of `ids`, from the
    /// shards that own them (zeros where it hosts none).
    async fn offsets(&self, ids: &[PartitionId]) -> HashMap<PartitionId, super::shard::ReplicaOffsets> {
        let n = self.shard_count();
        let mut by_shard: BTreeMap<usize, Vec<PartitionId>> = BTreeMap::new();
        for p in ids {
            by_shard.entry(owner(*p, n)).or_default().push(*p);
        }
        let mut out = HashMap::new();
        for (shard, ids) in by_shard {
            let found = if shard == self.shard {
                self.replica_offsets(&ids)
            } else {
                let (tx, rx) = oneshot::channel();
                self.to_shard(shard, ShardMsg::Offsets(ids.clone(), tx));
                rx.await.unwrap_or_default()
            };
            out.extend(ids.into_iter().zip(found).filter_map(|(p, o)| Some((p, o?))));
        }
        out
    }

    async fn describe(&self, req: DescribeTopicsRequest) -> DescribeTopicsResponse {
        let ids: Vec<PartitionId> = {
            let mut st = self.st.borrow_mut();
            let c = self.control(&mut st).voter.controller();
            let names: Vec<&String> =
                if req.names.is_empty() { c.topics().keys().collect() } else { req.names.iter().collect() };
            names
                .into_iter()
                .filter_map(|n| c.topics().get(n))
                .flat_map(|t| (0..t.count()).filter_map(|i| t.partition(i)))
                .collect()
        };
        // Offsets are this broker's replica's (the leader's when asked there).
        let offsets = self.offsets(&ids).await;
        let mut st = self.st.borrow_mut();
        let c = self.control(&mut st).voter.controller();
        let names: Vec<String> =
            if req.names.is_empty() { c.topics().keys().cloned().collect() } else { req.names.clone() };
        let topics = names
            .into_iter()
            .map(|name| {
                let Some(t) = c.topics().get(&name) else {
                    return TopicDescription {
                        name,
                        error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                        partitioning: 0,
                        configs: vec![],
                        partitions: vec![],
                    };
                };
                let partitions = (0..t.count())
                    .filter_map(|i| {
                        let p = t.partition(i)?;
                        let s = c.partition(p)?;
                        let (log_start, high_watermark, log_end, last_stable) =
                            offsets.get(&p).copied().unwrap_or_default();
                        let (error, leader, leader_epoch, replicas, isr) = wire_state(s);
                        Some(PartitionDescription {
                            partition: i,
                            error,
                            leader,
                            leader_epoch,
                            replicas,
                            isr,
                            log_start,
                            high_watermark,
                            log_end,
                            last_stable,
                            lineage: lineage(t, i, s),
                        })
                    })
                    .collect();
                let configs = t.configs.iter().map(|(k, v)| TopicConfig { key: k.clone(), value: v.clone() }).collect();
                let partitioning = t.partitioning.to_wire();
                TopicDescription { name, error: ErrorCode::NONE, partitioning, configs, partitions }
            })
            .collect();
        DescribeTopicsResponse { topics }
    }

    async fn create_topics(&self, req: CreateTopicsRequest) -> CreateTopicsResponse {
        let mut results = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let (error, message) = match self.create_one(&t).await {
                Ok(()) => (ErrorCode::NONE, String::new()),
                Err((code, msg)) => (code, msg),
            };
            results.push(TopicResult { name: t.name, error, message });
        }
        CreateTopicsResponse { results }
    }

    async fn create_one(&self, t: &skein_client::wire::NewTopic) -> Result<(), (ErrorCode, String)> {
        meta::validate_name(&t.name)
            .map_err(|c| (c, format!("invalid topic name '{}'", skein_client::wire::shown(&t.name))))?;
        if t.partitions == 0 || t.partitions > PARTITIONS_PER_TOPIC_MAX {
            let e = format!("{} partitions (1..={PARTITIONS_PER_TOPIC_MAX})", t.partitions);
            return Err((ErrorCode::INVALID_PARTITIONS, e));
        }
        if t.replicas == 0 || usize::from(t.replicas) > self.voters.len() {
            return Err((
                ErrorCode::INVALID_PARTITIONS,
                format!("replication {} on a cluster of {} brokers", t.replicas, self.voters.len()),
            ));
        }
        let configs: BTreeMap<String, String> = t.configs.iter().map(|c| (c.key.clone(), c.value.clone())).collect();
        replica_settings(&self.config, &configs, t.replicas).map_err(|m| (ErrorCode::INVALID_CONFIG, m))?;
        if self.control(&mut self.st.borrow_mut()).voter.controller().topics().contains_key(&t.name) {
            return Err((ErrorCode::TOPIC_ALREADY_EXISTS, format!("topic '{}' exists", t.name)));
        }
        let partitioning = Partitioning::from_wire(t.partitioning)
            .ok_or_else(|| (ErrorCode::INVALID_REQUEST, format!("unknown partitioning {}", t.partitioning)))?;
        if !partitioning.ranged() && configs.keys().any(|k| k.starts_with("auto.")) {
            let what = "automatic splits and merges need a ranged topic (--partitioning hash-range or key-range)";
            return Err((ErrorCode::INVALID_CONFIG, what.into()));
        }
        if partitioning.ranged() && t.name.starts_with("__") {
            return Err((ErrorCode::INVALID_CONFIG, "internal topics are hash-partitioned".into()));
        }
        self.check_index(&t.name, &configs, partitioning)?;
        let msg = Message::CreateTopic {
            name: t.name.clone(),
            partitions: t.partitions,
            replication: t.replicas,
            partitioning,
            configs: configs.into_iter().collect(),
        };
        self.until_applied(msg, |c| c.topics().contains_key(&t.name)).await?;
        // Bounded: a slow shard only makes the first produce see NOT_LEADER (and retry).
        self.until_serving(Some(&t.name), now().plus_ms(2_000)).await;
        let mut st = self.st.borrow_mut();
        match self.control(&mut st).voter.controller().topics().get(&t.name) {
            Some(got)
                if got.count() == t.partitions
                    && got.replication == t.replicas
                    && got.partitioning.to_wire() == t.partitioning =>
            {
                Ok(())
            }
            _ => Err((ErrorCode::TOPIC_ALREADY_EXISTS, "created concurrently with other settings".into())),
        }
    }

    /// Sends `msg` to the active controller every 500 ms until `done` holds on this broker's
    /// voter (it applied the change) or 10 s pass.
    async fn until_applied(&self, msg: Message, done: impl Fn(&Controller) -> bool) -> Result<(), (ErrorCode, String)> {
        let deadline = now().plus_ms(10_000);
        let mut next_send = now();
        let mut sent_to = None;
        loop {
            let t = now();
            {
                let mut st = self.st.borrow_mut();
                let voter = &self.control(&mut st).voter;
                if done(voter.controller()) {
                    return Ok(());
                }
                if t >= deadline {
                    return Err((ErrorCode::REQUEST_TIMED_OUT, "no active controller applied the change".into()));
                }
                // Sent again every 500 ms, and as soon as an active controller is known if
                // there was none at the last send (a broker that just started).
                let leader = voter.leader();
                if t >= next_send || (sent_to.is_none() && leader.is_some()) {
                    next_send = t.plus_ms(500);
                    sent_to = leader;
                    let mut work = VecDeque::new();
                    self.commands(&mut st, vec![Command::Send { to: Peer::Controller, msg: msg.clone() }], &mut work);
                    self.pump(&mut st, t, work);
                }
            }
            compio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn delete_topic(&self, name: &str) -> Result<(), (ErrorCode, String)> {
        if !self.control(&mut self.st.borrow_mut()).voter.controller().topics().contains_key(name) {
            return Err((
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                format!("no topic '{}'", skein_client::wire::shown(name)),
            ));
        }
        let msg = Message::DeleteTopic { name: name.to_owned() };
        self.until_applied(msg, |c| !c.topics().contains_key(name)).await
    }

    /// The checks of an index's catalog topic (`skein_client::index`): its definition, and a
    /// table to index that is not an index itself; a term index is a key-range table.
    fn check_index(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
        partitioning: Partitioning,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(def) = skein_client::index::index_config(name, &mut configs.clone())
            .map_err(|m| (ErrorCode::INVALID_CONFIG, m))?
        else {
            return Ok(());
        };
        let mut st = self.st.borrow_mut();
        let topics = self.control(&mut st).voter.controller().topics();
        let Some(table) = topics.get(&def.table) else {
            return Err((ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, format!("no table '{}'", def.table)));
        };
        let table_configs: BTreeMap<String, String> = table.configs.iter().cloned().collect();
        if !is_table(&table_configs) || table_configs.contains_key(skein_client::index::INDEX_OF) {
            return Err((ErrorCode::NOT_A_TABLE, format!("'{}' is not a table to index", def.table)));
        }
        let term = def.kind == skein_client::index::IndexKind::Term;
        if term != is_table(configs) || (term && partitioning != Partitioning::KeyRange) {
            let what = "a term index is a key-range table; a document index's catalog topic is not a table";
            return Err((ErrorCode::INVALID_CONFIG, what.into()));
        }
        Ok(())
    }

    /// A split or merge: checked against this broker's view of the controller (the same
    /// checks the controller makes, for a clear answer), sent to the controller until applied;
    /// returns the children's indexes.
    async fn resize(&self, topic: String, resize: Resize) -> Result<Vec<u32>, (ErrorCode, String)> {
        let (msg, parents) = match resize {
            Resize::Bad(m) => return Err((ErrorCode::INVALID_REQUEST, m)),
            Resize::Split(index, at) => (Message::Split { topic: topic.clone(), index, at }, vec![index]),
            Resize::Merge(indexes) => (Message::Merge { topic: topic.clone(), indexes }, indexes.to_vec()),
        };
        {
            let mut st = self.st.borrow_mut();
            let c = self.control(&mut st).voter.controller();
            check_resize(c, &topic, &msg)?;
        }
        let mut parents = parents;
        parents.sort_unstable();
        let children_of = |c: &Controller| -> Option<Vec<u32>> {
            let t = c.topics().get(&topic)?;
            let of_parents = |i: &u32| {
                let mut p = t.parts[*i as usize].parents.clone();
                p.sort_unstable();
                p == parents
            };
            let children: Vec<u32> = (0..t.count()).filter(of_parents).collect();
            (!children.is_empty()).then_some(children)
        };
        self.until_applied(msg, |c| children_of(c).is_some()).await?;
        let mut st = self.st.borrow_mut();
        let c = self.control(&mut st).voter.controller();
        children_of(c).ok_or((ErrorCode::UNKNOWN, "the change was applied and then undone".into()))
    }

    async fn reassign(&self, r: skein_client::wire::ReassignPartitionRequest) -> Result<(), (ErrorCode, String)> {
        let p = self
            .topics
            .load()
            .partition(&r.topic, r.partition)
            .ok_or((ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, format!("{}/{}", r.topic, r.partition)))?;
        let target: Vec<NodeId> = r.replicas.iter().map(|&n| NodeId(n)).collect();
        let mut sorted = target.clone();
        sorted.sort();
        sorted.dedup();
        if target.is_empty() || sorted.len() != target.len() {
            return Err((ErrorCode::INVALID_REQUEST, "the replica list is empty or repeats a broker".into()));
        }
        if let Some(b) = target.iter().find(|b| !self.voters.iter().any(|(n, _)| n == *b)) {
            return Err((ErrorCode::INVALID_REQUEST, format!("broker {} is not in the cluster", b.0)));
        }
        let msg = Message::Reassign { partition: p, replicas: target.clone() };
        // Started (the target is pending) or already done (the replica set is the target).
        self.until_applied(msg, |c| {
            c.reassignment(p) == Some(&target) || c.partition(p).is_some_and(|s| s.replicas == target)
        })
        .await
    }

    /// Waits (up to `deadline`) until this broker serves, as leader, every partition the
    /// controller has it lead (of `topic`, or of every topic), so a client that acts right
    /// after a topic creation, or after a single broker's start, is not told NOT_LEADER while
    /// the decisions travel to the shards. Whether it got there.
    pub(super) async fn until_serving(&self, topic: Option<&str>, deadline: Time) -> bool {
        loop {
            // Registered: the voter applied this process's first heartbeat.
            let (registered, led): (bool, Vec<PartitionId>) = {
                let mut st = self.st.borrow_mut();
                let c = self.control(&mut st).voter.controller();
                let led = c
                    .topics()
                    .iter()
                    .filter(|(name, _)| topic.is_none_or(|t| t == name.as_str()))
                    .flat_map(|(_, t)| (0..t.count()).filter_map(|i| t.partition(i)))
                    .filter(|p| c.partition(*p).is_some_and(|s| s.leader == Some(self.id)))
                    .collect();
                (!c.replaying(), led)
            };
            let mut by_shard: BTreeMap<usize, Vec<PartitionId>> = BTreeMap::new();
            for p in led {
                by_shard.entry(owner(p, self.shard_count())).or_default().push(p);
            }
            let mut all = registered;
            for (shard, ids) in by_shard {
                let serving = if shard == self.shard {
                    self.serving(&ids)
                } else {
                    let (tx, rx) = oneshot::channel();
                    self.to_shard(shard, ShardMsg::Serving(ids, tx));
                    rx.await.unwrap_or_default()
                };
                all &= !serving.is_empty() && serving.iter().all(|s| *s);
            }
            if all {
                return true;
            }
            if now() >= deadline {
                return false;
            }
            compio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Partitions this broker leads, over every shard.
    async fn leading_everywhere(&self) -> usize {
        let mut leads = self.leading();
        for shard in (0..self.shard_count()).filter(|s| *s != self.shard) {
            let (tx, rx) = oneshot::channel();
            self.to_shard(shard, ShardMsg::Leading(tx));
            leads += rx.await.unwrap_or(0);
        }
        leads
    }

    /// Asks the controller to move leadership away (again every 200 ms) until this broker
    /// leads no partition or the shutdown grace period ends; clients meanwhile get NOT_LEADER
    /// and move to the new leaders.
    pub(super) async fn controlled_shutdown(&self) {
        let grace = now().plus_ms(self.config.shutdown_grace_ms);
        tracing::info!("controlled shutdown: moving leadership away");
        loop {
            let leads = self.leading_everywhere().await;
            let t = now();
            if leads == 0 || t >= grace {
                tracing::info!(still_leading = leads, "controlled shutdown done; stopping");
                return;
            }
            {
                let mut st = self.st.borrow_mut();
                let msg = Message::ControlledShutdown { broker: self.id, incarnation: st.core.incarnation() };
                let mut work = VecDeque::new();
                self.commands(&mut st, vec![Command::Send { to: Peer::Controller, msg }], &mut work);
                self.pump(&mut st, t, work);
            }
            compio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The voter applied this process's first heartbeat: the controller's decisions from here
/// on are logged as they are applied.
fn log_caught_up(voter: &ControllerVoter) {
    // The heartbeat was applied in the batch that ended at this index, not necessarily last.
    let index = voter.applied();
    let decisions = voter.controller().decisions_replayed();
    if decisions == 0 {
        // Nothing was held back (a new broker, usually).
        tracing::debug!(index, "controller log caught up");
        return;
    }
    tracing::info!(
        index,
        decisions_replayed = decisions,
        "controller log caught up by index {index}; {decisions} earlier decisions were logged at debug level only"
    );
}

/// A split or merge request.
enum Resize {
    Split(u32, Option<Vec<u8>>),
    Merge([u32; 2]),
    /// Malformed: this message.
    Bad(String),
}

fn resize_response(r: Result<Vec<u32>, (ErrorCode, String)>) -> ResizeResponse {
    match r {
        Ok(children) => ResizeResponse { error: ErrorCode::NONE, message: String::new(), children },
        Err((error, message)) => ResizeResponse { error, message, children: Vec::new() },
    }
}

/// Whether a topic's configs make it a table.
fn is_table(configs: &BTreeMap<String, String>) -> bool {
    configs.get(crate::core::table::TABLE_CONFIG).is_some_and(|v| v == "true")
}

/// The controller's checks of a split or merge, on this broker's view, so the requester
/// answers a refusal at once (the controller applies the same checks again).
fn check_resize(c: &Controller, topic: &str, msg: &Message) -> Result<(), (ErrorCode, String)> {
    let result = match msg {
        Message::Split { index, at, .. } => c.plan_split(topic, *index, at.clone()).map(drop),
        Message::Merge { indexes, .. } => c.plan_merge(topic, *indexes).map(drop),
        _ => Ok(()),
    };
    result.map_err(|e| match e {
        ResizeError::NoTopic | ResizeError::NoPartition(_) => (ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, e.to_string()),
        ResizeError::Sealed(_) => (ErrorCode::PARTITION_SEALED, e.to_string()),
        ResizeError::Invalid(_) => (ErrorCode::INVALID_PARTITIONS, e.to_string()),
    })
}

/// Partition `index` of `t` in its topic's lineage, for Metadata and DescribeTopics.
fn lineage(t: &Topic, index: u32, s: &crate::core::PartitionState) -> Lineage {
    let part = &t.parts[index as usize];
    let range = part
        .range
        .as_ref()
        .map(|r| PartitionRange { from: BytesMut::from(r.from.as_slice()), to: r.to.as_deref().map(BytesMut::from) });
    let (seal, sealed_at) = match s.seal {
        Seal::Open => (0, 0),
        Seal::Sealing => (1, 0),
        Seal::Sealed(at) => (2, at.0),
    };
    Lineage { range, parents: part.parents.clone(), seal, sealed_at }
}

/// A partition state's wire fields: error (NOT_LEADER when leaderless), leader (0: none),
/// epoch, replicas, ISR.
fn wire_state(s: &crate::core::PartitionState) -> (ErrorCode, u32, u32, Vec<u32>, Vec<u32>) {
    let error = if s.leader.is_some() { ErrorCode::NONE } else { ErrorCode::NOT_LEADER };
    let ids = |v: &[NodeId]| v.iter().map(|r| r.0).collect();
    (error, s.leader.map_or(0, |l| l.0), s.epoch.0, ids(&s.replicas), ids(&s.isr))
}
