use super::*;

fn tp(t: &str, p: u32) -> Tp {
    (t.to_owned(), p)
}

/// Applies a record as the driver does after the log committed it.
fn write(c: &mut TxnCoordinator, r: TxnRecord) {
    let (key, value) = r.encode();
    let at = c.applied();
    c.apply(at, &key, &value).expect("decodes");
}

fn complete(c: &mut TxnCoordinator, id: &str) -> Completion {
    let done = c.completion(id).expect("prepared");
    write(c, done.record.clone());
    done
}

fn init(c: &mut TxnCoordinator, id: &str) -> (i64, i16) {
    match c.init(id, 0, || Some(42)).expect("init") {
        InitStep::Done(r) => {
            let out = (r.meta.producer_id, r.meta.epoch);
            write(c, r);
            out
        }
        InitStep::FinishFirst(r) => {
            if let Some(r) = r {
                write(c, r);
            }
            complete(c, id);
            init(c, id)
        }
    }
}

#[test]
fn every_transaction_runs_at_its_own_epoch_and_a_late_end_cannot_touch_the_next() {
    let mut c = TxnCoordinator::new(false);
    let (pid, e0) = init(&mut c, "t");
    assert_eq!((pid, e0), (42, 0));
    let r = c.add_partitions("t", pid, e0, &[tp("a", 0), tp("b", 1)], 1000).expect("add").expect("new");
    write(&mut c, r);
    assert_eq!(c.get("t").map(|m| m.state), Some(TxnState::Ongoing));
    assert_eq!(c.add_partitions("t", pid, e0, &[tp("a", 0)], 1000).expect("again"), None, "nothing new");
    let EndStep::Write(r) = c.end("t", pid, e0, true).expect("end") else { panic!("a prepare") };
    write(&mut c, r);
    assert_eq!(c.end("t", pid, e0, true), Ok(EndStep::Complete), "a retry while deciding");
    let done = complete(&mut c, "t");
    assert_eq!(
        (done.kind, done.epoch, done.partitions.len()),
        (MarkerKind::Commit, 0, 2),
        "markers at the txn's epoch"
    );
    let e1 = c.get("t").expect("t").epoch;
    assert_eq!(e1, 1, "completion bumps the epoch");
    assert_eq!(c.end("t", pid, e0, true), Ok(EndStep::Done(pid, e1)), "a retried end after completion");
    assert_eq!(c.end("t", pid, e0, false).map_err(|e| e.0), Err(ErrorCode::PRODUCER_FENCED), "a late abort of it");
    let r = c.add_partitions("t", pid, e1, &[tp("a", 0)], 2000).expect("next").expect("new");
    write(&mut c, r);
    assert_eq!(c.add_partitions("t", pid, e0, &[tp("a", 0)], 2000).map_err(|e| e.0), Err(ErrorCode::PRODUCER_FENCED));
    assert_eq!(c.end("t", pid, e0, true).map_err(|e| e.0), Err(ErrorCode::PRODUCER_FENCED), "the late end is fenced");
    assert_eq!(c.get("t").map(|m| m.state), Some(TxnState::Ongoing), "the next transaction is untouched");
}

#[test]
fn a_new_instance_aborts_the_open_transaction_and_fences_the_old_one() {
    let mut c = TxnCoordinator::new(false);
    let (pid, e0) = init(&mut c, "t");
    let r = c.add_partitions("t", pid, e0, &[tp("a", 0)], 5).expect("add").expect("new");
    write(&mut c, r);
    let step = c.init("t", 0, || Some(99)).expect("init");
    let InitStep::FinishFirst(Some(r)) = step else { panic!("abort first: {step:?}") };
    assert_eq!(r.meta.state, TxnState::PrepareAbort);
    write(&mut c, r);
    let done = complete(&mut c, "t");
    assert_eq!((done.kind, done.epoch), (MarkerKind::Abort, e0));
    let (pid2, e2) = init(&mut c, "t");
    assert_eq!(pid2, pid, "the id keeps its producer id");
    assert!(e2 > e0 + 1, "the new instance is past the aborted transaction's bumped epoch");
    assert_eq!(c.end("t", pid, e0, true).map_err(|e| e.0), Err(ErrorCode::PRODUCER_FENCED));
    assert_eq!(c.add_partitions("t", pid, e0, &[tp("a", 0)], 9).map_err(|e| e.0), Err(ErrorCode::PRODUCER_FENCED));
}

