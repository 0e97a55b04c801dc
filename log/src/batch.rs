//! The record batch: Skein's unit of produce, replication, storage and fetch.
//!
//! A batch is a fixed 64-byte little-endian header followed by the records as an rkyv archive.
//! It is built once by the producer and then travels unchanged: over the wire, into the log
//! file, out to consumers. The leader only stamps `base_offset` and `leader_epoch`, which sit
//! before the CRC field and are not covered by it (as in Kafka's v2 batches), so stamping never
//! recomputes a checksum. The byte layout is in `log/FORMAT.md`.
//!
//! Untrusted bytes enter through [`RecordBatch::parse`] (full check: framing, CRC, archive,
//! record count and offset deltas) or [`BatchHeader::decode`] (framing only, for scanning a
//! file whose CRCs are checked separately). Neither panics on any input.
//!
//! Not done here: compression (the attribute bits are reserved and rejected until it exists).

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

use crate::types::{LeaderEpoch, Offset, ProducerEpoch, ProducerId, Sequence, Timestamp};

/// Bytes in a batch header.
pub const HEADER_BYTES: usize = 64;
/// The only batch format version so far.
pub const MAGIC: u8 = 1;
/// The largest batch the format allows (a segment position is a `u32`).
pub const BATCH_BYTES_MAX: u32 = 256 * 1024 * 1024;

const POS_LENGTH: usize = 0;
const POS_MAGIC: usize = 4;
const POS_BASE_OFFSET: usize = 8;
const POS_LEADER_EPOCH: usize = 16;
const POS_CRC: usize = 20;
/// The CRC covers everything from here to the end of the batch.
pub const CRC_START: usize = 24;
const POS_ATTRIBUTES: usize = 24;
const POS_PRODUCER_EPOCH: usize = 26;
const POS_LAST_OFFSET_DELTA: usize = 28;
const POS_FIRST_TIMESTAMP: usize = 32;
const POS_MAX_TIMESTAMP: usize = 40;
const POS_PRODUCER_ID: usize = 48;
const POS_BASE_SEQUENCE: usize = 56;
const POS_RECORD_COUNT: usize = 60;

const _: () = assert!(POS_RECORD_COUNT + 4 == HEADER_BYTES);
const _: () = assert!(POS_CRC + 4 == CRC_START);

/// One record as stored in the archive. Offsets and timestamps are deltas from the header.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset of this record minus the batch's base offset.
    pub offset_delta: u32,
    /// Timestamp of this record minus the batch's first timestamp, in milliseconds.
    pub timestamp_delta: i64,
    /// The record key, used by the partitioner and by compaction.
    pub key: Option<Vec<u8>>,
    /// The record value.
    pub value: Vec<u8>,
    /// Application headers.
    pub headers: Vec<RecordHeader>,
}

/// An application header of a record.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Header name.
    pub key: String,
    /// Header value.
    pub value: Vec<u8>,
}

/// The archived form of a batch's records, read in place.
pub type ArchivedRecords = rkyv::Archived<Vec<Record>>;

/// Batch attribute bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attributes(pub u16);

impl Attributes {
    const COMPRESSION_MASK: u16 = 0b111;
    const TRANSACTIONAL: u16 = 1 << 4;
    const CONTROL: u16 = 1 << 5;
    const KNOWN: u16 = Self::COMPRESSION_MASK | Self::TRANSACTIONAL | Self::CONTROL;

    /// Compression codec (0 = none; no other codec exists yet).
    pub fn compression(self) -> u16 {
        self.0 & Self::COMPRESSION_MASK
    }
    /// Part of a transaction.
    pub fn is_transactional(self) -> bool {
        self.0 & Self::TRANSACTIONAL != 0
    }
    /// A control batch (transaction marker), not user data.
    pub fn is_control(self) -> bool {
        self.0 & Self::CONTROL != 0
    }
    /// These attributes with the transactional bit set or cleared.
    pub fn with_transactional(self, on: bool) -> Attributes {
        Attributes(if on { self.0 | Self::TRANSACTIONAL } else { self.0 & !Self::TRANSACTIONAL })
    }
    /// These attributes with the control bit set or cleared.
    pub fn with_control(self, on: bool) -> Attributes {
        Attributes(if on { self.0 | Self::CONTROL } else { self.0 & !Self::CONTROL })
    }
}

