//! The byte pools that bound what requests make the broker hold, and one fetch's share.
//!
//! Memory a request makes the broker hold is bounded by configuration, not by the request:
//! produce bytes count against `--max-produce-bytes` and fetch record bytes against
//! `--max-fetch-bytes` ([`Budgets`], one per shard; cluster mode: one per broker) through
//! holds ([`PoolHold`]) that give the bytes back when dropped, so a request task dropped
//! mid-await (its connection failed) releases them too. A fetch reads partitions in request
//! order against what is left of its own budget ([`FetchBudget`]), sizing each range before
//! reading it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::BrokerConfig;

/// The byte pools that bound what requests hold in memory on one shard (cluster mode: on the
/// broker): produce bytes being appended or awaiting their answers, and fetch record bytes
/// being read or assembled.
pub(crate) struct Budgets {
    /// `--max-produce-bytes`: past it, produce entries get THROTTLED.
    pub produce: BytePool,
    /// `--max-fetch-bytes`: past it, fetches read no more records (and wait, or get less).
    pub fetch: BytePool,
}

impl Budgets {
    pub(crate) fn new(config: &BrokerConfig) -> Budgets {
        Budgets { produce: BytePool::new(config.max_produce_bytes), fetch: BytePool::new(config.max_fetch_bytes) }
    }
}

/// Bytes in use against a limit. The count is shared with the holds taken from the pool,
/// which may be dropped on another shard's thread (a fetch's records travel to the shard
/// that asked for them), hence an atomic.
#[derive(Clone)]
pub(crate) struct BytePool {
    used: Arc<AtomicU64>,
    limit: u64,
}

impl BytePool {
    pub(crate) fn new(limit: u64) -> BytePool {
        BytePool { used: Arc::new(AtomicU64::new(0)), limit }
    }

