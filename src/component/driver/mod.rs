//! Drivers: what a component of each type does with an action, and how
//! what it observes (a process exit, a Job event, an agent start) becomes
//! a state. One module per driver; each owns its run-time state (a child
//! process, a watched Job, an IoT agent) and reaches its component only
//! through [`Cx`].
//!
//! The component task (`super::Component::run`) owns the lifecycle, the
//! mailbox and the schedule of `when` actions; it asks the driver to act,
//! waits on [`Driver::next_event`] in one select arm, asks for the
//! driver's [`Driver::deadline`] in its one timer, and publishes after
//! each step. State decisions are the pure rules of `crate::react`.
//!
//! Adding a driver: its module here, a variant in
//! [`kinds::Driver`](super::kinds::Driver) (the name manifests use), and
//! one line in [`build`]. A driver with events of its own also adds a
//! variant to [`Event`].

mod controller;
mod dummy;
mod gateway;
mod kubernetes;
mod manager;
mod process;
mod villas;

pub(crate) use kubernetes::sweep_orphans;

use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use tokio::time::Instant;

use super::core::{Core, Cx};
use super::kinds::{self, Kind};
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::state::Action;

/// A boxed driver future. Boxed on purpose: lapin, kube and store futures
/// are kilobytes, and an unboxed one would be part of every idle
/// component task.
pub(crate) type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something a driver's own task reported to its component.
#[derive(Debug)]
pub(crate) enum Event {
    /// From the run task of a process component.
    Process(process::RunEvent),
    /// From the job task of a Kubernetes simulator.
    Kubernetes(crate::k8s::job::JobEvent),
    /// From a VILLASnode or VILLASrelay manager's poll task, or from the
    /// manager to one of its gateways.
    Villas(villas::VillasEvent),
    /// The IoT gateway's MQTT link changed.
    Mqtt(crate::iot::MqttLink),
}

/// The behaviour of one component type.
pub(crate) trait Driver: Send {
    /// Once, when the component task starts (adopt a Job, start an agent).
    /// Returns whether the state changed.
    fn started<'a>(&'a mut self, _cx: Cx<'a>) -> Fut<'a, bool> {
        Box::pin(async { false })
    }

    /// Run `action` (validated, not `ping`). An error enters `error`
    /// (or, for a manager's create and delete, is answered and shown).
    fn act<'a>(&'a mut self, cx: Cx<'a>, action: Action, req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>>;

    /// The next event of the driver's own task; pending when it has none.
    /// Must be cancel-safe: the component task selects over it.
    fn next_event(&mut self) -> Fut<'_, Event> {
        Box::pin(std::future::pending())
    }

    /// Apply an event from [`Driver::next_event`] (or one handed to the
    /// component by `ComponentHandle::notify`). Returns whether the status
    /// changed, so the caller publishes it: a manager tells each gateway
    /// its listing every poll, and an unchanged one is not republished.
    fn on_event(&mut self, _cx: Cx<'_>, _event: Event) -> bool {
        false
    }

    /// When the driver wants [`Driver::on_deadline`] called (a transient
    /// state settles, a grace period ends).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The deadline passed. Returns whether the state changed.
    fn on_deadline(&mut self, _cx: Cx<'_>, _now: Instant) -> bool {
        false
    }

    /// The component entered `error` from outside the driver (a refused
    /// message, a panic): drop what was pending.
    fn failed(&mut self) {}

    /// Live `status` fields merged over the stored ones (counters).
    fn live_status(&self) -> Option<Map<String, Value>> {
        None
    }

    /// Status fields to add to the answer of a ping with these
    /// `parameters` (a controller answering a distributed request with
    /// `include: ["components"]`); `None`: the usual status.
    fn ping_extra(&self, _parameters: &Map<String, Value>) -> Option<Map<String, Value>> {
        None
    }

    /// The status envelope of `uuid`, a component this one speaks for
    /// without a task of its own (a gateway's devices).
    fn member_status(&self, _uuid: uuid::Uuid, _info: &crate::protocol::DaemonInfo) -> Option<Value> {
        None
    }

    /// The IoT agent this component runs (a gateway's devices and their
    /// commands), for the HTTP API.
    fn devices(&self) -> Option<std::sync::Arc<crate::iot::Core>> {
        None
    }

    /// The component is being deleted: release what the driver holds
    /// (delete the Job, stop the agent).
    fn remove<'a>(&'a mut self, _cx: Cx<'a>) -> Fut<'a, ()> {
        Box::pin(async {})
    }
}

/// The driver of a new component of `kind`.
pub(super) fn build(kind: &Kind, core: &Core, env: &std::sync::Arc<crate::component::Env>) -> Box<dyn Driver> {
    use kinds::Driver as D;
    match &kind.driver {
        D::Dummy => Box::new(dummy::Dummy::new(core)),
        D::GenericManager => Box::new(manager::Manager::new(manager::Shape::AsGiven)),
        D::KubernetesManager => Box::new(manager::Manager::new(manager::Shape::KubernetesJob)),
        D::KubernetesSimpleManager => Box::new(manager::Manager::new(manager::Shape::KubernetesSimple)),
        D::Process(spec) => Box::new(process::Process::new(spec.clone())),
        D::KubernetesJob => Box::new(kubernetes::Kubernetes::default()),
        D::IotAgent => Box::new(gateway::Gateway::default()),
        D::Controller => Box::new(controller::Controller::new(env)),
        D::VillasNodeManager => Box::new(villas::Manager::new(villas::Flavour::Node)),
        D::VillasRelayManager => Box::new(villas::Manager::new(villas::Flavour::Relay)),
        D::VillasNodeGateway => Box::new(villas::Gateway::new(villas::Flavour::Node, &core.properties)),
        D::VillasRelayGateway => Box::new(villas::Gateway::new(villas::Flavour::Relay, &core.properties)),
    }
}
