//! The machine's own ceilings, measured with the sizes of the load being judged: loopback TCP
//! (one connection, then one per core) and the disk under `--data-dir` (sequential buffered
//! writes with one final fdatasync; write + fdatasync latency).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::report::{self, histogram, LimitsReport, SyncLatency};

/// Measures every ceiling; `chunk_bytes` is the write size (the produce batch size).
pub fn measure(data_dir: &Path, chunk_bytes: usize, duration: Duration, progress: bool) -> Result<LimitsReport> {
    let say = |what: &str| {
        if progress {
            eprintln!("limits: {what}...");
        }
    };
    say("loopback TCP, one connection");
    let tcp = tcp_throughput(1, chunk_bytes, duration)?;
    let cores = report::machine().cores;
    say(&format!("loopback TCP, {cores} connections"));
    let tcp_all = tcp_throughput(cores, chunk_bytes, duration)?;
    say("sequential write + fdatasync");
    let disk = disk_throughput(data_dir, chunk_bytes, duration)?;
    say("write + fdatasync latency");
    let (p50, p99) = fdatasync_latency(data_dir, chunk_bytes.min(4096), duration)?;
    Ok(LimitsReport {
        mode: "limits".into(),
        tcp_bytes_per_sec: tcp,
        tcp_bytes_per_sec_all_cores: tcp_all,
        disk_write_bytes_per_sec: disk,
        fdatasync_us: SyncLatency { p50, p99 },
        config: serde_json::json!({"chunk_bytes": chunk_bytes, "duration_s": duration.as_secs_f64(),
            "data_dir": data_dir.display().to_string()}),
        commit: report::commit(),
        machine: report::machine(),
    })
}

/// Bytes per second through `connections` loopback TCP connections at once.
pub fn tcp_throughput(connections: usize, chunk_bytes: usize, duration: Duration) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let readers = std::thread::spawn(move || -> Result<u64> {
        let mut handles = Vec::new();
        for _ in 0..connections {
            let (mut s, _) = listener.accept()?;
            handles.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            }));
        }
        Ok(handles.into_iter().map(|h| h.join().unwrap_or(0)).sum())
    });
    let started = Instant::now();
    let writers: Vec<_> = (0..connections)
        .map(|_| {
            std::thread::spawn(move || -> Result<()> {
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                let chunk = vec![0xA5u8; chunk_bytes.max(1)];
                while started.elapsed() < duration {
                    s.write_all(&chunk)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| anyhow::anyhow!("a TCP writer panicked"))??;
    }
    let bytes = readers.join().map_err(|_| anyhow::anyhow!("the TCP reader panicked"))??;
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}

/// Sequential buffered writes of `chunk_bytes` for `duration`, then one fdatasync.
pub fn disk_throughput(dir: &Path, chunk_bytes: usize, duration: Duration) -> Result<f64> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("skein-loadgen-limits.tmp");
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    let chunk = vec![0x5Au8; chunk_bytes.max(1)];
    let started = Instant::now();
    let mut pos = 0u64;
    while started.elapsed() < duration {
        file.write_all_at(&chunk, pos)?;
        pos += chunk.len() as u64;
    }
    file.sync_data()?;
    let rate = pos as f64 / started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// p50 and p99 of one `chunk_bytes` write plus fdatasync, repeated for `duration`.
pub fn fdatasync_latency(dir: &Path, chunk_bytes: usize, duration: Duration) -> Result<(u64, u64)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("skein-loadgen-fsync.tmp");
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    let chunk = vec![0x3Cu8; chunk_bytes.max(1)];
    let mut h = histogram();
    let started = Instant::now();
    let mut pos = 0u64;
    while started.elapsed() < duration || h.len() < 100 {
        let t = Instant::now();
        file.write_all_at(&chunk, pos)?;
        file.sync_data()?;
        report::record(&mut h, t.elapsed());
        pos += chunk.len() as u64;
    }
    std::fs::remove_file(&path)?;
    Ok((h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_measured_and_positive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = measure(dir.path(), 64 * 1024, Duration::from_millis(100), false).expect("limits");
        assert!(r.tcp_bytes_per_sec > 1e6, "{r:?}");
        assert!(r.tcp_bytes_per_sec_all_cores > 1e6);
        assert!(r.disk_write_bytes_per_sec > 1e5);
        assert!(r.fdatasync_us.p50 >= 1 && r.fdatasync_us.p99 >= r.fdatasync_us.p50);
        assert!(std::fs::read_dir(dir.path()).expect("dir").next().is_none(), "temporary files removed");
        let _ = std::io::stderr().flush();
    }
}
