//! `chatnode`: one binary, subcommands.

use clap::{Parser, Subcommand};

use chatnode::config::{Config, ServeArgs};

/// mimalloc instead of glibc's malloc: the node allocates and frees many small buffers per
/// message on many threads (frames, ops, futures), where glibc's allocator spent ~20% of the
/// node's CPU (`docs/benchmarks.md`, issue 18). Built with `no_thp`: mimalloc then turns off
/// transparent huge pages for this process (`PR_SET_THP_DISABLE`); with them, page faults that
/// waited for huge-page compaction stalled sends for 30–150 ms (p999 at 1,000 msgs/s 61–66 ms
/// against 14–15 ms without).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "chatnode", version, about = "A peer-federated chat node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (with no flags: a single-node cluster on 127.0.0.1 with data in ./chatnode-data).
    Serve(Box<ServeArgs>),
    /// Make the cluster CA and secret, or a node certificate signed by it.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// A terminal chat client.
    Client(chat_tools::client_cli::ClientArgs),
    /// The load generator: drive a node or a cluster and report throughput and latency.
    Bench(chat_tools::bench::BenchArgs),
    /// Operate a cluster: status, decommission, remove, replace, cancel, drain.
    Admin(chatnode::admin_cli::AdminArgs),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make the cluster CA (ca.pem, ca.key) and the cluster secret in a new cluster dir.
    Init {
        /// The new cluster dir (created; refused if it already holds a CA).
        #[arg(long)]
        cluster_dir: std::path::PathBuf,
    },
    /// Issue a certificate for node NAME (NAME.pem, NAME.key) signed by the cluster CA.
    Node {
        /// The cluster dir made by `certs init` (its ca.pem and ca.key sign the certificate).
        #[arg(long)]
        cluster_dir: std::path::PathBuf,
        /// The node's name; `chatnode serve --node-id N` uses `node-N`.
        #[arg(long)]
        name: String,
        /// A host name or IP address the certificate is valid for (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// Print (hex) the key that signs webhook POSTs by default, derived from the cluster
    /// secret, for receivers to verify `X-Chat-Signature` with (see the README).
    PushSecret {
        /// The cluster dir whose `secret` the webhook signing key is derived from.
        #[arg(long)]
        cluster_dir: std::path::PathBuf,
    },
}

fn certs(cmd: CertsCommand) -> std::process::ExitCode {
    let result = match &cmd {
        CertsCommand::Init { cluster_dir } => {
            cluster::certs::init_cluster_dir(cluster_dir).map(|()| {
                format!(
                    "made the cluster CA and secret in {}",
                    cluster_dir.display()
                )
            })
        }
        CertsCommand::Node {
            cluster_dir,
            name,
            hosts,
        } => cluster::certs::issue_node_cert(cluster_dir, name, hosts).map(|()| {
            format!(
                "issued {name}.pem and {name}.key in {}",
                cluster_dir.display()
            )
        }),
        CertsCommand::PushSecret { cluster_dir } => cluster::certs::load_secret(cluster_dir)
            .map(|secret| chatnode::domain::push::derive_signing_key(secret.as_bytes())),
    };
    match result {
        Ok(done) => {
            println!("{done}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chatnode certs: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => chat_tools::bench::run(args),
        Command::Certs(cmd) => certs(cmd),
        Command::Client(args) => run_async("client", chat_tools::client_cli::run(args)),
        Command::Admin(args) => run_async("admin", chatnode::admin_cli::run(args)),
        Command::Serve(args) => {
            // Every client connection is a descriptor: use all the hard limit allows (the
            // default `--max-connections` is read from the result).
            if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
                eprintln!("chatnode: cannot raise the open-file limit: {e}");
            }
            let cfg = match Config::resolve(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("chatnode: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            if let Err(e) = init_tracing(&cfg.log) {
                eprintln!("chatnode: --log {:?} is not a log filter: {e}", cfg.log);
                return std::process::ExitCode::from(2);
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("chatnode: cannot start the async runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match runtime.block_on(chatnode::server::serve(cfg, shutdown_signal())) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    // Once, on stderr: the log may be filtered or going elsewhere.
                    eprintln!("chatnode: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a subcommand's async body on a fresh runtime; its error goes to stderr once,
/// prefixed with `chatnode <name>:`.
fn run_async(
    name: &str,
    body: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(body));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatnode {name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = chatnode::logging::filter(filter)?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is for in `--help`.
    #[test]
    fn every_flag_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let said = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if said.trim().is_empty() {
                    let name = arg.get_long().map_or(id.to_string(), |l| format!("--{l}"));
                    missing.push(format!("{path} {name}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "chatnode", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without a description: {missing:#?}"
        );
    }
}
