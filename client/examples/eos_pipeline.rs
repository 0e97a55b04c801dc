//! An exactly-once consume-transform-produce pipeline: reads topic `--input` as a member of
//! `--group` (read_committed), writes `t:VALUE` (same key) to topic `--output` for every input
//! record, and commits the output records together with the input offsets in one transaction
//! every `--commit-records` records or `--commit-ms` milliseconds. Killed at any point (even
//! SIGKILL) and started again with the same `--transactional-id`, it continues where the last
//! committed transaction ended: a read_committed reader of the output sees each input record's
//! transform exactly once.
//!
//! Why it holds: the output records and the input offsets commit or abort as one transaction;
//! a restarted instance's init fences the old one and aborts its open transaction, and the
//! group then starts at the offsets the last committed transaction wrote (an offset fetch
//! waits while a transaction holding them is undecided). Within a run, a transaction that
//! fails is aborted and its input read again from its first offsets; one whose input
//! partitions were taken away by a rebalance is aborted too (the new owner reads them from the
//! committed offsets), and its offsets, sent with the member's epoch, are refused if the member
//! was fenced meanwhile.
//!
//! Stops after `--max-records` records (all committed), after `--idle-ms` without input (while
//! it owns partitions), or on SIGINT/SIGTERM (committing what it processed); prints
//! `processed N` (this run's committed records) on stdout.
//!
//! `cargo run -p skein-client --example eos_pipeline -- --bootstrap 127.0.0.1:9092 --input a
//! --output b --group pipeline --transactional-id pipeline-1`

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use skein_client::{
    Client, ClientConfig, ConsumerConfig, GroupConfig, GroupConsumer, Isolation, Partition, RebalanceListener,
    TransactionalProducer, TxnConfig, TxnError,
};

#[derive(Parser)]
#[command(about = "Exactly-once consume-transform-produce: INPUT -> t:VALUE -> OUTPUT")]
struct Args {
    /// Brokers to bootstrap from.
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic to read.
    #[arg(long)]
    input: String,
    /// Topic to write the transforms to.
    #[arg(long)]
    output: String,
    /// Consumer group (its committed offsets are the pipeline's progress).
    #[arg(long)]
    group: String,
    /// Transactional id: the same on every restart of this instance (a new instance with it
    /// fences the old one).
    #[arg(long)]
    transactional_id: String,
    /// Commit after this many records.
    #[arg(long, default_value_t = 100)]
    commit_records: usize,
    /// Commit an open transaction at least this often.
    #[arg(long, default_value_t = 100)]
    commit_ms: u64,
    /// Stop once this many records are processed and committed.
    #[arg(long)]
    max_records: Option<u64>,
    /// Stop after this long without input while owning partitions (everything processed is
    /// committed first).
    #[arg(long, default_value_t = 10_000)]
    idle_ms: u64,
}

/// Notes the partitions a rebalance takes away, for the loop to act on after the poll.
#[derive(Default)]
struct Revocations(Rc<RefCell<Vec<Partition>>>);

impl RebalanceListener for Revocations {
    fn on_assigned(&mut self, partitions: &[Partition]) {
        eprintln!("eos_pipeline: assigned {partitions:?}");
    }

    fn on_revoked(&mut self, partitions: &[Partition]) {
        eprintln!("eos_pipeline: revoked {partitions:?}");
        self.0.borrow_mut().extend(partitions.iter().cloned());
    }
}

/// The open transaction's input: per partition, the first offset it polled (where to read
/// again after an abort: every record from there on was processed in this transaction or not
/// at all) and the next offset to read after what it processed (what the commit sends).
#[derive(Default)]
struct Batch {
    first: BTreeMap<Partition, u64>,
    next: BTreeMap<Partition, u64>,
    records: u64,
    started: Option<Instant>,
}

impl Batch {
    fn offsets(&self) -> Vec<(String, u32, u64)> {
        self.next.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect()
    }
}

