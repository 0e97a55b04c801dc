//! Serializable snapshot isolation's tracker on one table partition's leader, after Cahill,
//! Röhm and Fekete ("Serializable Isolation for Snapshot Databases", SIGMOD 2008) and Ports
//! and Grittner ("Serializable Snapshot Isolation in PostgreSQL", VLDB 2012).
//!
//! Transactions read at a snapshot offset (every version below it is visible) and commit at
//! a commit offset (their record's offset; later is higher). Snapshot isolation already
//! rules out most anomalies (first committer wins is validated by the store, not here);
//! what remains are cycles of dependencies that contain read-write antidependencies
//! `R -rw-> W` (R read a version older than W's write of the same key, or did not see W's
//! row in a range it scanned: R did not see W). Every such cycle contains a *dangerous
//! structure* `T1 -rw-> T2 -rw-> T3` between concurrent transactions in which T3 commits
//! first (T1 may be T3). When T1 is read-only the structure is only dangerous if T3 committed
//! before T1's snapshot. This tracker records the antidependencies and refuses to commit a
//! transaction that would complete a dangerous structure. It is conservative: it may abort
//! a transaction that was serializable after all (the structure is not always part of a
//! cycle), never the reverse.
//!
//! How the edges are found: the reads of a transaction (SIREAD "locks", on keys and on
//! scanned ranges) are kept while it or a transaction concurrent with it may still commit.
//! A read of a key that a tracked, not-visible transaction wrote records `reader -> writer`
//! at once; a transaction's writes, known at its commit check, record `reader -> writer`
//! for every concurrent reader of those keys.
//!
//! Who aborts: every edge between transactions exists at the latest when the last of them to
//! commit is checked, so the check of that last one decides: it aborts if all three are
//! committed or committing and the structure is dangerous. A structure with a member still
//! active is left to that member's check. So the transaction aborted is always the one being
//! checked, never a committed one (PostgreSQL may instead doom an active pivot; it is then
//! retried instead of the committer). Commit order: a committed transaction has an offset; a
//! committing one (checked, offset pending) commits after every transaction committed before
//! its check and in an unknown order with the other committing ones, so both orders are
//! assumed where they matter.
//!
//! Call protocol: [`SsiTracker::begin`] at a transaction's first read here (or at its commit
//! check if it reads nothing here), with its snapshot of this partition; [`SsiTracker::read`]
//! and [`SsiTracker::scan`] for what it reads; [`SsiTracker::check_commit`] with what it
//! writes, before appending its part; then [`SsiTracker::committed`] with its commit offset
//! (a read-only one: the log end when it is answered), or [`SsiTracker::abort`] if it ends
//! otherwise; [`SsiTracker::gc`] now and then.
//!
//! Bounded memory: [`SsiTracker::gc`] forgets committed transactions that every active or
//! committing transaction saw. What could still matter of one (a transaction that read a key
//! it overwrote is a pivot whose T3 committed early) is kept as a summary: the earliest
//! commit offset among the forgotten transactions each tracked one has an antidependency to
//! (PostgreSQL's "summary conflict out"). A transaction that begins with a snapshot older
//! than a forgotten one's commit cannot be checked and is aborted at its commit check.
//!
//! Not done here: dangerous structures whose edges are on different partitions (each
//! partition's leader sees its own edges only); first-committer-wins (the store); locking.
//! Deterministic: ordered maps only, no clock.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::{AbortReason, Key, Range, TxnId};
use crate::core::Offset;

/// The read-write antidependencies of the transactions of one partition's leader. See the
/// module documentation for the call protocol.
#[derive(Debug, Default)]
pub struct SsiTracker {
    /// Every tracked transaction.
    txns: BTreeMap<TxnId, Txn>,
    /// SIREAD locks on keys: who read each key.
    readers: BTreeMap<Key, BTreeSet<TxnId>>,
    /// SIREAD locks on (non-empty) ranges: who scanned each range.
    scanners: BTreeMap<Range, BTreeSet<TxnId>>,
    /// The committing and committed writers of each key.
    writers: BTreeMap<Key, BTreeSet<TxnId>>,
    /// The highest commit offset of a transaction that wrote (a transaction checked now
    /// commits after it).
    committed_max: Option<Offset>,
    /// A transaction beginning with a snapshot below this was concurrent with a forgotten
    /// one: it cannot be checked.
    stale_below: Offset,
}

