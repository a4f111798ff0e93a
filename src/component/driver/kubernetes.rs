//! `simulator/kubernetes`: each start runs a Kubernetes Job. The component
//! turns actions into [`Mode`]s and [`JobCmd`]s for its job task
//! ([`crate::k8s::job`]) and the task's [`JobEvent`]s into states:
//!
//! | Job                       | state                      |
//! |---------------------------|----------------------------|
//! | created, pods pending     | `starting`                 |
//! | a pod active              | `running`                  |
//! | `suspend` set / cleared   | `paused` / `running`       |
//! | succeeded                 | `stopping`, then `idle` once the payload is deleted |
//! | failed                    | `error` with the Job's reason and message |
//! | deleted (stop, reset)     | `idle`                     |
//!
//! The managers (`manager/kubernetes`, `manager/kubernetes-simple`) only
//! shape create parameters; see [`simulator_spec`] and [`simple_simulator_spec`].

use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;
use uuid::Uuid;

use super::{Driver, Event, Fut};
use crate::component::Env;
use crate::component::core::Cx;
use crate::k8s::job::{JobCmd, JobEvent, JobRun, Mode, StartJob, Target};
use crate::k8s::{Owner, Phase, simple_job_template};
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::react::{self, JobEvent as Rule, Reaction};
use crate::state::{Action, State};

/// How long deleting a component waits for its Job to be deleted.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys a manager hands down to the simulators it creates.
const INHERITED: &[&str] = &["namespace", "kubeconfig"];

fn str_prop(props: &Map<String, Value>, key: &str) -> Option<String> {
    props.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The simulator create parameters of `manager/kubernetes` (shaped like
/// VILLAScontroller's `etc/params_k8s_create.yaml`): the identity keys, plus
/// `properties.job` and `properties.schema` lifted to the simulator's
/// `job` and `schema`, plus the manager's namespace and kubeconfig.
pub(crate) fn simulator_spec(params: &Map<String, Value>, manager: &Map<String, Value>) -> Map<String, Value> {
    let mut spec: Map<String, Value> = params.iter().filter(|(k, _)| *k != "properties").map(clone_pair).collect();
    if let Some(Value::Object(p)) = params.get("properties") {
        spec.extend(p.iter().map(clone_pair));
    }
    finish_spec(spec, manager)
}

/// The simulator create parameters of `manager/kubernetes-simple`, from
/// VILLASweb's flat duplication parameters.
pub(crate) fn simple_simulator_spec(
    params: &Map<String, Value>,
    manager: &Map<String, Value>,
) -> Result<Map<String, Value>, ErrorInfo> {
    let job = simple_job_template(params)?;
    let mut spec: Map<String, Value> = params
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "name" | "location" | "realm" | "owner" | "uuid" | "description"))
        .map(clone_pair)
        .collect();
    spec.insert("job".into(), job);
    Ok(finish_spec(spec, manager))
}

fn clone_pair((k, v): (&String, &Value)) -> (String, Value) {
    (k.clone(), v.clone())
}

fn finish_spec(mut spec: Map<String, Value>, manager: &Map<String, Value>) -> Map<String, Value> {
    spec.insert("category".into(), "simulator".into());
    spec.insert("type".into(), "kubernetes".into());
    spec.entry("name").or_insert_with(|| "Kubernetes Simulator".into());
    for key in INHERITED {
        if let (false, Some(v)) = (spec.contains_key(*key), manager.get(*key)) {
            spec.insert((*key).to_owned(), v.clone());
        }
    }
    spec
}

/// Once every component is loaded: each Kubernetes manager deletes the
/// Jobs it once created for components that no longer exist (in the
/// background; failures are logged).
pub(crate) fn sweep_orphans(env: &Arc<Env>) {
    for handle in env.components.handles() {
        if handle.keys.category != "manager" || !handle.keys.kind.starts_with("kubernetes") {
            continue;
        }
        let env = env.clone();
        env.tracker.clone().spawn(async move {
            let Some(status) = handle.status().await else { return };
            let props = status["properties"].as_object().cloned().unwrap_or_default();
            let known: HashSet<Uuid> = env.components.managed_by(handle.uuid()).into_iter().collect();
            let (kubeconfig, namespace) = (str_prop(&props, "kubeconfig"), str_prop(&props, "namespace"));
            let sweep = crate::k8s::job::sweep_orphans(
                &env.kube,
                kubeconfig.as_deref(),
                namespace.as_deref(),
                handle.uuid(),
                &known,
            );
            tokio::select! {
                r = sweep => if let Err(e) = r {
                    warn!(manager = %handle.uuid(), error = %e.msg(), "cannot look for orphaned jobs");
                },
                _ = env.shutdown.cancelled() => {}
            }
        });
    }
}

