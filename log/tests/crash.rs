//! Kill -9 (`crash_`): a child process appends with group-committed syncs and is SIGKILLed at
//! random moments, over and over on the same directory. After each kill the log reopens with
//! every offset the child reported durable present and intact (CRC and content checked), no
//! torn batch served, and appends continuing at the right offset.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{batch, read_all};
use skein_log::storage::{splitmix, FileStorage};
use skein_log::types::{LeaderEpoch, Offset, Timestamp};
use skein_log::{Log, LogConfig};

const KILLS: u64 = 24;

#[test]
fn crash_sigkill_keeps_every_durable_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = 0x5EED_u64;
    let mut total_durable_reports = 0;
    for round in 0..KILLS {
        let mode = if round % 3 == 2 { "interval" } else { "always" };
        let (durable, reports) = run_child_until_killed(dir.path(), mode, &mut rng);
        total_durable_reports += reports;
        check_after_kill(dir.path(), durable, round);
    }
    assert!(total_durable_reports > KILLS, "children made progress: {total_durable_reports} reports");
}

/// Starts the child, kills it after a random delay; returns the highest durable offset it
/// reported and how many reports it made.
fn run_child_until_killed(dir: &Path, mode: &str, rng: &mut u64) -> (Offset, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein-log-crash-child"))
        .arg(dir)
        .arg(mode)
        .arg(splitmix(rng).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn crash child");
    let stdout = child.stdout.take().expect("piped stdout");
    let durable = Arc::new(AtomicU64::new(0));
    let reports = Arc::new(AtomicU64::new(0));
    let reader = {
        let (durable, reports) = (durable.clone(), reports.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("durable ").and_then(|n| n.parse::<u64>().ok()) {
                    durable.fetch_max(n, Ordering::SeqCst);
                    reports.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(30 + splitmix(rng) % 120));
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap child");
    assert!(!status.success(), "the child runs until killed, exited {status}");
    reader.join().expect("reader thread");
    (Offset(durable.load(Ordering::SeqCst)), reports.load(Ordering::SeqCst))
}

fn check_after_kill(dir: &Path, durable: Offset, round: u64) {
    let now = Timestamp(0);
    let mut log = Log::open(FileStorage::new(dir).expect("dir"), LogConfig::default(), now)
        .unwrap_or_else(|e| panic!("round {round}: reopen after kill: {e}"));
    let end = log.log_end_offset();
    assert!(end >= durable, "round {round}: durable offset {durable} reported, log ends at {end}");
    let records = read_all(&log, Offset(0), 1 << 20);
    assert_eq!(records.len() as u64, end.get(), "round {round}: every offset present");
    for r in &records {
        assert_eq!(r.id, r.offset.get(), "round {round}: record at {} holds {}", r.offset, r.id);
    }
    let info = log.append(batch(&[(end.get(), now)], 50, LeaderEpoch(0)), now).expect("append after reopen");
    assert_eq!(info.base_offset, end, "round {round}: appends go on at the log end");
    if round.is_multiple_of(2) {
        log.close(now).expect("clean close");
    } else {
        log.sync(now).expect("sync");
    }
}
