//! Exactly-once pipelines in the transaction workload: consume-transform-produce loops whose
//! input offsets commit in the same transaction as their outputs, over the real
//! [`GroupCoordinator`] hosted on a `__consumer_offsets` partition of the simulated cluster.
//!
//! The offsets partition is the last partition of the workload. Every node keeps a group
//! coordinator for it as `cluster::groups` does (and as [`super::super::groups`] does for the
//! group workload): every replica applies the committed records below its high watermark at
//! its tick (`core::machine::feed`, transactional offsets kept pending per producer until its
//! marker); a node leading at an epoch whose start its high watermark reached serves, one
//! request at a time behind a bounded queue. TxnOffsetCommit is checked by
//! [`GroupCoordinator::txn_commit`] and its records appended as ONE transactional batch of
//! the producer (its id and epoch, `Sequence::NONE`, `acks=all`) through
//! `BrokerNode::handle_produce`, so the partition leader's transaction check (its `Begin`
//! marker must be there, written when the transaction coordinator added the partition at
//! AddOffsetsToTxn) decides whether it lands; once acknowledged it is applied from the log
//! before the answer. OffsetFetch answers with [`GroupCoordinator::fetch_offsets_stable`]
//! (UNSTABLE_OFFSET_COMMIT while a transaction holds the group's offset).
//!
//! A pipeline (one transactional id, one group without members, committing as an
//! administrator; [`PIPELINES`] of them, each with its own group over the same input) runs,
//! per transaction: fetch its group's committed offset of the input partition (retrying
//! while unstable), read a few records read_committed from there, add the output partitions,
//! write one transform per input (a fresh unique value) to an output partition, add the
//! offsets partition (AddOffsetsToTxn), commit the offset after its last input
//! (TxnOffsetCommit), then commit the transaction (or abort it). The client side (phases,
//! restarts, late copies) is the transactional producer's of [`super`].
//!
//! Not done: group membership (KIP-447's member epoch fencing in TxnOffsetCommit): each
//! group has one pipeline, whose instances the transactional id's epoch fences.

use std::collections::VecDeque;

use skein_client::wire::{ErrorCode, OffsetCommitPartition, TopicPartition, TxnOffsetCommitRequest};
use skein_log::batch::{Attributes, BatchBuilder, RecordBatch};
use skein_log::types::{ProducerEpoch, ProducerId, Sequence};

use super::{Current, Phase, TxnReq, TxnResp, COORDINATOR_QUEUE_MAX, DATA_PARTITIONS, STATE_PARTITIONS, TOPIC};
use crate::check::txn::{TxnConsumed, TxnOp, TxnWrite};
use crate::check::{Offset as CheckOffset, PartitionId as CheckPartition, ProcessId, Value};
use crate::core::group::{GroupCoordinator, LogMachine};
use crate::core::machine::feed;
use crate::core::{Acks, LeaderEpoch, Offset, PartitionId, ProduceError, RequestId};
use crate::sim::{Sim, PRODUCE_DEADLINE_MS};

/// Pipelines (transactional ids `pipe-K`, groups `pipeline-K`).
pub(in crate::sim) const PIPELINES: usize = 2;
/// The data partition pipelines read (the others take their outputs).
const INPUT: u32 = 0;
/// Most inputs per transaction.
const INPUTS_MAX: u64 = 4;
const HEARTBEAT_INTERVAL_MS: u32 = 100;
const FINAL_PROCESS: u32 = 3_998;

/// A node's group coordinator of the offsets partition.
#[derive(Default)]
pub(in crate::sim) struct OffsetsCoordinator {
    machine: Option<GroupCoordinator>,
    leading: Option<LeaderEpoch>,
    /// The append in flight: (core request, client, client request, records).
    write: Option<(u64, usize, u64, u64)>,
    queue: VecDeque<(usize, u64, TxnReq)>,
}

/// The group of pipeline `k`.
pub(super) fn group(k: usize) -> String {
    format!("pipeline-{k}")
}

