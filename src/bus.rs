//! The AMQP side: one connection, kept alive by a supervisor task that
//! reconnects with backoff, redeclares the topology and re-subscribes every
//! component, whose state lives elsewhere and is never lost.
//!
//! Topology (reference §4.1):
//! - the durable headers exchange (`villas` by default);
//! - per component a server-named, exclusive, auto-delete queue bound with
//!   `x-match: any` on its headers ([`Topology::PerComponent`]), or one such
//!   queue per daemon carrying all the bindings ([`Topology::Shared`]);
//! - a discovery queue bound `{x-match: all, uuid: ""}`, which receives
//!   VILLASweb's broadcast ping and nothing else: status messages always
//!   carry a real uuid, so the daemon never sees the bus's status traffic.

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::amqp::{self, Backoff, LinkError, consume, declare_bound_queue, declare_exchange, declare_private_queue};
use crate::component::ComponentHandle;
use crate::component::Registry;
use crate::config::{Topology, redact_url};
use crate::metrics::Fault;
use crate::metrics::Metrics;
use crate::protocol::{self, ActionRequest, Rejection, ReplyTo, RoutingKeys};
use crate::state::Action;

enum BusCmd {
    Subscribe(ComponentHandle),
    Unsubscribe(RoutingKeys),
    OpenChannel(tokio::sync::oneshot::Sender<Channel>),
}

/// The daemon's handle on the bus: subscribe components and publish.
#[derive(Debug, Clone)]
pub struct Bus {
    cmd: mpsc::UnboundedSender<BusCmd>,
    channel: watch::Receiver<Option<Channel>>,
    exchange: ShortString,
    published: prometheus_client::metrics::counter::Counter,
    /// Set once every component's queue is bound after a (re)connect.
    ready: Arc<std::sync::atomic::AtomicBool>,
    decoder: Decoder,
}

impl std::fmt::Debug for BusCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusCmd::Subscribe(h) => write!(f, "Subscribe({})", h.uuid()),
            BusCmd::Unsubscribe(k) => write!(f, "Unsubscribe({})", k.uuid),
            BusCmd::OpenChannel(_) => f.write_str("OpenChannel"),
        }
    }
}

/// AMQP properties of every status message (reference §0 #5).
pub fn status_properties(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(protocol::CONTENT_TYPE.into())
        .with_content_encoding(protocol::CONTENT_ENCODING.into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(headers)
}

impl Bus {
    /// A bus handle plus the supervisor that will serve it once started
    /// with `BusRunner::spawn`.
    /// Deliveries are decoded with `max_body_bytes` and counted in
    /// `metrics`, as is every message handed to the broker.
    pub fn new(exchange: &str, max_body_bytes: usize, metrics: &Arc<Metrics>) -> (Bus, BusRunner) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ch_tx, ch_rx) = watch::channel(None);
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let decoder = Decoder { max_body_bytes, metrics: metrics.clone() };
        let published = metrics.messages_out.clone();
        let bus = Bus {
            cmd: cmd_tx,
            channel: ch_rx,
            exchange: exchange.into(),
            published,
            ready: ready.clone(),
            decoder: decoder.clone(),
        };
        (bus, BusRunner { cmd_rx, ch_tx, ready, decoder })
    }

    /// The decoder of this daemon's deliveries (for tasks that consume
    /// queues of their own: the IoT gateway's device components).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Whether a broker connection is up and every component is routed.
    pub fn connected(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
            && self.channel.borrow().as_ref().is_some_and(|c| c.status().connected())
    }

    /// The current channel (`None` while disconnected), as a watch that
    /// changes on every (re)connect: for tasks that keep their own queues
    /// on the exchange (the IoT gateway's device components).
    pub fn channel_watch(&self) -> watch::Receiver<Option<Channel>> {
        self.channel.clone()
    }

    /// The exchange name.
    pub fn exchange(&self) -> &str {
        self.exchange.as_str()
    }

    /// A new channel on the current connection (`None` while disconnected).
    /// lapin remembers every binding made on a channel until the channel
    /// closes; a task that binds many headers (one per device) does so on a
    /// channel of its own and closes it.
    pub async fn open_channel(&self) -> Option<Channel> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmd.send(BusCmd::OpenChannel(tx)).ok()?;
        rx.await.ok()
    }

    /// Route a component's queue (on connect, and now if connected).
    pub(crate) fn subscribe(&self, handle: ComponentHandle) {
        let _ = self.cmd.send(BusCmd::Subscribe(handle));
    }

    /// Remove a component's queue or bindings.
    pub(crate) fn unsubscribe(&self, keys: RoutingKeys) {
        let _ = self.cmd.send(BusCmd::Unsubscribe(keys));
    }

    /// Publish a status message for `keys`; if `reply` asks for it, also
    /// send it to `reply_to`, and carry the `correlation_id`. Returns whether
    /// the broker took it (false while disconnected: status is republished
    /// on reconnect, so nothing is queued).
    pub async fn publish_status(&self, keys: &RoutingKeys, body: &[u8], reply: Option<&ReplyTo>) -> bool {
        self.publish_status_with(keys.status_headers(), body, reply).await
    }

    /// [`Bus::publish_status`] with the routing headers given.
    pub async fn publish_status_with(&self, headers: FieldTable, body: &[u8], reply: Option<&ReplyTo>) -> bool {
        let Some(ch) = self.channel.borrow().clone() else {
            debug!("not connected; status not published");
            return false;
        };
        let mut props = status_properties(headers);
        if let Some(id) = reply.and_then(|r| r.correlation_id.as_deref()) {
            props = props.with_correlation_id(id.into());
        }
        let mut ok = ch
            .basic_publish(self.exchange.clone(), "".into(), BasicPublishOptions::default(), body, props.clone())
            .await
            .is_ok();
        self.published.inc();
        if let Some(queue) = reply.and_then(|r| r.queue.as_deref()) {
            ok &= ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await.is_ok();
            self.published.inc();
        }
        ok
    }
}

