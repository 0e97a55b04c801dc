//! Tests of the history checker: for each check a hand-made history that fails that check
//! alone; good histories that pass everything; property tests against a model log (valid
//! histories pass, mutated ones fail, arbitrary ones never panic); the JSON-lines format and
//! the report's forms.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

/// The process id used for final reads.
const FINAL: u32 = 99;

/// Builds histories tersely. Each operation gets its own 10 us slot, so operations are
/// sequential in time unless `send_at` places one explicitly.
struct Rec {
    history: History,
    now_us: u64,
}

impl Rec {
    fn new() -> Rec {
        Rec { history: History::new(), now_us: 0 }
    }

    fn slot(&mut self) -> (u64, u64) {
        let invoke_us = self.now_us;
        self.now_us += 10;
        (invoke_us, invoke_us + 5)
    }

    fn send_at(&mut self, process: u32, partition: u32, value: u64, outcome: SendOutcome, at: (u64, u64)) -> usize {
        self.history.push(SendOp {
            process: ProcessId(process),
            partition: Some(PartitionId(partition)),
            key: None,
            value: Value(value),
            invoke_us: at.0,
            complete_us: at.1,
            outcome,
        })
    }

    fn send(&mut self, process: u32, partition: u32, value: u64, outcome: SendOutcome) -> usize {
        let at = self.slot();
        self.send_at(process, partition, value, outcome, at)
    }

    fn ok(&mut self, process: u32, partition: u32, value: u64, offset: u64) -> usize {
        self.send(process, partition, value, acked(partition, offset))
    }

    fn failed(&mut self, process: u32, partition: u32, value: u64) -> usize {
        self.send(process, partition, value, SendOutcome::Failed)
    }

    fn unknown(&mut self, process: u32, partition: u32, value: u64) -> usize {
        self.send(process, partition, value, SendOutcome::Unknown)
    }

    fn poll_op(&mut self, process: u32, partition: u32, from: u64, records: &[(u64, u64)], hw: Option<u64>) -> PollOp {
        let (invoke_us, complete_us) = self.slot();
        PollOp {
            process: ProcessId(process),
            partition: PartitionId(partition),
            from: Offset(from),
            records: records.iter().map(|&(offset, value)| (Offset(offset), Value(value))).collect(),
            high_watermark: hw.map(Offset),
            invoke_us,
            complete_us,
            final_read: false,
        }
    }

    fn poll(&mut self, process: u32, partition: u32, from: u64, records: &[(u64, u64)], hw: Option<u64>) -> usize {
        let poll = self.poll_op(process, partition, from, records, hw);
        self.history.push(poll)
    }

    fn final_poll(&mut self, partition: u32, from: u64, records: &[(u64, u64)], hw: Option<u64>) -> usize {
        let poll = PollOp { final_read: true, ..self.poll_op(FINAL, partition, from, records, hw) };
        self.history.push(poll)
    }

    fn gap(&mut self, partition: u32, offset: u64) -> usize {
        self.history.push(GapOp { partition: PartitionId(partition), offset: Offset(offset) })
    }
}

fn acked(partition: u32, offset: u64) -> SendOutcome {
    SendOutcome::Ok { partition: PartitionId(partition), offset: Offset(offset) }
}

/// Checks `history` and asserts `failing` is the only check that failed; returns its
/// violations.
fn fails_only(history: &History, failing: Check) -> Vec<Violation> {
    let report = check(history);
    for result in &report.results {
        assert_eq!(result.failed(), result.check == failing, "{}:\n{report}", result.check);
    }
    report.violations(failing).to_vec()
}

/// Checks `history` and asserts nothing failed.
fn passes(history: &History) -> Report {
    let report = check(history);
    assert!(report.ok(), "{report}");
    report
}

/// Asserts a violation names this position and value (first of each) and these ops.
fn assert_names(violation: &Violation, partition: u32, offset: u64, value: u64, ops: &[usize]) {
    assert_eq!(violation.partition, Some(PartitionId(partition)), "{violation:?}");
    assert_eq!(violation.offsets.first(), Some(&Offset(offset)), "{violation:?}");
    assert_eq!(violation.values.first(), Some(&Value(value)), "{violation:?}");
    for op in ops {
        assert!(violation.ops.contains(op), "op #{op} not in {violation:?}");
        assert!(violation.detail.contains(&format!("op #{op}")), "op #{op} not named: {}", violation.detail);
    }
}

// ---- One failing history per check ----

#[test]
fn lost_write_acknowledged_value_passed_over_by_a_reader() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    let lost = rec.ok(1, 0, 11, 1);
    rec.ok(1, 0, 12, 2);
    let first = rec.poll(2, 0, 0, &[(0, 10)], Some(3));
    let past = rec.poll(2, 0, 2, &[(2, 12)], Some(3));
    let violations = fails_only(&rec.history, Check::LostWrite);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 1, 11, &[lost, first, past]);
    assert_eq!(violations[0].process, Some(ProcessId(1)), "the writer");
}

