//! The 15 isolation cases of `../shared/acceptance/isolation_cases.md` (adapted from
//! Hermitage), at every table isolation level, against a real broker, driven through the
//! `skein txn --table` CLI exactly as its contract reads: one CLI process per transaction, its
//! commands written in the case's order. A command that does not answer within a short while
//! is taken as blocked (a lock, the serial turn) and the case goes on with the next step; the
//! blocked transaction's later commands queue behind it, as they would on a terminal.
//!
//! Every case runs on a table of one partition (every key in one place: the matrix in
//! README.md) and on a table of three partitions (the case's keys spread over them, so the
//! transactions are multi-partition ones, committed by two-phase commit). Each case reports
//! whether its anomaly showed; the four serializable levels must prevent all of them (and
//! meet each case's stricter "serializable must" where it has one), the two weak levels must
//! show exactly the anomalies [`EXPECTED`] says they allow. A case also checks what every
//! level promises (no aborted or intermediate value is ever read).

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{block_on, sibling, spawn_talking, Broker};
use skein_client::Client;

/// The levels, in the matrix's column order.
const LEVELS: [&str; 6] = ["read-committed", "snapshot", "serializable", "serial", "2pl", "ssi"];

/// The cases, in the matrix's row order.
const CASES: [&str; 15] = [
    "G0",
    "G1a",
    "G1b",
    "G1c",
    "OTV",
    "PMP",
    "PMP-write",
    "P4",
    "G-single",
    "G-single-pred",
    "G-single-write-1",
    "G-single-write-2",
    "G2-item",
    "G2",
    "G2-two-edges",
];

/// The anomalies the weak levels allow (show), per partition count: `(level, partitions,
/// cases)`. Every other (level, case) must prevent its anomaly. Snapshot over several
/// partitions validates its reads (each partition has its own snapshot offset), so there it
/// prevents what a single snapshot lets through.
const EXPECTED: [(&str, u32, &[&str]); 4] = [
    (
        "read-committed",
        1,
        &["OTV", "PMP", "PMP-write", "P4", "G-single", "G-single-pred", "G2-item", "G2", "G2-two-edges"],
    ),
    (
        "read-committed",
        3,
        &["OTV", "PMP", "PMP-write", "P4", "G-single", "G-single-pred", "G2-item", "G2", "G2-two-edges"],
    ),
    ("snapshot", 1, &["G2-item", "G2", "G2-two-edges"]),
    ("snapshot", 3, &[]),
];

fn allowed(level: &str, partitions: u32, case: &str) -> bool {
    EXPECTED.iter().any(|(l, p, cases)| *l == level && *p == partitions && cases.contains(&case))
}

/// How a transaction ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Open,
    Committed,
    Aborted(String),
}

/// Command lines computed from what a transaction saw so far.
type Later = Box<dyn FnOnce(&Seen) -> Vec<String>>;

/// A command still to send: a line, or lines computed when it is its turn.
enum Item {
    Line(String),
    Then(Later),
}

/// What one transaction saw.
#[derive(Default)]
struct Seen {
    /// Its reads, in order: key (without the case prefix) and value (None: nil).
    reads: Vec<(String, Option<i64>)>,
    /// Its scans, in order: key (without the case prefix) to value.
    scans: Vec<BTreeMap<String, i64>>,
    /// Keys it deleted or wrote, in order.
    writes: Vec<(String, Option<i64>)>,
}

impl Seen {
    fn last_read(&self, key: &str) -> Option<i64> {
        self.reads.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| *v)
    }

    fn last_scan(&self) -> BTreeMap<String, i64> {
        self.scans.last().cloned().unwrap_or_default()
    }

    fn read_values(&self, key: &str) -> Vec<Option<i64>> {
        self.reads.iter().filter(|(k, _)| k == key).map(|(_, v)| *v).collect()
    }
}

/// One `skein txn --table` process running one transaction.
struct Session {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    queue: VecDeque<Item>,
    /// The command sent and not yet answered.
    outstanding: Option<String>,
    state: State,
    seen: Seen,
}

