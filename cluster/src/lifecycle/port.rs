//! What the lifecycle needs from gossip membership: [`MembershipPort`], implemented by the
//! chitchat-backed [`Membership`] and by the in-memory twin
//! ([`crate::membership::memory::MemoryMembership`]).

use std::future::Future;

use tokio::sync::watch;

use crate::membership::{Lifecycle, Member, Membership, MoveProgress, Removals};
use crate::placement::NodeId;
use crate::transport::BoxFuture;

/// This node's membership as the lifecycle uses it: read who is in the cluster, follow
/// changes, publish this node's state and its pending list.
pub trait MembershipPort: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> NodeId;

    /// Every member gossip knows of, live or dead, this node included, one entry per
    /// generation still remembered (see [`Membership::members`]).
    fn members(&self) -> impl Future<Output = Vec<Member>> + Send;

    /// The live members (this node included), updated whenever one of them changes
    /// (state, pending list, liveness, a new generation). Await `changed()` and then read
    /// [`MembershipPort::members`] to follow membership.
    fn watch_members(&self) -> watch::Receiver<Vec<Member>>;

    /// Publishes this node's lifecycle state.
    fn set_state(&self, state: Lifecycle) -> impl Future<Output = ()> + Send;

    /// Publishes the joining nodes this node's coordinator treats as pending (the join
    /// barrier). Publishing the list it already has changes nothing (not even its version).
    fn set_pending(&self, pending: &[NodeId]) -> impl Future<Output = ()> + Send;

    /// Publishes the removal map this node knows (see [`crate::membership::Removals`]).
    fn set_removals(&self, removals: &Removals) -> impl Future<Output = ()> + Send;

    /// Publishes the move mark of the last move this node pulled for (empty: none).
    fn set_moved(&self, mark: &str) -> impl Future<Output = ()> + Send;

    /// Publishes this node's progress pulling the partitions it takes over.
    fn set_move_progress(&self, progress: MoveProgress) -> impl Future<Output = ()> + Send;
}

impl MembershipPort for Membership {
    fn node_id(&self) -> NodeId {
        Membership::node_id(self)
    }

    async fn members(&self) -> Vec<Member> {
        Membership::members(self).await
    }

    fn watch_members(&self) -> watch::Receiver<Vec<Member>> {
        Membership::watch_members(self)
    }

    async fn set_state(&self, state: Lifecycle) {
        Membership::set_state(self, state).await;
    }

    async fn set_pending(&self, pending: &[NodeId]) {
        Membership::set_pending(self, pending).await;
    }

    async fn set_removals(&self, removals: &Removals) {
        Membership::set_removals(self, removals).await;
    }

    async fn set_moved(&self, mark: &str) {
        Membership::set_moved(self, mark).await;
    }

    async fn set_move_progress(&self, progress: MoveProgress) {
        Membership::set_move_progress(self, progress).await;
    }
}

/// Publishing a state, object-safe, so the (non-generic) handle can say `leaving`.
pub(super) trait PublishState: Send + Sync {
    /// See [`MembershipPort::set_state`].
    fn publish_state(&self, state: Lifecycle) -> BoxFuture<'_, ()>;
}

impl<M: MembershipPort> PublishState for M {
    fn publish_state(&self, state: Lifecycle) -> BoxFuture<'_, ()> {
        Box::pin(self.set_state(state))
    }
}
