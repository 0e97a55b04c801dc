//! `skein-loadgen tables`: the workloads of PostgreSQL's peer benchmark (`pgserbench`,
//! /work/shared/peers/postgres) on a Skein table, with the same report keys, so the two can
//! be put side by side.
//!
//! Closed loop: `clients` workers on one thread (as pgserbench's current-thread runtime), each
//! starting a transaction as soon as the last one committed, for a fixed time. An aborted
//! attempt is retried at once with the same intent until it commits (or, past the deadline
//! plus `grace`, is abandoned); latency runs from the first attempt's start to the commit.
//! A failure to talk to the cluster (a timeout, a leader change under way) leaves the outcome
//! unknown: counted in `errors`, not retried (an append could land twice), and an append's
//! values may then be in the final lists or not (`info` in the history).
//!
//! - transfer (`accounts` N): read two random accounts; if the source holds at least 1, move 1
//!   (two puts, in key order). Invariant, from a scan at the end: the sum is N × the initial
//!   balance, no balance is negative, every account is there.
//! - append (`keys` K): 1 to `max_appends` appends and 1 to `max_reads` reads over random
//!   keys, in random order (appends issued in key order, as pgserbench does); a key's value is
//!   the comma-separated list of what was appended. Checks, against the final lists: every
//!   committed read is a prefix of its key's list, every committed append is there once, and
//!   nothing else is. `history` writes the committed transactions in the Elle JSON-lines
//!   format of `skein_broker::check::elle`, for `skein-elle`.
//!
//! Levels: `serial` runs each transaction as one deterministic procedure ([`Table::run`]:
//! `Step::Transfer`; `Step::Append`, and for a read a compare-and-set that never matches, so
//! it writes nothing and answers the value): it never aborts on conflict, and every key must
//! be in one partition. Every other level runs interactive [`skein_client::TableTxn`]s (get,
//! put, commit).
//!
//! Not done here: writeskew (pgserbench's third workload), and no WAL statistics (the report's
//! `wal` object is PostgreSQL's; `fsync` names the table's `flush.ms` instead).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use skein_client::wire::Level;
use skein_client::{Client, ClientConfig, Step, Table, TableError};

/// Which workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Transfers between accounts.
    Transfer,
    /// List append.
    Append,
}

impl Workload {
    /// Its name in reports (pgserbench's).
    pub fn name(self) -> &'static str {
        match self {
            Workload::Transfer => "transfer",
            Workload::Append => "append",
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Workload, String> {
        match s {
            "transfer" => Ok(Workload::Transfer),
            "append" => Ok(Workload::Append),
            _ => Err(format!("unknown workload '{s}' (transfer, append)")),
        }
    }
}

/// Parses an isolation level name (read-committed, snapshot, serializable, serial, 2pl, ssi).
pub fn parse_level(s: &str) -> Result<Level, String> {
    Level::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Level::ALL.iter().map(|l| l.name()).collect();
        format!("unknown isolation level '{s}' ({})", names.join(", "))
    })
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct TablesConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// The table (created; must not exist).
    pub table: String,
    /// The workload.
    pub workload: Workload,
    /// transfer: accounts.
    pub accounts: u32,
    /// transfer: each account's initial balance.
    pub initial_balance: i64,
    /// append: keys.
    pub keys: u32,
    /// append: each transaction appends to 1..=this many keys.
    pub max_appends: u64,
    /// append: each transaction reads 1..=this many keys.
    pub max_reads: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Measured time; no new transaction starts after it.
    pub seconds: f64,
    /// The isolation level of every transaction (and the table's configured level).
    pub level: Level,
    /// Partitions of the table.
    pub partitions: u32,
    /// Replicas of the table.
    pub replicas: u16,
    /// The table's `flush.ms` (`always`: a commit waits for the fsync of its record).
    pub fsync: String,
    /// A transaction still retrying this long after the deadline is abandoned.
    pub grace: Duration,
    /// Seed of the workers' random choices.
    pub seed: u64,
    /// append: write every committed transaction here (Elle JSON lines).
    pub history: Option<PathBuf>,
    /// Free-form label stored in the report.
    pub label: Option<String>,
    /// Broker processes whose CPU the report counts.
    pub broker_pids: Vec<u32>,
    /// Stored in the report's `server` object (e.g. the brokers' extra arguments).
    pub server: Value,
}