    /// Bytes that may still be taken before the pool is full.
    pub(crate) fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used.load(Ordering::Relaxed))
    }

    /// Takes `bytes` if they fit under the limit; `None` if not (nothing taken).
    pub(crate) fn try_hold(&self, bytes: u64) -> Option<PoolHold> {
        let fits = |used: u64| used.checked_add(bytes).filter(|u| *u <= self.limit);
        self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits).ok()?;
        Some(PoolHold { used: self.used.clone(), bytes })
    }

    /// A hold of nothing yet, grown with [`PoolHold::add`].
    fn empty_hold(&self) -> PoolHold {
        PoolHold { used: self.used.clone(), bytes: 0 }
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes taken from a [`BytePool`], given back when the hold is dropped: on every path,
/// including a request future dropped unfinished.
pub(crate) struct PoolHold {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl PoolHold {
    /// Takes `bytes` more, past the pool's limit if need be (the caller bounds by how much).
    fn add(&mut self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.bytes += bytes;
    }
}

impl Drop for PoolHold {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One fetch's read budget on one shard, spent as its partitions are read in request order:
/// the request's `max_bytes` (0 counts as 1) capped at `--max-fetch-bytes`, drawn from the
/// shard's fetch pool, which every response being built shares.
///
/// Per partition: [`FetchBudget::limit`] gives the byte limit to read with (the partition's
/// `partition_max_bytes` clamped to what is left), or `None` (read no records: the budget is
/// spent or the pool is full); the caller sizes the range that limit gives without reading it
/// and asks [`FetchBudget::fits`]; then hands what it read to [`FetchBudget::take`]. The first
/// partition with records gets at least one whole batch even past both limits (so a consumer
/// always progresses; the pool overshoots by at most that batch, since a full pool stops
/// every later read); later partitions get only what fits. Duplicate entries share the
/// budget like any others. The bytes taken stay counted in the pool until the budget drops.
pub(crate) struct FetchBudget {
    pool: BytePool,
    /// Bytes the response may still take.
    left: u64,
    /// Some partition's records were taken: later ones must fit.
    taken: bool,
    /// A read was skipped or cut short because the pool was full: records may be there.
    pub(crate) starved: bool,
    hold: PoolHold,
}

impl FetchBudget {
    pub(crate) fn new(max_bytes: u32, pool: &BytePool) -> FetchBudget {
        let left = u64::from(max_bytes.max(1)).min(pool.limit.max(1));
        FetchBudget { pool: pool.clone(), left, taken: false, starved: false, hold: pool.empty_hold() }
    }

    /// The byte limit for the next partition's read, or `None`: read no records for it.
    pub(crate) fn limit(&mut self, partition_max_bytes: u32) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        let wanted = u64::from(partition_max_bytes.max(1)).min(self.left);
        let available = self.pool.available();
        if available < wanted {
            self.starved = true;
        }
        let limit = wanted.min(available);
        (limit > 0).then(|| u32::try_from(limit).expect("at most partition_max_bytes"))
    }

    /// Whether a range of `bytes`, found with the limit [`FetchBudget::limit`] gave, may be
    /// read (it is larger than that limit only when its first batch is).
    pub(crate) fn fits(&mut self, bytes: u64) -> bool {
        if !self.taken || bytes <= self.left.min(self.pool.available()) {
            return true;
        }
        if bytes <= self.left {
            self.starved = true;
        }
        false
    }

    /// Counts the records read for a partition against the budget and the pool. Records the
    /// budget has no room for (a read not sized first) are dropped here.
    pub(crate) fn take(&mut self, records: &mut Vec<u8>) {
        let bytes = records.len() as u64;
        if bytes == 0 {
            return;
        }
        if !self.fits(bytes) {
            *records = Vec::new();
            return;
        }
        self.taken = true;
        self.left = self.left.saturating_sub(bytes);
        self.hold.add(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads partitions `(partition_max_bytes, bytes there, batch bytes)` in order with a
    /// fresh budget, as the shards do (a read returns all the bytes there if under its limit,
    /// else whole batches up to it, at least one); the bytes each read returned, and the
    /// budget (holding them).
    fn check(max_bytes: u32, pool: &BytePool, parts: &[(u32, u64, u64)]) -> (Vec<u64>, FetchBudget) {
        let mut budget = FetchBudget::new(max_bytes, pool);
        let mut got = Vec::new();
        for &(partition_max_bytes, size, batch) in parts {
            let Some(limit) = budget.limit(partition_max_bytes) else {
                got.push(0);
                continue;
            };
            let range = if size <= u64::from(limit) { size } else { (u64::from(limit) / batch).max(1) * batch };
            if !budget.fits(range) {
                got.push(0);
                continue;
            }
            let mut records = vec![0u8; range as usize];
            budget.take(&mut records);
            got.push(records.len() as u64);
        }
        (got, budget)
    }

    #[test]
    fn a_fetch_reads_no_more_than_its_budget_plus_the_first_batch() {
        let pool = BytePool::new(1 << 20);
        // The same partition four times, max_bytes 100, partition_max_bytes huge: the first
        // entry takes 100, the others share what is left (nothing).
        let (got, budget) = check(100, &pool, &[(u32::MAX, 1000, 10); 4]);
        assert_eq!(got, vec![100, 0, 0, 0]);
        assert_eq!(pool.used(), 100);
        drop(budget);
        assert_eq!(pool.used(), 0, "given back on drop");
        // A first batch larger than the budget is still read, and spends it all.
        let (got, _b) = check(100, &pool, &[(u32::MAX, 500, 500), (u32::MAX, 80, 80), (u32::MAX, 50, 50)]);
        assert_eq!(got, vec![500, 0, 0]);
        // A later partition whose first batch does not fit what is left is not read; a later,
        // smaller one still is.
        let (got, _b) = check(100, &pool, &[(u32::MAX, 60, 60), (u32::MAX, 80, 80), (u32::MAX, 30, 30)]);
        assert_eq!(got, vec![60, 0, 30]);
        // partition_max_bytes clamps each read; 0 counts as 1 (a whole first batch).
        let (got, _b) = check(100, &pool, &[(20, 1000, 10), (0, 1000, 10)]);
        assert_eq!(got, vec![20, 10]);
        // max_bytes 0 counts as 1: one batch.
        let (got, _b) = check(0, &pool, &[(u32::MAX, 1000, 10), (u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![10, 0]);
    }

    #[test]
    fn a_full_pool_starves_later_fetches_and_a_request_is_capped_at_the_pool() {
        let pool = BytePool::new(100);
        let (got, first) = check(u32::MAX, &pool, &[(u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![100], "max_bytes capped at the pool");
        assert!(!first.starved);
        let (got, second) = check(1000, &pool, &[(u32::MAX, 1000, 10), (u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![0, 0]);
        assert!(second.starved, "records were there but the pool was full");
        drop((first, second));
        let (got, _b) = check(1000, &pool, &[(u32::MAX, 1000, 10)]);
        assert_eq!(got, vec![100], "the pool came back");
    }

    #[test]
    fn produce_holds_fit_under_the_limit_and_come_back_on_drop() {
        let pool = BytePool::new(100);
        let a = pool.try_hold(60).expect("fits");
        assert!(pool.try_hold(41).is_none(), "past the limit");
        let b = pool.try_hold(40).expect("exactly fills it");
        assert_eq!(pool.available(), 0);
        drop((a, b));
        assert_eq!(pool.used(), 0);
        assert!(pool.try_hold(101).is_none(), "larger than the pool: never");
    }
}
