//! `skein-loadgen tables` against a local cluster of one broker it starts itself: the transfer
//! and append workloads run for about two seconds each, the reports carry pgserbench's keys
//! (plus level, replicas and fsync) and the invariants hold; the append history is written in
//! the Elle format.

mod common;

use std::process::Command;

fn tables(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.json");
    let bin = common::broker_binary();
    let out = Command::new(env!("CARGO_BIN_EXE_skein-loadgen"))
        .args(["tables", "--broker-bin", bin.to_str().expect("utf8"), "--seconds", "2", "--clients", "4"])
        .args(["--report", report.to_str().expect("utf8")])
        .args(args)
        .output()
        .expect("run skein-loadgen");
    assert!(
        out.status.success(),
        "skein-loadgen tables {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("commits/s") && stdout.contains("invariant ok"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("JSON");
    for key in [
        "workload",
        "clients",
        "isolation",
        "seconds",
        "commits",
        "commits_per_sec",
        "aborts",
        "abort_rate",
        "latency_us",
        "invariant_ok",
        "invariant",
        "params",
        "abort_codes",
        "abandoned",
        "attempts_per_commit",
        "cpu",
        "level",
        "replicas",
        "fsync",
    ] {
        assert!(r.get(key).is_some(), "report has {key}: {r}");
    }
    for key in ["p50", "p99", "p999", "max", "mean"] {
        assert!(r["latency_us"][key].as_u64().is_some(), "latency_us has {key}");
    }
    assert_eq!(r["invariant_ok"], true, "{r}");
    assert!(r["commits"].as_u64().expect("commits") > 0, "{r}");
    assert_eq!((r["replicas"].as_u64(), r["fsync"].as_str()), (Some(1), Some("flush.ms=always")));
    r
}

#[test]
fn transfer_and_append_run_on_a_one_broker_cluster_and_keep_their_invariants() {
    let r = tables(&["--workload", "transfer", "--accounts", "10", "--isolation", "serializable"]);
    assert_eq!((r["workload"].as_str(), r["isolation"].as_str()), (Some("transfer"), Some("serializable")));
    assert_eq!(r["invariant"]["total_balance"], 1000, "{r}");

    let dir = tempfile::tempdir().expect("tempdir");
    let history = dir.path().join("history.jsonl");
    let r = tables(&[
        "--workload",
        "append",
        "--keys",
        "20",
        "--isolation",
        "serializable",
        "--history",
        history.to_str().expect("utf8"),
    ]);
    assert_eq!(r["workload"], "append");
    assert_eq!(r["invariant"]["reads_not_prefix_of_final"], 0, "{r}");
    let text = std::fs::read_to_string(&history).expect("history written");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, r["commits"].as_u64().expect("commits"));
    let first: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!((first["type"].as_str(), first["level"].as_str()), (Some("ok"), Some("serializable")));
    assert!(first["ops"].as_array().is_some_and(|ops| !ops.is_empty()), "{first}");
    let history = skein_broker::check::elle::parse_history(&text).expect("the Elle checker reads it");
    assert_eq!(history.txns.len(), lines.len());
    let checked = skein_broker::check::elle::check_list_append(&history);
    assert!(checked.valid, "{:?}", checked.forbidden_found);
}
