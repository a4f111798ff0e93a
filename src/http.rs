//! The outgoing HTTP client (model downloads, results uploads) and the
//! process-wide TLS setup: one crypto backend, ring, for every rustls user.

use std::sync::LazyLock;
use std::time::Duration;

/// Install ring as rustls' process-wide crypto provider. Idempotent; call it
/// before building any TLS client (the binary does so at startup).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

static CLIENT: LazyLock<Result<reqwest::Client, String>> = LazyLock::new(|| {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .build()
        .map_err(|e| e.to_string())
});

/// The shared client: 10 s connect timeout, 300 s per request.
pub fn client() -> Result<&'static reqwest::Client, String> {
    CLIENT.as_ref().map_err(Clone::clone)
}
