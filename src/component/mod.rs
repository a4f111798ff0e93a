//! Components: one owning task per component, reached through a
//! [`ComponentHandle`]. AMQP, HTTP and managers all talk to a component via
//! its handle; only the task touches its state.
//!
//! The task loop (`Component::run`) selects over: commands from the handle,
//! its own queue's inbox (per-component topology), its driver's events, one
//! timer for every deadline (the next scheduled `when` action, the driver's
//! deadline, a coalesced publish, the periodic status), and shutdown. The
//! driver-independent state is `core::Core`; what a type does is its
//! driver (`driver/`).

mod core;
mod driver;
mod env;
pub mod kinds;
mod registry;
pub(crate) use driver::sweep_orphans;
pub use env::{Env, Settings};
pub use registry::Registry;

use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use self::core::{Core, Cx, Request, Spawn};
use crate::config::ComponentSpec;
use crate::metrics::Fault;
use crate::protocol::status::{Prefix, StatusView};
use crate::protocol::{ActionRequest, ErrorInfo, Rejection, RoutingKeys, When};
use crate::state::{Action, Observed, State, TransitionError};
use driver::Driver;
use kinds::Kind;

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
pub(crate) enum Command {
    /// A message routed from the bus: an action, or why it was refused.
    Message(Box<Result<ActionRequest, Rejection>>),
    /// Publish the current status (discovery, announce after (re)connect).
    Announce,
    /// Consume this queue from now on (per-component topology; replaces the
    /// consumer of a previous connection).
    Attach(Box<crate::bus::Inbox>),
    /// Accept an action (now, or at its `when`) and return the resulting
    /// status (HTTP API).
    Act(Box<(ActionRequest, oneshot::Sender<Value>)>),
    /// Return the current status.
    Status(oneshot::Sender<Value>),
    /// Return the status of a component it speaks for (a device).
    Member(Box<(Uuid, oneshot::Sender<Option<Value>>)>),
    /// Return the IoT agent it runs, if it is a gateway that does.
    Devices(oneshot::Sender<Option<std::sync::Arc<crate::iot::Core>>>),
    /// Publish `gone` once, then stop.
    Remove(oneshot::Sender<()>),
    /// An event for the driver from elsewhere in the daemon (a manager
    /// telling its gateway what the upstream lists).
    Driver(Box<driver::Event>),
}

/// What woke a component task (small: payloads are boxed).
enum Wake {
    Command(Command),
    Message(Box<Result<ActionRequest, Rejection>>),
    Panicked(String),
    Driver(Box<driver::Event>),
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
    state: Arc<std::sync::atomic::AtomicU8>,
}

impl ComponentHandle {
    /// The component's uuid.
    pub fn uuid(&self) -> Uuid {
        self.keys.uuid
    }

