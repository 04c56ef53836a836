//! The bytes of a log segment: a header naming the format, then checksummed records.
//!
//! ```text
//! segment = MAGIC (7 bytes) | FORMAT_VERSION (1 byte) | record*
//! record  = len: u32 LE | xxh3_64(len bytes | payload): u64 LE | payload (len bytes)
//! payload = count: u32 LE | op{count}
//! op      = table: u8 | key len: u32 LE | key | record len: u32 LE | `Versioned::to_bytes`
//! ```
//!
//! One record holds every op one replica apply stored, so an apply is in the log whole or not
//! at all. The checksum covers the length too, so a torn or flipped length is caught like a
//! torn or flipped payload.

use cluster::replication::TableId;
use xxhash_rust::xxh3::Xxh3;

/// The first bytes of every segment file.
pub const MAGIC: &[u8; 7] = b"chatlog";
/// The version of this layout; a segment with another one is refused (nothing to migrate from
/// yet: version 1 is the first).
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before the first record.
pub const SEGMENT_HEADER: usize = MAGIC.len() + 1;
/// Bytes before a record's payload (length and checksum).
pub const RECORD_HEADER: usize = 4 + 8;
/// The largest payload a record may have. An apply batch is at most a few MiB (the
/// coordinator splits a replica node's share into ~1 MiB requests); a length field above this
/// is a torn or corrupt header, not a record to read.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// The segment header.
pub fn segment_header() -> [u8; SEGMENT_HEADER] {
    let mut h = [0; SEGMENT_HEADER];
    h[..MAGIC.len()].copy_from_slice(MAGIC);
    h[MAGIC.len()] = FORMAT_VERSION;
    h
}

/// Builds one record from the ops of one apply.
#[derive(Default)]
pub struct RecordBuilder {
    payload: Vec<u8>,
    count: u32,
}

impl RecordBuilder {
    /// Adds one stored op: its table, key and `Versioned` bytes.
    pub fn push(&mut self, table: TableId, key: &[u8], versioned: &[u8]) {
        if self.payload.is_empty() {
            self.payload.extend_from_slice(&[0; 4]); // the count, set in `finish`
        }
        self.payload.push(table);
        put_bytes(&mut self.payload, key);
        put_bytes(&mut self.payload, versioned);
        self.count += 1;
    }

    /// Whether no op was added (nothing to log).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The framed record (header and payload), ready to append.
    pub fn finish(mut self) -> Vec<u8> {
        if self.payload.is_empty() {
            self.payload.extend_from_slice(&[0; 4]);
        }
        self.payload[..4].copy_from_slice(&self.count.to_le_bytes());
        frame(&self.payload)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and records are far below 4 GiB (a record is below MAX_PAYLOAD).
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Frames `payload` as a record.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(payload);
    let sum = checksum(&out[..4], &out[RECORD_HEADER..]);
    out[4..RECORD_HEADER].copy_from_slice(&sum.to_le_bytes());
    out
}

fn checksum(len: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(len);
    h.update(payload);
    h.digest()
}

/// Why a record could not be read (the log is cut before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    /// Fewer bytes than a record header or than its length says: a write that did not finish.
    #[error("short record")]
    Short,
    /// A length of zero or above `MAX_PAYLOAD`.
    #[error("impossible length {0}")]
    Length(u32),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch")]
    Checksum,
    /// The checksum matched but the payload does not parse (a bug or a foreign file).
    #[error("malformed payload")]
    Malformed,
}

/// The whole length (header and payload) that the record starting `bytes` declares, if its
/// length field is there and the length is possible.
pub fn record_len(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    (4..=MAX_PAYLOAD)
        .contains(&len)
        .then_some(RECORD_HEADER + len)
}

/// Reads the record at the start of `bytes`: its payload and the bytes it takes.
pub fn read_record(bytes: &[u8]) -> Result<(&[u8], usize), BadRecord> {
    let header = bytes.get(..RECORD_HEADER).ok_or(BadRecord::Short)?;
    let mut len4 = [0; 4];
    len4.copy_from_slice(&header[..4]);
    let len = u32::from_le_bytes(len4);
    if len < 4 || len as usize > MAX_PAYLOAD {
        return Err(BadRecord::Length(len));
    }
    let end = RECORD_HEADER + len as usize;
    let payload = bytes.get(RECORD_HEADER..end).ok_or(BadRecord::Short)?;
    let mut sum8 = [0; 8];
    sum8.copy_from_slice(&header[4..]);
    if u64::from_le_bytes(sum8) != checksum(&header[..4], payload) {
        return Err(BadRecord::Checksum);
    }
    Ok((payload, end))
}

/// One op of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedOp<'a> {
    pub table: TableId,
    pub key: &'a [u8],
    pub versioned: &'a [u8],
}

/// The ops of a record's payload.
pub fn ops(payload: &[u8]) -> Result<Vec<LoggedOp<'_>>, BadRecord> {
    let (count, mut rest) = take_u32(payload)?;
    let mut out = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let (&table, after) = rest.split_first().ok_or(BadRecord::Malformed)?;
        let (key, after) = take_bytes(after)?;
        let (versioned, after) = take_bytes(after)?;
        out.push(LoggedOp {
            table,
            key,
            versioned,
        });
        rest = after;
    }
    if !rest.is_empty() {
        return Err(BadRecord::Malformed);
    }
    Ok(out)
}

fn take_u32(bytes: &[u8]) -> Result<(u32, &[u8]), BadRecord> {
    let head = bytes.get(..4).ok_or(BadRecord::Malformed)?;
    let mut b = [0; 4];
    b.copy_from_slice(head);
    Ok((u32::from_le_bytes(b), &bytes[4..]))
}

fn take_bytes(bytes: &[u8]) -> Result<(&[u8], &[u8]), BadRecord> {
    let (len, rest) = take_u32(bytes)?;
    let len = len as usize;
    let taken = rest.get(..len).ok_or(BadRecord::Malformed)?;
    Ok((taken, &rest[len..]))
}
