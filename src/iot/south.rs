//! Measures in: HTTP (iotagent-json's `/iot/json` API), MQTT (rumqttc, the
//! iotagent-json and dojot topic grammars) and AMQP (a topic exchange with
//! routing keys `.{apikey}.{id}.attrs[.{attr}]`). Every transport ends in
//! [`Core::ingest`]; a bad measure is answered (HTTP) or counted and logged
//! (MQTT, AMQP), and never stops a loop.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::MqttLink;
use super::mapping::MeasureError;
use super::mapping::{
    Address, parse_cmdexe, parse_configuration, parse_routing_cmdexe, parse_routing_key, parse_topic, single_value,
};
use super::model::ApiError;
use super::registry::Resolved;
use super::{Core, IngestError, Payload, Transport};
use crate::amqp::{self, Backoff, LinkError};

// ----- HTTP -----

type Shared = State<Arc<Core>>;
type Params = Query<HashMap<String, String>>;

/// The HTTP southbound router (`{resource}` is `/iot/json` by default).
pub fn http_router(core: Arc<Core>) -> Router {
    let resource = core.settings.resource.clone();
    let limit = core.settings.max_body_bytes;
    Router::new()
        .route(&resource, axum::routing::post(post_measure).get(get_measure))
        .route(&format!("{resource}/attrs/{{attr}}"), axum::routing::post(post_attr))
        .route(&format!("{resource}/commands"), axum::routing::post(post_results))
        .route(&format!("{resource}/configuration/commands"), axum::routing::post(post_configuration))
        .fallback(|| async { ApiError::new(404, "NOT_FOUND", "No such resource") })
        .method_not_allowed_fallback(|| async { ApiError::new(405, "METHOD_NOT_ALLOWED", "Method not allowed here") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(processing_time))
        .with_state(core)
}

/// iotagent-json's `X-Processing-Time` header on every south answer: the
/// milliseconds the request took in the agent.
async fn processing_time(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let start = std::time::Instant::now();
    let mut r = next.run(req).await;
    let ms = start.elapsed().as_millis().to_string();
    if let Ok(v) = axum::http::HeaderValue::from_str(&ms) {
        r.headers_mut().insert("x-processing-time", v);
    }
    r
}

/// The body, or a JSON error: 413 when it is over the limit (north and
/// south alike).
pub(crate) fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::new(413, "PayloadTooLargeError", "request entity too large"),
        other => ApiError::payload(other.body_text()),
    })
}

fn address(q: &HashMap<String, String>, attr: Option<String>) -> Result<Address, ApiError> {
    let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("k"), get("i")) {
        (Some(apikey), Some(device_id)) => Ok(Address::Apikey { apikey, device_id, attr }),
        (k, i) => {
            let missing: Vec<&str> =
                [("API Key", k.is_none()), ("Device Id", i.is_none())].iter().filter(|x| x.1).map(|x| x.0).collect();
            Err(ApiError::new(
                400,
                "MANDATORY_PARAMS_NOT_FOUND",
                format!(
                    "Some of the mandatory params weren't found in the request: {}",
                    serde_json::to_string(&missing).unwrap_or_default()
                ),
            ))
        }
    }
}

fn content_type(h: &HeaderMap) -> String {
    h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase()
}

fn unsupported() -> ApiError {
    ApiError::new(
        400,
        "UNSUPPORTED_TYPE",
        "The request content didn't have the expected type [application/json, text/plain, application/octet-stream]",
    )
}

fn ok() -> Response {
    axum::Json(json!({})).into_response()
}

async fn post_measure(
    State(core): Shared,
    q: Params,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    let addr = address(&q, None)?;
    if !content_type(&h).contains("json") {
        return Err(count(&core, unsupported()));
    }
    let v: Value =
        serde_json::from_slice(&b).map_err(|e| count(&core, ApiError::payload(format!("invalid JSON: {e}"))))?;
    core.ingest(Transport::Http, &addr, Payload::Json(v), q.get("t").map(String::as_str)).await?;
    polled(&core, &q).await
}

