//! Pure southbound rules: which device a topic names, and how a measure
//! becomes attributes (reference §2.2), then a `device-data` message for
//! the federation. No I/O; every rule is unit-tested here.

use indexmap::IndexMap;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::model::{Attribute, Device, Group, Tenant};

/// Where a measure came from, as a topic or routing key names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// iotagent-json: `/json/{apikey}/{id}/attrs[/{attr}]` and its legacy forms.
    Apikey {
        /// The group's (or device's) apikey.
        apikey: String,
        /// The device id.
        device_id: String,
        /// A single attribute, for `…/attrs/{attr}`.
        attr: Option<String>,
    },
    /// dojot: `{tenant}:{device}/attrs` or `/{tenant}/{device}/attrs`.
    Dojot {
        /// The tenant (fiware-service).
        tenant: String,
        /// The device id.
        device_id: String,
    },
}

/// Parse an MQTT topic (after the gateway's prefix is removed). The
/// iotagent-json grammar: a missing leading `/` is added, a first segment
/// `json` (any case) is dropped, then `apikey/id/attrs[/attr]`. With
/// `dojot`, `tenant:device/attrs` too; `/{x}/{y}/attrs` is ambiguous and is
/// resolved by the caller (an apikey first, then a dojot tenant).
pub fn parse_topic(topic: &str, dojot: bool) -> Option<Address> {
    if dojot
        && let Some(id) = topic.strip_suffix("/attrs")
        && !id.contains('/')
        && let Some((tenant, device)) = id.split_once(':')
        && !tenant.is_empty()
        && !device.is_empty()
    {
        return Some(Address::Dojot { tenant: tenant.into(), device_id: device.into() });
    }
    let had_slash = topic.starts_with('/');
    let mut parts: Vec<&str> = topic.trim_start_matches('/').split('/').collect();
    if parts.first().is_some_and(|p| p.eq_ignore_ascii_case("json")) {
        parts.remove(0);
    } else if !had_slash {
        // `{apikey}/{id}/attrs` is not an iotagent-json topic (reference §1).
        return None;
    }
    match parts.as_slice() {
        [apikey, id, "attrs"] => Some(apikey_address(apikey, id, None)),
        [apikey, id, "attrs", attr] if !attr.is_empty() => Some(apikey_address(apikey, id, Some(attr))),
        _ => None,
    }
    .filter(|a| matches!(a, Address::Apikey { apikey, device_id, .. } if !apikey.is_empty() && !device_id.is_empty()))
}

/// Parse an MQTT command result topic (after the prefix is removed):
/// `/{apikey}/{id}/cmdexe`, with the same grammar as measures (`/json/…`,
/// `json/…`). Returns the apikey and the device id.
pub fn parse_cmdexe(topic: &str) -> Option<(String, String)> {
    parse_device_topic(topic, &["cmdexe"])
}

/// Parse a configuration request topic (after the prefix is removed):
/// `/{apikey}/{id}/configuration/commands`, same grammar.
pub fn parse_configuration(topic: &str) -> Option<(String, String)> {
    parse_device_topic(topic, &["configuration", "commands"])
}

/// `/{apikey}/{id}/{suffix…}` with an optional `json` first level (a
/// topic without a leading slash needs it).
fn parse_device_topic(topic: &str, suffix: &[&str]) -> Option<(String, String)> {
    let had_slash = topic.starts_with('/');
    let mut parts: Vec<&str> = topic.trim_start_matches('/').split('/').collect();
    if parts.first().is_some_and(|p| p.eq_ignore_ascii_case("json")) && parts.len() == 3 + suffix.len() {
        parts.remove(0);
    } else if !had_slash {
        return None;
    }
    match parts.as_slice() {
        [apikey, id, rest @ ..] if rest == suffix && !apikey.is_empty() && !id.is_empty() => {
            Some(((*apikey).into(), (*id).into()))
        }
        _ => None,
    }
}

fn apikey_address(apikey: &str, id: &str, attr: Option<&str>) -> Address {
    Address::Apikey { apikey: apikey.into(), device_id: id.into(), attr: attr.map(Into::into) }
}

