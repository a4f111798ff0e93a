//! Pure builders for the Kubernetes Job simulator: the Job and the payload
//! ConfigMap a `start` creates, the Job template of the `kubernetes-simple`
//! manager, and the reading of a Job's status as a [`Phase`]. No API calls
//! here, so every rule is tested as JSON against checked-in expected objects.
//!
//! Labels, annotations, the payload mount and `VILLAS_PAYLOAD_FILE` follow
//! VILLAScontroller's `simulators/kubernetes.py` (reference §5.2), except
//! that existing volume mounts are kept (the anchor replaced them).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::protocol::ErrorInfo;

/// Where the payload ConfigMap is mounted in every container.
pub const PAYLOAD_DIR: &str = "/config/";
/// The variable that points containers at the payload.
pub const PAYLOAD_ENV: &str = "VILLAS_PAYLOAD_FILE";
/// Label prefix of VILLAS objects.
pub const LABEL_PREFIX: &str = "villas.fein-aachen.org";

/// Who a Job belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Owner {
    /// The simulator component.
    pub component: Uuid,
    /// Its manager.
    pub manager: Uuid,
    /// `properties.name`.
    pub name: String,
    /// `properties.location`.
    pub location: String,
    /// `properties.realm`.
    pub realm: Option<String>,
    /// The controller's own Pod (`POD_NAME`, `POD_UID`) when in-cluster.
    pub pod: Option<(String, String)>,
}

impl Owner {
    /// The labels of every object of this component.
    pub fn labels(&self) -> Value {
        json!({
            "app.kubernetes.io/part-of": "villas",
            "app.kubernetes.io/managed-by": "busbar",
            "app.kubernetes.io/component": "infrastructure-component",
            format!("{LABEL_PREFIX}/ic-manager-uuid"): self.manager.to_string(),
            format!("{LABEL_PREFIX}/ic-uuid"): self.component.to_string(),
        })
    }

    /// The label selector of this component's Jobs.
    pub fn selector(&self) -> String {
        format!("{LABEL_PREFIX}/ic-uuid={}", self.component)
    }

    fn annotations(&self) -> Value {
        json!({
            format!("{LABEL_PREFIX}/name"): self.name,
            format!("{LABEL_PREFIX}/location"): self.location,
            format!("{LABEL_PREFIX}/realm"): self.realm.clone().unwrap_or_default(),
        })
    }
}

/// Deep-merge `overlay` into `base`: objects merge key by key, anything
/// else (arrays included) is replaced.
pub fn merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn object_at<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Map<String, Value> {
    let mut cur = v;
    for key in path {
        if !cur.get(*key).is_some_and(Value::is_object) {
            cur[*key] = json!({});
        }
        cur = &mut cur[*key];
    }
    cur.as_object_mut().expect("made an object above")
}

fn invalid(what: &str, e: impl std::fmt::Display) -> ErrorInfo {
    ErrorInfo::new(format!("Invalid {what}: {e}"))
}

/// The ConfigMap holding a start's whole action payload as `payload.json`.
pub fn payload_configmap(owner: &Owner, payload: &Value) -> Result<ConfigMap, ErrorInfo> {
    let text = serde_json::to_string(payload).map_err(|e| invalid("payload", e))?;
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"generateName": "job-payload-", "labels": owner.labels()},
        "data": {"payload.json": text},
    }))
    .map_err(|e| invalid("ConfigMap", e))
}