/// One case's run: its sessions, its key prefix and a trace for failure messages.
struct Script<'a> {
    bin: &'a Path,
    addr: &'a str,
    table: &'a str,
    level: &'a str,
    prefix: String,
    /// How long a command may take before it counts as blocked.
    block: Duration,
    sessions: Vec<Session>,
    trace: Vec<String>,
}

/// How long anything may take at all (a lock wait included) before the case fails.
const STUCK: Duration = Duration::from_secs(20);

impl<'a> Script<'a> {
    /// Begins transaction `T{n}` (numbered from 1 in begin order).
    fn begin(&mut self) -> usize {
        let mut cmd = Command::new(self.bin);
        cmd.args(["--brokers", self.addr, "txn", "--table", self.table, "--isolation", self.level]);
        let (child, stdin, lines) = spawn_talking(&mut cmd);
        let name = format!("T{}", self.sessions.len() + 1);
        let stdin = Some(stdin);
        self.sessions.push(Session {
            name,
            child,
            stdin,
            lines,
            queue: VecDeque::new(),
            outstanding: None,
            state: State::Open,
            seen: Seen::default(),
        });
        let t = self.sessions.len() - 1;
        self.step(t, vec![Item::Line("begin".into())]);
        t
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Queues `items` on `t`, then lets every session make progress; waits up to the
    /// blocking window for `t`'s queue to drain.
    fn step(&mut self, t: usize, items: Vec<Item>) {
        self.sessions[t].queue.extend(items);
        let deadline = Instant::now() + self.block;
        loop {
            self.pump_all();
            let s = &self.sessions[t];
            if s.outstanding.is_none() && s.queue.is_empty() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                self.trace.push(format!("{} blocked on {:?}", s.name, s.outstanding));
                return;
            }
            self.take_answer(t, deadline - now);
        }
    }

    /// Sends queued commands of every session with nothing outstanding, and takes in every
    /// answer already there.
    fn pump_all(&mut self) {
        for t in 0..self.sessions.len() {
            loop {
                while self.take_answer(t, Duration::ZERO) {}
                if !self.send_next(t) {
                    break;
                }
            }
        }
    }

    /// Sends `t`'s next queued command if nothing is outstanding; whether one was sent.
    fn send_next(&mut self, t: usize) -> bool {
        let s = &mut self.sessions[t];
        if s.outstanding.is_some() {
            return false;
        }
        if s.state != State::Open {
            // Over (committed or aborted): the rest of its script is moot.
            s.queue.clear();
            return false;
        }
        let Some(item) = s.queue.pop_front() else { return false };
        let line = match item {
            Item::Line(line) => line,
            Item::Then(f) => {
                let lines = f(&s.seen);
                for l in lines.into_iter().rev() {
                    s.queue.push_front(Item::Line(l));
                }
                return true;
            }
        };
        let stdin = s.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to skein txn");
        stdin.flush().expect("flush");
        self.trace.push(format!("{} > {line}", s.name));
        s.outstanding = Some(line);
        true
    }

