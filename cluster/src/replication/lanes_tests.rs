//! Tests of the per-peer apply lanes ([`super::lanes`]) through [`RpcReplicaClient`], in a
//! file of their own so that the lanes do not import the client that uses them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::lanes::{Entered, Lanes, Leadership, Turn, MAX_IN_FLIGHT};
use super::record::ReplicaOp;
use super::replica::{PeerCall, ReplicaClient, RpcReplicaClient};
use super::rpc::{self, codes, ApplyManyReply, ApplyOutcome, ManyOutcome};
use super::rpc::{ApplyBatch, ApplyReply};
use super::topology::ReplicaNode;
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
            tokio::spawn(async move { client.apply(&peer(), b).await.map_err(|e| e.to_string()) })
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
    assert!(client_lanes(&client).is_idle(), "an idle lane is gone");
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
    assert!(client_lanes(&client).is_idle(), "no slot was lost");
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
    assert!(lanes.is_idle(), "every slot came back");
}

fn client_lanes(client: &RpcReplicaClient<FakePeer>) -> &Arc<Lanes> {
    client.lanes_for_tests()
}
