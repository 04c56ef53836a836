//! `chatnode admin`: the operator's command. It talks to one node's `/v1/admin/*` API with
//! the admin token derived from the cluster dir's secret, and prints readable tables; with
//! `--wait`, it follows a move with a progress bar until it is done.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::mesh::MoveStatus;

/// `chatnode admin` flags.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The node to ask: its HTTP address (`http://host:port` or `host:port`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub node: String,
    /// The cluster dir (its `secret` authenticates the request).
    #[arg(long, default_value = "chatnode-data/cluster")]
    pub cluster_dir: std::path::PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub action: AdminAction,
}

/// What `chatnode admin` does.
#[derive(Subcommand, Debug)]
pub enum AdminAction {
    /// Members, states, partitions held now and after the moves under way, hint backlog.
    Status,
    /// The node asked leaves the cluster: its partitions move to the others, then it stops.
    Decommission {
        /// Follow the move until the node has left.
        #[arg(long)]
        wait: bool,
    },
    /// A dead node will not come back: its partitions move to the others, from the
    /// surviving replicas. Its id can never be used again.
    Remove {
        /// The dead node's id.
        node_id: u16,
        /// Follow the move until it is done.
        #[arg(long)]
        wait: bool,
    },
    /// Stop a decommission or removal that has not completed: the node keeps its place.
    Cancel {
        /// The node's id.
        node_id: u16,
    },
    /// Check that a dead node can be replaced, say how, and (with --wait) follow the new
    /// node until it serves the dead node's partitions.
    Replace {
        /// The dead node's id (the new, empty node starts with this --node-id).
        node_id: u16,
        /// Follow the new node until it is active.
        #[arg(long)]
        wait: bool,
    },
    /// The node asked stops taking clients, moves them elsewhere, and stops (as SIGTERM).
    Drain,
}

/// Runs `chatnode admin`.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let secret = cluster::certs::load_secret(&args.cluster_dir).with_context(|| {
        format!(
            "cannot read the cluster secret in {} (give --cluster-dir)",
            args.cluster_dir.display()
        )
    })?;
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        token: crate::gateway::admin::derive_admin_token(secret.as_bytes()),
    };
    let node = base_url(&args.node);
    match args.action {
        AdminAction::Status => {
            let status = api.status(&node).await?;
            print!("{}", render(&status));
        }
        AdminAction::Decommission { wait } => {
            let status = api.post(&node, "/v1/admin/decommission").await?;
            println!("node {} is decommissioning", status.node_id);
            print!("{}", render(&status));
            if wait {
                follow(&api, &node, &status, status.node_id).await?;
            }
        }
        AdminAction::Remove { node_id, wait } => {
            let status = api
                .post(&node, &format!("/v1/admin/remove/{node_id}"))
                .await?;
            println!("node {node_id} is being removed");
            print!("{}", render(&status));
            if wait {
                follow(&api, &node, &status, node_id).await?;
            }
        }
        AdminAction::Cancel { node_id } => {
            let status = api
                .post(&node, &format!("/v1/admin/cancel/{node_id}"))
                .await?;
            println!("node {node_id} keeps its place");
            print!("{}", render(&status));
        }
        AdminAction::Replace { node_id, wait } => replace(&api, &node, node_id, wait).await?,
        AdminAction::Drain => {
            let text = api.post_text(&node, "/v1/admin/drain").await?;
            print!("{text}");
        }
    }
    Ok(())
}

fn base_url(node: &str) -> String {
    let node = node.trim_end_matches('/');
    if node.starts_with("http://") || node.starts_with("https://") {
        node.to_string()
    } else {
        format!("http://{node}")
    }
}

struct Api {
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn status(&self, node: &str) -> anyhow::Result<MoveStatus> {
        let response = self
            .http
            .get(format!("{node}/v1/admin/status"))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach {node}"))?;
        Self::json(response).await
    }

    async fn post(&self, node: &str, path: &str) -> anyhow::Result<MoveStatus> {
        let response = self.send_post(node, path).await?;
        Self::json(response).await
    }