/// The answer to a south request: `{}`, or with `getCmd=1` the device's
/// waiting commands `{"<name>": value, …}`, each now `DELIVERED`.
async fn polled(core: &Core, q: &HashMap<String, String>) -> Result<Response, ApiError> {
    if q.get("getCmd").map(String::as_str) != Some("1") {
        return Ok(ok());
    }
    let (Some(k), Some(i)) = (q.get("k"), q.get("i")) else { return Ok(ok()) };
    let r = core.registry.find(k, i).ok_or_else(|| ApiError::device_not_found(i))?;
    Ok(axum::Json(super::commands::take_polled(core, &r).await).into_response())
}

/// The provisioned device of a south request (`i`, `k`; never
/// autoprovisioned) and its JSON body.
fn device_request(
    core: &Core,
    q: &HashMap<String, String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<(Resolved, Value), ApiError> {
    let b = body(b)?;
    let Address::Apikey { apikey, device_id, .. } = address(q, None)? else {
        return Err(ApiError::payload("i and k are required"));
    };
    let r = core.registry.find(&apikey, &device_id).ok_or_else(|| ApiError::device_not_found(&device_id))?;
    let v = serde_json::from_slice(&b).map_err(|e| count(core, ApiError::payload(format!("invalid JSON: {e}"))))?;
    Ok((r, v))
}

/// `POST {resource}/commands?i=&k=` with `{"<command>": result, …}`: a
/// polling device's results.
async fn post_results(State(core): Shared, q: Params, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (r, v) = device_request(&core, &q, b)?;
    super::commands::results(&core, &r, &v).await.map_err(|e| count(&core, ApiError::payload(e)))?;
    Ok(ok())
}

/// `POST {resource}/configuration/commands?i=&k=` with `{"type",
/// "fields"}`: an HTTP device's configuration request (the values go to
/// its endpoint, or over MQTT if it uses MQTT).
async fn post_configuration(
    State(core): Shared,
    q: Params,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (r, v) = device_request(&core, &q, b)?;
    super::configuration::parse(&v).map_err(|e| count(&core, ApiError::payload(e)))?;
    super::configuration::request(&core, &r, &v).await.map_err(|e| match e {
        super::configuration::ConfigError::Invalid(m) => ApiError::payload(m),
        other => ApiError::new(502, "CONFIGURATION_ERROR", other.to_string()),
    })?;
    Ok(ok())
}

async fn get_measure(State(core): Shared, q: Params) -> Result<Response, ApiError> {
    let addr = address(&q, None)?;
    if q.get("getCmd").map(String::as_str) == Some("1") && !q.contains_key("d") {
        return polled(&core, &q).await;
    }
    let d = q.get("d").ok_or_else(|| {
        ApiError::new(
            400,
            "MANDATORY_PARAMS_NOT_FOUND",
            "Some of the mandatory params weren't found in the request: [\"Payload\"]",
        )
    })?;
    let v: Value =
        serde_json::from_str(d).map_err(|e| count(&core, ApiError::payload(format!("invalid JSON in d: {e}"))))?;
    core.ingest(Transport::Http, &addr, Payload::Json(v), q.get("t").map(String::as_str)).await?;
    polled(&core, &q).await
}

async fn post_attr(
    State(core): Shared,
    Path(attr): Path<String>,
    q: Params,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    let addr = address(&q, Some(attr.clone()))?;
    let ct = content_type(&h);
    let value = if ct.contains("json") {
        serde_json::from_slice(&b).map_err(|e| count(&core, ApiError::payload(format!("invalid JSON: {e}"))))?
    } else if ct.starts_with("text/plain") {
        Value::String(String::from_utf8_lossy(&b).into_owned())
    } else if ct.starts_with("application/octet-stream") {
        single_value(&b, true)
    } else {
        return Err(count(&core, unsupported()));
    };
    core.ingest(Transport::Http, &addr, Payload::Single(attr, value), q.get("t").map(String::as_str)).await?;
    Ok(ok())
}

/// The HTTP answer to a refused measure (iotagent-json's names and codes).
impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> ApiError {
        let message = e.to_string();
        match e {
            IngestError::Stopped | IngestError::ShuttingDown => ApiError::new(503, "GATEWAY_STOPPED", message),
            IngestError::UnknownDevice(_) => ApiError::new(404, "DEVICE_NOT_FOUND", message),
            IngestError::UnknownApikey(_) => ApiError::new(404, "DEVICE_GROUP_NOT_FOUND", message),
            IngestError::Measure(MeasureError::Payload(_)) => ApiError::new(400, "BAD_PAYLOAD", message),
            IngestError::Measure(MeasureError::Timestamp(_)) => ApiError::new(400, "BAD_TIMESTAMP", message),
            IngestError::RoutingKeyTooLong(_) => ApiError::new(400, "ID_TOO_LONG", message),
            IngestError::Autoprovision(e) => e,
        }
    }
}

