//! The provisioning data model of iotagent-node-lib (reference §2.4): config
//! groups and devices, their attributes, and the north API's errors.
//!
//! Known fields are typed; every other field is kept as given, so a `GET`
//! returns what was provisioned.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A tenant: the `fiware-service` and `fiware-servicepath` pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tenant {
    /// `fiware-service`.
    pub service: String,
    /// `fiware-servicepath`.
    pub servicepath: String,
}

/// One attribute mapping (`attributes`, `static_attributes`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    /// The key in measures, when it differs from `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    /// The attribute name published.
    pub name: String,
    /// The attribute type (`Number`, `Text`, …).
    #[serde(rename = "type", default = "text", deserialize_with = "null_as_text")]
    pub kind: String,
    /// The value of a static attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Everything else (`metadata`, `expression`, …), kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `null` reads as an empty list, as JavaScript clients send it.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Attribute>, D::Error> {
    Ok(Option::<Vec<Attribute>>::deserialize(d)?.unwrap_or_default())
}

/// A `null` type reads as the default, `Text`.
fn null_as_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(text))
}

fn text() -> String {
    "Text".into()
}

/// How measures map to attributes; the same fields on groups and devices
/// (a device's win).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    /// Whether measures get a `TimeInstant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<bool>,
    /// Attribute mappings.
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<Attribute>,
    /// Attributes added to every measure.
    #[serde(default, deserialize_with = "null_as_empty", skip_serializing_if = "Vec::is_empty")]
    pub static_attributes: Vec<Attribute>,
    /// `false`, `true`, or a list of attribute names or object ids.
    #[serde(rename = "explicitAttrs", default, skip_serializing_if = "Option::is_none")]
    pub explicit_attrs: Option<Value>,
}

/// A config group ("service group"): an apikey and the defaults of its
/// devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The southbound resource (`/iot/json`).
    pub resource: String,
    /// The shared key devices present.
    pub apikey: String,
    /// Entity type of its devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    /// Attribute mapping defaults.
    #[serde(flatten)]
    pub mapping: Mapping,
    /// Whether unknown devices are created on their first measure (default
    /// true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoprovision: Option<bool>,
    /// Everything else, kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A provisioned device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its id in measures.
    pub device_id: String,
    /// Entity name (default `entity_type:device_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_name: Option<String>,
    /// Entity type (default the group's, else `Thing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    /// Its own apikey, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apikey: Option<String>,
    /// Attribute mapping.
    #[serde(flatten)]
    pub mapping: Mapping,
    /// Everything else (`lazy`, `commands`, `internal_attributes`,
    /// `timezone`, `endpoint`, `protocol`, `transport`, …), kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The entity type used when neither device nor group sets one.
pub const DEFAULT_ENTITY_TYPE: &str = "Thing";

impl Device {
    /// The entity type: the device's, the group's, or `Thing`.
    pub fn entity_type<'a>(&'a self, group: Option<&'a Group>) -> &'a str {
        self.entity_type.as_deref().or(group.and_then(|g| g.entity_type.as_deref())).unwrap_or(DEFAULT_ENTITY_TYPE)
    }

    /// The entity name: the device's, or `entity_type:device_id`.
    pub fn entity_name(&self, group: Option<&Group>) -> String {
        self.entity_name.clone().unwrap_or_else(|| format!("{}:{}", self.entity_type(group), self.device_id))
    }
}

/// A north API error: an HTTP status and the `{"name","message"}` body of
/// iotagent-node-lib.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The error name (`DEVICE_NOT_FOUND`).
    pub name: &'static str,
    /// The message.
    pub message: String,
}

impl ApiError {
    /// An error.
    pub fn new(status: u16, name: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, name, message: message.into() }
    }

    /// 400 `WRONG_SYNTAX`.
    pub fn syntax(detail: impl std::fmt::Display) -> ApiError {
        ApiError::new(400, "WRONG_SYNTAX", format!("Wrong syntax in request: {detail}"))
    }

    /// 404 `DEVICE_NOT_FOUND`.
    pub fn device_not_found(id: &str) -> ApiError {
        ApiError::new(404, "DEVICE_NOT_FOUND", format!("No device was found with id:{id}"))
    }

    /// 404 `DEVICE_GROUP_NOT_FOUND`.
    pub fn group_not_found(what: &str) -> ApiError {
        ApiError::new(404, "DEVICE_GROUP_NOT_FOUND", format!("Couldn't find device group for {what}"))
    }

    /// 400 `BAD_PAYLOAD`.
    pub fn payload(detail: impl std::fmt::Display) -> ApiError {
        ApiError::new(400, "BAD_PAYLOAD", format!("Unprocessable payload: {detail}"))
    }

    /// The metric label of this error (`device_not_found`).
    pub fn kind(&self) -> String {
        self.name.to_ascii_lowercase()
    }
}

