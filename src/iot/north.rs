//! The provisioning ("north") API, compatible with iotagent-node-lib
//! (reference §2.4, §2.5): the same paths, status codes and
//! `{"name","message"}` error bodies. Unlike upstream, malformed JSON is a
//! 400, never a 500.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;

use super::Core;
use super::model::{ApiError, Tenant, parse_device, parse_group};
use super::registry::selects;

/// Largest provisioning request.
const MAX_BODY: usize = 1 << 20;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({"name": self.name, "message": self.message}))).into_response()
    }
}

type Shared = State<Arc<Core>>;
type Params = Query<HashMap<String, String>>;

/// The router of the provisioning API.
pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/iot/groups", get(list_groups).post(create_groups).put(update_group).delete(delete_group))
        .route("/iot/services", get(list_services).post(create_groups).put(update_group).delete(delete_group))
        .route("/iot/devices", get(list_devices).post(create_devices))
        .route("/iot/devices/{id}", get(get_device).put(update_device).delete(delete_device))
        .route("/iot/op/delete", post(op_delete))
        .route("/v2/op/query", post(op_query))
        .route("/v2/op/update", post(op_update))
        .route("/iot/commands", get(list_commands))
        .route("/notify", post(notify))
        .route("/iot/about", get(about))
        .route("/version", get(about))
        .route("/admin/log", get(get_log).put(put_log))
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .fallback(|| async { ApiError::new(404, "NOT_FOUND", "No such resource") })
        .method_not_allowed_fallback(|| async { ApiError::new(405, "METHOD_NOT_ALLOWED", "Method not allowed here") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(core)
}

fn header(h: &HeaderMap, k: &str) -> Option<String> {
    h.get(k).and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The tenant of a request: both headers are mandatory.
fn tenant(core: &Core, h: &HeaderMap) -> Result<Tenant, ApiError> {
    let (service, path) = (header(h, "fiware-service"), header(h, "fiware-servicepath"));
    let missing: Vec<&str> = [("fiware-service", &service), ("fiware-servicepath", &path)]
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::new(
            400,
            "MISSING_HEADERS",
            format!(
                "Some headers were missing from the request: {}",
                serde_json::to_string(&missing).unwrap_or_default()
            ),
        ));
    }
    let (service, servicepath) = (service.unwrap_or_default(), path.unwrap_or_default());
    super::model::check_service(&service)?;
    super::model::check_servicepath(&servicepath, true)?;
    if !core.serves(&service) {
        return Err(ApiError::new(403, "ACCESS_FORBIDDEN", format!("This gateway does not serve service {service}")));
    }
    Ok(Tenant { service, servicepath })
}

/// A concrete tenant: `/*` only selects for reads.
fn exact(t: Tenant) -> Result<Tenant, ApiError> {
    if t.servicepath.contains('*') {
        return Err(ApiError::syntax("a wildcard servicepath can only be read"));
    }
    Ok(t)
}

/// A request body, or why it could not be read (too large: 413).
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn json_body(h: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let body = super::south::body(body)?;
    let ct = header(h, "content-type").unwrap_or_default();
    if !ct.contains("json") {
        return Err(ApiError::syntax(format!("expected a JSON body, got content type {ct:?}")));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::syntax(format!("invalid JSON: {e}")))
}

fn items<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>, ApiError> {
    v.get(key)
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::syntax(format!("the body must be {{\"{key}\": [ … ]}}")))
}

fn page(mut all: Vec<Value>, q: &HashMap<String, String>, key: &str) -> Result<Response, ApiError> {
    let num = |k: &str| -> Result<Option<usize>, ApiError> {
        q.get(k)
            .map(|v| {
                v.parse::<u32>()
                    .map(|n| n as usize)
                    .map_err(|_| ApiError::syntax(format!("{k} must be a whole number from 0 to {}", u32::MAX)))
            })
            .transpose()
    };
    let count = all.len();
    let offset = num("offset")?.unwrap_or(0).min(count);
    let limit = num("limit")?.unwrap_or(usize::MAX);
    all = all.into_iter().skip(offset).take(limit).collect();
    let mut body = Map::new();
    body.insert("count".into(), count.into());
    body.insert(key.into(), Value::Array(all));
    Ok(axum::Json(Value::Object(body)).into_response())
}

