//! Unit tests of the replica and broker-node state machines, driven by hand.
//!
//! A [`Harness`] holds three replicas of one partition on in-memory logs and an outbox of
//! commands per replica. Nothing is delivered unless the test says so: it hands a follower's
//! queued fetch to the leader, the answer back to the follower, runs sync jobs, and moves the
//! clock, so each test controls the interleaving and asserts on the commands produced.
//!
//! Not covered here: the controller (its own tests are in `controller.rs`) and faults of the
//! storage or network (the simulator's job).

use std::collections::BTreeMap;

use skein_log::batch::{batches, BatchBuilder, RecordBatch};
use skein_log::storage::MemStorage;
use skein_log::types::{ProducerEpoch, ProducerId, Sequence, Timestamp};
use skein_log::{Durability, Log, LogConfig, ReadLimit};

use super::node::{BrokerNode, NodeConfig};
use super::replica::{Job, Plant, Replica, ReplicaConfig};
use super::{
    Acks, Command, FetchRequest, FetchResponse, IsrVersion, LeaderEpoch, Message, NodeId, Offset, PartitionId,
    PartitionState, Peer, ProduceError, ReadFailure, RequestId, Seal, Time,
};

// ---------------------------------------------------------------------------------------------
// Acknowledgement levels.

#[test]
fn acks_all_completes_only_when_every_isr_member_has_the_record_on_disk() {
    let mut h = Harness::started_separate();
    h.produce(N1, 1, 10, Acks::All);
    assert_eq!(h.replies(N1), vec![]);
    h.sync(N1);
    assert_eq!(h.r(N1).log().durable_offset(), Offset(1));
    assert_eq!(h.replies(N1), vec![], "the leader's own sync is not enough");
    assert_eq!(h.r(N1).high_watermark(), Offset(0));

    // Each follower fetches the record and syncs it. The fetch it sends right after the
    // append leaves before the sync finishes, so it still reports nothing durable.
    h.advance_ms(BACKOFF_MS);
    for f in [N2, N3] {
        let req = h.round(N1, f);
        assert_eq!((req.fetch_offset, req.durable_offset), (Offset(0), Offset(0)));
        assert_eq!(h.r(f).log().log_end_offset(), Offset(1));
        h.sync(f);
        assert_eq!(h.r(f).log().durable_offset(), Offset(1));
        let req = h.round(N1, f);
        assert_eq!((req.fetch_offset, req.durable_offset), (Offset(1), Offset(0)));
    }
    assert_eq!(h.r(N1).high_watermark(), Offset(0));
    assert_eq!(h.replies(N1), vec![], "the followers have the record, but not known to be on disk");

    // After the fetch backoff each follower fetches again and reports the record durable.
    // The high watermark is the minimum over the ISR: one follower is not enough.
    h.advance_ms(BACKOFF_MS);
    let req = h.round(N1, N2);
    assert_eq!(req.durable_offset, Offset(1));
    assert_eq!(h.r(N1).high_watermark(), Offset(0), "n3 has not reported the record durable");
    assert_eq!(h.replies(N1), vec![]);
    let req = h.round(N1, N3);
    assert_eq!(req.durable_offset, Offset(1));
    assert_eq!(h.r(N1).high_watermark(), Offset(1));
    assert_eq!(h.replies(N1), vec![(RequestId(1), Ok(Offset(0)))]);
}

/// The number of batches each queued storage job writes (a plain sync writes none).
fn job_writes(jobs: &[Job<MemStorage>]) -> Vec<usize> {
    jobs.iter()
        .map(|j| match j {
            Job::Write(w) => w.writes().len(),
            Job::Sync(s) => s.writes().len(),
        })
        .collect()
}

/// With `flush.ms=always` a commit group goes to disk in one job (its batches written, then
/// synced); batches appended meanwhile wait for the next job, unless an `acks=leader`
/// produce waits for a write: then a write job goes out alone.
#[test]
fn a_commit_group_goes_to_disk_in_one_job_and_an_acks_leader_produce_still_gets_its_own_write() {
    let config = ReplicaConfig { fetch_wait_max_ms: 0, min_insync_replicas: 1, ..ReplicaConfig::default() };
    let mut h = Harness::with(config);
    h.set_state(N1, state(1, Some(N1), &[N1], 1));
    h.produce(N1, 1, 10, Acks::All);
    let mut out = h.take(N1);
    let jobs = syncs(&mut out);
    assert!(matches!(jobs[..], [Job::Sync(_)]), "one write-and-sync job: {jobs:?}");
    assert_eq!(job_writes(&jobs), vec![1]);
    assert_eq!(h.r(N1).log().written_offset(), Offset(0), "not written before the job runs");
    h.produce(N1, 2, 11, Acks::All);
    h.produce(N1, 3, 12, Acks::All);
    assert_eq!(job_writes(&syncs(&mut h.take(N1))), Vec::<usize>::new(), "they wait for the job out");
    let job = jobs.into_iter().next().expect("one job");
    let result = job.run();
    h.step(N1, |now, r, out| r.handle_io_done(now, job, result, out));
    assert_eq!(h.r(N1).log().durable_offset(), Offset(1));
    assert_eq!(h.replies(N1), vec![(RequestId(1), Ok(Offset(0)))]);
    let mut out = h.take(N1);
    let jobs = syncs(&mut out);
    assert_eq!(job_writes(&jobs), vec![2], "the next job carries both batches that waited");
    // An acks=leader produce while that job is out: answered when the job lands if it went
    // with it, else by a write job of its own that goes out at once.
    h.produce(N1, 4, 13, Acks::Leader);
    assert_eq!(h.replies(N1), vec![], "one write at a time: the job out counts as one");
    let job = jobs.into_iter().next().expect("one job");
    let result = job.run();
    h.step(N1, |now, r, out| r.handle_io_done(now, job, result, out));
    // The harness runs write jobs at once: the acks=leader batch's went out and landed.
    assert_eq!(
        h.replies(N1),
        vec![(RequestId(2), Ok(Offset(1))), (RequestId(3), Ok(Offset(2))), (RequestId(4), Ok(Offset(3)))]
    );
    assert_eq!(h.r(N1).log().written_offset(), Offset(4));
    assert_eq!(job_writes(&syncs(&mut h.take(N1))), vec![0], "then a plain sync for it");
}

/// A follower writes and syncs what a fetch brought in one job; its next fetch goes out at
/// once, and what that brings while the job is out waits in memory for the next job. When the
/// job lands a new fetch reports it durable, replacing the one the leader holds.
#[test]
fn a_follower_writes_and_syncs_a_fetch_in_one_job_and_fetches_on_while_it_is_out() {
    let mut h = long_polling();
    h.produce(N1, 1, 10, Acks::All);
    h.sync(N1);
    let resp = held_answers(&mut h).remove(&N2).expect("n2's held fetch is answered");
    h.respond(N2, resp);
    let mut out = h.take(N2);
    let jobs = syncs(&mut out);
    assert_eq!(job_writes(&jobs), vec![1], "one write-and-sync job");
    let req = fetches(&mut out).pop().expect("the next fetch went out at once");
    assert_eq!((req.fetch_offset, req.durable_offset), (Offset(1), Offset(0)));
    // The leader appends more meanwhile: the held fetch brings it, and it waits for the job.
    assert_eq!(h.fetch_or_park(N1, &req), None, "held");
    h.produce(N1, 2, 11, Acks::All);
    let resp = held_answers(&mut h).remove(&N2).expect("answered by the append");
    h.respond(N2, resp);
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(2));
    let mut out = h.take(N2);
    assert!(syncs(&mut out).is_empty(), "one job at a time");
    let req = fetches(&mut out).pop().expect("and it fetches on");
    assert_eq!((req.fetch_offset, req.durable_offset), (Offset(2), Offset(0)));
    assert_eq!(h.fetch_or_park(N1, &req), None, "held");
    let job = jobs.into_iter().next().expect("one job");
    let result = job.run();
    h.step(N2, |now, r, out| r.handle_io_done(now, job, result, out));
    let mut out = h.take(N2);
    let req = fetches(&mut out).pop().expect("a fetch reporting the job's records durable");
    assert_eq!((req.fetch_offset, req.durable_offset), (Offset(2), Offset(1)));
    assert_eq!(job_writes(&syncs(&mut out)), vec![1], "the next job carries the record that waited");
}

