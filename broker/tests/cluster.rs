//! Cluster mode with real processes: three brokers (`--voters`) on 127.0.0.x, a topic with
//! replication 3 and min ISR 2. Replication and failover (kill -9 of the leader: a new leader
//! with a higher epoch takes acks=all writes, the old one comes back as a follower, catches
//! up and rejoins the ISR, and a write sent to it is refused), controlled shutdown (SIGTERM
//! moves leadership away before the process exits) and online reassignment. Requests go to
//! explicit brokers, so these tests do not depend on the client's leader routing.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::block_on;
use common::cluster::{conn, created, describe, leader, settled, wait_for, Cluster};
use skein_client::conn::Connection;
use skein_client::wire::{
    ApiKey, ErrorCode, FetchPartition, FetchPartitionResponse, FetchRequest, FetchResponse, ProducePartition,
    ProduceRequest, ProduceResponse, ReassignPartitionRequest, ReassignPartitionResponse,
};
use skein_client::Client;
use skein_log::batch::{batches, BatchBuilder};
use skein_log::types::Timestamp;

fn batch(values: std::ops::Range<u32>) -> BytesMut {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(None, v.to_string().as_bytes(), &[], Timestamp(1_000));
    }
    BytesMut::from(&b.build().into_bytes()[..])
}

async fn produce(addr: &str, values: std::ops::Range<u32>) -> (ErrorCode, u32) {
    produce_at(addr, 0, values).await
}

/// Produces naming `epoch` as the leader epoch the client knows (0: none).
async fn produce_at(addr: &str, epoch: u32, values: std::ops::Range<u32>) -> (ErrorCode, u32) {
    let (error, epoch, _) = produce_acked(addr, epoch, values).await;
    (error, epoch)
}

/// Produces with acks=all; the error, the leader epoch and the base offset answered.
async fn produce_acked(addr: &str, epoch: u32, values: std::ops::Range<u32>) -> (ErrorCode, u32, u64) {
    let Ok(c) = Connection::connect(addr, "cluster-test", Duration::from_secs(2)).await else {
        return (ErrorCode::UNKNOWN, 0, 0);
    };
    let req = ProduceRequest {
        acks: -1,
        timeout_ms: 2_000,
        partitions: vec![ProducePartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch: epoch,
            records: batch(values),
        }],
    };
    match c.call::<_, ProduceResponse>(ApiKey::Produce, &req).await {
        Ok(r) => (r.partitions[0].error, r.partitions[0].leader_epoch, r.partitions[0].base_offset),
        Err(_) => (ErrorCode::UNKNOWN, 0, 0),
    }
}

/// Every value of `t`/0 read from `addr` (committed records only).
async fn read_all(addr: &str) -> Vec<u32> {
    try_read_all(addr).await.unwrap_or_else(|code| panic!("fetch from {addr}: {code:?}"))
}

/// [`read_all`], or the error a fetch answered.
async fn try_read_all(addr: &str) -> Result<Vec<u32>, ErrorCode> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    for _ in 0..100 {
        let p = fetch(addr, Read { offset, ..Read::default() }).await;
        if p.error != ErrorCode::NONE {
            return Err(p.error);
        }
        offset = values(&p.records, &mut out).unwrap_or(offset);
        if offset >= p.high_watermark && p.records.is_empty() {
            break;
        }
    }
    Ok(out)
}

/// Appends the values of `records` to `out`; the offset after the last batch, if any.
fn values(records: &[u8], out: &mut Vec<u32>) -> Option<u64> {
    let mut next = None;
    for b in batches(records) {
        let b = b.expect("a valid batch");
        for r in b.records().iter() {
            out.push(std::str::from_utf8(r.value.as_slice()).expect("utf8").parse().expect("a number"));
        }
        next = Some(b.header().base_offset.get() + b.header().offset_count());
    }
    next
}

/// One fetch of `t`/0: from `offset`, by a follower too if `replica_read`, with a session
/// token (`min_high_watermark`, `min_leader_epoch`; 0: none), waiting up to `max_wait_ms`
/// (0: 50).
#[derive(Clone, Copy, Default)]
struct Read {
    max_wait_ms: u32,
    offset: u64,
    replica_read: bool,
    min_high_watermark: u64,
    min_leader_epoch: u32,
}

