//! Automatic splits and merges of ranged topics (issue 21), in two sans-IO halves:
//!
//! - [`LoadMeter`], in a partition's leader ([`super::replica::Replica`]): counts the records
//!   and bytes appended per window and keeps a few sampled keys; at the end of each window the
//!   leader reports a [`Load`] to the controller (`Message::Load`). Only partitions of topics
//!   with an automatic trigger set measure (the replica's `load_window_ms`).
//! - [`AutoSplit`], in the active controller voter ([`super::quorum`]): keeps the latest load
//!   of every partition (soft state: not in the Raft log; a new active controller learns it
//!   within a window) and, on its ticks, proposes at most one split or merge per topic per
//!   `auto.split.interval.ms` (the rate limit against split storms, HBase's lesson): a split
//!   of the hottest open partition past a threshold, at the median of its sampled keys' points
//!   (so the two halves share the load as it is, not as the key space is), else a merge of two
//!   cold open neighbours. The proposal goes through Raft like an operator's split, so every
//!   voter applies the same change, and the controller's own checks still apply.
//!
//! Topic configs (all optional; a ranged topic with none of the triggers never resizes by
//! itself): `auto.split.records.per.sec`, `auto.split.bytes.per.sec` (load), `auto.split.bytes`
//! (size of the partition's log), `auto.merge.records.per.sec` (two neighbours both below it,
//! and together below half the split rate, merge), `auto.split.interval.ms` (default 5000),
//! `auto.split.partitions.max` (open partitions, default 64).

use std::collections::{BTreeMap, HashMap};

use skein_client::partitioning::{KeyRange, Partitioning};

use super::controller::Controller;
use super::{Message, PartitionId, Time};

/// Split when a partition takes more records per second than this.
pub const SPLIT_RECORDS: &str = "auto.split.records.per.sec";
/// Split when a partition takes more bytes per second than this.
pub const SPLIT_BYTES_RATE: &str = "auto.split.bytes.per.sec";
/// Split when a partition's log holds more bytes than this.
pub const SPLIT_SIZE: &str = "auto.split.bytes";
/// Merge two neighbours both taking fewer records per second than this.
pub const MERGE_RECORDS: &str = "auto.merge.records.per.sec";
/// At most one automatic change of a topic per this many milliseconds.
pub const INTERVAL: &str = "auto.split.interval.ms";
/// No automatic split past this many open partitions.
pub const PARTITIONS_MAX: &str = "auto.split.partitions.max";

/// The default of [`INTERVAL`].
pub const INTERVAL_MS_DEFAULT: u64 = 5_000;
/// The default of [`PARTITIONS_MAX`].
pub const PARTITIONS_MAX_DEFAULT: u32 = 64;
/// The window over which a leader measures its load, and how often it reports.
pub const LOAD_WINDOW_MS: u64 = 1_000;
/// Keys a leader samples per window (at most).
pub const SAMPLES_MAX: usize = 32;
/// Longest key a leader samples (a key-range split point is at most 1 KiB).
pub const SAMPLE_KEY_BYTES_MAX: usize = 1024;
/// A leader samples one key of one batch in this many.
const SAMPLE_EVERY_BATCHES: u64 = 4;

/// A topic's automatic split and merge settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoSplitConfig {
    /// [`SPLIT_RECORDS`].
    pub split_records_per_s: Option<u64>,
    /// [`SPLIT_BYTES_RATE`].
    pub split_bytes_per_s: Option<u64>,
    /// [`SPLIT_SIZE`].
    pub split_bytes: Option<u64>,
    /// [`MERGE_RECORDS`].
    pub merge_records_per_s: Option<u64>,
    /// [`INTERVAL`].
    pub interval_ms: u64,
    /// [`PARTITIONS_MAX`].
    pub partitions_max: u32,
}

impl AutoSplitConfig {
    /// Whether any trigger is set.
    pub fn any(&self) -> bool {
        self.split_records_per_s.is_some()
            || self.split_bytes_per_s.is_some()
            || self.split_bytes.is_some()
            || self.merge_records_per_s.is_some()
    }

