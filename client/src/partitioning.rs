//! How a topic's keys map to its partitions (issue 21): the scheme and the ranges a
//! partition owns. Shared by the broker's controller (which splits and merges ranges) and
//! the client (which routes records by them), so both compute one mapping.
//!
//! - [`Partitioning::Hash`]: a fixed partition count, `key_partition(key, count)` (FNV-1a
//!   modulo the count). Such a topic never splits or merges.
//! - [`Partitioning::HashRange`]: each partition owns a half-open range of the 64-bit key hash
//!   ([`key_hash`], xxh3), written as its 8 big-endian bytes so byte order is numeric order.
//! - [`Partitioning::KeyRange`]: each partition owns a half-open interval of keys in byte
//!   order (efficient range scans; a hot range can be split where its keys are).
//!
//! Either range scheme maps a key to a *point* ([`Partitioning::point`]): its hash's bytes or
//! the key itself. A partition owns `[from, to)` of points, `to = None` meaning unbounded, so
//! neighbours share a boundary and every point has exactly one open owner.

use std::cmp::Ordering;
use std::fmt;

/// A topic's partitioning scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Partitioning {
    /// A fixed count; a key goes to `key_partition(key, count)`.
    #[default]
    Hash,
    /// Each partition owns a range of the 64-bit key hash.
    HashRange,
    /// Each partition owns an interval of keys.
    KeyRange,
}

impl Partitioning {
    /// Every scheme, in wire order.
    pub const ALL: [Partitioning; 3] = [Partitioning::Hash, Partitioning::HashRange, Partitioning::KeyRange];

    /// The CLI and JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Partitioning::Hash => "hash",
            Partitioning::HashRange => "hash-range",
            Partitioning::KeyRange => "key-range",
        }
    }

    /// The scheme named `name` ([`Partitioning::name`]).
    pub fn parse(name: &str) -> Option<Partitioning> {
        Partitioning::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The wire byte.
    pub fn to_wire(self) -> u8 {
        match self {
            Partitioning::Hash => 0,
            Partitioning::HashRange => 1,
            Partitioning::KeyRange => 2,
        }
    }

    /// The scheme of a wire byte, if it names one.
    pub fn from_wire(b: u8) -> Option<Partitioning> {
        Partitioning::ALL.get(usize::from(b)).copied()
    }

    /// Whether partitions own ranges (and so may split and merge).
    pub fn ranged(self) -> bool {
        self != Partitioning::Hash
    }

    /// The point a key routes by: its hash's big-endian bytes (hash-range), the key itself
    /// (key-range); `None` for [`Partitioning::Hash`], which routes by count.
    pub fn point(self, key: &[u8]) -> Option<Point<'_>> {
        match self {
            Partitioning::Hash => None,
            Partitioning::HashRange => Some(Point::Hash(key_hash(key).to_be_bytes())),
            Partitioning::KeyRange => Some(Point::Key(key)),
        }
    }

    /// The ranges of a new topic's `n` partitions (at most 65,536), in index order, covering
    /// every point: equal shares of the hash space (hash-range), or of the first key byte, or
    /// two bytes past 256 partitions (key-range, whose keys are not known yet; a split at a
    /// sampled key does better later). Empty for [`Partitioning::Hash`].
    pub fn initial_ranges(self, n: u32) -> Vec<KeyRange> {
        let n = n.max(1);
        let bound = |i: u32| -> Option<Vec<u8>> {
            if i == 0 {
                return Some(Vec::new());
            }
            if i >= n {
                return None;
            }
            match self {
                Partitioning::Hash => None,
                Partitioning::HashRange => {
                    let at = ((u128::from(i) << 64) / u128::from(n)) as u64;
                    Some(at.to_be_bytes().to_vec())
                }
                // One byte while that keeps the bounds apart, else two (at most 65,536).
                Partitioning::KeyRange if n <= 256 => Some(vec![((i * 256) / n) as u8]),
                Partitioning::KeyRange => Some((((u64::from(i) << 16) / u64::from(n)) as u16).to_be_bytes().to_vec()),
            }
        };
        if !self.ranged() {
            return Vec::new();
        }
        (0..n).map(|i| KeyRange { from: bound(i).expect("i < n"), to: bound(i + 1) }).collect()
    }
}

