//! Secondary indexes from the client's side ([`crate::index`]): creating one, its state
//! (build progress, lag) and queries by indexed value.

use super::*;
use crate::index::{
    check_mode, checkpoint_from, checkpoint_key, disagreements, field_value, is_checkpoint, term_expected, term_parts,
    term_prefix, term_prefix_end, Checkpoint, IndexDef, IndexKind, IndexMode, INDEX_OF,
};
use crate::wire::{TableQueryRequest, TableQueryResponse};

/// A partition a query read, and the offset it read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touched {
    /// The topic (the table's for a document index, the index table's for a term index).
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// The offset of that partition the answer reflects.
    pub snapshot: u64,
}

/// The answer of [`Table::query`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryAnswer {
    /// The rows whose indexed field holds the value, in key order.
    pub rows: Vec<(Key, Value)>,
    /// The partitions read, each at one snapshot offset.
    pub touched: Vec<Touched>,
}

/// One table partition's part of an index's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionIndexState {
    /// The table partition.
    pub partition: u32,
    /// Whether its first pass is done.
    pub built: bool,
    /// Keys its first pass indexed, and the partition's keys then.
    pub done: u64,
    /// See `done`.
    pub total: u64,
    /// A term index: the table partition's offset its entries reflect (its checkpoint).
    pub offset: Option<u64>,
    /// A term index: how many offsets of the table partition its entries are behind.
    pub behind: Option<u64>,
    /// A term index behind its partition: ms since the offset its entries reflect was read.
    pub lag_ms: Option<u64>,
}

impl Client {
    /// Creates index `name` of table `table` over `field` (module docs of [`crate::index`]):
    /// the catalog topic (a term index's table, key-range, with the table's partition count
    /// and replication). Its entries are built online; [`Client::index_state`] shows the
    /// progress.
    pub async fn create_index(
        &self,
        table: &str,
        name: &str,
        field: &str,
        kind: IndexKind,
        mode: IndexMode,
    ) -> Result<IndexDef, TableError> {
        check_mode(kind, mode).map_err(TableError::Invalid)?;
        if field.is_empty() || field.len() > crate::index::FIELD_BYTES_MAX {
            return Err(TableError::Invalid(format!(
                "a field name of 1 to {} bytes is needed",
                crate::index::FIELD_BYTES_MAX
            )));
        }
        let t = self.table(table).await?;
        let md = self.topic_metadata(table).await?;
        let replicas = md.partitions.first().map_or(1, |p| p.replicas.len().max(1)) as u16;
        let def = IndexDef { name: name.to_owned(), table: table.to_owned(), field: field.to_owned(), kind, mode };
        let (partitions, scheme) = match kind {
            IndexKind::Document => (1, Partitioning::Hash),
            IndexKind::Term => (t.partitions().max(1), Partitioning::KeyRange),
        };
        self.create_topic_with(&def.topic(), partitions, replicas, scheme, &def.configs()).await?;
        Ok(def)
    }

    /// The indexes of table `table`, by name.
    pub async fn indexes(&self, table: &str) -> Result<Vec<IndexDef>, TableError> {
        let prefix = format!("{table}.index.");
        let mut defs = Vec::new();
        for topic in self.list_topics().await?.into_iter().filter(|t| t.starts_with(&prefix)) {
            let d = self.describe_topic(&topic).await?;
            let mut configs: BTreeMap<String, String> = d.configs.into_iter().map(|c| (c.key, c.value)).collect();
            if configs.get(INDEX_OF).is_some_and(|t| t == table) {
                if let Ok(Some(def)) = crate::index::index_config(&topic, &mut configs) {
                    defs.push(def);
                }
            }
        }
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(defs)
    }

