//! Time across nodes. Clocks are not trusted, so nothing that must be correct depends on
//! them agreeing; they only keep ids close to real time.
//!
//! - [`wall_ms`]: this process's wall clock in Unix milliseconds, with an offset that only
//!   tests set (`chatnode serve --clock-offset-file`), so a test can skew one node.
//! - [`Hlc`]: the hybrid logical clock of a node. Its readings are 64-bit values in the
//!   layout of message ids (`[41 bits ms since 2025-01-01][10 bits node][12 bits counter]`).
//!   Every reading it issues is greater than every reading it issued or *observed* before
//!   (peers' timestamps on gossip and replica requests pull it forward), so it never goes
//!   back, not across a wall-clock step back and not across a restart: a *lease* (a reading
//!   persisted ahead of the clock, see [`Hlc::lease_wanted`]) is kept durable ahead of it,
//!   and a restarted clock starts above the lease it finds. A peer's timestamp further ahead of the wall clock than
//!   [`Hlc::max_ahead_ms`] is not followed, so a peer whose clock runs far ahead cannot drag
//!   the cluster's ids into the future. "The wall clock" there is the cluster's: this node's,
//!   or the median of its peers' when that is ahead ([`Hlc::set_peers_ahead_ms`]), so a node
//!   whose own clock is behind still follows the others.
//! - [`SkewGuard`]: estimates how far this node's wall clock is from its peers' (from the
//!   timestamps on their gossip datagrams) and refuses to issue ids while that is more than a
//!   configured bound: a node whose clock is off says why instead of issuing ids that would
//!   sort wrongly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use client_proto::ids::{MessageId, COUNTER_BITS, ID_EPOCH_MS, TIME_SHIFT};
use parking_lot::Mutex;

/// The test-only offset added to the wall clock, in ms.
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// This process's wall clock in Unix milliseconds (plus the test offset, normally 0).
pub fn wall_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    shifted(real, OFFSET_MS.load(Ordering::Relaxed))
}

/// `real_ms` moved by `offset_ms`, never below 0.
fn shifted(real_ms: i64, offset_ms: i64) -> u64 {
    real_ms.saturating_add(offset_ms).max(0) as u64
}

/// Shifts this process's wall clock by `ms` (tests only: it makes one node's clock wrong).
pub fn set_offset_ms(ms: i64) {
    OFFSET_MS.store(ms, Ordering::Relaxed);
}

/// The current test offset of the wall clock, in ms.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// A clock reading as milliseconds since the id epoch.
pub fn reading_ms(reading: u64) -> u64 {
    reading >> TIME_SHIFT
}

/// `ms` (milliseconds) as a span of clock readings, to add to or subtract from one.
pub fn span(ms: u64) -> u64 {
    ms << TIME_SHIFT
}

/// How far ahead of the clock a new lease is put: the most a restart skips (ids issued just
/// after a restart are up to this far ahead of the wall clock).
pub const LEASE_AHEAD_MS: u64 = 3_000;
/// A new lease is wanted once the clock is within this of the durable one: the time the
/// lease's writer has to make it durable before the clock would run past it.
const LEASE_MARGIN_MS: u64 = 2_500;
/// The largest counter value.
const MAX_COUNTER: u16 = (1 << COUNTER_BITS) - 1;

/// A node's hybrid logical clock (see the module docs). Cheap to call from many tasks.
pub struct Hlc {
    node: u16,
    max_ahead_ms: u64,
    /// How far the median of the peers' wall clocks is ahead of this node's, ms (0 when it
    /// is not ahead): the cap on following a peer counts from the cluster's time.
    peers_ahead_ms: AtomicU64,
    state: Mutex<State>,
}

struct State {
    /// The largest reading issued or observed (a message-id-shaped value).
    high: u64,
    /// The durable lease (ms since the id epoch): readings stay below it while its writer
    /// keeps up.
    lease_ms: u64,
    /// Readings that ran past the lease (its writer fell behind).
    overruns: u64,
}

impl std::fmt::Debug for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Hlc")
            .field("node", &self.node)
            .field("high", &s.high)
            .field("lease_ms", &s.lease_ms)
            .finish()
    }
}

impl Hlc {
    /// The clock of node `node`, continuing above `durable_lease_ms` (the lease an earlier run
    /// persisted, in ms since the id epoch; 0 on first start). Keep the lease ahead: persist
    /// [`Hlc::lease_wanted`] and report it with [`Hlc::lease_granted`], before serving and
    /// then whenever it asks.
    pub fn new(node: u16, durable_lease_ms: u64) -> Self {
        let high = if durable_lease_ms == 0 {
            0
        } else {
            // Above every reading of every node in the lease's millisecond.
            MessageId::from_parts(durable_lease_ms, u16::MAX, MAX_COUNTER).0
        };
        Hlc {
            node,
            max_ahead_ms: 10_000,
            peers_ahead_ms: AtomicU64::new(0),
            state: Mutex::new(State {
                high,
                lease_ms: durable_lease_ms,
                overruns: 0,
            }),
        }
    }

