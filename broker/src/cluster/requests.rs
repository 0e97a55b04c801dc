//! Client requests on a cluster broker's shards.
//!
//! [`dispatch`] runs on the shard a connection was dealt to. Control requests (metadata,
//! topics, reassignment, producer ids) go to shard 0. Produce, fetch and list-offsets name
//! partitions: a request whose partitions one shard owns runs there whole (on this shard, or
//! sent to the owner as one message); a request spanning shards is split per owner and the
//! answers are put back in request order. A fetch spanning shards long-polls here: each round
//! reads every owner once, then waits until any of them pumps (something may have moved a
//! high watermark) or its time is up.
//!
//! On the owning shard, produce becomes `BrokerNode::handle_produce` (answered when the core
//! says, through the request's pending sender) and fetch `read_committed` (the leader, with a
//! valid lease, below its high watermark) or a follower read.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;
use skein_client::wire::{
    AbortedTransaction, ErrorCode, FetchPartition, FetchRequest, ListOffsetsPartitionResponse, ListOffsetsRequest,
    ListOffsetsResponse, ProducePartitionResponse, ProduceRequest, ProduceResponse, EARLIEST, LATEST, READ_COMMITTED,
};
use skein_log::types::Timestamp;

use super::now;
use super::shard::{owner, Node, ShardMsg};
use crate::core::{Acks, LeaderEpoch, Offset, PartitionId, ProduceError, ReadFailure};
use crate::service::budget::FetchBudget;
use crate::service::{api_versions, fail_stop, fetch_response, split_batches, FetchResult, Request, Response};

/// A request arriving on this shard.
pub(super) async fn dispatch(node: Rc<Node>, req: Request) -> Response {
    if node.stopping.get() {
        return Response::Error(ErrorCode::SHUTTING_DOWN);
    }
    match req {
        Request::ApiVersions => Response::ApiVersions(api_versions()),
        Request::Produce(r) => produce(node, r).await,
        Request::Fetch(r) => fetch(node, r).await,
        Request::ListOffsets(r) => list_offsets(node, r).await,
        r if super::txn::handles(&r) => super::txn::dispatch(node, r).await,
        r if super::tables::handles(&r) => super::tables::dispatch(node, r).await,
        r @ (Request::FindCoordinator(_)
        | Request::TxnOffsetCommit(_)
        | Request::GroupHeartbeat(_)
        | Request::OffsetCommit(_)
        | Request::OffsetFetch(_)
        | Request::ListGroups
        | Request::DescribeGroup(_)
        | Request::DeleteGroup(_)) => super::groups::dispatch(node, r).await,
        control if node.shard == 0 => node.control_request(control).await,
        control => ask(&node, 0, control).await,
    }
}

/// A request sent here by another shard: it is this shard's to run.
pub(super) async fn here(node: Rc<Node>, req: Request) -> Response {
    if node.stopping.get() {
        return Response::Error(ErrorCode::SHUTTING_DOWN);
    }
    match req {
        Request::Produce(r) => node.produce_here(r).await,
        Request::Fetch(r) => fetch_rounds(node, r).await,
        Request::ListOffsets(r) => Response::ListOffsets(node.list_offsets_here(r)),
        r if super::txn::handles(&r) => super::txn::here(node, r).await,
        r if super::tables::handles(&r) => super::tables::here(node, r).await,
        r @ (Request::GroupHeartbeat(_)
        | Request::TxnOffsetCommit(_)
        | Request::OffsetCommit(_)
        | Request::OffsetFetch(_)
        | Request::ListGroups
        | Request::DescribeGroup(_)
        | Request::DeleteGroup(_)) => super::groups::here(node, r).await,
        control => node.control_request(control).await,
    }
}

/// Runs `req` on shard `to`.
pub(super) async fn ask(node: &Node, to: usize, req: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    node.to_shard(to, ShardMsg::Request(req, tx));
    rx.await.unwrap_or(Response::Error(ErrorCode::SHUTTING_DOWN))
}

/// The shard that serves partition `index` of `topic` on this broker (an unknown one: this
/// shard, which answers UNKNOWN_TOPIC_OR_PARTITION).
fn shard_of(node: &Node, topic: &str, index: u32) -> usize {
    node.topics.load().partition(topic, index).map_or(node.shard, |p| owner(p, node.shard_count()))
}