/// Why bytes are not a valid batch. Positions are relative to the start of the batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Fewer bytes than a header, or than the header's length field says.
    #[error("batch truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the batch needs.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// The length field is below the header size or above the maximum.
    #[error("batch length {0} out of range")]
    BadLength(u32),
    /// The buffer holds more than one batch's bytes where exactly one was expected.
    #[error("batch length {length} does not match the {available} bytes given")]
    LengthMismatch {
        /// The length field.
        length: u32,
        /// The bytes given.
        available: u64,
    },
    /// Unknown format version.
    #[error("unknown batch magic {0}")]
    BadMagic(u8),
    /// Reserved header bytes or attribute bits are not zero.
    #[error("reserved header bits set")]
    Reserved,
    /// A compression codec this build does not know.
    #[error("unsupported compression codec {0}")]
    UnsupportedCompression(u16),
    /// The stored CRC does not match the bytes.
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The records are not a valid archive.
    #[error("invalid record archive: {0}")]
    InvalidArchive(String),
    /// Record count, offset deltas or timestamps disagree with the header.
    #[error("inconsistent batch: {0}")]
    Inconsistent(&'static str),
}

/// The decoded header of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Total bytes of the batch, header included.
    pub batch_length: u32,
    /// Offset of the first record (stamped by the leader).
    pub base_offset: Offset,
    /// Epoch of the leader that appended the batch (stamped by the leader).
    pub leader_epoch: LeaderEpoch,
    /// CRC32C of bytes `CRC_START..batch_length`.
    pub crc: u32,
    /// Compression, transactional and control bits.
    pub attributes: Attributes,
    /// Producer epoch, or `ProducerEpoch::NONE`.
    pub producer_epoch: ProducerEpoch,
    /// Offset of the last record minus `base_offset`.
    pub last_offset_delta: u32,
    /// Timestamp of the first record.
    pub first_timestamp: Timestamp,
    /// Largest record timestamp.
    pub max_timestamp: Timestamp,
    /// Producer id, or `ProducerId::NONE`.
    pub producer_id: ProducerId,
    /// Sequence of the first record, or `Sequence::NONE`.
    pub base_sequence: Sequence,
    /// Number of records in the archive.
    pub record_count: u32,
}

impl BatchHeader {
    /// Decodes and checks the framing of a header: length range, magic, reserved bits,
    /// record count against the last offset delta. Does not check the CRC or the records.
    pub fn decode(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
        let Some(h) = bytes.get(..HEADER_BYTES) else {
            return Err(BatchError::Truncated { needed: HEADER_BYTES as u64, available: bytes.len() as u64 });
        };
        let batch_length = u32_at(h, POS_LENGTH);
        if (batch_length as usize) < HEADER_BYTES || batch_length > BATCH_BYTES_MAX {
            return Err(BatchError::BadLength(batch_length));
        }
        let magic = h[POS_MAGIC];
        if magic != MAGIC {
            return Err(BatchError::BadMagic(magic));
        }
        if h[POS_MAGIC + 1..POS_BASE_OFFSET].iter().any(|&b| b != 0) {
            return Err(BatchError::Reserved);
        }
        let header = BatchHeader {
            batch_length,
            base_offset: Offset(u64_at(h, POS_BASE_OFFSET)),
            leader_epoch: LeaderEpoch(u32_at(h, POS_LEADER_EPOCH)),
            crc: u32_at(h, POS_CRC),
            attributes: Attributes(u16_at(h, POS_ATTRIBUTES)),
            producer_epoch: ProducerEpoch(u16_at(h, POS_PRODUCER_EPOCH) as i16),
            last_offset_delta: u32_at(h, POS_LAST_OFFSET_DELTA),
            first_timestamp: Timestamp(u64_at(h, POS_FIRST_TIMESTAMP) as i64),
            max_timestamp: Timestamp(u64_at(h, POS_MAX_TIMESTAMP) as i64),
            producer_id: ProducerId(u64_at(h, POS_PRODUCER_ID) as i64),
            base_sequence: Sequence(u32_at(h, POS_BASE_SEQUENCE) as i32),
            record_count: u32_at(h, POS_RECORD_COUNT),
        };
        header.check_framing()?;
        Ok(header)
    }

