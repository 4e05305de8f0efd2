//! A blocking HTTP client for the benchmarks: streaming chat completions with the time of
//! the first content byte, token counting, metrics. Talks to 127.0.0.1 only.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::sse::{self, Piece};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(text: impl Into<String>) -> Self {
        Self {
            role: "system",
            content: text.into(),
        }
    }
    /// A user message.
    pub fn user(text: impl Into<String>) -> Self {
        Self {
            role: "user",
            content: text.into(),
        }
    }
    /// An assistant message.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: "assistant",
            content: text.into(),
        }
    }
}

/// The `x-semantic-cache` report of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheReport {
    /// `hot`, `warm` or `miss`.
    pub tier: &'static str,
    /// Prompt tokens.
    pub prompt: u64,
    /// Prompt tokens reused from the cache.
    pub reused: u64,
    /// Prompt tokens computed.
    pub prefilled: u64,
    /// Prefilled tokens that became new cached blocks.
    pub created: u64,
    /// Reused tokens read from disk.
    pub restored: u64,
}

impl CacheReport {
    /// Parse `tier=hot; prompt=812; reused=768; prefilled=44; created=0; restored=0`.
    pub fn parse(header: &str) -> Option<Self> {
        let mut report = Self::default();
        let mut seen_tier = false;
        for part in header.split(';') {
            let (key, value) = part.trim().split_once('=')?;
            let number = || value.trim().parse::<u64>().ok();
            match key.trim() {
                "tier" => {
                    report.tier = match value.trim() {
                        "hot" => "hot",
                        "warm" => "warm",
                        "miss" => "miss",
                        _ => return None,
                    };
                    seen_tier = true;
                }
                "prompt" => report.prompt = number()?,
                "reused" => report.reused = number()?,
                "prefilled" => report.prefilled = number()?,
                "created" => report.created = number()?,
                "restored" => report.restored = number()?,
                _ => {}
            }
        }
        seen_tier.then_some(report)
    }
}

/// Prompt-token accounting of one generation, from whatever the server reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tokens {
    /// Prompt tokens (usage.prompt_tokens, or llama.cpp's cache_n + prompt_n).
    pub prompt: Option<u64>,
    /// Prompt tokens taken from the cache (cached_tokens, cache_n, or the header's reused).
    pub reused: Option<u64>,
    /// Prompt tokens computed.
    pub prefilled: Option<u64>,
    /// Generated tokens.
    pub completion: Option<u64>,
}

/// The result of one streamed generation.
#[derive(Debug, Clone, Serialize)]
pub struct Streamed {
    /// Request sent → first content byte.
    pub ttft_s: f64,
    /// Request sent → end of the stream.
    pub total_s: f64,
    /// Time of every content piece since the request was sent (seconds).
    #[serde(skip)]
    pub pieces_s: Vec<f64>,
    /// The answer text.
    #[serde(skip)]
    pub content: String,
    /// Whether any content came (if not, `ttft_s` is the end of the stream).
    pub had_content: bool,
    /// Token accounting.
    pub tokens: Tokens,
    /// Our server's cache report.
    pub cache: Option<CacheReport>,
    /// When the request was sent (for concurrent runs).
    #[serde(skip)]
    pub sent_at: Option<Instant>,
}

impl Streamed {
    /// Decode tokens/s after the first content piece (pieces counted as tokens).
    pub fn decode_rate(&self) -> Option<f64> {
        let first = *self.pieces_s.first()?;
        let last = *self.pieces_s.last()?;
        (self.pieces_s.len() >= 2 && last > first)
            .then(|| (self.pieces_s.len() - 1) as f64 / (last - first))
    }
}

/// A chat request.
#[derive(Debug, Clone)]
pub struct Chat<'a> {
    /// The conversation.
    pub messages: &'a [Message],
    /// Answer length.
    pub max_tokens: u32,
    /// `X-Agent-Id` (ours).
    pub agent: Option<&'a str>,
    /// Extra body fields (llama.cpp's `id_slot`, `cache_prompt`).
    pub extra: Option<Value>,
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    /// The `model` field to send (mlx-lm needs `default_model`).
    model: String,
}

impl Client {
    /// A client of `http://127.0.0.1:{port}`.
    pub fn new(port: u16, model: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(900))
            .timeout_write(Duration::from_secs(60))
            .build();
        Self {
            agent,
            base: format!("http://127.0.0.1:{port}"),
            model: model.to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET a path; `Ok(None)` for an HTTP error status or a refused connection.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        match self
            .agent
            .get(&self.url(path))
            .timeout(Duration::from_secs(5))
            .call()
        {
            Ok(resp) => {
                let status = resp.status();
                resp.into_string().ok().map(|body| (status, body))
            }
            Err(ureq::Error::Status(code, resp)) => {
                Some((code, resp.into_string().unwrap_or_default()))
            }
            Err(_) => None,
        }
    }

    /// GET a path and return its body; any failure is an error.
    pub fn get_text(&self, path: &str) -> Result<String> {
        match self.try_get(path) {
            Some((200, body)) => Ok(body),
            Some((code, body)) => bail!("GET {path}: HTTP {code}: {}", snippet(&body)),
            None => bail!("GET {path}: no answer from {}", self.base),
        }
    }

