//! The admin and metadata client, and the connections its producers and consumers share.
//!
//! A [`Client`] keeps a **metadata cache** filled from Metadata responses: each broker's
//! address by node id, and each partition's leader and leader epoch. Produce, Fetch and
//! ListOffsets go to the partition's leader; consumer group requests to the group's
//! coordinator (cached per group, see `group.rs`); everything else goes to any broker. It keeps
//! one connection per broker address, opened on first use and reopened when it broke.
//!
//! Metadata requests go to any reachable broker: the known brokers first (those that failed
//! lately last), then the bootstrap list, each bounded by `metadata_timeout`, the next one
//! tried on failure. A topic is refreshed when a caller finds it missing or stale
//! ([`Client::invalidate_metadata`], after NOT_LEADER and similar errors); at most one
//! refresh is in flight, and callers arriving meanwhile wait for it instead of sending their
//! own, so a failover does not set off a stampede of Metadata requests.
//!
//! Leader epochs guard against going back in time: a Metadata answer from a broker that has
//! not heard of a newer leader (a lower epoch than cached) does not replace the cached leader,
//! unless the topic was invalidated. The cache never expires by time: the brokers tell the
//! client when it is wrong (NOT_LEADER, FENCED_LEADER_EPOCH, a dead connection).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;

use crate::conn::{broker_error, Connection};
use crate::partitioning::Partitioning;
use crate::wire::{
    ApiKey, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeTopicsRequest, DescribeTopicsResponse, ErrorCode, InitProducerIdRequest, InitProducerIdResponse,
    ListOffsetsPartition, ListOffsetsRequest, ListOffsetsResponse, MergePartitionsRequest, MetadataRequest,
    MetadataResponse, NewTopic, PartitionDescription, ResizeResponse, SplitPartitionRequest, TopicConfig,
    TopicDescription, Wire,
};
use crate::{ClientError, Isolation};
use bytes::BytesMut;

/// Connection settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Bootstrap brokers, `HOST:PORT[,HOST:PORT...]`.
    pub brokers: String,
    /// Name sent with every request.
    pub client_id: String,
    /// Bound on admin requests (create, delete, list offsets; a broker that does not answer
    /// is treated as gone).
    pub request_timeout: Duration,
    /// Bound on opening a connection to one broker.
    pub connect_timeout: Duration,
    /// Bound on a Metadata or DescribeTopics request to one broker; past it the connection
    /// is dropped and the next broker is asked.
    pub metadata_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "skein-client".into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            metadata_timeout: Duration::from_secs(1),
        }
    }
}

/// A handle to the cluster; clones share the metadata cache and the connections.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

struct Inner {
    config: ClientConfig,
    /// The connection [`Client::connection`] hands out (to any broker).
    any: RefCell<Option<Rc<Connection>>>,
    /// One connection per broker address.
    conns: RefCell<HashMap<String, Rc<Connection>>>,
    /// Addresses whose connection or request failed, and when.
    suspects: RefCell<HashMap<String, Instant>>,
    /// Metadata requests made: each starts at the next broker, so a broker cut off from the
    /// controllers (answering with stale leaders) is not asked every time.
    metadata_turn: std::cell::Cell<usize>,
    cache: RefCell<MetadataCache>,
    /// Some while a metadata refresh is in flight: the callers waiting for it.
    refresh: RefCell<Option<Vec<RefreshWaiter>>>,
    /// The coordinator (node id) of each consumer group and transactional id asked about
    /// (by key type and name: a group and a transactional id may share a name), until a
    /// request to it fails with NOT_COORDINATOR or a broken connection (`group.rs`).
    coordinators: RefCell<HashMap<(u8, String), u32>>,
}

impl Client {
    /// Connects to the first reachable broker of `brokers` with default settings.
    pub async fn connect(brokers: &str) -> Result<Client, ClientError> {
        Client::with_config(ClientConfig { brokers: brokers.into(), ..ClientConfig::default() }).await
    }

