//! Commands to devices and the ledger that keeps them.
//!
//! A command (set an inverter's power, switch a load) comes from the
//! Context Broker (`POST /v2/op/update` with `actionType: update`), from the
//! VILLAS side (an `equipment` IC's `command` action, `busbar command`), or
//! from the HTTP API. It is given an id and **stored before it is
//! acknowledged**; from then on every change goes through one table,
//! [`next`], and is stored before anyone hears of it:
//!
//! ```text
//! PENDING ──delivered──▶ DELIVERED ──result──▶ OK | ERROR
//!    │                       │
//!    └──────expire───────────┴──────────────▶ EXPIRED
//! ```
//!
//! A finished command never changes again: a second result for it (the
//! device repeating itself, or answering after expiry) is recognised by
//! device and name and ignored, and counted. Expiry fires from the
//! ledger's own clock, also for commands loaded after a restart.
//!
//! How a command reaches its device is the transport's business
//! ([`Via`]): MQTT push (`/{apikey}/{id}/cmd`, results on
//! `/json/{apikey}/{id}/cmdexe`; the MQTT client lives in `south.rs`), HTTP
//! push to the device's `endpoint` (here, [`push_http`]), or HTTP poll (the
//! device asks `GET /iot/json?…&getCmd=1`, `south.rs`). The ledger records
//! what each transport reports, and tells the Context Broker (`<cmd>_status`
//! and `<cmd>_info`, as iotagent-json does) and whoever waits (the VILLAS
//! reply, `busbar command --wait`).

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Core;
use super::model::{Device, Group, Tenant};
use super::registry::Resolved;
use crate::store::{Store, StoreError};

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CmdState {
    /// Stored, not yet known to have reached the device.
    Pending,
    /// The device has it (it polled it; HTTP push is answered at once).
    Delivered,
    /// The device reported a result.
    Ok,
    /// The transport or the device reported a failure.
    Error,
    /// No result before its expiry.
    Expired,
}

impl CmdState {
    /// Every state.
    pub const ALL: [CmdState; 5] =
        [CmdState::Pending, CmdState::Delivered, CmdState::Ok, CmdState::Error, CmdState::Expired];

    /// Whether the command is finished (it never changes again).
    pub fn terminal(self) -> bool {
        matches!(self, CmdState::Ok | CmdState::Error | CmdState::Expired)
    }

    /// The name on the wire (`PENDING`).
    pub fn as_str(self) -> &'static str {
        match self {
            CmdState::Pending => "PENDING",
            CmdState::Delivered => "DELIVERED",
            CmdState::Ok => "OK",
            CmdState::Error => "ERROR",
            CmdState::Expired => "EXPIRED",
        }
    }
}

/// What can happen to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum CmdEvent {
    /// The device has it.
    Delivered,
    /// The device's result (`ok`), or a failure (`!ok`), with its info.
    Result {
        /// Whether it succeeded.
        ok: bool,
        /// The result, or why it failed.
        info: Value,
    },
    /// Its expiry passed.
    Expire,
}

/// The command table: the state after `event`, or `None` when the event
/// does not apply (a finished command, a second `Delivered`), which the
/// ledger ignores and counts as a duplicate.
pub fn next(state: CmdState, event: &CmdEvent) -> Option<CmdState> {
    use CmdState::*;
    match (state, event) {
        (Pending, CmdEvent::Delivered) => Some(Delivered),
        (Pending | Delivered, CmdEvent::Result { ok: true, .. }) => Some(Ok),
        (Pending | Delivered, CmdEvent::Result { ok: false, .. }) => Some(Error),
        (Pending | Delivered, CmdEvent::Expire) => Some(Expired),
        (Delivered, CmdEvent::Delivered) | (Ok | Error | Expired, _) => None,
    }
}

/// How a command reaches its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Published on `/{apikey}/{device_id}/cmd`.
    Mqtt,
    /// POSTed to the device's `endpoint`.
    HttpPush,
    /// Waits for the device's `GET …&getCmd=1`.
    HttpPoll,
    /// Published on the gateway's AMQP south exchange, routing key
    /// `.{apikey}.{device_id}.cmd`.
    Amqp,
    /// dojot's actuation: published on `{tenant}:{device}/config` and
    /// `/{tenant}/{device}/config`; the device's next measure of that
    /// attribute is its result.
    Dojot,
}

/// Who asked, so the answer finds its way back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// `cb`, `villas` or `http`.
    pub from: String,
    /// A VILLAS reply queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_queue: Option<String>,
    /// A VILLAS correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// One command, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Its id.
    pub id: Uuid,
    /// The device's IC uuid.
    pub device: Uuid,
    /// The device id.
    pub device_id: String,
    /// The device's apikey (its own, else its group's).
    pub apikey: String,
    /// Its tenant.
    pub service: String,
    /// Its tenant's servicepath.
    pub servicepath: String,
    /// The command's name.
    pub name: String,
    /// Its value.
    pub value: Value,
    /// Where it is.
    pub state: CmdState,
    /// The result or the reason of a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
    /// The transport.
    pub via: Via,
    /// Who asked.
    pub origin: Origin,
    /// Milliseconds since the epoch: created, last changed, expiry.
    pub created_ms: i64,
    /// Last change.
    pub updated_ms: i64,
    /// When it expires if unfinished.
    pub expires_ms: i64,
    /// When the MQTT broker acknowledged the publish (it holds the command
    /// for the device's session from then on); `None`: not yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_ms: Option<i64>,
    /// Every state it was in, with the time it entered it.
    pub history: Vec<(CmdState, i64)>,
    /// Whether its payload carries `cmd_id` (the device or group asked for
    /// it with `command_ids: true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub with_id: bool,
}

/// The key of the command id in payloads and results (`command_ids`).
pub const CMD_ID: &str = "cmd_id";

impl Command {
    /// What the device gets: `{"<name>": value}` as iotagent-json sends it,
    /// plus `"cmd_id": "<id>"` when the device asked for ids: MQTT at QoS 1
    /// may deliver a command twice across a broker restart or a reconnect
    /// (busbar's measurements: BENCHMARKS.md, commands), and only an id
    /// lets the device recognise the repeat.
    pub fn payload(&self) -> Value {
        let mut m = Map::new();
        m.insert(self.name.clone(), self.value.clone());
        if self.with_id {
            m.insert(CMD_ID.into(), self.id.to_string().into());
        }
        Value::Object(m)
    }