fn created() -> Response {
    (StatusCode::CREATED, axum::Json(json!({}))).into_response()
}

async fn create_groups(State(core): Shared, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let v = json_body(&h, body)?;
    let list = items(&v, "groups").or_else(|_| items(&v, "services"))?;
    let groups = list.iter().map(parse_group).collect::<Result<Vec<_>, _>>()?;
    for g in &groups {
        check_endpoint(&core, &g.extra)?;
    }
    core.registry.create_groups(&tenant, groups).await?;
    Ok(created())
}

async fn list_groups(State(core): Shared, h: HeaderMap, q: Params) -> Result<Response, ApiError> {
    page(core.registry.groups(&tenant(&core, &h)?), &q, "groups")
}

async fn list_services(State(core): Shared, h: HeaderMap, q: Params) -> Result<Response, ApiError> {
    page(core.registry.groups(&tenant(&core, &h)?), &q, "services")
}

fn group_key(q: &HashMap<String, String>) -> Result<(String, String), ApiError> {
    match (q.get("resource"), q.get("apikey")) {
        (Some(r), Some(k)) if !r.is_empty() && !k.is_empty() => Ok((r.clone(), k.clone())),
        _ => {
            Err(ApiError::new(400, "MISSING_HEADERS", "Some query parameters were missing: [\"resource\",\"apikey\"]"))
        }
    }
}

async fn update_group(State(core): Shared, h: HeaderMap, q: Params, body: Body) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let (resource, apikey) = group_key(&q)?;
    let v = json_body(&h, body)?;
    let patch = v.as_object().ok_or_else(|| ApiError::syntax("the body must be an object"))?;
    check_endpoint(&core, patch)?;
    core.registry.update_group(&tenant, &resource, &apikey, patch).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A provisioned `endpoint` must be an `http(s)` URL, on a host of the
/// gateway's `endpoint_allow` when it has one.
fn check_endpoint(core: &Core, fields: &Map<String, Value>) -> Result<(), ApiError> {
    match fields.get("endpoint") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(e)) => core.endpoint_allowed(e).map_err(|m| ApiError::new(400, "BAD_REQUEST", m)),
        Some(other) => Err(ApiError::syntax(format!("endpoint must be a URL, not {other}"))),
    }
}

async fn delete_group(State(core): Shared, h: HeaderMap, q: Params) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let (resource, apikey) = group_key(&q)?;
    let devices = q.get("device").is_some_and(|d| d == "true");
    core.registry.delete_group(&tenant, &resource, &apikey, devices).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn create_devices(State(core): Shared, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let v = json_body(&h, body)?;
    let devices = items(&v, "devices")?.iter().map(parse_device).collect::<Result<Vec<_>, _>>()?;
    for d in &devices {
        check_endpoint(&core, &d.extra)?;
    }
    let bulk = devices.len() > 100;
    drop(v);
    let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
    core.registry.create_devices(&tenant, devices).await?;
    if bulk {
        super::trim_heap();
    }
    // Devices with commands are registered at their Context Broker, so
    // that it forwards updates of those attributes here.
    for id in ids {
        if let Some(r) = core.registry.device_by_uuid(super::registry::device_uuid(&tenant, &id)) {
            super::commands::register(&core, &r);
        }
    }
    Ok(created())
}

