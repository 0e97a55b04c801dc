//! The table machine: a multi-version key-value store fed by one table partition's committed
//! records in offset order ([`LogMachine`]). Every replica applies the same records, so every
//! replica holds the same versions and decides the same outcome for every transaction part.
//!
//! Call protocol (one table partition, on every replica):
//! 1. A new [`TableMachine`] (or [`TableMachine::restore`] of a snapshot), then
//!    [`crate::core::machine::catch_up`] / [`crate::core::machine::feed`] from
//!    [`LogMachine::applied`] on.
//! 2. The leader may call [`TableMachine::validate`] before appending a part (and for a
//!    read-only `check_only` part, which is never appended): it decides what applying the part
//!    at the log's end would decide, were nothing appended before it.
//! 3. Once a part's record is applied, [`TableMachine::outcome`] of its transaction answers
//!    the client; reads use [`TableMachine::get`] and [`TableMachine::scan`] at a snapshot.
//! 4. [`TableMachine::prune`] once no reader or validation needs snapshots below an offset.
//!
//! Invariants:
//! - A version is `(offset, value)`, `None` a delete; per key, versions are in strictly
//!   ascending offset order and every version's offset is below [`LogMachine::applied`].
//! - A part decided by [`LogMachine::apply`] writes its versions at its own offset; a part
//!   prepared by [`LogMachine::apply_transactional`] writes them at its commit marker's offset.
//! - While a part is prepared, its keys (written and read, and its scanned ranges) are held:
//!   a later part that writes a held key, or (serializable) reads a key a prepared part
//!   writes, aborts with [`AbortReason::Prepared`]. Hence a prepared part never needs
//!   validating again at its marker.
//! - Nothing here reads a clock or iterates a hash map: the state is a function of the records.
//!
//! What it deliberately does not do: leader-side checks (locks of 2pl, SSI's dangerous
//! structures, serial turns) live in `leader`; it keeps no version history beyond what
//! [`TableMachine::prune`] leaves; outcomes are kept for the last [`OUTCOMES_MAX`] decisions
//! only.
//!
//! Procedures (serial execution, [`Step`]): integers are decimal `i64` text (absent or
//! deleted: 0). A step that cannot run (a value that is not a decimal integer, an overflow, a
//! negative transfer amount, an append past [`VALUE_BYTES_MAX`]) leaves its keys unchanged,
//! its result is `None`, and the part's other steps still run: a procedure is deterministic,
//! so every replica skips the same step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use skein_client::index::field_value;

use super::index::DocIndex;
use super::{AbortReason, Key, Level, Part, PartError, Range, Step, TxnId, Value, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use crate::core::machine::{LogMachine, RecordError};
use crate::core::replica::Plant;
use crate::core::txn_partition::MarkerKind;
use crate::core::{Offset, ProducerId};

/// How many transaction outcomes a machine remembers: the most recently decided (by apply
/// order; a prepared part counts again when its marker decides it). Older ones are
/// forgotten, so [`TableMachine::outcome`] of a long-decided transaction is `None`.
pub const OUTCOMES_MAX: usize = 100_000;

/// What became of a transaction's part in this partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its writes are versions at `offset`; `results` holds one entry per procedure step.
    Committed {
        /// The offset of its versions (its record's, or its commit marker's).
        offset: Offset,
        /// Each step's result (see [`Step`]).
        results: Vec<Option<Value>>,
    },
    /// It changed nothing.
    Aborted(AbortReason),
    /// It is valid and held until its transaction's marker (record at `offset`).
    Prepared {
        /// Its record's offset.
        offset: Offset,
    },
}

