//! Transactions: a [`TransactionalProducer`] writes to several partitions (and commits a
//! consumer group's offsets) as one unit that commits or aborts whole, and the transaction
//! admin calls on [`Client`] (list, describe, abort).
//!
//! The model is Kafka's (KIP-98, KIP-447) with its later safety fixes. A producer is known to
//! its **transaction coordinator** (found with FindCoordinator, `TRANSACTION_KEY`) by its
//! transactional id; InitProducerId gives it a producer id and epoch, fencing every earlier
//! instance with the same id and aborting what that one left open. Then, per transaction:
//!
//! 1. [`TransactionalProducer::begin`] (local).
//! 2. [`TransactionalProducer::send`]: records go through the ordinary [`Producer`] (same
//!    partitioning, batching, pipelining and retries), in batches marked transactional, with
//!    sequences restarting at 0. Before a partition's first batch goes out, the partition joins
//!    the transaction (AddPartitionsToTxn, asked as soon as a record is queued to it, every
//!    partition wanted meanwhile in one request): the broker takes a transactional write only
//!    for a partition already in the transaction (KIP-890 part 1).
//! 3. [`TransactionalProducer::send_offsets`]: AddOffsetsToTxn to the transaction coordinator,
//!    then TxnOffsetCommit to the group's coordinator; the offsets count only if the
//!    transaction commits (exactly-once consume-transform-produce).
//! 4. [`TransactionalProducer::commit`] waits until every record is acknowledged (if one
//!    failed the transaction cannot commit and must be aborted), then EndTxn; or
//!    [`TransactionalProducer::abort`] fails what was not sent yet, waits for what was, and
//!    ends with EndTxn(abort). EndTxn answers with a **new epoch** for the next transaction
//!    (KIP-890 part 2): nothing delayed from an ended transaction can touch a later one. A
//!    retried EndTxn carries the same epoch; the coordinator answers a retry of an end it
//!    already made with success and the new epoch.
//!
//! Errors ([`TxnError`]) say what the caller may do next: retry the same call, abort, or give
//! the producer up (fenced or otherwise fatal: init a new one). Coordinator requests retry
//! retriable answers (NOT_COORDINATOR after finding the coordinator again,
//! COORDINATOR_LOAD_IN_PROGRESS, CONCURRENT_TRANSACTIONS, REQUEST_TIMED_OUT, lost connections)
//! within `TxnConfig::coordinator_timeout`.
//!
//! Not done here: a transaction's timeout is enforced by the coordinator (it aborts and fences
//! the producer), not by this client; and the producer is not shared by clones (one owner
//! drives the state machine, `&mut self`).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::group::{CoordinatorKind, GroupAnswer};
use crate::producer::{AddOutcome, AddPartitions};
use crate::wire::{
    AbortTransactionRequest, AbortTransactionResponse, AddOffsetsToTxnRequest, AddOffsetsToTxnResponse,
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey, DescribeTransactionRequest,
    DescribeTransactionResponse, EndTxnRequest, EndTxnResponse, ErrorCode, InitProducerIdRequest,
    InitProducerIdResponse, ListTransactionsRequest, ListTransactionsResponse, ListedTransaction,
    OffsetCommitPartition, TopicPartition, TxnOffsetCommitRequest, TxnOffsetCommitResponse, Wire,
};
use crate::{
    Client, ClientError, Delivery, DeliveryResult, GroupMetadata, Producer, ProducerConfig, ProducerRecord, Retry,
    TrySend,
};

/// How a [`TransactionalProducer`] works.
#[derive(Clone, Debug)]
pub struct TxnConfig {
    /// The transactional id: one producer at a time writes under it (a new one fences the
    /// old), and its unfinished transaction is aborted when a new instance starts.
    pub transactional_id: String,
    /// The coordinator aborts a transaction open longer than this and fences its producer
    /// (0: the broker's default, 60 s; the broker's maximum is 15 min).
    pub transaction_timeout: Duration,
    /// Batching and retries of the records (`acks` is always all and idempotence on).
    pub producer: ProducerConfig,
    /// How long each coordinator step (init, add partitions, add offsets, offset commit,
    /// end) retries retriable answers before it gives up with [`TxnError::Retriable`].
    pub coordinator_timeout: Duration,
}

