//! Decoding of incoming action messages, with a typed reason for every
//! rejection. Nothing here may panic on any input: the consumer loop calls
//! [`decode`] on raw broker bytes.

use serde_json::{Map, Value};

use crate::state::{Action, TransitionError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far ahead a `when` may lie. Anything later is almost certainly
/// milliseconds sent where seconds were meant, so it is refused rather than
/// scheduled for the year 50000.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// Where to send the outcome of an action, from the AMQP properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyTo {
    /// `reply_to`: a queue name, published to through the default exchange.
    pub queue: Option<String>,
    /// `correlation_id`, echoed on the reply.
    pub correlation_id: Option<String>,
}

impl ReplyTo {
    /// Whether the sender asked for a reply at all.
    pub fn wanted(&self) -> bool {
        self.queue.is_some() || self.correlation_id.is_some()
    }
}

/// When an action should run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    /// Immediately (`when` absent, 0, or in the past).
    Now,
    /// At this wall-clock time.
    At(SystemTime),
}

impl When {
    /// Parse the `when` field: Unix seconds (integer or float), a numeric
    /// string, or an ISO-8601 / RFC 3339 timestamp (what a JavaScript `Date`
    /// serialises to). A timestamp without offset is taken as UTC.
    pub fn parse(v: Option<&Value>, now: SystemTime) -> Result<When, Rejection> {
        let secs = match v {
            None | Some(Value::Null) => return Ok(When::Now),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => parse_time_str(s.trim()),
            Some(_) => None,
        };
        let Some(secs) = secs.filter(|s| s.is_finite()) else {
            return Err(Rejection::InvalidWhen(v.map(|v| v.to_string()).unwrap_or_default()));
        };
        if secs <= 0.0 {
            return Ok(When::Now);
        }
        // Checked arithmetic: `Duration::from_secs_f64` and `SystemTime + _`
        // panic on overflow, and a `when` of 1e20 must be a rejection, not a
        // dead decoder.
        let too_far = || {
            let shown = if secs < 1e12 { format!("{secs}") } else { format!("{secs:e}") };
            Rejection::InvalidWhen(format!("{shown} is more than a year ahead; expected Unix seconds"))
        };
        let at = Duration::try_from_secs_f64(secs).ok().and_then(|d| UNIX_EPOCH.checked_add(d)).ok_or_else(too_far)?;
        match at.duration_since(now) {
            Err(_) => Ok(When::Now),
            Ok(ahead) if ahead > MAX_SCHEDULE_AHEAD => Err(too_far()),
            Ok(ahead) if ahead.is_zero() => Ok(When::Now),
            Ok(_) => Ok(When::At(at)),
        }
    }
}

fn parse_time_str(s: &str) -> Option<f64> {
    if s.is_empty() {
        return Some(0.0);
    }
    if let Ok(n) = s.parse::<f64>() {
        return Some(n);
    }
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Some(ts.as_nanosecond() as f64 / 1e9);
    }
    let dt = s.parse::<jiff::civil::DateTime>().ok()?;
    let ts = dt.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(ts.as_nanosecond() as f64 / 1e9)
}

/// An action name as decoded: one of the protocol's, or an unknown one,
/// kept so that the addressed component can report it (as the Python
/// controller does, with `error.msg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionName {
    /// A protocol action.
    Known(Action),
    /// Anything else, as sent.
    Unknown(String),
}

impl ActionName {
    /// Decode `name`.
    pub fn parse(name: &str) -> ActionName {
        name.parse().map_or_else(|_| ActionName::Unknown(name.to_owned()), ActionName::Known)
    }

    /// The protocol action, or why there is none.
    pub fn known(&self) -> Result<Action, TransitionError> {
        match self {
            ActionName::Known(a) => Ok(*a),
            ActionName::Unknown(s) => Err(TransitionError::UnknownAction(s.clone())),
        }
    }

    /// Whether this is `action`.
    pub fn is(&self, action: Action) -> bool {
        *self == ActionName::Known(action)
    }

    /// The name as sent.
    pub fn as_str(&self) -> &str {
        match self {
            ActionName::Known(a) => a.as_str(),
            ActionName::Unknown(s) => s,
        }
    }
}

impl std::fmt::Display for ActionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded action message.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRequest {
    /// The action, decoded here once; an unknown name still reaches the
    /// addressed component, which reports it.
    pub action: ActionName,
    /// `parameters`, `{}` when absent.
    pub parameters: Map<String, Value>,
    /// When to run it.
    pub when: When,
    /// The whole body, for drivers that need more (`model`, `results`, `job`).
    pub payload: Map<String, Value>,
    /// Reply routing from the AMQP properties.
    pub reply: ReplyTo,
}

