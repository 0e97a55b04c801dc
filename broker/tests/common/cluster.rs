//! A three-broker cluster of real processes on 127.0.0.x (cluster mode, `--voters`), and
//! small wire-level helpers for partition `t`/0.

use std::time::{Duration, Instant};

use skein_client::conn::Connection;
use skein_client::wire::{
    ApiKey, DescribeTopicsRequest, DescribeTopicsResponse, MetadataRequest, MetadataResponse, PartitionDescription,
};
use skein_client::Client;

use super::Broker;

/// The brokers (None while killed), their addresses and directories, the `--voters` list.
pub struct Cluster {
    pub brokers: Vec<Option<Broker>>,
    pub addrs: Vec<String>,
    pub dirs: Vec<tempfile::TempDir>,
    pub voters: String,
}

impl Cluster {
    /// Three brokers on 127.0.0.`ip`, .`ip+1`, .`ip+2`, port `port`.
    pub fn start(ip: u8, port: u16) -> Cluster {
        Cluster::start_in_racks(ip, port, &["", "", ""])
    }

    /// The same, broker `i + 1` in rack `racks[i]` (empty: none).
    pub fn start_in_racks(ip: u8, port: u16, racks: &[&str; 3]) -> Cluster {
        let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.{}:{port}", ip + i)).collect();
        let rack = |i: usize| if racks[i].is_empty() { String::new() } else { format!("/{}", racks[i]) };
        let voters =
            addrs.iter().enumerate().map(|(i, a)| format!("{}@{a}{}", i + 1, rack(i))).collect::<Vec<_>>().join(",");
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
        let mut c = Cluster { brokers: Vec::new(), addrs, dirs, voters };
        for i in 0..3 {
            let b = c.spawn(i);
            c.brokers.push(Some(b));
        }
        c
    }

    /// Starts broker `i + 1` (again).
    pub fn spawn(&self, i: usize) -> Broker {
        let id = (i + 1).to_string();
        let args = ["--node-id", id.as_str(), "--voters", self.voters.as_str()];
        // The old socket may linger briefly after a kill: retry.
        for attempt in 0..50 {
            let r = std::panic::catch_unwind(|| Broker::start_at(self.dirs[i].path(), &self.addrs[i], &args));
            if let Ok(b) = r {
                return b;
            }
            std::thread::sleep(Duration::from_millis(20 * (attempt + 1)));
        }
        panic!("broker {id} did not start");
    }

    /// SIGKILLs the brokers in turn on a thread of its own until `stop` is set: after
    /// `first`, a broker is killed, started again `down` later, and the next one is killed
    /// `up` after that. The thread gives back the cluster and the number of kills.
    pub fn kill_in_turn(
        self,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        first: Duration,
        down: Duration,
        up: Duration,
    ) -> std::thread::JoinHandle<(Cluster, u32)> {
        std::thread::spawn(move || {
            let mut cluster = self;
            let mut kills = 0;
            let mut i = 0;
            std::thread::sleep(first);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(b) = cluster.brokers[i].as_mut() {
                    b.kill9();
                }
                cluster.brokers[i] = None;
                kills += 1;
                std::thread::sleep(down);
                cluster.brokers[i] = Some(cluster.spawn(i));
                std::thread::sleep(up);
                i = (i + 1) % 3;
            }
            (cluster, kills)
        })
    }

    /// The index of node `node` in `brokers` and `addrs`.
    pub fn index(&self, node: u32) -> usize {
        node as usize - 1
    }
}

/// A connection to `addr`.
pub async fn conn(addr: &str) -> Connection {
    Connection::connect(addr, "cluster-test", Duration::from_secs(5)).await.expect("connect")
}

/// Partition 0 of `t` as `addr` describes it.
pub async fn describe(addr: &str) -> Option<PartitionDescription> {
    let c = Connection::connect(addr, "cluster-test", Duration::from_secs(2)).await.ok()?;
    let resp: DescribeTopicsResponse =
        c.call(ApiKey::DescribeTopics, &DescribeTopicsRequest { names: vec!["t".into()] }).await.ok()?;
    resp.topics.into_iter().next()?.partitions.into_iter().next()
}

/// The leader of `t`/0 and its epoch, as broker `addr` knows it (0: none).
pub async fn leader(addr: &str) -> (u32, u32) {
    let Ok(c) = Connection::connect(addr, "cluster-test", Duration::from_secs(2)).await else { return (0, 0) };
    let md: Result<MetadataResponse, _> =
        c.call(ApiKey::Metadata, &MetadataRequest { topics: Some(vec!["t".into()]) }).await;
    md.ok()
        .and_then(|m| m.topics.into_iter().next())
        .and_then(|t| t.partitions.into_iter().next())
        .map_or((0, 0), |p| (p.leader, p.leader_epoch))
}

/// Polls `f` every 20 ms until it gives a value; fails the test after `limit`.
pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        compio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates `t`: 1 partition, 3 replicas, min.insync.replicas 2.
pub async fn create(addr: &str) {
    let client = Client::connect(addr).await.expect("connect");
    let configs = [("min.insync.replicas".to_owned(), "2".to_owned())];
    client.create_topic("t", 1, 3, &configs).await.expect("create topic");
}

/// Creates `t` and waits for its first leader; the leader and its epoch.
pub async fn created(c: &Cluster) -> (u32, u32) {
    create(&c.addrs[0]).await;
    wait_for("a leader", Duration::from_secs(10), async || {
        let l = leader(&c.addrs[0]).await;
        (l.0 != 0).then_some(l)
    })
    .await
}

/// The cluster's leader of `t`/0 once all three replicas are in sync, and its epoch.
pub async fn settled(c: &Cluster) -> (u32, u32) {
    let (lead, epoch) = created(c).await;
    let lead_addr = c.addrs[c.index(lead)].clone();
    wait_for("all three in the ISR", Duration::from_secs(10), async || {
        describe(&lead_addr).await.filter(|p| p.isr.len() == 3).map(|_| ())
    })
    .await;
    (lead, epoch)
}
