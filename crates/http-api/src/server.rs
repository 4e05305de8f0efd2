//! The HTTP/1.1 server loop behind [`crate::serve`]: bounded work per connection and a
//! bounded drain.
//!
//! - **Connections**: at most [`Limits::max_connections`] are open; beyond it the listener is
//!   not polled (new connections wait in the kernel's backlog, using no descriptor of ours).
//!   A request's headers must be complete within [`Limits::header_read_timeout`], counted
//!   from the connection's start or from the end of the previous response (hyper's header
//!   timer), and a connection with no request in flight is closed after
//!   [`Limits::keep_alive_timeout`]. Accept errors (out of file descriptors) are logged and
//!   the loop backs off instead of spinning.
//! - **Shutdown**: when the shutdown future completes, readiness turns false, every new
//!   request gets a 503 in its API's shape with `Retry-After` and `Connection: close` (the
//!   listener stays open during the grace period so that clients get that answer rather
//!   than a refused connection, and keep-alive clients are told to go), idle connections are
//!   closed, and requests in flight get [`Limits::shutdown_drain`] to finish. Then streams
//!   still running end with their API's error event (and non-streaming requests with a
//!   503); the cancelled generations commit their prompt's KV; after at most
//!   [`SHUTDOWN_SETTLE`] more the store is flushed and [`crate::serve`] returns.

use crate::{ApiError, Ctx};
use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tower::Service as _;

/// After the grace period: how long running generations get to notice their cancellation,
/// commit and end, before the store is flushed regardless.
pub const SHUTDOWN_SETTLE: Duration = Duration::from_secs(5);

/// The connection-limit warning is logged at most this often.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// How often a connection checks its idle time and the shutdown state.
const CONNECTION_TICK: Duration = Duration::from_millis(250);

/// Shared shutdown state: `draining` from the signal on, `grace_over` once the grace period
/// has passed (running generations are then cut off).
#[derive(Debug)]
pub(crate) struct Shutdown {
    draining: AtomicBool,
    grace_over: watch::Sender<bool>,
    /// Requests whose response is not completely written yet (streams included).
    in_flight: AtomicUsize,
    /// Open client connections.
    open: AtomicUsize,
    /// Connections refused by the limit (counted when the loop had to wait).
    limited: AtomicU64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            grace_over: watch::channel(false).0,
            in_flight: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            limited: AtomicU64::new(0),
        }
    }
}

impl Shutdown {
    /// True from the shutdown signal on.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A receiver that turns `true` when the grace period is over.
    pub(crate) fn grace_over(&self) -> watch::Receiver<bool> {
        self.grace_over.subscribe()
    }

    /// Open connections now.
    pub(crate) fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Times the accept loop waited because the connection limit was reached.
    pub(crate) fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

/// Completes when the grace period is over (never when the state is gone).
pub(crate) async fn grace_over(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|over| *over).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One connection's bookkeeping.
struct ConnState {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(since.elapsed())
    }
}

/// Decrements the in-flight counts when a response body is dropped (written or abandoned).
struct InFlight {
    conn: Arc<ConnState>,
    shutdown: Arc<Shutdown>,
}

