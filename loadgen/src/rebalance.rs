//! `rebalance`: how long a group takes to hand a killed member's partitions to the others,
//! and whether the partitions that do not move pause meanwhile.
//!
//! Each member is a child process (`skein-loadgen member`, see [`member_main`]) that prints
//! its [`Event`]s on standard output, so that a member can be killed as a crash kills it:
//! SIGKILL, no leave, no commit, its connections reset by the kernel. A steady producer writes
//! to every partition throughout. Each round: wait until the group is Stable with every
//! partition assigned, let it settle, wait for the victim (the oldest member) to report a
//! heartbeat and SIGKILL it at once (its next heartbeat was a heartbeat interval away, so the
//! last one it sent is the one it reported; `kill_after_heartbeat_ms` shows the margin). The
//! **expiry** is that heartbeat (stamped when the poll sending it began: no later than the
//! coordinator saw it) plus the session timeout. Then:
//!
//! - `expiry_to_assigned_ms`: until every partition is owned again, as the surviving members'
//!   `on_assigned` calls report (the end of the rebalance window the expiry opens, see
//!   [`crate::groups::analyze`]);
//! - `expiry_to_stable_ms`: until DescribeGroup, asked every [`DESCRIBE_INTERVAL`], shows the
//!   group Stable without the victim and every partition in some member's assignment;
//! - the longest delivery gap of partitions that kept their owner in that window, and the
//!   longest release-to-first-record pause of the moved ones.
//!
//! A replacement member then joins (its own rebalance window, reported as `join_*`), and the
//! next round waits for Stable again. The targets printed: median `expiry_to_assigned_ms` ≤
//! 500 ms, and no unmoved partition paused over 50 ms in any window of the rounds.
//!
//! Not measured: the time from the kill to the expiry (it is the session timeout by design),
//! clean leaves (see `consume --group --churn-interval`).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use skein_client::wire::DescribeGroupResponse;
use skein_client::{Assignor, Client};

use crate::failover::{percentiles, FailoverPercentiles};
use crate::groups::{
    self, analyze, max_of, ms, now_us, Event, EventKind, Feeder, GapSummary, MemberConfig, WindowReport,
};
use crate::report::{self, Machine};

/// What `rebalance` runs.
#[derive(Clone, Debug)]
pub struct RebalanceConfig {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Topic (created if missing).
    pub topic: String,
    /// Partitions when creating it.
    pub partitions: u32,
    /// Replicas when creating it.
    pub replicas: u16,
    /// The group.
    pub group: String,
    /// Members at a time.
    pub consumers: usize,
    /// Rounds (kills).
    pub kills: usize,
    /// Members' session timeout.
    pub session_timeout_ms: u32,
    /// Assignor.
    pub assignor: Assignor,
    /// Members' auto-commit interval.
    pub auto_commit: Duration,
    /// Records per second the producer writes over all partitions.
    pub produce_rate: f64,
    /// Value bytes per record.
    pub message_size: usize,
    /// Pause once the group is Stable, before the next kill.
    pub settle: Duration,
    /// Bound on each wait for Stable.
    pub stable_timeout: Duration,
    /// The `skein-loadgen` binary run as `member`.
    pub member_exe: PathBuf,
}

impl RebalanceConfig {
    /// The settings as JSON, for the report.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": "rebalance", "brokers": self.brokers, "topic": self.topic, "partitions": self.partitions,
            "replicas": self.replicas, "group": self.group, "consumers": self.consumers, "kills": self.kills,
            "session_timeout_ms": self.session_timeout_ms, "assignor": self.assignor.name(),
            "auto_commit_ms": self.auto_commit.as_millis() as u64, "produce_rate": self.produce_rate,
            "message_size": self.message_size, "settle_ms": self.settle.as_millis() as u64,
        })
    }
}

