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

#[test]
fn a_long_prefill_is_chunked_and_a_short_request_decodes_before_it_ends() {
    let s = stack(4, 16);
    // ~13 chunks of 64 tokens for the long prompt, one for the short.
    let long = req(0, 160, 4);
    let short = req(1, 2, 6);
    let log = std::sync::Mutex::new(Vec::<(&str, &str)>::new());
    let record = |who: &'static str| {
        let log = &log;
        move |ev: GenerationEvent| {
            let what = match ev {
                GenerationEvent::Admitted => "admitted",
                GenerationEvent::Prefilling { .. } => "prefilling",
                GenerationEvent::Started(_) => "started",
                GenerationEvent::Delta(_) => "delta",
                GenerationEvent::Finished(_) => "finished",
            };
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((who, what));
            true
        }
    };
    let (l, sh) = block_on(futures::future::join(
        s.service.generate(long, record("long")),
        s.service.generate(short, record("short")),
    ));
    let (l, sh) = (l.expect("long completes"), sh.expect("short completes"));
    assert!(l.cache.prefilled_tokens > 10 * 64, "{:?}", l.cache);
    let chunks = s.engine.stats().prefill_calls.len();
    assert!(
        chunks >= 12,
        "the long prompt is prefilled in chunks: {chunks}"
    );
    let log = log.into_inner().unwrap_or_else(|e| e.into_inner());
    let at = |who: &str, what: &str| {
        log.iter()
            .position(|&(w, e)| w == who && e == what)
            .unwrap_or_else(|| panic!("no {what} of {who} in {log:?}"))
    };
    assert!(
        at("short", "delta") < at("long", "started"),
        "the short request's first token comes before the long prefill ends: {log:?}"
    );
    assert!(!sh.text.is_empty());
}

#[test]
fn stats_show_time_in_queue_prefilling_and_the_decode_batch() {
    use agent_session::service::ServiceStats;
    use futures::FutureExt;
    let s = stack(1, 4);
    let snapshot = || -> ServiceStats {
        s.service
            .stats()
            .now_or_never()
            .expect("the memory store answers at once")
    };
    let done = std::sync::atomic::AtomicUsize::new(0);
    let at_started = std::sync::Mutex::new(None);
    let at_delta = std::sync::Mutex::new(None);
    let first = s.service.generate(req(0, 40, 5), |ev| {
        match ev {
            GenerationEvent::Started(_) => {
                // The second request is queued behind this one; its wait is what passes now.
                *at_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot());
                s.clock.advance_ms(250);
            }
            GenerationEvent::Delta(_) => {
                at_delta
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(snapshot);
            }
            GenerationEvent::Admitted
            | GenerationEvent::Prefilling { .. }
            | GenerationEvent::Finished(_) => {}
        }
        true
    });
    let first = async {
        let r = first.await;
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let second = async {
        let r = s.service.generate(req(1, 40, 5), |_| true).await;
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let probe = async {
        let mut max_prefilling = 0;
        while done.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            max_prefilling = max_prefilling.max(snapshot().prefilling);
            testkit::yield_once().await;
        }
        max_prefilling
    };
    let (a, b, max_prefilling) = block_on(futures::future::join3(first, second, probe));
    let (a, b) = (a.expect("first completes"), b.expect("second completes"));
    assert_eq!(a.cache.queue_ms, 0, "a free slot: no wait");
    assert_eq!(b.cache.queue_ms, 250, "waited while the first one ran");
    assert_eq!(max_prefilling, 1, "one prompt at a time is processed here");

    let started = at_started
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .expect("snapshot");
    assert_eq!((started.active, started.queued), (1, 1));
    assert_eq!(started.prefilling, 0, "the first prompt is processed");
    assert_eq!(started.decoding, 0);
    let decoding = at_delta
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .expect("snapshot");
    assert_eq!(decoding.decoding, 1);

    let end = snapshot();
    assert_eq!(
        (end.active, end.queued, end.prefilling, end.decoding),
        (0, 0, 0, 0)
    );
    let batches = s.engine.stats().step_batches;
    assert_eq!(end.decode_steps, batches.len() as u64);
    assert_eq!(
        end.decode_step_sequences,
        batches.iter().sum::<usize>() as u64
    );
}

