//! Transaction checks for `skein-loadgen verify --transactions`: Jepsen's Kafka transaction
//! anomalies, over what the transactional producers did ([`Txn`]) and what the readers saw
//! ([`Read`], [`Reached`]).
//!
//! A transaction's fate as the checks take it ([`Fate`]): **committed** when its commit was
//! acknowledged, **aborted** when no commit was ever asked for (its producer aborted it, or
//! failed or was fenced before asking: the coordinator can only abort it), **unknown**
//! otherwise (a commit asked for and not answered). A transaction some read_committed reader
//! saw is taken as committed too (if it was aborted, that read is an aborted read).
//!
//! The checks ([`TxnCheck`]):
//!
//! - `aborted-read`: a read_committed reader returned a value of an aborted transaction.
//! - `dirty-read`: a read_committed poll returned a value of a transaction before that
//!   transaction's commit was even asked for (the poll completed before the commit call).
//! - `torn-transaction`: a read_committed reader saw some value of a committed transaction and
//!   read past the offset of another of its values, in another or the same partition, without
//!   seeing it.
//! - `lost-write`: a value of a committed transaction at a known offset that no read_committed
//!   reader saw, or that a reader that read past its offset (and saw nothing else of its
//!   transaction) did not see.
//! - `duplicate`: one value at two positions, over every read of both isolation levels.
//! - `inconsistent-offset`: one position holding two values, over every read.
//! - `stuck-lso`: after every producer ended its transactions, a partition's last stable
//!   offset did not reach its high watermark within the transaction timeout (a hanging
//!   transaction).
//!
//! A reader's coverage of a partition is `[start, end)`: it read from `start` (the log start)
//! and its position reached `end` (read_committed positions move past aborted records and
//! markers, so `end` is where it read up to, not the last value it returned).
//!
//! Not done here: dependency cycles (G1c) between transactions, and the order of values within
//! a partition (the base checker [`skein_broker::check`] does that for the committed reads).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

/// One transaction of a producer, as it recorded it.
#[derive(Clone, Debug, Serialize)]
pub struct Txn {
    /// The producer (its process id in the history).
    pub process: u32,
    /// Index among that producer's transactions.
    pub index: u64,
    /// Its values, each with the partition it went to and the offset acknowledged (if one
    /// was).
    pub records: Vec<TxnRecord>,
    /// When commit was called (`None`: never; the transaction can only abort).
    pub commit_invoke_us: Option<u64>,
    /// Whether the commit was acknowledged.
    pub committed: bool,
    /// When the transaction ended (commit or abort answered, or given up).
    pub complete_us: u64,
    /// The last error the producer met in it (a code name such as `PRODUCER_FENCED`), if any.
    pub error: Option<&'static str>,
    /// Sends that failed before their record was queued (not part of the transaction).
    pub unsent: u32,
}

/// One value sent in a transaction.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TxnRecord {
    /// The unique value.
    pub value: u64,
    /// The partition it was sent to.
    pub partition: u32,
    /// The offset its write was acknowledged at, if it was.
    pub offset: Option<u64>,
    /// When it was sent.
    pub invoke_us: u64,
}

/// What became of a transaction, as far as the producer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Commit acknowledged.
    Committed,
    /// No commit was asked for: only an abort is possible.
    Aborted,
    /// A commit was asked for and not acknowledged.
    Unknown,
}

impl Txn {
    /// What the producer knows of its fate.
    pub fn fate(&self) -> Fate {
        match (self.committed, self.commit_invoke_us) {
            (true, _) => Fate::Committed,
            (false, None) => Fate::Aborted,
            (false, Some(_)) => Fate::Unknown,
        }
    }
}

/// One poll of one partition by a reader.
#[derive(Clone, Debug)]
pub struct Read {
    /// The reader.
    pub process: u32,
    /// Read committed (else read uncommitted).
    pub committed: bool,
    /// The partition.
    pub partition: u32,
    /// `(offset, value)` returned.
    pub records: Vec<(u64, u64)>,
    /// When the poll returned.
    pub complete_us: u64,
}

