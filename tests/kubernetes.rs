//! The Kubernetes managers and the Job simulator, driven through the real
//! daemon and the real RabbitMQ against the in-process fake API server
//! (`common::fake_kube`). The Job's status is advanced by the test, as the
//! Job controller would.

mod common;

use busbar::daemon::{Options, Running};
use busbar::k8s::LABEL_PREFIX;
use common::fake_kube::FakeKube;
use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

const NS: &str = "lab";

struct Lab {
    env: TestEnv,
    fake: FakeKube,
    k8s: Uuid,
    simple: Uuid,
}

impl Lab {
    fn new() -> Lab {
        Lab { env: TestEnv::new(), fake: FakeKube::new(), k8s: Uuid::new_v4(), simple: Uuid::new_v4() }
    }

    fn config(&self) -> busbar::config::Config {
        self.env.config_with(vec![
            json!({"category": "manager", "type": "kubernetes", "name": "Kubernetes Manager", "uuid": self.k8s, "namespace": NS}),
            json!({"category": "manager", "type": "kubernetes-simple", "name": "Simple", "uuid": self.simple, "namespace": NS}),
        ])
    }

    async fn daemon(&self) -> Running {
        let options = Options { kube_client: Some(self.fake.client()) };
        self.env.start_opts(self.config(), options).await
    }

    async fn up(&self) -> (Running, busbar::client::Client, busbar::client::Listener) {
        let d = self.daemon().await;
        let c = self.env.client().await;
        let l = self.env.listen_all(&c).await;
        (d, c, l)
    }

    /// The one Job of `sim`, once it exists.
    async fn job_of(&self, sim: Uuid) -> Value {
        eventually(WAIT, "the Job appears", async || self.fake.jobs_of(sim).into_iter().next()).await
    }
}

/// VILLAScontroller's `etc/params_k8s_create.yaml`, with a fresh uuid.
fn create_params(sim: Uuid) -> Value {
    json!({
        "name": "kubernetes simulator",
        "location": "ACS lab",
        "realm": "de.rwth-aachen.eonerc.acs",
        "category": "simulator",
        "type": "kubernetes",
        "uuid": sim.to_string(),
        "properties": {
            "job": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": "pi"},
                "spec": {
                    "activeDeadlineSeconds": 3600,
                    "backoffLimit": 1,
                    "ttlSecondsAfterFinished": 3600,
                    "template": {"spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "pi", "image": "perl", "command": ["perl", "-Mbignum=bpi", "-wle", "print bpi(2000)"]}]
                    }}
                }
            },
            "schema": {"start": {"type": "object", "properties": {"digits": {"type": "integer"}}}}
        }
    })
}

fn name_of(job: &Value) -> String {
    job["metadata"]["name"].as_str().unwrap().to_owned()
}

/// Create a simulator through the kubernetes manager and wait for its
/// announcement.
async fn create(lab: &Lab, c: &busbar::client::Client, l: &mut busbar::client::Listener) -> Uuid {
    let sim = Uuid::new_v4();
    c.publish(to_uuid(lab.k8s), &action("create", create_params(sim)), None).await.unwrap();
    state_of(l, sim, "idle").await;
    sim
}

/// Start `sim`, let its pod run, and return the Job's name.
async fn run(lab: &Lab, c: &busbar::client::Client, l: &mut busbar::client::Listener, sim: Uuid) -> String {
    c.publish(to_uuid(sim), &action("start", json!({"digits": 20})), None).await.unwrap();
    state_of(l, sim, "starting").await;
    let name = name_of(&lab.job_of(sim).await);
    lab.fake.add_pod(NS, &name, &format!("{name}-x1"));
    lab.fake.set_job_status(NS, &name, json!({"active": 1}));
    let st = state_of(l, sim, "running").await;
    assert_eq!(st["status"]["pod_names"], json!([format!("{name}-x1")]), "{st}");
    name
}

