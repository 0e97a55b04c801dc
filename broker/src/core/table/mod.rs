//! Tables on the log: a table is a keyed state machine over a replicated, hash-partitioned
//! topic. Every replica of a table partition applies its committed records in offset order
//! into a multi-version store ([`store::TableMachine`], a version is the offset that wrote
//! it), so a table's state is a deterministic function of its partitions' committed records.
//!
//! - [`store`]: the machine: versions, validation of a transaction's part at its log position
//!   (the same decision on every replica), deterministic procedures (serial execution),
//!   parts prepared inside a log transaction and decided by its marker, snapshots.
//! - [`locks`]: the lock table of two-phase locking on a partition's leader: shared and
//!   exclusive key locks, range locks against phantoms, wound-wait against deadlocks.
//! - [`ssi`]: serializable snapshot isolation's read-write antidependency tracking on a
//!   partition's leader (PostgreSQL's design): abort only on a dangerous structure.
//! - [`leader`]: what a partition's leader does with a table request, driven by the runtime
//!   and by the simulator alike.
//!
//! Records are [`skein_client::wire::TableRecord`]s, decoded once, here, into [`Part`].

pub mod index;
pub mod leader;
pub mod locks;
pub mod ssi;
pub mod store;

use std::fmt;

use bytes::BytesMut;
use skein_client::wire::{Reader, TableRecord, TableStep, Wire, Writer};

use super::Offset;

/// The longest key accepted (bytes).
pub const KEY_BYTES_MAX: usize = 1024;
/// The largest value accepted (bytes).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// The record format version this build writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// The topic config marking a topic as a table (`"true"`).
pub const TABLE_CONFIG: &str = "table";
/// The topic config naming a table's default isolation level.
pub const ISOLATION_CONFIG: &str = "table.isolation";

pub use skein_client::wire::Level;

/// Takes a table's settings (`table`, `table.isolation`) out of a topic's configs: `Some`
/// (its default level) for a table, `None` for a plain topic; an error names a bad value.
pub fn table_config(configs: &mut std::collections::BTreeMap<String, String>) -> Result<Option<Level>, String> {
    let table = configs.remove(TABLE_CONFIG);
    let level = configs.remove(ISOLATION_CONFIG);
    match (table.as_deref(), level) {
        (None | Some("false"), None) => Ok(None),
        (None | Some("false"), Some(_)) => Err(format!("{ISOLATION_CONFIG} needs {TABLE_CONFIG}=true")),
        (Some("true"), None) => Ok(Some(Level::default())),
        (Some("true"), Some(l)) => Level::parse(&l)
            .map(Some)
            .ok_or_else(|| format!("{ISOLATION_CONFIG}: unknown isolation level '{}'", skein_client::wire::shown(&l))),
        (Some(v), _) => Err(format!("{TABLE_CONFIG}: '{}' is not true or false", skein_client::wire::shown(v))),
    }
}

/// A table transaction's id, chosen by its client (unique per client process and transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnId(pub u64);

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{:x}", self.0)
    }
}

/// Wound-wait priority: the older transaction (smaller start, then smaller id) wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority {
    /// Its start, microseconds of wall time as its client saw it.
    pub begin_us: u64,
    /// Tie-break.
    pub txn: TxnId,
}

/// A key (at most [`KEY_BYTES_MAX`] bytes).
pub type Key = Vec<u8>;
/// A value (at most [`VALUE_BYTES_MAX`] bytes).
pub type Value = Vec<u8>;

/// A half-open key range `[from, to)`; `to` None: to the end of the key space.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// First key in the range.
    pub from: Key,
    /// First key after it (None: unbounded).
    pub to: Option<Key>,
}

impl Range {
    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.from.as_slice() && self.to.as_ref().is_none_or(|t| key < t.as_slice())
    }

    /// Whether the two ranges share a key.
    pub fn overlaps(&self, other: &Range) -> bool {
        let starts_before_other_ends = other.to.as_ref().is_none_or(|t| self.from < *t);
        let other_starts_before_end = self.to.as_ref().is_none_or(|t| other.from < *t);
        starts_before_other_ends && other_starts_before_end
    }
}

