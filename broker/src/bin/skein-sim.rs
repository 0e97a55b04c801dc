//! `skein-sim`: runs simulator seeds S..S+N and reports each failing seed with the command
//! that replays it. Exit status 1 if any seed failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use skein_broker::core::replica::Plant;
use skein_broker::sim::{run, SimConfig};

static CURRENT_SEED: AtomicU64 = AtomicU64::new(0);

#[derive(Parser, Debug)]
#[command(name = "skein-sim", about = "Deterministic cluster simulation over many seeds")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Plant a bug to show the simulator catches it: no-fencing, no-truncation, early-ack,
    /// no-idempotence, no-generation-fencing (needs --groups), no-txn-epoch-bump,
    /// no-partition-check (these two need --transactions), no-read-validation,
    /// snapshot-as-serializable (these two need --tables), ignore-lineage, seal-before-dedup
    /// (these two need --splits).
    #[arg(long)]
    plant: Option<String>,
    /// Virtual milliseconds of faults per seed.
    #[arg(long, default_value_t = 6_000)]
    safety_ms: u64,
    /// Virtual milliseconds of healed running per seed.
    #[arg(long, default_value_t = 3_000)]
    liveness_ms: u64,
    /// Print every seed's result, not only failures.
    #[arg(long)]
    verbose: bool,
    /// Print the full checker report of failing seeds.
    #[arg(long)]
    report: bool,
    /// Producer acks: all (default) or leader (losses allowed only in the documented window
    /// before a failover; counted and reported).
    #[arg(long, default_value = "all")]
    acks: String,
    /// Also write the results as JSON (counts, throughput, violated properties, failing seeds
    /// with their replay commands).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Also run the consumer group workload (the real coordinator over an offsets partition;
    /// members that join, leave, crash and resume as zombies) and its checks.
    #[arg(long)]
    groups: bool,
    /// Also run the transaction workload (transaction coordinators over `__transaction_state`
    /// partitions, markers, transactional producers that restart and send late, consumers in
    /// both isolation levels) and its checks (no-txn-epoch-bump and no-partition-check need it).
    #[arg(long)]
    transactions: bool,
    /// Also run the table workload (a table of three partitions with the real table machine
    /// on every replica and the leader's concurrency control; list-append transactions at
    /// serializable, ssi, 2pl or serial by seed; multi-partition commits through the
    /// transaction coordinators), checked by Elle at the seed's level and for replica
    /// convergence (no-read-validation and snapshot-as-serializable need it).
    #[arg(long)]
    tables: bool,
    /// The data partitions are a hash-range topic that splits and merges among the faults:
    /// keyed producers routed by the range map, consumers reading parents to their seals
    /// before children, and the key-order check.
    #[arg(long)]
    splits: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let plant = match args.plant.as_deref() {
        None => Plant::default(),
        Some(name) => Plant::named(name)
            .ok_or_else(|| anyhow::anyhow!("unknown bug {name:?}: one of {}", Plant::NAMES.join(", ")))?,
    };
    // A panic (a broken assertion in the core) aborts the run: name the seed to replay.
    let plant_arg = args.plant.as_ref().map(|p| format!(" --plant {p}")).unwrap_or_default()
        + if args.groups { " --groups" } else { "" }
        + if args.transactions { " --transactions" } else { "" }
        + if args.tables { " --tables" } else { "" }
        + if args.splits { " --splits" } else { "" };
    let hint = plant_arg.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let seed = CURRENT_SEED.load(Ordering::Relaxed);
        eprintln!("seed {seed}: PANICKED");
        eprintln!("  replay: cargo run --release -p skein-broker --features sim --bin skein-sim -- --seeds 1 --start {seed}{hint}");
    }));
    let acks = match args.acks.as_str() {
        "all" => skein_broker::core::Acks::All,
        "leader" => skein_broker::core::Acks::Leader,
        other => bail!("unknown acks {other:?}: all or leader"),
    };
    let mut lost_in_window = 0u64;
    let started = Instant::now();
    let (mut passed, mut failed, mut events, mut ops) = (0u64, 0u64, 0u64, 0u64);
    let mut caught: std::collections::BTreeMap<String, u64> = Default::default();
    let mut failures = Vec::new();
    let mut failover_ms: Vec<u64> = Vec::new();
    let mut resized = 0u64;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_progress = Instant::now();
    for seed in args.start..args.start + args.seeds {
        CURRENT_SEED.store(seed, Ordering::Relaxed);
        if progress && last_progress.elapsed().as_secs_f64() >= 0.5 {
            last_progress = Instant::now();
            let done = seed - args.start;
            eprint!("\r{done}/{} seeds, {failed} failed, {:.0} s", args.seeds, started.elapsed().as_secs_f64());
        }
        let cfg = SimConfig {
            plant,
            acks,
            safety_ms: args.safety_ms,
            liveness_ms: args.liveness_ms,
            groups: args.groups,
            transactions: args.transactions,
            tables: args.tables,
            splits: args.splits,
            ..SimConfig::new(seed)
        };
        let out = run(&cfg);
        events += out.events;
        ops += out.ops + out.group_ops + out.txn_ops + out.table_ops;
        failover_ms.extend(&out.failover_ms);
        resized += out.resized_partitions;
        lost_in_window += out.lost_in_window;
        if out.passed() {
            passed += 1;
            if args.verbose {
                println!(
                    "seed {seed}: passed ({} events, {} ops, {} group ops, {} transaction ops, {} table transactions, {} faults)",
                    out.events, out.ops, out.group_ops, out.txn_ops, out.table_ops, out.faults
                );
            }
            continue;
        }
        failed += 1;
        let props = out.failed_properties();
        for p in &props {
            *caught.entry(p.clone()).or_default() += 1;
        }
        println!("seed {seed}: FAILED {}", props.join(", "));
        for v in out.violations.iter().take(3) {
            println!("  {v}");
        }
        for r in out.report.results.iter().filter(|r| r.failed()) {
            if let Some(v) = r.violations().first() {
                println!("  {}: {}", r.check.name(), v.detail);
            }
        }
        for r in out.group_report.results.iter().filter(|r| r.failed()) {
            if let Some(v) = r.violations.first() {
                println!("  {}: {v}", r.check.name());
            }
        }
        for r in out.txn_report.results.iter().filter(|r| r.failed()) {
            if let Some(v) = r.violations.first() {
                println!("  {}: {v}", r.check.name());
            }
        }
        if let Some(r) = out.table_report.as_ref().filter(|r| !r.valid) {
            for name in &r.forbidden_found {
                let example = r.anomalies.get(name).and_then(|a| a.first()).map(|a| a.detail.as_str());
                println!("  elle-{name} at {}: {}", r.level, example.unwrap_or(""));
            }
        }
        if args.report {
            println!("{}", out.report);
            if args.groups {
                println!("{}", out.group_report);
            }
            if args.transactions {
                println!("{}", out.txn_report);
            }
            if let Some(r) = &out.table_report {
                println!("{r}");
            }
        }
        let replay = format!(
            "cargo run --release -p skein-broker --features sim --bin skein-sim -- --seeds 1 --start {seed}{plant_arg}"
        );
        println!("  replay: {replay}");
        failures.push(serde_json::json!({
            "seed": seed,
            "properties": props,
            "violations": out.violations.iter().take(3).collect::<Vec<_>>(),
            "replay": replay,
        }));
    }
    if progress {
        eprint!("\r{:60}\r", "");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "simulated {events} events and {ops} client operations in {secs:.1} s: {:.0} events/s, {:.0} ops/s",
        events as f64 / secs,
        ops as f64 / secs
    );
    failover_ms.sort_unstable();
    let pct = |q: f64| failover_ms.get(((failover_ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    if !failover_ms.is_empty() {
        println!(
            "failover (leader crash to next acknowledged write, virtual ms) over {} crashes: median {} p90 {} p99 {} max {}",
            failover_ms.len(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            failover_ms.last().copied().unwrap_or(0)
        );
    }
    if args.splits {
        println!("splits and merges: {resized} partitions created (two per split, one per merge)");
    }
    if acks == skein_broker::core::Acks::Leader {
        println!("acks=leader: {lost_in_window} acknowledged records lost within the window (a lease period before their leader stopped); any other loss fails its seed");
    }
    if !caught.is_empty() {
        let list: Vec<String> = caught.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        println!("violated properties: {}", list.join(", "));
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "seeds": args.seeds,
            "start": args.start,
            "plant": args.plant,
            "passed": passed,
            "failed": failed,
            "seconds": secs,
            "events": events,
            "client_ops": ops,
            "events_per_sec": events as f64 / secs,
            "client_ops_per_sec": ops as f64 / secs,
            "violated": caught,
            "acks": args.acks,
            "lost_in_window": lost_in_window,
            "resized_partitions": resized,
            "failover_ms": {
                "count": failover_ms.len(),
                "p50": pct(0.5),
                "p90": pct(0.9),
                "p99": pct(0.99),
                "max": failover_ms.last().copied().unwrap_or(0),
            },
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    println!("seeds: {} passed: {passed} failed: {failed}", args.seeds);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
