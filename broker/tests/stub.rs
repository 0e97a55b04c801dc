//! The stub broker opens its log and shuts down cleanly on SIGTERM and SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn start_and_signal(data: &std::path::Path, signal: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein-broker"))
        .args(["--data-dir".as_ref(), data.as_os_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start broker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready");
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "clean exit on {signal}: {exit}");
    assert!(data.join("__stub-0/clean-shutdown").exists(), "log closed cleanly on {signal}");
}

#[test]
fn stub_broker_closes_its_log_cleanly_on_sigterm_and_sigint() {
    let dir = tempfile::tempdir().expect("tempdir");
    start_and_signal(dir.path(), "-TERM");
    start_and_signal(dir.path(), "-INT");
}
