//! The HTTP API on a real socket, backed by a real daemon and broker.

mod common;

use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn the_api_lists_reports_and_acts_on_components_with_json_errors() {
    let env = TestEnv::new();
    let d = env.start().await;
    let base = format!("http://{}", d.api_addr.expect("api enabled"));
    let http = reqwest::Client::new();

    let index: Value = http.get(format!("{base}/api/v1")).send().await.unwrap().json().await.unwrap();
    // The daemon's own controller IC first, then the configured components.
    let controller = d.shared.env.settings.controller.to_string();
    assert_eq!(index["components"], json!([controller, env.manager.to_string(), env.dummy.to_string()]));
    assert!(index["status"]["uptime"].is_number());

    let r = http.get(format!("{base}/api/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    let st: Value =
        http.get(format!("{base}/api/v1/component/{}", env.dummy)).send().await.unwrap().json().await.unwrap();
    assert_eq!(st["status"]["state"], "idle");
    assert_eq!(st["properties"]["uuid"], env.dummy.to_string());

    for path in ["/api/v1/component/00000000-0000-0000-0000-000000000000", "/api/v1/component/nope", "/nowhere"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await.expect("JSON error body");
        assert!(body["error"]["msg"].is_string(), "{path}: {body}");
    }

    let url = format!("{base}/api/v1/component/{}", env.dummy);
    let st: Value = http
        .post(&url)
        .body(r#"{"action":"start","parameters":{"runtime":5}}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["status"]["state"], "starting");

    for body in ["{}", "{not json", "[1]", r#"{"action": 3}"#] {
        let r = http.post(&url).body(body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.expect("JSON error body");
        assert!(e["error"]["msg"].is_string(), "{e}");
    }
    // An oversized body is a JSON 413, not a dropped connection.
    let r = http.post(&url).body(vec![b' '; 2 << 20]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.unwrap()["error"]["msg"].is_string());
    // A refused transition is an ordinary status with error, not a 500.
    let st: Value = http.post(&url).body(r#"{"action":"resume"}"#).send().await.unwrap().json().await.unwrap();
    assert_eq!(st["status"]["state"], "error");
    assert_eq!(st["status"]["error"]["msg"], "Invalid state transition");

    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in [
        "busbar_messages_in_total",
        "busbar_messages_out_total",
        "busbar_errors_total{kind=\"invalid_json\"}",
        "busbar_components{state=\"error\"} 1",
        // Every request is counted by route template, never by raw path.
        "busbar_http_requests_total{server=\"api\",route=\"/api/v1/component/{uuid}\",method=\"GET\",status=\"200\"} 1",
        "busbar_http_requests_total{server=\"api\",route=\"/api/v1/component/{uuid}\",method=\"GET\",status=\"404\"} 2",
        "busbar_http_requests_total{server=\"api\",route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "busbar_http_requests_total{server=\"api\",route=\"/api/v1/component/{uuid}\",method=\"POST\",status=\"400\"} 4",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let out: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("busbar_messages_out_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("messages_out sample");
    assert!(out >= 3.0, "startup announcements were counted: {out}");
    d.stop().await.expect("clean shutdown");
    assert!(http.get(format!("{base}/api/v1")).send().await.is_err(), "the listener closed on shutdown");
}

#[tokio::test]
async fn health_is_503_while_the_broker_is_unreachable() {
    let env = TestEnv::new();
    let mut cfg = env.config(&env.config_yaml());
    cfg.broker.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let d = busbar::daemon::start(cfg).await.expect("starts without a broker");
    let base = format!("http://{}", d.api_addr.unwrap());
    let r = reqwest::get(format!("{base}/api/v1/health")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "error");
    // Components still answer locally.
    let st: Value = reqwest::get(format!("{base}/api/v1/component/{}", env.dummy)).await.unwrap().json().await.unwrap();
    assert_eq!(st["status"]["state"], "idle");
    d.stop().await.expect("clean shutdown while reconnecting");
}

/// The router in-process (no socket): the live log filter.
#[tokio::test]
async fn the_log_level_changes_live_and_only_for_busbar_targets() {
    use tower::ServiceExt;
    let env = TestEnv::new();
    let d = env.start().await;
    let call = async |method: &str, body: Value| {
        let req = axum::http::Request::builder()
            .method(method)
            .uri("/api/v1/log-level")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let r = busbar::api::app(d.shared.clone()).oneshot(req).await.unwrap();
        let code = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, serde_json::from_slice::<Value>(&bytes).unwrap())
    };
    let target = "busbar::store";
    assert!(!tracing::enabled!(target: "busbar::store", tracing::Level::DEBUG), "tests log at warn");
    let (code, body) = call("PUT", json!({"level": "debug", "target": target})).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["filter"].as_str().unwrap().contains("busbar::store=debug"), "{body}");
    assert!(tracing::enabled!(target: "busbar::store", tracing::Level::DEBUG), "the live filter changed");
    assert_eq!(call("GET", json!(null)).await.1, body);
    // Other crates' levels cannot be raised (their debug logs may hold
    // request details), and nonsense is a JSON error.
    for bad in [json!({"level": "trace", "target": "hyper"}), json!({"level": "loud"}), json!({})] {
        let (code, body) = call("PUT", bad.clone()).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"]["msg"].is_string(), "{body}");
    }
    busbar::telemetry::set_target(target, tracing::Level::WARN).unwrap();
    d.stop().await.expect("clean shutdown");
}

/// The federation view of a lone daemon: its own site, its components,
/// filters, and a JSON 400 for a filter that does not parse.
#[tokio::test]
async fn the_federation_api_answers_and_refuses_bad_filters() {
    let env = TestEnv::new();
    let mut cfg = env.config_value();
    cfg["site"] = json!(format!("solo-{}", env.id));
    let d = env.start_with(env.config_of(&cfg)).await;
    let base = format!("http://{}", d.api_addr.expect("api enabled"));
    let http = reqwest::Client::new();
    let site = format!("solo-{}", env.id);
    // The directory hears this daemon's own statuses (warmed by its ping).
    let rows = eventually(WAIT, "the directory lists the dummy", async || {
        let url = format!("{base}/api/v1/federation/components?site={site}&category=simulator&stale=false");
        let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
        (v["components"].as_array()?.len() == 1).then_some(v)
    })
    .await;
    assert_eq!(rows["components"][0]["uuid"], env.dummy.to_string());
    assert_eq!(rows["components"][0]["managed_by"], env.manager.to_string());
    let fed: Value = http.get(format!("{base}/api/v1/federation")).send().await.unwrap().json().await.unwrap();
    assert_eq!(fed["site"], site.as_str());
    assert_eq!(fed["uuid"], d.shared.env.settings.controller.to_string());
    assert_eq!(fed["sites"][0]["site"], site.as_str());
    assert_eq!(fed["sites"][0]["stale"], false);
    // A controller status larger than max_body_bytes is not read: the
    // directory never holds it, and the daemon keeps answering.
    let huge = Uuid::new_v4();
    let body = json!({"status": {"state": "running", "pad": "x".repeat(2 << 20)},
        "properties": {"uuid": huge, "category": "controller", "type": "busbar", "name": "huge"}});
    let c = env.client().await;
    c.publish(to_uuid(huge), &body, None).await.unwrap();
    c.publish(to_uuid(env.dummy), &action("ping", json!({})), None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let fed: Value = http.get(format!("{base}/api/v1/federation")).send().await.unwrap().json().await.unwrap();
    assert!(!fed.to_string().contains(&huge.to_string()), "an oversized status is not kept");
    c.close().await;
    let r = http.get(format!("{base}/api/v1/federation/components?stale=maybe")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["msg"].as_str().unwrap().contains("stale"), "{e}");
    // A distributed request: this site's own controller answers, at once.
    let t = std::time::Instant::now();
    let split: Value = http
        .get(format!("{base}/api/v1/distributed/split/health?deadline=5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(4), "every expected site answered: no wait for the deadline");
    assert_eq!(split["missing"], json!([]), "{split}");
    assert_eq!(split["answers"][&site]["state"], "running", "{split}");
    for (path, code) in [
        ("distributed/split/health?deadline=0", 400),
        ("distributed/split/health?deadline=soon", 400),
        ("distributed/split/health?deadline=31", 400),
        ("distributed/split/everything", 404),
        ("distributed/sideways/health", 404),
    ] {
        let r = http.get(format!("{base}/api/v1/{path}")).send().await.unwrap();
        assert_eq!(r.status(), code, "{path}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["msg"].is_string(), "{path}: {e}");
    }
    d.stop().await.expect("clean shutdown");
}

/// With its broker unreachable, a daemon's distributed request still
/// returns at its deadline (every known site missing), never waiting on
/// the link.
#[tokio::test]
async fn a_distributed_request_returns_by_its_deadline_without_a_broker() {
    let env = TestEnv::new();
    let mut cfg = env.config_value();
    cfg["broker"]["url"] = json!("amqp://guest:guest@127.0.0.1:1/%2f");
    let d = busbar::daemon::start(env.config_of(&cfg)).await.expect("the daemon starts without its broker");
    let base = format!("http://{}", d.api_addr.expect("api enabled"));
    let t = std::time::Instant::now();
    let r = reqwest::get(format!("{base}/api/v1/distributed/merge/health?deadline=0.3")).await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(took < std::time::Duration::from_millis(400), "took {took:?}");
    assert_eq!(v["answers"], json!([]), "{v}");
    d.stop().await.expect("clean shutdown");
}

/// An action to a component of another site (known to the directory, not
/// run here) goes out on the exchange to its uuid, answered 202; one to a
/// uuid nobody knows is 404, and a malformed one 400 before anything is
/// sent.
#[tokio::test]
async fn an_action_to_a_remote_component_goes_out_on_the_exchange() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let base = format!("http://{}", d.api_addr.unwrap());
    let http = reqwest::Client::new();
    // A component of "another site": its status on the exchange.
    let remote = Uuid::new_v4();
    let status = json!({"status": {"state": "idle"},
        "properties": {"uuid": remote, "name": "far", "category": "simulator", "type": "dummy", "realm": env.realm}});
    c.publish(to_uuid(remote), &status, None).await.unwrap();
    eventually(WAIT, "the directory knows it", async || {
        let v: Value =
            http.get(format!("{base}/api/v1/federation/components?type=dummy")).send().await.ok()?.json().await.ok()?;
        v["components"].as_array()?.iter().any(|r| r["uuid"] == json!(remote)).then_some(())
    })
    .await;
    let post = async |u: Uuid, body: &str| {
        let r = http.post(format!("{base}/api/v1/component/{u}")).body(body.to_owned()).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(post(remote, "not json").await.0, 400, "checked before it is sent");
    let (code, body) = post(remote, "{\"action\": \"start\", \"parameters\": {\"runtime\": 0.1}}").await;
    assert_eq!((code, body), (202, json!({"sent": true, "uuid": remote})));
    let seen = eventually(WAIT, "the action on the exchange", async || {
        let s = l.next_until(tokio::time::Instant::now() + std::time::Duration::from_millis(200)).await?;
        (s.headers["uuid"] == json!(remote.to_string()) && s.payload["action"] == "start").then_some(s)
    })
    .await;
    assert_eq!(seen.payload["parameters"]["runtime"], 0.1);
    assert_eq!(post(Uuid::new_v4(), "{\"action\": \"start\"}").await.0, 404, "nobody knows it");
    d.stop().await.unwrap();
}
