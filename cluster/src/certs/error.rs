//! The error type of the cluster directory.

use std::io;
use std::path::PathBuf;

/// An error about the cluster directory; every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// `init_cluster_dir` found an existing CA or secret and refuses to replace it.
    #[error("{path} already exists: refusing to overwrite an existing cluster CA or secret")]
    AlreadyExists {
        /// The file that already exists.
        path: PathBuf,
    },
    /// A file or directory could not be created or written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A PEM file holds no valid certificate or key.
    #[error("{path} is not a valid PEM {what}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the file should hold ("certificate", "private key").
        what: &'static str,
        /// Why it was rejected.
        reason: rustls::pki_types::pem::Error,
    },
    /// The CA key file exists but cannot be used to sign.
    #[error("{path} is not a usable CA private key: {source}")]
    CaKey {
        /// The file.
        path: PathBuf,
        /// The reason rcgen gave.
        source: rcgen::Error,
    },
    /// The secret file does not hold exactly 64 hex characters.
    #[error("{path} must hold the cluster secret as 64 hex characters")]
    BadSecret {
        /// The file.
        path: PathBuf,
    },
    /// The node name cannot be used as a file name and DNS label.
    #[error("invalid node name {name:?}: use 1-63 letters, digits or '-', not \"ca\"")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A host is neither an IP address nor a valid DNS name.
    #[error("invalid host {host:?}: not an IP address or DNS name")]
    InvalidHost {
        /// The rejected host.
        host: String,
    },
    /// Key or certificate generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The reason rcgen gave.
        source: rcgen::Error,
    },
    /// The operating system's random source failed.
    #[error("no randomness from the operating system: {0}")]
    Random(rand::Error),
}