/// With a long poll a follower fetches on while its job is out, but an answer asking for a
/// truncation waits for the job: no truncation and no fetch until it lands.
#[test]
fn a_diverging_answer_during_a_follower_s_job_waits_for_the_job() {
    let mut h = long_polling();
    h.produce(N1, 1, 10, Acks::All);
    let resp = held_answers(&mut h).remove(&N2).expect("n2's held fetch is answered");
    h.respond(N2, resp);
    let mut out = h.take(N2);
    let jobs = syncs(&mut out);
    assert_eq!(job_writes(&jobs), vec![1]);
    let req = fetches(&mut out).pop().expect("the next fetch went out at once");
    let diverging = diverging_at_start(req.correlation);
    h.respond(N2, diverging);
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(1), "no truncation with the job out");
    h.advance_ms(BACKOFF_MS);
    h.tick(N2);
    assert!(h.queued_fetch(N2).is_none(), "and no fetch until it lands");
    let job = jobs.into_iter().next().expect("one job");
    let result = job.run();
    h.step(N2, |now, r, out| r.handle_io_done(now, job, result, out));
    let req = h.take_fetch(N2).expect("the fetch goes once the job landed");
    assert_eq!(req.durable_offset, Offset(1));
}

/// `flush.ms` an interval: commits count written records (Kafka's model), and the logs sync
/// only when the interval is due.
#[test]
fn with_an_interval_flush_commits_count_written_records_and_syncs_wait_for_the_interval() {
    let config = ReplicaConfig { fetch_wait_max_ms: 0, ..ReplicaConfig::default() };
    let mut h =
        Harness::with_logs(config, LogConfig { durability: Durability::IntervalMs(100), ..LogConfig::default() });
    let s = state(1, Some(N1), &[N1, N2, N3], 1);
    for id in [N1, N2, N3] {
        h.set_state(id, s.clone());
    }
    h.round(N1, N2);
    h.round(N1, N3);
    // The first append finds the interval long past: it is synced.
    h.produce(N1, 1, 10, Acks::All);
    h.sync(N1);
    assert_eq!(h.r(N1).log().durable_offset(), Offset(1));
    h.produce(N1, 2, 11, Acks::All);
    assert_eq!(h.r(N1).log().written_offset(), Offset(2), "written at once (the harness runs writes)");
    let mut out = h.take(N1);
    assert!(syncs(&mut out).is_empty(), "no second sync within the interval");
    h.advance_ms(BACKOFF_MS);
    for f in [N2, N3] {
        h.round(N1, f);
        assert_eq!(h.r(f).log().written_offset(), Offset(2));
        let req = h.round(N1, f);
        assert_eq!(req.durable_offset, Offset(2), "a follower reports what it has written");
    }
    assert_eq!(h.r(N1).high_watermark(), Offset(2), "committed in every ISR member's page cache");
    assert_eq!(h.replies(N1), vec![(RequestId(1), Ok(Offset(0))), (RequestId(2), Ok(Offset(1)))]);
    assert_eq!(h.r(N1).log().durable_offset(), Offset(1), "the second record is not synced yet");
    h.advance_ms(100);
    h.tick(N1);
    h.sync(N1);
    assert_eq!(h.r(N1).log().durable_offset(), Offset(2), "the interval came due with a tick");
}

#[test]
fn acks_leader_replies_right_after_the_append() {
    let mut h = Harness::started();
    h.produce(N1, 1, 10, Acks::Leader);
    let mut out = h.take(N1);
    assert_eq!(replies(&mut out), vec![(RequestId(1), Ok(Offset(0)))]);
    assert_eq!(syncs(&mut out).len(), 1, "the append is synced in the background");
    assert_eq!(h.r(N1).log().durable_offset(), Offset(0), "answered before any sync");
    assert_eq!(h.r(N1).high_watermark(), Offset(0), "an acks=leader record is not committed yet");
    h.produce(N1, 2, 11, Acks::Leader);
    assert_eq!(h.replies(N1), vec![(RequestId(2), Ok(Offset(1)))]);
    assert_eq!(records(h.r(N1).log()), vec![(0, 1, 10), (1, 1, 11)], "stamped with the leader's epoch");
}

#[test]
fn acks_leader_waits_for_the_write_and_a_follower_neither_fetches_nor_truncates_while_one_is_out() {
    let mut h = Harness::started_separate();
    h.hold_writes = true;
    h.produce(N1, 1, 10, Acks::Leader);
    h.produce(N1, 2, 11, Acks::Leader);
    assert_eq!(h.replies(N1), vec![], "nothing written yet");
    assert_eq!(h.r(N1).log().written_offset(), Offset(0));
    assert_eq!(records(h.r(N1).log()).len(), 2, "appended batches are readable before they are written");
    h.write(N1);
    assert_eq!(h.replies(N1), vec![(RequestId(1), Ok(Offset(0)))], "one write job was out, with the first batch");
    h.write(N1);
    assert_eq!(h.replies(N1), vec![(RequestId(2), Ok(Offset(1)))]);
    // A follower with a write out sends no fetch, and drops a diverging answer until it lands.
    h.advance_ms(BACKOFF_MS);
    let req = h.round(N1, N2);
    assert_eq!(req.fetch_offset, Offset(0));
    assert!(h.r(N2).log().writing(), "the fetched batches are being written");
    h.advance_ms(BACKOFF_MS);
    h.tick(N2);
    assert!(h.queued_fetch(N2).is_none(), "no fetch while a write is out");
    let diverging = diverging_at_start(req.correlation);
    h.respond(N2, diverging);
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(2), "no truncation with a write out");
    h.write(N2);
    assert!(h.queued_fetch(N2).is_some(), "the fetch goes once the write landed");
}

#[test]
fn acks_all_is_rejected_when_the_isr_is_smaller_than_min_insync() {
    let mut h = Harness::new();
    h.set_state(N1, state(1, Some(N1), &[N1], 1));
    h.take(N1);
    h.produce(N1, 1, 10, Acks::All);
    let mut out = h.take(N1);
    assert_eq!(replies(&mut out), vec![(RequestId(1), Err(ProduceError::NotEnoughReplicas))]);
    assert!(out.is_empty(), "nothing appended, nothing to sync: {out:?}");
    assert_eq!(h.r(N1).log().log_end_offset(), Offset(0));
    assert!(ProduceError::NotEnoughReplicas.definitely_not_written());

    // min_insync_replicas only guards acks=all.
    h.produce(N1, 2, 11, Acks::Leader);
    assert_eq!(h.replies(N1), vec![(RequestId(2), Ok(Offset(0)))]);
}

