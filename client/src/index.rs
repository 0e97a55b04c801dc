//! Secondary indexes on tables: their definitions, the indexed field of a row, and the key
//! layout of a term index.
//!
//! An index is named per table and defined by a catalog topic `TABLE.index.NAME` whose
//! configs hold the definition (`index.of`, `index.field`, `index.kind`, `index.mode`); every
//! broker learns it from the controller's topic map, and a client from DescribeTopics.
//!
//! - `document`: each partition of the table indexes its own rows (the field's value to the
//!   keys that hold it, in every version the partition keeps); a query asks every partition
//!   and each answers at one snapshot offset, rechecking each row it returns at it. The
//!   catalog topic holds nothing but the definition. Always maintained with the row: the
//!   partition indexes a version when it applies it.
//! - `term`: the catalog topic is itself a key-range table keyed by the indexed value
//!   ([`term_key`]: the value, a separator, the row's key), so one value's entries are
//!   adjacent and a lookup reads one partition. Maintained asynchronously by a follower of
//!   the table's log on each table partition's leader, which writes the entries and its
//!   position ([`checkpoint_key`]) in one transaction on the index table.
//!
//! The indexed field: a row's value parsed as a JSON object; a string field indexes its
//! text, a number or boolean its JSON text; anything else (no such field, null, an array,
//! an object, a value that is not JSON) is not indexed.

use std::collections::BTreeMap;
use std::fmt;

/// Config naming the table an index belongs to.
pub const INDEX_OF: &str = "index.of";
/// Config naming the indexed field.
pub const INDEX_FIELD: &str = "index.field";
/// Config naming the index kind (`document` or `term`).
pub const INDEX_KIND: &str = "index.kind";
/// Config naming how it is maintained (`sync` or `async`).
pub const INDEX_MODE: &str = "index.mode";
/// The longest field name.
pub const FIELD_BYTES_MAX: usize = 256;

/// Where an index's entries live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexKind {
    /// In each partition of the table, over its own rows.
    Document,
    /// In a key-range table of its own, keyed by the indexed value.
    Term,
}

impl IndexKind {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            IndexKind::Document => "document",
            IndexKind::Term => "term",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<IndexKind> {
        [IndexKind::Document, IndexKind::Term].into_iter().find(|k| k.name() == s)
    }
}

/// When an index's entries are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexMode {
    /// With the row (document indexes: the partition indexes a version as it applies it).
    Sync,
    /// By a follower of the table's log, behind it by its lag.
    Async,
}

impl IndexMode {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            IndexMode::Sync => "sync",
            IndexMode::Async => "async",
        }
    }

    /// The mode named `s`.
    pub fn parse(s: &str) -> Option<IndexMode> {
        [IndexMode::Sync, IndexMode::Async].into_iter().find(|k| k.name() == s)
    }
}

/// One index's definition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IndexDef {
    /// Its name (unique per table).
    pub name: String,
    /// The table it indexes.
    pub table: String,
    /// The indexed field of the rows' JSON values.
    pub field: String,
    /// Document or term.
    pub kind: IndexKind,
    /// Sync or async.
    pub mode: IndexMode,
}

impl IndexDef {
    /// The catalog topic (a term index's table).
    pub fn topic(&self) -> String {
        index_topic(&self.table, &self.name)
    }

    /// The catalog topic's configs (a term index's also make it a table).
    pub fn configs(&self) -> Vec<(String, String)> {
        let mut c = vec![
            (INDEX_OF.to_owned(), self.table.clone()),
            (INDEX_FIELD.to_owned(), self.field.clone()),
            (INDEX_KIND.to_owned(), self.kind.name().to_owned()),
            (INDEX_MODE.to_owned(), self.mode.name().to_owned()),
        ];
        if self.kind == IndexKind::Term {
            // Entries are written by read-committed transactions of one writer per table
            // partition (fenced by its checkpoint row): the index table's own level does not
            // matter to them; lookups read at it.
            c.extend(crate::table::table_configs(None));
        }
        c
    }
}

impl fmt::Display for IndexDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {} ({}, {} {})", self.name, self.table, self.field, self.kind.name(), self.mode.name())
    }
}

/// The catalog topic of index `name` of `table`.
pub fn index_topic(table: &str, name: &str) -> String {
    format!("{table}.index.{name}")
}

