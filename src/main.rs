//! The `busbar` binary: the daemon and the command-line client.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use busbar::client::{Client, Goal, Outcome};
use busbar::config::{AMQP_URL_ENV, Config};
use busbar::protocol::Filter;

/// Exit codes (README "Exit codes"): scripts tell the cases apart.
mod exit {
    /// The target (or its manager) reported an error.
    pub const TARGET_ERROR: u8 = 1;
    /// The target answered but did not get there in time.
    pub const TIMEOUT: u8 = 2;
    /// The broker cannot be reached.
    pub const BROKER: u8 = 3;
    /// No component answered at all.
    pub const NO_ANSWER: u8 = 4;
    /// Something else failed (a bug, a socket): see the message.
    pub const SOFTWARE: u8 = 70;
    /// The command line is wrong (`sysexits.h` EX_USAGE).
    pub const USAGE: u8 = 64;
    /// An input file (`-p @file`) cannot be read (EX_NOINPUT).
    pub const NO_INPUT: u8 = 66;
    /// The configuration is invalid (EX_CONFIG).
    pub const CONFIG: u8 = 78;
    /// A listener cannot be bound, a file cannot be written (EX_IOERR).
    pub const IO: u8 = 74;
}

/// A mistake in the command line found after parsing (bad `-p` text).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// An input file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
struct NoInput {
    path: String,
    source: std::io::Error,
}

/// A VILLAScontroller-compatible lab equipment controller.
#[derive(Parser)]
#[command(name = "busbar", version, about)]
struct Cli {
    /// Log filter when RUST_LOG is unset (error, warn, info, debug, trace);
    /// by default `info` for the daemon, `warn` for client commands.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// Broker URL.
    #[arg(long, env = AMQP_URL_ENV, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    broker: String,
    /// Exchange name.
    #[arg(long, env = "BUSBAR_EXCHANGE", default_value = "villas")]
    exchange: String,
    /// Read broker URL and exchange from this config file instead.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
}

impl Conn {
    async fn connect(&self) -> anyhow::Result<Client> {
        let (url, exchange) = match &self.config {
            Some(p) => {
                let c = Config::load(p)?;
                (c.broker.url, c.exchange)
            }
            None => (self.broker.clone(), self.exchange.clone()),
        };
        Client::connect(&url, &exchange)
            .await
            .with_context(|| format!("cannot connect to {}", busbar::config::redact_url(&url)))
    }
}

#[derive(Args, Clone, Default)]
struct FilterArgs {
    /// Select by uuid.
    #[arg(short = 'u', long)]
    uuid: Option<String>,
    #[command(flatten)]
    keys: KeyArgs,
    /// Show only components matching every given key. The VILLAS protocol
    /// ORs them (`-C simulator -t dummy` reaches every simulator and every
    /// dummy); this narrows what is printed, client-side.
    #[arg(long)]
    all: bool,
}

/// Realm, category and type: the routing keys every selecting command takes.
#[derive(Args, Clone, Default)]
struct KeyArgs {
    /// Select by realm.
    #[arg(short = 'r', long)]
    realm: Option<String>,
    /// Select by category.
    #[arg(short = 'C', long)]
    category: Option<String>,
    /// Select by type.
    #[arg(short = 't', long = "type")]
    kind: Option<String>,
}

impl FilterArgs {
    /// Whether a status passes `--all` (always, without it).
    fn shows(&self, status: &Value) -> bool {
        let is = |key: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| status.pointer(&format!("/properties/{key}")).and_then(Value::as_str) == Some(w))
        };
        !self.all
            || (is("uuid", &self.uuid)
                && is("realm", &self.keys.realm)
                && is("category", &self.keys.category)
                && is("type", &self.keys.kind))
    }
}

