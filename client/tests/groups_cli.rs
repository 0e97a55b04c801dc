//! The `skein` CLI's consumer group commands: usage errors, which need no broker (clap exits
//! with status 2 before connecting). Behaviour against real brokers is tested elsewhere.

use std::process::{Command, Output};

/// Runs `skein ARGS...` against an address nothing listens on.
fn skein(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skein")).args(["--brokers", "127.0.0.1:1"]).args(args).output().expect("skein ran")
}

/// The command is refused as a usage error (status 2) naming `mentions` on stderr.
fn check_usage_error(args: &[&str], mentions: &str) {
    let out = skein(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
}

#[test]
fn group_usage_errors_exit_2() {
    check_usage_error(&["consume", "t", "--group", "g", "--partition", "1"], "--partition");
    check_usage_error(&["consume", "t", "--group", "g", "--from", "5"], "--from");
    check_usage_error(&["consume", "t", "--group", "g", "--from", "-3"], "--from");
    check_usage_error(&["consume", "t", "--group", "g", "--assignor", "greedy"], "greedy");
    check_usage_error(&["consume", "t", "--instance-id", "i"], "--group");
    check_usage_error(&["group", "reset-offsets", "g", "--topic", "t"], "--to");
    check_usage_error(&["group", "reset-offsets", "g", "--to", "earliest"], "--topic");
    check_usage_error(&["group", "reset-offsets", "g", "--topic", "t", "--to", "yesterday"], "yesterday");
    check_usage_error(&["group", "describe"], "<GROUP>");
    check_usage_error(&["group", "delete"], "<GROUP>");
    check_usage_error(&["group", "frobnicate"], "frobnicate");
}

#[test]
fn group_commands_without_a_broker_fail_with_status_1() {
    let out = skein(&["group", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}
