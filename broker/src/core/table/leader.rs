//! What a table partition's leader does with a transaction's requests: the concurrency
//! control that lives on the leader (two-phase locking, SSI's read tracking, serial
//! execution's turn) around the partition's [`TableMachine`], which decides every commit at
//! its log position. Sans-IO: the runtime (`cluster::tables`) and the simulator drive the
//! same code.
//!
//! Call protocol (one partition, on the shard that leads it):
//! 1. A leader is built per leader epoch ([`PartitionLeader::new`]); a new epoch drops the old
//!    one, and with it every lock and read tracking: a transaction that had used it learns
//!    [`AbortReason::LeaderChanged`] at its next request (its request names a snapshot of
//!    this partition, which a first contact does not).
//! 2. [`PartitionLeader::read`], [`PartitionLeader::lock`] and [`PartitionLeader::commit`]
//!    answer [`Answer::Ready`], [`Answer::Aborted`] or [`Answer::Wait`]: the request waits
//!    until its transaction is in [`PartitionLeader::take_wakes`], then is asked again.
//! 3. A commit answered [`Decision::Append`] is appended (inside the producer's log
//!    transaction for a multi-partition one); once the machine applied it, its outcome goes
//!    to [`PartitionLeader::applied`]. Prepared parts end when their marker is applied:
//!    [`PartitionLeader::decided`] after every catch-up of the machine.
//! 4. [`PartitionLeader::expire`] on a timer ends transactions past their timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::locks::{Lock, LockTable, Mode};
use super::ssi::SsiTracker;
use super::store::{Outcome, TableMachine};
use super::{AbortReason, Key, Level, Part, Priority, Range, TxnId, Value};
use crate::core::replica::Plant;
use crate::core::{LeaderEpoch, Offset, Time};

/// Who asks: a transaction as its request describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnInfo {
    /// Its id.
    pub txn: TxnId,
    /// Its level.
    pub level: Level,
    /// Its wound-wait priority.
    pub priority: Priority,
    /// Its timeout from its first contact with this leader.
    pub timeout_ms: u32,
}

/// An answer, or why not now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<T> {
    /// Done.
    Ready(T),
    /// Waiting for a lock or the serial turn: ask again once woken.
    Wait,
    /// The transaction is over here.
    Aborted(AbortReason),
}

/// One row read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Its key.
    pub key: Key,
    /// Its value (None: absent or deleted).
    pub value: Option<Value>,
    /// The commit that wrote what was read (None: never written).
    pub version: Option<Offset>,
}

/// A read's rows and the offset they were read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Every version below it was visible.
    pub snapshot: Offset,
    /// The keys asked, in order, then the present rows of the range in key order.
    pub rows: Vec<Row>,
}

/// What a commit needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Append the part; the machine decides.
    Append,
    /// It writes nothing: committed here without a record.
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Active,
    /// Its record is being appended (never expired).
    Appending,
    /// Prepared inside a log transaction: its locks are kept until its marker.
    Prepared,
    /// Ended here; kept so its next request learns why.
    Ended(AbortReason),
}

#[derive(Clone, Debug)]
struct Live {
    level: Level,
    priority: Priority,
    deadline: Time,
    snapshot: Option<Offset>,
    phase: Phase,
    /// Holds (or waits for) the serial turn: exclusively (interactive) or shared (a procedure).
    turn: Option<TurnMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TurnMode {
    Shared,
    Exclusive,
}

/// Serial execution's turn on a partition: an interactive serial transaction runs alone
/// (exclusive); procedures, ordered by the log, share it with each other. First come, first
/// served, with wound-wait on interactive holders (`PartitionLeader::take_turn`); a
/// procedure is never aborted for it.
#[derive(Debug, Default)]
struct Turn {
    holders: BTreeSet<TxnId>,
    exclusive: bool,
    queue: VecDeque<(TxnId, TurnMode)>,
}

impl Turn {
    fn holds(&self, txn: TxnId) -> bool {
        self.holders.contains(&txn)
    }

    /// Takes the turn or queues for it; whether it is held.
    fn take(&mut self, txn: TxnId, mode: TurnMode) -> bool {
        if self.holds(txn) {
            return true;
        }
        if self.queue.iter().any(|(t, _)| *t == txn) {
            return false;
        }
        if self.queue.is_empty() && self.compatible(mode) {
            self.grant(txn, mode);
            return true;
        }
        self.queue.push_back((txn, mode));
        false
    }

