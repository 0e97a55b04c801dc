//! Tests of the lock table: compatibility of modes, keys against ranges, wound-wait in both
//! directions, which waiters a release grants, upgrades, and a property test against a model
//! of the granted locks (no two conflicting grants, waits only for older transactions, no
//! waiter left blocked by nothing).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

/// Transaction `n`, which began at `n` microseconds: a smaller `n` is older.
fn p(n: u64) -> Priority {
    Priority { begin_us: n, txn: TxnId(n) }
}

fn t(n: u64) -> TxnId {
    TxnId(n)
}

fn key(k: &str) -> Lock {
    Lock::Key(k.as_bytes().to_vec())
}

fn range(from: &str, to: Option<&str>) -> Lock {
    Lock::Range(Range { from: from.as_bytes().to_vec(), to: to.map(|t| t.as_bytes().to_vec()) })
}

fn granted() -> Acquired {
    Acquired { granted: true, wounded: vec![] }
}

fn waits() -> Acquired {
    Acquired { granted: false, wounded: vec![] }
}

fn wounds(txns: &[u64]) -> Acquired {
    Acquired { granted: false, wounded: txns.iter().map(|n| t(*n)).collect() }
}

/// The outcome of `second` asking after `first` holds, older first holder (1) then younger
/// (2 asks after 1) and the reverse (1 asks after 2).
fn check_pair(first: (Lock, Mode), second: (Lock, Mode), conflict: bool) {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(1), first.0.clone(), first.1), granted());
    let expect = if conflict { waits() } else { granted() };
    assert_eq!(table.acquire(p(2), second.0.clone(), second.1), expect, "{first:?} then {second:?}");
    assert_eq!(table.waiting(t(2)), conflict);

    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(2), first.0.clone(), first.1), granted());
    let expect = if conflict { wounds(&[2]) } else { granted() };
    assert_eq!(table.acquire(p(1), second.0.clone(), second.1), expect, "{first:?} then older {second:?}");
}

#[test]
fn modes_conflict_as_readers_and_writers() {
    use Mode::{Exclusive as X, Shared as S};
    check_pair((key("a"), S), (key("a"), S), false);
    check_pair((key("a"), S), (key("a"), X), true);
    check_pair((key("a"), X), (key("a"), S), true);
    check_pair((key("a"), X), (key("a"), X), true);
    check_pair((key("a"), X), (key("b"), X), false);
}

#[test]
fn ranges_conflict_with_exclusive_keys_inside_them_only() {
    use Mode::{Exclusive as X, Shared as S};
    let r = || range("b", Some("d"));
    check_pair((r(), S), (key("b"), X), true);
    check_pair((r(), S), (key("c"), X), true);
    check_pair((r(), S), (key("d"), X), false);
    check_pair((r(), S), (key("a"), X), false);
    check_pair((r(), S), (key("c"), S), false);
    check_pair((key("c"), X), (r(), S), true);
    check_pair((key("d"), X), (r(), S), false);
    check_pair((key("c"), S), (r(), S), false);
    check_pair((r(), S), (range("c", None), S), false);
    check_pair((range("a", None), S), (key("zzz"), X), true);
    // An empty range locks nothing.
    check_pair((key("c"), X), (range("d", Some("b")), S), false);
    // An exclusive range, if ever used, conflicts with what it overlaps.
    check_pair((r(), X), (range("c", None), S), true);
    check_pair((r(), X), (key("e"), S), false);
}

#[test]
fn a_transactions_own_locks_never_conflict() {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(1), range("a", None), Mode::Shared), granted());
    assert_eq!(table.acquire(p(1), key("b"), Mode::Exclusive), granted());
    assert_eq!(table.acquire(p(1), key("b"), Mode::Shared), granted());
    assert_eq!(table.holds(t(1), b"b"), Some(Mode::Exclusive));
    assert_eq!(table.holds(t(1), b"c"), Some(Mode::Shared));
    assert_eq!(table.holds(t(2), b"b"), None);
    assert_eq!(table.txns(), 1);
}