/// Parse an AMQP southbound routing key `.{apikey}.{id}.attrs[.{attr}]`.
pub fn parse_routing_key(key: &str) -> Option<Address> {
    let parts: Vec<&str> = key.strip_prefix('.')?.split('.').collect();
    match parts.as_slice() {
        [apikey, id, "attrs"] if !apikey.is_empty() && !id.is_empty() => Some(apikey_address(apikey, id, None)),
        [apikey, id, "attrs", attr] if !apikey.is_empty() && !id.is_empty() && !attr.is_empty() => {
            Some(apikey_address(apikey, id, Some(attr)))
        }
        _ => None,
    }
}

/// Parse an AMQP command result routing key `.{apikey}.{id}.cmdexe`.
pub fn parse_routing_cmdexe(key: &str) -> Option<(String, String)> {
    match key.strip_prefix('.')?.split('.').collect::<Vec<_>>().as_slice() {
        [apikey, id, "cmdexe"] if !apikey.is_empty() && !id.is_empty() => Some(((*apikey).into(), (*id).into())),
        _ => None,
    }
}

/// A single-attribute body: JSON if it parses, else text (UTF-8) or, for
/// binary, lowercase hex as iotagent-json does.
pub fn single_value(body: &[u8], binary: bool) -> Value {
    if !binary && let Ok(v) = serde_json::from_slice::<Value>(body) {
        return v;
    }
    match std::str::from_utf8(body) {
        Ok(s) if !binary => Value::String(s.to_owned()),
        _ => Value::String(body.iter().map(|b| format!("{b:02x}")).collect()),
    }
}

/// One mapped measure: attributes in order, with types, and its time.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// name → (type, value).
    pub attrs: IndexMap<String, (String, Value)>,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// The measure's own time as sent (`TimeInstant`, or HTTP's `t=`), for
    /// the Context Broker's `TimeInstant` attribute.
    pub time_instant: Option<String>,
}

/// Why a measure body cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeasureError {
    /// Not a measure: a scalar, an empty object, a bad attribute name.
    #[error("Unprocessable payload: {0}")]
    Payload(String),
    /// A `TimeInstant` or `t=` that is not ISO 8601.
    #[error("Invalid ISO8601 timestamp [{0}]")]
    Timestamp(String),
}

impl MeasureError {
    fn payload(detail: impl std::fmt::Display) -> MeasureError {
        MeasureError::Payload(detail.to_string())
    }
}

/// The time of a measure: an ISO-8601 `TimeInstant`, else `t=`, else now.
fn parse_time(s: &str) -> Result<i64, MeasureError> {
    let ts: jiff::Timestamp = s.parse().map_err(|_| MeasureError::Timestamp(s.to_owned()))?;
    Ok(ts.as_millisecond())
}

fn explicit_names(device: &Device, group: Option<&Group>) -> Option<Vec<String>> {
    let v = device.mapping.explicit_attrs.as_ref().or(group.and_then(|g| g.mapping.explicit_attrs.as_ref()))?;
    match v {
        Value::Bool(true) => {
            let provisioned =
                device.mapping.attributes.iter().chain(group.iter().flat_map(|g| g.mapping.attributes.iter()));
            Some(provisioned.map(|a| a.name.clone()).collect())
        }
        Value::Array(a) => Some(a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()),
        _ => None,
    }
}

fn lookup<'a>(key: &str, device: &'a Device, group: Option<&'a Group>) -> Option<&'a Attribute> {
    let all = device.mapping.attributes.iter().chain(group.iter().flat_map(|g| g.mapping.attributes.iter()));
    let mut by_name = None;
    for a in all {
        match &a.object_id {
            Some(o) if o == key => return Some(a),
            None if a.name == key && by_name.is_none() => by_name = Some(a),
            _ => {}
        }
    }
    by_name
}

