use proptest::prelude::*;

use super::*;

fn k(s: &str) -> Key {
    s.as_bytes().to_vec()
}

fn part(txn: u64, level: Level, snapshot: u64) -> Part {
    Part {
        txn: TxnId(txn),
        level,
        snapshot: Offset(snapshot),
        reads: vec![],
        ranges: vec![],
        writes: vec![],
        steps: vec![],
    }
}

fn put(txn: u64, level: Level, snapshot: u64, writes: &[(&str, Option<&str>)]) -> Part {
    Part { writes: writes.iter().map(|(key, v)| (k(key), v.map(k))).collect(), ..part(txn, level, snapshot) }
}

fn range(from: &str, to: Option<&str>) -> Range {
    Range { from: k(from), to: to.map(k) }
}

/// Applies `p` at the machine's end; returns its offset.
fn apply(m: &mut TableMachine, p: &Part) -> Offset {
    let at = m.applied();
    m.apply(at, b"", &p.encode()).expect("a part that encodes applies");
    at
}

fn prepare(m: &mut TableMachine, producer: i64, p: &Part) -> Offset {
    let at = m.applied();
    m.apply_transactional(at, ProducerId(producer), b"", &p.encode()).expect("a part that encodes applies");
    at
}

fn marker(m: &mut TableMachine, producer: i64, kind: MarkerKind) -> Offset {
    let at = m.applied();
    m.apply_marker(at, ProducerId(producer), kind);
    at
}

/// x=10 at 0, y=20 at 1.
fn seeded() -> TableMachine {
    let mut m = TableMachine::new();
    apply(&mut m, &put(1, Level::ReadCommitted, 0, &[("x", Some("10"))]));
    apply(&mut m, &put(2, Level::ReadCommitted, 0, &[("y", Some("20"))]));
    m
}

fn committed(m: &TableMachine, txn: u64) -> bool {
    matches!(m.outcome(TxnId(txn)), Some(Outcome::Committed { .. }))
}

fn aborted(m: &TableMachine, txn: u64) -> Option<AbortReason> {
    match m.outcome(TxnId(txn)) {
        Some(Outcome::Aborted(r)) => Some(*r),
        _ => None,
    }
}

/// Applies `p` to `m` and checks its decision, and that `validate` predicted it.
fn check(m: &mut TableMachine, p: Part, expect: Result<(), AbortReason>) {
    assert_eq!(m.validate(&p), expect, "validate {p:?}");
    let txn = p.txn;
    apply(m, &p);
    match expect {
        Ok(()) => assert!(committed(m, txn.0), "{:?}", m.outcome(txn)),
        Err(r) => assert_eq!(m.outcome(txn), Some(&Outcome::Aborted(r))),
    }
}

#[test]
fn reads_see_the_newest_version_below_the_snapshot() {
    let mut m = seeded();
    apply(&mut m, &put(3, Level::ReadCommitted, 0, &[("x", Some("11")), ("y", None)]));
    assert_eq!(m.get(b"x", Offset(0)), None);
    assert_eq!(m.get(b"x", Offset(1)), Some((Offset(0), Some(&b"10"[..]))));
    assert_eq!(m.get(b"x", Offset(2)), Some((Offset(0), Some(&b"10"[..]))));
    assert_eq!(m.get(b"x", Offset(3)), Some((Offset(2), Some(&b"11"[..]))));
    assert_eq!(m.get(b"y", Offset(3)), Some((Offset(2), None)));
    assert_eq!(m.latest(b"y"), Some((Offset(2), None)));
    assert_eq!(m.latest(b"z"), None);
    let all = range("", None);
    assert_eq!(m.scan(&all, Offset(2)), vec![(&b"x"[..], Offset(0), &b"10"[..]), (&b"y"[..], Offset(1), &b"20"[..])]);
    assert_eq!(m.scan(&all, Offset(3)), vec![(&b"x"[..], Offset(2), &b"11"[..])]);
    assert_eq!(m.scan(&range("y", Some("z")), Offset(2)).len(), 1);
    assert_eq!(m.scan(&range("x", Some("y")), Offset(2)).len(), 1);
    // A range whose end is before its start is empty, not a panic.
    assert!(m.scan(&range("z", Some("a")), Offset(3)).is_empty());
    assert_eq!((m.keys(), m.versions(), m.applied()), (2, 4, Offset(3)));
}

#[test]
fn snapshot_and_ssi_abort_on_a_write_after_their_snapshot() {
    for level in [Level::Snapshot, Level::Ssi] {
        let mut m = seeded();
        // x's version is at 0: a snapshot at 0 does not see it, one at 1 does.
        check(&mut m, put(10, level, 0, &[("x", Some("1"))]), Err(AbortReason::WriteConflict));
        check(&mut m, put(11, level, 1, &[("x", Some("1"))]), Ok(()));
        // Procedure keys are written keys too.
        let inc = Part { steps: vec![Step::Increment { key: k("y"), amount: 1 }], ..part(12, level, 1) };
        check(&mut m, inc, Err(AbortReason::WriteConflict));
    }
    for level in [Level::ReadCommitted, Level::Serial, Level::TwoPl, Level::Serializable] {
        let mut m = seeded();
        check(&mut m, put(10, level, 0, &[("x", Some("1"))]), Ok(()));
    }
}

