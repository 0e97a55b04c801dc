//! Transaction history checks: Jepsen's anomalies of Kafka-style transactions (the Kafka
//! analysis of `REFERENCES.md`), over what transactional producers attempted and how each
//! ended, and what consumers read in either isolation level, at which offsets.
//!
//! A [`TxnHistory`] holds [`TxnOp::Txn`] (one transaction attempt of a producer: its writes,
//! one unique value each, with the offset the partition acknowledged; the values it read, in
//! read_committed, before writing; when its end was invoked and how it ended) and
//! [`TxnOp::Poll`] (one fetch: its isolation level, the offset asked, the position after it —
//! markers and filtered batches included — and the records returned). The checks, by stable
//! kebab-case name ([`TxnCheck::name`]):
//!
//! - `txn-aborted-read` (G1a): a read_committed poll returned a value of an aborted
//!   transaction, or a value no transaction wrote.
//! - `txn-intermediate-read` (G1b): a read_committed poll returned a value of a transaction
//!   before that transaction was asked to commit (the poll completed before the commit was
//!   invoked, or the producer never asked to commit it).
//! - `txn-torn` (a committed transaction seen partly): a read_committed session (one process;
//!   the final read is one session) returned a value of transaction T in one partition, and
//!   in another partition of T it *covered* the offset of T's write there (a poll with
//!   `from <= offset < next`) without returning that write's value. The offset of a write is
//!   the one its acknowledgement gave or any poll showed. For the final read a write of T
//!   with no known offset also counts when the final read returned another of T's values and
//!   read the write's partition: it never showed up.
//! - `txn-lost-write`: a write of a committed transaction (acknowledged, the commit
//!   acknowledged) is missing from the final read of its partition, though acknowledged
//!   below where that read ended.
//! - `txn-duplicate`: a value at two offsets (in any polls, either isolation level).
//! - `txn-g1c`: a cycle of write-read edges (T2 read, read_committed, a value of T1) and
//!   write-write edges between transactions ordered in real time (T1's record precedes T2's
//!   in a partition and T1 completed before T2 was invoked). Each edge orders T1's commit
//!   decision before T2's, so a cycle is impossible in a correct run.
//! - `txn-g0` (informational, never fails): cycles of write-write edges of the log order
//!   alone (T1's record precedes T2's in one partition, T2's precedes T1's in another).
//!   Kafka does not isolate concurrent transactions, and neither does Skein: these are
//!   allowed and counted, so a change in their frequency is visible.
//!
//! Exactly-once pipelines (consume-transform-produce): a transaction may carry what it
//! consumed ([`TxnConsumed`]: a group's committed offset of an input partition it started
//! from, the input records it read, the offset it committed in the transaction; its write
//! `i` is the transform of input `i`), and [`TxnOp::OffsetRead`] records a read of a group's
//! committed offset (OffsetFetch with require_stable). Two more checks:
//!
//! - `txn-exactly-once`: no input has two transforms read_committed (in any polls), and at
//!   the end (the final offset read and the final read of every partition) each input below
//!   the group's final committed offset has exactly one transform, of that very record, and
//!   no input at or above it has any; the committed offset is not beyond the input's end.
//! - `txn-offset-atomicity`: a committed offset is only observed together with the outputs
//!   of a transaction that committed it: every read of offset O names a transaction that
//!   committed O (consumed up to O), was not aborted, was asked to commit before the read
//!   returned, and has all its outputs in the final read; and a group's committed offset
//!   never goes back in real time (a read that began after another returned sees at least
//!   its offset).
//!
//! Transactions whose outcome is unknown are neither committed nor aborted: their values may
//! appear (they count as committed for torn reads when seen) or not.
//!
//! Like the log checks this is std and serde only and never panics on a history. Not done:
//! read_uncommitted anomalies (it promises nothing beyond the log's own checks), liveness,
//! group membership (pipelines commit as a group without members, so two instances of one
//! pipeline are told apart by their transactional id's epoch alone, not by KIP-447's member
//! epoch).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Offset, PartitionId, ProcessId, Value, VIOLATIONS_KEPT_MAX};

/// How a transaction ended, as its producer learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnOutcome {
    /// The commit was acknowledged.
    Committed,
    /// It aborted: the abort was acknowledged, or a write or the commit was refused for sure
    /// and the producer then aborted (or was fenced, its coordinator aborting it).
    Aborted,
    /// The producer never learnt (it crashed, or gave up on the end).
    Unknown,
}

/// A fetch's isolation level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Up to the last stable offset, aborted transactions filtered.
    ReadCommitted,
    /// Up to the high watermark, everything.
    ReadUncommitted,
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnWrite {
    /// The partition.
    pub partition: PartitionId,
    /// The value (unique in the history).
    pub value: Value,
    /// The offset its acknowledgement gave (`None`: not acknowledged).
    pub offset: Option<Offset>,
}

/// What a consume-transform-produce transaction consumed and the offset it committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnConsumed {
    /// The consumer group whose offset the transaction commits.
    pub group: String,
    /// The input partition.
    pub partition: PartitionId,
    /// The group's committed offset the transaction started reading from.
    pub from: Offset,
    /// The offset it commits (the position after its last input).
    pub to: Offset,
    /// The input records it read, in `from..to`: the transaction's write `i` is the
    /// transform of input `i`.
    pub inputs: Vec<(Offset, Value)>,
}

