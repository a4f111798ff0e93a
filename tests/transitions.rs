//! Every driver, driven through every state it can reach, publishes only
//! edges of the VILLAS table (plus the declared observed ones), and every
//! transient state on the way: observers such as VILLASweb and the Python
//! CLI see `pausing` before `paused` and `resetting` before `idle`.
//! (The Kubernetes driver is checked the same way in `kubernetes.rs`.)

mod common;

use busbar::state::State::{self, *};
use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(400);

/// Send `name` to `uuid` and wait until it is in `state`.
async fn act(
    c: &busbar::client::Client,
    l: &mut busbar::client::Listener,
    uuid: Uuid,
    name: &str,
    params: Value,
    state: &str,
) {
    c.publish(to_uuid(uuid), &action(name, params), None).await.unwrap();
    state_of(l, uuid, state).await;
}

/// `needle` appears in `seq` in this order (not necessarily adjacent).
fn contains_in_order(seq: &[State], needle: &[State]) -> bool {
    let mut it = seq.iter();
    needle.iter().all(|n| it.any(|s| s == n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dummy_simulator_walks_every_state_along_the_table() {
    let env = TestEnv::new();
    let sim = Uuid::new_v4();
    let fast = json!({"stop": 0.05, "pause": 0.05, "resume": 0.05, "reset": 0.05, "shutdown": 0.05});
    let cfg = env.config_with(vec![
        json!({"category": "simulator", "type": "dummy", "name": "D", "uuid": sim.to_string(), "durations": fast}),
    ]);
    let (d, c, mut l) = env.up_with(cfg).await;
    let mut record = env.listen_all(&c).await;
    let run = json!({"runtime": 0.05});
    act(&c, &mut l, sim, "start", run.clone(), "running").await;
    act(&c, &mut l, sim, "pause", json!({}), "paused").await;
    act(&c, &mut l, sim, "resume", json!({}), "running").await;
    act(&c, &mut l, sim, "stop", json!({}), "idle").await;
    act(&c, &mut l, sim, "start", run.clone(), "running").await;
    act(&c, &mut l, sim, "reset", json!({}), "idle").await;
    act(&c, &mut l, sim, "pause", json!({}), "error").await; // refused: pause while idle
    act(&c, &mut l, sim, "reset", json!({}), "idle").await;
    act(&c, &mut l, sim, "shutdown", json!({}), "shutdown").await;
    act(&c, &mut l, sim, "start", run, "running").await;
    let seq = published_states(&mut record, sim, QUIET).await;
    assert_table_edges(&seq, false);
    let want = [
        Starting,
        Running,
        Pausing,
        Paused,
        Resuming,
        Running,
        Stopping,
        Idle,
        Starting,
        Running,
        Resetting,
        Idle,
        Error,
        Resetting,
        Idle,
        ShuttingDown,
        Shutdown,
        Starting,
        Running,
    ];
    assert!(contains_in_order(&seq, &want), "{seq:?}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_simulator_publishes_every_transient_state() {
    let env = TestEnv::new();
    let sim = Uuid::new_v4();
    let cfg = env.config_with(vec![json!({"category": "simulator", "type": "generic", "name": "G",
        "uuid": sim.to_string(), "grace": 0.5, "whitelist": [env.fixtures_whitelist()]})]);
    let (d, c, mut l) = env.up_with(cfg).await;
    let mut record = env.listen_all(&c).await;
    let exe = |name: &str| format!("{}/{name}", fixtures_bin());
    let sleeper = json!({"executable": exe("sleeper.sh")});
    act(&c, &mut l, sim, "start", sleeper.clone(), "running").await;
    act(&c, &mut l, sim, "pause", json!({}), "paused").await;
    act(&c, &mut l, sim, "resume", json!({}), "running").await;
    act(&c, &mut l, sim, "stop", json!({}), "idle").await;
    act(&c, &mut l, sim, "start", sleeper.clone(), "running").await;
    act(&c, &mut l, sim, "reset", json!({}), "idle").await;
    // A run that ends by itself: running → stopping → idle.
    act(&c, &mut l, sim, "start", json!({"executable": exe("exit-with.sh"), "argv": ["0", "0.2"]}), "idle").await;
    // A run that fails: error, and reset brings it back.
    act(&c, &mut l, sim, "start", json!({"executable": exe("exit-with.sh"), "argv": ["3", "0.2"]}), "error").await;
    act(&c, &mut l, sim, "reset", json!({}), "idle").await;
    act(&c, &mut l, sim, "shutdown", json!({}), "shutdown").await;
    act(&c, &mut l, sim, "start", sleeper, "running").await;
    act(&c, &mut l, sim, "stop", json!({}), "idle").await;
    let seq = published_states(&mut record, sim, QUIET).await;
    assert_table_edges(&seq, false);
    let want = [
        Starting,
        Running,
        Pausing,
        Paused,
        Resuming,
        Running,
        Stopping,
        Idle,
        Starting,
        Running,
        Resetting,
        Idle,
        Starting,
        Running,
        Stopping,
        Idle,
        Starting,
        Running,
        Error,
        Resetting,
        Idle,
        ShuttingDown,
        Shutdown,
        Starting,
        Running,
        Stopping,
        Idle,
    ];
    assert!(contains_in_order(&seq, &want), "{seq:?}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_iot_gateway_settles_every_action_through_its_transient_state() {
    let env = TestEnv::new();
    let gw = Uuid::new_v4();
    let cfg = env.config_with(vec![json!({"category": "gateway", "type": "iot-agent", "name": "IoT",
        "uuid": gw.to_string(), "north_bind": "127.0.0.1:0", "south_bind": "127.0.0.1:0",
        "mqtt_prefix": format!("t{}", env.id), "federation_exchange": format!("data-{}", env.id)})]);
    // Listen before the daemon starts, to see the gateway's start-up.
    let c = env.client().await;
    let mut record = env.listen_all(&c).await;
    let mut l = env.listen_all(&c).await;
    let d = env.start_with(cfg).await;
    state_of(&mut l, gw, "running").await;
    for (name, state) in
        [("pause", "paused"), ("resume", "running"), ("stop", "idle"), ("start", "running"), ("reset", "idle")]
    {
        act(&c, &mut l, gw, name, json!({}), state).await;
    }
    act(&c, &mut l, gw, "shutdown", json!({}), "shutdown").await;
    act(&c, &mut l, gw, "start", json!({}), "running").await;
    let seq = published_states(&mut record, gw, QUIET).await;
    assert_table_edges(&seq, false);
    // Its start-up walk (idle → starting → running) happens before the
    // daemon is on the bus: the first status anyone sees is the announced
    // `running`.
    assert_eq!(seq.first(), Some(&Running), "{seq:?}");
    let want = [
        Running,
        Pausing,
        Paused,
        Resuming,
        Running,
        Stopping,
        Idle,
        Starting,
        Running,
        Resetting,
        Idle,
        ShuttingDown,
        Shutdown,
        Starting,
        Running,
    ];
    assert!(contains_in_order(&seq, &want), "{seq:?}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
