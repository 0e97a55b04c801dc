//! `skein-loadgen` end to end with an embedded broker: every mode runs, and the report, the
//! interval log and the plots are written with the documented keys.

use std::process::Command;

fn loadgen(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_skein-loadgen")).args(args).output().expect("run skein-loadgen");
    assert!(out.status.success(), "skein-loadgen {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

#[test]
fn produce_e2e_and_consume_write_reports_logs_and_plots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| dir.path().join(name);
    let s = |path: &std::path::Path| path.to_str().expect("utf8").to_owned();
    let (produce, e2e, hlog, svg, cmp) = (p("produce.json"), p("e2e.json"), p("e2e.hlog"), p("e2e.svg"), p("cmp.svg"));
    let out = loadgen(&[
        "produce",
        "--embedded",
        "--partitions",
        "4",
        "--message-size",
        "256",
        "--key-distribution",
        "zipf:50:1.1",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--report",
        &s(&produce),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("records/s") && table.contains("p99.99"), "{table}");
    let r = json(&produce);
    for key in [
        "mode",
        "messages",
        "bytes",
        "seconds",
        "messages_per_sec",
        "bytes_per_sec",
        "latency_us",
        "config",
        "commit",
        "machine",
    ] {
        assert!(r.get(key).is_some(), "report has {key}");
    }
    for key in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(r["latency_us"][key].as_u64().is_some(), "latency_us has {key}");
    }
    assert_eq!(r["mode"], "produce");
    assert!(r["messages"].as_u64().expect("messages") > 0);
    assert!(r["latency_us"]["p50"].as_u64() <= r["latency_us"]["p99"].as_u64());
    assert!(r["machine"]["cores"].as_u64().expect("cores") >= 1);
    assert!(r.get("publish_latency_us").is_none(), "only e2e splits publish from delivery");
    // Its own CPU over the measured second (with --embedded the broker runs in it too).
    let cpu = r["loadgen_cpu_seconds"].as_f64().expect("loadgen_cpu_seconds");
    let cores = r["machine"]["cores"].as_f64().expect("cores");
    assert!(cpu > 0.0 && cpu <= (r["seconds"].as_f64().expect("seconds") + 0.2) * cores, "{cpu} s of CPU");
    assert!(table.contains("loadgen cpu"), "{table}");
    assert!(r["steal_seconds"].as_f64().is_some_and(|s| s >= 0.0), "steal_seconds is reported");

    loadgen(&[
        "e2e",
        "--embedded",
        "--topic-config",
        "preallocate=true",
        "--rate",
        "2000",
        "--message-size",
        "64",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--report",
        &s(&e2e),
        "--hdr",
        &s(&hlog),
        "--plot",
        &s(&svg),
    ]);
    let r = json(&e2e);
    assert_eq!(r["mode"], "e2e");
    let received = r["messages"].as_u64().expect("messages");
    assert!((1500..=2500).contains(&received), "about 2000 records in the measured second: {received}");
    for key in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(r["publish_latency_us"][key].as_u64().is_some(), "publish_latency_us has {key}");
    }
    assert_eq!(r["config"]["topic_configs"][0], serde_json::json!(["preallocate", "true"]));
    let log = std::fs::read_to_string(&hlog).expect("interval log");
    assert!(log.contains("#[StartTime:"), "{log}");
    assert!(log.lines().filter(|l| !l.starts_with('#') && !l.starts_with("\"")).count() >= 1, "{log}");
    assert!(std::fs::read_to_string(&svg).expect("svg").starts_with("<svg"));

    loadgen(&["plot", &s(&produce), &s(&e2e), "-o", &s(&cmp)]);
    let chart = std::fs::read_to_string(&cmp).expect("comparison chart");
    assert!(chart.contains("produce") && chart.contains("e2e"));
}

#[test]
fn topic_configs_reach_the_broker() {
    let out = Command::new(env!("CARGO_BIN_EXE_skein-loadgen"))
        .args(["produce", "--embedded", "--topic-config", "colour=blue", "--duration", "200ms", "--warmup", "0s"])
        .output()
        .expect("run skein-loadgen");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("colour"), "the broker refuses an unknown config: {err}");
    let out = Command::new(env!("CARGO_BIN_EXE_skein-loadgen"))
        .args(["produce", "--embedded", "--topic-config", "preallocate"])
        .output()
        .expect("run skein-loadgen");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

#[test]
fn consume_reads_what_was_produced() {
    // One process: produce a known count, then consume it all from the beginning.
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("c.json");
    let broker = skein_loadgen_test_broker(dir.path());
    let addr = broker.1.clone();
    loadgen(&[
        "produce",
        "--brokers",
        &addr,
        "--topic",
        "c",
        "--partitions",
        "2",
        "--messages",
        "5000",
        "--warmup",
        "0s",
        "--message-size",
        "100",
    ]);
    loadgen(&[
        "consume",
        "--brokers",
        &addr,
        "--topic",
        "c",
        "--consumers",
        "2",
        "--messages",
        "5000",
        "--warmup",
        "0s",
        "--report",
        report.to_str().expect("utf8"),
    ]);
    let r = json(&report);
    assert_eq!(r["mode"], "consume");
    assert_eq!(r["messages"].as_u64(), Some(5000));
    drop(broker);
}

#[test]
fn limits_reports_the_machine_ceilings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("limits.json");
    let out = loadgen(&[
        "limits",
        "--data-dir",
        dir.path().to_str().expect("utf8"),
        "--duration",
        "200ms",
        "--report",
        report.to_str().expect("utf8"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("loopback TCP"));
    let r = json(&report);
    assert!(r["tcp_bytes_per_sec"].as_f64().expect("tcp") > 0.0);
    assert!(r["disk_write_bytes_per_sec"].as_f64().expect("disk") > 0.0);
    assert!(r["fdatasync_us"]["p50"].as_u64().is_some() && r["fdatasync_us"]["p99"].as_u64().is_some());
}

/// A broker process (the `skein-broker` binary next to this test's binaries).
fn skein_loadgen_test_broker(dir: &std::path::Path) -> (Child, String) {
    use std::io::BufRead;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_skein-loadgen")).with_file_name("skein-broker");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        assert!(Command::new(cargo).args(["build", "-q", "-p", "skein-broker"]).status().expect("build").success());
    }
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("broker"))
        .env("SKEIN_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start broker");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let addr = line.trim().strip_prefix("ready ").expect("ready ADDR").to_owned();
    (Child(child), addr)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cluster_faults_and_failover_kills_need_a_cluster_started_by_loadgen() {
    let out = Command::new(env!("CARGO_BIN_EXE_skein-loadgen"))
        .args(["verify", "--brokers", "127.0.0.1:1", "--faults", "kill-leader"])
        .output()
        .expect("run skein-loadgen");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kill-leader needs a cluster") && err.contains("--cluster-bin"), "{err}");
    let out =
        Command::new(env!("CARGO_BIN_EXE_skein-loadgen")).args(["failover", "--kills", "1"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cluster-bin"), "{err}");
}