/// The `--report` JSON of `rebalance` (**API boundary**: keys other tools read).
#[derive(Clone, Debug, Serialize)]
pub struct RebalanceReport {
    /// Always `rebalance`.
    pub mode: String,
    /// Rounds made.
    pub kills: usize,
    /// Each round.
    pub runs: Vec<RunReport>,
    /// Percentiles of the runs' `expiry_to_assigned_ms`.
    pub expiry_to_assigned_ms: FailoverPercentiles,
    /// Percentiles of the runs' `expiry_to_stable_ms`.
    pub expiry_to_stable_ms: FailoverPercentiles,
    /// The longest pause of an unmoved partition in the kill windows.
    pub unmoved_pause_ms_max_kills: Option<f64>,
    /// The longest pause of an unmoved partition in any window of the rounds (kills and joins).
    pub unmoved_pause_ms_max: Option<f64>,
    /// The longest release-to-first-record pause of a moved partition in the kill windows.
    pub moved_pause_ms_max: Option<f64>,
    /// The targets and whether they were met.
    pub targets: Targets,
    /// Every rebalance window from the first kill on.
    pub windows: Vec<WindowReport>,
    /// Delivery gaps outside windows, over the whole run (the members' first joins included).
    pub steady_gap_ms: GapSummary,
    /// Records the producer had acknowledged.
    pub records_produced: u64,
    /// The settings.
    pub config: serde_json::Value,
    /// The commit measured.
    pub commit: String,
    /// Where it ran.
    pub machine: Machine,
}

/// One round.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Round number, from 1.
    pub run: usize,
    /// The member killed.
    pub victim: usize,
    /// From its last heartbeat (the poll that sent it) to the SIGKILL.
    pub kill_after_heartbeat_ms: f64,
    /// From the expiry until every partition was owned again (members' reports).
    pub expiry_to_assigned_ms: Option<f64>,
    /// From the expiry until DescribeGroup showed Stable with every partition assigned.
    pub expiry_to_stable_ms: f64,
    /// Partitions that moved in the kill window.
    pub moved: usize,
    /// The longest delivery gap of an unmoved partition in the kill window.
    pub unmoved_pause_ms: Option<f64>,
    /// The longest release-to-first-record pause of a moved partition.
    pub moved_pause_ms: Option<f64>,
    /// The replacement's join: window length.
    pub join_length_ms: Option<f64>,
    /// The replacement's join: longest pause of an unmoved partition.
    pub join_unmoved_pause_ms: Option<f64>,
}

/// The targets.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Targets {
    /// Median expiry-to-assigned, at most (ms).
    pub median_assigned_ms_max: f64,
    /// Whether it was met.
    pub median_assigned_met: bool,
    /// Longest pause of an unmoved partition, at most (ms).
    pub unmoved_pause_ms_max: f64,
    /// Whether it was met (every window of the rounds).
    pub unmoved_pause_met: bool,
}

/// Runs the experiment.
pub fn run(cfg: &RebalanceConfig) -> Result<RebalanceReport> {
    if cfg.consumers < 2 {
        bail!("a rebalance needs at least 2 consumers (one is killed, the others take over)");
    }
    let partitions = groups::ensure_topic(&cfg.brokers, &cfg.topic, cfg.partitions, cfg.replicas, &[])?;
    let feeder = Feeder::start(&cfg.brokers, &cfg.topic, partitions, cfg.produce_rate, cfg.message_size)?;
    let mut lab = Lab::new(cfg, partitions)?;
    let result = lab.rounds();
    let horizon = now_us();
    lab.stop_members();
    let (records_produced, _) = feeder.stop()?;
    let rounds = result?;
    let first = rounds.first().map_or(horizon, |r| r.killed_us);
    let mut events = std::mem::take(&mut lab.events);
    let analysis = analyze(&mut events, partitions, horizon);
    let runs: Vec<RunReport> = rounds.iter().enumerate().map(|(i, r)| r.report(i + 1, &analysis.windows)).collect();
    let windows: Vec<WindowReport> =
        analysis.windows.iter().filter(|w| w.start_us >= first).map(|w| WindowReport::new(w, first)).collect();
    let assigned: Vec<f64> = runs.iter().filter_map(|r| r.expiry_to_assigned_ms).collect();
    let stable: Vec<f64> = runs.iter().map(|r| r.expiry_to_stable_ms).collect();
    let expiry_to_assigned_ms = percentiles(&assigned).context("no round saw every partition assigned again")?;
    let unmoved_pause_ms_max = max_of(windows.iter().map(|w| w.unmoved_pause_ms));
    let steady: Vec<u64> = analysis.steady_gaps_us.clone();
    Ok(RebalanceReport {
        mode: "rebalance".into(),
        kills: runs.len(),
        expiry_to_stable_ms: percentiles(&stable).context("no rounds")?,
        unmoved_pause_ms_max_kills: max_of(runs.iter().map(|r| r.unmoved_pause_ms)),
        moved_pause_ms_max: max_of(runs.iter().map(|r| r.moved_pause_ms)),
        targets: Targets {
            median_assigned_ms_max: MEDIAN_ASSIGNED_MS_TARGET,
            median_assigned_met: expiry_to_assigned_ms.p50 <= MEDIAN_ASSIGNED_MS_TARGET,
            unmoved_pause_ms_max: UNMOVED_PAUSE_MS_TARGET,
            unmoved_pause_met: unmoved_pause_ms_max.is_none_or(|p| p <= UNMOVED_PAUSE_MS_TARGET),
        },
        expiry_to_assigned_ms,
        unmoved_pause_ms_max,
        runs,
        windows,
        steady_gap_ms: GapSummary::of_sorted_us(&steady),
        records_produced,
        config: cfg.to_json(),
        commit: report::commit(),
        machine: report::machine(),
    })
}

