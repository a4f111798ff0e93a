//! Model download and results upload against a real HTTP server in the test.

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use common::*;
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

#[derive(Default)]
struct Seen {
    model_auth: Vec<String>,
    uploads: Vec<(String, Vec<u8>)>,
}

type Shared = Arc<Mutex<Seen>>;

fn model_zip() -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("grid/topology.xml", zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(b"<cim/>").unwrap();
    zip.finish().unwrap().into_inner()
}

fn auth(h: &HeaderMap) -> String {
    h.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

async fn server() -> (String, Shared) {
    let seen: Shared = Arc::default();
    let app = Router::new()
        .route(
            "/model.zip",
            get(|State(s): State<Shared>, h: HeaderMap| async move {
                s.lock().unwrap().model_auth.push(auth(&h));
                if auth(&h) != "Bearer model-token" {
                    return (StatusCode::UNAUTHORIZED, Vec::new());
                }
                (StatusCode::OK, model_zip())
            }),
        )
        .route("/params.txt", get(|| async { "k=v\n" }))
        .route(
            "/results",
            post(|State(s): State<Shared>, h: HeaderMap, body: Bytes| async move {
                s.lock().unwrap().uploads.push((auth(&h), body.to_vec()));
                StatusCode::CREATED
            }),
        )
        .route("/broken", post(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn models_download_with_the_token_and_results_upload_as_multipart() {
    let env = TestEnv::new();
    let sim = Uuid::new_v4();
    let cfg = env.config_with(vec![
        json!({"category": "simulator", "type": "generic", "uuid": sim.to_string(), "whitelist": [env.fixtures_whitelist()]}),
    ]);
    let (d, c, mut l) = env.up_with(cfg).await;
    let (base, seen) = server().await;
    let body = json!({
        "action": "start",
        "parameters": {"executable": format!("{}/model-args.sh", fixtures_bin()), "argv": ["%MODEL%"]},
        "model": {"type": "url-list", "url": [format!("{base}/model.zip"), format!("{base}/params.txt")], "token": "model-token"},
        "results": {"type": "url", "url": format!("{base}/results"), "token": "results-token"},
    });
    c.publish(to_uuid(sim), &body, None).await.unwrap();
    let st = state_of(&mut l, sim, "running").await;
    assert_eq!(st["model"]["type"], "url-list", "the start payload's model is echoed");
    state_of(&mut l, sim, "stopping").await;
    state_of(&mut l, sim, "idle").await;
    let (model_auth, uploads) = {
        let seen = seen.lock().unwrap();
        (seen.model_auth.clone(), seen.uploads.clone())
    };
    let seen = Seen { model_auth, uploads };
    assert_eq!(seen.model_auth, ["Bearer model-token"]);
    assert_eq!(seen.uploads.len(), 1);
    let (auth, body) = &seen.uploads[0];
    assert_eq!(auth, "Bearer results-token");
    assert!(contains(body, b"filename=\"results.zip\""), "multipart file part");
    assert!(contains(body, b"PK\x03\x04"), "a zip inside");
    for name in ["results/args.txt", "results/model-files.txt", "logs/stdout.log", "logs/stderr.log"] {
        assert!(contains(body, name.as_bytes()), "{name} uploaded");
    }
    // %MODEL% expanded to both downloads; the zip was extracted.
    let run = std::fs::read_dir(env.dir.path().join("data/runs").join(sim.to_string()))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let args = std::fs::read_to_string(run.join("results/args.txt")).unwrap();
    assert!(args.contains("model/model ") && args.trim_end().ends_with("model/params.txt"), "{args}");
    assert_eq!(std::fs::read_to_string(run.join("model/model/grid/topology.xml")).unwrap(), "<cim/>");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_failed_download_or_upload_is_an_error_with_the_http_status() {
    let env = TestEnv::new();
    let sim = Uuid::new_v4();
    let cfg = env.config_with(vec![
        json!({"category": "simulator", "type": "generic", "uuid": sim.to_string(), "whitelist": [env.fixtures_whitelist()]}),
    ]);
    let (d, c, mut l) = env.up_with(cfg).await;
    let (base, _seen) = server().await;
    let exe = format!("{}/exit-with.sh", fixtures_bin());
    // Wrong token: 401 from the model server.
    let body = json!({"action": "start", "parameters": {"executable": exe, "argv": ["0"]},
        "model": {"type": "url", "url": format!("{base}/model.zip"), "token": "wrong"}});
    c.publish(to_uuid(sim), &body, None).await.unwrap();
    let st = state_of(&mut l, sim, "error").await;
    assert_eq!(st["status"]["error"]["status"], 401, "{}", st["status"]["error"]);
    assert!(st["status"]["error"]["msg"].as_str().unwrap().starts_with("Model download failed"));
    c.publish(to_uuid(sim), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "idle").await;
    // Upload refused with 500.
    let body = json!({"action": "start", "parameters": {"executable": exe, "argv": ["0"]},
        "results": {"type": "url", "url": format!("{base}/broken")}});
    c.publish(to_uuid(sim), &body, None).await.unwrap();
    state_of(&mut l, sim, "stopping").await;
    let st = state_of(&mut l, sim, "error").await;
    assert_eq!(st["status"]["error"]["status"], 500);
    assert!(st["status"]["error"]["msg"].as_str().unwrap().starts_with("Results upload failed"));
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
