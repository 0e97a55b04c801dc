//! Elle-style checker of transactional histories (Kingsbury & Alvaro, "Elle: Inferring
//! Isolation Anomalies from Experimental Observations", VLDB 2020), for Skein's tables.
//!
//! A [`History`] is one transaction per JSON line: `{"process": 1, "type": "ok", "ops": [...],
//! "start_us": 10, "end_us": 20, "level": "serializable"}` (the last three optional). `type` is
//! `ok` (committed), `fail` (known not committed) or `info` (unknown outcome). Operations are
//! list-append (`["append", key, value]`, `["r", key, [values...] | null]`) or read-write
//! register (`["w", key, value]`, `["r", key, value | null]`); keys are strings (integers are
//! accepted and read as their decimal text), values `i64`, and every value is written at most
//! once per key, so a value names its writer. [`parse_history`] enforces all of this, with line
//! numbers, and never panics.
//!
//! The checks infer a dependency graph between committed transactions from what they read
//! ([`check_list_append`], [`check_rw_register`]):
//!
//! - list-append: a key's version order is its longest read (every read must be a prefix of
//!   it, else `incompatible-order`); `ww` from the writer of each element to the writer of the
//!   next, `wr` from the writer of a read's last element to the reader, `rw` from a reader to
//!   the writer of the element after its read's end.
//! - rw-register: `wr` from the writer of the value read. The version order is only what is
//!   known for sure: the initial nil comes first, and a committed transaction that read `x = a`
//!   (or nil) and then wrote `x = b` puts `a` before `b`. `ww` and `rw` edges follow from those
//!   facts alone (a read of nil: `rw` to every version with no known predecessor), so no cycle
//!   ever rests on a guessed order.
//! - with real time ([`CheckOptions::realtime`]), `realtime` edges from each transaction to
//!   those that started after it ended (a transitive reduction, so O(n x concurrency) edges).
//!
//! Anomalies (the names of [`ANOMALIES`]): `G0` (a cycle of `ww` edges), `G1a` (a committed
//! read saw a value of a failed transaction), `G1b` (a read saw a value that was not its
//! writer's last write to the key), `G1c` (a cycle of `ww` and `wr` edges with a `wr`),
//! `G-single` (a cycle with exactly one `rw` edge), `G2-item` (a cycle with two or more), their
//! `-realtime` variants (a cycle needing a `realtime` edge), and for list-append
//! `duplicate-elements` (a read holding a value twice), `incompatible-order` (two reads of a key
//! that are not prefixes of one another) and `lost-append` (an acknowledged append in no read,
//! though some read holds an element appended by a transaction that began after the append was
//! acknowledged: it uses real time even without the flag, as the log moving past an
//! acknowledged append is a durability failure whatever the isolation level promises).
//!
//! Cycles: Tarjan's strongly connected components (iterative) over index-based CSR graphs, per
//! edge mask; one example per component and anomaly, the shortest cycle through one of the
//! component's edges of the anomaly's defining kind (breadth-first). Whether an `rw` edge
//! closes a cycle of `ww`/`wr` edges (G-single rather than G2-item) is decided exactly for every
//! `rw` edge at once by bit-parallel reachability over the condensation, so a component holding
//! a G-single is never reported as G2-item only. Counts are per component, not per cycle.
//!
//! Outcomes: `info` transactions count as committed once one of their writes is read, and their
//! reads are never trusted; `fail` transactions add no edges. Whether a history is valid
//! depends on the level checked: [`forbidden`].
//!
//! Not done: predicates (G2 proper), internal consistency of a transaction's reads of its own
//! writes, process (session) order edges, and reads of values nobody wrote (skipped: they add no
//! edge). Cost: O(n + total read length) to build the graph; cycle search is free for acyclic
//! graphs and O(E x R / 64) for graphs with R `rw` edges inside cycles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// A write cycle: `ww` edges only.
pub const G0: &str = "G0";
/// Aborted read.
pub const G1A: &str = "G1a";
/// Intermediate read.
pub const G1B: &str = "G1b";
/// Circular information flow: `ww` and `wr` edges, at least one `wr`.
pub const G1C: &str = "G1c";
/// A cycle with exactly one `rw` edge (read skew).
pub const G_SINGLE: &str = "G-single";
/// A cycle with two or more `rw` edges (write skew).
pub const G2_ITEM: &str = "G2-item";
/// A cycle of `ww` and `realtime` edges (at least one `realtime`).
pub const G0_REALTIME: &str = "G0-realtime";
/// A cycle of `ww`, `wr` and `realtime` edges with a `wr` and a `realtime`.
pub const G1C_REALTIME: &str = "G1c-realtime";
/// A cycle with exactly one `rw` edge that needs a `realtime` edge.
pub const G_SINGLE_REALTIME: &str = "G-single-realtime";
/// A cycle with two or more `rw` edges that needs a `realtime` edge.
pub const G2_ITEM_REALTIME: &str = "G2-item-realtime";
/// A read holding one value twice (list-append).
pub const DUPLICATE_ELEMENTS: &str = "duplicate-elements";
/// Two reads of a key that are not prefixes of one another (list-append).
pub const INCOMPATIBLE_ORDER: &str = "incompatible-order";
/// An acknowledged append missing while later appends were read (list-append).
pub const LOST_APPEND: &str = "lost-append";

/// Every anomaly name, in report order.
pub const ANOMALIES: &[&str] = &[
    G0,
    G1A,
    G1B,
    G1C,
    G_SINGLE,
    G2_ITEM,
    G0_REALTIME,
    G1C_REALTIME,
    G_SINGLE_REALTIME,
    G2_ITEM_REALTIME,
    DUPLICATE_ELEMENTS,
    INCOMPATIBLE_ORDER,
    LOST_APPEND,
];

/// The levels [`forbidden`] knows (Skein's level names, plus `strict-serializable` and
/// `read-uncommitted`), weakest first within each group.
pub const LEVELS: &[&str] =
    &["read-uncommitted", "read-committed", "snapshot", "serializable", "serial", "2pl", "ssi", "strict-serializable"];

/// At most this many examples are kept per anomaly name; the rest are only counted.
pub const ANOMALIES_KEPT_MAX: usize = 1_000;

const STRICT: &[&str] = ANOMALIES;
const SERIALIZABLE: &[&str] =
    &[G0, G1A, G1B, G1C, G_SINGLE, G2_ITEM, DUPLICATE_ELEMENTS, INCOMPATIBLE_ORDER, LOST_APPEND];
const SNAPSHOT: &[&str] = &[G0, G1A, G1B, G1C, G_SINGLE, DUPLICATE_ELEMENTS, INCOMPATIBLE_ORDER, LOST_APPEND];
const READ_COMMITTED: &[&str] = &[G0, G1A, G1B, G1C, DUPLICATE_ELEMENTS, INCOMPATIBLE_ORDER];
const READ_UNCOMMITTED: &[&str] = &[G0, DUPLICATE_ELEMENTS, INCOMPATIBLE_ORDER];

/// The anomalies `level` forbids (Adya's PL levels, as Hermitage observes them):
/// `strict-serializable` everything; `serializable` (and Skein's `serial`, `2pl`, `ssi`)
/// everything but the `-realtime` cycles; `snapshot` also allows G2-item; `read-committed`
/// forbids G0 and G1 (G1a, G1b and G1c: Adya's PL-2 proscribes all of G1); `read-uncommitted`
/// only G0. `duplicate-elements` and `incompatible-order` break the list itself and are
/// forbidden at every level; `lost-append` at snapshot and above. An unknown level gets the
/// strictest set (a misspelt level must not pass a broken history).
///
/// When the check ran with [`CheckOptions::realtime`], the `-realtime` variant of every
/// forbidden cycle is forbidden too (see [`Report::valid`]).
pub fn forbidden(level: &str) -> &'static [&'static str] {
    match level {
        "serializable" | "serial" | "2pl" | "ssi" => SERIALIZABLE,
        "snapshot" => SNAPSHOT,
        "read-committed" => READ_COMMITTED,
        "read-uncommitted" => READ_UNCOMMITTED,
        _ => STRICT,
    }
}

