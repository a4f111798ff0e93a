//! The HTTP API, compatible with VILLAScontroller's (`/api/v1`), plus
//! `/metrics`. Every error is JSON: `{"error": {"msg": …}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use uuid::Uuid;

use crate::daemon::Shared;
use crate::protocol::{self, ReplyTo};

/// An API error: a status code and a message, rendered as JSON.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": {"msg": self.1, "code": self.0.as_u16()}}))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, r.body_text())
    }
}

/// The router, without a socket (tests drive it with `oneshot`). The
/// page is open; reading (and the event stream) needs the viewer role,
/// acting the operator role; with `auth: none` everyone is an operator.
pub fn app(shared: Arc<Shared>) -> Router {
    use crate::auth::{Role, require};
    use axum::middleware::from_fn_with_state;
    let gate = shared.gate.clone();
    let viewer = Router::new()
        .route("/api/v1", get(index))
        .route("/api/v1/", get(index))
        .route("/api/v1/component/{uuid}", get(component_status))
        .route("/api/v1/federation", get(federation))
        .route("/api/v1/federation/components", get(federation_components))
        .route("/api/v1/distributed/{how}/{query}", get(distributed))
        .route("/api/v1/log-level", get(get_log_level))
        .route("/api/v1/auth", get(whoami))
        .route("/api/v1/events", get(crate::web::events))
        .route("/api/v1/events/ticket", post(ticket))
        .route("/metrics", get(metrics))
        .route_layer(from_fn_with_state((gate.clone(), Role::Viewer), require));
    let operator = Router::new()
        .route("/api/v1/component/{uuid}", post(component_action))
        .route("/api/v1/log-level", put(put_log_level))
        .route_layer(from_fn_with_state((gate, Role::Operator), require));
    Router::new()
        .route("/", get(crate::web::page))
        .route("/index.html", get(crate::web::page))
        .route("/api/v1/health", get(health))
        .merge(viewer)
        .merge(operator)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "Not found".into()) })
        .method_not_allowed_fallback(|| async { ApiError(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(shared)
}

/// `GET /api/v1/auth`: how this API authenticates and the caller's role
/// (the page hides actions from viewers).
async fn whoami(
    State(s): State<Arc<Shared>>,
    axum::Extension(granted): axum::Extension<crate::auth::Granted>,
) -> Json<Value> {
    Json(json!({"auth": if s.gate.is_open() { "none" } else { "jwt" }, "role": granted.0}))
}

/// `POST /api/v1/events/ticket`: a single-use ticket for the WebSocket
/// (`/api/v1/events?ticket=…`), for browsers, which cannot send headers
/// there. With the caller's role; good for 30 s.
async fn ticket(
    State(s): State<Arc<Shared>>,
    axum::Extension(granted): axum::Extension<crate::auth::Granted>,
) -> Result<Json<Value>, ApiError> {
    let t = s
        .gate
        .tickets
        .issue(granted.0)
        .ok_or_else(|| ApiError(StatusCode::SERVICE_UNAVAILABLE, "Too many tickets outstanding".into()))?;
    Ok(Json(json!({"ticket": t, "expires_in": crate::auth::Tickets::TTL.as_secs()})))
}

/// `GET /api/v1/federation`: this daemon's site and every site it hears,
/// with their controller status, staleness and clock offset.
async fn federation(State(s): State<Arc<Shared>>) -> Json<Value> {
    let env = &s.env;
    let now = tokio::time::Instant::now();
    let dir = env.directory.lock().unwrap_or_else(|p| p.into_inner());
    Json(json!({
        "uuid": env.settings.controller,
        "site": s.config.site.clone().unwrap_or_else(|| env.info.host.clone()),
        "ics": dir.len(),
        "dropped": dir.dropped(),
        "sites": dir.sites(now),
    }))
}

/// `GET /api/v1/federation/components?site=&realm=&category=&type=&state=&stale=`:
/// the merged view of every IC of every site.
async fn federation_components(
    State(s): State<Arc<Shared>>,
    query: Result<axum::extract::Query<crate::directory::Filter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(filter) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let now = tokio::time::Instant::now();
    let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
    if filter.is_everything() {
        // The whole view: one shared snapshot, kept fresh by the feed while
        // somebody reads it (at most SNAPSHOT_MAX_AGE old), under a lock of
        // its own.
        let fresh = s.env.whole_view.lock().unwrap_or_else(|p| p.into_inner()).fresh(now);
        let snap = match fresh {
            Some(snap) => snap,
            None => {
                let snap = s.env.directory.lock().unwrap_or_else(|p| p.into_inner()).whole_view(now);
                s.env.whole_view.lock().unwrap_or_else(|p| p.into_inner()).store(snap.clone());
                snap
            }
        };
        return Ok((json, snap.body).into_response());
    }
    // Rows are written straight out (10,000 of them as values cost 50 ms).
    #[derive(serde::Serialize)]
    struct Body<'a> {
        components: Vec<crate::directory::Row<'a>>,
    }
    let dir = s.env.directory.lock().unwrap_or_else(|p| p.into_inner());
    let body = serde_json::to_vec(&Body { components: dir.rows(&filter, now) }).unwrap_or_default();
    Ok((json, body).into_response())
}

/// `?deadline=` of a distributed request (seconds).
#[derive(Debug, serde::Deserialize)]
struct Deadline {
    deadline: Option<f64>,
}

/// `GET /api/v1/distributed/{split|merge}/{health|components}?deadline=1`:
/// ask every controller of the federation; answers by the deadline, with
/// the sites that missed it named.
async fn distributed(
    State(s): State<Arc<Shared>>,
    Path((how, query)): Path<(String, String)>,
    deadline: Result<axum::extract::Query<Deadline>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let axum::extract::Query(d) = deadline.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let q = crate::directory::gather::Query::parse(&query).ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, format!("Unknown query {query:?}; expected health or components"))
    })?;
    let max = crate::directory::gather::MAX_DEADLINE.as_secs_f64();
    let secs = d.deadline.unwrap_or(1.0);
    if !(secs.is_finite() && secs > 0.0 && secs <= max) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("deadline must be seconds between 0 and {max}")));
    }
    let merge = match how.as_str() {
        "split" => false,
        "merge" => true,
        _ => return Err(ApiError(StatusCode::NOT_FOUND, format!("Unknown form {how:?}; expected split or merge"))),
    };
    let done = s.asker.ask(q, std::time::Duration::from_secs_f64(secs)).await;
    Ok(Json(if merge { done.merge() } else { done.split() }))
}

