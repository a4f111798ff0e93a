//! The IoT gateway as operators run it: the `busbar` binary, killed with
//! SIGKILL and restarted, listed with `busbar ping --category equipment`,
//! watched with `busbar monitor --data`.

mod common;

use busbar::iot::model::Tenant;
use busbar::iot::registry::device_uuid;
use common::*;
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// A port for a daemon that is killed and started again on it: below the
/// kernel's ephemeral range (32768-60999), so that no outgoing connection
/// (the other daemons' AMQP and MQTT clients) takes it while the daemon is
/// down, which a port from `bind(0)` allows.
fn free_port() -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Daemon {
    child: tokio::process::Child,
}

impl Daemon {
    fn spawn(config: &std::path::Path) -> Daemon {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar"))
            .args(["--log-level", "warn", "daemon", "-c"])
            .arg(config)
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .spawn()
            .expect("daemon runs");
        Daemon { child }
    }

    async fn kill9(mut self) {
        let pid = self.child.id().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = self.child.wait().await;
    }

    async fn stop(mut self) {
        let pid = self.child.id().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.expect("stops").unwrap();
        assert!(status.success(), "clean shutdown: {status}");
    }
}

/// A daemon config file with one gateway on free ports, this test's topic
/// prefix and federation exchange.
struct Lab {
    config: std::path::PathBuf,
    base: String,
    south: u16,
    data: String,
}

impl Lab {
    fn write(env: &TestEnv) -> Lab {
        let (north, south) = (free_port(), free_port());
        let data = format!("data-{}", env.id);
        let gateway = json!({"category": "gateway", "type": "iot-agent", "name": "IoT", "uuid": uuid::Uuid::new_v4(),
            "north_bind": format!("127.0.0.1:{north}"), "south_bind": format!("127.0.0.1:{south}"),
            "mqtt_prefix": format!("t{}", env.id), "federation_exchange": data});
        let config = env.dir.path().join("lab.yaml");
        std::fs::write(&config, text_of(&env.config_value_with(vec![gateway]))).unwrap();
        Lab { config, base: format!("http://127.0.0.1:{north}"), south, data }
    }
}

