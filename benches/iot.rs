//! IoT gateway benchmarks against the real Mosquitto and RabbitMQ, each next
//! to the brokers' own limits measured in the same run. A measure needs
//! both hops (MQTT in, AMQP out), so the smaller limit is the ceiling.
//!
//! Run: `cargo bench --bench iot` (all), or name scenarios:
//! `cargo bench --bench iot -- ceiling mqtt capacity sustained latency http rss`.
//! The daemon runs as a separate release process; `http` needs `wrk`.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// Where the CPU time goes during a run: the two brokers, this load
/// generator and (when there is one) the daemon, from `/proc`.
struct CpuSplit {
    pids: Vec<(&'static str, String)>,
    start: Vec<f64>,
}

impl CpuSplit {
    fn start(daemon: Option<u32>) -> CpuSplit {
        let mut pids = vec![("busbar", daemon.map(|p| p.to_string()))];
        pids.push(("rabbitmq", pid_of("beam.smp")));
        pids.push(("mosquitto", pid_of("mosquitto")));
        pids.push(("load generator", Some("self".to_owned())));
        let pids: Vec<_> = pids.into_iter().filter_map(|(n, p)| Some((n, p?))).collect();
        let start = pids.iter().map(|(_, p)| cpu_of(p)).collect();
        CpuSplit { pids, start }
    }

    /// µs of CPU per message for each process, and their sum.
    fn per_message(&self, messages: usize) -> (Vec<(&'static str, f64)>, f64) {
        let each: Vec<_> = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((n, p), s)| (*n, (cpu_of(p) - s) * 1e6 / messages.max(1) as f64))
            .collect();
        let sum = each.iter().map(|(_, us)| us).sum();
        (each, sum)
    }

    /// One line: each process's µs per message, the sum, and the rate two
    /// cores allow at that cost (with and without busbar's share).
    fn line(&self, what: &str, messages: usize) -> String {
        let (each, sum) = self.per_message(messages);
        let parts: Vec<String> = each.iter().map(|(n, us)| format!("{n} {us:.1}")).collect();
        let others: f64 = each.iter().filter(|(n, _)| *n != "busbar").map(|(_, us)| us).sum();
        format!(
            "  CPU per message, {what}: {} = {sum:.1} µs; two cores allow {:.0}/s at that cost, {:.0}/s without busbar's share",
            parts.join(" + "),
            2e6 / sum,
            2e6 / others
        )
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// An MQTT client with its event loop polled in a task; received publishes
/// go to `rx`.
async fn mqtt(id: &str, inflight: u16) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut opts = MqttOptions::new(format!("{id}-{}", Uuid::new_v4().simple()), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(30)).set_inflight(inflight).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 100_000);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        while let Ok(ev) = events.poll().await {
            match ev {
                Event::Incoming(Packet::ConnAck(_)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = tx.send(Vec::new());
                }
                _ => {}
            }
        }
    });
    ready_rx.await.unwrap();
    (client, rx)
}

/// Mosquitto alone: one publisher, one subscriber, `n` messages at `qos`.
async fn mosquitto(n: usize, qos: QoS) -> f64 {
    let topic = format!("bench/{}/json/k/d/attrs", Uuid::new_v4().simple());
    let (sub, mut rx) = mqtt("sub", 1000).await;
    sub.subscribe(&topic, qos).await.unwrap();
    rx.recv().await; // SUBACK
    let (publisher, _) = mqtt("pub", 1000).await;
    let body = br#"{"t":21.5,"h":40}"#.to_vec();
    let split = CpuSplit::start(None);
    let t = Instant::now();
    let p = tokio::spawn(async move {
        for _ in 0..n {
            publisher.publish(&topic, qos, false, body.clone()).await.unwrap();
        }
        publisher
    });
    let mut got = 0;
    let mut last = t;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
            Ok(Some(_)) => {
                got += 1;
                last = Instant::now();
            }
            _ => break,
        }
    }
    let rate = got as f64 / (last - t).as_secs_f64();
    println!("{}", split.line(&format!("Mosquitto relay at {qos:?}"), got));
    let _ = p.await;
    if got < n {
        println!("  (mosquitto delivered {got} of {n} at {qos:?}: its per-client queue overflowed)");
    }
    rate
}

