//! The whole idea with fakes only: cold turn, warm turn (hot), restart (warm from store),
//! shared system prompts, corruption, overload, cancellation, and warm == cold always.

use agent_session::{
    AgentId, CacheTier, Completion, Conversation, FinishReason, GenerateRequest, GenerationEvent,
    Message, Namespace, Persistence, Role, SamplingParams, ServiceConfig, ServiceError,
};
use futures::executor::block_on;
use futures::FutureExt;
use proptest::prelude::*;
use std::sync::Arc;
use testkit::{FakeEngine, FakeStack, MemoryStore};

const SYSTEM: &str = "You are a careful coding agent. Follow the style guide, write tests, \
explain each change briefly, and never invent APIs that do not exist in the repository.";

fn convo(turns: &[(&str, &str)], question: &str) -> Conversation {
    let mut messages = vec![Message::text(Role::System, SYSTEM)];
    for (q, a) in turns {
        messages.push(Message::text(Role::User, *q));
        messages.push(Message::text(Role::Assistant, *a));
    }
    messages.push(Message::text(Role::User, question));
    Conversation {
        messages,
        tools: vec![],
    }
}

fn request(agent: Option<&str>, conversation: Conversation) -> GenerateRequest {
    GenerateRequest {
        agent: agent.map(|a| AgentId::new(a).expect("valid id")),
        namespace: Namespace::default(),
        conversation,
        params: SamplingParams::greedy(),
        max_tokens: Some(24),
        stop: vec![],
    }
}

fn run(stack: &FakeStack, req: GenerateRequest) -> Completion {
    block_on(stack.service.generate(req, |_| true)).expect("generation succeeds")
}

fn cold(req: &GenerateRequest) -> Completion {
    let fresh = FakeStack::new();
    run(&fresh, req.clone())
}

#[test]
fn the_whole_idea() {
    let store = Arc::new(MemoryStore::new());
    let stack = FakeStack::with_store(store.clone());

    // Turn 1: cold.
    let r1 = request(
        Some("coder"),
        convo(&[], "Please add a function that parses dates."),
    );
    let c1 = run(&stack, r1.clone());
    assert_eq!(c1.cache.tier, CacheTier::Miss);
    assert_eq!(c1.cache.reused_tokens, 0);
    assert_eq!(c1.cache.prefilled_tokens, c1.cache.prompt_tokens);
    assert!(c1.cache.created_tokens > 0);
    let len1 = c1.cache.prompt_tokens;

    // Turn 2: history + new message prefills only the new part.
    stack.engine.reset_stats();
    let r2 = request(
        Some("coder"),
        convo(
            &[("Please add a function that parses dates.", &c1.text)],
            "Now add tests for leap years.",
        ),
    );
    let c2 = run(&stack, r2.clone());
    assert_eq!(c2.cache.tier, CacheTier::Hot);
    assert_eq!(c2.cache.reused_tokens, len1 / 64 * 64);
    assert_eq!(
        stack.engine.stats().prefilled_tokens as usize,
        c2.cache.prompt_tokens - c2.cache.reused_tokens
    );
    assert_eq!(
        c2.token_ids,
        cold(&r2).token_ids,
        "warm turn equals cold turn"
    );

    // "Restart": a new service over the same store restores from it.
    let restarted = FakeStack::with_store(store.clone());
    let r3 = request(
        Some("coder"),
        convo(
            &[
                ("Please add a function that parses dates.", &c1.text),
                ("Now add tests for leap years.", &c2.text),
            ],
            "Finally, document it.",
        ),
    );
    let c3 = run(&restarted, r3.clone());
    assert_eq!(c3.cache.tier, CacheTier::Warm);
    assert!(c3.cache.reused_tokens >= c2.cache.prompt_tokens / 64 * 64 - 64);
    assert_eq!(
        restarted.engine.stats().prefilled_tokens as usize,
        c3.cache.prompt_tokens - c3.cache.reused_tokens
    );
    assert_eq!(c3.token_ids, cold(&r3).token_ids);

    // Another agent with the same system prompt shares its blocks.
    let blocks_before = store.block_count();
    let rb = request(Some("reviewer"), convo(&[], "Review the date parser."));
    let cb = run(&restarted, rb.clone());
    assert!(cb.cache.reused_tokens > 0, "shared system prompt is reused");
    assert_eq!(cb.cache.tier, CacheTier::Warm);
    assert_eq!(cb.token_ids, cold(&rb).token_ids);
    let shared_blocks = cb.cache.reused_tokens / 64;
    assert_eq!(
        store.block_count(),
        blocks_before + cb.cache.created_tokens / 64,
        "shared blocks ({shared_blocks}) are stored once"
    );
}

