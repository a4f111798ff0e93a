//! Scale without fan-out: the hardening issue's figures, each next to the
//! broker alone in the same run.
//!
//! Run: `cargo bench --bench scale` (all), or name scenarios:
//! `cargo bench --bench scale -- devices creates`.
//!
//! - `devices`: 10,000 provisioned devices. The ping round trip to a
//!   dummy, alone and right after a broadcast ping (which once
//!   re-announced every device); and the per-message cost of the `villas`
//!   exchange with the devices' bindings against a bare exchange carrying
//!   the same number of bindings.
//! - `creates`: 10,000 creates at 100/s through the manager, in both
//!   topologies: the rate achieved and the daemon's RSS.
//! - `bindings` (also after `creates`): the broker alone, a headers
//!   exchange with as many per-uuid bindings as the per-component topology
//!   has at the end, against none: the ceiling per-uuid bindings put on
//!   every message.

use busbar::client::Client;
use busbar::protocol::Filter;
use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use uuid::Uuid;

mod common;
use common::Daemon;
use common::{free_port, ms, pct, rss_kib};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn daemon(components: &str, topology: &str, wait_for: Uuid) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let exchange = format!("scale-{}", Uuid::new_v4().simple());
    let cfg = dir.path().join("lab.yaml");
    let text = format!(
        "exchange: {exchange}\nrealm: scale\ntopology: {topology}\nstatus_interval: 3600\ndata_dir: {}\napi: {{enabled: false}}\ncomponents:\n{components}",
        dir.path().join("data").display()
    );
    std::fs::write(&cfg, text).unwrap();
    let child = common::spawn_daemon(&cfg, "error", None);
    let d = Daemon { child, exchange, _dir: dir };
    let c = Client::connect(URL, &d.exchange).await.unwrap();
    let f = Filter { uuid: Some(wait_for.to_string()), ..Default::default() };
    while c.ping(&f, Duration::from_millis(300), Duration::from_millis(300), |_| {}).await.unwrap_or(0) == 0 {}
    c.close().await;
    d
}

fn header(key: &str, value: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
    t.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    t
}

/// Round trips of `n` pings to `uuid`, one at a time.
async fn rtts(c: &Client, uuid: Uuid, n: usize) -> Vec<Duration> {
    eprintln!("rtts {n}");
    let mut l = c.listen(header("uuid", &uuid.to_string())).await.unwrap();
    let to = Filter { uuid: Some(uuid.to_string()), ..Default::default() }.action_headers();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.publish(to.clone(), &json!({"action": "ping"}), None).await.unwrap();
        // The listener also sees the ping itself (it carries the uuid).
        loop {
            let Some(seen) = l.next_until(tokio::time::Instant::now() + Duration::from_secs(10)).await else {
                panic!("no answer to ping {} of {n}", out.len());
            };
            if seen.is_status() {
                break;
            }
            if std::env::var("SCALE_DEBUG").is_ok() {
                eprintln!("seen {} {:?}", seen.payload, seen.headers);
            }
        }
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// Messages per second through a headers exchange to one queue, `n` of
/// them, published with a window, the exchange carrying `bindings`
/// other bindings (`x-match: any` on uuid, as the device queue's).
async fn exchange_rate(exchange: &str, target: &str, n: usize, extra_bindings: usize) -> f64 {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    busbar::amqp::declare_exchange(&ch, exchange).await.unwrap();
    if extra_bindings > 0 {
        let sink = busbar::amqp::declare_bound_queue(&ch, exchange, header("uuid", "sink")).await.unwrap();
        for _ in 0..extra_bindings {
            let mut b = FieldTable::default();
            b.insert("x-match".into(), AMQPValue::LongString(LongString::from("any")));
            b.insert("uuid".into(), AMQPValue::LongString(LongString::from(Uuid::new_v4().to_string())));
            ch.queue_bind(sink.clone(), exchange.into(), "".into(), QueueBindOptions { nowait: true }, b)
                .await
                .unwrap();
        }
    }
    let q = busbar::amqp::declare_bound_queue(&ch, exchange, header("uuid", target)).await.unwrap();
    let mut consumer = busbar::amqp::consume(&ch, q).await.unwrap();
    let mut h = FieldTable::default();
    h.insert("uuid".into(), AMQPValue::LongString(LongString::from(target)));
    let props = BasicProperties::default().with_content_type("application/json".into()).with_headers(h);
    let body = br#"{"status":{"state":"idle"}}"#;
    let rate = common::windowed_rate(&ch, exchange, &props, body, &mut consumer, n, 200).await;
    let _ = conn.close(200, "bye".into()).await;
    rate
}

async fn devices() {
    const N: usize = 10_000;
    let (mgr, dummy, gw) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let north = free_port();
    let components = format!(
        "  - {{category: manager, type: generic, name: M, uuid: {mgr}}}\n  - {{category: simulator, type: dummy, name: D, uuid: {dummy}}}\n  - {{category: gateway, type: iot-agent, name: G, uuid: {gw}, north_bind: \"127.0.0.1:{north}\", south_bind: \"127.0.0.1:0\", mqtt_url: \"\", federation_exchange: scale-data}}\n"
    );
    let d = daemon(&components, "per-component", dummy).await;
    let c = Client::connect(URL, &d.exchange).await.unwrap();
    let before = rtts(&c, dummy, 200).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("http://127.0.0.1:{north}{path}"))
            .header("fiware-service", "lab")
            .header("fiware-servicepath", "/")
            .json(&body)
            .send()
    };
    post("/iot/groups", json!({"groups": [{"apikey": "k", "resource": "/iot/json", "entity_type": "Meter"}]}))
        .await
        .unwrap();
    let devices: Vec<Value> = (0..N).map(|i| json!({"device_id": format!("m{i}")})).collect();
    let t = Instant::now();
    let r = post("/iot/devices", json!({"devices": devices})).await.unwrap();
    assert_eq!(r.status(), 201);
    let provision = t.elapsed();
    // While the devices are being announced (one confirmed status at a
    // time, each matched by the broker against 10,000 bindings).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rtts(&c, dummy, 100).await;
    // A broadcast ping, then at once pings to the dummy.
    c.publish(Filter::default().action_headers(), &json!({"action": "ping"}), None).await.unwrap();
    let after = rtts(&c, dummy, 100).await;
    println!(
        "devices: provisioned {N} in one request in {:.2} s; daemon RSS {} MiB",
        provision.as_secs_f64(),
        rss_kib(d.child.id()) / 1024
    );
    println!(
        "devices: ping RTT to another component: p50 {} / max {} before the devices, p50 {} / max {} with them, p50 {} / max {} right after a broadcast ping (goal: max delay ≤ 50 ms)",
        ms(pct(&before, 0.5)),
        ms(*before.last().unwrap()),
        ms(pct(&idle, 0.5)),
        ms(*idle.last().unwrap()),
        ms(pct(&after, 0.5)),
        ms(*after.last().unwrap())
    );
    // The villas exchange with the devices' bindings, against a bare
    // exchange with as many bindings, in the same run.
    let m = 1_000;
    let busbar_rate = exchange_rate(&d.exchange, &Uuid::new_v4().to_string(), m, 0).await;
    let bare = format!("scale-bare-{}", Uuid::new_v4().simple());
    let broker_rate = exchange_rate(&bare, "target", m, N + 2).await;
    println!(
        "devices: {m} messages through the villas exchange with {N} device bindings: {busbar_rate:.0}/s; a bare exchange with {} bindings: {broker_rate:.0}/s; cost ratio {:.2} (goal ≤ 1.1)",
        N + 2,
        broker_rate / busbar_rate
    );
    c.close().await;
}

