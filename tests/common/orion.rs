//! A Context Broker for tests: an axum router that records every request
//! and answers like Orion (204 for updates, 201 for registrations and
//! subscriptions, an entity's attributes for a read), or 503 while "down"
//! and 400 while "refusing".

use super::{WAIT, eventually};
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{get, post};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One request the Context Broker got.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path and query.
    pub path: String,
    /// `fiware-service`.
    pub service: String,
    /// `fiware-servicepath`.
    pub servicepath: String,
    /// The body, as text.
    pub body: String,
}

/// The recording Context Broker.
#[derive(Default)]
pub struct Orion {
    /// Every request taken, in order.
    pub seen: Mutex<Vec<Seen>>,
    /// Answer 503 to everything.
    pub down: AtomicBool,
    /// Answer 400 to everything.
    pub refuse: AtomicBool,
    /// Take 3 s to answer an entity read.
    pub slow_reads: AtomicBool,
}

impl Orion {
    /// Start one on a free port: it and its URL.
    pub async fn start() -> (Arc<Orion>, String) {
        let cb = Arc::new(Orion::default());
        let record = |cb: Arc<Orion>, code: StatusCode| {
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let cb = cb.clone();
                async move { cb.take(&uri, &headers, &body).unwrap_or(code) }
            }
        };
        let read = {
            let cb = cb.clone();
            move |uri: Uri, headers: HeaderMap| {
                let cb = cb.clone();
                async move {
                    if cb.slow_reads.load(Ordering::SeqCst) {
                        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                    }
                    if let Some(code) = cb.take(&uri, &headers, &[]) {
                        return Err(code);
                    }
                    Ok(axum::Json(json!({"sleepTime": {"type": "Text", "value": "200"},
                        "warningLevel": {"type": "Text", "value": "80"}})))
                }
            }
        };
        let app = Router::new()
            .route("/v2/entities", post(record(cb.clone(), StatusCode::NO_CONTENT)))
            .route("/v2/op/update", post(record(cb.clone(), StatusCode::NO_CONTENT)))
            .route("/v2/registrations", post(record(cb.clone(), StatusCode::CREATED)))
            .route("/v2/subscriptions", post(record(cb.clone(), StatusCode::CREATED)))
            .route("/v2/entities/{id}/attrs", get(read));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (cb, url)
    }

    /// Record a request, unless down or refusing (then that answer).
    fn take(&self, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Option<StatusCode> {
        if self.down.load(Ordering::SeqCst) {
            return Some(StatusCode::SERVICE_UNAVAILABLE);
        }
        if self.refuse.load(Ordering::SeqCst) {
            return Some(StatusCode::BAD_REQUEST);
        }
        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        self.seen.lock().unwrap().push(Seen {
            path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            service: h("fiware-service"),
            servicepath: h("fiware-servicepath"),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        None
    }

    /// The bodies sent to `path` so far.
    pub fn bodies(&self, path: &str) -> Vec<String> {
        self.seen.lock().unwrap().iter().filter(|s| s.path == path).map(|s| s.body.clone()).collect()
    }

    /// The `<cmd>_status` values entity `id` got, in order (upserts).
    pub fn command_states(&self, id: &str, cmd: &str) -> Vec<String> {
        let key = format!("{cmd}_status");
        self.bodies("/v2/entities?options=upsert")
            .iter()
            .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .filter(|e| e["id"] == id)
            .filter_map(|e| e[&key]["value"].as_str().map(str::to_owned))
            .collect()
    }

    /// Wait until a body sent to `path` contains `needle`.
    pub async fn until(&self, path: &str, needle: &str) -> String {
        eventually(WAIT, &format!("the Context Broker got {needle} on {path}"), async || {
            self.bodies(path).into_iter().find(|b| b.contains(needle))
        })
        .await
    }
}
