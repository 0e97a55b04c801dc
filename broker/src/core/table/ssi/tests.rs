//! Tests of the SSI tracker: the anomalies snapshot isolation lets through (write skew on
//! items and on predicates, the read-only anomaly) are refused, by aborting the transaction
//! being checked; what is serializable and cheap to see as such (disjoint writers, lone
//! readers, a read-only transaction that saw nothing late) commits; memory stays bounded
//! without losing a dangerous structure; and a property test: over random histories on a
//! model multi-version store with first-committer-wins, the committed transactions'
//! dependency graph never has a cycle.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn t(n: u64) -> TxnId {
    TxnId(n)
}

fn k(s: &str) -> Key {
    s.as_bytes().to_vec()
}

fn range(from: &str, to: Option<&str>) -> Range {
    Range { from: k(from), to: to.map(k) }
}

/// A tracker and a log end: transactions begin at the log end; a writer commits at it.
struct H {
    s: SsiTracker,
    end: u64,
}

impl H {
    fn new() -> H {
        H { s: SsiTracker::new(), end: 10 }
    }

    fn begin(&mut self, txn: u64) {
        self.s.begin(t(txn), Offset(self.end));
    }

    fn read(&mut self, txn: u64, keys: &[&str]) {
        for key in keys {
            self.s.read(t(txn), key.as_bytes());
        }
    }

    /// The commit check; if it passes, an offset (the log end), not yet reported.
    fn check(&mut self, txn: u64, writes: &[&str]) -> Result<Offset, AbortReason> {
        let writes: Vec<Key> = writes.iter().map(|w| k(w)).collect();
        self.s.check_commit(t(txn), &writes)?;
        let offset = Offset(self.end);
        if !writes.is_empty() {
            self.end += 1;
        }
        Ok(offset)
    }

    /// The commit check, then the commit at once.
    fn commit(&mut self, txn: u64, writes: &[&str]) -> Result<(), AbortReason> {
        let offset = self.check(txn, writes)?;
        self.s.committed(t(txn), offset);
        Ok(())
    }
}

#[test]
fn write_skew_on_items_aborts_the_second() {
    // G2-item: T1 r(x,y) w(x); T2 r(x,y) w(y).
    let mut h = H::new();
    h.begin(1);
    h.begin(2);
    h.read(1, &["x", "y"]);
    h.read(2, &["x", "y"]);
    assert_eq!(h.commit(1, &["x"]), Ok(()));
    assert_eq!(h.commit(2, &["y"]), Err(AbortReason::Dangerous));
    // The loser is forgotten; the winner stays as long as it may matter.
    h.s.abort(t(2));
    h.s.abort(t(1));
    assert_eq!(h.s.tracked(), 1);

    // The same while the first is still committing (its offset not reported yet).
    let mut h = H::new();
    h.begin(1);
    h.begin(2);
    h.read(1, &["x", "y"]);
    h.read(2, &["x", "y"]);
    let first = h.check(1, &["x"]).expect("nothing against it yet");
    assert_eq!(h.check(2, &["y"]), Err(AbortReason::Dangerous));
    h.s.committed(t(1), first);
}

#[test]
fn write_skew_on_predicates_aborts_the_second() {
    // G2: both scan [a, m) and find nothing, then each inserts a row there.
    let mut h = H::new();
    h.begin(1);
    h.begin(2);
    h.s.scan(t(1), &range("a", Some("m")));
    h.s.scan(t(2), &range("a", Some("m")));
    assert_eq!(h.commit(1, &["c"]), Ok(()));
    assert_eq!(h.commit(2, &["d"]), Err(AbortReason::Dangerous));

    // Inserts outside the scanned ranges are no conflict.
    let mut h = H::new();
    h.begin(1);
    h.begin(2);
    h.s.scan(t(1), &range("a", Some("m")));
    h.s.scan(t(2), &range("a", Some("m")));
    assert_eq!(h.commit(1, &["m"]), Ok(()));
    assert_eq!(h.commit(2, &["z"]), Ok(()));
}