    /// Takes one whole answer of `t` if it comes within `limit`; whether one came.
    fn take_answer(&mut self, t: usize, limit: Duration) -> bool {
        let prefix = self.prefix.clone();
        let s = &mut self.sessions[t];
        let Some(command) = s.outstanding.clone() else { return false };
        let first = match s.lines.recv_timeout(limit) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => return false,
            Err(RecvTimeoutError::Disconnected) => panic!("{}: skein txn exited during {command:?}", s.name),
        };
        let mut answer = vec![first.clone()];
        if first.starts_with("row ") {
            loop {
                let line = s.lines.recv_timeout(STUCK).expect("the rest of a scan");
                let end = line == "end";
                answer.push(line);
                if end {
                    break;
                }
            }
        }
        self.trace.push(format!("{} < {}", s.name, answer.join(" | ")));
        s.outstanding = None;
        let strip = |k: &str| k.strip_prefix(prefix.as_str()).unwrap_or(k).to_owned();
        let words: Vec<&str> = first.splitn(3, ' ').collect();
        match words.as_slice() {
            ["aborted", reason, ..] => s.state = State::Aborted((*reason).to_owned()),
            ["committed", _] => s.state = State::Committed,
            ["value", k, v] => s.seen.reads.push((strip(k), if *v == "nil" { None } else { Some(num(v)) })),
            ["ok"] if command.starts_with("put ") => {
                let w: Vec<&str> = command.splitn(3, ' ').collect();
                s.seen.writes.push((strip(w[1]), Some(num(w[2]))));
            }
            ["ok"] if command.starts_with("delete ") => s.seen.writes.push((strip(&command[7..]), None)),
            ["ok"] => {}
            ["row", ..] | ["end"] => {
                let mut rows = BTreeMap::new();
                for line in &answer[..answer.len() - 1] {
                    let w: Vec<&str> = line.splitn(3, ' ').collect();
                    assert_eq!(w.len(), 3, "row line {line:?}");
                    rows.insert(strip(w[1]), num(w[2]));
                }
                s.seen.scans.push(rows);
            }
            _ => panic!("{}: unexpected answer {answer:?} to {command:?}\n{}", s.name, self.trace.join("\n")),
        }
        true
    }

    /// `get k` in `t`.
    fn get(&mut self, t: usize, k: &str) {
        let line = format!("get {}", self.key(k));
        self.step(t, vec![Item::Line(line)]);
    }

    fn put(&mut self, t: usize, k: &str, v: i64) {
        let line = format!("put {} {v}", self.key(k));
        self.step(t, vec![Item::Line(line)]);
    }

    /// Puts `k` := f(what `t` saw), computed once `t`'s earlier commands answered.
    fn put_with(&mut self, t: usize, k: &str, f: impl FnOnce(&Seen) -> i64 + 'static) {
        let key = self.key(k);
        self.step(t, vec![Item::Then(Box::new(move |seen| vec![format!("put {key} {}", f(seen))]))]);
    }

    /// A predicate read: a scan of the case's keys.
    fn scan(&mut self, t: usize) {
        let line = format!("scan {} {}", self.prefix, self.range_end());
        self.step(t, vec![Item::Line(line)]);
    }

    /// A predicate write: scans the case's keys, then writes each row `f` maps to
    /// `Some(Some(v))` (put) or `Some(None)` (delete).
    fn scan_then(&mut self, t: usize, f: impl Fn(i64) -> Option<Option<i64>> + 'static) {
        let scan = format!("scan {} {}", self.prefix, self.range_end());
        let prefix = self.prefix.clone();
        let then = move |seen: &Seen| {
            let mut lines = Vec::new();
            for (k, v) in seen.last_scan() {
                match f(v) {
                    Some(Some(new)) => lines.push(format!("put {prefix}{k} {new}")),
                    Some(None) => lines.push(format!("delete {prefix}{k}")),
                    None => {}
                }
            }
            lines
        };
        self.step(t, vec![Item::Line(scan), Item::Then(Box::new(then))]);
    }

    fn commit(&mut self, t: usize) {
        self.step(t, vec![Item::Line("commit".into())]);
    }

    fn abort(&mut self, t: usize) {
        self.step(t, vec![Item::Line("abort".into())]);
    }

    fn range_end(&self) -> String {
        // The prefix ends with '.', and '/' follows '.': every key of the case sorts below.
        format!("{}/", &self.prefix[..self.prefix.len() - 1])
    }

    /// Lets every session finish its queue, then ends the processes (an open transaction is
    /// aborted at the end of input).
    fn finish(&mut self) {
        let deadline = Instant::now() + STUCK;
        loop {
            self.pump_all();
            let busy: Vec<usize> = (0..self.sessions.len())
                .filter(|&t| self.sessions[t].outstanding.is_some() || !self.sessions[t].queue.is_empty())
                .collect();
            let Some(&t) = busy.first() else { break };
            assert!(Instant::now() < deadline, "case stuck:\n{}", self.trace.join("\n"));
            self.take_answer(t, Duration::from_millis(20));
        }
        for s in &mut self.sessions {
            drop(s.stdin.take());
            let status = s.child.wait().expect("skein txn ended");
            assert!(status.success(), "{}: skein txn exited {status}", s.name);
        }
    }

    fn committed(&self, t: usize) -> bool {
        self.sessions[t].state == State::Committed
    }

    fn seen(&self, t: usize) -> &Seen {
        &self.sessions[t].seen
    }
}