#[test]
fn serializable_aborts_on_stale_reads_and_phantoms() {
    let mut m = seeded();
    let read = |txn, seen: Option<u64>| Part {
        reads: vec![(k("x"), seen.map(Offset))],
        ..put(txn, Level::Serializable, 2, &[("w", Some("1"))])
    };
    check(&mut m, read(10, Some(0)), Ok(()));
    apply(&mut m, &put(11, Level::ReadCommitted, 0, &[("x", Some("12"))]));
    check(&mut m, read(12, Some(0)), Err(AbortReason::StaleRead));
    check(&mut m, read(13, None), Err(AbortReason::StaleRead));
    // Snapshot and SSI validate the reads a part carries (a transaction over several
    // partitions), and nothing when it carries none (over one, the leader checks).
    for (txn, level, key) in [(14, Level::Snapshot, "v"), (15, Level::Ssi, "u")] {
        let mut snap = read(txn, Some(0));
        snap.level = level;
        snap.writes = vec![(k(key), Some(k("1")))];
        check(&mut m, snap.clone(), Err(AbortReason::StaleRead));
        snap.txn = TxnId(txn + 100);
        snap.reads.clear();
        snap.snapshot = m.applied();
        check(&mut m, snap, Ok(()));
    }
    // Read committed does not validate reads.
    let mut rc = read(16, Some(0));
    rc.level = Level::ReadCommitted;
    check(&mut m, rc, Ok(()));

    // A range gaining a row, or losing one, after the snapshot.
    let scan = |txn, snapshot, r: Range| Part { ranges: vec![r], ..put(txn, Level::Serializable, snapshot, &[]) };
    let s = m.applied().0;
    apply(&mut m, &put(20, Level::ReadCommitted, 0, &[("m", Some("1"))]));
    check(&mut m, scan(21, s, range("l", Some("n"))), Err(AbortReason::Phantom));
    check(&mut m, scan(22, s, range("n", None)), Ok(()));
    check(&mut m, scan(23, s, range("a", Some("m"))), Ok(()));
    let s = m.applied().0;
    apply(&mut m, &put(24, Level::ReadCommitted, 0, &[("m", None)]));
    check(&mut m, scan(25, s, range("m", Some("mm"))), Err(AbortReason::Phantom));
    let s = m.applied().0;
    check(&mut m, scan(26, s, range("m", Some("mm"))), Ok(()));
    // Blind writes are not checked.
    check(&mut m, put(27, Level::Serializable, 0, &[("x", Some("1"))]), Ok(()));
}

#[test]
fn a_deleted_key_reads_as_absent_whichever_version_the_reader_reports() {
    let mut m = seeded();
    let del = apply(&mut m, &put(3, Level::ReadCommitted, 0, &[("x", None)]));
    let s = m.applied().0;
    let read =
        |txn, seen| Part { reads: vec![(k("x"), seen)], ..put(txn, Level::Serializable, s, &[("w", Some("1"))]) };
    check(&mut m, read(10, None), Ok(()));
    check(&mut m, read(11, Some(del)), Ok(()));
    // A reader at a snapshot before the delete did not see it absent.
    let early = Part { reads: vec![(k("x"), None)], ..put(12, Level::Serializable, del.0, &[]) };
    check(&mut m, early, Err(AbortReason::StaleRead));
    m.prune(m.applied());
    assert_eq!(m.latest(b"x"), None);
    let s = m.applied().0;
    let read = |txn, seen| Part { reads: vec![(k("x"), seen)], ..put(txn, Level::Serializable, s, &[]) };
    check(&mut m, read(13, None), Ok(()));
    check(&mut m, read(14, Some(del)), Ok(()));
}

/// A reader that reports a version it cannot have seen (below its snapshot, not the key's)
/// for a key deleted before the snapshot is judged alike by a replica that pruned the delete
/// and one that kept it: the log decides, not what each replica kept.
#[test]
fn a_made_up_version_for_a_deleted_key_is_judged_alike_pruned_or_not() {
    let mut kept = seeded();
    apply(&mut kept, &put(3, Level::ReadCommitted, 0, &[("x", None)]));
    let mut pruned = kept.clone();
    pruned.prune(pruned.applied());
    assert_eq!((kept.latest(b"x").is_some(), pruned.latest(b"x")), (true, None));
    let s = kept.applied().0;
    // x was written at 0 and deleted at 2: the reader claims offset 1 (y's).
    let liar = Part { reads: vec![(k("x"), Some(Offset(1)))], ..put(20, Level::Serializable, s, &[("w", Some("1"))]) };
    let (a, b) = (kept.validate(&liar), pruned.validate(&liar));
    assert_eq!(a, b, "a made-up version decided differently by a replica that kept the delete");
    // A version at or past the snapshot is stale on both.
    let future = Part { reads: vec![(k("x"), Some(Offset(s)))], ..put(21, Level::Serializable, s, &[]) };
    assert_eq!(kept.validate(&future), Err(AbortReason::StaleRead));
    assert_eq!(pruned.validate(&future), Err(AbortReason::StaleRead));
}

