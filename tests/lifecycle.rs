//! Component lifecycles over the real broker: every dummy action, errors
//! and reset, `when` scheduling, create/delete through the manager,
//! persistence across restarts, and broker connection loss.

mod common;

use busbar::client::{Goal, Outcome};

use common::broker::{close_connections, connections_named};
use common::*;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

#[tokio::test]
async fn every_dummy_action_completes() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let steps = [
        ("start", json!({"runtime": 0.05}), ["starting", "running"]),
        ("pause", json!({}), ["pausing", "paused"]),
        ("resume", json!({}), ["resuming", "running"]),
        ("stop", json!({}), ["stopping", "idle"]),
        ("shutdown", json!({}), ["shuttingdown", "shutdown"]),
        ("start", json!({"runtime": 0}), ["starting", "running"]),
        ("reset", json!({}), ["resetting", "idle"]),
    ];
    for (name, params, [transient, settled]) in steps {
        c.publish(to_uuid(env.dummy), &action(name, params), None).await.unwrap();
        state_of(&mut l, env.dummy, transient).await;
        let st = state_of(&mut l, env.dummy, settled).await;
        assert!(st["status"].get("error").is_none(), "{name}: {st}");
    }
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_invalid_transition_errors_and_reset_recovers() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    c.publish(to_uuid(env.dummy), &action("stop", json!({})), None).await.unwrap();
    let st = state_of(&mut l, env.dummy, "error").await;
    assert_eq!(
        st["status"]["error"],
        json!({"msg": "Invalid state transition", "current": "idle", "next": "stopping",
            "allowed": ["start", "reset", "shutdown"], "hint": "from idle, send one of: start, reset, shutdown"})
    );
    // Nothing but reset leaves error.
    c.publish(to_uuid(env.dummy), &action("start", json!({})), None).await.unwrap();
    let st = state_of(&mut l, env.dummy, "error").await;
    assert_eq!(st["status"]["error"]["current"], "error");
    // The error says the way out.
    assert!(st["status"]["error"]["hint"].as_str().unwrap().starts_with("from error, send one of: reset"), "{st}");
    c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, env.dummy, "resetting").await;
    let st = state_of(&mut l, env.dummy, "idle").await;
    assert!(st["status"].get("error").is_none());
    // And the daemon keeps going.
    c.publish(to_uuid(env.dummy), &action("start", json!({"runtime": 0})), None).await.unwrap();
    state_of(&mut l, env.dummy, "running").await;
    assert_eq!(d.shared.env.metrics.error_count("invalid_transition"), 2);
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn a_future_when_is_honoured_within_50ms_shown_in_the_status_and_never_blocks_later_actions() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let target = unix_now() + 0.6;
    let mut start = action("start", json!({"runtime": 5}));
    start["when"] = json!(target);
    c.publish(to_uuid(env.dummy), &start, None).await.unwrap();
    // Scheduling is visible at once.
    let st = status_of(&mut l, env.dummy, |v| v["status"]["scheduled"].is_array()).await;
    assert_eq!(st["status"]["scheduled"][0]["action"], "start", "{st}");
    assert!((st["status"]["scheduled"][0]["when"].as_f64().unwrap() - target).abs() < 0.05, "{st}");
    let st = status_of(&mut l, env.dummy, |v| v["status"]["state"] != "idle").await;
    let at = unix_now();
    assert_eq!(st["status"]["state"], "starting", "the scheduled start runs");
    assert!((at - target).abs() < 0.05, "ran {:.1} ms off target", (at - target) * 1e3);
    assert!(st["status"].get("scheduled").is_none(), "nothing left scheduled: {st}");
    c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, env.dummy, "idle").await;

    // A `when` far ahead (within the year allowed) holds back nothing:
    // an action sent after it without `when` runs at once, and `reset`
    // drops the schedule.
    let mut far = action("start", json!({"runtime": 0}));
    far["when"] = json!(unix_now() + 300.0 * 24.0 * 3600.0);
    c.publish(to_uuid(env.dummy), &far, None).await.unwrap();
    status_of(&mut l, env.dummy, |v| v["status"]["scheduled"].is_array()).await;
    c.publish(to_uuid(env.dummy), &action("start", json!({"runtime": 0})), None).await.unwrap();
    let st = state_of(&mut l, env.dummy, "running").await;
    assert_eq!(st["status"]["scheduled"].as_array().map(Vec::len), Some(1), "{st}");
    c.publish(to_uuid(env.dummy), &action("reset", json!({})), None).await.unwrap();
    let st = state_of(&mut l, env.dummy, "idle").await;
    assert!(st["status"].get("scheduled").is_none(), "reset dropped the schedule: {st}");

    // An ISO-8601 `when`, as the VILLASweb frontend sends for some actions.
    let target = SystemTime::now() + Duration::from_millis(400);
    let iso = jiff::Timestamp::try_from(target).unwrap().to_string();
    let mut start = action("start", json!({"runtime": 0}));
    start["when"] = json!(iso);
    c.publish(to_uuid(env.dummy), &start, None).await.unwrap();
    state_of(&mut l, env.dummy, "starting").await;
    let late = SystemTime::now().duration_since(target).unwrap_or_default();
    let early = target.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(late < Duration::from_millis(50) && early < Duration::from_millis(50), "late {late:?} early {early:?}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn created_components_survive_a_restart_with_the_same_uuid() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let created = Uuid::new_v4();
    let params = json!({"category": "simulator", "type": "dummy", "name": "Created Dummy", "uuid": created.to_string(), "location": "here", "owner": "svg"});
    c.publish(to_uuid(env.manager), &action("create", params), None).await.unwrap();
    // Announced on create, managed by the manager; the manager lists it.
    let st = state_of(&mut l, created, "idle").await;
    assert_eq!(st["status"]["managed_by"], env.manager.to_string());
    assert_eq!(st["properties"]["name"], "Created Dummy");
    c.publish(to_uuid(env.manager), &json!({"action": "ping"}), None).await.unwrap();
    let m = status_of(&mut l, env.manager, |v| v["components"].as_array().is_some_and(|a| a.len() == 2)).await;
    assert!(m["components"].as_array().unwrap().contains(&json!(created.to_string())));
    // Without a uuid, one is generated and kept.
    c.publish(
        to_uuid(env.manager),
        &action("create", json!({"category": "simulator", "type": "dummy", "name": "Anon"})),
        None,
    )
    .await
    .unwrap();
    c.publish(to_uuid(env.manager), &json!({"action": "ping"}), None).await.unwrap();
    let anon = status_of(&mut l, env.manager, |v| v["components"].as_array().is_some_and(|a| a.len() == 3)).await;
    let anon: Uuid = anon["components"][2].as_str().unwrap().parse().unwrap();
    d.stop().await.expect("clean shutdown");

    let d = env.start().await;
    for u in [created, anon] {
        let h = d.shared.env.components.lookup(u).unwrap_or_else(|| panic!("{u} restored"));
        assert_eq!(h.managed_by, Some(env.manager));
        c.publish(to_uuid(u), &json!({"action": "ping"}), None).await.unwrap();
        state_of(&mut l, u, "idle").await;
    }
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn create_errors_are_clear_and_leave_the_daemon_running() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let cases = [
        (json!({"category": "simulator", "type": "warp-drive"}), "unknown type"),
        (json!({"category": "simulator", "type": "dummy", "uuid": env.dummy.to_string()}), "Duplicate uuid"),
        (json!({"name": "no type"}), "Invalid parameters"),
        (json!({"category": "simulator", "type": "dummy", "uuid": "not-a-uuid"}), "Invalid parameters"),
        (json!({"category": "teleporter", "type": "x"}), "unknown category"),
        (json!({"category": "gateway", "type": "x"}), "unknown type \"x\" for category gateway"),
    ];
    let has_error =
        |msg: &'static str| move |st: &Value| st["status"]["error"]["msg"].as_str().is_some_and(|m| m.contains(msg));
    for (params, msg) in cases {
        c.publish(to_uuid(env.manager), &action("create", params), None).await.unwrap();
        // The refusal is shown, and the manager stays usable: no reset.
        let st = status_of(&mut l, env.manager, has_error(msg)).await;
        assert_eq!(st["status"]["state"], "idle", "{st}");
    }
    for (params, msg) in [
        (json!({"uuid": Uuid::new_v4().to_string()}), "Unknown component"),
        (json!({"uuid": env.dummy.to_string()}), "configuration file"),
        (json!({}), "Missing uuid"),
    ] {
        c.publish(to_uuid(env.manager), &action("delete", params), None).await.unwrap();
        let st = status_of(&mut l, env.manager, has_error(msg)).await;
        assert_eq!(st["status"]["state"], "idle", "{st}");
    }
    assert_eq!(d.shared.env.components.len(), 3, "the controller, the manager and the dummy: nothing created");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_refused_create_leaves_the_manager_able_to_create_the_next_one() {
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    let dup = json!({"category": "simulator", "type": "dummy", "uuid": env.dummy.to_string()});
    let m = env.manager.to_string();
    let wait = Duration::from_secs(5);
    let refused = c.act_and_wait(&m, &action("create", dup), Goal::Created { follow: env.dummy }, wait).await;
    let Ok(Outcome::Failed(reply)) = refused else { panic!("refused: {refused:?}") };
    assert!(reply["status"]["error"]["msg"].as_str().unwrap().contains("Duplicate uuid"), "{reply}");
    assert_eq!(reply["status"]["state"], "idle", "the requester hears the refusal; the manager stays idle");
    let u = Uuid::new_v4();
    let ok = json!({"category": "simulator", "type": "dummy", "uuid": u.to_string()});
    let created = c.act_and_wait(&m, &action("create", ok), Goal::Created { follow: u }, wait).await;
    assert!(matches!(created, Ok(Outcome::Reached(_))), "{created:?}");
    state_of(&mut l, u, "idle").await;
    assert!(d.shared.env.components.lookup(u).is_some());
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_deleted_component_publishes_gone_once_and_then_stays_silent() {
    let env = TestEnv::new();
    let mut cfg = env.config(&env.config_yaml());
    cfg.status_interval = 0.1;
    let (d, c, mut l) = env.up_with(cfg).await;
    let u = Uuid::new_v4();
    c.publish(
        to_uuid(env.manager),
        &action("create", json!({"category": "simulator", "type": "dummy", "uuid": u.to_string()})),
        None,
    )
    .await
    .unwrap();
    state_of(&mut l, u, "idle").await;
    state_of(&mut l, u, "idle").await; // periodic updates flow
    c.publish(to_uuid(env.manager), &action("delete", json!({"uuid": u.to_string()})), None).await.unwrap();
    state_of(&mut l, u, "gone").await;
    let later = collect_for(&mut l, Duration::from_millis(800)).await;
    let from_u: Vec<_> = later
        .iter()
        .filter(|s| s.payload.pointer("/properties/uuid").and_then(Value::as_str) == Some(&u.to_string()))
        .collect();
    assert!(from_u.is_empty(), "silence after gone, got {}", from_u.len());
    assert!(d.shared.env.components.lookup(u).is_none());
    d.stop().await.expect("clean shutdown");
    // Not resurrected by a restart either.
    let d = env.start().await;
    assert!(d.shared.env.components.lookup(u).is_none());
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn state_survives_a_broker_side_connection_drop_and_the_daemon_reconnects() {
    if !common::broker::admin_or_skip("state_survives_a_broker_side_connection_drop") {
        return;
    }
    let env = TestEnv::new();
    let (d, c, mut l) = env.up(&env.config_yaml()).await;
    c.publish(to_uuid(env.dummy), &action("start", json!({"runtime": 0})), None).await.unwrap();
    state_of(&mut l, env.dummy, "running").await;
    let before = d.shared.env.metrics.connects.get();
    close_connections(&format!("busbar daemon exchange={}", env.exchange));
    // Reconnected, topology redeclared, announced again with the state kept.
    let st = state_of(&mut l, env.dummy, "running").await;
    assert_eq!(st["properties"]["uuid"], env.dummy.to_string());
    eventually(WAIT, "a reconnect", async || (d.shared.env.metrics.connects.get() != before).then_some(())).await;
    c.publish(to_uuid(env.dummy), &json!({"action": "ping"}), None).await.unwrap();
    state_of(&mut l, env.dummy, "running").await;
    c.publish(to_uuid(env.dummy), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, env.dummy, "idle").await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// A config built in code skips the file checks; a component that cannot
/// run is then a spec error naming the component and the key, and the
/// half-started daemon stops what it started (the store can be opened by
/// the next daemon at once).
#[tokio::test]
async fn a_spec_error_at_start_names_the_component_and_key_and_leaves_nothing_running() {
    let env = TestEnv::new();
    let mut cfg = env.config(&env.config_yaml());
    let bad = json!({"category": "simulator", "type": "warp-drive", "name": "Bad"});
    cfg.components.push(bad.as_object().unwrap().clone());
    let e = busbar::daemon::start(cfg).await.expect_err("an unknown type cannot start");
    match &e {
        busbar::Error::Spec { at, source } => {
            assert!(at.contains("Bad"), "{e}");
            assert_eq!(source.key, "type", "{e}");
        }
        other => panic!("not a spec error: {other}"),
    }
    assert_eq!(e.metric_label(), "spec");
    // Everything it started has stopped: its bus never stays connected (a
    // running bus connects within milliseconds), and a daemon on the same
    // data starts.
    let name = format!("busbar daemon exchange={}", env.exchange);
    // (Each look takes rabbitmqctl a few hundred milliseconds.)
    for _ in 0..if common::broker::usable() { 3 } else { 0 } {
        assert_eq!(connections_named(&name), 0, "the failed start left its bus running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = env.start().await;
    d.stop().await.expect("clean shutdown");
}

/// Every daemon is an IC: `controller/busbar`, `running`, announcing itself
/// every `alive_interval` with host, broker and component figures; an
/// action it does not take is answered with the error and leaves it
/// running; it says `gone` when the daemon stops.
#[tokio::test]
async fn the_daemon_is_a_controller_ic_that_stays_running_and_says_gone() {
    let env = TestEnv::new();
    let mut cfg = env.config_value();
    cfg["site"] = json!(format!("site-{}", env.id));
    cfg["alive_interval"] = json!(0.2);
    let (d, c, mut l) = env.up_with(env.config_of(&cfg)).await;
    let me = d.shared.env.settings.controller;
    let alive = |v: &Value| v["status"]["state"] == "running" && v["status"]["system"]["rss"].as_u64().is_some();
    let st = status_within(&mut l, me, Duration::from_secs(2), alive).await.expect("an alive status within 2 s");
    assert_eq!(st["properties"]["category"], "controller");
    assert_eq!(st["properties"]["type"], "busbar");
    assert_eq!(st["properties"]["site"], format!("site-{}", env.id));
    assert_eq!(st["status"]["broker"]["connected"], true);
    assert_eq!(st["status"]["alive_interval"], 0.2);
    assert_eq!(st["status"]["components"]["idle"], 2, "the manager and the dummy: {st}");
    assert_eq!(st["status"]["roots"], json!([env.manager.to_string()]));
    assert!(st["status"]["time"].as_f64().is_some());
    // Alive messages keep coming, about five a second.
    let seen = collect_for(&mut l, Duration::from_millis(1100)).await;
    let alives = seen.iter().filter(|s| s.payload["properties"]["uuid"] == me.to_string()).count();
    assert!((3..=8).contains(&alives), "{alives} alive messages in 1.1 s at 0.2 s");
    // A stray `stop` is refused with a message; the controller stays running.
    c.publish(to_uuid(me), &action("stop", json!({})), None).await.unwrap();
    let st = status_of(&mut l, me, |v| v["status"]["error"]["msg"].is_string()).await;
    assert_eq!(st["status"]["state"], "running", "{st}");
    // Stopping the daemon: the controller says gone first.
    d.stop().await.expect("clean shutdown");
    state_of(&mut l, me, "gone").await;
    c.close().await;
}