    /// The component's current state, without asking its task.
    pub fn state(&self) -> State {
        State::from_index(self.state.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether the component's task still runs (for `/api/v1/health`).
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Hand a routed message to the component (waits if its mailbox is full).
    pub async fn deliver(&self, msg: Result<ActionRequest, Rejection>) {
        let _ = self.tx.send(Command::Message(Box::new(msg))).await;
    }

    /// Give the component its own queue's inbox.
    pub async fn attach(&self, inbox: crate::bus::Inbox) {
        let _ = self.tx.send(Command::Attach(Box::new(inbox))).await;
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

    /// The status of `uuid`, a component this one speaks for (a gateway's
    /// device); `None` if it has none by that uuid, or has stopped.
    pub async fn member_status(&self, uuid: Uuid) -> Option<Value> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Member(Box::new((uuid, tx)))).await.ok()?;
        rx.await.ok()?
    }

    /// The IoT agent of a gateway (its devices, their commands); `None`
    /// for other components, or a gateway whose agent is not running.
    pub async fn devices(&self) -> Option<std::sync::Arc<crate::iot::Core>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Devices(tx)).await.ok()?;
        rx.await.ok()?
    }

    /// Hand the component's driver an event without waiting (a full
    /// mailbox drops it: the sender repeats its news every poll).
    pub(crate) fn notify(&self, event: driver::Event) {
        if self.tx.try_send(Command::Driver(Box::new(event))).is_err() {
            debug!(component = %self.uuid(), "mailbox full or closed; driver event dropped");
        }
    }

    /// Publish `gone` and stop the task; returns when it has.
    pub async fn remove(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Remove(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The state owned by one component task: the driver-independent core,
/// the driver, and what the task itself schedules.
pub(crate) struct Component {
    env: Arc<Env>,
    kind: Arc<Kind>,
    core: Core,
    driver: Box<dyn Driver>,
    /// Actions waiting for their `when`, in arrival order.
    scheduled: VecDeque<(Instant, ActionRequest)>,
    /// When a coalesced status broadcast is due (managers after creates
    /// and deletes).
    publish_due: Option<Instant>,
    /// The component's own queue, consumed right here: no task hop between
    /// the broker connection and the state that answers.
    inbox: Option<Box<crate::bus::Inbox>>,
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
    env: &Arc<Env>,
    spec: &ComponentSpec,
    kind: Arc<Kind>,
    uuid: Uuid,
    managed_by: Option<Uuid>,
    persisted: bool,
) -> ComponentHandle {
    let realm = spec.realm.clone().or_else(|| env.settings.realm.clone());
    let keys =
        Arc::new(RoutingKeys { category: spec.category.clone(), kind: spec.kind.clone(), uuid, realm: realm.clone() });
    let (tx, rx) = mpsc::channel(MAILBOX);
    let core = Core::new(keys.clone(), managed_by, properties_of(spec, uuid, &realm));
    let driver = driver::build(&kind, &core, env);
    let state = core.mirror.clone();
    let component =
        Component { env: env.clone(), kind, core, driver, scheduled: VecDeque::new(), publish_due: None, inbox: None };
    env.metrics.state_change(None, Some(State::Idle.as_str()));
    let span = info_span!("component", uuid = %keys.uuid, r#type = %keys.kind);
    env.tracker.spawn(Box::new(component).run(rx).instrument(span));
    ComponentHandle { keys, managed_by, persisted, tx, state }
}

impl Component {
    /// The driver's view of the component.
    fn cx(&mut self) -> Cx<'_> {
        self.parts().1
    }

    /// The driver and its view of the component, borrowed apart (a driver
    /// call takes both).
    fn parts(&mut self) -> (&mut dyn Driver, Cx<'_>) {
        (self.driver.as_mut(), Cx { core: &mut self.core, env: &self.env })
    }

    fn uuid(&self) -> Uuid {
        self.core.keys.uuid
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
        let token = self.env.shutdown.clone();
        let period = self.env.settings.status_interval;
        let mut next_tick = Instant::now() + period;
        guarded!(Box::pin(self.started()));
        loop {
            // A driver deadline that is already due (a dummy with
            // `runtime: 0` settles at once) runs now, not on the next tick.
            let now = Instant::now();
            if self.driver.deadline().is_some_and(|at| at <= now) {
                guarded!(Box::pin(self.on_deadline(now)));
            }
            // One timer for every deadline: the schedule, the driver's (a
            // transient state settles, a grace period ends), a coalesced
            // publish and the periodic status.
            let deadline = [self.scheduled.front().map(|(at, _)| *at), self.driver.deadline(), self.publish_due]
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
                incoming = crate::bus::Inbox::next(&mut self.inbox) => match incoming {
                    crate::bus::Incoming::Message(msg) => Wake::Message(msg),
                    crate::bus::Incoming::Panicked(panic) => Wake::Panicked(panic),
                },
                ev = self.driver.next_event() => Wake::Driver(Box::new(ev)),
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
                Wake::Driver(ev) => guarded!(Box::pin(self.on_driver_event(*ev))),
                Wake::Timer(now, tick) => guarded!(Box::pin(self.on_timer(now, tick))),
            }
        }
        self.env.metrics.state_change(Some(self.core.state().as_str()), None);
    }

    /// The task starts: the driver adopts or starts what it runs.
    async fn started(&mut self) {
        let (driver, cx) = self.parts();
        if driver.started(cx).await {
            self.publish(None).await;
        }
    }

    /// The component is deleted: the driver releases what it holds (its
    /// Job, its agent), then the component publishes `gone`.
    async fn remove(&mut self) {
        let (driver, cx) = self.parts();
        driver.remove(cx).await;
        self.cx().observe(Observed::Deleted, State::Gone);
        self.publish(None).await;
    }

    /// The driver's own task reported: apply it, publish.
    async fn on_driver_event(&mut self, ev: driver::Event) {
        let (driver, cx) = self.parts();
        let changed = driver.on_event(cx, ev);
        // What the driver asked of the daemon (a manager's new and
        // vanished gateways), done before the status goes out.
        for request in self.core.take_requests() {
            self.carry_out(request).await;
        }
        if changed {
            self.publish(None).await;
        }
    }

    /// The driver's deadline passed.
    async fn on_deadline(&mut self, now: Instant) {
        let (driver, cx) = self.parts();
        if driver.on_deadline(cx, now) {
            self.publish(None).await;
        }
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
        if self.driver.deadline().is_some_and(|at| at <= now) {
            self.on_deadline(now).await;
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
        tracing::error!(component = %self.uuid(), %panic, "a component handler panicked; the component enters error");
        self.env.metrics.error(Fault::Panic);
        let info = ErrorInfo::new("Internal error while handling a message; reset to recover").with("detail", panic);
        self.enter_error(info);
        if let Err(again) = crate::supervise::catch(self.publish(None)).await {
            tracing::error!(component = %self.uuid(), panic = %again, "cannot publish the error status");
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Message(msg) => self.message(*msg).await,
            Command::Attach(inbox) => self.inbox = Some(inbox),
            // Discovery and (re)subscription. A gateway's devices answer
            // only when addressed (uuid, type, `category: equipment`): a
            // broadcast ping that announced 10,000 devices would hold the
            // broker for seconds. The device task announces them itself
            // after provisioning and after a reconnect.
            Command::Announce => {
                debug!(component = %self.uuid(), "announce");
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
            Command::Member(ask) => {
                let (uuid, reply) = *ask;
                let _ = reply.send(self.driver.member_status(uuid, &self.env.info));
            }
            Command::Devices(reply) => {
                let _ = reply.send(self.driver.devices());
            }
            Command::Driver(ev) => self.on_driver_event(*ev).await,
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
        if req.action.is(Action::Ping) || due <= now {
            if req.action.is(Action::Reset) && !self.scheduled.is_empty() {
                info!(component = %self.uuid(), dropped = self.scheduled.len(), "reset drops the scheduled actions");
                self.scheduled.clear();
                self.sync_schedule();
            }
            self.execute(req).await;
            return;
        }
        if self.scheduled.len() >= MAX_SCHEDULED {
            self.env.metrics.error(Fault::ScheduleFull);
            let info =
                ErrorInfo::new(format!("Too many scheduled actions (at most {MAX_SCHEDULED}); reset clears them"))
                    .with("action", req.action.as_str());
            return self.fail(info, Some(&req)).await;
        }
        debug!(component = %self.uuid(), action = %req.action, in_ms = (due - now).as_millis() as u64, "scheduled");
        let at = self.scheduled.partition_point(|(t, _)| *t <= due);
        self.scheduled.insert(at, (due, req));
        self.sync_schedule();
        self.publish(None).await;
    }

    /// Show the schedule in `status.scheduled`: `[{action, when}]`, `when`
    /// in Unix seconds; absent when nothing is scheduled.
    fn sync_schedule(&mut self) {
        let extra = &mut self.core.extra;
        if self.scheduled.is_empty() {
            extra.shift_remove("scheduled");
            return;
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let list: Vec<Value> = self
            .scheduled
            .iter()
            .map(|(at, req)| {
                let when = wall + at.saturating_duration_since(now);
                let secs = when.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
                serde_json::json!({"action": req.action.as_str(), "when": (secs * 1000.0).round() / 1000.0})
            })
            .collect();
        extra.insert("scheduled".into(), Value::Array(list));
    }

    async fn execute(&mut self, req: ActionRequest) {
        let span = info_span!("action", action = %req.action);
        self.execute_inner(req).instrument(span).await
    }

    async fn execute_inner(&mut self, req: ActionRequest) {
        let reply = Some(&req);
        let action = match req.action.known() {
            Ok(a) => a,
            Err(e) => return self.refuse(e, reply).await,
        };
        if action == Action::Ping {
            if let Some(more) = self.driver.ping_extra(&req.parameters) {
                return self.publish_with(reply, Some(more)).await;
            }
            return self.publish(reply).await;
        }
        let manages = self.kind.driver.is_manager();
        // Only managers create and delete; elsewhere these are refused
        // loudly rather than accepted and ignored.
        if matches!(action, Action::Create | Action::Delete) && !manages {
            let kind = self.core.kind_name();
            return self.refuse(TransitionError::Unsupported { action, kind }, reply).await;
        }
        if let Err(info) = self.kind.validate(action, &req.parameters) {
            self.env.metrics.error(Fault::Validation);
            if matches!(action, Action::Create | Action::Delete) {
                return self.refuse_request(info, reply).await;
            }
            return self.fail(info, reply).await;
        }
        let (driver, cx) = self.parts();
        let outcome = driver.act(cx, action, &req).await;
        // What the driver asked of the daemon, done before anyone is told.
        for request in self.core.take_requests() {
            self.carry_out(request).await;
        }
        match outcome {
            Ok(()) if matches!(action, Action::Create | Action::Delete) => {
                // The requester hears at once; the exchange at most every
                // MANAGER_PUBLISH_EVERY.
                info!(state = %self.core.state(), "action accepted");
                if req.reply.queue.is_some() {
                    let body = self.view(&self.core.extra).to_vec(&self.env.info);
                    Box::pin(self.env.bus.reply(&self.core.keys, &body, &req.reply)).await;
                }
                self.publish_due.get_or_insert_with(|| Instant::now() + MANAGER_PUBLISH_EVERY);
            }
            Ok(()) => {
                info!(state = %self.core.state(), "action accepted");
                self.publish(reply).await
            }
            // A refused create or delete is the requester's mistake, not
            // the manager's: answer with the error, stay usable.
            // The same for an action a component mirroring another system
            // does not take (the daemon itself, a relay session): a stray
            // `stop` must not make it look broken.
            Err(info)
                if matches!(action, Action::Create | Action::Delete) || self.kind.driver.keeps_state_on_refusal() =>
            {
                self.refuse_request(info, reply).await
            }
            Err(info) => self.fail(info, reply).await,
        }
    }

    /// Carry out a driver's request of the daemon.
    async fn carry_out(&mut self, request: Request) {
        match request {
            Request::Spawn(s) => {
                let Spawn { spec, kind, uuid, first } = *s;
                let managed_by = Some(self.uuid());
                let handle = Box::pin(self.env.add_component(&spec, kind, uuid, managed_by, true)).await;
                if let Some(ev) = first {
                    handle.notify(ev);
                }
            }
            Request::Remove(uuid) => Box::pin(self.env.remove_component(uuid)).await,
        }
    }

    async fn refuse(&mut self, e: TransitionError, reply: Option<&ActionRequest>) {
        self.env.metrics.error((&e).into());
        self.fail(ErrorInfo::from(&e), reply).await
    }

    /// A manager refuses a create or delete: the requester's mistake, not
    /// the manager's. Answer with the error (shown in `status.error` until
    /// the next action succeeds) and stay usable.
    async fn refuse_request(&mut self, info: ErrorInfo, reply: Option<&ActionRequest>) {
        warn!(component = %self.uuid(), error = %info.msg(), "request refused");
        self.core.error = Some(info);
        self.publish(reply).await
    }

    /// Enter `error` with `info` and publish.
    async fn fail(&mut self, info: ErrorInfo, reply: Option<&ActionRequest>) {
        self.enter_error(info);
        self.publish(reply).await;
    }

    /// Enter `error` from outside the driver: the driver drops what was
    /// pending (a transient state's settle).
    fn enter_error(&mut self, info: ErrorInfo) {
        self.driver.failed();
        self.cx().enter_error(info);
    }

    fn view<'a>(&'a self, extra: &'a Map<String, Value>) -> StatusView<'a> {
        self.view_in(self.core.state(), self.core.since, extra)
    }

    fn view_in<'a>(&'a self, state: State, since: f64, extra: &'a Map<String, Value>) -> StatusView<'a> {
        let core = &self.core;
        let prefix = match core.keys.category.as_str() {
            "simulator" => Prefix::Simulator { model: &core.model, results: &core.results },
            "manager" => Prefix::Manager { components: self.env.components.managed_by(core.keys.uuid) },
            _ => Prefix::None,
        };
        StatusView {
            prefix,
            state,
            managed_by: core.managed_by,
            error: core.error.as_ref(),
            since: Some(since),
            extra,
            properties: &core.properties,
            schema: &self.kind.schema,
        }
    }

    /// The stored status fields with the driver's live ones over them.
    fn live_extra(&self) -> Option<Map<String, Value>> {
        let live = self.driver.live_status()?;
        let mut m = self.core.extra.clone();
        m.extend(live);
        Some(m)
    }

    fn status(&self) -> Value {
        let live = self.live_extra();
        self.view(live.as_ref().unwrap_or(&self.core.extra)).render(&self.env.info)
    }

    /// Publish the status on the exchange; if `cause` asked for a reply, also
    /// send it to `reply_to` with its `correlation_id`.
    ///
    /// States entered since the last publish and already left are published
    /// first, in order (without the reply): observers see `pausing` before
    /// `paused` even when the driver got there at once.
    async fn publish(&mut self, cause: Option<&ActionRequest>) {
        self.publish_with(cause, None).await
    }

    /// [`Self::publish`], with `more` status fields in this one message.
    async fn publish_with(&mut self, cause: Option<&ActionRequest>, more: Option<Map<String, Value>>) {
        let trail = self.core.take_trail();
        let mut live = self.live_extra();
        if let Some(more) = more {
            live.get_or_insert_with(|| self.core.extra.clone()).extend(more);
        }
        let extra = live.as_ref().unwrap_or(&self.core.extra);
        if let Some((_, passed)) = trail.split_last() {
            for &(state, since) in passed {
                let body = self.view_in(state, since, extra).to_vec(&self.env.info);
                Box::pin(self.env.bus.publish_status(&self.core.keys, &body, None)).await;
            }
        }
        let body = self.view(extra).to_vec(&self.env.info);
        let reply = cause.map(|r| &r.reply).filter(|r| r.wanted());
        // Boxed: lapin's publish future is kilobytes, and would otherwise be
        // part of every idle component task.
        Box::pin(self.env.bus.publish_status(&self.core.keys, &body, reply)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_two_words() {
        assert_eq!(std::mem::size_of::<Command>(), 16);
    }
}
