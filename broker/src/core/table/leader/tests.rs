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
    let b = info(21, Level::Serial, 150);
    assert!(matches!(read(&mut l, &m, &a, "x"), Answer::Ready(_)));
    // A younger interactive one waits for the turn.
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

/// Two interactive serial transactions over two partitions, each holding one partition's
/// turn and asking for the other's: without wound-wait on the turn they would wait for each
/// other until their timeouts (the isolation case G1c over three partitions found it).
#[test]
fn the_serial_turn_is_wound_wait_so_two_partitions_cannot_deadlock() {
    let mut mx = seeded();
    let my = seeded();
    let mut lx = PartitionLeader::new(LeaderEpoch(1));
    let mut ly = PartitionLeader::new(LeaderEpoch(1));
    let old = info(30, Level::Serial, 100);
    let young = info(31, Level::Serial, 200);
    assert_eq!(lx.lock(Time(0), &old, false, &[k("x")]), Answer::Ready(()));
    assert_eq!(ly.lock(Time(0), &young, false, &[k("y")]), Answer::Ready(()));
    // The young one asks for x's turn: it waits for the older holder.
    assert_eq!(read(&mut lx, &mx, &young, "x"), Answer::Wait);
    // The old one asks for y's turn: it wounds the young holder and gets it at once.
    assert_eq!(value(&read(&mut ly, &my, &old, "y")), Some(k("20")));
    assert!(ly.take_wakes().contains(&young.txn), "the wounded transaction is woken to learn it");
    assert_eq!(ly.lock(Time(0), &young, true, &[k("y")]), Answer::Aborted(AbortReason::Wounded));
    // The old one commits on x; the young one's wait there ends, and it learns of the abort
    // once it comes back to y.
    let p = part(&old, Offset(0), &[], &[("x", "11")]);
    assert_eq!(lx.commit(Time(0), &mx, &old, true, &p), Answer::Ready(Decision::Append));
    append(&mut lx, &mut mx, &p);
    assert_eq!(lx.take_wakes(), vec![young.txn]);
    // A procedure holding the turn is decided by the log: an older interactive one waits.
    let proc_ = info(32, Level::Serial, 900);
    let step = Part { steps: vec![Step::Increment { key: k("x"), amount: 1 }], ..part(&proc_, Offset(0), &[], &[]) };
    lx.abort(young.txn);
    lx.take_wakes();
    assert_eq!(lx.commit(Time(0), &mx, &proc_, false, &step), Answer::Ready(Decision::Append));
    let oldest = info(33, Level::Serial, 1);
    assert_eq!(read(&mut lx, &mx, &oldest, "x"), Answer::Wait);
    append(&mut lx, &mut mx, &step);
    assert_eq!(lx.take_wakes(), vec![oldest.txn]);
    assert_eq!(value(&read(&mut lx, &mx, &oldest, "x")), Some(k("12")));
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

/// Simulator seed 2 of `skein-sim --tables` (2pl): a two-phase transaction's part was
/// prepared on a partition whose leader then changed; the new leader held no lock for it, so
/// a 2pl transaction read the key's old version, the marker committed the prepared write, and
/// the reader's write of the longer list (2pl parts are not validated) lost it.
#[test]
fn a_new_leader_makes_lock_based_reads_wait_for_a_prepared_write() {
    use crate::core::txn_partition::MarkerKind;
    use crate::core::ProducerId;
    let mut m = seeded();
    let t = info(90, Level::TwoPl, 100);
    let p = part(&t, Offset(0), &[], &[("x", "5")]);
    let at = m.applied();
    m.apply_transactional(at, ProducerId(7), b"", &p.encode()).expect("applies");
    assert_eq!(m.outcome(t.txn), Some(&Outcome::Prepared { offset: at }));
    // The leader of the next epoch knows nothing of the prepared part's locks.
    let mut l = PartitionLeader::new(LeaderEpoch(2));
    for level in [Level::TwoPl, Level::Serial] {
        let reader = info(91 + level.code() as u64, level, 50);
        assert_eq!(read(&mut l, &m, &reader, "x"), Answer::Wait, "{level:?} reads around a prepared write");
        let scan = Range { from: k("a"), to: None };
        assert_eq!(l.read(Time(0), &m, &reader, None, &[], Some(&scan)), Answer::Wait);
        assert_eq!(value(&read(&mut l, &m, &reader, "y")), Some(k("20")), "other keys are free");
        l.abort(reader.txn);
    }
    // Snapshot reads are checked at commit instead: they read the last committed version.
    let snap = info(95, Level::Serializable, 50);
    assert_eq!(value(&read(&mut l, &m, &snap, "x")), Some(k("10")));
    let at = m.applied();
    m.apply_marker(at, ProducerId(7), MarkerKind::Commit);
    let reader = info(96, Level::TwoPl, 60);
    assert_eq!(value(&read(&mut l, &m, &reader, "x")), Some(k("5")));
}

/// Simulator seeds 10 and 22 of `skein-sim --tables` (2pl): an older transaction wounded one
/// whose part was being appended; its locks went, a reader read around its write, and the
/// append committed (2pl parts are not validated): a lost update.
#[test]
fn wound_wait_never_wounds_a_transaction_the_log_decides() {
    let mut m = seeded();
    let mut l = PartitionLeader::new(LeaderEpoch(1));
    let young = info(100, Level::TwoPl, 200);
    let old = info(101, Level::TwoPl, 100);
    let p = part(&young, Offset(0), &[], &[("x", "7")]);
    assert_eq!(l.commit(Time(0), &m, &young, false, &p), Answer::Ready(Decision::Append));
    // Appending: the older reader waits instead of wounding.
    assert_eq!(read(&mut l, &m, &old, "x"), Answer::Wait);
    assert!(matches!(append(&mut l, &mut m, &p), Outcome::Committed { .. }));
    assert!(l.take_wakes().contains(&old.txn));
    assert_eq!(value(&read(&mut l, &m, &old, "x")), Some(k("7")));
}

/// Simulator seed 12 of `skein-sim --tables` (serializable): a transaction's read-only part
/// on one partition committed at once, another transaction then wrote the key it read, and
/// both transactions' writes committed elsewhere (write skew across partitions). Inside a
/// log transaction the read-only part is appended and held until the marker.
#[test]
fn a_read_only_part_of_a_two_phase_commit_holds_its_reads_until_the_marker() {
    use crate::core::txn_partition::MarkerKind;
    use crate::core::ProducerId;
    for level in [Level::Serializable, Level::TwoPl, Level::Ssi, Level::Snapshot] {
        let mut m = seeded();
        let mut l = PartitionLeader::new(LeaderEpoch(1));
        let reader = info(110, level, 100);
        let writer = info(111, level, 200);
        assert_eq!(value(&read(&mut l, &m, &reader, "x")), Some(k("10")));
        let ro = part(&reader, Offset(1), &[("x", Some(Offset(0)))], &[]);
        assert_eq!(l.commit(Time(0), &m, &reader, true, &ro), Answer::Ready(Decision::Nothing), "alone");
        let mut l = PartitionLeader::new(LeaderEpoch(1));
        assert_eq!(value(&read(&mut l, &m, &reader, "x")), Some(k("10")));
        assert_eq!(l.commit_in_txn(Time(0), &m, &reader, true, &ro), Answer::Ready(Decision::Append), "{level:?}");
        let at = m.applied();
        m.apply_transactional(at, ProducerId(9), b"", &ro.encode()).expect("applies");
        l.applied(reader.txn, m.outcome(reader.txn));
        assert_eq!(m.outcome(reader.txn), Some(&Outcome::Prepared { offset: at }));
        // A writer of the key read: refused while the reader's transaction is undecided.
        let w = part(&writer, Offset(2), &[], &[("x", "11")]);
        assert!(!matches!(l.commit(Time(0), &m, &writer, false, &w), Answer::Ready(_)), "{level:?}");
        let at = m.applied();
        m.apply_marker(at, ProducerId(9), MarkerKind::Commit);
        l.decided(&m);
        assert!(matches!(m.outcome(reader.txn), Some(Outcome::Committed { .. })));
    }
}