#[test]
fn usage_adds_up_and_repeat_reads_the_prompt() {
    let stack = FakeStack::new();
    let r = request(
        Some("a"),
        convo(&[], "Hello there, how are you doing today?"),
    );
    let c1 = run(&stack, r.clone());
    let c2 = run(&stack, r.clone());
    for c in [&c1, &c2] {
        let u = &c.cache;
        assert_eq!(
            u.reused_tokens + u.created_tokens + u.uncached_tokens(),
            u.prompt_tokens
        );
    }
    // The second identical request reads the first one's prompt minus at most one chunk.
    assert!(c2.cache.reused_tokens + 64 > c1.cache.prompt_tokens);
    assert_eq!(c1.token_ids, c2.token_ids);
}

#[test]
fn corrupt_block_is_a_miss_from_there_and_output_stays_right() {
    let store = Arc::new(MemoryStore::new());
    let stack = FakeStack::with_store(store.clone());
    let r = request(Some("a"), convo(&[], &"long question ".repeat(30)));
    let c1 = run(&stack, r.clone());
    assert!(store.block_count() >= 3);
    for h in store.block_hashes() {
        store.corrupt_block(&h);
    }
    let restarted = FakeStack::with_store(store.clone());
    let c2 = run(&restarted, r.clone());
    assert_eq!(c2.cache.tier, CacheTier::Miss);
    assert_eq!(c2.token_ids, c1.token_ids);
}

#[test]
fn a_restore_in_groups_keeps_the_blocks_before_a_bad_one_in_a_later_group() {
    use agent_session::{AgentKey, CacheStore};
    use std::str::FromStr;
    let store = Arc::new(MemoryStore::new());
    let stack = FakeStack::with_store(store.clone());
    let r = request(Some("a"), convo(&[], &"long question ".repeat(60)));
    let c1 = run(&stack, r.clone());
    let key = AgentKey {
        namespace: Namespace::default(),
        agent: AgentId::new("a").expect("valid id"),
    };
    let manifest = block_on(store.load_manifest(&key))
        .expect("store answers")
        .expect("manifest saved");
    let chain: Vec<block_pool::BlockHash> = manifest
        .block_hashes
        .iter()
        .map(|h| block_pool::BlockHash::from_str(h).expect("hex hash"))
        .collect();
    // Past the first group of RESTORE_GROUP_BLOCKS, so that earlier groups were imported.
    let bad = agent_session::RESTORE_GROUP_BLOCKS + 2;
    assert!(chain.len() > bad + 1, "{} blocks", chain.len());
    assert!(store.corrupt_block(&chain[bad]));

    let restarted = FakeStack::with_store(store.clone());
    let c2 = run(&restarted, r.clone());
    assert_eq!(c2.cache.tier, CacheTier::Warm);
    assert_eq!(
        c2.cache.restored_tokens,
        bad * 64,
        "the blocks before the bad one"
    );
    assert_eq!(c2.cache.reused_tokens, bad * 64);
    assert_eq!(c2.token_ids, c1.token_ids, "warm == cold");
    let stats = restarted.engine.stats();
    assert_eq!(stats.imported_blocks, bad as u64);
    assert_eq!(
        stats.prefilled_tokens as usize,
        c1.cache.prompt_tokens - bad * 64
    );
}

#[test]
fn foreign_fingerprint_is_never_used() {
    let store = Arc::new(MemoryStore::new());
    let stack = FakeStack::with_store(store.clone());
    let r = request(Some("a"), convo(&[], &"question ".repeat(30)));
    run(&stack, r.clone());
    let other = FakeStack::build(
        Arc::new(FakeEngine::new(64).with_fingerprint("another-model")),
        store,
        ServiceConfig::for_block_tokens(64),
    );
    let c = run(&other, r);
    assert_eq!(c.cache.tier, CacheTier::Miss);
    assert_eq!(c.cache.reused_tokens, 0);
}

