//! The report of a run: one table row per run, then the details a reader needs to start
//! looking (where lost messages were, heal times per fault kind, the first findings of each
//! kind, the runner's notes).

use std::fmt::Write;

use super::checker::{HealStats, Kind, Verdict};
use super::history::History;

/// Findings of each kind shown in the details.
const SHOWN: usize = 8;

const HEADER: [&str; 10] = [
    "fault",
    "acked",
    "refused",
    "indeterminate",
    "lost (pairs / msgs)",
    "duplicated",
    "unexpected",
    "out of order",
    "divergent",
    "heal→all p50/p99/max (n)",
];

/// `1.2s`.
fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// `p50/p99/max (n)` of heal latencies, with the messages never completed.
pub fn heal_cell(s: &HealStats) -> String {
    let mut cell = match (s.quantile(0.5), s.quantile(0.99), s.latencies_ms.last()) {
        (Some(p50), Some(p99), Some(max)) => format!(
            "{}/{}/{} ({})",
            secs(p50),
            secs(p99),
            secs(*max),
            s.latencies_ms.len()
        ),
        _ => "- (0)".to_string(),
    };
    if s.never > 0 {
        let _ = write!(cell, ", {} never", s.never);
    }
    cell
}

/// The cells of one run's row.
fn row(fault: &str, v: &Verdict) -> [String; 10] {
    [
        fault.to_string(),
        v.acked.to_string(),
        v.refused.to_string(),
        v.indeterminate.to_string(),
        format!("{} / {}", v.count(Kind::Lost), v.lost_messages()),
        v.count(Kind::Duplicated).to_string(),
        v.count(Kind::Unexpected).to_string(),
        v.count(Kind::OutOfOrder).to_string(),
        v.count(Kind::Divergent).to_string(),
        heal_cell(&v.heal_all()),
    ]
}

/// A table with one row per `(fault, verdict)`.
pub fn table(rows: &[(&str, &Verdict)]) -> String {
    let rows: Vec<[String; 10]> = rows.iter().map(|(f, v)| row(f, v)).collect();
    let mut width = HEADER.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(width)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = " ".repeat(w - c.chars().count());
                if i == 0 {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&HEADER.map(String::from));
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}

/// The whole report of one run: the row, then the details.
pub fn render(h: &History, v: &Verdict) -> String {
    let mut out = format!(
        "chaos seed={} fault={} nodes={} users={} groups={} sends={} deliveries={}\n",
        h.seed,
        h.fault,
        h.nodes,
        h.users.len(),
        h.groups.len(),
        h.sends.len(),
        h.deliveries.len()
    );
    out.push_str(&table(&[(&h.fault, v)]));
    let lost = v.count(Kind::Lost);
    if lost > 0 {
        let by_node: Vec<String> = v
            .lost_by_node
            .iter()
            .map(|(n, c)| format!("node {n}: {c}"))
            .collect();
        let _ = writeln!(
            out,
            "lost pairs on devices that never lost their connection: {} of {lost}; by the \
             device's node at the ack: {}",
            v.lost_on_steady_devices,
            by_node.join(", ")
        );
    }
    for (kind, s) in &v.heal {
        let _ = writeln!(out, "heal→all after {kind}: {}", heal_cell(s));
    }
    let mut took: Vec<u64> = h
        .sends
        .iter()
        .map(|s| s.end_ms.saturating_sub(s.start_ms))
        .collect();
    took.sort_unstable();
    if let Some(max) = took.last() {
        let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
        let _ = writeln!(
            out,
            "send time (request to ack, retries included) p99/max: {}/{}",
            secs(p99),
            secs(*max)
        );
    }
    for f in &h.faults {
        let healed = f.healed_ms.map_or_else(|| "never".into(), secs);
        let _ = writeln!(
            out,
            "fault {} node {:?}: applied at {}, healed at {healed}",
            f.kind,
            f.nodes,
            secs(f.applied_ms)
        );
    }
    for kind in Kind::ALL {
        let found: Vec<_> = v.findings.iter().filter(|f| f.kind == kind).collect();
        if found.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{kind} ({}):", found.len());
        for f in found.iter().take(SHOWN) {
            let _ = writeln!(out, "  {}", f.detail);
        }
        if found.len() > SHOWN {
            let _ = writeln!(out, "  ... and {} more", found.len() - SHOWN);
        }
    }
    for n in h.notes.iter().take(SHOWN) {
        let _ = writeln!(out, "note: {n}");
    }
    if h.notes.len() > SHOWN {
        let _ = writeln!(out, "note: ... and {} more", h.notes.len() - SHOWN);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up() {
        let v = Verdict {
            acked: 1234,
            heal: [(
                "pause".to_string(),
                HealStats {
                    latencies_ms: vec![100, 200, 5000],
                    never: 2,
                },
            )]
            .into(),
            ..Verdict::default()
        };
        let t = table(&[("pause", &v), ("none", &Verdict::default())]);
        let widths: Vec<usize> = t.lines().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{t}");
        assert!(t.contains("0.2s/5.0s/5.0s (3), 2 never"), "{t}");
    }
}
