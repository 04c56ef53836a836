//! In-memory twins for tests: [`MemoryReplica`], a [`LocalReplica`] in a `BTreeMap`, and
//! [`MemoryNetwork`], a [`PeerCall`] that hands requests straight to each node's handler and
//! can cut, delay or hang any link, or lose replies after the request ran.
//!
//! A cluster of coordinators over these runs in one test process with no sockets; with
//! `tokio::time::pause` the timeouts and delays take no real time.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::record::{ScanEntry, TableId, Versioned};
use super::replica::{LocalReplica, PeerCall};
use super::rpc::{
    ApplyBatch, ApplyOutcome, ConditionalApply, ConditionalOutcome, PullReply, PullRequest,
    ReadRequest, ScanReply, ScanRequest,
};
use super::seal::{SealPolicy, Sealed, Sealer};
use super::topology::ReplicaNode;
use crate::clock::Hlc;
use crate::placement::{partition_of, NodeId};
use crate::transport::{RemoteError, Request, Response, RpcHandler};

/// The in-memory replica store was told to fail ([`MemoryReplica::set_failing`]).
#[derive(Debug, thiserror::Error)]
#[error("the in-memory replica is failing on purpose")]
pub struct MemoryStoreFailed;

/// A replica store in memory: one [`Versioned`] per `(table, key)`, with an optional
/// sealed table ([`MemoryReplica::sealed`]).
#[derive(Default)]
pub struct MemoryReplica {
    records: Mutex<BTreeMap<(TableId, Vec<u8>), Versioned>>,
    failing: AtomicBool,
    sealer: Option<Sealer>,
}

impl MemoryReplica {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that seals `policy.table` by `clock` ([`super::seal`]).
    pub fn sealed(policy: SealPolicy, clock: Arc<Hlc>) -> Self {
        Self {
            sealer: Some(Sealer::new(policy, clock)),
            ..Self::default()
        }
    }

    /// Makes every call fail (a broken disk) until called with `false`.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// The stored copy of a key (for assertions).
    pub fn record(&self, table: TableId, key: &[u8]) -> Option<Versioned> {
        self.records.lock().get(&(table, key.to_vec())).cloned()
    }

    /// How many records (tombstones included) are stored.
    pub fn len(&self) -> usize {
        self.records.lock().len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self) -> Result<(), MemoryStoreFailed> {
        if self.failing.load(Ordering::SeqCst) {
            Err(MemoryStoreFailed)
        } else {
            Ok(())
        }
    }
}

impl LocalReplica for MemoryReplica {
    type Error = MemoryStoreFailed;

    async fn apply(&self, batch: ApplyBatch) -> Result<ApplyOutcome, MemoryStoreFailed> {
        self.check()?;
        let mut outcome = ApplyOutcome::Applied;
        for op in batch.ops {
            let store = || {
                let mut records = self.records.lock();
                let record = op.record();
                let key = (op.table, op.key.clone());
                if Versioned::should_store(records.get(&key), &record) {
                    records.insert(key, record);
                }
            };
            match &self.sealer {
                Some(sealer) if batch.fresh && op.value.is_some() && sealer.seals(op.table) => {
                    if let Err(Sealed { seal }) = sealer.insert_fresh(&op.key, store) {
                        outcome = ApplyOutcome::Sealed { seal };
                    }
                }
                _ => store(),
            }
        }
        Ok(outcome)
    }

    async fn apply_if(
        &self,
        request: ConditionalApply,
    ) -> Result<ConditionalOutcome, MemoryStoreFailed> {
        self.check()?;
        let mut records = self.records.lock();
        let op = request.op;
        let key = (op.table, op.key.clone());
        if let Some(current) = records.get(&key) {
            if current.version > request.if_version_at_most {
                return Ok(ConditionalOutcome::Stale {
                    current: current.clone(),
                });
            }
        }
        let record = op.record();
        if Versioned::should_store(records.get(&key), &record) {
            records.insert(key, record);
        }
        Ok(ConditionalOutcome::Applied)
    }

    async fn read(&self, request: ReadRequest) -> Result<Option<Versioned>, MemoryStoreFailed> {
        self.check()?;
        Ok(self.record(request.table, &request.key))
    }

    /// Keys are their own partition keys here (`partition_of(key)`).
    async fn pull(&self, request: PullRequest) -> Result<PullReply, MemoryStoreFailed> {
        self.check()?;
        let table = request.table;
        let start = match &request.after {
            Some(after) => Bound::Excluded((table, after.clone())),
            None => Bound::Included((table, Vec::new())),
        };
        let records = self.records.lock();
        let entries = records
            .range((start, Bound::Unbounded))
            .take_while(|((t, _), _)| *t == table)
            .map(|((_, key), record)| Ok::<_, MemoryStoreFailed>((key.clone(), record.clone())));
        request.collect(entries, |key| {
            Some(partition_of(key, request.partition_count))
        })
    }

