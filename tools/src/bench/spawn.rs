//! `--spawn-node`: a `chatnode serve` child process (this very executable, or `--node-bin`) with a temporary
//! data dir, free ports and rate limits high enough not to throttle the bench. It is killed
//! when the bench ends. `--spawn-cluster N`: N of them, one cluster ([`SpawnedCluster`]).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use client_proto::ReadyLine;

/// How long the node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How many of a node's warnings [`SpawnedNode::stop`] prints.
const LOG_LINES_SHOWN: usize = 8;

/// A running `chatnode serve` child.
pub struct SpawnedNode {
    /// The `chatnode` executable it runs.
    exe: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    pumps: Vec<JoinHandle<()>>,
    /// `http://127.0.0.1:PORT`.
    pub http: String,
    /// The client QUIC address, `127.0.0.1:PORT`.
    pub quic: String,
    /// The child's process id (for /proc/<pid>/status).
    pub pid: u32,
    /// Its gossip address (what the other members of a spawned cluster seed from).
    pub gossip: String,
}

/// N spawned nodes forming one cluster: one cluster dir (CA, secret, a certificate per
/// node) made with `chatnode certs`, node `i` with id `i`, every node seeded with node 0.
pub struct SpawnedCluster {
    /// Kept for the nodes' lifetime.
    _cluster_dir: tempfile::TempDir,
    pub nodes: Vec<SpawnedNode>,
}