    /// Whether the device can have it: the broker took it (MQTT, AMQP,
    /// dojot), the device polled it, or it is pushed (the answer is its
    /// result).
    pub fn may_have_arrived(&self) -> bool {
        match self.via {
            Via::Mqtt | Via::Dojot | Via::Amqp => self.broker_ms.is_some(),
            Via::HttpPoll => self.state == CmdState::Delivered,
            Via::HttpPush => true,
        }
    }

    /// The command as the north API and statuses show it.
    pub fn view(&self) -> Value {
        let at = |ms: i64| jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default();
        let mut v = json!({
            "id": self.id, "device_id": self.device_id, "device": self.device, "name": self.name,
            "value": self.value, "state": self.state.as_str(), "info": self.info, "via": self.via,
            "from": self.origin.from, "created": at(self.created_ms), "updated": at(self.updated_ms),
            "expires": at(self.expires_ms),
            "history": self.history.iter().map(|(s, ms)| json!({"state": s.as_str(), "time": at(*ms)})).collect::<Vec<_>>(),
        });
        if let Some(ms) = self.broker_ms {
            // When the MQTT broker took it (and holds it for the device).
            v["broker"] = at(ms).into();
        }
        v
    }
}

/// Why a command was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The device declares no command by that name.
    #[error("{device} has no command {name:?} (it has: {known})")]
    Unknown {
        /// The device id.
        device: String,
        /// The name asked for.
        name: String,
        /// The commands it has.
        known: String,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The transport is not available for this device.
    #[error("{0}")]
    Transport(String),
    /// The command could not be stored, so it was not taken.
    #[error("the command could not be stored: {0}")]
    Store(String),
}

/// The commands a device declares: its own, then its group's that it does
/// not redefine (`commands: [{name, type, expiration?}]`).
pub fn declared(device: &Device, group: Option<&Group>) -> Vec<Map<String, Value>> {
    let list = |extra: &Map<String, Value>| -> Vec<Map<String, Value>> {
        extra
            .get("commands")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|c| c.as_object().filter(|o| o["name"].is_string()).cloned()).collect())
            .unwrap_or_default()
    };
    let mut out = list(&device.extra);
    for c in group.map(|g| list(&g.extra)).unwrap_or_default() {
        if !out.iter().any(|o| o["name"] == c["name"]) {
            out.push(c);
        }
    }
    out
}

/// The transport of a device's commands: `transport` (`MQTT`, `HTTP`) of
/// the device or its group; `HTTP` with an `endpoint` pushes, without one
/// the device polls; no transport: HTTP push when there is an endpoint,
/// else MQTT (iotagent-json's default).
pub fn via_of(device: &Device, group: Option<&Group>) -> Result<Via, CommandError> {
    let field = |k: &str| {
        device
            .extra
            .get(k)
            .and_then(Value::as_str)
            .or_else(|| group.and_then(|g| g.extra.get(k).and_then(Value::as_str)))
            .filter(|s| !s.is_empty())
    };
    let endpoint = field("endpoint").is_some();
    match field("transport").map(str::to_ascii_uppercase).as_deref() {
        Some("HTTP") if endpoint => Ok(Via::HttpPush),
        Some("HTTP") => Ok(Via::HttpPoll),
        Some("MQTT") => Ok(Via::Mqtt),
        Some("AMQP") => Ok(Via::Amqp),
        Some("DOJOT") => Ok(Via::Dojot),
        None if endpoint => Ok(Via::HttpPush),
        None => Ok(Via::Mqtt),
        Some(other) => Err(CommandError::Transport(format!(
            "commands over {other} are not supported (MQTT, AMQP, HTTP push with an endpoint, HTTP poll without one)"
        ))),
    }
}

/// The device's `endpoint` (device, then group).
pub fn endpoint_of(device: &Device, group: Option<&Group>) -> Option<String> {
    device
        .extra
        .get("endpoint")
        .and_then(Value::as_str)
        .or_else(|| group.and_then(|g| g.extra.get("endpoint").and_then(Value::as_str)))
        .map(str::to_owned)
}

/// The apikey a device presents: its own, else its group's.
pub fn apikey_of(r: &Resolved) -> String {
    r.record.device.apikey.clone().or_else(|| r.group.as_ref().map(|g| g.apikey.clone())).unwrap_or_default()
}

/// The JSON Schema of a device's `command` action, from its declared
/// commands (advertised in its IC status).
pub fn action_schema(declared: &[Map<String, Value>]) -> Value {
    let names: Vec<&Value> = declared.iter().map(|c| &c["name"]).collect();
    json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": names},
            "value": {},
            "expiration": {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
        },
        "additionalProperties": false,
    })
}

/// The ledger's counters (gateway status `commands`).
#[derive(Debug, Default)]
pub struct CmdCounters {
    /// Commands taken.
    pub accepted: AtomicU64,
    /// Handed to a transport (published, POSTed, polled), counting repeats.
    pub sent: AtomicU64,
    /// Finished OK.
    pub ok: AtomicU64,
    /// Finished in error.
    pub error: AtomicU64,
    /// Expired.
    pub expired: AtomicU64,
    /// Results or deliveries for finished or unknown commands, ignored.
    pub duplicates: AtomicU64,
}

impl CmdCounters {
    /// As status JSON.
    pub fn snapshot(&self, open: usize) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({"open": open, "accepted": g(&self.accepted), "sent": g(&self.sent), "ok": g(&self.ok),
            "error": g(&self.error), "expired": g(&self.expired), "duplicates": g(&self.duplicates)})
    }
}

/// Finished commands kept per gateway for `GET /iot/commands` (the oldest
/// go first, from memory and the store).
pub const KEEP_FINISHED: usize = 1000;

/// Largest command value, in bytes of JSON: each command is stored with
/// every change, so with [`MAX_OPEN`] commands this bounds the ledger.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Finished commands forgotten at once beyond [`KEEP_FINISHED`].
pub const PRUNE_BATCH: usize = 64;

/// Most unfinished commands per gateway: beyond it new ones are refused
/// (a device that never answers cannot grow the ledger without bound).
pub const MAX_OPEN: usize = 100_000;

