//! The `Storage` trait: the only way the log touches files.
//!
//! A `Storage` is one partition's directory; a [`StorageFile`] is one file in it with
//! positional `read_at` / `write_at`, `sync` (fdatasync), `len` and `set_len`. Two backends:
//!
//! - [`FileStorage`]: real files (`pread`/`pwrite`/`fdatasync` from std).
//! - [`MemStorage`]: files in memory with a *live* and a *durable* image per file, so tests and
//!   the simulator can crash the "machine" ([`MemStorage::crash`]): every file falls back to its
//!   durable image plus a random prefix of what was written after the last sync (a torn write).
//!   It also fails chosen operations ([`MemStorage::fail_op`]) and flips bytes.
//!
//! Writes and syncs can run away from the owning thread: [`StorageFile::sync_handle`] gives a
//! handle that writes and syncs the same file, which is what the log's write-behind appends and
//! group commit use to keep `pwrite` and `fdatasync` off the shard.
//!
//! Not modelled by `MemStorage`: directory-entry durability (creating, renaming and removing a
//! file are durable at once), which the log compensates for by syncing the directory anyway.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

/// An IO operation failed; names the operation and the file.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct StorageError {
    /// The operation: "read", "write", "sync", ...
    pub op: &'static str,
    /// The file or directory.
    pub path: String,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl StorageError {
    fn new(op: &'static str, path: impl Into<String>, source: io::Error) -> StorageError {
        StorageError { op, path: path.into(), source }
    }
}

/// One partition's directory.
pub trait Storage {
    /// A file in this directory.
    type File: StorageFile;

    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> Result<Self::File, StorageError>;
    /// Creates a file, emptying it if it exists.
    fn create(&self, name: &str) -> Result<Self::File, StorageError>;
    /// Names of the files in the directory, sorted.
    fn list(&self) -> Result<Vec<String>, StorageError>;
    /// Removes a file; a missing file is not an error.
    fn remove(&self, name: &str) -> Result<(), StorageError>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> Result<(), StorageError>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> Result<(), StorageError>;
    /// Removes every file and the directory itself.
    fn destroy(&self) -> Result<(), StorageError>;
    /// A human-readable path of a file, for error messages.
    fn path_of(&self, name: &str) -> String;
}

/// One file: positional IO, no cursor.
#[allow(clippy::len_without_is_empty)] // emptiness is never asked; `len` is IO
pub trait StorageFile {
    /// A handle that syncs this file from anywhere (another thread, for `FileStorage`).
    type SyncHandle: SyncHandle;

    /// Reads into `buf` from `pos`; returns the bytes read, fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize, StorageError>;
    /// Writes all of `buf` at `pos`.
    fn write_at(&mut self, buf: &[u8], pos: u64) -> Result<(), StorageError>;
    /// Makes everything written so far durable (fdatasync).
    fn sync(&self) -> Result<(), StorageError>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64, StorageError>;
    /// Truncates or extends the file. Disk space reserved past the new end is released.
    fn set_len(&mut self, len: u64) -> Result<(), StorageError>;
    /// Reserves disk space for `len` bytes from `pos` (`fallocate`, mode 0), so later writes
    /// there need no block allocation; the file's length grows to cover it (the space reads as
    /// zeros), so an fdatasync after a write inside it has no file size to persist. A file
    /// system that cannot reserve answers `Ok(false)`.
    fn preallocate(&self, pos: u64, len: u64) -> Result<bool, StorageError>;
    /// A handle to sync this file later or elsewhere.
    fn sync_handle(&self) -> Self::SyncHandle;
}

/// Writes and syncs one file from a job (see [`StorageFile::sync_handle`]): the log's
/// write-behind appends and group commits run through it, inline or on another thread.
pub trait SyncHandle {
    /// Writes all of `buf` at `pos`.
    fn write_at(&self, buf: &[u8], pos: u64) -> Result<(), StorageError>;
    /// fdatasync the file.
    fn sync(&self) -> Result<(), StorageError>;
    /// [`StorageFile::preallocate`] on the same file.
    fn preallocate(&self, pos: u64, len: u64) -> Result<bool, StorageError>;
    /// Starts the kernel's writeback of `len` bytes from `pos` without waiting for it: a hint
    /// that promises no durability, so the page cache never holds a segment's worth of dirty
    /// pages for one fdatasync to push.
    fn start_writeback(&self, pos: u64, len: u64) -> Result<(), StorageError>;
}

