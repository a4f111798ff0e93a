//! The NGSI-v2 northbound through the daemon: every accepted measure also
//! reaches the Context Broker with iotagent-node-lib's exact request, and
//! a Context Broker that is down loses nothing (the queue is in the store,
//! sent in order once it is back, also after a daemon restart). The Context Broker is an in-test axum
//! router that records every request and answers like Orion (204), or 503
//! while "down".

mod common;

use common::iot::{Gw, LAB, ping_status};
use common::orion::Orion;
use common::*;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn measures_reach_the_context_broker_as_iotagent_json_sends_them_and_none_is_lost_while_it_is_down() {
    let (cb, url) = Orion::start().await;
    let gw = Gw::with(json!({"cbroker": url}));
    let (d, g, c, mut l, mut data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    let group = json!({"resource": "/iot/json", "apikey": k, "entity_type": "Sensor",
        "static_attributes": [{"name": "lab", "type": "Text", "value": "L1"}]});
    let devices = json!([{"device_id": "dev1", "entity_name": "urn:lab:Sensor:dev1",
        "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
        "static_attributes": [{"name": "room", "type": "Text", "value": "B12"}]}]);
    g.provision(LAB, group, devices).await;

    // One measure: an upsert, byte for byte as the reference's example.
    assert_eq!(g.measure(&k, "dev1", json!({"t": 21.5, "h": 40})).await.0, 200);
    let first =
        eventually(WAIT, "the Context Broker got the upsert", async || cb.seen.lock().unwrap().first().cloned()).await;
    assert_eq!(first.path, "/v2/entities?options=upsert");
    assert_eq!((first.service.as_str(), first.servicepath.as_str()), LAB);
    assert_eq!(
        first.body,
        r#"{"id":"urn:lab:Sensor:dev1","type":"Sensor","room":{"type":"Text","value":"B12"},"lab":{"type":"Text","value":"L1"},"temperature":{"type":"Number","value":21.5},"h":{"type":"Text","value":40}}"#
    );
    data.next().await; // the federation got it too

    // A multimeasure: one append, in ascending time order.
    let multi =
        json!([{"t": 1, "TimeInstant": "2024-04-10T10:15:00Z"}, {"t": 2, "TimeInstant": "2024-04-10T10:05:00Z"}]);
    assert_eq!(g.measure(&k, "dev1", multi).await.0, 200);
    let second =
        eventually(WAIT, "the Context Broker got the append", async || cb.seen.lock().unwrap().get(1).cloned()).await;
    assert_eq!(second.path, "/v2/op/update");
    let body: Value = serde_json::from_str(&second.body).unwrap();
    assert_eq!(body["actionType"], "append");
    assert_eq!(body["entities"][0]["TimeInstant"]["value"], "2024-04-10T10:05:00Z");
    assert_eq!(body["entities"][1]["temperature"]["value"], 1);

    // The Context Broker goes down during a burst: the federation still
    // gets every measure at once, and the Context Broker every one, in
    // order, once it is back.
    cb.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..50 {
        assert_eq!(g.measure(&k, "dev1", json!({"t": i})).await.0, 200);
    }
    for _ in 0..50 {
        data.next().await;
    }
    let mut st = Value::Null;
    for _ in 0..50 {
        st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
        if st["status"]["cbroker"]["queued"].as_u64().is_some_and(|q| q >= 50) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(st["status"]["cbroker"]["queued"].as_u64().unwrap_or(0) >= 50, "the gateway shows the queue: {st}");
    assert!(st["status"]["cbroker"]["retries"].as_u64().unwrap() >= 1, "{st}");
    // The queue is in the store: a daemon restarted meanwhile still has it.
    c.close().await;
    d.stop().await.expect("clean shutdown");
    let d = gw.env.start_with(gw.config()).await;
    cb.down.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(Duration::from_secs(30), "all 50 reached the Context Broker", async || {
        (cb.seen.lock().unwrap().len() == 52).then_some(())
    })
    .await;
    let values: Vec<i64> = cb.seen.lock().unwrap()[2..]
        .iter()
        .map(|s| serde_json::from_str::<Value>(&s.body).unwrap()["temperature"]["value"].as_i64().unwrap())
        .collect();
    assert_eq!(values, (0..50).collect::<Vec<_>>(), "in order, none lost, none twice, across a restart");
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_full_queue_drops_the_newest_and_a_refused_request_does_not_block_the_rest() {
    let (cb, url) = Orion::start().await;
    let gw = Gw::with(json!({"cbroker": url, "cbroker_queue": 5}));
    let (d, g, c, mut l, _data) = gw.up().await;
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Sensor"}),
        json!([{"device_id": "d1"}]),
    )
    .await;
    // Down: 12 measures, room for 5 (and the one being retried).
    cb.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..12 {
        assert_eq!(g.measure(&k, "d1", json!({"v": i})).await.0, 200);
    }
    let mut st = Value::Null;
    for _ in 0..50 {
        st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
        if st["status"]["cbroker"]["dropped"].as_u64().is_some_and(|n| n >= 7) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(st["status"]["cbroker"]["dropped"], 7, "{st}");
    // Refusing: each queued request is refused once, counted, and the
    // queue empties instead of blocking on the first.
    cb.down.store(false, std::sync::atomic::Ordering::SeqCst);
    cb.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        st = ping_status(&c, &mut l, gw.uuid, |_| true).await;
        if st["status"]["cbroker"]["rejected"] == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(st["status"]["cbroker"]["rejected"], 5, "{st}");
    assert_eq!(st["status"]["cbroker"]["queued"], 0, "{st}");
    // And the next one goes through.
    cb.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(g.measure(&k, "d1", json!({"v": 99})).await.0, 200);
    let last = eventually(WAIT, "the next request arrives", async || cb.seen.lock().unwrap().last().cloned()).await;
    assert!(last.body.contains("99"), "{}", last.body);
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
