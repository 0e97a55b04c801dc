//! History checker: Jepsen-style checks of client histories recorded against a Skein broker
//! (by the simulator, chaos tests and `skein-loadgen verify`).
//!
//! A [`History`] lists what clients did and saw: [`Op::Send`] (a produce of one unique
//! [`Value`], with its invoke/complete times and its outcome), [`Op::Poll`] (one fetch: the
//! offset asked, the records returned, the high watermark reported) and [`Op::Gap`] (an offset
//! that legitimately holds no user value, such as a transaction marker). [`check`] runs every
//! [`Check`] over it (the list-append / queue model of a log, plus the session guarantees of
//! `acceptance/isolation_cases.md`) and returns a [`Report`] with one [`CheckResult`] per check,
//! in the fixed order of [`Check::ALL`].
//!
//! Conventions the checks rely on (the recorder's side of the contract):
//!
//! - Every send carries a value no other send of the history carries
//!   ([`History::from_json_lines`] rejects repeats; for a history built with [`History::push`]
//!   the first send of a value is taken as its writer).
//! - A [`ProcessId`] is one client session. Its polls of one partition are consecutive fetches,
//!   each asking for the offset after the last record it returned; a consumer that seeks or
//!   restarts from a committed offset is recorded under a new process id. A process's
//!   `final_read` polls form a session of their own (they restart from the log start), so a
//!   checker process may reuse a consumer's id for the final read.
//! - The final read of a partition is every `final_read` poll of it, together reading it from
//!   the log start to its end.
//! - Violations cite operations by their index in [`History::ops`] as `op #i`. In a JSON-lines
//!   file that is the line number minus one, unless the file holds blank lines.
//!
//! Cost: O(n log n) in the number of operations and records, memory proportional to the
//! distinct values and log positions seen; at most [`VIOLATIONS_KEPT_MAX`] violations are kept
//! per check (the rest are only counted). Nothing here panics on any history, however wrong.
//!
//! Consumer group histories (assignments, offset commits, committed-offset reads) have their
//! own record type and checks in [`groups`]; transactional histories (transactions and their
//! outcomes, reads in either isolation level) in [`txn`].
//!
//! Deliberately not done: no search for a linearization (unique values make the log order
//! directly visible), no transactions here (see [`txn`]) or fencing (histories do not record
//! epochs), no liveness (a history that stops early passes what it shows), and no dependency
//! on the simulator or the runtime: the module is std and serde only, so any recorder can use
//! it.

pub mod elle;
pub mod groups;
mod index;
mod rules;
#[cfg(test)]
mod tests;
pub mod txn;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};

use serde::{Deserialize, Serialize};

/// One client session (a producer or a consumer), as the recorder names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProcessId(pub u32);

/// A partition of the topic under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PartitionId(pub u32);

/// A position in one partition's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset after this one (saturating: offsets come from input, and `u64::MAX` must
    /// not panic).
    pub fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }
}

/// A record value: unique per send across the history, so it identifies its writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Value(pub u64);

/// A record key: only [`Check::KeyOrder`] uses it (a send without one takes part in no
/// per-key order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Key(pub u64);

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One recorded operation. As JSON it is one object tagged by `"op"`, e.g.
/// `{"op":"send","process":1,"partition":0,"value":17,"invoke_us":5,"complete_us":9,"outcome":{"status":"ok","partition":0,"offset":3}}`,
/// `{"op":"poll","process":2,"partition":0,"from":3,"records":[[3,17]],"high_watermark":4,"invoke_us":12,"complete_us":15,"final_read":false}`,
/// `{"op":"gap","partition":0,"offset":4}`. Unknown fields are rejected, so that a misspelt
/// field cannot silently weaken a check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A produce of one value.
    Send(SendOp),
    /// One fetch by a consumer (or by a producer reading its own writes).
    Poll(PollOp),
    /// A declaration that an offset holds no user value (a control or marker record): reads
    /// may pass over it, and no value may appear at it.
    Gap(GapOp),
}

