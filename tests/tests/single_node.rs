//! Single-node behaviour (issue 2) that is not about a client transport: durability across
//! SIGKILL, ids across restarts, history paging over HTTP and the accounts API. What a client
//! sees over a connection runs over every transport in `scenarios/`.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_tests::TestNode;
use chat_tests::{collect_messages, to};
use client_proto::client::ClientError;
use client_proto::{ClientFrame, ErrorCode, MessageId};

#[tokio::test]
async fn acked_messages_survive_sigkill() {
    let mut node = TestNode::start(&["--rate-limit-burst", "1000"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;
    // Pipelined sends: many in flight at once, acked by shared flushes.
    for i in 0..300 {
        a.send(&ClientFrame::Send {
            id: format!("k{i}"),
            to: to(bob.id),
            body: format!("durable {i}"),
        })
        .await
        .unwrap();
    }
    let mut acked = HashSet::new();
    for i in 0..300 {
        acked.insert(a.wait_ack(&format!("k{i}")).await.unwrap().message_id);
    }
    node.kill(); // SIGKILL right after the last ack: no shutdown flush
    node.restart();
    let synced: HashSet<MessageId> = node.sync_on_new_device(&bob).await.into_iter().collect();
    let missing: Vec<_> = acked.difference(&synced).collect();
    assert!(
        missing.is_empty(),
        "acked but lost after SIGKILL: {missing:?}"
    );
    assert_eq!(synced.len(), 300);
}

/// With checkpoints an hour apart, the acks of a burst are durable only in the commit log
/// (sled's own files are not flushed, and a few hundred messages do not fill its write
/// buffer): a restart after SIGKILL must replay the log to serve them.
#[tokio::test]
async fn acked_messages_only_in_the_commit_log_survive_sigkill() {
    only_in_the_commit_log("sled").await;
}

/// The same with the replicated tables in fjall (`--index fjall`), whose own journal is not
/// synced between checkpoints either.
#[tokio::test]
async fn acked_messages_only_in_the_commit_log_survive_sigkill_on_the_fjall_index() {
    only_in_the_commit_log("fjall").await;
}

async fn only_in_the_commit_log(index: &str) {
    let mut node = TestNode::start(&[
        "--rate-limit-burst",
        "1000",
        "--checkpoint-interval-ms",
        "3600000",
        "--checkpoint-mib",
        "1024",
        "--index",
        index,
    ]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;
    for i in 0..400 {
        a.send(&ClientFrame::Send {
            id: format!("w{i}"),
            to: to(bob.id),
            body: format!("logged {i}"),
        })
        .await
        .unwrap();
    }
    let mut acked = HashSet::new();
    for i in 0..400 {
        acked.insert(a.wait_ack(&format!("w{i}")).await.unwrap().message_id);
    }
    // The index's gauges: fjall's write buffer holds the writes (sled has no such gauge).
    let buffered = node.metric("store_index_write_buffer_bytes").await;
    assert_eq!(
        buffered > 0.0,
        index == "fjall",
        "write buffer gauge {buffered}"
    );
    node.kill(); // SIGKILL right after the last ack: no checkpoint, no shutdown flush
    node.restart();
    let log = node.log_text();
    let replayed = log
        .lines()
        .filter(|l| l.contains("replayed the commit log"))
        .filter_map(|l| {
            l.split("records=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .next_back()
        .unwrap_or_else(|| panic!("no replay line in the node's log:\n{log}"));
    assert!(replayed >= 400, "replayed only {replayed} records");
    let synced: HashSet<MessageId> = node.sync_on_new_device(&bob).await.into_iter().collect();
    let missing: Vec<_> = acked.difference(&synced).collect();
    assert!(
        missing.is_empty(),
        "acked but lost after SIGKILL: {} of {}",
        missing.len(),
        acked.len()
    );
    assert_eq!(synced.len(), 400);
}

/// Reads what a node's log file gained since the last call.
struct LogTail {
    path: std::path::PathBuf,
    offset: u64,
}

impl LogTail {
    fn new_text(&mut self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut new = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let _ = f.read_to_end(&mut new);
            }
        }
        self.offset += new.len() as u64;
        String::from_utf8_lossy(&new).into_owned()
    }
}

/// A SIGKILL that lands inside a checkpoint loses nothing acknowledged. The node logs when a
/// checkpoint begins (after its rotation, before sled's flush and the deletion of the covered
/// segments) and when it is done. Under a write load, the test kills the node a varied few
/// milliseconds after a checkpoint began, and counts the kill as inside the checkpoint when
/// the log shows no "done" after that "begins". It restarts and goes on until three kills
/// landed inside one or 12 kills were made (and fails if none landed inside), then syncs
/// everything acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_inside_a_checkpoint_loses_no_acked_message() {
    kills_inside_checkpoints("sled").await;
}

/// The same with the replicated tables in fjall (`--index fjall`): a checkpoint syncs fjall's
/// journal, then flushes sled's node-local tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_inside_a_checkpoint_loses_no_acked_message_on_the_fjall_index() {
    kills_inside_checkpoints("fjall").await;
}

async fn kills_inside_checkpoints(index: &str) {
    // A checkpoint every second while writes arrive, or per 8 MiB of log (512 sends of 16
    // KiB): each flushes megabytes of the index's pages, which takes a few milliseconds or
    // more.
    let mut node = TestNode::start(&[
        "--index",
        index,
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
        "--read-rate-limit-per-sec",
        "1000",
        "--read-rate-limit-burst",
        "1000",
        "--checkpoint-interval-ms",
        "1000",
        "--checkpoint-mib",
        "8",
    ]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut log = LogTail {
        path: node.log_path(),
        offset: 0,
    };
    let body = "c".repeat(16 * 1024);
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let (mut inside, mut rounds) = (0, 0);
    while inside < 3 && rounds < 12 {
        rounds += 1;
        let mut a = node.connect(&alice.login).await;
        let (acked2, body2, bob_id) = (acked.clone(), body.clone(), bob.id);
        let load = tokio::spawn(async move {
            // Eight in flight at a time until the connection dies with the node.
            for batch in 0.. {
                let ids: Vec<String> = (0..8).map(|i| format!("r{rounds}-{batch}-{i}")).collect();
                for id in &ids {
                    let frame = ClientFrame::Send {
                        id: id.clone(),
                        to: to(bob_id),
                        body: body2.clone(),
                    };
                    if a.send(&frame).await.is_err() {
                        return;
                    }
                }
                for id in &ids {
                    match a.wait_ack(id).await {
                        Ok(ack) => acked2.lock().unwrap().insert(ack.message_id),
                        Err(_) => return,
                    };
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        log.new_text();
        // The log from the latest checkpoint's beginning on.
        let mut since = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let text = log.new_text();
            if let Some(at) = text.rfind("checkpoint begins") {
                since = text[at..].to_string();
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(rounds % 4)).await; // varied: 1, 2, 3, 0 ... ms
        node.kill();
        // Let the log's reader drain the dead process's pipe.
        tokio::time::sleep(Duration::from_millis(200)).await;
        since.push_str(&log.new_text());
        if !since.is_empty() && !since.contains("checkpoint done") {
            inside += 1;
        }
        load.await.unwrap();
        node.restart();
    }
    assert!(
        inside >= 1,
        "no kill landed inside a checkpoint in {rounds} rounds"
    );
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{rounds} kills, {inside} inside a checkpoint, {} sends acked",
        acked.len()
    );
    assert!(acked.len() > 100, "only {} sends acked", acked.len());
    let synced: HashSet<MessageId> = node.sync_on_new_device(&bob).await.into_iter().collect();
    let missing: Vec<_> = acked.difference(&synced).collect();
    assert!(
        missing.is_empty(),
        "acked but lost after {inside} kills inside a checkpoint ({rounds} kills): {} of {}",
        missing.len(),
        acked.len()
    );
}

#[tokio::test]
async fn message_ids_keep_increasing_across_a_restart() {
    let mut node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let mut a = node.connect(&alice.login).await;
    let first = a
        .send_message("x1", to(alice.id), "note to self")
        .await
        .unwrap();
    node.restart();
    let login = node
        .api()
        .login(&alice.name, &alice.password, None)
        .await
        .unwrap();
    let mut a = node.connect(&login).await;
    let second = a
        .send_message("x2", to(alice.id), "note again")
        .await
        .unwrap();
    assert!(second.message_id > first.message_id);
}

/// Paging over HTTP. (Paging with `history` frames is `history_frames_cover_every_message_once`
/// in `scenarios/history.rs`, over every transport.)
#[tokio::test]
async fn history_pages_cover_every_message_once() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    let mut a = node.connect(&alice.login).await;
    let mut b = node.connect(&bob.login).await;
    let mut sent = Vec::new();
    for i in 0..60 {
        let (ws, peer) = if i % 3 == 0 {
            (&mut b, alice.id)
        } else {
            (&mut a, bob.id)
        };
        sent.push(
            ws.send_message(&format!("h{i}"), to(peer), &format!("history {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    let conv = client_proto::ConversationId::direct(alice.id, bob.id);

    // Over HTTP, pages of 7, newest first.
    let api = node.api();
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = api
            .history(&alice.login.token, conv, before, Some(7))
            .await
            .unwrap();
        assert!(page.messages.len() <= 7);
        seen.extend(page.messages.iter().map(|m| m.message_id));
        match page.next_before {
            Some(nb) => before = Some(nb),
            None => break,
        }
    }
    let mut want = sent.clone();
    want.reverse();
    assert_eq!(seen, want, "every message exactly once, newest first");

    // Not a participant: 403.
    let err = api
        .history(&carol.login.token, conv, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    // Bad paging input.
    let err = api
        .history(&alice.login.token, conv, None, Some(201))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    let raw = api
        .request_raw(
            reqwest::Method::GET,
            "/v1/conversations/d:9:1/messages",
            Some(&alice.login.token),
            None::<&()>,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(raw, ClientError::Refused(ref b) if b.code == ErrorCode::BadRequest),
        "{raw:?}"
    );
}

#[tokio::test]
async fn accounts_http_api() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await;
    let e = api.signup("alice", "another-password").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict));
    for (name, pw) in [
        ("al", "password1"),
        ("Alice2", "password1"),
        ("carol", "short"),
        ("with space", "password1"),
    ] {
        let e = api.signup(name, pw).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{name}");
    }
    let e = api
        .login("alice", "wrong-password", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    let me = api.me(&alice.login.token).await.unwrap();
    assert_eq!(me.user_id, alice.id);
    assert_eq!(
        api.user(&alice.login.token, "alice").await.unwrap().user_id,
        alice.id
    );
    let e = api.user(&alice.login.token, "nobody").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let e = api.me("garbage").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    let raw = api
        .request_raw(
            reqwest::Method::POST,
            "/v1/signup",
            None,
            Some(&serde_json::json!({"username": 5})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(raw, ClientError::Refused(ref b) if b.code == ErrorCode::BadRequest),
        "{raw:?}"
    );
    assert_eq!(
        alice.login.node.ws_url,
        node.ws_url(),
        "login names a node to use"
    );
}

/// The store was world-readable under the default umask (`db/db` 0644 holds password
/// hashes and every message body). Now, started with umask 022 on a data dir that already
/// exists as 0755, the node makes the data dir 0700 and every file of the store 0600;
/// nothing in the data dir is readable by others except the public certificates, which
/// sit behind the 0700 directory.
#[tokio::test]
async fn the_data_dir_is_private_whatever_the_umask() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let gossip = format!("127.0.0.1:{}", chat_tests::free_udp_port());
    let peer = format!("127.0.0.1:{}", chat_tests::free_udp_port());
    let script = format!(
        "umask 022 && exec \"$0\" serve --data-dir \"$1\" --http-addr 127.0.0.1:0 \
         --quic-addr 127.0.0.1:0 --gossip-addr {gossip} --peer-addr {peer}"
    );
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(chat_tests::chatnode_bin())
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| client_proto::ReadyLine::parse(&l))
    })
    .join()
    .unwrap();
    let ready = ready.expect("the node did not become ready");
    // Write something, so the store has data files.
    let api = client_proto::client::HttpClient::new(format!("http://{}", ready.http));
    api.signup("modes", "a long enough password").await.unwrap();

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir");
    let mut checked = 0;
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let m = mode(&path);
            if path.is_dir() {
                assert_eq!(m & 0o077, 0, "{} is {m:o}", path.display());
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "pem") {
                continue; // certificates are public
            } else if path.starts_with(data.join("db")) {
                assert_eq!(m, 0o600, "{} is {m:o}", path.display());
                checked += 1;
            } else {
                assert_eq!(m & 0o077, 0, "{} is {m:o}", path.display());
            }
        }
    }
    assert!(checked >= 2, "the store's files were checked ({checked})");
    assert_eq!(mode(&data.join("db").join("db")), 0o600);
    let _ = child.kill();
    let _ = child.wait();
}

/// `--log trace` wrote tokens and message bodies (WebSocket frame payloads). Now no level
/// writes a token, a password or a body.
#[tokio::test]
async fn trace_logs_hold_no_token_password_or_body() {
    let node = TestNode::start(&["--log", "trace"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;
    let mut b = node.connect(&bob.login).await;
    let body = "zebra-quartz-unique-body-4711";
    a.send_message("t1", to(bob.id), body).await.unwrap();
    let got = chat_tests::next_message(&mut b).await;
    assert_eq!(got.body, body);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = node.log_text();
    assert!(log.lines().count() > 50, "trace logging is on:\n{log}");
    for secret in [
        alice.login.token.as_str(),
        bob.login.token.as_str(),
        alice.password.as_str(),
        body,
    ] {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
}

/// Readers that stop reading flooded the log (21,608 WARN lines in 20 s from one group: a
/// line per delivery to a kicked device, per kick). Now the warning is logged once per kick
/// and rate limited (10 per 10 s, then `suppressed = N`), and a kicked session ends even
/// while its socket is blocked. Here 15 devices stop reading and are all kicked.
#[tokio::test]
async fn slow_readers_are_kicked_without_flooding_the_log() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    const STALLED: usize = 15;
    let node = TestNode::start(&[
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    // bob's devices authenticate, read the first answer, then never read again.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let login = node
            .api()
            .login(&bob.name, &bob.password, None)
            .await
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(node.ws_url())
            .await
            .unwrap();
        let auth = serde_json::to_string(&ClientFrame::Auth { token: login.token }).unwrap();
        ws.send(WsMessage::Text(auth.into())).await.unwrap();
        let _ready = ws.next().await.unwrap().unwrap();
        stalled.push(ws);
    }

    let mut a = node.connect(&alice.login).await;
    let body = "x".repeat(30_000);
    let kicked = || node.metric("gateway_slow_consumer_kicks_total");
    let mut sent = 0;
    // Until every stalled device was kicked, or 3,000 messages.
    while sent < 3_000 {
        a.send_message(&format!("s{sent}"), to(bob.id), &body)
            .await
            .unwrap();
        sent += 1;
        if sent % 50 == 0 && kicked().await >= STALLED as f64 {
            break;
        }
    }
    assert!(
        kicked().await >= STALLED as f64,
        "not every slow device was kicked"
    );
    let warnings = node
        .log_text()
        .lines()
        .filter(|l| l.contains("outbound queue full"))
        .count();
    assert!(
        (1..=10).contains(&warnings),
        "{warnings} slow-device warnings after {sent} messages"
    );
    // The node serves on.
    let mut c = node.connect(&carol.login).await;
    a.send_message("to-carol", to(carol.id), "still here")
        .await
        .unwrap();
    assert_eq!(chat_tests::next_message(&mut c).await.body, "still here");
    let health = reqwest::get(format!("{}/healthz", node.http))
        .await
        .unwrap();
    assert!(health.status().is_success());
    drop(stalled);
}

/// Back pressure: with one send slot (`--max-concurrent-sends 1`), the sends two users
/// pipeline wait for it in turn. Every one is acked (none refused with `unavailable`) and
/// delivered once, and the node counts the waits.
#[tokio::test]
async fn sends_past_the_node_s_send_slots_wait_their_turn_and_are_all_acked() {
    const PER_SENDER: usize = 40;
    let node = TestNode::start(&["--rate-limit-burst", "1000", "--max-concurrent-sends", "1"]);
    let bob = node.user("bob").await;
    let mut b = node.connect(&bob.login).await;
    let mut senders = Vec::new();
    for name in ["alice", "carol"] {
        let user = node.user(name).await;
        senders.push(node.connect(&user.login).await);
    }
    for (s, conn) in senders.iter_mut().enumerate() {
        for i in 0..PER_SENDER {
            conn.send(&ClientFrame::Send {
                id: format!("s{s}-{i}"),
                to: to(bob.id),
                body: format!("in turn {s} {i}"),
            })
            .await
            .unwrap();
        }
    }
    let mut acked = Vec::new();
    for (s, conn) in senders.iter_mut().enumerate() {
        for i in 0..PER_SENDER {
            let ack = conn.wait_ack(&format!("s{s}-{i}")).await;
            acked.push(
                ack.unwrap_or_else(|e| panic!("send s{s}-{i}: {e}"))
                    .message_id,
            );
        }
    }
    let got = collect_messages(&mut b, &acked, Duration::from_millis(300)).await;
    assert_eq!(
        got.len(),
        acked.len(),
        "bob got {} of {}",
        got.len(),
        acked.len()
    );
    assert!(got.values().all(|n| *n == 1), "duplicates: {got:?}");
    let waits = node.metric("chat_send_admission_wait_seconds_count").await;
    assert!(waits > 0.0, "no send waited for the one slot");
}
