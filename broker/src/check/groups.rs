//! Consumer group history checks: what group members were told and acknowledged (assignments,
//! offset commits) and what readers saw of the committed offsets, judged against three
//! properties with stable kebab-case names ([`GroupCheck::name`]):
//!
//! - `group-exclusive-ownership`: no partition owned by two members at the same member epoch
//!   (generation), as told by heartbeat answers or proven by acknowledged commits.
//! - `group-offset-regression`: a partition's committed offset never goes backwards (except
//!   through an administrative reset): an acknowledged commit or a read of the committed
//!   offset, invoked after another acknowledged commit or read completed, is not below it.
//! - `group-lost-commit`: the final read of a partition's committed offset is the last
//!   acknowledged commit (or the offset of a commit whose outcome the client never learnt,
//!   when that is not lower), never an earlier or missing one.
//!
//! Conventions (the recorder's side): a member is named by its *owner identity*, the
//! instance id of a static member (whose new process takes over its partitions at the same
//! epoch, legitimately) and the member id otherwise; a commit is recorded with the epoch under
//! which the member was told it owns the partition; times are microseconds on one clock.
//!
//! Like the log checks this is std and serde only and never panics on a history. Not done: a
//! search for a linearization (the real-time order of completed operations is enough for
//! these properties), liveness (a history that stops early passes what it shows).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{PartitionId, ProcessId, VIOLATIONS_KEPT_MAX};

/// One recorded group operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GroupOp {
    /// A heartbeat answered without error: the member's epoch and the partitions it owns.
    Assignment {
        /// The member's client session.
        process: ProcessId,
        /// The owner identity (see the module docs).
        member: String,
        /// The member epoch the answer gave.
        epoch: i32,
        /// The partitions the answer assigned.
        partitions: Vec<PartitionId>,
        /// When the answer arrived.
        complete_us: u64,
    },
    /// An offset commit of one partition.
    Commit {
        /// The member's client session.
        process: ProcessId,
        /// The owner identity.
        member: String,
        /// The member epoch sent.
        epoch: i32,
        /// The partition.
        partition: PartitionId,
        /// The offset committed.
        offset: u64,
        /// When the commit was invoked.
        invoke_us: u64,
        /// When its answer arrived (or the client gave up).
        complete_us: u64,
        /// What the client learnt.
        outcome: CommitOutcome,
    },
    /// A read of a partition's committed offset (`None`: none committed).
    Read {
        /// The reader's session.
        process: ProcessId,
        /// The partition.
        partition: PartitionId,
        /// The committed offset returned.
        offset: Option<u64>,
        /// When the read was invoked.
        invoke_us: u64,
        /// When its answer arrived.
        complete_us: u64,
        /// Part of the end-of-test read, after every fault healed.
        final_read: bool,
    },
    /// An administrative reset of a partition's committed offset (it may go backwards).
    Reset {
        /// The partition.
        partition: PartitionId,
        /// The offset set.
        offset: u64,
        /// When the reset was invoked.
        invoke_us: u64,
        /// When it was acknowledged.
        complete_us: u64,
    },
}

/// The outcome of a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitOutcome {
    /// Acknowledged: the offset is committed.
    Ok,
    /// Refused with an error that guarantees nothing was written (fenced, not owned).
    Failed,
    /// Indeterminate (timeout, coordinator moved after the append): may be committed.
    Unknown,
}

/// A group history: operations in recording order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHistory {
    /// The operations.
    pub ops: Vec<GroupOp>,
}

impl GroupHistory {
    /// Appends an operation and returns its index (how violations name it, as `op #i`).
    pub fn push(&mut self, op: GroupOp) -> usize {
        self.ops.push(op);
        self.ops.len() - 1
    }
}

/// The group checks, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupCheck {
    /// Two owner identities owned one partition at one member epoch.
    GroupExclusiveOwnership,
    /// A partition's committed offset went backwards without a reset.
    GroupOffsetRegression,
    /// The final committed offset is not the last acknowledged commit.
    GroupLostCommit,
}

impl GroupCheck {
    /// Every check, in report order.
    pub const ALL: [GroupCheck; 3] =
        [GroupCheck::GroupExclusiveOwnership, GroupCheck::GroupOffsetRegression, GroupCheck::GroupLostCommit];

    /// The stable kebab-case name, e.g. `"group-lost-commit"`.
    pub fn name(self) -> &'static str {
        match self {
            GroupCheck::GroupExclusiveOwnership => "group-exclusive-ownership",
            GroupCheck::GroupOffsetRegression => "group-offset-regression",
            GroupCheck::GroupLostCommit => "group-lost-commit",
        }
    }
}