/// One recorded transactional operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TxnOp {
    /// One transaction attempt.
    Txn {
        /// The producer instance.
        process: ProcessId,
        /// The writes it attempted.
        writes: Vec<TxnWrite>,
        /// Values it read (read_committed) inside the transaction, before its writes.
        reads: Vec<Value>,
        /// When it began.
        invoke_us: u64,
        /// When its commit was first invoked (`None`: never asked to commit).
        commit_us: Option<u64>,
        /// When the producer learnt its outcome (or gave up).
        complete_us: u64,
        /// The outcome.
        outcome: TxnOutcome,
        /// What it consumed (a pipeline's transaction) or `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        consumed: Option<TxnConsumed>,
    },
    /// A read of a group's committed offset of one partition (OffsetFetch, require_stable).
    OffsetRead {
        /// The reader.
        process: ProcessId,
        /// The group.
        group: String,
        /// The (input) partition.
        partition: PartitionId,
        /// The committed offset (`None`: the group has none).
        offset: Option<Offset>,
        /// When the read was invoked.
        invoke_us: u64,
        /// When its answer arrived.
        complete_us: u64,
        /// Part of the end-of-test read.
        final_read: bool,
    },
    /// One fetch of one partition.
    Poll {
        /// The consumer session.
        process: ProcessId,
        /// The partition.
        partition: PartitionId,
        /// The isolation level.
        isolation: Isolation,
        /// The offset asked.
        from: Offset,
        /// The position after the poll: every offset in `from..next` was read (returned,
        /// filtered as aborted, or a marker).
        next: Offset,
        /// The records returned.
        records: Vec<(Offset, Value)>,
        /// When the poll was invoked.
        invoke_us: u64,
        /// When its answer arrived.
        complete_us: u64,
        /// Part of the end-of-test read (read_committed, every partition from its start,
        /// after every fault healed).
        final_read: bool,
    },
}

/// A transaction history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnHistory {
    /// The operations, in the order recorded.
    pub ops: Vec<TxnOp>,
}

impl TxnHistory {
    /// Records an operation.
    pub fn push(&mut self, op: TxnOp) {
        self.ops.push(op);
    }
}

/// A transaction check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TxnCheck {
    /// G1a.
    TxnAbortedRead,
    /// G1b.
    TxnIntermediateRead,
    /// A committed transaction seen partly.
    TxnTorn,
    /// A committed write missing at the end.
    TxnLostWrite,
    /// A value at two offsets.
    TxnDuplicate,
    /// A cycle of write-read and real-time write-write edges.
    TxnG1c,
    /// Write-write cycles of the log order (informational).
    TxnG0,
    /// Each pipeline input transformed once, below the committed offset only.
    TxnExactlyOnce,
    /// A committed offset seen only with its transaction's outputs; never going back.
    TxnOffsetAtomicity,
}

impl TxnCheck {
    /// Every check, in report order.
    pub const ALL: [TxnCheck; 9] = [
        TxnCheck::TxnAbortedRead,
        TxnCheck::TxnIntermediateRead,
        TxnCheck::TxnTorn,
        TxnCheck::TxnLostWrite,
        TxnCheck::TxnDuplicate,
        TxnCheck::TxnG1c,
        TxnCheck::TxnG0,
        TxnCheck::TxnExactlyOnce,
        TxnCheck::TxnOffsetAtomicity,
    ];

    /// The stable kebab-case name, e.g. `"txn-aborted-read"`.
    pub fn name(self) -> &'static str {
        match self {
            TxnCheck::TxnAbortedRead => "txn-aborted-read",
            TxnCheck::TxnIntermediateRead => "txn-intermediate-read",
            TxnCheck::TxnTorn => "txn-torn",
            TxnCheck::TxnLostWrite => "txn-lost-write",
            TxnCheck::TxnDuplicate => "txn-duplicate",
            TxnCheck::TxnG1c => "txn-g1c",
            TxnCheck::TxnG0 => "txn-g0",
            TxnCheck::TxnExactlyOnce => "txn-exactly-once",
            TxnCheck::TxnOffsetAtomicity => "txn-offset-atomicity",
        }
    }

    /// Whether the check only counts (it never fails a history).
    pub fn informational(self) -> bool {
        self == TxnCheck::TxnG0
    }
}

impl fmt::Display for TxnCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One check's result (violations cite operations as `op #i`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnCheckResult {
    /// The check.
    pub check: TxnCheck,
    /// How many items it examined.
    pub counted: usize,
    /// The anomalies found (the first ones).
    pub violations: Vec<String>,
    /// How many were found in all.
    pub violation_count: usize,
}

impl TxnCheckResult {
    /// Whether the check failed (informational checks never do).
    pub fn failed(&self) -> bool {
        self.violation_count > 0 && !self.check.informational()
    }

    fn new(check: TxnCheck) -> TxnCheckResult {
        TxnCheckResult { check, counted: 0, violations: Vec::new(), violation_count: 0 }
    }

    fn add(&mut self, v: String) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_KEPT_MAX {
            self.violations.push(v);
        }
    }
}

/// The results of every transaction check, in the order of [`TxnCheck::ALL`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnReport {
    /// One result per check (empty for an empty history).
    pub results: Vec<TxnCheckResult>,
}

impl TxnReport {
    /// True if no check failed.
    pub fn ok(&self) -> bool {
        !self.results.iter().any(TxnCheckResult::failed)
    }

    /// Whether `check` found anomalies.
    pub fn violated(&self, check: TxnCheck) -> bool {
        self.results.iter().any(|r| r.check == check && r.violation_count > 0)
    }
}

