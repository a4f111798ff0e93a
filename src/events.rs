//! The live event stream behind `GET /api/v1/events` and the web page:
//! every status heard on the bus and every device measure, as
//! `{"topic": …, "payload": …}`, with ALMANAC's custom-events
//! subscriptions (exact topics, or regexes anchored at both ends).
//!
//! - [`Hub`]: one broadcast ring shared by every viewer. A frame is
//!   written once, whoever watches; nothing is built while nobody does.
//!   The ring is bounded, so a viewer that falls behind loses its place
//!   ([`tokio::sync::broadcast`] says by how much) and is disconnected,
//!   instead of making memory grow.
//! - [`Subscriptions`]: what one viewer asked for (pure; tested here).
//!
//! Topics: `/status/{realm}/{category}/{type}/{uuid}` and
//! `/data/{realm}/{service}/{entity_type}/{device_id}`.

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Frames kept for viewers that are behind.
pub const RING: usize = 4096;

/// One event, its frame written out once for every viewer.
#[derive(Debug)]
pub struct Event {
    /// Its topic.
    pub topic: Box<str>,
    /// `{"topic": …, "payload": …}`, shared by every viewer's send (a
    /// reference count, not a copy).
    pub frame: axum::extract::ws::Utf8Bytes,
}

/// Where events are published (the directory feed, IoT agents) and
/// watched (WebSocket sessions). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { tx: broadcast::Sender::new(RING) }
    }
}