/// Where a transaction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading; what it writes is not known yet.
    Active,
    /// Its commit check passed: it counts as committed, at an offset not known yet but at or
    /// after `floor`.
    Committing { floor: Offset },
    /// Committed at `offset`.
    Committed { offset: Offset },
}

/// A tracked transaction.
#[derive(Debug)]
struct Txn {
    snapshot: Offset,
    state: State,
    /// Wrote nothing (known from its commit check on).
    read_only: bool,
    /// Began below [`SsiTracker::stale_below`].
    stale: bool,
    reads: BTreeSet<Key>,
    scans: BTreeSet<Range>,
    writes: Vec<Key>,
    /// `R -rw-> self`: R read what self overwrote.
    ins: BTreeSet<TxnId>,
    /// `self -rw-> W`: self read what W overwrote.
    outs: BTreeSet<TxnId>,
    /// The earliest commit offset of a forgotten W with `self -rw-> W`.
    out_forgotten: Option<Offset>,
}

/// A member of a structure: a tracked transaction, or a forgotten committed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Tracked(TxnId),
    Forgotten(Offset),
}

impl SsiTracker {
    /// An empty tracker.
    pub fn new() -> SsiTracker {
        SsiTracker::default()
    }

    /// `txn` reads at `snapshot` here (the first call wins; later calls change nothing).
    pub fn begin(&mut self, txn: TxnId, snapshot: Offset) {
        let stale = snapshot < self.stale_below;
        self.txns.entry(txn).or_insert_with(|| Txn {
            snapshot,
            state: State::Active,
            read_only: false,
            stale,
            reads: BTreeSet::new(),
            scans: BTreeSet::new(),
            writes: Vec::new(),
            ins: BTreeSet::new(),
            outs: BTreeSet::new(),
            out_forgotten: None,
        });
    }

    /// `txn` read `key`: a SIREAD lock, and `txn -rw-> W` for each tracked W that wrote `key`
    /// and that `txn` does not see. Ignored unless `txn` began and is active.
    pub fn read(&mut self, txn: TxnId, key: &[u8]) {
        let Some(snapshot) = self.active_snapshot(txn) else {
            return;
        };
        let t = self.txns.get_mut(&txn).expect("active");
        if t.reads.insert(key.to_vec()) {
            self.readers.entry(key.to_vec()).or_default().insert(txn);
        }
        let writers: Vec<TxnId> = self.writers.get(key).into_iter().flatten().copied().collect();
        self.edges_to_hidden_writers(txn, snapshot, writers);
    }

    /// `txn` scanned `range`: a SIREAD lock on the range (present rows or not), and
    /// `txn -rw-> W` for each tracked W that wrote a key in it and that `txn` does not see.
    /// Ignored unless `txn` began and is active.
    pub fn scan(&mut self, txn: TxnId, range: &Range) {
        if empty(range) {
            return;
        }
        let Some(snapshot) = self.active_snapshot(txn) else {
            return;
        };
        let t = self.txns.get_mut(&txn).expect("active");
        if t.scans.insert(range.clone()) {
            self.scanners.entry(range.clone()).or_default().insert(txn);
        }
        let to = range.to.as_ref().map_or(Bound::Unbounded, |t| Bound::Excluded(t.as_slice()));
        let writers: BTreeSet<TxnId> = self
            .writers
            .range::<[u8], _>((Bound::Included(range.from.as_slice()), to))
            .flat_map(|(_, ws)| ws.iter().copied())
            .collect();
        self.edges_to_hidden_writers(txn, snapshot, writers.into_iter().collect());
    }

    /// Whether `txn`, writing `writes` (nothing: read-only), may commit. First records
    /// `R -rw-> txn` for every other tracked R that read a written key (or scanned a range
    /// holding one) and is concurrent with `txn` (active, committing, or committed at or
    /// after `txn`'s snapshot). Then: `Err(Dangerous)` if committing `txn` would complete a
    /// dangerous structure; `txn` is forgotten then (its `abort` is a no-op). `Ok`: `txn` is
    /// committing: later checks count it as committed, after every transaction committed
    /// so far; report its offset with [`SsiTracker::committed`], or its failure with
    /// [`SsiTracker::abort`].
    ///
    /// `Err(LeaderChanged)` for a transaction that did not [`SsiTracker::begin`] here (its
    /// reads were tracked elsewhere, or not at all), `Err(Dangerous)` for one that began
    /// below a forgotten transaction's commit; `Ok` again for one that is committing or
    /// committed already (nothing changes).
    pub fn check_commit(&mut self, txn: TxnId, writes: &[Key]) -> Result<(), AbortReason> {
        let Some(t) = self.txns.get(&txn) else {
            return Err(AbortReason::LeaderChanged);
        };
        if t.state != State::Active {
            return Ok(());
        }
        if t.stale {
            self.remove(txn);
            return Err(AbortReason::Dangerous);
        }
        self.edges_from_readers(txn, writes);
        let floor = self.committed_max.map_or(Offset::ZERO, Offset::next);
        let t = self.txns.get_mut(&txn).expect("checked above");
        t.state = State::Committing { floor };
        t.read_only = writes.is_empty();
        if self.completes_dangerous(txn) {
            self.remove(txn);
            return Err(AbortReason::Dangerous);
        }
        let mut written = writes.to_vec();
        written.sort();
        written.dedup();
        for k in &written {
            self.writers.entry(k.clone()).or_default().insert(txn);
        }
        self.txns.get_mut(&txn).expect("checked above").writes = written;
        Ok(())
    }

