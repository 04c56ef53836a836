//! The cluster directory: the cluster CA, node certificates signed by it, and the cluster
//! secret.
//!
//! Layout of a cluster directory (the file names are part of the operator interface):
//!
//! | file | holds | mode |
//! |---|---|---|
//! | `ca.pem` | the cluster CA certificate (self-signed, CA=true) | 0644 |
//! | `ca.key` | the CA private key (PKCS#8 PEM) | 0600 |
//! | `secret` | 32 random bytes, hex | 0600 |
//! | `<name>.pem` | a node certificate signed by the CA | 0644 |
//! | `<name>.key` | that node's private key | 0600 |
//!
//! Node certificates carry both the server and the client extended key usage, so one
//! certificate serves both ends of the mutual-TLS peer transport.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::rngs::OsRng;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

mod error;

pub use error::CertError;

/// File name of the CA certificate inside a cluster directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a cluster directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the hex-encoded cluster secret inside a cluster directory.
pub const SECRET_FILE: &str = "secret";

/// Subject common name of every cluster CA. Node certificates are issued by re-creating the
/// CA's issuer name from this constant, so it is part of the on-disk format.
const CA_COMMON_NAME: &str = "chatnode cluster CA";

/// The TLS material one node needs: the cluster CA to trust, and its own certificate and key.
#[derive(Debug)]
pub struct NodeTls {
    /// The cluster CA certificate: the only trust anchor for peers.
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeTls {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The 32-byte cluster secret (token signing, gossip cluster id). `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; 32]);

impl ClusterSecret {
    /// A fresh secret from the operating system's random source.
    pub fn generate() -> Result<Self, CertError> {
        let mut bytes = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(CertError::Random)?;
        Ok(Self(bytes))
    }

    /// A secret with the given bytes (tests, or keys derived elsewhere).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw secret bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Creates `dir` if needed and writes a new cluster CA (`ca.pem`, `ca.key`) and cluster secret
/// (`secret`). Refuses, without writing anything, when any of the three already exists.
pub fn init_cluster_dir(dir: &Path) -> Result<(), CertError> {
    for file in [CA_CERT_FILE, CA_KEY_FILE, SECRET_FILE] {
        let path = dir.join(file);
        if path.exists() {
            return Err(CertError::AlreadyExists { path });
        }
    }
    create_dir(dir)?;
    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "CA key",
        source,
    })?;
    let mut params = ca_params();
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate {
            what: "CA certificate",
            source,
        })?;
    let secret = ClusterSecret::generate()?;
    // Key and secret first: a crash in between leaves no `ca.pem` without its key.
    write_new(
        &dir.join(CA_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join(SECRET_FILE), secret.to_hex().as_bytes(), 0o600)?;
    write_new(&dir.join(CA_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Issues a certificate for node `name`, valid for `hosts` (IP addresses or DNS names) and
/// for `name` itself as a DNS name, signed by the CA in `dir`. Writes `<name>.pem` and
/// `<name>.key`, replacing an earlier certificate for the same name (re-issue to add hosts).
pub fn issue_node_cert(dir: &Path, name: &str, hosts: &[String]) -> Result<(), CertError> {
    validate_name(name)?;
    let mut sans = vec![SanType::DnsName(ia5(name)?)];
    for host in hosts {
        let san = host_san(host)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| CertError::CaKey {
        path: ca_key_path.clone(),
        source,
    })?;
    // The CA certificate must be there and readable too, or the node could not use the result.
    read_ca(dir)?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "node key",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_string());
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertError::Generate {
            what: "node certificate",
            source,
        })?;
    write_replace(
        &dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_replace(
        &dir.join(format!("{name}.pem")),
        cert.pem().as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Reads the CA certificate and node `name`'s certificate and key from `dir`.
pub fn load(dir: &Path, name: &str) -> Result<NodeTls, CertError> {
    validate_name(name)?;
    let ca = read_ca(dir)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let chain = read_certs(&cert_path)?;
    let key_path = dir.join(format!("{name}.key"));
    let bytes = read_bytes(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|reason| CertError::Pem {
        path: key_path,
        what: "private key",
        reason,
    })?;
    Ok(NodeTls { ca, chain, key })
}

/// Reads the cluster secret from `dir`.
pub fn load_secret(dir: &Path) -> Result<ClusterSecret, CertError> {
    let path = dir.join(SECRET_FILE);
    let text = read_text(&path)?;
    ClusterSecret::from_hex(&text).ok_or(CertError::BadSecret { path })
}

/// The single-node default: makes the CA and secret if `dir` has none, a certificate for
/// `name` if there is none, then loads both.
pub fn ensure_node(
    dir: &Path,
    name: &str,
    hosts: &[String],
) -> Result<(NodeTls, ClusterSecret), CertError> {
    validate_name(name)?;
    if !dir.join(CA_CERT_FILE).exists() && !dir.join(CA_KEY_FILE).exists() {
        init_cluster_dir(dir)?;
    }
    if !dir.join(format!("{name}.pem")).exists() || !dir.join(format!("{name}.key")).exists() {
        issue_node_cert(dir, name, hosts)?;
    }
    Ok((load(dir, name)?, load_secret(dir)?))
}

/// The CA's parameters. Issuing re-creates them, so the subject name and key identifier
/// method must never change.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn validate_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name != "ca"
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn host_san(host: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // Only names a TLS client can ask for are worth putting in a certificate.
    match ServerName::try_from(host) {
        Ok(ServerName::DnsName(_)) => ia5(host).map(SanType::DnsName),
        _ => Err(CertError::InvalidHost {
            host: host.to_string(),
        }),
    }
}

fn ia5(host: &str) -> Result<rcgen::string::Ia5String, CertError> {
    rcgen::string::Ia5String::try_from(host).map_err(|_| CertError::InvalidHost {
        host: host.to_string(),
    })
}

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(CertError::Random)?;
    bytes[0] &= 0x7f; // positive, as X.509 requires
    bytes[0] |= 0x01; // and no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

fn read_ca(dir: &Path) -> Result<CertificateDer<'static>, CertError> {
    let path = dir.join(CA_CERT_FILE);
    let mut certs = read_certs(&path)?;
    Ok(certs.swap_remove(0))
}

/// Reads a PEM file holding one or more certificates; at least one is required.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read_bytes(path)?;
    let pem_err = |reason| CertError::Pem {
        path: path.to_path_buf(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(pem_err(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes a file that must not exist yet.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    };
    write().map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => CertError::AlreadyExists {
            path: path.to_path_buf(),
        },
        _ => CertError::Write {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Replaces a file atomically: writes a temporary file beside it, then renames it.
fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|source| CertError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
