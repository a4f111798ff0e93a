//! AMQP routing headers: `category`, `realm`, `uuid` and `type`.
//!
//! VILLAS routes on a headers exchange with `x-match: any`, so a message
//! reaches a component if *any* of its headers equals the component's value.
//! [`RoutingKeys::matches`] reproduces RabbitMQ's rule so the same decision
//! can be taken in-process (shared topology, CLI filters) and unit-tested.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use uuid::Uuid;

/// The four routing headers of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKeys {
    /// `simulator`, `manager`, `gateway`, `equipment`, …
    pub category: String,
    /// `dummy`, `generic`, …
    pub kind: String,
    /// The component's uuid.
    pub uuid: Uuid,
    /// The operator's realm (reverse FQDN); `None` is published as AMQP void.
    pub realm: Option<String>,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl RoutingKeys {
    /// Headers of a status message: all four keys, `realm` void when unset
    /// (what VILLAScontroller does, and what VILLASweb decodes as null).
    pub fn status_headers(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("category".into(), long(&self.category));
        t.insert("realm".into(), self.realm.as_deref().map_or(AMQPValue::Void, long));
        t.insert("uuid".into(), long(&self.uuid.to_string()));
        t.insert("type".into(), long(&self.kind));
        t
    }

    /// Headers of a device (`equipment`) status: `category`, `uuid` and
    /// `type`, and no `realm`. Under `x-match: any` a realm header would
    /// deliver every device status to every component queue of the realm
    /// (and, beside Python daemons, to every component with an unset realm,
    /// which binds it as void); with thousands of devices that floods the
    /// lab's queues. Observers that bind everything (VILLASweb, `busbar
    /// monitor`) still see them, and the body still names the realm.
    pub fn device_status_headers(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("category".into(), long(&self.category));
        t.insert("uuid".into(), long(&self.uuid.to_string()));
        t.insert("type".into(), long(&self.kind));
        t
    }

    /// Binding arguments of the component's queue: `x-match: any` over the
    /// keys. An unset realm is left out rather than bound as void, because a
    /// void binding matches every message that merely *has* a realm header
    /// (the anchor's accidental fan-out, reference §0 #3).
    pub fn binding(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("category".into(), long(&self.category));
        if let Some(r) = &self.realm {
            t.insert("realm".into(), long(r));
        }
        t.insert("uuid".into(), long(&self.uuid.to_string()));
        t.insert("type".into(), long(&self.kind));
        t.insert("x-match".into(), long("any"));
        t
    }

    /// Binding arguments of a queue that carries only the messages naming
    /// this component's uuid (`x-match: all`): the per-component topology,
    /// where category, type and realm are routed through one daemon queue.
    pub fn uuid_binding(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("uuid".into(), long(&self.uuid.to_string()));
        t.insert("x-match".into(), long("all"));
        t
    }

    /// Whether a message with `headers` reaches this component under
    /// `x-match: any`: some header equals the component's value.
    ///
    /// ```
    /// use busbar::protocol::{Filter, RoutingKeys};
    ///
    /// let keys = RoutingKeys {
    ///     category: "simulator".into(),
    ///     kind: "dummy".into(),
    ///     uuid: uuid::Uuid::new_v4(),
    ///     realm: Some("lab".into()),
    /// };
    /// let by_realm = Filter { realm: Some("lab".into()), ..Default::default() };
    /// assert!(keys.matches(&by_realm.action_headers()));
    /// // VILLASweb's broadcast ping {uuid: ""} is routed to no component.
    /// assert!(!keys.matches(&Filter::default().action_headers()));
    /// ```
    pub fn matches(&self, headers: &FieldTable) -> bool {
        self.matches_addressed(&Addressed::of(headers))
    }

    /// [`RoutingKeys::matches`] against headers decoded once: the shared
    /// topology tests every component against each message, so this must
    /// not allocate.
    pub fn matches_addressed(&self, to: &Addressed<'_>) -> bool {
        to.category == Some(self.category.as_str())
            || to.kind == Some(self.kind.as_str())
            || to.uuid == Some(self.uuid)
            || self.realm.as_deref().is_some_and(|r| to.realm == Some(r))
    }
}