impl fmt::Display for TxnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            if r.failed() {
                writeln!(f, "{:<24}FAIL {} ({} examined)", r.check.name(), r.violation_count, r.counted)?;
                for v in r.violations.iter().take(5) {
                    writeln!(f, "    {v}")?;
                }
            } else if r.violation_count > 0 {
                writeln!(f, "{:<24}INFO {} ({} examined)", r.check.name(), r.violation_count, r.counted)?;
            } else {
                writeln!(f, "{:<24}PASS ({} examined)", r.check.name(), r.counted)?;
            }
        }
        Ok(())
    }
}

/// Runs every transaction check over `history`. Deterministic.
pub fn check_txns(history: &TxnHistory) -> TxnReport {
    if history.ops.is_empty() {
        return TxnReport::default();
    }
    let ix = Index::new(history);
    let results = TxnCheck::ALL
        .iter()
        .map(|&c| match c {
            TxnCheck::TxnAbortedRead => aborted_read(&ix),
            TxnCheck::TxnIntermediateRead => intermediate_read(&ix),
            TxnCheck::TxnTorn => torn(&ix),
            TxnCheck::TxnLostWrite => lost_write(&ix),
            TxnCheck::TxnDuplicate => duplicate(&ix),
            TxnCheck::TxnG1c => g1c(&ix),
            TxnCheck::TxnG0 => g0(&ix),
            TxnCheck::TxnExactlyOnce => exactly_once(&ix),
            TxnCheck::TxnOffsetAtomicity => offset_atomicity(&ix),
        })
        .collect();
    TxnReport { results }
}

/// A transaction as the checks see it.
struct Txn<'a> {
    op: usize,
    writes: &'a [TxnWrite],
    reads: &'a [Value],
    invoke_us: u64,
    commit_us: Option<u64>,
    complete_us: u64,
    outcome: TxnOutcome,
    consumed: Option<&'a TxnConsumed>,
}

/// A read of a committed offset as the checks see it.
struct OffsetRead<'a> {
    op: usize,
    group: &'a str,
    partition: PartitionId,
    offset: Option<Offset>,
    invoke_us: u64,
    complete_us: u64,
    final_read: bool,
}

/// A pipeline's input: (group, input partition, input offset).
type Source<'a> = (&'a str, PartitionId, Offset);

/// A poll as the checks see it.
struct Poll<'a> {
    op: usize,
    process: ProcessId,
    partition: PartitionId,
    isolation: Isolation,
    from: Offset,
    next: Offset,
    records: &'a [(Offset, Value)],
    complete_us: u64,
    final_read: bool,
}

/// The final read's session key (its polls form one session whatever their process ids).
const FINAL_SESSION: Option<ProcessId> = None;

struct Index<'a> {
    txns: Vec<Txn<'a>>,
    polls: Vec<Poll<'a>>,
    /// Value -> (transaction index, write index).
    writer: HashMap<Value, (usize, usize)>,
    /// Value -> the offsets it was seen or acknowledged at.
    offsets: HashMap<Value, BTreeSet<Offset>>,
    /// Partition -> the final read's records.
    final_read: BTreeMap<PartitionId, BTreeMap<Offset, Value>>,
    /// Partition -> where the final read ended (it stops at the last stable offset).
    final_end: BTreeMap<PartitionId, Offset>,
    offset_reads: Vec<OffsetRead<'a>>,
    /// A pipeline's output value -> (its transaction, the input it transforms).
    output: HashMap<Value, (usize, usize)>,
}

impl<'a> Index<'a> {
    fn new(h: &'a TxnHistory) -> Index<'a> {
        let mut ix = Index {
            txns: Vec::new(),
            polls: Vec::new(),
            writer: HashMap::new(),
            offsets: HashMap::new(),
            final_read: BTreeMap::new(),
            final_end: BTreeMap::new(),
            offset_reads: Vec::new(),
            output: HashMap::new(),
        };
        for (op, o) in h.ops.iter().enumerate() {
            match o {
                TxnOp::Txn { writes, reads, invoke_us, commit_us, complete_us, outcome, consumed, .. } => {
                    let t = ix.txns.len();
                    for (w, write) in writes.iter().enumerate() {
                        ix.writer.entry(write.value).or_insert((t, w));
                        if let Some(off) = write.offset {
                            ix.offsets.entry(write.value).or_default().insert(off);
                        }
                        if consumed.as_ref().is_some_and(|c| w < c.inputs.len()) {
                            ix.output.entry(write.value).or_insert((t, w));
                        }
                    }
                    ix.txns.push(Txn {
                        op,
                        writes,
                        reads,
                        invoke_us: *invoke_us,
                        commit_us: *commit_us,
                        complete_us: *complete_us,
                        outcome: *outcome,
                        consumed: consumed.as_ref(),
                    });
                }
                TxnOp::OffsetRead { group, partition, offset, invoke_us, complete_us, final_read, .. } => {
                    ix.offset_reads.push(OffsetRead {
                        op,
                        group,
                        partition: *partition,
                        offset: *offset,
                        invoke_us: *invoke_us,
                        complete_us: *complete_us,
                        final_read: *final_read,
                    });
                }
                TxnOp::Poll { process, partition, isolation, from, next, records, complete_us, final_read, .. } => {
                    for &(off, v) in records {
                        ix.offsets.entry(v).or_default().insert(off);
                        if *final_read {
                            ix.final_read.entry(*partition).or_default().insert(off, v);
                        }
                    }
                    if *final_read {
                        ix.final_read.entry(*partition).or_default();
                        let end = ix.final_end.entry(*partition).or_insert(*next);
                        *end = (*end).max(*next);
                    }
                    ix.polls.push(Poll {
                        op,
                        process: *process,
                        partition: *partition,
                        isolation: *isolation,
                        from: *from,
                        next: *next,
                        records,
                        complete_us: *complete_us,
                        final_read: *final_read,
                    });
                }
            }
        }
        ix
    }

    fn committed_polls(&self) -> impl Iterator<Item = &Poll<'a>> {
        self.polls.iter().filter(|p| p.isolation == Isolation::ReadCommitted)
    }