fn main() {
    let args = Args::parse();
    let runtime = compio::runtime::Runtime::new().expect("a compio runtime");
    match runtime.block_on(run(args)) {
        Ok(processed) => println!("processed {processed}"),
        Err(e) => {
            eprintln!("eos_pipeline: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> Result<u64, String> {
    let config =
        ClientConfig { brokers: args.bootstrap.clone(), client_id: "eos-pipeline".into(), ..Default::default() };
    let client = Client::with_config(config).await.map_err(|e| format!("connecting to {}: {e}", args.bootstrap))?;
    // First the producer: its init fences an earlier instance and aborts its open
    // transaction, so the offsets the group then starts from are decided ones.
    let mut producer = TransactionalProducer::init(client.clone(), TxnConfig::new(&args.transactional_id))
        .await
        .map_err(|e| format!("init transactional id '{}': {e}", args.transactional_id))?;
    // Offsets are committed only inside transactions: no auto-commit.
    let group = GroupConfig { auto_commit: None, ..GroupConfig::new(&args.group) };
    let consumer_config = ConsumerConfig { isolation: Isolation::ReadCommitted, ..ConsumerConfig::default() };
    let mut consumer = GroupConsumer::new(client, consumer_config, group);
    let revoked = Rc::new(RefCell::new(Vec::new()));
    consumer.set_listener(Box::new(Revocations(revoked.clone())));
    consumer.subscribe(&[args.input.as_str()]);
    let stop = watch_stop_signals().await;
    let result = pipeline(&args, &mut consumer, &mut producer, &revoked, &stop).await;
    if let Err(e) = consumer.close().await {
        eprintln!("eos_pipeline: leaving the group: {e}");
    }
    result
}

async fn pipeline(
    args: &Args,
    consumer: &mut GroupConsumer,
    producer: &mut TransactionalProducer,
    revoked: &RefCell<Vec<Partition>>,
    stop: &std::cell::Cell<bool>,
) -> Result<u64, String> {
    let mut committed: u64 = 0;
    let mut batch = Batch::default();
    let mut last_input = Instant::now();
    let limit = args.max_records.unwrap_or(u64::MAX);
    while committed + batch.records < limit && !stop.get() && last_input.elapsed() < Duration::from_millis(args.idle_ms)
    {
        let records = consumer.poll().await.map_err(|e| format!("polling {}: {e}", args.input))?;
        // Idle only counts while partitions are owned: after a crash the group gives them to
        // this instance only once the dead one's session timed out.
        if !records.is_empty() || consumer.assignment().is_empty() {
            last_input = Instant::now();
        }
        // Before any of them is processed: an abort reads every record of this poll again.
        for r in &records {
            batch.first.entry((r.topic.to_string(), r.partition)).or_insert(r.offset);
        }
        // A partition of the open transaction was taken away: its new owner starts at the
        // committed offsets, so this transaction's output of it must not commit.
        let lost = std::mem::take(&mut *revoked.borrow_mut());
        if lost.iter().any(|p| batch.next.contains_key(p)) {
            eprintln!("eos_pipeline: partitions of the open transaction were revoked; aborting it");
            abort(consumer, producer, &mut batch).await?;
            continue;
        }
        for r in records.iter().take(usize::try_from(limit - committed - batch.records).unwrap_or(usize::MAX)) {
            if !producer.in_transaction() {
                producer.begin().map_err(|e| format!("begin: {e}"))?;
                batch.started = Some(Instant::now());
            }
            let mut value = b"t:".to_vec();
            value.extend_from_slice(&r.value);
            let key = (r.topic.to_string(), r.partition);
            match producer.send(&args.output, None, r.key.as_deref(), &value).await {
                // The commit waits for every acknowledgement.
                Ok(_delivery) => {}
                Err(e) if e.is_abortable() || e.is_retriable() => {
                    eprintln!("eos_pipeline: send failed ({e}); aborting the transaction");
                    abort(consumer, producer, &mut batch).await?;
                    break;
                }
                Err(e) => return Err(format!("send to {}: {e}", args.output)),
            }
            batch.next.insert(key, r.offset + 1);
            batch.records += 1;
        }
        let due = batch.started.is_some_and(|t| t.elapsed() >= Duration::from_millis(args.commit_ms));
        if batch.records as usize >= args.commit_records || (due && producer.in_transaction()) {
            committed += commit(consumer, producer, &mut batch).await?;
        }
    }
    if producer.in_transaction() {
        committed += commit(consumer, producer, &mut batch).await?;
    }
    Ok(committed)
}

/// Commits the open transaction with its input offsets; returns how many records it
/// committed (0 if it had to be aborted: its input is read again).
async fn commit(
    consumer: &mut GroupConsumer,
    producer: &mut TransactionalProducer,
    batch: &mut Batch,
) -> Result<u64, String> {
    let offsets = batch.offsets();
    let mut outcome = match offsets.is_empty() {
        true => Ok(()),
        false => producer.send_offsets(&consumer.group_metadata(), &offsets).await,
    };
    if outcome.is_ok() {
        outcome = producer.commit().await;
        // The coordinator may have committed already: asking again learns it.
        for _ in 0..COMMIT_RETRIES_MAX {
            match &outcome {
                Err(e) if e.is_retriable() => outcome = producer.commit().await,
                _ => break,
            }
        }
    }
    match outcome {
        Ok(()) => {
            consumer.note_committed(&offsets);
            let records = batch.records;
            *batch = Batch::default();
            Ok(records)
        }
        Err(e) if e.is_abortable() => {
            eprintln!("eos_pipeline: transaction cannot commit ({e}); aborting it");
            abort(consumer, producer, batch).await?;
            Ok(0)
        }
        Err(e) => Err(describe(&e, "commit")),
    }
}

/// Aborts the open transaction and moves every partition still owned back to the first
/// record the transaction had read of it, so that input is processed again.
async fn abort(
    consumer: &mut GroupConsumer,
    producer: &mut TransactionalProducer,
    batch: &mut Batch,
) -> Result<(), String> {
    if producer.in_transaction() {
        let mut outcome = producer.abort().await;
        for _ in 0..COMMIT_RETRIES_MAX {
            match &outcome {
                Err(e) if e.is_retriable() => outcome = producer.abort().await,
                _ => break,
            }
        }
        outcome.map_err(|e| describe(&e, "abort"))?;
    }
    let owned = consumer.assignment();
    for ((topic, partition), first) in std::mem::take(&mut batch.first) {
        if owned.contains(&(topic.clone(), partition)) {
            consumer.seek(&topic, partition, first).await.map_err(|e| format!("seek {topic}/{partition}: {e}"))?;
        }
    }
    *batch = Batch::default();
    Ok(())
}

fn describe(e: &TxnError, what: &str) -> String {
    match e {
        TxnError::Fenced(_) => format!("{what}: fenced (another instance with this transactional id took over): {e}"),
        _ => format!("{what}: {e}"),
    }
}

/// A flag set once SIGINT or SIGTERM arrives.
async fn watch_stop_signals() -> Rc<std::cell::Cell<bool>> {
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    let stop = Rc::new(std::cell::Cell::new(false));
    let flag = stop.clone();
    compio::runtime::spawn(async move {
        let interrupt = std::pin::pin!(compio::signal::unix::signal(SIGINT));
        let terminate = std::pin::pin!(compio::signal::unix::signal(SIGTERM));
        let _ = futures_util::future::select(interrupt, terminate).await;
        flag.set(true);
    })
    .detach();
    skein_client::yield_now().await;
    stop
}

/// Further tries of a commit or abort whose coordinator steps ran out of retries.
const COMMIT_RETRIES_MAX: usize = 10;
