//! Measures the partition log against the raw disk, in one run, alternating ABAB.
//!
//! Throughput (default): append `--bytes` (1 GiB) of 1 KiB records in 64 KiB batches to a
//! fresh log with one sync at the end, against writing the same bytes with plain sequential
//! `pwrite`s and one fdatasync. Prints `log/raw throughput ratio: X` (median over rounds).
//!
//! `--sync-each`: appends 10,000 batches of 4 KiB with durability `always` (one fdatasync
//! each) against raw write + fdatasync of the same sizes. Prints
//! `log/raw p99 latency ratio: Y` (median over rounds).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use skein_bench::{batch_fitting, batch_sized};
use skein_log::batch::RecordBatch;
use skein_log::storage::FileStorage;
use skein_log::types::Timestamp;
use skein_log::{Durability, Log, LogConfig};

#[derive(Parser, Debug)]
#[command(about = "Partition log against raw sequential writes, same run, ABAB")]
struct Args {
    /// Directory for the test files (on the disk to measure); emptied of its own files after.
    #[arg(long)]
    dir: PathBuf,
    /// Latency mode: one fdatasync per 4 KiB batch instead of one at the end.
    #[arg(long)]
    sync_each: bool,
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Batches per latency run.
    #[arg(long, default_value_t = 10_000)]
    batches: u64,
    /// A/B pairs (at least 3).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let report = if args.sync_each { latency(&args)? } else { throughput(&args)? };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn throughput(args: &Args) -> Result<serde_json::Value> {
    let mut batch = batch_fitting(64 * 1024, 1024);
    let batch_bytes = batch.as_bytes().len() as u64;
    let batches = args.bytes.div_ceil(batch_bytes);
    let total = batches * batch_bytes;
    println!(
        "throughput: {} batches of {} bytes ({} records of 1 KiB), {:.2} GiB per run, one sync at the end",
        batches,
        batch_bytes,
        batch.header().record_count,
        total as f64 / (1u64 << 30) as f64
    );
    println!("{:>5} {:>12} {:>12} {:>8}", "round", "log MB/s", "raw MB/s", "log/raw");
    // One uncounted full-size pair first: the first gigabyte written in a run pays for
    // reclaiming page cache and cold file-system state, which neither side should be charged.
    eprintln!("warm-up pair (not counted)...");
    log_append_run(&args.dir, &mut batch, batches)?;
    raw_write_run(&args.dir, batch.as_bytes(), batches)?;
    let mut rows = Vec::new();
    for round in 0..args.rounds {
        // ABBA order inside the run: odd rounds start with the log, even ones with raw, so
        // neither side always inherits the other's page-cache and writeback state.
        let (log_secs, raw_secs) = if round % 2 == 0 {
            let log_secs = log_append_run(&args.dir, &mut batch, batches)?;
            (log_secs, raw_write_run(&args.dir, batch.as_bytes(), batches)?)
        } else {
            let raw_secs = raw_write_run(&args.dir, batch.as_bytes(), batches)?;
            (log_append_run(&args.dir, &mut batch, batches)?, raw_secs)
        };
        let (log_mbps, raw_mbps) = (total as f64 / log_secs / 1e6, total as f64 / raw_secs / 1e6);
        println!("{:>5} {:>12.1} {:>12.1} {:>8.3}", round + 1, log_mbps, raw_mbps, log_mbps / raw_mbps);
        rows.push(serde_json::json!({"round": round + 1, "log_bytes_per_sec": total as f64 / log_secs,
            "raw_bytes_per_sec": total as f64 / raw_secs, "ratio": log_mbps / raw_mbps}));
    }
    let ratio = median(rows.iter().map(|r| r["ratio"].as_f64().unwrap_or(0.0)).collect());
    println!("log/raw throughput ratio: {ratio:.3}");
    Ok(serde_json::json!({"mode": "throughput", "bytes_per_run": total, "batch_bytes": batch_bytes,
        "rounds": rows, "ratio_median": ratio}))
}