impl fmt::Display for GroupCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One check's result: what it examined and the anomalies found (each a sentence naming the
/// operations as `op #i`; at most [`VIOLATIONS_KEPT_MAX`] kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCheckResult {
    /// The check.
    pub check: GroupCheck,
    /// How many items it examined.
    pub counted: usize,
    /// The anomalies found (the first ones).
    pub violations: Vec<String>,
    /// How many were found in all.
    pub violation_count: usize,
}

impl GroupCheckResult {
    /// Whether the check failed.
    pub fn failed(&self) -> bool {
        self.violation_count > 0
    }
}

/// The results of every group check, in the order of [`GroupCheck::ALL`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// One result per check (empty for an empty history).
    pub results: Vec<GroupCheckResult>,
}

impl GroupReport {
    /// True if no check failed.
    pub fn ok(&self) -> bool {
        !self.results.iter().any(GroupCheckResult::failed)
    }

    /// Whether `check` failed.
    pub fn violated(&self, check: GroupCheck) -> bool {
        self.results.iter().any(|r| r.check == check && r.failed())
    }
}

impl fmt::Display for GroupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            if r.failed() {
                writeln!(f, "{:<26}FAIL {} ({} examined)", r.check.name(), r.violation_count, r.counted)?;
                for v in r.violations.iter().take(5) {
                    writeln!(f, "    {v}")?;
                }
            } else {
                writeln!(f, "{:<26}PASS ({} examined)", r.check.name(), r.counted)?;
            }
        }
        Ok(())
    }
}

/// Runs every group check over `history`. Deterministic.
pub fn check_groups(history: &GroupHistory) -> GroupReport {
    let results = GroupCheck::ALL
        .iter()
        .map(|&c| match c {
            GroupCheck::GroupExclusiveOwnership => exclusive_ownership(history),
            GroupCheck::GroupOffsetRegression => offset_regression(history),
            GroupCheck::GroupLostCommit => lost_commit(history),
        })
        .collect();
    GroupReport { results }
}

struct Found {
    result: GroupCheckResult,
}

impl Found {
    fn new(check: GroupCheck) -> Found {
        Found { result: GroupCheckResult { check, counted: 0, violations: Vec::new(), violation_count: 0 } }
    }

    fn add(&mut self, detail: impl FnOnce() -> String) {
        self.result.violation_count += 1;
        if self.result.violations.len() < VIOLATIONS_KEPT_MAX {
            self.result.violations.push(detail());
        }
    }
}

/// Per (partition, epoch), the first op naming each owner: from assignments and acknowledged
/// commits. More than one owner is a violation, reported once per (partition, epoch).
fn exclusive_ownership(h: &GroupHistory) -> GroupCheckResult {
    let mut found = Found::new(GroupCheck::GroupExclusiveOwnership);
    let mut owners: BTreeMap<(PartitionId, i32), BTreeMap<&str, usize>> = BTreeMap::new();
    for (i, op) in h.ops.iter().enumerate() {
        match op {
            GroupOp::Assignment { member, epoch, partitions, .. } => {
                found.result.counted += 1;
                for &p in partitions {
                    owners.entry((p, *epoch)).or_default().entry(member.as_str()).or_insert(i);
                }
            }
            GroupOp::Commit { member, epoch, partition, outcome: CommitOutcome::Ok, .. } => {
                found.result.counted += 1;
                owners.entry((*partition, *epoch)).or_default().entry(member.as_str()).or_insert(i);
            }
            _ => {}
        }
    }
    for ((p, epoch), by) in &owners {
        if by.len() > 1 {
            found.add(|| {
                let who: Vec<String> = by.iter().map(|(m, op)| format!("'{m}' (op #{op})")).collect();
                format!("partition {p} owned by {} at member epoch {epoch}", who.join(" and "))
            });
        }
    }
    found.result
}

/// An observation of a partition's committed offset: an acknowledged commit (the value is at
/// least this from its completion on) or a read.
#[derive(Clone, Copy)]
struct Seen {
    op: usize,
    offset: u64,
    invoke_us: u64,
    complete_us: u64,
    commit: bool,
}