#[test]
fn wound_wait_older_wounds_younger_and_younger_waits() {
    let mut table = LockTable::new();
    // 2 holds a; 1 (older) wounds it and waits until it is released.
    assert_eq!(table.acquire(p(2), key("a"), Mode::Exclusive), granted());
    assert_eq!(table.acquire(p(1), key("a"), Mode::Exclusive), wounds(&[2]));
    assert!(table.waiting(t(1)));
    assert_eq!(table.release_all(t(2)), vec![t(1)]);
    assert_eq!(table.holds(t(1), b"a"), Some(Mode::Exclusive));
    assert!(!table.waiting(t(1)));
    // 3 (younger) waits for 1 without wounding anybody.
    assert_eq!(table.acquire(p(3), key("a"), Mode::Shared), waits());
    assert_eq!(table.release_all(t(1)), vec![t(3)]);
    assert_eq!(table.holds(t(3), b"a"), Some(Mode::Shared));
    assert_eq!(table.release_all(t(3)), vec![]);
    assert_eq!(table.txns(), 0);
}

#[test]
fn wound_wait_wounds_younger_waiters_ahead_too() {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(1), key("a"), Mode::Shared), granted());
    // 5 waits for 1's shared lock; 3 asks for a shared lock, which is compatible with the
    // holder but not with 5's exclusive request ahead of it: 5 is younger, wounded.
    assert_eq!(table.acquire(p(5), key("a"), Mode::Exclusive), waits());
    assert_eq!(table.acquire(p(3), key("a"), Mode::Shared), wounds(&[5]));
    assert_eq!(table.release_all(t(5)), vec![t(3)]);
    // The same with an older waiter ahead: 7 waits behind it.
    assert_eq!(table.acquire(p(4), key("a"), Mode::Exclusive), waits());
    assert_eq!(table.acquire(p(7), key("a"), Mode::Shared), waits());
    assert_eq!(table.release_all(t(1)), vec![]);
    assert_eq!(table.release_all(t(3)), vec![t(4)]);
    assert_eq!(table.release_all(t(4)), vec![t(7)]);
}

#[test]
fn release_grants_compatible_waiters_in_arrival_order_without_starving_a_writer() {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(1), key("a"), Mode::Exclusive), granted());
    assert_eq!(table.acquire(p(2), key("a"), Mode::Shared), waits());
    assert_eq!(table.acquire(p(3), key("a"), Mode::Shared), waits());
    assert_eq!(table.acquire(p(4), key("a"), Mode::Exclusive), waits());
    assert_eq!(table.acquire(p(5), key("a"), Mode::Shared), waits());
    assert_eq!(table.acquire(p(6), key("b"), Mode::Exclusive), granted());
    assert_eq!(table.acquire(p(7), key("b"), Mode::Shared), waits());
    // Both readers go; the writer still waits, and the reader behind it too.
    assert_eq!(table.release_all(t(1)), vec![t(2), t(3)]);
    assert!(table.waiting(t(4)) && table.waiting(t(5)) && table.waiting(t(7)));
    assert_eq!(table.release_all(t(2)), vec![]);
    assert_eq!(table.release_all(t(3)), vec![t(4)]);
    assert_eq!(table.release_all(t(6)), vec![t(7)]);
    assert_eq!(table.release_all(t(4)), vec![t(5)]);
    // Releasing an unknown transaction changes nothing.
    assert_eq!(table.release_all(t(99)), vec![]);
    assert_eq!(table.txns(), 2);
}