fn num(s: &str) -> i64 {
    s.parse().unwrap_or_else(|_| panic!("a number: {s:?}"))
}

/// What a case found: whether its anomaly showed, and whether the stricter outcome a
/// serializable engine must show held.
struct Verdict {
    anomaly: bool,
    serializable_ok: bool,
}

fn state(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Runs case `id`; `finale` reads the case's keys after it (the final state).
fn run_case(id: &str, s: &mut Script, finale: &dyn Fn() -> BTreeMap<String, i64>) -> Verdict {
    match id {
        "G0" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.put(t1, "x", 11);
            s.put(t2, "x", 12);
            s.put(t1, "y", 21);
            s.commit(t1);
            s.put(t2, "y", 22);
            s.commit(t2);
            s.finish();
            let f = finale();
            let mixed = f == state(&[("x", 12), ("y", 21)]) || f == state(&[("x", 11), ("y", 22)]);
            Verdict { anomaly: mixed, serializable_ok: !mixed }
        }
        "G1a" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.put(t1, "x", 101);
            s.get(t2, "x");
            s.abort(t1);
            s.get(t2, "x");
            s.commit(t2);
            s.finish();
            let reads = s.seen(t2).read_values("x");
            let dirty = reads.contains(&Some(101)) || finale().get("x") == Some(&101);
            let ok = reads.iter().all(|v| *v == Some(10));
            Verdict { anomaly: dirty, serializable_ok: ok }
        }
        "G1b" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.put(t1, "x", 101);
            s.get(t2, "x");
            s.put(t1, "x", 11);
            s.commit(t1);
            s.get(t2, "x");
            s.commit(t2);
            s.finish();
            let reads = s.seen(t2).read_values("x");
            let intermediate = reads.contains(&Some(101));
            let repeatable = !s.committed(t2) || reads.windows(2).all(|w| w[0] == w[1]);
            Verdict { anomaly: intermediate, serializable_ok: !intermediate && repeatable }
        }
        "G1c" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.put(t1, "x", 11);
            s.put(t2, "y", 22);
            s.get(t1, "y");
            s.get(t2, "x");
            s.commit(t1);
            s.commit(t2);
            s.finish();
            // Circular information flow: each saw the other's write. (Writes are buffered
            // until commit, so a write seen is a committed one.)
            let circular = s.seen(t1).last_read("y") == Some(22) && s.seen(t2).last_read("x") == Some(11);
            // Both committed having missed each other's write: no serial order.
            let skew = s.committed(t1)
                && s.committed(t2)
                && s.seen(t1).last_read("y") == Some(20)
                && s.seen(t2).last_read("x") == Some(10);
            Verdict { anomaly: circular, serializable_ok: !circular && !skew }
        }
        "OTV" => {
            let (t1, t2, t3) = (s.begin(), s.begin(), s.begin());
            s.put(t1, "x", 11);
            s.put(t1, "y", 19);
            s.put(t2, "x", 12);
            s.commit(t1);
            s.get(t3, "x");
            s.put(t2, "y", 18);
            s.get(t3, "y");
            s.commit(t2);
            s.get(t3, "y");
            s.get(t3, "x");
            s.commit(t3);
            s.finish();
            // T3 saw one state: the first (10, 20), T1's (11, 19) or T1 then T2's (12, 18).
            let seen = s.seen(t3);
            let consistent = [(10, 20), (11, 19), (12, 18)]
                .iter()
                .any(|&(x, y)| seen.reads.iter().all(|(k, v)| *v == Some(if k == "x" { x } else { y })));
            let anomaly = s.committed(t3) && !consistent;
            Verdict { anomaly, serializable_ok: !anomaly }
        }
        "PMP" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.scan(t1);
            s.put(t2, "z", 30);
            s.commit(t2);
            s.scan(t1);
            s.commit(t1);
            s.finish();
            let scans = &s.seen(t1).scans;
            let phantom = s.committed(t1) && scans.len() == 2 && scans[0] != scans[1];
            Verdict { anomaly: phantom, serializable_ok: !phantom }
        }
        "PMP-write" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.scan_then(t1, |v| Some(Some(v + 10)));
            s.scan_then(t2, |v| (v == 20).then_some(None));
            s.commit(t1);
            s.scan(t2);
            s.commit(t2);
            s.finish();
            let f = finale();
            let ok = f == state(&[("x", 20), ("y", 30)]) || f == state(&[("y", 30)]);
            Verdict { anomaly: !ok, serializable_ok: ok }
        }
        "P4" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.get(t1, "x");
            s.get(t2, "x");
            s.put_with(t1, "x", |seen| seen.last_read("x").unwrap_or(0) + 1);
            s.put_with(t2, "x", |seen| seen.last_read("x").unwrap_or(0) + 1);
            s.commit(t1);
            s.commit(t2);
            s.finish();
            let lost = s.committed(t1) && s.committed(t2) && finale().get("x") != Some(&12);
            Verdict { anomaly: lost, serializable_ok: !lost }
        }
        "G-single" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.get(t1, "x");
            s.get(t2, "x");
            s.get(t2, "y");
            s.put(t2, "x", 12);
            s.put(t2, "y", 18);
            s.commit(t2);
            s.get(t1, "y");
            s.commit(t1);
            s.finish();
            let seen = s.seen(t1);
            let skew = s.committed(t1) && seen.last_read("x") == Some(10) && seen.last_read("y") == Some(18);
            Verdict { anomaly: skew, serializable_ok: !skew }
        }
        "G-single-pred" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.scan(t1);
            s.scan_then(t2, |v| (v == 10).then_some(Some(12)));
            s.commit(t2);
            s.scan(t1);
            s.commit(t1);
            s.finish();
            let scans = &s.seen(t1).scans;
            let skew = s.committed(t1)
                && scans.iter().any(|rows| rows.get("x") == Some(&12))
                && scans[0].get("x") == Some(&10);
            Verdict { anomaly: skew, serializable_ok: !skew }
        }
        "G-single-write-1" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.get(t1, "x");
            s.get(t2, "x");
            s.get(t2, "y");
            s.put(t2, "x", 12);
            s.put(t2, "y", 18);
            s.commit(t2);
            s.scan_then(t1, |v| (v == 20).then_some(None));
            s.commit(t1);
            s.finish();
            // T1 read x = 10 (before T2) and deleted y; T2 read y = 20 (before T1's delete):
            // with both committed, no serial order explains both.
            let stale_delete = s.committed(t1)
                && s.committed(t2)
                && s.seen(t1).last_read("x") == Some(10)
                && s.seen(t2).last_read("y") == Some(20)
                && s.seen(t1).writes.iter().any(|(k, v)| k == "y" && v.is_none());
            Verdict { anomaly: stale_delete, serializable_ok: !stale_delete }
        }
        "G-single-write-2" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.get(t1, "x");
            s.get(t2, "x");
            s.get(t2, "y");
            s.put(t2, "x", 12);
            s.scan_then(t1, |v| (v == 20).then_some(None));
            s.put(t2, "y", 18);
            s.abort(t1);
            s.commit(t2);
            s.finish();
            let f = finale();
            // T1 aborted: nothing of it may show. T2 commits (or, where an older T1 wounded
            // it, aborts with nothing applied).
            let ok =
                if s.committed(t2) { f == state(&[("x", 12), ("y", 18)]) } else { f == state(&[("x", 10), ("y", 20)]) };
            Verdict { anomaly: !ok, serializable_ok: ok }
        }
        "G2-item" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.get(t1, "x");
            s.get(t1, "y");
            s.get(t2, "x");
            s.get(t2, "y");
            s.put(t1, "x", 11);
            s.put(t2, "y", 21);
            s.commit(t1);
            s.commit(t2);
            s.finish();
            let skew = s.committed(t1)
                && s.committed(t2)
                && s.seen(t1).last_read("y") == Some(20)
                && s.seen(t2).last_read("x") == Some(10);
            Verdict { anomaly: skew, serializable_ok: !skew }
        }
        "G2" => {
            let (t1, t2) = (s.begin(), s.begin());
            s.scan(t1);
            s.scan(t2);
            s.put(t1, "z", 30);
            s.put(t2, "w", 42);
            s.commit(t1);
            s.commit(t2);
            s.finish();
            let f = finale();
            // Both inserted having seen neither insert: no serial order.
            let missed = |t: usize, k: &str| s.seen(t).scans.first().is_some_and(|rows| !rows.contains_key(k));
            let skew = s.committed(t1)
                && s.committed(t2)
                && missed(t1, "w")
                && missed(t2, "z")
                && f.get("z") == Some(&30)
                && f.get("w") == Some(&42);
            Verdict { anomaly: skew, serializable_ok: !skew }
        }
        "G2-two-edges" => {
            let (t1, t2, t3) = (s.begin(), s.begin(), s.begin());
            s.get(t1, "x");
            s.get(t1, "y");
            s.get(t2, "y");
            s.put_with(t2, "y", |seen| seen.last_read("y").unwrap_or(0) + 5);
            s.commit(t2);
            s.get(t3, "x");
            s.get(t3, "y");
            s.commit(t3);
            s.put(t1, "x", 0);
            s.commit(t1);
            s.finish();
            // T3 saw T2 (y = 25) and not T1 (x = 10): T2 < T3 < T1; T1 read y = 20: T1 < T2.
            let t3_saw = s.seen(t3).last_read("x") == Some(10) && s.seen(t3).last_read("y") == Some(25);
            let anomaly = s.committed(t1)
                && s.committed(t2)
                && s.committed(t3)
                && t3_saw
                && s.seen(t1).last_read("y") == Some(20);
            Verdict { anomaly, serializable_ok: !anomaly }
        }
        other => panic!("unknown case {other}"),
    }
}