#[test]
fn a_scan_after_a_concurrent_insert_sees_the_antidependency() {
    // T2 inserts c and commits; T1 (older snapshot) then scans over c and writes what T2
    // scanned: T1 -rw-> T2 -rw-> T1, the second one aborts.
    let mut h = H::new();
    h.begin(1);
    h.begin(2);
    h.s.scan(t(2), &range("p", None));
    assert_eq!(h.commit(2, &["c"]), Ok(()));
    h.s.scan(t(1), &range("a", Some("m")));
    assert_eq!(h.commit(1, &["q"]), Err(AbortReason::Dangerous));
}

#[test]
fn the_read_only_anomaly_aborts_the_writer_not_the_reader() {
    // G2-two-edges: T1 r(x,y); T2 r(y) w(y) c; T3 r(x,y) c (sees T2, not T1); T1 w(x) c.
    let mut h = H::new();
    h.begin(1);
    h.read(1, &["x", "y"]);
    h.begin(2);
    h.read(2, &["y"]);
    assert_eq!(h.commit(2, &["y"]), Ok(()));
    h.begin(3);
    h.read(3, &["x", "y"]);
    assert_eq!(h.commit(3, &[]), Ok(()));
    assert_eq!(h.commit(1, &["x"]), Err(AbortReason::Dangerous));
}

#[test]
fn a_read_only_transaction_that_did_not_see_t3_completes_nothing() {
    // As above, but T3 began before T2 committed: it saw neither, the order T3, T1, T2
    // explains everything, and T1 commits (without the read-only rule it would abort).
    let mut h = H::new();
    h.begin(1);
    h.read(1, &["x", "y"]);
    h.begin(2);
    h.begin(3);
    h.read(2, &["y"]);
    assert_eq!(h.commit(2, &["y"]), Ok(()));
    h.read(3, &["x", "y"]);
    assert_eq!(h.commit(3, &[]), Ok(()));
    assert_eq!(h.commit(1, &["x"]), Ok(()));
}

#[test]
fn a_committed_pivot_makes_the_last_committer_abort() {
    // T1 r(x) w(y); T2 r(z) w(x); T3 r(y) w(z): a cycle T1 -> T2 -> T3 -> T1. T3 and then
    // T2 commit (T1, still active, is left to decide); T1 completes the structure.
    let mut h = H::new();
    for n in 1..=3 {
        h.begin(n);
    }
    h.read(1, &["x"]);
    h.read(2, &["z"]);
    h.read(3, &["y"]);
    assert_eq!(h.commit(3, &["z"]), Ok(()));
    assert_eq!(h.commit(2, &["x"]), Ok(()));
    assert_eq!(h.commit(1, &["y"]), Err(AbortReason::Dangerous));
    // T1 read-only instead: T3 committed after T1's snapshot, so nothing is dangerous.
    let mut h = H::new();
    for n in 1..=3 {
        h.begin(n);
    }
    h.read(1, &["x"]);
    h.read(2, &["z"]);
    assert_eq!(h.commit(3, &["z"]), Ok(()));
    assert_eq!(h.commit(2, &["x"]), Ok(()));
    assert_eq!(h.commit(1, &[]), Ok(()));
}

#[test]
fn a_structure_completed_by_t3_is_refused_when_the_others_committed_first() {
    // T1 r(x) w(a); T2 r(y) w(x); T3 w(y): T1 -> T2 -> T3. T2 and T1 are committing when T3
    // is checked: their offsets are not known, T3 may commit first, so T3 aborts.
    let mut h = H::new();
    for n in 1..=3 {
        h.begin(n);
    }
    h.read(1, &["x"]);
    h.read(2, &["y"]);
    let o2 = h.check(2, &["x"]).expect("T1 is active");
    let o1 = h.check(1, &["a"]).expect("T3 is active");
    assert_eq!(h.check(3, &["y"]), Err(AbortReason::Dangerous));
    h.s.committed(t(2), o2);
    h.s.committed(t(1), o1);
    // Once T1 and T2 have committed, T3 commits after both: not first, no danger.
    h.begin(4);
    h.begin(5);
    h.begin(6);
    h.read(4, &["x2"]);
    h.read(5, &["y2"]);
    assert_eq!(h.commit(5, &["x2"]), Ok(()));
    assert_eq!(h.commit(4, &["a2"]), Ok(()));
    assert_eq!(h.commit(6, &["y2"]), Ok(()));
}

