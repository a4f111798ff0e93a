//! An in-test fake of the VILLASnode REST API v2 and the VILLASrelay API
//! (`../shared/reference/villas-node-relay.md` §8), with the hazards of the
//! real VILLASnode 1.2.0: a POST carrying `Content-Length` to an unknown
//! node "crashes" it (the listener closes), as does `stop` on a stopped
//! socket node; any body on a node action is a 400. Every request is
//! logged, with whether it carried a `Content-Length` header.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Map, Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// VILLASnode's uuids: the 16 bytes of an MD5 digest, version bits and all.
pub fn md5_uuid(data: &[u8]) -> Uuid {
    Uuid::from_bytes(md5::compute(data).0)
}

/// One logged request.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub content_length: Option<String>,
    pub body: Vec<u8>,
}

/// One fake node.
#[derive(Debug, Clone)]
pub struct FakeNodeEntry {
    pub name: String,
    pub uuid: Uuid,
    pub state: String,
    pub kind: String,
    pub extra: Map<String, Value>,
}

#[derive(Debug)]
pub struct Inner {
    pub hostname: String,
    pub uuid: Uuid,
    pub nodes: Vec<FakeNodeEntry>,
    pub sessions: Vec<(String, u32)>,
    pub log: Vec<Logged>,
    pub delay: Duration,
    pub status_code: Option<u16>,
    pub crashed: Option<String>,
    pub restarts: u64,
    pub time_started: f64,
}

