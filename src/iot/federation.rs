//! Into the federation: every accepted measure is published to a durable
//! topic exchange (`villas.data` by default) with publisher confirms.
//!
//! One task owns the connection. While connected it keeps a window of
//! unconfirmed publishes and takes new measures only as confirms come back,
//! so a slow broker back-pressures the sources. While disconnected it keeps
//! taking measures into a bounded buffer (oldest dropped and counted when
//! full) and sends them in order once the broker is back; unconfirmed
//! publishes of a lost connection are sent again (at least once).

use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Counters;
use crate::amqp::{self, Backoff, LinkError};

/// Publishes in flight before the oldest confirm is awaited.
const WINDOW: usize = 1024;
/// Most publishes handed to lapin at once.
pub const BATCH: usize = 256;

/// Longest AMQP routing key (a short string).
pub const MAX_ROUTING_KEY: usize = 255;

/// One message for the federation.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `{realm}.{service}.{entity_type}.{device_id}`; checked to fit on
    /// construction (lapin panics on a longer one, deep in its I/O path).
    routing_key: lapin::types::ShortString,
    /// The `device-data` JSON.
    pub body: Vec<u8>,
}

impl Envelope {
    /// An envelope, if `routing_key` fits in an AMQP short string.
    pub fn new(routing_key: &str, body: Vec<u8>) -> Result<Envelope, super::IngestError> {
        let routing_key = lapin::types::ShortString::try_new(routing_key)
            .map_err(|_| super::IngestError::RoutingKeyTooLong(routing_key.len()))?;
        Ok(Envelope { routing_key, body })
    }

    /// The routing key.
    pub fn routing_key(&self) -> &lapin::types::ShortString {
        &self.routing_key
    }
}

/// Where to publish.
#[derive(Debug, Clone)]
pub struct Target {
    /// Broker URL.
    pub url: String,
    /// The topic exchange.
    pub exchange: String,
    /// Measures kept while the broker is unreachable.
    pub buffer: usize,
    /// The connection name the broker shows (`busbar federation gateway=…`).
    pub name: String,
}

type Events = futures_util::stream::BoxStream<'static, lapin::Event>;

async fn connect(t: &Target) -> Result<(Connection, Channel, Events), LinkError> {
    let conn = amqp::connect(&t.url, &t.name).await?;
    // A lost connection is noticed even while idle, not only by the next publish.
    let lost = futures_util::StreamExt::boxed(conn.events_listener());
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    amqp::declare_topic_exchange(&ch, &t.exchange).await?;
    Ok((conn, ch, lost))
}

struct Buffer {
    queue: VecDeque<Envelope>,
    cap: usize,
    counters: Arc<Counters>,
}

