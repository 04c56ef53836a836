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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::replication::replica::{PeerCall, ReplicaClient, RpcReplicaClient};
    use crate::replication::rpc::{self, codes, ApplyManyReply, ApplyOutcome, ManyOutcome};
    use crate::replication::topology::ReplicaNode;
    use crate::transport::{RemoteError, Request, Response};

    /// A peer that answers applies after `delay`, records every batch it was sent (by key),
    /// and hangs on batches whose key starts with `hang`. An `old` peer does not know
    /// apply-many.
    #[derive(Clone, Default)]
    struct FakePeer {
        delay: Duration,
        old: bool,
        seen: Arc<Mutex<Vec<Sent>>>,
    }

    /// A request's kind and the keys of the batches it carried.
    type Sent = (u16, Vec<Vec<u8>>);

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct FakeError(RemoteError);

    fn key(batch: &ApplyBatch) -> Vec<u8> {
        batch.ops[0].key.clone()
    }

    impl PeerCall for FakePeer {
        type Error = FakeError;

        async fn call(&self, _to: &ReplicaNode, request: Request) -> Result<Response, FakeError> {
            let batches: Vec<ApplyBatch> = match request.kind {
                rpc::KIND_APPLY => vec![rpc::decode(&request.body).expect("apply")],
                rpc::KIND_APPLY_MANY if self.old => {
                    return Err(FakeError(RemoteError::new(codes::UNKNOWN_KIND, "old")))
                }
                rpc::KIND_APPLY_MANY => rpc::decode(&request.body).expect("apply-many"),
                kind => panic!("unexpected kind {kind:#x}"),
            };
            self.seen
                .lock()
                .push((request.kind, batches.iter().map(key).collect()));
            if batches.iter().any(|b| key(b).starts_with(b"hang")) {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.delay).await;
            let body = if request.kind == rpc::KIND_APPLY {
                rpc::encode(&ApplyReply {
                    outcome: ApplyOutcome::Applied,
                    hlc: 7,
                })
            } else {
                let outcomes = batches
                    .iter()
                    .map(|_| ManyOutcome::Done(ApplyOutcome::Applied))
                    .collect();
                rpc::encode(&ApplyManyReply { outcomes, hlc: 7 })
            };
            Ok(Response {
                body: body.expect("encode"),
            })
        }

        fn unknown_kind(error: &FakeError) -> bool {
            error.0.code == codes::UNKNOWN_KIND
        }
    }

    fn peer() -> ReplicaNode {
        ReplicaNode {
            id: 2,
            addr: "127.0.0.1:9002".parse().expect("addr"),
            server_name: "node-2".into(),
            live: true,
        }
    }

    fn batch(name: &str) -> ApplyBatch {
        ApplyBatch::fresh(
            crate::placement::Partition(1),
            vec![ReplicaOp::put(1, name.as_bytes().to_vec(), vec![0; 100], 1)],
        )
    }

    /// Starts `n` applies named `{prefix}{i}` at once.
    fn start(
        client: &RpcReplicaClient<FakePeer>,
        prefix: &str,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<ApplyReply, String>>> {
        (0..n)
            .map(|i| {
                let (client, b) = (client.clone(), batch(&format!("{prefix}{i}")));
                tokio::spawn(
                    async move { client.apply(&peer(), b).await.map_err(|e| e.to_string()) },
                )
            })
            .collect()
    }

    /// Every key the peer was sent, with how often.
    fn sent(fake: &FakePeer, kind: Option<u16>) -> Vec<Vec<u8>> {
        let seen = fake.seen.lock();
        seen.iter()
            .filter(|(k, _)| kind.is_none_or(|want| *k == want))
            .flat_map(|(_, keys)| keys.clone())
            .collect()
    }

    #[tokio::test]
    async fn concurrent_applies_to_one_peer_share_requests_and_each_gets_its_answer() {
        let fake = FakePeer {
            delay: Duration::from_millis(20),
            ..FakePeer::default()
        };
        let client = RpcReplicaClient::new(fake.clone());
        for task in start(&client, "k", 100) {
            let reply = task.await.expect("join").expect("apply");
            assert_eq!(reply.outcome, ApplyOutcome::Applied);
            assert_eq!(reply.hlc, 7);
        }
        let requests = fake.seen.lock().len();
        assert!(
            requests < 40,
            "100 applies took {requests} requests: they did not travel together"
        );
        let keys = sent(&fake, None);
        assert_eq!(keys.len(), 100, "each batch is sent exactly once");
        assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 100);
        assert!(sent(&fake, Some(rpc::KIND_APPLY_MANY)).len() > 50);
        assert!(
            client_lanes(&client).lanes.lock().is_empty(),
            "an idle lane is gone"
        );
    }

    #[tokio::test]
    async fn an_older_peer_gets_the_batches_one_by_one() {
        let fake = FakePeer {
            delay: Duration::from_millis(20),
            old: true,
            ..FakePeer::default()
        };
        let client = RpcReplicaClient::new(fake.clone());
        for task in start(&client, "k", 30) {
            assert_eq!(
                task.await.expect("join").expect("apply").outcome,
                ApplyOutcome::Applied
            );
        }
        let plain = sent(&fake, Some(rpc::KIND_APPLY));
        assert_eq!(plain.len(), 30, "each batch applied once, as a plain apply");
        assert_eq!(plain.iter().collect::<HashSet<_>>().len(), 30);
    }

    #[tokio::test]
    async fn leaders_dropped_in_the_middle_of_a_round_pass_the_lead_on() {
        let fake = FakePeer {
            delay: Duration::from_millis(5),
            ..FakePeer::default()
        };
        let client = RpcReplicaClient::new(fake.clone());
        // Every slot of the lane is taken by a round that never answers...
        let hanging = start(&client, "hang", MAX_IN_FLIGHT);
        tokio::time::timeout(Duration::from_secs(5), async {
            while fake.seen.lock().len() < MAX_IN_FLIGHT {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the hanging rounds were sent");
        // ...so these queue behind them; one of them is dropped while it waits.
        let queued = start(&client, "q", 20);
        let gone = start(&client, "gone", 1);
        tokio::time::timeout(Duration::from_secs(5), async {
            while client_lanes(&client).queued(peer().addr) < 21 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("queued");
        gone[0].abort();
        // The callers of the hanging rounds give up (as the coordinator's timeout does).
        for task in hanging {
            task.abort();
        }
        for task in queued {
            let reply = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("a queued apply was left without a leader")
                .expect("join")
                .expect("apply");
            assert_eq!(reply.outcome, ApplyOutcome::Applied);
        }
        let q: Vec<_> = sent(&fake, None)
            .into_iter()
            .filter(|k| k.starts_with(b"q"))
            .collect();
        assert_eq!(q.len(), 20);
        assert_eq!(client_lanes(&client).queued(peer().addr), 0);
        assert!(
            client_lanes(&client).lanes.lock().is_empty(),
            "no slot was lost"
        );
    }

    #[test]
    fn a_waiter_dropped_just_after_the_lead_was_handed_to_it_passes_it_on() {
        let lanes = Arc::new(Lanes::default());
        let addr = peer().addr;
        let mut leaders: Vec<Leadership> = (0..MAX_IN_FLIGHT)
            .map(|i| match lanes.enter(addr, batch(&format!("l{i}"))) {
                Entered::Lead(_, leadership) => leadership,
                Entered::Wait(_) => panic!("a free slot"),
            })
            .collect();
        let Entered::Wait(first) = lanes.enter(addr, batch("w1")) else {
            panic!("the lane is full")
        };
        let Entered::Wait(mut second) = lanes.enter(addr, batch("w2")) else {
            panic!("the lane is full")
        };
        // A round ends: the lead goes to `first`, which is dropped before it looks.
        drop(leaders.pop());
        drop(first);
        // It went on to `second`.
        let turn = futures_util::FutureExt::now_or_never(second.turn()).flatten();
        assert!(matches!(turn, Some(Turn::Lead(b)) if key(&b) == b"w2"));
        let (_, leadership) = lanes.lead(addr, batch("w2"));
        leaders.push(leadership);
        drop(second);
        drop(leaders);
        assert!(lanes.lanes.lock().is_empty(), "every slot came back");
    }

    fn client_lanes(client: &RpcReplicaClient<FakePeer>) -> &Arc<Lanes> {
        client.lanes_for_tests()
    }
}
