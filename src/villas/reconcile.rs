//! What VILLASnode and VILLASrelay report, turned into gateway components.
//! Pure; tested against the reference's real responses.

use serde_json::{Map, Value, json};
use std::collections::HashMap;
use uuid::Uuid;

use crate::state::State;

/// The busbar state of a VILLASnode node state (reference §3.8). The raw
/// string is shown as `status.node_state`; VILLASweb paints anything
/// outside the VILLAS states grey, so `stopped`, `""` (disabled) and the
/// setup states are `idle`.
pub fn node_state(s: &str) -> State {
    match s {
        "running" | "connected" | "pending-connect" => State::Running,
        "paused" => State::Paused,
        _ => State::Idle,
    }
}

/// A node's or session's uuid (VILLAS uuids are MD5 digests printed as
/// uuids: any version bits).
pub fn uuid_of(v: &Value) -> Option<Uuid> {
    v.get("uuid")?.as_str()?.parse().ok()
}

/// The spec of the gateway for a VILLASnode node, as the Python controller
/// builds it: the node's keys copied into properties (its config and any
/// metadata), `sub_type` for its type, `ws_url` for websocket nodes; plus
/// `api_url`, which VILLASweb reads and the gateway acts through.
pub fn node_gateway(node: &Value, api_url: &str, external: Option<&str>, realm: Option<&str>) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("category".into(), "gateway".into());
    p.insert("type".into(), "villas-node".into());
    if let Some(obj) = node.as_object() {
        for (k, v) in obj {
            if !matches!(k.as_str(), "type" | "state" | "stats" | "uuid" | "category" | "enabled") {
                p.insert(k.clone(), v.clone());
            }
        }
    }
    let name = node.get("name").and_then(Value::as_str).unwrap_or("node");
    let sub_type = node.get("type").and_then(Value::as_str).unwrap_or_default();
    p.insert("name".into(), name.into());
    p.insert("sub_type".into(), sub_type.into());
    if let Some(u) = uuid_of(node) {
        p.insert("uuid".into(), u.to_string().into());
    }
    if sub_type == "websocket"
        && let Some(ext) = external
    {
        p.insert("ws_url".into(), format!("{}/{name}", ext.trim_end_matches('/')).into());
    }
    // The seed protocol's `signals` (VILLASnode's signal list format): what
    // the node sends out (what a dashboard on its ws_url receives), else
    // what it takes in.
    let list = |dir: &str| node.get(dir).and_then(|d| d.get("signals")).filter(|s| s.is_array()).cloned();
    if let Some(signals) = list("out").or_else(|| list("in")) {
        p.insert("signals".into(), signals);
    }
    p.insert("api_url".into(), api_url.into());
    let node_realm = node.get("realm").and_then(Value::as_str).or(realm);
    if let Some(r) = node_realm {
        p.insert("realm".into(), r.into());
    }
    p
}

/// The spec of the gateway for a relay session: `name` = its identifier,
/// `ws_url` = `<api_url_external>/<identifier>`, the session's keys.
pub fn relay_gateway(
    session: &Value,
    api_url: &str,
    external: Option<&str>,
    realm: Option<&str>,
) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("category".into(), "gateway".into());
    p.insert("type".into(), "villas-relay".into());
    let id = session.get("identifier").and_then(Value::as_str).unwrap_or("session");
    p.insert("name".into(), id.into());
    if let Some(u) = uuid_of(session) {
        p.insert("uuid".into(), u.to_string().into());
    }
    if let Some(ext) = external {
        p.insert("ws_url".into(), format!("{}/{id}", ext.trim_end_matches('/')).into());
    }
    p.insert("api_url".into(), api_url.into());
    if let Some(r) = realm {
        p.insert("realm".into(), r.into());
    }
    p
}

/// A node's link figures from its `stats` (present when the node has a
/// stats hook): samples received, one-way delay, loss, reordered and
/// skipped, for the federation view.
pub fn link_health(node: &Value) -> Option<Map<String, Value>> {
    let stats = node.get("stats")?.as_object()?;
    let mut m = Map::new();
    let get = |k: &str, f: &str| stats.get(k).and_then(|h| h.get(f)).cloned();
    if let Some(v) = get("signal_cnt", "total") {
        m.insert("samples".into(), v);
    }
    if let Some(v) = get("owd", "mean") {
        m.insert("owd_mean".into(), v);
    }
    if let Some(v) = get("owd", "highest") {
        m.insert("owd_max".into(), v);
    }
    if let Some(v) = get("rtp.loss_fraction", "mean") {
        m.insert("loss_fraction".into(), v);
    }
    for k in ["reordered", "skipped", "rtp.pkts_lost"] {
        if let Some(v) = get(k, "total") {
            m.insert(k.replace("rtp.", ""), v);
        }
    }
    Some(m)
}

/// What changed between two listings (nodes or sessions) keyed by uuid.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    /// New uuids, in listing order.
    pub added: Vec<Value>,
    /// Known uuids whose listing changed.
    pub changed: Vec<Value>,
    /// Known uuids no longer listed.
    pub vanished: Vec<Uuid>,
}

/// Compare `now` against `known` (the last listing) and make `known` the
/// new one. Entries without a parseable uuid are skipped; a uuid listed
/// twice counts once.
pub fn diff(known: &mut HashMap<Uuid, Value>, now: &[Value]) -> Diff {
    let mut d = Diff::default();
    let mut next: HashMap<Uuid, Value> = HashMap::with_capacity(now.len());
    for item in now {
        let Some(u) = uuid_of(item) else { continue };
        if next.contains_key(&u) {
            continue;
        }
        match known.get(&u) {
            None => d.added.push(item.clone()),
            Some(old) if old != item => d.changed.push(item.clone()),
            Some(_) => {}
        }
        next.insert(u, item.clone());
    }
    d.vanished = known.keys().filter(|u| !next.contains_key(u)).copied().collect();
    d.vanished.sort();
    *known = next;
    d
}

