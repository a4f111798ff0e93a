//! The federation directory: every daemon's live view of every IC on the
//! bus, local or remote (another site's, reached through RabbitMQ exchange
//! federation), fed by the status stream and nothing else.
//!
//! - [`Directory`] is the pure part: it takes status messages and time,
//!   and answers queries (sites, the merged component view, staleness).
//!   Tested without a broker.
//! - [`feed`] is the task: one queue bound to every message that carries a
//!   uuid header (every status does), a broadcast ping when it starts and
//!   whenever a site comes back (so what changed while the link was down is
//!   heard again), and the decoding.
//!
//! Sites: an IC belongs to the site whose controller (category
//! `controller`) is at the top of its `managed_by` chain; a controller's
//! status lists its `roots` (the root manager, which names no manager on
//! the wire, as VILLAScontroller's does not). A site is stale
//! once its controller missed three alive intervals (the interval the
//! controller itself advertises), and so is everything under it: a dark
//! site shows within about three seconds with the default interval.
//! ICs with no controller (a Python VILLAScontroller's) are stale once not
//! heard from for [`ORPHAN_STALE_AFTER`].
//!
//! Ghosts: a manager's status lists every component it manages, so when a
//! manager's status arrives, entries that claim it as manager but are not
//! in its list are removed (deleted while the link was down).
//!
//! Memory: an entry is about 300 bytes plus its strings (measured in
//! BENCHMARKS.md); the directory keeps at most `cap` entries and counts
//! what it drops.

mod feed;
pub mod gather;

pub use feed::{Ask, Asker, Feed, feed};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use uuid::Uuid;

/// How long an IC without a known controller stays fresh without a status.
pub const ORPHAN_STALE_AFTER: Duration = Duration::from_secs(120);

/// Alive intervals a controller may miss before its site is stale.
pub const MISSED_ALIVES: u32 = 3;

/// How many clock-offset samples of a peer are kept (the smallest wins).
const OFFSET_SAMPLES: usize = 16;

/// The longest `managed_by` chain followed to find an IC's site.
const MAX_DEPTH: usize = 8;

/// Filters of the merged view; `None` matches everything.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Filter {
    /// Site name (the controller's `site`).
    pub site: Option<String>,
    /// Realm.
    pub realm: Option<String>,
    /// Category.
    pub category: Option<String>,
    /// Type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// State.
    pub state: Option<String>,
    /// Only stale (true) or only fresh (false) ICs.
    pub stale: Option<bool>,
}

impl Filter {
    /// Whether it matches everything (the whole view).
    pub fn is_everything(&self) -> bool {
        let Filter { site, realm, category, kind, state, stale } = self;
        site.is_none() && realm.is_none() && category.is_none() && kind.is_none() && state.is_none() && stale.is_none()
    }
}

/// One IC as last heard.
#[derive(Debug)]
struct Entry {
    name: Box<str>,
    category: Box<str>,
    kind: Box<str>,
    realm: Option<Box<str>>,
    state: Box<str>,
    managed_by: Option<Uuid>,
    error: Option<Box<str>>,
    last_seen: Instant,
    seen_wall: SystemTime,
    /// Set for controllers: what a site shows.
    controller: Option<Box<Controller>>,
}

/// What the directory keeps of a controller.
#[derive(Debug)]
struct Controller {
    site: Box<str>,
    alive: Duration,
    /// The controller's whole `status` object (a few per federation).
    status: Map<String, Value>,
    /// Receive time minus send time of its last alive messages, in ms.
    offsets: std::collections::VecDeque<f64>,
    /// Whether it was stale when last looked at (to notice a site coming back).
    was_stale: bool,
}

impl Controller {
    /// The peer's clock minus ours, upper bound: the smallest
    /// (receive − send) seen, which is the offset plus the shortest one-way
    /// delay. Negative when the peer's clock is ahead.
    fn offset_ms(&self) -> Option<f64> {
        self.offsets.iter().copied().reduce(f64::min).map(|o| -((o * 100.0).round() / 100.0))
    }
}

/// What a status message did to the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Not a status (an action, or a body the directory cannot read).
    Ignored,
    /// A new IC, or one whose state changed.
    Updated,
    /// The same state again (an alive message, a periodic status).
    Refreshed,
    /// The IC is gone and was removed.
    Removed,
    /// The directory is full; the IC was not added.
    Dropped,
}

/// The status envelope, as far as the directory reads it. `schema` and the
/// other large parts are skipped without being built.
#[derive(Deserialize)]
struct Envelope {
    status: Option<Map<String, Value>>,
    properties: Option<Properties>,
    components: Option<Vec<Uuid>>,
}

