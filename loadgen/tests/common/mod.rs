//! Shared by the integration tests that start real broker processes.

use std::path::PathBuf;
use std::process::Command;

/// The broker binary of this build (built by `cargo test --workspace`; built here if not).
pub fn broker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps/..");
    let bin = dir.join("skein-broker");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "skein-broker", "--bin", "skein-broker"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building skein-broker failed");
    }
    bin
}