fn observations(h: &GroupHistory) -> BTreeMap<PartitionId, Vec<Seen>> {
    let mut out: BTreeMap<PartitionId, Vec<Seen>> = BTreeMap::new();
    for (op, o) in h.ops.iter().enumerate() {
        match *o {
            GroupOp::Commit { partition, offset, invoke_us, complete_us, outcome: CommitOutcome::Ok, .. } => {
                out.entry(partition).or_default().push(Seen { op, offset, invoke_us, complete_us, commit: true });
            }
            GroupOp::Read { partition, offset: Some(offset), invoke_us, complete_us, .. } => {
                out.entry(partition).or_default().push(Seen { op, offset, invoke_us, complete_us, commit: false });
            }
            _ => {}
        }
    }
    out
}

/// Resets per partition: (invoke, complete).
fn resets(h: &GroupHistory) -> BTreeMap<PartitionId, Vec<(u64, u64)>> {
    let mut out: BTreeMap<PartitionId, Vec<(u64, u64)>> = BTreeMap::new();
    for o in &h.ops {
        if let GroupOp::Reset { partition, invoke_us, complete_us, .. } = *o {
            out.entry(partition).or_default().push((invoke_us, complete_us));
        }
    }
    out
}

/// Sweeps each partition's observations in time order: the highest offset observed by an
/// operation that completed before another was invoked is a floor for it. A reset clears the
/// floor at its invocation; operations overlapping a reset neither set nor meet a floor.
fn offset_regression(h: &GroupHistory) -> GroupCheckResult {
    let mut found = Found::new(GroupCheck::GroupOffsetRegression);
    let resets = resets(h);
    for (p, seen) in observations(h) {
        let rs = resets.get(&p).map_or(&[][..], |v| &v[..]);
        let overlaps = |s: &Seen| rs.iter().any(|&(a, b)| s.invoke_us <= b && a <= s.complete_us);
        // Events at one time: completions (adding to the floor) sort after invocations
        // (meeting it), so only strictly earlier completions count.
        let mut events: Vec<(u64, u8, usize)> = Vec::new();
        for (k, s) in seen.iter().enumerate() {
            if overlaps(s) {
                continue;
            }
            events.push((s.invoke_us, 1, k));
            events.push((s.complete_us, 2, k));
        }
        for &(a, _) in rs {
            events.push((a, 0, usize::MAX));
        }
        events.sort_unstable();
        let mut floor: Option<Seen> = None;
        for (_, kind, k) in events {
            match kind {
                0 => floor = None,
                1 => {
                    found.result.counted += 1;
                    let s = seen[k];
                    let Some(f) = floor.filter(|f| s.offset < f.offset) else { continue };
                    found.add(|| {
                        let what = |x: &Seen| if x.commit { "acknowledged commit" } else { "read" };
                        format!(
                            "partition {p}: {} of offset {} (op #{}) invoked after the {} of offset {} (op #{}) \
                             completed: the committed offset went backwards",
                            what(&s),
                            s.offset,
                            s.op,
                            what(&f),
                            f.offset,
                            f.op
                        )
                    });
                }
                _ => {
                    let s = seen[k];
                    if floor.is_none_or(|f| s.offset > f.offset) {
                        floor = Some(s);
                    }
                }
            }
        }
    }
    found.result
}

