//! The process driver: each `start` runs one child process group.
//!
//! The component task keeps the state; a run task per start does the slow
//! I/O (model download, spawn, wait) and reports [`RunEvent`]s back, so the
//! component answers pings and `stop`/`reset` while a model downloads or a
//! simulation runs. Children live in their own process group, so signals
//! reach everything they spawn, and the whole group is killed when the run
//! is dropped (reset, delete, daemon shutdown).

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use regex::Regex;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use super::Component;
use super::kinds::{ArgItem, Driver, ProcessSpec, Stdin, placeholders};
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::react::{self, ProcessEvent, Reaction};
use crate::state::Action;

/// Seconds between SIGTERM and SIGKILL unless the type or component says.
const DEFAULT_GRACE: f64 = 5.0;

/// Environment variables a child inherits from the daemon; everything else
/// (credentials such as `AMQP_URL` included) stays out.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// What a run reports to its component.
#[derive(Debug)]
pub(super) enum RunEvent {
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
enum Ending {
    Stop,
    Reset,
}

/// The current run of a process component.
pub(super) struct Run {
    pgid: Option<i32>,
    events: mpsc::Receiver<RunEvent>,
    tx: mpsc::Sender<RunEvent>,
    dir: PathBuf,
    /// Where to upload the results, as given (token included).
    results: Value,
    ending: Option<Ending>,
    /// SIGKILL deadline after a SIGTERM.
    pub(super) kill_at: Option<Instant>,
    task: tokio::task::AbortHandle,
}

impl Run {
    fn signal(&self, sig: Signal) {
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
        }
    }
}