#[test]
fn lost_write_needs_a_reader_that_started_at_or_before_the_offset() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    rec.ok(1, 0, 11, 1);
    rec.poll(2, 0, 1, &[(1, 11)], Some(2));
    let report = passes(&rec.history);
    assert_eq!(report.result(Check::LostWrite).map(|r| r.counted), Some(2));
    assert_eq!(report.not_run(), vec![Check::UnreadAck], "no final read: value 10 is unread, not lost");
}

#[test]
fn inconsistent_offset_read_disagrees_with_acknowledgement() {
    let mut rec = Rec::new();
    let ack = rec.ok(1, 0, 10, 0);
    rec.unknown(1, 0, 11);
    let read = rec.poll(2, 0, 0, &[(0, 11)], Some(1));
    let violations = fails_only(&rec.history, Check::InconsistentOffset);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 0, 10, &[ack, read]);
    assert_eq!(violations[0].values, vec![Value(10), Value(11)]);
}

#[test]
fn inconsistent_offset_value_at_declared_gap() {
    let mut rec = Rec::new();
    let gap = rec.gap(0, 0);
    rec.unknown(1, 0, 10);
    let read = rec.poll(2, 0, 0, &[(0, 10)], Some(1));
    let violations = fails_only(&rec.history, Check::InconsistentOffset);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 0, 10, &[gap, read]);
}

#[test]
fn duplicate_value_at_two_offsets() {
    let mut rec = Rec::new();
    let ack = rec.ok(1, 0, 10, 0);
    let read = rec.poll(2, 0, 0, &[(0, 10), (1, 10)], Some(2));
    let violations = fails_only(&rec.history, Check::Duplicate);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 0, 10, &[ack, read]);
    assert_eq!(violations[0].offsets, vec![Offset(0), Offset(1)]);
}

#[test]
fn aborted_read_of_failed_send() {
    let mut rec = Rec::new();
    let send = rec.failed(1, 0, 10);
    let read = rec.poll(2, 0, 0, &[(0, 10)], Some(1));
    rec.poll(3, 0, 0, &[(0, 10)], Some(1));
    let violations = fails_only(&rec.history, Check::AbortedRead);
    assert_eq!(violations.len(), 1, "one violation per value");
    assert_names(&violations[0], 0, 0, 10, &[send, read]);
}

#[test]
fn nonmonotonic_poll_returns_an_offset_again() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    rec.ok(1, 0, 11, 1);
    let first = rec.poll(2, 0, 0, &[(0, 10), (1, 11)], Some(2));
    let again = rec.poll(2, 0, 1, &[(1, 11)], Some(2));
    let violations = fails_only(&rec.history, Check::NonmonotonicPoll);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 1, 11, &[first, again]);
    assert_eq!(violations[0].process, Some(ProcessId(2)));
}

#[test]
fn poll_skip_over_an_offset_another_reader_saw() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    rec.ok(1, 0, 11, 1);
    rec.ok(1, 0, 12, 2);
    let before = rec.poll(2, 0, 0, &[(0, 10)], Some(3));
    let after = rec.poll(2, 0, 2, &[(2, 12)], Some(3));
    let witness = rec.poll(3, 0, 0, &[(0, 10), (1, 11), (2, 12)], Some(3));
    let violations = fails_only(&rec.history, Check::PollSkip);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 1, 11, &[before, after, witness]);
}

#[test]
fn poll_skip_over_a_declared_gap_is_fine() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    rec.gap(0, 1);
    rec.ok(1, 0, 12, 2);
    rec.poll(2, 0, 0, &[(0, 10)], Some(3));
    rec.poll(2, 0, 1, &[(2, 12)], Some(3));
    rec.final_poll(0, 0, &[(0, 10), (2, 12)], Some(3));
    passes(&rec.history);
}

#[test]
fn nonmonotonic_send_offsets_against_invoke_order() {
    let mut rec = Rec::new();
    // Pipelined: both in flight at once, the second acknowledged first at a lower offset.
    let first = rec.send_at(1, 0, 10, acked(0, 1), (0, 50));
    let second = rec.send_at(1, 0, 11, acked(0, 0), (10, 40));
    let violations = fails_only(&rec.history, Check::NonmonotonicSend);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 0, 11, &[first, second]);
}

#[test]
fn unread_ack_missing_from_final_read() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    let missing = rec.ok(1, 0, 11, 1);
    let last = rec.final_poll(0, 0, &[(0, 10)], Some(1));
    let violations = fails_only(&rec.history, Check::UnreadAck);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 1, 11, &[missing, last]);
}

#[test]
fn unread_ack_does_not_run_without_a_final_read_of_the_partition() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    let report = passes(&rec.history);
    let reason = match &report.result(Check::UnreadAck).expect("present").outcome {
        CheckOutcome::NotRun { reason } => reason.clone(),
        other => panic!("expected not run, got {other:?}"),
    };
    assert!(reason.contains("partition 0"), "{reason}");
    rec.ok(1, 1, 20, 0);
    rec.final_poll(0, 0, &[(0, 10)], Some(1));
    let report = passes(&rec.history);
    assert_eq!(report.not_run(), vec![Check::UnreadAck], "partition 1 has no final read:\n{report}");
    assert!(report.to_string().contains("no final read of partition 1 (1 acknowledged sends unchecked)"), "{report}");
    assert_eq!(check(&History::new()).not_run(), vec![Check::UnreadAck]);
}