/// SplitMix64, as pgserbench's.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one logical transaction intends; retries repeat it.
enum Intent {
    Transfer {
        from: u32,
        to: u32,
    },
    /// (is_append, key, value)
    Append {
        ops: Vec<(bool, u32, i64)>,
    },
}

enum Outcome {
    Transfer { moved: bool },
    Append { reads: Vec<(u32, Vec<i64>)> },
}

/// Why an attempt did not commit.
enum Failure {
    /// Aborted (the reason word): retried.
    Aborted(String),
    /// Talking to the cluster failed (a timeout, a lost connection, a leader change under
    /// way): the outcome is unknown, so the intent is not retried (a retried append could
    /// land twice); counted in `errors`, and an append's values may or may not be there.
    Unknown(TableError),
    /// Anything else: the run fails.
    Fatal(anyhow::Error),
}

impl From<TableError> for Failure {
    fn from(e: TableError) -> Failure {
        match e {
            TableError::Aborted(reason) => Failure::Aborted(reason),
            e @ TableError::Client(_) => Failure::Unknown(e),
            e => Failure::Fatal(e.into()),
        }
    }
}

fn key(i: u32) -> Vec<u8> {
    i.to_string().into_bytes()
}

fn integer(key: u32, value: Option<&[u8]>) -> Result<i64, Failure> {
    let text = value.map(String::from_utf8_lossy).unwrap_or_default();
    text.parse().map_err(|_| Failure::Fatal(anyhow::anyhow!("account {key} holds '{text}', not an integer")))
}

fn list(key: u32, value: Option<&[u8]>) -> Result<Vec<i64>, Failure> {
    let Some(value) = value.filter(|v| !v.is_empty()) else { return Ok(Vec::new()) };
    let text = String::from_utf8_lossy(value);
    text.split(',')
        .map(|s| s.parse().map_err(|_| Failure::Fatal(anyhow::anyhow!("key {key} holds '{text}', not a list"))))
        .collect()
}

fn gen_intent(cfg: &TablesConfig, rng: &mut Rng, wid: usize, counter: &mut i64) -> Intent {
    match cfg.workload {
        Workload::Transfer => {
            let n = u64::from(cfg.accounts);
            let from = rng.below(n) as u32 + 1;
            let mut to = rng.below(n - 1) as u32 + 1;
            if to >= from {
                to += 1;
            }
            Intent::Transfer { from, to }
        }
        Workload::Append => {
            let na = 1 + rng.below(cfg.max_appends);
            let nr = 1 + rng.below(cfg.max_reads);
            let mut ops = Vec::with_capacity((na + nr) as usize);
            for _ in 0..na {
                *counter += 1;
                // Unique per (worker, counter) and short: the lists hold them as text.
                let val = *counter * cfg.clients as i64 + wid as i64;
                ops.push((true, rng.below(u64::from(cfg.keys)) as u32 + 1, val));
            }
            for _ in 0..nr {
                ops.push((false, rng.below(u64::from(cfg.keys)) as u32 + 1, 0));
            }
            for i in (1..ops.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                ops.swap(i, j);
            }
            // Appends in key order, where the shuffle put appends (as pgserbench does).
            let mut akeys: Vec<(u32, i64)> = ops.iter().filter(|o| o.0).map(|o| (o.1, o.2)).collect();
            akeys.sort_unstable();
            for (o, (k, v)) in ops.iter_mut().filter(|o| o.0).zip(akeys) {
                o.1 = k;
                o.2 = v;
            }
            Intent::Append { ops }
        }
    }
}