/// One step of a deterministic procedure (serial execution): the client's type, so a
/// procedure has one definition from the application to every replica that runs it (decoded
/// here from the wire by `step`, encoded by `Step::to_wire`).
pub use skein_client::table::Step;

/// A transaction's part in one partition, as its record holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Whose.
    pub txn: TxnId,
    /// Its level (which validation applies).
    pub level: Level,
    /// The offset of this partition it read at (every version below it was visible).
    pub snapshot: Offset,
    /// Keys read and the version seen (None: absent).
    pub reads: Vec<(Key, Option<Offset>)>,
    /// Ranges scanned (predicate reads).
    pub ranges: Vec<Range>,
    /// Writes (None: delete), at most one per key.
    pub writes: Vec<(Key, Option<Value>)>,
    /// A deterministic procedure, run at the record's log position.
    pub steps: Vec<Step>,
}

/// A record or request that does not decode into a [`Part`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartError {
    /// The bytes are not a table record.
    #[error("not a table record: {0}")]
    Decode(String),
    /// A record format this build does not know.
    #[error("table record version {0} is not known to this build")]
    Version(u8),
    /// An unknown isolation level code.
    #[error("unknown isolation level code {0}")]
    Level(u8),
    /// An unknown procedure step.
    #[error("unknown procedure step kind {0}")]
    Step(u8),
    /// A key longer than [`KEY_BYTES_MAX`].
    #[error("a key of {0} bytes is longer than the {KEY_BYTES_MAX} allowed")]
    KeyTooLarge(usize),
    /// A value larger than [`VALUE_BYTES_MAX`].
    #[error("a value of {0} bytes is larger than the {VALUE_BYTES_MAX} allowed")]
    ValueTooLarge(usize),
    /// The same key written twice.
    #[error("a key is written twice in one part")]
    DuplicateWrite,
}

fn key(k: &BytesMut) -> Result<Key, PartError> {
    if k.len() > KEY_BYTES_MAX {
        return Err(PartError::KeyTooLarge(k.len()));
    }
    Ok(k.to_vec())
}

fn value(v: &BytesMut) -> Result<Value, PartError> {
    if v.len() > VALUE_BYTES_MAX {
        return Err(PartError::ValueTooLarge(v.len()));
    }
    Ok(v.to_vec())
}

fn version(v: i64) -> Option<Offset> {
    u64::try_from(v).ok().map(Offset)
}

/// The wire form of a version (-1: none).
pub fn version_code(v: Option<Offset>) -> i64 {
    v.map_or(-1, |o| o.0 as i64)
}

/// The range `[from, to)` of the wire (an empty `to`: unbounded).
pub fn range_of(from: &BytesMut, to: &BytesMut) -> Result<Range, PartError> {
    Ok(Range { from: key(from)?, to: if to.is_empty() { None } else { Some(key(to)?) } })
}

impl Part {
    /// Decodes a record's value.
    pub fn decode(bytes: &[u8]) -> Result<Part, PartError> {
        let mut r = Reader::new(BytesMut::from(bytes));
        let rec = TableRecord::decode(&mut r).map_err(|e| PartError::Decode(e.to_string()))?;
        r.finish().map_err(|e| PartError::Decode(e.to_string()))?;
        Part::from_wire(&rec)
    }