    /// A clock with no lease to respect (tests and in-memory replicas).
    pub fn unleased(node: u16) -> Self {
        let hlc = Self::new(node, 0);
        hlc.state.lock().lease_ms = u64::MAX;
        hlc
    }

    /// Sets how far ahead of the wall clock a peer's timestamp may pull this clock.
    pub fn with_max_ahead(mut self, ms: u64) -> Self {
        self.max_ahead_ms = ms;
        self
    }

    /// How far ahead of the wall clock a peer's timestamp may pull this clock, in ms.
    pub fn max_ahead_ms(&self) -> u64 {
        self.max_ahead_ms
    }

    /// The median of the peers' wall clocks is `ms` ahead of this node's (0: not ahead), as
    /// the [`SkewGuard`] estimates it: a peer's reading is followed up to `max_ahead_ms` past
    /// the later of the two.
    pub fn set_peers_ahead_ms(&self, ms: u64) {
        self.peers_ahead_ms.store(ms, Ordering::Relaxed);
    }

    /// The node whose clock this is.
    pub fn node(&self) -> u16 {
        self.node
    }

    /// A new reading, greater than every reading issued or observed before.
    pub fn tick(&self) -> u64 {
        self.tick_at(wall_ms())
    }

    /// [`Hlc::tick`] as if the wall clock read `unix_ms`.
    pub fn tick_at(&self, unix_ms: u64) -> u64 {
        let now = MessageId::from_parts(unix_ms.saturating_sub(ID_EPOCH_MS), self.node, 0).0;
        let mut s = self.state.lock();
        let reading = if now > s.high {
            now
        } else {
            let h = MessageId(s.high);
            if h.node() == self.node && h.counter() < MAX_COUNTER {
                s.high + 1
            } else {
                // The next millisecond: above any node's reading in this one.
                MessageId::from_parts(h.ms_since_epoch() + 1, self.node, 0).0
            }
        };
        s.raise(reading);
        reading
    }

    /// The clock's reading now, without issuing one: at least every reading issued or
    /// observed so far and at least the wall clock, never less than an earlier `peek`, and
    /// less than every later [`Hlc::tick`].
    pub fn peek(&self) -> u64 {
        self.peek_at(wall_ms())
    }

    /// [`Hlc::peek`] as if the wall clock read `unix_ms`.
    pub fn peek_at(&self, unix_ms: u64) -> u64 {
        let now = MessageId::from_parts(unix_ms.saturating_sub(ID_EPOCH_MS), self.node, 0).0;
        let mut s = self.state.lock();
        if now > s.high {
            s.raise(now);
        }
        s.high
    }

    /// Pulls the clock forward past a peer's reading `ts`: every later [`Hlc::tick`] is
    /// greater. A reading more than [`Hlc::max_ahead_ms`] ahead of the wall clock is followed
    /// only that far. Returns whether `ts` was followed in full.
    pub fn observe(&self, ts: u64) -> bool {
        self.observe_at(ts, wall_ms())
    }

    /// [`Hlc::observe`] as if the wall clock read `unix_ms`.
    pub fn observe_at(&self, ts: u64, unix_ms: u64) -> bool {
        let cap_ms = unix_ms
            .saturating_sub(ID_EPOCH_MS)
            .saturating_add(self.peers_ahead_ms.load(Ordering::Relaxed))
            .saturating_add(self.max_ahead_ms);
        let (ts, full) = if MessageId(ts).ms_since_epoch() > cap_ms {
            (MessageId::from_parts(cap_ms, 0, 0).0, false)
        } else {
            (ts, true)
        };
        let mut s = self.state.lock();
        if ts > s.high {
            s.raise(ts);
        }
        full
    }

    /// The lease to persist next (ms since the id epoch), when the clock is getting close to
    /// the durable one; persist it durably, then call [`Hlc::lease_granted`].
    pub fn lease_wanted(&self) -> Option<u64> {
        self.lease_wanted_at(wall_ms())
    }

    /// [`Hlc::lease_wanted`] as if the wall clock read `unix_ms`.
    pub fn lease_wanted_at(&self, unix_ms: u64) -> Option<u64> {
        let s = self.state.lock();
        let now = unix_ms
            .saturating_sub(ID_EPOCH_MS)
            .max(MessageId(s.high).ms_since_epoch());
        if s.lease_ms == u64::MAX || s.lease_ms >= now + LEASE_MARGIN_MS {
            return None;
        }
        Some(now + LEASE_AHEAD_MS)
    }

    /// `lease_ms` (from [`Hlc::lease_wanted`]) is durable: the clock may run up to it.
    pub fn lease_granted(&self, lease_ms: u64) {
        let mut s = self.state.lock();
        if lease_ms > s.lease_ms {
            s.lease_ms = lease_ms;
        }
    }

    /// How many readings ran past the durable lease (its writer fell behind).
    pub fn lease_overruns(&self) -> u64 {
        self.state.lock().overruns
    }
}

impl State {
    /// Makes `reading` the highest. One past the durable lease is counted and kept anyway:
    /// a repeated id would break more than a restart that might start below it, which can
    /// only happen after the lease's writer has been stuck for `LEASE_MARGIN_MS`.
    fn raise(&mut self, reading: u64) {
        if MessageId(reading).ms_since_epoch() > self.lease_ms {
            self.overruns += 1;
        }
        self.high = reading;
    }
}

