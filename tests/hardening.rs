//! Single bad inputs that once took busbar down or slipped past its
//! sandbox (issue "Hardening"), each against a running daemon on the real
//! brokers. RELIABILITY.md lists them with the response each gets.

mod common;

use busbar::client::Client;
use busbar::protocol::Filter;
use common::iot::*;
use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

fn to_realm(realm: &str) -> lapin::types::FieldTable {
    Filter { realm: Some(realm.into()), ..Default::default() }.action_headers()
}

/// A `when` past what `SystemTime` can hold once panicked the decoder, and
/// the decoding task (per component, shared, or discovery) died for good.
/// Now it is an `error` status, and the same consumer keeps answering.
async fn absurd_when_is_refused_and_the_consumers_live_on(topology: busbar::config::Topology) {
    let env = TestEnv::new();
    let mut cfg = env.config(&env.config_yaml());
    cfg.topology = topology;
    let (d, c, mut l) = env.up_with(cfg).await;
    for when in [json!(1e19), json!(1e20), json!("1e20"), json!(u64::MAX), json!(f64::MAX)] {
        // To the realm: every component's consumer decodes it.
        let body = json!({"action": "start", "when": when});
        c.publish(to_realm(&env.realm), &body, None).await.unwrap();
        let st = state_of(&mut l, env.dummy, "error").await;
        let msg = st["status"]["error"]["msg"].as_str().unwrap();
        assert!(msg.starts_with("Invalid when"), "{when}: {msg}");
        c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
        state_of(&mut l, env.dummy, "idle").await;
    }
    // The broadcast (discovery) consumer decodes it too, and lives on.
    c.publish(
        Filter { uuid: Some(String::new()), ..Default::default() }.action_headers(),
        &json!({"action": "ping", "when": 1e20}),
        None,
    )
    .await
    .unwrap();
    let mut answered = Vec::new();
    let want = env.dummy.to_string();
    c.ping(&Filter { realm: Some(env.realm.clone()), ..Default::default() }, WAIT, Duration::from_millis(500), |s| {
        answered.push(s.payload.pointer("/properties/uuid").and_then(Value::as_str).unwrap_or_default().to_owned())
    })
    .await
    .unwrap();
    assert!(answered.contains(&want), "discovery still answers: {answered:?}");
    // Every consumer still works: a ping by uuid and by realm.
    c.publish(to_uuid(env.manager), &action("ping", json!({})), None).await.unwrap();
    status_of(&mut l, env.manager, |_| true).await;
    // Over HTTP, a 400 with the reason, not a dropped connection.
    let api = d.api_addr.unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{api}/api/v1/component/{}", env.dummy))
        .body(r#"{"action": "start", "when": 1e20}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert!(b["error"]["msg"].as_str().unwrap().starts_with("Invalid when"), "{b}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn absurd_when_per_component_topology() {
    absurd_when_is_refused_and_the_consumers_live_on(busbar::config::Topology::PerComponent).await;
}

#[tokio::test]
async fn absurd_when_shared_topology() {
    absurd_when_is_refused_and_the_consumers_live_on(busbar::config::Topology::Shared).await;
}

/// A device id that makes the federation routing key longer than 255 bytes
/// once panicked the publisher and killed the gateway's I/O thread. Now
/// such ids are refused (provisioning: 400; autoprovisioning: the measure
/// is refused and nothing is stored) and the gateway keeps working.
#[tokio::test]
async fn ids_that_cannot_be_routed_are_refused_and_the_gateway_lives_on() {
    let g = Gw::new();
    let (d, gw, c, _l, mut data) = g.up().await;
    gw.provision(LAB, json!({"resource": "/iot/json", "apikey": "k1", "entity_type": "Sensor"}), Value::Null).await;
    // Provisioning: too long for an id at all, and too long for the routing key.
    let long = "d".repeat(200);
    let (s, b) = gw.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": [{"device_id": long}]}))).await;
    assert_eq!(s, 400, "{b}");
    let fits_alone = "e".repeat(128);
    let t = (LAB.0, LAB.1);
    let (s, b) = gw
        .north(
            "POST",
            "/iot/devices",
            Some(t),
            Some(json!({"devices": [{"device_id": fits_alone, "entity_type": "T".repeat(128)}]})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["name"], "ID_TOO_LONG", "{b}");
    // Autoprovisioning over HTTP and MQTT: refused, nothing stored.
    let (s, b) = gw.measure("k1", &"x".repeat(300), json!({"t": 1})).await;
    assert_eq!(s, 400, "{b}");
    let mqtt = Mqtt::connect(1883).await;
    mqtt.publish(&g.topic(&format!("json/k1/{}/attrs", "y".repeat(250))), r#"{"t": 1}"#, 1).await;
    // The gateway still takes measures, from both transports.
    let (s, b) = gw.measure("k1", "ok1", json!({"t": 2})).await;
    assert_eq!(s, 200, "{b}");
    assert!(data.next().await.key.ends_with(".ok1"));
    mqtt.publish(&g.topic("json/k1/ok2/attrs"), r#"{"t": 3}"#, 1).await;
    assert!(data.next().await.key.ends_with(".ok2"));
    let (s, list) = gw.north("GET", "/iot/devices", Some(LAB), None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = list["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["ok1", "ok2"], "the refused ids were not stored");
    drop(mqtt);
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// Control characters and `|` in tenancy or ids once let two tenants'
/// devices share an IC uuid, and one tenant's group overwrite another's.
#[tokio::test]
async fn tenancy_and_ids_with_separators_or_control_characters_are_refused() {
    let g = Gw::new();
    let (d, gw, c, _l, data) = g.up().await;
    for (service, path) in [("lab|x", "/"), ("lab", "/a|b"), ("lab", "/a/../b"), ("lab", "/a b"), ("LAB-1", "/")] {
        let (s, b) = gw.north("GET", "/iot/devices", Some((service, path)), None).await;
        assert_eq!(s, 400, "{service} {path}: {b}");
    }
    for device in [json!({"device_id": "a|b\u{1}"}), json!({"device_id": "a b"}), json!({"device_id": "a\u{1f}b"})] {
        let (s, b) = gw.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": [device]}))).await;
        assert_eq!(s, 400, "{b}");
    }
    for group in [
        json!({"resource": "/iot/json", "apikey": "k\u{1f}1"}),
        json!({"resource": "/iot/json\u{1f}", "apikey": "k1"}),
        json!({"resource": "iot/json", "apikey": "k1"}),
        json!({"resource": "/iot/json", "apikey": "k/1"}),
    ] {
        let (s, b) = gw.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [group]}))).await;
        assert_eq!(s, 400, "{b}");
    }
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// One MQTT message over the size limit at QoS 1 once made the client drop
/// every connection (the broker redelivers it at each one) and no measure
/// arrived again. Now it is taken once, refused, counted and acknowledged.
#[tokio::test]
async fn an_oversized_mqtt_message_is_refused_once_and_measures_keep_flowing() {
    let g = Gw::with(json!({"max_body_bytes": 4096}));
    let (d, gw, c, _l, mut data) = g.up().await;
    gw.provision(LAB, json!({"resource": "/iot/json", "apikey": "k1", "entity_type": "Sensor"}), Value::Null).await;
    let mqtt = Mqtt::connect(1883).await;
    let big = format!(r#"{{"t": "{}"}}"#, "x".repeat(200 * 1024));
    mqtt.publish(&g.topic("json/k1/big/attrs"), big, 1).await;
    mqtt.publish(&g.topic("json/k1/small/attrs"), r#"{"t": 1}"#, 1).await;
    let m = data.next().await;
    assert!(m.key.ends_with(".small"), "{m:?}");
    let uuid = g.uuid;
    eventually(WAIT, "the oversized message counted once, MQTT connected", async || {
        let st = d.shared.env.components.lookup(uuid).unwrap().status().await.unwrap();
        (st["status"]["counters"]["errors"]["too_large"] == 1 && st["status"]["mqtt_connected"] == true).then_some(())
    })
    .await;
    // And the connection stays up: later measures arrive too.
    mqtt.publish(&g.topic("json/k1/small/attrs"), r#"{"t": 2}"#, 1).await;
    assert!(data.next().await.key.ends_with(".small"));
    drop(mqtt);
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

struct Sandbox {
    env: TestEnv,
    generic: Uuid,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox { env: TestEnv::new(), generic: Uuid::new_v4() }
    }

    fn config(&self, create_may_set: &[&str]) -> busbar::config::Config {
        let mut cfg = self.env.config_with(vec![json!({
            "category": "simulator", "type": "generic", "name": "Gen", "uuid": self.generic.to_string(),
            "whitelist": [self.env.fixtures_whitelist()],
            "allowed_environment": ["FOO", "SIM_*", "LD_PRELOAD"],
        })]);
        cfg.sandbox.create_may_set = create_may_set.iter().map(|k| (*k).to_owned()).collect();
        cfg
    }
}

/// Paths, environment and executables from a start stay inside what the
/// component's config allows.
#[tokio::test]
async fn the_process_sandbox_holds() {
    let sb = Sandbox::new();
    let (d, c, mut l) = sb.env.up_with(sb.config(&[])).await;
    let g = sb.generic;
    let exe = format!("{}/env-check.sh", fixtures_bin());
    let outside = sb.env.dir.path().join("outside.txt");
    let cases = [
        (
            json!({"executable": exe, "stdout_logfile": outside.display().to_string()}),
            "stdout_logfile must be a relative path",
        ),
        (
            json!({"executable": exe, "stdout_logfile": "../../../../outside.txt"}),
            "stdout_logfile must be a relative path",
        ),
        (json!({"executable": exe, "working_directory": "/"}), "working_directory must be a relative path"),
        (json!({"executable": exe, "working_directory": "results/../.."}), "working_directory must be a relative path"),
        (
            json!({"executable": exe, "environment": {"LD_PRELOAD": "/tmp/x.so"}}),
            "Environment variable is never allowed",
        ),
        (json!({"executable": exe, "environment": ["LD_LIBRARY_PATH=/tmp"]}), "Environment variable is never allowed"),
        (json!({"executable": exe, "environment": {"PATH": "/tmp"}}), "Environment variable is not allowed"),
        (
            json!({"executable": format!("{}/../../../../../bin/sh", fixtures_bin()), "argv": ["-c", "true"]}),
            "Executable must be a name or a path without",
        ),
    ];
    for (params, msg) in cases {
        c.publish(to_uuid(g), &action("start", params.clone()), None).await.unwrap();
        let st = state_of(&mut l, g, "error").await;
        let got = st["status"]["error"]["msg"].as_str().unwrap().to_owned();
        assert!(got.starts_with(msg), "{params}: want {msg:?}, got {got:?}");
        c.publish(to_uuid(g), &action("reset", json!({})), None).await.unwrap();
        state_of(&mut l, g, "idle").await;
    }
    assert!(!outside.exists(), "nothing was written outside the run directory");
    // What the component allows still works.
    c.publish(
        to_uuid(g),
        &action("start", json!({"executable": exe, "environment": {"FOO": "1", "SIM_X": "2"}})),
        None,
    )
    .await
    .unwrap();
    state_of(&mut l, g, "idle").await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// A create from the bus cannot give a new simulator a whitelist or a
/// shell unless the daemon's config says it may.
#[tokio::test]
async fn a_create_cannot_widen_the_sandbox_unless_the_config_allows_it() {
    let sb = Sandbox::new();
    let (d, c, mut l) = sb.env.up_with(sb.config(&[])).await;
    let m = sb.env.manager;
    let evil = Uuid::new_v4();
    let params = json!({"category": "simulator", "type": "generic", "uuid": evil.to_string(), "whitelist": [".*"], "shell": true});
    c.publish(to_uuid(m), &action("create", params), None).await.unwrap();
    let st = status_of(&mut l, m, |s| s["status"]["error"]["msg"].is_string()).await;
    let msg = st["status"]["error"]["msg"].as_str().unwrap();
    assert!(msg.starts_with("A create may not set whitelist"), "{msg}");
    assert!(d.shared.env.components.lookup(evil).is_none(), "nothing was created");
    // Nested under `properties` (the Kubernetes managers' shape) as well.
    c.publish(to_uuid(m), &action("reset", json!({})), None).await.unwrap();
    d.stop().await.expect("clean shutdown");

    // A config that allows it.
    let (d, c2, mut l) = sb.env.up_with(sb.config(&["whitelist"])).await;
    let ok = Uuid::new_v4();
    let params =
        json!({"category": "simulator", "type": "generic", "uuid": ok.to_string(), "whitelist": ["^/bin/true$"]});
    c2.publish(to_uuid(m), &action("create", params), None).await.unwrap();
    state_of(&mut l, ok, "idle").await;
    c.close().await;
    c2.close().await;
    d.stop().await.expect("clean shutdown");
}

/// `sandbox.create_may_set` names only privileged properties.
#[test]
fn the_sandbox_config_names_known_properties() {
    let env = TestEnv::new();
    let mut config = env.config_value();
    config["sandbox"] = json!({"create_may_set": ["whitlist"]});
    let e = busbar::config::Config::parse(&text_of(&config), std::path::Path::new("lab.yaml")).unwrap_err().to_string();
    assert!(e.starts_with("lab.yaml: sandbox.create_may_set[0]:"), "{e}");
}

/// The example config must be safe to copy: no interpreter or shell in a
/// whitelist, no privileged create.
#[test]
fn the_example_config_whitelists_no_interpreter() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lab.yaml");
    let cfg = busbar::config::Config::load(&path).expect("example config loads");
    assert!(cfg.sandbox.create_may_set.is_empty());
    let interpreters = ["sh", "bash", "dash", "zsh", "python", "python3", "perl", "ruby", "node", "env", "busybox"];
    for comp in &cfg.components {
        for pat in comp.get("whitelist").and_then(Value::as_array).into_iter().flatten() {
            let re = regex::Regex::new(&format!("^(?:{})", pat.as_str().unwrap())).unwrap();
            for dir in ["/bin/", "/usr/bin/", "/usr/local/bin/", ""] {
                for i in interpreters {
                    assert!(!re.is_match(&format!("{dir}{i}")), "{pat} allows {dir}{i}");
                }
            }
        }
        assert_ne!(comp.get("shell"), Some(&json!(true)));
    }
}

/// Tokens and URL passwords of a start's model and results are not echoed
/// in the status, on the bus or over HTTP, nor in a transfer error.
#[tokio::test]
async fn tokens_and_url_passwords_are_never_echoed() {
    let sb = Sandbox::new();
    let (d, c, mut l) = sb.env.up_with(sb.config(&[])).await;
    let body = json!({"action": "start", "parameters": {"runtime": 0},
        "model": {"type": "url", "url": "http://user:hunter2@127.0.0.1:9/m.zip", "token": "s3cr3t-token"},
        "results": {"type": "url", "url": "http://127.0.0.1:9/r", "token": "s3cr3t-token"}});
    c.publish(to_uuid(sb.env.dummy), &body, None).await.unwrap();
    let st = state_of(&mut l, sb.env.dummy, "running").await;
    let text = st.to_string();
    assert!(!text.contains("s3cr3t") && !text.contains("hunter2"), "{text}");
    assert_eq!(st["model"]["token"], "***");
    let api = d.api_addr.unwrap();
    let http =
        reqwest::get(format!("http://{api}/api/v1/component/{}", sb.env.dummy)).await.unwrap().text().await.unwrap();
    assert!(!http.contains("s3cr3t") && !http.contains("hunter2"), "{http}");
    // A failed download names the URL without its password.
    let g = sb.generic;
    let mut start = body.clone();
    start["parameters"] = json!({"executable": format!("{}/env-check.sh", fixtures_bin())});
    c.publish(to_uuid(g), &start, None).await.unwrap();
    let st = state_of(&mut l, g, "error").await;
    let text = st.to_string();
    assert!(st["status"]["error"]["msg"].as_str().unwrap().starts_with("Model download failed"), "{text}");
    assert!(!text.contains("s3cr3t") && !text.contains("hunter2"), "{text}");
    assert_eq!(st["status"]["error"]["url"], "http://user:***@127.0.0.1:9/m.zip");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// `create` and `delete` sent to a simulator were accepted and ignored.
#[tokio::test]
async fn create_and_delete_to_a_simulator_are_refused() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    for name in ["create", "delete"] {
        let params = json!({"category": "simulator", "type": "dummy", "uuid": Uuid::new_v4().to_string()});
        c.publish(to_uuid(env.dummy), &action(name, params), None).await.unwrap();
        let st = state_of(&mut l, env.dummy, "error").await;
        assert_eq!(st["status"]["error"]["msg"], "Unsupported action", "{st}");
        assert_eq!(st["status"]["error"]["action"], name);
        assert_eq!(st["status"]["error"]["type"], "simulator/dummy");
        c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
        state_of(&mut l, env.dummy, "idle").await;
    }
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// Idle connections once stayed open forever, so 1,030 of them used up the
/// descriptors of both HTTP APIs and of child-process starts. Now each
/// listener serves a bounded number and closes those that send nothing.
#[tokio::test]
async fn idle_http_connections_are_closed_and_capped() {
    use tokio::io::AsyncReadExt;
    let env = TestEnv::new();
    let mut cfg = env.config(&env.config_yaml());
    cfg.api.header_timeout = 0.5;
    cfg.api.max_connections = 4;
    let d = env.start_with(cfg).await;
    let api = d.api_addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(tokio::net::TcpStream::connect(api).await.unwrap());
    }
    // The served ones are closed for sending nothing; the others then get
    // their turn and are closed too; a real request is answered meanwhile.
    let started = Instant::now();
    let r = reqwest::get(format!("http://{api}/api/v1/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    for mut s in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("idle connection closed").unwrap_or(0);
        assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"), "closed");
    }
    d.stop().await.expect("clean shutdown");
}

/// 405, 414 and 431 answers had empty bodies; every refusal is JSON.
#[tokio::test]
async fn oversized_and_misdirected_requests_get_json_errors() {
    let g = Gw::new();
    let (d, gw, c, _l, data) = g.up().await;
    let api = format!("http://{}", d.api_addr.unwrap());
    let http = reqwest::Client::new();
    let long = format!("/x?{}", "a".repeat(busbar::serve::MAX_URI_BYTES + 10));
    for base in [api.as_str(), gw.north.as_str(), gw.south.trim_end_matches("/iot/json")] {
        let cases = [
            (http.delete(format!("{base}/api/v1/health")), None),
            (http.get(format!("{base}{long}")), Some(414)),
            (
                http.get(format!("{base}/api/v1")).header("x-big", "b".repeat(busbar::serve::MAX_HEADER_BYTES + 10)),
                Some(431),
            ),
        ];
        for (rb, want) in cases {
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            if let Some(w) = want {
                assert_eq!(status, w, "{base}");
            } else {
                assert!(status == 405 || status == 404, "{base}: {status}");
            }
            let body: Value = r.json().await.unwrap_or_else(|e| panic!("{base} {status}: not JSON: {e}"));
            assert!(body.is_object(), "{base} {status}: {body}");
        }
    }
    let r = http.delete(format!("{api}/api/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], 405);
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// `/api/v1/health` reported only the broker. It now reports every
/// component task and every gateway's I/O, and `?verbose` lists problems.
#[tokio::test]
async fn health_reports_gateways_and_lists_problems() {
    let g = Gw::new();
    // Created gateways listen on free ports, so the config lets a create set them.
    let mut cfg = g.config();
    cfg.sandbox.create_may_set = vec!["north_bind".into(), "south_bind".into()];
    let data = Data::bind(&g.data).await;
    let d = g.env.start_with(cfg).await;
    Gateway::of(&d, g.uuid).await;
    let c = g.env.client().await;
    let api = format!("http://{}", d.api_addr.unwrap());
    let r = reqwest::get(format!("{api}/api/v1/health?verbose")).await.unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["status"], "ok", "{b}");
    assert_eq!(b["problems"], json!([]));
    // A gateway whose MQTT broker is unreachable is a problem.
    let g2 = Uuid::new_v4();
    let params = json!({"category": "gateway", "type": "iot-agent", "uuid": g2.to_string(),
        "mqtt_url": "mqtt://127.0.0.1:1", "federation_exchange": g.data, "north_bind": "127.0.0.1:0", "south_bind": "127.0.0.1:0"});
    c.publish(to_uuid(g.env.manager), &action("create", params), None).await.unwrap();
    eventually(WAIT, "health names the gateway whose MQTT is down", async || {
        let r = reqwest::get(format!("{api}/api/v1/health?verbose")).await.unwrap();
        let status = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        let named = b["problems"].as_array().is_some_and(|p| {
            p.iter().any(|p| p["uuid"] == g2.to_string() && p["msg"].as_str().unwrap_or_default().contains("MQTT"))
        });
        (status == 503 && named && b["status"] == "error").then_some(())
    })
    .await;
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// Device statuses once reached every component queue of the realm, and
/// every broadcast ping re-announced every device: with thousands of
/// devices, pings to other components waited for seconds. Now device
/// statuses carry no realm header, and devices answer only when addressed.
/// Bulk provisioning in one request is linear (it was quadratic).
#[tokio::test]
async fn devices_do_not_flood_the_realm_and_answer_only_when_addressed() {
    // Enough to see fan-out; the 10,000-device figures are in BENCHMARKS.md.
    const N: usize = 500;
    let g = Gw::new();
    let (d, gw, c, mut all, data) = g.up().await;
    // What a component of the realm receives.
    let realm_filter = Filter { realm: Some(g.env.realm.clone()), ..Default::default() };
    let mut realm = c.listen(realm_filter.binding()).await.unwrap();
    gw.provision(LAB, json!({"resource": "/iot/json", "apikey": "k1", "entity_type": "Meter"}), Value::Null).await;
    let devices: Vec<Value> = (0..N).map(|i| json!({"device_id": format!("m{i}")})).collect();
    let (s, b) = gw.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": devices}))).await;
    assert_eq!(s, 201, "{b}");
    // Every device is announced once on the bus…
    let end = Instant::now() + Duration::from_secs(30);
    let mut announced = std::collections::HashSet::new();
    while announced.len() < N {
        let seen = all.next_until(end).await.unwrap_or_else(|| panic!("only {} of {N} announced", announced.len()));
        if seen.payload.pointer("/properties/category") == Some(&json!("equipment")) {
            announced.insert(seen.payload["properties"]["uuid"].as_str().unwrap().to_owned());
        }
    }
    // …and none reaches a queue bound to the realm.
    let to_realm = collect_for(&mut realm, Duration::from_millis(300)).await;
    let equipment = to_realm.iter().filter(|s| s.payload.pointer("/properties/category") == Some(&json!("equipment")));
    assert_eq!(equipment.count(), 0, "device statuses reached a realm-bound queue");
    // A broadcast ping announces the components, not the devices.
    collect_for(&mut all, Duration::from_millis(200)).await;
    c.publish(Filter::default().action_headers(), &action("ping", json!({})), None).await.unwrap();
    let seen = collect_for(&mut all, Duration::from_millis(1500)).await;
    let cats: Vec<&str> = seen.iter().filter_map(|s| s.payload.pointer("/properties/category")?.as_str()).collect();
    assert!(cats.contains(&"simulator") && cats.contains(&"gateway"), "{cats:?}");
    assert!(!cats.contains(&"equipment"), "devices answered a broadcast ping");
    // Addressed by category, every device answers.
    let by_cat = Filter { category: Some("equipment".into()), ..Default::default() };
    let mut answers = std::collections::HashSet::new();
    c.ping(&by_cat, Duration::from_secs(30), Duration::from_secs(2), |s| {
        answers.insert(s.payload.pointer("/properties/uuid").and_then(Value::as_str).unwrap_or_default().to_owned());
    })
    .await
    .unwrap();
    assert_eq!(answers.len(), N);
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// Labs with tens of thousands of devices keep the `villas` exchange fast
/// by giving the devices' bindings an exchange of their own: only
/// `category: equipment` and the entity types are bound into `villas`.
#[tokio::test]
async fn devices_can_bind_on_an_exchange_of_their_own() {
    let g = Gw::with(json!({"device_exchange": format!("devices-{}", TestEnv::new().id)}));
    let own = g.extra["device_exchange"].as_str().unwrap().to_owned();
    let (d, gw, c, _all, data) = g.up().await;
    gw.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": "k1", "entity_type": "Meter"}),
        json!([{"device_id": "m1"}]),
    )
    .await;
    let uuid = busbar::iot::registry::device_uuid(
        &busbar::iot::model::Tenant { service: LAB.0.into(), servicepath: LAB.1.into() },
        "m1",
    );
    let by_uuid = Filter { uuid: Some(uuid.to_string()), ..Default::default() };
    let answers = |c: Client, f: Filter| async move {
        let n = c.ping(&f, Duration::from_secs(3), Duration::from_millis(700), |_| {}).await.unwrap();
        c.close().await;
        n
    };
    // By uuid: on the device exchange, not on villas (no binding there).
    let on_own = Client::connect(&amqp_url(), &own).await.unwrap();
    assert_eq!(answers(on_own, by_uuid.clone()).await, 1);
    assert_eq!(answers(g.env.client().await, by_uuid).await, 0);
    // By category and by type: on villas, passed on to the device exchange.
    for f in [
        Filter { category: Some("equipment".into()), ..Default::default() },
        Filter { kind: Some("Meter".into()), ..Default::default() },
    ] {
        assert_eq!(answers(g.env.client().await, f).await, 1);
    }
    data.close().await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.exchange_delete(own.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "bye".into()).await;
}

/// A sender cannot grow a component's schedule without bound: the 65th
/// pending `when` is refused, and `reset` clears the schedule.
#[tokio::test]
async fn the_schedule_of_a_component_is_bounded() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
        + 300.0 * 24.0 * 3600.0;
    for _ in 0..64 {
        c.publish(to_uuid(env.dummy), &json!({"action": "start", "when": later}), None).await.unwrap();
    }
    let st = status_of(&mut l, env.dummy, |s| s["status"]["scheduled"].as_array().is_some_and(|a| a.len() == 64)).await;
    assert_eq!(st["status"]["state"], "idle");
    c.publish(to_uuid(env.dummy), &json!({"action": "start", "when": later}), None).await.unwrap();
    let st = state_of(&mut l, env.dummy, "error").await;
    assert!(st["status"]["error"]["msg"].as_str().unwrap().starts_with("Too many scheduled actions"), "{st}");
    c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
    let st = state_of(&mut l, env.dummy, "idle").await;
    assert!(st["status"].get("scheduled").is_none(), "{st}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