#[test]
fn upgrade_shared_to_exclusive() {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(2), key("a"), Mode::Shared), granted());
    assert_eq!(table.acquire(p(2), key("a"), Mode::Exclusive), granted());
    assert_eq!(table.holds(t(2), b"a"), Some(Mode::Exclusive));
    assert_eq!(table.acquire(p(3), key("a"), Mode::Shared), waits());
    assert_eq!(table.release_all(t(2)), vec![t(3)]);
    // 3 and 4 read; 4 (younger) wants to upgrade: it waits for 3, keeping its shared lock.
    assert_eq!(table.acquire(p(4), key("a"), Mode::Shared), granted());
    assert_eq!(table.acquire(p(4), key("a"), Mode::Exclusive), waits());
    assert_eq!(table.holds(t(4), b"a"), Some(Mode::Shared));
    // 3 (older) upgrades too: 4 is in its way twice (holder and waiter), wounded once.
    assert_eq!(table.acquire(p(3), key("a"), Mode::Exclusive), wounds(&[4]));
    assert_eq!(table.release_all(t(4)), vec![t(3)]);
    assert_eq!(table.holds(t(3), b"a"), Some(Mode::Exclusive));
}

#[test]
fn one_wait_at_a_time() {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(1), key("a"), Mode::Exclusive), granted());
    assert_eq!(table.acquire(p(2), key("b"), Mode::Shared), granted());
    assert_eq!(table.acquire(p(2), key("a"), Mode::Shared), waits());
    // While waiting: a held lock is granted again, anything else is not queued.
    assert_eq!(table.acquire(p(2), key("b"), Mode::Shared), granted());
    assert_eq!(table.acquire(p(2), key("c"), Mode::Shared), waits());
    assert_eq!(table.holds(t(2), b"c"), None);
    assert_eq!(table.release_all(t(1)), vec![t(2)]);
    assert_eq!(table.acquire(p(2), key("c"), Mode::Shared), granted());
}

#[test]
fn a_transaction_keeps_its_first_priority() {
    let mut table = LockTable::new();
    assert_eq!(table.acquire(p(1), key("a"), Mode::Exclusive), granted());
    assert_eq!(table.acquire(p(5), key("b"), Mode::Exclusive), granted());
    // 5 claims to be older now: it is still 5, and waits for 1 without wounding it.
    let claim = Priority { begin_us: 0, txn: t(5) };
    assert_eq!(table.acquire(claim, key("a"), Mode::Exclusive), waits());
}

// ---- property test ----

#[derive(Clone, Debug)]
enum Op {
    Acquire(usize, Lock, Mode),
    Release(usize),
}

const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];

fn lock() -> impl Strategy<Value = Lock> {
    let k = (0..KEYS.len()).prop_map(|i| key(KEYS[i]));
    let r = (0..KEYS.len(), 0..=KEYS.len()).prop_map(|(f, t)| range(KEYS[f], KEYS.get(t).copied()));
    prop_oneof![3 => k, 1 => r]
}

fn op(txns: usize) -> impl Strategy<Value = Op> {
    let mode = prop_oneof![Just(Mode::Shared), Just(Mode::Exclusive)];
    prop_oneof![
        6 => (0..txns, lock(), mode).prop_map(|(t, l, m)| Op::Acquire(t, l, m)),
        1 => (0..txns).prop_map(Op::Release),
    ]
}

/// What the model says each transaction holds: the locks it was told it got.
type Model = BTreeMap<TxnId, BTreeMap<Lock, Mode>>;

struct Run {
    table: LockTable,
    priorities: Vec<Priority>,
    model: Model,
    /// The request each waiting transaction waits for.
    waits: BTreeMap<TxnId, (Lock, Mode)>,
}

impl Run {
    fn priority(&self, txn: TxnId) -> Priority {
        *self.priorities.iter().find(|p| p.txn == txn).expect("a known transaction")
    }

    fn took(&mut self, txn: TxnId, lock: Lock, mode: Mode) {
        let held = self.model.entry(txn).or_default().entry(lock).or_insert(mode);
        *held = (*held).max(mode);
    }

    fn release(&mut self, txn: TxnId) {
        self.model.remove(&txn);
        self.waits.remove(&txn);
        for g in self.table.release_all(txn) {
            let (lock, mode) = self.waits.remove(&g).expect("a granted transaction waited");
            self.took(g, lock, mode);
        }
    }