/// The shard a connection should live on, judged by its first produce or fetch: the one that
/// owns every partition `req` names, when that is not this shard (`None`: stay).
pub(super) fn home(node: &Node, req: &Request) -> Option<usize> {
    let mut shards: Box<dyn Iterator<Item = usize>> = match req {
        Request::Produce(r) => Box::new(r.partitions.iter().map(|p| shard_of(node, &p.topic, p.partition))),
        Request::Fetch(r) => Box::new(r.partitions.iter().map(|p| shard_of(node, &p.topic, p.partition))),
        _ => return None,
    };
    let first = shards.next()?;
    (first != node.shard && shards.all(|s| s == first)).then_some(first)
}

/// Splits a request's partition entries by serving shard, keeping each entry's index in the
/// request.
fn by_shard<T>(node: &Node, items: Vec<T>, name: impl Fn(&T) -> (&str, u32)) -> BTreeMap<usize, (Vec<usize>, Vec<T>)> {
    let mut groups: BTreeMap<usize, (Vec<usize>, Vec<T>)> = BTreeMap::new();
    for (i, item) in items.into_iter().enumerate() {
        let (topic, index) = name(&item);
        let group = groups.entry(shard_of(node, topic, index)).or_default();
        group.0.push(i);
        group.1.push(item);
    }
    groups
}

async fn produce(node: Rc<Node>, mut req: ProduceRequest) -> Response {
    // Checked before the request is split: a bad `acks` fails the whole request, once.
    if !(-1..=1).contains(&req.acks) {
        return Response::Error(ErrorCode::INVALID_REQUEST);
    }
    let mut groups = by_shard(&node, std::mem::take(&mut req.partitions), |p| (p.topic.as_str(), p.partition));
    if groups.len() <= 1 {
        let (shard, parts) = groups.pop_first().map_or((node.shard, Vec::new()), |(s, (_, parts))| (s, parts));
        req.partitions = parts;
        return if shard == node.shard {
            node.produce_here(req).await
        } else {
            ask(&node, shard, Request::Produce(req)).await
        };
    }
    // Split across shards: each entry's name, for an answer a stopping shard never gave.
    let mut names: Vec<(String, u32)> = vec![(String::new(), 0); groups.values().map(|(i, _)| i.len()).sum()];
    for (indices, parts) in groups.values() {
        for (&i, p) in indices.iter().zip(parts) {
            names[i] = (p.topic.clone(), p.partition);
        }
    }
    let mut waits = Vec::new();
    for (shard, (indices, parts)) in groups {
        let sub = ProduceRequest { partitions: parts, ..req.clone() };
        let node = node.clone();
        let answer = compio::runtime::spawn(async move {
            if shard == node.shard {
                node.produce_here(sub).await
            } else {
                ask(&node, shard, Request::Produce(sub)).await
            }
        });
        waits.push((indices, answer));
    }
    let mut answers: Vec<Option<ProducePartitionResponse>> = names.iter().map(|_| None).collect();
    for (indices, answer) in waits {
        if let Ok(Response::Produce(r)) = answer.await {
            for (i, p) in indices.into_iter().zip(r.partitions) {
                answers[i] = Some(p);
            }
        }
    }
    if req.acks == 0 {
        return Response::Nothing;
    }
    // A shard that did not answer was stopping.
    let partitions = answers
        .into_iter()
        .zip(names)
        .map(|(a, (topic, partition))| {
            a.unwrap_or(ProducePartitionResponse {
                topic,
                partition,
                error: ErrorCode::SHUTTING_DOWN,
                base_offset: 0,
                leader_epoch: 0,
                log_start: 0,
            })
        })
        .collect();
    Response::Produce(ProduceResponse { partitions })
}

/// A fetch whose partitions one other shard owns runs there; otherwise here.
async fn fetch(node: Rc<Node>, req: FetchRequest) -> Response {
    let shards: std::collections::BTreeSet<usize> =
        req.partitions.iter().map(|p| shard_of(&node, &p.topic, p.partition)).collect();
    match shards.first() {
        Some(&only) if shards.len() == 1 && only != node.shard => ask(&node, only, Request::Fetch(req)).await,
        _ => fetch_rounds(node, req).await,
    }
}

