//! The IoT agent's north (provisioning) and south (HTTP measures) routers,
//! in process with `oneshot`: no broker, no socket. The core is the one the
//! agent builds, over a store in a temporary directory; what the federation
//! publisher would send is read from the outbox.

use axum::body::Body;
use axum::http::Request;
use busbar::iot::federation::Envelope;
use busbar::iot::registry::Registry;
use busbar::iot::{Core, Settings, north, south};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;
use tower::ServiceExt;
use uuid::Uuid;

const LAB: (&str, &str) = ("lab", "/rig1");

struct Agent {
    core: Arc<Core>,
    outbox: mpsc::Receiver<Envelope>,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn new() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let store = busbar::store::Store::open(dir.path()).unwrap();
        let (changes, _) = mpsc::unbounded_channel();
        let registry = Registry::load(Uuid::new_v4(), "lab.realm", store, changes).unwrap();
        let settings = Settings::from_properties(&Map::new()).unwrap();
        let (tx, outbox) = mpsc::channel(64);
        let core = Arc::new(Core::new(Uuid::new_v4(), "lab.realm".into(), settings, registry, tx, true));
        Agent { core, outbox, _dir: dir }
    }

    async fn call(router: axum::Router, req: Request<Body>) -> (u16, Value) {
        let r = router.oneshot(req).await.unwrap();
        let status = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, body)
    }

    async fn north(&self, method: &str, path: &str, tenant: Option<(&str, &str)>, body: Option<Value>) -> (u16, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some((s, p)) = tenant {
            req = req.header("fiware-service", s).header("fiware-servicepath", p);
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        Self::call(north::router(self.core.clone()), req.unwrap()).await
    }

    async fn south(&self, path_query: &str, body: &str) -> (u16, Value) {
        let req =
            Request::post(path_query).header("content-type", "application/json").body(Body::from(body.to_owned()));
        Self::call(south::http_router(self.core.clone()), req.unwrap()).await
    }
}

fn group(apikey: &str) -> Value {
    json!({"resource": "/iot/json", "apikey": apikey, "entity_type": "Sensor"})
}

