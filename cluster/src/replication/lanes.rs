//! Per-peer apply lanes: applies to one replica node that are waiting at the same moment
//! travel in one request ([`super::rpc::KIND_APPLY_MANY`]) instead of one request each.
//!
//! Each peer has a lane with at most [`MAX_IN_FLIGHT`] requests in flight. An apply that
//! finds room leads a round: it sends its own batch together with the ones queued behind
//! the lane's requests in flight (up to [`MAX_APPLY_MANY`] batches and [`MAX_ROUND_BYTES`]),
//! then hands the lead to the oldest apply still queued, which sends the next round. So under
//! load requests grow with the load instead of their number, and an apply that finds the lane
//! idle goes at once, alone, as a plain apply.
//!
//! No task is spawned: rounds are sent by the callers' own futures. A caller's future may be
//! dropped at any point (the coordinator bounds every apply by a timeout):
//! - dropped while leading: its [`Leadership`] passes the lead on when dropped, and the
//!   applies it carried get an error (their callers record hints, as for any failed apply);
//! - dropped while queued: its batch is skipped by the next round (its caller's timeout
//!   records the hint);
//! - dropped just as the lead was handed to it: its [`Waiting`] passes the lead on.
//!
//! So a lane never loses a leader, and a queued apply always has one ahead of it.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::record::ReplicaOp;
use super::rpc::{ApplyBatch, ApplyReply, MAX_APPLY_MANY};

/// Requests one node may have in flight to one peer's lane at once.
pub const MAX_IN_FLIGHT: usize = 4;

/// Op bytes carried by one round at most (a round always carries its leader's own batch,
/// whatever its size).
pub const MAX_ROUND_BYTES: usize = 1 << 20;

/// What a queued apply is told.
pub(super) enum Turn {
    /// Its batch was carried by another apply's round: the peer's answer, or why the round
    /// failed.
    Done(Result<ApplyReply, String>),
    /// It leads the next round (its batch comes back to it).
    Lead(ApplyBatch),
}

struct Queued {
    batch: ApplyBatch,
    turn: oneshot::Sender<Turn>,
}

#[derive(Default)]
struct Lane {
    /// Rounds being led (at most [`MAX_IN_FLIGHT`]).
    leaders: usize,
    queue: VecDeque<Queued>,
}

/// The lanes of one node, by peer address.
#[derive(Default)]
pub struct Lanes {
    lanes: Mutex<HashMap<SocketAddr, Lane>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("peers", &self.lanes.lock().len())
            .finish()
    }
}

/// One round: the leader's own batch, then queued ones with where their answers go.
pub(super) struct Round {
    pub own: ApplyBatch,
    pub carried: Vec<(ApplyBatch, oneshot::Sender<Turn>)>,
}

/// What an apply entering a lane does.
pub(super) enum Entered {
    /// Lead this round now.
    Lead(Round, Leadership),
    /// Wait in the queue.
    Wait(Waiting),
}

impl Lanes {
    /// Enters `batch` into the lane of `peer`.
    pub(super) fn enter(self: &Arc<Self>, peer: SocketAddr, batch: ApplyBatch) -> Entered {
        let mut lanes = self.lanes.lock();
        let lane = lanes.entry(peer).or_default();
        if lane.leaders < MAX_IN_FLIGHT {
            lane.leaders += 1;
            let carried = take(lane, batch_bytes(&batch));
            let leadership = Leadership {
                lanes: self.clone(),
                peer,
            };
            return Entered::Lead(
                Round {
                    own: batch,
                    carried,
                },
                leadership,
            );
        }
        let (turn, rx) = oneshot::channel();
        lane.queue.push_back(Queued { batch, turn });
        Entered::Wait(Waiting {
            rx,
            lanes: self.clone(),
            peer,
        })
    }

    /// The round of an apply the lead was handed to (with its own batch back).
    pub(super) fn lead(self: &Arc<Self>, peer: SocketAddr, own: ApplyBatch) -> (Round, Leadership) {
        let carried = match self.lanes.lock().get_mut(&peer) {
            Some(lane) => take(lane, batch_bytes(&own)),
            None => Vec::new(),
        };
        let leadership = Leadership {
            lanes: self.clone(),
            peer,
        };
        (Round { own, carried }, leadership)
    }

    /// Passes the lead of `peer`'s lane to the oldest apply still waiting, or gives the
    /// round's slot back.
    fn pass_on(&self, peer: SocketAddr) {
        let mut lanes = self.lanes.lock();
        let MapEntry::Occupied(mut entry) = lanes.entry(peer) else {
            return;
        };
        let lane = entry.get_mut();
        while let Some(next) = lane.queue.pop_front() {
            match next.turn.send(Turn::Lead(next.batch)) {
                Ok(()) => return,
                Err(_) => continue, // its caller is gone: its timeout recorded a hint
            }
        }
        lane.leaders = lane.leaders.saturating_sub(1);
        if lane.leaders == 0 {
            entry.remove();
        }
    }

    /// Whether no lane is in use (for tests).
    #[cfg(test)]
    pub(super) fn is_idle(&self) -> bool {
        self.lanes.lock().is_empty()
    }

    /// Applies queued on `peer`'s lane (for tests).
    #[cfg(test)]
    pub(super) fn queued(&self, peer: SocketAddr) -> usize {
        self.lanes.lock().get(&peer).map_or(0, |l| l.queue.len())
    }
}

/// Takes queued batches for a round whose leader's own batch has `bytes`.
fn take(lane: &mut Lane, mut bytes: usize) -> Vec<(ApplyBatch, oneshot::Sender<Turn>)> {
    let mut carried = Vec::new();
    while carried.len() + 1 < MAX_APPLY_MANY {
        let Some(next) = lane.queue.front() else {
            break;
        };
        let size = batch_bytes(&next.batch);
        if bytes + size > MAX_ROUND_BYTES {
            break;
        }
        let Some(next) = lane.queue.pop_front() else {
            break;
        };
        if next.turn.is_closed() {
            continue; // its caller is gone
        }
        bytes += size;
        carried.push((next.batch, next.turn));
    }
    carried
}

fn batch_bytes(batch: &ApplyBatch) -> usize {
    batch.ops.iter().map(ReplicaOp::size).sum()
}

/// Held while leading a round; passes the lead on when dropped, whether the round ended or
/// its caller's future was dropped in the middle of it.
pub(super) struct Leadership {
    lanes: Arc<Lanes>,
    peer: SocketAddr,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.lanes.pass_on(self.peer);
    }
}

/// A queued apply's wait for its turn.
pub(super) struct Waiting {
    rx: oneshot::Receiver<Turn>,
    lanes: Arc<Lanes>,
    peer: SocketAddr,
}

impl Waiting {
    /// The turn; `None` when the round that carried this apply was dropped before answering.
    pub(super) async fn turn(&mut self) -> Option<Turn> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Handed the lead but going away without using it: pass it on, or the lane would
        // keep a slot nobody leads. (After `turn` returned this finds nothing.)
        self.rx.close();
        if let Ok(Turn::Lead(_)) = self.rx.try_recv() {
            self.lanes.pass_on(self.peer);
        }
    }
}
