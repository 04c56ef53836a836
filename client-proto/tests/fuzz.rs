//! Fuzz targets for the decoders a client reaches before any work (issue 13): JSON client
//! frames, binary client frames, and HTTP request bodies. Each replays its committed seed
//! corpus (`tests/fuzz-corpus/<target>/`) first, then a bounded number of random mutations
//! of it (`PROTO_FUZZ_CASES`, default 2000 per target: seconds in CI). Every input must come
//! back as a value or a typed error, never a panic; errors stay short; what decodes
//! re-encodes to itself; and an HTTP body that is not a JSON object is always refused.
//!
//! A new seed is a file in the target's folder (binary seeds: `cargo test -p client-proto
//! --test fuzz -- --ignored write_binary_corpus` rewrites the generated ones).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use client_proto::codec::{self, Codec, DecodeError};
use client_proto::http::{
    decode_body, AddMemberRequest, BodyError, CreateGroupRequest, LoginRequest, PatchMeRequest,
    SignupRequest,
};
use client_proto::ids::{ConversationId, GroupId, MessageId, Position, UserId};
use client_proto::limits::MAX_FRAME_BYTES;
use client_proto::{ClientFrame, Recipient};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

/// The seeds of `target`, in file-name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<_> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(seeds.len() >= 5, "the {target} corpus is missing");
    seeds
}

fn cases() -> u32 {
    std::env::var("PROTO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Pieces of input that decoders trip on, spliced in by the mutator.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"-1",
    b"+42",
    b"042",
    b"1e999",
    b"18446744073709551616",
    b"\\u0000",
    b"\\ud800",
    b"\xff",
    b"\"type\":\"send\"",
    b"\"to\":{\"user\":\"1\"}",
    b"\xfd\xff\xff\xff\x7f",
    b"\xfe",
    b"\0",
];

#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Splice(Index, Index),
    Repeat(Index, Index, u8),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Splice(i, t)),
        (any::<Index>(), any::<Index>(), 1u8..64).prop_map(|(a, b, n)| Mutation::Repeat(a, b, n)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match m {
            Mutation::Set(i, v) if !b.is_empty() => {
                let i = i.index(b.len());
                b[i] = *v;
            }
            Mutation::Set(..) => {}
            Mutation::Insert(i, v) => b.insert(at(i, b.len()), *v),
            Mutation::Remove(i) if !b.is_empty() => {
                b.remove(i.index(b.len()));
            }
            Mutation::Remove(_) => {}
            Mutation::Splice(i, t) => {
                let at = at(i, b.len());
                let tok = TOKENS[t.index(TOKENS.len())];
                b.splice(at..at, tok.iter().copied());
            }
            Mutation::Repeat(i, j, n) if !b.is_empty() => {
                let (a, c) = (i.index(b.len()), j.index(b.len()));
                let (lo, hi) = (a.min(c), a.max(c) + 1);
                let piece = b[lo..hi].to_vec();
                for _ in 0..*n {
                    if b.len() > 4 * MAX_FRAME_BYTES {
                        break;
                    }
                    b.splice(hi..hi, piece.iter().copied());
                }
            }
            Mutation::Repeat(..) => {}
            Mutation::Truncate(i) => {
                let n = at(i, b.len());
                b.truncate(n);
            }
        }
    }
    b
}

/// Replays `target`'s corpus through `check`, then `cases()` mutations of it.
fn fuzz(target: &str, check: impl Fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        check(s);
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (any::<Index>(), proptest::collection::vec(mutation(), 1..6));
    runner
        .run(&strategy, |(seed, muts)| {
            let input = apply(seeds[seed.index(seeds.len())].clone(), &muts);
            check(&input);
            Ok(())
        })
        .unwrap();
}

/// What every frame decoder must do with `bytes`.
fn check_frame(c: Codec, bytes: &[u8]) {
    match codec::decode::<ClientFrame>(c, bytes) {
        Ok(frame) => {
            assert!(bytes.len() <= MAX_FRAME_BYTES);
            let again = codec::encode(c, &frame);
            assert_eq!(codec::decode::<ClientFrame>(c, &again).unwrap(), frame);
        }
        Err(DecodeError::TooLarge(n)) => assert!(n > MAX_FRAME_BYTES && n == bytes.len()),
        Err(e) => {
            // Typed, and short enough for an error frame whatever the input.
            assert!(e.to_string().len() <= 700, "{}", e.to_string().len());
        }
    }
}