#[test]
fn lost_update_is_refused_too() {
    // P4 is first-committer-wins' job (the store), but both committing is never accepted.
    let mut h = H::new();
    h.begin(1);
    h.begin(2);
    h.read(1, &["x"]);
    h.read(2, &["x"]);
    assert_eq!(h.commit(1, &["x"]), Ok(()));
    assert_eq!(h.commit(2, &["x"]), Err(AbortReason::Dangerous));
}

#[test]
fn writers_of_disjoint_keys_never_abort() {
    let mut h = H::new();
    for n in 0..50u64 {
        h.begin(n);
    }
    for n in 0..50u64 {
        let mine = format!("k{n}");
        h.read(n, &[&mine]);
        h.s.scan(t(n), &range(&format!("{mine}/"), Some(&format!("{mine}0"))));
    }
    for n in (0..50u64).rev() {
        assert_eq!(h.commit(n, &[&format!("k{n}")]), Ok(()), "t{n}");
    }
}

#[test]
fn read_only_transactions_alone_never_abort() {
    let mut h = H::new();
    h.begin(1);
    h.read(1, &["x", "y"]);
    h.s.scan(t(1), &range("a", None));
    assert_eq!(h.commit(1, &[]), Ok(()));
    // Among writers that do not depend on each other: it only has antidependencies out.
    h.begin(2);
    h.read(2, &["x", "y", "z"]);
    for n in 3..10u64 {
        h.begin(n);
        assert_eq!(h.commit(n, &[["x", "y", "z"][n as usize % 3]]), Ok(()));
    }
    h.read(2, &["x"]);
    assert_eq!(h.commit(2, &[]), Ok(()));
}

#[test]
fn gc_bounds_memory_and_keeps_what_matters() {
    let mut h = H::new();
    for n in 0..2000u64 {
        h.begin(n);
        h.read(n, &["x", "y"]);
        if n >= 1 {
            h.read(n - 1, &["z"]);
            let _ = h.commit(n - 1, &[["x", "y", "z"][n as usize % 3]]);
            h.s.abort(t(n - 1));
        }
        h.s.gc();
        assert!(h.s.tracked() <= 3, "{} tracked after {n}", h.s.tracked());
    }
    assert!(h.s.readers.len() <= 3 && h.s.writers.len() <= 3);

    // T2 -> T3 with T3 forgotten (every active transaction saw it), then T1 -> T2: T1 still
    // completes T1 -> T2 -> T3 through the summary T2 keeps.
    for read_only in [false, true] {
        let mut h = H::new();
        h.begin(2);
        h.begin(3);
        h.read(2, &["z"]);
        assert_eq!(h.commit(3, &["z"]), Ok(()));
        h.begin(1);
        h.read(1, &["x"]);
        assert_eq!(h.commit(2, &["x"]), Ok(()));
        h.s.gc();
        assert!(!h.s.txns.contains_key(&t(3)), "T3 committed below every snapshot");
        let writes: &[&str] = if read_only { &[] } else { &["w"] };
        assert_eq!(h.commit(1, writes), Err(AbortReason::Dangerous), "read-only {read_only}");
    }
}

#[test]
fn a_transaction_beginning_below_a_forgotten_one_is_refused() {
    let mut h = H::new();
    h.begin(1);
    assert_eq!(h.commit(1, &["x"]), Ok(()));
    h.s.gc();
    assert_eq!(h.s.tracked(), 0);
    h.s.begin(t(2), Offset(5));
    h.read(2, &["x"]);
    assert_eq!(h.commit(2, &["y"]), Err(AbortReason::Dangerous));
    h.begin(3);
    h.read(3, &["x"]);
    assert_eq!(h.commit(3, &["y"]), Ok(()));
}

