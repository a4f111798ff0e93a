//! Component types as data: manifests in `components/<category>/<type>.yaml`.
//!
//! A manifest names the category, type and driver, the driver's fixed
//! settings, and the JSON Schemas for `properties`, `start` and `create`.
//! Built-in types are manifests too, embedded in the binary; config may add
//! directories of site-specific ones. Every manifest is validated against
//! `schemas/component-manifest.schema.json`, and errors name the file and
//! the field.

use jsonschema::Validator;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use crate::config::{ComponentSpec, SpecError};
use crate::protocol::ErrorInfo;
use crate::state::Action;

/// The built-in manifests: `(file name, text)`.
const BUILTIN: &[(&str, &str)] = &[
    ("components/simulator/dummy.yaml", include_str!("../../components/simulator/dummy.yaml")),
    ("components/simulator/generic.yaml", include_str!("../../components/simulator/generic.yaml")),
    ("components/simulator/script.yaml", include_str!("../../components/simulator/script.yaml")),
    ("components/simulator/dpsim.yaml", include_str!("../../components/simulator/dpsim.yaml")),
    ("components/simulator/kubernetes.yaml", include_str!("../../components/simulator/kubernetes.yaml")),
    ("components/gateway/iot-agent.yaml", include_str!("../../components/gateway/iot-agent.yaml")),
    ("components/manager/villas-node.yaml", include_str!("../../components/manager/villas-node.yaml")),
    ("components/manager/villas-relay.yaml", include_str!("../../components/manager/villas-relay.yaml")),
    ("components/gateway/villas-node.yaml", include_str!("../../components/gateway/villas-node.yaml")),
    ("components/gateway/villas-relay.yaml", include_str!("../../components/gateway/villas-relay.yaml")),
    ("components/controller/busbar.yaml", include_str!("../../components/controller/busbar.yaml")),
    ("components/manager/generic.yaml", include_str!("../../components/manager/generic.yaml")),
    ("components/manager/kubernetes.yaml", include_str!("../../components/manager/kubernetes.yaml")),
    ("components/manager/kubernetes-simple.yaml", include_str!("../../components/manager/kubernetes-simple.yaml")),
];

const MANIFEST_SCHEMA: &str = include_str!("../../schemas/component-manifest.schema.json");

/// A manifest that cannot be used, pointing at the file and field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {field}: {msg}")]
pub struct ManifestError {
    /// The manifest file.
    pub file: String,
    /// The offending field (`process.argv[2]`), or `(file)`.
    pub field: String,
    /// What is wrong.
    pub msg: String,
}

/// One argv entry of a process manifest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ArgItem {
    /// One argument; its placeholders must resolve.
    One(String),
    /// Arguments included only if every placeholder in them has a value
    /// (`["--duration", "{{start.duration}}"]`).
    Group(Vec<String>),
}

/// What the child reads on stdin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stdin {
    /// Nothing (`/dev/null`).
    #[default]
    None,
    /// The start parameters as JSON.
    Parameters,
    /// The whole start payload as JSON.
    Payload,
}

/// Fixed settings of the process driver.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Executable, argv, environment and working directory come from the
    /// start parameters (the generic simulator).
    #[serde(default)]
    pub from_parameters: bool,
    /// The program (looked up on `PATH` if it has no slash).
    #[serde(default)]
    pub executable: Option<String>,
    /// Argument templates: `{{start.KEY}}`, `{{properties.KEY}}`, `%MODEL%`.
    #[serde(default)]
    pub argv: Vec<ArgItem>,
    /// Environment templates.
    #[serde(default)]
    pub environment: HashMap<String, String>,
    /// What to write to stdin.
    #[serde(default)]
    pub stdin: Stdin,
    /// Seconds between SIGTERM and SIGKILL on stop (default 5).
    #[serde(default)]
    pub grace: Option<f64>,
}

