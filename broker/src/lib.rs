//! Skein's broker: a single node serving the wire protocol of `skein_client::wire` over
//! thread-per-core shards, each owning a set of partition logs.
//!
//! - [`meta`]: topic metadata, persisted atomically.
//! - [`runtime`]: shards (one compio runtime per core), connections, request handling,
//!   group commit and long-polling fetches.
//!
//! Replication, the controller and the simulator come with the cluster issues (see
//! ARCHITECTURE.md).
#![warn(missing_docs)]

pub mod meta;
pub mod runtime;

use std::net::SocketAddr;
use std::path::PathBuf;

/// Broker settings: flags, each also settable from the environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "skein-broker", version, about = "Skein broker: a single node serving topics over TCP")]
pub struct BrokerConfig {
    /// This node's id.
    #[arg(long, env = "SKEIN_NODE_ID", default_value_t = 1)]
    pub node_id: u32,
    /// Address to listen on (port 0 picks a free port, printed at startup).
    #[arg(long, env = "SKEIN_LISTEN", default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Directory holding topic metadata and partition logs.
    #[arg(long, env = "SKEIN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Cores to use, one shard (thread with its own runtime) each; default: all.
    #[arg(long, env = "SKEIN_CORES")]
    pub cores: Option<usize>,
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
    /// Cap on a produce request's own timeout (for acks=all), in milliseconds.
    #[arg(long, env = "SKEIN_MAX_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub max_request_timeout_ms: u32,
    /// Shutdown waits this long for in-flight requests before closing logs.
    #[arg(long, env = "SKEIN_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
}

impl BrokerConfig {
    /// The number of shards to run.
    pub fn shard_count(&self) -> usize {
        self.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
    }
}
