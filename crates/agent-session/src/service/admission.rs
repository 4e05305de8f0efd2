//! Admission control: at most `max_active` generations at once, at most `max_queue` waiting;
//! beyond that a request is refused at once with `Overloaded` (never piles up).

use crate::error::ServiceError;
use futures::channel::oneshot;
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug)]
struct State {
    free: usize,
    active: usize,
    waiters: VecDeque<oneshot::Sender<()>>,
}

/// A counting semaphore with a bounded FIFO queue (runtime-agnostic).
#[derive(Debug)]
pub(crate) struct Admission {
    state: Mutex<State>,
    max_queue: usize,
}

/// A running slot; released on drop.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    admission: &'a Admission,
}

impl Admission {
    pub(crate) fn new(max_active: usize, max_queue: usize) -> Self {
        Self {
            state: Mutex::new(State {
                free: max_active,
                active: 0,
                waiters: VecDeque::new(),
            }),
            max_queue,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot in FIFO order, or fails at once when the queue is full.
    pub(crate) async fn acquire(&self) -> Result<Permit<'_>, ServiceError> {
        let rx = {
            let mut s = self.lock();
            s.waiters.retain(|w| !w.is_canceled());
            if s.free > 0 && s.waiters.is_empty() {
                s.free -= 1;
                s.active += 1;
                return Ok(Permit { admission: self });
            }
            if s.waiters.len() >= self.max_queue {
                return Err(ServiceError::Overloaded {
                    reason: format!(
                        "{} requests running and {} waiting (the queue is full)",
                        s.active,
                        s.waiters.len()
                    ),
                    retry_after_secs: 1,
                });
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(tx);
            rx
        };
        // The slot is handed over by `release` (free/active already accounted there).
        match rx.await {
            Ok(()) => Ok(Permit { admission: self }),
            Err(_) => Err(ServiceError::Cancelled),
        }
    }

    fn release(&self) {
        let mut s = self.lock();
        while let Some(w) = s.waiters.pop_front() {
            if w.send(()).is_ok() {
                return; // the slot passes to the waiter: active count unchanged
            }
        }
        s.active = s.active.saturating_sub(1);
        s.free += 1;
    }

    /// (running, waiting).
    pub(crate) fn usage(&self) -> (usize, usize) {
        let s = self.lock();
        (
            s.active,
            s.waiters.iter().filter(|w| !w.is_canceled()).count(),
        )
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.admission.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::FutureExt;

    #[test]
    fn bounded_queue_and_fifo() {
        let a = Admission::new(1, 1);
        let p1 = block_on(a.acquire()).ok();
        assert!(p1.is_some());
        let mut waiting = Box::pin(a.acquire());
        assert!((&mut waiting).now_or_never().is_none());
        assert!(matches!(
            block_on(a.acquire()),
            Err(ServiceError::Overloaded { .. })
        ));
        assert_eq!(a.usage(), (1, 1));
        drop(p1);
        let p2 = block_on(waiting);
        assert!(p2.is_ok());
        assert_eq!(a.usage(), (1, 0));
        drop(p2);
        assert_eq!(a.usage(), (0, 0));
    }
}