#[test]
fn acks_all_waiting_past_its_deadline_is_abandoned() {
    let mut h = Harness::started();
    let deadline = h.now.plus_ms(500);
    h.produce_until(N1, 1, 10, Acks::All, deadline);
    h.sync(N1);
    h.advance_ms(499);
    h.tick(N1);
    assert_eq!(h.replies(N1), vec![], "the deadline has not passed");
    h.advance_ms(1);
    h.tick(N1);
    assert_eq!(h.replies(N1), vec![(RequestId(1), Err(ProduceError::Abandoned))]);
    assert!(!ProduceError::Abandoned.definitely_not_written());

    // The record was written, so it may still commit; the request is not answered twice.
    h.catch_up(N1, N2);
    h.catch_up(N1, N3);
    assert_eq!(h.r(N1).high_watermark(), Offset(1));
    assert_eq!(h.replies(N1), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Fencing and stale messages.

#[test]
fn stale_partition_states_are_ignored() {
    let mut h = Harness::new();
    let current = state(2, Some(N1), &[N1, N2, N3], 3);
    for id in [N1, N2] {
        h.set_state(id, current.clone());
        h.take(id);
    }
    let stale = [
        state(1, Some(N2), &[N2], 9),     // an older epoch, whatever its ISR version
        state(2, Some(N2), &[N1, N2], 2), // same epoch, older ISR version
        state(2, Some(N1), &[N1], 2),     // same epoch, older ISR version (a shrink)
        state(2, Some(N1), &[N1], 3),     // same epoch, same ISR version
    ];
    for s in stale {
        for id in [N1, N2] {
            h.set_state(id, s.clone());
            assert_eq!(h.r(id).state(), Some(&current), "{id} ignores {s:?}");
            let out = h.take(id);
            assert!(out.is_empty(), "{id} did something for a stale state: {out:?}");
        }
    }
    assert_eq!(h.r(N1).leader_epoch(), Some(LeaderEpoch(2)));
    assert_eq!(h.r(N2).leader_epoch(), None);
    // The leader still counts three ISR members (acks=all waits instead of failing); the
    // follower still refuses produces.
    h.produce(N1, 1, 10, Acks::All);
    assert_eq!(h.replies(N1), vec![]);
    h.produce(N2, 2, 20, Acks::Leader);
    assert_eq!(h.replies(N2), vec![(RequestId(2), Err(ProduceError::NotLeader))]);

    // A newer ISR version of the same epoch is taken.
    let newer = state(2, Some(N1), &[N1, N2], 4);
    h.set_state(N1, newer.clone());
    assert_eq!(h.r(N1).state(), Some(&newer));
    assert_eq!(h.r(N1).isr_version(), IsrVersion(4));
}

#[test]
fn a_leader_fetched_at_a_newer_epoch_steps_down_and_answers_fenced() {
    let mut h = Harness::started_separate();
    h.produce(N1, 1, 10, Acks::All);
    assert_eq!(h.replies(N1), vec![]);

    // A fetch from an older epoch is refused; the leader stays.
    let old = FetchRequest {
        partition: P,
        replica: N2,
        epoch: LeaderEpoch(0),
        fetch_offset: Offset(0),
        last_fetched_epoch: None,
        durable_offset: Offset(0),
        high_watermark: Offset(0),
        correlation: 77,
    };
    assert_eq!(h.fetch(N1, &old), FetchResponse::Fenced { partition: P, correlation: 77, epoch: LeaderEpoch(1) });
    assert_eq!(h.r(N1).leader_epoch(), Some(LeaderEpoch(1)));
    assert_eq!(h.replies(N1), vec![]);

    // n2 hears of epoch 2 (n1 elected again) before n1 does, and fetches at epoch 2.
    let epoch2 = state(2, Some(N1), &[N1, N2, N3], 2);
    h.set_state(N2, epoch2.clone());
    let req = h.take_fetch(N2).expect("a new follower fetches at once");
    assert_eq!(req.epoch, LeaderEpoch(2));
    let resp = h.fetch(N1, &req);
    assert_eq!(resp, FetchResponse::Fenced { partition: P, correlation: req.correlation, epoch: LeaderEpoch(1) });
    assert_eq!(h.r(N1).leader_epoch(), None, "stepped down");
    assert_eq!(h.replies(N1), vec![(RequestId(1), Err(ProduceError::Abandoned))], "the waiting produce");
    h.produce(N1, 2, 11, Acks::Leader);
    assert_eq!(h.replies(N1), vec![(RequestId(2), Err(ProduceError::NotLeader))]);
    assert_eq!(h.r(N1).log().log_end_offset(), Offset(1), "nothing appended after stepping down");

    // The follower ignores the fence of an older epoch and waits; n1 leads again once told.
    h.respond(N2, resp);
    assert_eq!(h.take_fetch(N2), None, "backing off");
    h.set_state(N1, epoch2);
    assert_eq!(h.r(N1).leader_epoch(), Some(LeaderEpoch(2)));
    h.produce(N1, 3, 12, Acks::Leader);
    assert_eq!(h.replies(N1), vec![(RequestId(3), Ok(Offset(1)))]);
}

#[test]
fn a_duplicated_or_late_fetch_response_is_ignored() {
    let mut h = Harness::started_separate();
    h.produce(N1, 1, 10, Acks::Leader);
    h.advance_ms(BACKOFF_MS);
    h.tick(N2);
    let first = h.take_fetch(N2).expect("due after the backoff");
    let answer = h.fetch(N1, &first);
    h.respond(N2, answer.clone());
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(1));
    let second = h.queued_fetch(N2).expect("a follower that got records fetches again at once");
    assert!(second.correlation > first.correlation);
    let before = h.take(N2);

    // The same answer again (a duplicated message) changes nothing.
    h.respond(N2, answer);
    assert!(h.take(N2).is_empty(), "no append, sync or fetch for a duplicate");
    assert_eq!(records(h.r(N2).log()), vec![(0, 1, 10)]);

    // A late answer to the first fetch saying the log diverges must not truncate.
    let late = FetchResponse::Diverging {
        partition: P,
        correlation: first.correlation,
        epoch: LeaderEpoch(1),
        end_epoch: LeaderEpoch(0),
        end_offset: Offset(0),
    };
    h.respond(N2, late);
    assert!(h.take(N2).is_empty());
    assert_eq!(records(h.r(N2).log()), vec![(0, 1, 10)], "not truncated");

    // The answer to a fetch the follower gave up on (timed out and sent again) is dropped too,
    // even though it carries records.
    h.outboxes.insert(N2, before);
    h.produce(N1, 2, 11, Acks::Leader);
    let second = h.take_fetch(N2).expect("queued above");
    let given_up = h.fetch(N1, &second);
    assert!(matches!(&given_up, FetchResponse::Records { batches, .. } if !batches.is_empty()));
    h.advance_ms(ReplicaConfig::default().fetch_timeout_ms);
    h.tick(N2);
    let third = h.take_fetch(N2).expect("the timed-out fetch is sent again");
    assert!(third.correlation > second.correlation);
    h.respond(N2, given_up);
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(1), "the late records are not appended");
    let answer = h.fetch(N1, &third);
    h.respond(N2, answer);
    assert_eq!(records(h.r(N2).log()), vec![(0, 1, 10), (1, 1, 11)]);
}

// ---------------------------------------------------------------------------------------------
// Divergence (KIP-320): truncate to min(leader's end of the epoch, own end of the epoch).

#[test]
fn a_diverging_follower_truncates_to_where_the_leader_ends_its_epoch() {
    let mut h = Harness::started_separate();
    // Epoch 1 (n1): records 0 and 1 reach both followers, records 2 and 3 only n2.
    h.produce(N1, 1, 10, Acks::Leader);
    h.produce(N1, 2, 11, Acks::Leader);
    h.advance_ms(BACKOFF_MS);
    h.round(N1, N2);
    h.round(N1, N3);
    h.produce(N1, 3, 12, Acks::Leader);
    h.produce(N1, 4, 13, Acks::Leader);
    h.round(N1, N2);
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(4));
    assert_eq!(h.r(N3).log().log_end_offset(), Offset(2));

    // Epoch 2: n3 leads and writes records 2 and 3 of its own.
    let epoch2 = state(2, Some(N3), &[N2, N3], 2);
    h.set_state(N3, epoch2.clone());
    h.produce(N3, 5, 20, Acks::Leader);
    h.produce(N3, 6, 21, Acks::Leader);
    h.set_state(N2, epoch2);
    let req = h.take_fetch(N2).expect("a new follower fetches at once");
    assert_eq!((req.fetch_offset, req.last_fetched_epoch), (Offset(4), Some(LeaderEpoch(1))));
    let resp = h.fetch(N3, &req);
    let expect = FetchResponse::Diverging {
        partition: P,
        correlation: req.correlation,
        epoch: LeaderEpoch(2),
        end_epoch: LeaderEpoch(1),
        end_offset: Offset(2),
    };
    assert_eq!(resp, expect);

    // n2 ends epoch 1 at 4, n3 at 2: n2 truncates to 2 and fetches from there.
    h.respond(N2, resp);
    assert_eq!(records(h.r(N2).log()), vec![(0, 1, 10), (1, 1, 11)]);
    let req = h.round(N3, N2);
    assert_eq!((req.fetch_offset, req.last_fetched_epoch), (Offset(2), Some(LeaderEpoch(1))));
    let expect = vec![(0, 1, 10), (1, 1, 11), (2, 2, 20), (3, 2, 21)];
    assert_eq!(records(h.r(N3).log()), expect);
    assert_eq!(records(h.r(N2).log()), expect, "the follower's log equals the leader's");
}

#[test]
fn a_diverging_follower_truncates_to_where_it_ends_the_epoch_when_that_is_earlier() {
    let mut h = Harness::started_separate();
    // Epoch 1 (n1): records 0 and 1 reach both followers, record 2 only n3.
    h.produce(N1, 1, 10, Acks::Leader);
    h.produce(N1, 2, 11, Acks::Leader);
    h.advance_ms(BACKOFF_MS);
    h.round(N1, N2);
    h.round(N1, N3);
    h.produce(N1, 3, 12, Acks::Leader);
    h.round(N1, N3);
    // Epoch 2: n3 leads and writes 3 and 4; n2 never hears of epoch 2.
    h.set_state(N3, state(2, Some(N3), &[N2, N3], 2));
    h.produce(N3, 4, 20, Acks::Leader);
    h.produce(N3, 5, 21, Acks::Leader);
    // Epoch 3: n2 leads and writes 2 and 3 of its own; n3 never hears of epoch 3.
    h.set_state(N2, state(3, Some(N2), &[N2, N3], 3));
    h.produce(N2, 6, 30, Acks::Leader);
    h.produce(N2, 7, 31, Acks::Leader);
    // Epoch 4: n3 leads again and writes 5. (Replicas do not check how the controller chose
    // these leaders; this history makes the leader's answer name an epoch the follower
    // never had.)
    let epoch4 = state(4, Some(N3), &[N3], 4);
    h.set_state(N3, epoch4.clone());
    h.produce(N3, 8, 40, Acks::Leader);
    assert_eq!(records(h.r(N2).log()), vec![(0, 1, 10), (1, 1, 11), (2, 3, 30), (3, 3, 31)]);
    let leader = vec![(0, 1, 10), (1, 1, 11), (2, 1, 12), (3, 2, 20), (4, 2, 21), (5, 4, 40)];
    assert_eq!(records(h.r(N3).log()), leader);

    // n2 follows at epoch 4 from its epoch-3 tail. n3 knows no epoch 3: its largest epoch
    // below is 2, which ends at 5 on n3. n2 has no epoch 2; its epoch 1 ends at 2.
    h.set_state(N2, epoch4);
    let req = h.take_fetch(N2).expect("a new follower fetches at once");
    assert_eq!((req.fetch_offset, req.last_fetched_epoch), (Offset(4), Some(LeaderEpoch(3))));
    let resp = h.fetch(N3, &req);
    let expect = FetchResponse::Diverging {
        partition: P,
        correlation: req.correlation,
        epoch: LeaderEpoch(4),
        end_epoch: LeaderEpoch(2),
        end_offset: Offset(5),
    };
    assert_eq!(resp, expect);
    h.respond(N2, resp);
    assert_eq!(h.r(N2).log().log_end_offset(), Offset(2), "min(5 on the leader, 2 on the follower)");
    assert_eq!(records(h.r(N2).log()), vec![(0, 1, 10), (1, 1, 11)]);

    let req = h.round(N3, N2);
    assert_eq!((req.fetch_offset, req.last_fetched_epoch), (Offset(2), Some(LeaderEpoch(1))));
    assert_eq!(records(h.r(N2).log()), leader, "the follower's log equals the leader's");
}

