//! The NGSI-v2 northbound: the Context Broker requests iotagent-node-lib
//! makes for accepted measures (`../shared/reference/iot-platform.md`
//! §2.2), built from the mapped measures. Pure; the sender is `cb.rs`.
//!
//! - One measure → `POST /v2/entities?options=upsert` with the entity;
//!   several → `POST /v2/op/update` `{"actionType":"append","entities":…}`,
//!   in ascending time order, as upstream re-orders them.
//! - Entity: `id` = the device's entity name (`<entity_type>:<device_id>`
//!   unless `entity_name` is set), `type`; then the device's static
//!   attributes, the group's (those the device does not override), the
//!   measured attributes (`{"type", "value"}`), and `TimeInstant`
//!   (`DateTime`) when the measure carried one or `timestamp` is on, in
//!   which case every attribute also gets a `TimeInstant` metadata.
//! - Headers `fiware-service` and `fiware-servicepath`.

use serde_json::{Map, Value, json};

use super::mapping::Mapped;
use super::model::{Device, Group, Tenant};

/// One request to a Context Broker, as queued (JSON in the store).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// The Context Broker's base URL (`http://orion:1026`).
    pub cbroker: String,
    /// `/v2/entities?options=upsert` or `/v2/op/update`.
    pub path: String,
    /// `fiware-service`.
    pub service: String,
    /// `fiware-servicepath`.
    pub servicepath: String,
    /// The JSON body.
    pub body: Value,
}

/// The Context Broker of a device: the device's `cbroker`, its group's, or
/// the gateway's (iotagent-node-lib's precedence).
pub fn cbroker_of(device: &Device, group: Option<&Group>, gateway: Option<&str>) -> Option<String> {
    let own = |extra: &Map<String, Value>| extra.get("cbroker").and_then(Value::as_str).map(str::to_owned);
    own(&device.extra).or_else(|| group.and_then(|g| own(&g.extra))).or_else(|| gateway.map(str::to_owned))
}

/// Whether measures get `TimeInstant`: the device's `timestamp`, its
/// group's, or the gateway's.
pub fn timestamp_of(device: &Device, group: Option<&Group>, gateway: bool) -> bool {
    device.mapping.timestamp.or(group.and_then(|g| g.mapping.timestamp)).unwrap_or(gateway)
}

/// ISO 8601 with milliseconds, as node-lib writes `TimeInstant`.
fn iso_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{}", t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")))
        .unwrap_or_default()
}

/// The entity of one measure.
fn entity(m: &Mapped, device: &Device, group: Option<&Group>, id: &str, kind: &str, timestamp: bool) -> Value {
    let mut e = Map::new();
    e.insert("id".into(), id.into());
    e.insert("type".into(), kind.into());
    let time = if timestamp { Some(iso_ms(m.timestamp_ms)) } else { m.time_instant.clone() };
    let attr = |kind: &str, value: &Value| {
        let mut a = json!({"type": kind, "value": value});
        if timestamp && let Some(t) = &time {
            a["metadata"] = json!({"TimeInstant": {"type": "DateTime", "value": t}});
        }
        a
    };
    // Statics first: the device's, then the group's it does not override.
    let device_statics = &device.mapping.static_attributes;
    let statics = device_statics.iter().chain(
        group
            .into_iter()
            .flat_map(|g| g.mapping.static_attributes.iter())
            .filter(|s| !device_statics.iter().any(|d| d.name == s.name)),
    );
    let mut static_names = Vec::new();
    for s in statics {
        if let Some(v) = &s.value {
            e.insert(s.name.clone(), attr(&s.kind, v));
            static_names.push(s.name.as_str());
        }
    }
    for (name, (kind, value)) in &m.attrs {
        if !static_names.contains(&name.as_str()) {
            e.insert(name.clone(), attr(kind, value));
        }
    }
    if let Some(t) = time {
        e.insert("TimeInstant".into(), json!({"type": "DateTime", "value": t}));
    }
    Value::Object(e)
}