/// Bind the configured address and serve until shutdown; returns the bound
/// address (useful with port 0).
pub async fn serve(shared: Arc<Shared>) -> Result<SocketAddr, crate::serve::BindError> {
    let bind = shared.config.api.bind;
    let listener = crate::serve::bind(bind).await?;
    let addr = listener.local_addr().map_err(|source| crate::serve::BindError { addr: bind, source })?;
    let limits = shared.config.api.limits();
    let observe = crate::serve::Observe::new("api", &shared.env.metrics);
    crate::serve::spawn(
        &shared.env.tracker,
        listener,
        app(shared.clone()),
        shared.env.shutdown.clone(),
        limits,
        observe,
    );
    Ok(addr)
}

async fn index(State(s): State<Arc<Shared>>) -> Json<Value> {
    let components: Vec<String> = s.env.components.handles().iter().map(|h| h.uuid().to_string()).collect();
    Json(json!({"components": components, "status": s.env.info.summary()}))
}

/// What is wrong with the daemon, one entry per problem: the broker
/// connection, every component task, and every gateway's I/O (its thread,
/// MQTT and federation connections). A component that does not answer
/// within a second counts as a problem too.
async fn problems(s: &Shared) -> Vec<Value> {
    let mut out = Vec::new();
    if !s.env.bus.connected() {
        out.push(json!({"what": "broker", "msg": "broker disconnected"}));
    }
    for h in s.env.components.handles() {
        let uuid = h.uuid().to_string();
        if !h.is_alive() {
            out.push(json!({"what": "component", "uuid": uuid, "msg": "the component's task has stopped"}));
            continue;
        }
        if h.keys.category != "gateway" {
            continue;
        }
        let Ok(Some(st)) = tokio::time::timeout(std::time::Duration::from_secs(1), h.status()).await else {
            out.push(json!({"what": "component", "uuid": uuid, "msg": "the component does not answer"}));
            continue;
        };
        let st = &st["status"];
        for (key, msg) in [
            ("io_running", "the gateway's I/O thread has stopped; reset restarts it"),
            ("mqtt_connected", "the gateway is not connected to its MQTT broker"),
            ("federation_connected", "the gateway is not connected to the federation broker"),
        ] {
            if st[key] == false {
                out.push(json!({"what": "gateway", "uuid": uuid, "msg": msg}));
            }
        }
    }
    out
}

