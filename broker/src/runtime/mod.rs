//! The thread-per-core shell: one shard (a thread with its own compio runtime) per core.
//!
//! Partitions are owned by shards (`owner(topic, partition)`); a connection is accepted on
//! shard 0 and handed to a shard round-robin; each request's partition work runs on the
//! owning shard, reached over bounded channels (`flume`), so nothing on the produce or fetch
//! path takes a lock. Topic metadata is owned by shard 0 and broadcast to the other shards as
//! immutable snapshots.
//!
//! Life of a request: `service::conn` reads a frame and `service::codec` decodes it into a typed
//! `Request`; `handlers` splits it per partition and sends each part to its owner; `shard`
//! appends or reads the log there and answers through a oneshot; `handlers` assembles a typed
//! `Response`; the codec encodes it and the connection writes responses in request order.
//! Topic creation and deletion (`topics`) run on shard 0. Imports point one way: `handlers`
//! and `topics` use `shard`, and all of them use `crate::service`, which uses none of them.

pub(crate) mod handlers;
mod shard;
mod topics;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::datadir::DataDirLock;
use crate::meta::Topics;
pub(crate) use crate::service::fail_stop;
pub use crate::service::EXIT_STORAGE_FAILURE;
use crate::BrokerConfig;
pub(crate) use shard::{Shard, ShardMsg};

/// Runs the broker until `shutdown` resolves, then drains in-flight requests, closes every log
/// cleanly and returns. `on_ready` gets the bound address once every partition is open.
pub fn run<F>(config: BrokerConfig, shutdown: F, on_ready: impl FnOnce(SocketAddr)) -> Result<()>
where
    F: std::future::Future<Output = ()> + 'static,
{
    raise_fd_limit();
    // Bound first, so a broker that cannot listen leaves no data directory behind.
    let listener = TcpListener::bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let _data_dir = DataDirLock::acquire(&config.data_dir)?;
    let topics = Arc::new(Topics::load(&config.data_dir)?);
    let addr = listener.local_addr()?;
    // Metadata advertises the bound address (port 0 becomes the port picked).
    let config = Arc::new(BrokerConfig { listen: addr, ..config });
    let n = config.shard_count();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| flume::bounded::<ShardMsg>(4096)).unzip();
    let connections = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let mut threads = Vec::new();
    let mut receivers = receivers.into_iter();
    let rx0 = receivers.next().expect("at least one shard");
    for (i, rx) in receivers.enumerate() {
        let id = i + 1;
        let (config, topics, senders, ready) = (config.clone(), topics.clone(), senders.clone(), ready_tx.clone());
        let handle = std::thread::Builder::new().name(format!("shard-{id}")).spawn(move || {
            shard_thread(
                id,
                config,
                topics,
                senders,
                rx,
                ready,
                None::<std::future::Pending<()>>,
                None::<Acceptor<fn(SocketAddr)>>,
            )
        })?;
        threads.push(handle);
    }
    let acceptor = Some((listener, connections));
    let result = shard_thread(
        0,
        config,
        topics,
        senders,
        rx0,
        ready_tx,
        Some(shutdown),
        acceptor.map(|a| (a, ready_rx, addr, on_ready)),
    );
    for t in threads {
        let _ = t.join();
    }
    result
}

type Acceptor<R> = ((TcpListener, Arc<AtomicUsize>), mpsc::Receiver<Result<()>>, SocketAddr, R);

#[allow(clippy::too_many_arguments)]
fn shard_thread<F, R>(
    id: usize,
    config: Arc<BrokerConfig>,
    topics: Arc<Topics>,
    peers: Vec<flume::Sender<ShardMsg>>,
    rx: flume::Receiver<ShardMsg>,
    ready: mpsc::Sender<Result<()>>,
    shutdown: Option<F>,
    acceptor: Option<Acceptor<R>>,
) -> Result<()>
where
    F: std::future::Future<Output = ()> + 'static,
    R: FnOnce(SocketAddr),
{
    let runtime = compio::runtime::Runtime::new().context("starting a compio runtime")?;
    runtime.block_on(async move {
        let shard = match Shard::open(id, config.clone(), topics, peers.clone()) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{e:#}");
                let _ = ready.send(Err(e));
                return Err(anyhow::anyhow!("shard {id}: {msg}"));
            }
        };
        let _ = ready.send(Ok(()));
        drop(ready);
        let loop_task = compio::runtime::spawn(shard.clone().message_loop(rx));
        compio::runtime::spawn(shard.clone().tick_loop()).detach();
        if let (Some(shutdown), Some(((listener, connections), ready_rx, addr, on_ready))) = (shutdown, acceptor) {
            let n = config.shard_count();
            for _ in 0..n {
                ready_rx.recv().context("a shard thread died during startup")??;
            }
            on_ready(addr);
            let stopping = Arc::new(AtomicBool::new(false));
            {
                let (peers, stopping) = (peers.clone(), stopping.clone());
                let max = config.max_connections;
                std::thread::Builder::new()
                    .name("acceptor".into())
                    .spawn(move || accept_thread(listener, peers, connections, max, stopping))?;
            }
            shutdown.await;
            tracing::info!("shutting down: no new connections; draining in-flight requests");
            stopping.store(true, Ordering::Relaxed);
            // Wake the acceptor so it sees the flag (a connection to ourselves).
            let _ = std::net::TcpStream::connect(addr);
            for peer in &peers {
                let _ = peer.send_async(ShardMsg::Shutdown).await;
            }
        }
        let _ = loop_task.await;
        Ok(())
    })
}

/// Accepts connections on a dedicated thread (blocking `accept`) and deals them to shards
/// round-robin; each shard registers its sockets with its own runtime.
fn accept_thread(
    listener: TcpListener,
    peers: Vec<flume::Sender<ShardMsg>>,
    connections: Arc<AtomicUsize>,
    max_connections: usize,
    stopping: Arc<AtomicBool>,
) {
    let mut next = 0usize;
    for stream in listener.incoming() {
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if connections.load(Ordering::Relaxed) >= max_connections {
            tracing::warn!(peer = ?stream.peer_addr().ok(), max_connections, "connection limit reached; closing new connection");
            continue;
        }
        connections.fetch_add(1, Ordering::Relaxed);
        let target = next % peers.len();
        next = next.wrapping_add(1);
        if peers[target].send(ShardMsg::Connection(stream, connections.clone())).is_err() {
            connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    }
}

fn raise_fd_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < hard {
            let _ = rlimit::Resource::NOFILE.set(hard, hard);
        }
    }
}
