//! Transactions as one partition replica sees them: which producers have a transaction open
//! here (and from which offset), which ended (and at which epoch), and the aborted ones (the
//! index read_committed fetches use). Every replica keeps it from the batches it appends, as
//! leader or follower, and rebuilds it from the log's batches after opening or truncating, as
//! [`super::producers::ProducerStates`] does.
//!
//! A transaction touches a partition between two **markers**, control batches only the
//! transaction coordinator writes (through [`super::Message::TxnMarker`], never a client's
//! produce): `Begin` when the coordinator added the partition to the transaction, and
//! `Commit` or `Abort` when it ended. A transactional write is accepted only between its
//! producer's `Begin` and end markers at the same producer epoch (Kafka's KIP-890 part 1: a
//! late write of an ended transaction cannot join the next one, and a write to a partition the
//! coordinator does not know of cannot leave a transaction open for ever). Epochs are bumped by
//! every transaction (KIP-890 part 2), and an end marker fences its epoch and every older one:
//! a delayed write, begin or end of an earlier transaction can never touch a later one.
//!
//! The **last stable offset** is the first offset of the oldest open transaction (its `Begin`
//! marker), capped at the high watermark: below it every transactional record is decided.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use skein_log::batch::{Attributes, BatchHeader, RecordBatch};
use skein_log::types::{ProducerEpoch, ProducerId};

use super::Offset;

/// A transaction marker's kind, as its control record's key says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkerKind {
    /// The transaction aborted here.
    Abort,
    /// The transaction committed here.
    Commit,
    /// The coordinator added this partition to the transaction: writes may follow.
    Begin,
}

impl MarkerKind {
    /// The control record's key: a version (0) and the kind, big-endian u16s (Kafka's layout,
    /// with Abort 0 and Commit 1 as there).
    pub fn key(self) -> [u8; 4] {
        let kind: u16 = match self {
            MarkerKind::Abort => 0,
            MarkerKind::Commit => 1,
            MarkerKind::Begin => 2,
        };
        let k = kind.to_be_bytes();
        [0, 0, k[0], k[1]]
    }

    /// Parses a control record's key.
    pub fn parse(key: &[u8]) -> Option<MarkerKind> {
        match key {
            [0, 0, 0, 0] => Some(MarkerKind::Abort),
            [0, 0, 0, 1] => Some(MarkerKind::Commit),
            [0, 0, 0, 2] => Some(MarkerKind::Begin),
            _ => None,
        }
    }

    /// Whether the marker ends a transaction.
    pub fn ends(self) -> bool {
        !matches!(self, MarkerKind::Begin)
    }

    /// A name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            MarkerKind::Abort => "abort",
            MarkerKind::Commit => "commit",
            MarkerKind::Begin => "begin",
        }
    }
}

/// The control batch of a marker: one record, transactional and control attributes, the
/// producer's id and epoch, no sequence (markers are not idempotent writes; duplicates are
/// recognized by [`PartitionTxns::check_marker`]).
pub fn marker_batch(
    producer: ProducerId,
    epoch: ProducerEpoch,
    kind: MarkerKind,
    stamp: skein_log::types::Timestamp,
) -> RecordBatch<Vec<u8>> {
    let mut b = skein_log::batch::BatchBuilder::new()
        .producer(producer, epoch, skein_log::types::Sequence::NONE)
        .attributes(Attributes::default().with_transactional(true).with_control(true));
    b.push(Some(&kind.key()), &[], &[], stamp);
    b.build()
}

/// The marker a control batch holds, if it is one this build knows.
pub fn marker_of<B: AsRef<[u8]>>(batch: &RecordBatch<B>) -> Option<MarkerKind> {
    if !batch.header().attributes.is_control() {
        return None;
    }
    let records = batch.records();
    let first = records.first()?;
    MarkerKind::parse(first.key.as_ref()?.as_slice())
}

/// An aborted transaction of one producer here: its records lie in `first..last`, `last` is
/// its abort marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortedTxn {
    /// The producer.
    pub producer: ProducerId,
    /// Its `Begin` marker's offset.
    pub first: Offset,
    /// Its `Abort` marker's offset.
    pub last: Offset,
}

/// Why a transactional write is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRefusal {
    /// The epoch is older than one this partition saw end or begin: a zombie or a late write.
    Fenced,
    /// The partition is not in an open transaction of this producer at this epoch (it was not
    /// added, or the transaction ended): Kafka's KIP-890 part 1 check.
    NotInTransaction,
    /// A control batch from a client: only coordinators write markers.
    Control,
}

/// What a marker does here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkerCheck {
    /// Append it.
    Append,
    /// Already in effect (a duplicate, or a retry): answer success, append nothing.
    Done,
    /// Of an epoch older than this partition's state for the producer: answer fenced.
    Stale,
}

