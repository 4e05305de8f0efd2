//! Many agents at once, with the fake engine: batched decode never exceeds the limit, every
//! admitted request finishes or is cancelled, nobody starves, cancelled requests free their
//! sequences, and batched outputs equal solo outputs.

use agent_session::{
    AgentId, Completion, Conversation, GenerateRequest, GenerationEvent, Message, Namespace, Role,
    SamplingParams, ServiceConfig, ServiceError,
};
use futures::executor::block_on;
use futures::future::join_all;
use proptest::prelude::*;
use std::sync::Arc;
use testkit::{FakeEngine, FakeStack, MemoryStore};

fn req(i: usize, words: usize, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        agent: Some(AgentId::new(format!("agent-{i}")).expect("valid")),
        namespace: Namespace::default(),
        conversation: Conversation {
            messages: vec![Message::text(
                Role::User,
                format!("request {i}: {}", "word ".repeat(words)),
            )],
            tools: vec![],
        },
        params: SamplingParams::greedy(),
        max_tokens: Some(max_tokens),
        stop: vec![],
    }
}

fn stack(max_batch: usize, max_queue: usize) -> FakeStack {
    let mut config = ServiceConfig::for_block_tokens(64);
    config.max_batch_size = max_batch;
    config.max_queue = max_queue;
    FakeStack::build(
        Arc::new(FakeEngine::new(64).yielding()),
        Arc::new(MemoryStore::new()),
        config,
    )
}

fn solo(r: &GenerateRequest) -> Completion {
    let s = stack(1, 8);
    block_on(s.service.generate(r.clone(), |_| true)).expect("solo run")
}

#[test]
fn concurrent_requests_are_batched_and_equal_their_solo_outputs() {
    let s = stack(4, 16);
    let reqs: Vec<_> = (0..4).map(|i| req(i, 10 + i * 7, 40)).collect();
    let results = block_on(join_all(
        reqs.iter().map(|r| s.service.generate(r.clone(), |_| true)),
    ));
    for (r, out) in reqs.iter().zip(results) {
        let out = out.expect("completes");
        assert_eq!(out.token_ids, solo(r).token_ids);
    }
    let batches = s.engine.stats().step_batches;
    let max = batches.iter().copied().max().unwrap_or(0);
    assert!(max > 1, "decode steps were batched: {batches:?}");
    assert!(max <= 4);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn every_request_finishes_or_is_cancelled(
        n in 1usize..8,
        max_batch in 1usize..4,
        max_tokens in proptest::collection::vec(1u32..30, 8),
        cancel_after in proptest::collection::vec(proptest::option::of(0usize..5), 8),
    ) {
        let s = stack(max_batch, 64);
        let futures = (0..n).map(|i| {
            let service = s.service.clone();
            let r = req(i, 5 + i * 13, max_tokens[i]);
            let cancel = cancel_after[i];
            async move {
                let mut deltas = 0usize;
                let out = service.generate(r, |ev| {
                    if let GenerationEvent::Delta(_) = ev {
                        deltas += 1;
                        if cancel.is_some_and(|c| deltas > c) {
                            return false;
                        }
                    }
                    true
                }).await;
                (cancel, out)
            }
        });
        let results = block_on(join_all(futures));
        for (cancel, out) in results {
            match out {
                Ok(c) => prop_assert!(c.token_ids.len() <= 30),
                Err(ServiceError::Cancelled) => prop_assert!(cancel.is_some()),
                Err(e) => prop_assert!(false, "unexpected error {e:?}"),
            }
        }
        let stats = s.engine.stats();
        prop_assert!(stats.step_batches.iter().all(|&b| b >= 1 && b <= max_batch));
        // Cancelled and finished requests leave only the agents' hot sessions open.
        let hot = block_on(s.service.stats()).hot_agents as usize;
        prop_assert_eq!(stats.open_sequences, hot);
        prop_assert_eq!(block_on(s.service.stats()).active, 0);
    }
}

#[test]
fn overload_gets_a_clear_refusal_and_accepted_requests_complete() {
    let s = stack(1, 2);
    let results = block_on(join_all(
        (0..6).map(|i| s.service.generate(req(i, 5, 8), |_| true)),
    ));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(ServiceError::Overloaded { retry_after_secs, .. }) if *retry_after_secs > 0))
        .count();
    assert_eq!(ok + refused, 6);
    assert!(ok >= 3, "one running and two queued are served");
    assert!(refused >= 1);
    // Healthy afterwards.
    assert!(block_on(s.service.generate(req(9, 5, 8), |_| true)).is_ok());
}

#[test]
fn a_dropped_generation_frees_its_reservation_and_sequence() {
    use futures::FutureExt;
    let s = stack(2, 8);
    {
        let mut fut = Box::pin(s.service.generate(req(1, 20, 50), |_| true));
        // Poll a few times (it is mid-prefill or mid-decode), then drop it.
        for _ in 0..5 {
            let _ = (&mut fut).now_or_never();
        }
    }
    // The next request releases the orphan; only its own session stays open.
    block_on(s.service.generate(req(2, 5, 5), |_| true)).expect("works");
    let stats = block_on(s.service.stats());
    assert_eq!(s.engine.stats().open_sequences, stats.hot_agents as usize);
    assert_eq!(stats.active, 0);
}
