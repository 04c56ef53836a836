//! `chatnode client`: a terminal chat client on the `client-proto` library. Lines starting
//! with `/` are commands; any other line is sent to the open conversation.
//!
//! The password is asked for on the terminal (or read from a file or CHATNODE_PASSWORD). The
//! device's login is saved (0600, in the state dir) and reused by later runs, so running the
//! client again does not add devices to the account; `/logout` ends the device.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use client_proto::client::{
    ChatClient, ClientError, ClientOptions, ConnectOptions, Connection, Event, HttpClient,
};
use client_proto::codec::Codec;
use client_proto::http::{FriendState, LoginResponse};
use client_proto::ids::{ConversationId, GroupId, UserId};
use client_proto::{Message, PresenceStatus, Recipient};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Flags of `chatnode client`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The node's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Your username.
    #[arg(long)]
    pub user: String,
    /// Read the password from the first line of this file, instead of asking for it.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The password, for scripts only: other local users can read a command line (`ps`);
    /// prefer the prompt, --password-file or the CHATNODE_PASSWORD variable.
    #[arg(long, env = "CHATNODE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Create the account first (the password is asked for twice).
    #[arg(long)]
    pub signup: bool,
    /// Chat over QUIC (the node's `quic_addr`) instead of WebSocket.
    #[arg(long)]
    pub quic: bool,
    /// PEM file of the cluster CA, for QUIC: a node started with defaults keeps it in
    /// chatnode-data/cluster/ca.pem [default: the public web roots].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Where this device's login is kept between runs (one file per server and user, readable
    /// only by you), so that later runs are the same device
    /// [default: $XDG_STATE_HOME/chatnode, else ~/.local/state/chatnode].
    #[arg(long, env = "CHATNODE_CLIENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

const HELP: &str = "commands:
  /open <username>                         talk to a user
  /open g:<group id>                       talk in a group (/groups lists their ids)
  /history                                 older messages of the open conversation
  /friends                                 your friends and whether they are online
  /add <username>                          ask someone to be friends, or accept their request
  /requests                                friend requests to and from you
  /remove <username>                       unfriend, or decline or cancel a request
  /groups                                  your groups
  /newgroup <name> <user>[,<user>...]      make a group with these members
  /logout                                  log this device out (the next run asks for the password) and quit
  /quit                                    quit; the next run is this device again
  /help                                    this list
anything else is sent to the open conversation";

/// How long the first connection may take before the client gives up and says why.
const FIRST_CONNECT: Duration = Duration::from_secs(10);
/// How long quitting waits for the connection to close and the logout to answer.
const QUIT_WAIT: Duration = Duration::from_secs(3);

struct Ui {
    api: HttpClient,
    token: String,
    me: UserId,
    names: HashMap<UserId, String>,
    groups: HashMap<GroupId, String>,
    open: Option<(Recipient, ConversationId, String)>,
    oldest: Option<client_proto::MessageId>,
}

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

/// A message time in the local time zone.
fn clock(ts_ms: u64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_millis_opt(ts_ms as i64).single() {
        Some(t) => t.format("%H:%M:%S").to_string(),
        None => "--:--:--".into(),
    }
}

/// A device's login kept between runs: `<state dir>/<server>@<user>.json`, mode 0600.
struct SavedLogin {
    path: PathBuf,
}

impl SavedLogin {
    fn new(args: &ClientArgs) -> Option<SavedLogin> {
        let dir = args.state_dir.clone().or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
                .map(|d| d.join("chatnode"))
        })?;
        let server: String = args
            .server
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Some(SavedLogin {
            path: dir.join(format!("{server}@{}.json", args.user)),
        })
    }

    fn load(&self) -> Option<LoginResponse> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn store(&self, login: &LoginResponse) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = self.path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot make {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        file.write_all(serde_json::to_string(login)?.as_bytes())?;
        Ok(())
    }

    fn forget(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The password: from --password-file, --password or CHATNODE_PASSWORD, else asked for on
/// the terminal (twice for a signup).
fn password(args: &ClientArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_string());
    }
    if let Some(p) = &args.password {
        return Ok(p.clone());
    }
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!(
            "no password: run in a terminal to be asked for it, or pass --password-file FILE, \
             or set CHATNODE_PASSWORD"
        );
    }
    let first = ask_hidden(&format!("password for {}: ", args.user))
        .context("cannot read the password from the terminal")?;
    if args.signup {
        let again = ask_hidden("the same password again: ")
            .context("cannot read the password from the terminal")?;
        if again != first {
            bail!("the two passwords differ; nothing was created");
        }
    }
    Ok(first)
}

