//! Coming from VILLAScontroller: its own example configs (`etc/` of the
//! Python project, as the reference quotes them) load and run as they are.

mod common;

use busbar::config::Config;
use common::*;
use serde_json::json;
use std::path::Path;
use uuid::Uuid;

/// VILLAScontroller's `etc/config.yaml`, verbatim but for the broker URL
/// (its own points at a remote lab with a password).
const CONFIG_YAML: &str = r#"
broker:
  url: amqp://guest:guest@127.0.0.1:5672/%2F
components:
- category: manager
  type: generic
  name: Standard Controller
  realm: de.rwth-aachen.eonerc.acs
  uuid: f4751894-205e-11eb-aefb-0741ff98abca
- api_url: https://villas-new.k8s.eonerc.rwth-aachen.de/api/ic/generic_1
  category: simulator
  enabled: false
  location: Richard's PC
  name: 'Generic Simulator #1'
  owner: rmr
  realm: de.rwth-aachen.eonerc.acs
  shell: true
  type: generic
  uuid: null # Generate automatically
  whitelist: ["/sbin/ping", "^echo"]
  ws_url: https://villas-new.k8s.eonerc.rwth-aachen.de/ws/relay/generic_1
- category: simulator
  enabled: false
  location: Steffen's Laptop
  name: 'Generic Simulator #2'
  owner: svg
  realm: de.rwth-aachen.eonerc.acs
  shell: true
  type: generic
  uuid: 29462fdd-8ce3-4761-ba95-392730764cd9
  whitelist: ["/sbin/ping", "^echo"]
- category: simulator
  enabled: true
  location: Sonjas's Laptop
  name: 'Dummy Simulator #1'
  owner: svg
  realm: de.rwth-aachen.eonerc.acs
  type: dummy
  uuid: 3ddd318e-fee1-46d7-bff4-7c064d640d4e
"#;

/// `etc/config_dpsim.yaml`: no `category` (VILLAScontroller itself fails
/// with "Unsupported category None").
const CONFIG_DPSIM: &str = r#"
components:
- { location: "Richard's PC", name: "DPsim Simulator #1", owner: rmr, realm: de.rwth-aachen.eonerc.acs,
    type: dpsim, uuid: e15f5ad4-241f-11e8-9bf3-23372608bf60 }
"#;

#[tokio::test]
async fn villascontrollers_example_config_runs_as_it_is() {
    let env = TestEnv::new();
    let mut cfg = Config::parse(CONFIG_YAML, Path::new("config.yaml")).expect("VILLAScontroller's config loads");
    // Only the test's isolation: its own exchange, data and broker.
    cfg.exchange = env.exchange.clone();
    cfg.data_dir = env.dir.path().join("data");
    cfg.broker.url = amqp_url();
    let (d, c, mut l) = env.up_with(cfg).await;
    let dummy: Uuid = "3ddd318e-fee1-46d7-bff4-7c064d640d4e".parse().unwrap();
    let manager: Uuid = "f4751894-205e-11eb-aefb-0741ff98abca".parse().unwrap();
    // The disabled generic simulators are not run; the dummy is, managed by
    // the configured manager, with its descriptive keys echoed.
    assert_eq!(d.shared.env.components.len(), 3, "the daemon's controller, the manager and the dummy");
    c.publish(to_uuid(dummy), &action("ping", json!({})), None).await.unwrap();
    let st = state_of(&mut l, dummy, "idle").await;
    assert_eq!(st["properties"]["owner"], "svg");
    assert_eq!(st["properties"]["location"], "Sonjas's Laptop");
    assert_eq!(st["properties"]["realm"], "de.rwth-aachen.eonerc.acs");
    assert_eq!(st["status"]["managed_by"], manager.to_string());
    c.publish(to_uuid(dummy), &action("start", json!({"runtime": 0})), None).await.unwrap();
    state_of(&mut l, dummy, "running").await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[test]
fn a_component_without_category_takes_it_from_its_type() {
    let cfg = Config::parse(CONFIG_DPSIM, Path::new("config_dpsim.yaml")).expect("loads");
    assert_eq!(cfg.components[0]["category"], "simulator");
    // A type two categories have cannot be guessed: the message says so.
    let e = Config::parse("components:\n- {type: generic, name: G}\n", Path::new("c.yaml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"c.yaml: components[0].category: is required: type "generic" exists as simulator and manager"#
    );
}

#[test]
fn villascontrollers_top_level_keys_are_read() {
    let cfg =
        Config::parse("api: {enabled: true, port: 8090}\nworkdir: /var/lib/villas\n", Path::new("c.yaml")).unwrap();
    assert_eq!(cfg.api.bind.to_string(), "127.0.0.1:8090", "the port, still on loopback");
    assert_eq!(cfg.data_dir, Path::new("/var/lib/villas"));
}
