//! An in-process fake of the parts of the Kubernetes API busbar uses:
//! `batch/v1` Jobs, `v1` ConfigMaps and Pods (create with generateName, get,
//! list by label or field selector, merge-patch, delete) and watch streams. It is
//! an axum `Router`, handed to `kube::Client::new`, so the real kube client
//! (de)serialises every request. Tests advance Job status, inject API
//! errors and drop watches through [`FakeKube`].

#![allow(dead_code)]

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// One stored object, keyed by (resource, namespace, name).
type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    /// Injected failures: (only this method, status code, message), one per
    /// matching request, in order.
    failures: Vec<(Option<Method>, u16, String)>,
    /// Every request seen, as "METHOD path".
    log: Vec<String>,
    /// Every event, so a watch from a resourceVersion replays what it missed.
    history: Vec<(String, Value)>,
}

/// The fake API server and its test handle.
#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(String, Value)>,
    /// Bumped to end every open watch.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl FakeKube {
    /// A fresh, empty API server.
    pub fn new() -> FakeKube {
        let (events, _) = broadcast::channel(1024);
        FakeKube { inner: Arc::default(), events, generation: Arc::new(tokio::sync::watch::channel(0).0) }
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.router(), "default")
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/apis/batch/v1/namespaces/{ns}/jobs", get(collection).post(create))
            .route("/apis/batch/v1/namespaces/{ns}/jobs/{name}", get(item).delete(item).patch(item))
            .route("/api/v1/namespaces/{ns}/configmaps", get(collection).post(create))
            .route("/api/v1/namespaces/{ns}/configmaps/{name}", get(item).delete(item).patch(item))
            .route("/api/v1/namespaces/{ns}/pods", get(collection).post(create))
            .with_state(self.clone())
    }

    /// Make the next `n` requests fail with `code` and `message`.
    pub fn fail_next(&self, n: usize, code: u16, message: &str) {
        let mut i = self.inner.lock().unwrap();
        i.failures.extend(std::iter::repeat_n((None, code, message.to_owned()), n));
    }

    /// Make the next request with `method` fail with `code` and `message`.
    pub fn fail_next_on(&self, method: Method, code: u16, message: &str) {
        self.inner.lock().unwrap().failures.push((Some(method), code, message.to_owned()));
    }

    /// End every open watch (the client must re-establish it).
    pub fn drop_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// The requests seen so far ("GET /apis/…").
    pub fn log(&self) -> Vec<String> {
        self.inner.lock().unwrap().log.clone()
    }

    /// Every stored object of `resource` ("jobs", "configmaps").
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.inner.lock().unwrap().objects.iter().filter(|(k, _)| k.0 == resource).map(|(_, v)| v.clone()).collect()
    }

    /// Add a running pod of Job `job`, labelled as the Job controller does.
    pub fn add_pod(&self, ns: &str, job: &str, name: &str) {
        let mut i = self.inner.lock().unwrap();
        i.rv += 1;
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": ns, "resourceVersion": i.rv.to_string(),
            "labels": {"job-name": job, "batch.kubernetes.io/job-name": job}},
            "status": {"phase": "Running"}});
        i.objects.insert(("pods".into(), ns.into(), name.into()), pod);
    }

    /// The Jobs labelled with component `uuid`.
    pub fn jobs_of(&self, uuid: uuid::Uuid) -> Vec<Value> {
        self.labelled("jobs", uuid)
    }

    /// The ConfigMaps labelled with component `uuid`.
    pub fn configmaps_of(&self, uuid: uuid::Uuid) -> Vec<Value> {
        self.labelled("configmaps", uuid)
    }

    fn labelled(&self, resource: &str, uuid: uuid::Uuid) -> Vec<Value> {
        self.objects(resource)
            .into_iter()
            .filter(|o| o["metadata"]["labels"]["villas.fein-aachen.org/ic-uuid"] == uuid.to_string())
            .collect()
    }

    /// Replace `status` of Job `name` and notify watchers.
    pub fn set_job_status(&self, ns: &str, name: &str, status: Value) {
        let obj = {
            let mut i = self.inner.lock().unwrap();
            i.rv += 1;
            let rv = i.rv;
            let Some(obj) = i.objects.get_mut(&("jobs".into(), ns.into(), name.into())) else {
                panic!("no job {ns}/{name}")
            };
            obj["status"] = status;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            obj.clone()
        };
        self.emit("jobs", json!({"type": "MODIFIED", "object": obj}));
    }

    fn emit(&self, resource: &str, event: Value) {
        self.inner.lock().unwrap().history.push((resource.to_owned(), event.clone()));
        let _ = self.events.send((resource.to_owned(), event));
    }

    fn take_failure(&self, method: &Method) -> Option<(u16, String)> {
        let mut i = self.inner.lock().unwrap();
        let pos = i.failures.iter().position(|(m, _, _)| m.as_ref().is_none_or(|m| m == method))?;
        let (_, code, msg) = i.failures.remove(pos);
        Some((code, msg))
    }

    fn record(&self, method: &Method, path: &str) {
        self.inner.lock().unwrap().log.push(format!("{method} {path}"));
    }
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "jobs" => ("batch/v1", "Job"),
        "pods" => ("v1", "Pod"),
        _ => ("v1", "ConfigMap"),
    }
}

fn resource_of(path: &str) -> &'static str {
    if path.contains("/jobs") {
        "jobs"
    } else if path.contains("/pods") {
        "pods"
    } else {
        "configmaps"
    }
}

fn reason_of(code: u16) -> &'static str {
    match code {
        403 => "Forbidden",
        404 => "NotFound",
        409 => "AlreadyExists",
        _ => "InternalError",
    }
}

