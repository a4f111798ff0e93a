//! The embedded IoT device platform: an iotagent-json-compatible agent run
//! by each `gateway/iot-agent` component.
//!
//! - [`model`]: groups, devices, attributes and north API errors;
//! - [`mapping`]: topic grammar and measure rules (pure);
//! - [`registry`]: provisioned groups and devices, tenancy, persistence;
//! - [`north`]: the provisioning API (iotagent-node-lib compatible);
//! - [`south`]: measures in over HTTP, MQTT (rumqttc) and AMQP;
//! - [`federation`]: measures out to the `villas.data` topic exchange;
//! - [`devices`]: every device as an `equipment` component on `villas`.
//!
//! One [`Agent`] per gateway owns these tasks; dropping it stops them.

pub mod cb;
pub mod commands;
pub mod configuration;
pub mod devices;
pub mod expression;
pub mod federation;
pub mod mapping;
pub mod model;
pub mod ngsi;
pub mod north;
pub mod registry;
pub mod south;

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::component::Env;
use crate::protocol::ErrorInfo;
use mapping::{Address, Origin};
use model::ApiError;

/// The settings of one gateway, from its component properties.
#[derive(Debug, Clone)]
pub struct Settings {
    /// MQTT broker URL (`mqtt://`, or `mqtts://` for TLS); `None`
    /// disables MQTT.
    pub mqtt_url: Option<String>,
    /// TLS settings of an `mqtts://` URL.
    pub mqtt_tls: Option<MqttTls>,
    /// QoS of the MQTT subscriptions (0 or 1).
    pub mqtt_qos: u8,
    /// How long the MQTT broker may stay unreachable before a running
    /// gateway enters `error` (short outages and reconnects stay quiet).
    pub mqtt_grace: std::time::Duration,
    /// Shared-subscription group (`$share/{group}/…`); empty (the
    /// default): plain subscriptions. Mosquitto queues nothing for an
    /// offline member of a shared subscription, so only plain ones keep
    /// QoS 1 measures across a broker restart.
    pub mqtt_shared_group: String,
    /// A topic level in front of every subscription (test isolation,
    /// multi-site brokers); empty: none.
    pub mqtt_prefix: String,
    /// Provisioning API listener.
    pub north_bind: SocketAddr,
    /// Who may use the provisioning API (`north_auth`); required when
    /// `north_bind` is not loopback.
    pub north_auth: Option<crate::auth::AuthConfig>,
    /// HTTP southbound listener.
    pub south_bind: SocketAddr,
    /// HTTP southbound resource.
    pub resource: String,
    /// AMQP southbound topic exchange; `None` disables it.
    pub amqp_south_exchange: Option<String>,
    /// AMQP southbound queue.
    pub amqp_south_queue: String,
    /// The federation's topic exchange.
    pub federation_exchange: String,
    /// A headers exchange of their own for the devices' bindings (one per
    /// device), bound into the daemon's exchange by `category: equipment`
    /// and by entity type; `None`: the devices bind on the daemon's
    /// exchange. RabbitMQ matches a headers exchange's bindings one by one,
    /// so with tens of thousands of devices every message of every lab on
    /// that exchange would pay for them (README "Devices").
    pub device_exchange: Option<String>,
    /// Measures kept while the federation broker is down.
    pub buffer: usize,
    /// Accept dojot topics (`tenant:device/attrs`, `/tenant/device/attrs`).
    pub dojot: bool,
    /// The services this gateway serves (empty: any).
    pub services: Vec<String>,
    /// Southbound HTTP body limit (also the largest MQTT or AMQP measure).
    pub max_body_bytes: usize,
    /// Limits of the north and south listeners.
    pub limits: crate::serve::Limits,
    /// The Context Broker every accepted measure also goes to (NGSI-v2),
    /// unless a group or device names its own; `None`: none.
    pub cbroker: Option<String>,
    /// Whether measures get `TimeInstant` at the Context Broker (groups and
    /// devices may say otherwise).
    pub timestamp: bool,
    /// Most Context Broker requests kept while it is unreachable.
    pub cbroker_queue: usize,
    /// How long a command waits for its result when neither it, its device
    /// nor its group says (`command_expiration`, seconds).
    pub command_expiration: std::time::Duration,
    /// The URL the Context Broker uses to reach the north API (command
    /// registrations); `None`: `http://` and the north listener's address.
    pub provider_url: Option<String>,
    /// The hosts (`host` or `host:port`) device endpoints may name
    /// (`endpoint_allow`); `None`: any, as iotagent-json.
    pub endpoint_allow: Option<Vec<String>>,
}