impl TxnConfig {
    /// The defaults for `transactional_id`: 60 s transaction timeout, the producer defaults,
    /// 30 s per coordinator step.
    pub fn new(transactional_id: &str) -> TxnConfig {
        TxnConfig {
            transactional_id: transactional_id.to_owned(),
            transaction_timeout: Duration::from_secs(60),
            producer: ProducerConfig::default(),
            coordinator_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a transactional call failed, and so what the caller may do next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// A newer producer with the same transactional id, or the coordinator (the transaction
    /// outlived its timeout, or an administrator aborted it), fenced this one. Fatal: nothing
    /// more can be done with it; a new instance (`init`) takes over.
    #[error("producer fenced: {0}")]
    Fenced(ClientError),
    /// The producer cannot go on for another reason (the coordinator refused its id or its
    /// timeout, or the transaction's state is not what the producer believes). Fatal: init a
    /// new instance.
    #[error("transactional producer failed: {0}")]
    Fatal(ClientError),
    /// The transaction cannot commit (a record, a partition or the offsets failed): abort
    /// it, then begin the next.
    #[error("transaction must be aborted: {0}")]
    Abortable(ClientError),
    /// No answer or a retriable one within the retry bound: call the same method again (a
    /// commit or abort is then retried with the same epoch; a send had not queued the
    /// record).
    #[error("not done yet, retry: {0}")]
    Retriable(ClientError),
    /// The call does not fit the producer's state (send before begin, abort while
    /// committing) or its arguments (a partition the topic does not have); nothing changed.
    #[error("{0}")]
    Invalid(ClientError),
}

impl TxnError {
    /// The underlying failure.
    pub fn client_error(&self) -> &ClientError {
        match self {
            TxnError::Fenced(e)
            | TxnError::Fatal(e)
            | TxnError::Abortable(e)
            | TxnError::Retriable(e)
            | TxnError::Invalid(e) => e,
        }
    }

    /// The stable name of the underlying failure (`ClientError::code_name`: a broker code
    /// such as `PRODUCER_FENCED`, or `TIMED_OUT`, `INVALID`, ...).
    pub fn code_name(&self) -> &'static str {
        self.client_error().code_name()
    }

    /// The producer is unusable: drop it and init a new one.
    pub fn is_fatal(&self) -> bool {
        matches!(self, TxnError::Fenced(_) | TxnError::Fatal(_))
    }

    /// The transaction must be aborted.
    pub fn is_abortable(&self) -> bool {
        matches!(self, TxnError::Abortable(_))
    }

    /// The same call may succeed if made again.
    pub fn is_retriable(&self) -> bool {
        matches!(self, TxnError::Retriable(_))
    }
}

/// Where a transactional producer is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// No transaction open: `begin` may start one.
    Ready,
    /// A transaction is open: records and offsets may be added.
    Open,
    /// An EndTxn (commit or abort) was started and not answered yet: only the same end may be
    /// called again (the coordinator may already have decided).
    Ending { commit: bool },
    /// Fenced or failed for good.
    Dead(TxnError),
}

/// A producer whose writes and group offsets commit or abort together (see the module
/// documentation). One transaction at a time: `begin`, `send` / `send_offsets`, then `commit`
/// or `abort`.
pub struct TransactionalProducer {
    client: Client,
    config: TxnConfig,
    producer: Producer,
    /// The producer id and the epoch of the current (or next) transaction.
    identity: (i64, i16),
    state: State,
    /// Groups whose offsets joined the open transaction (AddOffsetsToTxn answered).
    offset_groups: BTreeSet<String>,
}