fn count(core: &Core, e: ApiError) -> ApiError {
    core.counters.error(&e.kind());
    e
}

// ----- MQTT -----

/// User name and password.
type Credentials = (String, String);

/// Host, port and credentials of an `mqtt://[user[:pass]@]host[:port]` URL
/// (`mqtts://`: TLS, port 8883 by default).
pub(crate) fn parse_mqtt_url(url: &str) -> Option<(String, u16, Option<Credentials>)> {
    let (rest, default_port) = match url.strip_prefix("mqtts://") {
        Some(rest) => (rest, 8883),
        None => (url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://"))?, 1883),
    };
    let rest = rest.trim_end_matches('/');
    let (creds, hostport) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().ok()?),
        None => (hostport.to_owned(), default_port),
    };
    let creds = creds.map(|c| match c.split_once(':') {
        Some((u, p)) => (u.to_owned(), p.to_owned()),
        None => (c.to_owned(), String::new()),
    });
    (!host.is_empty()).then_some((host, port, creds))
}

/// The rustls client configuration of an `mqtts://` broker.
pub(crate) fn tls_config(tls: &super::MqttTls) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("mqtt_ca: {e}"))?;
                roots.add(cert).map_err(|e| format!("mqtt_ca: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to trust (set mqtt_ca)".into());
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match &tls.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("mqtt_cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("mqtt_key: {e}"))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| format!("mqtt_cert/mqtt_key: {e}"))
        }
    }
}

/// What devices publish after `{apikey}/{id}/`: measures, command results
/// and configuration requests.
const DEVICE_TOPICS: [&str; 4] = ["attrs", "attrs/+", "cmdexe", "configuration/commands"];

/// The subscriptions of a gateway: each device topic in iotagent-json's
/// forms (`/json/…`, `json/…`, `/…`; under a prefix, which stands for the
/// leading slash, `json/…` and `…`), and dojot's `tenant:device/attrs`.
pub fn mqtt_filters(prefix: &str, shared_group: &str, dojot: bool) -> Vec<String> {
    let forms: &[&str] = if prefix.is_empty() { &["/json/+/+/", "json/+/+/", "/+/+/"] } else { &["json/+/+/", "+/+/"] };
    let mut bases: Vec<String> =
        DEVICE_TOPICS.iter().flat_map(|t| forms.iter().map(move |f| format!("{f}{t}"))).collect();
    if dojot {
        bases.push("+/attrs".into());
    }
    let under = |f: String| if prefix.is_empty() { f } else { format!("{prefix}/{f}") };
    bases
        .into_iter()
        .map(under)
        .map(|f| if shared_group.is_empty() { f } else { format!("$share/{shared_group}/{f}") })
        .collect()
}

/// The topic as the grammar sees it: the prefix removed (a prefixed topic
/// reads like one with a leading slash).
fn strip_prefix<'a>(topic: &'a str, prefix: &str) -> Option<std::borrow::Cow<'a, str>> {
    if prefix.is_empty() {
        return Some(topic.into());
    }
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    // `{prefix}/{tenant}:{device}/attrs` keeps its dojot shape.
    if rest.split('/').count() == 2 && rest.contains(':') {
        return Some(rest.into());
    }
    Some(format!("/{rest}").into())
}

/// The MQTT protocol's largest packet (a 4-byte remaining length).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// The incoming packet limit of the MQTT client: a measure of the gateway's
/// `max_body_bytes` with room for a long topic.
fn mqtt_packet_limit(core: &Core) -> usize {
    (core.settings.max_body_bytes + 64 * 1024).min(MQTT_MAX_PACKET)
}