#[tokio::test]
async fn create_start_run_succeed_and_return_to_idle() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = Uuid::new_v4();
    c.publish(to_uuid(lab.k8s), &action("create", create_params(sim)), None).await.unwrap();
    let st = state_of(&mut l, sim, "idle").await;
    assert_eq!(st["status"]["managed_by"], lab.k8s.to_string());
    assert_eq!(st["schema"]["start"]["properties"]["digits"]["type"], "integer", "custom schema advertised: {st}");
    assert_eq!(st["properties"]["namespace"], NS);
    let mgr = d.shared.env.components.lookup(lab.k8s).unwrap().status().await.unwrap();
    assert_eq!(mgr["components"], json!([sim.to_string()]));

    // The custom start schema is enforced.
    c.publish(to_uuid(sim), &action("start", json!({"digits": "many"})), None).await.unwrap();
    let st = state_of(&mut l, sim, "error").await;
    assert_eq!(st["status"]["error"]["path"], "$.digits");
    c.publish(to_uuid(sim), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "idle").await;

    let body =
        json!({"action": "start", "parameters": {"digits": 20}, "job": {"spec": {"activeDeadlineSeconds": 120}}});
    c.publish(to_uuid(sim), &body, None).await.unwrap();
    state_of(&mut l, sim, "starting").await;
    let job = lab.job_of(sim).await;
    let name = name_of(&job);
    assert!(name.starts_with("pi-"), "generateName from metadata.name: {name}");
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 120, "the action's job is merged");
    assert_eq!(job["spec"]["backoffLimit"], 1);
    let labels = &job["metadata"]["labels"];
    assert_eq!(labels[format!("{LABEL_PREFIX}/ic-uuid")], sim.to_string());
    assert_eq!(labels[format!("{LABEL_PREFIX}/ic-manager-uuid")], lab.k8s.to_string());
    assert_eq!(labels["app.kubernetes.io/part-of"], "villas");
    assert_eq!(job["metadata"]["annotations"][format!("{LABEL_PREFIX}/location")], "ACS lab");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/config/");
    assert_eq!(container["env"][0], json!({"name": "VILLAS_PAYLOAD_FILE", "value": "/config/payload.json"}));

    // The payload ConfigMap holds the whole action and belongs to the Job.
    let cm = eventually(WAIT, "the ConfigMap appears", async || {
        lab.fake.configmaps_of(sim).into_iter().next().filter(|cm| cm["metadata"]["ownerReferences"].is_array())
    })
    .await;
    assert_eq!(job["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"], cm["metadata"]["name"]);
    let payload: Value = serde_json::from_str(cm["data"]["payload.json"].as_str().unwrap()).unwrap();
    assert_eq!(payload, body);
    let owner = &cm["metadata"]["ownerReferences"][0];
    assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("Job"), Some(name.as_str())));
    assert_eq!(owner["uid"], job["metadata"]["uid"]);

    status_of(&mut l, sim, |v| v["properties"]["job_name"] == name.as_str()).await;
    lab.fake.add_pod(NS, &name, &format!("{name}-abcde"));
    lab.fake.set_job_status(NS, &name, json!({"active": 1}));
    let st = state_of(&mut l, sim, "running").await;
    assert_eq!(st["status"]["pod_names"], json!([format!("{name}-abcde")]));
    assert_eq!(st["properties"]["job_name"], name.as_str());

    lab.fake.set_job_status(NS, &name, json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}));
    state_of(&mut l, sim, "stopping").await;
    state_of(&mut l, sim, "idle").await;
    assert!(lab.fake.configmaps_of(sim).is_empty(), "the payload ConfigMap is deleted");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_job_is_an_error_with_its_reason_and_reset_cleans_up() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = create(&lab, &c, &mut l).await;
    let name = run(&lab, &c, &mut l, sim).await;
    lab.fake.set_job_status(
        NS,
        &name,
        json!({"failed": 2, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit"}]}),
    );
    let st = state_of(&mut l, sim, "error").await;
    let err = &st["status"]["error"];
    assert_eq!(err["msg"], "Job failed: BackoffLimitExceeded");
    assert_eq!(err["message"], "Job has reached the specified backoff limit");
    assert_eq!(lab.fake.jobs_of(sim).len(), 1, "a failed Job is kept for inspection");

    c.publish(to_uuid(sim), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "resetting").await;
    let st = state_of(&mut l, sim, "idle").await;
    assert!(st["status"].get("error").is_none(), "{st}");
    assert!(lab.fake.jobs_of(sim).is_empty() && lab.fake.configmaps_of(sim).is_empty());
    d.stop().await.unwrap();
}

#[tokio::test]
async fn pause_and_resume_set_suspend() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let mut record = lab.env.listen_all(&c).await;
    let sim = create(&lab, &c, &mut l).await;
    // Nothing to pause yet: refused with a clear error, state unchanged.
    c.publish(to_uuid(sim), &action("pause", json!({})), None).await.unwrap();
    let st = state_of(&mut l, sim, "error").await;
    assert!(st["status"]["error"]["msg"].as_str().unwrap().contains("Invalid state transition"), "{st}");
    c.publish(to_uuid(sim), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "idle").await;

    let name = run(&lab, &c, &mut l, sim).await;
    c.publish(to_uuid(sim), &action("pause", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "pausing").await;
    state_of(&mut l, sim, "paused").await;
    assert_eq!(lab.fake.jobs_of(sim)[0]["spec"]["suspend"], true);
    c.publish(to_uuid(sim), &action("resume", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "running").await;
    assert_eq!(lab.fake.jobs_of(sim)[0]["spec"]["suspend"], false);
    assert!(lab.fake.log().iter().filter(|r| r.starts_with("PATCH") && r.ends_with(&name)).count() >= 2);
    lab.fake.set_job_status(NS, &name, json!({"succeeded": 1}));
    state_of(&mut l, sim, "idle").await;
    // Only edges of the VILLAS table were published, transient states included.
    let seq = published_states(&mut record, sim, Duration::from_millis(300)).await;
    assert_table_edges(&seq, false);
    use busbar::state::State::*;
    for (a, b) in [(Idle, Starting), (Starting, Running), (Running, Pausing), (Pausing, Paused), (Paused, Resuming)] {
        assert!(seq.windows(2).any(|w| w == [a, b]), "{a} → {b} published: {seq:?}");
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn stop_deletes_the_job_and_the_configmap() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = create(&lab, &c, &mut l).await;
    run(&lab, &c, &mut l, sim).await;
    assert_eq!(lab.fake.configmaps_of(sim).len(), 1);
    c.publish(to_uuid(sim), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, sim, "stopping").await;
    let st = state_of(&mut l, sim, "idle").await;
    assert!(lab.fake.jobs_of(sim).is_empty(), "Job deleted");
    assert!(lab.fake.configmaps_of(sim).is_empty(), "ConfigMap deleted");
    assert_eq!(st["status"]["pod_names"], json!([]));
    // A Job already gone (deleted by hand) is no error for stop.
    run(&lab, &c, &mut l, sim).await;
    let name = name_of(&lab.fake.jobs_of(sim)[0]);
    lab.fake.fail_next_on(axum::http::Method::DELETE, 404, &format!("jobs.batch \"{name}\" not found"));
    c.publish(to_uuid(sim), &action("stop", json!({})), None).await.unwrap();
    let st = state_of(&mut l, sim, "idle").await;
    assert!(st["status"].get("error").is_none(), "{st}");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_restarted_daemon_adopts_the_running_job() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = create(&lab, &c, &mut l).await;
    let name = run(&lab, &c, &mut l, sim).await;
    d.stop().await.unwrap();
    assert_eq!(lab.fake.jobs_of(sim).len(), 1, "shutdown leaves the Job running");

    let mut record = lab.env.listen_all(&c).await;
    let d = lab.daemon().await;
    let st = state_of(&mut l, sim, "running").await;
    assert_eq!(st["properties"]["job_name"], name.as_str());
    assert_eq!(st["status"]["managed_by"], lab.k8s.to_string());
    assert_eq!(lab.fake.jobs_of(sim).len(), 1, "no second Job");
    let posts = lab.fake.log().iter().filter(|r| r.starts_with("POST") && r.contains("/jobs")).count();
    assert_eq!(posts, 1);
    lab.fake.set_job_status(NS, &name, json!({"succeeded": 1}));
    state_of(&mut l, sim, "idle").await;
    // The restarted daemon took idle → running as a declared adoption, and
    // nothing else outside the table.
    let seq = published_states(&mut record, sim, Duration::from_millis(300)).await;
    assert_table_edges(&seq, true);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn api_errors_are_errors_with_the_api_message() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = create(&lab, &c, &mut l).await;
    // Let the adoption lookup of the new component pass first.
    eventually(WAIT, "the Job list is read", async || {
        lab.fake.log().iter().any(|r| r.starts_with("GET") && r.ends_with("/jobs")).then_some(())
    })
    .await;
    for (code, message) in [
        (403, "jobs.batch is forbidden: User \"system:serviceaccount:lab:busbar\" cannot list resource \"jobs\""),
        (500, "etcdserver: request timed out"),
    ] {
        lab.fake.fail_next(1, code, message);
        c.publish(to_uuid(sim), &action("start", json!({})), None).await.unwrap();
        let st = state_of(&mut l, sim, "error").await;
        let err = &st["status"]["error"];
        assert_eq!(err["msg"], format!("Kubernetes API error: {message}"), "{st}");
        assert_eq!(err["code"], code);
        c.publish(to_uuid(sim), &action("reset", json!({})), None).await.unwrap();
        state_of(&mut l, sim, "idle").await;
    }
    assert!(lab.fake.jobs_of(sim).is_empty());
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_dropped_watch_is_re_established() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = create(&lab, &c, &mut l).await;
    let name = run(&lab, &c, &mut l, sim).await;
    let watches = || lab.fake.log().iter().filter(|r| r.starts_with("GET") && r.ends_with("/jobs")).count();
    let before = watches();
    lab.fake.drop_watches();
    eventually(WAIT, "the watch is re-established", async || (watches() > before).then_some(())).await;
    // The new watch carries on where the old one ended.
    lab.fake.set_job_status(NS, &name, json!({"succeeded": 1}));
    state_of(&mut l, sim, "idle").await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_simple_manager_creates_from_villasweb_duplication_parameters() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s/villasweb-kubernetes-simple-create.json");
    let mut body: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    body.as_object_mut().unwrap().remove("when");
    let sim = Uuid::new_v4();
    body["parameters"]["uuid"] = json!(sim.to_string());
    c.publish(to_uuid(lab.simple), &body, None).await.unwrap();
    let st = state_of(&mut l, sim, "idle").await;
    assert_eq!(st["properties"]["name"], "DPsim user42");
    assert_eq!(st["properties"]["job"]["spec"]["activeDeadlineSeconds"], 3600);
    assert_eq!(st["status"]["managed_by"], lab.simple.to_string());

    c.publish(to_uuid(sim), &action("start", json!({})), None).await.unwrap();
    let job = lab.job_of(sim).await;
    assert!(name_of(&job).starts_with("dpsim-user42-"));
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "dpsimrwth/slew-villas:latest");
    assert_eq!(container["securityContext"]["privileged"], true);

    // A create without an image is refused with the path.
    let bad = Uuid::new_v4();
    c.publish(to_uuid(lab.simple), &action("create", json!({"name": "x", "uuid": bad.to_string()})), None)
        .await
        .unwrap();
    // ... and the manager stays usable (idle, the error shown).
    let st = status_of(&mut l, lab.simple, |st| !st["status"]["error"].is_null()).await;
    assert!(st["status"]["error"]["msg"].as_str().unwrap().starts_with("Invalid parameters"), "{st}");
    assert_eq!(st["status"]["state"], "idle", "{st}");
    d.stop().await.unwrap();
}

#[tokio::test]
async fn deleting_a_simulator_deletes_its_job_and_it_goes_gone_once() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.up().await;
    let sim = create(&lab, &c, &mut l).await;
    run(&lab, &c, &mut l, sim).await;
    c.publish(to_uuid(lab.k8s), &action("delete", json!({"uuid": sim.to_string()})), None).await.unwrap();
    state_of(&mut l, sim, "gone").await;
    assert!(lab.fake.jobs_of(sim).is_empty() && lab.fake.configmaps_of(sim).is_empty());
    let later = collect_for(&mut l, Duration::from_millis(300)).await;
    assert!(!later.iter().any(|s| s.payload["properties"]["uuid"] == sim.to_string()), "gone only once");
    // It stays deleted across a restart.
    d.stop().await.unwrap();
    let d = lab.daemon().await;
    let seen = collect_for(&mut l, Duration::from_millis(500)).await;
    assert!(!seen.iter().any(|s| s.payload["properties"]["uuid"] == sim.to_string()));
    d.stop().await.unwrap();
}

/// The same lifecycle against a real cluster (`KUBECONFIG`, namespace
/// `BUSBAR_TEST_NAMESPACE` or `default`): a busybox Job that sleeps.
#[tokio::test]
#[ignore = "needs a cluster"]
async fn real_cluster_lifecycle() {
    let env = TestEnv::new();
    let mgr = Uuid::new_v4();
    let ns = std::env::var("BUSBAR_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let manager = json!({"category": "manager", "type": "kubernetes", "name": "K8s", "uuid": mgr, "namespace": ns});
    let (d, c, mut l) = env.up_with(env.config_with(vec![manager])).await;
    let sim = Uuid::new_v4();
    let mut params = create_params(sim);
    params["properties"]["job"]["spec"]["template"]["spec"]["containers"] = json!([{"name": "sleep", "image": "busybox:1.36", "command": ["sh", "-c", "cat $VILLAS_PAYLOAD_FILE; sleep 20"]}]);
    c.publish(to_uuid(mgr), &action("create", params), None).await.unwrap();
    state_of(&mut l, sim, "idle").await;
    let long = Instant::now() + Duration::from_secs(180);
    async fn wait(l: &mut busbar::client::Listener, sim: Uuid, state: &str, until: Instant) -> Value {
        while let Some(s) = l.next_until(until).await {
            if s.payload["properties"]["uuid"] == sim.to_string() && s.state() == Some(state) {
                return s.payload;
            }
        }
        panic!("{state} not reached");
    }
    c.publish(to_uuid(sim), &action("start", json!({})), None).await.unwrap();
    wait(&mut l, sim, "running", long).await;
    wait(&mut l, sim, "idle", long).await;
    c.publish(to_uuid(sim), &action("start", json!({})), None).await.unwrap();
    wait(&mut l, sim, "running", long).await;
    c.publish(to_uuid(sim), &action("stop", json!({})), None).await.unwrap();
    wait(&mut l, sim, "idle", long).await;
    c.publish(to_uuid(mgr), &action("delete", json!({"uuid": sim.to_string()})), None).await.unwrap();
    wait(&mut l, sim, "gone", long).await;
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_manager_deletes_jobs_whose_component_no_longer_exists() {
    use k8s_openapi::api::batch::v1::Job;
    use kube::api::{Api, PostParams};
    let lab = Lab::new();
    let jobs: Api<Job> = Api::namespaced(lab.fake.client(), NS);
    let (orphan, foreign) = (Uuid::new_v4(), Uuid::new_v4());
    for (ic, manager) in [(orphan, lab.k8s), (foreign, Uuid::new_v4())] {
        let job = json!({"metadata": {"generateName": "old-", "labels": {
                format!("{LABEL_PREFIX}/ic-uuid"): ic.to_string(),
                format!("{LABEL_PREFIX}/ic-manager-uuid"): manager.to_string()}},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "perl"}]}}}});
        jobs.create(&PostParams::default(), &serde_json::from_value(job).unwrap()).await.unwrap();
    }
    let (d, c, mut l) = lab.up().await;
    eventually(WAIT, "the orphan Job is deleted", async || lab.fake.jobs_of(orphan).is_empty().then_some(())).await;
    assert_eq!(lab.fake.jobs_of(foreign).len(), 1, "another manager's Job is left alone");
    // A live component's Job survives a restart.
    let sim = create(&lab, &c, &mut l).await;
    run(&lab, &c, &mut l, sim).await;
    d.stop().await.unwrap();
    let d = lab.daemon().await;
    state_of(&mut l, sim, "running").await;
    assert_eq!(lab.fake.jobs_of(sim).len(), 1);
    d.stop().await.unwrap();
}

/// A Kubernetes simulator that could never reach a cluster (its kubeconfig
/// does not exist) is refused in the create's answer, with the reason,
/// instead of being created and failing a moment later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_without_a_usable_kubeconfig_is_refused_in_its_answer() {
    let env = TestEnv::new();
    let mgr = Uuid::new_v4();
    let manager = json!({"category": "manager", "type": "kubernetes", "name": "K8s", "uuid": mgr,
        "namespace": NS, "kubeconfig": "/nonexistent/kubeconfig"});
    // No fixed client: the daemon makes its own from the kubeconfig.
    let d = env.start_with(env.config_with(vec![manager])).await;
    let sim = Uuid::new_v4();
    let params = create_params(sim).to_string();
    let o = cli(&env, &["create", "-m", &mgr.to_string(), "-p", &params]).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Cannot create a Kubernetes simulator: Kubernetes configuration: /nonexistent/kubeconfig"),
        "{err}"
    );
    assert!(d.shared.env.components.lookup(sim).is_none(), "nothing was created");
    d.stop().await.expect("clean shutdown");
}
