//! Typed configuration, read from YAML (or JSON, which is YAML too).
//!
//! Every error names the file and the key (`lab.yaml: components[1].type: …`).
//! Relative paths resolve against the config file's directory, so a config
//! works from any working directory.

use serde::Deserialize;
use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// Environment variable that overrides `broker.url`.
pub const AMQP_URL_ENV: &str = "AMQP_URL";

/// A configuration problem, pointing at the file and key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {msg}")]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// The offending key as a path (`components[2].uuid`), or `(file)`.
    pub key: String,
    /// What is wrong.
    pub msg: String,
}

impl ConfigError {
    fn new(file: &Path, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Self { file: file.to_owned(), key: key.into(), msg: msg.into() }
    }
}

/// A component spec that cannot be run: the key (`uuid`, `whitelist[2]`)
/// and what is wrong with it. Whoever knows where the spec came from adds
/// it: a configuration error names the file and `components[i]`, a create
/// answers with `$.key`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct SpecError {
    /// The offending key, relative to the spec.
    pub key: String,
    /// What is wrong.
    pub msg: String,
}

impl SpecError {
    /// A spec error at `key`.
    pub fn new(key: impl Into<String>, msg: impl Into<String>) -> Self {
        SpecError { key: key.into(), msg: msg.into() }
    }
}

/// How component queues are laid out on the broker. Both route category,
/// type and realm through one daemon queue bound once per distinct value;
/// they differ in how messages naming a uuid arrive. See README
/// "Topologies" and BENCHMARKS.md for the evidence behind the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// A queue per component bound by its uuid, consumed by its task. One
    /// binding per component on the exchange, which RabbitMQ scans for
    /// every message: fine for small labs, costly for thousands.
    PerComponent,
    /// One binding `uuid: void` per daemon ("has a uuid header"); the
    /// daemon looks the uuid up. The broker's cost per message does not grow
    /// with components: discovery, creates and memory scale (the default).
    #[default]
    Shared,
}

/// `broker:` section.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URL; `AMQP_URL` overrides it.
    #[serde(default = "default_url")]
    pub url: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self { url: default_url() }
    }
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig").field("url", &redact_url(&self.url)).finish()
    }
}

fn default_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}

/// `sandbox:` section: what requests from the bus or HTTP may do beyond
/// the safe defaults (see [`crate::sandbox`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Privileged properties ([`crate::sandbox::PRIVILEGED_PROPERTIES`]) a
    /// runtime `create` may set; default none, so that a message on the bus
    /// cannot give a new simulator a whitelist of its own or a shell.
    #[serde(default)]
    pub create_may_set: Vec<String>,
}

/// `api:` section: the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Serve the API at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address; loopback unless configured otherwise.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// VILLAScontroller's `api.port`: the port of `bind` (still loopback;
    /// set `bind` to listen elsewhere).
    #[serde(default)]
    pub port: Option<u16>,
    /// Connections served at once (more wait in the backlog).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (and to start the
    /// next request on a kept-alive connection).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: f64,
    /// Who may use the API, its event stream and the web page: `none`, or
    /// `{jwt: …}` (see `crate::auth`). Required when `bind` is not a
    /// loopback address.
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: default_bind(),
            port: None,
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
            auth: None,
        }
    }
}

impl Config {
    /// The instance name: `site`, or else the host name. JWTs for this
    /// daemon carry it as their `aud`.
    pub fn instance_name(&self) -> String {
        self.site.clone().unwrap_or_else(|| {
            nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "busbar".into())
        })
    }

    /// The gate of the HTTP API (its keys loaded). A listener on a
    /// non-loopback address without `auth` is an error: an open API must
    /// be asked for (`auth: none`).
    pub fn api_gate(&self, path: &Path) -> Result<crate::auth::Gate, ConfigError> {
        use crate::auth::{AuthConfig, Gate, Verifier};
        match &self.api.auth {
            Some(AuthConfig::Jwt(jwt)) => Verifier::load(jwt, "api.auth.jwt", &self.instance_name())
                .map(Gate::jwt)
                .map_err(|e| ConfigError::new(path, e.key, e.msg)),
            Some(AuthConfig::None) => Ok(Gate::open()),
            None if !self.api.enabled || self.api.bind.ip().is_loopback() => Ok(Gate::open()),
            None => Err(ConfigError::new(
                path,
                "api.auth",
                format!(
                    "required because api.bind {} is not a loopback address: configure auth: {{jwt: {{keys: [...]}}}}, or say auth: none",
                    self.api.bind
                ),
            )),
        }
    }
}

