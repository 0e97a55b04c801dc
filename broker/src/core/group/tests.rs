use std::collections::{BTreeMap, BTreeSet};

use skein_client::wire::{
    ErrorCode, GroupHeartbeatRequest, GroupHeartbeatResponse, OffsetCommitPartition, OffsetCommitRequest,
    TopicPartition, TxnOffsetCommitRequest, JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH,
};

use super::*;

fn parts(t: &str) -> Option<u32> {
    match t {
        "t" => Some(12),
        "u" => Some(3),
        _ => None,
    }
}

/// A coordinator and the records it committed, applied at once (a driver whose appends
/// always succeed).
struct Harness {
    c: GroupCoordinator,
    log: Vec<GroupRecord>,
}

impl Harness {
    fn new() -> Harness {
        Harness { c: GroupCoordinator::new(500), log: Vec::new() }
    }

    fn commit_records(&mut self, records: Vec<GroupRecord>) {
        for r in records {
            let (_, value) = r.encode();
            let at = self.c.applied();
            self.c.apply(at, b"", &value).expect("decodes");
            self.log.push(r);
        }
        self.check_owners();
    }

    fn hb(&mut self, now: u64, req: GroupHeartbeatRequest) -> Result<GroupHeartbeatResponse, (ErrorCode, String)> {
        let out = self.c.heartbeat(Time(now * 1000), &req, &parts)?;
        self.commit_records(out.records);
        Ok(out.reply)
    }

    fn check_owners(&self) {
        for ((g, p), owners) in self.c.owners() {
            assert!(owners.len() <= 1, "{g} {p:?} owned by {owners:?}");
        }
    }
}

fn join(instance: &str, topics: &[&str]) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        group: "g".into(),
        member_id: String::new(),
        member_epoch: JOIN_EPOCH,
        instance_id: instance.into(),
        client_id: "c".into(),
        host: "127.0.0.1".into(),
        rack: String::new(),
        session_timeout_ms: 3_000,
        assignor: String::new(),
        topics: Some(topics.iter().map(|t| t.to_string()).collect()),
        owned: None,
    }
}

fn beat(r: &GroupHeartbeatResponse, owned: &BTreeSet<Tp>) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        member_id: r.member_id.clone(),
        member_epoch: r.member_epoch,
        topics: None,
        owned: Some(owned.iter().map(|(t, p)| TopicPartition { topic: t.clone(), partition: *p }).collect()),
        ..join("", &[])
    }
}

fn set(r: &GroupHeartbeatResponse) -> BTreeSet<Tp> {
    r.assignment.iter().map(|p| (p.topic.clone(), p.partition)).collect()
}

/// A simulated client: owns what its last answer said, heartbeats with it.
struct Client {
    last: GroupHeartbeatResponse,
    owned: BTreeSet<Tp>,
    revoked: usize,
}

impl Client {
    fn join(h: &mut Harness, now: u64, instance: &str) -> Client {
        let last = h.hb(now, join(instance, &["t"])).expect("joins");
        let owned = set(&last);
        Client { last, owned, revoked: 0 }
    }

    fn beat(&mut self, h: &mut Harness, now: u64) {
        let r = h.hb(now, beat(&self.last, &self.owned)).expect("heartbeat");
        let new = set(&r);
        self.revoked += self.owned.difference(&new).count();
        self.owned = new;
        self.last = r;
    }
}

fn converge(h: &mut Harness, now: u64, clients: &mut [&mut Client]) {
    for _ in 0..6 {
        for c in clients.iter_mut() {
            c.beat(h, now);
        }
    }
}

#[test]
fn three_members_share_twelve_partitions_and_converge_to_stable() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "");
    assert_eq!(a.owned.len(), 12, "a lone member owns everything");
    let mut b = Client::join(&mut h, 1, "");
    let mut c = Client::join(&mut h, 2, "");
    converge(&mut h, 3, &mut [&mut a, &mut b, &mut c]);
    assert_eq!([a.owned.len(), b.owned.len(), c.owned.len()], [4, 4, 4]);
    let all: BTreeSet<Tp> = a.owned.iter().chain(&b.owned).chain(&c.owned).cloned().collect();
    assert_eq!(all.len(), 12);
    let d = h.c.describe("g").expect("described");
    assert_eq!(d.state, "Stable");
    assert_eq!(d.generation, 3);
    assert!(d.members.iter().all(|m| m.member_epoch == 3));
}

