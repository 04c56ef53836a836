//! Log hygiene: what no log level may show, and rate limiting for warnings that a misbehaving client or peer can repeat at
//! will (one slow reader once wrote 21,608 WARN lines in 20 s, and the logging itself
//! slowed the node down).
//!
//! A [`RateLimitedLog`] lets at most `burst` lines through per `interval`; the first line
//! let through after some were held back carries `suppressed = N`, the number of similar
//! lines dropped since the last one logged. One limiter per call site, usually a `static`:
//!
//! ```ignore
//! static SLOW: RateLimitedLog = RateLimitedLog::new(5, Duration::from_secs(10));
//! if let Some(suppressed) = SLOW.allow() {
//!     tracing::warn!(suppressed, "something that repeats");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Libraries whose `debug`/`trace` output dumps frame payloads or request bodies (a
/// WebSocket frame's payload holds the `auth` token or a message body): capped at `info`
/// whatever the operator's filter says, so no level writes tokens, passwords or bodies.
/// The node's own logs never hold them (their `Debug` forms are redacted in client-proto).
pub const PAYLOAD_DUMPING_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "axum::rejection",
    "rustls",
];

/// The node's log filter: `spec` (tracing's `EnvFilter` syntax) with
/// [`PAYLOAD_DUMPING_TARGETS`] capped at `info`; a `spec` that does not parse is an error.
pub fn filter(
    spec: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    let mut filter = tracing_subscriber::EnvFilter::try_new(spec)?;
    for target in PAYLOAD_DUMPING_TARGETS {
        if let Ok(cap) = format!("{target}=info").parse() {
            filter = filter.add_directive(cap);
        }
    }
    Ok(filter)
}

/// At most `burst` lines per `interval` from one call site.
#[derive(Debug)]
pub struct RateLimitedLog {
    burst: u32,
    interval: Duration,
    // A std lock held for a few arithmetic steps, never across an await or a log call.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A limiter letting `burst` lines through per `interval`.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines suppressed since the last one logged)` if a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`Self::allow`] at `now`.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window < self.burst {
            s.in_window += 1;
            let suppressed = std::mem::take(&mut s.suppressed);
            if suppressed > 0 {
                metrics::counter!("log_lines_suppressed_total").increment(suppressed);
            }
            Some(suppressed)
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_per_interval_and_counts_the_rest() {
        let limit = RateLimitedLog::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let got: Vec<Option<u64>> = (0..1000).map(|_| limit.allow_at(t0)).collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none));
        // Still inside the interval: nothing.
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(9)), None);
        // The next interval: the first line reports what was held back.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limit.allow_at(t1), Some(998));
        assert_eq!(limit.allow_at(t1), Some(0));
        assert_eq!(limit.allow_at(t1), Some(0));
        assert_eq!(limit.allow_at(t1), None);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn payload_dumping_libraries_stay_at_info_under_trace() {
        let f = filter("trace").unwrap().to_string();
        for t in PAYLOAD_DUMPING_TARGETS {
            assert!(f.contains(&format!("{t}=info")), "{f}");
        }
        // An explicit request for a library's trace output is overridden too.
        let f = filter("tungstenite=trace").unwrap().to_string();
        assert!(
            f.contains("tungstenite=info") && !f.contains("tungstenite=trace"),
            "{f}"
        );
    }

    #[test]
    fn works_as_a_static() {
        static SITE: RateLimitedLog = RateLimitedLog::new(1, Duration::from_secs(3600));
        assert_eq!(SITE.allow(), Some(0));
        assert_eq!(SITE.allow(), None);
    }
}
