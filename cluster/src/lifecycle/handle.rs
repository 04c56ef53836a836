//! [`LifecycleHandle`]: the owner of the lifecycle's tasks.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use super::port::PublishState;
use super::{ClusterView, Phase, StartedAs};
use crate::membership::Lifecycle;

/// What [`super::ClusterLifecycle::start`] hands over.
pub(super) struct Parts {
    pub(super) started_as: StartedAs,
    pub(super) phase: Arc<watch::Sender<Phase>>,
    pub(super) view: watch::Receiver<ClusterView>,
    pub(super) tracker: TaskTracker,
    pub(super) tasks: Vec<(&'static str, JoinHandle<()>)>,
    pub(super) cancel: CancellationToken,
    pub(super) publisher: Arc<dyn PublishState>,
    pub(super) shutdown_timeout: Duration,
}

/// The running lifecycle: where this node is ([`LifecycleHandle::phase`]), what membership
/// looks like ([`LifecycleHandle::watch_view`]), and [`LifecycleHandle::shutdown`].
/// Dropping it stops the tasks without waiting for them.
pub struct LifecycleHandle {
    started_as: StartedAs,
    /// Shared with the tasks (the join task moves it to `Active`); kept here too, so the
    /// channel stays open while the handle lives.
    phase: Arc<watch::Sender<Phase>>,
    view: watch::Receiver<ClusterView>,
    tracker: TaskTracker,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    cancel: DropGuard,
    publisher: Arc<dyn PublishState>,
    shutdown_timeout: Duration,
}

/// The lifecycle stopped while this node was still joining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the lifecycle stopped while this node was still joining")]
pub struct NeverActive;

/// Some lifecycle task did not end cleanly at shutdown (each is logged where found).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lifecycle tasks failed: panicked {panicked:?}, did not stop in time {timed_out:?}")]
pub struct TasksFailed {
    /// Tasks that panicked.
    pub panicked: Vec<&'static str>,
    /// Tasks still running at the shutdown deadline (aborted).
    pub timed_out: Vec<&'static str>,
}

impl LifecycleHandle {
    pub(super) fn new(parts: Parts) -> Self {
        Self {
            started_as: parts.started_as,
            phase: parts.phase,
            view: parts.view,
            tracker: parts.tracker,
            tasks: parts.tasks,
            cancel: parts.cancel.drop_guard(),
            publisher: parts.publisher,
            shutdown_timeout: parts.shutdown_timeout,
        }
    }

    /// How this node entered the cluster.
    pub fn started_as(&self) -> StartedAs {
        self.started_as
    }

    /// Where this node is now.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Whether this node is an active member (false while it joins).
    pub fn is_active(&self) -> bool {
        self.phase() == Phase::Active
    }

    /// Follows [`LifecycleHandle::phase`].
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Waits until this node is active: at once for a first or returning node, after the
    /// join for a joining one. Bound it with a timeout: a node that cannot pull stays
    /// joining.
    pub async fn wait_active(&self) -> Result<(), NeverActive> {
        let mut phase = self.phase.subscribe();
        phase
            .wait_for(|p| *p == Phase::Active)
            .await
            .map(|_| ())
            .map_err(|_| NeverActive)
    }

    /// Membership as the topology follower last read it, updated on every membership
    /// change. Diff successive member lists with [`super::member_changes`] to react to peers
    /// dying, coming back or restarting.
    pub fn watch_view(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// Stops the tasks and waits for them (at most the configured shutdown timeout, then
    /// aborts the rest); then an active member publishes `leaving` (a joining node stays
    /// `joining`: it holds no data to keep a place for). Call it before the
    /// coordinator and the transport stop. Reports tasks that panicked or had to be
    /// aborted.
    pub async fn shutdown(self) -> Result<(), TasksFailed> {
        let cancel = self.cancel.disarm();
        cancel.cancel();
        self.tracker.close();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let mut failed = TasksFailed {
            panicked: Vec::new(),
            timed_out: Vec::new(),
        };
        for (name, mut task) in self.tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!(task = name, error = %e, "a lifecycle task panicked");
                    failed.panicked.push(name);
                }
                Err(_) => {
                    warn!(task = name, timeout = ?self.shutdown_timeout, "a lifecycle task did not stop in time; aborting it");
                    task.abort();
                    failed.timed_out.push(name);
                }
            }
        }
        // Only a member says `leaving`: a joining node that did would become a placement
        // member (a live replica holding none of its partitions' data) in every view. The
        // tasks have stopped, so the join cannot turn it active after this check.
        if *self.phase.borrow() == Phase::Active {
            self.publisher.publish_state(Lifecycle::Leaving).await;
        }
        if failed.panicked.is_empty() && failed.timed_out.is_empty() {
            Ok(())
        } else {
            Err(failed)
        }
    }
}