/// The Kubernetes simulator driver: the job task of the current start (or
/// of the adopted Job), if any.
#[derive(Default)]
pub(super) struct Kubernetes {
    job: Option<JobRun>,
}

/// Where the component's Jobs live and who owns them.
fn job_target(cx: &Cx<'_>) -> Target {
    let pod = match (std::env::var("POD_NAME"), std::env::var("POD_UID")) {
        (Ok(name), Ok(uid)) if !name.is_empty() && !uid.is_empty() => Some((name, uid)),
        _ => None,
    };
    let props = &cx.core.properties;
    Target {
        kubeconfig: str_prop(props, "kubeconfig"),
        namespace: str_prop(props, "namespace"),
        owner: Owner {
            component: cx.core.keys.uuid,
            manager: cx.core.managed_by.unwrap_or(Uuid::nil()),
            name: str_prop(props, "name").unwrap_or_default(),
            location: str_prop(props, "location").unwrap_or_default(),
            realm: cx.core.keys.realm.clone(),
            pod,
        },
    }
}

impl Kubernetes {
    fn spawn_job(&mut self, cx: &Cx<'_>, mode: Mode) {
        let run = JobRun::spawn(&cx.env.tracker, cx.env.kube.clone(), job_target(cx), mode);
        // Replacing a run aborts its task; the Job itself stays.
        self.job = Some(run);
    }

    fn act(&mut self, mut cx: Cx<'_>, action: Action, req: &ActionRequest) -> Result<(), ErrorInfo> {
        // Refuse pause/resume without a watched Job before changing state.
        let suspend = match action {
            Action::Pause => Some(true),
            Action::Resume => Some(false),
            _ => None,
        };
        let target = if action == Action::Pause { State::Pausing } else { State::Resuming };
        if suspend.is_some() && self.job.is_none() && cx.core.state().can_transition_to(target) {
            return Err(ErrorInfo::new("No Job is being watched for this simulator"));
        }
        cx.begin(action)?;
        match action {
            Action::Start => {
                cx.show_transfers(&req.payload);
                cx.core.extra.insert("pod_names".into(), Value::Array(Vec::new()));
                let template = cx.core.properties.get("job").cloned().unwrap_or(Value::Null);
                let overlay = req.payload.get("job").or_else(|| req.parameters.get("job")).cloned();
                let payload = Value::Object(req.payload.clone());
                self.spawn_job(&cx, Mode::Start(Box::new(StartJob { template, overlay, payload })));
            }
            Action::Pause | Action::Resume => {
                let on = suspend.unwrap_or_default();
                if !self.job.as_ref().is_some_and(|j| j.send(JobCmd::Suspend(on))) {
                    return Err(ErrorInfo::new("No Job is being watched for this simulator"));
                }
            }
            Action::Stop | Action::Reset | Action::Shutdown => self.spawn_job(&cx, Mode::Cleanup),
            Action::Ping | Action::Create | Action::Delete => {}
        }
        Ok(())
    }
}

impl Driver for Kubernetes {
    /// After a (re)start of the daemon: watch the component's unfinished
    /// Job, if it has one.
    fn started<'a>(&'a mut self, cx: Cx<'a>) -> Fut<'a, bool> {
        self.spawn_job(&cx, Mode::Adopt);
        Box::pin(async { false })
    }

    fn act<'a>(&'a mut self, cx: Cx<'a>, action: Action, req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>> {
        Box::pin(std::future::ready(Kubernetes::act(self, cx, action, req)))
    }

    fn next_event(&mut self) -> Fut<'_, Event> {
        Box::pin(async {
            match JobRun::next(&mut self.job).await {
                Some(ev) => Event::Kubernetes(ev),
                None => std::future::pending().await,
            }
        })
    }

    /// Apply what the job task reported: the state change is the pure rule
    /// of `react::kubernetes`; this keeps the status fields in step.
    fn on_event(&mut self, cx: Cx<'_>, event: Event) -> bool {
        self.apply(cx, event);
        true
    }
    /// Delete the component's Job before the component goes away.
    fn remove<'a>(&'a mut self, cx: Cx<'a>) -> Fut<'a, ()> {
        self.spawn_job(&cx, Mode::Cleanup);
        let uuid = cx.core.keys.uuid;
        Box::pin(async move {
            let outcome = tokio::time::timeout(DELETE_TIMEOUT, JobRun::next(&mut self.job)).await;
            if !matches!(outcome, Ok(Some(JobEvent::Deleted))) {
                warn!(component = %uuid, ?outcome, "could not delete the component's Job");
            }
            self.job = None;
        })
    }
}

