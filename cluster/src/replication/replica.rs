//! The two ways a coordinator reaches a replica: [`LocalReplica`] (this node's store, no
//! network hop) and [`ReplicaClient`] (another node). [`RpcReplicaClient`] implements the
//! latter over anything that carries a [`Request`] to a node ([`PeerCall`]): the QUIC
//! [`PeerEndpoint`] in production, [`super::memory::MemoryNetwork`] in tests.

use std::error::Error;
use std::future::Future;
use std::sync::Arc;

use super::lanes::{Entered, Lanes, Round, Turn};
use super::record::Versioned;
use super::rpc::{
    self, ApplyBatch, ApplyOutcome, ApplyReply, CasReply, CasRequest, ConditionalApply,
    ConditionalOutcome, PullReply, PullRequest, ReadRequest, ScanReply, ScanRequest,
};
use super::topology::ReplicaNode;
use crate::transport::{PeerEndpoint, PeerError, Request, Response};

/// This node's own replica store. Implementations keep one [`Versioned`] per `(table, key)`
/// (tombstones too) and apply by [`Versioned::should_store`].
pub trait LocalReplica: Send + Sync + 'static {
    /// What the store reports when it fails.
    type Error: Error + Send + Sync + 'static;

    /// Stores every op that supersedes the stored copy; returns once they are durable. A
    /// [`ApplyBatch::fresh`] batch's ops on a sealed table at or below the replica's seal are
    /// refused ([`ApplyOutcome::Sealed`]; see [`super::seal`]), the others stored.
    fn apply(
        &self,
        batch: ApplyBatch,
    ) -> impl Future<Output = Result<ApplyOutcome, Self::Error>> + Send;

    /// Atomically: if the stored copy's version is at most `if_version_at_most` (or there is
    /// none), stores the op and returns [`ConditionalOutcome::Applied`] once durable;
    /// otherwise returns the stored copy.
    fn apply_if(
        &self,
        request: ConditionalApply,
    ) -> impl Future<Output = Result<ConditionalOutcome, Self::Error>> + Send;

    /// The stored copy of one key, tombstones included.
    fn read(
        &self,
        request: ReadRequest,
    ) -> impl Future<Output = Result<Option<Versioned>, Self::Error>> + Send;

    /// A range of one table, tombstones included ([`ScanRequest::key_bounds`] and
    /// [`ScanRequest::collect`] do the bookkeeping).
    fn scan(
        &self,
        request: ScanRequest,
    ) -> impl Future<Output = Result<ScanReply, Self::Error>> + Send;

    /// A page of the records of some partitions of one table, tombstones included
    /// ([`PullRequest::collect`] does the bookkeeping; the store knows which partition a
    /// key is in). Only called with a request that [`PullRequest::is_valid`].
    fn pull(
        &self,
        request: PullRequest,
    ) -> impl Future<Output = Result<PullReply, Self::Error>> + Send;
}

/// Calls to the replicas on other nodes.
pub trait ReplicaClient: Send + Sync + 'static {
    /// Why a call failed.
    type Error: Error + Send + Sync + 'static;

    /// [`LocalReplica::apply`] on `to`, with its clock reading.
    fn apply(
        &self,
        to: &ReplicaNode,
        batch: ApplyBatch,
    ) -> impl Future<Output = Result<ApplyReply, Self::Error>> + Send;

    /// [`LocalReplica::apply_if`] on `to`.
    fn apply_if(
        &self,
        to: &ReplicaNode,
        request: ConditionalApply,
    ) -> impl Future<Output = Result<ConditionalOutcome, Self::Error>> + Send;

    /// [`LocalReplica::read`] on `to`.
    fn read(
        &self,
        to: &ReplicaNode,
        request: ReadRequest,
    ) -> impl Future<Output = Result<Option<Versioned>, Self::Error>> + Send;

    /// [`LocalReplica::scan`] on `to`.
    fn scan(
        &self,
        to: &ReplicaNode,
        request: ScanRequest,
    ) -> impl Future<Output = Result<ScanReply, Self::Error>> + Send;

    /// [`LocalReplica::pull`] on `to`.
    fn pull(
        &self,
        to: &ReplicaNode,
        request: PullRequest,
    ) -> impl Future<Output = Result<PullReply, Self::Error>> + Send;

    /// Asks `to`, the partition's primary, to run a compare-and-swap.
    fn cas(
        &self,
        to: &ReplicaNode,
        request: CasRequest,
    ) -> impl Future<Output = Result<CasReply, Self::Error>> + Send;
}

