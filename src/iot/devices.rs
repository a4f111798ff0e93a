//! Devices as infrastructure components: every provisioned device appears
//! on the `villas` exchange as category `equipment`, type = its entity
//! type, uuid = a UUIDv5 of its tenant and id, managed by its gateway.
//!
//! One task per gateway speaks for all its devices (thousands of them cost
//! no task or queue each). It owns a queue on the `villas` exchange bound
//! to `category: equipment`, to each entity type and to each device's uuid, answers pings with
//! the device's last attribute values, announces devices when they are
//! provisioned, on discovery and periodically, and publishes `gone` once
//! when a device is deleted.

use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Consumer};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::Core;
use super::registry::{Change, Resolved};
use crate::daemon::Shared;
use crate::protocol::status::{Prefix, StatusView};
use crate::protocol::{ActionRequest, ErrorInfo, ReplyTo, RoutingKeys};
use crate::state::State;

/// A request to the device task.
#[derive(Debug)]
pub enum Announce {
    /// Publish every device's status.
    All,
    /// Publish `gone` for every device, then confirm and stop.
    Gone(oneshot::Sender<()>),
}

fn binding(key: &str, value: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-match".into(), AMQPValue::LongString(LongString::from("any")));
    t.insert(ShortString::from(key), AMQPValue::LongString(LongString::from(value)));
    t
}

struct Devices {
    shared: Arc<Shared>,
    core: Arc<Core>,
    /// Routing keys of every device announced, for `gone` and matching.
    known: HashMap<Uuid, RoutingKeys>,
    queue: Option<(Channel, ShortString)>,
    /// Entity types bound on the current queue.
    types: std::collections::HashSet<String>,
    empty: Map<String, Value>,
}

impl Devices {
    fn keys(&self, r: &Resolved) -> RoutingKeys {
        RoutingKeys {
            category: "equipment".into(),
            kind: r.record.device.entity_type(r.group.as_deref()).to_owned(),
            uuid: r.record.uuid,
            realm: Some(self.core.realm.clone()),
        }
    }

    fn state(&self) -> State {
        if *self.core.running.borrow() { State::Running } else { State::Idle }
    }

