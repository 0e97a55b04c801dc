//! Skein's broker: serves the wire protocol of `skein_client::wire` as a member of a
//! replicated cluster (`--voters`), or alone as a cluster of one voter: one code path.
//!
//! - [`check`]: the history checker (Jepsen-style checks of recorded client histories).
//! - [`core`]: the sans-IO replication core (replica, broker node, controller and its Raft
//!   quorum, idempotent producer state), driven by the simulator and by [`cluster`].
//! - [`datadir`]: the data directory's lock (one broker process per directory).
//! - [`meta`]: topic settings and names, producer-id blocks.
//! - [`cluster`]: the broker runtime: thread-per-core shards (one compio runtime per core)
//!   driving the core for the partitions each owns, the controller voter on shard 0, peer
//!   links, the Raft log and replica directories on disk.
//! - `service`: the request path below the runtime (typed requests and responses, the wire
//!   codec, connections, byte budgets).
//! - `sim` (feature `sim`): the deterministic cluster simulator and its planted bugs.
#![warn(missing_docs)]

pub mod check;
pub mod cluster;
pub mod core;
pub mod datadir;
pub mod meta;
mod service;
pub use service::EXIT_STORAGE_FAILURE;
#[cfg(feature = "sim")]
pub mod sim;

use std::net::SocketAddr;
use std::path::PathBuf;

