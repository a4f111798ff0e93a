//! Chaos: faults against a running daemon, checking after each one that
//! nothing was lost and that the daemon answers again.
//!
//! Run: `cargo bench --bench chaos` (200 faults), or `cargo bench --bench
//! chaos -- 50` for fewer. It needs root (rabbitmqctl) and takes over the
//! local RabbitMQ while it runs (it restarts it): run it alone.
//!
//! The daemon (release build, a separate process as in production) runs a
//! manager with 10 created dummies, a dummy, a generic simulator and an IoT
//! gateway with 20 provisioned devices, whose MQTT broker is a private
//! Mosquitto with persistence. The faults, in turn:
//! 1. every AMQP connection of the daemon closed by the broker;
//! 2. RabbitMQ restarted (`stop_app`, `start_app`);
//! 3. the private Mosquitto restarted (SIGTERM, start);
//! 4. the daemon killed with SIGKILL, then started again;
//! 5. a child crash storm: 10 starts of a child that exits 3 at once.
//!
//! During each fault 20 measures are published at QoS 1. After each fault:
//! the time until the dummy answers a ping (goal ≤ 3 s), every component
//! and device still there, and every measure sent so far delivered to a
//! durable queue on the federation exchange (at least once).

use busbar::client::Client;
use busbar::protocol::Filter;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

mod common;
use common::{free_port, pct};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const CREATED: usize = 10;
const DEVICES: usize = 20;
const MEASURES_PER_FAULT: usize = 20;

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs (as root)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Mosquitto {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        let mut m = Mosquitto { port: free_port(), dir: dir.to_owned(), child: None };
        m.restart();
        m
    }

    fn restart(&mut self) {
        self.stop();
        let conf = self.dir.join("mosquitto.conf");
        let text = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nuser root\nlog_dest none\nmax_queued_messages 100000\n",
            self.port,
            self.dir.display()
        );
        std::fs::write(&conf, text).unwrap();
        self.child = Some(Command::new("mosquitto").arg("-c").arg(&conf).spawn().expect("mosquitto runs"));
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            common::terminate(&mut c);
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Lab {
    dir: tempfile::TempDir,
    exchange: String,
    data: String,
    manager: Uuid,
    dummy: Uuid,
    generic: Uuid,
    gateway: Uuid,
    api: u16,
    north: u16,
    south: u16,
    daemon: Option<Child>,
}

impl Lab {
    fn config(&self, mqtt: u16) -> String {
        let bin = format!("{}/tests/fixtures/bin", env!("CARGO_MANIFEST_DIR"));
        let bin = regex::escape(&bin).replace('\'', "''");
        format!(
            "exchange: {ex}\nrealm: chaos\ndata_dir: {data}\napi: {{bind: \"127.0.0.1:{api}\"}}\ncomponents:\n\
  - {{category: manager, type: generic, name: Manager, uuid: {m}}}\n\
  - {{category: simulator, type: dummy, name: Dummy, uuid: {d}}}\n\
  - {{category: simulator, type: generic, name: Gen, uuid: {g}, whitelist: ['{bin}/']}}\n\
  - {{category: gateway, type: iot-agent, name: Agent, uuid: {gw}, north_bind: \"127.0.0.1:{n}\", south_bind: \"127.0.0.1:{s}\", mqtt_url: \"mqtt://127.0.0.1:{mqtt}\", federation_exchange: {fx}}}\n",
            ex = self.exchange,
            data = self.dir.path().join("data").display(),
            api = self.api,
            m = self.manager,
            d = self.dummy,
            g = self.generic,
            gw = self.gateway,
            n = self.north,
            s = self.south,
            fx = self.data,
        )
    }

    fn start_daemon(&mut self) {
        let log = self.dir.path().join("daemon.log");
        self.daemon = Some(common::spawn_daemon(&self.dir.path().join("lab.yaml"), "warn", Some(&log)));
    }

    fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            common::terminate(&mut c);
        }
    }
}