/// How far a reader read a partition: from `start` until its position reached `end`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Reached {
    /// The reader.
    pub process: u32,
    /// Read committed (else read uncommitted).
    pub committed: bool,
    /// The partition.
    pub partition: u32,
    /// Where it began.
    pub start: u64,
    /// Its position when it stopped.
    pub end: u64,
}

/// A partition whose last stable offset stayed below its high watermark.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stuck {
    /// The partition.
    pub partition: u32,
    /// Its last stable offset when the wait ended.
    pub last_stable: u64,
    /// Its high watermark then.
    pub high_watermark: u64,
}

/// The transaction checks, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxnCheck {
    /// See the module documentation.
    AbortedRead,
    /// See the module documentation.
    DirtyRead,
    /// See the module documentation.
    TornTransaction,
    /// See the module documentation.
    LostWrite,
    /// See the module documentation.
    Duplicate,
    /// See the module documentation.
    InconsistentOffset,
    /// See the module documentation.
    StuckLso,
}

impl TxnCheck {
    /// Every check, in report order.
    pub const ALL: [TxnCheck; 7] = [
        TxnCheck::AbortedRead,
        TxnCheck::DirtyRead,
        TxnCheck::TornTransaction,
        TxnCheck::LostWrite,
        TxnCheck::Duplicate,
        TxnCheck::InconsistentOffset,
        TxnCheck::StuckLso,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            TxnCheck::AbortedRead => "aborted-read",
            TxnCheck::DirtyRead => "dirty-read",
            TxnCheck::TornTransaction => "torn-transaction",
            TxnCheck::LostWrite => "lost-write",
            TxnCheck::Duplicate => "duplicate",
            TxnCheck::InconsistentOffset => "inconsistent-offset",
            TxnCheck::StuckLso => "stuck-lso",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            TxnCheck::AbortedRead | TxnCheck::DirtyRead => "read_committed records",
            TxnCheck::TornTransaction => "transactions seen",
            TxnCheck::LostWrite => "committed records",
            TxnCheck::Duplicate => "values read",
            TxnCheck::InconsistentOffset => "positions read",
            TxnCheck::StuckLso => "partitions",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct TxnCheckResult {
    /// The check.
    pub check: &'static str,
    /// Whether it found nothing wrong.
    pub passed: bool,
    /// Items examined (unit in `unit`).
    pub counted: usize,
    /// What `counted` counts.
    pub unit: &'static str,
    /// Violations found in all.
    pub violation_count: usize,
    /// The first [`KEPT_MAX`] violations, each a sentence.
    pub violations: Vec<String>,
}

/// Counts of transactions and their records by fate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TxnCounts {
    /// Transactions committed.
    pub committed: usize,
    /// Transactions aborted (no commit asked for).
    pub aborted: usize,
    /// Commit asked for, outcome unknown.
    pub unknown: usize,
    /// Records in committed transactions.
    pub committed_records: usize,
    /// Records in aborted transactions.
    pub aborted_records: usize,
    /// Records in transactions of unknown fate.
    pub unknown_records: usize,
    /// Transactions of unknown fate that a read_committed reader saw (so committed).
    pub unknown_seen: usize,
    /// Transactions that met an error, by the last error's code name.
    pub errors: BTreeMap<&'static str, usize>,
    /// Sends refused before queueing (their values are in no transaction).
    pub unsent: u64,
}

/// The transaction checks' report: `Display` prints one line per check as the base report
/// does; serde gives the JSON form.
#[derive(Clone, Debug, Serialize)]
pub struct TxnReport {
    /// Transactions by fate.
    pub counts: TxnCounts,
    /// One result per check, in [`TxnCheck::ALL`] order.
    pub results: Vec<TxnCheckResult>,
}

impl TxnReport {
    /// True if no check failed.
    pub fn ok(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    /// The result of `check`.
    pub fn result(&self, check: TxnCheck) -> Option<&TxnCheckResult> {
        self.results.iter().find(|r| r.check == check.name())
    }
}

impl fmt::Display for TxnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "transactions: {} committed ({} records), {} aborted ({} records), {} unknown ({} records, {} seen committed)",
            c.committed, c.committed_records, c.aborted, c.aborted_records, c.unknown, c.unknown_records, c.unknown_seen
        )?;
        if !c.errors.is_empty() || c.unsent > 0 {
            writeln!(f, "transaction errors (last per transaction): {:?}; sends not queued: {}", c.errors, c.unsent)?;
        }
        for r in &self.results {
            let name = format!("txn {}", r.check);
            if r.passed {
                writeln!(f, "{name:<24}PASS ({} {})", r.counted, r.unit)?;
            } else {
                writeln!(f, "{name:<24}FAIL {} ({} {})", r.violation_count, r.counted, r.unit)?;
                for v in r.violations.iter().take(PRINTED_MAX) {
                    writeln!(f, "    {v}")?;
                }
                if r.violation_count > PRINTED_MAX.min(r.violations.len()) {
                    writeln!(f, "    ... and {} more", r.violation_count - PRINTED_MAX.min(r.violations.len()))?;
                }
            }
        }
        Ok(())
    }
}

