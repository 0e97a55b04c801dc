//! The checks, one function each, over an [`Index`]. Each walks acknowledgements, polls or
//! sessions in a deterministic order (operation order, or sorted keys), so reports are
//! reproducible; none loops over all operations per operation.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::index::{Ack, Index, Poll};
use super::{
    Check, CheckOutcome, CheckResult, Offset, Op, PartitionId, PollOp, ProcessId, SendOutcome, Value, Violation,
    VIOLATIONS_KEPT_MAX,
};

/// Runs one check.
pub(super) fn run(check: Check, ix: &Index<'_>) -> CheckResult {
    match check {
        Check::LostWrite => lost_write(ix),
        Check::InconsistentOffset => inconsistent_offset(ix),
        Check::Duplicate => duplicate(ix),
        Check::AbortedRead => aborted_read(ix),
        Check::NonmonotonicPoll => nonmonotonic_poll(ix),
        Check::PollSkip => poll_skip(ix),
        Check::NonmonotonicSend => nonmonotonic_send(ix),
        Check::UnreadAck => unread_ack(ix),
        Check::ReadAfterWrite => read_after_write(ix),
        Check::MonotonicRead => monotonic_read(ix),
        Check::ConsistentPrefix => consistent_prefix(ix),
        Check::KeyOrder => key_order(ix),
    }
}

/// Lost write: an acknowledged value never read, though some read session that started at or
/// before its offset returned an offset beyond it. (Requiring the session to have started at
/// or before the offset, rather than any read beyond it, keeps a consumer that starts in the
/// middle of the log from making every earlier value look lost; the final read, which starts
/// at the log start, still catches those.)
fn lost_write(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::LostWrite);
    let spans = Spans::build(ix);
    for ack in &ix.acks {
        found.counted += 1;
        if ix.read_values.contains(&ack.value) {
            continue;
        }
        let Some(span) = spans.past(ack.partition, ack.offset) else { continue };
        found.add(|| Violation {
            offsets: vec![ack.offset, span.last],
            values: vec![ack.value],
            ops: vec![ack.op, span.first_op, span.last_op],
            ..violation(
                ack.partition,
                Some(ack.process),
                format!(
                    "value {} acknowledged at partition {} offset {} (op #{}) was never read, though process {}, \
                     reading partition {} from offset {} (op #{}), went on to offset {} (op #{})",
                    ack.value,
                    ack.partition,
                    ack.offset,
                    ack.op,
                    span.process,
                    ack.partition,
                    span.from,
                    span.first_op,
                    span.last,
                    span.last_op
                ),
            )
        });
    }
    found.finish()
}

/// Inconsistent offset: one position seen with two values (reads and acknowledgements), or a
/// declared gap seen holding a value. Each (position, value) is reported once.
fn inconsistent_offset(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::InconsistentOffset);
    let mut first: HashMap<(PartitionId, Offset), Observation> = HashMap::new();
    let mut reported: HashSet<(PartitionId, Offset, Value)> = HashSet::new();
    for_each_observation(ix.ops, |seen| {
        found.counted += 1;
        let position = (seen.partition, seen.offset);
        if let Some(gap_op) = ix.gap(seen.partition, seen.offset) {
            if reported.insert((seen.partition, seen.offset, seen.value)) {
                found.add(|| Violation {
                    offsets: vec![seen.offset],
                    values: vec![seen.value],
                    ops: vec![gap_op, seen.op],
                    ..violation(
                        seen.partition,
                        Some(seen.process),
                        format!(
                            "partition {} offset {} is declared a gap (op #{gap_op}) but value {} was {} there (op #{})",
                            seen.partition,
                            seen.offset,
                            seen.value,
                            seen.verb(),
                            seen.op
                        ),
                    )
                });
            }
            return;
        }
        let earlier = *first.entry(position).or_insert(seen);
        if earlier.value == seen.value || !reported.insert((seen.partition, seen.offset, seen.value)) {
            return;
        }
        found.add(|| Violation {
            offsets: vec![seen.offset],
            values: vec![earlier.value, seen.value],
            ops: vec![earlier.op, seen.op],
            ..violation(
                seen.partition,
                Some(seen.process),
                format!(
                    "partition {} offset {} holds value {} ({} by op #{}) and value {} ({} by op #{})",
                    seen.partition,
                    seen.offset,
                    earlier.value,
                    earlier.verb(),
                    earlier.op,
                    seen.value,
                    seen.verb(),
                    seen.op
                ),
            )
        });
    });
    found.finish()
}