#[test]
fn read_after_write_high_watermark_below_own_ack() {
    let mut rec = Rec::new();
    let send = rec.ok(1, 0, 10, 0);
    let poll = rec.poll(1, 0, 0, &[], Some(0));
    let violations = fails_only(&rec.history, Check::ReadAfterWrite);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 0, 10, &[send, poll]);
}

#[test]
fn read_after_write_spares_earlier_and_partial_polls() {
    let mut rec = Rec::new();
    rec.send_at(1, 0, 10, acked(0, 0), (0, 50));
    rec.now_us = 10;
    rec.poll(1, 0, 0, &[], Some(0)); // invoked before the acknowledgement
    rec.now_us = 100;
    rec.ok(1, 0, 11, 1);
    rec.poll(1, 0, 0, &[(0, 10)], Some(2)); // size-limited: stops before offset 1
    rec.poll(1, 0, 2, &[], Some(2)); // from beyond both own writes
    rec.poll(1, 0, 1, &[(1, 11)], Some(2));
    let report = passes(&rec.history);
    assert_eq!(report.result(Check::ReadAfterWrite).map(|r| r.counted), Some(2));
}

#[test]
fn monotonic_read_high_watermark_goes_back() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    rec.ok(1, 0, 11, 1);
    let seen = rec.poll(2, 0, 0, &[(0, 10), (1, 11)], Some(2));
    let back = rec.poll(2, 0, 2, &[], Some(1));
    let violations = fails_only(&rec.history, Check::MonotonicRead);
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].offsets, vec![Offset(1), Offset(2)]);
    assert!(violations[0].ops == vec![seen, back], "{:?}", violations[0]);
}

#[test]
fn consistent_prefix_hole_in_a_poll() {
    let mut rec = Rec::new();
    rec.unknown(1, 0, 10);
    rec.unknown(1, 0, 12);
    let poll = rec.poll(2, 0, 0, &[(0, 10), (2, 12)], Some(3));
    let violations = fails_only(&rec.history, Check::ConsistentPrefix);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 2, 12, &[poll]);
    // The same hole, declared a gap, is fine.
    rec.gap(0, 1);
    passes(&rec.history);
}

#[test]
fn consistent_prefix_record_at_high_watermark_or_out_of_order() {
    let mut rec = Rec::new();
    rec.unknown(1, 0, 10);
    rec.unknown(1, 0, 11);
    let above = rec.poll(2, 0, 0, &[(0, 10)], Some(0));
    let violations = fails_only(&rec.history, Check::ConsistentPrefix);
    assert_eq!(violations.len(), 1);
    assert_names(&violations[0], 0, 0, 10, &[above]);
    let mut rec = Rec::new();
    rec.unknown(1, 0, 10);
    rec.unknown(1, 0, 11);
    let backwards = rec.poll(2, 0, 0, &[(1, 11), (0, 10)], Some(2));
    let violations = fails_only(&rec.history, Check::ConsistentPrefix);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_names(&violations[0], 0, 1, 11, &[backwards]);
}

impl Rec {
    /// An acknowledged send of `value` under `key`, at `at`.
    fn keyed(&mut self, process: u32, key: u64, (partition, offset): (u32, u64), value: u64, at: (u64, u64)) -> usize {
        self.history.push(SendOp {
            process: ProcessId(process),
            partition: Some(PartitionId(partition)),
            key: Some(Key(key)),
            value: Value(value),
            invoke_us: at.0,
            complete_us: at.1,
            outcome: acked(partition, offset),
        })
    }

    /// A poll completing at `complete_us`.
    fn poll_done_at(&mut self, process: u32, partition: u32, records: &[(u64, u64)], complete_us: u64) -> usize {
        let from = records.first().map_or(0, |r| r.0);
        let poll = self.poll_op(process, partition, from, records, None);
        self.history.push(PollOp { invoke_us: complete_us - 1, complete_us, ..poll })
    }
}

