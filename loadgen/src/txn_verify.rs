//! The transactional producers of `skein-loadgen verify --transactions`, and the end-of-run
//! wait for every partition's last stable offset.
//!
//! Each producer is a [`TransactionalProducer`] with its own transactional id
//! ([`transactional_id`]). A transaction writes 2 to 5 unique values to consecutive
//! partitions (from a random one), then commits, or aborts one time in [`ABORT_ONE_IN`]. What
//! happened is recorded as a [`Txn`]: a transaction counts as aborted only if no commit was
//! ever asked for (see [`crate::txn_check`]). After any fatal error (fenced, or the producer
//! gave up) a new producer is initialised under the same id, which fences the old one and
//! aborts what it left open. When the run stops each producer ends its transaction; if it
//! cannot, a new instance is initialised so nothing stays open.
//!
//! For the base checker ([`skein_broker::check`]) every value becomes a send: acknowledged at
//! its offset if its transaction committed, failed if it was aborted, unknown otherwise.
//!
//! Not done: consume-transform-produce (offsets in transactions; see the `eos_pipeline`
//! test), several producers sharing one transactional id at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use skein_broker::check::{self, SendOp, SendOutcome};
use skein_client::{Client, ClientConfig, Delivery, Isolation, ProducerConfig, TransactionalProducer, TxnConfig};

use crate::txn_check::{Fate, Reached, Read, Stuck, Txn, TxnRecord};

/// The transactional id of producer `index` of a run on `topic`.
pub fn transactional_id(topic: &str, index: usize) -> String {
    format!("{topic}-txn-{index}")
}

/// What one transactional producer needs.
pub(crate) struct TxnProducerConfig<'a> {
    pub index: usize,
    pub topic: &'a str,
    pub client: ClientConfig,
    pub partitions: u32,
    pub rate: f64,
    pub start: Instant,
    pub transaction_timeout: Duration,
}

