//! `skein`: the command-line client. Errors are one line on stderr; exit 0 ok, 1 failure,
//! 2 usage.

// Standard output closed early (`skein topic describe T | head`) ends the command quietly,
// as for any Unix tool, instead of the standard macros' panic on the broken pipe.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let written = writeln!(std::io::stdout(), $($arg)*);
        stdout_written(written);
    }};
}

macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let written = write!(std::io::stdout(), $($arg)*);
        stdout_written(written);
    }};
}

/// Exits at once (status 0) if standard output is gone; other write errors are reported.
fn stdout_written(result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => eprintln!("skein: writing to standard output: {e}"),
    }
}

use std::collections::VecDeque;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use skein_client::index::{IndexKind, IndexMode};
use skein_client::partitioning::{KeyRange, Partitioning};
use skein_client::wire::{DescribeGroupResponse, DescribeTransactionResponse, ErrorCode, Level, TopicDescription};
use skein_client::{
    Acks, Assignor, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Delivery, DeliveryResult, GroupConfig,
    GroupConsumer, Isolation, OffsetLag, OffsetReset, OffsetTarget, Position, Producer, ProducerConfig, ReadReplica,
    Retry, Session, SessionHandle, Table, TableError, TableTxn, TransactionalProducer, TxnConfig, TxnError,
};

