//! Topic settings and names (`validate_name`, `log_config`: what a topic's configs mean for
//! its log) and the broker's persisted producer-id blocks (`ProducerIds`). Which topics exist
//! is the controller's state (`core::controller`), replicated in its Raft log.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use skein_client::wire::{shown, ErrorCode};
use skein_log::{Durability, LogConfig};

/// Replaces `dir/name` with `bytes` atomically and durably (temp file, fsync, rename, fsync
/// of the directory).
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

/// Ids handed out per block; the end of the block is persisted before its first id is used.
pub const PRODUCER_ID_BLOCK: i64 = 1_000;

/// Allocates idempotent producer ids that are never reused over the broker's life: ids are
/// handed out from a block whose end is persisted (`producer_ids`) before the block's first
/// id; after a restart allocation continues at the persisted end (the rest of a block that
/// was in use is skipped, as Kafka's ProducerIdManager does).
#[derive(Debug)]
pub struct ProducerIds {
    dir: PathBuf,
    next: i64,
    block_end: i64,
}

impl ProducerIds {
    /// Reads the persisted block end in `dir` (none: start at 0).
    pub fn load(dir: &Path) -> Result<ProducerIds> {
        let path = dir.join("producer_ids");
        let end = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<i64>().with_context(|| format!("parsing {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        anyhow::ensure!(end >= 0, "{} holds a negative id", path.display());
        Ok(ProducerIds { dir: dir.to_owned(), next: end, block_end: end })
    }

    /// The next id, persisting a new block first when the current one is used up.
    pub fn allocate(&mut self) -> Result<i64> {
        if self.next >= self.block_end {
            let end = self.next.checked_add(PRODUCER_ID_BLOCK).context("producer ids exhausted")?;
            write_atomically(&self.dir, "producer_ids", end.to_string().as_bytes())?;
            self.block_end = end;
        }
        let id = self.next;
        self.next += 1;
        Ok(id)
    }
}

/// Checks a topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), ErrorCode> {
    if !crate::core::controller::valid_topic_name(name) {
        return Err(ErrorCode::INVALID_TOPIC);
    }
    Ok(())
}

/// The log settings for a topic's configs; unknown keys or bad values are an error message.
///
/// Keys: `flush.ms` (`always`, the default: commits count synced records; `never` or
/// milliseconds: commits count written records and the log syncs on that schedule, Kafka's
/// model), `segment.bytes`,
/// `segment.ms`, `retention.ms` (-1: forever), `retention.bytes` (-1: unbounded).
pub fn log_config(configs: &BTreeMap<String, String>) -> Result<LogConfig, String> {
    // `flush.ms=always` (the default): every replica syncs whenever something written is not
    // durable (group commit), and the high watermark, acks=all and consumers see only synced
    // records; sustained produce throughput is then the disk's write bandwidth (the page cache
    // cannot absorb a burst; bench/RESULTS.md "Storage IO off the shards"). An interval or
    // `never` trades that for the page cache: commits count records written on every ISR
    // member (they survive a broker process kill, not a machine crash of every replica), as
    // Kafka's default does.
    // `preallocate` is off by default, as in Kafka. On: appends no longer wait (1-4 ms, a few
    // times a second) for writeback allocating ext4 blocks, and e2e p99 at 150k records/s fell
    // from 1.2-1.5 to 0.9-1.1 ms; but writing into reserved (unwritten) extents cost 3-15 % of
    // closed-loop throughput and 10-28 % more CPU per GB on the dev VM (bench/RESULTS.md).
    let mut c = LogConfig { durability: Durability::Always, ..LogConfig::default() };
    for (k, v) in configs {
        let num = || v.parse::<i64>().map_err(|_| format!("{}: '{}' is not a number", shown(k), shown(v)));
        match k.as_str() {
            "flush.ms" => {
                c.durability = match v.as_str() {
                    "always" | "0" => Durability::Always,
                    "never" => Durability::Never,
                    _ => Durability::IntervalMs(u64::try_from(num()?).map_err(|_| format!("{k} must be >= 0"))?),
                }
            }
            "segment.bytes" => c.segment_bytes = u32::try_from(num()?).map_err(|_| format!("{k} out of range"))?,
            "segment.ms" => c.segment_ms = u64::try_from(num()?).ok(),
            "retention.ms" => c.retention_ms = u64::try_from(num()?).ok(),
            "retention.bytes" => c.retention_bytes = u64::try_from(num()?).ok(),
            "preallocate" => {
                c.preallocate_bytes = match v.as_str() {
                    "true" => PREALLOCATE_BYTES,
                    "false" => 0,
                    _ => return Err(format!("{k}: '{}' is not true or false", shown(v))),
                }
            }
            // Replication settings: the replica's, not the log's (`cluster::replicas` takes
            // them out before the rest comes here).
            "min.insync.replicas" | "unclean.leader.election.enable" => {
                return Err(format!("config '{k}' is a replica setting, not a log setting"))
            }
            _ => return Err(format!("unknown config '{}'", shown(k))),
        }
    }
    c.validate().map_err(str::to_owned)?;
    Ok(c)
}

/// How far ahead of the appends a partition reserves disk space (topic config `preallocate`).
pub const PREALLOCATE_BYTES: u32 = 32 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_configs_are_checked() {
        assert!(validate_name("orders.v2_a-b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(250)] {
            assert_eq!(validate_name(bad), Err(ErrorCode::INVALID_TOPIC), "{bad:?}");
        }
        let cfg = |k: &str, v: &str| log_config(&BTreeMap::from([(k.to_owned(), v.to_owned())]));
        assert_eq!(cfg("flush.ms", "always").map(|c| c.durability), Ok(Durability::Always));
        assert_eq!(cfg("flush.ms", "250").map(|c| c.durability), Ok(Durability::IntervalMs(250)));
        assert!(cfg("flush.ms", "soon").is_err());
        assert!(cfg("segment.bytes", "10").is_err(), "below the minimum");
        assert!(cfg("colour", "blue").is_err());
        assert_eq!(cfg("retention.ms", "-1").map(|c| c.retention_ms), Ok(None));
        assert_eq!(cfg("retention.ms", "1").map(|c| c.preallocate_bytes), Ok(0), "off by default");
        assert_eq!(cfg("preallocate", "true").map(|c| c.preallocate_bytes), Ok(PREALLOCATE_BYTES));
        assert_eq!(cfg("preallocate", "false").map(|c| c.preallocate_bytes), Ok(0));
        assert!(cfg("preallocate", "yes").is_err());
        for cluster_only in ["min.insync.replicas", "unclean.leader.election.enable"] {
            let err = cfg(cluster_only, "2").expect_err("the replica's, not the log's");
            assert!(err.contains("replica setting"), "says why: {err}");
        }
    }

    #[test]
    fn producer_ids_are_never_reused_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ids = ProducerIds::load(dir.path()).expect("load");
        let a: Vec<i64> = (0..3).map(|_| ids.allocate().expect("id")).collect();
        assert_eq!(a, vec![0, 1, 2]);
        drop(ids);
        let mut again = ProducerIds::load(dir.path()).expect("load");
        assert_eq!(again.allocate().expect("id"), PRODUCER_ID_BLOCK, "the used block is skipped");
        std::fs::write(dir.path().join("producer_ids"), "garbage").expect("write");
        assert!(ProducerIds::load(dir.path()).is_err(), "a damaged file is an error, not a reset");
    }
}
