//! Login throttling and signup limits, by username and by source address, with time passed
//! in (no clock, no sockets).
//!
//! Login: each key (a username, a source address) may fail `free` times; every failure past
//! that locks the key for `base × 2^(failures − free − 1)`, at most `max`. While a key is
//! locked every login through it is refused before any password is hashed, the right
//! password included. A success clears the username's record (not the address's: one good
//! account must not wash an address's guessing away). Unknown usernames are throttled like
//! real ones, so a lockout says nothing about which names exist.
//!
//! Signup: a token bucket per source address. A source address is an IPv4 address or an
//! IPv6 /64 ([`source_key`]).
//!
//! Both tables are bounded: past `MAX_KEYS` entries, records that no longer matter (not
//! locked, last touched longer ago than `max`) are dropped; if that is not enough the oldest
//! half goes. Behind a proxy the source address is the proxy's: see the README.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::LoginLimits;

/// The address that per-source limits count: an IPv4 address as is (an IPv4-mapped IPv6
/// address as its IPv4 one), an IPv6 address by its /64, which one subscriber usually holds
/// whole (counting /128s would give an attacker 2^64 fresh budgets).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

/// Most keys each table remembers (a few tens of bytes each).
const MAX_KEYS: usize = 100_000;

/// One key's failures.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

/// Failure counts and locks for one kind of key.
struct Table<K> {
    free: u32,
    base: Duration,
    max: Duration,
    entries: HashMap<K, Failures>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(free: u32, base: Duration, max: Duration) -> Self {
        Table {
            free,
            base,
            max,
            entries: HashMap::new(),
        }
    }

    /// How long `key` stays locked, if it is.
    fn locked(&self, key: &K, now: Instant) -> Option<Duration> {
        let until = self.entries.get(key)?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failure; returns the lock it started, if any.
    fn fail(&mut self, key: K, now: Instant) -> Option<Duration> {
        if self.entries.len() >= MAX_KEYS && !self.entries.contains_key(&key) {
            self.prune(now);
        }
        let (free, base, max) = (self.free, self.base, self.max);
        let e = self.entries.entry(key).or_insert(Failures {
            count: 0,
            locked_until: None,
            last: now,
        });
        // A key quiet for longer than the longest delay starts over.
        if now.saturating_duration_since(e.last) > max
            && !matches!(e.locked_until, Some(u) if u > now)
        {
            e.count = 0;
        }
        e.count = e.count.saturating_add(1);
        e.last = now;
        if e.count <= free {
            return None;
        }
        let doublings = (e.count - free - 1).min(30);
        let delay = base.saturating_mul(1u32 << doublings).min(max);
        e.locked_until = Some(now + delay);
        Some(delay)
    }

    fn clear(&mut self, key: &K) {
        self.entries.remove(key);
    }

    fn prune(&mut self, now: Instant) {
        let max = self.max;
        self.entries.retain(|_, e| {
            e.locked_until.is_some_and(|u| u > now) || now.saturating_duration_since(e.last) <= max
        });
        if self.entries.len() >= MAX_KEYS {
            let mut lasts: Vec<Instant> = self.entries.values().map(|e| e.last).collect();
            let mid = lasts.len() / 2;
            let (_, cut, _) = lasts.select_nth_unstable(mid);
            let cut = *cut;
            self.entries.retain(|_, e| e.last > cut);
        }
    }
}

/// Why a login or signup is refused before any work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This username is locked for this long.
    Account(Duration),
    /// This source address is locked (or out of signups) for this long.
    Source(Duration),
}

impl Refusal {
    /// How long until a retry may succeed.
    pub fn retry_after(self) -> Duration {
        match self {
            Refusal::Account(d) | Refusal::Source(d) => d,
        }
    }
}

/// Login failures by username and by source address.
pub struct LoginThrottle {
    accounts: Table<String>,
    sources: Table<IpAddr>,
}

impl LoginThrottle {
    pub fn new(limits: &LoginLimits) -> Self {
        LoginThrottle {
            accounts: Table::new(limits.free_failures, limits.delay_base, limits.delay_max),
            sources: Table::new(
                limits.free_failures_per_ip,
                limits.delay_base,
                limits.delay_max,
            ),
        }
    }