impl ActionRequest {
    /// A request built in-process (HTTP API, tests).
    pub fn new(action: &str, parameters: Map<String, Value>) -> Self {
        let mut payload = Map::new();
        payload.insert("action".into(), Value::String(action.into()));
        payload.insert("parameters".into(), Value::Object(parameters.clone()));
        Self { action: ActionName::parse(action), parameters, when: When::Now, payload, reply: ReplyTo::default() }
    }
}

/// Why a message was refused. Each variant is a metrics label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// `content_type` is set and is not JSON.
    #[error("Unsupported content type {0:?}, expected application/json")]
    ContentType(String),
    /// The body exceeds the configured limit.
    #[error("Message body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Body size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The body is not valid JSON (or not UTF-8).
    #[error("Invalid JSON: {0}")]
    InvalidJson(String),
    /// The body is valid JSON but not an object.
    #[error("Message body must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// An object with neither `action` nor `status`.
    #[error("Missing action")]
    MissingAction,
    /// `action` is not a string.
    #[error("Action must be a string")]
    ActionNotAString,
    /// `parameters` is present and not an object.
    #[error("Parameters must be a JSON object")]
    ParametersNotAnObject,
    /// `when` cannot be read as a time.
    #[error("Invalid when: {0}")]
    InvalidWhen(String),
    /// `model` or `results` is present and not an object (or null).
    #[error("{0} must be a JSON object")]
    TransferNotAnObject(&'static str),
}

