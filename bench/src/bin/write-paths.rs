//! Measures the candidate write paths for the partition log (issue 17, item 2), same run,
//! alternating the order of the methods from round to round.
//!
//! Each method appends `--gib` GiB in writes of `--write-bytes` bytes to a fresh file in
//! `--dir`, then fdatasyncs it, then reads the last `--read-back-mib` MiB back with buffered
//! `pread` (a tailing consumer), then deletes the file:
//!
//! - `pwrite`: buffered `FileExt::write_at` on the calling thread (the log's path today);
//! - `uring-buffered`: compio `File::write_at` (io_uring) from reused owned buffers, with
//!   `--in-flight` writes outstanding, on a compio runtime thread (a shard);
//! - `direct`: `O_DIRECT` `pwrite` on the calling thread from reused 4096-aligned staging buffers;
//! - `uring-direct`: the same `O_DIRECT` writes submitted through compio with writes in flight;
//! - `writer-thread`: buffered `pwrite` on a dedicated thread fed buffers by a bounded channel.
//!
//! For `O_DIRECT` the record bytes are copied into an aligned staging buffer behind the
//! partial last block of the previous write, which is kept in memory; only whole blocks are
//! submitted, so a write's first block holds the previous write's tail again and writes never
//! overlap (several can be in flight). Before the fdatasync the padded tail block is written
//! and the file cut to its logical length. Redpanda also writes the partial block each time
//! and rewrites it with the next write: that costs one more 4 KiB block per unaligned write.
//!
//! CPU is read with `getrusage`: `RUSAGE_THREAD` on the submitting thread, and `RUSAGE_SELF`
//! for the whole process. io_uring's io-wq workers are threads of the submitting process
//! (`iou-wrk-*` in `/proc/self/task`), so `RUSAGE_SELF` counts their CPU: the tool counts
//! the `iou-wrk` threads alive at the end of each write phase to show which methods use them.
//!
//! Right before each method `--warm-gib` GiB is written and deleted, so the page cache reuses
//! pages freed a moment before (touching pages the guest has not used lately is slow and varies
//! on this virtual machine: `../shared/peers/README.md`); `--warm-gib 0` measures without.
//! Warming once per round is not enough here: the guest's virtio balloon reports free pages to
//! the host (free page reporting, after about two seconds), and a buffered method that ran a
//! few seconds after the warm-up, behind the O_DIRECT ones, wrote at a quarter of the speed.
//! It does not model fsync per write or the broker's own work; it measures the write paths.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::io::AsyncWriteAt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use nix::sys::resource::{getrusage, UsageWho};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Partition-log write paths: pwrite, io_uring buffered, O_DIRECT, io_uring O_DIRECT")]
struct Args {
    /// Directory for the test files, on the disk to measure (not tmpfs). Default: a new
    /// directory under /var/tmp, removed after.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// GiB written per method and round.
    #[arg(long, default_value_t = 2.0)]
    gib: f64,
    /// Bytes per write; several sizes run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1200000,16384")]
    write_bytes: Vec<usize>,
    /// Rounds per write size; the method order alternates between rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// GiB written and deleted right before each method so that page-cache pages are reused.
    #[arg(long, default_value_t = 3.0)]
    warm_gib: f64,
    /// Writes in flight for the io_uring methods and buffers for the writer thread.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// `O_DIRECT` methods: fallocate the file this many MiB at a time ahead of the writes
    /// (Redpanda preallocates too); 0 writes into unallocated blocks.
    #[arg(long, default_value_t = 64)]
    prealloc_mib: u64,
    /// MiB read back from the end of each file after its fdatasync.
    #[arg(long, default_value_t = 64)]
    read_back_mib: u64,
    /// Methods to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pwrite,uring-buffered,direct,uring-direct,writer-thread"
    )]
    methods: Vec<Method>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    Pwrite,
    UringBuffered,
    Direct,
    UringDirect,
    WriterThread,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Pwrite => "pwrite",
            Method::UringBuffered => "uring-buffered",
            Method::Direct => "direct",
            Method::UringDirect => "uring-direct",
            Method::WriterThread => "writer-thread",
        }
    }
}

/// What one method's run on one file cost.
#[derive(Debug, Clone)]
struct Sample {
    method: Method,
    round: usize,
    write: Span,
    sync: Span,
    read: Span,
    read_bytes: u64,
    iou_workers: usize,
    driver: Option<String>,
}