// ---------------------------------------------------------------------------------------------
// ISR changes.

#[test]
fn a_follower_that_stops_fetching_is_proposed_out_of_the_isr() {
    let mut h = Harness::started();
    let start = h.now;
    h.produce(N1, 1, 10, Acks::All);
    h.sync(N1);
    h.catch_up(N1, N2);
    assert_eq!(h.replies(N1), vec![], "n3 has not fetched the record");

    // n2 keeps fetching; n3 is silent since `start`.
    h.now = start.plus_ms(LAG_MAX_MS);
    h.round(N1, N2);
    h.tick(N1);
    assert_eq!(h.sends(N1), vec![], "lagging exactly replica_lag_max_ms is still in sync");
    h.advance_ms(1);
    h.tick(N1);
    let shrink = Message::AlterIsr {
        leader: N1,
        epoch: LeaderEpoch(1),
        isr_version: IsrVersion(1),
        partition: P,
        isr: vec![N1, N2],
    };
    assert_eq!(h.sends(N1), vec![(Peer::Controller, shrink)]);
    // The shrink takes effect only once the controller accepted it (KIP-497's maximal ISR).
    assert_eq!(h.r(N1).high_watermark(), Offset(0));
    assert_eq!(h.replies(N1), vec![]);
    h.tick(N1);
    assert_eq!(h.sends(N1), vec![], "one proposal at a time");

    h.set_state(N1, state(1, Some(N1), &[N1, N2], 2));
    assert_eq!(h.r(N1).high_watermark(), Offset(1));
    assert_eq!(h.replies(N1), vec![(RequestId(1), Ok(Offset(0)))]);
}

#[test]
fn a_follower_that_catches_up_is_proposed_into_the_isr() {
    let mut h = Harness::separate_jobs();
    let s = state(1, Some(N1), &[N1, N2], 1);
    h.set_state(N1, s.clone());
    h.set_state(N2, s.clone());
    h.round(N1, N2);
    h.produce(N1, 1, 10, Acks::All);
    h.produce(N1, 2, 11, Acks::All);
    h.sync(N1);
    h.catch_up(N1, N2);
    assert_eq!(h.r(N1).high_watermark(), Offset(2));
    assert_eq!(h.replies(N1).len(), 2);

    // n3, outside the ISR, starts fetching from 0: behind the high watermark.
    h.set_state(N3, s);
    h.round(N1, N3);
    assert_eq!(h.sends(N1), vec![]);
    assert_eq!(h.r(N3).log().log_end_offset(), Offset(2));
    // Its next fetch shows its log end at the high watermark, but not yet on its disk: no
    // proposal (a member must hold the committed records durably).
    let req = h.round(N1, N3);
    assert_eq!(req.durable_offset, Offset(0));
    assert_eq!(h.sends(N1), vec![]);
    // Once synced, its next fetch makes the leader propose adding it.
    h.sync(N3);
    let req = h.round(N1, N3);
    assert_eq!(req.fetch_offset, Offset(2));
    let expand = Message::AlterIsr {
        leader: N1,
        epoch: LeaderEpoch(1),
        isr_version: IsrVersion(1),
        partition: P,
        isr: vec![N1, N2, N3],
    };
    assert_eq!(h.sends(N1), vec![(Peer::Controller, expand)]);

    // While the addition is pending, acks=all also waits for n3.
    h.produce(N1, 3, 12, Acks::All);
    h.sync(N1);
    h.catch_up(N1, N2);
    assert_eq!(h.replies(N1), vec![], "n3 is a proposed ISR member");
    h.sync(N3);
    h.catch_up(N1, N3);
    assert_eq!(h.replies(N1), vec![(RequestId(3), Ok(Offset(2)))]);
}

// ---------------------------------------------------------------------------------------------
// A new leader's reads.

#[test]
fn a_new_leader_serves_reads_only_once_its_high_watermark_reaches_its_epoch_start() {
    let mut h = Harness::started();
    h.produce(N1, 1, 10, Acks::Leader);
    h.produce(N1, 2, 11, Acks::Leader);
    h.sync(N1);
    h.advance_ms(BACKOFF_MS);
    for f in [N2, N3] {
        h.round(N1, f);
        h.sync(f);
    }
    assert_eq!(h.r(N2).high_watermark(), Offset(0), "n1 never told its followers the records committed");

    // Epoch 2: n2 leads from log end 2 and writes a record of its own.
    let epoch2 = state(2, Some(N2), &[N2, N3], 2);
    h.set_state(N2, epoch2.clone());
    assert_eq!(h.r(N2).read_committed(Offset(0), 1 << 20), Err(ProduceError::LeaderNotReady.into()));
    h.produce(N2, 3, 20, Acks::Leader);
    h.sync(N2);
    assert_eq!(h.r(N2).read_committed(Offset(0), 1 << 20), Err(ProduceError::LeaderNotReady.into()));

    // n3 follows and reports offsets 0 and 1 durable: the high watermark reaches 2, where
    // epoch 2 started, though not the log end.
    h.set_state(N3, epoch2);
    let req = h.round(N2, N3);
    assert_eq!((req.fetch_offset, req.durable_offset), (Offset(2), Offset(2)));
    assert_eq!(h.r(N2).high_watermark(), Offset(2));
    let (bytes, hw) = h.r(N2).read_committed(Offset(0), 1 << 20).expect("ready");
    assert_eq!(hw, Offset(2));
    assert_eq!(decode(&bytes), vec![(0, 1, 10), (1, 1, 11)]);
    assert_eq!(h.r(N3).read_committed(Offset(0), 1 << 20), Err(ProduceError::NotLeader.into()));
}

// ---------------------------------------------------------------------------------------------
// Long polls: a leader holds a caught-up follower's fetch (fetch_wait_max_ms).

/// Epoch 1 led by n1 with long polls on; each follower's first fetch is held.
fn long_polling() -> Harness {
    let mut h = Harness::with(ReplicaConfig::default());
    assert!(ReplicaConfig::default().fetch_wait_max_ms > 0, "long polls are the default");
    let s = state(1, Some(N1), &[N1, N2, N3], 1);
    for id in [N1, N2, N3] {
        h.set_state(id, s.clone());
    }
    for f in [N2, N3] {
        let req = h.take_fetch(f).expect("a new follower fetches at once");
        assert_eq!(h.fetch_or_park(N1, &req), None, "{f} has everything: its fetch is held");
    }
    h
}

/// Takes the leader's queued answers to held fetches, by follower.
fn held_answers(h: &mut Harness) -> BTreeMap<NodeId, FetchResponse> {
    let mut answers = BTreeMap::new();
    for (to, msg) in h.sends(N1) {
        if let (Peer::Node(f), Message::FetchResponse(resp)) = (to, msg) {
            assert!(answers.insert(f, resp).is_none(), "one answer per held fetch");
        }
    }
    answers
}

