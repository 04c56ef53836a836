//! A new user's first hour with `chatnode serve`: start-up errors say what is wrong once,
//! leave nothing behind, and listen addresses may be host names.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use chat_tests::{chatnode_bin, free_udp_port, TestNode};

/// Runs `chatnode serve` with `args` in a fresh dir; returns (exit code, stderr, stdout, the
/// data dir).
fn serve_fails(args: &[&str]) -> (Option<i32>, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(chatnode_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        dir,
    )
}

#[tokio::test]
async fn serve_on_a_taken_port_says_so_once_and_leaves_no_files() {
    let node = TestNode::start(&[]);
    let taken = node.http.trim_start_matches("http://").to_string();
    for (flag, value) in [
        ("--http-addr", taken.clone()),
        // The running node's gossip port (UDP).
        ("--gossip-addr", node_gossip(&node)),
    ] {
        let gossip = format!("127.0.0.1:{}", free_udp_port());
        let mut args = vec![
            "--http-addr",
            "127.0.0.1:0",
            "--quic-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
            "--gossip-addr",
            &gossip,
        ];
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = &value;
        let (code, stderr, stdout, dir) = serve_fails(&args);
        assert_eq!(code, Some(1), "{flag} {value}: {stderr}");
        let said = format!("cannot listen on {value}");
        assert_eq!(
            stderr.matches(&said).count() + stdout.matches(&said).count(),
            1,
            "the error once, on stderr: stderr {stderr:?} stdout {stdout:?}"
        );
        assert!(stderr.contains(&said), "{stderr}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{flag}: files left behind: {left:?}");
    }
    // The node that holds the ports serves on.
    assert!(healthy(&node).await);
}

fn node_gossip(node: &TestNode) -> String {
    node.gossip.clone()
}

/// `/healthz` answers.
async fn healthy(node: &TestNode) -> bool {
    node.api()
        .request_raw(reqwest::Method::GET, "/healthz", None, None::<&()>)
        .await
        .is_ok()
}

#[tokio::test]
async fn listen_addresses_may_be_host_names() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let gossip = format!("localhost:{}", free_udp_port());
    let http = format!("localhost:{port}");
    let mut child = Command::new(chatnode_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-addr", &http, "--gossip-addr", &gossip])
        .args(["--quic-addr", "localhost:0", "--peer-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| client_proto::ReadyLine::parse(&line));
    let ready = ready.expect("the node became ready");
    assert_eq!(ready.http.port(), port);
    assert!(ready.http.ip().is_loopback(), "{}", ready.http);
    let health = reqwest::get(format!("http://{}/healthz", ready.http)).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(health.unwrap().status().is_success());
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_wrong_log_filter_is_refused() {
    let (code, stderr, _, _dir) =
        serve_fails(&["--log", "chatnode=loud", "--http-addr", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not a log filter"), "{stderr}");
}