impl TransactionalProducer {
    /// Registers `config.transactional_id` with its transaction coordinator (InitProducerId):
    /// fences every earlier producer with that id and aborts its unfinished transaction
    /// (CONCURRENT_TRANSACTIONS meanwhile is retried within `coordinator_timeout`).
    pub async fn init(client: Client, config: TxnConfig) -> Result<TransactionalProducer, TxnError> {
        let id = config.transactional_id.clone();
        if id.is_empty() {
            return Err(TxnError::Invalid(ClientError::Invalid("the transactional id is empty".into())));
        }
        let timeout_ms = u32::try_from(config.transaction_timeout.as_millis()).unwrap_or(u32::MAX);
        let req = InitProducerIdRequest { transactional_id: Some(id.clone()), transaction_timeout_ms: timeout_ms };
        let resp: InitProducerIdResponse =
            txn_call(&client, &id, config.coordinator_timeout, ApiKey::InitProducerId, &req)
                .await
                .map_err(coordinator_error)?;
        let identity = (resp.producer_id, resp.producer_epoch);
        let add = adder(client.clone(), id, config.coordinator_timeout);
        let producer = Producer::transactional(client.clone(), config.producer.clone(), add);
        producer.start_transaction(identity).map_err(TxnError::Fatal)?;
        tracing::debug!(transactional_id = %config.transactional_id, producer_id = identity.0, epoch = identity.1, "transactional producer ready");
        Ok(TransactionalProducer {
            client,
            config,
            producer,
            identity,
            state: State::Ready,
            offset_groups: BTreeSet::new(),
        })
    }

    /// The transactional id.
    pub fn transactional_id(&self) -> &str {
        &self.config.transactional_id
    }

    /// The producer id and epoch of the open (or next) transaction.
    pub fn identity(&self) -> (i64, i16) {
        self.identity
    }

    /// Whether a transaction is open (begun and not yet ended).
    pub fn in_transaction(&self) -> bool {
        matches!(self.state, State::Open | State::Ending { .. })
    }

    /// The partitions that joined the open transaction so far, sorted.
    pub fn partitions(&self) -> Vec<(String, u32)> {
        self.producer.transaction_partitions()
    }

