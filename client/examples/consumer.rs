//! Reads every partition of `TOPIC` from the beginning and prints records until `COUNT` were
//! read or a second passes without new ones.
//!
//! `cargo run -p skein-client --example consumer -- [BROKERS] [TOPIC] [COUNT]`

use std::time::{Duration, Instant};

use skein_client::{Client, ClientError, Consumer, ConsumerConfig, Position};

fn main() -> Result<(), ClientError> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:9092".into());
    let topic = args.get(2).cloned().unwrap_or_else(|| "example".into());
    let count: usize = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(usize::MAX);
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&brokers).await?;
        let partitions: Vec<u32> = (0..client.partition_count(&topic).await?).collect();
        let config = ConsumerConfig { max_wait: Duration::from_millis(200), ..ConsumerConfig::default() };
        let mut consumer = Consumer::new(client, config);
        consumer.assign(&topic, &partitions, Position::Beginning).await?;
        let (mut seen, mut last) = (0, Instant::now());
        while seen < count && last.elapsed() < Duration::from_secs(1) {
            for r in consumer.poll().await? {
                let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
                println!("{}/{} {} {}", r.partition, r.offset, key, String::from_utf8_lossy(&r.value));
                seen += 1;
                last = Instant::now();
            }
        }
        Ok(())
    })
}
