//! busbar benchmarks against the real RabbitMQ, each next to the broker's
//! own limit measured in the same run (RabbitMQ shares the machine's cores,
//! so every goal is a ratio to what the broker alone does).
//!
//! Run: `cargo bench --bench amqp` (all), or name scenarios:
//! `cargo bench --bench amqp -- raw rtt flood discovery start process rss`.
//! The daemon runs as a separate release process, like in production.

use busbar::client::{Client, Listener};
use busbar::protocol::Filter;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Both topologies, in every comparison.
const TOPOLOGIES: [&str; 2] = ["shared", "per-component"];

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

mod common;
use common::Daemon;
use common::{ms, pct};

fn header(key: &str, value: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
    t.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    t
}

/// The broker alone: publish to a headers exchange, consume from a bound
/// queue. Returns (msgs/s with a window of 100 in flight, one-hop p50, p99).
async fn raw() -> (f64, Duration, Duration) {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let ex = format!("bench-raw-{}", Uuid::new_v4().simple());
    busbar::amqp::declare_exchange(&ch, &ex).await.unwrap();
    let q = busbar::amqp::declare_bound_queue(&ch, &ex, header("uuid", "raw")).await.unwrap();
    let mut consumer = busbar::amqp::consume(&ch, q).await.unwrap();
    let body = br#"{"action":"ping"}"#;
    let props = || {
        let mut h = FieldTable::default();
        h.insert("uuid".into(), AMQPValue::LongString(LongString::from("raw")));
        BasicProperties::default().with_content_type("application/json".into()).with_headers(h)
    };
    // One-hop round trip.
    let mut rtts = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        ch.basic_publish(ex.as_str().into(), "".into(), BasicPublishOptions::default(), body, props()).await.unwrap();
        consumer.next().await.unwrap().unwrap();
        rtts.push(t.elapsed());
    }
    rtts.sort();
    // Throughput with up to 100 in flight (the same window as the ping flood).
    let n = 40_000;
    let t = Instant::now();
    let (mut sent, mut got) = (0, 0);
    while got < n {
        while sent < n && sent - got < 100 {
            ch.basic_publish(ex.as_str().into(), "".into(), BasicPublishOptions::default(), body, props())
                .await
                .unwrap();
            sent += 1;
        }
        consumer.next().await.unwrap().unwrap();
        got += 1;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = ch.exchange_delete(ex.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "bye".into()).await;
    (rate, pct(&rtts, 0.5), pct(&rtts, 0.99))
}

impl Daemon {
    /// Start the release daemon with `n` dummies (uuids returned).
    async fn start(n: usize, topology: &str) -> (Daemon, Vec<Uuid>) {
        Self::start_kind(n, topology, "type: dummy, durations: {reset: 0}").await
    }