/// A produce of one value: [`Op::Send`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendOp {
    /// The producer session.
    pub process: ProcessId,
    /// The partition the client aimed at, `None` if it does not know before the answer (the
    /// acknowledgement's partition is authoritative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionId>,
    /// The record key, if any (the per-key order check's unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
    /// The value sent, unique across the history.
    pub value: Value,
    /// When the client invoked the send (microseconds, any epoch shared by the history).
    pub invoke_us: u64,
    /// When the client got the answer (or gave up).
    pub complete_us: u64,
    /// What the client learnt.
    pub outcome: SendOutcome,
}

impl SendOp {
    /// Where the broker acknowledged the value, if it did.
    pub fn ack(&self) -> Option<(PartitionId, Offset)> {
        match self.outcome {
            SendOutcome::Ok { partition, offset } => Some((partition, offset)),
            SendOutcome::Failed | SendOutcome::Unknown => None,
        }
    }
}

/// The outcome of a send, tagged by `"status"` in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SendOutcome {
    /// Acknowledged: the value is in the log at this position.
    Ok {
        /// The partition written.
        partition: PartitionId,
        /// The offset assigned.
        offset: Offset,
    },
    /// Definitely not written (rejected with an error that guarantees it).
    Failed,
    /// Indeterminate (timeout, connection lost): may or may not be written.
    Unknown,
}

/// One fetch: [`Op::Poll`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollOp {
    /// The reading session.
    pub process: ProcessId,
    /// The partition fetched.
    pub partition: PartitionId,
    /// The fetch offset asked for.
    pub from: Offset,
    /// The records returned, in the order returned (JSON: `[[offset, value], ...]`). Control
    /// records are not listed; their offsets are declared with [`Op::Gap`].
    #[serde(default)]
    pub records: Vec<(Offset, Value)>,
    /// The exclusive end of the committed log the server reported, if the client saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_watermark: Option<Offset>,
    /// When the fetch was invoked.
    pub invoke_us: u64,
    /// When its answer arrived.
    pub complete_us: u64,
    /// Part of the end-of-test full read of the partition from the log start.
    #[serde(default)]
    pub final_read: bool,
}

/// An offset holding no user value: [`Op::Gap`]. Declaring it twice is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapOp {
    /// The partition.
    pub partition: PartitionId,
    /// The offset of the control or marker record.
    pub offset: Offset,
}

impl From<SendOp> for Op {
    fn from(op: SendOp) -> Op {
        Op::Send(op)
    }
}

impl From<PollOp> for Op {
    fn from(op: PollOp) -> Op {
        Op::Poll(op)
    }
}

impl From<GapOp> for Op {
    fn from(op: GapOp) -> Op {
        Op::Gap(op)
    }
}

/// A recorded history: operations in the order they were recorded (their index is how
/// violations name them; time order comes from `invoke_us` / `complete_us`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The operations.
    pub ops: Vec<Op>,
}

/// A history that could not be read ([`History::from_json_lines`]). Lines count from 1.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The reader failed (or the line is not UTF-8).
    #[error("history line {line}: read failed")]
    Io {
        /// The line being read.
        line: usize,
        /// The reader's error.
        #[source]
        source: std::io::Error,
    },
    /// The line is not one JSON [`Op`].
    #[error("history line {line}: not an operation")]
    Parse {
        /// The offending line.
        line: usize,
        /// What the JSON decoder objected to.
        #[source]
        source: serde_json::Error,
    },
    /// The line is an operation no correct recorder writes.
    #[error("history line {line}: {reason}")]
    Invalid {
        /// The offending line.
        line: usize,
        /// Why it is rejected.
        reason: String,
    },
}

impl HistoryError {
    /// The line (from 1) the error is about.
    pub fn line(&self) -> usize {
        match self {
            HistoryError::Io { line, .. } | HistoryError::Parse { line, .. } | HistoryError::Invalid { line, .. } => {
                *line
            }
        }
    }
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Appends an operation and returns its index (how violations will name it).
    pub fn push(&mut self, op: impl Into<Op>) -> usize {
        self.ops.push(op.into());
        self.ops.len() - 1
    }