/// Asks for a line on the terminal with echo off. Echo goes off before the prompt is
/// written, so nothing typed after the prompt shows; the terminal's modes are put back after.
fn ask_hidden(prompt: &str) -> std::io::Result<String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    use std::io::BufRead;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let before = tcgetattr(&tty)?;
    let mut hidden = before.clone();
    hidden.local_modes.remove(LocalModes::ECHO);
    hidden.local_modes.insert(LocalModes::ECHONL);
    tcsetattr(&tty, OptionalActions::Now, &hidden)?;
    let read = (|| {
        (&tty).write_all(prompt.as_bytes())?;
        (&tty).flush()?;
        let mut line = String::new();
        std::io::BufReader::new(&tty).read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    })();
    tcsetattr(&tty, OptionalActions::Now, &before)?;
    read
}

/// Whether `e` is the server saying the token is no good.
fn unauthorized(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused(b) if b.code == client_proto::ErrorCode::Unauthorized)
}

/// This device's login: the saved one while the server still takes it, else a new login
/// (after a signup if asked), saved for the next run.
async fn log_in(api: &HttpClient, args: &ClientArgs) -> anyhow::Result<LoginResponse> {
    let saved = SavedLogin::new(args);
    if let Some(login) = saved.as_ref().and_then(SavedLogin::load) {
        match api.me(&login.token).await {
            Ok(_) => return Ok(login),
            Err(e) if unauthorized(&e) => {
                say("this device's saved login has ended; logging in again");
                if let Some(s) = &saved {
                    s.forget();
                }
            }
            Err(e) => return Err(reach_error(&args.server, e)),
        }
    }
    let password = password(args)?;
    if args.signup {
        match api.signup(&args.user, &password).await {
            Ok(_) => say(format!("signed up as {}", args.user)),
            Err(ClientError::Refused(b)) if b.code == client_proto::ErrorCode::Conflict => {
                say(format!("{} already exists; logging in", args.user))
            }
            Err(ClientError::Refused(b)) => bail!("cannot sign up: {}", b.message),
            Err(e) => return Err(reach_error(&args.server, e)),
        }
    }
    let login = match api.login(&args.user, &password, None).await {
        Ok(l) => l,
        Err(ClientError::Refused(b)) => bail!("cannot log in: {}", b.message),
        Err(e) => return Err(reach_error(&args.server, e)),
    };
    if let Some(s) = &saved {
        if let Err(e) = s.store(&login) {
            say(format!(
                "note: this login is not saved ({e:#}); the next run logs in anew"
            ));
        }
    }
    Ok(login)
}

fn reach_error(server: &str, e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("cannot reach the node at {server}: {e} (is `chatnode serve` running there? --server sets the address)")
}

/// Connects once, to say what is wrong before the chat starts (the chat client itself
/// reconnects quietly forever).
async fn check_connection(url: &str, token: &str, connect: &ConnectOptions) -> anyhow::Result<()> {
    let attempt = Connection::connect_with(url, token, connect);
    match tokio::time::timeout(FIRST_CONNECT, attempt).await {
        Ok(Ok(conn)) => {
            conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("UnknownIssuer") || text.contains("certificate") {
                bail!(
                    "the node's certificate is not trusted ({text}): pass --ca <cluster dir>/ca.pem \
                     (a node started with defaults keeps it in chatnode-data/cluster/ca.pem)"
                )
            }
            bail!("cannot connect to {url}: {text}")
        }
        Err(_) => bail!(
            "cannot connect to {url}: no answer within {FIRST_CONNECT:?} (for QUIC, is the node's \
             UDP port reachable?)"
        ),
    }
}

/// Runs the client until `/quit`, `/logout`, Ctrl-C or end of input.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let api = HttpClient::new(args.server.clone());
    let login = log_in(&api, &args).await?;
    let mut opts = ClientOptions::new(api.ws_url(), login.token.clone());
    if args.quic {
        opts.url = format!("quic://{}", login.node.quic_addr);
        let ca_pem = match &args.ca {
            Some(p) => {
                Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)
            }
            None => None,
        };
        opts.connect = ConnectOptions {
            codec: Codec::Binary,
            ca_pem,
        };
    }
    check_connection(&opts.url, &opts.token, &opts.connect).await?;
    let transport = if args.quic { "QUIC" } else { "WebSocket" };
    let mut chat = ChatClient::start(opts);
    let mut ui = Ui {
        api,
        token: login.token,
        me: login.user_id,
        names: HashMap::from([(login.user_id, args.user.clone())]),
        groups: HashMap::new(),
        open: None,
        oldest: None,
    };
    ui.load_friends().await;
    say(format!(
        "logged in as {} over {transport}; /help for commands",
        args.user
    ));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut logout = false;
    let ended = loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match ui.command(&chat, line.trim()).await {
                    Ok(Next::Stay) => {}
                    Ok(Next::Quit) => break Ok(()),
                    Ok(Next::Logout) => {
                        logout = true;
                        break Ok(());
                    }
                    Err(e) => say(format!("error: {e:#}")),
                },
                Ok(None) | Err(_) => break Ok(()),
            },
            _ = tokio::signal::ctrl_c() => break Ok(()),
            event = chat.next_event() => match event {
                Some(ev) => ui.event(ev).await,
                None => break Err(anyhow::anyhow!(
                    "the connection ended for good (was this device logged out? run again to log in)"
                )),
            },
        }
    };
    let _ = tokio::time::timeout(QUIT_WAIT, chat.shutdown()).await;
    if logout {
        if let Some(s) = SavedLogin::new(&args) {
            s.forget();
        }
        match tokio::time::timeout(QUIT_WAIT, ui.api.logout(&ui.token)).await {
            Ok(Ok(())) => say("logged out"),
            Ok(Err(e)) => say(format!("could not log out: {e}")),
            Err(_) => say("could not log out: the node did not answer"),
        }
    }
    ended
}

