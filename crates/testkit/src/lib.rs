//! In-memory fakes of every port of `agent-session`: a deterministic engine that counts what
//! it prefilled, a memory cache store that keeps bytes as the disk store would, a toy
//! byte-level ChatML formatter and a manual clock. Tests of any crate use these instead of
//! the real adapters.

mod clock;
mod engine;
mod formatter;
mod store;

pub use clock::ManualClock;
pub use engine::{yield_once, FakeEngine, FakeEngineStats, YieldOnce};
pub use formatter::ToyFormatter;
pub use store::MemoryStore;

use agent_session::{AgentService, ServiceConfig};
use std::sync::Arc;

/// The fakes wired into a service, with handles to inspect them.
#[derive(Debug, Clone)]
pub struct FakeStack {
    /// The service under test.
    pub service: Arc<AgentService>,
    /// The fake engine (counts prefilled tokens).
    pub engine: Arc<FakeEngine>,
    /// The memory store (survives a "restart": build a new stack over it).
    pub store: Arc<MemoryStore>,
    /// The clock.
    pub clock: Arc<ManualClock>,
}

impl FakeStack {
    /// A service over a fresh fake engine and the given store (share the store to simulate a
    /// restart), with block size 64 and default settings.
    pub fn with_store(store: Arc<MemoryStore>) -> Self {
        let engine = Arc::new(FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS));
        let config = ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize);
        Self::build(engine, store, config)
    }

    /// A service over a fresh fake engine and a fresh memory store.
    pub fn new() -> Self {
        Self::with_store(Arc::new(MemoryStore::new()))
    }

    /// A service from explicit parts.
    pub fn build(engine: Arc<FakeEngine>, store: Arc<MemoryStore>, config: ServiceConfig) -> Self {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let service = AgentService::new(
            engine.clone(),
            store.clone(),
            Arc::new(ToyFormatter::new()),
            clock.clone(),
            config,
        );
        // The default configuration always fits the fake engine (block 64, step 64).
        #[allow(clippy::expect_used)]
        let service = Arc::new(service.expect("fake stack configuration is valid"));
        Self {
            service,
            engine,
            store,
            clock,
        }
    }
}

impl Default for FakeStack {
    fn default() -> Self {
        Self::new()
    }
}