impl From<FilterArgs> for Filter {
    fn from(a: FilterArgs) -> Filter {
        Filter { uuid: a.uuid, realm: a.keys.realm, category: a.keys.category, kind: a.keys.kind }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller daemon.
    Daemon {
        /// Configuration file (YAML or JSON).
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    ValidateConfig {
        /// Configuration file.
        file: PathBuf,
    },
    /// List the known component types with their schemas.
    Types {
        /// Include the site types of this config's `component_dirs`.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Print JSON lines (with the full schemas).
        #[arg(long)]
        json: bool,
    },
    /// Ping components and print one line per component that answers.
    Ping {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: FilterArgs,
        /// Stop after this many seconds.
        #[arg(long, default_value = "5", value_parser = seconds)]
        timeout: Duration,
        /// Stop after this many seconds without a new reply.
        #[arg(long, default_value = "1", value_parser = seconds)]
        quiet: Duration,
        /// Print each reply as a JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Print messages on the bus as they pass, until interrupted.
    Monitor {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON lines (VILLAScontroller's monitor format; with
        /// --data, `{"routing_key", "body"}`).
        #[arg(long)]
        json: bool,
        /// Watch device measures on the federation data exchange instead.
        #[arg(long)]
        data: bool,
        /// The federation data exchange (with --data).
        #[arg(long, default_value = "villas.data")]
        data_exchange: String,
        /// Routing key pattern (with --data): `realm.service.entity_type.device_id`, `#` for all.
        #[arg(long, default_value = "#")]
        key: String,
        /// Print the `managed_by` tree of every IC of every site instead,
        /// again after each change.
        #[arg(long, conflicts_with_all = ["json", "data"])]
        tree: bool,
    },
    /// Send an action to a component, optionally waiting for a state.
    Action {
        #[command(flatten)]
        conn: Conn,
        /// start, stop, pause, resume, reset, shutdown, ping, …
        action: String,
        /// Target component; repeat for several (one message each, the same
        /// `--when`: a coordinated start).
        #[arg(short = 'u', long, required = true)]
        uuid: Vec<String>,
        /// Parameters: JSON or YAML text, or @file.
        #[arg(short = 'p', long)]
        parameters: Option<String>,
        /// Model description (JSON/YAML or @file).
        #[arg(long)]
        model: Option<String>,
        /// Results description (JSON/YAML or @file).
        #[arg(long)]
        results: Option<String>,
        /// When to run it: Unix seconds, ISO-8601, or `+2s` / `+500ms` from now.
        #[arg(long, value_parser = when_arg)]
        when: Option<Value>,
        /// Report when each target entered the action's transient state
        /// (`starting` for a start, from its `status.since`) and the skew
        /// between the first and the last.
        #[arg(long, conflicts_with = "wait")]
        report: bool,
        /// Wait until the component reaches this state (exit 0), or error (exit 1).
        #[arg(long, value_parser = state_name)]
        wait: Option<String>,
        /// Give up waiting after this many seconds (exit 2).
        #[arg(long, default_value = "30", value_parser = seconds)]
        timeout: Duration,
    },
    /// Create a component through a manager.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// The manager's uuid.
        #[arg(short = 'm', long)]
        manager: String,
        /// Create parameters: JSON or YAML text, or @file.
        #[arg(short = 'p', long)]
        parameters: String,
        /// Print the new component's status (JSON) instead of its uuid.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds (exit 2).
        #[arg(long, default_value = "10", value_parser = seconds)]
        timeout: Duration,
    },
    /// One line per site of the federation: its controller's state, its
    /// components by state, when it was last heard, its clock offset.
    Sites {
        #[command(flatten)]
        conn: Conn,
        /// Listen this many seconds (at least one alive interval).
        #[arg(long, default_value = "1.5", value_parser = seconds)]
        listen: Duration,
        /// Ask every controller for fresh figures (a distributed request)
        /// and name the sites that do not answer within --deadline.
        #[arg(long)]
        fresh: bool,
        /// With --fresh: how long to wait for the answers.
        #[arg(long, default_value = "1", value_parser = seconds)]
        deadline: Duration,
        /// Print JSON lines (with --fresh: the split answer, one object).
        #[arg(long)]
        json: bool,
    },
    /// Every component of every site, as the federation directory sees
    /// them (the merged view).
    Components {
        #[command(flatten)]
        conn: Conn,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        keys: KeyArgs,
        /// Only this state.
        #[arg(long, value_parser = state_name)]
        state: Option<String>,
        /// Only stale ones.
        #[arg(long)]
        stale: bool,
        /// Listen this many seconds before printing.
        #[arg(long, default_value = "1.5", value_parser = seconds)]
        listen: Duration,
        /// Keep watching: print each change as a new line (like `kubectl get -w`).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Print the `managed_by` tree.
        #[arg(long, conflicts_with = "json")]
        tree: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `busbar man | man -l -`).
    Man,
    /// Send a command to a device (an `equipment` IC of an IoT gateway),
    /// as the Context Broker would: `busbar command -u UUID switch on`.
    Command {
        #[command(flatten)]
        conn: Conn,
        /// The device's uuid.
        #[arg(short = 'u', long)]
        uuid: String,
        /// The command's name (one the device declares).
        name: String,
        /// Its value: JSON if it parses (`42`, `{"p": 5}`), else text.
        value: Option<String>,
        /// Seconds the command may wait for the device (default: the
        /// device's, its group's, or the gateway's).
        #[arg(long, value_parser = seconds)]
        expiration: Option<Duration>,
        /// Wait for the device's result (exit 0 for OK, 1 for ERROR or
        /// EXPIRED).
        #[arg(long)]
        wait: bool,
        /// Print the command as JSON.
        #[arg(long)]
        json: bool,
        /// Give up waiting after this many seconds (exit 2).
        #[arg(long, default_value = "30", value_parser = seconds)]
        timeout: Duration,
    },
    /// Delete a component through its manager.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// The manager's uuid.
        #[arg(short = 'm', long)]
        manager: String,
        /// The component to delete.
        #[arg(short = 'u', long)]
        uuid: String,
        /// Give up after this many seconds (exit 2).
        #[arg(long, default_value = "10", value_parser = seconds)]
        timeout: Duration,
    },
}

/// A number of seconds on the command line: finite, not negative, at most a
/// day (so that `Duration` arithmetic can never overflow).
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
        return Err(format!("{s} must be between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A state name (`--wait`): one of the VILLAS states.
fn state_name(s: &str) -> Result<String, String> {
    s.parse::<busbar::state::State>().map(|st| st.as_str().to_owned()).map_err(|_| {
        let all: Vec<&str> = busbar::state::State::ALL.iter().map(|s| s.as_str()).collect();
        format!("{s:?} is not a state; one of: {}", all.join(", "))
    })
}

/// Hand what `next` yields to `show` until Ctrl-C or SIGTERM (`monitor`).
async fn until_interrupted<T>(mut next: impl AsyncFnMut(tokio::time::Instant) -> Option<T>, mut show: impl FnMut(T)) {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let until = tokio::time::Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            item = next(until) => if let Some(item) = item {
                show(item);
            },
            _ = &mut stop => break,
        }
    }
}

/// Parse `text` as JSON, else YAML; `@path` reads a file.
fn document(text: &str) -> anyhow::Result<Value> {
    let (text, from) = match text.strip_prefix('@') {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| NoInput { path: path.to_owned(), source })?;
            (text, path.to_owned())
        }
        None => (text.to_owned(), "argument".to_owned()),
    };
    serde_json::from_str(&text)
        .or_else(|_| serde_saphyr::from_str::<Value>(&text))
        .map_err(|e| Usage(format!("{from}: not valid JSON or YAML: {e}")).into())
}