    /// Whether `load` calls for a split.
    fn hot(&self, load: &Load) -> bool {
        self.split_records_per_s.is_some_and(|t| load.records_per_s > t)
            || self.split_bytes_per_s.is_some_and(|t| load.bytes_per_s > t)
            || self.split_bytes.is_some_and(|t| load.size_bytes > t)
    }

    /// Whether two neighbours with these loads merge.
    fn cold(&self, a: &Load, b: &Load) -> bool {
        let Some(t) = self.merge_records_per_s else { return false };
        let together = a.records_per_s + b.records_per_s;
        let under_split = self.split_records_per_s.is_none_or(|s| together < s / 2);
        let small = self.split_bytes.is_none_or(|s| a.size_bytes + b.size_bytes < s / 2);
        a.records_per_s < t && b.records_per_s < t && under_split && small
    }
}

/// Takes the `auto.*` settings out of `configs` and checks them; `None` if no trigger is set.
pub fn auto_split_config(configs: &mut BTreeMap<String, String>) -> Result<Option<AutoSplitConfig>, String> {
    let mut number = |key: &str| -> Result<Option<u64>, String> {
        match configs.remove(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .map(Some)
                .ok_or_else(|| format!("{key}: '{}' is not a whole number >= 1", skein_client::wire::shown(&v))),
        }
    };
    let config = AutoSplitConfig {
        split_records_per_s: number(SPLIT_RECORDS)?,
        split_bytes_per_s: number(SPLIT_BYTES_RATE)?,
        split_bytes: number(SPLIT_SIZE)?,
        merge_records_per_s: number(MERGE_RECORDS)?,
        interval_ms: number(INTERVAL)?.unwrap_or(INTERVAL_MS_DEFAULT),
        partitions_max: match number(PARTITIONS_MAX)? {
            None => PARTITIONS_MAX_DEFAULT,
            Some(n) => u32::try_from(n).map_err(|_| format!("{PARTITIONS_MAX}: {n} is too large"))?,
        },
    };
    if let Some(key) = configs.keys().find(|k| k.starts_with("auto.")) {
        return Err(format!("unknown config '{}'", skein_client::wire::shown(key)));
    }
    Ok(config.any().then_some(config))
}

/// The automatic settings of a topic whose configs were checked at creation (`None` if it has
/// none, or if they do not parse, which creation refuses).
pub fn topic_auto_split(configs: &[(String, String)]) -> Option<AutoSplitConfig> {
    let mut map: BTreeMap<String, String> = configs.iter().filter(|(k, _)| k.starts_with("auto.")).cloned().collect();
    auto_split_config(&mut map).ok().flatten()
}

/// A partition's load over its leader's last window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Records appended per second.
    pub records_per_s: u64,
    /// Bytes appended per second.
    pub bytes_per_s: u64,
    /// The log's size on disk.
    pub size_bytes: u64,
    /// Keys sampled from the window's batches (at most [`SAMPLES_MAX`], each at most
    /// [`SAMPLE_KEY_BYTES_MAX`] bytes), in no order.
    pub keys: Vec<Vec<u8>>,
}

/// A leader's measure of what it appends: records, bytes and sampled keys per window.
#[derive(Debug, Default)]
pub struct LoadMeter {
    started: Option<Time>,
    records: u64,
    bytes: u64,
    batches: u64,
    keys: Vec<Vec<u8>>,
}

