//! VILLASnode and VILLASrelay managers and gateways, through the daemon
//! and RabbitMQ, against the in-test fake of their APIs
//! (`common::fake_villas`), which reproduces VILLASnode 1.2.0's hazards:
//! busbar must never trigger them.

mod common;

use common::fake_villas::{FakeVillas, md5_uuid};
use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// The reference's byte-exact uuids for hostname `vm` (§3.7).
const VM_INSTANCE: &str = "686c821a-8091-4aef-8224-65b48019cd34";
const VM_WEB_NODE1: &str = "5d8e1774-5503-95fa-0f32-894c2a37587b";
const VM_RELAY_NODE_1: &str = "cb3b1ce3-35ab-f3a5-2052-bba5edf36969";

fn posts(fake: &FakeVillas, path: &str) -> Vec<common::fake_villas::Logged> {
    fake.log().into_iter().filter(|l| l.method == "POST" && l.path == path).collect()
}

/// What VILLASweb's backend needs to create an IC from a status
/// (`ProcessMessage`, villas-controller.md §4.6): no `action`, the
/// identity properties, a state, and a `managed_by` it can parse.
fn villasweb_accepts(st: &Value) -> bool {
    st.get("action").is_none()
        && ["uuid", "name", "category", "type"].iter().all(|k| st["properties"][k].is_string())
        && st["status"]["state"].is_string()
        && st["status"]["managed_by"].as_str().is_some_and(|m| m.parse::<Uuid>().is_ok())
}

fn gateway_seen(st: &Value) -> bool {
    st["properties"]["category"] == "gateway"
}