impl Sim {
    /// The workload's `__consumer_offsets` partition (after the state partitions).
    pub(super) fn offsets_partition_txn(&self) -> PartitionId {
        PartitionId(self.txn_base() + DATA_PARTITIONS + STATE_PARTITIONS)
    }

    pub(super) fn pipeline_input(&self) -> PartitionId {
        self.data_partition(INPUT)
    }

    /// The pipeline's first step of a transaction: its group's committed offset.
    pub(super) fn pipeline_fetch_offset(&mut self, c: usize, group: String) {
        let partition = self.pipeline_input();
        self.txn_send(c, TxnReq::OffsetFetch { group, partition });
    }

    /// The committed offset arrived (`Ok`) or was refused.
    pub(super) fn pipeline_offset(&mut self, c: usize, invoked: u64, got: Result<Option<Offset>, ErrorCode>) {
        let offset = match got {
            Ok(o) => o,
            Err(code) => {
                tracing::debug!(client = c, ?code, "sim: pipeline offset fetch refused");
                // Unstable: a transaction is deciding the offset; ask again shortly.
                let wait = if code == ErrorCode::UNSTABLE_OFFSET_COMMIT { (2_000, 10_000) } else { (5_000, 40_000) };
                self.txn.clients[c].idle_until = self.now + self.rng.range(wait.0, wait.1);
                return;
            }
        };
        let partition = self.pipeline_input();
        let cl = &mut self.txn.clients[c];
        let Some(group) = cl.group.clone() else { return };
        self.txn.history.push(TxnOp::OffsetRead {
            process: ProcessId(cl.process),
            group,
            partition: CheckPartition(partition.0),
            offset: offset.map(|o| CheckOffset(o.0)),
            invoke_us: invoked,
            complete_us: self.now,
            final_read: false,
        });
        cl.phase = Phase::Consuming { from: offset.unwrap_or(Offset(0)) };
    }

    /// Input records read from `from` (read_committed, up to `next`): the transaction begins
    /// with a few of them, or the pipeline waits for input.
    pub(super) fn pipeline_consumed(&mut self, c: usize, from: Offset, records: &[(CheckOffset, Value)], next: Offset) {
        if records.is_empty() {
            tracing::debug!(client = c, %from, %next, "sim: pipeline has no input");
            let cl = &mut self.txn.clients[c];
            cl.phase = Phase::Idle;
            cl.idle_until = self.now + self.rng.range(20_000, 60_000);
            return;
        }
        let n = (self.rng.range(1, INPUTS_MAX) as usize).min(records.len());
        let inputs = records[..n].to_vec();
        let to = records.get(n).map_or(next, |&(o, _)| Offset(o.0));
        let mut writes = Vec::with_capacity(n);
        for &(o, _) in &inputs {
            self.txn.next_value += 1;
            let out = self.data_partition(1 + (o.0 % u64::from(DATA_PARTITIONS - 1)) as u32);
            writes.push(TxnWrite { partition: CheckPartition(out.0), value: Value(self.txn.next_value), offset: None });
        }
        let mut partitions: Vec<PartitionId> = writes.iter().map(|w| PartitionId(w.partition.0)).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let input = self.pipeline_input();
        let cl = &mut self.txn.clients[c];
        let Some(group) = cl.group.clone() else { return };
        cl.current = Some(Current {
            partitions,
            writes,
            reads: inputs.iter().map(|&(_, v)| v).collect(),
            invoke_us: cl.started_us,
            commit_us: None,
            next_write: 0,
            tries: 0,
            consumed: Some(TxnConsumed {
                group,
                partition: CheckPartition(input.0),
                from: CheckOffset(from.0),
                to: CheckOffset(to.0),
                inputs,
            }),
        });
        cl.phase = Phase::Adding;
    }

