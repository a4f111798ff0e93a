//! The process driver with real child processes and the real broker.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

struct Lab {
    env: TestEnv,
    generic: Uuid,
    shell: Uuid,
}

impl Lab {
    fn new() -> Lab {
        Lab { env: TestEnv::new(), generic: Uuid::new_v4(), shell: Uuid::new_v4() }
    }

    /// The default config plus the process simulators, as typed values.
    fn config(&self) -> busbar::config::Config {
        let bin = self.env.fixtures_whitelist();
        self.env.config_with(vec![
            json!({"category": "simulator", "type": "generic", "name": "Gen", "uuid": self.generic.to_string(),
                "grace": 0.5, "whitelist": [bin, "/bin/true"], "allowed_environment": ["FOO", "BAR"]}),
            json!({"category": "simulator", "type": "generic", "name": "Shell", "uuid": self.shell.to_string(),
                "shell": true, "whitelist": [bin]}),
            json!({"category": "simulator", "type": "script", "name": "Script",
                "uuid": script_uuid(self.generic).to_string(), "script": format!("{}/params.py", fixtures_bin())}),
            json!({"category": "simulator", "type": "dpsim", "name": "DPsim", "uuid": dpsim_uuid(self.generic).to_string()}),
        ])
    }
}

fn script_uuid(base: Uuid) -> Uuid {
    Uuid::new_v5(&base, b"script")
}

fn dpsim_uuid(base: Uuid) -> Uuid {
    Uuid::new_v5(&base, b"dpsim")
}

fn start(exe: &str, argv: Value) -> Value {
    action("start", json!({"executable": format!("{}/{exe}", fixtures_bin()), "argv": argv}))
}

/// The newest run directory of a component.
fn run_dir(data: &Path, uuid: Uuid) -> PathBuf {
    let dir = data.join("runs").join(uuid.to_string());
    let mut runs: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    runs.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    runs.pop().expect("a run directory")
}

async fn read_eventually(path: PathBuf) -> String {
    eventually(WAIT, &format!("{} appears", path.display()), async || {
        std::fs::read_to_string(&path).ok().filter(|s| !s.is_empty())
    })
    .await
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| proc_state(&s) != 'Z')
}

fn proc_state(stat: &str) -> char {
    stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()).unwrap_or('?')
}

async fn gone(pids: &[i32]) {
    let what = format!("processes {pids:?} end with their component");
    eventually(WAIT, &what, async || (!pids.iter().any(|p| alive(*p))).then_some(())).await;
}

async fn pids(lab: &Lab, uuid: Uuid) -> Vec<i32> {
    let text = read_eventually(run_dir(&lab.env.dir.path().join("data"), uuid).join("results/pids")).await;
    text.split_whitespace().map(|p| p.parse().unwrap()).collect()
}

