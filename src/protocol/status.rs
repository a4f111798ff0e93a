//! The status envelope that VILLASweb reads:
//! `{[model, results | components], status:{state, version, uptime, host,
//! kernel, managed_by?, error?, …}, properties:{…}, schema:{start?, create?}}`.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value, json};
use std::time::Instant;
use uuid::Uuid;

use crate::state::State;

/// Facts about the daemon that every status carries.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// `status.version`: busbar's version.
    pub version: &'static str,
    /// When the daemon started (`status.uptime` counts from here).
    pub started: Instant,
    /// `status.host`.
    pub host: String,
    /// `status.kernel`: the five `uname` fields.
    pub kernel: Value,
}

impl DaemonInfo {
    /// Read host name and `uname` of this machine.
    pub fn detect() -> Self {
        let (host, kernel) = match nix::sys::utsname::uname() {
            Ok(u) => {
                let s = |o: &std::ffi::OsStr| o.to_string_lossy().into_owned();
                (
                    s(u.nodename()),
                    json!({
                        "sysname": s(u.sysname()),
                        "nodename": s(u.nodename()),
                        "release": s(u.release()),
                        "version": s(u.version()),
                        "machine": s(u.machine()),
                    }),
                )
            }
            Err(_) => ("unknown".to_owned(), json!({})),
        };
        Self { version: env!("CARGO_PKG_VERSION"), started: Instant::now(), host, kernel }
    }

    /// Seconds since the daemon started.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The daemon part of `GET /api/v1`: `{version, uptime, host, kernel}`.
    pub fn summary(&self) -> Value {
        json!({
            "version": self.version,
            "uptime": self.uptime(),
            "host": self.host,
            "kernel": self.kernel,
        })
    }
}

/// `status.error`: a message plus details, e.g.
/// `{"msg": "Invalid state transition", "current": "idle", "next": "stopping"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorInfo(pub Map<String, Value>);

impl ErrorInfo {
    /// An error with just a message.
    pub fn new(msg: impl Into<String>) -> Self {
        let mut m = Map::new();
        m.insert("msg".into(), Value::String(msg.into()));
        Self(m)
    }

    /// Add a detail field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// The message.
    pub fn msg(&self) -> &str {
        self.0.get("msg").and_then(Value::as_str).unwrap_or_default()
    }
}

impl From<&crate::state::TransitionError> for ErrorInfo {
    fn from(e: &crate::state::TransitionError) -> Self {
        use crate::state::TransitionError as T;
        let info = ErrorInfo::new(e.to_string());
        match e {
            T::Invalid { current, next } => {
                // The message stays VILLAScontroller's; the way out is added.
                let allowed: Vec<&str> = crate::state::Action::ALL
                    .into_iter()
                    .filter(|a| a.entry_state().is_some())
                    .filter(|a| crate::state::Lifecycle::new(*current).begin(*a).is_ok())
                    .map(crate::state::Action::as_str)
                    .collect();
                let hint = format!("from {current}, send one of: {}", allowed.join(", "));
                info.with("current", current.as_str())
                    .with("next", next.as_str())
                    .with("allowed", allowed)
                    .with("hint", hint)
            }
            T::UnknownAction(a) => info.with("action", a.as_str()),
            T::Unsupported { action, kind } => info.with("action", action.as_str()).with("type", kind.as_str()),
        }
    }
}

impl From<&super::Rejection> for ErrorInfo {
    fn from(r: &super::Rejection) -> Self {
        ErrorInfo::new(r.to_string()).with("kind", r.kind())
    }
}

/// What a category adds before `status` in the envelope.
#[derive(Debug, Clone)]
pub enum Prefix<'a> {
    /// Simulators: the last start payload's `model` and `results`.
    Simulator {
        /// `model`, or null.
        model: &'a Value,
        /// `results`, or null.
        results: &'a Value,
    },
    /// Managers: the uuids they manage.
    Manager {
        /// Managed component uuids.
        components: Vec<Uuid>,
    },
    /// Nothing (gateways, equipment).
    None,
}

/// Everything needed to render one status message.
#[derive(Debug, Clone)]
pub struct StatusView<'a> {
    /// Category-specific leading keys.
    pub prefix: Prefix<'a>,
    /// The current state.
    pub state: State,
    /// The owning manager, if any.
    pub managed_by: Option<Uuid>,
    /// The current error, if any.
    pub error: Option<&'a ErrorInfo>,
    /// When the state was entered, Unix seconds on the daemon's clock
    /// (`status.since`: what a coordinated start's skew is read from).
    pub since: Option<f64>,
    /// Extra `status` fields of the type (e.g. `return_code`).
    pub extra: &'a Map<String, Value>,
    /// `properties`.
    pub properties: &'a Map<String, Value>,
    /// `schema`, keyed `start` / `create`.
    pub schema: &'a Map<String, Value>,
}

impl StatusView<'_> {
    /// Render the envelope as a JSON value (HTTP API).
    pub fn render(&self, daemon: &DaemonInfo) -> Value {
        serde_json::to_value(Rendered(self, daemon)).unwrap_or(Value::Null)
    }

    /// Render the envelope straight to bytes, in the anchor's key order,
    /// without copying properties or schemas (the hot path of every reply).
    pub fn to_vec(&self, daemon: &DaemonInfo) -> Vec<u8> {
        serde_json::to_vec(&Rendered(self, daemon)).unwrap_or_default()
    }
}

struct Rendered<'a>(&'a StatusView<'a>, &'a DaemonInfo);

struct StatusPart<'a>(&'a StatusView<'a>, &'a DaemonInfo);

impl Serialize for StatusPart<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let (v, d) = (self.0, self.1);
        let mut m = ser.serialize_map(None)?;
        m.serialize_entry("state", v.state.as_str())?;
        m.serialize_entry("version", d.version)?;
        m.serialize_entry("uptime", &d.uptime())?;
        m.serialize_entry("host", &d.host)?;
        m.serialize_entry("kernel", &d.kernel)?;
        if let Some(u) = v.managed_by {
            m.serialize_entry("managed_by", &u)?;
        }
        if let Some(t) = v.since {
            m.serialize_entry("since", &t)?;
        }
        if let Some(e) = v.error {
            m.serialize_entry("error", &e.0)?;
        }
        for (k, x) in v.extra {
            m.serialize_entry(k, x)?;
        }
        m.end()
    }
}

impl Serialize for Rendered<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        let mut m = ser.serialize_map(None)?;
        match &v.prefix {
            Prefix::Simulator { model, results } => {
                m.serialize_entry("model", model)?;
                m.serialize_entry("results", results)?;
            }
            Prefix::Manager { components } => m.serialize_entry("components", components)?,
            Prefix::None => {}
        }
        m.serialize_entry("status", &StatusPart(v, self.1))?;
        m.serialize_entry("properties", v.properties)?;
        m.serialize_entry("schema", v.schema)?;
        m.end()
    }
}
