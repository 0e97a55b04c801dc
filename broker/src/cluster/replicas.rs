//! A broker's replica directories (`partitions/<id>/`: the log and `replica.json`), the
//! settings a topic's configs give its replicas, and the process incarnation file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use skein_log::storage::FileStorage;
use skein_log::Log;

use super::now;
use crate::core::controller::{Controller, Topic};
use crate::core::replica::{Plant, Replica, ReplicaConfig};
use crate::core::{NodeId, PartitionId};
use crate::meta;
use crate::BrokerConfig;

/// Topic configs the cluster understands besides the log's own (`meta::log_config`).
pub(super) const MIN_ISR: &str = "min.insync.replicas";
pub(super) const UNCLEAN: &str = "unclean.leader.election.enable";

/// What a partition directory records about itself (`replica.json`), so a restart reopens
/// it with its topic's settings before the controller's log is replayed.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct ReplicaMeta {
    pub partition: u32,
    pub topic: String,
    pub index: u32,
    pub replication: u16,
    pub configs: BTreeMap<String, String>,
}

impl ReplicaMeta {
    /// The description of partition `p` of `topic`, named `name`.
    pub fn of(name: &str, topic: &Topic, p: PartitionId) -> ReplicaMeta {
        ReplicaMeta {
            partition: p.0,
            topic: name.to_owned(),
            index: topic.index_of(p).expect("p is a partition of topic"),
            replication: topic.replication,
            configs: topic.configs.iter().cloned().collect(),
        }
    }
}

/// A table partition's reservation step (`LogConfig::preallocate_bytes`) when its configs
/// do not set `preallocate`.
const TABLE_PREALLOCATE_BYTES: u32 = 4 << 20;

/// The tail cache (`LogConfig::tail_cache_bytes`) of the partitions whose every committed
/// record this broker reads back at once: tables and the internal topics (their state machines
/// catch up from the log), so a commit costs no file read on the shard. Plain topics keep it
/// off: a produced batch shares the request's buffer, which a cached slice would keep alive.
const STATE_TAIL_CACHE_BYTES: u32 = 1 << 20;

pub(super) fn topic_of(c: &Controller, p: PartitionId) -> Option<(&String, &Topic)> {
    c.topics().iter().find(|(_, t)| t.index_of(p).is_some())
}

/// The replica settings for a topic's configs (and the log's, checked).
pub(super) fn replica_settings(
    config: &BrokerConfig,
    configs: &BTreeMap<String, String>,
    replication: u16,
) -> Result<(ReplicaConfig, skein_log::LogConfig), String> {
    let mut log_configs = configs.clone();
    let min_isr = match log_configs.remove(MIN_ISR) {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or(format!("{MIN_ISR}: '{}' is not a count >= 1", skein_client::wire::shown(&v)))?,
        None => config.min_insync_replicas.max(1),
    };
    if min_isr > usize::from(replication) && configs.contains_key(MIN_ISR) {
        return Err(format!("{MIN_ISR} {min_isr} is above the replication factor {replication}"));
    }
    let unclean = log_configs.remove(UNCLEAN);
    if let Some(v) = &unclean {
        if v != "true" && v != "false" {
            return Err(format!("{UNCLEAN}: '{}' is not true or false", skein_client::wire::shown(v)));
        }
    }
    let auto = crate::core::autosplit::auto_split_config(&mut log_configs)?;
    // An index's definition (checked with the topic's name at creation).
    log_configs.retain(|k, _| !k.starts_with("index."));
    let table = crate::core::table::table_config(&mut log_configs)?;
    // A table machine applies its log once and cannot take records back: an unclean election
    // truncates replicas below what their machines applied, and the records written over them
    // would be skipped as old, so the replicas would part for good.
    if table.is_some() && unclean.as_deref() == Some("true") {
        return Err(format!("a table's replicas never roll back what they applied: {UNCLEAN} is not allowed"));
    }
    let mut log = meta::log_config(&log_configs)?;
    if table.is_some() {
        // A table's state is a function of its whole log (snapshots are caches): nothing is
        // ever deleted from it.
        if log_configs.keys().any(|k| k.starts_with("retention.")) {
            return Err("a table keeps its whole log: retention settings are not allowed".into());
        }
        log.retention_ms = None;
        log.retention_bytes = None;
        // Space reserved ahead (the file grown with fallocate) unless the table says otherwise:
        // a commit's fdatasync inside the file's length then has no size to persist, and
        // serial transfers with flush.ms=always went 1.11-1.19x faster, alternating
        // (bench/RESULTS.md, "Tables against PostgreSQL 15, quiet machine, and the commit
        // path"). Small steps: a table's records are small, and every partition replica
        // reserves up to two steps.
        if !log_configs.contains_key("preallocate") {
            log.preallocate_bytes = TABLE_PREALLOCATE_BYTES;
        }
        log.tail_cache_bytes = STATE_TAIL_CACHE_BYTES;
    }
    let replica = ReplicaConfig {
        min_insync_replicas: min_isr.min(usize::from(replication)),
        replica_lag_max_ms: config.replica_lag_max_ms,
        fetch_timeout_ms: 500,
        fetch_wait_max_ms: config.replica_fetch_wait_max_ms,
        load_window_ms: auto.map(|_| crate::core::autosplit::LOAD_WINDOW_MS),
        ..ReplicaConfig::default()
    };
    Ok((replica, log))
}