/// Broker settings: flags, each also settable from the environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "skein-broker",
    version,
    about = "Skein broker: serves topics over TCP, alone (a cluster of one) or, with --voters, as a member of a replicated cluster"
)]
pub struct BrokerConfig {
    /// This node's id (1 or more; 0 means "no node" on the wire).
    #[arg(long, env = "SKEIN_NODE_ID", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub node_id: u32,
    /// Address to listen on (port 0 picks a free port, printed at startup). In cluster mode it
    /// must be this node's own `--voters` address (or the unspecified address on its port).
    #[arg(long, env = "SKEIN_LISTEN", default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Directory holding topic metadata and partition logs; one broker process at a time holds
    /// it (the lock file `.lock` names its pid).
    #[arg(long, env = "SKEIN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// TOML file with any of these settings (snake_case keys, e.g. `node_id = 2`); flags and
    /// environment variables override it.
    #[arg(long, env = "SKEIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Cores to use, one shard (thread with its own runtime) each (1 or more); default: all.
    #[arg(long, env = "SKEIN_CORES", value_parser = parse_cores)]
    pub cores: Option<usize>,
    /// I/O driver of every shard's runtime: `auto` (io_uring where the kernel and any container
    /// seccomp policy allow it, otherwise epoll) or `poll` (epoll always: the fallback, forced).
    /// The broker logs which one it runs at start.
    #[arg(long, env = "SKEIN_IO_DRIVER", value_enum, default_value_t = IoDriver::Auto)]
    pub io_driver: IoDriver,
    /// Largest request frame accepted; larger ones close the connection.
    #[arg(long, env = "SKEIN_MAX_FRAME_BYTES", default_value_t = 64 << 20)]
    pub max_frame_bytes: u32,
    /// Most open client connections; more are closed on accept.
    #[arg(long, env = "SKEIN_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most requests in flight per connection; reading pauses past it.
    #[arg(long, env = "SKEIN_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Most produce bytes being appended or awaiting durability per shard; past it produce
    /// requests get THROTTLED.
    #[arg(long, env = "SKEIN_MAX_PRODUCE_BYTES", default_value_t = 256 << 20)]
    pub max_produce_bytes: u64,
    /// Most record bytes of fetch responses being read and assembled at once per shard (cluster
    /// mode: per broker); also the cap on one fetch's max_bytes and partition_max_bytes. Past
    /// it a fetch reads no more records: it waits (up to its max_wait_ms) and is then answered
    /// with what fits, possibly nothing.
    #[arg(long, env = "SKEIN_MAX_FETCH_BYTES", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_fetch_bytes: u64,
    /// Cap on a produce request's own timeout (for acks=all), in milliseconds.
    #[arg(long, env = "SKEIN_MAX_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub max_request_timeout_ms: u32,
    /// Shutdown waits this long for in-flight requests before closing logs.
    #[arg(long, env = "SKEIN_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
    /// Cluster mode: the controller voters, `ID@HOST:PORT[/RACK],...`, the same on every broker
    /// (this broker's `--node-id` must be one of them). A rack lets consumers that prefer the
    /// closest replica read from one in their own rack. Without it the broker is a cluster of
    /// one voter (node `--node-id` at the address it listens on).
    #[arg(long, env = "SKEIN_VOTERS")]
    pub voters: Option<String>,
    /// Cluster mode: how often a broker heartbeats the active controller (ms).
    #[arg(long, env = "SKEIN_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Cluster mode: a broker accepts writes and serves reads only within this long after a
    /// heartbeat the controller answered (ms); must be below the session timeout.
    #[arg(long, env = "SKEIN_LEASE_MS", default_value_t = crate::core::node::DEFAULT_LEASE_MS)]
    pub lease_ms: u64,
    /// Cluster mode: a broker silent this long is fenced and its partitions fail over (ms).
    #[arg(long, env = "SKEIN_SESSION_TIMEOUT_MS", default_value_t = crate::core::controller::DEFAULT_SESSION_TIMEOUT_MS)]
    pub session_timeout_ms: u64,
    /// Cluster mode: a controller voter that hears no active controller for this long (plus a
    /// random part up to the same again) starts an election (ms).
    #[arg(long, env = "SKEIN_ELECTION_TIMEOUT_MS", default_value_t = 100)]
    pub election_timeout_ms: u64,
    /// Cluster mode: a follower not caught up for this long leaves the ISR (ms).
    #[arg(long, env = "SKEIN_REPLICA_LAG_MAX_MS", default_value_t = 1_000)]
    pub replica_lag_max_ms: u64,
    /// Cluster mode: longest a leader holds a caught-up follower's fetch before answering it
    /// empty (a long poll, answered early by an append or a high-watermark move), in ms; 0
    /// answers at once and the follower polls every 5 ms. At most 400 (a follower resends a
    /// fetch unanswered for 500 ms).
    #[arg(long, env = "SKEIN_REPLICA_FETCH_WAIT_MAX_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=400))]
    pub replica_fetch_wait_max_ms: u64,
    /// Cluster mode: how often leadership moves back to preferred replicas (each partition's
    /// first replica) that are alive and in sync (ms); 0 turns it off.
    #[arg(long, env = "SKEIN_LEADER_REBALANCE_INTERVAL_MS", default_value_t = 30_000)]
    pub leader_rebalance_interval_ms: u64,
    /// Cluster mode: `min.insync.replicas` of topics that do not set it (capped at their
    /// replication factor).
    #[arg(long, env = "SKEIN_MIN_INSYNC_REPLICAS", default_value_t = 1)]
    pub min_insync_replicas: usize,
    /// Cluster mode: how long a read carrying a session token waits for this replica to catch
    /// up with it (high watermark and leader epoch) before answering NOT_CAUGHT_UP, which sends
    /// the client to the leader (ms; capped by the fetch's own wait).
    #[arg(long, env = "SKEIN_READ_WAIT_MS", default_value_t = 100)]
    pub read_wait_ms: u64,
    /// Partitions of the internal `__consumer_offsets` topic (groups are hashed to them; each
    /// partition's leader coordinates its groups), used when the topic is first created.
    #[arg(long, env = "SKEIN_OFFSETS_PARTITIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub offsets_partitions: u32,
    /// Partitions of the internal `__transaction_state` topic (transactional ids are hashed
    /// to them; each partition's leader coordinates its ids), used when the topic is first
    /// created.
    #[arg(long, env = "SKEIN_TXN_PARTITIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub txn_partitions: u32,
    /// How often group members heartbeat (ms): the delay before a member learns of a
    /// rebalance.
    #[arg(long, env = "SKEIN_GROUP_HEARTBEAT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u32).range(10..=10_000))]
    pub group_heartbeat_ms: u32,
    /// Every replica of a `__consumer_offsets` partition snapshots its group state to
    /// `partitions/<id>/groups.snapshot` after this many records applied since the last one,
    /// so a restart or a new leader replays only the tail of the log.
    #[arg(long, env = "SKEIN_GROUP_SNAPSHOT_RECORDS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub group_snapshot_records: u64,
    /// Every replica of a table partition snapshots its multi-version state to
    /// `partitions/<id>/table.snapshot` after this many records applied since the last one,
    /// so a restart replays only the log's tail.
    #[arg(long, env = "SKEIN_TABLE_SNAPSHOT_RECORDS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub table_snapshot_records: u64,
    /// TEST ONLY: followers serve reads up to their log end instead of the high watermark they
    /// learned, breaking consistent prefix on purpose (proves the history checker catches it).
    #[arg(long, hide = true)]
    pub unsafe_follower_reads_past_high_watermark: bool,
    /// TEST ONLY: a planted secondary-index bug (proves the index checker catches it).
    #[arg(long, hide = true, value_enum)]
    pub unsafe_index_plant: Option<IndexPlant>,
}