/// `GET /api/v1/health`: open, so a kubelet's probe needs no token; it
/// says only ok or the first problem. `?verbose` (which names components)
/// needs the viewer role like the rest of the API.
async fn health(
    State(s): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    query: axum::extract::RawQuery,
) -> Response {
    // `?verbose` (any value, repeated or not) lists every problem.
    let verbose = query.0.is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("verbose")));
    if verbose && let Err(e) = s.gate.check(&headers, None) {
        return s.gate.refuse(&e);
    }
    let problems = problems(&s).await;
    let code = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = match problems.first() {
        None => json!({"status": "ok"}),
        Some(p) => json!({"status": "error", "msg": p["msg"]}),
    };
    if verbose {
        body["components"] = s.env.components.len().into();
        body["problems"] = Value::Array(problems);
    }
    (code, Json(body)).into_response()
}

fn find(s: &Shared, uuid: &str) -> Result<crate::component::ComponentHandle, ApiError> {
    let not_found = || ApiError(StatusCode::NOT_FOUND, format!("No component with uuid {uuid}"));
    let u = Uuid::parse_str(uuid).map_err(|_| not_found())?;
    s.env.components.lookup(u).ok_or_else(not_found)
}

/// `GET /api/v1/component/{uuid}`: a component's status, or a device's
/// (devices are components their gateway speaks for).
async fn component_status(State(s): State<Arc<Shared>>, Path(uuid): Path<String>) -> Result<Json<Value>, ApiError> {
    let h = match find(&s, &uuid) {
        Ok(h) => h,
        Err(not_found) => return device_status(&s, &uuid).await.map(Json).ok_or(not_found),
    };
    h.status().await.map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "Component stopped".into()))
}

/// The status of device `uuid`, from the gateway that has it.
async fn device_status(s: &Shared, uuid: &str) -> Option<Value> {
    let uuid = Uuid::parse_str(uuid).ok()?;
    for gateway in s.env.components.handles().into_iter().filter(|h| h.keys.category == "gateway") {
        if let Some(status) = gateway.member_status(uuid).await {
            return Some(status);
        }
    }
    None
}