    async fn post_text(&self, node: &str, path: &str) -> anyhow::Result<String> {
        let response = self.send_post(node, path).await?;
        if !response.status().is_success() {
            bail!("{}", refusal(response).await);
        }
        Ok(response.text().await?)
    }

    async fn send_post(&self, node: &str, path: &str) -> anyhow::Result<reqwest::Response> {
        self.http
            .post(format!("{node}{path}"))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach {node}"))
    }

    async fn json(response: reqwest::Response) -> anyhow::Result<MoveStatus> {
        if !response.status().is_success() {
            bail!("{}", refusal(response).await);
        }
        response
            .json()
            .await
            .context("the node's answer is not a status")
    }
}

/// The error message of a refused request.
async fn refusal(response: reqwest::Response) -> String {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    match body["message"].as_str() {
        Some(m) => format!("refused ({status}): {m}"),
        None => format!("refused ({status})"),
    }
}

/// The status table's column names.
const HEADER: [&str; 9] = [
    "node",
    "state",
    "live",
    "load",
    "partitions",
    "after",
    "pull",
    "hints",
    "http",
];

/// The status as a table.
pub fn render(s: &MoveStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "asked node {}; replication factor {}, {} partitions",
        s.node_id, s.replication_factor, s.partitions
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<16} {:>4}  {:>6}  {:>10}  {:>6}  {:<30}  {:>6}  {}",
        HEADER[0],
        HEADER[1],
        HEADER[2],
        HEADER[3],
        HEADER[4],
        HEADER[5],
        HEADER[6],
        HEADER[7],
        HEADER[8]
    );
    for m in &s.members {
        let pull = match (m.moved, m.pulling) {
            (None, _) => "-".to_string(),
            (Some(true), Some(p)) => format!("done, {} records", p.records),
            (Some(true), None) => "done".to_string(),
            (Some(false), Some(p)) => format!(
                "{}/{} partitions, {} rec",
                p.partitions_done, p.partitions_total, p.records
            ),
            (Some(false), None) => "waiting".to_string(),
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:>4}  {:>6}  {:>10}  {:>6}  {:<30}  {:>6}  {}",
            m.node_id,
            m.state,
            if m.live { "yes" } else { "no" },
            m.load,
            m.partitions,
            m.partitions_after,
            pull,
            m.hints,
            m.http_addr
        );
    }
    if s.outgoing.is_empty() {
        let _ = writeln!(out, "no partitions moving");
    } else {
        let _ = writeln!(
            out,
            "moving: {} partitions off node(s) {:?}; waiting for node(s) {:?} to pull",
            s.moving_partitions, s.outgoing, s.waiting_for
        );
    }
    if !s.removed.is_empty() {
        let _ = writeln!(out, "removed for good: {:?}", s.removed);
    }
    out
}

