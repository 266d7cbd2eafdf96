//! The concurrency limit of a simulated server.
//!
//! A real inference server holds a fixed number of sequences in its batch.
//! Past that, an overloaded server either answers 429 with `retry-after` at
//! once (what sluice's bulkheads and retry budgets must respect) or keeps the
//! request waiting (what makes latency climb before errors appear). Both are
//! here: `--max-concurrency` slots, then up to `--queue-depth` waiters for at
//! most `--queue-timeout-ms`, then 429.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request turned away: all slots busy and the queue full, or the wait timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// A held slot; dropping it frees the slot. Unlimited servers hand out empty slots.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Concurrency slots plus a bounded queue.
#[derive(Debug)]
pub struct Capacity {
    /// `None` = unlimited.
    slots: Option<Arc<Semaphore>>,
    queue_depth: usize,
    queue_timeout: Duration,
    queued: AtomicUsize,
}

/// Decrements the queued count when a waiter leaves, however it leaves.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Capacity {
    /// `max_concurrency` slots (0 = unlimited), `queue_depth` waiters, each
    /// waiting at most `queue_timeout`.
    pub fn new(max_concurrency: usize, queue_depth: usize, queue_timeout: Duration) -> Self {
        Self {
            slots: (max_concurrency > 0).then(|| Arc::new(Semaphore::new(max_concurrency))),
            queue_depth,
            queue_timeout,
            queued: AtomicUsize::new(0),
        }
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Takes a slot, waiting in the queue if there is room in it.
    pub async fn admit(&self) -> Result<Slot, Overloaded> {
        let Some(slots) = &self.slots else {
            return Ok(Slot(None));
        };
        if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
            return Ok(Slot(Some(permit)));
        }
        // Reserve a queue place, or give up if the queue is full.
        let reserved = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                (q < self.queue_depth).then_some(q + 1)
            });
        if reserved.is_err() {
            return Err(Overloaded);
        }
        let _queued = Queued(&self.queued);
        match tokio::time::timeout(self.queue_timeout, Arc::clone(slots).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot(Some(permit))),
            // Timed out, or the semaphore was closed (never done here).
            _ => Err(Overloaded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rejects_beyond_limit_without_queue() {
        let c = Capacity::new(1, 0, Duration::from_secs(1));
        let held = c.admit().await.unwrap();
        assert_eq!(c.admit().await.unwrap_err(), Overloaded);
        drop(held);
        assert!(c.admit().await.is_ok());
    }

    #[tokio::test]
    async fn queue_waits_then_times_out() {
        let c = Capacity::new(1, 1, Duration::from_millis(30));
        let _held = c.admit().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(c.admit().await.unwrap_err(), Overloaded);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(c.queued(), 0);
    }

    #[tokio::test]
    async fn unlimited_always_admits() {
        let c = Capacity::new(0, 0, Duration::ZERO);
        let slots: Vec<_> = futures_util::future::join_all((0..100).map(|_| c.admit())).await;
        assert!(slots.iter().all(Result::is_ok));
    }
}