/// The event topic of a status message (`/status/{realm}/{category}/{type}/{uuid}`),
/// from its `properties`; `None` when it names no uuid.
pub fn status_topic_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Only {
        properties: Properties,
    }
    let p = serde_json::from_slice::<Only>(body).ok()?.properties;
    let field = |f: Option<String>| f.filter(|s| !s.is_empty() && !s.contains('/')).unwrap_or_else(|| "-".into());
    Some(crate::events::status_topic(&field(p.realm), &field(p.category), &field(p.kind), &p.uuid?))
}

#[derive(Deserialize)]
struct Properties {
    uuid: Option<Uuid>,
    name: Option<String>,
    category: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    realm: Option<String>,
    site: Option<String>,
}

/// The live view of every IC heard on the bus.
#[derive(Debug)]
pub struct Directory {
    entries: HashMap<Uuid, Entry>,
    /// Root component → the controller that lists it in `roots`.
    roots: HashMap<Uuid, Uuid>,
    cap: usize,
    dropped: u64,
    removed_ghosts: u64,
    /// Bumped by every message that was not ignored.
    generation: u64,
}

/// The whole merged view as the API sends it, built once for every reader
/// until it is [`SNAPSHOT_MAX_AGE`] old.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `{"components": [rows…]}` (shared, never copied).
    pub body: bytes::Bytes,
    /// When it was built.
    pub built: Instant,
    /// The directory's generation it was built from.
    pub generation: u64,
}

/// The snapshot of the whole view and who reads it; pure. It has a lock of
/// its own (`component::Env::whole_view`), so a reader never waits on the
/// directory's lock while the feed rebuilds it.
#[derive(Debug, Default)]
pub struct WholeView {
    snapshot: Option<Snapshot>,
    wanted: Option<Instant>,
}

impl WholeView {
    /// A reader at `now`: the snapshot if it is at most
    /// [`SNAPSHOT_MAX_AGE`] old (else the reader builds one and
    /// [`WholeView::store`]s it).
    pub fn fresh(&mut self, now: Instant) -> Option<Snapshot> {
        self.wanted = Some(now);
        self.snapshot.clone().filter(|s| now.saturating_duration_since(s.built) <= SNAPSHOT_MAX_AGE)
    }

    /// Whether the feed's tick should rebuild it: somebody read it within
    /// [`SNAPSHOT_KEEP_WARM`], and the directory changed since or it is
    /// half its allowed age (so no reader waits for a build). With no
    /// reader, the snapshot is dropped.
    pub fn due(&mut self, now: Instant, generation: u64) -> bool {
        if self.wanted.is_none_or(|w| now.saturating_duration_since(w) > SNAPSHOT_KEEP_WARM) {
            self.snapshot = None;
            return false;
        }
        match &self.snapshot {
            None => true,
            Some(s) => s.generation != generation || now.saturating_duration_since(s.built) >= SNAPSHOT_MAX_AGE / 2,
        }
    }

    /// Keep `s` (unless a newer one is kept already).
    pub fn store(&mut self, s: Snapshot) {
        if self.snapshot.as_ref().is_none_or(|old| old.built <= s.built) {
            self.snapshot = Some(s);
        }
    }
}

/// How old a snapshot of the whole view may be when it is served. With
/// 10,000 ICs the view is ≈2.5 MB of JSON and ≈10 ms to build; readers
/// share one build instead of each paying for it.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(500);

/// How long after the last request for the whole view the feed keeps its
/// snapshot fresh (nobody asking costs nothing).
pub const SNAPSHOT_KEEP_WARM: Duration = Duration::from_secs(10);

impl Directory {
    /// An empty directory keeping at most `cap` ICs.
    pub fn new(cap: usize) -> Self {
        Directory { entries: HashMap::new(), roots: HashMap::new(), cap, dropped: 0, removed_ghosts: 0, generation: 0 }
    }

    /// Number of ICs known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no IC is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// ICs not added because the directory was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Take one message body heard at `now` (`wall`: the same instant on the
    /// wall clock, for clock offsets and `last_seen`).
    pub fn observe(&mut self, body: &[u8], now: Instant, wall: SystemTime) -> Change {
        let change = self.take(body, now, wall);
        if change != Change::Ignored {
            self.generation += 1;
        }
        change
    }

    /// Whether `uuid` is an IC this directory knows (of any site).
    pub fn knows(&self, uuid: &Uuid) -> bool {
        self.entries.contains_key(uuid)
    }