/// Bytes that are not a snapshot of this build's [`TableMachine`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The bytes do not start with the table snapshot magic.
    #[error("not a table snapshot")]
    Magic,
    /// A snapshot format this build does not know.
    #[error("table snapshot version {0} is not known to this build")]
    Version(u16),
    /// The bytes are shorter or longer than the header says.
    #[error("the table snapshot is {actual} bytes, its header says {expected}")]
    Length {
        /// Bytes the header announces.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The body's CRC32C does not match the header's.
    #[error("the table snapshot's checksum is {actual:08x}, its header says {expected:08x}")]
    Checksum {
        /// The header's.
        expected: u32,
        /// The body's.
        actual: u32,
    },
    /// The body breaks the format or the machine's invariants.
    #[error("malformed table snapshot: {0}")]
    Malformed(&'static str),
    /// A prepared part does not decode.
    #[error("a prepared part in the table snapshot: {0}")]
    Part(#[from] PartError),
}

/// How far, in offsets, a transaction part's snapshot may lag behind the record that carries
/// it and still be validated ([`TableMachine::validate`]): an older one aborts with
/// [`AbortReason::SnapshotTooOld`] on every replica alike, and every replica prunes only
/// versions that far behind its applied offset ([`TableMachine::prune_behind`]), so no
/// validation ever needs a version some replica dropped. A follower knows nothing of the
/// leader's live transactions; without the window, a part validated against the history one
/// replica kept and another pruned would be decided differently on the two.
pub const SNAPSHOT_WINDOW: u64 = 10_000;

/// A row as read: its key, the offset of its visible version, and that version's value.
pub type RowRef<'a> = (&'a [u8], Offset, &'a [u8]);

/// One partition's table state: versions, prepared parts, recent outcomes (module docs).
#[derive(Clone, Debug)]
pub struct TableMachine {
    /// Per key, its versions in ascending offset order (never empty).
    rows: BTreeMap<Key, Vec<Version>>,
    /// The number of versions in `rows`.
    versions: usize,
    /// Keys that may hold versions to drop once the pruning point passes the offset: a version
    /// written over an older one, or a delete. `prune` visits only these (in offset order),
    /// not every row (a full scan of a 10,000-row table every tick was the largest user-space
    /// cost of a replication-3 run, bench/RESULTS.md "One job per commit group").
    /// Ascending by offset (a restore rebuilds it from the rows).
    prunable: VecDeque<(Offset, Key)>,
    /// Per producer, its part prepared and not yet decided.
    prepared: BTreeMap<ProducerId, Prepared>,
    /// The keys the prepared parts hold (derived from `prepared`).
    holds: BTreeMap<Key, Hold>,
    outcomes: Outcomes,
    applied: Offset,
    /// [`SNAPSHOT_WINDOW`], or another value every replica of the partition shares (tests
    /// and the simulator).
    window: u64,
    /// Planted bugs (simulator only; default off): `no_read_validation`,
    /// `snapshot_as_serializable`.
    plant: Plant,
    /// Document indexes by name (derived state, not in snapshots: `index`).
    indexes: BTreeMap<String, DocIndex>,
    /// The highest point versions were pruned up to ([`TableMachine::prune`]'s `keep`).
    pruned_to: Offset,
    /// Whether a [`SEED_DONE`] record was applied: a split's or merge's child has its
    /// parents' rows.
    seeded: bool,
}

/// The transaction id of the record that ends a child partition's seed: the parents' rows at
/// their seals are in, the partition takes transactions (`cluster/table_seed.rs`).
pub const SEED_DONE: TxnId = TxnId(u64::MAX);

/// The transaction ids of a seed's records carrying rows: this base, xor the seeding
/// leader's epoch shifted left 24 bits, plus the record's number.
pub const SEED_BASE: u64 = 0xfeed_0000_0000_0000;

impl Default for TableMachine {
    fn default() -> Self {
        TableMachine::new()
    }
}

impl TableMachine {
    /// An empty table, before offset 0.
    pub fn new() -> TableMachine {
        TableMachine {
            rows: BTreeMap::new(),
            versions: 0,
            prunable: VecDeque::new(),
            prepared: BTreeMap::new(),
            holds: BTreeMap::new(),
            outcomes: Outcomes::new(OUTCOMES_MAX),
            applied: Offset::ZERO,
            window: SNAPSHOT_WINDOW,
            plant: Plant::default(),
            indexes: BTreeMap::new(),
            pruned_to: Offset::ZERO,
            seeded: false,
        }
    }

    /// The machine with another snapshot window than [`SNAPSHOT_WINDOW`]; every replica of a
    /// partition must use the same one (their decisions depend on it).
    pub fn with_window(mut self, window: u64) -> TableMachine {
        self.window = window;
        self
    }

    /// The machine with planted bugs (the simulator's `--plant no-read-validation` and
    /// `snapshot-as-serializable`); [`Plant::default`] plants nothing.
    pub fn with_plant(mut self, plant: Plant) -> TableMachine {
        self.plant = plant;
        self
    }

    /// The offset after the last record applied (the same as [`LogMachine::applied`], callable
    /// without the trait in scope).
    pub fn applied(&self) -> Offset {
        self.applied
    }

    /// The newest version of `key` below `at` (a read at snapshot `at`): its offset and value
    /// (None: deleted). None: no version below `at`.
    pub fn get(&self, key: &[u8], at: Offset) -> Option<(Offset, Option<&[u8]>)> {
        let versions = self.rows.get(key)?;
        let visible = versions.partition_point(|(o, _)| *o < at);
        let (offset, value) = versions.get(visible.checked_sub(1)?)?;
        Some((*offset, value.as_deref()))
    }

    /// The newest committed version of `key`.
    pub fn latest(&self, key: &[u8]) -> Option<(Offset, Option<&[u8]>)> {
        let (offset, value) = self.rows.get(key)?.last()?;
        Some((*offset, value.as_deref()))
    }

    /// The rows of `range` present (not deleted) at snapshot `at`, in key order: key, version,
    /// value.
    pub fn scan(&self, range: &Range, at: Offset) -> Vec<(&[u8], Offset, &[u8])> {
        let mut rows = Vec::new();
        for (key, versions) in self.range(range) {
            let visible = versions.partition_point(|(o, _)| *o < at);
            if let Some((offset, Some(value))) = visible.checked_sub(1).and_then(|i| versions.get(i)) {
                rows.push((key.as_slice(), *offset, value.as_slice()));
            }
        }
        rows
    }

    /// Whether `part` is valid at the log's end: the decision [`LogMachine::apply`] (or
    /// [`LogMachine::apply_transactional`]) takes for it at its position.
    ///
    /// - Every level: a key it writes that a prepared part writes or reads (keys and ranges)
    ///   -> [`AbortReason::Prepared`]; serializable also: a key it reads, or a range it scans,
    ///   holding a key a prepared part writes.
    /// - Snapshot and SSI: a key it writes with a committed version at or after its snapshot
    ///   -> [`AbortReason::WriteConflict`] (first committer wins).
    /// - Serializable: a key read whose latest version is not the one seen ->
    ///   [`AbortReason::StaleRead`]; a scanned range with a version (a delete too) at or after
    ///   its snapshot -> [`AbortReason::Phantom`]. Blind writes are not checked.
    /// - Snapshot and SSI parts that carry reads or ranges (the client sends them for a
    ///   transaction over several partitions only, whose snapshots are one per partition):
    ///   their reads are checked as serializable's are, so no two partitions' snapshots can
    ///   be mixed into a read skew.
    /// - Read committed, serial, 2pl: nothing else (their guarantees are the leader's).
    pub fn validate(&self, part: &Part) -> Result<(), AbortReason> {
        // Planted: every serializable level validated as a single-partition snapshot part.
        let planted_si =
            self.plant.snapshot_as_serializable && part.level != Level::ReadCommitted && part.steps.is_empty();
        if (uses_snapshot(part) || planted_si) && part.snapshot.0.saturating_add(self.window) < self.applied.0 {
            return Err(AbortReason::SnapshotTooOld);
        }
        let written = part.written_keys();
        self.check_prepared(part, &written)?;
        if planted_si {
            return self.check_write_conflicts(part, &written);
        }
        let skip_reads = self.plant.no_read_validation;
        match part.level {
            Level::ReadCommitted | Level::Serial | Level::TwoPl => Ok(()),
            Level::Snapshot | Level::Ssi => {
                self.check_write_conflicts(part, &written)?;
                if validates_reads(part) && !(skip_reads && part.level == Level::Ssi) {
                    self.check_reads(part)?;
                }
                Ok(())
            }
            Level::Serializable if skip_reads => Ok(()),
            Level::Serializable => self.check_reads(part),
        }
    }

    /// The outcome of `txn`'s part here, if it is among the last [`OUTCOMES_MAX`] decided.
    pub fn outcome(&self, txn: TxnId) -> Option<&Outcome> {
        self.outcomes.get(txn)
    }

    /// Whether a part prepared by another transaction than `txn` writes `key`, or a key of
    /// `range`: its write becomes a version when its marker comes, so a lock-based reader
    /// (2pl, serial) must not read around it.
    pub fn prepared_write(&self, txn: TxnId, key: Option<&[u8]>, range: Option<&Range>) -> bool {
        if self.prepared.is_empty() {
            return false;
        }
        let other = |k: &[u8]| self.prepared.values().any(|p| p.part.txn != txn && p.part.written_keys().contains(&k));
        let held = |k: &[u8]| self.holds.get(k).is_some_and(|h| h.written > 0) && other(k);
        key.is_some_and(held) || range.is_some_and(|r| self.holds.keys().any(|k| r.contains(k) && held(k)))
    }

    /// Parts prepared and not yet decided by a marker.
    pub fn prepared_count(&self) -> usize {
        self.prepared.len()
    }

    /// Keys with at least one version (deleted ones too, until pruned).
    pub fn keys(&self) -> usize {
        self.rows.len()
    }

    /// Versions held, over all keys.
    pub fn versions(&self) -> usize {
        self.versions
    }

    /// Prunes what no read or validation can need any more: versions more than the snapshot
    /// window behind `oldest_in_use` (the oldest snapshot a live transaction reads at, on the
    /// leader) or behind the applied offset, whichever is older. The one pruning rule of every
    /// replica (runtime and simulator).
    pub fn prune_behind(&mut self, oldest_in_use: Option<Offset>) {
        let from = oldest_in_use.map_or(self.applied, |o| o.min(self.applied));
        self.prune(Offset(from.0.saturating_sub(self.window)));
    }

    /// Drops the versions no read at a snapshot `>= keep` can see: per key, the newest version
    /// below `keep` and every newer one stay; a key left with only a delete below `keep`
    /// goes. The caller promises no later read or validation uses a snapshot below `keep`.
    pub fn prune(&mut self, keep: Offset) {
        self.pruned_to = self.pruned_to.max(keep);
        let mut dropped = 0;
        while self.prunable.front().is_some_and(|(o, _)| *o < keep) {
            let (_, key) = self.prunable.pop_front().expect("checked above");
            let Some(versions) = self.rows.get_mut(&key) else { continue };
            let indexed: Vec<(&String, BTreeSet<Vec<u8>>)> = self
                .indexes
                .iter()
                .filter(|(_, i)| i.covers(&key))
                .map(|(n, i)| (n, i.values_of(versions.iter().map(|(_, v)| v.as_deref()))))
                .collect();
            let (d, gone) = prune_versions(versions, keep);
            dropped += d;
            // Entries of values no kept version holds any more go with their versions.
            let mut unindex = Vec::new();
            for (name, before) in indexed {
                let index = &self.indexes[name];
                let after =
                    if gone { BTreeSet::new() } else { index.values_of(versions.iter().map(|(_, v)| v.as_deref())) };
                unindex.extend(before.difference(&after).map(|v| (name.clone(), v.clone())));
            }
            for (name, v) in unindex {
                self.indexes.get_mut(&name).expect("named above").entries.remove(&(v, key.clone()));
            }
            if gone {
                self.rows.remove(&key);
            }
        }
        self.versions -= dropped;
    }

    /// The machine's state at [`LogMachine::applied`]: versions, prepared parts and outcomes,
    /// behind a magic, a format version and a CRC32C of the body (layout at `SNAPSHOT_MAGIC`).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut body = Enc(Vec::new());
        body.u64(self.applied.0);
        body.u64(self.rows.len() as u64);
        for (key, versions) in &self.rows {
            body.short(key);
            body.u64(versions.len() as u64);
            for (offset, value) in versions {
                body.u64(offset.0);
                match value {
                    None => body.u8(0),
                    Some(v) => {
                        body.u8(1);
                        body.short(v);
                    }
                }
            }
        }
        body.u64(self.prepared.len() as u64);
        for (producer, p) in &self.prepared {
            body.u64(producer.0 as u64);
            body.u64(p.offset.0);
            body.long(&p.part.encode());
        }
        let live: Vec<(TxnId, &Outcome)> = self.outcomes.in_order().collect();
        body.u64(live.len() as u64);
        for (txn, outcome) in live {
            body.u64(txn.0);
            encode_outcome(&mut body, outcome);
        }
        body.u8(u8::from(self.seeded));
        let body = body.0;
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len());
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A machine from [`TableMachine::snapshot`]'s bytes; it continues at the snapshot's
    /// applied offset. Bytes that are not such a snapshot are an error, never a panic.
    pub fn restore(bytes: &[u8]) -> Result<TableMachine, SnapshotError> {
        let (version, body) = snapshot_body(bytes)?;
        let mut d = Dec(body);
        let applied = Offset(d.u64()?);
        let mut m = TableMachine { applied, ..TableMachine::new() };
        m.restore_rows(&mut d)?;
        // What `set` would have queued for the restored versions.
        let mut prunable: Vec<(Offset, Key)> = Vec::new();
        for (key, versions) in &m.rows {
            for (i, (offset, value)) in versions.iter().enumerate() {
                if i > 0 || value.is_none() {
                    prunable.push((*offset, key.clone()));
                }
            }
        }
        prunable.sort_by_key(|(offset, _)| *offset);
        m.prunable = prunable.into();
        m.restore_prepared(&mut d)?;
        let outcomes = d.u64()?;
        let mut seen = BTreeSet::new();
        for _ in 0..outcomes {
            let txn = TxnId(d.u64()?);
            if !seen.insert(txn) {
                return Err(SnapshotError::Malformed("an outcome twice"));
            }
            let outcome = decode_outcome(&mut d, applied)?;
            m.outcomes.record(txn, outcome);
        }
        // Version 1 has no seed flag (no partition had parents then).
        if version >= 2 {
            m.seeded = match d.u8()? {
                0 => false,
                1 => true,
                _ => return Err(SnapshotError::Malformed("a seed flag that is not 0 or 1")),
            };
        }
        if !d.0.is_empty() {
            return Err(SnapshotError::Malformed("bytes after the outcomes"));
        }
        Ok(m)
    }

    /// Whether a child partition's seed is complete (a [`SEED_DONE`] record applied).
    pub fn seeded(&self) -> bool {
        self.seeded
    }

    /// The keys with a version at or after `since` (written, or deleted, since then), in key
    /// order. None when versions from before `since` may have been pruned: a key deleted
    /// since could be gone without a trace (a follower of the log then goes over every key).
    pub fn changed_since(&self, since: Offset) -> Option<Vec<Key>> {
        if since < self.pruned_to {
            return None;
        }
        Some(
            self.rows
                .iter()
                .filter(|(_, v)| v.last().is_some_and(|(o, _)| *o >= since))
                .map(|(k, _)| k.clone())
                .collect(),
        )
    }

    /// Up to `limit` keys from `from` on with their latest value (None: deleted), and the
    /// key after them (None: the end).
    pub fn latest_from(&self, from: &[u8], limit: usize) -> (Vec<(Key, Option<Value>)>, Option<Key>) {
        let mut it = self.rows.range::<[u8], _>((Bound::Included(from), Bound::Unbounded));
        let rows = it.by_ref().take(limit).map(|(k, v)| (k.clone(), v.last().and_then(|(_, v)| v.clone()))).collect();
        (rows, it.next().map(|(k, _)| k.clone()))
    }

    /// Defines document index `name` over `field` (built by [`TableMachine::build_indexes`]);
    /// an index of that name over another field is replaced.
    pub fn define_index(&mut self, name: &str, field: &str) {
        if self.indexes.get(name).is_none_or(|i| i.field() != field) {
            self.indexes.insert(name.to_owned(), DocIndex::new(field));
        }
    }

    /// Drops the document indexes not named in `keep`.
    pub fn keep_indexes(&mut self, keep: &BTreeSet<String>) {
        self.indexes.retain(|n, _| keep.contains(n));
    }

    /// Indexes up to `limit` more keys of the indexes still in their first pass; true when
    /// every index is built.
    pub fn build_indexes(&mut self, limit: usize) -> bool {
        let mut all = true;
        for index in self.indexes.values_mut() {
            let Some(next) = index.next.take() else { continue };
            let mut it = self.rows.range::<[u8], _>((Bound::Included(next.as_slice()), Bound::Unbounded));
            for (key, versions) in it.by_ref().take(limit) {
                for (_, v) in versions {
                    index.add(key, v.as_deref());
                }
                index.done += 1;
            }
            index.next = it.next().map(|(k, _)| k.clone());
            all &= index.next.is_none();
        }
        all
    }

    /// Document index `name`'s first pass: keys indexed and the partition's keys (equal:
    /// built). None: no such index.
    pub fn index_progress(&self, name: &str) -> Option<(u64, u64)> {
        let i = self.indexes.get(name)?;
        let total = self.rows.len() as u64;
        Some(if i.built() { (total, total) } else { (i.done.min(total), total) })
    }

    /// The rows present at snapshot `at` whose value's indexed field is `value`, in key order
    /// (key, version, value), by document index `name`: its entries rechecked at `at`, or,
    /// while its first pass runs, every row checked. None: no such index. `recheck` false
    /// is a planted bug (`--unsafe-index-plant document-no-recheck`): a candidate's visible
    /// version is returned whatever it holds.
    pub fn query_index<'a>(&'a self, name: &str, value: &[u8], at: Offset, recheck: bool) -> Option<Vec<RowRef<'a>>> {
        let index = self.indexes.get(name)?;
        let holds = |v: &[u8]| field_value(v, index.field()).is_some_and(|f| f == value);
        if !index.built() {
            let all = Range { from: Vec::new(), to: None };
            return Some(self.scan(&all, at).into_iter().filter(|(_, _, v)| holds(v)).collect());
        }
        let holds = |v: &[u8]| !recheck || holds(v);
        let mut rows = Vec::new();
        for key in index.candidates(value) {
            if let Some((offset, Some(v))) = self.get(key, at) {
                if holds(v) {
                    rows.push((key.as_slice(), offset, v));
                }
            }
        }
        Some(rows)
    }

    fn range<'a>(&'a self, range: &Range) -> impl Iterator<Item = (&'a Key, &'a Vec<Version>)> + 'a {
        let from = Bound::Included(range.from.as_slice());
        let to = match &range.to {
            // BTreeMap::range panics on a start after its end: such a range is empty.
            Some(t) if *t < range.from => Bound::Excluded(range.from.as_slice()),
            Some(t) => Bound::Excluded(t.as_slice()),
            None => Bound::Unbounded,
        };
        self.rows.range::<[u8], _>((from, to))
    }

    fn check_prepared(&self, part: &Part, written: &[&[u8]]) -> Result<(), AbortReason> {
        if self.prepared.is_empty() {
            return Ok(());
        }
        for key in written {
            if self.holds.contains_key(*key) {
                return Err(AbortReason::Prepared);
            }
            if self.prepared.values().any(|p| p.part.ranges.iter().any(|r| r.contains(key))) {
                return Err(AbortReason::Prepared);
            }
        }
        if !validates_reads(part) {
            return Ok(());
        }
        let held_write = |key: &[u8]| self.holds.get(key).is_some_and(|h| h.written > 0);
        if part.reads.iter().any(|(key, _)| held_write(key)) {
            return Err(AbortReason::Prepared);
        }
        for range in &part.ranges {
            let to = match &range.to {
                Some(t) if *t < range.from => continue,
                Some(t) => Bound::Excluded(t.as_slice()),
                None => Bound::Unbounded,
            };
            let from = Bound::Included(range.from.as_slice());
            if self.holds.range::<[u8], _>((from, to)).any(|(_, h)| h.written > 0) {
                return Err(AbortReason::Prepared);
            }
        }
        Ok(())
    }

    fn check_write_conflicts(&self, part: &Part, written: &[&[u8]]) -> Result<(), AbortReason> {
        let conflict = written.iter().any(|key| self.latest(key).is_some_and(|(o, _)| o >= part.snapshot));
        if conflict {
            Err(AbortReason::WriteConflict)
        } else {
            Ok(())
        }
    }

    fn check_reads(&self, part: &Part) -> Result<(), AbortReason> {
        for (key, seen) in &part.reads {
            if !read_current(self.latest(key), *seen, part.snapshot) {
                return Err(AbortReason::StaleRead);
            }
        }
        for range in &part.ranges {
            let changed =
                self.range(range).any(|(_, versions)| versions.last().is_some_and(|(o, _)| *o >= part.snapshot));
            if changed {
                return Err(AbortReason::Phantom);
            }
        }
        Ok(())
    }

    /// Applies a valid part's writes, then its procedure, as versions at `offset`.
    fn commit(&mut self, offset: Offset, part: Part) -> Vec<Option<Value>> {
        for (key, value) in part.writes {
            self.set(key, offset, value);
        }
        part.steps.into_iter().map(|step| self.run(offset, step)).collect()
    }

    fn run(&mut self, offset: Offset, step: Step) -> Option<Value> {
        match step {
            Step::Put { key, value } => {
                self.set(key, offset, Some(value));
                None
            }
            Step::Delete { key } => {
                self.set(key, offset, None);
                None
            }
            Step::CompareAndSet { key, expect, value } => {
                let found = self.current(&key).map(<[u8]>::to_vec);
                if found == expect {
                    self.set(key, offset, value);
                }
                found
            }
            Step::Increment { key, amount } => {
                let new = integer(self.current(&key))?.checked_add(amount)?;
                let text = new.to_string().into_bytes();
                self.set(key, offset, Some(text.clone()));
                Some(text)
            }
            Step::Transfer { from, to, amount } => self.transfer(offset, from, to, amount),
            Step::Append { key, value } => {
                let mut list = self.current(&key).map(<[u8]>::to_vec).unwrap_or_default();
                let sep = usize::from(!list.is_empty());
                if list.len() + sep + value.len() > VALUE_BYTES_MAX {
                    return None;
                }
                if sep == 1 {
                    list.push(b',');
                }
                list.extend_from_slice(&value);
                self.set(key, offset, Some(list.clone()));
                Some(list)
            }
        }
    }

    fn transfer(&mut self, offset: Offset, from: Key, to: Key, amount: i64) -> Option<Value> {
        if amount < 0 {
            return None;
        }
        let have = integer(self.current(&from))?;
        let other = integer(self.current(&to))?;
        if have < amount {
            return None;
        }
        if from == to {
            // Moving to itself changes nothing, and writes nothing.
            return Some(have.to_string().into_bytes());
        }
        let left = have - amount;
        let other = other.checked_add(amount)?;
        let text = left.to_string().into_bytes();
        self.set(from, offset, Some(text.clone()));
        self.set(to, offset, Some(other.to_string().into_bytes()));
        Some(text)
    }

    /// The latest present value of `key` (None: absent or deleted).
    fn current(&self, key: &[u8]) -> Option<&[u8]> {
        self.latest(key).and_then(|(_, v)| v)
    }

    /// Writes the version of `key` at `offset` (a later write of one part at the same offset
    /// replaces the earlier one).
    fn set(&mut self, key: Key, offset: Offset, value: Option<Value>) {
        for index in self.indexes.values_mut().filter(|i| i.covers(&key)) {
            index.add(&key, value.as_deref());
        }
        match self.rows.get_mut(&key) {
            Some(versions) => {
                let last = versions.last_mut().expect("a key in rows has a version");
                assert!(last.0 <= offset, "a version at {offset} after one at {}", last.0);
                if last.0 == offset {
                    last.1 = value;
                } else {
                    versions.push((offset, value));
                    self.versions += 1;
                }
                self.prunable.push_back((offset, key));
            }
            None => {
                if value.is_none() {
                    self.prunable.push_back((offset, key.clone()));
                }
                self.rows.insert(key, vec![(offset, value)]);
                self.versions += 1;
            }
        }
    }

    fn hold(&mut self, producer: ProducerId, offset: Offset, part: Part) {
        let (written, read) = held_keys(&part);
        for key in written {
            self.holds.entry(key.to_vec()).or_default().written += 1;
        }
        for key in read {
            self.holds.entry(key.to_vec()).or_default().read += 1;
        }
        let previous = self.prepared.insert(producer, Prepared { offset, part });
        assert!(previous.is_none(), "producer {} prepared twice at {offset}", producer.0);
    }

    fn release(&mut self, producer: ProducerId) -> Option<Prepared> {
        let p = self.prepared.remove(&producer)?;
        let (written, read) = held_keys(&p.part);
        for key in written {
            let hold = self.holds.get_mut(key).expect("a prepared part's written key is held");
            hold.written -= 1;
        }
        for key in read {
            let hold = self.holds.get_mut(key).expect("a prepared part's read key is held");
            hold.read -= 1;
        }
        self.holds.retain(|_, h| h.written > 0 || h.read > 0);
        Some(p)
    }

    /// Moves `applied` past `offset`; false (nothing applied) for an offset already passed,
    /// which keeps every key's versions in ascending order whatever the driver does.
    fn advance(&mut self, offset: Offset) -> bool {
        if offset < self.applied {
            return false;
        }
        self.applied = Offset(offset.0.saturating_add(1));
        true
    }

    fn restore_rows(&mut self, d: &mut Dec<'_>) -> Result<(), SnapshotError> {
        let keys = d.u64()?;
        for _ in 0..keys {
            let key = d.short()?.to_vec();
            if key.len() > KEY_BYTES_MAX {
                return Err(SnapshotError::Malformed("a key too large"));
            }
            if self.rows.last_key_value().is_some_and(|(last, _)| *last >= key) {
                return Err(SnapshotError::Malformed("keys out of order"));
            }
            let count = d.u64()?;
            if count == 0 {
                return Err(SnapshotError::Malformed("a key without versions"));
            }
            let mut versions: Vec<Version> = Vec::new();
            for _ in 0..count {
                let offset = Offset(d.u64()?);
                if offset >= self.applied || versions.last().is_some_and(|(o, _)| *o >= offset) {
                    return Err(SnapshotError::Malformed("versions out of order"));
                }
                let value = match d.u8()? {
                    0 => None,
                    1 => Some(d.short()?.to_vec()),
                    _ => return Err(SnapshotError::Malformed("a version tag")),
                };
                if value.as_ref().is_some_and(|v| v.len() > VALUE_BYTES_MAX) {
                    return Err(SnapshotError::Malformed("a value too large"));
                }
                versions.push((offset, value));
            }
            self.versions += versions.len();
            self.rows.insert(key, versions);
        }
        Ok(())
    }

    fn restore_prepared(&mut self, d: &mut Dec<'_>) -> Result<(), SnapshotError> {
        let count = d.u64()?;
        for _ in 0..count {
            let producer = ProducerId(d.u64()? as i64);
            let offset = Offset(d.u64()?);
            let part = Part::decode(d.long()?)?;
            if offset >= self.applied {
                return Err(SnapshotError::Malformed("a prepared part at or past the applied offset"));
            }
            if self.prepared.last_key_value().is_some_and(|(last, _)| *last >= producer) {
                return Err(SnapshotError::Malformed("prepared parts out of order"));
            }
            self.hold(producer, offset, part);
        }
        Ok(())
    }
}

