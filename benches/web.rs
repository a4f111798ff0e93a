//! The status page and the WebSocket event stream, against the release
//! daemon as its own process:
//!
//! 1. **viewers**: CPU of the daemon with 0 and with 100 WebSocket viewers
//!    (each subscribed to every status) at 100 status changes a second,
//!    next to RabbitMQ's in the same windows;
//! 2. **dom**: the time from a status published on the bus to the change
//!    in the page's DOM in headless Chromium, p50/p99, next to the broker's
//!    own one-hop latency in the same run;
//! 3. **render**: the first render of the page with 10,000 components.
//!
//! Run: `cargo bench --bench web` (or `--profile quick`). Needs RabbitMQ,
//! and Chromium with ChromeDriver for 2 and 3 (`scripts/chromium`).

use futures_util::{SinkExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

mod common;
use common::{cpu_of, free_port, ms, pct, pid_of};

#[path = "../tests/common/browser.rs"]
#[allow(dead_code)]
mod browser;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1e3
}

struct Daemon {
    child: Child,
    api: String,
    exchange: String,
    realm: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

impl Daemon {
    async fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let id = Uuid::new_v4().simple().to_string();
        let (exchange, realm) = (format!("bench-web-{id}"), format!("bench.{}", &id[..8]));
        let cfg = json!({"broker": {"url": URL}, "exchange": exchange, "realm": realm, "site": "bench",
            "data_dir": dir.path().join("data"), "api": {"bind": format!("127.0.0.1:{port}")},
            "components": [{"category": "manager", "type": "generic", "name": "m"}]});
        let path = dir.path().join("bench.yaml");
        std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let child = common::spawn_daemon(&path, "error", None);
        let api = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        while http.get(format!("{api}/api/v1/health")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Daemon { child, api, exchange, realm, _dir: dir }
    }
}

/// A publisher of status messages on the daemon's exchange.
struct Bus {
    ch: lapin::Channel,
    exchange: String,
    realm: String,
}

impl Bus {
    async fn open(d: &Daemon) -> Bus {
        let conn = Connection::connect(URL, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        std::mem::forget(conn);
        Bus { ch, exchange: d.exchange.clone(), realm: d.realm.clone() }
    }

    async fn status(&self, uuid: Uuid, name: &str, state: &str, extra: Value) {
        let body = json!({"status": {"state": state, "extra": extra},
            "properties": {"uuid": uuid, "name": name, "category": "simulator", "type": "dummy", "realm": self.realm}});
        let mut h = FieldTable::default();
        h.insert("uuid".into(), AMQPValue::LongString(LongString::from(uuid.to_string())));
        let props = BasicProperties::default().with_content_type("application/json".into()).with_headers(h);
        let bytes = serde_json::to_vec(&body).unwrap();
        self.ch
            .basic_publish(self.exchange.as_str().into(), "".into(), BasicPublishOptions::default(), &bytes, props)
            .await
            .unwrap();
    }
}

/// 1. CPU with 0 and 100 viewers at 100 status changes a second.
async fn viewers(d: &Daemon) {
    let bus = Bus::open(d).await;
    let rabbit = pid_of("beam.smp");
    let pid = d.child.id().to_string();
    let window = async |n: usize| {
        let ws_url = format!("ws{}/api/v1/events", &d.api[4..]);
        let mut clients = Vec::new();
        for _ in 0..n {
            let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
            ws.send(tokio_tungstenite::tungstenite::Message::Text(
                json!({"topic": "/status/.*", "matching": "regex"}).to_string().into(),
            ))
            .await
            .unwrap();
            let _ = ws.next().await;
            clients.push(tokio::spawn(async move {
                let mut frames = 0u64;
                while let Some(Ok(_)) = ws.next().await {
                    frames += 1;
                }
                frames
            }));
        }
        let uuid = Uuid::new_v4();
        let secs = 20u32;
        let (d0, r0) = (cpu_of(&pid), rabbit.as_deref().map_or(0.0, cpu_of));
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for i in 0..(100 * secs) {
            tick.tick().await;
            let state = if i % 2 == 0 { "running" } else { "paused" };
            bus.status(uuid, "bench", state, json!({"i": i, "pad": "x".repeat(600)})).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let wall = start.elapsed().as_secs_f64();
        let (dc, rc) = (cpu_of(&pid) - d0, rabbit.as_deref().map_or(0.0, cpu_of) - r0);
        for c in &clients {
            c.abort();
        }
        (dc / wall * 100.0, rc / wall * 100.0)
    };
    let (idle_busbar, idle_rabbit) = window(0).await;
    let (busy_busbar, busy_rabbit) = window(100).await;
    let bare = tokio::task::spawn_blocking(|| bare_writers(20)).await.unwrap();
    println!("viewers: 100 status changes/s (≈0.8 KiB each) for 20 s");
    println!("  0 viewers:   busbar {idle_busbar:.1} % of a core, rabbitmq {idle_rabbit:.1} %");
    println!("  100 viewers: busbar {busy_busbar:.1} % of a core, rabbitmq {busy_rabbit:.1} %");
    println!(
        "  bare writers (plain tokio TCP, the same 10,000 frames/s to 100 loopback sockets): {bare:.1} % of a core"
    );
    println!(
        "  cost of 100 viewers: {:.1} % of a core (10,000 frames/s); {:.2}× the bare writers; {:.2}× RabbitMQ's own CPU for the status stream",
        busy_busbar - idle_busbar,
        (busy_busbar - idle_busbar) / bare.max(0.01),
        (busy_busbar - idle_busbar) / busy_rabbit.max(0.01)
    );
}

/// The floor of the same work: 100 loopback TCP connections, each sent
/// the same 0.8 KiB frames at 100 a second by plain tokio tasks on one
/// thread (a current-thread runtime, `TCP_NODELAY` as busbar's listeners
/// set it), readers on another thread. Returns that writer thread's CPU
/// in % of a core.
fn bare_writers(secs: u32) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let readers = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut tasks = Vec::new();
            for _ in 0..100 {
                let (mut s, _) = l.accept().await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    });
    let writer = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (tx, _) = tokio::sync::broadcast::channel::<std::sync::Arc<Vec<u8>>>(4096);
            let mut conns = Vec::new();
            for _ in 0..100 {
                let s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut rx = tx.subscribe();
                conns.push(tokio::spawn(async move {
                    let mut s = s;
                    while let Ok(f) = rx.recv().await {
                        if s.write_all(&f).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            let frame = std::sync::Arc::new(vec![b'x'; 820]);
            let cpu = || {
                let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: a valid out-pointer for the calling thread's clock.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
            };
            let (c0, t0) = (cpu(), Instant::now());
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..(100 * secs) {
                tick.tick().await;
                let _ = tx.send(frame.clone());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let pct = (cpu() - c0) / t0.elapsed().as_secs_f64() * 100.0;
            drop(tx);
            for c in conns {
                let _ = c.await;
            }
            pct
        })
    });
    let pct = writer.join().unwrap();
    readers.join().unwrap();
    pct
}

/// The broker's one hop: publish to a queue, consume it, p50/p99.
async fn broker_hop() -> (Duration, Duration) {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let ex = "amq.direct";
    ch.queue_bind(
        q.name().clone(),
        ex.into(),
        q.name().as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        ch.basic_publish(
            ex.into(),
            q.name().as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap();
        c.next().await.unwrap().unwrap();
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lat.sort();
    let _ = conn.close(200, "done".into()).await;
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

/// 2. A status on the bus to the DOM.
async fn dom(d: &Daemon, b: &browser::Browser) {
    let bus = Bus::open(d).await;
    let uuid = Uuid::new_v4();
    bus.status(uuid, "latency", "idle", json!({})).await;
    b.client.goto(&format!("{}/", d.api)).await.unwrap();
    b.until(
        "the live stream",
        Duration::from_secs(20),
        "return document.getElementById('live').textContent === 'live';",
    )
    .await;
    b.until(
        "the row",
        Duration::from_secs(20),
        &format!("return document.querySelector('tr.ic[data-uuid=\"{uuid}\"]') !== null;"),
    )
    .await;
    // Record when the row's state changes, in the page's own clock
    // (the machine's wall clock, as the publisher's).
    b.client
        .execute(
            &format!(
                "window.changes = [];
                 let last = null;
                 new MutationObserver(() => {{
                   const r = document.querySelector('tr.ic[data-uuid=\"{uuid}\"]');
                   const s = r && r.dataset.state;
                   if (s && s !== last) {{ last = s; window.changes.push([s, performance.timeOrigin + performance.now()]); }}
                 }}).observe(document.getElementById('ics'), {{subtree: true, childList: true, attributes: true}});
                 return 1;"
            ),
            vec![],
        )
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..200 {
        let state = if i % 2 == 0 { "running" } else { "paused" };
        let t = now_ms();
        bus.status(uuid, "latency", state, json!({})).await;
        sent.push(t);
        b.until("the change", Duration::from_secs(10), &format!("return window.changes.length >= {};", i + 1)).await;
    }
    let changes = b.client.execute("return window.changes;", vec![]).await.unwrap();
    let mut lat: Vec<Duration> = changes
        .as_array()
        .unwrap()
        .iter()
        .zip(&sent)
        .map(|(c, s)| Duration::from_secs_f64(((c[1].as_f64().unwrap() - s) / 1e3).max(0.0)))
        .collect();
    lat.sort();
    let (hop50, hop99) = broker_hop().await;
    println!("dom: status published on the bus → the page's DOM, 200 changes");
    println!("  p50 {}, p99 {}", ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)));
    println!("  broker one hop in the same run: p50 {}, p99 {}", ms(hop50), ms(hop99));
    println!(
        "  ratio to one broker hop: p50 {:.1}×, p99 {:.1}×; against VILLASweb's 3 s polling: p99 is {:.1} % of it",
        pct(&lat, 0.5).as_secs_f64() / hop50.as_secs_f64(),
        pct(&lat, 0.99).as_secs_f64() / hop99.as_secs_f64(),
        pct(&lat, 0.99).as_secs_f64() / 3.0 * 100.0
    );
}

/// 3. The first render with 10,000 components.
async fn render(d: &Daemon, b: &browser::Browser) {
    let bus = Bus::open(d).await;
    for i in 0..10_000 {
        bus.status(Uuid::new_v4(), &format!("sim-{i:05}"), "idle", json!({})).await;
    }
    let http = reqwest::Client::new();
    loop {
        let f: Value = http.get(format!("{}/api/v1/federation", d.api)).send().await.unwrap().json().await.unwrap();
        if f["ics"].as_u64().unwrap_or(0) >= 10_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The whole merged view over HTTP, as the page and `busbar components`
    // read it (the body read in full, not parsed), after one request that
    // builds the first snapshot; next to the same bytes served by a bare
    // axum route in this process (the floor of moving 2 MB over loopback
    // HTTP on this machine).
    let url = format!("{}/api/v1/federation/components", d.api);
    let body = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    let bare = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let payload = body.clone();
        let app = axum::Router::new().route("/", axum::routing::get(move || async move { payload.clone() }));
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}/")
    };
    let time = async |url: &str| {
        let mut t = Vec::new();
        for _ in 0..200 {
            let start = Instant::now();
            std::hint::black_box(http.get(url).send().await.unwrap().bytes().await.unwrap());
            t.push(start.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        t.sort();
        t
    };
    let (busbar_gets, bare_gets) = (time(&url).await, time(&bare).await);
    println!(
        "render: GET /api/v1/federation/components with 10,000+ ICs ({:.1} MB), 200 requests: p50 {}, p99 {}; the same bytes from a bare axum route: p50 {}, p99 {} ({:.1}× / {:.1}×)",
        body.len() as f64 / 1e6,
        ms(pct(&busbar_gets, 0.5)),
        ms(pct(&busbar_gets, 0.99)),
        ms(pct(&bare_gets, 0.5)),
        ms(pct(&bare_gets, 0.99)),
        pct(&busbar_gets, 0.5).as_secs_f64() / pct(&bare_gets, 0.5).as_secs_f64(),
        pct(&busbar_gets, 0.99).as_secs_f64() / pct(&bare_gets, 0.99).as_secs_f64(),
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        b.client.goto("about:blank").await.unwrap();
        b.client.goto(&format!("{}/", d.api)).await.unwrap();
        let v = b
            .until(
                "10,000 rows",
                Duration::from_secs(60),
                "const r = window.busbarRendered; return r && r.rows >= 10000 ? r.at : null;",
            )
            .await;
        times.push(Duration::from_secs_f64(v.as_f64().unwrap() / 1e3));
    }
    times.sort();
    println!("render: the page from navigation to 10,000+ rows in the DOM, 5 loads");
    println!("  median {}, worst {}", ms(pct(&times, 0.5)), ms(*times.last().unwrap()));
}

#[tokio::main]
async fn main() {
    busbar::http::install_crypto_provider();
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    let d = Daemon::start().await;
    if run("viewers") {
        viewers(&d).await;
    }
    if run("dom") || run("render") {
        let Some(b) = browser::Browser::start().await else { return };
        if run("dom") {
            dom(&d, &b).await;
        }
        if run("render") {
            render(&d, &b).await;
        }
        b.close().await;
    }
}