/// Runs every transaction check.
pub fn check(txns: &[Txn], reads: &[Read], reached: &[Reached], stuck: &[Stuck], partitions: u32) -> TxnReport {
    let ix = Index::build(txns, reads);
    let mut results = Vec::new();
    for check in TxnCheck::ALL {
        let mut found = Found { check, counted: 0, count: 0, kept: Vec::new() };
        match check {
            TxnCheck::AbortedRead => aborted_read(&ix, reads, &mut found),
            TxnCheck::DirtyRead => dirty_read(&ix, reads, &mut found),
            TxnCheck::TornTransaction => torn(&ix, txns, reached, &mut found, true),
            TxnCheck::LostWrite => torn(&ix, txns, reached, &mut found, false),
            TxnCheck::Duplicate => duplicate(reads, &mut found),
            TxnCheck::InconsistentOffset => inconsistent(reads, &mut found),
            TxnCheck::StuckLso => {
                found.counted = partitions as usize;
                for s in stuck {
                    found.add(format!(
                        "partition {}: last stable offset {} stayed below the high watermark {} after every producer \
                         ended its transactions",
                        s.partition, s.last_stable, s.high_watermark
                    ));
                }
            }
        }
        results.push(found.finish());
    }
    TxnReport { counts: counts(txns, &ix), results }
}

/// Lookups shared by the checks.
struct Index<'a> {
    /// Value to (transaction index in `txns`, record index).
    owner: HashMap<u64, (usize, usize)>,
    /// Transactions some read_committed reader saw.
    seen_committed: BTreeSet<usize>,
    /// Per read_committed reader and partition, the values it saw.
    seen_by: HashMap<(u32, u32), BTreeSet<u64>>,
    /// Values any read_committed reader saw.
    seen_any: BTreeSet<u64>,
    txns: &'a [Txn],
}

