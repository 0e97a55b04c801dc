//! State machines fed by a partition's committed records: the shape the group coordinator
//! has, and transactions and tables will have. A machine applies records in offset order
//! ([`LogMachine::apply`]); its drivers (the runtime, the simulator) read committed batches
//! from the partition's log and hand them to [`feed`], so both apply them the same way.

use skein_log::batch::batches;

use super::txn_partition::{marker_of, MarkerKind};
use super::{Offset, ProducerId};

/// A state machine fed by a partition's committed records in offset order (the coordinators
/// and tables of Skein share this shape).
pub trait LogMachine {
    /// Applies the committed record at `offset`. Records that do not decode are skipped by the
    /// caller with a warning, never applied.
    fn apply(&mut self, offset: Offset, key: &[u8], value: &[u8]) -> Result<(), RecordError>;
    /// Applies a record written inside `producer`'s transaction: it takes effect only when a
    /// commit marker of that producer follows ([`LogMachine::apply_marker`]). Machines whose
    /// partition takes no transactional writes refuse it (skipped, like a record that does not
    /// decode).
    fn apply_transactional(
        &mut self,
        offset: Offset,
        _producer: ProducerId,
        _key: &[u8],
        _value: &[u8],
    ) -> Result<(), RecordError> {
        Err(RecordError { offset: offset.0, reason: "a transactional record in a partition that takes none".into() })
    }
    /// A transaction marker of `producer` at `offset` (the default only moves past it).
    fn apply_marker(&mut self, offset: Offset, producer: ProducerId, kind: MarkerKind);
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
        let header = *batch.header();
        let base = header.base_offset.get();
        if header.attributes.is_control() {
            if header.base_offset >= from {
                match marker_of(&batch) {
                    Some(kind) => {
                        machine.apply_marker(header.base_offset, header.producer_id, kind);
                        fed.applied += 1;
                    }
                    None => {
                        fed.skipped += 1;
                        tracing::warn!(offset = base, "skipping a control batch this build does not know");
                    }
                }
            }
            fed.next = fed.next.max(header.next_offset());
            continue;
        }
        let transactional = header.attributes.is_transactional();
        for r in batch.records().iter() {
            let offset = Offset(base + u64::from(r.offset_delta.to_native()));
            if offset < from {
                continue;
            }
            let key = r.key.as_ref().map_or(&[][..], |k| k.as_slice());
            let applied = if transactional {
                machine.apply_transactional(offset, header.producer_id, key, r.value.as_slice())
            } else {
                machine.apply(offset, key, r.value.as_slice())
            };
            match applied {
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

/// Why [`catch_up`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// The machine is behind the log start (retention removed records it never applied): it
    /// must be rebuilt from the start.
    #[error("the log starts at {log_start}, after the state's {applied}")]
    BehindLogStart {
        /// What the machine applied.
        applied: Offset,
        /// The log's start.
        log_start: Offset,
    },
    /// The log could not be read.
    #[error("reading the log: {0}")]
    Read(#[from] skein_log::ReadError),
    /// A committed batch does not parse.
    #[error(transparent)]
    Feed(#[from] FeedError),
}

/// Feeds `machine` the committed records of `replica` (below its high watermark) from where
/// it stands: the one catch-up of every driver (runtime and simulator) of every machine.
/// Returns the records read (applied or skipped).
pub fn catch_up<M: LogMachine, S: skein_log::storage::Storage>(
    replica: &super::replica::Replica<S>,
    machine: &mut M,
) -> Result<u64, CatchUpError> {
    let log = replica.log();
    // A fresh machine starts at the log start (internal topics keep everything, so that is
    // offset 0 unless the replica was restarted at its leader's log start).
    if machine.applied() > Offset(0) && machine.applied() < log.log_start_offset() {
        return Err(CatchUpError::BehindLogStart { applied: machine.applied(), log_start: log.log_start_offset() });
    }
    let hw = replica.high_watermark();
    let mut from = machine.applied().max(log.log_start_offset());
    let mut read = 0;
    let mut buf = Vec::new();
    while from < hw {
        buf.clear();
        log.read_verified(from, skein_log::ReadLimit { max_bytes: 1 << 20, end: Some(hw) }, &mut buf)?;
        let fed = feed(machine, &buf, from)?;
        read += fed.applied + fed.skipped;
        if fed.next <= from {
            break;
        }
        from = fed.next;
    }
    Ok(read)
}