    /// Sets the function told of every retry of a record batch (see [`Producer::on_retry`]).
    pub fn on_retry(&self, handler: impl Fn(&Retry<'_>) + 'static) {
        self.producer.on_retry(handler);
    }

    /// Starts a transaction (nothing is sent until the first record).
    pub fn begin(&mut self) -> Result<(), TxnError> {
        match &self.state {
            State::Ready => {
                self.state = State::Open;
                Ok(())
            }
            State::Dead(e) => Err(e.clone()),
            State::Open => Err(invalid("a transaction is open already: commit or abort it first")),
            State::Ending { .. } => {
                Err(invalid("the last transaction is not ended yet: call its commit or abort again"))
            }
        }
    }

    /// Queues a record in the open transaction, to `partition` if given, else by key hash
    /// (keyless: sticky partitioning), as [`Producer::send_to`]. The returned [`Delivery`]
    /// resolves to `(partition, offset)` once the record is acknowledged; it is readable by
    /// read_committed consumers only once the transaction commits. Fails with
    /// [`TxnError::Abortable`] once a record of the transaction failed; with `Retriable` or
    /// `Invalid` when the record was not queued (the transaction is unaffected).
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery, TxnError> {
        self.check_open()?;
        self.producer.send_to(topic, partition, key, value).await.map_err(not_queued)
    }

    /// Sets the function that learns the outcome of records sent with
    /// [`TransactionalProducer::send_tagged`] or [`TransactionalProducer::try_send_tagged`]
    /// (see [`Producer::on_delivery`]). An acknowledged record is readable by read_committed
    /// consumers only once its transaction commits.
    pub fn on_delivery(&self, handler: impl Fn(&[u64], DeliveryResult) + 'static) {
        self.producer.on_delivery(handler);
    }

    /// [`TransactionalProducer::send`] reporting to the delivery handler with `tag`
    /// (nothing allocated per record), as [`Producer::send_tagged`].
    pub async fn send_tagged(&mut self, record: ProducerRecord<'_>, tag: u64) -> Result<(), TxnError> {
        self.check_open()?;
        self.producer.send_tagged(record, tag).await.map_err(not_queued)
    }

    /// [`TransactionalProducer::send_tagged`] without waiting, as
    /// [`Producer::try_send_tagged`]: `WouldBlock` when it would have to wait.
    pub fn try_send_tagged(&mut self, record: ProducerRecord<'_>, tag: u64) -> Result<TrySend, TxnError> {
        self.check_open()?;
        self.producer.try_send_tagged(record, tag).map_err(not_queued)
    }

    /// Commits `offsets` (`(topic, partition, next offset to read)`) for `group` as part of
    /// the open transaction: they become the group's committed offsets if and only if the
    /// transaction commits. `group` names the consuming member (from
    /// `GroupConsumer::group_metadata`); the group's coordinator refuses a member it fenced.
    /// Any failure here leaves the transaction unable to commit ([`TxnError::Abortable`]) or
    /// the producer fenced: offsets that may or may not have been written must not commit
    /// with the records.
    pub async fn send_offsets(
        &mut self,
        group: &GroupMetadata,
        offsets: &[(String, u32, u64)],
    ) -> Result<(), TxnError> {
        self.check_open()?;
        let result = self.add_and_commit_offsets(group, offsets).await;
        result.map_err(|e| {
            // The coordinator may hold some of them already: this transaction must not commit.
            self.producer.fail_transaction(e.clone());
            self.failed(transaction_error(e))
        })
    }

    /// Waits until every record sent in the open transaction is acknowledged; fails with the
    /// transaction's first failure (it must then be aborted).
    pub async fn flush(&mut self) -> Result<(), TxnError> {
        self.check_open()?;
        self.producer.flush().await;
        match self.producer.transaction_failure() {
            Some(e) => Err(self.failed(transaction_error(e))),
            None => Ok(()),
        }
    }

    /// Commits the open transaction: waits until every record is acknowledged, then ends it
    /// (EndTxn) and takes the new epoch for the next one. If a record or the offsets failed,
    /// nothing is committed and the error says to abort. After [`TxnError::Retriable`] call
    /// `commit` again (the coordinator may have committed already; the retry learns it).
    pub async fn commit(&mut self) -> Result<(), TxnError> {
        match &self.state {
            State::Dead(e) => return Err(e.clone()),
            State::Ready => return Err(invalid("no transaction is open: begin one first")),
            State::Ending { commit: false } => {
                return Err(invalid("the transaction is being aborted: call abort again"))
            }
            State::Ending { commit: true } => {}
            State::Open => {
                self.flush().await?;
                self.state = State::Ending { commit: true };
            }
        }
        self.end(true).await
    }

    /// Aborts the open transaction: records not sent yet fail, those in flight are waited
    /// for, then the coordinator writes abort markers (EndTxn) and gives the new epoch for the
    /// next transaction. After [`TxnError::Retriable`] call `abort` again.
    pub async fn abort(&mut self) -> Result<(), TxnError> {
        match &self.state {
            State::Dead(e) => return Err(e.clone()),
            State::Ready => return Err(invalid("no transaction is open")),
            State::Ending { commit: true } => {
                return Err(invalid("the transaction is being committed: call commit again"));
            }
            State::Open | State::Ending { commit: false } => {}
        }
        self.state = State::Ending { commit: false };
        self.producer.abort_unsent();
        self.producer.flush().await;
        self.end(false).await
    }

    /// EndTxn with the open transaction's epoch, retried; on success the next transaction's
    /// identity is taken.
    async fn end(&mut self, commit: bool) -> Result<(), TxnError> {
        let id = &self.config.transactional_id;
        let (producer_id, producer_epoch) = self.identity;
        let req = EndTxnRequest { transactional_id: id.clone(), producer_id, producer_epoch, commit };
        let resp: EndTxnResponse =
            match txn_call(&self.client, id, self.config.coordinator_timeout, ApiKey::EndTxn, &req).await {
                Ok(resp) => resp,
                Err(e) => return Err(self.failed(coordinator_error(e))),
            };
        let next = (resp.producer_id, resp.producer_epoch);
        tracing::debug!(transactional_id = %id, commit, epoch = producer_epoch, next_epoch = next.1, "transaction ended");
        if let Err(e) = self.producer.start_transaction(next) {
            return Err(self.failed(TxnError::Fatal(e)));
        }
        self.identity = next;
        self.offset_groups.clear();
        self.state = State::Ready;
        Ok(())
    }

    async fn add_and_commit_offsets(
        &mut self,
        group: &GroupMetadata,
        offsets: &[(String, u32, u64)],
    ) -> Result<(), ClientError> {
        let id = self.config.transactional_id.clone();
        let bound = self.config.coordinator_timeout;
        let (producer_id, producer_epoch) = self.identity;
        if !self.offset_groups.contains(&group.group) {
            let req = AddOffsetsToTxnRequest {
                transactional_id: id.clone(),
                producer_id,
                producer_epoch,
                group: group.group.clone(),
            };
            let _: AddOffsetsToTxnResponse = txn_call(&self.client, &id, bound, ApiKey::AddOffsetsToTxn, &req).await?;
            self.offset_groups.insert(group.group.clone());
        }
        let req = TxnOffsetCommitRequest {
            transactional_id: id,
            group: group.group.clone(),
            producer_id,
            producer_epoch,
            member_id: group.member_id.clone(),
            member_epoch: group.member_epoch,
            partitions: offsets
                .iter()
                .map(|(topic, partition, offset)| OffsetCommitPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    metadata: String::new(),
                })
                .collect(),
        };
        let deadline = Instant::now() + bound;
        let client = &self.client;
        let resp: TxnOffsetCommitResponse = client
            .retrying_until(deadline, RETRY_BACKOFF, || {
                client.coordinator_call_once(CoordinatorKind::Group, &group.group, ApiKey::TxnOffsetCommit, &req, bound)
            })
            .await?;
        match resp.partitions.iter().find(|p| p.error != ErrorCode::NONE) {
            Some(p) => Err(ClientError::Broker(
                p.error,
                format!("transactional commit of {}/{} for group '{}'", p.topic, p.partition, group.group),
            )),
            None => Ok(()),
        }
    }

