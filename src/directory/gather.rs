//! Distributed requests: one question to every controller of the
//! federation, answered by its deadline whatever happens to the sites.
//!
//! The question is a `ping` to category `controller` carrying a
//! `correlation_id` and no `reply_to`: the answers are statuses on the
//! federated exchange (a `reply_to` queue lives on one broker and would not
//! be reached from another site), picked out by their correlation id. The
//! request ends when every expected site answered, or at its deadline, and
//! then names the sites that did not answer. This part is pure: the
//! directory feed (daemon) and the CLI client carry the messages.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// What a distributed request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// Each controller's status: load, memory, broker link, components by
    /// state, links.
    Health,
    /// Each site's components, fresh from its daemon.
    Components,
}

impl Query {
    /// `health` or `components`.
    pub fn parse(name: &str) -> Option<Query> {
        match name {
            "health" => Some(Query::Health),
            "components" => Some(Query::Components),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Query::Health => "health",
            Query::Components => "components",
        }
    }

    /// The action body every controller gets.
    pub fn body(self) -> Value {
        match self {
            Query::Health => json!({"action": "ping"}),
            Query::Components => json!({"action": "ping", "parameters": {"include": ["components"]}}),
        }
    }
}

/// The longest deadline a request may ask for.
pub const MAX_DEADLINE: Duration = Duration::from_secs(30);

