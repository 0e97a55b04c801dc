use super::*;
use crate::core::machine::LogMachine;
use crate::core::table::Step;

fn k(s: &str) -> Key {
    s.as_bytes().to_vec()
}

/// A transaction that began at `begin_us` (smaller: older, wins under wound-wait).
fn info(txn: u64, level: Level, begin_us: u64) -> TxnInfo {
    TxnInfo { txn: TxnId(txn), level, priority: Priority { begin_us, txn: TxnId(txn) }, timeout_ms: 1_000 }
}

fn part(i: &TxnInfo, snapshot: Offset, reads: &[(&str, Option<Offset>)], writes: &[(&str, &str)]) -> Part {
    Part {
        txn: i.txn,
        level: i.level,
        snapshot,
        reads: reads.iter().map(|(key, v)| (k(key), *v)).collect(),
        ranges: vec![],
        writes: writes.iter().map(|(key, v)| (k(key), Some(k(v)))).collect(),
        steps: vec![],
    }
}

/// Appends `p` at the machine's end, as the runtime does after [`Decision::Append`], and
/// tells the leader the outcome.
fn append(l: &mut PartitionLeader, m: &mut TableMachine, p: &Part) -> Outcome {
    let at = m.applied();
    m.apply(at, b"", &p.encode()).expect("a part that encodes applies");
    let outcome = m.outcome(p.txn).cloned().expect("an applied part has an outcome");
    l.applied(p.txn, Some(&outcome));
    outcome
}

/// x=10 at 0, y=20 at 1.
fn seeded() -> TableMachine {
    let mut m = TableMachine::new();
    let mut l = PartitionLeader::new(LeaderEpoch(0));
    let seed = info(1, Level::ReadCommitted, 0);
    append(&mut l, &mut m, &part(&seed, Offset(0), &[], &[("x", "10"), ("y", "20")]));
    m
}

fn read(l: &mut PartitionLeader, m: &TableMachine, i: &TxnInfo, key: &str) -> Answer<Rows> {
    l.read(Time(0), m, i, None, &[k(key)], None)
}

fn value(a: &Answer<Rows>) -> Option<Vec<u8>> {
    match a {
        Answer::Ready(rows) => rows.rows[0].value.clone(),
        other => panic!("not ready: {other:?}"),
    }
}

#[test]
fn two_phase_locking_makes_the_younger_wait_and_the_older_wound() {
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let old = info(10, Level::TwoPl, 100);
    let young = info(11, Level::TwoPl, 200);
    // The young one reads x (shared lock); the old one wants to write x: it wounds.
    assert_eq!(value(&read(&mut l, &m, &young, "x")), Some(k("10")));
    assert_eq!(l.lock(Time(0), &old, false, &[k("x")]), Answer::Ready(()));
    assert_eq!(read(&mut l, &m, &young, "y"), Answer::Aborted(AbortReason::Wounded));
    assert!(l.take_wakes().contains(&young.txn), "the wounded transaction is woken to learn it");
    // A younger writer waits for the old one's exclusive lock, and is woken by its commit.
    let later = info(12, Level::TwoPl, 300);
    assert_eq!(l.lock(Time(0), &later, false, &[k("x")]), Answer::Wait);
    let p = part(&old, Offset(0), &[], &[("x", "11")]);
    assert_eq!(l.commit(Time(0), &m, &old, false, &p), Answer::Ready(Decision::Append));
    assert!(matches!(append(&mut l, &mut m, &p), Outcome::Committed { .. }));
    assert!(l.take_wakes().contains(&later.txn));
    assert_eq!(l.lock(Time(0), &later, false, &[k("x")]), Answer::Ready(()));
    // A reader waits for the writer's lock: it never sees an uncommitted value.
    let reader = info(13, Level::TwoPl, 400);
    assert_eq!(read(&mut l, &m, &reader, "x"), Answer::Wait);
    l.abort(later.txn);
    assert!(l.take_wakes().contains(&reader.txn));
    assert_eq!(value(&read(&mut l, &m, &reader, "x")), Some(k("11")));
}