/// Duplicate: one value seen (read or acknowledged) at two positions. Each (value, position)
/// is reported once.
fn duplicate(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::Duplicate);
    let mut first: HashMap<Value, Observation> = HashMap::new();
    let mut reported: HashSet<(Value, PartitionId, Offset)> = HashSet::new();
    for_each_observation(ix.ops, |seen| {
        let earlier = *first.entry(seen.value).or_insert(seen);
        let same_position = (earlier.partition, earlier.offset) == (seen.partition, seen.offset);
        if same_position || !reported.insert((seen.value, seen.partition, seen.offset)) {
            return;
        }
        found.add(|| Violation {
            offsets: vec![earlier.offset, seen.offset],
            values: vec![seen.value],
            ops: vec![earlier.op, seen.op],
            ..violation(
                seen.partition,
                Some(seen.process),
                format!(
                    "value {} was {} at partition {} offset {} (op #{}) and {} at partition {} offset {} (op #{})",
                    seen.value,
                    earlier.verb(),
                    earlier.partition,
                    earlier.offset,
                    earlier.op,
                    seen.verb(),
                    seen.partition,
                    seen.offset,
                    seen.op
                ),
            )
        });
    });
    found.counted = first.len();
    found.finish()
}

/// Aborted read: a value whose send definitely failed appears in a read. Each value is
/// reported once, at its first read.
fn aborted_read(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::AbortedRead);
    let mut reported: HashSet<Value> = HashSet::new();
    for &(op, poll) in &ix.polls {
        for &(offset, value) in &poll.records {
            found.counted += 1;
            let Some((send_op, send)) = ix.send(value) else { continue };
            if send.outcome != SendOutcome::Failed || !reported.insert(value) {
                continue;
            }
            found.add(|| Violation {
                offsets: vec![offset],
                values: vec![value],
                ops: vec![send_op, op],
                ..violation(
                    poll.partition,
                    Some(poll.process),
                    format!(
                        "value {value}, whose send failed (op #{send_op}), was read at partition {} offset {offset} \
                         by process {} (op #{op})",
                        poll.partition, poll.process
                    ),
                )
            });
        }
    }
    found.finish()
}

/// Nonmonotonic poll: within a read session, a poll returns an offset at or below one an
/// earlier poll returned. One violation per offending poll.
fn nonmonotonic_poll(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::NonmonotonicPoll);
    for (process, partition, polls) in streams(ix) {
        let mut highest: Option<(Offset, usize)> = None;
        for (op, poll) in polls {
            found.counted += 1;
            if let Some((high, high_op)) = highest {
                if let Some(&(offset, value)) = poll.records.iter().find(|record| record.0 <= high) {
                    found.add(|| Violation {
                        offsets: vec![offset, high],
                        values: vec![value],
                        ops: vec![high_op, op],
                        ..violation(
                            partition,
                            Some(process),
                            format!(
                                "process {process} polled partition {partition} from offset {} (op #{op}) and got \
                                 offset {offset} (value {value}), not above offset {high} it already got (op #{high_op})",
                                poll.from
                            ),
                        )
                    });
                }
            }
            if let Some(last) = last_offset(poll) {
                if highest.is_none_or(|(high, _)| last > high) {
                    highest = Some((last, op));
                }
            }
        }
    }
    found.finish()
}

/// Poll skip: between consecutive polls of a read session, the next poll's first offset is
/// beyond the offset after the last one returned, and some read shows a value at a skipped
/// offset (declared gaps do not count).
fn poll_skip(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::PollSkip);
    for (process, partition, polls) in streams(ix) {
        let mut last: Option<(Offset, usize)> = None;
        for (op, poll) in polls {
            let Some(first) = poll.records.iter().map(|record| record.0).min() else { continue };
            if let Some((last, last_op)) = last {
                found.counted += 1;
                let skipped = last.next();
                let witness = ix.first_read_in(partition, skipped, first);
                if let Some((offset, (value, read_op))) =
                    witness.and_then(|o| Some((o, *ix.reads.get(&(partition, o))?)))
                {
                    found.add(|| Violation {
                        offsets: vec![offset, last, first],
                        values: vec![value],
                        ops: vec![last_op, op, read_op],
                        ..violation(
                            partition,
                            Some(process),
                            format!(
                                "process {process} skipped partition {partition} offsets {skipped}..={}: its poll op \
                                 #{last_op} ended at offset {last} and its next poll op #{op} (from {}) began at offset \
                                 {first}, but op #{read_op} read value {value} at offset {offset}",
                                first.0 - 1,
                                poll.from
                            ),
                        )
                    });
                }
            }
            if let Some(end) = last_offset(poll) {
                if last.is_none_or(|(last, _)| end > last) {
                    last = Some((end, op));
                }
            }
        }
    }
    found.finish()
}

