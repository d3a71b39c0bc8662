//! The signing pool: a fixed set of threads, one per core, for signing work too long to run on
//! a runtime worker (a SignBatch of up to 1,000 digests).
//!
//! Owns: the pool's threads and queue. Must not touch: keys or policy (it runs closures).
//!
//! tokio's blocking pool would start a thread per concurrent batch (up to 512), so 16
//! concurrent batches on two cores would be 16 threads time-sliced against each other; here
//! batches queue and each runs to completion on one of `cores` threads.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed pool of signing threads.
#[derive(Clone)]
pub struct SigningPool {
    tx: mpsc::Sender<Job>,
    threads: usize,
}

impl std::fmt::Debug for SigningPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningPool")
            .field("threads", &self.threads)
            .finish()
    }
}

/// The pool has no threads left (cannot happen while the site runs).
#[derive(Debug, thiserror::Error)]
#[error("signing pool stopped")]
pub struct PoolStopped;

impl SigningPool {
    /// Starts `threads` threads (at least one). They end when the last handle is dropped.
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("signer-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self { tx, threads })
    }

    /// One thread per core.
    pub fn per_core() -> std::io::Result<Self> {
        Self::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `f` on the pool and waits for its result.
    pub async fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolStopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| PoolStopped)?;
        rx.await.map_err(|_| PoolStopped)
    }
}
