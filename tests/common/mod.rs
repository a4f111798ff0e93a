//! Shared harness for integration tests against the real RabbitMQ.
//!
//! Every test gets its own exchange (`test-<id>`), data directory, realm
//! and uuids, so tests run in parallel without seeing each other. Every
//! wait has a deadline; nothing sleeps blindly.

#![allow(dead_code)]

pub mod broker;
pub mod browser;
pub mod fake_kube;
pub mod fake_villas;
pub mod iot;
pub mod orion;

use busbar::client::{Client, Listener, Seen};
use busbar::config::Config;
use busbar::daemon::{self, Running};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// Broker URL for tests (`AMQP_URL` overrides).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A config value as a file's text: JSON, which YAML reads as it is.
pub fn text_of(config: &Value) -> String {
    serde_json::to_string_pretty(config).expect("a config serialises")
}

/// Default deadline for waits.
pub const WAIT: Duration = Duration::from_secs(10);

/// One isolated test environment.
pub struct TestEnv {
    /// Short unique id.
    pub id: String,
    /// The test's exchange.
    pub exchange: String,
    /// The test's realm.
    pub realm: String,
    /// Data directory (kept across daemon restarts within the test).
    pub dir: tempfile::TempDir,
    /// The manager's uuid.
    pub manager: Uuid,
    /// A dummy simulator's uuid.
    pub dummy: Uuid,
}

impl TestEnv {
    /// A fresh environment.
    pub fn new() -> TestEnv {
        busbar::telemetry::init("warn,lapin=off", false);
        busbar::http::install_crypto_provider();
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        TestEnv {
            exchange: format!("test-{id}"),
            realm: format!("test.{id}"),
            id,
            dir: tempfile::tempdir().expect("tempdir"),
            manager: Uuid::new_v4(),
            dummy: Uuid::new_v4(),
        }
    }

    /// The default config, as a typed value: a generic manager and one
    /// fast dummy. Paths go in as they are, whatever characters they hold.
    pub fn config_value(&self) -> Value {
        json!({
            "broker": {"url": amqp_url()},
            "exchange": self.exchange,
            "realm": self.realm,
            "status_interval": 30,
            "data_dir": self.dir.path().join("data"),
            "api": {"bind": "127.0.0.1:0"},
            "components": [
                {"category": "manager", "type": "generic", "name": "Test Manager", "uuid": self.manager},
                {"category": "simulator", "type": "dummy", "name": "Dummy Simulator #1", "uuid": self.dummy,
                 "location": "Test bench", "owner": "svg",
                 "durations": {"stop": 0.05, "pause": 0.05, "resume": 0.05, "reset": 0.05, "shutdown": 0.05}},
            ],
        })
    }

    /// The default config as a file's text (JSON, which is YAML): for
    /// tests that hand the daemon a file.
    pub fn config_yaml(&self) -> String {
        text_of(&self.config_value())
    }

    /// A config from a typed value, through the same parser and checks as
    /// a file.
    pub fn config_of(&self, value: &Value) -> Config {
        self.config(&text_of(value))
    }

    /// Parse a config text for this environment.
    pub fn config(&self, yaml: &str) -> Config {
        Config::parse(yaml, Path::new("test.yaml")).expect("test config is valid")
    }

    /// Start a daemon with the default config.
    pub async fn start(&self) -> Running {
        self.start_with(self.config(&self.config_yaml())).await
    }

    /// Start a daemon with `config` and wait until it is connected.
    pub async fn start_with(&self, config: Config) -> Running {
        self.start_opts(config, daemon::Options::default()).await
    }

    /// Start a daemon with `config` and `options` and wait until it is
    /// connected.
    pub async fn start_opts(&self, config: Config, options: daemon::Options) -> Running {
        let running = daemon::start_with(config, options).await.expect("daemon starts");
        let end = Instant::now() + WAIT;
        while !running.shared.env.bus.connected() {
            assert!(Instant::now() < end, "daemon did not connect to the broker");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running
    }

    /// Start a daemon with `yaml`, plus a client and a listener that sees
    /// every message: the usual opening of a test.
    pub async fn up(&self, yaml: &str) -> (Running, Client, Listener) {
        let d = self.start_with(self.config(yaml)).await;
        let c = self.client().await;
        let l = self.listen_all(&c).await;
        (d, c, l)
    }

    /// [`TestEnv::up`] with a typed config (no YAML text to splice).
    pub async fn up_with(&self, config: Config) -> (Running, Client, Listener) {
        let d = self.start_with(config).await;
        let c = self.client().await;
        let l = self.listen_all(&c).await;
        (d, c, l)
    }

    /// The default config plus `components`, as typed values: paths and
    /// regexes go in as they are, whatever characters they hold.
    pub fn config_with(&self, components: Vec<Value>) -> Config {
        self.config_of(&self.config_value_with(components))
    }

    /// [`TestEnv::config_value`] plus `components`.
    pub fn config_value_with(&self, components: Vec<Value>) -> Value {
        let mut v = self.config_value();
        v["components"].as_array_mut().expect("components").extend(components);
        v
    }

    /// A whitelist regex allowing everything under the fixture programs
    /// directory, wherever the checkout is.
    pub fn fixtures_whitelist(&self) -> String {
        format!("{}/", regex::escape(&fixtures_bin()))
    }

    /// A client on this environment's exchange.
    pub async fn client(&self) -> Client {
        Client::connect(&amqp_url(), &self.exchange).await.expect("client connects")
    }

    /// A listener that sees every message on the exchange.
    pub async fn listen_all(&self, client: &Client) -> Listener {
        client.listen(FieldTable::default()).await.expect("listen")
    }
}

impl Drop for TestEnv {
    /// Delete the test's exchange, so repeated runs leave nothing on the
    /// broker (the daemon declares it durable, as VILLAS requires).
    fn drop(&mut self) {
        let exchange = self.exchange.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let conn =
                    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.ok()?;
                let ch = conn.create_channel().await.ok()?;
                let _ = ch
                    .exchange_delete(exchange.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
                    .await;
                let _ = conn.close(200, "bye".into()).await;
                Some(())
            })
        })
        .join();
    }
}