    fn check_framing(&self) -> Result<(), BatchError> {
        if self.attributes.0 & !Attributes::KNOWN != 0 {
            return Err(BatchError::Reserved);
        }
        if self.attributes.compression() != 0 {
            return Err(BatchError::UnsupportedCompression(self.attributes.compression()));
        }
        if self.record_count == 0 {
            return Err(BatchError::Inconsistent("record count is zero"));
        }
        if u64::from(self.record_count) > u64::from(self.last_offset_delta) + 1 {
            return Err(BatchError::Inconsistent("more records than offsets"));
        }
        if self.base_offset.0.checked_add(u64::from(self.last_offset_delta) + 1).is_none() {
            return Err(BatchError::Inconsistent("offsets overflow"));
        }
        if self.max_timestamp < self.first_timestamp {
            return Err(BatchError::Inconsistent("max timestamp before first timestamp"));
        }
        Ok(())
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> Offset {
        self.base_offset.plus(u64::from(self.last_offset_delta))
    }

    /// The offset after the last record.
    pub fn next_offset(&self) -> Offset {
        self.last_offset().next()
    }

    /// Number of offsets the batch spans (`last_offset_delta + 1`).
    pub fn offset_count(&self) -> u64 {
        u64::from(self.last_offset_delta) + 1
    }
}

/// A batch whose bytes have been fully checked: framing, CRC, archive, record count and dense
/// offset deltas. Only the header fields outside the CRC can change afterwards.
#[derive(Debug, Clone)]
pub struct RecordBatch<B> {
    bytes: B,
    header: BatchHeader,
}

impl<B: AsRef<[u8]>> RecordBatch<B> {
    /// Checks untrusted bytes holding exactly one batch.
    pub fn parse(bytes: B) -> Result<RecordBatch<B>, BatchError> {
        let header = check_batch(bytes.as_ref())?;
        Ok(RecordBatch { bytes, header })
    }

    /// The decoded header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The whole batch, header included, as it goes to disk and wire.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// Total bytes.
    pub fn len_bytes(&self) -> u32 {
        self.header.batch_length
    }

    /// The records, read in place from the archive.
    pub fn records(&self) -> &ArchivedRecords {
        // The archive was validated in `parse`; validating again costs a pass over the
        // records, which a caller iterating them pays anyway. This keeps the crate free of
        // `unsafe`; `access_unchecked` is the optimisation if profiles ever show this.
        rkyv::access::<ArchivedRecords, rancor::Error>(&self.bytes.as_ref()[HEADER_BYTES..])
            .expect("archive validated in RecordBatch::parse and not modified since")
    }