impl Kubernetes {
    fn apply(&mut self, mut cx: Cx<'_>, event: Event) {
        let Event::Kubernetes(ev) = event else { return };
        let adopting = self.job.as_ref().is_some_and(|j| j.adopting);
        let mut failure = ErrorInfo::new("The Kubernetes API failed");
        let core = &mut *cx.core;
        let rule = match ev {
            JobEvent::Watching { name, namespace } => {
                core.properties.insert("job_name".into(), name.into());
                core.properties.insert("namespace".into(), namespace.into());
                None
            }
            JobEvent::Observed { phase, pods } => {
                core.extra.insert("pod_names".into(), pods.into());
                match phase {
                    Phase::Running => Some(Rule::PhaseRunning),
                    Phase::Suspended => Some(Rule::PhaseSuspended),
                    Phase::Succeeded => Some(Rule::PhaseSucceeded),
                    Phase::Failed { reason, message } => {
                        failure = ErrorInfo::new(format!("Job failed: {reason}"))
                            .with("reason", reason)
                            .with("message", message);
                        Some(Rule::PhaseFailed)
                    }
                    Phase::Pending => None,
                }
            }
            JobEvent::Suspended(on) => Some(Rule::SuspendApplied(on)),
            JobEvent::Finished => {
                self.job = None;
                Some(Rule::Finished)
            }
            JobEvent::Vanished => {
                self.job = None;
                core.extra.insert("pod_names".into(), Value::Array(Vec::new()));
                failure = ErrorInfo::new("The Job was deleted outside busbar");
                Some(Rule::Vanished)
            }
            JobEvent::Deleted => {
                self.job = None;
                core.properties.shift_remove("job_name");
                core.extra.insert("pod_names".into(), Value::Array(Vec::new()));
                Some(Rule::Deleted)
            }
            JobEvent::Failed(info) => {
                self.job = None;
                failure = info;
                Some(Rule::ApiFailed)
            }
        };
        if let Some(rule) = rule {
            let reaction = react::kubernetes(cx.core.state(), rule, adopting);
            if reaction == Reaction::Fail {
                cx.env.metrics.error(match rule {
                    Rule::PhaseFailed => Fault::JobFailed,
                    Rule::Vanished => Fault::JobVanished,
                    _ => Fault::KubernetesApi,
                });
            }
            cx.react(reaction, || failure);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_kubernetes_manager_lifts_job_and_schema_and_hands_down_its_namespace() {
        let params = map(json!({
            "name": "kubernetes simulator", "location": "ACS lab", "realm": "de.rwth-aachen.eonerc.acs",
            "category": "simulator", "type": "kubernetes", "uuid": "c487a470-6af6-11eb-beee-7fa268050224",
            "properties": {"job": {"spec": {}}, "schema": {"start": {"type": "object"}}},
        }));
        let spec = simulator_spec(&params, &map(json!({"namespace": "lab", "kubeconfig": "/k"})));
        assert_eq!(spec["job"], json!({"spec": {}}));
        assert_eq!(spec["schema"], json!({"start": {"type": "object"}}));
        assert_eq!((spec["namespace"].as_str(), spec["kubeconfig"].as_str()), (Some("lab"), Some("/k")));
        assert!(!spec.contains_key("properties"));
        assert_eq!(spec["uuid"], "c487a470-6af6-11eb-beee-7fa268050224");
        // A namespace given at create wins over the manager's.
        let own = map(json!({"properties": {"job": {}, "namespace": "mine"}}));
        assert_eq!(simulator_spec(&own, &map(json!({"namespace": "lab"})))["namespace"], "mine");
        assert_eq!(simulator_spec(&own, &Map::new())["name"], "Kubernetes Simulator");
    }

    #[test]
    fn the_simple_manager_builds_the_job_from_flat_parameters() {
        let params = map(json!({"name": "DPsim user42", "image": "perl", "jobname": "j", "privileged": true,
            "category": "simulator", "type": "kubernetes", "activeDeadlineSeconds": "60"}));
        let spec = simple_simulator_spec(&params, &map(json!({"namespace": "lab"}))).unwrap();
        assert_eq!(spec["job"]["metadata"]["name"], "j");
        assert_eq!(spec["job"]["spec"]["activeDeadlineSeconds"], 60);
        assert_eq!(spec["namespace"], "lab");
        assert!(!spec.contains_key("image") && !spec.contains_key("jobname"), "{spec:?}");
        assert!(simple_simulator_spec(&Map::new(), &Map::new()).is_err());
    }
}
