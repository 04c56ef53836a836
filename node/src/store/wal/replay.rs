//! Reading the log back at start: every record of every segment, oldest first, up to the first
//! bad one of each segment, which is cut off.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use super::format::{self, BadRecord, LoggedOp, SEGMENT_HEADER};
use super::segment;

/// What a replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The segments read, oldest first (delete them once their ops are durable elsewhere).
    pub segments: Vec<u64>,
    /// Records (applies) and ops applied.
    pub records: u64,
    pub ops: u64,
    /// Bytes of good records read.
    pub bytes: u64,
    /// Bytes cut off at bad records (a torn tail, or corruption and everything after it).
    pub bytes_cut: u64,
    /// Segments in which a bad record was followed by a good one (corruption, not a torn
    /// write): the good records after it were cut too.
    pub corrupt_segments: Vec<u64>,
}

impl Replayed {
    /// The number for the next segment to start.
    pub fn next_seq(&self) -> u64 {
        self.segments.last().map_or(1, |s| s + 1)
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E> {
    #[error("reading the commit log: {0}")]
    Io(#[from] io::Error),
    /// A segment of another format version.
    #[error("segment {seq} has format version {version}; this build reads only {expected}")]
    Version { seq: u64, version: u8, expected: u8 },
    /// A good record that names something this store cannot apply.
    #[error("applying a logged op: {0}")]
    Apply(E),
}

/// Replays every segment in `dir` through `apply`, oldest first, cutting each segment at its
/// first bad record (the file is truncated there and the cut logged).
pub fn replay<E>(
    dir: &Path,
    mut apply: impl FnMut(LoggedOp<'_>) -> Result<(), E>,
) -> Result<Replayed, ReplayError<E>> {
    let mut out = Replayed::default();
    for seq in segment::list(dir)? {
        let path = segment::path(dir, seq);
        let bytes = std::fs::read(&path)?;
        out.segments.push(seq);
        let good_end = match bytes.get(..SEGMENT_HEADER) {
            Some(h) if h[..format::MAGIC.len()] == format::MAGIC[..] => {
                let version = h[format::MAGIC.len()];
                if version != format::FORMAT_VERSION {
                    return Err(ReplayError::Version {
                        seq,
                        version,
                        expected: format::FORMAT_VERSION,
                    });
                }
                replay_records(seq, &bytes, &mut apply, &mut out)?
            }
            // A segment whose header never reached the disk (a crash while it was created)
            // or is not ours: nothing in it can be read.
            _ => 0,
        };
        if good_end < bytes.len() {
            // Zeros after the last record are the segment's preallocated space, not a cut
            // (a record never starts with a zero length). Truncated all the same: the
            // replayed segment is not written again.
            let cut = if bytes[good_end..].iter().all(|b| *b == 0) {
                0
            } else {
                bytes.len() - good_end
            };
            out.bytes_cut += cut as u64;
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(good_end as u64)?;
            file.sync_all()?;
        }
    }
    Ok(out)
}

/// Applies the records of one segment; returns where the good records end.
fn replay_records<E>(
    seq: u64,
    bytes: &[u8],
    apply: &mut impl FnMut(LoggedOp<'_>) -> Result<(), E>,
    out: &mut Replayed,
) -> Result<usize, ReplayError<E>> {
    let mut at = SEGMENT_HEADER;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (payload, used) = match format::read_record(rest) {
            Ok(r) => r,
            Err(_) if rest.iter().all(|b| *b == 0) => return Ok(at),
            Err(bad) => {
                report_cut(seq, at, bytes.len() - at, bad, followed_by_good(rest));
                if followed_by_good(rest) {
                    out.corrupt_segments.push(seq);
                }
                return Ok(at);
            }
        };
        let ops = match format::ops(payload) {
            Ok(ops) => ops,
            Err(bad) => {
                report_cut(seq, at, bytes.len() - at, bad, true);
                out.corrupt_segments.push(seq);
                return Ok(at);
            }
        };
        for op in ops {
            apply(op).map_err(ReplayError::Apply)?;
            out.ops += 1;
        }
        out.records += 1;
        out.bytes += used as u64;
        at += used;
    }
    Ok(at)
}

/// Whether a good record starts right after the bad one at the start of `rest` (its length
/// field read as written): the bad record is corruption inside the log, not a torn tail.
fn followed_by_good(rest: &[u8]) -> bool {
    let Some(len) = rest.get(..4) else {
        return false;
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > format::MAX_PAYLOAD {
        return false;
    }
    rest.get(format::RECORD_HEADER + len..)
        .is_some_and(|next| format::read_record(next).is_ok())
}

fn report_cut(seq: u64, at: usize, cut: usize, bad: BadRecord, corrupt: bool) {
    if corrupt {
        tracing::warn!(
            segment = seq,
            offset = at,
            bytes_cut = cut,
            %bad,
            "commit log: a corrupt record is followed by good ones; the log is cut at the \
             corrupt record and the records after it are lost from this node's log (other \
             replicas and anti-entropy still hold them)"
        );
    } else {
        tracing::warn!(
            segment = seq,
            offset = at,
            bytes_cut = cut,
            %bad,
            "commit log: cut a torn tail at the last good record"
        );
    }
}
