//! The `busbar` binary as operators' scripts use it.

mod common;

use busbar::protocol::Filter;
use common::broker::bindings_on;
use common::*;
use serde_json::Value;
use std::process::Output;
use std::time::Duration;
use uuid::Uuid;

async fn busbar(env: &TestEnv, args: &[&str]) -> Output {
    cli(env, args).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_wait_exits_0_on_the_target_state_1_on_error_and_2_on_timeout() {
    let env = TestEnv::new();
    let d = env.start().await;
    let u = env.dummy.to_string();
    let o = busbar(&env, &["action", "start", "-u", &u, "-p", "{runtime: 0.1}", "--wait", "running"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "running");
    let o = busbar(&env, &["action", "stop", "-u", &u, "--wait", "idle"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // stop from idle is an invalid transition: exit 1 with the message.
    let o = busbar(&env, &["action", "stop", "-u", &u, "--wait", "idle"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("Invalid state transition (from idle, send one of: start"), "{}", text(&o.stderr));
    busbar(&env, &["action", "reset", "-u", &u, "--wait", "idle"]).await;
    // A state that never comes: exit 2 after the timeout.
    let o =
        busbar(&env, &["action", "start", "-u", &u, "-p", "{runtime: 60}", "--wait", "running", "--timeout", "0.5"])
            .await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    // Scheduling from the command line.
    busbar(&env, &["action", "reset", "-u", &u, "--wait", "idle"]).await;
    let when =
        format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() + 0.3);
    let o =
        busbar(&env, &["action", "start", "-u", &u, "-p", "{runtime: 0}", "--when", &when, "--wait", "running"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // Client queues are exclusive and auto-delete: only the daemon's remain.
    // Its routed queue (shared topology): `uuid` present, categories manager,
    // simulator and controller, types generic, dummy and busbar, the realm;
    // and the federation directory's queue (`uuid` present).
    if common::broker::admin_or_skip("the bindings count of action_wait") {
        assert_eq!(bindings_on(&env.exchange), 9);
    }
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_prints_one_line_per_reply_and_exits_when_quiet() {
    let env = TestEnv::new();
    let d = env.start().await;
    let o = busbar(&env, &["ping", "--json", "--quiet", "0.5"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let lines: Vec<Value> = text(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let o = busbar(&env, &["ping", "--type", "dummy", "--quiet", "0.5"]).await;
    let out = text(&o.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(&env.dummy.to_string()) && out.contains("idle"), "{out}");
    let o = busbar(&env, &["ping", "--uuid", &Uuid::new_v4().to_string(), "--quiet", "0.3"]).await;
    assert_eq!(o.status.code(), Some(4), "no component answered: a failure of its own for scripts");
    // The protocol ORs the keys; --all narrows what is printed to the
    // components matching every one.
    let lines = |o: &Output| text(&o.stdout).lines().count();
    let o = busbar(&env, &["ping", "--category", "manager", "--type", "dummy", "--quiet", "0.5"]).await;
    assert_eq!(lines(&o), 2, "the manager and the dummy: {}", text(&o.stdout));
    let o = busbar(&env, &["ping", "--category", "simulator", "--type", "dummy", "--all", "--quiet", "0.5"]).await;
    assert_eq!(lines(&o), 1, "{}", text(&o.stdout));
    let o = busbar(&env, &["ping", "--category", "manager", "--type", "dummy", "--all", "--quiet", "0.5"]).await;
    assert_eq!(o.status.code(), Some(4), "nothing is both: {}", text(&o.stdout));
    d.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_delete_through_the_cli() {
    let env = TestEnv::new();
    let d = env.start().await;
    let m = env.manager.to_string();
    let u = Uuid::new_v4().to_string();
    let params = format!("{{category: simulator, type: dummy, name: From CLI, uuid: {u}}}");
    let o = busbar(&env, &["create", "-m", &m, "-p", &params]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(d.shared.env.components.lookup(u.parse().unwrap()).is_some());
    let o = busbar(&env, &["create", "-m", &m, "-p", &params]).await;
    assert_eq!(o.status.code(), Some(1), "duplicate");
    assert!(text(&o.stderr).contains("Duplicate uuid"), "{}", text(&o.stderr));
    let o = busbar(&env, &["delete", "-m", &m, "-u", &u]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(d.shared.env.components.lookup(u.parse().unwrap()).is_none());
    let o = busbar(&env, &["delete", "-m", &m, "-u", &u]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("Unknown component"));
    // --json: the new component's status instead of its uuid.
    let o = busbar(&env, &["create", "-m", &m, "-p", "{category: simulator, type: dummy, name: J}", "--json"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let st: Value = serde_json::from_str(text(&o.stdout).trim()).expect("one JSON status");
    assert_eq!((st["properties"]["name"].as_str(), st["status"]["state"].as_str()), (Some("J"), Some("idle")));
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn validate_config_names_the_file_and_the_key() {
    let env = TestEnv::new();
    let ok = env.dir.path().join("ok.yaml");
    std::fs::write(&ok, env.config_yaml()).unwrap();
    let o = busbar(&env, &["validate-config", ok.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let bad = env.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "components:\n  - {category: simulator, type: dummy}\n  - {category: simulator, type: nope}\n",
    )
    .unwrap();
    let o = busbar(&env, &["validate-config", bad.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(78), "a config error (EX_CONFIG)");
    let err = text(&o.stderr);
    assert!(err.contains("bad.yaml: components[1].type: unknown type"), "{err}");
    // A typo inside a component is caught, with the likely name.
    let typo = env.dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "components:\n  - {category: gateway, type: iot-agent, mqtt_ulr: \"mqtt://10.0.0.5:1883\"}\n",
    )
    .unwrap();
    let o = busbar(&env, &["validate-config", typo.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(78));
    let err = text(&o.stderr);
    assert!(
        err.contains(
            "typo.yaml: components[0].mqtt_ulr: unknown property of gateway/iot-agent; did you mean \"mqtt_url\"?"
        ),
        "{err}"
    );
    for example in ["lab.yaml", "villas-k8s-lab.yaml", "device-lab.yaml", "villas-node-lab.yaml"] {
        let path = format!("{}/examples/{example}", env!("CARGO_MANIFEST_DIR"));
        let o = busbar(&env, &["validate-config", &path]).await;
        assert_eq!(o.status.code(), Some(0), "the shipped {example} is valid: {}", text(&o.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_start_stop_script_runs_against_a_daemon() {
    let env = TestEnv::new();
    let d = env.start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/run-dummy.sh");
    let out = tokio::process::Command::new("bash")
        .args([script, &env.dummy.to_string(), "0.2"])
        .env("BUSBAR", env!("CARGO_BIN_EXE_busbar"))
        .env("BUSBAR_EXCHANGE", &env.exchange)
        .env("AMQP_URL", amqp_url())
        .output()
        .await
        .expect("script runs");
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("done"));
    d.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn types_lists_every_known_type_with_its_schemas() {
    let env = TestEnv::new();
    let o = busbar(&env, &["types", "--json"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let types: Vec<Value> = text(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<String> =
        types.iter().map(|t| format!("{}/{}", t["category"].as_str().unwrap(), t["type"].as_str().unwrap())).collect();
    for want in ["simulator/dummy", "simulator/generic", "simulator/script", "simulator/dpsim", "manager/generic"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let dpsim = types.iter().find(|t| t["type"] == "dpsim").unwrap();
    assert_eq!(dpsim["schema"]["start"]["required"], serde_json::json!(["name"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_prints_messages_as_they_pass_until_interrupted() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new();
    let d = env.start().await;
    let c = env.client().await;
    let mut monitor = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar"))
        .args(["monitor", "--json", "--uuid", &env.dummy.to_string(), "--exchange", &env.exchange])
        .env("AMQP_URL", amqp_url())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    let seen = async {
        loop {
            // Until the monitor's queue is bound, pings pass unseen.
            c.publish(to_uuid(env.dummy), &action("ping", serde_json::json!({})), None).await.unwrap();
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(std::time::Duration::from_millis(300), lines.next_line()).await
            {
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["payload"]["status"].is_object() {
                    return v;
                }
            }
        }
    };
    let v = tokio::time::timeout(WAIT, seen).await.expect("monitor prints the status");
    assert_eq!(v["payload"]["properties"]["uuid"], env.dummy.to_string());
    assert_eq!(v["application_headers"]["uuid"], env.dummy.to_string());
    assert_eq!(v["content_type"], "application/json");
    // SIGINT ends it cleanly.
    let pid = nix::unistd::Pid::from_raw(monitor.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(WAIT, monitor.wait()).await.expect("monitor exits").unwrap();
    assert!(status.success(), "{status}");
    c.close().await;
    d.stop().await.unwrap();
}

/// Every kind of failure has its own exit code (README "Exit codes"), and
/// mistakes end at once with a message, not a silent timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_its_exit_code_and_mistakes_end_at_once() {
    let env = TestEnv::new();
    let d = env.start().await;
    let u = env.dummy.to_string();
    let code = |o: &Output| o.status.code();
    // Usage: clap's own errors, a state that does not exist, bad -p text.
    let o = busbar(&env, &["action", "start", "-u", &u, "--wait", "runing"]).await;
    assert_eq!(code(&o), Some(64), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("one of: "), "{}", text(&o.stderr));
    assert_eq!(code(&busbar(&env, &["action", "--nope"]).await), Some(64));
    let o = busbar(&env, &["action", "start", "-u", &u, "-p", "{runtime: [1"]).await;
    assert_eq!(code(&o), Some(64), "{}", text(&o.stderr));
    assert_eq!(code(&busbar(&env, &["action", "start", "-u", "not-a-uuid", "--wait", "idle"]).await), Some(64));
    // A missing @file.
    let o = busbar(&env, &["action", "start", "-u", &u, "-p", "@/nonexistent/params.yaml"]).await;
    assert_eq!(code(&o), Some(66), "{}", text(&o.stderr));
    // The broker cannot be reached.
    let o = busbar(&env, &["ping", "--broker", "amqp://guest:guest@127.0.0.1:1/%2f"]).await;
    assert_eq!(code(&o), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr).matches("Connection refused").count(), 1, "said once: {}", text(&o.stderr));
    let wrong = amqp_url().replacen("guest:guest@", "guest:wrong@", 1);
    let o = busbar(&env, &["ping", "--broker", &wrong]).await;
    assert_eq!(code(&o), Some(3), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert_eq!(err.matches("Login was refused").count(), 1, "said once, without lapin's dumps: {err}");
    assert!(!err.contains("guest:wrong") && err.contains("guest:***"), "no password: {err}");
    // A daemon whose API port is taken: 74, naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cfg = env.config_value();
    cfg["api"] = serde_json::json!({"bind": addr});
    cfg["exchange"] = serde_json::json!(format!("{}-second", env.exchange));
    let file = env.dir.path().join("taken.json");
    std::fs::write(&file, text_of(&cfg)).unwrap();
    let o = busbar(&env, &["daemon", "-c", file.to_str().unwrap()]).await;
    assert_eq!(code(&o), Some(74), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains(&addr), "the address is named: {}", text(&o.stderr));
    // Nobody has this uuid: "no component answered", long before the timeout.
    let started = std::time::Instant::now();
    let nobody = Uuid::new_v4().to_string();
    let o = busbar(&env, &["action", "start", "-u", &nobody, "--wait", "running", "--timeout", "20"]).await;
    assert_eq!(code(&o), Some(4), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("no component answered"), "{}", text(&o.stderr));
    assert!(started.elapsed() < Duration::from_secs(10), "ended at once, not after the timeout");
    d.stop().await.expect("clean shutdown");
}

/// `busbar monitor | head -1`: the client ends quietly when its reader
/// goes (it used to panic on the broken pipe, exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_piped_into_head_ends_quietly() {
    let env = TestEnv::new();
    let d = env.start().await;
    let line = format!(
        "{} monitor --exchange {} | head -1; echo \"status=${{PIPESTATUS[0]}}\"",
        shell_word(env!("CARGO_BIN_EXE_busbar")),
        env.exchange
    );
    let mut child = tokio::process::Command::new("bash")
        .args(["-c", &line])
        .env("AMQP_URL", amqp_url())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs");
    // Keep the bus busy until the monitor has printed a line, `head` has
    // gone, and the monitor's next line finds the pipe closed.
    let c = env.client().await;
    let ping = Filter { uuid: Some(env.dummy.to_string()), ..Default::default() }.action_headers();
    let out = eventually(Duration::from_secs(20), "the piped monitor ends", async || {
        c.publish(ping.clone(), &serde_json::json!({"action": "ping"}), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        child.try_wait().unwrap()
    })
    .await;
    assert!(out.code().is_some(), "bash ended");
    let output = child.wait_with_output().await.unwrap();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    let status = stdout.lines().last().unwrap_or_default();
    assert_eq!(status, "status=141", "ended by SIGPIPE, as Unix tools do: {stdout}{stderr}");
    c.close().await;
    d.stop().await.expect("clean shutdown");
}

fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Shell completions and the manual page come from the command definition.
#[tokio::test]
async fn completions_and_the_manual_page_are_generated() {
    for (args, needle) in [
        (vec!["completions", "bash"], "_busbar()"),
        (vec!["completions", "zsh"], "#compdef busbar"),
        (vec!["completions", "fish"], "complete -c busbar"),
        (vec!["man"], ".TH busbar 1"),
    ] {
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar")).args(&args).output().await.unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let out = text(&o.stdout);
        assert!(out.contains(needle), "{args:?}: {}", &out[..out.len().min(200)]);
        if args[0] == "completions" {
            assert!(out.contains("validate-config"), "subcommands are completed");
        }
    }
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar")).args(["completions", "tcsh"]).output().await;
    assert_eq!(o.unwrap().status.code(), Some(64), "an unknown shell is a usage error");
}

/// `scripts/test` ends with one summary line, also when tests failed (the
/// summary is `scripts/summarize` over cargo's output).
#[test]
fn the_test_summary_counts_failures_too() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/summarize");
    let log = "running 3 tests\ntest a ... ok\ntest result: ok. 3 passed; 0 failed; 0 ignored\n\
               running 2 tests\ntest b ... FAILED\ntest result: FAILED. 1 passed; 1 failed; 0 ignored\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cargo test.log");
    std::fs::write(&file, log).unwrap();
    let o = std::process::Command::new(script).arg(&file).output().expect("the script runs");
    assert!(o.status.success());
    assert_eq!(text(&o.stdout), "tests: 4 passed, 1 failed\n");
}