    /// `txn` committed at `offset` (its record's; a read-only transaction: the log end when
    /// it is answered). Only the first call counts; unknown transactions are ignored.
    pub fn committed(&mut self, txn: TxnId, offset: Offset) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        // Active: its commit was not checked (a caller's mistake); its writes are unknown,
        // so it is only recorded as committed.
        if matches!(t.state, State::Committed { .. }) {
            return;
        }
        t.state = State::Committed { offset };
        if !t.read_only {
            self.committed_max = self.committed_max.max(Some(offset));
        }
    }

    /// `txn` ended without committing: it, its reads, writes and antidependencies are
    /// forgotten. A committed transaction is kept (its antidependencies still count).
    pub fn abort(&mut self, txn: TxnId) {
        if self.txns.get(&txn).is_some_and(|t| !matches!(t.state, State::Committed { .. })) {
            self.remove(txn);
        }
    }

    /// Forgets the committed transactions that every active and committing transaction saw
    /// (committed below the oldest of their snapshots), keeping what may still matter of
    /// them as a summary on the transactions that read what they overwrote.
    pub fn gc(&mut self) {
        let horizon =
            self.txns.values().filter(|t| !matches!(t.state, State::Committed { .. })).map(|t| t.snapshot).min();
        let old: Vec<(TxnId, Offset)> = self
            .txns
            .iter()
            .filter_map(|(id, t)| match t.state {
                State::Committed { offset } if horizon.is_none_or(|h| offset < h) => Some((*id, offset)),
                _ => None,
            })
            .collect();
        let forgotten: BTreeSet<TxnId> = old.iter().map(|(id, _)| *id).collect();
        for (id, offset) in old {
            let t = &self.txns[&id];
            // A read-only transaction was concurrent with what began before its snapshot; a
            // writer with what began at or before its commit.
            let concurrent_below = if t.read_only { t.snapshot } else { offset.next() };
            self.stale_below = self.stale_below.max(concurrent_below);
            let readers: Vec<TxnId> = t.ins.iter().filter(|r| !forgotten.contains(r)).copied().collect();
            for r in readers {
                let reader = self.txns.get_mut(&r).expect("edges join tracked transactions");
                reader.out_forgotten = Some(reader.out_forgotten.map_or(offset, |o| o.min(offset)));
            }
            self.remove(id);
        }
    }

    /// How many transactions are tracked.
    pub fn tracked(&self) -> usize {
        self.txns.len()
    }

    fn active_snapshot(&self, txn: TxnId) -> Option<Offset> {
        self.txns.get(&txn).filter(|t| t.state == State::Active).map(|t| t.snapshot)
    }

    /// `reader -> W` for each of `writers` whose commit the reader at `snapshot` does not see.
    fn edges_to_hidden_writers(&mut self, reader: TxnId, snapshot: Offset, writers: Vec<TxnId>) {
        for w in writers {
            let hidden = match self.txns[&w].state {
                State::Active => false,
                State::Committing { .. } => true,
                State::Committed { offset } => offset >= snapshot,
            };
            if w != reader && hidden {
                self.edge(reader, w);
            }
        }
    }

    /// `R -> writer` for each concurrent R that read one of `writes`.
    fn edges_from_readers(&mut self, writer: TxnId, writes: &[Key]) {
        let mut readers = BTreeSet::new();
        for k in writes {
            readers.extend(self.readers.get(k).into_iter().flatten().copied());
            for (r, scanners) in &self.scanners {
                if r.contains(k) {
                    readers.extend(scanners.iter().copied());
                }
            }
        }
        let snapshot = self.txns[&writer].snapshot;
        for r in readers {
            let concurrent = match self.txns[&r].state {
                State::Active | State::Committing { .. } => true,
                State::Committed { offset } => offset >= snapshot,
            };
            if r != writer && concurrent {
                self.edge(r, writer);
            }
        }
    }

    fn edge(&mut self, reader: TxnId, writer: TxnId) {
        self.txns.get_mut(&reader).expect("tracked").outs.insert(writer);
        self.txns.get_mut(&writer).expect("tracked").ins.insert(reader);
    }

    /// Whether `txn` (committing now) completes a dangerous structure with transactions
    /// committed or committing.
    fn completes_dangerous(&self, txn: TxnId) -> bool {
        let t = &self.txns[&txn];
        let as_t1 = t.outs.iter().any(|t2| self.outs(*t2).any(|t3| self.dangerous(txn, *t2, t3)));
        let as_t2 = t.ins.iter().any(|t1| self.outs(txn).any(|t3| self.dangerous(*t1, txn, t3)));
        let as_t3 =
            t.ins.iter().any(|t2| self.txns[t2].ins.iter().any(|t1| self.dangerous(*t1, *t2, Member::Tracked(txn))));
        as_t1 || as_t2 || as_t3
    }

    /// The members `txn` has an antidependency to.
    fn outs(&self, txn: TxnId) -> impl Iterator<Item = Member> + '_ {
        let t = &self.txns[&txn];
        t.outs.iter().map(|w| Member::Tracked(*w)).chain(t.out_forgotten.map(Member::Forgotten))
    }

    /// Whether `t1 -rw-> t2 -rw-> t3` (edges known to exist) is dangerous: all three
    /// committed or committing, T3 (possibly) first, and, T1 read-only, T3 (possibly)
    /// committed before T1's snapshot.
    fn dangerous(&self, t1: TxnId, t2: TxnId, t3: Member) -> bool {
        let (m1, m2) = (&self.txns[&t1], &self.txns[&t2]);
        let s3 = match t3 {
            Member::Tracked(id) => self.txns[&id].state,
            Member::Forgotten(offset) => State::Committed { offset },
        };
        if [m1.state, m2.state, s3].contains(&State::Active) || !may_precede(s3, m2.state) {
            return false;
        }
        if m1.read_only {
            return may_be_before(s3, m1.snapshot);
        }
        t3 == Member::Tracked(t1) || may_precede(s3, m1.state)
    }

    /// Forgets `txn` and everything about it.
    fn remove(&mut self, txn: TxnId) {
        let Some(t) = self.txns.remove(&txn) else {
            return;
        };
        for k in &t.reads {
            unindex(&mut self.readers, k, txn);
        }
        for r in &t.scans {
            unindex(&mut self.scanners, r, txn);
        }
        for k in &t.writes {
            unindex(&mut self.writers, k, txn);
        }
        for r in &t.ins {
            self.txns.get_mut(r).expect("edges join tracked transactions").outs.remove(&txn);
        }
        for w in &t.outs {
            self.txns.get_mut(w).expect("edges join tracked transactions").ins.remove(&txn);
        }
    }
}

