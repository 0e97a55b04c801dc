//! `skein-broker`: configuration, logging and startup; the broker itself is
//! `skein_broker::cluster` (alone, a cluster of one voter).

use std::pin::pin;

use anyhow::Result;
use futures_util::future::select;
use skein_broker::BrokerConfig;

/// mimalloc keeps freed memory for reuse: a produce request's frame buffer (about a megabyte)
/// lives until its records are written, and with the system allocator each new one was fresh
/// pages to fault in and zero (see ARCHITECTURE.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// Exits 1 with one line naming what failed (no backtrace: a startup failure such as a held
/// data directory or a taken port is an operating error, not a bug).
fn main() {
    // A panic stops the process in every build, as `panic = "abort"` does in release: a test
    // against a debug or test-profile broker (where panics unwind, and a panicking task or
    // thread could leave the rest serving) sees the same outcome a user would.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    if let Err(e) = run() {
        eprintln!("skein-broker: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SKEIN_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match BrokerConfig::parse_with_file(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(usage) => usage.exit(),
            Err(e) => return Err(e),
        },
    };
    let node_id = config.node_id;
    let data_dir = config.data_dir.clone();
    let shards = config.shard_count();
    let shutdown = async {
        let interrupt = pin!(compio::signal::unix::signal(SIGINT));
        let terminate = pin!(compio::signal::unix::signal(SIGTERM));
        let _ = select(interrupt, terminate).await;
    };
    let cluster = config.voters.is_some();
    let ready = move |addr| {
        if cluster {
            tracing::info!(node_id, %addr, data_dir = %data_dir.display(), shards, "broker ready (cluster mode)");
        } else {
            tracing::info!(node_id, %addr, data_dir = %data_dir.display(), shards, "broker ready (a cluster of one)");
        }
        // Tests and scripts wait for this line; it carries the bound address (port 0 picks one).
        println!("ready {addr}");
    };
    // One code path: without --voters the broker is a cluster of one voter.
    skein_broker::cluster::run(config, shutdown, ready)?;
    tracing::info!("stopped cleanly");
    Ok(())
}
