//! Devices as infrastructure components: every provisioned device appears
//! on the `villas` exchange as category `equipment`, type = its entity
//! type, uuid = a UUIDv5 of its tenant and id, managed by its gateway.
//!
//! One task per gateway speaks for all its devices (thousands of them cost
//! no task or queue each). It owns a queue on the `villas` exchange bound
//! to `category: equipment`, to each entity type and to each device's uuid, answers pings with
//! the device's last attribute values, announces devices when they are
//! provisioned, on discovery and after a reconnect (not periodically: the
//! gateway's own status is periodic, and thousands of devices would make the
//! exchange busy for nothing), and publishes `gone` once
//! when a device is deleted.

use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Consumer};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::Core;
use super::registry::{Change, Resolved};
use crate::component::Env;
use crate::protocol::status::{Prefix, StatusView};
use crate::protocol::{ActionRequest, ErrorInfo, Filter, ReplyTo, RoutingKeys};
use crate::state::State;

/// Messages the device queue holds at most (the broker drops the oldest).
const QUEUE_CAP: i64 = 1000;
/// Bindings made per short-lived channel.
const BIND_CHUNK: usize = 256;
/// Unacknowledged deliveries in flight to the device task.
const PREFETCH: u16 = 64;

/// A request to the device task.
#[derive(Debug)]
pub enum Announce {
    /// Publish every device's status.
    All,
    /// Publish `gone` for every device, then confirm and stop.
    Gone(oneshot::Sender<()>),
}

fn by_uuid(uuid: Uuid) -> Filter {
    Filter { uuid: Some(uuid.to_string()), ..Default::default() }
}

fn by_type(kind: String) -> Filter {
    Filter { kind: Some(kind), ..Default::default() }
}

/// The routing keys of device `r` of gateway `core`.
fn keys(core: &Core, r: &Resolved) -> RoutingKeys {
    RoutingKeys {
        category: "equipment".into(),
        kind: r.record.device.entity_type(r.group.as_deref()).to_owned(),
        uuid: r.record.uuid,
        realm: Some(core.realm.clone()),
    }
}

/// What a device's status envelope says: an `equipment` component managed
/// by its gateway, running while the gateway takes measures, with its last
/// attribute values. One builder for the bus and the HTTP API.
pub(super) struct Described {
    keys: RoutingKeys,
    properties: Map<String, Value>,
    extra: Map<String, Value>,
    /// `{"command": <schema>}` when the device declares commands.
    schema: Map<String, Value>,
}