    /// Consumes the batch, returning its bytes.
    pub fn into_bytes(self) -> B {
        self.bytes
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> RecordBatch<B> {
    /// Stamps the base offset (outside the CRC; no checksum work).
    pub fn set_base_offset(&mut self, base: Offset) {
        assert!(base.0.checked_add(self.header.offset_count()).is_some(), "base offset {base} overflows");
        self.bytes.as_mut()[POS_BASE_OFFSET..POS_BASE_OFFSET + 8].copy_from_slice(&base.0.to_le_bytes());
        self.header.base_offset = base;
    }

    /// Stamps the leader epoch (outside the CRC; no checksum work).
    pub fn set_leader_epoch(&mut self, epoch: LeaderEpoch) {
        self.bytes.as_mut()[POS_LEADER_EPOCH..POS_LEADER_EPOCH + 4].copy_from_slice(&epoch.0.to_le_bytes());
        self.header.leader_epoch = epoch;
    }
}

/// Full check of one batch; returns its header.
fn check_batch(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::decode(bytes)?;
    if header.batch_length as u64 != bytes.len() as u64 {
        if (bytes.len() as u64) < header.batch_length as u64 {
            return Err(BatchError::Truncated { needed: header.batch_length.into(), available: bytes.len() as u64 });
        }
        return Err(BatchError::LengthMismatch { length: header.batch_length, available: bytes.len() as u64 });
    }
    check_crc(&header, bytes)?;
    let records = rkyv::access::<ArchivedRecords, rancor::Error>(&bytes[HEADER_BYTES..])
        .map_err(|e| BatchError::InvalidArchive(e.to_string()))?;
    check_records(&header, records)?;
    Ok(header)
}

/// Checks the CRC of a whole batch whose header is already decoded.
pub fn check_crc(header: &BatchHeader, bytes: &[u8]) -> Result<(), BatchError> {
    let end = header.batch_length as usize;
    let Some(covered) = bytes.get(CRC_START..end) else {
        return Err(BatchError::Truncated { needed: end as u64, available: bytes.len() as u64 });
    };
    let computed = crc32c::crc32c(covered);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch { stored: header.crc, computed });
    }
    Ok(())
}

fn check_records(header: &BatchHeader, records: &ArchivedRecords) -> Result<(), BatchError> {
    if records.len() as u64 != u64::from(header.record_count) {
        return Err(BatchError::Inconsistent("record count differs from the archive"));
    }
    if u64::from(header.record_count) != header.offset_count() {
        return Err(BatchError::Inconsistent("offset deltas are not dense"));
    }
    let mut max = header.first_timestamp;
    for (i, r) in records.iter().enumerate() {
        if r.offset_delta.to_native() as usize != i {
            return Err(BatchError::Inconsistent("offset deltas are not dense"));
        }
        let ts = Timestamp(header.first_timestamp.0.wrapping_add(r.timestamp_delta.to_native()));
        max = max.max(ts);
    }
    if max != header.max_timestamp {
        return Err(BatchError::Inconsistent("max timestamp differs from the records"));
    }
    Ok(())
}

/// Builds a batch from records. Used by producers (and tests); brokers never rebuild batches.
///
/// Keys, values and headers are written into the output buffer as they are pushed, in exactly
/// the place and order rkyv would write them when serializing a `Vec<Record>`; `build` then
/// writes only the record array and the archive root. So a record costs one copy of its bytes
/// and no allocation (the buffer and the span list grow amortized; headers, when present, are
/// serialized through rkyv at push time).
#[derive(Clone)]
pub struct BatchBuilder {
    /// Header placeholder, then every pushed record's out-of-line bytes.
    buf: Vec<u8>,
    records: Vec<PushedRecord>,
    first_timestamp: Option<Timestamp>,
    max_timestamp: Timestamp,
    attributes: Attributes,
    producer_id: ProducerId,
    producer_epoch: ProducerEpoch,
    base_sequence: Sequence,
}

/// A record whose bytes are already in the builder's buffer; archives as [`ArchivedRecord`]
/// pointing at them.
#[derive(Archive, Serialize, Clone, Copy)]
#[rkyv(as = ArchivedRecord)]
struct PushedRecord {
    offset_delta: u32,
    timestamp_delta: i64,
    key: Option<Written<u8>>,
    value: Written<u8>,
    headers: Written<ArchivedRecordHeader>,
}

/// A slice of `len` archived `T`s already written at `pos` of the output; archives as an
/// `ArchivedVec<T>` pointing there and writes nothing more when serialized.
struct Written<T> {
    pos: usize,
    len: usize,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Written<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Written<T> {}

impl<T> Written<T> {
    fn new(pos: usize, len: usize) -> Self {
        Written { pos, len, _t: std::marker::PhantomData }
    }
}

impl<T: rkyv::Portable> Archive for Written<T> {
    type Archived = rkyv::vec::ArchivedVec<T>;
    type Resolver = ();

    fn resolve(&self, (): (), out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(self.len, rkyv::vec::VecResolver::from_pos(self.pos), out);
    }
}

impl<T: rkyv::Portable, S: rancor::Fallible + ?Sized> Serialize<S> for Written<T> {
    fn serialize(&self, _: &mut S) -> Result<(), S::Error> {
        Ok(())
    }
}

impl std::fmt::Debug for BatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder").field("records", &self.records.len()).field("bytes", &self.buf.len()).finish()
    }
}

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder::new()
    }
}

impl BatchBuilder {
    /// An empty, non-idempotent, non-transactional batch.
    pub fn new() -> BatchBuilder {
        BatchBuilder {
            buf: vec![0; HEADER_BYTES],
            records: Vec::new(),
            first_timestamp: None,
            max_timestamp: Timestamp(i64::MIN),
            attributes: Attributes::default(),
            producer_id: ProducerId::NONE,
            producer_epoch: ProducerEpoch::NONE,
            base_sequence: Sequence::NONE,
        }
    }

    /// An empty batch whose buffer holds `bytes` of records before it grows.
    pub fn with_capacity(bytes: usize) -> BatchBuilder {
        let mut b = BatchBuilder::new();
        b.buf.reserve(bytes);
        b
    }

