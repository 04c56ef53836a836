//! `chatnode bench`: a load generator built on `client_proto::client`, the same client code
//! third-party clients use. Each scenario sets up its users and connections, prints a
//! progress line a second on stderr, then an aligned table and one `BENCH_JSON {...}` line on
//! stdout, and fails (non-zero exit) when it detects lost messages or failed connections.
//!
//! - [`direct`]: sender/receiver pairs at fixed rates or pipelined at `max`.
//! - [`group`]: groups whose members are all connected; fan-out to the last member.
//! - [`presence`]: friends watching each other connect and disconnect.
//! - [`connections`]: many idle heartbeating connections; the node's memory per connection.
//! - [`attack`]: the unauthenticated attacks of issue 13 (login flood, idle and slowloris
//!   connections) while a victim logs in and sends every second.
//! - [`relay`]: the in-process minimal relay that `relay-baseline` and `--baseline` measure.

pub mod arrivals;
pub mod attack;
pub mod conn;
pub mod connections;
pub mod cost;
pub mod direct;
pub mod group;
mod member;
mod pair;
pub mod presence;
pub mod relay;
pub mod report;
pub mod spawn;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use client_proto::client::HttpClient;
use client_proto::codec::Codec;
use client_proto::ids::UserId;
use futures_util::StreamExt;

use report::Table;
use spawn::SpawnedNode;

/// `chatnode bench <scenario> ...`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios.
#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Sender/receiver pairs at fixed aggregate rates (`--rate 1000,2000`) or `max`.
    Direct(direct::DirectArgs),
    /// Groups with every member connected, each receiving `--rate` messages/s.
    Group(group::GroupArgs),
    /// Friend pairs: one side churns, the other times its `presence` frames.
    Presence(presence::PresenceArgs),
    /// Many idle, heartbeating connections: the node's resident memory per connection.
    Connections(connections::ConnectionsArgs),
    /// The `direct` traffic against an in-process minimal WebSocket relay.
    RelayBaseline(direct::DirectArgs),
    /// Rounds of concurrent wrong logins while a victim logs in and sends every second.
    AttackLogin(attack::AttackLoginArgs),
    /// Idle and slowloris connections while a victim logs in and sends every second.
    AttackIdle(attack::AttackIdleArgs),
}

/// Where the load goes, shared by every scenario.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// A node's HTTP root, e.g. http://127.0.0.1:8080; repeat for several nodes (users and
    /// connections are spread over them round-robin).
    #[arg(long = "server")]
    pub servers: Vec<String>,
    /// Start a `chatnode serve` child (temp data dir, free ports, no rate limit) and use it.
    #[arg(long)]
    pub spawn_node: bool,
    /// Start N `chatnode serve` children as one cluster (a cluster dir of their own, node 0
    /// the seed) and use all of them; their CPU and disk writes count in the cost columns.
    #[arg(long, conflicts_with = "spawn_node")]
    pub spawn_cluster: Option<usize>,
    /// An extra flag for the spawned node (repeatable), e.g.
    /// `--node-arg=--log=warn,chatnode::ready=info,cluster::transport=debug` (a `--log` replaces
    /// the bench's own filter; keep `chatnode::ready=info`, which the bench waits for).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// The `chatnode` executable the spawned nodes run [default: this one]: compares two
    /// builds of the node under the same load generator.
    #[arg(long)]
    pub node_bin: Option<std::path::PathBuf>,
    /// Also run the relay baseline (`direct` at `max`) and show ratios to it.
    #[arg(long)]
    pub baseline: bool,
    /// Frame encoding: JSON text frames or binary (bincode) frames.
    #[arg(long, value_enum, default_value_t = CodecArg::Json)]
    pub codec: CodecArg,
    /// The node's process id, for memory figures when the node was not spawned by the bench.
    #[arg(long)]
    pub node_pid: Option<u32>,
    /// A node process whose CPU time and disk writes count in the cost columns (repeat for
    /// every node of a cluster; default: the spawned node, or `--node-pid`). Flushes are
    /// read from every `--server`'s `/metrics`.
    #[arg(long = "cost-pid")]
    pub cost_pids: Vec<u32>,
}

/// `--codec`.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum CodecArg {
    Json,
    Binary,
}

