//! Component type manifests: the shipped ones, broken ones, and site types
//! from an extra directory.

mod common;

use busbar::component::kinds::{Kind, Kinds};
use common::*;
use serde_json::json;
use std::path::Path;
use uuid::Uuid;

fn shipped() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("components")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn every_shipped_manifest_loads_validates_and_is_built_in() {
    let files = shipped();
    assert!(files.len() >= 5);
    let builtin = Kinds::builtin();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let k = Kind::from_manifest(&f.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"));
        let name = f.file_stem().unwrap().to_str().unwrap();
        assert_eq!(k.kind, name, "{}: file named after its type", f.display());
        assert_eq!(f.parent().unwrap().file_name().unwrap().to_str().unwrap(), k.category);
        assert!(builtin.lookup(&k.category, &k.kind).is_some(), "{} is embedded in the binary", f.display());
    }
}

#[test]
fn a_broken_manifest_in_an_extra_directory_fails_the_config_with_its_file_name() {
    let env = TestEnv::new();
    let dir = env.dir.path().join("types");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.yaml"), "category: simulator\ntype: bad\ndriver: process\nprocess: {argv: [x]}\n")
        .unwrap();
    let cfg = env.dir.path().join("lab.yaml");
    std::fs::write(&cfg, text_of(&json!({"component_dirs": [dir]}))).unwrap();
    let e = busbar::config::Config::load(&cfg).unwrap_err().to_string();
    assert!(e.contains("bad.yaml"), "{e}");
}

#[tokio::test]
async fn a_site_type_from_an_extra_directory_is_creatable_through_the_manager_and_runs() {
    let env = TestEnv::new();
    let dir = env.dir.path().join("types/simulator");
    std::fs::create_dir_all(&dir).unwrap();
    // A manifest as a typed value (JSON is YAML): the checkout path goes
    // in as it is.
    let manifest = json!({
        "category": "simulator", "type": "exiter", "driver": "process",
        "description": "Exits with the requested code after a pause.",
        "process": {"executable": format!("{}/exit-with.sh", fixtures_bin()), "argv": ["{{start.code}}", ["{{start.delay}}"]]},
        "schema": {"start": {"type": "object", "required": ["code"], "properties": {
            "code": {"type": "integer", "minimum": 0, "maximum": 255},
            "delay": {"type": "number", "minimum": 0}}}},
    });
    std::fs::write(dir.join("exiter.yaml"), text_of(&manifest)).unwrap();
    let mut config = env.config_value();
    config["component_dirs"] = json!([env.dir.path().join("types")]);
    let (d, c, mut l) = env.up_with(env.config_of(&config)).await;
    let u = Uuid::new_v4();
    c.publish(
        to_uuid(env.manager),
        &action(
            "create",
            json!({"category": "simulator", "type": "exiter", "uuid": u.to_string(), "name": "Site type"}),
        ),
        None,
    )
    .await
    .unwrap();
    let st = state_of(&mut l, u, "idle").await;
    assert_eq!(st["schema"]["start"]["required"], json!(["code"]), "the manifest's schema is advertised");
    c.publish(to_uuid(u), &action("start", json!({"code": 0, "delay": 0.05})), None).await.unwrap();
    state_of(&mut l, u, "running").await;
    state_of(&mut l, u, "idle").await;
    c.publish(to_uuid(u), &action("start", json!({"code": 4})), None).await.unwrap();
    let st = state_of(&mut l, u, "error").await;
    assert_eq!(st["status"]["error"]["code"], 4);
    c.publish(to_uuid(u), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, u, "idle").await;
    c.publish(to_uuid(u), &action("start", json!({"code": "four"})), None).await.unwrap();
    let st = state_of(&mut l, u, "error").await;
    assert_eq!(st["status"]["error"]["path"], "$.code", "validated before anything runs");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_readme_example_type_runs_as_documented() {
    let env = TestEnv::new();
    let types = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/types");
    let mut config = env.config_value();
    config["component_dirs"] = json!([types]);
    let d = env.start_with(env.config_of(&config)).await;
    let c = env.client().await;
    let mut l = env.listen_all(&c).await;
    let u = Uuid::new_v4();
    c.publish(
        to_uuid(env.manager),
        &action("create", json!({"category": "simulator", "type": "sine", "uuid": u.to_string()})),
        None,
    )
    .await
    .unwrap();
    state_of(&mut l, u, "idle").await;
    c.publish(to_uuid(u), &action("start", json!({"frequency": 5, "samples": 3, "step": 0.01})), None).await.unwrap();
    state_of(&mut l, u, "running").await;
    state_of(&mut l, u, "idle").await;
    let runs = env.dir.path().join("data/runs").join(u.to_string());
    let run = std::fs::read_dir(runs).unwrap().next().unwrap().unwrap().path();
    let out = std::fs::read_to_string(run.join("logs/stdout.log")).unwrap();
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.starts_with("0.000 +0.000000"), "{out}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}