    /// Reads a history written as JSON lines (one [`Op`] per line; blank lines are skipped).
    /// Besides malformed lines it rejects operations no correct recorder writes: one that
    /// completes before it is invoked, a send acknowledged on another partition than the one
    /// it named, and a second send of a value. Never panics on any input.
    pub fn from_json_lines(reader: impl Read) -> Result<History, HistoryError> {
        let mut history = History::new();
        let mut sent: HashMap<Value, usize> = HashMap::new();
        for (index, line) in BufReader::new(reader).lines().enumerate() {
            let line_number = index + 1;
            let text = line.map_err(|source| HistoryError::Io { line: line_number, source })?;
            if text.trim().is_empty() {
                continue;
            }
            let op: Op =
                serde_json::from_str(&text).map_err(|source| HistoryError::Parse { line: line_number, source })?;
            invalid_reason(&op, line_number, &mut sent)
                .map_or(Ok(()), |reason| Err(HistoryError::Invalid { line: line_number, reason }))?;
            history.ops.push(op);
        }
        Ok(history)
    }

    /// Writes the history as JSON lines, one [`Op`] per line (buffered internally).
    pub fn write_json_lines(&self, writer: impl Write) -> std::io::Result<()> {
        let mut out = BufWriter::new(writer);
        for op in &self.ops {
            serde_json::to_writer(&mut out, op)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

/// Why `op` (on `line`) is not something a correct recorder writes, if it is not; records the
/// values sent so far in `sent` (value to line).
fn invalid_reason(op: &Op, line: usize, sent: &mut HashMap<Value, usize>) -> Option<String> {
    let (invoke_us, complete_us) = match op {
        Op::Send(send) => (send.invoke_us, send.complete_us),
        Op::Poll(poll) => (poll.invoke_us, poll.complete_us),
        Op::Gap(_) => return None,
    };
    if complete_us < invoke_us {
        return Some(format!("completes at {complete_us} us, before it is invoked at {invoke_us} us"));
    }
    let Op::Send(send) = op else { return None };
    if let (Some(named), Some((acked, _))) = (send.partition, send.ack()) {
        if named != acked {
            return Some(format!("send to partition {named} acknowledged on partition {acked}"));
        }
    }
    match sent.entry(send.value) {
        Entry::Occupied(first) => {
            Some(format!("value {} already sent on line {} (values must be unique)", send.value, first.get()))
        }
        Entry::Vacant(slot) => {
            slot.insert(line);
            None
        }
    }
}

/// At most this many violations are kept per check; the rest are counted only.
pub const VIOLATIONS_KEPT_MAX: usize = 10_000;

/// At most this many violations are printed per check by `Report`'s `Display`.
const VIOLATIONS_PRINTED_MAX: usize = 5;

/// The checks, in report order. `name()` (and the serde form) is the stable kebab-case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// An acknowledged value was never read (anywhere), though a read session that started at
    /// or before its offset returned a later offset of that partition: the log moved past it.
    /// (A session that started beyond the offset proves nothing; a final read from the log
    /// start catches those through [`Check::UnreadAck`].)
    LostWrite,
    /// One (partition, offset) was seen (read or acknowledged) with two values, or a declared
    /// gap was seen holding a value.
    InconsistentOffset,
    /// One value was seen (read or acknowledged) at two positions.
    Duplicate,
    /// A value whose send definitely failed was read.
    AbortedRead,
    /// A session's poll of a partition returned an offset at or below one it had returned
    /// in an earlier poll (polls ordered by invoke time).
    NonmonotonicPoll,
    /// Between two consecutive polls of a session, the next poll's first offset lies beyond
    /// the offset after the last one returned, and some poll (anyone's) returned a value at a
    /// skipped offset. Declared gaps may be skipped.
    PollSkip,
    /// A producer's acknowledged sends to one partition, in invoke order, got offsets that do
    /// not increase. A keyed send that named no partition (routed by the broker's range map,
    /// perhaps redirected by a split or merge) is held to this per key only: records of two
    /// parents merged into one child have no order between them.
    NonmonotonicSend,
    /// An acknowledged value is missing from the final read of its partition. Not run (rather
    /// than passed) if a partition with acknowledged sends has no final read.
    UnreadAck,
    /// After a session's send of v was acknowledged at (p, o), a poll of p by the same session
    /// invoked later, fetching from at or below o, reported a high watermark at or below o, or
    /// returned offsets reaching o without v at o. (A poll whose records all lie below o, or
    /// that returned none, is taken as size-limited and only its high watermark is checked.)
    ReadAfterWrite,
    /// A session's reported high watermark of a partition fell below the log end it had already
    /// seen: an earlier high watermark, or an earlier poll's last offset + 1 if that poll
    /// reported none. Final reads are included (the committed log never shrinks).
    MonotonicRead,
    /// A poll was not a run of consecutive offsets starting at its fetch offset (passing over
    /// declared gaps only), or returned an offset at or above its own high watermark.
    ConsistentPrefix,
    /// Per-key order: two acknowledged sends of one key, A before B (A acknowledged before B
    /// was invoked, or both from one producer and A invoked first), reached a read session in
    /// the other order: the session was given B by a poll that completed before the poll
    /// that gave it A (or earlier in the same poll). Polls completing at the same microsecond
    /// in different operations are taken as unordered. This is what a consumer reading a
    /// topic whose partitions split and merge must keep: it reads a parent to its seal before
    /// its children. Final reads are left out (they read partition by partition).
    KeyOrder,
}

impl Check {
    /// Every check, in report order.
    pub const ALL: [Check; 12] = [
        Check::LostWrite,
        Check::InconsistentOffset,
        Check::Duplicate,
        Check::AbortedRead,
        Check::NonmonotonicPoll,
        Check::PollSkip,
        Check::NonmonotonicSend,
        Check::UnreadAck,
        Check::ReadAfterWrite,
        Check::MonotonicRead,
        Check::ConsistentPrefix,
        Check::KeyOrder,
    ];

    /// The stable kebab-case name, e.g. `"lost-write"`.
    pub fn name(self) -> &'static str {
        match self {
            Check::LostWrite => "lost-write",
            Check::InconsistentOffset => "inconsistent-offset",
            Check::Duplicate => "duplicate",
            Check::AbortedRead => "aborted-read",
            Check::NonmonotonicPoll => "nonmonotonic-poll",
            Check::PollSkip => "poll-skip",
            Check::NonmonotonicSend => "nonmonotonic-send",
            Check::UnreadAck => "unread-ack",
            Check::ReadAfterWrite => "read-after-write",
            Check::MonotonicRead => "monotonic-read",
            Check::ConsistentPrefix => "consistent-prefix",
            Check::KeyOrder => "key-order",
        }
    }

    /// What [`CheckResult::counted`] counts for this check (plural noun phrase).
    pub fn counted_unit(self) -> &'static str {
        match self {
            Check::LostWrite | Check::NonmonotonicSend | Check::UnreadAck => "acknowledged sends",
            Check::InconsistentOffset => "acknowledgements and records read",
            Check::Duplicate => "distinct values seen",
            Check::AbortedRead => "records read",
            Check::NonmonotonicPoll | Check::ConsistentPrefix => "polls",
            Check::PollSkip => "consecutive poll pairs",
            Check::ReadAfterWrite => "polls after own acknowledged sends",
            Check::MonotonicRead => "polls reporting a high watermark",
            Check::KeyOrder => "reads of keyed values",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One anomaly found by a check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// The check that found it.
    pub check: Check,
    /// The partition involved, if one is.
    pub partition: Option<PartitionId>,
    /// The offsets involved (the first is the main one).
    pub offsets: Vec<Offset>,
    /// The values involved (the first is the main one).
    pub values: Vec<Value>,
    /// The session involved, if one is (the writer for send-side checks, the reader otherwise).
    pub process: Option<ProcessId>,
    /// Indices into [`History::ops`] of the operations involved.
    pub ops: Vec<usize>,
    /// A sentence stating the anomaly, naming the operations as `op #i`.
    pub detail: String,
}

/// What a check concluded, tagged by `"status"` in JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CheckOutcome {
    /// Nothing wrong in what the history shows.
    Passed,
    /// Anomalies found.
    Failed {
        /// The first violations found, in a deterministic order (at most
        /// [`VIOLATIONS_KEPT_MAX`]).
        violations: Vec<Violation>,
        /// How many were found in all.
        violation_count: usize,
    },
    /// The history lacks what the check needs (e.g. no final read): neither a pass nor a
    /// failure.
    NotRun {
        /// What is missing.
        reason: String,
    },
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check.
    pub check: Check,
    /// Its conclusion.
    pub outcome: CheckOutcome,
    /// How many items it examined (units: [`Check::counted_unit`]).
    pub counted: usize,
}

impl CheckResult {
    /// The violations found (empty unless failed).
    pub fn violations(&self) -> &[Violation] {
        match &self.outcome {
            CheckOutcome::Failed { violations, .. } => violations,
            CheckOutcome::Passed | CheckOutcome::NotRun { .. } => &[],
        }
    }

