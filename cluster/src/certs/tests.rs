use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::UnixTime;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::*;

fn hosts(list: &[&str]) -> Vec<String> {
    list.iter().map(|h| h.to_string()).collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn verifiers(
    ca: &CertificateDer<'static>,
) -> (Arc<WebPkiServerVerifier>, Arc<dyn ClientCertVerifier>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let roots = Arc::new(roots);
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let client = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap();
    (server, client)
}

#[test]
fn init_writes_private_files_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster");
    init_cluster_dir(&cluster).unwrap();
    assert_eq!(mode(&cluster.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&cluster.join(SECRET_FILE)), 0o600);
    let ca_before = fs::read(cluster.join(CA_CERT_FILE)).unwrap();
    let secret = load_secret(&cluster).unwrap();
    assert_eq!(format!("{secret:?}"), "ClusterSecret(..)");

    let err = init_cluster_dir(&cluster).unwrap_err();
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem"), "{err}");
    assert_eq!(fs::read(cluster.join(CA_CERT_FILE)).unwrap(), ca_before);
    assert_eq!(load_secret(&cluster).unwrap(), secret);
}

#[test]
fn node_certificate_verifies_against_its_ca_for_its_hosts() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_dir(dir.path()).unwrap();
    issue_node_cert(
        dir.path(),
        "node-1",
        &hosts(&["127.0.0.1", "chat1.internal"]),
    )
    .unwrap();
    assert_eq!(mode(&dir.path().join("node-1.key")), 0o600);
    let tls = load(dir.path(), "node-1").unwrap();
    let (server, client) = verifiers(&tls.ca);
    let now = UnixTime::now();
    for name in ["127.0.0.1", "chat1.internal", "node-1"] {
        let name = ServerName::try_from(name).unwrap();
        server
            .verify_server_cert(&tls.chain[0], &[], &name, &[], now)
            .unwrap();
    }
    let other = ServerName::try_from("node-2").unwrap();
    assert!(server
        .verify_server_cert(&tls.chain[0], &[], &other, &[], now)
        .is_err());
    client.verify_client_cert(&tls.chain[0], &[], now).unwrap();
}

#[test]
fn certificate_from_another_ca_is_rejected() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    init_cluster_dir(a.path()).unwrap();
    init_cluster_dir(b.path()).unwrap();
    issue_node_cert(b.path(), "node-1", &hosts(&["127.0.0.1"])).unwrap();
    let ca_a = load(a.path(), "node-1").map(|t| t.ca);
    assert!(matches!(ca_a, Err(CertError::Read { .. })));
    let tls_b = load(b.path(), "node-1").unwrap();
    let ca_a = read_ca(a.path()).unwrap();
    let (server, client) = verifiers(&ca_a);
    let now = UnixTime::now();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    assert!(server
        .verify_server_cert(&tls_b.chain[0], &[], &name, &[], now)
        .is_err());
    assert!(client
        .verify_client_cert(&tls_b.chain[0], &[], now)
        .is_err());
}

#[test]
fn bad_names_hosts_and_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    init_cluster_dir(dir.path()).unwrap();
    for name in ["", "ca", "../x", "a/b", "-x", "a_b"] {
        let err = issue_node_cert(dir.path(), name, &[]).unwrap_err();
        assert!(
            matches!(err, CertError::InvalidName { .. }),
            "{name}: {err}"
        );
    }
    let err = issue_node_cert(dir.path(), "n1", &hosts(&["not a host"])).unwrap_err();
    assert!(matches!(err, CertError::InvalidHost { .. }), "{err}");

    let err = load(dir.path(), "missing").unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");

    fs::write(dir.path().join(SECRET_FILE), "zz").unwrap();
    let err = load_secret(dir.path()).unwrap_err();
    assert!(matches!(err, CertError::BadSecret { .. }), "{err}");

    fs::write(dir.path().join(CA_KEY_FILE), "garbage").unwrap();
    let err = issue_node_cert(dir.path(), "n1", &[]).unwrap_err();
    assert!(matches!(err, CertError::CaKey { .. }), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = issue_node_cert(empty.path(), "n1", &[]).unwrap_err();
    assert!(err.to_string().contains("ca.key"), "{err}");
}

#[test]
fn ensure_node_creates_once_then_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let (tls1, secret1) = ensure_node(dir.path(), "solo", &hosts(&["localhost"])).unwrap();
    let (tls2, secret2) = ensure_node(dir.path(), "solo", &hosts(&["localhost"])).unwrap();
    assert_eq!(tls1.ca, tls2.ca);
    assert_eq!(tls1.chain, tls2.chain);
    assert_eq!(secret1, secret2);
}

#[test]
fn secret_hex_round_trips() {
    let secret = ClusterSecret::from_bytes([0xab; 32]);
    assert_eq!(ClusterSecret::from_hex(&secret.to_hex()), Some(secret));
    assert_eq!(ClusterSecret::from_hex(&"é".repeat(32)), None);
}