#[test]
fn key_order_child_read_before_its_parent() {
    // Key 5 written to partition 0 (a parent), then, once acknowledged, to partition 1 (its
    // child); a reader given the child's value first reads the key out of order.
    let mut rec = Rec::new();
    let a = rec.keyed(1, 5, (0, 0), 10, (0, 5));
    let b = rec.keyed(1, 5, (1, 0), 11, (10, 15));
    rec.keyed(1, 6, (0, 1), 12, (20, 25)); // another key, read in any order
    let early = rec.poll_done_at(2, 1, &[(0, 11)], 100);
    let late = rec.poll_done_at(2, 0, &[(0, 10), (1, 12)], 200);
    let violations = fails_only(&rec.history, Check::KeyOrder);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_names(&violations[0], 0, 0, 10, &[late, early, a, b]);
    assert!(violations[0].detail.contains("read key 5 out of order"), "{}", violations[0].detail);
    // The same reads in the order written pass, and so does another session reading only one.
    let mut rec = Rec::new();
    rec.keyed(1, 5, (0, 0), 10, (0, 5));
    rec.keyed(1, 5, (1, 0), 11, (10, 15));
    rec.poll_done_at(2, 0, &[(0, 10)], 100);
    rec.poll_done_at(2, 1, &[(0, 11)], 200);
    rec.poll_done_at(3, 1, &[(0, 11)], 300);
    passes(&rec.history);
}

#[test]
fn key_order_holds_a_producer_to_its_invoke_order_and_spares_concurrent_producers() {
    // One producer, two sends in flight at once: invoke order is its order.
    let mut rec = Rec::new();
    rec.keyed(1, 5, (0, 0), 10, (0, 50));
    rec.keyed(1, 5, (1, 0), 11, (10, 30));
    rec.poll_done_at(2, 1, &[(0, 11)], 100);
    rec.poll_done_at(2, 0, &[(0, 10)], 200);
    let violations = fails_only(&rec.history, Check::KeyOrder);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].detail.contains("both sent by process 1"), "{}", violations[0].detail);
    // Two producers overlapping in time: no order between them.
    let mut rec = Rec::new();
    rec.keyed(1, 5, (0, 0), 10, (0, 50));
    rec.keyed(3, 5, (1, 0), 11, (10, 30));
    rec.poll_done_at(2, 1, &[(0, 11)], 100);
    rec.poll_done_at(2, 0, &[(0, 10)], 200);
    passes(&rec.history);
}

#[test]
fn key_order_inside_one_poll_counts_and_across_simultaneous_polls_does_not() {
    let mut rec = Rec::new();
    rec.keyed(1, 5, (0, 0), 10, (0, 5));
    rec.keyed(1, 5, (0, 1), 11, (10, 15));
    rec.poll_done_at(2, 0, &[(1, 11), (0, 10)], 100);
    let report = check(&rec.history);
    assert!(report.violated(Check::KeyOrder), "{report}");
    let mut rec = Rec::new();
    rec.keyed(1, 5, (0, 0), 10, (0, 5));
    rec.keyed(1, 5, (1, 0), 11, (10, 15));
    rec.poll_done_at(2, 1, &[(0, 11)], 100);
    rec.poll_done_at(2, 0, &[(0, 10)], 100);
    passes(&rec.history);
    // Final reads go partition by partition: never out of key order.
    let mut rec = Rec::new();
    rec.keyed(1, 5, (0, 0), 10, (0, 5));
    rec.keyed(1, 5, (1, 0), 11, (10, 15));
    rec.final_poll(1, 0, &[(0, 11)], Some(1));
    rec.final_poll(0, 0, &[(0, 10)], Some(1));
    passes(&rec.history);
}

#[test]
fn nonmonotonic_send_of_routed_keyed_sends_is_per_key() {
    // Two keys routed (no partition named) into one merged child: their records interleave in
    // any order; one key's may not go backwards.
    let routed = |rec: &mut Rec, key: u64, value: u64, offset: u64| {
        let at = rec.slot();
        rec.history.push(SendOp {
            process: ProcessId(1),
            partition: None,
            key: Some(Key(key)),
            value: Value(value),
            invoke_us: at.0,
            complete_us: at.1,
            outcome: acked(4, offset),
        })
    };
    let mut rec = Rec::new();
    routed(&mut rec, 1, 10, 1);
    routed(&mut rec, 2, 11, 0);
    let report = check(&rec.history);
    assert!(!report.violated(Check::NonmonotonicSend), "{report}");
    let mut rec = Rec::new();
    routed(&mut rec, 1, 10, 1);
    routed(&mut rec, 1, 11, 0);
    let report = check(&rec.history);
    assert!(report.violated(Check::NonmonotonicSend), "{report}");
    // Aimed at the partition, the order holds whatever the keys.
    let mut rec = Rec::new();
    rec.keyed(1, 1, (4, 1), 10, (0, 5));
    rec.keyed(1, 2, (4, 0), 11, (10, 15));
    let report = check(&rec.history);
    assert!(report.violated(Check::NonmonotonicSend), "{report}");
}

// ---- Good histories ----