#[test]
fn prepared_parts_hold_their_keys() {
    let mut m = seeded();
    let held = Part {
        reads: vec![(k("y"), Some(Offset(1)))],
        ranges: vec![range("r", Some("s"))],
        ..put(1, Level::Serializable, 2, &[("x", Some("11"))])
    };
    assert_eq!(prepare(&mut m, 7, &held), Offset(2));
    assert_eq!(m.outcome(TxnId(1)), Some(&Outcome::Prepared { offset: Offset(2) }));
    assert_eq!(m.prepared_count(), 1);
    // Any level: writing a key the prepared part writes, reads, or scans.
    for level in Level::ALL {
        let s = m.applied().0;
        check(&mut m, put(10, level, s, &[("x", Some("1"))]), Err(AbortReason::Prepared));
        check(&mut m, put(11, level, s, &[("y", Some("1"))]), Err(AbortReason::Prepared));
        check(&mut m, put(12, level, s, &[("r1", Some("1"))]), Err(AbortReason::Prepared));
        let step = Part { steps: vec![Step::Append { key: k("x"), value: k("v") }], ..part(13, level, s) };
        check(&mut m, step, Err(AbortReason::Prepared));
        check(&mut m, put(14, level, s, &[("z", Some("1"))]), Ok(()));
    }
    // Serializable: reading or scanning a key the prepared part writes.
    let s = m.applied().0;
    let read = Part { reads: vec![(k("x"), Some(Offset(0)))], ..part(20, Level::Serializable, s) };
    check(&mut m, read, Err(AbortReason::Prepared));
    let scan = Part { ranges: vec![range("w", Some("y"))], ..part(21, Level::Serializable, s) };
    check(&mut m, scan, Err(AbortReason::Prepared));
    // ... but reading a key it only reads is fine, and read committed's reads are not
    // checked; a snapshot part carrying reads is, as serializable's.
    let read = Part { reads: vec![(k("y"), Some(Offset(1)))], ..part(22, Level::Serializable, s) };
    check(&mut m, read, Ok(()));
    let read = Part { reads: vec![(k("x"), Some(Offset(0)))], ..put(23, Level::ReadCommitted, s, &[("q", Some("1"))]) };
    check(&mut m, read, Ok(()));
    let read = Part { reads: vec![(k("x"), Some(Offset(0)))], ..put(24, Level::Snapshot, s, &[("q2", Some("1"))]) };
    check(&mut m, read, Err(AbortReason::Prepared));
    // Another producer's transaction on other keys prepares alongside.
    prepare(&mut m, 8, &put(30, Level::Snapshot, s, &[("p", Some("1"))]));
    assert_eq!(m.prepared_count(), 2);
}

#[test]
fn markers_commit_prepared_parts_at_their_offset_or_drop_them() {
    let mut m = seeded();
    let inc = Part {
        steps: vec![Step::Increment { key: k("y"), amount: 5 }],
        ..put(1, Level::Serializable, 2, &[("x", Some("11"))])
    };
    // The coordinator's begin marker comes before the part (the partition takes a
    // transactional write only inside a transaction it has seen begin).
    marker(&mut m, 7, MarkerKind::Begin);
    prepare(&mut m, 7, &inc);
    assert_eq!(m.prepared_count(), 1);
    assert_eq!(m.latest(b"x"), Some((Offset(0), Some(&b"10"[..]))));
    // A marker of a producer with nothing prepared moves past.
    marker(&mut m, 9, MarkerKind::Commit);
    let at = marker(&mut m, 7, MarkerKind::Commit);
    assert_eq!(m.outcome(TxnId(1)), Some(&Outcome::Committed { offset: at, results: vec![Some(k("25"))] }));
    assert_eq!(m.latest(b"x"), Some((at, Some(&b"11"[..]))));
    assert_eq!(m.latest(b"y"), Some((at, Some(&b"25"[..]))));
    assert_eq!(m.get(b"x", at), Some((Offset(0), Some(&b"10"[..]))));
    assert_eq!(m.prepared_count(), 0);
    // The keys are free again.
    check(&mut m, put(2, Level::ReadCommitted, 0, &[("x", Some("12"))]), Ok(()));

    // Abort: dropped, the transaction's outcome says another partition voted no.
    let s = m.applied().0;
    prepare(&mut m, 7, &put(3, Level::Snapshot, s, &[("x", Some("13"))]));
    marker(&mut m, 7, MarkerKind::Abort);
    assert_eq!(aborted(&m, 3), Some(AbortReason::OtherPartition));
    assert_eq!(m.latest(b"x").map(|(_, v)| v), Some(Some(&b"12"[..])));
    check(&mut m, put(4, Level::ReadCommitted, 0, &[("x", Some("14"))]), Ok(()));

    // A part that did not validate is not prepared; its marker keeps its reason.
    prepare(&mut m, 7, &put(5, Level::Snapshot, 0, &[("x", Some("15"))]));
    assert_eq!(m.prepared_count(), 0);
    marker(&mut m, 7, MarkerKind::Abort);
    assert_eq!(aborted(&m, 5), Some(AbortReason::WriteConflict));
    marker(&mut m, 7, MarkerKind::Commit);
    assert_eq!(aborted(&m, 5), Some(AbortReason::WriteConflict));
}