/// Nonmonotonic send: one producer's acknowledged sends to one partition, in invoke order, got
/// offsets that do not increase (keyed sends that named no partition: per key).
fn nonmonotonic_send(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::NonmonotonicSend);
    let mut grouped: BTreeMap<(ProcessId, PartitionId, Option<super::Key>), Vec<&Ack>> = BTreeMap::new();
    for ack in &ix.acks {
        let key = if ack.aimed { None } else { ack.key };
        grouped.entry((ack.process, ack.partition, key)).or_default().push(ack);
    }
    for ((process, partition, _), mut acks) in grouped {
        acks.sort_by_key(|ack| (ack.invoke_us, ack.op));
        let mut highest: Option<&Ack> = None;
        for ack in acks {
            found.counted += 1;
            if let Some(high) = highest.filter(|high| ack.offset <= high.offset) {
                found.add(|| Violation {
                    offsets: vec![ack.offset, high.offset],
                    values: vec![ack.value, high.value],
                    ops: vec![high.op, ack.op],
                    ..violation(
                        partition,
                        Some(process),
                        format!(
                            "process {process} sent value {} to partition {partition} (op #{}, invoked at {} us) after \
                             value {} (op #{}, invoked at {} us), but got offset {}, not above {}",
                            ack.value, ack.op, ack.invoke_us, high.value, high.op, high.invoke_us, ack.offset, high.offset
                        ),
                    )
                });
            }
            if highest.is_none_or(|high| ack.offset > high.offset) {
                highest = Some(ack);
            }
        }
    }
    found.finish()
}

/// Unread acknowledgement: an acknowledged value missing from the final read of its partition.
/// Does not run (rather than pass) when some partition with acknowledged sends has no final
/// read.
fn unread_ack(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::UnreadAck);
    let finals = final_reads(ix);
    let mut unchecked: BTreeMap<PartitionId, usize> = BTreeMap::new();
    for ack in &ix.acks {
        let Some(read) = finals.get(&ack.partition) else {
            *unchecked.entry(ack.partition).or_default() += 1;
            continue;
        };
        found.counted += 1;
        if read.values.contains(&ack.value) {
            continue;
        }
        let end = read.last.map_or_else(|| "no records".to_string(), |last| format!("offsets up to {last}"));
        found.add(|| Violation {
            offsets: vec![ack.offset],
            values: vec![ack.value],
            ops: vec![ack.op, read.first_op, read.last_op],
            ..violation(
                ack.partition,
                Some(ack.process),
                format!(
                    "value {} acknowledged at partition {} offset {} (op #{}) is missing from the final read of \
                     partition {} (polls op #{} to op #{}, {end})",
                    ack.value, ack.partition, ack.offset, ack.op, ack.partition, read.first_op, read.last_op
                ),
            )
        });
    }
    let missing = if !unchecked.is_empty() {
        let partitions: Vec<String> = unchecked.keys().map(ToString::to_string).collect();
        let sends: usize = unchecked.values().sum();
        Some(format!("no final read of partition {} ({sends} acknowledged sends unchecked)", partitions.join(", ")))
    } else if finals.is_empty() {
        Some("the history has no final read".to_string())
    } else {
        None
    };
    found.finish_unless(missing)
}