impl LogMachine for TableMachine {
    /// Decodes the part, validates it here ([`TableMachine::validate`]) and, when valid,
    /// writes it and runs its procedure at `offset`; records its [`Outcome`] either way.
    fn apply(&mut self, offset: Offset, _key: &[u8], value: &[u8]) -> Result<(), RecordError> {
        if !self.advance(offset) {
            return Err(behind(offset));
        }
        let part = Part::decode(value).map_err(|e| RecordError { offset: offset.0, reason: e.to_string() })?;
        let txn = part.txn;
        if txn == SEED_DONE {
            self.seeded = true;
        }
        let outcome = match self.validate(&part) {
            Ok(()) => Outcome::Committed { offset, results: self.commit(offset, part) },
            Err(reason) => Outcome::Aborted(reason),
        };
        self.outcomes.record(txn, outcome);
        Ok(())
    }

    /// Decodes and validates the part; a valid one is held as `producer`'s prepared part
    /// until its marker. A producer prepares one part at a time: another part of the same
    /// transaction is a duplicate (ignored, the first stays prepared), a part of another
    /// transaction aborts with [`AbortReason::Prepared`].
    fn apply_transactional(
        &mut self,
        offset: Offset,
        producer: ProducerId,
        _key: &[u8],
        value: &[u8],
    ) -> Result<(), RecordError> {
        if !self.advance(offset) {
            return Err(behind(offset));
        }
        let part = Part::decode(value).map_err(|e| RecordError { offset: offset.0, reason: e.to_string() })?;
        let txn = part.txn;
        if let Some(p) = self.prepared.get(&producer) {
            if p.part.txn != txn {
                self.outcomes.record(txn, Outcome::Aborted(AbortReason::Prepared));
            }
            return Ok(());
        }
        match self.validate(&part) {
            Ok(()) => {
                self.hold(producer, offset, part);
                self.outcomes.record(txn, Outcome::Prepared { offset });
            }
            Err(reason) => self.outcomes.record(txn, Outcome::Aborted(reason)),
        }
        Ok(())
    }

