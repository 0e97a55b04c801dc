//! Skein's broker. Until the single-node broker issue lands this crate holds only the
//! broker's configuration; the binary `skein-broker` opens (and recovers) the node's log and
//! waits for a shutdown signal. See ARCHITECTURE.md for the planned `core` / `runtime` / `sim`
//! layout.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;

/// Broker settings: flags, each also settable from the environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "skein-broker",
    version,
    about = "Skein broker (stub: opens the node's log, waits for SIGINT/SIGTERM)"
)]
pub struct BrokerConfig {
    /// This node's id.
    #[arg(long, env = "SKEIN_NODE_ID", default_value_t = 1)]
    pub node_id: u32,
    /// Address to listen on (the listener arrives with the single-node broker issue).
    #[arg(long, env = "SKEIN_LISTEN", default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Directory holding the node's partition logs.
    #[arg(long, env = "SKEIN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Cores to use (one runtime per core); default: all.
    #[arg(long, env = "SKEIN_CORES")]
    pub cores: Option<usize>,
}