impl InFlight {
    fn enter(conn: Arc<ConnState>, shutdown: Arc<Shutdown>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        shutdown.in_flight.fetch_add(1, Ordering::AcqRel);
        Self { conn, shutdown }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self
            .conn
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shutdown.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] guard until it is dropped.
struct TrackedBody {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts open connections while alive.
struct OpenGuard(Arc<Shutdown>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains (see the module doc).
pub(crate) async fn run<F>(
    listener: tokio::net::TcpListener,
    app: Router,
    ctx: Arc<Ctx>,
    shutdown: F,
) -> Result<(), ApiError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let limits = ctx.limits.clone();
    let state = ctx.shutdown.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (signalled_tx, signalled_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = signalled_tx.send(true);
    });
    let mut signalled = signalled_rx.clone();
    // The limit warning is logged at most once per LIMIT_WARNING_EVERY.
    let mut warned_full: Option<Instant> = None;
    let mut at_limit = false;
    let mut grace_deadline: Option<tokio::time::Instant> = None;
    loop {
        // Once draining, stop when nothing is in flight or the grace period is over.
        if let Some(deadline) = grace_deadline {
            if state.in_flight.load(Ordering::Acquire) == 0 {
                tracing::info!("shutting down: no request in flight");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = state.in_flight.load(Ordering::Acquire),
                    grace_secs = limits.shutdown_drain.as_secs(),
                    "shutting down: grace period over, ending the requests still running"
                );
                break;
            }
        }
        let tick = tokio::time::sleep(CONNECTION_TICK);
        let permit = if permits.available_permits() == 0 {
            if !at_limit {
                at_limit = true;
                state.limited.fetch_add(1, Ordering::Relaxed);
                if warned_full.is_none_or(|t| t.elapsed() >= LIMIT_WARNING_EVERY) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        open_connections = state.open_connections(),
                        "connection limit reached: new connections wait in the backlog"
                    );
                    warned_full = Some(Instant::now());
                }
            }
            tokio::select! {
                p = permits.clone().acquire_owned() => p.ok(),
                () = tick => None,
                _ = signalled.changed(), if grace_deadline.is_none() => None,
            }
        } else {
            at_limit = false;
            permits.clone().acquire_owned().await.ok()
        };
        if grace_deadline.is_none() && *signalled.borrow() {
            begin_drain(&ctx);
            grace_deadline = Some(tokio::time::Instant::now() + limits.shutdown_drain);
        }
        let Some(permit) = permit else { continue };
        let tick = tokio::time::sleep(CONNECTION_TICK);
        let accepted = tokio::select! {
            r = listener.accept() => Some(r),
            () = tick => None,
            _ = signalled.changed(), if grace_deadline.is_none() => None,
        };
        if grace_deadline.is_none() && *signalled.borrow() {
            begin_drain(&ctx);
            grace_deadline = Some(tokio::time::Instant::now() + limits.shutdown_drain);
        }
        let stream = match accepted {
            None => continue,
            Some(Ok((stream, _addr))) => stream,
            Some(Err(e)) => {
                // EMFILE / ENFILE: out of descriptors. Say so, and back off instead of spinning.
                let out_of_fds = matches!(e.raw_os_error(), Some(code) if code == 24 || code == 23);
                if out_of_fds {
                    tracing::error!(
                        open_connections = state.open_connections(),
                        error = %e,
                        "cannot accept a connection: the process is out of file descriptors \
                         (raise the limit with `ulimit -n` or lower SEMANTIC_SERVER_MAX_CONNECTIONS)"
                    );
                } else {
                    tracing::warn!(error = %e, "accepting a connection failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        state.open.fetch_add(1, Ordering::AcqRel);
        let open = OpenGuard(state.clone());
        let app = app.clone();
        let limits = limits.clone();
        let shutdown = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = open;
            serve_connection(stream, app, &limits, shutdown).await;
        });
    }
    // Grace over (or nothing in flight): cut off what still runs, give it a moment to end.
    let _ = state.grace_over.send(true);
    let settle = tokio::time::Instant::now() + SHUTDOWN_SETTLE;
    while tokio::time::Instant::now() < settle
        && (state.in_flight.load(Ordering::Acquire) > 0 || ctx.service.stats().await.active > 0)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn begin_drain(ctx: &Ctx) {
    ctx.ready.store(false, Ordering::Release);
    ctx.shutdown.draining.store(true, Ordering::Release);
    tracing::info!(
        grace_secs = ctx.limits.shutdown_drain.as_secs(),
        in_flight = ctx.shutdown.in_flight.load(Ordering::Acquire),
        "shutting down: not ready, new requests get 503, requests in flight get the grace period"
    );
}

/// One HTTP/1.1 connection with its header, idle and shutdown rules.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    limits: &crate::Limits,
    shutdown: Arc<Shutdown>,
) {
    let conn_state = Arc::new(ConnState {
        in_flight: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
    });
    let service = {
        let conn_state = conn_state.clone();
        let shutdown = shutdown.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let guard = InFlight::enter(conn_state.clone(), shutdown.clone());
            let draining = shutdown.draining();
            let mut app = app.clone();
            async move {
                let response = app.call(req.map(Body::new)).await;
                let response = match response {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                let (mut parts, body) = response.into_parts();
                if draining {
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                let body = Body::new(TrackedBody {
                    inner: body,
                    _guard: guard,
                });
                Ok::<_, std::convert::Infallible>(Response::from_parts(parts, body))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(CONNECTION_TICK) => {
                if closing {
                    continue;
                }
                let idle = conn_state.idle_for();
                let idle_too_long = idle.is_some_and(|d| d >= limits.keep_alive_timeout);
                let drain_idle = shutdown.draining() && idle.is_some();
                if idle_too_long || drain_idle {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