/// Reads exactly `buf.len()` bytes at `pos` or fails with `UnexpectedEof`.
pub fn read_exact_at<F: StorageFile>(file: &F, buf: &mut [u8], pos: u64, path: &str) -> Result<(), StorageError> {
    let n = file.read_at(buf, pos)?;
    if n < buf.len() {
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} bytes at {pos}, file ends", buf.len()));
        return Err(StorageError::new("read", path, e));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Real files.

/// A directory on the real file system.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
}

impl FileStorage {
    /// Uses `dir`, creating it (and its parents) if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<FileStorage, StorageError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::new("create dir", dir.display().to_string(), e))?;
        Ok(FileStorage { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A real file, shared with its sync handles.
#[derive(Debug, Clone)]
pub struct DiskFile {
    file: Arc<File>,
    path: Arc<str>,
}

impl DiskFile {
    /// The open file, for zero-copy sends (`sendfile`/`splice`) by the runtime.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The file's path, for error messages.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Storage for FileStorage {
    type File = DiskFile;

    fn open(&self, name: &str) -> Result<DiskFile, StorageError> {
        let path = self.dir.join(name);
        let file = OpenOptions::new().read(true).write(true).open(&path);
        let file = file.map_err(|e| StorageError::new("open", path.display().to_string(), e))?;
        Ok(DiskFile { file: Arc::new(file), path: path.display().to_string().into() })
    }

    fn create(&self, name: &str) -> Result<DiskFile, StorageError> {
        let path = self.dir.join(name);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path);
        let file = file.map_err(|e| StorageError::new("create", path.display().to_string(), e))?;
        Ok(DiskFile { file: Arc::new(file), path: path.display().to_string().into() })
    }

    fn list(&self) -> Result<Vec<String>, StorageError> {
        let err = |e| StorageError::new("list", self.dir.display().to_string(), e);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, name: &str) -> Result<(), StorageError> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StorageError::new("remove", path.display().to_string(), e))
            }
            _ => Ok(()),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let (a, b) = (self.dir.join(from), self.dir.join(to));
        std::fs::rename(&a, &b).map_err(|e| StorageError::new("rename", a.display().to_string(), e))
    }

    fn sync_dir(&self) -> Result<(), StorageError> {
        let err = |e| StorageError::new("sync dir", self.dir.display().to_string(), e);
        File::open(&self.dir).map_err(err)?.sync_all().map_err(err)
    }

    fn destroy(&self) -> Result<(), StorageError> {
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| StorageError::new("remove dir", self.dir.display().to_string(), e))
    }

    fn path_of(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl StorageFile for DiskFile {
    type SyncHandle = DiskFile;

    fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize, StorageError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StorageError::new("read", &*self.path, e)),
            }
        }
        Ok(done)
    }

    fn write_at(&mut self, buf: &[u8], pos: u64) -> Result<(), StorageError> {
        self.file.write_all_at(buf, pos).map_err(|e| StorageError::new("write", &*self.path, e))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.file.sync_data().map_err(|e| StorageError::new("sync", &*self.path, e))
    }

    fn len(&self) -> Result<u64, StorageError> {
        Ok(self.file.metadata().map_err(|e| StorageError::new("stat", &*self.path, e))?.len())
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        self.file.set_len(len).map_err(|e| StorageError::new("truncate", &*self.path, e))
    }

    fn preallocate(&self, pos: u64, len: u64) -> Result<bool, StorageError> {
        match rustix::fs::fallocate(&*self.file, rustix::fs::FallocateFlags::empty(), pos, len) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(false),
            Err(e) => Err(StorageError::new("preallocate", &*self.path, e.into())),
        }
    }

    fn sync_handle(&self) -> DiskFile {
        self.clone()
    }
}

impl SyncHandle for DiskFile {
    fn write_at(&self, buf: &[u8], pos: u64) -> Result<(), StorageError> {
        self.file.write_all_at(buf, pos).map_err(|e| StorageError::new("write", &*self.path, e))
    }

    fn sync(&self) -> Result<(), StorageError> {
        StorageFile::sync(self)
    }

    fn preallocate(&self, pos: u64, len: u64) -> Result<bool, StorageError> {
        StorageFile::preallocate(self, pos, len)
    }