    /// TxnOffsetCommit of the current transaction's offset.
    pub(super) fn pipeline_commit_offset(&mut self, c: usize) {
        let cl = &mut self.txn.clients[c];
        let Some(t) = cl.current.as_mut() else { return };
        let Some(consumed) = t.consumed.as_ref() else { return };
        t.tries += 1;
        let req = TxnOffsetCommitRequest {
            transactional_id: cl.id.clone(),
            group: consumed.group.clone(),
            producer_id: cl.producer_id,
            producer_epoch: cl.epoch,
            member_id: String::new(),
            member_epoch: -1,
            partitions: vec![OffsetCommitPartition {
                topic: TOPIC.into(),
                partition: consumed.partition.0,
                offset: consumed.to.0,
                metadata: String::new(),
            }],
        };
        self.txn_send(c, TxnReq::OffsetCommit(req));
    }

    // ---- the group coordinator on the brokers ----

    /// A group request (TxnOffsetCommit, OffsetFetch) reaches node `i`.
    pub(super) fn offsets_serve(&mut self, i: usize, client: usize, request: u64, req: TxnReq) {
        let c = &mut self.txn.offsets[i];
        if c.write.is_some() {
            if c.queue.len() < COORDINATOR_QUEUE_MAX {
                c.queue.push_back((client, request, req));
            } else {
                let resp = req.refused(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS);
                self.txn_reply(i, client, request, resp);
            }
            return;
        }
        self.offsets_run(i, client, request, req);
    }

    /// Runs one request on node `i`'s coordinator (no append in flight).
    fn offsets_run(&mut self, i: usize, client: usize, request: u64, req: TxnReq) {
        let epoch = match self.offsets_ready(i) {
            Ok(e) => e,
            Err(code) => {
                let resp = req.refused(code);
                return self.txn_reply(i, client, request, resp);
            }
        };
        let machine = self.txn.offsets[i].machine.as_ref().expect("ready");
        let r = match req {
            TxnReq::OffsetFetch { group, partition } => {
                let tp = [TopicPartition { topic: TOPIC.into(), partition: partition.0 }];
                let got = machine
                    .fetch_offsets_stable(&group, Some(&tp))
                    .map_err(|(code, _)| code)
                    .map(|found| found.first().and_then(|f| u64::try_from(f.offset).ok()).map(Offset));
                return self.txn_reply(i, client, request, TxnResp::OffsetFetch(got));
            }
            TxnReq::OffsetCommit(r) => r,
            other => return self.txn_reply(i, client, request, other.refused(ErrorCode::INVALID_REQUEST)),
        };
        let out = match machine.txn_commit(&r) {
            Ok(out) => out,
            Err((code, _)) => return self.txn_reply(i, client, request, TxnResp::OffsetCommit(Err(code))),
        };
        if out.records.is_empty() {
            let code = out.reply.iter().map(|p| p.error).find(|e| *e != ErrorCode::NONE);
            let resp = TxnResp::OffsetCommit(Err(code.unwrap_or(ErrorCode::INVALID_REQUEST)));
            return self.txn_reply(i, client, request, resp);
        }
        // One transactional batch of the producer: the partition leader checks it belongs to
        // the producer's open transaction here.
        let now = self.local(i);
        let mut b = BatchBuilder::new()
            .producer(ProducerId(r.producer_id), ProducerEpoch(r.producer_epoch), Sequence::NONE)
            .attributes(Attributes::default().with_transactional(true));
        for rec in &out.records {
            let (key, value) = rec.encode();
            b.push(Some(&key), &value, &[], now.timestamp());
        }
        let Ok(batch) = RecordBatch::parse(b.build().into_bytes()) else { unreachable!("a built batch parses") };
        let id = self.next_request;
        self.next_request += 1;
        self.txn.offsets[i].write = Some((id, client, request, out.records.len() as u64));
        let p = self.offsets_partition_txn();
        let deadline = now.plus_ms(PRODUCE_DEADLINE_MS);
        let mut cmds = Vec::new();
        let core = self.nodes[i].core.as_mut().expect("a coordinator runs on a live node");
        core.handle_produce(now, RequestId(id), p, Some(epoch), batch, Acks::All, deadline, &mut cmds);
        self.execute(i, cmds);
    }