/// A begin marker of the producer while its part is still prepared (a coordinator that lost
/// the older transaction) aborts that part, as the partition's transaction state does; the
/// next commit marker commits only the newer transaction's part.
#[test]
fn a_newer_begin_aborts_the_producer_s_part_still_prepared() {
    let mut m = seeded();
    prepare(&mut m, 7, &put(30, Level::Serializable, 0, &[("x", Some("old"))]));
    marker(&mut m, 7, MarkerKind::Begin);
    assert_eq!(aborted(&m, 30), Some(AbortReason::OtherPartition));
    assert_eq!(m.prepared_count(), 0);
    prepare(&mut m, 7, &put(31, Level::Serializable, 0, &[("y", Some("new"))]));
    let at = marker(&mut m, 7, MarkerKind::Commit);
    assert!(committed(&m, 31));
    assert_eq!(m.get(b"x", Offset(at.0 + 1)).and_then(|(_, v)| v), Some(&b"10"[..]), "the old part never wrote");
    assert_eq!(m.get(b"y", Offset(at.0 + 1)).and_then(|(_, v)| v), Some(&b"new"[..]));
}

#[test]
fn a_producer_prepares_one_part_at_a_time() {
    let mut m = seeded();
    let first = put(1, Level::ReadCommitted, 0, &[("a", Some("1"))]);
    prepare(&mut m, 7, &first);
    // The same transaction's part again (a retried append): the first stays prepared.
    prepare(&mut m, 7, &first);
    assert_eq!(m.outcome(TxnId(1)), Some(&Outcome::Prepared { offset: Offset(2) }));
    // Another transaction of the same producer: aborted, the first is untouched.
    prepare(&mut m, 7, &put(2, Level::ReadCommitted, 0, &[("b", Some("1"))]));
    assert_eq!(aborted(&m, 2), Some(AbortReason::Prepared));
    assert_eq!(m.prepared_count(), 1);
    let at = marker(&mut m, 7, MarkerKind::Commit);
    assert_eq!(m.latest(b"a"), Some((at, Some(&b"1"[..]))));
    assert_eq!(m.latest(b"b"), None);
}

#[test]
fn procedures_run_at_the_log_position() {
    let mut m = seeded();
    let steps = vec![
        Step::Transfer { from: k("x"), to: k("y"), amount: 4 },
        Step::Transfer { from: k("x"), to: k("y"), amount: 7 },
        Step::Transfer { from: k("x"), to: k("y"), amount: -1 },
        Step::Transfer { from: k("new"), to: k("x"), amount: 0 },
        Step::Append { key: k("l"), value: k("a") },
        Step::Append { key: k("l"), value: k("b") },
        Step::CompareAndSet { key: k("x"), expect: Some(k("6")), value: Some(k("60")) },
        Step::CompareAndSet { key: k("x"), expect: Some(k("6")), value: None },
        Step::CompareAndSet { key: k("c"), expect: None, value: Some(k("1")) },
        Step::Increment { key: k("n"), amount: -3 },
        Step::Increment { key: k("l"), amount: 1 },
        Step::Increment { key: k("n"), amount: i64::MAX },
        Step::Put { key: k("p"), value: k("v") },
        Step::Delete { key: k("y") },
        Step::Increment { key: k("y"), amount: 2 },
    ];
    let at = apply(&mut m, &Part { steps, ..part(1, Level::Serial, 0) });
    let s = |v: &str| Some(k(v));
    let expect = vec![
        s("6"),   // 10 - 4 moved
        None,     // 6 < 7: nothing moves
        None,     // negative amounts never move
        s("0"),   // absent is 0, and 0 >= 0
        s("a"),   // "" + a
        s("a,b"), // "a" + b
        s("6"),   // found 6: set to 60
        s("60"),  // found 60: unchanged
        None,     // found absent: set
        s("-3"),  // absent + -3
        None,     // "a,b" is not an integer
        s(&(i64::MAX - 3).to_string()),
        None,   // put
        None,   // delete
        s("2"), // deleted reads as 0
    ];
    let results = match m.outcome(TxnId(1)) {
        Some(Outcome::Committed { offset, results }) if *offset == at => results.clone(),
        other => panic!("not committed at {at}: {other:?}"),
    };
    assert_eq!(results, expect);
    let now = m.applied();
    let value = |key: &str| m.get(key.as_bytes(), now).and_then(|(_, v)| v.map(<[u8]>::to_vec));
    assert_eq!(value("x"), s("60"));
    assert_eq!(value("y"), s("2"));
    assert_eq!(value("l"), s("a,b"));
    assert_eq!(value("c"), s("1"));
    assert_eq!(value("p"), s("v"));
    assert_eq!(value("new"), s("0"));
    // Several changes of one key in one part are one version.
    assert_eq!(m.rows[&k("x")].len(), 2);
    // An overflow leaves the key unchanged.
    apply(&mut m, &Part { steps: vec![Step::Increment { key: k("n"), amount: 10 }], ..part(2, Level::Serial, 0) });
    assert_eq!(m.outcome(TxnId(2)), Some(&Outcome::Committed { offset: Offset(3), results: vec![None] }));
    // A transfer that would overflow its target does not move either.
    apply(&mut m, &put(3, Level::Serial, 0, &[("big", Some(&i64::MAX.to_string()))]));
    apply(
        &mut m,
        &Part { steps: vec![Step::Transfer { from: k("x"), to: k("big"), amount: 1 }], ..part(4, Level::Serial, 0) },
    );
    assert_eq!(m.outcome(TxnId(4)), Some(&Outcome::Committed { offset: Offset(5), results: vec![None] }));
    assert_eq!(m.latest(b"x").map(|(_, v)| v), Some(Some(&b"60"[..])));
}