/// A fetch: long-polls up to `max_wait_ms` for `min_bytes`; partitions behind their session
/// token are waited for up to `--read-wait-ms` (within the fetch's wait), then answered
/// NOT_CAUGHT_UP.
async fn fetch_rounds(node: Rc<Node>, req: FetchRequest) -> Response {
    let wait = u64::from(req.max_wait_ms.min(node.config.max_request_timeout_ms));
    let start = now();
    let deadline = start.plus_ms(wait);
    let token_deadline = start.plus_ms(wait.min(node.config.read_wait_ms));
    let mut waited: Vec<bool> = vec![false; req.partitions.len()];
    loop {
        // Registered before reading, so nothing that happens between the read and the wait
        // is missed.
        let wakes = wake_on(&node, &req.partitions);
        let t = now();
        let elapsed_us = u32::try_from(t.0.saturating_sub(start.0)).unwrap_or(u32::MAX);
        let mut results = Vec::with_capacity(req.partitions.len());
        let mut behind_any = false;
        // The budgets hold the bytes read until the response is handed to the connection.
        let (round, budgets) = fetch_round(&node, &req).await;
        for (i, (mut r, behind)) in round.into_iter().enumerate() {
            if behind {
                waited[i] = true;
                behind_any = true;
                if t >= token_deadline {
                    r.error = ErrorCode::NOT_CAUGHT_UP;
                }
            }
            if waited[i] {
                r.token_wait_us = elapsed_us;
            }
            results.push(r);
        }
        let total: usize = results.iter().map(|r| r.records.len()).sum();
        let failed = results.iter().any(|r| r.error != ErrorCode::NONE);
        let waiting_for_token = behind_any && t < token_deadline;
        // `min_bytes` 0 answers at once, as in Kafka.
        if !waiting_for_token && (total >= req.min_bytes as usize || failed || t >= deadline) {
            return fetch_response(req, results);
        }
        // Nothing read is kept while waiting (a fetch whose budget was full waits for room
        // like for data: the next round reads again).
        drop((results, budgets));
        let until = if waiting_for_token { token_deadline } else { deadline };
        let left = Duration::from_micros(until.0.saturating_sub(t.0)).min(Duration::from_millis(20));
        let _ = compio::time::timeout(left, futures_util::future::select_all(wakes)).await;
    }
}

/// Wakers that fire after the next pump of every shard serving one of `parts`.
fn wake_on(node: &Node, parts: &[FetchPartition]) -> Vec<oneshot::Receiver<()>> {
    let shards: std::collections::BTreeSet<usize> =
        parts.iter().map(|p| shard_of(node, &p.topic, p.partition)).collect();
    let mut wakes = Vec::with_capacity(shards.len().max(1));
    for shard in shards {
        let (tx, rx) = oneshot::channel();
        if shard == node.shard {
            node.fetch_waiters.borrow_mut().push(tx);
        } else {
            node.to_shard(shard, ShardMsg::Wake(tx));
        }
        wakes.push(rx);
    }
    if wakes.is_empty() {
        let (tx, rx) = oneshot::channel();
        node.fetch_waiters.borrow_mut().push(tx);
        wakes.push(rx);
    }
    wakes
}

/// One read of every partition of a fetch, each by its serving shard, against the fetch's
/// `max_bytes` and that shard's fetch budget. Results in request order, each with whether its
/// replica was behind the read's session token.
async fn fetch_round(node: &Node, req: &FetchRequest) -> (Vec<(FetchResult, bool)>, Vec<FetchBudget>) {
    if req.partitions.iter().all(|p| shard_of(node, &p.topic, p.partition) == node.shard) {
        // The common case: read in place, nothing copied.
        let mut budget = FetchBudget::new(req.max_bytes, &node.budgets.fetch);
        let results = node.fetch_once(req.replica_read, req.isolation, &req.partitions, &mut budget);
        return (results, vec![budget]);
    }
    let groups = by_shard(node, req.partitions.clone(), |p| (p.topic.as_str(), p.partition));
    let mut out: Vec<Option<(FetchResult, bool)>> = (0..req.partitions.len()).map(|_| None).collect();
    let mut budgets = Vec::with_capacity(groups.len());
    let mut remote = Vec::new();
    for (shard, (indices, parts)) in groups {
        if shard == node.shard {
            let mut budget = FetchBudget::new(req.max_bytes, &node.budgets.fetch);
            for (i, r) in indices.into_iter().zip(node.fetch_once(req.replica_read, req.isolation, &parts, &mut budget))
            {
                out[i] = Some(r);
            }
            budgets.push(budget);
        } else {
            let (tx, rx) = oneshot::channel();
            node.to_shard(shard, ShardMsg::FetchOnce((req.replica_read, req.isolation), parts, req.max_bytes, tx));
            remote.push((indices, rx));
        }
    }
    for (indices, rx) in remote {
        if let Ok((results, budget)) = rx.await {
            for (i, r) in indices.into_iter().zip(results) {
                out[i] = Some(r);
            }
            budgets.push(budget);
        }
    }
    let results =
        out.into_iter().map(|r| r.unwrap_or_else(|| (FetchResult::empty(ErrorCode::SHUTTING_DOWN), false))).collect();
    (results, budgets)
}