/// A compare-and-set that never matches (no list is `#`): writes nothing, answers the value.
fn read_step(k: u32) -> Step {
    Step::CompareAndSet { key: key(k), expect: Some(b"#".to_vec()), value: None }
}

async fn attempt(table: &Table, level: Level, intent: &Intent) -> Result<Outcome, Failure> {
    if level == Level::Serial {
        return procedure(table, intent).await;
    }
    let mut txn = table.begin(Some(level));
    let out = match intent {
        Intent::Transfer { from, to } => {
            let (lo, hi) = (*from.min(to), *from.max(to));
            // Both accounts in one round trip (one TableRead per partition).
            let (klo, khi) = (key(lo), key(hi));
            let read = txn.get_many(&[&klo, &khi]).await?;
            let (blo, bhi) = (integer(lo, read[0].as_deref())?, integer(hi, read[1].as_deref())?);
            let src = if *from == lo { blo } else { bhi };
            let moved = src >= 1;
            if moved {
                let (dlo, dhi) = if *from == lo { (-1, 1) } else { (1, -1) };
                txn.put(&key(lo), (blo + dlo).to_string().as_bytes()).await?;
                txn.put(&key(hi), (bhi + dhi).to_string().as_bytes()).await?;
            }
            Outcome::Transfer { moved }
        }
        Intent::Append { ops } => {
            let mut reads = Vec::new();
            for (is_append, k, v) in ops {
                let current = txn.get(&key(*k)).await?;
                if *is_append {
                    let mut value = current.unwrap_or_default();
                    if !value.is_empty() {
                        value.push(b',');
                    }
                    value.extend_from_slice(v.to_string().as_bytes());
                    txn.put(&key(*k), &value).await?;
                } else {
                    reads.push((*k, list(*k, current.as_deref())?));
                }
            }
            Outcome::Append { reads }
        }
    };
    txn.commit().await?;
    Ok(out)
}

/// `serial`: the transaction as one procedure.
async fn procedure(table: &Table, intent: &Intent) -> Result<Outcome, Failure> {
    match intent {
        Intent::Transfer { from, to } => {
            let step = Step::Transfer { from: key(*from), to: key(*to), amount: 1 };
            let run = table.run(vec![step]).await?;
            Ok(Outcome::Transfer { moved: run.results.first().is_some_and(Option::is_some) })
        }
        Intent::Append { ops } => {
            let steps = ops
                .iter()
                .map(|(is_append, k, v)| {
                    if *is_append {
                        Step::Append { key: key(*k), value: v.to_string().into_bytes() }
                    } else {
                        read_step(*k)
                    }
                })
                .collect();
            let run = table.run(steps).await?;
            if run.results.len() != ops.len() {
                return Err(Failure::Fatal(anyhow::anyhow!(
                    "a procedure of {} steps answered {} results",
                    ops.len(),
                    run.results.len()
                )));
            }
            let mut reads = Vec::new();
            for ((is_append, k, _), result) in ops.iter().zip(&run.results) {
                if !*is_append {
                    reads.push((*k, list(*k, result.as_deref())?));
                } else if result.is_none() {
                    return Err(Failure::Fatal(anyhow::anyhow!("an append to key {k} was refused (list too long?)")));
                }
            }
            Ok(Outcome::Append { reads })
        }
    }
}

/// What one worker did.
struct Stats {
    commits: u64,
    aborts: u64,
    abandoned: u64,
    reasons: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    attempts: Histogram<u64>,
    moved: u64,
    skipped: u64,
    appended: Vec<i64>,
    /// Values of appends whose transaction's outcome is unknown.
    uncertain: Vec<i64>,
    reads: Vec<(u32, Vec<i64>)>,
    history: Vec<String>,
    errors: u64,
    first_error: Option<String>,
    finished: Instant,
}