fn prop_str(p: &Map<String, Value>, k: &str) -> Option<String> {
    p.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn bind(p: &Map<String, Value>, k: &str, default: &str) -> Result<SocketAddr, ErrorInfo> {
    let s = prop_str(p, k).unwrap_or_else(|| default.to_owned());
    s.parse().map_err(|e| ErrorInfo::new(format!("Invalid {k} {s:?}: {e}")))
}

/// TLS for an `mqtts://` broker: the CA to trust (PEM; the system's roots
/// without one) and a client certificate with its key (PEM), if the broker
/// asks for one. Read when the gateway starts, so a wrong path is the
/// gateway's error at once.
#[derive(Clone)]
pub struct MqttTls {
    /// `mqtt_ca`.
    pub ca: Option<Vec<u8>>,
    /// `mqtt_cert` and `mqtt_key`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("MqttTls").field("ca", &self.ca.is_some()).field("client", &self.client.is_some()).finish()
    }
}

impl MqttTls {
    fn from_properties(p: &Map<String, Value>, tls: bool) -> Result<Option<MqttTls>, ErrorInfo> {
        let read = |key: &str| -> Result<Option<Vec<u8>>, ErrorInfo> {
            let Some(path) = prop_str(p, key).filter(|s| !s.is_empty()) else { return Ok(None) };
            if !tls {
                return Err(ErrorInfo::new(format!("{key} needs an mqtts:// mqtt_url")).with("property", key));
            }
            std::fs::read(&path)
                .map(Some)
                .map_err(|e| ErrorInfo::new(format!("Cannot read {key} {path}: {e}")).with("property", key))
        };
        let (ca, cert, key) = (read("mqtt_ca")?, read("mqtt_cert")?, read("mqtt_key")?);
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(ErrorInfo::new("mqtt_cert and mqtt_key go together")),
        };
        Ok(tls.then_some(MqttTls { ca, client }))
    }
}

impl Settings {
    /// Read the settings from component properties (already validated
    /// against the type's properties schema).
    pub fn from_properties(p: &Map<String, Value>) -> Result<Settings, ErrorInfo> {
        let mqtt_url = match p.get("mqtt_url") {
            None => Some("mqtt://127.0.0.1:1883".to_owned()),
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        if let Some(url) = &mqtt_url
            && !["mqtt://", "tcp://", "mqtts://"].iter().any(|s| url.starts_with(s))
        {
            let shown = crate::config::redact_url(url);
            return Err(ErrorInfo::new(format!("Unsupported MQTT URL {shown}: use mqtt:// or mqtts://"))
                .with("property", "mqtt_url"));
        }
        if let Some(url) = &mqtt_url
            && south::parse_mqtt_url(url).is_none()
        {
            let shown = crate::config::redact_url(url);
            return Err(ErrorInfo::new(format!(
                "Invalid MQTT URL {shown}: expected mqtt[s]://[user[:password]@]host[:port]"
            ))
            .with("property", "mqtt_url"));
        }
        let tls = mqtt_url.as_deref().is_some_and(|u| u.starts_with("mqtts://"));
        let mqtt_tls = MqttTls::from_properties(p, tls)?;
        // A CA or key that does not parse fails the gateway's start, with the
        // reason in its error, rather than leaving MQTT off behind `running`.
        if let Some(t) = &mqtt_tls {
            south::tls_config(t).map_err(|e| ErrorInfo::new(format!("MQTT TLS: {e}")).with("property", "mqtt_ca"))?;
        }
        let north: SocketAddr = bind(p, "north_bind", "127.0.0.1:4041")?;
        if !north.ip().is_loopback() && !p.contains_key("north_auth") {
            return Err(ErrorInfo::new(format!(
                "north_auth is required because north_bind {north} is not a loopback address: set north_auth: {{jwt: {{keys: [...]}}}}, or north_auth: none"
            ))
            .with("property", "north_auth"));
        }
        Ok(Settings {
            mqtt_tls,
            mqtt_url,
            mqtt_qos: p.get("mqtt_qos").and_then(Value::as_u64).unwrap_or(1).min(1) as u8,
            mqtt_grace: p
                .get("mqtt_grace")
                .and_then(Value::as_f64)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map_or(std::time::Duration::from_secs(5), |s| std::time::Duration::from_secs_f64(s.min(86_400.0))),
            mqtt_shared_group: prop_str(p, "mqtt_shared_group").unwrap_or_default(),
            mqtt_prefix: prop_str(p, "mqtt_prefix").unwrap_or_default().trim_matches('/').to_owned(),
            north_bind: bind(p, "north_bind", "127.0.0.1:4041")?,
            north_auth: match p.get("north_auth") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    Some(serde_json::from_value(v.clone()).map_err(|e| {
                        ErrorInfo::new(format!("Invalid north_auth: {e}")).with("property", "north_auth")
                    })?)
                }
            },
            south_bind: bind(p, "south_bind", "127.0.0.1:7896")?,
            resource: prop_str(p, "resource").unwrap_or_else(|| "/iot/json".into()),
            amqp_south_exchange: prop_str(p, "amqp_south_exchange").filter(|s| !s.is_empty()),
            amqp_south_queue: prop_str(p, "amqp_south_queue").unwrap_or_else(|| "iotaqueue".into()),
            federation_exchange: prop_str(p, "federation_exchange").unwrap_or_else(|| "villas.data".into()),
            device_exchange: prop_str(p, "device_exchange").filter(|s| !s.is_empty()),
            buffer: p.get("buffer").and_then(Value::as_u64).unwrap_or(100_000) as usize,
            cbroker: prop_str(p, "cbroker").filter(|s| !s.is_empty()).map(|s| s.trim_end_matches('/').to_owned()),
            timestamp: p.get("timestamp").and_then(Value::as_bool).unwrap_or(false),
            cbroker_queue: p.get("cbroker_queue").and_then(Value::as_u64).unwrap_or(100_000) as usize,
            command_expiration: p
                .get("command_expiration")
                .and_then(Value::as_f64)
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(std::time::Duration::from_secs(300), |s| {
                    std::time::Duration::from_secs_f64(s.min(30.0 * 86_400.0))
                }),
            provider_url: prop_str(p, "provider_url").filter(|s| !s.is_empty()),
            endpoint_allow: p
                .get("endpoint_allow")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(|h| h.to_ascii_lowercase()).collect()),
            dojot: p.get("dojot").and_then(Value::as_bool).unwrap_or(false),
            services: p
                .get("services")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            max_body_bytes: p.get("max_body_bytes").and_then(Value::as_u64).unwrap_or(1 << 20) as usize,
            limits: crate::serve::Limits {
                max_connections: p
                    .get("max_connections")
                    .and_then(Value::as_u64)
                    .map_or(crate::serve::Limits::default().max_connections, |n| n.max(1) as usize),
                header_timeout: p
                    .get("header_timeout")
                    .and_then(Value::as_f64)
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map_or(crate::serve::Limits::default().header_timeout, |s| {
                        std::time::Duration::from_secs_f64(s.min(3600.0))
                    }),
            },
        })
    }
}

