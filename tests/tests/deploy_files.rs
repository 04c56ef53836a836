//! The operator's files in `deploy/`: the alert rules and the dashboard name only metrics the
//! node exports, every alert's runbook link lands on a runbook section, the dashboard is a
//! dashboard with the panels the runbook names, and `promtool` accepts the rules (when it is
//! installed: `.ci/run` installs it).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// Every `.rs` file's text under `dir`.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// Metric names in a PromQL expression: identifiers with an underscore that are not label
/// names (followed by `=`/`!=`/`=~`), functions (followed by `(`) or words inside strings.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut in_string) = (0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            in_string = !in_string;
            i += 1;
            continue;
        }
        if in_string || !(c.is_ascii_alphabetic() || c == '_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let rest: String = chars[i..]
            .iter()
            .collect::<String>()
            .trim_start()
            .to_string();
        let is_label = rest.starts_with('=') || rest.starts_with("!=") || rest.starts_with("=~");
        let is_call = rest.starts_with('(');
        let after_by = {
            let before: String = chars[..start].iter().collect();
            let before = before.trim_end();
            before.ends_with("by (") || before.ends_with("by(") || before.ends_with(',')
        };
        if word.contains('_') && !is_label && !is_call && !after_by {
            into.insert(word);
        }
    }
}

/// Metrics exported by other programs, named on purpose.
const EXTERNAL: &[&str] = &["node_filesystem_avail_bytes"];

#[test]
fn alerts_and_dashboard_name_only_metrics_the_node_exports() {
    let mut names = BTreeSet::new();
    for line in read("deploy/prometheus/alerts.yml").lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            metric_names(expr, &mut names);
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/chatnode-dashboard.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            metric_names(target["expr"].as_str().unwrap(), &mut names);
        }
    }
    assert!(names.len() > 15, "{names:?}");
    let mut code = String::new();
    for dir in ["node/src", "cluster/src"] {
        sources(&repo().join(dir), &mut code);
    }
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| !EXTERNAL.contains(&n.as_str()))
        .filter(|n| !code.contains(&format!("\"{n}\"")))
        .collect();
    assert!(unknown.is_empty(), "not exported by the node: {unknown:?}");
}

#[test]
fn every_runbook_link_and_panel_exists() {
    let readme = read("deploy/README.md");
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .collect::<String>()
                .replace(' ', "-")
        })
        .collect();
    let alerts = read("deploy/prometheus/alerts.yml");
    let mut links = 0;
    for line in alerts.lines() {
        if let Some(link) = line.trim().strip_prefix("runbook: \"deploy/README.md#") {
            let anchor = link.trim_end_matches('"');
            assert!(
                anchors.contains(anchor),
                "no runbook section #{anchor}: {anchors:?}"
            );
            links += 1;
        }
    }
    assert!(links >= 10);
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/chatnode-dashboard.json")).unwrap();
    let titles: BTreeSet<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    // Panel names may wrap across lines in the runbook.
    let flowing = readme.replace("Panel \"", "panel \"").replace('\n', " ");
    let named: Vec<&str> = flowing
        .split("panel \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    assert!(named.len() >= 5, "the runbook names dashboard panels");
    for title in named {
        assert!(
            titles.contains(title),
            "no dashboard panel {title:?}: {titles:?}"
        );
    }
}

#[test]
fn promtool_accepts_the_rules() {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let out = match std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo().join("deploy/prometheus/alerts.yml"))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: {promtool} is not installed ({e}); .ci/run installs it");
            return;
        }
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