    /// A commit marker writes `producer`'s prepared part (and runs its procedure) at the
    /// marker's offset; an abort marker drops it ([`AbortReason::OtherPartition`]), and so
    /// does a begin marker (a newer transaction of the producer: the older one was lost).
    /// Markers of producers with nothing prepared change nothing.
    fn apply_marker(&mut self, offset: Offset, producer: ProducerId, kind: MarkerKind) {
        if !self.advance(offset) {
            return;
        }
        match kind {
            // A begin while the producer's part is still prepared: the coordinator lost that
            // transaction (it ends every partition before the id's next one begins), and the
            // partition's transaction state aborts it here, in log order
            // (`PartitionTxns::note_marker`); so does the machine, or the next commit marker
            // would commit the old part with the new transaction.
            MarkerKind::Begin => {
                if let Some(p) = self.release(producer) {
                    self.outcomes.record(p.part.txn, Outcome::Aborted(AbortReason::OtherPartition));
                }
            }
            MarkerKind::Abort => {
                if let Some(p) = self.release(producer) {
                    self.outcomes.record(p.part.txn, Outcome::Aborted(AbortReason::OtherPartition));
                }
            }
            MarkerKind::Commit => {
                if let Some(p) = self.release(producer) {
                    let txn = p.part.txn;
                    let results = self.commit(offset, p.part);
                    self.outcomes.record(txn, Outcome::Committed { offset, results });
                }
            }
        }
    }

