//! What a request from the bus or HTTP may make the daemon do, decided by
//! the daemon's own configuration and nothing else.
//!
//! busbar often runs as root, and anyone who can publish on the `villas`
//! exchange can send it actions. So every path, environment variable and
//! privileged property that arrives in a message is checked here, once:
//! - paths (`working_directory`, `stdout_logfile`) stay inside the run
//!   directory;
//! - environment variables are limited to the names the component allows
//!   (`allowed_environment`), and the loader's and interpreters' hooks
//!   (`LD_PRELOAD`, `PYTHONPATH`, …) are refused whatever it allows;
//! - a runtime `create` may set privileged properties (`whitelist`, `shell`,
//!   listener binds, file paths) only where the config's
//!   `sandbox.create_may_set` says so (default: none);
//! - secrets (bearer tokens, URL passwords) are redacted wherever a status
//!   or an error shows a request back.

use serde_json::{Map, Value};
use std::path::{Component, Path, PathBuf};

use crate::protocol::ErrorInfo;

/// Component properties that widen what a component may do on this host:
/// what it may execute, with which environment, which files it reads, and
/// where it listens. A runtime `create` may set them only where the config
/// allows (`sandbox.create_may_set`).
pub const PRIVILEGED_PROPERTIES: &[&str] = &[
    "whitelist",
    "shell",
    "allowed_environment",
    "script",
    "kubeconfig",
    "north_bind",
    "south_bind",
    // Files the daemon reads (as root, often): a create must not name them.
    "mqtt_ca",
    "mqtt_cert",
    "mqtt_key",
];

/// Environment variables no component may set, whatever it allows: they
/// make the dynamic loader, libc or an interpreter load code of the
/// caller's choosing.
const DENIED_ENV: &[&str] = &[
    "BASH_ENV",
    "BUSBAR_RUN_DIR",
    "ENV",
    "GCONV_PATH",
    "HOSTALIASES",
    "IFS",
    "JAVA_TOOL_OPTIONS",
    "LOCALDOMAIN",
    "LOCPATH",
    "NLSPATH",
    "NODE_OPTIONS",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "PROMPT_COMMAND",
    "PS4",
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "RES_OPTIONS",
    "RUBYLIB",
    "RUBYOPT",
    "SHELLOPTS",
];

/// Prefixes of denied environment variables (`LD_PRELOAD`, `LD_AUDIT`,
/// `DYLD_INSERT_LIBRARIES`, `MALLOC_…`, `GLIBC_TUNABLES`).
const DENIED_ENV_PREFIXES: &[&str] = &["LD_", "DYLD_", "MALLOC_", "GLIBC_"];

/// Whether `name` is one of the loader's or interpreters' hooks.
pub fn env_denied(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    DENIED_ENV.contains(&upper.as_str()) || DENIED_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// Whether `name` matches one of `allowed` (exact names, or a prefix
/// ending in `*`: `SIM_*`).
fn env_allowed(name: &str, allowed: &[&str]) -> bool {
    allowed.iter().any(|a| match a.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => *a == name,
    })
}

/// Check the environment a start asks for against the component's
/// `allowed_environment` property. A name must be a plain identifier, be
/// allowed, and not be a loader or interpreter hook.
pub fn check_env(env: &[(String, String)], props: &Map<String, Value>) -> Result<(), ErrorInfo> {
    let allowed: Vec<&str> = props
        .get("allowed_environment")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, value) in env {
        let plain = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !plain || value.contains('\0') {
            return Err(ErrorInfo::new("Invalid environment variable").with("name", name.as_str()));
        }
        if env_denied(name) {
            return Err(ErrorInfo::new("Environment variable is never allowed").with("name", name.as_str()));
        }
        if !env_allowed(name, &allowed) {
            return Err(ErrorInfo::new(
                "Environment variable is not allowed for this simulator (see its allowed_environment property)",
            )
            .with("name", name.as_str()));
        }
    }
    Ok(())
}

/// `rel` under `base`, if it stays there: a relative path of plain names
/// (no `..`, no root, no NUL). `what` names the parameter in the error.
pub fn confine(base: &Path, rel: &str, what: &str) -> Result<PathBuf, ErrorInfo> {
    let path = Path::new(rel);
    let plain = !rel.is_empty()
        && !rel.contains('\0')
        && !rel.split('/').any(|seg| seg == "..")
        && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(ErrorInfo::new(format!("{what} must be a relative path inside the run directory"))
            .with("path", format!("$.parameters.{what}")));
    }
    Ok(base.join(path))
}