/// A packet larger than the client's limit, as rumqttc reports it.
fn oversized(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

async fn on_publish(core: &Arc<Core>, topic: &str, payload: &[u8]) {
    let local = strip_prefix(topic, &core.settings.mqtt_prefix);
    if let Some((apikey, device_id)) = local.as_deref().and_then(parse_cmdexe) {
        return on_cmdexe(core, topic, &apikey, &device_id, payload).await;
    }
    if let Some((apikey, device_id)) = local.as_deref().and_then(parse_configuration) {
        return on_configuration(core, topic, &apikey, &device_id, payload).await;
    }
    let addr = local.and_then(|t| parse_topic(&t, core.settings.dojot));
    ingest_bytes(core, Transport::Mqtt, topic, addr, payload).await
}

/// The provisioned device behind a result or configuration request (never
/// autoprovisioned); an unknown one is counted and logged once a minute
/// per apikey.
fn provisioned(core: &Core, topic: &str, apikey: &str, device_id: &str) -> Option<Resolved> {
    let r = core.registry.find(apikey, device_id);
    if r.is_none() {
        core.counters.error("device_not_found");
        if core.quiet.first("device_not_found", apikey) {
            warn!(%topic, "a message from an unknown device; dropped");
        }
    }
    r
}

/// A device's command results on `…/cmdexe` (MQTT) or `.….cmdexe` (AMQP):
/// `{"<command>": result}`.
async fn on_cmdexe(core: &Core, topic: &str, apikey: &str, device_id: &str, payload: &[u8]) {
    let Some(r) = provisioned(core, topic, apikey, device_id) else { return };
    let body: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            core.counters.error("bad_payload");
            warn!(%topic, error = %e, "a command result that is not JSON; dropped");
            return;
        }
    };
    if let Err(e) = super::commands::results(core, &r, &body).await {
        core.counters.error("bad_payload");
        warn!(%topic, error = %e, "dropped a command result");
    }
}

/// A device's configuration request on `…/configuration/commands`.
async fn on_configuration(core: &Arc<Core>, topic: &str, apikey: &str, device_id: &str, payload: &[u8]) {
    let Some(r) = provisioned(core, topic, apikey, device_id) else { return };
    let Ok(slot) = core.config_slots.clone().try_acquire_owned() else {
        core.counters.error("configuration_busy");
        if core.quiet.first("configuration_busy", apikey) {
            warn!(%topic, limit = super::CONFIG_REQUESTS, "too many configuration requests at once; dropped");
        }
        return;
    };
    let body: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    // The Context Broker's answer is awaited off the MQTT loop.
    let (core, topic) = (core.clone(), topic.to_owned());
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = super::configuration::request(&core, &r, &body).await {
            core.counters.error("configuration");
            warn!(%topic, error = %e, "a configuration request got nothing");
        }
    });
}

/// The commands the MQTT client has handed to rumqttc and not yet seen
/// acknowledged by the broker: requested (waiting for a packet id), then
/// by packet id. rumqttc reports `Outgoing::Publish(pkid)` in the order the
/// publishes were requested; a retransmission keeps its packet id.
#[derive(Default)]
struct InFlight {
    /// `None`: an untracked publish (configuration values), which takes a
    /// packet id too.
    requested: std::collections::VecDeque<Option<uuid::Uuid>>,
    by_pkid: HashMap<u16, uuid::Uuid>,
    /// A publish rumqttc holds back until its packet id is free again.
    collided: Option<(u16, uuid::Uuid)>,
}

impl InFlight {
    fn contains(&self, id: uuid::Uuid) -> bool {
        self.requested.contains(&Some(id))
            || self.by_pkid.values().any(|v| *v == id)
            || self.collided.is_some_and(|c| c.1 == id)
    }

    fn clear(&mut self) {
        *self = InFlight::default();
    }

    fn on_outgoing(&mut self, pkid: u16) {
        if pkid == 0 || self.by_pkid.contains_key(&pkid) {
            return;
        }
        if let Some((p, id)) = self.collided
            && p == pkid
        {
            self.collided = None;
            self.by_pkid.insert(pkid, id);
            return;
        }
        if let Some(Some(id)) = self.requested.pop_front() {
            self.by_pkid.insert(pkid, id);
        }
    }
}