impl Rejection {
    /// The metrics label of this kind of rejection.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::ContentType(_) => "content_type",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::NotAnObject(_) => "not_an_object",
            Rejection::MissingAction => "missing_action",
            Rejection::ActionNotAString => "invalid_action",
            Rejection::ParametersNotAnObject => "invalid_parameters",
            Rejection::InvalidWhen(_) => "invalid_when",
            Rejection::TransferNotAnObject(_) => "invalid_transfer",
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Fast path for the bulk of bus traffic, other components' status: a JSON
/// object with `status` and without `action`, recognised without building
/// a value tree. Anything else goes through the full decoder.
fn is_status(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Peek {
        status: Option<serde::de::IgnoredAny>,
    }
    !body.windows(8).any(|w| w == b"\"action\"")
        && matches!(serde_json::from_slice::<Peek>(body), Ok(Peek { status: Some(_) }))
}

/// Decode one message body. `content_type` may be absent (treated as JSON);
/// parameters such as `; charset=utf-8` are allowed. `Ok(None)` is another
/// component's status (no `action`, has `status`), which controllers ignore.
pub fn decode(
    content_type: Option<&str>,
    body: &[u8],
    limit: usize,
    reply: ReplyTo,
    now: SystemTime,
) -> Result<Option<ActionRequest>, Rejection> {
    if let Some(ct) = content_type {
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(Rejection::ContentType(ct.to_owned()));
        }
    }
    if body.len() > limit {
        return Err(Rejection::TooLarge { size: body.len(), limit });
    }
    if is_status(body) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| Rejection::InvalidJson(e.to_string()))?;
    let Value::Object(mut payload) = value else {
        return Err(Rejection::NotAnObject(json_kind(&value)));
    };
    let action = match payload.get("action") {
        Some(Value::String(a)) => ActionName::parse(a),
        Some(_) => return Err(Rejection::ActionNotAString),
        None if payload.contains_key("status") => return Ok(None),
        None => return Err(Rejection::MissingAction),
    };
    let parameters = match payload.get("parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => return Err(Rejection::ParametersNotAnObject),
    };
    for key in ["model", "results"] {
        if !matches!(payload.get(key), None | Some(Value::Null | Value::Object(_))) {
            return Err(Rejection::TransferNotAnObject(key));
        }
    }
    let when = When::parse(payload.get("when"), now)?;
    payload.insert("parameters".into(), Value::Object(parameters.clone()));
    Ok(Some(ActionRequest { action, parameters, when, payload, reply }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMIT: usize = 1024;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn dec(ct: Option<&str>, body: &str) -> Result<Option<ActionRequest>, Rejection> {
        decode(ct, body.as_bytes(), LIMIT, ReplyTo::default(), now())
    }

    fn action(body: &str) -> ActionRequest {
        match dec(Some("application/json"), body) {
            Ok(Some(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn captured_cli_and_villasweb_requests_decode() {
        let a = action(r#"{"action": "ping"}"#);
        assert_eq!(a.action, ActionName::Known(Action::Ping));
        assert_eq!(action(r#"{"action": "dance"}"#).action, ActionName::Unknown("dance".into()));
        assert!(a.parameters.is_empty());
        assert_eq!(a.when, When::Now);
        let a = action(r#"{"action":"ping","when":0}"#);
        assert_eq!(a.when, When::Now);
        let a = action(
            r#"{"action": "start", "parameters": {"runtime": 1}, "model": {"url": "u"}, "results": {"url": "r"}}"#,
        );
        assert_eq!(a.parameters["runtime"], json!(1));
        assert_eq!(a.payload["model"], json!({"url": "u"}));
    }

    #[test]
    fn when_accepts_seconds_floats_strings_and_iso8601() {
        let t = 1_800_000_100.0;
        let at = UNIX_EPOCH + Duration::from_secs_f64(t);
        assert_eq!(When::parse(Some(&json!(1_800_000_100)), now()), Ok(When::At(at)));
        assert_eq!(When::parse(Some(&json!(t)), now()), Ok(When::At(at)));
        assert_eq!(When::parse(Some(&json!("1800000100")), now()), Ok(When::At(at)));
        assert_eq!(When::parse(Some(&json!("2027-01-15T08:01:40Z")), now()), Ok(When::At(at)));
        assert_eq!(When::parse(Some(&json!("2027-01-15T08:01:40.000Z")), now()), Ok(When::At(at)));
        assert_eq!(When::parse(Some(&json!("2027-01-15T08:01:40")), now()), Ok(When::At(at)));
        assert_eq!(When::parse(Some(&json!("2027-01-15T09:01:40+01:00")), now()), Ok(When::At(at)));
    }

    #[test]
    fn when_in_the_past_zero_or_absent_means_now() {
        for v in [json!(0), json!(0.0), json!(1_000), json!("2001-01-01T00:00:00Z"), json!(null), json!("")] {
            assert_eq!(When::parse(Some(&v), now()), Ok(When::Now), "{v}");
        }
        assert_eq!(When::parse(None, now()), Ok(When::Now));
    }

    #[test]
    fn when_that_is_not_a_time_or_is_absurdly_far_is_rejected() {
        for v in [
            json!("tomorrow"),
            json!(true),
            json!([1]),
            json!(1_800_000_000_000u64),
            // Past what `Duration`/`SystemTime` can hold: these panicked once.
            json!(1e19),
            json!(1e20),
            json!(u64::MAX),
            json!(f64::MAX),
            json!("1e20"),
            json!("1e300"),
            json!("18446744073709551616"),
        ] {
            assert!(matches!(When::parse(Some(&v), now()), Err(Rejection::InvalidWhen(_))), "{v}");
        }
    }

    #[test]
    fn every_malformed_body_gets_its_own_rejection() {
        assert_eq!(dec(Some("text/plain"), "{}").unwrap_err().kind(), "content_type");
        assert_eq!(dec(None, "{not json").unwrap_err().kind(), "invalid_json");
        assert_eq!(dec(None, "[\"action\"]").unwrap_err(), Rejection::NotAnObject("an array"));
        assert_eq!(dec(None, "\"action\"").unwrap_err(), Rejection::NotAnObject("a string"));
        assert_eq!(dec(None, "42").unwrap_err(), Rejection::NotAnObject("a number"));
        assert_eq!(dec(None, "{}").unwrap_err(), Rejection::MissingAction);
        assert_eq!(dec(None, r#"{"action": 1}"#).unwrap_err(), Rejection::ActionNotAString);
        assert_eq!(
            dec(None, r#"{"action": "start", "parameters": [1]}"#).unwrap_err(),
            Rejection::ParametersNotAnObject
        );
        let big = format!(r#"{{"action":"ping","pad":"{}"}}"#, "x".repeat(LIMIT));
        assert!(matches!(dec(None, &big), Err(Rejection::TooLarge { .. })));
        assert_eq!(dec(None, "\u{0}\u{ff}").unwrap_err().kind(), "invalid_json");
        assert_eq!(
            dec(None, r#"{"action": "start", "results": [null]}"#).unwrap_err(),
            Rejection::TransferNotAnObject("results")
        );
        assert_eq!(dec(None, r#"{"action": "start", "model": "m"}"#).unwrap_err().kind(), "invalid_transfer");
        assert!(dec(None, r#"{"action": "start", "model": null, "results": {}}"#).is_ok());
        assert!(decode(None, &[0xff, 0xfe], LIMIT, ReplyTo::default(), now()).is_err());
    }

    #[test]
    fn status_messages_are_recognised_and_ignored() {
        assert_eq!(dec(None, r#"{"status": {"state": "idle"}}"#), Ok(None));
    }

    #[test]
    fn content_type_parameters_and_case_are_tolerated() {
        assert!(dec(Some("Application/JSON; charset=utf-8"), r#"{"action":"ping"}"#).is_ok());
    }
}
