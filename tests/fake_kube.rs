//! The fake Kubernetes API server speaks well enough for the real kube
//! client: create with generateName, get, list by label, patch, delete
//! (404 as a typed error), and watch streams that the test can advance.

mod common;

use common::fake_kube::FakeKube;
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use std::time::Duration;

fn job(name_prefix: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"generateName": name_prefix, "labels": {"villas.fein-aachen.org/ic-uuid": "abc"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "perl"}]}}}
    }))
    .unwrap()
}

#[tokio::test]
async fn the_kube_client_can_create_list_patch_watch_and_delete() {
    let fake = FakeKube::new();
    let client = fake.client();
    let jobs: Api<Job> = Api::namespaced(client.clone(), "lab");
    let created = jobs.create(&PostParams::default(), &job("villas-job-")).await.unwrap();
    let name = created.metadata.name.clone().unwrap();
    assert!(name.starts_with("villas-job-") && name.len() > "villas-job-".len());
    let listed = jobs.list(&ListParams::default().labels("villas.fein-aachen.org/ic-uuid=abc")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(
        jobs.list(&ListParams::default().labels("villas.fein-aachen.org/ic-uuid=other"))
            .await
            .unwrap()
            .items
            .is_empty()
    );

    let mut events = watcher(jobs.clone(), watcher::Config::default().fields(&format!("metadata.name={name}"))).boxed();
    // The initial list, then a status change pushed by the test.
    let first = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first, watcher::Event::Init), "{first:?}");
    loop {
        if let watcher::Event::InitDone =
            tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap()
        {
            break;
        }
    }
    fake.set_job_status("lab", &name, json!({"active": 1}));
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
    let watcher::Event::Apply(j) = ev else { panic!("{ev:?}") };
    assert_eq!(j.status.unwrap().active, Some(1));

    let patched =
        jobs.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}}))).await.unwrap();
    assert_eq!(patched.spec.unwrap().suspend, Some(true));
    jobs.delete(&name, &DeleteParams::background()).await.unwrap();
    let e = jobs.delete(&name, &DeleteParams::background()).await.unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 404), "{e:?}");

    let cms: Api<ConfigMap> = Api::namespaced(client, "lab");
    fake.fail_next(1, 403, "configmaps is forbidden: User cannot create");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "job-payload-"}, "data": {"payload.json": "{}"}}))
            .unwrap();
    let e = cms.create(&PostParams::default(), &cm).await.unwrap_err();
    assert!(e.to_string().contains("forbidden"), "{e}");
    assert!(cms.create(&PostParams::default(), &cm).await.is_ok());
}