/// The table printed after a run.
pub fn table(r: &RebalanceReport) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let mut out = format!(
        "{:>4} {:>6} {:>9} {:>19} {:>17} {:>6} {:>17} {:>15} {:>8} {:>13}\n",
        "run",
        "victim",
        "hb→kill",
        "expiry→assigned ms",
        "expiry→stable ms",
        "moved",
        "unmoved pause ms",
        "moved pause ms",
        "join ms",
        "join pause ms"
    );
    for run in &r.runs {
        out.push_str(&format!(
            "{:>4} {:>6} {:>9.1} {:>19} {:>17.1} {:>6} {:>17} {:>15} {:>8} {:>13}\n",
            run.run,
            run.victim,
            run.kill_after_heartbeat_ms,
            opt(run.expiry_to_assigned_ms),
            run.expiry_to_stable_ms,
            run.moved,
            opt(run.unmoved_pause_ms),
            opt(run.moved_pause_ms),
            opt(run.join_length_ms),
            opt(run.join_unmoved_pause_ms)
        ));
    }
    let (a, s) = (r.expiry_to_assigned_ms, r.expiry_to_stable_ms);
    out.push_str(&format!(
        "expiry→assigned: p50 {:.1} ms  p90 {:.1} ms  max {:.1} ms over {} kills\n",
        a.p50, a.p90, a.max, r.kills
    ));
    out.push_str(&format!("expiry→stable:   p50 {:.1} ms  p90 {:.1} ms  max {:.1} ms\n", s.p50, s.p90, s.max));
    let g = r.steady_gap_ms;
    out.push_str(&format!(
        "unmoved partitions' longest pause: {} ms in kill windows, {} ms in any window; moved: {} ms; steady gaps p50 {:.1} p99 {:.1} max {:.1} ms\n",
        opt(r.unmoved_pause_ms_max_kills),
        opt(r.unmoved_pause_ms_max),
        opt(r.moved_pause_ms_max),
        g.p50,
        g.p99,
        g.max
    ));
    let met = |m: bool| if m { "met" } else { "NOT met" };
    let t = r.targets;
    out.push_str(&format!(
        "target: median expiry→assigned ≤ {:.0} ms: {} ({:.1} ms)\n",
        t.median_assigned_ms_max,
        met(t.median_assigned_met),
        a.p50
    ));
    out.push_str(&format!(
        "target: unmoved partitions never paused > {:.0} ms during a rebalance: {} ({} ms)\n",
        t.unmoved_pause_ms_max,
        met(t.unmoved_pause_met),
        opt(r.unmoved_pause_ms_max)
    ));
    out
}

/// `skein-loadgen member`: one group member printing its [`Event`]s, one per line, until its
/// standard input closes (then it commits and leaves).
pub fn member_main(cfg: &MemberConfig, member: usize) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::Builder::new().name("stdin".into()).spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            stop.store(true, Ordering::Relaxed);
        })?;
    }
    let mut out = std::io::stdout().lock();
    groups::run_member(cfg, member, &stop, &mut |e| {
        if writeln!(out, "{}", e.to_line()).and_then(|()| out.flush()).is_err() {
            stop.store(true, Ordering::Relaxed);
        }
    })?;
    Ok(())
}

