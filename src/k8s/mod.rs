//! Kubernetes: the Job simulator's objects (`build.rs`, pure), the API
//! clients ([`Clients`]), and the task that drives one component's Job
//! ([`job`]): create, watch, suspend, delete.

mod build;
pub mod job;

pub use build::*;

use std::collections::HashMap;
use tokio::sync::Mutex;

use crate::protocol::ErrorInfo;

/// Kubernetes API clients, one per kubeconfig (`None`: `Config::infer()`,
/// i.e. `KUBECONFIG`, `~/.kube/config` or the in-cluster service account),
/// made on first use. A fixed client (tests, embedding) replaces them all.
#[derive(Default)]
pub struct Clients {
    fixed: Option<kube::Client>,
    cache: Mutex<HashMap<Option<String>, kube::Client>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").field("fixed", &self.fixed.is_some()).finish_non_exhaustive()
    }
}

impl Clients {
    /// Every request goes to `client` (e.g. an in-process fake API server).
    pub fn fixed(client: kube::Client) -> Clients {
        Clients { fixed: Some(client), cache: Mutex::default() }
    }

    /// The client for `kubeconfig` (a path), or the inferred one.
    pub async fn get(&self, kubeconfig: Option<&str>) -> Result<kube::Client, ErrorInfo> {
        if let Some(c) = &self.fixed {
            return Ok(c.clone());
        }
        let key = kubeconfig.map(str::to_owned);
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let fail = |e: String| ErrorInfo::new(format!("Kubernetes configuration: {e}"));
        let config = match kubeconfig {
            None => kube::Config::infer().await.map_err(|e| fail(e.to_string()))?,
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(format!("{path}: {e}")))?;
                kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| fail(format!("{path}: {e}")))?
            }
        };
        let client = kube::Client::try_from(config).map_err(|e| fail(e.to_string()))?;
        cache.insert(key, client.clone());
        Ok(client)
    }
}

/// A failed API call as a status error: the API server's own message,
/// reason and code where it sent a `Status`.
pub fn api_error(e: kube::Error) -> ErrorInfo {
    match e {
        kube::Error::Api(s) => ErrorInfo::new(format!("Kubernetes API error: {}", s.message))
            .with("code", s.code)
            .with("reason", s.reason.clone()),
        other => ErrorInfo::new(format!("Kubernetes API error: {other}")),
    }
}
