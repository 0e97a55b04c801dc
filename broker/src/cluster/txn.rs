//! Transaction coordinators on a broker's shards: the driver of `core::txn`.
//!
//! A transactional id lives in partition `partition_for(id)` of the internal
//! `__transaction_state` topic (created by the first FindCoordinator for a transactional id);
//! the broker leading that partition coordinates the id, on the shard that owns the partition.
//! As for groups (`cluster::groups`), every replica of the partition applies its committed
//! records, requests of one partition run one at a time (an async mutex), and every change is
//! appended with `acks=all` through the ordinary produce path, then applied from the log.
//!
//! Markers go to partition leaders as `Message::TxnMarker` (over the peer links, or to this
//! broker's own shards), are appended there with `acks=all`, and are answered once committed.
//! A marker is sent again until it is answered (the partition takes duplicates as done), to
//! the leader the controller names at each attempt. A tick per shard completes what a previous
//! coordinator left prepared and aborts transactions past their timeout.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use skein_client::wire::{
    AbortTransactionResponse, AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, DescribeTransactionResponse,
    EndTxnResponse, ErrorCode, FindCoordinatorRequest, FindCoordinatorResponse, InitProducerIdRequest,
    InitProducerIdResponse, ListTransactionsResponse, TxnPartitionResult,
};

use super::internal::{self, Refusal};
use super::now;
use super::requests::ask;
use super::shard::{owner, Node};
use crate::core::group::{partition_for, OFFSETS_TOPIC};
use crate::core::machine::LogMachine;
use crate::core::txn::{check_id, EndStep, InitStep, Tp, TxnCoordinator, TxnRecord, TxnState, TXN_TOPIC};
use crate::core::txn_partition::MarkerKind;
use crate::core::{LeaderEpoch, MarkerRequest, Offset, PartitionId, ProduceError, ProducerEpoch, ProducerId};
use crate::service::{Request, Response};

/// How often a shard completes prepared transactions and aborts expired ones.
const TICK_MS: u64 = 100;
/// How long one marker attempt waits for its answer before it is sent again.
const MARKER_ATTEMPT_MS: u64 = 1_000;
/// How long a request waits for its markers before it answers (the tick keeps completing).
const MARKERS_MAX_MS: u64 = 10_000;
/// How long one tick waits for the markers of one transaction: the tick holds the
/// partition's slot, so a transaction whose partition has no leader must not keep the other
/// ids of the partition waiting long (it is tried again at the next tick).
const TICK_MARKERS_MAX_MS: u64 = 1_000;

/// The transaction state of one `__transaction_state` partition on this broker.
pub(crate) struct Loaded {
    /// The leader epoch this replica leads at, timers started (`None`: not leading).
    leading: Option<LeaderEpoch>,
    machine: TxnCoordinator,
}

/// This shard's coordinator state, by internal-topic partition.
pub(crate) type Coordinators = internal::Slots<Loaded>;

/// The transactional id a request names.
fn id_of(req: &Request) -> Option<&str> {
    Some(match req {
        Request::InitProducerId(r) => r.transactional_id.as_deref()?,
        Request::AddPartitionsToTxn(r) => &r.transactional_id,
        Request::AddOffsetsToTxn(r) => &r.transactional_id,
        Request::EndTxn(r) => &r.transactional_id,
        Request::DescribeTransaction(r) => &r.transactional_id,
        Request::AbortTransaction(r) => &r.transactional_id,
        _ => return None,
    })
}

/// Whether `req` is this module's.
pub(super) fn handles(req: &Request) -> bool {
    match req {
        Request::FindCoordinator(r) => r.key_type == skein_client::wire::TRANSACTION_KEY,
        Request::InitProducerId(r) => r.transactional_id.is_some(),
        Request::ListTransactions => true,
        r => id_of(r).is_some(),
    }
}

