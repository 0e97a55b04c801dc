//! Idempotent producer state of one partition replica: per producer id, its epoch and its last
//! few **runs**: a run is a stretch of the producer's batches appended back to back, with
//! consecutive sequences at consecutive offsets, kept as one sequence range and its first
//! offset. Every replica keeps it, from the batches it appends (as leader or follower), so a
//! new leader already knows it; a truncation or restart rebuilds it from the log's batch
//! headers. A retried batch is recognized by its sequence range lying inside a remembered run
//! and answered with the offset it was first written at (the run's first offset plus the
//! sequence distance): a retry after a failover cannot write a record twice.
//!
//! Why runs and not the last five batches (Kafka's window): a client sends one request per
//! partition at a time, and a request's batches of a partition are appended back to back, so
//! whatever a client has unanswered is one run, however many batches it holds. With a window of
//! batches, a request of dozens of batches whose answer was lost after the append (a leader
//! killed, acks=all timing out) had the retries of its oldest batches refused as out of order
//! although they were in the log. Runs are broken only by another producer's batches (or a
//! non-idempotent one) in between, so five runs cover any client that keeps one request per
//! partition in flight.

use std::collections::{BTreeMap, VecDeque};

use skein_log::batch::BatchHeader;
use skein_log::types::{ProducerEpoch, ProducerId, Sequence};

use super::Offset;

/// Runs remembered per producer (see the module header).
pub const RUNS_REMEMBERED: usize = 5;

/// What to do with a producer's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not idempotent, or the next sequence (or a new producer / epoch): append it.
    Append,
    /// Already in the log at `base..end` (inside a remembered run): answer with that, append
    /// nothing.
    Duplicate {
        /// Offset of its first record.
        base: Offset,
        /// Offset after its last record.
        end: Offset,
    },
    /// A sequence gap, or an old sequence in no remembered run: reject, append nothing.
    OutOfOrder,
    /// The batch's producer epoch is older than the producer's: reject (a zombie instance).
    Fenced,
}

/// A run: sequences `first..=last` written at offsets `base..end` (one record per sequence,
/// so `end - base == last - first + 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Written {
    first: i32,
    last: i32,
    base: Offset,
    end: Offset,
}

impl Written {
    /// Where sequences `first..=last` were written, if this run holds all of them.
    fn locate(&self, first: i32, last: i32) -> Option<(Offset, Offset)> {
        if first > last || first < self.first || last > self.last {
            return None; // a batch whose sequences wrap is matched only exactly, below
        }
        let base = self.base.0 + u64::try_from(first - self.first).ok()?;
        let end = base + u64::try_from(last - first).ok()? + 1;
        Some((Offset(base), Offset(end)))
    }
}

#[derive(Clone, Debug, Default)]
struct Producer {
    epoch: i16,
    batches: VecDeque<Written>,
}

/// The producer states of one partition replica.
#[derive(Clone, Debug, Default)]
pub struct ProducerStates {
    producers: BTreeMap<ProducerId, Producer>,
}

fn is_idempotent(h: &BatchHeader) -> bool {
    h.producer_id != ProducerId::NONE && h.base_sequence != Sequence::NONE && h.producer_epoch != ProducerEpoch::NONE
}

impl ProducerStates {
    /// Producers known.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer is known.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Forgets everything (before a rebuild).
    pub fn clear(&mut self) {
        self.producers.clear();
    }

    /// Decides what a leader does with a batch about to be appended.
    pub fn check(&self, h: &BatchHeader) -> SequenceCheck {
        if !is_idempotent(h) {
            return SequenceCheck::Append;
        }
        let Some(p) = self.producers.get(&h.producer_id) else {
            return SequenceCheck::Append; // a new producer (or one whose state was retained away)
        };
        let epoch = h.producer_epoch.0;
        if epoch < p.epoch {
            return SequenceCheck::Fenced;
        }
        if epoch > p.epoch {
            // A new epoch starts its sequences again at 0.
            return if h.base_sequence.0 == 0 { SequenceCheck::Append } else { SequenceCheck::OutOfOrder };
        }
        let first = h.base_sequence.0;
        let last = first.wrapping_add(h.record_count as i32).wrapping_sub(1);
        if let Some(w) = p.batches.iter().find(|w| w.first == first && w.last == last) {
            return SequenceCheck::Duplicate { base: w.base, end: w.end };
        }
        if let Some((base, end)) = p.batches.iter().find_map(|w| w.locate(first, last)) {
            return SequenceCheck::Duplicate { base, end };
        }
        match p.batches.back() {
            Some(w) if first == w.last.wrapping_add(1) => SequenceCheck::Append,
            Some(_) => SequenceCheck::OutOfOrder,
            None => SequenceCheck::Append,
        }
    }

