//! Prometheus metrics, owned by the daemon (not global) so tests can read
//! them. One registry for everything the daemon runs: its own counters,
//! HTTP requests of every listener, and the IoT gateways' measure counters
//! (which stay lock-free atomics on the hot path and are read at scrape
//! time, see [`GatewaySource`]). A gateway's own `/metrics` renders the same
//! families for itself alone ([`render_gateway`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// What went wrong: the `kind` label of `busbar_errors_total`. One list,
/// so the labels dashboards and alerts rely on are written in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A message refused by the decoder (`invalid_json`, `too_large`, …:
    /// the rejection's own label).
    Rejected(&'static str),
    /// A non-ping action sent to no component (`uuid: ""`).
    BroadcastAction,
    /// An action name the protocol does not have.
    UnknownAction,
    /// An action this component type does not take.
    UnsupportedAction,
    /// An action the state table refuses in the current state.
    InvalidTransition,
    /// Parameters that do not fit the type's schema.
    Validation,
    /// Too many actions waiting for their `when`.
    ScheduleFull,
    /// A handler panicked (a bug; the message is dropped).
    Panic,
    /// The embedded store failed.
    Store,
    /// Create parameters that are not a component spec.
    InvalidCreate,
    /// A create naming a uuid in use.
    DuplicateUuid,
    /// A create of an unknown category or type.
    UnknownType,
    /// A create setting properties the daemon's config does not allow.
    RefusedCreate,
    /// A delete of an unknown component.
    UnknownComponent,
    /// A delete of a component another manager manages.
    NotManaged,
    /// A delete of a component from the configuration file.
    ConfiguredComponent,
    /// A start whose command line the sandbox refuses.
    RefusedCommand,
    /// A process that could not be prepared or spawned.
    Process,
    /// A process that exited with a non-zero code.
    ProcessExit,
    /// A process killed by a signal.
    ProcessSignal,
    /// A results upload that failed.
    Upload,
    /// An IoT agent that could not start.
    GatewayStart,
    /// A Kubernetes Job that failed.
    JobFailed,
    /// A Kubernetes Job deleted outside busbar.
    JobVanished,
    /// The Kubernetes API failed.
    KubernetesApi,
}

impl Fault {
    /// Every fault with a label of its own (not `Rejected`, whose labels
    /// are the rejections'). Their series exist from the start, at 0, so
    /// a rate or an alert on them works before the first error.
    pub const ALL: [Fault; 24] = [
        Fault::BroadcastAction,
        Fault::UnknownAction,
        Fault::UnsupportedAction,
        Fault::InvalidTransition,
        Fault::Validation,
        Fault::ScheduleFull,
        Fault::Panic,
        Fault::Store,
        Fault::InvalidCreate,
        Fault::DuplicateUuid,
        Fault::UnknownType,
        Fault::RefusedCreate,
        Fault::UnknownComponent,
        Fault::NotManaged,
        Fault::ConfiguredComponent,
        Fault::RefusedCommand,
        Fault::Process,
        Fault::ProcessExit,
        Fault::ProcessSignal,
        Fault::Upload,
        Fault::GatewayStart,
        Fault::JobFailed,
        Fault::JobVanished,
        Fault::KubernetesApi,
    ];

    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Rejected(kind) => kind,
            Fault::BroadcastAction => "broadcast_action",
            Fault::UnknownAction => "unknown_action",
            Fault::UnsupportedAction => "unsupported_action",
            Fault::InvalidTransition => "invalid_transition",
            Fault::Validation => "validation",
            Fault::ScheduleFull => "schedule_full",
            Fault::Panic => "panic",
            Fault::Store => "store",
            Fault::InvalidCreate => "invalid_create",
            Fault::DuplicateUuid => "duplicate_uuid",
            Fault::UnknownType => "unknown_type",
            Fault::RefusedCreate => "refused_create",
            Fault::UnknownComponent => "unknown_component",
            Fault::NotManaged => "not_managed",
            Fault::ConfiguredComponent => "configured_component",
            Fault::RefusedCommand => "refused_command",
            Fault::Process => "process",
            Fault::ProcessExit => "process_exit",
            Fault::ProcessSignal => "process_signal",
            Fault::Upload => "upload",
            Fault::GatewayStart => "gateway_start",
            Fault::JobFailed => "job_failed",
            Fault::JobVanished => "job_vanished",
            Fault::KubernetesApi => "kubernetes_api",
        }
    }
}

