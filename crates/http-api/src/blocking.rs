//! The [`BlockingRunner`] of the HTTP adapter: a request's template rendering and
//! tokenization run on tokio's blocking pool, at most `permits` at a time, so that the async
//! executor (health probes, other agents' streams) never waits for them.

use agent_session::BlockingRunner;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Runs jobs on tokio's blocking pool, at most a fixed number at once (the rest wait,
/// holding no thread).
#[derive(Debug, Clone)]
pub struct TokioBlocking {
    handle: tokio::runtime::Handle,
    permits: Arc<Semaphore>,
}

impl TokioBlocking {
    /// A runner on `handle`'s blocking pool running at most `max_parallel` jobs at once
    /// (at least 1).
    pub fn new(handle: tokio::runtime::Handle, max_parallel: usize) -> Self {
        Self {
            handle,
            permits: Arc::new(Semaphore::new(max_parallel.max(1))),
        }
    }

    /// A runner on the current runtime with one job per CPU. Panics outside a runtime.
    pub fn current() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new(tokio::runtime::Handle::current(), cpus)
    }
}

impl BlockingRunner for TokioBlocking {
    fn spawn(&self, job: Box<dyn FnOnce() + Send + 'static>) {
        let permits = self.permits.clone();
        let handle = self.handle.clone();
        self.handle.spawn(async move {
            // The semaphore is never closed; on error run anyway rather than lose the job.
            let _permit = permits.acquire_owned().await.ok();
            let _ = handle.spawn_blocking(job).await;
        });
    }
}