#[test]
fn records_that_do_not_decode_or_come_late_are_errors() {
    let mut m = seeded();
    assert!(m.apply(Offset(2), b"", b"junk").is_err());
    assert_eq!(m.applied(), Offset(3));
    let p = put(1, Level::ReadCommitted, 0, &[("x", Some("1"))]);
    assert!(m.apply(Offset(1), b"", &p.encode()).is_err());
    assert!(m.apply_transactional(Offset(1), ProducerId(1), b"", &p.encode()).is_err());
    m.apply_marker(Offset(0), ProducerId(1), MarkerKind::Commit);
    assert_eq!((m.applied(), m.versions()), (Offset(3), 2));
}

#[test]
fn prune_keeps_what_snapshots_at_or_after_keep_see() {
    let mut m = TableMachine::new();
    for (i, v) in [Some("1"), Some("2"), None, Some("4")].into_iter().enumerate() {
        apply(&mut m, &put(i as u64, Level::ReadCommitted, 0, &[("a", v)]));
    }
    apply(&mut m, &put(9, Level::ReadCommitted, 0, &[("d", Some("1"))]));
    apply(&mut m, &put(10, Level::ReadCommitted, 0, &[("d", None)]));
    let reads = |m: &TableMachine| -> Vec<_> {
        (2..=6)
            .map(|at| {
                (
                    m.get(b"a", Offset(at)).map(|(o, v)| (o, v.map(<[u8]>::to_vec))),
                    m.get(b"d", Offset(at)).map(|(o, v)| (o, v.map(<[u8]>::to_vec))),
                )
            })
            .collect()
    };
    let before = reads(&m);
    m.prune(Offset(2));
    assert_eq!((m.keys(), m.versions()), (2, 5));
    let after = reads(&m);
    assert_eq!(before, after);
    m.prune(Offset(6));
    // d's last version is a delete below 6: gone. a keeps its newest version.
    assert_eq!((m.keys(), m.versions()), (1, 1));
    assert_eq!(m.get(b"a", Offset(6)), Some((Offset(3), Some(&b"4"[..]))));
    assert_eq!(m.get(b"d", Offset(6)), None);
}

/// A leader keeps the versions its live transactions' snapshots need; a follower knows no
/// transaction and prunes by its window alone. A part whose snapshot is older than the window
/// must be decided alike on both: aborted as too old, not validated against history one of
/// them no longer has (the follower would commit a stale read the leader aborts).
#[test]
fn a_snapshot_older_than_the_window_aborts_on_every_replica_whatever_each_pruned() {
    let window = 4;
    let mut leader = TableMachine::new().with_window(window);
    apply(&mut leader, &put(1, Level::ReadCommitted, 0, &[("x", Some("1"))]));
    // Transaction 50 reads x at snapshot 1 (it sees offset 0); then x is deleted at 1 and the
    // log moves on.
    apply(&mut leader, &put(2, Level::ReadCommitted, 0, &[("x", None)]));
    for i in 0..8 {
        apply(&mut leader, &put(10 + i, Level::ReadCommitted, 0, &[("f", Some("0"))]));
    }
    let mut follower = leader.clone();
    // The leader holds transaction 50's snapshot; the follower prunes as far as it may.
    leader.prune_behind(Some(Offset(1)));
    follower.prune_behind(None);
    assert!(follower.keys() < leader.keys(), "the follower dropped x's delete, the leader kept it");
    let stale = Part { reads: vec![(k("x"), Some(Offset(0)))], ..put(50, Level::Serializable, 1, &[("y", Some("1"))]) };
    let too_old = Err(AbortReason::SnapshotTooOld);
    check(&mut leader, stale.clone(), too_old);
    check(&mut follower, stale, too_old);
    // Inside the window both still validate as before: a stale read aborts as stale.
    let at = leader.applied().0;
    apply(&mut leader, &put(3, Level::ReadCommitted, 0, &[("f", Some("1"))]));
    apply(&mut follower, &put(3, Level::ReadCommitted, 0, &[("f", Some("1"))]));
    let seen = leader.get(b"f", Offset(at)).map(|(o, _)| o);
    let recent = Part { reads: vec![(k("f"), seen)], ..put(51, Level::Serializable, at, &[("y", Some("2"))]) };
    check(&mut leader, recent.clone(), Err(AbortReason::StaleRead));
    check(&mut follower, recent, Err(AbortReason::StaleRead));
    // Snapshot and SSI write-conflict checks use the snapshot too; a blind serializable write
    // reads nothing and is not held to the window.
    check(&mut follower, put(52, Level::Snapshot, 1, &[("z", Some("1"))]), too_old);
    check(&mut follower, put(53, Level::Ssi, 1, &[("z", Some("1"))]), too_old);
    check(&mut follower, put(54, Level::Serializable, 0, &[("z", Some("1"))]), Ok(()));
}