    fn start_writeback(&self, pos: u64, len: u64) -> Result<(), StorageError> {
        // `sync_file_range(SYNC_FILE_RANGE_WRITE)` has no safe binding (the workspace forbids
        // `unsafe`); Linux's `POSIX_FADV_DONTNEED` starts the same asynchronous writeback of
        // the range's dirty pages, then drops only pages already clean, which pages written
        // just now are not (they are dirty or under writeback), so tailing reads keep them.
        let Some(len) = std::num::NonZeroU64::new(len) else { return Ok(()) };
        rustix::fs::fadvise(&*self.file, pos, Some(len), rustix::fs::Advice::DontNeed)
            .map_err(|e| StorageError::new("fadvise", &*self.path, e.into()))
    }
}

// ---------------------------------------------------------------------------------------------
// Memory, with crashes and faults.

/// A directory in memory. Clones share the same files.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    dir: Rc<RefCell<MemDir>>,
}

#[derive(Debug, Default)]
struct MemDir {
    files: BTreeMap<String, Rc<RefCell<MemFileData>>>,
    /// Mutating operations (write, sync, set_len) done so far.
    ops: u64,
    /// Fail the mutating operation with this number (counted from 1), once.
    fail_op: Option<(u64, FaultKind)>,
    /// fdatasyncs done, for group-commit tests.
    syncs: u64,
    destroyed: bool,
    /// A lying disk: syncs report success without making anything durable.
    lying: bool,
}

#[derive(Debug, Default, Clone)]
struct MemFileData {
    live: Vec<u8>,
    durable: Vec<u8>,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The operation fails with EIO and does nothing.
    Io,
    /// The operation fails with ENOSPC; a write stores a prefix of its bytes first.
    DiskFull,
}

/// A file in a [`MemStorage`].
#[derive(Debug, Clone)]
pub struct MemFile {
    name: String,
    data: Rc<RefCell<MemFileData>>,
    dir: Rc<RefCell<MemDir>>,
}

impl MemStorage {
    /// An empty directory.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// A machine crash: a new directory where each file holds its durable image plus a prefix
    /// (chosen by `seed`) of the bytes appended since its last sync. A file rewritten since its
    /// last sync falls back to its durable image.
    pub fn crash(&self, seed: u64) -> MemStorage {
        let mut rng = seed;
        let dir = self.dir.borrow();
        let mut files = BTreeMap::new();
        for (name, data) in &dir.files {
            let d = data.borrow();
            let keep = if d.live.len() > d.durable.len() && d.live.starts_with(&d.durable) {
                let extra = (d.live.len() - d.durable.len()) as u64;
                d.durable.len() + (splitmix(&mut rng) % (extra + 1)) as usize
            } else {
                d.durable.len()
            };
            let image = if keep > d.durable.len() { d.live[..keep].to_vec() } else { d.durable.clone() };
            files.insert(name.clone(), Rc::new(RefCell::new(MemFileData { live: image.clone(), durable: image })));
        }
        MemStorage { dir: Rc::new(RefCell::new(MemDir { files, ..MemDir::default() })) }
    }

    /// A process crash with no machine crash: every written byte survives.
    pub fn restart(&self) -> MemStorage {
        let dir = self.dir.borrow();
        let files = dir
            .files
            .iter()
            .map(|(n, d)| {
                let live = d.borrow().live.clone();
                (n.clone(), Rc::new(RefCell::new(MemFileData { durable: live.clone(), live })))
            })
            .collect();
        MemStorage { dir: Rc::new(RefCell::new(MemDir { files, ..MemDir::default() })) }
    }

    /// Fails the `n`th mutating operation from now (1 = the next one), once.
    pub fn fail_op(&self, n: u64, kind: FaultKind) {
        let mut dir = self.dir.borrow_mut();
        dir.fail_op = Some((dir.ops + n, kind));
    }

    /// Makes every later sync lie (report success, persist nothing) until called with
    /// `false`: a disk or virtual disk that loses fsyncs.
    pub fn set_lying(&self, lying: bool) {
        self.dir.borrow_mut().lying = lying;
    }

    /// The fdatasyncs done so far.
    pub fn sync_count(&self) -> u64 {
        self.dir.borrow().syncs
    }

    /// A file's live bytes, if it exists.
    pub fn file_bytes(&self, name: &str) -> Option<Vec<u8>> {
        self.dir.borrow().files.get(name).map(|d| d.borrow().live.clone())
    }

