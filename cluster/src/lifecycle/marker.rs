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

    /// The removal map this node last recorded (its gossip wire form), if any: republished
    /// at start, so that removals outlive a restart of the whole cluster.
    fn removals(&self) -> Result<Option<String>, MarkerError>;

    /// Records, durably, the removal map (its gossip wire form).
    fn set_removals(&self, removals: &str) -> Result<(), MarkerError>;
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

    /// The file name of the recorded removal map, next to the marker.
    pub const REMOVALS_FILE_NAME: &'static str = "cluster-removals";

    /// The marker file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn removals_path(&self) -> PathBuf {
        self.path.with_file_name(Self::REMOVALS_FILE_NAME)
    }

    /// Writes `bytes` to `path` through a temporary file and a rename, syncing the file and
    /// the directory: a crash leaves the old content or the new, never half.
    fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("tmp");
        // Private like everything in the data dir, whatever the umask.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
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
        Self::write_synced(
            &self.path,
            b"this node holds partitions; delete the whole data dir to make it join anew\n",
        )
        .map_err(|source| MarkerError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn removals(&self) -> Result<Option<String>, MarkerError> {
        let path = self.removals_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(MarkerError::Check { path, source }),
        }
    }

    fn set_removals(&self, removals: &str) -> Result<(), MarkerError> {
        let path = self.removals_path();
        Self::write_synced(&path, format!("{removals}\n").as_bytes())
            .map_err(|source| MarkerError::Write { path, source })
    }
}

/// The marker in memory, for tests. Clones share it, so a test can keep one to look at (or
/// to hand to the node's next incarnation, as a data dir survives a restart).
#[derive(Clone, Debug, Default)]
pub struct MemoryMarker {
    set: Arc<AtomicBool>,
    removals: Arc<parking_lot::Mutex<Option<String>>>,
}

impl MemoryMarker {
    /// A marker, set or not.
    pub fn new(set: bool) -> Self {
        Self {
            set: Arc::new(AtomicBool::new(set)),
            removals: Arc::default(),
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

    fn removals(&self) -> Result<Option<String>, MarkerError> {
        Ok(self.removals.lock().clone())
    }

    fn set_removals(&self, removals: &str) -> Result<(), MarkerError> {
        *self.removals.lock() = Some(removals.to_string());
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
        // The removal map: absent, then what was recorded last.
        assert_eq!(marker.removals()?, None);
        marker.set_removals("4:1:r")?;
        marker.set_removals("4:1:d")?;
        assert_eq!(marker.removals()?.as_deref(), Some("4:1:d"));
        assert!(!dir.path().join("cluster-removals.tmp").exists());
        Ok(())
    }
}