    fn check_open(&mut self) -> Result<(), TxnError> {
        match &self.state {
            State::Open => {}
            State::Dead(e) => return Err(e.clone()),
            State::Ready => return Err(invalid("no transaction is open: begin one first")),
            State::Ending { .. } => return Err(invalid("the transaction is ending")),
        }
        match self.producer.transaction_failure() {
            Some(e) => Err(self.failed(transaction_error(e))),
            None => Ok(()),
        }
    }

    /// Notes a failure: a fatal one kills the producer (every later call returns it).
    fn failed(&mut self, e: TxnError) -> TxnError {
        if e.is_fatal() {
            self.state = State::Dead(e.clone());
        }
        e
    }
}

/// The transactions of a cluster ([`Client::list_transactions`]).
#[derive(Clone, Debug, Default)]
pub struct TransactionList {
    /// Every transactional id found, sorted, each once.
    pub transactions: Vec<ListedTransaction>,
    /// Brokers that could not be asked (their transactional ids may be missing).
    pub failed: Vec<(u32, ClientError)>,
}

impl Client {
    /// Every transactional id of the cluster: ListTransactions sent to every broker (each
    /// answers for the ids it coordinates), merged (an id listed twice while its coordinator
    /// moves: the entry with the newest epoch).
    pub async fn list_transactions(&self) -> Result<TransactionList, ClientError> {
        let (answers, failed) = self
            .ask_every_broker::<_, ListTransactionsResponse>(ApiKey::ListTransactions, &ListTransactionsRequest {})
            .await?;
        let answers = answers.into_iter().map(|r| r.transactions).collect();
        Ok(TransactionList { transactions: merge_transaction_lists(answers), failed })
    }