#[test]
fn a_join_revokes_only_the_partitions_that_move() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "");
    let mut b = Client::join(&mut h, 0, "");
    let mut c = Client::join(&mut h, 0, "");
    converge(&mut h, 1, &mut [&mut a, &mut b, &mut c]);
    let before: Vec<BTreeSet<Tp>> = vec![a.owned.clone(), b.owned.clone(), c.owned.clone()];
    let revoked_before = a.revoked + b.revoked + c.revoked;
    let mut d = Client::join(&mut h, 2, "");
    assert!(d.owned.is_empty(), "nothing is free until others revoke");
    converge(&mut h, 3, &mut [&mut a, &mut b, &mut c, &mut d]);
    assert_eq!([a.owned.len(), b.owned.len(), c.owned.len(), d.owned.len()], [3, 3, 3, 3]);
    assert_eq!(a.revoked + b.revoked + c.revoked - revoked_before, 3, "one partition moves from each");
    for (now, was) in [&a.owned, &b.owned, &c.owned].into_iter().zip(&before) {
        assert!(now.is_subset(was), "kept partitions are a subset: {now:?} of {was:?}");
    }
}

#[test]
fn an_expired_session_frees_its_partitions_for_the_others() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "");
    let mut b = Client::join(&mut h, 0, "");
    let mut c = Client::join(&mut h, 0, "");
    converge(&mut h, 1, &mut [&mut a, &mut b, &mut c]);
    // c goes silent after 1 s (times below in ms); a and b keep heartbeating.
    converge(&mut h, 1_000, &mut [&mut a, &mut b, &mut c]);
    for now in [2_000, 3_000] {
        a.beat(&mut h, now);
        b.beat(&mut h, now);
    }
    let gone = h.c.expire(Time(3_500_000), &parts);
    assert!(gone.is_empty(), "c's session (3 s from 1 s) ends at 4 s");
    let gone = h.c.expire(Time(4_000_000), &parts);
    assert_eq!(gone.len(), 1);
    h.commit_records(gone);
    converge(&mut h, 4_000, &mut [&mut a, &mut b]);
    assert_eq!([a.owned.len(), b.owned.len()], [6, 6]);
    let r = h.c.heartbeat(Time(4_000_000), &beat(&c.last, &c.owned), &parts);
    assert_eq!(r.map(|_| ()).unwrap_err().0, ErrorCode::UNKNOWN_MEMBER_ID, "the zombie is fenced");
}

#[test]
fn a_static_member_that_comes_back_gets_its_partitions_without_a_rebalance() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "i-a");
    let mut b = Client::join(&mut h, 0, "i-b");
    converge(&mut h, 1, &mut [&mut a, &mut b]);
    let epoch = h.c.describe("g").expect("group").generation;
    let mut leave = beat(&a.last, &a.owned);
    leave.member_epoch = STATIC_LEAVE_EPOCH;
    h.hb(2, leave).expect("static leave");
    let back = h.hb(3, join("i-a", &["t"])).expect("rejoins");
    assert_eq!(set(&back), a.owned, "same partitions");
    assert_ne!(back.member_id, a.last.member_id, "a new member id fences the old process");
    assert_eq!(h.c.describe("g").expect("group").generation, epoch, "no rebalance");
    // The old process's commit is refused.
    let commit = OffsetCommitRequest {
        group: "g".into(),
        member_id: a.last.member_id.clone(),
        member_epoch: a.last.member_epoch,
        offsets: vec![],
    };
    assert_eq!(h.c.commit(&commit).map(|_| ()).unwrap_err().0, ErrorCode::UNKNOWN_MEMBER_ID);
}