#[derive(Parser)]
#[command(name = "skein", version, about = "Skein command-line client")]
struct Cli {
    /// Brokers to bootstrap from.
    #[arg(long, global = true, env = "SKEIN_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Bound on the whole command, e.g. `30s`, `500ms`, `2m` (a bare number is seconds).
    /// `produce` then reports every record not yet acknowledged as failed (TIMED_OUT).
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    timeout: Option<Duration>,
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
        /// Print one line per input line, in input order: `PARTITION OFFSET` once acknowledged,
        /// or `error PARTITION CODE` if it failed after every retry (exit status 1).
        #[arg(long)]
        print_offsets: bool,
        /// Session file (read-your-writes): loaded if it exists, every acknowledged write
        /// noted, saved on exit; pass it to `consume --session` to read these writes.
        #[arg(long, value_name = "FILE")]
        session: Option<PathBuf>,
        /// Write in transactions under this transactional id (fencing any other producer
        /// with it): each transaction commits (or with `--abort` aborts) after
        /// `--transaction-size` lines and at the end of input; with `--print-offsets` a line's
        /// output follows its transaction's end.
        #[arg(long, value_name = "ID")]
        transactional_id: Option<String>,
        /// With `--transactional-id`: lines per transaction (default: all input in one).
        #[arg(long, requires = "transactional_id", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        transaction_size: Option<u64>,
        /// With `--transactional-id`: abort every transaction instead of committing it (its
        /// records are written, then aborted: read_committed consumers never see them).
        #[arg(long, requires = "transactional_id")]
        abort: bool,
        /// With `--transactional-id`: the coordinator aborts a transaction open longer.
        #[arg(long, requires = "transactional_id", default_value_t = 60_000, value_name = "MS")]
        transaction_timeout_ms: u32,
    },
    /// Print records of a topic.
    Consume {
        /// Topic to read.
        topic: String,
        /// Read only this partition (default: all).
        #[arg(long)]
        partition: Option<u32>,
        /// `beginning`, `end`, an offset, or `-N`: N records before the end (of each partition).
        /// With `--group`: `beginning` or `end`, where partitions without a committed offset
        /// start.
        #[arg(long, default_value = "beginning", allow_hyphen_values = true, value_parser = parse_from)]
        from: From,
        /// Read as a member of this consumer group: the partitions its coordinator assigns,
        /// from the group's committed offsets; what is printed is committed every second, on
        /// every revocation and on exit (also on SIGINT and SIGTERM), then the group is left.
        #[arg(long, conflicts_with = "partition")]
        group: Option<String>,
        /// With `--group`: a static member's id (back within the session timeout, it gets its
        /// partitions again without a rebalance).
        #[arg(long, requires = "group")]
        instance_id: Option<String>,
        /// With `--group`: the coordinator fences a member silent for this long.
        #[arg(long, requires = "group", default_value_t = 10_000, value_name = "MS")]
        session_timeout_ms: u32,
        /// With `--group`: `range`, `roundrobin` or `sticky`.
        #[arg(long, requires = "group", default_value = "sticky")]
        assignor: Assignor,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many milliseconds without a new record.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Output format: %p partition, %o offset, %k key, %v value, %t timestamp, %% a
        /// percent sign; escapes \t \n \r \0 \\.
        #[arg(long, default_value = "%v", value_parser = Format::parse)]
        format: Format,
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
        /// With `--session`: the read must reach the session's tokens (its own writes and
        /// reads) within this long from the start; until then `--timeout-ms` does not end it.
        /// Past it the read fails, naming the partition and token (exit status 1).
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        session_deadline_ms: u64,
        /// `read_committed` (only committed transactions, up to the last stable offset) or
        /// `read_uncommitted` (every record up to the high watermark).
        #[arg(long, default_value = "read_committed")]
        isolation: Isolation,
    },
    /// Cluster state.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Consumer groups: list, describe, reset offsets, delete.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Tables (key-value state machines on the log): create, get, put, delete, scan.
    Table {
        #[command(subcommand)]
        command: TableCommand,
    },
    /// Transactions: list, describe, abort; or, with `--table NAME`, table transactions
    /// driven from stdin, one command a line, each answered with one line as soon as it is
    /// done (a command waiting for a lock answers once it has it):
    ///
    ///   begin [LEVEL]  -> ok
    ///   get K          -> value K V | value K nil
    ///   put K V        -> ok                  (V: the rest of the line)
    ///   delete K       -> ok
    ///   scan FROM TO   -> row K V ... then end  (TO omitted: to the end)
    ///   commit         -> committed OFFSET | aborted REASON
    ///   abort          -> aborted user
    ///
    /// Anything else answers `error MESSAGE`; a command that learns the server aborted the
    /// transaction answers `aborted REASON` (the transaction is then over). At the end of
    /// input an open transaction is aborted.
    #[command(args_conflicts_with_subcommands = true, verbatim_doc_comment)]
    Txn {
        #[command(subcommand)]
        command: Option<TxnCommand>,
        /// Run table transactions on this table, read from stdin.
        #[arg(long, value_name = "NAME")]
        table: Option<String>,
        /// With `--table`: the level of transactions begun without one (default: the
        /// table's): read-committed, snapshot, serializable, serial, 2pl or ssi.
        #[arg(long, requires = "table", value_parser = parse_level, value_name = "LEVEL")]
        isolation: Option<Level>,
        /// With `--table`: a transaction open longer is aborted (`aborted timeout`).
        #[arg(long, requires = "table", default_value_t = 60_000, value_name = "MS")]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum TableCommand {
    /// Create a table (a topic with `table=true`); prints `created NAME`.
    Create {
        /// Table name.
        name: String,
        /// Partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition.
        #[arg(long, default_value_t = 1)]
        replicas: u16,
        /// Default isolation level of its transactions (default serializable):
        /// read-committed, snapshot, serializable, serial, 2pl or ssi.
        #[arg(long, value_parser = parse_level, value_name = "LEVEL")]
        isolation: Option<Level>,
        /// How keys map to partitions: `hash` (as the producer does), `hash-range` (ranges
        /// of the key hash) or `key-range` (key intervals: a scan reads only the partitions
        /// its range overlaps).
        #[arg(long, default_value = "hash", value_parser = parse_partitioning)]
        partitioning: Partitioning,
    },
    /// Read a key (one transaction); prints `value K V` or `value K nil`.
    Get {
        /// Table name.
        name: String,
        /// Key.
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// Which replica serves the read: `leader` (a transaction at the table's level), or
        /// `closest` (an in-sync replica in `--rack`) or a node id: read committed at what
        /// that replica applied, possibly older than the leader's.
        #[arg(long, default_value = "leader")]
        prefer_replica: ReadReplica,
        /// With `--prefer-replica`: the rack `closest` prefers.
        #[arg(long)]
        rack: Option<String>,
        /// Session file (as `produce --session`): the read waits until the replica applied
        /// the session's writes to the key's partition, and never goes back behind its
        /// earlier reads; saved on exit.
        #[arg(long)]
        session: Option<PathBuf>,
    },
    /// Write a key (one transaction); prints `ok`.
    Put {
        /// Table name.
        name: String,
        /// Key.
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// Value.
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Session file: the write is noted there, for `table get --session` to read it back
        /// from any replica.
        #[arg(long)]
        session: Option<PathBuf>,
    },
    /// Delete a key (one transaction); prints `ok`.
    Delete {
        /// Table name.
        name: String,
        /// Key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// The rows of keys in [FROM, TO) in key order (one transaction): `row K V` lines, then
    /// `end`.
    Scan {
        /// Table name.
        name: String,
        /// First key.
        #[arg(allow_hyphen_values = true)]
        from: String,
        /// First key after the range (empty or omitted: to the end).
        #[arg(allow_hyphen_values = true, default_value = "")]
        to: String,
    },
    /// Secondary indexes: `create`, `list`.
    #[command(subcommand)]
    Index(IndexCommand),
    /// The rows whose indexed field holds VALUE, by an index: `row K V` lines, then `end`.
    Query {
        /// Table name.
        name: String,
        /// Index name.
        #[arg(long)]
        index: String,
        /// The field's value (a string field's text; a number's or boolean's JSON text).
        #[arg(long, allow_hyphen_values = true)]
        value: String,
        /// First print the partitions the lookup touched: `partition TOPIC P snapshot OFFSET`
        /// lines, then `touched N`.
        #[arg(long)]
        explain: bool,
        /// Session file (as `table put --session`): a term index lookup waits until the index
        /// reflects the session's writes (read-your-writes on an asynchronous index).
        #[arg(long)]
        session: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Create index NAME of TABLE over a field of its rows' JSON values; built online (progress
    /// on stderr), then prints `created index NAME`.
    Create {
        /// Table name.
        table: String,
        /// Index name.
        name: String,
        /// The indexed field of the rows' JSON object values.
        #[arg(long)]
        field: String,
        /// `document` (each partition indexes its own rows; a query asks all of them) or
        /// `term` (a key-range table keyed by the value; a query reads one partition).
        #[arg(long, value_parser = parse_index_kind)]
        kind: IndexKind,
        /// Entries written with the row (the default for document indexes).
        #[arg(long, conflicts_with = "async_")]
        sync: bool,
        /// Entries written by a follower of the table's log (the default for term indexes).
        #[arg(long = "async", id = "async_")]
        async_: bool,
        /// Return once the index is defined, without waiting for its first pass.
        #[arg(long)]
        no_wait: bool,
    },
    /// The indexes of TABLE: `index NAME KIND MODE FIELD built|building DONE/TOTAL` lines,
    /// a term index's with `lag-ms L behind N` (the most of its partitions').
    List {
        /// Table name.
        table: String,
        /// A JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Check that index NAME agrees with TABLE: a document index at one snapshot per
    /// partition, a term index once it caught up. Prints `agree rows R compared C`, or a
    /// `disagree ...` line per difference and exits 1.
    Check {
        /// Table name.
        table: String,
        /// Index name.
        name: String,
    },
}

fn parse_index_kind(s: &str) -> Result<IndexKind, String> {
    IndexKind::parse(s).ok_or_else(|| format!("unknown index kind '{s}' (document or term)"))
}

#[derive(Subcommand)]
enum TxnCommand {
    /// Every transactional id: `TRANSACTIONAL-ID PRODUCER-ID EPOCH STATE AGE-MS`.
    List {
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A transactional id's producer, state, timeout, age and partitions.
    Describe {
        /// Transactional id.
        id: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Aborts a transactional id's open transaction and fences its producer.
    Abort {
        /// Transactional id.
        id: String,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Every group: `GROUP STATE MEMBERS`.
    List,
    /// A group's state, members and committed offsets with their lag.
    Describe {
        /// Group name.
        group: String,
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Moves a group's committed offsets of a topic (the group must have no members); prints
    /// `TOPIC PARTITION OFFSET` per partition.
    ResetOffsets {
        /// Group name.
        group: String,
        /// The topic whose offsets move (every partition).
        #[arg(long)]
        topic: String,
        /// `earliest`, `latest`, an offset, `@MS` (ms since 1970) or a time such as
        /// `2026-12-05T10:00:00Z`; clamped to each partition's log.
        #[arg(long)]
        to: OffsetTarget,
    },
    /// Deletes a group without members, and its offsets.
    Delete {
        /// Group name.
        group: String,
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
        /// How keys map to partitions: `hash` (a fixed count), `hash-range` (each partition
        /// owns a range of the 64-bit key hash) or `key-range` (each owns a key interval);
        /// ranged topics split and merge.
        #[arg(long, default_value = "hash", value_parser = parse_partitioning)]
        partitioning: Partitioning,
    },
    /// Split a partition of a hash-range or key-range topic: it is sealed at its log end
    /// and two new partitions take the halves of its range.
    Split {
        /// Topic name.
        name: String,
        /// The partition to split.
        #[arg(long)]
        partition: u32,
        /// The split point: a key (key-range; `0x...` for hex bytes) or a hash in hex
        /// (hash-range); default: the middle of the range.
        #[arg(long)]
        at: Option<String>,
    },
    /// Merge two adjacent partitions of a hash-range or key-range topic: both are sealed at
    /// their log ends and one new partition takes their joined range.
    Merge {
        /// Topic name.
        name: String,
        /// The two partitions, e.g. `2,3`.
        #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
        partitions: Vec<u32>,
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
    if let Command::Consume { group: Some(_), from, .. } = &cli.command {
        if !matches!(from, From::Beginning | From::End) {
            let why = "with --group, --from is beginning or end (where partitions without a committed offset start)";
            Cli::command().error(clap::error::ErrorKind::ArgumentConflict, why).exit();
        }
    }
    if let Command::Produce { transactional_id: Some(_), acks, .. } = &cli.command {
        if *acks != Acks::All {
            let why = "with --transactional-id, --acks is all (transactions need every write replicated)";
            Cli::command().error(clap::error::ErrorKind::ArgumentConflict, why).exit();
        }
    }
    if let Command::Txn { command: None, table: None, .. } = &cli.command {
        let why = "txn needs a subcommand (list, describe, abort) or --table NAME";
        Cli::command().error(clap::error::ErrorKind::MissingSubcommand, why).exit();
    }
    if let Command::Produce { .. } = cli.command {
    } else if let Some(t) = cli.timeout {
        // Other commands are simply cut off; produce reports each pending record itself.
        let deadline = Instant::now() + t;
        std::thread::spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            eprintln!("skein: gave up after {} (--timeout)", show_duration(t));
            std::process::exit(1);
        });
    }
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
    let mut config =
        ClientConfig { brokers: cli.brokers.clone(), client_id: "skein-cli".into(), ..ClientConfig::default() };
    if let Some(t) = cli.timeout {
        // A single request gives up a little before the whole command does, so the error that
        // ends the command names the step that got no answer (e.g. no producer id), not just
        // the command's deadline.
        config.request_timeout = config.request_timeout.min(t.mul_f64(0.9));
    }
    let client = Client::with_config(config).await.with_context(|| format!("connecting to {}", cli.brokers))?;
    match cli.command {
        Command::Topic { command } => topic(&client, command).await,
        Command::Produce {
            topic,
            partition,
            key_separator,
            acks,
            print_offsets,
            session,
            transactional_id,
            transaction_size,
            abort,
            transaction_timeout_ms,
        } => {
            let loaded = load_session(session.as_deref())?;
            let txn = transactional_id.map(|id| TxnArgs {
                id,
                size: transaction_size,
                abort,
                timeout: Duration::from_millis(u64::from(transaction_timeout_ms)),
            });
            let args = ProduceArgs {
                topic: &topic,
                partition,
                sep: key_separator.as_deref(),
                acks,
                print: print_offsets,
                session: loaded.clone(),
                deadline: cli.timeout.map(|t| (Instant::now() + t, t)),
                brokers: &cli.brokers,
            };
            let result = match txn {
                Some(txn) => produce_transactional(client, args, txn).await,
                None => produce(client, args).await,
            };
            // A failed run still saves the writes it had acknowledged; its own error comes first.
            let saved = save_session(session.as_deref(), loaded.as_ref());
            result.and(saved)
        }
        Command::Consume {
            topic,
            partition,
            from,
            count,
            timeout_ms,
            format,
            session,
            prefer_replica,
            rack,
            session_deadline_ms,
            group,
            instance_id,
            session_timeout_ms,
            assignor,
            isolation,
        } => {
            let loaded = load_session(session.as_deref())?;
            let session_deadline = Instant::now() + Duration::from_millis(session_deadline_ms);
            let read = ReadOptions { prefer_replica, rack, session: loaded.clone(), session_deadline, isolation };
            let result = match group {
                Some(group) => {
                    let mut config = GroupConfig::new(&group);
                    config.instance_id = instance_id;
                    config.session_timeout_ms = session_timeout_ms;
                    config.assignor = assignor;
                    config.reset = if from == From::End { OffsetReset::Latest } else { OffsetReset::Earliest };
                    consume_group(client, &topic, config, count, timeout_ms, &format, read).await
                }
                None => consume(client, &topic, partition, from, count, timeout_ms, &format, read).await,
            };
            // A failed run still saves the writes it had acknowledged; its own error comes first.
            let saved = save_session(session.as_deref(), loaded.as_ref());
            result.and(saved)
        }
        Command::Cluster { command: ClusterCommand::Status { json } } => cluster_status(&client, json).await,
        Command::Group { command } => group(&client, command).await,
        Command::Table { command } => table_command(&client, command).await,
        Command::Txn { command: Some(command), .. } => txn(&client, command).await,
        Command::Txn { command: None, table, isolation, timeout_ms } => {
            let name = table.context("--table or a subcommand is needed")?;
            txn_session(&client, &name, isolation, Duration::from_millis(timeout_ms)).await
        }
    }
}

async fn topic(client: &Client, command: TopicCommand) -> Result<()> {
    match command {
        TopicCommand::Create { name, partitions, replicas, configs, partitioning } => {
            client.create_topic_with(&name, partitions, replicas, partitioning, &configs).await?;
            println!(
                "created topic {name} with {partitions} {}",
                if partitions == 1 { "partition" } else { "partitions" }
            );
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
        TopicCommand::Split { name, partition, at } => {
            let scheme = Partitioning::from_wire(client.describe_topic(&name).await?.partitioning)
                .context("the broker named an unknown partitioning")?;
            let at = match at {
                Some(text) if scheme.ranged() => {
                    Some(KeyRange::parse_bound(&text, scheme).map_err(anyhow::Error::msg)?)
                }
                _ => None,
            };
            let children = client.split_partition(&name, partition, at.as_deref()).await?;
            resized(client, &name, "split", &[partition], &children).await?;
        }
        TopicCommand::Merge { name, partitions } => {
            let [a, b] = partitions[..] else { bail!("--partitions takes two partitions, e.g. 2,3") };
            let child = client.merge_partitions(&name, [a, b]).await?;
            resized(client, &name, "merged", &[a, b], &[child]).await?;
        }
    }
    Ok(())
}

/// After a split or merge: one line naming the children and their ranges, then, once the
/// parents' leaders reported them (waiting up to 10 s), one with the seal offsets.
async fn resized(client: &Client, name: &str, verb: &str, parents: &[u32], children: &[u32]) -> Result<()> {
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut shown = false;
    loop {
        let t = client.describe_topic(name).await?;
        let scheme = Partitioning::from_wire(t.partitioning).unwrap_or_default();
        if !shown {
            let ranges: Vec<String> = children
                .iter()
                .filter_map(|c| t.partitions.iter().find(|p| p.partition == *c))
                .map(|p| format!("{} {}", p.partition, show_range(p.lineage.range.as_ref(), scheme)))
                .collect();
            println!("{verb} {name} partitions {} into {}", list(parents), ranges.join(" and "));
            shown = true;
        }
        let seals: Vec<Option<u64>> = parents
            .iter()
            .map(|i| t.partitions.iter().find(|p| p.partition == *i).and_then(|p| sealed_at(&p.lineage)))
            .collect();
        if seals.iter().all(Option::is_some) {
            let at: Vec<String> = seals.iter().map(|s| s.unwrap_or_default().to_string()).collect();
            println!("sealed {name} partitions {} at {}", list(parents), at.join(","));
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("partitions {} of {name} not sealed after 10 s (their leaders report the offset)", list(parents));
        }
        compio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A partition's seal offset, once known.
fn sealed_at(l: &skein_client::wire::Lineage) -> Option<u64> {
    (l.seal == 2).then_some(l.sealed_at)
}

/// A range as `[from, to)`, bounds as `KeyRange::show_bound` prints them (`)` unbounded).
fn show_range(r: Option<&skein_client::wire::PartitionRange>, scheme: Partitioning) -> String {
    match r {
        None => "-".into(),
        Some(r) => {
            let to = r.to.as_deref().map_or(String::new(), |t| KeyRange::show_bound(t, scheme));
            format!("[{}, {to})", KeyRange::show_bound(&r.from, scheme))
        }
    }
}

/// A range as JSON: `{"from", "to"}`, `to` null when unbounded; null for a hash topic.
fn range_json(r: Option<&skein_client::wire::PartitionRange>, scheme: Partitioning) -> serde_json::Value {
    match r {
        None => serde_json::Value::Null,
        Some(r) => serde_json::json!({
            "from": KeyRange::show_bound(&r.from, scheme),
            "to": r.to.as_deref().map(|t| KeyRange::show_bound(t, scheme)),
        }),
    }
}

fn parse_partitioning(s: &str) -> Result<Partitioning, String> {
    Partitioning::parse(s).ok_or_else(|| format!("unknown partitioning '{s}' (hash, hash-range or key-range)"))
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
    let scheme = Partitioning::from_wire(t.partitioning).unwrap_or_default();
    let partitions: Vec<serde_json::Value> = t
        .partitions
        .iter()
        .map(|p| {
            let state = ["open", "sealing", "sealed"].get(usize::from(p.lineage.seal)).copied().unwrap_or("unknown");
            serde_json::json!({"partition": p.partition, "leader": p.leader, "leader_epoch": p.leader_epoch,
                "replicas": p.replicas, "isr": p.isr, "log_start": p.log_start, "high_watermark": p.high_watermark,
                "log_end": p.log_end, "last_stable": p.last_stable,
                "range": range_json(p.lineage.range.as_ref(), scheme), "parents": p.lineage.parents,
                "state": state, "sealed_at": sealed_at(&p.lineage)})
        })
        .collect();
    serde_json::json!({"topic": t.name, "partitioning": scheme.name(), "partitions": partitions})
}

fn print_describe(t: &TopicDescription) {
    println!("topic {}", t.name);
    let scheme = Partitioning::from_wire(t.partitioning).unwrap_or_default();
    if scheme.ranged() {
        println!("  partitioning {scheme}");
    }
    for c in &t.configs {
        println!("  config {}={}", c.key, c.value);
    }
    println!(
        "{:>9} {:>6} {:>6} {:>9} {:>6} {:>12} {:>14} {:>12} {:>12}",
        "partition", "leader", "epoch", "replicas", "isr", "log_start", "high_watermark", "log_end", "last_stable"
    );
    for p in &t.partitions {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        println!(
            "{:>9} {:>6} {:>6} {:>9} {:>6} {:>12} {:>14} {:>12} {:>12}",
            p.partition,
            p.leader,
            p.leader_epoch,
            list(&p.replicas),
            list(&p.isr),
            p.log_start,
            p.high_watermark,
            p.log_end,
            p.last_stable
        );
    }
    if scheme.ranged() {
        println!("{:>9} {:>8} {:>9} range", "partition", "state", "parents");
        for p in &t.partitions {
            let state = match (p.lineage.seal, sealed_at(&p.lineage)) {
                (_, Some(at)) => format!("sealed@{at}"),
                (1, None) => "sealing".into(),
                _ => "open".into(),
            };
            let parents = p.lineage.parents.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let parents = if parents.is_empty() { "-".into() } else { parents };
            println!("{:>9} {state:>8} {parents:>9} {}", p.partition, show_range(p.lineage.range.as_ref(), scheme));
        }
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

/// What `produce` was asked to do.
struct ProduceArgs<'a> {
    topic: &'a str,
    partition: Option<u32>,
    sep: Option<&'a str>,
    acks: Acks,
    print: bool,
    session: Option<SessionHandle>,
    /// `--timeout`: when the command gives up, and the bound as given.
    deadline: Option<(Instant, Duration)>,
    brokers: &'a str,
}

/// Sends every stdin line as a record. With `--print-offsets` each input line gets exactly
/// one output line, in input order: `PARTITION OFFSET`, or `error PARTITION CODE` for a
/// record that failed after every retry (each also named on stderr). Any failure: exit 1.
async fn produce(client: Client, args: ProduceArgs<'_>) -> Result<()> {
    let ProduceArgs { topic, partition, sep, acks, print, session, deadline, brokers } = args;
    let config = ProducerConfig { acks, linger: Duration::from_millis(2), session, ..ProducerConfig::default() };
    let producer = Producer::new(client, config);
    producer.on_retry(RetryReporter::default().into_handler());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    let mut out = Output { out: BufWriter::with_capacity(1 << 16, std::io::stdout().lock()), print, failed: 0 };
    let mut pending: VecDeque<(u64, Delivery)> = VecDeque::new();
    let mut line = Vec::new();
    let mut n: u64 = 0;
    let expired = |what: &str| {
        let (_, bound) = deadline.expect("only with a deadline");
        ClientError::Timeout(format!("{what}: --timeout {} passed", show_duration(bound)))
    };
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
        let send = producer.send_to(topic, partition, key, value);
        let delivery = match within(deadline, send).await {
            Some(Ok(d)) => d,
            // This record alone is wrong (e.g. a partition the topic does not have).
            Some(Err(e @ ClientError::Invalid(_))) => {
                out.report(n, partition, Err(e))?;
                continue;
            }
            // The producer cannot go on (no producer id, no partition count): every line
            // read so far fails with it and stdin is not read further.
            Some(Err(e)) => {
                out.give_up(pending, Some((n, partition)), &e)?;
                return Err(explain_send_error(e, topic, brokers));
            }
            None => {
                let e = expired("sending");
                out.give_up(pending, Some((n, partition)), &e)?;
                bail!("{}; stopped after {n} lines of stdin", describe_failure(&e));
            }
        };
        pending.push_back((n, delivery));
        while pending.len() > PENDING_MAX {
            let (i, d) = pending.pop_front().expect("non-empty");
            let p = d.partition();
            match within(deadline, d).await {
                Some(r) => out.report(i, Some(p), r)?,
                None => {
                    let e = expired("waiting for acknowledgements");
                    out.report(i, Some(p), Err(e.clone()))?;
                    out.give_up(pending, None, &e)?;
                    bail!("{}; stopped after {n} lines of stdin", describe_failure(&e));
                }
            }
        }
    }
    let flushed = within(deadline, producer.flush()).await.is_some();
    for (i, d) in pending {
        let p = d.partition();
        // After the flush every delivery is resolved; past the deadline, those that are not
        // have timed out.
        let r = if flushed {
            d.await
        } else {
            futures_util::FutureExt::now_or_never(d).unwrap_or_else(|| Err(expired("waiting for acknowledgements")))
        };
        out.report(i, Some(p), r)?;
    }
    out.finish(n)
}

/// `produce`'s output: one line per input line (with `--print-offsets`) and one stderr line
/// per failed record.
struct Output<W: Write> {
    out: W,
    print: bool,
    failed: u64,
}

impl<W: Write> Output<W> {
    /// Reports input line `line` (`partition`: `None` if the record never got one, printed
    /// as -1).
    fn report(&mut self, line: u64, partition: Option<u32>, r: DeliveryResult) -> Result<()> {
        let partition = partition.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        match r {
            Ok((p, o)) if self.print => {
                writeln!(self.out, "{p} {}", if o == u64::MAX { "-1".to_owned() } else { o.to_string() })?
            }
            Ok(_) => {}
            Err(e) => {
                self.failed += 1;
                if self.print {
                    writeln!(self.out, "error {partition} {}", e.code_name())?;
                }
                // stdout first, so a reader of both sees the error line before its explanation.
                self.out.flush()?;
                eprintln!("skein: line {line}: partition {partition}: {}", describe_failure(&e));
            }
        }
        Ok(())
    }

    /// Reports every pending record, then `current` (the line being sent), as failed with
    /// `e`, in input order.
    fn give_up(
        &mut self,
        pending: VecDeque<(u64, Delivery)>,
        current: Option<(u64, Option<u32>)>,
        e: &ClientError,
    ) -> Result<()> {
        for (i, d) in pending {
            // One that was answered already keeps its answer.
            let p = d.partition();
            let r = futures_util::FutureExt::now_or_never(d).unwrap_or_else(|| Err(e.clone()));
            self.report(i, Some(p), r)?;
        }
        if let Some((i, p)) = current {
            self.report(i, p, Err(e.clone()))?;
        }
        self.out.flush()?;
        Ok(())
    }

    fn finish(&mut self, n: u64) -> Result<()> {
        self.out.flush()?;
        if self.failed > 0 {
            bail!("{} of {n} records failed (each named above)", self.failed);
        }
        Ok(())
    }
}

/// `produce --transactional-id`: how the transactions go.
struct TxnArgs {
    id: String,
    /// Lines per transaction (`None`: all input in one).
    size: Option<u64>,
    /// Abort every transaction instead of committing it.
    abort: bool,
    /// The coordinator aborts a transaction open longer.
    timeout: Duration,
}

/// One input line of the open transaction: queued (its delivery), or refused before it was.
enum TxnLine {
    Sent(u64, Delivery),
    Refused(u64, Option<u32>, ClientError),
}

/// Sends stdin lines in transactions of `--transaction-size` lines (the last one at the end
/// of input), committing each (or aborting it, with `--abort`). A line's output (with
/// `--print-offsets`: `PARTITION OFFSET`, or `error PARTITION CODE`) is printed once its
/// transaction ended, in input order. A transaction that cannot commit is aborted, its lines
/// reported as failed, and the next one goes on; a fenced producer, or one whose transaction
/// could not be ended, stops reading stdin. Any failure: exit 1.
async fn produce_transactional(client: Client, args: ProduceArgs<'_>, txn: TxnArgs) -> Result<()> {
    let ProduceArgs { topic, partition, sep, acks: _, print, session, deadline, brokers } = args;
    let mut config = TxnConfig::new(&txn.id);
    config.transaction_timeout = txn.timeout;
    config.producer = ProducerConfig { linger: Duration::from_millis(2), session, ..ProducerConfig::default() };
    if let Some((_, bound)) = deadline {
        config.coordinator_timeout = config.coordinator_timeout.min(bound.mul_f64(0.9));
    }
    let shown = skein_client::wire::shown(&txn.id);
    let mut producer = match within(deadline, TransactionalProducer::init(client, config)).await {
        Some(Ok(p)) => p,
        Some(Err(e)) => bail!("cannot start transactional producer '{shown}' (via {brokers}): {}", txn_failure(&e)),
        None => bail!("cannot start transactional producer '{shown}': --timeout passed (TIMED_OUT)"),
    };
    producer.on_retry(RetryReporter::default().into_handler());
    let chunks = stdin_lines();
    let mut lines = Vec::new().into_iter();
    let mut out = Output { out: BufWriter::with_capacity(1 << 16, std::io::stdout().lock()), print, failed: 0 };
    let mut open: Vec<TxnLine> = Vec::new();
    let mut n: u64 = 0;
    loop {
        let line = match lines.next() {
            Some(line) => line,
            None => match chunks.recv_async().await {
                Ok(chunk) => {
                    lines = chunk.context("reading stdin")?.into_iter();
                    continue;
                }
                Err(_) => break, // end of input
            },
        };
        n += 1;
        let (key, value) = match sep.and_then(|s| split_key(&line, s.as_bytes())) {
            Some((k, v)) => (Some(k), v),
            None => (None, &line[..]),
        };
        if !producer.in_transaction() {
            producer.begin().map_err(|e| anyhow!("{}", txn_failure(&e)))?;
        }
        let sent = within(deadline, producer.send(topic, partition, key, value)).await;
        let stop = match sent {
            Some(Ok(d)) => {
                open.push(TxnLine::Sent(n, d));
                None
            }
            // This line alone is refused (a partition the topic does not have), or the
            // transaction failed already (it is aborted at its end): the line fails.
            Some(Err(e @ (TxnError::Invalid(_) | TxnError::Abortable(_)))) => {
                open.push(TxnLine::Refused(n, partition, e.client_error().clone()));
                None
            }
            Some(Err(e)) => Some(e.client_error().clone()),
            None => Some(ClientError::Timeout("sending: --timeout passed".into())),
        };
        if let Some(e) = stop {
            // The producer cannot go on (no partition count, fenced): this transaction fails
            // and stdin is not read further.
            open.push(TxnLine::Refused(n, partition, e.clone()));
            if producer.in_transaction() {
                let _ = within(deadline, producer.abort()).await;
            }
            report_transaction(&mut out, std::mem::take(&mut open), Some(&e))?;
            return Err(explain_send_error(e, topic, brokers).context(format!("stopped after {n} lines of stdin")));
        }
        if txn.size.is_some_and(|size| open.len() as u64 >= size) {
            end_transaction(&mut producer, &mut out, std::mem::take(&mut open), txn.abort, deadline).await?;
        }
    }
    if !open.is_empty() {
        end_transaction(&mut producer, &mut out, open, txn.abort, deadline).await?;
    }
    out.finish(n)
}

/// The lines of stdin (without their `\n`), in chunks, read on a thread of their own:
/// waiting for input never stops the runtime, so the open transaction's records go out (and
/// the transaction stays open, as the coordinator sees it) while stdin is quiet. A chunk is
/// handed over when it is full or when the next read may wait for input (nothing buffered),
/// so a quiet stdin's lines are not held back and a busy one costs a wakeup per chunk, not per
/// line. The channel closes at the end of input.
fn stdin_lines() -> flume::Receiver<std::io::Result<Vec<Vec<u8>>>> {
    let (tx, rx) = flume::bounded(STDIN_CHUNKS_QUEUED);
    std::thread::spawn(move || {
        let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin());
        let mut chunk = Vec::with_capacity(STDIN_CHUNK_LINES);
        loop {
            let mut line = Vec::new();
            let read = input.read_until(b'\n', &mut line);
            let done = match read {
                Ok(0) => true,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    chunk.push(line);
                    false
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if (done || chunk.len() >= STDIN_CHUNK_LINES || input.buffer().is_empty()) && !chunk.is_empty() {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(STDIN_CHUNK_LINES));
                if tx.send(Ok(full)).is_err() {
                    return;
                }
            }
            if done {
                return;
            }
        }
    });
    rx
}

/// Ends the open transaction (commit, or abort with `--abort`) and reports its lines. A
/// transaction that cannot commit is aborted and its lines fail with the reason; an end that
/// fails for good (fenced, no answer) is returned after its lines were reported.
async fn end_transaction<W: Write>(
    producer: &mut TransactionalProducer,
    out: &mut Output<W>,
    lines: Vec<TxnLine>,
    abort: bool,
    deadline: Option<(Instant, Duration)>,
) -> Result<()> {
    let ended = if abort {
        // Every record is written (so each line has its offset) before the abort.
        let _ = within(deadline, producer.flush()).await;
        within(deadline, producer.abort()).await
    } else {
        within(deadline, producer.commit()).await
    };
    let ended = ended.unwrap_or_else(|| Err(TxnError::Retriable(ClientError::Timeout("--timeout passed".into()))));
    match ended {
        Ok(()) => report_transaction(out, lines, None),
        Err(e) if e.is_abortable() => {
            report_transaction(out, lines, Some(e.client_error()))?;
            match within(deadline, producer.abort()).await {
                Some(Ok(())) => Ok(()),
                Some(Err(a)) => bail!("aborting a failed transaction: {}", txn_failure(&a)),
                None => bail!("aborting a failed transaction: --timeout passed (TIMED_OUT)"),
            }
        }
        Err(e) => {
            report_transaction(out, lines, Some(e.client_error()))?;
            let what = if abort { "aborting" } else { "committing" };
            bail!("{what} transaction of '{}': {}", producer.transactional_id(), txn_failure(&e))
        }
    }
}

/// Reports a transaction's lines in order: each record's own outcome, or, if the transaction
/// failed (`failure`), the record's own error or else the transaction's.
fn report_transaction<W: Write>(out: &mut Output<W>, lines: Vec<TxnLine>, failure: Option<&ClientError>) -> Result<()> {
    for line in lines {
        match line {
            TxnLine::Sent(i, d) => {
                let p = d.partition();
                let fallback = || Err(failure.cloned().unwrap_or(ClientError::Timeout("no acknowledgement".into())));
                let r = futures_util::FutureExt::now_or_never(d).unwrap_or_else(fallback);
                let r = match (r, failure) {
                    (Ok(_), Some(e)) => Err(e.clone()),
                    (r, _) => r,
                };
                out.report(i, Some(p), r)?;
            }
            TxnLine::Refused(i, p, e) => out.report(i, p, Err(e))?,
        }
    }
    out.out.flush()?;
    Ok(())
}

/// A transactional failure as one line ending with its code name.
fn txn_failure(e: &TxnError) -> String {
    let what = match e {
        TxnError::Fenced(_) => "fenced by a newer producer with this transactional id, or by the coordinator",
        TxnError::Fatal(_) => "the producer cannot go on",
        TxnError::Abortable(_) => "the transaction cannot commit",
        TxnError::Retriable(_) => "no answer in time",
        TxnError::Invalid(_) => "refused",
    };
    format!("{what}: {}", failure(e.client_error()))
}

/// `fut`'s output, or `None` if `deadline` passes first (no deadline: waits).
async fn within<F: std::future::Future>(deadline: Option<(Instant, Duration)>, fut: F) -> Option<F::Output> {
    use futures_util::future::{select, Either};
    let Some((at, _)) = deadline else {
        return Some(fut.await);
    };
    let left = at.saturating_duration_since(Instant::now());
    match select(std::pin::pin!(fut), std::pin::pin!(compio::time::sleep(left))).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}

/// A failure in a user's terms: what went wrong, then the client's own words.
fn describe_failure(e: &ClientError) -> String {
    use skein_client::wire::ErrorCode;
    let plain = match e {
        ClientError::Broker(ErrorCode::NOT_ENOUGH_REPLICAS, _) => {
            "fewer in-sync replicas than the topic's min.insync.replicas (acks=all cannot be met)"
        }
        ClientError::Broker(ErrorCode::NOT_LEADER | ErrorCode::FENCED_LEADER_EPOCH, _) => {
            "the broker asked is not (or no longer) the partition's leader"
        }
        ClientError::Broker(ErrorCode::REQUEST_TIMED_OUT, _) => {
            "the leader did not get the record to its in-sync replicas in time"
        }
        ClientError::Broker(ErrorCode::OUT_OF_ORDER_SEQUENCE, _) => {
            "the broker did not recognise a retried batch (sequence out of order)"
        }
        ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _) => "no such topic or partition",
        ClientError::Timeout(_) => "no answer in time",
        ClientError::ConnectionLost | ClientError::Io(_) => "the connection to the broker failed",
        _ => "",
    };
    if plain.is_empty() {
        format!("{} ({e})", e.code_name())
    } else {
        format!("{} ({plain}; {e})", e.code_name())
    }
}

/// The first send waits for a producer id and the topic's partition count: a failure there
/// means the brokers could not be used at all, which is what the user needs to hear.
fn explain_send_error(e: ClientError, topic: &str, brokers: &str) -> anyhow::Error {
    let what = match &e {
        ClientError::Timeout(_) | ClientError::ConnectionLost | ClientError::Io(_) => {
            format!("cannot produce to {topic}: no broker of {brokers} answered (paused, overloaded or unreachable?)")
        }
        _ => format!("cannot produce to {topic}"),
    };
    anyhow::Error::new(e).context(what)
}

/// Prints produce retries on stderr: the first retry of a partition at once, then at most one
/// line per second per partition (a leader election retries every 20 ms).
#[derive(Default)]
struct RetryReporter {
    last: std::cell::RefCell<std::collections::HashMap<(String, u32), Instant>>,
}

impl RetryReporter {
    fn into_handler(self) -> impl Fn(&Retry<'_>) + 'static {
        move |r: &Retry<'_>| {
            let now = Instant::now();
            let mut last = self.last.borrow_mut();
            let key = (r.topic.to_owned(), r.partition);
            if last.get(&key).is_some_and(|t| now.duration_since(*t) < RETRY_REPORT_INTERVAL) {
                return;
            }
            last.insert(key, now);
            eprintln!(
                "skein: retrying {}/{} (attempt {} failed): {}",
                r.topic,
                r.partition,
                r.attempt,
                describe_failure(r.error)
            );
        }
    }
}

/// `30s`, `500ms`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a duration such as 30s, 500ms or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("'{s}': unit '{unit}' is not ms, s or m")),
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn split_key<'a>(line: &'a [u8], sep: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    if sep.is_empty() {
        return None;
    }
    let at = line.windows(sep.len()).position(|w| w == sep)?;
    Some((&line[..at], &line[at + sep.len()..]))
}

/// `consume`'s replica choice and session.
struct ReadOptions {
    prefer_replica: ReadReplica,
    rack: Option<String>,
    session: Option<SessionHandle>,
    /// When a read still behind the session's tokens fails.
    session_deadline: Instant,
    /// Committed transactions only, or every record.
    isolation: Isolation,
}

/// `consume --from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum From {
    Beginning,
    End,
    Offset(u64),
    /// This many records before the end.
    BeforeEnd(u64),
}

fn parse_from(s: &str) -> Result<From, String> {
    let bad = || format!("'{s}' is not beginning, end, an offset or -N (N records before the end)");
    match s {
        "beginning" => Ok(From::Beginning),
        "end" => Ok(From::End),
        _ => match s.strip_prefix('-') {
            Some(n) => n.parse().map(From::BeforeEnd).map_err(|_| bad()),
            None => s.parse().map(From::Offset).map_err(|_| bad()),
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    client: Client,
    topic: &str,
    partition: Option<u32>,
    from: From,
    count: Option<u64>,
    timeout_ms: Option<u64>,
    format: &Format,
    read: ReadOptions,
) -> Result<()> {
    let partitions: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => (0..client.partition_count(topic).await?).collect(),
    };
    let session_deadline = read.session_deadline;
    let max_wait = Duration::from_millis(timeout_ms.unwrap_or(500).clamp(1, 500));
    let isolation = read.isolation;
    let config = ConsumerConfig {
        max_wait,
        prefer_replica: read.prefer_replica,
        rack: read.rack,
        session: read.session,
        isolation,
        ..ConsumerConfig::default()
    };
    let mut consumer = Consumer::new(client.clone(), config);
    // A whole ranged topic is followed through its splits and merges: a partition after the
    // ones it came from are read to their seals, so each key's records come in order.
    let ranged = partition.is_none()
        && Partitioning::from_wire(client.topic_metadata(topic).await?.partitioning).is_some_and(Partitioning::ranged);
    match from {
        From::Beginning if ranged => consumer.follow(topic, Position::Beginning).await?,
        From::End if ranged => consumer.follow(topic, Position::End).await?,
        From::Beginning => consumer.assign(topic, &partitions, Position::Beginning).await?,
        From::End => consumer.assign(topic, &partitions, Position::End).await?,
        From::Offset(o) => consumer.assign(topic, &partitions, Position::Offset(o)).await?,
        From::BeforeEnd(n) => {
            for &p in &partitions {
                let start = client.list_offset(topic, p, skein_client::wire::EARLIEST).await?;
                // The end this reader reaches: the last stable offset for read_committed.
                let end = client.list_offset_isolated(topic, p, skein_client::wire::LATEST, isolation).await?;
                consumer.assign(topic, &[p], Position::Offset(end.saturating_sub(n).max(start))).await?;
            }
        }
    }
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut seen = 0u64;
    let mut last = Instant::now();
    while count.is_none_or(|c| seen < c) {
        let records = consumer.poll().await?;
        if records.is_empty() {
            if idle_ended(&consumer, &mut last, timeout_ms, session_deadline)? {
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

/// After an empty poll: whether the read ends (`--timeout-ms` passed since the last record).
/// Below the session's tokens an empty poll means "not caught up yet" (a replica waiting, a
/// redirect to the leader): the idle timeout does not run then, the session deadline does,
/// and past it the read fails.
fn idle_ended(
    consumer: &Consumer,
    last: &mut Instant,
    timeout_ms: Option<u64>,
    session_deadline: Instant,
) -> Result<bool> {
    if let Some(lag) = consumer.behind_session().first() {
        if Instant::now() >= session_deadline {
            return Err(behind_session_error(lag));
        }
        *last = Instant::now();
        return Ok(false);
    }
    Ok(timeout_ms.is_some_and(|t| last.elapsed() >= Duration::from_millis(t)))
}

/// A read that did not reach its session's token by the deadline.
fn behind_session_error(lag: &skein_client::SessionLag) -> anyhow::Error {
    anyhow!(
        "{}/{} did not reach the session's token (offset {}, leader epoch {}) within the session deadline; read up to offset {}",
        lag.topic,
        lag.partition,
        lag.token.min_high_watermark,
        lag.token.min_leader_epoch,
        lag.position
    )
}

/// `consume --group`: reads what the group's coordinator assigns, printing each record and
/// committing what was printed (every second, on revocations, and on the way out: count
/// reached, idle timeout, error, SIGINT or SIGTERM), then leaves the group.
async fn consume_group(
    client: Client,
    topic: &str,
    group: GroupConfig,
    count: Option<u64>,
    timeout_ms: Option<u64>,
    format: &Format,
    read: ReadOptions,
) -> Result<()> {
    let name = group.group.clone();
    let config = ConsumerConfig {
        max_wait: Duration::from_millis(timeout_ms.unwrap_or(100).clamp(1, 100)),
        prefer_replica: read.prefer_replica,
        rack: read.rack,
        session: read.session,
        isolation: read.isolation,
        ..ConsumerConfig::default()
    };
    let mut consumer = GroupConsumer::new(client, config, group);
    consumer.subscribe(&[topic]);
    let stop = watch_stop_signals().await;
    let result = group_loop(&mut consumer, count, timeout_ms, format, &stop, read.session_deadline).await;
    // Whatever ended the loop, what was printed is committed and the group left.
    let closed = consumer.close().await.map_err(|e| group_error(&name, e).context("committing on exit"));
    result.and(closed)
}

/// A flag set once SIGINT or SIGTERM arrives (the handlers are installed on return).
async fn watch_stop_signals() -> std::rc::Rc<std::cell::Cell<bool>> {
    use futures_util::future::select;
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    let stop = std::rc::Rc::new(std::cell::Cell::new(false));
    let flag = stop.clone();
    compio::runtime::spawn(async move {
        let interrupt = std::pin::pin!(compio::signal::unix::signal(SIGINT));
        let terminate = std::pin::pin!(compio::signal::unix::signal(SIGTERM));
        let _ = select(interrupt, terminate).await;
        flag.set(true);
    })
    .detach();
    // Let the task run up to its wait, so the handlers are in place.
    skein_client::yield_now().await;
    stop
}

async fn group_loop(
    consumer: &mut GroupConsumer,
    count: Option<u64>,
    timeout_ms: Option<u64>,
    format: &Format,
    stop: &std::cell::Cell<bool>,
    session_deadline: Instant,
) -> Result<()> {
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut seen = 0u64;
    let mut last = Instant::now();
    while count.is_none_or(|c| seen < c) && !stop.get() {
        let records = consumer.poll().await?;
        if records.is_empty() {
            if idle_ended(consumer.consumer(), &mut last, timeout_ms, session_deadline)? {
                break;
            }
            continue;
        }
        last = Instant::now();
        // Records past --count are not printed: commits start at the first of them.
        let mut unprinted: std::collections::BTreeMap<(String, u32), u64> = std::collections::BTreeMap::new();
        for r in &records {
            if count.is_some_and(|c| seen >= c) {
                unprinted.entry((r.topic.to_string(), r.partition)).or_insert(r.offset);
                continue;
            }
            format.write(&mut out, r)?;
            seen += 1;
        }
        out.flush()?;
        for ((topic, partition), offset) in unprinted {
            consumer.set_consumed(&topic, partition, offset)?;
        }
    }
    out.flush()?;
    Ok(())
}

async fn group(client: &Client, command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::List => {
            let list = client.list_groups().await.map_err(|e| anyhow!("listing groups: {}", failure(&e)))?;
            let rows: Vec<Vec<String>> =
                list.groups.iter().map(|g| vec![g.group.clone(), g.state.clone(), g.members.to_string()]).collect();
            print_table(&["GROUP", "STATE", "MEMBERS"], &rows);
            for (node, e) in &list.failed {
                eprintln!("skein: broker {node} did not answer ListGroups; its groups are missing: {}", failure(e));
            }
        }
        GroupCommand::Describe { group, json } => {
            let d = client.describe_group(&group).await.map_err(|e| group_error(&group, e))?;
            let lags = group_lags(client, &d).await;
            if json {
                println!("{}", group_json(&d, &lags));
            } else {
                print_group(&d, &lags);
            }
        }
        GroupCommand::ResetOffsets { group, topic, to } => {
            let offsets = client.reset_offsets(&group, &topic, to).await.map_err(|e| group_error(&group, e))?;
            for (partition, offset) in offsets {
                println!("{topic} {partition} {offset}");
            }
        }
        GroupCommand::Delete { group } => {
            client.delete_group(&group).await.map_err(|e| group_error(&group, e))?;
            println!("deleted group {group}");
        }
    }
    Ok(())
}

async fn txn(client: &Client, command: TxnCommand) -> Result<()> {
    match command {
        TxnCommand::List { json } => {
            let list =
                client.list_transactions().await.map_err(|e| anyhow!("listing transactions: {}", failure(&e)))?;
            if json {
                let all: Vec<serde_json::Value> = list
                    .transactions
                    .iter()
                    .map(|t| {
                        serde_json::json!({"transactional_id": t.transactional_id, "producer_id": t.producer_id,
                            "producer_epoch": t.producer_epoch, "state": t.state, "age_ms": t.age_ms})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                let rows: Vec<Vec<String>> = list
                    .transactions
                    .iter()
                    .map(|t| {
                        vec![
                            t.transactional_id.clone(),
                            t.producer_id.to_string(),
                            t.producer_epoch.to_string(),
                            t.state.clone(),
                            t.age_ms.to_string(),
                        ]
                    })
                    .collect();
                print_table(&["TRANSACTIONAL-ID", "PRODUCER-ID", "EPOCH", "STATE", "AGE-MS"], &rows);
            }
            for (node, e) in &list.failed {
                eprintln!("skein: broker {node} did not answer ListTransactions; its ids are missing: {}", failure(e));
            }
        }
        TxnCommand::Describe { id, json } => {
            let d = client.describe_transaction(&id).await.map_err(|e| txn_admin_error(&id, e))?;
            if json {
                println!("{}", transaction_json(&d));
            } else {
                print_transaction(&d);
            }
        }
        TxnCommand::Abort { id } => {
            client.abort_transaction(&id).await.map_err(|e| txn_admin_error(&id, e))?;
            println!("aborted transaction {id}");
        }
    }
    Ok(())
}

/// An isolation level's name, for clap.
fn parse_level(s: &str) -> Result<Level, String> {
    Level::parse(s).ok_or_else(|| format!("unknown isolation level {s} (one of {})", level_names()))
}

fn level_names() -> String {
    Level::ALL.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
}

/// A table's handle, or a failure in the user's terms.
async fn open_table(client: &Client, name: &str) -> Result<Table> {
    client.table(name).await.map_err(|e| table_failure(name, e))
}

/// A table call's failure in the user's terms, ending with a code name where there is one.
fn table_failure(name: &str, e: TableError) -> anyhow::Error {
    match e {
        TableError::Client(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _)) => {
            anyhow!("table '{}' not found (UNKNOWN_TOPIC_OR_PARTITION)", skein_client::wire::shown(name))
        }
        TableError::NotATable(_) | TableError::Client(ClientError::Broker(ErrorCode::NOT_A_TABLE, _)) => {
            anyhow!("'{}' is not a table (NOT_A_TABLE)", skein_client::wire::shown(name))
        }
        TableError::Client(e) => anyhow!("{}", failure(&e)),
        e => anyhow!("{e}"),
    }
}

async fn table_command(client: &Client, command: TableCommand) -> Result<()> {
    match command {
        TableCommand::Create { name, partitions, replicas, isolation, partitioning } => {
            client
                .create_table_with(&name, partitions, replicas, partitioning, isolation)
                .await
                .map_err(|e| anyhow!("creating table: {}", failure(&e)))?;
            answer(&format!("created {name}"))?;
        }
        TableCommand::Get { name, key, prefer_replica, rack, session } => {
            let t = open_table(client, &name).await?;
            let loaded = load_session(session.as_deref())?;
            t.set_session(loaded.clone());
            t.set_rack(rack);
            let v = if prefer_replica == ReadReplica::Leader && loaded.is_none() {
                t.get(key.as_bytes()).await
            } else {
                t.get_from(key.as_bytes(), prefer_replica).await
            };
            let v = v.map_err(|e| table_failure(&name, e))?;
            save_session(session.as_deref(), loaded.as_ref())?;
            answer(&value_line(key.as_bytes(), v.as_deref()))?;
        }
        TableCommand::Put { name, key, value, session } => {
            let t = open_table(client, &name).await?;
            let loaded = load_session(session.as_deref())?;
            t.set_session(loaded.clone());
            t.put(key.as_bytes(), value.as_bytes()).await.map_err(|e| table_failure(&name, e))?;
            save_session(session.as_deref(), loaded.as_ref())?;
            answer("ok")?;
        }
        TableCommand::Delete { name, key } => {
            let t = open_table(client, &name).await?;
            t.delete(key.as_bytes()).await.map_err(|e| table_failure(&name, e))?;
            answer("ok")?;
        }
        TableCommand::Scan { name, from, to } => {
            let t = open_table(client, &name).await?;
            let rows = t.scan(from.as_bytes(), to.as_bytes()).await.map_err(|e| table_failure(&name, e))?;
            for line in scan_lines(&rows) {
                answer(&line)?;
            }
        }
        TableCommand::Index(command) => index_command(client, command).await?,
        TableCommand::Query { name, index, value, explain, session } => {
            let t = open_table(client, &name).await?;
            t.set_session(load_session(session.as_deref())?);
            let def = client.index(&name, &index).await.map_err(|e| table_failure(&name, e))?;
            let found = t.query(&def, value.as_bytes()).await.map_err(|e| table_failure(&name, e))?;
            if explain {
                for p in &found.touched {
                    answer(&format!("partition {} {} snapshot {}", p.topic, p.partition, p.snapshot))?;
                }
                answer(&format!("touched {}", found.touched.len()))?;
            }
            for line in scan_lines(&found.rows) {
                answer(&line)?;
            }
        }
    }
    Ok(())
}

async fn index_command(client: &Client, command: IndexCommand) -> Result<()> {
    match command {
        IndexCommand::Create { table, name, field, kind, sync, async_, no_wait } => {
            let mode = match (sync, async_, kind) {
                (true, _, _) => IndexMode::Sync,
                (_, true, _) => IndexMode::Async,
                (_, _, IndexKind::Document) => IndexMode::Sync,
                (_, _, IndexKind::Term) => IndexMode::Async,
            };
            let def =
                client.create_index(&table, &name, &field, kind, mode).await.map_err(|e| table_failure(&table, e))?;
            if !no_wait {
                let mut last = String::new();
                loop {
                    let state = client.index_state(&def).await.map_err(|e| table_failure(&table, e))?;
                    let (done, total) = state.iter().fold((0, 0), |(d, t), p| (d + p.done, t + p.total));
                    let line = format!(
                        "building {name}: {done} of {total} keys, {} of {} partitions done",
                        state.iter().filter(|p| p.built).count(),
                        state.len()
                    );
                    if line != last {
                        eprintln!("{line}");
                        last = line;
                    }
                    if state.iter().all(|p| p.built) {
                        break;
                    }
                    compio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            answer(&format!("created index {name}"))?;
        }
        IndexCommand::Check { table, name } => {
            let def = client.index(&table, &name).await.map_err(|e| table_failure(&table, e))?;
            let check = client.check_index(&def).await.map_err(|e| table_failure(&table, e))?;
            if check.disagreements.is_empty() {
                answer(&format!("agree rows {} compared {}", check.rows, check.compared))?;
            } else {
                for line in &check.disagreements {
                    answer(&format!("disagree {line}"))?;
                }
                std::process::exit(1);
            }
        }
        IndexCommand::List { table, json } => {
            let defs = client.indexes(&table).await.map_err(|e| table_failure(&table, e))?;
            let mut rows = Vec::new();
            for def in defs {
                let state = client.index_state(&def).await.map_err(|e| table_failure(&table, e))?;
                let (done, total) = state.iter().fold((0, 0), |(d, t), p| (d + p.done, t + p.total));
                let built = state.iter().all(|p| p.built);
                let lag_ms = state.iter().filter_map(|p| p.lag_ms).max();
                let behind = state.iter().filter_map(|p| p.behind).max();
                rows.push((def, built, done, total, lag_ms, behind));
            }
            if json {
                let arr: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(d, built, done, total, lag_ms, behind)| {
                        serde_json::json!({
                            "name": d.name, "table": d.table, "field": d.field, "kind": d.kind.name(),
                            "mode": d.mode.name(), "topic": d.topic(), "built": built, "done": done,
                            "total": total, "lag_ms": lag_ms, "behind": behind,
                        })
                    })
                    .collect();
                answer(&serde_json::Value::Array(arr).to_string())?;
            } else {
                for (d, built, done, total, lag_ms, behind) in rows {
                    let mut line = format!(
                        "index {} {} {} {} {} {done}/{total}",
                        d.name,
                        d.kind.name(),
                        d.mode.name(),
                        d.field,
                        if built { "built" } else { "building" }
                    );
                    if let (Some(l), Some(b)) = (lag_ms, behind) {
                        line.push_str(&format!(" lag-ms {l} behind {b}"));
                    }
                    answer(&line)?;
                }
            }
        }
    }
    Ok(())
}

/// Prints one answer line and flushes it.
fn answer(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("writing to stdout")
}

/// `value K V`, or `value K nil`.
fn value_line(key: &[u8], value: Option<&[u8]>) -> String {
    let key = String::from_utf8_lossy(key);
    match value {
        Some(v) => format!("value {key} {}", String::from_utf8_lossy(v)),
        None => format!("value {key} nil"),
    }
}

/// `row K V` per row, then `end`.
fn scan_lines(rows: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    let mut lines: Vec<String> = rows
        .iter()
        .map(|(k, v)| format!("row {} {}", String::from_utf8_lossy(k), String::from_utf8_lossy(v)))
        .collect();
    lines.push("end".into());
    lines
}

/// One command of `skein txn --table`.
#[derive(Debug, PartialEq, Eq)]
enum TxnInput {
    Begin(Option<Level>),
    Get(String),
    Put(String, String),
    Delete(String),
    Scan(String, String),
    Commit,
    Abort,
}

/// Parses a line of `skein txn --table` input: `Ok(None)` for an empty line, `Err` the
/// message of its `error` answer.
fn parse_txn_input(line: &str) -> Result<Option<TxnInput>, String> {
    let line = line.trim();
    let Some(word) = line.split_whitespace().next() else {
        return Ok(None);
    };
    let rest = line[word.len()..].trim_start();
    let args: Vec<&str> = rest.split_whitespace().collect();
    // `""` stands for the empty key (an unbounded end of a scan).
    let token = |t: &str| if t == "\"\"" { String::new() } else { t.to_owned() };
    let usage = |u: &str| Err(format!("usage: {u}"));
    let input = match (word, args.as_slice()) {
        ("begin", []) => TxnInput::Begin(None),
        ("begin", [level]) => {
            TxnInput::Begin(Some(Level::parse(level).ok_or_else(|| format!("unknown isolation level {level}"))?))
        }
        ("begin", _) => return usage("begin [LEVEL]"),
        ("get", [key]) => TxnInput::Get(token(key)),
        ("get", _) => return usage("get KEY"),
        ("put", [key, _, ..]) => {
            let value = rest[key.len()..].trim_start();
            TxnInput::Put(token(key), value.to_owned())
        }
        ("put", _) => return usage("put KEY VALUE"),
        ("delete", [key]) => TxnInput::Delete(token(key)),
        ("delete", _) => return usage("delete KEY"),
        ("scan", []) => TxnInput::Scan(String::new(), String::new()),
        ("scan", [from]) => TxnInput::Scan(token(from), String::new()),
        ("scan", [from, to]) => TxnInput::Scan(token(from), token(to)),
        ("scan", _) => return usage("scan FROM TO"),
        ("commit", []) => TxnInput::Commit,
        ("commit", _) => return usage("commit"),
        ("abort", []) => TxnInput::Abort,
        ("abort", _) => return usage("abort"),
        (other, _) => return Err(format!("unknown command {other} (begin, get, put, delete, scan, commit, abort)")),
    };
    Ok(Some(input))
}

/// `skein txn --table NAME`: table transactions driven by stdin, one answer line per
/// command, printed (and flushed) as soon as it is done. At the end of input an open
/// transaction is aborted.
async fn txn_session(client: &Client, name: &str, isolation: Option<Level>, timeout: Duration) -> Result<()> {
    let table = open_table(client, name).await?;
    table.set_timeout(timeout);
    let (tx, lines) = flume::unbounded::<std::io::Result<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let stop = line.is_err();
            if tx.send(line).is_err() || stop {
                break;
            }
        }
    });
    let mut open: Option<TableTxn> = None;
    while let Ok(line) = lines.recv_async().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                abort_open(&mut open).await;
                bail!("reading stdin: {e}");
            }
        };
        let answers = match parse_txn_input(&line) {
            Ok(None) => continue,
            Ok(Some(input)) => txn_step(&table, &mut open, isolation, input).await,
            Err(message) => vec![format!("error {message}")],
        };
        for a in answers {
            answer(&a)?;
        }
    }
    abort_open(&mut open).await;
    Ok(())
}

async fn abort_open(open: &mut Option<TableTxn>) {
    if let Some(mut txn) = open.take().filter(TableTxn::is_open) {
        let _ = txn.abort().await;
    }
}

/// Runs one command of a `skein txn --table` session; its answer lines.
async fn txn_step(
    table: &Table,
    open: &mut Option<TableTxn>,
    isolation: Option<Level>,
    input: TxnInput,
) -> Vec<String> {
    let txn = match (&input, open.as_mut()) {
        (TxnInput::Begin(_), Some(_)) => return vec!["error a transaction is open".into()],
        (TxnInput::Begin(level), None) => {
            *open = Some(table.begin(level.or(isolation)));
            return vec!["ok".into()];
        }
        (_, None) => return vec!["error no transaction (begin first)".into()],
        (_, Some(txn)) => txn,
    };
    let result: Result<Vec<String>, TableError> = match input {
        TxnInput::Get(key) => txn.get(key.as_bytes()).await.map(|v| vec![value_line(key.as_bytes(), v.as_deref())]),
        TxnInput::Put(key, value) => txn.put(key.as_bytes(), value.as_bytes()).await.map(|()| vec!["ok".into()]),
        TxnInput::Delete(key) => txn.delete(key.as_bytes()).await.map(|()| vec!["ok".into()]),
        TxnInput::Scan(from, to) => txn.scan(from.as_bytes(), to.as_bytes()).await.map(|rows| scan_lines(&rows)),
        TxnInput::Commit => txn.commit().await.map(|c| vec![format!("committed {}", c.offset)]),
        TxnInput::Abort => txn.abort().await.map(|()| vec!["aborted user".into()]),
        TxnInput::Begin(_) => Ok(vec![]),
    };
    let lines = match result {
        Ok(lines) => lines,
        Err(TableError::Aborted(reason)) => vec![format!("aborted {reason}")],
        Err(TableError::Client(e)) => vec![format!("error {}", failure(&e))],
        Err(e) => vec![format!("error {e}")],
    };
    if !txn.is_open() {
        *open = None;
    }
    lines
}

/// `txn describe --json`: partitions sorted by topic, then partition.
fn transaction_json(d: &DescribeTransactionResponse) -> serde_json::Value {
    let mut partitions: Vec<(&str, u32)> = d.partitions.iter().map(|p| (p.topic.as_str(), p.partition)).collect();
    partitions.sort();
    let partitions: Vec<serde_json::Value> = partitions
        .iter()
        .map(|(topic, partition)| serde_json::json!({"topic": topic, "partition": partition}))
        .collect();
    serde_json::json!({"transactional_id": d.transactional_id, "producer_id": d.producer_id,
        "producer_epoch": d.producer_epoch, "state": d.state, "timeout_ms": d.timeout_ms, "age_ms": d.age_ms,
        "partitions": partitions})
}

fn print_transaction(d: &DescribeTransactionResponse) {
    println!(
        "transaction {} producer {} epoch {} state {} timeout {} ms age {} ms",
        d.transactional_id, d.producer_id, d.producer_epoch, d.state, d.timeout_ms, d.age_ms
    );
    let mut parts: Vec<(&str, u32)> = d.partitions.iter().map(|p| (p.topic.as_str(), p.partition)).collect();
    parts.sort();
    let rows: Vec<Vec<String>> = parts.iter().map(|(t, p)| vec![(*t).to_owned(), p.to_string()]).collect();
    println!();
    print_table(&["TOPIC", "PARTITION"], &rows);
}

/// A transaction admin command's failure in a user's terms, ending with the code's name.
fn txn_admin_error(id: &str, e: ClientError) -> anyhow::Error {
    match &e {
        ClientError::Broker(ErrorCode::TRANSACTIONAL_ID_NOT_FOUND, _) => {
            anyhow!("transactional id '{}' not found (TRANSACTIONAL_ID_NOT_FOUND)", skein_client::wire::shown(id))
        }
        _ => anyhow!("{}", failure(&e)),
    }
}

/// The committed offsets of a described group with their log ends (ListOffsets latest per
/// partition; unknown where that fails, e.g. a deleted topic).
async fn group_lags(client: &Client, d: &DescribeGroupResponse) -> Vec<OffsetLag> {
    let mut ends = std::collections::BTreeMap::new();
    for o in d.offsets.iter().filter(|o| o.offset >= 0) {
        match client.list_offset(&o.topic, o.partition, skein_client::wire::LATEST).await {
            Ok(end) => {
                ends.insert((o.topic.clone(), o.partition), end);
            }
            Err(e) => eprintln!("skein: log end of {}/{} unknown: {}", o.topic, o.partition, failure(&e)),
        }
    }
    skein_client::offset_lags(&d.offsets, |t, p| ends.get(&(t.to_owned(), p)).copied())
}

/// `group describe --json`: members sorted by id, assignments by topic and partition.
fn group_json(d: &DescribeGroupResponse, lags: &[OffsetLag]) -> serde_json::Value {
    let mut members: Vec<&skein_client::wire::GroupMemberDescription> = d.members.iter().collect();
    members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    let members: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            let mut assignment: Vec<(&str, u32)> =
                m.assignment.iter().map(|p| (p.topic.as_str(), p.partition)).collect();
            assignment.sort();
            let assignment: Vec<serde_json::Value> = assignment
                .iter()
                .map(|(topic, partition)| serde_json::json!({"topic": topic, "partition": partition}))
                .collect();
            serde_json::json!({"member_id": m.member_id, "instance_id": m.instance_id, "client_id": m.client_id,
                "host": m.host, "assignment": assignment})
        })
        .collect();
    let offsets: Vec<serde_json::Value> = lags
        .iter()
        .map(|l| {
            serde_json::json!({"topic": l.topic, "partition": l.partition, "committed": l.committed,
                "log_end": l.log_end, "lag": l.lag})
        })
        .collect();
    serde_json::json!({"group": d.group, "state": d.state, "generation": d.generation, "protocol": d.protocol,
        "members": members, "offsets": offsets})
}

fn print_group(d: &DescribeGroupResponse, lags: &[OffsetLag]) {
    println!(
        "group {} state {} generation {} protocol {} members {}",
        d.group,
        d.state,
        d.generation,
        d.protocol,
        d.members.len()
    );
    println!();
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let rows: Vec<Vec<String>> = lags
        .iter()
        .map(|l| vec![l.topic.clone(), l.partition.to_string(), l.committed.to_string(), opt(l.log_end), opt(l.lag)])
        .collect();
    print_table(&["TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG"], &rows);
    println!();
    let mut members: Vec<&skein_client::wire::GroupMemberDescription> = d.members.iter().collect();
    members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    let or_dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let mut parts: Vec<(&str, u32)> = m.assignment.iter().map(|p| (p.topic.as_str(), p.partition)).collect();
            parts.sort();
            let parts: Vec<String> = parts.iter().map(|(t, p)| format!("{t}/{p}")).collect();
            vec![
                m.member_id.clone(),
                or_dash(&m.instance_id),
                or_dash(&m.client_id),
                or_dash(&m.host),
                m.member_epoch.to_string(),
                if parts.is_empty() { "-".to_owned() } else { parts.join(",") },
            ]
        })
        .collect();
    print_table(&["MEMBER-ID", "INSTANCE-ID", "CLIENT-ID", "HOST", "EPOCH", "ASSIGNMENT"], &rows);
}

/// Prints a header and rows as left-aligned columns two spaces apart.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", table(header, rows));
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A group command's failure in a user's terms, ending with the code's name.
fn group_error(group: &str, e: ClientError) -> anyhow::Error {
    let shown = skein_client::wire::shown(group);
    match &e {
        ClientError::Broker(ErrorCode::GROUP_ID_NOT_FOUND, _) => {
            anyhow!("group '{shown}' not found (GROUP_ID_NOT_FOUND)")
        }
        ClientError::Broker(ErrorCode::GROUP_NOT_EMPTY, _) => {
            anyhow!("group '{shown}' has active members: stop its consumers first (GROUP_NOT_EMPTY)")
        }
        _ => anyhow!("{}", failure(&e)),
    }
}

/// A client error as one line ending with its code name: a broker's answer as its context and
/// message, anything else in the client's words.
fn failure(e: &ClientError) -> String {
    match e {
        ClientError::Broker(code, what) if !what.is_empty() => format!("{what} ({})", code.name()),
        e => format!("{e} ({})", e.code_name()),
    }
}

/// A parsed `--format`.
#[derive(Clone)]
struct Format(Vec<Piece>);

#[derive(Clone)]
enum Piece {
    Text(Vec<u8>),
    Partition,
    Offset,
    Key,
    Value,
    Timestamp,
}

impl Format {
    /// Parses a `--format`; an unknown `%` directive or `\\` escape is a usage error.
    fn parse(s: &str) -> Result<Format, String> {
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
                    Some('%') => {
                        text.push(b'%');
                        continue;
                    }
                    Some(other) => {
                        return Err(format!("unknown directive '%{other}' (known: %p %o %k %v %t %%)"));
                    }
                    None => return Err("a lone '%' at the end (write %% for a percent sign)".into()),
                },
                _ => {
                    match chars.next() {
                        Some('t') => text.push(b'\t'),
                        Some('n') => text.push(b'\n'),
                        Some('r') => text.push(b'\r'),
                        Some('0') => text.push(0),
                        Some('\\') => text.push(b'\\'),
                        Some(other) => {
                            return Err(format!("unknown escape '\\{other}' (known: \\t \\n \\r \\0 \\\\)"));
                        }
                        None => return Err("a lone '\\' at the end (write \\\\ for a backslash)".into()),
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
        Ok(Format(pieces))
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
/// Lines of stdin handed to the transactional producer at once (at most).
const STDIN_CHUNK_LINES: usize = 1024;
/// Chunks of stdin read ahead of the transactional producer.
const STDIN_CHUNKS_QUEUED: usize = 8;
/// Least time between two retry lines of one partition.
const RETRY_REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use skein_client::wire::{GroupMemberDescription, TopicPartition};

    use super::*;

    #[test]
    fn group_json_has_members_and_lags() {
        let tp = |topic: &str, partition| TopicPartition { topic: topic.into(), partition };
        let member = |id: &str, instance: &str, assignment| GroupMemberDescription {
            member_id: id.into(),
            instance_id: instance.into(),
            client_id: "c".into(),
            host: "h".into(),
            member_epoch: 3,
            assignment,
        };
        let d = DescribeGroupResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            group: "g".into(),
            state: "Stable".into(),
            generation: 3,
            protocol: "sticky".into(),
            members: vec![member("m2", "", vec![tp("t", 1), tp("t", 0)]), member("m1", "i1", vec![])],
            offsets: vec![],
        };
        let lags = vec![
            OffsetLag { topic: "t".into(), partition: 0, committed: 4, log_end: Some(10), lag: Some(6) },
            OffsetLag { topic: "t".into(), partition: 1, committed: 2, log_end: None, lag: None },
        ];
        let want = serde_json::json!({"group": "g", "state": "Stable", "generation": 3, "protocol": "sticky",
        "members": [
            {"member_id": "m1", "instance_id": "i1", "client_id": "c", "host": "h", "assignment": []},
            {"member_id": "m2", "instance_id": "", "client_id": "c", "host": "h",
             "assignment": [{"topic": "t", "partition": 0}, {"topic": "t", "partition": 1}]},
        ],
        "offsets": [
            {"topic": "t", "partition": 0, "committed": 4, "log_end": 10, "lag": 6},
            {"topic": "t", "partition": 1, "committed": 2, "log_end": null, "lag": null},
        ]});
        assert_eq!(group_json(&d, &lags), want);
    }

    #[test]
    fn transaction_json_has_the_documented_keys() {
        let tp = |topic: &str, partition| TopicPartition { topic: topic.into(), partition };
        let d = DescribeTransactionResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            transactional_id: "tx".into(),
            producer_id: 1 << 40,
            producer_epoch: 3,
            state: "ongoing".into(),
            timeout_ms: 60_000,
            age_ms: 12,
            partitions: vec![tp("t", 1), tp("s", 4), tp("t", 0)],
        };
        let want = serde_json::json!({"transactional_id": "tx", "producer_id": 1_i64 << 40, "producer_epoch": 3,
            "state": "ongoing", "timeout_ms": 60_000, "age_ms": 12,
            "partitions": [{"topic": "s", "partition": 4}, {"topic": "t", "partition": 0}, {"topic": "t", "partition": 1}]});
        assert_eq!(transaction_json(&d), want);
        let e = ClientError::Broker(ErrorCode::TRANSACTIONAL_ID_NOT_FOUND, "transactional id 'tx'".into());
        assert_eq!(
            txn_admin_error("tx", e).to_string(),
            "transactional id 'tx' not found (TRANSACTIONAL_ID_NOT_FOUND)"
        );
    }

    #[test]
    fn txn_input_lines_parse() {
        let p = parse_txn_input;
        assert_eq!(p("   "), Ok(None));
        assert_eq!(p("begin"), Ok(Some(TxnInput::Begin(None))));
        assert_eq!(p(" begin  2pl "), Ok(Some(TxnInput::Begin(Some(Level::TwoPl)))));
        assert_eq!(p("begin chaos"), Err("unknown isolation level chaos".into()));
        assert_eq!(p("get k"), Ok(Some(TxnInput::Get("k".into()))));
        assert_eq!(p("get"), Err("usage: get KEY".into()));
        assert_eq!(p("get a b"), Err("usage: get KEY".into()));
        assert_eq!(p("put k  hello  world\r"), Ok(Some(TxnInput::Put("k".into(), "hello  world".into()))));
        assert_eq!(p("put k"), Err("usage: put KEY VALUE".into()));
        assert_eq!(p("delete k"), Ok(Some(TxnInput::Delete("k".into()))));
        assert_eq!(p("scan a b"), Ok(Some(TxnInput::Scan("a".into(), "b".into()))));
        assert_eq!(p("scan a"), Ok(Some(TxnInput::Scan("a".into(), String::new()))));
        assert_eq!(p("scan \"\" m"), Ok(Some(TxnInput::Scan(String::new(), "m".into()))));
        assert_eq!(p("commit"), Ok(Some(TxnInput::Commit)));
        assert_eq!(p("abort now"), Err("usage: abort".into()));
        assert!(p("select *").is_err_and(|e| e.starts_with("unknown command select")));
        assert_eq!(value_line(b"k", None), "value k nil");
        assert_eq!(value_line(b"k", Some(b"v w")), "value k v w");
        assert_eq!(scan_lines(&[(b"a".to_vec(), b"1".to_vec())]), vec!["row a 1".to_owned(), "end".into()]);
    }

    #[test]
    fn table_arguments_parse() {
        let cli = Cli::try_parse_from(["skein", "table", "create", "t", "--partitions", "3", "--isolation", "ssi"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Table {
                command: TableCommand::Create { partitions: 3, replicas: 1, isolation: Some(Level::Ssi), .. }
            }
        ));
        let cli = Cli::try_parse_from(["skein", "table", "put", "t", "k", "-5"]).expect("hyphen values");
        assert!(matches!(cli.command, Command::Table { command: TableCommand::Put { value, .. } } if value == "-5"));
        let cli = Cli::try_parse_from(["skein", "txn", "--table", "t", "--timeout-ms", "500"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Txn { command: None, table: Some(_), isolation: None, timeout_ms: 500 }
        ));
        let cli = Cli::try_parse_from(["skein", "txn", "list"]).expect("parses");
        assert!(matches!(cli.command, Command::Txn { command: Some(TxnCommand::List { .. }), table: None, .. }));
        for bad in [
            &["skein", "txn", "--table", "t", "abort", "x"][..],
            &["skein", "table", "create", "t", "--isolation", "x"],
        ] {
            let e = Cli::try_parse_from(bad).err().expect("refused");
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![vec!["orders".to_owned(), "Stable".to_owned(), "2".to_owned()]];
        assert_eq!(table(&["GROUP", "STATE", "MEMBERS"], &rows), "GROUP   STATE   MEMBERS\norders  Stable  2\n");
        assert_eq!(table(&["GROUP", "STATE", "MEMBERS"], &[]), "GROUP  STATE  MEMBERS\n");
    }

    #[test]
    fn failures_end_with_the_code_name() {
        let e = ClientError::Broker(ErrorCode::GROUP_ID_NOT_FOUND, "group 'g'".into());
        assert_eq!(group_error("g", e).to_string(), "group 'g' not found (GROUP_ID_NOT_FOUND)");
        let e = ClientError::Broker(ErrorCode::INVALID_GROUP_ID, "group '': empty".into());
        assert_eq!(group_error("", e).to_string(), "group '': empty (INVALID_GROUP_ID)");
        assert_eq!(failure(&ClientError::ConnectionLost), "connection lost (CONNECTION_LOST)");
    }
}