/// How strong `level` is (unknown levels rank as strict), to pick the weakest of a history's
/// declared levels.
fn level_rank(level: &str) -> u8 {
    match level {
        "read-uncommitted" => 0,
        "read-committed" => 1,
        "snapshot" => 2,
        "serializable" | "serial" | "2pl" | "ssi" => 3,
        _ => 4,
    }
}

/// The data model of a history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// Lists: `append` and reads of whole lists.
    ListAppend,
    /// Registers: `w` and reads of single values.
    RwRegister,
}

impl Model {
    /// The stable name: `list-append` or `rw-register`.
    pub fn name(self) -> &'static str {
        match self {
            Model::ListAppend => "list-append",
            Model::RwRegister => "rw-register",
        }
    }

    /// The model named `name`, if any.
    pub fn from_name(name: &str) -> Option<Model> {
        match name {
            "list-append" => Some(Model::ListAppend),
            "rw-register" => Some(Model::RwRegister),
            _ => None,
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a transaction ended, as its client learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxnType {
    /// Committed.
    Ok,
    /// Known not committed.
    Fail,
    /// Unknown: may or may not have committed.
    Info,
}

impl TxnType {
    /// The JSON name: `ok`, `fail` or `info`.
    pub fn name(self) -> &'static str {
        match self {
            TxnType::Ok => "ok",
            TxnType::Fail => "fail",
            TxnType::Info => "info",
        }
    }
}

/// What a read returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadValue {
    /// `null`: the key does not exist (an empty list, an unset register), or, in an `info`
    /// transaction, unknown.
    Nil,
    /// A register's value.
    Int(i64),
    /// A list's elements, oldest first.
    List(Vec<i64>),
}

/// One micro-operation of a transaction; JSON: a 3-element array, e.g. `["append","x",3]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mop {
    /// Appends `value` to the list at `key`.
    Append {
        /// The key.
        key: String,
        /// The value, unique per key in the history.
        value: i64,
    },
    /// Writes `value` to the register at `key`.
    Write {
        /// The key.
        key: String,
        /// The value, unique per key in the history.
        value: i64,
    },
    /// Reads `key`.
    Read {
        /// The key.
        key: String,
        /// What was read.
        value: ReadValue,
    },
}

impl Mop {
    /// The key the operation touches.
    pub fn key(&self) -> &str {
        match self {
            Mop::Append { key, .. } | Mop::Write { key, .. } | Mop::Read { key, .. } => key,
        }
    }

    /// The model the operation belongs to (`None`: a read of nil, which fits both).
    pub fn model(&self) -> Option<Model> {
        match self {
            Mop::Append { .. } | Mop::Read { value: ReadValue::List(_), .. } => Some(Model::ListAppend),
            Mop::Write { .. } | Mop::Read { value: ReadValue::Int(_), .. } => Some(Model::RwRegister),
            Mop::Read { value: ReadValue::Nil, .. } => None,
        }
    }
}

/// One transaction (one line of the history).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Txn {
    /// The client session.
    pub process: u64,
    /// How it ended.
    #[serde(rename = "type")]
    pub kind: TxnType,
    /// Its operations, in order.
    pub ops: Vec<Mop>,
    /// When the client began it (microseconds, any epoch shared by the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_us: Option<u64>,
    /// When the client learnt its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_us: Option<u64>,
    /// The isolation level it ran at (one of [`LEVELS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Its line in the file (from 1; 0 for a transaction built in code).
    #[serde(skip)]
    pub line: usize,
}

/// A history: its transactions in file order (their index is how reports name them: `T3`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The transactions.
    pub txns: Vec<Txn>,
}

impl History {
    /// The model its operations belong to (`None`: no operation tells, e.g. only reads of nil).
    pub fn model(&self) -> Option<Model> {
        self.txns.iter().flat_map(|t| &t.ops).find_map(Mop::model)
    }

    /// The weakest level its transactions declare, if any declares one.
    pub fn declared_level(&self) -> Option<&str> {
        self.txns.iter().filter_map(|t| t.level.as_deref()).min_by_key(|l| level_rank(l))
    }
}

/// A history that could not be read. Lines count from 1.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The line is not one JSON transaction.
    #[error("line {line}: not a transaction: {source}")]
    Parse {
        /// The offending line.
        line: usize,
        /// What the JSON decoder objected to.
        #[source]
        source: serde_json::Error,
    },
    /// The line is a transaction the checker cannot interpret.
    #[error("line {line}: {reason}")]
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
            HistoryError::Parse { line, .. } | HistoryError::Invalid { line, .. } => *line,
        }
    }
}

/// Reads a history, one JSON transaction per line (blank lines skipped). Rejects, with the line:
/// malformed JSON, unknown fields or operations, `end_us < start_us`, unknown levels, a value
/// written twice to one key, and a history mixing list-append and register operations. Never
/// panics on any input.
pub fn parse_history(text: &str) -> Result<History, HistoryError> {
    let mut txns = Vec::new();
    let mut written: HashMap<(&str, i64), usize> = HashMap::new();
    let mut model: Option<(Model, usize)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let mut txn: Txn = serde_json::from_str(raw).map_err(|source| HistoryError::Parse { line, source })?;
        txn.line = line;
        let invalid = |reason: String| HistoryError::Invalid { line, reason };
        if let (Some(start), Some(end)) = (txn.start_us, txn.end_us) {
            if end < start {
                return Err(invalid(format!("ends at {end} us, before it starts at {start} us")));
            }
        }
        if let Some(level) = &txn.level {
            if !LEVELS.contains(&level.as_str()) {
                return Err(invalid(format!("unknown level (known: {})", LEVELS.join(", "))));
            }
        }
        for op in &txn.ops {
            match (op.model(), model) {
                (Some(m), None) => model = Some((m, line)),
                (Some(m), Some((first, first_line))) if m != first => {
                    return Err(invalid(format!(
                        "a {m} operation in a {first} history (its first {first} operation is on line {first_line})"
                    )));
                }
                _ => {}
            }
        }
        txns.push(txn);
    }
    // Uniqueness is checked after parsing so that the map may borrow the parsed keys.
    for txn in &txns {
        for op in &txn.ops {
            let (Mop::Append { key, value } | Mop::Write { key, value }) = op else { continue };
            if let Some(first) = written.insert((key.as_str(), *value), txn.line) {
                return Err(HistoryError::Invalid {
                    line: txn.line,
                    reason: format!(
                        "value {value} already written to key {key:?} on line {first} (values must be unique per key)"
                    ),
                });
            }
        }
    }
    Ok(History { txns })
}

/// How to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    /// Add real-time edges (strict serializability): implied by level `strict-serializable`.
    pub realtime: bool,
    /// The level checked (one of [`LEVELS`]): decides which anomalies make the history invalid.
    pub level: String,
}

impl Default for CheckOptions {
    fn default() -> CheckOptions {
        CheckOptions { realtime: false, level: "serializable".to_owned() }
    }
}

/// The kind of a dependency edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeKind {
    /// Write-write: `from` installed the version just before `to`'s.
    Ww,
    /// Write-read: `to` read what `from` wrote.
    Wr,
    /// Read-write (anti-dependency): `from` read a version before the one `to` wrote.
    Rw,
    /// Real time: `from` ended before `to` started.
    Realtime,
}

impl EdgeKind {
    fn name(self) -> &'static str {
        match self {
            EdgeKind::Ww => "ww",
            EdgeKind::Wr => "wr",
            EdgeKind::Rw => "rw",
            EdgeKind::Realtime => "realtime",
        }
    }
}

