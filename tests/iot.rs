//! The IoT gateway against the real Mosquitto and RabbitMQ: provisioning,
//! measures over HTTP, MQTT and AMQP into the federation, device ICs, the
//! mapping rules, tenancy, and the upstream bugs that must not happen.

mod common;

use busbar::iot::registry::device_uuid;
use busbar::iot::model::Tenant;
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
    assert_eq!(g.north("PUT", "/admin/log?level=bogus", None, None).await, (400, json!({"error": "invalid log level"})));
    assert_eq!(g.north("PUT", "/admin/log", None, None).await, (400, json!({"error": "log level missing"})));
    let (s, b) = g.north("GET", "/metrics", None, None).await;
    assert_eq!(s, 200);
    let text = b.as_str().unwrap();
    assert!(text.contains("devices 1") && text.contains("# EOF"), "{text}");
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
    let st = ping_status(&c, &mut l, uuid).await;
    assert_eq!(st["status"]["attributes"]["temperature"]["value"], 21.5);
    assert_eq!(st["status"]["attributes"]["temperature"]["type"], "Number");
    assert!(st["status"]["attributes"]["temperature"]["time"].is_string());
    // The gateway counts it.
    let gst = d.shared.lookup(gw.uuid).unwrap().status().await.unwrap();
    assert_eq!(gst["status"]["counters"]["measures_in"]["http"], 1);
    assert_eq!(gst["status"]["counters"]["devices"], 1);
    data.close().await;
    d.stop().await.unwrap();
}