#[test]
fn commits_are_refused_for_stale_epochs_unknown_members_and_partitions_not_owned() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "");
    let mut b = Client::join(&mut h, 0, "");
    converge(&mut h, 1, &mut [&mut a, &mut b]);
    let mine = a.owned.iter().next().cloned().expect("a owns some");
    let theirs = b.owned.iter().next().cloned().expect("b owns some");
    let commit = |member: &GroupHeartbeatResponse, epoch: i32, p: &Tp| OffsetCommitRequest {
        group: "g".into(),
        member_id: member.member_id.clone(),
        member_epoch: epoch,
        offsets: vec![OffsetCommitPartition { topic: p.0.clone(), partition: p.1, offset: 7, metadata: "m".into() }],
    };
    let ok = h.c.commit(&commit(&a.last, a.last.member_epoch, &mine)).expect("accepted");
    assert_eq!(ok.reply[0].error, ErrorCode::NONE);
    h.commit_records(ok.records);
    let not_owned = h.c.commit(&commit(&a.last, a.last.member_epoch, &theirs)).expect("answered");
    assert_eq!(not_owned.reply[0].error, ErrorCode::PARTITION_NOT_OWNED);
    assert!(not_owned.records.is_empty());
    let future = h.c.commit(&commit(&a.last, a.last.member_epoch + 1, &mine)).map(|_| ()).unwrap_err();
    assert_eq!(future.0, ErrorCode::FENCED_MEMBER_EPOCH, "{}", future.1);
    let mut unknown = commit(&a.last, a.last.member_epoch, &mine);
    unknown.member_id = "nobody".into();
    assert_eq!(h.c.commit(&unknown).map(|_| ()).unwrap_err().0, ErrorCode::UNKNOWN_MEMBER_ID);
    let mut admin = commit(&a.last, -1, &mine);
    admin.member_id.clear();
    assert_eq!(h.c.commit(&admin).map(|_| ()).unwrap_err().0, ErrorCode::GROUP_NOT_EMPTY);
    assert_eq!(h.c.delete("g").map(|_| ()).unwrap_err().0, ErrorCode::GROUP_NOT_EMPTY);
    assert_eq!(h.c.describe("nope").map(|_| ()).unwrap_err().0, ErrorCode::GROUP_ID_NOT_FOUND);
    let fetched = h.c.fetch_offsets("g", None);
    assert_eq!(fetched.len(), 1);
    assert_eq!((fetched[0].offset, fetched[0].metadata.as_str()), (7, "m"));
    // b leaves: a new epoch; once a has moved on twice, its first epoch is stale.
    let mut leave = beat(&b.last, &b.owned);
    leave.member_epoch = LEAVE_EPOCH;
    h.hb(2, leave).expect("leaves");
    converge(&mut h, 3, &mut [&mut a]);
    assert!(a.last.member_epoch >= 3);
    let stale = h.c.commit(&commit(&a.last, 1, &mine)).map(|_| ()).unwrap_err();
    assert_eq!(stale.0, ErrorCode::FENCED_MEMBER_EPOCH, "{}", stale.1);
    let mut leave = beat(&a.last, &a.owned);
    leave.member_epoch = LEAVE_EPOCH;
    h.hb(4, leave).expect("leaves");
    let reset = h.c.commit(&admin).expect("admin commit on an empty group");
    h.commit_records(reset.records);
    let del = h.c.delete("g").expect("deleted");
    h.commit_records(del.records);
    assert!(h.c.list().is_empty());
}

#[test]
fn replaying_the_records_rebuilds_the_same_state() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "");
    let mut b = Client::join(&mut h, 0, "s");
    converge(&mut h, 1, &mut [&mut a, &mut b]);
    let c = h.c.commit(&OffsetCommitRequest {
        group: "g".into(),
        member_id: a.last.member_id.clone(),
        member_epoch: a.last.member_epoch,
        offsets: a
            .owned
            .iter()
            .map(|(t, p)| OffsetCommitPartition {
                topic: t.clone(),
                partition: *p,
                offset: 10,
                metadata: String::new(),
            })
            .collect(),
    });
    h.commit_records(c.expect("commit").records);
    let mut replayed = GroupCoordinator::new(500);
    for (i, r) in h.log.iter().enumerate() {
        replayed.apply(Offset(i as u64), b"", &r.encode().1).expect("decodes");
    }
    assert_eq!(format!("{:?}", replayed.describe("g")), format!("{:?}", h.c.describe("g")));
    assert_eq!(replayed.applied(), Offset(h.log.len() as u64));
    let bad = replayed.apply(Offset(99), b"", b"{not json");
    assert!(bad.is_err(), "a damaged record is an error, not a panic");
}