/// The commands of one gateway: in memory, each change written to the
/// store first.
pub struct Ledger {
    gateway: Uuid,
    store: Store,
    /// Serialises changes so that the store and memory agree on order.
    write: tokio::sync::Mutex<()>,
    all: std::sync::Mutex<IndexMap<Uuid, Command>>,
    /// The newest command of each device and name (what a device's status
    /// shows), so a status does not walk the ledger.
    latest: std::sync::Mutex<std::collections::HashMap<Uuid, std::collections::HashMap<String, Uuid>>>,
    changes: broadcast::Sender<Arc<Command>>,
    /// Wakes the expiry clock when an earlier expiry arrives.
    pub(super) wake: tokio::sync::Notify,
    /// Counters.
    pub counters: CmdCounters,
    /// Most unfinished commands ([`MAX_OPEN`]).
    max_open: usize,
    /// How many finished commands the ledger holds.
    finished: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("gateway", &self.gateway).finish_non_exhaustive()
    }
}

impl Ledger {
    /// The ledger of `gateway`, loaded from the store.
    pub fn load(gateway: Uuid, store: Store) -> Result<Ledger, StoreError> {
        let mut all = IndexMap::new();
        for text in store.commands_load(gateway)? {
            match serde_json::from_str::<Command>(&text) {
                Ok(c) => {
                    all.insert(c.id, c);
                }
                Err(e) => tracing::warn!(error = %e, "an unreadable command in the store; skipped"),
            }
        }
        all.sort_by(|_, a, _, b| a.created_ms.cmp(&b.created_ms));
        let ledger = Ledger::empty(gateway, store);
        ledger.finished.store(all.values().filter(|c| c.state.terminal()).count(), Ordering::Relaxed);
        for c in all.values() {
            ledger.note_latest(c);
        }
        *ledger.map() = all;
        Ok(ledger)
    }