async fn worker(cfg: &TablesConfig, table: Table, wid: usize, t_start: Instant, deadline: Instant) -> Result<Stats> {
    let mut rng = Rng(cfg.seed.wrapping_mul(0x1000_0000_01B3) ^ ((wid as u64 + 1) << 20));
    let give_up = deadline + cfg.grace;
    let mut s = Stats {
        commits: 0,
        aborts: 0,
        abandoned: 0,
        reasons: BTreeMap::new(),
        latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
        attempts: Histogram::new_with_bounds(1, 1_000_000, 3).expect("histogram bounds"),
        moved: 0,
        skipped: 0,
        appended: Vec::new(),
        uncertain: Vec::new(),
        reads: Vec::new(),
        history: Vec::new(),
        errors: 0,
        first_error: None,
        finished: t_start,
    };
    let mut counter = 0i64;
    while Instant::now() < deadline {
        let intent = gen_intent(cfg, &mut rng, wid, &mut counter);
        let t0 = Instant::now();
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            match attempt(&table, cfg.level, &intent).await {
                Ok(out) => {
                    let t1 = Instant::now();
                    s.commits += 1;
                    s.latency.saturating_record((t1 - t0).as_micros().max(1) as u64);
                    s.attempts.saturating_record(attempts);
                    match (out, &intent) {
                        (Outcome::Transfer { moved: true }, _) => s.moved += 1,
                        (Outcome::Transfer { moved: false }, _) => s.skipped += 1,
                        (Outcome::Append { reads }, Intent::Append { ops }) => {
                            s.appended.extend(ops.iter().filter(|o| o.0).map(|o| o.2));
                            if cfg.history.is_some() {
                                let mut read = reads.iter();
                                let ops: Vec<Value> = ops
                                    .iter()
                                    .map(|(is_append, k, v)| {
                                        if *is_append {
                                            json!(["append", k.to_string(), v])
                                        } else {
                                            let vals = read.next().map(|(_, l)| l.clone()).unwrap_or_default();
                                            json!(["r", k.to_string(), vals])
                                        }
                                    })
                                    .collect();
                                s.history.push(
                                    json!({"process": wid, "type": "ok", "ops": ops,
                                           "start_us": (t0 - t_start).as_micros() as u64,
                                           "end_us": (t1 - t_start).as_micros() as u64,
                                           "level": cfg.level.name()})
                                    .to_string(),
                                );
                            }
                            s.reads.extend(reads);
                        }
                        (Outcome::Append { .. }, Intent::Transfer { .. }) => unreachable!("outcome matches intent"),
                    }
                    break;
                }
                Err(Failure::Aborted(reason)) => {
                    s.aborts += 1;
                    *s.reasons.entry(reason).or_default() += 1;
                    if Instant::now() >= give_up {
                        s.abandoned += 1;
                        break;
                    }
                }
                Err(Failure::Unknown(e)) => {
                    tracing::warn!(client = wid, error = %e, "outcome unknown");
                    s.errors += 1;
                    s.first_error.get_or_insert_with(|| e.to_string());
                    if let Intent::Append { ops } = &intent {
                        s.uncertain.extend(ops.iter().filter(|o| o.0).map(|o| o.2));
                        if cfg.history.is_some() {
                            // Appends only: the reads of a transaction of unknown outcome
                            // are not known either.
                            let ops: Vec<Value> = ops
                                .iter()
                                .filter(|o| o.0)
                                .map(|(_, k, v)| json!(["append", k.to_string(), v]))
                                .collect();
                            s.history.push(
                                json!({"process": wid, "type": "info", "ops": ops,
                                       "start_us": (t0 - t_start).as_micros() as u64,
                                       "end_us": (Instant::now() - t_start).as_micros() as u64,
                                       "level": cfg.level.name()})
                                .to_string(),
                            );
                        }
                    }
                    break;
                }
                Err(Failure::Fatal(e)) => return Err(e.context(format!("client {wid}"))),
            }
        }
    }
    s.finished = Instant::now();
    Ok(s)
}

/// A run's result: the JSON report and the line people read.
pub struct TablesOutcome {
    /// pgserbench's keys plus `level`, `replicas`, `fsync`, `partitions`.
    pub report: Value,
    /// Whether the workload's invariant held.
    pub invariant_ok: bool,
}

