//! The VILLASnode REST API v2 and the VILLASrelay API, as clients.

use serde_json::Value;
use std::time::Duration;

/// A request to VILLASnode or VILLASrelay failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer (refused, reset, timed out).
    #[error("cannot reach {url}: {msg}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Why.
        msg: String,
    },
    /// An answer that is not what the API answers.
    #[error("{url}: unexpected answer: {msg}")]
    Invalid {
        /// The URL asked.
        url: String,
        /// What was wrong.
        msg: String,
    },
    /// VILLASnode refused: its own message (`{"error": …}`, HTTP 400).
    #[error("VILLASnode: {0}")]
    Refused(String),
}

/// One VILLASnode (or relay) API, with a timeout on every request.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    timeout: Duration,
    client: reqwest::Client,
}

impl Api {
    /// The API at `base` (`http://host:8080`), `timeout` per request.
    pub fn new(base: &str, timeout: Duration) -> Result<Api, ApiError> {
        crate::http::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| ApiError::Invalid { url: base.to_owned(), msg: e.to_string() })?;
        Ok(Api { base: base.trim_end_matches('/').to_owned(), timeout, client })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get(&self, path: &str) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let r = self
            .client
            .get(&url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| unreachable(&url, &e, self.timeout))?;
        let code = r.status();
        let text = r.text().await.map_err(|e| unreachable(&url, &e, self.timeout))?;
        if code.as_u16() == 400 {
            return Err(ApiError::Refused(error_of(&text)));
        }
        if !code.is_success() {
            return Err(ApiError::Invalid { url, msg: format!("HTTP {code}") });
        }
        serde_json::from_str(&text).map_err(|e| ApiError::Invalid { url, msg: format!("not JSON: {e}") })
    }

    /// `GET /api/v2/status`.
    pub async fn status(&self) -> Result<Value, ApiError> {
        let v = self.get("/api/v2/status").await?;
        if !v.is_object() {
            return Err(ApiError::Invalid { url: format!("{}/api/v2/status", self.base), msg: "not an object".into() });
        }
        Ok(v)
    }

    /// `GET /api/v2/nodes`.
    pub async fn nodes(&self) -> Result<Vec<Value>, ApiError> {
        match self.get("/api/v2/nodes").await? {
            Value::Array(nodes) => {
                Ok(nodes.into_iter().filter(|n| n.get("uuid").and_then(Value::as_str).is_some()).collect())
            }
            _ => Err(ApiError::Invalid { url: format!("{}/api/v2/nodes", self.base), msg: "not an array".into() }),
        }
    }

    /// `GET /api/v2/node/{uuid}`: the node, or `Refused` if VILLASnode has
    /// none by that uuid.
    pub async fn node(&self, uuid: &str) -> Result<Value, ApiError> {
        self.get(&format!("/api/v2/node/{uuid}")).await
    }

    /// `POST /api/v2/node/{uuid}/{action}` with no body and no
    /// `Content-Length` header: VILLASnode 1.2.0 crashes on a
    /// `Content-Length: 0` POST to an unknown node and misreports valid
    /// ones (reference §3.3). reqwest sends a request without a body with
    /// neither header (the fake checks it).
    pub async fn node_action(&self, uuid: &str, action: &str) -> Result<(), ApiError> {
        self.post(&format!("/api/v2/node/{uuid}/{action}")).await.map(|_| ())
    }

    /// `POST /api/v2/restart` (no body: restart with the current config).
    pub async fn restart(&self) -> Result<(), ApiError> {
        self.post("/api/v2/restart").await.map(|_| ())
    }

    async fn post(&self, path: &str) -> Result<String, ApiError> {
        let url = format!("{}{path}", self.base);
        let r = self
            .client
            .post(&url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| unreachable(&url, &e, self.timeout))?;
        let code = r.status();
        let text = r.text().await.unwrap_or_default();
        if code.as_u16() == 400 {
            return Err(ApiError::Refused(error_of(&text)));
        }
        if !code.is_success() {
            return Err(ApiError::Invalid { url, msg: format!("HTTP {code}") });
        }
        Ok(text)
    }

    /// The relay's `GET /api/v1`.
    pub async fn relay(&self) -> Result<Value, ApiError> {
        let v = self.get("/api/v1").await?;
        if !v.get("sessions").is_some_and(Value::is_array) {
            return Err(ApiError::Invalid { url: format!("{}/api/v1", self.base), msg: "no sessions list".into() });
        }
        Ok(v)
    }
}

fn unreachable(url: &str, e: &reqwest::Error, timeout: Duration) -> ApiError {
    let msg = if e.is_timeout() { format!("no answer within {timeout:?}") } else { e.to_string() };
    ApiError::Unreachable { url: url.to_owned(), msg }
}

/// VILLASnode's error message from a 400 body (`{"error": …}`), or the text.
fn error_of(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(200).collect())
}