/// A round's raw times (wall-clock µs).
struct Round {
    victim: usize,
    last_heartbeat_us: u64,
    killed_us: u64,
    expiry_us: u64,
    stable_us: u64,
    replacement_us: u64,
}

impl Round {
    fn report(&self, run: usize, windows: &[groups::Window]) -> RunReport {
        let e = self.expiry_us;
        let kill = windows.iter().find(|w| w.start_us <= e && w.end_us.is_none_or(|end| end >= e));
        let join = windows.iter().find(|w| w.start_us >= self.replacement_us);
        RunReport {
            run,
            victim: self.victim,
            kill_after_heartbeat_ms: ms(self.killed_us.saturating_sub(self.last_heartbeat_us)),
            expiry_to_assigned_ms: kill.and_then(|w| w.end_us).map(|end| ms(end.saturating_sub(e))),
            expiry_to_stable_ms: ms(self.stable_us.saturating_sub(e)),
            moved: kill.map_or(0, |w| w.moved.len()),
            unmoved_pause_ms: kill.and_then(|w| w.unmoved_pause_us).map(ms),
            moved_pause_ms: kill.and_then(|w| w.moved_pause_us).map(ms),
            join_length_ms: join.and_then(|w| w.end_us.map(|end| ms(end - w.start_us))),
            join_unmoved_pause_ms: join.and_then(|w| w.unmoved_pause_us).map(ms),
        }
    }
}

/// The member processes, their events and the admin client.
struct Lab<'a> {
    cfg: &'a RebalanceConfig,
    partitions: u32,
    rt: compio::runtime::Runtime,
    client: Client,
    rx: flume::Receiver<(Event, Instant)>,
    tx: flume::Sender<(Event, Instant)>,
    /// Oldest first.
    live: Vec<MemberProcess>,
    started: usize,
    events: Vec<Event>,
    /// Per member: its latest heartbeat's stamp and when its line arrived.
    last_heartbeat: std::collections::BTreeMap<usize, (u64, Instant)>,
}