    /// A transactional id's producer, state, timeout, age and partitions, from its
    /// coordinator (TRANSACTIONAL_ID_NOT_FOUND if it is unknown).
    pub async fn describe_transaction(
        &self,
        transactional_id: &str,
    ) -> Result<DescribeTransactionResponse, ClientError> {
        let req = DescribeTransactionRequest { transactional_id: transactional_id.to_owned() };
        self.coordinator_call(CoordinatorKind::Transaction, transactional_id, ApiKey::DescribeTransaction, &req).await
    }

    /// Aborts a transactional id's open transaction now (its abort markers are written) and
    /// fences its producer, as a timeout would: for a hanging transaction that holds back
    /// read_committed consumers (its last stable offset pins them).
    pub async fn abort_transaction(&self, transactional_id: &str) -> Result<(), ClientError> {
        let req = AbortTransactionRequest { transactional_id: transactional_id.to_owned() };
        self.coordinator_call::<_, AbortTransactionResponse>(
            CoordinatorKind::Transaction,
            transactional_id,
            ApiKey::AbortTransaction,
            &req,
        )
        .await
        .map(drop)
    }
}

/// A request to the transaction coordinator of `id`, retried within `bound` (also the table
/// client's two-phase commits, `table.rs`).
pub(crate) async fn txn_call<Req: Wire, Resp: Wire + GroupAnswer>(
    client: &Client,
    id: &str,
    bound: Duration,
    key: ApiKey,
    req: &Req,
) -> Result<Resp, ClientError> {
    let deadline = Instant::now() + bound;
    let attempt =
        || client.coordinator_call_once(CoordinatorKind::Transaction, id, key, req, request_bound(client, bound));
    client.retrying_until(deadline, RETRY_BACKOFF, attempt).await
}

/// The bound on one coordinator request: the client's request timeout, within the step's.
fn request_bound(client: &Client, step: Duration) -> Duration {
    client.config().request_timeout.min(step).max(REQUEST_BOUND_MIN)
}

/// The producer's way to add partitions to the open transaction of `id`.
fn adder(client: Client, id: String, bound: Duration) -> AddPartitions {
    let id = Rc::<str>::from(id);
    Rc::new(move |keys, identity| {
        let (client, id) = (client.clone(), id.clone());
        Box::pin(async move { add_partitions(&client, &id, identity, keys, bound).await })
    })
}

/// AddPartitionsToTxn for `keys`, retrying the partitions (or the whole request) answered
/// with a retriable error within `bound`; every partition's outcome.
pub(crate) async fn add_partitions(
    client: &Client,
    id: &str,
    (producer_id, producer_epoch): (i64, i16),
    mut keys: Vec<(String, u32)>,
    bound: Duration,
) -> Vec<AddOutcome> {
    let deadline = Instant::now() + bound;
    let mut out = Vec::with_capacity(keys.len());
    loop {
        let req = AddPartitionsToTxnRequest {
            transactional_id: id.to_owned(),
            producer_id,
            producer_epoch,
            partitions: keys
                .iter()
                .map(|(topic, partition)| TopicPartition { topic: topic.clone(), partition: *partition })
                .collect(),
        };
        let answer: Result<AddPartitionsToTxnResponse, ClientError> = client
            .coordinator_call_once(
                CoordinatorKind::Transaction,
                id,
                ApiKey::AddPartitionsToTxn,
                &req,
                request_bound(client, bound),
            )
            .await;
        let retry = match answer {
            Ok(resp) => sort_added(id, keys, &resp, &mut out),
            Err(e) if e.is_retriable() => keys.into_iter().map(|k| (k, e.clone())).collect(),
            Err(e) => {
                out.extend(keys.into_iter().map(|k| (k, Err(e.clone()))));
                Vec::new()
            }
        };
        if retry.is_empty() {
            return out;
        }
        if Instant::now() + ADD_RETRY_BACKOFF >= deadline {
            out.extend(retry.into_iter().map(|(k, e)| (k, Err(e))));
            return out;
        }
        tracing::debug!(transactional_id = id, partitions = retry.len(), error = %retry[0].1, "adding partitions to the transaction; retrying");
        compio::time::sleep(ADD_RETRY_BACKOFF).await;
        keys = retry.into_iter().map(|(k, _)| k).collect();
    }
}

