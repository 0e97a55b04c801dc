use std::collections::{BTreeMap, BTreeSet};

use skein_client::wire::{
    ErrorCode, GroupHeartbeatRequest, GroupHeartbeatResponse, OffsetCommitPartition, OffsetCommitRequest,
    TopicPartition, JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH,
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
            let at = Offset(self.log.len() as u64);
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