    /// Replaces a file's live and durable bytes (tests: arbitrary or damaged files).
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) {
        let data = MemFileData { live: bytes.clone(), durable: bytes };
        self.dir.borrow_mut().files.insert(name.to_owned(), Rc::new(RefCell::new(data)));
    }

    /// XORs one byte of a file (live and durable), as a bit flip on the medium would.
    pub fn flip_byte(&self, name: &str, pos: u64, mask: u8) {
        let dir = self.dir.borrow();
        let mut d = dir.files.get(name).expect("flip_byte: file exists").borrow_mut();
        let pos = pos as usize;
        d.live[pos] ^= mask;
        if pos < d.durable.len() {
            d.durable[pos] ^= mask;
        }
    }

    fn file(&self, name: &str, data: Rc<RefCell<MemFileData>>) -> MemFile {
        MemFile { name: name.to_owned(), data, dir: self.dir.clone() }
    }
}

impl Storage for MemStorage {
    type File = MemFile;

    fn open(&self, name: &str) -> Result<MemFile, StorageError> {
        let data = self.dir.borrow().files.get(name).cloned();
        let data = data.ok_or_else(|| StorageError::new("open", name, io::ErrorKind::NotFound.into()))?;
        Ok(self.file(name, data))
    }

    fn create(&self, name: &str) -> Result<MemFile, StorageError> {
        let data = Rc::new(RefCell::new(MemFileData::default()));
        self.dir.borrow_mut().files.insert(name.to_owned(), data.clone());
        Ok(self.file(name, data))
    }

