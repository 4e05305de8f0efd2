//! The HTTP API over the testkit fakes, on a real socket: for SDK checks and end-to-end tests
//! that need no model.
//!
//! ```text
//! cargo run -p http-api --example fake_server -- --port 8099 [--api-key K]... [--admin-key K]
//! ```
//!
//! Prints `listening on http://<addr>` once it accepts connections; stops on Ctrl-C (or
//! SIGTERM) and drains. The fake model writes arbitrary lowercase text, except that it plays
//! along with tools so clients can exercise a round trip: when tools are offered and the last
//! message is the user's, it calls the first tool (`{"name": ..., "arguments": {}}`); when
//! the last message is a tool result, it answers `Tool said: <result>`.

use agent_session::{
    AgentService, EngineError, InferenceEngine, KvBlock, KvPayload, ModelDescriptor, SequenceId,
    ServiceConfig, StepRequest, TokenId,
};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use testkit::{FakeEngine, ManualClock, MemoryStore, ToyFormatter};

const IM_START: TokenId = 1;
const IM_END: TokenId = 2;

/// The fake engine plus a tool-aware script decided from the prompt at the first step.
struct ToolAwareEngine {
    inner: FakeEngine,
    tokens: Mutex<HashMap<SequenceId, Vec<TokenId>>>,
    scripts: Mutex<HashMap<SequenceId, Option<Vec<TokenId>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn text_tokens(s: &str) -> Vec<TokenId> {
    s.bytes().map(|b| TokenId::from(b) + 4).collect()
}

/// What the fake should answer to this prompt, when it plays along with tools.
fn script_for(prompt: &[TokenId]) -> Option<Vec<TokenId>> {
    let mut text = String::new();
    for &t in prompt {
        match t {
            IM_START => text.push('\u{1}'),
            IM_END => text.push('\u{2}'),
            t if (4..260).contains(&t) => text.push(char::from((t - 4) as u8)),
            _ => {}
        }
    }
    let turns: Vec<&str> = text.split('\u{1}').filter(|s| !s.is_empty()).collect();
    let tool = turns
        .iter()
        .find_map(|t| t.strip_prefix("system\nTools: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string);
    // The last turn is the opened assistant turn; the one before is the last message.
    let last = turns.len().checked_sub(2).map(|i| turns[i])?;
    let (role, content) = last.split_once('\n')?;
    let content = content.trim_end_matches(['\u{2}', '\n']);
    match (role, tool) {
        ("tool", _) => {
            let shown: String = content.chars().take(60).collect();
            Some(text_tokens(&format!("Tool said: {shown}")))
        }
        ("user", Some(name)) => Some(text_tokens(&format!(
            "{{\"name\": \"{name}\", \"arguments\": {{}}}}"
        ))),
        _ => None,
    }
}

#[async_trait]
impl InferenceEngine for ToolAwareEngine {
    fn model(&self) -> &ModelDescriptor {
        self.inner.model()
    }
    async fn open_sequence(&self) -> Result<SequenceId, EngineError> {
        let s = self.inner.open_sequence().await?;
        lock(&self.tokens).insert(s, Vec::new());
        Ok(s)
    }
    async fn import_blocks(
        &self,
        seq: SequenceId,
        blocks: Vec<Arc<KvBlock>>,
    ) -> Result<(), EngineError> {
        let ids: Vec<TokenId> = blocks
            .iter()
            .flat_map(|b| b.meta.token_ids.clone())
            .collect();
        self.inner.import_blocks(seq, blocks).await?;
        lock(&self.tokens).entry(seq).or_default().extend(ids);
        Ok(())
    }
    async fn prefill(&self, seq: SequenceId, tokens: Vec<TokenId>) -> Result<(), EngineError> {
        lock(&self.tokens).entry(seq).or_default().extend(&tokens);
        self.inner.prefill(seq, tokens).await
    }
    async fn step(
        &self,
        batch: Vec<StepRequest>,
    ) -> Result<Vec<Result<TokenId, EngineError>>, EngineError> {
        let mut plan = Vec::with_capacity(batch.len());
        for r in &batch {
            let mut tokens = lock(&self.tokens);
            let seq_tokens = tokens.entry(r.seq).or_default();
            if r.step == 0 {
                let script = script_for(seq_tokens);
                lock(&self.scripts).insert(r.seq, script);
            }
            if let Some(t) = r.feed {
                seq_tokens.push(t);
            }
            plan.push((r.seq, r.step));
        }
        let out = self.inner.step(batch).await?;
        let scripts = lock(&self.scripts);
        Ok(out
            .into_iter()
            .zip(plan)
            .map(|(result, (seq, step))| match scripts.get(&seq) {
                Some(Some(script)) => {
                    result.map(|_| script.get(step as usize).copied().unwrap_or(IM_END))
                }
                _ => result,
            })
            .collect())
    }
    async fn export_blocks(
        &self,
        seq: SequenceId,
        first_block: usize,
        count: usize,
    ) -> Result<Vec<KvPayload>, EngineError> {
        self.inner.export_blocks(seq, first_block, count).await
    }
    async fn truncate(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError> {
        if let Some(v) = lock(&self.tokens).get_mut(&seq) {
            v.truncate(tokens);
        }
        self.inner.truncate(seq, tokens).await
    }
    async fn sequence_len(&self, seq: SequenceId) -> Result<usize, EngineError> {
        self.inner.sequence_len(seq).await
    }
    async fn release(&self, seq: SequenceId) -> Result<(), EngineError> {
        lock(&self.tokens).remove(&seq);
        lock(&self.scripts).remove(&seq);
        self.inner.release(seq).await
    }
}

struct Args {
    port: u16,
    api_keys: Vec<String>,
    admin_key: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: 8099,
        api_keys: Vec::new(),
        admin_key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => args.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--api-key" => args.api_keys.push(value()?),
            "--admin-key" => args.admin_key = Some(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let engine = Arc::new(ToolAwareEngine {
        inner: FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS),
        tokens: Mutex::new(HashMap::new()),
        scripts: Mutex::new(HashMap::new()),
    });
    let service = AgentService::new(
        engine,
        Arc::new(MemoryStore::new()),
        Arc::new(ToyFormatter::new()),
        Arc::new(ManualClock::new(1_700_000_000_000)),
        ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize),
    )?;
    let state = http_api::AppState::new(Arc::new(service))
        .with_api_keys(args.api_keys)
        .with_admin_key(args.admin_key);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    http_api::serve(listener, state, http_api::shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(s: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        for part in s.split_inclusive(['\u{1}', '\u{2}']) {
            for c in part.chars() {
                match c {
                    '\u{1}' => out.push(IM_START),
                    '\u{2}' => out.push(IM_END),
                    c => out.extend(text_tokens(&c.to_string())),
                }
            }
        }
        out
    }

    #[test]
    fn scripts() {
        let with_tools =
            "\u{1}system\nTools: get_weather (Weather)\u{2}\n\u{1}user\nhi\u{2}\n\u{1}assistant\n";
        let s = script_for(&prompt(with_tools)).expect("a tool call");
        assert_eq!(
            s,
            text_tokens("{\"name\": \"get_weather\", \"arguments\": {}}")
        );
        let after = "\u{1}user\nhi\u{2}\n\u{1}tool\n21C\u{2}\n\u{1}assistant\n";
        assert_eq!(
            script_for(&prompt(after)),
            Some(text_tokens("Tool said: 21C"))
        );
        assert_eq!(
            script_for(&prompt("\u{1}user\nhi\u{2}\n\u{1}assistant\n")),
            None
        );
    }
}