    /// POST JSON and parse the JSON answer.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        match self
            .agent
            .post(&self.url(path))
            .set("content-type", "application/json")
            .send_string(&body.to_string())
        {
            Ok(resp) => resp
                .into_json::<Value>()
                .with_context(|| format!("POST {path}: the answer is not JSON")),
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                bail!("POST {path}: HTTP {code}: {}", snippet(&text))
            }
            Err(err) => Err(anyhow::Error::new(err).context(format!("POST {path} failed"))),
        }
    }

    /// Prompt length of a conversation through `POST /v1/messages/count_tokens` (ours).
    pub fn count_tokens(&self, messages: &[Message]) -> Result<u64> {
        let system: Vec<&str> = messages
            .iter()
            .filter(|m| m.role == "system")
            .map(|m| m.content.as_str())
            .collect();
        let rest: Vec<&Message> = messages.iter().filter(|m| m.role != "system").collect();
        let mut body = json!({ "model": self.model, "messages": rest });
        if !system.is_empty() {
            body["system"] = Value::String(system.join("\n"));
        }
        let answer = self.post_json("/v1/messages/count_tokens", &body)?;
        answer
            .get("input_tokens")
            .and_then(Value::as_u64)
            .with_context(|| format!("count_tokens answered without input_tokens: {answer}"))
    }

    /// The JSON body of a streaming chat completion (temperature 0).
    fn chat_body(&self, chat: &Chat<'_>) -> String {
        let mut body = json!({
            "model": self.model,
            "messages": chat.messages,
            "max_tokens": chat.max_tokens,
            "temperature": 0.0,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if let (Some(Value::Object(extra)), Some(obj)) = (&chat.extra, body.as_object_mut()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        body.to_string()
    }

    /// Sends `chat` as [`Client::chat`] does, on a connection of its own, and hangs up
    /// (closes the connection) as soon as `stop` is set, unless the response began first.
    /// Returns when it was sent and the seconds until the response's first byte (`None`:
    /// it hung up before). The server sends nothing before the prompt is processed, so the
    /// first byte comes with the first token.
    pub fn chat_until(&self, chat: &Chat<'_>, stop: &AtomicBool) -> Result<(Instant, Option<f64>)> {
        let body = self.chat_body(chat);
        let host = self.base.trim_start_matches("http://");
        let mut stream =
            TcpStream::connect(host).with_context(|| format!("cannot connect to {host}"))?;
        stream.set_read_timeout(Some(Duration::from_millis(10)))?;
        let mut head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Accept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if let Some(agent) = chat.agent {
            head.push_str(&format!("x-agent-id: {agent}\r\n"));
        }
        head.push_str("\r\n");
        let sent = Instant::now();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(0) => bail!("the server closed the connection without an answer"),
                Ok(_) => return Ok((sent, Some(sent.elapsed().as_secs_f64()))),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Acquire) {
                        // Dropping the stream closes the connection.
                        return Ok((sent, None));
                    }
                }
                Err(e) => return Err(anyhow::Error::new(e).context("waiting for the answer")),
            }
        }
    }

    /// Send a streaming chat completion (OpenAI API, temperature 0) and time it.
    pub fn chat(&self, chat: &Chat<'_>) -> Result<Streamed> {
        self.stream(chat, false)
    }

    /// As [`Client::chat`], but hangs up (closes the connection) at the first content piece:
    /// for a turn whose TTFT is measured and whose answer nothing uses. `total_s` is then
    /// the hang-up, and the usage the stream sends at its end is missing (our
    /// `x-semantic-cache` header is kept). [`super::server::Server::first_token`] also
    /// waits until the server is idle before the next measurement.
    pub fn chat_first(&self, chat: &Chat<'_>) -> Result<Streamed> {
        self.stream(chat, true)
    }

    fn stream(&self, chat: &Chat<'_>, first_only: bool) -> Result<Streamed> {
        let text = self.chat_body(chat);
        let mut req = self
            .agent
            .post(&self.url("/v1/chat/completions"))
            .set("content-type", "application/json")
            .set("accept", "text/event-stream");
        if let Some(agent) = chat.agent {
            req = req.set("x-agent-id", agent);
        }
        let sent = Instant::now();
        let resp = match req.send_string(&text) {
            Ok(resp) => resp,
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                bail!("chat completion: HTTP {code}: {}", snippet(&text))
            }
            Err(err) => return Err(anyhow::Error::new(err).context("chat completion failed")),
        };
        let cache = resp.header("x-semantic-cache").and_then(CacheReport::parse);
        let mut reader = BufReader::new(resp.into_reader());
        let mut parser = sse::Parser::default();
        let mut out = Streamed {
            ttft_s: f64::NAN,
            total_s: f64::NAN,
            pieces_s: Vec::new(),
            content: String::new(),
            had_content: false,
            tokens: Tokens::default(),
            cache,
            sent_at: Some(sent),
        };
        let mut line = String::new();
        let mut done = false;
        while !done {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .context("reading the event stream")?;
            let event = if n == 0 {
                done = true;
                parser.finish()
            } else {
                parser.push_line(&line)
            };
            let Some(event) = event else { continue };
            let at = sent.elapsed().as_secs_f64();
            for piece in sse::interpret(&event) {
                match piece {
                    Piece::Content(t) => {
                        if !out.had_content {
                            out.had_content = true;
                            out.ttft_s = at;
                        }
                        out.pieces_s.push(at);
                        out.content.push_str(&t);
                        // Dropping the reader before the end closes the connection.
                        done |= first_only;
                    }
                    Piece::Usage(u) => merge_usage(&mut out.tokens, &u),
                    Piece::Done => done = true,
                    Piece::Error(e) => bail!("the stream ended with an error: {e}"),
                }
            }
        }
        out.total_s = sent.elapsed().as_secs_f64();
        if !out.had_content {
            out.ttft_s = out.total_s;
        }
        if let Some(c) = out.cache {
            out.tokens.prompt = Some(c.prompt);
            out.tokens.reused = Some(c.reused);
            out.tokens.prefilled = Some(c.prefilled);
        }
        if let (Some(p), Some(r), None) =
            (out.tokens.prompt, out.tokens.reused, out.tokens.prefilled)
        {
            out.tokens.prefilled = Some(p.saturating_sub(r));
        }
        Ok(out)
    }
}