/// Publish command `id` (QoS 1) if it is an open MQTT command.
fn publish_command(core: &Core, client: &AsyncClient, flight: &mut InFlight, id: uuid::Uuid) {
    let Some(cmd) = core.commands.get(id) else { return };
    use super::commands::Via;
    if cmd.state.terminal() || !matches!(cmd.via, Via::Mqtt | Via::Dojot) || flight.contains(id) {
        return;
    }
    let prefix = &core.settings.mqtt_prefix;
    // The first message is tracked (its PUBACK marks the command as the
    // broker's); dojot's second topic form goes along untracked.
    let messages: Vec<(String, Vec<u8>)> = match cmd.via {
        Via::Dojot => super::commands::dojot_messages(&cmd, prefix).into(),
        _ => vec![super::commands::mqtt_message(&cmd, prefix)],
    };
    for (i, (topic, payload)) in messages.into_iter().enumerate() {
        match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
            Ok(()) => flight.requested.push_back((i == 0).then_some(id)),
            Err(e) => {
                warn!(command = %id, error = %e, "cannot publish a command; it is sent again after the next connect");
                return;
            }
        }
    }
    core.commands.counters.sent.fetch_add(1, Ordering::Relaxed);
    debug!(command = %id, "command published");
}

/// After a connect: publish every open MQTT command the broker does not
/// hold. It holds those it acknowledged, as long as it kept the session
/// (`session_present`); without it (a broker restarted without
/// persistence) those are gone with the devices' queues, and go again.
/// What rumqttc still holds it retransmits itself, unless the session is
/// new, when it drops them.
fn republish(core: &Core, client: &AsyncClient, flight: &mut InFlight, session_present: bool) {
    if !session_present {
        flight.clear();
    }
    for cmd in core.commands.open() {
        let mqtt = matches!(cmd.via, super::commands::Via::Mqtt | super::commands::Via::Dojot);
        if mqtt && (cmd.broker_ms.is_none() || !session_present) {
            publish_command(core, client, flight, cmd.id);
        }
    }
}

/// One MQTT or AMQP measure as it came off the wire (`addr` is `None` when
/// the topic or routing key is not a measure's): size, address and JSON
/// checked, then ingested. Every refusal is counted by kind and logged; the
/// caller acknowledges the message whatever happens, so a bad one is never
/// redelivered forever.
async fn ingest_bytes(core: &Core, transport: Transport, source: &str, addr: Option<Address>, data: &[u8]) {
    if data.len() > core.settings.max_body_bytes {
        core.counters.error("too_large");
        warn!(%source, size = data.len(), limit = core.settings.max_body_bytes, "dropped a measure larger than max_body_bytes");
        return;
    }
    let Some(addr) = addr else {
        core.counters.error(if transport == Transport::Mqtt { "bad_topic" } else { "bad_routing_key" });
        debug!(%source, "not a measure topic or routing key");
        return;
    };
    let payload = match &addr {
        Address::Apikey { attr: Some(a), .. } => Payload::Single(a.clone(), single_value(data, false)),
        _ => match serde_json::from_slice(data) {
            Ok(v) => Payload::Json(v),
            Err(e) => {
                core.counters.error("bad_payload");
                warn!(%source, error = %e, "dropped a measure that is not JSON");
                return;
            }
        },
    };
    if let Err(e) = core.ingest(transport, &addr, payload, None).await {
        // Counted always; logged once a minute per kind and apikey, so a
        // shared broker's traffic for other gateways cannot flood the log.
        let key = match &addr {
            Address::Apikey { apikey, .. } => apikey.as_str(),
            Address::Dojot { tenant, .. } => tenant.as_str(),
        };
        if core.quiet.first(e.metric_label(), key) {
            warn!(%source, error = %e, "dropped a measure (more like it within a minute are only counted)");
        } else {
            debug!(%source, error = %e, "dropped a measure");
        }
    }
}