    fn applied(&self) -> Offset {
        self.applied
    }
}

/// Whether deciding `part` looks at versions relative to its snapshot: snapshot and SSI
/// parts (first committer wins), serializable parts that read or scan.
fn uses_snapshot(part: &Part) -> bool {
    match part.level {
        Level::Snapshot | Level::Ssi => true,
        Level::Serializable => !part.reads.is_empty() || !part.ranges.is_empty(),
        Level::ReadCommitted | Level::Serial | Level::TwoPl => false,
    }
}

/// Whether the machine checks `part`'s reads and ranges: serializable always; snapshot and
/// SSI when it carries them (a part of a transaction over several partitions).
fn validates_reads(part: &Part) -> bool {
    match part.level {
        Level::Serializable => true,
        Level::Snapshot | Level::Ssi => !part.reads.is_empty() || !part.ranges.is_empty(),
        _ => false,
    }
}

/// A version of a key: the offset that wrote it and its value (None: deleted).
type Version = (Offset, Option<Value>);

/// Drops the versions of one key no read at a snapshot `>= keep` can see (`prune`): how many,
/// and whether the key goes (only a delete below `keep` is left).
fn prune_versions(versions: &mut Vec<Version>, keep: Offset) -> (usize, bool) {
    let mut dropped = 0;
    let below = versions.partition_point(|(o, _)| *o < keep);
    if below > 1 {
        versions.drain(..below - 1);
        dropped += below - 1;
    }
    let gone = matches!(versions.as_slice(), [(o, None)] if *o < keep);
    if gone {
        dropped += 1;
    }
    (dropped, gone)
}