#[test]
fn protocol_edges() {
    let mut h = H::new();
    // Unknown: its reads were not tracked here.
    assert_eq!(h.s.check_commit(t(9), &[k("x")]), Err(AbortReason::LeaderChanged));
    // Reads of an unknown transaction are ignored.
    h.read(9, &["x"]);
    assert_eq!(h.s.tracked(), 0);
    // The first begin wins.
    h.s.begin(t(1), Offset(3));
    h.s.begin(t(1), Offset(30));
    assert_eq!(h.s.txns[&t(1)].snapshot, Offset(3));
    // A second check of a committing transaction changes nothing.
    assert_eq!(h.s.check_commit(t(1), &[k("x")]), Ok(()));
    assert_eq!(h.s.check_commit(t(1), &[k("y")]), Ok(()));
    assert_eq!(h.s.txns[&t(1)].writes, vec![k("x")]);
    h.s.committed(t(1), Offset(10));
    h.s.committed(t(1), Offset(11));
    assert_eq!(h.s.txns[&t(1)].state, State::Committed { offset: Offset(10) });
    // A committed transaction is not aborted; an empty range locks nothing.
    h.s.abort(t(1));
    assert_eq!(h.s.tracked(), 1);
    h.begin(2);
    h.s.scan(t(2), &range("b", Some("a")));
    assert!(h.s.scanners.is_empty());
    h.s.abort(t(2));
    h.s.gc();
    assert_eq!(h.s.tracked(), 0);
}

// ---- property test: committed histories are serializable ----

const KEYS: [&str; 4] = ["a", "b", "c", "d"];
const SLOTS: usize = 4;

#[derive(Clone, Debug)]
enum Op {
    /// Begin in the slot, at the log end minus a lag.
    Begin(usize, u64),
    Read(usize, usize),
    Scan(usize, usize, usize),
    Write(usize, usize),
    /// Check, validate (first committer wins) and append; a read-only one commits at once.
    Commit(usize),
    /// Report the appended commit's offset.
    Finish(usize),
    Abort(usize),
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..SLOTS;
    let key = 0..KEYS.len();
    prop_oneof![
        3 => (s.clone(), prop_oneof![4 => Just(0u64), 1 => 1u64..3]).prop_map(|(s, l)| Op::Begin(s, l)),
        6 => (s.clone(), key.clone()).prop_map(|(s, k)| Op::Read(s, k)),
        1 => (s.clone(), key.clone(), 0..=KEYS.len()).prop_map(|(s, f, t)| Op::Scan(s, f, t)),
        4 => (s.clone(), key).prop_map(|(s, k)| Op::Write(s, k)),
        3 => s.clone().prop_map(Op::Commit),
        2 => s.clone().prop_map(Op::Finish),
        1 => s.prop_map(Op::Abort),
        1 => Just(Op::Gc),
    ]
}

#[derive(Debug)]
struct Live {
    id: TxnId,
    snapshot: u64,
    /// Key index and the offset of the version seen (None: absent).
    reads: Vec<(usize, Option<u64>)>,
    writes: BTreeSet<usize>,
    /// Appended at this offset, its commit not yet reported.
    appended: Option<u64>,
}

#[derive(Debug)]
struct Committed {
    reads: Vec<(usize, Option<u64>)>,
}

#[derive(Default)]
struct Model {
    s: SsiTracker,
    end: u64,
    next_id: u64,
    slots: [Option<Live>; SLOTS],
    /// Per key, the versions: (offset, writer).
    versions: [Vec<(u64, TxnId)>; 4],
    committed: BTreeMap<TxnId, Committed>,
}

impl Model {
    fn step(&mut self, op: Op) {
        match op {
            Op::Begin(s, lag) if self.slots[s].is_none() => {
                let id = TxnId(self.next_id);
                self.next_id += 1;
                let snapshot = self.end.saturating_sub(lag);
                self.s.begin(id, Offset(snapshot));
                self.slots[s] = Some(Live { id, snapshot, reads: Vec::new(), writes: BTreeSet::new(), appended: None });
            }
            Op::Read(s, key) => self.read(s, key, None),
            Op::Scan(s, from, to) => self.read(s, from, Some(to)),
            Op::Write(s, key) => {
                if let Some(l) = self.slots[s].as_mut().filter(|l| l.appended.is_none()) {
                    l.writes.insert(key);
                }
            }
            Op::Commit(s) => self.commit(s),
            Op::Finish(s) => {
                if let Some(offset) = self.slots[s].as_ref().and_then(|l| l.appended) {
                    let l = self.slots[s].take().expect("appended");
                    self.s.committed(l.id, Offset(offset));
                }
            }
            Op::Abort(s) => {
                if let Some(l) = self.slots[s].take_if(|l| l.appended.is_none()) {
                    self.s.abort(l.id);
                }
            }
            Op::Gc => self.s.gc(),
            Op::Begin(..) => {}
        }
    }

