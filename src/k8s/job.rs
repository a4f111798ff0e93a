//! The task behind one `simulator/kubernetes` component: it owns the API
//! calls and the watch of the component's Job, takes [`JobCmd`]s and reports
//! [`JobEvent`]s. The component task keeps the state and never waits on the
//! API server, so it answers pings while a call hangs.
//!
//! State comes from a `kube::runtime::watcher` on the Job itself, which
//! re-lists and re-watches with backoff when the stream breaks.

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Clients, Owner, Phase, api_error, payload_configmap, phase, start_job};
use crate::protocol::ErrorInfo;

/// Where the component's objects live.
#[derive(Debug, Clone)]
pub struct Target {
    /// The kubeconfig path (`None`: inferred).
    pub kubeconfig: Option<String>,
    /// The namespace (`None`: the client's default).
    pub namespace: Option<String>,
    /// Labels, annotations and owner of every object.
    pub owner: Owner,
}

/// What a task is started to do.
#[derive(Debug)]
pub enum Mode {
    /// Delete earlier objects, create the payload ConfigMap and the Job, then
    /// watch it.
    Start(Box<StartJob>),
    /// Find an unfinished Job of the component (after a restart) and watch it.
    Adopt,
    /// Delete every Job and ConfigMap of the component.
    Cleanup,
}

/// The inputs of a start.
#[derive(Debug)]
pub struct StartJob {
    /// `properties.job`.
    pub template: Value,
    /// The action's `job`, merged over the template.
    pub overlay: Option<Value>,
    /// The whole action payload, for `payload.json`.
    pub payload: Value,
}

/// What the component asks of a running task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobCmd {
    /// Set `spec.suspend`.
    Suspend(bool),
}

/// What the task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The Job exists (created or adopted) and is watched.
    Watching {
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// The Job's phase or pods changed.
    Observed {
        /// The phase.
        phase: Phase,
        /// Names of its pods, sorted.
        pods: Vec<String>,
    },
    /// `spec.suspend` was set to this.
    Suspended(bool),
    /// The Job succeeded and its payload ConfigMap is deleted.
    Finished,
    /// The Job was deleted by someone else.
    Vanished,
    /// Cleanup done: no Job or ConfigMap of the component is left.
    Deleted,
    /// An API call failed.
    Failed(ErrorInfo),
}

/// A running task, owned by the component. Dropping it aborts the task
/// (the Job itself is left alone: a restarted daemon adopts it).
pub struct JobRun {
    /// Watching a Job found at start-up (not one this run started): only
    /// then may the component jump from `idle` to what the Job does.
    pub adopting: bool,
    cmds: mpsc::Sender<JobCmd>,
    events: mpsc::Receiver<JobEvent>,
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for JobRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobRun")
    }
}

impl JobRun {
    /// Start a task on `tracker`.
    pub fn spawn(tracker: &tokio_util::task::TaskTracker, clients: Arc<Clients>, target: Target, mode: Mode) -> JobRun {
        let (cmds, cmd_rx) = mpsc::channel(4);
        let (tx, events) = mpsc::channel(16);
        let span = info_span!("job", component = %target.owner.component);
        let adopting = matches!(mode, Mode::Adopt);
        let task = tracker.spawn(run(clients, target, mode, cmd_rx, tx).instrument(span)).abort_handle();
        JobRun { adopting, cmds, events, task }
    }

    /// Ask the task to do `cmd`; `false` if it has ended.
    pub fn send(&self, cmd: JobCmd) -> bool {
        self.cmds.try_send(cmd).is_ok()
    }