/// A progress bar of `done` out of `total`.
fn bar(done: usize, total: usize) -> String {
    const WIDTH: usize = 30;
    // Clamped: the figures come from gossip, which a peer writes.
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    format!(
        "[{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    )
}

/// Follows the move of `leaving` until it is done, asking `node` (or, once it has stopped,
/// another member).
async fn follow(api: &Api, node: &str, first: &MoveStatus, leaving: u16) -> anyhow::Result<()> {
    let others: Vec<String> = first
        .members
        .iter()
        .filter(|m| m.node_id != leaving && m.live)
        .map(|m| base_url(&m.http_addr))
        .collect();
    let started = std::time::Instant::now();
    // Until the move shows in a status, its absence says nothing (gossip may lag).
    let mut seen_moving = first.outgoing.contains(&leaving);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut asked = None;
        for url in std::iter::once(node.to_string()).chain(others.iter().cloned()) {
            if let Ok(status) = api.status(&url).await {
                asked = Some(status);
                break;
            }
        }
        let Some(status) = asked else {
            bail!("no member answers any more");
        };
        if status.removed.contains(&leaving) {
            println!(
                "\rnode {leaving} holds no partitions any more: done in {:.0?}{:30}",
                started.elapsed(),
                ""
            );
            return Ok(());
        }
        if !status.outgoing.contains(&leaving) {
            if seen_moving || started.elapsed() > Duration::from_secs(30) {
                println!("\rnode {leaving} is not moving any more (cancelled?)");
                return Ok(());
            }
            continue;
        }
        seen_moving = true;
        // Partitions pulled over every remaining member (a member that has not started
        // counts what it takes over as not pulled).
        let (mut done, mut total, mut records) = (0usize, 0usize, 0u64);
        for m in status.members.iter().filter(|m| m.moved.is_some()) {
            let gained = m.partitions_after.saturating_sub(m.partitions);
            match (m.moved, m.pulling) {
                (Some(true), _) => {
                    done += gained;
                    total += gained;
                }
                (_, Some(p)) => {
                    done += p.partitions_done as usize;
                    total += (p.partitions_total as usize).max(gained);
                    records += p.records;
                }
                _ => total += gained,
            }
            if let (Some(true), Some(p)) = (m.moved, m.pulling) {
                records += p.records;
            }
        }
        print!(
            "\r{} partitions pulled by the nodes taking over ({records} records)   ",
            bar(done, total),
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

/// `replace`: the dead node must be a member that is not moving; then the new, empty node
/// takes its place by starting with its id (it pulls the dead node's partitions from the
/// surviving replicas before it serves them; nothing else moves).
async fn replace(api: &Api, node: &str, id: u16, wait: bool) -> anyhow::Result<()> {
    let status = api.status(node).await?;
    if status.removed.contains(&id) {
        bail!("node {id} was removed for good; start the new node with a new --node-id instead (it joins and takes its share)");
    }
    let Some(member) = status.members.iter().find(|m| m.node_id == id) else {
        bail!("node {id} is not a member; start the new node with any unused --node-id to add it");
    };
    if status.outgoing.contains(&id) {
        bail!(
            "node {id} is being removed; `chatnode admin cancel {id}` first to replace it instead"
        );
    }
    if member.live && member.state != "joining" {
        if wait && member.state == "active" {
            // Following a replacement that has already finished its join.
            println!("node {id} is back, active, serving its partitions");
            return Ok(());
        }
        bail!("node {id} is alive: stop it first (a live node keeps its id)");
    }
    if member.live {
        println!("node {id} is joining: a new node has taken its id and pulls its partitions");
    } else {
        println!(
            "node {id} is dead and holds {} partitions. Start the new machine on an EMPTY data dir with:\n  chatnode serve --node-id {id} --cluster-dir <this cluster dir> --seed <a live member's gossip address> ...\nIt pulls node {id}'s partitions from the surviving replicas, then serves them; no other partition moves.",
            member.partitions
        );
    }
    if !wait {
        return Ok(());
    }
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = api.status(node).await?;
        let state = status
            .members
            .iter()
            .find(|m| m.node_id == id)
            .map(|m| (m.state.clone(), m.live));
        match state {
            Some((s, true)) if s == "active" => {
                println!(
                    "\rnode {id} is back, active, serving its partitions ({:.0?})      ",
                    started.elapsed()
                );
                return Ok(());
            }
            Some((s, live)) => print!(
                "\rnode {id}: {s}{}   ",
                if live {
                    ""
                } else {
                    " (waiting for it to start)"
                }
            ),
            None => print!("\rnode {id}: not seen"),
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_bar_fills_and_base_urls_get_a_scheme() {
        assert_eq!(bar(0, 3), format!("[{}] 0/3", ".".repeat(30)));
        assert_eq!(bar(3, 3), format!("[{}] 3/3", "#".repeat(30)));
        assert_eq!(bar(0, 0), format!("[{}] 0/0", "#".repeat(30)));
        assert_eq!(base_url("127.0.0.1:8080/"), "http://127.0.0.1:8080");
        assert_eq!(base_url("https://a:1"), "https://a:1");
    }
}
