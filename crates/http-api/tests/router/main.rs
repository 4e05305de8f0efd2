//! Router tests over the testkit fakes: every route, field and error path, full SSE streams,
//! usage arithmetic, tool calls, auth, overload and cancellation.

mod admin;
mod anthropic;
mod clients;
mod common;
mod hardening;
mod openai;
mod streaming;
