//! The test harness: starts real `chatnode` processes on loopback, waits for them to be ready,
//! kills (SIGKILL) and restarts them, and shows their log when a test fails. [`Transport`]
//! connects clients to them over WebSocket (JSON or binary frames) or QUIC.
//!
//! # Layout
//!
//! - this file: [`TestNode`] (one `chatnode serve` process on 127.0.0.1 with free ports),
//!   [`TestCluster`] (N of them with one cluster dir), users and connections;
//! - [`transport`]: [`Transport`], one scenario run over each client transport;
//! - [`chaos`]: the chaos suite: nodes on their own loopback addresses, a nemesis (kill,
//!   pause, iptables partitions, clock skew), a workload, and the history checker.
//!
//! The tests themselves are in `tests/tests/` (see the README's "Tests").

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use client_proto::client::{HttpClient, WsConnection};
use client_proto::codec::Codec;
use client_proto::http::LoginResponse;
use client_proto::ids::UserId;

pub use client_proto;

pub mod chaos;
pub mod transport;
pub use transport::Transport;

/// The `chatnode` binary, brought up to date once per test process (`cargo build` is quick
/// when nothing changed) so that tests never run a stale binary. `CHATNODE_BIN` overrides.
pub fn chatnode_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CHATNODE_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test> -> target/<profile>/chatnode
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let bin = profile_dir.join("chatnode");
        {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "chatnode", "--bin", "chatnode"]);
            if profile_dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build of chatnode failed");
        }
        bin
    })
    .clone()
}

/// One `chatnode serve` process with its own data dir.
pub struct TestNode {
    child: Option<Child>,
    dir: Arc<tempfile::TempDir>,
    args: Vec<String>,
    log: PathBuf,
    /// `http://127.0.0.1:PORT` of the running process.
    pub http: String,
    /// `quic://127.0.0.1:PORT` of the running process.
    pub quic: String,
    /// Listen addresses of the first start, reused by restarts so clients can reconnect.
    addrs: Option<(String, String)>,
    /// Gossip (UDP) and peer (QUIC) addresses, fixed for the node's life.
    pub gossip: String,
    pub peer: String,
}

/// A loopback UDP port that was free a moment ago (gossip must advertise a real port).
///
/// Picked below the kernel's ephemeral range (32768 and up): a port the kernel hands out
/// for `:0` binds (nodes bind several, and other test processes many) could otherwise be
/// taken between this check and the node's bind.
pub fn free_udp_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(4099)) % 12_000) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port in 20000..32000");
}

impl TestNode {
    /// Starts a node on free loopback ports with `extra` flags.
    pub fn start(extra: &[&str]) -> TestNode {
        Self::start_with_gossip(format!("127.0.0.1:{}", free_udp_port()), extra)
    }

    /// Starts a node whose gossip address is `gossip` (so others can name it as a seed).
    pub fn start_with_gossip(gossip: String, extra: &[&str]) -> TestNode {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let args = extra.iter().map(|s| s.to_string()).collect();
        let mut node = TestNode {
            child: None,
            log: dir.path().join("node.log"),
            dir,
            args,
            http: String::new(),
            quic: String::new(),
            addrs: None,
            gossip,
            peer: format!("127.0.0.1:{}", free_udp_port()),
        };
        node.spawn();
        node
    }

