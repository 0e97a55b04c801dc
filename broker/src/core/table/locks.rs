//! The lock table of strict two-phase locking on one table partition's leader, with
//! wound-wait against deadlocks.
//!
//! Lockable things ([`Lock`]) are keys and half-open key ranges. A range lock is a scan's
//! predicate lock against phantoms: it is normally taken [`Mode::Shared`], and then conflicts
//! with exclusive locks on the keys inside it (an exclusive range lock, if ever asked for,
//! conflicts with every lock it overlaps). Two locks conflict when they overlap and at least
//! one is exclusive; the locks of one transaction never conflict with each other, so a
//! transaction holding a key shared may upgrade it to exclusive when no other holder
//! conflicts.
//!
//! Call protocol (one table per partition leader, driven by `core::table::leader`):
//! 1. [`LockTable::acquire`] for a transaction's lock. `granted`: it holds the lock. Else it
//!    waits (it has at most one outstanding wait; see `acquire` for a request made while one
//!    is outstanding). Either way, every transaction in `wounded` must be aborted by the
//!    caller, which ends it here with [`LockTable::release_all`].
//! 2. [`LockTable::release_all`] when a transaction ends (commit, abort, wound, timeout): its
//!    locks and its wait go; the transactions returned now hold the lock they waited for and
//!    should be resumed (they re-ask their locks: held ones are granted at once).
//!
//! Wound-wait: priorities ([`Priority`]) order transactions, the smaller (older) wins. A
//! request that conflicts with a younger holder, or with a younger transaction waiting ahead
//! of it, wounds that transaction; one that conflicts with an older one waits. Hence a
//! waiter only ever waits for older transactions (once the wounded are released): the
//! waits-for graph goes from young to old and has no cycle, so there is no deadlock.
//! A transaction keeps the priority it first came with.
//!
//! Waiters are granted in arrival order (one queue per table): a waiter is granted when it
//! conflicts neither with a holder nor with an earlier waiter still waiting, so a waiting
//! writer is not starved by later compatible readers.
//!
//! Deterministic: ordered maps only, no clock. It does not time transactions out, does not
//! know about commits (strictness is the caller's: it releases at the end of the
//! transaction), and does not abort the wounded itself (the caller may, for instance, let a
//! wounded transaction already committing finish: the wounder then simply waits).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::{Key, Priority, Range, TxnId};

/// How a lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Readers: compatible with other shared locks.
    Shared,
    /// A writer: conflicts with every other lock it overlaps.
    Exclusive,
}

impl Mode {
    /// Whether a lock held in `self` also grants `wanted`.
    fn covers(self, wanted: Mode) -> bool {
        self == Mode::Exclusive || wanted == Mode::Shared
    }

    /// Whether two overlapping locks of different transactions in these modes conflict.
    fn conflicts(self, other: Mode) -> bool {
        self == Mode::Exclusive || other == Mode::Exclusive
    }
}

/// A lockable thing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lock {
    /// One key.
    Key(Key),
    /// Every key of a range, present or not (a predicate lock).
    Range(Range),
}

impl Lock {
    /// Whether the two lock a common key.
    pub fn overlaps(&self, other: &Lock) -> bool {
        match (self, other) {
            (Lock::Key(a), Lock::Key(b)) => a == b,
            (Lock::Key(k), Lock::Range(r)) | (Lock::Range(r), Lock::Key(k)) => r.contains(k),
            (Lock::Range(a), Lock::Range(b)) => !empty(a) && !empty(b) && a.overlaps(b),
        }
    }

    /// Whether it locks no key at all (an empty range).
    fn is_empty(&self) -> bool {
        matches!(self, Lock::Range(r) if empty(r))
    }
}

/// What [`LockTable::acquire`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acquired {
    /// The lock is held now (else: the transaction waits for it).
    pub granted: bool,
    /// Younger transactions in the way, in id order: the caller must abort each (and call
    /// [`LockTable::release_all`] for it).
    pub wounded: Vec<TxnId>,
}

/// The locks held and waited for on one partition. See the module documentation for the
/// call protocol.
#[derive(Debug, Default)]
pub struct LockTable {
    /// Key locks: for each key, its holders.
    keys: BTreeMap<Key, BTreeMap<TxnId, Mode>>,
    /// Range locks: for each (non-empty) range, its holders.
    ranges: BTreeMap<Range, BTreeMap<TxnId, Mode>>,
    /// Every transaction holding or waiting for a lock.
    txns: BTreeMap<TxnId, Holder>,
    /// The waits, by arrival.
    queue: BTreeMap<u64, Request>,
    /// The arrival number of the next wait.
    arrival_next: u64,
}