    /// Index `name` of table `table`.
    pub async fn index(&self, table: &str, name: &str) -> Result<IndexDef, TableError> {
        self.indexes(table)
            .await?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| TableError::Invalid(format!("table {table} has no index {name}")))
    }

    /// An index's state per table partition: its first pass's progress, and a term index's
    /// distance behind the table.
    pub async fn index_state(&self, def: &IndexDef) -> Result<Vec<PartitionIndexState>, TableError> {
        let table = self.table(&def.table).await?;
        let partitions = table.scan_partitions(b"", b"");
        match def.kind {
            IndexKind::Document => {
                let txn = table.begin(Some(Level::ReadCommitted));
                let answers = txn.query_partitions(&partitions, &def.name, b"", false).await?;
                Ok(answers
                    .into_iter()
                    .map(|(p, r)| PartitionIndexState {
                        partition: p,
                        built: r.indexed >= r.keys,
                        done: r.indexed,
                        total: r.keys,
                        offset: None,
                        behind: None,
                        lag_ms: None,
                    })
                    .collect())
            }
            IndexKind::Term => {
                let ix = self.table(&def.topic()).await?;
                let mut txn = ix.begin(Some(Level::ReadCommitted));
                let rows = txn.scan(&checkpoint_from(), b"").await;
                let (rows, _) = txn.finish(rows).await?;
                let marks: BTreeMap<Key, Value> = rows.into_iter().collect();
                let now = wall_ms();
                let mut out = Vec::new();
                for p in partitions {
                    let mark = marks.get(&checkpoint_key(p)).and_then(|v| Checkpoint::decode(v));
                    let end = self.list_offset(&def.table, p, crate::wire::LATEST).await?;
                    out.push(match mark {
                        None => PartitionIndexState {
                            partition: p,
                            built: false,
                            done: 0,
                            total: 0,
                            offset: None,
                            behind: None,
                            lag_ms: None,
                        },
                        Some(c) => {
                            let behind = end.saturating_sub(c.offset);
                            PartitionIndexState {
                                partition: p,
                                built: c.built(),
                                done: c.done,
                                total: c.total,
                                offset: Some(c.offset),
                                behind: Some(behind),
                                lag_ms: Some(if behind == 0 { 0 } else { now.saturating_sub(c.at_ms) }),
                            }
                        }
                    });
                }
                Ok(out)
            }
        }
    }
}

/// What [`Client::check_index`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexCheck {
    /// Table rows compared.
    pub rows: u64,
    /// Index lookups (document) or index rows (term) compared.
    pub compared: u64,
    /// Each disagreement, one line (empty: the index agrees with its table).
    pub disagreements: Vec<String>,
}

/// Most disagreement lines a check reports.
const DISAGREEMENTS_MAX: usize = 20;

impl Client {
    /// Checks that index `def` agrees with its table. Document: per partition, at one
    /// snapshot offset, a lookup of every value its rows hold (and of one none holds)
    /// answers exactly the rows holding it. Term (after its lag): the index table holds
    /// exactly each indexed row's entry and reverse row; Err while a partition's follower is
    /// behind or moves during the check (writes going on): check again later.
    pub async fn check_index(&self, def: &IndexDef) -> Result<IndexCheck, TableError> {
        let table = self.table(&def.table).await?;
        let partitions = table.scan_partitions(b"", b"");
        let mut check = IndexCheck::default();
        match def.kind {
            IndexKind::Document => {
                let txn = table.begin(Some(Level::ReadCommitted));
                // Each partition's rows at one snapshot, by the value they hold.
                let mut seen = Vec::new();
                let mut values: BTreeSet<Vec<u8>> = BTreeSet::new();
                for p in partitions {
                    let at = txn.query_at(p, &def.name, b"", -1, false).await?.snapshot;
                    let rows = txn.read_at(p, at).await?;
                    check.rows += rows.len() as u64;
                    let mut by_value: BTreeMap<Vec<u8>, Vec<(Key, Value)>> = BTreeMap::new();
                    for (k, v) in rows {
                        if let Some(fv) = field_value(&v, &def.field) {
                            values.insert(fv.clone());
                            by_value.entry(fv).or_default().push((k, v));
                        }
                    }
                    seen.push((p, at, by_value));
                }
                // Every partition is asked for every value any row holds (a partition may
                // list rows under a value none of its rows holds any more) and one none does.
                values.insert(b"\x00none".to_vec());
                for (p, at, mut by_value) in seen {
                    for fv in &values {
                        by_value.entry(fv.clone()).or_default();
                    }
                    for (fv, want) in by_value {
                        let resp = txn.query_at(p, &def.name, &fv, at as i64, true).await?;
                        check.compared += 1;
                        let have: Vec<(Key, Value)> =
                            resp.rows.into_iter().filter_map(|r| Some((r.key.to_vec(), r.value?.to_vec()))).collect();
                        if have != want && check.disagreements.len() < DISAGREEMENTS_MAX {
                            let keys = |rows: &[(Key, Value)]| {
                                rows.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>()
                            };
                            check.disagreements.push(format!(
                                "partition {p} at {at}: {}={} gives {:?}, the rows holding it are {:?}",
                                def.field,
                                String::from_utf8_lossy(&fv),
                                keys(&have),
                                keys(&want)
                            ));
                        }
                    }
                }
            }
            IndexKind::Term => {
                let before = self.index_state(def).await?;
                if let Some(p) = before.iter().find(|p| !p.built || p.behind != Some(0)) {
                    return Err(TableError::Invalid(format!(
                        "index {} is behind partition {} of {} (built: {}, offsets behind: {:?}): check again \
                         once writes pause",
                        def.name, p.partition, def.table, p.built, p.behind
                    )));
                }
                let rows = table.scan(b"", b"").await?;
                check.rows = rows.len() as u64;
                let want = term_expected(
                    &def.field,
                    rows.iter().map(|(k, v)| (table.partition_of(k), k.as_slice(), v.as_slice())),
                );
                let ix = self.table(&def.topic()).await?;
                let mut txn = ix.begin(Some(Level::ReadCommitted));
                let held = txn.scan(b"", b"").await;
                let (held, _) = txn.finish(held).await?;
                let have: BTreeMap<Key, Value> = held.into_iter().filter(|(k, _)| !is_checkpoint(k)).collect();
                check.compared = have.len() as u64;
                let after = self.index_state(def).await?;
                if after.iter().zip(&before).any(|(a, b)| a.behind != Some(0) || a.offset != b.offset) {
                    return Err(TableError::Invalid(format!(
                        "index {} moved during the check (writes going on): check again once they pause",
                        def.name
                    )));
                }
                check.disagreements = disagreements(&want, &have, DISAGREEMENTS_MAX);
            }
        }
        Ok(check)
    }
}

