//! Fuzz targets for every decoder a peer can reach, run by `cargo test` within seconds:
//!
//! | target | decoder |
//! |---|---|
//! | `peer-frame` | `transport::frame`: the length header ([`payload_len`]) and the [`Request`] / `Reply` payloads |
//! | `replication` | `replication::rpc::decode` of every request and reply body, then the checks the service runs on them (`key_bounds`, `is_valid`) |
//! | `gossip-sealed` | `membership::auth::open` (tag, clock, fragment fields) and the replay guard |
//! | `gossip-chitchat` | chitchat's own datagram decoder (the codec socket a verified datagram goes to) |
//! | `directory` | `directory::wire::decode` of every request and reply body, and the bound the directory checks first |
//!
//! Each target first replays its committed seed corpus (`tests/fuzz-corpus/<target>/`, one
//! input per file; regenerate with `cargo test -p cluster --lib fuzz_tests::write_seed_corpus
//! -- --ignored`), then mutates corpus entries at random (bit flips, byte changes,
//! insertions, deletions, truncations, splices, "interesting" bytes such as varint markers)
//! for a bounded number of cases. Nothing may panic; every refusal is a typed error; what
//! decodes re-encodes to an equal value. `FUZZ_CASES=<n>` runs longer.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use crate::certs::ClusterSecret;
use crate::membership::auth::{self, ReplayGuard, Stamp};
use crate::replication::record::{ReplicaOp, Versioned};
use crate::replication::rpc::{
    self, ApplyBatch, ApplyReply, CasReply, CasRequest, ConditionalApply, ConditionalOutcome,
    PullReply, PullRequest, ReadRequest, ScanReply, ScanRequest,
};
use crate::transport::frame::{self, payload_len, Reply};
use crate::transport::{RemoteError, Request, Response, HARD_MAX_FRAME};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fuzz-corpus")
        .join(target)
}

/// The committed inputs of `target`, in file-name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("the {target} corpus is missing: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "the {target} corpus is empty");
    inputs
}

fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One mutation of an input.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    /// Replace a stretch with a slice of another corpus entry.
    Splice(usize, usize, usize),
    /// Put a boundary value (varint markers, 0, 0xff) somewhere.
    Interesting(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(a, b, c)| Mutation::Splice(a, b, c)),
        (any::<usize>(), 0u8..6).prop_map(|(i, k)| Mutation::Interesting(i, k)),
    ]
}

