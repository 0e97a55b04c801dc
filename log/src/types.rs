//! Newtypes for the numbers the log deals in.
//!
//! Offsets, epochs and timestamps are distinct types so that an offset can never be passed
//! where a byte position or an epoch is expected. Arithmetic is explicit (`next`, `add`,
//! `distance`); none of these types implements `Add` or `Sub`.

use std::fmt;

/// The position of a record in a partition: dense, starting at 0, never reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64);

impl Offset {
    /// The first offset of every partition.
    pub const ZERO: Offset = Offset(0);

    /// The offset after this one.
    pub fn next(self) -> Offset {
        Offset(self.0.checked_add(1).expect("offset overflow: 2^64 records"))
    }

    /// This offset moved forward by `count` records.
    pub fn plus(self, count: u64) -> Offset {
        Offset(self.0.checked_add(count).expect("offset overflow: 2^64 records"))
    }

    /// The number of records from `earlier` up to (not including) `self`.
    ///
    /// Panics if `earlier` is after `self`: callers compare first.
    pub fn distance(self, earlier: Offset) -> u64 {
        assert!(earlier <= self, "distance from {earlier} to earlier offset {self}");
        self.0 - earlier.0
    }

    /// The raw value, for encodings and display.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A leader's term: every leader change bumps it; batches carry the epoch of the leader that
/// appended them (Kafka's KIP-101).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaderEpoch(pub u32);

impl LeaderEpoch {
    /// The raw value, for encodings and display.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for LeaderEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Milliseconds since the Unix epoch. The log never reads a clock: time is passed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The raw value in milliseconds.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn add_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0)
    }
}

/// An idempotent producer's id; `ProducerId::NONE` (-1) for producers without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProducerId(pub i64);

impl ProducerId {
    /// No producer id: the batch is not idempotent.
    pub const NONE: ProducerId = ProducerId(-1);
}

/// A producer id's epoch, bumped to fence an older instance of the same producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProducerEpoch(pub i16);

impl ProducerEpoch {
    /// No producer epoch.
    pub const NONE: ProducerEpoch = ProducerEpoch(-1);
}

/// The per-partition sequence number of a producer's first record in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sequence(pub i32);

impl Sequence {
    /// No sequence: the batch is not idempotent.
    pub const NONE: Sequence = Sequence(-1);
}

impl Timestamp {
    /// "No timestamp": smaller than every real one (an empty segment's maximum).
    pub const NONE: Timestamp = Timestamp(i64::MIN);
}
