//! The run of one `start`: a task that prepares the run directory,
//! downloads the model, spawns the child in its own process group and
//! waits for it, reporting [`RunEvent`]s to the component. The [`Run`]
//! handle the component keeps signals the group, and kills it when
//! dropped (reset, delete, daemon shutdown): nothing outlives its run.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use super::command::CommandLine;
use super::transfer::download_model;
use crate::protocol::ErrorInfo;

/// The variable every child gets with its run directory: how a restarted
/// daemon recognises a process group it left running.
pub(super) const RUN_DIR_ENV: &str = "BUSBAR_RUN_DIR";

/// Environment variables a child inherits from the daemon; everything else
/// (credentials such as `AMQP_URL` included) stays out.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// What a run reports to its component.
#[derive(Debug)]
pub(crate) enum RunEvent {
    /// The child runs, as process group `pid`.
    Spawned(i32),
    /// The child ended.
    Exited(ExitStatus),
    /// Preparing or spawning failed.
    Failed(ErrorInfo),
    /// The results upload finished.
    Uploaded(Result<(), ErrorInfo>),
}

/// Why the run is being ended by us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Stop,
    Reset,
}

/// The current run of a process component.
pub(super) struct Run {
    pub(super) pgid: Option<i32>,
    pub(super) events: mpsc::Receiver<RunEvent>,
    pub(super) tx: mpsc::Sender<RunEvent>,
    pub(super) dir: PathBuf,
    /// Where to upload the results, as given (token included).
    pub(super) results: Value,
    pub(super) ending: Option<Ending>,
    /// SIGKILL deadline after a SIGTERM.
    pub(super) kill_at: Option<Instant>,
    pub(super) task: tokio::task::AbortHandle,
    /// Where the running group is recorded (so that a daemon restarted
    /// after a crash finds it), and for which component.
    pub(super) record: (crate::store::Store, uuid::Uuid),
}

impl Run {
    pub(super) fn signal(&self, sig: Signal) {
        if let Some(pg) = self.pgid
            && let Err(e) = killpg(Pid::from_raw(pg), sig)
        {
            warn!(pgid = pg, signal = %sig, error = %e, "cannot signal process group");
        }
    }

    /// The next event; pending forever when there is no run.
    pub(super) async fn next(run: &mut Option<Box<Run>>) -> Option<RunEvent> {
        match run {
            Some(r) => r.events.recv().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.task.abort();
        // The group may still run (reset, delete, shutdown): nothing outlives us.
        if let Some(pg) = self.pgid {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGCONT);
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
            let (store, component) = &self.record;
            if let Err(e) = store.delete_run(*component) {
                warn!(%component, error = %e, "cannot forget the ended run in the store");
            }
        }
    }
}

/// The signal name for `sig` (`SIGKILL`), or its number.
pub(super) fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map(|s| s.as_str().to_owned()).unwrap_or_else(|_| sig.to_string())
}

/// Everything a run task needs, moved into it.
pub(super) struct Launch {
    pub cmd: CommandLine,
    pub dir: PathBuf,
    pub model: Value,
    pub tx: mpsc::Sender<RunEvent>,
    pub token: tokio_util::sync::CancellationToken,
}

pub(super) async fn run_task(l: Launch) {
    let Launch { mut cmd, dir, model, tx, token } = l;
    let report = |e: ErrorInfo| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(RunEvent::Failed(e)).await;
        }
    };
    for sub in ["model", "results", "logs"] {
        if let Err(e) = tokio::fs::create_dir_all(dir.join(sub)).await {
            return report(ErrorInfo::new(format!("Cannot create the run directory: {e}"))).await;
        }
    }
    if !model.is_null() {
        match download_model(&model, &dir.join("model")).await {
            Ok(paths) => {
                let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                let mut args = Vec::new();
                for a in cmd.args.drain(..) {
                    if a == "%MODEL%" || a == "%PATH%" {
                        args.extend(shown.iter().cloned());
                    } else {
                        let first = shown.first().cloned().unwrap_or_default();
                        args.push(a.replace("%MODEL%", &first).replace("%PATH%", &first));
                    }
                }
                cmd.args = args;
            }
            Err(e) => return report(e).await,
        }
    } else {
        cmd.args.retain(|a| a != "%MODEL%" && a != "%PATH%");
    }
    let logs = dir.join("logs");
    let open = |p: PathBuf| std::fs::OpenOptions::new().create(true).append(true).open(p);
    let inside = |rel: &Option<String>, what: &str| -> Result<Option<PathBuf>, ErrorInfo> {
        let Some(rel) = rel else { return Ok(None) };
        let path = crate::sandbox::confine(&dir, rel, what)?;
        crate::sandbox::check_inside(&dir, &path, what)?;
        Ok(Some(path))
    };
    let (stdout_path, cwd) =
        match (inside(&cmd.stdout_logfile, "stdout_logfile"), inside(&cmd.cwd, "working_directory")) {
            (Ok(out), Ok(cwd)) => (out.unwrap_or_else(|| logs.join("stdout.log")), cwd.unwrap_or_else(|| dir.clone())),
            (Err(e), _) | (_, Err(e)) => return report(e).await,
        };
    let (stdout, stderr) = match (open(stdout_path), open(logs.join("stderr.log"))) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return report(ErrorInfo::new(format!("Cannot open the log files: {e}"))).await,
    };
    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env_clear()
        .envs(INHERITED_ENV.iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))))
        .envs(cmd.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(RUN_DIR_ENV, &dir)
        .current_dir(cwd)
        .stdin(if cmd.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return report(
                ErrorInfo::new(format!("Cannot start process: {e}"))
                    .with("executable", cmd.program.as_str())
                    .with("os_error", e.raw_os_error().map_or(Value::Null, Value::from)),
            )
            .await;
        }
    };
    let pid = child.id().map_or(0, |p| p as i32);
    let _ = tx.send(RunEvent::Spawned(pid)).await;
    if let (Some(data), Some(mut stdin)) = (cmd.stdin, child.stdin.take()) {
        // A child that does not read its input must not block us.
        let _ = tokio::time::timeout(Duration::from_secs(5), stdin.write_all(&data)).await;
    }
    tokio::select! {
        status = child.wait() => match status {
            Ok(s) => {
                let _ = tx.send(RunEvent::Exited(s)).await;
            }
            Err(e) => report(ErrorInfo::new(format!("Cannot wait for the process: {e}"))).await,
        },
        _ = token.cancelled() => {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
}

/// Whether any process of group `pgid` still runs with `dir` as its run
/// directory (a pgid alone may have been reused by another program).
pub(super) fn group_runs_in(pgid: i32, dir: &std::path::Path) -> bool {
    let want = [RUN_DIR_ENV.as_bytes(), b"=", dir.as_os_str().as_encoded_bytes()].concat();
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    procs.flatten().any(|p| {
        let path = p.path();
        let in_group = std::fs::read_to_string(path.join("stat")).ok().and_then(|stat| {
            // `pid (comm) state ppid pgrp …`; comm may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            rest.split_whitespace().nth(2)?.parse::<i32>().ok()
        }) == Some(pgid);
        in_group && std::fs::read(path.join("environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_have_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
    }
}
