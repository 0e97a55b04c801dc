//! `skein-broker`: startup and wiring only.
//!
//! Stub until the single-node broker issue: opens the node's partition log under
//! `--data-dir` (running recovery and reporting it), prints `ready`, and on SIGINT or SIGTERM
//! closes the log cleanly and exits 0. It runs on a compio runtime, the thread-per-core
//! runtime the real broker will use (io_uring, falling back to epoll where it is blocked).

use std::pin::pin;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::future::select;
use skein_broker::BrokerConfig;
use skein_log::storage::FileStorage;
use skein_log::types::Timestamp;
use skein_log::{Log, LogConfig};

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SKEIN_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let config = BrokerConfig::parse();
    let runtime = compio::runtime::Runtime::new().context("starting the compio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: BrokerConfig) -> Result<()> {
    let dir = config.data_dir.join("__stub-0");
    let storage = FileStorage::new(&dir).with_context(|| format!("opening data dir {}", dir.display()))?;
    let log =
        Log::open(storage, LogConfig::default(), now()).with_context(|| format!("recovering log {}", dir.display()))?;
    let report = log.recovery();
    tracing::info!(
        node_id = config.node_id,
        listen = %config.listen,
        log = %dir.display(),
        log_start = %log.log_start_offset(),
        log_end = %log.log_end_offset(),
        clean_shutdown = report.clean_shutdown,
        segments_scanned = report.segments_scanned,
        "log opened; no listener yet (stub broker)"
    );
    println!("ready");
    let interrupt = pin!(compio::signal::unix::signal(SIGINT));
    let terminate = pin!(compio::signal::unix::signal(SIGTERM));
    match select(interrupt, terminate).await.factor_first().0 {
        Ok(()) => tracing::info!("shutdown signal received; closing the log"),
        Err(e) => return Err(e).context("waiting for a shutdown signal"),
    }
    log.close(now()).with_context(|| format!("closing log {}", dir.display()))?;
    Ok(())
}

fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}