/// Sorts an AddPartitionsToTxn answer into `out` (added, or failed for good); returns the
/// partitions to ask for again (a retriable answer, or none).
fn sort_added(
    id: &str,
    keys: Vec<(String, u32)>,
    resp: &AddPartitionsToTxnResponse,
    out: &mut Vec<AddOutcome>,
) -> Vec<((String, u32), ClientError)> {
    let mut retry = Vec::new();
    for key in keys {
        let code = resp.partitions.iter().find(|r| r.topic == key.0 && r.partition == key.1).map(|r| r.error);
        let what = || format!("adding {}/{} to transaction '{}'", key.0, key.1, crate::wire::shown(id));
        match code {
            Some(ErrorCode::NONE) => out.push((key, Ok(()))),
            Some(code) if code.is_retriable() => {
                let e = ClientError::Broker(code, what());
                retry.push((key, e));
            }
            Some(code) => {
                let e = ClientError::Broker(code, what());
                out.push((key, Err(e)));
            }
            None => {
                let e = ClientError::Protocol(format!("{}: not in the answer", what()));
                out.push((key, Err(e)));
            }
        }
    }
    retry
}

/// A coordinator step's failure (init, end): fenced, retriable, or else fatal (the producer's
/// idea of its transaction is not the coordinator's).
pub(crate) fn coordinator_error(e: ClientError) -> TxnError {
    match &e {
        ClientError::Broker(ErrorCode::PRODUCER_FENCED, _) => TxnError::Fenced(e),
        e2 if e2.is_retriable() => TxnError::Retriable(e),
        _ => TxnError::Fatal(e),
    }
}

/// A failure inside the open transaction (a record, a partition, the offsets): fenced, fatal
/// for the producer's identity, or else the transaction must be aborted.
fn transaction_error(e: ClientError) -> TxnError {
    match &e {
        ClientError::Broker(ErrorCode::PRODUCER_FENCED, _) => TxnError::Fenced(e),
        ClientError::Broker(
            ErrorCode::INVALID_PRODUCER_ID_MAPPING
            | ErrorCode::TRANSACTIONAL_ID_NOT_FOUND
            | ErrorCode::INVALID_TRANSACTION_TIMEOUT,
            _,
        ) => TxnError::Fatal(e),
        _ => TxnError::Abortable(e),
    }
}

/// A record that was not queued (the transaction is unaffected): retriable, or refused.
fn not_queued(e: ClientError) -> TxnError {
    if e.is_retriable() {
        TxnError::Retriable(e)
    } else {
        TxnError::Invalid(e)
    }
}

fn invalid(why: &str) -> TxnError {
    TxnError::Invalid(ClientError::Invalid(why.to_owned()))
}

/// Merges ListTransactions answers: one entry per transactional id (the newest epoch, if
/// brokers disagree while a coordinator moves), sorted by id.
fn merge_transaction_lists(answers: Vec<Vec<ListedTransaction>>) -> Vec<ListedTransaction> {
    let mut by_id: BTreeMap<String, ListedTransaction> = BTreeMap::new();
    for t in answers.into_iter().flatten() {
        match by_id.get(&t.transactional_id) {
            Some(seen) if (seen.producer_id, seen.producer_epoch) >= (t.producer_id, t.producer_epoch) => {}
            _ => {
                by_id.insert(t.transactional_id.clone(), t);
            }
        }
    }
    by_id.into_values().collect()
}

