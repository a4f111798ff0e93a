//! Federation figures (the federation issue), each next to what the
//! brokers alone do in the same run.
//!
//! Run: `cargo bench --bench federation` (all), or name scenarios:
//! `cargo bench --bench federation -- directory link skew cycles`.
//!
//! - `directory`: 10,000 ICs in a directory (pure, this process): the
//!   resident memory they add, the query time of the merged view and of
//!   the sites, and the rate statuses are taken in.
//! - `link`: two RabbitMQ nodes federated by `deploy/rabbitmq/federate`,
//!   one busbar per node (in this process). 200 times: a status change at
//!   site 2 until site 1's directory shows it, against the federation
//!   link's own one-message latency (a bare message over the same link,
//!   sent right after); and the alive traffic per site.
//! - `skew`: 100 coordinated starts of one dummy per site, `when` 0.3 s
//!   ahead; the skew between the two `status.since`.
//! - `cycles`: 100 cuts and heals of the link: the time until site 2 is
//!   stale at site 1, and until site 1's directory equals site 2's truth.
//!
//! Needs root (the second node runs as the rabbitmq user).

use busbar::client::Client;
use busbar::daemon::Running;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use uuid::Uuid;

mod common;
use common::{ms, pct, rss_kib};

const SITE1: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SITE2: &str = "amqp://guest:guest@127.0.0.1:5673/%2f";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// User + system CPU seconds of process `pid` ("self": this one).
fn cpu_of(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = s.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11..13].iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum::<u64>() as f64 / 100.0
}

/// Every RabbitMQ node's pid (`beam.smp`).
fn beams() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            (std::fs::read_to_string(e.path().join("comm")).ok()?.trim() == "beam.smp").then_some(name)
        })
        .collect()
}

/// CPU seconds of the brokers and of this process (both daemons and the
/// load) since `start`.
struct Split {
    pids: Vec<(String, String)>,
    start: Vec<f64>,
}

impl Split {
    fn start() -> Split {
        let mut pids: Vec<(String, String)> =
            beams().into_iter().enumerate().map(|(i, p)| (format!("rabbitmq node {}", i + 1), p)).collect();
        pids.push(("busbar ×2 + load (this process)".into(), "self".into()));
        let start = pids.iter().map(|(_, p)| cpu_of(p)).collect();
        Split { pids, start }
    }

    fn line(&self, seconds: f64) -> String {
        let parts: Vec<String> = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((n, p), s)| format!("{n} {:.0}%", (cpu_of(p) - s) / seconds * 100.0))
            .collect();
        format!("  CPU over {seconds:.1} s: {}", parts.join(", "))
    }
}