#[test]
fn bad_input_is_refused_with_a_code() {
    let mut h = Harness::new();
    let mut r = join("", &["t"]);
    r.group.clear();
    assert_eq!(h.hb(0, r).unwrap_err().0, ErrorCode::INVALID_GROUP_ID);
    let mut r = join("", &["t"]);
    r.assignor = "best".into();
    assert_eq!(h.hb(0, r).unwrap_err().0, ErrorCode::UNSUPPORTED_ASSIGNOR);
    let mut r = join("", &["t"]);
    r.session_timeout_ms = 1;
    assert_eq!(h.hb(0, r).unwrap_err().0, ErrorCode::INVALID_REQUEST);
    let mut r = join("", &["t"]);
    r.member_epoch = -7;
    assert_eq!(h.hb(0, r).unwrap_err().0, ErrorCode::INVALID_REQUEST);
    let mut r = join("", &["t"]);
    r.member_epoch = 5;
    r.member_id = "ghost".into();
    assert_eq!(h.hb(0, r).unwrap_err().0, ErrorCode::UNKNOWN_MEMBER_ID);
}

#[test]
fn assignors_spread_partitions() {
    let none = BTreeSet::new();
    let members = vec![
        ("a".to_string(), vec!["t".to_string(), "u".to_string()], none.clone()),
        ("b".to_string(), vec!["t".to_string(), "u".to_string()], none.clone()),
        ("c".to_string(), vec!["u".to_string()], none.clone()),
    ];
    for assignor in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
        let out = assign(assignor, &members, &BTreeMap::new(), &parts);
        let all: Vec<&Tp> = out.values().flatten().collect();
        assert_eq!(all.len(), 15, "{assignor:?}: every partition once");
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 15, "{assignor:?}");
        assert!(out["c"].iter().all(|(t, _)| t == "u"), "{assignor:?}: only subscribed topics");
    }
    let range = assign(Assignor::Range, &members, &BTreeMap::new(), &parts);
    assert_eq!(
        range["a"].iter().filter(|(t, _)| t == "t").map(|(_, p)| *p).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    // Sticky keeps a member's partitions when a member leaves.
    let owned: BTreeSet<Tp> = (0..4).map(|p| ("t".to_string(), p)).collect();
    let two = vec![
        ("a".to_string(), vec!["t".to_string()], owned.clone()),
        ("b".to_string(), vec!["t".to_string()], (4..8).map(|p| ("t".to_string(), p)).collect()),
    ];
    let out = assign(Assignor::Sticky, &two, &BTreeMap::new(), &parts);
    assert!(owned.is_subset(&out["a"]));
    assert_eq!((out["a"].len(), out["b"].len()), (6, 6));
}

#[test]
fn partition_for_is_stable() {
    assert_eq!(partition_for("g", 8), partition_for("g", 8));
    assert!(partition_for("anything", 4) < 4);
    assert_eq!(partition_for("x", 0), 0);
}

#[test]
fn a_snapshot_restores_the_same_state_and_continues_at_its_offset() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "i");
    let mut b = Client::join(&mut h, 0, "");
    converge(&mut h, 1, &mut [&mut a, &mut b]);
    let c = h.c.commit(&OffsetCommitRequest {
        group: "g".into(),
        member_id: a.last.member_id.clone(),
        member_epoch: a.last.member_epoch,
        offsets: vec![OffsetCommitPartition {
            topic: a.owned.iter().next().expect("owned").0.clone(),
            partition: a.owned.iter().next().expect("owned").1,
            offset: 5,
            metadata: "x".into(),
        }],
    });
    h.commit_records(c.expect("commit").records);
    let restored = GroupCoordinator::restore(&h.c.snapshot(), 500).expect("restores");
    assert_eq!(restored.applied(), h.c.applied());
    assert_eq!(format!("{:?}", restored.describe("g")), format!("{:?}", h.c.describe("g")));
    assert!(GroupCoordinator::restore(b"{}", 500).is_err());
    assert!(GroupCoordinator::restore(b"\xff", 500).is_err());
}

