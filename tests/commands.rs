//! Commands to devices, end to end with the real Mosquitto and RabbitMQ:
//! from the Context Broker (an in-test axum router that records every
//! request and answers like Orion), from a VILLAS `command` action, from
//! `busbar command` and from the HTTP API; over MQTT push, HTTP push and
//! HTTP poll; each with the status sequence the Context Broker sees, a
//! ledger that survives a restart, and expiry that fires on time.

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use busbar::iot::model::Tenant;
use busbar::iot::registry::device_uuid;
use common::iot::{Broker, Gw, LAB, ping_status};
use common::orion::Orion;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc;

/// A device on MQTT: a persistent session subscribed to its command
/// topic; what it receives goes to `rx`. With `answer`, it publishes
/// `{"<cmd>": "<answer>-<value>"}` on its `cmdexe` topic for each command.
struct Device {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn connect(client_id: &str, cmd_topic: &str, cmdexe_topic: &str, answer: Option<&str>) -> Device {
        Device::connect_to(1883, client_id, cmd_topic, cmdexe_topic, answer).await
    }

    async fn connect_to(
        port: u16,
        client_id: &str,
        cmd_topic: &str,
        cmdexe_topic: &str,
        answer: Option<&str>,
    ) -> Device {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(false);
        let (client, mut events) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        client.subscribe(cmd_topic, QoS::AtLeastOnce).await.unwrap();
        let (answerer, cmdexe, answer) = (client.clone(), cmdexe_topic.to_owned(), answer.map(str::to_owned));
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if let (Some(a), Some(o)) = (&answer, v.as_object()) {
                            for (name, value) in o {
                                let result = json!({ name: format!("{a}-{value}") });
                                let _ = answerer.try_publish(&cmdexe, QoS::AtLeastOnce, false, result.to_string());
                            }
                        }
                        let _ = tx.send((p.topic.clone(), v));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx).await.expect("the device subscribes").unwrap();
        Device { client, rx, task }
    }

    async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(WAIT, self.rx.recv()).await.expect("the device gets a command").unwrap()
    }

    /// Nothing more arrives within `window`.
    async fn quiet(&mut self, window: Duration) {
        if let Ok(Some(m)) = tokio::time::timeout(window, self.rx.recv()).await {
            panic!("the device got a command twice: {m:?}");
        }
    }

    async fn publish(&self, topic: &str, body: Value) {
        self.client.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.unwrap();
    }

    /// Disconnect, keeping the session (the broker queues QoS 1 commands).
    async fn offline(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.task.abort();
    }
}

async fn north(g: &common::iot::Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    g.north(method, path, Some(LAB), body).await
}