    /// Whether `request` is node `i`'s offsets append; handles its result if so.
    pub(super) fn offsets_produce_reply(
        &mut self,
        i: usize,
        request: RequestId,
        result: Result<Offset, ProduceError>,
    ) -> bool {
        if self.txn.offsets.get(i).and_then(|c| c.write).is_none_or(|w| w.0 != request.0) {
            return false;
        }
        let (_, client, creq, n) = self.txn.offsets[i].write.take().expect("checked above");
        let resp = match result {
            Ok(base) => match self.offsets_catch_up(i) {
                Ok(()) if self.txn.offsets[i].machine.as_ref().is_some_and(|m| m.applied() >= Offset(base.0 + n)) => {
                    Ok(())
                }
                Ok(()) => Err(ErrorCode::NOT_COORDINATOR),
                Err(reason) => {
                    self.txn_fail_stop(i, reason);
                    return true;
                }
            },
            // Refused before the append: the producer's transaction is not open here.
            Err(ProduceError::ProducerFenced) => Err(ErrorCode::PRODUCER_FENCED),
            Err(ProduceError::InvalidTxnState) => Err(ErrorCode::INVALID_TXN_STATE),
            Err(e) => {
                Err(if e.definitely_not_written() { ErrorCode::NOT_COORDINATOR } else { ErrorCode::REQUEST_TIMED_OUT })
            }
        };
        if resp.is_err_and(|code| code == ErrorCode::NOT_COORDINATOR || code == ErrorCode::REQUEST_TIMED_OUT) {
            // Whether the records commit is unknown: rebuild from the log.
            let c = &mut self.txn.offsets[i];
            c.machine = None;
            c.leading = None;
        }
        if self.nodes[i].core.is_none() {
            return true;
        }
        self.txn_reply(i, client, creq, TxnResp::OffsetCommit(resp));
        while self.txn.offsets[i].write.is_none() && self.nodes[i].core.is_some() {
            let Some((client, request, req)) = self.txn.offsets[i].queue.pop_front() else { break };
            self.offsets_run(i, client, request, req);
        }
        true
    }

    /// Node `i`'s tick: a follower stays warm; requests queued on a node no longer
    /// coordinating are refused.
    pub(super) fn offsets_tick(&mut self, i: usize) {
        if self.nodes[i].core.is_none() || self.txn.offsets[i].write.is_some() {
            return;
        }
        if let Err(reason) = self.offsets_catch_up(i) {
            return self.txn_fail_stop(i, reason);
        }
        if self.txn.offsets[i].queue.is_empty() || self.offsets_ready(i).is_ok() {
            return;
        }
        for (client, request, req) in std::mem::take(&mut self.txn.offsets[i].queue) {
            let resp = req.refused(ErrorCode::NOT_COORDINATOR);
            self.txn_reply(i, client, request, resp);
        }
    }

    /// The epoch node `i` coordinates the offsets partition at (its machine caught up), or
    /// the code refusing requests.
    fn offsets_ready(&mut self, i: usize) -> Result<LeaderEpoch, ErrorCode> {
        let now = self.local(i);
        let p = self.offsets_partition_txn();
        // A leader with a valid lease whose high watermark reached its epoch's start.
        let epoch = match self.nodes[i].core.as_ref().map(|core| core.coordinating(now, p)) {
            Some(Ok(epoch)) => epoch,
            None | Some(Err(ProduceError::NotLeader)) => {
                self.txn.offsets[i].leading = None;
                return Err(ErrorCode::NOT_COORDINATOR);
            }
            Some(Err(_)) => return Err(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS),
        };
        if let Err(reason) = self.offsets_catch_up(i) {
            self.txn_fail_stop(i, reason);
            return Err(ErrorCode::NOT_COORDINATOR);
        }
        let c = &mut self.txn.offsets[i];
        if c.leading != Some(epoch) {
            c.leading = Some(epoch);
            c.machine.as_mut().expect("caught up").start_sessions(now);
            tracing::debug!(node = i + 1, epoch = epoch.0, "sim: coordinating the pipelines' groups");
        }
        Ok(epoch)
    }

