//! Consumer groups against real broker processes, at the wire level: the coordinator's
//! incremental assignment, fencing and refusals, committed offsets surviving a kill -9 of a
//! single broker and of the coordinator of a three-broker cluster.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{wait_for, Cluster};
use common::{block_on, Broker};
use skein_client::conn::Connection;
use skein_client::wire::{
    ApiKey, DescribeGroupRequest, DescribeGroupResponse, ErrorCode, FindCoordinatorRequest, FindCoordinatorResponse,
    GroupHeartbeatRequest, GroupHeartbeatResponse, ListGroupsRequest, ListGroupsResponse, OffsetCommitPartition,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, TopicPartition, JOIN_EPOCH,
};
use skein_client::Client;

async fn conn(addr: &str) -> Connection {
    Connection::connect(addr, "groups-test", Duration::from_secs(5)).await.expect("connect")
}

/// The coordinator's address for `group`, asking `addr` until it names one.
async fn coordinator(addrs: &[String], group: &str) -> String {
    wait_for("a coordinator", Duration::from_secs(15), async || {
        for a in addrs {
            let Ok(c) = Connection::connect(a, "groups-test", Duration::from_secs(1)).await else { continue };
            let r: Result<FindCoordinatorResponse, _> = c
                .call(
                    ApiKey::FindCoordinator,
                    &FindCoordinatorRequest { group: group.into(), key_type: skein_client::wire::GROUP_KEY },
                )
                .await;
            if let Some(r) = r.ok().filter(|r| r.error == ErrorCode::NONE) {
                return Some(format!("{}:{}", r.host, r.port));
            }
        }
        None
    })
    .await
}

fn join(group: &str) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        group: group.into(),
        member_id: String::new(),
        member_epoch: JOIN_EPOCH,
        instance_id: String::new(),
        client_id: "groups-test".into(),
        host: "127.0.0.1".into(),
        rack: String::new(),
        session_timeout_ms: 3_000,
        assignor: "sticky".into(),
        topics: Some(vec!["t".into()]),
        owned: None,
    }
}

fn beat(last: &GroupHeartbeatResponse, group: &str, owned: &[TopicPartition]) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        member_id: last.member_id.clone(),
        member_epoch: last.member_epoch,
        topics: None,
        owned: Some(owned.to_vec()),
        ..join(group)
    }
}

