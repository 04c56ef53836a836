//! Node configuration: one struct, read from a TOML file (`--config`), overridden by
//! environment variables (`CHATNODE_<FLAG>`) and flags, validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::IndexKind;

/// The log filter when none is given: this node's events at info, libraries' chatter only
/// when something is wrong.
pub const DEFAULT_LOG: &str = "info,chitchat=warn";

/// Bodies up to this many bytes are copied into each inbox; longer ones are stored once and
/// referred to. A reference costs one more quorum read when a page is synced; at this size
/// that read costs less than a copy per recipient (writing it to every replica, logging it,
/// replicating it).
pub const DEFAULT_INLINE_BODY_BYTES: usize = 4096;

/// Flags of `chatnode serve`. Every one also reads `CHATNODE_<NAME>` and the config file key
/// of the same name in snake_case.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "CHATNODE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where this node keeps its data [default: ./chatnode-data].
    #[arg(long, env = "CHATNODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's id, 0 to 1023, unique in the cluster [default: 0].
    #[arg(long, env = "CHATNODE_NODE_ID")]
    pub node_id: Option<u16>,
    /// HTTP and WebSocket listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "CHATNODE_HTTP_ADDR", value_parser = listen_addr)]
    pub http_addr: Option<SocketAddr>,
    /// Client QUIC listen address [default: 127.0.0.1:8443].
    #[arg(long, env = "CHATNODE_QUIC_ADDR", value_parser = listen_addr)]
    pub quic_addr: Option<SocketAddr>,
    /// Peer QUIC listen address [default: 127.0.0.1:7947].
    #[arg(long, env = "CHATNODE_PEER_ADDR", value_parser = listen_addr)]
    pub peer_addr: Option<SocketAddr>,
    /// Gossip listen address [default: 127.0.0.1:7946].
    #[arg(long, env = "CHATNODE_GOSSIP_ADDR", value_parser = listen_addr)]
    pub gossip_addr: Option<SocketAddr>,
    /// Host name or address that clients and peers use to reach this node [default: the
    /// HTTP listen host].
    #[arg(long, env = "CHATNODE_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Gossip address of another node (repeatable).
    #[arg(long = "seed", env = "CHATNODE_SEED", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Folder with the cluster CA, this node's certificate and key, and the cluster secret
    /// [default: <data-dir>/cluster, made on first start].
    #[arg(long, env = "CHATNODE_CLUSTER_DIR")]
    pub cluster_dir: Option<PathBuf>,
    /// Copies of each partition [default: 3, fewer when the cluster is smaller].
    #[arg(long, env = "CHATNODE_REPLICATION_FACTOR")]
    pub replication_factor: Option<usize>,
    /// Number of partitions; fixed when the cluster is created [default: 1024].
    #[arg(long, env = "CHATNODE_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Heartbeat interval announced to clients, ms [default: 5000].
    #[arg(long, env = "CHATNODE_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A device silent for this long is dropped, ms [default: 30000].
    #[arg(long, env = "CHATNODE_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// On SIGTERM, how long connected devices get to move to another node (after the
    /// `draining` frame) before the rest are closed with 1001, s [default: 30].
    #[arg(long, env = "CHATNODE_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Sustained sends per second per user, all of the user's connections to this node
    /// together [default: 50].
    #[arg(long, env = "CHATNODE_RATE_LIMIT_PER_SEC")]
    pub rate_limit_per_sec: Option<f64>,
    /// Burst of sends per user [default: 100].
    #[arg(long, env = "CHATNODE_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Sustained `sync` and `history` requests per second per user [default: 10].
    #[arg(long, env = "CHATNODE_READ_RATE_LIMIT_PER_SEC")]
    pub read_rate_limit_per_sec: Option<f64>,
    /// Burst of `sync` and `history` requests per user [default: 40].
    #[arg(long, env = "CHATNODE_READ_RATE_LIMIT_BURST")]
    pub read_rate_limit_burst: Option<u32>,
    /// Sustained bytes of `sync` and `history` replies per second per user; a request is
    /// refused while the user is over it [default: 8388608, 8 MiB].
    #[arg(long, env = "CHATNODE_READ_BYTES_PER_SEC")]
    pub read_bytes_per_sec: Option<u32>,
    /// Burst of bytes of `sync` and `history` replies per user [default: 33554432, 32 MiB].
    #[arg(long, env = "CHATNODE_READ_BYTES_BURST")]
    pub read_bytes_burst: Option<u32>,
    /// Web origins (`scheme://host[:port]`, comma-separated) allowed to open WebSockets, on
    /// top of the node's own (an `Origin` whose host and port are the request's `Host`);
    /// `*` allows any. Requests without an `Origin` (native clients) are always allowed
    /// [default: none].
    #[arg(long, env = "CHATNODE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// A write not durable within this time fails with `unavailable`, ms [default: 2000].
    #[arg(long, env = "CHATNODE_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// Sends this node stores at once at most; further sends wait for a slot, in arrival
    /// order, before any work (back pressure: a slower ack instead of an `unavailable` from
    /// a replication timeout when the cluster is overloaded) [default: 128].
    #[arg(long, env = "CHATNODE_MAX_CONCURRENT_SENDS")]
    pub max_concurrent_sends: Option<usize>,
    /// Message bodies longer than this, bytes, are not copied into each recipient's inbox:
    /// the inbox entries refer to the conversation's history entry [default: 4096]. Nodes
    /// before this setting cannot read such references (nor can the node be downgraded to
    /// one once they are stored): during a rolling upgrade from one, set 100000 (every body
    /// inline) on every node until all run this version.
    #[arg(long, env = "CHATNODE_INLINE_BODY_BYTES")]
    pub inline_body_bytes: Option<usize>,
    /// The engine of the replicated tables of a new data directory [default: fjall, an LSM
    /// tree; `sled` is the engine of directories made before this setting, measured against
    /// fjall in docs/benchmarks.md]. An existing directory keeps its engine; naming the other
    /// one is refused.
    #[arg(long, env = "CHATNODE_INDEX", value_enum)]
    pub index: Option<IndexKind>,
    /// How far a sync cursor trails the newest inbox positions, ms [default: 5000]: a
    /// message must reach an inbox replica within this (by the replica's clock) of taking its
    /// position, or it is written again at a new one; the next sync resends this much.
    #[arg(long, env = "CHATNODE_SEAL_WINDOW_MS")]
    pub seal_window_ms: Option<u64>,
    /// Time between checkpoints of the commit log (sled flushed, covered segments deleted)
    /// while writes arrive, ms [default: 10000].
    #[arg(long, env = "CHATNODE_CHECKPOINT_INTERVAL_MS")]
    pub checkpoint_interval_ms: Option<u64>,
    /// A commit log segment this large starts a checkpoint at once, MiB [default: 64]. Bounds
    /// the log replayed at start after a crash.
    #[arg(long, env = "CHATNODE_CHECKPOINT_MIB")]
    pub checkpoint_mib: Option<u64>,
    /// This node refuses to issue ids (to store messages, accounts, groups) while its clock
    /// is further than this from the median of its peers', ms [default: 10000]; `/readyz`
    /// says so. It is also how far ahead of its own clock a peer's timestamp may pull it.
    #[arg(long, env = "CHATNODE_MAX_CLOCK_SKEW_MS")]
    pub max_clock_skew_ms: Option<u64>,
    /// Seconds between a connected device's periodic catch-up from its inbox position, a
    /// safety net under the catch-ups the node starts when it learns it may have missed
    /// deliveries [default: 60; 0: off].
    #[arg(long, env = "CHATNODE_HEAL_INTERVAL_SECS")]
    pub heal_interval_secs: Option<u64>,
    /// Tests only: a file holding a signed number of ms added to this node's wall clock,
    /// re-read every 500 ms (a chaos test skews one node with it).
    #[arg(long, env = "CHATNODE_CLOCK_OFFSET_FILE")]
    pub clock_offset_file: Option<PathBuf>,
    /// Seconds between anti-entropy passes: this node pulls its partitions from their other
    /// replicas and keeps what it missed [default: 3600; 0: only once after a restart].
    #[arg(long, env = "CHATNODE_ANTI_ENTROPY_SECS")]
    pub anti_entropy_secs: Option<u64>,
    /// Lifetime of a login token, seconds [default: 2592000, 30 days].
    #[arg(long, env = "CHATNODE_TOKEN_TTL_SECS")]
    pub token_ttl_secs: Option<u64>,
    /// A device unused (no login, request or new connection) for this long is logged out,
    /// seconds [default: 7776000, 90 days].
    #[arg(long, env = "CHATNODE_DEVICE_IDLE_SECS")]
    pub device_idle_secs: Option<u64>,
    /// Whether push notifications carry a preview of the body (100 characters) [default: true].
    #[arg(long, env = "CHATNODE_PUSH_PREVIEW", action = clap::ArgAction::Set)]
    pub push_preview: Option<bool>,
    /// Timeout of one webhook POST, ms [default: 5000].
    #[arg(long, env = "CHATNODE_PUSH_TIMEOUT_MS")]
    pub push_timeout_ms: Option<u64>,
    /// First retry delay of a failed webhook POST, doubled per attempt, ms [default: 1000].
    #[arg(long, env = "CHATNODE_PUSH_RETRY_BASE_MS")]
    pub push_retry_base_ms: Option<u64>,
    /// Attempts before a notification is dead-lettered [default: 8].
    #[arg(long, env = "CHATNODE_PUSH_MAX_ATTEMPTS")]
    pub push_max_attempts: Option<u32>,
    /// Webhook targets allowed although internal: CIDRs, addresses or host names, comma
    /// separated (e.g. `10.0.0.0/8,hooks.internal`). By default webhooks may only reach
    /// public addresses (no loopback, private, link-local or metadata ranges).
    #[arg(long, env = "CHATNODE_PUSH_ALLOW_HOSTS", value_delimiter = ',')]
    pub push_allow_hosts: Vec<String>,
    /// Key of the webhook signatures (`X-Chat-Signature`), at least 16 bytes [default:
    /// derived from the cluster secret; `chatnode certs push-secret` prints it]. Prefer
    /// the environment variable or the config file: flags show in `ps`.
    #[arg(long, env = "CHATNODE_PUSH_SIGNING_SECRET", hide_env_values = true)]
    pub push_signing_secret: Option<Redacted<String>>,
    /// Most client connections (HTTP and WebSocket) open at once; past it new ones are
    /// refused [default: the open-file limit less 1024 for the store and peers, at most
    /// 100000].
    #[arg(long, env = "CHATNODE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most client connections (HTTP and WebSocket) from one source address at once
    /// [default: 1000]. The source is the TCP peer: behind a proxy, raise it or set it on the
    /// proxy.
    #[arg(long, env = "CHATNODE_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Time a client has to send a whole HTTP request head, counted from the moment the
    /// connection is ready for a request (so it also closes idle keep-alive connections), ms
    /// [default: 10000].
    #[arg(long, env = "CHATNODE_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// An HTTP connection (before a WebSocket upgrade) that moves no byte either way for this
    /// long is closed: a stalled request body or a client that stopped reading, ms
    /// [default: 30000].
    #[arg(long, env = "CHATNODE_HTTP_IDLE_TIMEOUT_MS")]
    pub http_idle_timeout_ms: Option<u64>,
    /// Time a new WebSocket or QUIC connection has to authenticate before it is closed, ms
    /// [default: 10000].
    #[arg(long, env = "CHATNODE_AUTH_TIMEOUT_MS")]
    pub auth_timeout_ms: Option<u64>,
    /// Password hashes (argon2id, ~19 MiB each) computed at once [default: the number of
    /// CPU cores].
    #[arg(long, env = "CHATNODE_HASH_WORKERS")]
    pub hash_workers: Option<usize>,
    /// Logins and signups that may wait for a hashing worker; past it they are refused with
    /// `busy` [default: 64].
    #[arg(long, env = "CHATNODE_HASH_QUEUE")]
    pub hash_queue: Option<usize>,
    /// Wrong passwords for one username before logins to it are delayed [default: 5].
    #[arg(long, env = "CHATNODE_LOGIN_FREE_FAILURES")]
    pub login_free_failures: Option<u32>,
    /// Failed logins from one source address before its logins are delayed [default: 50].
    #[arg(long, env = "CHATNODE_LOGIN_FREE_FAILURES_PER_IP")]
    pub login_free_failures_per_ip: Option<u32>,
    /// The first login delay once the free failures are used up, doubled per further
    /// failure, ms [default: 1000].
    #[arg(long, env = "CHATNODE_LOGIN_DELAY_BASE_MS")]
    pub login_delay_base_ms: Option<u64>,
    /// The longest login delay, ms [default: 300000].
    #[arg(long, env = "CHATNODE_LOGIN_DELAY_MAX_MS")]
    pub login_delay_max_ms: Option<u64>,
    /// Signups allowed per source address per hour (a burst of this many, then refilled
    /// evenly) [default: 20; 0: unlimited].
    #[arg(long, env = "CHATNODE_SIGNUPS_PER_IP_PER_HOUR")]
    pub signups_per_ip_per_hour: Option<u32>,
    /// Log filter in tracing's EnvFilter syntax [default: info,chitchat=warn: the gossip
    /// library's own chatter only when something is wrong].
    #[arg(long, env = "CHATNODE_LOG")]
    pub log: Option<String>,
}