/// A corpus entry with some mutations applied, or fresh random bytes.
fn input(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = corpus.len();
    prop_oneof![
        9 => (0..n, prop::collection::vec(mutation(), 1..8)).prop_map(move |(i, ms)| {
            let mut data = corpus[i].clone();
            for m in ms {
                apply(&mut data, m, &corpus);
            }
            data
        }),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

fn apply(data: &mut Vec<u8>, m: Mutation, corpus: &[Vec<u8>]) {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match m {
        Mutation::FlipBit(i, b) if !data.is_empty() => {
            let i = at(i, data.len());
            data[i] ^= 1 << b;
        }
        Mutation::Set(i, v) if !data.is_empty() => {
            let i = at(i, data.len());
            data[i] = v;
        }
        Mutation::Insert(i, v) => {
            let i = at(i, data.len() + 1);
            data.insert(i, v);
        }
        Mutation::Remove(i) if !data.is_empty() => {
            let i = at(i, data.len());
            data.remove(i);
        }
        Mutation::Truncate(i) => {
            let i = at(i, data.len() + 1);
            data.truncate(i);
        }
        Mutation::Splice(src, from, to) => {
            let other = &corpus[src % corpus.len()];
            if !other.is_empty() {
                let start = at(from, other.len());
                let piece = &other[start..other.len().min(start + 16)];
                let to = at(to, data.len() + 1);
                let end = data.len().min(to + piece.len());
                data.splice(to..end, piece.iter().copied());
            }
        }
        Mutation::Interesting(i, k) if !data.is_empty() => {
            let i = at(i, data.len());
            data[i] = [0x00, 0xff, 0xfb, 0xfc, 0xfd, 0xfe][usize::from(k)];
        }
        _ => {}
    }
}

/// Replays the corpus, then runs `cases` mutated inputs through `check`.
fn fuzz(target: &str, default_cases: u32, check: impl Fn(&[u8])) {
    let seeds = corpus(target);
    for seed in &seeds {
        check(seed);
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&input(seeds), |data| {
            check(&data);
            Ok(())
        })
        .unwrap();
}

/// Decodes `bytes` as `T` with `decode`; what decodes must re-encode to the same bytes'
/// value. Errors are bincode's typed `DecodeError`.
fn round_trip<T, E>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, bincode::error::DecodeError>,
    encode: impl Fn(&T) -> Result<Vec<u8>, E>,
) -> Option<T>
where
    T: PartialEq + std::fmt::Debug,
    E: std::fmt::Debug,
{
    let value = decode(bytes).ok()?;
    let again = encode(&value).unwrap();
    assert_eq!(decode(&again).unwrap(), value);
    Some(value)
}

#[test]
fn fuzz_peer_frames() {
    fuzz("peer-frame", 3000, |data| {
        if let Some(header) = data.get(..4) {
            let header: [u8; 4] = header.try_into().unwrap();
            match payload_len(header, HARD_MAX_FRAME) {
                Ok(len) => assert!(len <= HARD_MAX_FRAME),
                Err(frame::FrameError::TooLarge { len }) => assert!(len > HARD_MAX_FRAME),
                Err(e) => panic!("untyped refusal {e:?}"),
            }
        }
        let payload = data.get(4..).unwrap_or_default();
        let strip = |v: Vec<u8>| v[4..].to_vec();
        round_trip(payload, frame::decode::<Request>, |r| {
            frame::encode(r).map(strip)
        });
        round_trip(
            payload,
            |b| frame::decode::<Reply>(b).map(ReplyEq),
            |r| frame::encode(&r.0).map(strip),
        );
    });
}

/// `Reply` compared through its encoding (it has no `PartialEq`).
#[derive(Debug)]
struct ReplyEq(Reply);

impl PartialEq for ReplyEq {
    fn eq(&self, other: &Self) -> bool {
        frame::encode(&self.0).ok() == frame::encode(&other.0).ok()
    }
}

#[test]
fn fuzz_replication_bodies() {
    fn all(data: &[u8]) {
        macro_rules! each {
            ($($t:ty),*) => {$(
                round_trip(data, rpc::decode::<$t>, rpc::encode::<$t>);
            )*};
        }
        each!(
            ApplyBatch,
            ApplyReply,
            ConditionalApply,
            ConditionalOutcome,
            ReadRequest,
            Option<Versioned>,
            ScanReply,
            CasRequest,
            CasReply,
            PullReply,
            Vec<ApplyBatch>,
            rpc::ApplyManyReply
        );
        // What the service does with a request before any work: bounds and validity.
        if let Some(scan) = round_trip(data, rpc::decode::<ScanRequest>, rpc::encode) {
            let _ = scan.key_bounds();
        }
        if let Some(pull) = round_trip(data, rpc::decode::<PullRequest>, rpc::encode) {
            let _ = pull.is_valid();
        }
    }
    fuzz("replication", 3000, all);
}

#[test]
fn fuzz_directory_bodies() {
    use crate::directory::wire::{self, DirReply, DirRequest, MAX_USERS_PER_REQUEST};
    let decode = |b: &[u8]| {
        bincode::decode_from_slice(b, wire::config()).map(|(v, _): (DirRequest, usize)| v)
    };
    let decode_reply =
        |b: &[u8]| bincode::decode_from_slice(b, wire::config()).map(|(v, _): (DirReply, usize)| v);
    fuzz("directory", 3000, |data| {
        if let Some(request) = round_trip(data, decode, wire::encode) {
            // What the directory checks before any work.
            if request.check(1024).is_ok() {
                assert!(request.users() <= MAX_USERS_PER_REQUEST);
            }
        }
        round_trip(data, decode_reply, wire::encode);
    });
}

fn gossip_key() -> ring::hmac::Key {
    auth::test_key(&ClusterSecret::from_bytes([7; 32]))
}

/// The clock the gossip corpus was sealed at.
const SEALED_AT: u64 = 1_800_000_000_000;

#[test]
fn fuzz_sealed_gossip() {
    let key = gossip_key();
    fuzz("gossip-sealed", 3000, |data| {
        check_sealed(&key, data);
        // The same bytes with a valid tag: the fields behind the tag get exercised too.
        if data.len() >= 32 {
            let mut resealed = data.to_vec();
            let tag = ring::hmac::sign(&key, &resealed[32..]);
            resealed[..32].copy_from_slice(tag.as_ref());
            check_sealed(&key, &resealed);
        }
        let _ = auth::nak_tag(data);
    });
}

fn check_sealed(key: &ring::hmac::Key, data: &[u8]) {
    // A refusal is a typed `Refused`; what opens must be well formed and admitted once.
    if let Ok(opened) = auth::open(key, data, SEALED_AT) {
        assert!(opened.count >= 1 && opened.count <= 2 && opened.index < opened.count);
        let mut guard = ReplayGuard::new(64);
        let tag = &data[..32];
        assert!(guard.admit(tag, opened.stamp.sent_ms, SEALED_AT));
        assert!(!guard.admit(tag, opened.stamp.sent_ms, SEALED_AT), "replay");
    }
}

#[test]
fn fuzz_chitchat_datagrams() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use chitchat::transport::{Socket, UdpSocket as CodecSocket};
        let mut codec = CodecSocket::open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let codec_addr = codec.local_addr().unwrap();
        let raw = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        // A sentinel after each input: the decoder must still be there and in step.
        let sentinel = std::fs::read(corpus_dir("gossip-chitchat").join("bad-cluster-v0")).unwrap();
        let seeds = corpus("gossip-chitchat");
        let mut inputs = seeds.clone();
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = input(seeds);
        for _ in 0..cases(400) {
            inputs.push(strategy.new_tree(&mut runner).unwrap().current());
        }
        for data in inputs {
            raw.send_to(&data, codec_addr).await.unwrap();
            raw.send_to(&sentinel, codec_addr).await.unwrap();
            // The input decodes or is dropped (logged by chitchat); then the sentinel.
            loop {
                let got = tokio::time::timeout(std::time::Duration::from_secs(10), codec.recv())
                    .await
                    .expect("the decoder stalled")
                    .unwrap();
                if got.num_bytes_received == sentinel.len()
                    && got.envelope.message == chitchat::ChitchatMessage::BadCluster
                {
                    break;
                }
            }
        }
    });
}