/// Carries one request to a node and brings back its reply.
pub trait PeerCall: Send + Sync + 'static {
    /// Why a call failed.
    type Error: Error + Send + Sync + 'static;

    /// Sends `request` to `to` and waits for the reply.
    fn call(
        &self,
        to: &ReplicaNode,
        request: Request,
    ) -> impl Future<Output = Result<Response, Self::Error>> + Send;

    /// Whether `error` is the peer saying it does not know the request's kind (an older
    /// node): the request may then be sent in an older form.
    fn unknown_kind(error: &Self::Error) -> bool {
        let _ = error;
        false
    }
}

impl PeerCall for PeerEndpoint {
    type Error = PeerError;

    async fn call(&self, to: &ReplicaNode, request: Request) -> Result<Response, PeerError> {
        self.request(to.addr, &to.server_name, request).await
    }

    fn unknown_kind(error: &PeerError) -> bool {
        matches!(error, PeerError::Remote { error, .. } if error.code == rpc::codes::UNKNOWN_KIND)
    }
}

/// A replica call over a [`PeerCall`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E: Error + 'static> {
    /// The transport failed (or the peer answered with an error).
    #[error(transparent)]
    Transport(E),
    /// The request could not be encoded.
    #[error("cannot encode a replication request: {0}")]
    Encode(bincode::error::EncodeError),
    /// The reply could not be decoded.
    #[error("undecodable replication reply: {0}")]
    Decode(bincode::error::DecodeError),
    /// The request that carried this apply together with others failed, or was abandoned
    /// by the apply that sent it ([`super::lanes`]).
    #[error("{0}")]
    Carried(String),
}

/// [`ReplicaClient`] over a [`PeerCall`]: encodes each call as a [`Request`] of its
/// replication kind. Applies to one peer that wait at the same moment go in one request
/// ([`super::lanes`]).
#[derive(Clone, Debug)]
pub struct RpcReplicaClient<T> {
    transport: T,
    lanes: Arc<Lanes>,
}

/// The production client: replica calls over the QUIC peer transport.
pub type PeerReplicaClient = RpcReplicaClient<PeerEndpoint>;

impl<T: PeerCall> RpcReplicaClient<T> {
    /// A client sending over `transport`.
    pub fn new(transport: T) -> Self {
        Self {
            transport,
            lanes: Arc::default(),
        }
    }

    #[cfg(test)]
    pub(super) fn lanes_for_tests(&self) -> &Arc<Lanes> {
        &self.lanes
    }

