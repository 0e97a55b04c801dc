//! A local multi-broker cluster of real `skein-broker` processes, for chaos tests, `verify`
//! and `failover`.
//!
//! [`LocalCluster::start`] starts node `i` (ids from 1) on its own loopback address
//! (127.0.0.11, 127.0.0.12, ... by default) with `--node-id i --listen IP:PORT --data-dir
//! DIR/node-i --voters 1@..,2@..,..` (every node the same `--voters`) and waits for each
//! `ready IP:PORT` line on its standard output. Brokers bind their outgoing inter-broker
//! connections to their listen address, so an `nft` rule on address pairs
//! ([`crate::chaos`]) cuts exactly one broker-to-broker link, and clients (127.0.0.1) are told
//! apart from brokers. A node can be killed (SIGKILL, reaped), restarted with the same
//! arguments and data directory (waiting for `ready` again), paused (SIGSTOP) and resumed
//! (SIGCONT). Dropping the cluster kills every process it started.
//!
//! Each node's standard error and output go to `DIR/node-i.log`, appended across restarts.
//! [`Probe`] reads partition leadership from every reachable broker (the newest leader
//! epoch wins, so a cut-off broker's stale view does not count).
//!
//! Not done here: no network faults (see [`crate::chaos`]), no process supervision (a node
//! that dies on its own stays dead until [`LocalCluster::restart`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skein_client::{Client, ClientConfig};

/// How to start a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The `skein-broker` binary.
    pub binary: PathBuf,
    /// Parent of the nodes' data directories (`node-1`, ...) and logs (`node-1.log`, ...).
    pub dir: PathBuf,
    /// One listen address per node; node `i + 1` listens on `addrs[i]`.
    pub addrs: Vec<SocketAddrV4>,
    /// Passed to every broker after the generated arguments (e.g. `--lease-ms 250`).
    pub extra_args: Vec<String>,
    /// How long a start or restart may take to print `ready`.
    pub ready_timeout: Duration,
}

impl ClusterConfig {
    /// `nodes` brokers on 127.0.0.11, 127.0.0.12, ..., each on a port free at this moment.
    pub fn new(binary: impl Into<PathBuf>, dir: impl Into<PathBuf>, nodes: u32) -> Result<ClusterConfig> {
        let mut addrs = Vec::new();
        for id in 1..=nodes {
            let ip = node_ip(id);
            addrs.push(SocketAddrV4::new(ip, free_port(ip)?));
        }
        Ok(ClusterConfig {
            binary: binary.into(),
            dir: dir.into(),
            addrs,
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        })
    }

    /// The `--voters` value every node gets: `1@IP1:PORT1,2@IP2:PORT2,...`.
    pub fn voters(&self) -> String {
        self.addrs.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",")
    }

    /// The command-line arguments of node `id`.
    pub fn args(&self, id: u32) -> Vec<String> {
        let mut args = vec![
            "--node-id".to_owned(),
            id.to_string(),
            "--listen".to_owned(),
            self.addrs[index(id)].to_string(),
            "--data-dir".to_owned(),
            self.data_dir(id).display().to_string(),
            "--voters".to_owned(),
            self.voters(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u32) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Node `id`'s log (standard error and output, all incarnations).
    pub fn log_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }
}

/// The default loopback address of node `id`: 127.0.0.(10 + id).
pub fn node_ip(id: u32) -> Ipv4Addr {
    assert!((1..=200).contains(&id), "node ids run from 1 to 200, not {id}");
    Ipv4Addr::new(127, 0, 0, 10 + id as u8)
}

/// Running broker processes; see the module documentation.
pub struct LocalCluster {
    config: ClusterConfig,
    nodes: Vec<Node>,
}

struct Node {
    child: Option<Child>,
    paused: bool,
    starts: u32,
}

impl LocalCluster {
    /// Starts every node and waits until each printed `ready`.
    pub fn start(config: ClusterConfig) -> Result<LocalCluster> {
        if config.addrs.is_empty() {
            bail!("a cluster needs at least one node");
        }
        std::fs::create_dir_all(&config.dir).with_context(|| format!("creating {}", config.dir.display()))?;
        let nodes = config.addrs.iter().map(|_| Node { child: None, paused: false, starts: 0 }).collect();
        let mut cluster = LocalCluster { config, nodes };
        // Spawn all first, then wait: a voter may wait for a quorum before it is ready.
        let mut ready = Vec::new();
        for id in cluster.ids() {
            ready.push(cluster.spawn(id)?);
        }
        for (id, rx) in cluster.ids().zip(ready) {
            cluster.wait_ready(id, &rx)?;
        }
        Ok(cluster)
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Node ids, 1 to the number of nodes.
    pub fn ids(&self) -> impl Iterator<Item = u32> {
        1..=self.nodes.len() as u32
    }

    /// Node `id`'s listen address.
    pub fn addr(&self, id: u32) -> SocketAddr {
        SocketAddr::V4(self.config.addrs[index(id)])
    }

    /// Every listen address, in node order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.ids().map(|id| self.addr(id)).collect()
    }