#[tokio::test]
async fn provisioning_answers_with_the_upstream_codes_without_a_broker() {
    let a = Agent::new();
    let (s, b) = a.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [group("k1")]}))).await;
    assert_eq!((s, b), (201, json!({})));
    let (s, b) = a.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [group("k1")]}))).await;
    assert_eq!((s, b["name"].as_str()), (409, Some("DUPLICATE_GROUP")));
    let devices = json!({"devices": [{"device_id": "d1", "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}]}]});
    assert_eq!(a.north("POST", "/iot/devices", Some(LAB), Some(devices)).await.0, 201);
    let (s, b) = a.north("GET", "/iot/devices/d1", Some(LAB), None).await;
    assert_eq!((s, b["device_id"].as_str()), (200, Some("d1")), "{b}");
    // Another tenant does not see it.
    assert_eq!(a.north("GET", "/iot/devices/d1", Some(("other", "/")), None).await.0, 404);
    let (s, b) = a.north("POST", "/iot/devices", Some(LAB), Some(json!({"devices": "nope"}))).await;
    assert_eq!((s, b["name"].as_str()), (400, Some("WRONG_SYNTAX")), "{b}");
    let (s, b) = a.north("GET", "/nowhere", Some(LAB), None).await;
    assert_eq!((s, b["name"].as_str()), (404, Some("NOT_FOUND")), "{b}");
    let (s, b) = a.north("GET", "/metrics", None, None).await;
    assert_eq!(s, 200);
    assert!(b.as_str().unwrap().lines().any(|l| l == "devices 1"), "{b}");
}

#[tokio::test]
async fn an_http_measure_reaches_the_outbox_and_refusals_are_typed_without_a_broker() {
    let mut a = Agent::new();
    assert_eq!(a.north("POST", "/iot/groups", Some(LAB), Some(json!({"groups": [group("k1")]}))).await.0, 201);
    // The group autoprovisions d9 on its first measure.
    let (s, b) = a.south("/iot/json?k=k1&i=d9", r#"{"t": 21.5}"#).await;
    assert_eq!((s, b), (200, json!({})));
    let sent = a.outbox.try_recv().expect("one envelope for the federation");
    assert_eq!(sent.routing_key().as_str(), "lab.realm.lab.Sensor.d9");
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["attrs"]["t"], 21.5, "{body}");
    assert_eq!(body["metadata"]["deviceid"], "d9");
    // Each refusal has its code and name, and is counted by its label.
    for (query, payload, code, name, label) in [
        ("/iot/json?k=nokey&i=d9", r#"{"t": 1}"#, 404, "DEVICE_GROUP_NOT_FOUND", "device_group_not_found"),
        ("/iot/json?k=k1&i=d9", "[]", 400, "BAD_PAYLOAD", "bad_payload"),
        ("/iot/json?k=k1&i=d9&t=soon", r#"{"t": 1}"#, 400, "BAD_TIMESTAMP", "bad_timestamp"),
    ] {
        let (s, b) = a.south(query, payload).await;
        assert_eq!((s, b["name"].as_str()), (code, Some(name)), "{query} {payload}: {b}");
        assert_eq!(a.core.counters.errors().get(label), Some(&1), "{label}");
    }
    a.core.running.send_replace(false);
    let (s, b) = a.south("/iot/json?k=k1&i=d9", r#"{"t": 1}"#).await;
    assert_eq!((s, b["name"].as_str()), (503, Some("GATEWAY_STOPPED")), "{b}");
    assert!(a.outbox.try_recv().is_err(), "nothing else was sent");
}

/// The small things an iotagent-json client notices: `GET /ready`,
/// `/metrics` content negotiation (406 for a type it cannot serve), and
/// `X-Processing-Time` on south answers.
#[tokio::test]
async fn ready_metrics_negotiation_and_processing_time_answer_as_iotagent_json() {
    let a = Agent::new();
    assert_eq!(a.north("GET", "/ready", None, None).await, (200, json!({})));
    a.core.running.send_replace(false);
    assert_eq!(a.north("GET", "/ready", None, None).await, (503, json!({})), "a stopped gateway is not ready");
    a.core.running.send_replace(true);
    let metrics = |accept: &'static str| {
        let req = Request::get("/metrics").header("accept", accept).body(Body::empty()).unwrap();
        let router = north::router(a.core.clone());
        async move {
            let r = router.oneshot(req).await.unwrap();
            let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            (r.status().as_u16(), ct)
        }
    };
    let (s, ct) = metrics("application/openmetrics-text; version=1.0.0").await;
    assert_eq!((s, ct.starts_with("application/openmetrics-text")), (200, true), "{ct}");
    let (s, ct) = metrics("text/plain").await;
    assert_eq!((s, ct.starts_with("text/plain; version=0.0.4")), (200, true), "{ct}");
    assert_eq!(metrics("*/*").await.0, 200);
    assert_eq!(metrics("application/xml").await.0, 406);
    // Every south answer, success or refusal, says how long it took.
    for (path, body) in [("/iot/json?i=d&k=nokey", "{\"t\":1}"), ("/nowhere", "{}")] {
        let req = Request::post(path).header("content-type", "application/json").body(Body::from(body)).unwrap();
        let r = south::http_router(a.core.clone()).oneshot(req).await.unwrap();
        let ms = r.headers().get("x-processing-time").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        assert!(ms.is_some(), "{path}: X-Processing-Time in milliseconds");
    }
}

/// `POST /v2/op/query` (the Context Broker asking for lazy attributes)
/// gets iotagent-node-lib's default answer: each asked attribute with an
/// empty value of its declared type; an unknown entity is 404, a malformed
/// query 400.
#[tokio::test]
async fn op_query_answers_as_the_default_query_handler() {
    let a = Agent::new();
    let group = json!({"groups": [{"resource": "/iot/json", "apikey": "k", "entity_type": "Meter",
        "lazy": [{"name": "serial", "type": "Text"}]}]});
    assert_eq!(a.north("POST", "/iot/groups", Some(LAB), Some(group)).await.0, 201);
    let dev = json!({"devices": [{"device_id": "m1", "entity_name": "urn:m1", "apikey": "k",
        "lazy": [{"name": "load", "type": "Number"}],
        "attributes": [{"object_id": "p", "name": "power", "type": "Number"}]}]});
    assert_eq!(a.north("POST", "/iot/devices", Some(LAB), Some(dev)).await.0, 201);
    let q = json!({"entities": [{"id": "urn:m1", "type": "Meter"}], "attrs": ["load", "power", "other"]});
    let (code, body) = a.north("POST", "/v2/op/query", Some(LAB), Some(q)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!([{"id": "urn:m1", "type": "Meter", "load": {"type": "Number", "value": ""},
            "power": {"type": "Number", "value": ""}, "other": {"type": "Text", "value": ""}}])
    );
    let (_, body) = a.north("POST", "/v2/op/query", Some(LAB), Some(json!({"entities": [{"id": "urn:m1"}]}))).await;
    assert_eq!(
        body,
        json!([{"id": "urn:m1", "type": "Meter", "load": {"type": "Number", "value": ""}, "serial": {"type": "Text", "value": ""}}]),
        "no attrs: every lazy one, the device's and its group's"
    );
    let (code, body) =
        a.north("POST", "/v2/op/query", Some(LAB), Some(json!({"entities": [{"id": "urn:nope"}]}))).await;
    assert_eq!((code, body["name"].as_str()), (404, Some("DEVICE_NOT_FOUND")));
    let (code, body) =
        a.north("POST", "/v2/op/query", Some(("other", "/")), Some(json!({"entities": [{"id": "urn:m1"}]}))).await;
    assert_eq!((code, body["name"].as_str()), (404, Some("DEVICE_NOT_FOUND")), "another tenant's device is not found");
    let (code, body) = a.north("POST", "/v2/op/query", Some(LAB), Some(json!({"attrs": 3}))).await;
    assert_eq!((code, body["name"].as_str()), (400, Some("WRONG_SYNTAX")));
}