pub(super) fn describe(core: &Core, r: &Resolved) -> Described {
    let keys = keys(core, r);
    let d = &r.record.device;
    let group = r.group.as_deref();
    let mut properties = Map::new();
    for (k, v) in [
        ("category", json!("equipment")),
        ("type", json!(keys.kind)),
        ("name", json!(d.entity_name(group))),
        ("realm", json!(core.realm)),
        ("uuid", json!(r.record.uuid.to_string())),
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
    let declared = super::commands::declared(d, group);
    let mut schema = Map::new();
    if !declared.is_empty() {
        schema.insert("command".into(), super::commands::action_schema(&declared));
        let names: Vec<&str> = declared.iter().filter_map(|c| c["name"].as_str()).collect();
        let last = core.commands.last_by_name(r.record.uuid, &names);
        extra.insert("commands".into(), Value::Object(last));
    }
    Described { keys, properties, extra, schema }
}

impl Described {
    /// The envelope; `error` (an unsupported action) shows as state `error`.
    pub(super) fn view<'a>(&'a self, core: &Core, error: Option<&'a ErrorInfo>) -> StatusView<'a> {
        let running = *core.running.borrow();
        StatusView {
            prefix: Prefix::None,
            state: match (error, running) {
                (Some(_), _) => State::Error,
                (None, true) => State::Running,
                (None, false) => State::Idle,
            },
            managed_by: Some(core.gateway),
            error,
            since: None,
            extra: &self.extra,
            properties: &self.properties,
            schema: &self.schema,
        }
    }
}

/// An action for device `uuid` of this gateway from the HTTP API: `ping`
/// answers its status, `command` takes a command and answers the status
/// with `command` (`PENDING`; the end shows in the device's `commands` and
/// on the bus). `None`: no such device here; `Err`: why the action was
/// refused.
pub async fn act(
    core: &Arc<Core>,
    uuid: Uuid,
    req: &ActionRequest,
    info: &crate::protocol::DaemonInfo,
) -> Option<Result<Value, String>> {
    let r = core.registry.device_by_uuid(uuid)?;
    if req.action.is(crate::state::Action::Ping) {
        return Some(Ok(describe(core, &r).view(core, None).render(info)));
    }
    if req.action.as_str() != "command" {
        return Some(Err(format!("Unsupported action {} for equipment", req.action)));
    }
    let origin = super::commands::Origin { from: "http".into(), ..Default::default() };
    Some(match super::commands::submit_action(core, uuid, &req.parameters, origin).await {
        Ok(cmd) => {
            let mut d = describe(core, &r);
            d.extra.insert("command".into(), cmd.view());
            Ok(d.view(core, None).render(info))
        }
        Err(e) => Err(e.to_string()),
    })
}

struct Devices {
    env: Arc<Env>,
    core: Arc<Core>,
    queue: Option<(Channel, ShortString)>,
    /// A channel in confirm mode for device statuses: each waits for the
    /// broker's confirm before the next goes out. A headers exchange
    /// matches every message against every binding, so with thousands of
    /// devices (a binding each) one status costs the broker milliseconds;
    /// one at a time, other publishers' messages interleave with them
    /// instead of queueing behind thousands.
    statuses: Option<Channel>,
    /// Entity types bound on the current queue.
    types: std::collections::HashSet<String>,
    empty: Map<String, Value>,
}

impl Devices {
    fn keys(&self, r: &Resolved) -> RoutingKeys {
        keys(&self.core, r)
    }

    async fn publish(&self, r: &Resolved, reply: Option<&ReplyTo>, error: Option<&ErrorInfo>) {
        let d = describe(&self.core, r);
        let body = d.view(&self.core, error).to_vec(&self.env.info);
        self.send(d.keys.device_status_headers(), &body, reply).await;
    }

    /// The device's status with `command` (where that command is), to
    /// `reply`; a command that failed or expired also shows as the status's
    /// error.
    async fn publish_command(&self, r: &Resolved, cmd: &super::commands::Command, reply: Option<&ReplyTo>) {
        let mut d = describe(&self.core, r);
        d.extra.insert("command".into(), cmd.view());
        let error = match cmd.state {
            super::commands::CmdState::Error | super::commands::CmdState::Expired => Some(
                ErrorInfo::new(format!(
                    "command {} {}: {}",
                    cmd.name,
                    if cmd.state == super::commands::CmdState::Expired { "expired" } else { "failed" },
                    cmd.info.as_ref().map(|i| i.to_string()).unwrap_or_default()
                ))
                .with("command", cmd.id.to_string()),
            ),
            _ => None,
        };
        let body = d.view(&self.core, error.as_ref()).to_vec(&self.env.info);
        self.send(d.keys.device_status_headers(), &body, reply).await;
    }

    /// A `command` action (`{"name", "value", "expiration"?}`) for one
    /// device, addressed by its uuid: taken into the ledger, answered with
    /// the command (`PENDING`), and again when it finishes
    /// ([`Devices::finished`]).
    async fn command(&self, targets: &[Resolved], req: &ActionRequest, reply: Option<&ReplyTo>) {
        let [r] = targets else {
            for r in targets {
                let e = ErrorInfo::new("A command goes to one device, addressed by its uuid").with("action", "command");
                self.publish(r, reply, Some(&e)).await;
            }
            return;
        };
        let origin = super::commands::Origin {
            from: "villas".into(),
            reply_queue: reply.and_then(|r| r.queue.clone()),
            correlation_id: reply.and_then(|r| r.correlation_id.clone()),
        };
        match super::commands::submit_action(&self.core, r.record.uuid, &req.parameters, origin).await {
            Ok(cmd) => self.publish_command(r, &cmd, reply).await,
            Err(e) => {
                let e = ErrorInfo::new(e.to_string()).with("action", "command");
                self.publish(r, reply, Some(&e)).await;
            }
        }
    }

    /// A command finished: its device's status goes to whoever asked on
    /// the VILLAS side, and to everyone watching.
    async fn finished(&self, cmd: &super::commands::Command) {
        let Some(r) = self.core.registry.device_by_uuid(cmd.device) else { return };
        let reply =
            ReplyTo { queue: cmd.origin.reply_queue.clone(), correlation_id: cmd.origin.correlation_id.clone() };
        let reply = Some(&reply).filter(|r| r.wanted());
        self.publish_command(&r, cmd, reply).await;
    }

    /// Publish a device status on the confirm channel (see `statuses`),
    /// waiting for its confirm; through the bus if there is none.
    async fn send(&self, headers: FieldTable, body: &[u8], reply: Option<&ReplyTo>) {
        let Some(ch) = &self.statuses else {
            self.env.bus.publish_status_with(headers, body, reply).await;
            return;
        };
        let exchange = self.env.bus.exchange();
        let mut props = crate::bus::status_properties(headers);
        if let Some(id) = reply.and_then(|r| r.correlation_id.as_deref()) {
            props = props.with_correlation_id(id.into());
        }
        let opts = lapin::options::BasicPublishOptions::default();
        // The requester first (it waits on this answer), then everyone.
        if let Some(queue) = reply.and_then(|r| r.queue.as_deref()) {
            let _ = ch.basic_publish("".into(), queue.into(), opts, body, props.clone()).await;
        }
        if let Ok(confirm) = ch.basic_publish(exchange.into(), "".into(), opts, body, props).await {
            let _ = confirm.await;
        }
    }

    /// Devices were provisioned or changed: route them (one batch of
    /// bindings for all), then announce them, paced.
    async fn upsert(&mut self, changed: &[(Uuid, bool)]) {
        let mut bindings = Vec::new();
        let mut announce = Vec::with_capacity(changed.len());
        for &(uuid, new) in changed {
            let Some(r) = self.core.registry.device_by_uuid(uuid) else { continue };
            if new {
                bindings.push(by_uuid(uuid));
            }
            let kind = self.keys(&r).kind;
            if self.types.insert(kind.clone()) {
                bindings.push(by_type(kind));
            }
            announce.push(r);
        }
        self.bind_all(&bindings).await;
        for r in &announce {
            self.publish(r, None, None).await;
        }
    }

    async fn gone(&mut self, uuid: Uuid, kind: String) {
        let keys = RoutingKeys { category: "equipment".into(), kind, uuid, realm: Some(self.core.realm.clone()) };
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
            since: None,
            extra: &self.empty,
            properties: &properties,
            schema: &self.empty,
        };
        let body = view.to_vec(&self.env.info);
        self.send(keys.device_status_headers(), &body, None).await;
        if let Some((ch, q)) = &self.queue {
            let exchange = self.binding_exchange();
            let _ = ch.queue_unbind(q.clone(), exchange.as_str().into(), "".into(), by_uuid(uuid).binding()).await;
        }
    }

    /// Bind the device queue to each filter (`x-match: any`), on channels of
    /// its own that are closed afterwards (lapin keeps a record of every
    /// binding of an open channel; thousands of devices would cost megabytes).
    async fn bind_all(&self, bindings: &[Filter]) {
        let Some((_, q)) = &self.queue else { return };
        let exchange = self.binding_exchange();
        let exchange = exchange.as_str();
        // Without waiting for each bind-ok (a failure closes the channel and
        // the next bind reports it), a few hundred per channel.
        let opts = QueueBindOptions { nowait: true };
        for chunk in bindings.chunks(BIND_CHUNK) {
            let Some(ch) = self.env.bus.open_channel().await else { return };
            for f in chunk {
                if let Err(e) = ch.queue_bind(q.clone(), exchange.into(), "".into(), opts, f.binding()).await {
                    warn!(error = %e, "cannot bind a device queue");
                    return;
                }
                // With an exchange of their own, what is addressed by type
                // (or category) on the daemon's exchange is passed on to it.
                if let Some(own) = &self.core.settings.device_exchange
                    && f.uuid.is_none()
                {
                    let source = self.env.bus.exchange();
                    let e2e = ch.exchange_bind(
                        own.as_str().into(),
                        source.into(),
                        "".into(),
                        Default::default(),
                        f.binding(),
                    );
                    if let Err(e) = e2e.await {
                        warn!(error = %e, "cannot bind the device exchange");
                        return;
                    }
                }
            }
            let _ = ch.close(200, "bindings done".into()).await;
        }
        if bindings.len() > BIND_CHUNK {
            super::trim_heap();
        }
    }

    /// Publish every device's status, one confirmed publish at a time
    /// (see `statuses`), so that thousands of devices never hold the broker
    /// while other components' pings wait.
    async fn announce_all(&self) {
        let all = self.core.registry.resolved();
        for r in &all {
            self.publish(r, None, None).await;
        }
        if all.len() > 100 {
            super::trim_heap();
        }
    }

    /// Declare the device queue on a channel of its own and bind every
    /// device. The queue also receives every equipment status on the
    /// exchange (the protocol's `x-match: any` does that), ours included:
    /// it is capped at [`QUEUE_CAP`] messages (oldest dropped by the broker)
    /// and consumed with a prefetch of [`PREFETCH`], so a burst of
    /// announcements never piles up in memory here.
    /// The exchange the device queue binds on.
    fn binding_exchange(&self) -> String {
        self.core.settings.device_exchange.clone().unwrap_or_else(|| self.env.bus.exchange().to_owned())
    }

    async fn attach(&mut self) -> Option<Consumer> {
        let ch = self.env.bus.open_channel().await?;
        let exchange = self.binding_exchange();
        if self.core.settings.device_exchange.is_some() {
            crate::amqp::declare_exchange(&ch, &exchange).await.ok()?;
        }
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(QUEUE_CAP));
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = ch.queue_declare("".into(), opts, args).await.ok()?.name().clone();
        let b = Filter { category: Some("equipment".into()), ..Default::default() }.binding();
        ch.queue_bind(q.clone(), exchange.as_str().into(), "".into(), QueueBindOptions::default(), b.clone())
            .await
            .ok()?;
        if self.core.settings.device_exchange.is_some() {
            let source = self.env.bus.exchange();
            ch.exchange_bind(exchange.as_str().into(), source.into(), "".into(), Default::default(), b).await.ok()?;
        }
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await.ok()?;
        self.queue = Some((ch.clone(), q.clone()));
        self.statuses = match self.env.bus.open_channel().await {
            Some(c) => c.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.ok().map(|_| c),
            None => None,
        };
        self.types.clear();
        let mut bindings = Vec::new();
        for r in self.core.registry.resolved() {
            bindings.push(by_uuid(r.record.uuid));
            let kind = self.keys(&r).kind;
            if self.types.insert(kind.clone()) {
                bindings.push(by_type(kind));
            }
        }
        self.bind_all(&bindings).await;
        ch.basic_consume(q, "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.ok()
    }

    async fn delivery(&mut self, d: lapin::message::Delivery) {
        let _ = d.ack(BasicAckOptions::default()).await;
        let Some(msg) = self.env.bus.decoder().decode(&d) else { return };
        let req: ActionRequest = match msg {
            Ok(r) => r,
            Err(rejection) => {
                debug!(error = %rejection, "rejected message for devices");
                return;
            }
        };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let reply = Some(&req.reply).filter(|r| r.wanted());
        let is_command = req.action.as_str() == "command";
        let unsupported = (!req.action.is(crate::state::Action::Ping) && !is_command).then(|| {
            ErrorInfo::new(format!("Unsupported action {} for equipment", req.action))
                .with("action", req.action.as_str())
        });
        // A message addressed by uuid alone (the usual ping) is looked up
        // directly; others (by type, by category) are matched against all.
        let only_uuid = headers.inner().len() == 1
            && matches!(
                crate::protocol::headers::header_str(&headers, "uuid"),
                Some(crate::protocol::headers::HeaderValue::Str(_))
            );
        let targets: Vec<Resolved> = match crate::protocol::headers::header_str(&headers, "uuid") {
            Some(crate::protocol::headers::HeaderValue::Str(u)) if only_uuid => {
                Uuid::parse_str(&u).ok().and_then(|u| self.core.registry.device_by_uuid(u)).into_iter().collect()
            }
            _ => self.core.registry.resolved().into_iter().filter(|r| self.keys(r).matches(&headers)).collect(),
        };
        if is_command {
            return self.command(&targets, &req, reply).await;
        }
        for r in &targets {
            self.publish(r, reply, unsupported.as_ref()).await;
        }
    }
}