#[test]
fn a_held_fetch_is_answered_by_the_next_append_and_acks_all_waits_for_no_interval() {
    let mut h = long_polling();
    // No time passes anywhere in this test: nothing waits for a back-off or a tick.
    h.produce(N1, 1, 10, Acks::All);
    h.sync(N1);
    let answers = held_answers(&mut h);
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), vec![N2, N3], "the append answers both held fetches");
    for (f, resp) in answers {
        let FetchResponse::Records { batches, .. } = &resp else { panic!("records for {f}: {resp:?}") };
        assert_eq!(decode(batches), vec![(0, 1, 10)]);
        h.respond(f, resp);
        // The next fetch goes out at once, while the record is being written and synced,
        // and is held: the leader has nothing newer.
        let early = h.take_fetch(f).expect("{f} fetches again at once");
        assert_eq!((early.fetch_offset, early.durable_offset), (Offset(1), Offset(0)));
        assert_eq!(h.fetch_or_park(N1, &early), None, "held: nothing new for {f}");
        h.sync(f);
        let req = h.take_fetch(f).expect("the sync sends a fetch at once, replacing the held one");
        assert_eq!((req.fetch_offset, req.durable_offset), (Offset(1), Offset(1)));
        // It tells the leader something new: answered at once only if the high watermark
        // moved (the last follower's report moves it), else held.
        let resp = h.fetch_or_park(N1, &req);
        if f == N2 {
            assert_eq!(resp, None, "n3 has not reported yet: nothing new for n2");
        } else {
            assert!(matches!(resp, Some(FetchResponse::Records { high_watermark: Offset(1), .. })), "{resp:?}");
        }
    }
    assert_eq!(h.r(N1).high_watermark(), Offset(1));
    assert_eq!(h.replies(N1), vec![(RequestId(1), Ok(Offset(0)))], "acknowledged with no time passing");
    // n2's held fetch is answered with the new high watermark, which its reads are bounded by.
    let answers = held_answers(&mut h);
    let resp = answers.get(&N2).cloned().expect("n2 learns the high watermark");
    assert!(matches!(&resp, FetchResponse::Records { batches, high_watermark: Offset(1), .. } if batches.is_empty()));
    h.respond(N2, resp);
    assert_eq!(h.r(N2).high_watermark(), Offset(1));
    let req = h.take_fetch(N2).expect("an empty answer with a new high watermark: the next fetch at once");
    assert_eq!(req.high_watermark, Offset(1), "and it names the high watermark it now knows");
    assert_eq!(h.fetch_or_park(N1, &req), None, "nothing new for n2: held");
}

#[test]
fn a_held_fetch_is_answered_empty_after_the_wait_and_a_newer_one_replaces_it() {
    let mut h = long_polling();
    let wait = ReplicaConfig::default().fetch_wait_max_ms;
    h.advance_ms(wait - 1);
    h.tick(N1);
    assert!(held_answers(&mut h).is_empty(), "held until fetch_wait_max_ms");
    h.advance_ms(1);
    h.tick(N1);
    let answers = held_answers(&mut h);
    assert_eq!(answers.len(), 2, "both answered at the wait: {answers:?}");
    let mut held = BTreeMap::new();
    for (f, resp) in answers {
        assert!(matches!(&resp, FetchResponse::Records { batches, .. } if batches.is_empty()), "{resp:?}");
        h.respond(f, resp);
        let req = h.take_fetch(f).expect("after an empty answer to a held fetch, the next goes at once");
        assert_eq!(h.fetch_or_park(N1, &req), None);
        held.insert(f, req);
    }
    // A newer fetch from n2 (a retransmission after its timeout) replaces its held one: the
    // next append answers the newer one only, and once.
    let newer = FetchRequest { correlation: held[&N2].correlation + 100, ..held[&N2].clone() };
    assert_eq!(h.fetch_or_park(N1, &newer), None);
    h.produce(N1, 1, 10, Acks::Leader);
    let answers = held_answers(&mut h);
    let correlation = |r: &FetchResponse| match r {
        FetchResponse::Records { correlation, .. } => *correlation,
        other => panic!("records: {other:?}"),
    };
    assert_eq!(correlation(&answers[&N2]), newer.correlation, "the newer fetch is answered");
    assert_eq!(correlation(&answers[&N3]), held[&N3].correlation);
    h.advance_ms(wait);
    h.tick(N1);
    assert!(held_answers(&mut h).is_empty(), "nothing is held any more: no second answer");
}

#[test]
fn an_empty_answer_that_was_not_held_makes_the_follower_back_off_not_spin() {
    // A leader that holds nothing (its wait is 0, or it no longer counts this replica as a
    // follower) answers a caught-up fetch at once, empty, with no news.
    let mut h = long_polling();
    h.advance_ms(ReplicaConfig::default().fetch_wait_max_ms);
    h.tick(N1);
    for (f, resp) in held_answers(&mut h) {
        h.respond(f, resp);
    }
    let req = h.take_fetch(N2).expect("after an answer that was held, at once");
    let quick = FetchResponse::Records {
        partition: P,
        correlation: req.correlation,
        epoch: LeaderEpoch(1),
        batches: Vec::new(),
        high_watermark: req.high_watermark,
    };
    h.respond(N2, quick);
    assert_eq!(h.take_fetch(N2), None, "an empty, immediate answer with no news: back off");
    h.advance_ms(BACKOFF_MS);
    h.tick(N2);
    assert!(h.take_fetch(N2).is_some(), "after the back-off");
}

// ---------------------------------------------------------------------------------------------
// The broker node: registration and lease.

#[test]
fn a_node_accepts_produces_only_while_its_lease_is_valid() {
    const INCARNATION: u64 = 7;
    let replica = Replica::new(N1, P, ReplicaConfig::default(), Plant::default(), open_log());
    let mut node = BrokerNode::new(N1, INCARNATION, vec![], NodeConfig::default(), vec![replica], false);
    let lease_ms = NodeConfig::default().lease_ms;
    let t0 = Time(1_000_000);
    let leader = state(1, Some(N1), &[N1, N2, N3], 1);
    let mut out = Out::new();
    fn produce(node: &mut BrokerNode<MemStorage>, now: Time, request: u64, value: u64) -> Vec<Reply> {
        let mut out = Out::new();
        let deadline = now.plus_ms(DEADLINE_MS);
        node.handle_produce(now, RequestId(request), P, None, batch(value), Acks::Leader, deadline, &mut out);
        // acks=leader is answered once the batch is written: run the write job.
        for job in writes(&mut out) {
            let result = job.run();
            node.handle_io_done(now, P, job, result, &mut out);
        }
        replies(&mut out)
    }

    node.handle_tick(t0, &mut out);
    let heartbeat = Message::Heartbeat { broker: N1, incarnation: INCARNATION, lost: vec![], sent: t0 };
    assert_eq!(sends(&mut out), vec![(Peer::Controller, heartbeat)]);

    // Before registration: partition states, and heartbeat answers to another incarnation,
    // are ignored.
    node.handle_message(t0, Peer::Controller, Message::PartitionState(leader.clone()), &mut out);
    assert_eq!(node.replica(P).expect("exists").state(), None);
    let other = Message::HeartbeatResponse {
        incarnation: INCARNATION - 1,
        sent: t0,
        alive: true,
        partitions: vec![leader.clone()],
    };
    node.handle_message(t0, Peer::Controller, other, &mut out);
    assert_eq!(node.replica(P).expect("exists").state(), None);
    node.handle_message(t0, Peer::Controller, Message::PartitionState(leader.clone()), &mut out);
    assert_eq!(node.replica(P).expect("exists").state(), None, "still not registered");
    assert!(!node.lease_valid(t0));
    assert!(out.is_empty(), "{out:?}");

    // Registered and leased by the answer to its own heartbeat; then partition states count.
    let mine = Message::HeartbeatResponse { incarnation: INCARNATION, sent: t0, alive: true, partitions: vec![] };
    node.handle_message(t0.plus_ms(1), Peer::Controller, mine, &mut out);
    assert!(node.lease_valid(t0.plus_ms(1)));
    assert_eq!(produce(&mut node, t0.plus_ms(1), 1, 10), vec![(RequestId(1), Err(ProduceError::NotLeader))]);
    node.handle_message(t0.plus_ms(1), Peer::Node(N2), Message::PartitionState(leader.clone()), &mut out);
    assert_eq!(node.replica(P).expect("exists").state(), None, "only the controller sends states");
    node.handle_message(t0.plus_ms(1), Peer::Controller, Message::PartitionState(leader.clone()), &mut out);
    assert_eq!(node.replica(P).expect("exists").leader_epoch(), Some(LeaderEpoch(1)));
    assert_eq!(produce(&mut node, t0.plus_ms(100), 2, 10), vec![(RequestId(2), Ok(Offset(0)))]);

    // The lease runs from the heartbeat's send time; with no later answer it expires.
    let expiry = t0.plus_ms(lease_ms);
    assert!(node.lease_valid(Time(expiry.0 - 1)));
    assert!(!node.lease_valid(expiry));
    assert_eq!(produce(&mut node, expiry, 3, 11), vec![(RequestId(3), Err(ProduceError::NotLeader))]);

    // An answer to another incarnation does not renew it; one to this incarnation does.
    let sent = t0.plus_ms(200);
    let now = expiry.plus_ms(10);
    let other = Message::HeartbeatResponse { incarnation: INCARNATION + 1, sent, alive: true, partitions: vec![] };
    node.handle_message(now, Peer::Controller, other, &mut out);
    assert_eq!(produce(&mut node, now, 4, 11), vec![(RequestId(4), Err(ProduceError::NotLeader))]);
    let mine = Message::HeartbeatResponse { incarnation: INCARNATION, sent, alive: true, partitions: vec![leader] };
    node.handle_message(now, Peer::Controller, mine, &mut out);
    assert_eq!(produce(&mut node, now, 5, 11), vec![(RequestId(5), Ok(Offset(1)))]);
    assert!(!node.lease_valid(sent.plus_ms(lease_ms)));
    assert_eq!(node.replica(P).expect("exists").log().log_end_offset(), Offset(2), "refused produces wrote nothing");
}