/// A fully resolved command line.
#[derive(Debug, Clone, PartialEq)]
struct CommandLine {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdout_logfile: Option<String>,
    stdin: Option<Vec<u8>>,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn env_pairs(v: Option<&Value>) -> Vec<(String, String)> {
    match v {
        Some(Value::Object(m)) => m.iter().filter_map(|(k, v)| Some((k.clone(), scalar(v)?))).collect(),
        Some(Value::Array(a)) => {
            a.iter().filter_map(|i| i.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect()
        }
        _ => Vec::new(),
    }
}

/// Expand `{{start.KEY}}` / `{{properties.KEY}}`; `None` if one has no value.
fn expand(t: &str, start: &Map<String, Value>, props: &Map<String, Value>) -> Option<String> {
    let mut out = t.to_owned();
    for name in placeholders(t) {
        let value = match name.split_once('.') {
            Some(("start", k)) => start.get(k).and_then(scalar),
            Some(("properties", k)) => props.get(k).and_then(scalar),
            _ => None,
        }?;
        out = out.replacen(&format!("{{{{{name}}}}}"), &value, 1);
        // Tolerate spaces inside the braces as placeholders() does.
        out = out.replace(&format!("{{{{ {name} }}}}"), &value);
    }
    Some(out)
}

/// Resolve the command of a start; every refusal is a clear error.
fn command_line(spec: &ProcessSpec, req: &ActionRequest, props: &Map<String, Value>) -> Result<CommandLine, ErrorInfo> {
    let p = &req.parameters;
    let stdin = match spec.stdin {
        Stdin::None => None,
        Stdin::Parameters => Some(serde_json::to_vec(&Value::Object(p.clone())).unwrap_or_default()),
        Stdin::Payload => Some(serde_json::to_vec(&Value::Object(req.payload.clone())).unwrap_or_default()),
    };
    if !spec.from_parameters {
        let program = spec.executable.clone().unwrap_or_default();
        let mut args = Vec::new();
        for item in &spec.argv {
            match item {
                ArgItem::One(t) => args.push(expand(t, p, props).ok_or_else(|| {
                    ErrorInfo::new("Missing parameter for the command line").with("template", t.as_str())
                })?),
                ArgItem::Group(g) => {
                    if let Some(expanded) = g.iter().map(|t| expand(t, p, props)).collect::<Option<Vec<_>>>() {
                        args.extend(expanded);
                    }
                }
            }
        }
        let env = spec.environment.iter().filter_map(|(k, t)| Some((k.clone(), expand(t, p, props)?))).collect();
        return Ok(CommandLine { program, args, env, cwd: None, stdout_logfile: None, stdin });
    }
    // The generic simulator: the start parameters choose, the properties gate.
    let executable = p.get("executable").and_then(Value::as_str).unwrap_or_default().to_owned();
    crate::sandbox::check_executable(&executable)?;
    let argv: Vec<String> =
        p.get("argv").and_then(Value::as_array).map(|a| a.iter().filter_map(scalar).collect()).unwrap_or_default();
    let patterns: Vec<&str> = props
        .get("whitelist")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let allowed =
        patterns.iter().any(|pat| Regex::new(&format!("^(?:{pat})")).is_ok_and(|re| re.is_match(&executable)));
    if !allowed {
        return Err(ErrorInfo::new("Executable is not whitelisted for this simulator").with("executable", executable));
    }
    let (program, args) = if p.get("shell").and_then(Value::as_bool).unwrap_or(false) {
        if props.get("shell").and_then(Value::as_bool) != Some(true) {
            return Err(ErrorInfo::new("Shell execution is not allowed for this simulator"));
        }
        // The executable is quoted: it is what the whitelist allowed, so it
        // must be the program the shell runs (`/bin/echo; rm -rf /` would
        // otherwise pass a `^/bin/echo` whitelist), and a path with spaces
        // stays one word. The arguments stay shell syntax, as the component
        // allows a shell.
        let line = std::iter::once(shell_quote(&executable)).chain(argv).collect::<Vec<_>>().join(" ");
        ("/bin/sh".to_owned(), vec!["-c".to_owned(), line])
    } else {
        (executable, argv)
    };
    let env = env_pairs(p.get("environment"));
    crate::sandbox::check_env(&env, props)?;
    // Checked here against any base (they must be relative and plain), and
    // again against the real run directory once it exists.
    let path = |key: &str| -> Result<Option<String>, ErrorInfo> {
        match p.get(key).and_then(Value::as_str) {
            Some(rel) => crate::sandbox::confine(Path::new("/"), rel, key).map(|_| Some(rel.to_owned())),
            None => Ok(None),
        }
    };
    Ok(CommandLine {
        program,
        args,
        env,
        cwd: path("working_directory")?,
        stdout_logfile: path("stdout_logfile")?,
        stdin,
    })
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The signal name for `sig` (`SIGKILL`), or its number.
fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map(|s| s.as_str().to_owned()).unwrap_or_else(|_| sig.to_string())
}

fn http() -> Result<&'static reqwest::Client, ErrorInfo> {
    crate::http::client().map_err(|e| ErrorInfo::new(format!("HTTP client unavailable: {e}")))
}

fn with_token(rb: reqwest::RequestBuilder, spec: &Value) -> reqwest::RequestBuilder {
    match spec.get("token").and_then(Value::as_str) {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
}

/// Download `model` (`{type: url|url-list, url, token?}`) into `dir`;
/// zips are extracted. Returns one path per URL.
async fn download_model(model: &Value, dir: &Path) -> Result<Vec<PathBuf>, ErrorInfo> {
    let urls: Vec<String> = match model.get("url") {
        Some(Value::String(u)) => vec![u.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect(),
        _ => return Err(ErrorInfo::new("Model has no url")),
    };
    let client = http()?;
    let mut paths = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let shown = crate::config::redact_url(url);
        let fail = |msg: String| {
            ErrorInfo::new(format!("Model download failed: {}", msg.replace(url.as_str(), &shown)))
                .with("url", shown.as_str())
        };
        let resp = with_token(client.get(url), model).send().await.map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {}", status.as_u16())).with("status", status.as_u16()));
        }
        let bytes = resp.bytes().await.map_err(|e| fail(e.to_string()))?;
        let name = url
            .rsplit('/')
            .next()
            .map(|n| n.split(['?', '#']).next().unwrap_or(n))
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("model-{i}"));
        if bytes.starts_with(b"PK\x03\x04") {
            let target = dir.join(name.trim_end_matches(".zip"));
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| fail(e.to_string()))?;
            archive.extract(&target).map_err(|e| fail(e.to_string()))?;
            paths.push(target);
        } else {
            let target = dir.join(&name);
            tokio::fs::write(&target, &bytes).await.map_err(|e| fail(e.to_string()))?;
            paths.push(target);
        }
    }
    Ok(paths)
}