#[test]
fn outcomes_are_bounded() {
    let mut m = seeded();
    m.outcomes.max = 3;
    for txn in 10..20 {
        apply(&mut m, &put(txn, Level::ReadCommitted, 0, &[("x", Some("1"))]));
    }
    // 17 recorded again counts as the newest: 18 is then the oldest, evicted first.
    prepare(&mut m, 7, &put(17, Level::ReadCommitted, 0, &[("q", Some("1"))]));
    apply(&mut m, &put(20, Level::ReadCommitted, 0, &[("x", Some("1"))]));
    let known: Vec<u64> = (0..21).filter(|t| m.outcome(TxnId(*t)).is_some()).collect();
    assert_eq!(known, vec![17, 19, 20]);
    assert!(m.outcomes.order.len() <= 6);
    for _ in 0..100 {
        prepare(&mut m, 7, &put(17, Level::ReadCommitted, 0, &[("q", Some("1"))]));
        prepare(&mut m, 8, &put(18, Level::ReadCommitted, 0, &[("q", Some("1"))]));
    }
    assert!(m.outcomes.order.len() <= 6, "{}", m.outcomes.order.len());
}

/// A machine with something of everything: versions, deletes, prepared parts, outcomes.
fn busy() -> TableMachine {
    let mut m = seeded();
    apply(&mut m, &put(3, Level::ReadCommitted, 0, &[("x", None), ("z", Some("30"))]));
    apply(&mut m, &Part { steps: vec![Step::Append { key: k("l"), value: k("v") }], ..part(4, Level::Serial, 0) });
    apply(&mut m, &put(5, Level::Snapshot, 0, &[("y", Some("1"))]));
    prepare(
        &mut m,
        7,
        &Part { reads: vec![(k("z"), Some(Offset(2)))], ..put(6, Level::Serializable, 3, &[("w", Some("1"))]) },
    );
    prepare(&mut m, 8, &put(7, Level::Snapshot, 5, &[("v", Some("1"))]));
    marker(&mut m, 8, MarkerKind::Abort);
    m
}

#[test]
fn snapshots_restore_the_same_machine() {
    let m = busy();
    let bytes = m.snapshot();
    let mut r = TableMachine::restore(&bytes).expect("a snapshot restores");
    assert_eq!(r.snapshot(), bytes);
    assert_eq!((r.applied(), r.keys(), r.versions(), r.prepared_count()), (m.applied(), m.keys(), m.versions(), 1));
    for txn in 0..8 {
        assert_eq!(r.outcome(TxnId(txn)), m.outcome(TxnId(txn)), "txn {txn}");
    }
    // The restored machine still holds the prepared part's keys, and commits it.
    check(&mut r, put(20, Level::ReadCommitted, 0, &[("z", Some("1"))]), Err(AbortReason::Prepared));
    let at = marker(&mut r, 7, MarkerKind::Commit);
    assert_eq!(r.latest(b"w"), Some((at, Some(&b"1"[..]))));
    assert!(TableMachine::restore(&TableMachine::new().snapshot()).is_ok());
}

#[test]
fn damaged_snapshots_are_errors() {
    let bytes = busy().snapshot();
    for cut in 0..bytes.len() {
        assert!(TableMachine::restore(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(TableMachine::restore(&longer), Err(SnapshotError::Length { .. })));
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x20;
        assert!(TableMachine::restore(&bad).is_err(), "flipped byte {i}");
    }
    assert_eq!(TableMachine::restore(b"nope").err(), Some(SnapshotError::Magic));
    let mut version = bytes.clone();
    version[4] = 9;
    assert!(matches!(TableMachine::restore(&version), Err(SnapshotError::Version(9))));

    // A checksummed body that breaks the invariants.
    let frame = |body: &[u8]| {
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    };
    let mut e = Enc(Vec::new());
    e.u64(5); // applied
    e.u64(1); // one key
    e.short(b"k");
    e.u64(2); // two versions, out of order
    for o in [3, 2] {
        e.u64(o);
        e.u8(0);
    }
    e.u64(0);
    e.u64(0);
    assert!(matches!(TableMachine::restore(&frame(&e.0)), Err(SnapshotError::Malformed(_))));
    // Counts far beyond the bytes: an error, not an allocation.
    let mut e = Enc(Vec::new());
    e.u64(5);
    e.u64(u64::MAX);
    assert!(matches!(TableMachine::restore(&frame(&e.0)), Err(SnapshotError::Malformed(_))));
}

/// A random event; parts are made against the machine's state when they are fed.
#[derive(Clone, Debug)]
enum Event {
    Plain(Spec),
    Txn(i64, Spec),
    Marker(i64, u8),
    Junk,
    Prune(u64),
}

#[derive(Clone, Debug)]
struct Spec {
    txn: u64,
    level: usize,
    back: u64,
    reads: Vec<(u8, bool)>,
    ranges: Vec<(u8, u8)>,
    writes: Vec<(u8, Option<u8>)>,
    steps: Vec<(u8, u8, u8, i64)>,
}

const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];
const VALUES: [&str; 4] = ["1", "7", "x", "99"];