    fn acquire(&mut self, who: Priority, lock: Lock, mode: Mode) -> Result<(), TestCaseError> {
        let was_waiting = self.waits.contains_key(&who.txn);
        let got = self.table.acquire(who, lock.clone(), mode);
        for w in &got.wounded {
            prop_assert!(self.priority(*w) > who, "{:?} wounded older {}", who, w);
        }
        if got.granted {
            self.took(who.txn, lock, mode);
        } else if !was_waiting {
            self.waits.insert(who.txn, (lock, mode));
        }
        // The caller aborts every wounded transaction.
        for w in got.wounded {
            self.release(w);
        }
        Ok(())
    }

    /// The table agrees with the model, holds no two conflicting locks, and every waiter is
    /// blocked, by older transactions only.
    fn check(&self) -> Result<(), TestCaseError> {
        let mut grants = Vec::new();
        for (k, holders) in &self.table.keys {
            grants.extend(holders.iter().map(|(t, m)| (*t, Lock::Key(k.clone()), *m)));
        }
        for (r, holders) in &self.table.ranges {
            grants.extend(holders.iter().map(|(t, m)| (*t, Lock::Range(r.clone()), *m)));
        }
        let mut seen: Model = BTreeMap::new();
        for (t, l, m) in &grants {
            seen.entry(*t).or_default().insert(l.clone(), *m);
        }
        let modelled: Model = self
            .model
            .iter()
            .map(|(t, ls)| (*t, ls.iter().filter(|(l, _)| !l.is_empty()).map(|(l, m)| (l.clone(), *m)).collect()))
            .filter(|(_, ls): &(TxnId, BTreeMap<Lock, Mode>)| !ls.is_empty())
            .collect();
        prop_assert_eq!(&seen, &modelled);
        for (i, (ta, la, ma)) in grants.iter().enumerate() {
            for (tb, lb, mb) in &grants[i + 1..] {
                let conflict = ta != tb && la.overlaps(lb) && ma.conflicts(*mb);
                prop_assert!(!conflict, "{} {:?} {:?} and {} {:?} {:?} both held", ta, la, ma, tb, lb, mb);
            }
        }
        let waiting: BTreeSet<TxnId> = self.table.queue.values().map(|w| w.txn).collect();
        prop_assert_eq!(&waiting, &self.waits.keys().copied().collect::<BTreeSet<_>>());
        for (arrival, w) in &self.table.queue {
            prop_assert!(self.table.waiting(w.txn));
            let mut blockers = self.table.holders_against(w.txn, &w.what, w.mode);
            blockers.extend(self.table.waiters_against(w.txn, &w.what, w.mode, *arrival));
            prop_assert!(!blockers.is_empty(), "{} waits for nothing", w.txn);
            for b in blockers {
                prop_assert!(self.priority(b) < self.priority(w.txn), "{} waits for younger {}", w.txn, b);
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn prop_no_conflicting_grants_and_waits_only_for_older(
        begins in proptest::collection::vec(0u64..4, 6),
        ops in proptest::collection::vec(op(6), 0..80),
    ) {
        let priorities: Vec<Priority> =
            begins.iter().enumerate().map(|(i, b)| Priority { begin_us: *b, txn: TxnId(i as u64) }).collect();
        let mut run = Run { table: LockTable::new(), priorities, model: BTreeMap::new(), waits: BTreeMap::new() };
        for op in ops {
            match op {
                Op::Acquire(i, lock, mode) => {
                    let who = run.priorities[i];
                    run.acquire(who, lock, mode)?;
                }
                Op::Release(i) => {
                    let txn = run.priorities[i].txn;
                    run.release(txn);
                }
            }
            run.check()?;
        }
        // Ending the holders one by one, oldest first, lets every waiter through.
        let order: Vec<TxnId> = {
            let mut p = run.priorities.clone();
            p.sort();
            p.into_iter().map(|p| p.txn).collect()
        };
        for txn in order {
            run.release(txn);
            run.check()?;
        }
        prop_assert_eq!(run.table.txns(), 0);
        prop_assert!(run.table.queue.is_empty());
    }
}