// ---------------------------------------------------------------------------------------------
// Behaviour believed wrong in the core today; see the ignore reasons.

#[test]
fn a_follower_joins_the_isr_only_with_the_committed_records_on_disk() {
    let mut h = Harness::separate_jobs();
    let s = state(1, Some(N1), &[N1, N2], 1);
    h.set_state(N1, s.clone());
    h.set_state(N2, s.clone());
    h.round(N1, N2);
    h.produce(N1, 1, 10, Acks::All);
    h.sync(N1);
    h.catch_up(N1, N2);
    assert_eq!(h.r(N1).high_watermark(), Offset(1));

    h.set_state(N3, s);
    h.round(N1, N3);
    // Its fetch right after the append has the record, not yet on disk. Adding n3 now would
    // make it an ISR member (electable leader) lacking a durable copy of a committed record:
    // the high watermark would exceed the smallest durable offset over the ISR.
    let req = h.round(N1, N3);
    assert_eq!((req.fetch_offset, req.durable_offset), (Offset(1), Offset(0)));
    assert_eq!(h.sends(N1), vec![], "not proposed while the committed records are not durable on n3");
    h.sync(N3);
    h.advance_ms(BACKOFF_MS);
    let req = h.round(N1, N3);
    assert_eq!(req.durable_offset, Offset(1));
    let expand = Message::AlterIsr {
        leader: N1,
        epoch: LeaderEpoch(1),
        isr_version: IsrVersion(1),
        partition: P,
        isr: vec![N1, N2, N3],
    };
    assert_eq!(h.sends(N1), vec![(Peer::Controller, expand)]);
}

#[test]
fn acks_all_is_not_acknowledged_after_the_isr_shrank_below_min_insync() {
    let mut h = Harness::started();
    h.produce(N1, 1, 10, Acks::All);
    h.sync(N1);
    // Both followers stop fetching; the leader proposes itself alone, and the controller agrees.
    h.advance_ms(LAG_MAX_MS + 1);
    h.tick(N1);
    assert_eq!(h.sends(N1).len(), 1, "the shrink proposal");
    h.set_state(N1, state(1, Some(N1), &[N1], 2));
    // The record is on one replica only, fewer than min_insync_replicas = 2 asked for: the
    // high watermark does not advance (KIP-966), so no acknowledgement...
    assert_eq!(h.r(N1).high_watermark(), Offset(0));
    assert_eq!(h.replies(N1), vec![]);
    // ...and at the deadline the outcome is reported unknown.
    h.advance_ms(DEADLINE_MS);
    h.tick(N1);
    let replies = h.replies(N1);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].1, Err(ProduceError::Abandoned), "{replies:?}");
}

// ---------------------------------------------------------------------------------------------
// Retention.

/// Retention runs on every replica, deleting whole segments below its high watermark only; a
/// follower whose fetch offset the leader deleted is told the leader's log start, empties its
/// log, starts it there and catches up.
#[test]
fn retention_deletes_only_committed_segments_and_a_follower_behind_it_starts_over() {
    let log = LogConfig {
        durability: Durability::Always,
        segment_bytes: 1024,
        retention_bytes: Some(2048),
        retention_ms: None,
        ..LogConfig::default()
    };
    let mut h = Harness::with_logs(ReplicaConfig { fetch_wait_max_ms: 0, ..ReplicaConfig::default() }, log);
    let s = state(1, Some(N1), &[N1, N2, N3], 1);
    for id in [N1, N2, N3] {
        h.set_state(id, s.clone());
    }
    h.round(N1, N2);
    h.round(N1, N3);
    for i in 0..60 {
        h.produce(N1, i, i, Acks::Leader);
    }
    h.replies(N1);
    h.sync(N1);
    assert!(h.r(N1).log().segment_count() > 3, "small segments: {}", h.r(N1).log().segment_count());
    // Nothing is committed (no follower has fetched): retention deletes nothing.
    h.advance_ms(200);
    h.retention(N1);
    assert_eq!(h.r(N1).log().log_start_offset(), Offset(0), "uncommitted segments are kept");

    // n3 stops fetching and leaves the ISR; n2 catches up, so everything is committed.
    h.advance_ms(LAG_MAX_MS + 1);
    h.tick(N1);
    h.take(N1);
    h.set_state(N1, state(1, Some(N1), &[N1, N2], 2));
    h.set_state(N2, state(1, Some(N1), &[N1, N2], 2));
    h.catch_up(N1, N2);
    assert_eq!(h.r(N1).high_watermark(), Offset(60));
    h.advance_ms(200);
    h.retention(N1);
    let start = h.r(N1).log().log_start_offset();
    assert!(start > Offset(0), "retention deleted the oldest committed segments");
    assert!(h.r(N1).log().size_bytes() < 2048 + 1024, "{} bytes left", h.r(N1).log().size_bytes());
    // The follower learns the high watermark with its next fetch and applies its own retention.
    h.catch_up(N1, N2);
    h.advance_ms(200);
    h.retention(N2);
    assert_eq!(h.r(N2).log().log_start_offset(), start, "the follower deletes the same segments");

    // n3 comes back asking for offset 0, below the leader's log start.
    h.take(N3);
    h.advance_ms(BACKOFF_MS);
    let req = h.round(N1, N3);
    assert_eq!(req.fetch_offset, Offset(0));
    assert_eq!((h.r(N3).log().log_start_offset(), h.r(N3).log().log_end_offset()), (start, start));
    h.catch_up(N1, N3);
    assert_eq!(records(h.r(N3).log()), records(h.r(N1).log()), "the same records from the log start");
    assert_eq!(records(h.r(N3).log()).first().map(|r| r.0), Some(start.0));
}

/// `retention.ms` compares record timestamps with the wall clock the driver passes, not with
/// the driver's own clock (cluster mode's is monotonic).
#[test]
fn retention_by_age_uses_the_wall_clock_given() {
    let log = LogConfig {
        durability: Durability::Always,
        segment_bytes: 1024,
        retention_ms: Some(1_000),
        ..LogConfig::default()
    };
    let config = ReplicaConfig { fetch_wait_max_ms: 0, min_insync_replicas: 1, ..ReplicaConfig::default() };
    let mut h = Harness::with_logs(config, log);
    h.set_state(N1, state(1, Some(N1), &[N1], 1));
    for i in 0..40 {
        h.produce(N1, i, i, Acks::Leader); // records stamped at 0 ms
    }
    h.sync(N1);
    assert_eq!(h.r(N1).high_watermark(), Offset(40));
    let at = |h: &mut Harness, wall: i64| {
        h.advance_ms(200);
        h.step(N1, |now, r, out| r.handle_retention(now, Timestamp(wall), out));
        h.r(N1).log().log_start_offset()
    };
    assert_eq!(at(&mut h, 900), Offset(0), "younger than retention.ms");
    let start = at(&mut h, 1_001);
    assert!(start > Offset(0), "older than retention.ms: sealed segments deleted");
    assert!(start < Offset(40), "the active segment stays");
}