#[test]
fn context_too_long_names_both_numbers() {
    let stack = FakeStack::build(
        Arc::new(FakeEngine::new(64).with_context_length(100)),
        Arc::new(MemoryStore::new()),
        ServiceConfig::for_block_tokens(64),
    );
    let err = block_on(
        stack
            .service
            .generate(request(None, convo(&[], &"x".repeat(200))), |_| true),
    )
    .expect_err("too long");
    match err {
        ServiceError::ContextTooLong {
            prompt_tokens,
            context_length,
        } => {
            assert!(prompt_tokens > 200);
            assert_eq!(context_length, 100);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn cancellation_frees_the_sequence_and_keeps_the_prompt() {
    let stack = FakeStack::new();
    let r = request(None, convo(&[], &"tell me a story ".repeat(10)));
    let mut deltas = 0;
    let err = block_on(stack.service.generate(r.clone(), |ev| {
        if let GenerationEvent::Delta(_) = ev {
            deltas += 1;
            return false;
        }
        true
    }))
    .expect_err("cancelled");
    assert!(matches!(err, ServiceError::Cancelled));
    assert_eq!(deltas, 1);
    assert_eq!(stack.engine.stats().open_sequences, 0);
    // The prompt's blocks were still committed: the retry reuses them.
    let c = run(&stack, r);
    assert!(c.cache.reused_tokens > 0);
}

#[test]
fn stop_strings_end_generation() {
    let stack = FakeStack::new();
    let mut r = request(None, convo(&[], "go"));
    r.max_tokens = Some(200);
    let full = run(&stack, r.clone());
    let Some(word) = full.text.split_whitespace().nth(1) else {
        return; // the fake said too little to test with
    };
    let cut = full.text.find(word).unwrap_or(0);
    r.stop = vec![word.to_string()];
    let c = run(&FakeStack::new(), r);
    assert_eq!(
        c.finish_reason,
        FinishReason::StopSequence(word.to_string())
    );
    assert_eq!(c.text, full.text[..cut]);
}

#[test]
fn overload_is_refused_not_queued_forever() {
    let mut config = ServiceConfig::for_block_tokens(64);
    config.max_batch_size = 1;
    config.max_queue = 0;
    let stack = FakeStack::build(
        Arc::new(FakeEngine::new(64)),
        Arc::new(MemoryStore::new()),
        config,
    );
    let service = stack.service.clone();
    let r = request(None, convo(&[], "first"));
    // While the first generation is inside its event callback, a second one is refused.
    let mut inner_result = None;
    block_on(stack.service.generate(r.clone(), |ev| {
        if let GenerationEvent::Started(_) = ev {
            if inner_result.is_none() {
                inner_result = service.generate(r.clone(), |_| true).now_or_never();
            }
        }
        true
    }))
    .expect("first succeeds");
    assert!(matches!(
        inner_result,
        Some(Err(ServiceError::Overloaded { .. }))
    ));
    // Afterwards the server is healthy again.
    run(&stack, r);
}

#[test]
fn hot_tier_evicts_lru_and_the_evicted_agent_comes_back_warm() {
    let mut config = ServiceConfig::for_block_tokens(64);
    config.hot_capacity_blocks = 8;
    let stack = FakeStack::build(
        Arc::new(FakeEngine::new(64)),
        Arc::new(MemoryStore::new()),
        config,
    );
    let ra = request(Some("a"), convo(&[], &"alpha ".repeat(40)));
    let rb = request(Some("b"), convo(&[], &"beta ".repeat(40)));
    run(&stack, ra.clone());
    run(&stack, rb.clone());
    let ca = run(&stack, ra.clone());
    assert_eq!(ca.cache.tier, CacheTier::Warm, "a was evicted for b");
    assert!(ca.cache.reused_tokens > 0);
    assert_eq!(ca.token_ids, cold(&ra).token_ids);
}

/// A stack over the fake engine with a sliding first layer of `window` tokens (or none).
fn stack_with_window(store: Arc<MemoryStore>, window: Option<u32>) -> FakeStack {
    let engine = FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS);
    let engine = match window {
        Some(w) => engine.with_window(w),
        None => engine,
    };
    let config = ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize);
    FakeStack::build(Arc::new(engine), store, config)
}

#[test]
fn sliding_window_models_store_every_block_and_recover_what_ram_dropped() {
    let store = Arc::new(MemoryStore::new());
    let stack = stack_with_window(store.clone(), Some(100));
    let long = "Here is a long design note about the parser. ".repeat(14);
    let r1 = request(Some("coder"), convo(&[], &long));
    let c1 = run(&stack, r1.clone());
    let prompt = c1.cache.prompt_tokens;
    assert!(prompt > 600, "{prompt} tokens: many chunks past the window");
    // Every whole block was stored although RAM dropped the sliding layer's old ones
    // chunk after chunk (an export after the next chunk would have failed).
    assert_eq!(c1.persistence, Persistence::Saved);
    assert_eq!(store.block_count(), prompt / 64);
    assert_eq!(c1.token_ids, cold(&r1).token_ids);

    // The hot sequence keeps only the window: a new question after the shared start of the
    // conversation cannot cut it back that far, so the blocks come from the store instead.
    let r2 = request(
        Some("coder"),
        convo(&[], &format!("{} and what else?", &long[..140])),
    );
    stack.engine.reset_stats();
    let c2 = run(&stack, r2.clone());
    assert_eq!(c2.cache.tier, CacheTier::Warm);
    assert_eq!(c2.cache.restored_tokens, c2.cache.reused_tokens);
    assert!(c2.cache.reused_tokens >= 128);
    assert_eq!(
        stack.engine.stats().prefilled_tokens as usize,
        c2.cache.prompt_tokens - c2.cache.reused_tokens
    );
    assert_eq!(c2.token_ids, cold(&r2).token_ids);

    // The continuation of turn 1 reuses its hot window (no cut needed) ...
    let r3 = request(Some("coder"), convo(&[(&long, &c1.text)], "Go on."));
    let hot = stack_with_window(store.clone(), Some(100));
    let c3 = run(&hot, request(Some("coder"), convo(&[], &long)));
    assert_eq!(c3.cache.tier, CacheTier::Warm);
    let c4 = run(&hot, r3.clone());
    assert_eq!(c4.cache.tier, CacheTier::Hot);
    assert_eq!(c4.token_ids, cold(&r3).token_ids);
    // ... and after a restart it restores from the store.
    let restarted = stack_with_window(store, Some(100));
    let c5 = run(&restarted, r3.clone());
    assert_eq!(c5.cache.tier, CacheTier::Warm);
    assert_eq!(c5.token_ids, c4.token_ids);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Whatever the history, an agent's warm turn (hot or after a restart) produces exactly
    /// the cold turn's tokens, and prefills exactly what it did not reuse.
    #[test]
    fn warm_always_equals_cold(
        questions in proptest::collection::vec("[a-z ]{1,120}", 1..5),
        restart_at in 0usize..5,
        window in proptest::option::of(1u32..200),
    ) {
        let store = Arc::new(MemoryStore::new());
        let mut stack = stack_with_window(store.clone(), window);
        let mut history: Vec<(String, String)> = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            if i == restart_at {
                stack = stack_with_window(store.clone(), window);
            }
            let turns: Vec<(&str, &str)> = history.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let r = request(Some("agent"), convo(&turns, q));
            stack.engine.reset_stats();
            let warm = run(&stack, r.clone());
            prop_assert_eq!(&warm.token_ids, &cold(&r).token_ids);
            prop_assert_eq!(stack.engine.stats().prefilled_tokens as usize, warm.cache.prefilled_tokens);
            prop_assert_eq!(warm.cache.reused_tokens % 64, 0);
            history.push((q.clone(), warm.text.clone()));
        }
    }
}