async fn creates(topology: &str) {
    let n_env = std::env::var("SCALE_CREATES").ok().and_then(|v| v.parse().ok());
    #[allow(non_snake_case)]
    let N: usize = n_env.unwrap_or(10_000);
    let mgr = Uuid::new_v4();
    let d = daemon(&format!("  - {{category: manager, type: generic, name: M, uuid: {mgr}}}\n"), topology, mgr).await;
    let c = Client::connect(URL, &d.exchange).await.unwrap();
    let to = Filter { uuid: Some(mgr.to_string()), ..Default::default() }.action_headers();
    let start = Instant::now();
    let mut peak = 0;
    let mut last = Uuid::nil();
    for i in 0..N {
        // 100/s.
        let due = start + Duration::from_millis(10 * i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        last = Uuid::new_v4();
        let body = json!({"action": "create", "parameters": {"category": "simulator", "type": "dummy", "name": format!("d{i}"), "uuid": last.to_string()}});
        c.publish(to.clone(), &body, None).await.unwrap();
        if i % 500 == 0 {
            peak = peak.max(rss_kib(d.child.id()));
        }
    }
    let sent = start.elapsed();
    eprintln!(
        "creates ({topology}): sent {N} in {:.1} s, RSS {:.1} MiB",
        sent.as_secs_f64(),
        rss_kib(d.child.id()) as f64 / 1024.0
    );
    // Done when the last one answers.
    let f = Filter { uuid: Some(last.to_string()), ..Default::default() };
    let give_up = Instant::now() + Duration::from_secs(120);
    while c.ping(&f, Duration::from_millis(500), Duration::from_millis(500), |_| {}).await.unwrap_or(0) == 0 {
        if Instant::now() > give_up {
            println!(
                "creates ({topology}): the last create did not answer within 120 s of the end; RSS {:.1} MiB",
                rss_kib(d.child.id()) as f64 / 1024.0
            );
            return;
        }
    }
    let done = start.elapsed();
    peak = peak.max(rss_kib(d.child.id()));
    println!(
        "creates ({topology}): {N} at 100/s sent in {:.1} s, all answering after {:.1} s ({:.0}/s); daemon RSS peak {:.1} MiB (goal < 64 MiB)",
        sent.as_secs_f64(),
        done.as_secs_f64(),
        N as f64 / done.as_secs_f64(),
        peak as f64 / 1024.0
    );
    c.close().await;
}

#[tokio::main]
async fn main() {
    busbar::http::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if want("devices") {
        devices().await;
    }
    if want("creates") {
        creates("per-component").await;
        creates("shared").await;
    }
    if want("creates") || want("bindings") {
        // The broker alone: what per-uuid bindings cost every message.
        let n: usize = std::env::var("SCALE_CREATES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
        let with = exchange_rate(&format!("scale-bare-{}", Uuid::new_v4().simple()), "target", 5_000, n).await;
        let without = exchange_rate(&format!("scale-bare-{}", Uuid::new_v4().simple()), "target", 5_000, 0).await;
        println!(
            "broker alone: a headers exchange with {n} uuid bindings (per-component at the end): {with:.0} msgs/s; with none (shared): {without:.0} msgs/s. A create crosses the exchange at least twice (the create, the announcement): ceiling {:.0} creates/s with {n} per-uuid bindings",
            with / 2.0
        );
    }
}