/// A southbound transport, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT.
    Mqtt,
    /// HTTP.
    Http,
    /// AMQP.
    Amqp,
}

/// Where a gateway's MQTT client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttLink {
    /// Connecting for the first time.
    Connecting,
    /// Connected (and subscribed, while the gateway takes measures).
    Up,
    /// The last connection attempt failed, or the connection was lost:
    /// why (rumqttc's error, which names no credentials). The client
    /// keeps trying.
    Down(String),
}

/// What the gateway's MQTT client is asked to publish.
#[derive(Debug)]
pub enum MqttOut {
    /// A command of the ledger, by id (tracked until the broker has it).
    Command(Uuid),
    /// A message to a device (configuration values), QoS 1, not tracked.
    Publish(String, Vec<u8>),
}

/// The counters a gateway reports in its status.
#[derive(Debug, Default)]
pub struct Counters {
    /// Measures accepted over MQTT.
    pub mqtt_in: AtomicU64,
    /// Measures accepted over HTTP.
    pub http_in: AtomicU64,
    /// Measures accepted over AMQP.
    pub amqp_in: AtomicU64,
    /// Measures confirmed by the federation broker.
    pub measures_out: AtomicU64,
    /// Measures dropped because the buffer was full (or at shutdown).
    pub dropped: AtomicU64,
    /// Measures waiting for the federation broker.
    pub buffered: AtomicU64,
    /// Whether the federation publisher is connected.
    pub federation_up: AtomicBool,
    /// Whether the MQTT client is connected.
    pub mqtt_up: AtomicBool,
    /// Whether the gateway's I/O thread (MQTT, AMQP south, federation) runs.
    pub io_running: AtomicBool,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Count an error of `kind`.
    pub fn error(&self, kind: &str) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(kind.to_owned()).or_default() += 1;
    }

    /// Errors by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn inc(&self, t: Transport, n: u64) {
        let c = match t {
            Transport::Mqtt => &self.mqtt_in,
            Transport::Http => &self.http_in,
            Transport::Amqp => &self.amqp_in,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as status JSON.
    pub fn snapshot(&self, devices: usize) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "devices": devices,
            "measures_in": {"mqtt": get(&self.mqtt_in), "http": get(&self.http_in), "amqp": get(&self.amqp_in)},
            "measures_out": get(&self.measures_out),
            "dropped": get(&self.dropped),
            "buffered": get(&self.buffered),
            "errors": self.errors(),
        })
    }
}