impl SpawnedCluster {
    /// Makes the cluster dir and starts `n` nodes of `bin` (default: this executable) with
    /// `extra` flags, each waited for.
    pub fn start(n: usize, bin: Option<&Path>, extra: &[String]) -> Result<SpawnedCluster> {
        let exe = node_exe(bin)?;
        let dir = tempfile::Builder::new()
            .prefix("chatnode-bench-cluster-")
            .tempdir()
            .context("creating a temporary cluster dir")?;
        let cluster_dir = dir.path().to_string_lossy().to_string();
        let certs = |args: &[&str]| -> Result<()> {
            let out = Command::new(&exe)
                .arg("certs")
                .args(args)
                .output()
                .context("running chatnode certs")?;
            if !out.status.success() {
                bail!(
                    "chatnode certs {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        certs(&["init", "--cluster-dir", &cluster_dir])?;
        let mut nodes: Vec<SpawnedNode> = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("node-{i}");
            certs(&[
                "node",
                "--cluster-dir",
                &cluster_dir,
                "--name",
                &name,
                "--host",
                "127.0.0.1",
            ])?;
            let mut args = vec![
                "--node-id".to_string(),
                i.to_string(),
                "--cluster-dir".to_string(),
                cluster_dir.clone(),
            ];
            if let Some(first) = nodes.first() {
                args.extend(["--seed".to_string(), first.gossip.clone()]);
            }
            args.extend(extra.iter().cloned());
            nodes.push(SpawnedNode::start(Some(&exe), &args)?);
        }
        Ok(SpawnedCluster {
            _cluster_dir: dir,
            nodes,
        })
    }
}

/// The executable to spawn nodes of: `bin`, or this very one.
fn node_exe(bin: Option<&Path>) -> Result<PathBuf> {
    match bin {
        Some(b) => Ok(b.to_path_buf()),
        None => std::env::current_exe().context("finding the chatnode executable"),
    }
}

impl SpawnedNode {
    /// Starts a node of `bin` (default: this executable) with `extra` flags after the bench's
    /// own, and waits for its ready line.
    pub fn start(bin: Option<&Path>, extra: &[String]) -> Result<SpawnedNode> {
        let dir = tempfile::Builder::new()
            .prefix("chatnode-bench-")
            .tempdir()
            .context("creating a temporary data dir")?;
        let mut node = SpawnedNode {
            exe: node_exe(bin)?,
            child: None,
            dir,
            extra: extra.to_vec(),
            pumps: Vec::new(),
            http: String::new(),
            quic: String::new(),
            pid: 0,
            gossip: String::new(),
        };
        node.launch()?;
        Ok(node)
    }

    /// Kills the node and starts it again on the same data dir (new port, new pid): a fresh
    /// process whose memory holds nothing from the bench's setup (argon2 signups).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    fn launch(&mut self) -> Result<()> {
        let log_path = self.dir.path().join("node.log");
        self.gossip = free_gossip_addr()?;
        let mut child = Command::new(&self.exe)
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
            .args(["--peer-addr", "127.0.0.1:0", "--gossip-addr", &self.gossip])
            .args([
                "--rate-limit-per-sec",
                "1000000",
                "--rate-limit-burst",
                "1000000",
            ])
            // Every bench client comes from loopback: no per-address limits on signups and
            // connections. Environment, not flags, so that `--node-arg` flags win.
            .env("CHATNODE_SIGNUPS_PER_IP_PER_HOUR", "0")
            .env("CHATNODE_MAX_CONNECTIONS_PER_IP", "1000000")
            // The bench reads the ready line; a `--node-arg=--log=...` replaces this filter
            // (the node takes one `--log`) and should keep `chatnode::ready=info`.
            .args(
                if self
                    .extra
                    .iter()
                    .any(|a| a == "--log" || a.starts_with("--log="))
                {
                    &[][..]
                } else {
                    &["--log", "warn,chatnode::ready=info"][..]
                },
            )
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting chatnode serve")?;
        let pid = child.id();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .context("opening the node log")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(log));
        let (tx, rx) = mpsc::channel();
        let stdout = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>);
        for pipe in [stdout, stderr].into_iter().flatten() {
            let (tx, log) = (tx.clone(), log.clone());
            self.pumps.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut f) = log.lock() {
                        let _ = writeln!(f, "{line}");
                    }
                    if let Some(ready) = ReadyLine::parse(&line) {
                        let _ = tx.send((ready.http.to_string(), ready.quic.to_string()));
                    }
                }
            }));
        }
        drop(tx);
        self.child = Some(child);
        self.pid = pid;
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok((http, quic)) => {
                self.http = format!("http://{http}");
                self.quic = quic;
                eprintln!("bench: spawned chatnode pid {pid} at {}", self.http);
                Ok(())
            }
            Err(_) => {
                let tail = self.log_tail(30);
                self.stop();
                bail!("the spawned chatnode did not become ready:\n{tail}")
            }
        }
    }

    /// The cluster CA the node made on first start (what QUIC clients must trust).
    pub fn ca_pem(&self) -> Result<Vec<u8>> {
        let path = self.dir.path().join("data").join("cluster").join("ca.pem");
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the spawned chatnode is not running")
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(anyhow!(
                "the spawned chatnode exited ({status}):\n{}",
                self.log_tail(30)
            )),
            Err(e) => Err(anyhow!("cannot check the spawned chatnode: {e}")),
        }
    }

    /// Kills the node (SIGKILL) and waits for it and its log pumps, then prints what it
    /// logged at warn or above (its log goes with its temporary dir): a run that failed
    /// says what the node saw, a clean run shows that it logged nothing.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
        let text = std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default();
        // Lines below warn are there only when a `--node-arg=--log=...` asked for them; any
        // line that is not a tracing event below warn (a panic's message) is shown.
        let below_warn = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|level| matches!(level, "TRACE" | "DEBUG" | "INFO"))
        };
        let warned: Vec<&str> = text
            .lines()
            .filter(|l| ReadyLine::parse(l).is_none() && !below_warn(l))
            .collect();
        if !warned.is_empty() {
            let shown = &warned[warned.len().saturating_sub(LOG_LINES_SHOWN)..];
            eprintln!(
                "bench: node pid {} logged {} line(s) at warn or above; the last {}:\n{}",
                self.pid,
                warned.len(),
                shown.len(),
                shown.join("\n")
            );
        }
    }
}

impl Drop for SpawnedNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback UDP address that was free a moment ago (gossip advertises its real port, so
/// it cannot be 0).
fn free_gossip_addr() -> Result<String> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free gossip port")?;
    Ok(socket
        .local_addr()
        .context("reading the gossip port")?
        .to_string())
}
