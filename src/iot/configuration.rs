//! Configuration retrieval, as iotagent-json offers it (seed 003): a device
//! asks for values the Context Broker holds about it, and gets them back.
//!
//! - The request: MQTT `/{apikey}/{id}/configuration/commands` (and the
//!   `/json/…`, `json/…` forms), or HTTP `POST
//!   {resource}/configuration/commands?i=&k=`, with `{"type":
//!   "configuration" | "subscription", "fields": [...]}`.
//! - `configuration`: the agent reads the fields from the device's entity
//!   (`GET /v2/entities/{id}/attrs?attrs=…&type=…`) and sends them at once.
//! - `subscription`: the agent subscribes at the Context Broker
//!   (`POST /v2/subscriptions`, notifications to the north API's
//!   `/notify`) and sends the fields each time the Context Broker notifies
//!   a change.
//! - The answer, `{"<field>": value, …, "dt": "20160125T092703Z"}`, goes on
//!   MQTT to `/{apikey}/{id}/configuration/values` when the device uses
//!   MQTT, else by HTTP `POST <endpoint>/configuration/values`.

use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

use super::Core;
use super::model::attr_name_ok;
use super::registry::Resolved;

/// Most fields one request may ask for.
const MAX_FIELDS: usize = 100;

/// What a device asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `subscription` (true) or `configuration`.
    pub subscribe: bool,
    /// The attributes asked for.
    pub fields: Vec<String>,
}