/// Runs producer `cfg.index` until `stop`; returns its transactions.
pub(crate) async fn produce(cfg: &TxnProducerConfig<'_>, stop: &AtomicBool) -> Result<Vec<Txn>> {
    let client = connect(&cfg.client, stop).await?;
    let process = cfg.index as u32;
    let mut seed = 0x7a3c_91f4_55e1_0b2du64 ^ (cfg.index as u64 + 1).wrapping_mul(0x9e37_79b9);
    let mut txns = Vec::new();
    let mut producer: Option<TransactionalProducer> = None;
    let mut k: u64 = 0;
    let gap = Duration::from_secs_f64(1.0 / cfg.rate.max(0.001));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let Some(p) = producer.as_mut() else {
            producer = init(&client, cfg).await;
            if producer.is_none() {
                compio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        let size = 2 + random(&mut seed, 4) as u64;
        let first = random(&mut seed, cfg.partitions as usize) as u32;
        let abort = random(&mut seed, ABORT_ONE_IN) == 0;
        let mut txn = Txn {
            process,
            index: txns.len() as u64,
            records: Vec::new(),
            commit_invoke_us: None,
            committed: false,
            complete_us: 0,
            error: None,
            unsent: 0,
        };
        let alive = one_transaction(p, cfg, &mut txn, (size, first, abort), &mut k, (&mut next, gap)).await;
        txn.complete_us = micros(cfg.start);
        txns.push(txn);
        if !alive {
            producer = None;
        }
    }
    // End what is open: a dead producer's transaction is aborted by a new instance.
    if producer.as_ref().is_none_or(TransactionalProducer::in_transaction) {
        drop(producer);
        let deadline = Instant::now() + cfg.transaction_timeout;
        while init(&client, cfg).await.is_none() && Instant::now() < deadline {
            compio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(txns)
}

/// One transaction of `size` values from partition `first` on, committed unless `abort`;
/// records it in `txn`. Returns whether the producer can go on.
async fn one_transaction(
    p: &mut TransactionalProducer,
    cfg: &TxnProducerConfig<'_>,
    txn: &mut Txn,
    (size, first, abort): (u64, u32, bool),
    k: &mut u64,
    (next, gap): (&mut Instant, Duration),
) -> bool {
    if let Err(e) = p.begin() {
        tracing::debug!(error = %e, "begin failed");
        txn.error = Some(e.code_name());
        return !e.is_fatal();
    }
    let mut deliveries: Vec<(usize, Delivery)> = Vec::new();
    let mut failed = false;
    for j in 0..size {
        let partition = (first + j as u32) % cfg.partitions;
        let value = ((cfg.index as u64 + 1) << 40) | *k;
        *k += 1;
        let invoke_us = micros(cfg.start);
        match p.send(cfg.topic, Some(partition), None, &value.to_le_bytes()).await {
            Ok(d) => {
                deliveries.push((txn.records.len(), d));
                txn.records.push(TxnRecord { value, partition, offset: None, invoke_us });
            }
            // Not queued: not part of the transaction (and not recorded).
            Err(e) if e.is_retriable() || matches!(e, skein_client::TxnError::Invalid(_)) => {
                txn.unsent += 1;
            }
            Err(e) => {
                tracing::debug!(error = %e, "send failed");
                txn.error = Some(e.code_name());
                failed = true;
                break;
            }
        }
        crate::verify::pace(next, gap).await;
    }
    let alive = if abort || failed { end_abort(p, txn).await } else { end_commit(p, cfg, txn).await };
    // Every record was flushed by the end (or the producer is dead): offsets are known or
    // never will be.
    for (i, d) in deliveries {
        if let Ok(Ok((_, offset))) = compio::time::timeout(DELIVERY_WAIT, d).await {
            txn.records[i].offset = Some(offset);
        }
    }
    alive
}

/// Commits, retrying a retriable failure; a failure before the commit was asked for (a record
/// failed) aborts instead. Returns whether the producer can go on.
async fn end_commit(p: &mut TransactionalProducer, cfg: &TxnProducerConfig<'_>, txn: &mut Txn) -> bool {
    // Every record first, so that the commit call's time is when EndTxn can leave.
    if let Err(e) = p.flush().await {
        tracing::debug!(error = %e, "flush before commit failed");
        txn.error = Some(e.code_name());
        return if e.is_fatal() { false } else { end_abort(p, txn).await };
    }
    txn.commit_invoke_us = Some(micros(cfg.start));
    for _ in 0..END_ATTEMPTS {
        match p.commit().await {
            Ok(()) => {
                txn.committed = true;
                return true;
            }
            Err(e) if e.is_retriable() => {
                tracing::debug!(error = %e, "commit not done; retrying");
                txn.error = Some(e.code_name());
            }
            Err(e) => {
                tracing::debug!(error = %e, "commit failed");
                txn.error = Some(e.code_name());
                return false;
            }
        }
    }
    false
}

/// Aborts, retrying a retriable failure. Returns whether the producer can go on.
async fn end_abort(p: &mut TransactionalProducer, txn: &mut Txn) -> bool {
    for _ in 0..END_ATTEMPTS {
        match p.abort().await {
            Ok(()) => return true,
            Err(e) if e.is_retriable() => {
                tracing::debug!(error = %e, "abort not done; retrying");
                txn.error = Some(e.code_name());
            }
            Err(e) => {
                tracing::debug!(error = %e, "abort failed");
                txn.error = Some(e.code_name());
                return false;
            }
        }
    }
    false
}

async fn init(client: &Client, cfg: &TxnProducerConfig<'_>) -> Option<TransactionalProducer> {
    let config = TxnConfig {
        transaction_timeout: cfg.transaction_timeout,
        producer: ProducerConfig {
            linger: Duration::ZERO,
            retries: 20,
            retry_backoff: Duration::from_millis(100),
            request_timeout_ms: 5_000,
            ..ProducerConfig::default()
        },
        coordinator_timeout: COORDINATOR_TIMEOUT,
        ..TxnConfig::new(&transactional_id(cfg.topic, cfg.index))
    };
    match TransactionalProducer::init(client.clone(), config).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::debug!(error = %e, "init failed; retrying");
            None
        }
    }
}

async fn connect(config: &ClientConfig, stop: &AtomicBool) -> Result<Client> {
    loop {
        match Client::with_config(config.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if !stop.load(Ordering::Relaxed) => {
                tracing::debug!(error = %e, "connect failed; retrying");
                compio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Every value of `txns` as a send for the base checker (see the module documentation).
pub(crate) fn sends(txns: &[Txn]) -> Vec<check::Op> {
    let mut ops = Vec::new();
    for txn in txns {
        for rec in &txn.records {
            let outcome = match (txn.fate(), rec.offset) {
                (Fate::Committed, Some(offset)) => {
                    SendOutcome::Ok { partition: check::PartitionId(rec.partition), offset: check::Offset(offset) }
                }
                (Fate::Aborted, _) => SendOutcome::Failed,
                _ => SendOutcome::Unknown,
            };
            ops.push(check::Op::Send(SendOp {
                process: check::ProcessId(txn.process),
                partition: Some(check::PartitionId(rec.partition)),
                key: None,
                value: check::Value(rec.value),
                invoke_us: rec.invoke_us,
                complete_us: txn.complete_us.max(rec.invoke_us),
                outcome,
            }));
        }
    }
    ops
}

/// The offsets a read_committed reader passes over, as declared gaps for the base checks:
/// every offset below the end of the final uncommitted read (`process`) that it did not return
/// (markers), and the offsets of values of transactions that did not commit (aborted, or of
/// unknown fate and seen by no read_committed reader), where that read found them.
pub(crate) fn gaps(txns: &[Txn], reads: &[Read], reached: &[Reached], process: u32) -> Vec<check::Op> {
    let committed: std::collections::HashSet<u64> =
        reads.iter().filter(|r| r.committed).flat_map(|r| r.records.iter().map(|&(_, v)| v)).collect();
    let undone: std::collections::HashSet<u64> = txns
        .iter()
        .filter(|t| match t.fate() {
            Fate::Committed => false,
            Fate::Aborted => true,
            Fate::Unknown => !t.records.iter().any(|r| committed.contains(&r.value)),
        })
        .flat_map(|t| t.records.iter().map(|r| r.value))
        .collect();
    let mut ops = Vec::new();
    for reach in reached.iter().filter(|r| r.process == process) {
        let mut held = std::collections::BTreeSet::new();
        for read in reads.iter().filter(|r| r.process == process && r.partition == reach.partition) {
            for &(offset, value) in &read.records {
                if !undone.contains(&value) {
                    held.insert(offset);
                }
            }
        }
        for offset in (reach.start..reach.end).filter(|o| !held.contains(o)) {
            ops.push(check::Op::Gap(check::GapOp {
                partition: check::PartitionId(reach.partition),
                offset: check::Offset(offset),
            }));
        }
    }
    ops
}

/// Waits until every partition's last stable offset reaches its high watermark (every
/// transaction decided), at most `bound`; returns the partitions that did not.
pub(crate) async fn wait_stable(client: &Client, topic: &str, partitions: u32, bound: Duration) -> Vec<Stuck> {
    let deadline = Instant::now() + bound;
    loop {
        let mut stuck = Vec::new();
        for p in 0..partitions {
            let hw =
                client.list_offset_isolated(topic, p, skein_client::wire::LATEST, Isolation::ReadUncommitted).await;
            let lso = client.list_offset_isolated(topic, p, skein_client::wire::LATEST, Isolation::ReadCommitted).await;
            match (lso, hw) {
                (Ok(lso), Ok(hw)) if lso >= hw => {}
                (Ok(lso), Ok(hw)) => stuck.push(Stuck { partition: p, last_stable: lso, high_watermark: hw }),
                (lso, hw) => {
                    tracing::debug!(?lso, ?hw, partition = p, "list offsets failed");
                    stuck.push(Stuck { partition: p, last_stable: 0, high_watermark: 0 });
                }
            }
        }
        if stuck.is_empty() || Instant::now() >= deadline {
            return stuck;
        }
        compio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn micros(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn random(seed: &mut u64, n: usize) -> usize {
    (skein_log::storage::splitmix(seed) % n.max(1) as u64) as usize
}

/// One transaction in this many is aborted on purpose.
pub const ABORT_ONE_IN: usize = 5;
/// Commit or abort calls per transaction before the producer is given up.
const END_ATTEMPTS: usize = 5;
/// Each coordinator step's retry bound (shorter than the client's 30 s, so that a producer
/// stuck behind a dead coordinator starts over sooner).
const COORDINATOR_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a record's outcome is awaited after its transaction ended.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);
