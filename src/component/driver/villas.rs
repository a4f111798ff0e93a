//! `manager/villas-node`, `gateway/villas-node`, `manager/villas-relay` and
//! `gateway/villas-relay`: VILLASnode instances and VILLASrelays mirrored
//! as components, and gateway actions that reach VILLASnode.
//!
//! A manager owns a poll task (`poll_interval`, default 2 s; every request
//! with `timeout`, default 1 s) that reports each listing to the
//! component task. The manager turns a listing into its gateways
//! (`crate::villas::reconcile`): new uuids become gateway components
//! (`core::Request::Spawn`), vanished ones are removed (they say `gone`
//! once), and every gateway is told its node's current listing or that the
//! API is unreachable (`ComponentHandle::notify`). A slow or dead API
//! never blocks a component task: the HTTP requests run in the poll task
//! and, for actions, in the gateway's own task with a timeout.

use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

use super::{Driver, Event, Fut};
use crate::component::core::{Cx, Request, Spawn};
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::state::{Action, Observed, State, TransitionError};
use crate::villas::api::{Api, ApiError};
use crate::villas::reconcile;

/// Which upstream a manager or gateway mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavour {
    /// VILLASnode (REST API v2): nodes.
    Node,
    /// VILLASrelay: sessions.
    Relay,
}

/// What a manager's poll task or a manager tells a component.
#[derive(Debug)]
pub(crate) enum VillasEvent {
    /// A poll: the instance's status and its nodes (or sessions), or why
    /// the API could not be read.
    Polled(Result<(Value, Vec<Value>), String>),
    /// To a gateway: its node (or session) as last listed.
    Listed(Value),
    /// To a gateway: the API is unreachable.
    Unreachable(String),
}

fn settings(p: &Map<String, Value>) -> (Option<String>, Option<String>, Duration, Duration) {
    let secs = |k: &str, d: f64| {
        Duration::from_secs_f64(p.get(k).and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0).unwrap_or(d))
    };
    let text = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
    (text("api_url"), text("api_url_external"), secs("poll_interval", 2.0), secs("timeout", 1.0))
}

fn api_error(e: &ApiError) -> ErrorInfo {
    ErrorInfo::new(e.to_string())
}

/// A manager of VILLASnode nodes or VILLASrelay sessions.
pub(super) struct Manager {
    flavour: Flavour,
    api: Option<Api>,
    external: Option<String>,
    poll: Duration,
    /// The last listing, by uuid.
    known: HashMap<Uuid, Value>,
    rx: Option<mpsc::Receiver<VillasEvent>>,
    token: CancellationToken,
    /// The last poll failed: the next good one tells every gateway.
    recovering: bool,
}

impl Manager {
    pub(super) fn new(flavour: Flavour) -> Self {
        Manager {
            flavour,
            api: None,
            external: None,
            poll: Duration::from_secs(2),
            known: HashMap::new(),
            rx: None,
            token: CancellationToken::new(),
            recovering: false,
        }
    }