/// A running fake; [`FakeVillas::down`] and [`FakeVillas::up`] stop and
/// restart its listener on the same port.
pub struct FakeVillas {
    pub addr: SocketAddr,
    pub inner: Arc<Mutex<Inner>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

impl FakeVillas {
    /// A fake VILLASnode on `hostname` with nodes `(name, type)`, all
    /// `running`, and no relay sessions.
    pub async fn start(hostname: &str, nodes: &[(&str, &str)]) -> Arc<FakeVillas> {
        let uuid = md5_uuid(hostname.as_bytes());
        let nodes = nodes
            .iter()
            .map(|(name, kind)| FakeNodeEntry {
                name: (*name).to_owned(),
                uuid: md5_uuid(format!("{uuid}{name}").as_bytes()),
                state: "running".into(),
                kind: (*kind).to_owned(),
                extra: Map::new(),
            })
            .collect();
        let inner = Arc::new(Mutex::new(Inner {
            hostname: hostname.to_owned(),
            uuid,
            nodes,
            sessions: Vec::new(),
            log: Vec::new(),
            delay: Duration::ZERO,
            status_code: None,
            crashed: None,
            restarts: 0,
            time_started: now(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Arc::new(FakeVillas { addr, inner, server: Mutex::new(None) });
        fake.serve(listener);
        fake
    }

    fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/api/v2/status", get(status))
            .route("/api/v2/nodes", get(nodes))
            .route("/api/v2/node/{id}", get(node))
            .route("/api/v2/node/{id}/{action}", post(node_action).get(action_by_get))
            .route("/api/v2/restart", post(restart))
            .route("/api/v1", any(relay))
            .route("/api/v1/{*rest}", any(relay))
            .fallback(unknown)
            .with_state(self.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(handle);
    }

    /// The API stops answering: connection refused.
    pub fn down(&self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
    }

    /// Listen again on the same port.
    pub async fn up(self: &Arc<Self>) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests so far.
    pub fn log(&self) -> Vec<Logged> {
        self.inner.lock().unwrap().log.clone()
    }

    /// Why the fake "crashed" (a hazard the real VILLASnode dies of), if it did.
    pub fn crashed(&self) -> Option<String> {
        self.inner.lock().unwrap().crashed.clone()
    }

    /// A node's uuid.
    pub fn uuid_of(&self, name: &str) -> Uuid {
        self.inner.lock().unwrap().nodes.iter().find(|n| n.name == name).unwrap().uuid
    }

    /// A node's state.
    pub fn state_of(&self, name: &str) -> String {
        self.inner.lock().unwrap().nodes.iter().find(|n| n.name == name).unwrap().state.clone()
    }

    /// Change a node's state behind busbar's back.
    pub fn set_state(&self, name: &str, state: &str) {
        let mut i = self.inner.lock().unwrap();
        i.nodes.iter_mut().find(|n| n.name == name).unwrap().state = state.into();
    }

    /// Add a node.
    pub fn add_node(&self, name: &str, kind: &str) -> Uuid {
        let mut i = self.inner.lock().unwrap();
        let uuid = md5_uuid(format!("{}{name}", i.uuid).as_bytes());
        i.nodes.push(FakeNodeEntry {
            name: name.into(),
            uuid,
            state: "running".into(),
            kind: kind.into(),
            extra: Map::new(),
        });
        uuid
    }

    /// Remove a node.
    pub fn remove_node(&self, name: &str) {
        self.inner.lock().unwrap().nodes.retain(|n| n.name != name);
    }

    /// Add or remove a relay session.
    pub fn set_sessions(&self, sessions: &[(&str, u32)]) {
        self.inner.lock().unwrap().sessions = sessions.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect();
    }

    /// Answer every request after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }
}

type St = State<Arc<FakeVillas>>;

fn record(f: &FakeVillas, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Duration {
    let mut i = f.inner.lock().unwrap();
    i.log.push(Logged {
        method: method.to_string(),
        path: uri.path().to_owned(),
        content_length: headers.get("content-length").map(|v| v.to_str().unwrap_or("?").to_owned()),
        body: body.to_vec(),
    });
    i.delay
}

fn bad(msg: &str, extra: Value) -> Response {
    let mut v = json!({"error": msg});
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    (StatusCode::BAD_REQUEST, axum::Json(v)).into_response()
}

fn node_json(n: &FakeNodeEntry) -> Value {
    let mut v = json!({
        "name": n.name, "uuid": n.uuid, "state": n.state, "affinity": -1,
        "in": {"vectorize": 1, "signals": [{"type": "float", "name": "signal0"}]},
        "out": {"vectorize": 1, "signals": null},
        "type": n.kind,
    });
    v.as_object_mut().unwrap().extend(n.extra.clone());
    v
}

async fn status(State(f): St, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let delay = record(&f, &method, &uri, &headers, &[]);
    tokio::time::sleep(delay).await;
    let i = f.inner.lock().unwrap();
    if let Some(code) = i.status_code {
        return (StatusCode::from_u16(code).unwrap(), "<html>internal error</html>").into_response();
    }
    axum::Json(json!({
        "state": "running", "version": "1.2.0", "hostname": i.hostname, "uuid": i.uuid,
        "time_now": now(), "time_started": i.time_started,
        "timezone": {"name": "UTC", "offset": 0, "dst": false},
        "kernel": {"sysname": "Linux", "nodename": i.hostname, "release": "6.0", "version": "#1", "machine": "x86_64", "domainname": "(none)"},
        "system": {"cores_configured": 2, "cores": 2, "processes": 200, "uptime": 900, "load": [0.1, 0.2, 0.3],
                   "ram": {"total": 1, "free": 1, "shared": 0, "buffer": 0}, "swap": {"total": 0, "free": 0}, "highmem": {"total": 0, "free": 0}},
    }))
    .into_response()
}

async fn nodes(State(f): St, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let delay = record(&f, &method, &uri, &headers, &[]);
    tokio::time::sleep(delay).await;
    let i = f.inner.lock().unwrap();
    if let Some(code) = i.status_code {
        return (StatusCode::from_u16(code).unwrap(), "<html>internal error</html>").into_response();
    }
    axum::Json(Value::Array(i.nodes.iter().map(node_json).collect())).into_response()
}

fn find<'a>(i: &'a mut Inner, id: &str) -> Option<&'a mut FakeNodeEntry> {
    i.nodes.iter_mut().find(|n| n.name == id || n.uuid.to_string() == id)
}

async fn node(State(f): St, Path(id): Path<String>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let delay = record(&f, &method, &uri, &headers, &[]);
    tokio::time::sleep(delay).await;
    let mut i = f.inner.lock().unwrap();
    match find(&mut i, &id) {
        Some(n) => axum::Json(node_json(n)).into_response(),
        None if id.parse::<Uuid>().is_ok() => bad("No node found with with matching UUID", json!({"uuid": id})),
        None => bad("Unknown node", json!({"node": id})),
    }
}

async fn action_by_get(
    State(f): St,
    Path((_, action)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&f, &method, &uri, &headers, &[]);
    bad(&format!("The 'node/{action}' API endpoint does not support GET requests"), json!({}))
}

async fn node_action(
    State(f): St,
    Path((id, action)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = record(&f, &method, &uri, &headers, &body);
    tokio::time::sleep(delay).await;
    let has_length = headers.contains_key("content-length");
    let mut i = f.inner.lock().unwrap();
    let Some(n) = find(&mut i, &id) else {
        if has_length {
            i.crashed = Some(format!("SIGSEGV: POST with Content-Length to unknown node {id}"));
            drop(i);
            f.down();
            return StatusCode::BAD_GATEWAY.into_response();
        }
        return bad("Unknown node", json!({"node": id}));
    };
    if !body.is_empty() {
        return bad("Node endpoints do not accept any body data", json!({}));
    }
    let next = match (action.as_str(), n.state.as_str()) {
        ("pause", "running") => "paused",
        ("pause", _) => return bad("Failed to execute action", json!({"action": "pause", "node": n.name})),
        ("resume", "paused" | "running" | "stopped") => "running",
        ("stop", "running" | "paused") => "stopped",
        ("stop", "stopped") if n.kind == "socket" => {
            let name = n.name.clone();
            i.crashed = Some(format!("abort: stop on stopped socket node {name}"));
            drop(i);
            f.down();
            return StatusCode::BAD_GATEWAY.into_response();
        }
        ("stop", _) => return bad("Failed to execute action", json!({"action": "stop", "node": n.name})),
        ("start" | "restart", _) => "running",
        _ => return bad("Unknown API request", json!({"uri": uri.path(), "method": "POST"})),
    };
    n.state = next.into();
    (StatusCode::OK, [("content-type", "text/html; charset=UTF-8")], "").into_response()
}

async fn restart(State(f): St, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    record(&f, &method, &uri, &headers, &body);
    let mut i = f.inner.lock().unwrap();
    i.restarts += 1;
    i.time_started = now();
    axum::Json(json!({"restarts": i.restarts - 1, "config": null})).into_response()
}

async fn relay(State(f): St, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let delay = record(&f, &method, &uri, &headers, &[]);
    tokio::time::sleep(delay).await;
    let i = f.inner.lock().unwrap();
    let sessions: Vec<Value> = i
        .sessions
        .iter()
        .map(|(id, conns)| {
            let mut data = i.uuid.as_bytes().to_vec();
            data.extend_from_slice(id.as_bytes());
            let connections: Vec<Value> = (0..*conns)
                .map(|c| json!({"name": format!("c{c}"), "ip": "127.0.0.1", "created": 1, "bytes_recv": 10, "bytes_sent": 20, "frames_recv": 1, "frames_sent": 2}))
                .collect();
            json!({"identifier": id, "uuid": md5_uuid(&data), "connections": connections, "created": 1, "connects": conns})
        })
        .collect();
    let body = json!({"sessions": sessions, "version": "1.2.0", "hostname": i.hostname, "uuid": i.uuid,
                      "options": {"loopback": false, "port": f.addr.port(), "protocol": "live"}});
    ([("content-type", "application/json"), ("connection", "close")], body.to_string()).into_response()
}

async fn unknown(State(f): St, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    record(&f, &method, &uri, &headers, &body);
    if method == Method::POST && headers.contains_key("content-length") {
        f.inner.lock().unwrap().crashed = Some(format!("SIGSEGV: POST with Content-Length to {}", uri.path()));
        f.down();
        return StatusCode::BAD_GATEWAY.into_response();
    }
    if uri.path().starts_with("/api/v2") {
        return bad("Unknown API request", json!({"uri": uri.path(), "method": method.as_str()}));
    }
    (StatusCode::NOT_FOUND, "<html>not found</html>").into_response()
}