impl fmt::Display for Partitioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 64-bit hash a hash-range topic routes a key by: xxh3 of its bytes, stable across
/// processes, versions and platforms.
///
/// ```
/// use skein_client::partitioning::key_hash;
/// assert_eq!(key_hash(b"user-42"), key_hash(b"user-42"));
/// assert_ne!(key_hash(b"user-42"), key_hash(b"user-43"));
/// ```
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// A key's routing point ([`Partitioning::point`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point<'a> {
    /// A hash-range topic's: the key hash, big-endian.
    Hash([u8; 8]),
    /// A key-range topic's: the key.
    Key(&'a [u8]),
}

impl Point<'_> {
    /// The point's bytes, compared in byte order.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Point::Hash(h) => h,
            Point::Key(k) => k,
        }
    }
}

/// A half-open range of points `[from, to)`; `to = None` is unbounded above, `from` empty is
/// the lowest point.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRange {
    /// Inclusive lower bound.
    pub from: Vec<u8>,
    /// Exclusive upper bound; `None`: unbounded.
    pub to: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every point.
    pub fn full() -> KeyRange {
        KeyRange { from: Vec::new(), to: None }
    }

    /// A range as the wire carries it.
    pub fn of_wire(r: &crate::wire::PartitionRange) -> KeyRange {
        KeyRange { from: r.from.to_vec(), to: r.to.as_ref().map(|t| t.to_vec()) }
    }

    /// Whether the range holds `point`.
    pub fn contains(&self, point: &[u8]) -> bool {
        point >= self.from.as_slice() && self.to.as_deref().is_none_or(|to| point < to)
    }

    /// Whether `at` splits the range into two non-empty ranges (`from < at < to`).
    pub fn splits_at(&self, at: &[u8]) -> bool {
        at > self.from.as_slice() && self.to.as_deref().is_none_or(|to| at < to)
    }

    /// Whether `self` ends where `next` starts (they merge into one range).
    pub fn precedes(&self, next: &KeyRange) -> bool {
        self.to.as_deref() == Some(next.from.as_slice())
    }

    /// The two halves at `at` (which [`KeyRange::splits_at`]).
    pub fn split(&self, at: &[u8]) -> (KeyRange, KeyRange) {
        debug_assert!(self.splits_at(at));
        (
            KeyRange { from: self.from.clone(), to: Some(at.to_vec()) },
            KeyRange { from: at.to_vec(), to: self.to.clone() },
        )
    }

    /// A point strictly inside the range where it can split, for a scheme's points: the
    /// middle of the hash range (hash-range), or a byte string between the bounds in byte
    /// order (key-range); `None` if the range cannot split (it holds one point).
    pub fn midpoint(&self, scheme: Partitioning) -> Option<Vec<u8>> {
        let at = match scheme {
            Partitioning::Hash => return None,
            Partitioning::HashRange => {
                let from = u128::from(hash_of(&self.from));
                let to = self.to.as_deref().map_or(1u128 << 64, |t| u128::from(hash_of(t)));
                let mid = from + (to.saturating_sub(from)) / 2;
                (mid as u64).to_be_bytes().to_vec()
            }
            Partitioning::KeyRange => key_between(&self.from, self.to.as_deref()),
        };
        self.splits_at(&at).then_some(at)
    }

    /// The bound as text: 16 hex digits of a hash (hash-range), or the key, UTF-8 where it
    /// is and hex (`0x...`) where it is not (key-range).
    pub fn show_bound(bound: &[u8], scheme: Partitioning) -> String {
        match scheme {
            Partitioning::HashRange => format!("{:016x}", hash_of(bound)),
            _ => match std::str::from_utf8(bound) {
                Ok(s) if !s.starts_with("0x") => s.to_owned(),
                _ => format!("0x{}", bound.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            },
        }
    }

    /// Parses a bound as [`KeyRange::show_bound`] prints it (a hash as 1 to 16 hex digits
    /// for hash-range; a key, or `0x` and hex, for key-range).
    pub fn parse_bound(text: &str, scheme: Partitioning) -> Result<Vec<u8>, String> {
        match scheme {
            Partitioning::HashRange => {
                let digits = text.strip_prefix("0x").unwrap_or(text);
                u64::from_str_radix(digits, 16)
                    .map(|h| h.to_be_bytes().to_vec())
                    .map_err(|_| format!("{text:?} is not a hash (1 to 16 hex digits)"))
            }
            _ => match text.strip_prefix("0x") {
                Some(hex) => parse_hex(hex).ok_or_else(|| format!("{text:?}: bad hex after 0x")),
                None => Ok(text.as_bytes().to_vec()),
            },
        }
    }
}

