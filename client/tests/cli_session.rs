//! The `skein` CLI's `--session` and `--prefer-replica` against a real single-node broker:
//! a produce writes the session file, a consume carries it and reads the writes back.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use skein_client::{Client, Session};

/// Runs `skein --brokers ADDR ARGS...` with `stdin` as input.
fn skein(addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skein"))
        .arg("--brokers")
        .arg(addr)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skein");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("skein ran")
}

#[test]
fn produce_and_consume_share_a_session_file() {
    let broker = common::Broker::start();
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        client.create_topic("s", 1, 1, &[]).await.expect("create");
    });
    let dir = std::env::temp_dir().join(format!("skein-cli-session-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("session");
    let path = file.to_str().expect("utf-8 path");

    let out = skein(&broker.addr, &["produce", "s", "--session", path], "a\nb\nc\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = Session::load(&file).expect("session saved");
    assert_eq!(written.token("s", 0).map(|t| t.min_high_watermark), Some(3), "{written:?}");

    let args =
        ["consume", "s", "--session", path, "--prefer-replica", "closest", "--count", "3", "--timeout-ms", "5000"];
    let out = skein(&broker.addr, &args, "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\nc\n");
    let read = Session::load(&file).expect("session saved");
    assert!(read.token("s", 0).is_some_and(|t| t.min_high_watermark >= 3), "{read:?}");

    let out = skein(&broker.addr, &["consume", "s", "--prefer-replica", "nearest"], "");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nearest'"), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(&file, "not a session\n").expect("write");
    let out = skein(&broker.addr, &["consume", "s", "--session", path, "--count", "1"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loading session"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
