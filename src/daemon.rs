//! The daemon: wires store, bus, components and the HTTP API together, and
//! shuts them down in order (signal → cancel all → wait for all).

use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use uuid::Uuid;

use crate::Error;
use crate::bus::Bus;
use crate::component::{self, ComponentHandle, kinds};
use crate::config::{ComponentSpec, Config};
use crate::metrics::Metrics;
use crate::protocol::DaemonInfo;
use crate::store::Store;

/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// State shared by every task of one daemon.
#[derive(Debug)]
pub struct Shared {
    /// The configuration it runs with.
    pub config: Config,
    /// Host facts for status messages.
    pub info: DaemonInfo,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The embedded store.
    pub store: Store,
    /// The bus handle.
    pub bus: Bus,
    /// Known component types.
    pub kinds: kinds::Kinds,
    /// Cancelled once, on shutdown.
    pub shutdown: CancellationToken,
    /// Every long-lived task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Kubernetes API clients.
    pub kube: Arc<crate::k8s::Clients>,
    /// Every running component, by uuid.
    pub components: Arc<component::Registry>,
}

impl Shared {
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
        let handle = component::spawn(self, spec, kind, uuid, managed_by, persisted);
        self.components.insert(handle.clone());
        self.bus.subscribe(handle.clone());
        handle
    }

    /// Unroute and unregister a component; it publishes `gone` once and stops.
    pub(crate) async fn remove_component(&self, uuid: Uuid) {
        let handle = self.components.remove(uuid);
        if let Some(h) = handle {
            self.bus.unsubscribe((*h.keys).clone());
            h.remove().await;
        }
    }
}

/// A running daemon, as returned by [`start`].
#[derive(Debug)]
pub struct Running {
    /// The shared state (for the API and tests).
    pub shared: Arc<Shared>,
    /// Where the HTTP API listens, if enabled.
    pub api_addr: Option<SocketAddr>,
}

impl Running {
    /// Stop everything and wait for every task to finish; an error if some
    /// task is still running after the grace period.
    pub async fn stop(self) -> Result<(), Error> {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.shared.tracker.wait()).await.is_err() {
            warn!(tasks = self.shared.tracker.len(), "some tasks did not stop within {SHUTDOWN_GRACE:?}");
            return Err(Error::Timeout(SHUTDOWN_GRACE));
        }
        info!("Goodbye");
        Ok(())
    }
}

/// What a daemon can be given besides its configuration (embedding, tests).
#[derive(Default)]
pub struct Options {
    /// Send every Kubernetes request to this client instead of inferring one
    /// from the environment or a kubeconfig.
    pub kube_client: Option<kube::Client>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("kube_client", &self.kube_client.is_some()).finish()
    }
}

/// Start a daemon: open the store, connect the bus (in the background), start
/// every configured and persisted component, and serve the API.
pub async fn start(config: Config) -> Result<Running, Error> {
    start_with(config, Options::default()).await
}