/// Sends a heartbeat, retrying while the coordinator loads.
async fn heartbeat(c: &Connection, req: &GroupHeartbeatRequest) -> GroupHeartbeatResponse {
    for _ in 0..100 {
        let r: GroupHeartbeatResponse = c.call(ApiKey::GroupHeartbeat, req).await.expect("heartbeat answered");
        // A coordinator just named may not have taken up its partition yet.
        if !matches!(r.error, ErrorCode::COORDINATOR_LOAD_IN_PROGRESS | ErrorCode::NOT_COORDINATOR) {
            return r;
        }
        compio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coordinator never loaded");
}

fn commit(last: &GroupHeartbeatResponse, group: &str, p: &TopicPartition, offset: u64) -> OffsetCommitRequest {
    OffsetCommitRequest {
        group: group.into(),
        member_id: last.member_id.clone(),
        member_epoch: last.member_epoch,
        offsets: vec![OffsetCommitPartition {
            topic: p.topic.clone(),
            partition: p.partition,
            offset,
            metadata: "m".into(),
        }],
    }
}

async fn committed(c: &Connection, group: &str) -> Vec<(u32, i64)> {
    let r: OffsetFetchResponse = c
        .call(ApiKey::OffsetFetch, &OffsetFetchRequest { group: group.into(), partitions: None })
        .await
        .expect("offset fetch");
    assert_eq!(r.error, ErrorCode::NONE, "{}", r.message);
    r.offsets.iter().map(|o| (o.partition, o.offset)).collect()
}

#[test]
fn two_members_share_partitions_incrementally_and_commits_survive_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &["--offsets-partitions", "2"]);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("t", 4, 1, &[]).await.expect("create t");
        let at = coordinator(std::slice::from_ref(&broker.addr), "g").await;
        let c = conn(&at).await;
        let a1 = heartbeat(&c, &join("g")).await;
        assert_eq!(a1.error, ErrorCode::NONE, "{}", a1.message);
        assert_eq!(a1.assignment.len(), 4, "a lone member owns every partition");
        let b1 = heartbeat(&c, &join("g")).await;
        assert!(b1.assignment.is_empty(), "nothing is free until a revokes");
        // a is asked to give up two partitions and keeps the other two.
        let a2 = heartbeat(&c, &beat(&a1, "g", &a1.assignment)).await;
        assert_eq!(a2.assignment.len(), 2, "{a2:?}");
        let kept: BTreeSet<u32> = a2.assignment.iter().map(|p| p.partition).collect();
        // Before acknowledging, a may still commit what it is revoking; b gets nothing yet.
        let revoking = a1.assignment.iter().find(|p| !kept.contains(&p.partition)).expect("one revoked").clone();
        let r: OffsetCommitResponse =
            c.call(ApiKey::OffsetCommit, &commit(&a2, "g", &revoking, 11)).await.expect("commit");
        assert_eq!((r.error, r.partitions[0].error), (ErrorCode::NONE, ErrorCode::NONE), "{}", r.message);
        let b2 = heartbeat(&c, &beat(&b1, "g", &[])).await;
        assert!(b2.assignment.is_empty(), "still owned by a");
        let a3 = heartbeat(&c, &beat(&a2, "g", &a2.assignment)).await;
        assert_eq!(a3.assignment, a2.assignment, "kept partitions were never revoked");
        let b3 = heartbeat(&c, &beat(&b2, "g", &[])).await;
        assert_eq!(b3.assignment.len(), 2);
        assert!(b3.assignment.iter().all(|p| !kept.contains(&p.partition)));

        // Refusals, each with its code.
        let mine = &a3.assignment[0];
        let theirs = &b3.assignment[0];
        let ok: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, &commit(&a3, "g", mine, 42)).await.expect("commit");
        assert_eq!(ok.partitions[0].error, ErrorCode::NONE);
        let not_owned: OffsetCommitResponse =
            c.call(ApiKey::OffsetCommit, &commit(&a3, "g", theirs, 1)).await.expect("commit");
        assert_eq!(not_owned.partitions[0].error, ErrorCode::PARTITION_NOT_OWNED);
        let mut stale = commit(&a3, "g", mine, 1);
        stale.member_epoch += 10;
        let stale: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, &stale).await.expect("commit");
        assert_eq!(stale.error, ErrorCode::FENCED_MEMBER_EPOCH, "{}", stale.message);
        let mut unknown = commit(&a3, "g", mine, 1);
        unknown.member_id = "zombie".into();
        let unknown: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, &unknown).await.expect("commit");
        assert_eq!(unknown.error, ErrorCode::UNKNOWN_MEMBER_ID);
        let mut admin = commit(&a3, "g", mine, 0);
        (admin.member_id, admin.member_epoch) = (String::new(), -1);
        let admin: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, &admin).await.expect("commit");
        assert_eq!(admin.error, ErrorCode::GROUP_NOT_EMPTY, "a reset of an active group is refused");
        let nope: DescribeGroupResponse =
            c.call(ApiKey::DescribeGroup, &DescribeGroupRequest { group: "nope".into() }).await.expect("describe");
        assert_eq!(nope.error, ErrorCode::GROUP_ID_NOT_FOUND);
        let d: DescribeGroupResponse =
            c.call(ApiKey::DescribeGroup, &DescribeGroupRequest { group: "g".into() }).await.expect("describe");
        assert_eq!((d.state.as_str(), d.members.len(), d.protocol.as_str()), ("Stable", 2, "sticky"));
        let listed: ListGroupsResponse = c.call(ApiKey::ListGroups, &ListGroupsRequest {}).await.expect("list");
        assert_eq!(listed.groups.iter().map(|g| g.group.as_str()).collect::<Vec<_>>(), vec!["g"]);
        let before = committed(&c, "g").await;
        assert!(before.contains(&(mine.partition, 42)) && before.contains(&(revoking.partition, 11)), "{before:?}");
        before
    });
    // Acknowledged commits survive a kill -9 and a restart (replayed from the offsets topic).
    broker.kill9();
    broker.restart();
    block_on(async {
        let at = coordinator(std::slice::from_ref(&broker.addr), "g").await;
        let c = conn(&at).await;
        let after = wait_for("the coordinator to load", Duration::from_secs(10), async || {
            let r: OffsetFetchResponse =
                c.call(ApiKey::OffsetFetch, &OffsetFetchRequest { group: "g".into(), partitions: None }).await.ok()?;
            (r.error == ErrorCode::NONE).then(|| r.offsets.iter().map(|o| (o.partition, o.offset)).collect::<Vec<_>>())
        })
        .await;
        assert_eq!(after.len(), 2, "{after:?}");
        let d: DescribeGroupResponse =
            c.call(ApiKey::DescribeGroup, &DescribeGroupRequest { group: "g".into() }).await.expect("describe");
        assert_eq!(d.members.len(), 2, "members are part of the logged state");
        // Nobody heartbeats now: both sessions (3 s from the load) end and the group empties.
        wait_for("the sessions to expire", Duration::from_secs(10), async || {
            let d: DescribeGroupResponse =
                c.call(ApiKey::DescribeGroup, &DescribeGroupRequest { group: "g".into() }).await.ok()?;
            (d.state == "Empty").then_some(())
        })
        .await;
    });
}