/// Creates the table, loads it, runs the workload, checks it.
pub fn run(cfg: &TablesConfig) -> Result<TablesOutcome> {
    if cfg.clients == 0 || cfg.accounts < 2 || cfg.keys < 1 || cfg.max_appends < 1 || cfg.max_reads < 1 {
        bail!("bad parameters: clients, keys, max-appends and max-reads must be at least 1, accounts at least 2");
    }
    let rt = compio::runtime::Runtime::new().context("starting a runtime")?;
    rt.block_on(run_async(cfg))
}

async fn run_async(cfg: &TablesConfig) -> Result<TablesOutcome> {
    let config = ClientConfig { brokers: cfg.brokers.clone(), ..ClientConfig::default() };
    let client = Client::with_config(config).await.with_context(|| format!("connecting to {}", cfg.brokers))?;
    let table = create(&client, cfg).await?;
    load(&table, cfg).await?;
    // Every connection is open before the clock starts (pgserbench prepares its sessions).
    table.get(&key(1)).await.context("a first read")?;

    let cpu0 = Cpu::sample(&cfg.broker_pids);
    let t_start = Instant::now();
    let deadline = t_start + Duration::from_secs_f64(cfg.seconds);
    let workers = (0..cfg.clients).map(|wid| worker(cfg, table.clone(), wid, t_start, deadline));
    let results = futures_util::future::join_all(workers).await;
    let t_end = Instant::now();
    let cpu1 = Cpu::sample(&cfg.broker_pids);
    let stats: Vec<Stats> = results.into_iter().collect::<Result<_>>()?;

    let (invariant_ok, invariant) = check(&table, cfg, &stats).await?;
    if let Some(path) = &cfg.history {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut f = std::io::BufWriter::new(file);
        for line in stats.iter().flat_map(|s| &s.history) {
            writeln!(f, "{line}")?;
        }
        f.flush()?;
    }
    let report = report(cfg, &stats, t_start, t_end, &cpu0, &cpu1, invariant_ok, invariant);
    Ok(TablesOutcome { report, invariant_ok })
}

async fn create(client: &Client, cfg: &TablesConfig) -> Result<Table> {
    let mut configs = skein_client::table::table_configs(Some(cfg.level));
    configs.push(("flush.ms".to_owned(), cfg.fsync.clone()));
    client
        .create_topic(&cfg.table, cfg.partitions, cfg.replicas, &configs)
        .await
        .with_context(|| format!("creating table {}", cfg.table))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.table(&cfg.table).await {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "table not ready");
                compio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("opening the table"),
        }
    }
}

/// transfer: every account at its initial balance (read-committed transactions of up to
/// 1,000 puts, retried while the table's partitions get their leaders).
async fn load(table: &Table, cfg: &TablesConfig) -> Result<()> {
    if cfg.workload != Workload::Transfer {
        return Ok(());
    }
    let balance = cfg.initial_balance.to_string();
    let ids: Vec<u32> = (1..=cfg.accounts).collect();
    for chunk in ids.chunks(1000) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut txn = table.begin(Some(Level::ReadCommitted));
            let mut put = Ok(());
            for &i in chunk {
                put = txn.put(&key(i), balance.as_bytes()).await;
                if put.is_err() {
                    break;
                }
            }
            let done = match put {
                Ok(()) => txn.commit().await.map(|_| ()),
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "loading accounts; retrying");
                    compio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("loading the accounts"),
            }
        }
    }
    Ok(())
}