    fn gateway_kind(&self) -> &'static str {
        match self.flavour {
            Flavour::Node => "villas-node",
            Flavour::Relay => "villas-relay",
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// One poll: status and nodes (VILLASnode), or the relay's listing.
async fn poll_once(api: &Api, flavour: Flavour) -> Result<(Value, Vec<Value>), String> {
    match flavour {
        Flavour::Node => {
            let status = api.status().await.map_err(|e| e.to_string())?;
            let nodes = api.nodes().await.map_err(|e| e.to_string())?;
            Ok((status, nodes))
        }
        Flavour::Relay => {
            let mut v = api.relay().await.map_err(|e| e.to_string())?;
            let sessions = match v.get_mut("sessions").map(Value::take) {
                Some(Value::Array(s)) => s,
                _ => Vec::new(),
            };
            Ok((v, sessions))
        }
    }
}

impl Driver for Manager {
    fn started<'a>(&'a mut self, mut cx: Cx<'a>) -> Fut<'a, bool> {
        let (url, external, poll, timeout) = settings(&cx.core.properties);
        self.external = external;
        self.poll = poll;
        let api = match url.as_deref().map(|u| Api::new(u, timeout)) {
            Some(Ok(api)) => api,
            Some(Err(e)) => {
                cx.enter_error(api_error(&e));
                return Box::pin(async { true });
            }
            None => {
                cx.enter_error(ErrorInfo::new("api_url is required"));
                return Box::pin(async { true });
            }
        };
        let (tx, rx) = mpsc::channel(2);
        self.rx = Some(rx);
        let (flavour, token, period) = (self.flavour, self.token.child_token(), self.poll);
        let poller = api.clone();
        let shutdown = cx.env.shutdown.clone();
        cx.env.tracker.spawn(async move {
            loop {
                let result = tokio::select! {
                    r = poll_once(&poller, flavour) => r,
                    _ = token.cancelled() => break,
                    _ = shutdown.cancelled() => break,
                };
                if tx.send(VillasEvent::Polled(result)).await.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = token.cancelled() => break,
                    _ = shutdown.cancelled() => break,
                }
            }
        });
        self.api = Some(api);
        Box::pin(async { false })
    }

    fn act<'a>(
        &'a mut self,
        mut cx: Cx<'a>,
        action: Action,
        _req: &'a ActionRequest,
    ) -> Fut<'a, Result<(), ErrorInfo>> {
        Box::pin(async move {
            match (self.flavour, action, &self.api) {
                // VILLASnode restarts itself; the next poll after its short
                // down window shows it running again.
                (Flavour::Node, Action::Reset, Some(api)) => {
                    cx.begin(Action::Reset)?;
                    api.restart().await.map_err(|e| api_error(&e))?;
                    info!(component = %cx.core.keys.uuid, "VILLASnode restart requested");
                    Ok(())
                }
                (_, other, _) => {
                    cx.env.metrics.error(Fault::UnsupportedAction);
                    Err(ErrorInfo::from(&TransitionError::Unsupported { action: other, kind: cx.core.kind_name() }))
                }
            }
        })
    }

    fn next_event(&mut self) -> Fut<'_, Event> {
        Box::pin(async move {
            match self.rx.as_mut() {
                Some(rx) => match rx.recv().await {
                    Some(ev) => Event::Villas(ev),
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        })
    }

    /// A poll: publish only when something a reader cares about changed
    /// (the state, the nodes); VILLASnode's own figures (its clock) ride
    /// along with the next status.
    fn on_event(&mut self, mut cx: Cx<'_>, event: Event) -> bool {
        let Event::Villas(VillasEvent::Polled(result)) = event else { return false };
        match result {
            Ok((status, items)) => {
                let mut changed = false;
                if cx.core.state() != State::Running {
                    changed |= cx.observe(Observed::Mirrored, State::Running);
                }
                changed |= cx.core.error.take().is_some();
                let (key, count) = match self.flavour {
                    Flavour::Node => ("villas_node", "nodes"),
                    Flavour::Relay => ("villas_relay", "sessions"),
                };
                let shown = match self.flavour {
                    Flavour::Node => reconcile::instance_status(&status),
                    Flavour::Relay => status,
                };
                cx.core.extra.insert(key.into(), shown);
                changed |= cx.core.extra.insert(count.into(), items.len().into()) != Some(items.len().into());
                let diff = reconcile::diff(&mut self.known, &items);
                changed |= !diff.added.is_empty() || !diff.vanished.is_empty();
                let api_url = self.api.as_ref().map(|a| a.base().to_owned()).unwrap_or_default();
                let realm = cx.core.keys.realm.clone();
                // VILLASweb shows a gateway's location: the manager's.
                let location =
                    cx.core.properties.get("location").cloned().unwrap_or_else(|| cx.env.info.host.clone().into());
                for item in diff.added {
                    let mut props = match self.flavour {
                        Flavour::Node => {
                            reconcile::node_gateway(&item, &api_url, self.external.as_deref(), realm.as_deref())
                        }
                        Flavour::Relay => {
                            reconcile::relay_gateway(&item, &api_url, self.external.as_deref(), realm.as_deref())
                        }
                    };
                    props.entry("location").or_insert_with(|| location.clone());
                    let (Some(uuid), Ok(spec)) =
                        (reconcile::uuid_of(&item), crate::config::ComponentSpec::from_map(props))
                    else {
                        continue;
                    };
                    let Some(kind) = cx.env.kinds.lookup("gateway", self.gateway_kind()) else { continue };
                    if cx.env.components.lookup(uuid).is_some() {
                        continue;
                    }
                    debug!(component = %cx.core.keys.uuid, gateway = %uuid, "new gateway");
                    cx.request(Request::Spawn(Box::new(Spawn {
                        spec,
                        kind,
                        uuid,
                        first: Some(Event::Villas(VillasEvent::Listed(item))),
                    })));
                }
                for uuid in diff.vanished {
                    debug!(component = %cx.core.keys.uuid, gateway = %uuid, "gateway vanished");
                    cx.request(Request::Remove(uuid));
                }
                // A gateway hears its listing when it changed; after the API
                // was unreachable every gateway does (each is in `error`
                // and takes its node's state back).
                let everyone = std::mem::take(&mut self.recovering);
                let tell: Vec<&Value> =
                    if everyone { self.known.values().collect() } else { diff.changed.iter().collect() };
                for item in tell {
                    if let Some(h) = reconcile::uuid_of(item).and_then(|u| cx.env.components.lookup(u)) {
                        h.notify(Event::Villas(VillasEvent::Listed(item.clone())));
                    }
                }
                changed
            }
            Err(msg) => {
                self.recovering = true;
                let changed = cx.core.state() != State::Error;
                if changed {
                    cx.enter_error(ErrorInfo::new(format!("Failed to reconcile: {msg}")));
                }
                for uuid in self.known.keys() {
                    if let Some(h) = cx.env.components.lookup(*uuid) {
                        h.notify(Event::Villas(VillasEvent::Unreachable(msg.clone())));
                    }
                }
                changed
            }
        }
    }

    fn remove<'a>(&'a mut self, _cx: Cx<'a>) -> Fut<'a, ()> {
        self.token.cancel();
        Box::pin(async {})
    }
}