    async fn scan(&self, request: ScanRequest) -> Result<ScanReply, MemoryStoreFailed> {
        self.check()?;
        let Some((lower, upper)) = request.key_bounds() else {
            return Ok(ScanReply::default());
        };
        let table = request.table;
        let bound = |b: Bound<&[u8]>| match b {
            Bound::Included(k) => Bound::Included((table, k.to_vec())),
            Bound::Excluded(k) => Bound::Excluded((table, k.to_vec())),
            Bound::Unbounded => Bound::Unbounded,
        };
        let read = || {
            let records = self.records.lock();
            let range = records.range((bound(lower), bound(upper)));
            let entry = |((_, key), record): (&(TableId, Vec<u8>), &Versioned)| {
                Ok::<_, MemoryStoreFailed>(ScanEntry {
                    key: key.clone(),
                    record: record.clone(),
                })
            };
            if request.descending {
                request.collect(range.rev().map(entry))
            } else {
                request.collect(range.map(entry))
            }
        };
        match &self.sealer {
            Some(sealer) if sealer.seals(table) => {
                let (reply, seal) = sealer.scan(&request.start, read);
                reply.map(|r| ScanReply {
                    seal: Some(seal),
                    ..r
                })
            }
            _ => read(),
        }
    }
}

/// How a link behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Delivers at once.
    Up,
    /// Fails every call at once, the request unseen.
    Down,
    /// Delivers after this long.
    Delay(Duration),
    /// Never answers (the caller's timeout fires).
    Hang,
    /// Delivers the request, then loses the reply.
    DropReplies,
}

/// A call over a [`MemoryNetwork`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryCallError {
    /// The link is down, the reply was dropped, or no handler is registered.
    #[error("node {0} unreachable")]
    Unreachable(NodeId),
    /// The handler answered with an error.
    #[error(transparent)]
    Remote(RemoteError),
}

/// Nodes' request handlers, reachable through [`MemoryEndpoint`]s, with programmable links.
#[derive(Default)]
pub struct MemoryNetwork {
    handlers: Mutex<HashMap<NodeId, Arc<dyn RpcHandler>>>,
    /// Per `(from, to)`, and per `to` for every sender (`from: None`).
    links: Mutex<HashMap<(Option<NodeId>, NodeId), Link>>,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `node` reachable, served by `handler`.
    pub fn register(&self, node: NodeId, handler: Arc<dyn RpcHandler>) {
        self.handlers.lock().insert(node, handler);
    }

    /// Sets every link into `node` (links set with [`MemoryNetwork::set_link`] take
    /// precedence).
    pub fn set_node(&self, node: NodeId, link: Link) {
        self.links.lock().insert((None, node), link);
    }

    /// Sets the link from `from` to `to`.
    pub fn set_link(&self, from: NodeId, to: NodeId, link: Link) {
        self.links.lock().insert((Some(from), to), link);
    }

    /// Resets every link to [`Link::Up`].
    pub fn heal(&self) {
        self.links.lock().clear();
    }

    /// The sending end for node `from`.
    pub fn endpoint(self: &Arc<Self>, from: NodeId) -> MemoryEndpoint {
        MemoryEndpoint {
            network: self.clone(),
            from,
        }
    }

    fn link(&self, from: NodeId, to: NodeId) -> Link {
        let links = self.links.lock();
        links
            .get(&(Some(from), to))
            .or_else(|| links.get(&(None, to)))
            .copied()
            .unwrap_or(Link::Up)
    }
}

/// One node's sending end of a [`MemoryNetwork`].
#[derive(Clone)]
pub struct MemoryEndpoint {
    network: Arc<MemoryNetwork>,
    from: NodeId,
}

impl PeerCall for MemoryEndpoint {
    type Error = MemoryCallError;

    async fn call(&self, to: &ReplicaNode, request: Request) -> Result<Response, MemoryCallError> {
        let link = self.network.link(self.from, to.id);
        match link {
            Link::Down => return Err(MemoryCallError::Unreachable(to.id)),
            Link::Hang => std::future::pending::<()>().await,
            Link::Delay(delay) => tokio::time::sleep(delay).await,
            Link::Up | Link::DropReplies => {}
        }
        let handler = self.network.handlers.lock().get(&to.id).cloned();
        let handler = handler.ok_or(MemoryCallError::Unreachable(to.id))?;
        let from = SocketAddr::from((Ipv4Addr::LOCALHOST, self.from));
        let reply = handler
            .handle(from, request)
            .await
            .map_err(MemoryCallError::Remote)?;
        if link == Link::DropReplies {
            return Err(MemoryCallError::Unreachable(to.id));
        }
        Ok(reply)
    }

    fn unknown_kind(error: &MemoryCallError) -> bool {
        matches!(error, MemoryCallError::Remote(e) if e.code == super::rpc::codes::UNKNOWN_KIND)
    }
}