fn object(text: &str) -> anyhow::Result<Map<String, Value>> {
    match document(text)? {
        Value::Object(m) => Ok(m),
        other => Err(Usage(format!("expected an object, got {other}")).into()),
    }
}

/// `--when`: Unix seconds, ISO-8601 (as given), or `+N`, `+Ns`, `+Nms`
/// from now (made absolute here, once, so that every target gets the same).
fn when_arg(text: &str) -> Result<Value, String> {
    if let Some(rel) = text.strip_prefix('+') {
        let (num, scale) = match rel.strip_suffix("ms") {
            Some(n) => (n, 1e-3),
            None => (rel.strip_suffix('s').unwrap_or(rel), 1.0),
        };
        let secs = num.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(|s| s * scale);
        let secs = secs.ok_or_else(|| format!("{text:?}: expected +SECONDS, +Ns or +Nms"))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        return Ok(Value::from(((now + secs) * 1e6).round() / 1e6));
    }
    Ok(text.parse::<f64>().map(Value::from).unwrap_or_else(|_| Value::String(text.to_owned())))
}

/// Print when each target entered `entry` and the skew; exit 0 if every
/// target was seen there, 2 otherwise.
fn print_report(seen: &[(String, Option<f64>)], entry: &str) -> ExitCode {
    let times: Vec<f64> = seen.iter().filter_map(|(_, t)| *t).collect();
    let first = times.iter().copied().reduce(f64::min).unwrap_or_default();
    for (uuid, t) in seen {
        match t {
            Some(t) => {
                let at = jiff::Timestamp::from_microsecond((t * 1e6) as i64).map(|t| t.to_string()).unwrap_or_default();
                println!("{uuid}  {entry} at {at}  +{:.3} ms", (t - first) * 1000.0);
            }
            None => println!("{uuid}  not seen {entry}"),
        }
    }
    let last = times.iter().copied().reduce(f64::max).unwrap_or_default();
    println!("skew {:.3} ms over {} of {} targets", (last - first) * 1000.0, times.len(), seen.len());
    if times.len() == seen.len() { ExitCode::SUCCESS } else { ExitCode::from(exit::TIMEOUT) }
}