async fn fetch(addr: &str, read: Read) -> FetchPartitionResponse {
    let c = conn(addr).await;
    let req = FetchRequest {
        max_wait_ms: if read.max_wait_ms == 0 { 50 } else { read.max_wait_ms },
        min_bytes: 1,
        max_bytes: 1 << 20,
        isolation: 0,
        replica_read: read.replica_read,
        partitions: vec![FetchPartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch: 0,
            fetch_offset: read.offset,
            partition_max_bytes: 1 << 20,
            min_high_watermark: read.min_high_watermark,
            min_leader_epoch: read.min_leader_epoch,
        }],
    };
    let resp: FetchResponse = c.call(ApiKey::Fetch, &req).await.expect("fetch");
    resp.partitions.into_iter().next().expect("one partition")
}

#[test]
fn a_killed_leader_is_replaced_with_a_new_epoch_and_rejoins_as_a_follower() {
    let mut c = Cluster::start(31, 19531);
    block_on(async {
        let (old, old_epoch) = created(&c).await;
        let old_addr = c.addrs[c.index(old)].clone();
        for i in 0..10 {
            let got = produce(&old_addr, i * 10..(i + 1) * 10).await;
            assert_eq!(got, (ErrorCode::NONE, old_epoch), "acks=all on the first leader");
        }
        let survivor = c.addrs[(c.index(old) + 1) % 3].clone();
        let i = c.index(old);
        c.brokers[i].take().expect("running").kill9();

        // A new leader with a higher epoch takes the next acks=all write.
        let (new, new_epoch) = wait_for("a new leader taking writes", Duration::from_secs(10), async || {
            let (l, e) = leader(&survivor).await;
            if l == 0 || l == old {
                return None;
            }
            let addr = c.addrs[c.index(l)].clone();
            (produce(&addr, 100..110).await.0 == ErrorCode::NONE).then_some((l, e))
        })
        .await;
        assert!(new_epoch > old_epoch, "the epoch was bumped: {old_epoch} -> {new_epoch}");
        let new_addr = c.addrs[c.index(new)].clone();
        // A client that still names the old epoch is refused by the new leader (nothing
        // written); naming the current one works.
        assert_eq!(produce_at(&new_addr, old_epoch, 500..501).await.0, ErrorCode::FENCED_LEADER_EPOCH);
        assert_eq!(produce_at(&new_addr, new_epoch, 110..111).await.0, ErrorCode::NONE);

        // The old leader restarts as a follower, catches up and rejoins the ISR; a write sent
        // to it is refused (it is not the leader of the new epoch).
        let i = c.index(old);
        c.brokers[i] = Some(c.spawn(i));
        wait_for("the old leader back in the ISR", Duration::from_secs(15), async || {
            describe(&new_addr).await.filter(|p| p.isr.len() == 3).map(|_| ())
        })
        .await;
        assert_eq!(produce(&old_addr, 999..1000).await.0, ErrorCode::NOT_LEADER);
        assert_eq!(read_all(&new_addr).await, (0..111).collect::<Vec<u32>>(), "every acknowledged record, once");
        let on_old = describe(&old_addr).await.expect("describe the old leader");
        let on_new = describe(&new_addr).await.expect("describe the new leader");
        assert_eq!(on_old.log_end, on_new.log_end, "the follower caught up");
    });
}

