//! The IoT gateway against the real Mosquitto and RabbitMQ: provisioning,
//! measures over HTTP, MQTT and AMQP into the federation, device ICs, the
//! mapping rules, tenancy, and the upstream bugs that must not happen.

mod common;

use busbar::iot::model::Tenant;
use busbar::iot::registry::device_uuid;
use common::broker::*;
use common::iot::*;
use common::*;
use serde_json::{Value, json};
use std::time::Duration;

fn group(apikey: &str) -> Value {
    json!({"resource": "/iot/json", "apikey": apikey, "entity_type": "Sensor",
        "static_attributes": [{"name": "lab", "type": "Text", "value": "L1"}]})
}

fn dev1() -> Value {
    json!([{"device_id": "dev1", "entity_name": "urn:lab:Sensor:dev1",
        "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
        "static_attributes": [{"name": "room", "type": "Text", "value": "B12"}]}])
}

#[tokio::test]
async fn provisioning_calls_answer_with_the_upstream_codes_and_errors() {
    let gw = Gw::new();
    let (d, g, c, _l, data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    // Groups.
    let (s, b) = g.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [group(&k)]}))).await;
    assert_eq!((s, b), (201, json!({})));
    let (s, b) = g.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [group(&k)]}))).await;
    assert_eq!((s, b["name"].as_str()), (409, Some("DUPLICATE_GROUP")));
    let (s, b) = g.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [{"resource": "/iot/json"}]}))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("WRONG_SYNTAX")));
    let (s, b) = g.north("POST", "/iot/groups", None, Some(json!({"groups": [group("x")]}))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("MISSING_HEADERS")));
    assert!(b["message"].as_str().unwrap().contains("fiware-service"), "{b}");
    let (s, b) = g.north("GET", "/iot/groups", Some(LAB), None).await;
    assert_eq!((s, b["count"].as_u64()), (200, Some(1)));
    assert_eq!(b["groups"][0]["apikey"], k.as_str());
    assert_eq!(b["groups"][0]["service"], "lab");
    let (s, b) = g.north("GET", "/iot/services", Some(LAB), None).await;
    assert_eq!((s, b["services"][0]["apikey"].as_str()), (200, Some(k.as_str())), "alias with its own list key");
    let q = format!("/iot/groups?resource=/iot/json&apikey={k}");
    let (s, _) = g.north("PUT", &q, Some(LAB), Some(json!({"entity_type": "Meter"}))).await;
    assert_eq!(s, 204);
    let (_, b) = g.north("GET", "/iot/groups", Some(LAB), None).await;
    assert_eq!(b["groups"][0]["entity_type"], "Meter");
    let (s, b) = g.north("PUT", &q, Some(("other", "/")), Some(json!({"entity_type": "X"}))).await;
    assert_eq!((s, b["name"].as_str()), (403, Some("MISMATCHED_SERVICE")));
    let (s, b) = g.north("PUT", "/iot/groups", Some(LAB), Some(json!({}))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("MISSING_HEADERS")));
    let (s, b) = g.north("PUT", "/iot/groups?resource=/iot/json&apikey=nope", Some(LAB), Some(json!({}))).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("DEVICE_GROUP_NOT_FOUND")));
    // Malformed JSON is a 400 with a JSON error, not upstream's 500.
    let (s, b) = g.north_raw("POST", "/iot/groups", LAB, "application/json", "{\"groups\": [{\"apikey\": }").await;
    assert_eq!((s, b["name"].as_str()), (400, Some("WRONG_SYNTAX")));
    let (s, b) = g.north_raw("POST", "/iot/devices", LAB, "text/plain", "device").await;
    assert_eq!((s, b["name"].as_str()), (400, Some("WRONG_SYNTAX")));
    // Too large, wrong method, wrong path: JSON errors too.
    let big = format!("{{\"devices\": [{}]}}", vec!["{\"device_id\": \"x\"}"; 60_000].join(","));
    let (s, b) = g.north_raw("POST", "/iot/devices", LAB, "application/json", &big).await;
    assert_eq!((s, b["name"].as_str()), (413, Some("PayloadTooLargeError")));
    let (s, b) = g.north("PATCH", "/iot/devices", Some(LAB), None).await;
    assert_eq!((s, b["name"].as_str()), (405, Some("METHOD_NOT_ALLOWED")));
    let (s, b) = g.north("GET", "/iot/nothing", Some(LAB), None).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("NOT_FOUND")));
    let (s, b) = g.south_get("/iot/json/attrs/t").await;
    assert_eq!((s, b["name"].as_str()), (405, Some("METHOD_NOT_ALLOWED")));

    // Devices.
    let (s, b) = g.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": dev1()}))).await;
    assert_eq!((s, b), (201, json!({})));
    let (s, b) = g.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": dev1()}))).await;
    assert_eq!((s, b["name"].as_str()), (409, Some("DUPLICATE_DEVICE_ID")));
    let (s, b) = g.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": [{"entity_type": "x"}]}))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("MISSING_ATTRIBUTES")));
    let (s, b) = g.north("POST", "/iot/devices", Some(LAB), Some(json!([{"device_id": "x"}]))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("WRONG_SYNTAX")), "no devices wrapper");
    let more: Vec<Value> = (2..=5).map(|i| json!({"device_id": format!("dev{i}")})).collect();
    let (s, _) = g.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": more}))).await;
    assert_eq!(s, 201);
    let (s, b) = g.north("GET", "/iot/devices?limit=2&offset=1", Some(LAB), None).await;
    assert_eq!((s, b["count"].as_u64()), (200, Some(5)));
    let ids: Vec<&str> = b["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["dev2", "dev3"]);
    let (s, b) = g.north("GET", "/iot/devices/dev1", Some(LAB), None).await;
    assert_eq!((s, b["attributes"][0]["object_id"].as_str()), (200, Some("t")));
    assert_eq!((b["service"].as_str(), b["service_path"].as_str()), (Some("lab"), Some("/rig1")));
    let (s, b) = g.north("GET", "/iot/devices/nope", Some(LAB), None).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("DEVICE_NOT_FOUND")));
    let (s, _) = g.north("PUT", "/iot/devices/dev2", Some(LAB), Some(json!({"entity_type": "Meter"}))).await;
    assert_eq!(s, 204);
    let (_, b) = g.north("GET", "/iot/devices/dev2", Some(LAB), None).await;
    assert_eq!(b["entity_type"], "Meter");
    let (s, b) = g.north("PUT", "/iot/devices/dev2", Some(LAB), Some(json!({"device_id": "dev9"}))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("BAD_REQUEST")));
    let (s, _) = g.north("DELETE", "/iot/devices/dev2", Some(LAB), None).await;
    assert_eq!(s, 204);
    let (s, b) = g.north("DELETE", "/iot/devices/dev2", Some(LAB), None).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("DEVICE_NOT_FOUND")));
    let op = json!({"devices": [{"deviceId": "dev3", "apikey": k}, {"deviceId": "dev4", "apikey": k}]});
    let (s, _) = g.north("POST", "/iot/op/delete", Some(LAB), Some(op)).await;
    assert_eq!(s, 204);
    let op = json!({"devices": [{"deviceId": "dev5", "apikey": k}, {"deviceId": "ghost", "apikey": k}]});
    let (s, b) = g.north("POST", "/iot/op/delete", Some(LAB), Some(op)).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("DEVICE_NOT_FOUND")));
    let (_, b) = g.north("GET", "/iot/devices", Some(LAB), None).await;
    assert_eq!(b["count"], 1, "dev5 deleted although ghost was missing: {b}");
    let (s, _) = g.north("DELETE", &q, Some(LAB), None).await;
    assert_eq!(s, 204);
    let (_, b) = g.north("GET", "/iot/groups", Some(LAB), None).await;
    assert_eq!(b["count"], 0);

    // About, log level, metrics.
    let (s, b) = g.north("GET", "/iot/about", None, None).await;
    assert_eq!(s, 200);
    assert!(b["version"].is_string() && b["libVersion"].is_string() && b["baseRoot"] == "/");
    assert_eq!(g.north("GET", "/admin/log", None, None).await, (200, json!({"level": "INFO"})));
    assert_eq!(g.north("PUT", "/admin/log?level=DEBUG", None, None).await.0, 200);
    assert_eq!(g.north("GET", "/admin/log", None, None).await.1, json!({"level": "DEBUG"}));
    // Not a stored string: the live filter of the agent's code changed.
    assert_eq!(busbar::telemetry::target_level("busbar::iot").as_deref(), Some("debug"));
    assert!(tracing::enabled!(target: "busbar::iot", tracing::Level::DEBUG));
    assert_eq!(g.north("PUT", "/admin/log?level=WARNING", None, None).await.0, 200);
    assert_eq!(busbar::telemetry::target_level("busbar::iot").as_deref(), Some("warn"));
    assert_eq!(
        g.north("PUT", "/admin/log?level=bogus", None, None).await,
        (400, json!({"error": "invalid log level"}))
    );
    assert_eq!(g.north("PUT", "/admin/log", None, None).await, (400, json!({"error": "log level missing"})));
    let (s, b) = g.north("GET", "/metrics", None, None).await;
    assert_eq!(s, 200);
    let text = b.as_str().unwrap();
    assert!(text.contains("devices 1") && text.contains("# EOF"), "{text}");
    for gauge in ["mqttConnected", "federationConnected"] {
        let v = text.lines().find_map(|l| l.strip_prefix(gauge)?.strip_prefix(' '));
        assert!(matches!(v, Some("0" | "1")), "{gauge} missing: {text}");
    }
    // The daemon's registry has the same families for every gateway.
    let daemon = d.shared.env.metrics.render();
    let labelled = format!("busbar_gateway_devices{{gateway=\"{}\"}} 1", gw.uuid);
    assert!(daemon.contains(&labelled), "{labelled} missing:\n{daemon}");
    let north = r#"busbar_http_requests_total{server="north",route="/admin/log",method="PUT",status="400"} 2"#;
    assert!(daemon.contains(north), "{north} missing:\n{daemon}");
    drop(c);
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_http_measure_becomes_the_exact_device_data_message_and_updates_the_device_ic() {
    let gw = Gw::new();
    let (d, g, c, mut l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let uuid = device_uuid(&Tenant { service: "lab".into(), servicepath: "/rig1".into() }, "dev1");
    // The device announces itself as an equipment component.
    let st = state_of(&mut l, uuid, "running").await;
    assert_eq!(st["properties"]["category"], "equipment");
    assert_eq!(st["properties"]["type"], "Sensor");
    assert_eq!(st["status"]["managed_by"], gw.uuid.to_string());

    let (s, b) = g.measure(&k, "dev1", json!({"t": 21.5, "h": 40})).await;
    assert_eq!((s, b), (200, json!({})));
    let m = data.next().await;
    assert_eq!(m.key, format!("{}.lab.Sensor.dev1", gw.env.realm));
    let ts = m.body["metadata"]["timestamp"].as_i64().unwrap();
    assert_eq!(
        m.body,
        json!({"metadata": {"deviceid": "dev1", "tenant": "lab", "timestamp": ts, "service": "lab",
            "servicepath": "/rig1", "entity_name": "urn:lab:Sensor:dev1", "entity_type": "Sensor",
            "gateway": gw.uuid.to_string(),
            "types": {"temperature": "Number", "h": "Text", "lab": "Text", "room": "Text"}},
            "attrs": {"temperature": 21.5, "h": 40, "lab": "L1", "room": "B12"}})
    );
    let now = jiff::Timestamp::now().as_millisecond();
    assert!((now - ts).abs() < 10_000, "server time");
    let st = ping_status(&c, &mut l, uuid, |v| v["status"]["attributes"]["temperature"].is_object()).await;
    assert_eq!(st["status"]["attributes"]["temperature"]["value"], 21.5);
    assert_eq!(st["status"]["attributes"]["temperature"]["type"], "Number");
    assert!(st["status"]["attributes"]["temperature"]["time"].is_string());
    // The HTTP API serves the same envelope for the device's uuid.
    let get = |uuid: String| {
        let req = axum::http::Request::get(format!("/api/v1/component/{uuid}")).body(axum::body::Body::empty());
        let app = busbar::api::app(d.shared.clone());
        async move {
            let r = tower::ServiceExt::oneshot(app, req.unwrap()).await.unwrap();
            let code = r.status().as_u16();
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            (code, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    let (code, api) = get(uuid.to_string()).await;
    assert_eq!(code, 200, "{api}");
    for pointer in ["/properties", "/status/state", "/status/managed_by", "/status/attributes/temperature/value"] {
        assert_eq!(api.pointer(pointer), st.pointer(pointer), "{pointer}: {api}");
    }
    assert_eq!(get(uuid::Uuid::new_v4().to_string()).await.0, 404, "an unknown uuid is no device");
    // The gateway counts it.
    let gst = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    assert_eq!(gst["status"]["counters"]["measures_in"]["http"], 1);
    assert_eq!(gst["status"]["counters"]["devices"], 1);
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn mqtt_and_amqp_measures_reach_the_federation_in_every_topic_form() {
    let id = TestEnv::new().id.clone();
    let gw = Gw::with(json!({"amqp_south_exchange": format!("south-{id}"), "amqp_south_queue": format!("q-{id}")}));
    let south_exchange = gw.extra["amqp_south_exchange"].as_str().unwrap().to_owned();
    let (d, g, _c, _l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let mqtt = Mqtt::connect(1883).await;
    for (i, topic) in [format!("json/{k}/dev1/attrs"), format!("{k}/dev1/attrs")].iter().enumerate() {
        mqtt.publish(&gw.topic(topic), json!({"t": i}).to_string(), 1).await;
        let m = data.next().await;
        assert_eq!(m.body["attrs"]["temperature"], i, "{topic}");
        assert_eq!(m.body["metadata"]["deviceid"], "dev1");
    }
    // A single attribute: JSON if it parses, text otherwise.
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs/t")), "34", 1).await;
    assert_eq!(data.next().await.body["attrs"]["temperature"], 34);
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs/blob")), "hello", 1).await;
    assert_eq!(data.next().await.body["attrs"]["blob"], "hello");
    // Not JSON on the attrs topic: dropped and counted, the client keeps going.
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), "{\"t\": }", 1).await;
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), "42", 1).await;
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), json!({"t": 99}).to_string(), 1).await;
    assert_eq!(data.next().await.body["attrs"]["temperature"], 99);

    // AMQP southbound.
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    // The gateway declares the exchange when it connects. (A failed
    // passive declare closes the channel: each try opens its own.)
    eventually(WAIT, "the AMQP southbound declares its exchange", async || {
        let ch = conn.create_channel().await.unwrap();
        let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
        let kind = lapin::ExchangeKind::Topic;
        ch.exchange_declare(south_exchange.as_str().into(), kind, passive, Default::default()).await.ok()
    })
    .await;
    let ch = conn.create_channel().await.unwrap();
    let publish = |key: String, body: String| {
        let ch = ch.clone();
        let ex = south_exchange.clone();
        async move {
            ch.basic_publish(
                ex.as_str().into(),
                key.as_str().into(),
                Default::default(),
                body.as_bytes(),
                Default::default(),
            )
            .await
            .unwrap();
        }
    };
    publish(format!(".{k}.dev1.attrs"), json!({"t": 7}).to_string()).await;
    assert_eq!(data.next().await.body["attrs"]["temperature"], 7);
    publish(format!(".{k}.dev1.attrs.h"), "55".into()).await;
    assert_eq!(data.next().await.body["attrs"]["h"], 55);
    let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    let counters = &st["status"]["counters"];
    assert_eq!(counters["measures_in"]["mqtt"], 5, "{counters}");
    assert_eq!(counters["measures_in"]["amqp"], 2, "{counters}");
    assert_eq!(counters["errors"]["bad_payload"], 2, "{counters}");
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.exchange_delete(south_exchange.as_str().into(), Default::default()).await;
    let _ = ch.queue_delete(format!("q-{}", &south_exchange[6..]).as_str().into(), Default::default()).await;
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_mapping_rules_aliases_statics_explicit_attrs_multimeasures_time_and_autoprovision() {
    let gw = Gw::new();
    let (d, g, _c, _l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let closed = format!("c{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let locked = json!({"resource": "/iot/json", "apikey": closed, "entity_type": "Locked", "autoprovision": false,
        "explicitAttrs": true, "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}]});
    g.provision(LAB, locked, json!([{"device_id": "strict"}])).await;

    // id/type renamed, null dropped, unknown typed Text, statics merged.
    g.measure(&k, "dev1", json!({"id": "spoof", "type": "Spoof", "t": 1, "n": null})).await;
    let m = data.next().await.body;
    assert_eq!(
        m["attrs"],
        json!({"measure_id": "spoof", "measure_type": "Spoof", "temperature": 1, "lab": "L1", "room": "B12"})
    );
    assert_eq!(m["metadata"]["types"]["measure_id"], "Text");
    // explicitAttrs (from the group): only provisioned attributes.
    let (s, _) = g.measure(&closed, "strict", json!({"t": 20, "junk": 1})).await;
    assert_eq!(s, 200);
    assert_eq!(data.next().await.body["attrs"], json!({"temperature": 20}));
    // Multimeasure: in order, each with its own time.
    let body =
        json!([{"t": 1, "TimeInstant": "2024-04-10T10:15:00Z"}, {"t": 2, "TimeInstant": "2024-04-10T10:05:00Z"}]);
    g.measure(&k, "dev1", body).await;
    let (a, b) = (data.next().await.body, data.next().await.body);
    assert_eq!((a["attrs"]["temperature"].clone(), b["attrs"]["temperature"].clone()), (json!(1), json!(2)));
    assert_eq!(a["metadata"]["timestamp"], 1_712_744_100_000_i64);
    assert_eq!(b["metadata"]["timestamp"], 1_712_743_500_000_i64);
    // t= sets the time.
    let (s, _) = g
        .south_raw(&format!("/iot/json?k={k}&i=dev1&t=2020-02-22T22:22:22Z"), "application/json", b"{\"t\":3}".to_vec())
        .await;
    assert_eq!(s, 200);
    assert_eq!(data.next().await.body["metadata"]["timestamp"], 1_582_410_142_000_i64);
    // GET with d=, and the single-attribute POST in every content type.
    let (s, _) = g.south_get(&format!("/iot/json?k={k}&i=dev1&d=%7B%22t%22%3A4%7D")).await;
    assert_eq!(s, 200);
    assert_eq!(data.next().await.body["attrs"]["temperature"], 4);
    let attr = |a: &str| format!("/iot/json/attrs/{a}?k={k}&i=dev1");
    assert_eq!(g.south_raw(&attr("t"), "application/json", b"5".to_vec()).await.0, 200);
    assert_eq!(data.next().await.body["attrs"]["temperature"], 5);
    assert_eq!(g.south_raw(&attr("note"), "text/plain", b"22.5".to_vec()).await.0, 200);
    assert_eq!(data.next().await.body["attrs"]["note"], "22.5");
    assert_eq!(g.south_raw(&attr("blob"), "application/octet-stream", b"hello".to_vec()).await.0, 200);
    assert_eq!(data.next().await.body["attrs"]["blob"], "68656c6c6f");
    let (s, b) = g.south_raw(&attr("x"), "application/xml", b"<a/>".to_vec()).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("UNSUPPORTED_TYPE")));
    // Autoprovisioning: on by default (entity type:id), off gives DEVICE_NOT_FOUND.
    let (s, _) = g.measure(&k, "auto7", json!({"t": 5, "x": "extra"})).await;
    assert_eq!(s, 200);
    let m = data.next().await.body;
    assert_eq!(m["metadata"]["entity_name"], "Sensor:auto7");
    assert_eq!(m["attrs"], json!({"t": 5, "x": "extra", "lab": "L1"}));
    let (s, b) = g.north("GET", "/iot/devices/auto7", Some(LAB), None).await;
    assert_eq!((s, b["device_id"].as_str()), (200, Some("auto7")));
    let (s, b) = g.measure(&closed, "ghost", json!({"t": 1})).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("DEVICE_NOT_FOUND")));
    // Errors of the south API.
    let (s, b) = g.measure("nokey", "dev1", json!({"t": 1})).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("DEVICE_GROUP_NOT_FOUND")));
    let (s, b) = g.south_raw("/iot/json?i=dev1", "application/json", b"{}".to_vec()).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("MANDATORY_PARAMS_NOT_FOUND")));
    let (s, b) = g.south_raw(&format!("/iot/json?k={k}&i=dev1"), "application/json", b"{\"t\": }".to_vec()).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("BAD_PAYLOAD")));
    let (s, b) = g.measure(&k, "dev1", json!({"t": 1, "TimeInstant": "yesterday"})).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("BAD_TIMESTAMP")));
    let big = vec![b' '; 2 << 20];
    let (s, b) = g.south_raw(&format!("/iot/json?k={k}&i=dev1"), "application/json", big).await;
    assert_eq!((s, b["name"].as_str()), (413, Some("PayloadTooLargeError")));
    data.quiet(Duration::from_millis(200)).await;
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_upstream_bugs_do_not_happen() {
    let gw = Gw::new();
    let (d, g, _c, _l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    // A scalar or {} is refused, never an attribute named "undefined".
    for body in [json!(42), json!({}), json!([]), json!([1])] {
        let (s, b) = g.measure(&k, "dev1", body.clone()).await;
        assert_eq!((s, b["name"].as_str()), (400, Some("BAD_PAYLOAD")), "{body}");
    }
    // A one-element array is one measure, never an attribute "0" (MQTT too).
    let mqtt = Mqtt::connect(1883).await;
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), "[{\"t\":3}]", 1).await;
    let m = data.next().await.body;
    assert_eq!(m["attrs"]["temperature"], 3);
    assert!(m["attrs"].get("0").is_none() && m["attrs"].get("undefined").is_none(), "{m}");
    // An attribute may not be provisioned as "undefined" or "0" either.
    let bad = json!({"devices": [{"device_id": "x", "attributes": [{"name": "undefined", "type": "Text"}]}]});
    assert_eq!(g.north("POST", "/iot/devices", Some(LAB), Some(bad)).await.0, 400);
    // No default apikey reaches across tenants: another tenant's key with
    // this tenant's device id creates a device in *that* tenant.
    let other = ("other", "/");
    let k2 = format!("o{}", gw.env.id);
    g.provision(other, group(&k2), Value::Null).await;
    g.measure(&k2, "dev1", json!({"t": 100})).await;
    let m = data.next().await.body;
    assert_eq!(
        (m["metadata"]["service"].as_str(), m["metadata"]["entity_name"].as_str()),
        (Some("other"), Some("Sensor:dev1"))
    );
    let (_, b) = g.north("GET", "/iot/devices/dev1", Some(LAB), None).await;
    assert_eq!(b["entity_name"], "urn:lab:Sensor:dev1", "tenant lab's device untouched");
    // The MQTT client reconnects after the broker drops it, and re-subscribes.
    let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    assert_eq!(st["status"]["mqtt_connected"], true);
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_mqtt_password_is_never_published() {
    let gw = Gw::with(json!({"mqtt_url": "mqtt://lab:s3cret@127.0.0.1:1883"}));
    let (d, _g, c, mut l, data) = gw.up().await;
    let st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
    assert_eq!(st["properties"]["mqtt_url"], "mqtt://lab:***@127.0.0.1:1883");
    assert!(!st.to_string().contains("s3cret"));
    assert_eq!(st["status"]["mqtt_connected"], true);
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn stopped_gateways_refuse_south_traffic_and_start_takes_it_again() {
    let gw = Gw::new();
    let (d, g, c, mut l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    c.publish(to_uuid(gw.uuid), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, gw.uuid, "idle").await;
    let (s, b) = g.measure(&k, "dev1", json!({"t": 1})).await;
    assert_eq!((s, b["name"].as_str()), (503, Some("GATEWAY_STOPPED")));
    let mqtt = Mqtt::connect(1883).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), "{\"t\":2}", 1).await;
    data.quiet(Duration::from_millis(300)).await;
    // The MQTT measure never reached the gateway (it unsubscribed): only the
    // HTTP one was refused. Were it still subscribed, the MQTT measure would
    // arrive and be refused too, and this count would be 2.
    let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    let refused = st.pointer("/status/counters/errors/gateway_stopped").and_then(Value::as_u64);
    assert_eq!(refused, Some(1), "{st}");
    // Provisioning still works while stopped.
    assert_eq!(g.north("GET", "/iot/devices/dev1", Some(LAB), None).await.0, 200);
    c.publish(to_uuid(gw.uuid), &action("start", json!({})), None).await.unwrap();
    state_of(&mut l, gw.uuid, "running").await;
    assert_eq!(g.measure(&k, "dev1", json!({"t": 3})).await.0, 200);
    assert_eq!(data.next().await.body["attrs"]["temperature"], 3);
    // MQTT is subscribed again.
    let m = eventually(WAIT, "MQTT resubscribed", async || {
        mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), "{\"t\":4}", 1).await;
        data.next_within(Duration::from_millis(300)).await
    })
    .await;
    assert_eq!(m.body["attrs"]["temperature"], 4);
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn an_mqtt_broker_restart_mid_stream_loses_no_qos1_measure() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let gw = Gw::with(json!({"mqtt_url": format!("mqtt://127.0.0.1:{}", broker.port)}));
    let (d, g, _c, _l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let mqtt = Mqtt::connect(broker.port).await;
    let topic = gw.topic(&format!("json/{k}/dev1/attrs"));
    const N: u64 = 300;
    for seq in 0..N {
        if seq == N / 2 {
            broker.stop();
            broker.restart();
        }
        mqtt.publish(&topic, json!({"seq": seq}).to_string(), 1).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while (seen.len() as u64) < N {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let Some(m) = data.next_within(left).await else {
            let missing: Vec<u64> = (0..N).filter(|s| !seen.contains(s)).collect();
            panic!("lost {} measures: {:?}", missing.len(), &missing[..missing.len().min(20)]);
        };
        seen.insert(m.body["attrs"]["seq"].as_u64().unwrap());
    }
    let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    assert!(st["status"]["counters"]["errors"]["mqtt_disconnect"].as_u64() >= Some(1), "{st}");
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn gateways_in_a_shared_subscription_group_split_the_measures() {
    let gw = Gw::with(json!({"mqtt_shared_group": "split"}));
    let second = uuid::Uuid::new_v4();
    let mut config = gw.config_value();
    let mut other = gw.component();
    other["uuid"] = json!(second);
    other["name"] = json!("Second");
    config["components"].as_array_mut().unwrap().push(other);
    let mut data = Data::bind(&gw.data).await;
    let d = gw.env.start_with(gw.env.config_of(&config)).await;
    let (a, b) = (Gateway::of(&d, gw.uuid).await, Gateway::of(&d, second).await);
    let k = format!("k{}", gw.env.id);
    // The same group and device in both (each gateway has its own registry).
    a.provision(LAB, group(&k), dev1()).await;
    b.provision(LAB, group(&k), dev1()).await;
    let mqtt = Mqtt::connect(1883).await;
    const N: u64 = 100;
    for seq in 0..N {
        mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), json!({"seq": seq}).to_string(), 1).await;
    }
    let mut by_gateway = std::collections::HashMap::<String, u64>::new();
    for _ in 0..N {
        let m = data.next().await;
        *by_gateway.entry(m.body["metadata"]["gateway"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    data.quiet(Duration::from_millis(300)).await;
    assert_eq!(by_gateway.values().sum::<u64>(), N, "each measure once");
    assert_eq!(by_gateway.len(), 2, "both gateways took a share: {by_gateway:?}");
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn measures_wait_while_the_federation_broker_is_gone_and_arrive_in_order() {
    if !admin_or_skip("measures_wait_while_the_federation_broker_is_gone_and_arrive_in_order") {
        return;
    }
    let gw = Gw::new();
    let user = BrokerUser::new(&gw.env.id);
    let mut config = gw.config();
    config.broker.url = user.url(&config.broker.url);
    let mut data = Data::bind(&gw.data).await;
    let d = gw.env.start_with(config).await;
    let g = Gateway::of(&d, gw.uuid).await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let status =
        || async { d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap()["status"].clone() };
    for seq in 0..20 {
        assert_eq!(g.measure(&k, "dev1", json!({"seq": seq})).await.0, 200);
    }
    // Keep the broker from taking the publisher back, then drop its connection.
    user.refuse();
    close_connections(&format!("busbar federation gateway={}", gw.uuid));
    eventually(WAIT, "the publisher notices", async || (status().await["federation_connected"] == false).then_some(()))
        .await;
    for seq in 20..120 {
        assert_eq!(g.measure(&k, "dev1", json!({"seq": seq})).await.0, 200, "accepted while the broker is gone");
    }
    // Taken into the publisher's buffer on its own thread.
    eventually(WAIT, "100 measures buffered", async || {
        (status().await["counters"]["buffered"].as_u64().unwrap() >= 100).then_some(())
    })
    .await;
    user.admit();
    let mut order = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(0..120).all(|s| order.contains(&s)) {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let m = data.next_within(left).await.expect("every measure arrives");
        let seq = m.body["attrs"]["seq"].as_u64().unwrap();
        if !order.contains(&seq) {
            order.push(seq);
        }
    }
    assert_eq!(order, (0..120).collect::<Vec<u64>>(), "in order");
    let st = status().await;
    assert_eq!(st["counters"]["dropped"], 0);
    assert_eq!(st["counters"]["buffered"], 0);
    d.stop().await.unwrap();
    data.close().await;
}

#[tokio::test]
async fn a_full_buffer_drops_the_oldest_and_counts_them() {
    if !admin_or_skip("a_full_buffer_drops_the_oldest_and_counts_them") {
        return;
    }
    let gw = Gw::with(json!({"buffer": 10}));
    let user = BrokerUser::new(&gw.env.id);
    let mut config = gw.config();
    config.broker.url = user.url(&config.broker.url);
    let mut data = Data::bind(&gw.data).await;
    let d = gw.env.start_with(config).await;
    let g = Gateway::of(&d, gw.uuid).await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    user.refuse();
    close_connections(&format!("busbar federation gateway={}", gw.uuid));
    let status =
        || async { d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap()["status"].clone() };
    eventually(WAIT, "the publisher notices", async || (status().await["federation_connected"] == false).then_some(()))
        .await;
    for seq in 0..25 {
        assert_eq!(g.measure(&k, "dev1", json!({"seq": seq})).await.0, 200);
    }
    // The publisher takes the accepted measures into its buffer on its own
    // thread: wait for it to have seen all 25.
    let counts = || async {
        let st = status().await;
        (st["counters"]["buffered"].as_u64(), st["counters"]["dropped"].as_u64())
    };
    eventually(WAIT, "15 measures dropped", async || (counts().await.1 >= Some(15)).then_some(())).await;
    assert_eq!(counts().await, (Some(10), Some(15)));
    user.admit();
    let mut got = Vec::new();
    while got.len() < 10 {
        got.push(data.next().await.body["attrs"]["seq"].as_u64().unwrap());
    }
    assert_eq!(got, (15..25).collect::<Vec<u64>>(), "the newest ten, in order");
    d.stop().await.unwrap();
    data.close().await;
}

#[tokio::test]
async fn tenants_are_isolated_north_south_in_the_federation_and_as_device_ics() {
    let gw = Gw::new();
    let (d, g, c, mut l, mut data) = gw.up().await;
    let (a, b) = (("alpha", "/site"), ("beta", "/site"));
    let (ka, kb) = (format!("a{}", gw.env.id), format!("b{}", gw.env.id));
    g.provision(a, group(&ka), json!([{"device_id": "shared-id"}, {"device_id": "only-a"}])).await;
    g.provision(b, group(&kb), json!([{"device_id": "shared-id"}])).await;
    // North: each tenant sees, reads, changes and deletes only its own.
    let (_, la) = g.north("GET", "/iot/devices", Some(a), None).await;
    let (_, lb) = g.north("GET", "/iot/devices", Some(b), None).await;
    assert_eq!((la["count"].as_u64(), lb["count"].as_u64()), (Some(2), Some(1)));
    assert_eq!(g.north("GET", "/iot/devices/only-a", Some(b), None).await.0, 404);
    assert_eq!(g.north("PUT", "/iot/devices/only-a", Some(b), Some(json!({"entity_type": "X"}))).await.0, 404);
    assert_eq!(g.north("DELETE", "/iot/devices/only-a", Some(b), None).await.0, 404);
    let (_, ga) = g.north("GET", "/iot/groups", Some(a), None).await;
    assert_eq!(ga["count"], 1);
    let q = format!("/iot/groups?resource=/iot/json&apikey={ka}");
    assert_eq!(g.north("DELETE", &q, Some(b), None).await.0, 403);
    // Another servicepath of the same service is another tenant; `/*` reads all of a service.
    assert_eq!(g.north("GET", "/iot/devices/only-a", Some(("alpha", "/other")), None).await.0, 404);
    let (_, all) = g.north("GET", "/iot/devices", Some(("alpha", "/*")), None).await;
    assert_eq!(all["count"], 2);
    // An apikey is one tenant's: beta cannot reuse alpha's.
    let (s, _) = g.north("POST", "/iot/groups", Some(b), Some(json!({"groups": [group(&ka)]}))).await;
    assert_eq!(s, 409);
    let dev = json!({"devices": [{"device_id": "sneaky", "apikey": ka}]});
    assert_eq!(g.north("POST", "/iot/devices", Some(b), Some(dev)).await.0, 403);
    // South: alpha's key writes alpha's device, beta's key beta's, never across.
    g.measure(&ka, "shared-id", json!({"v": 1})).await;
    let m = data.next().await;
    assert_eq!(m.body["metadata"]["service"], "alpha");
    assert_eq!(m.key, format!("{}.alpha.Sensor.shared-id", gw.env.realm));
    g.measure(&kb, "shared-id", json!({"v": 2})).await;
    let m = data.next().await;
    assert_eq!(m.body["metadata"]["service"], "beta");
    assert_eq!(m.key, format!("{}.beta.Sensor.shared-id", gw.env.realm));
    // beta's key and alpha's device id: a new beta device, not alpha's.
    g.measure(&kb, "only-a", json!({"v": 3})).await;
    assert_eq!(data.next().await.body["metadata"]["service"], "beta");
    let (_, la) = g.north("GET", "/iot/devices", Some(a), None).await;
    assert_eq!(la["count"], 2, "alpha unchanged");
    // Device ICs: one per tenant, with its own uuid and last values.
    let ua = device_uuid(&Tenant { service: "alpha".into(), servicepath: "/site".into() }, "shared-id");
    let ub = device_uuid(&Tenant { service: "beta".into(), servicepath: "/site".into() }, "shared-id");
    assert_ne!(ua, ub);
    let has_v = |v: &Value| v["status"]["attributes"]["v"].is_object();
    let sa = ping_status(&c, &mut l, ua, has_v).await;
    let sb = ping_status(&c, &mut l, ub, has_v).await;
    assert_eq!(
        (sa["properties"]["service"].as_str(), sb["properties"]["service"].as_str()),
        (Some("alpha"), Some("beta"))
    );
    assert_eq!(
        (sa["status"]["attributes"]["v"]["value"].clone(), sb["status"]["attributes"]["v"]["value"].clone()),
        (json!(1), json!(2))
    );
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_deleted_device_goes_gone_once() {
    let gw = Gw::new();
    let (d, g, _c, mut l, data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let uuid = device_uuid(&Tenant { service: "lab".into(), servicepath: "/rig1".into() }, "dev1");
    state_of(&mut l, uuid, "running").await;
    // Pings by type and by category reach the device.
    let (c, _) = (gw.env.client().await, ());
    for filter in [
        busbar::protocol::Filter { kind: Some("Sensor".into()), ..Default::default() },
        busbar::protocol::Filter { category: Some("equipment".into()), ..Default::default() },
    ] {
        c.publish(filter.action_headers(), &action("ping", json!({})), None).await.unwrap();
        state_of(&mut l, uuid, "running").await;
    }
    assert_eq!(g.north("DELETE", "/iot/devices/dev1", Some(LAB), None).await.0, 204);
    let st = state_of(&mut l, uuid, "gone").await;
    assert_eq!(st["properties"]["category"], "equipment");
    let later = collect_for(&mut l, Duration::from_millis(300)).await;
    assert!(!later.iter().any(|s| s.payload["properties"]["uuid"] == uuid.to_string()), "gone only once");
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn dojot_topics_feed_provisioned_devices_when_enabled() {
    let gw = Gw::with(json!({"dojot": true}));
    let (d, g, _c, _l, mut data) = gw.up().await;
    let tenant = format!("admin{}", gw.env.id);
    g.provision((tenant.as_str(), "/"), Value::Null, json!([{"device_id": "a1998e", "entity_type": "Sensor"}])).await;
    let mqtt = Mqtt::connect(1883).await;
    // VerneMQ form, then Mosca form.
    mqtt.publish(&gw.topic(&format!("{tenant}:a1998e/attrs")), "{\"attr_example\": 10}", 1).await;
    let m = data.next().await.body;
    assert_eq!(
        (m["metadata"]["tenant"].as_str(), m["metadata"]["deviceid"].as_str()),
        (Some(tenant.as_str()), Some("a1998e"))
    );
    assert_eq!(m["attrs"]["attr_example"], 10);
    mqtt.publish(&gw.topic(&format!("{tenant}/a1998e/attrs")), "{\"attr_example\": 11}", 1).await;
    assert_eq!(data.next().await.body["attrs"]["attr_example"], 11);
    // No autoprovisioning for dojot: an unknown device is dropped and counted.
    mqtt.publish(&gw.topic(&format!("{tenant}:ffff/attrs")), "{\"x\": 1}", 1).await;
    data.quiet(Duration::from_millis(300)).await;
    let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    assert_eq!(st["status"]["counters"]["errors"]["device_not_found"], 1, "{st}");
    data.close().await;
    d.stop().await.unwrap();
}

/// FIWARE's "IoT Agent JSON" tutorial (reference §4.1), ports adjusted:
/// about, a service group, a device, a measure over HTTP and over MQTT.
#[tokio::test]
async fn the_fiware_tutorial_sequence_works_as_written() {
    let mut gw = Gw::new();
    gw.prefix = String::new();
    let (d, g, _c, _l, mut data) = gw.up().await;
    let openiot = ("openiot", "/");
    let (s, about) = g.north("GET", "/iot/about", None, None).await;
    assert_eq!(s, 200, "{about}");
    let apikey = "4jggokgpepnvsb2uv4s40d59ov";
    let (s, _) = g
        .north(
            "POST",
            "/iot/services",
            Some(openiot),
            Some(json!({"services": [{"apikey": apikey, "cbroker": "http://orion:1026", "entity_type": "Thing", "resource": "/iot/json"}]})),
        )
        .await;
    assert_eq!(s, 201);
    let motion = json!({"devices": [{
        "device_id": "motion001", "entity_name": "urn:ngsi-ld:Motion:001", "entity_type": "Motion",
        "timezone": "Europe/Berlin",
        "attributes": [{"object_id": "c", "name": "count", "type": "Integer"}],
        "static_attributes": [{"name": "refStore", "type": "Relationship", "value": "urn:ngsi-ld:Store:001"}]}]});
    assert_eq!(g.north("POST", "/iot/devices", Some(openiot), Some(motion)).await.0, 201);
    let (s, _) = g.measure(apikey, "motion001", json!({"c": "1"})).await;
    assert_eq!(s, 200);
    let m = data.next().await;
    assert_eq!(m.body["attrs"], json!({"count": "1", "refStore": "urn:ngsi-ld:Store:001"}));
    assert_eq!(m.body["metadata"]["types"]["count"], "Integer");
    assert_eq!(m.body["metadata"]["entity_name"], "urn:ngsi-ld:Motion:001");
    assert!(m.body["metadata"]["timestamp"].is_i64());
    // The same over MQTT, on the iotagent-json topic.
    let mqtt = Mqtt::connect(1883).await;
    mqtt.publish(&format!("/json/{apikey}/motion001/attrs"), "{\"c\": 1}", 0).await;
    let m = data.next().await;
    assert_eq!(m.body["attrs"]["count"], 1);
    assert_eq!(m.key, format!("{}.openiot.Motion.motion001", gw.env.realm));
    data.close().await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_gateway_that_cannot_listen_is_an_error_until_reset_after_the_port_is_free() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let gw = Gw::with(json!({"north_bind": format!("127.0.0.1:{port}")}));
    let data = Data::bind(&gw.data).await;
    let (d, c, mut l) = gw.env.up_with(gw.config()).await;
    let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
    assert_eq!(st["status"]["state"], "error", "{st}");
    assert!(
        st["status"]["error"]["msg"].as_str().unwrap().contains(&format!("Cannot listen on 127.0.0.1:{port}")),
        "{st}"
    );
    // The daemon and its other components carry on.
    c.publish(to_uuid(gw.env.dummy), &action("ping", json!({})), None).await.unwrap();
    state_of(&mut l, gw.env.dummy, "idle").await;
    drop(taken);
    c.publish(to_uuid(gw.uuid), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, gw.uuid, "idle").await;
    c.publish(to_uuid(gw.uuid), &action("start", json!({})), None).await.unwrap();
    state_of(&mut l, gw.uuid, "running").await;
    let g = Gateway::of(&d, gw.uuid).await;
    assert_eq!(g.north("GET", "/iot/about", None, None).await.0, 200);
    d.stop().await.unwrap();
    data.close().await;
}

/// Every operation of `schemas/iot-agent.openapi.yaml` is served (none
/// reaches the router's 404/405 fallbacks).
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let gw = Gw::new();
    let (d, g, _c, _l, data) = gw.up().await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/iot-agent.openapi.yaml");
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut seen = 0;
    for (p, ops) in doc["paths"].as_object().unwrap() {
        let concrete = p.replace("{id}", "x").replace("{attr}", "t");
        for method in ["get", "post", "put", "delete"] {
            if ops.get(method).is_none() {
                continue;
            }
            let m = method.to_uppercase();
            let (s, b) = if p.starts_with("/iot/json") {
                let base = g.south.trim_end_matches("/iot/json");
                let r = reqwest::Client::new()
                    .request(m.parse().unwrap(), format!("{base}{concrete}"))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
            } else {
                g.north(&m, &concrete, Some(LAB), None).await
            };
            let fallback = (s == 404 && b["name"] == "NOT_FOUND") || s == 405;
            assert!(!fallback, "{m} {p} is documented but not served: {s} {b}");
            seen += 1;
        }
    }
    assert!(seen >= 16, "{seen} operations checked");
    data.close().await;
    d.stop().await.unwrap();
}

/// `mqtts://`: the gateway takes measures from a Mosquitto TLS listener
/// whose server certificate is signed by the CA named in `mqtt_ca` (made
/// here); the test publishes on the same broker's plain listener.
#[tokio::test]
async fn measures_arrive_over_mqtt_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("server.pem"), server.pem()).unwrap();
    std::fs::write(path("server.key"), server_key.serialize_pem()).unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (plain, tls) = (free(), free());
    let conf = path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\nuser root\nlog_dest none\nlistener {plain} 127.0.0.1\nlistener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            path("ca.pem").display(),
            path("server.pem").display(),
            path("server.key").display()
        ),
    )
    .unwrap();
    let mut mosquitto = std::process::Command::new("mosquitto").arg("-c").arg(&conf).spawn().expect("mosquitto runs");
    eventually(WAIT, "mosquitto listens", async || std::net::TcpStream::connect(("127.0.0.1", tls)).ok()).await;
    let gw = Gw::with(json!({"mqtt_url": format!("mqtts://127.0.0.1:{tls}"), "mqtt_ca": path("ca.pem")}));
    // `up` waits until the gateway's MQTT is connected: over TLS.
    let (d, g, _c, _l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(LAB, group(&k), dev1()).await;
    let mqtt = Mqtt::connect(plain).await;
    mqtt.publish(&gw.topic(&format!("json/{k}/dev1/attrs")), r#"{"t": 7}"#, 1).await;
    assert_eq!(data.next().await.body["attrs"]["temperature"], 7);
    drop(mqtt);
    data.close().await;
    d.stop().await.unwrap();
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
}

/// TLS settings that cannot work (a CA file that holds no certificate) fail
/// the gateway's start with the reason, instead of leaving MQTT silently
/// off behind `running`.
#[tokio::test]
async fn a_gateway_whose_mqtt_tls_cannot_work_is_an_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let gw = Gw::with(json!({"mqtt_url": "mqtts://127.0.0.1:8883", "mqtt_ca": ca}));
    let data = Data::bind(&gw.data).await;
    let (d, c, mut l) = gw.env.up_with(gw.config()).await;
    let st = eventually(WAIT, "the gateway reports its error", async || {
        let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
        (st["status"]["state"] == "error").then_some(st)
    })
    .await;
    let msg = st["status"]["error"]["msg"].as_str().unwrap();
    assert!(msg.contains("MQTT TLS: no CA certificate to trust"), "{st}");
    // The rest of the daemon carries on.
    c.publish(to_uuid(gw.env.dummy), &action("ping", json!({})), None).await.unwrap();
    state_of(&mut l, gw.env.dummy, "idle").await;
    data.close().await;
    d.stop().await.unwrap();
}

/// A TCP relay in front of the real Mosquitto, so the test can make the
/// gateway's broker unreachable and reachable again.
struct Relay {
    tasks: tokio::task::JoinSet<()>,
}

impl Relay {
    /// A port nobody listens on yet.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Relay `port` to Mosquitto until dropped (which cuts every link).
    async fn open(port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        let (conns_tx, mut conns_rx) = tokio::sync::mpsc::unbounded_channel::<tokio::net::TcpStream>();
        tasks.spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = conns_tx.send(s);
            }
        });
        let mut relay = Relay { tasks };
        let mut links = tokio::task::JoinSet::new();
        relay.tasks.spawn(async move {
            while let Some(mut inbound) = conns_rx.recv().await {
                links.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", 1883)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        relay
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// A running gateway whose MQTT broker cannot be reached says so in its
/// state (`error`, with the URL and the reason), comes back to `running`
/// by itself when the broker answers, and falls again when it goes. A
/// stopped gateway does not need MQTT and stays `idle`.
#[tokio::test]
async fn a_gateway_whose_mqtt_broker_is_unreachable_is_in_error_until_it_answers() {
    let port = Relay::free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let gw = Gw::with(json!({"mqtt_url": url, "mqtt_grace": 0.5}));
    let data = Data::bind(&gw.data).await;
    let (d, c, mut l) = gw.env.up_with(gw.config()).await;
    let st = ping_status(&c, &mut l, gw.uuid, |v| v["status"]["state"] == "error").await;
    let msg = st["status"]["error"]["msg"].as_str().unwrap();
    assert!(msg.starts_with(&format!("Cannot reach the MQTT broker {url} (")), "{st}");
    assert!(msg.contains("returns to running by itself"), "the message says what to expect: {msg}");
    assert_eq!(st["status"]["mqtt_connected"], false, "{st}");

    // The broker becomes reachable: running again, with no error.
    let relay = Relay::open(port).await;
    let st = status_of(&mut l, gw.uuid, |v| v["status"]["state"] == "running").await;
    assert!(st["status"]["error"].is_null(), "the error is cleared: {st}");
    eventually(WAIT, "the status says MQTT is connected", async || {
        let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
        (st["status"]["mqtt_connected"] == true).then_some(())
    })
    .await;

    // It goes away again: error again, after the grace.
    drop(relay);
    let st = state_of(&mut l, gw.uuid, "error").await;
    assert!(st["status"]["error"]["msg"].as_str().unwrap().contains(&url), "{st}");

    // `reset` leaves error as for any other; the stopped gateway does not
    // need MQTT, so it stays idle while the broker is still away.
    c.publish(to_uuid(gw.uuid), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, gw.uuid, "idle").await;
    let later = status_within(&mut l, gw.uuid, Duration::from_millis(1500), |v| v["status"]["state"] != "idle").await;
    assert!(later.is_none(), "a stopped gateway does not fail for MQTT: {later:?}");

    // Started while the broker is away: running, then error after the grace.
    c.publish(to_uuid(gw.uuid), &action("start", json!({})), None).await.unwrap();
    state_of(&mut l, gw.uuid, "running").await;
    state_of(&mut l, gw.uuid, "error").await;
    data.close().await;
    d.stop().await.unwrap();
}