impl From<&crate::state::TransitionError> for Fault {
    fn from(e: &crate::state::TransitionError) -> Fault {
        use crate::state::TransitionError as T;
        match e {
            T::UnknownAction(_) => Fault::UnknownAction,
            T::Unsupported { .. } => Fault::UnsupportedAction,
            T::Invalid { .. } => Fault::InvalidTransition,
        }
    }
}

impl From<&crate::protocol::Rejection> for Fault {
    fn from(r: &crate::protocol::Rejection) -> Fault {
        Fault::Rejected(r.kind())
    }
}

/// Label for errors: what went wrong.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// e.g. `invalid_json`, `invalid_transition`.
    pub kind: String,
}

/// Label for the component gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Component state.
    pub state: String,
}

/// Labels of an HTTP request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// Which listener: `api`, `north`, `south`.
    pub server: &'static str,
    /// The route template (`/api/v1/component/{uuid}`), or `unmatched`: a
    /// bounded set, whatever paths clients send.
    pub route: String,
    /// The request method.
    pub method: String,
    /// The answer's status code.
    pub status: u16,
}

/// All metrics of one daemon.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages consumed from the broker.
    pub messages_in: Counter,
    /// Messages published to the broker.
    pub messages_out: Counter,
    /// Rejected messages and failed actions, by kind.
    pub errors: Family<KindLabel, Counter>,
    /// Components by state.
    pub components: Family<StateLabel, Gauge>,
    /// Broker (re)connections established.
    pub connects: Counter,
    /// Statuses the federation directory heard.
    pub directory_statuses: Counter,
    /// HTTP requests answered, by listener, route, method and status.
    pub http_requests: Family<RequestLabel, Counter>,
    /// The running IoT gateways, read at scrape time.
    gateways: Gateways,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under `busbar_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("busbar");
        let messages_in = Counter::default();
        let messages_out = Counter::default();
        let errors = Family::<KindLabel, Counter>::default();
        let components = Family::<StateLabel, Gauge>::default();
        let connects = Counter::default();
        let directory_statuses = Counter::default();
        let http_requests = Family::<RequestLabel, Counter>::default();
        registry.register("messages_in", "AMQP messages consumed", messages_in.clone());
        registry.register("messages_out", "AMQP messages published", messages_out.clone());
        registry.register("errors", "Rejected messages and failed actions by kind", errors.clone());
        registry.register("components", "Components by state", components.clone());
        registry.register("broker_connects", "Broker connections established", connects.clone());
        registry.register(
            "directory_statuses",
            "Statuses heard by the federation directory",
            directory_statuses.clone(),
        );
        registry.register("http_requests", "HTTP requests answered", http_requests.clone());
        for fault in Fault::ALL {
            let _ = errors.get_or_create(&KindLabel { kind: fault.as_str().to_owned() });
        }
        let gateways = Gateways::default();
        registry.sub_registry_with_prefix("gateway").register_collector(Box::new(gateways.clone()));
        Self {
            registry,
            messages_in,
            messages_out,
            errors,
            components,
            connects,
            directory_statuses,
            http_requests,
            gateways,
        }
    }

    /// Count one error.
    pub fn error(&self, fault: Fault) {
        self.errors.get_or_create(&KindLabel { kind: fault.as_str().to_owned() }).inc();
    }

    /// The count of errors labelled `kind` so far.
    pub fn error_count(&self, kind: &str) -> u64 {
        self.errors.get_or_create(&KindLabel { kind: kind.to_owned() }).get()
    }

    /// Move one component between state gauges (`from = None` when it appears,
    /// `to = None` when it goes away).
    pub fn state_change(&self, from: Option<&str>, to: Option<&str>) {
        if let Some(f) = from {
            self.components.get_or_create(&StateLabel { state: f.to_owned() }).dec();
        }
        if let Some(t) = to {
            self.components.get_or_create(&StateLabel { state: t.to_owned() }).inc();
        }
    }

    /// Report `gateway`'s counters (as `busbar_gateway_*{gateway=…}`) for as
    /// long as it lives.
    pub fn add_gateway(&self, gateway: Weak<dyn GatewaySource>) {
        let mut list = self.gateways.0.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|g| g.strong_count() > 0);
        list.push(gateway);
    }

    /// Render in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What an IoT gateway reports at scrape time.
pub trait GatewaySource: Send + Sync + std::fmt::Debug {
    /// Its counters now.
    fn snapshot(&self) -> GatewaySnapshot;
}

/// One gateway's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct GatewaySnapshot {
    /// The gateway's uuid (the `gateway` label in the daemon's registry).
    pub gateway: String,
    /// Provisioned devices.
    pub devices: u64,
    /// Measures accepted: MQTT, HTTP, AMQP.
    pub measures_in: [u64; 3],
    /// Measures confirmed by the federation broker.
    pub measures_out: u64,
    /// Measures dropped by a full buffer.
    pub dropped: u64,
    /// Measures waiting for the federation broker.
    pub buffered: u64,
    /// Refusals and faults by kind.
    pub errors: BTreeMap<String, u64>,
    /// Whether it accepts measures.
    pub ready: bool,
    /// Whether MQTT is connected and subscribed.
    pub mqtt_connected: bool,
    /// Whether the federation publisher is connected.
    pub federation_connected: bool,
}

/// The live gateways (weak: a deleted gateway drops out by itself).
#[derive(Debug, Clone, Default)]
struct Gateways(Arc<Mutex<Vec<Weak<dyn GatewaySource>>>>);

impl Collector for Gateways {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live: Vec<Arc<dyn GatewaySource>> =
            self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        let snapshots: Vec<GatewaySnapshot> = live.iter().map(|g| g.snapshot()).collect();
        encode_gateways(&snapshots, true, &mut encoder)
    }
}

/// The gateway families (iotagent names: `devices`, `measureRequests`, …)
/// with one sample per gateway; labelled by `gateway` in the daemon's
/// registry, unlabelled on a gateway's own `/metrics`.
fn encode_gateways(gateways: &[GatewaySnapshot], labelled: bool, e: &mut DescriptorEncoder) -> std::fmt::Result {
    type Labels = Vec<(&'static str, String)>;
    let base = |g: &GatewaySnapshot| -> Labels { if labelled { vec![("gateway", g.gateway.clone())] } else { vec![] } };
    let gauge = |e: &mut DescriptorEncoder, name: &str, help: &str, f: &dyn Fn(&GatewaySnapshot) -> u64| {
        let mut m = e.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
        for g in gateways {
            let (labels, v) = (base(g), ConstGauge::new(f(g) as i64));
            if labels.is_empty() {
                // A gateway's own page: one sample, no `{}`.
                return v.encode(m);
            }
            v.encode(m.encode_family(&labels)?)?;
        }
        Ok::<(), std::fmt::Error>(())
    };
    let counter =
        |e: &mut DescriptorEncoder, name: &str, help: &str, f: &dyn Fn(&GatewaySnapshot) -> Vec<(Labels, u64)>| {
            let mut m = e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
            for g in gateways {
                for (extra, v) in f(g) {
                    let mut labels = base(g);
                    labels.extend(extra);
                    if labels.is_empty() {
                        return ConstCounter::new(v).encode(m);
                    }
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
            Ok::<(), std::fmt::Error>(())
        };
    gauge(e, "devices", "provisioned devices", &|g| g.devices)?;
    counter(e, "measureRequests", "measures accepted, by transport", &|g| {
        ["mqtt", "http", "amqp"]
            .into_iter()
            .zip(g.measures_in)
            .map(|(t, v)| (vec![("transport", t.to_owned())], v))
            .collect()
    })?;
    counter(e, "measuresOut", "measures confirmed by the federation broker", &|g| vec![(vec![], g.measures_out)])?;
    counter(e, "measuresDropped", "measures dropped by a full buffer", &|g| vec![(vec![], g.dropped)])?;
    gauge(e, "measuresBuffered", "measures waiting for the federation broker", &|g| g.buffered)?;
    counter(e, "errors", "errors by kind", &|g| {
        g.errors.iter().map(|(k, v)| (vec![("kind", k.clone())], *v)).collect()
    })?;
    gauge(e, "ready", "1 when the gateway accepts measures", &|g| u64::from(g.ready))?;
    gauge(e, "mqttConnected", "1 when the MQTT client is connected and subscribed", &|g| u64::from(g.mqtt_connected))?;
    gauge(e, "federationConnected", "1 when the federation publisher is connected", &|g| {
        u64::from(g.federation_connected)
    })
}

/// One gateway's families in the OpenMetrics text format, unlabelled (its
/// own `/metrics`, as iotagent-json serves it).
pub fn render_gateway(gateway: GatewaySnapshot) -> String {
    #[derive(Debug)]
    struct One(GatewaySnapshot);
    impl Collector for One {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_gateways(std::slice::from_ref(&self.0), false, &mut encoder)
        }
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(One(gateway)));
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(gateway: &str) -> GatewaySnapshot {
        GatewaySnapshot {
            gateway: gateway.into(),
            devices: 3,
            measures_in: [1, 2, 0],
            errors: BTreeMap::from([("bad_payload".to_owned(), 4)]),
            ready: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_gateways_own_page_is_unlabelled_and_the_daemons_labels_every_gateway() {
        let page = render_gateway(snapshot("g1"));
        for line in ["devices 3", "measureRequests_total{transport=\"http\"} 2", "errors_total{kind=\"bad_payload\"} 4"]
        {
            assert!(page.lines().any(|l| l == line), "{line} missing:\n{page}");
        }
        assert!(!page.contains("{}") && page.ends_with("# EOF\n"), "{page}");
        let m = Metrics::new();
        let (a, b): (Arc<dyn GatewaySource>, Arc<dyn GatewaySource>) =
            (Arc::new(Fixed(snapshot("a"))), Arc::new(Fixed(snapshot("b"))));
        m.add_gateway(Arc::downgrade(&a));
        m.add_gateway(Arc::downgrade(&b));
        let all = m.render();
        assert_eq!(all.matches("# TYPE busbar_gateway_devices gauge").count(), 1, "one family:\n{all}");
        for g in ["a", "b"] {
            let line = format!("busbar_gateway_devices{{gateway=\"{g}\"}} 3");
            assert!(all.contains(&line), "{line} missing:\n{all}");
        }
        drop(b);
        assert!(!m.render().contains("gateway=\"b\""), "a deleted gateway drops out");
    }

    #[test]
    fn fault_labels_are_distinct_snake_case_words() {
        let all = Fault::ALL;
        let labels: std::collections::HashSet<_> = all.iter().map(|f| f.as_str()).collect();
        assert_eq!(labels.len(), all.len(), "two faults share a label");
        assert!(labels.iter().all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')), "{labels:?}");
        let m = Metrics::new();
        m.error(Fault::from(&crate::state::TransitionError::UnknownAction("x".into())));
        m.error(Fault::from(&crate::protocol::Rejection::MissingAction));
        assert_eq!((m.error_count("unknown_action"), m.error_count("missing_action")), (1, 1));
    }

    #[derive(Debug)]
    struct Fixed(GatewaySnapshot);
    impl GatewaySource for Fixed {
        fn snapshot(&self) -> GatewaySnapshot {
            self.0.clone()
        }
    }
}