/// What the loop does after a command.
enum Next {
    Stay,
    Quit,
    Logout,
}

/// `Err` with the usage line of a command.
fn usage(line: &str) -> anyhow::Result<Next> {
    bail!("usage: {line}")
}

impl Ui {
    /// A user's name, looked up once.
    async fn name(&mut self, id: UserId) -> String {
        if let Some(n) = self.names.get(&id) {
            return n.clone();
        }
        match self.api.user_by_id(&self.token, id).await {
            Ok(p) => {
                self.names.insert(id, p.username.clone());
                p.username
            }
            Err(_) => format!("user {id}"),
        }
    }

    /// A group's name, looked up once.
    async fn group_name(&mut self, id: GroupId) -> String {
        if let Some(n) = self.groups.get(&id) {
            return n.clone();
        }
        match self.api.group(&self.token, id).await {
            Ok(g) => {
                self.groups.insert(id, g.name.clone());
                g.name
            }
            Err(_) => format!("g:{id}"),
        }
    }

    async fn load_friends(&mut self) {
        if let Ok(friends) = self.friends().await {
            for f in friends {
                self.names.insert(f.0, f.1);
            }
        }
    }

    async fn friends(&self) -> Result<Vec<(UserId, String, String)>, ClientError> {
        let list: Vec<serde_json::Value> = self
            .api
            .request(
                reqwest::Method::GET,
                "/v1/friends",
                Some(&self.token),
                None::<&()>,
            )
            .await?;
        Ok(list
            .iter()
            .filter_map(|f| {
                let id = f["user_id"].as_str()?.parse().ok()?;
                let name = f["username"].as_str()?.to_string();
                let status = f["status"].as_str().unwrap_or("?").to_string();
                Some((UserId(id), name, status))
            })
            .collect())
    }

    /// `[time] sender: body`, with the conversation's label (`[#group]` or `[@user]`) when
    /// it is not the open one.
    async fn print_message(&mut self, m: &Message) {
        let open = self.open.as_ref().map(|o| o.1);
        let label = if open == Some(m.conversation) {
            String::new()
        } else {
            match m.conversation {
                ConversationId::Group(g) => format!("[#{}] ", self.group_name(g).await),
                ConversationId::Direct { low, high } => {
                    let other = if low == self.me { high } else { low };
                    format!("[@{}] ", self.name(other).await)
                }
            }
        };
        let from = self.name(m.from).await;
        say(format!("[{}] {label}{from}: {}", clock(m.ts), m.body));
    }