/// The manager's `status.villas_node`: VILLASnode's own status fields.
pub fn instance_status(status: &Value) -> Value {
    let pick = ["state", "version", "hostname", "uuid", "time_now", "time_started", "timezone", "kernel", "system"];
    let mut m = Map::new();
    for k in pick {
        if let Some(v) = status.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    json!(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_nodes() -> Vec<Value> {
        // reference §3.5.2, trimmed
        serde_json::from_value(json!([
            {"name": "sig", "uuid": "ce3b0366-85d5-13b9-e9e9-59c2f8d391de", "state": "running", "affinity": -1,
             "in": {"hooks": [{"type": "stats"}]}, "out": {"vectorize": 1, "signals": null},
             "stats": {"signal_cnt": {"low": 0.0, "high": 0.0, "total": 16}, "owd": {"total": 15, "mean": 0.0998, "highest": 0.1003}},
             "description": "demo signal generator", "rate": 10, "realm": "custom.realm", "signal": "sine", "type": "signal", "values": 3},
            {"name": "udp_node1", "uuid": "dbc7b593-be14-13fe-4d1b-ca25535fa28f", "state": "running", "affinity": -1,
             "in": {"address": "127.0.0.1:12000"}, "out": {"address": "127.0.0.1:12001"}, "format": "villas.binary", "layer": "udp", "type": "socket"},
            {"name": "unused", "uuid": "64d9a253-0066-37f9-e5b5-d8839cac38a3", "state": "", "affinity": -1, "type": "loopback"},
            {"name": "web_node1", "uuid": "5d8e1774-5503-95fa-0f32-894c2a37587b", "state": "running", "affinity": -1,
             "series": [{"label": "Random walk", "unit": "V"}], "type": "websocket", "vectorize": 2}
        ]))
        .unwrap()
    }

    #[test]
    fn node_states_map_onto_the_villas_states() {
        assert_eq!(node_state("running"), State::Running);
        assert_eq!(node_state("paused"), State::Paused);
        for idle in ["stopped", "", "initialized", "parsed", "checked", "destroyed", "prepared"] {
            assert_eq!(node_state(idle), State::Idle, "{idle:?}");
        }
    }

    #[test]
    fn gateways_copy_the_node_as_the_python_controller_does() {
        let nodes = real_nodes();
        let api = "http://127.0.0.1:8080";
        let sig = node_gateway(&nodes[0], api, Some("ws://lab:8080/"), Some("lab"));
        assert_eq!(sig["type"], "villas-node");
        assert_eq!(sig["sub_type"], "signal");
        assert_eq!(sig["uuid"], "ce3b0366-85d5-13b9-e9e9-59c2f8d391de", "raw MD5 uuids are kept as they are");
        assert_eq!(sig["realm"], "custom.realm", "the node's own realm wins");
        assert_eq!(sig["description"], "demo signal generator");
        assert!(sig.get("ws_url").is_none(), "only websocket nodes have a ws_url");
        assert!(sig.get("stats").is_none() && sig.get("state").is_none(), "live figures go in the status");
        let web = node_gateway(&nodes[3], api, Some("ws://lab:8080/"), Some("lab"));
        assert_eq!(web["ws_url"], "ws://lab:8080/web_node1");
        assert_eq!(web["realm"], "lab");
        assert_eq!(web["api_url"], api);
        assert!(web.get("signals").is_none(), "the trimmed fixture lists no signals");
        let mut with = nodes[3].clone();
        with["out"] = json!({"vectorize": 2, "signals": [{"type": "float", "name": "sine"}]});
        let g = node_gateway(&with, api, None, None);
        assert_eq!(g["signals"], json!([{"type": "float", "name": "sine"}]));
        let health = link_health(&nodes[0]).unwrap();
        assert_eq!(health["samples"], 16);
        assert_eq!(health["owd_mean"], 0.0998);
        assert!(link_health(&nodes[1]).is_none());
    }

    #[test]
    fn a_diff_names_new_changed_and_vanished_entries_once() {
        let mut known = HashMap::new();
        let mut nodes = real_nodes();
        let d = diff(&mut known, &nodes);
        assert_eq!(d.added.len(), 4);
        assert!(diff(&mut known, &nodes).added.is_empty(), "nothing new the second time");
        nodes[1]["state"] = json!("stopped");
        let gone = nodes.remove(2);
        nodes.push(json!({"name": "bad", "uuid": "not a uuid"}));
        nodes.push(nodes[0].clone());
        let d = diff(&mut known, &nodes);
        assert!(d.added.is_empty());
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0]["name"], "udp_node1");
        assert_eq!(d.vanished, vec![uuid_of(&gone).unwrap()]);
        assert!(diff(&mut known, &nodes).vanished.is_empty(), "vanished once");
    }

    #[test]
    fn relay_sessions_become_gateways_named_by_identifier() {
        let s = json!({"identifier": "node_1", "uuid": "cb3b1ce3-35ab-f3a5-2052-bba5edf36969", "connections": [], "created": 1, "connects": 0});
        let g = relay_gateway(&s, "http://relay:8088", Some("wss://lab/relay"), None);
        assert_eq!(g["name"], "node_1");
        assert_eq!(g["type"], "villas-relay");
        assert_eq!(g["ws_url"], "wss://lab/relay/node_1");
        assert_eq!(g["uuid"], "cb3b1ce3-35ab-f3a5-2052-bba5edf36969");
    }
}