    /// The next event; pending forever when there is no task, and `None`
    /// (clearing `run`) once the task has ended and said everything.
    pub async fn next(run: &mut Option<JobRun>) -> Option<JobEvent> {
        match run {
            Some(r) => {
                let ev = r.events.recv().await;
                if ev.is_none() {
                    *run = None;
                }
                ev
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for JobRun {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The API handles of one target.
struct Apis {
    jobs: Api<Job>,
    configmaps: Api<ConfigMap>,
    pods: Api<Pod>,
    namespace: String,
    owner: Owner,
}

impl Apis {
    async fn new(clients: &Clients, t: Target) -> Result<Apis, ErrorInfo> {
        let client = clients.get(t.kubeconfig.as_deref()).await?;
        let namespace = t.namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Apis {
            jobs: Api::namespaced(client.clone(), &namespace),
            configmaps: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client, &namespace),
            namespace,
            owner: t.owner,
        })
    }

    fn selector(&self) -> ListParams {
        ListParams::default().labels(&self.owner.selector())
    }

    /// Delete every Job (background propagation) and ConfigMap of the
    /// component; objects already gone are fine.
    async fn cleanup(&self) -> Result<(), ErrorInfo> {
        for job in self.jobs.list(&self.selector()).await.map_err(api_error)?.items {
            let name = job.metadata.name.unwrap_or_default();
            tolerate_404(self.jobs.delete(&name, &DeleteParams::background()).await.map(drop))?;
            info!(job = %name, "deleted job");
        }
        self.delete_configmaps().await
    }

    async fn delete_configmaps(&self) -> Result<(), ErrorInfo> {
        for cm in self.configmaps.list(&self.selector()).await.map_err(api_error)?.items {
            let name = cm.metadata.name.unwrap_or_default();
            tolerate_404(self.configmaps.delete(&name, &DeleteParams::default()).await.map(drop))?;
            debug!(configmap = %name, "deleted configmap");
        }
        Ok(())
    }

    /// Create the payload ConfigMap and the Job; the ConfigMap is then owned
    /// by the Job, so Kubernetes collects it with the Job.
    async fn create(&self, template: &Value, overlay: Option<&Value>, payload: &Value) -> Result<String, ErrorInfo> {
        self.cleanup().await?;
        let cm = payload_configmap(&self.owner, payload)?;
        let cm = self.configmaps.create(&PostParams::default(), &cm).await.map_err(api_error)?;
        let cm_name = cm.metadata.name.unwrap_or_default();
        let job = match start_job(template, overlay, &self.owner, &cm_name) {
            Ok(job) => job,
            Err(e) => {
                let _ = self.configmaps.delete(&cm_name, &DeleteParams::default()).await;
                return Err(e);
            }
        };
        let job = match self.jobs.create(&PostParams::default(), &job).await {
            Ok(job) => job,
            Err(e) => {
                let _ = self.configmaps.delete(&cm_name, &DeleteParams::default()).await;
                return Err(api_error(e));
            }
        };
        let name = job.metadata.name.unwrap_or_default();
        let owner_ref = json!({"metadata": {"ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job.metadata.uid.unwrap_or_default(),
        }]}});
        if let Err(e) = self.configmaps.patch(&cm_name, &PatchParams::default(), &Patch::Merge(owner_ref)).await {
            // Not fatal: stop and reset delete the ConfigMap by label anyway.
            warn!(configmap = %cm_name, error = %e, "cannot make the job own its payload configmap");
        }
        info!(job = %name, namespace = %self.namespace, configmap = %cm_name, "created job");
        Ok(name)
    }

    /// The newest unfinished Job of the component, if any.
    async fn adopt(&self) -> Result<Option<String>, ErrorInfo> {
        let mut jobs: Vec<Job> = self
            .jobs
            .list(&self.selector())
            .await
            .map_err(api_error)?
            .items
            .into_iter()
            .filter(|j| !phase(j).is_finished())
            .collect();
        jobs.sort_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp));
        Ok(jobs.pop().and_then(|j| j.metadata.name))
    }

    async fn suspend(&self, name: &str, on: bool) -> Result<(), ErrorInfo> {
        let patch = Patch::Merge(json!({"spec": {"suspend": on}}));
        self.jobs.patch(name, &PatchParams::default(), &patch).await.map(drop).map_err(api_error)
    }

    async fn pod_names(&self, job: &str) -> Result<Vec<String>, ErrorInfo> {
        let pods =
            self.pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await.map_err(api_error)?;
        let mut names: Vec<String> = pods.items.into_iter().filter_map(|p| p.metadata.name).collect();
        names.sort();
        Ok(names)
    }
}