    /// The input a pipeline's output value transforms, and that input's value.
    fn source(&self, v: Value) -> Option<(Source<'a>, Value)> {
        let &(t, k) = self.output.get(&v)?;
        let c = self.txns[t].consumed?;
        let &(offset, value) = c.inputs.get(k)?;
        Some(((c.group.as_str(), c.partition, offset), value))
    }

    fn session(p: &Poll<'_>) -> Option<ProcessId> {
        if p.final_read {
            FINAL_SESSION
        } else {
            Some(p.process)
        }
    }
}

fn aborted_read(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnAbortedRead);
    for p in ix.committed_polls() {
        for &(off, v) in p.records {
            r.counted += 1;
            match ix.writer.get(&v) {
                None => r.add(format!(
                    "op #{} (read_committed, partition {}) returned value {v} at offset {off}, which no transaction wrote",
                    p.op, p.partition
                )),
                Some(&(t, _)) if ix.txns[t].outcome == TxnOutcome::Aborted => r.add(format!(
                    "op #{} (read_committed, partition {}) returned value {v} at offset {off} of the aborted transaction op #{}",
                    p.op, p.partition, ix.txns[t].op
                )),
                Some(_) => {}
            }
        }
    }
    r
}

fn intermediate_read(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnIntermediateRead);
    for p in ix.committed_polls() {
        for &(off, v) in p.records {
            let Some(&(t, _)) = ix.writer.get(&v) else { continue };
            let txn = &ix.txns[t];
            if txn.outcome == TxnOutcome::Aborted {
                continue; // an aborted read, reported there
            }
            r.counted += 1;
            match txn.commit_us {
                Some(c) if c <= p.complete_us => {}
                Some(c) => r.add(format!(
                    "op #{} (read_committed, partition {}) returned value {v} at offset {off} at {} us, before its transaction op #{} was asked to commit (at {c} us)",
                    p.op, p.partition, p.complete_us, txn.op
                )),
                None => r.add(format!(
                    "op #{} (read_committed, partition {}) returned value {v} at offset {off} of transaction op #{}, which its producer never asked to commit",
                    p.op, p.partition, txn.op
                )),
            }
        }
    }
    r
}

fn torn(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnTorn);
    // Per session: the transactions it saw (and where), its covered ranges per partition,
    // and the values it returned.
    struct Session<'b> {
        seen: BTreeMap<usize, (usize, PartitionId)>,
        covered: BTreeMap<PartitionId, Vec<(Offset, Offset, usize)>>,
        returned: BTreeSet<Value>,
        _p: std::marker::PhantomData<&'b ()>,
    }
    let mut sessions: BTreeMap<Option<ProcessId>, Session<'_>> = BTreeMap::new();
    for p in ix.committed_polls() {
        let s = sessions.entry(Index::session(p)).or_insert_with(|| Session {
            seen: BTreeMap::new(),
            covered: BTreeMap::new(),
            returned: BTreeSet::new(),
            _p: std::marker::PhantomData,
        });
        if p.next > p.from {
            s.covered.entry(p.partition).or_default().push((p.from, p.next, p.op));
        }
        for &(_, v) in p.records {
            s.returned.insert(v);
            if let Some(&(t, _)) = ix.writer.get(&v) {
                s.seen.entry(t).or_insert((p.op, p.partition));
            }
        }
    }
    for (session, s) in &sessions {
        for (&t, &(seen_op, seen_in)) in &s.seen {
            let txn = &ix.txns[t];
            if txn.outcome == TxnOutcome::Aborted {
                continue; // an aborted read, reported there
            }
            r.counted += 1;
            for w in txn.writes {
                if s.returned.contains(&w.value) {
                    continue;
                }
                let offsets = ix.offsets.get(&w.value);
                let covering = offsets.into_iter().flatten().find_map(|&o| {
                    s.covered
                        .get(&w.partition)?
                        .iter()
                        .find(|(from, next, _)| *from <= o && o < *next)
                        .map(|c| (o, c.2))
                });
                let who = match session {
                    Some(p) => format!("process {p}"),
                    None => "the final read".to_string(),
                };
                if let Some((o, cover_op)) = covering {
                    r.add(format!(
                        "{who} saw transaction op #{} in partition {seen_in} (op #{seen_op}) but read past its value {} at offset {o} of partition {} without it (op #{cover_op})",
                        txn.op, w.value, w.partition
                    ));
                } else if session.is_none()
                    && offsets.is_none_or(BTreeSet::is_empty)
                    && w.offset.is_none()
                    && txn.outcome == TxnOutcome::Committed
                    && s.covered.contains_key(&w.partition)
                {
                    r.add(format!(
                        "the final read saw committed transaction op #{} in partition {seen_in} (op #{seen_op}) but never its value {} in partition {}",
                        txn.op, w.value, w.partition
                    ));
                }
            }
        }
    }
    r
}