#[derive(Clone, Copy, Debug, Default)]
struct Producer {
    /// The open transaction here: its epoch and its `Begin` marker's offset.
    open: Option<(ProducerEpoch, Offset)>,
    /// The newest epoch whose transaction ended here.
    ended: Option<ProducerEpoch>,
}

/// The transactions of one partition replica (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct PartitionTxns {
    producers: BTreeMap<ProducerId, Producer>,
    /// Open transactions by first offset (for the last stable offset).
    open: BTreeSet<(Offset, ProducerId)>,
    /// Aborted transactions in marker order.
    aborted: VecDeque<AbortedTxn>,
    /// Planted bug (simulator): transactional writes skip the partition check.
    no_partition_check: bool,
    /// Planted bug (simulator), the partition half of `no-txn-epoch-bump`: as Kafka before
    /// KIP-890, a transaction may begin (and take writes) at the epoch that last ended here.
    epoch_reuse: bool,
}

impl PartitionTxns {
    /// An empty state; `no_partition_check` plants the bug the KIP-890 part 1 check prevents.
    pub fn new(no_partition_check: bool) -> PartitionTxns {
        PartitionTxns { no_partition_check, ..PartitionTxns::default() }
    }

    /// As [`PartitionTxns::new`]; `epoch_reuse` plants the partition half of the bug KIP-890
    /// part 2 fixed: a `Begin` (and writes after it) at the epoch that last ended here.
    pub fn planted(no_partition_check: bool, epoch_reuse: bool) -> PartitionTxns {
        PartitionTxns { no_partition_check, epoch_reuse, ..PartitionTxns::default() }
    }

    /// Forgets everything (before a rebuild), keeping the plants.
    pub fn clear(&mut self) {
        *self = PartitionTxns::planted(self.no_partition_check, self.epoch_reuse);
    }

    /// The first offset of the oldest open transaction, if any is open.
    pub fn first_open(&self) -> Option<Offset> {
        self.open.first().map(|(o, _)| *o)
    }

    /// The last stable offset for a high watermark: below it, every transaction is decided.
    pub fn last_stable(&self, high_watermark: Offset) -> Offset {
        self.first_open().map_or(high_watermark, |o| o.min(high_watermark))
    }

    /// Open transactions here: (producer, epoch, first offset).
    pub fn open(&self) -> Vec<(ProducerId, ProducerEpoch, Offset)> {
        self.producers.iter().filter_map(|(p, s)| s.open.map(|(e, o)| (*p, e, o))).collect()
    }

    /// The aborted transactions overlapping offsets `from..to`.
    pub fn aborted_in(&self, from: Offset, to: Offset) -> Vec<AbortedTxn> {
        // In marker order, so by `last`: skip those ending before `from` without a scan.
        let start = self.aborted.partition_point(|a| a.last < from);
        self.aborted.range(start..).filter(|a| a.first < to).copied().collect()
    }

    /// Every aborted transaction known (for checks).
    pub fn aborted(&self) -> impl Iterator<Item = &AbortedTxn> {
        self.aborted.iter()
    }

    /// Drops aborted transactions wholly before the log start (after retention).
    pub fn retain_from(&mut self, log_start: Offset) {
        while self.aborted.front().is_some_and(|a| a.last < log_start) {
            self.aborted.pop_front();
        }
    }

    /// Whether the leader accepts this client batch. Non-transactional batches always pass.
    pub fn check_write(&self, h: &BatchHeader) -> Result<(), WriteRefusal> {
        if h.attributes.is_control() {
            return Err(WriteRefusal::Control);
        }
        if !h.attributes.is_transactional() {
            return Ok(());
        }
        if self.no_partition_check {
            return Ok(());
        }
        let epoch = h.producer_epoch;
        let p = self.producers.get(&h.producer_id).copied().unwrap_or_default();
        match p.open {
            Some((e, _)) if e == epoch => Ok(()),
            Some((e, _)) if e > epoch => Err(WriteRefusal::Fenced),
            _ if p.ended.is_some_and(|e| e > epoch || (e == epoch && !self.epoch_reuse)) => Err(WriteRefusal::Fenced),
            _ => Err(WriteRefusal::NotInTransaction),
        }
    }

