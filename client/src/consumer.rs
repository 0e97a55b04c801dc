//! The consumer: assigned partitions, pipelined long-polling fetches, records with offsets,
//! and seeking to the beginning, the end, an offset or a timestamp.
//!
//! After each response the next fetch is sent at once, before the records are handed back,
//! so the broker works on the next fetch while the application works on this one. A seek
//! drops the fetch in flight.

use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures_channel::oneshot;
use skein_log::batch::{BatchError, BatchHeader, RecordBatch, HEADER_BYTES};

use crate::conn::Connection;
use crate::wire::{ApiKey, ErrorCode, FetchPartition, FetchRequest, FetchResponse, EARLIEST, LATEST};
use crate::{Client, ClientError};

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// How long the broker may hold a fetch waiting for `min_bytes`.
    pub max_wait: Duration,
    /// Bytes the broker waits for before answering.
    pub min_bytes: u32,
    /// Bytes per fetch response (at least one batch is always returned).
    pub max_bytes: u32,
    /// Bytes per partition per fetch.
    pub partition_max_bytes: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 8 << 20,
            partition_max_bytes: 1 << 20,
        }
    }
}

/// Where to start reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// The log start.
    Beginning,
    /// The log end: only new records.
    End,
    /// This offset.
    Offset(u64),
    /// The first record with a timestamp (ms) at or after this.
    Timestamp(i64),
}

/// A record read from a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: Rc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp in ms since the Unix epoch.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// One fetched batch of a partition, read in place from the response.
#[derive(Debug)]
pub struct FetchedBatch {
    /// Topic.
    pub topic: Rc<str>,
    /// Partition.
    pub partition: u32,
    /// Records below this offset were delivered before; skip them.
    pub from_offset: u64,
    /// The batch, fully checked.
    pub batch: RecordBatch<BytesMut>,
}

type Pending = (Vec<u64>, Rc<Connection>, oneshot::Receiver<Result<BytesMut, ClientError>>);

/// Reads assigned partitions.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    /// (topic, partition, next offset to read).
    assigned: Vec<(Rc<str>, u32, u64)>,
    in_flight: Option<Pending>,
}