impl Table {
    /// The rows whose `def` field holds `value`, by index `def` (of this table): a document
    /// index asks every partition (each answers at one snapshot offset, exact there); a term
    /// index reads the index table's range of the value (one partition), whose entries carry
    /// the rows' values as of the index's lag.
    pub async fn query(&self, def: &IndexDef, value: &[u8]) -> Result<QueryAnswer, TableError> {
        if def.table != self.name() {
            return Err(TableError::Invalid(format!("index {} is not of table {}", def.name, self.name())));
        }
        if value.len() > KEY_BYTES_MAX {
            return Err(TableError::Invalid(format!(
                "an index value of {} bytes is longer than the {KEY_BYTES_MAX} a key may be",
                value.len()
            )));
        }
        match def.kind {
            IndexKind::Document => {
                // A partition sealed since the routes were looked up: look again.
                let mut attempt = 0;
                let answers = loop {
                    let partitions = self.scan_partitions(b"", b"");
                    let txn = self.begin(Some(Level::ReadCommitted));
                    match txn.query_partitions(&partitions, &def.name, value, true).await {
                        Err(e) if sealed(&e) && attempt < SEALED_RETRIES => {
                            self.refresh().await?;
                            attempt += 1;
                        }
                        answers => break answers?,
                    }
                };
                let mut touched = Vec::new();
                let mut per_partition = Vec::new();
                for (p, r) in answers {
                    touched.push(Touched { topic: self.name().to_owned(), partition: p, snapshot: r.snapshot });
                    per_partition
                        .push(r.rows.into_iter().filter_map(|r| Some((r.key.to_vec(), r.value?.to_vec()))).collect());
                }
                Ok(QueryAnswer { rows: merge_rows(per_partition), touched })
            }
            IndexKind::Term => {
                let ix = self.inner.client.table(&def.topic()).await?;
                self.wait_for_session(&ix).await?;
                let mut attempt = 0;
                let (txn, entries) = loop {
                    let mut txn = ix.begin(Some(Level::ReadCommitted));
                    let entries = txn.scan(&term_prefix(value), &term_prefix_end(value)).await;
                    match txn.finish(entries).await {
                        // The index table split since its partitions were looked up.
                        Err(e) if sealed(&e) && attempt < SEALED_RETRIES => attempt += 1,
                        entries => break (txn, entries?.0),
                    }
                };
                let touched = txn
                    .parts
                    .iter()
                    .map(|(p, s)| Touched {
                        topic: ix.name().to_owned(),
                        partition: *p,
                        snapshot: s.snapshot.unwrap_or(0),
                    })
                    .collect();
                let rows = entries
                    .into_iter()
                    .filter_map(|(k, v)| term_parts(&k).filter(|(fv, _)| fv == value).map(|(_, key)| (key, v)))
                    .collect();
                Ok(QueryAnswer { rows, touched })
            }
        }
    }
}