/// Characters iotagent-node-lib forbids in names and types.
const FORBIDDEN: &[char] = &['<', '>', '(', ')', ';', '\'', '=', '"'];

/// Whether `s` may name an attribute: not empty, no control character, none
/// of node-lib's forbidden characters (Orion refuses them too).
pub fn attr_name_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains(FORBIDDEN) && !s.chars().any(char::is_control)
}

/// Longest device id, apikey or entity type, in bytes (README "Limits").
/// Orion allows 256 for entity ids; busbar's ids also go into AMQP routing
/// keys (255 bytes in all) and MQTT topics, so they are shorter.
pub const MAX_ID_BYTES: usize = 128;
/// Longest `fiware-service` and servicepath level (FIWARE's own rule).
pub const MAX_SERVICE_BYTES: usize = 50;
/// Most levels in a servicepath (FIWARE's own rule).
pub const MAX_SERVICEPATH_LEVELS: usize = 10;
/// Longest southbound resource, in bytes.
pub const MAX_RESOURCE_BYTES: usize = 256;

/// FIWARE's rule for a service and a servicepath level: `[A-Za-z0-9_]`,
/// 1 to 50 of them. It also keeps `|`, which separates the fields of a
/// device's uuid name, and control characters out of tenancy.
fn fiware_name(s: &str) -> bool {
    (1..=MAX_SERVICE_BYTES).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Check a `fiware-service` header.
pub fn check_service(s: &str) -> Result<(), ApiError> {
    if fiware_name(s) {
        return Ok(());
    }
    Err(ApiError::new(
        400,
        "BAD_REQUEST",
        format!("fiware-service must be 1 to {MAX_SERVICE_BYTES} letters, digits or underscores"),
    ))
}

/// Check a `fiware-servicepath` header: `/`, or up to ten `/level`s of
/// FIWARE names; `/*` (every servicepath of the service) when `wildcard`.
pub fn check_servicepath(s: &str, wildcard: bool) -> Result<(), ApiError> {
    let ok = s == "/"
        || (wildcard && s == "/*")
        || s.strip_prefix('/').is_some_and(|rest| {
            let levels: Vec<&str> = rest.split('/').collect();
            levels.len() <= MAX_SERVICEPATH_LEVELS && levels.iter().all(|l| fiware_name(l))
        });
    if ok {
        return Ok(());
    }
    Err(ApiError::new(
        400,
        "BAD_REQUEST",
        format!(
            "fiware-servicepath must be / or up to {MAX_SERVICEPATH_LEVELS} levels /name of 1 to {MAX_SERVICE_BYTES} letters, digits or underscores"
        ),
    ))
}

/// Whether `b` may appear in an identifier: Orion's rule for entity ids
/// (printable ASCII without white space, `&`, `?`, `/` and `#`), less the
/// MQTT wildcard `+` and node-lib's forbidden characters.
fn id_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"&?/#+".contains(&b) && !FORBIDDEN.contains(&(b as char))
}

/// Check an identifier that becomes an MQTT topic level, an AMQP routing
/// key word and part of a store key: 1 to [`MAX_ID_BYTES`] printable ASCII
/// characters, none of `& ? / # + < > ( ) ; ' = "` (so no control
/// character can reach a store key or a log line).
pub fn check_id(field: &str, s: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > MAX_ID_BYTES || !s.bytes().all(id_byte) {
        let shown: String = s.chars().take(40).flat_map(char::escape_default).collect();
        return Err(ApiError::syntax(format!(
            "invalid {field} \"{shown}\"{}: 1 to {MAX_ID_BYTES} printable ASCII characters, none of & ? / # + < > ( ) ; ' = \"",
            if s.chars().count() > 40 { "…" } else { "" }
        )));
    }
    Ok(())
}

fn check_resource(s: &str) -> Result<(), ApiError> {
    if s.starts_with('/') && s.len() <= MAX_RESOURCE_BYTES && !s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Ok(());
    }
    Err(ApiError::syntax(format!(
        "invalid resource: a path starting with / of at most {MAX_RESOURCE_BYTES} bytes without white space or control characters"
    )))
}