impl Buffer {
    /// Keep `e`, dropping (and counting) the oldest when full.
    fn push(&mut self, e: Envelope) {
        if self.queue.len() >= self.cap {
            self.queue.pop_front();
            self.counters.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.queue.push_back(e);
        self.sync();
    }

    fn sync(&self) {
        self.counters.buffered.store(self.queue.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Run the publisher until `token` is cancelled or every sender is gone.
pub async fn run(target: Target, mut rx: mpsc::Receiver<Envelope>, counters: Arc<Counters>, token: CancellationToken) {
    let mut buf = Buffer { queue: VecDeque::new(), cap: target.buffer.max(1), counters: counters.clone() };
    let mut backoff = Backoff::new();
    loop {
        match tokio::select! { r = connect(&target) => Some(r), _ = token.cancelled() => None } {
            None => break,
            Some(Ok((conn, ch, mut lost))) => {
                info!(exchange = %target.exchange, "federation publisher connected");
                counters.federation_up.store(true, std::sync::atomic::Ordering::Relaxed);
                backoff.reset();
                let pumped = pump(&target, &ch, &mut lost, &mut buf, &mut rx, &counters, &token);
                // A bug on one batch must not end the publisher: it
                // reconnects as after a lost connection.
                let outcome = crate::supervise::catch(pumped).await.unwrap_or_else(|panic| {
                    counters.error("panic");
                    Err(LinkError::Panicked(panic))
                });
                counters.federation_up.store(false, std::sync::atomic::Ordering::Relaxed);
                let _ = conn.close(200, "bye".into()).await;
                match outcome {
                    Ok(()) => break,
                    Err(e) => warn!(error = %e, buffered = buf.queue.len(), "federation publisher lost the broker"),
                }
            }
            Some(Err(e)) => warn!(error = %e, "federation publisher cannot connect"),
        }
        // Disconnected: keep taking measures into the bounded buffer.
        let wake = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                e = rx.recv() => match e {
                    Some(e) => buf.push(e),
                    None => break,
                },
                _ = token.cancelled() => break,
            }
        }
        if token.is_cancelled() {
            break;
        }
    }
    if !buf.queue.is_empty() {
        warn!(lost = buf.queue.len(), "federation publisher stopped with measures still buffered");
        counters.dropped.fetch_add(buf.queue.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Publish while connected. `Ok` on shutdown, `Err` when the connection
/// fails (every unconfirmed measure is back in `buf`, in order).
async fn pump(
    target: &Target,
    ch: &Channel,
    lost: &mut Events,
    buf: &mut Buffer,
    rx: &mut mpsc::Receiver<Envelope>,
    counters: &Counters,
    token: &CancellationToken,
) -> Result<(), LinkError> {
    let props = BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
    let exchange: lapin::types::ShortString = target.exchange.as_str().into();
    let mut inflight: VecDeque<(Envelope, lapin::PublisherConfirm)> = VecDeque::new();
    // Put what is in flight back in front of the buffer, in order, after
    // `first` (the oldest, whose confirm just failed).
    let requeue = |buf: &mut Buffer, inflight: &mut VecDeque<(Envelope, _)>, first: Option<Envelope>| {
        while let Some((e, _)) = inflight.pop_back() {
            buf.queue.push_front(e);
        }
        if let Some(e) = first {
            buf.queue.push_front(e);
        }
        buf.sync();
    };
    loop {
        // Fill the window with what is ready now, a batch at a time. A
        // nearly full window waits for a batch's worth of confirms first,
        // rather than refilling one message per confirm.
        loop {
            let room = WINDOW - inflight.len();
            if room < BATCH && !inflight.is_empty() {
                break;
            }
            let room = room.min(BATCH);
            let mut batch = Vec::with_capacity(room.min(buf.queue.len() + rx.len()));
            while batch.len() < room {
                match buf.queue.pop_front().or_else(|| rx.try_recv().ok()) {
                    Some(e) => batch.push(e),
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let messages = batch.iter().map(|e| (&e.routing_key, e.body.as_slice()));
            let sent = amqp::publish_batch(ch, &exchange, &props, messages).await;
            let mut batch = batch.into_iter();
            for (sent, e) in sent.into_iter().zip(batch.by_ref()) {
                match sent {
                    Ok(confirm) => inflight.push_back((e, confirm)),
                    Err(err) => {
                        // `e` and the rest of the batch are newer than
                        // everything in flight: they go after it, in order.
                        for e in std::iter::once(e).chain(batch).collect::<Vec<_>>().into_iter().rev() {
                            buf.queue.push_front(e);
                        }
                        requeue(buf, &mut inflight, None);
                        return Err(err.into());
                    }
                }
            }
        }
        buf.sync();
        // Room for another batch while the oldest confirm is awaited (below).
        let room = WINDOW - inflight.len() >= BATCH && !rx.is_closed();
        let Some((_, confirm)) = inflight.front_mut() else {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => buf.queue.push_back(e),
                    None => return Ok(()),
                },
                _ = token.cancelled() => return Ok(()),
                ev = futures_util::StreamExt::next(lost) => match ev {
                    Some(lapin::Event::Error(e)) => return Err(e.into()),
                    Some(_) => {}
                    None => return Err(LinkError::Lost("event stream ended".into())),
                },
            }
            continue;
        };
        // Wait for the oldest confirm; meanwhile take new measures while the
        // window has room for a batch, so a slow confirm (a durable queue's
        // fsync, say) does not hold back what arrives after it.
        let confirmed = tokio::select! {
            c = confirm => c,
            e = rx.recv(), if room => {
                if let Some(e) = e {
                    buf.queue.push_back(e);
                }
                continue;
            }
        };
        let (e, _) = inflight.pop_front().expect("the oldest publish was just confirmed");
        match confirmed {
            Ok(c) if c.is_ack() => {
                counters.measures_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {
                // Refused by the broker: try again before anything newer.
                counters.error("federation_nack");
                requeue(buf, &mut inflight, Some(e));
            }
            Err(err) => {
                requeue(buf, &mut inflight, Some(e));
                return Err(err.into());
            }
        }
    }
}