impl Bus {
    /// Send a status only to the `reply_to` queue of a request (no
    /// broadcast on the exchange).
    pub async fn reply(&self, keys: &RoutingKeys, body: &[u8], reply: &ReplyTo) -> bool {
        let (Some(ch), Some(queue)) = (self.channel.borrow().clone(), reply.queue.as_deref()) else {
            return false;
        };
        let mut props = status_properties(keys.status_headers());
        if let Some(id) = reply.correlation_id.as_deref() {
            props = props.with_correlation_id(id.into());
        }
        self.published.inc();
        ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await.is_ok()
    }
}

/// The category, type and realm bindings of the per-component topology's
/// routed queue: one binding per distinct value, counted, so that it is
/// removed with the last component that needs it.
#[derive(Debug, Default)]
struct SharedKeys(HashMap<(&'static str, String), usize>);

impl SharedKeys {
    fn pairs(keys: &RoutingKeys) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("category", Some(keys.category.as_str())),
            ("type", Some(keys.kind.as_str())),
            ("realm", keys.realm.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }

    fn binding(key: &str, value: &str) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
        t.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        t
    }

    /// Count a component in; the bindings that are new.
    fn add(&mut self, keys: &RoutingKeys) -> Vec<FieldTable> {
        let mut new = Vec::new();
        for (k, v) in Self::pairs(keys) {
            let n = self.0.entry((k, v.to_owned())).or_default();
            *n += 1;
            if *n == 1 {
                new.push(Self::binding(k, v));
            }
        }
        new
    }

    /// Count a component out; the bindings no component needs any more.
    fn remove(&mut self, keys: &RoutingKeys) -> Vec<FieldTable> {
        let mut gone = Vec::new();
        for (k, v) in Self::pairs(keys) {
            let key = (k, v.to_owned());
            if let Some(n) = self.0.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.0.remove(&key);
                    gone.push(Self::binding(k, v));
                }
            }
        }
        gone
    }
}

/// Most component subscriptions pipelined in one go.
const SUBSCRIBE_BATCH: usize = 256;

/// The not-yet-started supervisor of a [`Bus`].
#[derive(Debug)]
pub struct BusRunner {
    cmd_rx: mpsc::UnboundedReceiver<BusCmd>,
    ch_tx: watch::Sender<Option<Channel>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    decoder: Decoder,
}