    /// `IP1:PORT1,IP2:PORT2,...`, for clients.
    pub fn bootstrap(&self) -> String {
        self.addrs().iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }

    /// `(node id, IP)` of every node, for [`crate::chaos::NetChaos`].
    pub fn ips(&self) -> Vec<(u32, Ipv4Addr)> {
        self.ids().map(|id| (id, *self.config.addrs[index(id)].ip())).collect()
    }

    /// Node `id`'s process id, if it runs (paused or not).
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.nodes[index(id)].child.as_ref().map(Child::id)
    }

    /// Whether node `id` is stopped with SIGSTOP.
    pub fn is_paused(&self, id: u32) -> bool {
        self.nodes[index(id)].paused
    }

    /// How many times node `id` was started (1 after [`LocalCluster::start`]).
    pub fn starts(&self, id: u32) -> u32 {
        self.nodes[index(id)].starts
    }

    /// SIGKILL node `id` and reap it. Killing a dead node does nothing.
    pub fn kill(&mut self, id: u32) -> Result<()> {
        let node = &mut self.nodes[index(id)];
        if let Some(mut child) = node.child.take() {
            // SIGKILL ends a stopped process too.
            child.kill().with_context(|| format!("killing node {id} (pid {})", child.id()))?;
            child.wait().with_context(|| format!("reaping node {id}"))?;
            tracing::info!(node = id, pid = child.id(), "killed");
        }
        node.paused = false;
        Ok(())
    }

    /// Starts node `id` again with the same arguments and data directory (killing it first if
    /// it still runs) and waits for `ready`.
    pub fn restart(&mut self, id: u32) -> Result<()> {
        self.kill(id)?;
        // A restart right after a kill may find the port still held by the dead process's
        // sockets for a moment; a few attempts cover that without hiding a broken broker.
        let mut attempt = 0;
        loop {
            let rx = self.spawn(id)?;
            match self.wait_ready(id, &rx) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < RESTART_ATTEMPTS && self.exited(id) => {
                    tracing::warn!(node = id, error = %e, "restart failed; retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: u32) -> Result<()> {
        let pid = self.pid(id).with_context(|| format!("node {id} is not running"))?;
        signal(pid, "STOP")?;
        self.nodes[index(id)].paused = true;
        Ok(())
    }

    /// SIGCONT node `id` (a node that is not paused is left alone).
    pub fn resume(&mut self, id: u32) -> Result<()> {
        if !self.nodes[index(id)].paused {
            return Ok(());
        }
        let pid = self.pid(id).with_context(|| format!("node {id} is not running"))?;
        signal(pid, "CONT")?;
        self.nodes[index(id)].paused = false;
        Ok(())
    }

    /// Resumes every paused node and restarts every dead one.
    pub fn heal(&mut self) -> Result<()> {
        for id in self.ids() {
            self.resume(id)?;
            if self.pid(id).is_none() || self.exited(id) {
                self.restart(id)?;
            }
        }
        Ok(())
    }

    /// Kills every node (also done on drop).
    pub fn stop_all(&mut self) {
        for id in self.ids() {
            if let Err(e) = self.kill(id) {
                tracing::error!(node = id, error = %e, "could not kill a broker");
            }
        }
    }

    fn exited(&mut self, id: u32) -> bool {
        let node = &mut self.nodes[index(id)];
        match node.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) => {
                node.child = None;
                true
            }
            Some(Ok(None)) => false,
            Some(Err(_)) | None => true,
        }
    }

    /// Spawns node `id`; the receiver gets the `ready` line's address.
    fn spawn(&mut self, id: u32) -> Result<std::sync::mpsc::Receiver<String>> {
        let cfg = &self.config;
        std::fs::create_dir_all(cfg.data_dir(id))
            .with_context(|| format!("creating {}", cfg.data_dir(id).display()))?;
        let log_path = cfg.log_path(id);
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))
        };
        let mut log = open_log()?;
        let args = cfg.args(id);
        writeln!(log, "== skein-loadgen: starting {} {}", cfg.binary.display(), args.join(" "))?;
        let mut child = Command::new(&cfg.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(open_log()?))
            .spawn()
            .with_context(|| format!("starting {}", cfg.binary.display()))?;
        let stdout = child.stdout.take().context("the broker's stdout is piped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Forwards the broker's stdout to its log (so the pipe never fills) and reports the
        // first `ready` line; ends when the process does.
        std::thread::Builder::new().name(format!("node-{id}-stdout")).spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Logged before it is reported, so the log shows every `ready` awaited.
                let _ = writeln!(log, "{line}");
                if let Some(addr) = line.strip_prefix("ready ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        })?;
        let node = &mut self.nodes[index(id)];
        node.child = Some(child);
        node.paused = false;
        node.starts += 1;
        Ok(rx)
    }

    fn wait_ready(&mut self, id: u32, rx: &std::sync::mpsc::Receiver<String>) -> Result<()> {
        let deadline = Instant::now() + self.config.ready_timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addr) => {
                    tracing::info!(node = id, %addr, pid = ?self.pid(id), "ready");
                    return Ok(());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "node {id} printed no `ready` within {:?}; log tail:\n{}",
                        self.config.ready_timeout,
                        log_tail(&self.config.log_path(id))
                    )
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // Stdout closed: the process exited (or closed it) before `ready`.
                    std::thread::sleep(Duration::from_millis(50));
                    self.exited(id);
                    bail!("node {id} exited before `ready`; log tail:\n{}", log_tail(&self.config.log_path(id)))
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// One partition's leadership as the brokers report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionView {
    /// Leader node id (0: none).
    pub leader: u32,
    /// Leader epoch.
    pub leader_epoch: u32,
    /// Assigned replicas.
    pub replicas: Vec<u32>,
    /// In-sync replicas.
    pub isr: Vec<u32>,
}