fn lost_write(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnLostWrite);
    for txn in ix.txns.iter().filter(|t| t.outcome == TxnOutcome::Committed) {
        for w in txn.writes {
            let Some(fin) = ix.final_read.get(&w.partition) else { continue };
            let end = ix.final_end.get(&w.partition).copied().unwrap_or(Offset(0));
            if w.offset.is_some_and(|o| o >= end) {
                continue; // past the final read's last stable offset (a liveness matter)
            }
            r.counted += 1;
            if !fin.values().any(|v| *v == w.value) {
                let at = w.offset.map(|o| format!(" (acknowledged at offset {o})")).unwrap_or_default();
                r.add(format!(
                    "value {}{at} of committed transaction op #{} is missing from the final read of partition {}",
                    w.value, txn.op, w.partition
                ));
            }
        }
    }
    r
}

fn duplicate(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnDuplicate);
    let mut values: Vec<(&Value, &BTreeSet<Offset>)> = ix.offsets.iter().collect();
    values.sort();
    for (v, offs) in values {
        r.counted += 1;
        if offs.len() > 1 {
            r.add(format!("value {v} is at offsets {offs:?}"));
        }
    }
    r
}

/// Transactions whose values can be read: not aborted.
fn live(t: &Txn<'_>) -> bool {
    t.outcome != TxnOutcome::Aborted
}

/// Consecutive transactions in each partition's log order (the final read, else any read),
/// as (earlier, later) transaction indexes.
fn log_order_pairs(ix: &Index<'_>) -> Vec<(usize, usize)> {
    let mut logs: BTreeMap<PartitionId, BTreeMap<Offset, usize>> = BTreeMap::new();
    for p in &ix.polls {
        for &(off, v) in p.records {
            if let Some(&(t, _)) = ix.writer.get(&v) {
                logs.entry(p.partition).or_default().insert(off, t);
            }
        }
    }
    let mut pairs = Vec::new();
    for log in logs.values() {
        let mut prev: Option<usize> = None;
        for &t in log.values() {
            if let Some(a) = prev.filter(|&a| a != t) {
                pairs.push((a, t));
            }
            prev = Some(t);
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

fn g1c(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnG1c);
    let n = ix.txns.len();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (b, txn) in ix.txns.iter().enumerate() {
        for v in txn.reads {
            if let Some(&(a, _)) = ix.writer.get(v) {
                if a != b {
                    edges[a].push(b);
                    r.counted += 1;
                }
            }
        }
    }
    for (a, b) in log_order_pairs(ix) {
        let (ta, tb) = (&ix.txns[a], &ix.txns[b]);
        if live(ta) && live(tb) && ta.complete_us < tb.invoke_us {
            edges[a].push(b);
            r.counted += 1;
        }
    }
    for scc in cycles(&edges) {
        let ops: Vec<String> = scc.iter().map(|&t| format!("op #{}", ix.txns[t].op)).collect();
        r.add(format!("transactions {} form a cycle of write-read and real-time write-write edges", ops.join(", ")));
    }
    r
}

fn g0(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnG0);
    let n = ix.txns.len();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (a, b) in log_order_pairs(ix) {
        if live(&ix.txns[a]) && live(&ix.txns[b]) {
            edges[a].push(b);
            r.counted += 1;
        }
    }
    for scc in cycles(&edges) {
        let ops: Vec<String> = scc.iter().take(6).map(|&t| format!("op #{}", ix.txns[t].op)).collect();
        r.add(format!(
            "{} transactions ({} ...) order their records differently in different partitions",
            scc.len(),
            ops.join(", ")
        ));
    }
    r
}

fn exactly_once(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnExactlyOnce);
    // Transforms of one input read_committed anywhere, at any time (final read included).
    let mut seen: BTreeMap<Source<'_>, BTreeSet<Value>> = BTreeMap::new();
    for p in ix.committed_polls() {
        for &(_, v) in p.records {
            if let Some((source, _)) = ix.source(v) {
                seen.entry(source).or_default().insert(v);
            }
        }
    }
    for ((group, partition, offset), values) in &seen {
        if values.len() > 1 {
            r.add(format!(
                "input at offset {offset} of partition {partition} (group {group}) was transformed {} times, read_committed: values {values:?}",
                values.len()
            ));
        }
    }
    // The end state: the final committed offset against the final read of every partition.
    let mut outputs: BTreeMap<Source<'_>, Vec<(PartitionId, Offset, Value, Value)>> = BTreeMap::new();
    for (&partition, records) in &ix.final_read {
        for (&offset, &v) in records {
            if let Some((source, input)) = ix.source(v) {
                outputs.entry(source).or_default().push((partition, offset, v, input));
            }
        }
    }
    for read in ix.offset_reads.iter().filter(|o| o.final_read) {
        let (group, partition) = (read.group, read.partition);
        let Some(inputs) = ix.final_read.get(&partition) else { continue };
        let committed = read.offset.unwrap_or(Offset(0));
        let end = ix.final_end.get(&partition).copied().unwrap_or(Offset(0));
        if committed > end {
            r.add(format!(
                "group {group}'s final committed offset {committed} of partition {partition} is beyond the input's end {end} (op #{})",
                read.op
            ));
        }
        for (&offset, &value) in inputs.range(..committed) {
            r.counted += 1;
            if !outputs.contains_key(&(group, partition, offset)) {
                r.add(format!(
                    "input {value} at offset {offset} of partition {partition} is below group {group}'s final committed offset {committed} (op #{}) but has no transform in the final read",
                    read.op
                ));
            }
        }
        let mine = outputs.range((group, partition, Offset(0))..=(group, partition, Offset(u64::MAX)));
        for (&(_, _, offset), outs) in mine {
            for &(out_partition, out_offset, v, input) in outs {
                if offset >= committed {
                    r.add(format!(
                        "the final read holds value {v} (partition {out_partition}, offset {out_offset}), the transform of input at offset {offset} of partition {partition}, at or above group {group}'s final committed offset {committed} (op #{})",
                        read.op
                    ));
                } else if inputs.get(&offset) != Some(&input) {
                    r.add(format!(
                        "the final read holds value {v} (partition {out_partition}, offset {out_offset}), the transform of input {input} at offset {offset} of partition {partition}, which the final read of the input does not hold there"
                    ));
                }
            }
        }
    }
    r
}