#[test]
fn sigterm_moves_leadership_first_and_reassignment_moves_the_data() {
    let mut c = Cluster::start(41, 19541);
    block_on(async {
        let (first, _) = created(&c).await;
        assert_eq!(produce(&c.addrs[c.index(first)], 0..50).await.0, ErrorCode::NONE);
        let i = c.index(first);
        let status = c.brokers[i].as_mut().expect("running").terminate();
        assert!(status.success(), "clean exit after a controlled shutdown: {status}");
        // Leadership left before the process exited: right after, a survivor names no leader
        // or another one (after the handover hold, in which the old lease runs out), and soon
        // another one.
        let survivor = c.addrs[(i + 1) % 3].clone();
        let (right_after, _) = leader(&survivor).await;
        assert_ne!(right_after, first, "the stopped broker no longer leads");
        let next = wait_for("a new leader", Duration::from_secs(5), async || {
            let (l, _) = leader(&survivor).await;
            (l != 0).then_some(l)
        })
        .await;
        assert_ne!(next, first);
        c.brokers[i] = Some(c.spawn(i));

        // Move the partition onto two brokers, without the current leader.
        let (l, _) = leader(&survivor).await;
        let target: Vec<u32> = (1..=3).filter(|&n| n != l).collect();
        let req = ReassignPartitionRequest { topic: "t".into(), partition: 0, replicas: target.clone() };
        let resp: ReassignPartitionResponse =
            conn(&survivor).await.call(ApiKey::ReassignPartition, &req).await.expect("call");
        assert_eq!(resp.error, ErrorCode::NONE, "{}", resp.message);
        let done = wait_for("the reassignment", Duration::from_secs(15), async || {
            describe(&survivor).await.filter(|p| p.replicas == target && p.isr.len() == 2 && p.leader != 0)
        })
        .await;
        assert!(target.contains(&done.leader), "the new leader is a target replica");
        let leader_addr = c.addrs[c.index(done.leader)].clone();
        // The controller's view may run ahead of the new leader's by a message: retry
        // (NOT_LEADER and NOT_ENOUGH_REPLICAS are retriable and nothing was written).
        wait_for("an acks=all write on the moved partition", Duration::from_secs(10), async || {
            let (code, _) = produce(&leader_addr, 50..60).await;
            assert!(
                [ErrorCode::NONE, ErrorCode::NOT_LEADER, ErrorCode::NOT_ENOUGH_REPLICAS].contains(&code),
                "{code:?}"
            );
            (code == ErrorCode::NONE).then_some(())
        })
        .await;
        // Under CPU contention leadership may move once more (a fenced broker): read from
        // whichever replica leads now.
        let all = wait_for("a whole read from the leader", Duration::from_secs(10), async || {
            let lead = describe(&survivor).await.map(|p| p.leader).filter(|l| *l != 0)?;
            try_read_all(&c.addrs[c.index(lead)]).await.ok()
        })
        .await;
        assert_eq!(all, (0..60).collect::<Vec<u32>>());
        // The broker the partition moved away from deleted its copy.
        let moved_from = c.dirs[c.index(l)].path().join("partitions");
        wait_for("the old replica deleted", Duration::from_secs(10), async || {
            moved_from.read_dir().is_ok_and(|mut r| r.next().is_none()).then_some(())
        })
        .await;
        // Bad requests are refused with a reason.
        let bad = ReassignPartitionRequest { topic: "t".into(), partition: 0, replicas: vec![1, 1] };
        let resp: ReassignPartitionResponse =
            conn(&survivor).await.call(ApiKey::ReassignPartition, &bad).await.expect("call");
        assert_eq!(resp.error, ErrorCode::INVALID_REQUEST);

        // Deleting the topic removes every broker's replica directory.
        let client = Client::connect(&survivor).await.expect("connect");
        client.delete_topic("t").await.expect("delete");
        let dirs = || {
            c.dirs
                .iter()
                .filter(|d| d.path().join("partitions").read_dir().is_ok_and(|mut r| r.next().is_some()))
                .count()
        };
        wait_for("replicas deleted on every broker", Duration::from_secs(10), async || (dirs() == 0).then_some(()))
            .await;
        assert!(describe(&survivor).await.is_none(), "the topic is gone from the metadata");
    });
}