/// Map a measure body (an object, or an array of objects processed in
/// order) of `device` in `group`. `t` is HTTP's `t=`; `now_ms` the server
/// time. Scalars, `{}`, and arrays of non-objects are refused.
pub fn map_measures(
    body: &Value,
    device: &Device,
    group: Option<&Group>,
    t: Option<&str>,
    now_ms: i64,
) -> Result<Vec<Mapped>, MeasureError> {
    let items: Vec<&Map<String, Value>> = match body {
        Value::Object(o) => vec![o],
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| x.as_object().ok_or_else(|| MeasureError::payload("a multimeasure array holds only objects")))
            .collect::<Result<_, _>>()?,
        Value::Array(_) => return Err(MeasureError::payload("empty multimeasure array")),
        other => return Err(MeasureError::payload(format!("a measure is a JSON object, not {other}"))),
    };
    let default_time = match t {
        Some(t) => (parse_time(t)?, Some(t)),
        None => (now_ms, None),
    };
    let explicit = explicit_names(device, group);
    let mapped: Vec<Option<Mapped>> = items
        .into_iter()
        .map(|o| map_one(o, device, group, default_time, explicit.as_deref()))
        .collect::<Result<_, _>>()?;
    Ok(mapped.into_iter().flatten().collect())
}

fn map_one(
    o: &Map<String, Value>,
    device: &Device,
    group: Option<&Group>,
    default_time: (i64, Option<&str>),
    explicit: Option<&[String]>,
) -> Result<Option<Mapped>, MeasureError> {
    let mut attrs = IndexMap::new();
    let mut time = default_time.0;
    let mut time_instant = default_time.1.map(str::to_owned);
    // Whether the measure had any attribute at all (before explicitAttrs).
    let mut any = false;
    for (key, value) in o {
        if value.is_null() {
            continue;
        }
        if !super::model::attr_name_ok(key) {
            let shown: String = key.chars().take(40).flat_map(char::escape_default).collect();
            return Err(MeasureError::payload(format!("invalid attribute name \"{shown}\"")));
        }
        if key == "TimeInstant" {
            let given = value.as_str().ok_or_else(|| MeasureError::payload("TimeInstant must be a string"))?;
            time = parse_time(given)?;
            time_instant = Some(given.to_owned());
            continue;
        }
        let (name, kind) = match lookup(key, device, group) {
            Some(a) => (a.name.clone(), a.kind.clone()),
            None => match key.as_str() {
                "id" => ("measure_id".to_owned(), "Text".to_owned()),
                "type" => ("measure_type".to_owned(), "Text".to_owned()),
                _ => (key.clone(), "Text".to_owned()),
            },
        };
        any = true;
        if let Some(allowed) = explicit {
            let object_id = lookup(key, device, group).and_then(|a| a.object_id.clone());
            if !allowed.iter().any(|n| *n == name || Some(n) == object_id.as_ref()) {
                continue;
            }
        }
        attrs.insert(name, (kind, value.clone()));
    }
    if !any {
        return Err(MeasureError::payload("the measure has no attributes"));
    }
    if attrs.is_empty() {
        // Every attribute was left out by explicitAttrs, as configured:
        // accepted, and nothing is published.
        return Ok(None);
    }
    // Statics: the group's, overridden by the device's of the same name.
    let statics =
        group.iter().flat_map(|g| g.mapping.static_attributes.iter()).chain(device.mapping.static_attributes.iter());
    for s in statics {
        if let Some(v) = &s.value {
            attrs.insert(s.name.clone(), (s.kind.clone(), v.clone()));
        }
    }
    apply_expressions(o, device, group, explicit, &mut attrs);
    Ok(Some(Mapped { attrs, timestamp_ms: time, time_instant }))
}

/// The provisioned attributes with an `expression` (the group's, then the
/// device's, which win by name).
fn expression_attributes<'a>(device: &'a Device, group: Option<&'a Group>) -> Vec<(&'a Attribute, &'a str)> {
    let mut out: Vec<(&Attribute, &str)> = Vec::new();
    let all = group.iter().flat_map(|g| g.mapping.attributes.iter()).chain(device.mapping.attributes.iter());
    for a in all {
        if let Some(e) = a.extra.get("expression").and_then(Value::as_str) {
            out.retain(|(b, _)| b.name != a.name);
            out.push((a, e));
        }
    }
    out
}