impl BrokerConfig {
    /// Parses flags and environment, then takes every setting neither gave from the
    /// `--config` file. A usage error comes back as a `clap::Error` (call `.exit()` on it).
    pub fn parse_with_file<I, T>(args: I) -> anyhow::Result<BrokerConfig>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use anyhow::Context;
        use clap::{CommandFactory, FromArgMatches};
        let matches = BrokerConfig::command().try_get_matches_from(args)?;
        let mut config = BrokerConfig::from_arg_matches(&matches)?;
        let Some(path) = config.config.clone() else {
            config.validate()?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {}", path.display()))?;
        let table: toml::Table = text.parse().with_context(|| format!("parsing config {}", path.display()))?;
        for (key, value) in table {
            let known = BrokerConfig::command().get_arguments().any(|a| a.get_id() == key.as_str());
            let explicit = known
                && matches!(
                    matches.value_source(&key),
                    Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
                );
            if !explicit {
                config.set(&key, &value).with_context(|| format!("config {}: key '{key}'", path.display()))?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what single flags cannot: values a config file set, and that a cluster
    /// broker listens on its own `--voters` address (other brokers and clients reach it
    /// there; listening elsewhere would leave it unreachable while it counts as a voter).
    fn validate(&self) -> anyhow::Result<()> {
        use anyhow::{bail, Context};
        if self.node_id == 0 {
            bail!("node id must be 1 or more (0 means no node on the wire)");
        }
        if self.cores == Some(0) {
            bail!("cores must be 1 or more");
        }
        let Some(voters) = self.voters.as_deref() else {
            return Ok(());
        };
        let voters = cluster::parse_voters(voters).context("--voters")?;
        let Some(&(_, mine)) = voters.iter().find(|(n, _)| n.0 == self.node_id) else {
            bail!("--node-id {} is not one of the --voters", self.node_id);
        };
        let same_port = self.listen.port() == mine.port();
        if self.listen != mine && !(same_port && self.listen.ip().is_unspecified()) {
            bail!(
                "--listen {} is not node {}'s --voters address {mine}: a cluster broker listens where the other brokers reach it",
                self.listen,
                self.node_id
            );
        }
        Ok(())
    }

    fn set(&mut self, key: &str, value: &toml::Value) -> anyhow::Result<()> {
        use anyhow::{anyhow, bail};
        let int = || value.as_integer().ok_or_else(|| anyhow!("expected an integer"));
        let text = || value.as_str().ok_or_else(|| anyhow!("expected a string"));
        match key {
            "node_id" => self.node_id = u32::try_from(int()?)?,
            "listen" => self.listen = text()?.parse()?,
            "data_dir" => self.data_dir = PathBuf::from(text()?),
            "cores" => self.cores = Some(usize::try_from(int()?)?),
            "io_driver" => {
                self.io_driver = match text()? {
                    "auto" => IoDriver::Auto,
                    "poll" => IoDriver::Poll,
                    other => bail!("io_driver: '{other}' is not auto or poll"),
                }
            }
            "max_frame_bytes" => self.max_frame_bytes = u32::try_from(int()?)?,
            "max_connections" => self.max_connections = usize::try_from(int()?)?,
            "max_in_flight" => self.max_in_flight = usize::try_from(int()?)?,
            "max_produce_bytes" => self.max_produce_bytes = u64::try_from(int()?)?,
            "max_fetch_bytes" => {
                let bytes = u64::try_from(int()?)?;
                anyhow::ensure!(bytes >= 1, "at least 1 (0 would let no fetch return records)");
                self.max_fetch_bytes = bytes;
            }
            "max_request_timeout_ms" => self.max_request_timeout_ms = u32::try_from(int()?)?,
            "shutdown_grace_ms" => self.shutdown_grace_ms = u64::try_from(int()?)?,
            "voters" => self.voters = Some(text()?.to_owned()),
            "heartbeat_ms" => self.heartbeat_ms = u64::try_from(int()?)?,
            "lease_ms" => self.lease_ms = u64::try_from(int()?)?,
            "session_timeout_ms" => self.session_timeout_ms = u64::try_from(int()?)?,
            "election_timeout_ms" => self.election_timeout_ms = u64::try_from(int()?)?,
            "replica_lag_max_ms" => self.replica_lag_max_ms = u64::try_from(int()?)?,
            "replica_fetch_wait_max_ms" => {
                let ms = u64::try_from(int()?)?;
                anyhow::ensure!(ms <= 400, "at most 400 (a follower resends a fetch unanswered for 500 ms)");
                self.replica_fetch_wait_max_ms = ms;
            }
            "leader_rebalance_interval_ms" => self.leader_rebalance_interval_ms = u64::try_from(int()?)?,
            "min_insync_replicas" => self.min_insync_replicas = usize::try_from(int()?)?,
            "read_wait_ms" => self.read_wait_ms = u64::try_from(int()?)?,
            "group_snapshot_records" | "table_snapshot_records" => {
                let records = u64::try_from(int()?)?;
                anyhow::ensure!(records >= 1, "at least 1");
                if key == "group_snapshot_records" {
                    self.group_snapshot_records = records;
                } else {
                    self.table_snapshot_records = records;
                }
            }
            _ => bail!("unknown setting"),
        }
        Ok(())
    }

    /// The number of shards to run.
    pub fn shard_count(&self) -> usize {
        self.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
    }
}

/// `--unsafe-index-plant`: a secondary-index bug planted on purpose.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexPlant {
    /// Term index followers never delete a row's old entry (a changed or deleted row stays
    /// listed under its old value).
    TermKeepsOldEntries,
    /// Document index queries return every key with an entry for the value, without
    /// checking the version visible at the query's snapshot still holds it.
    DocumentNoRecheck,
}

/// `--io-driver`: which compio driver the shards run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring where available, otherwise epoll (compio's choice at start).
    Auto,
    /// epoll (`polling`), the fallback where io_uring is blocked; file IO then runs on compio's
    /// blocking threads.
    Poll,
}

/// `--cores`: a count of 1 or more.
fn parse_cores(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be 1 or more".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_fills_what_flags_do_not_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("broker.toml");
        std::fs::write(&file, "node_id = 7\nlisten = \"127.0.0.1:1234\"\ndata_dir = \"/srv/skein\"\ncores = 3\n")
            .expect("write");
        let f = file.to_str().expect("utf8 path");
        let c = BrokerConfig::parse_with_file(["skein-broker", "--config", f, "--node-id", "9"]).expect("parses");
        assert_eq!(c.node_id, 9, "the flag wins");
        assert_eq!(c.listen, "127.0.0.1:1234".parse::<SocketAddr>().expect("addr"));
        assert_eq!(c.data_dir, PathBuf::from("/srv/skein"));
        assert_eq!(c.cores, Some(3));
        std::fs::write(&file, "colour = \"blue\"\n").expect("write");
        let err = BrokerConfig::parse_with_file(["skein-broker", "--config", f]).expect_err("unknown key");
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
        let usage = BrokerConfig::parse_with_file(["skein-broker", "--bogus"]).expect_err("usage");
        assert!(usage.downcast_ref::<clap::Error>().is_some());
        std::fs::write(&file, "node_id = 0\n").expect("write");
        let err = BrokerConfig::parse_with_file(["skein-broker", "--config", f]).expect_err("node 0 from a file");
        assert!(format!("{err:#}").contains("node id"), "{err:#}");
    }