async fn list_offsets(node: Rc<Node>, req: ListOffsetsRequest) -> Response {
    let names: Vec<(String, u32)> = req.partitions.iter().map(|p| (p.topic.clone(), p.partition)).collect();
    let groups = by_shard(&node, req.partitions, |p| (p.topic.as_str(), p.partition));
    let mut answers: Vec<Option<ListOffsetsPartitionResponse>> = names.iter().map(|_| None).collect();
    for (shard, (indices, parts)) in groups {
        let sub = ListOffsetsRequest { isolation: req.isolation, partitions: parts };
        let answer = if shard == node.shard {
            node.list_offsets_here(sub)
        } else {
            match ask(&node, shard, Request::ListOffsets(sub)).await {
                Response::ListOffsets(r) => r,
                _ => ListOffsetsResponse { partitions: Vec::new() },
            }
        };
        for (i, p) in indices.into_iter().zip(answer.partitions) {
            answers[i] = Some(p);
        }
    }
    let partitions = answers
        .into_iter()
        .zip(names)
        .map(|(a, (topic, partition))| {
            a.unwrap_or(ListOffsetsPartitionResponse { topic, partition, error: ErrorCode::SHUTTING_DOWN, offset: 0 })
        })
        .collect();
    Response::ListOffsets(ListOffsetsResponse { partitions })
}

impl Node {
    fn partition_id(&self, topic: &str, index: u32) -> Option<PartitionId> {
        self.topics.load().partition(topic, index)
    }