    fn compatible(&self, mode: TurnMode) -> bool {
        self.holders.is_empty() || (mode == TurnMode::Shared && !self.exclusive)
    }

    fn grant(&mut self, txn: TxnId, mode: TurnMode) {
        self.holders.insert(txn);
        self.exclusive = mode == TurnMode::Exclusive;
    }

    /// Gives up the turn (or the place in the queue); the transactions granted it now.
    fn release(&mut self, txn: TxnId) -> Vec<TxnId> {
        self.queue.retain(|(t, _)| *t != txn);
        if !self.holders.remove(&txn) {
            return Vec::new();
        }
        if self.holders.is_empty() {
            self.exclusive = false;
        }
        let mut granted = Vec::new();
        while let Some(&(t, mode)) = self.queue.front() {
            if !self.compatible(mode) {
                break;
            }
            self.queue.pop_front();
            self.grant(t, mode);
            granted.push(t);
        }
        granted
    }
}

/// How long an ended transaction is remembered so its next request learns why.
const ENDED_KEEP_MS: u64 = 60_000;

/// The leader-side state of one table partition at one leader epoch.
#[derive(Debug)]
pub struct PartitionLeader {
    epoch: LeaderEpoch,
    locks: LockTable,
    ssi: SsiTracker,
    live: BTreeMap<TxnId, Live>,
    turn: Turn,
    wakes: Vec<TxnId>,
    /// Planted bugs (simulator only; default off): `snapshot_as_serializable`.
    plant: Plant,
}

impl PartitionLeader {
    /// A leader with nothing live, at `epoch`.
    pub fn new(epoch: LeaderEpoch) -> PartitionLeader {
        PartitionLeader {
            epoch,
            locks: LockTable::default(),
            ssi: SsiTracker::default(),
            live: BTreeMap::new(),
            turn: Turn::default(),
            wakes: Vec::new(),
            plant: Plant::default(),
        }
    }

    /// The leader with planted bugs (the simulator's `--plant snapshot-as-serializable`:
    /// serializable, SSI, 2PL and serial run as snapshot here, without locks, SSI tracking or
    /// turn); [`Plant::default`] plants nothing.
    pub fn with_plant(mut self, plant: Plant) -> PartitionLeader {
        self.plant = plant;
        self
    }

    /// The level whose leader-side rules apply to `level` (itself unless planted).
    fn rules(&self, level: Level) -> Level {
        if self.plant.snapshot_as_serializable && level != Level::ReadCommitted {
            Level::Snapshot
        } else {
            level
        }
    }

    /// The leader epoch it serves.
    pub fn epoch(&self) -> LeaderEpoch {
        self.epoch
    }

    /// Transactions live here (for metrics and tests).
    pub fn live(&self) -> usize {
        self.live.values().filter(|l| !matches!(l.phase, Phase::Ended(_))).count()
    }

    /// The transactions to wake (their waits may be over), drained.
    pub fn take_wakes(&mut self) -> Vec<TxnId> {
        std::mem::take(&mut self.wakes)
    }

    /// Admits a request of `info`: its live entry, a new one on first contact, or why not.
    /// `used` says the transaction used this partition before (it names a snapshot here):
    /// at a level whose guarantee lives on the leader, a leader that does not know it lost it.
    fn enter(&mut self, now: Time, info: &TxnInfo, used: bool) -> Result<(), AbortReason> {
        if let Some(l) = self.live.get(&info.txn) {
            return match l.phase {
                Phase::Ended(reason) => Err(reason),
                _ => Ok(()),
            };
        }
        if used && matches!(info.level, Level::TwoPl | Level::Serial | Level::Ssi) {
            return Err(AbortReason::LeaderChanged);
        }
        self.live.insert(
            info.txn,
            Live {
                level: info.level,
                priority: info.priority,
                deadline: now.plus_ms(u64::from(info.timeout_ms)),
                snapshot: None,
                phase: Phase::Active,
                turn: None,
            },
        );
        Ok(())
    }