/// Which engine runs a type.
#[derive(Debug, Clone, PartialEq)]
pub enum Driver {
    /// Timed state changes, no side effects.
    Dummy,
    /// Creates and deletes components.
    GenericManager,
    /// Runs a child process group per start.
    Process(ProcessSpec),
    /// Runs a Kubernetes Job per start.
    KubernetesJob,
    /// Creates `simulator/kubernetes` components from a Job template
    /// (`properties.job`).
    KubernetesManager,
    /// Creates `simulator/kubernetes` components from VILLASweb's flat
    /// duplication parameters.
    KubernetesSimpleManager,
    /// Runs an IoT agent: provisioning API, MQTT/HTTP/AMQP measures in,
    /// federation out, devices as `equipment` components.
    IotAgent,
    /// The daemon itself, as an IC of the federation (`controller/busbar`):
    /// alive messages, host and broker figures, its peers. Started by the
    /// daemon; never configured or created.
    Controller,
    /// Mirrors a VILLASnode instance: polls its API, one
    /// `gateway/villas-node` per node.
    VillasNodeManager,
    /// One VILLASnode node; actions reach VILLASnode.
    VillasNodeGateway,
    /// Mirrors a VILLASrelay: one `gateway/villas-relay` per session.
    VillasRelayManager,
    /// One VILLASrelay session.
    VillasRelayGateway,
}

impl Driver {
    /// Whether a refused action leaves the component's state as it was
    /// (answered with `status.error`), rather than putting it in `error`:
    /// for components whose state is another system's (the daemon itself,
    /// a relay session), which a stray action must not make look broken.
    pub fn keeps_state_on_refusal(&self) -> bool {
        matches!(self, Driver::Controller | Driver::VillasRelayManager | Driver::VillasRelayGateway)
    }

    /// Whether the driver creates and deletes components.
    pub fn is_manager(&self) -> bool {
        matches!(self, Driver::GenericManager | Driver::KubernetesManager | Driver::KubernetesSimpleManager)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    category: String,
    #[serde(rename = "type")]
    kind: String,
    driver: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    process: Option<ProcessSpec>,
    #[serde(default)]
    schema: Map<String, Value>,
}

/// One component type, ready to use.
pub struct Kind {
    /// Category (`simulator`, `manager`, …).
    pub category: String,
    /// Type name.
    pub kind: String,
    /// The engine and its fixed settings.
    pub driver: Driver,
    /// What it is, for `busbar types`.
    pub description: String,
    /// Where it was defined.
    pub source: String,
    /// Advertised `schema`: `start` and/or `create`.
    pub schema: Map<String, Value>,
    /// The `properties` schema, if any (not advertised).
    pub properties_schema: Option<Value>,
    validators: HashMap<String, Validator>,
    properties: Option<Validator>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.category, self.kind, self.source)
    }
}

fn json_path(pointer: &str) -> String {
    std::iter::once("$".to_string())
        .chain(pointer.split('/').filter(|s| !s.is_empty()).map(|s| format!(".{s}")))
        .collect()
}

fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    if out.is_empty() { "(manifest)".into() } else { out }
}

static MANIFEST_VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(MANIFEST_SCHEMA).expect("the manifest schema is valid JSON");
    jsonschema::validator_for(&schema).expect("the manifest schema compiles")
});

/// The placeholders (`start.KEY` / `properties.KEY`) in a template string.
pub fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template.split("{{").skip(1).filter_map(|rest| rest.split_once("}}").map(|(name, _)| name.trim()))
}