/// A measure body as it arrived.
#[derive(Debug)]
pub enum Payload {
    /// A JSON object or array of objects.
    Json(Value),
    /// One attribute's value (`…/attrs/{attr}`).
    Single(String, Value),
}

/// The state shared by one gateway's tasks.
pub struct Core {
    /// The gateway's uuid.
    pub gateway: Uuid,
    /// The realm in federation routing keys.
    pub realm: String,
    /// Settings.
    pub settings: Settings,
    /// Groups and devices.
    pub registry: registry::Registry,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Whether south traffic is accepted (the gateway is running).
    pub running: watch::Sender<bool>,
    /// The MQTT client's link, watched by the gateway's driver so that a
    /// broker it cannot reach shows in the gateway's state.
    pub mqtt_link: watch::Sender<MqttLink>,
    /// The level `/admin/log` reports.
    pub log_level: Mutex<String>,
    /// Which refusals were logged lately (see [`Quiet`]).
    pub quiet: Quiet,
    /// The Context Broker sender's counters.
    pub cb_counters: Arc<cb::CbCounters>,
    /// Live viewers of measures (`/api/v1/events`); the daemon's hub once
    /// the agent runs.
    pub events: crate::events::Hub,
    /// The command ledger.
    pub commands: commands::Ledger,
    outbox: mpsc::Sender<federation::Envelope>,
    /// Towards the Context Broker sender (set when the agent starts it).
    ngsi: std::sync::OnceLock<mpsc::Sender<ngsi::Request>>,
    /// Towards the MQTT client: ids of commands to publish (set when the
    /// agent starts it).
    pub(crate) mqtt_out: std::sync::OnceLock<mpsc::UnboundedSender<MqttOut>>,
    /// Towards the AMQP south session: ids of commands to publish.
    pub(crate) amqp_out: std::sync::OnceLock<mpsc::UnboundedSender<Uuid>>,
    /// The north API's URL, once it listens.
    north_url: std::sync::OnceLock<String>,
    /// Configuration requests over MQTT being answered (each waits on the
    /// Context Broker off the MQTT loop): at most [`CONFIG_REQUESTS`].
    pub(crate) config_slots: Arc<tokio::sync::Semaphore>,
}

/// Most MQTT configuration requests answered at once per gateway; more are
/// dropped and counted (`configuration_busy`), so a device flooding them
/// cannot pile up tasks and Context Broker reads.
pub const CONFIG_REQUESTS: usize = 64;

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("gateway", &self.gateway).finish_non_exhaustive()
    }
}

/// Log a kind of refusal once per interval per source (an apikey): the
/// counters say how many there were. Bounded: past [`Quiet::MAX`] sources
/// it forgets them all, which costs at most one more line each.
#[derive(Debug, Default)]
pub struct Quiet(Mutex<std::collections::HashMap<(&'static str, String), std::time::Instant>>);

impl Quiet {
    /// How long a logged refusal keeps its kind and source quiet.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
    /// Most (kind, source) pairs remembered.
    pub const MAX: usize = 4096;

    /// Whether a refusal of `kind` from `source` should be logged now.
    pub fn first(&self, kind: &'static str, source: &str) -> bool {
        let now = std::time::Instant::now();
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = seen.get(&(kind, source.to_owned()))
            && now.duration_since(*at) < Self::INTERVAL
        {
            return false;
        }
        if seen.len() >= Self::MAX {
            seen.clear();
        }
        seen.insert((kind, source.to_owned()), now);
        true
    }
}

/// Give memory freed by a bulk operation (thousands of devices provisioned,
/// loaded or bound) back to the system: glibc keeps freed heap otherwise.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Why a southbound measure was not taken. The same on every transport:
/// HTTP answers it (see `south::http_error`), MQTT and AMQP count and log
/// it; each kind has its metric label.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The gateway is stopped.
    #[error("The gateway is stopped and accepts no measures")]
    Stopped,
    /// The gateway is going away.
    #[error("The gateway is shutting down")]
    ShuttingDown,
    /// No such device, and its group does not autoprovision.
    #[error("No device was found with id:{0}")]
    UnknownDevice(String),
    /// No group or device has this apikey.
    #[error("Couldn't find device group for apikey {0}")]
    UnknownApikey(String),
    /// The body is not a measure of the device.
    #[error(transparent)]
    Measure(#[from] mapping::MeasureError),
    /// The federation routing key would be longer than AMQP allows.
    #[error("the federation routing key would be {0} bytes, more than {max}", max = federation::MAX_ROUTING_KEY)]
    RoutingKeyTooLong(usize),
    /// Autoprovisioning refused the device (the provisioning API's rules).
    #[error("{}", .0.message)]
    Autoprovision(ApiError),
}

impl IngestError {
    /// The metric label (`counters.errors.<label>` in the gateway status).
    pub fn metric_label(&self) -> &'static str {
        match self {
            IngestError::Stopped | IngestError::ShuttingDown => "gateway_stopped",
            IngestError::UnknownDevice(_) => "device_not_found",
            IngestError::UnknownApikey(_) => "device_group_not_found",
            IngestError::Measure(mapping::MeasureError::Payload(_)) => "bad_payload",
            IngestError::Measure(mapping::MeasureError::Timestamp(_)) => "bad_timestamp",
            IngestError::RoutingKeyTooLong(_) => "id_too_long",
            IngestError::Autoprovision(_) => "autoprovision_refused",
        }
    }
}

impl crate::metrics::GatewaySource for Core {
    fn snapshot(&self) -> crate::metrics::GatewaySnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::metrics::GatewaySnapshot {
            gateway: self.gateway.to_string(),
            devices: self.registry.device_count() as u64,
            measures_in: [get(&c.mqtt_in), get(&c.http_in), get(&c.amqp_in)],
            measures_out: get(&c.measures_out),
            dropped: get(&c.dropped),
            buffered: get(&c.buffered),
            errors: c.errors(),
            ready: *self.running.borrow(),
            mqtt_connected: c.mqtt_up.load(Ordering::Relaxed),
            federation_connected: c.federation_up.load(Ordering::Relaxed),
        }
    }
}