#[test]
fn a_timed_out_transaction_is_aborted_and_its_commit_refused() {
    let mut c = TxnCoordinator::new(false);
    let (pid, e0) = c
        .init("t", 1000, || Some(1))
        .map(|s| match s {
            InitStep::Done(r) => {
                let out = (r.meta.producer_id, r.meta.epoch);
                write(&mut c, r);
                out
            }
            s => panic!("{s:?}"),
        })
        .expect("init");
    let r = c.add_partitions("t", pid, e0, &[tp("a", 0)], 5).expect("add").expect("new");
    write(&mut c, r);
    c.start_timers(Time(0));
    assert!(c.expired(Time(999_000)).is_empty());
    assert_eq!(c.expired(Time(1_000_000)), vec!["t".to_owned()]);
    let r = c.abort("t", "timed out").expect("abort").expect("open");
    write(&mut c, r);
    complete(&mut c, "t");
    assert!(c.expired(Time(5_000_000)).is_empty(), "no timer for a finished transaction");
    let refused = c.end("t", pid, e0, true).expect_err("fenced");
    assert_eq!(refused.0, ErrorCode::PRODUCER_FENCED);
    assert!(refused.1.contains("timed out"), "{}", refused.1);
    assert_eq!(c.end("t", pid, e0, false), Ok(EndStep::Done(pid, e0 + 1)), "its own abort is answered");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let mut c = TxnCoordinator::new(false);
    assert_eq!(c.init("", 0, || Some(1)).map_err(|e| e.0), Err(ErrorCode::INVALID_REQUEST));
    assert_eq!(
        c.init("t", MAX_TIMEOUT_MS + 1, || Some(1)).map_err(|e| e.0),
        Err(ErrorCode::INVALID_TRANSACTION_TIMEOUT)
    );
    assert_eq!(c.end("t", 1, 0, true).map_err(|e| e.0), Err(ErrorCode::INVALID_PRODUCER_ID_MAPPING));
    let (pid, e) = init(&mut c, "t");
    assert_eq!(c.end("t", pid + 1, e, true).map_err(|e| e.0), Err(ErrorCode::INVALID_PRODUCER_ID_MAPPING));
    assert_eq!(c.end("t", pid, e + 5, true).map_err(|e| e.0), Err(ErrorCode::PRODUCER_FENCED));
    assert_eq!(c.abort("nope", "x").map_err(|e| e.0), Err(ErrorCode::TRANSACTIONAL_ID_NOT_FOUND));
    assert!(c.apply(c.applied(), b"t", b"{not json").is_err());
}

#[test]
fn an_empty_transaction_ends_with_a_new_epoch_and_snapshots_restore() {
    let mut c = TxnCoordinator::new(false);
    let (pid, e0) = init(&mut c, "t");
    let EndStep::Write(r) = c.end("t", pid, e0, true).expect("end") else { panic!() };
    assert_eq!((r.meta.state, r.meta.epoch), (TxnState::CompleteCommit, e0 + 1));
    write(&mut c, r);
    let back = TxnCoordinator::restore(&c.snapshot(), false).expect("restores");
    assert_eq!(back.get("t"), c.get("t"));
    assert_eq!(back.applied(), c.applied());
    assert_eq!(back.list(0).len(), 1);
}

#[test]
fn the_planted_bug_keeps_the_epoch_across_transactions() {
    let mut c = TxnCoordinator::new(true);
    let (pid, e0) = init(&mut c, "t");
    let r = c.add_partitions("t", pid, e0, &[tp("a", 0)], 5).expect("add").expect("new");
    write(&mut c, r);
    let EndStep::Write(r) = c.end("t", pid, e0, true).expect("end") else { panic!() };
    write(&mut c, r);
    complete(&mut c, "t");
    assert_eq!(c.get("t").expect("t").epoch, e0, "no bump");
}