impl LoadMeter {
    /// Whether the next batch appended should give a key sample, and which of its `records`
    /// (one batch in `SAMPLE_EVERY_BATCHES`; the sample is a bounded copy of one key, never a
    /// pass per record). The record is spread over the batch, deterministically (the
    /// simulator replays), so a producer's batch order cannot hide keys from the sample.
    pub fn sample_index(&self, records: usize) -> Option<usize> {
        if records == 0 || !self.batches.is_multiple_of(SAMPLE_EVERY_BATCHES) {
            return None;
        }
        let spread = (self.batches / SAMPLE_EVERY_BATCHES + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17;
        Some((spread % records as u64) as usize)
    }

    /// Counts an appended batch, with its sampled key if it gave one.
    pub fn note(&mut self, now: Time, records: u64, bytes: u64, key: Option<&[u8]>) {
        self.started.get_or_insert(now);
        self.records += records;
        self.bytes += bytes;
        self.batches += 1;
        let Some(key) = key.filter(|k| k.len() <= SAMPLE_KEY_BYTES_MAX) else { return };
        if self.keys.len() < SAMPLES_MAX {
            self.keys.push(key.to_vec());
        } else {
            // Reservoir sampling over the window's sampled batches, with a deterministic
            // spread (the simulator replays): slot = a hash of the batch count.
            let sampled = self.batches / SAMPLE_EVERY_BATCHES + 1;
            let slot = (sampled.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % sampled;
            if let Some(kept) = self.keys.get_mut(slot as usize) {
                kept.clear();
                kept.extend_from_slice(key);
            }
        }
    }

    /// At the end of a window (`window_ms` after its start; the first window starts now if
    /// none did), the load over it, and a new window begins.
    pub fn take(&mut self, now: Time, window_ms: u64, size_bytes: u64) -> Option<Load> {
        let started = *self.started.get_or_insert(now);
        let elapsed = now.ms_since(started);
        if elapsed < window_ms {
            return None;
        }
        let per_s = |n: u64| n.saturating_mul(1000) / elapsed.max(1);
        let load = Load {
            records_per_s: per_s(self.records),
            bytes_per_s: per_s(self.bytes),
            size_bytes,
            keys: std::mem::take(&mut self.keys),
        };
        *self = LoadMeter { started: Some(now), ..LoadMeter::default() };
        Some(load)
    }
}

/// The active controller's automatic resizing: the latest load per partition and the last
/// automatic change per topic.
#[derive(Debug, Default)]
pub struct AutoSplit {
    loads: HashMap<PartitionId, (Time, Load)>,
    last_change: HashMap<String, Time>,
}

impl AutoSplit {
    /// Notes a leader's report.
    pub fn note(&mut self, now: Time, partition: PartitionId, load: Load) {
        self.loads.insert(partition, (now, load));
    }

    /// Forgets everything (this voter stopped being the active controller).
    pub fn clear(&mut self) {
        self.loads.clear();
        self.last_change.clear();
    }

    /// The changes due now (`Message::Split` or `Message::Merge`, as an operator's broker
    /// would send), at most one per topic, for topics whose last automatic change is at least
    /// their interval old. Deterministic (topics in name order).
    pub fn decide(&mut self, now: Time, controller: &Controller) -> Vec<Message> {
        let fresh_ms = 3 * LOAD_WINDOW_MS;
        self.loads.retain(|_, (at, _)| now.ms_since(*at) <= fresh_ms);
        let mut changes = Vec::new();
        for (name, topic) in controller.topics() {
            if !topic.partitioning.ranged() {
                continue;
            }
            let Some(config) = topic_auto_split(&topic.configs) else { continue };
            if self.last_change.get(name).is_some_and(|t| now.ms_since(*t) < config.interval_ms) {
                continue;
            }
            // Open partitions with a fresh load, in range order.
            let all_open = controller.open_parts(name);
            let open_count = all_open.len() as u32;
            let open: Vec<(u32, &KeyRange, &Load)> = all_open
                .into_iter()
                .filter_map(|(index, id, range)| self.loads.get(&id).map(|(_, load)| (index, range, load)))
                .collect();
            let hottest = open
                .iter()
                .filter(|(_, _, load)| config.hot(load))
                .max_by_key(|(index, _, load)| (load.records_per_s, load.bytes_per_s, std::cmp::Reverse(*index)));
            let change = match hottest {
                Some(&(index, range, load)) if open_count < config.partitions_max => {
                    let at = split_point(topic.partitioning, range, &load.keys);
                    Some(Message::Split { topic: name.clone(), index, at })
                }
                _ => open
                    .windows(2)
                    .find(|w| w[0].1.precedes(w[1].1) && config.cold(w[0].2, w[1].2))
                    .map(|w| Message::Merge { topic: name.clone(), indexes: [w[0].0, w[1].0] }),
            };
            if let Some(change) = change {
                self.last_change.insert(name.clone(), now);
                // The parents' loads are stale from now on.
                let indexes: Vec<u32> = match &change {
                    Message::Split { index, .. } => vec![*index],
                    Message::Merge { indexes, .. } => indexes.to_vec(),
                    _ => Vec::new(),
                };
                for index in indexes {
                    if let Some(id) = topic.partition(index) {
                        self.loads.remove(&id);
                    }
                }
                changes.push(change);
            }
        }
        changes
    }
}

/// The split point for a range from sampled keys: the median of their points, if it lies
/// strictly inside the range; else `None` (the controller splits at the middle).
pub fn split_point(scheme: Partitioning, range: &KeyRange, keys: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut points: Vec<Vec<u8>> = keys.iter().filter_map(|k| scheme.point(k)).map(|p| p.bytes().to_vec()).collect();
    points.retain(|p| range.contains(p));
    points.sort();
    // The upper median: a split at it puts the lower half of the samples in the first child.
    let at = points.get(points.len() / 2)?;
    range.splits_at(at).then(|| at.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Time {
        Time(n * 1000)
    }

    fn configs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn settings_are_taken_out_and_checked() {
        let mut c = configs(&[(SPLIT_RECORDS, "1000"), ("retention.ms", "5")]);
        let auto = auto_split_config(&mut c).expect("valid").expect("a trigger");
        assert_eq!(auto.split_records_per_s, Some(1000));
        assert_eq!((auto.interval_ms, auto.partitions_max), (INTERVAL_MS_DEFAULT, PARTITIONS_MAX_DEFAULT));
        assert_eq!(c.keys().collect::<Vec<_>>(), ["retention.ms"], "the log's settings stay");
        assert_eq!(auto_split_config(&mut configs(&[(INTERVAL, "100")])), Ok(None), "no trigger");
        for bad in [(SPLIT_RECORDS, "0"), (SPLIT_SIZE, "-1"), (MERGE_RECORDS, "x"), ("auto.splits", "1")] {
            assert!(auto_split_config(&mut configs(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_meter_reports_rates_per_window_and_samples_boundedly() {
        let mut m = LoadMeter::default();
        assert_eq!(m.take(ms(0), 1000, 0), None, "the first window starts");
        for i in 0..400u64 {
            let key = i.to_be_bytes();
            let sample = m.sample_index(10).map(|_| &key[..]);
            m.note(ms(i), 10, 1000, sample);
        }
        assert_eq!(m.take(ms(999), 1000, 7), None, "not a whole window yet");
        let load = m.take(ms(2000), 1000, 7).expect("a window");
        assert_eq!((load.records_per_s, load.bytes_per_s, load.size_bytes), (2000, 200_000, 7));
        assert_eq!(load.keys.len(), SAMPLES_MAX);
        assert!(load.keys.iter().any(|k| k.as_slice() > &300u64.to_be_bytes()[..]), "later batches sampled too");
        let next = m.take(ms(3000), 1000, 7).expect("the next window");
        assert_eq!((next.records_per_s, next.keys.len()), (0, 0));
    }

    /// A one-broker controller with a ranged topic "t" of `n` partitions and these configs.
    fn controller(n: u32, configs: &[(&str, &str)]) -> Controller {
        use super::super::controller::ControllerConfig;
        use super::super::NodeId;
        let mut c = Controller::new(ControllerConfig::default(), &[NodeId(1)], &[]);
        let mut out = Vec::new();
        let heartbeat = Message::Heartbeat { broker: NodeId(1), incarnation: 1, lost: vec![], sent: ms(0) };
        c.handle_message(ms(0), NodeId(1), heartbeat, &mut out);
        let configs = configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        c.create_topic("t", n, 1, Partitioning::HashRange, configs, &mut out).expect("created");
        c
    }

    fn load(records_per_s: u64) -> Load {
        Load { records_per_s, ..Load::default() }
    }

    fn apply(c: &mut Controller, change: &Message) {
        let mut out = Vec::new();
        match change.clone() {
            Message::Split { topic, index, at } => c.split(&topic, index, at, &mut out).map(|_| ()),
            Message::Merge { topic, indexes } => c.merge(&topic, indexes, &mut out).map(|_| ()),
            other => panic!("not a resize: {other:?}"),
        }
        .expect("the controller takes it");
    }

    #[test]
    fn the_hottest_partition_splits_at_most_once_per_interval_and_cold_neighbours_merge() {
        let mut c = controller(4, &[(SPLIT_RECORDS, "1000"), (MERGE_RECORDS, "50"), (INTERVAL, "5000")]);
        let id = |c: &Controller, index: u32| c.topics()["t"].partition(index).expect("exists");
        let mut auto = AutoSplit::default();
        assert!(auto.decide(ms(0), &c).is_empty(), "no load known");
        // Partition 1 takes 5 times its neighbours' load, past the threshold.
        for (index, rate) in [(0, 400), (1, 2000), (2, 400), (3, 400)] {
            auto.note(ms(1000), id(&c, index), load(rate));
        }
        let changes = auto.decide(ms(1000), &c);
        assert_eq!(changes, vec![Message::Split { topic: "t".into(), index: 1, at: None }]);
        apply(&mut c, &changes[0]);
        // Its children are hot too, but the interval holds them back.
        auto.note(ms(2000), id(&c, 4), load(1500));
        assert!(auto.decide(ms(2000), &c).is_empty(), "rate limited");
        auto.note(ms(6000), id(&c, 4), load(1500));
        let changes = auto.decide(ms(6000), &c);
        assert!(matches!(&changes[..], [Message::Split { index: 4, .. }]), "{changes:?}");
        // A report older than three windows is forgotten.
        auto.note(ms(7000), id(&c, 5), load(5000));
        assert!(auto.decide(ms(11_001), &c).is_empty());
        // Two cold open neighbours merge (2 and 3; 0 is not 2's neighbour, 1's children lie
        // between them).
        for index in [0, 2, 3] {
            auto.note(ms(12_000), id(&c, index), load(10));
        }
        let changes = auto.decide(ms(12_000), &c);
        assert_eq!(changes, vec![Message::Merge { topic: "t".into(), indexes: [2, 3] }]);
        apply(&mut c, &changes[0]);
        // A topic without settings never changes by itself.
        let mut quiet = controller(2, &[]);
        let mut auto = AutoSplit::default();
        auto.note(ms(0), id(&quiet, 0), load(1_000_000));
        assert!(auto.decide(ms(0), &quiet).is_empty());
        apply(&mut quiet, &Message::Split { topic: "t".into(), index: 0, at: None });
    }

    #[test]
    fn splits_stop_at_the_open_partition_limit() {
        let c = controller(2, &[(SPLIT_RECORDS, "10"), (PARTITIONS_MAX, "2")]);
        let mut auto = AutoSplit::default();
        auto.note(ms(0), c.topics()["t"].partition(0).expect("exists"), load(1000));
        assert!(auto.decide(ms(0), &c).is_empty());
    }

    #[test]
    fn the_split_point_is_the_median_sampled_point_inside_the_range() {
        let range = KeyRange { from: b"b".to_vec(), to: Some(b"x".to_vec()) };
        let keys: Vec<Vec<u8>> = ["c", "d", "e", "f", "zz", "a"].iter().map(|k| k.as_bytes().to_vec()).collect();
        assert_eq!(split_point(Partitioning::KeyRange, &range, &keys), Some(b"e".to_vec()));
        assert_eq!(split_point(Partitioning::KeyRange, &range, &[b"b".to_vec()]), None, "at the range start");
        assert_eq!(split_point(Partitioning::KeyRange, &range, &[]), None);
        let full = KeyRange::full();
        let at = split_point(Partitioning::HashRange, &full, &[b"k1".to_vec(), b"k2".to_vec(), b"k3".to_vec()]);
        assert_eq!(at.map(|a| a.len()), Some(8), "a hash point");
    }
}