/// Creates table `name`, runs every case at `level` on it, and returns the cases whose
/// anomaly showed, checking the serializable levels' stricter outcomes on the way.
fn run_level(bin: &Path, addr: &str, level: &str, partitions: u32) -> Vec<&'static str> {
    let table = format!("iso-{level}-{partitions}");
    let create = Command::new(bin)
        .args(["--brokers", addr, "table", "create", &table, "--partitions", &partitions.to_string()])
        .args(["--replicas", "1", "--isolation", level])
        .output()
        .expect("skein table create");
    assert!(create.status.success(), "create {table}: {}", String::from_utf8_lossy(&create.stderr));
    assert_eq!(String::from_utf8_lossy(&create.stdout).trim(), format!("created {table}"));
    let serializable = !matches!(level, "read-committed" | "snapshot");
    let block = if matches!(level, "2pl" | "serial") { Duration::from_millis(400) } else { Duration::from_secs(5) };
    let mut shown = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let prefix = format!("c{i:02}.");
        setup(addr, &table, &prefix);
        let mut s = Script {
            bin,
            addr,
            table: &table,
            level,
            prefix: prefix.clone(),
            block,
            sessions: Vec::new(),
            trace: Vec::new(),
        };
        let finale = || final_state(addr, &table, &prefix);
        let started = Instant::now();
        let verdict = run_case(case, &mut s, &finale);
        let trace = s.trace.join("\n");
        println!(
            "{level} p={partitions} {case}: anomaly={} ({} ms)\n{trace}\n",
            verdict.anomaly,
            started.elapsed().as_millis()
        );
        if serializable {
            assert!(
                !verdict.anomaly && verdict.serializable_ok,
                "{case} at {level} ({partitions} partitions): anomaly={} serializable_ok={}\n{trace}",
                verdict.anomaly,
                verdict.serializable_ok
            );
        }
        if verdict.anomaly {
            shown.push(*case);
        }
    }
    shown
}