impl Core {
    /// The state the gateway's tasks and routers share: its `registry`,
    /// fresh counters, and `outbox` towards the federation publisher.
    /// `Agent::start` builds one; router tests build one without brokers.
    pub fn new(
        gateway: Uuid,
        realm: String,
        settings: Settings,
        registry: registry::Registry,
        outbox: mpsc::Sender<federation::Envelope>,
        running: bool,
    ) -> Core {
        let commands = commands::Ledger::load(gateway, registry.store().clone()).unwrap_or_else(|e| {
            // Not fatal for measures; the commands it could not read stay in
            // the store untouched (changes are written by id).
            tracing::error!(error = %e, "cannot load the command ledger; starting with an empty one");
            commands::Ledger::empty(gateway, registry.store().clone())
        });
        Core {
            gateway,
            realm,
            settings,
            registry,
            counters: Arc::new(Counters::default()),
            running: watch::Sender::new(running),
            mqtt_link: watch::Sender::new(MqttLink::Connecting),
            log_level: Mutex::new("INFO".into()),
            quiet: Quiet::default(),
            cb_counters: Arc::default(),
            events: crate::events::Hub::default(),
            commands,
            outbox,
            ngsi: std::sync::OnceLock::new(),
            mqtt_out: std::sync::OnceLock::new(),
            amqp_out: std::sync::OnceLock::new(),
            north_url: std::sync::OnceLock::new(),
            config_slots: Arc::new(tokio::sync::Semaphore::new(CONFIG_REQUESTS)),
        }
    }

    /// Queue a request for the Context Broker sender (dropped and counted
    /// when its channel is full; before the sender runs, dropped).
    pub fn send_ngsi(&self, req: ngsi::Request) {
        if let Some(tx) = self.ngsi.get()
            && tx.try_send(req).is_err()
        {
            self.cb_counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether busbar may send to device endpoint `url`: an `http(s)` URL
    /// whose host (or `host:port`) is in `endpoint_allow`, when that is
    /// set. The reason when not.
    pub fn endpoint_allowed(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid endpoint: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("endpoint scheme {} is not http or https", parsed.scheme()));
        }
        let Some(allow) = &self.settings.endpoint_allow else { return Ok(()) };
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let with_port = parsed.port_or_known_default().map(|p| format!("{host}:{p}")).unwrap_or_else(|| host.clone());
        if allow.iter().any(|a| *a == host || *a == with_port) {
            return Ok(());
        }
        Err(format!("endpoint host {with_port} is not in the gateway's endpoint_allow"))
    }

    /// The URL the Context Broker forwards commands to: `provider_url`, or
    /// the north listener's.
    pub fn provider_url(&self) -> String {
        self.settings
            .provider_url
            .clone()
            .or_else(|| self.north_url.get().cloned())
            .unwrap_or_else(|| format!("http://{}", self.settings.north_bind))
    }

    /// Whether the north API may serve `service`.
    pub fn serves(&self, service: &str) -> bool {
        self.settings.services.is_empty() || self.settings.services.iter().any(|s| s == service)
    }