/// The string routing headers of one message, borrowed from it. A header
/// that is absent, void, not a string or (for `uuid`) not a uuid is `None`,
/// which matches nothing, as on the exchange.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Addressed<'a> {
    /// `category` header.
    pub category: Option<&'a str>,
    /// `type` header.
    pub kind: Option<&'a str>,
    /// `uuid` header, parsed if it is in canonical (lower-case, hyphenated) form.
    pub uuid: Option<Uuid>,
    /// `realm` header.
    pub realm: Option<&'a str>,
}

impl<'a> Addressed<'a> {
    /// Borrow the routing headers of `headers`.
    pub fn of(headers: &'a FieldTable) -> Self {
        let get = |key: &str| -> Option<&'a str> {
            match headers.inner().get(&ShortString::from(key))? {
                AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
                AMQPValue::ShortString(s) => Some(s.as_str()),
                _ => None,
            }
        };
        Addressed {
            category: get("category"),
            kind: get("type"),
            // The exchange compares bytes: only the canonical form (what
            // every component binds) can match.
            uuid: get("uuid").and_then(|u| {
                let parsed = Uuid::try_parse(u).ok()?;
                let mut buf = Uuid::encode_buffer();
                (parsed.hyphenated().encode_lower(&mut buf) == u).then_some(parsed)
            }),
            realm: get("realm"),
        }
    }
}

/// One decoded header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// A string (long or short).
    Str(String),
    /// AMQP void: what Python's `None` becomes.
    Void,
    /// Any other AMQP type, rendered for logs.
    Other(String),
}

/// Decode header `key` of `headers`, handling void and both string types.
pub fn header_str(headers: &FieldTable, key: &str) -> Option<HeaderValue> {
    let v = headers.inner().get(&ShortString::from(key))?;
    Some(match v {
        AMQPValue::LongString(s) => HeaderValue::Str(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::Void => HeaderValue::Void,
        other => HeaderValue::Other(format!("{other:?}")),
    })
}

/// Convert an AMQP header table to JSON (void → null), for logs and `monitor`.
pub fn headers_to_json(headers: &FieldTable) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for k in headers.inner().keys() {
        let v = match header_str(headers, k.as_str()) {
            Some(HeaderValue::Str(s)) => serde_json::Value::String(s),
            Some(HeaderValue::Other(s)) => serde_json::Value::String(s),
            Some(HeaderValue::Void) | None => serde_json::Value::Null,
        };
        map.insert(k.as_str().to_owned(), v);
    }
    serde_json::Value::Object(map)
}

/// A client-side selection of components by header, as given to
/// `busbar ping --uuid … --realm …`. Empty means "everyone".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `uuid` header.
    pub uuid: Option<String>,
    /// `realm` header.
    pub realm: Option<String>,
    /// `category` header.
    pub category: Option<String>,
    /// `type` header.
    pub kind: Option<String>,
}

impl Filter {
    /// Whether no header is set.
    pub fn is_empty(&self) -> bool {
        self.uuid.is_none() && self.realm.is_none() && self.category.is_none() && self.kind.is_none()
    }

    fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("category", self.category.as_deref()),
            ("realm", self.realm.as_deref()),
            ("uuid", self.uuid.as_deref()),
            ("type", self.kind.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
    }

    /// Headers of an action addressed by this filter. An empty filter gives
    /// VILLASweb's broadcast form `{uuid: ""}`.
    pub fn action_headers(&self) -> FieldTable {
        let mut t = FieldTable::default();
        if self.is_empty() {
            t.insert("uuid".into(), long(""));
        }
        for (k, v) in self.pairs() {
            t.insert(k.into(), long(v));
        }
        t
    }