/// What the bus needs from the daemon, and nothing more: where to connect,
/// how to lay out its queues, whom messages reach, what to count, and the
/// daemon's lifetime.
#[derive(Debug)]
pub(crate) struct Wiring {
    /// The broker URL.
    pub url: String,
    /// The headers exchange.
    pub exchange: String,
    /// The queue layout.
    pub topology: Topology,
    /// The running components (whom a message reaches).
    pub components: Arc<Registry>,
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled once, on shutdown.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Every long-lived task, so shutdown waits for the forwarders too.
    pub tracker: tokio_util::task::TaskTracker,
}

impl BusRunner {
    /// Start the supervisor task; it ends on shutdown.
    pub(crate) fn spawn(self, wiring: Wiring) {
        let wiring = Arc::new(wiring);
        wiring.tracker.clone().spawn(supervise(wiring, self.decoder, self.cmd_rx, self.ch_tx, self.ready));
    }
}

async fn supervise(
    w: Arc<Wiring>,
    decoder: Decoder,
    mut cmd_rx: mpsc::UnboundedReceiver<BusCmd>,
    ch_tx: watch::Sender<Option<Channel>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut backoff = Backoff::new();
    let token = w.shutdown.clone();
    let url = w.url.clone();
    loop {
        let outcome = session(&w, &decoder, &mut cmd_rx, &ch_tx, &ready, &token).await;
        ready.store(false, std::sync::atomic::Ordering::Release);
        ch_tx.send_replace(None);
        if token.is_cancelled() {
            break;
        }
        match outcome {
            Ok(()) => backoff.reset(),
            Err(e) => warn!(broker = %redact_url(&url), error = %e, "broker connection failed; retrying"),
        }
        if !backoff.wait(&token).await {
            break;
        }
    }
    debug!("bus supervisor stopped");
}

/// Where a forwarder's deliveries go. (In the per-component topology a
/// component task consumes its own queue for messages naming its uuid.)
#[derive(Clone)]
enum Target {
    /// Every local component whose keys match (shared topology).
    Matching,
    /// Every local component whose keys match, except the one the message
    /// names by uuid: that one has it on its own queue (per-component).
    MatchingElsewhere,
    /// The discovery queue: a ping is forwarded to every component.
    Discovery,
}

