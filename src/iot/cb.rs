//! The Context Broker sender of one IoT gateway: every NGSI-v2 request
//! (`ngsi.rs`) goes through a queue persisted in the store, in order, and
//! leaves it only once the Context Broker accepted it. A Context Broker
//! that is down, slow or refusing connections loses nothing: the sender
//! retries the oldest request with backoff (100 ms doubling to 10 s) until
//! it is taken, so order is kept per entity (and overall). A request the
//! Context Broker refuses as malformed (4xx other than 408 and 429) would
//! be refused forever: it is dropped, counted and logged. The queue is
//! bounded (`cbroker_queue`, default 100,000 requests); beyond it new
//! requests are dropped and counted. The federation path does not wait on
//! any of this.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::ngsi::Request;
use crate::store::Store;

/// Longest a request to the Context Broker may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the sender counts (shown in the gateway's status and `/metrics`).
#[derive(Debug, Default)]
pub struct CbCounters {
    /// Requests the Context Broker accepted.
    pub sent: AtomicU64,
    /// Requests waiting (in the store).
    pub queued: AtomicU64,
    /// Requests dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Requests the Context Broker refused as malformed.
    pub rejected: AtomicU64,
    /// Failed attempts (Context Broker unreachable or failing).
    pub retries: AtomicU64,
}

impl CbCounters {
    /// As status fields.
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "sent": get(&self.sent), "queued": get(&self.queued), "dropped": get(&self.dropped),
            "rejected": get(&self.rejected), "retries": get(&self.retries),
        })
    }
}

/// Run the sender of `gateway` until `token` is cancelled: take requests
/// from `rx` into the store, send the oldest, repeat.
pub async fn run(
    store: Store,
    gateway: Uuid,
    mut rx: mpsc::Receiver<Request>,
    limit: usize,
    counters: Arc<CbCounters>,
    token: CancellationToken,
) {
    let client = match crate::http::client() {
        Ok(c) => c.clone(),
        Err(e) => {
            warn!(error = %e, "no HTTP client; the NGSI northbound is off");
            return;
        }
    };
    let mut queued = store.ngsi_len(gateway).await.unwrap_or(0);
    counters.queued.store(queued, Ordering::Relaxed);
    let mut backoff = Duration::from_millis(100);
    loop {
        // Take everything that arrived into the store, in one transaction.
        let mut batch = Vec::new();
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        if batch.is_empty() && queued == 0 {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => batch.push(r),
                    None => return,
                },
                _ = token.cancelled() => return,
            }
        }
        if !batch.is_empty() {
            let room = limit.saturating_sub(queued as usize);
            if batch.len() > room {
                let over = (batch.len() - room) as u64;
                counters.dropped.fetch_add(over, Ordering::Relaxed);
                warn!(dropped = over, limit, "the Context Broker queue is full; requests dropped");
                batch.truncate(room);
            }
            let rows: Vec<String> = batch.iter().filter_map(|r| serde_json::to_string(r).ok()).collect();
            let n = rows.len() as u64;
            if let Err(e) = store.ngsi_push(gateway, rows).await {
                warn!(error = %e, "cannot queue Context Broker requests; dropped");
                counters.dropped.fetch_add(n, Ordering::Relaxed);
            } else {
                queued += n;
            }
        }
        counters.queued.store(queued, Ordering::Relaxed);
        let Ok(head) = store.ngsi_peek(gateway, 1).await else {
            tokio::time::sleep(backoff).await;
            continue;
        };
        let Some((id, text)) = head.into_iter().next() else {
            queued = 0;
            continue;
        };
        let Ok(req) = serde_json::from_str::<Request>(&text) else {
            let _ = store.ngsi_pop(id).await;
            queued = queued.saturating_sub(1);
            continue;
        };
        match send(&client, &req).await {
            Outcome::Taken => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
            }
            Outcome::Refused(code) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                warn!(status = code, path = %req.path, "the Context Broker refused a request; dropped");
            }
            Outcome::Failed(why) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                debug!(error = %why, wait = ?backoff, "Context Broker unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = token.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        if store.ngsi_pop(id).await.is_ok() {
            queued = queued.saturating_sub(1);
        }
        counters.queued.store(queued, Ordering::Relaxed);
        if token.is_cancelled() {
            return;
        }
    }
}

enum Outcome {
    Taken,
    Refused(u16),
    Failed(String),
}

async fn send(client: &reqwest::Client, r: &Request) -> Outcome {
    let url = format!("{}{}", r.cbroker, r.path);
    let sent = client
        .post(&url)
        .header("fiware-service", &r.service)
        .header("fiware-servicepath", &r.servicepath)
        .json(&r.body)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Outcome::Taken,
        Ok(resp) if resp.status().is_client_error() && !matches!(resp.status().as_u16(), 408 | 429) => {
            Outcome::Refused(resp.status().as_u16())
        }
        Ok(resp) => Outcome::Failed(format!("HTTP {}", resp.status())),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}