/// Takes an index's configs out of a topic's: `Some` for an index's catalog topic (its
/// definition, named by the topic), `None` for any other; an error names a bad or missing
/// value.
pub fn index_config(topic: &str, configs: &mut BTreeMap<String, String>) -> Result<Option<IndexDef>, String> {
    let of = configs.remove(INDEX_OF);
    let field = configs.remove(INDEX_FIELD);
    let kind = configs.remove(INDEX_KIND);
    let mode = configs.remove(INDEX_MODE);
    let Some(table) = of else {
        if field.is_some() || kind.is_some() || mode.is_some() {
            return Err(format!("{INDEX_FIELD}, {INDEX_KIND} and {INDEX_MODE} need {INDEX_OF}"));
        }
        return Ok(None);
    };
    let prefix = format!("{table}.index.");
    let name = topic
        .strip_prefix(&prefix)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("an index of '{table}' is a topic named {prefix}NAME"))?;
    let field = field
        .filter(|f| !f.is_empty() && f.len() <= FIELD_BYTES_MAX)
        .ok_or_else(|| format!("{INDEX_FIELD}: a field name of 1 to {FIELD_BYTES_MAX} bytes is needed"))?;
    let kind = kind.as_deref().and_then(IndexKind::parse).ok_or_else(|| format!("{INDEX_KIND}: document or term"))?;
    let mode = mode.as_deref().and_then(IndexMode::parse).ok_or_else(|| format!("{INDEX_MODE}: sync or async"))?;
    check_mode(kind, mode)?;
    Ok(Some(IndexDef { name: name.to_owned(), table, field, kind, mode }))
}

/// Whether this build maintains an index of `kind` in `mode`.
pub fn check_mode(kind: IndexKind, mode: IndexMode) -> Result<(), String> {
    if kind == IndexKind::Term && mode == IndexMode::Sync {
        return Err("a synchronous term index needs a transaction over two tables (the row's and the index's), \
                    which tables do not have yet: use --async"
            .into());
    }
    Ok(())
}

