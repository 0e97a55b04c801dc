//! The transaction coordinator: a state machine fed by the committed records of one
//! `__transaction_state` partition, the shape of the group coordinator ([`LogMachine`]).
//!
//! A transactional id hashes to a partition ([`super::group::partition_for`]); the leader of
//! that partition coordinates it. Its record (key: the id, value: the whole [`TxnMeta`] as
//! JSON) is rewritten at every change, so applying a record is replacing one entry.
//!
//! Call protocol (one partition, on the shard that leads it; requests run one at a time):
//! 1. On becoming leader: a new machine fed every committed record (or a snapshot and the tail);
//!    [`TxnCoordinator::start_timers`]; then [`TxnCoordinator::unfinished`] names the ids
//!    left in a prepare state by the previous leader, which the driver completes.
//! 2. A request computes, without changing the machine, the record to write; the driver
//!    appends it (`acks=all`) and applies it from the log. [`TxnCoordinator::completion`]
//!    gives the markers a prepared transaction still needs and the record that completes it;
//!    the driver sends the markers ([`super::MarkerRequest`]) until each partition answered
//!    and then writes the completing record.
//! 3. [`TxnCoordinator::expired`] on a timer: open transactions past their timeout are
//!    aborted like an admin abort ([`TxnCoordinator::abort`]).
//!
//! Epochs (Kafka's KIP-890 part 2): every transaction runs at its own producer epoch. The
//! markers carry it, and completing the transaction bumps the epoch the producer is told for
//! the next one, so a delayed write, begin or end of a finished transaction is fenced at every
//! partition and at the coordinator. A fresh `init` bumps it too (fencing older instances) and
//! aborts the transaction an older instance left open.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use skein_client::wire::{DescribeTransactionResponse, ErrorCode, ListedTransaction, TopicPartition};

use super::machine::{LogMachine, RecordError};
use super::txn_partition::MarkerKind;
use super::{Offset, ProducerId, Time};

/// The internal topic holding transaction states.
pub const TXN_TOPIC: &str = "__transaction_state";
/// A transaction's timeout when the producer names none.
pub const DEFAULT_TIMEOUT_MS: u32 = 60_000;
/// The longest timeout a producer may ask for (Kafka's `transaction.max.timeout.ms`).
pub const MAX_TIMEOUT_MS: u32 = 900_000;
/// The longest transactional id accepted.
pub const ID_BYTES_MAX: usize = 255;
/// Most partitions in one transaction.
pub const PARTITIONS_MAX: usize = 10_000;

/// A partition of a topic.
pub type Tp = (String, u32);

/// Where a transactional id is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Initialized, no transaction open.
    Empty,
    /// A transaction is open: partitions were added.
    Ongoing,
    /// Decided to commit; markers being written.
    PrepareCommit,
    /// Decided to abort; markers being written.
    PrepareAbort,
    /// The last transaction committed everywhere.
    CompleteCommit,
    /// The last transaction aborted everywhere.
    CompleteAbort,
}

impl TxnState {
    /// The name tools show.
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "empty",
            TxnState::Ongoing => "ongoing",
            TxnState::PrepareCommit => "prepare_commit",
            TxnState::PrepareAbort => "prepare_abort",
            TxnState::CompleteCommit => "complete_commit",
            TxnState::CompleteAbort => "complete_abort",
        }
    }

    fn ended(self) -> bool {
        matches!(self, TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort)
    }
}

/// A transactional id's state, as its record holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnMeta {
    /// The id's producer id (kept across instances).
    pub producer_id: i64,
    /// In `Empty`/`Ongoing`/`Prepare*`: the epoch of the current transaction; in
    /// `Complete*`: the epoch the producer uses next (bumped by the completion).
    pub epoch: i16,
    /// The state.
    pub state: TxnState,
    /// The partitions of the current (or last) transaction.
    pub partitions: BTreeSet<Tp>,
    /// Timeout of each transaction.
    pub timeout_ms: u32,
    /// Wall clock (ms) when the current transaction started (0: none open).
    pub started_ms: u64,
    /// Why the coordinator (not the producer) aborted the last transaction: a timeout, an
    /// admin abort, or a new instance; its producer is fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_by: Option<String>,
}