/// The MQTT client of a gateway: reconnects forever with backoff,
/// re-subscribes after every connect, unsubscribes while the gateway is
/// stopped, and acknowledges a QoS 1 measure only once the federation has
/// taken it.
pub async fn mqtt(
    core: Arc<Core>,
    url: String,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<super::MqttOut>,
    token: CancellationToken,
) {
    let Some((host, port, creds)) = parse_mqtt_url(&url) else {
        core.counters.error("bad_mqtt_url");
        warn!(url = %crate::config::redact_url(&url), "invalid MQTT URL; MQTT is off for this gateway");
        core.mqtt_link.send_replace(MqttLink::Down("invalid MQTT URL".into()));
        return;
    };
    let mut opts = MqttOptions::new(format!("busbar-{}", core.gateway.simple()), host, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(mqtt_packet_limit(&core), 1 << 20)
        .set_request_channel_capacity(65_536)
        .set_inflight(1000);
    if let Some((u, p)) = creds {
        opts.set_credentials(u, p);
    }
    if let Some(tls) = &core.settings.mqtt_tls {
        match tls_config(tls) {
            Ok(config) => {
                opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
                    config,
                ))));
            }
            Err(e) => {
                core.counters.error("mqtt_tls");
                warn!(error = %e, "invalid MQTT TLS settings; MQTT is off for this gateway");
                core.mqtt_link.send_replace(MqttLink::Down(format!("invalid TLS settings: {e}")));
                return;
            }
        }
    }
    let (client, mut events) = AsyncClient::new(opts, 65_536);
    // Commands are small messages that should leave at once: without
    // TCP_NODELAY each waits for the broker's delayed ACK (about 40 ms).
    let mut net = events.network_options();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let qos = if core.settings.mqtt_qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
    let filters = mqtt_filters(&core.settings.mqtt_prefix, &core.settings.mqtt_shared_group, core.settings.dojot);
    let mut running = core.running.subscribe();
    let mut subscribed = false;
    let mut connected = false;
    // SUBACKs still expected; the client counts as up once they are in.
    let mut pending = 0usize;
    let mut backoff = Backoff::new();
    let mut flight = InFlight::default();
    let set = |client: &AsyncClient, on: bool| {
        for f in &filters {
            let r = if on { client.try_subscribe(f.clone(), qos) } else { client.try_unsubscribe(f.clone()) };
            if let Err(e) = r {
                warn!(filter = %f, error = %e, "cannot (un)subscribe");
            }
        }
    };
    loop {
        tokio::select! {
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(filters = filters.len(), session_present = ack.session_present, "MQTT connected");
                    connected = true;
                    republish(&core, &client, &mut flight, ack.session_present);
                    backoff.reset();
                    subscribed = *running.borrow();
                    if subscribed {
                        set(&client, true);
                        pending = filters.len();
                    } else {
                        core.counters.mqtt_up.store(true, Ordering::Relaxed);
                        core.mqtt_link.send_replace(MqttLink::Up);
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => flight.on_outgoing(pkid),
                Ok(Event::Outgoing(rumqttc::Outgoing::AwaitAck(pkid))) => {
                    if let Some(Some(id)) = flight.requested.pop_front() {
                        flight.collided = Some((pkid, id));
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(id) = flight.by_pkid.remove(&ack.pkid) {
                        core.commands.broker_acked(id).await;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    pending = pending.saturating_sub(1);
                    if pending == 0 {
                        core.counters.mqtt_up.store(true, Ordering::Relaxed);
                        core.mqtt_link.send_replace(MqttLink::Up);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // A panic costs this measure (acknowledged below, so it
                    // is not redelivered forever), never the MQTT loop.
                    if let Err(panic) = crate::supervise::catch(on_publish(&core, &p.topic, &p.payload)).await {
                        core.counters.error("panic");
                        tracing::error!(topic = %p.topic, %panic, "handling an MQTT measure panicked; it is dropped");
                    }
                    if let Err(e) = client.try_ack(&p) {
                        warn!(error = %e, "cannot acknowledge a measure");
                    }
                    // An oversized message was just taken and refused: the
                    // next connection uses the normal limit again.
                    events.mqtt_options.set_max_packet_size(mqtt_packet_limit(&core), 1 << 20);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(size) = oversized(&e) {
                        // The broker would redeliver it at every reconnect, and
                        // the client would drop every connection on it: take
                        // it once with a limit that fits, refuse it (counted,
                        // logged) and acknowledge it.
                        warn!(size, limit = core.settings.max_body_bytes, "an MQTT message exceeds max_body_bytes; taking it once to refuse it");
                        events.mqtt_options.set_max_packet_size((size + 64 * 1024).min(MQTT_MAX_PACKET), 1 << 20);
                    }
                    if connected {
                        warn!(error = %e, "MQTT connection lost; reconnecting");
                        core.counters.error("mqtt_disconnect");
                    } else {
                        debug!(error = %e, "MQTT connect failed");
                    }
                    connected = false;
                    core.counters.mqtt_up.store(false, Ordering::Relaxed);
                    let why = e.to_string();
                    core.mqtt_link.send_if_modified(|l| {
                        let changed = !matches!(l, MqttLink::Down(w) if *w == why);
                        *l = MqttLink::Down(why);
                        changed
                    });
                    if !backoff.wait(&token).await {
                        break;
                    }
                }
            },
            Some(out) = commands.recv() => match out {
                // Not connected: the next connect publishes it (`republish`).
                super::MqttOut::Command(id) => {
                    if connected {
                        publish_command(&core, &client, &mut flight, id);
                    }
                }
                super::MqttOut::Publish(topic, payload) => {
                    match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                        Ok(()) => flight.requested.push_back(None),
                        Err(e) => warn!(error = %e, "cannot publish to a device"),
                    }
                }
            },
            changed = running.changed() => {
                if changed.is_err() {
                    break;
                }
                let on = *running.borrow();
                if connected && on != subscribed {
                    set(&client, on);
                    subscribed = on;
                }
            }
            _ = token.cancelled() => break,
        }
    }
    core.counters.mqtt_up.store(false, Ordering::Relaxed);
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
}

// ----- AMQP -----

/// The AMQP southbound consumer: queue `amqp_south_queue` on topic
/// exchange `exchange`, bound `.*.*.attrs` and `.*.*.attrs.*`; a delivery
/// is acknowledged once the federation has taken its measure.
pub async fn amqp(
    core: Arc<Core>,
    url: String,
    exchange: String,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<uuid::Uuid>,
    token: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let session = amqp_session(&core, &url, &exchange, &mut commands, &token);
        match session.await {
            Ok(Ended::Shutdown) => return,
            // Stopped, then started again: reconnect and consume at once.
            Ok(Ended::Resumed) => {
                backoff.reset();
                continue;
            }
            Err(e) => {
                core.counters.error("amqp_south_disconnect");
                warn!(error = %e, "AMQP southbound lost the broker; reconnecting");
            }
        }
        if !backoff.wait(&token).await {
            return;
        }
    }
}