/// The indexed value of `field` in a row's value (module docs), or None.
pub fn field_value(value: &[u8], field: &str) -> Option<Vec<u8>> {
    // Only an object can hold a field: skip parsing anything else.
    if value.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    match v.as_object()?.get(field)? {
        serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
        n @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// The first byte of every checkpoint key: never the first byte of an entry, whose value is
/// UTF-8 text (JSON), which has no 0xff byte.
const CHECKPOINT_TAG: u8 = 0xff;

/// The prefix of value `v`'s entries: its bytes with 0x00 escaped as 0x00 0xff, then 0x00
/// 0x01 (so no value's prefix is a prefix of another's, and entries sort by value).
pub fn term_prefix(v: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(v.len() + 2);
    for &b in v {
        k.push(b);
        if b == 0 {
            k.push(0xff);
        }
    }
    k.extend_from_slice(&[0, 1]);
    k
}

/// The end of value `v`'s entries (exclusive): its prefix with the last byte raised.
pub fn term_prefix_end(v: &[u8]) -> Vec<u8> {
    let mut k = term_prefix(v);
    *k.last_mut().expect("a prefix ends with 0x00 0x01") = 2;
    k
}

/// The entry key of row `key` holding value `v`.
pub fn term_key(v: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = term_prefix(v);
    k.extend_from_slice(key);
    k
}

/// The indexed value and row key of an entry key (None: not an entry).
pub fn term_parts(entry: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut v = Vec::new();
    let mut i = 0;
    while i < entry.len() {
        match (entry[i], entry.get(i + 1)) {
            (0, Some(0xff)) => {
                v.push(0);
                i += 2;
            }
            (0, Some(1)) => return Some((v, entry[i + 2..].to_vec())),
            (0, _) => return None,
            (b, _) => {
                v.push(b);
                i += 1;
            }
        }
    }
    None
}

/// The key of the checkpoint row of table partition `partition` in a term index table: its
/// value is the table partition's offset the entries reflect ([`Checkpoint`]).
pub fn checkpoint_key(partition: u32) -> Vec<u8> {
    let mut k = vec![CHECKPOINT_TAG, b'c'];
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The first key of the checkpoint rows (they run to the end of the key space).
pub fn checkpoint_from() -> Vec<u8> {
    vec![CHECKPOINT_TAG]
}

/// The key of the reverse row of row `key` of table partition `partition` in a term index
/// table: its value is the indexed value the row's entry is under, so the follower finds the
/// entry to replace without the row's old version. None for a key too long to index.
pub fn reverse_key(partition: u32, key: &[u8]) -> Option<Vec<u8>> {
    let mut k = reverse_prefix(partition);
    k.extend_from_slice(key);
    (k.len() <= crate::table::KEY_BYTES_MAX).then_some(k)
}

/// The first key of table partition `partition`'s reverse rows.
pub fn reverse_prefix(partition: u32) -> Vec<u8> {
    let mut k = vec![CHECKPOINT_TAG, b'r'];
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Where a term index's follower of one table partition is. The entries reflect every
/// change of the partition's rows before `offset` (an applied offset of the partition),
/// except while a pass over its keys runs (`next` set): keys from `next` on are not visited
/// yet. `at_ms` is when the follower read the partition at `offset` (wall clock); `done` of
/// `total` keys visited by the pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The table partition's applied offset the entries reflect.
    pub offset: u64,
    /// Wall-clock ms when the follower read the partition at `offset`.
    pub at_ms: u64,
    /// Keys the current (or last) pass visited.
    pub done: u64,
    /// The partition's keys when the pass began.
    pub total: u64,
    /// The first key a running pass has not visited (None: no pass running).
    pub next: Option<Vec<u8>>,
}

impl Checkpoint {
    /// Its row value (text: `offset at_ms done total next`, `next` in hex or `-`).
    pub fn encode(&self) -> Vec<u8> {
        let next =
            self.next.as_ref().map_or_else(|| "-".to_owned(), |n| n.iter().map(|b| format!("{b:02x}")).collect());
        format!("{} {} {} {} {next}", self.offset, self.at_ms, self.done, self.total).into_bytes()
    }

    /// The checkpoint a row value holds.
    pub fn decode(v: &[u8]) -> Option<Checkpoint> {
        let s = std::str::from_utf8(v).ok()?;
        let mut it = s.split(' ');
        let mut num = || it.next()?.parse::<u64>().ok();
        let (offset, at_ms, done, total) = (num()?, num()?, num()?, num()?);
        let next = match it.next()? {
            "-" => None,
            h if h.len() % 2 == 0 => Some(
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                    .collect::<Option<_>>()?,
            ),
            _ => return None,
        };
        it.next().is_none().then_some(Checkpoint { offset, at_ms, done, total, next })
    }

    /// Whether the first pass is done.
    pub fn built(&self) -> bool {
        self.next.is_none()
    }
}

/// What a term index table should hold besides its checkpoint rows, for a table's rows
/// (`(partition, key, value)`): each indexed row's entry (holding the row's value) and its
/// reverse row (holding the indexed value).
pub fn term_expected<'a>(
    field: &str,
    rows: impl IntoIterator<Item = (u32, &'a [u8], &'a [u8])>,
) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut want = BTreeMap::new();
    for (partition, key, value) in rows {
        let Some(fv) = field_value(value, field) else { continue };
        let (entry, Some(reverse)) = (term_key(&fv, key), reverse_key(partition, key)) else { continue };
        if entry.len() > crate::table::KEY_BYTES_MAX {
            continue;
        }
        want.insert(entry, value.to_vec());
        want.insert(reverse, fv);
    }
    want
}

/// Whether an index table's key is a checkpoint row's.
pub fn is_checkpoint(key: &[u8]) -> bool {
    key.starts_with(&[CHECKPOINT_TAG, b'c'])
}

/// The differences between the rows an index table holds (`have`, checkpoint rows left out)
/// and those it should (`want`), one line each (at most `max`, then a count of the rest).
pub fn disagreements(want: &BTreeMap<Vec<u8>, Vec<u8>>, have: &BTreeMap<Vec<u8>, Vec<u8>>, max: usize) -> Vec<String> {
    let show = |k: &[u8]| match term_parts(k) {
        Some((v, key)) => format!("entry {}={}", String::from_utf8_lossy(&v), String::from_utf8_lossy(&key)),
        None => format!("row {}", String::from_utf8_lossy(k)),
    };
    let mut out = Vec::new();
    let mut rest = 0usize;
    let mut note = |line: String| {
        if out.len() < max {
            out.push(line);
        } else {
            rest += 1;
        }
    };
    for (k, v) in want {
        match have.get(k) {
            None => note(format!("missing {}", show(k))),
            Some(h) if h != v => note(format!(
                "stale {}: holds {} for {}",
                show(k),
                String::from_utf8_lossy(h),
                String::from_utf8_lossy(v)
            )),
            Some(_) => {}
        }
    }
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        note(format!("extra {}", show(k)));
    }
    if rest > 0 {
        out.push(format!("and {rest} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fields_of_json_objects_only() {
        assert_eq!(field_value(br#"{"city":"Oslo","n":3}"#, "city"), Some(b"Oslo".to_vec()));
        assert_eq!(field_value(br#"{"city":"Oslo","n":3}"#, "n"), Some(b"3".to_vec()));
        assert_eq!(field_value(br#" {"ok":true}"#, "ok"), Some(b"true".to_vec()));
        assert_eq!(field_value(br#"{"city":null}"#, "city"), None);
        assert_eq!(field_value(br#"{"city":["a"]}"#, "city"), None);
        assert_eq!(field_value(br#"{"town":"x"}"#, "city"), None);
        assert_eq!(field_value(b"Oslo", "city"), None);
        assert_eq!(field_value(b"{not json", "city"), None);
        assert_eq!(field_value(b"", "city"), None);
    }

    #[test]
    fn configs_round_trip_and_bad_ones_are_named() {
        let def = IndexDef {
            name: "by_city".into(),
            table: "users".into(),
            field: "city".into(),
            kind: IndexKind::Term,
            mode: IndexMode::Async,
        };
        let mut configs: BTreeMap<String, String> = def.configs().into_iter().collect();
        assert_eq!(index_config(&def.topic(), &mut configs), Ok(Some(def.clone())));
        assert_eq!(configs.get("table").map(String::as_str), Some("true"), "a term index is a table");
        let mut plain = BTreeMap::new();
        assert_eq!(index_config("users", &mut plain), Ok(None));
        let mut wrong_name: BTreeMap<String, String> = def.configs().into_iter().collect();
        assert!(index_config("elsewhere", &mut wrong_name).is_err());
        let sync = IndexDef { mode: IndexMode::Sync, ..def.clone() };
        let mut c: BTreeMap<String, String> = sync.configs().into_iter().collect();
        assert!(index_config(&sync.topic(), &mut c).unwrap_err().contains("--async"));
        let mut c: BTreeMap<String, String> = def.configs().into_iter().collect();
        c.insert(INDEX_KIND.into(), "btree".into());
        assert!(index_config(&def.topic(), &mut c).is_err());
        let mut c = BTreeMap::from([(INDEX_FIELD.to_owned(), "x".to_owned())]);
        assert!(index_config("t", &mut c).is_err());
    }

    #[test]
    fn checkpoints_round_trip() {
        let c = Checkpoint { offset: 17, at_ms: 1_700_000_000_000, done: 3, total: 9, next: Some(vec![0, 0xab]) };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c.clone()));
        assert!(!c.built());
        let built = Checkpoint { next: None, ..c };
        assert_eq!(Checkpoint::decode(&built.encode()), Some(built.clone()));
        assert!(built.built());
        assert_eq!(Checkpoint::decode(b"1 2 3 4"), None);
        assert_eq!(Checkpoint::decode(b"1 2 3 4 - 5"), None);
        assert_eq!(Checkpoint::decode(b"1 2 3 4 abc"), None);
        assert!(reverse_key(1, b"k") > Some(checkpoint_key(7)), "reverse rows after checkpoints");
        assert_eq!(reverse_key(1, &[b'k'; crate::table::KEY_BYTES_MAX]), None);
        assert!(checkpoint_key(3) > term_key("\u{10ffff}".as_bytes(), b"k"), "checkpoints sort after entries");
    }

    #[test]
    fn the_agreement_check_names_missing_stale_and_extra_rows() {
        let rows: Vec<(u32, &[u8], &[u8])> =
            vec![(0, b"a", br#"{"c":"x"}"#), (1, b"b", br#"{"c":"y"}"#), (1, b"z", b"not json")];
        let want = term_expected("c", rows.iter().copied());
        assert_eq!(want.len(), 4, "two entries and two reverse rows");
        assert!(disagreements(&want, &want, 10).is_empty());
        let mut have = want.clone();
        have.remove(&term_key(b"x", b"a"));
        have.insert(term_key(b"y", b"b"), br#"{"c":"old"}"#.to_vec());
        have.insert(term_key(b"q", b"gone"), b"{}".to_vec());
        let found = disagreements(&want, &have, 10);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("missing entry x=a"), "{found:?}");
        assert!(found.iter().any(|l| l.starts_with("stale entry y=b")), "{found:?}");
        assert!(found.iter().any(|l| l == "extra entry q=gone"), "{found:?}");
        assert_eq!(disagreements(&want, &have, 1).len(), 2, "one line, then the count of the rest");
        assert!(is_checkpoint(&checkpoint_key(4)) && !is_checkpoint(&reverse_key(4, b"k").unwrap()));
    }

    proptest! {
        #[test]
        fn term_keys_sort_by_value_and_split_back(
            a in proptest::collection::vec(any::<u8>(), 0..6),
            b in proptest::collection::vec(any::<u8>(), 0..6),
            ka in proptest::collection::vec(any::<u8>(), 0..6),
            kb in proptest::collection::vec(any::<u8>(), 0..6),
        ) {
            let (ea, eb) = (term_key(&a, &ka), term_key(&b, &kb));
            prop_assert_eq!(term_parts(&ea), Some((a.clone(), ka.clone())));
            // An entry is inside its own value's prefix range and nobody else's.
            prop_assert!(ea >= term_prefix(&a) && ea < term_prefix_end(&a));
            if a != b {
                prop_assert!(!(eb >= term_prefix(&a) && eb < term_prefix_end(&a)));
                prop_assert_eq!(a < b, ea < eb, "entries sort by value first");
            }
        }
    }
}
