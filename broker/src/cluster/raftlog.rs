//! The controller voter's Raft log on disk: one append-only file of records, each
//! `[len u32][crc32c u32][kind u8][protobuf]`, kind 1 an entry and kind 2 a hard state. Every
//! Raft `Ready` is appended and fdatasync'd before the messages that depend on it are sent.
//! Opening replays the file into raft-rs's `MemStorage` (later entries replace a conflicting
//! suffix, the last hard state wins) and cuts a torn tail (a record whose length or checksum
//! does not match: a crash in the middle of an append, never acknowledged to anyone).
//!
//! No snapshots yet: the file grows with every controller input and is replayed whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use protobuf::Message as _;
use raft::prelude::{Entry, HardState};
use raft::storage::MemStorage;

use crate::core::quorum::RaftPersist;

const ENTRY: u8 = 1;
const HARD_STATE: u8 = 2;

/// The open Raft log file.
pub(crate) struct RaftFile {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
}

/// Opens (or creates) `dir/raft.log` and loads it into a `MemStorage`.
pub(crate) fn open(dir: &Path) -> Result<(MemStorage, RaftFile)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("raft.log");
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    let storage = MemStorage::new();
    let (good, entries, hard_states) =
        replay(&bytes, &storage).with_context(|| format!("replaying {}", path.display()))?;
    if good < bytes.len() {
        tracing::warn!(path = %path.display(), at = good, dropped = bytes.len() - good, "torn Raft log tail cut");
        file.set_len(good as u64).with_context(|| format!("truncating {}", path.display()))?;
        file.sync_data().with_context(|| format!("syncing {}", path.display()))?;
    }
    tracing::info!(path = %path.display(), entries, hard_states, "Raft log loaded");
    Ok((storage, RaftFile { file, path, buf: Vec::new() }))
}

/// Applies the records of `bytes` to `storage`; returns the length of the valid prefix and
/// the numbers of entry and hard-state records.
fn replay(bytes: &[u8], storage: &MemStorage) -> Result<(usize, usize, usize)> {
    let (mut pos, mut entries, mut hard_states) = (0usize, 0usize, 0usize);
    while let Some(header) = bytes.get(pos..pos + 9) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else { break };
        if len == 0 || crc32c::crc32c(body) != crc {
            // The last record torn by a crash is cut; a bad record with more after it is
            // damage, and a voter must not forget entries it acknowledged: refuse to start.
            anyhow::ensure!(pos + 8 + len >= bytes.len(), "corrupt record at byte {pos} (checksum mismatch)");
            break;
        }
        let (kind, payload) = (body[0], &body[1..]);
        match kind {
            ENTRY => {
                let e = Entry::parse_from_bytes(payload).context("an entry record does not decode")?;
                storage.wl().append(&[e]).context("an entry does not follow the log")?;
                entries += 1;
            }
            HARD_STATE => {
                let hs = HardState::parse_from_bytes(payload).context("a hard-state record does not decode")?;
                storage.wl().set_hardstate(hs);
                hard_states += 1;
            }
            other => anyhow::bail!("unknown record kind {other} at byte {pos}"),
        }
        pos += 8 + len;
    }
    Ok((pos, entries, hard_states))
}

fn record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = (payload.len() + 1) as u32;
    let mut body = Vec::with_capacity(payload.len() + 1);
    body.push(kind);
    body.extend_from_slice(payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

impl RaftPersist for RaftFile {
    fn persist(&mut self, entries: &[Entry], hard_state: Option<&HardState>) {
        self.buf.clear();
        for e in entries {
            record(&mut self.buf, ENTRY, &e.write_to_bytes().unwrap_or_default());
        }
        if let Some(hs) = hard_state {
            record(&mut self.buf, HARD_STATE, &hs.write_to_bytes().unwrap_or_default());
        }
        let result = self.file.write_all(&self.buf).and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            // The vote or entries this voter promised would not survive a restart: stop.
            crate::runtime::fail_stop(&format!("writing the Raft log {}", self.path.display()), &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage as _;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec().into(), ..Default::default() }
    }

    #[test]
    fn reopening_gives_the_same_log_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (_, mut f) = open(dir.path()).expect("opens");
            let hs = HardState { term: 2, vote: 3, commit: 2, ..Default::default() };
            f.persist(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")], Some(&hs));
            // A new leader overwrote index 3 (conflicting suffix).
            f.persist(&[entry(3, 2, b"C")], None);
        }
        let path = dir.path().join("raft.log");
        let good_len = std::fs::metadata(&path).expect("meta").len();
        // A torn record at the end: half of an append.
        let mut torn = Vec::new();
        record(&mut torn, ENTRY, &entry(4, 2, b"d").write_to_bytes().expect("encodes"));
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&torn[..torn.len() / 2]).expect("write");
        drop(f);
        let (storage, _) = open(dir.path()).expect("reopens");
        assert_eq!(storage.last_index().expect("last"), 3);
        assert_eq!(storage.term(3).expect("term"), 2, "the later entry replaced the conflicting one");
        let st = storage.initial_state().expect("state");
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (2, 3, 2));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), good_len, "torn tail cut");
    }

    #[test]
    fn a_flipped_byte_ends_the_log_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (_, mut f) = open(dir.path()).expect("opens");
            f.persist(&[entry(1, 1, b"a")], None);
            f.persist(&[entry(2, 1, b"b")], None);
        }
        let path = dir.path().join("raft.log");
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let (storage, _) = open(dir.path()).expect("reopens");
        assert_eq!(storage.last_index().expect("last"), 1, "the damaged last record is not served");
        // Damage before the end is an error, not a silently shorter log.
        bytes[last] ^= 0xff;
        bytes[12] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let err = open(dir.path()).err().expect("refuses a damaged log");
        assert!(format!("{err:#}").contains("corrupt record at byte 0"), "{err:#}");
    }
}