/// Partitions of `t` have replicas in rack `r{p % 3}`.
struct Racked;

impl Topology for Racked {
    fn partitions(&self, topic: &str) -> Option<u32> {
        parts(topic)
    }
    fn racks(&self, _topic: &str, partition: u32) -> Vec<String> {
        vec![format!("r{}", partition % 3)]
    }
}

#[test]
fn the_sticky_assignor_prefers_members_in_a_replica_rack_without_losing_balance() {
    let none = BTreeSet::new();
    let members: Vec<(String, Vec<String>, BTreeSet<Tp>)> =
        ["a", "b", "c"].iter().map(|id| (id.to_string(), vec!["t".to_string()], none.clone())).collect();
    let racks: BTreeMap<String, String> =
        [("a", "r0"), ("b", "r1"), ("c", "r2")].iter().map(|(m, r)| (m.to_string(), r.to_string())).collect();
    let out = assign(Assignor::Sticky, &members, &racks, &Racked);
    for (id, rack) in &racks {
        assert_eq!(out[id].len(), 4, "balanced");
        for (_, p) in &out[id] {
            assert_eq!(&format!("r{}", p % 3), rack, "{id} got {p}, whose replicas are elsewhere");
        }
    }
    let blind = assign(Assignor::Sticky, &members, &BTreeMap::new(), &Racked);
    assert!(blind.values().all(|s| s.len() == 4));
}

// Transactional offset commits.

const P: ProducerId = ProducerId(7);
const Q: ProducerId = ProducerId(8);

fn txn_req(member: &str, epoch: i32, offsets: &[(&str, u32, u64)]) -> TxnOffsetCommitRequest {
    TxnOffsetCommitRequest {
        transactional_id: "tx".into(),
        group: "g".into(),
        producer_id: P.0,
        producer_epoch: 0,
        member_id: member.into(),
        member_epoch: epoch,
        partitions: offsets
            .iter()
            .map(|(t, p, o)| OffsetCommitPartition {
                topic: t.to_string(),
                partition: *p,
                offset: *o,
                metadata: String::new(),
            })
            .collect(),
    }
}

fn admin_commit(offsets: &[(&str, u32, u64)]) -> OffsetCommitRequest {
    let t = txn_req("", -1, offsets);
    OffsetCommitRequest { group: t.group, member_id: t.member_id, member_epoch: t.member_epoch, offsets: t.partitions }
}

fn tp(t: &str, p: u32) -> TopicPartition {
    TopicPartition { topic: t.into(), partition: p }
}

impl Harness {
    fn at(&self) -> Offset {
        self.c.applied()
    }

    /// Applies `records` as written inside `producer`'s transaction.
    fn txn_records(&mut self, producer: ProducerId, records: Vec<GroupRecord>) {
        for r in records {
            let (key, value) = r.encode();
            let at = self.at();
            self.c.apply_transactional(at, producer, &key, &value).expect("decodes");
        }
    }

    fn marker(&mut self, producer: ProducerId, kind: MarkerKind) {
        let at = self.at();
        self.c.apply_marker(at, producer, kind);
        assert_eq!(self.c.applied(), Offset(at.0 + 1), "a marker advances applied");
    }

    /// The committed offset of `t`/`p` (-1: none), pending ones ignored.
    fn offset(&self, t: &str, p: u32) -> i64 {
        self.c.fetch_offsets("g", Some(&[tp(t, p)]))[0].offset
    }

    /// What OffsetFetch answers for `t`/`p`: the offset or the refusal's code.
    fn stable(&self, partitions: Option<&[TopicPartition]>) -> Result<Vec<i64>, ErrorCode> {
        self.c.fetch_offsets_stable("g", partitions).map(|o| o.iter().map(|o| o.offset).collect()).map_err(|e| e.0)
    }
}