    /// The node's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let (http, quic) = self
            .addrs
            .clone()
            .unwrap_or(("127.0.0.1:0".into(), "127.0.0.1:0".into()));
        // The default log filter, unless the test chose one.
        let log: &[&str] = if self.args.iter().any(|a| a == "--log") {
            &[]
        } else {
            &["--log", "info,chatnode=debug"]
        };
        let mut cmd = Command::new(chatnode_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--http-addr", &http, "--quic-addr", &quic])
            .args(["--gossip-addr", &self.gossip, "--peer-addr", &self.peer])
            .args(log)
            // Tests sign up hundreds of users from 127.0.0.1; a test of the signup limit sets
            // the flag, which wins over the environment.
            .env("CHATNODE_SIGNUPS_PER_IP_PER_HOUR", "0")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start chatnode");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap(),
        ));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log.lock().unwrap(), "{line}");
                    if let Some(ready) = client_proto::ReadyLine::parse(&line) {
                        let _ = tx.send((ready.http.to_string(), ready.quic.to_string()));
                    }
                }
            });
        }
        let (http, quic) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("chatnode did not become ready:\n{}", self.log_text());
            }
        };
        self.http = format!("http://{http}");
        self.quic = format!("quic://{quic}");
        self.addrs = Some((http, quic));
        self.child = Some(child);
    }

    /// The running process's id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The file the node's output goes to (kept across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process with SIGKILL: no shutdown, no final flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL on Unix
            let _ = c.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_free_sigterm(c.id());
        c.wait().ok()?.code()
    }

    /// Waits, at most `limit`, for the process to exit by itself; its exit code, or `None`
    /// if it is still running (it is left running) or was not started.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and returns at once (the node drains, then stops); see
    /// [`TestNode::exit_within`].
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            unsafe_free_sigterm(c.id());
        }
    }

    /// Waits (polling, without blocking the runtime) up to `within` for the process to exit;
    /// its exit code, or `None` if it is still running (it is then left running).
    pub async fn exit_within(&mut self, within: Duration) -> Option<Option<i32>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status.code());
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `within` for `GET /readyz` to answer 200; false if it never did.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let url = format!("{}/readyz", self.http);
        let http = reqwest::Client::new();
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(r) = http.get(&url).send().await {
                if r.status() == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// The cluster CA certificate (PEM) that QUIC clients trust.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.data_dir().join("cluster").join("ca.pem")).unwrap()
    }

    /// Starts the process again on the same data dir and the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn api(&self) -> HttpClient {
        HttpClient::new(self.http.clone())
    }

    pub fn ws_url(&self) -> String {
        self.api().ws_url()
    }

    /// The sum of every series of metric `name` on the node's `/metrics` (0 if absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_in(&text, name)
    }

    /// Signs up `name` (password "password-<name>") and logs in one device.
    pub async fn user(&self, name: &str) -> TestUser {
        let api = self.api();
        let password = format!("password-{name}");
        let s = api.signup(name, &password).await.unwrap();
        let login = api.login(name, &password, None).await.unwrap();
        TestUser {
            id: s.user_id,
            name: name.into(),
            password,
            login,
        }
    }

    /// Signs up `n` users named `<prefix><i, 3 digits>`, a few at a time.
    pub async fn users(&self, prefix: &str, n: usize) -> Vec<TestUser> {
        let mut out = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
            let batch = chunk
                .iter()
                .map(|i| self.user_owned(format!("{prefix}{i:03}")));
            out.extend(futures_util::future::join_all(batch).await);
        }
        out
    }

    async fn user_owned(&self, name: String) -> TestUser {
        self.user(&name).await
    }

    /// Logs in another device of `user` and connects it over WebSocket (JSON).
    pub async fn device(&self, user: &TestUser) -> (LoginResponse, WsConnection) {
        let login = self
            .api()
            .login(&user.name, &user.password, None)
            .await
            .unwrap();
        let ws = WsConnection::connect(&self.ws_url(), &login.token, Codec::Json)
            .await
            .unwrap();
        (login, ws)
    }

    /// Logs `user` in on a new device here and returns the ids of a whole `sync` from nothing.
    pub async fn sync_on_new_device(&self, user: &TestUser) -> Vec<client_proto::MessageId> {
        let (_, mut conn) = self.device(user).await;
        conn.sync_all(None, None).await.unwrap().ids()
    }

    /// Connects with an existing login.
    pub async fn connect(&self, login: &LoginResponse) -> WsConnection {
        WsConnection::connect(&self.ws_url(), &login.token, Codec::Json)
            .await
            .unwrap()
    }
}