/// Compute the attributes that have an `expression` (iotagent-node-lib's
/// expression plugin): the context is the measure's keys, the mapped
/// attribute names, the statics, and `id`/`type` (entity name and type)
/// where the measure has no such key; each result also enters the context
/// of the next. A result replaces the measured value or adds the
/// attribute (if `explicitAttrs` allows it); an expression that fails (an
/// attribute the measure lacks) leaves its attribute out of this measure,
/// rather than sending an unconverted value.
fn apply_expressions(
    o: &Map<String, Value>,
    device: &Device,
    group: Option<&Group>,
    explicit: Option<&[String]>,
    attrs: &mut IndexMap<String, (String, Value)>,
) {
    let exprs = expression_attributes(device, group);
    if exprs.is_empty() {
        return;
    }
    let mut ctx: Map<String, Value> = o.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (name, (_, v)) in attrs.iter() {
        ctx.entry(name.clone()).or_insert_with(|| v.clone());
    }
    ctx.entry("id").or_insert_with(|| device.entity_name(group).into());
    ctx.entry("type").or_insert_with(|| device.entity_type(group).into());
    for (a, expr) in exprs {
        if explicit.is_some_and(|allowed| !allowed.contains(&a.name)) {
            continue;
        }
        match super::expression::evaluate(expr, &ctx) {
            Ok(v) if !v.is_null() => {
                ctx.insert(a.name.clone(), v.clone());
                attrs.insert(a.name.clone(), (a.kind.clone(), v));
            }
            _ => {
                attrs.shift_remove(&a.name);
            }
        }
    }
}

/// Who sends a measure into the federation, for its `device-data` message.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    /// The device's tenant.
    pub tenant: &'a Tenant,
    /// The device id.
    pub device_id: &'a str,
    /// Its entity name.
    pub entity_name: &'a str,
    /// Its entity type.
    pub entity_type: &'a str,
    /// The gateway's uuid.
    pub gateway: Uuid,
    /// The gateway's realm.
    pub realm: &'a str,
}

/// A routing key segment: dots would split it into two segments.
fn segment(s: &str) -> String {
    s.replace('.', "_")
}

impl Origin<'_> {
    /// `{realm}.{service}.{entity_type}.{device_id}` with dots in the last
    /// three replaced by `_`.
    pub fn routing_key(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.realm,
            segment(&self.tenant.service),
            segment(self.entity_type),
            segment(self.device_id)
        )
    }

    /// The dojot `device-data` message, extended with the FIWARE tenancy,
    /// entity and the gateway; `types` carries the attribute types.
    /// Serialised straight from the measure, without an intermediate JSON
    /// tree (it is built once per measure on the hot path).
    pub fn device_data(&self, m: &Mapped) -> Vec<u8> {
        let message = DeviceData {
            metadata: Metadata {
                deviceid: self.device_id,
                tenant: &self.tenant.service,
                timestamp: m.timestamp_ms,
                service: &self.tenant.service,
                servicepath: &self.tenant.servicepath,
                entity_name: self.entity_name,
                entity_type: self.entity_type,
                gateway: self.gateway,
                types: Types(&m.attrs),
            },
            attrs: Values(&m.attrs),
        };
        serde_json::to_vec(&message).expect("a device-data message always serialises")
    }
}

/// `device-data` (seed 001 §2.6) with busbar's additions.
#[derive(serde::Serialize)]
struct DeviceData<'a> {
    metadata: Metadata<'a>,
    attrs: Values<'a>,
}

#[derive(serde::Serialize)]
struct Metadata<'a> {
    deviceid: &'a str,
    tenant: &'a str,
    timestamp: i64,
    service: &'a str,
    servicepath: &'a str,
    entity_name: &'a str,
    entity_type: &'a str,
    gateway: Uuid,
    types: Types<'a>,
}

/// Attribute name → type.
struct Types<'a>(&'a IndexMap<String, (String, Value)>);

/// Attribute name → value.
struct Values<'a>(&'a IndexMap<String, (String, Value)>);

impl serde::Serialize for Types<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, (t, _))| (k, t)))
    }
}