#[test]
fn transactional_offsets_are_invisible_until_their_producers_commit_marker() {
    let mut h = Harness::new();
    h.commit_records(h.c.commit(&admin_commit(&[("t", 0, 5)])).expect("admin commit").records);
    let out = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 9), ("u", 1, 3)])).expect("accepted");
    assert!(out.reply.iter().all(|r| r.error == ErrorCode::NONE));
    h.marker(P, MarkerKind::Begin);
    h.txn_records(P, out.records);
    assert_eq!((h.offset("t", 0), h.offset("u", 1)), (5, -1), "pending offsets are not committed ones");
    let unstable = Err(ErrorCode::UNSTABLE_OFFSET_COMMIT);
    assert_eq!(h.stable(Some(&[tp("t", 0)])), unstable);
    assert_eq!(h.stable(Some(&[tp("t", 1), tp("u", 1)])), unstable, "one pending partition refuses the request");
    assert_eq!(h.stable(None), unstable, "all partitions of the group");
    assert_eq!(h.stable(Some(&[tp("t", 1)])), Ok(vec![-1]), "other partitions are stable");
    assert_eq!(h.c.fetch_offsets_stable("other", None).map(|o| o.len()), Ok(0), "other groups are stable");
    assert!(ErrorCode::UNSTABLE_OFFSET_COMMIT.is_retriable());
    assert_eq!(h.c.delete("g").map(|_| ()).unwrap_err().0, ErrorCode::GROUP_NOT_EMPTY, "pending offsets pin the group");
    h.marker(Q, MarkerKind::Commit);
    h.marker(Q, MarkerKind::Abort);
    assert_eq!(h.stable(Some(&[tp("t", 0)])), unstable, "another producer's markers decide nothing of P's");
    h.marker(P, MarkerKind::Commit);
    assert_eq!(h.stable(Some(&[tp("t", 0), tp("u", 1)])), Ok(vec![9, 3]));
    h.marker(P, MarkerKind::Commit);
    assert_eq!(h.stable(None), Ok(vec![9, 3]), "a second marker finds nothing pending");
}

#[test]
fn an_abort_marker_drops_the_producers_pending_offsets() {
    let mut h = Harness::new();
    h.commit_records(h.c.commit(&admin_commit(&[("t", 0, 5)])).expect("admin commit").records);
    let p = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 9)])).expect("accepted");
    h.txn_records(P, p.records);
    let mut q = txn_req("", -1, &[("t", 1, 4)]);
    q.producer_id = Q.0;
    let q = h.c.txn_commit(&q).expect("accepted");
    h.txn_records(Q, q.records);
    h.marker(P, MarkerKind::Abort);
    assert_eq!(h.stable(Some(&[tp("t", 0)])), Ok(vec![5]), "P's offset is gone");
    assert_eq!(h.stable(None), Err(ErrorCode::UNSTABLE_OFFSET_COMMIT), "Q's is still pending");
    h.marker(Q, MarkerKind::Commit);
    assert_eq!(h.stable(Some(&[tp("t", 0), tp("t", 1)])), Ok(vec![5, 4]));
    h.marker(P, MarkerKind::Commit);
    assert_eq!(h.offset("t", 0), 5, "a commit marker after the abort brings nothing back");
}

#[test]
fn a_committed_offset_written_after_a_pending_one_supersedes_it() {
    let mut h = Harness::new();
    let p = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 9), ("t", 1, 9)])).expect("accepted");
    h.txn_records(P, p.records);
    h.commit_records(h.c.commit(&admin_commit(&[("t", 0, 20)])).expect("admin commit").records);
    assert_eq!(h.stable(Some(&[tp("t", 0)])), Ok(vec![20]), "P's older offset can never take effect");
    assert_eq!(h.stable(Some(&[tp("t", 1)])), Err(ErrorCode::UNSTABLE_OFFSET_COMMIT));
    // Q's transaction writes after P's and commits first: P's commit must not undo it.
    let mut q = txn_req("", -1, &[("t", 1, 30)]);
    q.producer_id = Q.0;
    let q = h.c.txn_commit(&q).expect("accepted");
    h.txn_records(Q, q.records);
    h.marker(Q, MarkerKind::Commit);
    assert_eq!(h.stable(None), Ok(vec![20, 30]));
    h.marker(P, MarkerKind::Commit);
    assert_eq!(h.stable(None), Ok(vec![20, 30]), "the older transactional offsets lost");
    // A later write inside the same transaction replaces the earlier one.
    let first = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 40)])).expect("accepted");
    let second = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 41)])).expect("accepted");
    h.txn_records(P, first.records);
    h.txn_records(P, second.records);
    h.marker(P, MarkerKind::Commit);
    assert_eq!(h.offset("t", 0), 41);
}

