//! Password hashing with bounded cost: argon2id on a fixed number of workers, a bounded
//! queue in front of them with a fast `busy` refusal when it is full, and one reusable
//! memory block per worker.
//!
//! Why: every argon2id hash fills ~19 MiB. Unbounded, 256 concurrent logins meant 256 such
//! buffers at once (the issue measured 8.9 GB resident), and the allocator kept the pages
//! afterwards. Here at most `workers` hashes run at once, each in a block taken from a
//! small free list and put back afterwards, so the hashing memory is `workers × 19 MiB`,
//! allocated once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest argon2 memory cost (KiB) accepted from a stored hash: this node writes 19 MiB
/// hashes; anything far larger is a record this node did not make and will not spend on.
const MAX_MEMORY_KIB: u32 = 64 * 1024;

/// A well-formed hash of no known password, with this node's parameters: logins for
/// usernames that do not exist are checked against it, so that they cost the same hash as
/// a wrong password and their answer takes as long.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$ZHVtbXlzYWx0ZHVtbXk$\
                          vTxWbGm8U2wnnz3aTiH1H+Xc9gSYE0x9pSxr3rnC9bA";

/// Why a hash was not computed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every worker is busy and the queue is full: try again shortly.
    #[error("the node is busy checking passwords; retry shortly")]
    Busy,
    /// The hashing itself failed (a bad parameter; not a wrong password).
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// The hashing pool: a cheap-clone handle.
#[derive(Clone)]
pub struct Passwords {
    inner: Arc<Inner>,
}

struct Inner {
    /// One permit per worker: a hash runs only while it holds one.
    workers: Arc<Semaphore>,
    /// Hashes admitted (queued or running); at most `workers + queue`.
    admitted: AtomicUsize,
    /// Most hashes admitted at once.
    max_admitted: usize,
    /// Memory blocks of finished hashes, reused by the next ones (at most one per worker
    /// exists, since a block is only held with a permit). A std `Mutex`: held for a push or
    /// a pop, never across an await.
    blocks: std::sync::Mutex<Vec<Vec<Block>>>,
    params: Params,
}

/// Counts a hash as admitted (`accounts_hash_queue_depth`: queued or running) until it
/// finishes, wherever it is dropped.
struct Admitted(Arc<Inner>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("accounts_hash_queue_depth").decrement(1.0);
    }
}

impl Passwords {
    /// A pool of `workers` hashing threads with room for `queue` waiting hashes.
    pub fn new(workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        Passwords {
            inner: Arc::new(Inner {
                workers: Arc::new(Semaphore::new(workers)),
                admitted: AtomicUsize::new(0),
                max_admitted: workers + queue,
                blocks: std::sync::Mutex::new(Vec::with_capacity(workers)),
                params: Params::default(),
            }),
        }
    }

    /// Hashes a new password (argon2id, PHC string).
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |inner, blocks| inner.hash_with(&password, blocks))
            .await
    }

    /// Checks `password` against a stored hash, or, for a user who does not exist (`None`),
    /// against a dummy hash of the same cost: the answer is then always "no", after the same
    /// work.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, HashError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let ok = self
            .run(move |inner, blocks| Ok(inner.verify_with(&password, &hash, blocks)))
            .await?;
        Ok(ok && known)
    }

    /// Admits a job (or refuses it at once when the queue is full), waits for a worker and
    /// runs the job on a blocking thread with a reused memory block.
    async fn run<T, F>(&self, job: F) -> Result<T, HashError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Vec<Block>) -> Result<T, HashError> + Send + 'static,
    {
        let inner = &self.inner;
        let admitted = inner.admitted.fetch_add(1, Ordering::AcqRel) + 1;
        metrics::gauge!("accounts_hash_queue_depth").increment(1.0);
        let guard = Admitted(inner.clone());
        if admitted > inner.max_admitted {
            metrics::counter!("accounts_hash_refused_total").increment(1);
            return Err(HashError::Busy);
        }
        let permit: OwnedSemaphorePermit = inner
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HashError::Failed("the hashing pool is closed".into()))?;
        let inner = inner.clone();
        // The permit, the admission and the block move into the blocking job: if the caller
        // goes away (the client hung up), the hash still counts against the limits until it
        // has really finished.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _guard = guard;
            let mut blocks = inner.take_blocks();
            metrics::counter!("accounts_password_hashes_total").increment(1);
            let out = job(&inner, &mut blocks);
            inner.put_blocks(blocks);
            out
        })
        .await
        .map_err(|e| HashError::Failed(format!("the hashing thread failed: {e}")))?
    }
}