fn offset_atomicity(ix: &Index<'_>) -> TxnCheckResult {
    let mut r = TxnCheckResult::new(TxnCheck::TxnOffsetAtomicity);
    let mut committing: BTreeMap<Source<'_>, Vec<usize>> = BTreeMap::new();
    for (t, txn) in ix.txns.iter().enumerate() {
        if let Some(c) = txn.consumed {
            committing.entry((c.group.as_str(), c.partition, c.to)).or_default().push(t);
        }
    }
    let final_values: BTreeMap<PartitionId, BTreeSet<Value>> =
        ix.final_read.iter().map(|(p, records)| (*p, records.values().copied().collect())).collect();
    // Outputs of `t` missing from the final read (partitions it did not read are not judged).
    let missing = |t: usize| -> Vec<Value> {
        ix.txns[t]
            .writes
            .iter()
            .filter(|w| final_values.get(&w.partition).is_some_and(|vs| !vs.contains(&w.value)))
            .map(|w| w.value)
            .collect()
    };
    for read in &ix.offset_reads {
        let Some(offset) = read.offset else { continue };
        r.counted += 1;
        let (group, partition) = (read.group, read.partition);
        let all = committing.get(&(group, partition, offset)).map_or(&[][..], Vec::as_slice);
        let live: Vec<usize> = all.iter().copied().filter(|&t| live(&ix.txns[t])).collect();
        let ops = |ts: &[usize]| ts.iter().map(|&t| format!("op #{}", ix.txns[t].op)).collect::<Vec<_>>().join(", ");
        if live.is_empty() {
            r.add(format!(
                "op #{} read group {group}'s committed offset {offset} of partition {partition}, which no transaction that was not aborted committed (aborted: [{}])",
                read.op,
                ops(all)
            ));
            continue;
        }
        let asked: Vec<usize> =
            live.iter().copied().filter(|&t| ix.txns[t].commit_us.is_some_and(|c| c <= read.complete_us)).collect();
        if asked.is_empty() {
            r.add(format!(
                "op #{} read group {group}'s committed offset {offset} of partition {partition} at {} us, before any transaction committing it ([{}]) was asked to commit",
                read.op,
                read.complete_us,
                ops(&live)
            ));
            continue;
        }
        if asked.iter().all(|&t| !missing(t).is_empty()) {
            let t = asked[0];
            r.add(format!(
                "op #{} read group {group}'s committed offset {offset} of partition {partition}, but the outputs {:?} of transaction op #{} that committed it are not in the final read",
                read.op,
                missing(t),
                ix.txns[t].op
            ));
        }
    }
    regression(ix, &mut r);
    r
}

/// A group's committed offset going back in real time: a read invoked after another one
/// returned shows a lower offset (or none).
fn regression(ix: &Index<'_>, r: &mut TxnCheckResult) {
    let mut by_key: BTreeMap<(&str, PartitionId), Vec<&OffsetRead<'_>>> = BTreeMap::new();
    for read in &ix.offset_reads {
        by_key.entry((read.group, read.partition)).or_default().push(read);
    }
    for ((group, partition), mut reads) in by_key {
        // Reads by completion, each with the highest offset returned up to it.
        reads.sort_by_key(|o| (o.complete_us, o.op));
        let mut highest: Vec<(u64, Option<Offset>, usize)> = Vec::with_capacity(reads.len());
        for o in &reads {
            let prev = highest.last().map(|h| (h.1, h.2));
            let top = match prev {
                Some((best, op)) if best >= o.offset => (best, op),
                _ => (o.offset, o.op),
            };
            highest.push((o.complete_us, top.0, top.1));
        }
        for b in &reads {
            let before = highest.partition_point(|h| h.0 < b.invoke_us);
            let Some(&(_, top, top_op)) = before.checked_sub(1).and_then(|k| highest.get(k)) else { continue };
            if b.offset < top {
                let shown = |o: Option<Offset>| o.map_or("none".to_string(), |o| o.to_string());
                r.add(format!(
                    "op #{} read group {group}'s committed offset of partition {partition} as {}, after op #{top_op} had returned {}",
                    b.op,
                    shown(b.offset),
                    shown(top)
                ));
            }
        }
    }
}

