//! The serving side: answers replication requests from other nodes' coordinators with this
//! node's [`LocalReplica`], and runs forwarded compare-and-swaps on this node's
//! [`Coordinator`] when it is the primary.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};

use super::coordinator::{Coordinator, Inner};
use super::replica::{LocalReplica, ReplicaClient};
use super::rpc::{self, codes};
use crate::clock::Hlc;
use crate::transport::{BoxFuture, RemoteError, Request, Response, RpcHandler};

/// Serves the replication request kinds ([`rpc::is_replication_kind`]). Usable directly as
/// the endpoint's [`RpcHandler`], or called from the node's own router with
/// [`ReplicaService::serve`].
///
/// The coordinator is attached after the peer endpoint exists ([`ReplicaService::attach`]),
/// since the coordinator's client needs the endpoint and the endpoint needs this handler;
/// until then forwarded compare-and-swaps are refused with [`codes::NOT_READY`]. The service
/// holds the coordinator weakly, so there is no reference cycle.
pub struct ReplicaService<L: LocalReplica, C: ReplicaClient> {
    local: Arc<L>,
    coordinator: OnceLock<Weak<Inner<L, C>>>,
}

impl<L: LocalReplica, C: ReplicaClient> ReplicaService<L, C> {
    /// Serves `local` to other nodes.
    pub fn new(local: Arc<L>) -> Self {
        Self {
            local,
            coordinator: OnceLock::new(),
        }
    }

    /// Lets this node run compare-and-swaps forwarded to it as primary. Only the first call
    /// has an effect.
    pub fn attach(&self, coordinator: &Coordinator<L, C>) {
        let _ = self.coordinator.set(coordinator.downgrade());
    }

    /// This node's clock (the coordinator's), once attached.
    fn clock(&self) -> Option<Arc<Hlc>> {
        self.coordinator
            .get()
            .and_then(Weak::upgrade)
            .map(|inner| inner.clock.clone())
    }

    /// Answers one replication request.
    pub async fn serve(&self, request: Request) -> Result<Response, RemoteError> {
        let body = match request.kind {
            rpc::KIND_APPLY => {
                let batch: rpc::ApplyBatch = decode(&request.body)?;
                let clock = self.clock();
                if let Some(clock) = &clock {
                    clock.observe(batch.hlc);
                }
                let outcome = self.local.apply(batch).await.map_err(storage)?;
                let hlc = clock.map_or(0, |c| c.peek());
                encode(&rpc::ApplyReply { outcome, hlc })?
            }
            rpc::KIND_APPLY_MANY => {
                let batches: Vec<rpc::ApplyBatch> = decode(&request.body)?;
                if batches.is_empty() || batches.len() > rpc::MAX_APPLY_MANY {
                    return Err(RemoteError::new(
                        codes::BAD_REQUEST,
                        format!(
                            "apply-many: {} batches (1 to {} allowed)",
                            batches.len(),
                            rpc::MAX_APPLY_MANY
                        ),
                    ));
                }
                let clock = self.clock();
                if let Some(clock) = &clock {
                    if let Some(newest) = batches.iter().map(|b| b.hlc).max() {
                        clock.observe(newest);
                    }
                }
                // Applied together, so that the store's commit log syncs them at once.
                let outcomes = futures_util::future::join_all(
                    batches.into_iter().map(|batch| self.local.apply(batch)),
                )
                .await
                .into_iter()
                .map(|result| match result {
                    Ok(outcome) => rpc::ManyOutcome::Done(outcome),
                    Err(error) => rpc::ManyOutcome::Failed(error.to_string()),
                })
                .collect();
                let hlc = clock.map_or(0, |c| c.peek());
                encode(&rpc::ApplyManyReply { outcomes, hlc })?
            }
            rpc::KIND_APPLY_IF => {
                let conditional = decode(&request.body)?;
                encode(&self.local.apply_if(conditional).await.map_err(storage)?)?
            }
            rpc::KIND_READ => {
                let read = decode(&request.body)?;
                encode(&self.local.read(read).await.map_err(storage)?)?
            }
            rpc::KIND_SCAN => {
                let scan = decode(&request.body)?;
                encode(&self.local.scan(scan).await.map_err(storage)?)?
            }
            rpc::KIND_PULL => {
                let pull: rpc::PullRequest = decode(&request.body)?;
                if !pull.is_valid() {
                    return Err(RemoteError::new(
                        codes::BAD_REQUEST,
                        "pull: partitions must be ascending and below the partition count",
                    ));
                }
                encode(&self.local.pull(pull).await.map_err(storage)?)?
            }
            rpc::KIND_CAS => {
                let cas = decode(&request.body)?;
                let coordinator = self
                    .coordinator
                    .get()
                    .and_then(Weak::upgrade)
                    .ok_or_else(|| RemoteError::new(codes::NOT_READY, "no coordinator"))?;
                encode(&coordinator.cas_as_primary(cas).await)?
            }
            kind => {
                return Err(RemoteError::new(
                    codes::UNKNOWN_KIND,
                    format!("unknown replication request kind {kind:#06x}"),
                ))
            }
        };
        Ok(Response { body })
    }
}

impl<L: LocalReplica, C: ReplicaClient> RpcHandler for ReplicaService<L, C> {
    fn handle(
        &self,
        _from: SocketAddr,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, RemoteError>> {
        Box::pin(self.serve(request))
    }
}

fn decode<T: bincode::Decode<()>>(body: &[u8]) -> Result<T, RemoteError> {
    rpc::decode(body).map_err(|e| RemoteError::new(codes::BAD_REQUEST, e.to_string()))
}

fn encode<T: bincode::Encode>(value: &T) -> Result<Vec<u8>, RemoteError> {
    rpc::encode(value).map_err(|e| RemoteError::new(codes::STORAGE, e.to_string()))
}

fn storage(error: impl std::error::Error) -> RemoteError {
    RemoteError::new(codes::STORAGE, error.to_string())
}