fn check_names(attrs: &[Attribute], field: &str) -> Result<(), ApiError> {
    for a in attrs {
        for (what, v) in [("name", Some(&a.name)), ("type", Some(&a.kind)), ("object_id", a.object_id.as_ref())] {
            if let Some(v) = v
                && !attr_name_ok(v)
            {
                return Err(ApiError::syntax(format!("invalid {field} {what} {v:?}")));
            }
        }
        if a.name == "undefined" || a.name.chars().all(|c| c.is_ascii_digit()) {
            return Err(ApiError::syntax(format!("invalid {field} name {:?}", a.name)));
        }
        match a.extra.get("expression") {
            None | Some(Value::Null) => {}
            Some(Value::String(e)) => {
                super::expression::check(e).map_err(|m| ApiError::new(400, "INVALID_EXPRESSION", m))?;
            }
            Some(other) => {
                return Err(ApiError::new(
                    400,
                    "WRONG_EXPRESSION_TYPE",
                    format!("an expression is a string, not {other}"),
                ));
            }
        }
    }
    Ok(())
}

/// Check a `commands` list: objects with a valid `name` (it becomes an MQTT
/// payload key and the Context Broker's `<name>_status`).
fn check_commands(extra: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(list) = extra.get("commands") else { return Ok(()) };
    let Some(list) = list.as_array() else {
        return Err(ApiError::syntax("commands must be a list of {name, type}"));
    };
    for c in list {
        match c.get("name").and_then(Value::as_str) {
            Some(n) if attr_name_ok(n) && n.len() <= MAX_ID_BYTES => {}
            _ => return Err(ApiError::syntax(format!("invalid command {c}: it needs a valid name"))),
        }
        if let Some(e) = c.get("expiration")
            && !e.as_f64().is_some_and(|s| s.is_finite() && s > 0.0)
        {
            return Err(ApiError::syntax(format!("invalid command expiration {e}: seconds, more than 0")));
        }
    }
    Ok(())
}

impl Mapping {
    fn check(&self) -> Result<(), ApiError> {
        check_names(&self.attributes, "attributes")?;
        check_names(&self.static_attributes, "static_attributes")?;
        match &self.explicit_attrs {
            None | Some(Value::Bool(_)) => Ok(()),
            Some(Value::Array(a)) if a.iter().all(|x| x.is_string()) => Ok(()),
            Some(other) => {
                Err(ApiError::syntax(format!("explicitAttrs must be a boolean or a list of names, not {other}")))
            }
        }
    }
}

/// Parse one group of a `POST /iot/groups` body.
pub fn parse_group(v: &Value) -> Result<Group, ApiError> {
    let o = v.as_object().ok_or_else(|| ApiError::syntax("a group must be an object"))?;
    for key in ["resource", "apikey"] {
        if o.get(key).and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(ApiError::syntax(format!("Errors found validating request: {key} is required")));
        }
    }
    let g = Group::deserialize(v).map_err(ApiError::syntax)?.checked()?;
    check_id("apikey", &g.apikey)?;
    check_resource(&g.resource)?;
    if let Some(t) = &g.entity_type {
        check_id("entity_type", t)?;
    }
    Ok(g)
}

impl Group {
    /// A stored group (JSON text), checked as on creation.
    pub fn from_json(text: &str) -> Result<Group, ApiError> {
        serde_json::from_str::<Group>(text).map_err(ApiError::syntax)?.checked()
    }

    fn checked(mut self) -> Result<Group, ApiError> {
        // Tenancy comes from the headers, never from the body.
        for key in ["service", "subservice"] {
            self.extra.shift_remove(key);
        }
        check_commands(&self.extra)?;
        self.mapping.check()?;
        Ok(self)
    }
}

/// Parse one device of a `POST /iot/devices` body.
pub fn parse_device(v: &Value) -> Result<Device, ApiError> {
    let o = v.as_object().ok_or_else(|| ApiError::syntax("a device must be an object"))?;
    if o.get("device_id").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(ApiError::new(
            400,
            "MISSING_ATTRIBUTES",
            "The request was not well formed:Missing attributes: [\"device_id\"]",
        ));
    }
    let d = Device::deserialize(v).map_err(ApiError::syntax)?.checked()?;
    check_id("device_id", &d.device_id)?;
    if let Some(k) = &d.apikey {
        check_id("apikey", k)?;
    }
    if let Some(t) = &d.entity_type {
        check_id("entity_type", t)?;
    }
    Ok(d)
}