impl Consumer {
    /// A consumer with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer { client, config, assigned: Vec::new(), in_flight: None }
    }

    /// Adds partitions of a topic, each starting at `from`.
    pub async fn assign(&mut self, topic: &str, partitions: &[u32], from: Position) -> Result<(), ClientError> {
        for &p in partitions {
            let offset = self.resolve(topic, p, from).await?;
            match self.assigned.iter_mut().find(|(t, q, _)| &**t == topic && *q == p) {
                Some(entry) => entry.2 = offset,
                None => self.assigned.push((Rc::from(topic), p, offset)),
            }
        }
        self.in_flight = None;
        Ok(())
    }

    /// Moves an assigned partition to `to`.
    pub async fn seek(&mut self, topic: &str, partition: u32, to: Position) -> Result<(), ClientError> {
        if !self.assigned.iter().any(|(t, p, _)| &**t == topic && *p == partition) {
            return Err(ClientError::Invalid(format!("{topic}/{partition} is not assigned")));
        }
        self.assign(topic, &[partition], to).await
    }

    /// The next offset to be read from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.assigned.iter().find(|(t, p, _)| &**t == topic && *p == partition).map(|e| e.2)
    }

    /// The next records (possibly none, after `max_wait` without new data).
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        let fetched = self.poll_batches().await?;
        let mut out = Vec::new();
        for f in &fetched {
            let h = *f.batch.header();
            for r in f.batch.records().iter() {
                let offset = h.base_offset.get() + u64::from(r.offset_delta.to_native());
                if offset < f.from_offset {
                    continue;
                }
                out.push(ConsumerRecord {
                    topic: f.topic.clone(),
                    partition: f.partition,
                    offset,
                    timestamp: h.first_timestamp.0.wrapping_add(r.timestamp_delta.to_native()),
                    key: r.key.as_ref().map(|k| k.as_slice().to_vec()),
                    value: r.value.as_slice().to_vec(),
                    headers: r
                        .headers
                        .iter()
                        .map(|x| (x.key.as_str().to_owned(), x.value.as_slice().to_vec()))
                        .collect(),
                });
            }
        }
        Ok(out)
    }

    /// The next batches, checked (framing, CRC, archive) and read in place: no record is
    /// copied. Records below `from_offset` in a batch were already delivered (or asked to be
    /// skipped) and should be ignored.
    pub async fn poll_batches(&mut self) -> Result<Vec<FetchedBatch>, ClientError> {
        if self.assigned.is_empty() {
            return Err(ClientError::Invalid("no partitions assigned".into()));
        }
        let positions: Vec<u64> = self.assigned.iter().map(|e| e.2).collect();
        let pending = match self.in_flight.take() {
            Some(p) if p.0 == positions && !p.1.is_broken() => p,
            _ => self.send_fetch().await?,
        };
        let resp: FetchResponse = match pending.1.wait(ApiKey::Fetch, pending.2).await {
            Ok(r) => r,
            Err(e @ (ClientError::ConnectionLost | ClientError::Timeout(_))) => {
                tracing::debug!(error = %e, "fetch failed; retrying on a fresh connection");
                let retry = self.send_fetch().await?;
                retry.1.wait(ApiKey::Fetch, retry.2).await?
            }
            Err(e) => return Err(e),
        };
        let fetched = self.take_batches(resp)?;
        self.in_flight = Some(self.send_fetch().await?);
        Ok(fetched)
    }

    async fn send_fetch(&self) -> Result<Pending, ClientError> {
        let conn = self.client.connection().await?;
        let req = FetchRequest {
            max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: self.config.min_bytes,
            max_bytes: self.config.max_bytes,
            isolation: 0,
            partitions: self
                .assigned
                .iter()
                .map(|(t, p, o)| FetchPartition {
                    topic: t.to_string(),
                    partition: *p,
                    fetch_offset: *o,
                    partition_max_bytes: self.config.partition_max_bytes,
                })
                .collect(),
        };
        let rx = conn.send(ApiKey::Fetch, &req).await?;
        Ok((self.assigned.iter().map(|e| e.2).collect(), conn, rx))
    }

    fn take_batches(&mut self, resp: FetchResponse) -> Result<Vec<FetchedBatch>, ClientError> {
        let mut out = Vec::new();
        for part in resp.partitions {
            let Some(entry) = self.assigned.iter_mut().find(|(t, p, _)| **t == *part.topic && *p == part.partition)
            else {
                continue;
            };
            match part.error {
                ErrorCode::NONE => {}
                code if code.is_retriable() => continue,
                code => {
                    return Err(ClientError::Broker(
                        code,
                        format!("fetch {}/{} at {}", part.topic, part.partition, entry.2),
                    ))
                }
            }
            let corrupt = |e: BatchError| ClientError::Protocol(format!("{}/{}: {e}", part.topic, part.partition));
            let mut records = part.records;
            while !records.is_empty() {
                let header = BatchHeader::decode(&records[..records.len().min(HEADER_BYTES)]).map_err(corrupt)?;
                let len = header.batch_length as usize;
                if len > records.len() {
                    return Err(corrupt(BatchError::Truncated { needed: len as u64, available: records.len() as u64 }));
                }
                let batch = RecordBatch::parse(records.split_to(len)).map_err(corrupt)?;
                let from_offset = entry.2;
                entry.2 = entry.2.max(batch.header().next_offset().get());
                out.push(FetchedBatch { topic: entry.0.clone(), partition: entry.1, from_offset, batch });
            }
        }
        Ok(out)
    }

    async fn resolve(&self, topic: &str, partition: u32, from: Position) -> Result<u64, ClientError> {
        match from {
            Position::Offset(o) => Ok(o),
            Position::Beginning => self.client.list_offset(topic, partition, EARLIEST).await,
            Position::End => self.client.list_offset(topic, partition, LATEST).await,
            Position::Timestamp(ts) => self.client.list_offset(topic, partition, ts).await,
        }
    }
}