/// Reads partition leadership from every broker it can reach, each bounded by a timeout.
pub struct Probe {
    rt: compio::runtime::Runtime,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
}

impl Probe {
    /// A probe of these brokers; each one's answer is awaited at most `timeout`.
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> Result<Probe> {
        Ok(Probe { rt: compio::runtime::Runtime::new().context("starting a runtime")?, addrs, timeout })
    }

    /// Per partition of `topic`, the view with the newest leader epoch among the brokers that
    /// answered (a broker cut off from the controller may report an old leader). Fails only if
    /// no broker answered.
    pub fn partitions(&self, topic: &str) -> Result<BTreeMap<u32, PartitionView>> {
        let mut merged: BTreeMap<u32, PartitionView> = BTreeMap::new();
        let mut answered = 0;
        let mut last_error = None;
        for addr in &self.addrs {
            match self.rt.block_on(one_view(*addr, topic, self.timeout)) {
                Ok(views) => {
                    answered += 1;
                    for (p, v) in views {
                        let newer = merged
                            .get(&p)
                            .is_none_or(|m| (v.leader_epoch, v.leader != 0) > (m.leader_epoch, m.leader != 0));
                        if newer {
                            merged.insert(p, v);
                        }
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        match (answered, last_error) {
            (0, Some(e)) => Err(e.context("no broker answered a metadata request")),
            (0, None) => bail!("no brokers to ask"),
            _ => Ok(merged),
        }
    }

    /// The active controller as the answering brokers name it (the most named; `None` if
    /// none names one).
    pub fn controller(&self) -> Option<u32> {
        let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
        for addr in &self.addrs {
            let ask = async {
                let brokers = addr.to_string();
                let config = ClientConfig { brokers, request_timeout: self.timeout, ..ClientConfig::default() };
                Client::with_config(config).await?.metadata(Some(Vec::new())).await
            };
            if let Ok(Ok(md)) = self.rt.block_on(compio::time::timeout(self.timeout * 2, ask)) {
                if md.controller != 0 {
                    *votes.entry(md.controller).or_default() += 1;
                }
            }
        }
        votes.into_iter().max_by_key(|&(_, n)| n).map(|(c, _)| c)
    }

    /// The transaction coordinator of `transactional_id` (the leader of its
    /// `__transaction_state` partition), as the first broker that answers FindCoordinator
    /// names it.
    pub fn transaction_coordinator(&self, transactional_id: &str) -> Result<u32> {
        let mut last_error = None;
        for addr in &self.addrs {
            let ask = async {
                let config = ClientConfig {
                    brokers: addr.to_string(),
                    request_timeout: self.timeout,
                    ..ClientConfig::default()
                };
                Client::with_config(config).await?.find_transaction_coordinator(transactional_id).await
            };
            match self.rt.block_on(compio::time::timeout(self.timeout * 2, ask)) {
                Ok(Ok(c)) => return Ok(c.node_id),
                Ok(Err(e)) => last_error = Some(anyhow::Error::from(e)),
                Err(_) => last_error = Some(anyhow::anyhow!("FindCoordinator to {addr} timed out")),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no brokers to ask")))
            .with_context(|| format!("the transaction coordinator of '{transactional_id}'"))
    }

    /// The leader of `partition` of `topic` (`None` while it has none).
    pub fn leader(&self, topic: &str, partition: u32) -> Result<Option<(u32, u32)>> {
        let views = self.partitions(topic)?;
        Ok(views.get(&partition).filter(|v| v.leader != 0).map(|v| (v.leader, v.leader_epoch)))
    }
}

async fn one_view(addr: SocketAddr, topic: &str, timeout: Duration) -> Result<BTreeMap<u32, PartitionView>> {
    let ask = async {
        let config = ClientConfig { brokers: addr.to_string(), request_timeout: timeout, ..ClientConfig::default() };
        let client = Client::with_config(config).await?;
        client.metadata(Some(vec![topic.to_owned()])).await
    };
    let md = compio::time::timeout(timeout * 2, ask)
        .await
        .map_err(|_| anyhow::anyhow!("metadata from {addr} timed out"))?
        .with_context(|| format!("metadata from {addr}"))?;
    let mut views = BTreeMap::new();
    for t in md.topics.into_iter().filter(|t| t.name == topic) {
        for p in t.partitions {
            views.insert(
                p.partition,
                PartitionView { leader: p.leader, leader_epoch: p.leader_epoch, replicas: p.replicas, isr: p.isr },
            );
        }
    }
    Ok(views)
}

/// Sends `kill -SIG pid` (the crate forbids `unsafe`, so no `libc::kill`).
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().context("running kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// A port free on `ip` at this moment.
fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(listener.local_addr()?.port())
}

fn index(id: u32) -> usize {
    assert!(id >= 1, "node ids start at 1");
    (id - 1) as usize
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

const RESTART_ATTEMPTS: u32 = 5;
const LOG_TAIL_LINES: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_loopback_addresses_and_the_same_voters() {
        let cfg = ClusterConfig::new("/bin/skein-broker", "/tmp/c", 3).expect("free ports");
        assert_eq!(
            cfg.addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>(),
            ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        );
        let voters = cfg.voters();
        assert!(voters.starts_with(&format!("1@127.0.0.11:{},2@127.0.0.12:", cfg.addrs[0].port())), "{voters}");
        let args = cfg.args(2);
        assert_eq!(
            args[..6],
            [
                "--node-id".to_owned(),
                "2".into(),
                "--listen".into(),
                cfg.addrs[1].to_string(),
                "--data-dir".into(),
                "/tmp/c/node-2".into()
            ]
        );
        assert_eq!(args[6..], ["--voters".to_owned(), voters]);
        assert_eq!(cfg.log_path(3), PathBuf::from("/tmp/c/node-3.log"));
    }

    #[test]
    fn a_process_is_started_killed_restarted_paused_and_cleaned_up() {
        // A stand-in broker: prints `ready`, then sleeps; the harness only needs the line.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("fake-broker");
        std::fs::write(&script, "#!/bin/sh\necho \"ready $4\"\nexec sleep 600\n").expect("write script");
        let status = Command::new("chmod").arg("+x").arg(&script).status().expect("chmod");
        assert!(status.success());
        let cfg = ClusterConfig::new(&script, dir.path().join("c"), 2).expect("free ports");
        let mut cluster = LocalCluster::start(cfg).expect("started");
        let first = cluster.pid(1).expect("running");
        cluster.pause(1).expect("paused");
        assert!(cluster.is_paused(1));
        cluster.resume(1).expect("resumed");
        cluster.kill(1).expect("killed");
        assert_eq!(cluster.pid(1), None);
        cluster.restart(1).expect("restarted");
        assert_ne!(cluster.pid(1), Some(first));
        assert_eq!(cluster.starts(1), 2);
        let log = std::fs::read_to_string(cluster.config().log_path(1)).expect("log");
        assert_eq!(log.matches("ready 127.0.0.11:").count(), 2, "{log}");
        let pids: Vec<u32> = cluster.ids().filter_map(|id| cluster.pid(id)).collect();
        drop(cluster);
        for pid in pids {
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} was killed and reaped on drop");
        }
    }
}