/// Wall and CPU time of one phase; CPU split into user and system seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    wall_s: f64,
    thread_user_s: f64,
    thread_sys_s: f64,
    process_user_s: f64,
    process_sys_s: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.in_flight >= 1, "--in-flight must be at least 1");
    ensure!(!args.methods.is_empty(), "--methods names none");
    let (dir, created) = work_dir(args.dir.as_deref())?;
    let env = environment(&dir)?;
    println!("{}", serde_json::to_string(&env)?);
    let mut sizes = Vec::new();
    for &write_bytes in &args.write_bytes {
        ensure!(write_bytes >= 1, "--write-bytes must be positive");
        let samples = run_size(&args, &dir, write_bytes)?;
        sizes.push(report_size(&args, write_bytes, &samples));
    }
    if created {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if let Some(path) = &args.json {
        let report = json!({ "environment": env, "sizes": sizes });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// All rounds of one write size: every method once per round, each right after a warm-up,
/// in an order that alternates.
fn run_size(args: &Args, dir: &Path, write_bytes: usize) -> Result<Vec<Sample>> {
    let writes = ((args.gib * GIB as f64) as u64).div_ceil(write_bytes as u64).max(1);
    println!(
        "\n== {} writes of {} bytes ({:.2} GiB) per method, {} in flight, {} GiB written and deleted \
         before each method, O_DIRECT files fallocated {} MiB ahead",
        writes,
        write_bytes,
        (writes * write_bytes as u64) as f64 / GIB as f64,
        args.in_flight,
        args.warm_gib,
        args.prealloc_mib
    );
    let record = record_bytes(write_bytes);
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        let mut order = args.methods.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for method in order {
            warm(dir, args.warm_gib)?;
            let path = dir.join(format!("write-paths-{}.log", method.name()));
            let sample = run_method(args, method, round, &path, &record, writes)?;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            eprintln!(
                "round {round} {:<14} {:>8.0} MB/s",
                method.name(),
                mb_per_s(writes * write_bytes as u64, sample.write.wall_s)
            );
            samples.push(sample);
        }
    }
    Ok(samples)
}

fn run_method(args: &Args, method: Method, round: usize, path: &Path, record: &[u8], writes: u64) -> Result<Sample> {
    let (write, sync, iou_workers, driver) = match method {
        Method::Pwrite => {
            let (w, s, n) = pwrite_run(path, record, writes)?;
            (w, s, n, None)
        }
        Method::Direct => {
            let (w, s, n) = direct_run(path, record, writes, args.prealloc_mib << 20)?;
            (w, s, n, None)
        }
        Method::WriterThread => {
            let (w, s, n) = writer_thread_run(path, record, writes, args.in_flight)?;
            (w, s, n, None)
        }
        Method::UringBuffered | Method::UringDirect => {
            let direct = method == Method::UringDirect;
            let prealloc = if direct { args.prealloc_mib << 20 } else { 0 };
            let (w, s, n, d) = uring_run(path, record, writes, args.in_flight, prealloc, direct)?;
            (w, s, n, Some(d))
        }
    };
    let file_bytes = writes * record.len() as u64;
    let read_bytes = (args.read_back_mib << 20).min(file_bytes);
    let read = read_back(path, file_bytes - read_bytes, read_bytes)?;
    Ok(Sample { method, round, write, sync, read, read_bytes, iou_workers, driver })
}

/// Today's path: buffered `pwrite` on the calling thread, one fdatasync at the end.
fn pwrite_run(path: &Path, record: &[u8], writes: u64) -> Result<(Span, Span, usize)> {
    let file = create(path, false)?;
    let meter = Meter::start()?;
    for i in 0..writes {
        file.write_all_at(record, i * record.len() as u64).with_context(|| format!("writing {}", path.display()))?;
    }
    let write = meter.stop()?;
    let workers = iou_workers();
    let meter = Meter::start()?;
    file.sync_data().with_context(|| format!("syncing {}", path.display()))?;
    Ok((write, meter.stop()?, workers))
}

/// `O_DIRECT` `pwrite` on the calling thread from one reused aligned staging buffer.
fn direct_run(path: &Path, record: &[u8], writes: u64, prealloc_bytes: u64) -> Result<(Span, Span, usize)> {
    let file = create(path, true)?;
    let mut staging = AlignedBuf::new(staging_bytes(record.len()));
    let mut tail = Tail::default();
    let mut prealloc = Prealloc::new(prealloc_bytes);
    let meter = Meter::start()?;
    for _ in 0..writes {
        let (range, pos) = tail.stage(staging.as_mut_slice(), record);
        if !range.is_empty() {
            prealloc.cover(&file, pos + range.len() as u64)?;
            file.write_all_at(&staging.as_mut_slice()[range], pos)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let write = meter.stop()?;
    let workers = iou_workers();
    let meter = Meter::start()?;
    let (range, pos) = tail.finish(staging.as_mut_slice());
    file.write_all_at(&staging.as_mut_slice()[range], pos)
        .with_context(|| format!("writing the tail of {}", path.display()))?;
    file.set_len(tail.logical_bytes).with_context(|| format!("cutting {}", path.display()))?;
    file.sync_data().with_context(|| format!("syncing {}", path.display()))?;
    Ok((write, meter.stop()?, workers))
}

/// Buffered `pwrite` on a dedicated writer thread; the calling thread hands it owned buffers
/// through a bounded channel and gets them back for reuse (no copy on the calling thread).
fn writer_thread_run(path: &Path, record: &[u8], writes: u64, buffers: usize) -> Result<(Span, Span, usize)> {
    let file = create(path, false)?;
    let (to_writer, from_caller) = mpsc::sync_channel::<(Vec<u8>, u64)>(buffers);
    let (to_caller, from_writer) = mpsc::sync_channel::<Vec<u8>>(buffers);
    let meter = Meter::start()?;
    let writer = std::thread::spawn(move || -> std::io::Result<File> {
        for (buf, pos) in from_caller {
            file.write_all_at(&buf, pos)?;
            // The caller may have finished and dropped its end: the buffer is then dropped.
            let _ = to_caller.send(buf);
        }
        Ok(file)
    });
    let mut idle: Vec<Vec<u8>> = (0..buffers).map(|_| record.to_vec()).collect();
    for i in 0..writes {
        let buf = match idle.pop() {
            Some(buf) => buf,
            None => from_writer.recv().context("writer thread stopped")?,
        };
        to_writer.send((buf, i * record.len() as u64)).context("writer thread stopped")?;
    }
    drop(to_writer);
    let file = writer.join().expect("the writer thread does not panic").context("writing")?;
    let write = meter.stop()?;
    let workers = iou_workers();
    let meter = Meter::start()?;
    file.sync_data().with_context(|| format!("syncing {}", path.display()))?;
    Ok((write, meter.stop()?, workers))
}

/// compio (io_uring) writes with `in_flight` outstanding, on a new thread with its own
/// runtime, as a shard would submit them; buffered or `O_DIRECT`.
fn uring_run(
    path: &Path,
    record: &[u8],
    writes: u64,
    in_flight: usize,
    prealloc_bytes: u64,
    direct: bool,
) -> Result<(Span, Span, usize, String)> {
    let path = path.to_path_buf();
    let record = record.to_vec();
    std::thread::spawn(move || -> Result<(Span, Span, usize, String)> {
        let runtime = compio::runtime::Runtime::new().context("starting a compio runtime")?;
        let driver = format!("{:?}", runtime.driver_type());
        let (write, sync, workers) = runtime.block_on(async {
            let file = create_compio(&path, direct).await?;
            if direct {
                let prealloc = Prealloc::new(prealloc_bytes);
                uring_direct_writes(&file, &record, writes, in_flight, prealloc).await
            } else {
                uring_buffered_writes(&file, &record, writes, in_flight).await
            }
        })?;
        Ok((write, sync, workers, driver))
    })
    .join()
    .expect("the compio thread does not panic")
}

async fn uring_buffered_writes(
    file: &compio::fs::File,
    record: &[u8],
    writes: u64,
    in_flight: usize,
) -> Result<(Span, Span, usize)> {
    let mut idle: Vec<Vec<u8>> = (0..in_flight).map(|_| record.to_vec()).collect();
    let mut pending = FuturesUnordered::new();
    let meter = Meter::start()?;
    for i in 0..writes {
        let buf = match idle.pop() {
            Some(buf) => buf,
            None => completed(pending.next().await)?,
        };
        let mut f = file;
        let pos = i * record.len() as u64;
        let len = buf.len();
        pending.push(async move { (f.write_at(buf, pos).await, len) });
    }
    while let Some(done) = pending.next().await {
        completed(Some(done))?;
    }
    let write = meter.stop()?;
    let workers = iou_workers();
    let meter = Meter::start()?;
    file.sync_data().await.context("syncing")?;
    Ok((write, meter.stop()?, workers))
}

async fn uring_direct_writes(
    file: &compio::fs::File,
    record: &[u8],
    writes: u64,
    in_flight: usize,
    mut prealloc: Prealloc,
) -> Result<(Span, Span, usize)> {
    let mut idle: Vec<AlignedBuf> = (0..in_flight).map(|_| AlignedBuf::new(staging_bytes(record.len()))).collect();
    let mut tail = Tail::default();
    let mut pending = FuturesUnordered::new();
    let meter = Meter::start()?;
    for _ in 0..writes {
        let mut staging = match idle.pop() {
            Some(buf) => buf,
            None => AlignedBuf::from_vec(completed(pending.next().await)?),
        };
        let (range, pos) = tail.stage(staging.as_mut_slice(), record);
        if range.is_empty() {
            idle.push(staging);
            continue;
        }
        prealloc.cover(file, pos + range.len() as u64)?;
        let (vec, offset) = staging.into_parts();
        let len = range.len();
        let slice = vec.slice(offset + range.start..offset + range.end);
        let mut f = file;
        pending.push(async move {
            let BufResult(res, slice) = f.write_at(slice, pos).await;
            (BufResult(res, slice.into_inner()), len)
        });
    }
    while let Some(done) = pending.next().await {
        completed(Some(done))?;
    }
    let write = meter.stop()?;
    let workers = iou_workers();
    let meter = Meter::start()?;
    let mut staging = idle.pop().unwrap_or_else(|| AlignedBuf::new(staging_bytes(record.len())));
    let (range, pos) = tail.finish(staging.as_mut_slice());
    let (vec, offset) = staging.into_parts();
    let mut f = file;
    let BufResult(res, _) = f.write_at(vec.slice(offset + range.start..offset + range.end), pos).await;
    ensure!(res.context("writing the tail")? == range.len(), "short write of the tail");
    file.set_len(tail.logical_bytes).await.context("cutting the file")?;
    file.sync_data().await.context("syncing")?;
    Ok((write, meter.stop()?, workers))
}

/// The buffer of a finished write, after checking that all of it was written.
fn completed(done: Option<(BufResult<usize, Vec<u8>>, usize)>) -> Result<Vec<u8>> {
    let (BufResult(res, buf), len) = done.expect("a write is in flight when no buffer is idle");
    let written = res.context("writing")?;
    ensure!(written == len, "short write: {written} of {len} bytes");
    Ok(buf)
}

/// Reads `bytes` from `start` with buffered 1 MiB `pread`s, as a tailing consumer would.
fn read_back(path: &Path, start: u64, bytes: u64) -> Result<Span> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; READ_BYTES];
    let meter = Meter::start()?;
    let mut pos = start;
    while pos < start + bytes {
        let len = (start + bytes - pos).min(READ_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..len], pos).with_context(|| format!("reading {}", path.display()))?;
        pos += len as u64;
    }
    meter.stop()
}

