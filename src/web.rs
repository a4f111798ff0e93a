//! What a browser gets from the daemon's HTTP API: the live status page
//! (one HTML file embedded in the binary: no CDN, no build step) and the
//! WebSocket event stream `GET /api/v1/events` it and other viewers use.
//!
//! The page itself holds no data, so it is served without a token; every
//! request it makes (the directory, actions, a WebSocket ticket) goes
//! through the API's gate like any other client's.

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::daemon::Shared;
use crate::events::{Event, Subscriptions};

/// The page.
pub const INDEX_HTML: &str = include_str!("web/index.html");

/// How long one frame may take to reach a viewer before it is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Close code for a viewer that fell behind the ring (private range).
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// `GET /`: the status page. Its script is inline and talks only to this
/// origin, which the Content-Security-Policy also says.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

/// `GET /api/v1/events`: upgrade to the event stream (the gate has let
/// the request in, with a bearer token or a ticket).
pub async fn events(
    State(s): State<Arc<Shared>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // A plain GET gets a JSON error like every other refusal.
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            return crate::api::ApiError(r.status(), format!("{}: connect with a WebSocket client", r.body_text()))
                .into_response();
        }
    };
    let hub = s.env.events.clone();
    let token = s.env.shutdown.clone();
    // Subscriptions are small; tungstenite zeroes its read buffer on each
    // read, and 4 KiB still grows for a larger message.
    ws.read_buffer_size(4 * 1024)
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .max_write_buffer_size(1 << 20)
        .on_upgrade(move |socket| {
            let rx = hub.subscribe();
            session(socket, rx, token)
        })
}

/// One viewer: subscriptions in, matching events out, until it closes,
/// falls behind or the daemon stops.
///
/// The socket is split: a reader task hands the (rare) subscription
/// messages over, so the loop that sends events never polls the socket's
/// read side. Polling it after every event cost a read attempt, and
/// tungstenite zeroes its read buffer on each: a third of the CPU of 100
/// viewers (BENCHMARKS.md). Each frame is the hub's shared bytes.
async fn session(
    socket: WebSocket,
    mut events: tokio::sync::broadcast::Receiver<Arc<Event>>,
    token: CancellationToken,
) {
    let (mut tx, mut rx) = socket.split();
    let (msgs_tx, mut msgs) = tokio::sync::mpsc::channel::<Message>(8);
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            let end = matches!(m, Message::Close(_));
            if msgs_tx.send(m).await.is_err() || end {
                break;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let mut subs = Subscriptions::default();
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => {
                close(&mut tx, 1001, "the daemon is stopping".into()).await;
                return;
            }
            msg = msgs.recv() => {
                let reply = match msg {
                    Some(Message::Text(t)) => match subs.add(t.as_str()) {
                        Ok(()) => subs.confirmation(),
                        Err(e) => json!({"error": {"msg": e}}),
                    },
                    Some(Message::Binary(_)) => json!({"error": {"msg": "send subscriptions as text frames"}}),
                    Some(Message::Ping(_) | Message::Pong(_)) => continue,
                    Some(Message::Close(_)) | None => return,
                };
                if !send(&mut tx, reply.to_string().into()).await {
                    return;
                }
            }
            ev = events.recv() => match ev {
                Ok(ev) => {
                    if subs.matches(&ev.topic) && !send(&mut tx, ev.frame.clone()).await {
                        debug!("a viewer did not take a frame in time; disconnected");
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    debug!(missed = n, "a viewer fell behind; disconnected");
                    close(&mut tx, CLOSE_TOO_SLOW, format!("too slow: {n} events missed")).await;
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Aborts the task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Send one text frame within [`SEND_TIMEOUT`].
async fn send(socket: &mut Sink, text: axum::extract::ws::Utf8Bytes) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text))).await, Ok(Ok(())))
}

/// Close with `code` and `why` (best effort, bounded).
async fn close(socket: &mut Sink, code: u16, why: String) {
    let frame = CloseFrame { code, reason: why.into() };
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
}