    /// Applies the offsets partition's records below node `i`'s high watermark.
    fn offsets_catch_up(&mut self, i: usize) -> Result<(), String> {
        let p = self.offsets_partition_txn();
        let Some(core) = self.nodes[i].core.as_ref() else { return Ok(()) };
        let c = &mut self.txn.offsets[i];
        let Some(replica) = core.replica(p) else {
            c.machine = None;
            return Ok(());
        };
        let log = replica.log();
        if c.machine.as_ref().is_some_and(|m| m.applied() < log.log_start_offset()) {
            c.machine = None;
            c.leading = None;
        }
        let machine = c.machine.get_or_insert_with(|| GroupCoordinator::new(HEARTBEAT_INTERVAL_MS));
        crate::core::machine::catch_up(replica, machine).map_err(|e| format!("reading the offsets partition: {e}"))?;
        Ok(())
    }

    /// The end of the run: each pipeline group's committed offset, from a coordinator rebuilt
    /// from the offsets partition's leader (as a failover would); nothing may be pending.
    pub(super) fn pipeline_final_read(&mut self) {
        let p = self.offsets_partition_txn();
        let Some(leader) = self.leader_of(p) else {
            return self.violation(format!("liveness: the offsets partition {p} has no leader at the end"));
        };
        let machine = match self.offsets_load(self.idx(leader)) {
            Ok(m) => m,
            Err(e) => {
                return self.violation(format!("liveness: the offsets partition {p} on {leader} at the end: {e}"))
            }
        };
        let input = self.pipeline_input();
        for k in 0..PIPELINES {
            let group = group(k);
            let tp = [TopicPartition { topic: TOPIC.into(), partition: input.0 }];
            let offset = match machine.fetch_offsets_stable(&group, Some(&tp)) {
                Ok(found) => found.first().and_then(|f| u64::try_from(f.offset).ok()),
                Err((_, message)) => {
                    self.violation(format!("liveness: group {group}'s offset is undecided at the end: {message}"));
                    continue;
                }
            };
            self.txn.history.push(TxnOp::OffsetRead {
                process: ProcessId(FINAL_PROCESS),
                group,
                partition: CheckPartition(input.0),
                offset: offset.map(CheckOffset),
                invoke_us: self.now,
                complete_us: self.now,
                final_read: true,
            });
        }
    }

    /// A coordinator rebuilt from the offsets partition's committed records on node `i`,
    /// which must have no transaction open.
    fn offsets_load(&self, i: usize) -> Result<GroupCoordinator, String> {
        let p = self.offsets_partition_txn();
        let now = self.local(i);
        let core = self.nodes[i].core.as_ref().ok_or("the leader is down")?;
        let replica = core.replica(p).ok_or("no replica")?;
        if replica.last_stable() < replica.high_watermark() {
            let (lso, hw, open) = (replica.last_stable(), replica.high_watermark(), replica.txns().open());
            return Err(format!("last stable offset {lso} below the high watermark {hw} (open: {open:?})"));
        }
        let mut machine = GroupCoordinator::new(HEARTBEAT_INTERVAL_MS);
        let mut from = replica.log().log_start_offset();
        loop {
            let bytes = match core.read_committed(now, p, from, 1 << 20) {
                Ok((bytes, hw)) if from < hw => bytes,
                Ok(_) => return Ok(machine),
                Err(e) => return Err(format!("read failed: {e:?}")),
            };
            match feed(&mut machine, &bytes, from) {
                Ok(fed) if fed.next > from => from = fed.next,
                Ok(_) => return Ok(machine),
                Err(e) => return Err(format!("does not decode: {e}")),
            }
        }
    }
}
