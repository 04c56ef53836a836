//! Segment files in the log directory: `<seq>.log`, numbered in the order they were started.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::format::{segment_header, SEGMENT_HEADER};

/// The file of segment `seq` (zero-padded so that names sort like numbers).
pub fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.log"))
}

/// The segments in `dir`, oldest first. Other files are ignored.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        seqs.push(seq);
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Zeros written per call while preallocating a segment: one page. Larger writes let the
/// kernel cache the file in large folios (seen with 2 MiB ones on ext4, Linux 6.18), and a
/// record written into one then dirties, and makes the next `fdatasync` write, the whole
/// folio: 2 MiB per sync instead of a page or two.
const ZERO_CHUNK: usize = 4096;

/// Creates segment `seq` with its header, durably (file and directory entry), open for
/// writing at [`SEGMENT_HEADER`]. Private to this user (0600), like the rest of the store (it
/// holds message bodies).
///
/// The file is filled with zeros up to `prealloc` bytes (written and synced here, off the
/// append path), so that a record written into that space and `fdatasync`ed costs one data
/// write: appending also changes the file's size, which every sync must then write too (on
/// this project's test machine: ~110 against ~65 µs of CPU and ~270 against ~160 µs per
/// sync). Replay reads zeros after the last record as the segment's clean end.
pub fn create(dir: &Path, seq: u64, prealloc: u64) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path(dir, seq))?;
    file.write_all(&segment_header())?;
    let mut left = prealloc.saturating_sub(SEGMENT_HEADER as u64);
    if left > 0 {
        let zeros = vec![0u8; ZERO_CHUNK.min(left as usize)];
        while left > 0 {
            let n = zeros.len().min(left as usize);
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// Makes the directory's entries (new or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deletes every segment numbered below `seq`; returns how many. A segment already gone is
/// not an error.
pub fn delete_below(dir: &Path, seq: u64) -> io::Result<usize> {
    let mut deleted = 0;
    for old in list(dir)?.into_iter().take_while(|s| *s < seq) {
        match std::fs::remove_file(path(dir, old)) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if deleted > 0 {
        sync_dir(dir)?;
    }
    Ok(deleted)
}