/// Sends SIGTERM through `kill(1)`, keeping the harness free of unsafe code.
fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!(
                "---- last lines of the node log ({}) ----",
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// How long the helpers wait for a frame.
pub const WAIT: Duration = Duration::from_secs(20);

/// Waits for the next `message` frame on `conn` (other frames are kept for later).
pub async fn next_message(conn: &mut WsConnection) -> client_proto::Message {
    conn.wait_for(WAIT, |f| match f {
        client_proto::ServerFrame::Message { message } => Some((**message).clone()),
        _ => None,
    })
    .await
    .unwrap()
}

/// Collects `message` frames on `conn` until every id of `want` has arrived (within
/// [`WAIT`]), then for `linger` more (long enough for a duplicate to show); how often each id
/// came.
pub async fn collect_messages(
    conn: &mut WsConnection,
    want: &[client_proto::MessageId],
    linger: Duration,
) -> std::collections::HashMap<client_proto::MessageId, usize> {
    let mut seen = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !want.iter().all(|id| seen.contains_key(id)) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} arrived: {seen:?}",
            want.iter().filter(|id| seen.contains_key(*id)).count(),
            want.len()
        );
        let m = next_message(conn).await;
        *seen.entry(m.message_id).or_insert(0) += 1;
    }
    while let Ok(m) = conn
        .wait_for(linger, |f| match f {
            client_proto::ServerFrame::Message { message } => Some(message.message_id),
            _ => None,
        })
        .await
    {
        *seen.entry(m).or_insert(0) += 1;
    }
    seen
}

/// The sum of every series of metric `name` in a `/metrics` text (0 if absent).
pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The message ids at the end of the keys with `prefix` in table `table` (`inbox`, `history`)
/// of a stopped node's store in `data_dir`, read from the store's index engine (fjall or
/// sled, as recorded in `<data dir>/db/index`).
pub fn stored_ids(
    data_dir: &std::path::Path,
    table: &str,
    prefix: &[u8],
) -> std::collections::HashSet<client_proto::MessageId> {
    let db_dir = data_dir.join("db");
    let id = |k: &[u8]| {
        client_proto::MessageId(u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()))
    };
    let engine = std::fs::read_to_string(db_dir.join("index")).unwrap();
    if engine.trim() == "fjall" {
        let db = fjall::Database::builder(db_dir.join("fjall"))
            .open()
            .unwrap();
        assert!(db.keyspace_exists(table), "no keyspace {table}");
        let keyspace = db
            .keyspace(table, fjall::KeyspaceCreateOptions::default)
            .unwrap();
        keyspace
            .prefix(prefix)
            .map(|g| id(&g.key().unwrap()))
            .collect()
    } else {
        assert_eq!(engine.trim(), "sled", "unknown index engine");
        let db = sled::open(&db_dir).unwrap();
        db.open_tree(table)
            .unwrap()
            .scan_prefix(prefix)
            .keys()
            .map(|k| id(&k.unwrap()))
            .collect()
    }
}

/// A direct-message recipient.
pub fn to(user: UserId) -> client_proto::Recipient {
    client_proto::Recipient::User(user)
}

/// A signed-up user with one logged-in device.
pub struct TestUser {
    pub id: UserId,
    pub name: String,
    pub password: String,
    pub login: LoginResponse,
}

/// How many live, active members a node's `GET /v1/cluster` lists that treat no node as
/// joining any more (so every coordinator uses the final replica sets), and the whole view.
pub async fn live_active_members(api: &HttpClient) -> (usize, serde_json::Value) {
    let view: serde_json::Value = api
        .request(reqwest::Method::GET, "/v1/cluster", None, None::<&()>)
        .await
        .unwrap();
    let n = view["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| {
                    m["live"] == true
                        && m["state"] == "active"
                        && m["pending"].as_array().is_some_and(Vec::is_empty)
                })
                .count()
        })
        .unwrap_or(0);
    (n, view)
}