    /// The typed form of a wire record (checks limits, levels, steps).
    pub fn from_wire(rec: &TableRecord) -> Result<Part, PartError> {
        if rec.version != RECORD_VERSION {
            return Err(PartError::Version(rec.version));
        }
        let level = Level::from_code(rec.level).ok_or(PartError::Level(rec.level))?;
        let reads = rec.reads.iter().map(|e| Ok((key(&e.key)?, version(e.version)))).collect::<Result<_, _>>()?;
        let ranges = rec.ranges.iter().map(|r| range_of(&r.from, &r.to)).collect::<Result<_, _>>()?;
        let mut writes: Vec<(Key, Option<Value>)> = rec
            .writes
            .iter()
            .map(|w| Ok((key(&w.key)?, w.value.as_ref().map(value).transpose()?)))
            .collect::<Result<_, PartError>>()?;
        let mut seen: Vec<&Key> = writes.iter().map(|(k, _)| k).collect();
        seen.sort();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(PartError::DuplicateWrite);
        }
        writes.sort_by(|a, b| a.0.cmp(&b.0));
        let steps = rec.steps.iter().map(step).collect::<Result<_, _>>()?;
        Ok(Part { txn: TxnId(rec.txn), level, snapshot: Offset(rec.snapshot), reads, ranges, writes, steps })
    }

    /// The wire form.
    pub fn to_wire(&self) -> TableRecord {
        use skein_client::wire::{TableRange, TableReadEntry, TableWrite};
        TableRecord {
            version: RECORD_VERSION,
            txn: self.txn.0,
            level: self.level.code(),
            snapshot: self.snapshot.0,
            reads: self
                .reads
                .iter()
                .map(|(k, v)| TableReadEntry { key: BytesMut::from(&k[..]), version: version_code(*v) })
                .collect(),
            ranges: self
                .ranges
                .iter()
                .map(|r| TableRange {
                    from: BytesMut::from(&r.from[..]),
                    to: r.to.as_ref().map_or_else(BytesMut::new, |t| BytesMut::from(&t[..])),
                })
                .collect(),
            writes: self
                .writes
                .iter()
                .map(|(k, v)| TableWrite {
                    key: BytesMut::from(&k[..]),
                    value: v.as_ref().map(|v| BytesMut::from(&v[..])),
                })
                .collect(),
            steps: self.steps.iter().map(Step::to_wire).collect(),
        }
    }

    /// The record value.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer { buf: Vec::new() };
        self.to_wire().encode(&mut w);
        w.buf
    }

    /// Whether it changes anything (else: a read-only part, which appends nothing).
    pub fn writes_anything(&self) -> bool {
        !self.writes.is_empty() || !self.steps.is_empty()
    }

    /// Every key it writes (its writes and its procedure's).
    pub fn written_keys(&self) -> Vec<&[u8]> {
        let mut keys: Vec<&[u8]> = self.writes.iter().map(|(k, _)| k.as_slice()).collect();
        for s in &self.steps {
            keys.extend(s.keys());
        }
        keys
    }
}

fn step(s: &TableStep) -> Result<Step, PartError> {
    let opt = |v: &Option<BytesMut>| v.as_ref().map(value).transpose();
    Ok(match s.kind {
        0 => Step::Put { key: key(&s.key)?, value: s.value.as_ref().map(value).transpose()?.unwrap_or_default() },
        1 => Step::Delete { key: key(&s.key)? },
        2 => Step::CompareAndSet { key: key(&s.key)?, expect: opt(&s.expect)?, value: opt(&s.value)? },
        3 => Step::Increment { key: key(&s.key)?, amount: s.amount },
        4 => Step::Transfer { from: key(&s.key)?, to: key(&s.key2)?, amount: s.amount },
        5 => Step::Append { key: key(&s.key)?, value: s.value.as_ref().map(value).transpose()?.unwrap_or_default() },
        k => return Err(PartError::Step(k)),
    })
}

