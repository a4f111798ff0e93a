//! Command benchmarks against the real Mosquitto and RabbitMQ, with the
//! daemon as a separate release process.
//!
//! - `roundtrip`: a VILLAS `command` action to a device's result, waited
//!   for as `busbar command --wait` does, next to the same path with the
//!   brokers alone (an in-bench relay that turns the AMQP request into the
//!   MQTT command and the MQTT result into the AMQP reply, doing nothing
//!   else). p50/p99 and the CPU split per command.
//! - `faults`: cycles of a fault each (the MQTT broker restarted, the
//!   device reconnecting, busbar killed with SIGKILL), commands sent
//!   around each; then commands sent, accepted, delivered, executed,
//!   executed twice and lost. `CYCLES` (default 1000) sets how many.
//!
//! Run: `cargo bench --bench commands [-- roundtrip faults]`.

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

mod common;
use common::{cpu_of, free_port, ms, pct, pid_of, spawn_daemon, terminate};

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// CPU seconds of the brokers, the bench and the daemon.
struct Split(Vec<(&'static str, String, f64)>);

impl Split {
    fn start(daemon: Option<u32>, mosquitto: Option<u32>) -> Split {
        let mut v = vec![];
        if let Some(p) = daemon {
            v.push(("busbar", p.to_string()));
        }
        let mosquitto = mosquitto.map(|p| p.to_string()).or_else(|| pid_of("mosquitto"));
        for (n, p) in [("rabbitmq", pid_of("beam.smp")), ("mosquitto", mosquitto)] {
            if let Some(p) = p {
                v.push((n, p));
            }
        }
        v.push(("bench", "self".to_owned()));
        Split(v.into_iter().map(|(n, p)| (n, p.clone(), cpu_of(&p))).collect())
    }

    fn line(&self, n: usize) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(name, p, s)| format!("{name} {:.0}", (cpu_of(p) - s) * 1e6 / n.max(1) as f64))
            .collect();
        format!("CPU per command (µs): {}", parts.join(" + "))
    }
}