#[test]
fn serial_interactive_transactions_take_turns_and_procedures_share_theirs() {
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let a = info(20, Level::Serial, 100);
    let b = info(21, Level::Serial, 50);
    assert!(matches!(read(&mut l, &m, &a, "x"), Answer::Ready(_)));
    // Another interactive one waits, however old: nobody is aborted for the turn.
    assert_eq!(read(&mut l, &m, &b, "x"), Answer::Wait);
    let p = part(&a, Offset(0), &[], &[("x", "30")]);
    assert_eq!(l.commit(Time(0), &m, &a, true, &p), Answer::Ready(Decision::Append));
    append(&mut l, &mut m, &p);
    assert_eq!(l.take_wakes(), vec![b.txn]);
    assert_eq!(value(&read(&mut l, &m, &b, "x")), Some(k("30")));
    l.abort(b.txn);
    assert_eq!(l.take_wakes(), vec![b.txn], "an ended transaction is woken to learn it");
    // Two procedures share the turn while appended.
    let p1 = info(22, Level::Serial, 0);
    let p2 = info(23, Level::Serial, 0);
    let step =
        |i: &TxnInfo| Part { steps: vec![Step::Increment { key: k("x"), amount: 1 }], ..part(i, Offset(0), &[], &[]) };
    assert_eq!(l.commit(Time(0), &m, &p1, false, &step(&p1)), Answer::Ready(Decision::Append));
    assert_eq!(l.commit(Time(0), &m, &p2, false, &step(&p2)), Answer::Ready(Decision::Append));
    // An interactive transaction waits for both.
    let c = info(24, Level::Serial, 0);
    assert_eq!(read(&mut l, &m, &c, "x"), Answer::Wait);
    append(&mut l, &mut m, &step(&p1));
    assert!(l.take_wakes().is_empty(), "one procedure still holds the turn");
    append(&mut l, &mut m, &step(&p2));
    assert_eq!(l.take_wakes(), vec![c.txn]);
    assert_eq!(value(&read(&mut l, &m, &c, "x")), Some(k("32")));
}

#[test]
fn ssi_aborts_the_second_committer_of_a_write_skew() {
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let t1 = info(30, Level::Ssi, 100);
    let t2 = info(31, Level::Ssi, 200);
    for t in [&t1, &t2] {
        for key in ["x", "y"] {
            assert!(matches!(read(&mut l, &m, t, key), Answer::Ready(_)));
        }
    }
    let snap = m.applied();
    let p1 = part(&t1, snap, &[], &[("x", "0")]);
    assert_eq!(l.commit(Time(0), &m, &t1, true, &p1), Answer::Ready(Decision::Append));
    assert!(matches!(append(&mut l, &mut m, &p1), Outcome::Committed { .. }));
    let p2 = part(&t2, snap, &[], &[("y", "0")]);
    assert_eq!(l.commit(Time(0), &m, &t2, true, &p2), Answer::Aborted(AbortReason::Dangerous));
}

#[test]
fn snapshot_reads_stay_at_their_snapshot_and_first_committer_wins() {
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let t1 = info(40, Level::Snapshot, 100);
    let t2 = info(41, Level::Snapshot, 200);
    let snap = match read(&mut l, &m, &t1, "x") {
        Answer::Ready(rows) => rows.snapshot,
        other => panic!("{other:?}"),
    };
    let p2 = part(&t2, m.applied(), &[], &[("x", "99"), ("y", "99")]);
    assert_eq!(l.commit(Time(0), &m, &t2, false, &p2), Answer::Ready(Decision::Append));
    append(&mut l, &mut m, &p2);
    // t1 still reads its snapshot: no read skew.
    assert_eq!(value(&l.read(Time(0), &m, &t1, Some(snap), &[k("y")], None)), Some(k("20")));
    let p1 = part(&t1, snap, &[], &[("x", "11")]);
    assert_eq!(l.commit(Time(0), &m, &t1, true, &p1), Answer::Aborted(AbortReason::WriteConflict));
}

