//! The directory's rules, without a broker: statuses in, views out.

use super::*;

fn status(uuid: Uuid, category: &str, state: &str, managed_by: Option<Uuid>) -> Vec<u8> {
    let mut s = json!({"state": state});
    if let Some(m) = managed_by {
        s["managed_by"] = m.to_string().into();
    }
    serde_json::to_vec(&json!({
        "status": s,
        "properties": {"uuid": uuid, "name": format!("{category}-{}", &uuid.to_string()[..4]), "category": category, "type": "t", "realm": "lab"},
        "schema": {"big": [1, 2, 3]},
    }))
    .unwrap()
}

fn alive(uuid: Uuid, site: &str, alive: f64, sent: f64) -> Vec<u8> {
    alive_with_roots(uuid, site, alive, sent, &[])
}

fn alive_with_roots(uuid: Uuid, site: &str, alive: f64, sent: f64, roots: &[Uuid]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "status": {"state": "running", "alive_interval": alive, "time": sent, "roots": roots},
        "properties": {"uuid": uuid, "name": site, "category": "controller", "type": "busbar", "site": site},
    }))
    .unwrap()
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A site: controller → root manager (listed in the controller's `roots`,
/// naming no manager itself) → two simulators.
struct Site {
    controller: Uuid,
    manager: Uuid,
    sims: [Uuid; 2],
}

fn site(dir: &mut Directory, name: &str, now: Instant, wall: SystemTime) -> Site {
    let s = Site { controller: Uuid::new_v4(), manager: Uuid::new_v4(), sims: [Uuid::new_v4(), Uuid::new_v4()] };
    let first = alive_with_roots(s.controller, name, 1.0, secs(wall), &[s.manager]);
    assert_eq!(dir.observe(&first, now, wall), Change::Updated);
    dir.observe(&status(s.manager, "manager", "idle", None), now, wall);
    for sim in s.sims {
        dir.observe(&status(sim, "simulator", "idle", Some(s.manager)), now, wall);
    }
    s
}

#[test]
fn actions_and_garbage_are_ignored() {
    let mut dir = Directory::new(10);
    let (now, wall) = (Instant::now(), SystemTime::now());
    for body in [&b"{\"action\":\"ping\"}"[..], b"not json", b"{}", b"{\"status\":{},\"properties\":{}}", b"[1]"] {
        assert_eq!(dir.observe(body, now, wall), Change::Ignored, "{}", String::from_utf8_lossy(body));
    }
    assert!(dir.is_empty());
}

#[test]
fn a_state_change_updates_and_the_same_state_refreshes() {
    let mut dir = Directory::new(10);
    let (now, wall) = (Instant::now(), SystemTime::now());
    let u = Uuid::new_v4();
    assert_eq!(dir.observe(&status(u, "simulator", "idle", None), now, wall), Change::Updated);
    assert_eq!(dir.observe(&status(u, "simulator", "idle", None), now, wall), Change::Refreshed);
    assert_eq!(dir.observe(&status(u, "simulator", "running", None), now, wall), Change::Updated);
    let rows = dir.components(&Filter::default(), now);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "running");
    assert_eq!(dir.observe(&status(u, "simulator", "gone", None), now, wall), Change::Removed);
    assert!(dir.is_empty(), "gone ICs leave the directory");
}

#[test]
fn every_ic_belongs_to_the_site_at_the_top_of_its_managed_by_chain() {
    let mut dir = Directory::new(100);
    let (now, wall) = (Instant::now(), SystemTime::now());
    let a = site(&mut dir, "alpha", now, wall);
    let b = site(&mut dir, "beta", now, wall);
    let orphan = Uuid::new_v4();
    dir.observe(&status(orphan, "simulator", "idle", None), now, wall);
    let rows = dir.components(&Filter::default(), now);
    let site_of = |u: Uuid| rows.iter().find(|r| r["uuid"] == u.to_string()).unwrap()["site"].clone();
    assert_eq!(site_of(a.sims[0]), "alpha");
    assert_eq!(site_of(a.manager), "alpha");
    assert_eq!(site_of(b.sims[1]), "beta");
    assert_eq!(site_of(orphan), Value::Null, "no controller: no site");
    let parent_of = |u: Uuid| rows.iter().find(|r| r["uuid"] == u.to_string()).unwrap()["parent"].clone();
    assert_eq!(parent_of(a.manager), a.controller.to_string(), "a root manager hangs under its controller");
    assert_eq!(parent_of(a.sims[0]), a.manager.to_string());
    assert_eq!(parent_of(a.controller), Value::Null);
    let only_beta = dir.components(&Filter { site: Some("beta".into()), ..Default::default() }, now);
    assert_eq!(only_beta.len(), 4, "controller, manager, two simulators");
    let sites = dir.sites(now);
    assert_eq!(sites.len(), 2);
    assert_eq!(sites[0]["site"], "alpha");
    assert_eq!(sites[0]["components"], json!({"idle": 3}));
}