async fn data_consumer(exchange: &str) -> (Connection, lapin::Consumer) {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(exchange.into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let q = ch.queue_declare("".into(), opts, FieldTable::default()).await.unwrap();
    ch.queue_bind(q.name().clone(), exchange.into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let c = ch.basic_consume(q.name().clone(), "".into(), consume, FieldTable::default()).await.unwrap();
    (conn, c)
}

/// RabbitMQ alone: publish with confirms (batches in a window of 1024, as
/// the gateway does) to a topic exchange, consume from a bound queue.
async fn rabbitmq(n: usize) -> f64 {
    let exchange = format!("bench-data-{}", Uuid::new_v4().simple());
    let (_c, mut consumer) = data_consumer(&exchange).await;
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let body =
        serde_json::to_vec(&json!({"metadata": {"deviceid": "d", "tenant": "lab", "timestamp": 1, "service": "lab",
        "servicepath": "/", "entity_name": "Sensor:d", "entity_type": "Sensor", "gateway": Uuid::nil().to_string(),
        "types": {"t": "Number", "h": "Text"}}, "attrs": {"t": 21.5, "h": 40}}))
        .unwrap();
    let split = CpuSplit::start(None);
    let t = Instant::now();
    let ex = exchange.clone();
    let publisher = tokio::spawn(async move {
        let ex: lapin::types::ShortString = ex.as_str().into();
        let props = BasicProperties::default().with_delivery_mode(2);
        let mut window = VecDeque::new();
        let mut sent = 0;
        let key = lapin::types::ShortString::from("bench.lab.Sensor.d");
        while sent < n {
            // Batches of what the window has room for, as the gateway's publisher does.
            let k = busbar::iot::federation::BATCH.min(n - sent);
            let batch = (0..k).map(|_| (&key, body.as_slice()));
            for c in busbar::amqp::publish_batch(&ch, &ex, &props, batch).await {
                window.push_back(c.unwrap());
            }
            sent += k;
            while window.len() > 1024 - busbar::iot::federation::BATCH {
                window.pop_front().unwrap().await.unwrap();
            }
        }
        for c in window {
            c.await.unwrap();
        }
    });
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            _ => break,
        }
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    publisher.await.unwrap();
    println!("{}", split.line("RabbitMQ publish + consume", got));
    rate
}

struct Daemon {
    child: Child,
    north: u16,
    south: u16,
    data: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

mod common;
use common::{cpu_of, free_port, pid_of};

impl Daemon {
    async fn start(qos: u8, prefix: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (north, south) = (free_port(), free_port());
        let data = format!("bench-data-{}", Uuid::new_v4().simple());
        let yaml = format!(
            "broker: {{url: \"{}\"}}\nexchange: bench-{}\nrealm: bench\napi: {{enabled: false}}\ndata_dir: data\ncomponents:\n  - {{category: gateway, type: iot-agent, name: gw, north_bind: \"127.0.0.1:{north}\", south_bind: \"127.0.0.1:{south}\", mqtt_prefix: {prefix}, mqtt_qos: {qos}, federation_exchange: {data}}}\n",
            url(),
            Uuid::new_v4().simple()
        );
        let cfg = dir.path().join("bench.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_busbar"))
            .args(["--log-level", "error", "daemon", "-c"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("daemon starts");
        let d = Daemon { child, north, south, data, _dir: dir };
        let http = reqwest::Client::new();
        let about = format!("http://127.0.0.1:{north}/iot/about");
        while http.get(&about).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let group = json!({"groups": [{"resource": "/iot/json", "apikey": "k", "entity_type": "Sensor",
            "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}]}]});
        d.north("/iot/groups", group).await;
        d.north("/iot/devices", json!({"devices": [{"device_id": "d"}]})).await;
        // Wait until the MQTT subscriptions and the federation are up.
        while !(d.metric("mqttConnected").await == Some(1) && d.metric("federationConnected").await == Some(1)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    async fn north(&self, path: &str, body: serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}{path}", self.north))
            .header("fiware-service", "lab")
            .header("fiware-servicepath", "/")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap_or_default());
    }

    /// One unlabelled sample of the gateway's `/metrics`.
    async fn metric(&self, name: &str) -> Option<u64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.north)).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    fn proc_stat(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU seconds of the daemon.
    fn cpu(&self) -> f64 {
        cpu_of(&self.child.id().to_string())
    }
}

/// A daemon with a gateway at `qos`, a consumer on its data exchange, and
/// an MQTT publisher for its device's topic.
struct Pipeline {
    daemon: Daemon,
    _conn: Connection,
    consumer: lapin::Consumer,
    publisher: AsyncClient,
    topic: String,
    qos: QoS,
}

impl Pipeline {
    async fn start(qos: u8) -> Pipeline {
        let prefix = format!("b{}", &Uuid::new_v4().simple().to_string()[..8]);
        let daemon = Daemon::start(qos, &prefix).await;
        let (_conn, consumer) = data_consumer(&daemon.data).await;
        let (publisher, _) = mqtt("pub", 1000).await;
        let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        Pipeline { daemon, _conn, consumer, publisher, topic: format!("{prefix}/json/k/d/attrs"), qos }
    }
}

/// Count deliveries until `n` arrived or none came for 3 s: how many, and
/// when the last one arrived (`t` if none did).
async fn count(consumer: &mut lapin::Consumer, n: usize, t: Instant) -> (usize, Instant) {
    let mut got = 0;
    let mut last = t;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
            Ok(Some(Ok(_))) => {
                got += 1;
                last = Instant::now();
            }
            _ => break,
        }
    }
    (got, last)
}

/// Measures/s from MQTT through busbar into the data exchange when the
/// publisher floods (past capacity: what is delivered, what is lost), and
/// CPU seconds per measure of the daemon.
async fn through(qos: u8, n: usize) -> (f64, f64, usize) {
    let Pipeline { daemon: d, _conn, mut consumer, publisher, topic, qos: q } = Pipeline::start(qos).await;
    let cpu0 = d.cpu();
    let split = CpuSplit::start(Some(d.child.id()));
    let t = Instant::now();
    let p = tokio::spawn(async move {
        for i in 0..n {
            publisher.publish(&topic, q, false, format!("{{\"t\":{i},\"h\":40}}")).await.unwrap();
        }
        publisher
    });
    let (got, last) = count(&mut consumer, n, t).await;
    let cpu = d.cpu() - cpu0;
    println!("{}", split.line(&format!("MQTT QoS {qos} flood through busbar"), got));
    if got < n {
        let took = d.metric("measureRequests_total{transport=\"mqtt\"}").await.unwrap_or(0);
        println!("  (busbar took {took} of {n} from Mosquitto; {got} reached the data consumer)");
    }
    let _ = p.await;
    (got as f64 / (last - t).as_secs_f64(), cpu / got.max(1) as f64, got)
}

/// Publish at a steady `rate` for `secs` seconds: how many arrive, whether
/// the last arrived within 250 ms of the end (the pipeline kept up), and
/// where the CPU went.
async fn sustained(qos: u8, rate: u64, secs: u64) -> (usize, usize, bool, String) {
    let Pipeline { daemon: d, _conn, mut consumer, publisher, topic, qos: q } = Pipeline::start(qos).await;
    let n = (rate * secs) as usize;
    let gap = Duration::from_secs_f64(1.0 / rate as f64);
    let split = CpuSplit::start(Some(d.child.id()));
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for i in 0..n {
            next += gap;
            tokio::time::sleep_until(next).await;
            publisher.publish(&topic, q, false, format!("{{\"t\":{i}}}")).await.unwrap();
        }
        publisher
    });
    let t = Instant::now();
    let (got, last) = count(&mut consumer, n, t).await;
    // Everything must also have arrived in time: a pipeline that falls
    // behind the offered rate is past its capacity even if queues absorb it.
    let kept_up = (last - t).as_secs_f64() <= secs as f64 + 0.25;
    let line = split.line(&format!("MQTT QoS {qos} at a steady {rate}/s"), got);
    (got, n, kept_up, line)
}

/// The highest steady rate (steps of ×1.25 from 4,000/s, 3 s each) at which
/// every measure arrives, on time: the pipeline's capacity without loss.
async fn capacity(qos: u8) -> (u64, String) {
    let (mut best, mut split) = (0, String::new());
    let mut rate = 4000;
    while rate <= 60_000 {
        let (got, n, kept_up, line) = sustained(qos, rate, 3).await;
        if got < n || !kept_up {
            break;
        }
        (best, split) = (rate, line);
        rate = rate * 5 / 4;
    }
    (best, split)
}

/// Publish at `rate`/s for `n` measures with the send time inside; the
/// latency from MQTT publish to AMQP delivery, p50 and p99 in ms.
async fn latency(rate: u64, n: usize) -> (f64, f64) {
    let Pipeline { daemon: _d, _conn, mut consumer, publisher, topic, .. } = Pipeline::start(1).await;
    let gap = Duration::from_micros(1_000_000 / rate);
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for _ in 0..n {
            next += gap;
            tokio::time::sleep_until(next).await;
            publisher.publish(&topic, QoS::AtLeastOnce, false, format!("{{\"sent\":{}}}", now_us())).await.unwrap();
        }
    });
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await else { break };
        let v: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
        lat.push(now_us().saturating_sub(v["attrs"]["sent"].as_u64().unwrap()));
    }
    lat.sort_unstable();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