/// A hash-range bound's value (8 big-endian bytes; anything else reads as 0: the controller
/// refuses other split points of a hash-range topic).
fn hash_of(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map(u64::from_be_bytes).unwrap_or(0)
}

fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// A byte string strictly between `from` and `to` in byte order, if one of at most
/// `max(len) + 1` bytes exists (it does unless `to` is `from` followed by zero bytes).
fn key_between(from: &[u8], to: Option<&[u8]>) -> Vec<u8> {
    let Some(to) = to else {
        // Unbounded: halfway from `from`'s first byte to 0x100, or past `from` when full.
        let first = from.first().copied().unwrap_or(0);
        if first < 0xff {
            return vec![first + (0x100 - u16::from(first)).div_ceil(2) as u8];
        }
        let mut at = from.to_vec();
        at.push(0x80);
        return at;
    };
    // Walk the common prefix, then pick a byte between the first differing ones.
    let mut at = Vec::new();
    for i in 0.. {
        match (from.get(i).copied(), to.get(i).copied()) {
            (Some(x), Some(y)) if x == y => at.push(x),
            // `from` ended: any non-empty suffix below `to`'s rest is above `from`.
            (None, Some(0)) => {
                at.push(0);
                if to.len() > i + 1 {
                    return at; // a proper prefix of `to`, longer than `from`
                }
            }
            (None, Some(y)) => {
                at.push(y / 2);
                return at;
            }
            (Some(x), Some(y)) if y > x.saturating_add(1) => {
                at.push(x + (y - x) / 2);
                return at;
            }
            (Some(x), Some(y)) if y == x + 1 => {
                // Adjacent bytes: keep `from`'s and go just past the rest of `from`.
                at.push(x);
                let rest = &from[i + 1..];
                match rest.iter().position(|&b| b < 0xff) {
                    Some(j) => {
                        at.extend_from_slice(&rest[..j]);
                        at.push(rest[j] + (0x100 - u16::from(rest[j])).div_ceil(2) as u8);
                    }
                    None => {
                        at.extend_from_slice(rest);
                        at.push(0x80);
                    }
                }
                return at;
            }
            // `to <= from` (an empty range) or `to == from + [0, 0, ...]`: no point between.
            _ => return at,
        }
    }
    unreachable!("the loop returns")
}

/// A topic's open (unsealed) partitions with their ranges, sorted by range (a hash topic's
/// partitions have none: empty).
pub fn open_ranges(t: &crate::wire::TopicMetadata) -> Vec<(KeyRange, u32)> {
    let mut parts: Vec<(KeyRange, u32)> = t
        .partitions
        .iter()
        .filter(|p| p.lineage.seal == 0)
        .filter_map(|p| Some((KeyRange::of_wire(p.lineage.range.as_ref()?), p.partition)))
        .collect();
    parts.sort_by(|a, b| by_from(&a.0, &b.0));
    parts
}