#[test]
fn a_request_whose_client_left_while_it_was_queued_is_not_served() {
    let s = stack(1, 4);
    let served = req(0, 30, 6);
    // The second client is gone by the time its request gets a slot.
    let gone = req(1, 400, 6);
    let mut events = Vec::new();
    let (a, b) = block_on(futures::future::join(
        s.service.generate(served, |_| true),
        s.service.generate(gone, |ev| {
            events.push(format!("{ev:?}"));
            false
        }),
    ));
    let a = a.expect("the first request completes");
    assert!(matches!(b, Err(ServiceError::Cancelled)), "{b:?}");
    assert_eq!(events, ["Admitted"], "asked once, at admission");
    let engine = s.engine.stats();
    assert_eq!(
        engine.prefilled_tokens as usize, a.cache.prompt_tokens,
        "nothing was computed for the request that nobody waits for"
    );
    assert_eq!(engine.open_sequences, 1, "only the served agent's session");
    let stats = block_on(s.service.stats());
    assert_eq!((stats.active, stats.queued, stats.requests), (0, 0, 2));
    assert_eq!(stats.hot_blocks_active, 0);
}

#[test]
fn dropping_a_queued_generation_gives_up_its_place_at_once() {
    use futures::FutureExt;
    let s = stack(1, 1);
    let mut running = Box::pin(s.service.generate(req(0, 30, 20), |_| true));
    assert!((&mut running).now_or_never().is_none(), "holds the slot");
    {
        let mut queued = Box::pin(s.service.generate(req(1, 30, 5), |_| true));
        assert!((&mut queued).now_or_never().is_none(), "waits for the slot");
        assert_eq!(block_on(s.service.stats()).queued, 1);
    }
    // Its place is free: another request may queue instead of being refused.
    let mut next = Box::pin(s.service.generate(req(2, 30, 5), |_| true));
    assert!((&mut next).now_or_never().is_none(), "queued, not refused");
    assert_eq!(block_on(s.service.stats()).queued, 1);
    let (first, third) = block_on(futures::future::join(running, next));
    assert!(first.is_ok() && third.is_ok(), "{first:?} {third:?}");
    assert_eq!(s.engine.stats().open_sequences, 2);
}

#[test]
fn a_client_that_hangs_up_during_a_long_prefill_stops_it_within_a_chunk() {
    let s = stack(4, 16);
    let long = req(0, 160, 4);
    let mut progress = Vec::new();
    let out = block_on(s.service.generate(long.clone(), |ev| {
        if let GenerationEvent::Prefilling { done, total } = ev {
            progress.push((done, total));
            // The client hangs up after the second chunk.
            return progress.len() < 2;
        }
        true
    }));
    assert!(
        matches!(out, Err(ServiceError::Cancelled)),
        "cancelled: {out:?}"
    );
    let (done, total) = progress[1];
    assert_eq!(
        done,
        2 * 64,
        "progress counts this turn's tokens: {progress:?}"
    );
    assert!(total > 10 * 64, "{progress:?}");
    assert_eq!(
        s.engine.stats().prefill_calls.len(),
        2,
        "no chunk is prefilled after the hang-up"
    );
    assert_eq!(
        s.engine.stats().open_sequences,
        0,
        "its sequence is released"
    );
    // Nothing was committed: the next turn of the agent starts cold and answers as a solo run.
    let again = block_on(s.service.generate(long.clone(), |_| true)).expect("completes");
    assert_eq!(again.cache.reused_tokens, 0, "{:?}", again.cache);
    assert_eq!(again.token_ids, solo(&long).token_ids);
}