    /// Takes `lock` in `mode` for `info`; false: waiting. Wounded younger holders are ended.
    fn acquire(&mut self, info: &TxnInfo, lock: Lock, mode: Mode) -> bool {
        let got = self.locks.acquire(info.priority, lock.clone(), mode);
        if got.granted || got.wounded.is_empty() {
            return got.granted;
        }
        for w in got.wounded {
            // A transaction whose part is being appended or is prepared is decided by the log
            // (its marker), not here: it keeps its locks and is waited for.
            let decided_by_log =
                self.live.get(&w).is_some_and(|l| matches!(l.phase, Phase::Appending | Phase::Prepared));
            if !decided_by_log {
                self.end(w, AbortReason::Wounded);
            }
        }
        // Releasing the wounded may have granted it the lock it waits for.
        let granted = self.locks.acquire(info.priority, lock, mode).granted;
        if granted {
            self.wakes.retain(|t| *t != info.txn);
        }
        granted
    }

    /// Takes the serial turn in `mode` for `info`; false: waiting. Wound-wait, as for locks:
    /// an older transaction ends the younger interactive holders still active (`wounded`), so
    /// two interactive serial transactions over two partitions, each holding one turn and
    /// asking for the other's, cannot wait for each other forever. A holder whose part is
    /// being appended or is prepared (procedures always) is decided by the log: waited for.
    fn take_turn(&mut self, info: &TxnInfo, mode: TurnMode) -> bool {
        if let Some(l) = self.live.get_mut(&info.txn) {
            l.turn = Some(mode);
        }
        if self.turn.take(info.txn, mode) {
            return true;
        }
        let wounded: Vec<TxnId> = self
            .turn
            .holders
            .iter()
            .copied()
            .filter(|h| self.live.get(h).is_some_and(|l| l.phase == Phase::Active && l.priority > info.priority))
            .collect();
        for w in wounded {
            self.end(w, AbortReason::Wounded);
        }
        // Releasing the wounded may have granted it the turn.
        let held = self.turn.holds(info.txn);
        if held {
            self.wakes.retain(|t| *t != info.txn);
        }
        held
    }

    /// Reads `keys` and `range` for `info` at its snapshot of this partition (`snapshot`
    /// None: the first read here, at the machine's latest applied offset).
    pub fn read(
        &mut self,
        now: Time,
        m: &TableMachine,
        info: &TxnInfo,
        snapshot: Option<Offset>,
        keys: &[Key],
        range: Option<&Range>,
    ) -> Answer<Rows> {
        if let Err(r) = self.enter(now, info, snapshot.is_some()) {
            return Answer::Aborted(r);
        }
        let level = self.rules(info.level);
        match level {
            Level::TwoPl => {
                for k in keys {
                    if !self.acquire(info, Lock::Key(k.clone()), Mode::Shared) {
                        return self.waiting(info.txn);
                    }
                }
                if let Some(r) = range {
                    if !self.acquire(info, Lock::Range(r.clone()), Mode::Shared) {
                        return self.waiting(info.txn);
                    }
                }
            }
            Level::Serial if !self.take_turn(info, TurnMode::Exclusive) => {
                return self.waiting(info.txn);
            }
            _ => {}
        }
        // A part prepared by another transaction holds its writes until its marker, though a
        // leader of a later epoch (or one that wounded it) holds no lock for them: a 2pl or
        // serial read waits for the marker rather than read the version it replaces.
        let locking = matches!(level, Level::TwoPl | Level::Serial);
        if locking
            && keys.iter().map(|k| Some(k.as_slice())).chain([None]).any(|k| m.prepared_write(info.txn, k, range))
        {
            return self.waiting(info.txn);
        }
        let live = self.live.get_mut(&info.txn).expect("entered");
        let at = if level.snapshot_reads() {
            *live.snapshot.get_or_insert(snapshot.unwrap_or(m.applied()))
        } else {
            live.snapshot.get_or_insert(m.applied());
            m.applied()
        };
        let mut rows = Vec::with_capacity(keys.len());
        for k in keys {
            let (version, value) = match m.get(k, at) {
                Some((v, value)) => (Some(v), value.map(<[u8]>::to_vec)),
                None => (None, None),
            };
            rows.push(Row { key: k.clone(), value, version });
        }
        if let Some(r) = range {
            for (k, v, value) in m.scan(r, at) {
                rows.push(Row { key: k.to_vec(), value: Some(value.to_vec()), version: Some(v) });
            }
        }
        if level == Level::Ssi {
            self.ssi.begin(info.txn, at);
            for k in keys {
                self.ssi.read(info.txn, k);
            }
            if let Some(r) = range {
                self.ssi.scan(info.txn, r);
            }
        }
        Answer::Ready(Rows { snapshot: at, rows })
    }