fn spec() -> impl Strategy<Value = Spec> {
    let key = || 0u8..5;
    (
        0u64..12,
        0usize..6,
        0u64..4,
        prop::collection::vec((key(), any::<bool>()), 0..3),
        prop::collection::vec((key(), key()), 0..2),
        prop::collection::vec((key(), prop::option::of(0u8..4)), 0..3),
        prop::collection::vec((0u8..6, key(), key(), -2i64..10), 0..3),
    )
        .prop_map(|(txn, level, back, reads, ranges, writes, steps)| Spec {
            txn,
            level,
            back,
            reads,
            ranges,
            writes,
            steps,
        })
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => spec().prop_map(Event::Plain),
        3 => (0i64..3, spec()).prop_map(|(p, s)| Event::Txn(p, s)),
        2 => (0i64..3, 0u8..3).prop_map(|(p, kind)| Event::Marker(p, kind)),
        1 => Just(Event::Junk),
        1 => (0u64..6).prop_map(Event::Prune),
    ]
}

fn make(spec: &Spec, m: &TableMachine) -> Part {
    let snapshot = Offset(m.applied().0.saturating_sub(spec.back));
    let key = |i: u8| k(KEYS[usize::from(i)]);
    let reads = spec
        .reads
        .iter()
        .map(|(i, honest)| {
            let seen = if *honest { m.get(&key(*i), snapshot).map(|(o, _)| o) } else { Some(Offset(u64::from(*i))) };
            (key(*i), seen)
        })
        .collect();
    let ranges = spec.ranges.iter().map(|(a, b)| Range { from: key(*a), to: (b > a).then(|| key(*b)) }).collect();
    let writes: BTreeMap<Key, Option<Value>> =
        spec.writes.iter().map(|(i, v)| (key(*i), v.map(|v| k(VALUES[usize::from(v)])))).collect();
    let steps = spec
        .steps
        .iter()
        .map(|(kind, a, b, amount)| match kind {
            0 => Step::Put { key: key(*a), value: k(VALUES[usize::from(*b % 4)]) },
            1 => Step::Delete { key: key(*a) },
            2 => Step::CompareAndSet { key: key(*a), expect: Some(k("1")), value: Some(k("7")) },
            3 => Step::Increment { key: key(*a), amount: *amount },
            4 => Step::Transfer { from: key(*a), to: key(*b), amount: *amount },
            _ => Step::Append { key: key(*a), value: k(VALUES[usize::from(*b % 4)]) },
        })
        .collect();
    Part {
        txn: TxnId(spec.txn),
        level: Level::ALL[spec.level],
        snapshot,
        reads,
        ranges,
        writes: writes.into_iter().collect(),
        steps,
    }
}

