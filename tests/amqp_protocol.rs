//! The VILLAS wire protocol against the real RabbitMQ: discovery, the
//! status envelope, replies and bad input.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

fn sample(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/villas-wire-samples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The shape of a JSON value: objects keep their keys (in order), leaves
/// become their type. Volatile values (uptime, host, …) drop out this way.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(_) => json!("array"),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

#[tokio::test]
async fn ping_by_uuid_realm_category_and_type_is_answered() {
    let env = TestEnv::new();
    let d = env.start().await;
    let c = env.client().await;
    let filters = [
        busbar::protocol::Filter { uuid: Some(env.dummy.to_string()), ..Default::default() },
        busbar::protocol::Filter { realm: Some(env.realm.clone()), ..Default::default() },
        busbar::protocol::Filter { category: Some("simulator".into()), ..Default::default() },
        busbar::protocol::Filter { kind: Some("dummy".into()), ..Default::default() },
    ];
    for f in filters {
        let mut seen = Vec::new();
        c.ping(&f, Duration::from_secs(5), Duration::from_millis(500), |s| seen.push(s.payload.clone())).await.unwrap();
        let uuids: Vec<_> = seen.iter().map(|v| v["properties"]["uuid"].as_str().unwrap().to_owned()).collect();
        assert!(uuids.contains(&env.dummy.to_string()), "{f:?} reached the dummy: {uuids:?}");
        if f.realm.is_some() {
            assert!(uuids.contains(&env.manager.to_string()), "the realm reaches the manager too");
        } else {
            assert!(!uuids.contains(&env.manager.to_string()), "{f:?} must not reach the manager");
        }
    }
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_villasweb_broadcast_ping_reaches_every_component() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    // VILLASweb's startup ping: headers exactly {uuid: ""}, body with when: 0.
    c.publish(to_empty_uuid(), &json!({"action": "ping", "when": 0}), None).await.unwrap();
    let mut missing = vec![env.dummy.to_string(), env.manager.to_string()];
    let end = Instant::now() + WAIT;
    while !missing.is_empty() {
        let s = l.next_until(end).await.unwrap_or_else(|| panic!("no reply from {missing:?}"));
        if let Some(u) = s.payload.pointer("/properties/uuid").and_then(Value::as_str) {
            missing.retain(|m| m != u);
        }
    }
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

fn to_empty_uuid() -> lapin::types::FieldTable {
    busbar::protocol::Filter::default().action_headers()
}

#[tokio::test]
async fn status_envelopes_match_the_captured_anchor_replies() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    c.publish(to_uuid(env.dummy), &json!({"action": "ping"}), None).await.unwrap();
    let ours = state_of(&mut l, env.dummy, "idle").await;
    let theirs = sample("02-status-reply-dummy-simulator-idle.json")["body"].clone();
    // Same keys in the same order at the top and in `status`.
    assert_eq!(
        ours.as_object().unwrap().keys().collect::<Vec<_>>(),
        theirs.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    // The anchor's `status`, key for key, plus busbar's one addition:
    // `since` (when the state was entered; what coordinated starts are
    // timed by), after the anchor's keys; readers of those skip it.
    let mut status = ours["status"].as_object().unwrap().clone();
    assert!(status.shift_remove("since").is_some_and(|t| t.is_f64()), "status.since: {}", ours["status"]);
    assert_eq!(shape(&Value::Object(status)), shape(&theirs["status"]));
    // Every property of the anchor's dummy is present with the same type.
    for (k, v) in theirs["properties"].as_object().unwrap() {
        assert_eq!(shape(&ours["properties"][k]), shape(v), "properties.{k}");
    }
    assert_eq!(ours["properties"]["uuid"], env.dummy.to_string());
    assert_eq!(ours["properties"]["owner"], "svg");
    // Schemas are keyed by action name, which is what VILLASweb reads.
    assert!(ours["schema"]["start"].is_object(), "{}", ours["schema"]);

    c.publish(to_uuid(env.manager), &json!({"action": "ping"}), None).await.unwrap();
    let mgr = state_of(&mut l, env.manager, "idle").await;
    let anchor_mgr = sample("04-status-reply-generic-manager-idle.json")["body"].clone();
    assert_eq!(
        mgr.as_object().unwrap().keys().collect::<Vec<_>>(),
        anchor_mgr.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    assert!(mgr["status"].get("managed_by").is_none(), "the root manager has no manager");
    assert_eq!(mgr["components"], json!([env.dummy.to_string()]));
    assert!(mgr["schema"]["create"].is_object());
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn status_messages_carry_the_anchors_amqp_properties_and_headers() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    c.publish(to_uuid(env.dummy), &json!({"action": "ping"}), None).await.unwrap();
    let end = Instant::now() + WAIT;
    let seen = loop {
        let s = l.next_until(end).await.expect("a status");
        if s.is_status() {
            break s;
        }
    };
    let sample = sample("02-status-reply-dummy-simulator-idle.json");
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    let ours: Vec<_> = seen
        .headers
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let theirs: Vec<_> = sample["properties"]["application_headers"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(ours, theirs);
    assert_eq!(seen.headers["realm"], env.realm);
    assert_eq!(seen.headers["type"], "dummy");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn reply_to_and_correlation_id_get_the_resulting_status_and_validation_errors() {
    let env = TestEnv::new();
    let d = env.start().await;
    let c = env.client().await;
    // A reply-only queue: bound to nothing, so only reply_to traffic arrives.
    let mut binding = lapin::types::FieldTable::default();
    binding.insert("x-match".into(), lapin::types::AMQPValue::LongString("all".into()));
    binding.insert("nobody".into(), lapin::types::AMQPValue::LongString(env.id.as_str().into()));
    let mut replies = c.listen(binding).await.unwrap();
    let q = replies.queue.clone();
    c.publish(to_uuid(env.dummy), &action("start", json!({"runtime": 5})), Some((&q, "corr-1"))).await.unwrap();
    let r = replies.next_until(Instant::now() + WAIT).await.expect("a direct reply");
    assert_eq!(r.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(r.payload["status"]["state"], "starting");
    c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
    c.publish(to_uuid(env.dummy), &action("start", json!({"runtime": "soon"})), Some((&q, "corr-2"))).await.unwrap();
    let r = replies.next_until(Instant::now() + WAIT).await.expect("a direct reply");
    assert_eq!(r.correlation_id.as_deref(), Some("corr-2"));
    assert_eq!(r.payload["status"]["state"], "error");
    let err = &r.payload["status"]["error"];
    assert!(err["msg"].as_str().unwrap().starts_with("Invalid parameters"), "{err}");
    assert_eq!(err["instance"], "soon");
    assert_eq!(err["path"], "$.runtime");
    // A ping without reply properties sends nothing to the reply queue.
    c.publish(to_uuid(env.dummy), &json!({"action": "ping"}), None).await.unwrap();
    assert!(replies.next_until(Instant::now() + Duration::from_millis(300)).await.is_none());
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn every_kind_of_bad_input_is_rejected_and_pings_are_still_answered() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let big = format!(r#"{{"action":"ping","pad":"{}"}}"#, "x".repeat(2 << 20));
    let bad: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (Some("text/plain"), b"{\"action\":\"ping\"}".to_vec(), "Unsupported content type"),
        (Some("application/json"), b"{not json".to_vec(), "Invalid JSON"),
        (Some("application/json"), b"[\"action\"]".to_vec(), "must be a JSON object"),
        (Some("application/json"), b"\"action\"".to_vec(), "must be a JSON object"),
        (Some("application/json"), b"42".to_vec(), "must be a JSON object"),
        (Some("application/json"), b"{\"parameters\":{}}".to_vec(), "Missing action"),
        (Some("application/json"), b"{\"action\":\"foo\"}".to_vec(), "Unknown action"),
        (Some("application/json"), big.into_bytes(), "exceeds the limit"),
        (Some("application/json"), b"{\"action\":\"start\",\"when\":\"someday\"}".to_vec(), "Invalid when"),
        (None, vec![0xff, 0xfe, 0x00], "Invalid JSON"),
    ];
    for (ct, body, msg) in bad {
        c.publish_raw(to_uuid(env.dummy), ct, &body, None).await.unwrap();
        let st = state_of(&mut l, env.dummy, "error").await;
        let got = st["status"]["error"]["msg"].as_str().unwrap();
        assert!(got.contains(msg), "expected {msg:?}, got {got:?}");
        // Still alive: a ping is answered, and reset recovers.
        c.publish(to_uuid(env.dummy), &json!({"action": "ping"}), None).await.unwrap();
        state_of(&mut l, env.dummy, "error").await;
        c.publish(to_uuid(env.dummy), &json!({"action": "reset"}), None).await.unwrap();
        state_of(&mut l, env.dummy, "idle").await;
    }
    // An action the type does not support: the manager cannot "start".
    c.publish(to_uuid(env.manager), &json!({"action": "start"}), None).await.unwrap();
    let st = state_of(&mut l, env.manager, "error").await;
    assert_eq!(st["status"]["error"]["msg"], "Unsupported action");
    c.publish(to_uuid(env.manager), &json!({"action": "ping"}), None).await.unwrap();
    state_of(&mut l, env.manager, "error").await;
    assert!(d.shared.env.metrics.error_count("invalid_json") >= 2);
    assert_eq!(d.shared.env.metrics.error_count("too_large"), 1);
    assert_eq!(d.shared.env.metrics.error_count("unsupported_action"), 1);
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn status_is_republished_periodically_and_announced_at_startup() {
    let env = TestEnv::new();
    let c = env.client().await;
    let mut l = env.listen_all(&c).await;
    let mut cfg = env.config(&env.config_yaml());
    cfg.status_interval = 0.2;
    let d = env.start_with(cfg).await;
    // Announced at startup without any ping…
    state_of(&mut l, env.dummy, "idle").await;
    // …then again and again.
    let t0 = Instant::now();
    state_of(&mut l, env.dummy, "idle").await;
    state_of(&mut l, env.dummy, "idle").await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_shared_topology_routes_like_per_component_queues() {
    let env = TestEnv::new();
    let mut cfg = env.config(&env.config_yaml());
    cfg.topology = busbar::config::Topology::Shared;
    let (d, c, mut l) = env.up_with(cfg).await;
    // By uuid: only the dummy answers.
    c.publish(to_uuid(env.dummy), &json!({"action": "ping"}), None).await.unwrap();
    state_of(&mut l, env.dummy, "idle").await;
    // By realm: both.
    let realm = busbar::protocol::Filter { realm: Some(env.realm.clone()), ..Default::default() };
    let mut seen = Vec::new();
    c.ping(&realm, Duration::from_secs(5), Duration::from_millis(400), |s| {
        seen.push(s.payload["properties"]["uuid"].clone())
    })
    .await
    .unwrap();
    assert!(seen.contains(&json!(env.dummy.to_string())) && seen.contains(&json!(env.manager.to_string())), "{seen:?}");
    // Actions reach exactly their component.
    c.publish(to_uuid(env.dummy), &action("start", json!({"runtime": 0})), None).await.unwrap();
    state_of(&mut l, env.dummy, "running").await;
    // Created components are routed, deleted ones unrouted.
    let u = uuid::Uuid::new_v4();
    c.publish(
        to_uuid(env.manager),
        &action("create", json!({"category": "simulator", "type": "dummy", "uuid": u.to_string()})),
        None,
    )
    .await
    .unwrap();
    state_of(&mut l, u, "idle").await;
    c.publish(to_uuid(u), &json!({"action": "ping"}), None).await.unwrap();
    state_of(&mut l, u, "idle").await;
    c.publish(to_uuid(env.manager), &action("delete", json!({"uuid": u.to_string()})), None).await.unwrap();
    state_of(&mut l, u, "gone").await;
    c.publish(to_uuid(u), &json!({"action": "ping"}), None).await.unwrap();
    let after = collect_for(&mut l, Duration::from_millis(400)).await;
    assert!(after.iter().all(|s| !s.is_status() || s.payload["properties"]["uuid"] != json!(u.to_string())));
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
