//! Produces `COUNT` keyed records to `TOPIC` (created if missing) and prints where they went.
//!
//! `cargo run -p skein-client --example producer -- [BROKERS] [TOPIC] [COUNT]`

use skein_client::{Acks, Client, ClientError, Producer, ProducerConfig};

fn main() -> Result<(), ClientError> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:9092".into());
    let topic = args.get(2).cloned().unwrap_or_else(|| "example".into());
    let count: u32 = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(10);
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&brokers).await?;
        match client.create_topic(&topic, 3, 1, &[]).await {
            Ok(()) | Err(ClientError::Broker(skein_client::wire::ErrorCode::TOPIC_ALREADY_EXISTS, _)) => {}
            Err(e) => return Err(e),
        }
        let producer = Producer::new(client, ProducerConfig { acks: Acks::All, ..ProducerConfig::default() });
        let mut deliveries = Vec::new();
        for i in 0..count {
            let key = format!("user-{}", i % 3);
            deliveries.push(producer.send(&topic, Some(key.as_bytes()), format!("event {i}").as_bytes()).await?);
        }
        producer.flush().await;
        for (i, d) in deliveries.into_iter().enumerate() {
            let (partition, offset) = d.await?;
            println!("record {i} -> partition {partition} offset {offset}");
        }
        Ok(())
    })
}