fn feed_event(m: &mut TableMachine, event: &Event, record: Option<&[u8]>) {
    let at = m.applied();
    match event {
        Event::Plain(_) => {
            m.apply(at, b"", record.expect("a part")).expect("a part applies");
        }
        Event::Txn(p, _) => {
            m.apply_transactional(at, ProducerId(*p), b"", record.expect("a part")).expect("a part applies");
        }
        Event::Marker(p, kind) => {
            let kind = [MarkerKind::Commit, MarkerKind::Abort, MarkerKind::Begin][usize::from(*kind)];
            m.apply_marker(at, ProducerId(*p), kind);
        }
        Event::Junk => assert!(m.apply(at, b"", b"\x01junk").is_err()),
        Event::Prune(back) => m.prune(Offset(at.0.saturating_sub(*back))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A machine restored from a snapshot midway and fed the rest equals the one fed
    /// everything: same snapshot bytes (versions, prepared parts, outcomes, applied offset),
    /// same reads at every offset.
    #[test]
    fn a_restored_machine_continues_as_the_original(events in prop::collection::vec(event(), 1..60), mid in 0usize..60) {
        let mut full = TableMachine::new();
        let mut restored = TableMachine::new();
        for (i, event) in events.iter().enumerate() {
            if i == mid.min(events.len() - 1) {
                let bytes = restored.snapshot();
                restored = TableMachine::restore(&bytes).expect("a snapshot restores");
                prop_assert_eq!(restored.snapshot(), bytes);
            }
            let record = match event {
                Event::Plain(s) | Event::Txn(_, s) => Some(make(s, &full).encode()),
                _ => None,
            };
            if let Event::Plain(s) | Event::Txn(_, s) = event {
                // What the leader would predict is what the machine decides (for a part whose
                // producer has nothing prepared ahead of it).
                let part = make(s, &full);
                let predicted = full.validate(&part);
                let free = match event {
                    Event::Txn(p, _) => !full.prepared.contains_key(&ProducerId(*p)),
                    _ => true,
                };
                feed_event(&mut full, event, record.as_deref());
                if free {
                    match (predicted, full.outcome(part.txn)) {
                        (Ok(()), Some(Outcome::Committed { .. } | Outcome::Prepared { .. })) => {}
                        (Err(r), Some(Outcome::Aborted(a))) => prop_assert_eq!(&r, a),
                        (p, o) => prop_assert!(false, "predicted {:?}, decided {:?}", p, o),
                    }
                }
            } else {
                feed_event(&mut full, event, record.as_deref());
            }
            feed_event(&mut restored, event, record.as_deref());
        }
        prop_assert_eq!(full.snapshot(), restored.snapshot());
        prop_assert_eq!(full.prepared_count(), restored.prepared_count());
        prop_assert_eq!((full.keys(), full.versions()), (restored.keys(), restored.versions()));
        let all = Range { from: vec![], to: None };
        for at in 0..=full.applied().0 {
            prop_assert_eq!(full.scan(&all, Offset(at)), restored.scan(&all, Offset(at)));
            for key in KEYS {
                prop_assert_eq!(full.get(key.as_bytes(), Offset(at)), restored.get(key.as_bytes(), Offset(at)));
            }
        }
        // The holds derived on restore equal the ones kept while feeding.
        prop_assert_eq!(format!("{:?}", full.holds), format!("{:?}", restored.holds));
    }
}

fn city(c: &str) -> String {
    format!(r#"{{"city":"{c}"}}"#)
}

/// What a document index must answer: every row present at `at` whose city is `value`.
fn by_scan(m: &TableMachine, value: &str, at: Offset) -> Vec<(Key, Offset)> {
    let all = Range { from: Vec::new(), to: None };
    m.scan(&all, at)
        .into_iter()
        .filter(|(_, _, v)| skein_client::index::field_value(v, "city").as_deref() == Some(value.as_bytes()))
        .map(|(k, o, _)| (k.to_vec(), o))
        .collect()
}

fn by_index(m: &TableMachine, value: &str, at: Offset) -> Vec<(Key, Offset)> {
    m.query_index("by_city", value.as_bytes(), at, true)
        .expect("defined")
        .into_iter()
        .map(|(k, o, _)| (k.to_vec(), o))
        .collect()
}

#[test]
fn a_document_index_answers_at_its_snapshot_and_drops_entries_with_their_versions() {
    let mut m = TableMachine::new().with_window(2);
    apply(&mut m, &put(1, Level::ReadCommitted, 0, &[("a", Some(&city("Oslo"))), ("b", Some("not json"))]));
    m.define_index("by_city", "city");
    assert_eq!(m.index_progress("by_city"), Some((0, 2)));
    // While its first pass runs, a query checks every row.
    assert_eq!(by_index(&m, "Oslo", m.applied()), vec![(k("a"), Offset(0))]);
    assert!(!m.build_indexes(1));
    assert_eq!(m.index_progress("by_city"), Some((1, 2)));
    assert!(m.build_indexes(1));
    assert_eq!(m.index_progress("by_city"), Some((2, 2)));
    apply(&mut m, &put(2, Level::ReadCommitted, 0, &[("a", Some(&city("Bergen")))]));
    apply(&mut m, &put(3, Level::ReadCommitted, 0, &[("c", Some(&city("Oslo")))]));
    // At offset 1 a was still in Oslo; at the end it is in Bergen and c in Oslo.
    assert_eq!(by_index(&m, "Oslo", Offset(1)), vec![(k("a"), Offset(0))]);
    assert_eq!(by_index(&m, "Oslo", m.applied()), vec![(k("c"), Offset(2))]);
    assert_eq!(by_index(&m, "Bergen", m.applied()), vec![(k("a"), Offset(1))]);
    let entries = |m: &TableMachine| m.indexes["by_city"].entries.len();
    assert_eq!(entries(&m), 3, "a's old Oslo entry stays while its version does");
    m.prune(m.applied());
    assert_eq!(entries(&m), 2, "pruned with a's old version");
    m.keep_indexes(&BTreeSet::new());
    assert_eq!(m.query_index("by_city", b"Oslo", m.applied(), true), None);
}

proptest! {
    /// Whatever the writes, deletes, pruning and build steps, and whenever the index is
    /// defined, a query at any snapshot still readable answers what a scan does.
    #[test]
    fn document_index_queries_equal_filtered_scans(
        ops in proptest::collection::vec((0u8..6, 0u8..4, 0u8..5), 1..60),
        define_at in 0usize..60,
        step in 1usize..4,
    ) {
        let cities = ["Oslo", "Bergen", "Paris"];
        let mut m = TableMachine::new().with_window(5);
        for (i, (key, what, extra)) in ops.iter().enumerate() {
            if i == define_at {
                m.define_index("by_city", "city");
            }
            let key = format!("k{key}");
            let value = match what {
                0..=2 => Some(city(cities[*what as usize])),
                _ if *extra == 0 => Some("plain".to_owned()),
                _ => None,
            };
            apply(&mut m, &put(i as u64 + 1, Level::ReadCommitted, 0, &[(&key, value.as_deref())]));
            m.build_indexes(step);
            if extra % 3 == 0 {
                m.prune_behind(None);
            }
        }
        m.define_index("by_city", "city");
        while !m.build_indexes(step) {}
        let oldest = m.applied().0.saturating_sub(5);
        for at in oldest..=m.applied().0 {
            for c in cities {
                prop_assert_eq!(by_index(&m, c, Offset(at)), by_scan(&m, c, Offset(at)), "{} at {}", c, at);
            }
        }
    }
}