async fn call(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut rb = http
        .request(method.parse().unwrap(), url)
        .header("fiware-service", "lab")
        .header("fiware-servicepath", "/rig1");
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    match rb.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn until_up(url: &str) {
    eventually(WAIT, &format!("{url} comes up"), async || (call("GET", url, None).await.0 == 200).then_some(())).await;
}

async fn busbar(env: &TestEnv, args: &[&str]) -> std::process::Output {
    cli(env, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_survives_kill_9_and_devices_are_listed_and_monitored() {
    let env = TestEnv::new();
    let lab = Lab::write(&env);
    let (config, base, south, data) = (&lab.config, &lab.base, lab.south, &lab.data);
    let d = Daemon::spawn(config);
    until_up(&format!("{base}/iot/about")).await;
    let k = format!("k{}", env.id);
    let group = json!({"groups": [{"resource": "/iot/json", "apikey": k, "entity_type": "Meter"}]});
    assert_eq!(call("POST", &format!("{base}/iot/groups"), Some(group)).await.0, 201);
    let devices: Vec<Value> = (1..=3).map(|i| json!({"device_id": format!("m{i}")})).collect();
    assert_eq!(call("POST", &format!("{base}/iot/devices"), Some(json!({"devices": devices}))).await.0, 201);

    // `busbar ping --category equipment` lists the devices.
    let tenant = Tenant { service: "lab".into(), servicepath: "/rig1".into() };
    let uuids: Vec<String> = (1..=3).map(|i| device_uuid(&tenant, &format!("m{i}")).to_string()).collect();
    let o = busbar(&env, &["ping", "--category", "equipment", "--timeout", "3", "--quiet", "1"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    for u in &uuids {
        assert!(
            out.lines().any(|l| l.starts_with(u.as_str()) && l.contains("equipment") && l.contains("Meter")),
            "{u} in\n{out}"
        );
    }
    assert_eq!(out.lines().count(), 3, "only the devices:\n{out}");

    d.kill9().await;
    let d = Daemon::spawn(config);
    until_up(&format!("{base}/iot/about")).await;
    let (s, b) = call("GET", &format!("{base}/iot/devices"), None).await;
    assert_eq!((s, b["count"].as_u64()), (200, Some(3)), "{b}");
    let (_, b) = call("GET", &format!("{base}/iot/groups"), None).await;
    assert_eq!(b["groups"][0]["apikey"], k.as_str());

    // `busbar monitor --data` shows a measure as it passes.
    let mut monitor = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar"))
        .args(["monitor", "--data", "--data-exchange", data, "--json"])
        .env("AMQP_URL", amqp_url())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    let url = format!("http://127.0.0.1:{south}/iot/json?k={k}&i=m1");
    let seen = async {
        loop {
            // Until the monitor's queue is bound, measures pass unseen.
            assert_eq!(call("POST", &url, Some(json!({"kwh": 12.5}))).await.0, 200);
            if let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await {
                return serde_json::from_str::<Value>(&line).unwrap();
            }
        }
    };
    let m = tokio::time::timeout(WAIT, seen).await.expect("monitor prints the measure");
    assert_eq!(m["routing_key"], format!("{}.lab.Meter.m1", env.realm));
    assert_eq!(m["body"]["attrs"]["kwh"], 12.5);
    let _ = monitor.kill().await;
    d.stop().await;
    let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.exchange_delete(data.as_str().into(), Default::default()).await;
}

/// The first command of `device` named `name` in the ledger.
async fn command_of(base: &str, device: &str, name: &str) -> Value {
    let (_, b) = call("GET", &format!("{base}/iot/commands?device={device}"), None).await;
    b["commands"].as_array().and_then(|a| a.iter().find(|c| c["name"] == name).cloned()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pending_and_delivered_survive_kill_9_and_expire_on_time() {
    let env = TestEnv::new();
    let lab = Lab::write(&env);
    let (config, base, south) = (&lab.config, &lab.base, lab.south);
    let d = Daemon::spawn(config);
    until_up(&format!("{base}/iot/about")).await;
    let k = format!("k{}", env.id);
    let group = json!({"groups": [{"resource": "/iot/json", "apikey": k, "entity_type": "Meter",
        "commands": [{"name": "reset", "type": "command"}, {"name": "tare", "type": "command", "expiration": 3},
                     {"name": "zero", "type": "command"}]}]});
    assert_eq!(call("POST", &format!("{base}/iot/groups"), Some(group)).await.0, 201);
    let devices = json!({"devices": [{"device_id": "p1", "transport": "HTTP"}]});
    assert_eq!(call("POST", &format!("{base}/iot/devices"), Some(devices)).await.0, 201);
    let update = |name: &str| {
        json!({"actionType": "update", "entities": [{"id": "Meter:p1", "type": "Meter",
            name: {"type": "command", "value": 1}}]})
    };
    let poll = format!("http://127.0.0.1:{south}/iot/json?i=p1&k={k}&getCmd=1");
    // DELIVERED (polled), then PENDING, and one that expires 3 s after it
    // was taken, whatever happens to the daemon meanwhile.
    assert_eq!(call("POST", &format!("{base}/v2/op/update"), Some(update("reset"))).await.0, 204);
    assert_eq!(call("GET", &poll, None).await, (200, json!({"reset": 1})));
    assert_eq!(call("POST", &format!("{base}/v2/op/update"), Some(update("zero"))).await.0, 204);
    assert_eq!(call("POST", &format!("{base}/v2/op/update"), Some(update("tare"))).await.0, 204);

    d.kill9().await;
    let d = Daemon::spawn(config);
    until_up(&format!("{base}/iot/about")).await;
    assert_eq!(command_of(base, "p1", "reset").await["state"], "DELIVERED");
    assert_eq!(command_of(base, "p1", "zero").await["state"], "PENDING");
    // The pending ones are still there for the device's next poll; the
    // delivered one takes its result; tare, delivered now, still expires.
    assert_eq!(call("GET", &poll, None).await, (200, json!({"zero": 1, "tare": 1})), "only what was not delivered yet");
    let results = format!("http://127.0.0.1:{south}/iot/json/commands?i=p1&k={k}");
    assert_eq!(call("POST", &results, Some(json!({"reset": "done"}))).await.0, 200);
    assert_eq!(command_of(base, "p1", "reset").await["state"], "OK");
    let tare = eventually(Duration::from_secs(10), "tare expires", async || {
        let c = command_of(base, "p1", "tare").await;
        (c["state"] == "EXPIRED").then_some(c)
    })
    .await;
    let at = |k: &str| tare[k].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let took = (at("updated") - at("created")).total(jiff::Unit::Millisecond).unwrap();
    assert!((3000.0..5000.0).contains(&took), "expired {took} ms after it was taken, across a kill -9: {tare}");
    d.stop().await;
}
