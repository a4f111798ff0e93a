//! Components: one owning task per component, reached through a
//! [`ComponentHandle`]. AMQP, HTTP and managers all talk to a component via
//! its handle; only the task touches its state.
//!
//! The task loop (`Component::run`) selects over: commands from the handle,
//! the due time of the next scheduled (`when`) action, the settle timer of
//! the current transient state, the periodic status tick, and shutdown.

mod gateway;
pub mod kinds;
mod kubernetes;
pub(crate) use kubernetes::sweep_orphans;
mod manager;
mod process;

use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::config::ComponentSpec;
use crate::daemon::Shared;
use crate::protocol::status::{Prefix, StatusView};
use crate::protocol::{ActionRequest, ErrorInfo, Rejection, RoutingKeys, When};
use crate::react::Reaction;
use crate::state::{Action, Lifecycle, Observed, State, TransitionError};
use kinds::{Driver, Kind};

/// Most actions one component keeps waiting for their `when`; more are
/// refused, so a sender cannot grow a component's memory without bound.
const MAX_SCHEDULED: usize = 64;

/// How often a manager broadcasts its status while components are being
/// created or deleted. Its status lists every component it manages, so
/// publishing it after each of 10,000 creates would cost O(n²) bytes on the
/// bus and in every queue that receives it; the requester still gets its
/// reply at once.
const MANAGER_PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// Depth of a component's command queue. A full queue back-pressures the
/// consumer that feeds it rather than growing without bound.
const MAILBOX: usize = 512;

/// What a handle can ask of its component. Payloads are boxed, so a command
/// is 16 bytes: the mailbox allocates in blocks of 32 slots, and every
/// component has one (a unit test keeps it so).
#[derive(Debug)]
pub enum Command {
    /// A message routed from the bus: an action, or why it was refused.
    Message(Box<Result<ActionRequest, Rejection>>),
    /// Publish the current status (discovery, announce after (re)connect).
    Announce,
    /// Consume this queue from now on (per-component topology; replaces the
    /// consumer of a previous connection).
    Attach(Box<lapin::Consumer>),
    /// Accept an action (now, or at its `when`) and return the resulting
    /// status (HTTP API).
    Act(Box<(ActionRequest, oneshot::Sender<Value>)>),
    /// Return the current status.
    Status(oneshot::Sender<Value>),
    /// Publish `gone` once, then stop.
    Remove(oneshot::Sender<()>),
}

/// What woke a component task (small: payloads are boxed).
enum Wake {
    Command(Command),
    Message(Box<Result<ActionRequest, Rejection>>),
    Panicked(String),
    Run(Box<process::RunEvent>),
    Job(Box<crate::k8s::job::JobEvent>),
    Timer(Instant, bool),
}

/// The address of a running component. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ComponentHandle {
    /// Routing headers (shared: the shared topology walks every handle per
    /// message, and handles are cloned out of the registry often).
    pub keys: Arc<RoutingKeys>,
    /// The managing component, if any.
    pub managed_by: Option<Uuid>,
    /// Whether it was created at runtime (and so is in the store).
    pub persisted: bool,
    tx: mpsc::Sender<Command>,
}

impl ComponentHandle {
    /// The component's uuid.
    pub fn uuid(&self) -> Uuid {
        self.keys.uuid
    }

    /// Whether the component's task still runs (for `/api/v1/health`).
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Hand a routed message to the component (waits if its mailbox is full).
    pub async fn deliver(&self, msg: Result<ActionRequest, Rejection>) {
        let _ = self.tx.send(Command::Message(Box::new(msg))).await;
    }

    /// Give the component its queue's consumer.
    pub async fn attach(&self, consumer: lapin::Consumer) {
        let _ = self.tx.send(Command::Attach(Box::new(consumer))).await;
    }

    /// Ask the component to publish its status.
    pub async fn announce(&self) {
        let _ = self.tx.send(Command::Announce).await;
    }