/// Whether a transaction in state `a` may commit before one in state `b` (both committed
/// or committing; a committing one commits after everything committed before its check).
fn may_precede(a: State, b: State) -> bool {
    match (a, b) {
        (State::Committed { offset: x }, State::Committed { offset: y }) => x < y,
        (State::Committed { .. }, State::Committing { .. }) => true,
        (State::Committing { floor }, State::Committed { offset }) => offset >= floor,
        (State::Committing { .. }, State::Committing { .. }) => true,
        (State::Active, _) => false,
        (_, State::Active) => true,
    }
}

/// Whether a transaction in state `s` may have committed below `snapshot`.
fn may_be_before(s: State, snapshot: Offset) -> bool {
    match s {
        State::Committed { offset } => offset < snapshot,
        State::Committing { floor } => floor < snapshot,
        State::Active => false,
    }
}

fn unindex<K: Ord>(index: &mut BTreeMap<K, BTreeSet<TxnId>>, k: &K, txn: TxnId) {
    if let Some(set) = index.get_mut(k) {
        set.remove(&txn);
        if set.is_empty() {
            index.remove(k);
        }
    }
}

/// Whether a range holds no key (`to` at or before `from`).
fn empty(r: &Range) -> bool {
    r.to.as_ref().is_some_and(|t| *t <= r.from)
}

#[cfg(test)]
mod tests;