/// Writes the seed corpus from real encodings. Not a test: run it with `--ignored` after a
/// wire format changed, and commit the files.
#[test]
#[ignore = "rewrites the committed seed corpus; run after a wire format change"]
fn write_seed_corpus() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    // peer-frame: whole frames, header included.
    let req = Request {
        kind: 0x0101,
        body: rpc::encode(&ReadRequest {
            partition: 3,
            table: 1,
            key: b"user:42".to_vec(),
        })
        .unwrap(),
    };
    write("peer-frame", "request-read", &frame::encode(&req).unwrap());
    write(
        "peer-frame",
        "request-empty",
        &frame::encode(&Request {
            kind: 0,
            body: vec![],
        })
        .unwrap(),
    );
    write(
        "peer-frame",
        "reply-ok",
        &frame::encode(&Reply::Ok(Response {
            body: vec![1, 2, 3],
        }))
        .unwrap(),
    );
    write(
        "peer-frame",
        "reply-err",
        &frame::encode(&Reply::Err(RemoteError::new(
            RemoteError::BAD_FRAME,
            "bad frame",
        )))
        .unwrap(),
    );
    // replication: bodies.
    let op = ReplicaOp::put(1, b"k".to_vec(), b"v".to_vec(), 9);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "apply-batch",
            rpc::encode(&ApplyBatch::new(
                crate::placement::Partition(3),
                vec![op.clone(), ReplicaOp::delete(1, b"j".to_vec(), 10)],
            ))
            .unwrap(),
        ),
        (
            "conditional-apply",
            rpc::encode(&ConditionalApply {
                partition: 3,
                op: op.clone(),
                if_version_at_most: 8,
            })
            .unwrap(),
        ),
        (
            "scan-request",
            rpc::encode(&ScanRequest {
                partition: 1,
                table: 2,
                start: b"a".to_vec(),
                end: b"z".to_vec(),
                after: Some(b"m".to_vec()),
                descending: true,
                limit: 10,
                max_bytes: 4096,
            })
            .unwrap(),
        ),
        (
            "cas-request",
            rpc::encode(&CasRequest {
                partition: 1,
                table: 2,
                key: b"k".to_vec(),
                expected: None,
                new: Some(b"v".to_vec()),
                min_version: 5,
            })
            .unwrap(),
        ),
        (
            "cas-reply",
            rpc::encode(&CasReply::Mismatch {
                current: Some(Versioned::tombstone(4)),
            })
            .unwrap(),
        ),
        (
            "pull-request",
            rpc::encode(&PullRequest {
                table: 1,
                partition_count: 1024,
                partitions: vec![1, 5, 9],
                after: None,
                max_keys: 100,
                max_bytes: 65536,
                since: Some(77),
            })
            .unwrap(),
        ),
        ("pull-reply", rpc::encode(&PullReply::default()).unwrap()),
        ("scan-reply", rpc::encode(&ScanReply::default()).unwrap()),
    ];
    for (name, body) in bodies {
        write("replication", name, &body);
    }
    // directory: request and reply bodies.
    {
        use crate::directory::wire::{encode, DirReply, DirRequest};
        let bodies = [
            (
                "update",
                encode(&DirRequest::Update {
                    from: 1,
                    gen: 1_765_000_000_000,
                    regs: vec![(42, true), (7, false)],
                    subs: vec![(9, true)],
                }),
            ),
            (
                "statement",
                encode(&DirRequest::Statement {
                    from: 2,
                    gen: 1_765_000_000_001,
                    partitions: vec![3, 900],
                    regs: vec![42],
                    subs: vec![9, 10],
                }),
            ),
            (
                "push",
                encode(&DirRequest::Push {
                    from: 0,
                    changes: vec![(42, vec![1, 2], 7), (9, vec![], 8)],
                }),
            ),
            ("resend", encode(&DirRequest::Resend { from: 1023 })),
            (
                "reply",
                encode(&DirReply {
                    seq: 1_765_000_000_000_000,
                    current: vec![(9, vec![2])],
                }),
            ),
        ];
        for (name, body) in bodies {
            write("directory", name, &body.unwrap());
        }
    }
    // gossip-sealed: one and two fragments, at SEALED_AT.
    let key = gossip_key();
    let stamp = Stamp {
        sent_ms: SEALED_AT,
        hlc: 42,
    };
    write(
        "gossip-sealed",
        "single",
        &auth::seal(&key, stamp, 1, 0, 1, b"\x01\x00payload"),
    );
    write(
        "gossip-sealed",
        "fragment-1-of-2",
        &auth::seal(&key, stamp, 2, 1, 2, &[9; 40]),
    );
    write("gossip-sealed", "nak", &auth::nak(&[3; 32]));
    // gossip-chitchat: what chitchat's codec sends (a bad-cluster message, and a real syn).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use chitchat::transport::{Socket, UdpSocket as CodecSocket};
        use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
        let tap = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let mut codec = CodecSocket::open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let mut buf = vec![0; 65_536];
        for (name, version) in [
            ("bad-cluster-v0", ProtocolVersion::V0),
            ("bad-cluster-v1", ProtocolVersion::V1),
        ] {
            codec
                .send(
                    tap.local_addr().unwrap(),
                    ChitchatEnvelope {
                        version,
                        message: ChitchatMessage::BadCluster,
                    },
                )
                .await
                .unwrap();
            let (n, _) = tap.recv_from(&mut buf).await.unwrap();
            write("gossip-chitchat", name, &buf[..n]);
        }
        // A real syn: a plain (unsealed) membership gossiping to the tap as its seed.
        let port = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let mut mc = crate::membership::MembershipConfig::new(
            0,
            "fuzz".into(),
            listen,
            crate::membership::NodeAddrs {
                http: addr,
                quic: addr,
                peer: addr,
            },
        );
        mc.seeds = vec![tap.local_addr().unwrap().to_string()];
        let m = crate::membership::Membership::spawn(mc).await.unwrap();
        let (n, _) = tap.recv_from(&mut buf).await.unwrap();
        write("gossip-chitchat", "syn", &buf[..n]);
        let _ = m.shutdown().await;
    });
}
