//! The house rules of the source tree, checked from the files themselves:
//!
//! - no import cycle between files, in any crate of the workspace;
//! - in the server (`node/src`): nothing in `domain/` imports `gateway/`, `mesh/`, `server`
//!   or `node`, or uses `axum` or `quinn`; nothing in `gateway/` imports `mesh/` or `store/`;
//! - the server library does not contain the load generator or the terminal client.
//!
//! A file imports a module when its code (comments left out) names it by a `crate::` path,
//! a `super::` path, or a `use` of a sibling module. The longest chain of imports is printed,
//! to watch the depth of the tree.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every `.rs` file under `root`, by module path (`domain::chat`, `mesh` for `mesh/mod.rs`).
fn modules(root: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if parts.last().is_some_and(|p| p == "mod") {
                    parts.pop();
                }
                if parts.len() == 1 && matches!(parts[0].as_str(), "lib" | "main") {
                    parts[0] = "crate".into();
                }
                let code = std::fs::read_to_string(&path).unwrap();
                out.insert(parts.join("::"), strip_comments(&code));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The code without `//` comments (doc links are not imports).
fn strip_comments(code: &str) -> String {
    code.lines()
        .map(|line| match line.find("//") {
            // Keep `//` inside string literals such as URLs: only cut when the part before
            // has an even number of quotes.
            Some(i) if line[..i].matches('"').count() % 2 == 0 => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The longest known module that `path` (a `::` path) names.
fn resolve(path: &str, known: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|cand| known.contains(cand))
}

/// Identifier-ish path segments following `prefix` in `code`, with `{a, b::c}` groups
/// expanded.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let base: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let after = &rest[base.len()..];
        if base.ends_with("::") && after.starts_with('{') {
            let group = &after[1..after.find('}').unwrap_or(after.len())];
            for item in group.split(',') {
                let item: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                if !item.is_empty() {
                    out.push(format!("{base}{item}"));
                }
            }
        }
        let base = base.trim_end_matches(':');
        if !base.is_empty() {
            out.push(base.to_string());
        }
    }
    out
}

/// Which modules each module imports.
fn import_graph(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, code) in mods {
        let mut deps = BTreeSet::new();
        for p in paths_after(code, "crate::") {
            deps.extend(resolve(&p, &known));
        }
        // `super::x` from `a::b::c` (a file) names `a::b::x`; from a `mod.rs` module
        // `a::b` it names `a::x`. Both resolve against the known modules.
        let parent: Vec<&str> = name.split("::").collect();
        for p in paths_after(code, "super::") {
            for depth in [1, 2] {
                if parent.len() >= depth && name != "crate" {
                    let mut full: Vec<&str> = parent[..parent.len() - depth].to_vec();
                    full.extend(p.split("::"));
                    if let Some(m) = resolve(&full.join("::"), &known) {
                        deps.insert(m);
                        break;
                    }
                }
            }
        }
        deps.remove(name);
        deps.remove("crate");
        graph.insert(name.clone(), deps);
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|s| s == n).unwrap();
                let mut cycle = stack[start..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n.to_string(), Mark::Open);
        stack.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// The longest import chain of an acyclic graph.
fn longest_chain(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    fn from(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        memo: &mut BTreeMap<String, Vec<String>>,
    ) -> Vec<String> {
        if let Some(c) = memo.get(n) {
            return c.clone();
        }
        let mut best = Vec::new();
        for d in graph.get(n).into_iter().flatten() {
            let c = from(d, graph, memo);
            if c.len() > best.len() {
                best = c;
            }
        }
        best.insert(0, n.to_string());
        memo.insert(n.to_string(), best.clone());
        best
    }
    let mut memo = BTreeMap::new();
    graph
        .keys()
        .map(|n| from(n, graph, &mut memo))
        .max_by_key(Vec::len)
        .unwrap_or_default()
}

const CRATES: [&str; 5] = [
    "client-proto/src",
    "cluster/src",
    "node/src",
    "tools/src",
    "tests/src",
];

#[test]
fn no_crate_has_an_import_cycle_between_files() {
    for krate in CRATES {
        let root = workspace().join(krate);
        if !root.exists() {
            continue;
        }
        let graph = import_graph(&modules(&root));
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: import cycle {}", cycle.join(" -> "));
        }
        let chain = longest_chain(&graph);
        println!(
            "{krate}: {} files, longest import chain {}: {}",
            graph.len(),
            chain.len(),
            chain.join(" -> ")
        );
    }
}

#[test]
fn server_rooms_import_only_downwards() {
    let mods = modules(&workspace().join("node/src"));
    let graph = import_graph(&mods);
    let mut broken = Vec::new();
    for (name, deps) in &graph {
        let code = &mods[name];
        let forbidden: &[&str] = if name.starts_with("domain") {
            &["gateway", "mesh", "server", "node"]
        } else if name.starts_with("gateway") {
            &["mesh", "store", "server"]
        } else if name.starts_with("store") {
            &["gateway", "mesh", "server", "node", "domain"]
        } else {
            &[]
        };
        for d in deps {
            let room = d.split("::").next().unwrap_or_default();
            if forbidden.contains(&room) {
                broken.push(format!("{name} imports {d}"));
            }
        }
        if name.starts_with("domain") {
            for krate in ["axum::", "quinn::", "cluster::"] {
                if code.contains(krate) {
                    broken.push(format!("{name} uses {}", krate.trim_end_matches(':')));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports across the rules:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_server_library_holds_no_client_programs() {
    let mods = modules(&workspace().join("node/src"));
    for banned in ["bench", "client_cli"] {
        assert!(
            !mods
                .keys()
                .any(|m| m == banned || m.starts_with(&format!("{banned}::"))),
            "node/src still holds `{banned}`: client programs live in tools/"
        );
    }
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), "use crate::b::{c, d};".to_string());
    mods.insert("b".to_string(), "use super::e; // crate::a".to_string());
    mods.insert("b::c".to_string(), String::new());
    mods.insert("e".to_string(), "fn f() { crate::a::g(); }".to_string());
    let mods: BTreeMap<_, _> = mods
        .into_iter()
        .map(|(k, v)| (k, strip_comments(&v)))
        .collect();
    let graph = import_graph(&mods);
    assert_eq!(
        graph["a"],
        BTreeSet::from(["b".to_string(), "b::c".to_string()])
    );
    assert_eq!(graph["b"], BTreeSet::from(["e".to_string()]));
    assert!(find_cycle(&graph).is_some(), "a -> b -> e -> a");
    let mut acyclic = graph.clone();
    acyclic.get_mut("e").unwrap().clear();
    assert!(find_cycle(&acyclic).is_none());
    assert_eq!(longest_chain(&acyclic), ["a", "b", "e"]);
}