impl<'a> Index<'a> {
    fn build(txns: &'a [Txn], reads: &[Read]) -> Index<'a> {
        let mut owner = HashMap::new();
        for (t, txn) in txns.iter().enumerate() {
            for (r, rec) in txn.records.iter().enumerate() {
                owner.insert(rec.value, (t, r));
            }
        }
        let mut seen_committed = BTreeSet::new();
        let mut seen_by: HashMap<(u32, u32), BTreeSet<u64>> = HashMap::new();
        let mut seen_any = BTreeSet::new();
        for read in reads.iter().filter(|r| r.committed) {
            for &(_, value) in &read.records {
                if let Some(&(t, _)) = owner.get(&value) {
                    seen_committed.insert(t);
                }
                seen_by.entry((read.process, read.partition)).or_default().insert(value);
                seen_any.insert(value);
            }
        }
        Index { owner, seen_committed, seen_by, seen_any, txns }
    }

    /// Committed for the checks: acknowledged, or seen by a read_committed reader.
    fn committed(&self, t: usize) -> bool {
        self.txns[t].fate() == Fate::Committed || self.seen_committed.contains(&t)
    }
}

fn counts(txns: &[Txn], ix: &Index<'_>) -> TxnCounts {
    let mut c = TxnCounts::default();
    for (t, txn) in txns.iter().enumerate() {
        let n = txn.records.len();
        if let Some(e) = txn.error {
            *c.errors.entry(e).or_default() += 1;
        }
        c.unsent += u64::from(txn.unsent);
        match txn.fate() {
            Fate::Committed => (c.committed, c.committed_records) = (c.committed + 1, c.committed_records + n),
            Fate::Aborted => (c.aborted, c.aborted_records) = (c.aborted + 1, c.aborted_records + n),
            Fate::Unknown => {
                (c.unknown, c.unknown_records) = (c.unknown + 1, c.unknown_records + n);
                c.unknown_seen += usize::from(ix.seen_committed.contains(&t));
            }
        }
    }
    c
}

fn aborted_read(ix: &Index<'_>, reads: &[Read], found: &mut Found) {
    let mut reported = BTreeSet::new();
    for read in reads.iter().filter(|r| r.committed) {
        for &(offset, value) in &read.records {
            found.counted += 1;
            let Some(&(t, _)) = ix.owner.get(&value) else { continue };
            let txn = &ix.txns[t];
            if txn.fate() == Fate::Aborted && reported.insert(value) {
                found.add(format!(
                    "value {value} of transaction {}#{} (aborted: no commit asked for) was read at partition {} \
                     offset {offset} by read_committed reader {}",
                    txn.process, txn.index, read.partition, read.process
                ));
            }
        }
    }
}

fn dirty_read(ix: &Index<'_>, reads: &[Read], found: &mut Found) {
    let mut reported = BTreeSet::new();
    for read in reads.iter().filter(|r| r.committed) {
        for &(offset, value) in &read.records {
            found.counted += 1;
            let Some(&(t, _)) = ix.owner.get(&value) else { continue };
            let txn = &ix.txns[t];
            let Some(commit_us) = txn.commit_invoke_us else { continue };
            if read.complete_us < commit_us && reported.insert(value) {
                found.add(format!(
                    "value {value} of transaction {}#{} was read at partition {} offset {offset} by read_committed \
                     reader {} at {} us, before the commit was asked for at {commit_us} us",
                    txn.process, txn.index, read.partition, read.process, read.complete_us
                ));
            }
        }
    }
}

/// Torn transactions (`torn`) or lost writes (`!torn`): see the module documentation.
fn torn(ix: &Index<'_>, txns: &[Txn], reached: &[Reached], found: &mut Found, torn: bool) {
    let mut coverage: BTreeMap<u32, Vec<&Reached>> = BTreeMap::new();
    for r in reached.iter().filter(|r| r.committed) {
        coverage.entry(r.partition).or_default().push(r);
    }
    for (t, txn) in txns.iter().enumerate() {
        if !ix.committed(t) {
            continue;
        }
        if torn {
            found.counted += usize::from(ix.seen_committed.contains(&t));
        } else {
            found.counted += txn.records.iter().filter(|r| r.offset.is_some()).count();
        }
        for rec in &txn.records {
            let Some(offset) = rec.offset else { continue };
            if !torn && txn.fate() == Fate::Committed && !ix.seen_any.contains(&rec.value) {
                found.add(format!(
                    "value {} of committed transaction {}#{} at partition {} offset {offset} was never read by a \
                     read_committed reader",
                    rec.value, txn.process, txn.index, rec.partition
                ));
                continue;
            }
            let readers = coverage.get(&rec.partition).map_or(&[][..], Vec::as_slice);
            for r in readers.iter().filter(|r| r.start <= offset && offset < r.end) {
                if ix.seen_by.get(&(r.process, rec.partition)).is_some_and(|s| s.contains(&rec.value)) {
                    continue;
                }
                let other = txn.records.iter().find(|o| {
                    o.value != rec.value
                        && ix.seen_by.get(&(r.process, o.partition)).is_some_and(|s| s.contains(&o.value))
                });
                match (other, torn) {
                    (Some(o), true) => found.add(format!(
                        "transaction {}#{} torn for read_committed reader {}: it saw value {} (partition {}) and read \
                         partition {} from {} to {} without value {} at offset {offset}",
                        txn.process,
                        txn.index,
                        r.process,
                        o.value,
                        o.partition,
                        rec.partition,
                        r.start,
                        r.end,
                        rec.value
                    )),
                    (None, false) => found.add(format!(
                        "value {} of committed transaction {}#{} at partition {} offset {offset} was skipped by \
                         read_committed reader {}, which read that partition from {} to {}",
                        rec.value, txn.process, txn.index, rec.partition, r.process, r.start, r.end
                    )),
                    _ => {}
                }
            }
        }
    }
}

fn duplicate(reads: &[Read], found: &mut Found) {
    let mut at: HashMap<u64, BTreeSet<(u32, u64)>> = HashMap::new();
    for read in reads {
        for &(offset, value) in &read.records {
            at.entry(value).or_default().insert((read.partition, offset));
        }
    }
    found.counted = at.len();
    let mut dups: Vec<(&u64, &BTreeSet<(u32, u64)>)> = at.iter().filter(|(_, s)| s.len() > 1).collect();
    dups.sort();
    for (value, positions) in dups {
        found
            .add(format!("value {value} was read at {} positions (partition, offset): {positions:?}", positions.len()));
    }
}

fn inconsistent(reads: &[Read], found: &mut Found) {
    let mut at: HashMap<(u32, u64), BTreeSet<u64>> = HashMap::new();
    for read in reads {
        for &(offset, value) in &read.records {
            at.entry((read.partition, offset)).or_default().insert(value);
        }
    }
    found.counted = at.len();
    let mut bad: Vec<(&(u32, u64), &BTreeSet<u64>)> = at.iter().filter(|(_, s)| s.len() > 1).collect();
    bad.sort();
    for ((partition, offset), values) in bad {
        found.add(format!("partition {partition} offset {offset} was read with values {values:?}"));
    }
}

struct Found {
    check: TxnCheck,
    counted: usize,
    count: usize,
    kept: Vec<String>,
}

impl Found {
    fn add(&mut self, violation: String) {
        self.count += 1;
        if self.kept.len() < KEPT_MAX {
            self.kept.push(violation);
        }
    }

