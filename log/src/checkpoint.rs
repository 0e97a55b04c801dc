//! Small checkpoint files (log start offset, leader epochs, clean-shutdown marker), written
//! atomically: a temporary file is written and synced, renamed over the old one, and the
//! directory synced. Each file is `magic u32 | payload length u32 | payload | crc32c u32`
//! (little-endian), so a damaged or half-written file is detected, never misread.

use crate::storage::{Storage, StorageError, StorageFile};

/// Why a checkpoint file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Wrong magic, length or CRC.
    #[error("checkpoint {0} is damaged")]
    Damaged(String),
}

/// Writes `payload` to `name` atomically and durably.
pub fn write<S: Storage>(storage: &S, name: &str, magic: u32, payload: &[u8]) -> Result<(), StorageError> {
    let mut bytes = Vec::with_capacity(payload.len() + 12);
    bytes.extend_from_slice(&magic.to_le_bytes());
    let len = u32::try_from(payload.len()).expect("checkpoint payload under 4 GiB");
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = format!("{name}.tmp");
    let mut file = storage.create(&tmp)?;
    file.write_at(&bytes, 0)?;
    file.sync()?;
    storage.rename(&tmp, name)?;
    storage.sync_dir()
}

/// Reads `name`: `Ok(None)` if it does not exist, `Damaged` if it does not check out.
pub fn read<S: Storage>(storage: &S, name: &str, magic: u32) -> Result<Option<Vec<u8>>, CheckpointError> {
    if !storage.list()?.iter().any(|n| n == name) {
        return Ok(None);
    }
    let file = storage.open(name)?;
    let len = file.len()?;
    if !(12..=MAX_BYTES).contains(&len) {
        return Err(CheckpointError::Damaged(storage.path_of(name)));
    }
    let mut bytes = vec![0u8; len as usize];
    crate::storage::read_exact_at(&file, &mut bytes, 0, &storage.path_of(name))?;
    decode(&bytes, magic).map(Some).ok_or_else(|| CheckpointError::Damaged(storage.path_of(name)))
}

/// Decodes checkpoint bytes; `None` if they do not check out. Never panics.
pub fn decode(bytes: &[u8], magic: u32) -> Option<Vec<u8>> {
    if bytes.len() < 12 || bytes[..4] != magic.to_le_bytes() {
        return None;
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().ok()?) as usize;
    if len.checked_add(12)? != bytes.len() {
        return None;
    }
    let crc_pos = bytes.len() - 4;
    let crc = u32::from_le_bytes(bytes[crc_pos..].try_into().ok()?);
    (crc32c::crc32c(&bytes[..crc_pos]) == crc).then(|| bytes[8..crc_pos].to_vec())
}

/// Checkpoints are small; anything larger is damage.
const MAX_BYTES: u64 = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn round_trip_and_damage() {
        let s = MemStorage::new();
        assert!(read(&s, "cp", 7).expect("read").is_none());
        write(&s, "cp", 7, b"payload").expect("write");
        assert_eq!(read(&s, "cp", 7).expect("read").as_deref(), Some(&b"payload"[..]));
        assert!(read(&s, "cp", 8).is_err(), "wrong magic");
        s.flip_byte("cp", 9, 1);
        assert!(matches!(read(&s, "cp", 7), Err(CheckpointError::Damaged(_))));
        assert!(s.list().expect("list").iter().all(|n| !n.ends_with(".tmp")));
    }
}
