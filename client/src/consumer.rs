//! The consumer: assigned partitions, pipelined long-polling fetches, records with offsets,
//! and seeking to the beginning, the end, an offset or a timestamp.
//!
//! Each partition is fetched from its leader (the client's metadata cache): partitions with
//! different leaders go in separate Fetch requests, in flight at the same time, each on a
//! connection of this consumer's own (a long poll holds back every later response on its
//! connection, so it shares none with producers or other consumers). `poll` waits for the
//! first answer (or the end of the long poll), takes every answer already there, and merges
//! their records.
//!
//! After each answer the next fetch to that leader is sent at once, before the records are
//! handed back, so the broker works on the next fetch while the application works on this
//! one. A seek drops the fetches in flight.
//!
//! Failover: a partition answered with NOT_LEADER, FENCED_LEADER_EPOCH or
//! UNKNOWN_TOPIC_OR_PARTITION, or whose fetch failed (lost connection, IO error, or no answer
//! within `max_wait + response_timeout`, which also drops the connection), has its topic's
//! metadata marked stale and is fetched again, from the leader a refresh finds, on the next
//! poll. `poll` does not fail for these; only errors retrying cannot fix (OFFSET_OUT_OF_RANGE,
//! STORAGE_ERROR, damaged batches) are returned.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_channel::oneshot;
use skein_log::batch::{BatchError, BatchHeader, RecordBatch, HEADER_BYTES};

use crate::conn::{decode_body, Connection};
use crate::wire::{ApiKey, ErrorCode, FetchPartition, FetchRequest, FetchResponse, EARLIEST, LATEST};
use crate::{group_by_leader, Client, ClientError};

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
    /// A fetch not answered within `max_wait` plus this is treated as lost: its connection
    /// is dropped, the metadata refreshed, and its partitions fetched again on the next poll.
    pub response_timeout: Duration,
    /// How long `poll` pauses before returning nothing when every fetch failed (no leader,
    /// unreachable brokers), so a caller polling in a loop does not spin.
    pub retry_backoff: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 8 << 20,
            partition_max_bytes: 1 << 20,
            response_timeout: Duration::from_millis(1_500),
            retry_backoff: Duration::from_millis(50),
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

type Body = Result<BytesMut, ClientError>;

/// A Fetch request awaiting its answer.
struct InFlight {
    node: u32,
    conn: Rc<Connection>,
    /// (topic, partition, fetch offset), as asked.
    parts: Vec<(Rc<str>, u32, u64)>,
    rx: oneshot::Receiver<Body>,
    deadline: Instant,
}

/// Reads assigned partitions.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    /// (topic, partition, next offset to read).
    assigned: Vec<(Rc<str>, u32, u64)>,
    /// At most one fetch per partition.
    in_flight: Vec<InFlight>,
    /// This consumer's connections, by broker node id.
    conns: HashMap<u32, Rc<Connection>>,
    /// An error found while other partitions returned records: returned by the next poll.
    deferred: Option<ClientError>,
}