/// One `__transaction_state` record: the whole state of one id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// The transactional id.
    pub id: String,
    /// Its state.
    pub meta: TxnMeta,
}

impl TxnRecord {
    /// Key (the id) and value (JSON) for the log.
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        (self.id.as_bytes().to_vec(), serde_json::to_vec(self).expect("a transaction record serializes"))
    }

    /// Decodes a record's value.
    pub fn decode(offset: Offset, value: &[u8]) -> Result<TxnRecord, RecordError> {
        serde_json::from_slice(value).map_err(|e| RecordError { offset: offset.0, reason: e.to_string() })
    }
}

/// A refusal: the error code and a message for the client.
pub type Refusal = (ErrorCode, String);

/// What `init` asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitStep {
    /// Write this record and answer with its producer id and epoch.
    Done(TxnRecord),
    /// An earlier instance's transaction is open or being decided: write this record (if
    /// any: the abort decision), complete the transaction, then call `init` again.
    FinishFirst(Option<TxnRecord>),
}

/// What `end` asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndStep {
    /// Write this record; if it prepares, complete the transaction; then answer with the
    /// epoch the id holds.
    Write(TxnRecord),
    /// The transaction is being decided as asked (a retried end): complete it, then answer.
    Complete,
    /// Already done (a retried end whose answer was lost): answer with this producer id and
    /// epoch.
    Done(i64, i16),
}

/// The markers a prepared transaction still needs and the record that completes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The transaction's producer.
    pub producer: ProducerId,
    /// The epoch the markers carry.
    pub epoch: i16,
    /// Commit or abort.
    pub kind: MarkerKind,
    /// Where.
    pub partitions: Vec<Tp>,
    /// Written once every partition holds its marker.
    pub record: TxnRecord,
}

/// The coordinator of the transactional ids hashed to one `__transaction_state` partition.
#[derive(Debug, Default)]
pub struct TxnCoordinator {
    ids: BTreeMap<String, TxnMeta>,
    /// Timeout deadlines of open transactions: liveness, not in the log (a new coordinator
    /// gives each a full timeout from when it loaded).
    deadlines: HashMap<String, Time>,
    applied: Offset,
    /// Planted bug (simulator): no epoch bump per transaction.
    no_epoch_bump: bool,
}

impl LogMachine for TxnCoordinator {
    fn apply(&mut self, offset: Offset, _key: &[u8], value: &[u8]) -> Result<(), RecordError> {
        self.applied = Offset(offset.0 + 1);
        let record = TxnRecord::decode(offset, value)?;
        self.apply_record(record);
        Ok(())
    }

    fn apply_marker(&mut self, offset: Offset, _producer: ProducerId, _kind: MarkerKind) {
        self.applied = Offset(offset.0 + 1);
    }

    fn applied(&self) -> Offset {
        self.applied
    }
}

