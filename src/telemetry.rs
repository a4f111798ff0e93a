//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default
//! `info`), as text or JSON lines.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), so tests can call it freely.
pub fn init(default_level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