    async fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected { node_id } => say(format!("* connected to node {node_id}")),
            Event::Disconnected { reason } => {
                say(format!("* disconnected ({reason}); reconnecting"))
            }
            Event::Moving { to: Some(to) } => {
                say(format!("* the node is draining; moving to {to}"))
            }
            Event::Moving { to: None } => say("* the node is draining; reconnecting"),
            Event::Message(m) => self.print_message(&m).await,
            Event::Presence {
                user_id, status, ..
            } => {
                let s = if status == PresenceStatus::Online {
                    "online"
                } else {
                    "offline"
                };
                let name = self.name(user_id).await;
                say(format!("* {name} is {s}"));
            }
            Event::Error(e) => say(format!("error: {}", e.message)),
        }
    }

    /// Handles one input line.
    async fn command(&mut self, chat: &ChatClient, line: &str) -> anyhow::Result<Next> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match cmd {
            "" => {}
            "/quit" | "/exit" => return Ok(Next::Quit),
            "/logout" => return Ok(Next::Logout),
            "/help" => say(HELP),
            "/open" if rest.is_empty() => return usage("/open <username> | /open g:<group id>"),
            "/open" => self.open(rest).await?,
            "/history" => self.history().await?,
            "/friends" => {
                let friends = self.friends().await?;
                if friends.is_empty() {
                    say("no friends yet: /add <username>");
                }
                for (_, name, status) in friends {
                    say(format!("  {name:<32} {status}"));
                }
            }
            "/add" if rest.is_empty() || rest.contains(' ') => return usage("/add <username>"),
            "/add" => {
                let user = self.api.user(&self.token, rest).await?;
                let state = self.api.befriend(&self.token, user.user_id).await?;
                self.names.insert(user.user_id, user.username.clone());
                match state {
                    FriendState::Friends => say(format!("{} is now your friend", user.username)),
                    FriendState::Requested => say(format!(
                        "friend request sent to {}; you are friends once they /add you too",
                        user.username
                    )),
                }
            }
            "/remove" if rest.is_empty() || rest.contains(' ') => {
                return usage("/remove <username>")
            }
            "/remove" => {
                let user = self.api.user(&self.token, rest).await?;
                self.api.unfriend(&self.token, user.user_id).await?;
                say(format!("{} is not your friend (nor asking)", user.username));
            }
            "/requests" => {
                let r = self.api.friend_requests(&self.token).await?;
                if r.incoming.is_empty() && r.outgoing.is_empty() {
                    say("no friend requests");
                }
                for p in &r.incoming {
                    say(format!(
                        "  from {:<28} /add {} to accept",
                        p.username, p.username
                    ));
                }
                for p in &r.outgoing {
                    say(format!("  to   {:<28} waiting", p.username));
                }
            }
            "/groups" => {
                let groups = self.api.groups(&self.token).await?;
                if groups.is_empty() {
                    say("no groups yet: /newgroup <name> <user>[,<user>...]");
                }
                for g in groups {
                    self.groups.insert(g.group_id, g.name.clone());
                    say(format!(
                        "  g:{:<22} {:<32} {} members",
                        g.group_id,
                        g.name,
                        g.members.len()
                    ));
                }
            }
            "/newgroup" => {
                let Some((name, users)) = rest.split_once(' ') else {
                    return usage("/newgroup <name> <user>[,<user>...]");
                };
                let mut ids = Vec::new();
                for u in users.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                    let p = self.api.user(&self.token, u).await?;
                    self.names.insert(p.user_id, p.username);
                    ids.push(p.user_id);
                }
                let g = self.api.create_group(&self.token, name, &ids).await?;
                self.groups.insert(g.group_id, g.name.clone());
                say(format!(
                    "made group #{} (g:{}, {} members); /open g:{}",
                    g.name,
                    g.group_id,
                    g.members.len(),
                    g.group_id
                ));
            }
            c if c.starts_with('/') => say(format!("unknown command {c}; /help lists them")),
            _ => {
                let Some((to, _, _)) = &self.open else {
                    say("open a conversation first: /open <username>");
                    return Ok(Next::Stay);
                };
                let ack = chat.send(*to, line).await?;
                let me = self.name(self.me).await;
                say(format!("[{}] {me}: {line}  (sent)", clock(ack.ts)));
            }
        }
        Ok(Next::Stay)
    }

    async fn open(&mut self, target: &str) -> anyhow::Result<()> {
        let (to, conv, label) = if let Some(g) = target.strip_prefix("g:") {
            let id: GroupId = g
                .parse()
                .context("usage: /open g:<group id> (a number; /groups lists them)")?;
            let info = self.api.group(&self.token, id).await?;
            self.groups.insert(id, info.name.clone());
            (
                Recipient::Group(id),
                ConversationId::Group(id),
                format!("#{}", info.name),
            )
        } else {
            let p = self.api.user(&self.token, target).await?;
            self.names.insert(p.user_id, p.username.clone());
            (
                Recipient::User(p.user_id),
                ConversationId::direct(self.me, p.user_id),
                p.username,
            )
        };
        self.open = Some((to, conv, label.clone()));
        self.oldest = None;
        say(format!("--- {label} ---"));
        self.history().await
    }

    async fn history(&mut self) -> anyhow::Result<()> {
        let Some((_, conv, _)) = &self.open else {
            bail!("open a conversation first: /open <username>");
        };
        let page = self
            .api
            .history(&self.token, *conv, self.oldest, Some(20))
            .await?;
        if page.messages.is_empty() {
            say(if self.oldest.is_some() {
                "(no older messages)"
            } else {
                "(no messages yet)"
            });
            return Ok(());
        }
        for m in page.messages.iter().rev() {
            self.print_message(m).await;
        }
        self.oldest = page.messages.last().map(|m| m.message_id).or(self.oldest);
        if page.next_before.is_some() {
            say("(/history for older messages)");
        } else {
            say("(the start of the conversation)");
        }
        Ok(())
    }
}
