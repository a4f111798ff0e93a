//! The process driver: each `start` runs one child process group.
//!
//! The component task keeps the state; a run task per start ([`run`])
//! does the slow I/O (model download, spawn, wait) and reports
//! [`RunEvent`]s back, so the component answers pings and `stop`/`reset`
//! while a model downloads or a simulation runs. The command line is pure
//! templating ([`command`]), the transfers are HTTP ([`transfer`]), and
//! every state change is the rule of `react::process`.

mod command;
mod run;
mod transfer;

pub(crate) use run::RunEvent;

use nix::sys::signal::Signal;
use serde_json::Value;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use super::{Driver, Event, Fut};
use crate::component::core::Cx;
use crate::component::kinds::ProcessSpec;
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::react::{self, ProcessEvent, Reaction};
use crate::state::Action;
use run::{Ending, Launch, Run, signal_name};

/// Seconds between SIGTERM and SIGKILL unless the type or component says.
const DEFAULT_GRACE: f64 = 5.0;

pub(super) struct Process {
    /// The type's fixed settings (from its manifest).
    spec: ProcessSpec,
    /// The current run, if any.
    run: Option<Box<Run>>,
}

/// Apply the process rule for `event` (see `react::process`).
fn on_process(cx: &mut Cx<'_>, event: ProcessEvent, failure: impl FnOnce() -> ErrorInfo) -> Reaction {
    let reaction = react::process(cx.core.state(), event);
    cx.react(reaction, failure);
    reaction
}

/// For rules that cannot fail on this event.
fn no_failure() -> ErrorInfo {
    ErrorInfo::new("Internal error: a process rule failed where it cannot")
}

impl Process {
    pub(super) fn new(spec: ProcessSpec) -> Self {
        Process { spec, run: None }
    }

    /// Seconds between SIGTERM and SIGKILL: the component's `grace`, the
    /// type's, or [`DEFAULT_GRACE`].
    fn grace(&self, cx: &Cx<'_>) -> Duration {
        let secs = cx.core.properties.get("grace").and_then(Value::as_f64).or(self.spec.grace).unwrap_or(DEFAULT_GRACE);
        Duration::from_secs_f64(secs.clamp(0.0, 3600.0))
    }

    /// End the run as asked: signal a running group (SIGKILL on `reset`;
    /// SIGTERM, then SIGKILL after the grace period, on `stop`), or, when
    /// nothing runs yet, drop the run and settle at once.
    fn end(&mut self, cx: &mut Cx<'_>, ending: Ending) {
        let grace = self.grace(cx);
        match &mut self.run {
            Some(run) if run.pgid.is_some() => {
                run.ending = Some(ending);
                run.signal(Signal::SIGCONT);
                if ending == Ending::Stop {
                    run.signal(Signal::SIGTERM);
                    run.kill_at = Some(Instant::now() + grace);
                } else {
                    run.signal(Signal::SIGKILL);
                }
            }
            _ => {
                self.run = None;
                on_process(cx, ProcessEvent::NothingRuns, no_failure);
            }
        }
    }

    fn act(&mut self, mut cx: Cx<'_>, action: Action, req: &ActionRequest) -> Result<(), ErrorInfo> {
        cx.begin(action)?;
        match action {
            Action::Start => self.start(&mut cx, req)?,
            Action::Stop => self.end(&mut cx, Ending::Stop),
            Action::Reset => self.end(&mut cx, Ending::Reset),
            Action::Pause | Action::Resume => {
                let sig = if action == Action::Pause { Signal::SIGSTOP } else { Signal::SIGCONT };
                if let Some(run) = &self.run {
                    run.signal(sig);
                }
                on_process(&mut cx, ProcessEvent::Signalled, no_failure);
            }
            Action::Shutdown => {
                self.run = None;
                on_process(&mut cx, ProcessEvent::NothingRuns, no_failure);
            }
            Action::Ping | Action::Create | Action::Delete => {}
        }
        Ok(())
    }

    fn start(&mut self, cx: &mut Cx<'_>, req: &ActionRequest) -> Result<(), ErrorInfo> {
        let model = req.payload.get("model").cloned().unwrap_or(Value::Null);
        let results = req.payload.get("results").cloned().unwrap_or(Value::Null);
        // The status shows them without tokens or URL passwords; the run
        // keeps them as given.
        cx.show_transfers(&req.payload);
        cx.core.extra.insert("return_code".into(), Value::Null);
        cx.core.extra.shift_remove("pid");
        cx.core.extra.shift_remove("recovered");
        let cmd = command::command_line(&self.spec, req, &cx.core.driver_properties())
            .inspect_err(|_| cx.env.metrics.error(Fault::RefusedCommand))?;
        let env = cx.env;
        let dir =
            env.settings.data_dir.join("runs").join(cx.core.keys.uuid.to_string()).join(Uuid::new_v4().to_string());
        let (tx, events) = mpsc::channel(8);
        let launch = Launch { cmd, dir: dir.clone(), model, tx: tx.clone(), token: env.shutdown.clone() };
        let task = env.tracker.spawn(run::run_task(launch)).abort_handle();
        info!(run_dir = %dir.display(), "starting process");
        let record = (env.store.clone(), cx.core.keys.uuid);
        self.run =
            Some(Box::new(Run { pgid: None, events, tx, dir, results, ending: None, kill_at: None, task, record }));
        Ok(())
    }