/// The invariant, from a read-committed scan of the whole table.
async fn check(table: &Table, cfg: &TablesConfig, stats: &[Stats]) -> Result<(bool, Value)> {
    let mut txn = table.begin(Some(Level::ReadCommitted));
    let rows = txn.scan(b"", b"").await.context("scanning the table")?;
    txn.commit().await.context("committing the final scan")?;
    match cfg.workload {
        Workload::Transfer => {
            let mut sum = 0i64;
            let mut min = i64::MAX;
            let mut unreadable = 0u64;
            for (_, v) in &rows {
                match String::from_utf8_lossy(v).parse::<i64>() {
                    Ok(b) => {
                        sum += b;
                        min = min.min(b);
                    }
                    Err(_) => unreadable += 1,
                }
            }
            let expected = cfg.initial_balance * i64::from(cfg.accounts);
            let ok = sum == expected && min >= 0 && rows.len() == cfg.accounts as usize && unreadable == 0;
            Ok((
                ok,
                json!({"total_balance": sum, "expected_total": expected,
                       "min_balance": if rows.is_empty() { 0 } else { min },
                       "accounts": rows.len(), "unreadable": unreadable,
                       "moved": stats.iter().map(|s| s.moved).sum::<u64>(),
                       "skipped_insufficient": stats.iter().map(|s| s.skipped).sum::<u64>()}),
            ))
        }
        Workload::Append => {
            let mut lists: HashMap<u32, Vec<i64>> = HashMap::new();
            let mut unreadable = 0u64;
            for (k, v) in &rows {
                let k = String::from_utf8_lossy(k).parse::<u32>();
                match (k, list(0, Some(v))) {
                    (Ok(k), Ok(l)) => {
                        lists.insert(k, l);
                    }
                    _ => unreadable += 1,
                }
            }
            let committed: HashSet<i64> = stats.iter().flat_map(|s| s.appended.iter().copied()).collect();
            let uncertain: HashSet<i64> = stats.iter().flat_map(|s| s.uncertain.iter().copied()).collect();
            let n_committed: usize = stats.iter().map(|s| s.appended.len()).sum();
            let mut present = HashSet::new();
            let (mut dup, mut unknown, mut total) = (0u64, 0u64, 0usize);
            for l in lists.values() {
                total += l.len();
                for v in l {
                    if !present.insert(*v) {
                        dup += 1;
                    }
                    if !committed.contains(v) && !uncertain.contains(v) {
                        unknown += 1;
                    }
                }
            }
            let lost = committed.iter().filter(|v| !present.contains(v)).count() as u64;
            let mut reads = 0u64;
            let mut bad_reads = 0u64;
            for (k, read) in stats.iter().flat_map(|s| &s.reads) {
                reads += 1;
                let full = lists.get(k).map_or(&[][..], Vec::as_slice);
                if !full.starts_with(read) {
                    bad_reads += 1;
                }
            }
            let ok = dup == 0
                && unknown == 0
                && lost == 0
                && n_committed == committed.len()
                && bad_reads == 0
                && unreadable == 0;
            Ok((
                ok,
                json!({"committed_appends": n_committed, "values": total,
                       "duplicate_values": dup, "uncommitted_values_present": unknown,
                       "committed_values_missing": lost, "committed_reads": reads,
                       "reads_not_prefix_of_final": bad_reads, "keys_used": lists.len(),
                       "uncertain_appends": uncertain.len(),
                       "uncertain_values_present": uncertain.iter().filter(|v| present.contains(v)).count(),
                       "unreadable": unreadable,
                       "longest_list": lists.values().map(Vec::len).max().unwrap_or(0)}),
            ))
        }
    }
}

/// CPU counters at one moment.
struct Cpu {
    /// This process's CPU seconds.
    own: f64,
    /// The brokers' CPU seconds.
    brokers: f64,
    /// Machine busy, iowait, steal and total jiffies (/proc/stat).
    machine: [u64; 4],
}

impl Cpu {
    fn sample(broker_pids: &[u32]) -> Cpu {
        let own = crate::load::cpu_seconds(std::process::id()).unwrap_or(0.0);
        let brokers = broker_pids.iter().filter_map(|&p| crate::load::cpu_seconds(p)).sum();
        Cpu { own, brokers, machine: machine_jiffies() }
    }
}

