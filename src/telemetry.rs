//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default
//! `info`), as text or JSON lines, with a filter that can be changed while
//! the daemon runs (`PUT /api/v1/log-level`, and a gateway's `/admin/log`
//! for the IoT agent's own target, as iotagent-node-lib does).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

/// Appended unless the filter names lapin itself: lapin logs a refused
/// login or a closed channel as ERROR lines with debug dumps of its
/// frames, and a channel closed by our own orderly shutdown as an error;
/// busbar reports every connection problem itself, once, with context.
const QUIET: &str = "lapin=off";

/// The live filter: a base (as given at start or by `set_filter`) plus
/// per-target levels (`busbar::iot=debug`).
struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    state: Mutex<(String, BTreeMap<String, String>)>,
}

static LOG: OnceLock<LogControl> = OnceLock::new();

/// Why a filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The directive does not parse.
    #[error("invalid log filter {0:?}: {1}")]
    Invalid(String, String),
    /// No subscriber of ours is installed (an embedding installed its own).
    #[error("the log filter of this process is not busbar's")]
    NotOurs,
}

fn compose(base: &str, targets: &BTreeMap<String, String>) -> String {
    let mut s = base.to_owned();
    for (t, l) in targets {
        s.push_str(&format!(",{t}={l}"));
    }
    if !base.contains("lapin") {
        s.push(',');
        s.push_str(QUIET);
    }
    s
}

/// Install the global subscriber. Safe to call more than once (later calls
/// are ignored), so tests can call it freely.
pub fn init(default_level: &str, json: bool) {
    let base = std::env::var("RUST_LOG").ok().filter(|f| EnvFilter::try_new(f).is_ok());
    let base = base.unwrap_or_else(|| default_level.to_owned());
    let filter = EnvFilter::try_new(compose(&base, &BTreeMap::new())).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only on a terminal, and never with NO_COLOR set (no escape
    // codes in log files or journald).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let text = (!json).then(|| fmt::layer().with_ansi(ansi).with_writer(std::io::stderr));
    let lines = json.then(|| fmt::layer().json().with_writer(std::io::stderr));
    if tracing_subscriber::registry().with(filter).with(text).with(lines).try_init().is_ok() {
        let _ = LOG.set(LogControl { handle, state: Mutex::new((base, BTreeMap::new())) });
        crate::supervise::install_panic_hook();
    }
}

fn apply(c: &LogControl, base: String, targets: BTreeMap<String, String>) -> Result<(), LogError> {
    let text = compose(&base, &targets);
    let filter = EnvFilter::try_new(&text).map_err(|e| LogError::Invalid(text.clone(), e.to_string()))?;
    c.handle.reload(filter).map_err(|_| LogError::NotOurs)?;
    *c.state.lock().unwrap_or_else(|p| p.into_inner()) = (base, targets);
    tracing::info!(filter = %text, "log filter changed");
    Ok(())
}

/// Replace the whole filter (`RUST_LOG` syntax, e.g. `info,busbar::bus=debug`).
/// Per-target levels set with [`set_target`] stay.
pub fn set_filter(base: &str) -> Result<(), LogError> {
    let c = LOG.get().ok_or(LogError::NotOurs)?;
    EnvFilter::try_new(base).map_err(|e| LogError::Invalid(base.to_owned(), e.to_string()))?;
    let targets = c.state.lock().unwrap_or_else(|p| p.into_inner()).1.clone();
    apply(c, base.to_owned(), targets)
}

/// Set the level of one target (`busbar::iot`), leaving the rest.
pub fn set_target(target: &str, level: tracing::Level) -> Result<(), LogError> {
    let c = LOG.get().ok_or(LogError::NotOurs)?;
    let (base, mut targets) = c.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    targets.insert(target.to_owned(), level.as_str().to_ascii_lowercase());
    apply(c, base, targets)
}

/// The filter in force (without the fixed quiet directives).
pub fn filter() -> Option<String> {
    let c = LOG.get()?;
    let (base, targets) = c.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let s = compose(&base, &targets);
    Some(s.strip_suffix(&format!(",{QUIET}")).map(str::to_owned).unwrap_or(s))
}

/// The level set for `target`, if one was.
pub fn target_level(target: &str) -> Option<String> {
    let c = LOG.get()?;
    c.state.lock().unwrap_or_else(|p| p.into_inner()).1.get(target).cloned()
}
