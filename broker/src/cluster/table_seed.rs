//! A split's or merge's child table partition starts from its parents' rows.
//!
//! A child's leader, while its machine has not applied the seed's end ([`SEED_DONE`]),
//! waits for each parent to be sealed (the controller's seal offset, from the metadata),
//! reads the parent's rows at the seal (a read at that offset on the parent's leader, which
//! has applied it: everything before the seal is committed, nothing comes after it), keeps
//! those in the child's range, and appends them to the child's own log as read-committed
//! parts ([`SEED_BASE`] transaction ids), then the [`SEED_DONE`] record. Every replica of the
//! child applies those records like any other, so the child's state is still a function of
//! its log (the snapshot at the split offset carried in the log, then the tail). Table
//! requests to the child wait until the seed is applied. A leader that dies in the middle
//! leaves its successor to seed again from the start: no transaction ran on the child in
//! between, and putting the same rows again changes nothing but their versions.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use skein_client::partitioning::{KeyRange, Partitioning};
use skein_client::TableError;

use super::internal;
use super::shard::Node;
use super::tables::Host;
use crate::core::table::store::{SEED_BASE, SEED_DONE};
use crate::core::table::{Level, Part};
use crate::core::{LeaderEpoch, Offset, PartitionId};

/// How often a child polls the metadata for its parents' seals.
const SEAL_POLL_MS: u64 = 50;
/// The most row bytes one seed record carries.
const RECORD_BYTES_MAX: usize = 512 << 10;

/// Starts seeding `host` (a child partition this shard leads at `epoch`) unless it runs.
pub(super) fn ensure(node: &Rc<Node>, host: &Rc<RefCell<Host>>, pid: PartitionId, epoch: LeaderEpoch) {
    if host.borrow().machine.seeded() || node.tables.seeders.borrow().contains_key(&pid) {
        return;
    }
    node.tables.seeders.borrow_mut().insert(pid, epoch);
    let (node, host) = (node.clone(), host.clone());
    compio::runtime::spawn(async move {
        let (topic, index) = {
            let h = host.borrow();
            (h.topic.clone(), h.index)
        };
        tracing::info!(topic, partition = index, epoch = epoch.0, "seeding a child table partition from its parents");
        loop {
            if node.stopping.get() || internal::led_epoch(&node, pid) != Some(epoch) {
                break;
            }
            match seed(&node, &topic, index, epoch).await {
                Ok(rows) => {
                    tracing::info!(topic, partition = index, rows, "child table partition seeded");
                    break;
                }
                Err(e) => {
                    tracing::debug!(topic, partition = index, error = %e, "seeding failed; trying again");
                    compio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        node.tables.seeders.borrow_mut().remove(&pid);
    })
    .detach();
}

/// Where a split's or merge's child partition came from.
pub(super) struct Lineage {
    scheme: Partitioning,
    /// The child's range.
    range: KeyRange,
    /// Each parent's index and seal offset.
    pub(super) parents: Vec<(u32, u64)>,
}

impl Lineage {
    /// Whether the child owns `key`.
    pub(super) fn owns(&self, key: &[u8]) -> bool {
        self.scheme.point(key).is_none_or(|p| self.range.contains(p.bytes()))
    }
}

/// The lineage of partition `index` of `topic`, from fresh metadata (no parents for one
/// made with its topic); None while a parent is not sealed yet.
pub(super) async fn lineage(node: &Node, topic: &str, index: u32) -> Result<Option<Lineage>, TableError> {
    let client = internal::client(node).await?;
    client.invalidate_metadata(topic);
    let md = client.topic_metadata(topic).await?;
    let me = md.partitions.iter().find(|p| p.partition == index);
    let me = me.ok_or_else(|| TableError::Invalid(format!("no partition {index} of {topic}")))?;
    let mut parents = Vec::new();
    for &q in &me.lineage.parents {
        match md.partitions.iter().find(|p| p.partition == q).filter(|p| p.lineage.seal == 2) {
            Some(p) => parents.push((q, p.lineage.sealed_at)),
            None => return Ok(None),
        }
    }
    Ok(Some(Lineage {
        scheme: Partitioning::from_wire(md.partitioning).unwrap_or_default(),
        range: me.lineage.range.as_ref().map_or_else(KeyRange::full, KeyRange::of_wire),
        parents,
    }))
}

/// One attempt: the parents' rows in, then the end; the rows carried.
async fn seed(node: &Rc<Node>, topic: &str, index: u32, epoch: LeaderEpoch) -> Result<usize, TableError> {
    // The parents' seal offsets (a child exists from the split; its parents seal soon after).
    let lineage = loop {
        match lineage(node, topic, index).await? {
            Some(l) => break l,
            None => compio::time::sleep(Duration::from_millis(SEAL_POLL_MS)).await,
        }
    };
    let table = internal::client(node).await?.table(topic).await?;
    let mut rows = Vec::new();
    for &(q, sealed_at) in &lineage.parents {
        for (k, v) in table.rows_at(q, sealed_at).await? {
            if lineage.owns(&k) {
                rows.push((k, v));
            }
        }
    }
    let carried = rows.len();
    let mut records = Vec::new();
    let mut chunk: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut bytes = 0;
    for (k, v) in rows {
        bytes += k.len() + v.len();
        chunk.push((k, Some(v)));
        if bytes >= RECORD_BYTES_MAX {
            records.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        records.push(chunk);
    }
    let part = |txn: u64, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>| Part {
        txn: crate::core::table::TxnId(txn),
        level: Level::ReadCommitted,
        snapshot: Offset(0),
        reads: Vec::new(),
        ranges: Vec::new(),
        writes,
        steps: Vec::new(),
    };
    for (i, writes) in records.into_iter().enumerate() {
        let key = writes.first().map(|(k, _)| k.clone()).unwrap_or_default();
        let record = part(SEED_BASE ^ (u64::from(epoch.0) << 24) ^ i as u64, writes);
        internal::append(node, topic, index, epoch, &[(key, record.encode())], None)
            .await
            .map_err(|(_, m)| TableError::Invalid(format!("appending a seed record: {m}")))?;
    }
    internal::append(node, topic, index, epoch, &[(Vec::new(), part(SEED_DONE.0, Vec::new()).encode())], None)
        .await
        .map_err(|(_, m)| TableError::Invalid(format!("appending the seed's end: {m}")))?;
    Ok(carried)
}