/// The partition of `parts` (open partitions sorted by range, covering every point) owning
/// `key`'s point under a ranged `scheme` (the first one if the map has a hole, which
/// metadata between a seal and its children never shows).
pub fn route(scheme: Partitioning, parts: &[(KeyRange, u32)], key: &[u8]) -> u32 {
    let Some(point) = scheme.point(key) else { return 0 };
    let i = parts.partition_point(|(r, _)| r.from.as_slice() <= point.bytes());
    parts.get(i.saturating_sub(1)).or(parts.first()).map_or(0, |(_, p)| *p)
}

/// Orders two ranges by their lower bounds (the order partitions are listed in by range).
pub fn by_from(a: &KeyRange, b: &KeyRange) -> Ordering {
    a.from.cmp(&b.from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn initial_ranges_cover_every_point_once() {
        for scheme in [Partitioning::HashRange, Partitioning::KeyRange] {
            for n in [1, 2, 3, 7, 256, 257, 10_000] {
                let ranges = scheme.initial_ranges(n);
                assert_eq!(ranges.len(), n as usize);
                assert_eq!(ranges[0].from, Vec::<u8>::new());
                assert_eq!(ranges.last().unwrap().to, None);
                for w in ranges.windows(2) {
                    assert!(w[0].precedes(&w[1]), "{scheme} n={n}: {w:?}");
                    assert!(w[0].from < w[1].from);
                }
            }
        }
        assert!(Partitioning::Hash.initial_ranges(4).is_empty());
    }

    #[test]
    fn hash_range_halves_are_equal() {
        let r = Partitioning::HashRange.initial_ranges(2);
        assert_eq!(r[1].from, (1u64 << 63).to_be_bytes().to_vec());
        let mid = KeyRange::full().midpoint(Partitioning::HashRange).unwrap();
        assert_eq!(mid, (1u64 << 63).to_be_bytes().to_vec());
        assert_eq!(KeyRange::show_bound(&mid, Partitioning::HashRange), "8000000000000000");
        assert_eq!(KeyRange::parse_bound("8000000000000000", Partitioning::HashRange).unwrap(), mid);
    }

    #[test]
    fn bounds_print_and_parse_back() {
        for key in [&b"user-42"[..], b"\x00\xff", b"0xabc"] {
            let shown = KeyRange::show_bound(key, Partitioning::KeyRange);
            assert_eq!(KeyRange::parse_bound(&shown, Partitioning::KeyRange).unwrap(), key, "{shown}");
        }
        assert!(KeyRange::parse_bound("xyz", Partitioning::HashRange).is_err());
        assert!(KeyRange::parse_bound("0x0", Partitioning::KeyRange).is_err());
    }

    #[test]
    fn a_one_point_range_has_no_midpoint() {
        let r = KeyRange { from: b"a".to_vec(), to: Some(b"a\x00".to_vec()) };
        assert_eq!(r.midpoint(Partitioning::KeyRange), None);
        let h = KeyRange { from: 5u64.to_be_bytes().to_vec(), to: Some(6u64.to_be_bytes().to_vec()) };
        assert_eq!(h.midpoint(Partitioning::HashRange), None);
    }

    proptest! {
        #[test]
        fn a_key_range_midpoint_splits_it(from in proptest::collection::vec(any::<u8>(), 0..4),
                                          to in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4))) {
            let r = KeyRange { from, to };
            if let Some(to) = &r.to {
                prop_assume!(to > &r.from);
            }
            match r.midpoint(Partitioning::KeyRange) {
                Some(at) => {
                    prop_assert!(r.splits_at(&at));
                    let (a, b) = r.split(&at);
                    prop_assert!(a.precedes(&b));
                }
                // Only a range holding the one point `from` has none.
                None => prop_assert_eq!(r.to.clone(), Some([r.from.clone(), vec![0]].concat())),
            }
        }

        #[test]
        fn every_hash_has_one_owner(n in 1u32..50, key in proptest::collection::vec(any::<u8>(), 0..16)) {
            let ranges = Partitioning::HashRange.initial_ranges(n);
            let point = Partitioning::HashRange.point(&key).unwrap();
            prop_assert_eq!(ranges.iter().filter(|r| r.contains(point.bytes())).count(), 1);
        }
    }
}