/// `POST /v2/op/update` from the Context Broker (`actionType: update`):
/// the commands it forwards, `{"id", "type", "<cmd>": {"type": "command",
/// "value": …}}` per entity. Each is taken into the ledger (stored) before
/// the 204; a device that declares no such command is a 400, an unknown
/// entity a 404, and nothing of that request is taken.
async fn op_update(State(core): Shared, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let v = json_body(&h, body)?;
    let action = v.get("actionType").and_then(Value::as_str).unwrap_or_default();
    if !action.eq_ignore_ascii_case("update") && !action.eq_ignore_ascii_case("replace") {
        return Err(ApiError::new(
            400,
            "BAD_REQUEST",
            format!("actionType {action:?}: the agent takes commands with actionType update"),
        ));
    }
    let entities = items(&v, "entities")?;
    let mut todo = Vec::new();
    for e in entities {
        let id = e.get("id").and_then(Value::as_str).ok_or_else(|| ApiError::syntax("an entity needs an id"))?;
        let r = core
            .registry
            .by_entity(&tenant, id, e.get("type").and_then(Value::as_str))
            .ok_or_else(|| ApiError::device_not_found(id))?;
        let declared = super::commands::declared(&r.record.device, r.group.as_deref());
        for (name, attr) in e.as_object().into_iter().flatten().filter(|(k, _)| *k != "id" && *k != "type") {
            if !declared.iter().any(|c| c["name"] == name.as_str()) {
                return Err(ApiError::new(
                    400,
                    "COMMAND_NOT_FOUND",
                    format!("{name} is not a command of {}", r.record.device.device_id),
                ));
            }
            let value = attr.get("value").cloned().unwrap_or(Value::Null);
            todo.push((r.record.uuid, name.clone(), value));
        }
    }
    for (device, name, value) in todo {
        let origin = super::commands::Origin { from: "cb".into(), ..Default::default() };
        super::commands::submit(&core, device, &name, value, None, origin)
            .await
            .map_err(|e| ApiError::new(400, "BAD_REQUEST", e.to_string()))?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /notify`: a Context Broker notification for a configuration
/// subscription (`super::configuration`): the notified attributes go to
/// their devices. 200 `{}` whatever it held (Orion does not retry on an
/// error answer, and an entity that is no device here is not its fault).
async fn notify(State(core): Shared, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let v = json_body(&h, body)?;
    let entities = v.get("data").and_then(Value::as_array);
    let entity_ok = |e: &Value| e.get("id").is_some_and(Value::is_string) && e.get("type").is_none_or(Value::is_string);
    if !entities.is_some_and(|d| d.iter().all(entity_ok)) {
        return Err(ApiError::syntax("a notification needs data: [entities, each with a string id and type]"));
    }
    super::configuration::notified(&core, &tenant, &v).await;
    Ok(axum::Json(json!({})).into_response())
}

/// `GET /iot/commands[?device=ID]`: the ledger of the tenant (or of one of
/// its devices), oldest first: `{"count", "commands": […]}`.
async fn list_commands(State(core): Shared, h: HeaderMap, q: Params) -> Result<Response, ApiError> {
    let tenant = tenant(&core, &h)?;
    let device = q.get("device");
    if let Some(id) = device
        && !core
            .registry
            .resolved()
            .iter()
            .any(|r| r.record.device.device_id == *id && selects(&tenant, &r.record.tenant))
    {
        return Err(ApiError::device_not_found(id));
    }
    let all: Vec<Value> = core
        .commands
        .list(None)
        .iter()
        .filter(|c| {
            let t = Tenant { service: c.service.clone(), servicepath: c.servicepath.clone() };
            selects(&tenant, &t) && device.is_none_or(|d| *d == c.device_id)
        })
        .map(super::commands::Command::view)
        .collect();
    page(all, &q, "commands")
}

async fn list_devices(State(core): Shared, h: HeaderMap, q: Params) -> Result<Response, ApiError> {
    page(core.registry.list_devices(&tenant(&core, &h)?), &q, "devices")
}

/// `POST /v2/op/query`, the Context Broker asking its Context Provider for
/// lazy attributes: `{"entities": [{"id", "type"?}], "attrs": [...]}`. Each
/// entity must be a device of the tenant (by entity name, and type if
/// given); the answer is iotagent-node-lib's default, an array of entities
/// whose asked attributes have an empty value (`super::ngsi::query_answer`).
async fn op_query(State(core): Shared, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    struct EntityRef {
        id: String,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Query {
        entities: Vec<EntityRef>,
        #[serde(default)]
        attrs: Vec<String>,
    }
    let tenant = exact(tenant(&core, &h)?)?;
    let q: Query = serde_json::from_value(json_body(&h, body)?)
        .map_err(|e| ApiError::syntax(format!("expected {{\"entities\": [{{\"id\": …}}], \"attrs\": […]}}: {e}")))?;
    let mut out = Vec::with_capacity(q.entities.len());
    for e in &q.entities {
        let Some(r) = core.registry.by_entity(&tenant, &e.id, e.kind.as_deref()) else {
            return Err(ApiError::device_not_found(&e.id));
        };
        let group = r.group.as_deref();
        let d = &r.record.device;
        out.push(super::ngsi::query_answer(&e.id, d.entity_type(group), d, group, &q.attrs));
    }
    Ok(axum::Json(out).into_response())
}

async fn get_device(State(core): Shared, h: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    Ok(axum::Json(core.registry.get_device(&tenant, &id)?).into_response())
}

async fn update_device(
    State(core): Shared,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let v = json_body(&h, body)?;
    let patch = v.as_object().ok_or_else(|| ApiError::syntax("the body must be an object"))?;
    check_endpoint(&core, patch)?;
    core.registry.update_device(&tenant, &id, patch).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_device(State(core): Shared, h: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let missing = core.registry.delete_devices(&tenant, std::slice::from_ref(&id)).await?;
    if !missing.is_empty() {
        return Err(ApiError::device_not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn op_delete(State(core): Shared, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let tenant = exact(tenant(&core, &h)?)?;
    let v = json_body(&h, body)?;
    let ids = items(&v, "devices")?
        .iter()
        .map(|d| {
            d.get("deviceId")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ApiError::syntax("every entry needs a deviceId"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Every device found is deleted; any missing one makes it a 404.
    let missing = core.registry.delete_devices(&tenant, &ids).await?;
    if let Some(first) = missing.first() {
        return Err(ApiError::device_not_found(first));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn about(State(core): Shared) -> Response {
    axum::Json(json!({
        "libVersion": concat!("busbar-", env!("CARGO_PKG_VERSION")),
        "port": core.settings.north_bind.port(),
        "baseRoot": "/",
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

const LEVELS: &[&str] = &["DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL"];

async fn get_log(State(core): Shared) -> Response {
    let level = core.log_level.lock().unwrap_or_else(|p| p.into_inner()).clone();
    axum::Json(json!({ "level": level })).into_response()
}

async fn put_log(State(core): Shared, q: Params) -> Response {
    let bad = |msg: &str| (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": msg }))).into_response();
    let Some(level) = q.get("level") else { return bad("log level missing") };
    let level = level.to_ascii_uppercase();
    if !LEVELS.contains(&level.as_str()) {
        return bad("invalid log level");
    }
    // The live filter of the agent's code (`busbar::iot`), as the level
    // of iotagent-node-lib's process; FATAL has no tracing level of its own.
    let live = match level.as_str() {
        "DEBUG" => tracing::Level::DEBUG,
        "INFO" => tracing::Level::INFO,
        "WARN" | "WARNING" => tracing::Level::WARN,
        _ => tracing::Level::ERROR,
    };
    if let Err(e) = crate::telemetry::set_target("busbar::iot", live) {
        let body = axum::Json(json!({ "error": e.to_string() }));
        return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
    }
    *core.log_level.lock().unwrap_or_else(|p| p.into_inner()) = level;
    StatusCode::OK.into_response()
}

/// `GET /metrics`, negotiated as iotagent-node-lib does: OpenMetrics when
/// asked for, Prometheus text (0.0.4) by default, 406 for anything else.
async fn metrics(State(core): Shared, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or("*/*");
    let wants = |t: &str| accept.split(',').any(|a| a.trim().starts_with(t));
    let content_type = if wants("application/openmetrics-text") {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else if wants("text/plain") || wants("*/*") || wants("text/*") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        return (axum::http::StatusCode::NOT_ACCEPTABLE, "Not Acceptable").into_response();
    };
    let text = crate::metrics::render_gateway(crate::metrics::GatewaySource::snapshot(&*core));
    ([("content-type", content_type)], text).into_response()
}

/// `GET /ready`: 200 `{}` while the gateway takes measures, 503 `{}` while
/// it is stopped (iotagent-node-lib answers 503 when it is not ready).
async fn ready(State(core): Shared) -> Response {
    let code =
        if *core.running.borrow() { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(json!({}))).into_response()
}