impl Device {
    /// A stored device (JSON text), checked as on creation. Parsed straight
    /// from the text: loading thousands leaves no JSON trees behind.
    pub fn from_json(text: &str) -> Result<Device, ApiError> {
        serde_json::from_str::<Device>(text).map_err(ApiError::syntax)?.checked()
    }

    fn checked(mut self) -> Result<Device, ApiError> {
        for key in ["service", "service_path", "subservice"] {
            self.extra.shift_remove(key);
        }
        if self.device_id.is_empty() || self.device_id.contains(['/', '#', '+']) || self.device_id.contains(FORBIDDEN) {
            return Err(ApiError::syntax(format!("invalid device_id {:?}", self.device_id)));
        }
        check_commands(&self.extra)?;
        self.mapping.check()?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn groups_need_resource_and_apikey_and_keep_unknown_fields() {
        let g = parse_group(&json!({"resource": "/iot/json", "apikey": "k1", "cbroker": "http://orion:1026",
            "entity_type": "Thing", "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}]}))
        .unwrap();
        assert_eq!(g.mapping.attributes[0].object_id.as_deref(), Some("t"));
        assert_eq!(g.extra["cbroker"], "http://orion:1026");
        assert_eq!(serde_json::to_value(&g).unwrap()["cbroker"], "http://orion:1026");
        for bad in
            [json!({"resource": "/iot/json"}), json!({"apikey": "k"}), json!(3), json!({"apikey": "", "resource": "r"})]
        {
            assert_eq!(parse_group(&bad).unwrap_err().name, "WRONG_SYNTAX", "{bad}");
        }
    }

    #[test]
    fn devices_need_a_device_id_and_valid_names() {
        let d = parse_device(&json!({"device_id": "dev1", "entity_type": "Sensor", "protocol": "PDI-IoTA-JSON",
            "static_attributes": [{"name": "room", "type": "Text", "value": "B12"}]}))
        .unwrap();
        assert_eq!(d.entity_name(None), "Sensor:dev1");
        assert_eq!(d.mapping.static_attributes[0].value, Some(json!("B12")));
        assert!(!d.extra.contains_key("static_attributes"), "mapping fields are not kept twice");
        assert_eq!(parse_device(&json!({"entity_type": "x"})).unwrap_err().name, "MISSING_ATTRIBUTES");
        let bad = json!({"device_id": "d", "attributes": [{"name": "te<mp", "type": "Number"}]});
        assert_eq!(parse_device(&bad).unwrap_err().name, "WRONG_SYNTAX");
        for name in ["undefined", "0"] {
            let bad = json!({"device_id": "d", "attributes": [{"name": name, "type": "Number"}]});
            assert_eq!(parse_device(&bad).unwrap_err().name, "WRONG_SYNTAX", "{name}");
        }
        assert_eq!(parse_device(&json!({"device_id": "a/b"})).unwrap_err().name, "WRONG_SYNTAX");
        let d = parse_device(&json!({"device_id": "d", "service": "other"})).unwrap();
        assert!(!d.extra.contains_key("service"), "tenancy comes from the headers");
    }

    #[test]
    fn commands_need_valid_names_and_expirations() {
        let ok = json!({"device_id": "d", "commands": [{"name": "ping", "type": "command", "expiration": 5}]});
        assert!(parse_device(&ok).is_ok());
        for bad in [
            json!({"device_id": "d", "commands": {"name": "ping"}}),
            json!({"device_id": "d", "commands": [3]}),
            json!({"device_id": "d", "commands": [{"type": "command"}]}),
            json!({"device_id": "d", "commands": [{"name": "pi\"ng"}]}),
            json!({"device_id": "d", "commands": [{"name": "ping", "expiration": -1}]}),
        ] {
            assert_eq!(parse_device(&bad).unwrap_err().name, "WRONG_SYNTAX", "{bad}");
        }
        let g = json!({"resource": "/iot/json", "apikey": "k", "commands": [{"name": ""}]});
        assert_eq!(parse_group(&g).unwrap_err().name, "WRONG_SYNTAX");
    }

    #[test]
    fn the_entity_type_falls_back_to_the_group_then_thing() {
        let d = parse_device(&json!({"device_id": "d"})).unwrap();
        let g = parse_group(&json!({"resource": "/iot/json", "apikey": "k", "entity_type": "Meter"})).unwrap();
        assert_eq!(d.entity_type(Some(&g)), "Meter");
        assert_eq!(d.entity_type(None), DEFAULT_ENTITY_TYPE);
        assert_eq!(d.entity_name(Some(&g)), "Meter:d");
    }
}