struct MemberProcess {
    index: usize,
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl<'a> Lab<'a> {
    fn new(cfg: &'a RebalanceConfig, partitions: u32) -> Result<Lab<'a>> {
        let rt = compio::runtime::Runtime::new()?;
        let client =
            rt.block_on(Client::connect(&cfg.brokers)).with_context(|| format!("connecting to {}", cfg.brokers))?;
        let (tx, rx) = flume::unbounded();
        Ok(Lab {
            cfg,
            partitions,
            rt,
            client,
            rx,
            tx,
            live: Vec::new(),
            started: 0,
            events: Vec::new(),
            last_heartbeat: Default::default(),
        })
    }

    /// Starts the members, then makes the rounds.
    fn rounds(&mut self) -> Result<Vec<Round>> {
        for _ in 0..self.cfg.consumers {
            self.spawn()?;
        }
        self.wait_stable(self.cfg.consumers).context("the group did not become Stable")?;
        let mut rounds = Vec::with_capacity(self.cfg.kills);
        for k in 0..self.cfg.kills {
            self.idle(self.cfg.settle);
            let round = self.one_round().with_context(|| format!("kill {}", k + 1))?;
            eprintln!(
                "kill {:>3}: member {} expired; Stable {:.1} ms after the expiry",
                k + 1,
                round.victim,
                ms(round.stable_us.saturating_sub(round.expiry_us))
            );
            rounds.push(round);
        }
        self.idle(self.cfg.settle);
        Ok(rounds)
    }

    fn one_round(&mut self) -> Result<Round> {
        let victim = self.live.remove(0);
        let asked = Instant::now();
        let deadline = asked + HEARTBEAT_WAIT;
        loop {
            self.pump();
            if self.last_heartbeat.get(&victim.index).is_some_and(|(_, at)| *at > asked) {
                break;
            }
            if Instant::now() > deadline {
                bail!("member {} reported no heartbeat within {HEARTBEAT_WAIT:?}", victim.index);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let mut victim = victim;
        victim.child.kill().context("killing a member")?;
        let killed_us = now_us();
        victim.child.wait().context("reaping a member")?;
        // Its last lines (written before it died) are read to the end of its output.
        if let Some(r) = victim.reader.take() {
            let _ = r.join();
        }
        self.pump();
        let (last_heartbeat_us, _) = self.last_heartbeat[&victim.index];
        let expiry_us = last_heartbeat_us + u64::from(self.cfg.session_timeout_ms) * 1000;
        self.events.push(Event { t_us: expiry_us, member: victim.index, kind: EventKind::Expired });
        let stable_us = self.wait_stable(self.cfg.consumers - 1).context("after the kill")?;
        let replacement_us = now_us();
        self.spawn()?;
        self.wait_stable(self.cfg.consumers).context("after the replacement joined")?;
        Ok(Round { victim: victim.index, last_heartbeat_us, killed_us, expiry_us, stable_us, replacement_us })
    }

    /// Waits until the group is Stable with `members` members and every partition assigned;
    /// returns when that was first seen (µs).
    fn wait_stable(&mut self, members: usize) -> Result<u64> {
        let deadline = Instant::now() + self.cfg.stable_timeout;
        loop {
            self.pump();
            let asked = self.rt.block_on(self.client.describe_group(&self.cfg.group));
            let at = now_us();
            if let Ok(d) = &asked {
                if stable_and_covered(d, &self.cfg.topic, self.partitions, members) {
                    return Ok(at);
                }
            }
            if Instant::now() > deadline {
                bail!("not Stable with {members} members within {:?}: {asked:?}", self.cfg.stable_timeout);
            }
            if let Some(dead) =
                self.live.iter_mut().find_map(|m| matches!(m.child.try_wait(), Ok(Some(_))).then_some(m.index))
            {
                bail!("member {dead} exited on its own");
            }
            std::thread::sleep(DESCRIBE_INTERVAL);
        }
    }

    fn idle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.pump();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pump(&mut self) {
        for (e, at) in self.rx.try_iter() {
            if e.kind == EventKind::Heartbeat {
                self.last_heartbeat.insert(e.member, (e.t_us, at));
            }
            self.events.push(e);
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let index = self.started;
        let cfg = self.cfg;
        let mut child = Command::new(&cfg.member_exe)
            .args(["member", "--brokers", &cfg.brokers, "--topic", &cfg.topic, "--group", &cfg.group])
            .args(["--session-timeout-ms", &cfg.session_timeout_ms.to_string()])
            .args(["--assignor", cfg.assignor.name()])
            .args(["--auto-commit-ms", &cfg.auto_commit.as_millis().to_string()])
            .args(["--member", &index.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} member", cfg.member_exe.display()))?;
        let stdout = child.stdout.take().context("the member's stdout is piped")?;
        let tx = self.tx.clone();
        let reader = std::thread::Builder::new().name(format!("member-{index}-out")).spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(e) = Event::from_line(index, &line) {
                    let _ = tx.send((e, Instant::now()));
                }
            }
        })?;
        self.live.push(MemberProcess { index, child, reader: Some(reader) });
        self.started += 1;
        Ok(())
    }

    /// Closes the members' standard input (they commit and leave), waits a little, then
    /// kills whoever is left.
    fn stop_members(&mut self) {
        for m in &mut self.live {
            drop(m.child.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for m in &mut self.live {
            while matches!(m.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = m.child.kill();
            let _ = m.child.wait();
            if let Some(r) = m.reader.take() {
                let _ = r.join();
            }
        }
        self.live.clear();
        self.pump();
    }
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        for m in &mut self.live {
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}

/// Stable, `members` members, and every partition of `topic` in some member's assignment.
fn stable_and_covered(d: &DescribeGroupResponse, topic: &str, partitions: u32, members: usize) -> bool {
    if d.state != "Stable" || d.members.len() != members {
        return false;
    }
    let owned: std::collections::BTreeSet<u32> = d
        .members
        .iter()
        .flat_map(|m| m.assignment.iter())
        .filter(|tp| tp.topic == topic)
        .map(|tp| tp.partition)
        .collect();
    (0..partitions).all(|p| owned.contains(&p))
}

/// How often DescribeGroup is asked while waiting for Stable.
pub const DESCRIBE_INTERVAL: Duration = Duration::from_millis(10);
/// The longest wait for the victim's next heartbeat.
const HEARTBEAT_WAIT: Duration = Duration::from_secs(10);
/// The target for the median expiry-to-assigned (ms).
const MEDIAN_ASSIGNED_MS_TARGET: f64 = 500.0;
/// The target for the longest pause of an unmoved partition (ms).
const UNMOVED_PAUSE_MS_TARGET: f64 = 50.0;