/// A part prepared inside a log transaction.
#[derive(Clone, Debug)]
struct Prepared {
    /// Its record's offset.
    offset: Offset,
    part: Part,
}

/// How many prepared parts write, and read, a key.
#[derive(Clone, Copy, Debug, Default)]
struct Hold {
    written: usize,
    read: usize,
}

/// The last `max` outcomes by the order they were recorded in.
#[derive(Clone, Debug)]
struct Outcomes {
    /// Per transaction, when its outcome was recorded and what it is.
    by_txn: BTreeMap<TxnId, (u64, Outcome)>,
    /// Recording order; an entry whose sequence number is not its transaction's current one
    /// is stale (the transaction was recorded again later) and skipped.
    order: VecDeque<(u64, TxnId)>,
    next: u64,
    max: usize,
}

impl Outcomes {
    fn new(max: usize) -> Outcomes {
        Outcomes { by_txn: BTreeMap::new(), order: VecDeque::new(), next: 0, max }
    }

    fn get(&self, txn: TxnId) -> Option<&Outcome> {
        self.by_txn.get(&txn).map(|(_, o)| o)
    }

    fn live(&self, seq: u64, txn: TxnId) -> bool {
        self.by_txn.get(&txn).is_some_and(|(s, _)| *s == seq)
    }