    async fn publish(&mut self, uuid: Uuid, reply: Option<&ReplyTo>, error: Option<&ErrorInfo>) {
        let Some(r) = self.core.registry.device_by_uuid(uuid) else { return };
        let keys = self.keys(&r);
        let d = &r.record.device;
        let group = r.group.as_deref();
        let mut properties = Map::new();
        for (k, v) in [
            ("category", json!("equipment")),
            ("type", json!(keys.kind)),
            ("name", json!(d.entity_name(group))),
            ("realm", json!(self.core.realm)),
            ("uuid", json!(uuid.to_string())),
            ("device_id", json!(d.device_id)),
            ("service", json!(r.record.tenant.service)),
            ("servicepath", json!(r.record.tenant.servicepath)),
            ("entity_name", json!(d.entity_name(group))),
            ("entity_type", json!(keys.kind)),
        ] {
            properties.insert(k.into(), v);
        }
        let attributes: Map<String, Value> = r
            .record
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, (kind, value, ms))| {
                let time = jiff::Timestamp::from_millisecond(*ms).map(|t| t.to_string()).unwrap_or_default();
                (name.clone(), json!({"type": kind, "value": value, "time": time}))
            })
            .collect();
        let mut extra = Map::new();
        extra.insert("attributes".into(), Value::Object(attributes));
        let view = StatusView {
            prefix: Prefix::None,
            state: if error.is_some() { State::Error } else { self.state() },
            managed_by: Some(self.core.gateway),
            error,
            extra: &extra,
            properties: &properties,
            schema: &self.empty,
        };
        let body = view.to_vec(&self.shared.info);
        self.shared.bus.publish_status(&keys, &body, reply).await;
        let kind = keys.kind.clone();
        if self.known.insert(uuid, keys).is_none() {
            self.bind("uuid", &uuid.to_string()).await;
        }
        if self.queue.is_some() && self.types.insert(kind.clone()) {
            self.bind("type", &kind).await;
        }
    }

    async fn gone(&mut self, uuid: Uuid) {
        let Some(keys) = self.known.remove(&uuid) else { return };
        let mut properties = Map::new();
        properties.insert("category".into(), json!("equipment"));
        properties.insert("type".into(), json!(keys.kind));
        properties.insert("realm".into(), json!(self.core.realm));
        properties.insert("uuid".into(), json!(uuid.to_string()));
        let view = StatusView {
            prefix: Prefix::None,
            state: State::Gone,
            managed_by: Some(self.core.gateway),
            error: None,
            extra: &self.empty,
            properties: &properties,
            schema: &self.empty,
        };
        let body = view.to_vec(&self.shared.info);
        self.shared.bus.publish_status(&keys, &body, None).await;
        if let Some((ch, q)) = &self.queue {
            let exchange = self.shared.bus.exchange();
            let _ = ch.queue_unbind(q.clone(), exchange.into(), "".into(), binding("uuid", &uuid.to_string())).await;
        }
    }

    async fn bind(&self, key: &str, value: &str) {
        if let Some((ch, q)) = &self.queue {
            let exchange = self.shared.bus.exchange();
            let b = binding(key, value);
            if let Err(e) = ch.queue_bind(q.clone(), exchange.into(), "".into(), QueueBindOptions::default(), b).await {
                warn!(error = %e, %key, "cannot bind a device queue");
            }
        }
    }

    async fn announce_all(&mut self) {
        for r in self.core.registry.devices() {
            self.publish(r.uuid, None, None).await;
        }
    }

    /// Declare the device queue on a new channel and bind every device.
    async fn attach(&mut self, ch: Channel) -> Option<Consumer> {
        let exchange = self.shared.bus.exchange().to_owned();
        let q = crate::bus::declare_bound_queue(&ch, &exchange, binding("category", "equipment")).await.ok()?;
        self.queue = Some((ch.clone(), q.clone()));
        self.types.clear();
        for uuid in self.core.registry.devices().iter().map(|r| r.uuid) {
            self.bind("uuid", &uuid.to_string()).await;
        }
        let types: Vec<String> = self.known.values().map(|k| k.kind.clone()).collect();
        for t in types {
            if self.types.insert(t.clone()) {
                self.bind("type", &t).await;
            }
        }
        crate::bus::consume(&ch, q).await.ok()
    }

    async fn delivery(&mut self, d: lapin::message::Delivery) {
        let Some(msg) = crate::bus::decode_delivery(&self.shared, &d) else { return };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let addressed: Vec<Uuid> = self.known.iter().filter(|(_, k)| k.matches(&headers)).map(|(u, _)| *u).collect();
        let req: ActionRequest = match msg {
            Ok(r) => r,
            Err(rejection) => {
                debug!(error = %rejection, "rejected message for devices");
                return;
            }
        };
        let reply = Some(&req.reply).filter(|r| r.wanted());
        for uuid in addressed {
            if req.action == "ping" {
                self.publish(uuid, reply, None).await;
            } else {
                let e = ErrorInfo::new(format!("Unsupported action {} for equipment", req.action))
                    .with("action", req.action.as_str());
                self.publish(uuid, reply, Some(&e)).await;
            }
        }
    }
}

/// Run the device components of a gateway until `token` is cancelled.
pub async fn run(
    shared: Arc<Shared>,
    core: Arc<Core>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    mut announce: mpsc::UnboundedReceiver<Announce>,
    token: CancellationToken,
) {
    let mut channel = shared.bus.channel_watch();
    let period = shared.config.status_interval();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut devices =
        Devices { shared, core, known: HashMap::new(), queue: None, types: Default::default(), empty: Map::new() };
    let mut consumer: Option<Consumer> = None;
    let mut attach = true;
    loop {
        if attach {
            attach = false;
            let current = channel.borrow_and_update().clone();
            consumer = match current {
                Some(ch) => devices.attach(ch).await,
                None => None,
            };
            devices.announce_all().await;
        }
        tokio::select! {
            changed = channel.changed() => {
                if changed.is_err() {
                    break;
                }
                attach = true;
            }
            Some(d) = crate::bus::next_delivery(&mut consumer) => devices.delivery(d).await,
            Some(c) = changes.recv() => match c {
                Change::Upsert(uuid) => devices.publish(uuid, None, None).await,
                Change::Removed(uuid) => devices.gone(uuid).await,
            },
            Some(a) = announce.recv() => match a {
                Announce::All => devices.announce_all().await,
                Announce::Gone(done) => {
                    let all: Vec<Uuid> = devices.known.keys().copied().collect();
                    for uuid in all {
                        devices.gone(uuid).await;
                    }
                    let _ = done.send(());
                    break;
                }
            },
            _ = tick.tick() => devices.announce_all().await,
            _ = token.cancelled() => break,
        }
    }
}
