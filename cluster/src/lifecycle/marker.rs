//! The member marker: the durable fact "this node has held partitions". A node that has it
//! comes back as a member after a restart (and catches up); a node without it joins (and
//! pulls its partitions first). [`FileMarker`] keeps it as a file in the data dir,
//! [`MemoryMarker`] in memory for tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where the member marker lives.
pub trait MemberMarker: Send + Sync + 'static {
    /// Whether this node has been recorded as a member.
    fn is_set(&self) -> Result<bool, MarkerError>;

    /// Records, durably, that this node holds partitions. Idempotent.
    fn set(&self) -> Result<(), MarkerError>;
}

/// The marker could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// Whether the marker exists could not be told (the data dir is unreadable).
    #[error("cannot tell whether {} exists: {source}", path.display())]
    Check {
        /// The marker file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The marker could not be written and synced.
    #[error("cannot record membership in {}: {source}", path.display())]
    Write {
        /// The marker file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

/// The marker as a file: present means set. The file and its directory are synced when it
/// is written, so a crash right after cannot lose it.
#[derive(Clone, Debug)]
pub struct FileMarker {
    path: PathBuf,
}

impl FileMarker {
    /// The file name in the data dir (part of the on-disk format: deleting the whole data
    /// dir makes the node join anew).
    pub const FILE_NAME: &'static str = "placement-member";

    /// The marker [`FileMarker::FILE_NAME`] in `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self::at(data_dir.join(Self::FILE_NAME))
    }

    /// The marker at `path`.
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// The marker file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // Private like everything in the data dir, whatever the umask.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)?;
        file.write_all(
            b"this node holds partitions; delete the whole data dir to make it join anew\n",
        )?;
        file.sync_all()?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }
}

impl MemberMarker for FileMarker {
    fn is_set(&self) -> Result<bool, MarkerError> {
        self.path.try_exists().map_err(|source| MarkerError::Check {
            path: self.path.clone(),
            source,
        })
    }

    fn set(&self) -> Result<(), MarkerError> {
        self.write().map_err(|source| MarkerError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// The marker in memory, for tests. Clones share it, so a test can keep one to look at (or
/// to hand to the node's next incarnation, as a data dir survives a restart).
#[derive(Clone, Debug, Default)]
pub struct MemoryMarker {
    set: Arc<AtomicBool>,
}

impl MemoryMarker {
    /// A marker, set or not.
    pub fn new(set: bool) -> Self {
        Self {
            set: Arc::new(AtomicBool::new(set)),
        }
    }

    /// Whether it is set.
    pub fn get(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

impl MemberMarker for MemoryMarker {
    fn is_set(&self) -> Result<bool, MarkerError> {
        Ok(self.get())
    }

    fn set(&self) -> Result<(), MarkerError> {
        self.set.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_marker_is_set_once_written() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let marker = FileMarker::in_dir(dir.path());
        assert!(!marker.is_set()?);
        marker.set()?;
        assert!(marker.is_set()?);
        assert!(dir.path().join(FileMarker::FILE_NAME).exists());
        // Idempotent.
        marker.set()?;
        assert!(marker.is_set()?);
        // A data dir that is gone cannot take the marker: a typed error, not a panic.
        let gone = FileMarker::in_dir(&dir.path().join("missing"));
        assert!(matches!(gone.set(), Err(MarkerError::Write { .. })));
        Ok(())
    }
}