    fn waiting<T>(&mut self, txn: TxnId) -> Answer<T> {
        match self.live.get(&txn).map(|l| l.phase) {
            Some(Phase::Ended(r)) => Answer::Aborted(r),
            _ => Answer::Wait,
        }
    }

    /// Write intent on `keys` before a write: exclusive locks (2pl), the turn (serial); other
    /// levels take nothing here.
    pub fn lock(&mut self, now: Time, info: &TxnInfo, used: bool, keys: &[Key]) -> Answer<()> {
        if let Err(r) = self.enter(now, info, used) {
            return Answer::Aborted(r);
        }
        match self.rules(info.level) {
            Level::TwoPl => {
                for k in keys {
                    if !self.acquire(info, Lock::Key(k.clone()), Mode::Exclusive) {
                        return self.waiting(info.txn);
                    }
                }
            }
            Level::Serial if !self.take_turn(info, TurnMode::Exclusive) => {
                return self.waiting(info.txn);
            }
            _ => {}
        }
        Answer::Ready(())
    }

    /// The transaction's part here, to commit (or prepare): the leader-side checks of its
    /// level, then whether to append it. `used`: the transaction read here before.
    pub fn commit(&mut self, now: Time, m: &TableMachine, info: &TxnInfo, used: bool, part: &Part) -> Answer<Decision> {
        self.commit_part(now, m, info, used, part, false)
    }

    /// [`PartitionLeader::commit`] of a part inside a log transaction (a two-phase commit):
    /// a part that only reads is appended too, so the machine holds its reads (and this
    /// leader its locks) until the transaction's marker. Committed at once, its reads could
    /// be overwritten before the other partitions' parts commit: a write skew across
    /// partitions (simulator seed 12 of `skein-sim --tables`, serializable).
    pub fn commit_in_txn(
        &mut self,
        now: Time,
        m: &TableMachine,
        info: &TxnInfo,
        used: bool,
        part: &Part,
    ) -> Answer<Decision> {
        self.commit_part(now, m, info, used, part, true)
    }

    fn commit_part(
        &mut self,
        now: Time,
        m: &TableMachine,
        info: &TxnInfo,
        used: bool,
        part: &Part,
        in_txn: bool,
    ) -> Answer<Decision> {
        if let Err(r) = self.enter(now, info, used) {
            return Answer::Aborted(r);
        }
        if let Some(l) = self.live.get(&info.txn) {
            if l.phase != Phase::Active {
                // A retried commit while the first is appending or prepared: nothing new.
                return Answer::Aborted(AbortReason::Prepared);
            }
        }
        let written: Vec<Key> = part.written_keys().into_iter().map(<[u8]>::to_vec).collect();
        let level = self.rules(info.level);
        match level {
            Level::TwoPl => {
                for k in &written {
                    if !self.acquire(info, Lock::Key(k.clone()), Mode::Exclusive) {
                        return self.waiting(info.txn);
                    }
                }
            }
            Level::Serial => {
                // An interactive transaction holds the turn already; a procedure shares it
                // with other procedures while it is appended.
                let mode = if part.steps.is_empty() || self.turn.holds(info.txn) {
                    TurnMode::Exclusive
                } else {
                    TurnMode::Shared
                };
                if !self.take_turn(info, mode) {
                    return self.waiting(info.txn);
                }
            }
            Level::Ssi => {
                self.ssi.begin(info.txn, part.snapshot);
                if let Err(r) = self.ssi.check_commit(info.txn, &written) {
                    self.end(info.txn, r);
                    return Answer::Aborted(r);
                }
            }
            _ => {}
        }
        // The log decides; a part the machine would refuse now fails fast (nothing changes
        // between this check and the append that could make it valid again).
        if let Err(r) = m.validate(part) {
            self.end(info.txn, r);
            return Answer::Aborted(r);
        }
        // Inside a log transaction a part that reads is appended even without writes.
        let appended = part.writes_anything() || (in_txn && (!part.reads.is_empty() || !part.ranges.is_empty()));
        if !appended {
            if level == Level::Ssi {
                self.ssi.committed(info.txn, m.applied());
            }
            self.finish(info.txn);
            return Answer::Ready(Decision::Nothing);
        }
        if let Some(l) = self.live.get_mut(&info.txn) {
            l.phase = Phase::Appending;
        }
        Answer::Ready(Decision::Append)
    }