impl ApiConfig {
    /// The listener limits.
    pub fn limits(&self) -> crate::serve::Limits {
        crate::serve::Limits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_secs_f64(self.header_timeout),
        }
    }
}

fn default_max_connections() -> usize {
    crate::serve::Limits::default().max_connections
}
fn default_header_timeout() -> f64 {
    crate::serve::Limits::default().header_timeout.as_secs_f64()
}

fn yes() -> bool {
    true
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8089))
}
fn default_exchange() -> String {
    "villas".into()
}
fn default_interval() -> f64 {
    30.0
}
fn default_alive() -> f64 {
    1.0
}
fn default_directory_cap() -> usize {
    100_000
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_max_body() -> usize {
    1 << 20
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker connection.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Name of the headers exchange (`villas`); tests use unique names.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Realm of components that set none.
    #[serde(default)]
    pub realm: Option<String>,
    /// Seconds between periodic status publications (default 30).
    #[serde(default = "default_interval")]
    pub status_interval: f64,
    /// HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where the store lives; relative to the config file.
    /// (VILLAScontroller's `workdir` is read as this.)
    #[serde(default = "default_data_dir", alias = "workdir")]
    pub data_dir: PathBuf,
    /// Queue layout.
    #[serde(default)]
    pub topology: Topology,
    /// Largest accepted message body in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Uuid of the implicit generic manager (generated and kept if unset).
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Extra directories of component type manifests (site-specific
    /// types); relative to the config file.
    #[serde(default)]
    pub component_dirs: Vec<PathBuf>,
    /// What bus and HTTP requests may do beyond the safe defaults.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Components to run. Free-form objects; see [`ComponentSpec`].
    #[serde(default)]
    pub components: Vec<Map<String, Value>>,
    /// The site this daemon runs at, as the federation names it (default:
    /// the host name). Also the name of the daemon's controller IC.
    #[serde(default)]
    pub site: Option<String>,
    /// Seconds between the controller's alive messages (default 1). Peers
    /// mark a site stale after three missed ones.
    #[serde(default = "default_alive")]
    pub alive_interval: f64,
    /// Most ICs the federation directory keeps (default 100,000); more are
    /// counted and dropped, so a flood of fake uuids cannot grow memory.
    #[serde(default = "default_directory_cap")]
    pub directory_cap: usize,
}

impl Config {
    /// Read, parse and validate `path`, applying `AMQP_URL`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, "(file)", e.to_string()))?;
        let mut cfg = Self::parse(&text, path)?;
        if let Ok(url) = std::env::var(AMQP_URL_ENV) {
            cfg.broker.url = url;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.data_dir.is_relative() {
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        Ok(cfg)
    }

    /// Parse and validate text; `path` is used only in messages and to pick
    /// JSON (`.json`) or YAML (anything else).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let value: Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(text).map_err(|e| {
                ConfigError::new(path, format!("line {} column {}", e.line(), e.column()), e.to_string())
            })?
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::new(path, "(syntax)", e.to_string()))?
        };
        let value = if value.is_null() { Value::Object(Map::new()) } else { value };
        let mut cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::new(path, if key == "." { "(top level)".into() } else { key }, e.into_inner().to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in &mut cfg.component_dirs {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if let Some(port) = cfg.api.port {
            cfg.api.bind.set_port(port);
        }
        cfg.infer_categories(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The component types this config can use: built-ins plus
    /// `component_dirs`. Errors name the manifest file and field.
    pub fn kinds(&self) -> Result<crate::component::kinds::Kinds, ConfigError> {
        crate::component::kinds::Kinds::load(&self.component_dirs).map_err(|e| ConfigError {
            file: PathBuf::from(e.file),
            key: e.field,
            msg: e.msg,
        })
    }

    /// VILLAScontroller configs may leave out a component's `category`
    /// (its own `etc/config_dpsim.yaml` does, and then fails to load): take
    /// it from the type when exactly one category has that type, and say
    /// which ones do when several have.
    fn infer_categories(&mut self, path: &Path) -> Result<(), ConfigError> {
        if self.components.iter().all(|c| c.contains_key("category")) {
            return Ok(());
        }
        let kinds = self.kinds()?;
        for (i, c) in self.components.iter_mut().enumerate() {
            if c.contains_key("category") {
                continue;
            }
            let Some(kind) = c.get("type").and_then(Value::as_str) else { continue };
            let categories: Vec<&str> =
                kinds.all().iter().filter(|k| k.kind == kind).map(|k| k.category.as_str()).collect();
            match categories.as_slice() {
                [one] => {
                    c.insert("category".into(), Value::String((*one).to_owned()));
                }
                [] => {}
                several => {
                    return Err(ConfigError::new(
                        path,
                        format!("components[{i}].category"),
                        format!("is required: type {kind:?} exists as {}", several.join(" and ")),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.exchange.is_empty() {
            return Err(ConfigError::new(path, "exchange", "must not be empty"));
        }
        if !(self.status_interval.is_finite() && self.status_interval > 0.0 && self.status_interval <= 86_400.0) {
            return Err(ConfigError::new(path, "status_interval", "must be a number of seconds between 0 and 86400"));
        }
        if !(self.alive_interval.is_finite() && self.alive_interval >= 0.05 && self.alive_interval <= 60.0) {
            return Err(ConfigError::new(path, "alive_interval", "must be a number of seconds between 0.05 and 60"));
        }
        if self.directory_cap == 0 {
            return Err(ConfigError::new(path, "directory_cap", "must be positive"));
        }
        if self.site.as_deref().is_some_and(|s| s.trim().is_empty() || s.len() > 128) {
            return Err(ConfigError::new(path, "site", "must be a name of 1 to 128 characters"));
        }
        for (i, key) in self.sandbox.create_may_set.iter().enumerate() {
            let known =
                crate::sandbox::PRIVILEGED_PROPERTIES.iter().chain(crate::sandbox::DRIVER_PRIVILEGED_PROPERTIES);
            if !known.clone().any(|k| *k == key.as_str()) {
                return Err(ConfigError::new(
                    path,
                    format!("sandbox.create_may_set[{i}]"),
                    format!(
                        "{key:?} is not a privileged property; expected one of {}",
                        known.copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        if !(self.api.header_timeout.is_finite() && self.api.header_timeout > 0.0 && self.api.header_timeout <= 3600.0)
        {
            return Err(ConfigError::new(path, "api.header_timeout", "must be a number of seconds between 0 and 3600"));
        }
        if self.api.max_connections == 0 {
            return Err(ConfigError::new(path, "api.max_connections", "must be positive"));
        }
        self.api_gate(path)?;
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(path, "max_body_bytes", "must be positive"));
        }
        if !self.broker.url.starts_with("amqp://") && !self.broker.url.starts_with("amqps://") {
            return Err(ConfigError::new(path, "broker.url", "must start with amqp:// or amqps://"));
        }
        let kinds = self.kinds()?;
        let mut seen = std::collections::HashMap::new();
        for (i, c) in self.components.iter().enumerate() {
            let spec = ComponentSpec::from_map(c.clone())
                .map_err(|e| ConfigError::new(path, format!("components[{i}].{}", e.key), e.msg))?;
            if let Some(u) = spec.uuid
                && let Some(j) = seen.insert(u, i)
            {
                return Err(ConfigError::new(
                    path,
                    format!("components[{i}].uuid"),
                    format!("duplicate uuid {u}, also used by components[{j}]"),
                ));
            }
            kinds.check(&spec).map_err(|e| ConfigError::new(path, format!("components[{i}].{}", e.key), e.msg))?;
        }
        Ok(())
    }

    /// The periodic status interval.
    pub fn status_interval(&self) -> Duration {
        Duration::from_secs_f64(self.status_interval)
    }

    /// The controller's alive interval.
    pub fn alive_interval(&self) -> Duration {
        Duration::from_secs_f64(self.alive_interval)
    }
}

/// Replace the password of a URL with `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(p) => p,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// One component as declared in config or in a `create` action: the identity
/// keys plus every other key as a property (echoed in `status.properties`).
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSpec {
    /// `category`.
    pub category: String,
    /// `type`.
    pub kind: String,
    /// `uuid`, if given.
    pub uuid: Option<Uuid>,
    /// `realm`, if given.
    pub realm: Option<String>,
    /// `name` (defaults to `category/type`).
    pub name: String,
    /// `enabled` (default true); disabled components are not run.
    pub enabled: bool,
    /// All keys as given, in order.
    pub properties: Map<String, Value>,
}

impl ComponentSpec {
    /// Read a spec.
    pub fn from_map(map: Map<String, Value>) -> Result<Self, SpecError> {
        let s = |k: &str, required: bool| -> Result<Option<String>, SpecError> {
            match map.get(k) {
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(SpecError::new(k, "is required")),
                Some(Value::String(v)) if !v.is_empty() => Ok(Some(v.clone())),
                Some(_) => Err(SpecError::new(k, "must be a non-empty string")),
            }
        };
        let category = s("category", true)?.unwrap_or_default();
        let kind = s("type", true)?.unwrap_or_default();
        let uuid = match s("uuid", false)? {
            None => None,
            Some(u) => {
                Some(Uuid::parse_str(&u).map_err(|e| SpecError::new("uuid", format!("invalid uuid {u:?}: {e}")))?)
            }
        };
        let realm = s("realm", false)?;
        let name = s("name", false)?.unwrap_or_else(|| format!("{category}/{kind}"));
        let enabled = match map.get("enabled") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(SpecError::new("enabled", "must be true or false")),
        };
        Ok(Self { category, kind, uuid, realm, name, enabled, properties: map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lab.yaml"))
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.exchange, "villas");
        assert_eq!(c.status_interval(), Duration::from_secs(30));
        assert_eq!(c.api.bind, "127.0.0.1:8089".parse().unwrap());
        assert!(c.components.is_empty());
        assert_eq!(c.topology, Topology::Shared);
    }

    #[test]
    fn json_is_accepted() {
        let c = Config::parse(r#"{"exchange": "x", "components": []}"#, Path::new("c.json")).unwrap();
        assert_eq!(c.exchange, "x");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = parse("status_interval: soon").unwrap_err().to_string();
        assert!(e.starts_with("lab.yaml: status_interval:"), "{e}");
        let e = parse("api: {bind: nowhere}").unwrap_err().to_string();
        assert!(e.starts_with("lab.yaml: api.bind:"), "{e}");
        let e = parse("bogus: 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("components:\n- {category: simulator, type: dummy}\n- {category: simulator}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("lab.yaml: components[1].type: is required"), "{e}");
        let e = parse("components:\n- {category: simulator, type: warp-drive}\n").unwrap_err().to_string();
        assert!(e.starts_with("lab.yaml: components[0].type:"), "{e}");
        let e = parse("components:\n- {category: simulator, type: generic, whitelist: [ok, '(']}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("lab.yaml: components[0].whitelist[1]: invalid regex"), "{e}");
        let e = parse("components:\n- {category: simulator, type: dummy, uuid: nope}\n").unwrap_err().to_string();
        assert!(e.starts_with("lab.yaml: components[0].uuid: invalid uuid"), "{e}");
        let u = "3ddd318e-fee1-46d7-bff4-7c064d640d4e";
        let e = parse(&format!(
            "components:\n- {{category: simulator, type: dummy, uuid: {u}}}\n- {{category: simulator, type: dummy, uuid: {u}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("components[1].uuid: duplicate uuid"), "{e}");
        for bad in ["status_interval: 0", "status_interval: 1e30", "status_interval: .inf"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("status_interval"), "{bad}: {e}");
        }
        for (bad, key) in [
            ("alive_interval: 0", "alive_interval"),
            ("alive_interval: 3600", "alive_interval"),
            ("alive_interval: -1", "alive_interval"),
            ("directory_cap: 0", "directory_cap"),
            ("site: ' '", "site"),
            ("sight: alpha", "sight"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("lab.yaml: {key}")), "{bad}: {e}");
        }
        let e = parse("a: [unclosed").unwrap_err().to_string();
        assert!(e.starts_with("lab.yaml:"), "{e}");
    }

    #[test]
    fn passwords_are_redacted_in_debug_output() {
        let c = parse("broker: {url: 'amqp://villas:s3cret@host:5672/%2f'}").unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert_eq!(redact_url("amqp://u:p@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact_url("amqp://h/v"), "amqp://h/v");
    }

    #[test]
    fn relative_data_dirs_resolve_against_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lab.yaml");
        std::fs::write(&file, "data_dir: state\n").unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
    }
}