/// Writes `gib` GiB with buffered `pwrite` and deletes the file, so that the next writes get
/// page-cache pages the guest used a moment before.
fn warm(dir: &Path, gib: f64) -> Result<()> {
    if gib <= 0.0 {
        return Ok(());
    }
    let path = dir.join("write-paths-warm.tmp");
    let file = create(&path, false)?;
    let chunk = vec![0x5Au8; 1 << 20];
    let chunks = (gib * 1024.0) as u64;
    for i in 0..chunks {
        file.write_all_at(&chunk, i << 20).with_context(|| format!("writing {}", path.display()))?;
    }
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// The position of the bytes of an `O_DIRECT` log: the logical length and the partial last
/// block, kept in memory and written again at the start of the next write.
#[derive(Default)]
struct Tail {
    logical_bytes: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// Copies the kept partial block and `record` into `staging` (aligned); returns the
    /// whole blocks to write and their file position, and keeps the new partial block.
    fn stage(&mut self, staging: &mut [u8], record: &[u8]) -> (std::ops::Range<usize>, u64) {
        let kept = self.partial.len();
        assert!(kept < BLOCK_BYTES, "a partial block is shorter than a block");
        let end = kept + record.len();
        assert!(end <= staging.len(), "staging holds a partial block and a record");
        staging[..kept].copy_from_slice(&self.partial);
        staging[kept..end].copy_from_slice(record);
        let whole = end / BLOCK_BYTES * BLOCK_BYTES;
        let pos = self.logical_bytes - kept as u64;
        self.partial.clear();
        self.partial.extend_from_slice(&staging[whole..end]);
        self.logical_bytes += record.len() as u64;
        (0..whole, pos)
    }

    /// The padded partial block (zeros after the data) to write before a sync.
    fn finish(&self, staging: &mut [u8]) -> (std::ops::Range<usize>, u64) {
        let kept = self.partial.len();
        staging[..kept].copy_from_slice(&self.partial);
        staging[kept..BLOCK_BYTES].fill(0);
        let len = if kept == 0 { 0 } else { BLOCK_BYTES };
        (0..len, self.logical_bytes - kept as u64)
    }
}

/// Keeps the file fallocated (blocks reserved, reading as zeros) ahead of the writes, a
/// chunk at a time, so that `O_DIRECT` writes land in allocated blocks.
struct Prealloc {
    chunk_bytes: u64,
    allocated_bytes: u64,
}

impl Prealloc {
    fn new(chunk_bytes: u64) -> Self {
        Self { chunk_bytes, allocated_bytes: 0 }
    }

    fn cover(&mut self, file: impl std::os::fd::AsFd, end: u64) -> Result<()> {
        if self.chunk_bytes == 0 {
            return Ok(());
        }
        let fd = file.as_fd();
        while self.allocated_bytes < end {
            rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), self.allocated_bytes, self.chunk_bytes)
                .context("fallocate")?;
            self.allocated_bytes += self.chunk_bytes;
        }
        Ok(())
    }
}

