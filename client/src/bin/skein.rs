//! `skein`: the command-line client. Errors are one line on stderr; exit 0 ok, 1 failure,
//! 2 usage.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use skein_client::wire::TopicDescription;
use skein_client::{
    Acks, Client, ClientConfig, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ReadReplica, Session,
    SessionHandle,
};

#[derive(Parser)]
#[command(name = "skein", version, about = "Skein command-line client")]
struct Cli {
    /// Brokers to bootstrap from.
    #[arg(long, global = true, env = "SKEIN_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce stdin lines as records (the value, or KEY SEP VALUE).
    Produce {
        /// Topic to write to.
        topic: String,
        /// Write every record to this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Split each line at the first SEP into key and value.
        #[arg(long)]
        key_separator: Option<String>,
        /// Durability to wait for.
        #[arg(long, default_value = "all")]
        acks: Acks,
        /// Print `PARTITION OFFSET` per acknowledged record, in input order.
        #[arg(long)]
        print_offsets: bool,
        /// Session file (read-your-writes): loaded if it exists, every acknowledged write
        /// noted, saved on exit; pass it to `consume --session` to read these writes.
        #[arg(long, value_name = "FILE")]
        session: Option<PathBuf>,
    },
    /// Print records of a topic.
    Consume {
        /// Topic to read.
        topic: String,
        /// Read only this partition (default: all).
        #[arg(long)]
        partition: Option<u32>,
        /// `beginning`, `end` or an offset.
        #[arg(long, default_value = "beginning")]
        from: String,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many milliseconds without a new record.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Output format: %p partition, %o offset, %k key, %v value, %t timestamp; \t \n \\.
        #[arg(long, default_value = "%v")]
        format: String,
        /// Session file (read-your-writes, monotonic reads): loaded if it exists, its tokens
        /// sent with every fetch and raised by every answer, saved on exit.
        #[arg(long, value_name = "FILE")]
        session: Option<PathBuf>,
        /// Which replica serves reads: `leader`, `closest` (an in-sync replica in `--rack`) or
        /// a node id (used while it is in sync).
        #[arg(long, default_value = "leader")]
        prefer_replica: ReadReplica,
        /// This client's rack, for `--prefer-replica closest`.
        #[arg(long)]
        rack: Option<String>,
    },
    /// Cluster state.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition.
        #[arg(long, default_value_t = 1)]
        replicas: u16,
        /// Config override KEY=VALUE (repeatable), e.g. flush.ms=always.
        #[arg(long = "config", value_parser = skein_client::parse_topic_config)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Partitions with leaders and offsets.
    Describe {
        /// Topic name.
        name: String,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
    /// Move a partition to other brokers (cluster mode): new replicas catch up, then the old
    /// ones leave; waits (with progress) until the move is done.
    Reassign {
        /// Topic name.
        name: String,
        /// The partition to move.
        #[arg(long)]
        partition: u32,
        /// Target replicas, e.g. `3,1,2` (the first is the preferred leader).
        #[arg(long, value_delimiter = ',', required = true)]
        replicas: Vec<u32>,
        /// Return once the move started instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Nodes, controller, partitions and leaders.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let runtime = match compio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skein: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("skein: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config =
        ClientConfig { brokers: cli.brokers.clone(), client_id: "skein-cli".into(), ..ClientConfig::default() };
    let client = Client::with_config(config).await.with_context(|| format!("connecting to {}", cli.brokers))?;
    match cli.command {
        Command::Topic { command } => topic(&client, command).await,
        Command::Produce { topic, partition, key_separator, acks, print_offsets, session } => {
            let loaded = load_session(session.as_deref())?;
            let result =
                produce(client, &topic, partition, key_separator.as_deref(), acks, print_offsets, loaded.clone()).await;
            // A failed run still saves the writes it had acknowledged; its own error comes first.
            let saved = save_session(session.as_deref(), loaded.as_ref());
            result.and(saved)
        }
        Command::Consume { topic, partition, from, count, timeout_ms, format, session, prefer_replica, rack } => {
            let loaded = load_session(session.as_deref())?;
            let read = ReadOptions { prefer_replica, rack, session: loaded.clone() };
            let result = consume(client, &topic, partition, &from, count, timeout_ms, &format, read).await;
            // A failed run still saves the writes it had acknowledged; its own error comes first.
            let saved = save_session(session.as_deref(), loaded.as_ref());
            result.and(saved)
        }
        Command::Cluster { command: ClusterCommand::Status { json } } => cluster_status(&client, json).await,
    }
}

async fn topic(client: &Client, command: TopicCommand) -> Result<()> {
    match command {
        TopicCommand::Create { name, partitions, replicas, configs } => {
            client.create_topic(&name, partitions, replicas, &configs).await?;
            println!("created topic {name} with {partitions} partitions");
        }
        TopicCommand::List => {
            for name in client.list_topics().await? {
                println!("{name}");
            }
        }
        TopicCommand::Describe { name, json } => {
            let t = client.describe_topic(&name).await?;
            if json {
                println!("{}", describe_json(&t));
            } else {
                print_describe(&t);
            }
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
        TopicCommand::Reassign { name, partition, replicas, no_wait, timeout_secs } => {
            reassign(client, &name, partition, replicas, no_wait, timeout_secs).await?;
        }
    }
    Ok(())
}

async fn reassign(
    client: &Client,
    name: &str,
    partition: u32,
    replicas: Vec<u32>,
    no_wait: bool,
    timeout_secs: u64,
) -> Result<()> {
    use skein_client::wire::{ApiKey, ReassignPartitionRequest, ReassignPartitionResponse};
    let req = ReassignPartitionRequest { topic: name.to_owned(), partition, replicas: replicas.clone() };
    let resp: ReassignPartitionResponse = client.connection().await?.call(ApiKey::ReassignPartition, &req).await?;
    if resp.error != skein_client::wire::ErrorCode::NONE {
        bail!("reassigning {name}/{partition}: {} {}", resp.error.name(), resp.message);
    }
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    println!("reassignment of {name}/{partition} to {} started", list(&replicas));
    if no_wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let t = client.describe_topic(name).await?;
        let p = t.partitions.iter().find(|p| p.partition == partition).context("partition vanished")?;
        let done = p.replicas == replicas && replicas.iter().all(|r| p.isr.contains(r));
        if tty {
            eprint!("\r  replicas {} isr {} leader {}   ", list(&p.replicas), list(&p.isr), p.leader);
        }
        if done {
            if tty {
                eprintln!();
            }
            println!("reassignment done: replicas {} isr {} leader {}", list(&p.replicas), list(&p.isr), p.leader);
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("reassignment not done after {timeout_secs} s: replicas {} isr {}", list(&p.replicas), list(&p.isr));
        }
        compio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn describe_json(t: &TopicDescription) -> serde_json::Value {
    let partitions: Vec<serde_json::Value> = t
        .partitions
        .iter()
        .map(|p| {
            serde_json::json!({"partition": p.partition, "leader": p.leader, "leader_epoch": p.leader_epoch,
                "replicas": p.replicas, "isr": p.isr, "log_start": p.log_start, "high_watermark": p.high_watermark,
                "log_end": p.log_end})
        })
        .collect();
    serde_json::json!({"topic": t.name, "partitions": partitions})
}

fn print_describe(t: &TopicDescription) {
    println!("topic {}", t.name);
    for c in &t.configs {
        println!("  config {}={}", c.key, c.value);
    }
    println!(
        "{:>9} {:>6} {:>6} {:>9} {:>6} {:>12} {:>14} {:>12}",
        "partition", "leader", "epoch", "replicas", "isr", "log_start", "high_watermark", "log_end"
    );
    for p in &t.partitions {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        println!(
            "{:>9} {:>6} {:>6} {:>9} {:>6} {:>12} {:>14} {:>12}",
            p.partition,
            p.leader,
            p.leader_epoch,
            list(&p.replicas),
            list(&p.isr),
            p.log_start,
            p.high_watermark,
            p.log_end
        );
    }
}

/// The session in `path` (empty if the file does not exist yet), shared in this process.
fn load_session(path: Option<&Path>) -> Result<Option<SessionHandle>> {
    path.map(|p| Session::load(p).map(Session::into_handle).with_context(|| format!("loading session {}", p.display())))
        .transpose()
}

/// Saves the session, merged with what the file holds now (another process may have saved
/// meanwhile: tokens only grow, so merging loses nothing).
fn save_session(path: Option<&Path>, session: Option<&SessionHandle>) -> Result<()> {
    let (Some(path), Some(session)) = (path, session) else {
        return Ok(());
    };
    let mut merged = session.borrow().clone();
    if let Ok(on_disk) = Session::load(path) {
        merged.merge(&on_disk);
    }
    merged.save(path).with_context(|| format!("saving session {}", path.display()))
}

async fn produce(
    client: Client,
    topic: &str,
    partition: Option<u32>,
    sep: Option<&str>,
    acks: Acks,
    print: bool,
    session: Option<SessionHandle>,
) -> Result<()> {
    let config = ProducerConfig { acks, linger: Duration::from_millis(2), session, ..ProducerConfig::default() };
    let producer = Producer::new(client, config);
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut pending = std::collections::VecDeque::new();
    let mut failed: Vec<(u64, String)> = Vec::new();
    let mut line = Vec::new();
    let mut n: u64 = 0;
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).context("reading stdin")? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        n += 1;
        let (key, value) = match sep.and_then(|s| split_key(&line, s.as_bytes())) {
            Some((k, v)) => (Some(k), v),
            None => (None, &line[..]),
        };
        pending.push_back((n, producer.send_to(topic, partition, key, value).await?));
        while pending.len() > PENDING_MAX {
            let (i, d) = pending.pop_front().expect("non-empty");
            report(d.await, i, print, &mut out, &mut failed)?;
        }
    }
    producer.flush().await;
    for (i, d) in pending {
        report(d.await, i, print, &mut out, &mut failed)?;
    }
    out.flush()?;
    if !failed.is_empty() {
        let shown: Vec<String> = failed.iter().take(10).map(|(i, e)| format!("line {i}: {e}")).collect();
        bail!(
            "{} of {n} records failed ({}{})",
            failed.len(),
            shown.join("; "),
            if failed.len() > 10 { "; ..." } else { "" }
        );
    }
    Ok(())
}

fn split_key<'a>(line: &'a [u8], sep: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    if sep.is_empty() {
        return None;
    }
    let at = line.windows(sep.len()).position(|w| w == sep)?;
    Some((&line[..at], &line[at + sep.len()..]))
}

fn report(
    r: Result<(u32, u64), skein_client::ClientError>,
    line: u64,
    print: bool,
    out: &mut impl Write,
    failed: &mut Vec<(u64, String)>,
) -> Result<()> {
    match r {
        Ok((p, o)) if print => writeln!(out, "{p} {}", if o == u64::MAX { "-1".to_owned() } else { o.to_string() })?,
        Ok(_) => {}
        Err(e) => failed.push((line, e.to_string())),
    }
    Ok(())
}

/// `consume`'s replica choice and session.
struct ReadOptions {
    prefer_replica: ReadReplica,
    rack: Option<String>,
    session: Option<SessionHandle>,
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    client: Client,
    topic: &str,
    partition: Option<u32>,
    from: &str,
    count: Option<u64>,
    timeout_ms: Option<u64>,
    format: &str,
    read: ReadOptions,
) -> Result<()> {
    let position = match from {
        "beginning" => Position::Beginning,
        "end" => Position::End,
        o => Position::Offset(o.parse().with_context(|| format!("--from '{o}' is not beginning, end or an offset"))?),
    };
    let partitions: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => (0..client.partition_count(topic).await?).collect(),
    };
    let max_wait = Duration::from_millis(timeout_ms.unwrap_or(500).clamp(1, 500));
    let config = ConsumerConfig {
        max_wait,
        prefer_replica: read.prefer_replica,
        rack: read.rack,
        session: read.session,
        ..ConsumerConfig::default()
    };
    let mut consumer = Consumer::new(client, config);
    consumer.assign(topic, &partitions, position).await?;
    let format = Format::parse(format);
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut seen = 0u64;
    let mut last = Instant::now();
    while count.is_none_or(|c| seen < c) {
        let records = consumer.poll().await?;
        if records.is_empty() {
            if timeout_ms.is_some_and(|t| last.elapsed() >= Duration::from_millis(t)) {
                break;
            }
            continue;
        }
        last = Instant::now();
        for r in records {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            format.write(&mut out, &r)?;
            seen += 1;
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

/// A parsed `--format`.
struct Format(Vec<Piece>);

enum Piece {
    Text(Vec<u8>),
    Partition,
    Offset,
    Key,
    Value,
    Timestamp,
}

impl Format {
    fn parse(s: &str) -> Format {
        let mut pieces = Vec::new();
        let mut text = Vec::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            let piece = match (c, c == '%' || c == '\\') {
                (_, false) => None,
                ('%', true) => match chars.next() {
                    Some('p') => Some(Piece::Partition),
                    Some('o') => Some(Piece::Offset),
                    Some('k') => Some(Piece::Key),
                    Some('v') => Some(Piece::Value),
                    Some('t') => Some(Piece::Timestamp),
                    Some(other) => {
                        text.push(b'%');
                        text.extend(other.to_string().bytes());
                        continue;
                    }
                    None => {
                        text.push(b'%');
                        continue;
                    }
                },
                _ => {
                    match chars.next() {
                        Some('t') => text.push(b'\t'),
                        Some('n') => text.push(b'\n'),
                        Some('r') => text.push(b'\r'),
                        Some('0') => text.push(0),
                        Some('\\') => text.push(b'\\'),
                        Some(other) => {
                            text.push(b'\\');
                            text.extend(other.to_string().bytes());
                        }
                        None => text.push(b'\\'),
                    }
                    continue;
                }
            };
            match piece {
                Some(p) => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(p);
                }
                None => text.extend(c.to_string().bytes()),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Format(pieces)
    }

    fn write(&self, out: &mut impl Write, r: &skein_client::ConsumerRecord) -> std::io::Result<()> {
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.write_all(t)?,
                Piece::Partition => write!(out, "{}", r.partition)?,
                Piece::Offset => write!(out, "{}", r.offset)?,
                Piece::Key => out.write_all(r.key.as_deref().unwrap_or_default())?,
                Piece::Value => out.write_all(&r.value)?,
                Piece::Timestamp => write!(out, "{}", r.timestamp)?,
            }
        }
        out.write_all(b"\n")
    }
}

async fn cluster_status(client: &Client, json: bool) -> Result<()> {
    use skein_client::conn::Connection;
    use skein_client::wire::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
    let md = client.metadata(None).await?;
    // Whether each node answers from here (1 s bound).
    let mut reachable = Vec::new();
    for b in &md.brokers {
        let addr = format!("{}:{}", b.host, b.port);
        let ok = match Connection::connect(&addr, "skein-cli", Duration::from_secs(1)).await {
            Ok(c) => c.call::<_, ApiVersionsResponse>(ApiKey::ApiVersions, &ApiVersionsRequest {}).await.is_ok(),
            Err(_) => false,
        };
        reachable.push(ok);
    }
    let under: Vec<(&str, &skein_client::wire::PartitionMetadata)> = md
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.name.as_str(), p)))
        .filter(|(_, p)| p.isr.len() < p.replicas.len() || p.leader == 0)
        .collect();
    if json {
        let nodes: Vec<_> = md
            .brokers
            .iter()
            .zip(&reachable)
            .map(|(b, ok)| serde_json::json!({"node_id": b.node_id, "host": b.host, "port": b.port, "reachable": ok}))
            .collect();
        let partitions: Vec<_> = md
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(move |p| {
                    serde_json::json!({"topic": t.name, "partition": p.partition,
                "leader": p.leader, "leader_epoch": p.leader_epoch, "replicas": p.replicas, "isr": p.isr})
                })
            })
            .collect();
        let under: Vec<_> = under
            .iter()
            .map(|(t, p)| serde_json::json!({"topic": t, "partition": p.partition, "replicas": p.replicas, "isr": p.isr, "leader": p.leader}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"nodes": nodes, "controller": md.controller, "partitions": partitions,
                "under_replicated": under})
        );
        return Ok(());
    }
    for (b, ok) in md.brokers.iter().zip(&reachable) {
        println!(
            "node {} at {}:{} {}{}",
            b.node_id,
            b.host,
            b.port,
            if *ok { "reachable" } else { "UNREACHABLE" },
            if b.node_id == md.controller { " (controller)" } else { "" }
        );
    }
    if md.controller == 0 {
        println!("no active controller known");
    }
    for t in &md.topics {
        for p in &t.partitions {
            println!("{}/{} leader {} epoch {}", t.name, p.partition, p.leader, p.leader_epoch);
        }
    }
    if under.is_empty() {
        println!("under-replicated partitions: none");
    } else {
        println!("under-replicated partitions: {}", under.len());
        for (t, p) in under {
            let l = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let leader = if p.leader == 0 { "none (offline)".to_string() } else { p.leader.to_string() };
            println!("  {t}/{} replicas {} isr {} leader {leader}", p.partition, l(&p.replicas), l(&p.isr));
        }
    }
    Ok(())
}

/// Records awaiting acknowledgement before the CLI waits for the oldest.
const PENDING_MAX: usize = 100_000;