/// The Job of a start: `template` (the component's `properties.job`) merged
/// with the action's `job`, mounting ConfigMap `configmap` at `/config/`.
pub fn start_job(template: &Value, overlay: Option<&Value>, owner: &Owner, configmap: &str) -> Result<Job, ErrorInfo> {
    let mut job = template.clone();
    if !job.is_object() {
        return Err(ErrorInfo::new("The component has no Job template (properties.job)"));
    }
    if let Some(o) = overlay {
        merge(&mut job, o);
    }
    job["apiVersion"] = json!("batch/v1");
    job["kind"] = json!("Job");
    let meta = object_at(&mut job, &["metadata"]);
    let base = meta.remove("name").and_then(|n| n.as_str().map(str::to_owned)).unwrap_or_else(|| "villas-job".into());
    meta.insert("generateName".into(), json!(format!("{base}-")));
    merge(meta.entry("labels").or_insert(json!({})), &owner.labels());
    merge(meta.entry("annotations").or_insert(json!({})), &owner.annotations());
    if let Some((name, uid)) = &owner.pod {
        meta.insert("ownerReferences".into(), json!([{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]));
    }
    let pod_meta = object_at(&mut job, &["spec", "template", "metadata"]);
    merge(pod_meta.entry("labels").or_insert(json!({})), &owner.labels());
    let pod = object_at(&mut job, &["spec", "template", "spec"]);
    let volumes = pod.entry("volumes").or_insert(json!([]));
    if let Value::Array(v) = volumes {
        v.push(json!({"name": "payload", "configMap": {"name": configmap}}));
    }
    let Some(Value::Array(containers)) = pod.get_mut("containers") else {
        return Err(ErrorInfo::new("The Job template has no containers (spec.template.spec.containers)"));
    };
    for c in containers.iter_mut() {
        let Value::Object(c) = c else { continue };
        if let Value::Array(m) = c.entry("volumeMounts").or_insert(json!([])) {
            m.push(json!({"name": "payload", "mountPath": PAYLOAD_DIR, "readOnly": true}));
        }
        if let Value::Array(e) = c.entry("env").or_insert(json!([])) {
            e.push(json!({"name": PAYLOAD_ENV, "value": format!("{PAYLOAD_DIR}payload.json")}));
        }
    }
    serde_json::from_value(job).map_err(|e| invalid("Job", e))
}

/// The Job template the `kubernetes-simple` manager builds from VILLASweb's
/// duplication parameters (`jobname`, `activeDeadlineSeconds` as a string
/// or a number, `containername`, `image`, `privileged`).
pub fn simple_job_template(params: &Map<String, Value>) -> Result<Value, ErrorInfo> {
    let image = params
        .get("image")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ErrorInfo::new("Missing image").with("path", "$.image"))?;
    let deadline = match params.get("activeDeadlineSeconds") {
        None | Some(Value::Null) => 3600,
        Some(Value::Number(n)) => n.as_i64().filter(|n| *n > 0).ok_or_else(|| deadline_error(&n.to_string()))?,
        Some(Value::String(s)) => s.trim().parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| deadline_error(s))?,
        Some(other) => return Err(deadline_error(&other.to_string())),
    };
    let str_or =
        |k: &str, d: &str| params.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or(d).to_owned();
    let privileged = params.get("privileged").and_then(Value::as_bool).unwrap_or(false);
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": str_or("jobname", "noname")},
        "spec": {
            "activeDeadlineSeconds": deadline,
            "backoffLimit": 2,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": str_or("containername", "jobcontainer"),
                    "image": image,
                    "imagePullPolicy": "Always",
                    "securityContext": {"privileged": privileged},
                }],
            }},
        },
    }))
}

fn deadline_error(got: &str) -> ErrorInfo {
    ErrorInfo::new("activeDeadlineSeconds must be a positive integer")
        .with("path", "$.activeDeadlineSeconds")
        .with("instance", got)
}

/// Where a Job is, read from its `status` (and `spec.suspend`), never from
/// Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; no pod is active yet.
    Pending,
    /// At least one pod is active.
    Running,
    /// `spec.suspend` is set and no pod is active.
    Suspended,
    /// The Job completed (`Complete` condition, or every completion done).
    Succeeded,
    /// The Job failed (`Failed` condition: backoff limit, deadline, …).
    Failed {
        /// The condition's reason (`BackoffLimitExceeded`, `DeadlineExceeded`).
        reason: String,
        /// The condition's message.
        message: String,
    },
}

impl Phase {
    /// Whether the Job will not run again.
    pub fn is_finished(&self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed { .. })
    }
}