    /// Binding arguments that receive the status of the selected components
    /// (`x-match: any`); an empty filter binds to every message.
    pub fn binding(&self) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in self.pairs() {
            t.insert(k.into(), long(v));
        }
        if !self.is_empty() {
            t.insert("x-match".into(), long("any"));
        }
        t
    }

    /// Whether a message with `headers` was sent by (or to) a selected
    /// component, with the same OR semantics as the exchange.
    pub fn matches(&self, headers: &FieldTable) -> bool {
        self.is_empty()
            || self.pairs().any(|(k, v)| matches!(header_str(headers, k), Some(HeaderValue::Str(s)) if s == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(realm: Option<&str>) -> RoutingKeys {
        RoutingKeys {
            category: "simulator".into(),
            kind: "dummy".into(),
            uuid: Uuid::parse_str("3ddd318e-fee1-46d7-bff4-7c064d640d4e").unwrap(),
            realm: realm.map(Into::into),
        }
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn any_single_matching_header_routes_and_none_does_not() {
        let k = keys(Some("lab"));
        assert!(k.matches(&table(&[("uuid", long("3ddd318e-fee1-46d7-bff4-7c064d640d4e"))])));
        assert!(k.matches(&table(&[("realm", long("lab"))])));
        assert!(k.matches(&table(&[("category", long("simulator"))])));
        assert!(k.matches(&table(&[("type", long("dummy"))])));
        assert!(k.matches(&table(&[("type", long("generic")), ("realm", long("lab"))])));
        assert!(!k.matches(&table(&[("type", long("generic"))])));
        assert!(!k.matches(&table(&[("uuid", long(""))])), "broadcast ping is not routed");
        assert!(!k.matches(&FieldTable::default()));
    }

    #[test]
    fn a_uuid_matches_only_in_the_canonical_form_the_exchange_compares() {
        let k = keys(None);
        let upper = k.uuid.to_string().to_uppercase();
        let simple = k.uuid.simple().to_string();
        assert!(k.matches(&table(&[("uuid", long(&k.uuid.to_string()))])));
        assert!(!k.matches(&table(&[("uuid", long(&upper))])));
        assert!(!k.matches(&table(&[("uuid", long(&simple))])));
        assert!(!k.matches(&table(&[("uuid", AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])))])));
    }

    #[test]
    fn an_unset_realm_never_matches_and_is_not_bound() {
        let k = keys(None);
        assert!(!k.matches(&table(&[("realm", long("lab"))])));
        assert!(!k.matches(&table(&[("realm", AMQPValue::Void)])));
        assert!(!k.binding().inner().contains_key(&ShortString::from("realm")));
        assert_eq!(k.status_headers().inner().get(&ShortString::from("realm")), Some(&AMQPValue::Void));
    }

    #[test]
    fn void_and_short_strings_decode() {
        let t = table(&[
            ("realm", AMQPValue::Void),
            ("uuid", AMQPValue::ShortString("u".into())),
            ("n", AMQPValue::LongLongInt(3)),
        ]);
        assert_eq!(header_str(&t, "realm"), Some(HeaderValue::Void));
        assert_eq!(header_str(&t, "uuid"), Some(HeaderValue::Str("u".into())));
        assert!(matches!(header_str(&t, "n"), Some(HeaderValue::Other(_))));
        assert_eq!(header_str(&t, "missing"), None);
        assert_eq!(headers_to_json(&t)["realm"], serde_json::Value::Null);
    }

    #[test]
    fn an_empty_filter_broadcasts_with_an_empty_uuid_and_sees_everything() {
        let f = Filter::default();
        let h = f.action_headers();
        assert_eq!(header_str(&h, "uuid"), Some(HeaderValue::Str(String::new())));
        assert!(f.binding().inner().is_empty());
        assert!(f.matches(&keys(None).status_headers()));
    }

    #[test]
    fn a_filter_selects_status_messages_by_any_header() {
        let f = Filter { realm: Some("lab".into()), ..Default::default() };
        assert!(f.matches(&keys(Some("lab")).status_headers()));
        assert!(!f.matches(&keys(Some("other")).status_headers()));
        assert!(!f.matches(&keys(None).status_headers()));
    }
}