/// The answer to `req` carrying only an error.
fn refusal(req: &Request, (error, message): Refusal) -> Response {
    match req {
        Request::InitProducerId(_) => {
            Response::InitProducerId(InitProducerIdResponse { error, message, producer_id: -1, producer_epoch: -1 })
        }
        Request::AddPartitionsToTxn(_) => {
            Response::AddPartitionsToTxn(AddPartitionsToTxnResponse { error, message, partitions: Vec::new() })
        }
        Request::AddOffsetsToTxn(_) => Response::AddOffsetsToTxn(AddOffsetsToTxnResponse { error, message }),
        Request::EndTxn(_) => Response::EndTxn(EndTxnResponse { error, message, producer_id: -1, producer_epoch: -1 }),
        Request::DescribeTransaction(r) => Response::DescribeTransaction(DescribeTransactionResponse {
            error,
            message,
            transactional_id: r.transactional_id.clone(),
            producer_id: -1,
            producer_epoch: -1,
            state: String::new(),
            timeout_ms: 0,
            age_ms: 0,
            partitions: Vec::new(),
        }),
        Request::AbortTransaction(_) => Response::AbortTransaction(AbortTransactionResponse { error, message }),
        _ => Response::Error(error),
    }
}

/// The `__transaction_state` partition (index and id) of a transactional id.
fn txn_partition(node: &Node, id: &str) -> Option<(u32, PartitionId)> {
    let topics = node.topics.load();
    let index = partition_for(id, topics.partitions(TXN_TOPIC)?);
    Some((index, topics.partition(TXN_TOPIC, index)?))
}