/// One edge of an anomaly's cycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    /// The source transaction (its index in the history).
    pub from: usize,
    /// The target transaction.
    pub to: usize,
    /// The dependency.
    pub kind: EdgeKind,
    /// The key it was inferred on (none for `realtime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Why the edge exists, in a sentence.
    pub detail: String,
}

/// A transaction involved in an anomaly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRef {
    /// Its index in the history (`T{index}` in details).
    pub index: usize,
    /// Its line in the file.
    pub line: usize,
    /// Its process.
    pub process: u64,
    /// How it ended.
    #[serde(rename = "type")]
    pub kind: TxnType,
    /// Its operations.
    pub ops: Vec<Mop>,
}

/// One anomaly found, with its explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// A sentence stating it, naming transactions as `T{index}`.
    pub detail: String,
    /// The transactions involved (for a cycle: in cycle order).
    pub txns: Vec<TxnRef>,
    /// The cycle's edges, for cycle anomalies (`cycle[i].to == cycle[i + 1].from`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycle: Vec<Edge>,
    /// The keys involved.
    pub keys: Vec<String>,
}

/// What a check found. JSON via serde.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// True iff no anomaly the level forbids was found ([`forbidden`]; with `realtime`, the
    /// `-realtime` variants of forbidden cycles count too).
    pub valid: bool,
    /// The model checked.
    pub model: Model,
    /// The level checked.
    pub level: String,
    /// Whether real-time edges were used.
    pub realtime: bool,
    /// Transactions in the history.
    pub txns: usize,
    /// Of which committed (`ok`).
    pub ok: usize,
    /// Of which failed.
    pub fail: usize,
    /// Of which of unknown outcome.
    pub info: usize,
    /// The anomalies found that the level forbids, in [`ANOMALIES`] order (empty iff valid).
    pub forbidden_found: Vec<String>,
    /// How many of each anomaly were found (cycles: one per strongly connected component).
    pub counts: BTreeMap<String, usize>,
    /// The first examples of each ([`ANOMALIES_KEPT_MAX`] at most per name).
    pub anomalies: BTreeMap<String, Vec<Anomaly>>,
}

impl Report {
    /// How many `name` anomalies were found.
    pub fn count(&self, name: &str) -> usize {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} transactions ({} ok, {} fail, {} info), model {}, level {}{}",
            self.txns,
            self.ok,
            self.fail,
            self.info,
            self.model,
            self.level,
            if self.realtime { ", real time" } else { "" }
        )?;
        for name in ANOMALIES {
            let count = self.count(name);
            if count == 0 {
                continue;
            }
            let verdict = if self.forbidden_found.iter().any(|n| n == name) { "forbidden" } else { "allowed" };
            writeln!(f, "{name:<20}{count:>8}  {verdict}")?;
            let Some(example) = self.anomalies.get(*name).and_then(|v| v.first()) else { continue };
            writeln!(f, "    {}", example.detail)?;
            for edge in &example.cycle {
                writeln!(f, "      {}", edge.detail)?;
            }
            for txn in &example.txns {
                let ops = abbreviated(&txn.ops);
                writeln!(
                    f,
                    "      T{} (line {}, process {}, {}): {ops}",
                    txn.index,
                    txn.line,
                    txn.process,
                    txn.kind.name()
                )?;
            }
        }
        if self.valid {
            writeln!(f, "valid")
        } else {
            writeln!(f, "invalid: {}", self.forbidden_found.join(", "))
        }
    }
}

/// Operations as JSON, with long lists cut to their first and last elements (the summary is for
/// people; the JSON report holds them whole).
fn abbreviated(ops: &[Mop]) -> String {
    const ENDS: usize = 3;
    let text: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Mop::Read { key, value: ReadValue::List(v) } if v.len() > 2 * ENDS + 1 => {
                let head: Vec<String> = v[..ENDS].iter().map(i64::to_string).collect();
                let tail: Vec<String> = v[v.len() - ENDS..].iter().map(i64::to_string).collect();
                let key = serde_json::to_string(key).unwrap_or_default();
                format!("[\"r\",{key},[{},..{} more..,{}]]", head.join(","), v.len() - 2 * ENDS, tail.join(","))
            }
            _ => serde_json::to_string(op).unwrap_or_default(),
        })
        .collect();
    format!("[{}]", text.join(","))
}

/// [`check_list_append_with`] at level serializable, without real time.
pub fn check_list_append(h: &History) -> Report {
    check(h, Model::ListAppend, &CheckOptions::default())
}

/// [`check_rw_register_with`] at level serializable, without real time.
pub fn check_rw_register(h: &History) -> Report {
    check(h, Model::RwRegister, &CheckOptions::default())
}

/// Checks a list-append history (register operations in it are ignored).
pub fn check_list_append_with(h: &History, opts: &CheckOptions) -> Report {
    check(h, Model::ListAppend, opts)
}

/// Checks a read-write register history (list operations in it are ignored).
pub fn check_rw_register_with(h: &History, opts: &CheckOptions) -> Report {
    check(h, Model::RwRegister, opts)
}

/// Checks `h` as a `model` history. Deterministic; never panics.
pub fn check(h: &History, model: Model, opts: &CheckOptions) -> Report {
    let realtime = opts.realtime || level_rank(&opts.level) == 4;
    let mut cx = Ctx::new(h);
    match model {
        Model::ListAppend => cx.list_append(),
        Model::RwRegister => cx.rw_register(),
    }
    if realtime {
        cx.realtime_edges();
    }
    let graph = Graph::build(h.txns.len(), std::mem::take(&mut cx.edges));
    cx.cycles(&graph, realtime);
    cx.report(model, &opts.level, realtime)
}

