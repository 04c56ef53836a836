//! Sealed streams: what makes a read's answer *closed*, so that a cursor handed to a client
//! misses nothing that is acknowledged later.
//!
//! A sealed table holds streams (a user's inbox) whose keys are `stream | position`, the
//! position a big-endian 64-bit clock reading (`crate::clock::Hlc`) assigned by the writer.
//! Each replica keeps a *seal*: its own clock reading minus a window. A **fresh** entry (a
//! value written by a coordinator's first attempt, as opposed to a hint, a read repair or a
//! pull, which copy records that a write already placed; deletes are never refused: they add
//! nothing a cursor could miss) at a position at or below the replica's seal is refused, and a scan of a stream reports the seal it was taken under. The check and the
//! insert of a write, and the seal and the iteration of a scan, run under the stream's lock,
//! so a scan sees every write the replica accepted at or below the seal it reports.
//!
//! **Why a cursor is closed.** A sync's cursor is at most the smallest seal among the
//! replicas that answered it (a read quorum, `R + W > n`). Take a write acknowledged at
//! position `p` at or below that cursor: a write quorum accepted it, and that quorum meets
//! the read quorum in some replica `r`. `r` either accepted the write before its scan, and
//! then the scan returned it, or after, which it cannot have done: `p` is at or below the
//! seal `r` reported, and `r`'s seal only grows (its clock never goes back, not across a
//! restart). So every acknowledged write at or below the cursor was in the answer. No clock
//! has to agree with any other: each replica compares positions with its own clock.
//!
//! A coordinator whose clock is behind sees its writes refused (with the replica's clock
//! reading, which pulls its own forward) and retries at a new position; a write delayed past
//! the window (a paused node) is refused the same way. The window is the cost: a sync's
//! cursor trails the newest positions by it, so the next sync sends the last window again
//! (clients drop what they have by message id).

use std::sync::Arc;

use parking_lot::Mutex;

use super::record::TableId;
use crate::clock::{span, Hlc};

/// Which table is sealed, and by how much the seal trails the replica's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealPolicy {
    /// The sealed table; its keys end with an 8-byte big-endian position.
    pub table: TableId,
    /// How far the seal trails the replica's clock, in ms: a fresh write must reach the
    /// replica within this of its position's time (by the replica's clock).
    pub window_ms: u64,
}

/// Stripes of the per-stream lock.
const STRIPES: usize = 256;

/// A replica's seal keeper for one sealed table; cheap to share.
pub struct Sealer {
    policy: SealPolicy,
    clock: Arc<Hlc>,
    /// Striped by stream; held only around synchronous store calls.
    stripes: Vec<Mutex<()>>,
}

/// A fresh write was refused: its position is sealed on this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The replica's seal at the time.
    pub seal: u64,
}

impl Sealer {
    /// A sealer for `policy` reading `clock` (the replica's own).
    pub fn new(policy: SealPolicy, clock: Arc<Hlc>) -> Self {
        Sealer {
            policy,
            clock,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> SealPolicy {
        self.policy
    }

    /// Whether `table` is the sealed one.
    pub fn seals(&self, table: TableId) -> bool {
        table == self.policy.table
    }

    /// The seal now: fresh writes at or below it are refused.
    pub fn seal_now(&self) -> u64 {
        self.clock
            .peek()
            .saturating_sub(span(self.policy.window_ms))
    }

    /// Splits a sealed key into its stream and position (`None` when too short).
    pub fn split(key: &[u8]) -> Option<(&[u8], u64)> {
        let at = key.len().checked_sub(8)?;
        let pos: [u8; 8] = key[at..].try_into().ok()?;
        Some((&key[..at], u64::from_be_bytes(pos)))
    }

    fn stripe(&self, stream: &[u8]) -> &Mutex<()> {
        let h = xxhash_rust::xxh3::xxh3_64(stream) as usize;
        &self.stripes[h % STRIPES]
    }

    /// Runs `insert` for a fresh write of `key` unless its position is sealed; the check
    /// and the insert are atomic with respect to [`Sealer::scan`] of the same stream.
    pub fn insert_fresh<R>(&self, key: &[u8], insert: impl FnOnce() -> R) -> Result<R, Sealed> {
        let Some((stream, pos)) = Self::split(key) else {
            // Not a well-formed sealed key: nothing to protect; the store decides.
            return Ok(insert());
        };
        let _held = self.stripe(stream).lock();
        let seal = self.seal_now();
        if pos <= seal {
            return Err(Sealed { seal });
        }
        Ok(insert())
    }

    /// Runs `scan` (a read of one stream, the one `key` belongs to) under the stream's lock
    /// and returns its result with the seal taken just before it: every fresh write this
    /// replica accepts later is above that seal.
    pub fn scan<R>(&self, key: &[u8], scan: impl FnOnce() -> R) -> (R, u64) {
        let stream = Self::split(key).map_or(key, |(s, _)| s);
        let _held = self.stripe(stream).lock();
        let seal = self.seal_now();
        (scan(), seal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stream: u64, pos: u64) -> Vec<u8> {
        let mut k = stream.to_be_bytes().to_vec();
        k.extend_from_slice(&pos.to_be_bytes());
        k
    }

    #[test]
    fn a_fresh_write_below_a_reported_seal_is_refused() {
        let clock = Arc::new(Hlc::unleased(1));
        let sealer = Sealer::new(
            SealPolicy {
                table: 4,
                window_ms: 5_000,
            },
            clock.clone(),
        );
        let now = clock.tick();
        let ((), seal) = sealer.scan(&key(7, 0), || ());
        assert!(seal < now && now - seal >= span(5_000) - span(1));
        // At or below the seal: refused, and the seal never goes back.
        assert_eq!(
            sealer.insert_fresh(&key(7, seal), || ()),
            Err(Sealed {
                seal: sealer.seal_now()
            })
        );
        assert!(sealer.insert_fresh(&key(7, seal - 1), || ()).is_err());
        // A current position is taken.
        assert_eq!(sealer.insert_fresh(&key(7, clock.tick()), || 5), Ok(5));
        assert!(sealer.seal_now() >= seal);
        assert!(sealer.seals(4) && !sealer.seals(3));
        assert_eq!(
            Sealer::split(&key(7, 9)),
            Some((&7u64.to_be_bytes()[..], 9))
        );
        assert_eq!(Sealer::split(b"short"), None);
    }
}
