//! Serving an axum router on a TCP listener, with the limits every busbar
//! listener shares (the daemon's API, each gateway's north and south APIs).
//!
//! `axum::serve` accepts every connection and keeps an idle one forever,
//! so 1,030 idle sockets once used up a 1,024-descriptor limit and stopped
//! both HTTP APIs and child-process starts. Here:
//! - at most [`Limits::max_connections`] connections per listener are
//!   served; further clients wait in the kernel's backlog;
//! - a connection must send a request's headers within
//!   [`Limits::header_timeout`] (also between keep-alive requests), so an
//!   idle or slow-loris connection is closed;
//! - a request line or header block too large gets a JSON error (414, 431)
//!   like every other refusal, before hyper's own (bodiless) limits apply.

use axum::Router;
use axum::extract::{MatchedPath, State};
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use crate::metrics::RequestLabel;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Longest request target (path and query) answered with anything but 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest header block (names and values) answered with anything but 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most header fields answered with anything but 431.
pub const MAX_HEADERS: usize = 100;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed to send a request's headers, and to start the next
    /// request on a kept-alive connection.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 512, header_timeout: Duration::from_secs(10) }
    }
}

/// A listener that cannot be bound; the message names the address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Bind `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
}

fn json_error(status: StatusCode, msg: String) -> Response {
    (status, axum::Json(serde_json::json!({"error": {"msg": msg, "code": status.as_u16()}}))).into_response()
}

/// Refuse an oversized request line or header block with a JSON error.
async fn guard(req: Request<axum::body::Body>, next: Next) -> Response {
    let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri > MAX_URI_BYTES {
        return json_error(
            StatusCode::URI_TOO_LONG,
            format!("The request target is {uri} bytes; at most {MAX_URI_BYTES} are accepted"),
        );
    }
    let headers = req.headers();
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("At most {MAX_HEADERS} header fields of {MAX_HEADER_BYTES} bytes in all are accepted"),
        );
    }
    next.run(req).await
}

/// What a listener reports of each request: a `request` span (server,
/// method, route) around its handling, and a count in
/// `busbar_http_requests`.
#[derive(Debug, Clone)]
pub struct Observe {
    /// The listener's name in spans and metrics (`api`, `north`, `south`).
    pub server: &'static str,
    /// The daemon's request counter (shared by every listener).
    pub requests: Family<RequestLabel, Counter>,
}

impl Observe {
    /// Report as `server` into `metrics`.
    pub fn new(server: &'static str, metrics: &crate::metrics::Metrics) -> Self {
        Observe { server, requests: metrics.http_requests.clone() }
    }
}

async fn observe(State(o): State<Observe>, req: Request<axum::body::Body>, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let method = req.method().as_str().to_owned();
    let span = tracing::debug_span!("request", server = o.server, %method, %route);
    let started = std::time::Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    debug!(parent: &span, status, elapsed_us = started.elapsed().as_micros() as u64, "answered");
    o.requests.get_or_create(&RequestLabel { server: o.server, route, method, status }).inc();
    response
}

/// Serve `router` on `listener` until `token` is cancelled, each connection
/// a task of `tracker` (so shutdown waits for them). Connections in
/// progress finish their current request, then close. Each request is
/// reported as `observe` says.
pub fn spawn(
    tracker: &TaskTracker,
    listener: TcpListener,
    router: Router,
    token: CancellationToken,
    limits: Limits,
    observe_as: Observe,
) {
    let router =
        router.layer(axum::middleware::from_fn(guard)).layer(axum::middleware::from_fn_with_state(observe_as, observe));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conn_tracker = tracker.clone();
    let span = tracing::Span::current();
    tracker.spawn(
        async move {
            loop {
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = token.cancelled() => return,
                };
                let (stream, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(e) => {
                            // Out of descriptors, say: wait a little rather
                            // than spin, and keep serving.
                            warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = token.cancelled() => return,
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let token = token.clone();
                conn_tracker.spawn(
                    async move {
                        let _permit = permit;
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder
                            .timer(TokioTimer::new())
                            .header_read_timeout(limits.header_timeout)
                            .max_headers(MAX_HEADERS * 2);
                        let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
                        tokio::pin!(conn);
                        let result = tokio::select! {
                            r = conn.as_mut() => r,
                            _ = token.cancelled() => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                        if let Err(e) = result {
                            debug!(%peer, error = %e, "connection ended");
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        .instrument(span),
    );
}

/// Raise the soft limit of open files to the hard limit: a daemon with
/// many listeners, connections and children should not stop at a
/// distribution's default of 1,024 when the system allows more.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    if let Ok((soft, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}