/// Checks a transactional id.
pub fn check_id(id: &str) -> Result<(), Refusal> {
    if id.is_empty() || id.len() > ID_BYTES_MAX {
        return Err((ErrorCode::INVALID_REQUEST, format!("a transactional id is 1 to {ID_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn fenced(id: &str, meta: &TxnMeta, epoch: i16) -> Refusal {
    let why = meta.aborted_by.as_deref().map(|w| format!(" (its transaction was aborted: {w})")).unwrap_or_default();
    (
        ErrorCode::PRODUCER_FENCED,
        format!("producer epoch {epoch} of '{id}' is fenced: the id is at epoch {}{why}", meta.epoch),
    )
}

impl TxnCoordinator {
    /// An empty machine; `no_epoch_bump` plants the bug KIP-890 part 2 fixed.
    pub fn new(no_epoch_bump: bool) -> TxnCoordinator {
        TxnCoordinator { no_epoch_bump, ..TxnCoordinator::default() }
    }

    /// Applies one committed record.
    pub fn apply_record(&mut self, record: TxnRecord) {
        if record.meta.state != TxnState::Ongoing {
            self.deadlines.remove(&record.id);
        }
        self.ids.insert(record.id, record.meta);
    }

    /// The state of one id.
    pub fn get(&self, id: &str) -> Option<&TxnMeta> {
        self.ids.get(id)
    }

    /// Every id and its state.
    pub fn all(&self) -> impl Iterator<Item = (&String, &TxnMeta)> {
        self.ids.iter()
    }

    /// Starts (or keeps) a timeout for every open transaction from `now` (on becoming leader,
    /// and after each write that opened one).
    pub fn start_timers(&mut self, now: Time) {
        for (id, m) in &self.ids {
            if m.state == TxnState::Ongoing {
                self.deadlines.entry(id.clone()).or_insert(now.plus_ms(u64::from(m.timeout_ms)));
            }
        }
    }

    /// Open transactions whose timeout passed.
    pub fn expired(&self, now: Time) -> Vec<String> {
        self.deadlines.iter().filter(|(_, d)| **d <= now).map(|(id, _)| id.clone()).collect()
    }

    /// Ids left in a prepare state (their markers may be missing): the driver completes them.
    pub fn unfinished(&self) -> Vec<String> {
        self.ids
            .iter()
            .filter(|(_, m)| matches!(m.state, TxnState::PrepareCommit | TxnState::PrepareAbort))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn bump(&self, epoch: i16) -> i16 {
        if self.no_epoch_bump {
            epoch
        } else {
            epoch.saturating_add(1)
        }
    }

    /// InitProducerId for `id`: a new producer id (from `new_producer`) the first time, else
    /// the id's producer id at a new epoch. `wall_ms`: the wall clock.
    pub fn init(
        &self,
        id: &str,
        timeout_ms: u32,
        new_producer: impl FnOnce() -> Option<i64>,
    ) -> Result<InitStep, Refusal> {
        check_id(id)?;
        let timeout_ms = match timeout_ms {
            0 => DEFAULT_TIMEOUT_MS,
            t if t > MAX_TIMEOUT_MS => {
                return Err((
                    ErrorCode::INVALID_TRANSACTION_TIMEOUT,
                    format!("transaction timeout {t} ms is above the broker's maximum {MAX_TIMEOUT_MS} ms"),
                ))
            }
            t => t,
        };
        let fresh = |producer_id| TxnMeta {
            producer_id,
            epoch: 0,
            state: TxnState::Empty,
            partitions: BTreeSet::new(),
            timeout_ms,
            started_ms: 0,
            aborted_by: None,
        };
        let Some(meta) = self.ids.get(id) else {
            let pid = new_producer().ok_or((ErrorCode::STORAGE_ERROR, "allocating a producer id failed".into()))?;
            return Ok(InitStep::Done(TxnRecord { id: id.into(), meta: fresh(pid) }));
        };
        match meta.state {
            TxnState::Ongoing => {
                let mut m = meta.clone();
                m.state = TxnState::PrepareAbort;
                m.aborted_by = Some("a new producer instance initialized the id".into());
                Ok(InitStep::FinishFirst(Some(TxnRecord { id: id.into(), meta: m })))
            }
            TxnState::PrepareAbort | TxnState::PrepareCommit => Ok(InitStep::FinishFirst(None)),
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                // Every init fences the instances before it (an epoch bump even with the
                // planted bug, as in Kafka before KIP-890).
                if meta.epoch >= i16::MAX - 1 {
                    let pid =
                        new_producer().ok_or((ErrorCode::STORAGE_ERROR, "allocating a producer id failed".into()))?;
                    return Ok(InitStep::Done(TxnRecord { id: id.into(), meta: fresh(pid) }));
                }
                let mut m = meta.clone();
                m.epoch += 1;
                m.state = TxnState::Empty;
                m.partitions.clear();
                m.timeout_ms = timeout_ms;
                m.started_ms = 0;
                m.aborted_by = None;
                Ok(InitStep::Done(TxnRecord { id: id.into(), meta: m }))
            }
        }
    }

    fn producer_check(&self, id: &str, producer_id: i64) -> Result<&TxnMeta, Refusal> {
        check_id(id)?;
        let meta = self
            .ids
            .get(id)
            .ok_or_else(|| (ErrorCode::INVALID_PRODUCER_ID_MAPPING, format!("no producer initialized '{id}'")))?;
        if meta.producer_id != producer_id {
            return Err((
                ErrorCode::INVALID_PRODUCER_ID_MAPPING,
                format!("producer id {producer_id} is not the one of '{id}' ({})", meta.producer_id),
            ));
        }
        Ok(meta)
    }

    /// AddPartitionsToTxn: the record to write (`None`: nothing new) and the partitions whose
    /// `Begin` markers the driver then writes (all requested ones: a retry writes again any
    /// whose marker may be missing; partitions take duplicates as done).
    pub fn add_partitions(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[Tp],
        wall_ms: u64,
    ) -> Result<Option<TxnRecord>, Refusal> {
        let meta = self.producer_check(id, producer_id)?;
        if epoch != meta.epoch {
            return Err(fenced(id, meta, epoch));
        }
        let mut m = meta.clone();
        match meta.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                return Err((ErrorCode::CONCURRENT_TRANSACTIONS, format!("the transaction of '{id}' is being decided")))
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                m.state = TxnState::Ongoing;
                m.partitions.clear();
                m.started_ms = wall_ms;
                m.aborted_by = None;
            }
            TxnState::Ongoing => {}
        }
        m.partitions.extend(partitions.iter().cloned());
        if m.partitions.len() > PARTITIONS_MAX {
            return Err((
                ErrorCode::INVALID_REQUEST,
                format!("a transaction holds at most {PARTITIONS_MAX} partitions"),
            ));
        }
        Ok((m != *meta).then(|| TxnRecord { id: id.into(), meta: m }))
    }

    /// EndTxn: commit (`commit`) or abort the id's transaction at `epoch`.
    pub fn end(&self, id: &str, producer_id: i64, epoch: i16, commit: bool) -> Result<EndStep, Refusal> {
        let meta = self.producer_check(id, producer_id)?;
        let (prepare, complete) = if commit {
            (TxnState::PrepareCommit, TxnState::CompleteCommit)
        } else {
            (TxnState::PrepareAbort, TxnState::CompleteAbort)
        };
        let kind = if commit { "commit" } else { "abort" };
        // A retry of an end that completed: the epoch the producer held is one below the
        // bumped one (equal with the planted bug).
        let previous = if self.no_epoch_bump { meta.epoch } else { meta.epoch.saturating_sub(1) };
        match meta.state {
            s if s == complete && epoch == previous && (s != TxnState::CompleteAbort || meta.aborted_by.is_none()) => {
                return Ok(EndStep::Done(meta.producer_id, meta.epoch));
            }
            // The producer's own abort of a transaction the coordinator aborted already.
            TxnState::CompleteAbort if !commit && epoch == previous => {
                return Ok(EndStep::Done(meta.producer_id, meta.epoch));
            }
            _ => {}
        }
        if epoch != meta.epoch {
            return Err(fenced(id, meta, epoch));
        }
        match meta.state {
            TxnState::Ongoing => {
                let mut m = meta.clone();
                m.state = prepare;
                Ok(EndStep::Write(TxnRecord { id: id.into(), meta: m }))
            }
            s if s == prepare => Ok(EndStep::Complete),
            TxnState::PrepareCommit | TxnState::PrepareAbort => Err((
                ErrorCode::INVALID_TXN_STATE,
                format!("cannot {kind} '{id}': its transaction is being decided the other way"),
            )),
            // No partition was added: nothing to mark, the end only moves the epoch on.
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                let mut m = meta.clone();
                m.state = complete;
                m.epoch = self.bump(m.epoch);
                m.partitions.clear();
                m.started_ms = 0;
                m.aborted_by = None;
                Ok(EndStep::Write(TxnRecord { id: id.into(), meta: m }))
            }
        }
    }

    /// An abort the coordinator decides (timeout, admin, a new instance): the record that
    /// prepares it, `None` when no transaction is open.
    pub fn abort(&self, id: &str, why: &str) -> Result<Option<TxnRecord>, Refusal> {
        check_id(id)?;
        let meta = self
            .ids
            .get(id)
            .ok_or_else(|| (ErrorCode::TRANSACTIONAL_ID_NOT_FOUND, format!("no transactional id '{id}'")))?;
        if meta.state != TxnState::Ongoing {
            return Ok(None);
        }
        let mut m = meta.clone();
        m.state = TxnState::PrepareAbort;
        m.aborted_by = Some(why.into());
        Ok(Some(TxnRecord { id: id.into(), meta: m }))
    }

    /// The markers a prepared transaction of `id` needs and its completing record (`None`
    /// when it is not prepared).
    pub fn completion(&self, id: &str) -> Option<Completion> {
        let meta = self.ids.get(id)?;
        let (kind, done) = match meta.state {
            TxnState::PrepareCommit => (MarkerKind::Commit, TxnState::CompleteCommit),
            TxnState::PrepareAbort => (MarkerKind::Abort, TxnState::CompleteAbort),
            _ => return None,
        };
        let mut m = meta.clone();
        m.state = done;
        m.epoch = self.bump(m.epoch);
        m.started_ms = 0;
        Some(Completion {
            producer: ProducerId(meta.producer_id),
            epoch: meta.epoch,
            kind,
            partitions: meta.partitions.iter().cloned().collect(),
            record: TxnRecord { id: id.into(), meta: m },
        })
    }

    /// ListTransactions' entries. `wall_ms`: the wall clock.
    pub fn list(&self, wall_ms: u64) -> Vec<ListedTransaction> {
        self.ids
            .iter()
            .map(|(id, m)| ListedTransaction {
                transactional_id: id.clone(),
                producer_id: m.producer_id,
                producer_epoch: m.epoch,
                state: m.state.name().into(),
                age_ms: age(m, wall_ms),
            })
            .collect()
    }

    /// DescribeTransaction's answer.
    pub fn describe(&self, id: &str, wall_ms: u64) -> Result<DescribeTransactionResponse, Refusal> {
        check_id(id)?;
        let m = self
            .ids
            .get(id)
            .ok_or_else(|| (ErrorCode::TRANSACTIONAL_ID_NOT_FOUND, format!("no transactional id '{id}'")))?;
        Ok(DescribeTransactionResponse {
            error: ErrorCode::NONE,
            message: String::new(),
            transactional_id: id.into(),
            producer_id: m.producer_id,
            producer_epoch: m.epoch,
            state: m.state.name().into(),
            timeout_ms: m.timeout_ms,
            age_ms: age(m, wall_ms),
            partitions: m.partitions.iter().map(|(t, p)| TopicPartition { topic: t.clone(), partition: *p }).collect(),
        })
    }

    /// The machine's state at [`LogMachine::applied`] as bytes for a snapshot file.
    pub fn snapshot(&self) -> Vec<u8> {
        let snap = Snapshot { version: 1, applied: self.applied.0, ids: self.ids.clone() };
        serde_json::to_vec(&snap).expect("a transaction snapshot serializes")
    }

    /// A machine from [`TxnCoordinator::snapshot`]'s bytes.
    pub fn restore(bytes: &[u8], no_epoch_bump: bool) -> Result<TxnCoordinator, RecordError> {
        let snap: Snapshot =
            serde_json::from_slice(bytes).map_err(|e| RecordError { offset: 0, reason: e.to_string() })?;
        if snap.version != 1 {
            return Err(RecordError { offset: snap.applied, reason: format!("snapshot version {}", snap.version) });
        }
        Ok(TxnCoordinator { ids: snap.ids, deadlines: HashMap::new(), applied: Offset(snap.applied), no_epoch_bump })
    }

    /// Whether an id is in a state where nothing is open or deciding.
    pub fn settled(&self, id: &str) -> bool {
        self.ids.get(id).is_none_or(|m| m.state.ended())
    }
}

fn age(m: &TxnMeta, wall_ms: u64) -> u64 {
    if m.started_ms == 0 || m.state.ended() {
        0
    } else {
        wall_ms.saturating_sub(m.started_ms)
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    applied: u64,
    ids: BTreeMap<String, TxnMeta>,
}

#[cfg(test)]
mod tests;