/// (busy, iowait, steal, total) jiffies over all CPUs.
fn machine_jiffies() -> [u64; 4] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return [0; 4];
    }
    // user nice system idle iowait irq softirq steal
    [v[0] + v[1] + v[2] + v[5] + v[6], v[4], v[7], v.iter().take(8).sum()]
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn quantile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &TablesConfig,
    stats: &[Stats],
    t_start: Instant,
    t_end: Instant,
    cpu0: &Cpu,
    cpu1: &Cpu,
    invariant_ok: bool,
    invariant: Value,
) -> Value {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds");
    let mut attempts = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).expect("histogram bounds");
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for s in stats {
        latency.add(&s.latency).expect("same bounds");
        attempts.add(&s.attempts).expect("same bounds");
        for (k, v) in &s.reasons {
            *reasons.entry(k.clone()).or_default() += v;
        }
    }
    let commits: u64 = stats.iter().map(|s| s.commits).sum();
    let aborts: u64 = stats.iter().map(|s| s.aborts).sum();
    let abandoned: u64 = stats.iter().map(|s| s.abandoned).sum();
    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    let first_error = stats.iter().find_map(|s| s.first_error.clone());
    let secs = (stats.iter().map(|s| s.finished).max().unwrap_or(t_end) - t_start).as_secs_f64().max(1e-9);
    let wall = (t_end - t_start).as_secs_f64().max(1e-9);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let [b0, io0, st0, t0] = cpu0.machine;
    let [b1, io1, st1, t1] = cpu1.machine;
    let mtot = (t1.saturating_sub(t0)).max(1) as f64;
    let busy = b1.saturating_sub(b0) as f64;
    let own = cpu1.own - cpu0.own;
    let brokers = cpu1.brokers - cpu0.brokers;
    let params = match cfg.workload {
        Workload::Transfer => json!({"accounts": cfg.accounts, "initial_balance": cfg.initial_balance}),
        Workload::Append => json!({"keys": cfg.keys, "max_appends": cfg.max_appends, "max_reads": cfg.max_reads}),
    };
    json!({
        "workload": cfg.workload.name(),
        "clients": cfg.clients,
        "isolation": cfg.level.name(),
        "seconds": round(secs, 3),
        "commits": commits,
        "commits_per_sec": round(commits as f64 / secs, 1),
        "aborts": aborts,
        "abort_rate": if commits + aborts > 0 { round(aborts as f64 / (commits + aborts) as f64, 4) } else { 0.0 },
        "latency_us": {
            "p50": quantile(&latency, 0.5), "p99": quantile(&latency, 0.99), "p999": quantile(&latency, 0.999),
            "max": latency.max(), "mean": latency.mean().round() as u64,
        },
        "invariant_ok": invariant_ok,
        "invariant": invariant,
        "label": cfg.label,
        "params": params,
        "abort_codes": reasons,
        "abandoned": abandoned,
        "errors": errors,
        "first_error": first_error,
        "attempts_per_commit": {
            "mean": round(attempts.mean(), 3), "p99": quantile(&attempts, 0.99), "max": attempts.max(),
        },
        "cpu": {
            "cores": cores,
            "client_pct_of_one_core": round(own / wall * 100.0, 1),
            "server_pct_of_one_core": round(brokers / wall * 100.0, 1),
            "machine_busy_pct": round(busy / mtot * 100.0, 1),
            "other_pct_of_one_core": round((busy / mtot * cores as f64 - own / wall - brokers / wall) * 100.0, 1).max(0.0),
            "machine_iowait_pct": round(io1.saturating_sub(io0) as f64 / mtot * 100.0, 1),
            "machine_steal_pct": round(st1.saturating_sub(st0) as f64 / mtot * 100.0, 1),
        },
        "client": { "runtime_threads": 1, "retry_backoff": "none", "table": cfg.table, "brokers": cfg.brokers },
        "server": cfg.server,
        "level": cfg.level.name(),
        "replicas": cfg.replicas,
        "partitions": cfg.partitions,
        "fsync": format!("flush.ms={}", cfg.fsync),
        "commit": crate::report::commit(),
    })
}