    /// Reads key `from` (or, with `to`, scans `[from, to)`) at the slot's snapshot.
    fn read(&mut self, s: usize, from: usize, to: Option<usize>) {
        let Some(l) = self.slots[s].as_mut().filter(|l| l.appended.is_none()) else {
            return;
        };
        let keys = match to {
            None => from..from + 1,
            Some(to) => from..to.max(from),
        };
        for key in keys {
            let seen = self.versions[key].iter().filter(|(o, _)| *o < l.snapshot).map(|(o, _)| *o).max();
            l.reads.push((key, seen));
        }
        match to {
            None => self.s.read(l.id, KEYS[from].as_bytes()),
            Some(to) => self.s.scan(l.id, &range(KEYS[from], KEYS.get(to).copied())),
        }
    }

    fn commit(&mut self, s: usize) {
        let Some(l) = self.slots[s].take_if(|l| l.appended.is_none()) else {
            return;
        };
        let writes: Vec<Key> = l.writes.iter().map(|w| k(KEYS[*w])).collect();
        if self.s.check_commit(l.id, &writes).is_err() {
            self.s.abort(l.id);
            return;
        }
        // First committer wins: a version at or after the snapshot of a written key.
        if l.writes.iter().any(|w| self.versions[*w].iter().any(|(o, _)| *o >= l.snapshot)) {
            self.s.abort(l.id);
            return;
        }
        if l.writes.is_empty() {
            self.s.committed(l.id, Offset(self.end));
            self.committed.insert(l.id, Committed { reads: l.reads });
            return;
        }
        let offset = self.end;
        self.end += 1;
        for w in &l.writes {
            self.versions[*w].push((offset, l.id));
        }
        self.committed.insert(l.id, Committed { reads: l.reads.clone() });
        self.slots[s] = Some(Live { appended: Some(offset), ..l });
    }

    /// The committed transactions' dependency graph (ww, wr, rw) has no cycle.
    fn serializable(&self) -> Result<(), String> {
        let mut edges: BTreeMap<TxnId, BTreeSet<TxnId>> = BTreeMap::new();
        let mut add = |a: TxnId, b: TxnId| {
            if a != b {
                edges.entry(a).or_default().insert(b);
            }
        };
        for versions in &self.versions {
            for pair in versions.windows(2) {
                add(pair[0].1, pair[1].1);
            }
        }
        for (id, c) in &self.committed {
            for (key, seen) in &c.reads {
                let versions = &self.versions[*key];
                if let Some(o) = seen {
                    let writer = versions.iter().find(|(v, _)| v == o).expect("a version read exists").1;
                    add(writer, *id);
                }
                if let Some((_, next)) = versions.iter().find(|(v, _)| seen.is_none_or(|o| *v > o)) {
                    add(*id, *next);
                }
            }
        }
        // Kahn: whatever cannot be ordered is on (or behind) a cycle.
        let nodes: BTreeSet<TxnId> = self.committed.keys().copied().collect();
        let mut indegree: BTreeMap<TxnId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for to in edges.values().flatten() {
            *indegree.get_mut(to).expect("edges join committed transactions") += 1;
        }
        let mut ready: Vec<TxnId> = indegree.iter().filter(|(_, d)| **d == 0).map(|(n, _)| *n).collect();
        let mut ordered = 0;
        while let Some(n) = ready.pop() {
            ordered += 1;
            for to in edges.get(&n).into_iter().flatten() {
                let d = indegree.get_mut(to).expect("a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(*to);
                }
            }
        }
        if ordered == nodes.len() {
            Ok(())
        } else {
            Err(format!("a dependency cycle among {:?}", self.committed))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn prop_committed_histories_are_serializable(ops in proptest::collection::vec(op(), 0..80)) {
        let mut m = Model { end: 1, ..Model::default() };
        for op in ops {
            m.step(op);
        }
        for s in 0..SLOTS {
            m.step(Op::Finish(s));
        }
        if let Err(e) = m.serializable() {
            prop_assert!(false, "{}", e);
        }
        // Once every transaction ended, gc forgets everything.
        for l in m.slots.iter_mut().filter_map(Option::take) {
            m.s.abort(l.id);
        }
        m.s.gc();
        prop_assert_eq!(m.s.tracked(), 0);
        prop_assert!(m.s.readers.is_empty() && m.s.scanners.is_empty() && m.s.writers.is_empty());
    }
}