/// Read-after-write: once a session's send of v is acknowledged at (p, o), each later poll of
/// p by the same session from at or below o reports a high watermark above o (if it reports
/// one) and, unless its records all lie below o (a size-limited fetch), returns v at o. One
/// violation per offending poll.
fn read_after_write(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::ReadAfterWrite);
    for (session, mut acks) in acks_by_session(ix) {
        let Some(polls) = ix.sessions.get(&session) else { continue };
        acks.sort_by_key(|ack| (ack.complete_us, ack.op));
        let mut acked: BTreeMap<Offset, &Ack> = BTreeMap::new();
        let mut next = 0;
        for &(op, poll) in polls {
            while let Some(&ack) = acks.get(next).filter(|ack| ack.complete_us < poll.invoke_us) {
                acked.insert(ack.offset, ack);
                next += 1;
            }
            let Some((_, &highest)) = acked.range(poll.from..).next_back() else { continue };
            found.counted += 1;
            if let Some(problem) = own_write_problem(&acked, highest, poll) {
                let (ack, text) = problem;
                found.add(|| Violation {
                    offsets: vec![ack.offset],
                    values: vec![ack.value],
                    ops: vec![ack.op, op],
                    ..violation(
                        ack.partition,
                        Some(ack.process),
                        format!(
                            "process {}'s send of value {} was acknowledged at partition {} offset {} (op #{}, \
                             completed at {} us), but its later poll op #{op} (from {}, invoked at {} us) {text}",
                            ack.process,
                            ack.value,
                            ack.partition,
                            ack.offset,
                            ack.op,
                            ack.complete_us,
                            poll.from,
                            poll.invoke_us
                        ),
                    )
                });
            }
        }
    }
    found.finish()
}

/// Monotonic reads: a session's reported high watermark of a partition never falls below the
/// log end it has already seen (an earlier high watermark, or an earlier poll's last offset + 1
/// when that poll reported none). Final reads are included: the log cannot shrink.
fn monotonic_read(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::MonotonicRead);
    for (&(process, partition), polls) in &ix.sessions {
        let mut seen: Option<(Offset, usize)> = None;
        for &(op, poll) in polls {
            if let Some(high_watermark) = poll.high_watermark {
                found.counted += 1;
                if let Some((end, end_op)) = seen.filter(|(end, _)| high_watermark < *end) {
                    found.add(|| Violation {
                        offsets: vec![high_watermark, end],
                        values: Vec::new(),
                        ops: vec![end_op, op],
                        ..violation(
                            partition,
                            Some(process),
                            format!(
                                "process {process}'s poll op #{op} of partition {partition} reported high watermark \
                                 {high_watermark}, below the log end {end} it had already seen (op #{end_op})"
                            ),
                        )
                    });
                }
            }
            let end = poll.high_watermark.or_else(|| last_offset(poll).map(Offset::next));
            if let Some(end) = end.filter(|&end| seen.is_none_or(|(seen, _)| end > seen)) {
                seen = Some((end, op));
            }
        }
    }
    found.finish()
}

/// Consistent prefix: each poll returns consecutive offsets from its fetch offset (passing only
/// over declared gaps), all below its own high watermark. With inconsistent-offset this makes
/// every read a prefix of one log per partition.
fn consistent_prefix(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::ConsistentPrefix);
    for &(op, poll) in &ix.polls {
        found.counted += 1;
        let head =
            format!("poll op #{op} (process {}, partition {}, from {})", poll.process, poll.partition, poll.from);
        let mut expected = poll.from;
        for &(offset, value) in &poll.records {
            if offset >= expected && ix.only_gaps(poll.partition, expected, offset) {
                expected = offset.next();
                continue;
            }
            let text = if offset < expected {
                format!("{head} returned offset {offset} (value {value}) where offset {expected} was due")
            } else {
                format!("{head} passed over offsets {expected}..{offset}, not declared gaps, to offset {offset} (value {value})")
            };
            found.add(|| Violation {
                offsets: vec![offset, expected],
                values: vec![value],
                ops: vec![op],
                ..violation(poll.partition, Some(poll.process), text)
            });
            break;
        }
        let Some(high_watermark) = poll.high_watermark else { continue };
        if let Some(&(offset, value)) = poll.records.iter().find(|record| record.0 >= high_watermark) {
            found.add(|| Violation {
                offsets: vec![offset, high_watermark],
                values: vec![value],
                ops: vec![op],
                ..violation(
                    poll.partition,
                    Some(poll.process),
                    format!("{head} returned offset {offset} (value {value}) at or above its high watermark {high_watermark}"),
                )
            });
        }
    }
    found.finish()
}

/// One keyed value as a session read it.
#[derive(Clone, Copy)]
struct KeyedRead<'i> {
    /// The poll's completion: the session's delivery order, ties unordered across polls.
    complete_us: u64,
    /// The poll's index in the history.
    op: usize,
    /// The record's place in the poll.
    place: usize,
    ack: &'i Ack,
}