/// A template that, like several real ones, accepts a system message only first.
struct SystemFirstOnly(testkit::ToyFormatter);

impl agent_session::ChatFormatter for SystemFirstOnly {
    fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String, agent_session::FormatError> {
        let late_system = conversation
            .messages
            .iter()
            .skip(1)
            .any(|m| m.role == Role::System);
        if late_system {
            return Err(agent_session::FormatError::Template(
                "system message must be first".into(),
            ));
        }
        self.0.render(conversation, add_generation_prompt)
    }
    fn encode(
        &self,
        text: &str,
    ) -> Result<Vec<agent_session::TokenId>, agent_session::FormatError> {
        self.0.encode(text)
    }
    fn decode(&self, ids: &[agent_session::TokenId]) -> Result<String, agent_session::FormatError> {
        self.0.decode(ids)
    }
    fn stop_token_ids(&self) -> Vec<agent_session::TokenId> {
        self.0.stop_token_ids()
    }
    fn fingerprint(&self) -> String {
        self.0.fingerprint()
    }
}

#[test]
fn a_system_message_mid_conversation_renders_in_place_or_as_a_prefixed_user_turn() {
    use agent_session::ChatFormatter;
    let mut c = convo(&[], "hello");
    c.messages
        .push(Message::text(Role::System, "Environment: linux"));
    c.messages.push(Message::text(Role::User, "go on"));

    // A template that renders it: the system role, where it stands.
    let toy = FakeStack::new();
    let in_place = toy.service.tokenize(&c).expect("renders");
    let text = testkit::ToyFormatter::new()
        .render(&c, true)
        .expect("renders");
    assert!(text.contains(
        "<|im_end|>\n<|im_start|>system\nEnvironment: linux<|im_end|>\n<|im_start|>user\ngo on"
    ));
    assert_eq!(
        in_place,
        testkit::ToyFormatter::new().encode(&text).expect("encodes")
    );

    // A template that refuses it: the documented fallback, a user turn starting "System: ".
    let strict = agent_session::AgentService::new(
        Arc::new(FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS)),
        Arc::new(MemoryStore::new()),
        Arc::new(SystemFirstOnly(testkit::ToyFormatter::new())),
        Arc::new(testkit::ManualClock::new(0)),
        ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize),
    )
    .expect("valid");
    let fallback = strict.tokenize(&c).expect("the fallback renders");
    let expected = c
        .with_inline_system_as_user()
        .expect("has an inline system message");
    assert_eq!(
        expected.messages[2],
        Message::text(Role::User, "System: Environment: linux")
    );
    let text = testkit::ToyFormatter::new()
        .render(&expected, true)
        .expect("renders");
    assert_eq!(
        fallback,
        testkit::ToyFormatter::new().encode(&text).expect("encodes")
    );
    // Generation sees the same prompt.
    let done = block_on(strict.generate(request(None, c.clone()), |_| true)).expect("generates");
    assert_eq!(done.cache.prompt_tokens, fallback.len());
}