/// `POST /api/v1/component/{uuid}`: act on a component of this daemon and
/// answer with its status; a component of another site (known to the
/// directory) gets the action over the federated exchange, answered 202:
/// its status arrives on the event stream and in the directory.
async fn component_action(
    State(s): State<Arc<Shared>>,
    Path(uuid): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let local = find(&s, &uuid);
    let remote = match &local {
        Ok(_) => None,
        Err(_) => {
            Uuid::parse_str(&uuid).ok().filter(|u| s.env.directory.lock().unwrap_or_else(|p| p.into_inner()).knows(u))
        }
    };
    let body = body.map_err(|r| ApiError(r.status(), r.body_text()))?;
    let h = match (local, remote) {
        (Ok(h), _) => Some(h),
        (Err(e), remote) => match device_action(&s, &uuid, &body).await {
            Some(answer) => return answer,
            None if remote.is_some() => None,
            None => return Err(e),
        },
    };
    let req = decode_action(&s, &body)?;
    let Some(h) = h else {
        // Checked above, sent as it came: the remote daemon decodes it again.
        let target = remote.unwrap_or_default();
        let headers = protocol::Filter { uuid: Some(target.to_string()), ..Default::default() }.action_headers();
        if !s.env.bus.publish_status_with(headers, &body, None).await {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "The broker is not connected; try again".into()));
        }
        let _ = req;
        return Ok((StatusCode::ACCEPTED, Json(json!({"sent": true, "uuid": target}))).into_response());
    };
    h.act(req)
        .await
        .map(|v| Json(v).into_response())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "Component stopped".into()))
}

/// An HTTP API action body, decoded as one from the bus (a refusal counted
/// by kind, as there).
fn decode_action(s: &Shared, body: &[u8]) -> Result<protocol::ActionRequest, ApiError> {
    let decoded = protocol::decode(
        Some(protocol::CONTENT_TYPE),
        body,
        s.config.max_body_bytes,
        ReplyTo::default(),
        SystemTime::now(),
    );
    match decoded {
        Ok(Some(req)) => Ok(req),
        Ok(None) => Err(ApiError(StatusCode::BAD_REQUEST, "Missing action".into())),
        Err(r) => {
            s.env.metrics.error((&r).into());
            Err(ApiError(StatusCode::BAD_REQUEST, r.to_string()))
        }
    }
}

/// An action for a device of one of this daemon's gateways (`ping`,
/// `command`); `None`: no gateway here has that device.
async fn device_action(s: &Shared, uuid: &str, body: &[u8]) -> Option<Result<Response, ApiError>> {
    let uuid = Uuid::parse_str(uuid).ok()?;
    for gateway in s.env.components.handles().into_iter().filter(|h| h.keys.category == "gateway") {
        let Some(core) = gateway.devices().await else { continue };
        if core.registry.device_by_uuid(uuid).is_none() {
            continue;
        }
        let req = match decode_action(s, body) {
            Ok(req) => req,
            Err(e) => return Some(Err(e)),
        };
        return Some(match crate::iot::devices::act(&core, uuid, &req, &s.env.info).await? {
            Ok(status) => Ok(Json(status).into_response()),
            Err(msg) => Err(ApiError(StatusCode::BAD_REQUEST, msg)),
        });
    }
    None
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.env.metrics.render(),
    )
        .into_response()
}

/// `GET /api/v1/log-level`: the live filter.
async fn get_log_level() -> Json<Value> {
    Json(json!({"filter": crate::telemetry::filter()}))
}

/// `PUT /api/v1/log-level` with `{"level": "debug"}` or `{"level": "debug",
/// "target": "busbar::bus"}`: change the live filter of busbar's own code
/// (default target `busbar`). Other crates keep their level: at debug or
/// trace some of them log request details that may hold secrets.
async fn put_log_level(body: Result<Json<Value>, JsonRejection>) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let bad = |msg: String| ApiError(StatusCode::BAD_REQUEST, msg);
    let level = body.get("level").and_then(Value::as_str).ok_or_else(|| bad("level missing".into()))?;
    let level: tracing::Level =
        level.parse().map_err(|_| bad(format!("invalid level {level:?} (error, warn, info, debug, trace)")))?;
    let target = body.get("target").map_or(Some("busbar"), Value::as_str).unwrap_or_default();
    let ours = target == "busbar" || target.strip_prefix("busbar::").is_some_and(|t| !t.is_empty());
    if !ours || !target.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(bad(format!("invalid target {target:?}: busbar or busbar::<module>")));
    }
    crate::telemetry::set_target(target, level)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({"filter": crate::telemetry::filter()})))
}