/// [`start`] with [`Options`].
pub async fn start_with(config: Config, options: Options) -> Result<Running, Error> {
    let kinds = config.kinds()?;
    let store = Store::open(&config.data_dir)?;
    let metrics = Arc::new(Metrics::new());
    let (bus, runner) = Bus::new(&config.exchange, config.max_body_bytes, &metrics);
    let components = Arc::new(component::Registry::default());
    let wiring = crate::bus::Wiring {
        url: config.broker.url.clone(),
        exchange: config.exchange.clone(),
        topology: config.topology,
        components: components.clone(),
        metrics: metrics.clone(),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    let shared = Arc::new(Shared {
        bus,
        kinds,
        config,
        info: DaemonInfo::detect(),
        metrics,
        store,
        shutdown: wiring.shutdown.clone(),
        tracker: wiring.tracker.clone(),
        kube: Arc::new(options.kube_client.map(crate::k8s::Clients::fixed).unwrap_or_default()),
        components,
    });
    runner.spawn(wiring);
    // A start that fails half-way stops what it started (the bus, the
    // components so far) before it reports why: nothing is left running.
    let started = async {
        start_components(&shared).await?;
        component::sweep_orphans(&shared);
        if !shared.config.api.enabled {
            return Ok::<_, Error>(None);
        }
        Ok(Some(crate::api::serve(shared.clone()).await?))
    };
    let api_addr = match started.await {
        Ok(addr) => addr,
        Err(e) => {
            let running = Running { shared, api_addr: None };
            if let Err(stop) = running.stop().await {
                warn!(error = %stop, "stopping after a failed start");
            }
            return Err(e);
        }
    };
    info!(components = shared.components.len(), api = ?api_addr, "busbar started");
    Ok(Running { shared, api_addr })
}

/// Run until `signal` resolves, then shut down gracefully.
pub async fn run(config: Config, signal: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let running = start(config).await?;
    tokio::select! {
        _ = signal => info!("shutdown requested"),
        _ = running.shared.shutdown.cancelled() => {}
    }
    running.stop().await
}

fn spec_map(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

async fn start_components(shared: &Arc<Shared>) -> Result<(), Error> {
    let cfg = &shared.config;
    let mut specs: Vec<ComponentSpec> = Vec::new();
    for (i, map) in cfg.components.iter().enumerate() {
        let spec = ComponentSpec::from_map(map.clone()).map_err(|e| Error::spec(format!("components[{i}]"), e))?;
        if spec.enabled {
            specs.push(spec);
        }
    }
    // The root manager: the first configured generic manager, or an implicit one.
    let root_pos = specs.iter().position(|s| s.category == "manager" && s.kind == "generic");
    let root = match root_pos {
        Some(i) => specs.remove(i),
        None => ComponentSpec::from_map(spec_map(&[
            ("category", "manager".into()),
            ("type", "generic".into()),
            ("name", "Generic Manager".into()),
            ("location", shared.info.host.clone().into()),
        ]))
        .map_err(|e| Error::spec("the implicit root manager", e))?,
    };
    let root_uuid = match root.uuid.or(cfg.uuid) {
        Some(u) => u,
        None => shared.store.identity("manager/generic/root")?,
    };
    let kind = shared.kinds.check(&root).map_err(|e| Error::spec("the root manager", e))?;
    shared.add_component(&root, kind, root_uuid, None, false).await;

    for spec in specs {
        let at = || format!("component {:?} ({}/{})", spec.name, spec.category, spec.kind);
        let kind = shared.kinds.check(&spec).map_err(|e| Error::spec(at(), e))?;
        let uuid = match spec.uuid {
            Some(u) => u,
            None => shared.store.identity(&format!("config:{}/{}/{}", spec.category, spec.kind, spec.name))?,
        };
        if shared.components.lookup(uuid).is_some() {
            return Err(Error::spec(at(), crate::config::SpecError::new("uuid", format!("duplicate uuid {uuid}"))));
        }
        shared.add_component(&spec, kind, uuid, Some(root_uuid), false).await;
    }

    for stored in shared.store.components()? {
        let spec = match ComponentSpec::from_map(stored.spec.clone()) {
            Ok(s) => s,
            Err(e) => {
                warn!(uuid = %stored.uuid, error = %e, "skipping stored component");
                continue;
            }
        };
        let Ok(kind) = shared.kinds.check(&spec) else {
            warn!(uuid = %stored.uuid, r#type = %spec.kind, "skipping stored component of unknown type");
            continue;
        };
        if shared.components.lookup(stored.uuid).is_some() {
            warn!(uuid = %stored.uuid, "stored component clashes with a configured one; configured wins");
            continue;
        }
        let manager = if shared.components.lookup(stored.manager).is_some() { stored.manager } else { root_uuid };
        shared.add_component(&spec, kind, stored.uuid, Some(manager), true).await;
    }
    Ok(())
}