/// A sealing partition (issue 21): the leader refuses new data but answers a retry of a
/// batch written before the seal with its offset; it reports its log end only once all of it
/// is committed, again after the retry interval, and to the controller only; a follower never
/// reports.
#[test]
fn a_sealing_leader_refuses_data_answers_duplicates_and_reports_its_committed_end() {
    let mut h = Harness::started_separate();
    let idem = |seq: i32, value: u64| {
        let mut b = BatchBuilder::new().producer(ProducerId(7), ProducerEpoch(0), Sequence(seq));
        b.push(None, &value.to_le_bytes(), &[], Timestamp(0));
        b.build()
    };
    let produce = |h: &mut Harness, request: u64, b: RecordBatch<Vec<u8>>| {
        let deadline = h.now.plus_ms(DEADLINE_MS);
        h.step(N1, |now, r, out| r.handle_produce(now, RequestId(request), None, b, Acks::All, deadline, true, out));
    };
    produce(&mut h, 1, idem(0, 10));
    produce(&mut h, 2, idem(1, 11));
    // The split: same epoch and leader, a new ISR version, sealing.
    let sealing = PartitionState { seal: Seal::Sealing, ..state(1, Some(N1), &[N1, N2, N3], 2) };
    for id in [N1, N2, N3] {
        h.set_state(id, sealing.clone());
    }
    assert!(h.sends(N1).iter().all(|(_, m)| !matches!(m, Message::Sealed { .. })), "two records uncommitted");
    produce(&mut h, 3, idem(2, 12));
    produce(&mut h, 4, batch(13));
    assert_eq!(
        h.replies(N1),
        vec![(RequestId(3), Err(ProduceError::Sealed)), (RequestId(4), Err(ProduceError::Sealed))],
        "new data refused, idempotent or not"
    );
    assert_eq!(h.r(N1).log().log_end_offset(), Offset(2));
    // A retry of the second batch (its answer lost): its offset, not a refusal.
    produce(&mut h, 5, idem(1, 11));
    h.sync(N1);
    h.advance_ms(BACKOFF_MS);
    for f in [N2, N3] {
        h.catch_up(N1, f);
    }
    assert_eq!(h.r(N1).high_watermark(), Offset(2));
    let replies = h.replies(N1);
    assert!(replies.contains(&(RequestId(5), Ok(Offset(1)))), "the retry is answered as a duplicate: {replies:?}");
    h.sends(N1);
    h.tick(N1);
    let reports: Vec<(Peer, Message)> =
        h.sends(N1).into_iter().filter(|(_, m)| matches!(m, Message::Sealed { .. })).collect();
    assert_eq!(
        reports,
        vec![(
            Peer::Controller,
            Message::Sealed { leader: N1, epoch: LeaderEpoch(1), partition: P, offset: Offset(2) }
        )],
        "all committed: the log end, to the controller"
    );
    h.tick(N1);
    assert!(h.sends(N1).iter().all(|(_, m)| !matches!(m, Message::Sealed { .. })), "not again at once");
    h.advance_ms(ReplicaConfig::default().alter_isr_retry_ms);
    h.tick(N1);
    assert_eq!(h.sends(N1).iter().filter(|(_, m)| matches!(m, Message::Sealed { .. })).count(), 1, "retried");
    for f in [N2, N3] {
        h.tick(f);
        assert!(h.sends(f).iter().all(|(_, m)| !matches!(m, Message::Sealed { .. })), "{f} is a follower");
    }
    // Sealed: no more reports; data still refused.
    let sealed = PartitionState { seal: Seal::Sealed(Offset(2)), ..state(1, Some(N1), &[N1, N2, N3], 3) };
    h.set_state(N1, sealed);
    h.advance_ms(ReplicaConfig::default().alter_isr_retry_ms);
    h.tick(N1);
    assert!(h.sends(N1).iter().all(|(_, m)| !matches!(m, Message::Sealed { .. })));
    produce(&mut h, 6, idem(2, 12));
    assert_eq!(h.replies(N1), vec![(RequestId(6), Err(ProduceError::Sealed))]);
}

// ---------------------------------------------------------------------------------------------
// The harness.

type Out = Vec<Command<Job<MemStorage>>>;
type Reply = (RequestId, Result<Offset, ProduceError>);
/// A record as the tests see it: (offset, leader epoch of its batch, value).
type Rec = (u64, u32, u64);

const P: PartitionId = PartitionId(0);
const N1: NodeId = NodeId(1);
const N2: NodeId = NodeId(2);
const N3: NodeId = NodeId(3);
/// `ReplicaConfig::default()`'s fetch backoff and lag limit (checked by `Harness::new`).
const BACKOFF_MS: u64 = 5;
const LAG_MAX_MS: u64 = 300;
/// Produce deadline far enough that no test times out unless it says so.
const DEADLINE_MS: u64 = 60_000;

/// Three replicas of partition `P` (n1, n2, n3) and the commands each produced, not yet
/// executed.
struct Harness {
    now: Time,
    replicas: BTreeMap<NodeId, Replica<MemStorage>>,
    outboxes: BTreeMap<NodeId, Out>,
    /// Write jobs stay in the outboxes for the test to run (`write`); otherwise every step
    /// runs them at once, as a fast disk would (what most tests assume).
    hold_writes: bool,
}

impl Harness {
    /// Replicas that answer every fetch at once (no long poll), so a test steps each round.
    fn new() -> Harness {
        Harness::with(ReplicaConfig { fetch_wait_max_ms: 0, ..ReplicaConfig::default() })
    }

    fn with(config: ReplicaConfig) -> Harness {
        Harness::with_logs(config, LogConfig { durability: Durability::Always, ..LogConfig::default() })
    }

    fn with_logs(config: ReplicaConfig, log: LogConfig) -> Harness {
        assert_eq!((config.fetch_backoff_ms, config.replica_lag_max_ms), (BACKOFF_MS, LAG_MAX_MS));
        let ids = [N1, N2, N3];
        let open = || Log::open(MemStorage::new(), log.clone(), Timestamp(0)).expect("an empty in-memory log opens");
        let replicas =
            ids.iter().map(|&id| (id, Replica::new(id, P, config.clone(), Plant::default(), open()))).collect();
        Harness {
            now: Time(1_000_000),
            replicas,
            outboxes: ids.iter().map(|&id| (id, Out::new())).collect(),
            hold_writes: false,
        }
    }

    /// Like `new`, but every batch gets its write job at once and a sync follows it
    /// (`ReplicaConfig::write_with_sync` off), so a test can step writes and syncs apart.
    fn separate_jobs() -> Harness {
        Harness::with(ReplicaConfig { fetch_wait_max_ms: 0, write_with_sync: false, ..ReplicaConfig::default() })
    }

    /// Epoch 1 led by n1, every replica in the ISR; both followers did their first (empty)
    /// fetch and back off.
    fn started() -> Harness {
        Harness::start(Harness::new())
    }

    /// `started`, from `separate_jobs`.
    fn started_separate() -> Harness {
        Harness::start(Harness::separate_jobs())
    }

    fn start(mut h: Harness) -> Harness {
        let s = state(1, Some(N1), &[N1, N2, N3], 1);
        for id in [N1, N2, N3] {
            h.set_state(id, s.clone());
        }
        h.round(N1, N2);
        h.round(N1, N3);
        h
    }

    fn r(&self, id: NodeId) -> &Replica<MemStorage> {
        &self.replicas[&id]
    }

    /// The replica and its outbox; checks afterwards that no storage failure was reported.
    fn step(&mut self, id: NodeId, f: impl FnOnce(Time, &mut Replica<MemStorage>, &mut Out)) {
        let replica = self.replicas.get_mut(&id).expect("a replica of the harness");
        let out = self.outboxes.get_mut(&id).expect("every replica has an outbox");
        f(self.now, replica, out);
        if !self.hold_writes {
            loop {
                let jobs = writes(out);
                if jobs.is_empty() {
                    break;
                }
                for job in jobs {
                    let result = job.run();
                    replica.handle_io_done(self.now, job, result, out);
                }
            }
        }
        assert!(!out.iter().any(|c| matches!(c, Command::Fail { .. })), "{id} failed: {out:?}");
    }

    /// Runs the replica's write jobs (with `hold_writes`).
    fn write(&mut self, id: NodeId) {
        let jobs = writes(self.outboxes.get_mut(&id).expect("every replica has an outbox"));
        assert!(!jobs.is_empty(), "{id} has no write job out");
        for job in jobs {
            let result = job.run();
            self.step(id, |now, r, out| r.handle_io_done(now, job, result, out));
        }
    }

    fn advance_ms(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
    }

    fn set_state(&mut self, id: NodeId, s: PartitionState) {
        self.step(id, |now, r, out| r.handle_state(now, s, out));
    }

    fn produce(&mut self, id: NodeId, request: u64, value: u64, acks: Acks) {
        self.produce_until(id, request, value, acks, self.now.plus_ms(DEADLINE_MS));
    }

    fn produce_until(&mut self, id: NodeId, request: u64, value: u64, acks: Acks, deadline: Time) {
        let b = batch(value);
        self.step(id, |now, r, out| r.handle_produce(now, RequestId(request), None, b, acks, deadline, true, out));
    }

    fn tick(&mut self, id: NodeId) {
        self.step(id, |now, r, out| r.handle_tick(now, out));
    }

    /// Retention, with the harness's clock as the wall clock.
    fn retention(&mut self, id: NodeId) {
        self.step(id, |now, r, out| r.handle_retention(now, now.timestamp(), out));
    }