/// `wrk` against the HTTP southbound: (requests/s, p99 ms, raw output).
async fn http(seconds: u32, connections: u32) -> Option<(f64, String)> {
    let d = Daemon::start(0, "none").await;
    let script = d._dir.path().join("post.lua");
    std::fs::write(
        &script,
        "wrk.method = \"POST\"\nwrk.body = '{\"t\":21.5,\"h\":40}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
    )
    .unwrap();
    let (_c, mut consumer) = data_consumer(&d.data).await;
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = consumer.next().await {} });
    let split = CpuSplit::start(Some(d.child.id()));
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/iot/json?k=k&i=d", d.south))
        .output()
        .ok()?;
    drain.abort();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rate = text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())?;
    let requests = text.lines().find_map(|l| l.trim().split_once(" requests in")?.0.parse().ok()).unwrap_or(0);
    println!("{}", split.line("HTTP request through busbar (load generator = wrk)", requests));
    Some((rate, text))
}

/// RSS of a daemon with one gateway, idle and with `n` provisioned devices.
async fn rss(n: usize) -> (f64, f64) {
    let d = Daemon::start(1, "rss").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = d.proc_stat("VmRSS:") as f64 / 1024.0;
    for chunk in 0..n.div_ceil(1000) {
        let devices: Vec<_> = (chunk * 1000..((chunk + 1) * 1000).min(n))
            .map(|i| {
                json!({"device_id": format!("dev{i}"), "entity_type": "Meter",
                "attributes": [{"object_id": "p", "name": "power", "type": "Number"}]})
            })
            .collect();
        d.north("/iot/devices", json!({"devices": devices})).await;
    }
    // Let the device announcements go out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    (idle, d.proc_stat("VmRSS:") as f64 / 1024.0)
}

