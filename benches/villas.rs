//! A `manager/villas-node` polling a VILLASnode with 100 nodes: the CPU a
//! poll costs, against the same requests made by a bare HTTP client (the
//! upstream's and the HTTP stack's share), and the time from a node's
//! state change to its gateway's status on the bus.
//!
//! Run: `cargo bench --bench villas`. The VILLASnode is a minimal fake in
//! this process serving the two endpoints a poll reads; the daemon runs
//! in this process too, so CPU is this process's.

use axum::Router;
use axum::routing::get;
use busbar::client::Client;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

mod common;
use common::{ms, pct};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn cpu_self() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11..13).map(|v| v.iter().map(|x| x.parse::<u64>().unwrap_or(0)).sum::<u64>()).unwrap_or(0) as f64 / 100.0
}

type Nodes = Arc<Mutex<Vec<Value>>>;

async fn fake(nodes: Nodes) -> String {
    let status = json!({"state": "running", "version": "1.2.0", "hostname": "bench", "uuid": Uuid::new_v4(),
        "time_now": 1.0, "time_started": 1.0, "kernel": {}, "system": {}});
    let n = nodes.clone();
    let app = Router::new()
        .route(
            "/api/v2/status",
            get(move || {
                let s = status.clone();
                async move { axum::Json(s) }
            }),
        )
        .route(
            "/api/v2/nodes",
            get(move || {
                let n = n.clone();
                async move { axum::Json(Value::Array(n.lock().unwrap().clone())) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    busbar::telemetry::init("warn,lapin=off", false);
    busbar::http::install_crypto_provider();
    let nodes: Nodes = Arc::new(Mutex::new(
        (0..100)
            .map(|i| json!({"name": format!("n{i}"), "uuid": Uuid::new_v4(), "state": "running", "affinity": -1,
                            "in": {"vectorize": 1, "signals": [{"type": "float", "name": "s0"}]}, "out": {"vectorize": 1, "signals": null},
                            "type": if i % 2 == 0 { "websocket" } else { "socket" }}))
            .collect(),
    ));
    let api = fake(nodes.clone()).await;

    // The bare client: the same two GETs, 200 times.
    let http = reqwest::Client::new();
    let (c0, t0) = (cpu_self(), Instant::now());
    for _ in 0..200 {
        http.get(format!("{api}/api/v2/status")).send().await.unwrap().bytes().await.unwrap();
        http.get(format!("{api}/api/v2/nodes")).send().await.unwrap().bytes().await.unwrap();
    }
    let bare = (cpu_self() - c0) / 200.0;
    println!(
        "bare HTTP client + fake, status and 100 nodes: {:.0} µs CPU per poll ({:?} for 200)",
        bare * 1e6,
        t0.elapsed()
    );

    // The daemon polling every 50 ms for 10 s.
    let dir = tempfile::tempdir().unwrap();
    let exchange = format!("villasbench-{}", Uuid::new_v4().simple());
    let cfg = json!({"broker": {"url": URL}, "exchange": exchange, "status_interval": 3600, "data_dir": dir.path().join("data"),
        "api": {"enabled": false},
        "components": [{"category": "manager", "type": "villas-node", "name": "bench", "api_url": api, "poll_interval": 0.05}]});
    let cfg = busbar::config::Config::parse(&cfg.to_string(), std::path::Path::new("bench.yaml")).unwrap();
    let d = busbar::daemon::start(cfg).await.unwrap();
    while d.shared.env.components.len() < 103 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, t0) = (cpu_self(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let polls = t0.elapsed().as_secs_f64() / 0.05;
    let per = (cpu_self() - c0) / polls;
    println!(
        "daemon polling (manager + 100 gateways told their listing) + fake: {:.0} µs CPU per poll, {:.2}× the bare client; at the default 2 s interval {:.3}% of one core",
        per * 1e6,
        per / bare,
        per / 2.0 * 100.0
    );

    // Node state change → gateway status on the bus, at poll_interval 50 ms.
    let client = Client::connect(URL, &exchange).await.unwrap();
    let mut any = lapin::types::FieldTable::default();
    any.insert("x-match".into(), lapin::types::AMQPValue::LongString("all".into()));
    let mut l = client.listen(any).await.unwrap();
    let target = nodes.lock().unwrap()[1]["uuid"].as_str().unwrap().to_owned();
    let mut lat = Vec::new();
    for i in 0..100 {
        let next = if i % 2 == 0 { "paused" } else { "running" };
        let t = Instant::now();
        nodes.lock().unwrap()[1]["state"] = next.into();
        loop {
            let m = l.next_until(tokio::time::Instant::now() + Duration::from_secs(5)).await.expect("a status");
            if m.payload["properties"]["uuid"] == target.as_str() && m.payload["status"]["node_state"] == next {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "node state change → gateway status on the bus (poll every 50 ms): p50 {} p99 {} (half a poll interval is expected on average)",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
    client.close().await;
    d.stop().await.unwrap();
}