#[test]
fn pending_offsets_survive_a_snapshot_and_old_snapshots_still_restore() {
    let mut h = Harness::new();
    h.commit_records(h.c.commit(&admin_commit(&[("t", 0, 5)])).expect("admin commit").records);
    let v1 = h.c.snapshot();
    let p = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 9)])).expect("accepted");
    h.txn_records(P, p.records);
    let mut restored = GroupCoordinator::restore(&h.c.snapshot(), 500).expect("restores");
    assert_eq!(restored.applied(), h.c.applied());
    assert_eq!(restored.fetch_offsets_stable("g", None).map_err(|e| e.0), Err(ErrorCode::UNSTABLE_OFFSET_COMMIT));
    restored.apply_marker(restored.applied(), P, MarkerKind::Commit);
    assert_eq!(restored.fetch_offsets_stable("g", None).expect("stable")[0].offset, 9);
    // A version 1 snapshot (no pending offsets) restores; an unknown version does not.
    let mut old: serde_json::Value = serde_json::from_slice(&v1).expect("json");
    old["version"] = 1.into();
    old.as_object_mut().expect("object").remove("pending");
    let old = GroupCoordinator::restore(&serde_json::to_vec(&old).expect("json"), 500).expect("version 1 restores");
    assert_eq!(old.fetch_offsets_stable("g", None).expect("stable")[0].offset, 5);
    let mut future: serde_json::Value = serde_json::from_slice(&v1).expect("json");
    future["version"] = 3.into();
    assert!(GroupCoordinator::restore(&serde_json::to_vec(&future).expect("json"), 500).is_err());
}

#[test]
fn transactional_commits_follow_the_plain_commit_rules() {
    let mut h = Harness::new();
    let mut a = Client::join(&mut h, 0, "");
    let mut b = Client::join(&mut h, 0, "");
    converge(&mut h, 1, &mut [&mut a, &mut b]);
    let mine = a.owned.iter().next().cloned().expect("a owns some");
    let theirs = b.owned.iter().next().cloned().expect("b owns some");
    let req = |member: &str, epoch: i32, p: &Tp| txn_req(member, epoch, &[(p.0.as_str(), p.1, 7)]);
    let id = a.last.member_id.clone();
    let epoch = a.last.member_epoch;
    let ok = h.c.txn_commit(&req(&id, epoch, &mine)).expect("accepted");
    assert_eq!((ok.reply[0].error, ok.records.len()), (ErrorCode::NONE, 1));
    let not_owned = h.c.txn_commit(&req(&id, epoch, &theirs)).expect("answered");
    assert_eq!((not_owned.reply[0].error, not_owned.records.len()), (ErrorCode::PARTITION_NOT_OWNED, 0));
    let code = |r: Result<Outcome<Vec<OffsetCommitPartitionResponse>>, Refusal>| r.map(|_| ()).unwrap_err().0;
    assert_eq!(code(h.c.txn_commit(&req(&id, epoch + 1, &mine))), ErrorCode::FENCED_MEMBER_EPOCH);
    assert_eq!(code(h.c.txn_commit(&req("nobody", epoch, &mine))), ErrorCode::UNKNOWN_MEMBER_ID);
    assert_eq!(
        code(h.c.txn_commit(&req("", -1, &mine))),
        ErrorCode::GROUP_NOT_EMPTY,
        "not a member: empty groups only"
    );
    assert_eq!(code(h.c.txn_commit(&req("", 3, &mine))), ErrorCode::UNKNOWN_MEMBER_ID);
    let mut no_producer = req(&id, epoch, &mine);
    no_producer.producer_id = -1;
    assert_eq!(code(h.c.txn_commit(&no_producer)), ErrorCode::INVALID_REQUEST);
    let mut no_txn = req(&id, epoch, &mine);
    no_txn.transactional_id.clear();
    assert_eq!(code(h.c.txn_commit(&no_txn)), ErrorCode::INVALID_REQUEST);
    let mut no_group = req(&id, epoch, &mine);
    no_group.group.clear();
    assert_eq!(code(h.c.txn_commit(&no_group)), ErrorCode::INVALID_GROUP_ID);
    // Once everyone left, a non-member may commit again.
    for c in [&a, &b] {
        let mut leave = beat(&c.last, &c.owned);
        leave.member_epoch = LEAVE_EPOCH;
        h.hb(2, leave).expect("leaves");
    }
    assert_eq!(h.c.txn_commit(&req("", -1, &mine)).expect("accepted").reply[0].error, ErrorCode::NONE);
}