#[test]
fn max_tokens_far_above_the_cap_is_lowered_to_it_and_ends_with_length() {
    let config = ServiceConfig {
        max_tokens_cap: 5,
        default_max_tokens: 3,
        ..ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize)
    };
    let stack = FakeStack::build(
        Arc::new(FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS)),
        Arc::new(MemoryStore::new()),
        config.clone(),
    );
    let mut req = request(None, convo(&[], "write a novel"));
    req.max_tokens = Some(64);
    let uncapped = run(&FakeStack::new(), req.clone());
    assert!(
        uncapped.token_ids.len() > 5,
        "the fake writes more than the cap here"
    );
    req.max_tokens = Some(64_000);
    let c = run(&stack, req.clone());
    assert_eq!(c.token_ids.len(), 5, "capped at max_tokens_cap");
    assert_eq!(c.finish_reason, FinishReason::Length);
    req.max_tokens = None;
    assert_eq!(run(&stack, req).token_ids.len(), 3, "the default stays");

    // A cap below the default is refused at start-up.
    let bad = ServiceConfig {
        max_tokens_cap: 2,
        ..config
    };
    let refused = agent_session::AgentService::new(
        Arc::new(FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS)),
        Arc::new(MemoryStore::new()),
        Arc::new(testkit::ToyFormatter::new()),
        Arc::new(testkit::ManualClock::new(0)),
        bad,
    );
    assert!(matches!(refused, Err(ServiceError::InvalidRequest(_))));
}