/// Until `deadline`: connect, ping `uuid`, wait 500 ms for its answer.
async fn ping_until(exchange: &str, uuid: Uuid, deadline: Instant) -> Option<Duration> {
    let start = Instant::now();
    while Instant::now() < deadline {
        if let Ok(c) = Client::connect(URL, exchange).await {
            let filter = Filter { uuid: Some(uuid.to_string()), ..Default::default() };
            let n = c.ping(&filter, Duration::from_millis(500), Duration::from_millis(500), |_| {}).await.unwrap_or(0);
            c.close().await;
            if n > 0 {
                return Some(start.elapsed());
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    None
}

async fn http_json(url: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(url)
        .header("fiware-service", "lab")
        .header("fiware-servicepath", "/")
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// The federation consumer: a durable queue (it keeps measures while the
/// broker restarts), re-consumed after each reconnect.
fn consume_federation(exchange: String, queue: String, seen: Arc<Mutex<HashSet<String>>>) {
    tokio::spawn(async move {
        loop {
            let Ok(conn) = Connection::connect(URL, ConnectionProperties::default()).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let Ok(ch) = conn.create_channel().await else { continue };
            let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
            let _ = ch
                .exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Topic, durable, FieldTable::default())
                .await;
            let qo = QueueDeclareOptions { durable: true, ..Default::default() };
            let _ = ch.queue_declare(queue.as_str().into(), qo, FieldTable::default()).await;
            let _ = ch
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await;
            let Ok(mut consumer) = ch
                .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
            else {
                continue;
            };
            while let Some(Ok(d)) = consumer.next().await {
                if let Ok(v) = serde_json::from_slice::<Value>(&d.data)
                    && let Some(seq) = v.pointer("/attrs/seq")
                {
                    let key =
                        format!("{}#{}", v.pointer("/metadata/deviceid").and_then(Value::as_str).unwrap_or("?"), seq);
                    seen.lock().unwrap().insert(key);
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        }
    });
}

/// A QoS 1 publisher with a persistent session on the private Mosquitto.
fn mqtt_publisher(port: u16) -> AsyncClient {
    let mut opts = MqttOptions::new(format!("chaos-{}", Uuid::new_v4().simple()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 100_000);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) | Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    client
}

#[tokio::main]
async fn main() {
    busbar::http::install_crypto_provider();
    let faults: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path());
    let id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut lab = Lab {
        dir,
        exchange: format!("chaos-{id}"),
        data: format!("chaos-data-{id}"),
        manager: Uuid::new_v4(),
        dummy: Uuid::new_v4(),
        generic: Uuid::new_v4(),
        gateway: Uuid::new_v4(),
        api: free_port(),
        north: free_port(),
        south: free_port(),
        daemon: None,
    };
    std::fs::write(lab.dir.path().join("lab.yaml"), lab.config(mosquitto.port)).unwrap();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    consume_federation(lab.data.clone(), format!("chaos-q-{id}"), seen.clone());
    lab.start_daemon();
    ping_until(&lab.exchange, lab.dummy, Instant::now() + Duration::from_secs(30)).await.expect("daemon answers");
    // Created components and provisioned devices: what must never be lost.
    let c = Client::connect(URL, &lab.exchange).await.unwrap();
    let mut created = Vec::new();
    for i in 0..CREATED {
        let u = Uuid::new_v4();
        let body = json!({"action": "create", "parameters": {"category": "simulator", "type": "dummy", "name": format!("c{i}"), "uuid": u.to_string()}});
        c.publish(Filter { uuid: Some(lab.manager.to_string()), ..Default::default() }.action_headers(), &body, None)
            .await
            .unwrap();
        created.push(u);
    }
    let north = format!("http://127.0.0.1:{}", lab.north);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{north}{path}"))
            .header("fiware-service", "lab")
            .header("fiware-servicepath", "/")
            .json(&body)
            .send()
    };
    let r =
        post("/iot/groups", json!({"groups": [{"apikey": "chaos", "resource": "/iot/json", "entity_type": "Meter"}]}))
            .await
            .unwrap();
    assert_eq!(r.status(), 201);
    let devices: Vec<Value> = (0..DEVICES).map(|i| json!({"device_id": format!("d{i}")})).collect();
    let r = post("/iot/devices", json!({"devices": devices})).await.unwrap();
    assert_eq!(r.status(), 201);
    c.close().await;
    let publisher = mqtt_publisher(mosquitto.port);
    let mut sent = 0usize;
    let mut recoveries = Vec::new();
    let (mut lost_components, mut lost_devices, mut lost_measures, mut slow) = (0usize, 0usize, 0usize, 0usize);
    let names = ["connection kill", "RabbitMQ restart", "Mosquitto restart", "daemon kill -9", "child crash storm"];
    let mut per_kind = [0usize; 5];
    let started = Instant::now();
    for n in 0..faults {
        let kind = n % names.len();
        per_kind[kind] += 1;
        // Measures published while the fault happens.
        let publish = |from: usize| {
            let publisher = publisher.clone();
            async move {
                for i in from..from + MEASURES_PER_FAULT {
                    let topic = format!("/json/chaos/d{}/attrs", i % DEVICES);
                    let _ = publisher.publish(topic, QoS::AtLeastOnce, false, format!("{{\"seq\": {i}}}")).await;
                }
            }
        };
        let measures = tokio::spawn(publish(sent));
        sent += MEASURES_PER_FAULT;
        match kind {
            0 => {
                let list = rabbitmqctl(&["list_connections", "pid", "client_properties", "-q", "--no-table-headers"]);
                for line in list.lines().filter(|l| l.contains(&lab.exchange) || l.contains(&lab.gateway.to_string())) {
                    if let Some(pid) = line.split_whitespace().next() {
                        rabbitmqctl(&["close_connection", pid, "chaos"]);
                    }
                }
            }
            1 => {
                rabbitmqctl(&["stop_app"]);
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            }
            2 => mosquitto.restart(),
            3 => {
                lab.kill_daemon();
                lab.start_daemon();
            }
            _ => {
                let c = Client::connect(URL, &lab.exchange).await.unwrap();
                let to = Filter { uuid: Some(lab.generic.to_string()), ..Default::default() }.action_headers();
                let exe = format!("{}/tests/fixtures/bin/exit-with.sh", env!("CARGO_MANIFEST_DIR"));
                for _ in 0..10 {
                    let start = json!({"action": "start", "parameters": {"executable": exe, "argv": ["3"]}});
                    c.publish(to.clone(), &start, None).await.unwrap();
                    c.publish(to.clone(), &json!({"action": "reset"}), None).await.unwrap();
                }
                c.close().await;
            }
        }
        let _ = measures.await;
        // Recovery: the dummy answers.
        match ping_until(&lab.exchange, lab.dummy, Instant::now() + Duration::from_secs(30)).await {
            Some(t) => {
                if t > Duration::from_secs(3) {
                    slow += 1;
                }
                recoveries.push(t);
            }
            None => {
                slow += 1;
                recoveries.push(Duration::from_secs(30));
            }
        }
        // Nothing lost: components, devices, measures (these may take a
        // few seconds to arrive after a fault).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let api = http_json(&format!("http://127.0.0.1:{}/api/v1", lab.api)).await;
            let have: HashSet<String> = api
                .as_ref()
                .and_then(|v| v["components"].as_array())
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let missing_components = created.iter().filter(|u| !have.contains(&u.to_string())).count();
            let devices =
                http_json(&format!("{north}/iot/devices")).await.and_then(|v| v["count"].as_u64()).unwrap_or(0)
                    as usize;
            let missing_measures = {
                let seen = seen.lock().unwrap();
                (0..sent).filter(|i| !seen.contains(&format!("d{}#{}", i % DEVICES, i))).count()
            };
            if missing_components == 0 && devices == DEVICES && missing_measures == 0 {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "fault {n} ({}): {missing_components} components, {} devices, {missing_measures} measures missing",
                    names[kind],
                    DEVICES.saturating_sub(devices)
                );
                lost_components += missing_components;
                lost_devices += DEVICES.saturating_sub(devices);
                lost_measures += missing_measures;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if (n + 1) % 20 == 0 {
            eprintln!("{} faults, {:.0} s", n + 1, started.elapsed().as_secs_f64());
        }
    }
    recoveries.sort();
    println!(
        "chaos: {faults} faults ({}) in {:.0} s",
        names.iter().zip(per_kind).map(|(n, k)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
        started.elapsed().as_secs_f64()
    );
    println!(
        "chaos: ping answered after a fault: p50 {:.2} s, p99 {:.2} s, max {:.2} s; {slow} over 3 s",
        pct(&recoveries, 0.5).as_secs_f64(),
        pct(&recoveries, 0.99).as_secs_f64(),
        recoveries.last().unwrap().as_secs_f64()
    );
    println!(
        "chaos: lost {lost_components} of {CREATED} created components, {lost_devices} of {DEVICES} devices, {lost_measures} of {sent} QoS 1 measures"
    );
    lab.kill_daemon();
}