/// Why a transaction (or its part here) did not commit: the reason word the CLI prints
/// after `aborted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// The client asked.
    User,
    /// A key it read has a newer committed version than the one read (log-order validation).
    StaleRead,
    /// A range it scanned gained or lost a row after its snapshot (a phantom).
    Phantom,
    /// A key it writes was committed by another transaction after its snapshot (first
    /// committer wins).
    WriteConflict,
    /// A key it reads or writes belongs to a transaction prepared and not yet decided.
    Prepared,
    /// SSI: it would complete a dangerous structure of read-write antidependencies.
    Dangerous,
    /// Wound-wait: an older transaction needed its lock.
    Wounded,
    /// Past its timeout.
    Timeout,
    /// The partition's leader changed under it (locks and read tracking were lost).
    LeaderChanged,
    /// Another partition of the same transaction voted no (or the transaction was ended
    /// without this partition: a newer transaction of its producer began here).
    OtherPartition,
    /// Its snapshot is more than the snapshot window (`store::SNAPSHOT_WINDOW` offsets)
    /// behind the partition's log: the versions it would be checked against may be pruned.
    SnapshotTooOld,
    /// A split or merge sealed a partition it uses: its keys now live in the partition's
    /// children (begin again; the client routes by the new ranges).
    Sealed,
}

impl AbortReason {
    /// The word shown.
    pub fn name(&self) -> &'static str {
        match self {
            AbortReason::User => "user",
            AbortReason::StaleRead => "stale-read",
            AbortReason::Phantom => "phantom",
            AbortReason::WriteConflict => "write-conflict",
            AbortReason::Prepared => "prepared-conflict",
            AbortReason::Dangerous => "dangerous-structure",
            AbortReason::Wounded => "wounded",
            AbortReason::Timeout => "timeout",
            AbortReason::LeaderChanged => "leader-changed",
            AbortReason::OtherPartition => "other-partition",
            AbortReason::SnapshotTooOld => "snapshot-too-old",
            AbortReason::Sealed => "partition-sealed",
        }
    }

    /// The reason named `s`.
    pub fn parse(s: &str) -> Option<AbortReason> {
        use AbortReason::*;
        [
            User,
            StaleRead,
            Phantom,
            WriteConflict,
            Prepared,
            Dangerous,
            Wounded,
            Timeout,
            LeaderChanged,
            OtherPartition,
            SnapshotTooOld,
            Sealed,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_bad_bytes_are_errors() {
        let part = Part {
            txn: TxnId(7),
            level: Level::Serializable,
            snapshot: Offset(12),
            reads: vec![(b"x".to_vec(), Some(Offset(3))), (b"y".to_vec(), None)],
            ranges: vec![
                Range { from: b"a".to_vec(), to: None },
                Range { from: b"a".to_vec(), to: Some(b"m".to_vec()) },
            ],
            writes: vec![(b"x".to_vec(), Some(b"11".to_vec())), (b"z".to_vec(), None)],
            steps: vec![Step::Transfer { from: b"a".to_vec(), to: b"b".to_vec(), amount: 1 }],
        };
        assert_eq!(Part::decode(&part.encode()), Ok(part.clone()));
        let bytes = part.encode();
        for cut in 0..bytes.len() {
            assert!(Part::decode(&bytes[..cut]).is_err(), "a record cut at {cut} decoded");
        }
        let mut long = part.clone();
        long.writes[0].0 = vec![b'k'; KEY_BYTES_MAX + 1];
        assert_eq!(Part::decode(&long.encode()), Err(PartError::KeyTooLarge(KEY_BYTES_MAX + 1)));
        let mut twice = part;
        twice.writes[1].0 = b"x".to_vec();
        assert_eq!(Part::decode(&twice.encode()), Err(PartError::DuplicateWrite));
    }

    #[test]
    fn ranges_overlap_as_half_open_intervals() {
        let r = |f: &str, t: Option<&str>| Range { from: f.into(), to: t.map(Into::into) };
        assert!(r("a", Some("c")).contains(b"b"));
        assert!(!r("a", Some("c")).contains(b"c"));
        assert!(r("a", None).contains(b"zzz"));
        assert!(!r("a", Some("c")).overlaps(&r("c", Some("d"))));
        assert!(r("a", Some("c")).overlaps(&r("b", None)));
        assert!(r("a", None).overlaps(&r("x", None)));
        assert_eq!(Level::parse("2pl"), Some(Level::TwoPl));
        assert!(Level::ALL.iter().all(|l| Level::from_code(l.code()) == Some(*l)));
    }
}
