//! Prometheus metrics, owned by the daemon (not global) so tests can read them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
        registry.register("messages_in", "AMQP messages consumed", messages_in.clone());
        registry.register("messages_out", "AMQP messages published", messages_out.clone());
        registry.register("errors", "Rejected messages and failed actions by kind", errors.clone());
        registry.register("components", "Components by state", components.clone());
        registry.register("broker_connects", "Broker connections established", connects.clone());
        Self { registry, messages_in, messages_out, errors, components, connects }
    }

    /// Count one error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    /// The count of errors of `kind` so far.
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

    /// Render in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