/// The config file: the same settings as the flags, in snake_case.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    node_id: Option<u16>,
    #[serde(default, deserialize_with = "de_listen_addr")]
    http_addr: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_listen_addr")]
    quic_addr: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_listen_addr")]
    peer_addr: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_listen_addr")]
    gossip_addr: Option<SocketAddr>,
    advertise_host: Option<String>,
    #[serde(default)]
    seeds: Vec<String>,
    cluster_dir: Option<PathBuf>,
    replication_factor: Option<usize>,
    partitions: Option<u32>,
    heartbeat_interval_ms: Option<u64>,
    heartbeat_timeout_ms: Option<u64>,
    drain_timeout_secs: Option<u64>,
    rate_limit_per_sec: Option<f64>,
    rate_limit_burst: Option<u32>,
    read_rate_limit_per_sec: Option<f64>,
    read_rate_limit_burst: Option<u32>,
    read_bytes_per_sec: Option<u32>,
    read_bytes_burst: Option<u32>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    write_timeout_ms: Option<u64>,
    max_concurrent_sends: Option<usize>,
    inline_body_bytes: Option<usize>,
    index: Option<IndexKind>,
    anti_entropy_secs: Option<u64>,
    seal_window_ms: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    checkpoint_mib: Option<u64>,
    max_clock_skew_ms: Option<u64>,
    heal_interval_secs: Option<u64>,
    clock_offset_file: Option<PathBuf>,
    token_ttl_secs: Option<u64>,
    device_idle_secs: Option<u64>,
    push_preview: Option<bool>,
    push_timeout_ms: Option<u64>,
    push_retry_base_ms: Option<u64>,
    push_max_attempts: Option<u32>,
    #[serde(default)]
    push_allow_hosts: Vec<String>,
    push_signing_secret: Option<Redacted<String>>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    http_header_timeout_ms: Option<u64>,
    http_idle_timeout_ms: Option<u64>,
    auth_timeout_ms: Option<u64>,
    hash_workers: Option<usize>,
    hash_queue: Option<usize>,
    login_free_failures: Option<u32>,
    login_free_failures_per_ip: Option<u32>,
    login_delay_base_ms: Option<u64>,
    login_delay_max_ms: Option<u64>,
    signups_per_ip_per_hour: Option<u32>,
    log: Option<String>,
}

