//! The id generator: time-ordered 64-bit ids that never decrease on one node, not even when
//! the wall clock steps back or the node restarts with a clock that is behind.
//!
//! Layout (see `client_proto::ids`): `[41 bits ms since 2025-01-01][10 bits node][12 bits
//! counter]`. When the clock stands still or steps back, the counter advances; when the
//! counter is full, the id borrows the next millisecond. Restarts are covered by a lease: the
//! generator never issues an id past a persisted millisecond mark without first moving the
//! mark ahead (written through `persist` before the id is handed out), and it starts above the
//! mark it finds.

use std::time::{SystemTime, UNIX_EPOCH};

use client_proto::ids::{MessageId, ID_EPOCH_MS};
use parking_lot::Mutex;

/// How far ahead of the last issued id the lease is moved, in ms.
const LEASE_AHEAD_MS: u64 = 10_000;

/// Issues ids for one node. Cheap to call from many tasks.
pub struct IdGen {
    node: u16,
    state: Mutex<State>,
    persist: Box<dyn Fn(u64) + Send + Sync>,
}

struct State {
    /// (ms, counter) of the last id issued.
    last_ms: u64,
    last_counter: u16,
    /// Ids up to this millisecond are covered by the persisted lease.
    lease_ms: u64,
}

impl IdGen {
    /// `lease_ms` is the mark persisted by an earlier run (0 on first start); `persist` is
    /// called with a new mark before any id beyond the current one is issued.
    pub fn new(node: u16, lease_ms: u64, persist: impl Fn(u64) + Send + Sync + 'static) -> Self {
        IdGen {
            node,
            state: Mutex::new(State {
                last_ms: lease_ms,
                last_counter: 0x0fff,
                lease_ms,
            }),
            persist: Box::new(persist),
        }
    }

    /// The next id, from the wall clock.
    pub fn next(&self) -> MessageId {
        self.next_at(now_unix_ms())
    }

    /// The next id as if the wall clock read `unix_ms`.
    pub fn next_at(&self, unix_ms: u64) -> MessageId {
        let now = unix_ms.saturating_sub(ID_EPOCH_MS);
        let mut s = self.state.lock();
        let (ms, counter) = if now > s.last_ms {
            (now, 0)
        } else if s.last_counter < 0x0fff {
            (s.last_ms, s.last_counter + 1)
        } else {
            (s.last_ms + 1, 0)
        };
        if ms >= s.lease_ms {
            s.lease_ms = ms + LEASE_AHEAD_MS;
            (self.persist)(s.lease_ms);
        }
        s.last_ms = ms;
        s.last_counter = counter;
        MessageId::from_parts(ms, self.node, counter)
    }
}

/// The wall clock in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const T0: u64 = ID_EPOCH_MS + 1_000_000;

    #[test]
    fn ids_never_decrease_when_the_clock_steps_back() {
        let g = IdGen::new(5, 0, |_| {});
        let a = g.next_at(T0);
        let b = g.next_at(T0 - 60_000); // the clock jumps back a minute
        let c = g.next_at(T0 - 59_000);
        let d = g.next_at(T0 + 1);
        assert!(a < b && b < c && c < d, "{a:?} {b:?} {c:?} {d:?}");
        assert_eq!(a.node(), 5);
        assert_eq!(b.ms_since_epoch(), a.ms_since_epoch());
        assert_eq!(b.counter(), a.counter() + 1);
    }

    #[test]
    fn a_full_counter_borrows_the_next_millisecond() {
        let g = IdGen::new(1, 0, |_| {});
        let mut last = g.next_at(T0);
        for _ in 0..10_000 {
            let id = g.next_at(T0);
            assert!(id > last);
            assert_eq!(id.node(), 1);
            last = id;
        }
        assert!(last.ms_since_epoch() > T0 - ID_EPOCH_MS);
    }

    #[test]
    fn a_restart_with_a_clock_behind_continues_above_the_lease() {
        let mark = Arc::new(AtomicU64::new(0));
        let m = mark.clone();
        let g = IdGen::new(3, 0, move |v| m.store(v, Ordering::SeqCst));
        let before = g.next_at(T0);
        let lease = mark.load(Ordering::SeqCst);
        assert!(lease > before.ms_since_epoch());
        drop(g);
        // The node restarts an hour in the past.
        let g = IdGen::new(3, lease, |_| {});
        let after = g.next_at(T0 - 3_600_000);
        assert!(after > before);
    }
}