/// A heap buffer whose usable part starts on a `BLOCK_BYTES` boundary, without unsafe code:
/// a `Vec` one block longer than needed, used from its first aligned byte. The `Vec` is never
/// resized, so the offset stays valid while it moves through io_uring and back.
struct AlignedBuf {
    vec: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        Self::from_vec(vec![0u8; len + BLOCK_BYTES])
    }

    fn from_vec(vec: Vec<u8>) -> Self {
        let offset = vec.as_ptr().align_offset(BLOCK_BYTES);
        assert!(offset < BLOCK_BYTES, "a byte pointer can always be aligned");
        let len = (vec.len() - offset) / BLOCK_BYTES * BLOCK_BYTES;
        Self { vec, offset, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.offset..self.offset + self.len]
    }

    fn into_parts(self) -> (Vec<u8>, usize) {
        (self.vec, self.offset)
    }
}

/// Wall clock plus `getrusage` of this thread and of the process, at the start of a phase.
struct Meter {
    started: Instant,
    thread: (f64, f64),
    process: (f64, f64),
}

impl Meter {
    fn start() -> Result<Self> {
        Ok(Self {
            started: Instant::now(),
            thread: cpu(UsageWho::RUSAGE_THREAD)?,
            process: cpu(UsageWho::RUSAGE_SELF)?,
        })
    }