/// The resolved, validated settings of a node.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub node_id: u16,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub gossip_addr: SocketAddr,
    pub advertise_host: String,
    pub seeds: Vec<String>,
    pub cluster_dir: PathBuf,
    pub replication_factor: usize,
    pub partitions: u32,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// How long a drain waits for devices to move before closing the rest (`Node::drain`).
    pub drain_timeout: Duration,
    /// Sends per second per user, and their burst.
    pub rate_limit_per_sec: f64,
    pub rate_limit_burst: u32,
    /// `sync`/`history` requests per second per user, and their burst.
    pub read_rate_limit_per_sec: f64,
    pub read_rate_limit_burst: u32,
    /// Bytes of `sync`/`history` replies per second per user, and their burst.
    pub read_bytes_per_sec: u32,
    pub read_bytes_burst: u32,
    /// Extra origins allowed to open WebSockets (`*`: any); see `gateway::ws`.
    pub allowed_origins: Vec<String>,
    pub write_timeout: Duration,
    /// Sends stored at once at most (`Chat::admit`).
    pub max_concurrent_sends: usize,
    /// Longer bodies are stored once, in the history (`store::messages`).
    pub inline_body_bytes: usize,
    /// The engine of the replicated tables of a new store (`store::index`); `None`: the
    /// default, or the existing store's.
    pub index: Option<IndexKind>,
    /// Time between anti-entropy passes; `None`: only the catch-up after a restart.
    pub anti_entropy: Option<Duration>,
    /// How far a sync cursor trails the newest inbox positions (the replicas' seal window).
    pub seal_window: Duration,
    /// Time between commit log checkpoints while writes arrive.
    pub checkpoint_interval: Duration,
    /// Log bytes that start a checkpoint at once.
    pub checkpoint_bytes: u64,
    /// The clock skew past which this node refuses to issue ids.
    pub max_clock_skew: Duration,
    /// Time between a connected device's periodic catch-ups; `None`: off.
    pub heal_interval: Option<Duration>,
    /// Tests only: where this node's wall-clock offset is read from.
    pub clock_offset_file: Option<PathBuf>,
    pub token_ttl: Duration,
    /// A device unused for this long is logged out (see `domain::accounts`).
    pub device_idle: Duration,
    pub push: PushConfig,
    /// Connection caps and timeouts of the HTTP/WebSocket listener.
    pub conn: ConnLimits,
    /// Time a new WebSocket or QUIC connection has to authenticate.
    pub auth_timeout: Duration,
    /// Password hashing, login throttling and signup limits.
    pub login: LoginLimits,
    pub log: String,
}

