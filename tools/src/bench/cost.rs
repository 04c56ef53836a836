//! What a step cost the node processes: CPU time (utime + stime from `/proc/<pid>/stat`),
//! bytes written to disk (`write_bytes` from `/proc/<pid>/io`), and commit-log flushes
//! (`store_log_syncs_total` from each server's `/metrics`), sampled at the start and the end
//! of each step and divided by what the step delivered.

use serde::Serialize;

/// Linux's clock tick (USER_HZ) for `/proc/<pid>/stat` times: 100 on every mainstream
/// architecture.
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of every counted node.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    cpu_ticks: u64,
    write_bytes: u64,
    syncs: f64,
    /// How many of the processes and metric endpoints could be read.
    read: usize,
}

/// A step's cost, per delivered message (or delivery, for groups).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cost {
    /// Node CPU (user + system, every counted node) per delivered message, µs.
    pub cpu_us_per_msg: f64,
    /// Bytes the node processes wrote to disk per delivered message.
    pub disk_bytes_per_msg: f64,
    /// Commit-log flushes (`fdatasync`s) per second, all nodes.
    pub flushes_per_s: f64,
    /// Node CPU over the step, seconds (all counted nodes).
    pub cpu_s: f64,
}

/// Where the cost is read: node process ids and the servers' metrics endpoints.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    pids: Vec<u32>,
    metrics: Vec<String>,
    http: Option<reqwest::Client>,
}

impl Meter {
    /// Counts the processes `pids` and the `/metrics` of the servers `servers` (HTTP roots).
    /// Without pids there is no cost to show.
    pub fn new(pids: Vec<u32>, servers: &[String]) -> Meter {
        Meter {
            pids,
            metrics: servers
                .iter()
                .map(|s| format!("{}/metrics", s.trim_end_matches('/')))
                .collect(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .ok(),
        }
    }

    /// Whether there is anything to measure.
    pub fn is_on(&self) -> bool {
        !self.pids.is_empty()
    }

    /// Reads every process and metrics endpoint now.
    pub async fn read(&self) -> Reading {
        let mut r = Reading::default();
        for &pid in &self.pids {
            if let (Some(cpu), Some(written)) = (cpu_ticks(pid), write_bytes(pid)) {
                r.cpu_ticks += cpu;
                r.write_bytes += written;
                r.read += 1;
            }
        }
        if let Some(http) = &self.http {
            for url in &self.metrics {
                let Ok(resp) = http.get(url).send().await else {
                    continue;
                };
                let Ok(text) = resp.text().await else {
                    continue;
                };
                r.syncs += counter(&text, "store_log_syncs_total");
            }
        }
        r
    }

    /// The cost between `start` and `end` for `delivered` messages over `secs` seconds;
    /// `None` when nothing was measured or a process could not be read at both ends.
    pub fn cost(&self, start: &Reading, end: &Reading, delivered: u64, secs: f64) -> Option<Cost> {
        if !self.is_on() || start.read != self.pids.len() || end.read != self.pids.len() {
            return None;
        }
        let cpu_s = end.cpu_ticks.saturating_sub(start.cpu_ticks) as f64 / TICKS_PER_SEC;
        let per = delivered.max(1) as f64;
        Some(Cost {
            cpu_us_per_msg: cpu_s * 1e6 / per,
            disk_bytes_per_msg: end.write_bytes.saturating_sub(start.write_bytes) as f64 / per,
            flushes_per_s: (end.syncs - start.syncs).max(0.0) / secs.max(1e-3),
            cpu_s,
        })
    }
}

/// The three cost cells of a table row ("-" when not measured).
pub fn cells(cost: Option<&Cost>) -> [String; 3] {
    match cost {
        Some(c) => [
            format!("{:.1}", c.cpu_us_per_msg),
            format!("{:.0}", c.disk_bytes_per_msg),
            format!("{:.0}", c.flushes_per_s),
        ],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

/// The headers of [`cells`].
pub const HEADERS: [&str; 3] = ["cpu µs/msg", "disk B/msg", "flushes/s"];

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of a Prometheus counter's samples (any labels) in `text`.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_labels_and_other_names_ignored() {
        let text = "# HELP x\nstore_log_syncs_total 12\nstore_log_syncs_total{a=\"b\"} 3\n\
                    store_log_syncs_total_other 99\nstore_log_bytes_total 5\n";
        assert_eq!(counter(text, "store_log_syncs_total"), 15.0);
        assert_eq!(counter(text, "absent"), 0.0);
    }

    #[test]
    fn this_process_can_be_read_and_a_step_costs_per_message() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(write_bytes(me).is_some());
        let meter = Meter::new(vec![me], &[]);
        let start = Reading {
            cpu_ticks: 100,
            write_bytes: 1_000,
            syncs: 10.0,
            read: 1,
        };
        let end = Reading {
            cpu_ticks: 150,
            write_bytes: 5_000,
            syncs: 30.0,
            read: 1,
        };
        let c = meter.cost(&start, &end, 1_000, 2.0).unwrap();
        assert_eq!(c.cpu_us_per_msg, 500.0);
        assert_eq!(c.disk_bytes_per_msg, 4.0);
        assert_eq!(c.flushes_per_s, 10.0);
        let unread = Reading::default();
        assert!(meter.cost(&unread, &end, 1_000, 2.0).is_none());
        assert!(Meter::new(vec![], &[]).cost(&start, &end, 1, 1.0).is_none());
    }
}
