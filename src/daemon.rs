//! The daemon: wires store, bus, components and the HTTP API together, and
//! shuts them down in order (signal → cancel all → wait for all).

use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::Error;
use crate::bus::Bus;
use crate::component;
use crate::config::{ComponentSpec, Config};
use crate::metrics::Metrics;
use crate::protocol::DaemonInfo;
use crate::store::Store;

/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the daemon's own parts share: its configuration (for the API) and
/// the environment every component runs in.
#[derive(Debug)]
pub struct Shared {
    /// The configuration it runs with.
    pub config: Config,
    /// What components and IoT agents use (they see nothing else).
    pub env: Arc<component::Env>,
    /// Distributed requests to every controller of the federation.
    pub asker: crate::directory::Asker,
    /// Who may use the HTTP API (its keys loaded at start).
    pub gate: crate::auth::Gate,
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
        let env = &self.shared.env;
        // The controller says `gone` while the bus is still up, so the
        // other sites see this one leave rather than go stale.
        env.remove_component(env.settings.controller).await;
        env.shutdown.cancel();
        env.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, env.tracker.wait()).await.is_err() {
            warn!(tasks = env.tracker.len(), "some tasks did not stop within {SHUTDOWN_GRACE:?}");
            return Err(Error::Timeout(SHUTDOWN_GRACE));
        }
        info!("Goodbye");
        Ok(())
    }
}

/// Tune glibc's allocator for a long-running daemon; call first thing in
/// `main`, before other threads exist.
///
/// - glibc gives every thread its own malloc arena; a daemon this size
///   needs two, and each spare arena costs resident memory for nothing.
/// - Buffers of 1 MiB and more (the directory's whole-view snapshot is
///   ≈2.5 MB with 10,000 ICs, rebuilt up to 4 times a second while read)
///   are mapped and unmapped, so their memory goes back to the system.
///   glibc would otherwise raise its mapping threshold after the first
///   free and keep such buffers in the heap, where they stayed resident
///   (≈15 MiB in the directory benchmark instead of ≈2.5).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
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
    let controller = store.identity("controller/busbar")?;
    let directory = Arc::new(std::sync::Mutex::new(crate::directory::Directory::new(config.directory_cap)));
    let settings = component::Settings {
        controller,
        alive_interval: config.alive_interval(),
        realm: config.realm.clone(),
        status_interval: config.status_interval(),
        create_may_set: config.sandbox.create_may_set.clone(),
        broker_url: config.broker.url.clone(),
        data_dir: config.data_dir.clone(),
        instance: config.instance_name(),
    };
    let env = Arc::new(component::Env {
        settings,
        bus,
        kinds,
        info: DaemonInfo::detect(),
        metrics,
        store,
        shutdown: wiring.shutdown.clone(),
        tracker: wiring.tracker.clone(),
        kube: Arc::new(options.kube_client.map(crate::k8s::Clients::fixed).unwrap_or_default()),
        components,
        directory: directory.clone(),
        events: crate::events::Hub::default(),
        whole_view: Arc::default(),
    });
    let (asker, asks) = crate::directory::Asker::new(directory.clone());
    let feed = crate::directory::Feed {
        url: config.broker.url.clone(),
        exchange: config.exchange.clone(),
        directory,
        heard: env.metrics.directory_statuses.clone(),
        max_body: config.max_body_bytes,
        events: env.events.clone(),
        whole_view: env.whole_view.clone(),
    };
    env.tracker.spawn(crate::directory::feed(feed, asks, env.shutdown.clone()));
    let gate = config.api_gate(std::path::Path::new("config"))?;
    let shared = Arc::new(Shared { config, env, asker, gate });
    runner.spawn(wiring);
    // A start that fails half-way stops what it started (the bus, the
    // components so far) before it reports why: nothing is left running.
    let started = async {
        start_components(&shared).await?;
        component::sweep_orphans(&shared.env);
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
    info!(components = shared.env.components.len(), api = ?api_addr, "busbar started");
    Ok(Running { shared, api_addr })
}