/// One site's fresh answer to a health request.
fn print_fresh(site: &str, status: &Value) {
    let sys = &status["system"];
    let counts: Vec<String> = status["components"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect())
        .unwrap_or_default();
    println!(
        "{site:<16} {:<8} {:<32} cpu {:>5.1}%  rss {:>6.1} MiB  broker {}",
        status["state"].as_str().unwrap_or("-"),
        if counts.is_empty() { "-".to_owned() } else { counts.join(",") },
        sys["cpu_percent"].as_f64().unwrap_or_default(),
        sys["rss"].as_f64().unwrap_or_default() / 1048576.0,
        if status["broker"]["connected"] == true { "up" } else { "down" },
    );
}

/// Listen to the bus for `listen` after a broadcast ping (`Client::survey`),
/// into a directory; the listener goes on (for `--watch`, `--fresh`).
async fn surveyed(
    client: &Client,
    listen: Duration,
) -> anyhow::Result<(busbar::client::Listener, busbar::directory::Directory)> {
    let mut listener = client.survey().await?;
    let mut dir = busbar::directory::Directory::new(1_000_000);
    let until = tokio::time::Instant::now() + listen;
    while let Some(seen) = listener.next_until(until).await {
        observe(&mut dir, &seen);
    }
    Ok((listener, dir))
}

fn observe(dir: &mut busbar::directory::Directory, seen: &busbar::client::Seen) -> busbar::directory::Change {
    let body = serde_json::to_vec(&seen.payload).unwrap_or_default();
    dir.observe(&body, tokio::time::Instant::now(), std::time::SystemTime::now())
}

fn print_site(v: &Value) {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let counts: Vec<String> =
        v["components"].as_object().map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect()).unwrap_or_default();
    let state = if v["stale"] == true { "stale".to_owned() } else { s("state") };
    let offset = v["clock_offset_ms"].as_f64().map_or("-".to_owned(), |o| format!("{o:+.2} ms"));
    println!(
        "{:<16} {:<8} {:<32} last seen {:>6.1} s ago  clock {offset}",
        s("site"),
        state,
        if counts.is_empty() { "-".to_owned() } else { counts.join(",") },
        v["age"].as_f64().unwrap_or_default(),
    );
}