#[tokio::main]
async fn main() {
    let Some(named) = common::scenarios() else { return };
    let want = |s: &str| common::wants(&named, s);
    let mut ceiling = [None, None];
    if want("ceiling") || want("mqtt") || want("capacity") {
        let m0 = mosquitto(200_000, QoS::AtMostOnce).await;
        let m1 = mosquitto(100_000, QoS::AtLeastOnce).await;
        let r = rabbitmq(200_000).await;
        println!("mosquitto relay: {m0:.0} msg/s at QoS 0, {m1:.0} msg/s at QoS 1");
        println!("rabbitmq publish (confirms, window 1024) + consume: {r:.0} msg/s");
        ceiling = [Some(m0.min(r)), Some(m1.min(r))];
        println!("ceiling: {:.0}/s at QoS 0, {:.0}/s at QoS 1", m0.min(r), m1.min(r));
    }
    if want("mqtt") {
        for (qos, n) in [(0u8, 200_000), (1, 100_000)] {
            let (rate, cpu, got) = through(qos, n).await;
            let c = ceiling[qos as usize].unwrap();
            println!(
                "MQTT QoS {qos} flood -> busbar -> villas.data: {rate:.0} measures/s ({:.2}x ceiling), {got}/{n} delivered, {:.1} µs CPU per measure",
                rate / c,
                cpu * 1e6
            );
        }
    }
    if want("capacity") {
        for qos in [0u8, 1] {
            let (best, split) = capacity(qos).await;
            let ratio =
                ceiling[qos as usize].map(|c| format!(" ({:.2}x ceiling)", best as f64 / c)).unwrap_or_default();
            println!("{split}");
            println!("MQTT QoS {qos} capacity: {best}/s steady with nothing lost{ratio}");
        }
    }
    if want("sustained") {
        for (qos, rate) in [(0u8, 10_000), (1, 8_000)] {
            let (got, n, kept_up, split) = sustained(qos, rate, 5).await;
            let late = if kept_up { "" } else { ", the last more than 250 ms late" };
            println!("{split}");
            println!("MQTT QoS {qos} at a steady {rate}/s for 5 s: {got} of {n} delivered{late}");
        }
    }
    if want("latency") {
        let (p50, p99) = latency(2000, 20_000).await;
        println!("MQTT publish -> AMQP delivery at 2000/s (QoS 1): p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    if want("http") {
        match http(10, 64).await {
            Some((rate, text)) => {
                let p99 = text.lines().find(|l| l.trim_start().starts_with("99%")).unwrap_or("").trim().to_owned();
                println!("HTTP south (wrk -t2 -c64 -d10s): {rate:.0} req/s, latency {p99}");
            }
            None => println!("HTTP south: wrk not found (apt-get install wrk)"),
        }
    }
    if want("rss") {
        let (idle, full) = rss(10_000).await;
        println!("RSS: {idle:.1} MiB with one gateway and no device, {full:.1} MiB with 10000 devices");
    }
}
