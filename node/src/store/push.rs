//! The push outbox: pending notifications keyed by `due ms | job id`, so the worker reads the
//! due ones with one range scan. Node-local: the node that accepted a message notifies.

use super::records::{decode, encode, PushJob};
use super::{keys, Store, StoreError, Table, WriteBatch};

impl Store {
    /// Adds `job`, due at `due_ms`, to `batch`.
    pub fn queue_push(&self, batch: &mut WriteBatch, job: &PushJob, due_ms: u64) {
        let key = keys::push_job(due_ms, job.job_id);
        batch.put(self, Table::PushOutbox, &key, key.to_vec(), encode(job));
    }

    /// Up to `limit` jobs due at or before `now_ms`, oldest first, with their keys.
    pub fn due_pushes(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, PushJob)>, StoreError> {
        let mut out = Vec::new();
        let range = keys::push_job(0, 0).to_vec()..=keys::push_job(now_ms, u64::MAX).to_vec();
        self.scan_local(Table::PushOutbox, range, |k, v| {
            out.push((k.to_vec(), decode(v)?));
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// When the next job is due (Unix ms), if any is queued.
    pub fn next_push_due(&self) -> Result<Option<u64>, StoreError> {
        let mut due = None;
        let range = keys::push_job(0, 0).to_vec()..=keys::push_job(u64::MAX, u64::MAX).to_vec();
        self.scan_local(Table::PushOutbox, range, |k, _| {
            due = k
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            Ok(false)
        })?;
        Ok(due)
    }

    /// Removes a finished (or dead-lettered) job, and queues `retry` (at its due time) if given.
    pub async fn finish_push(
        &self,
        key: &[u8],
        retry: Option<(&PushJob, u64)>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete(self, Table::PushOutbox, key, key.to_vec());
        if let Some((job, due)) = retry {
            self.queue_push(&mut batch, job, due);
        }
        self.write(batch).await
    }

    /// Number of queued jobs.
    pub fn pending_pushes(&self) -> usize {
        self.tree(Table::PushOutbox).len()
    }
}
