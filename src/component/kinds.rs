//! The component types busbar knows, with the JSON Schemas they advertise
//! and validate against. Schemas are files under `schemas/`, embedded at
//! build time so the binary is self-contained.

use jsonschema::Validator;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::LazyLock;

use crate::config::ComponentSpec;
use crate::protocol::ErrorInfo;
use crate::state::Action;

/// Which engine runs a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `simulator/dummy`: timed state changes, no side effects.
    Dummy,
    /// `manager/generic`: creates and deletes components.
    GenericManager,
}

/// One component type.
pub struct Kind {
    /// Category (`simulator`, `manager`, …).
    pub category: &'static str,
    /// Type name.
    pub kind: &'static str,
    /// The engine.
    pub driver: Driver,
    /// Advertised `schema`, keyed by action (`start`, `create`).
    pub schema: Map<String, Value>,
    validators: HashMap<&'static str, Validator>,
    properties: Option<Validator>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.category, self.kind)
    }
}

impl Kind {
    fn new(
        category: &'static str,
        kind: &'static str,
        driver: Driver,
        schemas: &[(&'static str, &str)],
        properties: Option<&str>,
    ) -> Kind {
        let mut schema = Map::new();
        let mut validators = HashMap::new();
        for (action, text) in schemas {
            // The files are part of the build; a broken one is a build defect
            // caught by the unit test below, never by a user's message.
            let value: Value = serde_json::from_str(text).expect("embedded schema is valid JSON");
            let v = jsonschema::validator_for(&value).expect("embedded schema compiles");
            schema.insert((*action).into(), value);
            validators.insert(*action, v);
        }
        let properties = properties.map(|text| {
            let value: Value = serde_json::from_str(text).expect("embedded schema is valid JSON");
            jsonschema::validator_for(&value).expect("embedded schema compiles")
        });
        Kind { category, kind, driver, schema, validators, properties }
    }

    /// Validate `parameters` of `action` against this type's schema, if it
    /// has one. The error carries `msg`, `instance` and `path`.
    pub fn validate(&self, action: Action, parameters: &Map<String, Value>) -> Result<(), ErrorInfo> {
        let Some(v) = self.validators.get(action.as_str()) else {
            return Ok(());
        };
        let instance = Value::Object(parameters.clone());
        match v.validate(&instance) {
            Ok(()) => Ok(()),
            Err(e) => {
                let pointer = e.instance_path().to_string();
                let path = std::iter::once("$".to_string())
                    .chain(pointer.split('/').filter(|s| !s.is_empty()).map(|s| format!(".{s}")))
                    .collect::<String>();
                Err(ErrorInfo::new(format!("Invalid parameters: {e}"))
                    .with("instance", e.instance().clone().into_owned())
                    .with("path", path)
                    .with("action", action.as_str()))
            }
        }
    }
}

static KINDS: LazyLock<Vec<Kind>> = LazyLock::new(|| {
    vec![
        Kind::new(
            "simulator",
            "dummy",
            Driver::Dummy,
            &[("start", include_str!("../../schemas/simulator/dummy/start.json"))],
            Some(include_str!("../../schemas/simulator/dummy/properties.json")),
        ),
        Kind::new(
            "manager",
            "generic",
            Driver::GenericManager,
            &[("create", include_str!("../../schemas/manager/generic/create.json"))],
            None,
        ),
    ]
});

/// All known types.
pub fn all() -> &'static [Kind] {
    &KINDS
}

/// Look a type up.
pub fn lookup(category: &str, kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.category == category && k.kind == kind)
}

/// Check that a spec names a known type and that its properties fit the
/// type's properties schema; the error is `(key, message)`.
pub fn check(spec: &ComponentSpec) -> Result<&'static Kind, (String, String)> {
    let kind = check_type(spec)?;
    if let Some(v) = &kind.properties
        && let Err(e) = v.validate(&Value::Object(spec.properties.clone()))
    {
        let key = e.instance_path().to_string().trim_start_matches('/').replace('/', ".");
        return Err((if key.is_empty() { "(component)".into() } else { key }, e.to_string()));
    }
    Ok(kind)
}

fn check_type(spec: &ComponentSpec) -> Result<&'static Kind, (String, String)> {
    if !KINDS.iter().any(|k| k.category == spec.category) {
        let cats: Vec<_> =
            KINDS.iter().map(|k| k.category).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        return Err(("category".into(), format!("unknown category {:?}; known: {}", spec.category, cats.join(", "))));
    }
    lookup(&spec.category, &spec.kind).ok_or_else(|| {
        let known: Vec<_> = KINDS.iter().filter(|k| k.category == spec.category).map(|k| k.kind).collect();
        (
            "type".into(),
            format!("unknown type {:?} for category {}; known: {}", spec.kind, spec.category, known.join(", ")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_embedded_schema_compiles_and_is_advertised_under_its_action_name() {
        for k in all() {
            for key in k.schema.keys() {
                assert!(key == "start" || key == "create", "{k:?} advertises {key}");
            }
        }
        assert!(lookup("simulator", "dummy").unwrap().schema.contains_key("start"));
        assert!(lookup("manager", "generic").unwrap().schema.contains_key("create"));
    }

    #[test]
    fn validation_failures_carry_msg_instance_and_path() {
        let dummy = lookup("simulator", "dummy").unwrap();
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
        let m = lookup("manager", "generic").unwrap();
        let e = m.validate(Action::Create, &params(json!({"name": "x"}))).unwrap_err();
        assert_eq!(e.0["path"], json!("$"));
        assert!(m.validate(Action::Create, &params(json!({"category": "simulator", "type": "dummy"}))).is_ok());
        assert!(
            m.validate(Action::Create, &params(json!({"category": "simulator", "type": "dummy", "uuid": "x"})))
                .is_err()
        );
    }
}
