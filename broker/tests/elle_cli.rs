//! `skein-elle` end to end: exit status 0 for a valid history, 1 for an invalid one (with the
//! anomaly named in the summary and in the JSON report), 2 for bad input or usage.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use tempfile::NamedTempFile;

fn history(lines: &[&str]) -> NamedTempFile {
    let mut file = NamedTempFile::new().expect("temp file");
    for line in lines {
        writeln!(file, "{line}").expect("write history");
    }
    file
}

fn elle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skein-elle")).args(args).stdin(Stdio::null()).output().expect("run skein-elle")
}

fn path(file: &NamedTempFile) -> &str {
    file.path().to_str().expect("utf-8 temp path")
}

const SERIAL: &[&str] = &[
    r#"{"process":1,"type":"ok","ops":[["r","x",[]],["append","x",1]],"start_us":0,"end_us":5}"#,
    r#"{"process":2,"type":"ok","ops":[["r","x",[1]],["append","y",1]],"start_us":10,"end_us":15}"#,
    r#"{"process":3,"type":"ok","ops":[["r","x",[1]],["r","y",[1]]],"start_us":20,"end_us":25}"#,
];

const WRITE_SKEW: &[&str] = &[
    r#"{"process":1,"type":"ok","ops":[["r","x",[]],["r","y",[]],["append","x",1]]}"#,
    r#"{"process":2,"type":"ok","ops":[["r","x",[]],["r","y",[]],["append","y",2]]}"#,
    r#"{"process":3,"type":"ok","ops":[["r","x",[1]],["r","y",[2]]]}"#,
];

#[test]
fn elle_a_valid_history_exits_0() {
    let file = history(SERIAL);
    let out = elle(&[path(&file), "--realtime"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 transactions") && stdout.trim_end().ends_with("valid"), "{stdout}");
}

#[test]
fn elle_an_invalid_history_exits_1_and_names_the_anomaly() {
    let file = history(WRITE_SKEW);
    let out = elle(&[path(&file), "--model", "list-append"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("G2-item") && stdout.contains("invalid: G2-item"), "{stdout}");

    let out = elle(&[path(&file), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["valid"], false);
    assert_eq!(report["counts"]["G2-item"], 1);
    assert_eq!(report["anomalies"]["G2-item"][0]["cycle"][0]["kind"], "rw");

    // Write skew is allowed under snapshot isolation.
    let out = elle(&[path(&file), "--level", "snapshot"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn elle_a_declared_level_is_used_unless_overridden() {
    let lines: Vec<String> = WRITE_SKEW.iter().map(|l| l.replacen("{", r#"{"level":"snapshot","#, 1)).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let file = history(&lines);
    assert_eq!(elle(&[path(&file)]).status.code(), Some(0));
    assert_eq!(elle(&[path(&file), "--level", "serializable"]).status.code(), Some(1));
}

#[test]
fn elle_bad_input_exits_2_with_a_clear_message() {
    let file = history(&[SERIAL[0], "{\"process\":2,\"type\":\"ok\",\"ops\":[[\"cas\",\"x\",1]]}"]);
    let out = elle(&[path(&file)]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2") && stderr.contains("unknown operation"), "{stderr}");

    let file = history(SERIAL);
    for args in [
        vec![path(&file), "--model", "rw-register"],
        vec![path(&file), "--model", "graph"],
        vec![path(&file), "--level", "eventual"],
        vec!["/nonexistent/history.jsonl"],
        vec![],
    ] {
        let out = elle(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}