/// The final read of each partition against its last acknowledged commit (latest completion).
fn lost_commit(h: &GroupHistory) -> GroupCheckResult {
    let mut found = Found::new(GroupCheck::GroupLostCommit);
    let mut last: BTreeMap<PartitionId, (usize, u64, u64)> = BTreeMap::new();
    let mut unknown: BTreeMap<PartitionId, BTreeSet<u64>> = BTreeMap::new();
    let mut finals: BTreeMap<PartitionId, (usize, Option<u64>)> = BTreeMap::new();
    let mut reset_at: BTreeMap<PartitionId, u64> = BTreeMap::new();
    for (op, o) in h.ops.iter().enumerate() {
        match *o {
            GroupOp::Commit { partition, offset, complete_us, outcome, .. } => match outcome {
                CommitOutcome::Ok => {
                    if last.get(&partition).is_none_or(|&(_, _, at)| complete_us >= at) {
                        last.insert(partition, (op, offset, complete_us));
                    }
                }
                CommitOutcome::Unknown => {
                    unknown.entry(partition).or_default().insert(offset);
                }
                CommitOutcome::Failed => {}
            },
            GroupOp::Read { partition, offset, final_read: true, .. } => {
                finals.insert(partition, (op, offset));
            }
            GroupOp::Reset { partition, invoke_us, .. } => {
                let at = reset_at.entry(partition).or_insert(invoke_us);
                *at = (*at).max(invoke_us);
            }
            _ => {}
        }
    }
    for (p, (op, offset, at)) in last {
        if reset_at.get(&p).is_some_and(|&r| r >= at) {
            continue; // reset since: the reset decides (not recorded as a commit)
        }
        let Some(&(read_op, read)) = finals.get(&p) else { continue };
        found.result.counted += 1;
        let known = |v: u64| v == offset || (v > offset && unknown.get(&p).is_some_and(|u| u.contains(&v)));
        if read.is_some_and(known) {
            continue;
        }
        found.add(|| {
            let shown = read.map_or("none".to_string(), |v| v.to_string());
            format!(
                "partition {p}: the last acknowledged commit was offset {offset} (op #{op}), \
                 but the final read (op #{read_op}) found {shown}"
            )
        });
    }
    found.result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(member: &str, epoch: i32, p: u32, offset: u64, at: (u64, u64), outcome: CommitOutcome) -> GroupOp {
        GroupOp::Commit {
            process: ProcessId(0),
            member: member.into(),
            epoch,
            partition: PartitionId(p),
            offset,
            invoke_us: at.0,
            complete_us: at.1,
            outcome,
        }
    }

    fn read(p: u32, offset: Option<u64>, at: (u64, u64), final_read: bool) -> GroupOp {
        GroupOp::Read {
            process: ProcessId(9),
            partition: PartitionId(p),
            offset,
            invoke_us: at.0,
            complete_us: at.1,
            final_read,
        }
    }

    fn assignment(member: &str, epoch: i32, ps: &[u32]) -> GroupOp {
        GroupOp::Assignment {
            process: ProcessId(0),
            member: member.into(),
            epoch,
            partitions: ps.iter().map(|&p| PartitionId(p)).collect(),
            complete_us: 0,
        }
    }

    fn failed(ops: Vec<GroupOp>) -> Vec<&'static str> {
        let report = check_groups(&GroupHistory { ops });
        report.results.iter().filter(|r| r.failed()).map(|r| r.check.name()).collect()
    }

    #[test]
    fn a_clean_handover_passes() {
        let ops = vec![
            assignment("a", 1, &[0, 1]),
            commit("a", 1, 0, 10, (1, 2), CommitOutcome::Ok),
            assignment("a", 1, &[1]),
            assignment("b", 2, &[0]),
            read(0, Some(10), (3, 4), false),
            commit("b", 2, 0, 15, (5, 6), CommitOutcome::Ok),
            commit("b", 2, 0, 20, (7, 8), CommitOutcome::Unknown),
            read(0, Some(20), (9, 10), true),
        ];
        assert_eq!(failed(ops), Vec::<&str>::new());
    }

    #[test]
    fn two_owners_at_one_epoch_fail() {
        let ops = vec![assignment("a", 3, &[0]), commit("b", 3, 0, 5, (1, 2), CommitOutcome::Ok)];
        assert_eq!(failed(ops), vec!["group-exclusive-ownership"]);
    }

    #[test]
    fn a_zombie_commit_below_an_acknowledged_one_is_a_regression() {
        let ops = vec![
            commit("b", 4, 0, 50, (1, 2), CommitOutcome::Ok),
            commit("a", 2, 0, 30, (3, 4), CommitOutcome::Ok),
            read(0, Some(30), (5, 6), true),
        ];
        assert_eq!(failed(ops), vec!["group-offset-regression"]);
    }

    #[test]
    fn concurrent_operations_and_resets_set_no_floor() {
        let ops = vec![
            commit("b", 4, 0, 50, (1, 5), CommitOutcome::Ok),
            read(0, Some(30), (2, 6), false),
            GroupOp::Reset { partition: PartitionId(0), offset: 0, invoke_us: 7, complete_us: 8 },
            read(0, Some(0), (9, 10), false),
        ];
        assert_eq!(failed(ops), Vec::<&str>::new());
    }

    #[test]
    fn a_final_read_missing_the_last_acknowledged_commit_is_a_lost_commit() {
        let ops = vec![
            commit("a", 1, 0, 10, (1, 2), CommitOutcome::Ok),
            commit("a", 1, 0, 20, (3, 4), CommitOutcome::Ok),
            read(0, Some(10), (1, 2), true),
        ];
        assert_eq!(failed(ops), vec!["group-lost-commit"]);
        let ops = vec![commit("a", 1, 1, 10, (1, 2), CommitOutcome::Ok), read(1, None, (5, 6), true)];
        assert_eq!(failed(ops), vec!["group-lost-commit"]);
    }
}