    /// Whether the check failed.
    pub fn failed(&self) -> bool {
        matches!(self.outcome, CheckOutcome::Failed { .. })
    }
}

/// The results of every check, in the order of [`Check::ALL`]. `Display` prints one line per
/// check, each failed one followed by its first violations; serde gives the JSON form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// One result per check.
    pub results: Vec<CheckResult>,
}

impl Report {
    /// True if no check failed (checks that did not run do not count as failures; see
    /// [`Report::not_run`]).
    pub fn ok(&self) -> bool {
        !self.results.iter().any(CheckResult::failed)
    }

    /// Whether `check` failed.
    pub fn violated(&self, check: Check) -> bool {
        self.result(check).is_some_and(CheckResult::failed)
    }

    /// The result of `check` (always present in a report made by [`check`]).
    pub fn result(&self, check: Check) -> Option<&CheckResult> {
        self.results.iter().find(|result| result.check == check)
    }

    /// The violations `check` found.
    pub fn violations(&self, check: Check) -> &[Violation] {
        self.result(check).map_or(&[], CheckResult::violations)
    }

    /// The checks that could not run.
    pub fn not_run(&self) -> Vec<Check> {
        let not_run = |r: &&CheckResult| matches!(r.outcome, CheckOutcome::NotRun { .. });
        self.results.iter().filter(not_run).map(|r| r.check).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for result in &self.results {
            let (name, unit, counted) = (result.check.name(), result.check.counted_unit(), result.counted);
            match &result.outcome {
                CheckOutcome::Passed => writeln!(f, "{name:<20}PASS ({counted} {unit})")?,
                CheckOutcome::NotRun { reason } => writeln!(f, "{name:<20}NOT RUN: {reason}")?,
                CheckOutcome::Failed { violations, violation_count } => {
                    writeln!(f, "{name:<20}FAIL {violation_count} ({counted} {unit})")?;
                    for violation in violations.iter().take(VIOLATIONS_PRINTED_MAX) {
                        writeln!(f, "    {}", violation.detail)?;
                    }
                    let printed = violations.len().min(VIOLATIONS_PRINTED_MAX);
                    if *violation_count > printed {
                        writeln!(f, "    ... and {} more", violation_count - printed)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs every check over `history`. Deterministic: the same history gives the same report.
pub fn check(history: &History) -> Report {
    let index = index::Index::build(&history.ops);
    let results = Check::ALL.iter().map(|&c| rules::run(c, &index)).collect();
    Report { results }
}
