//! The `skein` CLI's transaction options and commands: usage errors, which need no broker
//! (clap exits with status 2 before connecting). Behaviour against real brokers is tested
//! elsewhere.

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
fn transaction_usage_errors_exit_2() {
    check_usage_error(&["produce", "t", "--transaction-size", "5"], "--transactional-id");
    check_usage_error(&["produce", "t", "--abort"], "--transactional-id");
    check_usage_error(&["produce", "t", "--transactional-id", "x", "--transaction-size", "0"], "0");
    check_usage_error(&["produce", "t", "--transactional-id", "x", "--acks", "leader"], "--acks");
    check_usage_error(&["consume", "t", "--isolation", "committed"], "committed");
    check_usage_error(&["txn", "describe"], "<ID>");
    check_usage_error(&["txn", "abort"], "<ID>");
    check_usage_error(&["txn", "frobnicate"], "frobnicate");
}

#[test]
fn transaction_commands_without_a_broker_fail_with_status_1() {
    for args in [&["txn", "list"][..], &["txn", "abort", "x"], &["txn", "describe", "x", "--json"]] {
        let out = skein(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}