/// One VILLASnode node or VILLASrelay session.
pub(super) struct Gateway {
    flavour: Flavour,
    api: Option<Api>,
}

impl Gateway {
    pub(super) fn new(flavour: Flavour, properties: &Map<String, Value>) -> Self {
        let (url, _, _, timeout) = settings(properties);
        Gateway { flavour, api: url.and_then(|u| Api::new(&u, timeout).ok()) }
    }

    /// Take the state the node reports.
    fn mirror(&self, cx: &mut Cx<'_>, node: &Value) -> bool {
        let (to, raw) = match self.flavour {
            Flavour::Node => {
                let raw = node.get("state").and_then(Value::as_str).unwrap_or_default();
                (reconcile::node_state(raw), raw.to_owned())
            }
            Flavour::Relay => (State::Running, "running".to_owned()),
        };
        let mut changed = false;
        let from = cx.core.state();
        if from != to {
            changed = if from.can_transition_to(to) { cx.go(to) } else { cx.observe(Observed::Mirrored, to) };
        }
        if to != State::Error && cx.core.error.take().is_some() {
            changed = true;
        }
        let extra = &mut cx.core.extra;
        match self.flavour {
            Flavour::Node => {
                changed |= extra.insert("node_state".into(), raw.clone().into()).as_ref() != Some(&Value::String(raw));
                match reconcile::link_health(node) {
                    Some(h) => {
                        let h = Value::Object(h);
                        changed |= extra.insert("stats".into(), h.clone()).as_ref() != Some(&h);
                    }
                    None => changed |= extra.shift_remove("stats").is_some(),
                }
            }
            Flavour::Relay => {
                let conns = node.get("connections").cloned().unwrap_or(json!([]));
                changed |= extra.insert("connections".into(), conns.clone()).as_ref() != Some(&conns);
            }
        }
        changed
    }
}

impl Driver for Gateway {
    fn act<'a>(
        &'a mut self,
        mut cx: Cx<'a>,
        action: Action,
        _req: &'a ActionRequest,
    ) -> Fut<'a, Result<(), ErrorInfo>> {
        Box::pin(async move {
            let verb = match (self.flavour, action) {
                (Flavour::Node, Action::Start) => "start",
                (Flavour::Node, Action::Stop) => "stop",
                (Flavour::Node, Action::Pause) => "pause",
                (Flavour::Node, Action::Resume) => "resume",
                (Flavour::Node, Action::Reset) => "restart",
                (_, other) => {
                    cx.env.metrics.error(Fault::UnsupportedAction);
                    return Err(ErrorInfo::from(&TransitionError::Unsupported {
                        action: other,
                        kind: cx.core.kind_name(),
                    }));
                }
            };
            let api = self.api.clone().ok_or_else(|| ErrorInfo::new("The gateway has no usable api_url"))?;
            let uuid = cx.core.keys.uuid.to_string();
            // Only to a node VILLASnode shows right now (a POST to an
            // unknown node crashes VILLASnode 1.2.0), and never `stop` to
            // a stopped node (which aborts it).
            let node = api.node(&uuid).await.map_err(|e| match e {
                ApiError::Refused(msg) => ErrorInfo::new(format!("VILLASnode has no such node: {msg}")),
                other => api_error(&other),
            })?;
            if action == Action::Stop && node.get("state").and_then(Value::as_str) == Some("stopped") {
                self.mirror(&mut cx, &node);
                return Ok(());
            }
            cx.begin(action)?;
            api.node_action(&uuid, verb).await.map_err(|e| api_error(&e))?;
            // The state VILLASnode reports now (a transient state settles
            // into it; `resume` on a stopped node reports running).
            if let Ok(after) = api.node(&uuid).await {
                let settled = cx
                    .core
                    .state()
                    .settled()
                    .filter(|s| *s == reconcile::node_state(after["state"].as_str().unwrap_or_default()));
                if let Some(s) = settled {
                    cx.go(s);
                }
                self.mirror(&mut cx, &after);
            }
            Ok(())
        })
    }

    fn on_event(&mut self, mut cx: Cx<'_>, event: Event) -> bool {
        match event {
            Event::Villas(VillasEvent::Listed(item)) => {
                let mut changed = false;
                // Properties refresh when the node's config changes.
                if self.flavour == Flavour::Node
                    && let Some(obj) = item.as_object()
                {
                    for (k, v) in obj {
                        if !matches!(k.as_str(), "type" | "state" | "stats" | "uuid" | "name" | "category" | "enabled")
                            && cx.core.properties.get(k) != Some(v)
                        {
                            cx.core.properties.insert(k.clone(), v.clone());
                            changed = true;
                        }
                    }
                }
                self.mirror(&mut cx, &item) || changed
            }
            Event::Villas(VillasEvent::Unreachable(msg)) if cx.core.state() != State::Error => {
                cx.enter_error(ErrorInfo::new(format!("VILLASnode unreachable: {msg}")));
                true
            }
            _ => false,
        }
    }
}