/// A transaction known to the table.
#[derive(Debug)]
struct Holder {
    /// Its wound-wait priority, as first seen.
    priority: Priority,
    /// The locks it holds (their modes are in the table's maps).
    held: BTreeSet<Lock>,
    /// Its outstanding wait: its arrival number in the queue.
    wait: Option<u64>,
}

/// A waiting request.
#[derive(Clone, Debug)]
struct Request {
    txn: TxnId,
    what: Lock,
    mode: Mode,
}

impl LockTable {
    /// An empty table.
    pub fn new() -> LockTable {
        LockTable::default()
    }

    /// Asks for `what` in `mode` for `who`.
    ///
    /// Granted at once when no other transaction holds a conflicting lock and none waiting
    /// asks for one (an earlier waiter has precedence); a lock already held in a mode that
    /// covers `mode` is granted again, as is an empty range. Otherwise `who` waits, and
    /// every younger transaction in its way (holder or earlier waiter) is wounded: once the
    /// caller released those, `who` waits for older transactions only, and it is returned by
    /// the [`LockTable::release_all`] that grants it the lock.
    ///
    /// A transaction has at most one outstanding wait: a request made while `who` waits
    /// is granted only if already covered, else answered `granted: false` without being
    /// queued (the transaction is resumed when its outstanding wait is granted, and asks
    /// again then).
    pub fn acquire(&mut self, who: Priority, what: Lock, mode: Mode) -> Acquired {
        let txn = who.txn;
        if what.is_empty() || self.held_mode(txn, &what).is_some_and(|m| m.covers(mode)) {
            return Acquired { granted: true, wounded: Vec::new() };
        }
        if self.waiting(txn) {
            return Acquired { granted: false, wounded: Vec::new() };
        }
        let priority = self.txns.get(&txn).map_or(who, |h| h.priority);
        let mut blockers = self.holders_against(txn, &what, mode);
        blockers.extend(self.waiters_against(txn, &what, mode, u64::MAX));
        if blockers.is_empty() {
            self.grant(priority, what, mode);
            return Acquired { granted: true, wounded: Vec::new() };
        }
        let wounded = blockers.into_iter().filter(|b| self.priority(*b) > priority).collect();
        let arrival = self.arrival_next;
        self.arrival_next += 1;
        self.queue.insert(arrival, Request { txn, what, mode });
        self.txns.entry(txn).or_insert_with(|| Holder { priority, held: BTreeSet::new(), wait: None }).wait =
            Some(arrival);
        Acquired { granted: false, wounded }
    }

    /// Ends `txn` here: drops its locks and its wait. Returns the waiters granted as a
    /// consequence (in arrival order): they hold the lock they waited for now.
    pub fn release_all(&mut self, txn: TxnId) -> Vec<TxnId> {
        let Some(holder) = self.txns.remove(&txn) else {
            return Vec::new();
        };
        for lock in &holder.held {
            let holders = match lock {
                Lock::Key(k) => self.keys.get_mut(k),
                Lock::Range(r) => self.ranges.get_mut(r),
            };
            let holders = holders.expect("a held lock is in the table");
            assert!(holders.remove(&txn).is_some(), "{txn} holds {lock:?}");
            if holders.is_empty() {
                match lock {
                    Lock::Key(k) => self.keys.remove(k),
                    Lock::Range(r) => self.ranges.remove(r),
                };
            }
        }
        if let Some(arrival) = holder.wait {
            assert!(self.queue.remove(&arrival).is_some(), "{txn}'s wait is queued");
        }
        self.grant_waiters()
    }

    /// Whether `txn` waits for a lock.
    pub fn waiting(&self, txn: TxnId) -> bool {
        self.txns.get(&txn).is_some_and(|h| h.wait.is_some())
    }

    /// The strongest mode in which `txn` holds `key`: by its key lock, or by a range lock
    /// containing it.
    pub fn holds(&self, txn: TxnId, key: &[u8]) -> Option<Mode> {
        let by_key = self.keys.get(key).and_then(|h| h.get(&txn)).copied();
        let by_range = self.ranges.iter().filter(|(r, _)| r.contains(key)).filter_map(|(_, h)| h.get(&txn)).max();
        by_key.max(by_range.copied())
    }