/// How an AMQP southbound session ended, when its link did not fail.
enum Ended {
    /// The daemon shuts down or the gateway goes.
    Shutdown,
    /// The gateway was stopped (the session closed its connection, so
    /// measures wait in the queue) and is running again.
    Resumed,
}

/// Publish AMQP command `id` (persistent, mandatory) and wait for the
/// broker's confirm: taken by a device's queue, it is the broker's to hold
/// (`broker_acked`); unroutable (no device queue bound yet), it stays
/// pending and goes again at the next retry tick.
async fn publish_amqp_command(
    core: &Core,
    ch: &lapin::Channel,
    exchange: &str,
    id: uuid::Uuid,
) -> Result<(), LinkError> {
    let Some(cmd) = core.commands.get(id) else { return Ok(()) };
    if cmd.state.terminal() || cmd.via != super::commands::Via::Amqp || cmd.broker_ms.is_some() {
        return Ok(());
    }
    let (key, body) = super::commands::amqp_message(&cmd);
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.to_string().into());
    let opts = lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm = ch.basic_publish(exchange.into(), key.as_str().into(), opts, &body, props).await?.await?;
    core.commands.counters.sent.fetch_add(1, Ordering::Relaxed);
    if confirm.is_ack() && confirm.take_message().is_none() {
        core.commands.broker_acked(id).await;
    } else {
        debug!(command = %id, "no device queue took the command yet; trying again");
    }
    Ok(())
}

