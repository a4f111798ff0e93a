//! Two sites, each with its own RabbitMQ node and its own busbar, joined by
//! RabbitMQ exchange federation exactly as `deploy/rabbitmq/federate` sets
//! it up: the directories see each other, actions cross, a cut link makes
//! the other site stale within 3.5 s, and healing brings it back equal to
//! the truth, 20 times over.
//!
//! Node 2 is started by `scripts/second-broker` (root only: the Debian
//! wrapper runs the node as the rabbitmq user); each test federates only
//! its own exchange, under upstream and policy names of its own.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

const SITE1_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SITE2_URL: &str = "amqp://guest:guest@127.0.0.1:5673/%2f";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Start the second node (idempotent); `None`, with a message, when this
/// user cannot (not root). Returns the node's name.
fn second_node(test: &str) -> Option<String> {
    if !broker::admin_or_skip(test) {
        return None;
    }
    let script = repo().join("scripts/second-broker");
    let out = Command::new(&script).arg("start").output().expect("scripts/second-broker runs");
    assert!(out.status.success(), "second-broker start: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(&script).arg("node").output().expect("scripts/second-broker runs");
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The federation of one test's exchange between the two nodes.
struct Link {
    prefix: String,
    exchange: String,
    node2: String,
}

impl Link {
    fn federate(&self, extra: &[&str]) {
        let script = repo().join("deploy/rabbitmq/federate");
        let common = ["--prefix", &self.prefix, "--exchange", &self.exchange];
        let site2 = format!("site2={SITE2_URL}");
        let site1 = format!("site1={SITE1_URL}");
        for args in [
            [&common[..], extra, &[site2.as_str()]].concat(),
            [&["--node", self.node2.as_str()][..], &common[..], extra, &[site1.as_str()]].concat(),
        ] {
            let out = Command::new(&script).args(&args).output().expect("federate runs");
            assert!(out.status.success(), "federate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    fn up(&self) {
        self.federate(&[]);
    }

    fn cut(&self) {
        self.federate(&["--remove"]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.federate(&["--purge"]);
    }
}

/// A site's config: its own broker, site name, data directory and uuids,
/// the shared exchange name.
fn site_config(env: &TestEnv, site: &str, url: &str, dir: &std::path::Path, dummy: Uuid, manager: Uuid) -> Value {
    json!({
        "broker": {"url": url},
        "exchange": env.exchange,
        "site": site,
        "data_dir": dir.join(site),
        "api": {"bind": "127.0.0.1:0"},
        "components": [
            {"category": "manager", "type": "generic", "name": format!("{site} manager"), "uuid": manager},
            {"category": "simulator", "type": "dummy", "name": format!("{site} dummy"), "uuid": dummy,
             "durations": {"stop": 0.05, "pause": 0.05, "resume": 0.05, "reset": 0.05}},
        ],
    })
}

/// `uuid → (state, stale)` of the ICs of `site` in `running`'s directory.
fn seen_at(running: &busbar::daemon::Running, site: &str) -> BTreeMap<Uuid, (String, bool)> {
    let dir = running.shared.env.directory.lock().unwrap();
    let filter = busbar::directory::Filter { site: Some(site.into()), ..Default::default() };
    dir.components(&filter, Instant::now())
        .into_iter()
        .map(|r| {
            let uuid = r["uuid"].as_str().unwrap().parse().unwrap();
            (uuid, (r["state"].as_str().unwrap().to_owned(), r["stale"] == true))
        })
        .collect()
}

/// `uuid → state` of every component `running` runs: the truth.
fn truth(running: &busbar::daemon::Running) -> BTreeMap<Uuid, (String, bool)> {
    running.shared.env.components.handles().iter().map(|h| (h.uuid(), (h.state().as_str().to_owned(), false))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_federated_sites_see_act_cut_and_heal() {
    let Some(node2) = second_node("two_federated_sites_see_act_cut_and_heal") else { return };
    let env = TestEnv::new();
    let (site1, site2) = (format!("alpha-{}", env.id), format!("beta-{}", env.id));
    let (dummy1, dummy2, manager2) = (env.dummy, Uuid::new_v4(), Uuid::new_v4());
    let dir = env.dir.path();
    let a = env.start_with(env.config_of(&site_config(&env, &site1, SITE1_URL, dir, dummy1, env.manager))).await;
    let b = env.start_with(env.config_of(&site_config(&env, &site2, SITE2_URL, dir, dummy2, manager2))).await;
    let link = Link { prefix: format!("t{}", env.id), exchange: env.exchange.clone(), node2 };
    link.up();

    // Each side's directory shows the other's controller and components
    // within 2 s of the link coming up.
    let start = Instant::now();
    eventually(Duration::from_secs(2), "each site sees the other", async || {
        (seen_at(&a, &site2) == truth(&b) && seen_at(&b, &site1) == truth(&a)).then_some(())
    })
    .await;
    eprintln!("sites saw each other after {:?}", start.elapsed());

    // An action published at site 1 reaches a component of site 2, and its
    // status comes back, once (max-hops 1: no duplicates).
    let client1 = env.client().await;
    let mut l1 = env.listen_all(&client1).await;
    client1.publish(to_uuid(dummy2), &action("ping", json!({})), None).await.unwrap();
    let answers = collect_for(&mut l1, Duration::from_millis(800)).await;
    let from_dummy2 = answers.iter().filter(|s| s.is_status() && s.payload["properties"]["uuid"] == dummy2.to_string());
    assert_eq!(from_dummy2.count(), 1, "one ping across the link, one answer back");
    client1.publish(to_uuid(dummy2), &action("start", json!({"runtime": 0.05})), None).await.unwrap();
    state_of(&mut l1, dummy2, "running").await;

    // The HTTP view says the same as the directory.
    let api = a.api_addr.expect("api");
    let sites: Value = reqwest::get(format!("http://{api}/api/v1/federation")).await.unwrap().json().await.unwrap();
    let names: Vec<&str> = sites["sites"].as_array().unwrap().iter().filter_map(|s| s["site"].as_str()).collect();
    assert!(names.contains(&site1.as_str()) && names.contains(&site2.as_str()), "{sites}");
    let url = format!("http://{api}/api/v1/federation/components?site={site2}&category=simulator");
    let rows: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    assert_eq!(rows["components"].as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows["components"][0]["uuid"], dummy2.to_string());

    // A distributed request: both sites answer, well before the deadline,
    // with their components fresh from each daemon.
    let t = Instant::now();
    let url = format!("http://{api}/api/v1/distributed/merge/components?deadline=2");
    let merged: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "every site answered, so it did not wait out the deadline");
    assert_eq!(merged["missing"], json!([]), "{merged}");
    let listed: Vec<&str> = merged["answers"].as_array().unwrap().iter().filter_map(|c| c["uuid"].as_str()).collect();
    assert!(listed.contains(&dummy1.to_string().as_str()) && listed.contains(&dummy2.to_string().as_str()), "{merged}");

    // Cut and heal, 20 times; while cut, site 2 changes (a component is
    // created or deleted, the dummy starts or stops), and after healing
    // site 1's directory equals site 2's truth: no ghost, nothing missing.
    let client2 = busbar::client::Client::connect(SITE2_URL, &env.exchange).await.unwrap();
    let mut created: Vec<Uuid> = Vec::new();
    let mut worst_stale = Duration::ZERO;
    let mut worst_heal = Duration::ZERO;
    for cycle in 0..20 {
        link.cut();
        let cut_at = Instant::now();
        eventually(Duration::from_millis(3500), "site 2 stale at site 1 after the cut", async || {
            let seen = seen_at(&a, &site2);
            (!seen.is_empty() && seen.values().all(|(_, stale)| *stale)).then_some(())
        })
        .await;
        worst_stale = worst_stale.max(cut_at.elapsed());
        // Site 1 keeps working on its own.
        assert!(seen_at(&a, &site1).values().all(|(_, stale)| !*stale), "cycle {cycle}: site 1 stays fresh");
        if cycle == 0 {
            // A distributed request with site 2 out of reach: back by its
            // deadline (+100 ms), site 1's answer in, site 2 named missing.
            let t = Instant::now();
            let url = format!("http://{api}/api/v1/distributed/split/health?deadline=1");
            let split: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            let took = t.elapsed();
            assert!(took <= Duration::from_millis(1100), "took {took:?}");
            assert_eq!(split["missing"], json!([site2.clone()]), "{split}");
            assert_eq!(split["answers"][&site1]["broker"]["connected"], true, "{split}");
            let o = cli(&env, &["sites", "--fresh", "--deadline", "1"]).await;
            let text = String::from_utf8_lossy(&o.stdout);
            assert_eq!(o.status.code(), Some(4), "a site missing: exit 4; {text}");
            assert!(text.contains(&format!("{site2:<16} MISSING")), "{text}");
        }
        // Site 2 changes while nobody at site 1 can hear it.
        match cycle % 3 {
            0 => {
                let uuid = Uuid::new_v4();
                let create =
                    json!({"category": "simulator", "type": "dummy", "name": format!("c{cycle}"), "uuid": uuid});
                client2
                    .publish(to_uuid(manager2), &json!({"action": "create", "parameters": create}), None)
                    .await
                    .unwrap();
                created.push(uuid);
            }
            1 => {
                if let Some(uuid) = created.pop() {
                    let delete = json!({"action": "delete", "parameters": {"uuid": uuid}});
                    client2.publish(to_uuid(manager2), &delete, None).await.unwrap();
                }
            }
            _ => {
                let next = if b.shared.env.components.lookup(dummy2).unwrap().state().as_str() == "running" {
                    "stop"
                } else {
                    "start"
                };
                client2.publish(to_uuid(dummy2), &action(next, json!({"runtime": 0.05})), None).await.unwrap();
            }
        }
        // Let site 2 settle (the dummy's transitions take 50 ms).
        eventually(WAIT, "site 2 settles", async || {
            let t = truth(&b);
            t.values().all(|(s, _)| matches!(s.as_str(), "idle" | "running")).then_some(())
        })
        .await;
        link.up();
        let healed_at = Instant::now();
        eventually(Duration::from_secs(5), "site 1's directory equals site 2's truth after healing", async || {
            (seen_at(&a, &site2) == truth(&b)).then_some(())
        })
        .await;
        worst_heal = worst_heal.max(healed_at.elapsed());
    }
    eprintln!("20 cut/heal cycles: stale within {worst_stale:?}, equal to the truth within {worst_heal:?}");

    // The CLI sees both sites, from site 1's broker.
    let o = cli(&env, &["sites"]).await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains(&site1) && text.contains(&site2), "{text}");
    let o = cli(&env, &["components", "--site", &site2, "--json"]).await;
    let rows: Vec<Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let uuids: Vec<&str> = rows.iter().filter_map(|r| r["uuid"].as_str()).collect();
    assert!(uuids.contains(&dummy2.to_string().as_str()), "{rows:?}");
    let o = cli(&env, &["components", "--tree"]).await;
    let tree = String::from_utf8_lossy(&o.stdout);
    // controller, root manager one level in, the dummy two levels in
    let dummy_line = format!("    {site2} dummy simulator/dummy");
    assert!(tree.contains(&format!("{site2} controller/busbar")) && tree.contains(&dummy_line), "{tree}");

    // A coordinated start of one component per site: the same `when`, and
    // the skew read back from each one's `status.since`.
    for (client, uuid) in [(&client1, dummy1), (&client2, dummy2)] {
        client.publish(to_uuid(uuid), &action("reset", json!({})), None).await.unwrap();
    }
    eventually(WAIT, "both dummies idle", async || {
        let idle =
            |r: &busbar::daemon::Running, u| r.shared.env.components.lookup(u).unwrap().state().as_str() == "idle";
        (idle(&a, dummy1) && idle(&b, dummy2)).then_some(())
    })
    .await;
    let (u1, u2) = (dummy1.to_string(), dummy2.to_string());
    let args = ["action", "start", "-u", &u1, "-u", &u2, "-p", "{runtime: 0.05}", "--when", "+2s", "--report"];
    let o = cli(&env, &args).await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}{}", String::from_utf8_lossy(&o.stderr));
    let skew: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("skew ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("a skew line: {text}"));
    eprintln!("coordinated start across two sites: skew {skew:.3} ms");
    assert!(skew < 50.0, "skew {skew} ms: {text}");

    client2.close().await;
    client1.close().await;
    // Site 2's controller says `gone` on the way out, and site 1 shows the
    // site as gone at once (not after three missed alives).
    let controller2 = b.shared.env.settings.controller;
    b.stop().await.expect("site 2 stops cleanly");
    eventually(Duration::from_millis(900), "site 1 shows site 2 gone", async || {
        let sites = a.shared.env.directory.lock().unwrap().sites(Instant::now());
        sites.iter().any(|s| s["uuid"] == controller2.to_string() && s["state"] == "gone").then_some(())
    })
    .await;
    drop(link);
    a.stop().await.expect("site 1 stops cleanly");
}
