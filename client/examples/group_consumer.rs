//! An at-least-once consumer in a group: records are processed (printed), then their offsets
//! committed, so a crash repeats at most what was processed since the last commit and never
//! skips a record. Stops after `COUNT` records or two seconds without new ones, commits and
//! leaves the group (its partitions go to the other members at once).
//!
//! `cargo run -p skein-client --example group_consumer -- [BROKERS] [TOPIC] [GROUP] [COUNT]`

use std::time::{Duration, Instant};

use skein_client::{Client, ClientError, ConsumerConfig, GroupConfig, GroupConsumer, Partition, RebalanceListener};

/// Logs what the group gives and takes.
struct Log;

impl RebalanceListener for Log {
    fn on_assigned(&mut self, partitions: &[Partition]) {
        eprintln!("assigned {partitions:?}");
    }

    fn on_revoked(&mut self, partitions: &[Partition]) {
        eprintln!("revoked {partitions:?} (their offsets were committed first)");
    }
}

fn main() -> Result<(), ClientError> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:9092".into());
    let topic = args.get(2).cloned().unwrap_or_else(|| "example".into());
    let group = args.get(3).cloned().unwrap_or_else(|| "example-group".into());
    let count: usize = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(usize::MAX);
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&brokers).await?;
        // Commits are explicit below: after processing, before the next poll.
        let config = GroupConfig { auto_commit: None, ..GroupConfig::new(&group) };
        let mut consumer = GroupConsumer::new(client, ConsumerConfig::default(), config);
        consumer.set_listener(Box::new(Log));
        consumer.subscribe(&[topic.as_str()]);
        let (mut seen, mut last) = (0, Instant::now());
        while seen < count && last.elapsed() < Duration::from_secs(2) {
            let records = consumer.poll().await?;
            for r in records.iter().take(count - seen) {
                println!("{}/{} {}", r.partition, r.offset, String::from_utf8_lossy(&r.value));
                consumer.set_consumed(&r.topic, r.partition, r.offset + 1)?;
                seen += 1;
                last = Instant::now();
            }
            if !records.is_empty() {
                consumer.commit_sync().await?;
            }
        }
        consumer.close().await
    })
}