/// One connection's lifetime. Returns `Ok` only if the connection ended
/// without error (it never does on its own); every failure is an `Err`.
async fn session(
    w: &Arc<Wiring>,
    decoder: &Decoder,
    cmd_rx: &mut mpsc::UnboundedReceiver<BusCmd>,
    ch_tx: &watch::Sender<Option<Channel>>,
    ready: &std::sync::atomic::AtomicBool,
    token: &tokio_util::sync::CancellationToken,
) -> Result<(), LinkError> {
    let name = format!("busbar daemon exchange={}", w.exchange);
    let url = w.url.as_str();
    let conn = tokio::select! {
        c = amqp::connect(url, &name) => c?,
        _ = token.cancelled() => return Ok(()),
    };
    let mut events = conn.events_listener();
    let sub = conn.create_channel().await?;
    let publ = conn.create_channel().await?;
    let exchange = w.exchange.clone();
    let topology = w.topology;
    declare_exchange(&sub, &exchange).await?;

    // Messages addressed by category, type or realm reach this daemon once
    // on its routed queue, whatever the number of components they match
    // (the forwarder hands them on): one binding per distinct category,
    // type and realm in use. Under `x-match: any` a queue bound by all four
    // keys per component would also receive every status of every component
    // of its category: quadratic in components.
    //
    // Messages naming a uuid:
    // - per component, each component's own queue is bound by its uuid and
    //   consumed by its task (the lowest latency); VILLASweb's broadcast
    //   `uuid: ""` has a discovery queue of its own;
    // - shared, one binding `uuid: void` ("has a uuid header", RabbitMQ's
    //   rule for void binding values) brings every one of them to the routed
    //   queue, and the daemon looks the uuid up. RabbitMQ matches headers
    //   bindings one by one for every message, so per-uuid bindings would
    //   make every message of the lab cost O(components) in the broker.
    let routed = declare_private_queue(&sub, FieldTable::default()).await?;
    let target = match topology {
        Topology::Shared => {
            let mut any_uuid = FieldTable::default();
            any_uuid.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
            any_uuid.insert("uuid".into(), AMQPValue::Void);
            sub.queue_bind(routed.clone(), exchange.as_str().into(), "".into(), QueueBindOptions::default(), any_uuid)
                .await?;
            Target::Matching
        }
        Topology::PerComponent => {
            let mut discovery = FieldTable::default();
            discovery.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
            discovery.insert("uuid".into(), AMQPValue::LongString(LongString::from("")));
            let dq = declare_bound_queue(&sub, &exchange, discovery).await?;
            spawn_forwarder(w, decoder, consume(&sub, dq).await?, Target::Discovery);
            Target::MatchingElsewhere
        }
    };
    spawn_forwarder(w, decoder, consume(&sub, routed.clone()).await?, target);
    let mut queues: HashMap<Uuid, ShortString> = HashMap::new();
    let mut shared_keys = SharedKeys::default();
    // Subscribe a batch of components at once: their declares, binds and
    // consumes are pipelined on the channel (one round trip for the batch,
    // not three per component), so creates at 100/s keep up.
    let subscribe = async |batch: Vec<ComponentHandle>,
                           queues: &mut HashMap<Uuid, ShortString>,
                           shared_keys: &mut SharedKeys|
           -> Result<(), LinkError> {
        let x = || exchange.as_str().into();
        let new_keys: Vec<FieldTable> = batch.iter().flat_map(|h| shared_keys.add(&h.keys)).collect();
        let bind_keys = futures_util::future::join_all(
            new_keys
                .into_iter()
                .map(|b| sub.queue_bind(routed.clone(), x(), "".into(), QueueBindOptions::default(), b)),
        );
        let bind_components = futures_util::future::join_all(batch.iter().map(|h| async {
            match topology {
                Topology::Shared => Ok::<_, lapin::Error>(None),
                Topology::PerComponent => {
                    let q = declare_bound_queue(&sub, &exchange, h.keys.uuid_binding()).await?;
                    let consumer = consume(&sub, q.clone()).await?;
                    Ok(Some((q, consumer)))
                }
            }
        }));
        let (bound, routed_components) = futures_util::future::join(bind_keys, bind_components).await;
        bound.into_iter().collect::<Result<Vec<()>, _>>()?;
        for (h, r) in batch.into_iter().zip(routed_components) {
            if let Some((q, consumer)) = r? {
                h.attach(Inbox(consumer, decoder.clone())).await;
                queues.insert(h.uuid(), q);
            }
            h.announce().await;
        }
        Ok(())
    };

    // Publishing works from here on, so the announcements below go out.
    ch_tx.send_replace(Some(publ));
    // Commands queued while disconnected concern components that the
    // registry snapshot below already covers; drop them.
    while cmd_rx.try_recv().is_ok() {}
    let all = w.components.handles();
    for chunk in all.chunks(SUBSCRIBE_BATCH) {
        subscribe(chunk.to_vec(), &mut queues, &mut shared_keys).await?;
    }
    ready.store(true, std::sync::atomic::Ordering::Release);
    w.metrics.connects.inc();
    info!(broker = %redact_url(url), %exchange, components = queues.len().max(w.components.len()), "connected to broker");

    let mut check = tokio::time::interval(Duration::from_secs(1));
    // A command taken while batching subscriptions, to run next.
    let mut stash: Option<BusCmd> = None;
    loop {
        let stashed = stash.take();
        tokio::select! {
            // Biased, commands first: a stashed command is ready at once
            // and must not be dropped with the branch's future.
            biased;
            cmd = async { match stashed { Some(c) => Some(c), None => cmd_rx.recv().await } } => match cmd {
                None => return Ok(()),
                Some(BusCmd::Subscribe(h)) => {
                    // Take every subscription already waiting (up to a
                    // batch); a different command ends the batch and runs
                    // right after it, so the order of commands is kept.
                    let mut batch = vec![h];
                    while batch.len() < SUBSCRIBE_BATCH {
                        match cmd_rx.try_recv() {
                            Ok(BusCmd::Subscribe(h)) => batch.push(h),
                            Ok(other) => {
                                stash = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    debug!(components = batch.len(), "subscribing");
                    subscribe(batch, &mut queues, &mut shared_keys).await?
                }
                Some(BusCmd::OpenChannel(tx)) => {
                    let _ = tx.send(conn.create_channel().await?);
                }
                Some(BusCmd::Unsubscribe(keys)) => {
                    if let Some(q) = queues.remove(&keys.uuid) {
                        sub.queue_delete(q, QueueDeleteOptions::default()).await?;
                    }
                    for b in shared_keys.remove(&keys) {
                        sub.queue_unbind(routed.clone(), exchange.as_str().into(), "".into(), b).await?;
                    }
                }
            },
            ev = events.next() => match ev {
                Some(lapin::Event::Error(e)) => return Err(LinkError::Lost(e.to_string())),
                Some(_) => {}
                None => return Err(LinkError::Lost("event stream ended".into())),
            },
            _ = check.tick() => if !conn.status().connected() {
                return Err(LinkError::Lost("connection closed".into()));
            },
            _ = token.cancelled() => {
                // Closing ends every consumer stream, and so every forwarder.
                ch_tx.send_replace(None);
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutdown".into())).await;
                return Ok(());
            }
        }
    }
}

fn spawn_forwarder(w: &Arc<Wiring>, decoder: &Decoder, consumer: lapin::Consumer, target: Target) {
    w.tracker.spawn(forward(w.clone(), decoder.clone(), consumer, target));
}

/// A component's own queue (per-component topology) as the component sees
/// it: decoded requests and typed rejections. The lapin consumer and the
/// decoding stay here, so components never name lapin.
pub struct Inbox(lapin::Consumer, Decoder);

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
    }
}

/// What an [`Inbox`] yields.
pub enum Incoming {
    /// An action request, or why the message was refused (already counted
    /// and logged). Boxed, as the component keeps it.
    Message(Box<Result<ActionRequest, Rejection>>),
    /// Decoding panicked (a bug): the message is dropped; the component
    /// reports it.
    Panicked(String),
}

impl Inbox {
    /// The next message for the component. Pending forever without an
    /// inbox; when the queue ends (deleted, connection lost) the inbox is
    /// dropped, and the bus attaches a new one after reconnecting.
    /// Cancel-safe: the component selects over it.
    pub async fn next(inbox: &mut Option<Box<Inbox>>) -> Incoming {
        loop {
            let Some(Inbox(consumer, decoder)) = inbox.as_deref_mut() else {
                return std::future::pending().await;
            };
            let Some(Ok(d)) = consumer.next().await else {
                *inbox = None;
                continue;
            };
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoder.decode(&d)));
            match decoded {
                Ok(Some(msg)) => return Incoming::Message(Box::new(msg)),
                Ok(None) => continue,
                Err(p) => return Incoming::Panicked(crate::supervise::panic_message(p)),
            }
        }
    }
}

