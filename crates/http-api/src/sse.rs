//! Server-sent events: turns a running generation into an API's event stream. Dropping the
//! body (the client disconnected) drops the generation's receiver, which cancels it.

use crate::error::ApiError;
use crate::generation::{Next, Running};
use agent_session::Completion;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::convert::Infallible;

/// Maps generation steps to one API's SSE events.
pub(crate) trait Translator: Send + 'static {
    /// Events for new answer text.
    fn on_delta(&mut self, text: String) -> Vec<Event>;
    /// Events that end a successful stream.
    fn on_finished(&mut self, completion: Completion) -> Vec<Event>;
    /// Events that end a failed stream.
    fn on_error(&mut self, error: ApiError) -> Vec<Event>;
}

struct State<T> {
    running: Running,
    translator: T,
    pending: VecDeque<Event>,
    done: bool,
}

/// An SSE response: `initial` events first, then the translated generation.
pub(crate) fn response<T: Translator>(
    running: Running,
    translator: T,
    initial: Vec<Event>,
    keep_alive: KeepAlive,
    mut headers: HeaderMap,
) -> Response {
    let state = State {
        running,
        translator,
        pending: initial.into(),
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(event), st));
            }
            if st.done {
                return None;
            }
            let events = match st.running.next().await {
                Next::Delta(text) => st.translator.on_delta(text),
                Next::Finished(c) => {
                    st.done = true;
                    st.translator.on_finished(c)
                }
                Next::Failed(e) => {
                    st.done = true;
                    tracing::warn!(error = %e, "generation failed mid-stream");
                    st.translator.on_error(e)
                }
            };
            st.pending.extend(events);
        }
    });
    // Proxies (nginx) must not buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    let mut response = Sse::new(stream).keep_alive(keep_alive).into_response();
    response.headers_mut().extend(headers);
    response
}

/// A data-only event with a JSON payload.
pub(crate) fn data(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// A named event with a JSON payload.
pub(crate) fn named(name: &'static str, value: &serde_json::Value) -> Event {
    Event::default().event(name).data(value.to_string())
}