fn partitions_dir(config: &BrokerConfig) -> PathBuf {
    config.data_dir.join("partitions")
}

pub(super) fn create_replica(config: &BrokerConfig, me: NodeId, meta: &ReplicaMeta) -> Result<Replica<FileStorage>> {
    let dir = partitions_dir(config).join(meta.partition.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(meta)?;
    let tmp = dir.join("replica.json.tmp");
    std::fs::write(&tmp, &json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("replica.json")).with_context(|| format!("renaming {}", tmp.display()))?;
    std::fs::File::open(&dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    open_replica(config, me, &dir, meta)
}

pub(super) fn open_replica(
    config: &BrokerConfig,
    me: NodeId,
    dir: &Path,
    meta: &ReplicaMeta,
) -> Result<Replica<FileStorage>> {
    let (replica_config, mut log_config) =
        replica_settings(config, &meta.configs, meta.replication).map_err(|m| anyhow::anyhow!(m))?;
    if meta.topic.starts_with("__") {
        log_config.tail_cache_bytes = STATE_TAIL_CACHE_BYTES;
    }
    let storage = FileStorage::new(dir).with_context(|| format!("opening {}", dir.display()))?;
    // The same clock as the core's appends (segment ages compare the two).
    let log =
        Log::open(storage, log_config, now().timestamp()).with_context(|| format!("recovering {}", dir.display()))?;
    Ok(Replica::new(me, PartitionId(meta.partition), replica_config, Plant::default(), log))
}

/// Every partition directory of this broker with its description (opened later, each by
/// the shard that owns it).
pub(super) fn scan_replicas(config: &BrokerConfig) -> Result<Vec<(PathBuf, ReplicaMeta)>> {
    let root = partitions_dir(config);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let dir = entry?.path();
        let meta_path = dir.join("replica.json");
        let bytes = match std::fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Created but never described (a crash in between): it holds nothing.
                tracing::warn!(dir = %dir.display(), "partition directory without replica.json; ignored");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", meta_path.display())),
        };
        let meta: ReplicaMeta =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", meta_path.display()))?;
        out.push((dir, meta));
    }
    Ok(out)
}

/// Reads, bumps and durably stores the process incarnation (it grows at every start).
pub(super) fn next_incarnation(dir: &Path) -> Result<u64> {
    let path = dir.join("incarnation");
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().with_context(|| format!("parsing {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let next = last + 1;
    let tmp = dir.join("incarnation.tmp");
    std::fs::write(&tmp, next.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(next)
}
