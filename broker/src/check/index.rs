//! The lookups every rule shares, built in one pass over the operations: acknowledgements,
//! sends by value, reads by position, declared gaps, and each session's polls in time order.
//!
//! Hash maps here are only looked up, never iterated where iteration order could reach a
//! report: anything iterated is a `Vec` in operation order or a `BTreeMap`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Key, Offset, Op, PartitionId, PollOp, ProcessId, SendOp, SendOutcome, Value};

/// An acknowledged send.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ack {
    /// Index of the send in the history.
    pub(super) op: usize,
    pub(super) process: ProcessId,
    pub(super) partition: PartitionId,
    pub(super) offset: Offset,
    pub(super) value: Value,
    /// The record key, if the send had one.
    pub(super) key: Option<Key>,
    /// Whether the send named its partition.
    pub(super) aimed: bool,
    pub(super) invoke_us: u64,
    pub(super) complete_us: u64,
}

/// A poll with its index in the history.
pub(super) type Poll<'h> = (usize, &'h PollOp);

/// Everything the rules look up.
pub(super) struct Index<'h> {
    /// The history's operations.
    pub(super) ops: &'h [Op],
    /// Acknowledged sends, in operation order.
    pub(super) acks: Vec<Ack>,
    /// Every poll, in operation order.
    pub(super) polls: Vec<Poll<'h>>,
    /// The (first) send of each value.
    pub(super) sends: HashMap<Value, usize>,
    /// Every value some poll returned.
    pub(super) read_values: HashSet<Value>,
    /// The first value read at each position, with the poll that read it.
    pub(super) reads: HashMap<(PartitionId, Offset), (Value, usize)>,
    /// Per partition, the offsets some poll returned a value at, sorted, declared gaps left out.
    read_offsets: HashMap<PartitionId, Vec<Offset>>,
    /// The (first) declaration of each gap.
    gap_ops: HashMap<(PartitionId, Offset), usize>,
    /// Per partition, the declared gaps, sorted.
    gap_offsets: HashMap<PartitionId, Vec<Offset>>,
    /// Per session and partition, its polls ordered by (invoke time, index); final reads
    /// included.
    pub(super) sessions: BTreeMap<(ProcessId, PartitionId), Vec<Poll<'h>>>,
}

impl<'h> Index<'h> {
    /// One pass over `ops`, then sorts.
    pub(super) fn build(ops: &'h [Op]) -> Index<'h> {
        let mut index = Index {
            ops,
            acks: Vec::new(),
            polls: Vec::new(),
            sends: HashMap::new(),
            read_values: HashSet::new(),
            reads: HashMap::new(),
            read_offsets: HashMap::new(),
            gap_ops: HashMap::new(),
            gap_offsets: HashMap::new(),
            sessions: BTreeMap::new(),
        };
        for (op_index, op) in ops.iter().enumerate() {
            match op {
                Op::Send(send) => index.add_send(op_index, send),
                Op::Poll(poll) => index.add_poll(op_index, poll),
                Op::Gap(gap) => {
                    index.gap_ops.entry((gap.partition, gap.offset)).or_insert(op_index);
                }
            }
        }
        for polls in index.sessions.values_mut() {
            polls.sort_by_key(|&(op_index, poll)| (poll.invoke_us, op_index));
        }
        index.gap_offsets = by_partition(index.gap_ops.keys().copied());
        let gap_ops = &index.gap_ops;
        let read_positions = index.reads.keys().copied().filter(|position| !gap_ops.contains_key(position));
        index.read_offsets = by_partition(read_positions);
        index
    }

    fn add_send(&mut self, op_index: usize, send: &SendOp) {
        self.sends.entry(send.value).or_insert(op_index);
        if let SendOutcome::Ok { partition, offset } = send.outcome {
            self.acks.push(Ack {
                op: op_index,
                process: send.process,
                partition,
                offset,
                value: send.value,
                key: send.key,
                aimed: send.partition.is_some(),
                invoke_us: send.invoke_us,
                complete_us: send.complete_us,
            });
        }
    }

    fn add_poll(&mut self, op_index: usize, poll: &'h PollOp) {
        self.polls.push((op_index, poll));
        self.sessions.entry((poll.process, poll.partition)).or_default().push((op_index, poll));
        for &(offset, value) in &poll.records {
            self.read_values.insert(value);
            self.reads.entry((poll.partition, offset)).or_insert((value, op_index));
        }
    }

    /// The send of `value`, if the history has one.
    pub(super) fn send(&self, value: Value) -> Option<(usize, &'h SendOp)> {
        let op_index = *self.sends.get(&value)?;
        match self.ops.get(op_index) {
            Some(Op::Send(send)) => Some((op_index, send)),
            _ => None,
        }
    }

    /// The operation declaring (`partition`, `offset`) a gap, if one does.
    pub(super) fn gap(&self, partition: PartitionId, offset: Offset) -> Option<usize> {
        self.gap_ops.get(&(partition, offset)).copied()
    }

    /// Whether every offset in `[low, high)` of `partition` is a declared gap (true if the
    /// range is empty).
    pub(super) fn only_gaps(&self, partition: PartitionId, low: Offset, high: Offset) -> bool {
        if high <= low {
            return true;
        }
        let Some(gaps) = self.gap_offsets.get(&partition) else { return false };
        let inside = gaps.partition_point(|&gap| gap < high) - gaps.partition_point(|&gap| gap < low);
        u64::try_from(inside).is_ok_and(|inside| inside == high.0 - low.0)
    }

    /// The lowest offset in `[low, high)` of `partition` at which some poll returned a value
    /// (declared gaps left out).
    pub(super) fn first_read_in(&self, partition: PartitionId, low: Offset, high: Offset) -> Option<Offset> {
        let offsets = self.read_offsets.get(&partition)?;
        let first = *offsets.get(offsets.partition_point(|&offset| offset < low))?;
        (first < high).then_some(first)
    }
}

/// Groups positions by partition, each partition's offsets sorted and distinct.
fn by_partition(positions: impl Iterator<Item = (PartitionId, Offset)>) -> HashMap<PartitionId, Vec<Offset>> {
    let mut grouped: HashMap<PartitionId, Vec<Offset>> = HashMap::new();
    for (partition, offset) in positions {
        grouped.entry(partition).or_default().push(offset);
    }
    for offsets in grouped.values_mut() {
        offsets.sort_unstable();
        offsets.dedup();
    }
    grouped
}
