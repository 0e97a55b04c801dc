//! Ownership of a data directory: one broker process at a time.
//!
//! Two brokers on one data directory both append to the same segment files at the same
//! offsets, acknowledge each other's overwritten records and leave a log the next start cuts
//! as a torn tail. So a broker takes an exclusive `flock` on `DIR/.lock` before it opens
//! anything in the directory and holds it for its lifetime; a second broker fails at once,
//! naming the directory and the holder's pid (written into the lock file). The kernel drops a
//! `flock` when its holder exits for any reason, `kill -9` included, so a stale lock file of a
//! dead process never blocks a restart: only a live holder does. The lock is advisory and
//! local: it does not guard a directory shared over NFS, nor against tools that ignore it.
//!
//! Not done here: creating the directory's contents, or deleting the lock file on exit (a
//! lock file left behind is harmless; deleting it could race a starting broker).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = ".lock";

/// Why a data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the directory.
    #[error("data directory {dir} is in use by another broker{}; a data directory belongs to one process", holder_text(.holder))]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, if its lock file names one.
        holder: Option<u32>,
    },
    /// Creating, opening, locking or writing failed.
    #[error("locking data directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

fn holder_text(holder: &Option<u32>) -> String {
    holder.map_or_else(String::new, |pid| format!(" (pid {pid})"))
}

/// A data directory this process owns until the value is dropped (or the process exits).
#[derive(Debug)]
pub struct DataDirLock {
    dir: PathBuf,
    /// Holding the open file holds the lock.
    _file: File,
}

impl DataDirLock {
    /// Creates `dir` if needed and takes it: fails at once with [`LockError::InUse`] if a live
    /// process holds it. Writes this process's pid into the lock file.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let io = |source| LockError::Io { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(LockError::InUse { dir: dir.to_path_buf(), holder: read_pid(&mut file) });
            }
            Err(e) => return Err(io(e.into())),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { dir: dir.to_path_buf(), _file: file })
    }

    /// The directory held.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The pid a lock file names, if it holds one (the holder may be between creating the file
/// and writing its pid).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Refuses a data directory in the layout of the single-node runtime of earlier versions
/// (`topics.json` beside one `TOPIC-PARTITION` directory per partition): every broker now
/// keeps its replicas under `partitions/` with the controller's Raft log, even alone, and
/// starting over that directory would show none of its topics.
pub fn refuse_single_node_layout(dir: &Path) -> anyhow::Result<()> {
    let topics = dir.join("topics.json");
    if topics.exists() {
        anyhow::bail!(
            "{} is a data directory of the earlier single-node layout ({} and one directory per partition), \
             which this version does not read: every broker, a single one included, now keeps its partitions \
             under partitions/ beside the controller's log. Read its records out with the earlier version \
             (skein consume) and write them to a broker on a new --data-dir, or move the directory away",
            dir.display(),
            topics.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).expect("first takes it (and creates the directory)");
        assert_eq!(first.dir(), data);
        // flock locks belong to open file descriptions: a second open in this process
        // conflicts just as another process would.
        let err = DataDirLock::acquire(&data).expect_err("second is refused");
        let text = err.to_string();
        assert!(matches!(err, LockError::InUse { holder: Some(pid), .. } if pid == std::process::id()), "{text}");
        assert!(text.contains(&data.display().to_string()), "{text}");
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        drop(first);
        let again = DataDirLock::acquire(&data).expect("free once the holder let go");
        drop(again);
    }

    #[test]
    fn a_lock_file_left_by_a_dead_process_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCK_FILE), "4194304\n").expect("stale lock file");
        let lock = DataDirLock::acquire(dir.path()).expect("a file alone holds nothing");
        let pid = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("read");
        assert_eq!(pid, format!("{}\n", std::process::id()), "the new holder's pid replaces the old one");
        drop(lock);
    }
}