/// Zip `results/` and `logs/` of `run_dir` and POST it as multipart.
async fn upload_results(results: Value, run_dir: PathBuf) -> Result<(), ErrorInfo> {
    let url =
        results.get("url").and_then(Value::as_str).ok_or_else(|| ErrorInfo::new("Results have no url"))?.to_owned();
    let shown = crate::config::redact_url(&url);
    let fail = |msg: String| {
        ErrorInfo::new(format!("Results upload failed: {}", msg.replace(url.as_str(), &shown)))
            .with("url", shown.as_str())
    };
    let dir = run_dir.clone();
    let zipped = tokio::task::spawn_blocking(move || zip_dirs(&dir, &["results", "logs"]))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
    let part = reqwest::multipart::Part::bytes(zipped)
        .file_name("results.zip")
        .mime_str("application/zip")
        .map_err(|e| fail(e.to_string()))?;
    let form = reqwest::multipart::Form::new().part("file", part);
    let resp =
        with_token(http()?.post(&url), &results).multipart(form).send().await.map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("HTTP {}", status.as_u16())).with("status", status.as_u16()))
    }
}

fn zip_dirs(base: &Path, dirs: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| base.join(d)).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(base) {
                zip.start_file(rel.to_string_lossy(), opts).map_err(std::io::Error::other)?;
                zip.write_all(&std::fs::read(&path)?)?;
            }
        }
    }
    Ok(zip.finish().map_err(std::io::Error::other)?.into_inner())
}

/// Everything a run task needs, moved into it.
struct Launch {
    cmd: CommandLine,
    dir: PathBuf,
    model: Value,
    tx: mpsc::Sender<RunEvent>,
    token: tokio_util::sync::CancellationToken,
}