    /// An empty batch with room for `bytes` of records and for `records` records before either
    /// grows (a producer sizes its batches once).
    pub fn with_capacities(bytes: usize, records: usize) -> BatchBuilder {
        // `build` appends the record array to the same buffer: room for it too, so the
        // buffer is never copied into a bigger one.
        let array = records.saturating_mul(std::mem::size_of::<ArchivedRecord>()).saturating_add(16);
        let mut b = BatchBuilder::with_capacity(bytes.saturating_add(array));
        b.records.reserve(records);
        b
    }

    /// Marks the batch as an idempotent producer's.
    pub fn producer(mut self, id: ProducerId, epoch: ProducerEpoch, base_sequence: Sequence) -> Self {
        self.producer_id = id;
        self.producer_epoch = epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Sets the attribute bits (transactional, control).
    pub fn attributes(mut self, attributes: Attributes) -> Self {
        self.attributes = attributes;
        self
    }

    /// Adds a record.
    pub fn push(&mut self, key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])], timestamp: Timestamp) {
        let first = *self.first_timestamp.get_or_insert(timestamp);
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let offset_delta = u32::try_from(self.records.len()).expect("fewer than 2^32 records per batch");
        // Same order as rkyv's own serializer: key, value, then the headers' bytes and array.
        let key = key.map(|k| self.write_bytes(k));
        let value = self.write_bytes(value);
        let headers = if headers.is_empty() { Written::new(self.buf.len(), 0) } else { self.write_headers(headers) };
        self.records.push(PushedRecord {
            offset_delta,
            timestamp_delta: timestamp.0.wrapping_sub(first.0),
            key,
            value,
            headers,
        });
    }

    /// Appends bytes as rkyv writes a `Vec<u8>`'s elements (alignment 1 in this format).
    fn write_bytes(&mut self, bytes: &[u8]) -> Written<u8> {
        let pos = self.buf.len();
        self.buf.extend_from_slice(bytes);
        Written::new(pos, bytes.len())
    }

    fn write_headers(&mut self, headers: &[(&str, &[u8])]) -> Written<ArchivedRecordHeader> {
        let owned: Vec<RecordHeader> =
            headers.iter().map(|(k, v)| RecordHeader { key: (*k).to_owned(), value: v.to_vec() }).collect();
        let buf = std::mem::take(&mut self.buf);
        let (buf, pos) = rkyv::util::with_arena(|arena| {
            let mut ser = rkyv::ser::Serializer::new(buf, arena.acquire(), rkyv::ser::sharing::Share::new());
            let pos = rkyv::SerializeUnsized::serialize_unsized(
                owned.as_slice(),
                rancor::Strategy::<_, rancor::Error>::wrap(&mut ser),
            )
            .expect("serializing owned headers into a Vec cannot fail");
            (ser.into_writer(), pos)
        });
        self.buf = buf;
        Written::new(pos, owned.len())
    }

    /// Records added so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes the batch holds so far (header and record bytes; the record array adds about
    /// 40 bytes per record at `build`).
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Encodes the batch with base offset 0 and leader epoch 0 (the leader stamps both).
    ///
    /// Panics if no record was added.
    pub fn build(self) -> RecordBatch<Vec<u8>> {
        assert!(!self.records.is_empty(), "a batch needs at least one record");
        let mut buf = self.buf;
        buf.reserve(self.records.len() * std::mem::size_of::<ArchivedRecord>() + 16);
        let mut buf = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&self.records, buf)
            .expect("serializing pushed records into a Vec cannot fail");
        let batch_length = u32::try_from(buf.len()).ok().filter(|&l| l <= BATCH_BYTES_MAX);
        let batch_length = batch_length.expect("batch larger than BATCH_BYTES_MAX");
        let count = self.records.len() as u32;
        let first = self.first_timestamp.expect("non-empty batch has a first timestamp");
        put_u32(&mut buf, POS_LENGTH, batch_length);
        buf[POS_MAGIC] = MAGIC;
        put_u16(&mut buf, POS_ATTRIBUTES, self.attributes.0);
        put_u16(&mut buf, POS_PRODUCER_EPOCH, self.producer_epoch.0 as u16);
        put_u32(&mut buf, POS_LAST_OFFSET_DELTA, count - 1);
        put_u64(&mut buf, POS_FIRST_TIMESTAMP, first.0 as u64);
        put_u64(&mut buf, POS_MAX_TIMESTAMP, self.max_timestamp.0 as u64);
        put_u64(&mut buf, POS_PRODUCER_ID, self.producer_id.0 as u64);
        put_u32(&mut buf, POS_BASE_SEQUENCE, self.base_sequence.0 as u32);
        put_u32(&mut buf, POS_RECORD_COUNT, count);
        let crc = crc32c::crc32c(&buf[CRC_START..]);
        put_u32(&mut buf, POS_CRC, crc);
        // Built from typed records, so valid by construction; the full check (a second CRC
        // pass and archive validation) runs only in debug builds.
        debug_assert!(check_batch(&buf).is_ok(), "a freshly built batch is valid: {:?}", check_batch(&buf));
        let header = BatchHeader::decode(&buf).expect("a freshly built header decodes");
        RecordBatch { bytes: buf, header }
    }
}

