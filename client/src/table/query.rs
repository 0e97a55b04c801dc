//! Secondary indexes from the client's side ([`crate::index`]): creating one, its state
//! (build progress, lag) and queries by indexed value.

use super::*;
use crate::index::{
    check_mode, checkpoint_from, checkpoint_key, term_parts, term_prefix, term_prefix_end, Checkpoint, IndexDef,
    IndexKind, IndexMode, INDEX_OF,
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
        let def =
            IndexDef { name: name.to_owned(), table: table.to_owned(), field: field.to_owned(), kind, mode };
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
                let partitions = self.scan_partitions(b"", b"");
                let txn = self.begin(Some(Level::ReadCommitted));
                let answers = txn.query_partitions(&partitions, &def.name, value, true).await?;
                let mut touched = Vec::new();
                let mut per_partition = Vec::new();
                for (p, r) in answers {
                    touched.push(Touched { topic: self.name().to_owned(), partition: p, snapshot: r.snapshot });
                    per_partition.push(
                        r.rows.into_iter().filter_map(|r| Some((r.key.to_vec(), r.value?.to_vec()))).collect(),
                    );
                }
                Ok(QueryAnswer { rows: merge_rows(per_partition), touched })
            }
            IndexKind::Term => {
                let ix = self.inner.client.table(&def.topic()).await?;
                let mut txn = ix.begin(Some(Level::ReadCommitted));
                let entries = txn.scan(&term_prefix(value), &term_prefix_end(value)).await;
                let (entries, _) = txn.finish(entries).await?;
                let touched = txn
                    .parts
                    .iter()
                    .map(|(p, s)| Touched { topic: ix.name().to_owned(), partition: *p, snapshot: s.snapshot.unwrap_or(0) })
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

impl TableTxn {
    /// TableQuery to each of `partitions` (in parallel): each partition's answer.
    async fn query_partitions(
        &self,
        partitions: &[u32],
        index: &str,
        value: &[u8],
        rows: bool,
    ) -> Result<Vec<(u32, TableQueryResponse)>, TableError> {
        let asks = partitions.iter().map(|&p| {
            let req = TableQueryRequest {
                topic: self.table.name().to_owned(),
                partition: p,
                index: index.to_owned(),
                value: BytesMut::from(value),
                rows,
            };
            async move { (p, self.call::<_, TableQueryResponse>(p, ApiKey::TableQuery, &req, Retry::Idempotent).await) }
        });
        let mut out = Vec::new();
        for (p, answer) in futures_util::future::join_all(asks).await {
            out.push((p, answer.map_err(|e| plain_error(self.table.name(), e))?));
        }
        Ok(out)
    }
}

/// The wall clock in ms.
fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