/// Two partitions; three producers (two overlapping in time); two consumers; a producer reading
/// its own writes; a declared gap; an unknown send that was written and one that was not; a
/// failed send; a send that names no partition; a final read in several polls.
fn good_history() -> History {
    let mut rec = Rec::new();
    rec.send_at(1, 0, 100, acked(0, 0), (0, 40));
    rec.send_at(2, 0, 101, acked(0, 1), (10, 30));
    rec.now_us = 50;
    rec.gap(0, 2);
    rec.unknown(1, 0, 102); // written at offset 3
    rec.ok(2, 0, 103, 4);
    rec.unknown(1, 0, 104); // never written
    rec.failed(2, 0, 105);
    let at = rec.slot();
    rec.history.push(SendOp {
        process: ProcessId(3),
        partition: None,
        key: Some(Key(7)),
        value: Value(200),
        invoke_us: at.0,
        complete_us: at.1,
        outcome: acked(1, 0),
    });
    rec.ok(3, 1, 201, 1);
    rec.poll(1, 0, 0, &[(0, 100), (1, 101)], Some(5)); // producer 1 reads its own write
    rec.poll(10, 0, 0, &[(0, 100), (1, 101)], Some(5));
    rec.poll(10, 0, 2, &[(3, 102)], Some(5)); // passes over the gap
    rec.poll(10, 0, 4, &[(4, 103)], Some(5));
    rec.poll(10, 0, 5, &[], Some(5));
    rec.poll(11, 1, 0, &[(0, 200)], Some(2));
    rec.poll(11, 1, 1, &[(1, 201)], None);
    rec.poll(11, 0, 3, &[(3, 102), (4, 103)], Some(5)); // consumer 11 starts partition 0 late
    rec.final_poll(0, 0, &[(0, 100), (1, 101)], Some(5));
    rec.final_poll(0, 2, &[(3, 102), (4, 103)], Some(5));
    rec.final_poll(1, 0, &[(0, 200), (1, 201)], Some(2));
    rec.history
}

#[test]
fn good_history_passes_every_check() {
    let report = passes(&good_history());
    assert!(report.not_run().is_empty(), "{report}");
    let counted = |check| report.result(check).map(|r| r.counted);
    assert_eq!(counted(Check::LostWrite), Some(5));
    assert_eq!(counted(Check::UnreadAck), Some(5));
    assert_eq!(counted(Check::ConsistentPrefix), Some(11));
    assert_eq!(counted(Check::ReadAfterWrite), Some(1));
    let text = report.to_string();
    assert_eq!(text.lines().count(), Check::ALL.len(), "{text}");
    assert!(text.starts_with("lost-write          PASS (5 acknowledged sends)\n"), "{text}");
}

#[test]
fn final_read_may_reuse_a_consumer_process_id() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, 0);
    rec.ok(1, 0, 11, 1);
    rec.poll(2, 0, 0, &[(0, 10), (1, 11)], Some(2));
    let poll = PollOp { final_read: true, ..rec.poll_op(2, 0, 0, &[(0, 10), (1, 11)], Some(2)) };
    rec.history.push(poll);
    let report = passes(&rec.history);
    assert!(report.not_run().is_empty(), "{report}");
}

#[test]
fn large_history_is_checked() {
    let mut rec = Rec::new();
    let mut logs: Vec<Vec<u64>> = vec![Vec::new(); 4];
    let mut positions = [0u64; 4];
    for value in 0..100_000u64 {
        let partition = (value % 4) as usize;
        let process = (value % 7) as u32;
        let offset = logs[partition].len() as u64;
        logs[partition].push(value);
        rec.ok(process, partition as u32, value, offset);
        if value % 16 == 15 {
            for (partition, log) in logs.iter().enumerate() {
                let records = model_records(log, positions[partition], log.len() as u64);
                rec.poll(
                    100 + partition as u32,
                    partition as u32,
                    positions[partition],
                    &records,
                    Some(log.len() as u64),
                );
                positions[partition] = log.len() as u64;
            }
        }
    }
    for (partition, log) in logs.iter().enumerate() {
        let records = model_records(log, 0, log.len() as u64);
        rec.final_poll(partition as u32, 0, &records, Some(log.len() as u64));
    }
    let report = passes(&rec.history);
    assert_eq!(report.result(Check::UnreadAck).map(|r| r.counted), Some(100_000));
}

fn model_records(log: &[u64], from: u64, end: u64) -> Vec<(u64, u64)> {
    (from..end).map(|offset| (offset, log[offset as usize])).collect()
}

// ---- Robustness and bounds ----

#[test]
fn extreme_offsets_do_not_panic() {
    let mut rec = Rec::new();
    rec.ok(1, 0, 10, u64::MAX);
    rec.ok(1, 0, 11, u64::MAX - 1);
    rec.gap(0, u64::MAX);
    rec.poll(1, 0, u64::MAX, &[(u64::MAX, 11), (0, 10), (u64::MAX, 10)], Some(u64::MAX));
    rec.poll(1, 0, 0, &[(5, 11)], Some(0));
    rec.final_poll(0, u64::MAX, &[(u64::MAX - 1, 11)], None);
    let report = check(&rec.history);
    assert!(!report.ok());
    let _ = report.to_string();
}