    /// Records a batch that was appended (by this replica as leader, or replicated).
    pub fn note(&mut self, h: &BatchHeader) {
        if !is_idempotent(h) {
            return;
        }
        let p = self.producers.entry(h.producer_id).or_default();
        if p.batches.is_empty() || h.producer_epoch.0 > p.epoch {
            p.epoch = h.producer_epoch.0;
            p.batches.clear();
        } else if h.producer_epoch.0 < p.epoch {
            return; // a leader never appends a fenced epoch's batch after a newer one
        }
        let first = h.base_sequence.0;
        let last = first.wrapping_add(h.record_count as i32).wrapping_sub(1);
        let written = Written { first, last, base: h.base_offset, end: h.next_offset() };
        match p.batches.back_mut() {
            // Back to back with the run before, in sequences and offsets, without wrapping.
            Some(w) if w.last < first && first == w.last.wrapping_add(1) && first <= last && w.end == written.base => {
                w.last = last;
                w.end = written.end;
            }
            _ => p.batches.push_back(written),
        }
        while p.batches.len() > RUNS_REMEMBERED {
            p.batches.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use skein_log::batch::BatchBuilder;
    use skein_log::types::Timestamp;

    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, records: u32, base: u64) -> BatchHeader {
        let mut b = BatchBuilder::new().producer(ProducerId(pid), ProducerEpoch(epoch), Sequence(seq));
        for i in 0..records {
            b.push(None, &u64::from(i).to_le_bytes(), &[], Timestamp(1));
        }
        let mut batch = b.build();
        batch.set_base_offset(Offset(base));
        *batch.header()
    }

    #[test]
    fn next_sequences_append_and_retries_are_duplicates_with_their_first_offsets() {
        let mut s = ProducerStates::default();
        let a = header(7, 0, 0, 2, 10);
        assert_eq!(s.check(&a), SequenceCheck::Append);
        s.note(&a);
        let b = header(7, 0, 2, 1, 12);
        assert_eq!(s.check(&b), SequenceCheck::Append);
        s.note(&b);
        assert_eq!(s.check(&header(7, 0, 0, 2, 99)), SequenceCheck::Duplicate { base: Offset(10), end: Offset(12) });
        assert_eq!(s.check(&header(7, 0, 2, 1, 99)), SequenceCheck::Duplicate { base: Offset(12), end: Offset(13) });
        assert_eq!(s.check(&header(7, 0, 5, 1, 99)), SequenceCheck::OutOfOrder, "a gap");
        assert_eq!(
            s.check(&header(7, 0, 1, 1, 99)),
            SequenceCheck::Duplicate { base: Offset(11), end: Offset(12) },
            "a range inside the run: its records are in the log"
        );
        assert_eq!(s.check(&header(7, 0, 2, 2, 99)), SequenceCheck::OutOfOrder, "partly past the end");
    }

    #[test]
    fn epochs_fence_old_instances_and_restart_sequences() {
        let mut s = ProducerStates::default();
        s.note(&header(7, 1, 0, 1, 0));
        assert_eq!(s.check(&header(7, 0, 1, 1, 1)), SequenceCheck::Fenced);
        assert_eq!(s.check(&header(7, 2, 3, 1, 1)), SequenceCheck::OutOfOrder, "a new epoch starts at 0");
        let e2 = header(7, 2, 0, 1, 1);
        assert_eq!(s.check(&e2), SequenceCheck::Append);
        s.note(&e2);
        assert_eq!(s.check(&header(7, 1, 1, 1, 2)), SequenceCheck::Fenced);
    }

    #[test]
    fn batches_appended_back_to_back_are_one_run_and_any_of_them_is_a_duplicate() {
        let mut s = ProducerStates::default();
        // Forty batches of three records, back to back at offsets 100.. (one request's worth).
        for i in 0..40 {
            s.note(&header(7, 0, i * 3, 3, 100 + i as u64 * 3));
        }
        for i in [0, 1, 20, 39] {
            let base = Offset(100 + i as u64 * 3);
            let expect = SequenceCheck::Duplicate { base, end: Offset(base.0 + 3) };
            assert_eq!(s.check(&header(7, 0, i * 3, 3, 999)), expect, "batch {i} of the run");
        }
        assert_eq!(s.check(&header(7, 0, 120, 2, 999)), SequenceCheck::Append, "the next sequence");
        assert_eq!(s.check(&header(7, 0, 118, 4, 999)), SequenceCheck::OutOfOrder, "runs past the end");
        // Another producer's batch in between starts a new run; the old one still answers.
        s.note(&header(8, 0, 0, 1, 220));
        s.note(&header(7, 0, 120, 2, 221));
        assert_eq!(s.check(&header(7, 0, 0, 3, 999)), SequenceCheck::Duplicate { base: Offset(100), end: Offset(103) });
        assert_eq!(
            s.check(&header(7, 0, 120, 2, 999)),
            SequenceCheck::Duplicate { base: Offset(221), end: Offset(223) }
        );
    }

    #[test]
    fn only_the_last_five_runs_are_remembered_and_others_are_untouched() {
        let mut s = ProducerStates::default();
        // Seven runs: each batch at offsets apart from the one before (others wrote between).
        for i in 0..7 {
            s.note(&header(7, 0, i, 1, i as u64 * 10));
        }
        assert_eq!(s.check(&header(7, 0, 6, 1, 99)), SequenceCheck::Duplicate { base: Offset(60), end: Offset(61) });
        assert_eq!(s.check(&header(7, 0, 1, 1, 99)), SequenceCheck::OutOfOrder, "forgotten");
        assert_eq!(s.check(&header(8, 0, 40, 1, 99)), SequenceCheck::Append, "another producer is new");
        let plain = header(-1, -1, -1, 1, 0);
        assert_eq!(s.check(&plain), SequenceCheck::Append);
        s.note(&plain);
        assert_eq!(s.len(), 1, "non-idempotent batches keep no state");
    }
}
