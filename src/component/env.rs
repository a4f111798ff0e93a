//! What a component task may use of the daemon it runs in.
//!
//! The daemon builds one [`Env`] and hands it to every component and IoT
//! agent; they never see the daemon itself, its configuration file or its
//! HTTP API. Each field is a narrow handle: the bus's outbox, the store, the
//! registry, metrics, and the few settings a component reads.

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{ComponentHandle, Registry, kinds};
use crate::bus::Bus;
use crate::config::ComponentSpec;
use crate::metrics::Metrics;
use crate::protocol::DaemonInfo;
use crate::store::Store;

/// The daemon-wide settings components read (from the daemon's config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The realm of components that name none.
    pub realm: Option<String>,
    /// How often every component republishes its status.
    pub status_interval: Duration,
    /// Privileged properties a runtime `create` may set.
    pub create_may_set: Vec<String>,
    /// The broker the daemon uses (the IoT agent's federation publisher and
    /// AMQP southbound connect to it too).
    pub broker_url: String,
    /// The daemon's data directory (run directories live under it).
    pub data_dir: std::path::PathBuf,
    /// The uuid of this daemon's controller IC.
    pub controller: Uuid,
    /// Between the controller's alive messages.
    pub alive_interval: Duration,
    /// The instance name (`site`, else the host name): the `aud` of JWTs
    /// for this daemon's listeners.
    pub instance: String,
}

/// Everything a component task may use; one per daemon, shared.
#[derive(Debug)]
pub struct Env {
    /// Settings from the daemon's config.
    pub settings: Settings,
    /// Host facts for status messages.
    pub info: DaemonInfo,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The embedded store.
    pub store: Store,
    /// The bus: routes a component's queue, publishes its statuses.
    pub bus: Bus,
    /// Known component types (a manager checks a create against them).
    pub kinds: kinds::Kinds,
    /// Cancelled once, on shutdown.
    pub shutdown: CancellationToken,
    /// Every long-lived task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Kubernetes API clients.
    pub kube: Arc<crate::k8s::Clients>,
    /// Every running component, by uuid.
    pub components: Arc<Registry>,
    /// The federation directory (fed by `directory::feed`).
    pub directory: Arc<std::sync::Mutex<crate::directory::Directory>>,
    /// The shared snapshot of the whole directory (its own lock).
    pub whole_view: Arc<std::sync::Mutex<crate::directory::WholeView>>,
    /// Statuses and device measures for live viewers (`/api/v1/events`).
    pub events: crate::events::Hub,
}

impl Env {
    /// Start a component, register it and route it; it announces itself as
    /// soon as its queue is bound.
    pub(crate) async fn add_component(
        self: &Arc<Self>,
        spec: &ComponentSpec,
        kind: Arc<kinds::Kind>,
        uuid: Uuid,
        managed_by: Option<Uuid>,
        persisted: bool,
    ) -> ComponentHandle {
        let handle = super::spawn(self, spec, kind, uuid, managed_by, persisted);
        self.components.insert(handle.clone());
        self.bus.subscribe(handle.clone());
        handle
    }

    /// Unroute and unregister a component; it publishes `gone` once and stops.
    pub(crate) async fn remove_component(&self, uuid: Uuid) {
        if let Some(h) = self.components.remove(uuid) {
            self.bus.unsubscribe((*h.keys).clone());
            h.remove().await;
        }
    }
}