/// A Kubernetes `Status` error body.
pub fn status_error(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

fn matches(obj: &Value, q: &HashMap<String, String>) -> bool {
    let labels = &obj["metadata"]["labels"];
    let label_ok = q.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once('=') {
            Some((k, v)) => labels.get(k).and_then(Value::as_str) == Some(v),
            None => labels.get(term).is_some(),
        })
    });
    let field_ok = q.get("fieldSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => obj["metadata"]["name"] == v,
            Some(("metadata.namespace", v)) => obj["metadata"]["namespace"] == v,
            _ => true,
        })
    });
    label_ok && field_ok
}

async fn collection(
    State(f): State<FakeKube>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: axum::http::Uri,
) -> Response {
    f.record(&method, uri.path());
    if let Some((code, msg)) = f.take_failure(&method) {
        return status_error(code, reason_of(code), &msg);
    }
    let resource = resource_of(uri.path());
    let (api, kind) = kind_of(resource);
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let mut rx = f.events.subscribe();
        let mut gen_rx = f.generation.subscribe();
        let mut since: u64 = q.get("resourceVersion").and_then(|r| r.parse().ok()).unwrap_or(0);
        let res = resource.to_owned();
        let missed: Vec<Value> =
            f.inner.lock().unwrap().history.iter().filter(|(r, _)| *r == res).map(|(_, e)| e.clone()).collect();
        let stream = async_stream(move |tx| async move {
            let rv_of = |ev: &Value| -> u64 {
                ev["object"]["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
            };
            for ev in missed {
                let o = &ev["object"];
                if rv_of(&ev) > since && o["metadata"]["namespace"] == ns.as_str() && matches(o, &q) {
                    since = rv_of(&ev);
                    let mut line = serde_json::to_vec(&ev).unwrap();
                    line.push(b'\n');
                    if tx.send(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok((r, ev)) if r == res => {
                            let rv: u64 = ev["object"]["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                            let o = &ev["object"];
                            if rv > since && o["metadata"]["namespace"] == ns.as_str() && matches(o, &q) {
                                let mut line = serde_json::to_vec(&ev).unwrap();
                                line.push(b'\n');
                                if tx.send(Bytes::from(line)).await.is_err() { break; }
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                    _ = gen_rx.changed() => break,
                }
            }
        });
        return Response::builder().header("content-type", "application/json").body(stream).unwrap();
    }
    let i = f.inner.lock().unwrap();
    let items: Vec<Value> = i
        .objects
        .iter()
        .filter(|((r, n, _), o)| r == resource && *n == ns && matches(o, &q))
        .map(|(_, o)| o.clone())
        .collect();
    axum::Json(json!({"apiVersion": api, "kind": format!("{kind}List"), "metadata": {"resourceVersion": i.rv.to_string()}, "items": items}))
        .into_response()
}

/// A body fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(f(tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

async fn create(State(f): State<FakeKube>, Path(ns): Path<String>, uri: axum::http::Uri, body: Bytes) -> Response {
    f.record(&Method::POST, uri.path());
    if let Some((code, msg)) = f.take_failure(&Method::POST) {
        return status_error(code, reason_of(code), &msg);
    }
    let resource = resource_of(uri.path());
    let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "invalid JSON");
    };
    let name = match obj["metadata"]["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => match obj["metadata"]["generateName"].as_str() {
            Some(g) => format!("{g}{}", &uuid::Uuid::new_v4().simple().to_string()[..5]),
            None => return status_error(422, "Invalid", "name or generateName is required"),
        },
    };
    let key = (resource.to_owned(), ns.clone(), name.clone());
    let obj = {
        let mut i = f.inner.lock().unwrap();
        if i.objects.contains_key(&key) {
            return status_error(409, "AlreadyExists", &format!("{resource} \"{name}\" already exists"));
        }
        i.rv += 1;
        let m = &mut obj["metadata"];
        m["name"] = json!(name);
        m["namespace"] = json!(ns);
        m["uid"] = json!(uuid::Uuid::new_v4().to_string());
        m["resourceVersion"] = json!(i.rv.to_string());
        m["creationTimestamp"] = json!("2026-11-22T00:00:00Z");
        i.objects.insert(key, obj.clone());
        obj
    };
    f.emit(resource, json!({"type": "ADDED", "object": obj}));
    (StatusCode::CREATED, axum::Json(obj)).into_response()
}

async fn item(
    State(f): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    uri: axum::http::Uri,
    _headers: HeaderMap,
    body: Bytes,
) -> Response {
    f.record(&method, uri.path());
    if let Some((code, msg)) = f.take_failure(&method) {
        return status_error(code, reason_of(code), &msg);
    }
    let resource = resource_of(uri.path());
    let key = (resource.to_owned(), ns, name.clone());
    let not_found = || status_error(404, "NotFound", &format!("{resource} \"{name}\" not found"));
    let (event, obj) = {
        let mut i = f.inner.lock().unwrap();
        match method {
            Method::GET => {
                return i.objects.get(&key).map(|o| axum::Json(o.clone()).into_response()).unwrap_or_else(not_found);
            }
            Method::DELETE => match i.objects.remove(&key) {
                Some(o) => ("DELETED", o),
                None => return not_found(),
            },
            _ => {
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return status_error(400, "BadRequest", "invalid patch");
                };
                i.rv += 1;
                let rv = i.rv;
                let Some(o) = i.objects.get_mut(&key) else { return not_found() };
                busbar::k8s::merge(o, &patch);
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                ("MODIFIED", o.clone())
            }
        }
    };
    f.emit(resource, json!({"type": event, "object": obj}));
    axum::Json(obj).into_response()
}