#[tokio::test]
async fn villas_node_nodes_become_gateways_whose_actions_reach_villasnode() {
    let fake = FakeVillas::start("vm", &[("sig", "signal"), ("udp_node1", "socket"), ("web_node1", "websocket")]).await;
    let env = TestEnv::new();
    let cfg = env.config_with(vec![json!({
        "category": "manager", "type": "villas-node", "name": "VILLASnode vm",
        "api_url": fake.url(), "api_url_external": "ws://lab.example:8080/", "poll_interval": 0.2, "timeout": 0.5,
        "location": "Lab 2",
    })]);
    let (d, c, mut l) = env.up_with(cfg).await;

    // The manager adopts VILLASnode's uuid, md5("vm").
    let manager: Uuid = VM_INSTANCE.parse().unwrap();
    assert_eq!(fake.uuid_of("web_node1").to_string(), VM_WEB_NODE1, "the fake derives uuids as VILLASnode does");
    let st = status_of(&mut l, manager, |v| v["status"]["state"] == "running").await;
    assert_eq!(st["status"]["villas_node"]["version"], "1.2.0");
    assert_eq!(st["status"]["nodes"], 3);

    // One gateway per node, with the Python controller's properties (and
    // what VILLASweb reads: uuid, name, category, type, managed_by,
    // ws_url, api_url, location).
    let web: Uuid = VM_WEB_NODE1.parse().unwrap();
    let g = status_of(&mut l, web, |v| v["status"]["state"] == "running").await;
    let p = &g["properties"];
    assert_eq!(p["type"], "villas-node");
    assert_eq!(p["sub_type"], "websocket");
    assert_eq!(p["name"], "web_node1");
    assert_eq!(p["ws_url"], "ws://lab.example:8080/web_node1");
    assert_eq!(p["api_url"], fake.url());
    assert_eq!(p["location"], "Lab 2");
    assert_eq!(g["status"]["managed_by"], manager.to_string());
    assert_eq!(g["status"]["node_state"], "running");
    assert!(villasweb_accepts(&g), "{g}");
    let udp = fake.uuid_of("udp_node1");
    // (An unchanged gateway is not republished every poll: ask it.)
    c.publish(to_uuid(udp), &action_body("ping"), None).await.unwrap();
    let u = status_of(&mut l, udp, gateway_seen).await;
    assert!(u["properties"].get("ws_url").is_none(), "only websocket nodes have a ws_url");
    assert_eq!(u["properties"]["layer"].as_str().map(|_| ()), None, "the fake's node has no layer key");
    // The directory's warm-up ping (sent when its feed connects, which can
    // be after the daemon reports the bus connected, on a loaded machine)
    // makes every component answer once: let that pass first.
    eventually(WAIT, "the directory has heard the gateways", async || {
        d.shared.env.directory.lock().unwrap().knows(&udp).then_some(())
    })
    .await;
    let _ = collect_for(&mut l, Duration::from_millis(300)).await;
    // Nothing changes: five polls pass and no gateway republishes.
    let quiet = collect_for(&mut l, Duration::from_millis(1000)).await;
    let repeats = quiet.iter().filter(|s| s.is_status() && s.payload["properties"]["category"] == "gateway").count();
    assert_eq!(repeats, 0, "an unchanged gateway is not republished every poll");

    // Actions reach VILLASnode: a GET guard, then a POST without a body
    // and without Content-Length; the gateway shows the transitional state,
    // then the node's.
    for (action, transient, settled, node) in [
        ("pause", "pausing", "paused", "paused"),
        ("resume", "resuming", "running", "running"),
        ("stop", "stopping", "idle", "stopped"),
        ("start", "starting", "running", "running"),
    ] {
        c.publish(to_uuid(web), &action_body(action), None).await.unwrap();
        status_of(&mut l, web, |v| v["status"]["state"] == transient).await;
        let st = status_of(&mut l, web, |v| v["status"]["state"] == settled).await;
        assert_eq!(st["status"]["node_state"], node, "{action}");
        assert_eq!(fake.state_of("web_node1"), node, "{action}");
        let sent = posts(&fake, &format!("/api/v2/node/{web}/{action}"));
        assert_eq!(sent.len(), 1, "{action} sent once");
        assert_eq!(sent[0].content_length, None, "{action}: no Content-Length header");
        assert!(sent[0].body.is_empty(), "{action}: no body");
    }
    let guards = fake.log().iter().filter(|r| r.method == "GET" && r.path == format!("/api/v2/node/{web}")).count();
    assert!(guards >= 4, "a GET before each action ({guards})");

    // `stop` on a stopped socket node aborts VILLASnode: busbar sends it
    // once (running → stopped), never twice.
    for _ in 0..2 {
        c.publish(to_uuid(udp), &action_body("stop"), None).await.unwrap();
        status_of(&mut l, udp, |v| v["status"]["node_state"] == "stopped").await;
    }
    assert_eq!(posts(&fake, &format!("/api/v2/node/{udp}/stop")).len(), 1, "no stop to a stopped node");
    // reset on a gateway restarts the node.
    c.publish(to_uuid(udp), &action_body("reset"), None).await.unwrap();
    status_of(&mut l, udp, |v| v["status"]["state"] == "running").await;
    assert_eq!(posts(&fake, &format!("/api/v2/node/{udp}/restart")).len(), 1);

    // A node that changes state behind busbar's back, one that appears and
    // one that vanishes (gone once).
    fake.set_state("web_node1", "paused");
    status_of(&mut l, web, |v| v["status"]["state"] == "paused").await;
    let added = fake.add_node("new1", "socket");
    let st = status_of(&mut l, added, |v| v["status"]["state"] == "running").await;
    assert_eq!(st["properties"]["name"], "new1");
    let sig = fake.uuid_of("sig");
    fake.remove_node("sig");
    state_of(&mut l, sig, "gone").await;
    let later = collect_for(&mut l, Duration::from_millis(800)).await;
    let again = later.iter().filter(|s| s.payload["properties"]["uuid"] == sig.to_string()).count();
    assert_eq!(again, 0, "a vanished node says gone once and falls silent");

    // VILLASnode down: the manager and its gateways are `error`, not gone;
    // back up, they recover with the same uuids.
    fake.down();
    let st = status_of(&mut l, manager, |v| v["status"]["state"] == "error").await;
    assert!(st["status"]["error"]["msg"].as_str().unwrap().contains("reconcile"), "{st}");
    status_of(&mut l, web, |v| v["status"]["state"] == "error").await;
    fake.up().await;
    status_of(&mut l, manager, |v| v["status"]["state"] == "running").await;
    status_of(&mut l, web, |v| v["status"]["state"] == "paused").await;

    // A slow API never blocks other components: while VILLASnode hangs,
    // a ping to the dummy is answered at once.
    fake.set_delay(Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    c.publish(to_uuid(env.dummy), &action_body("ping"), None).await.unwrap();
    status_of(&mut l, env.dummy, |_| true).await;
    assert!(t.elapsed() < Duration::from_millis(500), "ping answered in {:?}", t.elapsed());
    status_of(&mut l, manager, |v| v["status"]["state"] == "error").await;
    fake.set_delay(Duration::ZERO);
    status_of(&mut l, manager, |v| v["status"]["state"] == "running").await;

    // The manager's reset restarts VILLASnode.
    c.publish(to_uuid(manager), &action_body("reset"), None).await.unwrap();
    status_of(&mut l, manager, |v| v["status"]["state"] == "running").await;
    assert_eq!(posts(&fake, "/api/v2/restart").len(), 1);

    assert_eq!(fake.crashed(), None, "busbar never triggered a VILLASnode crash");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn villas_relay_sessions_are_gateways_that_go_when_the_session_ends() {
    let fake = FakeVillas::start("vm", &[]).await;
    fake.set_sessions(&[("node_1", 2)]);
    let env = TestEnv::new();
    let cfg = env.config_with(vec![json!({
        "category": "manager", "type": "villas-relay", "name": "Relay",
        "api_url": fake.url(), "api_url_external": "wss://lab.example/relay", "poll_interval": 0.2,
    })]);
    let (d, c, mut l) = env.up_with(cfg).await;
    let manager: Uuid = VM_INSTANCE.parse().unwrap();
    let session: Uuid = VM_RELAY_NODE_1.parse().unwrap();
    let mut data = manager.as_bytes().to_vec();
    data.extend_from_slice(b"node_1");
    assert_eq!(md5_uuid(&data), session, "session uuid = md5(relay uuid bytes + identifier)");
    let st = status_of(&mut l, session, |v| v["status"]["state"] == "running").await;
    assert_eq!(st["properties"]["name"], "node_1");
    assert_eq!(st["properties"]["ws_url"], "wss://lab.example/relay/node_1");
    assert_eq!(st["status"]["managed_by"], manager.to_string());
    assert_eq!(st["status"]["connections"].as_array().unwrap().len(), 2);
    assert!(villasweb_accepts(&st), "{st}");
    // A relay action is refused with a message; the session stays running
    // (the Python controller's consumer died of it).
    c.publish(to_uuid(session), &action_body("start"), None).await.unwrap();
    let st = status_of(&mut l, session, |v| v["status"]["error"]["msg"].is_string()).await;
    assert_eq!(st["status"]["state"], "running");
    // The session ends: gone; the manager stays running with none.
    fake.set_sessions(&[]);
    state_of(&mut l, session, "gone").await;
    let st = status_of(&mut l, manager, |v| v["status"]["sessions"] == 0).await;
    assert_eq!(st["status"]["state"], "running", "no session is not a problem");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

fn action_body(name: &str) -> Value {
    json!({"action": name, "parameters": {}})
}

/// The same lifecycle against a real VILLASnode, when `VILLAS_NODE` names
/// a `villas-node` binary (skipped otherwise; this machine has none). It
/// runs one websocket and one loopback node with the API on a free port;
/// the process must still be alive at the end (the hazards kill it).
#[tokio::test]
async fn against_a_real_villas_node_when_one_is_installed() {
    let Ok(binary) = std::env::var("VILLAS_NODE") else {
        eprintln!("skipped: set VILLAS_NODE to a villas-node binary to run this test");
        return;
    };
    let env = TestEnv::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = json!({
        "http": {"port": port},
        "nodes": {
            "web_node1": {"type": "websocket"},
            "loop1": {"type": "loopback"},
        },
        "paths": [{"in": "loop1", "out": "web_node1"}],
    });
    let path = env.dir.path().join("villas-node.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut child =
        tokio::process::Command::new(&binary).arg(&path).kill_on_drop(true).spawn().expect("villas-node runs");
    let api = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(10), "VILLASnode's API answers", async || {
        reqwest::get(format!("{api}/api/v2/status")).await.ok().filter(|r| r.status().is_success())
    })
    .await;
    let cfg = env.config_with(vec![json!({
        "category": "manager", "type": "villas-node", "name": "real", "api_url": api, "poll_interval": 0.5,
    })]);
    let (d, c, mut l) = env.up_with(cfg).await;
    let nodes: Value = reqwest::get(format!("{api}/api/v2/nodes")).await.unwrap().json().await.unwrap();
    let web: Uuid = nodes.as_array().unwrap().iter().find(|n| n["name"] == "web_node1").unwrap()["uuid"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    status_of(&mut l, web, |v| v["status"]["state"] == "running").await;
    for (action, settled) in
        [("pause", "paused"), ("resume", "running"), ("stop", "idle"), ("stop", "idle"), ("start", "running")]
    {
        c.publish(to_uuid(web), &action_body(action), None).await.unwrap();
        status_of(&mut l, web, |v| v["status"]["state"] == settled).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "VILLASnode is still running");
    c.close().await;
    d.stop().await.expect("clean shutdown");
    let _ = child.kill().await;
}

/// Where the daemon sends requests is the config's decision: a bus
/// `create` of a VILLASnode manager naming an `api_url` is refused (it
/// would make the daemon poll and post to any address), and the manager
/// that refused stays usable.
#[tokio::test]
async fn a_bus_create_may_not_point_the_daemon_at_an_api() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let create = json!({"action": "create", "parameters": {"category": "manager", "type": "villas-node",
        "name": "sneaky", "api_url": "http://169.254.169.254"}});
    c.publish(to_uuid(env.manager), &create, None).await.unwrap();
    let st = status_of(&mut l, env.manager, |v| v["status"]["error"]["msg"].is_string()).await;
    assert!(st["status"]["error"]["msg"].as_str().unwrap().starts_with("A create may not set api_url"), "{st}");
    assert_eq!(st["status"]["state"], "idle");
    assert_eq!(d.shared.env.components.len(), 3, "nothing was created");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