    /// An empty ledger (the store could not be read).
    pub fn empty(gateway: Uuid, store: Store) -> Ledger {
        Ledger {
            gateway,
            store,
            write: tokio::sync::Mutex::new(()),
            all: std::sync::Mutex::new(IndexMap::new()),
            latest: Default::default(),
            changes: broadcast::channel(1024).0,
            wake: tokio::sync::Notify::new(),
            counters: CmdCounters::default(),
            max_open: MAX_OPEN,
            finished: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, IndexMap<Uuid, Command>> {
        self.all.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn latest(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, std::collections::HashMap<String, Uuid>>> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `c` is the newest command of its device and name.
    fn note_latest(&self, c: &Command) {
        self.latest().entry(c.device).or_default().insert(c.name.clone(), c.id);
    }

    /// Every change, as it is stored.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Command>> {
        self.changes.subscribe()
    }

    /// One command.
    pub fn get(&self, id: Uuid) -> Option<Command> {
        self.map().get(&id).cloned()
    }

    /// Commands of `device` (all of the gateway's when `None`), oldest first.
    pub fn list(&self, device: Option<Uuid>) -> Vec<Command> {
        self.map().values().filter(|c| device.is_none_or(|d| c.device == d)).cloned().collect()
    }

    /// Unfinished commands.
    pub fn open(&self) -> Vec<Command> {
        self.map().values().filter(|c| !c.state.terminal()).cloned().collect()
    }

    /// How many are unfinished: all but the finished, which are counted as
    /// they finish.
    pub fn open_count(&self) -> usize {
        self.map().len().saturating_sub(self.finished.load(Ordering::Relaxed))
    }

    /// The last command of each of `names` of `device`, for its IC status.
    pub fn last_by_name(&self, device: Uuid, names: &[&str]) -> Map<String, Value> {
        let ids: Vec<(String, Uuid)> = match self.latest().get(&device) {
            Some(by_name) => names.iter().filter_map(|n| Some(((*n).to_owned(), *by_name.get(*n)?))).collect(),
            None => return Map::new(),
        };
        let map = self.map();
        ids.into_iter()
            .filter_map(|(name, id)| {
                let c = map.get(&id)?;
                Some((name, json!({"id": c.id, "state": c.state.as_str(), "info": c.info})))
            })
            .collect()
    }

    /// The earliest expiry of an unfinished command.
    pub fn next_expiry(&self) -> Option<i64> {
        self.map().values().filter(|c| !c.state.terminal()).map(|c| c.expires_ms).min()
    }

    /// Store a new command (refused if it cannot be stored), then tell.
    pub async fn insert(&self, cmd: Command) -> Result<Arc<Command>, CommandError> {
        let _w = self.write.lock().await;
        if self.open_count() >= self.max_open {
            return Err(CommandError::Invalid(format!(
                "the gateway holds {} unfinished commands; wait for them to finish or expire",
                self.max_open
            )));
        }
        self.persist(&cmd).await.map_err(|e| CommandError::Store(e.to_string()))?;
        let earlier = self.next_expiry().is_none_or(|n| cmd.expires_ms < n);
        self.map().insert(cmd.id, cmd.clone());
        self.note_latest(&cmd);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        if earlier {
            self.wake.notify_one();
        }
        let cmd = Arc::new(cmd);
        let _ = self.changes.send(cmd.clone());
        Ok(cmd)
    }

    /// Apply `event` to command `id` through [`next`]: stored, then told.
    /// `None`: no such command, or the event does not apply (counted as a
    /// duplicate).
    pub async fn apply(&self, id: Uuid, event: CmdEvent) -> Option<Arc<Command>> {
        let _w = self.write.lock().await;
        let Some(mut cmd) = self.get(id) else {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Some(state) = next(cmd.state, &event) else {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let now = super::now_ms();
        cmd.state = state;
        cmd.updated_ms = now;
        cmd.history.push((state, now));
        match event {
            CmdEvent::Result { info, .. } => cmd.info = Some(info),
            CmdEvent::Expire => cmd.info = Some("EXPIRED".into()),
            CmdEvent::Delivered => {}
        }
        if let Err(e) = self.persist(&cmd).await {
            // Memory goes on (the device did answer); the store catches up
            // with the next change or keeps the older state, which expiry
            // settles after a restart.
            tracing::warn!(command = %id, error = %e, "cannot store a command's change");
        }
        let counter = match state {
            CmdState::Ok => Some(&self.counters.ok),
            CmdState::Error => Some(&self.counters.error),
            CmdState::Expired => Some(&self.counters.expired),
            _ => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.map().insert(id, cmd.clone());
        if state.terminal() {
            self.finished.fetch_add(1, Ordering::Relaxed);
            self.prune().await;
        }
        let cmd = Arc::new(cmd);
        let _ = self.changes.send(cmd.clone());
        Some(cmd)
    }

    /// Record that the MQTT broker acknowledged command `id`'s publish.
    pub async fn broker_acked(&self, id: Uuid) {
        let _w = self.write.lock().await;
        let Some(mut cmd) = self.get(id) else { return };
        if cmd.broker_ms.is_some() || cmd.state.terminal() {
            return;
        }
        cmd.broker_ms = Some(super::now_ms());
        if let Err(e) = self.persist(&cmd).await {
            tracing::warn!(command = %id, error = %e, "cannot store a command's broker acknowledgement");
        }
        self.map().insert(id, cmd);
    }

    /// The oldest unfinished command of `device` named `name` that can
    /// have reached it: a result without an id belongs to it. A command
    /// the broker never acknowledged (or a polling device never took)
    /// cannot have been executed, so a repeated result is not pinned on
    /// it, which would finish it unsent (measured: BENCHMARKS.md, commands).
    pub fn oldest_open(&self, device: Uuid, name: &str) -> Option<Uuid> {
        self.map()
            .values()
            .find(|c| c.device == device && c.name == name && !c.state.terminal() && c.may_have_arrived())
            .map(|c| c.id)
    }

    /// A device's result for `name`: finishes its oldest open command of
    /// that name; a result for none (a repeat, a late answer) is ignored
    /// and counted.
    pub async fn result(&self, device: Uuid, name: &str, ok: bool, info: Value) -> Option<Arc<Command>> {
        match self.oldest_open(device, name) {
            Some(id) => self.apply(id, CmdEvent::Result { ok, info }).await,
            None => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Forget the oldest finished commands beyond [`KEEP_FINISHED`], in
    /// batches of [`PRUNE_BATCH`] (each batch is one pass over the ledger).
    async fn prune(&self) {
        let finished = self.finished.load(Ordering::Relaxed);
        if finished < KEEP_FINISHED + PRUNE_BATCH {
            return;
        }
        let old: std::collections::HashSet<Uuid> =
            self.map().values().filter(|c| c.state.terminal()).take(finished - KEEP_FINISHED).map(|c| c.id).collect();
        if self.store.commands_delete(old.iter().copied().collect()).await.is_ok() {
            self.map().retain(|id, _| !old.contains(id));
            self.latest().retain(|_, by_name| {
                by_name.retain(|_, id| !old.contains(id));
                !by_name.is_empty()
            });
            self.finished.fetch_sub(old.len(), Ordering::Relaxed);
        }
    }

    async fn persist(&self, cmd: &Command) -> Result<(), StoreError> {
        let text = serde_json::to_string(cmd).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.command_put(self.gateway, cmd.id, text).await
    }
}

/// A new command for device `r`, checked against what it declares:
/// `name` must be one of its commands; `expiration` (seconds) defaults to
/// the command's, the device's or group's `expiration`, then `default`.
pub fn build(
    r: &Resolved,
    name: &str,
    value: Value,
    expiration: Option<f64>,
    default: Duration,
    origin: Origin,
) -> Result<Command, CommandError> {
    let device = &r.record.device;
    let group = r.group.as_deref();
    let declared = declared(device, group);
    let Some(decl) = declared.iter().find(|c| c["name"] == name) else {
        let known: Vec<&str> = declared.iter().filter_map(|c| c["name"].as_str()).collect();
        return Err(CommandError::Unknown {
            device: device.device_id.clone(),
            name: name.chars().take(64).collect(),
            known: if known.is_empty() { "none".into() } else { known.join(", ") },
        });
    };
    let via = via_of(device, group)?;
    let size = serde_json::to_vec(&value).map_or(usize::MAX, |v| v.len());
    if size > MAX_VALUE_BYTES {
        return Err(CommandError::Invalid(format!(
            "a command value is at most {MAX_VALUE_BYTES} bytes of JSON, not {size}"
        )));
    }
    let secs = |v: Option<&Value>| v.and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0);
    let expiration = expiration
        .filter(|s| s.is_finite() && *s > 0.0)
        .or_else(|| secs(decl.get("expiration")))
        .or_else(|| secs(device.extra.get("expiration")))
        .or_else(|| secs(group.and_then(|g| g.extra.get("expiration"))))
        .map_or(default, |s| Duration::from_secs_f64(s.min(30.0 * 86_400.0)));
    let now = super::now_ms();
    let Tenant { service, servicepath } = r.record.tenant.clone();
    Ok(Command {
        id: Uuid::now_v7(),
        device: r.record.uuid,
        device_id: device.device_id.clone(),
        apikey: apikey_of(r),
        service,
        servicepath,
        name: name.to_owned(),
        value,
        state: CmdState::Pending,
        info: None,
        via,
        origin,
        created_ms: now,
        updated_ms: now,
        expires_ms: now.saturating_add(expiration.as_millis() as i64),
        broker_ms: None,
        history: vec![(CmdState::Pending, now)],
        with_id: [device.extra.get("command_ids"), group.and_then(|g| g.extra.get("command_ids"))]
            .into_iter()
            .flatten()
            .next()
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// The MQTT publish of a command: topic (under the gateway's prefix, as
/// its subscriptions are) and payload `{"<name>": value}`.
pub fn mqtt_message(cmd: &Command, prefix: &str) -> (String, Vec<u8>) {
    let topic = if prefix.is_empty() {
        format!("/{}/{}/cmd", cmd.apikey, cmd.device_id)
    } else {
        format!("{prefix}/{}/{}/cmd", cmd.apikey, cmd.device_id)
    };
    let payload = serde_json::to_vec(&cmd.payload()).unwrap_or_default();
    (topic, payload)
}

/// The dojot actuation of a command: `{"<name>": value}` on both dojot
/// topic forms, `{tenant}:{device}/config` (VerneMQ) and
/// `/{tenant}/{device}/config` (Mosca), under the gateway's prefix.
pub fn dojot_messages(cmd: &Command, prefix: &str) -> [(String, Vec<u8>); 2] {
    let payload = serde_json::to_vec(&cmd.payload()).unwrap_or_default();
    let (a, b) =
        (format!("{}:{}/config", cmd.service, cmd.device_id), format!("/{}/{}/config", cmd.service, cmd.device_id));
    let under = |t: String| if prefix.is_empty() { t } else { format!("{prefix}/{}", t.trim_start_matches('/')) };
    [(under(a), payload.clone()), (under(b), payload)]
}

/// A dojot device's measure is the result of its open actuation of the
/// same attribute: each such attribute finishes the oldest open command of
/// that name with the measured value.
pub async fn dojot_results(core: &Core, r: &Resolved, measures: &[super::mapping::Mapped]) {
    if !matches!(via_of(&r.record.device, r.group.as_deref()), Ok(Via::Dojot)) {
        return;
    }
    for m in measures {
        for (name, (_, value)) in &m.attrs {
            if core.commands.oldest_open(r.record.uuid, name).is_some() {
                core.commands.result(r.record.uuid, name, true, value.clone()).await;
            }
        }
    }
}

/// The AMQP publish of a command (iotagent-json's AMQP binding): routing
/// key `.{apikey}.{device_id}.cmd`, body `{"<name>": value}`.
pub fn amqp_message(cmd: &Command) -> (String, Vec<u8>) {
    let key = format!(".{}.{}.cmd", cmd.apikey, cmd.device_id);
    (key, serde_json::to_vec(&cmd.payload()).unwrap_or_default())
}

/// The Context Broker's view of a command's state, as iotagent-node-lib
/// writes it: an upsert of `<cmd>_status` (`commandStatus`) and, once there
/// is one, `<cmd>_info` (`commandResult`). Expiry is `ERROR` with info
/// `EXPIRED`, as upstream; delivery by polling has info `" "`.
pub fn cb_status(cmd: &Command, entity_id: &str, entity_type: &str) -> Value {
    let (status, info) = match cmd.state {
        CmdState::Pending => ("PENDING", None),
        CmdState::Delivered => ("DELIVERED", Some(Value::String(" ".into()))),
        CmdState::Ok => ("OK", cmd.info.clone()),
        CmdState::Error => ("ERROR", cmd.info.clone()),
        CmdState::Expired => ("ERROR", Some("EXPIRED".into())),
    };
    let mut e = Map::new();
    e.insert("id".into(), entity_id.into());
    e.insert("type".into(), entity_type.into());
    e.insert(format!("{}_status", cmd.name), json!({"type": "commandStatus", "value": status}));
    if let Some(info) = info {
        e.insert(format!("{}_info", cmd.name), json!({"type": "commandResult", "value": info}));
    }
    Value::Object(e)
}

/// The Context Broker registration of a device's commands, made when it is
/// provisioned (iotagent-node-lib's legacy `cmdMode`): the Context Broker
/// forwards updates of those attributes to `provider` (the north API).
pub fn registration(entity_id: &str, entity_type: &str, commands: &[Map<String, Value>], provider: &str) -> Value {
    let attrs: Vec<&Value> = commands.iter().map(|c| &c["name"]).collect();
    json!({
        "dataProvided": {"entities": [{"id": entity_id, "type": entity_type}], "attrs": attrs},
        "provider": {"http": {"url": provider}, "legacyForwarding": true, "supportedForwardingMode": "all"},
    })
}

/// POST a command to the device's `endpoint`: `{"<name>": value}` with
/// the tenant's headers. The device's answer is the result (its `<name>`
/// field if it has one). `Err(Some(..))`: the device answered with an error
/// (final); `Err(None)` with the reason: unreachable (try again later).
pub async fn push_http(cmd: &Command, endpoint: &str) -> Result<Value, (bool, String)> {
    let client = crate::http::client().map_err(|e| (false, e))?;
    let body = cmd.payload();
    let sent = client
        .post(endpoint)
        .header("fiware-service", &cmd.service)
        .header("fiware-servicepath", &cmd.servicepath)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return Err((false, crate::config::redact_url(&e.to_string()))),
    };
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap_or_default();
    if !status.is_success() {
        return Err((true, format!("the device answered HTTP {}", status.as_u16())));
    }
    let v: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Ok(v.get(&cmd.name).cloned().unwrap_or(v))
}

/// Take a command for device `device` of this gateway: checked against
/// what the device declares, stored, then handed to its transport.
pub async fn submit(
    core: &Arc<Core>,
    device: Uuid,
    name: &str,
    value: Value,
    expiration: Option<f64>,
    origin: Origin,
) -> Result<Arc<Command>, CommandError> {
    let r = core
        .registry
        .device_by_uuid(device)
        .ok_or_else(|| CommandError::Invalid(format!("no device {device} in this gateway")))?;
    let cmd = build(&r, name, value, expiration, core.settings.command_expiration, origin)?;
    if cmd.via == Via::Mqtt && core.settings.mqtt_url.is_none() {
        return Err(CommandError::Transport(format!(
            "{} takes commands over MQTT, and MQTT is off for this gateway (mqtt_url)",
            cmd.device_id
        )));
    }
    if cmd.via == Via::Dojot && (!core.settings.dojot || core.settings.mqtt_url.is_none()) {
        return Err(CommandError::Transport(format!(
            "{} takes dojot actuation, and this gateway has no dojot: true with MQTT",
            cmd.device_id
        )));
    }
    if cmd.via == Via::Amqp && core.settings.amqp_south_exchange.is_none() {
        return Err(CommandError::Transport(format!(
            "{} takes commands over AMQP, and this gateway has no amqp_south_exchange",
            cmd.device_id
        )));
    }
    let cmd = core.commands.insert(cmd).await?;
    tracing::info!(command = %cmd.id, device = %cmd.device_id, name = %cmd.name, via = ?cmd.via, "command accepted");
    dispatch(core, &cmd);
    Ok(cmd)
}

/// A `command` action's parameters (`{"name", "value"?, "expiration"?}`,
/// from the bus or the HTTP API) taken as a command for `device`.
pub async fn submit_action(
    core: &Arc<Core>,
    device: Uuid,
    parameters: &Map<String, Value>,
    origin: Origin,
) -> Result<Arc<Command>, CommandError> {
    let Some(name) = parameters.get("name").and_then(Value::as_str) else {
        return Err(CommandError::Invalid("A command needs parameters.name (and usually parameters.value)".into()));
    };
    let value = parameters.get("value").cloned().unwrap_or(Value::Null);
    let expiration = parameters.get("expiration").and_then(Value::as_f64);
    submit(core, device, name, value, expiration, origin).await
}

/// Hand a pending command to its transport: the MQTT client (which
/// publishes it once connected), an HTTP push task, or nothing (the device
/// polls).
fn dispatch(core: &Arc<Core>, cmd: &Command) {
    match cmd.via {
        Via::Mqtt | Via::Dojot => {
            if let Some(tx) = core.mqtt_out.get() {
                let _ = tx.send(super::MqttOut::Command(cmd.id));
            }
        }
        Via::HttpPush => {
            let (core, id) = (core.clone(), cmd.id);
            tokio::spawn(async move { push_until_done(core, id).await });
        }
        Via::Amqp => {
            if let Some(tx) = core.amqp_out.get() {
                let _ = tx.send(cmd.id);
            }
        }
        Via::HttpPoll => {}
    }
}

/// Push command `id` to its device's endpoint, again with backoff while
/// the device is unreachable, until it answers or the command expires.
async fn push_until_done(core: Arc<Core>, id: Uuid) {
    let mut wait = Duration::from_millis(200);
    loop {
        let Some(cmd) = core.commands.get(id).filter(|c| !c.state.terminal()) else { return };
        let endpoint =
            core.registry.device_by_uuid(cmd.device).and_then(|r| endpoint_of(&r.record.device, r.group.as_deref()));
        let Some(endpoint) = endpoint else {
            let info = Value::String("the device has no endpoint any more".into());
            core.commands.apply(id, CmdEvent::Result { ok: false, info }).await;
            return;
        };
        if let Err(why) = core.endpoint_allowed(&endpoint) {
            core.commands.apply(id, CmdEvent::Result { ok: false, info: why.into() }).await;
            return;
        }
        core.commands.counters.sent.fetch_add(1, Ordering::Relaxed);
        match push_http(&cmd, &endpoint).await {
            Ok(result) => {
                core.commands.apply(id, CmdEvent::Result { ok: true, info: result }).await;
                return;
            }
            Err((true, why)) => {
                core.commands.apply(id, CmdEvent::Result { ok: false, info: why.into() }).await;
                return;
            }
            Err((false, why)) => {
                tracing::debug!(command = %id, error = %why, "device endpoint unreachable; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The commands waiting for device `r` to poll: each becomes `DELIVERED`
/// (stored first), and the answer is `{"<name>": value, …}` (a later one of
/// the same name wins, as the object can hold one).
pub async fn take_polled(core: &Core, r: &Resolved) -> Map<String, Value> {
    let waiting: Vec<Command> = core
        .commands
        .list(Some(r.record.uuid))
        .into_iter()
        .filter(|c| c.state == CmdState::Pending && c.via == Via::HttpPoll)
        .collect();
    let mut out = Map::new();
    for c in waiting {
        if core.commands.apply(c.id, CmdEvent::Delivered).await.is_some() {
            core.commands.counters.sent.fetch_add(1, Ordering::Relaxed);
            out.insert(c.name.clone(), c.value.clone());
        }
    }
    out
}

/// A device's results (`{"<name>": result, …}`, from MQTT `cmdexe` or
/// `POST …/commands`): each finishes the oldest open command of its name.
pub async fn results(core: &Core, r: &Resolved, body: &Value) -> Result<usize, String> {
    let Some(o) = body.as_object() else {
        return Err(format!("a command result must be an object {{\"<command>\": result}}, not {body}"));
    };
    // With an id, the result is that command's (a repeat, or an answer to
    // a command that already finished, is ignored and counted).
    if let Some(id) = o.get(CMD_ID) {
        let id = id.as_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(|| format!("invalid {CMD_ID} {id}"))?;
        let cmd = core.commands.get(id).filter(|c| c.device == r.record.uuid);
        let Some(cmd) = cmd else { return Err(format!("{CMD_ID} {id} is no command of this device")) };
        let info = o.get(&cmd.name).cloned().unwrap_or(Value::Null);
        return Ok(usize::from(core.commands.apply(id, CmdEvent::Result { ok: true, info }).await.is_some()));
    }
    let mut n = 0;
    for (name, value) in o {
        if core.commands.result(r.record.uuid, name, true, value.clone()).await.is_some() {
            n += 1;
        } else {
            tracing::debug!(device = %r.record.device.device_id, %name, "a result for no open command; ignored");
        }
    }
    Ok(n)
}

/// The ledger's clock and messenger, until `token` is cancelled: expires
/// commands on time (also those loaded after a restart), tells the Context
/// Broker of every change, and restarts the HTTP pushes a restart cut off.
pub async fn run(core: Arc<Core>, token: CancellationToken) {
    let mut changes = core.commands.subscribe();
    for c in core.commands.open() {
        if c.via == Via::HttpPush {
            dispatch(&core, &c);
        }
    }
    loop {
        let now = super::now_ms();
        let due = core.commands.next_expiry();
        if due.is_some_and(|d| d <= now) {
            for c in core.commands.open().into_iter().filter(|c| c.expires_ms <= now) {
                if let Some(c) = core.commands.apply(c.id, CmdEvent::Expire).await {
                    tracing::info!(command = %c.id, device = %c.device_id, name = %c.name, "command expired");
                }
            }
            continue;
        }
        let sleep = due.map_or(Duration::from_secs(3600), |d| Duration::from_millis((d - now).max(0) as u64));
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = core.commands.wake.notified() => {}
            c = changes.recv() => match c {
                Ok(c) => tell_cbroker(&core, &c),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "the command messenger fell behind; the Context Broker misses some command states");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = token.cancelled() => return,
        }
    }
}

/// Queue `<cmd>_status` (and `_info`) for the device's Context Broker.
fn tell_cbroker(core: &Core, cmd: &Command) {
    let Some(r) = core.registry.device_by_uuid(cmd.device) else { return };
    let (device, group) = (&r.record.device, r.group.as_deref());
    let Some(cbroker) = super::ngsi::cbroker_of(device, group, core.settings.cbroker.as_deref()) else { return };
    let body = cb_status(cmd, &device.entity_name(group), device.entity_type(group));
    core.send_ngsi(super::ngsi::Request {
        cbroker: cbroker.trim_end_matches('/').to_owned(),
        path: "/v2/entities?options=upsert".into(),
        service: cmd.service.clone(),
        servicepath: cmd.servicepath.clone(),
        body,
    });
}

/// Register device `r`'s commands at its Context Broker, if it has both
/// (iotagent-node-lib does so when a device is provisioned).
pub fn register(core: &Core, r: &Resolved) {
    let (device, group) = (&r.record.device, r.group.as_deref());
    let commands = declared(device, group);
    if commands.is_empty() {
        return;
    }
    let Some(cbroker) = super::ngsi::cbroker_of(device, group, core.settings.cbroker.as_deref()) else { return };
    let body = registration(&device.entity_name(group), device.entity_type(group), &commands, &core.provider_url());
    core.send_ngsi(super::ngsi::Request {
        cbroker: cbroker.trim_end_matches('/').to_owned(),
        path: "/v2/registrations".into(),
        service: r.record.tenant.service.clone(),
        servicepath: r.record.tenant.servicepath.clone(),
        body,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: usize) -> CmdEvent {
        match kind {
            0 => CmdEvent::Delivered,
            1 => CmdEvent::Result { ok: true, info: json!("done") },
            2 => CmdEvent::Result { ok: false, info: json!("stalled") },
            _ => CmdEvent::Expire,
        }
    }

    #[test]
    fn the_table_moves_forward_only_and_finished_commands_never_change() {
        use CmdState::*;
        let expected = |s: CmdState, e: usize| -> Option<CmdState> {
            match (s, e) {
                (Pending, 0) => Some(Delivered),
                (Pending | Delivered, 1) => Some(Ok),
                (Pending | Delivered, 2) => Some(Error),
                (Pending | Delivered, 3) => Some(Expired),
                _ => None,
            }
        };
        for s in CmdState::ALL {
            for e in 0..4 {
                assert_eq!(next(s, &ev(e)), expected(s, e), "{s:?} + {:?}", ev(e));
                if s.terminal() {
                    assert_eq!(next(s, &ev(e)), None, "finished: {s:?}");
                }
            }
        }
    }

    fn device(v: Value) -> Device {
        super::super::model::parse_device(&v).unwrap()
    }

    #[test]
    fn the_transport_follows_iotagent_json() {
        let d = |v| device(v);
        assert_eq!(via_of(&d(json!({"device_id": "a"})), None), Ok(Via::Mqtt));
        assert_eq!(via_of(&d(json!({"device_id": "a", "endpoint": "http://x"})), None), Ok(Via::HttpPush));
        assert_eq!(via_of(&d(json!({"device_id": "a", "transport": "HTTP"})), None), Ok(Via::HttpPoll));
        assert_eq!(
            via_of(&d(json!({"device_id": "a", "transport": "http", "endpoint": "http://x"})), None),
            Ok(Via::HttpPush)
        );
        assert_eq!(via_of(&d(json!({"device_id": "a", "transport": "MQTT", "endpoint": "x"})), None), Ok(Via::Mqtt));
        assert_eq!(via_of(&d(json!({"device_id": "a", "transport": "AMQP"})), None), Ok(Via::Amqp));
        assert!(via_of(&d(json!({"device_id": "a", "transport": "COAP"})), None).is_err());
    }

    #[test]
    fn a_command_must_be_declared_small_and_gets_its_expiry() {
        let d = device(json!({"device_id": "a", "commands": [{"name": "set", "expiration": 5}]}));
        let r = Resolved {
            record: Arc::new(super::super::registry::DeviceRecord {
                tenant: Tenant { service: "s".into(), servicepath: "/".into() },
                device: d,
                uuid: Uuid::nil(),
                last: Default::default(),
            }),
            group: None,
        };
        let ok = build(&r, "set", json!(1), None, Duration::from_secs(300), Origin::default()).unwrap();
        assert_eq!(ok.expires_ms - ok.created_ms, 5000, "the command's own expiration");
        let asked = build(&r, "set", json!(1), Some(2.0), Duration::from_secs(300), Origin::default()).unwrap();
        assert_eq!(asked.expires_ms - asked.created_ms, 2000, "the request's wins");
        let e = build(&r, "reboot", json!(1), None, Duration::from_secs(300), Origin::default()).unwrap_err();
        assert_eq!(e.to_string(), "a has no command \"reboot\" (it has: set)");
        let big = json!("x".repeat(MAX_VALUE_BYTES));
        let e = build(&r, "set", big, None, Duration::from_secs(300), Origin::default()).unwrap_err();
        assert!(e.to_string().starts_with("a command value is at most"), "{e}");
    }

    #[test]
    fn declared_commands_are_the_devices_then_the_groups() {
        let d = device(json!({"device_id": "a", "commands": [{"name": "ping", "type": "command"}]}));
        let g = super::super::model::parse_group(&json!({"resource": "/iot/json", "apikey": "k",
            "commands": [{"name": "ping", "type": "other"}, {"name": "move", "type": "command"}]}))
        .unwrap();
        let names: Vec<Value> = declared(&d, Some(&g)).iter().map(|c| c["name"].clone()).collect();
        assert_eq!(names, [json!("ping"), json!("move")]);
        assert_eq!(declared(&d, Some(&g))[0]["type"], "command", "the device's own wins");
    }

    #[test]
    fn the_context_broker_sees_node_libs_attributes() {
        let mut c = Command {
            id: Uuid::nil(),
            device: Uuid::nil(),
            device_id: "dev1".into(),
            apikey: "k1".into(),
            service: "lab".into(),
            servicepath: "/rig1".into(),
            name: "ping".into(),
            value: json!({"data": "22"}),
            state: CmdState::Pending,
            info: None,
            via: Via::Mqtt,
            origin: Origin::default(),
            created_ms: 0,
            updated_ms: 0,
            expires_ms: 0,
            broker_ms: None,
            history: vec![],
            with_id: false,
        };
        let s = |c: &Command| serde_json::to_string(&cb_status(c, "urn:lab:Sensor:push1", "Sensor")).unwrap();
        assert_eq!(
            s(&c),
            r#"{"id":"urn:lab:Sensor:push1","type":"Sensor","ping_status":{"type":"commandStatus","value":"PENDING"}}"#
        );
        c.state = CmdState::Ok;
        c.info = Some(json!("1234567890"));
        assert_eq!(
            s(&c),
            r#"{"id":"urn:lab:Sensor:push1","type":"Sensor","ping_status":{"type":"commandStatus","value":"OK"},"ping_info":{"type":"commandResult","value":"1234567890"}}"#
        );
        c.state = CmdState::Expired;
        assert!(s(&c).contains(r#""ping_status":{"type":"commandStatus","value":"ERROR"},"ping_info":{"type":"commandResult","value":"EXPIRED"}"#));
        c.state = CmdState::Delivered;
        assert!(s(&c).contains(r#""ping_info":{"type":"commandResult","value":" "}"#));
        let (topic, payload) = mqtt_message(&c, "");
        assert_eq!((topic.as_str(), payload.as_slice()), ("/k1/dev1/cmd", br#"{"ping":{"data":"22"}}"#.as_slice()));
        assert_eq!(mqtt_message(&c, "site1").0, "site1/k1/dev1/cmd");
        c.with_id = true;
        assert_eq!(c.payload(), json!({"ping": {"data": "22"}, "cmd_id": Uuid::nil().to_string()}));
        c.with_id = false;
        let [a, b] = dojot_messages(&c, "");
        assert_eq!((a.0.as_str(), b.0.as_str()), ("lab:dev1/config", "/lab/dev1/config"));
        assert_eq!(a.1, br#"{"ping":{"data":"22"}}"#);
        let [a, b] = dojot_messages(&c, "p");
        assert_eq!((a.0.as_str(), b.0.as_str()), ("p/lab:dev1/config", "p/lab/dev1/config"));
    }

    #[tokio::test]
    async fn the_ledger_stores_before_it_tells_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let gw = Uuid::new_v4();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::load(gw, store.clone()).unwrap();
        let mut rx = ledger.subscribe();
        let dev = Uuid::new_v4();
        let mk = |name: &str, expires_ms| Command {
            id: Uuid::now_v7(),
            device: dev,
            device_id: "d".into(),
            apikey: "k".into(),
            service: "s".into(),
            servicepath: "/".into(),
            name: name.into(),
            value: json!(1),
            state: CmdState::Pending,
            info: None,
            via: Via::HttpPush,
            origin: Origin { from: "http".into(), ..Default::default() },
            created_ms: 1,
            updated_ms: 1,
            expires_ms,
            broker_ms: None,
            history: vec![(CmdState::Pending, 1)],
            with_id: false,
        };
        let a = ledger.insert(mk("ping", 10_000)).await.unwrap();
        let b = ledger.insert(mk("ping", 5_000)).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().id, a.id);
        assert_eq!(ledger.next_expiry(), Some(5_000));
        // A result without an id belongs to the oldest open one of its name.
        let done = ledger.result(dev, "ping", true, json!("pong")).await.unwrap();
        assert_eq!((done.id, done.state), (a.id, CmdState::Ok));
        // Repeated: it finishes b, then a third is a duplicate.
        assert_eq!(ledger.result(dev, "ping", true, json!("pong")).await.unwrap().id, b.id);
        assert!(ledger.result(dev, "ping", true, json!("pong")).await.is_none());
        assert!(ledger.apply(a.id, CmdEvent::Expire).await.is_none(), "finished stays finished");
        assert_eq!(ledger.counters.duplicates.load(Ordering::Relaxed), 2);
        let c = ledger.insert(mk("move", 1)).await.unwrap();
        ledger.apply(c.id, CmdEvent::Delivered).await.unwrap();
        // An MQTT command the broker never took cannot have a result.
        let mut unsent = mk("mqtt", 1);
        unsent.via = Via::Mqtt;
        let unsent = ledger.insert(unsent).await.unwrap();
        assert!(ledger.result(dev, "mqtt", true, json!(1)).await.is_none(), "not pinned on an unsent command");
        ledger.broker_acked(unsent.id).await;
        assert_eq!(ledger.result(dev, "mqtt", true, json!(1)).await.unwrap().id, unsent.id);
        let last = ledger.last_by_name(dev, &["ping", "move", "absent"]);
        assert_eq!(last["ping"]["id"], json!(b.id), "the newest of each name");
        assert_eq!(last["move"]["state"], "DELIVERED");
        assert_eq!(last.len(), 2);
        assert_eq!(ledger.open_count(), 1, "move; the mqtt one finished");
        drop(ledger);
        let again = Ledger::load(gw, store).unwrap();
        assert_eq!(again.last_by_name(dev, &["ping", "move"]), last, "rebuilt from the store");
        assert_eq!(again.open_count(), 1);
        let all = again.list(Some(dev));
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].state, CmdState::Ok);
        assert_eq!(all[0].info, Some(json!("pong")));
        assert_eq!(again.get(c.id).unwrap().state, CmdState::Delivered);
        assert_eq!(again.get(c.id).unwrap().history.len(), 2);
        assert_eq!(again.next_expiry(), Some(1), "the open one still expires");
    }

    #[tokio::test]
    async fn a_device_that_never_answers_cannot_grow_the_ledger_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::load(Uuid::new_v4(), Store::open(dir.path()).unwrap()).unwrap();
        ledger.max_open = 2;
        let mk = || Command {
            id: Uuid::now_v7(),
            device: Uuid::nil(),
            device_id: "d".into(),
            apikey: "k".into(),
            service: "s".into(),
            servicepath: "/".into(),
            name: "n".into(),
            value: Value::Null,
            state: CmdState::Pending,
            info: None,
            via: Via::HttpPoll,
            origin: Origin::default(),
            created_ms: 0,
            updated_ms: 0,
            expires_ms: i64::MAX,
            broker_ms: None,
            history: vec![],
            with_id: false,
        };
        let first = ledger.insert(mk()).await.unwrap();
        ledger.insert(mk()).await.unwrap();
        let refused = ledger.insert(mk()).await.unwrap_err();
        assert!(refused.to_string().contains("holds 2 unfinished commands"), "{refused}");
        ledger.apply(first.id, CmdEvent::Expire).await.unwrap();
        ledger.insert(mk()).await.expect("room again once one finished");
        // Finished ones beyond KEEP_FINISHED are forgotten, oldest first.
        ledger.max_open = usize::MAX;
        let mut ids = Vec::new();
        for _ in 0..KEEP_FINISHED + PRUNE_BATCH - 1 {
            let c = ledger.insert(mk()).await.unwrap();
            ledger.apply(c.id, CmdEvent::Expire).await.unwrap();
            ids.push(c.id);
        }
        // 1 + KEEP_FINISHED + PRUNE_BATCH - 1 finished: one batch went.
        let finished = ledger.list(None).into_iter().filter(|c| c.state.terminal()).count();
        assert_eq!(finished, KEEP_FINISHED);
        let gone = PRUNE_BATCH - 1;
        assert!(ledger.get(first.id).is_none() && ledger.get(ids[gone - 1]).is_none(), "the oldest went first");
        assert!(ledger.get(ids[gone]).is_some());
        assert_eq!(ledger.list(None).len(), KEEP_FINISHED + 2, "and the two open ones stay");
    }
}