/// A setting an operator got wrong, said as a sentence.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A listen address: `ip:port`, or `host:port` with a host name that resolves (the first
/// address it resolves to is used, e.g. `localhost:8081`).
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let wrong = |why: String| {
        format!("{s:?} is not a listen address ({why}); expected host:port, e.g. 127.0.0.1:8080 or localhost:8080")
    };
    let mut addrs = s.to_socket_addrs().map_err(|e| wrong(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| wrong("the host name resolves to no address".into()))
}

fn de_listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    listen_addr(&s).map(Some).map_err(serde::de::Error::custom)
}

impl Config {
    /// Merges flags (and their environment variables) over the config file over defaults,
    /// and validates the result.
    pub fn resolve(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let addr = |a: Option<SocketAddr>, f: Option<SocketAddr>, d: &str| {
            a.or(f)
                .unwrap_or_else(|| d.parse().unwrap_or(([127, 0, 0, 1], 0).into()))
        };
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("chatnode-data"));
        let http_addr = addr(args.http_addr, file.http_addr, "127.0.0.1:8080");
        let cfg = Config {
            cluster_dir: args
                .cluster_dir
                .or(file.cluster_dir)
                .unwrap_or_else(|| data_dir.join("cluster")),
            node_id: args.node_id.or(file.node_id).unwrap_or(0),
            http_addr,
            quic_addr: addr(args.quic_addr, file.quic_addr, "127.0.0.1:8443"),
            peer_addr: addr(args.peer_addr, file.peer_addr, "127.0.0.1:7947"),
            gossip_addr: addr(args.gossip_addr, file.gossip_addr, "127.0.0.1:7946"),
            advertise_host: args
                .advertise_host
                .or(file.advertise_host)
                .unwrap_or_else(|| http_addr.ip().to_string()),
            seeds: if args.seeds.is_empty() {
                file.seeds
            } else {
                args.seeds
            },
            replication_factor: args
                .replication_factor
                .or(file.replication_factor)
                .unwrap_or(3),
            partitions: args.partitions.or(file.partitions).unwrap_or(1024),
            heartbeat_interval: ms(
                args.heartbeat_interval_ms.or(file.heartbeat_interval_ms),
                5_000,
            ),
            heartbeat_timeout: ms(
                args.heartbeat_timeout_ms.or(file.heartbeat_timeout_ms),
                30_000,
            ),
            drain_timeout: Duration::from_secs(
                args.drain_timeout_secs
                    .or(file.drain_timeout_secs)
                    .unwrap_or(30),
            ),
            rate_limit_per_sec: args
                .rate_limit_per_sec
                .or(file.rate_limit_per_sec)
                .unwrap_or(50.0),
            rate_limit_burst: args
                .rate_limit_burst
                .or(file.rate_limit_burst)
                .unwrap_or(100),
            read_rate_limit_per_sec: args
                .read_rate_limit_per_sec
                .or(file.read_rate_limit_per_sec)
                .unwrap_or(10.0),
            read_rate_limit_burst: args
                .read_rate_limit_burst
                .or(file.read_rate_limit_burst)
                .unwrap_or(40),
            read_bytes_per_sec: args
                .read_bytes_per_sec
                .or(file.read_bytes_per_sec)
                .unwrap_or(8 << 20),
            read_bytes_burst: args
                .read_bytes_burst
                .or(file.read_bytes_burst)
                .unwrap_or(32 << 20),
            allowed_origins: if args.allowed_origins.is_empty() {
                file.allowed_origins
            } else {
                args.allowed_origins
            },
            write_timeout: ms(args.write_timeout_ms.or(file.write_timeout_ms), 2_000),
            max_concurrent_sends: args
                .max_concurrent_sends
                .or(file.max_concurrent_sends)
                .unwrap_or(128),
            inline_body_bytes: args
                .inline_body_bytes
                .or(file.inline_body_bytes)
                .unwrap_or(DEFAULT_INLINE_BODY_BYTES),
            index: args.index.or(file.index),
            anti_entropy: match args
                .anti_entropy_secs
                .or(file.anti_entropy_secs)
                .unwrap_or(3600)
            {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            seal_window: ms(args.seal_window_ms.or(file.seal_window_ms), 5_000),
            checkpoint_interval: ms(
                args.checkpoint_interval_ms.or(file.checkpoint_interval_ms),
                10_000,
            ),
            checkpoint_bytes: args
                .checkpoint_mib
                .or(file.checkpoint_mib)
                .unwrap_or(64)
                .saturating_mul(1 << 20),
            max_clock_skew: ms(args.max_clock_skew_ms.or(file.max_clock_skew_ms), 10_000),
            heal_interval: match args
                .heal_interval_secs
                .or(file.heal_interval_secs)
                .unwrap_or(60)
            {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            clock_offset_file: args.clock_offset_file.or(file.clock_offset_file),
            token_ttl: Duration::from_secs(
                args.token_ttl_secs
                    .or(file.token_ttl_secs)
                    .unwrap_or(30 * 24 * 3600),
            ),
            device_idle: Duration::from_secs(
                args.device_idle_secs
                    .or(file.device_idle_secs)
                    .unwrap_or(90 * 24 * 3600),
            ),
            push: PushConfig {
                preview: args.push_preview.or(file.push_preview).unwrap_or(true),
                timeout: ms(args.push_timeout_ms.or(file.push_timeout_ms), 5_000),
                retry_base: ms(args.push_retry_base_ms.or(file.push_retry_base_ms), 1_000),
                max_attempts: args
                    .push_max_attempts
                    .or(file.push_max_attempts)
                    .unwrap_or(8),
                allow_hosts: if args.push_allow_hosts.is_empty() {
                    file.push_allow_hosts
                } else {
                    args.push_allow_hosts
                },
                signing_secret: args.push_signing_secret.or(file.push_signing_secret),
            },
            conn: ConnLimits {
                max_connections: args
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or_else(default_max_connections),
                max_per_ip: args
                    .max_connections_per_ip
                    .or(file.max_connections_per_ip)
                    .unwrap_or(1000),
                header_timeout: ms(
                    args.http_header_timeout_ms.or(file.http_header_timeout_ms),
                    10_000,
                ),
                idle_timeout: ms(
                    args.http_idle_timeout_ms.or(file.http_idle_timeout_ms),
                    30_000,
                ),
            },
            auth_timeout: ms(
                args.auth_timeout_ms.or(file.auth_timeout_ms),
                client_proto::limits::AUTH_TIMEOUT_MS,
            ),
            login: LoginLimits {
                hash_workers: args
                    .hash_workers
                    .or(file.hash_workers)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                hash_queue: args.hash_queue.or(file.hash_queue).unwrap_or(64),
                free_failures: args
                    .login_free_failures
                    .or(file.login_free_failures)
                    .unwrap_or(5),
                free_failures_per_ip: args
                    .login_free_failures_per_ip
                    .or(file.login_free_failures_per_ip)
                    .unwrap_or(50),
                delay_base: ms(args.login_delay_base_ms.or(file.login_delay_base_ms), 1_000),
                delay_max: ms(args.login_delay_max_ms.or(file.login_delay_max_ms), 300_000),
                signups_per_ip_per_hour: args
                    .signups_per_ip_per_hour
                    .or(file.signups_per_ip_per_hour)
                    .unwrap_or(20),
            },
            log: args.log.or(file.log).unwrap_or_else(|| DEFAULT_LOG.into()),
            data_dir,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.node_id >= 1024 {
            return bad(format!(
                "--node-id is {}; it must be between 0 and 1023",
                self.node_id
            ));
        }
        if self.replication_factor == 0 || self.replication_factor > 7 {
            return bad(format!(
                "--replication-factor is {}; it must be between 1 and 7",
                self.replication_factor
            ));
        }
        if self.partitions == 0 || self.partitions > 65_536 {
            return bad(format!(
                "--partitions is {}; it must be between 1 and 65536",
                self.partitions
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(format!(
                "--heartbeat-timeout-ms ({} ms) must be longer than --heartbeat-interval-ms ({} ms), which must be above 0",
                self.heartbeat_timeout.as_millis(),
                self.heartbeat_interval.as_millis()
            ));
        }
        if !(self.rate_limit_per_sec > 0.0 && self.rate_limit_per_sec.is_finite())
            || self.rate_limit_burst == 0
        {
            return bad("--rate-limit-per-sec and --rate-limit-burst must be above 0".into());
        }
        if !(self.read_rate_limit_per_sec > 0.0 && self.read_rate_limit_per_sec.is_finite())
            || self.read_rate_limit_burst == 0
            || self.read_bytes_per_sec == 0
            || self.read_bytes_burst == 0
        {
            return bad(
                "--read-rate-limit-per-sec, --read-rate-limit-burst, --read-bytes-per-sec and --read-bytes-burst must be above 0"
                    .into(),
            );
        }
        for o in &self.allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return bad(format!(
                    "--allowed-origins: {o:?} is not `*` or scheme://host[:port]"
                ));
            }
        }
        if self.write_timeout < Duration::from_millis(100) {
            return bad("--write-timeout-ms must be at least 100".into());
        }
        if self.max_concurrent_sends == 0 {
            return bad("--max-concurrent-sends must be at least 1".into());
        }
        if self.seal_window < Duration::from_millis(500) {
            return bad("--seal-window-ms must be at least 500".into());
        }
        if self.checkpoint_interval < Duration::from_millis(100) || self.checkpoint_bytes == 0 {
            return bad(
                "--checkpoint-interval-ms must be at least 100 and --checkpoint-mib above 0".into(),
            );
        }
        if self.max_clock_skew < Duration::from_millis(100) {
            return bad("--max-clock-skew-ms must be at least 100".into());
        }
        if self.token_ttl < Duration::from_secs(1) {
            return bad("--token-ttl-secs must be at least 1".into());
        }
        if self.device_idle < Duration::from_secs(1) {
            return bad("--device-idle-secs must be at least 1".into());
        }
        if self.push.max_attempts == 0
            || self.push.timeout.is_zero()
            || self.push.retry_base.is_zero()
        {
            return bad(
                "--push-max-attempts, --push-timeout-ms and --push-retry-base-ms must be above 0"
                    .into(),
            );
        }
        if let Err(e) = crate::domain::push::target::TargetPolicy::parse(&self.push.allow_hosts) {
            return bad(e);
        }
        if self
            .push
            .signing_secret
            .as_ref()
            .is_some_and(|s| s.0.len() < 16)
        {
            return bad("--push-signing-secret must be at least 16 bytes".into());
        }
        if self.conn.max_connections == 0 || self.conn.max_per_ip == 0 {
            return bad("--max-connections and --max-connections-per-ip must be above 0".into());
        }
        if self.conn.header_timeout < Duration::from_millis(100)
            || self.conn.idle_timeout < Duration::from_millis(100)
            || self.auth_timeout < Duration::from_millis(100)
        {
            return bad(
                "--http-header-timeout-ms, --http-idle-timeout-ms and --auth-timeout-ms must be at least 100"
                    .into(),
            );
        }
        if self.login.hash_workers == 0 || self.login.hash_workers > 256 {
            return bad(format!(
                "--hash-workers is {}; it must be between 1 and 256 (each takes ~19 MiB while it hashes)",
                self.login.hash_workers
            ));
        }
        if self.login.delay_base.is_zero() || self.login.delay_max < self.login.delay_base {
            return bad(
                "--login-delay-base-ms must be above 0 and at most --login-delay-max-ms".into(),
            );
        }
        if self.advertise_host.is_empty() {
            return bad("--advertise-host must not be empty".into());
        }
        Ok(())
    }

    /// The WebSocket URL clients of this node use.
    pub fn ws_url(&self) -> String {
        format!(
            "ws://{}:{}/v1/ws",
            self.advertise_host,
            self.http_addr.port()
        )
    }

    /// The client QUIC address clients of this node use.
    pub fn quic_url(&self) -> String {
        format!("{}:{}", self.advertise_host, self.quic_addr.port())
    }
}

fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// The default `--max-connections`: what the open-file limit leaves after 1024 descriptors
/// for the store, peers and QUIC, at least 64 and at most 100,000. (`serve` raises the soft
/// limit to the hard one before reading it.)
fn default_max_connections() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(soft.saturating_sub(1024))
        .unwrap_or(usize::MAX)
        .clamp(64, 100_000)
}

/// Caps and timeouts of the HTTP/WebSocket listener (`--max-connections*`, `--http-*`).
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Most client connections from one source address at once.
    pub max_per_ip: usize,
    /// Time to send a whole request head, from when the connection awaits one.
    pub header_timeout: Duration,
    /// Time without a byte either way before an HTTP connection is closed.
    pub idle_timeout: Duration,
}

