#![allow(clippy::unwrap_used)]
//! `chatnode bench`: every scenario at a tiny size against a node it spawns itself, through
//! the real binary. Checks the exit status and the `BENCH_JSON` line (no lost messages); no
//! timing assertions.

use std::process::Command;

/// Runs `chatnode bench <args>` and returns the parsed `BENCH_JSON` object.
fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(chat_tests::chatnode_bin())
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chatnode bench {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_JSON "))
        .unwrap_or_else(|| panic!("no BENCH_JSON line in:\n{stdout}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["failures"], serde_json::json!([]), "{json}");
    json
}

#[test]
fn direct_pairs_lose_nothing() {
    let json = bench(&[
        "direct",
        "--spawn-node",
        "--pairs",
        "2",
        "--messages",
        "25",
        "--rate",
        "200,max",
        "--duration-secs",
        "5",
    ]);
    let steps = json["results"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for s in steps {
        assert_eq!(s["sent"], 50, "{s}");
        assert_eq!(s["acked"], 50, "{s}");
        assert_eq!(s["delivered"], 50, "{s}");
        // The node's cost was read: some CPU, some bytes on disk, some flushes.
        let cost = &s["cost"];
        assert!(cost["cpu_us_per_msg"].as_f64().unwrap() > 0.0, "{s}");
        assert!(cost["disk_bytes_per_msg"].as_f64().unwrap() > 0.0, "{s}");
        assert!(cost["flushes_per_s"].as_f64().unwrap() > 0.0, "{s}");
    }
}

#[test]
fn a_spawned_cluster_is_measured_whole() {
    let json = bench(&[
        "direct",
        "--spawn-cluster",
        "2",
        "--pairs",
        "2",
        "--messages",
        "25",
        "--rate",
        "200",
        "--duration-secs",
        "5",
    ]);
    let step = &json["results"]["steps"][0];
    assert_eq!(step["delivered"], 50, "{step}");
    assert!(
        step["cost"]["cpu_us_per_msg"].as_f64().unwrap() > 0.0,
        "{step}"
    );
}

#[test]
fn relay_baseline_runs() {
    let json = bench(&[
        "relay-baseline",
        "--pairs",
        "2",
        "--messages",
        "50",
        "--duration-secs",
        "5",
    ]);
    assert_eq!(json["results"]["steps"][0]["delivered"], 100, "{json}");
}

#[test]
fn group_fan_out_reaches_every_member() {
    let json = bench(&[
        "group",
        "--spawn-node",
        "--members",
        "5",
        "--senders",
        "2",
        "--messages",
        "10",
        "--rate",
        "100",
        "--baseline",
    ]);
    let step = &json["results"]["steps"][0];
    assert_eq!(step["messages_acked"], 20, "{step}");
    assert_eq!(step["deliveries"], 80, "{step}");
    // The relay fanned the same sends out to the same members.
    let relay = &json["results"]["baseline"][0];
    assert_eq!(relay["messages_acked"], 20, "{relay}");
    assert_eq!(relay["deliveries"], 80, "{relay}");
}

#[test]
fn presence_changes_arrive() {
    let json = bench(&["presence", "--spawn-node", "--pairs", "2", "--rounds", "2"]);
    let r = &json["results"]["result"];
    assert_eq!(r["changes"], 8, "{r}");
}

#[test]
fn connections_are_held_over_websocket_and_quic() {
    for transport in ["ws", "quic"] {
        let json = bench(&[
            "connections",
            "--spawn-node",
            "--transport",
            transport,
            "--connections",
            "20",
            "--users",
            "4",
            "--hold-secs",
            "1",
        ]);
        let r = &json["results"]["result"];
        assert_eq!(r["opened"], 20, "{r}");
        assert_eq!(r["transport"], transport, "{r}");
        assert!(r["node_kib_per_connection"].is_number(), "{r}");
    }
}

#[test]
fn attack_scenarios_keep_the_victim_served() {
    let json = bench(&[
        "attack-login",
        "--spawn-node",
        "--concurrency",
        "32",
        "--rounds",
        "2",
        "--node-arg=--hash-workers=1",
        "--node-arg=--hash-queue=2",
    ]);
    let answers = &json["results"]["answers"];
    assert!(answers["503 busy"].as_u64().unwrap_or(0) > 0, "{json}");
    assert_eq!(
        json["results"]["victim"]["victim_sends_failed"], 0,
        "{json}"
    );
    let json = bench(&[
        "attack-idle",
        "--spawn-node",
        "--idle",
        "60",
        "--slowloris",
        "5",
        "--secs",
        "4",
        "--node-arg=--max-connections-per-ip=50",
        "--node-arg=--http-header-timeout-ms=1000",
    ]);
    let results = &json["results"];
    assert!(
        results["idle_ends"]["refused"].as_u64().unwrap() >= 10,
        "{json}"
    );
    assert_eq!(results["slowloris_ends"]["closed"], 5, "{json}");
    assert_eq!(results["victim"]["victim_logins_failed"], 0, "{json}");
}