/// A device on MQTT: persistent session, subscribed to its command topic
/// at QoS 1 (again after every connect), executing each command (recorded by its
/// value) and answering on `cmdexe`.
struct Device {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

/// What a device saw: deliveries and executions by command value, and
/// the command ids it executed.
#[derive(Default)]
struct Tally {
    delivered: HashMap<u64, u32>,
    executed: HashMap<u64, u32>,
    ids: std::collections::HashSet<String>,
}

type Executed = Arc<Mutex<Tally>>;

impl Device {
    async fn connect(port: u16, id: &str, cmd: &str, cmdexe: &str, executed: Executed) -> Device {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(false);
        let (client, mut events) = AsyncClient::new(opts, 1000);
        nodelay(&mut events);
        let (c, cmd, cmdexe) = (client.clone(), cmd.to_owned(), cmdexe.to_owned());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.try_subscribe(&cmd, QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let id = v.get("cmd_id").and_then(Value::as_str).map(str::to_owned);
                        if let Some((name, value)) = v.as_object().and_then(|o| o.iter().find(|(k, _)| *k != "cmd_id"))
                        {
                            if let Some(n) = value.as_u64() {
                                let mut t = executed.lock().unwrap();
                                *t.delivered.entry(n).or_default() += 1;
                                // A device that keeps the ids it executed
                                // runs a repeat once.
                                let fresh = id.as_ref().is_none_or(|id| t.ids.insert(id.clone()));
                                if fresh {
                                    *t.executed.entry(n).or_default() += 1;
                                }
                            }
                            let mut result = json!({ name: value });
                            if let Some(id) = id {
                                result["cmd_id"] = id.into();
                            }
                            let _ = c.try_publish(&cmdexe, QoS::AtLeastOnce, false, result.to_string());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if std::env::var("BENCH_DEBUG").is_ok() {
                            eprintln!("device: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await.expect("device subscribes").unwrap();
        Device { client, task }
    }

    /// Go offline cleanly: what it queued (its last results) goes out
    /// before the DISCONNECT.
    async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

/// Small messages leave at once (rumqttc's default waits for the peer's
/// delayed ACK, about 40 ms).
fn nodelay(events: &mut rumqttc::EventLoop) {
    let mut net = events.network_options();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
}

/// A private Mosquitto with persistence and `set_tcp_nodelay true` (its
/// default, false, delays each small delivery by the client's delayed ACK).
struct Mosquitto {
    port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        let mut m = Mosquitto { port: free_port(), dir: dir.to_owned(), child: None };
        m.restart();
        m
    }

    fn restart(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nuser root\nlog_dest none\nset_tcp_nodelay true\n",
                self.port,
                self.dir.display()
            ),
        )
        .unwrap();
        self.child = Some(std::process::Command::new("mosquitto").arg("-c").arg(&conf).spawn().expect("mosquitto"));
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The daemon with one gateway whose device `d` (apikey `k`) takes the
/// command `set` over MQTT.
struct Lab {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    child: Child,
    north: u16,
    exchange: String,
    prefix: String,
}

impl Lab {
    async fn start(mqtt_port: u16, command_ids: bool) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let (north, south) = (free_port(), free_port());
        let exchange = format!("bench-{}", Uuid::new_v4().simple());
        let prefix = format!("c{}", &Uuid::new_v4().simple().to_string()[..8]);
        let config = json!({
            "broker": {"url": url()}, "exchange": exchange, "realm": "bench", "api": {"enabled": false},
            "data_dir": dir.path().join("data"),
            "components": [{"category": "gateway", "type": "iot-agent", "name": "gw",
                "uuid": Uuid::new_v4(),
                "north_bind": format!("127.0.0.1:{north}"), "south_bind": format!("127.0.0.1:{south}"),
                "mqtt_url": format!("mqtt://127.0.0.1:{mqtt_port}"), "mqtt_prefix": prefix,
                "federation_exchange": format!("{exchange}-data"), "command_expiration": 600}]
        });
        let cfg = dir.path().join("lab.json");
        std::fs::write(&cfg, config.to_string()).unwrap();
        let child = spawn_daemon(&cfg, "error", None);
        let lab = Lab { dir, cfg, child, north, exchange, prefix };
        lab.until_up().await;
        let group = json!({"groups": [{"resource": "/iot/json", "apikey": "k", "entity_type": "Switch",
            "command_ids": command_ids, "commands": [{"name": "set", "type": "command"}]}]});
        lab.north("POST", "/iot/groups", Some(group)).await;
        lab.north("POST", "/iot/devices", Some(json!({"devices": [{"device_id": "d"}]}))).await;
        lab
    }

    async fn until_up(&self) {
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{}/metrics", self.north)).send().await
                && r.text().await.unwrap_or_default().contains("mqttConnected 1")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn north(&self, method: &str, path: &str, body: Option<Value>) -> Option<(u16, Value)> {
        let mut rb = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("http://127.0.0.1:{}{path}", self.north))
            .header("fiware-service", "lab")
            .header("fiware-servicepath", "/")
            .timeout(Duration::from_secs(5));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.ok()?;
        let s = r.status().as_u16();
        Some((s, r.json().await.unwrap_or(Value::Null)))
    }

    fn topics(&self) -> (String, String) {
        (format!("{}/k/d/cmd", self.prefix), format!("{}/json/k/d/cmdexe", self.prefix))
    }

    fn device_uuid(&self) -> Uuid {
        let t = busbar::iot::model::Tenant { service: "lab".into(), servicepath: "/".into() };
        busbar::iot::registry::device_uuid(&t, "d")
    }

    async fn kill9_and_restart(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        self.child = spawn_daemon(&self.cfg, "error", None);
        self.until_up().await;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        terminate(&mut self.child);
        let _ = &self.dir;
    }
}

/// The brokers alone on the command's path: AMQP request → relay → MQTT
/// command → device → MQTT result → relay → AMQP reply.
async fn floor(port: u16, n: usize) -> Vec<Duration> {
    let id = Uuid::new_v4().simple().to_string();
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q_req = format!("floor-req-{id}");
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    ch.queue_declare(q_req.as_str().into(), exclusive, FieldTable::default()).await.unwrap();
    let q_rep = ch.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap().name().clone();
    let (cmd, cmdexe) = (format!("floor{id}/k/d/cmd"), format!("floor{id}/json/k/d/cmdexe"));
    let executed: Executed = Arc::default();
    let device = Device::connect(port, &format!("floor-dev-{id}"), &cmd, &cmdexe, executed).await;
    // The relay: one MQTT client, one AMQP channel.
    let mut opts = MqttOptions::new(format!("floor-relay-{id}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (relay, mut events) = AsyncClient::new(opts, 1000);
    nodelay(&mut events);
    relay.subscribe(&cmdexe, QoS::AtLeastOnce).await.unwrap();
    let rch = conn.create_channel().await.unwrap();
    let mut requests = rch
        .basic_consume(q_req.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let (rep_name, cmd2) = (q_rep.clone(), cmd.clone());
    let relay_task = tokio::spawn(async move {
        let mut suback = false;
        loop {
            tokio::select! {
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => suback = true,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = rch.basic_publish("".into(), rep_name.as_str().into(), Default::default(), &p.payload, BasicProperties::default()).await;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
                Some(Ok(d)) = requests.next(), if suback => {
                    let _ = d.ack(Default::default()).await;
                    let _ = relay.publish(&cmd2, QoS::AtLeastOnce, false, d.data.clone()).await;
                }
            }
        }
    });
    let mut replies = ch
        .basic_consume(q_rep.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let body = json!({"set": i}).to_string();
        let t = Instant::now();
        ch.basic_publish(
            "".into(),
            q_req.as_str().into(),
            Default::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), replies.next()).await.unwrap().unwrap().unwrap();
        d.ack(Default::default()).await.unwrap();
        if i >= 50 {
            lat.push(t.elapsed());
        }
    }
    relay_task.abort();
    device.close().await;
    let _ = conn.close(200, "bye".into()).await;
    lat
}

async fn roundtrip(n: usize) {
    let mdir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(mdir.path());
    let mpid = broker.child.as_ref().map(|c| c.id());
    let split = Split::start(None, mpid);
    let mut base = floor(broker.port, n).await;
    println!("  brokers alone: {}", split.line(n + 50));
    base.sort_unstable();
    let lab = Lab::start(broker.port, false).await;
    let (cmd, cmdexe) = lab.topics();
    let executed: Executed = Arc::default();
    let device = Device::connect(broker.port, &format!("rt-dev-{}", lab.prefix), &cmd, &cmdexe, executed).await;
    // A VILLAS client: one reply queue, each command published with
    // `reply_to` and a correlation id; done when the reply says OK.
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let q = ch.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap().name().clone();
    let mut replies =
        ch.basic_consume(q.clone(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let to = busbar::protocol::Filter { uuid: Some(lab.device_uuid().to_string()), ..Default::default() };
    let split = Split::start(Some(lab.child.id()), mpid);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let id = format!("c{i}");
        let body = json!({"action": "command", "parameters": {"name": "set", "value": i}}).to_string();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(to.action_headers())
            .with_reply_to(q.clone())
            .with_correlation_id(id.as_str().into());
        let t = Instant::now();
        ch.basic_publish(lab.exchange.as_str().into(), "".into(), Default::default(), body.as_bytes(), props)
            .await
            .unwrap();
        loop {
            let d = tokio::time::timeout(Duration::from_secs(5), replies.next()).await.unwrap().unwrap().unwrap();
            d.ack(Default::default()).await.unwrap();
            let v: Value = serde_json::from_slice(&d.data).unwrap();
            let ours = d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str());
            if ours && v["status"]["command"]["state"] == "OK" {
                break;
            }
        }
        if i >= 50 {
            lat.push(t.elapsed());
        }
    }
    println!("  through busbar: {}", split.line(n + 50));
    lat.sort_unstable();
    let (b50, b99, l50, l99) = (pct(&base, 0.5), pct(&base, 0.99), pct(&lat, 0.5), pct(&lat, 0.99));
    println!(
        "command round trip, VILLAS action -> device result -> reply ({n} sequential): busbar p50 {} p99 {}; brokers alone p50 {} p99 {}; ratio p50 {:.2}x p99 {:.2}x",
        ms(l50),
        ms(l99),
        ms(b50),
        ms(b99),
        l50.as_secs_f64() / b50.as_secs_f64(),
        l99.as_secs_f64() / b99.as_secs_f64()
    );
    let _ = conn.close(200, "bye".into()).await;
    device.close().await;
}

async fn faults(cycles: usize, command_ids: bool) {
    let mdir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(mdir.path());
    let mut lab = Lab::start(broker.port, command_ids).await;
    let (cmd, cmdexe) = lab.topics();
    let executed: Executed = Arc::default();
    let dev_id = format!("fault-dev-{}", lab.prefix);
    let mut device = Some(Device::connect(broker.port, &dev_id, &cmd, &cmdexe, executed.clone()).await);
    let (mut sent, mut accepted) = (0u64, Vec::<u64>::new());
    let mut next = 0u64;
    let start = Instant::now();
    let send = async |lab: &Lab, next: &mut u64, sent: &mut u64, accepted: &mut Vec<u64>| {
        let body = json!({"actionType": "update", "entities": [{"id": "Switch:d", "type": "Switch",
            "set": {"type": "command", "value": *next}}]});
        *sent += 1;
        if let Some((204, _)) = lab.north("POST", "/v2/op/update", Some(body)).await {
            accepted.push(*next);
        }
        *next += 1;
    };
    let mut kinds = [0usize; 3];
    // The fault of the cycle each command was sent in.
    let mut kind_of: HashMap<u64, usize> = HashMap::new();
    for cycle in 0..cycles {
        let first = next;
        send(&lab, &mut next, &mut sent, &mut accepted).await;
        let kind = cycle % 3;
        kinds[kind] += 1;
        match kind {
            0 => {
                broker.stop();
                send(&lab, &mut next, &mut sent, &mut accepted).await;
                broker.restart();
            }
            1 => {
                if let Some(d) = device.take() {
                    d.close().await;
                }
                send(&lab, &mut next, &mut sent, &mut accepted).await;
                device = Some(Device::connect(broker.port, &dev_id, &cmd, &cmdexe, executed.clone()).await);
            }
            _ => {
                lab.kill9_and_restart().await;
                send(&lab, &mut next, &mut sent, &mut accepted).await;
            }
        }
        send(&lab, &mut next, &mut sent, &mut accepted).await;
        for v in first..next {
            kind_of.insert(v, kind);
        }
        // Every accepted command of this cycle executed before the next fault.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let done = {
                let t = executed.lock().unwrap();
                accepted.iter().rev().take(3).all(|v| t.executed.contains_key(v))
            };
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if (cycle + 1) % 100 == 0 {
            let t = executed.lock().unwrap();
            let lost = accepted.iter().filter(|v| !t.executed.contains_key(v)).count();
            println!(
                "  {} cycles, {:.0} s: {} accepted, {lost} not executed yet",
                cycle + 1,
                start.elapsed().as_secs_f64(),
                accepted.len()
            );
        }
    }
    // The ledger: every accepted command finished (results may still be on
    // their way after the last fault).
    for _ in 0..150 {
        let (_, l) = lab.north("GET", "/iot/commands", None).await.unwrap_or((0, Value::Null));
        if l["commands"].as_array().is_some_and(|a| a.iter().all(|c| c["state"] != "PENDING")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, ledger) = lab.north("GET", "/iot/commands", None).await.unwrap_or((0, Value::Null));
    let t = std::mem::take(&mut *executed.lock().unwrap());
    let (ex, dl) = (&t.executed, &t.delivered);
    let executed_once = accepted.iter().filter(|v| ex.get(v) == Some(&1)).count();
    let by_kind = |m: &HashMap<u64, u32>| {
        let mut by = [0usize; 3];
        for (v, n) in m {
            if *n > 1 {
                by[kind_of.get(v).copied().unwrap_or(0)] += 1;
            }
        }
        by
    };
    let (twice, twice_by) = (ex.values().filter(|n| **n > 1).count(), by_kind(ex));
    let (dl_twice, dl_by) = (dl.values().filter(|n| **n > 1).count(), by_kind(dl));
    let lost = accepted.iter().filter(|v| !ex.contains_key(v)).count();
    let unasked = ex.keys().filter(|k| !accepted.contains(k)).count();
    let mut states: HashMap<String, usize> = HashMap::new();
    for c in ledger["commands"].as_array().into_iter().flatten() {
        *states.entry(c["state"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    println!(
        "fault cycles, command_ids {command_ids}: {cycles} ({} broker restarts, {} device reconnects, {} busbar kill -9) in {:.0} s: commands sent {sent}, accepted {}, delivered {} ({dl_twice} twice: {} / {} / {} in cycles of a broker restart / device reconnect / kill -9), executed {} (once {executed_once}), executed twice {twice} ({} / {} / {}), lost {lost}, executed without a 204 {unasked}; ledger (last 1000 finished + open): {states:?}",
        kinds[0],
        kinds[1],
        kinds[2],
        start.elapsed().as_secs_f64(),
        accepted.len(),
        dl.len(),
        dl_by[0],
        dl_by[1],
        dl_by[2],
        ex.len(),
        twice_by[0],
        twice_by[1],
        twice_by[2],
    );
    if std::env::var("BENCH_DEBUG").is_ok() {
        for c in ledger["commands"].as_array().into_iter().flatten().filter(|c| c["state"] != "OK").take(5) {
            let v = c["value"].as_u64().unwrap_or(0);
            eprintln!("open: value {v} kind {:?} {c}", kind_of.get(&v));
        }
    }
    if let Some(d) = device.take() {
        d.close().await;
    }
}

#[tokio::main]
async fn main() {
    let Some(named) = common::scenarios() else { return };
    let want = |s: &str| common::wants(&named, s);
    if want("roundtrip") {
        let n = std::env::var("ROUNDTRIPS").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
        roundtrip(n).await;
    }
    if want("faults") {
        let cycles = std::env::var("CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
        faults(cycles, false).await;
        faults(cycles, true).await;
    }
}
