//! `chatnode client`, driven through its stdin and stdout: two people sign up, befriend (a
//! request and an accept), exchange messages and quit, over WebSocket and over QUIC; then in a
//! real terminal (a pty from `script`): the password typed at a prompt, a group, presence,
//! usage lines; repeated runs are one device; QUIC without the CA says how to fix it.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chat_tests::{chatnode_bin, TestNode};

struct Terminal {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// A client's saved logins live here, not in the home dir of whoever runs the tests.
fn state_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// `chatnode client` for `user` on `node`, its saved login in [`state_dir`].
fn client(node: &TestNode, user: &str) -> Command {
    let mut cmd = Command::new(chatnode_bin());
    cmd.args(["client", "--server", &node.http, "--user", user])
        .env("CHATNODE_CLIENT_STATE_DIR", state_dir())
        .env_remove("CHATNODE_PASSWORD");
    cmd
}

impl Terminal {
    fn start(node: &TestNode, user: &str, extra: &[&str]) -> Terminal {
        let mut child = client(node, user)
            .arg("--signup")
            .args(extra)
            .env("CHATNODE_PASSWORD", format!("password-{user}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        Terminal {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for an output line containing `text`.
    fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {text:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn quit(mut self) {
        self.type_line("/quit");
        self.quit_done();
    }

    /// Waits for the client to exit successfully.
    fn quit_done(mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status:?}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("the client did not quit");
    }
}

fn converse(node: &TestNode, extra: &[&str], a: &str, b: &str) {
    let mut alice = Terminal::start(node, a, extra);
    alice.expect("connected to node");
    let mut bob = Terminal::start(node, b, extra);
    bob.expect("connected to node");

    // Friendship takes a request and an accept.
    bob.type_line(&format!("/add {a}"));
    bob.expect(&format!("friend request sent to {a}"));
    alice.type_line("/requests");
    alice.expect(&format!("from {b}"));
    alice.type_line(&format!("/add {b}"));
    alice.expect(&format!("{b} is now your friend"));
    // bob was online already: friends list shows it; the next transition arrives live.
    alice.type_line("/friends");
    let line = alice.expect(b);
    assert!(line.contains("online"), "{line}");
    alice.type_line("/nonsense");
    alice.expect("unknown command /nonsense");
    alice.type_line("hello?");
    alice.expect("open a conversation first");
    alice.type_line("/open nobody-here");
    alice.expect("error:");
    alice.type_line(&format!("/open {b}"));
    alice.expect(&format!("--- {b} ---"));
    alice.type_line("hello from the terminal");
    alice.expect("(sent)");
    let got = bob.expect("hello from the terminal");
    assert!(
        got.contains(&format!("{a}: hello from the terminal")),
        "{got}"
    );
    bob.type_line(&format!("/open {a}"));
    bob.expect(&format!("{a}: hello from the terminal")); // history
    bob.type_line("and back");
    alice.expect(&format!("{b}: and back"));
    bob.quit();
    alice.expect(&format!("{b} is offline"));
    alice.quit();
    // Quitting keeps the device for the next run; `/logout` ends it.
    assert_eq!(devices_after_a_new_login(node, a), 2, "{a}");
    let mut bob = Terminal::start(node, b, extra);
    bob.expect("connected to node");
    bob.type_line("/logout");
    bob.expect("logged out");
    bob.quit_done();
    assert_eq!(devices_after_a_new_login(node, b), 1, "{b}");
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// How many devices `user` has once logged in again.
fn devices_after_a_new_login(node: &TestNode, user: &str) -> usize {
    block_on(async {
        let api = node.api();
        let login = api
            .login(user, &format!("password-{user}"), None)
            .await
            .unwrap();
        api.devices(&login.token).await.unwrap().len()
    })
}

#[test]
fn two_terminals_chat_over_websocket() {
    let node = TestNode::start(&[]);
    converse(&node, &[], "alice", "bob");
}

#[test]
fn two_terminals_chat_over_quic() {
    let node = TestNode::start(&[]);
    let ca = node.data_dir().join("cluster").join("ca.pem");
    converse(
        &node,
        &["--quic", "--ca", ca.to_str().unwrap()],
        "carol",
        "dave",
    );
}

/// `chatnode client` in a real terminal: `script` gives it a pty, so the password is asked
/// for with echo off, as a person would see it. Output is read as it comes (a prompt has
/// no newline).
struct Pty {
    child: Child,
    stdin: ChildStdin,
    chunks: mpsc::Receiver<String>,
    text: String,
    /// How much of `text` earlier expectations consumed.
    at: usize,
}

impl Pty {
    fn start(node: &TestNode, user: &str, extra: &[&str]) -> Pty {
        let client = client(node, user);
        let mut line = format!("exec {}", chatnode_bin().display());
        for arg in client
            .get_args()
            .chain(extra.iter().map(std::ffi::OsStr::new))
        {
            line.push_str(&format!(" '{}'", arg.to_str().unwrap()));
        }
        let mut child = Command::new("script")
            .args(["-q", "-e", "-f", "-c", &line, "/dev/null"])
            .env("CHATNODE_CLIENT_STATE_DIR", state_dir())
            .env_remove("CHATNODE_PASSWORD")
            .env("TERM", "dumb")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script(1) from util-linux");
        let (tx, chunks) = mpsc::channel();
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0
                        || tx
                            .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                            .is_err()
                    {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        Pty {
            child,
            stdin,
            chunks,
            text: String::new(),
            at: 0,
        }
    }

    fn type_line(&mut self, line: &str) {
        write!(self.stdin, "{line}\r").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits until `text` appears after what earlier expectations matched; returns its line.
    fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self.text[self.at..].find(text) {
                let start = self.at + i;
                let line_start = self.text[..start].rfind('\n').map_or(0, |p| p + 1);
                let end = self.text[start..]
                    .find('\n')
                    .map_or(self.text.len(), |p| start + p);
                self.at = start + text.len();
                return self.text[line_start..end].trim_end().to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&chunk),
                Err(_) => panic!("no {text:?} in the terminal; it shows:\n{}", self.text),
            }
        }
    }

    /// Types `/quit` and waits for the exit; returns the exit code.
    fn quit(mut self) -> Option<i32> {
        self.type_line("/quit");
        self.wait()
    }

    fn wait(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!(
            "the client did not exit; the terminal shows:\n{}",
            self.text
        );
    }
}

#[test]
fn a_new_user_in_a_real_terminal() {
    let node = TestNode::start(&[]);
    let mut erin = Pty::start(&node, "erin", &["--signup"]);
    erin.expect("password for erin:");
    erin.type_line("erin's secret");
    erin.expect("the same password again:");
    erin.type_line("erin's secret");
    erin.expect("signed up as erin");
    erin.expect("connected to node");
    assert!(
        !erin.text.contains("erin's secret"),
        "the password was echoed:\n{}",
        erin.text
    );
    let mut fred = Pty::start(&node, "fred", &["--signup"]);
    fred.expect("password for fred:");
    fred.type_line("fred-pw-1");
    fred.expect("the same password again:");
    fred.type_line("fred-pw-1");
    fred.expect("connected to node");

    // Misuse answers with the usage line; /help lists every command.
    erin.type_line("/add");
    erin.expect("usage: /add <username>");
    erin.type_line("/open");
    erin.expect("usage: /open <username>");
    erin.type_line("/help");
    for command in ["/history", "/newgroup <name>", "/logout", "/quit"] {
        erin.expect(command);
    }

    // Friends, presence, chat both ways.
    erin.type_line("/add fred");
    erin.expect("friend request sent to fred");
    fred.type_line("/add erin");
    fred.expect("erin is now your friend");
    erin.type_line("/open fred");
    erin.expect("--- fred ---");
    erin.expect("(no messages yet)");
    erin.type_line("/history");
    erin.expect("(no messages yet)");
    erin.type_line("hi fred");
    erin.expect("(sent)");
    let got = fred.expect("hi fred");
    assert!(got.contains("[@erin] erin: hi fred"), "labelled: {got}");
    fred.type_line("/open erin");
    fred.expect("--- erin ---");
    fred.type_line("hi erin");
    let got = erin.expect("hi erin");
    assert!(got.contains("fred: hi erin"), "{got}");

    // A group; its messages are labelled while the direct conversation is open.
    fred.type_line("/newgroup climbers erin");
    let made = fred.expect("made group #climbers");
    let id = made
        .split("/open ")
        .nth(1)
        .map(|s| s.trim().to_string())
        .unwrap();
    fred.type_line(&format!("/open {id}"));
    fred.expect("--- #climbers ---");
    fred.type_line("rope check");
    let got = erin.expect("rope check");
    assert!(got.contains("[#climbers] fred: rope check"), "{got}");

    // fred leaves: erin sees it.
    assert_eq!(fred.quit(), Some(0));
    erin.expect("fred is offline");
    assert_eq!(erin.quit(), Some(0));
}

#[test]
fn forty_runs_are_one_device() {
    let node = TestNode::start(&[]);
    for run in 0..40 {
        let mut cmd = client(&node, "gina");
        if run == 0 {
            cmd.arg("--signup");
        }
        let out = cmd
            .env("CHATNODE_PASSWORD", "password-gina")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                // End of input quits, like /quit.
                drop(child.stdin.take());
                child.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The saved login is the one device.
    assert_eq!(devices_after_a_new_login(&node, "gina"), 2);
}

#[test]
fn quic_without_the_ca_says_how_to_fix_it() {
    let node = TestNode::start(&[]);
    let out = client(&node, "hana")
        .args(["--signup", "--quic"])
        .env("CHATNODE_PASSWORD", "password-hana")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|child| child.wait_with_output())
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it exits non-zero");
    assert!(
        stderr.contains("not trusted") && stderr.contains("--ca"),
        "it says what to do: {stderr}"
    );
}