impl Table {
    /// With a session ([`Table::set_session`]): waits until term index table `ix` reflects
    /// every write the session noted in this table (each partition's checkpoint at or past
    /// the session's token), read-your-writes on an asynchronous index; up to the request
    /// timeout.
    async fn wait_for_session(&self, ix: &Table) -> Result<(), TableError> {
        let Some(session) = self.inner.session.borrow().clone() else { return Ok(()) };
        let wants: Vec<(u32, u64)> = {
            let s = session.borrow();
            self.scan_partitions(b"", b"")
                .into_iter()
                .filter_map(|p| Some((p, s.token(self.name(), p)?.min_high_watermark)))
                .collect()
        };
        if wants.is_empty() {
            return Ok(());
        }
        let limit = self.inner.client.config().request_timeout;
        let start = Instant::now();
        loop {
            let mut txn = ix.begin(Some(Level::ReadCommitted));
            let rows = txn.scan(&checkpoint_from(), b"").await;
            let (rows, _) = txn.finish(rows).await?;
            let marks: BTreeMap<Key, Value> = rows.into_iter().collect();
            let behind = wants.iter().find(|(p, want)| {
                marks.get(&checkpoint_key(*p)).and_then(|v| Checkpoint::decode(v)).is_none_or(|c| c.offset < *want)
            });
            let Some((p, want)) = behind else { return Ok(()) };
            if start.elapsed() > limit {
                return Err(TableError::Client(ClientError::Broker(
                    ErrorCode::NOT_CAUGHT_UP,
                    format!(
                        "index {} has not reached the session's write at offset {want} of partition {p}",
                        ix.name()
                    ),
                )));
            }
            compio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl TableTxn {
    /// TableQuery to partition `p` at `snapshot` (-1: the latest).
    async fn query_at(
        &self,
        p: u32,
        index: &str,
        value: &[u8],
        snapshot: i64,
        rows: bool,
    ) -> Result<TableQueryResponse, TableError> {
        let req = TableQueryRequest {
            topic: self.table.name().to_owned(),
            partition: p,
            index: index.to_owned(),
            value: BytesMut::from(value),
            snapshot,
            rows,
        };
        self.call(p, ApiKey::TableQuery, &req, Retry::Idempotent).await.map_err(|e| plain_error(self.table.name(), e))
    }

    /// Every row of partition `p` at offset `at` (its leader's committed state there; the
    /// leader has applied `at`).
    pub(super) async fn read_at(&self, p: u32, at: u64) -> Result<Vec<(Key, Value)>, TableError> {
        let req = TableReadRequest {
            txn: self.wire_txn(),
            topic: self.table.name().to_owned(),
            partition: p,
            snapshot: at as i64,
            min_offset: at,
            follower: true,
            keys: Vec::new(),
            range: Some(TableRange { from: BytesMut::new(), to: BytesMut::new() }),
        };
        let resp: TableReadResponse = self
            .call(p, ApiKey::TableRead, &req, Retry::Idempotent)
            .await
            .map_err(|e| plain_error(self.table.name(), e))?;
        Ok(resp.rows.into_iter().filter_map(|r| Some((r.key.to_vec(), r.value?.to_vec()))).collect())
    }

    /// TableQuery to each of `partitions` (in parallel) at its latest offset: each
    /// partition's answer.
    async fn query_partitions(
        &self,
        partitions: &[u32],
        index: &str,
        value: &[u8],
        rows: bool,
    ) -> Result<Vec<(u32, TableQueryResponse)>, TableError> {
        let asks = partitions.iter().map(|&p| async move { (p, self.query_at(p, index, value, -1, rows).await) });
        futures_util::future::join_all(asks).await.into_iter().map(|(p, answer)| Ok((p, answer?))).collect()
    }
}

/// The wall clock in ms.
fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