#[test]
fn serializable_commits_fail_fast_on_a_stale_read() {
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let t1 = info(50, Level::Serializable, 100);
    let t2 = info(51, Level::Serializable, 200);
    let snap = m.applied();
    let p2 = part(&t2, snap, &[("x", Some(Offset(0)))], &[("x", "11")]);
    assert_eq!(l.commit(Time(0), &m, &t2, true, &p2), Answer::Ready(Decision::Append));
    append(&mut l, &mut m, &p2);
    let p1 = part(&t1, snap, &[("x", Some(Offset(0)))], &[("y", "11")]);
    assert_eq!(l.commit(Time(0), &m, &t1, true, &p1), Answer::Aborted(AbortReason::StaleRead));
    // Read-only and current: committed without a record.
    let t3 = info(52, Level::Serializable, 300);
    let p3 = part(&t3, m.applied(), &[("x", Some(Offset(1)))], &[]);
    assert_eq!(l.commit(Time(0), &m, &t3, true, &p3), Answer::Ready(Decision::Nothing));
}

#[test]
fn a_new_leader_aborts_the_transactions_whose_guarantee_it_lost() {
    let m = seeded();
    let mut old = PartitionLeader::new(LeaderEpoch(1));
    let locker = info(60, Level::TwoPl, 100);
    let rc = info(61, Level::ReadCommitted, 100);
    assert!(matches!(read(&mut old, &m, &locker, "x"), Answer::Ready(_)));
    let mut new = PartitionLeader::new(LeaderEpoch(2));
    // It names a snapshot here: it was here before, and its shared lock is gone.
    let again = new.read(Time(0), &m, &locker, Some(Offset(2)), &[k("y")], None);
    assert_eq!(again, Answer::Aborted(AbortReason::LeaderChanged));
    let p = part(&locker, Offset(2), &[("x", Some(Offset(0)))], &[("x", "1")]);
    assert_eq!(new.commit(Time(0), &m, &locker, true, &p), Answer::Aborted(AbortReason::LeaderChanged));
    // Read committed keeps nothing on the leader: it goes on.
    assert!(matches!(new.read(Time(0), &m, &rc, Some(Offset(2)), &[k("y")], None), Answer::Ready(_)));
}

#[test]
fn transactions_past_their_timeout_end_and_release_what_they_hold() {
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let slow = info(70, Level::TwoPl, 100);
    let next = info(71, Level::TwoPl, 200);
    assert_eq!(l.lock(Time(0), &slow, false, &[k("x")]), Answer::Ready(()));
    let half = Time(0).plus_ms(500);
    assert_eq!(l.lock(half, &next, false, &[k("x")]), Answer::Wait);
    l.expire(Time(0).plus_ms(999));
    assert_eq!(l.live(), 2, "not yet");
    l.expire(Time(0).plus_ms(1_000));
    assert!(l.take_wakes().contains(&next.txn));
    assert_eq!(l.lock(half, &next, false, &[k("x")]), Answer::Ready(()));
    assert_eq!(l.lock(half, &slow, false, &[k("y")]), Answer::Aborted(AbortReason::Timeout));
    assert_eq!(l.oldest_snapshot(), None, "nobody reads");
}

#[test]
fn a_prepared_part_holds_its_locks_until_its_marker() {
    use crate::core::txn_partition::MarkerKind;
    use crate::core::ProducerId;
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let t = info(80, Level::TwoPl, 100);
    let other = info(81, Level::TwoPl, 200);
    let p = part(&t, Offset(0), &[], &[("x", "5")]);
    assert_eq!(l.commit(Time(0), &m, &t, false, &p), Answer::Ready(Decision::Append));
    let at = m.applied();
    m.apply_transactional(at, ProducerId(7), b"", &p.encode()).expect("applies");
    l.applied(t.txn, m.outcome(t.txn));
    assert_eq!(read(&mut l, &m, &other, "x"), Answer::Wait);
    l.decided(&m);
    assert!(l.take_wakes().is_empty(), "no marker yet");
    let at = m.applied();
    m.apply_marker(at, ProducerId(7), MarkerKind::Commit);
    l.decided(&m);
    assert_eq!(l.take_wakes(), vec![other.txn]);
    assert_eq!(value(&read(&mut l, &m, &other, "x")), Some(k("5")));
}