impl serde::Serialize for Values<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, (_, v))| (k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iot::model::{parse_device, parse_group};
    use serde_json::json;

    fn dev(v: Value) -> Device {
        parse_device(&v).unwrap()
    }

    fn grp(v: Value) -> Group {
        parse_group(&v).unwrap()
    }

    fn key(apikey: &str, id: &str, attr: Option<&str>) -> Option<Address> {
        Some(apikey_address(apikey, id, attr))
    }

    #[test]
    fn expressions_compute_attributes_as_the_reference_shows() {
        // Reference §2.2: explicitAttrs group, {"t":20,"junk":1}, expression
        // t*9/5+32 → temperature 20, tempF 68, junk dropped.
        let g = grp(json!({"resource": "/iot/json", "apikey": "k", "explicitAttrs": true, "attributes": [
            {"object_id": "t", "name": "temperature", "type": "Number"},
            {"name": "tempF", "type": "Number", "expression": "t*9/5+32"}]}));
        let d = dev(json!({"device_id": "d1"}));
        let m = map_measures(&json!({"t": 20, "junk": 1}), &d, Some(&g), None, 0).unwrap();
        let got: Vec<(&str, &Value)> = m[0].attrs.iter().map(|(k, (_, v))| (k.as_str(), v)).collect();
        assert_eq!(got, [("temperature", &json!(20)), ("tempF", &json!(68))]);
        // A measured attribute with an expression is replaced; a statics and
        // an earlier result are in the context; a failing one is left out.
        let d = dev(json!({"device_id": "d2", "attributes": [
            {"object_id": "p", "name": "power", "type": "Number", "expression": "p * scale"},
            {"name": "label", "type": "Text", "expression": "id + ':' + power|tostring"},
            {"name": "broken", "type": "Number", "expression": "nothere * 2"}],
            "static_attributes": [{"name": "scale", "type": "Number", "value": 1000}]}));
        let m = map_measures(&json!({"p": 1.5}), &d, None, None, 0).unwrap();
        assert_eq!(m[0].attrs["power"].1, json!(1500));
        assert_eq!(m[0].attrs["label"].1, json!("Thing:d2:1500"));
        assert!(!m[0].attrs.contains_key("broken"));
        // Provisioning refuses what cannot parse, and non-strings.
        let bad = json!({"device_id": "d", "attributes": [{"name": "x", "type": "Number", "expression": "x * ("}]});
        assert_eq!(parse_device(&bad).unwrap_err().name, "INVALID_EXPRESSION");
        let bad = json!({"device_id": "d", "attributes": [{"name": "x", "type": "Number", "expression": 3}]});
        assert_eq!(parse_device(&bad).unwrap_err().name, "WRONG_EXPRESSION_TYPE");
    }

    #[test]
    fn command_results_use_the_measure_grammar() {
        let kd = Some(("k1".to_owned(), "dev1".to_owned()));
        for t in ["/json/k1/dev1/cmdexe", "json/k1/dev1/cmdexe", "/k1/dev1/cmdexe", "/JSON/k1/dev1/cmdexe"] {
            assert_eq!(parse_cmdexe(t), kd, "{t}");
        }
        assert_eq!(parse_configuration("/json/k1/dev1/configuration/commands"), kd);
        assert_eq!(parse_configuration("/k1/dev1/configuration/commands"), kd);
        assert_eq!(parse_configuration("/k1/dev1/configuration/values"), None);
        assert_eq!(parse_configuration("/k1/dev1/cmdexe"), None);
        assert_eq!(parse_routing_cmdexe(".k1.dev1.cmdexe"), kd);
        assert_eq!(parse_routing_cmdexe(".k1.dev1.cmd"), None);
        assert_eq!(parse_routing_cmdexe("k1.dev1.cmdexe"), None);
        for t in ["k1/dev1/cmdexe", "/k1/dev1/cmd", "/k1//cmdexe", "/json/k1/dev1/cmdexe/x", "/k1/dev1/attrs"] {
            assert_eq!(parse_cmdexe(t), None, "{t}");
        }
    }

    #[test]
    fn topics_follow_the_iotagent_json_grammar() {
        assert_eq!(parse_topic("/json/k1/dev1/attrs", false), key("k1", "dev1", None));
        assert_eq!(parse_topic("/json/k1/dev1/attrs/t", false), key("k1", "dev1", Some("t")));
        assert_eq!(parse_topic("json/k1/dev1/attrs", false), key("k1", "dev1", None));
        assert_eq!(parse_topic("/JSON/k1/dev1/attrs", false), key("k1", "dev1", None));
        assert_eq!(parse_topic("/k1/dev1/attrs", false), key("k1", "dev1", None));
        assert_eq!(parse_topic("/k1/dev1/attrs/t", false), key("k1", "dev1", Some("t")));
        for bad in ["k1/dev1/attrs", "/json/k1/dev1/cmd", "/json//dev1/attrs", "/json/k1/dev1/attrs/", "/a/b/c/d/e"] {
            assert_eq!(parse_topic(bad, false), None, "{bad}");
        }
        assert_eq!(
            parse_topic("admin:a1998e/attrs", true),
            Some(Address::Dojot { tenant: "admin".into(), device_id: "a1998e".into() })
        );
        assert_eq!(parse_topic("admin:a1998e/attrs", false), None);
        // The Mosca form reads as an apikey topic; the caller tries a tenant next.
        assert_eq!(parse_topic("/admin/efac/attrs", true), key("admin", "efac", None));
    }

    #[test]
    fn routing_keys_follow_the_amqp_binding() {
        assert_eq!(parse_routing_key(".k1.dev1.attrs"), key("k1", "dev1", None));
        assert_eq!(parse_routing_key(".k1.dev1.attrs.t"), key("k1", "dev1", Some("t")));
        for bad in ["k1.dev1.attrs", ".k1.dev1.cmd", "..dev1.attrs", ".k1.dev1.attrs.t.x"] {
            assert_eq!(parse_routing_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn single_values_are_json_text_or_hex() {
        assert_eq!(single_value(b"34", false), json!(34));
        assert_eq!(single_value(b"hello", false), json!("hello"));
        assert_eq!(single_value(b"hello", true), json!("68656c6c6f"));
        assert_eq!(single_value(&[0xff, 0x00], false), json!("ff00"));
    }

    fn attrs(m: &Mapped) -> Value {
        Value::Object(m.attrs.iter().map(|(k, (t, v))| (k.clone(), json!({"type": t, "value": v}))).collect())
    }

    #[test]
    fn the_observed_upstream_mapping_with_aliases_types_and_statics() {
        // Reference §2.2: dev1 with t→temperature:Number, group static lab, device static room.
        let g = grp(json!({"resource": "/iot/json", "apikey": "k1", "entity_type": "Sensor",
            "static_attributes": [{"name": "lab", "type": "Text", "value": "L1"}]}));
        let d = dev(json!({"device_id": "dev1", "entity_name": "urn:lab:Sensor:dev1",
            "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
            "static_attributes": [{"name": "room", "type": "Text", "value": "B12"}]}));
        let m = map_measures(&json!({"t": 21.5, "h": 40}), &d, Some(&g), None, 7).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(
            attrs(&m[0]),
            json!({"temperature": {"type": "Number", "value": 21.5}, "h": {"type": "Text", "value": 40},
                "lab": {"type": "Text", "value": "L1"}, "room": {"type": "Text", "value": "B12"}})
        );
        assert_eq!(m[0].timestamp_ms, 7);
    }

    #[test]
    fn nulls_drop_and_id_and_type_are_renamed() {
        let d = dev(json!({"device_id": "d"}));
        let m =
            map_measures(&json!({"id": "spoof", "type": "Spoof", "t": 1, "gone": null}), &d, None, None, 0).unwrap();
        assert_eq!(
            attrs(&m[0]),
            json!({"measure_id": {"type": "Text", "value": "spoof"}, "measure_type": {"type": "Text", "value": "Spoof"},
                "t": {"type": "Text", "value": 1}})
        );
    }

    #[test]
    fn explicit_attrs_keep_only_provisioned_or_listed_attributes() {
        let d = dev(json!({"device_id": "d", "explicitAttrs": true,
            "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
            "static_attributes": [{"name": "room", "type": "Text", "value": "B12"}]}));
        let m = map_measures(&json!({"t": 20, "junk": 1}), &d, None, None, 0).unwrap();
        assert_eq!(m[0].attrs.keys().collect::<Vec<_>>(), ["temperature", "room"]);
        let listed = dev(json!({"device_id": "d", "explicitAttrs": ["h"]}));
        let m = map_measures(&json!({"h": 1, "junk": 2}), &listed, None, None, 0).unwrap();
        assert_eq!(m[0].attrs.keys().collect::<Vec<_>>(), ["h"]);
        // The device's setting wins over the group's.
        let g = grp(json!({"resource": "/iot/json", "apikey": "k", "explicitAttrs": true}));
        let open = dev(json!({"device_id": "d", "explicitAttrs": false}));
        assert!(map_measures(&json!({"x": 1}), &open, Some(&g), None, 0).is_ok());
        // Everything left out by explicitAttrs: accepted (the device sent
        // nothing wrong), and nothing is published.
        let filtered = map_measures(&json!({"x": 1}), &dev(json!({"device_id": "d"})), Some(&g), None, 0).unwrap();
        assert!(filtered.is_empty());
        // A measure with no attribute at all is still refused.
        assert!(map_measures(&json!({"x": null}), &open, Some(&g), None, 0).is_err());
    }

    #[test]
    fn multimeasures_keep_their_order_and_times() {
        let d = dev(json!({"device_id": "d"}));
        let body =
            json!([{"t": 1, "TimeInstant": "2024-04-10T10:15:00Z"}, {"t": 2, "TimeInstant": "2024-04-10T10:05:00Z"}]);
        let m = map_measures(&body, &d, None, None, 0).unwrap();
        assert_eq!(m.iter().map(|x| x.attrs["t"].1.clone()).collect::<Vec<_>>(), [json!(1), json!(2)]);
        assert_eq!(m[0].timestamp_ms, 1_712_744_100_000);
        assert_eq!(m[1].timestamp_ms, 1_712_743_500_000);
        assert!(m.iter().all(|x| !x.attrs.contains_key("TimeInstant")));
        // A one-element array is one measure, never an attribute "0".
        let one = map_measures(&json!([{"t": 3}]), &d, None, None, 0).unwrap();
        assert_eq!(one[0].attrs.keys().collect::<Vec<_>>(), ["t"]);
    }

    #[test]
    fn the_time_comes_from_the_payload_then_t_then_the_server() {
        let d = dev(json!({"device_id": "d"}));
        let m = map_measures(&json!({"a": 1}), &d, None, Some("2020-02-22T22:22:22Z"), 5).unwrap();
        assert_eq!(m[0].timestamp_ms, 1_582_410_142_000);
        assert_eq!(map_measures(&json!({"a": 1}), &d, None, None, 5).unwrap()[0].timestamp_ms, 5);
        let e = map_measures(&json!({"a": 1, "TimeInstant": "yesterday"}), &d, None, None, 5).unwrap_err();
        assert_eq!(e, MeasureError::Timestamp("yesterday".into()));
        assert_eq!(
            map_measures(&json!({"a": 1}), &d, None, Some("soon"), 5).unwrap_err(),
            MeasureError::Timestamp("soon".into())
        );
    }

    #[test]
    fn scalars_empty_objects_and_bad_arrays_are_refused() {
        let d = dev(json!({"device_id": "d"}));
        for body in [json!(42), json!("x"), json!({}), json!([]), json!([1]), json!({"a": null}), json!(null)] {
            let e = map_measures(&body, &d, None, None, 0).unwrap_err();
            assert!(matches!(e, MeasureError::Payload(_)), "{body}");
        }
    }

    #[test]
    fn the_federation_message_is_dojot_device_data_with_tenancy() {
        let tenant = Tenant { service: "lab.a".into(), servicepath: "/rig1".into() };
        let gw = Uuid::nil();
        let o = Origin {
            tenant: &tenant,
            device_id: "dev.1",
            entity_name: "urn:x",
            entity_type: "Sensor",
            gateway: gw,
            realm: "org.example",
        };
        assert_eq!(o.routing_key(), "org.example.lab_a.Sensor.dev_1");
        let d = dev(json!({"device_id": "dev.1"}));
        let m = &map_measures(&json!({"h": 60}), &d, None, None, 1_528_226_137_452).unwrap()[0];
        let message: Value = serde_json::from_slice(&o.device_data(m)).unwrap();
        assert_eq!(
            message,
            json!({"metadata": {"deviceid": "dev.1", "tenant": "lab.a", "timestamp": 1_528_226_137_452_i64,
                "service": "lab.a", "servicepath": "/rig1", "entity_name": "urn:x", "entity_type": "Sensor",
                "gateway": gw.to_string(), "types": {"h": "Text"}}, "attrs": {"h": 60}})
        );
    }
}