fn uuid_of(id: &str) -> uuid::Uuid {
    device_uuid(&Tenant { service: LAB.0.into(), servicepath: LAB.1.into() }, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_from_the_context_broker_reaches_an_mqtt_device_once_and_its_result_reaches_the_context_broker() {
    let (cb, url) = Orion::start().await;
    let gw = Gw::with(json!({"cbroker": url}));
    let (d, g, c, mut l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let cmd_topic = gw.topic(&format!("{k}/dev1/cmd"));
    let cmdexe = gw.topic(&format!("json/{k}/dev1/cmdexe"));
    let mut dev = Device::connect(&format!("dev1-{}", gw.env.id), &cmd_topic, &cmdexe, None).await;
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Sensor"}),
        json!([{"device_id": "dev1", "entity_name": "urn:lab:Sensor:push1",
            "commands": [{"name": "ping", "type": "command"}]}]),
    )
    .await;

    // Provisioning registered the command at the Context Broker, with the
    // north API as provider (iotagent-node-lib's legacy cmdMode).
    let reg = cb.until("/v2/registrations", "push1").await;
    assert_eq!(
        reg,
        json!({"dataProvided": {"entities": [{"id": "urn:lab:Sensor:push1", "type": "Sensor"}], "attrs": ["ping"]},
            "provider": {"http": {"url": g.north}, "legacyForwarding": true, "supportedForwardingMode": "all"}})
        .to_string()
    );

    // The Context Broker forwards the update, verbatim from the reference.
    let forwarded = json!({"actionType": "update", "entities": [{"id": "urn:lab:Sensor:push1", "type": "Sensor",
        "ping": {"type": "command", "value": {"data": "22"}}}]});
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(forwarded)).await.0, 204);
    let (topic, body) = dev.next().await;
    assert_eq!((topic.as_str(), body), (cmd_topic.as_str(), json!({"ping": {"data": "22"}})));
    let pending = cb.until("/v2/entities?options=upsert", "PENDING").await;
    assert_eq!(
        pending,
        r#"{"id":"urn:lab:Sensor:push1","type":"Sensor","ping_status":{"type":"commandStatus","value":"PENDING"}}"#
    );
    let headers = cb.seen.lock().unwrap().iter().find(|s| s.body == pending).cloned().unwrap();
    assert_eq!((headers.service.as_str(), headers.servicepath.as_str()), LAB);

    // The device answers, twice (as a device retrying would): one OK at the
    // Context Broker, the repeat recognised and ignored.
    dev.publish(&cmdexe, json!({"ping": "1234567890"})).await;
    let ok = cb.until("/v2/entities?options=upsert", "\"OK\"").await;
    assert_eq!(
        ok,
        r#"{"id":"urn:lab:Sensor:push1","type":"Sensor","ping_status":{"type":"commandStatus","value":"OK"},"ping_info":{"type":"commandResult","value":"1234567890"}}"#
    );
    dev.publish(&cmdexe, json!({"ping": "1234567890"})).await;
    let st = eventually(WAIT, "the repeated result is counted", async || {
        let st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
        (st["status"]["commands"]["duplicates"] == 1).then_some(st)
    })
    .await;
    assert_eq!(st["status"]["commands"]["ok"], 1, "{st}");
    assert_eq!(st["status"]["commands"]["open"], 0, "{st}");
    assert_eq!(cb.bodies("/v2/entities?options=upsert").len(), 2, "PENDING and OK, nothing for the repeat");
    assert_eq!(cb.command_states("urn:lab:Sensor:push1", "ping"), ["PENDING", "OK"]);
    dev.quiet(Duration::from_millis(500)).await;

    // The ledger lists it with its history; an unknown command is refused
    // before anything is taken.
    let (s, b) = north(&g, "GET", "/iot/commands?device=dev1", None).await;
    assert_eq!((s, b["count"].as_u64()), (200, Some(1)), "{b}");
    let cmd = &b["commands"][0];
    assert_eq!(
        (cmd["name"].as_str(), cmd["state"].as_str(), cmd["via"].as_str()),
        (Some("ping"), Some("OK"), Some("mqtt"))
    );
    let states: Vec<&str> = cmd["history"].as_array().unwrap().iter().map(|h| h["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["PENDING", "OK"]);
    let bad = json!({"actionType": "update", "entities": [{"id": "urn:lab:Sensor:push1", "type": "Sensor",
        "reboot": {"type": "command", "value": ""}}]});
    let (s, b) = north(&g, "POST", "/v2/op/update", Some(bad)).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("COMMAND_NOT_FOUND")), "{b}");
    let nobody = json!({"actionType": "update", "entities": [{"id": "urn:lab:Sensor:nobody", "ping": {"value": 1}}]});
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(nobody)).await.0, 404);
    assert_eq!(north(&g, "GET", "/iot/commands", None).await.1["count"], 1);
    dev.quiet(Duration::from_millis(300)).await;

    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_a_villas_action_busbar_command_and_the_http_api_come_back_with_the_devices_result() {
    let gw = Gw::new();
    let (d, g, c, mut l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let cmd_topic = gw.topic(&format!("{k}/inv1/cmd"));
    let cmdexe = gw.topic(&format!("json/{k}/inv1/cmdexe"));
    let mut dev = Device::connect(&format!("inv1-{}", gw.env.id), &cmd_topic, &cmdexe, Some("done")).await;
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Inverter",
            "commands": [{"name": "set_power", "type": "command"}]}),
        json!([{"device_id": "inv1"}]),
    )
    .await;
    let inv = uuid_of("inv1");

    // The device advertises its commands as the schema of its `command` action.
    let st = ping_status(&c, &mut l, inv, |_| true).await;
    assert_eq!(st["schema"]["command"]["properties"]["name"]["enum"], json!(["set_power"]), "{st}");

    // A VILLAS action: answered PENDING at once, then with the result.
    let answer = c.command(&inv.to_string(), json!({"name": "set_power", "value": 5}), false, WAIT).await.unwrap();
    assert_eq!(answer["status"]["command"]["state"], "PENDING", "{answer}");
    assert_eq!(dev.next().await.1, json!({"set_power": 5}));
    let done = c.command(&inv.to_string(), json!({"name": "set_power", "value": 7}), true, WAIT).await.unwrap();
    assert_eq!(done["status"]["command"]["state"], "OK", "{done}");
    assert_eq!(done["status"]["command"]["info"], "done-7");
    assert_eq!(dev.next().await.1, json!({"set_power": 7}));

    // `busbar command --wait` from the shell.
    let o = cli(&gw.env, &["command", "-u", &inv.to_string(), "set_power", "9", "--wait"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.starts_with("OK \"done-9\""), "{out}");
    assert_eq!(dev.next().await.1, json!({"set_power": 9}));
    let o = cli(&gw.env, &["command", "-u", &inv.to_string(), "reboot"]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has no command \"reboot\" (it has: set_power)"), "{err}");

    // The HTTP API, and the device's status shows the last command.
    let api = d.api_addr.expect("the API listens");
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{api}/api/v1/component/{inv}"))
        .json(&json!({"action": "command", "parameters": {"name": "set_power", "value": 11}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["status"]["command"]["state"], "PENDING", "{b}");
    assert_eq!(dev.next().await.1, json!({"set_power": 11}));
    eventually(WAIT, "the device status shows the result", async || {
        let b: Value = http.get(format!("http://{api}/api/v1/component/{inv}")).send().await.ok()?.json().await.ok()?;
        (b["status"]["commands"]["set_power"]["state"] == "OK").then_some(())
    })
    .await;
    let r = http
        .post(format!("http://{api}/api/v1/component/{inv}"))
        .json(&json!({"action": "command", "parameters": {"value": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    dev.quiet(Duration::from_millis(300)).await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_poll_and_http_push_commands_follow_iotagent_json() {
    let (cb, url) = Orion::start().await;
    // The device's own HTTP endpoint for push commands.
    let device_app = Router::new().route(
        "/cmd",
        post(|headers: HeaderMap, body: Bytes| async move {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(headers.get("fiware-service").unwrap(), "lab");
            let (name, value) = v.as_object().unwrap().iter().next().unwrap();
            axum::Json(json!({ name: format!("pong-from-device-{value}") }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/cmd", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, device_app).await.unwrap() });

    let gw = Gw::with(json!({"cbroker": url}));
    let (d, g, c, _l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Robot",
            "commands": [{"name": "ping", "type": "command"}, {"name": "move", "type": "command"}]}),
        json!([{"device_id": "poll1", "transport": "HTTP"}, {"device_id": "push1", "endpoint": endpoint}]),
    )
    .await;
    let update = |id: &str, attrs: Value| {
        let mut e = json!({"id": format!("Robot:{id}"), "type": "Robot"});
        for (k, v) in attrs.as_object().unwrap() {
            e[k] = json!({"type": "command", "value": v});
        }
        json!({"actionType": "update", "entities": [e]})
    };

    // Poll: two commands wait, the poll takes both (DELIVERED, info " "),
    // the next poll gets nothing, the result finishes one.
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("poll1", json!({"ping": {"data": "22"}})))).await.0, 204);
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("poll1", json!({"move": 20})))).await.0, 204);
    let (s, b) = g.south_get(&format!("/iot/json?i=poll1&k={k}&getCmd=1")).await;
    assert_eq!((s, b), (200, json!({"ping": {"data": "22"}, "move": 20})));
    let delivered = cb
        .until("/v2/entities?options=upsert", "move_status\":{\"type\":\"commandStatus\",\"value\":\"DELIVERED")
        .await;
    assert!(delivered.contains(r#""move_info":{"type":"commandResult","value":" "}"#), "{delivered}");
    assert_eq!(g.south_get(&format!("/iot/json?i=poll1&k={k}&getCmd=1")).await, (200, json!({})));
    let (s, _) = g
        .south_raw(&format!("/iot/json/commands?i=poll1&k={k}"), "application/json", br#"{"ping":"done-22"}"#.to_vec())
        .await;
    assert_eq!(s, 200);
    let ok = cb.until("/v2/entities?options=upsert", "done-22").await;
    assert_eq!(
        ok,
        r#"{"id":"Robot:poll1","type":"Robot","ping_status":{"type":"commandStatus","value":"OK"},"ping_info":{"type":"commandResult","value":"done-22"}}"#
    );
    // A measure with getCmd=1 answers the waiting commands too.
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("poll1", json!({"ping": 1})))).await.0, 204);
    let (s, b) =
        g.south_raw(&format!("/iot/json?i=poll1&k={k}&getCmd=1"), "application/json", br#"{"t": 1}"#.to_vec()).await;
    assert_eq!((s, b), (200, json!({"ping": 1})));

    // Push: the device's answer is the result.
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("push1", json!({"ping": "hello"})))).await.0, 204);
    let ok = cb.until("/v2/entities?options=upsert", "pong-from-device").await;
    assert_eq!(
        ok,
        r#"{"id":"Robot:push1","type":"Robot","ping_status":{"type":"commandStatus","value":"OK"},"ping_info":{"type":"commandResult","value":"pong-from-device-\"hello\""}}"#
    );
    let (_, b) = north(&g, "GET", "/iot/commands?device=push1", None).await;
    assert_eq!(b["commands"][0]["via"], "http-push", "{b}");
    // The status sequences the Context Broker saw, as upstream writes them.
    assert_eq!(cb.command_states("Robot:push1", "ping"), ["PENDING", "OK"]);
    assert_eq!(cb.command_states("Robot:poll1", "move"), ["PENDING", "DELIVERED"]);
    assert_eq!(cb.command_states("Robot:poll1", "ping"), ["PENDING", "DELIVERED", "OK", "PENDING", "DELIVERED"]);
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_a_restart_commands_expire_on_time_and_an_offline_device_gets_its_command_once() {
    let (cb, url) = Orion::start().await;
    let gw = Gw::with(json!({"cbroker": url}));
    let (d, g, c, _l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let cmd_topic = gw.topic(&format!("{k}/m1/cmd"));
    let cmdexe = gw.topic(&format!("json/{k}/m1/cmdexe"));
    let client_id = format!("m1-{}", gw.env.id);
    // The MQTT device subscribes once, then goes offline (its session stays).
    Device::connect(&client_id, &cmd_topic, &cmdexe, None).await.offline().await;
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Meter",
            "commands": [{"name": "reset", "type": "command"}, {"name": "tare", "type": "command", "expiration": 2}]}),
        json!([{"device_id": "m1"}, {"device_id": "p1", "transport": "HTTP"}]),
    )
    .await;
    let update = |id: &str, name: &str| {
        json!({"actionType": "update", "entities": [{"id": format!("Meter:{id}"), "type": "Meter",
            name: {"type": "command", "value": 1}}]})
    };
    // For the offline device; for the polling one: one that expires in 2 s
    // and one that does not, which the device polls (DELIVERED).
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("m1", "reset"))).await.0, 204);
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("p1", "reset"))).await.0, 204);
    assert_eq!(g.south_get(&format!("/iot/json?i=p1&k={k}&getCmd=1")).await, (200, json!({"reset": 1})));
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(update("p1", "tare"))).await.0, 204);
    // The broker took the MQTT command before the restart.
    eventually(WAIT, "the broker acknowledged the command", async || {
        let (_, b) = north(&g, "GET", "/iot/commands?device=m1", None).await;
        b["commands"][0]["broker"].as_str().map(|_| ())
    })
    .await;

    c.close().await;
    d.stop().await.expect("clean shutdown");
    let d = gw.env.start_with(gw.config()).await;
    let g = common::iot::Gateway::of(&d, gw.uuid).await;
    let (_, b) = north(&g, "GET", "/iot/commands", None).await;
    let states: Vec<(String, String, String)> = b["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["device_id"].as_str().unwrap().into(),
                c["name"].as_str().unwrap().into(),
                c["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    let has = |d: &str, n: &str, s: &str| states.iter().any(|x| x == &(d.into(), n.into(), s.into()));
    assert!(has("m1", "reset", "PENDING") && has("p1", "reset", "DELIVERED"), "{states:?}");
    // The one with a 2 s expiry expires on time, after the restart, and the
    // Context Broker hears it as upstream writes it.
    let expired = cb.until("/v2/entities?options=upsert", "tare_info").await;
    assert_eq!(
        expired,
        r#"{"id":"Meter:p1","type":"Meter","tare_status":{"type":"commandStatus","value":"ERROR"},"tare_info":{"type":"commandResult","value":"EXPIRED"}}"#
    );
    let (_, b) = north(&g, "GET", "/iot/commands?device=p1", None).await;
    let tare = b["commands"].as_array().unwrap().iter().find(|c| c["name"] == "tare").unwrap().clone();
    let created = tare["created"].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let ended = tare["updated"].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let took = (ended - created).total(jiff::Unit::Millisecond).unwrap();
    assert!((2000.0..3500.0).contains(&took), "expired {took} ms after it was taken: {tare}");
    assert_eq!(cb.command_states("Meter:p1", "tare"), ["PENDING", "ERROR"], "ERROR with info EXPIRED, as upstream");
    // The delivered one finishes with the device's result after the restart.
    g.south_raw(&format!("/iot/json/commands?i=p1&k={k}"), "application/json", br#"{"reset":"ok"}"#.to_vec()).await;
    cb.until("/v2/entities?options=upsert", "\"value\":\"ok\"").await;

    // The offline device comes back: its command waited at the broker
    // (busbar did not publish it again after its own restart), once.
    let mut dev = Device::connect(&client_id, &cmd_topic, &cmdexe, Some("done")).await;
    assert_eq!(dev.next().await.1, json!({"reset": 1}));
    cb.until("/v2/entities?options=upsert", "done-1").await;
    dev.quiet(Duration::from_millis(500)).await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pending_across_an_mqtt_broker_restart_reach_the_device_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let gw = Gw::with(json!({"mqtt_url": format!("mqtt://127.0.0.1:{}", broker.port)}));
    let (d, g, c, _l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let cmd_topic = gw.topic(&format!("{k}/sw1/cmd"));
    let cmdexe = gw.topic(&format!("json/{k}/sw1/cmdexe"));
    let client_id = format!("sw1-{}", gw.env.id);
    Device::connect_to(broker.port, &client_id, &cmd_topic, &cmdexe, None).await.offline().await;
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Switch",
            "commands": [{"name": "set", "type": "command"}]}),
        json!([{"device_id": "sw1"}]),
    )
    .await;
    let send = |i: u64| {
        let g = g.clone();
        async move {
            let body = json!({"actionType": "update", "entities": [{"id": "Switch:sw1", "type": "Switch",
                "set": {"type": "command", "value": i}}]});
            assert_eq!(north(&g, "POST", "/v2/op/update", Some(body)).await.0, 204);
        }
    };
    // Five while the broker runs (it holds them for the offline device)...
    for i in 0..5 {
        send(i).await;
    }
    eventually(WAIT, "the broker acknowledged the first five", async || {
        let (_, b) = north(&g, "GET", "/iot/commands?device=sw1", None).await;
        b["commands"].as_array()?.iter().all(|c| c["broker"].is_string()).then_some(())
    })
    .await;
    // ...five while it is down, then it comes back (with its saved state).
    broker.stop();
    for i in 5..10 {
        send(i).await;
    }
    broker.restart();
    eventually(WAIT, "the broker acknowledged all ten", async || {
        let (_, b) = north(&g, "GET", "/iot/commands?device=sw1", None).await;
        let all = b["commands"].as_array()?;
        (all.len() == 10 && all.iter().all(|c| c["broker"].is_string())).then_some(())
    })
    .await;
    // The device returns: each command once, and each result finishes one.
    let mut dev = Device::connect_to(broker.port, &client_id, &cmd_topic, &cmdexe, Some("on")).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(dev.next().await.1["set"].as_u64().unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>(), "each command once");
    dev.quiet(Duration::from_millis(500)).await;
    eventually(WAIT, "all ten finished OK", async || {
        let (_, b) = north(&g, "GET", "/iot/commands?device=sw1", None).await;
        b["commands"].as_array()?.iter().all(|c| c["state"] == "OK").then_some(())
    })
    .await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_retried_an_error_answer_fails_and_bad_results_are_counted() {
    // The device endpoint is down when the command comes; it comes up later.
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let late = spare.local_addr().unwrap();
    drop(spare);
    let failing = Router::new().route("/cmd", post(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken = format!("http://{}/cmd", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, failing).await.unwrap() });

    let gw = Gw::new();
    let (d, g, c, mut l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Load",
            "commands": [{"name": "switch", "type": "command"}]}),
        json!([{"device_id": "late", "endpoint": format!("http://{late}/cmd")}, {"device_id": "broken", "endpoint": broken},
               {"device_id": "mq"}]),
    )
    .await;
    let send = |id: &str| {
        json!({"actionType": "update", "entities": [{"id": format!("Load:{id}"), "type": "Load",
        "switch": {"type": "command", "value": "on"}}]})
    };
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(send("late"))).await.0, 204);
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(send("broken"))).await.0, 204);
    let state = |id: &'static str| {
        let g = g.clone();
        async move { north(&g, "GET", &format!("/iot/commands?device={id}"), None).await.1["commands"][0].clone() }
    };
    let failed = eventually(WAIT, "the error answer fails the command", async || {
        let c = state("broken").await;
        (c["state"] == "ERROR").then_some(c)
    })
    .await;
    assert_eq!(failed["info"], "the device answered HTTP 500", "{failed}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(state("late").await["state"], "PENDING", "still trying");
    let listener = tokio::net::TcpListener::bind(late).await.unwrap();
    let app = Router::new().route("/cmd", post(|| async { axum::Json(json!({"switch": "is on"})) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let ok = eventually(WAIT, "the endpoint that came up took it", async || {
        let c = state("late").await;
        (c["state"] == "OK").then_some(c)
    })
    .await;
    assert_eq!(ok["info"], "is on");

    // Junk on the MQTT result topics is counted, and the loop goes on.
    let mqtt = common::iot::Mqtt::connect(1883).await;
    let cmdexe = gw.topic(&format!("json/{k}/mq/cmdexe"));
    mqtt.publish(&cmdexe, "not json", 1).await;
    mqtt.publish(&cmdexe, "[1, 2]", 1).await;
    mqtt.publish(&gw.topic(&format!("json/{k}/nobody/cmdexe")), r#"{"switch": 1}"#, 1).await;
    let st = eventually(WAIT, "the bad results are counted", async || {
        let st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
        let e = &st["status"]["counters"]["errors"];
        (e["bad_payload"] == 2 && e["device_not_found"] == 1).then_some(st)
    })
    .await;
    assert_eq!(st["status"]["state"], "running", "{st}");
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(send("mq"))).await.0, 204);
    mqtt.publish(&cmdexe, r#"{"switch": "done"}"#, 1).await;
    eventually(WAIT, "a good result after the junk", async || (state("mq").await["state"] == "OK").then_some(())).await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_command_waits_for_its_device_queue_and_its_result_comes_back_on_cmdexe() {
    use futures_util::StreamExt;
    let id = TestEnv::new().id.clone();
    let south = format!("south-{id}");
    let (cb, url) = Orion::start().await;
    let gw = Gw::with(json!({"amqp_south_exchange": south, "amqp_south_queue": format!("q-{id}"), "cbroker": url}));
    let (d, g, c, _l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Battery",
            "commands": [{"name": "test", "type": "command"}]}),
        json!([{"device_id": "bat1", "transport": "AMQP"}]),
    )
    .await;
    // Sent before the device has a queue: no queue takes it, it waits.
    let body = json!({"actionType": "update", "entities": [{"id": "Battery:bat1", "type": "Battery",
        "test": {"type": "command", "value": {"cycles": 3}}}]});
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(body)).await.0, 204);
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    eventually(WAIT, "the gateway declares its south exchange", async || {
        let ch = conn.create_channel().await.unwrap();
        let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
        ch.exchange_declare(south.as_str().into(), lapin::ExchangeKind::Topic, passive, Default::default()).await.ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, b) = north(&g, "GET", "/iot/commands?device=bat1", None).await;
    assert!(b["commands"][0]["broker"].is_null(), "no queue took it yet: {b}");
    // The device's queue appears: the command arrives (within a retry tick), once.
    let q = format!("dev-{id}");
    ch.queue_declare(q.as_str().into(), Default::default(), Default::default()).await.unwrap();
    let key = format!(".{k}.bat1.cmd");
    ch.queue_bind(
        q.as_str().into(),
        south.as_str().into(),
        key.as_str().into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let mut consumer =
        ch.basic_consume(q.as_str().into(), "".into(), Default::default(), Default::default()).await.unwrap();
    let got = tokio::time::timeout(WAIT, consumer.next()).await.expect("the device gets its command").unwrap().unwrap();
    assert_eq!(got.routing_key.as_str(), key);
    assert_eq!(serde_json::from_slice::<Value>(&got.data).unwrap(), json!({"test": {"cycles": 3}}));
    got.ack(Default::default()).await.unwrap();
    let result = json!({"test": "passed"}).to_string();
    let rkey = format!(".{k}.bat1.cmdexe");
    ch.basic_publish(
        south.as_str().into(),
        rkey.as_str().into(),
        Default::default(),
        result.as_bytes(),
        Default::default(),
    )
    .await
    .unwrap();
    let done = eventually(WAIT, "the result finishes the command", async || {
        let c = north(&g, "GET", "/iot/commands?device=bat1", None).await.1["commands"][0].clone();
        (c["state"] == "OK").then_some(c)
    })
    .await;
    assert_eq!(done["info"], "passed");
    eventually(WAIT, "the Context Broker saw PENDING then OK", async || {
        (cb.command_states("Battery:bat1", "test") == ["PENDING", "OK"]).then_some(())
    })
    .await;
    assert!(tokio::time::timeout(Duration::from_millis(2500), consumer.next()).await.is_err(), "sent once");
    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    let _ = ch.exchange_delete(south.as_str().into(), Default::default()).await;
    let _ = ch.queue_delete(format!("q-{id}").as_str().into(), Default::default()).await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_retrieve_their_configuration_once_or_by_subscription_over_mqtt_and_http() {
    let (cb, url) = Orion::start().await;
    // An HTTP device's endpoint, which receives /configuration/values.
    let (tx, mut got) = mpsc::unbounded_channel::<(String, Value)>();
    let device_app = Router::new().route(
        "/dev/configuration/values",
        post(move |uri: Uri, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((uri.path().to_owned(), serde_json::from_slice(&body).unwrap_or(Value::Null)));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/dev", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, device_app).await.unwrap() });

    let gw = Gw::with(json!({"cbroker": url}));
    let (d, g, c, mut l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let values = gw.topic(&format!("{k}/th1/configuration/values"));
    let mut dev = Device::connect(&format!("th1-{}", gw.env.id), &values, "unused", None).await;
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Thermostat"}),
        json!([{"device_id": "th1", "transport": "MQTT"}, {"device_id": "th2", "transport": "HTTP", "endpoint": endpoint}]),
    )
    .await;

    // MQTT, `configuration`: the agent reads the entity, the device gets
    // the values and `dt`.
    let ask = json!({"type": "configuration", "fields": ["sleepTime", "warningLevel"]});
    dev.publish(&gw.topic(&format!("json/{k}/th1/configuration/commands")), ask.clone()).await;
    let (topic, v) = dev.next().await;
    assert_eq!(topic, values);
    assert_eq!((v["sleepTime"].as_str(), v["warningLevel"].as_str()), (Some("200"), Some("80")), "{v}");
    assert_eq!(v["dt"].as_str().map(str::len), Some(16), "{v}");
    let read =
        cb.seen.lock().unwrap().iter().find(|s| s.path.starts_with("/v2/entities/Thermostat:th1")).cloned().unwrap();
    assert_eq!(read.path, "/v2/entities/Thermostat:th1/attrs?attrs=sleepTime,warningLevel&type=Thermostat");
    assert_eq!((read.service.as_str(), read.servicepath.as_str()), LAB);

    // HTTP, `configuration`: to the device's endpoint.
    let (s, _) = g
        .south_raw(
            &format!("/iot/json/configuration/commands?i=th2&k={k}"),
            "application/json",
            ask.to_string().into_bytes(),
        )
        .await;
    assert_eq!(s, 200);
    let (path, v) = tokio::time::timeout(WAIT, got.recv()).await.expect("the endpoint gets the values").unwrap();
    assert_eq!((path.as_str(), v["sleepTime"].as_str()), ("/dev/configuration/values", Some("200")));
    let (s, b) = g
        .south_raw(
            &format!("/iot/json/configuration/commands?i=th2&k={k}"),
            "application/json",
            br#"{"type":"x"}"#.to_vec(),
        )
        .await;
    assert_eq!((s, b["name"].as_str()), (400, Some("BAD_PAYLOAD")), "{b}");

    // MQTT, `subscription`: the agent subscribes at the Context Broker,
    // and each notification reaches the device.
    let sub = json!({"type": "subscription", "fields": ["sleepTime"]});
    dev.publish(&gw.topic(&format!("json/{k}/th1/configuration/commands")), sub).await;
    let body = cb.until("/v2/subscriptions", "Thermostat:th1").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"description": "busbar configuration retrieval",
            "subject": {"entities": [{"id": "Thermostat:th1", "type": "Thermostat"}], "condition": {"attrs": ["sleepTime"]}},
            "notification": {"http": {"url": format!("{}/notify", g.north)}, "attrs": ["sleepTime"]}})
    );
    let note = json!({"subscriptionId": "s1", "data": [{"id": "Thermostat:th1", "type": "Thermostat",
        "sleepTime": {"type": "Text", "value": "300", "metadata": {}}}]});
    assert_eq!(north(&g, "POST", "/notify", Some(note)).await.0, 200);
    let (_, v) = dev.next().await;
    assert_eq!(v["sleepTime"], "300", "{v}");
    assert_eq!(north(&g, "POST", "/notify", Some(json!({"nodata": 1}))).await.0, 400);

    // A flood of requests while the Context Broker is slow: at most 64 wait
    // on it, the rest are dropped and counted, and the gateway answers.
    cb.slow_reads.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        dev.publish(&gw.topic(&format!("json/{k}/th1/configuration/commands")), ask.clone()).await;
    }
    let st = eventually(WAIT, "the excess is counted", async || {
        let st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
        (st["status"]["counters"]["errors"]["configuration_busy"].as_u64() == Some(36)).then_some(st)
    })
    .await;
    assert_eq!(st["status"]["state"], "running", "{st}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dojot_actuation_goes_to_both_config_topics_and_the_next_measure_is_the_result() {
    let (cb, url) = Orion::start().await;
    let gw = Gw::with(json!({"dojot": true, "cbroker": url}));
    let (d, g, c, _l, _data) = gw.up().await;
    let tenant = format!("t{}", gw.env.id);
    let verne = gw.topic(&format!("{tenant}:a1998e/config"));
    let mosca = gw.topic(&format!("{tenant}/a1998e/config"));
    let mut v = Device::connect(&format!("v-{}", gw.env.id), &verne, "unused", None).await;
    let mut m = Device::connect(&format!("m-{}", gw.env.id), &mosca, "unused", None).await;
    let t = (tenant.as_str(), "/");
    let (s, b) = g
        .north(
            "POST",
            "/iot/devices",
            Some(t),
            Some(json!({"devices": [{"device_id": "a1998e", "entity_type": "Heater",
            "transport": "DOJOT", "commands": [{"name": "target_temperature", "type": "command"}]}]})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let body = json!({"actionType": "update", "entities": [{"id": "Heater:a1998e", "type": "Heater",
        "target_temperature": {"type": "command", "value": 23.5}}]});
    assert_eq!(g.north("POST", "/v2/op/update", Some(t), Some(body)).await.0, 204);
    assert_eq!(v.next().await, (verne.clone(), json!({"target_temperature": 23.5})));
    assert_eq!(m.next().await, (mosca.clone(), json!({"target_temperature": 23.5})));
    // The device reports the attribute it was told to set: the result.
    v.publish(&gw.topic(&format!("{tenant}:a1998e/attrs")), json!({"target_temperature": 23.5})).await;
    let done = eventually(WAIT, "the measure finishes the actuation", async || {
        let (_, b) = g.north("GET", "/iot/commands?device=a1998e", Some(t), None).await;
        let c = b["commands"][0].clone();
        (c["state"] == "OK").then_some(c)
    })
    .await;
    assert_eq!((done["info"].as_f64(), done["via"].as_str()), (Some(23.5), Some("dojot")), "{done}");
    eventually(WAIT, "the Context Broker saw PENDING then OK", async || {
        (cb.command_states("Heater:a1998e", "target_temperature") == ["PENDING", "OK"]).then_some(())
    })
    .await;
    v.quiet(Duration::from_millis(300)).await;
    m.quiet(Duration::from_millis(1)).await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_outside_endpoint_allow_are_refused_at_provisioning_and_never_called() {
    // A listener that records whether anything reached it.
    let hit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = hit.clone();
    let app = Router::new().route(
        "/cmd",
        post(move || {
            h.store(true, std::sync::atomic::Ordering::SeqCst);
            async { axum::Json(json!({"set": "done"})) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoint = format!("http://{addr}/cmd");
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut gw = Gw::with(json!({"endpoint_allow": [addr.to_string()]}));
    let (d, g, c, _l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Load", "commands": [{"name": "set", "type": "command"}]}),
        json!([{"device_id": "y", "endpoint": endpoint}]),
    )
    .await;
    // Another host, or not HTTP: refused on devices and groups alike.
    for bad in ["http://169.254.169.254/latest", "file:///etc/passwd"] {
        let body = json!({"devices": [{"device_id": "x", "endpoint": bad}]});
        let (s, b) = north(&g, "POST", "/iot/devices", Some(body)).await;
        assert_eq!(s, 400, "{b}");
        assert!(b["message"].as_str().unwrap().contains("endpoint"), "{b}");
        let path = format!("/iot/groups?resource=/iot/json&apikey={k}");
        assert_eq!(north(&g, "PUT", &path, Some(json!({"endpoint": bad}))).await.0, 400);
        assert_eq!(north(&g, "PUT", "/iot/devices/y", Some(json!({"endpoint": bad}))).await.0, 400);
    }
    // The allow-list narrowed after provisioning: a command to the device
    // fails without a request leaving busbar.
    c.close().await;
    d.stop().await.expect("clean shutdown");
    gw.extra = json!({"endpoint_allow": ["devices.lab.example"]});
    let d = gw.env.start_with(gw.config()).await;
    let g = common::iot::Gateway::of(&d, gw.uuid).await;
    let body = json!({"actionType": "update", "entities": [{"id": "Load:y", "type": "Load",
        "set": {"type": "command", "value": 1}}]});
    assert_eq!(north(&g, "POST", "/v2/op/update", Some(body)).await.0, 204);
    let failed = eventually(WAIT, "the command fails", async || {
        let c = north(&g, "GET", "/iot/commands?device=y", None).await.1["commands"][0].clone();
        (c["state"] == "ERROR").then_some(c)
    })
    .await;
    assert!(failed["info"].as_str().unwrap().contains("is not in the gateway's endpoint_allow"), "{failed}");
    assert!(!hit.load(std::sync::atomic::Ordering::SeqCst), "nothing was sent to the endpoint");
    d.stop().await.expect("clean shutdown");
}
