//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default
//! `info`), as text or JSON lines.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), so tests can call it freely.
pub fn init(default_level: &str, json: bool) {
    // lapin reports a channel closed during our own orderly shutdown as an
    // error; busbar logs connection problems itself, with context.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},lapin::channels=off")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = if json { builder.json().try_init() } else { builder.try_init() };
    if installed.is_ok() {
        crate::supervise::install_panic_hook();
    }
}