    fn record(&mut self, txn: TxnId, outcome: Outcome) {
        let seq = self.next;
        self.next += 1;
        self.by_txn.insert(txn, (seq, outcome));
        self.order.push_back((seq, txn));
        while self.by_txn.len() > self.max {
            let (seq, txn) = self.order.pop_front().expect("more outcomes than max: order is not empty");
            if self.live(seq, txn) {
                self.by_txn.remove(&txn);
            }
        }
        // Stale entries are dropped when they reach the front; bound them in between.
        if self.order.len() > 2 * self.max.max(1) {
            let by_txn = &self.by_txn;
            self.order.retain(|(s, t)| by_txn.get(t).is_some_and(|(x, _)| x == s));
        }
    }

    /// The outcomes remembered, oldest first.
    fn in_order(&self) -> impl Iterator<Item = (TxnId, &Outcome)> + '_ {
        self.order.iter().filter(|(s, t)| self.live(*s, *t)).map(|(_, t)| (*t, &self.by_txn[t].1))
    }
}

/// Whether a read that saw version `seen` at `snapshot` still holds, the key's latest version
/// being `latest`. A key deleted before the snapshot reads as absent, whether the reader
/// reports the delete's version or none; a pruned delete (the key gone) likewise.
///
/// Only the log decides it: a delete before the snapshot may be pruned on one replica and
/// kept on another, so such a delete counts as the key being absent whatever version the
/// reader reports below the snapshot (a client reporting a version it cannot have seen must
/// not split the replicas; only an honest report means anything).
fn read_current(latest: Option<(Offset, Option<&[u8]>)>, seen: Option<Offset>, snapshot: Offset) -> bool {
    match (latest, seen) {
        (Some((o, None)), seen) if o < snapshot => seen.is_none_or(|s| s < snapshot),
        (None, None) => true,
        (Some((o, _)), Some(s)) => o == s,
        (Some((o, None)), None) => o < snapshot,
        (Some((_, Some(_))), None) => false,
        (None, Some(s)) => s < snapshot,
    }
}

