//! Group commit: many writers wait on one `fsync`.
//!
//! A writer applies its changes to sled's memory and then calls [`GroupCommit::durable`],
//! which resolves once a flush that *started after the call* has finished. The flusher task
//! takes every waiter that queued up while the previous flush ran and covers them with the
//! next one, so under load the number of flushes grows with time, not with writes.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How many writers may wait for a flush at once; more wait for room (backpressure).
const MAX_WAITERS: usize = 65_536;

type FlushResult = Result<(), Arc<sled::Error>>;

/// The handle writers use; cloning is cheap.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<oneshot::Sender<FlushResult>>,
}

impl GroupCommit {
    /// Starts the flusher for `db`. It stops when every [`GroupCommit`] handle is dropped; the
    /// returned handle lets the owner wait for that.
    pub fn spawn(db: sled::Db) -> (GroupCommit, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(MAX_WAITERS);
        let task = tokio::spawn(flusher(db, rx));
        (GroupCommit { tx }, task)
    }

    /// Resolves when everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), Arc<sled::Error>> {
        let (tx, rx) = oneshot::channel();
        let closed = || Arc::new(sled::Error::ReportableBug("the flusher has stopped".into()));
        self.tx.send(tx).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

async fn flusher(db: sled::Db, mut rx: mpsc::Receiver<oneshot::Sender<FlushResult>>) {
    let mut waiters = Vec::new();
    while let Some(first) = rx.recv().await {
        waiters.push(first);
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let started = Instant::now();
        let db2 = db.clone();
        let result = match tokio::task::spawn_blocking(move || db2.flush()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Arc::new(e)),
            Err(e) => Err(Arc::new(sled::Error::ReportableBug(format!(
                "flush task: {e}"
            )))),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "store flush failed; writes waiting on it fail");
        }
        metrics::counter!("store_flushes_total").increment(1);
        metrics::histogram!("store_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("store_flush_batch_writers").record(waiters.len() as f64);
        for w in waiters.drain(..) {
            let _ = w.send(result.clone()); // the writer may have timed out and gone
        }
    }
}