impl Kind {
    /// Parse and check one manifest.
    pub fn from_manifest(file: &str, text: &str) -> Result<Kind, ManifestError> {
        let err = |field: &str, msg: String| ManifestError { file: file.to_owned(), field: field.to_owned(), msg };
        let value: Value = serde_saphyr::from_str(text).map_err(|e| err("(syntax)", e.to_string()))?;
        if let Some(e) = MANIFEST_VALIDATOR.iter_errors(&value).next() {
            return Err(err(&dotted(&e.instance_path().to_string()), e.to_string()));
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| err("(manifest)", e.to_string()))?;
        let driver = match m.driver.as_str() {
            "dummy" => Driver::Dummy,
            "generic-manager" => Driver::GenericManager,
            "process" => Driver::Process(m.process.clone().unwrap_or_default()),
            "kubernetes-job" => Driver::KubernetesJob,
            "kubernetes-manager" => Driver::KubernetesManager,
            "kubernetes-simple-manager" => Driver::KubernetesSimpleManager,
            "iot-agent" => Driver::IotAgent,
            "controller" => Driver::Controller,
            "villas-node-manager" => Driver::VillasNodeManager,
            "villas-node-gateway" => Driver::VillasNodeGateway,
            "villas-relay-manager" => Driver::VillasRelayManager,
            "villas-relay-gateway" => Driver::VillasRelayGateway,
            other => return Err(err("driver", format!("unknown driver {other:?}"))),
        };
        let compile = |key: &str, schema: &Value| {
            jsonschema::validator_for(schema).map_err(|e| err(&format!("schema.{key}"), e.to_string()))
        };
        let mut schema = Map::new();
        let mut validators = HashMap::new();
        let mut properties = None;
        let mut properties_schema = None;
        for (key, s) in &m.schema {
            let v = compile(key, s)?;
            if key == "properties" {
                properties = Some(v);
                properties_schema = Some(s.clone());
            } else {
                schema.insert(key.clone(), s.clone());
                validators.insert(key.clone(), v);
            }
        }
        // Templates may only use validated inputs: declared start parameters
        // and declared properties.
        if let Driver::Process(p) = &driver {
            let declared = |section: &str| -> Vec<String> {
                m.schema
                    .get(section)
                    .and_then(|s| s.get("properties"))
                    .and_then(Value::as_object)
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default()
            };
            let (start_keys, prop_keys) = (declared("start"), declared("properties"));
            let check = |field: String, t: &str| -> Result<(), ManifestError> {
                for name in placeholders(t) {
                    let ok = match name.split_once('.') {
                        Some(("start", k)) => start_keys.iter().any(|s| s == k),
                        Some(("properties", k)) => prop_keys.iter().any(|s| s == k),
                        _ => false,
                    };
                    if !ok {
                        return Err(err(
                            &field,
                            format!(
                                "placeholder {{{{{name}}}}} is not a parameter declared in schema.start or schema.properties"
                            ),
                        ));
                    }
                }
                Ok(())
            };
            for (i, item) in p.argv.iter().enumerate() {
                match item {
                    ArgItem::One(t) => check(format!("process.argv[{i}]"), t)?,
                    ArgItem::Group(g) => {
                        for (j, t) in g.iter().enumerate() {
                            check(format!("process.argv[{i}][{j}]"), t)?;
                        }
                    }
                }
            }
            for (k, t) in &p.environment {
                check(format!("process.environment.{k}"), t)?;
            }
        }
        Ok(Kind {
            category: m.category,
            kind: m.kind,
            driver,
            description: m.description,
            source: file.to_owned(),
            schema,
            properties_schema,
            validators,
            properties,
        })
    }

    /// This type with `custom` schemas (name → JSON Schema, e.g. a `start`
    /// schema given at create) merged over its own, as a Kubernetes
    /// simulator advertises them.
    pub fn with_custom_schema(&self, custom: &Map<String, Value>) -> Result<Kind, SpecError> {
        let mut schema = self.schema.clone();
        let mut validators = HashMap::new();
        for (key, s) in custom {
            if key == "properties" {
                return Err(SpecError::new("schema.properties", "cannot be replaced"));
            }
            schema.insert(key.clone(), s.clone());
        }
        for (key, s) in &schema {
            let v = jsonschema::validator_for(s).map_err(|e| SpecError::new(format!("schema.{key}"), e.to_string()))?;
            validators.insert(key.clone(), v);
        }
        let properties = match &self.properties_schema {
            Some(s) => {
                Some(jsonschema::validator_for(s).map_err(|e| SpecError::new("schema.properties", e.to_string()))?)
            }
            None => None,
        };
        Ok(Kind {
            category: self.category.clone(),
            kind: self.kind.clone(),
            driver: self.driver.clone(),
            description: self.description.clone(),
            source: self.source.clone(),
            schema,
            properties_schema: self.properties_schema.clone(),
            validators,
            properties,
        })
    }

    /// Validate `parameters` of `action` against this type's schema, if it
    /// has one. The error carries `msg`, `instance` and `path`.
    pub fn validate(&self, action: Action, parameters: &Map<String, Value>) -> Result<(), ErrorInfo> {
        let Some(v) = self.validators.get(action.as_str()) else { return Ok(()) };
        let instance = Value::Object(parameters.clone());
        match v.validate(&instance) {
            Ok(()) => Ok(()),
            Err(e) => Err(ErrorInfo::new(format!("Invalid parameters: {e}"))
                .with("instance", e.instance().clone().into_owned())
                .with("path", json_path(&e.instance_path().to_string()))
                .with("action", action.as_str())),
        }
    }

    /// The property names this type declares (its properties schema).
    pub fn declared_properties(&self) -> Vec<&str> {
        let declared = self.properties_schema.as_ref().and_then(|s| s.get("properties")).and_then(Value::as_object);
        declared.map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default()
    }

