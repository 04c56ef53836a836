//! The operator's interface of `chatnode serve`: bad settings give a sentence and a non-zero
//! exit; a second node on the same data dir or port is refused; SIGTERM stops cleanly.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn chatnode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chatnode"))
}

fn run_to_end(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_settings_exit_non_zero_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = run_to_end(
        chatnode()
            .args(["serve", "--node-id", "5000"])
            .current_dir(dir.path()),
    );
    assert_ne!(code, 0);
    assert!(
        text.contains("--node-id is 5000; it must be between 0 and 1023"),
        "{text}"
    );

    let (code, text) = run_to_end(
        chatnode()
            .args(["serve", "--http-addr", "nonsense"])
            .current_dir(dir.path()),
    );
    assert_ne!(code, 0);
    assert!(text.contains("nonsense"), "{text}");

    let (code, text) = run_to_end(chatnode().args(["serve", "--config", "/nonexistent/node.toml"]));
    assert_ne!(code, 0);
    assert!(
        text.contains("cannot read config file /nonexistent/node.toml"),
        "{text}"
    );

    let (code, text) = run_to_end(
        chatnode()
            .args(["serve", "--heartbeat-timeout-ms", "100"])
            .env("CHATNODE_HEARTBEAT_INTERVAL_MS", "5000")
            .current_dir(dir.path()),
    );
    assert_ne!(code, 0);
    assert!(
        text.contains("--heartbeat-timeout-ms (100 ms) must be longer"),
        "{text}"
    );
}

/// Starts a node on a free port and returns it with its HTTP address.
fn start(data: &std::path::Path) -> (std::process::Child, String) {
    let mut child = chatnode()
        .args(["serve", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the node exited before it was ready")
            .unwrap();
        if let Some(ready) = client_proto::ReadyLine::parse(&line) {
            break ready.http.to_string();
        }
    };
    // Keep draining stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[test]
fn a_taken_port_or_data_dir_is_refused_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (first, addr) = start(&dir.path().join("a"));
    // Killed if an assertion below fails first, so it never outlives the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut first = KillOnDrop(first);

    let (code, text) = run_to_end(
        chatnode()
            .args(["serve", "--http-addr", &addr, "--data-dir"])
            .arg(dir.path().join("b")),
    );
    assert_ne!(code, 0);
    assert!(text.contains(&format!("cannot listen on {addr}")), "{text}");

    // Other ports than the first node's (every address is checked before the data dir).
    let gossip = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, text) = run_to_end(
        chatnode()
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--quic-addr",
                "127.0.0.1:0",
            ])
            .args(["--peer-addr", "127.0.0.1:0", "--gossip-addr", &gossip])
            .arg("--data-dir")
            .arg(dir.path().join("a")),
    );
    assert_ne!(code, 0);
    assert!(
        text.contains("is another chatnode using this data dir?"),
        "{text}"
    );

    Command::new("kill")
        .arg("-TERM")
        .arg(first.0.id().to_string())
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = first.0.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGTERM did not stop the node"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
