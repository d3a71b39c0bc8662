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

    /// Queues `f` now; its result arrives on the receiver.
    fn enqueue<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, PoolStopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| PoolStopped)?;
        Ok(rx)
    }

    /// Runs `f` on the pool and waits for its result.
    pub async fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolStopped> {
        self.enqueue(f)?.await.map_err(|_| PoolStopped)
    }

    /// Runs `f` over `items` in one chunk per thread, all queued at once — a batch uses
    /// every core while its caller waits — and returns the results in item order, or the
    /// first error (in item order).
    pub async fn map<I, O, E>(
        &self,
        items: Vec<I>,
        f: impl Fn(I) -> Result<O, E> + Send + Sync + 'static,
    ) -> Result<Result<Vec<O>, E>, PoolStopped>
    where
        I: Send + 'static,
        O: Send + 'static,
        E: Send + 'static,
    {
        let f = Arc::new(f);
        let per = items.len().div_ceil(self.threads).max(1);
        let mut items = items.into_iter();
        let mut queued = Vec::with_capacity(self.threads);
        loop {
            let chunk: Vec<I> = items.by_ref().take(per).collect();
            if chunk.is_empty() {
                break;
            }
            let f = f.clone();
            queued.push(self.enqueue(move || {
                chunk
                    .into_iter()
                    .map(|i| f(i))
                    .collect::<Result<Vec<O>, E>>()
            })?);
        }
        let mut out = Vec::new();
        for rx in queued {
            match rx.await.map_err(|_| PoolStopped)? {
                Ok(part) => out.extend(part),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn map_keeps_item_order_uses_every_thread_and_returns_the_first_error() {
        let pool = SigningPool::start(3).unwrap();
        let out = pool
            .map((0..100u32).collect(), |i| {
                // Long enough that one thread cannot take every chunk.
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok::<_, String>((i * 2, std::thread::current().name().map(String::from)))
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            out.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            (0..100).map(|i| i * 2).collect::<Vec<_>>()
        );
        let threads: std::collections::BTreeSet<_> = out.iter().map(|(_, t)| t.clone()).collect();
        assert!(threads.len() > 1, "chunks ran on {threads:?}");
        let err = pool
            .map((0..100u32).collect(), |i| {
                if i == 40 || i == 90 { Err(i) } else { Ok(i) }
            })
            .await
            .unwrap();
        assert_eq!(err, Err(40));
        let empty = pool
            .map(Vec::<u32>::new(), Ok::<_, ()>)
            .await
            .unwrap()
            .unwrap();
        assert!(empty.is_empty());
    }
}
