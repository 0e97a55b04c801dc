//! `skein-loadgen consume --group` and `rebalance` against real brokers: the reports carry
//! their documented keys, the group's lag ends at 0 once the producer stops, and the
//! rebalance experiment makes its rounds. Figures are not asserted (the machine is shared).

mod common;

use std::process::Command;

fn loadgen(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_skein-loadgen")).args(args).output().expect("run skein-loadgen");
    assert!(
        out.status.success(),
        "skein-loadgen {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

fn finite_or_null(v: &serde_json::Value, what: &str) {
    assert!(v.is_null() || v.as_f64().is_some_and(f64::is_finite), "{what}: {v}");
}

#[test]
fn consume_group_reports_lag_rebalances_and_pauses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("group.json");
    let out = loadgen(&[
        "consume",
        "--embedded",
        "--group",
        "g",
        "--consumers",
        "3",
        "--partitions",
        "6",
        "--produce-rate",
        "600",
        "--message-size",
        "64",
        "--duration",
        "4s",
        "--join-interval",
        "300ms",
        "--churn-interval",
        "1500ms",
        "--report",
        report.to_str().expect("utf8"),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("lag") && table.contains("unmoved partitions during a rebalance"), "{table}");
    let r = json(&report);
    for key in [
        "mode",
        "group",
        "seconds",
        "records_produced",
        "records_consumed",
        "records_consumed_in_run",
        "records_per_sec",
        "bytes_per_sec",
        "lag",
        "lag_total",
        "rebalances",
        "windows",
        "unmoved_pause_ms_max",
        "moved_pause_ms_max",
        "steady_gap_ms",
        "config",
        "commit",
        "machine",
    ] {
        assert!(r.get(key).is_some(), "report has {key}: {r}");
    }
    assert_eq!(r["mode"], "consume-group");
    let produced = r["records_produced"].as_u64().expect("records_produced");
    assert!(produced > 0, "{r}");
    assert!(r["records_consumed"].as_u64().expect("records_consumed") >= produced, "every record was read: {r}");
    let lag = r["lag"].as_array().expect("lag per partition");
    assert_eq!(lag.len(), 6, "{r}");
    assert_eq!(r["lag_total"], 0, "the group caught up once the producer stopped: {r}");
    for l in lag {
        assert_eq!(l["lag"], 0, "{l}");
        assert_eq!(l["committed"], l["log_end"], "{l}");
    }
    let b = &r["rebalances"];
    for key in ["windows", "member_rebalances", "members_started", "joins", "assigned", "revoked", "lost", "commits"] {
        assert!(b[key].as_u64().is_some(), "rebalances has {key}: {b}");
    }
    assert!(b["windows"].as_u64() >= Some(3), "the joins and the churn rebalanced: {b}");
    assert!(b["member_rebalances"].as_u64() >= Some(3), "{b}");
    assert_eq!(b["windows"].as_u64(), Some(r["windows"].as_array().expect("windows").len() as u64));
    for w in r["windows"].as_array().expect("windows") {
        for key in ["start_ms", "length_ms", "unmoved_pause_ms", "moved_pause_ms"] {
            finite_or_null(&w[key], key);
        }
    }
    finite_or_null(&r["unmoved_pause_ms_max"], "unmoved_pause_ms_max");
    for key in ["p50", "p99", "max"] {
        assert!(r["steady_gap_ms"][key].as_f64().is_some_and(f64::is_finite), "steady_gap_ms {key}: {r}");
    }
}

#[test]
fn rebalance_makes_its_rounds_and_reports_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("rebalance.json");
    let broker = common::broker_binary();
    let out = loadgen(&[
        "rebalance",
        "--cluster-bin",
        broker.to_str().expect("utf8"),
        "--nodes",
        "1",
        "--consumers",
        "3",
        "--kills",
        "2",
        "--session-timeout-ms",
        "1000",
        "--settle",
        "300ms",
        "--report",
        report.to_str().expect("utf8"),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("expiry→assigned") && table.contains("target:"), "{table}");
    let r = json(&report);
    assert_eq!(r["mode"], "rebalance");
    assert_eq!(r["kills"], 2);
    let runs = r["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{r}");
    for run in runs {
        for key in ["kill_after_heartbeat_ms", "expiry_to_assigned_ms", "expiry_to_stable_ms"] {
            assert!(run[key].as_f64().is_some_and(f64::is_finite), "{key}: {run}");
        }
        for key in ["unmoved_pause_ms", "moved_pause_ms", "join_length_ms", "join_unmoved_pause_ms"] {
            finite_or_null(&run[key], key);
        }
        assert!(run["moved"].as_u64() >= Some(1), "the victim's partitions moved: {run}");
    }
    for p in ["expiry_to_assigned_ms", "expiry_to_stable_ms"] {
        for key in ["p50", "p90", "max"] {
            assert!(r[p][key].as_f64().is_some_and(f64::is_finite), "{p}.{key}: {r}");
        }
    }
    for key in ["median_assigned_met", "unmoved_pause_met"] {
        assert!(r["targets"][key].is_boolean(), "targets.{key}: {r}");
    }
}