    /// Accept an action and return the status after it; `None` if the
    /// component has stopped.
    pub async fn act(&self, req: ActionRequest) -> Option<Value> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Act(Box::new((req, tx)))).await.ok()?;
        rx.await.ok()
    }

    /// The current status; `None` if the component has stopped.
    pub async fn status(&self) -> Option<Value> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Status(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Publish `gone` and stop the task; returns when it has.
    pub async fn remove(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Remove(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Seconds each dummy transient state lasts.
#[derive(Debug, Clone)]
struct Durations(Map<String, Value>);

impl Durations {
    fn of(&self, action: Action, parameters: &Map<String, Value>) -> Duration {
        let secs = match action {
            Action::Start => parameters.get("runtime").and_then(Value::as_f64),
            other => self.0.get(other.as_str()).and_then(Value::as_f64),
        };
        Duration::from_secs_f64(secs.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(1.0).min(86_400.0))
    }
}

/// The state owned by one component task.
pub(crate) struct Component {
    shared: Arc<Shared>,
    keys: Arc<RoutingKeys>,
    kind: Arc<Kind>,
    managed_by: Option<Uuid>,
    properties: Map<String, Value>,
    lifecycle: Lifecycle,
    error: Option<ErrorInfo>,
    model: Value,
    results: Value,
    durations: Durations,
    /// Type-specific `status` fields.
    extra: Map<String, Value>,
    /// When the current transient state settles (dummy driver).
    settle_at: Option<Instant>,
    /// Actions waiting for their `when`, in arrival order.
    scheduled: VecDeque<(Instant, ActionRequest)>,
    /// When a coalesced status broadcast is due (managers after creates
    /// and deletes).
    publish_due: Option<Instant>,
    /// The component's own queue, consumed right here: no task hop between
    /// the broker connection and the state that answers.
    consumer: Option<Box<lapin::Consumer>>,
    /// The running process of a process component.
    run: Option<Box<process::Run>>,
    /// The job task of a Kubernetes simulator.
    job: Option<crate::k8s::job::JobRun>,
    /// The IoT agent of a gateway.
    agent: Option<Box<crate::iot::Agent>>,
    /// Properties whose published value is redacted (URLs with a password),
    /// as given: only drivers see them.
    secrets: Map<String, Value>,
    /// States entered since the last publish, in order: `publish` sends a
    /// status for each one before the current, so observers see every
    /// state the component passes through (`pausing` before `paused`).
    trail: Vec<State>,
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

/// Build the properties object: every given key in order, with the identity
/// keys set to their resolved values.
fn properties_of(spec: &ComponentSpec, uuid: Uuid, realm: &Option<String>) -> Map<String, Value> {
    let mut p = spec.properties.clone();
    p.insert("category".into(), spec.category.clone().into());
    p.insert("type".into(), spec.kind.clone().into());
    p.insert("name".into(), spec.name.clone().into());
    p.insert("realm".into(), realm.clone().map_or(Value::Null, Value::String));
    p.insert("uuid".into(), uuid.to_string().into());
    p.shift_remove("enabled");
    p
}

/// Start the task of a component and return its handle. The caller
/// registers it with the registry and the bus.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    spec: &ComponentSpec,
    kind: Arc<Kind>,
    uuid: Uuid,
    managed_by: Option<Uuid>,
    persisted: bool,
) -> ComponentHandle {
    let realm = spec.realm.clone().or_else(|| shared.config.realm.clone());
    let keys =
        Arc::new(RoutingKeys { category: spec.category.clone(), kind: spec.kind.clone(), uuid, realm: realm.clone() });
    let (tx, rx) = mpsc::channel(MAILBOX);
    let mut properties = properties_of(spec, uuid, &realm);
    let secrets = split_secrets(&mut properties);
    let durations = Durations(properties.get("durations").and_then(Value::as_object).cloned().unwrap_or_default());
    let component = Component {
        shared: shared.clone(),
        keys: keys.clone(),
        kind,
        managed_by,
        properties,
        lifecycle: Lifecycle::default(),
        error: None,
        model: Value::Null,
        results: Value::Null,
        durations,
        extra: Map::new(),
        settle_at: None,
        scheduled: VecDeque::new(),
        publish_due: None,
        consumer: None,
        run: None,
        job: None,
        agent: None,
        secrets,
        trail: Vec::new(),
    };
    shared.metrics.state_change(None, Some(State::Idle.as_str()));
    shared.tracker.spawn(Box::new(component).run(rx));
    ComponentHandle { keys, managed_by, persisted, tx }
}

impl Component {
    /// The properties as configured, secrets included: for drivers only,
    /// never for status messages.
    fn driver_properties(&self) -> std::borrow::Cow<'_, Map<String, Value>> {
        if self.secrets.is_empty() {
            return std::borrow::Cow::Borrowed(&self.properties);
        }
        let mut p = self.properties.clone();
        p.extend(self.secrets.clone());
        std::borrow::Cow::Owned(p)
    }

    /// The component's task. `self` is boxed: the future holds a pointer,
    /// not a copy of the component (an async fn that takes `self` by value
    /// stores it twice), and every wait shares one timer. With thousands of
    /// components the size of this future is most of the daemon's memory.
    async fn run(mut self: Box<Self>, mut rx: mpsc::Receiver<Command>) {
        // Each handler runs under `supervise::catch`: a panic costs the
        // message that caused it and puts the component in `error`, never
        // the task (which would leave the component deaf for good).
        macro_rules! guarded {
            ($fut:expr) => {
                if let Err(panic) = crate::supervise::catch($fut).await {
                    Box::pin(self.panicked(panic)).await;
                }
            };
        }
        let token = self.shared.shutdown.clone();
        let period = self.shared.config.status_interval();
        let mut next_tick = Instant::now() + period;
        if self.kind.driver == Driver::KubernetesJob {
            self.adopt_job();
        }
        if self.kind.driver == Driver::IotAgent {
            Box::pin(self.start_agent()).await;
        }
        loop {
            // A transient state that is already due settles now, not on the
            // next timer tick (a dummy with `runtime: 0` runs at once).
            if self.settle_at.is_some_and(|at| at <= Instant::now()) {
                guarded!(Box::pin(self.settle()));
            }
            // One timer for every deadline: the schedule, the settle of a
            // transient state, a kill after the grace period, a coalesced
            // publish and the periodic status.
            let kill_at = self.run.as_ref().and_then(|r| r.kill_at);
            let deadline = [self.scheduled.front().map(|(at, _)| *at), self.settle_at, kill_at, self.publish_due]
                .into_iter()
                .flatten()
                .fold(next_tick, Instant::min);
            // The select only says what woke the task; the handlers run
            // after it, boxed. So the idle task holds the select's futures
            // and nothing else (a delivery alone is 432 bytes).
            let wake = tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(cmd) => Wake::Command(cmd),
                },
                Some(d) = crate::bus::next_delivery(&mut self.consumer) => {
                    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        crate::bus::decode_delivery(&self.shared, &d)
                    }));
                    match decoded {
                        Ok(Some(msg)) => Wake::Message(Box::new(msg)),
                        Ok(None) => continue,
                        Err(p) => Wake::Panicked(crate::supervise::panic_message(p)),
                    }
                }
                Some(ev) = process::Run::next(&mut self.run) => Wake::Run(Box::new(ev)),
                Some(ev) = crate::k8s::job::JobRun::next(&mut self.job) => Wake::Job(Box::new(ev)),
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    let tick = next_tick <= now;
                    if tick {
                        next_tick = now + period;
                    }
                    Wake::Timer(now, tick)
                }
                _ = token.cancelled() => break,
            };
            match wake {
                Wake::Command(Command::Remove(done)) => {
                    Box::pin(self.remove()).await;
                    let _ = done.send(());
                    break;
                }
                Wake::Command(cmd) => guarded!(Box::pin(self.command(cmd))),
                Wake::Message(msg) => guarded!(Box::pin(self.message(*msg))),
                Wake::Panicked(panic) => Box::pin(self.panicked(panic)).await,
                Wake::Run(ev) => guarded!(Box::pin(self.on_run_event(*ev))),
                Wake::Job(ev) => guarded!(Box::pin(self.on_job_event(*ev))),
                Wake::Timer(now, tick) => guarded!(Box::pin(self.on_timer(now, tick))),
            }
        }
        self.shared.metrics.state_change(Some(self.lifecycle.state().as_str()), None);
    }

    /// The component is deleted: its Job and agent go, it publishes `gone`.
    async fn remove(&mut self) {
        if self.kind.driver == Driver::KubernetesJob {
            self.delete_job().await;
        }
        self.remove_agent().await;
        self.observe(Observed::Deleted, State::Gone);
        self.publish(None).await;
    }

    /// The timer fired at `now`: run what is due. `tick`: the periodic
    /// status is due.
    async fn on_timer(&mut self, now: Instant, tick: bool) {
        if self.scheduled.front().is_some_and(|(at, _)| *at <= now)
            && let Some((_, req)) = self.scheduled.pop_front()
        {
            self.sync_schedule();
            self.execute(req).await;
        }
        if self.settle_at.is_some_and(|at| at <= now) {
            self.settle().await;
        }
        if self.run.as_ref().and_then(|r| r.kill_at).is_some_and(|at| at <= now) {
            self.kill_now();
        }
        let coalesced = self.publish_due.is_some_and(|at| at <= now);
        if coalesced {
            self.publish_due = None;
        }
        if coalesced || tick {
            self.publish(None).await;
        }
    }

    /// A handler panicked: log and count it, and enter `error` so that the
    /// component says so on the bus (and `reset` brings it back).
    async fn panicked(&mut self, panic: String) {
        tracing::error!(component = %self.keys.uuid, %panic, "a component handler panicked; the component enters error");
        self.shared.metrics.error("panic");
        self.settle_at = None;
        let info = ErrorInfo::new("Internal error while handling a message; reset to recover").with("detail", panic);
        self.enter_error(info);
        if let Err(again) = crate::supervise::catch(self.publish(None)).await {
            tracing::error!(component = %self.keys.uuid, panic = %again, "cannot publish the error status");
        }
    }

    /// The settle timer fired: complete the transient state and publish.
    async fn settle(&mut self) {
        self.settle_at = None;
        if let Some(to) = self.lifecycle.state().settled()
            && self.go(to)
        {
            debug!(component = %self.keys.uuid, %to, "settled");
            self.publish(None).await;
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Message(msg) => self.message(*msg).await,
            Command::Attach(consumer) => self.consumer = Some(consumer),
            // Discovery and (re)subscription. A gateway's devices answer
            // only when addressed (uuid, type, `category: equipment`): a
            // broadcast ping that announced 10,000 devices would hold the
            // broker for seconds. The device task announces them itself
            // after provisioning and after a reconnect.
            Command::Announce => {
                debug!(component = %self.keys.uuid, "announce");
                self.publish(None).await
            }
            Command::Act(act) => {
                let (req, reply) = *act;
                self.accept(req).await;
                let _ = reply.send(self.status());
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Remove(_) => unreachable!("handled in run"),
        }
    }

    /// A routed message: an action to accept, or a rejection to report.
    async fn message(&mut self, msg: Result<ActionRequest, Rejection>) {
        match msg {
            Ok(req) => self.accept(req).await,
            Err(rejection) => self.fail(ErrorInfo::from(&rejection), None).await,
        }
    }

    /// Take an action from the bus: run it now, or keep it until its `when`.
    ///
    /// An action without a `when` (or with one in the past) runs at once,
    /// whatever is scheduled: a far-off `when` must not hold back a later
    /// `stop` or `reset`. Scheduled actions run in the order of their
    /// times, and in arrival order for equal times. `reset` also drops the
    /// schedule, so it is always a way back to a known state. The schedule
    /// is shown in `status.scheduled`.
    async fn accept(&mut self, req: ActionRequest) {
        let now = Instant::now();
        let due = match req.when {
            When::Now => now,
            When::At(t) => now + t.duration_since(SystemTime::now()).unwrap_or_default(),
        };
        if req.action == Action::Ping.as_str() || due <= now {
            if req.action == Action::Reset.as_str() && !self.scheduled.is_empty() {
                info!(component = %self.keys.uuid, dropped = self.scheduled.len(), "reset drops the scheduled actions");
                self.scheduled.clear();
                self.sync_schedule();
            }
            self.execute(req).await;
            return;
        }
        if self.scheduled.len() >= MAX_SCHEDULED {
            self.shared.metrics.error("schedule_full");
            let info =
                ErrorInfo::new(format!("Too many scheduled actions (at most {MAX_SCHEDULED}); reset clears them"))
                    .with("action", req.action.as_str());
            return self.fail(info, Some(&req)).await;
        }
        debug!(component = %self.keys.uuid, action = %req.action, in_ms = (due - now).as_millis() as u64, "scheduled");
        let at = self.scheduled.partition_point(|(t, _)| *t <= due);
        self.scheduled.insert(at, (due, req));
        self.sync_schedule();
        self.publish(None).await;
    }

    /// Show the schedule in `status.scheduled`: `[{action, when}]`, `when`
    /// in Unix seconds; absent when nothing is scheduled.
    fn sync_schedule(&mut self) {
        if self.scheduled.is_empty() {
            self.extra.shift_remove("scheduled");
            return;
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let list: Vec<Value> = self
            .scheduled
            .iter()
            .map(|(at, req)| {
                let when = wall + at.saturating_duration_since(now);
                let secs = when.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
                serde_json::json!({"action": req.action, "when": (secs * 1000.0).round() / 1000.0})
            })
            .collect();
        self.extra.insert("scheduled".into(), Value::Array(list));
    }

    async fn execute(&mut self, req: ActionRequest) {
        let span = info_span!("action", component = %self.keys.uuid, r#type = %self.keys.kind, action = %req.action);
        self.execute_inner(req).instrument(span).await
    }

    async fn execute_inner(&mut self, req: ActionRequest) {
        let reply = Some(&req);
        let action = match req.action.parse::<Action>() {
            Ok(a) => a,
            Err(e) => return self.refuse(e, reply).await,
        };
        if action == Action::Ping {
            return self.publish(reply).await;
        }
        // Only managers create and delete; elsewhere these are refused
        // loudly rather than accepted and ignored.
        if matches!(action, Action::Create | Action::Delete) && !self.kind.driver.is_manager() {
            let kind = format!("{}/{}", self.keys.category, self.keys.kind);
            return self.refuse(TransitionError::Unsupported { action, kind }, reply).await;
        }
        if let Err(info) = self.kind.validate(action, &req.parameters) {
            self.shared.metrics.error("validation");
            if matches!(action, Action::Create | Action::Delete) {
                return self.refuse_request(info, reply).await;
            }
            return self.fail(info, reply).await;
        }
        let outcome = match &self.kind.driver {
            Driver::Dummy => self.dummy(action, &req),
            // Boxed: the manager path holds store and registry futures that
            // would otherwise inflate every component task by kilobytes.
            d if d.is_manager() => Box::pin(self.manage(action, &req)).await,
            Driver::Process(_) => self.process(action, &req),
            Driver::KubernetesJob => self.kubernetes(action, &req),
            Driver::IotAgent => Box::pin(self.gateway(action)).await,
            _ => unreachable!("managers are handled above"),
        };
        match outcome {
            Ok(()) if matches!(action, Action::Create | Action::Delete) => {
                // The requester hears at once; the exchange at most every
                // MANAGER_PUBLISH_EVERY.
                info!(state = %self.lifecycle.state(), "action accepted");
                if req.reply.queue.is_some() {
                    let body = self.view(&self.extra).to_vec(&self.shared.info);
                    Box::pin(self.shared.bus.reply(&self.keys, &body, &req.reply)).await;
                }
                self.publish_due.get_or_insert_with(|| Instant::now() + MANAGER_PUBLISH_EVERY);
            }
            Ok(()) => {
                info!(state = %self.lifecycle.state(), "action accepted");
                self.publish(reply).await
            }
            // A refused create or delete is the requester's mistake, not
            // the manager's: answer with the error, stay usable.
            Err(info) if matches!(action, Action::Create | Action::Delete) => self.refuse_request(info, reply).await,
            Err(info) => self.fail(info, reply).await,
        }
    }

    /// Enter the transient state of a simulator action (counting a refused
    /// transition) and clear the previous error.
    fn begin(&mut self, action: Action) -> Result<(), ErrorInfo> {
        let from = self.lifecycle.state();
        let to = self.lifecycle.begin(action).map_err(|e| {
            self.shared.metrics.error("invalid_transition");
            ErrorInfo::from(&e)
        })?;
        if to != from || action.entry_state().is_some() {
            self.entered(from, to);
        }
        self.error = None;
        Ok(())
    }

    /// Take a table edge (the one checked entry for driver decisions); a
    /// refused edge changes nothing, is counted and logged, and returns
    /// `false`.
    fn go(&mut self, to: State) -> bool {
        let from = self.lifecycle.state();
        match self.lifecycle.advance(to) {
            Ok(_) => {
                self.entered(from, to);
                true
            }
            Err(e) => {
                self.shared.metrics.error("invalid_transition");
                warn!(component = %self.keys.uuid, error = ?e, "a driver asked for a transition the table does not allow");
                false
            }
        }
    }

    /// Take a declared observed edge (adoption, failure, deletion).
    fn observe(&mut self, why: Observed, to: State) -> bool {
        let from = self.lifecycle.state();
        match self.lifecycle.observe(why, to) {
            Ok(_) => {
                self.entered(from, to);
                true
            }
            Err(e) => {
                self.shared.metrics.error("invalid_transition");
                warn!(component = %self.keys.uuid, error = ?e, ?why, "an observed transition was refused");
                false
            }
        }
    }

    fn entered(&mut self, from: State, to: State) {
        self.shared.metrics.state_change(Some(from.as_str()), Some(to.as_str()));
        self.trail.push(to);
    }

    /// Apply a driver's [`Reaction`] (see `react.rs`); `failure` says why
    /// if it fails. Returns whether the state changed; the caller publishes.
    fn react(&mut self, r: Reaction, failure: impl FnOnce() -> ErrorInfo) -> bool {
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

    fn dummy(&mut self, action: Action, req: &ActionRequest) -> Result<(), ErrorInfo> {
        self.begin(action)?;
        if action == Action::Start {
            let shown = |k: &str| req.payload.get(k).map_or(Value::Null, crate::sandbox::redact_transfer);
            self.model = shown("model");
            self.results = shown("results");
        }
        self.settle_at = Some(Instant::now() + self.durations.of(action, &req.parameters));
        Ok(())
    }

    async fn refuse(&mut self, e: TransitionError, reply: Option<&ActionRequest>) {
        let kind = match e {
            TransitionError::UnknownAction(_) => "unknown_action",
            TransitionError::Unsupported { .. } => "unsupported_action",
            TransitionError::Invalid { .. } => "invalid_transition",
        };
        self.shared.metrics.error(kind);
        self.fail(ErrorInfo::from(&e), reply).await
    }

    /// A manager refuses a create or delete: the requester's mistake, not
    /// the manager's. Answer with the error (shown in `status.error` until
    /// the next action succeeds) and stay usable.
    async fn refuse_request(&mut self, info: ErrorInfo, reply: Option<&ActionRequest>) {
        warn!(component = %self.keys.uuid, error = %info.msg(), "request refused");
        self.error = Some(info);
        self.publish(reply).await
    }

    /// Enter `error` with `info`, drop any pending settle, and publish.
    async fn fail(&mut self, info: ErrorInfo, reply: Option<&ActionRequest>) {
        self.enter_error(info);
        self.publish(reply).await;
    }

    /// Enter `error` with `info` ([`Observed::Failed`]) and drop any pending
    /// settle; the caller publishes.
    fn enter_error(&mut self, info: ErrorInfo) {
        warn!(component = %self.keys.uuid, error = %info.msg(), "component error");
        self.settle_at = None;
        self.observe(Observed::Failed, State::Error);
        self.error = Some(info);
    }

    fn view<'a>(&'a self, extra: &'a Map<String, Value>) -> StatusView<'a> {
        self.view_in(self.lifecycle.state(), extra)
    }

    fn view_in<'a>(&'a self, state: State, extra: &'a Map<String, Value>) -> StatusView<'a> {
        let prefix = match self.keys.category.as_str() {
            "simulator" => Prefix::Simulator { model: &self.model, results: &self.results },
            "manager" => Prefix::Manager { components: self.shared.managed_by(self.keys.uuid) },
            _ => Prefix::None,
        };
        StatusView {
            prefix,
            state,
            managed_by: self.managed_by,
            error: self.error.as_ref(),
            extra,
            properties: &self.properties,
            schema: &self.kind.schema,
        }
    }

    fn status(&self) -> Value {
        let live = self.agent_status();
        self.view(live.as_ref().unwrap_or(&self.extra)).render(&self.shared.info)
    }

    /// Publish the status on the exchange; if `cause` asked for a reply, also
    /// send it to `reply_to` with its `correlation_id`.
    ///
    /// States entered since the last publish and already left are published
    /// first, in order (without the reply): observers see `pausing` before
    /// `paused` even when the driver got there at once.
    async fn publish(&mut self, cause: Option<&ActionRequest>) {
        let live = self.agent_status();
        let extra = live.as_ref().unwrap_or(&self.extra);
        let trail = std::mem::take(&mut self.trail);
        if let Some((_, passed)) = trail.split_last() {
            for &state in passed {
                let body = self.view_in(state, extra).to_vec(&self.shared.info);
                Box::pin(self.shared.bus.publish_status(&self.keys, &body, None)).await;
            }
        }
        let body = self.view(extra).to_vec(&self.shared.info);
        let reply = cause.map(|r| &r.reply).filter(|r| r.wanted());
        // Boxed: lapin's publish future is kilobytes, and would otherwise be
        // part of every idle component task.
        Box::pin(self.shared.bus.publish_status(&self.keys, &body, reply)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_command_is_two_words() {
        assert_eq!(std::mem::size_of::<Command>(), 16);
    }

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