/// Decodes deliveries as the daemon accepts them: its body limit, its
/// counters. Cheap to clone; the bus gives one to each inbox and keeps one
/// for its forwarders, and the device task asks the bus for one.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_body_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Decoder {
    /// Count and decode one delivery. `None` for messages controllers
    /// ignore (other components' status); a rejection is counted and
    /// logged here.
    pub(crate) fn decode(&self, d: &lapin::message::Delivery) -> Option<Result<ActionRequest, Rejection>> {
        self.metrics.messages_in.inc();
        let props = &d.properties;
        let reply = ReplyTo {
            queue: props.reply_to().as_ref().map(|q| q.to_string()),
            correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
        };
        let ct = props.content_type().as_ref().map(|c| c.as_str());
        match protocol::decode(ct, &d.data, self.max_body_bytes, reply, SystemTime::now()) {
            Ok(None) => None,
            Ok(Some(req)) => Some(Ok(req)),
            Err(rej) => {
                self.metrics.error((&rej).into());
                warn!(error = %rej, kind = rej.kind(), "rejected message");
                Some(Err(rej))
            }
        }
    }
}

/// Decode each delivery and hand it to its component(s). A bad message is
/// counted and reported; it never ends the loop. The loop ends with the
/// consumer (queue deleted or connection lost).
async fn forward(w: Arc<Wiring>, decoder: Decoder, mut consumer: lapin::Consumer, target: Target) {
    let token = w.shutdown.clone();
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d {
                Some(d) => d,
                None => break,
            },
            _ = token.cancelled() => break,
        };
        let Ok(d) = delivery else { break };
        // One bad message must not end the loop that feeds every component
        // of the queue (or the discovery answers): a panic costs only it.
        if let Err(panic) = crate::supervise::catch(dispatch(&w, &decoder, &d, &target)).await {
            w.metrics.error(Fault::Panic);
            tracing::error!(%panic, "dispatching a message panicked; the message is dropped");
        }
    }
}