    /// How many transactions hold or wait for a lock.
    pub fn txns(&self) -> usize {
        self.txns.len()
    }

    /// The mode in which `txn` holds exactly `what`.
    fn held_mode(&self, txn: TxnId, what: &Lock) -> Option<Mode> {
        let holders = match what {
            Lock::Key(k) => self.keys.get(k),
            Lock::Range(r) => self.ranges.get(r),
        };
        holders.and_then(|h| h.get(&txn)).copied()
    }

    fn priority(&self, txn: TxnId) -> Priority {
        self.txns.get(&txn).expect("a holder or waiter is known").priority
    }

    /// The other transactions holding a lock that conflicts with `what` in `mode`.
    fn holders_against(&self, txn: TxnId, what: &Lock, mode: Mode) -> BTreeSet<TxnId> {
        let mut found = BTreeSet::new();
        let mut add = |holders: &BTreeMap<TxnId, Mode>| {
            found.extend(holders.iter().filter(|(t, m)| **t != txn && m.conflicts(mode)).map(|(t, _)| *t));
        };
        match what {
            Lock::Key(k) => {
                self.keys.get(k).into_iter().for_each(&mut add);
                self.ranges.iter().filter(|(r, _)| r.contains(k)).for_each(|(_, h)| add(h));
            }
            Lock::Range(r) => {
                if !empty(r) {
                    let to = r.to.as_ref().map_or(Bound::Unbounded, |t| Bound::Excluded(t.as_slice()));
                    let keys = self.keys.range::<[u8], _>((Bound::Included(r.from.as_slice()), to));
                    keys.for_each(|(_, h)| add(h));
                }
                self.ranges.iter().filter(|(q, _)| !empty(q) && !empty(r) && q.overlaps(r)).for_each(|(_, h)| add(h));
            }
        }
        found
    }

    /// The other transactions waiting (arrived before `before`) for a lock that conflicts
    /// with `what` in `mode`.
    fn waiters_against(&self, txn: TxnId, what: &Lock, mode: Mode, before: u64) -> BTreeSet<TxnId> {
        self.queue
            .range(..before)
            .filter(|(_, w)| w.txn != txn && w.mode.conflicts(mode) && w.what.overlaps(what))
            .map(|(_, w)| w.txn)
            .collect()
    }

    /// Records that the transaction of `priority` holds `what` in `mode` (an upgrade
    /// replaces a shared lock).
    fn grant(&mut self, priority: Priority, what: Lock, mode: Mode) {
        let txn = priority.txn;
        let holders = match &what {
            Lock::Key(k) => self.keys.entry(k.clone()).or_default(),
            Lock::Range(r) => self.ranges.entry(r.clone()).or_default(),
        };
        let before = holders.insert(txn, mode);
        assert!(before.is_none_or(|b| !b.covers(mode)), "{txn} granted {what:?} it held already");
        let holder = self.txns.entry(txn).or_insert_with(|| Holder { priority, held: BTreeSet::new(), wait: None });
        holder.held.insert(what);
    }

    /// Grants, in arrival order, every waiter that conflicts neither with a holder nor with
    /// an earlier waiter still waiting. One pass suffices: a grant only adds holders, so it
    /// never unblocks an earlier waiter.
    fn grant_waiters(&mut self) -> Vec<TxnId> {
        let mut granted = Vec::new();
        let arrivals: Vec<u64> = self.queue.keys().copied().collect();
        for arrival in arrivals {
            let w = self.queue[&arrival].clone();
            let blocked = !self.holders_against(w.txn, &w.what, w.mode).is_empty()
                || !self.waiters_against(w.txn, &w.what, w.mode, arrival).is_empty();
            if blocked {
                continue;
            }
            self.queue.remove(&arrival);
            let priority = self.priority(w.txn);
            self.txns.get_mut(&w.txn).expect("a waiter is known").wait = None;
            self.grant(priority, w.what, w.mode);
            granted.push(w.txn);
        }
        granted
    }
}

/// Whether a range holds no key (`to` at or before `from`).
fn empty(r: &Range) -> bool {
    r.to.as_ref().is_some_and(|t| *t <= r.from)
}

#[cfg(test)]
mod tests;