    /// Produces to partitions this shard serves.
    pub(super) async fn produce_here(&self, req: ProduceRequest) -> Response {
        let acks = match req.acks {
            -1 => Acks::All,
            0 | 1 => Acks::Leader,
            _ => return Response::Error(ErrorCode::INVALID_REQUEST),
        };
        let timeout = u64::from(req.timeout_ms.min(self.config.max_request_timeout_ms));
        let mut waits = Vec::with_capacity(req.partitions.len());
        {
            let t = now();
            let deadline = t.plus_ms(timeout);
            let mut st = self.st.borrow_mut();
            let mut work = VecDeque::new();
            for part in req.partitions {
                let mut rxs = Vec::new();
                let pid = self.partition_id(&part.topic, part.partition);
                // Back-pressure, as on a single node: the entry's bytes are held until its
                // answers are in, or until this future is dropped (its connection failed).
                let held = pid.and_then(|_| self.budgets.produce.try_hold(part.records.len() as u64));
                let error = match (pid, &held, split_batches(part.records)) {
                    (None, _, _) => Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION),
                    (_, None, _) => Some(ErrorCode::THROTTLED),
                    (_, _, Err(code)) => Some(code),
                    (Some(p), Some(_), Ok(batches)) => {
                        for batch in batches {
                            let id = Node::request_id(&mut st);
                            let (tx, rx) = oneshot::channel();
                            st.pending.insert(id, tx);
                            let mut out = Vec::new();
                            let epoch = (part.leader_epoch != 0).then_some(LeaderEpoch(part.leader_epoch));
                            st.core.handle_produce(t, id, p, epoch, batch, acks, deadline, &mut out);
                            self.commands(&mut st, out, &mut work);
                            rxs.push(rx);
                        }
                        None
                    }
                };
                waits.push((part.topic, part.partition, error, rxs, held));
            }
            self.pump(&mut st, t, work);
        }
        let mut partitions = Vec::with_capacity(waits.len());
        for (topic, partition, error, rxs, _held) in waits {
            let mut resp = ProducePartitionResponse {
                topic,
                partition,
                error: error.unwrap_or(ErrorCode::NONE),
                base_offset: 0,
                leader_epoch: 0,
                log_start: 0,
            };
            for (i, rx) in rxs.into_iter().enumerate() {
                match rx.await {
                    Ok(Ok(base)) if i == 0 => resp.base_offset = base.0,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if resp.error == ErrorCode::NONE => resp.error = produce_error(e),
                    Ok(Err(_)) => {}
                    Err(_) if resp.error == ErrorCode::NONE => resp.error = ErrorCode::REQUEST_TIMED_OUT,
                    Err(_) => {}
                }
            }
            let st = self.st.borrow();
            if let Some(r) = self.partition_id(&resp.topic, partition).and_then(|p| st.core.replica(p)) {
                resp.leader_epoch = r.leader_epoch().map_or(0, |e| e.0);
                resp.log_start = r.log().log_start_offset().0;
            }
            partitions.push(resp);
        }
        if req.acks == 0 {
            return Response::Nothing;
        }
        Response::Produce(ProduceResponse { partitions })
    }

    /// One pass over partitions this shard serves. A partition whose replica is behind the
    /// read's session token (or, on a follower, behind the fetch offset) comes back with no
    /// records and `behind` set; the caller waits for it or answers NOT_CAUGHT_UP. Partitions
    /// are read in request order against `budget` (see [`FetchBudget`]), which holds what was
    /// read.
    pub(super) fn fetch_once(
        &self,
        replica_read: bool,
        isolation: u8,
        parts: &[FetchPartition],
        budget: &mut FetchBudget,
    ) -> Vec<(FetchResult, bool)> {
        let t = now();
        let st = self.st.borrow();
        parts
            .iter()
            .map(|p| {
                let fail = |error| (FetchResult::empty(error), false);
                let Some(pid) = self.partition_id(&p.topic, p.partition) else {
                    return fail(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
                };
                let Some(r) = st.core.replica(pid) else { return fail(ErrorCode::NOT_LEADER) };
                let log_start = r.log().log_start_offset().0;
                if p.fetch_offset < log_start {
                    return (FetchResult { log_start, ..FetchResult::empty(ErrorCode::OFFSET_OUT_OF_RANGE) }, false);
                }
                let leads = r.leader_epoch().is_some();
                let known = r.known_epoch().0;
                if !(leads || replica_read && r.is_follower()) {
                    return fail(ErrorCode::NOT_LEADER);
                }
                // A client naming an older leader epoch than this replica knows is refused; one
                // naming a newer epoch knows more than this broker yet (retriable): a leader
                // answers NOT_LEADER, a follower is behind.
                if p.leader_epoch != 0 && p.leader_epoch < known {
                    return fail(ErrorCode::FENCED_LEADER_EPOCH);
                }
                if p.leader_epoch > known && leads {
                    return fail(ErrorCode::NOT_LEADER);
                }
                let past = !leads && self.config.unsafe_follower_reads_past_high_watermark;
                // The budget: the range is sized first (no bytes read) and read only if it fits;
                // if not, an offset past every log reads nothing but still checks lease and role.
                let stable_only = isolation == READ_COMMITTED;
                let end = match (past, stable_only) {
                    (true, _) => r.log().log_end_offset(),
                    (false, true) => r.last_stable(),
                    (false, false) => r.high_watermark(),
                };
                let sized = |max_bytes| {
                    r.log().read(Offset(p.fetch_offset), skein_log::ReadLimit { max_bytes, end: Some(end) })
                };
                let max_bytes = budget
                    .limit(p.partition_max_bytes)
                    .filter(|&max_bytes| sized(max_bytes).map_or(true, |range| budget.fits(range.bytes)));
                let (from, max_bytes) = max_bytes.map_or((Offset(u64::MAX), 1), |m| (Offset(p.fetch_offset), m));
                let read = if leads {
                    st.core.read_leader(t, pid, from, max_bytes, stable_only)
                } else {
                    r.read_follower(from, max_bytes, past, stable_only)
                };
                let (records, hw) = match read {
                    Ok((records, hw)) => (records, hw.0),
                    Err(ReadFailure::Refused(e)) => return fail(produce_error(e)),
                    Err(ReadFailure::OffsetOutOfRange) => return fail(ErrorCode::OFFSET_OUT_OF_RANGE),
                    Err(ReadFailure::Corrupt(c)) => {
                        tracing::error!(partition = %pid, error = %c, "corrupt batch not served");
                        return fail(ErrorCode::STORAGE_ERROR);
                    }
                    // The log's state is unknown: stop, as for an append or sync failure.
                    Err(ReadFailure::Storage(e)) => fail_stop("a replicated partition's read", &e),
                };
                let last_stable = if stable_only { r.last_stable().0 } else { hw };
                let mut result = FetchResult {
                    high_watermark: hw,
                    last_stable,
                    leader_epoch: known,
                    log_start,
                    records,
                    ..FetchResult::empty(ErrorCode::NONE)
                };
                // The session token: this replica must have seen the session's writes and
                // reads (their high watermark and leader epoch) before it answers.
                let behind = hw < p.min_high_watermark
                    || known < p.min_leader_epoch.max(p.leader_epoch)
                    || (!leads && p.fetch_offset > hw);
                if behind {
                    return (FetchResult { records: Vec::new(), ..result }, true);
                }
                if leads && p.fetch_offset > r.log().log_end_offset().0 {
                    return (
                        FetchResult { records: Vec::new(), ..result.with_error(ErrorCode::OFFSET_OUT_OF_RANGE) },
                        false,
                    );
                }
                budget.take(&mut result.records);
                if stable_only && !result.records.is_empty() {
                    let to = Offset(last_stable);
                    result.aborted = r
                        .aborted_in(Offset(p.fetch_offset), to)
                        .into_iter()
                        .map(|a| AbortedTransaction {
                            producer_id: a.producer.0,
                            first_offset: a.first.0,
                            last_offset: a.last.0,
                        })
                        .collect();
                }
                (result, false)
            })
            .collect()
    }

    /// Offsets of partitions this shard serves.
    fn list_offsets_here(&self, req: ListOffsetsRequest) -> ListOffsetsResponse {
        let st = self.st.borrow();
        let isolation = req.isolation;
        let partitions = req
            .partitions
            .into_iter()
            .map(|part| {
                let mut resp = ListOffsetsPartitionResponse {
                    topic: part.topic.clone(),
                    partition: part.partition,
                    error: ErrorCode::NONE,
                    offset: 0,
                };
                let Some(pid) = self.partition_id(&part.topic, part.partition) else {
                    resp.error = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
                    return resp;
                };
                // Like reads, offsets come from a leader with a valid lease only.
                let leads = st.core.lease_valid(now())
                    && st.core.replica(pid).is_some_and(|r| {
                        r.state().is_some_and(|s| s.leader == Some(self.id)) && r.leader_epoch().is_some()
                    });
                let Some(r) = st.core.replica(pid).filter(|_| leads) else {
                    resp.error = ErrorCode::NOT_LEADER;
                    return resp;
                };
                // Readers see committed records only: "latest" is the high watermark, or for
                // read_committed the last stable offset.
                resp.offset = match part.timestamp {
                    EARLIEST => r.log().log_start_offset().0,
                    LATEST if isolation == READ_COMMITTED => r.last_stable().0,
                    LATEST => r.high_watermark().0,
                    ts => match r.log().offset_for_timestamp(Timestamp(ts)) {
                        Ok(found) => found.map_or(r.high_watermark(), |o| o.min(r.high_watermark())).0,
                        Err(e) => {
                            tracing::error!(error = %e, "timestamp lookup failed");
                            resp.error = ErrorCode::STORAGE_ERROR;
                            0
                        }
                    },
                };
                resp
            })
            .collect();
        ListOffsetsResponse { partitions }
    }
}

fn produce_error(e: ProduceError) -> ErrorCode {
    match e {
        ProduceError::NotLeader | ProduceError::LeaderNotReady => ErrorCode::NOT_LEADER,
        ProduceError::FencedLeaderEpoch => ErrorCode::FENCED_LEADER_EPOCH,
        ProduceError::NotEnoughReplicas => ErrorCode::NOT_ENOUGH_REPLICAS,
        ProduceError::Abandoned => ErrorCode::REQUEST_TIMED_OUT,
        ProduceError::Storage => ErrorCode::STORAGE_ERROR,
        ProduceError::OutOfOrderSequence => ErrorCode::OUT_OF_ORDER_SEQUENCE,
        ProduceError::ProducerFenced => ErrorCode::PRODUCER_FENCED,
        ProduceError::InvalidTxnState => ErrorCode::INVALID_TXN_STATE,
        ProduceError::Sealed => ErrorCode::PARTITION_SEALED,
    }
}