/// The pause after a retriable coordinator answer (Kafka's `retry.backoff.ms` is 100 ms).
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The pause before partitions are asked for again (short: a send waits for it).
const ADD_RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// The least time one coordinator request is given.
const REQUEST_BOUND_MIN: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::TxnPartitionResult;

    fn listed(id: &str, producer_id: i64, producer_epoch: i16, state: &str) -> ListedTransaction {
        ListedTransaction { transactional_id: id.into(), producer_id, producer_epoch, state: state.into(), age_ms: 0 }
    }

    #[test]
    fn transaction_lists_merge_by_id_keeping_the_newest_epoch() {
        let merged = merge_transaction_lists(vec![
            vec![listed("b", 1, 3, "ongoing"), listed("a", 2, 0, "empty")],
            vec![],
            vec![listed("b", 1, 4, "complete_commit"), listed("c", 5, 1, "ongoing")],
        ]);
        assert_eq!(
            merged,
            vec![listed("a", 2, 0, "empty"), listed("b", 1, 4, "complete_commit"), listed("c", 5, 1, "ongoing")]
        );
        assert!(merge_transaction_lists(vec![]).is_empty());
    }

    /// Classifies `code` as a coordinator step and as a failure inside the transaction.
    fn check(code: ErrorCode, step: fn(&TxnError) -> bool, inside: fn(&TxnError) -> bool) {
        let e = ClientError::Broker(code, String::new());
        assert!(
            step(&coordinator_error(e.clone())),
            "{code} as a coordinator step: {:?}",
            coordinator_error(e.clone())
        );
        assert!(inside(&transaction_error(e.clone())), "{code} inside: {:?}", transaction_error(e));
    }

    #[test]
    fn errors_say_what_to_do_next() {
        let fenced = |e: &TxnError| matches!(e, TxnError::Fenced(_));
        check(ErrorCode::PRODUCER_FENCED, fenced, fenced);
        check(ErrorCode::CONCURRENT_TRANSACTIONS, TxnError::is_retriable, TxnError::is_abortable);
        check(ErrorCode::NOT_COORDINATOR, TxnError::is_retriable, TxnError::is_abortable);
        check(ErrorCode::INVALID_TXN_STATE, TxnError::is_fatal, TxnError::is_abortable);
        check(ErrorCode::INVALID_PRODUCER_ID_MAPPING, TxnError::is_fatal, TxnError::is_fatal);
        check(ErrorCode::FENCED_MEMBER_EPOCH, TxnError::is_fatal, TxnError::is_abortable);
        check(ErrorCode::REQUEST_TIMED_OUT, TxnError::is_retriable, TxnError::is_abortable);
        let timeout = ClientError::Timeout("x".into());
        assert!(coordinator_error(timeout.clone()).is_retriable());
        assert_eq!(transaction_error(timeout).code_name(), "TIMED_OUT");
    }

    #[test]
    fn added_partitions_are_sorted_into_done_and_retried() {
        let key = |p: u32| ("t".to_owned(), p);
        let result = |partition, error| TxnPartitionResult { topic: "t".into(), partition, error };
        let resp = AddPartitionsToTxnResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            partitions: vec![
                result(0, ErrorCode::NONE),
                result(1, ErrorCode::CONCURRENT_TRANSACTIONS),
                result(2, ErrorCode::INVALID_TXN_STATE),
            ],
        };
        let mut out = Vec::new();
        let retry = sort_added("tx", vec![key(0), key(1), key(2), key(3)], &resp, &mut out);
        assert_eq!(retry.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), vec![key(1)]);
        let done: Vec<(u32, &'static str)> =
            out.iter().map(|(k, r)| (k.1, r.as_ref().err().map_or("NONE", ClientError::code_name))).collect();
        assert_eq!(done, vec![(0, "NONE"), (2, "INVALID_TXN_STATE"), (3, "PROTOCOL_ERROR")]);
    }
}
