//! The directory's task: hear every status on the exchange (local, and
//! remote through exchange federation) and keep the [`Directory`] current.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::gather::{Gather, Gathered, Query};
use super::{Change, Directory};
use crate::amqp::{self, Backoff, LinkError};
use crate::config::redact_url;

/// How often the task looks for sites that came back.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The least time between two broadcast pings of one directory.
const PING_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Where the feed connects and what it feeds.
#[derive(Debug, Clone)]
pub struct Feed {
    /// Broker URL.
    pub url: String,
    /// The headers exchange (`villas`).
    pub exchange: String,
    /// The directory it keeps.
    pub directory: Arc<Mutex<Directory>>,
    /// Counts statuses heard (and decoded), for `/metrics`.
    pub heard: prometheus_client::metrics::counter::Counter,
    /// Larger bodies are not read (the daemon's `max_body_bytes`): a
    /// controller's status is kept whole, so its size must be bounded.
    pub max_body: usize,
    /// Every status heard also goes to live viewers.
    pub events: crate::events::Hub,
    /// The snapshot of the whole view, refreshed on the tick while read.
    pub whole_view: Arc<Mutex<super::WholeView>>,
}

/// A distributed request handed to the feed.
#[derive(Debug)]
pub struct Ask {
    query: Query,
    deadline: Duration,
    reply: tokio::sync::oneshot::Sender<Gathered>,
}

/// Asks distributed requests of the feed (the HTTP API holds one).
#[derive(Debug, Clone)]
pub struct Asker {
    tx: tokio::sync::mpsc::Sender<Ask>,
    directory: Arc<Mutex<Directory>>,
}

impl Asker {
    /// An asker and the receiving end for [`feed`].
    pub fn new(directory: Arc<Mutex<Directory>>) -> (Asker, tokio::sync::mpsc::Receiver<Ask>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (Asker { tx, directory }, rx)
    }

    /// Ask every controller `query`; returns by `deadline` (plus a few
    /// milliseconds) whatever happens: while the broker is unreachable,
    /// with every expected site missing.
    pub async fn ask(&self, query: Query, deadline: Duration) -> Gathered {
        let deadline = deadline.min(super::gather::MAX_DEADLINE);
        let start = Instant::now();
        let (reply, rx) = tokio::sync::oneshot::channel();
        let asked = self.tx.try_send(Ask { query, deadline, reply }).is_ok();
        if asked && let Ok(Ok(done)) = tokio::time::timeout(deadline + Duration::from_millis(50), rx).await {
            return done;
        }
        let expected = self.directory.lock().unwrap_or_else(|p| p.into_inner()).expected_sites();
        Gathered {
            query,
            answers: Default::default(),
            missing: expected.into_values().collect(),
            elapsed: start.elapsed(),
        }
    }
}

/// Run the feed until `token` is cancelled; reconnects with backoff.
/// `asks`: distributed requests to carry ([`Asker`]).
pub async fn feed(feed: Feed, mut asks: tokio::sync::mpsc::Receiver<Ask>, token: CancellationToken) {
    let mut backoff = Backoff::new();
    loop {
        match session(&feed, &mut asks, &token, &mut backoff).await {
            Ok(()) => break,
            Err(e) => warn!(broker = %redact_url(&feed.url), error = %e, "directory feed lost the broker; retrying"),
        }
        if !backoff.wait(&token).await {
            break;
        }
    }
    debug!("directory feed stopped");
}

/// Headers of VILLASweb's broadcast: `uuid: ""`.
fn broadcast() -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("uuid".into(), AMQPValue::LongString(LongString::from("")));
    h
}

/// The headers of a distributed request: every controller.
fn controllers() -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("category".into(), AMQPValue::LongString(LongString::from("controller")));
    h
}

