//! Rate limits, per user on this node: a token bucket ([`TokenBucket`]) for sends, one for
//! read requests (`sync`, `history`) and one for the bytes those reads answer with, shared by
//! all of the user's connections here ([`UserLimits`], [`UserLimit`]). Per connection would
//! let one token open many sessions and multiply its allowance.
//!
//! Time is passed in, so the buckets are tested without sleeping.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::UserId;
use parking_lot::Mutex;

/// A token bucket: `rate` tokens per second, at most `burst` saved up. [`TokenBucket::charge`]
/// may take it into debt (at most `burst` deep), for costs known only afterwards.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether there is at least one token (takes none).
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes `n` tokens whatever is left, going into debt down to `-burst`.
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - n).max(-self.burst);
    }

    /// How long until there is a token again (zero if there is one).
    pub fn retry_after(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
    }

    /// Whether the bucket is full (forgetting it would change nothing).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// The rates of [`UserLimits`], from the config.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Sends per second and burst.
    pub sends: (f64, u32),
    /// Read requests (`sync`, `history`) per second and burst.
    pub reads: (f64, u32),
    /// Bytes of read replies per second and burst.
    pub read_bytes: (f64, u32),
}

struct Entry {
    sends: TokenBucket,
    reads: TokenBucket,
    read_bytes: TokenBucket,
    /// Connections of the user on this node holding a [`UserLimit`].
    conns: usize,
}

impl Entry {
    fn idle_and_full(&mut self, now: Instant) -> bool {
        self.conns == 0
            && self.sends.is_full(now)
            && self.reads.is_full(now)
            && self.read_bytes.is_full(now)
    }
}

/// Registrations between two sweeps of forgotten users.
const SWEEP_EVERY: u64 = 256;

/// The per-user allowances of this node. Cheap to clone. A user's entry outlives its last
/// connection until its buckets have refilled (so reconnecting does not reset them); a sweep
/// every [`SWEEP_EVERY`] registrations forgets those. The lock is a `parking_lot` mutex held
/// for a few arithmetic operations, never across an await.
#[derive(Clone)]
pub struct UserLimits {
    rates: Rates,
    inner: Arc<Mutex<(HashMap<UserId, Entry>, u64)>>,
}

impl UserLimits {
    pub fn new(rates: Rates) -> Self {
        UserLimits {
            rates,
            inner: Arc::default(),
        }
    }

    /// Registers a connection of `user`; its allowance lasts as long as the handle.
    pub fn register(&self, user: UserId, now: Instant) -> UserLimit {
        let mut guard = self.inner.lock();
        let (map, registrations) = &mut *guard;
        *registrations += 1;
        if *registrations % SWEEP_EVERY == 0 {
            map.retain(|_, e| !e.idle_and_full(now));
        }
        let r = self.rates;
        let entry = map.entry(user).or_insert_with(|| Entry {
            sends: TokenBucket::new(r.sends.0, r.sends.1, now),
            reads: TokenBucket::new(r.reads.0, r.reads.1, now),
            read_bytes: TokenBucket::new(r.read_bytes.0, r.read_bytes.1, now),
            conns: 0,
        });
        entry.conns += 1;
        UserLimit {
            limits: self.clone(),
            user,
        }
    }

    /// Users with an entry (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.inner.lock().0.len()
    }

    fn with<R>(&self, user: UserId, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.inner.lock().0.get_mut(&user).map(f)
    }
}

/// One connection's handle on its user's allowance.
pub struct UserLimit {
    limits: UserLimits,
    user: UserId,
}

impl UserLimit {
    /// Takes a send; `Err(retry_after)` when the user is over the rate.
    pub fn try_send(&self, now: Instant) -> Result<(), Duration> {
        self.limits
            .with(self.user, |e| {
                if e.sends.try_take(now) {
                    Ok(())
                } else {
                    Err(e.sends.retry_after(now))
                }
            })
            .unwrap_or(Ok(()))
    }

    /// Takes a read request if the user has both a request and reply bytes left;
    /// `Err(retry_after)` otherwise.
    pub fn try_read(&self, now: Instant) -> Result<(), Duration> {
        self.limits
            .with(self.user, |e| {
                if !e.read_bytes.has_token(now) {
                    return Err(e.read_bytes.retry_after(now));
                }
                if e.reads.try_take(now) {
                    Ok(())
                } else {
                    Err(e.reads.retry_after(now))
                }
            })
            .unwrap_or(Ok(()))
    }

