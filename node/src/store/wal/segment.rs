//! Segment files in the log directory: `<seq>.log`, numbered in the order they were started.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::format::segment_header;

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

/// Creates segment `seq` with its header, durably (file and directory entry), open for
/// appending. Private to this user (0600), like the rest of the store (it holds message
/// bodies).
pub fn create(dir: &Path, seq: u64) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(path(dir, seq))?;
    file.write_all(&segment_header())?;
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