#[test]
fn a_site_goes_stale_after_three_missed_alives_and_everything_under_it_with_it() {
    let mut dir = Directory::new(100);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let a = site(&mut dir, "alpha", t0, wall);
    let b = site(&mut dir, "beta", t0, wall);
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    // Alpha keeps sending; beta falls silent.
    for i in 1..=4 {
        let body = alive_with_roots(a.controller, "alpha", 1.0, secs(wall) + f64::from(i), &[a.manager]);
        dir.observe(&body, at(f64::from(i)), wall);
    }
    assert!(!dir.is_stale(b.sims[0], at(2.9)), "two missed alives are not yet stale");
    assert!(dir.is_stale(b.sims[0], at(3.1)), "three missed alives are");
    assert!(dir.is_stale(b.manager, at(3.1)));
    assert!(dir.is_stale(b.controller, at(3.1)));
    assert!(!dir.is_stale(a.sims[0], at(4.0)), "alpha is alive, and so are its components");
    let stale = dir.components(&Filter { stale: Some(true), ..Default::default() }, at(4.0));
    assert_eq!(stale.len(), 4);
    assert!(stale.iter().all(|r| r["site"] == "beta"));
    // Beta comes back: sites_back says so once.
    assert_eq!(dir.sites_back(at(4.0)), vec![a.controller], "a new live site counts as one that came back");
    dir.observe(&alive_with_roots(b.controller, "beta", 1.0, secs(wall) + 5.0, &[b.manager]), at(5.0), wall);
    assert_eq!(dir.sites_back(at(5.0)), vec![b.controller]);
    assert!(dir.sites_back(at(5.1)).is_empty());
    assert!(!dir.is_stale(b.sims[0], at(5.1)));
}

#[test]
fn the_alive_interval_a_controller_advertises_sets_its_deadline() {
    let mut dir = Directory::new(10);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let c = Uuid::new_v4();
    dir.observe(&alive(c, "slow", 10.0, secs(wall)), t0, wall);
    assert!(!dir.is_stale(c, t0 + Duration::from_secs(29)));
    assert!(dir.is_stale(c, t0 + Duration::from_secs(31)));
}

#[test]
fn a_controller_that_says_gone_makes_its_site_stale_at_once() {
    let mut dir = Directory::new(100);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let a = site(&mut dir, "alpha", t0, wall);
    let gone = serde_json::to_vec(&json!({
        "status": {"state": "gone", "alive_interval": 1.0},
        "properties": {"uuid": a.controller, "name": "alpha", "category": "controller", "type": "busbar", "site": "alpha"},
    }))
    .unwrap();
    dir.observe(&gone, t0, wall);
    assert!(dir.is_stale(a.sims[0], t0));
    assert_eq!(dir.sites(t0)[0]["state"], "gone");
}

#[test]
fn orphans_go_stale_after_the_orphan_deadline() {
    let mut dir = Directory::new(10);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let u = Uuid::new_v4();
    dir.observe(&status(u, "simulator", "idle", None), t0, wall);
    assert!(!dir.is_stale(u, t0 + ORPHAN_STALE_AFTER - Duration::from_secs(1)));
    assert!(dir.is_stale(u, t0 + ORPHAN_STALE_AFTER + Duration::from_secs(1)));
}

#[test]
fn a_managers_list_removes_ghosts_deleted_while_unheard() {
    let mut dir = Directory::new(100);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let a = site(&mut dir, "alpha", t0, wall);
    // The manager now lists only the first simulator: the second was
    // deleted while this directory did not hear its `gone`.
    let body = serde_json::to_vec(&json!({
        "components": [a.sims[0]],
        "status": {"state": "idle"},
        "properties": {"uuid": a.manager, "name": "m", "category": "manager", "type": "generic"},
    }))
    .unwrap();
    dir.observe(&body, t0, wall);
    let uuids: Vec<Value> = dir.components(&Filter::default(), t0).iter().map(|r| r["uuid"].clone()).collect();
    assert!(uuids.contains(&a.sims[0].to_string().into()));
    assert!(!uuids.contains(&a.sims[1].to_string().into()), "the ghost is gone");
    assert_eq!(dir.len(), 3);
}