    /// Whether the user has reply bytes left (for reads that take no request token: HTTP
    /// history, whose requests the HTTP listener bounds); `Err(retry_after)` otherwise.
    pub fn try_read_bytes(&self, now: Instant) -> Result<(), Duration> {
        self.limits
            .with(self.user, |e| {
                if e.read_bytes.has_token(now) {
                    Ok(())
                } else {
                    Err(e.read_bytes.retry_after(now))
                }
            })
            .unwrap_or(Ok(()))
    }

    /// Counts `bytes` of read replies against the user (known only once read).
    pub fn charge_read_bytes(&self, bytes: usize, now: Instant) {
        self.limits
            .with(self.user, |e| e.read_bytes.charge(bytes as f64, now));
    }
}

impl Drop for UserLimit {
    fn drop(&mut self) {
        self.limits.with(self.user, |e| e.conns -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(50.0, 100, t0);
        assert_eq!((0..150).filter(|_| b.try_take(t0)).count(), 100);
        // 100 ms later: 5 more tokens.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..10).filter(|_| b.try_take(t1)).count(), 5);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..1000).filter(|_| b.try_take(t2)).count(), 100);
        // Empty: a token in 1/50 s.
        assert_eq!(b.retry_after(t2), Duration::from_millis(20));
    }

    #[test]
    fn debt_is_bounded_and_paid_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000, t0);
        b.charge(1e12, t0);
        assert!(!b.has_token(t0));
        // At most `burst` deep: 1001 tokens to earn back, a bit over a second.
        assert_eq!(b.retry_after(t0), Duration::from_millis(1001));
        assert!(!b.has_token(t0 + Duration::from_millis(990)));
        assert!(b.has_token(t0 + Duration::from_millis(1002)));
    }

    fn rates() -> Rates {
        Rates {
            sends: (1.0, 10),
            reads: (1.0, 3),
            read_bytes: (1000.0, 5000),
        }
    }

    #[test]
    fn a_users_connections_share_one_allowance() {
        let t0 = Instant::now();
        let limits = UserLimits::new(rates());
        let conns: Vec<_> = (0..5).map(|_| limits.register(UserId(1), t0)).collect();
        let sent = (0..50)
            .filter(|i| conns[i % 5].try_send(t0).is_ok())
            .count();
        assert_eq!(sent, 10, "ten sends for the user, not per connection");
        assert_eq!(conns[0].try_send(t0), Err(Duration::from_secs(1)));
        // Another user has their own.
        let other = limits.register(UserId(2), t0);
        assert!(other.try_send(t0).is_ok());
        // Reconnecting does not reset the allowance.
        drop(conns);
        let again = limits.register(UserId(1), t0);
        assert!(again.try_send(t0).is_err());
    }

    #[test]
    fn reads_are_limited_by_count_and_by_reply_bytes() {
        let t0 = Instant::now();
        let limits = UserLimits::new(rates());
        let c = limits.register(UserId(1), t0);
        assert!(c.try_read(t0).is_ok());
        c.charge_read_bytes(1_000_000, t0);
        // Deep in debt (bounded): refused until it is paid back.
        let wait = c.try_read(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(5001));
        let later = t0 + wait + Duration::from_millis(1);
        assert_eq!(
            (0..10).filter(|_| c.try_read(later).is_ok()).count(),
            3,
            "a burst of three"
        );
    }

    #[test]
    fn idle_users_are_forgotten_once_refilled() {
        let t0 = Instant::now();
        let limits = UserLimits::new(rates());
        for u in 0..SWEEP_EVERY {
            drop(limits.register(UserId(u), t0));
        }
        // Every one of them was full and idle at the sweep (the last one joined after it).
        assert!(limits.tracked() <= 1);
        let busy = limits.register(UserId(9999), t0);
        assert!(busy.try_send(t0).is_ok());
        drop(busy);
        for u in 0..SWEEP_EVERY {
            drop(limits.register(UserId(10_000 + u), t0));
        }
        assert!(
            limits.inner.lock().0.contains_key(&UserId(9999)),
            "not refilled yet"
        );
    }
}