/// Run the device components of a gateway until `token` is cancelled.
pub async fn run(
    env: Arc<Env>,
    core: Arc<Core>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    mut announce: mpsc::UnboundedReceiver<Announce>,
    token: CancellationToken,
) {
    let mut channel = env.bus.channel_watch();
    let mut commands = core.commands.subscribe();
    let mut devices = Devices { env, core, queue: None, statuses: None, types: Default::default(), empty: Map::new() };
    let mut consumer: Option<Box<Consumer>> = None;
    let mut attach = true;
    loop {
        if attach {
            attach = false;
            let connected = channel.borrow_and_update().is_some();
            if let Some(old) = devices.statuses.take() {
                let _ = old.close(200, "reattaching".into()).await;
            }
            if let Some((old, _)) = devices.queue.take() {
                let _ = old.close(200, "reattaching".into()).await;
            }
            consumer = None;
            if connected {
                tokio::select! {
                    c = devices.attach() => consumer = c.map(Box::new),
                    _ = token.cancelled() => break,
                }
            }
            tokio::select! {
                _ = devices.announce_all() => {}
                _ = token.cancelled() => break,
            }
        }
        tokio::select! {
            changed = channel.changed() => {
                if changed.is_err() {
                    break;
                }
                attach = true;
            }
            Some(d) = crate::amqp::next_delivery(&mut consumer) => devices.delivery(d).await,
            c = commands.recv() => match c {
                Ok(c) if c.state.terminal() => devices.finished(&c).await,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "the device task fell behind the command ledger; some command answers are not sent");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
            },
            Some(c) = changes.recv() => {
                // Take what else is already waiting (a bulk provisioning),
                // so that its bindings go out in batches, in order.
                let mut upserts = Vec::new();
                let mut next = Some(c);
                while let Some(c) = next.take() {
                    match c {
                        Change::Upsert { uuid, new } => upserts.push((uuid, new)),
                        Change::Removed { uuid, kind } => {
                            devices.upsert(&std::mem::take(&mut upserts)).await;
                            devices.gone(uuid, kind).await;
                        }
                    }
                    if upserts.len() < 10_000 {
                        next = changes.try_recv().ok();
                    }
                }
                devices.upsert(&upserts).await;
            }
            Some(a) = announce.recv() => match a {
                Announce::All => tokio::select! {
                    _ = devices.announce_all() => {}
                    _ = token.cancelled() => break,
                },
                Announce::Gone(done) => {
                    for r in devices.core.registry.resolved() {
                        let kind = devices.keys(&r).kind;
                        devices.gone(r.record.uuid, kind).await;
                    }
                    let _ = done.send(());
                    break;
                }
            },
            _ = token.cancelled() => break,
        }
    }
}
