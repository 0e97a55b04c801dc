//! Starts real `skein-broker` processes (free port, temporary directory) for integration
//! tests, and finds the `skein` CLI and the client examples next to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// A broker process on a temporary data directory.
pub struct Broker {
    pub child: Child,
    pub addr: String,
    pub dir: PathBuf,
    extra: Vec<String>,
}

impl Broker {
    /// Starts a broker on a fresh directory.
    pub fn start(dir: &Path, extra: &[&str]) -> Broker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Broker::spawn(dir.to_path_buf(), extra, "127.0.0.1:0")
    }

    /// Starts a broker listening on `listen` (cluster members need fixed addresses).
    pub fn start_at(dir: &Path, listen: &str, extra: &[&str]) -> Broker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Broker::spawn(dir.to_path_buf(), extra, listen)
    }

    /// Starts a cluster broker that is its own only voter (a cluster of one), on a free port.
    pub fn start_one_voter_cluster(dir: &Path, extra: &[&str]) -> Broker {
        let listen = format!("127.0.0.1:{}", free_port());
        let voters = format!("1@{listen}");
        let args: Vec<&str> = ["--voters", voters.as_str()].into_iter().chain(extra.iter().copied()).collect();
        Broker::start_at(dir, &listen, &args)
    }

    /// Starts a broker on a fresh directory with its log filter set to `filter` and its
    /// stderr (the log) written to `log`.
    pub fn start_logging(dir: &Path, extra: &[&str], filter: &str, log: &Path) -> Broker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let file = std::fs::File::create(log).expect("log file");
        Broker::spawn_with(dir.to_path_buf(), extra, "127.0.0.1:0", filter.to_owned(), Stdio::from(file))
            .expect("skein-broker did not start")
    }

    fn spawn(dir: PathBuf, extra: Vec<String>, listen: &str) -> Broker {
        Broker::spawn_checked(dir, extra, listen).unwrap_or_else(|| panic!("skein-broker did not start on {listen}"))
    }

    /// Restarts on the same directory and port.
    pub fn restart(&mut self) {
        let addr = self.addr.clone();
        // The old socket may linger briefly; retry the bind.
        for attempt in 0..50 {
            if let Some(b) = Broker::spawn_checked(self.dir.clone(), self.extra.clone(), &addr) {
                *self = b;
                return;
            }
            std::thread::sleep(Duration::from_millis(20 * (attempt + 1)));
        }
        panic!("broker did not restart on {addr}");
    }

    /// Restarts on the same directory and port with its log filter set to `filter` and its
    /// stderr (the log) written to `log`.
    pub fn restart_logging(&mut self, filter: &str, log: &Path) {
        let addr = self.addr.clone();
        for attempt in 0..50 {
            let file = std::fs::File::create(log).expect("log file");
            let b = Broker::spawn_with(self.dir.clone(), self.extra.clone(), &addr, filter.into(), Stdio::from(file));
            if let Some(b) = b {
                *self = b;
                return;
            }
            std::thread::sleep(Duration::from_millis(20 * (attempt + 1)));
        }
        panic!("broker did not restart on {addr}");
    }

    fn spawn_checked(dir: PathBuf, extra: Vec<String>, listen: &str) -> Option<Broker> {
        let filter = std::env::var("SKEIN_TEST_LOG").unwrap_or_else(|_| "warn".into());
        Broker::spawn_with(dir, extra, listen, filter, Stdio::inherit())
    }

    fn spawn_with(dir: PathBuf, extra: Vec<String>, listen: &str, filter: String, stderr: Stdio) -> Option<Broker> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skein-broker"))
            .args(["--listen", listen, "--data-dir"])
            .arg(&dir)
            .args(&extra)
            .env("SKEIN_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start skein-broker");
        let mut line = String::new();
        if BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        match line.trim().strip_prefix("ready ") {
            Some(addr) => Some(Broker { child, addr: addr.to_owned(), dir, extra }),
            None => {
                let _ = child.wait();
                None
            }
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        self.child.wait().expect("wait for broker")
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary built next to `skein-broker` (the CLI, or an example). Builds it first, once
/// per test process, so a test never runs a stale binary (a no-op under `cargo test
/// --workspace`, which builds them all).
pub fn sibling(name: &str, build_args: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let broker = PathBuf::from(env!("CARGO_BIN_EXE_skein-broker"));
    let dir = broker.parent().expect("target dir").to_path_buf();
    let path = if build_args.contains(&"--example") { dir.join("examples").join(name) } else { dir.join(name) };
    let mut built = BUILT.lock().expect("build lock");
    // `tests/run` builds every target of the workspace in one go (`--all-targets`) and says so
    // with SKEIN_TESTS_PREBUILT: `cargo build -p skein-client` would resolve other features
    // and rebuild dependencies, minutes on a fresh machine.
    let prebuilt = std::env::var_os("SKEIN_TESTS_PREBUILT").is_some() && path.exists();
    if !prebuilt && !built.iter().any(|n| n == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "skein-client"])
            .args(build_args)
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {name}");
        built.push(name.to_owned());
    }
    path
}

/// Starts `cmd` with piped stdin and stdout: the child, its stdin, and its stdout's lines as
/// they come (a thread reads them), for tests that talk to a CLI one line at a time.
pub fn spawn_talking(cmd: &mut Command) -> (Child, std::process::ChildStdin, std::sync::mpsc::Receiver<String>) {
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start the command");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stdin = child.stdin.take().expect("stdin");
    (child, stdin, lines)
}

/// Runs a compio future to completion on this thread.
/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A process's peak resident set size (`VmHWM` in `/proc/PID/status`), in kB.
pub fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("a VmHWM line");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM in kB")
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    compio::runtime::Runtime::new().expect("runtime").block_on(f)
}
pub mod cluster;