    #[test]
    fn zero_cores_and_node_zero_are_usage_errors() {
        for args in [["skein-broker", "--cores", "0"], ["skein-broker", "--node-id", "0"]] {
            let err = BrokerConfig::parse_with_file(args).expect_err("refused");
            assert!(err.downcast_ref::<clap::Error>().is_some(), "{args:?}: {err:#}");
        }
    }

    #[test]
    fn a_cluster_broker_listens_on_its_own_voters_address() {
        let voters = "1@127.0.0.11:9092,2@127.0.0.12:9092";
        let parse = |listen: &str| {
            BrokerConfig::parse_with_file(["skein-broker", "--node-id", "2", "--voters", voters, "--listen", listen])
        };
        parse("127.0.0.12:9092").expect("its own entry");
        parse("0.0.0.0:9092").expect("every address, on its port");
        for wrong in ["127.0.0.11:9092", "127.0.0.12:9093", "0.0.0.0:9093"] {
            let err = parse(wrong).expect_err(wrong);
            assert!(format!("{err:#}").contains("is not node 2's --voters address 127.0.0.12:9092"), "{err:#}");
        }
        let err = BrokerConfig::parse_with_file(["skein-broker", "--node-id", "3", "--voters", voters])
            .expect_err("not a voter");
        assert!(format!("{err:#}").contains("not one of the --voters"), "{err:#}");
    }
}