#[tokio::test]
async fn exit_0_goes_idle_and_exit_3_is_an_error_with_the_code_that_reset_clears() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let g = lab.generic;
    c.publish(to_uuid(g), &start("exit-with.sh", json!(["0", "0.1"])), None).await.unwrap();
    state_of(&mut l, g, "starting").await;
    state_of(&mut l, g, "running").await;
    state_of(&mut l, g, "stopping").await;
    let st = state_of(&mut l, g, "idle").await;
    assert_eq!(st["status"]["return_code"], 0);

    c.publish(to_uuid(g), &start("exit-with.sh", json!(["3"])), None).await.unwrap();
    let st = state_of(&mut l, g, "error").await;
    assert_eq!(st["status"]["error"], json!({"msg": "Child process exited", "code": 3}));
    assert_eq!(st["status"]["return_code"], 3);
    c.publish(to_uuid(g), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, g, "idle").await;
    // return_code is reset on every start.
    c.publish(to_uuid(g), &start("sleeper.sh", json!([])), None).await.unwrap();
    let st = state_of(&mut l, g, "starting").await;
    assert_eq!(st["status"]["return_code"], Value::Null);
    state_of(&mut l, g, "running").await;
    c.publish(to_uuid(g), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, g, "idle").await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn stop_terminates_the_group_within_the_grace_period_and_kills_what_ignores_it() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let g = lab.generic;
    c.publish(to_uuid(g), &start("sleeper.sh", json!([])), None).await.unwrap();
    state_of(&mut l, g, "running").await;
    let p = pids(&lab, g).await;
    let t = Instant::now();
    c.publish(to_uuid(g), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, g, "stopping").await;
    let st = state_of(&mut l, g, "idle").await;
    assert!(st["status"].get("error").is_none());
    assert!(t.elapsed() < Duration::from_millis(500), "SIGTERM was enough: {:?}", t.elapsed());
    gone(&p).await;

    c.publish(to_uuid(g), &start("stubborn.sh", json!([])), None).await.unwrap();
    state_of(&mut l, g, "running").await;
    let p = pids(&lab, g).await;
    let t = Instant::now();
    c.publish(to_uuid(g), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, g, "idle").await;
    assert!(t.elapsed() >= Duration::from_millis(450), "killed only after the 0.5 s grace: {:?}", t.elapsed());
    gone(&p).await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn pause_and_resume_stop_and_continue_the_process() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let g = lab.generic;
    c.publish(to_uuid(g), &start("sleeper.sh", json!([])), None).await.unwrap();
    let st = state_of(&mut l, g, "running").await;
    let pid = st["status"]["pid"].as_i64().expect("status.pid") as i32;
    let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| proc_state(&s)).unwrap_or('?');
    c.publish(to_uuid(g), &action("pause", json!({})), None).await.unwrap();
    state_of(&mut l, g, "paused").await;
    // SIGSTOP takes effect when the process next runs: on a loaded machine
    // /proc may show it running for a moment after the signal was sent.
    eventually(WAIT, "the process is stopped by SIGSTOP", async || (stat() == 'T').then_some(())).await;
    c.publish(to_uuid(g), &action("resume", json!({})), None).await.unwrap();
    state_of(&mut l, g, "running").await;
    eventually(WAIT, "the process continues after resume", async || (stat() != 'T').then_some(())).await;
    // Stop from paused works too.
    c.publish(to_uuid(g), &action("pause", json!({})), None).await.unwrap();
    state_of(&mut l, g, "paused").await;
    c.publish(to_uuid(g), &action("stop", json!({})), None).await.unwrap();
    state_of(&mut l, g, "idle").await;
    gone(&[pid]).await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn reset_while_running_kills_the_whole_group_and_leaves_no_orphan() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let g = lab.generic;
    c.publish(to_uuid(g), &start("sleeper.sh", json!([])), None).await.unwrap();
    state_of(&mut l, g, "running").await;
    let p = pids(&lab, g).await;
    assert_eq!(p.len(), 2, "the script and its grandchild");
    c.publish(to_uuid(g), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, g, "resetting").await;
    state_of(&mut l, g, "idle").await;
    gone(&p).await;
    // reset with nothing running goes straight to idle too.
    c.publish(to_uuid(g), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, g, "idle").await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn whitelist_shell_and_missing_executables_are_clear_errors() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let g = lab.generic;
    let cases = [
        (
            g,
            action("start", json!({"executable": "/bin/rm", "argv": ["-rf", "/"]})),
            "Executable is not whitelisted for this simulator",
        ),
        (
            g,
            json!({"action": "start", "parameters": {"executable": format!("{}/env-check.sh", fixtures_bin()), "shell": true}}),
            "Shell execution is not allowed for this simulator",
        ),
        (g, start("does-not-exist", json!([])), "Cannot start process: No such file or directory"),
        (g, action("start", json!({"argv": []})), "Invalid parameters"),
        (
            dpsim_uuid(g),
            action("start", json!({"name": "sim", "duration": 1})),
            "Cannot start process: No such file or directory",
        ),
    ];
    for (u, body, msg) in cases {
        c.publish(to_uuid(u), &body, None).await.unwrap();
        let st = state_of(&mut l, u, "error").await;
        let got = st["status"]["error"]["msg"].as_str().unwrap().to_owned();
        assert!(got.starts_with(msg), "want {msg:?}, got {got:?}");
        c.publish(to_uuid(u), &action("reset", json!({})), None).await.unwrap();
        state_of(&mut l, u, "idle").await;
    }
    // The shell-enabled simulator may use a shell.
    let s = lab.shell;
    let body = json!({"action": "start", "parameters": {"executable": format!("{}/exit-with.sh", fixtures_bin()), "argv": ["0"], "shell": true}});
    c.publish(to_uuid(s), &body, None).await.unwrap();
    state_of(&mut l, s, "running").await;
    state_of(&mut l, s, "idle").await;
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn environment_working_directory_and_logs_are_applied() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let g = lab.generic;
    for environment in [json!({"FOO": "bar", "BAR": 7}), json!(["FOO=bar", "BAR=7"])] {
        let body = action(
            "start",
            json!({"executable": format!("{}/env-check.sh", fixtures_bin()), "environment": environment, "working_directory": "results"}),
        );
        c.publish(to_uuid(g), &body, None).await.unwrap();
        state_of(&mut l, g, "idle").await;
        let run = run_dir(&lab.env.dir.path().join("data"), g);
        let env = read_eventually(run.join("results/env.txt")).await;
        assert!(env.contains("FOO=bar\n") && env.contains("BAR=7\n"), "{env}");
        assert!(env.contains("AMQP_URL=unset"), "the daemon's credentials do not leak: {env}");
        assert!(env.contains(&format!("PWD={}", run.join("results").display())), "{env}");
        assert_eq!(read_eventually(run.join("logs/stdout.log")).await, "to stdout\n");
        assert_eq!(read_eventually(run.join("logs/stderr.log")).await, "to stderr\n");
    }
    // The daemon never changes its own working directory.
    assert_eq!(std::env::current_dir().unwrap(), Path::new(env!("CARGO_MANIFEST_DIR")));
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn daemon_shutdown_leaves_no_child_behind() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    c.publish(to_uuid(lab.generic), &start("sleeper.sh", json!([])), None).await.unwrap();
    state_of(&mut l, lab.generic, "running").await;
    let p = pids(&lab, lab.generic).await;
    d.stop().await.expect("clean shutdown");
    gone(&p).await;
    c.close().await;
}

