//! The `skein` CLI and the client examples against a real broker: the documented command
//! contract, output formats and exit codes.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{sibling, Broker};

fn skein(broker: &Broker, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(sibling("skein", &["--bin", "skein"]))
        .arg("--brokers")
        .arg(&broker.addr)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skein");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("skein output")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "skein failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).expect("utf8")
}

#[test]
fn cli_topic_produce_consume_describe_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    stdout(&skein(&broker, &["topic", "create", "events", "--partitions", "3"], None));
    assert_eq!(stdout(&skein(&broker, &["topic", "list"], None)), "events\n");
    let input = "alice:1\nbob:2\nalice:3\ncarol:4\n";
    let offsets =
        stdout(&skein(&broker, &["produce", "events", "--key-separator", ":", "--print-offsets"], Some(input)));
    let lines: Vec<(u32, u64)> = offsets
        .lines()
        .map(|l| {
            let (p, o) = l.split_once(' ').expect("PARTITION OFFSET");
            (p.parse().expect("partition"), o.parse().expect("offset"))
        })
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0].0, lines[2].0, "one key, one partition");
    assert!(lines[2].1 > lines[0].1, "in input order");
    let consumed = stdout(&skein(&broker, &["consume", "events", "--count", "4", "--format", "%p %o %k=%v"], None));
    let mut got: Vec<&str> = consumed.lines().collect();
    got.sort_unstable();
    let mut want: Vec<String> = ["alice=1", "bob=2", "alice=3", "carol=4"]
        .iter()
        .zip(&lines)
        .map(|(kv, (p, o))| format!("{p} {o} {kv}"))
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
    let tabbed = stdout(&skein(
        &broker,
        &[
            "consume",
            "events",
            "--partition",
            &lines[1].0.to_string(),
            "--from",
            "0",
            "--timeout-ms",
            "300",
            "--format",
            "%k\\t%v",
        ],
        None,
    ));
    assert!(tabbed.lines().any(|l| l == "bob\t2"), "{tabbed:?}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&skein(&broker, &["topic", "describe", "events", "--json"], None))).expect("json");
    assert_eq!(json["topic"], "events");
    let parts = json["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 3);
    let total: u64 = parts.iter().map(|p| p["log_end"].as_u64().expect("log_end")).sum();
    assert_eq!(total, 4);
    for key in ["partition", "leader", "leader_epoch", "replicas", "isr", "log_start", "high_watermark", "log_end"] {
        assert!(parts[0].get(key).is_some(), "describe --json has {key}");
    }
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&skein(&broker, &["cluster", "status", "--json"], None))).expect("json");
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(1));
    stdout(&skein(&broker, &["topic", "delete", "events"], None));
    assert_eq!(stdout(&skein(&broker, &["topic", "list"], None)), "");
}

#[test]
fn cli_errors_are_one_line_with_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let usage = skein(&broker, &["topic", "frobnicate"], None);
    assert_eq!(usage.status.code(), Some(2), "usage error");
    let missing = skein(&broker, &["topic", "describe", "nope"], None);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("UNKNOWN_TOPIC_OR_PARTITION"), "{err}");
    let failed = skein(&broker, &["produce", "nope", "--partition", "0"], Some("x\n"));
    assert_eq!(failed.status.code(), Some(1));
    let bad = skein(&broker, &["topic", "create", "bad/name"], None);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_TOPIC"));
}

#[test]
fn cli_usage_mistakes_exit_2_and_from_minus_n_reads_the_last_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let created = stdout(&skein(&broker, &["topic", "create", "one"], None));
    assert_eq!(created, "created topic one with 1 partition\n");
    stdout(&skein(&broker, &["produce", "one"], Some("a\nb\nc\nd\n")));
    for (args, says) in [
        (&["consume", "one", "--from", "yesterday"][..], "yesterday"),
        (&["consume", "one", "--format", "%x"][..], "%x"),
        (&["consume", "one", "--format", "100%"][..], "'%'"),
        (&["consume", "one", "--format", "\\q"][..], "\\q"),
        (&["--timeout", "soon", "topic", "list"][..], "soon"),
    ] {
        let out = skein(&broker, args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let last = stdout(&skein(&broker, &["consume", "one", "--from", "-2", "--count", "2"], None));
    assert_eq!(last, "c\nd\n");
    let all = stdout(&skein(&broker, &["consume", "one", "--from", "-10", "--count", "4", "--format", "%o%%"], None));
    assert_eq!(all, "0%\n1%\n2%\n3%\n", "clamped at the log start; %% is a percent sign");
}

#[test]
fn produce_print_offsets_names_each_failed_record_on_its_own_line_in_input_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    stdout(&skein(&broker, &["topic", "create", "two", "--partitions", "2"], None));
    let out = skein(&broker, &["produce", "two", "--partition", "5", "--print-offsets"], Some("a\nb\n"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "error 5 INVALID\nerror 5 INVALID\n");
    assert!(err.lines().any(|l| l.starts_with("skein: line 1: partition 5: INVALID")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("skein: line 2: partition 5: INVALID")), "{err}");
    assert!(err.contains("2 of 2 records failed"), "{err}");
    let ok = stdout(&skein(&broker, &["produce", "two", "--partition", "1", "--print-offsets"], Some("x\ny\n")));
    assert_eq!(ok, "1 0\n1 1\n");
}

#[test]
fn timeout_bounds_a_command_against_a_paused_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    stdout(&skein(&broker, &["topic", "create", "p"], None));
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let start = std::time::Instant::now();
    let produce = skein(&broker, &["--timeout", "2s", "produce", "p", "--print-offsets"], Some("a\n"));
    let list = skein(&broker, &["--timeout", "1500ms", "topic", "list"], None);
    let took = start.elapsed();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    assert_eq!(produce.status.code(), Some(1));
    assert_eq!(list.status.code(), Some(1));
    assert!(took < std::time::Duration::from_secs(10), "bounded by --timeout: took {took:?}");
    let err = String::from_utf8_lossy(&produce.stderr);
    assert!(!err.contains("InitProducerId"), "says it in user terms: {err}");
    assert!(err.contains("no broker") && err.contains("producer an id"), "{err}");
}

#[test]
fn client_examples_compile_and_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), &[]);
    let out = Command::new(sibling("producer", &["--example", "producer"]))
        .args([&broker.addr, "ex", "6"])
        .output()
        .expect("producer");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 6);
    let out = Command::new(sibling("consumer", &["--example", "consumer"]))
        .args([&broker.addr, "ex", "6"])
        .output()
        .expect("consumer");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(text.contains("event 5"));
    // The at-least-once group example reads all six, commits, and a second run in the same
    // group finds nothing new (it starts at the committed offsets).
    for want in [6, 0] {
        let out = Command::new(sibling("group_consumer", &["--example", "group_consumer"]))
            .args([&broker.addr, "ex", "ex-group"])
            .output()
            .expect("group consumer");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), want, "{text}");
    }
}