/// Iterates over the batches in a buffer holding whole batches back to back (a fetch
/// response), checking each fully. Stops at the first error.
pub fn batches(bytes: &[u8]) -> impl Iterator<Item = Result<RecordBatch<&[u8]>, BatchError>> {
    let mut rest = bytes;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        let result = BatchHeader::decode(rest).and_then(|h| {
            let len = h.batch_length as usize;
            let Some(one) = rest.get(..len) else {
                return Err(BatchError::Truncated { needed: len as u64, available: rest.len() as u64 });
            };
            let batch = RecordBatch::parse(one)?;
            rest = &rest[len..];
            Ok(batch)
        });
        failed = result.is_err();
        Some(result)
    })
}

/// [`batches`] over a shared buffer: each batch is a slice of it, not a copy (what a log
/// keeps to write behind).
pub fn batches_shared(
    bytes: &bytes::Bytes,
) -> impl Iterator<Item = Result<RecordBatch<bytes::Bytes>, BatchError>> + '_ {
    let mut at = 0;
    batches(bytes).map(move |b| {
        b.map(|b| {
            let len = b.as_bytes().len();
            let shared = RecordBatch { bytes: bytes.slice(at..at + len), header: b.header };
            at += len;
            shared
        })
    })
}

fn u16_at(b: &[u8], pos: usize) -> u16 {
    u16::from_le_bytes([b[pos], b[pos + 1]])
}