#[test]
fn violations_kept_are_bounded_and_counted() {
    let mut rec = Rec::new();
    let count = VIOLATIONS_KEPT_MAX as u64 + 7;
    let records: Vec<(u64, u64)> = (0..count).map(|value| (value, value)).collect();
    for value in 0..count {
        rec.failed(1, 0, value);
    }
    rec.poll(2, 0, 0, &records, Some(count));
    let report = check(&rec.history);
    let result = report.result(Check::AbortedRead).expect("present");
    match &result.outcome {
        CheckOutcome::Failed { violations, violation_count } => {
            assert_eq!(violations.len(), VIOLATIONS_KEPT_MAX);
            assert_eq!(*violation_count, count as usize);
        }
        other => panic!("expected failure, got {other:?}"),
    }
    let text = report.to_string();
    assert_eq!(text.lines().count(), Check::ALL.len() + 5 + 1, "5 printed, then the rest counted:\n{text}");
    assert!(text.contains(&format!("aborted-read        FAIL {count} ({count} records read)\n")), "{text}");
    assert!(text.contains(&format!("    ... and {} more\n", count - 5)), "{text}");
}

#[test]
fn check_names_are_stable_and_match_serde() {
    let names: Vec<&str> = Check::ALL.iter().map(|check| check.name()).collect();
    assert_eq!(
        names,
        [
            "lost-write",
            "inconsistent-offset",
            "duplicate",
            "aborted-read",
            "nonmonotonic-poll",
            "poll-skip",
            "nonmonotonic-send",
            "unread-ack",
            "read-after-write",
            "monotonic-read",
            "consistent-prefix",
            "key-order"
        ]
    );
    for check in Check::ALL {
        assert_eq!(serde_json::to_string(&check).expect("serializes"), format!("\"{}\"", check.name()));
    }
}

