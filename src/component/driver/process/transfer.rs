//! Model downloads and results uploads of process runs, over HTTP(S).
//! Errors never show a URL's password; tokens go in the `Authorization`
//! header only.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::protocol::ErrorInfo;

fn http() -> Result<&'static reqwest::Client, ErrorInfo> {
    crate::http::client().map_err(|e| ErrorInfo::new(format!("HTTP client unavailable: {e}")))
}

fn with_token(rb: reqwest::RequestBuilder, spec: &Value) -> reqwest::RequestBuilder {
    match spec.get("token").and_then(Value::as_str) {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
}

/// Download `model` (`{type: url|url-list, url, token?}`) into `dir`;
/// zips are extracted. Returns one path per URL.
pub(super) async fn download_model(model: &Value, dir: &Path) -> Result<Vec<PathBuf>, ErrorInfo> {
    let urls: Vec<String> = match model.get("url") {
        Some(Value::String(u)) => vec![u.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect(),
        _ => return Err(ErrorInfo::new("Model has no url")),
    };
    let client = http()?;
    let mut paths = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let shown = crate::config::redact_url(url);
        let fail = |msg: String| {
            ErrorInfo::new(format!("Model download failed: {}", msg.replace(url.as_str(), &shown)))
                .with("url", shown.as_str())
        };
        let resp = with_token(client.get(url), model).send().await.map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {}", status.as_u16())).with("status", status.as_u16()));
        }
        let bytes = resp.bytes().await.map_err(|e| fail(e.to_string()))?;
        let name = url
            .rsplit('/')
            .next()
            .map(|n| n.split(['?', '#']).next().unwrap_or(n))
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("model-{i}"));
        if bytes.starts_with(b"PK\x03\x04") {
            let target = dir.join(name.trim_end_matches(".zip"));
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| fail(e.to_string()))?;
            archive.extract(&target).map_err(|e| fail(e.to_string()))?;
            paths.push(target);
        } else {
            let target = dir.join(&name);
            tokio::fs::write(&target, &bytes).await.map_err(|e| fail(e.to_string()))?;
            paths.push(target);
        }
    }
    Ok(paths)
}

/// Zip `results/` and `logs/` of `run_dir` and POST it as multipart.
pub(super) async fn upload_results(results: Value, run_dir: PathBuf) -> Result<(), ErrorInfo> {
    let url =
        results.get("url").and_then(Value::as_str).ok_or_else(|| ErrorInfo::new("Results have no url"))?.to_owned();
    let shown = crate::config::redact_url(&url);
    let fail = |msg: String| {
        ErrorInfo::new(format!("Results upload failed: {}", msg.replace(url.as_str(), &shown)))
            .with("url", shown.as_str())
    };
    let dir = run_dir.clone();
    let zipped = tokio::task::spawn_blocking(move || zip_dirs(&dir, &["results", "logs"]))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
    let part = reqwest::multipart::Part::bytes(zipped)
        .file_name("results.zip")
        .mime_str("application/zip")
        .map_err(|e| fail(e.to_string()))?;
    let form = reqwest::multipart::Form::new().part("file", part);
    let resp =
        with_token(http()?.post(&url), &results).multipart(form).send().await.map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("HTTP {}", status.as_u16())).with("status", status.as_u16()))
    }
}

fn zip_dirs(base: &Path, dirs: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| base.join(d)).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(base) {
                zip.start_file(rel.to_string_lossy(), opts).map_err(std::io::Error::other)?;
                zip.write_all(&std::fs::read(&path)?)?;
            }
        }
    }
    Ok(zip.finish().map_err(std::io::Error::other)?.into_inner())
}
