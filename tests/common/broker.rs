//! Broker faults for tests, on the real RabbitMQ through `rabbitmqctl`:
//! drop connections from the broker side, and give a test a broker user of
//! its own whose connections can be refused (an outage for that test
//! alone, whatever else runs on the broker).

/// Whether `rabbitmqctl` works here: Debian lets only root (and the
/// rabbitmq user) run it. Tests that need it call [`admin_or_skip`].
pub fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        std::process::Command::new("rabbitmqctl").args(["list_users", "-q"]).output().is_ok_and(|o| o.status.success())
    })
}

/// `false`, with a message on stderr, when `rabbitmqctl` cannot be used
/// (a normal user): the calling test then ends, skipped, instead of
/// failing for want of root.
pub fn admin_or_skip(test: &str) -> bool {
    let ok = usable();
    if !ok {
        eprintln!("skipped {test}: it needs rabbitmqctl, which this user cannot run (run the suite as root)");
    }
    ok
}

/// Run `rabbitmqctl args`; its standard output. Panics if it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many connections' client-provided names contain `name`.
pub fn connections_named(name: &str) -> usize {
    let list = rabbitmqctl(&["list_connections", "client_properties", "-q", "--no-table-headers"]);
    list.lines().filter(|l| l.contains(name)).count()
}

/// Close, from the broker side, every connection whose client-provided
/// name contains `name` (`busbar daemon exchange=…`, `busbar federation
/// gateway=…`); how many were closed. Panics if there is none.
pub fn close_connections(name: &str) -> usize {
    let list = rabbitmqctl(&["list_connections", "pid", "client_properties", "-q", "--no-table-headers"]);
    let pids: Vec<&str> =
        list.lines().filter(|l| l.contains(name)).filter_map(|l| l.split_whitespace().next()).collect();
    assert!(!pids.is_empty(), "no connection named {name}");
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "test: connection dropped by the broker"]);
    }
    pids.len()
}

/// How many bindings have `exchange` as their source.
pub fn bindings_on(exchange: &str) -> usize {
    let list = rabbitmqctl(&["list_bindings", "source_name", "destination_name", "-q", "--no-table-headers"]);
    list.lines().filter(|l| l.split('\t').next() == Some(exchange)).count()
}

/// A broker user of the test's own, deleted when dropped.
pub struct BrokerUser {
    /// The user name.
    pub name: String,
}

impl BrokerUser {
    /// A user `busbar-<id>` with full permissions on `/`.
    pub fn new(id: &str) -> BrokerUser {
        let name = format!("busbar-{id}");
        rabbitmqctl(&["add_user", &name, "secret"]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser { name }
    }

    /// `url` (a guest URL) with this user's credentials.
    pub fn url(&self, url: &str) -> String {
        url.replace("guest:guest@", &format!("{}:secret@", self.name))
    }

    /// Refuse new connections of this user (existing ones stay until
    /// closed, see [`close_connections`]).
    pub fn refuse(&self) {
        rabbitmqctl(&["set_user_limits", &self.name, "{\"max-connections\": 0}"]);
    }

    /// Accept its connections again.
    pub fn admit(&self) {
        rabbitmqctl(&["set_user_limits", &self.name, "{\"max-connections\": -1}"]);
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["delete_user", &self.name]).output();
    }
}