#[test]
fn json_client_frames() {
    fuzz("json_client_frame", |b| check_frame(Codec::Json, b));
}

#[test]
fn binary_client_frames() {
    fuzz("binary_client_frame", |b| check_frame(Codec::Binary, b));
}

/// What the server's body decoder must do with `bytes` for each request type.
fn check_body(bytes: &[u8]) {
    fn one<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
        let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match decode_body::<T>(bytes) {
            Ok(_) => assert!(object, "{}", String::from_utf8_lossy(bytes)),
            Err(BodyError::NotObject) => assert!(!object),
            Err(e) => assert!(e.to_string().len() <= 700),
        }
    }
    one::<SignupRequest>(bytes);
    one::<LoginRequest>(bytes);
    one::<PatchMeRequest>(bytes);
    one::<CreateGroupRequest>(bytes);
    one::<AddMemberRequest>(bytes);
}

#[test]
fn http_request_bodies() {
    fuzz("http_body", check_body);
}

#[test]
fn http_bodies_that_are_not_objects_are_refused() {
    for body in [
        &b"[\"alice\",\"password-alice\"]"[..],
        b"\"x\"",
        b"null",
        b"1",
        b"  []",
    ] {
        assert_eq!(
            decode_body::<SignupRequest>(body).unwrap_err(),
            BodyError::NotObject
        );
    }
    let e = decode_body::<AddMemberRequest>(br#"{"user_id":"+42"}"#).unwrap_err();
    assert!(
        matches!(&e, BodyError::Field { field, .. } if field == "user_id"),
        "{e}"
    );
    let e = decode_body::<CreateGroupRequest>(br#"{"name":"g","members":["1",2]}"#).unwrap_err();
    assert!(e.to_string().starts_with("field `members[1]`"), "{e}");
    assert!(matches!(
        decode_body::<AddMemberRequest>(br#"{"user_id":"1"} x"#),
        Err(BodyError::NotJson(_))
    ));
}

/// The frames the binary corpus is made from.
fn binary_seed_frames() -> Vec<(&'static str, ClientFrame)> {
    vec![
        (
            "auth",
            ClientFrame::Auth {
                token: "abc.def".into(),
            },
        ),
        (
            "send_user",
            ClientFrame::Send {
                id: "c1".into(),
                to: Recipient::User(UserId(42)),
                body: "hi \u{1}\n\"é".into(),
            },
        ),
        (
            "send_group",
            ClientFrame::Send {
                id: "c2".into(),
                to: Recipient::Group(GroupId(u64::MAX)),
                body: "x".repeat(300),
            },
        ),
        (
            "sync",
            ClientFrame::Sync {
                after: Some(Position(7_301_820_283_641_856)),
                limit: Some(500),
            },
        ),
        (
            "sync_none",
            ClientFrame::Sync {
                after: None,
                limit: None,
            },
        ),
        ("heartbeat", ClientFrame::Heartbeat),
        (
            "subscribe",
            ClientFrame::SubscribePresence {
                users: vec![UserId(1), UserId(u64::MAX)],
            },
        ),
        (
            "unsubscribe",
            ClientFrame::UnsubscribePresence { users: vec![] },
        ),
        (
            "history",
            ClientFrame::History {
                conversation: ConversationId::direct(UserId(1), UserId(2)),
                before: Some(MessageId(99)),
                limit: Some(50),
            },
        ),
        (
            "seen",
            ClientFrame::Seen {
                message_id: MessageId(123_456_789),
            },
        ),
    ]
}

#[test]
#[ignore = "rewrites the generated binary corpus"]
fn write_binary_corpus() {
    let dir = corpus_dir("binary_client_frame");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, frame) in binary_seed_frames() {
        std::fs::write(
            dir.join(format!("{name}.bin")),
            codec::encode(Codec::Binary, &frame),
        )
        .unwrap();
    }
    std::fs::write(dir.join("garbage.bin"), b"\xff\x00\x13").unwrap();
    std::fs::write(dir.join("huge_length.bin"), b"\x01\xfd\xff\xff\xff\x7f").unwrap();
}

#[test]
fn the_binary_corpus_decodes_to_its_frames() {
    let dir = corpus_dir("binary_client_frame");
    for (name, frame) in binary_seed_frames() {
        let bytes = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        assert_eq!(
            codec::decode::<ClientFrame>(Codec::Binary, &bytes).unwrap(),
            frame
        );
    }
}