impl Serialize for ReadValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ReadValue::Nil => s.serialize_unit(),
            ReadValue::Int(v) => s.serialize_i64(*v),
            ReadValue::List(values) => values.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ReadValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ReadValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ReadValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null, an integer or a list of integers")
            }
            fn visit_unit<E: de::Error>(self) -> Result<ReadValue, E> {
                Ok(ReadValue::Nil)
            }
            fn visit_none<E: de::Error>(self) -> Result<ReadValue, E> {
                Ok(ReadValue::Nil)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ReadValue, E> {
                Ok(ReadValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ReadValue, E> {
                i64::try_from(v).map(ReadValue::Int).map_err(|_| E::custom("value out of i64 range"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ReadValue, A::Error> {
                let mut values = Vec::new();
                while let Some(v) = seq.next_element::<i64>()? {
                    values.push(v);
                }
                Ok(ReadValue::List(values))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Mop {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(3))?;
        match self {
            Mop::Append { key, value } => {
                seq.serialize_element("append")?;
                seq.serialize_element(key)?;
                seq.serialize_element(value)?;
            }
            Mop::Write { key, value } => {
                seq.serialize_element("w")?;
                seq.serialize_element(key)?;
                seq.serialize_element(value)?;
            }
            Mop::Read { key, value } => {
                seq.serialize_element("r")?;
                seq.serialize_element(key)?;
                seq.serialize_element(value)?;
            }
        }
        seq.end()
    }
}

/// A key as JSON may spell it: a string, or an integer (read as its decimal text).
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyText, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key (a string or an integer)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<KeyText, E> {
                Ok(KeyText(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Mop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mop, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Mop;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an operation ["append"|"w"|"r", key, value]"#)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Mop, A::Error> {
                let function: String = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let KeyText(key) = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let missing = || de::Error::invalid_length(2, &self);
                let mop = match function.as_str() {
                    "append" => Mop::Append { key, value: seq.next_element()?.ok_or_else(missing)? },
                    "w" => Mop::Write { key, value: seq.next_element()?.ok_or_else(missing)? },
                    "r" => Mop::Read { key, value: seq.next_element()?.ok_or_else(missing)? },
                    _ => return Err(de::Error::custom(r#"unknown operation (expected "append", "w" or "r")"#)),
                };
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(4, &self));
                }
                Ok(mop)
            }
        }
        d.deserialize_seq(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Inference.

const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const RT: u8 = 8;
const ALL: u8 = WW | WR | RW | RT;

/// Why an edge exists (keys interned; values as read or written).
#[derive(Clone, Copy, Debug)]
enum Why {
    /// `from` wrote `before`, `to` wrote `after`, the next version.
    Ww { key: u32, before: i64, after: i64 },
    /// `to` read `value` (a list's last element), written by `from`.
    Wr { key: u32, value: i64 },
    /// `from` read up to `read` (`None`: empty or nil), `to` wrote `next`, a later version.
    Rw { key: u32, read: Option<i64>, next: i64 },
    /// `from` ended before `to` started.
    Realtime { end_us: u64, start_us: u64 },
}

#[derive(Clone, Copy, Debug)]
struct RawEdge {
    from: u32,
    to: u32,
    kind: u8,
    why: Why,
}

/// Who wrote a (key, value): the transaction, and whether it was its last write to the key.
#[derive(Clone, Copy, Debug)]
struct Writer {
    txn: u32,
    last: bool,
}

/// Findings: counts and the first examples, per anomaly name.
#[derive(Default)]
struct Findings {
    counts: BTreeMap<&'static str, usize>,
    kept: BTreeMap<&'static str, Vec<Anomaly>>,
}

struct Ctx<'h> {
    h: &'h History,
    keys: Vec<&'h str>,
    key_ids: HashMap<&'h str, u32>,
    writers: HashMap<(u32, i64), Writer>,
    /// Info transactions with a write some committed read saw: they committed.
    observed: Vec<bool>,
    edges: Vec<RawEdge>,
    findings: Findings,
    list: bool,
}

impl<'h> Ctx<'h> {
    fn new(h: &'h History) -> Ctx<'h> {
        Ctx {
            h,
            keys: Vec::new(),
            key_ids: HashMap::new(),
            writers: HashMap::new(),
            observed: vec![false; h.txns.len()],
            edges: Vec::new(),
            findings: Findings::default(),
            list: true,
        }
    }

    fn key(&mut self, key: &'h str) -> u32 {
        let next = self.keys.len() as u32;
        *self.key_ids.entry(key).or_insert_with(|| {
            self.keys.push(key);
            next
        })
    }

    fn kind(&self, txn: u32) -> TxnType {
        self.h.txns[txn as usize].kind
    }

    /// Records the writer of every append (list) or write (register); a value written twice
    /// (which [`parse_history`] rejects) keeps its first writer.
    fn index_writers(&mut self, list: bool) {
        let mut seen: HashSet<u32> = HashSet::new();
        for (t, txn) in self.h.txns.iter().enumerate() {
            seen.clear();
            for op in txn.ops.iter().rev() {
                let (key, value) = match (op, list) {
                    (Mop::Append { key, value }, true) | (Mop::Write { key, value }, false) => (key, *value),
                    _ => continue,
                };
                let k = self.key(key);
                let last = seen.insert(k);
                self.writers.entry((k, value)).or_insert(Writer { txn: t as u32, last });
            }
        }
    }

    fn edge(&mut self, from: u32, to: u32, kind: u8, why: Why) {
        if from != to {
            self.edges.push(RawEdge { from, to, kind, why });
        }
    }

    /// Counts an anomaly, building its example only while fewer than the maximum are kept.
    fn found(&mut self, name: &'static str, build: impl FnOnce(&Ctx<'h>) -> Anomaly) {
        *self.findings.counts.entry(name).or_insert(0) += 1;
        let kept = self.findings.kept.get(name).map_or(0, Vec::len);
        if kept < ANOMALIES_KEPT_MAX {
            let anomaly = build(self);
            self.findings.kept.entry(name).or_default().push(anomaly);
        }
    }

    fn txn_ref(&self, t: u32) -> TxnRef {
        let txn = &self.h.txns[t as usize];
        TxnRef { index: t as usize, line: txn.line, process: txn.process, kind: txn.kind, ops: txn.ops.clone() }
    }

    fn simple(&self, detail: String, txns: &[u32], key: u32) -> Anomaly {
        Anomaly {
            detail,
            txns: txns.iter().map(|&t| self.txn_ref(t)).collect(),
            cycle: Vec::new(),
            keys: vec![self.keys[key as usize].to_owned()],
        }
    }

    /// The committed reads of the history in `model`: (reader, key, what it read).
    fn reads(&mut self, list: bool) -> Vec<(u32, u32, &'h ReadValue)> {
        let mut reads = Vec::new();
        let h = self.h;
        for (t, txn) in h.txns.iter().enumerate() {
            if txn.kind != TxnType::Ok {
                continue;
            }
            for op in &txn.ops {
                let Mop::Read { key, value } = op else { continue };
                let fits = match value {
                    ReadValue::Nil => true,
                    ReadValue::List(_) => list,
                    ReadValue::Int(_) => !list,
                };
                if fits {
                    let k = self.key(key);
                    reads.push((t as u32, k, value));
                }
            }
        }
        reads
    }
}

// List-append.
impl<'h> Ctx<'h> {
    fn list_append(&mut self) {
        self.list = true;
        self.index_writers(true);
        let reads = self.reads(true);
        // Per key: the reads (reader, elements), in history order.
        let mut by_key: Vec<Vec<(u32, &'h [i64])>> = vec![Vec::new(); self.keys.len()];
        for &(t, k, value) in &reads {
            let elements: &[i64] = match value {
                ReadValue::List(v) => v,
                _ => &[],
            };
            by_key[k as usize].push((t, elements));
        }
        // Per key: the last append of each committed transaction, in a stable order.
        let mut ok_appends: Vec<Vec<(u32, i64)>> = vec![Vec::new(); self.keys.len()];
        for (&(k, v), w) in &self.writers {
            if w.last && self.kind(w.txn) == TxnType::Ok {
                ok_appends[k as usize].push((w.txn, v));
            }
        }
        ok_appends.iter_mut().for_each(|a| a.sort_unstable());
        let mut aborted_seen: HashSet<(u32, i64)> = HashSet::new();
        let mut latest: Vec<Option<(u64, i64, u32)>> = vec![None; self.keys.len()];
        for (k, key_reads) in by_key.iter().enumerate() {
            let k = k as u32;
            let Some(&(longest_reader, longest)) = key_reads.iter().max_by(|a, b| {
                // The longest read, the first of equals.
                a.1.len().cmp(&b.1.len()).then(b.0.cmp(&a.0))
            }) else {
                continue;
            };
            let mut trusted = longest.len();
            for &(reader, elements) in key_reads {
                if longest.starts_with(elements) {
                    continue;
                }
                let at = elements.iter().zip(longest).take_while(|(a, b)| a == b).count();
                trusted = trusted.min(at);
                self.incompatible(k, (reader, elements), (longest_reader, longest), at);
                self.elements(k, reader, elements, &mut aborted_seen, &mut latest);
            }
            self.elements(k, longest_reader, longest, &mut aborted_seen, &mut latest);
            self.list_ww(k, &longest[..trusted]);
            for &(reader, elements) in key_reads {
                self.list_read_edges(k, reader, elements, longest, trusted);
            }
            if trusted == longest.len() {
                self.unread_appends(k, key_reads, longest, &ok_appends[k as usize]);
            }
        }
        self.lost_appends(&by_key, &latest);
    }

    /// Committed appends no read saw come after every element read (had one been installed
    /// before the longest read's state, that read would hold it): `ww` from the writer of the
    /// last element read to each, and `rw` from each read of the whole order (or of the empty
    /// list, when nothing was read) to each.
    fn unread_appends(&mut self, k: u32, key_reads: &[(u32, &[i64])], longest: &[i64], appends: &[(u32, i64)]) {
        let seen: HashSet<i64> = longest.iter().copied().collect();
        // A transaction with an element read is no unread writer: its other appends are
        // intermediate or torn reads (G1b), not later versions.
        let writers_seen: HashSet<u32> =
            longest.iter().filter_map(|v| self.writers.get(&(k, *v))).map(|w| w.txn).collect();
        let unread: Vec<(u32, i64)> =
            appends.iter().copied().filter(|(t, v)| !seen.contains(v) && !writers_seen.contains(t)).collect();
        if unread.is_empty() {
            return;
        }
        if let Some(&end) = longest.last() {
            if let Some(w) = self.writers.get(&(k, end)).copied().filter(|w| self.kind(w.txn) != TxnType::Fail) {
                for &(t, v) in &unread {
                    self.edge(w.txn, t, WW, Why::Ww { key: k, before: end, after: v });
                }
            }
        }
        for &(reader, elements) in key_reads {
            if elements.len() == longest.len() {
                for &(t, v) in &unread {
                    self.edge(reader, t, RW, Why::Rw { key: k, read: elements.last().copied(), next: v });
                }
            }
        }
    }

    fn incompatible(&mut self, k: u32, (reader, elements): (u32, &[i64]), (other, longest): (u32, &[i64]), at: usize) {
        self.found(INCOMPATIBLE_ORDER, |cx| {
            let shown = |v: &[i64]| v.get(at).map_or("its end".to_owned(), |x| x.to_string());
            cx.simple(
                format!(
                    "T{reader} read {} ({} elements) and T{other} read it as {} elements; they differ at index {at}: {} vs {}",
                    cx.keys[k as usize],
                    elements.len(),
                    longest.len(),
                    shown(elements),
                    shown(longest)
                ),
                &[reader, other],
                k,
            )
        });
    }

    /// Per-element checks of one read: duplicates, aborted reads, info writers seen, and the
    /// latest-starting writer seen (for lost appends).
    fn elements(
        &mut self,
        k: u32,
        reader: u32,
        elements: &[i64],
        aborted_seen: &mut HashSet<(u32, i64)>,
        latest: &mut [Option<(u64, i64, u32)>],
    ) {
        let mut seen: HashMap<i64, usize> = HashMap::with_capacity(elements.len());
        for (i, &v) in elements.iter().enumerate() {
            if let Some(first) = seen.insert(v, i) {
                self.found(DUPLICATE_ELEMENTS, |cx| {
                    cx.simple(
                        format!(
                            "T{reader} read {} holding {v} twice (at indices {first} and {i})",
                            cx.keys[k as usize]
                        ),
                        &[reader],
                        k,
                    )
                });
            }
            let Some(w) = self.writers.get(&(k, v)).copied() else { continue };
            match self.kind(w.txn) {
                TxnType::Fail if aborted_seen.insert((k, v)) => self.aborted_read(k, v, w.txn, reader),
                TxnType::Info => self.observed[w.txn as usize] = true,
                _ => {}
            }
            if let Some(start) = self.h.txns[w.txn as usize].start_us {
                let slot = &mut latest[k as usize];
                if slot.is_none_or(|(s, _, _)| start > s) {
                    *slot = Some((start, v, reader));
                }
            }
        }
    }

    fn aborted_read(&mut self, k: u32, v: i64, writer: u32, reader: u32) {
        self.found(G1A, |cx| {
            cx.simple(
                format!("T{reader} read {v} from {}, written by T{writer}, which failed", cx.keys[k as usize]),
                &[writer, reader],
                k,
            )
        });
    }

    fn list_ww(&mut self, k: u32, order: &[i64]) {
        for pair in order.windows(2) {
            let (Some(a), Some(b)) =
                (self.writers.get(&(k, pair[0])).copied(), self.writers.get(&(k, pair[1])).copied())
            else {
                continue;
            };
            if self.kind(a.txn) != TxnType::Fail && self.kind(b.txn) != TxnType::Fail {
                self.edge(a.txn, b.txn, WW, Why::Ww { key: k, before: pair[0], after: pair[1] });
            }
        }
    }

    /// wr (and G1b) from the read's last element; rw to the writer of the next element.
    fn list_read_edges(&mut self, k: u32, reader: u32, elements: &[i64], longest: &[i64], trusted: usize) {
        if let Some(&last) = elements.last() {
            if let Some(w) = self.writers.get(&(k, last)).copied() {
                if w.txn != reader && self.kind(w.txn) != TxnType::Fail {
                    self.edge(w.txn, reader, WR, Why::Wr { key: k, value: last });
                    if !w.last {
                        self.intermediate(k, last, w.txn, reader);
                    }
                }
            }
        }
        if elements.len() < trusted && longest.starts_with(elements) {
            let next = longest[elements.len()];
            if let Some(w) = self.writers.get(&(k, next)).copied() {
                if self.kind(w.txn) != TxnType::Fail {
                    self.edge(reader, w.txn, RW, Why::Rw { key: k, read: elements.last().copied(), next });
                }
            }
        }
    }

    fn intermediate(&mut self, k: u32, v: i64, writer: u32, reader: u32) {
        self.found(G1B, |cx| {
            let what = if cx.list { "the last element" } else { "the value" };
            cx.simple(
                format!(
                    "T{reader} read {} with {what} {v}, an intermediate write of T{writer} (not its last write to the key)",
                    cx.keys[k as usize]
                ),
                &[writer, reader],
                k,
            )
        });
    }

    /// Acknowledged appends in no read of their key, though a read holds an element appended
    /// by a transaction that began after the append's transaction ended.
    fn lost_appends(&mut self, by_key: &[Vec<(u32, &'h [i64])>], latest: &[Option<(u64, i64, u32)>]) {
        let mut seen: HashSet<(u32, i64)> = HashSet::new();
        for (k, key_reads) in by_key.iter().enumerate() {
            for &(_, elements) in key_reads {
                seen.extend(elements.iter().map(|&v| (k as u32, v)));
            }
        }
        let h = self.h;
        for (t, txn) in h.txns.iter().enumerate() {
            let (TxnType::Ok, Some(end)) = (txn.kind, txn.end_us) else { continue };
            for op in &txn.ops {
                let Mop::Append { key, value } = op else { continue };
                let Some(&k) = self.key_ids.get(key.as_str()) else { continue };
                let Some((start, later, reader)) = latest.get(k as usize).copied().flatten() else { continue };
                if start <= end || seen.contains(&(k, *value)) {
                    continue;
                }
                let later_writer = self.writers.get(&(k, later)).map_or(u32::MAX, |w| w.txn);
                let t = t as u32;
                self.found(LOST_APPEND, |cx| {
                    cx.simple(
                        format!(
                            "T{t}'s acknowledged append of {value} to {key} (ended at {end} us) is in no read, though T{reader} read {later}, appended by T{later_writer}, which started at {start} us"
                        ),
                        &[t, later_writer, reader],
                        k,
                    )
                });
            }
        }
    }
}

// Read-write registers.
impl<'h> Ctx<'h> {
    fn rw_register(&mut self) {
        self.list = false;
        self.index_writers(false);
        let h = self.h;
        // Facts of the version order: (key, before, after), from committed read-then-write.
        let mut facts: Vec<(u32, i64, i64)> = Vec::new();
        // External reads: (reader, key, value read).
        let mut reads: Vec<(u32, u32, Option<i64>)> = Vec::new();
        // Per key of the current transaction: its last external read (a read before any write
        // of the key) and its last write (the only one installed).
        let mut state: BTreeMap<u32, (Option<Option<i64>>, Option<i64>)> = BTreeMap::new();
        for (t, txn) in h.txns.iter().enumerate() {
            if txn.kind != TxnType::Ok {
                continue;
            }
            state.clear();
            for op in &txn.ops {
                match op {
                    Mop::Read { key, value: value @ (ReadValue::Nil | ReadValue::Int(_)) } => {
                        let k = self.key(key);
                        let v = if let ReadValue::Int(v) = value { Some(*v) } else { None };
                        let entry = state.entry(k).or_insert((None, None));
                        if entry.1.is_none() {
                            entry.0 = Some(v);
                            reads.push((t as u32, k, v));
                        }
                    }
                    Mop::Write { key, value } => {
                        let k = self.key(key);
                        state.entry(k).or_insert((None, None)).1 = Some(*value);
                    }
                    _ => {}
                }
            }
            for (&k, &(read, write)) in &state {
                if let (Some(Some(before)), Some(after)) = (read, write) {
                    facts.push((k, before, after));
                }
            }
        }
        for &(reader, k, value) in &reads {
            let Some(v) = value else { continue };
            let Some(w) = self.writers.get(&(k, v)).copied() else { continue };
            match self.kind(w.txn) {
                TxnType::Fail => self.aborted_read(k, v, w.txn, reader),
                TxnType::Info => self.observed[w.txn as usize] = true,
                TxnType::Ok => {}
            }
            if w.txn != reader && self.kind(w.txn) != TxnType::Fail {
                self.edge(w.txn, reader, WR, Why::Wr { key: k, value: v });
                if !w.last {
                    self.intermediate(k, v, w.txn, reader);
                }
            }
        }
        self.register_order(&facts, &reads);
    }

    /// ww from the version facts; rw from each read to the known successors of what it read
    /// (a read of nil: to every version with no known predecessor).
    fn register_order(&mut self, facts: &[(u32, i64, i64)], reads: &[(u32, u32, Option<i64>)]) {
        let mut successors: HashMap<(u32, i64), Vec<i64>> = HashMap::new();
        let mut has_predecessor: HashSet<(u32, i64)> = HashSet::new();
        for &(k, before, after) in facts {
            successors.entry((k, before)).or_default().push(after);
            has_predecessor.insert((k, after));
            let (Some(a), Some(b)) = (self.writers.get(&(k, before)).copied(), self.writers.get(&(k, after)).copied())
            else {
                continue;
            };
            if self.kind(a.txn) != TxnType::Fail {
                self.edge(a.txn, b.txn, WW, Why::Ww { key: k, before, after });
            }
        }
        // Versions surely installed with no known predecessor, per key, in a stable order.
        let mut roots: HashMap<u32, Vec<(i64, u32)>> = HashMap::new();
        let mut installed: Vec<(u32, i64, Writer)> = self.writers.iter().map(|(&(k, v), &w)| (k, v, w)).collect();
        installed.sort_unstable_by_key(|&(k, v, _)| (k, v));
        for (k, v, w) in installed {
            let committed = match self.kind(w.txn) {
                TxnType::Ok => true,
                TxnType::Info => self.observed[w.txn as usize],
                TxnType::Fail => false,
            };
            if w.last && committed && !has_predecessor.contains(&(k, v)) {
                roots.entry(k).or_default().push((v, w.txn));
            }
        }
        for &(reader, k, value) in reads {
            let targets: Vec<(i64, u32)> = match value {
                None => roots.get(&k).cloned().unwrap_or_default(),
                Some(v) => successors
                    .get(&(k, v))
                    .map(|next| next.iter().filter_map(|&n| self.writers.get(&(k, n)).map(|w| (n, w.txn))).collect())
                    .unwrap_or_default(),
            };
            for (next, writer) in targets {
                self.edge(reader, writer, RW, Why::Rw { key: k, read: value, next });
            }
        }
    }
}

// Real time.
impl Ctx<'_> {
    /// Edges from each transaction to those that started after it ended, transitively
    /// reduced: a frontier of completed transactions none of which precedes another.
    fn realtime_edges(&mut self) {
        let h = self.h;
        // (time, 0 = start / 1 = end, txn): starts before ends at equal times (not ordered).
        let mut events: Vec<(u64, u8, u32)> = Vec::new();
        for (t, txn) in h.txns.iter().enumerate() {
            let committed = match txn.kind {
                TxnType::Ok => true,
                TxnType::Info => self.observed[t],
                TxnType::Fail => false,
            };
            if !committed {
                continue;
            }
            if let Some(start) = txn.start_us {
                events.push((start, 0, t as u32));
            }
            // An info transaction may commit any time after its recorded end: it precedes
            // nothing in real time.
            if let (TxnType::Ok, Some(end)) = (txn.kind, txn.end_us) {
                events.push((end, 1, t as u32));
            }
        }
        events.sort_unstable();
        let mut frontier: Vec<u32> = Vec::new();
        let mut in_frontier = vec![false; h.txns.len()];
        // Per transaction: its predecessors taken from the frontier when it started.
        let mut preds: HashMap<u32, Vec<u32>> = HashMap::new();
        for (_, kind, t) in events {
            if kind == 0 {
                let start_us = h.txns[t as usize].start_us.unwrap_or(0);
                for &p in &frontier {
                    let end_us = h.txns[p as usize].end_us.unwrap_or(0);
                    self.edges.push(RawEdge { from: p, to: t, kind: RT, why: Why::Realtime { end_us, start_us } });
                }
                if h.txns[t as usize].kind == TxnType::Ok && h.txns[t as usize].end_us.is_some() {
                    preds.insert(t, frontier.clone());
                }
            } else {
                for p in preds.remove(&t).unwrap_or_default() {
                    in_frontier[p as usize] = false;
                }
                frontier.retain(|&p| in_frontier[p as usize]);
                frontier.push(t);
                in_frontier[t as usize] = true;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The graph and its cycles.

/// One edge in the graph: deduplicated per (from, to, kind), keeping the first evidence.
#[derive(Clone, Copy, Debug)]
struct Adj {
    from: u32,
    to: u32,
    kind: u8,
    why: Why,
}

/// A directed graph over transaction indices, in compressed sparse row form.
struct Graph {
    n: usize,
    /// `adj[start[v]..start[v + 1]]` are the edges out of `v`.
    start: Vec<u32>,
    adj: Vec<Adj>,
}

impl Graph {
    fn build(n: usize, mut edges: Vec<RawEdge>) -> Graph {
        edges.sort_by_key(|e| (e.from, e.to, e.kind));
        edges.dedup_by_key(|e| (e.from, e.to, e.kind));
        let mut start = vec![0u32; n + 1];
        for e in &edges {
            start[e.from as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let adj = edges.into_iter().map(|e| Adj { from: e.from, to: e.to, kind: e.kind, why: e.why }).collect();
        Graph { n, start, adj }
    }

    fn out(&self, v: u32) -> std::ops::Range<usize> {
        self.start[v as usize] as usize..self.start[v as usize + 1] as usize
    }
}

/// Strongly connected components of the edges of a mask. Components are numbered in Tarjan's
/// completion order, so every edge between two components goes from a higher number to a
/// lower one (0 is a sink).
struct Sccs {
    comp: Vec<u32>,
    size: Vec<u32>,
}

impl Sccs {
    fn same(&self, a: u32, b: u32) -> bool {
        self.comp[a as usize] == self.comp[b as usize]
    }
}

const UNVISITED: u32 = u32::MAX;

/// Tarjan's algorithm, iterative (histories hold chains far deeper than the stack).
fn tarjan(g: &Graph, mask: u8) -> Sccs {
    let n = g.n;
    let mut index = vec![UNVISITED; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let mut calls: Vec<(u32, usize)> = Vec::new();
    let mut comp = vec![UNVISITED; n];
    let mut size: Vec<u32> = Vec::new();
    let mut next = 0u32;
    for root in 0..n as u32 {
        if index[root as usize] != UNVISITED {
            continue;
        }
        index[root as usize] = next;
        low[root as usize] = next;
        next += 1;
        stack.push(root);
        on_stack[root as usize] = true;
        calls.push((root, g.out(root).start));
        while let Some(&mut (v, ref mut pos)) = calls.last_mut() {
            let end = g.out(v).end;
            if *pos < end {
                let e = g.adj[*pos];
                *pos += 1;
                if e.kind & mask == 0 {
                    continue;
                }
                let w = e.to as usize;
                if index[w] == UNVISITED {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(e.to);
                    on_stack[w] = true;
                    calls.push((e.to, g.out(e.to).start));
                } else if on_stack[w] {
                    low[v as usize] = low[v as usize].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(parent, _)) = calls.last() {
                low[parent as usize] = low[parent as usize].min(low[v as usize]);
            }
            if low[v as usize] == index[v as usize] {
                let id = size.len() as u32;
                let mut count = 0;
                while let Some(w) = stack.pop() {
                    on_stack[w as usize] = false;
                    comp[w as usize] = id;
                    count += 1;
                    if w == v {
                        break;
                    }
                }
                size.push(count);
            }
        }
    }
    Sccs { comp, size }
}

/// Per component with at least two nodes: the first edge (index into `adj`) of `kind` inside
/// it, in edge order.
fn first_inside(g: &Graph, sccs: &Sccs, kind: u8) -> Vec<u32> {
    let mut taken: HashSet<u32> = HashSet::new();
    let mut firsts = Vec::new();
    for (i, e) in g.adj.iter().enumerate() {
        if e.kind & kind != 0 && sccs.same(e.from, e.to) && taken.insert(sccs.comp[e.from as usize]) {
            firsts.push(i as u32);
        }
    }
    firsts
}

/// Breadth-first search with stamped scratch arrays, reused across searches.
struct Bfs {
    stamp: Vec<u32>,
    parent: Vec<u32>,
    current: u32,
    queue: Vec<u32>,
}

impl Bfs {
    fn new(n: usize) -> Bfs {
        Bfs { stamp: vec![0; n], parent: vec![0; n], current: 0, queue: Vec::new() }
    }

    /// The shortest cycle through edge `e` using edges of `mask` and staying inside `e`'s
    /// component of `sccs`: `e` first, then the path back. `None` only if there is none.
    fn cycle(&mut self, g: &Graph, e: u32, mask: u8, sccs: &Sccs) -> Option<Vec<u32>> {
        let edge = g.adj[e as usize];
        let mut cycle = vec![e];
        cycle.extend(self.path(g, edge.to, edge.from, mask, sccs)?);
        Some(cycle)
    }

    /// The shortest path (edge indices) from `src` to `dst` inside `src`'s component.
    fn path(&mut self, g: &Graph, src: u32, dst: u32, mask: u8, sccs: &Sccs) -> Option<Vec<u32>> {
        self.current += 1;
        let (stamp, comp) = (self.current, sccs.comp[src as usize]);
        self.queue.clear();
        self.queue.push(src);
        self.stamp[src as usize] = stamp;
        let mut head = 0;
        while head < self.queue.len() && self.stamp[dst as usize] != stamp {
            let v = self.queue[head];
            head += 1;
            for i in g.out(v) {
                let e = g.adj[i];
                let w = e.to as usize;
                if e.kind & mask != 0 && self.stamp[w] != stamp && sccs.comp[w] == comp {
                    self.stamp[w] = stamp;
                    self.parent[w] = i as u32;
                    self.queue.push(e.to);
                }
            }
        }
        if self.stamp[dst as usize] != stamp {
            return None;
        }
        let mut path = Vec::new();
        let mut v = dst;
        while v != src {
            let i = self.parent[v as usize];
            path.push(i);
            v = g.adj[i as usize].from;
        }
        path.reverse();
        Some(path)
    }
}

/// Bits per batch of the reachability sweep.
const WORDS: usize = 8;

/// For each query edge `u -> v` (an index into `adj`), whether `v` reaches `u` through edges
/// of `mask`, exactly. `sccs` are the components of `mask`: inside one, yes; otherwise the
/// condensation is swept in topological order (descending component number) with a bit per
/// source component, 64 x `WORDS` sources per sweep, each sweep limited to the components
/// between its highest source and its lowest target.
fn reaches(g: &Graph, sccs: &Sccs, mask: u8, queries: &[u32]) -> Vec<bool> {
    let comp_of = |v: u32| sccs.comp[v as usize];
    let mut answer = vec![false; queries.len()];
    // Pending (source component, target component, query), by source descending.
    let mut pending: Vec<(u32, u32, usize)> = Vec::new();
    for (q, &e) in queries.iter().enumerate() {
        let edge = g.adj[e as usize];
        let (source, target) = (comp_of(edge.to), comp_of(edge.from));
        if source == target {
            answer[q] = true;
        } else if source > target {
            pending.push((source, target, q));
        }
    }
    if pending.is_empty() {
        return answer;
    }
    pending.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
    // Nodes bucketed by component.
    let count = sccs.size.len();
    let mut bucket_start = vec![0usize; count + 1];
    for &c in &sccs.comp {
        bucket_start[c as usize + 1] += 1;
    }
    for c in 0..count {
        bucket_start[c + 1] += bucket_start[c];
    }
    let mut fill = bucket_start.clone();
    let mut nodes = vec![0u32; g.n];
    for (v, &c) in sccs.comp.iter().enumerate() {
        nodes[fill[c as usize]] = v as u32;
        fill[c as usize] += 1;
    }
    let mut bits = vec![[0u64; WORDS]; count];
    let mut slot = vec![UNVISITED; count];
    let mut i = 0;
    while i < pending.len() {
        // One batch: up to 64 x WORDS distinct sources.
        let mut sources: Vec<u32> = Vec::new();
        let mut j = i;
        while j < pending.len() {
            let s = pending[j].0;
            if slot[s as usize] == UNVISITED {
                if sources.len() == 64 * WORDS {
                    break;
                }
                slot[s as usize] = sources.len() as u32;
                sources.push(s);
            }
            j += 1;
        }
        let batch = &pending[i..j];
        let high = sources[0];
        let low = batch.iter().map(|p| p.1).min().unwrap_or(0);
        for &s in &sources {
            let b = slot[s as usize] as usize;
            bits[s as usize][b / 64] |= 1 << (b % 64);
        }
        for c in (low..=high).rev() {
            let here = bits[c as usize];
            if here.iter().all(|&w| w == 0) {
                continue;
            }
            for &v in &nodes[bucket_start[c as usize]..bucket_start[c as usize + 1]] {
                for k in g.out(v) {
                    let e = g.adj[k];
                    let d = comp_of(e.to);
                    if e.kind & mask != 0 && d != c && d >= low {
                        let there = &mut bits[d as usize];
                        for w in 0..WORDS {
                            there[w] |= here[w];
                        }
                    }
                }
            }
        }
        for &(s, t, q) in batch {
            let b = slot[s as usize] as usize;
            answer[q] = bits[t as usize][b / 64] & (1 << (b % 64)) != 0;
        }
        for c in low..=high {
            bits[c as usize] = [0; WORDS];
        }
        for &s in &sources {
            slot[s as usize] = UNVISITED;
        }
        i = j;
    }
    answer
}

impl Ctx<'_> {
    fn cycles(&mut self, g: &Graph, realtime: bool) {
        let mut bfs = Bfs::new(g.n);
        let ww = tarjan(g, WW);
        for e in first_inside(g, &ww, WW) {
            if let Some(cycle) = bfs.cycle(g, e, WW, &ww) {
                self.cycle(G0, g, &cycle);
            }
        }
        let c1 = tarjan(g, WW | WR);
        for e in first_inside(g, &c1, WR) {
            if let Some(cycle) = bfs.cycle(g, e, WW | WR, &c1) {
                self.cycle(G1C, g, &cycle);
            }
        }
        let full = tarjan(g, WW | WR | RW);
        let rw_inside = edges_inside(g, &full, RW);
        let single = reaches(g, &c1, WW | WR, &rw_inside);
        let mut is_single = vec![false; g.adj.len()];
        for (q, &e) in rw_inside.iter().enumerate() {
            is_single[e as usize] = single[q];
        }
        let class =
            RwClass { single_name: G_SINGLE, multi_name: G2_ITEM, single_mask: WW | WR, multi_mask: WW | WR | RW };
        self.rw_cycles(g, &mut bfs, &full, &rw_inside, &is_single, class);
        if !realtime {
            return;
        }
        let r1 = tarjan(g, WW | WR | RT);
        for e in first_inside(g, &r1, RT) {
            if let Some(cycle) = bfs.cycle(g, e, WW | WR | RT, &r1) {
                let reads = cycle.iter().any(|&i| g.adj[i as usize].kind == WR);
                self.cycle(if reads { G1C_REALTIME } else { G0_REALTIME }, g, &cycle);
            }
        }
        let rfull = tarjan(g, ALL);
        // Only rw edges no cycle without real time explains: single ones not single before,
        // and any crossing two components of the graph without real time.
        let rw_inside_rt: Vec<u32> = edges_inside(g, &rfull, RW);
        let single_rt = reaches(g, &r1, WW | WR | RT, &rw_inside_rt);
        let mut is_single_rt = vec![false; g.adj.len()];
        let mut candidates = Vec::new();
        for (q, &e) in rw_inside_rt.iter().enumerate() {
            let edge = g.adj[e as usize];
            is_single_rt[e as usize] = single_rt[q] && !is_single[e as usize];
            if is_single_rt[e as usize] || !full.same(edge.from, edge.to) {
                candidates.push(e);
            }
        }
        self.rw_cycles(
            g,
            &mut bfs,
            &rfull,
            &candidates,
            &is_single_rt,
            RwClass {
                single_name: G_SINGLE_REALTIME,
                multi_name: G2_ITEM_REALTIME,
                single_mask: WW | WR | RT,
                multi_mask: ALL,
            },
        );
    }

    /// Per component of `sccs`: a single-rw cycle through the first `candidates` edge marked
    /// in `is_single`, else a cycle through its first candidate edge (two or more rw edges).
    fn rw_cycles(
        &mut self,
        g: &Graph,
        bfs: &mut Bfs,
        sccs: &Sccs,
        candidates: &[u32],
        is_single: &[bool],
        class: RwClass,
    ) {
        let RwClass { single_name, multi_name, single_mask, multi_mask } = class;
        let mut per_comp: BTreeMap<u32, (Option<u32>, u32)> = BTreeMap::new();
        for &e in candidates {
            let c = sccs.comp[g.adj[e as usize].from as usize];
            let entry = per_comp.entry(c).or_insert((None, e));
            if entry.0.is_none() && is_single[e as usize] {
                entry.0 = Some(e);
            }
        }
        for (_, (single, first)) in per_comp {
            let found = match single {
                Some(e) => bfs.cycle(g, e, single_mask, sccs).map(|c| (single_name, c)),
                None => bfs.cycle(g, first, multi_mask, sccs).map(|c| (multi_name, c)),
            };
            if let Some((name, cycle)) = found {
                self.cycle(name, g, &cycle);
            }
        }
    }

    fn cycle(&mut self, name: &'static str, g: &Graph, cycle: &[u32]) {
        self.found(name, |cx| {
            let edges: Vec<Edge> = cycle.iter().map(|&i| cx.explain(&g.adj[i as usize])).collect();
            let mut keys: Vec<String> = Vec::new();
            for e in &edges {
                if let Some(k) = &e.key {
                    if !keys.contains(k) {
                        keys.push(k.clone());
                    }
                }
            }
            let mut detail = format!("{name}: T{}", edges.first().map_or(0, |e| e.from));
            for e in &edges {
                match &e.key {
                    Some(k) => detail.push_str(&format!(" -{}({k})-> T{}", e.kind.name(), e.to)),
                    None => detail.push_str(&format!(" -{}-> T{}", e.kind.name(), e.to)),
                }
            }
            let txns = edges.iter().map(|e| cx.txn_ref(e.from as u32)).collect();
            Anomaly { detail, txns, cycle: edges, keys }
        });
    }

    fn explain(&self, e: &Adj) -> Edge {
        let (from, to) = (e.from, e.to);
        let key = |k: u32| self.keys[k as usize];
        let (kind, k, detail) = match e.why {
            Why::Ww { key: k, before, after } if self.list => {
                (EdgeKind::Ww, Some(k), format!("T{to} appended {after} to {} after T{from}'s {before}", key(k)))
            }
            Why::Ww { key: k, before, after } => (
                EdgeKind::Ww,
                Some(k),
                format!("T{from} wrote {} = {before}, which precedes T{to}'s {after} (a committed transaction read {before} and then wrote {after})", key(k)),
            ),
            Why::Wr { key: k, value } => {
                (EdgeKind::Wr, Some(k), format!("T{to} read {value} from {}, written by T{from}", key(k)))
            }
            Why::Rw { key: k, read, next } => {
                let read = match (read, self.list) {
                    (Some(v), true) => format!("up to {v}"),
                    (Some(v), false) => format!("= {v}"),
                    (None, true) => "empty".to_owned(),
                    (None, false) => "= nil".to_owned(),
                };
                (
                    EdgeKind::Rw,
                    Some(k),
                    format!("T{from} read {} {read}, before T{to}'s later version {next}", key(k)),
                )
            }
            Why::Realtime { end_us, start_us } => {
                (EdgeKind::Realtime, None, format!("T{from} ended at {end_us} us, before T{to} started at {start_us} us"))
            }
        };
        Edge { from: from as usize, to: to as usize, kind, key: k.map(|k| key(k).to_owned()), detail }
    }

    fn report(self, model: Model, level: &str, realtime: bool) -> Report {
        let base = forbidden(level);
        let fatal = |name: &str| {
            base.contains(&name) || (realtime && name.strip_suffix("-realtime").is_some_and(|b| base.contains(&b)))
        };
        let forbidden_found: Vec<String> = ANOMALIES
            .iter()
            .filter(|n| self.findings.counts.contains_key(**n) && fatal(n))
            .map(|n| (*n).to_owned())
            .collect();
        let outcomes = |kind| self.h.txns.iter().filter(|t| t.kind == kind).count();
        Report {
            valid: forbidden_found.is_empty(),
            model,
            level: level.to_owned(),
            realtime,
            txns: self.h.txns.len(),
            ok: outcomes(TxnType::Ok),
            fail: outcomes(TxnType::Fail),
            info: outcomes(TxnType::Info),
            forbidden_found,
            counts: self.findings.counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            anomalies: self.findings.kept.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }
}

/// The names of the cycles through rw edges, and the edges each may use.
#[derive(Clone, Copy)]
struct RwClass {
    /// Exactly one rw edge.
    single_name: &'static str,
    /// Two or more.
    multi_name: &'static str,
    /// The edges of the path closing a single cycle (no rw).
    single_mask: u8,
    /// The edges of the path closing any cycle.
    multi_mask: u8,
}

/// Every edge of `kind` whose ends share a component (of at least two nodes, as there are no
/// self edges).
fn edges_inside(g: &Graph, sccs: &Sccs, kind: u8) -> Vec<u32> {
    (0..g.adj.len() as u32)
        .filter(|&i| {
            let e = g.adj[i as usize];
            e.kind & kind != 0 && sccs.same(e.from, e.to)
        })
        .collect()
}
