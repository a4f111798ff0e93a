//! What every component has whatever its driver: identity, properties, the
//! lifecycle and the status fields. Drivers change it only through [`Cx`],
//! whose entry points are the table's edges ([`Cx::begin`], [`Cx::go`]),
//! the declared observed edges ([`Cx::observe`]) and a driver rule's
//! [`Reaction`] ([`Cx::react`]); each entered state is kept in the trail,
//! so the component task publishes every state in order.

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::sync::Arc;
use tracing::warn;
use uuid::Uuid;

use crate::component::Env;
use crate::metrics::Fault;
use crate::protocol::{ErrorInfo, RoutingKeys};
use crate::react::Reaction;
use crate::state::{Action, Lifecycle, Observed, State};

/// The driver-independent state of one component.
pub(crate) struct Core {
    /// Routing headers (shared with the handle and the bus).
    pub keys: Arc<RoutingKeys>,
    /// The managing component, if any.
    pub managed_by: Option<Uuid>,
    /// Published properties (secrets redacted).
    pub properties: Map<String, Value>,
    /// Properties whose published value is redacted (URLs with a
    /// password), as given: only drivers see them.
    secrets: Map<String, Value>,
    lifecycle: Lifecycle,
    /// The error shown in `status.error` until the next accepted action.
    pub error: Option<ErrorInfo>,
    /// `status.model` / `status.results` of simulators (redacted).
    pub model: Value,
    pub results: Value,
    /// Driver-specific `status` fields.
    pub extra: Map<String, Value>,
    /// States entered since the last publish, in order.
    trail: Vec<(State, f64)>,
    /// When the current state was entered (Unix seconds).
    pub(super) since: f64,
    /// The current state, readable without asking the task (the handle
    /// holds a clone: the controller counts states, the API lists them).
    pub(super) mirror: Arc<std::sync::atomic::AtomicU8>,
    /// What the driver asked of the daemon during the current action.
    requests: Vec<Request>,
}

/// What a driver asks the daemon to do (a manager's create and delete).
/// Drivers never reach the daemon's registry; the component task carries
/// requests out once the action is accepted, before it answers.
#[derive(Debug)]
pub(crate) enum Request {
    /// Start, register and route a new component managed by this one.
    Spawn(Box<Spawn>),
    /// Unroute and stop a component (it publishes `gone`).
    Remove(Uuid),
}

/// A component to start.
#[derive(Debug)]
pub(crate) struct Spawn {
    pub spec: crate::config::ComponentSpec,
    pub kind: Arc<crate::component::kinds::Kind>,
    pub uuid: Uuid,
    /// An event the new component gets first (a gateway's node listing,
    /// so it shows the node's state from its first status).
    pub first: Option<super::driver::Event>,
}

impl Core {
    /// A new component in `idle`; URL passwords in `properties` are kept
    /// for the driver and published redacted.
    pub(super) fn new(keys: Arc<RoutingKeys>, managed_by: Option<Uuid>, mut properties: Map<String, Value>) -> Self {
        let secrets = split_secrets(&mut properties);
        Core {
            keys,
            managed_by,
            properties,
            secrets,
            lifecycle: Lifecycle::default(),
            error: None,
            model: Value::Null,
            results: Value::Null,
            extra: Map::new(),
            trail: Vec::new(),
            since: unix_now(),
            mirror: Arc::new(std::sync::atomic::AtomicU8::new(State::Idle.index())),
            requests: Vec::new(),
        }
    }

    pub fn state(&self) -> State {
        self.lifecycle.state()
    }

    /// The properties as configured, secrets included: for drivers only,
    /// never for status messages.
    pub fn driver_properties(&self) -> Cow<'_, Map<String, Value>> {
        if self.secrets.is_empty() {
            return Cow::Borrowed(&self.properties);
        }
        let mut p = self.properties.clone();
        p.extend(self.secrets.clone());
        Cow::Owned(p)
    }

    /// The states entered since the last call, in order.
    pub(super) fn take_trail(&mut self) -> Vec<(State, f64)> {
        std::mem::take(&mut self.trail)
    }

    /// What the driver asked of the daemon since the last call.
    pub(super) fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    /// `category/type`, for messages.
    pub fn kind_name(&self) -> String {
        format!("{}/{}", self.keys.category, self.keys.kind)
    }
}

/// A driver's view of its component: the core, and the daemon's services.
pub(crate) struct Cx<'a> {
    pub core: &'a mut Core,
    pub env: &'a Arc<Env>,
}

