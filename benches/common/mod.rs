//! What the benchmark binaries share: ports, percentiles, the daemon as a
//! separate release process, and its resident memory.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The scenarios named on the command line (`cargo bench --bench X -- a b`;
/// none named: all), or `None` when not run by `cargo bench` (`cargo test`
/// builds benches too).
pub fn scenarios() -> Option<Vec<String>> {
    if !std::env::args().any(|a| a == "--bench") {
        return None;
    }
    busbar::http::install_crypto_provider();
    Some(std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect())
}

/// Whether scenario `s` runs: named, or none named.
pub fn wants(named: &[String], s: &str) -> bool {
    named.is_empty() || named.iter().any(|a| a == s)
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `p` percentile of sorted durations.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of process `pid`; for "self", this process
/// and its waited-for children (`wrk`).
pub fn cpu_of(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = s.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let fields = if pid == "self" { 11..15 } else { 11..13 };
    let ticks: u64 = f[fields].iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
    ticks as f64 / 100.0
}

/// The pid of the first process whose command name is `comm`.
pub fn pid_of(comm: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        name.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        (std::fs::read_to_string(e.path().join("comm")).ok()?.trim() == comm).then_some(name)
    })
}

/// Start the release daemon on config `cfg`, its log (at `level`) to
/// `log` or nowhere.
pub fn spawn_daemon(cfg: &Path, level: &str, log: Option<&Path>) -> Child {
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap()),
        None => Stdio::inherit(),
    };
    // BENCH_DAEMON_WRAPPER runs the daemon under a profiler, for example
    // `heaptrack -o /tmp/busbar` or `valgrind --tool=massif`.
    let wrapper = std::env::var("BENCH_DAEMON_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(env!("CARGO_BIN_EXE_busbar"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_busbar")),
    };
    cmd.args(["--log-level", level, "daemon", "-c"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("daemon starts")
}

/// SIGTERM a child (a graceful shutdown) and reap it.
pub fn terminate(child: &mut Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

/// Publish `n` messages to `exchange` with at most `window` unanswered,
/// counting one delivery on `replies` per message; messages per second.
pub async fn windowed_rate(
    ch: &lapin::Channel,
    exchange: &str,
    props: &lapin::BasicProperties,
    body: &[u8],
    replies: &mut lapin::Consumer,
    n: usize,
    window: usize,
) -> f64 {
    use futures_util::StreamExt;
    let start = std::time::Instant::now();
    let (mut sent, mut got) = (0, 0);
    while got < n {
        while sent < n && sent - got < window {
            ch.basic_publish(exchange.into(), "".into(), Default::default(), body, props.clone()).await.unwrap();
            sent += 1;
        }
        replies.next().await.unwrap().unwrap();
        got += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The daemon under test, stopped gracefully when dropped.
pub struct Daemon {
    /// Its process.
    pub child: Child,
    /// Its exchange.
    pub exchange: String,
    /// Its config and data, removed with it.
    pub _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}