    fn finish(self) -> TxnCheckResult {
        TxnCheckResult {
            check: self.check.name(),
            passed: self.count == 0,
            counted: self.counted,
            unit: self.check.unit(),
            violation_count: self.count,
            violations: self.kept,
        }
    }
}

/// Violations kept per check.
pub const KEPT_MAX: usize = 20;
/// Violations printed per check.
const PRINTED_MAX: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(process: u32, index: u64, records: &[(u64, u32, u64)], commit: Option<u64>, committed: bool) -> Txn {
        Txn {
            process,
            index,
            records: records
                .iter()
                .map(|&(value, partition, offset)| TxnRecord { value, partition, offset: Some(offset), invoke_us: 0 })
                .collect(),
            commit_invoke_us: commit,
            committed,
            complete_us: 0,
            error: None,
            unsent: 0,
        }
    }

    fn read(process: u32, committed: bool, partition: u32, records: &[(u64, u64)], at: u64) -> Read {
        Read { process, committed, partition, records: records.to_vec(), complete_us: at }
    }

    fn reached(process: u32, partition: u32, end: u64) -> Reached {
        Reached { process, committed: true, partition, start: 0, end }
    }

    /// The names of the checks that fail.
    fn failing(txns: &[Txn], reads: &[Read], reached: &[Reached]) -> Vec<&'static str> {
        let report = check(txns, reads, reached, &[], 2);
        report.results.iter().filter(|r| !r.passed).map(|r| r.check).collect()
    }

    #[test]
    fn a_clean_history_passes() {
        // T0 committed over partitions 0 and 1 (markers at offsets 1 in each); T1 aborted.
        let txns = [txn(0, 0, &[(10, 0, 0), (11, 1, 0)], Some(5), true), txn(0, 1, &[(12, 0, 2)], None, false)];
        let reads = [
            read(7, true, 0, &[(0, 10)], 10),
            read(7, true, 1, &[(0, 11)], 10),
            read(8, false, 0, &[(0, 10), (2, 12)], 3),
        ];
        let reach = [reached(7, 0, 4), reached(7, 1, 2)];
        assert!(failing(&txns, &reads, &reach).is_empty());
    }

    #[test]
    fn each_anomaly_is_caught() {
        let t0 = txn(0, 0, &[(10, 0, 0), (11, 1, 0)], Some(5), true);
        // Aborted read: value 12 of an aborted transaction read committed.
        let txns = [t0.clone(), txn(0, 1, &[(12, 0, 2)], None, false)];
        let reads = [read(7, true, 0, &[(0, 10), (2, 12)], 10), read(7, true, 1, &[(0, 11)], 10)];
        assert_eq!(failing(&txns, &reads, &[]), ["aborted-read"]);
        // Dirty read: read before the commit was asked for.
        let reads = [read(7, true, 0, &[(0, 10)], 4), read(7, true, 1, &[(0, 11)], 10)];
        assert_eq!(failing(std::slice::from_ref(&t0), &reads, &[]), ["dirty-read"]);
        // Torn: reader 7 saw 10 and read partition 1 past offset 0 without 11 (value 11 is
        // seen by reader 9, so it is not lost).
        let reads = [read(7, true, 0, &[(0, 10)], 10), read(9, true, 1, &[(0, 11)], 10)];
        assert_eq!(failing(std::slice::from_ref(&t0), &reads, &[reached(7, 1, 2)]), ["torn-transaction"]);
        // Not torn when the reader has not read that far.
        assert!(failing(std::slice::from_ref(&t0), &reads, &[reached(7, 1, 0)]).is_empty());
        // Lost: 11 never read.
        let reads = [read(7, true, 0, &[(0, 10)], 10)];
        assert_eq!(failing(std::slice::from_ref(&t0), &reads, &[]), ["lost-write"]);
        // Duplicate and inconsistent offset, over read_uncommitted reads too.
        let reads = [
            read(7, true, 0, &[(0, 10)], 10),
            read(7, true, 1, &[(0, 11)], 10),
            read(8, false, 0, &[(0, 10), (3, 10)], 10),
            read(8, false, 1, &[(0, 12)], 10),
        ];
        assert_eq!(failing(&[t0], &reads, &[]), ["duplicate", "inconsistent-offset"]);
    }

    #[test]
    fn an_unknown_transaction_seen_once_must_be_seen_whole() {
        let t = txn(0, 0, &[(10, 0, 0), (11, 1, 0)], Some(5), false);
        let reads = [read(7, true, 0, &[(0, 10)], 10)];
        assert_eq!(failing(std::slice::from_ref(&t), &reads, &[reached(7, 1, 2)]), ["torn-transaction"]);
        // Unseen and unknown: nothing required.
        assert!(failing(&[t], &[], &[reached(7, 1, 2)]).is_empty());
    }

    #[test]
    fn stuck_partitions_fail() {
        let report = check(&[], &[], &[], &[Stuck { partition: 1, last_stable: 3, high_watermark: 9 }], 2);
        assert!(!report.ok());
        assert!(!report.result(TxnCheck::StuckLso).expect("present").passed);
        assert!(report.to_string().contains("txn stuck-lso"), "{report}");
    }
}
