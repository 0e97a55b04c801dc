//! State machines fed by a partition's committed records: the shape the group coordinator
//! has, and transactions and tables will have. A machine applies records in offset order
//! ([`LogMachine::apply`]); its drivers (the runtime, the simulator) read committed batches
//! from the partition's log and hand them to [`feed`], so both apply them the same way.

use skein_log::batch::batches;

use super::Offset;

/// A state machine fed by a partition's committed records in offset order (the coordinators
/// and tables of Skein share this shape).
pub trait LogMachine {
    /// Applies the committed record at `offset`. Records that do not decode are skipped by the
    /// caller with a warning, never applied.
    fn apply(&mut self, offset: Offset, key: &[u8], value: &[u8]) -> Result<(), RecordError>;
    /// The offset after the last record applied.
    fn applied(&self) -> Offset;
}

/// A record that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("record at offset {offset}: {reason}")]
pub struct RecordError {
    /// Where.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// What [`feed`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// The offset after the last batch read (where the next read starts).
    pub next: Offset,
    /// Records applied.
    pub applied: u64,
    /// Records skipped because they do not decode (each logged).
    pub skipped: u64,
}

/// A batch that does not parse: the bytes under a committed offset are damaged.
#[derive(Debug, thiserror::Error)]
#[error("a committed batch at or after offset {from} does not parse: {reason}")]
pub struct FeedError {
    /// Where the read started.
    pub from: Offset,
    /// The parser's reason.
    pub reason: String,
}

/// Applies to `machine` every record at or after `from` in `bytes` (whole committed batches,
/// as a log read returns them).
pub fn feed<M: LogMachine>(machine: &mut M, bytes: &[u8], from: Offset) -> Result<Fed, FeedError> {
    let mut fed = Fed { next: from, ..Fed::default() };
    for batch in batches(bytes) {
        let batch = batch.map_err(|e| FeedError { from, reason: e.to_string() })?;
        let base = batch.header().base_offset.get();
        for r in batch.records().iter() {
            let offset = Offset(base + u64::from(r.offset_delta.to_native()));
            if offset < from {
                continue;
            }
            let key = r.key.as_ref().map_or(&[][..], |k| k.as_slice());
            match machine.apply(offset, key, r.value.as_slice()) {
                Ok(()) => fed.applied += 1,
                Err(e) => {
                    fed.skipped += 1;
                    tracing::warn!(error = %e, "skipping a record that does not decode");
                }
            }
        }
        fed.next = fed.next.max(batch.header().next_offset());
    }
    Ok(fed)
}
