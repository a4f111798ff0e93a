//! `controller/busbar`: the daemon itself as an IC of the federation.
//!
//! It is `running` from the start (the daemon's work is running when it
//! is), publishes a status every `alive_interval` (the directories of every
//! site mark this site stale after three missed ones), and publishes `gone`
//! when the daemon stops. Its status carries what an operator watching the
//! federation asks first: host load and memory, the daemon's own RSS and
//! CPU, whether the broker link is up, its components counted by state,
//! the peers it hears and their clock offsets. It accepts no action but
//! `ping`: a refused action is answered with the error and leaves the
//! controller `running` (a stray `stop` must not make a site look broken).

use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use super::{Driver, Fut};
use crate::component::Env;
use crate::component::core::Cx;
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::state::{Action, Observed, State, TransitionError};

/// Host and process figures, read at most once per alive interval.
struct Figures {
    system: Option<sysinfo::System>,
    pid: Option<sysinfo::Pid>,
    last: Map<String, Value>,
}

impl Figures {
    fn new() -> Self {
        Figures { system: sysinfo::System::new().ok(), pid: sysinfo::get_current_pid().ok(), last: Map::new() }
    }

    /// Refresh: system CPU (since the last refresh), memory, load, and the
    /// daemon's RSS and CPU.
    fn refresh(&mut self) {
        let mut m = Map::new();
        if let Some(sys) = self.system.as_mut() {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            m.insert("cpu_percent".into(), round2(f64::from(sys.global_cpu_usage())).into());
            m.insert("memory_total".into(), sys.total_memory().into());
            m.insert("memory_used".into(), sys.used_memory().into());
            if let Some(pid) = self.pid {
                let kind = sysinfo::ProcessRefreshKind::nothing().with_memory().with_cpu();
                sys.refresh_processes_specifics(sysinfo::ProcessesToUpdate::Some(&[pid]), false, kind);
                if let Some(p) = sys.process(pid) {
                    m.insert("rss".into(), p.memory().into());
                    m.insert("process_cpu_percent".into(), round2(f64::from(p.cpu_usage())).into());
                }
            }
        }
        if let Ok(l) = sysinfo::System::load_average() {
            m.insert("load".into(), json!([round2(l.one), round2(l.five), round2(l.fifteen)]));
        }
        self.last = m;
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(super) struct Controller {
    env: Arc<Env>,
    alive: Duration,
    next_alive: Instant,
    figures: Figures,
}

impl Controller {
    pub(super) fn new(env: &Arc<Env>) -> Self {
        let alive = env.settings.alive_interval;
        Controller { env: env.clone(), alive, next_alive: Instant::now() + alive, figures: Figures::new() }
    }
}

impl Driver for Controller {
    fn started<'a>(&'a mut self, mut cx: Cx<'a>) -> Fut<'a, bool> {
        self.figures.refresh();
        Box::pin(async move { cx.observe(Observed::Adopted, State::Running) })
    }

    fn act<'a>(&'a mut self, cx: Cx<'a>, action: Action, _req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>> {
        cx.env.metrics.error(Fault::UnsupportedAction);
        let e = TransitionError::Unsupported { action, kind: cx.core.kind_name() };
        Box::pin(std::future::ready(Err(ErrorInfo::from(&e))))
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.next_alive)
    }

    /// Alive: refresh the figures; the caller publishes.
    fn on_deadline(&mut self, _cx: Cx<'_>, now: Instant) -> bool {
        if now < self.next_alive {
            return false;
        }
        self.next_alive = now + self.alive;
        self.figures.refresh();
        true
    }

    /// A distributed request (`ping` with `include: ["components"]`): this
    /// site's components, fresh, in the answer.
    fn ping_extra(&self, parameters: &Map<String, Value>) -> Option<Map<String, Value>> {
        let include = parameters.get("include")?.as_array()?;
        if !include.iter().any(|i| i == "components") {
            return None;
        }
        let me = self.env.settings.controller;
        let local: Vec<Value> = self
            .env
            .components
            .handles()
            .iter()
            .filter(|h| h.uuid() != me)
            .map(|h| {
                json!({
                    "uuid": h.uuid(),
                    "category": h.keys.category,
                    "type": h.keys.kind,
                    "realm": h.keys.realm,
                    "state": h.state().as_str(),
                    "managed_by": h.managed_by,
                })
            })
            .collect();
        let mut m = Map::new();
        m.insert("local".into(), local.into());
        Some(m)
    }

    fn live_status(&self) -> Option<Map<String, Value>> {
        let env = &self.env;
        let mut m = Map::new();
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
        m.insert("time".into(), ((time * 1e6).round() / 1e6).into());
        m.insert("alive_interval".into(), self.alive.as_secs_f64().into());
        m.insert("broker".into(), json!({"connected": env.bus.connected()}));
        let me = env.settings.controller;
        let mut by_state: Map<String, Value> = Map::new();
        for h in env.components.handles().iter().filter(|h| h.uuid() != me) {
            let state = h.state().as_str();
            let n = by_state.get(state).and_then(Value::as_u64).unwrap_or(0);
            by_state.insert(state.into(), (n + 1).into());
        }
        m.insert("components".into(), by_state.into());
        // The components at the top of this daemon's `managed_by` trees
        // (its root manager): they and everything under them are this
        // site's. (The root manager itself names no manager on the wire,
        // as VILLAScontroller's does not.)
        let roots: Vec<Value> = env
            .components
            .handles()
            .iter()
            .filter(|h| h.managed_by.is_none() && h.uuid() != me)
            .map(|h| h.uuid().to_string().into())
            .collect();
        m.insert("roots".into(), roots.into());
        m.insert("system".into(), Value::Object(self.figures.last.clone()));
        let dir = env.directory.lock().unwrap_or_else(|p| p.into_inner());
        m.insert("links".into(), dir.links(me, Instant::now()).into());
        m.insert("directory".into(), json!({"ics": dir.len(), "dropped": dir.dropped()}));
        Some(m)
    }
}
