//! Asynchronous term indexes: a follower of each table partition's log, on its leader.
//!
//! A term index is a key-range table of its own (`skein_client::index`). For each partition
//! of the indexed table, the broker leading it runs one follower per term index: it reads
//! the partition's rows from the table machine this shard keeps (committed state only) and
//! writes, in one serializable transaction on the index table per step,
//!
//! - the entries of the rows that changed (`term_key(value, key)` holding the row's value,
//!   so a lookup reads the index table alone),
//! - their reverse rows (`reverse_key`: which value a row's entry is under, so a changed
//!   row's old entry is found without its old version),
//! - and the checkpoint row (`checkpoint_key`): the partition offset the entries reflect.
//!
//! Every step reads the checkpoint inside its transaction, so two followers of one
//! partition (an old leader's still running through a leadership change) cannot both
//! commit from the same checkpoint, and a follower whose machine is behind the checkpoint
//! waits. A step visits the keys changed since the checkpoint when the machine still holds
//! every version since then (`TableMachine::changed_since`); otherwise, and for a new
//! index, a pass goes over every key in chunks (also deleting entries of rows that are
//! gone), recording how far it got, so a new leader resumes it: the online build, with
//! progress.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use skein_client::index::{
    checkpoint_key, field_value, reverse_key, reverse_prefix, term_key, Checkpoint, IndexDef, IndexKind,
};
use skein_client::table::KEY_BYTES_MAX;
use skein_client::wire::Level;
use skein_client::{Table, TableError};

use super::internal::{self, wall_ms};
use super::shard::Node;
use super::table_seed::Lineage;
use super::tables::Host;
use crate::core::{LeaderEpoch, Offset, PartitionId};

/// Keys one pass step visits.
const PASS_KEYS: usize = 500;
/// Changed keys one step takes; more start a pass.
const CHANGES_MAX: usize = 2_000;
/// How long a follower with nothing to do waits before it looks again.
const POLL_MS: u64 = 10;
/// How long it waits after a failed step.
const RETRY_MS: u64 = 200;

/// Starts the followers this shard's led table partitions need (one per partition and term
/// index, while it leads at `epoch`).
pub(super) fn ensure(node: &Rc<Node>, host: &Rc<RefCell<Host>>, pid: PartitionId, epoch: LeaderEpoch) {
    let defs: Vec<IndexDef> = {
        let topics = node.topics.load();
        let h = host.borrow();
        topics.indexes(&h.topic).iter().filter(|d| d.kind == IndexKind::Term).cloned().collect()
    };
    for def in defs {
        let key = (pid, def.name.clone());
        if node.tables.followers.borrow().contains_key(&key) {
            continue;
        }
        node.tables.followers.borrow_mut().insert(key.clone(), epoch);
        let (node, host) = (node.clone(), host.clone());
        compio::runtime::spawn(async move {
            follow(&node, &host, pid, epoch, &def).await;
            node.tables.followers.borrow_mut().remove(&key);
        })
        .detach();
    }
}

/// Whether the topic map still defines `def`.
fn defined(node: &Node, def: &IndexDef) -> bool {
    node.topics.load().indexes(&def.table).iter().any(|d| d == def)
}

