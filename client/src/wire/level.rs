//! Table isolation levels, shared by the client and the broker.

use std::fmt;

/// A transaction's isolation level and concurrency control.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Level {
    /// Reads see the latest committed version; no validation (allows lost updates, skew).
    ReadCommitted,
    /// Reads at one snapshot; first committer wins on write-write conflicts (allows write skew).
    Snapshot,
    #[default]
    /// Serializable by serial order on the log: every replica validates the read set, the
    /// scanned ranges and the write set at the record's log position.
    Serializable,
    /// Serializable by actual serial execution: one transaction at a time per partition
    /// (interactive), or deterministic procedures run in log order; never aborts on conflict.
    Serial,
    /// Serializable by strict two-phase locking on the partition's leader.
    TwoPl,
    /// Serializable snapshot isolation: snapshot reads plus read-write antidependency
    /// tracking, aborting on a dangerous structure.
    Ssi,
}

impl Level {
    /// Every level, in code order.
    pub const ALL: [Level; 6] =
        [Level::ReadCommitted, Level::Snapshot, Level::Serializable, Level::Serial, Level::TwoPl, Level::Ssi];

    /// The name the CLI and configs use.
    pub fn name(self) -> &'static str {
        match self {
            Level::ReadCommitted => "read-committed",
            Level::Snapshot => "snapshot",
            Level::Serializable => "serializable",
            Level::Serial => "serial",
            Level::TwoPl => "2pl",
            Level::Ssi => "ssi",
        }
    }

    /// The level named `s`.
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }

    /// Its wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The level of wire code `c`.
    pub fn from_code(c: u8) -> Option<Level> {
        Level::ALL.get(usize::from(c)).copied()
    }

    /// Whether its reads are at one snapshot per partition (else: the latest committed).
    pub fn snapshot_reads(self) -> bool {
        matches!(self, Level::Snapshot | Level::Serializable | Level::Ssi)
    }

    /// Whether it promises serializability.
    pub fn serializable(self) -> bool {
        !matches!(self, Level::ReadCommitted | Level::Snapshot)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