#[tokio::test]
async fn the_script_type_gets_its_parameters_as_json_on_stdin() {
    let lab = Lab::new();
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    let s = script_uuid(lab.generic);
    c.publish(to_uuid(s), &action("start", json!({"x": 2, "label": "a"})), None).await.unwrap();
    state_of(&mut l, s, "running").await;
    state_of(&mut l, s, "idle").await;
    let out = read_eventually(run_dir(&lab.env.dir.path().join("data"), s).join("results/out.json")).await;
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"x": 4, "label": "a"}));
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// A child left running by a daemon that was killed (`kill -9` never lets
/// it drop its runs) is found at the next start by the process group and
/// run directory recorded in the store, and stopped; the status says so.
/// A recorded group that is not one of ours (the pgid reused by another
/// program) is left alone.
#[tokio::test]
async fn a_child_left_by_a_killed_daemon_is_stopped_at_the_next_start() {
    use std::os::unix::process::CommandExt;
    let lab = Lab::new();
    let data = lab.env.dir.path().join("data");
    let dir = data.join("runs").join(lab.generic.to_string()).join("left-behind");
    std::fs::create_dir_all(&dir).unwrap();
    // What the killed daemon left: its child, in a group of its own, with
    // its run directory in the environment, and the record in the store.
    let mut orphan =
        std::process::Command::new("sleep").arg("300").env("BUSBAR_RUN_DIR", &dir).process_group(0).spawn().unwrap();
    // Someone else's process, recorded for the shell simulator: not ours.
    let mut stranger = std::process::Command::new("sleep").arg("300").process_group(0).spawn().unwrap();
    {
        let store = busbar::store::Store::open(&data).unwrap();
        store.put_run(lab.generic, orphan.id() as i32, &dir).unwrap();
        store.put_run(lab.shell, stranger.id() as i32, &dir).unwrap();
    }
    let (d, c, mut l) = lab.env.up_with(lab.config()).await;
    c.publish(to_uuid(lab.generic), &action("ping", json!({})), None).await.unwrap();
    let st = status_of(&mut l, lab.generic, |s| s["status"]["recovered"].is_object()).await;
    assert_eq!(st["status"]["recovered"]["action"], "stopped", "{st}");
    assert_eq!(st["status"]["recovered"]["pgid"], orphan.id());
    assert_eq!(st["status"]["state"], "idle");
    eventually(WAIT, "the orphan is gone", async || orphan.try_wait().unwrap()).await;
    assert!(stranger.try_wait().unwrap().is_none(), "a process that is not ours is left alone");
    let store = busbar::store::Store::open(&data).unwrap();
    assert_eq!(store.run_of(lab.generic).unwrap(), None, "the record is gone");
    // The daemon's own children are recorded while they run, and forgotten
    // when they end.
    c.publish(to_uuid(lab.generic), &start("sleeper.sh", json!([])), None).await.unwrap();
    let st = state_of(&mut l, lab.generic, "running").await;
    assert!(st["status"].get("recovered").is_none(), "a new start clears it: {st}");
    let recorded = eventually(WAIT, "the run is recorded", async || store.run_of(lab.generic).unwrap()).await;
    assert_eq!(Some(recorded.0), st["status"]["pid"].as_i64().map(|p| p as i32));
    c.publish(to_uuid(lab.generic), &action("reset", json!({})), None).await.unwrap();
    state_of(&mut l, lab.generic, "idle").await;
    eventually(WAIT, "the run is forgotten", async || store.run_of(lab.generic).unwrap().is_none().then_some(())).await;
    let _ = stranger.kill();
    let _ = stranger.wait();
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

/// The same with a real `kill -9` of the daemon binary: its child keeps
/// running, and the daemon started next on the same data stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_next_daemon_stops_the_child_it_left() {
    let lab = Lab::new();
    let config = lab.env.dir.path().join("lab.json");
    let bin = lab.env.fixtures_whitelist();
    let generic = json!({"category": "simulator", "type": "generic", "name": "Gen", "uuid": lab.generic.to_string(),
        "whitelist": [bin]});
    std::fs::write(&config, text_of(&lab.env.config_value_with(vec![generic]))).unwrap();
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar"))
            .args(["--log-level", "warn", "daemon", "-c"])
            .arg(&config)
            .env("AMQP_URL", amqp_url())
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .spawn()
            .expect("the daemon runs")
    };
    let c = lab.env.client().await;
    let mut l = lab.env.listen_all(&c).await;
    let ping_body = action("ping", json!({}));
    let ping = || c.publish(to_uuid(lab.generic), &ping_body, None);
    let mut daemon = spawn();
    eventually(WAIT, "the daemon answers", async || {
        ping().await.unwrap();
        status_within(&mut l, lab.generic, Duration::from_millis(300), |_| true).await
    })
    .await;
    c.publish(to_uuid(lab.generic), &start("sleeper.sh", json!([])), None).await.unwrap();
    let st = state_of(&mut l, lab.generic, "running").await;
    let pid = st["status"]["pid"].as_i64().unwrap() as i32;
    // SIGKILL: the daemon cannot stop its child.
    daemon.start_kill().unwrap();
    daemon.wait().await.unwrap();
    assert!(alive(pid), "the child outlived the killed daemon");
    let mut daemon = spawn();
    let st = eventually(WAIT, "the next daemon reports what it stopped", async || {
        ping().await.unwrap();
        status_within(&mut l, lab.generic, Duration::from_millis(300), |s| s["status"]["recovered"].is_object()).await
    })
    .await;
    assert_eq!(st["status"]["recovered"]["action"], "stopped");
    assert_eq!(st["status"]["recovered"]["pgid"], pid);
    gone(&[pid]).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id().unwrap() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(daemon.wait().await.unwrap().success(), "clean shutdown");
    c.close().await;
}