async fn run_task(l: Launch) {
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
        .env("BUSBAR_RUN_DIR", &dir)
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

impl Component {
    fn process_spec(&self) -> Option<&ProcessSpec> {
        match &self.kind.driver {
            Driver::Process(p) => Some(p),
            _ => None,
        }
    }

    fn grace(&self) -> Duration {
        let secs = self
            .properties
            .get("grace")
            .and_then(Value::as_f64)
            .or_else(|| self.process_spec().and_then(|p| p.grace))
            .unwrap_or(DEFAULT_GRACE);
        Duration::from_secs_f64(secs.clamp(0.0, 3600.0))
    }

    /// Apply the process rule for `event` (see `react::process`).
    fn on_process(&mut self, event: ProcessEvent, failure: impl FnOnce() -> ErrorInfo) -> Reaction {
        let reaction = react::process(self.lifecycle.state(), event);
        self.react(reaction, failure);
        reaction
    }

    /// Run a process action.
    pub(super) fn process(&mut self, action: Action, req: &ActionRequest) -> Result<(), ErrorInfo> {
        self.begin(action)?;
        let grace = self.grace();
        match action {
            Action::Start => self.start_process(req)?,
            Action::Stop => match &mut self.run {
                Some(run) if run.pgid.is_some() => {
                    run.ending = Some(Ending::Stop);
                    run.signal(Signal::SIGCONT);
                    run.signal(Signal::SIGTERM);
                    run.kill_at = Some(Instant::now() + grace);
                }
                _ => {
                    self.run = None;
                    self.on_process(ProcessEvent::NothingRuns, no_failure);
                }
            },
            Action::Pause => {
                if let Some(run) = &self.run {
                    run.signal(Signal::SIGSTOP);
                }
                self.on_process(ProcessEvent::Signalled, no_failure);
            }
            Action::Resume => {
                if let Some(run) = &self.run {
                    run.signal(Signal::SIGCONT);
                }
                self.on_process(ProcessEvent::Signalled, no_failure);
            }
            Action::Reset => match &mut self.run {
                Some(run) if run.pgid.is_some() => {
                    run.ending = Some(Ending::Reset);
                    run.signal(Signal::SIGCONT);
                    run.signal(Signal::SIGKILL);
                }
                _ => {
                    self.run = None;
                    self.on_process(ProcessEvent::NothingRuns, no_failure);
                }
            },
            Action::Shutdown => {
                self.run = None;
                self.on_process(ProcessEvent::NothingRuns, no_failure);
            }
            Action::Ping | Action::Create | Action::Delete => {}
        }
        Ok(())
    }

    fn start_process(&mut self, req: &ActionRequest) -> Result<(), ErrorInfo> {
        let spec = self.process_spec().cloned().unwrap_or_default();
        let model = req.payload.get("model").cloned().unwrap_or(Value::Null);
        let results = req.payload.get("results").cloned().unwrap_or(Value::Null);
        // The status shows them without tokens or URL passwords; the run
        // keeps them as given.
        self.model = crate::sandbox::redact_transfer(&model);
        self.results = crate::sandbox::redact_transfer(&results);
        self.extra.insert("return_code".into(), Value::Null);
        self.extra.shift_remove("pid");
        let cmd = command_line(&spec, req, &self.driver_properties())
            .inspect_err(|_| self.shared.metrics.error("refused_command"))?;
        let dir =
            self.shared.config.data_dir.join("runs").join(self.keys.uuid.to_string()).join(Uuid::new_v4().to_string());
        let (tx, events) = mpsc::channel(8);
        let launch = Launch { cmd, dir: dir.clone(), model, tx: tx.clone(), token: self.shared.shutdown.clone() };
        let task = self.shared.tracker.spawn(run_task(launch)).abort_handle();
        info!(run_dir = %dir.display(), "starting process");
        self.run = Some(Box::new(Run { pgid: None, events, tx, dir, results, ending: None, kill_at: None, task }));
        Ok(())
    }

    /// The grace period after SIGTERM ran out.
    pub(super) fn kill_now(&mut self) {
        if let Some(run) = &mut self.run {
            run.kill_at = None;
            warn!(component = %self.keys.uuid, "process ignored SIGTERM; killing its group");
            run.signal(Signal::SIGKILL);
        }
    }

    /// Apply what the run reported. The state change is the pure rule of
    /// `react::process`; this keeps the run and the status fields in step.
    pub(super) async fn on_run_event(&mut self, ev: RunEvent) {
        match ev {
            RunEvent::Spawned(pid) => {
                if let Some(r) = self.run.as_mut() {
                    r.pgid = Some(pid);
                }
                self.extra.insert("pid".into(), pid.into());
                if self.on_process(ProcessEvent::Spawned, no_failure) == Reaction::Kill
                    && let Some(r) = &mut self.run
                {
                    // A stop or reset arrived while it was being prepared.
                    r.ending.get_or_insert(Ending::Reset);
                    r.signal(Signal::SIGKILL);
                }
            }
            RunEvent::Failed(info) => {
                self.run = None;
                if self.on_process(ProcessEvent::SpawnFailed, || info) == Reaction::Fail {
                    self.shared.metrics.error("process");
                }
            }
            RunEvent::Exited(status) => self.on_exit(status),
            RunEvent::Uploaded(result) => {
                self.run = None;
                match result {
                    Ok(()) => {
                        self.on_process(ProcessEvent::ResultsDone, no_failure);
                    }
                    Err(info) => {
                        self.shared.metrics.error("upload");
                        self.on_process(ProcessEvent::UploadFailed, || info);
                    }
                }
            }
        }
        self.publish(None).await;
    }

    fn on_exit(&mut self, status: ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        let ending = self.run.as_ref().and_then(|r| r.ending);
        self.extra.shift_remove("pid");
        self.extra.insert("return_code".into(), status.code().map_or(Value::Null, Value::from));
        info!(component = %self.keys.uuid, ?status, ?ending, "process exited");
        if ending.is_some() {
            self.run = None;
            self.on_process(ProcessEvent::ExitedAsAsked, no_failure);
            return;
        }
        let failure = match (status.code(), status.signal()) {
            (Some(0), _) => {
                self.on_process(ProcessEvent::ExitedOk, no_failure);
                if self.results.is_null() {
                    self.run = None;
                    self.on_process(ProcessEvent::ResultsDone, no_failure);
                } else if let Some(run) = &mut self.run {
                    let (tx, results, dir) = (run.tx.clone(), run.results.clone(), run.dir.clone());
                    run.task = self
                        .shared
                        .tracker
                        .spawn(async move {
                            let r = upload_results(results, dir).await;
                            let _ = tx.send(RunEvent::Uploaded(r)).await;
                        })
                        .abort_handle();
                }
                return;
            }
            (Some(code), _) => {
                self.shared.metrics.error("process_exit");
                ErrorInfo::new("Child process exited").with("code", code)
            }
            (None, Some(sig)) => {
                self.shared.metrics.error("process_signal");
                ErrorInfo::new("Child process caught signal").with("signal", sig).with("signal_name", signal_name(sig))
            }
            (None, None) => ErrorInfo::new("Child process ended"),
        };
        self.run = None;
        self.on_process(ProcessEvent::ExitedBadly, || failure);
    }
}

/// For rules that cannot fail on this event.
fn no_failure() -> ErrorInfo {
    ErrorInfo::new("Internal error: a process rule failed where it cannot")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(params: Value) -> ActionRequest {
        ActionRequest::new("start", params.as_object().unwrap().clone())
    }

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_generic_simulator_runs_only_whitelisted_executables() {
        let spec = ProcessSpec { from_parameters: true, ..Default::default() };
        let p = props(json!({"whitelist": ["/bin/echo", "^/usr/bin/t"]}));
        let ok = command_line(&spec, &req(json!({"executable": "/bin/echo", "argv": ["hi", 3, true]})), &p).unwrap();
        assert_eq!(ok.program, "/bin/echo");
        assert_eq!(ok.args, ["hi", "3", "true"]);
        assert!(command_line(&spec, &req(json!({"executable": "/usr/bin/true"})), &p).is_ok());
        let e = command_line(&spec, &req(json!({"executable": "/bin/rm"})), &p).unwrap_err();
        assert_eq!(e.msg(), "Executable is not whitelisted for this simulator");
        // Anchored at the start, like Python's re.match.
        assert!(command_line(&spec, &req(json!({"executable": "/tmp/bin/echo"})), &p).is_err());
        // No whitelist: nothing runs.
        assert!(command_line(&spec, &req(json!({"executable": "/bin/echo"})), &Map::new()).is_err());
    }

    #[test]
    fn a_shell_needs_the_components_permission() {
        let spec = ProcessSpec { from_parameters: true, ..Default::default() };
        let r = req(json!({"executable": "echo", "argv": ["a", "b"], "shell": true}));
        let e = command_line(&spec, &r, &props(json!({"whitelist": ["echo"]}))).unwrap_err();
        assert!(e.msg().starts_with("Shell execution is not allowed"));
        let ok = command_line(&spec, &r, &props(json!({"whitelist": ["echo"], "shell": true}))).unwrap();
        assert_eq!((ok.program.as_str(), ok.args.clone()), ("/bin/sh", vec!["-c".to_owned(), "'echo' a b".to_owned()]));
        // The whitelisted executable is one word: it cannot smuggle a command.
        let sneaky = req(json!({"executable": "echo; touch /tmp/x", "shell": true}));
        let ok = command_line(&spec, &sneaky, &props(json!({"whitelist": ["echo"], "shell": true}))).unwrap();
        assert_eq!(ok.args[1], "'echo; touch /tmp/x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn environment_accepts_a_map_or_a_list() {
        assert_eq!(env_pairs(Some(&json!({"A": "1", "B": 2}))), [("A".into(), "1".into()), ("B".into(), "2".into())]);
        assert_eq!(
            env_pairs(Some(&json!(["A=1", "B=x=y", "bad"]))),
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn manifest_templates_expand_and_optional_groups_drop_out() {
        let spec = ProcessSpec {
            executable: Some("dpsim".into()),
            argv: vec![
                ArgItem::Group(vec!["--name".into(), "{{start.name}}".into()]),
                ArgItem::Group(vec!["--duration".into(), "{{start.duration}}".into()]),
                ArgItem::One("{{properties.script}}".into()),
            ],
            ..Default::default()
        };
        let c = command_line(&spec, &req(json!({"name": "sim"})), &props(json!({"script": "x.py"}))).unwrap();
        assert_eq!(c.args, ["--name", "sim", "x.py"]);
        let e = command_line(&spec, &req(json!({"name": "sim"})), &Map::new()).unwrap_err();
        assert_eq!(e.msg(), "Missing parameter for the command line");
    }

    #[test]
    fn signals_have_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
    }
}