fn print_component(v: &Value, json: bool) {
    if json {
        println!("{v}");
        return;
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    println!(
        "{:<12} {:<22} {:<24} {:<12} {:<5} {}",
        s("site"),
        format!("{}/{}", s("category"), s("type")),
        s("name"),
        s("state"),
        if v["stale"] == true { "stale" } else { "" },
        s("uuid"),
    );
}

/// The rows as a tree by `parent` (the manager, or for a root manager its
/// controller); roots: ICs whose parent is not among the rows.
fn print_tree(rows: &[Value]) {
    let uuid = |v: &Value| v["uuid"].as_str().unwrap_or_default().to_owned();
    let known: std::collections::HashSet<String> = rows.iter().map(uuid).collect();
    fn walk(rows: &[Value], parent: &str, depth: usize) {
        for r in rows.iter().filter(|r| r["parent"].as_str() == Some(parent)) {
            print_tree_line(r, depth);
            walk(rows, r["uuid"].as_str().unwrap_or_default(), depth + 1);
        }
    }
    for r in rows.iter().filter(|r| r["parent"].as_str().is_none_or(|m| !known.contains(m))) {
        print_tree_line(r, 0);
        walk(rows, r["uuid"].as_str().unwrap_or_default(), 1);
    }
}

fn print_tree_line(v: &Value, depth: usize) {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let stale = if v["stale"] == true { " (stale)" } else { "" };
    println!(
        "{}{} {}/{} {}{stale}  {}",
        "  ".repeat(depth),
        s("name"),
        s("category"),
        s("type"),
        s("state"),
        s("uuid")
    );
}

fn print_row(v: &Value) {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("-").to_owned();
    println!(
        "{:<36}  {:<10} {:<14} {:<12} {:<24} {}",
        s("/properties/uuid"),
        s("/properties/category"),
        s("/properties/type"),
        s("/status/state"),
        s("/properties/name"),
        s("/properties/realm"),
    );
}

/// The error a status carries, with its way out when it names one.
fn error_msg(status: &Value) -> String {
    let msg = status.pointer("/status/error/msg").and_then(Value::as_str).unwrap_or("error");
    match status.pointer("/status/error/hint").and_then(Value::as_str) {
        Some(hint) => format!("{msg} ({hint})"),
        None => msg.to_owned(),
    }
}

async fn wait_outcome(
    client: &Client,
    uuid: &str,
    body: &Value,
    goal: Goal,
    timeout: Duration,
    print_uuid: bool,
) -> anyhow::Result<ExitCode> {
    let created = match &goal {
        Goal::Created { follow } => Some(*follow),
        _ => None,
    };
    let result = client.act_and_wait(uuid, body, goal, timeout).await;
    Ok(match result {
        Ok(Outcome::Reached(_)) if created.is_some() => {
            // What a script needs next: the new component's uuid.
            if print_uuid {
                println!("{}", created.unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Ok(Outcome::Reached(status)) => {
            println!("{}", status.pointer("/status/state").and_then(Value::as_str).unwrap_or("?"));
            ExitCode::SUCCESS
        }
        Ok(Outcome::Failed(status)) => {
            eprintln!("error: {}", error_msg(&status));
            println!("{}", status.pointer("/status/error").cloned().unwrap_or(Value::Null));
            ExitCode::from(exit::TARGET_ERROR)
        }
        Err(e) => return unanswered(e, "the target answered, but did not get there"),
    })
}

/// The exit code of a wait that got no final answer: timed out (2, with
/// `timed_out` saying what that means) or nobody answered (4); anything
/// else is an error.
fn unanswered(e: busbar::Error, timed_out: &str) -> anyhow::Result<ExitCode> {
    match e {
        busbar::Error::Timeout(t) => {
            eprintln!("timed out after {t:?} ({timed_out})");
            Ok(ExitCode::from(exit::TIMEOUT))
        }
        e @ busbar::Error::NoAnswer(_) => {
            eprintln!("{e}");
            Ok(ExitCode::from(exit::NO_ANSWER))
        }
        e => Err(e.into()),
    }
}

/// Print a device's answer to `busbar command`: the command's state, result
/// and id (or its JSON); exit 0 for PENDING or OK, 1 for ERROR, EXPIRED or
/// a refusal (the status's error).
fn print_command(status: &Value, json: bool) -> ExitCode {
    let Some(cmd) = status.pointer("/status/command") else {
        eprintln!("error: {}", error_msg(status));
        return ExitCode::from(exit::TARGET_ERROR);
    };
    let state = cmd["state"].as_str().unwrap_or("?");
    if json {
        println!("{cmd}");
    } else {
        let info = cmd.get("info").filter(|i| !i.is_null()).map(|i| format!(" {i}")).unwrap_or_default();
        println!("{state}{info}  {}", cmd["id"].as_str().unwrap_or_default());
    }
    if matches!(state, "ERROR" | "EXPIRED") { ExitCode::from(exit::TARGET_ERROR) } else { ExitCode::SUCCESS }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Daemon { config } => {
            let config = Config::load(&config)?;
            busbar::daemon::run(config, shutdown_signal()).await?;
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "busbar", &mut std::io::stdout());
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
        }
        Cmd::ValidateConfig { file } => {
            let c = Config::load(&file)?;
            println!("{}: ok ({} components)", file.display(), c.components.len());
        }
        Cmd::Types { config, json } => {
            let kinds = match config {
                Some(p) => Config::load(&p)?.kinds()?,
                None => busbar::component::kinds::Kinds::builtin(),
            };
            for k in kinds.all() {
                if json {
                    let line = serde_json::json!({
                        "category": k.category, "type": k.kind, "description": k.description,
                        "source": k.source, "schema": k.schema, "properties": k.properties_schema,
                    });
                    println!("{line}");
                } else {
                    let schemas: Vec<&str> = k.schema.keys().map(String::as_str).collect();
                    println!(
                        "{:<10} {:<12} schemas: {:<14} {}",
                        k.category,
                        k.kind,
                        schemas.join(","),
                        k.description.trim()
                    );
                }
            }
        }
        Cmd::Sites { conn, listen, fresh, deadline, json } => {
            let client = conn.connect().await?;
            let (mut listener, dir) = surveyed(&client, listen).await?;
            if fresh {
                use busbar::directory::gather::{Gather, Query};
                let now = tokio::time::Instant::now();
                // Expected: every site heard, and every peer those sites
                // know of (a site cut off from here is in its peers' links).
                let mut expected = dir.expected_sites();
                for site in dir.sites(now) {
                    for link in site["status"]["links"].as_array().into_iter().flatten() {
                        if let (Some(u), Some(name)) =
                            (link["uuid"].as_str().and_then(|u| u.parse().ok()), link["site"].as_str())
                        {
                            expected.entry(u).or_insert_with(|| name.to_owned());
                        }
                    }
                }
                let anyone = expected.is_empty();
                let mut g = Gather::new(Query::Health, expected, deadline, now);
                let mut to = lapin::types::FieldTable::default();
                to.insert("category".into(), lapin::types::AMQPValue::LongString("controller".into()));
                client.publish_correlated(to, &Query::Health.body(), &g.correlation).await?;
                // With no site heard yet, collect whoever answers by the deadline.
                while anyone || !g.complete() {
                    let Some(seen) = listener.next_until(g.deadline).await else { break };
                    g.offer(seen.correlation_id.as_deref(), &seen.payload);
                }
                client.close().await;
                let done = g.finish(tokio::time::Instant::now());
                if json {
                    println!("{}", done.split());
                } else {
                    for (site, answer) in &done.answers {
                        print_fresh(site, answer);
                    }
                    for site in &done.missing {
                        println!("{site:<16} MISSING  no answer within {deadline:?}");
                    }
                }
                return Ok(if done.missing.is_empty() && !done.answers.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(exit::NO_ANSWER)
                });
            }
            client.close().await;
            let sites = dir.sites(tokio::time::Instant::now());
            if sites.is_empty() {
                eprintln!("no site answered");
                return Ok(ExitCode::from(exit::NO_ANSWER));
            }
            for site in &sites {
                if json {
                    println!("{site}");
                } else {
                    print_site(site);
                }
            }
        }
        Cmd::Components { conn, site, keys, state, stale, listen, watch, tree, json } => {
            let KeyArgs { realm, category, kind } = keys;
            let filter = busbar::directory::Filter { site, realm, category, kind, state, stale: stale.then_some(true) };
            let client = conn.connect().await?;
            let (mut listener, mut dir) = surveyed(&client, listen).await?;
            let rows = dir.components(&filter, tokio::time::Instant::now());
            if tree {
                print_tree(&rows);
            } else {
                for row in &rows {
                    print_component(row, json);
                }
            }
            if watch {
                until_interrupted(
                    async |until| listener.next_until(until).await,
                    |seen| {
                        let uuid = seen.payload.pointer("/properties/uuid").and_then(Value::as_str).map(str::to_owned);
                        if matches!(
                            observe(&mut dir, &seen),
                            busbar::directory::Change::Updated | busbar::directory::Change::Removed
                        ) && let Some(uuid) = uuid
                        {
                            let now = tokio::time::Instant::now();
                            let row = dir.components(&filter, now).into_iter().find(|r| r["uuid"] == uuid.as_str());
                            match row {
                                Some(row) => print_component(&row, json),
                                None if seen.state() == Some("gone") => {
                                    if json {
                                        println!("{}", serde_json::json!({"uuid": uuid, "state": "gone"}));
                                    } else {
                                        println!(
                                            "{:<12} {:<22} {:<24} {:<12} {:<5} {uuid}",
                                            "-", "-", "-", "gone", "-"
                                        );
                                    }
                                }
                                None => {}
                            }
                        }
                    },
                )
                .await;
            } else if rows.is_empty() {
                client.close().await;
                eprintln!("no component matched");
                return Ok(ExitCode::from(exit::NO_ANSWER));
            }
            client.close().await;
        }
        Cmd::Ping { conn, filter: args, timeout, quiet, json } => {
            let client = conn.connect().await?;
            let filter: Filter = args.clone().into();
            let mut shown = 0;
            client
                .ping(&filter, timeout, quiet, |seen| {
                    if !args.shows(&seen.payload) {
                        return;
                    }
                    shown += 1;
                    if json {
                        println!("{}", seen.payload);
                    } else {
                        print_row(&seen.payload);
                    }
                })
                .await?;
            client.close().await;
            if shown == 0 {
                eprintln!("no component answered");
                return Ok(ExitCode::from(exit::NO_ANSWER));
            }
        }
        Cmd::Monitor { conn, tree: true, .. } => {
            let client = conn.connect().await?;
            let (mut listener, mut dir) = surveyed(&client, Duration::from_millis(1500)).await?;
            let all = busbar::directory::Filter::default();
            print_tree(&dir.components(&all, tokio::time::Instant::now()));
            until_interrupted(
                async |until| listener.next_until(until).await,
                |seen| {
                    use busbar::directory::Change;
                    if matches!(observe(&mut dir, &seen), Change::Updated | Change::Removed) {
                        println!();
                        print_tree(&dir.components(&all, tokio::time::Instant::now()));
                    }
                },
            )
            .await;
            client.close().await;
        }
        Cmd::Monitor { conn, data: true, data_exchange, key, json, .. } => {
            let client = conn.connect().await?;
            let mut l = client.listen_data(&data_exchange, &key).await?;
            until_interrupted(
                async |until| l.next_until(until).await,
                |m| {
                    if json {
                        println!("{}", serde_json::json!({"routing_key": m.routing_key, "body": m.body}));
                    } else {
                        let ms = m.body.pointer("/metadata/timestamp").and_then(Value::as_i64).unwrap_or_default();
                        let time = jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default();
                        println!("{time}  {}  {}", m.routing_key, m.body.get("attrs").unwrap_or(&m.body));
                    }
                },
            )
            .await;
            client.close().await;
        }
        Cmd::Monitor { conn, filter: args, json, .. } => {
            let client = conn.connect().await?;
            let filter: Filter = args.clone().into();
            let mut l = client.listen(filter.binding()).await?;
            until_interrupted(
                async |until| l.next_until(until).await,
                |seen| {
                    if seen.is_status() && !args.shows(&seen.payload) {
                        return;
                    }
                    if json {
                        println!("{}", seen.monitor_json());
                    } else if seen.is_status() {
                        print_row(&seen.payload);
                    } else {
                        let uuid = seen.headers.get("uuid").and_then(Value::as_str).unwrap_or("-");
                        println!("{uuid:<36}  action {}", seen.payload);
                    }
                },
            )
            .await;
            client.close().await;
        }
        Cmd::Action { conn, action, uuid: uuids, parameters, model, results, when, wait, timeout, report } => {
            let mut body = Map::new();
            body.insert("action".into(), action.clone().into());
            if let Some(p) = parameters {
                body.insert("parameters".into(), Value::Object(object(&p)?));
            }
            if let Some(m) = model {
                body.insert("model".into(), document(&m)?);
            }
            if let Some(r) = results {
                body.insert("results".into(), document(&r)?);
            }
            let entry = busbar::state::Action::ALL.iter().find(|a| a.as_str() == action).and_then(|a| a.entry_state());
            if let Some(w) = when {
                body.insert("when".into(), w);
            }
            let body = Value::Object(body);
            let client = conn.connect().await?;
            if report {
                let Some(entry) = entry else {
                    return Err(Usage(format!("--report: {action:?} has no transient state to time")).into());
                };
                let seen = client.act_on_all(&uuids, &body, entry.as_str(), timeout).await?;
                client.close().await;
                return Ok(print_report(&seen, entry.as_str()));
            }
            let mut code = ExitCode::SUCCESS;
            for uuid in uuids {
                let one = match &wait {
                    Some(target) => {
                        wait_outcome(&client, &uuid, &body, Goal::State(target.clone()), timeout, false).await?
                    }
                    None => {
                        let filter = Filter { uuid: Some(uuid), ..Default::default() };
                        client.publish(filter.action_headers(), &body, None).await?;
                        ExitCode::SUCCESS
                    }
                };
                if one != ExitCode::SUCCESS {
                    code = one;
                }
            }
            client.close().await;
            return Ok(code);
        }
        Cmd::Create { conn, manager, parameters, json, timeout } => {
            let mut parameters = object(&parameters)?;
            // The client names the new component, so that it can follow it
            // (and print its uuid) whichever daemon creates it.
            let follow = match parameters.get("uuid") {
                Some(u) => u.as_str().and_then(|u| uuid::Uuid::try_parse(u).ok()).unwrap_or_default(),
                None => {
                    let u = uuid::Uuid::new_v4();
                    parameters.insert("uuid".into(), u.to_string().into());
                    u
                }
            };
            let body = serde_json::json!({"action": "create", "parameters": parameters});
            let client = conn.connect().await?;
            let print_uuid = !json;
            let code = wait_outcome(&client, &manager, &body, Goal::Created { follow }, timeout, print_uuid).await?;
            if json && code == ExitCode::SUCCESS {
                // The new component's own status, as it answers a ping.
                let to = Filter { uuid: Some(follow.to_string()), ..Default::default() };
                let quick = Duration::from_secs(2);
                client.ping(&to, quick, quick, |seen| println!("{}", seen.payload)).await?;
            }
            client.close().await;
            return Ok(code);
        }
        Cmd::Command { conn, uuid, name, value, expiration, wait, json, timeout } => {
            let value = value.map_or(Value::Null, |v| serde_json::from_str(&v).unwrap_or(Value::String(v)));
            let mut p = serde_json::json!({"name": name, "value": value});
            if let Some(e) = expiration {
                p["expiration"] = e.as_secs_f64().into();
            }
            let client = conn.connect().await?;
            let answer = client.command(&uuid, p, wait, timeout).await;
            client.close().await;
            return match answer {
                Ok(status) => Ok(print_command(&status, json)),
                Err(e) => unanswered(e, "the command was taken; see GET /iot/commands"),
            };
        }
        Cmd::Delete { conn, manager, uuid, timeout } => {
            let follow = uuid::Uuid::try_parse(&uuid).unwrap_or_default();
            let body = serde_json::json!({"action": "delete", "parameters": {"uuid": uuid}});
            let client = conn.connect().await?;
            let code = wait_outcome(&client, &manager, &body, Goal::Deleted { follow }, timeout, false).await?;
            client.close().await;
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn main() -> ExitCode {
    busbar::daemon::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    busbar::http::install_crypto_provider();
    let daemon = matches!(cli.cmd, Cmd::Daemon { .. });
    if daemon {
        busbar::serve::raise_fd_limit();
    } else {
        // A client piped into `head` ends quietly when the reader goes, as
        // Unix tools do, instead of panicking on a broken pipe.
        // SAFETY: called before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let level = cli.log_level.as_deref().unwrap_or(if daemon { "info" } else { "warn" });
    busbar::telemetry::init(level, cli.log_json);
    let rt = if daemon {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// An error and its causes on one line, each said once: lapin's errors
/// repeat their source in their own message, so `{:#}` would print the
/// same cause three times.
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        last = text;
    }
    out
}

/// The exit code for a failed command.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.is::<Usage>() {
        return exit::USAGE;
    }
    if e.is::<NoInput>() {
        return exit::NO_INPUT;
    }
    if e.is::<busbar::config::ConfigError>() {
        return exit::CONFIG;
    }
    match e.downcast_ref::<busbar::Error>() {
        Some(busbar::Error::Config(_) | busbar::Error::Spec { .. }) => exit::CONFIG,
        Some(busbar::Error::Usage(_)) => exit::USAGE,
        Some(busbar::Error::Link(_)) => exit::BROKER,
        Some(busbar::Error::Timeout(_)) => exit::TIMEOUT,
        Some(busbar::Error::NoAnswer(_)) => exit::NO_ANSWER,
        Some(busbar::Error::Bind(_) | busbar::Error::Io(_) | busbar::Error::Store(_)) => exit::IO,
        Some(busbar::Error::Internal(_)) | None => exit::SOFTWARE,
    }
}