async fn amqp_session(
    core: &Core,
    url: &str,
    exchange: &str,
    commands: &mut tokio::sync::mpsc::UnboundedReceiver<uuid::Uuid>,
    token: &CancellationToken,
) -> Result<Ended, LinkError> {
    let conn = amqp::connect(url, &format!("busbar amqp-south gateway={}", core.gateway)).await?;
    let ch = conn.create_channel().await?;
    let out = conn.create_channel().await?;
    out.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    amqp::declare_topic_exchange(&ch, exchange).await?;
    let queue = core.settings.amqp_south_queue.as_str();
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await?;
    for key in [".*.*.attrs", ".*.*.attrs.*", ".*.*.cmdexe"] {
        ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
    }
    let mut consumer =
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    info!(%exchange, %queue, "AMQP southbound consuming");
    let mut running = core.running.subscribe();
    // Commands not yet taken by a device queue: now, then every few seconds.
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = retry.tick() => {
                for c in core.commands.open() {
                    if c.via == super::commands::Via::Amqp && c.broker_ms.is_none() {
                        publish_amqp_command(core, &out, exchange, c.id).await?;
                    }
                }
            }
            Some(id) = commands.recv() => publish_amqp_command(core, &out, exchange, id).await?,
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let key = d.routing_key.as_str();
                    if let Some((apikey, device_id)) = parse_routing_cmdexe(key) {
                        on_cmdexe(core, key, &apikey, &device_id, &d.data).await;
                        d.ack(BasicAckOptions::default()).await?;
                        continue;
                    }
                    let measure = ingest_bytes(core, Transport::Amqp, key, parse_routing_key(key), &d.data);
                    if let Err(panic) = crate::supervise::catch(measure).await {
                        core.counters.error("panic");
                        tracing::error!(routing_key = %key, %panic, "handling an AMQP measure panicked; it is dropped");
                    }
                    d.ack(BasicAckOptions::default()).await?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(LinkError::Lost("the consumer ended".into())),
            },
            // While stopped, stop consuming: measures wait in the queue.
            _ = async { drop(running.wait_for(|on| !on).await) } => break,
            _ = token.cancelled() => {
                let _ = conn.close(200, "bye".into()).await;
                return Ok(Ended::Shutdown);
            }
        }
    }
    let _ = conn.close(200, "gateway stopped".into()).await;
    tokio::select! {
        _ = async { drop(running.wait_for(|on| *on).await) } => Ok(Ended::Resumed),
        _ = token.cancelled() => Ok(Ended::Shutdown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse() {
        assert_eq!(parse_mqtt_url("mqtt://127.0.0.1:1883"), Some(("127.0.0.1".into(), 1883, None)));
        assert_eq!(parse_mqtt_url("mqtt://broker"), Some(("broker".into(), 1883, None)));
        assert_eq!(
            parse_mqtt_url("mqtt://u:p@broker:1884/"),
            Some(("broker".into(), 1884, Some(("u".into(), "p".into()))))
        );
        assert_eq!(parse_mqtt_url("mqtts://broker"), Some(("broker".into(), 8883, None)));
        assert_eq!(parse_mqtt_url("http://x"), None);
        assert_eq!(parse_mqtt_url("mqtt://x:port"), None);
    }

    #[test]
    fn subscriptions_cover_the_iotagent_json_topics_shared_or_prefixed() {
        let f = mqtt_filters("", "busbar", false);
        assert!(f.contains(&"$share/busbar//json/+/+/attrs".to_owned()));
        assert!(f.contains(&"$share/busbar/json/+/+/attrs/+".to_owned()));
        assert!(f.contains(&"$share/busbar//+/+/attrs".to_owned()));
        assert!(!f.iter().any(|x| x.ends_with("+/attrs") && !x.contains("+/+/attrs")), "dojot off");
        let p = mqtt_filters("site1", "", true);
        assert_eq!(
            p,
            [
                "site1/json/+/+/attrs",
                "site1/+/+/attrs",
                "site1/json/+/+/attrs/+",
                "site1/+/+/attrs/+",
                "site1/json/+/+/cmdexe",
                "site1/+/+/cmdexe",
                "site1/json/+/+/configuration/commands",
                "site1/+/+/configuration/commands",
                "site1/+/attrs"
            ]
        );
        assert_eq!(f.len(), 12, "three forms of four device topics: {f:?}");
        assert!(f.contains(&"$share/busbar//+/+/cmdexe".to_owned()), "command results too");
    }

    #[test]
    fn prefixed_topics_read_like_their_unprefixed_forms() {
        let t = |topic: &str| strip_prefix(topic, "p1").and_then(|t| parse_topic(&t, true));
        assert_eq!(t("p1/json/k/d/attrs"), parse_topic("/json/k/d/attrs", false));
        assert_eq!(t("p1/k/d/attrs/x"), parse_topic("/k/d/attrs/x", false));
        assert_eq!(t("p1/admin:dev/attrs"), parse_topic("admin:dev/attrs", true));
        assert_eq!(t("p2/json/k/d/attrs"), None);
    }
}