/// Parse a configuration request body.
pub fn parse(body: &Value) -> Result<Request, String> {
    let kind = body.get("type").and_then(Value::as_str);
    let subscribe = match kind {
        Some("configuration") => false,
        Some("subscription") => true,
        _ => return Err(format!("type must be \"configuration\" or \"subscription\", not {}", body["type"])),
    };
    let fields = body
        .get("fields")
        .and_then(Value::as_array)
        .ok_or_else(|| "fields must be a list of attribute names".to_owned())?;
    if fields.is_empty() || fields.len() > MAX_FIELDS {
        return Err(format!("fields must name 1 to {MAX_FIELDS} attributes"));
    }
    let fields = fields
        .iter()
        .map(|f| f.as_str().filter(|s| attr_name_ok(s)).map(str::to_owned).ok_or_else(|| format!("invalid field {f}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Request { subscribe, fields })
}

/// The values message: each field's value, and `dt`, the time as
/// iotagent-json writes it (`20160125T092703Z`).
pub fn values(attrs: &Map<String, Value>, fields: &[String], now_ms: i64) -> Value {
    let mut out = Map::new();
    for f in fields {
        if let Some(a) = attrs.get(f) {
            out.insert(f.clone(), a.get("value").cloned().unwrap_or_else(|| a.clone()));
        }
    }
    let dt =
        jiff::Timestamp::from_millisecond(now_ms).map(|t| t.strftime("%Y%m%dT%H%M%SZ").to_string()).unwrap_or_default();
    out.insert("dt".into(), dt.into());
    Value::Object(out)
}

/// The Context Broker subscription of a `subscription` request.
pub fn subscription(entity_id: &str, entity_type: &str, fields: &[String], notify_url: &str) -> Value {
    json!({
        "description": "busbar configuration retrieval",
        "subject": {"entities": [{"id": entity_id, "type": entity_type}], "condition": {"attrs": fields}},
        "notification": {"http": {"url": notify_url}, "attrs": fields},
    })
}

/// Why a configuration request got nothing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The body is not a configuration request.
    #[error("{0}")]
    Invalid(String),
    /// The device's entity has no Context Broker.
    #[error("{0} has no Context Broker (cbroker) to read its configuration from")]
    NoCbroker(String),
    /// The Context Broker did not answer as expected.
    #[error("the Context Broker: {0}")]
    Cbroker(String),
}

/// A device's configuration request: read (or subscribe to) its fields at
/// the Context Broker and, for `configuration`, send the values back.
pub async fn request(core: &Arc<Core>, r: &Resolved, body: &Value) -> Result<(), ConfigError> {
    let req = parse(body).map_err(ConfigError::Invalid)?;
    let (device, group) = (&r.record.device, r.group.as_deref());
    let cbroker = super::ngsi::cbroker_of(device, group, core.settings.cbroker.as_deref())
        .ok_or_else(|| ConfigError::NoCbroker(device.device_id.clone()))?;
    let cbroker = cbroker.trim_end_matches('/');
    let (id, kind) = (device.entity_name(group), device.entity_type(group).to_owned());
    if req.subscribe {
        let notify = format!("{}/notify", core.provider_url().trim_end_matches('/'));
        core.send_ngsi(super::ngsi::Request {
            cbroker: cbroker.to_owned(),
            path: "/v2/subscriptions".into(),
            service: r.record.tenant.service.clone(),
            servicepath: r.record.tenant.servicepath.clone(),
            body: subscription(&id, &kind, &req.fields, &notify),
        });
        return Ok(());
    }
    let client = crate::http::client().map_err(ConfigError::Cbroker)?;
    let url = format!(
        "{cbroker}/v2/entities/{}/attrs?attrs={}&type={}",
        urlencoding(&id),
        urlencoding(&req.fields.join(",")),
        urlencoding(&kind)
    );
    let resp = client
        .get(&url)
        .header("fiware-service", &r.record.tenant.service)
        .header("fiware-servicepath", &r.record.tenant.servicepath)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| ConfigError::Cbroker(crate::config::redact_url(&e.to_string())))?;
    if !resp.status().is_success() {
        return Err(ConfigError::Cbroker(format!("HTTP {} for the entity {id}", resp.status().as_u16())));
    }
    let attrs: Map<String, Value> = resp.json().await.map_err(|e| ConfigError::Cbroker(e.to_string()))?;
    send(core, r, values(&attrs, &req.fields, super::now_ms())).await;
    Ok(())
}

/// A Context Broker notification (`POST /notify` on the north API) for a
/// configuration subscription: each entity's notified attributes go to
/// its device. Returns how many devices were told.
pub async fn notified(core: &Arc<Core>, tenant: &super::model::Tenant, body: &Value) -> usize {
    let mut told = 0;
    for e in body.get("data").and_then(Value::as_array).into_iter().flatten() {
        let Some(id) = e.get("id").and_then(Value::as_str) else { continue };
        let Some(r) = core.registry.by_entity(tenant, id, None) else { continue };
        let Some(attrs) = e.as_object() else { continue };
        let fields: Vec<String> = attrs.keys().filter(|k| *k != "id" && *k != "type").cloned().collect();
        send(core, &r, values(attrs, &fields, super::now_ms())).await;
        told += 1;
    }
    told
}

/// Send a values message to device `r`: MQTT when it uses MQTT (or has
/// no endpoint), else HTTP to `<endpoint>/configuration/values`.
async fn send(core: &Arc<Core>, r: &Resolved, values: Value) {
    let (device, group) = (&r.record.device, r.group.as_deref());
    let payload = values.to_string().into_bytes();
    let endpoint = super::commands::endpoint_of(device, group);
    let mqtt = matches!(super::commands::via_of(device, group), Ok(super::commands::Via::Mqtt)) || endpoint.is_none();
    if mqtt {
        let apikey = super::commands::apikey_of(r);
        let prefix = &core.settings.mqtt_prefix;
        let topic = if prefix.is_empty() {
            format!("/{apikey}/{}/configuration/values", device.device_id)
        } else {
            format!("{prefix}/{apikey}/{}/configuration/values", device.device_id)
        };
        if let Some(tx) = core.mqtt_out.get() {
            let _ = tx.send(super::MqttOut::Publish(topic, payload));
        }
        return;
    }
    let Some(endpoint) = endpoint else { return };
    if let Err(why) = core.endpoint_allowed(&endpoint) {
        tracing::warn!(device = %device.device_id, error = %why, "configuration values not sent");
        return;
    }
    let Ok(client) = crate::http::client() else { return };
    let url = format!("{}/configuration/values", endpoint.trim_end_matches('/'));
    let sent = client
        .post(&url)
        .header("content-type", "application/json")
        .header("fiware-service", &r.record.tenant.service)
        .header("fiware-servicepath", &r.record.tenant.servicepath)
        .body(payload)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    if let Err(e) = sent {
        tracing::warn!(device = %device.device_id, error = %crate::config::redact_url(&e.to_string()), "cannot send configuration values");
    }
}

/// What stays as it is in a path segment or query value here: RFC 3986's
/// unreserved characters, and `:` and `,`, which entity ids (`urn:…`) and
/// attribute lists (`a,b`) hold and Orion reads literally.
const KEEP: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b':').remove(b',');

/// Percent-encode `s` for a path segment or a query value.
fn urlencoding(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_and_values_carry_dt() {
        assert_eq!(
            parse(&json!({"type": "configuration", "fields": ["sleepTime", "warningLevel"]})),
            Ok(Request { subscribe: false, fields: vec!["sleepTime".into(), "warningLevel".into()] })
        );
        assert!(parse(&json!({"type": "subscription", "fields": ["a"]})).unwrap().subscribe);
        for bad in [
            json!({"type": "other", "fields": ["a"]}),
            json!({"type": "configuration"}),
            json!({"type": "configuration", "fields": []}),
            json!({"type": "configuration", "fields": [1]}),
            json!({"type": "configuration", "fields": ["a\"b"]}),
            json!([1]),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
        let attrs =
            json!({"sleepTime": {"type": "Text", "value": "200"}, "warningLevel": {"type": "Text", "value": "80"}});
        let v = values(
            attrs.as_object().unwrap(),
            &["sleepTime".into(), "warningLevel".into(), "gone".into()],
            1453714023000,
        );
        assert_eq!(v, json!({"sleepTime": "200", "warningLevel": "80", "dt": "20160125T092703Z"}));
        assert_eq!(urlencoding("urn:lab:Sensor:a b/c"), "urn:lab:Sensor:a%20b%2Fc");
    }
}