    /// Connects with explicit settings (fails if no bootstrap broker is reachable).
    pub async fn with_config(config: ClientConfig) -> Result<Client, ClientError> {
        let client = Client {
            inner: Rc::new(Inner {
                config,
                any: RefCell::new(None),
                conns: RefCell::default(),
                suspects: RefCell::default(),
                metadata_turn: std::cell::Cell::new(0),
                cache: RefCell::default(),
                refresh: RefCell::new(None),
                coordinators: RefCell::default(),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A live connection to any broker (the same one while it works), reconnecting if it
    /// broke: the known brokers first, then the bootstrap list.
    pub async fn connection(&self) -> Result<Rc<Connection>, ClientError> {
        if let Some(c) = self.inner.any.borrow().as_ref().filter(|c| !c.is_broken()) {
            return Ok(c.clone());
        }
        let mut last = ClientError::Invalid("no brokers given".into());
        for addr in self.candidates() {
            match self.address_connection(&addr).await {
                Ok(c) => {
                    *self.inner.any.borrow_mut() = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The connection to the leader of a partition, refreshing metadata if the leader is not
    /// known. Fails with a retriable error (`NOT_LEADER` when the cluster has no leader for
    /// it now, an IO error when the leader cannot be reached) or `UNKNOWN_TOPIC_OR_PARTITION`.
    pub async fn leader_connection(&self, topic: &str, partition: u32) -> Result<Rc<Connection>, ClientError> {
        let node = self.leader(topic, partition).await?;
        self.node_connection(node).await
    }

    /// The leader's node id of a partition, refreshing metadata if it is not known (errors
    /// as for [`Client::leader_connection`]).
    pub async fn leader(&self, topic: &str, partition: u32) -> Result<u32, ClientError> {
        // A refresh joined while in flight may have been asked without this topic: a second
        // one includes it.
        for _ in 0..LEADER_REFRESHES_MAX {
            // No leader, or no such topic: as of the last refresh. Callers that retry
            // invalidate the topic first (`ClientError::refreshes_metadata`).
            match self.inner.cache.borrow_mut().lookup(topic, partition) {
                Lookup::Missing => {}
                found => return found.into_leader(topic, partition),
            }
            self.refresh_metadata().await?;
        }
        self.inner.cache.borrow_mut().lookup(topic, partition).into_leader(topic, partition)
    }

    /// The cached leader epoch of a partition (0 if unknown or invalidated); never sends
    /// anything. Requests carry it so a leader of a newer epoch can refuse them.
    pub fn cached_leader_epoch(&self, topic: &str, partition: u32) -> u32 {
        let cache = self.inner.cache.borrow();
        match cache.topics.get(topic).filter(|t| !t.stale && t.error == Some(ErrorCode::NONE)) {
            Some(t) => t.leaders.get(partition as usize).and_then(|(l, e)| l.map(|_| *e)).unwrap_or(0),
            None => 0,
        }
    }

    /// The cached leader of a partition, if known and not invalidated; never sends anything.
    pub fn cached_leader(&self, topic: &str, partition: u32) -> Option<u32> {
        match self.inner.cache.borrow().peek(topic, partition) {
            Lookup::Leader(node) => Some(node),
            _ => None,
        }
    }

    /// The cached in-sync replicas of a partition, if its leader is known and the topic not
    /// invalidated; never sends anything. Consumers reading from followers pick among them.
    pub fn cached_isr(&self, topic: &str, partition: u32) -> Option<Vec<u32>> {
        let cache = self.inner.cache.borrow();
        match cache.peek(topic, partition) {
            Lookup::Leader(_) => cache.topics.get(topic)?.isr.get(partition as usize).cloned(),
            _ => None,
        }
    }

    /// The rack of a broker (its `--rack`) from the latest Metadata; `None` if it has none or
    /// the broker is not known.
    pub fn broker_rack(&self, node: u32) -> Option<String> {
        self.inner.cache.borrow().racks.get(&node).cloned()
    }

    /// The shared connection to a broker by node id (known from metadata), connecting if
    /// needed.
    pub async fn node_connection(&self, node: u32) -> Result<Rc<Connection>, ClientError> {
        let addr = self.node_address(node)?;
        self.address_connection(&addr).await
    }

    /// A new connection of the caller's own to a broker by node id, for requests that may
    /// wait long at the broker (long-polling fetches) and should not hold back others:
    /// responses on a connection come back in request order.
    pub async fn connect_node(&self, node: u32) -> Result<Connection, ClientError> {
        let addr = self.node_address(node)?;
        self.open(&addr).await
    }

    /// Marks a topic's metadata stale: the next lookup of its leaders refreshes it.
    pub fn invalidate_metadata(&self, topic: &str) {
        self.inner.cache.borrow_mut().invalidate(topic);
    }

    /// Refreshes the metadata of the topics this client has looked up (and the broker
    /// list). At most one refresh is in flight: a caller arriving while one is waits for it
    /// and shares its outcome.
    pub async fn refresh_metadata(&self) -> Result<(), ClientError> {
        let joined = {
            let mut refresh = self.inner.refresh.borrow_mut();
            match refresh.as_mut() {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    *refresh = Some(Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = joined {
            // Cancelled: the refreshing caller was dropped midway; the next lookup retries.
            return rx.await.unwrap_or(Err(ClientError::ConnectionLost));
        }
        // If this future is dropped midway, the guard releases the waiters (as cancelled).
        let guard = RefreshGuard(&self.inner);
        let topics = self.inner.cache.borrow().wanted();
        let result = self.metadata_from_any(&MetadataRequest { topics: Some(topics) }).await.map(drop);
        let waiters = self.inner.refresh.borrow_mut().take().unwrap_or_default();
        drop(guard);
        for w in waiters {
            let _ = w.send(result.clone());
        }
        result
    }
    /// Creates a topic; `configs` are `(key, value)` pairs (see PROTOCOL.md).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replicas: u16,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        self.create_topic_with(name, partitions, replicas, Partitioning::Hash, configs).await
    }

    /// Creates a topic with a partitioning scheme (`crate::partitioning`): a `hash` topic's
    /// count is fixed; `hash-range` and `key-range` topics split and merge.
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        replicas: u16,
        partitioning: Partitioning,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        let configs = configs.iter().map(|(k, v)| TopicConfig { key: k.clone(), value: v.clone() }).collect();
        let topic = NewTopic { name: name.into(), partitions, replicas, configs, partitioning: partitioning.to_wire() };
        let req = CreateTopicsRequest { topics: vec![topic] };
        let resp: CreateTopicsResponse = self.connection().await?.call(ApiKey::CreateTopics, &req).await?;
        self.invalidate_metadata(name);
        let r = resp.results.first().ok_or_else(|| ClientError::Protocol("empty CreateTopics response".into()))?;
        broker_error(r.error, format!("creating topic '{}'{}", crate::wire::shown(name), detail(&r.message)))
    }

    /// Splits partition `partition` of a ranged topic at `at` (a hash's 8 big-endian bytes for
    /// hash-range, a key for key-range; `None`: the middle of its range). Returns the two
    /// children's indexes once the controller applied the split; the parent is sealing (its
    /// seal offset appears in the metadata soon after).
    pub async fn split_partition(
        &self,
        topic: &str,
        partition: u32,
        at: Option<&[u8]>,
    ) -> Result<Vec<u32>, ClientError> {
        let req = SplitPartitionRequest { topic: topic.into(), partition, at: at.map(BytesMut::from) };
        let resp: ResizeResponse = self.connection().await?.call(ApiKey::SplitPartition, &req).await?;
        self.invalidate_metadata(topic);
        let what = format!("splitting {}/{partition}{}", crate::wire::shown(topic), detail(&resp.message));
        broker_error(resp.error, what)?;
        Ok(resp.children)
    }

    /// Merges two adjacent partitions of a ranged topic; returns the child's index once the
    /// controller applied the merge (both parents are sealing).
    pub async fn merge_partitions(&self, topic: &str, partitions: [u32; 2]) -> Result<u32, ClientError> {
        let req = MergePartitionsRequest { topic: topic.into(), partitions: partitions.to_vec() };
        let resp: ResizeResponse = self.connection().await?.call(ApiKey::MergePartitions, &req).await?;
        self.invalidate_metadata(topic);
        let what = format!("merging {}/{partitions:?}{}", crate::wire::shown(topic), detail(&resp.message));
        broker_error(resp.error, what)?;
        resp.children.first().copied().ok_or_else(|| ClientError::Protocol("a merge response without its child".into()))
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let req = DeleteTopicsRequest { names: vec![name.into()] };
        let resp: DeleteTopicsResponse = self.connection().await?.call(ApiKey::DeleteTopics, &req).await?;
        self.invalidate_metadata(name);
        let r = resp.results.first().ok_or_else(|| ClientError::Protocol("empty DeleteTopics response".into()))?;
        broker_error(r.error, format!("deleting topic '{}'{}", crate::wire::shown(name), detail(&r.message)))
    }

    /// Brokers, controller and topics (`None`: all topics), from any reachable broker; the
    /// answer also updates the metadata cache.
    pub async fn metadata(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse, ClientError> {
        self.metadata_from_any(&MetadataRequest { topics }).await
    }

    /// A new idempotent producer identity: (producer id, epoch), from any reachable broker.
    pub async fn init_producer_id(&self) -> Result<(i64, i16), ClientError> {
        let req = InitProducerIdRequest { transactional_id: None, transaction_timeout_ms: 0 };
        // Asking again after a lost answer only wastes an id.
        let timeout = self.inner.config.request_timeout;
        let (_, resp): (_, InitProducerIdResponse) =
            self.call_any(ApiKey::InitProducerId, &req, timeout).await.map_err(|e| match e {
                ClientError::Timeout(_) => {
                    ClientError::Timeout(format!("no broker gave this producer an id within {timeout:?}"))
                }
                e => e,
            })?;
        broker_error(resp.error, "init producer id".to_string())?;
        Ok((resp.producer_id, resp.producer_epoch))
    }

    /// Names of all topics.
    pub async fn list_topics(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.metadata(None).await?.topics.into_iter().map(|t| t.name).collect())
    }

    /// A topic's metadata: its partitioning, and its partitions' leaders and lineage (ranges,
    /// parents, seals).
    pub async fn topic_metadata(&self, topic: &str) -> Result<crate::wire::TopicMetadata, ClientError> {
        let md = self.metadata(Some(vec![topic.into()])).await?;
        let t = md.topics.into_iter().next().ok_or_else(|| ClientError::Protocol("empty Metadata response".into()))?;
        broker_error(t.error, format!("topic '{topic}'"))?;
        Ok(t)
    }

    /// Number of partitions of a topic.
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        let md = self.metadata(Some(vec![topic.into()])).await?;
        let t = md.topics.into_iter().next().ok_or_else(|| ClientError::Protocol("empty Metadata response".into()))?;
        broker_error(t.error, format!("topic '{topic}'"))?;
        Ok(t.partitions.len() as u32)
    }

    /// Per-partition leaders and offsets of a topic. Every known broker is asked; each
    /// partition's row comes from its leader (the broker whose row names itself as leader),
    /// so the high watermark and log end are the leader's, else from any broker.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription, ClientError> {
        self.inner.cache.borrow_mut().want(name);
        if self.inner.cache.borrow().brokers.is_empty() {
            self.refresh_metadata().await?;
        }
        let req = DescribeTopicsRequest { names: vec![name.into()] };
        let nodes: Vec<(u32, String)> = self.inner.cache.borrow().brokers.clone().into_iter().collect();
        let asks = nodes.iter().map(|(node, addr)| async {
            let conn = self.address_connection(addr).await?;
            let resp: Result<DescribeTopicsResponse, _> =
                conn.call_for(ApiKey::DescribeTopics, &req, self.inner.config.metadata_timeout).await;
            if resp.is_err() {
                self.suspect(addr);
            }
            let topic = resp?.topics.into_iter().next();
            topic.map(|t| (*node, t)).ok_or_else(|| ClientError::Protocol("empty DescribeTopics response".into()))
        });
        let mut answers = Vec::new();
        let mut last = ClientError::Invalid("no brokers known".into());
        for answer in futures_util::future::join_all(asks).await {
            match answer {
                Ok(a) => answers.push(a),
                Err(e) => last = e,
            }
        }
        let t = merge_descriptions(answers).ok_or(last)?;
        broker_error(t.error, format!("topic '{}'", crate::wire::shown(name)))?;
        Ok(t)
    }

    /// An offset of a partition, from its leader: `wire::EARLIEST`, `wire::LATEST` (the high
    /// watermark), or the first offset with a timestamp at or after `timestamp` (the log end
    /// if none). A leadership change or lost connection is retried (after a metadata refresh)
    /// a few times.
    pub async fn list_offset(&self, topic: &str, partition: u32, timestamp: i64) -> Result<u64, ClientError> {
        self.list_offset_isolated(topic, partition, timestamp, Isolation::ReadUncommitted).await
    }

    /// [`Client::list_offset`] for a reader at `isolation`: with
    /// [`Isolation::ReadCommitted`], `wire::LATEST` is the last stable offset (below it every
    /// transaction is decided), the end a read_committed consumer can reach.
    pub async fn list_offset_isolated(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
        isolation: Isolation,
    ) -> Result<u64, ClientError> {
        let req = ListOffsetsRequest {
            isolation: isolation.wire(),
            partitions: vec![ListOffsetsPartition { topic: topic.into(), partition, timestamp }],
        };
        let mut attempt = 0;
        loop {
            let result: Result<u64, ClientError> = async {
                let conn = self.leader_connection(topic, partition).await?;
                let resp: ListOffsetsResponse =
                    conn.call_for(ApiKey::ListOffsets, &req, self.inner.config.request_timeout).await?;
                let p = resp
                    .partitions
                    .first()
                    .ok_or_else(|| ClientError::Protocol("empty ListOffsets response".into()))?;
                broker_error(p.error, format!("{topic}/{partition}"))?;
                Ok(p.offset)
            }
            .await;
            match result {
                Err(e) if e.refreshes_metadata() && attempt < LIST_OFFSET_RETRIES => {
                    tracing::debug!(topic, partition, error = %e, "list offset failed; refreshing metadata");
                    attempt += 1;
                    self.invalidate_metadata(topic);
                    compio::time::sleep(ADMIN_RETRY_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// The cached coordinator of a consumer group or transactional id (`key_type`
    /// `wire::GROUP_KEY` or `wire::TRANSACTION_KEY`; see `group.rs`).
    pub(crate) fn cached_coordinator(&self, key_type: u8, name: &str) -> Option<u32> {
        self.inner.coordinators.borrow().get(&(key_type, name.to_owned())).copied()
    }

    /// Notes the coordinator a FindCoordinator answer named.
    pub(crate) fn remember_coordinator(&self, key_type: u8, name: &str, node: u32) {
        self.inner.coordinators.borrow_mut().insert((key_type, name.to_owned()), node);
    }

    /// Forgets a coordinator: the next request for that group or transactional id finds it
    /// again.
    pub(crate) fn forget_coordinator(&self, key_type: u8, name: &str) {
        self.inner.coordinators.borrow_mut().remove(&(key_type, name.to_owned()));
    }

    /// Whether the metadata cache knows a broker's address.
    pub(crate) fn knows_node(&self, node: u32) -> bool {
        self.inner.cache.borrow().brokers.contains_key(&node)
    }

    fn node_address(&self, node: u32) -> Result<String, ClientError> {
        self.inner
            .cache
            .borrow()
            .brokers
            .get(&node)
            .cloned()
            .ok_or_else(|| ClientError::Io(format!("no address known for broker {node}")))
    }

    /// [`Client::candidates`], the ones that did not fail lately rotated left by `turn`.
    fn candidates_from(&self, turn: usize) -> Vec<String> {
        let mut out = self.candidates();
        let suspects = self.inner.suspects.borrow();
        let healthy = out.iter().filter(|a| suspects.get(*a).is_none_or(|t| t.elapsed() >= SUSPECT_FOR)).count();
        if healthy > 0 {
            out[..healthy].rotate_left(turn % healthy);
        }
        out
    }

    /// Where to send a request for any broker: the known brokers, then the bootstrap list;
    /// addresses that failed in the last few seconds go last.
    fn candidates(&self) -> Vec<String> {
        let mut out: Vec<String> = self.inner.cache.borrow().brokers.values().cloned().collect();
        for addr in self.inner.config.brokers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if !out.iter().any(|a| a == addr) {
                out.push(addr.to_owned());
            }
        }
        let suspects = self.inner.suspects.borrow();
        let recent = |a: &String| suspects.get(a).is_some_and(|t| t.elapsed() < SUSPECT_FOR);
        out.sort_by_key(recent); // stable: keeps the order within each group
        out
    }

    fn suspect(&self, addr: &str) {
        self.inner.suspects.borrow_mut().insert(addr.to_owned(), Instant::now());
    }

    /// The shared connection to an address, opening one if there is none or it broke.
    async fn address_connection(&self, addr: &str) -> Result<Rc<Connection>, ClientError> {
        if let Some(c) = self.inner.conns.borrow().get(addr).filter(|c| !c.is_broken()) {
            return Ok(c.clone());
        }
        let conn = Rc::new(self.open(addr).await.inspect_err(|_| self.suspect(addr))?);
        // Another caller may have connected meanwhile; either connection works.
        self.inner.conns.borrow_mut().insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    async fn open(&self, addr: &str) -> Result<Connection, ClientError> {
        let config = &self.inner.config;
        compio::time::timeout(
            config.connect_timeout,
            Connection::connect(addr, &config.client_id, config.request_timeout),
        )
        .await
        .map_err(|_| ClientError::Timeout(format!("connecting to {addr}")))?
    }

    /// Sends a request to any broker, trying the next on a failure that is not the broker's
    /// answer; returns the address that answered and the response.
    async fn call_any<Req: Wire, Resp: Wire>(
        &self,
        key: ApiKey,
        req: &Req,
        timeout: Duration,
    ) -> Result<(String, Resp), ClientError> {
        let mut last = ClientError::Invalid("no brokers given".into());
        // Metadata asks a different broker each time: one cut off from the controllers answers
        // with leaders that moved on, and asking it again would not help.
        let turn = if key == ApiKey::Metadata {
            let turn = self.inner.metadata_turn.get();
            self.inner.metadata_turn.set(turn.wrapping_add(1));
            turn
        } else {
            0
        };
        for addr in self.candidates_from(turn) {
            let result = async { self.address_connection(&addr).await?.call_for(key, req, timeout).await }.await;
            match result {
                Ok(resp) => return Ok((addr, resp)),
                Err(e @ ClientError::Broker(code, _)) if !code.is_retriable() => return Err(e),
                Err(e) => {
                    tracing::debug!(broker = %addr, error = %e, ?key, "request failed; trying the next broker");
                    self.suspect(&addr);
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn metadata_from_any(&self, req: &MetadataRequest) -> Result<MetadataResponse, ClientError> {
        let (addr, resp) = self.call_any(ApiKey::Metadata, req, self.inner.config.metadata_timeout).await?;
        self.inner.cache.borrow_mut().update(&resp, host_of(&addr));
        Ok(resp)
    }
}

/// A caller waiting for the refresh in flight, told its outcome.
type RefreshWaiter = oneshot::Sender<Result<(), ClientError>>;

/// Releases the waiters of a refresh whose caller was dropped before it finished.
struct RefreshGuard<'a>(&'a Inner);

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        // Dropping the senders wakes the waiters with `Canceled`.
        drop(self.0.refresh.borrow_mut().take());
    }
}

/// What the cache knows of a partition's leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// Not cached, or invalidated: refresh.
    Missing,
    /// The topic's Metadata entry carried this error.
    TopicError(ErrorCode),
    /// The topic has fewer partitions.
    NoSuchPartition,
    /// The cluster has no leader for it right now.
    NoLeader,
    /// The leader's node id.
    Leader(u32),
}

impl Lookup {
    fn into_leader(self, topic: &str, partition: u32) -> Result<u32, ClientError> {
        let what = format!("{topic}/{partition}");
        match self {
            Lookup::Leader(node) => Ok(node),
            Lookup::Missing | Lookup::NoLeader => Err(ClientError::Broker(ErrorCode::NOT_LEADER, what)),
            Lookup::TopicError(code) => Err(ClientError::Broker(code, what)),
            Lookup::NoSuchPartition => Err(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, what)),
        }
    }
}

/// The metadata cache: pure data, filled from Metadata responses (no IO, no clock).
#[derive(Default, Debug)]
struct MetadataCache {
    /// Broker address (`host:port`) by node id, from the latest Metadata response.
    brokers: BTreeMap<u32, String>,
    /// Broker rack by node id (brokers without a rack are left out), from the same response.
    racks: BTreeMap<u32, String>,
    topics: HashMap<String, TopicEntry>,
}

#[derive(Default, Debug)]
struct TopicEntry {
    /// `None` until a Metadata response described the topic.
    error: Option<ErrorCode>,
    /// By partition: the leader (`None`: no leader now) and its epoch.
    leaders: Vec<(Option<u32>, u32)>,
    /// By partition: the in-sync replicas, from the same answer as the leader.
    isr: Vec<Vec<u32>>,
    /// Invalidated: lookups answer `Missing` until the next response about it.
    stale: bool,
}

impl MetadataCache {
    /// Looks a partition up, remembering the topic as wanted by later refreshes.
    fn lookup(&mut self, topic: &str, partition: u32) -> Lookup {
        self.want(topic);
        self.peek(topic, partition)
    }

    fn peek(&self, topic: &str, partition: u32) -> Lookup {
        let Some(t) = self.topics.get(topic).filter(|t| !t.stale) else {
            return Lookup::Missing;
        };
        match t.error {
            None => Lookup::Missing,
            Some(ErrorCode::NONE) => match t.leaders.get(partition as usize) {
                None => Lookup::NoSuchPartition,
                Some((None, _)) => Lookup::NoLeader,
                Some((Some(node), _)) => Lookup::Leader(*node),
            },
            Some(code) => Lookup::TopicError(code),
        }
    }

    fn want(&mut self, topic: &str) {
        if !self.topics.contains_key(topic) {
            self.topics.insert(topic.to_owned(), TopicEntry { stale: true, ..TopicEntry::default() });
        }
    }

    fn wanted(&self) -> Vec<String> {
        let mut names: Vec<String> = self.topics.keys().cloned().collect();
        names.sort();
        names
    }

    fn invalidate(&mut self, topic: &str) {
        self.want(topic);
        if let Some(t) = self.topics.get_mut(topic) {
            t.stale = true;
        }
    }

    /// Takes in a Metadata response from a broker reached at `host`. A broker advertising
    /// an unspecified address (`0.0.0.0`, `::`) is taken to be at `host`. A partition keeps
    /// its cached leader if the response's epoch is older (a broker behind on metadata),
    /// unless the topic was invalidated.
    fn update(&mut self, resp: &MetadataResponse, host: &str) {
        if !resp.brokers.is_empty() {
            self.brokers = resp
                .brokers
                .iter()
                .map(|b| {
                    let h = if b.host == "0.0.0.0" || b.host == "::" { host } else { b.host.as_str() };
                    (b.node_id, broker_address(h, b.port))
                })
                .collect();
            self.racks =
                resp.brokers.iter().filter(|b| !b.rack.is_empty()).map(|b| (b.node_id, b.rack.clone())).collect();
        }
        for t in &resp.topics {
            let entry = self.topics.entry(t.name.clone()).or_default();
            let mut leaders: Vec<(Option<u32>, u32)> = Vec::with_capacity(t.partitions.len());
            let mut isr: Vec<Vec<u32>> = Vec::with_capacity(t.partitions.len());
            for (i, p) in t.partitions.iter().enumerate() {
                let fresh = (Some(p.leader).filter(|&l| l != 0 && p.error == ErrorCode::NONE), p.leader_epoch);
                match entry.leaders.get(i) {
                    // The ISR kept with its leader: both come from the newer answer.
                    Some(&old) if !entry.stale && old.0.is_some() && old.1 > fresh.1 => {
                        leaders.push(old);
                        isr.push(entry.isr.get(i).cloned().unwrap_or_default());
                    }
                    _ => {
                        leaders.push(fresh);
                        isr.push(p.isr.clone());
                    }
                }
            }
            *entry = TopicEntry { error: Some(t.error), leaders, isr, stale: false };
        }
    }
}

/// `host:port`, with brackets around an IPv6 host.
fn broker_address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The host part of `host:port` (brackets kept for IPv6).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Groups items by the leader `leader_of` names; items without a known leader come back
/// apart, in their original order. Leaders come out in node id order.
pub fn group_by_leader<K>(
    items: impl IntoIterator<Item = K>,
    leader_of: impl Fn(&K) -> Option<u32>,
) -> GroupedByLeader<K> {
    let mut grouped = GroupedByLeader { by_leader: BTreeMap::new(), unrouted: Vec::new() };
    for item in items {
        match leader_of(&item) {
            Some(node) => grouped.by_leader.entry(node).or_default().push(item),
            None => grouped.unrouted.push(item),
        }
    }
    grouped
}

/// The output of [`group_by_leader`].
#[derive(Debug, PartialEq, Eq)]
pub struct GroupedByLeader<K> {
    /// Items by leader node id, each list in input order.
    pub by_leader: BTreeMap<u32, Vec<K>>,
    /// Items whose leader is not known.
    pub unrouted: Vec<K>,
}

/// Merges one topic's DescribeTopics answers from several brokers: each partition's row
/// from the broker that leads it (its row's `leader` is the answering node), else the first
/// row seen. Configs and the topic error come from the first answer without error (the
/// first answer if all have one). `None` if there is no answer.
fn merge_descriptions(answers: Vec<(u32, TopicDescription)>) -> Option<TopicDescription> {
    let first_ok = answers.iter().position(|(_, t)| t.error == ErrorCode::NONE).unwrap_or(0);
    let mut rows: BTreeMap<u32, (bool, PartitionDescription)> = BTreeMap::new();
    let mut base = None;
    for (i, (node, t)) in answers.into_iter().enumerate() {
        if t.error == ErrorCode::NONE {
            for row in t.partitions.iter() {
                let from_leader = row.leader == node && row.error == ErrorCode::NONE;
                match rows.get(&row.partition) {
                    Some((true, _)) => {}
                    Some((false, _)) if !from_leader => {}
                    _ => {
                        rows.insert(row.partition, (from_leader, row.clone()));
                    }
                }
            }
        }
        if i == first_ok {
            base = Some(t);
        }
    }
    let mut base = base?;
    if base.error == ErrorCode::NONE {
        base.partitions = rows.into_values().map(|(_, row)| row).collect();
    }
    Some(base)
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// Metadata refreshes one leader lookup may make (the first may be one already in flight
/// that did not ask for the topic).
const LEADER_REFRESHES_MAX: usize = 2;
/// Retries of a ListOffsets after a leadership change or a lost connection.
const LIST_OFFSET_RETRIES: u32 = 5;
const ADMIN_RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// How long an address that failed is tried after the others.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// Parses a topic config given as `KEY=VALUE` (the CLI's `--config`, the load generator's
/// `--topic-config`).
pub fn parse_topic_config(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("config '{s}' is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BrokerInfo, PartitionMetadata, TopicMetadata};

    /// A Metadata response: brokers `(node, port)` on 127.0.0.1, topics with their
    /// partitions' `(leader, epoch)`.
    fn metadata(brokers: &[(u32, u16)], topics: &[(&str, &[(u32, u32)])]) -> MetadataResponse {
        MetadataResponse {
            brokers: brokers
                .iter()
                .map(|&(node_id, port)| BrokerInfo { node_id, host: "127.0.0.1".into(), port, rack: String::new() })
                .collect(),
            controller: brokers.first().map_or(0, |b| b.0),
            topics: topics
                .iter()
                .map(|(name, parts)| TopicMetadata {
                    name: (*name).into(),
                    error: ErrorCode::NONE,
                    partitioning: 0,
                    partitions: parts
                        .iter()
                        .enumerate()
                        .map(|(i, &(leader, leader_epoch))| PartitionMetadata {
                            partition: i as u32,
                            error: if leader == 0 { ErrorCode::NOT_LEADER } else { ErrorCode::NONE },
                            leader,
                            leader_epoch,
                            replicas: vec![1, 2, 3],
                            isr: vec![1, 2, 3],
                            lineage: Default::default(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The cache's answers for partitions 0..n of `topic`.
    fn check(cache: &MetadataCache, topic: &str, expect: &[Lookup]) {
        let got: Vec<Lookup> = (0..expect.len() as u32).map(|p| cache.peek(topic, p)).collect();
        assert_eq!(got, expect, "{topic}");
    }

    #[test]
    fn cache_maps_partitions_to_leaders_and_nodes_to_addresses() {
        let mut cache = MetadataCache::default();
        check(&cache, "t", &[Lookup::Missing]);
        cache.update(&metadata(&[(1, 9001), (2, 9002)], &[("t", &[(1, 3), (2, 4), (0, 5)])]), "127.0.0.1");
        check(&cache, "t", &[Lookup::Leader(1), Lookup::Leader(2), Lookup::NoLeader, Lookup::NoSuchPartition]);
        assert_eq!(cache.brokers.get(&2).map(String::as_str), Some("127.0.0.1:9002"));
        assert_eq!(cache.wanted(), vec!["t".to_string()]);
        // A later answer without the topic leaves it alone; one with a new broker list replaces it.
        cache.update(&metadata(&[(3, 9003)], &[]), "127.0.0.1");
        check(&cache, "t", &[Lookup::Leader(1)]);
        assert_eq!(cache.brokers.keys().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn cache_ignores_older_epochs_unless_invalidated() {
        let mut cache = MetadataCache::default();
        cache.update(&metadata(&[(1, 9001)], &[("t", &[(2, 7)])]), "h");
        // A broker behind on metadata still names the old leader at an older epoch.
        cache.update(&metadata(&[(1, 9001)], &[("t", &[(1, 6)])]), "h");
        check(&cache, "t", &[Lookup::Leader(2)]);
        // A newer epoch wins.
        cache.update(&metadata(&[(1, 9001)], &[("t", &[(3, 8)])]), "h");
        check(&cache, "t", &[Lookup::Leader(3)]);
        // Invalidated: lookups miss until the next answer, which is taken as it is (the topic
        // may have been re-created, its epochs starting over).
        cache.invalidate("t");
        check(&cache, "t", &[Lookup::Missing]);
        cache.update(&metadata(&[(1, 9001)], &[("t", &[(1, 0)])]), "h");
        check(&cache, "t", &[Lookup::Leader(1)]);
    }

    #[test]
    fn cache_keeps_isr_with_its_leader_and_broker_racks() {
        let mut cache = MetadataCache::default();
        let mut resp = metadata(&[(1, 9001), (2, 9002)], &[("t", &[(2, 7)])]);
        resp.brokers[0].rack = "a".into();
        resp.topics[0].partitions[0].isr = vec![2, 1];
        cache.update(&resp, "h");
        assert_eq!(cache.topics["t"].isr, vec![vec![2, 1]]);
        assert_eq!(cache.racks.get(&1).map(String::as_str), Some("a"));
        assert_eq!(cache.racks.get(&2), None, "an empty rack is no rack");
        // An answer with an older epoch keeps the cached leader and its ISR.
        let mut old = metadata(&[(1, 9001), (2, 9002)], &[("t", &[(1, 6)])]);
        old.topics[0].partitions[0].isr = vec![1];
        cache.update(&old, "h");
        assert_eq!(cache.topics["t"].isr, vec![vec![2, 1]]);
        assert!(cache.racks.is_empty(), "the broker list (and racks) are the latest answer's");
        // A newer epoch replaces both.
        let mut new = metadata(&[(1, 9001)], &[("t", &[(1, 8)])]);
        new.topics[0].partitions[0].isr = vec![1];
        cache.update(&new, "h");
        assert_eq!(cache.topics["t"].isr, vec![vec![1]]);
    }

    #[test]
    fn cache_keeps_topic_errors_and_wanted_topics() {
        let mut cache = MetadataCache::default();
        assert_eq!(cache.lookup("gone", 0), Lookup::Missing);
        assert_eq!(cache.wanted(), vec!["gone".to_string()], "a looked-up topic is asked for by refreshes");
        let mut resp = metadata(&[(1, 9001)], &[("gone", &[])]);
        resp.topics[0].error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
        cache.update(&resp, "h");
        check(&cache, "gone", &[Lookup::TopicError(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)]);
        assert!(matches!(
            cache.peek("gone", 0).into_leader("gone", 0),
            Err(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _))
        ));
        assert!(cache.peek("other", 0).into_leader("other", 0).is_err_and(|e| e.is_retriable()));
    }

    #[test]
    fn unspecified_broker_hosts_are_the_answering_host() {
        let mut cache = MetadataCache::default();
        let mut resp = metadata(&[(1, 9001), (2, 9002), (3, 9003)], &[]);
        resp.brokers[0].host = "0.0.0.0".into();
        resp.brokers[1].host = "::1".into();
        resp.brokers[2].host = "::".into();
        cache.update(&resp, host_of("10.0.0.5:9092"));
        let addrs: Vec<&str> = cache.brokers.values().map(String::as_str).collect();
        assert_eq!(addrs, vec!["10.0.0.5:9001", "[::1]:9002", "10.0.0.5:9003"]);
        assert_eq!(host_of("[::1]:9092"), "[::1]");
    }

    #[test]
    fn partitions_are_grouped_by_leader_in_order() {
        let leaders: HashMap<u32, u32> = [(0, 2), (1, 1), (2, 2), (4, 3)].into_iter().collect();
        let grouped = group_by_leader(0..6u32, |p| leaders.get(p).copied());
        let expect: BTreeMap<u32, Vec<u32>> = [(1, vec![1]), (2, vec![0, 2]), (3, vec![4])].into_iter().collect();
        assert_eq!(grouped.by_leader, expect);
        assert_eq!(grouped.unrouted, vec![3, 5]);
        let empty = group_by_leader(Vec::<u32>::new(), |_| Some(1));
        assert!(empty.by_leader.is_empty() && empty.unrouted.is_empty());
    }

    fn description(leaders: &[(u32, u64)]) -> TopicDescription {
        TopicDescription {
            name: "t".into(),
            error: ErrorCode::NONE,
            partitioning: 0,
            configs: vec![],
            partitions: leaders
                .iter()
                .enumerate()
                .map(|(i, &(leader, high_watermark))| PartitionDescription {
                    partition: i as u32,
                    error: ErrorCode::NONE,
                    leader,
                    leader_epoch: 1,
                    replicas: vec![1, 2],
                    isr: vec![1, 2],
                    log_start: 0,
                    high_watermark,
                    log_end: high_watermark,
                    last_stable: high_watermark,
                    lineage: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn described_partitions_come_from_their_leaders() {
        // Node 1 leads partition 0, node 2 leads partition 1; each knows its own offsets best.
        let from_1 = description(&[(1, 10), (2, 3)]);
        let from_2 = description(&[(1, 7), (2, 20)]);
        let merged = merge_descriptions(vec![(1, from_1.clone()), (2, from_2.clone())]).expect("answers");
        let hw: Vec<u64> = merged.partitions.iter().map(|p| p.high_watermark).collect();
        assert_eq!(hw, vec![10, 20]);
        let merged = merge_descriptions(vec![(2, from_2), (1, from_1)]).expect("answers");
        assert_eq!(merged.partitions.iter().map(|p| p.high_watermark).collect::<Vec<_>>(), vec![10, 20]);
        // No leader answered for partition 1 (node 2 is down): any row will do.
        let merged = merge_descriptions(vec![(1, description(&[(1, 10), (2, 3)]))]).expect("answer");
        assert_eq!(merged.partitions.iter().map(|p| p.high_watermark).collect::<Vec<_>>(), vec![10, 3]);
        // Every broker says the topic is unknown: that error is the answer.
        let mut unknown = description(&[]);
        unknown.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
        let merged = merge_descriptions(vec![(1, unknown)]).expect("answer");
        assert_eq!(merged.error, ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
        assert!(merge_descriptions(vec![]).is_none());
    }
}