/// Password hashing, login throttling and signup limits (`--hash-*`, `--login-*`,
/// `--signups-*`).
#[derive(Clone, Debug)]
pub struct LoginLimits {
    /// Hashes computed at once.
    pub hash_workers: usize,
    /// Hashes that may wait for a worker.
    pub hash_queue: usize,
    /// Wrong passwords for one username before its logins are delayed.
    pub free_failures: u32,
    /// Failed logins from one source address before its logins are delayed.
    pub free_failures_per_ip: u32,
    /// The first delay; doubled per further failure.
    pub delay_base: Duration,
    /// The longest delay.
    pub delay_max: Duration,
    /// Signups per source address per hour; 0: unlimited.
    pub signups_per_ip_per_hour: u32,
}

/// Settings of the push worker (`--push-*`).
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// Whether notifications carry a preview of the body.
    pub preview: bool,
    /// How long one webhook POST may take.
    pub timeout: Duration,
    /// The first retry's delay; it doubles with each attempt.
    pub retry_base: Duration,
    /// Attempts before a notification is dropped as a dead letter.
    pub max_attempts: u32,
    /// Internal targets the operator allows (`--push-allow-hosts`).
    pub allow_hosts: Vec<String>,
    /// The signing key; `None`: derived from the cluster secret.
    pub signing_secret: Option<Redacted<String>>,
}