/// Per-key order: within each read session (final reads left out), per key, a value must not
/// be delivered after one that was sent after it (see [`Check::KeyOrder`]). One sweep per
/// (session, key) in delivery order, keeping the latest invoke time of anything delivered so
/// far (overall and per producer): a read of A is out of order if something delivered before
/// it was invoked after A was acknowledged, or by A's own producer after A was invoked.
fn key_order(ix: &Index<'_>) -> CheckResult {
    let mut found = Found::new(Check::KeyOrder);
    let acks: HashMap<Value, &Ack> = ix.acks.iter().filter(|ack| ack.key.is_some()).map(|a| (a.value, a)).collect();
    let mut sessions: BTreeMap<(ProcessId, super::Key), Vec<KeyedRead<'_>>> = BTreeMap::new();
    let mut seen: HashSet<(ProcessId, Value)> = HashSet::new();
    for &(op, poll) in ix.polls.iter().filter(|(_, poll)| !poll.final_read) {
        for (place, &(_, value)) in poll.records.iter().enumerate() {
            let Some(&ack) = acks.get(&value) else { continue };
            let Some(key) = ack.key else { continue };
            if seen.insert((poll.process, value)) {
                let read = KeyedRead { complete_us: poll.complete_us, op, place, ack };
                sessions.entry((poll.process, key)).or_default().push(read);
            }
        }
    }
    for ((process, key), mut reads) in sessions {
        reads.sort_by_key(|read| (read.complete_us, read.op, read.place));
        // The latest invoke among reads delivered strictly before the current group of polls
        // (same completion time), and per producer.
        let mut latest: Option<KeyedRead<'_>> = None;
        let mut latest_by: HashMap<ProcessId, KeyedRead<'_>> = HashMap::new();
        let mut group_start = 0;
        while group_start < reads.len() {
            let at = reads[group_start].complete_us;
            let group_end = group_start + reads[group_start..].iter().take_while(|r| r.complete_us == at).count();
            let group = &reads[group_start..group_end];
            let mut i = 0;
            while i < group.len() {
                // One poll of the group: ordered within itself.
                let op = group[i].op;
                let poll_len = group[i..].iter().take_while(|r| r.op == op).count();
                let mut local: Option<KeyedRead<'_>> = latest;
                let mut local_by: HashMap<ProcessId, KeyedRead<'_>> = HashMap::new();
                for &read in &group[i..i + poll_len] {
                    found.counted += 1;
                    let a = read.ack;
                    let own = local_by
                        .get(&a.process)
                        .or_else(|| latest_by.get(&a.process))
                        .copied()
                        .filter(|b| b.ack.invoke_us > a.invoke_us);
                    let later = local.filter(|b| b.ack.invoke_us > a.complete_us);
                    if let Some(b) = own.or(later) {
                        found.add(|| key_order_violation(process, key, read, b));
                    }
                    if local.is_none_or(|l| a.invoke_us > l.ack.invoke_us) {
                        local = Some(read);
                    }
                    let mine = local_by.get(&a.process).or_else(|| latest_by.get(&a.process));
                    if mine.is_none_or(|m| a.invoke_us > m.ack.invoke_us) {
                        local_by.insert(a.process, read);
                    }
                }
                i += poll_len;
            }
            for read in group {
                let a = read.ack;
                if latest.is_none_or(|l| a.invoke_us > l.ack.invoke_us) {
                    latest = Some(*read);
                }
                if latest_by.get(&a.process).is_none_or(|m| a.invoke_us > m.ack.invoke_us) {
                    latest_by.insert(a.process, *read);
                }
            }
            group_start = group_end;
        }
    }
    found.finish()
}

fn key_order_violation(process: ProcessId, key: super::Key, read: KeyedRead<'_>, before: KeyedRead<'_>) -> Violation {
    let (a, b) = (read.ack, before.ack);
    let why = if a.process == b.process && b.invoke_us > a.invoke_us {
        format!("both sent by process {} and value {} invoked first", a.process, a.value)
    } else {
        format!(
            "value {} was acknowledged at {} us, before value {} was invoked at {} us",
            a.value, a.complete_us, b.value, b.invoke_us
        )
    };
    Violation {
        offsets: vec![a.offset, b.offset],
        values: vec![a.value, b.value],
        ops: vec![read.op, before.op, a.op, b.op],
        ..violation(
            a.partition,
            Some(process),
            format!(
                "process {process} read key {} out of order: value {} (partition {} offset {}, op #{}) after value {} \
                 (partition {} offset {}, op #{}), though {why} (sends op #{} and op #{})",
                key.0, a.value, a.partition, a.offset, read.op, b.value, b.partition, b.offset, before.op, a.op, b.op
            ),
        )
    }
}