/// Follower reads and session tokens at the wire level (the client's sessions are tested in
/// `session_guarantees.rs`): a follower serves only with `replica_read`, only committed records
/// (a prefix of the leader's), waits for a session token covering a write acknowledged a
/// moment ago, and answers NOT_CAUGHT_UP to one it cannot reach within `--read-wait-ms`; after
/// the leader is killed no replica answers a token with a lower high watermark.
#[test]
fn followers_serve_committed_prefixes_and_wait_for_session_tokens() {
    let mut c = Cluster::start(51, 19551);
    block_on(async {
        let (lead, _) = settled(&c).await;
        let lead_addr = c.addrs[c.index(lead)].clone();
        let followers: Vec<String> = (1..=3).filter(|&n| n != lead).map(|n| c.addrs[c.index(n)].clone()).collect();
        assert_eq!(fetch(&followers[0], Read::default()).await.error, ErrorCode::NOT_LEADER, "no replica_read");

        // Read-after-write through a follower: each acknowledged write is read back at once
        // from a follower, with the write's token.
        let mut waited = 0;
        for i in 0..20u32 {
            let (error, epoch, base) = produce_acked(&lead_addr, 0, i * 5..(i + 1) * 5).await;
            assert_eq!(error, ErrorCode::NONE);
            // From the log start, so that only the token (not the fetch offset) asks for the write.
            let token =
                Read { replica_read: true, min_high_watermark: base + 5, min_leader_epoch: epoch, ..Read::default() };
            let p = fetch(&followers[i as usize % 2], token).await;
            assert_eq!(p.error, ErrorCode::NONE, "round {i}");
            assert!(p.high_watermark >= base + 5, "round {i}: high watermark {} below the token", p.high_watermark);
            let mut got = Vec::new();
            values(&p.records, &mut got);
            let own = got.get(base as usize..base as usize + 5);
            assert_eq!(own, Some(&(i * 5..(i + 1) * 5).collect::<Vec<u32>>()[..]), "round {i}: the write, read back");
            waited += usize::from(p.token_wait_us > 0);
        }
        println!("{waited} of 20 follower reads waited for their token");

        // Consistent prefix: what followers serve is a prefix of the leader's log.
        let on_leader = read_all(&lead_addr).await;
        for f in &followers {
            let mut got = Vec::new();
            let mut offset = 0;
            loop {
                let p = fetch(f, Read { offset, replica_read: true, ..Read::default() }).await;
                assert_eq!(p.error, ErrorCode::NONE);
                assert!(p.high_watermark <= on_leader.len() as u64 + 1);
                match values(&p.records, &mut got) {
                    Some(next) => offset = next,
                    None => break,
                }
            }
            assert_eq!(got[..], on_leader[..got.len()], "{f} serves a prefix of the leader's log");
        }

        // A token the follower cannot reach: NOT_CAUGHT_UP after the read wait (100 ms).
        let hw = on_leader.len() as u64;
        let started = Instant::now();
        let far = Read { max_wait_ms: 1_000, replica_read: true, min_high_watermark: hw + 1_000, ..Read::default() };
        let p = fetch(&followers[0], far).await;
        assert_eq!(p.error, ErrorCode::NOT_CAUGHT_UP);
        let waited_us = p.token_wait_us;
        assert!(started.elapsed() >= Duration::from_millis(90) && waited_us >= 90_000, "{waited_us}");
        assert!(started.elapsed() < Duration::from_millis(900), "the read wait, not the fetch's, bounds it");
        let newer = Read { replica_read: true, min_leader_epoch: 1_000, ..Read::default() };
        assert_eq!(fetch(&followers[1], newer).await.error, ErrorCode::NOT_CAUGHT_UP, "an epoch it has not seen");
        let beyond = Read { offset: hw + 5, replica_read: true, ..Read::default() };
        assert_eq!(fetch(&followers[0], beyond).await.error, ErrorCode::NOT_CAUGHT_UP, "past its high watermark");
        assert_eq!(
            fetch(&lead_addr, Read { offset: hw + 5, ..Read::default() }).await.error,
            ErrorCode::OFFSET_OUT_OF_RANGE
        );

        // Failover: with the leader killed, a read carrying the token of everything read so
        // far is either served at or above it, or refused; never answered with less.
        let i = c.index(lead);
        c.brokers[i].take().expect("running").kill9();
        let token = Read { offset: hw, replica_read: true, min_high_watermark: hw, ..Read::default() };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut served = 0;
        while Instant::now() < deadline {
            for f in &followers {
                let p = fetch(f, token).await;
                match p.error {
                    ErrorCode::NONE => {
                        assert!(p.high_watermark >= hw, "{f} answered high watermark {} below {hw}", p.high_watermark);
                        served += 1;
                    }
                    ErrorCode::NOT_CAUGHT_UP | ErrorCode::NOT_LEADER => {}
                    other => panic!("{f}: unexpected {other}"),
                }
            }
        }
        assert!(served > 0, "no replica served the token after the failover");
    });
}