async fn session(
    feed: &Feed,
    asks: &mut tokio::sync::mpsc::Receiver<Ask>,
    token: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), LinkError> {
    let name = format!("busbar directory exchange={}", feed.exchange);
    let conn = tokio::select! {
        c = amqp::connect(&feed.url, &name) => c?,
        _ = token.cancelled() => return Ok(()),
    };
    let ch = conn.create_channel().await?;
    amqp::declare_exchange(&ch, &feed.exchange).await?;
    // Every status carries a uuid header; `uuid: void` under `x-match: all`
    // is RabbitMQ's "has the header" (actions addressed by uuid come too,
    // and are ignored by their body).
    let mut binding = FieldTable::default();
    binding.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
    binding.insert("uuid".into(), AMQPValue::Void);
    let queue = amqp::declare_bound_queue(&ch, &feed.exchange, binding).await?;
    let mut consumer = Some(Box::new(amqp::consume(&ch, queue).await?));
    backoff.reset();
    info!(exchange = %feed.exchange, "directory feed connected");
    let ping = async || {
        let props = crate::bus::status_properties(broadcast());
        let body = br#"{"action":"ping"}"#;
        ch.basic_publish(feed.exchange.as_str().into(), "".into(), BasicPublishOptions::default(), body, props).await
    };
    // Warm the directory: everyone announces themselves.
    ping().await?;
    let mut last_ping = Instant::now();
    let mut ping_due = false;
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut pending: Vec<(Gather, tokio::sync::oneshot::Sender<Gathered>)> = Vec::new();
    loop {
        let next_deadline = pending.iter().map(|(g, _)| g.deadline).min();
        tokio::select! {
            Some(ask) = asks.recv() => {
                let expected = feed.directory.lock().unwrap_or_else(|p| p.into_inner()).expected_sites();
                let g = Gather::new(ask.query, expected, ask.deadline, Instant::now());
                let props = crate::bus::status_properties(controllers()).with_correlation_id(g.correlation.as_str().into());
                let body = serde_json::to_vec(&ask.query.body()).unwrap_or_default();
                ch.basic_publish(feed.exchange.as_str().into(), "".into(), BasicPublishOptions::default(), &body, props).await?;
                debug!(query = ask.query.as_str(), correlation = %g.correlation, "distributed request");
                pending.push((g, ask.reply));
            }
            _ = async { tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)).await }, if next_deadline.is_some() => {
                let now = Instant::now();
                let (done, open): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(g, _)| g.deadline <= now);
                pending = open;
                for (g, reply) in done {
                    let _ = reply.send(g.finish(now));
                }
            }
            d = amqp::next_delivery(&mut consumer) => {
                let Some(d) = d else { return Err(LinkError::Lost("the directory's consumer ended".into())) };
                if d.data.len() > feed.max_body {
                    continue;
                }
                if let Some(id) = d.properties.correlation_id().as_ref().map(|c| c.as_str())
                    && pending.iter().any(|(g, _)| g.correlation == id)
                    && let Ok(body) = serde_json::from_slice::<serde_json::Value>(&d.data)
                {
                    let now = Instant::now();
                    for (g, _) in pending.iter_mut() {
                        g.offer(Some(id), &body);
                    }
                    let (done, open): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(g, _)| g.complete());
                    pending = open;
                    for (g, reply) in done {
                        let _ = reply.send(g.finish(now));
                    }
                }
                let change = {
                    let mut dir = feed.directory.lock().unwrap_or_else(|p| p.into_inner());
                    dir.observe(&d.data, Instant::now(), SystemTime::now())
                };
                if change != Change::Ignored {
                    feed.heard.inc();
                    if feed.events.watched()
                        && let Some(topic) = super::status_topic_of(&d.data)
                    {
                        feed.events.publish(topic, &d.data);
                    }
                }
            }
            _ = check.tick() => {
                let (back, generation) = {
                    let mut dir = feed.directory.lock().unwrap_or_else(|p| p.into_inner());
                    (dir.sites_back(Instant::now()), dir.generation())
                };
                // Rebuilt here, not by a reader: readers take the snapshot
                // under its own lock and never wait for the build.
                let now = Instant::now();
                if feed.whole_view.lock().unwrap_or_else(|p| p.into_inner()).due(now, generation) {
                    let snap = feed.directory.lock().unwrap_or_else(|p| p.into_inner()).whole_view(now);
                    feed.whole_view.lock().unwrap_or_else(|p| p.into_inner()).store(snap);
                }
                if !back.is_empty() {
                    info!(sites = back.len(), "sites came back; asking everyone to announce");
                    ping_due = true;
                }
                if ping_due && last_ping.elapsed() >= PING_AT_MOST_EVERY {
                    ping().await?;
                    last_ping = Instant::now();
                    ping_due = false;
                }
                if !conn.status().connected() {
                    return Err(LinkError::Lost("connection closed".into()));
                }
            }
            _ = token.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutdown".into())).await;
                return Ok(());
            }
        }
    }
}