/// The line people read: workload, parameter, level, replicas, clients, commits/s, abort %,
/// latency percentiles (ms), invariant.
pub fn line(r: &Value) -> String {
    let param = match r["workload"].as_str() {
        Some("transfer") => format!("N={}", r["params"]["accounts"]),
        _ => format!("K={}", r["params"]["keys"]),
    };
    let ms = |k: &str| r["latency_us"][k].as_u64().unwrap_or(0) as f64 / 1000.0;
    format!(
        "{:<9} {:<8} {:<15} r={} C={:<3} {:>9.1} commits/s {:>6.2}% aborts  p50 {:>7.2} p99 {:>7.2} p999 {:>7.2} max {:>8.2} ms  invariant {}{}",
        r["workload"].as_str().unwrap_or("?"),
        param,
        r["level"].as_str().unwrap_or("?"),
        r["replicas"],
        r["clients"],
        r["commits_per_sec"].as_f64().unwrap_or(0.0),
        r["abort_rate"].as_f64().unwrap_or(0.0) * 100.0,
        ms("p50"),
        ms("p99"),
        ms("p999"),
        ms("max"),
        if r["invariant_ok"].as_bool() == Some(true) { "ok" } else { "FAIL" },
        match r["errors"].as_u64() {
            Some(n) if n > 0 => format!("  ({n} outcomes unknown: {})", r["first_error"].as_str().unwrap_or("?")),
            _ => String::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(workload: Workload) -> TablesConfig {
        TablesConfig {
            brokers: String::new(),
            table: "t".into(),
            workload,
            accounts: 10,
            initial_balance: 100,
            keys: 100,
            max_appends: 4,
            max_reads: 4,
            clients: 8,
            seconds: 1.0,
            level: Level::Serializable,
            partitions: 1,
            replicas: 1,
            fsync: "always".into(),
            grace: Duration::from_secs(5),
            seed: 1,
            history: None,
            label: None,
            broker_pids: vec![],
            server: Value::Null,
        }
    }

    #[test]
    fn intents_are_well_formed() {
        let c = cfg(Workload::Append);
        let mut rng = Rng(7);
        let mut counter = 0;
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let Intent::Append { ops } = gen_intent(&c, &mut rng, 3, &mut counter) else { panic!("append") };
            let appends: Vec<_> = ops.iter().filter(|o| o.0).collect();
            let reads = ops.len() - appends.len();
            assert!((1..=4).contains(&appends.len()) && (1..=4).contains(&reads), "{ops:?}");
            assert!(appends.windows(2).all(|w| w[0].1 <= w[1].1), "appends in key order: {ops:?}");
            for a in appends {
                assert!(seen.insert(a.2), "unique values");
                assert_eq!(a.2 % 8, 3, "the worker is in the value");
                assert!((1..=100).contains(&a.1));
            }
        }
        let c = cfg(Workload::Transfer);
        for _ in 0..1000 {
            let Intent::Transfer { from, to } = gen_intent(&c, &mut rng, 0, &mut counter) else { panic!("transfer") };
            assert!(from != to && (1..=10).contains(&from) && (1..=10).contains(&to));
        }
    }

    #[test]
    fn lists_parse_and_the_line_names_the_run() {
        assert_eq!(list(1, None).ok(), Some(vec![]));
        assert_eq!(list(1, Some(b"")).ok(), Some(vec![]));
        assert_eq!(list(1, Some(b"3,11,2")).ok(), Some(vec![3, 11, 2]));
        assert!(list(1, Some(b"3,x")).is_err());
        let r = json!({"workload": "transfer", "params": {"accounts": 10}, "level": "serial", "replicas": 1,
                       "clients": 8, "commits_per_sec": 1234.5, "abort_rate": 0.0,
                       "latency_us": {"p50": 1000, "p99": 2000, "p999": 3000, "max": 4000}, "invariant_ok": true});
        let l = line(&r);
        assert!(l.contains("N=10") && l.contains("serial") && l.contains("1234.5") && l.ends_with("ok"), "{l}");
    }
}