    /// Take one southbound measure: resolve the device (autoprovisioning
    /// if its group allows), map it, update the device's last values and
    /// hand every resulting message to the federation (waiting if it is
    /// saturated). Returns how many measures it held.
    pub async fn ingest(
        &self,
        transport: Transport,
        addr: &Address,
        payload: Payload,
        t: Option<&str>,
    ) -> Result<usize, IngestError> {
        let counters = &self.counters;
        self.ingest_inner(transport, addr, payload, t).await.inspect_err(|e| counters.error(e.metric_label()))
    }

    async fn ingest_inner(
        &self,
        transport: Transport,
        addr: &Address,
        payload: Payload,
        t: Option<&str>,
    ) -> Result<usize, IngestError> {
        if !*self.running.borrow() {
            return Err(IngestError::Stopped);
        }
        let resolved = match self.registry.resolve(addr).await {
            Err(e @ IngestError::UnknownApikey(_)) if self.settings.dojot => {
                // `/{tenant}/{device}/attrs` (dojot, Mosca) reads like an apikey topic.
                match addr {
                    Address::Apikey { apikey, device_id, attr: None } => {
                        let dojot = Address::Dojot { tenant: apikey.clone(), device_id: device_id.clone() };
                        self.registry.resolve(&dojot).await.map_err(|_| e)?
                    }
                    _ => return Err(e),
                }
            }
            other => other?,
        };
        let body = match payload {
            Payload::Json(v) => v,
            Payload::Single(attr, value) => json!({ attr: value }),
        };
        let device = &resolved.record.device;
        let group = resolved.group.as_deref();
        let measures = mapping::map_measures(&body, device, group, t, now_ms())?;
        let entity_type = device.entity_type(group);
        let entity_name = device.entity_name(group);
        let origin = Origin {
            tenant: &resolved.record.tenant,
            device_id: &device.device_id,
            entity_name: &entity_name,
            entity_type,
            gateway: self.gateway,
            realm: &self.realm,
        };
        let routing_key = origin.routing_key();
        // The Context Broker, when one applies: queued, never waited on.
        if let Some(to) = ngsi::cbroker_of(device, group, self.settings.cbroker.as_deref()) {
            let timestamp = ngsi::timestamp_of(device, group, self.settings.timestamp);
            if let Some(req) = ngsi::request(&measures, device, group, &resolved.record.tenant, to, timestamp) {
                self.send_ngsi(req);
            }
        }
        let topic = self.events.watched().then(|| {
            let t = &resolved.record.tenant;
            crate::events::data_topic(&self.realm, &t.service, entity_type, &device.device_id)
        });
        for m in &measures {
            let body = origin.device_data(m);
            if let Some(topic) = &topic {
                self.events.publish(topic.clone(), &body);
            }
            let envelope = federation::Envelope::new(&routing_key, body)?;
            if self.outbox.send(envelope).await.is_err() {
                return Err(IngestError::ShuttingDown);
            }
        }
        let count = measures.len();
        if self.settings.dojot {
            commands::dojot_results(self, &resolved, &measures).await;
        }
        {
            let mut last = resolved.record.last.lock().unwrap_or_else(|p| p.into_inner());
            for m in measures {
                for (name, (kind, value)) in m.attrs {
                    last.insert(name, (kind, value, m.timestamp_ms));
                }
            }
        }
        self.counters.inc(transport, count as u64);
        Ok(count)
    }
}

/// A running gateway agent. Dropping it stops every task.
pub struct Agent {
    /// The shared state.
    pub core: Arc<Core>,
    /// Where the provisioning API listens.
    pub north_addr: SocketAddr,
    /// Where the HTTP southbound listens.
    pub south_addr: SocketAddr,
    token: CancellationToken,
    announce: mpsc::UnboundedSender<devices::Announce>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("north", &self.north_addr).field("south", &self.south_addr).finish()
    }
}