    /// Start the release daemon with `n` simulators described by `spec`
    /// (the YAML flow-map entries after `category: simulator`).
    async fn start_kind(n: usize, topology: &str, spec: &str) -> (Daemon, Vec<Uuid>) {
        let uuids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let spec: Value = serde_saphyr::from_str(&format!("{{{spec}}}")).unwrap();
        let components: Vec<Value> = uuids
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut c = json!({"category": "simulator", "name": format!("d{i}"), "uuid": u});
                c.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
                c
            })
            .collect();
        let config =
            json!({"realm": "bench", "topology": topology, "api": {"enabled": false}, "components": components});
        Self::start_config(config, &uuids).await
    }

    /// Start the release daemon with `examples/lab.yaml` (five components
    /// and an IoT gateway), on an exchange of its own, with the gateway on
    /// free ports and a topic prefix of its own. Returns the dummy's uuid.
    async fn lab(topology: &str) -> (Daemon, Uuid) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let mut config: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(format!("{dir}/lab.yaml")).unwrap()).unwrap();
        config["topology"] = json!(topology);
        config["api"] = json!({"enabled": false});
        config["component_dirs"] = json!([format!("{dir}/types")]);
        let id = Uuid::new_v4().simple().to_string();
        for c in config["components"].as_array_mut().unwrap() {
            if c["category"] == "gateway" {
                c["north_bind"] = json!("127.0.0.1:0");
                c["south_bind"] = json!("127.0.0.1:0");
                c["mqtt_prefix"] = json!(format!("bench{id}"));
                c["federation_exchange"] = json!(format!("bench-data-{id}"));
            }
        }
        let dummy = config["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "dummy")
            .and_then(|c| c["uuid"].as_str()?.parse().ok())
            .unwrap();
        let (d, _) = Self::start_config(config, &[dummy]).await;
        (d, dummy)
    }

    /// Start the release daemon with `config` (broker, exchange and data
    /// directory are set here) and wait until the last of `uuids` answers.
    async fn start_config(mut config: Value, uuids: &[Uuid]) -> (Daemon, Vec<Uuid>) {
        let dir = tempfile::tempdir().unwrap();
        let exchange = format!("bench-{}", Uuid::new_v4().simple());
        config["broker"] = json!({"url": url()});
        config["exchange"] = json!(exchange);
        config["data_dir"] = json!(dir.path().join("data"));
        let uuids = uuids.to_vec();
        let cfg = dir.path().join("bench.json");
        std::fs::write(&cfg, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_busbar"))
            .args(["--log-level", "warn", "daemon", "-c"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("daemon starts");
        let d = Daemon { child, exchange, _dir: dir };
        // Ready when the last component answers a ping.
        let c = Client::connect(&url(), &d.exchange).await.unwrap();
        let last = uuids.last().copied();
        if let Some(last) = last {
            let mut l = c.listen(header("uuid", &last.to_string())).await.unwrap();
            loop {
                c.publish(
                    Filter { uuid: Some(last.to_string()), ..Default::default() }.action_headers(),
                    &json!({"action": "ping"}),
                    None,
                )
                .await
                .unwrap();
                if next_status(&mut l, Duration::from_millis(200)).await.is_some() {
                    break;
                }
            }
        }
        c.close().await;
        (d, uuids)
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

async fn next_status(l: &mut Listener, within: Duration) -> Option<Value> {
    let end = tokio::time::Instant::now() + within;
    while let Some(s) = l.next_until(end).await {
        if s.is_status() {
            return Some(s.payload);
        }
    }
    None
}

/// Which daemon a ping scenario talks to.
#[derive(Clone, Copy)]
enum Setup<'a> {
    /// One dummy, in this topology.
    One(&'a str),
    /// `examples/lab.yaml` (its dummy), in this topology.
    Lab(&'a str),
}

impl Setup<'_> {
    async fn start(self) -> (Daemon, Uuid) {
        match self {
            Setup::One(topology) => {
                let (d, uuids) = Daemon::start(1, topology).await;
                (d, uuids[0])
            }
            Setup::Lab(topology) => Daemon::lab(topology).await,
        }
    }

    fn name(self) -> String {
        match self {
            Setup::One(t) => format!("one dummy, topology {t}"),
            Setup::Lab(t) => format!("examples/lab.yaml, topology {t}"),
        }
    }
}

/// The broker alone doing discovery's routing work: `n` component-style
/// bindings on the exchange (as the shared topology has), `n` status-style
/// messages published, all delivered to one listener. RabbitMQ's headers
/// exchange tests every binding for every message, so this is the ceiling.
async fn raw_discovery(n: usize) -> Duration {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let ex = format!("bench-rawdisc-{}", Uuid::new_v4().simple());
    busbar::amqp::declare_exchange(&ch, &ex).await.unwrap();
    let keys: Vec<_> = (0..n)
        .map(|_| busbar::protocol::RoutingKeys {
            category: "simulator".into(),
            kind: "dummy".into(),
            uuid: Uuid::new_v4(),
            realm: Some("bench".into()),
        })
        .collect();
    let sink = busbar::amqp::declare_bound_queue(&ch, &ex, keys[0].binding()).await.unwrap();
    for k in &keys[1..] {
        ch.queue_bind(sink.clone(), ex.as_str().into(), "".into(), QueueBindOptions::default(), k.binding())
            .await
            .unwrap();
    }
    let lq = busbar::amqp::declare_bound_queue(&ch, &ex, header("realm", "bench")).await.unwrap();
    let mut listener = busbar::amqp::consume(&ch, lq).await.unwrap();
    let body = vec![b' '; 800];
    let t = Instant::now();
    for k in &keys {
        ch.basic_publish(
            ex.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            busbar::bus::status_properties(k.status_headers()),
        )
        .await
        .unwrap();
    }
    for _ in 0..n {
        listener.next().await.unwrap().unwrap();
    }
    let took = t.elapsed();
    let _ = ch.exchange_delete(ex.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "bye".into()).await;
    took
}

/// Sequential ping round trips to one component, interleaved in blocks with
/// the raw one-hop loop so both see the same machine conditions. Returns
/// (ping p50, ping p99, raw p50, raw p99).
async fn rtt(blocks: usize, per_block: usize, setup: Setup<'_>) -> [Duration; 4] {
    let (d, target) = setup.start().await;
    let u = target.to_string();
    let c = Client::connect(&url(), &d.exchange).await.unwrap();
    let mut l = c.listen(header("uuid", &u)).await.unwrap();
    let h = Filter { uuid: Some(u.clone()), ..Default::default() }.action_headers();
    let ping = json!({"action": "ping"});
    // The raw loop: its own exchange and queue on the same connection kind.
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let ex = format!("bench-raw-{}", Uuid::new_v4().simple());
    busbar::amqp::declare_exchange(&ch, &ex).await.unwrap();
    let q = busbar::amqp::declare_bound_queue(&ch, &ex, header("uuid", "raw")).await.unwrap();
    let mut raw = busbar::amqp::consume(&ch, q).await.unwrap();
    let mut rh = FieldTable::default();
    rh.insert("uuid".into(), AMQPValue::LongString(LongString::from("raw")));
    let rprops = BasicProperties::default().with_content_type("application/json".into()).with_headers(rh);
    let (mut pings, mut raws) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        for _ in 0..per_block {
            let t = Instant::now();
            ch.basic_publish(
                ex.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                br#"{"action":"ping"}"#,
                rprops.clone(),
            )
            .await
            .unwrap();
            raw.next().await.unwrap().unwrap();
            raws.push(t.elapsed());
        }
        for _ in 0..per_block {
            let t = Instant::now();
            c.publish(h.clone(), &ping, None).await.unwrap();
            next_status(&mut l, Duration::from_secs(5)).await.expect("reply");
            pings.push(t.elapsed());
        }
    }
    pings.sort();
    raws.sort();
    c.close().await;
    let _ = ch.exchange_delete(ex.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "bye".into()).await;
    [pct(&pings, 0.5), pct(&pings, 0.99), pct(&raws, 0.5), pct(&raws, 0.99)]
}

/// Pings to one component with up to 100 unanswered; replies/s. The
/// client only counts replies (no parsing), so it costs what the raw loop's
/// consumer costs.
async fn flood(n: usize, setup: Setup<'_>) -> f64 {
    let (d, target) = setup.start().await;
    let u = target.to_string();
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    // Status replies carry `category`; our pings carry only `uuid`.
    let q = busbar::amqp::declare_bound_queue(&ch, &d.exchange, header("category", "simulator")).await.unwrap();
    let mut replies = busbar::amqp::consume(&ch, q).await.unwrap();
    let mut h = FieldTable::default();
    h.insert("uuid".into(), AMQPValue::LongString(LongString::from(u.as_str())));
    let props = BasicProperties::default().with_content_type("application/json".into()).with_headers(h);
    let body = br#"{"action":"ping"}"#;
    let rate = common::windowed_rate(&ch, &d.exchange, &props, body, &mut replies, n, 100).await;
    let _ = conn.close(200, "bye".into()).await;
    rate
}

/// One broadcast ping to `n` components: time until every reply arrived.
async fn discovery(n: usize, topology: &str) -> Duration {
    let (d, _) = Daemon::start(n, topology).await;
    let c = Client::connect(&url(), &d.exchange).await.unwrap();
    let mut l = c.listen(header("realm", "bench")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    while next_status(&mut l, Duration::from_millis(200)).await.is_some() {}
    let t = Instant::now();
    c.publish(Filter::default().action_headers(), &json!({"action": "ping", "when": 0}), None).await.unwrap();
    let mut got = 0;
    while got < n {
        next_status(&mut l, Duration::from_secs(30)).await.expect("all replies");
        got += 1;
    }
    let took = t.elapsed();
    c.close().await;
    took
}

/// start → running latency of a dummy with runtime 0, from publication.
async fn start_latency(n: usize) -> (Duration, Duration) {
    let (d, uuids) = Daemon::start(1, "per-component").await;
    let u = uuids[0].to_string();
    let c = Client::connect(&url(), &d.exchange).await.unwrap();
    let mut l = c.listen(header("uuid", &u)).await.unwrap();
    let h = Filter { uuid: Some(u.clone()), ..Default::default() }.action_headers();
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        c.publish(h.clone(), &json!({"action": "start", "parameters": {"runtime": 0}}), None).await.unwrap();
        loop {
            let s = next_status(&mut l, Duration::from_secs(5)).await.expect("status");
            if s["status"]["state"] == "running" {
                break;
            }
        }
        lat.push(t.elapsed());
        c.publish(h.clone(), &json!({"action": "reset"}), None).await.unwrap();
        // The bench config sets durations.reset to 0; wait for idle.
        loop {
            let s = next_status(&mut l, Duration::from_secs(5)).await.expect("status");
            if s["status"]["state"] == "idle" {
                break;
            }
        }
    }
    lat.sort();
    c.close().await;
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

/// A trivial process: start→running latency from the action's publication.
async fn process_latency(n: usize) -> (Duration, Duration) {
    let (d, uuids) =
        Daemon::start_kind(1, "per-component", "type: generic, whitelist: [\"^/bin/sleep$\"], grace: 1").await;
    let u = uuids[0].to_string();
    let c = Client::connect(&url(), &d.exchange).await.unwrap();
    let mut l = c.listen(header("uuid", &u)).await.unwrap();
    let h = Filter { uuid: Some(u.clone()), ..Default::default() }.action_headers();
    let start = json!({"action": "start", "parameters": {"executable": "/bin/sleep", "argv": ["30"]}});
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        c.publish(h.clone(), &start, None).await.unwrap();
        wait_state(&mut l, "running").await;
        lat.push(t.elapsed());
        c.publish(h.clone(), &json!({"action": "reset"}), None).await.unwrap();
        wait_state(&mut l, "idle").await;
    }
    lat.sort();
    c.close().await;
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

async fn wait_state(l: &mut Listener, state: &str) {
    loop {
        let s = next_status(l, Duration::from_secs(10)).await.expect("status");
        if s["status"]["state"] == state {
            return;
        }
        assert_ne!(s["status"]["state"], "error", "{}", s["status"]["error"]);
    }
}

/// `n` simulators started at once, each running `/bin/sleep 1`: time until
/// all run, and until all are idle again.
async fn process_concurrent(n: usize) -> (Duration, Duration) {
    let (d, uuids) = Daemon::start_kind(n, "per-component", "type: generic, whitelist: [\"^/bin/sleep$\"]").await;
    let c = Client::connect(&url(), &d.exchange).await.unwrap();
    let mut l = c.listen(header("realm", "bench")).await.unwrap();
    let start = json!({"action": "start", "parameters": {"executable": "/bin/sleep", "argv": ["1"]}});
    let t = Instant::now();
    for u in &uuids {
        c.publish(Filter { uuid: Some(u.to_string()), ..Default::default() }.action_headers(), &start, None)
            .await
            .unwrap();
    }
    let (mut running, mut idle) = (0, 0);
    let mut all_running = Duration::ZERO;
    while idle < n {
        let s = next_status(&mut l, Duration::from_secs(30)).await.expect("status");
        match s["status"]["state"].as_str() {
            Some("running") => {
                running += 1;
                if running == n {
                    all_running = t.elapsed();
                }
            }
            Some("idle") => idle += 1,
            Some("error") => panic!("{}", s["status"]["error"]),
            _ => {}
        }
    }
    let all_idle = t.elapsed();
    c.close().await;
    (all_running, all_idle)
}

async fn rss(n: usize) -> u64 {
    let (d, _) = Daemon::start(n, "per-component").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.rss_kib()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, and benchmarks never run as tests.
    let Some(named) = common::scenarios() else { return };
    let want = |s: &str| common::wants(&named, s);
    let mut raw_rate = None;
    if want("raw") || want("flood") {
        let (rate, p50, p99) = raw().await;
        println!("raw broker: {rate:.0} msgs/s (100 in flight); one-hop RTT p50 {} p99 {}", ms(p50), ms(p99));
        raw_rate = Some(rate);
    }
    let setups: Vec<Setup> =
        TOPOLOGIES.into_iter().map(Setup::One).chain(TOPOLOGIES.into_iter().map(Setup::Lab)).collect();
    if want("rtt") {
        for setup in setups.iter().copied() {
            let [p50, p99, r50, r99] = rtt(10, 200, setup).await;
            println!(
                "ping RTT, {} (2000 sequential, interleaved with 2000 raw one-hop): p50 {} ({:.2}x raw {}), p99 {} ({:.2}x raw {})",
                setup.name(),
                ms(p50),
                p50.as_secs_f64() / r50.as_secs_f64(),
                ms(r50),
                ms(p99),
                p99.as_secs_f64() / r99.as_secs_f64(),
                ms(r99)
            );
        }
    }
    if want("flood") {
        for setup in setups.iter().copied() {
            let rate = flood(40_000, setup).await;
            println!(
                "ping flood, {} (40000, 100 in flight): {rate:.0} replies/s ({:.2}x raw)",
                setup.name(),
                rate / raw_rate.unwrap()
            );
        }
    }
    if want("discovery") {
        println!(
            "raw broker, 1000 bindings, 1000 status-shaped messages to one listener: {}",
            ms(raw_discovery(1000).await)
        );
        for topo in TOPOLOGIES {
            let took = discovery(1000, topo).await;
            println!("discovery, 1000 components, topology {topo}: all replies in {}", ms(took));
        }
    }
    if want("start") {
        let (p50, p99) = start_latency(100).await;
        println!("dummy start->running (runtime 0, 100 runs): p50 {} p99 {}", ms(p50), ms(p99));
    }
    if want("process") {
        let (p50, p99) = process_latency(100).await;
        println!("process start->running (/bin/sleep, 100 runs): p50 {} p99 {}", ms(p50), ms(p99));
        let (run, idle) = process_concurrent(100).await;
        println!(
            "100 simulators started at once (/bin/sleep 1): all running after {}, all idle after {}",
            ms(run),
            ms(idle)
        );
    }
    if want("rss") {
        for n in [1, 100, 1000] {
            println!("RSS idle with {n} components: {:.1} MiB", rss(n).await as f64 / 1024.0);
        }
    }
}