    /// Must run on the thread that called `start`.
    fn stop(&self) -> Result<Span> {
        let thread = cpu(UsageWho::RUSAGE_THREAD)?;
        let process = cpu(UsageWho::RUSAGE_SELF)?;
        Ok(Span {
            wall_s: self.started.elapsed().as_secs_f64(),
            thread_user_s: thread.0 - self.thread.0,
            thread_sys_s: thread.1 - self.thread.1,
            process_user_s: process.0 - self.process.0,
            process_sys_s: process.1 - self.process.1,
        })
    }
}

/// User and system CPU seconds of `who`.
fn cpu(who: UsageWho) -> Result<(f64, f64)> {
    let usage = getrusage(who).context("getrusage")?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok((secs(usage.user_time()), secs(usage.system_time())))
}

/// How many io_uring io-wq worker threads (`iou-wrk-*`) this process has now.
fn iou_workers() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("iou-wrk"))
        .count()
}

fn create(path: &Path, direct: bool) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    if direct {
        options.custom_flags(O_DIRECT);
    }
    options.open(path).with_context(|| format!("creating {}", path.display()))
}

async fn create_compio(path: &Path, direct: bool) -> Result<compio::fs::File> {
    let mut options = compio::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    if direct {
        options.custom_flags(O_DIRECT);
    }
    options.open(path).await.with_context(|| format!("creating {}", path.display()))
}