    /// Sends one round of its lane: the leader's own batch alone as a plain apply, or with
    /// the batches it carries as one apply-many request, whose answers go to their callers.
    /// Returns the leader's own answer.
    async fn send_round(
        &self,
        to: &ReplicaNode,
        round: Round,
    ) -> Result<ApplyReply, CallError<T::Error>> {
        let Round { own, carried } = round;
        if carried.is_empty() {
            return self.call(to, rpc::KIND_APPLY, &own).await;
        }
        metrics::histogram!("cluster_apply_batches_per_request").record((carried.len() + 1) as f64);
        let (batches, turns): (Vec<ApplyBatch>, Vec<_>) = std::iter::once((own, None))
            .chain(carried.into_iter().map(|(b, t)| (b, Some(t))))
            .unzip();
        let reply: Result<rpc::ApplyManyReply, _> =
            self.call(to, rpc::KIND_APPLY_MANY, &batches).await;
        let answers: Vec<Result<ApplyReply, String>> = match reply {
            Ok(reply) if reply.outcomes.len() == batches.len() => reply
                .outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    rpc::ManyOutcome::Done(outcome) => Ok(ApplyReply {
                        outcome,
                        hlc: reply.hlc,
                    }),
                    rpc::ManyOutcome::Failed(error) => Err(error),
                })
                .collect(),
            Ok(reply) => {
                let error = format!(
                    "apply-many: {} answers to {} batches",
                    reply.outcomes.len(),
                    batches.len()
                );
                vec![Err(error); batches.len()]
            }
            Err(CallError::Transport(error)) if T::unknown_kind(&error) => {
                // An older peer: one plain apply each, at once.
                let calls = batches
                    .iter()
                    .map(|batch| self.call::<_, ApplyReply>(to, rpc::KIND_APPLY, batch));
                futures_util::future::join_all(calls)
                    .await
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect()
            }
            Err(error) => vec![Err(error.to_string()); batches.len()],
        };
        let mut own = None;
        for (answer, turn) in answers.into_iter().zip(turns) {
            match turn {
                // The caller may have timed out and gone.
                Some(turn) => drop(turn.send(Turn::Done(answer))),
                None => own = Some(answer),
            }
        }
        own.unwrap_or_else(|| Err("apply-many: no answer for the leader".into()))
            .map_err(CallError::Carried)
    }

    async fn call<Q: bincode::Encode, A: bincode::Decode<()>>(
        &self,
        to: &ReplicaNode,
        kind: u16,
        body: &Q,
    ) -> Result<A, CallError<T::Error>> {
        let body = rpc::encode(body).map_err(CallError::Encode)?;
        let reply = self
            .transport
            .call(to, Request { kind, body })
            .await
            .map_err(CallError::Transport)?;
        rpc::decode(&reply.body).map_err(CallError::Decode)
    }
}

impl<T: PeerCall> ReplicaClient for RpcReplicaClient<T> {
    type Error = CallError<T::Error>;

    async fn apply(&self, to: &ReplicaNode, batch: ApplyBatch) -> Result<ApplyReply, Self::Error> {
        let (round, leadership) = match self.lanes.enter(to.addr, batch) {
            Entered::Lead(round, leadership) => (round, leadership),
            Entered::Wait(mut waiting) => match waiting.turn().await {
                Some(Turn::Done(answer)) => return answer.map_err(CallError::Carried),
                Some(Turn::Lead(own)) => self.lanes.lead(to.addr, own),
                None => {
                    return Err(CallError::Carried(
                        "the request carrying this apply was abandoned".into(),
                    ))
                }
            },
        };
        let answer = self.send_round(to, round).await;
        drop(leadership);
        answer
    }

    async fn apply_if(
        &self,
        to: &ReplicaNode,
        request: ConditionalApply,
    ) -> Result<ConditionalOutcome, Self::Error> {
        self.call(to, rpc::KIND_APPLY_IF, &request).await
    }

    async fn read(
        &self,
        to: &ReplicaNode,
        request: ReadRequest,
    ) -> Result<Option<Versioned>, Self::Error> {
        self.call(to, rpc::KIND_READ, &request).await
    }

    async fn scan(&self, to: &ReplicaNode, request: ScanRequest) -> Result<ScanReply, Self::Error> {
        self.call(to, rpc::KIND_SCAN, &request).await
    }

    async fn pull(&self, to: &ReplicaNode, request: PullRequest) -> Result<PullReply, Self::Error> {
        self.call(to, rpc::KIND_PULL, &request).await
    }

    async fn cas(&self, to: &ReplicaNode, request: CasRequest) -> Result<CasReply, Self::Error> {
        self.call(to, rpc::KIND_CAS, &request).await
    }
}