    fn list(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.dir.borrow().files.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> Result<(), StorageError> {
        self.dir.borrow_mut().files.remove(name);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let mut dir = self.dir.borrow_mut();
        let data =
            dir.files.remove(from).ok_or_else(|| StorageError::new("rename", from, io::ErrorKind::NotFound.into()))?;
        dir.files.insert(to.to_owned(), data);
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn destroy(&self) -> Result<(), StorageError> {
        let mut dir = self.dir.borrow_mut();
        dir.files.clear();
        dir.destroyed = true;
        Ok(())
    }

    fn path_of(&self, name: &str) -> String {
        format!("mem:{name}")
    }
}

impl MemFile {
    /// Counts a mutating operation; returns the fault to inject, if this is the chosen one.
    fn tick(&self) -> Option<FaultKind> {
        let mut dir = self.dir.borrow_mut();
        dir.ops += 1;
        match dir.fail_op {
            Some((n, kind)) if n == dir.ops => {
                dir.fail_op = None;
                Some(kind)
            }
            _ => None,
        }
    }

    fn fault(&self, op: &'static str, kind: FaultKind) -> StorageError {
        let e = match kind {
            FaultKind::Io => io::Error::from_raw_os_error(5),
            FaultKind::DiskFull => io::Error::from_raw_os_error(28),
        };
        StorageError::new(op, format!("mem:{}", self.name), e)
    }
}

impl StorageFile for MemFile {
    type SyncHandle = MemFile;

    fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize, StorageError> {
        let d = self.data.borrow();
        let start = usize::try_from(pos).unwrap_or(usize::MAX).min(d.live.len());
        let n = buf.len().min(d.live.len() - start);
        buf[..n].copy_from_slice(&d.live[start..start + n]);
        Ok(n)
    }

    fn write_at(&mut self, buf: &[u8], pos: u64) -> Result<(), StorageError> {
        let fault = self.tick();
        let buf = match fault {
            Some(FaultKind::Io) => return Err(self.fault("write", FaultKind::Io)),
            Some(FaultKind::DiskFull) => &buf[..buf.len() / 2],
            None => buf,
        };
        let mut d = self.data.borrow_mut();
        let pos = pos as usize;
        let end = pos + buf.len();
        if d.live.len() < end {
            d.live.resize(end, 0);
        }
        d.live[pos..end].copy_from_slice(buf);
        drop(d);
        match fault {
            Some(kind) => Err(self.fault("write", kind)),
            None => Ok(()),
        }
    }

    fn sync(&self) -> Result<(), StorageError> {
        if let Some(kind) = self.tick() {
            return Err(self.fault("sync", kind));
        }
        let lying = {
            let mut dir = self.dir.borrow_mut();
            dir.syncs += 1;
            dir.lying
        };
        if !lying {
            let mut d = self.data.borrow_mut();
            d.durable = d.live.clone();
        }
        Ok(())
    }

    fn len(&self) -> Result<u64, StorageError> {
        Ok(self.data.borrow().live.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        if let Some(kind) = self.tick() {
            return Err(self.fault("truncate", kind));
        }
        self.data.borrow_mut().live.resize(len as usize, 0);
        Ok(())
    }

    /// Grows the file with zeros to cover the range, as `fallocate` does (not durable until a
    /// sync, like any change); the call counts as an operation, so faults can hit it.
    fn preallocate(&self, pos: u64, len: u64) -> Result<bool, StorageError> {
        if let Some(kind) = self.tick() {
            return Err(self.fault("preallocate", kind));
        }
        let mut d = self.data.borrow_mut();
        let end = usize::try_from(pos.saturating_add(len)).unwrap_or(usize::MAX);
        if d.live.len() < end {
            d.live.resize(end, 0);
        }
        Ok(true)
    }

    fn sync_handle(&self) -> MemFile {
        self.clone()
    }
}

impl SyncHandle for MemFile {
    fn write_at(&self, buf: &[u8], pos: u64) -> Result<(), StorageError> {
        // A clone shares the file's data; `StorageFile::write_at` wants `&mut` only for the
        // real file's sake.
        StorageFile::write_at(&mut self.clone(), buf, pos)
    }

    fn sync(&self) -> Result<(), StorageError> {
        StorageFile::sync(self)
    }

    fn preallocate(&self, pos: u64, len: u64) -> Result<bool, StorageError> {
        StorageFile::preallocate(self, pos, len)
    }

    fn start_writeback(&self, _pos: u64, _len: u64) -> Result<(), StorageError> {
        // A hint only: memory has no writeback to start, and crashes model only syncs.
        Ok(())
    }
}

/// A small deterministic PRNG step (splitmix64), so crashes replay from a seed.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lying_disk_loses_synced_bytes_in_a_crash() {
        let s = MemStorage::new();
        let f = s.create("a").expect("create");
        f.write_at(b"kept", 0).expect("write");
        StorageFile::sync(&f).expect("sync");
        s.set_lying(true);
        f.write_at(b"lost", 4).expect("write");
        StorageFile::sync(&f).expect("the lie: success");
        let after = s.crash(0);
        let data = after.file_bytes("a").expect("file");
        assert!(data.starts_with(b"kept") && data.len() <= 8);
        assert_eq!(s.file_bytes("a").expect("file").len(), 8, "the live image is whole");
        s.set_lying(false);
        StorageFile::sync(&f).expect("sync");
        assert_eq!(s.crash(0).file_bytes("a").expect("file"), b"keptlost");
    }

    #[test]
    fn mem_crash_keeps_durable_image_and_a_prefix_of_the_rest() {
        let s = MemStorage::new();
        let f = s.create("a").expect("create");
        f.write_at(b"hello", 0).expect("write");
        StorageFile::sync(&f).expect("sync");
        f.write_at(b" world", 5).expect("write");
        for seed in 0..20 {
            let c = s.crash(seed);
            let bytes = c.file_bytes("a").expect("file survives");
            assert!(bytes.starts_with(b"hello"));
            assert!(b"hello world".starts_with(&bytes));
        }
    }

    #[test]
    fn mem_fault_fails_exactly_the_chosen_op() {
        let s = MemStorage::new();
        let f = s.create("a").expect("create");
        s.fail_op(2, FaultKind::Io);
        f.write_at(b"x", 0).expect("first op succeeds");
        assert!(f.write_at(b"y", 1).is_err());
        f.write_at(b"z", 1).expect("third op succeeds");
        assert_eq!(s.file_bytes("a").expect("exists"), b"xz");
    }

    #[test]
    fn disk_file_reads_short_at_eof() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStorage::new(dir.path()).expect("storage");
        let f = s.create("a").expect("create");
        f.write_at(b"abc", 0).expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(f.read_at(&mut buf, 1).expect("read"), 2);
        assert_eq!(&buf[..2], b"bc");
        assert!(read_exact_at(&f, &mut buf, 0, "a").is_err());
        assert_eq!(s.list().expect("list"), vec!["a".to_owned()]);
    }
}