/// The violations of one check, the first [`VIOLATIONS_KEPT_MAX`] kept.
struct Found {
    check: Check,
    counted: usize,
    violations: Vec<Violation>,
    violation_count: usize,
}

impl Found {
    fn new(check: Check) -> Found {
        Found { check, counted: 0, violations: Vec::new(), violation_count: 0 }
    }

    /// Counts a violation, building it (text included) only if it is kept.
    fn add(&mut self, make: impl FnOnce() -> Violation) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_KEPT_MAX {
            let mut violation = make();
            violation.check = self.check;
            self.violations.push(violation);
        }
    }

    fn finish(self) -> CheckResult {
        self.finish_unless(None)
    }

    /// Failed if anything was found, else not run if `missing` names what the check lacked,
    /// else passed.
    fn finish_unless(self, missing: Option<String>) -> CheckResult {
        let outcome = match (self.violation_count, missing) {
            (0, None) => CheckOutcome::Passed,
            (0, Some(reason)) => CheckOutcome::NotRun { reason },
            (violation_count, _) => CheckOutcome::Failed { violations: self.violations, violation_count },
        };
        CheckResult { check: self.check, outcome, counted: self.counted }
    }
}

/// A violation with the given partition, process and text; the caller fills in offsets,
/// values and ops, and [`Found::add`] sets the check.
fn violation(partition: PartitionId, process: Option<ProcessId>, detail: String) -> Violation {
    Violation {
        check: Check::LostWrite,
        partition: Some(partition),
        offsets: Vec::new(),
        values: Vec::new(),
        process,
        ops: Vec::new(),
        detail,
    }
}

/// A value seen at a position: acknowledged by a send, or returned by a poll.
#[derive(Clone, Copy)]
struct Observation {
    op: usize,
    process: ProcessId,
    partition: PartitionId,
    offset: Offset,
    value: Value,
    read: bool,
}

impl Observation {
    fn verb(&self) -> &'static str {
        if self.read {
            "read"
        } else {
            "acknowledged"
        }
    }
}

/// Calls `f` on every acknowledgement and every record read, in operation order.
fn for_each_observation(ops: &[Op], mut f: impl FnMut(Observation)) {
    for (op, item) in ops.iter().enumerate() {
        match item {
            Op::Send(send) => {
                if let Some((partition, offset)) = send.ack() {
                    f(Observation { op, process: send.process, partition, offset, value: send.value, read: false });
                }
            }
            Op::Poll(poll) => {
                for &(offset, value) in &poll.records {
                    let (process, partition) = (poll.process, poll.partition);
                    f(Observation { op, process, partition, offset, value, read: true });
                }
            }
            Op::Gap(_) => {}
        }
    }
}

/// The highest offset a poll returned.
fn last_offset(poll: &PollOp) -> Option<Offset> {
    poll.records.iter().map(|record| record.0).max()
}

/// Read sessions: each (process, partition)'s polls in time order, the final-read polls
/// apart from the others (a final read restarts from the log start).
fn streams<'i, 'h>(ix: &'i Index<'h>) -> impl Iterator<Item = (ProcessId, PartitionId, Vec<Poll<'h>>)> + 'i {
    ix.sessions.iter().flat_map(|(&(process, partition), polls)| {
        [false, true].into_iter().filter_map(move |final_read| {
            let stream: Vec<Poll<'h>> =
                polls.iter().copied().filter(|(_, poll)| poll.final_read == final_read).collect();
            (!stream.is_empty()).then_some((process, partition, stream))
        })
    })
}

/// Acknowledged sends grouped by (process, partition), each group in operation order.
fn acks_by_session<'i>(ix: &'i Index<'_>) -> BTreeMap<(ProcessId, PartitionId), Vec<&'i Ack>> {
    let mut grouped: BTreeMap<(ProcessId, PartitionId), Vec<&Ack>> = BTreeMap::new();
    for ack in &ix.acks {
        grouped.entry((ack.process, ack.partition)).or_default().push(ack);
    }
    grouped
}

/// What a poll did wrong about the session's own acknowledged writes (`acked`, by offset;
/// `highest` is the highest at or above the poll's fetch offset): the acknowledgement it
/// contradicts, and how.
fn own_write_problem<'a>(
    acked: &BTreeMap<Offset, &'a Ack>,
    highest: &'a Ack,
    poll: &PollOp,
) -> Option<(&'a Ack, String)> {
    if let Some(high_watermark) = poll.high_watermark.filter(|&hw| hw <= highest.offset) {
        return Some((
            highest,
            format!("reported high watermark {high_watermark}, not above offset {}", highest.offset),
        ));
    }
    let reach = last_offset(poll).filter(|&reach| reach >= poll.from)?;
    let sorted = poll.records.is_sorted_by_key(|record| record.0);
    let missing = acked.range(poll.from..=reach).map(|(_, &ack)| ack).find(|ack| !holds(poll, sorted, ack))?;
    Some((
        missing,
        format!("returned offsets up to {reach} without value {} at offset {}", missing.value, missing.offset),
    ))
}