/// One distributed request in flight.
#[derive(Debug)]
pub struct Gather {
    /// Its correlation id (the answers carry it).
    pub correlation: String,
    query: Query,
    /// The sites expected to answer: controller uuid → site name.
    expected: BTreeMap<Uuid, String>,
    answers: BTreeMap<String, Value>,
    started: Instant,
    /// When it ends, answered or not.
    pub deadline: Instant,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Gathered {
    /// What was asked.
    pub query: Query,
    /// Site → its answer.
    pub answers: BTreeMap<String, Value>,
    /// Expected sites that did not answer by the deadline.
    pub missing: Vec<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Gather {
    /// A request for `query`, expecting the sites in `expected`, ending at
    /// `now + deadline` (at most [`MAX_DEADLINE`]).
    pub fn new(query: Query, expected: BTreeMap<Uuid, String>, deadline: Duration, now: Instant) -> Gather {
        Gather {
            correlation: format!("busbar-gather-{}", Uuid::new_v4().simple()),
            query,
            expected,
            answers: BTreeMap::new(),
            started: now,
            deadline: now + deadline.min(MAX_DEADLINE),
        }
    }

    /// Take a message with `correlation`; whether it was an answer to this
    /// request. A site answering that was not expected counts too.
    pub fn offer(&mut self, correlation: Option<&str>, body: &Value) -> bool {
        if correlation != Some(self.correlation.as_str()) {
            return false;
        }
        let props = &body["properties"];
        if props["category"] != "controller" {
            return false;
        }
        let site = props["site"].as_str().or(props["name"].as_str()).unwrap_or_default().to_owned();
        let mut status = body["status"].as_object().cloned().unwrap_or_default();
        let answer = match self.query {
            Query::Health => {
                status.shift_remove("local");
                Value::Object(status)
            }
            Query::Components => status.shift_remove("local").unwrap_or(Value::Array(Vec::new())),
        };
        if let Some(u) = props["uuid"].as_str().and_then(|u| u.parse().ok()) {
            self.expected.entry(u).or_insert_with(|| site.clone());
        }
        self.answers.insert(site, answer);
        true
    }

    /// Whether every expected site answered.
    pub fn complete(&self) -> bool {
        self.expected.values().all(|site| self.answers.contains_key(site))
    }

    /// End the request at `now`.
    pub fn finish(self, now: Instant) -> Gathered {
        let missing = self.expected.values().filter(|s| !self.answers.contains_key(*s)).cloned().collect();
        Gathered {
            query: self.query,
            answers: self.answers,
            missing,
            elapsed: now.saturating_duration_since(self.started),
        }
    }
}

impl Gathered {
    /// The answers grouped per site (ALMANAC's `distributed-split`).
    pub fn split(&self) -> Value {
        json!({
            "query": self.query.as_str(),
            "answers": self.answers,
            "missing": self.missing,
            "elapsed": self.elapsed.as_secs_f64(),
        })
    }

    /// The answers as one list, each item naming its site (ALMANAC's
    /// `distributed-merge`).
    pub fn merge(&self) -> Value {
        let mut all = Vec::new();
        for (site, answer) in &self.answers {
            let items: Vec<Value> = match answer {
                Value::Array(items) => items.clone(),
                other => vec![other.clone()],
            };
            for item in items {
                let mut m: Map<String, Value> = item.as_object().cloned().unwrap_or_default();
                m.insert("site".into(), site.clone().into());
                all.push(Value::Object(m));
            }
        }
        json!({
            "query": self.query.as_str(),
            "answers": all,
            "missing": self.missing,
            "elapsed": self.elapsed.as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(site: &str, uuid: Uuid, local: Value) -> Value {
        json!({
            "status": {"state": "running", "broker": {"connected": true}, "local": local},
            "properties": {"uuid": uuid, "category": "controller", "type": "busbar", "site": site},
        })
    }

    #[test]
    fn answers_are_picked_by_correlation_and_the_silent_sites_named() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let expected = BTreeMap::from([(a, "alpha".to_owned()), (b, "beta".to_owned())]);
        let t0 = Instant::now();
        let mut g = Gather::new(Query::Components, expected, Duration::from_secs(1), t0);
        let id = g.correlation.clone();
        let local = json!([{"uuid": Uuid::new_v4(), "state": "idle"}, {"uuid": Uuid::new_v4(), "state": "running"}]);
        assert!(!g.offer(Some("someone else's"), &answer("alpha", a, local.clone())));
        assert!(!g.offer(None, &answer("alpha", a, local.clone())));
        assert!(g.offer(Some(&id), &answer("alpha", a, local)));
        assert!(!g.complete(), "beta has not answered");
        let done = g.finish(t0 + Duration::from_millis(1000));
        assert_eq!(done.missing, vec!["beta".to_owned()]);
        let split = done.split();
        assert_eq!(split["answers"]["alpha"].as_array().unwrap().len(), 2);
        let merged = done.merge();
        assert_eq!(merged["answers"].as_array().unwrap().len(), 2);
        assert!(merged["answers"].as_array().unwrap().iter().all(|c| c["site"] == "alpha"));
        assert_eq!(merged["missing"], json!(["beta"]));
    }

    #[test]
    fn a_health_request_completes_when_every_site_answered() {
        let a = Uuid::new_v4();
        let t0 = Instant::now();
        let mut g = Gather::new(Query::Health, BTreeMap::from([(a, "alpha".to_owned())]), Duration::from_secs(1), t0);
        let id = g.correlation.clone();
        // A component's status with the same id (not a controller) is not an answer.
        let other =
            json!({"status": {"state": "idle"}, "properties": {"uuid": Uuid::new_v4(), "category": "simulator"}});
        assert!(!g.offer(Some(&id), &other));
        assert!(g.offer(Some(&id), &answer("alpha", a, json!([]))));
        assert!(g.complete());
        let done = g.finish(t0);
        assert!(done.missing.is_empty());
        assert_eq!(done.answers["alpha"]["broker"]["connected"], true);
        assert!(done.answers["alpha"].get("local").is_none());
        assert_eq!(done.merge()["answers"][0]["site"], "alpha");
    }

    #[test]
    fn deadlines_are_capped_and_queries_parse() {
        let t0 = Instant::now();
        let g = Gather::new(Query::Health, BTreeMap::new(), Duration::from_secs(3600), t0);
        assert_eq!(g.deadline, t0 + MAX_DEADLINE);
        assert_eq!(Query::parse("components"), Some(Query::Components));
        assert_eq!(Query::parse("everything"), None);
    }
}
