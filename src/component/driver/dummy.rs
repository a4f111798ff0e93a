//! `simulator/dummy` and the other timed types: each action enters its
//! transient state, which settles after the type's (or the start's)
//! duration. No side effects; the reference for the VILLAS state table.

use serde_json::{Map, Value};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

use super::{Driver, Fut};
use crate::component::core::{Core, Cx};
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::state::Action;

/// Longest a transient state lasts, whatever is configured.
const MAX_SECS: f64 = 86_400.0;

pub(super) struct Dummy {
    /// Seconds each transient state lasts (`properties.durations`).
    durations: Map<String, Value>,
    /// When the current transient state settles.
    settle_at: Option<Instant>,
}

impl Dummy {
    pub(super) fn new(core: &Core) -> Self {
        let durations = core.properties.get("durations").and_then(Value::as_object).cloned().unwrap_or_default();
        Dummy { durations, settle_at: None }
    }

    /// How long `action`'s transient state lasts: `start` runs for the
    /// start's `runtime`, others for `durations.<action>`; 1 s by default.
    fn duration(&self, action: Action, parameters: &Map<String, Value>) -> Duration {
        let secs = match action {
            Action::Start => parameters.get("runtime").and_then(Value::as_f64),
            other => self.durations.get(other.as_str()).and_then(Value::as_f64),
        };
        Duration::from_secs_f64(secs.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(1.0).min(MAX_SECS))
    }
}

impl Driver for Dummy {
    fn act<'a>(&'a mut self, mut cx: Cx<'a>, action: Action, req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>> {
        let result = cx.begin(action).map(|()| {
            if action == Action::Start {
                cx.show_transfers(&req.payload);
            }
            self.settle_at = Some(Instant::now() + self.duration(action, &req.parameters));
        });
        Box::pin(std::future::ready(result))
    }

    fn deadline(&self) -> Option<Instant> {
        self.settle_at
    }

    /// The transient state settles.
    fn on_deadline(&mut self, mut cx: Cx<'_>, now: Instant) -> bool {
        if self.settle_at.is_none_or(|at| at > now) {
            return false;
        }
        self.settle_at = None;
        match cx.core.state().settled() {
            Some(to) if cx.go(to) => {
                debug!(component = %cx.core.keys.uuid, %to, "settled");
                true
            }
            _ => false,
        }
    }

    fn failed(&mut self) {
        self.settle_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_come_from_the_start_or_the_type_and_are_bounded() {
        let d = Dummy { durations: json!({"stop": 0.25, "pause": -1}).as_object().unwrap().clone(), settle_at: None };
        let p = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(d.duration(Action::Start, &p(json!({"runtime": 2}))), Duration::from_secs(2));
        assert_eq!(d.duration(Action::Stop, &Map::new()), Duration::from_millis(250));
        assert_eq!(d.duration(Action::Pause, &Map::new()), Duration::from_secs(1), "negative: the default");
        assert_eq!(d.duration(Action::Start, &p(json!({"runtime": 1e12}))), Duration::from_secs(86_400));
    }
}