/// Decode one delivery and hand it to its component(s).
async fn dispatch(w: &Wiring, decoder: &Decoder, d: &lapin::message::Delivery, target: &Target) {
    let Some(msg) = decoder.decode(d) else { return };
    match target {
        // Shared topology: VILLASweb's broadcast `uuid: ""` arrives here.
        Target::Matching if is_broadcast(d) => discover(w, msg).await,
        Target::Matching | Target::MatchingElsewhere => {
            let empty = FieldTable::default();
            let headers = d.properties.headers().as_ref().unwrap_or(&empty);
            let to = crate::protocol::Addressed::of(headers);
            let skip = if matches!(target, Target::MatchingElsewhere) { to.uuid } else { None };
            for h in w.components.addressed(&to).into_iter().filter(|h| Some(h.uuid()) != skip) {
                h.deliver(msg.clone()).await;
            }
        }
        Target::Discovery => discover(w, msg).await,
    }
}

/// Whether a delivery is VILLASweb's broadcast (`uuid: ""`).
fn is_broadcast(d: &lapin::message::Delivery) -> bool {
    let uuid = d.properties.headers().as_ref().and_then(|h| h.inner().get(&ShortString::from("uuid")));
    matches!(uuid, Some(AMQPValue::LongString(s)) if s.as_bytes().is_empty())
        || matches!(uuid, Some(AMQPValue::ShortString(s)) if s.as_str().is_empty())
}

/// A broadcast: a ping makes every component announce itself.
async fn discover(w: &Wiring, msg: Result<ActionRequest, Rejection>) {
    match msg {
        Ok(req) if req.action.is(Action::Ping) => {
            debug!("broadcast ping");
            for h in w.components.handles() {
                h.announce().await;
            }
        }
        Ok(req) => {
            w.metrics.error(Fault::BroadcastAction);
            warn!(action = %req.action, "ignoring a non-ping action addressed to no component (uuid \"\")");
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(category: &str, kind: &str, realm: Option<&str>) -> RoutingKeys {
        RoutingKeys { category: category.into(), kind: kind.into(), uuid: Uuid::new_v4(), realm: realm.map(Into::into) }
    }

    #[test]
    fn shared_keys_bind_each_distinct_value_once_and_unbind_with_the_last_user() {
        let mut k = SharedKeys::default();
        let (a, b, c) = (
            keys("simulator", "dummy", Some("lab")),
            keys("simulator", "generic", Some("lab")),
            keys("manager", "generic", None),
        );
        assert_eq!(k.add(&a).len(), 3, "category, type and realm are new");
        assert_eq!(k.add(&b).len(), 1, "only type generic is new");
        assert_eq!(k.add(&c).len(), 1, "only category manager is new; type generic is bound, no realm");
        assert_eq!(k.remove(&a).len(), 1, "type dummy goes; simulator and lab stay for b");
        assert_eq!(k.remove(&b).len(), 2, "simulator and lab go; generic stays for c");
        let last = k.remove(&c);
        assert_eq!(last.len(), 2);
        assert!(k.0.is_empty());
        assert!(k.remove(&c).is_empty(), "removing twice unbinds nothing");
    }
}