/// The keys a prepared part holds, each once: those it writes; those it reads.
fn held_keys(part: &Part) -> (BTreeSet<&[u8]>, BTreeSet<&[u8]>) {
    let written = part.written_keys().into_iter().collect();
    let read = part.reads.iter().map(|(k, _)| k.as_slice()).collect();
    (written, read)
}

/// A value as a procedure's integer (absent: 0; None: not a decimal i64).
fn integer(value: Option<&[u8]>) -> Option<i64> {
    match value {
        None => Some(0),
        Some(v) => std::str::from_utf8(v).ok()?.parse().ok(),
    }
}

fn behind(offset: Offset) -> RecordError {
    RecordError { offset: offset.0, reason: "a table record before the table's applied offset".into() }
}

fn encode_outcome(e: &mut Enc, outcome: &Outcome) {
    match outcome {
        Outcome::Committed { offset, results } => {
            e.u8(0);
            e.u64(offset.0);
            e.u64(results.len() as u64);
            for r in results {
                match r {
                    None => e.u8(0),
                    Some(v) => {
                        e.u8(1);
                        e.short(v);
                    }
                }
            }
        }
        Outcome::Aborted(reason) => {
            e.u8(1);
            e.short(reason.name().as_bytes());
        }
        Outcome::Prepared { offset } => {
            e.u8(2);
            e.u64(offset.0);
        }
    }
}

fn decode_outcome(d: &mut Dec<'_>, applied: Offset) -> Result<Outcome, SnapshotError> {
    let outcome = match d.u8()? {
        0 => {
            let offset = Offset(d.u64()?);
            let count = d.u64()?;
            let mut results = Vec::new();
            for _ in 0..count {
                results.push(match d.u8()? {
                    0 => None,
                    1 => Some(d.short()?.to_vec()),
                    _ => return Err(SnapshotError::Malformed("a result tag")),
                });
            }
            Outcome::Committed { offset, results }
        }
        1 => {
            let name = std::str::from_utf8(d.short()?).map_err(|_| SnapshotError::Malformed("an abort reason"))?;
            Outcome::Aborted(AbortReason::parse(name).ok_or(SnapshotError::Malformed("an abort reason"))?)
        }
        2 => Outcome::Prepared { offset: Offset(d.u64()?) },
        _ => return Err(SnapshotError::Malformed("an outcome tag")),
    };
    match &outcome {
        Outcome::Committed { offset, .. } | Outcome::Prepared { offset } if *offset >= applied => {
            Err(SnapshotError::Malformed("an outcome at or past the applied offset"))
        }
        _ => Ok(outcome),
    }
}

/// The checked body of a snapshot, and its format version.
fn snapshot_body(bytes: &[u8]) -> Result<(u16, &[u8]), SnapshotError> {
    if bytes.len() < SNAPSHOT_MAGIC.len() || bytes[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::Magic);
    }
    let mut d = Dec(&bytes[SNAPSHOT_MAGIC.len()..]);
    let truncated = |_| SnapshotError::Length { expected: SNAPSHOT_HEADER_BYTES as u64, actual: bytes.len() as u64 };
    let version = u16::from_le_bytes(d.array().map_err(truncated)?);
    if !(1..=SNAPSHOT_VERSION).contains(&version) {
        return Err(SnapshotError::Version(version));
    }
    let body_bytes = d.u64().map_err(truncated)?;
    let crc = u32::from_le_bytes(d.array().map_err(truncated)?);
    let body = d.0;
    if body.len() as u64 != body_bytes {
        return Err(SnapshotError::Length {
            expected: (SNAPSHOT_HEADER_BYTES as u64).saturating_add(body_bytes),
            actual: bytes.len() as u64,
        });
    }
    let actual = crc32c::crc32c(body);
    if actual != crc {
        return Err(SnapshotError::Checksum { expected: crc, actual });
    }
    Ok((version, body))
}

/// A little-endian encoder.
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Bytes of at most [`VALUE_BYTES_MAX`] (keys, values, results, reason names).
    fn short(&mut self, v: &[u8]) {
        let len = u32::try_from(v.len()).expect("keys and values are at most VALUE_BYTES_MAX bytes");
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(v);
    }

    fn long(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
}

/// A little-endian decoder over untrusted bytes: every read checks what is left.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], SnapshotError> {
        let n = usize::try_from(n).ok().filter(|n| *n <= self.0.len()).ok_or(SnapshotError::Malformed("truncated"))?;
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        Ok(self.take(N as u64)?.try_into().expect("take returns N bytes"))
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn short(&mut self) -> Result<&'a [u8], SnapshotError> {
        let len = u32::from_le_bytes(self.array()?);
        self.take(u64::from(len))
    }

    fn long(&mut self) -> Result<&'a [u8], SnapshotError> {
        let len = self.u64()?;
        self.take(len)
    }
}

/// Snapshot layout (little-endian): magic `SKTB` | format version u16 | body bytes u64 |
/// CRC32C of the body u32 | body. Body: applied u64 | keys u64, each: key (u32 length,
/// bytes), versions u64, each: offset u64, tag u8 (0 deleted, 1 present: value as u32 length,
/// bytes) | prepared u64, each: producer i64, record offset u64, part (u64 length, record
/// value bytes) | outcomes u64 oldest first, each: txn u64, tag u8 (0 committed: offset u64,
/// results u64, each tag u8 (0 none, 1 u32 length, bytes); 1 aborted: reason name as u32
/// length, bytes; 2 prepared: offset u64).
const SNAPSHOT_MAGIC: [u8; 4] = *b"SKTB";
const SNAPSHOT_VERSION: u16 = 2;
const SNAPSHOT_HEADER_BYTES: usize = 4 + 2 + 8 + 4;

const _: () = assert!(VALUE_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(KEY_BYTES_MAX <= VALUE_BYTES_MAX);

#[cfg(test)]
mod tests;