async fn follow(node: &Rc<Node>, host: &Rc<RefCell<Host>>, pid: PartitionId, epoch: LeaderEpoch, def: &IndexDef) {
    let partition = host.borrow().index;
    tracing::info!(index = %def, partition, epoch = epoch.0, "following a table partition for a term index");
    let mut state = Follower { table: None, known: None, lineage: None };
    loop {
        if node.stopping.get() || internal::led_epoch(node, pid) != Some(epoch) || !defined(node, def) {
            return;
        }
        let wait = match state.step(node, host, pid, partition, def).await {
            Ok(true) => 0,
            Ok(false) => POLL_MS,
            Err(e) => {
                tracing::debug!(index = %def, partition, error = %e, "a term index step failed; retrying");
                state.known = None;
                RETRY_MS
            }
        };
        if wait > 0 {
            compio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// One follower's state between steps.
struct Follower {
    /// The index table.
    table: Option<Table>,
    /// The checkpoint it last wrote or read (a step that would find nothing new to do is
    /// skipped without a transaction).
    known: Option<Checkpoint>,
    /// A split's or merge's child: where its keys came from (looked up at its first pass).
    lineage: Option<Lineage>,
}

/// What one step visits: keys and their latest values (None: absent) at `offset`.
struct Plan {
    rows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// A pass's chunk: its bounds `[from, to)` (reverse rows there are visited too).
    chunk: Option<(Vec<u8>, Option<Vec<u8>>)>,
    next: Checkpoint,
}

impl Follower {
    /// One step; true when there is more to do at once.
    async fn step(
        &mut self,
        node: &Rc<Node>,
        host: &Rc<RefCell<Host>>,
        pid: PartitionId,
        partition: u32,
        def: &IndexDef,
    ) -> Result<bool, TableError> {
        let applied = host.borrow().machine.applied();
        if self.known.as_ref().is_some_and(|c| c.next.is_none() && Offset(c.offset) >= applied) {
            return Ok(false);
        }
        if self.table.is_none() {
            self.table = Some(internal::client(node).await?.table(&def.topic()).await?);
        }
        let mut txn = self.table.as_ref().expect("set above").begin(Some(Level::Serializable));
        match self.fill(&mut txn, node, host, pid, partition, def).await {
            Ok(Some(next)) => {
                txn.commit().await?;
                let more = next.next.is_some();
                self.known = Some(next);
                Ok(more)
            }
            Ok(None) => {
                let _ = txn.abort().await;
                Ok(false)
            }
            Err(e) => {
                let _ = txn.abort().await;
                Err(e)
            }
        }
    }

    /// Reads the checkpoint and buffers the step's writes in `txn`; the checkpoint it
    /// writes, or None when there is nothing to do now.
    async fn fill(
        &mut self,
        txn: &mut skein_client::TableTxn,
        node: &Rc<Node>,
        host: &Rc<RefCell<Host>>,
        pid: PartitionId,
        partition: u32,
        def: &IndexDef,
    ) -> Result<Option<Checkpoint>, TableError> {
        let checkpoint = txn.get(&checkpoint_key(partition)).await?.and_then(|v| Checkpoint::decode(&v));
        // A sealed partition's follower still finishes (or makes) its entries as of the seal:
        // its children take them over from there.
        let Some(plan) = plan(&host.borrow(), checkpoint.as_ref(), wall_ms()) else {
            self.known = checkpoint;
            return Ok(None);
        };
        // A child's pass takes over its parents' entries, once their followers are done.
        let mut parents = &[][..];
        if plan.chunk.is_some() && node.topics.load().has_parents(pid) {
            if self.lineage.is_none() {
                let topic = host.borrow().topic.clone();
                match super::table_seed::lineage(node, &topic, partition).await? {
                    Some(l) => self.lineage = Some(l),
                    None => return Ok(None),
                }
            }
            if let Some(l) = &self.lineage {
                for &(q, sealed_at) in &l.parents {
                    let parent = txn.get(&checkpoint_key(q)).await?.and_then(|v| Checkpoint::decode(&v));
                    if parent.is_none_or(|c| c.next.is_some() || c.offset < sealed_at) {
                        return Ok(None);
                    }
                }
                parents = &l.parents;
            }
        }
        let keep_old = node.config.unsafe_index_plant == Some(crate::IndexPlant::TermKeepsOldEntries);
        let owns = |k: &[u8]| self.lineage.as_ref().is_none_or(|l| l.owns(k));
        write(txn, partition, def, &plan, keep_old, parents, owns).await?;
        Ok(Some(plan.next))
    }
}

/// What the next step visits, from the machine's committed state; None: nothing to do (or
/// this replica has not applied what the checkpoint reflects yet).
fn plan(host: &Host, checkpoint: Option<&Checkpoint>, now_ms: u64) -> Option<Plan> {
    let m = &host.machine;
    let applied = m.applied();
    let pass = |from: Vec<u8>, started: Offset, done: u64, total: u64| {
        let (rows, next) = m.latest_from(&from, PASS_KEYS);
        let done = done + rows.len() as u64;
        let next = Checkpoint { offset: started.0, at_ms: now_ms, done, total, next: next.clone() };
        Some(Plan { rows, chunk: Some((from, next.next.clone())), next })
    };
    match checkpoint {
        None => pass(Vec::new(), applied, 0, m.keys() as u64),
        Some(c) if Offset(c.offset) > applied => None,
        Some(c) => match &c.next {
            Some(from) => pass(from.clone(), Offset(c.offset), c.done, c.total),
            None if Offset(c.offset) == applied => None,
            None => match m.changed_since(Offset(c.offset)) {
                Some(keys) if keys.len() <= CHANGES_MAX => {
                    let rows = keys
                        .into_iter()
                        .map(|k| {
                            let v = m.latest(&k).and_then(|(_, v)| v.map(<[u8]>::to_vec));
                            (k, v)
                        })
                        .collect();
                    let next =
                        Checkpoint { offset: applied.0, at_ms: now_ms, done: c.done, total: c.total, next: None };
                    Some(Plan { rows, chunk: None, next })
                }
                // Too many changes, or versions since the checkpoint pruned: a pass.
                _ => pass(Vec::new(), applied, 0, m.keys() as u64),
            },
        },
    }
}

/// The step's writes inside `txn`: each visited key's entry and reverse row made to match
/// its latest value, then the checkpoint.
/// `parents` (a child's first pass): the parents whose reverse rows in the chunk, for keys
/// the child `owns`, are taken over (their entries replaced or deleted, the reverse rows
/// deleted). `keep_old`: a planted bug (`--unsafe-index-plant term-keeps-old-entries`),
/// old entries are never deleted.
async fn write(
    txn: &mut skein_client::TableTxn,
    partition: u32,
    def: &IndexDef,
    plan: &Plan,
    keep_old: bool,
    parents: &[(u32, u64)],
    owns: impl Fn(&[u8]) -> bool,
) -> Result<(), TableError> {
    // Which value each visited row's entry is under now.
    let mut current: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    // The rows whose entry a parent's reverse row names (this partition has none for them).
    let mut inherited: BTreeSet<Vec<u8>> = BTreeSet::new();
    match &plan.chunk {
        Some((from, to)) => {
            for (k, v) in reverse_rows(txn, partition, from, to.as_deref()).await? {
                current.insert(k, v);
            }
            for &(q, _) in parents {
                for (k, v) in reverse_rows(txn, q, from, to.as_deref()).await? {
                    if owns(&k) {
                        if let Some(reverse) = reverse_key(q, &k) {
                            txn.delete(&reverse).await?;
                        }
                        if let std::collections::btree_map::Entry::Vacant(e) = current.entry(k.clone()) {
                            e.insert(v);
                            inherited.insert(k);
                        }
                    }
                }
            }
        }
        None => {
            let keys: Vec<Vec<u8>> = plan.rows.iter().filter_map(|(k, _)| reverse_key(partition, k)).collect();
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let prefix = reverse_prefix(partition);
            for (k, v) in keys.iter().zip(txn.get_many(&refs).await?) {
                if let (Some(row), Some(v)) = (k.strip_prefix(prefix.as_slice()), v) {
                    current.insert(row.to_vec(), v);
                }
            }
        }
    }
    let mut visited: BTreeMap<&[u8], Option<&[u8]>> =
        plan.rows.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect();
    for k in current.keys() {
        visited.entry(k.as_slice()).or_insert(None);
    }
    for (key, value) in visited {
        let Some(reverse) = reverse_key(partition, key) else { continue };
        let wanted = value
            .and_then(|v| Some((field_value(v, &def.field)?, v)))
            .map(|(fv, v)| (term_key(&fv, key), fv, v))
            .filter(|(entry, _, _)| entry.len() <= KEY_BYTES_MAX);
        let old = current.get(key);
        if let Some(old) = old.filter(|_| !keep_old) {
            if wanted.as_ref().is_none_or(|(_, fv, _)| fv != old) {
                txn.delete(&term_key(old, key)).await?;
            }
        }
        match wanted {
            Some((entry, fv, v)) => {
                txn.put(&entry, v).await?;
                if old != Some(&fv) || inherited.contains(key) {
                    txn.put(&reverse, &fv).await?;
                }
            }
            None if old.is_some() && !inherited.contains(key) => txn.delete(&reverse).await?,
            None => {}
        }
    }
    txn.put(&checkpoint_key(partition), &plan.next.encode()).await
}

/// Partition `partition`'s reverse rows for the keys in `[from, to)` (`to` None: to the
/// end): row key and indexed value.
async fn reverse_rows(
    txn: &mut skein_client::TableTxn,
    partition: u32,
    from: &[u8],
    to: Option<&[u8]>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, TableError> {
    let lo = reverse_key(partition, from).unwrap_or_else(|| reverse_prefix(partition));
    let hi = match to.and_then(|t| reverse_key(partition, t)) {
        Some(hi) => hi,
        None => partition.checked_add(1).map(reverse_prefix).unwrap_or_default(),
    };
    let prefix = reverse_prefix(partition);
    let rows = txn.scan(&lo, &hi).await?;
    Ok(rows.into_iter().filter_map(|(k, v)| Some((k.strip_prefix(prefix.as_slice())?.to_vec(), v))).collect())
}