/// The strongly connected components with more than one node (Tarjan's algorithm, iterative
/// so a long chain cannot overflow the stack).
fn cycles(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let mut next = 0usize;
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        // (node, next edge to look at)
        let mut work: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut e)) = work.last_mut() {
            if let Some(&w) = edges[v].get(*e) {
                *e += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut scc = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort_unstable();
                    out.push(scc);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINAL: u32 = 99;

    fn txn(process: u32, writes: &[(u32, u64, Option<u64>)], at: (u64, u64), outcome: TxnOutcome) -> TxnOp {
        TxnOp::Txn {
            process: ProcessId(process),
            writes: writes
                .iter()
                .map(|&(p, v, o)| TxnWrite { partition: PartitionId(p), value: Value(v), offset: o.map(Offset) })
                .collect(),
            reads: Vec::new(),
            invoke_us: at.0,
            commit_us: (outcome != TxnOutcome::Aborted).then_some(at.1 - 1),
            complete_us: at.1,
            outcome,
            consumed: None,
        }
    }

    const GROUP: &str = "g";

    /// A pipeline transaction of `process`: it consumed `inputs` of partition 0 from `from`
    /// up to `to` and wrote their transforms (partition, value, acknowledged offset).
    fn pipe(
        process: u32,
        consumed: (u64, &[(u64, u64)], u64),
        outputs: &[(u32, u64, Option<u64>)],
        at: (u64, u64),
        outcome: TxnOutcome,
    ) -> TxnOp {
        let (from, inputs, to) = consumed;
        let mut op = txn(process, outputs, at, outcome);
        if let TxnOp::Txn { reads, consumed, .. } = &mut op {
            *reads = inputs.iter().map(|&(_, v)| Value(v)).collect();
            *consumed = Some(TxnConsumed {
                group: GROUP.into(),
                partition: PartitionId(0),
                from: Offset(from),
                to: Offset(to),
                inputs: inputs.iter().map(|&(o, v)| (Offset(o), Value(v))).collect(),
            });
        }
        op
    }

    fn offset_read(process: u32, offset: Option<u64>, at: u64) -> TxnOp {
        TxnOp::OffsetRead {
            process: ProcessId(process),
            group: GROUP.into(),
            partition: PartitionId(0),
            offset: offset.map(Offset),
            invoke_us: at,
            complete_us: at + 1,
            final_read: process == FINAL,
        }
    }

    /// A pipeline from partition 0 to partition 1. T1 writes input 1 (partition 0: B 1 C).
    /// P0 transforms it to 100 and aborts (a fenced instance); P1 transforms it to 101 and
    /// commits offset 3 (partition 1: B 100 A B 101 C).
    fn pipeline() -> Vec<TxnOp> {
        vec![
            txn(1, &[(0, 1, Some(1))], (0, 10), TxnOutcome::Committed),
            offset_read(4, None, 11),
            poll(4, 0, (0, 3), &[(1, 1)], 13),
            pipe(4, (0, &[(1, 1)], 3), &[(1, 100, Some(1))], (14, 20), TxnOutcome::Aborted),
            offset_read(5, None, 21),
            poll(5, 0, (0, 3), &[(1, 1)], 23),
            pipe(5, (0, &[(1, 1)], 3), &[(1, 101, Some(4))], (24, 30), TxnOutcome::Committed),
            offset_read(5, Some(3), 31),
            offset_read(FINAL, Some(3), 100),
            poll(FINAL, 0, (0, 3), &[(1, 1)], 100),
            poll(FINAL, 1, (0, 6), &[(4, 101)], 100),
        ]
    }

    fn replace_final_poll(h: &mut Vec<TxnOp>, partition: u32, op: TxnOp) {
        h.retain(|o| !matches!(o, TxnOp::Poll { final_read: true, partition: p, .. } if p.0 == partition));
        h.push(op);
    }

    fn poll(process: u32, partition: u32, range: (u64, u64), records: &[(u64, u64)], at: u64) -> TxnOp {
        TxnOp::Poll {
            process: ProcessId(process),
            partition: PartitionId(partition),
            isolation: Isolation::ReadCommitted,
            from: Offset(range.0),
            next: Offset(range.1),
            records: records.iter().map(|&(o, v)| (Offset(o), Value(v))).collect(),
            invoke_us: at,
            complete_us: at + 1,
            final_read: process == FINAL,
        }
    }

    /// Two partitions; T1 (values 1, 2) committed, T2 (3, 4) aborted, T3 (5, 6) committed.
    /// Partition 0: B1 1 C1 B2 3 A2 B3 5 C3 (offsets 0..9); partition 1 likewise with 2, 4, 6.
    fn good() -> Vec<TxnOp> {
        vec![
            txn(1, &[(0, 1, Some(1)), (1, 2, Some(1))], (0, 10), TxnOutcome::Committed),
            txn(1, &[(0, 3, Some(4)), (1, 4, Some(4))], (20, 30), TxnOutcome::Aborted),
            txn(1, &[(0, 5, Some(7)), (1, 6, Some(7))], (40, 50), TxnOutcome::Committed),
            poll(2, 0, (0, 3), &[(1, 1)], 12),
            poll(2, 1, (0, 6), &[(1, 2)], 35),
            poll(2, 0, (3, 9), &[(7, 5)], 55),
            poll(FINAL, 0, (0, 9), &[(1, 1), (7, 5)], 100),
            poll(FINAL, 1, (0, 9), &[(1, 2), (7, 6)], 100),
        ]
    }

    fn check(ops: Vec<TxnOp>, failing: &[TxnCheck]) {
        let report = check_txns(&TxnHistory { ops });
        let failed: Vec<TxnCheck> = report.results.iter().filter(|r| r.failed()).map(|r| r.check).collect();
        assert_eq!(failed, failing, "{report}");
    }

    #[test]
    fn a_good_history_passes() {
        check(good(), &[]);
    }

    #[test]
    fn an_aborted_value_read_committed_is_an_aborted_read() {
        let mut h = good();
        h.push(poll(3, 0, (0, 6), &[(1, 1), (4, 3)], 60));
        check(h, &[TxnCheck::TxnAbortedRead]);
    }

    #[test]
    fn a_value_read_before_its_commit_is_an_intermediate_read() {
        let mut h = good();
        h.push(poll(3, 0, (6, 8), &[(7, 5)], 45)); // T3's commit is invoked at 49
        check(h, &[TxnCheck::TxnIntermediateRead]);
    }

    #[test]
    fn reading_past_a_committed_write_after_seeing_its_transaction_is_torn() {
        let mut h = good();
        h.push(poll(3, 0, (0, 3), &[(1, 1)], 60));
        h.push(poll(3, 1, (0, 3), &[], 61)); // covers offset 1 of partition 1: value 2 missing
        check(h, &[TxnCheck::TxnTorn]);
    }

    #[test]
    fn a_committed_write_missing_at_the_end_is_lost() {
        let mut h = good();
        h.retain(|op| !matches!(op, TxnOp::Poll { final_read: true, partition: PartitionId(1), .. }));
        h.push(poll(FINAL, 1, (0, 9), &[(1, 2)], 100)); // value 6 is gone
                                                        // The final read saw T3 in partition 0 and read past its offset in partition 1: torn too.
        check(h, &[TxnCheck::TxnTorn, TxnCheck::TxnLostWrite]);
    }

    #[test]
    fn a_value_at_two_offsets_is_a_duplicate() {
        let mut h = good();
        h.push(poll(3, 0, (0, 10), &[(1, 1), (7, 5), (9, 5)], 60));
        check(h, &[TxnCheck::TxnDuplicate]);
    }

    #[test]
    fn reading_a_later_transaction_is_a_g1c_cycle() {
        let mut h = good();
        // T1 read T3's value: T3 -wr-> T1; T1 ended before T3 began and its record comes
        // first in partition 0: T1 -ww-> T3.
        if let TxnOp::Txn { reads, .. } = &mut h[0] {
            reads.push(Value(5));
        }
        check(h, &[TxnCheck::TxnG1c]);
    }

    #[test]
    fn a_good_pipeline_history_passes() {
        let report = check_txns(&TxnHistory { ops: pipeline() });
        let judged = |c: TxnCheck| report.results.iter().find(|r| r.check == c).map_or(0, |r| r.counted);
        assert_eq!((judged(TxnCheck::TxnExactlyOnce), judged(TxnCheck::TxnOffsetAtomicity)), (1, 2), "{report}");
        check(pipeline(), &[]);
    }

    #[test]
    fn an_input_transformed_twice_is_not_exactly_once() {
        let mut h = pipeline();
        // P2 reprocesses input 1 from the stale offset and commits too.
        h.insert(8, pipe(6, (0, &[(1, 1)], 3), &[(1, 102, Some(7))], (32, 40), TxnOutcome::Committed));
        replace_final_poll(&mut h, 1, poll(FINAL, 1, (0, 9), &[(4, 101), (7, 102)], 100));
        check(h, &[TxnCheck::TxnExactlyOnce]);
    }

    #[test]
    fn an_output_above_the_committed_offset_is_not_exactly_once() {
        let mut h = pipeline();
        // P1's outputs committed but its offset did not.
        h.retain(|o| !matches!(o, TxnOp::OffsetRead { offset: Some(_), .. }));
        h.push(offset_read(FINAL, None, 100));
        check(h, &[TxnCheck::TxnExactlyOnce]);
    }

    #[test]
    fn a_committed_offset_without_its_outputs_breaks_both() {
        let mut h = pipeline();
        // P1's offset committed, its output did not (its outcome unknown to its producer).
        h[6] = pipe(5, (0, &[(1, 1)], 3), &[(1, 101, None)], (24, 30), TxnOutcome::Unknown);
        replace_final_poll(&mut h, 1, poll(FINAL, 1, (0, 6), &[], 100));
        check(h, &[TxnCheck::TxnExactlyOnce, TxnCheck::TxnOffsetAtomicity]);
    }

    #[test]
    fn the_offset_of_an_aborted_transaction_read_breaks_atomicity() {
        let mut h = pipeline();
        // P0 consumed up to 2 only; its aborted offset is read afterwards.
        h[3] = pipe(4, (0, &[(1, 1)], 2), &[(1, 100, Some(1))], (14, 20), TxnOutcome::Aborted);
        h[4] = offset_read(5, Some(2), 21);
        check(h, &[TxnCheck::TxnOffsetAtomicity]);
    }

    #[test]
    fn an_offset_read_before_its_commit_was_asked_breaks_atomicity() {
        let mut h = pipeline();
        h.push(offset_read(9, Some(3), 25)); // P1 is asked to commit at 29
        check(h, &[TxnCheck::TxnOffsetAtomicity]);
    }

    #[test]
    fn a_committed_offset_going_back_breaks_atomicity() {
        let mut h = pipeline();
        h.push(offset_read(9, None, 50)); // after op #7 returned 3
        check(h, &[TxnCheck::TxnOffsetAtomicity]);
    }

    #[test]
    fn write_cycles_of_concurrent_transactions_are_counted_not_failed() {
        let h = vec![
            txn(1, &[(0, 1, Some(0)), (1, 2, Some(1))], (0, 10), TxnOutcome::Committed),
            txn(2, &[(0, 3, Some(1)), (1, 4, Some(0))], (0, 10), TxnOutcome::Committed),
            poll(FINAL, 0, (0, 2), &[(0, 1), (1, 3)], 100),
            poll(FINAL, 1, (0, 2), &[(0, 4), (1, 2)], 100),
        ];
        let report = check_txns(&TxnHistory { ops: h.clone() });
        assert!(report.violated(TxnCheck::TxnG0), "{report}");
        check(h, &[]);
    }
}
