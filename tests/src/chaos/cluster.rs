//! The cluster under test: N real `chatnode serve` processes, node i on its own loopback
//! address 127.0.0.(10+i) for HTTP, client QUIC, peer QUIC and gossip, so the nemesis can cut
//! links between nodes with iptables while clients (on 127.0.0.1) keep theirs.
//!
//! One cluster dir (`chatnode certs init`, one `certs node` per node) is shared; every node
//! is seeded with node 0's gossip address and keeps its data dir, addresses and log (appended
//! across restarts) under the run dir. The handle can SIGKILL, restart, SIGSTOP and SIGCONT a
//! node (by its pid, nothing else) and set its clock offset file; dropping it resumes and
//! kills every node it started.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use client_proto::client::HttpClient;
use tokio::sync::mpsc;

/// Replicas per partition.
pub const REPLICATION_FACTOR: usize = 3;
/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The loopback address of node `i`.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + i as u8)
}

/// What the `chatnode` binary supports that the runner cares about.
pub fn supports_clock_offset_file(bin: &Path) -> Result<bool> {
    let out = Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .with_context(|| format!("run {} serve --help", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("clock-offset-file"))
}

/// One node process and everything needed to start it again.
struct Node {
    ip: Ipv4Addr,
    http: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    clock_file: Option<PathBuf>,
    child: Option<Child>,
    paused: bool,
}

/// The cluster's nodes.
pub struct ChaosCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
}

impl ChaosCluster {
    /// Makes the cluster dir under `dir`, starts `n` nodes one after the other, and waits
    /// until every node sees all of them live and active. With `clock_files`, each node
    /// gets `--clock-offset-file`.
    pub async fn start(dir: &Path, bin: &Path, n: usize, clock_files: bool) -> Result<Self> {
        Self::start_with(dir, bin, n, clock_files, &[]).await
    }

    /// [`ChaosCluster::start`] with `extra` flags for every node.
    pub async fn start_with(
        dir: &Path,
        bin: &Path,
        n: usize,
        clock_files: bool,
        extra: &[&str],
    ) -> Result<Self> {
        if !(1..=20).contains(&n) {
            bail!("a chaos cluster has 1 to 20 nodes, not {n}");
        }
        let cluster_dir = dir.join("cluster");
        let cluster_dir_s = cluster_dir.to_string_lossy().to_string();
        run(bin, &["certs", "init", "--cluster-dir", &cluster_dir_s])?;
        let mut cluster = ChaosCluster {
            bin: bin.to_path_buf(),
            nodes: Vec::new(),
        };
        let mut seed = None;
        for i in 0..n {
            let ip = node_ip(i);
            let name = format!("node-{i}");
            run(
                bin,
                &[
                    "certs",
                    "node",
                    "--cluster-dir",
                    &cluster_dir_s,
                    "--name",
                    &name,
                    "--host",
                    &ip.to_string(),
                    "--host",
                    "127.0.0.1",
                    "--host",
                    "localhost",
                ],
            )?;
            let ports = free_ports(ip)?;
            let [http, quic, peer, gossip] = ports.map(|p| SocketAddr::from((ip, p)));
            let seed = *seed.get_or_insert(gossip);
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("create {}", node_dir.display()))?;
            let mut args: Vec<String> = vec!["serve".into(), "--node-id".into(), i.to_string()];
            let mut flag = |k: &str, v: String| args.extend([k.to_string(), v]);
            flag("--data-dir", node_dir.join("data").to_string_lossy().into());
            flag("--cluster-dir", cluster_dir_s.clone());
            flag("--http-addr", http.to_string());
            flag("--quic-addr", quic.to_string());
            flag("--peer-addr", peer.to_string());
            flag("--gossip-addr", gossip.to_string());
            flag("--advertise-host", ip.to_string());
            flag("--seed", seed.to_string());
            flag("--replication-factor", REPLICATION_FACTOR.to_string());
            // The workload signs its users up from a few loopback addresses.
            flag("--signups-per-ip-per-hour", "0".into());
            let log = std::env::var("CHAOS_NODE_LOG").unwrap_or_else(|_| "info".into());
            flag("--log", log);
            let clock_file = clock_files.then(|| node_dir.join("clock-offset"));
            if let Some(f) = &clock_file {
                std::fs::write(f, "0").with_context(|| format!("write {}", f.display()))?;
                flag("--clock-offset-file", f.to_string_lossy().into());
            }
            args.extend(extra.iter().map(|a| a.to_string()));
            cluster.nodes.push(Node {
                ip,
                http,
                args,
                log: node_dir.join("node.log"),
                clock_file,
                child: None,
                paused: false,
            });
            cluster.spawn(i).await?;
        }
        cluster.wait_members(n, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s loopback address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.nodes.get(i).map_or(Ipv4Addr::LOCALHOST, |n| n.ip)
    }

    /// Node `i`'s HTTP root, `http://127.0.0.1x:PORT`.
    pub fn http_url(&self, i: usize) -> String {
        self.nodes
            .get(i)
            .map_or_else(String::new, |n| format!("http://{}", n.http))
    }