#[test]
fn a_full_directory_drops_new_ics_and_counts_them_but_updates_known_ones() {
    let mut dir = Directory::new(2);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    dir.observe(&status(a, "simulator", "idle", None), t0, wall);
    dir.observe(&status(b, "simulator", "idle", None), t0, wall);
    assert_eq!(dir.observe(&status(c, "simulator", "idle", None), t0, wall), Change::Dropped);
    assert_eq!(dir.dropped(), 1);
    assert_eq!(dir.observe(&status(a, "simulator", "running", None), t0, wall), Change::Updated);
    assert_eq!(dir.len(), 2);
}

#[test]
fn filters_select_by_every_key() {
    let mut dir = Directory::new(100);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let a = site(&mut dir, "alpha", t0, wall);
    dir.observe(&status(a.sims[0], "simulator", "running", Some(a.manager)), t0, wall);
    let count = |f: Filter| dir.components(&f, t0).len();
    assert_eq!(count(Filter { category: Some("simulator".into()), ..Default::default() }), 2);
    assert_eq!(count(Filter { state: Some("running".into()), ..Default::default() }), 2, "the sim and the controller");
    assert_eq!(count(Filter { kind: Some("busbar".into()), ..Default::default() }), 1);
    assert_eq!(count(Filter { realm: Some("lab".into()), ..Default::default() }), 3);
    assert_eq!(count(Filter { realm: Some("elsewhere".into()), ..Default::default() }), 0);
    assert_eq!(count(Filter { stale: Some(false), ..Default::default() }), 4);
}

#[test]
fn clock_offset_is_the_smallest_delay_seen_with_the_sign_of_the_peer_clock() {
    let mut dir = Directory::new(10);
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let c = Uuid::new_v4();
    // The peer's clock is 50 ms ahead; delays of 3, 1 and 2 ms.
    for delay_ms in [3.0, 1.0, 2.0] {
        dir.observe(&alive(c, "peer", 1.0, secs(wall) + 0.050 - delay_ms / 1000.0), t0, wall);
    }
    let offset = dir.sites(t0)[0]["clock_offset_ms"].as_f64().unwrap();
    assert!((offset - 49.0).abs() < 0.01, "{offset}");
    let links = dir.links(Uuid::new_v4(), t0);
    assert_eq!(links[0]["state"], "up");
}

#[test]
fn the_whole_view_is_one_shared_snapshot_kept_fresh_while_read() {
    let mut dir = Directory::new(100);
    let mut view = WholeView::default();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let a = Uuid::new_v4();
    dir.observe(&status(a, "simulator", "idle", None), t0, wall);
    let rows = |s: &Snapshot| serde_json::from_slice::<Value>(&s.body).unwrap()["components"].clone();
    // A first reader builds it.
    assert!(view.fresh(t0).is_none());
    view.store(dir.whole_view(t0));
    let first = view.fresh(t0).unwrap();
    assert_eq!(rows(&first)[0]["state"], "idle");
    // Within the age, readers share it, even after a change…
    dir.observe(&status(a, "simulator", "running", None), t0, wall);
    let again = view.fresh(t0 + Duration::from_millis(100)).unwrap();
    assert_eq!(first.body.as_ptr(), again.body.as_ptr(), "one build for every reader");
    // …which the feed's next tick builds in, so no reader waits for it.
    let tick = t0 + Duration::from_millis(150);
    assert!(view.due(tick, dir.generation()));
    view.store(dir.whole_view(tick));
    assert_eq!(rows(&view.fresh(t0 + Duration::from_millis(200)).unwrap())[0]["state"], "running");
    assert!(!view.due(t0 + Duration::from_millis(210), dir.generation()), "nothing changed, still young");
    assert!(view.due(tick + SNAPSHOT_MAX_AGE / 2, dir.generation()), "refreshed at half its age");
    // Past its age, a reader gets none and builds.
    assert!(view.fresh(t0 + Duration::from_secs(2)).is_none());
    // An older build does not replace a newer one.
    view.store(dir.whole_view(t0 + Duration::from_secs(2)));
    view.store(dir.whole_view(t0));
    assert_eq!(view.fresh(t0 + Duration::from_secs(2)).unwrap().built, t0 + Duration::from_secs(2));
    // Nobody reading: nothing is kept or built.
    assert!(!view.due(t0 + Duration::from_secs(2) + SNAPSHOT_KEEP_WARM + Duration::from_secs(1), dir.generation()));
    assert!(view.snapshot.is_none());
    assert!(Filter::default().is_everything());
    assert!(!Filter { stale: Some(true), ..Default::default() }.is_everything());
}