/// Read the [`Phase`] of a Job.
pub fn phase(job: &Job) -> Phase {
    let status = job.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let holds = |t: &str| conditions.iter().find(|c| c.type_ == t && c.status == "True");
    if let Some(c) = holds("Failed") {
        return Phase::Failed {
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
        };
    }
    let completions = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(1);
    let active = status.active.unwrap_or(0);
    if holds("Complete").is_some() || (active == 0 && status.succeeded.unwrap_or(0) >= completions) {
        return Phase::Succeeded;
    }
    if active > 0 {
        return Phase::Running;
    }
    let suspended = job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    if suspended || holds("Suspended").is_some() { Phase::Suspended } else { Phase::Pending }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
    }

    fn owner(pod: bool) -> Owner {
        Owner {
            component: Uuid::parse_str("c487a470-6af6-11eb-beee-7fa268050224").unwrap(),
            manager: Uuid::parse_str("4f8fb73e-7e74-11eb-8f63-f3a5b3ab82f6").unwrap(),
            name: "kubernetes simulator".into(),
            location: "ACS lab".into(),
            realm: Some("de.rwth-aachen.eonerc.acs".into()),
            pod: pod.then(|| ("busbar-7d9f".into(), "0b0b0b0b-0000-4000-8000-000000000001".into())),
        }
    }

    #[test]
    fn merge_is_deep_for_objects_and_replaces_everything_else() {
        let mut a = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        merge(&mut a, &json!({"a": {"c": [3], "e": 2}, "d": null}));
        assert_eq!(a, json!({"a": {"b": 1, "c": [3], "e": 2}, "d": null}));
    }

    #[test]
    fn the_start_job_matches_the_expected_object() {
        let template = fixture("job-template.json");
        let overlay = json!({"spec": {"activeDeadlineSeconds": 120}});
        let job = start_job(&template, Some(&overlay), &owner(true), "job-payload-x7k2p").unwrap();
        assert_eq!(serde_json::to_value(&job).unwrap(), fixture("job-expected.json"));
    }

    #[test]
    fn existing_volume_mounts_and_env_are_kept() {
        let job = start_job(&fixture("job-template.json"), None, &owner(false), "cm").unwrap();
        let v = serde_json::to_value(&job).unwrap();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["volumeMounts"].as_array().unwrap().len(), 2, "{c}");
        assert_eq!(c["env"][1], json!({"name": PAYLOAD_ENV, "value": "/config/payload.json"}));
        assert!(v["metadata"].get("ownerReferences").is_none(), "only in-cluster");
    }

    #[test]
    fn a_template_without_containers_is_a_clear_error() {
        let e = start_job(&json!({"spec": {}}), None, &owner(false), "cm").unwrap_err();
        assert!(e.msg().contains("no containers"), "{e:?}");
        assert!(start_job(&Value::Null, None, &owner(false), "cm").unwrap_err().msg().contains("no Job template"));
    }

    #[test]
    fn the_payload_configmap_holds_the_whole_action() {
        let payload = json!({"action": "start", "parameters": {"x": 1}, "when": 0});
        let cm = payload_configmap(&owner(false), &payload).unwrap();
        let v = serde_json::to_value(&cm).unwrap();
        assert_eq!(v["metadata"]["generateName"], "job-payload-");
        let text = v["data"]["payload.json"].as_str().unwrap();
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), payload);
    }

    #[test]
    fn villasweb_duplication_parameters_build_the_expected_job() {
        let create = fixture("villasweb-kubernetes-simple-create.json");
        let params = create["parameters"].as_object().unwrap();
        let template = simple_job_template(params).unwrap();
        assert_eq!(template, fixture("kubernetes-simple-template-expected.json"));
        // …and it is a valid batch/v1 Job.
        let _: Job = serde_json::from_value(template).unwrap();
    }

    #[test]
    fn active_deadline_seconds_accepts_a_string_or_a_number_and_nothing_else() {
        let p = |v: Value| json!({"image": "perl", "activeDeadlineSeconds": v}).as_object().unwrap().clone();
        for v in [json!("600"), json!(600), json!(" 600 ")] {
            assert_eq!(simple_job_template(&p(v.clone())).unwrap()["spec"]["activeDeadlineSeconds"], 600, "{v}");
        }
        for v in [json!("soon"), json!(-1), json!(1.5), json!(true)] {
            let e = simple_job_template(&p(v.clone())).unwrap_err();
            assert_eq!(e.0["path"], "$.activeDeadlineSeconds", "{v}");
        }
        assert!(simple_job_template(&Map::new()).unwrap_err().msg().contains("image"));
    }

    fn job_with(spec: Value, status: Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j"}, "spec": spec, "status": status})).unwrap()
    }

    #[test]
    fn the_phase_comes_from_the_job_status() {
        let tpl = json!({"template": {"spec": {"containers": []}}});
        let with = |extra: Value| {
            let mut s = tpl.clone();
            merge(&mut s, &extra);
            s
        };
        assert_eq!(phase(&job_with(tpl.clone(), json!({}))), Phase::Pending);
        assert_eq!(phase(&job_with(tpl.clone(), json!({"active": 1}))), Phase::Running);
        assert_eq!(phase(&job_with(with(json!({"suspend": true})), json!({}))), Phase::Suspended);
        // Suspending a running Job: pods are still terminating.
        assert_eq!(phase(&job_with(with(json!({"suspend": true})), json!({"active": 1}))), Phase::Running);
        let done = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
        assert_eq!(phase(&job_with(tpl.clone(), done)), Phase::Succeeded);
        assert_eq!(phase(&job_with(tpl.clone(), json!({"succeeded": 1}))), Phase::Succeeded);
        // Two of three completions: still running.
        assert_eq!(
            phase(&job_with(with(json!({"completions": 3})), json!({"succeeded": 2, "active": 1}))),
            Phase::Running
        );
        let failed = json!({"failed": 2, "conditions": [
            {"type": "Complete", "status": "False"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]});
        let p = phase(&job_with(tpl.clone(), failed));
        assert_eq!(
            p,
            Phase::Failed {
                reason: "BackoffLimitExceeded".into(),
                message: "Job has reached the specified backoff limit".into()
            }
        );
        assert!(p.is_finished() && Phase::Succeeded.is_finished() && !Phase::Running.is_finished());
        let not_yet = json!({"conditions": [{"type": "Failed", "status": "False"}], "active": 1});
        assert_eq!(phase(&job_with(tpl, not_yet)), Phase::Running);
    }
}
