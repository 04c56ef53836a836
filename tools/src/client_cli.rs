//! `chatnode client`: a terminal chat client on the `client-proto` library. Lines starting
//! with `/` are commands; any other line is sent to the open conversation.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use client_proto::client::{
    ChatClient, ClientError, ClientOptions, ConnectOptions, Event, HttpClient,
};
use client_proto::codec::Codec;
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
    /// Your password, from the environment (`CHATNODE_PASSWORD=... chatnode client ...`).
    /// As a flag (`--password`) it is UNSAFE: other users see it in `ps` and it stays in
    /// your shell history. Without it (and without --password-file) the client asks for it
    /// as the first line of its input.
    #[arg(long, env = "CHATNODE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A file whose first line is your password.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Create the account first.
    #[arg(long)]
    pub signup: bool,
    /// Chat over QUIC (the node's `quic_addr`) instead of WebSocket.
    #[arg(long)]
    pub quic: bool,
    /// PEM file of the cluster CA, for QUIC (default: the public web roots).
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

const HELP: &str = "commands:
  /open <username> | /open g:<group id>   talk to a user or a group
  /history                                 older messages of the open conversation
  /friends                                 your friends and their status
  /add <username>                          befriend someone
  /groups                                  your groups
  /newgroup <name> <user>[,<user>...]      make a group
  /help, /quit
anything else is sent to the open conversation";

struct Ui {
    api: HttpClient,
    token: String,
    me: UserId,
    names: HashMap<UserId, String>,
    open: Option<(Recipient, ConversationId, String)>,
    oldest: Option<client_proto::MessageId>,
}

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

fn clock(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Runs the client until `/quit` or end of input.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let api = HttpClient::new(args.server.clone());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let password = match (&args.password, &args.password_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        (None, None) => {
            eprint!("password for {}: ", args.user);
            lines
                .next_line()
                .await
                .context("cannot read the password")?
                .context("no password given (set CHATNODE_PASSWORD or type it)")?
        }
    };
    if args.signup {
        match api.signup(&args.user, &password).await {
            Ok(_) => say(format!("signed up as {}", args.user)),
            Err(ClientError::Refused(b)) if b.code == client_proto::ErrorCode::Conflict => {
                say(format!("{} already exists; logging in", args.user))
            }
            Err(e) => return Err(e).context("signup failed"),
        }
    }
    let login = api
        .login(&args.user, &password, None)
        .await
        .context("login failed")?;
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
    let transport = if args.quic { "QUIC" } else { "WebSocket" };
    let mut chat = ChatClient::start(opts);
    let mut ui = Ui {
        api,
        token: login.token,
        me: login.user_id,
        names: HashMap::from([(login.user_id, args.user.clone())]),
        open: None,
        oldest: None,
    };
    ui.load_friends().await;
    say(format!(
        "logged in as {} over {transport}; /help for commands",
        args.user
    ));
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match ui.command(&chat, line.trim()).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => say(format!("error: {e:#}")),
                },
                Ok(None) | Err(_) => break,
            },
            event = chat.next_event() => match event {
                Some(ev) => ui.event(ev),
                None => bail!("the connection ended for good (was the token revoked?)"),
            },
        }
    }
    chat.shutdown().await;
    Ok(())
}

impl Ui {
    fn name(&self, id: UserId) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("user {id}"))
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

    fn print_message(&self, m: &Message) {
        let place = match m.group {
            Some(g) => format!("[g:{g}] "),
            None => String::new(),
        };
        say(format!(
            "[{}] {place}{}: {}",
            clock(m.ts),
            self.name(m.from),
            m.body
        ));
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected { node_id } => say(format!("* connected to node {node_id}")),
            Event::Disconnected { reason } => {
                say(format!("* disconnected ({reason}); reconnecting"))
            }
            Event::Message(m) => self.print_message(&m),
            Event::Presence {
                user_id, status, ..
            } => {
                let s = if status == PresenceStatus::Online {
                    "online"
                } else {
                    "offline"
                };
                say(format!("* {} is {s}", self.name(user_id)));
            }
            Event::Error(e) => say(format!("error: {}", e.message)),
        }
    }

    /// Handles one input line; false means quit.
    async fn command(&mut self, chat: &ChatClient, line: &str) -> anyhow::Result<bool> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match cmd {
            "" => {}
            "/quit" | "/exit" => return Ok(false),
            "/help" => say(HELP),
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
            "/add" => {
                let user = self.api.user(&self.token, rest).await?;
                let path = format!("/v1/friends/{}", user.user_id);
                self.api
                    .request_raw(reqwest::Method::PUT, &path, Some(&self.token), None::<&()>)
                    .await?;
                self.names.insert(user.user_id, user.username.clone());
                say(format!("{} is now your friend", user.username));
            }
            "/groups" => {
                for g in self.api.groups(&self.token).await? {
                    say(format!(
                        "  g:{:<22} {:<32} {} members",
                        g.group_id,
                        g.name,
                        g.members.len()
                    ));
                }
            }
            "/newgroup" => {
                let (name, users) = rest
                    .split_once(' ')
                    .context("usage: /newgroup <name> <user>[,<user>...]")?;
                let mut ids = Vec::new();
                for u in users.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                    let p = self.api.user(&self.token, u).await?;
                    self.names.insert(p.user_id, p.username);
                    ids.push(p.user_id);
                }
                let g = self.api.create_group(&self.token, name, &ids).await?;
                say(format!(
                    "made group g:{} ({} members); /open g:{}",
                    g.group_id,
                    g.members.len(),
                    g.group_id
                ));
            }
            c if c.starts_with('/') => say(format!("unknown command {c}; /help lists them")),
            _ => {
                let Some((to, _, _)) = &self.open else {
                    say("open a conversation first: /open <username>");
                    return Ok(true);
                };
                let ack = chat.send(*to, line).await?;
                say(format!(
                    "[{}] {}: {line}  (sent)",
                    clock(ack.ts),
                    self.name(self.me)
                ));
            }
        }
        Ok(true)
    }

    async fn open(&mut self, target: &str) -> anyhow::Result<()> {
        let (to, conv, label) = if let Some(g) = target.strip_prefix("g:") {
            let id: GroupId = g.parse().context("a group id is a number")?;
            let info = self.api.group(&self.token, id).await?;
            (
                Recipient::Group(id),
                ConversationId::Group(id),
                format!("group {}", info.name),
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
            bail!("open a conversation first");
        };
        let page = self
            .api
            .history(&self.token, *conv, self.oldest, Some(20))
            .await?;
        for m in page.messages.iter().rev() {
            self.print_message(m);
        }
        self.oldest = page.messages.last().map(|m| m.message_id).or(self.oldest);
        if page.next_before.is_some() {
            say("(/history for older messages)");
        }
        Ok(())
    }
}
