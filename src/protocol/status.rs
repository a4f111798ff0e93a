//! The status envelope that VILLASweb reads:
//! `{[model, results | components], status:{state, version, uptime, host,
//! kernel, managed_by?, error?, …}, properties:{…}, schema:{start?, create?}}`.

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
            T::Invalid { current, next } => info.with("current", current.as_str()).with("next", next.as_str()),
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
pub enum Prefix {
    /// Simulators: the last start payload's `model` and `results`.
    Simulator {
        /// `model`, or null.
        model: Value,
        /// `results`, or null.
        results: Value,
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
    pub prefix: Prefix,
    /// The current state.
    pub state: State,
    /// The owning manager, if any.
    pub managed_by: Option<Uuid>,
    /// The current error, if any.
    pub error: Option<&'a ErrorInfo>,
    /// Extra `status` fields of the type (e.g. `return_code`).
    pub extra: &'a Map<String, Value>,
    /// `properties`.
    pub properties: &'a Map<String, Value>,
    /// `schema`, keyed `start` / `create`.
    pub schema: &'a Map<String, Value>,
}

impl StatusView<'_> {
    /// Render the envelope in the anchor's key order.
    pub fn render(&self, daemon: &DaemonInfo) -> Value {
        let mut status = Map::new();
        status.insert("state".into(), self.state.as_str().into());
        status.insert("version".into(), daemon.version.into());
        status.insert("uptime".into(), daemon.uptime().into());
        status.insert("host".into(), daemon.host.clone().into());
        status.insert("kernel".into(), daemon.kernel.clone());
        if let Some(m) = self.managed_by {
            status.insert("managed_by".into(), m.to_string().into());
        }
        if let Some(e) = self.error {
            status.insert("error".into(), Value::Object(e.0.clone()));
        }
        for (k, v) in self.extra {
            status.insert(k.clone(), v.clone());
        }
        let mut env = Map::new();
        match &self.prefix {
            Prefix::Simulator { model, results } => {
                env.insert("model".into(), model.clone());
                env.insert("results".into(), results.clone());
            }
            Prefix::Manager { components } => {
                env.insert("components".into(), components.iter().map(|u| Value::String(u.to_string())).collect());
            }
            Prefix::None => {}
        }
        env.insert("status".into(), Value::Object(status));
        env.insert("properties".into(), Value::Object(self.properties.clone()));
        env.insert("schema".into(), Value::Object(self.schema.clone()));
        Value::Object(env)
    }
}