/// Writes the initial state `x = 10, y = 20` under `prefix`.
fn setup(addr: &str, table: &str, prefix: &str) {
    block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let t = client.table(table).await.expect("table");
        t.put(format!("{prefix}x").as_bytes(), b"10").await.expect("put x");
        t.put(format!("{prefix}y").as_bytes(), b"20").await.expect("put y");
    });
}

/// The rows under `prefix`, read after the case.
fn final_state(addr: &str, table: &str, prefix: &str) -> BTreeMap<String, i64> {
    block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let t = client.table(table).await.expect("table");
        let end = format!("{}/", &prefix[..prefix.len() - 1]);
        let rows = t.scan(prefix.as_bytes(), end.as_bytes()).await.expect("scan");
        rows.into_iter()
            .map(|(k, v)| {
                let k = String::from_utf8_lossy(&k);
                (k.strip_prefix(prefix).unwrap_or(&k).to_owned(), num(&String::from_utf8_lossy(&v)))
            })
            .collect()
    })
}

/// Runs every case at `levels` on a broker of its own, for one and three partitions, and
/// checks the anomalies shown against [`EXPECTED`].
fn check_levels(levels: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let bin: PathBuf = sibling("skein", &["--bin", "skein"]);
    for level in levels {
        for partitions in [1, 3] {
            let shown = run_level(&bin, &broker.addr, level, partitions);
            let expected: Vec<&str> = CASES.iter().copied().filter(|c| allowed(level, partitions, c)).collect();
            assert_eq!(shown, expected, "{level} with {partitions} partitions: anomalies shown");
        }
    }
}

