//! The Kubernetes deployment files are valid objects: every document
//! deserialises into its k8s-openapi type without losing a field, the Role
//! grants exactly the verbs busbar uses, and the embedded config loads.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Every document of every file.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(DIR).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&f).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        out.extend(docs.into_iter().filter(|d| !d.is_null()).map(|d| (name.clone(), d)));
    }
    out
}

/// Deserialise as `T` and check that nothing was dropped (a misspelt or
/// misplaced field would be).
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, doc, "{file}: a field was not understood");
    t
}

fn verbs(role: &Role, resource: &str) -> BTreeSet<String> {
    role.rules
        .iter()
        .flatten()
        .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
        .flat_map(|r| r.verbs.iter().cloned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_deployment_object_is_a_valid_kubernetes_object() {
    let docs = documents();
    let mut kinds = BTreeSet::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: no kind"));
        assert_eq!(doc["metadata"]["namespace"], "villas", "{file}: {kind} in one namespace");
        kinds.insert(kind.to_owned());
        match kind {
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, doc)),
            "RoleBinding" => {
                let b = typed::<RoleBinding>(file, doc);
                assert_eq!(b.role_ref.name, "busbar");
                assert_eq!(b.subjects.unwrap()[0].name, "busbar");
            }
            "Role" => {
                let role = typed::<Role>(file, doc);
                assert_eq!(verbs(&role, "jobs"), set(&["create", "list", "watch", "patch", "delete"]));
                assert_eq!(verbs(&role, "configmaps"), set(&["create", "list", "patch", "delete"]));
                assert_eq!(verbs(&role, "pods"), set(&["list"]));
                assert_eq!(role.rules.unwrap().len(), 3, "nothing else");
            }
            "ConfigMap" => {
                let cm = typed::<ConfigMap>(file, doc);
                let text = &cm.data.unwrap()["config.yaml"];
                // The JWT keys come from the Secret busbar-jwt in the Pod;
                // here, the test's public key stands in for it.
                let mut value: serde_json::Value = serde_saphyr::from_str(text).expect("the config is YAML");
                assert_eq!(value["api"]["auth"]["jwt"]["keys"][0], "/etc/busbar/jwt/jwks.json");
                value["api"]["auth"]["jwt"]["keys"][0] =
                    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt/rsa.pub").into();
                let config = busbar::config::Config::parse(
                    &serde_json::to_string(&value).unwrap(),
                    Path::new("deploy/kubernetes/config.yaml"),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                let types: BTreeSet<String> = config
                    .components
                    .iter()
                    .map(|c| format!("{}/{}", c["category"].as_str().unwrap(), c["type"].as_str().unwrap()))
                    .collect();
                assert!(types.contains("manager/kubernetes") && types.contains("manager/kubernetes-simple"));
                assert!(!text.contains("amqp://"), "no broker credentials in a ConfigMap");
            }
            "Deployment" => {
                let d = typed::<Deployment>(file, doc);
                let pod = d.spec.unwrap().template.spec.unwrap();
                assert_eq!(pod.service_account_name.as_deref(), Some("busbar"));
                let env: Vec<String> = pod.containers[0].env.iter().flatten().map(|e| e.name.clone()).collect();
                for var in ["AMQP_URL", "POD_NAME", "POD_UID"] {
                    assert!(env.iter().any(|e| e == var), "{var} is set");
                }
                let amqp = pod.containers[0].env.iter().flatten().find(|e| e.name == "AMQP_URL").unwrap();
                assert!(amqp.value.is_none(), "AMQP_URL comes from a Secret");
            }
            "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(file, doc)),
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
    assert_eq!(
        kinds,
        set(&["ConfigMap", "Deployment", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"])
    );
}

#[test]
fn the_example_create_parameters_fit_the_kubernetes_managers_schema() {
    let kinds = busbar::component::kinds::Kinds::builtin();
    let manager = kinds.lookup("manager", "kubernetes").unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kubernetes/create-pi.yaml");
    let params: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    manager.validate(busbar::state::Action::Create, params.as_object().unwrap()).unwrap();
}