impl Cx<'_> {
    /// Ask the daemon for `request` once the action is accepted.
    pub fn request(&mut self, request: Request) {
        self.core.requests.push(request);
    }

    /// Enter the transient state of `action` (counting a refused
    /// transition) and clear the previous error.
    pub fn begin(&mut self, action: Action) -> Result<(), ErrorInfo> {
        let from = self.core.lifecycle.state();
        let to = self.core.lifecycle.begin(action).map_err(|e| {
            self.env.metrics.error(Fault::InvalidTransition);
            ErrorInfo::from(&e)
        })?;
        if to != from || action.entry_state().is_some() {
            self.entered(from, to);
        }
        self.core.error = None;
        Ok(())
    }

    /// Take a table edge (the one checked entry for driver decisions); a
    /// refused edge changes nothing, is counted and logged, and returns
    /// `false`.
    pub fn go(&mut self, to: State) -> bool {
        let from = self.core.lifecycle.state();
        match self.core.lifecycle.advance(to) {
            Ok(_) => {
                self.entered(from, to);
                true
            }
            Err(e) => {
                self.env.metrics.error(Fault::InvalidTransition);
                warn!(component = %self.core.keys.uuid, error = ?e, "a driver asked for a transition the table does not allow");
                false
            }
        }
    }

    /// Take a declared observed edge (adoption, failure, deletion).
    pub fn observe(&mut self, why: Observed, to: State) -> bool {
        let from = self.core.lifecycle.state();
        match self.core.lifecycle.observe(why, to) {
            Ok(_) => {
                self.entered(from, to);
                true
            }
            Err(e) => {
                self.env.metrics.error(Fault::InvalidTransition);
                warn!(component = %self.core.keys.uuid, error = ?e, ?why, "an observed transition was refused");
                false
            }
        }
    }

    fn entered(&mut self, from: State, to: State) {
        self.env.metrics.state_change(Some(from.as_str()), Some(to.as_str()));
        self.core.since = unix_now();
        self.core.trail.push((to, self.core.since));
        self.core.mirror.store(to.index(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Apply a driver's [`Reaction`] (see `react.rs`); `failure` says why
    /// if it fails. Returns whether the state changed; the caller publishes.
    pub fn react(&mut self, r: Reaction, failure: impl FnOnce() -> ErrorInfo) -> bool {
        match r {
            Reaction::Stay | Reaction::Kill => false,
            Reaction::Path(path) => path.iter().all(|&to| self.go(to)),
            Reaction::Observe(why, to) => self.observe(why, to),
            Reaction::Fail => {
                self.enter_error(failure());
                true
            }
        }
    }

    /// Enter `error` with `info` ([`Observed::Failed`]); the caller
    /// publishes.
    pub fn enter_error(&mut self, info: ErrorInfo) {
        warn!(component = %self.core.keys.uuid, error = %info.msg(), "component error");
        self.observe(Observed::Failed, State::Error);
        self.core.error = Some(info);
    }

    /// Show the start's `model` and `results` in the status, without
    /// tokens or URL passwords.
    pub fn show_transfers(&mut self, payload: &Map<String, Value>) {
        let shown = |k: &str| payload.get(k).map_or(Value::Null, crate::sandbox::redact_transfer);
        self.core.model = shown("model");
        self.core.results = shown("results");
    }
}

/// Split off the properties that must not be published: URLs with a
/// password (`mqtt://user:secret@host`) are published redacted, and kept as
/// given for the drivers.
fn split_secrets(p: &mut Map<String, Value>) -> Map<String, Value> {
    let mut secrets = Map::new();
    for (k, v) in p.iter_mut() {
        if let Value::String(s) = v {
            let shown = crate::config::redact_url(s);
            if shown != *s {
                secrets.insert(k.clone(), std::mem::replace(v, Value::String(shown)));
            }
        }
    }
    secrets
}

/// Now, in Unix seconds with microseconds (the wall clock: `since` is
/// compared across daemons, whose clocks the controllers' offsets relate).
fn unix_now() -> f64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    (t * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_with_a_password_are_published_redacted_and_kept_for_drivers() {
        let mut p = json!({"mqtt_url": "mqtt://lab:s3cret@broker:1883", "api_url": "http://host/api", "n": 1})
            .as_object()
            .unwrap()
            .clone();
        let secrets = split_secrets(&mut p);
        assert_eq!(p["mqtt_url"], "mqtt://lab:***@broker:1883");
        assert_eq!(p["api_url"], "http://host/api");
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets["mqtt_url"], "mqtt://lab:s3cret@broker:1883");
    }
}