/// Run until `signal` resolves, then shut down gracefully.
pub async fn run(config: Config, signal: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let running = start(config).await?;
    tokio::select! {
        _ = signal => info!("shutdown requested"),
        _ = running.shared.env.shutdown.cancelled() => {}
    }
    running.stop().await
}

fn spec_map(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

/// A VILLASnode or VILLASrelay manager without a configured uuid takes
/// its instance's, as VILLAScontroller's does.
async fn adopted_uuid(kind: &component::kinds::Kind, spec: &ComponentSpec) -> Option<uuid::Uuid> {
    use component::kinds::Driver;
    let relay = match kind.driver {
        Driver::VillasNodeManager => false,
        Driver::VillasRelayManager => true,
        _ => return None,
    };
    let url = spec.properties.get("api_url")?.as_str()?;
    let found = crate::villas::instance_uuid(relay, url).await;
    if found.is_none() {
        warn!(component = %spec.name, api_url = %url, "cannot read the instance's uuid; using a generated one");
    }
    found
}

async fn start_components(shared: &Arc<Shared>) -> Result<(), Error> {
    let cfg = &shared.config;
    let env = &shared.env;
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
            ("location", env.info.host.clone().into()),
        ]))
        .map_err(|e| Error::spec("the implicit root manager", e))?,
    };
    let root_uuid = match root.uuid.or(cfg.uuid) {
        Some(u) => u,
        None => env.store.identity("manager/generic/root")?,
    };
    let site = cfg.site.clone().unwrap_or_else(|| env.info.host.clone());
    let controller = ComponentSpec::from_map(spec_map(&[
        ("category", "controller".into()),
        ("type", "busbar".into()),
        ("name", site.clone().into()),
        ("site", site.into()),
        ("location", env.info.host.clone().into()),
    ]))
    .map_err(|e| Error::spec("the controller", e))?;
    let kind = env.kinds.lookup("controller", "busbar").expect("a built-in type");
    let me = env.settings.controller;
    env.add_component(&controller, kind, me, None, false).await;
    let kind = env.kinds.check(&root).map_err(|e| Error::spec("the root manager", e))?;
    env.add_component(&root, kind, root_uuid, None, false).await;

    for spec in specs {
        let at = || format!("component {:?} ({}/{})", spec.name, spec.category, spec.kind);
        let kind = env.kinds.check(&spec).map_err(|e| Error::spec(at(), e))?;
        let uuid = match spec.uuid {
            Some(u) => u,
            None => match adopted_uuid(&kind, &spec).await {
                Some(u) => u,
                None => env.store.identity(&format!("config:{}/{}/{}", spec.category, spec.kind, spec.name))?,
            },
        };
        if env.components.lookup(uuid).is_some() {
            return Err(Error::spec(at(), crate::config::SpecError::new("uuid", format!("duplicate uuid {uuid}"))));
        }
        env.add_component(&spec, kind, uuid, Some(root_uuid), false).await;
    }

    for stored in env.store.components()? {
        let spec = match ComponentSpec::from_map(stored.spec.clone()) {
            Ok(s) => s,
            Err(e) => {
                warn!(uuid = %stored.uuid, error = %e, "skipping stored component");
                continue;
            }
        };
        let Ok(kind) = env.kinds.check(&spec) else {
            warn!(uuid = %stored.uuid, r#type = %spec.kind, "skipping stored component of unknown type");
            continue;
        };
        if env.components.lookup(stored.uuid).is_some() {
            warn!(uuid = %stored.uuid, "stored component clashes with a configured one; configured wins");
            continue;
        }
        let manager = if env.components.lookup(stored.manager).is_some() { stored.manager } else { root_uuid };
        env.add_component(&spec, kind, stored.uuid, Some(manager), true).await;
    }
    Ok(())
}