    fn on_exit(&mut self, mut cx: Cx<'_>, status: ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        let ending = self.run.as_ref().and_then(|r| r.ending);
        cx.core.extra.shift_remove("pid");
        cx.core.extra.insert("return_code".into(), status.code().map_or(Value::Null, Value::from));
        info!(component = %cx.core.keys.uuid, ?status, ?ending, "process exited");
        if ending.is_some() {
            self.run = None;
            on_process(&mut cx, ProcessEvent::ExitedAsAsked, no_failure);
            return;
        }
        let failure = match (status.code(), status.signal()) {
            (Some(0), _) => {
                on_process(&mut cx, ProcessEvent::ExitedOk, no_failure);
                if cx.core.results.is_null() {
                    self.run = None;
                    on_process(&mut cx, ProcessEvent::ResultsDone, no_failure);
                } else if let Some(run) = &mut self.run {
                    let (tx, results, dir) = (run.tx.clone(), run.results.clone(), run.dir.clone());
                    run.task = cx
                        .env
                        .tracker
                        .spawn(async move {
                            let r = transfer::upload_results(results, dir).await;
                            let _ = tx.send(RunEvent::Uploaded(r)).await;
                        })
                        .abort_handle();
                }
                return;
            }
            (Some(code), _) => {
                cx.env.metrics.error(Fault::ProcessExit);
                ErrorInfo::new("Child process exited").with("code", code)
            }
            (None, Some(sig)) => {
                cx.env.metrics.error(Fault::ProcessSignal);
                ErrorInfo::new("Child process caught signal").with("signal", sig).with("signal_name", signal_name(sig))
            }
            (None, None) => ErrorInfo::new("Child process ended"),
        };
        self.run = None;
        on_process(&mut cx, ProcessEvent::ExitedBadly, || failure);
    }
}

impl Process {
    /// After a crash of the daemon (`kill -9`), the child it left running:
    /// found by its recorded process group and run directory, and stopped
    /// (its outcome is unknown, and nothing here can follow it). The
    /// status says so in `recovered`. Returns whether there was one.
    fn recover(cx: &mut Cx<'_>) -> bool {
        let (uuid, store) = (cx.core.keys.uuid, &cx.env.store);
        let Ok(Some((pgid, dir))) = store.run_of(uuid) else { return false };
        if let Err(e) = store.delete_run(uuid) {
            warn!(component = %uuid, error = %e, "cannot forget the recorded run");
        }
        if !run::group_runs_in(pgid, &dir) {
            return false;
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGCONT);
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
        warn!(component = %uuid, pgid, run_dir = %dir.display(), "stopped a process group left running by a daemon that ended without stopping it");
        let msg =
            "A process left running when the daemon last ended (killed or crashed) was stopped; its outcome is unknown";
        cx.core.extra.insert(
            "recovered".into(),
            serde_json::json!({"action": "stopped", "pgid": pgid, "run_dir": dir, "msg": msg}),
        );
        true
    }
}

impl Driver for Process {
    /// A daemon restarted after a crash stops what the last one left running.
    fn started<'a>(&'a mut self, mut cx: Cx<'a>) -> Fut<'a, bool> {
        let recovered = Self::recover(&mut cx);
        Box::pin(std::future::ready(recovered))
    }

    fn act<'a>(&'a mut self, cx: Cx<'a>, action: Action, req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>> {
        Box::pin(std::future::ready(Process::act(self, cx, action, req)))
    }

    fn next_event(&mut self) -> Fut<'_, Event> {
        Box::pin(async {
            match Run::next(&mut self.run).await {
                Some(ev) => Event::Process(ev),
                None => std::future::pending().await,
            }
        })
    }

    /// Apply what the run reported. The state change is the pure rule of
    /// `react::process`; this keeps the run and the status fields in step.
    fn on_event(&mut self, cx: Cx<'_>, event: Event) -> bool {
        self.apply(cx, event);
        true
    }
    /// The SIGKILL deadline after a SIGTERM.
    fn deadline(&self) -> Option<Instant> {
        self.run.as_ref().and_then(|r| r.kill_at)
    }

    /// The grace period after SIGTERM ran out: kill the group.
    fn on_deadline(&mut self, cx: Cx<'_>, now: Instant) -> bool {
        if let Some(run) = &mut self.run
            && run.kill_at.is_some_and(|at| at <= now)
        {
            run.kill_at = None;
            warn!(component = %cx.core.keys.uuid, "process ignored SIGTERM; killing its group");
            run.signal(Signal::SIGKILL);
        }
        false
    }
}

impl Process {
    fn apply(&mut self, mut cx: Cx<'_>, event: Event) {
        let Event::Process(ev) = event else { return };
        match ev {
            RunEvent::Spawned(pid) => {
                if let Some(r) = self.run.as_mut() {
                    r.pgid = Some(pid);
                    if let Err(e) = cx.env.store.put_run(cx.core.keys.uuid, pid, &r.dir) {
                        warn!(component = %cx.core.keys.uuid, error = %e, "cannot record the run in the store");
                    }
                }
                cx.core.extra.insert("pid".into(), pid.into());
                if on_process(&mut cx, ProcessEvent::Spawned, no_failure) == Reaction::Kill
                    && let Some(r) = &mut self.run
                {
                    // A stop or reset arrived while it was being prepared.
                    r.ending.get_or_insert(Ending::Reset);
                    r.signal(Signal::SIGKILL);
                }
            }
            RunEvent::Failed(info) => {
                self.run = None;
                if on_process(&mut cx, ProcessEvent::SpawnFailed, || info) == Reaction::Fail {
                    cx.env.metrics.error(Fault::Process);
                }
            }
            RunEvent::Exited(status) => self.on_exit(cx, status),
            RunEvent::Uploaded(result) => {
                self.run = None;
                match result {
                    Ok(()) => {
                        on_process(&mut cx, ProcessEvent::ResultsDone, no_failure);
                    }
                    Err(info) => {
                        cx.env.metrics.error(Fault::Upload);
                        on_process(&mut cx, ProcessEvent::UploadFailed, || info);
                    }
                }
            }
        }
    }
}