/// Merge a usage object (OpenAI usage, or llama.cpp `{"timings": …}`) into `tokens`.
pub fn merge_usage(tokens: &mut Tokens, usage: &Value) {
    let num = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_u64);
    if let Some(t) = usage.get("timings") {
        // llama.cpp: cache_n tokens reused, prompt_n computed.
        if let (Some(cache), Some(prompt)) = (num(t, "/cache_n"), num(t, "/prompt_n")) {
            tokens.reused = Some(cache);
            tokens.prefilled = Some(prompt);
            tokens.prompt.get_or_insert(cache + prompt);
        }
        return;
    }
    if let Some(p) = num(usage, "/prompt_tokens") {
        tokens.prompt = Some(p);
    }
    if let Some(c) = num(usage, "/completion_tokens") {
        tokens.completion = Some(c);
    }
    if let Some(c) = num(usage, "/prompt_tokens_details/cached_tokens") {
        if tokens.reused.is_none() {
            tokens.reused = Some(c);
        }
    }
}

fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(400) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_owned(),
    }
}

/// The value of a Prometheus sample `name` (no labels, or the sum over its label sets).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = key.split('{').next().unwrap_or(key);
        if base == name {
            if let Ok(v) = value.trim().parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_header_parses_and_rejects_garbage() {
        let r = CacheReport::parse(
            "tier=hot; prompt=812; reused=768; prefilled=44; created=0; restored=0",
        );
        assert_eq!(
            r,
            Some(CacheReport {
                tier: "hot",
                prompt: 812,
                reused: 768,
                prefilled: 44,
                created: 0,
                restored: 0
            })
        );
        assert_eq!(
            CacheReport::parse("tier=cold; prompt=1").map(|r| r.tier),
            None
        );
        assert_eq!(CacheReport::parse("prompt=1"), None);
        assert_eq!(CacheReport::parse("tier=miss; prompt=x"), None);
    }

    #[test]
    fn usage_from_openai_and_llama_cpp() {
        let mut t = Tokens::default();
        merge_usage(
            &mut t,
            &json!({"prompt_tokens": 600, "completion_tokens": 32, "prompt_tokens_details": {"cached_tokens": 512}}),
        );
        assert_eq!(
            (t.prompt, t.reused, t.completion),
            (Some(600), Some(512), Some(32))
        );
        let mut l = Tokens::default();
        merge_usage(
            &mut l,
            &json!({"timings": {"cache_n": 500, "prompt_n": 20}}),
        );
        assert_eq!(
            (l.prompt, l.reused, l.prefilled),
            (Some(520), Some(500), Some(20))
        );
    }

    #[test]
    fn prometheus_samples_are_summed_over_labels() {
        let text = "# HELP x y\n# TYPE semantic_restore_seconds histogram\n\
            semantic_restore_seconds_sum 0.25\nsemantic_restore_seconds_count 1\n\
            semantic_cache_restored_bytes_total 1000\n\
            semantic_ttft_seconds_count{api=\"openai\",tier=\"hot\"} 2\n\
            semantic_ttft_seconds_count{api=\"openai\",tier=\"miss\"} 3\n";
        assert_eq!(metric(text, "semantic_restore_seconds_sum"), Some(0.25));
        assert_eq!(metric(text, "semantic_ttft_seconds_count"), Some(5.0));
        assert_eq!(metric(text, "semantic_missing"), None);
    }

    #[test]
    fn decode_rate_counts_pieces_after_the_first() {
        let s = Streamed {
            ttft_s: 1.0,
            total_s: 2.0,
            pieces_s: vec![1.0, 1.5, 2.0],
            content: String::new(),
            had_content: true,
            tokens: Tokens::default(),
            cache: None,
            sent_at: None,
        };
        assert_eq!(s.decode_rate(), Some(2.0));
    }
}