fn u32_at(b: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(b[pos..pos + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(b[pos..pos + 8].try_into().expect("8-byte slice"))
}

fn put_u16(b: &mut [u8], pos: usize, v: u16) {
    b[pos..pos + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], pos: usize, v: u32) {
    b[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], pos: usize, v: u64) {
    b[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> RecordBatch<Vec<u8>> {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            let v = format!("value-{i}");
            b.push(Some(b"k"), v.as_bytes(), &[("h", b"x")], Timestamp(1000 + i as i64));
        }
        b.build()
    }

    #[test]
    fn round_trip_reads_records_in_place() {
        let batch = sample(3);
        let h = batch.header();
        assert_eq!(h.record_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.first_timestamp, Timestamp(1000));
        assert_eq!(h.max_timestamp, Timestamp(1002));
        let recs = batch.records();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].value.as_slice(), b"value-2");
        assert_eq!(recs[1].key.as_ref().map(|k| k.as_slice()), Some(&b"k"[..]));
        assert_eq!(recs[0].headers[0].key.as_str(), "h");
    }

    #[test]
    fn stamping_offset_and_epoch_keeps_crc_valid() {
        let mut batch = sample(2);
        batch.set_base_offset(Offset(77));
        batch.set_leader_epoch(LeaderEpoch(5));
        let again = RecordBatch::parse(batch.as_bytes().to_vec()).expect("still valid");
        assert_eq!(again.header().base_offset, Offset(77));
        assert_eq!(again.header().leader_epoch, LeaderEpoch(5));
        assert_eq!(again.header().last_offset(), Offset(78));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let batch = sample(2);
        let bytes = batch.as_bytes().to_vec();
        for pos in 0..bytes.len() {
            if (POS_BASE_OFFSET..POS_CRC).contains(&pos) {
                continue; // offset and epoch are outside the CRC by design
            }
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            assert!(RecordBatch::parse(bad).is_err(), "flip at {pos} not detected");
        }
    }

    #[test]
    fn truncated_and_padded_buffers_are_rejected() {
        let bytes = sample(1).into_bytes();
        assert!(matches!(RecordBatch::parse(&bytes[..10]), Err(BatchError::Truncated { .. })));
        assert!(matches!(RecordBatch::parse(&bytes[..bytes.len() - 1]), Err(BatchError::Truncated { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(RecordBatch::parse(longer), Err(BatchError::LengthMismatch { .. })));
    }

    #[test]
    fn batches_iterates_back_to_back() {
        let mut buf = sample(2).into_bytes();
        buf.extend_from_slice(sample(3).as_bytes());
        let counts: Vec<u32> = batches(&buf).map(|b| b.expect("valid").header().record_count).collect();
        assert_eq!(counts, vec![2, 3]);
        buf.truncate(buf.len() - 5);
        let results: Vec<_> = batches(&buf).collect();
        assert_eq!(results.len(), 2);
        assert!(results[1].is_err());
    }

    type PropRecord = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>, i64);

    fn prop_record() -> impl proptest::strategy::Strategy<Value = PropRecord> {
        use proptest::prelude::*;
        let bytes = proptest::collection::vec(any::<u8>(), 0..40);
        (
            proptest::option::of(bytes.clone()),
            bytes.clone(),
            proptest::collection::vec(("[a-z]{0,20}", bytes), 0..3),
            -5i64..5,
        )
    }

    /// The builder writes the archive itself (bytes at push, records at build); it must be
    /// exactly what rkyv would write for the owned records: same bytes, and valid.
    fn check_builder_matches_rkyv(records: &[PropRecord]) {
        let mut b = BatchBuilder::new();
        let mut owned = Vec::new();
        let first = records[0].3;
        for (i, (k, v, h, ts)) in records.iter().enumerate() {
            let hs: Vec<(&str, &[u8])> = h.iter().map(|(a, b)| (a.as_str(), b.as_slice())).collect();
            b.push(k.as_deref(), v, &hs, Timestamp(*ts));
            owned.push(Record {
                offset_delta: i as u32,
                timestamp_delta: ts - first,
                key: k.clone(),
                value: v.clone(),
                headers: h.iter().map(|(a, b)| RecordHeader { key: a.clone(), value: b.clone() }).collect(),
            });
        }
        let batch = RecordBatch::parse(b.build().into_bytes()).expect("built batch is valid");
        let expected = rkyv::to_bytes::<rancor::Error>(&owned).expect("serializes");
        assert_eq!(&batch.as_bytes()[HEADER_BYTES..], expected.as_slice(), "archive differs from rkyv's");
        let back: Vec<Record> = rkyv::deserialize::<_, rancor::Error>(batch.records()).expect("deserializes");
        assert_eq!(back, owned);
    }

    #[test]
    fn builder_matches_rkyv_for_edge_records() {
        check_builder_matches_rkyv(&[(None, vec![], vec![], 0)]);
        check_builder_matches_rkyv(&[(Some(vec![]), vec![1], vec![(String::new(), vec![])], 3)]);
        let long = "a-header-name-longer-than-inline".to_string();
        check_builder_matches_rkyv(&[
            (Some(vec![7; 9]), vec![1; 100], vec![(long, vec![2; 3])], 1),
            (None, vec![], vec![], 0),
        ]);
    }

    proptest::proptest! {
        #[test]
        fn prop_decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = RecordBatch::parse(&bytes[..]);
            let _ = BatchHeader::decode(&bytes);
            let _ = batches(&bytes).count();
        }

        #[test]
        fn prop_decoder_never_panics_on_mutated_batches(
            n in 1usize..5,
            flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8),
        ) {
            let mut bytes = sample(n).into_bytes();
            for (pos, x) in flips {
                let len = bytes.len();
                bytes[pos % len] ^= x;
            }
            // Fix up the CRC so the archive validator, not the CRC, meets the garbage.
            let crc = crc32c::crc32c(&bytes[CRC_START..]);
            bytes[POS_CRC..POS_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            let _ = RecordBatch::parse(&bytes[..]).map(|b| b.records().len());
        }

        #[test]
        fn prop_builder_matches_rkyv(records in proptest::collection::vec(prop_record(), 1..12)) {
            check_builder_matches_rkyv(&records);
        }
    }
}