impl Hub {
    /// Whether anybody watches (publishers skip the work otherwise).
    pub fn watched(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publish `payload` (a JSON document, as bytes) under `topic`.
    /// Payloads that are not JSON are dropped: a frame must parse.
    pub fn publish(&self, topic: String, payload: &[u8]) {
        if !self.watched() {
            return;
        }
        let Ok(raw) = serde_json::from_slice::<&serde_json::value::RawValue>(payload) else { return };
        let mut frame = String::with_capacity(payload.len() + topic.len() + 24);
        frame.push_str("{\"topic\":");
        frame.push_str(&serde_json::to_string(&topic).unwrap_or_default());
        frame.push_str(",\"payload\":");
        frame.push_str(raw.get());
        frame.push('}');
        let _ = self.tx.send(Arc::new(Event { topic: topic.into(), frame: frame.into() }));
    }

    /// A new viewer's receiver: events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

/// The topic of a status of `uuid`.
pub fn status_topic(realm: &str, category: &str, kind: &str, uuid: &uuid::Uuid) -> String {
    format!("/status/{realm}/{category}/{kind}/{uuid}")
}

/// The topic of a device measure.
pub fn data_topic(realm: &str, service: &str, entity_type: &str, device_id: &str) -> String {
    format!("/data/{realm}/{service}/{entity_type}/{device_id}")
}

/// Most subscriptions of one viewer.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// Longest topic or pattern.
pub const MAX_TOPIC: usize = 512;

/// A subscription request: `{"topic": "/x"}` or
/// `{"topic": "/x/.*", "matching": "regex"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    topic: String,
    #[serde(default)]
    matching: Option<String>,
}

/// What one viewer subscribed to.
#[derive(Debug, Default)]
pub struct Subscriptions {
    exact: BTreeSet<String>,
    patterns: Vec<(String, Regex)>,
    /// Topics already decided against the patterns: the same components
    /// publish again and again, and a hash lookup is cheaper than a regex
    /// run (it was 8 % of the CPU of 100 viewers). Bounded, cleared when
    /// full or when a subscription is added.
    decided: std::collections::HashMap<Box<str>, bool>,
}

/// Most topics a viewer remembers deciding.
const DECIDED_MAX: usize = 4096;

impl Subscriptions {
    /// Add the subscription of message `text`; the error is the message
    /// the viewer gets back.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        self.decided.clear();
        let req: Request = serde_json::from_str(text).map_err(|e| {
            format!("expected {{\"topic\": \"/…\"}} or {{\"topic\": \"…\", \"matching\": \"regex\"}}: {e}")
        })?;
        if !req.topic.starts_with('/') || req.topic.len() > MAX_TOPIC {
            return Err(format!("a topic starts with / and has at most {MAX_TOPIC} bytes"));
        }
        if self.exact.len() + self.patterns.len() >= MAX_SUBSCRIPTIONS {
            return Err(format!("at most {MAX_SUBSCRIPTIONS} subscriptions"));
        }
        match req.matching.as_deref() {
            None | Some("exact") => {
                self.exact.insert(req.topic);
            }
            Some("regex") => {
                if self.patterns.iter().any(|(p, _)| *p == req.topic) {
                    return Ok(());
                }
                // The regex crate matches in linear time, and the size
                // limit bounds what one pattern may cost to build.
                let re = regex::RegexBuilder::new(&format!("^(?:{})$", req.topic))
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("invalid regex: {e}"))?;
                self.patterns.push((req.topic, re));
            }
            Some(other) => return Err(format!("unknown matching {other:?}; expected regex")),
        }
        Ok(())
    }

    /// Whether `topic` is subscribed.
    pub fn matches(&mut self, topic: &str) -> bool {
        if self.exact.contains(topic) {
            return true;
        }
        if self.patterns.is_empty() {
            return false;
        }
        if let Some(&m) = self.decided.get(topic) {
            return m;
        }
        let m = self.patterns.iter().any(|(_, re)| re.is_match(topic));
        if self.decided.len() >= DECIDED_MAX {
            self.decided.clear();
        }
        self.decided.insert(topic.into(), m);
        m
    }

    /// ALMANAC's confirmation: `{"subscriptions": {topic: true},
    /// "subscriptionsRegex": {pattern: {}}}`.
    pub fn confirmation(&self) -> Value {
        let exact: Map<String, Value> = self.exact.iter().map(|t| (t.clone(), Value::Bool(true))).collect();
        let regex: Map<String, Value> = self.patterns.iter().map(|(p, _)| (p.clone(), json!({}))).collect();
        json!({"subscriptions": exact, "subscriptionsRegex": regex})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_anchored_regex_subscriptions() {
        let mut s = Subscriptions::default();
        s.add(r#"{"topic": "/status/lab/simulator/dummy/1"}"#).unwrap();
        s.add(r#"{"topic": "/data/lab/.*", "matching": "regex"}"#).unwrap();
        assert!(s.matches("/status/lab/simulator/dummy/1"));
        assert!(!s.matches("/status/lab/simulator/dummy/12"), "exact is exact");
        assert!(s.matches("/data/lab/svc/Sensor/dev1"));
        assert!(s.matches("/data/lab/svc/Sensor/dev1"), "the same answer when remembered");
        assert!(!s.matches("/x/data/lab/svc"), "anchored at the start");
        s.add(r#"{"topic": "/a|/b", "matching": "regex"}"#).unwrap();
        assert!(!s.matches("/a/more"), "an alternation is anchored as a whole");
        assert_eq!(
            s.confirmation(),
            json!({"subscriptions": {"/status/lab/simulator/dummy/1": true},
                   "subscriptionsRegex": {"/data/lab/.*": {}, "/a|/b": {}}})
        );
    }

    #[test]
    fn bad_subscriptions_are_refused_with_a_reason() {
        let mut s = Subscriptions::default();
        assert!(s.add("not json").unwrap_err().starts_with("expected"));
        assert!(s.add(r#"{"topic": "no-slash"}"#).unwrap_err().contains("starts with /"));
        assert!(s.add(r#"{"topic": "/(", "matching": "regex"}"#).unwrap_err().starts_with("invalid regex"));
        assert!(s.add(r#"{"topic": "/x", "matching": "glob"}"#).unwrap_err().contains("unknown matching"));
        assert!(s.add(&format!(r#"{{"topic": "/{}"}}"#, "a".repeat(600))).is_err());
        let huge = r#"{"topic": "/(\\w{1000}){1000}", "matching": "regex"}"#;
        assert!(s.add(huge).unwrap_err().starts_with("invalid regex"), "a pattern too costly to build");
        for i in 0..MAX_SUBSCRIPTIONS {
            s.add(&format!(r#"{{"topic": "/t{i}"}}"#)).unwrap();
        }
        assert!(s.add(r#"{"topic": "/one-more"}"#).unwrap_err().starts_with("at most"));
    }

    #[tokio::test]
    async fn frames_are_written_once_and_only_when_watched() {
        let hub = Hub::default();
        hub.publish("/x".into(), br#"{"a":1}"#);
        let mut rx = hub.subscribe();
        hub.publish("/y".into(), b"not json");
        hub.publish("/z".into(), br#"{"b": [1, 2]}"#);
        let ev = rx.recv().await.unwrap();
        assert_eq!(&*ev.topic, "/z");
        assert_eq!(
            serde_json::from_str::<Value>(ev.frame.as_str()).unwrap(),
            json!({"topic": "/z", "payload": {"b": [1, 2]}})
        );
        assert!(rx.try_recv().is_err(), "nothing before the subscription, nothing that is not JSON");
    }
}