/// Retention in cluster mode (`retention.bytes` with small segments): every replica deletes
/// whole segments below its high watermark; a follower that was down while the leader deleted
/// the records it needed next is told the leader's log start, starts its log over there and
/// catches up, and the partition serves the same records from the log start on every replica.
#[test]
fn retention_runs_on_every_replica_and_a_follower_behind_the_log_start_starts_over() {
    let mut c = Cluster::start(101, 19601);
    block_on(async {
        let client = Client::connect(&c.addrs[0]).await.expect("connect");
        let configs = [("min.insync.replicas", "2"), ("segment.bytes", "16384"), ("retention.bytes", "65536")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        client.create_topic("t", 1, 3, &configs).await.expect("create topic");
        let lead = wait_for("a leader", Duration::from_secs(10), async || {
            let l = leader(&c.addrs[0]).await.0;
            (l != 0).then_some(l)
        })
        .await;
        let lead_addr = c.addrs[c.index(lead)].clone();
        wait_for("all three in the ISR", Duration::from_secs(10), async || {
            describe(&lead_addr).await.filter(|p| p.isr.len() == 3).map(|_| ())
        })
        .await;
        let down = (c.index(lead) + 1) % 3;
        c.brokers[down].take().expect("running").kill9();

        // About 400 KB of records: far past retention.bytes.
        // A kill of the active controller's broker costs the leader its lease for an election
        // (NOT_LEADER, retriable): retried for up to 5 s per batch, as a client would.
        for i in 0..200 {
            let deadline = Instant::now() + Duration::from_secs(5);
            let got = loop {
                let got = produce(&lead_addr, i * 100..(i + 1) * 100).await;
                if got.0 != ErrorCode::NOT_LEADER || Instant::now() >= deadline {
                    break got;
                }
                compio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(got.0, ErrorCode::NONE, "acks=all with two of three replicas");
        }
        let start = wait_for("the leader's log start to advance", Duration::from_secs(10), async || {
            describe(&lead_addr).await.filter(|p| p.log_start > 0).map(|p| p.log_start)
        })
        .await;
        let live = 3 - c.index(lead) - down;
        wait_for("the live follower's log start to advance", Duration::from_secs(10), async || {
            describe(&c.addrs[live]).await.filter(|p| p.log_start > 0).map(|_| ())
        })
        .await;

        // The follower comes back wanting offsets the leader no longer has.
        c.brokers[down] = Some(c.spawn(down));
        wait_for("the restarted follower back in the ISR", Duration::from_secs(20), async || {
            describe(&lead_addr).await.filter(|p| p.isr.len() == 3).map(|_| ())
        })
        .await;
        let on_lead = describe(&lead_addr).await.expect("describe the leader");
        let on_down = describe(&c.addrs[down]).await.expect("describe the restarted follower");
        assert!(on_down.log_start >= start, "the follower starts at or past the leader's log start then");
        assert_eq!(on_down.log_end, on_lead.log_end, "and caught up");
        // Reads from the log start give the same records on the leader and the follower.
        let from = on_down.log_start.max(on_lead.log_start);
        let mut on_leader = Vec::new();
        let mut on_follower = Vec::new();
        let a = fetch(&lead_addr, Read { offset: from, ..Read::default() }).await;
        let b = fetch(&c.addrs[down], Read { offset: from, replica_read: true, ..Read::default() }).await;
        assert_eq!((a.error, b.error), (ErrorCode::NONE, ErrorCode::NONE));
        values(&a.records, &mut on_leader);
        values(&b.records, &mut on_follower);
        assert!(!on_leader.is_empty());
        let n = on_leader.len().min(on_follower.len());
        assert_eq!(on_leader[..n], on_follower[..n]);
        assert_eq!(on_leader.first().copied(), Some(from as u32), "offset i holds value i");
        let below = fetch(&c.addrs[down], Read { offset: 0, replica_read: true, ..Read::default() }).await;
        assert_eq!(below.error, ErrorCode::OFFSET_OUT_OF_RANGE, "deleted on the follower too");
    });
}