    /// Refuse a property that is a near miss of one the type declares
    /// (`mqtt_ulr` for `mqtt_url`, `whitelst` for `whitelist`): as written,
    /// it would be kept as a descriptive property while the daemon quietly
    /// used the default. Other undeclared keys stay allowed, as in
    /// VILLAScontroller, which echoes them (`owner`, `api_url`, …).
    pub fn check_spelling(&self, properties: &Map<String, Value>) -> Result<(), SpecError> {
        let declared = self.declared_properties();
        let known = |k: &str| declared.contains(&k) || COMMON_PROPERTIES.contains(&k);
        for key in properties.keys().filter(|k| !known(k)) {
            if let Some(near) = near_miss(key, declared.iter().chain(COMMON_PROPERTIES).copied()) {
                return Err(SpecError::new(
                    key.clone(),
                    format!("unknown property of {}/{}; did you mean {near:?}?", self.category, self.kind),
                ));
            }
        }
        Ok(())
    }

    /// Validate a component's properties.
    pub fn validate_properties(&self, properties: &Map<String, Value>) -> Result<(), SpecError> {
        let Some(v) = &self.properties else { return Ok(()) };
        match v.validate(&Value::Object(properties.clone())) {
            Ok(()) => Ok(()),
            Err(e) => {
                let key = dotted(&e.instance_path().to_string());
                Err(SpecError::new(if key == "(manifest)" { "(component)".into() } else { key }, e.to_string()))
            }
        }
    }
}

/// The set of known types.
#[derive(Debug, Clone)]
pub struct Kinds(Vec<Arc<Kind>>);

static BUILTIN_KINDS: LazyLock<Vec<Arc<Kind>>> = LazyLock::new(|| {
    BUILTIN
        .iter()
        // A broken built-in manifest is a build defect, caught by the tests.
        .map(|(f, t)| Arc::new(Kind::from_manifest(f, t).unwrap_or_else(|e| panic!("built-in manifest: {e}"))))
        .collect()
});

impl Kinds {
    /// The built-in types only.
    pub fn builtin() -> Kinds {
        Kinds(BUILTIN_KINDS.clone())
    }

    /// The built-in types plus every manifest (`*.yaml`, `*.yml`, `*.json`)
    /// under `dirs`, searched recursively. A type defined twice is an error.
    pub fn load(dirs: &[PathBuf]) -> Result<Kinds, ManifestError> {
        let mut kinds = Self::builtin();
        for dir in dirs {
            let mut files = Vec::new();
            collect(dir, &mut files).map_err(|e| ManifestError {
                file: dir.display().to_string(),
                field: "(directory)".into(),
                msg: e.to_string(),
            })?;
            files.sort();
            for file in files {
                let name = file.display().to_string();
                let text = std::fs::read_to_string(&file).map_err(|e| ManifestError {
                    file: name.clone(),
                    field: "(file)".into(),
                    msg: e.to_string(),
                })?;
                let kind = Kind::from_manifest(&name, &text)?;
                if let Some(prev) = kinds.lookup(&kind.category, &kind.kind) {
                    return Err(ManifestError {
                        file: name,
                        field: "type".into(),
                        msg: format!("{}/{} is already defined by {}", kind.category, kind.kind, prev.source),
                    });
                }
                kinds.0.push(Arc::new(kind));
            }
        }
        Ok(kinds)
    }

    /// All types.
    pub fn all(&self) -> &[Arc<Kind>] {
        &self.0
    }

    /// Look a type up.
    pub fn lookup(&self, category: &str, kind: &str) -> Option<Arc<Kind>> {
        self.0.iter().find(|k| k.category == category && k.kind == kind).cloned()
    }