fn latency(args: &Args) -> Result<serde_json::Value> {
    let mut batch = batch_sized(4096, 4);
    let batch_bytes = batch.as_bytes().len();
    println!("latency: {} batches of {} bytes, fdatasync after each", args.batches, batch_bytes);
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "round", "log p50us", "log p99us", "raw p50us", "raw p99us", "p99 l/r"
    );
    log_sync_each_run(&args.dir, &mut batch, args.batches.min(200))?;
    raw_sync_each_run(&args.dir, batch.as_bytes(), args.batches.min(200))?;
    let mut rows = Vec::new();
    for round in 0..args.rounds {
        let (log_h, raw_h) = if round % 2 == 0 {
            let log_h = log_sync_each_run(&args.dir, &mut batch, args.batches)?;
            (log_h, raw_sync_each_run(&args.dir, batch.as_bytes(), args.batches)?)
        } else {
            let raw_h = raw_sync_each_run(&args.dir, batch.as_bytes(), args.batches)?;
            (log_sync_each_run(&args.dir, &mut batch, args.batches)?, raw_h)
        };
        let ratio = log_h.value_at_quantile(0.99) as f64 / raw_h.value_at_quantile(0.99).max(1) as f64;
        println!(
            "{:>5} {:>10} {:>10} {:>10} {:>10} {:>8.3}",
            round + 1,
            log_h.value_at_quantile(0.5),
            log_h.value_at_quantile(0.99),
            raw_h.value_at_quantile(0.5),
            raw_h.value_at_quantile(0.99),
            ratio
        );
        rows.push(serde_json::json!({"round": round + 1,
            "log_us": {"p50": log_h.value_at_quantile(0.5), "p99": log_h.value_at_quantile(0.99), "max": log_h.max()},
            "raw_us": {"p50": raw_h.value_at_quantile(0.5), "p99": raw_h.value_at_quantile(0.99), "max": raw_h.max()},
            "p99_ratio": ratio}));
    }
    let ratio = median(rows.iter().map(|r| r["p99_ratio"].as_f64().unwrap_or(0.0)).collect());
    println!("log/raw p99 latency ratio: {ratio:.3}");
    Ok(serde_json::json!({"mode": "sync_each", "batches": args.batches, "batch_bytes": batch_bytes,
        "rounds": rows, "p99_ratio_median": ratio}))
}

/// Appends `batches` copies of `batch` to a fresh log, then syncs; returns seconds.
fn log_append_run(dir: &Path, batch: &mut RecordBatch<Vec<u8>>, batches: u64) -> Result<f64> {
    let path = dir.join("log-vs-raw-log");
    let config = LogConfig { durability: Durability::Never, ..LogConfig::default() };
    let mut log = Log::open(FileStorage::new(&path)?, config, Timestamp(0)).context("opening the log")?;
    // The log keeps each appended batch's buffer until it is written: one buffer per append,
    // made before the clock starts (a broker's batches arrive in their own buffers too).
    let copies: Vec<RecordBatch<Vec<u8>>> = (0..batches).map(|_| batch.clone()).collect();
    let started = Instant::now();
    for b in copies {
        log.append(b, Timestamp(0))?;
    }
    log.sync(Timestamp(0))?;
    let secs = started.elapsed().as_secs_f64();
    log.delete()?;
    Ok(secs)
}

/// Writes `batches` copies of `bytes` sequentially to a fresh file, then fdatasyncs.
fn raw_write_run(dir: &Path, bytes: &[u8], batches: u64) -> Result<f64> {
    let (path, file) = fresh_file(dir)?;
    let started = Instant::now();
    let mut pos = 0u64;
    for _ in 0..batches {
        file.write_all_at(bytes, pos)?;
        pos += bytes.len() as u64;
    }
    file.sync_data()?;
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(secs)
}

fn log_sync_each_run(dir: &Path, batch: &mut RecordBatch<Vec<u8>>, batches: u64) -> Result<Histogram<u64>> {
    let path = dir.join("log-vs-raw-log");
    let config = LogConfig { durability: Durability::Always, ..LogConfig::default() };
    let mut log = Log::open(FileStorage::new(&path)?, config, Timestamp(0)).context("opening the log")?;
    let mut h = histogram()?;
    for _ in 0..batches {
        let b = batch.clone();
        let started = Instant::now();
        log.append(b, Timestamp(0))?;
        log.sync(Timestamp(0))?;
        record(&mut h, started.elapsed())?;
    }
    log.delete()?;
    Ok(h)
}

fn raw_sync_each_run(dir: &Path, bytes: &[u8], batches: u64) -> Result<Histogram<u64>> {
    let (path, file) = fresh_file(dir)?;
    let mut h = histogram()?;
    let mut pos = 0u64;
    for _ in 0..batches {
        let started = Instant::now();
        file.write_all_at(bytes, pos)?;
        file.sync_data()?;
        pos += bytes.len() as u64;
        record(&mut h, started.elapsed())?;
    }
    std::fs::remove_file(&path)?;
    Ok(h)
}

fn fresh_file(dir: &Path) -> Result<(PathBuf, File)> {
    let path = dir.join("log-vs-raw-raw");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    Ok((path, file))
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn record(h: &mut Histogram<u64>, d: Duration) -> Result<()> {
    h.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