    /// The machine's outcome for a part this leader appended (None: the append failed).
    pub fn applied(&mut self, txn: TxnId, outcome: Option<&Outcome>) {
        match outcome {
            Some(Outcome::Committed { offset, .. }) => {
                self.ssi.committed(txn, *offset);
                self.finish(txn);
            }
            Some(Outcome::Prepared { .. }) => {
                if let Some(l) = self.live.get_mut(&txn) {
                    l.phase = Phase::Prepared;
                }
            }
            Some(Outcome::Aborted(r)) => self.end(txn, *r),
            None => self.end(txn, AbortReason::LeaderChanged),
        }
    }

    /// Ends the prepared parts whose marker the machine applied since the last call.
    pub fn decided(&mut self, m: &TableMachine) {
        let prepared: Vec<TxnId> =
            self.live.iter().filter(|(_, l)| l.phase == Phase::Prepared).map(|(t, _)| *t).collect();
        for txn in prepared {
            match m.outcome(txn) {
                Some(Outcome::Committed { offset, .. }) => {
                    self.ssi.committed(txn, *offset);
                    self.finish(txn);
                }
                Some(Outcome::Aborted(_)) => {
                    self.ssi.abort(txn);
                    self.finish(txn);
                }
                _ => {}
            }
        }
    }

    /// The client ended the transaction without committing it here.
    pub fn abort(&mut self, txn: TxnId) {
        match self.live.get(&txn).map(|l| l.phase) {
            // Its marker decides a prepared part; an append in flight finishes on its own.
            Some(Phase::Prepared | Phase::Appending) => {}
            Some(_) => {
                self.end(txn, AbortReason::User);
                self.live.remove(&txn);
            }
            None => {}
        }
    }

    /// Ends the active transactions past their timeout and forgets long-ended ones.
    pub fn expire(&mut self, now: Time) {
        let late: Vec<TxnId> =
            self.live.iter().filter(|(_, l)| l.phase == Phase::Active && now >= l.deadline).map(|(t, _)| *t).collect();
        for txn in late {
            self.end(txn, AbortReason::Timeout);
        }
        self.live.retain(|_, l| !(matches!(l.phase, Phase::Ended(_)) && now >= l.deadline.plus_ms(ENDED_KEEP_MS)));
        self.ssi.gc();
    }

    /// The transaction is over here for `reason`: its locks and turn go, and a request of its
    /// waiting learns why.
    fn end(&mut self, txn: TxnId, reason: AbortReason) {
        self.release(txn);
        self.ssi.abort(txn);
        if let Some(l) = self.live.get_mut(&txn) {
            l.phase = Phase::Ended(reason);
        }
        self.wakes.push(txn);
    }

    /// The transaction committed here: forgotten, its locks and turn released.
    fn finish(&mut self, txn: TxnId) {
        self.release(txn);
        self.live.remove(&txn);
    }

    fn release(&mut self, txn: TxnId) {
        let granted = self.locks.release_all(txn);
        self.wakes.extend(granted);
        let turned = self.turn.release(txn);
        self.wakes.extend(turned);
        if let Some(l) = self.live.get_mut(&txn) {
            l.turn = None;
        }
    }

    /// The oldest snapshot a live transaction reads at (versions it can see must stay).
    pub fn oldest_snapshot(&self) -> Option<Offset> {
        self.live.values().filter(|l| !matches!(l.phase, Phase::Ended(_))).filter_map(|l| l.snapshot).min()
    }

    /// Every live transaction's level and priority (for tests and describe).
    pub fn transactions(&self) -> Vec<(TxnId, Level, Priority)> {
        self.live.iter().map(|(t, l)| (*t, l.level, l.priority)).collect()
    }
}

#[cfg(test)]
mod tests;