#[test]
fn only_offsets_are_taken_inside_a_transaction_and_deleting_a_group_drops_its_pending_offsets() {
    let mut h = Harness::new();
    let (key, value) = GroupRecord::GroupDeleted { group: "g".into() }.encode();
    assert!(h.c.apply_transactional(Offset(0), P, &key, &value).is_err());
    assert!(h.c.apply_transactional(Offset(1), P, &key, b"{oops").is_err());
    assert_eq!(h.c.applied(), Offset(2), "a skipped record is still passed");
    let p = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 9)])).expect("accepted");
    h.txn_records(P, p.records);
    let deleted = GroupRecord::GroupDeleted { group: "g".into() };
    let at = h.at();
    h.c.apply(at, b"g", &deleted.encode().1).expect("decodes");
    assert_eq!(h.stable(None), Ok(vec![]), "nothing pending for a deleted group");
    h.marker(P, MarkerKind::Commit);
    assert!(h.c.list().is_empty(), "the commit marker does not bring the group back");
}

#[test]
fn feeding_batches_applies_transactional_offsets_at_the_marker() {
    use skein_log::batch::{Attributes, BatchBuilder};
    use skein_log::types::{ProducerEpoch, Sequence, Timestamp};

    use crate::core::machine::feed;
    use crate::core::txn_partition::marker_batch;

    let h = Harness::new();
    let out = h.c.txn_commit(&txn_req("", -1, &[("t", 0, 9), ("t", 1, 8)])).expect("accepted");
    let mut log = Vec::new();
    let mut next = 0u64;
    let mut push = |mut batch: skein_log::batch::RecordBatch<Vec<u8>>, log: &mut Vec<u8>| {
        batch.set_base_offset(Offset(next));
        next = batch.header().next_offset().0;
        log.extend_from_slice(batch.as_bytes());
    };
    push(marker_batch(P, ProducerEpoch(0), MarkerKind::Begin, Timestamp(0)), &mut log);
    let mut b = BatchBuilder::new()
        .producer(P, ProducerEpoch(0), Sequence::NONE)
        .attributes(Attributes::default().with_transactional(true));
    for r in &out.records {
        let (key, value) = r.encode();
        b.push(Some(&key), &value, &[], Timestamp(0));
    }
    push(b.build(), &mut log);
    let before_commit = log.len();
    push(marker_batch(P, ProducerEpoch(0), MarkerKind::Commit, Timestamp(0)), &mut log);
    let mut c = GroupCoordinator::new(500);
    let fed = feed(&mut c, &log[..before_commit], Offset(0)).expect("parses");
    assert_eq!((fed.applied, fed.skipped, c.applied()), (3, 0, Offset(3)));
    assert_eq!(c.fetch_offsets_stable("g", None).map_err(|e| e.0), Err(ErrorCode::UNSTABLE_OFFSET_COMMIT));
    let from = c.applied();
    let fed = feed(&mut c, &log, from).expect("parses");
    assert_eq!((fed.applied, c.applied()), (1, Offset(4)));
    let offsets: Vec<i64> = c.fetch_offsets_stable("g", None).expect("stable").iter().map(|o| o.offset).collect();
    assert_eq!(offsets, vec![9, 8]);
}