#[test]
fn report_serializes_as_json() {
    let mut rec = Rec::new();
    rec.failed(1, 0, 10);
    rec.poll(2, 0, 0, &[(0, 10)], Some(1));
    let report = check(&rec.history);
    let json = serde_json::to_string(&report).expect("serializes");
    assert!(
        json.contains(r#""check":"aborted-read","outcome":{"status":"failed","violations":[{"check":"aborted-read""#),
        "{json}"
    );
    assert!(json.contains(r#""status":"not_run","reason":"the history has no final read""#), "{json}");
    let back: Report = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, report);
}

// ---- JSON lines ----

#[test]
fn json_lines_roundtrip() {
    let history = good_history();
    let mut bytes = Vec::new();
    history.write_json_lines(&mut bytes).expect("writes");
    let text = String::from_utf8(bytes.clone()).expect("utf8");
    assert_eq!(text.lines().count(), history.ops.len());
    assert!(text.contains("\n{\"op\":\"gap\",\"partition\":0,\"offset\":2}\n"), "{text}");
    assert!(
        text.starts_with(
            "{\"op\":\"send\",\"process\":1,\"partition\":0,\"value\":100,\"invoke_us\":0,\"complete_us\":40,\
             \"outcome\":{\"status\":\"ok\",\"partition\":0,\"offset\":0}}\n"
        ),
        "{text}"
    );
    assert!(text.contains("\"records\":[[0,100],[1,101]],\"high_watermark\":5,"), "{text}");
    assert_eq!(History::from_json_lines(&bytes[..]).expect("reads"), history);
    let spaced = text.replace('\n', "\n\n  \n");
    assert_eq!(History::from_json_lines(spaced.as_bytes()).expect("blank lines skipped"), history);
    // Optional fields may be left out.
    let terse = "{\"op\":\"poll\",\"process\":1,\"partition\":0,\"from\":0,\"invoke_us\":1,\"complete_us\":2}\n";
    let read = History::from_json_lines(terse.as_bytes()).expect("reads");
    assert!(
        matches!(&read.ops[..], [Op::Poll(PollOp { records, high_watermark: None, final_read: false, .. })] if records.is_empty())
    );
}

#[test]
fn malformed_lines_are_errors_naming_the_line() {
    let good = "{\"op\":\"gap\",\"partition\":0,\"offset\":2}\n";
    let send = |value: u64, invoke: u64, complete: u64| {
        format!(
            "{{\"op\":\"send\",\"process\":1,\"value\":{value},\"invoke_us\":{invoke},\"complete_us\":{complete},\
             \"outcome\":{{\"status\":\"unknown\"}}}}\n"
        )
    };
    let cases: Vec<(String, usize, &str)> = vec![
        (format!("{good}{good}not json\n"), 3, "not an operation"),
        (format!("{good}\n{{\"op\":\"gap\",\"partition\":0}}\n"), 3, "not an operation"),
        (format!("{{\"op\":\"nap\",\"partition\":0,\"offset\":1}}\n{good}"), 1, "not an operation"),
        (format!("{good}{{\"op\":\"gap\",\"partition\":0,\"offset\":1,\"ofset\":2}}\n"), 2, "not an operation"),
        (format!("{good}{{\"op\":\"gap\",\"partition\":-1,\"offset\":1}}\n"), 2, "not an operation"),
        (format!("{good}{}", send(1, 9, 3)), 2, "before it is invoked"),
        (format!("{}{good}{}", send(1, 1, 3), send(1, 4, 5)), 3, "value 1 already sent on line 1"),
    ];
    for (text, line, message) in cases {
        let err = History::from_json_lines(text.as_bytes()).expect_err(&text);
        assert_eq!(err.line(), line, "{text}: {err}");
        assert!(err.to_string().starts_with(&format!("history line {line}: ")), "{err}");
        assert!(err.to_string().contains(message), "{err}");
    }
    let mut bytes = good.as_bytes().to_vec();
    bytes.extend_from_slice(b"\xff\xfe\n");
    let err = History::from_json_lines(&bytes[..]).expect_err("not utf8");
    assert!(matches!(err, HistoryError::Io { line: 2, .. }), "{err}");
    let bad_ack = "{\"op\":\"send\",\"process\":1,\"partition\":0,\"value\":1,\"invoke_us\":1,\"complete_us\":2,\
                   \"outcome\":{\"status\":\"ok\",\"partition\":1,\"offset\":0}}";
    let err = History::from_json_lines(bad_ack.as_bytes()).expect_err("wrong partition");
    assert!(err.to_string().contains("send to partition 0 acknowledged on partition 1"), "{err}");
}

// ---- Property tests against a model log ----

const PARTITIONS: u32 = 2;

#[derive(Clone, Copy, Debug)]
enum Fate {
    Acked,
    Failed,
    UnknownWritten,
    UnknownLost,
}

#[derive(Clone, Debug)]
enum Action {
    Send { process: u32, partition: u32, fate: Fate },
    Poll { process: u32, partition: u32, records_max: u64 },
    Marker { partition: u32 },
}

fn action() -> impl Strategy<Value = Action> {
    let fate = prop_oneof![
        6 => Just(Fate::Acked),
        1 => Just(Fate::Failed),
        1 => Just(Fate::UnknownWritten),
        1 => Just(Fate::UnknownLost),
    ];
    prop_oneof![
        5 => (0u32..4, 0..PARTITIONS, fate).prop_map(|(process, partition, fate)| Action::Send { process, partition, fate }),
        4 => (0u32..4, 0..PARTITIONS, 1u64..6)
            .prop_map(|(process, partition, records_max)| Action::Poll { process, partition, records_max }),
        1 => (0..PARTITIONS).prop_map(|partition| Action::Marker { partition }),
    ]
}

/// Plays `actions` against a model log (per partition, `None` at a marker) and records what a
/// correct broker shows: sends, consecutive polls per (process, partition) with the current
/// high watermark, then a final read of each partition in polls of `chunk` offsets.
fn simulate(actions: &[Action], chunk: u64) -> History {
    let mut logs: Vec<Vec<Option<u64>>> = vec![Vec::new(); PARTITIONS as usize];
    let mut positions: HashMap<(u32, u32), u64> = HashMap::new();
    let mut rec = Rec::new();
    for (value, action) in (0u64..).zip(actions) {
        match *action {
            Action::Send { process, partition, fate } => {
                let log = &mut logs[partition as usize];
                let offset = log.len() as u64;
                let outcome = match fate {
                    Fate::Acked => acked(partition, offset),
                    Fate::Failed => SendOutcome::Failed,
                    Fate::UnknownWritten | Fate::UnknownLost => SendOutcome::Unknown,
                };
                if matches!(fate, Fate::Acked | Fate::UnknownWritten) {
                    log.push(Some(value));
                }
                rec.send(process, partition, value, outcome);
            }
            Action::Poll { process, partition, records_max } => {
                let log = &logs[partition as usize];
                let from = positions.entry((process, partition)).or_insert(0);
                let end = (*from + records_max).min(log.len() as u64);
                rec.poll(process, partition, *from, &log_records(log, *from, end), Some(log.len() as u64));
                *from = end;
            }
            Action::Marker { partition } => {
                let log = &mut logs[partition as usize];
                rec.gap(partition, log.len() as u64);
                log.push(None);
            }
        }
    }
    for (partition, log) in (0u32..).zip(&logs) {
        let mut from = 0;
        loop {
            let end = (from + chunk).min(log.len() as u64);
            rec.final_poll(partition, from, &log_records(log, from, end), Some(log.len() as u64));
            from = end;
            if from >= log.len() as u64 {
                break;
            }
        }
    }
    rec.history
}

fn log_records(log: &[Option<u64>], from: u64, end: u64) -> Vec<(u64, u64)> {
    (from..end).filter_map(|offset| Some((offset, log[offset as usize]?))).collect()
}

fn acked_values(history: &History) -> HashSet<Value> {
    let acked = |op: &Op| match op {
        Op::Send(send) => send.ack().map(|_| send.value),
        Op::Poll(_) | Op::Gap(_) => None,
    };
    history.ops.iter().filter_map(acked).collect()
}

/// Removes the first acknowledged value from the final read; returns it.
fn drop_acked_from_final_read(history: &mut History) -> Option<Value> {
    let acked = acked_values(history);
    for op in &mut history.ops {
        let Op::Poll(poll) = op else { continue };
        if !poll.final_read {
            continue;
        }
        if let Some(i) = poll.records.iter().position(|record| acked.contains(&record.1)) {
            return Some(poll.records.remove(i).1);
        }
    }
    None
}

/// Swaps the values at two offsets of one partition's final read, the first of them
/// acknowledged; returns that value.
fn swap_in_final_read(history: &mut History) -> Option<Value> {
    let acked = acked_values(history);
    let mut places: Vec<(usize, usize, PartitionId, Value)> = Vec::new();
    for (op_index, op) in history.ops.iter().enumerate() {
        let Op::Poll(poll) = op else { continue };
        if poll.final_read {
            places.extend(poll.records.iter().enumerate().map(|(i, record)| (op_index, i, poll.partition, record.1)));
        }
    }
    let a = places.iter().position(|place| acked.contains(&place.3))?;
    let b = places.iter().position(|place| place.2 == places[a].2 && place.3 != places[a].3)?;
    let (a, b) = (places[a], places[b]);
    for (to, value) in [(a, b.3), (b, a.3)] {
        if let Op::Poll(poll) = &mut history.ops[to.0] {
            poll.records[to.1].1 = value;
        }
    }
    Some(a.3)
}

fn arbitrary_op() -> impl Strategy<Value = Op> {
    let offset = || prop_oneof![0u64..6, Just(u64::MAX), Just(u64::MAX - 1)].prop_map(Offset);
    let value = || (0u64..6).prop_map(Value);
    let outcome = prop_oneof![
        (0u32..2, offset())
            .prop_map(|(partition, offset)| SendOutcome::Ok { partition: PartitionId(partition), offset }),
        Just(SendOutcome::Failed),
        Just(SendOutcome::Unknown),
    ];
    let send =
        (0u32..3, proptest::option::of(0u32..2), value(), 0u64..40, 0u64..40, outcome, proptest::option::of(0u64..2))
            .prop_map(|(process, partition, value, invoke_us, complete_us, outcome, key)| {
                Op::Send(SendOp {
                    process: ProcessId(process),
                    partition: partition.map(PartitionId),
                    key: key.map(Key),
                    value,
                    invoke_us,
                    complete_us,
                    outcome,
                })
            });
    let records = proptest::collection::vec((offset(), value()), 0..5);
    let poll = (0u32..3, 0u32..2, offset(), records, proptest::option::of(offset()), 0u64..40, any::<bool>()).prop_map(
        |(process, partition, from, records, high_watermark, invoke_us, final_read)| {
            Op::Poll(PollOp {
                process: ProcessId(process),
                partition: PartitionId(partition),
                from,
                records,
                high_watermark,
                invoke_us,
                complete_us: invoke_us + 3,
                final_read,
            })
        },
    );
    let gap = (0u32..2, offset())
        .prop_map(|(partition, offset)| Op::Gap(GapOp { partition: PartitionId(partition), offset }));
    prop_oneof![4 => send, 4 => poll, 1 => gap]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn prop_model_history_passes(actions in proptest::collection::vec(action(), 0..120), chunk in 1u64..8) {
        let history = simulate(&actions, chunk);
        let report = check(&history);
        prop_assert!(report.ok(), "{}", report);
        prop_assert!(report.not_run().is_empty(), "{}", report);
    }

    #[test]
    fn prop_dropping_an_acknowledged_value_from_the_final_read_fails(
        actions in proptest::collection::vec(action(), 1..120),
        chunk in 1u64..8,
    ) {
        let mut history = simulate(&actions, chunk);
        let dropped = drop_acked_from_final_read(&mut history);
        prop_assume!(dropped.is_some());
        let report = check(&history);
        prop_assert!(report.violated(Check::UnreadAck), "{}", report);
        prop_assert_eq!(report.violations(Check::UnreadAck)[0].values.first(), dropped.as_ref());
    }

    #[test]
    fn prop_swapping_two_values_in_the_final_read_fails(
        actions in proptest::collection::vec(action(), 1..120),
        chunk in 1u64..8,
    ) {
        let mut history = simulate(&actions, chunk);
        let swapped = swap_in_final_read(&mut history);
        prop_assume!(swapped.is_some());
        let report = check(&history);
        prop_assert!(report.violated(Check::InconsistentOffset), "{}", report);
        prop_assert!(report.violated(Check::Duplicate), "{}", report);
    }

    #[test]
    fn prop_arbitrary_history_never_panics(ops in proptest::collection::vec(arbitrary_op(), 0..40)) {
        let history = History { ops };
        let report = check(&history);
        prop_assert_eq!(report.results.len(), Check::ALL.len());
        let _ = report.to_string();
        let _ = serde_json::to_string(&report).expect("serializes");
        let mut bytes = Vec::new();
        history.write_json_lines(&mut bytes).expect("writes");
        match History::from_json_lines(&bytes[..]) {
            Ok(read) => prop_assert_eq!(read, history),
            Err(HistoryError::Invalid { .. }) => {}
            Err(err) => prop_assert!(false, "unexpected error {}", err),
        }
    }
}
