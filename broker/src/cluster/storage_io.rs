//! A replica's storage jobs (`core::replica::Job`) run without blocking the shard.
//!
//! Write jobs go to the kernel as io_uring writes through compio: one vectored write of the
//! job's batches (up to 1,024 at a time), straight from the buffers the batches arrived in, so
//! the page-cache copy runs in the kernel's io-wq workers, not on the shard
//! (bench/RESULTS.md, "Write paths for the partition log"). Syncs are io_uring `fdatasync`s;
//! a sync job that also reserves disk space ahead (`fallocate`, which compio has no op for)
//! or writes its commit group's batches first (`Log::begin_write_sync`) runs whole on compio's
//! blocking pool: one thread wake for the writes and the sync, where two io_uring ops would
//! wake an io-wq worker for each (compio cannot link them). A write job that asks for writeback
//! (`WriteJob::writeback`, every 8 MiB of a segment) starts it on the blocking pool
//! (`SyncHandle::start_writeback`), not waited for. Under the polling driver (no io_uring) compio runs
//! the same write and sync ops on its blocking pool: the same code, other threads.

use std::io;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use compio::buf::BufResult;
use compio::driver::op::{Sync, WriteAt, WriteVectoredAt};
use skein_log::storage::{DiskFile, StorageError};
use skein_log::{hint_writeback, WriteJob};

use crate::core::replica::Job;
use skein_log::storage::FileStorage;

/// Most batches in one vectored write (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Runs a job on the current compio runtime; returns it with its outcome.
pub(super) async fn run(job: Job<FileStorage>) -> (Job<FileStorage>, Result<(), StorageError>) {
    match job {
        Job::Write(w) => {
            let result = write(&w).await;
            if let (Ok(()), Some(range)) = (&result, w.writeback()) {
                // A hint, not waited for: the shard answers the write now.
                let handle = w.handle().clone();
                compio::runtime::spawn_blocking(move || hint_writeback(&handle, range)).detach();
            }
            (Job::Write(w), result)
        }
        Job::Sync(s) if !s.reserves() && s.writes().is_empty() => {
            let handle = s.handle();
            let BufResult(result, _) = compio::runtime::submit(Sync::new(handle.file().clone(), true)).await;
            let result = result.map(drop).map_err(|e| error("sync", handle, e));
            (Job::Sync(s), result)
        }
        job => match compio::runtime::spawn_blocking(move || {
            let result = job.run();
            (job, result)
        })
        .await
        {
            Ok(done) => done,
            Err(_) => crate::service::fail_stop("a sync job", &"the sync thread panicked"),
        },
    }
}

/// The job's batches, consecutive in one file, as vectored io_uring writes.
async fn write(job: &WriteJob<DiskFile>) -> Result<(), StorageError> {
    let handle = job.handle();
    let file = handle.file();
    for chunk in job.writes().chunks(IOV_MAX) {
        let pos = chunk[0].0;
        let bufs: Vec<Bytes> = chunk.iter().map(|(_, b)| b.clone()).collect();
        let total: usize = bufs.iter().map(Bytes::len).sum();
        let BufResult(done, _) = compio::runtime::submit(WriteVectoredAt::new(file.clone(), pos, bufs)).await;
        let mut skip = done.map_err(|e| error("write", handle, e))?;
        if skip == total {
            continue;
        }
        // A short write: the rest batch by batch.
        for (at, bytes) in chunk {
            if skip >= bytes.len() {
                skip -= bytes.len();
                continue;
            }
            write_all_at(file, at + skip as u64, bytes.slice(skip..)).await.map_err(|e| error("write", handle, e))?;
            skip = 0;
        }
    }
    Ok(())
}

async fn write_all_at(file: &Arc<std::fs::File>, mut pos: u64, mut bytes: Bytes) -> io::Result<()> {
    while !bytes.is_empty() {
        let BufResult(n, _) = compio::runtime::submit(WriteAt::new(file.clone(), pos, bytes.clone())).await;
        let n = n?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        pos += n as u64;
        bytes.advance(n);
    }
    Ok(())
}

fn error(op: &'static str, file: &DiskFile, source: io::Error) -> StorageError {
    StorageError { op, path: file.path().to_owned(), source }
}