impl Consumer {
    /// A consumer with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer { client, config, assigned: Vec::new(), in_flight: Vec::new(), conns: HashMap::new(), deferred: None }
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
        self.in_flight.clear();
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
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        self.send_fetches().await;
        if self.in_flight.is_empty() {
            // Nothing could be sent (no leader known, brokers unreachable): next poll.
            compio::time::sleep(self.config.retry_backoff).await;
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut error = None;
        let mut failed = false;
        for (f, body) in self.wait_any().await {
            match body.and_then(|b| decode_body::<FetchResponse>(ApiKey::Fetch, b)) {
                Ok(resp) => {
                    if let Err(e) = self.take_batches(&f, resp, &mut out) {
                        error.get_or_insert(e);
                    }
                }
                Err(e) if e.is_retriable() => {
                    failed = true;
                    self.lost(&f, &e);
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            Some(e) if out.is_empty() => return Err(e),
            Some(e) => self.deferred = Some(e),
            None => {}
        }
        // Pipelining: the next fetches go out before the records are handed back.
        self.send_fetches().await;
        if out.is_empty() && failed {
            compio::time::sleep(self.config.retry_backoff).await;
        }
        Ok(out)
    }

    /// Sends a fetch to each leader for the assigned partitions that have none in flight,
    /// refreshing metadata first if a leader is unknown. Failures only mark metadata stale:
    /// those partitions are tried again on the next poll.
    async fn send_fetches(&mut self) {
        let todo: Vec<(Rc<str>, u32, u64)> = self
            .assigned
            .iter()
            .filter(|(t, p, _)| !self.in_flight.iter().any(|f| f.parts.iter().any(|(ft, fp, _)| ft == t && fp == p)))
            .cloned()
            .collect();
        if todo.is_empty() {
            return;
        }
        let unknown: Vec<&Rc<str>> =
            todo.iter().filter(|(t, p, _)| self.client.cached_leader(t, *p).is_none()).map(|(t, _, _)| t).collect();
        if !unknown.is_empty() {
            // Invalidating also makes the refresh ask for topics not looked up before.
            unknown.iter().for_each(|t| self.client.invalidate_metadata(t));
            if let Err(e) = self.client.refresh_metadata().await {
                tracing::debug!(error = %e, "metadata refresh for fetching failed");
            }
        }
        let grouped = group_by_leader(todo, |(t, p, _)| self.client.cached_leader(t, *p));
        for (t, p, _) in &grouped.unrouted {
            tracing::debug!(topic = %t, partition = p, "no leader to fetch from");
            self.client.invalidate_metadata(t);
        }
        for (node, parts) in grouped.by_leader {
            match self.send_fetch(node, &parts).await {
                Ok(f) => self.in_flight.push(f),
                Err(e) => {
                    tracing::debug!(node, error = %e, "sending a fetch failed");
                    parts.iter().for_each(|(t, _, _)| self.client.invalidate_metadata(t));
                }
            }
        }
    }

    async fn send_fetch(&mut self, node: u32, parts: &[(Rc<str>, u32, u64)]) -> Result<InFlight, ClientError> {
        let conn = match self.conns.get(&node).filter(|c| !c.is_broken()) {
            Some(c) => c.clone(),
            None => {
                let c = Rc::new(self.client.connect_node(node).await?);
                self.conns.insert(node, c.clone());
                c
            }
        };
        let req = FetchRequest {
            max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: self.config.min_bytes,
            max_bytes: self.config.max_bytes,
            isolation: 0,
            replica_read: false,
            partitions: parts
                .iter()
                .map(|(t, p, o)| FetchPartition {
                    topic: t.to_string(),
                    partition: *p,
                    leader_epoch: self.client.cached_leader_epoch(t, *p),
                    fetch_offset: *o,
                    partition_max_bytes: self.config.partition_max_bytes,
                    min_high_watermark: 0,
                    min_leader_epoch: 0,
                })
                .collect(),
        };
        let rx = conn.send(ApiKey::Fetch, &req).await?;
        let deadline = Instant::now() + self.config.max_wait + self.config.response_timeout;
        Ok(InFlight { node, conn, parts: parts.to_vec(), rx, deadline })
    }

    /// Waits until at least one fetch is answered or the earliest deadline passes; returns
    /// every fetch answered by then, and those past their deadline as timed out (their
    /// connections dropped: everything behind them on it would wait as long).
    async fn wait_any(&mut self) -> Vec<(InFlight, Body)> {
        let deadline = self.in_flight.iter().map(|f| f.deadline).min().expect("called with fetches in flight");
        let in_flight = &mut self.in_flight;
        let ready = std::future::poll_fn(|cx| {
            let done: Vec<(usize, Body)> = in_flight
                .iter_mut()
                .enumerate()
                .filter_map(|(i, f)| match Pin::new(&mut f.rx).poll(cx) {
                    Poll::Ready(body) => Some((i, body.unwrap_or(Err(ClientError::ConnectionLost)))),
                    Poll::Pending => None,
                })
                .collect();
            if done.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(done)
            }
        });
        let done = match compio::time::timeout(deadline.saturating_duration_since(Instant::now()), ready).await {
            Ok(done) => done,
            Err(_) => {
                let now = Instant::now();
                let late: Vec<usize> =
                    (0..self.in_flight.len()).filter(|&i| self.in_flight[i].deadline <= now).collect();
                late.into_iter().map(|i| (i, Err(ClientError::Timeout("fetch: no answer in time".into())))).collect()
            }
        };
        // Remove from the back so the indices stay valid.
        let mut out = Vec::with_capacity(done.len());
        for (i, body) in done.into_iter().rev() {
            let f = self.in_flight.remove(i);
            if matches!(body, Err(ClientError::Timeout(_))) {
                f.conn.mark_broken();
            }
            out.push((f, body));
        }
        out.reverse();
        out
    }

    /// A fetch that failed as a whole: its partitions are fetched again on the next poll.
    fn lost(&mut self, f: &InFlight, e: &ClientError) {
        tracing::debug!(node = f.node, error = %e, "fetch failed; retrying on the next poll");
        if e.refreshes_metadata() {
            f.parts.iter().for_each(|(t, _, _)| self.client.invalidate_metadata(t));
        }
        if f.conn.is_broken() {
            self.conns.retain(|_, c| !c.is_broken());
        }
    }

    /// Takes the batches of a fetch's answer into `out`, advancing positions. A partition
    /// with a retriable error is skipped (its metadata marked stale if that may be why); the
    /// first non-retriable error is returned after every partition was taken.
    fn take_batches(
        &mut self,
        f: &InFlight,
        resp: FetchResponse,
        out: &mut Vec<FetchedBatch>,
    ) -> Result<(), ClientError> {
        let mut error = None;
        for part in resp.partitions {
            let asked = f.parts.iter().find(|(t, p, _)| **t == *part.topic && *p == part.partition).map(|x| x.2);
            let Some(entry) = self
                .assigned
                .iter_mut()
                .find(|(t, p, o)| **t == *part.topic && *p == part.partition && Some(*o) == asked)
            else {
                continue; // not asked, or moved by a seek since
            };
            match part.error {
                ErrorCode::NONE => {}
                code if code.is_retriable() => {
                    let e = ClientError::Broker(code, String::new());
                    if e.refreshes_metadata() {
                        tracing::debug!(topic = %part.topic, partition = part.partition, %code, "refreshing metadata");
                        self.client.invalidate_metadata(&part.topic);
                    }
                    continue;
                }
                code => {
                    let what = format!("fetch {}/{} at {}", part.topic, part.partition, entry.2);
                    error.get_or_insert(ClientError::Broker(code, what));
                    continue;
                }
            }
            if let Err(e) = take_partition(entry, part.records, out) {
                error.get_or_insert(ClientError::Protocol(format!("{}/{}: {e}", part.topic, part.partition)));
            }
        }
        error.map_or(Ok(()), Err)
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

/// Parses the batches of one partition's records into `out`, advancing its position.
fn take_partition(
    entry: &mut (Rc<str>, u32, u64),
    mut records: BytesMut,
    out: &mut Vec<FetchedBatch>,
) -> Result<(), BatchError> {
    while !records.is_empty() {
        let header = BatchHeader::decode(&records[..records.len().min(HEADER_BYTES)])?;
        let len = header.batch_length as usize;
        if len > records.len() {
            return Err(BatchError::Truncated { needed: len as u64, available: records.len() as u64 });
        }
        let batch = RecordBatch::parse(records.split_to(len))?;
        let from_offset = entry.2;
        entry.2 = entry.2.max(batch.header().next_offset().get());
        out.push(FetchedBatch { topic: entry.0.clone(), partition: entry.1, from_offset, batch });
    }
    Ok(())
}