    /// Every node's HTTP root.
    pub fn http_urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.http_url(i)).collect()
    }

    /// Node `i`'s log file.
    pub fn log_path(&self, i: usize) -> Option<&Path> {
        self.nodes.get(i).map(|n| n.log.as_path())
    }

    fn node(&mut self, i: usize) -> Result<&mut Node> {
        let n = self.nodes.len();
        self.nodes
            .get_mut(i)
            .with_context(|| format!("no node {i} in a cluster of {n}"))
    }

    /// Starts node `i`'s process and waits for its ready line.
    async fn spawn(&mut self, i: usize) -> Result<()> {
        let bin = self.bin.clone();
        let node = self.node(i)?;
        let mut cmd = Command::new(&bin);
        cmd.args(&node.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Settings come from the flags alone, not from the runner's environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CHATNODE_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start node {i}: {}", bin.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("open {}", node.log.display()))?;
        let log = Arc::new(Mutex::new(log));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pipes: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut f = log.lock().unwrap_or_else(PoisonError::into_inner);
                    // A full disk must not stop the node: its pipe is still drained.
                    let _ = writeln!(f, "{line}");
                    if line.contains("chatnode ready") {
                        let _ = tx.send(true);
                    }
                }
                let _ = tx.send(false);
            });
        }
        drop(tx);
        node.child = Some(child);
        node.paused = false;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut ended = 0;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(true)) => return Ok(()),
                Ok(Some(false)) => {
                    ended += 1;
                    if ended < 2 {
                        continue;
                    }
                }
                Ok(None) | Err(_) => {}
            }
            let log = node.log.clone();
            self.kill(i);
            bail!(
                "node {i} did not become ready within {READY_TIMEOUT:?}; its log ({}) ends:\n{}",
                log.display(),
                tail(&log, 30)
            );
        }
    }

    /// SIGKILLs node `i` (resuming it first if paused) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Ok(node) = self.node(i) {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                if node.paused {
                    let _ = signal(child.id(), "CONT");
                }
                let _ = child.wait();
            }
            node.paused = false;
        }
    }

    /// Starts node `i` again on the same data dir and addresses (killing it first if it
    /// runs) and waits for its ready line.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i).await
    }

    /// Sends SIGSTOP to node `i`.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        let pid = node.child.as_ref().map(Child::id).context("not running")?;
        signal(pid, "STOP")?;
        node.paused = true;
        Ok(())
    }

    /// Sends SIGCONT to node `i`.
    pub fn resume(&mut self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        let pid = node.child.as_ref().map(Child::id).context("not running")?;
        signal(pid, "CONT")?;
        node.paused = false;
        Ok(())
    }

    /// Writes `offset_ms` (signed milliseconds) to node `i`'s clock offset file.
    pub fn set_clock_offset(&mut self, i: usize, offset_ms: i64) -> Result<()> {
        let node = self.node(i)?;
        let file = node
            .clock_file
            .clone()
            .context("this node runs without --clock-offset-file")?;
        // Write then rename, so the node never reads a half-written number.
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, offset_ms.to_string())
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("rename to {}", file.display()))
    }

    /// Waits until every running node lists `live` live, active members that treat no node
    /// as joining.
    pub async fn wait_members(&self, live: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            let api = HttpClient::new(format!("http://{}", node.http));
            loop {
                let seen = live_active_members(&api).await;
                match &seen {
                    Ok((n, _)) if *n == live => break,
                    _ if Instant::now() >= deadline => {
                        bail!("node {i} does not see {live} live active members: {seen:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        Ok(())
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// How many live, active members with no pending joiner a node lists, and its whole view.
async fn live_active_members(api: &HttpClient) -> Result<(usize, serde_json::Value)> {
    let view: serde_json::Value = api
        .request(reqwest::Method::GET, "/v1/cluster", None, None::<&()>)
        .await?;
    let n = view["members"].as_array().map_or(0, |m| {
        m.iter()
            .filter(|m| {
                m["live"] == true
                    && m["state"] == "active"
                    && m["pending"].as_array().is_some_and(Vec::is_empty)
            })
            .count()
    });
    Ok((n, view))
}

/// Runs `chatnode args` to completion.
fn run(bin: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("run {} {args:?}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "chatnode {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Sends `SIG<name>` to `pid` through `kill(1)` (the workspace has no unsafe code).
fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .with_context(|| format!("run kill -{name} {pid}"))?;
    if !status.success() {
        bail!("kill -{name} {pid} failed: {status}");
    }
    Ok(())
}

/// Four distinct ports that were free on `ip` a moment ago, for TCP (the first, HTTP) and
/// UDP (client QUIC, peer QUIC, gossip). Picked below the kernel's ephemeral range, like the
/// harness does, so that no `:0` bind takes them in between.
fn free_ports(ip: Ipv4Addr) -> Result<[u16; 4]> {
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let mut picked = Vec::new();
    let mut tried = HashSet::new();
    for n in 0u32..4000 {
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(4099)) % 12_000) as u16;
        if !tried.insert(port) {
            continue;
        }
        let tcp = TcpListener::bind((ip, port)).is_ok();
        let udp = UdpSocket::bind((ip, port)).is_ok();
        if tcp && udp {
            picked.push(port);
            if let Ok(p) = <[u16; 4]>::try_from(picked.as_slice()) {
                return Ok(p);
            }
        }
    }
    bail!("no four free ports on {ip} in 20000..32000")
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