/// Whether the poll returned `ack`'s value at `ack`'s offset (binary search if its records
/// are sorted by offset, as they are unless consistent-prefix fails).
fn holds(poll: &PollOp, sorted: bool, ack: &Ack) -> bool {
    if !sorted {
        return poll.records.contains(&(ack.offset, ack.value));
    }
    let start = poll.records.partition_point(|record| record.0 < ack.offset);
    poll.records[start..].iter().take_while(|record| record.0 == ack.offset).any(|record| record.1 == ack.value)
}

/// A partition's final read: every `final_read` poll of it.
struct FinalRead {
    values: HashSet<Value>,
    first_op: usize,
    last_op: usize,
    last: Option<Offset>,
}

fn final_reads(ix: &Index<'_>) -> HashMap<PartitionId, FinalRead> {
    let mut finals: HashMap<PartitionId, FinalRead> = HashMap::new();
    for &(op, poll) in ix.polls.iter().filter(|(_, poll)| poll.final_read) {
        let read = finals.entry(poll.partition).or_insert_with(|| FinalRead {
            values: HashSet::new(),
            first_op: op,
            last_op: op,
            last: None,
        });
        read.values.extend(poll.records.iter().map(|record| record.1));
        read.last_op = op;
        read.last = read.last.max(last_offset(poll));
    }
    finals
}

/// A read session's extent: from the lowest offset it asked for to the highest it got.
struct Span {
    process: ProcessId,
    from: Offset,
    last: Offset,
    /// The (first) poll asking for `from`.
    first_op: usize,
    /// The (first) poll returning `last`.
    last_op: usize,
}

/// Per partition, the read sessions' spans sorted by `from`, with the running maximum of
/// `last`, so "did a session that started at or before o go past o?" is a binary search.
struct Spans {
    by_partition: HashMap<PartitionId, (Vec<Span>, Vec<usize>)>,
}

impl Spans {
    fn build(ix: &Index<'_>) -> Spans {
        let mut by_partition: HashMap<PartitionId, (Vec<Span>, Vec<usize>)> = HashMap::new();
        for (process, partition, polls) in streams(ix) {
            let Some((from, first_op)) = polls.iter().map(|&(op, poll)| (poll.from, op)).min() else { continue };
            let reached = polls.iter().filter_map(|&(op, poll)| Some((last_offset(poll)?, op)));
            let Some((last, last_op)) = reached.max_by_key(|&(last, op)| (last, std::cmp::Reverse(op))) else {
                continue;
            };
            let span = Span { process, from, last, first_op, last_op };
            by_partition.entry(partition).or_default().0.push(span);
        }
        for (spans, running_max) in by_partition.values_mut() {
            spans.sort_by_key(|span| (span.from, span.first_op));
            let mut best = 0;
            for (i, span) in spans.iter().enumerate() {
                if span.last > spans[best].last {
                    best = i;
                }
                running_max.push(best);
            }
        }
        Spans { by_partition }
    }

    /// A session that started at or before `offset` of `partition` and got an offset beyond it.
    fn past(&self, partition: PartitionId, offset: Offset) -> Option<&Span> {
        let (spans, running_max) = self.by_partition.get(&partition)?;
        let started = spans.partition_point(|span| span.from <= offset);
        let best = &spans[*running_max.get(started.checked_sub(1)?)?];
        (best.last > offset).then_some(best)
    }
}
