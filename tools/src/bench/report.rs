//! What a scenario reports: live progress on stderr (one line a second), then an aligned
//! table and one `BENCH_JSON {...}` line on stdout.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A latency histogram in microseconds (1 µs to 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Records `d` (in µs, at least 1).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    let _ = h.record(us);
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// A table printed with aligned columns.
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text: a title line, the header, a rule, the rows. Numbers are
    /// right-aligned, the first column left-aligned.
    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width = vec![0; cols];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate().take(cols) {
                width[i] = width[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.title);
        let line = |out: &mut String, row: &[String]| {
            for (i, cell) in row.iter().enumerate().take(cols) {
                if i == 0 {
                    let _ = write!(out, "{cell:<w$}", w = width[i]);
                } else {
                    let _ = write!(out, "  {cell:>w$}", w = width[i]);
                }
            }
            out.push('\n');
        };
        line(&mut out, &self.headers);
        let total: usize = width.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
        let _ = writeln!(out, "{}", "-".repeat(total));
        for row in &self.rows {
            line(&mut out, row);
        }
        out
    }
}

/// A number with thousands separators (`1234567.8` → `1,234,568`).
pub fn int(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let digits: Vec<char> = s.chars().collect();
    let groups: Vec<String> = digits
        .rchunks(3)
        .rev()
        .map(|c| c.iter().collect())
        .collect();
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Milliseconds with two decimals.
pub fn ms(v: f64) -> String {
    format!("{v:.2}")
}

/// `node / baseline` as `0.42x`, or `-` without a baseline.
pub fn ratio(node: f64, baseline: Option<f64>) -> String {
    match baseline {
        Some(b) if b > 0.0 => format!("{:.2}x", node / b),
        _ => "-".into(),
    }
}

/// Counters shared by a scenario's tasks and read by the progress line.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Prints one progress line a second to stderr until cancelled.
pub struct Progress {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts printing `label` and the per-second rates of `counters`.
    pub fn start(label: String, counters: Arc<Counters>) -> Progress {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = [0u64; 4];
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = [
                    counters.sent.load(Ordering::Relaxed),
                    counters.acked.load(Ordering::Relaxed),
                    counters.delivered.load(Ordering::Relaxed),
                    counters.errors.load(Ordering::Relaxed),
                ];
                eprintln!(
                    "[{label}] t={:>3}s sent {}/s acked {}/s delivered {}/s errors {} (totals: sent {} acked {} delivered {})",
                    start.elapsed().as_secs(),
                    int((now[0] - last[0]) as f64),
                    int((now[1] - last[1]) as f64),
                    int((now[2] - last[2]) as f64),
                    now[3],
                    now[0],
                    now[1],
                    now[2],
                );
                last = now;
            }
        });
        Progress { stop, task }
    }

    /// Stops printing and waits for the task.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Progress {
    /// An early return (an error) still ends the printing task.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let mut t = Table::new("t", &["name", "value"]);
        t.row(vec!["a".into(), int(1234567.0)]);
        t.row(vec!["longer".into(), "5".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1].len(), lines[3].len());
        assert_eq!(lines[3].len(), lines[4].len());
        assert!(text.contains("1,234,567"));
    }

    #[test]
    fn latency_of_a_histogram() {
        let mut h = histogram();
        for i in 1..=1000 {
            record(&mut h, Duration::from_micros(i * 10));
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!(l.p50_ms > 4.9 && l.p50_ms < 5.1, "{l:?}");
        assert!(l.max_ms >= 9.99);
    }
}