/// A node's clock and skew guard, as gossip and replication share them.
#[derive(Clone, Debug)]
pub struct ClusterClock {
    /// The hybrid logical clock.
    pub hlc: Arc<Hlc>,
    /// The skew estimate.
    pub guard: Arc<SkewGuard>,
}

/// Peers' clock samples older than this are not counted.
const SAMPLE_TTL: Duration = Duration::from_secs(30);
/// Peers remembered at most (one sample each).
const MAX_PEERS: usize = 1024;

/// A node's clock is further from its peers' than the bound allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSkew {
    /// How far this node's clock is from the median of its peers', in ms (negative:
    /// behind).
    pub skew_ms: i64,
    /// The bound, in ms.
    pub bound_ms: u64,
}

impl std::fmt::Display for ClockSkew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |ms: u64| ms as f64 / 1000.0;
        write!(
            f,
            "this node's clock is {:.1} s {} the cluster's (the bound is {:.1} s); fix its time sync (NTP)",
            secs(self.skew_ms.unsigned_abs()),
            if self.skew_ms < 0 { "behind" } else { "ahead of" },
            secs(self.bound_ms)
        )
    }
}

impl std::error::Error for ClockSkew {}

/// Estimates this node's clock skew from its peers' timestamps (see the module docs).
#[derive(Debug)]
pub struct SkewGuard {
    bound_ms: u64,
    samples: Mutex<HashMap<SocketAddr, (i64, Instant)>>,
}

impl SkewGuard {
    /// A guard that refuses once this node's clock is more than `bound_ms` from its peers'.
    pub fn new(bound_ms: u64) -> Self {
        SkewGuard {
            bound_ms,
            samples: Mutex::new(HashMap::new()),
        }
    }

    /// The bound, in ms.
    pub fn bound_ms(&self) -> u64 {
        self.bound_ms
    }

    /// A peer at `peer` sent a datagram stamped `their_ms` (its wall clock) that arrived
    /// when this node's wall clock read `our_ms`.
    pub fn record(&self, peer: SocketAddr, their_ms: u64, our_ms: u64) {
        self.record_at(peer, their_ms, our_ms, Instant::now());
    }

    /// [`SkewGuard::record`] at monotonic time `at`.
    pub fn record_at(&self, peer: SocketAddr, their_ms: u64, our_ms: u64, at: Instant) {
        let offset = their_ms as i64 - our_ms as i64;
        let mut samples = self.samples.lock();
        if samples.len() >= MAX_PEERS && !samples.contains_key(&peer) {
            samples.retain(|_, (_, seen)| at.duration_since(*seen) < SAMPLE_TTL);
            if samples.len() >= MAX_PEERS {
                return;
            }
        }
        samples.insert(peer, (offset, at));
    }

    /// How far this node's clock is from the cluster's, in ms (negative: behind): minus the
    /// median of the offsets of the peers heard from lately, this node counted as offset 0.
    /// `None` when no peer was heard from lately.
    pub fn skew_ms(&self) -> Option<i64> {
        self.skew_ms_at(Instant::now())
    }

    /// [`SkewGuard::skew_ms`] at monotonic time `at`.
    pub fn skew_ms_at(&self, at: Instant) -> Option<i64> {
        let mut offsets: Vec<i64> = self
            .samples
            .lock()
            .values()
            .filter(|(_, seen)| at.saturating_duration_since(*seen) < SAMPLE_TTL)
            .map(|(offset, _)| *offset)
            .collect();
        if offsets.is_empty() {
            return None;
        }
        offsets.push(0);
        offsets.sort_unstable();
        let n = offsets.len();
        // With an even count, take the middle value nearer to this node's own clock: two
        // nodes that disagree cannot tell which is wrong, so neither refuses.
        let median = if n % 2 == 1 {
            offsets[n / 2]
        } else {
            let (a, b) = (offsets[n / 2 - 1], offsets[n / 2]);
            if a.abs() <= b.abs() {
                a
            } else {
                b
            }
        };
        Some(-median)
    }

    /// How far the median of the peers' clocks is ahead of this node's, ms (0 when it is
    /// not ahead, or no peer was heard from lately): what [`Hlc::set_peers_ahead_ms`] wants.
    pub fn peers_ahead_ms(&self) -> u64 {
        self.skew_ms().map_or(0, |skew| (-skew).max(0) as u64)
    }

    /// `Err` while this node's clock is more than the bound from its peers'.
    pub fn check(&self) -> Result<(), ClockSkew> {
        self.check_at(Instant::now())
    }

    /// [`SkewGuard::check`] at monotonic time `at`.
    pub fn check_at(&self, at: Instant) -> Result<(), ClockSkew> {
        match self.skew_ms_at(at) {
            Some(skew_ms) if skew_ms.unsigned_abs() > self.bound_ms => Err(ClockSkew {
                skew_ms,
                bound_ms: self.bound_ms,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