    /// Check that a spec names a known type and that its properties fit the
    /// type's properties schema.
    pub fn check(&self, spec: &ComponentSpec) -> Result<Arc<Kind>, SpecError> {
        if !self.0.iter().any(|k| k.category == spec.category) {
            let cats: std::collections::BTreeSet<_> = self.0.iter().map(|k| k.category.as_str()).collect();
            let cats: Vec<_> = cats.into_iter().collect();
            return Err(SpecError::new(
                "category",
                format!("unknown category {:?}; known: {}", spec.category, cats.join(", ")),
            ));
        }
        let kind = self.lookup(&spec.category, &spec.kind).ok_or_else(|| {
            let known: Vec<_> =
                self.0.iter().filter(|k| k.category == spec.category).map(|k| k.kind.as_str()).collect();
            SpecError::new(
                "type",
                format!("unknown type {:?} for category {}; known: {}", spec.kind, spec.category, known.join(", ")),
            )
        })?;
        if kind.driver == Driver::Controller {
            return Err(SpecError::new(
                "type",
                format!(
                    "{}/{} is the daemon itself: every busbar runs one, none is configured or created",
                    kind.category, kind.kind
                ),
            ));
        }
        kind.validate_properties(&spec.properties)?;
        kind.check_spelling(&spec.properties)?;
        // A Kubernetes simulator may advertise (and validate) its own schemas.
        if kind.driver == Driver::KubernetesJob
            && let Some(custom) = spec.properties.get("schema").and_then(Value::as_object)
        {
            return kind.with_custom_schema(custom).map(Arc::new);
        }
        // A whitelist entry that does not compile would silently match
        // nothing; refuse it where it is written.
        if let Driver::Process(p) = &kind.driver
            && p.from_parameters
            && let Some(list) = spec.properties.get("whitelist").and_then(Value::as_array)
        {
            for (i, pat) in list.iter().enumerate() {
                let pat = pat.as_str().unwrap_or_default();
                if let Err(e) = regex::Regex::new(pat) {
                    return Err(SpecError::new(format!("whitelist[{i}]"), format!("invalid regex {pat:?}: {e}")));
                }
            }
        }
        Ok(kind)
    }
}

/// Properties every component may have, whatever its type: identity, and
/// the descriptive keys VILLAScontroller configs and VILLASweb use.
pub const COMMON_PROPERTIES: &[&str] = &[
    "category",
    "type",
    "name",
    "uuid",
    "realm",
    "enabled",
    "location",
    "owner",
    "description",
    "api_url",
    "api_url_external",
    "ws_url",
];