/// A secret that `Debug` does not print.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Redacted<T>(pub T);

impl std::str::FromStr for Redacted<String> {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Redacted(s.to_string()))
    }
}

impl<T> std::fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_host_names() {
        let a = listen_addr("localhost:8081").unwrap();
        assert!(a.ip().is_loopback() && a.port() == 8081, "{a}");
        assert_eq!(
            listen_addr("127.0.0.2:9").unwrap().to_string(),
            "127.0.0.2:9"
        );
        assert!(listen_addr("localhost")
            .unwrap_err()
            .contains("expected host:port"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "http_addr = \"localhost:8082\"\n").unwrap();
        let c = Config::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.http_addr.port(), 8082);
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::resolve(ServeArgs::default()).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("chatnode-data"));
        assert_eq!(c.cluster_dir, PathBuf::from("chatnode-data/cluster"));
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "node_id = 7\nheartbeat_timeout_ms = 9000\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            node_id: Some(9),
            ..Default::default()
        };
        let c = Config::resolve(args).unwrap();
        assert_eq!(c.node_id, 9);
        assert_eq!(c.heartbeat_timeout, Duration::from_millis(9000));

        std::fs::write(&path, "nod_id = 7\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("nod_id"), "{err}");
    }

    #[test]
    fn the_push_signing_secret_is_not_in_debug_output() {
        let c = Config::resolve(ServeArgs {
            push_signing_secret: Some(Redacted("very-secret-signing-key".into())),
            push_allow_hosts: vec!["127.0.0.0/8".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(!format!("{c:?}").contains("very-secret"), "{c:?}");
        let err = Config::resolve(ServeArgs {
            push_allow_hosts: vec!["what?".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("push-allow-hosts"), "{err}");
    }

    #[test]
    fn bad_settings_are_refused_with_a_sentence() {
        let err = Config::resolve(ServeArgs {
            node_id: Some(1024),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("between 0 and 1023"));
        let err = Config::resolve(ServeArgs {
            heartbeat_timeout_ms: Some(10),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("heartbeat"));
        let err = Config::resolve(ServeArgs {
            max_concurrent_sends: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--max-concurrent-sends"));
    }
}
