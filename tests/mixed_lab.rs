//! A lab in migration: busbar beside a daemon that behaves like the Python
//! VILLAScontroller on the same exchange. The stand-in below never answers
//! on `reply_to` (no correlation ids), ignores the broadcast `uuid: ""`,
//! publishes each state change on the exchange, announces nothing when a
//! component is created, and publishes `gone` on delete (reference
//! villas-controller.md §0). The CLI must still tell success from failure.

mod common;

use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, QueueBindOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use busbar::protocol::RoutingKeys;

/// One component of the stand-in daemon.
struct PyComponent {
    keys: RoutingKeys,
    state: &'static str,
}

async fn publish_status(ch: &Channel, exchange: &str, c: &PyComponent) {
    let body = json!({
        "status": {"state": c.state, "version": "0.4.1", "uptime": 1.0},
        "properties": {"category": c.keys.category, "type": c.keys.kind, "uuid": c.keys.uuid.to_string(),
                       "name": "py", "realm": null},
    });
    let props = busbar::bus::status_properties(c.keys.status_headers());
    ch.basic_publish(
        exchange.into(),
        "".into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&body).unwrap(),
        props,
    )
    .await
    .unwrap();
}

/// Run the stand-in until `stop`: a generic manager and a dummy simulator.
async fn python_like_daemon(exchange: String, manager: Uuid, sim: Uuid, stop: CancellationToken) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    busbar::amqp::declare_exchange(&ch, &exchange).await.unwrap();
    let keys = |category: &str, kind: &str, uuid: Uuid| RoutingKeys {
        category: category.into(),
        kind: kind.into(),
        uuid,
        realm: None,
    };
    let mut comps: HashMap<Uuid, PyComponent> = HashMap::new();
    comps.insert(manager, PyComponent { keys: keys("manager", "generic", manager), state: "idle" });
    comps.insert(sim, PyComponent { keys: keys("simulator", "dummy", sim), state: "idle" });
    let q = busbar::amqp::declare_bound_queue(&ch, &exchange, comps[&manager].keys.binding()).await.unwrap();
    let bind = async |keys: &RoutingKeys| {
        ch.queue_bind(q.clone(), exchange.as_str().into(), "".into(), QueueBindOptions::default(), keys.binding())
            .await
            .unwrap();
    };
    bind(&comps[&sim].keys).await;
    let mut consumer = busbar::amqp::consume(&ch, q.clone()).await.unwrap();
    loop {
        let d = tokio::select! {
            d = consumer.next() => match d { Some(Ok(d)) => d, _ => break },
            _ = stop.cancelled() => break,
        };
        let Ok(msg) = serde_json::from_slice::<Value>(&d.data) else { continue };
        let Some(action) = msg["action"].as_str() else { continue };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let targets: Vec<Uuid> = comps.values().filter(|c| c.keys.matches(&headers)).map(|c| c.keys.uuid).collect();
        for uuid in targets {
            match (action, comps[&uuid].keys.category.as_str()) {
                ("ping", _) => publish_status(&ch, &exchange, &comps[&uuid]).await,
                ("start", "simulator") => {
                    comps.get_mut(&uuid).unwrap().state = "starting";
                    publish_status(&ch, &exchange, &comps[&uuid]).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    comps.get_mut(&uuid).unwrap().state = "running";
                    publish_status(&ch, &exchange, &comps[&uuid]).await;
                }
                ("create", "manager") => {
                    let new = msg["parameters"]["uuid"].as_str().and_then(|u| Uuid::try_parse(u).ok());
                    let new = new.unwrap_or_else(Uuid::new_v4);
                    let k = keys("simulator", "dummy", new);
                    bind(&k).await;
                    // Announces nothing: the first status comes with a ping.
                    comps.insert(new, PyComponent { keys: k, state: "idle" });
                }
                ("delete", "manager") => {
                    let gone = msg["parameters"]["uuid"].as_str().and_then(|u| Uuid::try_parse(u).ok());
                    if let Some(mut c) = gone.and_then(|g| comps.remove(&g)) {
                        c.state = "gone";
                        publish_status(&ch, &exchange, &c).await;
                    }
                }
                _ => {}
            }
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_for_a_daemon_that_never_sends_correlated_replies() {
    let env = TestEnv::new();
    // busbar's own daemon on the same exchange: the lab is mixed.
    let d = env.start().await;
    let (py_manager, py_sim) = (Uuid::new_v4(), Uuid::new_v4());
    let stop = CancellationToken::new();
    let py = tokio::spawn(python_like_daemon(env.exchange.clone(), py_manager, py_sim, stop.clone()));
    // Wait until the stand-in has bound its queue.
    let c = env.client().await;
    let only_sim = busbar::protocol::Filter { uuid: Some(py_sim.to_string()), ..Default::default() };
    let quick = Duration::from_millis(300);
    eventually(WAIT, "the stand-in answers", async || {
        (c.ping(&only_sim, quick, quick, |_| {}).await.unwrap() > 0).then_some(())
    })
    .await;

    let (py_m, py_s) = (py_manager.to_string(), py_sim.to_string());
    let o = cli(&env, &["action", "start", "-u", &py_s, "--wait", "running", "--timeout", "10"]).await;
    assert_eq!(o.status.code(), Some(0), "start --wait running: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "running");

    let o =
        cli(&env, &["create", "-m", &py_m, "-p", "{category: simulator, type: dummy, name: sim-x}", "--timeout", "10"])
            .await;
    assert_eq!(o.status.code(), Some(0), "create: {}", text(&o.stderr));
    let created = Uuid::try_parse(text(&o.stdout).trim()).expect("create prints the new uuid");

    // A ping without a filter reaches both daemons' components.
    let o = cli(&env, &["ping"]).await;
    let listed = text(&o.stdout);
    for u in [py_manager, py_sim, created, env.manager, env.dummy] {
        assert!(listed.contains(&u.to_string()), "ping lists {u}:\n{listed}");
    }

    let o = cli(&env, &["delete", "-m", &py_m, "-u", &created.to_string(), "--timeout", "10"]).await;
    assert_eq!(o.status.code(), Some(0), "delete: {}", text(&o.stderr));

    // The same commands against busbar still work through correlated replies.
    let (m, s) = (env.manager.to_string(), env.dummy.to_string());
    let o = cli(&env, &["action", "start", "-u", &s, "-p", "{runtime: 0.1}", "--wait", "running"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = cli(&env, &["create", "-m", &m, "-p", "{category: simulator, type: dummy, name: sim-y}"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mine = Uuid::try_parse(text(&o.stdout).trim()).expect("create prints the new uuid");
    assert!(d.shared.env.components.lookup(mine).is_some());
    let o = cli(&env, &["delete", "-m", &m, "-u", &mine.to_string()]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // A refused create fails (exit 1) with the manager's message.
    let dup = format!("{{category: simulator, type: dummy, uuid: {s}}}");
    let o = cli(&env, &["create", "-m", &m, "-p", &dup]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("Duplicate uuid"), "{}", text(&o.stderr));

    stop.cancel();
    py.await.unwrap();
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