/// Wait for a status of `uuid` satisfying `pred`.
pub async fn status_of(l: &mut Listener, uuid: Uuid, pred: impl Fn(&Value) -> bool) -> Value {
    status_within(l, uuid, WAIT, pred).await.unwrap_or_else(|| panic!("no matching status from {uuid} within {WAIT:?}"))
}

/// The next status of `uuid` that satisfies `pred` within `window`, if any.
pub async fn status_within(
    l: &mut Listener,
    uuid: Uuid,
    window: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let end = Instant::now() + window;
    let want = uuid.to_string();
    while let Some(seen) = l.next_until(end).await {
        if seen.is_status()
            && seen.payload.pointer("/properties/uuid").and_then(Value::as_str) == Some(&want)
            && pred(&seen.payload)
        {
            return Some(seen.payload);
        }
    }
    None
}

/// Wait for the status of `uuid` to be in `state`.
pub async fn state_of(l: &mut Listener, uuid: Uuid, state: &str) -> Value {
    status_of(l, uuid, |v| v["status"]["state"] == state).await
}

/// Collect every message that arrives within `window`.
pub async fn collect_for(l: &mut Listener, window: Duration) -> Vec<Seen> {
    let end = Instant::now() + window;
    let mut out = Vec::new();
    while let Some(s) = l.next_until(end).await {
        out.push(s);
    }
    out
}

/// The fixture programs directory.
pub fn fixtures_bin() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bin").to_owned()
}

/// The body of an action.
pub fn action(name: &str, parameters: Value) -> Value {
    json!({"action": name, "parameters": parameters})
}

/// Headers addressing one uuid.
pub fn to_uuid(uuid: Uuid) -> FieldTable {
    busbar::protocol::Filter { uuid: Some(uuid.to_string()), ..Default::default() }.action_headers()
}

/// Run the `busbar` binary against the test's exchange and broker, and
/// give up after 30 s (a hung CLI fails the test instead of the suite).
/// `validate-config` and `types` take no exchange.
pub async fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar"));
    cmd.args(args).env("AMQP_URL", amqp_url()).env_remove("RUST_LOG").kill_on_drop(true);
    // Client commands talk to this test's exchange.
    if args.first().is_some_and(|a| {
        ["ping", "monitor", "action", "create", "delete", "sites", "components", "command"].contains(a)
    }) {
        cmd.args(["--exchange", &env.exchange]);
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
        .await
        .expect("CLI finished within 30 s")
        .expect("CLI runs")
}

/// Poll `f` until it returns something, or fail after `deadline` naming
/// `what`. The one polling helper: tests wait for conditions, never sleep
/// a fixed time and hope.
pub async fn eventually<T>(deadline: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The states `uuid` published, in order, from what `l` has received (the
/// listener is drained until `window` passes without a message).
pub async fn published_states(l: &mut Listener, uuid: Uuid, window: Duration) -> Vec<busbar::state::State> {
    let want = uuid.to_string();
    let mut out = Vec::new();
    loop {
        let seen = collect_for(l, window).await;
        if seen.is_empty() {
            return out;
        }
        out.extend(
            seen.iter()
                .filter(|s| s.is_status())
                .filter(|s| s.payload.pointer("/properties/uuid").and_then(Value::as_str) == Some(&want))
                .filter_map(|s| s.state()?.parse::<busbar::state::State>().ok()),
        );
    }
}

/// Assert that `states` (as published, in order) moves only along edges of
/// the VILLAS table or the declared observed edges (`adopted`: the
/// component adopted running work after a restart). Repeats are
/// re-publications, not transitions.
pub fn assert_table_edges(states: &[busbar::state::State], adopted: bool) {
    use busbar::state::Observed;
    for pair in states.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let ok = from == to
            || from.can_transition_to(to)
            || Observed::Failed.allows(from, to)
            || Observed::Deleted.allows(from, to)
            || (adopted && Observed::Adopted.allows(from, to));
        assert!(ok, "published {from} → {to}, which the table forbids; whole sequence: {states:?}");
    }
}