/// Room for a kept partial block, a record, and the rounding up to whole blocks.
fn staging_bytes(record_bytes: usize) -> usize {
    (record_bytes + BLOCK_BYTES).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// Record bytes that are not all one value (a batch is not zeros).
fn record_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 7)) as u8).collect()
}

/// The directory to use, and whether this run created it (and so removes it).
fn work_dir(dir: Option<&Path>) -> Result<(PathBuf, bool)> {
    let (dir, created) = match dir {
        Some(dir) => (dir.to_path_buf(), !dir.exists()),
        None => (PathBuf::from(format!("/var/tmp/skein-write-paths-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fs = rustix::fs::statfs(&dir).with_context(|| format!("statfs {}", dir.display()))?;
    if fs.f_type as i64 == TMPFS_MAGIC {
        bail!("{} is on tmpfs: give --dir on the disk to measure", dir.display());
    }
    Ok((dir, created))
}

/// Kernel, io_uring switch, compio's driver, and the file system type, for the record.
fn environment(dir: &Path) -> Result<serde_json::Value> {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
    let driver = compio::runtime::Runtime::new()
        .map(|rt| format!("{:?}", rt.driver_type()))
        .unwrap_or_else(|e| format!("no runtime: {e}"));
    let fs = rustix::fs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    Ok(json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "io_uring_disabled": read("/proc/sys/kernel/io_uring_disabled"),
        "compio_driver": driver,
        "dir": dir.display().to_string(),
        "fs_type": format!("{:#x}", fs.f_type as i64),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    }))
}

/// Prints the per-round table with ratios against `pwrite` of the same round, then medians
/// and ranges per method; returns the same as JSON.
fn report_size(args: &Args, write_bytes: usize, samples: &[Sample]) -> serde_json::Value {
    let writes = ((args.gib * GIB as f64) as u64).div_ceil(write_bytes as u64).max(1);
    let bytes = writes * write_bytes as u64;
    let rows: Vec<Row> = samples.iter().map(|s| Row::of(s, bytes, samples)).collect();
    println!(
        "\n{:>5} {:<14} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>4} | {:>6} {:>6} {:>6} {:>6}",
        "round",
        "method",
        "MB/s",
        "MB/s+sync",
        "thr s/GB",
        "proc s/GB",
        "sync s",
        "read MB/s",
        "rd s/GB",
        "iowq",
        "x MB/s",
        "x+sync",
        "x thr",
        "x proc"
    );
    for row in &rows {
        println!("{}", row.line());
    }
    println!("\nmedian [min-max] over {} rounds, {} bytes per write:", args.rounds, write_bytes);
    let mut summary = Vec::new();
    for &method in &args.methods {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.sample.method == method).collect();
        summary.push(summary_line(method, &mine));
    }
    json!({
        "write_bytes": write_bytes,
        "writes": writes,
        "rounds": args.rounds,
        "in_flight": args.in_flight,
        "warm_gib": args.warm_gib,
        "prealloc_mib": args.prealloc_mib,
        "samples": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "summary": summary,
    })
}

/// One sample's derived figures and its ratios against `pwrite` of the same round.
struct Row<'a> {
    sample: &'a Sample,
    figures: [f64; 7],
    ratios: Option<[f64; 4]>,
}

/// Names of `Row::figures`, in order.
const FIGURES: [&str; 7] = [
    "mb_per_s",
    "mb_per_s_with_sync",
    "thread_cpu_s_per_gb",
    "process_cpu_s_per_gb",
    "sync_s",
    "read_mb_per_s",
    "read_cpu_s_per_gb",
];

impl<'a> Row<'a> {
    fn of(sample: &'a Sample, bytes: u64, all: &[Sample]) -> Self {
        let figures = figures_of(sample, bytes);
        let base =
            all.iter().find(|s| s.round == sample.round && s.method == Method::Pwrite).map(|s| figures_of(s, bytes));
        let ratios = base.map(|b| [figures[0] / b[0], figures[1] / b[1], figures[2] / b[2], figures[3] / b[3]]);
        Row { sample, figures, ratios }
    }