/// Delete the Jobs (and payload ConfigMaps) of `manager` whose component
/// is not in `known`: left behind by a component deleted while the daemon
/// was down, they would otherwise run unseen. Returns the deleted Jobs.
pub async fn sweep_orphans(
    clients: &Clients,
    kubeconfig: Option<&str>,
    namespace: Option<&str>,
    manager: uuid::Uuid,
    known: &std::collections::HashSet<uuid::Uuid>,
) -> Result<Vec<String>, ErrorInfo> {
    let client = clients.get(kubeconfig).await?;
    let ns = namespace.map_or_else(|| client.default_namespace().to_owned(), str::to_owned);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &ns);
    let by_manager = ListParams::default().labels(&format!("{}/ic-manager-uuid={manager}", super::LABEL_PREFIX));
    let ic_of = |labels: &Option<std::collections::BTreeMap<String, String>>| {
        labels.as_ref().and_then(|l| l.get(&format!("{}/ic-uuid", super::LABEL_PREFIX))).cloned()
    };
    let orphan = |ic: &Option<String>| ic.as_deref().and_then(|s| s.parse().ok()).is_none_or(|u| !known.contains(&u));
    let mut deleted = Vec::new();
    for job in jobs.list(&by_manager).await.map_err(api_error)?.items {
        if orphan(&ic_of(&job.metadata.labels)) {
            let name = job.metadata.name.unwrap_or_default();
            tolerate_404(jobs.delete(&name, &DeleteParams::background()).await.map(drop))?;
            warn!(job = %name, namespace = %ns, "deleted a job whose component no longer exists");
            deleted.push(name);
        }
    }
    for cm in configmaps.list(&by_manager).await.map_err(api_error)?.items {
        if orphan(&ic_of(&cm.metadata.labels)) {
            let name = cm.metadata.name.unwrap_or_default();
            tolerate_404(configmaps.delete(&name, &DeleteParams::default()).await.map(drop))?;
        }
    }
    Ok(deleted)
}

fn tolerate_404(r: Result<(), kube::Error>) -> Result<(), ErrorInfo> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map_err(api_error),
    }
}

async fn run(
    clients: Arc<Clients>,
    target: Target,
    mode: Mode,
    mut cmds: mpsc::Receiver<JobCmd>,
    tx: mpsc::Sender<JobEvent>,
) {
    let report = |ev: JobEvent| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ev).await;
        }
    };
    let apis = match Apis::new(&clients, target).await {
        Ok(a) => a,
        Err(e) => return report(JobEvent::Failed(e)).await,
    };
    let name = match mode {
        Mode::Cleanup => {
            return report(apis.cleanup().await.map_or_else(JobEvent::Failed, |()| JobEvent::Deleted)).await;
        }
        Mode::Start(s) => match apis.create(&s.template, s.overlay.as_ref(), &s.payload).await {
            Ok(name) => name,
            Err(e) => return report(JobEvent::Failed(e)).await,
        },
        Mode::Adopt => match apis.adopt().await {
            Ok(Some(name)) => {
                info!(job = %name, "adopted job");
                name
            }
            Ok(None) => return,
            Err(e) => return report(JobEvent::Failed(e)).await,
        },
    };
    report(JobEvent::Watching { name: name.clone(), namespace: apis.namespace.clone() }).await;
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut watch = watcher(apis.jobs.clone(), config).default_backoff().boxed();
    let mut last: Option<JobEvent> = None;
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return,
                Some(JobCmd::Suspend(on)) => match apis.suspend(&name, on).await {
                    Ok(()) => report(JobEvent::Suspended(on)).await,
                    Err(e) => return report(JobEvent::Failed(e)).await,
                },
            },
            ev = watch.next() => match ev {
                Some(Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job))) => {
                    let phase = phase(&job);
                    let pods = match apis.pod_names(&name).await {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(error = %e.msg(), "cannot list the job's pods");
                            Vec::new()
                        }
                    };
                    let ev = JobEvent::Observed { phase: phase.clone(), pods };
                    if last.as_ref() != Some(&ev) {
                        debug!(job = %name, ?phase, "job changed");
                        last = Some(ev.clone());
                        report(ev).await;
                    }
                    match phase {
                        Phase::Succeeded => {
                            if let Err(e) = apis.delete_configmaps().await {
                                warn!(error = %e.msg(), "cannot delete the payload configmap");
                            }
                            return report(JobEvent::Finished).await;
                        }
                        // Kept for inspection until reset deletes it.
                        Phase::Failed { .. } => return,
                        _ => {}
                    }
                }
                Some(Ok(watcher::Event::Delete(_))) => return report(JobEvent::Vanished).await,
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                // The watcher re-lists and re-watches with backoff by itself.
                Some(Err(e)) => warn!(job = %name, error = %e, "job watch failed; retrying"),
                None => return,
            },
        }
    }
}