fn federate(prefix: &str, exchange: &str, extra: &[&str]) {
    let node2 =
        String::from_utf8(Command::new(repo().join("scripts/second-broker")).arg("node").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
    let script = repo().join("deploy/rabbitmq/federate");
    let common = ["--prefix", prefix, "--exchange", exchange];
    let s2 = format!("site2={SITE2}");
    let s1 = format!("site1={SITE1}");
    for args in [
        [&common[..], extra, &[s2.as_str()]].concat(),
        [&["--node", node2.as_str()][..], &common[..], extra, &[s1.as_str()]].concat(),
    ] {
        let out = Command::new(&script).args(&args).output().unwrap();
        assert!(out.status.success(), "federate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

struct Sites {
    a: Running,
    b: Running,
    dummy1: Uuid,
    dummy2: Uuid,
    exchange: String,
    prefix: String,
    _dir: tempfile::TempDir,
}

fn config(exchange: &str, site: &str, url: &str, dir: &std::path::Path, dummy: Uuid) -> busbar::config::Config {
    let v = json!({
        "broker": {"url": url}, "exchange": exchange, "site": site, "status_interval": 3600,
        "data_dir": dir.join(site), "api": {"enabled": false},
        "components": [{"category": "simulator", "type": "dummy", "name": format!("{site} dummy"), "uuid": dummy,
                        "durations": {"stop": 0.0, "reset": 0.0}}],
    });
    busbar::config::Config::parse(&v.to_string(), std::path::Path::new("bench.yaml")).unwrap()
}

async fn sites() -> Sites {
    let out = Command::new(repo().join("scripts/second-broker")).arg("start").output().unwrap();
    assert!(out.status.success(), "second-broker: {}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let id = &Uuid::new_v4().simple().to_string()[..10];
    let exchange = format!("fedbench-{id}");
    let (dummy1, dummy2) = (Uuid::new_v4(), Uuid::new_v4());
    let a = busbar::daemon::start(config(&exchange, "alpha", SITE1, dir.path(), dummy1)).await.unwrap();
    let b = busbar::daemon::start(config(&exchange, "beta", SITE2, dir.path(), dummy2)).await.unwrap();
    let prefix = format!("b{id}");
    federate(&prefix, &exchange, &[]);
    let s = Sites { a, b, dummy1, dummy2, exchange, prefix, _dir: dir };
    s.wait_equal(Duration::from_secs(10)).await.expect("the sites see each other");
    s
}

impl Sites {
    fn seen(&self) -> BTreeMap<Uuid, String> {
        let dir = self.a.shared.env.directory.lock().unwrap();
        let f = busbar::directory::Filter { site: Some("beta".into()), stale: Some(false), ..Default::default() };
        dir.components(&f, Instant::now())
            .into_iter()
            .map(|r| (r["uuid"].as_str().unwrap().parse().unwrap(), r["state"].as_str().unwrap().to_owned()))
            .collect()
    }

    fn truth(&self) -> BTreeMap<Uuid, String> {
        self.b.shared.env.components.handles().iter().map(|h| (h.uuid(), h.state().as_str().to_owned())).collect()
    }

    async fn wait_equal(&self, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.seen() == self.truth() {
                return Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        None
    }

    async fn stop(self) {
        federate(&self.prefix, &self.exchange, &["--purge"]);
        self.b.stop().await.unwrap();
        self.a.stop().await.unwrap();
    }
}

fn uuid_headers(uuid: Uuid) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("uuid".into(), AMQPValue::LongString(LongString::from(uuid.to_string())));
    h
}

/// 10,000 ICs in a directory: memory, query times, intake rate.
fn directory() {
    println!("directory: 10,000 ICs (100 sites of 1 controller, 1 manager, 98 simulators)");
    let me = std::process::id();
    let mut dir = busbar::directory::Directory::new(100_000);
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut bodies = Vec::new();
    for s in 0..100 {
        let (c, m) = (Uuid::new_v4(), Uuid::new_v4());
        bodies.push(json!({"status": {"state": "running", "alive_interval": 1.0, "time": unix(), "roots": [m]},
            "properties": {"uuid": c, "name": format!("site-{s}"), "site": format!("site-{s}"), "category": "controller", "type": "busbar"}}));
        bodies.push(json!({"components": [], "status": {"state": "idle"},
            "properties": {"uuid": m, "name": "Generic Manager", "category": "manager", "type": "generic", "realm": "lab"}}));
        for i in 0..98 {
            bodies.push(json!({"model": {}, "results": {}, "status": {"state": "idle", "managed_by": m, "version": "0.1.0", "uptime": 1.0, "host": "vm"},
                "properties": {"uuid": Uuid::new_v4(), "name": format!("sim {i}"), "category": "simulator", "type": "dummy", "realm": "lab"},
                "schema": {"start": {"type": "object", "properties": {"runtime": {"type": "number"}}}}}));
        }
    }
    let bodies: Vec<Vec<u8>> = bodies.iter().map(|b| serde_json::to_vec(b).unwrap()).collect();
    let before = rss_kib(me);
    let t = std::time::Instant::now();
    for b in &bodies {
        dir.observe(b, now, wall);
    }
    let intake = t.elapsed();
    let after = rss_kib(me);
    println!(
        "  {} ICs: RSS +{:.2} MiB ({:.0} bytes per IC; the directory's own estimate {:.0} bytes per IC); intake {:.1} µs per status ({:.0}/s on one core)",
        dir.len(),
        (after.saturating_sub(before)) as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 * 1024.0 / dir.len() as f64,
        dir.approx_bytes() as f64 / dir.len() as f64,
        intake.as_secs_f64() * 1e6 / bodies.len() as f64,
        bodies.len() as f64 / intake.as_secs_f64(),
    );
    for (what, filter) in [
        ("components of one site", busbar::directory::Filter { site: Some("site-42".into()), ..Default::default() }),
        (
            "running components, all sites",
            busbar::directory::Filter { state: Some("running".into()), ..Default::default() },
        ),
        ("every IC", busbar::directory::Filter::default()),
    ] {
        // What `GET /api/v1/federation/components` does: the rows, written
        // out as JSON bytes.
        let mut times: Vec<Duration> = (0..200)
            .map(|_| {
                let t = std::time::Instant::now();
                std::hint::black_box(serde_json::to_vec(&dir.rows(&filter, Instant::now())).unwrap());
                t.elapsed()
            })
            .collect();
        times.sort();
        println!("  query {what}: p50 {} p99 {}", ms(pct(&times, 0.5)), ms(pct(&times, 0.99)));
    }
    // The whole view as the API serves it: the shared snapshot, which the
    // feed rebuilds on its tick (every 250 ms) while somebody reads it and
    // the directory changed. Here 10 statuses change between queries and
    // every fifth query comes after a tick, so most snapshots are rebuilt.
    let sims: Vec<Vec<u8>> = bodies.iter().skip(2).step_by(5).take(2000).cloned().collect();
    assert_eq!(sims.len(), 2000);
    let flipped: Vec<Vec<u8>> = sims
        .iter()
        .map(|b| {
            String::from_utf8(b.clone()).unwrap().replace("\"state\":\"idle\"", "\"state\":\"running\"").into_bytes()
        })
        .collect();
    let (mut queries, mut rebuilds) = (Vec::new(), Vec::new());
    let mut view = busbar::directory::WholeView::default();
    let before_view = rss_kib(me);
    for i in 0..200 {
        for k in 0..10 {
            let b = if i % 2 == 0 { &flipped[(i * 10 + k) % 2000] } else { &sims[(i * 10 + k) % 2000] };
            dir.observe(b, Instant::now(), SystemTime::now());
        }
        // The feed's tick: rebuild when due.
        if i % 5 == 0 && view.due(Instant::now(), dir.generation()) {
            let t = std::time::Instant::now();
            view.store(dir.whole_view(Instant::now()));
            rebuilds.push(t.elapsed());
        }
        // A reader: the snapshot (a first reader, or one after a long
        // pause, builds it).
        let t = std::time::Instant::now();
        match view.fresh(Instant::now()) {
            Some(s) => drop(std::hint::black_box(s)),
            None => view.store(dir.whole_view(Instant::now())),
        }
        queries.push(t.elapsed());
    }
    let view_kib = rss_kib(me).saturating_sub(before_view);
    queries.sort();
    rebuilds.sort();
    println!(
        "  query every IC as served (shared snapshot): p50 {} p99 {}; its rebuild on the feed's tick: p50 {} p99 {} (at most 4 a second while read and changing: {:.1} % of a core at p50); the snapshot adds {:.2} MiB RSS",
        ms(pct(&queries, 0.5)),
        ms(pct(&queries, 0.99)),
        ms(pct(&rebuilds, 0.5)),
        ms(pct(&rebuilds, 0.99)),
        pct(&rebuilds, 0.5).as_secs_f64() * 4.0 * 100.0,
        view_kib as f64 / 1024.0
    );
    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(dir.sites(Instant::now()));
            t.elapsed()
        })
        .collect();
    times.sort();
    println!("  query sites: p50 {} p99 {}", ms(pct(&times, 0.5)), ms(pct(&times, 0.99)));
}

/// A status change at site 2 until site 1's directory shows it, against
/// the link's own latency for one message.
async fn link(s: &Sites) {
    println!("link: 200 status changes at site 2, seen in site 1's directory, against the bare link");
    let client1 = Client::connect(SITE1, &s.exchange).await.unwrap();
    let client2 = Client::connect(SITE2, &s.exchange).await.unwrap();
    // The bare link: a message published at site 2 with a `probe` header
    // crosses to site 1 because a private queue at site 1 is bound on it
    // (exchange federation carries the binding upstream). No daemon sees it.
    let probe = Uuid::new_v4();
    let mut bound = FieldTable::default();
    bound.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
    bound.insert("probe".into(), AMQPValue::LongString(LongString::from(probe.to_string())));
    let mut l1 = client1.listen(bound).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // the binding reaches site 2's upstream queue
    let split = Split::start();
    let t_run = std::time::Instant::now();
    let (mut dir_lat, mut link_lat) = (Vec::new(), Vec::new());
    let mut state = "idle";
    for _ in 0..200 {
        let (action, next) = if state == "idle" { ("start", "running") } else { ("stop", "idle") };
        let body = json!({"action": action, "parameters": {"runtime": 0}});
        let t0 = Instant::now();
        client2.publish(uuid_headers(s.dummy2), &body, None).await.unwrap();
        // Site 1's directory shows the new state; its `last_seen` is when
        // site 1's feed took the status, and the status's `since` when
        // site 2's component entered the state (one machine, one clock).
        let heard = loop {
            let row = {
                let dir = s.a.shared.env.directory.lock().unwrap();
                let f = busbar::directory::Filter { site: Some("beta".into()), ..Default::default() };
                dir.components(&f, Instant::now()).into_iter().find(|r| r["uuid"] == s.dummy2.to_string())
            };
            if let Some(r) = row.filter(|r| r["state"] == next) {
                break r["last_seen"].as_f64().unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "site 1 did not see {next}");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let status = s.b.shared.env.components.lookup(s.dummy2).unwrap().status().await.unwrap();
        let since = status["status"]["since"].as_f64().unwrap();
        dir_lat.push(Duration::from_secs_f64((heard - since).max(0.0)));
        state = next;
        let t1 = Instant::now();
        let mut h = FieldTable::default();
        h.insert("probe".into(), AMQPValue::LongString(LongString::from(probe.to_string())));
        client2.publish(h, &json!({"probe": true}), None).await.unwrap();
        l1.next_until(t1 + Duration::from_secs(5)).await.expect("the probe crosses");
        link_lat.push(t1.elapsed());
    }
    let seconds = t_run.elapsed().as_secs_f64();
    dir_lat.sort();
    link_lat.sort();
    let (d50, d99, l50, l99) = (pct(&dir_lat, 0.5), pct(&dir_lat, 0.99), pct(&link_lat, 0.5), pct(&link_lat, 0.99));
    println!("  state entered at site 2 → in site 1's directory: p50 {} p99 {}", ms(d50), ms(d99));
    println!("  bare message site 2 → site 1 (the link alone):  p50 {} p99 {}", ms(l50), ms(l99));
    println!(
        "  ratio to the link: p50 {:.2}×, p99 {:.2}×",
        d50.as_secs_f64() / l50.as_secs_f64(),
        d99.as_secs_f64() / l99.as_secs_f64()
    );
    println!("{}", split.line(seconds));
    // Alive traffic: the controller's status, once per alive interval.
    let mut any = FieldTable::default();
    any.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
    any.insert("uuid".into(), AMQPValue::LongString(LongString::from(s.b.shared.env.settings.controller.to_string())));
    let mut alives = client1.listen(any).await.unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let (mut n, mut bytes) = (0, 0);
    while let Some(m) = alives.next_until(end).await {
        n += 1;
        bytes += serde_json::to_vec(&m.payload).unwrap().len();
    }
    println!(
        "  alive traffic of one site: {:.1} messages/s, {:.0} bytes each, {:.1} KiB/s per site per peer",
        n as f64 / 5.0,
        bytes as f64 / n.max(1) as f64,
        bytes as f64 / 5.0 / 1024.0
    );
    client1.close().await;
    client2.close().await;
}

/// Coordinated starts: one dummy per site, the same `when`.
async fn skew(s: &Sites) {
    println!("skew: 100 coordinated starts of one dummy per site, when = now + 0.3 s");
    let client1 = Client::connect(SITE1, &s.exchange).await.unwrap();
    let client2 = Client::connect(SITE2, &s.exchange).await.unwrap();
    let mut skews = Vec::new();
    for _ in 0..100 {
        for (c, u) in [(&client1, s.dummy1), (&client2, s.dummy2)] {
            c.publish(uuid_headers(u), &json!({"action": "reset"}), None).await.unwrap();
        }
        let idle = |r: &Running, u| r.shared.env.components.lookup(u).unwrap().state().as_str() == "idle";
        while !(idle(&s.a, s.dummy1) && idle(&s.b, s.dummy2)) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let when = unix() + 0.3;
        let body = json!({"action": "start", "when": when, "parameters": {"runtime": 0.2}});
        let seen = client1
            .act_on_all(&[s.dummy1.to_string(), s.dummy2.to_string()], &body, "starting", Duration::from_secs(5))
            .await
            .unwrap();
        let t: Vec<f64> = seen.iter().map(|(_, t)| t.expect("both started")).collect();
        skews.push(Duration::from_secs_f64((t[0] - t[1]).abs()));
    }
    skews.sort();
    println!(
        "  skew between the two sites: p50 {} p99 {} max {}",
        ms(pct(&skews, 0.5)),
        ms(pct(&skews, 0.99)),
        ms(skews[skews.len() - 1])
    );
    client1.close().await;
    client2.close().await;
}

/// Cut and heal the link 100 times.
async fn cycles(s: &Sites) {
    println!("cycles: 100 cuts and heals of the federation link (alive interval 1 s)");
    let (mut stale, mut healed) = (Vec::new(), Vec::new());
    for i in 0..100 {
        federate(&s.prefix, &s.exchange, &["--remove"]);
        let t = Instant::now();
        while !s.seen().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10), "cycle {i}: site 2 never went stale");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stale.push(t.elapsed());
        federate(&s.prefix, &s.exchange, &[]);
        let took = s.wait_equal(Duration::from_secs(10)).await.unwrap_or_else(|| panic!("cycle {i}: never equal"));
        healed.push(took);
    }
    stale.sort();
    healed.sort();
    println!("  stale after the cut command returned: p50 {} p99 {}", ms(pct(&stale, 0.5)), ms(pct(&stale, 0.99)));
    println!(
        "  equal to the truth after the heal command returned: p50 {} p99 {}",
        ms(pct(&healed, 0.5)),
        ms(pct(&healed, 0.99))
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The allocator as the daemon's `main` tunes it (the directory part
    // measures resident memory in this process).
    busbar::daemon::tune_allocator();
    busbar::telemetry::init("warn,lapin=off", false);
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if wants("directory") {
        directory();
    }
    if wants("link") || wants("skew") || wants("cycles") {
        let s = sites().await;
        if wants("link") {
            link(&s).await;
        }
        if wants("skew") {
            skew(&s).await;
        }
        if wants("cycles") {
            cycles(&s).await;
        }
        s.stop().await;
    }
}