impl Agent {
    /// Load the registry, bind the listeners and start every task of the
    /// gateway `gateway` (realm `realm`, properties `props`).
    pub async fn start(
        env: &Arc<Env>,
        gateway: Uuid,
        realm: Option<String>,
        props: &Map<String, Value>,
    ) -> Result<Agent, ErrorInfo> {
        let settings = Settings::from_properties(props)?;
        let token = env.shutdown.child_token();
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        let realm = realm.unwrap_or_else(|| "busbar".into());
        let registry = registry::Registry::load(gateway, &realm, env.store.clone(), changes_tx)
            .map_err(|e| ErrorInfo::new(format!("Cannot load the device registry: {}", e.message)))?;
        let (outbox, outbox_rx) = mpsc::channel(4096);
        let autostart = props.get("autostart").and_then(Value::as_bool).unwrap_or(true);
        let mut core = Core::new(gateway, realm, settings.clone(), registry, outbox, autostart);
        core.events = env.events.clone();
        let core = Arc::new(core);
        let counters = core.counters.clone();
        let source: Arc<dyn crate::metrics::GatewaySource> = core.clone();
        env.metrics.add_gateway(Arc::downgrade(&source));
        let span = tracing::info_span!("gateway", gateway = %gateway);
        let listen = async |addr| {
            crate::serve::bind(addr)
                .await
                .map_err(|e| ErrorInfo::new(format!("Cannot listen on {}: {}", e.addr, e.source)))
        };
        let gate = match &settings.north_auth {
            Some(crate::auth::AuthConfig::Jwt(jwt)) => {
                crate::auth::Verifier::load(jwt, "north_auth.jwt", &env.settings.instance)
                    .map(crate::auth::Gate::jwt)
                    .map_err(|e| ErrorInfo::new(e.to_string()).with("property", "north_auth"))?
            }
            _ => crate::auth::Gate::open(),
        };
        let north = listen(settings.north_bind).await?;
        let south = listen(settings.south_bind).await?;
        let (north_addr, south_addr) = (north.local_addr().ok(), south.local_addr().ok());
        if let Some(a) = north_addr {
            let _ = core.north_url.set(format!("http://{a}"));
        }
        let (mqtt_out, mqtt_out_rx) = mpsc::unbounded_channel();
        let _ = core.mqtt_out.set(mqtt_out);
        let (amqp_out, amqp_out_rx) = mpsc::unbounded_channel();
        let _ = core.amqp_out.set(amqp_out);
        let t = &env.tracker;
        {
            let _span = span.enter();
            let observe = |server| crate::serve::Observe::new(server, &env.metrics);
            crate::serve::spawn(
                t,
                north,
                north::router(core.clone())
                    .layer(axum::middleware::from_fn_with_state(gate, crate::auth::require_by_method)),
                token.clone(),
                settings.limits,
                observe("north"),
            );
            let south_router = south::http_router(core.clone());
            crate::serve::spawn(t, south, south_router, token.clone(), settings.limits, observe("south"));
        }
        let fed = federation::Target {
            url: env.settings.broker_url.clone(),
            exchange: settings.federation_exchange.clone(),
            buffer: settings.buffer,
            name: format!("busbar federation gateway={gateway}"),
        };
        // The measure path (MQTT and AMQP in, federation out) runs on a thread
        // of its own, so a measure is not handed between the daemon's worker
        // threads on its way (BENCHMARKS.md, IoT series 1, run 5: 34–38 µs of
        // CPU per measure instead of 38–45).
        type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let mut hot: Vec<Task> =
            vec![Box::pin(federation::run(fed, outbox_rx, counters.clone(), token.clone()).instrument(span.clone()))];
        if let Some(url) = &settings.mqtt_url {
            hot.push(Box::pin(
                south::mqtt(core.clone(), url.clone(), mqtt_out_rx, token.clone()).instrument(span.clone()),
            ));
        }
        if let Some(exchange) = &settings.amqp_south_exchange {
            let url = env.settings.broker_url.clone();
            hot.push(Box::pin(
                south::amqp(core.clone(), url, exchange.clone(), amqp_out_rx, token.clone()).instrument(span.clone()),
            ));
        }
        let hot = t.track_future(futures_util::future::join_all(hot));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ErrorInfo::new(format!("Cannot start the gateway's runtime: {e}")))?;
        counters.io_running.store(true, Ordering::Relaxed);
        let io_counters = counters.clone();
        let io_token = token.clone();
        std::thread::Builder::new()
            .name("gateway-io".into())
            .spawn(move || {
                // Each loop catches its own panics per message; this is the
                // last line: a thread that ends while the gateway should run
                // is reported (status io_running, /api/v1/health), and
                // `reset` starts a new one.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(hot)));
                io_counters.io_running.store(false, Ordering::Relaxed);
                if let Err(panic) = outcome {
                    io_counters.error("panic");
                    tracing::error!(panic = %crate::supervise::panic_message(panic), "the gateway's I/O thread panicked");
                } else if !io_token.is_cancelled() {
                    tracing::error!("the gateway's I/O thread ended while the gateway runs");
                }
            })
            .map_err(|e| ErrorInfo::new(format!("Cannot start the gateway's thread: {e}")))?;
        // The Context Broker sender: its queue is in the store, so what a
        // Context Broker that is down did not take survives a restart.
        let (ngsi_tx, ngsi_rx) = mpsc::channel(4096);
        let _ = core.ngsi.set(ngsi_tx);
        t.spawn(
            cb::run(
                env.store.clone(),
                gateway,
                ngsi_rx,
                settings.cbroker_queue,
                core.cb_counters.clone(),
                token.clone(),
            )
            .instrument(span.clone()),
        );
        t.spawn(commands::run(core.clone(), token.clone()).instrument(span.clone()));
        let (announce, announce_rx) = mpsc::unbounded_channel();
        t.spawn(devices::run(env.clone(), core.clone(), changes_rx, announce_rx, token.clone()).instrument(span));
        let unknown = || "0.0.0.0:0".parse().expect("a literal address");
        Ok(Agent {
            core,
            north_addr: north_addr.unwrap_or_else(unknown),
            south_addr: south_addr.unwrap_or_else(unknown),
            token,
            announce,
        })
    }

    /// Accept (true) or refuse (false) south traffic; MQTT unsubscribes
    /// while refused.
    pub fn set_running(&self, on: bool) {
        self.core.running.send_replace(on);
        let _ = self.announce.send(devices::Announce::All);
    }

    /// Publish `gone` for every device and stop (the gateway is deleted).
    pub async fn remove(self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.announce.send(devices::Announce::Gone(tx)).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), rx).await;
        }
    }

    /// The gateway's live status fields.
    pub fn status(&self) -> Map<String, Value> {
        let c = &self.core.counters;
        let mut m = Map::new();
        m.insert("counters".into(), c.snapshot(self.core.registry.device_count()));
        m.insert("north_url".into(), format!("http://{}", self.north_addr).into());
        m.insert("south_url".into(), format!("http://{}{}", self.south_addr, self.core.settings.resource).into());
        // null when MQTT is off for this gateway (`mqtt_url: ""`).
        let mqtt = self.core.settings.mqtt_url.as_ref().map(|_| c.mqtt_up.load(Ordering::Relaxed));
        m.insert("mqtt_connected".into(), mqtt.map_or(Value::Null, Value::Bool));
        m.insert("federation_connected".into(), c.federation_up.load(Ordering::Relaxed).into());
        m.insert("io_running".into(), c.io_running.load(Ordering::Relaxed).into());
        if self.core.settings.cbroker.is_some() || self.core.cb_counters.sent.load(Ordering::Relaxed) > 0 {
            m.insert("cbroker".into(), self.core.cb_counters.snapshot());
        }
        m.insert("commands".into(), self.core.commands.counters.snapshot(self.core.commands.open_count()));
        m
    }

    /// The status envelope of device `uuid` of this gateway, as its device
    /// component publishes it on the bus.
    pub fn device_status(&self, uuid: Uuid, info: &crate::protocol::DaemonInfo) -> Option<Value> {
        let r = self.core.registry.device_by_uuid(uuid)?;
        let d = devices::describe(&self.core, &r);
        Some(d.view(&self.core, None).render(info))
    }

    /// The MQTT client's link; `None` when MQTT is off for this gateway.
    pub fn mqtt_link(&self) -> Option<watch::Receiver<MqttLink>> {
        self.core.settings.mqtt_url.as_ref().map(|_| self.core.mqtt_link.subscribe())
    }

    /// Whether the I/O thread has ended (a bug); `reset` starts a new agent.
    pub fn io_dead(&self) -> bool {
        !self.core.counters.io_running.load(Ordering::Relaxed) && !self.token.is_cancelled()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_and_tls_files_are_checked_when_the_gateway_starts() {
        let props = |v: Value| v.as_object().unwrap().clone();
        let err = |v: Value| Settings::from_properties(&props(v)).unwrap_err().msg().to_owned();
        assert!(err(json!({"mqtt_url": "ws://b:1"})).starts_with("Unsupported MQTT URL"), "only mqtt:// and mqtts://");
        assert!(!err(json!({"mqtt_url": "ws://u:secret@b"})).contains("secret"), "no password in the message");
        assert_eq!(err(json!({"mqtt_ca": "/x.pem"})), "mqtt_ca needs an mqtts:// mqtt_url");
        assert!(
            err(json!({"mqtt_url": "mqtts://b", "mqtt_ca": "/nonexistent.pem"})).starts_with("Cannot read mqtt_ca")
        );
        assert!(err(json!({"mqtt_url": "mqtt://host:notaport"})).starts_with("Invalid MQTT URL"));
        let garbage = std::env::temp_dir().join(format!("busbar-not-a-ca-{}.pem", std::process::id()));
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = err(json!({"mqtt_url": "mqtts://b", "mqtt_ca": garbage}));
        let _ = std::fs::remove_file(&garbage);
        assert!(e.starts_with("MQTT TLS: "), "{e}");
    }

    #[test]
    fn a_refusal_is_logged_once_per_interval_per_kind_and_source() {
        let q = Quiet::default();
        assert!(q.first("device_group_not_found", "k1"));
        assert!(!q.first("device_group_not_found", "k1"), "the same again: counted only");
        assert!(q.first("device_group_not_found", "k2"), "another apikey");
        assert!(q.first("bad_payload", "k1"), "another kind");
    }
}