    /// What a marker from the coordinator does here.
    pub fn check_marker(&self, producer: ProducerId, epoch: ProducerEpoch, kind: MarkerKind) -> MarkerCheck {
        let p = self.producers.get(&producer).copied().unwrap_or_default();
        let ended_at_or_after = p.ended.is_some_and(|e| e >= epoch);
        let begin_fenced = p.ended.is_some_and(|e| e > epoch || (e == epoch && !self.epoch_reuse));
        match (kind, p.open) {
            (MarkerKind::Begin, Some((e, _))) if e == epoch => MarkerCheck::Done,
            (MarkerKind::Begin, Some((e, _))) if e > epoch => MarkerCheck::Stale,
            (MarkerKind::Begin, _) if begin_fenced => MarkerCheck::Stale,
            // An open transaction of an older epoch that never ended: the coordinator ends
            // every partition before the id's next transaction begins, so only a coordinator
            // that lost its state can get here; the new Begin aborts the older one (`note`),
            // so it cannot pin the last stable offset for ever.
            (MarkerKind::Begin, _) => MarkerCheck::Append,
            (_, Some((e, _))) if e == epoch => MarkerCheck::Append,
            (_, Some((e, _))) if e > epoch => MarkerCheck::Stale,
            (_, _) if ended_at_or_after => MarkerCheck::Done,
            // An end for a transaction that never began here (the coordinator added the
            // partition but its Begin was never written): recorded, so a late Begin of that
            // epoch is refused.
            (_, _) => MarkerCheck::Append,
        }
    }

    /// Records a batch appended to this replica's log (as leader or follower), with its base
    /// offset as the log stamped it.
    pub fn note<B: AsRef<[u8]>>(&mut self, batch: &RecordBatch<B>, base: Offset) {
        let h = batch.header();
        if !h.attributes.is_control() {
            return;
        }
        let Some(kind) = marker_of(batch) else {
            tracing::warn!(offset = %base, "a control batch this build does not know; ignored");
            return;
        };
        self.note_marker(h.producer_id, h.producer_epoch, kind, base);
    }

    /// Records a marker appended at `at` (the caller parsed it from the batch).
    pub fn note_marker(&mut self, producer: ProducerId, epoch: ProducerEpoch, kind: MarkerKind, at: Offset) {
        let p = self.producers.entry(producer).or_default();
        match kind {
            MarkerKind::Begin => match p.open {
                None => {
                    p.open = Some((epoch, at));
                    self.open.insert((at, producer));
                }
                Some((e, first)) if e < epoch => {
                    // See `check_marker`: the older transaction can no longer end normally;
                    // it is aborted here, in log order, so every replica decides the same.
                    tracing::warn!(
                        producer = producer.0,
                        old = e.0,
                        new = epoch.0,
                        "a begin found an older transaction open: aborting it"
                    );
                    self.open.remove(&(first, producer));
                    self.aborted.push_back(AbortedTxn { producer, first, last: at });
                    p.ended = Some(e);
                    p.open = Some((epoch, at));
                    self.open.insert((at, producer));
                }
                Some(_) => {}
            },
            MarkerKind::Commit | MarkerKind::Abort => {
                if let Some((e, first)) = p.open {
                    if e <= epoch {
                        p.open = None;
                        self.open.remove(&(first, producer));
                        if kind == MarkerKind::Abort {
                            self.aborted.push_back(AbortedTxn { producer, first, last: at });
                        }
                    }
                }
                p.ended = Some(p.ended.map_or(epoch, |e| e.max(epoch)));
            }
        }
    }
}

/// Whether a transactional batch of `producer` at `offset` belongs to an aborted transaction
/// of `aborted` (the client-side filter of read_committed, used by the checker too).
pub fn is_aborted(aborted: &[AbortedTxn], producer: ProducerId, offset: Offset) -> bool {
    aborted.iter().any(|a| a.producer == producer && a.first <= offset && offset < a.last)
}

#[cfg(test)]
mod tests {
    use skein_log::batch::BatchBuilder;
    use skein_log::types::{Sequence, Timestamp};

    use super::*;

    const P: ProducerId = ProducerId(7);

    fn data(epoch: i16, transactional: bool) -> BatchHeader {
        let mut b = BatchBuilder::new()
            .producer(P, ProducerEpoch(epoch), Sequence(0))
            .attributes(Attributes::default().with_transactional(transactional));
        b.push(None, b"x", &[], Timestamp(1));
        *b.build().header()
    }

    fn mark(t: &mut PartitionTxns, epoch: i16, kind: MarkerKind, at: u64) {
        assert_eq!(t.check_marker(P, ProducerEpoch(epoch), kind), MarkerCheck::Append, "{kind:?} at {at}");
        let b = marker_batch(P, ProducerEpoch(epoch), kind, Timestamp(1));
        assert_eq!(marker_of(&b), Some(kind));
        t.note(&b, Offset(at));
    }

