//! `chatnode client`, driven through its stdin and stdout: two people sign up, befriend,
//! and exchange messages, over WebSocket and over QUIC.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
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

impl Terminal {
    fn start(node: &TestNode, user: &str, extra: &[&str]) -> Terminal {
        let mut child = Command::new(chatnode_bin())
            .args(["client", "--server", &node.http, "--user", user, "--signup"])
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

    bob.type_line(&format!("/add {a}"));
    bob.expect("is now your friend");
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

/// The README put the password on the command line, where `ps` shows it. Now, with no
/// `CHATNODE_PASSWORD`, the client asks for it and reads it as the first line typed, and
/// `--password-file` reads it from a file; neither puts it in the process's arguments.
#[test]
fn the_password_is_typed_or_read_from_a_file_not_passed_as_an_argument() {
    let node = TestNode::start(&[]);
    let spawn = |extra: &[&str]| {
        let mut child = Command::new(chatnode_bin())
            .args(["client", "--server", &node.http, "--signup"])
            .args(extra)
            .env_remove("CHATNODE_PASSWORD")
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
    };
    let mut erin = spawn(&["--user", "erin"]);
    erin.type_line("typed password of erin");
    erin.expect("logged in as erin");
    erin.quit();
    // The same password again logs in (signup says the account exists).
    let mut erin = spawn(&["--user", "erin"]);
    erin.type_line("typed password of erin");
    erin.expect("logged in as erin");
    erin.quit();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "typed password of erin\n").unwrap();
    let mut erin = spawn(&["--user", "erin", "--password-file", file.to_str().unwrap()]);
    erin.expect("logged in as erin");
    erin.quit();
}