/// Check, after the run directory exists, that `path` (or its parent for a
/// file that does not exist yet) really lies inside `base`: a symbolic link
/// in the run directory (a model archive may hold one) must not lead out.
pub fn check_inside(base: &Path, path: &Path, what: &str) -> Result<(), ErrorInfo> {
    let outside = || {
        ErrorInfo::new(format!("{what} must be a relative path inside the run directory"))
            .with("path", format!("$.parameters.{what}"))
    };
    let base = base.canonicalize().map_err(|e| ErrorInfo::new(format!("Cannot resolve the run directory: {e}")))?;
    let probe =
        if path.exists() { path.to_path_buf() } else { path.parent().map(Path::to_path_buf).ok_or_else(outside)? };
    let real = probe.canonicalize().map_err(|_| outside())?;
    if real.starts_with(&base) { Ok(()) } else { Err(outside()) }
}

/// An executable named by a start: a bare name (looked up on `PATH`) or a
/// path without `.`/`..` components, so that a whitelist regex anchored at
/// the start (`^/opt/sims/`) cannot be walked out of (`/opt/sims/../../bin/sh`).
pub fn check_executable(executable: &str) -> Result<(), ErrorInfo> {
    // On the text, not on `Path::components`, which drops interior `.`s.
    let plain = !executable.is_empty()
        && !executable.contains('\0')
        && !executable.contains("//")
        && !executable.split('/').any(|seg| seg == "." || seg == "..");
    if plain {
        Ok(())
    } else {
        Err(ErrorInfo::new("Executable must be a name or a path without . or .. components")
            .with("executable", executable))
    }
}

/// Refuse a runtime create that sets a privileged property the config does
/// not allow (`sandbox.create_may_set`).
pub fn check_create(params: &Map<String, Value>, may_set: &[String]) -> Result<(), ErrorInfo> {
    check_keys(PRIVILEGED_PROPERTIES, params, may_set)
}

/// Properties privileged only for some drivers: where the daemon itself
/// sends requests, who may use a listener, and files it reads. A
/// VILLASnode or VILLASrelay manager or gateway polls and posts to its
/// `api_url`; an IoT gateway posts every measure to its `cbroker`, and its
/// `north_auth` decides who provisions. Elsewhere `api_url` is a descriptive property VILLASweb reads, and
/// stays free.
pub const DRIVER_PRIVILEGED_PROPERTIES: &[&str] =
    &["api_url", "cbroker", "north_auth", "mqtt_ca", "mqtt_cert", "mqtt_key"];

/// Refuse a create of a `driver` component that sets a property the
/// daemon would send requests to, unless `may_set` allows it.
pub fn check_create_for(
    driver: &crate::component::kinds::Driver,
    params: &Map<String, Value>,
    may_set: &[String],
) -> Result<(), ErrorInfo> {
    use crate::component::kinds::Driver as D;
    let keys: &[&str] = match driver {
        D::VillasNodeManager | D::VillasRelayManager | D::VillasNodeGateway | D::VillasRelayGateway => &["api_url"],
        // Where it posts, and who may provision.
        D::IotAgent => &["cbroker", "north_auth"],
        _ => &[],
    };
    check_keys(keys, params, may_set)
}

fn check_keys(keys: &[&str], params: &Map<String, Value>, may_set: &[String]) -> Result<(), ErrorInfo> {
    for key in keys {
        if params.contains_key(*key) && !may_set.iter().any(|k| k == key) {
            return Err(ErrorInfo::new(format!(
                "A create may not set {key}: only the daemon's configuration can (sandbox.create_may_set)"
            ))
            .with("path", format!("$.{key}")));
        }
    }
    Ok(())
}