    /// Bumped by every message that changed or refreshed something.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The whole merged view (every IC, unfiltered) as JSON, as of `now`.
    pub fn whole_view(&self, now: Instant) -> Snapshot {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            components: Vec<Row<'a>>,
        }
        // Sized up front (≈250 bytes a row), so writing 2.5 MB does not
        // grow the buffer by doubling and copying.
        let mut body = Vec::with_capacity(64 + self.entries.len() * 256);
        let _ = serde_json::to_writer(&mut body, &Body { components: self.rows(&Filter::default(), now) });
        Snapshot { body: body.into(), built: now, generation: self.generation }
    }

    fn take(&mut self, body: &[u8], now: Instant, wall: SystemTime) -> Change {
        let Ok(env) = serde_json::from_slice::<Envelope>(body) else { return Change::Ignored };
        let (Some(status), Some(props)) = (env.status, env.properties) else { return Change::Ignored };
        let (Some(uuid), Some(state)) = (props.uuid, status.get("state").and_then(Value::as_str)) else {
            return Change::Ignored;
        };
        let state: Box<str> = state.into();
        let category = props.category.unwrap_or_default();
        if let Some(list) = &env.components {
            self.prune(uuid, list);
        }
        if &*state == "gone" && category != "controller" {
            return if self.entries.remove(&uuid).is_some() { Change::Removed } else { Change::Refreshed };
        }
        if !self.entries.contains_key(&uuid) && self.entries.len() >= self.cap {
            self.dropped += 1;
            return Change::Dropped;
        }
        let managed_by = status.get("managed_by").and_then(Value::as_str).and_then(|s| s.parse().ok());
        let error = status.get("error").and_then(|e| e.get("msg")).and_then(Value::as_str).map(Box::from);
        let controller = (category == "controller").then(|| {
            let alive = status.get("alive_interval").and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0);
            let sent = status.get("time").and_then(Value::as_f64);
            let received = wall.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
            (props.site.clone(), alive, sent.map(|s| (received - s) * 1000.0), status)
        });
        let changed = match self.entries.get_mut(&uuid) {
            Some(e) => {
                let changed = e.state != state;
                if changed {
                    e.state = state;
                }
                e.managed_by = managed_by;
                e.error = error;
                e.last_seen = now;
                e.seen_wall = wall;
                if let Some(name) = props.name.as_deref().filter(|n| **n != *e.name) {
                    e.name = name.into();
                }
                changed
            }
            None => {
                let e = Entry {
                    name: props.name.unwrap_or_default().into(),
                    category: category.as_str().into(),
                    kind: props.kind.unwrap_or_default().into(),
                    realm: props.realm.map(Into::into),
                    state,
                    managed_by,
                    error,
                    last_seen: now,
                    seen_wall: wall,
                    controller: None,
                };
                self.entries.insert(uuid, e);
                true
            }
        };
        if let Some((site, alive, offset, status)) = controller {
            // A status without `roots` (its `gone`) keeps the last list,
            // so the site's components stay attached to it.
            if let Some(listed) = status.get("roots").and_then(Value::as_array) {
                self.roots.retain(|_, c| *c != uuid);
                for root in listed.iter().filter_map(Value::as_str).filter_map(|r| r.parse().ok()).take(64) {
                    self.roots.insert(root, uuid);
                }
            }
            let e = self.entries.get_mut(&uuid).expect("inserted above");
            let c = e.controller.get_or_insert_with(|| {
                Box::new(Controller {
                    site: "".into(),
                    alive: Duration::from_secs(1),
                    status: Map::new(),
                    offsets: Default::default(),
                    // A site heard for the first time counts as one that
                    // came back: its components are asked to announce.
                    was_stale: true,
                })
            });
            c.site = site.unwrap_or_else(|| e.name.to_string()).into();
            if let Some(a) = alive {
                c.alive = Duration::from_secs_f64(a.min(3600.0));
            }
            if let Some(o) = offset.filter(|o| o.is_finite()) {
                if c.offsets.len() == OFFSET_SAMPLES {
                    c.offsets.pop_front();
                }
                c.offsets.push_back(o);
            }
            c.status = status;
        }
        if changed { Change::Updated } else { Change::Refreshed }
    }

    /// A manager's status lists every component it manages: forget the
    /// entries that name it as manager but are not listed (deleted while
    /// this site did not hear it).
    fn prune(&mut self, manager: Uuid, listed: &[Uuid]) {
        let ghosts: Vec<Uuid> = self
            .entries
            .iter()
            .filter(|(u, e)| e.managed_by == Some(manager) && !listed.contains(u))
            .map(|(u, _)| *u)
            .collect();
        for u in ghosts {
            self.entries.remove(&u);
            self.removed_ghosts += 1;
        }
    }

    /// The controller at the top of `uuid`'s `managed_by` chain.
    fn site_of(&self, uuid: Uuid) -> Option<(Uuid, &Entry)> {
        let mut at = uuid;
        for _ in 0..MAX_DEPTH {
            let e = self.entries.get(&at)?;
            if e.controller.is_some() {
                return Some((at, e));
            }
            at = match e.managed_by {
                Some(m) => m,
                None => *self.roots.get(&at)?,
            };
        }
        None
    }

    fn controller_stale(c: &Entry, now: Instant) -> bool {
        let Some(ctl) = &c.controller else { return true };
        &*c.state == "gone" || now.saturating_duration_since(c.last_seen) > ctl.alive * MISSED_ALIVES
    }

    /// Whether `uuid` is stale at `now` (see the module docs).
    pub fn is_stale(&self, uuid: Uuid, now: Instant) -> bool {
        match self.site_of(uuid) {
            Some((_, c)) => Self::controller_stale(c, now),
            None => {
                self.entries.get(&uuid).is_none_or(|e| now.saturating_duration_since(e.last_seen) > ORPHAN_STALE_AFTER)
            }
        }
    }

    /// Sites whose controller was stale (or unknown) and is fresh at `now`
    /// (so the feed asks everyone to announce themselves). Also records the
    /// current staleness of every site.
    pub fn sites_back(&mut self, now: Instant) -> Vec<Uuid> {
        let mut back = Vec::new();
        for (u, e) in self.entries.iter_mut() {
            let stale = Self::controller_stale(e, now);
            if let Some(c) = e.controller.as_mut() {
                if c.was_stale && !stale {
                    back.push(*u);
                }
                c.was_stale = stale;
            }
        }
        back
    }

    /// The controller at the top of `uuid`'s chain, with the parents
    /// already resolved in `memo` (a query resolves each manager once, not
    /// once per component under it).
    fn controller_of(&self, uuid: Uuid, memo: &mut HashMap<Uuid, Option<Uuid>>) -> Option<Uuid> {
        let e = self.entries.get(&uuid)?;
        if e.controller.is_some() {
            return Some(uuid);
        }
        let parent = e.managed_by.or_else(|| self.roots.get(&uuid).copied())?;
        if let Some(known) = memo.get(&parent) {
            return *known;
        }
        let found = self.site_of(parent).map(|(c, _)| c);
        memo.insert(parent, found);
        found
    }

    /// Every IC that passes `filter`, sorted by site, then category, type
    /// and name, ready to serialise (the HTTP API writes them straight out).
    pub fn rows(&self, filter: &Filter, now: Instant) -> Vec<Row<'_>> {
        let mut memo = HashMap::new();
        let mut rows: Vec<Row<'_>> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                filter.realm.as_ref().is_none_or(|r| e.realm.as_deref() == Some(r.as_str()))
                    && filter.category.as_ref().is_none_or(|c| *e.category == **c)
                    && filter.kind.as_ref().is_none_or(|k| *e.kind == **k)
                    && filter.state.as_ref().is_none_or(|s| *e.state == **s)
            })
            .filter_map(|(u, e)| {
                let controller = self.controller_of(*u, &mut memo).and_then(|c| self.entries.get(&c));
                let site = controller.and_then(|c| c.controller.as_ref()).map(|c| &*c.site);
                let stale = match controller {
                    Some(c) => Self::controller_stale(c, now),
                    None => now.saturating_duration_since(e.last_seen) > ORPHAN_STALE_AFTER,
                };
                let keep =
                    filter.site.as_deref().is_none_or(|s| site == Some(s)) && filter.stale.is_none_or(|s| s == stale);
                keep.then(|| Row {
                    uuid: *u,
                    name: &e.name,
                    category: &e.category,
                    kind: &e.kind,
                    realm: e.realm.as_deref(),
                    state: &e.state,
                    site,
                    stale,
                    last_seen: unix(e.seen_wall),
                    age: round3(now.saturating_duration_since(e.last_seen).as_secs_f64()),
                    managed_by: e.managed_by,
                    parent: e.managed_by.or_else(|| self.roots.get(u).copied()),
                    error: e.error.as_deref().map(|msg| ErrorMsg { msg }),
                })
            })
            .collect();
        rows.sort_unstable_by(|a, b| {
            (a.site, a.category, a.kind, a.name, a.uuid).cmp(&(b.site, b.category, b.kind, b.name, b.uuid))
        });
        rows
    }

    /// [`Directory::rows`] as JSON values.
    pub fn components(&self, filter: &Filter, now: Instant) -> Vec<Value> {
        self.rows(filter, now).iter().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).collect()
    }

    /// One JSON object per site: its controller's last status, whether it
    /// is stale, when it was last heard, its clock offset from this daemon,
    /// and its ICs counted by state.
    pub fn sites(&self, now: Instant) -> Vec<Value> {
        let mut counts: HashMap<Uuid, std::collections::BTreeMap<&str, u64>> = HashMap::new();
        let mut memo = HashMap::new();
        for (u, e) in &self.entries {
            let Some(site) = self.controller_of(*u, &mut memo) else { continue };
            if site == *u {
                continue;
            }
            *counts.entry(site).or_default().entry(&e.state).or_insert(0) += 1;
        }
        let mut sites: Vec<Value> = self
            .entries
            .iter()
            .filter_map(|(u, e)| {
                let c = e.controller.as_ref()?;
                Some(json!({
                    "site": &*c.site,
                    "uuid": u,
                    "name": &*e.name,
                    "realm": e.realm.as_deref(),
                    "state": &*e.state,
                    "stale": Self::controller_stale(e, now),
                    "last_seen": unix(e.seen_wall),
                    "age": round3(now.saturating_duration_since(e.last_seen).as_secs_f64()),
                    "alive_interval": c.alive.as_secs_f64(),
                    "clock_offset_ms": c.offset_ms(),
                    "components": counts.remove(u).unwrap_or_default(),
                    "status": &c.status,
                }))
            })
            .collect();
        sites.sort_by(|a, b| a["site"].as_str().cmp(&b["site"].as_str()));
        sites
    }

    /// The peers of the controller `me`, as its status shows them: each
    /// other site's name, whether it is heard, when last, and its clock
    /// offset.
    pub fn links(&self, me: Uuid, now: Instant) -> Vec<Value> {
        let mut links: Vec<Value> = self
            .entries
            .iter()
            .filter(|(u, _)| **u != me)
            .filter_map(|(u, e)| {
                let c = e.controller.as_ref()?;
                Some(json!({
                    "site": &*c.site,
                    "uuid": u,
                    "state": if Self::controller_stale(e, now) { "stale" } else { "up" },
                    "age": round3(now.saturating_duration_since(e.last_seen).as_secs_f64()),
                    "clock_offset_ms": c.offset_ms(),
                }))
            })
            .collect();
        links.sort_by(|a, b| a["site"].as_str().cmp(&b["site"].as_str()));
        links
    }

    /// The sites a distributed request expects to answer: every controller
    /// heard that did not say `gone` (stale ones included: they are the
    /// ones likely to miss the deadline, and are named when they do).
    pub fn expected_sites(&self) -> std::collections::BTreeMap<Uuid, String> {
        self.entries
            .iter()
            .filter(|(_, e)| &*e.state != "gone")
            .filter_map(|(u, e)| Some((*u, e.controller.as_ref()?.site.to_string())))
            .collect()
    }

    /// Heap bytes held, approximately (for the memory benchmark's check).
    pub fn approx_bytes(&self) -> usize {
        let per = std::mem::size_of::<(Uuid, Entry)>() + 16;
        self.entries
            .values()
            .map(|e| {
                per + e.name.len()
                    + e.category.len()
                    + e.kind.len()
                    + e.state.len()
                    + e.realm.as_ref().map_or(0, |r| r.len())
            })
            .sum()
    }
}

/// One IC of the merged view (`GET /api/v1/federation/components`).
#[derive(Debug, serde::Serialize)]
pub struct Row<'a> {
    /// Its uuid.
    pub uuid: Uuid,
    /// `properties.name`.
    pub name: &'a str,
    /// `properties.category`.
    pub category: &'a str,
    /// `properties.type`.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// `properties.realm`.
    pub realm: Option<&'a str>,
    /// `status.state`.
    pub state: &'a str,
    /// Its site (the controller at the top of its chain), if known.
    pub site: Option<&'a str>,
    /// Whether its site (or it, without one) is stale.
    pub stale: bool,
    /// When it was last heard (Unix seconds, µs).
    pub last_seen: f64,
    /// Seconds since.
    pub age: f64,
    /// `status.managed_by`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<Uuid>,
    /// The IC above it: its manager, or for a root manager its controller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    /// `status.error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorMsg<'a>>,
}

/// `{"msg": …}`.
#[derive(Debug, serde::Serialize)]
pub struct ErrorMsg<'a> {
    /// The message.
    pub msg: &'a str,
}

fn unix(t: SystemTime) -> f64 {
    let s = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
    (s * 1e6).round() / 1e6
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests;