    #[test]
    fn writes_are_accepted_only_between_begin_and_end_of_their_epoch() {
        let mut t = PartitionTxns::new(false);
        assert_eq!(t.check_write(&data(0, false)), Ok(()), "plain writes always pass");
        assert_eq!(t.check_write(&data(0, true)), Err(WriteRefusal::NotInTransaction), "not added yet");
        mark(&mut t, 0, MarkerKind::Begin, 10);
        assert_eq!(t.check_write(&data(0, true)), Ok(()));
        assert_eq!(t.last_stable(Offset(50)), Offset(10));
        assert_eq!(t.last_stable(Offset(5)), Offset(5), "never past the high watermark");
        mark(&mut t, 0, MarkerKind::Commit, 20);
        assert_eq!(t.last_stable(Offset(50)), Offset(50));
        assert_eq!(t.check_write(&data(0, true)), Err(WriteRefusal::Fenced), "a late write of the ended transaction");
        assert_eq!(
            t.check_write(&data(1, true)),
            Err(WriteRefusal::NotInTransaction),
            "the next one was not added here"
        );
        assert_eq!(t.check_marker(P, ProducerEpoch(0), MarkerKind::Commit), MarkerCheck::Done, "a retried end");
        assert_eq!(t.check_marker(P, ProducerEpoch(0), MarkerKind::Begin), MarkerCheck::Stale, "a late begin");
        mark(&mut t, 1, MarkerKind::Begin, 30);
        assert_eq!(t.check_marker(P, ProducerEpoch(1), MarkerKind::Begin), MarkerCheck::Done, "a retried begin");
        assert_eq!(
            t.check_marker(P, ProducerEpoch(0), MarkerKind::Abort),
            MarkerCheck::Stale,
            "a late end never ends the next"
        );
        assert_eq!(t.check_write(&data(0, true)), Err(WriteRefusal::Fenced));
        mark(&mut t, 1, MarkerKind::Abort, 40);
        assert_eq!(
            t.aborted_in(Offset(0), Offset(100)),
            vec![AbortedTxn { producer: P, first: Offset(30), last: Offset(40) }]
        );
        assert!(t.aborted_in(Offset(41), Offset(100)).is_empty());
        assert!(is_aborted(&t.aborted_in(Offset(0), Offset(100)), P, Offset(35)));
        assert!(!is_aborted(&t.aborted_in(Offset(0), Offset(100)), P, Offset(15)));
        t.retain_from(Offset(41));
        assert!(t.aborted().next().is_none());
    }

    #[test]
    fn an_end_for_a_partition_that_never_began_fences_its_late_begin() {
        let mut t = PartitionTxns::new(false);
        mark(&mut t, 3, MarkerKind::Abort, 0);
        assert_eq!(t.check_marker(P, ProducerEpoch(3), MarkerKind::Begin), MarkerCheck::Stale);
        assert_eq!(t.check_write(&data(3, true)), Err(WriteRefusal::Fenced));
        assert_eq!(t.first_open(), None);
    }

    #[test]
    fn client_control_batches_are_refused_and_the_plant_skips_the_check() {
        let t = PartitionTxns::new(false);
        let b = marker_batch(P, ProducerEpoch(0), MarkerKind::Commit, Timestamp(1));
        assert_eq!(t.check_write(b.header()), Err(WriteRefusal::Control));
        let planted = PartitionTxns::new(true);
        assert_eq!(planted.check_write(&data(0, true)), Ok(()));
    }

    #[test]
    fn the_epoch_reuse_plant_begins_again_at_the_epoch_that_ended() {
        let mut t = PartitionTxns::planted(false, true);
        mark(&mut t, 0, MarkerKind::Begin, 0);
        mark(&mut t, 0, MarkerKind::Commit, 2);
        assert_eq!(t.check_write(&data(0, true)), Err(WriteRefusal::NotInTransaction));
        mark(&mut t, 0, MarkerKind::Begin, 3);
        assert_eq!(t.check_write(&data(0, true)), Ok(()), "a late write of the first joins the second");
        t.clear();
        mark(&mut t, 0, MarkerKind::Abort, 0);
        assert_eq!(
            t.check_marker(P, ProducerEpoch(0), MarkerKind::Begin),
            MarkerCheck::Append,
            "the plant survives a rebuild"
        );
    }

    #[test]
    fn the_oldest_open_transaction_pins_the_last_stable_offset() {
        let mut t = PartitionTxns::new(false);
        mark(&mut t, 0, MarkerKind::Begin, 5);
        let q = ProducerId(8);
        t.note(&marker_batch(q, ProducerEpoch(0), MarkerKind::Begin, Timestamp(1)), Offset(7));
        assert_eq!(t.last_stable(Offset(100)), Offset(5));
        mark(&mut t, 0, MarkerKind::Commit, 9);
        assert_eq!(t.last_stable(Offset(100)), Offset(7));
        assert_eq!(t.open(), vec![(q, ProducerEpoch(0), Offset(7))]);
    }
}