/// A model or results description as a status may show it: the bearer
/// `token` replaced by `***`, URL passwords redacted.
pub fn redact_transfer(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let shown = match (k.as_str(), v) {
                        ("token", Value::Null) => Value::Null,
                        ("token", _) => Value::String("***".into()),
                        (_, Value::String(s)) => Value::String(crate::config::redact_url(s)),
                        (_, Value::Array(a)) => Value::Array(a.iter().map(redact_transfer).collect()),
                        (_, other) => redact_transfer(other),
                    };
                    (k.clone(), shown)
                })
                .collect(),
        ),
        Value::String(s) => Value::String(crate::config::redact_url(s)),
        Value::Array(a) => Value::Array(a.iter().map(redact_transfer).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_loader_and_interpreter_hooks_are_never_allowed() {
        let allow_all = props(json!({"allowed_environment": ["*"]}));
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "ld_preload",
            "DYLD_INSERT_LIBRARIES",
            "GCONV_PATH",
            "PYTHONPATH",
            "BASH_ENV",
            "MALLOC_CHECK_",
            "GLIBC_TUNABLES",
            "NODE_OPTIONS",
            "BUSBAR_RUN_DIR",
        ] {
            let e = check_env(&[(name.into(), "x".into())], &allow_all).unwrap_err();
            assert_eq!(e.msg(), "Environment variable is never allowed", "{name}");
        }
        assert!(check_env(&[("OMP_NUM_THREADS".into(), "4".into())], &allow_all).is_ok());
    }

    #[test]
    fn only_allowed_names_pass() {
        let p = props(json!({"allowed_environment": ["FOO", "SIM_*"]}));
        assert!(check_env(&[("FOO".into(), "1".into()), ("SIM_STEP".into(), "2".into())], &p).is_ok());
        assert!(check_env(&[("FOOD".into(), "1".into())], &p).is_err());
        // No allowed_environment: nothing may be set.
        assert!(check_env(&[("FOO".into(), "1".into())], &Map::new()).is_err());
        for bad in ["", "A=B", "1X", "A B", "A\0"] {
            assert_eq!(check_env(&[(bad.into(), "1".into())], &p).unwrap_err().msg(), "Invalid environment variable");
        }
    }

    #[test]
    fn paths_stay_in_the_run_directory() {
        let base = Path::new("/data/runs/x");
        assert_eq!(confine(base, "results", "working_directory").unwrap(), base.join("results"));
        assert_eq!(confine(base, "./logs/out.txt", "stdout_logfile").unwrap(), base.join("./logs/out.txt"));
        for bad in ["/etc/passwd", "../x", "logs/../../x", "", "a\0b", "/"] {
            assert!(confine(base, bad, "stdout_logfile").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_symlink_in_the_run_directory_does_not_lead_out() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("logs")).unwrap();
        std::os::unix::fs::symlink("/etc", run.join("escape")).unwrap();
        assert!(check_inside(&run, &run.join("logs/out.txt"), "stdout_logfile").is_ok());
        assert!(check_inside(&run, &run.join("escape/passwd"), "stdout_logfile").is_err());
        assert!(check_inside(&run, &run.join("escape"), "working_directory").is_err());
    }

    #[test]
    fn executables_cannot_walk_out_of_a_whitelisted_directory() {
        for ok in ["echo", "/bin/echo", "/opt/sims/run-model"] {
            assert!(check_executable(ok).is_ok(), "{ok}");
        }
        for bad in ["/opt/sims/../../bin/sh", "../sh", "./sh", "/bin/./sh", "", "/bin//sh", "a\0"] {
            assert!(check_executable(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn where_the_daemon_sends_requests_is_privileged_only_for_the_drivers_that_send_them() {
        use crate::component::kinds::Driver;
        let p = props(json!({"api_url": "http://169.254.169.254", "cbroker": "http://elsewhere"}));
        let e = check_create_for(&Driver::VillasNodeManager, &p, &[]).unwrap_err();
        assert!(e.msg().starts_with("A create may not set api_url"), "{}", e.msg());
        assert!(check_create_for(&Driver::VillasRelayGateway, &p, &[]).is_err());
        assert!(check_create_for(&Driver::VillasNodeManager, &p, &["api_url".into()]).is_ok());
        let e = check_create_for(&Driver::IotAgent, &p, &[]).unwrap_err();
        assert!(e.msg().contains("cbroker"), "{}", e.msg());
        // Elsewhere api_url is what VILLASweb reads, and stays free.
        assert!(check_create_for(&Driver::Dummy, &p, &[]).is_ok());
        assert!(check_create(&p, &[]).is_ok());
    }

    #[test]
    fn a_create_sets_privileged_properties_only_where_the_config_allows() {
        let p = props(json!({"category": "simulator", "type": "generic", "whitelist": [".*"], "shell": true}));
        let e = check_create(&p, &[]).unwrap_err();
        assert!(e.msg().starts_with("A create may not set whitelist"), "{}", e.msg());
        assert!(check_create(&p, &["whitelist".into()]).unwrap_err().msg().contains("shell"));
        assert!(check_create(&p, &["whitelist".into(), "shell".into()]).is_ok());
        assert!(check_create(&props(json!({"category": "simulator", "type": "dummy", "location": "x"})), &[]).is_ok());
        // A gateway's TLS files are paths the daemon reads: never from the bus.
        let gw = props(
            json!({"category": "gateway", "type": "iot-agent", "mqtt_url": "mqtts://h", "mqtt_key": "/etc/shadow"}),
        );
        assert!(check_create(&gw, &[]).unwrap_err().msg().starts_with("A create may not set mqtt_key"));
    }

    #[test]
    fn tokens_and_url_passwords_are_redacted() {
        let v = json!({"type": "url", "url": "https://u:secret@h/m.zip", "token": "abc", "extra": {"token": "t"}});
        let shown = redact_transfer(&v);
        assert_eq!(
            shown,
            json!({"type": "url", "url": "https://u:***@h/m.zip", "token": "***", "extra": {"token": "***"}})
        );
        let list = json!({"type": "url-list", "url": ["https://a:b@h/1", "https://h/2"]});
        assert_eq!(redact_transfer(&list)["url"], json!(["https://a:***@h/1", "https://h/2"]));
        assert!(!redact_transfer(&v).to_string().contains("secret"));
    }
}
