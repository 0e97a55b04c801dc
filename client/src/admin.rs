//! The admin and metadata client, and the shared connection handling for producers and
//! consumers: it reconnects (trying each bootstrap broker) when the connection breaks.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::conn::{broker_error, Connection};
use crate::wire::{
    ApiKey, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeTopicsRequest, DescribeTopicsResponse, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsPartition,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, NewTopic, TopicConfig,
    TopicDescription,
};
use crate::ClientError;

/// Connection settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Bootstrap brokers, `HOST:PORT[,HOST:PORT...]`.
    pub brokers: String,
    /// Name sent with every request.
    pub client_id: String,
    /// Bound on every request (a broker that does not answer is treated as gone).
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "skein-client".into(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A handle to the cluster; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

struct Inner {
    config: ClientConfig,
    conn: RefCell<Option<Rc<Connection>>>,
}

impl Client {
    /// Connects to the first reachable broker of `brokers` with default settings.
    pub async fn connect(brokers: &str) -> Result<Client, ClientError> {
        Client::with_config(ClientConfig { brokers: brokers.into(), ..ClientConfig::default() }).await
    }

    /// Connects with explicit settings.
    pub async fn with_config(config: ClientConfig) -> Result<Client, ClientError> {
        let client = Client { inner: Rc::new(Inner { config, conn: RefCell::new(None) }) };
        client.connection().await?;
        Ok(client)
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The live connection, reconnecting if it broke.
    pub async fn connection(&self) -> Result<Rc<Connection>, ClientError> {
        if let Some(c) = self.inner.conn.borrow().as_ref().filter(|c| !c.is_broken()) {
            return Ok(c.clone());
        }
        let mut last = ClientError::Invalid("no brokers given".into());
        for addr in self.inner.config.brokers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match Connection::connect(addr, &self.inner.config.client_id, self.inner.config.request_timeout).await {
                Ok(c) => {
                    let c = Rc::new(c);
                    *self.inner.conn.borrow_mut() = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Creates a topic; `configs` are `(key, value)` pairs (see PROTOCOL.md).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replicas: u16,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        let configs = configs.iter().map(|(k, v)| TopicConfig { key: k.clone(), value: v.clone() }).collect();
        let req = CreateTopicsRequest { topics: vec![NewTopic { name: name.into(), partitions, replicas, configs }] };
        let resp: CreateTopicsResponse = self.connection().await?.call(ApiKey::CreateTopics, &req).await?;
        let r = resp.results.first().ok_or_else(|| ClientError::Protocol("empty CreateTopics response".into()))?;
        broker_error(r.error, format!("creating topic '{name}'{}", detail(&r.message)))
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let req = DeleteTopicsRequest { names: vec![name.into()] };
        let resp: DeleteTopicsResponse = self.connection().await?.call(ApiKey::DeleteTopics, &req).await?;
        let r = resp.results.first().ok_or_else(|| ClientError::Protocol("empty DeleteTopics response".into()))?;
        broker_error(r.error, format!("deleting topic '{name}'{}", detail(&r.message)))
    }

    /// Brokers, controller and topics (`None`: all topics).
    pub async fn metadata(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse, ClientError> {
        self.connection().await?.call(ApiKey::Metadata, &MetadataRequest { topics }).await
    }

    /// A new idempotent producer identity: (producer id, epoch).
    pub async fn init_producer_id(&self) -> Result<(i64, i16), ClientError> {
        let req = InitProducerIdRequest { transactional_id: None };
        let resp: InitProducerIdResponse = self.connection().await?.call(ApiKey::InitProducerId, &req).await?;
        broker_error(resp.error, "init producer id".to_string())?;
        Ok((resp.producer_id, resp.producer_epoch))
    }

    /// Names of all topics.
    pub async fn list_topics(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.metadata(None).await?.topics.into_iter().map(|t| t.name).collect())
    }

    /// Number of partitions of a topic.
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        let md = self.metadata(Some(vec![topic.into()])).await?;
        let t = md.topics.into_iter().next().ok_or_else(|| ClientError::Protocol("empty Metadata response".into()))?;
        broker_error(t.error, format!("topic '{topic}'"))?;
        Ok(t.partitions.len() as u32)
    }

    /// Per-partition leaders and offsets of a topic.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription, ClientError> {
        let req = DescribeTopicsRequest { names: vec![name.into()] };
        let resp: DescribeTopicsResponse = self.connection().await?.call(ApiKey::DescribeTopics, &req).await?;
        let t = resp
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("empty DescribeTopics response".into()))?;
        broker_error(t.error, format!("topic '{name}'"))?;
        Ok(t)
    }

    /// An offset of a partition: `wire::EARLIEST`, `wire::LATEST`, or the first offset with a
    /// timestamp at or after `timestamp` (the log end if none).
    pub async fn list_offset(&self, topic: &str, partition: u32, timestamp: i64) -> Result<u64, ClientError> {
        let req =
            ListOffsetsRequest { partitions: vec![ListOffsetsPartition { topic: topic.into(), partition, timestamp }] };
        let resp: ListOffsetsResponse = self.connection().await?.call(ApiKey::ListOffsets, &req).await?;
        let p = resp.partitions.first().ok_or_else(|| ClientError::Protocol("empty ListOffsets response".into()))?;
        broker_error(p.error, format!("{topic}/{partition}"))?;
        Ok(p.offset)
    }
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