/// A transaction request on the shard it arrived on.
pub(super) async fn dispatch(node: Rc<Node>, req: Request) -> Response {
    match req {
        Request::FindCoordinator(r) => Response::FindCoordinator(find_coordinator(&node, r).await),
        Request::ListTransactions => {
            let mut transactions = Vec::new();
            for shard in 0..node.shard_count() {
                let answer = if shard == node.shard {
                    list_here(&node).await
                } else {
                    ask(&node, shard, Request::ListTransactions).await
                };
                if let Response::ListTransactions(r) = answer {
                    transactions.extend(r.transactions);
                }
            }
            transactions.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
            Response::ListTransactions(ListTransactionsResponse { transactions })
        }
        req => {
            if let Err(e) = id_of(&req).map_or(Ok(()), check_id) {
                return refusal(&req, e);
            }
            let Some((_, pid)) = id_of(&req).and_then(|id| txn_partition(&node, id)) else {
                return refusal(&req, (ErrorCode::NOT_COORDINATOR, "find the transaction coordinator first".into()));
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

/// A transaction request for a partition this shard owns.
pub(super) async fn here(node: Rc<Node>, req: Request) -> Response {
    if matches!(req, Request::ListTransactions) {
        return list_here(&node).await;
    }
    match id_of(&req).and_then(|id| txn_partition(&node, id)) {
        Some((index, pid)) => serve(&node, index, pid, req).await,
        None => refusal(&req, (ErrorCode::NOT_COORDINATOR, "find the transaction coordinator first".into())),
    }
}

/// Brings the slot of `pid` up to this replica's high watermark (from the log start when it
/// is empty or behind the log start). `Ok(false)`: no replica here (the slot is emptied).
fn catch_up(node: &Node, pid: PartitionId, slot: &mut Option<Loaded>) -> Result<bool, Refusal> {
    let loaded = slot.get_or_insert_with(|| Loaded { leading: None, machine: TxnCoordinator::new(false) });
    let fed = match internal::feed_committed(node, pid, TXN_TOPIC, &mut loaded.machine) {
        Err((ErrorCode::STORAGE_ERROR, m)) if loaded.machine.applied() > Offset(0) => {
            tracing::warn!(partition = %pid, m, "rebuilding the transaction state from the log start");
            *loaded = Loaded { leading: None, machine: TxnCoordinator::new(false) };
            internal::feed_committed(node, pid, TXN_TOPIC, &mut loaded.machine)?
        }
        r => r?,
    };
    if fed.is_none() {
        *slot = None;
    }
    Ok(fed.is_some())
}

/// The slot of `pid`, caught up and leading at the current epoch; a refusal when this broker
/// does not coordinate it or is still catching up.
fn lead(node: &Node, pid: PartitionId, index: u32, slot: &mut Option<Loaded>) -> Result<LeaderEpoch, Refusal> {
    let not_here = || (ErrorCode::NOT_COORDINATOR, format!("this broker does not lead {TXN_TOPIC}/{index}"));
    let epoch = internal::coordinating(node, pid, TXN_TOPIC, index).inspect_err(|_| {
        if let Some(l) = slot.as_mut() {
            l.leading = None;
        }
    })?;
    if !catch_up(node, pid, slot)? {
        return Err(not_here());
    }
    let loaded = slot.as_mut().expect("caught up");
    if loaded.leading != Some(epoch) {
        loaded.machine.start_timers(now());
        loaded.leading = Some(epoch);
        tracing::info!(partition = index, epoch = epoch.0, applied = %loaded.machine.applied(), "coordinating the transactions of this partition");
    }
    Ok(epoch)
}

/// Appends `record` (acks=all) and applies it from the log; on a failure the state is dropped
/// and rebuilt from the log at the next request.
async fn commit(
    node: &Rc<Node>,
    index: u32,
    pid: PartitionId,
    epoch: LeaderEpoch,
    record: &TxnRecord,
    slot: &mut Option<Loaded>,
) -> Result<(), Refusal> {
    tracing::debug!(id = record.id, state = record.meta.state.name(), "writing a transaction record");
    let result = match internal::append(node, TXN_TOPIC, index, epoch, &[record.encode()], None).await {
        Ok(end) => match catch_up(node, pid, slot) {
            Ok(true) if slot.as_ref().is_some_and(|l| l.machine.applied() >= end) => {
                if let Some(l) = slot.as_mut() {
                    l.machine.start_timers(now());
                }
                return Ok(());
            }
            Ok(_) => Err((ErrorCode::NOT_COORDINATOR, format!("{TXN_TOPIC}/{index} moved to another broker"))),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    *slot = None;
    result
}

/// Writes `kind` markers of `producer` at `epoch` to every partition of `parts`, each until its
/// leader answered or `max_ms` passed. Per partition: `Ok` (the marker, or one it
/// duplicates, is committed there) or the last error.
async fn markers(
    node: &Rc<Node>,
    coordinator_partition: PartitionId,
    producer: ProducerId,
    epoch: i16,
    kind: MarkerKind,
    parts: &[Tp],
    max_ms: u64,
) -> BTreeMap<Tp, Result<(), ProduceError>> {
    let deadline = std::time::Instant::now() + Duration::from_millis(max_ms);
    let mut results: BTreeMap<Tp, Result<(), ProduceError>> =
        parts.iter().map(|p| (p.clone(), Err(ProduceError::NotLeader))).collect();
    loop {
        let todo: Vec<Tp> = results.iter().filter(|(_, r)| r.is_err()).map(|(p, _)| p.clone()).collect();
        if todo.is_empty() || std::time::Instant::now() >= deadline {
            return results;
        }
        let found = internal::leaders(node, &todo).await;
        let mut waits = Vec::new();
        for tp in &todo {
            let Some(&(partition, leader)) = found.get(tp) else { continue };
            let m = MarkerRequest {
                coordinator: node.id,
                coordinator_partition,
                correlation: 0,
                partition,
                producer,
                epoch: ProducerEpoch(epoch),
                kind,
            };
            waits.push((tp.clone(), node.send_marker(leader, m)));
        }
        // Every partition's answer is awaited at once: one attempt takes at most one wait.
        let answers = futures_util::future::join_all(waits.into_iter().map(|(tp, (correlation, rx))| async move {
            (tp, correlation, compio::time::timeout(Duration::from_millis(MARKER_ATTEMPT_MS), rx).await)
        }))
        .await;
        for (tp, correlation, answer) in answers {
            tracing::trace!(topic = %tp.0, partition = tp.1, kind = kind.name(), producer = producer.0, epoch, answer = ?answer, "marker answered");
            let result = match answer {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => {
                    node.forget_marker(correlation);
                    Err(ProduceError::Abandoned)
                }
            };
            results.insert(tp, result);
        }
        // A fenced answer is final (the partition is past this epoch), and so is a sealed
        // partition's refusal of a Begin (it never takes data again; the producer moves the
        // records to its children); others are tried again.
        for r in results.values_mut() {
            if *r == Err(ProduceError::ProducerFenced) {
                *r = if kind == MarkerKind::Begin { Err(ProduceError::ProducerFenced) } else { Ok(()) };
            }
        }
        let last = |r: &Result<(), ProduceError>| {
            r.is_ok() || matches!(r, Err(ProduceError::ProducerFenced) | Err(ProduceError::Sealed))
        };
        if results.values().all(last) {
            return results;
        }
        compio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Completes a prepared transaction of `id`: its markers (waiting up to `max_ms` for them),
/// then the completing record.
async fn complete(
    node: &Rc<Node>,
    index: u32,
    pid: PartitionId,
    epoch: LeaderEpoch,
    id: &str,
    slot: &mut Option<Loaded>,
    max_ms: u64,
) -> Result<(), Refusal> {
    let Some(c) = slot.as_ref().and_then(|l| l.machine.completion(id)) else { return Ok(()) };
    tracing::debug!(id, kind = c.kind.name(), partitions = c.partitions.len(), "completing a transaction");
    let results = markers(node, pid, c.producer, c.epoch, c.kind, &c.partitions, max_ms).await;
    if let Some((tp, e)) = results.iter().find_map(|(tp, r)| r.err().map(|e| (tp, e))) {
        tracing::warn!(id, topic = %tp.0, partition = tp.1, error = ?e, "a transaction marker is not written yet; retrying in the background");
        return Err((
            ErrorCode::CONCURRENT_TRANSACTIONS,
            format!("the {} marker of '{id}' for {}/{} is not written yet ({e:?})", c.kind.name(), tp.0, tp.1),
        ));
    }
    commit(node, index, pid, epoch, &c.record, slot).await
}

fn produce_code(e: ProduceError) -> ErrorCode {
    match e {
        ProduceError::NotLeader | ProduceError::LeaderNotReady | ProduceError::FencedLeaderEpoch => {
            ErrorCode::NOT_LEADER
        }
        ProduceError::NotEnoughReplicas => ErrorCode::NOT_ENOUGH_REPLICAS,
        ProduceError::Abandoned => ErrorCode::REQUEST_TIMED_OUT,
        ProduceError::Storage => ErrorCode::STORAGE_ERROR,
        ProduceError::ProducerFenced => ErrorCode::PRODUCER_FENCED,
        ProduceError::OutOfOrderSequence | ProduceError::InvalidTxnState => ErrorCode::INVALID_TXN_STATE,
        ProduceError::Sealed => ErrorCode::PARTITION_SEALED,
    }
}

/// Adds `parts` to `id`'s transaction and writes their Begin markers; per-partition codes.
#[allow(clippy::too_many_arguments)]
async fn add(
    node: &Rc<Node>,
    index: u32,
    pid: PartitionId,
    epoch: LeaderEpoch,
    slot: &mut Option<Loaded>,
    id: &str,
    producer_id: i64,
    producer_epoch: i16,
    parts: &[Tp],
) -> Result<Vec<(Tp, ErrorCode)>, Refusal> {
    let topics = node.topics.load();
    let (known, unknown): (Vec<Tp>, Vec<Tp>) =
        parts.iter().cloned().partition(|(t, p)| t != TXN_TOPIC && topics.partition(t, *p).is_some());
    drop(topics);
    let loaded = slot.as_ref().expect("led");
    if let Some(record) = loaded.machine.add_partitions(id, producer_id, producer_epoch, &known, internal::wall_ms())? {
        commit(node, index, pid, epoch, &record, slot).await?;
    }
    let begin = MarkerKind::Begin;
    let results = markers(node, pid, ProducerId(producer_id), producer_epoch, begin, &known, MARKERS_MAX_MS).await;
    let mut out: Vec<(Tp, ErrorCode)> =
        results.into_iter().map(|(tp, r)| (tp, r.map_or_else(produce_code, |()| ErrorCode::NONE))).collect();
    out.extend(unknown.into_iter().map(|tp| (tp, ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)));
    Ok(out)
}

/// A new producer id (shard 0 allocates them).
async fn new_producer_id(node: &Rc<Node>) -> Option<i64> {
    let req = Request::InitProducerId(InitProducerIdRequest { transactional_id: None, transaction_timeout_ms: 0 });
    match internal::control(node, req).await {
        Response::InitProducerId(r) if r.error == ErrorCode::NONE => Some(r.producer_id),
        _ => None,
    }
}

/// Runs one transaction request on the coordinator of partition `pid`.
async fn serve(node: &Rc<Node>, index: u32, pid: PartitionId, req: Request) -> Response {
    let slot = node.txns.slot(pid);
    let mut guard = slot.lock().await;
    let epoch = match lead(node, pid, index, &mut guard) {
        Ok(e) => e,
        Err(e) => return refusal(&req, e),
    };
    match run(node, index, pid, epoch, &req, &mut guard).await {
        Ok(r) => r,
        Err(e) => refusal(&req, e),
    }
}

async fn run(
    node: &Rc<Node>,
    index: u32,
    pid: PartitionId,
    epoch: LeaderEpoch,
    req: &Request,
    slot: &mut Option<Loaded>,
) -> Result<Response, Refusal> {
    let state = |slot: &Option<Loaded>| -> Result<(), Refusal> {
        slot.as_ref()
            .map(|_| ())
            .ok_or((ErrorCode::NOT_COORDINATOR, format!("{TXN_TOPIC}/{index} moved to another broker")))
    };
    match req {
        Request::InitProducerId(r) => {
            let id = r.transactional_id.as_deref().unwrap_or_default();
            for _ in 0..3 {
                state(slot)?;
                let fresh = slot.as_ref().and_then(|l| l.machine.get(id)).is_none_or(|m| m.epoch >= i16::MAX - 1);
                let new_pid = if fresh { new_producer_id(node).await } else { None };
                let step = slot.as_ref().expect("checked").machine.init(id, r.transaction_timeout_ms, || new_pid)?;
                match step {
                    InitStep::Done(record) => {
                        commit(node, index, pid, epoch, &record, slot).await?;
                        tracing::info!(
                            id,
                            producer = record.meta.producer_id,
                            epoch = record.meta.epoch,
                            "transactional producer initialized"
                        );
                        return Ok(Response::InitProducerId(InitProducerIdResponse {
                            error: ErrorCode::NONE,
                            message: String::new(),
                            producer_id: record.meta.producer_id,
                            producer_epoch: record.meta.epoch,
                        }));
                    }
                    InitStep::FinishFirst(record) => {
                        if let Some(record) = record {
                            tracing::info!(id, "a new instance fences the open transaction: aborting it");
                            commit(node, index, pid, epoch, &record, slot).await?;
                        }
                        complete(node, index, pid, epoch, id, slot, MARKERS_MAX_MS).await?;
                    }
                }
            }
            Err((ErrorCode::CONCURRENT_TRANSACTIONS, format!("the previous transaction of '{id}' is still ending")))
        }
        Request::AddPartitionsToTxn(r) => {
            let parts: Vec<Tp> = r.partitions.iter().map(|p| (p.topic.clone(), p.partition)).collect();
            let results =
                add(node, index, pid, epoch, slot, &r.transactional_id, r.producer_id, r.producer_epoch, &parts)
                    .await?;
            Ok(Response::AddPartitionsToTxn(AddPartitionsToTxnResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                partitions: results
                    .into_iter()
                    .map(|((topic, partition), error)| TxnPartitionResult { topic, partition, error })
                    .collect(),
            }))
        }
        Request::AddOffsetsToTxn(r) => {
            crate::core::group::check_group_id(&r.group)?;
            super::groups::ensure_offsets_topic(node).await?;
            let Some((group_index, _)) = super::groups::offsets_partition_for(node, &r.group) else {
                return Err((ErrorCode::COORDINATOR_LOAD_IN_PROGRESS, format!("{OFFSETS_TOPIC} is being created")));
            };
            let parts = [(OFFSETS_TOPIC.to_owned(), group_index)];
            let results =
                add(node, index, pid, epoch, slot, &r.transactional_id, r.producer_id, r.producer_epoch, &parts)
                    .await?;
            let error = results.first().map_or(ErrorCode::UNKNOWN, |(_, e)| *e);
            Ok(Response::AddOffsetsToTxn(AddOffsetsToTxnResponse { error, message: String::new() }))
        }
        Request::EndTxn(r) => {
            let id = r.transactional_id.as_str();
            state(slot)?;
            let step = slot.as_ref().expect("checked").machine.end(id, r.producer_id, r.producer_epoch, r.commit)?;
            match step {
                EndStep::Done(producer_id, producer_epoch) => {
                    return Ok(Response::EndTxn(EndTxnResponse {
                        error: ErrorCode::NONE,
                        message: String::new(),
                        producer_id,
                        producer_epoch,
                    }))
                }
                EndStep::Write(record) => {
                    let prepared = matches!(record.meta.state, TxnState::PrepareCommit | TxnState::PrepareAbort);
                    commit(node, index, pid, epoch, &record, slot).await?;
                    if prepared {
                        complete(node, index, pid, epoch, id, slot, MARKERS_MAX_MS).await?;
                    }
                }
                EndStep::Complete => complete(node, index, pid, epoch, id, slot, MARKERS_MAX_MS).await?,
            }
            state(slot)?;
            let meta = slot.as_ref().and_then(|l| l.machine.get(id)).cloned().expect("written above");
            Ok(Response::EndTxn(EndTxnResponse {
                error: ErrorCode::NONE,
                message: String::new(),
                producer_id: meta.producer_id,
                producer_epoch: meta.epoch,
            }))
        }
        Request::DescribeTransaction(r) => {
            state(slot)?;
            let d = slot.as_ref().expect("checked").machine.describe(&r.transactional_id, internal::wall_ms())?;
            Ok(Response::DescribeTransaction(d))
        }
        Request::AbortTransaction(r) => {
            let id = r.transactional_id.as_str();
            state(slot)?;
            if let Some(record) = slot.as_ref().expect("checked").machine.abort(id, "aborted by an administrator")? {
                tracing::info!(id, "aborting a transaction on an administrator's request");
                commit(node, index, pid, epoch, &record, slot).await?;
            }
            complete(node, index, pid, epoch, id, slot, MARKERS_MAX_MS).await?;
            Ok(Response::AbortTransaction(AbortTransactionResponse { error: ErrorCode::NONE, message: String::new() }))
        }
        Request::ListTransactions => {
            state(slot)?;
            let transactions = slot.as_ref().expect("checked").machine.list(internal::wall_ms());
            Ok(Response::ListTransactions(ListTransactionsResponse { transactions }))
        }
        _ => Err((ErrorCode::INVALID_REQUEST, "not a transaction request".into())),
    }
}

/// FindCoordinator for a transactional id: creates the topic on first use, then names the
/// leader of the id's partition.
async fn find_coordinator(node: &Rc<Node>, r: FindCoordinatorRequest) -> FindCoordinatorResponse {
    internal::find_coordinator(node, TXN_TOPIC, node.config.txn_partitions, &r.group, check_id(&r.group)).await
}

/// The transactions of the partitions this shard leads.
async fn list_here(node: &Rc<Node>) -> Response {
    let mut transactions = Vec::new();
    for (index, pid) in internal::led(node, TXN_TOPIC) {
        if let Response::ListTransactions(r) = serve(node, index, pid, Request::ListTransactions).await {
            transactions.extend(r.transactions);
        }
    }
    Response::ListTransactions(ListTransactionsResponse { transactions })
}

/// On every `__transaction_state` partition this shard hosts: applies newly committed records
/// (followers too, so a new leader starts warm), and where it leads completes prepared
/// transactions (a previous coordinator's) and aborts those past their timeout.
pub(super) async fn tick_loop(node: Rc<Node>) {
    loop {
        compio::time::sleep(Duration::from_millis(TICK_MS)).await;
        if node.stopping.get() {
            return;
        }
        let hosted = internal::hosted(&node, TXN_TOPIC);
        node.txns.retain(&hosted);
        for (index, pid) in hosted {
            let slot = node.txns.slot(pid);
            let Some(mut guard) = slot.try_lock() else { continue };
            if internal::leading_epoch(&node, pid).is_none() {
                if let Some(l) = guard.as_mut() {
                    l.leading = None;
                }
                if let Err((code, message)) = catch_up(&node, pid, &mut guard) {
                    tracing::warn!(
                        partition = index,
                        code = code.name(),
                        message,
                        "applying transaction records failed"
                    );
                    *guard = None;
                }
                continue;
            }
            let Ok(epoch) = lead(&node, pid, index, &mut guard) else { continue };
            let Some(loaded) = guard.as_ref() else { continue };
            let expired = loaded.machine.expired(now());
            for id in expired {
                let Some(Ok(Some(record))) = guard.as_ref().map(|l| l.machine.abort(&id, "timed out")) else {
                    continue;
                };
                tracing::warn!(id, "transaction timed out: aborting it and fencing its producer");
                if let Err((code, message)) = commit(&node, index, pid, epoch, &record, &mut guard).await {
                    tracing::warn!(id, code = code.name(), message, "writing a timeout abort failed");
                }
            }
            let unfinished = guard.as_ref().map(|l| l.machine.unfinished()).unwrap_or_default();
            for id in unfinished {
                if let Err((code, message)) =
                    complete(&node, index, pid, epoch, &id, &mut guard, TICK_MARKERS_MAX_MS).await
                {
                    tracing::debug!(id, code = code.name(), message, "completing a transaction: not yet");
                }
            }
        }
    }
}