#[test]
fn commits_survive_a_kill_of_the_coordinator_and_members_rejoin_the_new_one() {
    let mut c = Cluster::start(111, 19611);
    let addrs = c.addrs.clone();
    let (at, member, offsets) = block_on(async {
        let client = Client::connect(&addrs.join(",")).await.expect("connect");
        client.create_topic("t", 6, 3, &[]).await.expect("create t");
        let at = coordinator(&addrs, "g").await;
        let conn = conn(&at).await;
        let m = heartbeat(&conn, &join("g")).await;
        assert_eq!(m.error, ErrorCode::NONE, "{}", m.message);
        assert_eq!(m.assignment.len(), 6);
        let mut offsets = Vec::new();
        for (i, p) in m.assignment.iter().enumerate() {
            let r: OffsetCommitResponse =
                conn.call(ApiKey::OffsetCommit, &commit(&m, "g", p, 100 + i as u64)).await.expect("commit");
            assert_eq!(r.error, ErrorCode::NONE, "{}", r.message);
            offsets.push((p.partition, 100 + i as i64));
        }
        (at, m, offsets)
    });
    let victim = addrs.iter().position(|a| *a == at).expect("the coordinator is a broker");
    c.brokers[victim].take().expect("running").kill9();
    let survivors: Vec<String> =
        addrs.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, a)| a.clone()).collect();
    block_on(async {
        let killed = Instant::now();
        // The member finds the new coordinator and rejoins (its old id is unknown there only
        // if it timed out; either way it ends up owning the partitions again).
        let (conn, back) = wait_for("a rejoin at the new coordinator", Duration::from_secs(10), async || {
            let at = coordinator(&survivors, "g").await;
            let conn = Connection::connect(&at, "groups-test", Duration::from_secs(1)).await.ok()?;
            let r: GroupHeartbeatResponse =
                conn.call(ApiKey::GroupHeartbeat, &beat(&member, "g", &member.assignment)).await.ok()?;
            (r.error == ErrorCode::NONE).then_some((conn, r))
        })
        .await;
        let rejoined = killed.elapsed();
        assert!(rejoined < Duration::from_secs(2) + Duration::from_millis(500), "rejoined after {rejoined:?}");
        assert_eq!(back.assignment.len(), 6, "the member keeps its partitions across the failover");
        let mut after = committed(&conn, "g").await;
        after.sort();
        let mut want = offsets.clone();
        want.sort();
        assert_eq!(after, want, "no acknowledged commit is lost");
        eprintln!("member back at the new coordinator {rejoined:?} after the kill");
    });
}

#[test]
fn a_restarted_coordinator_starts_from_its_snapshot_and_replays_only_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("broker.log");
    let data = dir.path().join("data");
    let mut broker = Broker::start(&data, &["--offsets-partitions", "1", "--group-snapshot-records", "50"]);
    let commits = 130u64;
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("t", 1, 1, &[]).await.expect("create t");
        let at = coordinator(std::slice::from_ref(&broker.addr), "g").await;
        let c = conn(&at).await;
        let m = heartbeat(&c, &join("g")).await;
        let p = m.assignment[0].clone();
        for i in 1..=commits {
            let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, &commit(&m, "g", &p, i)).await.expect("commit");
            assert_eq!(r.error, ErrorCode::NONE, "{}", r.message);
        }
        // Snapshots are written in the background after every 50 records applied.
        compio::time::sleep(Duration::from_millis(300)).await;
    });
    broker.kill9();
    broker.restart_logging("skein_broker::cluster::groups=info,warn", &log);
    block_on(async {
        let at = coordinator(std::slice::from_ref(&broker.addr), "g").await;
        let c = conn(&at).await;
        let got = wait_for("the committed offset", Duration::from_secs(10), async || {
            let r: OffsetFetchResponse =
                c.call(ApiKey::OffsetFetch, &OffsetFetchRequest { group: "g".into(), partitions: None }).await.ok()?;
            (r.error == ErrorCode::NONE).then(|| r.offsets.first().map(|o| o.offset))?
        })
        .await;
        assert_eq!(got, commits as i64, "the last acknowledged commit, after a kill -9");
    });
    let text = std::fs::read_to_string(&log).expect("log");
    let restored = text
        .lines()
        .find(|l| l.contains("group state restored from its snapshot"))
        .unwrap_or_else(|| panic!("no snapshot was loaded:\n{text}"));
    let offset: u64 = restored
        .split("offset=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {restored}"));
    // 1 join record + 130 commits: the snapshot is at least 100 records in, so at most 31
    // records are replayed.
    assert!(offset >= 100 && offset <= commits + 1, "snapshot at {offset}: {restored}");
    eprintln!("restored from the snapshot at offset {offset}; replayed {} records", commits + 1 - offset);
}
