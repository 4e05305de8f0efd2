//! Batched decode: concurrent generations' decode steps are gathered into one engine call,
//! so the engine reads the weights once per step for every running sequence.
//!
//! Runtime-agnostic "combining" scheme: every sequence in its decode phase is registered.
//! A step waits until every registered sequence has submitted one (or the batch is full);
//! whoever completes the batch leads it: one engine call, then each waiter gets its token.
//! When a sequence leaves and thereby completes a batch, the first waiter is handed the batch
//! to lead. Prefill chunks do not pass through here, so they interleave with decode steps at
//! the engine's command queue.

use crate::ports::{EngineError, InferenceEngine, SequenceId, StepRequest};
use crate::TokenId;
use futures::channel::oneshot;
use std::sync::Mutex;

enum Wake {
    Done(Result<TokenId, EngineError>),
    Lead(Vec<Pending>),
}

struct Pending {
    req: StepRequest,
    /// `None` only for the entry of the waiter that leads the batch.
    tx: Option<oneshot::Sender<Wake>>,
}

#[derive(Default)]
struct State {
    decoders: usize,
    pending: Vec<Pending>,
    in_flight: bool,
    max_seen: usize,
    steps: u64,
    sequences: u64,
}

/// What the batcher has done so far, for the service's stats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatcherUsage {
    /// Sequences in their decode phase now.
    pub(crate) decoding: usize,
    /// Largest batch so far.
    pub(crate) max_seen: usize,
    /// Engine steps so far.
    pub(crate) steps: u64,
    /// Sequences served by those steps, summed.
    pub(crate) sequences: u64,
}

/// Gathers decode steps of concurrent generations into batches of at most `max_batch`.
pub(crate) struct StepBatcher {
    state: Mutex<State>,
    max_batch: usize,
}

/// A registered decoder; deregisters on drop (finished, failed or cancelled).
pub(crate) struct DecoderSlot<'a> {
    batcher: &'a StepBatcher,
}

impl StepBatcher {
    pub(crate) fn new(max_batch: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_batch: max_batch.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next batch if it is complete and none is running.
    fn take_if_ready(&self, s: &mut State) -> Option<Vec<Pending>> {
        // Waiters that went away (their generation was dropped) no longer count.
        s.pending
            .retain(|p| p.tx.as_ref().is_none_or(|tx| !tx.is_canceled()));
        let complete = s.pending.len() >= s.decoders || s.pending.len() >= self.max_batch;
        if s.in_flight || s.pending.is_empty() || !complete {
            return None;
        }
        s.in_flight = true;
        let n = s.pending.len().min(self.max_batch);
        Some(s.pending.drain(..n).collect())
    }

    /// Hands a complete batch to its first waiter to lead (nobody else is running it).
    fn hand_over(&self, s: &mut State) {
        while let Some(mut batch) = self.take_if_ready(s) {
            let Some(tx) = batch.first_mut().and_then(|p| p.tx.take()) else {
                s.in_flight = false;
                return;
            };
            match tx.send(Wake::Lead(batch)) {
                Ok(()) => return,
                Err(Wake::Lead(mut back)) => {
                    // That waiter is gone: drop its request, put the rest back, try again.
                    back.remove(0);
                    s.in_flight = false;
                    for p in back.into_iter().rev() {
                        s.pending.insert(0, p);
                    }
                }
                Err(Wake::Done(_)) => return,
            }
        }
    }

    /// Registers a sequence entering its decode phase.
    pub(crate) fn register(&self) -> DecoderSlot<'_> {
        self.lock().decoders += 1;
        DecoderSlot { batcher: self }
    }

    /// Sequences decoding now, and what the batches so far were.
    pub(crate) fn usage(&self) -> BatcherUsage {
        let s = self.lock();
        BatcherUsage {
            decoding: s.decoders,
            max_seen: s.max_seen,
            steps: s.steps,
            sequences: s.sequences,
        }
    }

    /// Submits one decode step and waits for its token.
    pub(crate) async fn step(
        &self,
        engine: &dyn InferenceEngine,
        req: StepRequest,
    ) -> Result<TokenId, EngineError> {
        let seq = req.seq;
        let (tx, rx) = oneshot::channel();
        let batch = {
            let mut s = self.lock();
            s.pending.push(Pending { req, tx: Some(tx) });
            self.take_if_ready(&mut s)
        };
        if let Some(batch) = batch {
            if let Some(own) = self.run(engine, batch, seq).await {
                return own;
            }
        }
        match rx.await {
            Ok(Wake::Done(r)) => r,
            Ok(Wake::Lead(batch)) => self
                .run(engine, batch, seq)
                .await
                .unwrap_or_else(|| Err(EngineError::Backend("decode batch lost a step".into()))),
            Err(_) => Err(EngineError::Stopped),
        }
    }

    /// Runs one batch; returns the leader's own result when its entry has no channel.
    async fn run(
        &self,
        engine: &dyn InferenceEngine,
        batch: Vec<Pending>,
        leader: SequenceId,
    ) -> Option<Result<TokenId, EngineError>> {
        let (reqs, txs): (Vec<StepRequest>, Vec<Option<oneshot::Sender<Wake>>>) =
            batch.into_iter().map(|p| (p.req, p.tx)).unzip();
        let seqs: Vec<SequenceId> = reqs.iter().map(|r| r.seq).collect();
        let n = reqs.len();
        // If this future is dropped mid-call, the batch's other waiters see their channels
        // close (an engine error) and the next batch can still run: no deadlock.
        let mut running = RunningBatch {
            batcher: self,
            finished: false,
        };
        let results: Vec<Result<TokenId, EngineError>> = match engine.step(reqs).await {
            Ok(rs) if rs.len() == n => rs,
            Ok(rs) => {
                let e = EngineError::Backend(format!("step returned {} results for {n}", rs.len()));
                vec![Err(e); n]
            }
            Err(e) => vec![Err(e); n],
        };
        let mut own = None;
        for ((tx, r), s) in txs.into_iter().zip(results).zip(seqs) {
            match tx {
                Some(tx) => {
                    let _ = tx.send(Wake::Done(r));
                }
                None if s == leader => own = Some(r),
                None => {}
            }
        }
        running.finished = true;
        let mut s = self.lock();
        s.in_flight = false;
        s.max_seen = s.max_seen.max(n);
        s.steps += 1;
        s.sequences += n as u64;
        self.hand_over(&mut s);
        own
    }
}

struct RunningBatch<'a> {
    batcher: &'a StepBatcher,
    finished: bool,
}

impl Drop for RunningBatch<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut s = self.batcher.lock();
            s.in_flight = false;
            self.batcher.hand_over(&mut s);
        }
    }
}

impl Drop for DecoderSlot<'_> {
    fn drop(&mut self) {
        let mut s = self.batcher.lock();
        s.decoders = s.decoders.saturating_sub(1);
        self.batcher.hand_over(&mut s);
    }
}