/// Sends and waits for the ack, sending again with the same client id while the node answers
/// `unavailable` (the protocol's "retrying is safe"; a loaded test machine can miss a write
/// timeout), up to 5 attempts.
pub async fn send_until_acked(
    conn: &mut WsConnection,
    client_id: &str,
    to: client_proto::Recipient,
    body: &str,
) -> client_proto::client::Ack {
    let mut attempt = 1;
    loop {
        match conn.send_message(client_id, to, body).await {
            Ok(ack) => return ack,
            Err(client_proto::client::ClientError::Refused(b))
                if b.code == client_proto::ErrorCode::Unavailable && attempt < 5 =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("send {client_id}: {e}"),
        }
    }
}

/// Runs `chatnode args` to completion and checks that it succeeded.
fn run_chatnode(args: &[&str]) {
    let out = Command::new(chatnode_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "chatnode {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// N nodes of one cluster on loopback: one cluster dir (CA, secret, a certificate per node)
/// made with `chatnode certs`, every node seeded with node 0's gossip address.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    /// Kept alive for the nodes' lifetime.
    pub cluster_dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes (ids 0..n) with `extra` flags and waits until every node sees all
    /// of them live and active.
    pub async fn start(n: usize, extra: &[&str]) -> TestCluster {
        let cluster_dir = tempfile::tempdir().unwrap();
        let dir = cluster_dir.path().to_str().unwrap().to_string();
        run_chatnode(&["certs", "init", "--cluster-dir", &dir]);
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            cluster_dir,
        };
        let seed = format!("127.0.0.1:{}", free_udp_port());
        for _ in 0..n {
            cluster.start_node(&seed, extra);
        }
        cluster.wait_members(n).await;
        cluster
    }

    /// Starts one more node (the next id) seeded with node 0 and returns its index; it joins
    /// the running cluster. Does not wait for it to become active.
    pub fn add_node(&mut self, extra: &[&str]) -> usize {
        let seed = self.nodes[0].gossip.clone();
        self.start_node(&seed, extra);
        self.nodes.len() - 1
    }

    /// Makes node `nodes.len()`'s certificate and starts it; the first node gossips on `seed`.
    fn start_node(&mut self, seed: &str, extra: &[&str]) {
        let dir = self.cluster_dir.path().to_str().unwrap().to_string();
        let i = self.nodes.len();
        let name = format!("node-{i}");
        run_chatnode(&[
            "certs",
            "node",
            "--cluster-dir",
            &dir,
            "--name",
            &name,
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
        ]);
        let gossip = if i == 0 {
            seed.to_string()
        } else {
            format!("127.0.0.1:{}", free_udp_port())
        };
        let id = i.to_string();
        let mut args = vec!["--node-id", &id, "--cluster-dir", &dir, "--seed", seed];
        args.extend_from_slice(extra);
        self.nodes.push(TestNode::start_with_gossip(gossip, &args));
    }

    /// Runs `chatnode admin --node <node i> --cluster-dir <the cluster dir> args` to its end
    /// (killed after 5 minutes); its exit status, stdout and stderr.
    pub fn admin(&self, i: usize, args: &[&str]) -> std::process::Output {
        let dir = self.cluster_dir.path().to_str().unwrap().to_string();
        let mut child = Command::new(chatnode_bin())
            .args([
                "admin",
                "--node",
                &self.nodes[i].http,
                "--cluster-dir",
                &dir,
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    }

    /// Starts a new, empty node with id `id` (a replacement), seeded with node `seed`; it
    /// takes the slot `slot` of `nodes` (the dead node's).
    pub fn start_replacement(&mut self, slot: usize, id: usize, seed: usize, extra: &[&str]) {
        let dir = self.cluster_dir.path().to_str().unwrap().to_string();
        let seed = self.nodes[seed].gossip.clone();
        let id = id.to_string();
        let mut args = vec!["--node-id", &id, "--cluster-dir", &dir, "--seed", &seed];
        args.extend_from_slice(extra);
        let node = TestNode::start_with_gossip(format!("127.0.0.1:{}", free_udp_port()), &args);
        self.nodes[slot] = node;
    }

    /// Waits until every running node lists `live` live active members.
    pub async fn wait_members(&self, live: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let (n, view) = live_active_members(&node.api()).await;
                if n == live {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node sees {n} live members, not {live}: {view}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