impl Inner {
    fn take_blocks(&self) -> Vec<Block> {
        let reused = self.blocks.lock().map(|mut b| b.pop()).unwrap_or(None);
        reused.unwrap_or_default()
    }

    fn put_blocks(&self, mut blocks: Vec<Block>) {
        // Keep only blocks of this node's size: a larger one (an old hash's parameters) is
        // freed rather than kept.
        if blocks.len() != self.params.block_count() {
            blocks = Vec::new();
        }
        if let Ok(mut free) = self.blocks.lock() {
            free.push(blocks);
        }
    }

    fn hash_with(&self, password: &str, blocks: &mut Vec<Block>) -> Result<String, HashError> {
        let failed = |e: &dyn std::fmt::Display| HashError::Failed(e.to_string());
        let salt = SaltString::generate(&mut OsRng);
        let mut raw_salt = [0u8; 64];
        let raw_salt = salt.decode_b64(&mut raw_salt).map_err(|e| failed(&e))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone());
        let len = self
            .params
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        fit(blocks, self.params.block_count());
        let output = Output::init_with(len, |out| {
            argon
                .hash_password_into_with_memory(password.as_bytes(), raw_salt, out, &mut *blocks)
                .map_err(argon2::password_hash::Error::from)
        })
        .map_err(|e| failed(&e))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params).map_err(|e| failed(&e))?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches `hash`; a malformed or oversized hash matches nothing.
    fn verify_with(&self, password: &str, hash: &str, blocks: &mut Vec<Block>) -> bool {
        let Ok(phc) = PasswordHash::new(hash) else {
            return false;
        };
        let (Some(expected), Some(salt)) = (phc.hash, phc.salt) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(phc.algorithm) else {
            return false;
        };
        let version = match phc.version.map(Version::try_from).transpose() {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => return false,
        };
        let Ok(params) = Params::try_from(&phc) else {
            return false;
        };
        if params.m_cost() > MAX_MEMORY_KIB {
            return false;
        }
        let mut raw_salt = [0u8; 64];
        let Ok(raw_salt) = salt.decode_b64(&mut raw_salt) else {
            return false;
        };
        fit(blocks, params.block_count());
        let argon = Argon2::new(algorithm, version, params);
        let computed = Output::init_with(expected.len(), |out| {
            argon
                .hash_password_into_with_memory(password.as_bytes(), raw_salt, out, &mut *blocks)
                .map_err(argon2::password_hash::Error::from)
        });
        // `Output`'s equality is constant-time.
        computed.is_ok_and(|c| c == expected)
    }
}

/// Makes `blocks` exactly `count` blocks long, allocating only when it was empty or a
/// different size.
fn fit(blocks: &mut Vec<Block>, count: usize) {
    if blocks.len() != count {
        *blocks = vec![Block::default(); count];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use argon2::PasswordVerifier;

    #[tokio::test]
    async fn hashes_are_standard_argon2id_and_verify_both_ways() {
        let pool = Passwords::new(2, 4);
        let h = pool.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(pool
            .verify("correct horse".into(), Some(h.clone()))
            .await
            .unwrap());
        assert!(!pool
            .verify("wrong horse".into(), Some(h.clone()))
            .await
            .unwrap());
        // The argon2 crate's own verifier agrees, and hashes it made verify here.
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        let theirs = {
            use argon2::PasswordHasher;
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(b"battery staple", &salt)
                .unwrap()
                .to_string()
        };
        assert!(pool
            .verify("battery staple".into(), Some(theirs))
            .await
            .unwrap());
        // Unknown users and malformed hashes never match.
        assert!(!pool.verify("x".repeat(8), None).await.unwrap());
        assert!(!pool
            .verify("x".repeat(8), Some("garbage".into()))
            .await
            .unwrap());
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let pool = Passwords::new(1, 1);
        let jobs: Vec<_> = (0..6)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.verify(format!("password{i}"), None).await })
            })
            .collect();
        let mut busy = 0;
        for j in jobs {
            match j.await.unwrap() {
                Ok(false) => {}
                Err(HashError::Busy) => busy += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            busy >= 1,
            "six hashes on one worker with one queue slot: some refused"
        );
        // Memory blocks are reused: at most one per worker is kept.
        assert!(pool.inner.blocks.lock().unwrap().len() <= 1);
    }
}