#[test]
fn weak_levels_show_exactly_the_anomalies_they_allow() {
    check_levels(&["read-committed", "snapshot"]);
}

#[test]
fn log_order_validation_prevents_every_anomaly() {
    check_levels(&["serializable"]);
}

#[test]
fn serial_execution_prevents_every_anomaly() {
    check_levels(&["serial"]);
}

#[test]
fn two_phase_locking_prevents_every_anomaly() {
    check_levels(&["2pl"]);
}

#[test]
fn ssi_prevents_every_anomaly() {
    check_levels(&["ssi"]);
}

/// The matrix README.md shows: prints it (run with `--nocapture`) and checks it lists what
/// [`EXPECTED`] says, so the two cannot drift apart.
#[test]
fn the_readme_matrix_matches_the_tests() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    let mut header = String::from("| case |");
    for level in LEVELS {
        header.push_str(&format!(" {level} |"));
    }
    let mut rows = vec![header, format!("|---|{}", "---|".repeat(LEVELS.len()))];
    for case in CASES {
        let mut row = format!("| {case} |");
        for level in LEVELS {
            let cell = match (allowed(level, 1, case), allowed(level, 3, case)) {
                (false, false) => "prevented",
                (true, true) => "**shown**",
                (true, false) => "**shown** (1 partition)",
                (false, true) => "**shown** (3 partitions)",
            };
            row.push_str(&format!(" {cell} |"));
        }
        rows.push(row);
    }
    let matrix = rows.join("\n");
    println!("{matrix}");
    assert!(
        readme.contains(&matrix),
        "README.md's isolation matrix differs from the tests'; it should read:\n{matrix}"
    );
}