    /// Runs the replica's sync jobs, and any they lead to.
    fn sync(&mut self, id: NodeId) {
        loop {
            let jobs = syncs(self.outboxes.get_mut(&id).expect("every replica has an outbox"));
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                let result = job.run();
                self.step(id, |now, r, out| r.handle_io_done(now, job, result, out));
            }
        }
    }

    /// Everything the replica produced so far.
    fn take(&mut self, id: NodeId) -> Out {
        std::mem::take(self.outboxes.get_mut(&id).expect("every replica has an outbox"))
    }

    fn replies(&mut self, id: NodeId) -> Vec<Reply> {
        replies(self.outboxes.get_mut(&id).expect("every replica has an outbox"))
    }

    fn sends(&mut self, id: NodeId) -> Vec<(Peer, Message)> {
        sends(self.outboxes.get_mut(&id).expect("every replica has an outbox"))
    }

    /// The follower's latest queued fetch, left queued.
    fn queued_fetch(&self, id: NodeId) -> Option<FetchRequest> {
        self.outboxes[&id].iter().rev().find_map(|c| match c {
            Command::Send { msg: Message::Fetch(req), .. } => Some(req.clone()),
            _ => None,
        })
    }

    /// Removes the follower's queued fetches and returns the latest: earlier ones were
    /// superseded (the follower ignores answers to them).
    fn take_fetch(&mut self, id: NodeId) -> Option<FetchRequest> {
        let out = self.outboxes.get_mut(&id).expect("every replica has an outbox");
        let mut fetches = Vec::new();
        let mut rest = Out::new();
        for c in out.drain(..) {
            match c {
                Command::Send { to, msg: Message::Fetch(req) } => fetches.push((to, req)),
                c => rest.push(c),
            }
        }
        *out = rest;
        let (to, req) = fetches.pop()?;
        let leader = self.replicas[&id].state().and_then(|s| s.leader).expect("a follower knows its leader");
        assert_eq!(to, Peer::Node(leader), "{id} fetches from its leader");
        Some(req)
    }

    /// The leader handles a fetch; the answer is returned, not delivered.
    fn fetch(&mut self, leader: NodeId, req: &FetchRequest) -> FetchResponse {
        self.fetch_or_park(leader, req).expect("answered at once")
    }

    /// The leader handles a fetch: its answer, or `None` if it holds the fetch.
    fn fetch_or_park(&mut self, leader: NodeId, req: &FetchRequest) -> Option<FetchResponse> {
        let mut resp = None;
        self.step(leader, |now, r, out| resp = Some(r.handle_fetch(now, req, out)));
        resp.expect("set by the step")
    }

    fn respond(&mut self, follower: NodeId, resp: FetchResponse) {
        self.step(follower, |now, r, out| r.handle_fetch_response(now, resp, out));
    }

    /// One round trip: the follower's queued fetch (or the one a tick now sends) to the
    /// leader, and the answer back. Returns the request.
    fn round(&mut self, leader: NodeId, follower: NodeId) -> FetchRequest {
        let req = match self.take_fetch(follower) {
            Some(req) => req,
            None => {
                self.tick(follower);
                let now = self.now;
                self.take_fetch(follower).unwrap_or_else(|| panic!("{follower} has no fetch due at {now:?}"))
            }
        };
        let resp = self.fetch(leader, &req);
        self.respond(follower, resp);
        req
    }

    /// Fetch rounds and follower syncs, waiting out fetch backoffs, until the leader saw a
    /// fetch showing its whole log on the follower's disk.
    fn catch_up(&mut self, leader: NodeId, follower: NodeId) {
        for _ in 0..10 {
            if self.queued_fetch(follower).is_none() {
                self.advance_ms(BACKOFF_MS);
            }
            let req = self.round(leader, follower);
            self.sync(follower);
            let end = self.r(leader).log().log_end_offset();
            if req.fetch_offset == end && req.durable_offset == end {
                return;
            }
        }
        panic!("{follower} did not catch up with {leader}");
    }
}

fn open_log() -> Log<MemStorage> {
    let config = LogConfig { durability: Durability::Always, ..LogConfig::default() };
    Log::open(MemStorage::new(), config, Timestamp(0)).expect("an empty in-memory log opens")
}

/// A batch of one record whose value is `value`, little-endian.
fn batch(value: u64) -> RecordBatch<Vec<u8>> {
    let mut b = BatchBuilder::new();
    b.push(None, &value.to_le_bytes(), &[], Timestamp(0));
    b.build()
}

/// The partition's state; every node is a replica.
fn state(epoch: u32, leader: Option<NodeId>, isr: &[NodeId], isr_version: u32) -> PartitionState {
    PartitionState {
        partition: P,
        epoch: LeaderEpoch(epoch),
        leader,
        isr: isr.to_vec(),
        isr_version: IsrVersion(isr_version),
        replicas: vec![N1, N2, N3],
        seal: Seal::Open,
    }
}

/// Removes the commands `pick` takes from `out`, keeping the others in order.
fn drain<T>(
    out: &mut Out,
    mut pick: impl FnMut(Command<Job<MemStorage>>) -> Result<T, Command<Job<MemStorage>>>,
) -> Vec<T> {
    let mut taken = Vec::new();
    let mut rest = Out::new();
    for c in out.drain(..) {
        match pick(c) {
            Ok(t) => taken.push(t),
            Err(c) => rest.push(c),
        }
    }
    *out = rest;
    taken
}

/// The leader's answer (epoch 1) that the follower's log diverges from offset 0.
fn diverging_at_start(correlation: u64) -> FetchResponse {
    FetchResponse::Diverging {
        partition: P,
        correlation,
        epoch: LeaderEpoch(1),
        end_epoch: LeaderEpoch(1),
        end_offset: Offset(0),
    }
}

/// The fetches queued, oldest first.
fn fetches(out: &mut Out) -> Vec<FetchRequest> {
    drain(out, |c| match c {
        Command::Send { msg: Message::Fetch(req), .. } => Ok(req),
        c => Err(c),
    })
}

fn sends(out: &mut Out) -> Vec<(Peer, Message)> {
    drain(out, |c| match c {
        Command::Send { to, msg } => Ok((to, msg)),
        c => Err(c),
    })
}

fn replies(out: &mut Out) -> Vec<Reply> {
    drain(out, |c| match c {
        Command::ProduceReply { request, result } => Ok((request, result)),
        c => Err(c),
    })
}

/// The storage jobs queued, write and sync.
fn syncs(out: &mut Out) -> Vec<Job<MemStorage>> {
    drain(out, |c| match c {
        Command::Io { partition, job } => {
            assert_eq!(partition, P);
            Ok(job)
        }
        c => Err(c),
    })
}

/// The write jobs queued.
fn writes(out: &mut Out) -> Vec<Job<MemStorage>> {
    drain(out, |c| match c {
        Command::Io { partition, job: job @ Job::Write(_) } => {
            assert_eq!(partition, P);
            Ok(job)
        }
        c => Err(c),
    })
}

/// Every record of the log.
fn records(log: &Log<MemStorage>) -> Vec<Rec> {
    let mut buf = Vec::new();
    let limit = ReadLimit { max_bytes: u32::MAX, end: None };
    log.read_verified(log.log_start_offset(), limit, &mut buf).expect("an in-memory log reads");
    decode(&buf)
}

/// The records of whole batches back to back.
fn decode(bytes: &[u8]) -> Vec<Rec> {
    let mut recs = Vec::new();
    for b in batches(bytes) {
        let b = b.expect("a valid batch");
        let h = *b.header();
        for (i, r) in b.records().iter().enumerate() {
            let value = u64::from_le_bytes(r.value.as_slice().try_into().expect("an 8-byte value"));
            recs.push((h.base_offset.0 + i as u64, h.leader_epoch.0, value));
        }
    }
    recs
}

/// A client read's failure keeps its kind: an IO error is `Storage` (the driver fail-stops,
/// issue 16), never a plain refusal the client retries against a broken disk.
#[test]
fn a_client_read_io_error_is_a_storage_failure_not_a_refusal() {
    let io = skein_log::storage::StorageError {
        op: "read",
        path: "partitions/0/00000000000000000000.log".into(),
        source: std::io::Error::other("EIO"),
    };
    let failure = ReadFailure::from_log(skein_log::ReadError::Storage(io));
    assert!(matches!(&failure, ReadFailure::Storage(e) if e.contains("00000000000000000000.log")), "{failure:?}");
    let range = skein_log::OutOfRange { requested: Offset(0), log_start: Offset(5), log_end: Offset(9) };
    assert_eq!(ReadFailure::from_log(range.into()), ReadFailure::OffsetOutOfRange);
}