impl From<CodecArg> for Codec {
    fn from(c: CodecArg) -> Codec {
        match c {
            CodecArg::Json => Codec::Json,
            CodecArg::Binary => Codec::Binary,
        }
    }
}

/// What a scenario found.
pub struct Outcome {
    pub scenario: &'static str,
    pub tables: Vec<Table>,
    /// The scenario's figures, printed as one JSON line.
    pub json: serde_json::Value,
    /// Acked messages that never arrived (or presence changes never seen).
    pub lost: u64,
    /// What went wrong; non-empty means a non-zero exit.
    pub failures: Vec<String>,
}

/// Runs `chatnode bench` and returns the process exit code: 0 when the scenario ran without
/// failures, 1 when it detected failures (lost messages...), 2 when it could not run.
pub fn run(args: BenchArgs) -> ExitCode {
    raise_fd_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatnode bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run_scenario(args.scenario)) {
        Ok(outcome) => {
            for t in &outcome.tables {
                println!("{}", t.render());
            }
            let json = serde_json::json!({
                "scenario": outcome.scenario,
                "lost": outcome.lost,
                "failures": outcome.failures,
                "results": outcome.json,
            });
            println!("BENCH_JSON {json}");
            if outcome.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                for f in &outcome.failures {
                    eprintln!("chatnode bench: FAILURE: {f}");
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chatnode bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_scenario(scenario: Scenario) -> Result<Outcome> {
    match scenario {
        Scenario::Direct(a) => direct::run(a, false).await,
        Scenario::RelayBaseline(a) if a.target.baseline => bail!(
            "relay-baseline is the baseline itself: drop --baseline (it adds the relay's \
             figures to another scenario's table)"
        ),
        Scenario::RelayBaseline(a) => direct::run(a, true).await,
        Scenario::Group(a) => group::run(a).await,
        Scenario::Presence(a) => presence::run(a).await,
        Scenario::Connections(a) => connections::run(a).await,
        Scenario::AttackLogin(a) => attack::run_login(a).await,
        Scenario::AttackIdle(a) => attack::run_idle(a).await,
    }
}

/// Raises this process's open-file limit to its hard limit (and the hard limit to 1M when
/// allowed); a spawned node inherits it.
fn raise_fd_limit() {
    const WANT: u64 = 1 << 20;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, WANT, WANT).is_err() {
        let _ = rlimit::increase_nofile_limit(WANT);
    }
}

/// The node(s) under test: HTTP clients, and the spawned child if any.
pub struct Target {
    pub endpoint: Endpoint,
    pub node: Option<SpawnedNode>,
    /// The spawned cluster, if any.
    pub cluster: Option<spawn::SpawnedCluster>,
    pub node_pid: Option<u32>,
    pub codec: Codec,
    /// Where each step's cost is read.
    pub meter: cost::Meter,
}

impl Target {
    /// Spawns the node if asked, otherwise uses `--server`.
    pub fn open(args: &TargetArgs) -> Result<Target> {
        let mut servers = args.servers.clone();
        let mut node = None;
        let mut node_pid = args.node_pid;
        let mut cluster = None;
        let mut cluster_pids = Vec::new();
        if let Some(n) = args.spawn_cluster {
            if n == 0 {
                bail!("--spawn-cluster needs at least 1 node");
            }
            let c = spawn::SpawnedCluster::start(n, args.node_bin.as_deref(), &args.node_args)?;
            for node in &c.nodes {
                servers.push(node.http.clone());
                cluster_pids.push(node.pid);
            }
            cluster = Some(c);
        }
        if args.spawn_node {
            let n = SpawnedNode::start(args.node_bin.as_deref(), &args.node_args)?;
            servers.push(n.http.clone());
            node_pid = Some(n.pid);
            node = Some(n);
        }
        if servers.is_empty() {
            bail!("give --server http://HOST:PORT (repeatable) or --spawn-node");
        }
        let cost_pids = if !args.cost_pids.is_empty() {
            args.cost_pids.clone()
        } else if !cluster_pids.is_empty() {
            cluster_pids
        } else {
            node_pid.into_iter().collect()
        };
        Ok(Target {
            meter: cost::Meter::new(cost_pids, &servers),
            endpoint: Endpoint::Node(servers.into_iter().map(HttpClient::new).collect()),
            node,
            cluster,
            node_pid,
            codec: args.codec.into(),
        })
    }

    /// Fails when a spawned node has died.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(n) = &mut self.node {
            n.check_alive()?;
        }
        if let Some(c) = &mut self.cluster {
            for n in &mut c.nodes {
                n.check_alive()?;
            }
        }
        Ok(())
    }

    /// With a spawned cluster, waits (at most a minute) until every node sees all of them
    /// live and active, printing how long it took.
    pub async fn settle(&self) -> Result<()> {
        let (Some(c), Endpoint::Node(apis)) = (&self.cluster, &self.endpoint) else {
            return Ok(());
        };
        let want = c.nodes.len();
        let started = std::time::Instant::now();
        for api in apis {
            loop {
                let view: serde_json::Value = api
                    .request(reqwest::Method::GET, "/v1/cluster", None, None::<&()>)
                    .await
                    .context("reading /v1/cluster")?;
                let active = view["members"].as_array().map_or(0, |ms| {
                    ms.iter()
                        .filter(|m| m["live"] == true && m["state"] == "active")
                        .count()
                });
                if active == want {
                    break;
                }
                if started.elapsed() > std::time::Duration::from_secs(60) {
                    bail!("the spawned cluster did not settle: {view}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        eprintln!(
            "bench: spawned cluster of {want} settled in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// Where connections go: real nodes, or the relay (which takes a user id as its token).
#[derive(Clone, Debug)]
pub enum Endpoint {
    Node(Vec<HttpClient>),
    Relay { ws_url: String },
}

/// A bench user with a token, and the WebSocket URL it should use.
#[derive(Clone, Debug)]
pub struct Account {
    pub user_id: UserId,
    pub username: String,
    pub token: String,
    pub ws_url: String,
    /// Which server (index into `--server`) this account talks to.
    pub server: usize,
}

/// The password of every bench user.
pub const PASSWORD: &str = "bench-password";

impl Endpoint {
    /// The HTTP client of server `i`.
    pub fn api(&self, i: usize) -> Option<&HttpClient> {
        match self {
            Endpoint::Node(apis) if !apis.is_empty() => apis.get(i % apis.len()),
            _ => None,
        }
    }

    /// Signs up and logs in `n` users with random names (a few at a time: argon2 is slow),
    /// spread over the servers. The relay needs no signup: ids are made up.
    pub async fn accounts(&self, n: usize, prefix: &str) -> Result<Vec<Account>> {
        let apis = match self {
            Endpoint::Relay { ws_url } => {
                return Ok((0..n)
                    .map(|i| Account {
                        user_id: UserId(i as u64 + 1),
                        username: format!("{prefix}{i}"),
                        token: (i + 1).to_string(),
                        ws_url: ws_url.clone(),
                        server: 0,
                    })
                    .collect())
            }
            Endpoint::Node(apis) => apis.clone(),
        };
        let run: u32 = rand::random();
        let started = std::time::Instant::now();
        let made = futures_util::stream::iter(0..n)
            .map(|i| {
                let server = i % apis.len();
                let api = apis[server].clone();
                let username = format!("{prefix}{run:08x}_{i}");
                async move {
                    let s = api
                        .signup(&username, PASSWORD)
                        .await
                        .with_context(|| format!("signing up {username}"))?;
                    let login = api
                        .login(&username, PASSWORD, None)
                        .await
                        .with_context(|| format!("logging in {username}"))?;
                    Ok::<_, anyhow::Error>(Account {
                        user_id: s.user_id,
                        username,
                        token: login.token,
                        ws_url: api.ws_url(),
                        server,
                    })
                }
            })
            .buffered(8)
            .collect::<Vec<_>>()
            .await;
        let accounts = made.into_iter().collect::<Result<Vec<_>>>()?;
        eprintln!(
            "bench: signed up and logged in {n} users in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(accounts)
    }
}

/// Runs the relay baseline (`direct` at `max`, `pairs` pairs, for `secs` seconds) and returns
/// its delivered msgs/s and result, for the `--baseline` ratios.
pub async fn baseline(codec: CodecArg, secs: u64) -> Result<direct::StepResult> {
    let args = direct::DirectArgs::baseline_defaults(codec, secs);
    let results = direct::measure_relay(&args).await?;
    results
        .into_iter()
        .next()
        .context("the baseline produced no result")
}