    fn line(&self) -> String {
        let f = &self.figures;
        let mut line = format!(
            "{:>5} {:<14} {:>8.0} {:>9.0} {:>9.3} {:>9.3} {:>8.3} {:>8.0} {:>8.3} {:>4}",
            self.sample.round,
            self.sample.method.name(),
            f[0],
            f[1],
            f[2],
            f[3],
            f[4],
            f[5],
            f[6],
            self.sample.iou_workers
        );
        if let Some(r) = self.ratios {
            line.push_str(&format!(" | {:>6.2} {:>6.2} {:>6.2} {:>6.2}", r[0], r[1], r[2], r[3]));
        }
        line
    }

    fn json(&self) -> serde_json::Value {
        let s = self.sample;
        let mut v = json!({
            "method": s.method.name(),
            "round": s.round,
            "iou_workers_after_writes": s.iou_workers,
            "compio_driver": s.driver,
            "read_bytes": s.read_bytes,
            "write": span_json(&s.write),
            "sync": span_json(&s.sync),
            "read": span_json(&s.read),
        });
        for (name, value) in FIGURES.iter().zip(self.figures) {
            v[*name] = json!(value);
        }
        if let Some(r) = self.ratios {
            v["vs_pwrite"] = json!({
                "mb_per_s": r[0], "mb_per_s_with_sync": r[1],
                "thread_cpu": r[2], "process_cpu": r[3],
            });
        }
        v
    }
}

fn figures_of(s: &Sample, bytes: u64) -> [f64; 7] {
    let gb = bytes as f64 / 1e9;
    let read_gb = s.read_bytes as f64 / 1e9;
    [
        mb_per_s(bytes, s.write.wall_s),
        mb_per_s(bytes, s.write.wall_s + s.sync.wall_s),
        (s.write.thread_user_s + s.write.thread_sys_s) / gb,
        (s.write.process_user_s + s.write.process_sys_s) / gb,
        s.sync.wall_s,
        mb_per_s(s.read_bytes, s.read.wall_s),
        (s.read.thread_user_s + s.read.thread_sys_s) / read_gb,
    ]
}

fn summary_line(method: Method, rows: &[&Row]) -> serde_json::Value {
    let mut text = format!("{:<14}", method.name());
    let mut v = json!({ "method": method.name() });
    for (i, name) in FIGURES.iter().enumerate() {
        let (med, lo, hi) = spread(rows.iter().map(|r| r.figures[i]).collect());
        text.push_str(&format!(" {name} {} [{}-{}]", short(med), short(lo), short(hi)));
        v[*name] = json!({ "median": med, "min": lo, "max": hi });
    }
    let ratio_names = ["mb_per_s", "mb_per_s_with_sync", "thread_cpu", "process_cpu"];
    let ratios: Vec<[f64; 4]> = rows.iter().filter_map(|r| r.ratios).collect();
    if !ratios.is_empty() {
        text.push_str(" | vs pwrite (median):");
        for (i, name) in ratio_names.iter().enumerate() {
            let (med, _, _) = spread(ratios.iter().map(|r| r[i]).collect());
            text.push_str(&format!(" {name} {med:.2}"));
            v["vs_pwrite"][*name] = json!(med);
        }
    }
    println!("{text}");
    v
}

/// Median, minimum and maximum (the median of an even count is the mean of the middle two).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    assert!(n > 0, "every method ran at least once");
    let med = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    (med, values[0], values[n - 1])
}

/// Three significant figures, enough for these measurements.
fn short(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn span_json(s: &Span) -> serde_json::Value {
    json!({
        "wall_s": s.wall_s,
        "thread_user_s": s.thread_user_s,
        "thread_sys_s": s.thread_sys_s,
        "process_user_s": s.process_user_s,
        "process_sys_s": s.process_sys_s,
    })
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

const GIB: u64 = 1 << 30;
/// The logical block size `O_DIRECT` needs here is 512; 4096 also covers 4Kn disks and the
/// page size.
const BLOCK_BYTES: usize = 4096;
const READ_BYTES: usize = 1 << 20;
const O_DIRECT: i32 = rustix::fs::OFlags::DIRECT.bits() as i32;
const TMPFS_MAGIC: i64 = 0x0102_1994;