/// The request for `measures` of one device (all accepted at once), or
/// `None` when there is nothing to send.
pub fn request(
    measures: &[Mapped],
    device: &Device,
    group: Option<&Group>,
    tenant: &Tenant,
    cbroker: String,
    timestamp: bool,
) -> Option<Request> {
    let id = device.entity_name(group);
    let kind = device.entity_type(group);
    let mut ordered: Vec<&Mapped> = measures.iter().collect();
    // Upstream re-orders a multimeasure by time, ascending (stable).
    ordered.sort_by_key(|m| m.timestamp_ms);
    let (path, body) = match ordered.as_slice() {
        [] => return None,
        [one] => ("/v2/entities?options=upsert", entity(one, device, group, &id, kind, timestamp)),
        many => {
            let entities: Vec<Value> = many.iter().map(|m| entity(m, device, group, &id, kind, timestamp)).collect();
            ("/v2/op/update", json!({"actionType": "append", "entities": entities}))
        }
    };
    Some(Request {
        cbroker: cbroker.trim_end_matches('/').to_owned(),
        path: path.into(),
        service: tenant.service.clone(),
        servicepath: tenant.servicepath.clone(),
        body,
    })
}

/// The answer to the Context Broker's `POST /v2/op/query` for one entity
/// (`id`, `type`) of `device`: each asked attribute (none asked: every lazy
/// one) with an empty value of its declared type, as iotagent-node-lib's
/// default query handler answers (iotagent-json implements no lazy
/// attributes). A type is the one the device's or group's `lazy` list
/// declares, else the one its `attributes` declare, else `Text`.
pub fn query_answer(id: &str, entity_type: &str, device: &Device, group: Option<&Group>, asked: &[String]) -> Value {
    let declared = |list: &str| -> Vec<(String, String)> {
        let from = |extra: &Map<String, Value>| -> Vec<(String, String)> {
            extra
                .get(list)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| {
                            let name = v.get("name").and_then(Value::as_str)?;
                            let kind = v.get("type").and_then(Value::as_str).unwrap_or("Text");
                            Some((name.to_owned(), kind.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out = from(&device.extra);
        if let Some(g) = group {
            out.extend(from(&g.extra));
        }
        out
    };
    let lazy = declared("lazy");
    let active: Vec<(String, String)> =
        device.mapping.attributes.iter().map(|a| (a.name.clone(), a.kind.clone())).collect();
    let names: Vec<String> =
        if asked.is_empty() { lazy.iter().map(|(n, _)| n.clone()).collect() } else { asked.to_vec() };
    let mut entity = Map::new();
    entity.insert("id".into(), id.into());
    entity.insert("type".into(), entity_type.into());
    for n in names {
        let kind = lazy.iter().chain(active.iter()).find(|(name, _)| *name == n).map_or("Text", |(_, k)| k.as_str());
        entity.insert(n, json!({"type": kind, "value": ""}));
    }
    Value::Object(entity)
}

#[cfg(test)]
mod tests {
    use super::super::mapping::map_measures;
    use super::*;

    fn group() -> Group {
        serde_json::from_value(json!({"resource": "/iot/json", "apikey": "k1", "entity_type": "Sensor",
            "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
            "static_attributes": [{"name": "lab", "type": "Text", "value": "L1"}]}))
        .unwrap()
    }

    fn tenant() -> Tenant {
        Tenant { service: "lab".into(), servicepath: "/".into() }
    }

    /// The reference's first example (§2.2), byte for byte.
    #[test]
    fn one_measure_is_an_upsert_with_statics_first_as_observed() {
        let g = group();
        let d: Device = serde_json::from_value(json!({"device_id": "dev1", "entity_name": "urn:lab:Sensor:dev1",
            "static_attributes": [{"name": "room", "type": "Text", "value": "B12"}]}))
        .unwrap();
        let m = map_measures(&json!({"t": 21.5, "h": 40}), &d, Some(&g), None, 0).unwrap();
        let r = request(&m, &d, Some(&g), &tenant(), "http://orion:1026/".into(), false).unwrap();
        assert_eq!(r.path, "/v2/entities?options=upsert");
        assert_eq!(r.cbroker, "http://orion:1026");
        assert_eq!(
            serde_json::to_string(&r.body).unwrap(),
            r#"{"id":"urn:lab:Sensor:dev1","type":"Sensor","room":{"type":"Text","value":"B12"},"lab":{"type":"Text","value":"L1"},"temperature":{"type":"Number","value":21.5},"h":{"type":"Text","value":40}}"#
        );
    }

    /// The second example: a multimeasure re-ordered ascending, with the
    /// measures' own TimeInstants.
    #[test]
    fn a_multimeasure_is_an_append_in_time_order() {
        let g = group();
        let d: Device =
            serde_json::from_value(json!({"device_id": "dev1", "entity_name": "urn:lab:Sensor:dev1"})).unwrap();
        let body =
            json!([{"t": 1, "TimeInstant": "2024-04-10T10:15:00Z"}, {"t": 2, "TimeInstant": "2024-04-10T10:05:00Z"}]);
        let m = map_measures(&body, &d, Some(&g), None, 0).unwrap();
        let r = request(&m, &d, Some(&g), &tenant(), "http://orion:1026".into(), false).unwrap();
        assert_eq!(r.path, "/v2/op/update");
        assert_eq!(r.body["actionType"], "append");
        let e = r.body["entities"].as_array().unwrap();
        assert_eq!(e[0]["temperature"]["value"], 2);
        assert_eq!(e[0]["TimeInstant"], json!({"type": "DateTime", "value": "2024-04-10T10:05:00Z"}));
        assert_eq!(e[1]["temperature"]["value"], 1);
        assert_eq!(e[1]["lab"], json!({"type": "Text", "value": "L1"}));
    }

    /// The third: an autoprovisioned device (entity `Sensor:auto7`) with
    /// `timestamp` on: metadata on every attribute and a TimeInstant.
    #[test]
    fn timestamp_adds_time_instant_everywhere_with_milliseconds() {
        let g = group();
        let d: Device = serde_json::from_value(json!({"device_id": "auto7"})).unwrap();
        let now = 1_795_375_594_749; // 2026-11-22T19:26:34.749Z
        let m = map_measures(&json!({"t": 5, "x": "extra"}), &d, Some(&g), None, now).unwrap();
        let r = request(&m, &d, Some(&g), &tenant(), "http://orion:1026".into(), true).unwrap();
        let t = json!({"TimeInstant": {"type": "DateTime", "value": "2026-11-22T19:26:34.749Z"}});
        assert_eq!(
            r.body,
            json!({"id": "Sensor:auto7", "type": "Sensor",
                "lab": {"type": "Text", "value": "L1", "metadata": t},
                "temperature": {"type": "Number", "value": 5, "metadata": t},
                "x": {"type": "Text", "value": "extra", "metadata": t},
                "TimeInstant": {"type": "DateTime", "value": "2026-11-22T19:26:34.749Z"}})
        );
        let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "type", "lab", "temperature", "x", "TimeInstant"]);
    }

    #[test]
    fn an_http_t_parameter_becomes_the_time_instant_and_ids_are_renamed() {
        let g = group();
        let d: Device = serde_json::from_value(json!({"device_id": "d"})).unwrap();
        let m = map_measures(
            &json!({"id": "spoof", "type": "Spoof", "t": 1}),
            &d,
            Some(&g),
            Some("2020-02-22T22:22:22Z"),
            0,
        )
        .unwrap();
        let r = request(&m, &d, Some(&g), &tenant(), "http://cb".into(), false).unwrap();
        assert_eq!(r.body["measure_id"], json!({"type": "Text", "value": "spoof"}));
        assert_eq!(r.body["measure_type"], json!({"type": "Text", "value": "Spoof"}));
        assert_eq!(r.body["id"], "Sensor:d");
        assert_eq!(r.body["TimeInstant"], json!({"type": "DateTime", "value": "2020-02-22T22:22:22Z"}));
    }

    #[test]
    fn the_device_cbroker_wins_over_the_groups_and_the_gateways() {
        let mut g = group();
        let d: Device = serde_json::from_value(json!({"device_id": "d", "cbroker": "http://dev-cb"})).unwrap();
        let plain: Device = serde_json::from_value(json!({"device_id": "p"})).unwrap();
        assert_eq!(cbroker_of(&d, Some(&g), Some("http://gw")).as_deref(), Some("http://dev-cb"));
        assert_eq!(cbroker_of(&plain, Some(&g), Some("http://gw")).as_deref(), Some("http://gw"));
        g.extra.insert("cbroker".into(), json!("http://group-cb"));
        assert_eq!(cbroker_of(&plain, Some(&g), Some("http://gw")).as_deref(), Some("http://group-cb"));
        assert_eq!(cbroker_of(&plain, None, None), None);
        assert!(timestamp_of(&plain, Some(&g), true));
    }
}