    /// Whether a login for `username` from `source` may go ahead now.
    pub fn check(&self, username: &str, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        if let Some(d) = self.sources.locked(&source_key(source), now) {
            return Err(Refusal::Source(d));
        }
        if let Some(d) = self.accounts.locked(&username.to_owned(), now) {
            return Err(Refusal::Account(d));
        }
        Ok(())
    }

    /// Records a wrong password (or unknown username); returns whether a key became locked.
    pub fn failed(&mut self, username: &str, source: IpAddr, now: Instant) -> bool {
        let a = self.accounts.fail(username.to_owned(), now);
        let s = self.sources.fail(source_key(source), now);
        a.is_some() || s.is_some()
    }

    /// Records a successful login: the username starts over.
    pub fn succeeded(&mut self, username: &str) {
        self.accounts.clear(&username.to_owned());
    }
}

/// Signups per source address: a token bucket of `per_hour` tokens refilled evenly.
pub struct SignupLimit {
    per_hour: u32,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl SignupLimit {
    pub fn new(per_hour: u32) -> Self {
        SignupLimit {
            per_hour,
            buckets: HashMap::new(),
        }
    }

    /// Takes one signup for `source`, or says how long until the next one is allowed.
    pub fn take(&mut self, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.per_hour == 0 {
            return Ok(());
        }
        let source = source_key(source);
        let burst = f64::from(self.per_hour);
        let rate = burst / 3600.0;
        if self.buckets.len() >= MAX_KEYS && !self.buckets.contains_key(&source) {
            // Full buckets hold no information: drop them, then everything if still full.
            self.buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_KEYS {
                self.buckets.clear();
            }
        }
        let (tokens, last) = self.buckets.entry(source).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / rate;
            Err(Refusal::Source(Duration::from_secs_f64(wait)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LoginLimits {
        LoginLimits {
            hash_workers: 1,
            hash_queue: 1,
            free_failures: 3,
            free_failures_per_ip: 10,
            delay_base: Duration::from_secs(1),
            delay_max: Duration::from_secs(60),
            signups_per_ip_per_hour: 2,
        }
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn failures_past_the_free_ones_lock_with_doubling_delays() {
        let t0 = Instant::now();
        let mut t = LoginThrottle::new(&limits());
        for _ in 0..3 {
            assert!(t.check("bob", IP, t0).is_ok());
            assert!(!t.failed("bob", IP, t0));
        }
        assert!(t.failed("bob", IP, t0));
        assert_eq!(
            t.check("bob", IP, t0),
            Err(Refusal::Account(Duration::from_secs(1)))
        );
        // Another username from the same address is not locked (yet).
        assert!(t.check("carol", IP, t0).is_ok());
        let t1 = t0 + Duration::from_secs(1);
        assert!(t.check("bob", IP, t1).is_ok());
        t.failed("bob", IP, t1);
        assert_eq!(
            t.check("bob", IP, t1),
            Err(Refusal::Account(Duration::from_secs(2)))
        );
        // The delay is capped.
        let now = t1;
        for _ in 0..20 {
            t.failed("bob", IP, now);
        }
        assert_eq!(
            t.check("bob", IP, now),
            Err(Refusal::Source(Duration::from_secs(60)))
        );
        t.succeeded("bob");
        assert!(t.accounts.locked(&"bob".to_owned(), now).is_none());
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(source_key(IP), IP);
    }

    #[test]
    fn signups_are_a_bucket_per_address() {
        let t0 = Instant::now();
        let mut s = SignupLimit::new(2);
        assert!(s.take(IP, t0).is_ok());
        assert!(s.take(IP, t0).is_ok());
        let wait = s.take(IP, t0).unwrap_err().retry_after();
        assert_eq!(wait, Duration::from_secs(1800));
        assert!(s.take(IP, t0 + wait).is_ok());
        assert!(SignupLimit::new(0).take(IP, t0).is_ok());
    }
}