/// The candidate `key` is most likely a misspelling of, if any: a
/// Damerau-Levenshtein distance of 1 (2 for longer names), as shells and
/// clap suggest.
fn near_miss<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = if key.chars().count() >= 8 { 2 } else { 1 };
    candidates
        .filter(|c| *c != key && key.chars().count() >= 3)
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_controller_type_is_never_configured_or_created() {
        let kinds = Kinds::builtin();
        let spec = ComponentSpec::from_map(params(json!({"category": "controller", "type": "busbar"}))).unwrap();
        let e = kinds.check(&spec).unwrap_err();
        assert_eq!(e.key, "type");
        assert!(e.msg.contains("the daemon itself"), "{e}");
        assert!(kinds.lookup("controller", "busbar").is_some(), "the daemon starts it by lookup");
    }

    #[test]
    fn a_near_miss_of_a_declared_property_is_an_error_that_suggests_it() {
        let kinds = Kinds::builtin();
        let spec = |v: Value| ComponentSpec::from_map(v.as_object().unwrap().clone()).unwrap();
        for (category, kind, typo, want) in [
            ("gateway", "iot-agent", "mqtt_ulr", "mqtt_url"),
            ("gateway", "iot-agent", "sevices", "services"),
            ("simulator", "generic", "whitelst", "whitelist"),
            ("simulator", "dummy", "locaton", "location"),
        ] {
            let e = kinds.check(&spec(json!({"category": category, "type": kind, typo: "x"}))).unwrap_err();
            assert_eq!(e.key, typo);
            assert!(e.msg.ends_with(&format!("did you mean {want:?}?")), "{e}");
        }
        // Descriptive keys VILLAScontroller echoes, and anything far from a
        // declared name, stay allowed.
        let ok = json!({"category": "simulator", "type": "dummy", "owner": "svg", "location": "lab",
            "api_url": "http://x", "ws_url": "ws://x", "contact": "rmr@example.org"});
        assert!(kinds.check(&spec(ok)).is_ok());
        assert_eq!(near_miss("ab", ["abc"].into_iter()), None, "too short to guess");
    }

    #[test]
    fn every_builtin_manifest_loads_and_advertises_schemas_under_action_names() {
        let kinds = Kinds::builtin();
        assert_eq!(kinds.all().len(), BUILTIN.len());
        for k in kinds.all() {
            for key in k.schema.keys() {
                assert!(key == "start" || key == "create", "{k:?} advertises {key}");
            }
        }
        assert!(kinds.lookup("simulator", "dummy").unwrap().schema.contains_key("start"));
        assert!(kinds.lookup("manager", "generic").unwrap().schema.contains_key("create"));
    }

    #[test]
    fn validation_failures_carry_msg_instance_and_path() {
        let kinds = Kinds::builtin();
        let dummy = kinds.lookup("simulator", "dummy").unwrap();
        assert!(dummy.validate(Action::Start, &params(json!({"runtime": 2}))).is_ok());
        assert!(dummy.validate(Action::Start, &params(json!({}))).is_ok());
        assert!(dummy.validate(Action::Stop, &params(json!({"anything": 1}))).is_ok());
        let e = dummy.validate(Action::Start, &params(json!({"runtime": "soon"}))).unwrap_err();
        assert!(e.msg().starts_with("Invalid parameters"), "{e:?}");
        assert_eq!(e.0["instance"], json!("soon"));
        assert_eq!(e.0["path"], json!("$.runtime"));
    }

    #[test]
    fn create_requires_category_and_type() {
        let m = Kinds::builtin().lookup("manager", "generic").unwrap();
        let e = m.validate(Action::Create, &params(json!({"name": "x"}))).unwrap_err();
        assert_eq!(e.0["path"], json!("$"));
        assert!(m.validate(Action::Create, &params(json!({"category": "simulator", "type": "dummy"}))).is_ok());
        assert!(
            m.validate(Action::Create, &params(json!({"category": "simulator", "type": "dummy", "uuid": "x"})))
                .is_err()
        );
    }

    #[test]
    fn broken_manifests_name_the_file_and_the_field() {
        let cases = [
            ("category: simulator\ntype: x\n", "(manifest)"),
            ("category: simulator\ntype: x\ndriver: warp\n", "driver"),
            ("category: simulator\ntype: x\ndriver: process\n", "(manifest)"),
            ("category: simulator\ntype: x\ndriver: dummy\nextra: 1\n", "(manifest)"),
            ("category: simulator\ntype: x\ndriver: dummy\nschema: {start: {type: 12}}\n", "schema.start"),
            (
                "category: simulator\ntype: x\ndriver: process\nprocess: {executable: echo, argv: [ok, '{{start.secret}}']}\n",
                "process.argv[1]",
            ),
            ("category: [", "(syntax)"),
        ];
        for (text, field) in cases {
            let e = Kind::from_manifest("site/x.yaml", text).err().unwrap_or_else(|| panic!("{text} should fail"));
            assert_eq!(e.file, "site/x.yaml");
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn a_kubernetes_simulator_advertises_and_validates_its_custom_schemas() {
        let kinds = Kinds::builtin();
        let spec = |schema: Value| {
            ComponentSpec::from_map(params(json!({
                "category": "simulator", "type": "kubernetes", "name": "k",
                "job": {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "perl"}]}}}},
                "schema": schema,
            })))
            .unwrap()
        };
        let start = json!({"type": "object", "required": ["digits"], "properties": {"digits": {"type": "integer"}}});
        let k = kinds.check(&spec(json!({"start": start}))).unwrap();
        assert_eq!(k.schema["start"], start);
        assert!(k.validate(Action::Start, &params(json!({"digits": 20}))).is_ok());
        let e = k.validate(Action::Start, &params(json!({"digits": "many"}))).unwrap_err();
        assert_eq!(e.0["path"], json!("$.digits"));
        let SpecError { key, .. } = kinds.check(&spec(json!({"start": {"type": 7}}))).unwrap_err();
        assert_eq!(key, "schema.start");
        // Without custom schemas the built-in one applies.
        let plain = kinds.lookup("simulator", "kubernetes").unwrap();
        assert!(plain.validate(Action::Start, &params(json!({"digits": "many"}))).is_ok());
    }

    #[test]
    fn placeholders_are_found() {
        assert_eq!(placeholders("a{{start.x}}b{{ properties.y }}").collect::<Vec<_>>(), ["start.x", "properties.y"]);
        assert_eq!(placeholders("plain").count(), 0);
    }

    #[test]
    fn extra_directories_add_types_and_may_not_redefine_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("simulator")).unwrap();
        std::fs::write(
            dir.path().join("simulator/echo.yaml"),
            "category: simulator\ntype: echo\ndriver: process\nprocess: {executable: echo, argv: ['{{start.text}}']}\nschema: {start: {type: object, properties: {text: {type: string}}}}\n",
        )
        .unwrap();
        let kinds = Kinds::load(&[dir.path().to_owned()]).unwrap();
        assert!(kinds.lookup("simulator", "echo").is_some());
        std::fs::write(dir.path().join("dup.yaml"), "category: simulator\ntype: dummy\ndriver: dummy\n").unwrap();
        let e = Kinds::load(&[dir.path().to_owned()]).unwrap_err();
        assert!(e.file.ends_with("dup.yaml") && e.msg.contains("already defined"), "{e}");
    }
}
