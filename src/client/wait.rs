//! Waiting for the outcome of an action, sans-IO.
//!
//! busbar answers every action on `reply_to` with the requester's
//! `correlation_id`; the Python VILLAScontroller never does (reference §0
//! #5): it only publishes each state change on the exchange. Labs run both
//! on one broker while they migrate, so a client waits in two ways:
//!
//! - **correlated**: the reply arrives within [`CORRELATION_GRACE`]; from
//!   then on only statuses after it count (what busbar daemons give);
//! - **uncorrelated**: no reply came; every status seen since the action
//!   was sent is replayed, and then followed: a goal state counts once the
//!   component was seen in another state first (so an old status cannot end
//!   the wait), `error` ends it as a failure, and the client pings the
//!   component it follows (a Python component announces nothing by itself).
//!
//! [`Wait`] takes the statuses and the passing of the grace period and says
//! when the wait is over; the client's loop does the I/O.

use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

use super::Outcome;

/// How long a correlated reply may take before the client assumes the
/// target does not send them.
pub const CORRELATION_GRACE: Duration = Duration::from_secs(1);

/// A target that has said nothing (no reply, no status, nothing after the
/// client pinged it at the end of the grace period) this long after the
/// action is taken as absent: the wait ends at once with "no component
/// answered" instead of running out its timeout.
pub const NO_ANSWER: Duration = Duration::from_secs(2);

/// What ends the wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// The target reaches this state (`action --wait STATE`).
    State(String),
    /// A manager created component `follow` (`create`): its first status.
    Created {
        /// The new component's uuid.
        follow: Uuid,
    },
    /// A manager deleted component `follow` (`delete`): its `gone`.
    Deleted {
        /// The deleted component's uuid.
        follow: Uuid,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Undecided,
    Correlated,
    Uncorrelated,
}

/// The state of one wait.
#[derive(Debug)]
pub struct Wait {
    target: Uuid,
    correlation_id: String,
    goal: Goal,
    mode: Mode,
    /// Uncorrelated statuses seen before the mode was decided.
    buffer: Vec<Value>,
    /// The target (or the followed component) was seen in a state other
    /// than the goal since the action was sent.
    armed: bool,
    /// Anything came from the target or the followed component.
    heard: bool,
}

fn uuid_of(status: &Value) -> Option<Uuid> {
    status.pointer("/properties/uuid").and_then(Value::as_str).and_then(|u| Uuid::try_parse(u).ok())
}

fn state_of(status: &Value) -> Option<&str> {
    status.pointer("/status/state").and_then(Value::as_str)
}

fn has_error(status: &Value) -> bool {
    status.pointer("/status/error").is_some_and(|e| !e.is_null())
}

impl Wait {
    /// Wait for `goal` after sending an action to `target` with
    /// `correlation_id`.
    pub fn new(target: Uuid, correlation_id: String, goal: Goal) -> Wait {
        Wait { target, correlation_id, goal, mode: Mode::Undecided, buffer: Vec::new(), armed: false, heard: false }
    }

    /// Whether anything came from the target (or the component followed)
    /// since the action was sent.
    pub fn heard(&self) -> bool {
        self.heard
    }

    /// The component the client should ping while uncorrelated, if any.
    pub fn follow(&self) -> Option<Uuid> {
        match (&self.goal, self.mode) {
            (Goal::Created { follow }, Mode::Uncorrelated) => Some(*follow),
            _ => None,
        }
    }

    /// A status arrived (`correlation_id` as received).
    pub fn on_status(&mut self, correlation_id: Option<&str>, status: &Value) -> Option<Outcome> {
        let from = uuid_of(status);
        self.heard |= correlation_id == Some(self.correlation_id.as_str())
            || from == Some(self.target)
            || matches!(&self.goal, Goal::Created { follow } | Goal::Deleted { follow } if from == Some(*follow));
        if correlation_id == Some(self.correlation_id.as_str()) {
            // A correlated reply decides the mode for good.
            self.mode = Mode::Correlated;
            self.buffer.clear();
            if has_error(status) && state_of(status) != self.goal_state() {
                return Some(Outcome::Failed(status.clone()));
            }
            return self.judge(status, true);
        }
        match self.mode {
            Mode::Undecided => {
                self.buffer.push(status.clone());
                None
            }
            Mode::Correlated | Mode::Uncorrelated => self.judge(status, self.mode == Mode::Correlated),
        }
    }

    /// The grace period passed. Without a correlated reply so far, the
    /// statuses seen since sending are replayed under the uncorrelated rule.
    pub fn on_grace(&mut self) -> Option<Outcome> {
        if self.mode != Mode::Undecided {
            return None;
        }
        self.mode = Mode::Uncorrelated;
        for status in std::mem::take(&mut self.buffer) {
            if let Some(done) = self.judge(&status, false) {
                return Some(done);
            }
        }
        None
    }

    fn goal_state(&self) -> Option<&str> {
        match &self.goal {
            Goal::State(s) => Some(s),
            Goal::Created { .. } => None,
            Goal::Deleted { .. } => Some("gone"),
        }
    }

    /// One status, after the mode is known. `trusted`: it comes after the
    /// correlated reply (busbar), so it is never stale.
    fn judge(&mut self, status: &Value, trusted: bool) -> Option<Outcome> {
        let from = uuid_of(status);
        let state = state_of(status);
        match &self.goal {
            Goal::State(want) => {
                if from != Some(self.target) {
                    return None;
                }
                if state == Some("error") && want != "error" {
                    return Some(Outcome::Failed(status.clone()));
                }
                if state == Some(want.as_str()) && (trusted || self.armed) {
                    return Some(Outcome::Reached(status.clone()));
                }
                self.armed |= state.is_some() && state != Some(want.as_str());
                None
            }
            Goal::Created { follow } | Goal::Deleted { follow } => {
                // Created: the new component's first status; deleted: its `gone`.
                let done = matches!(self.goal, Goal::Created { .. }) || state == Some("gone");
                if from == Some(*follow) && done {
                    // Created, but already failed (a Kubernetes simulator
                    // without a kubeconfig, say): the create did not work.
                    if state == Some("error") {
                        return Some(Outcome::Failed(status.clone()));
                    }
                    return Some(Outcome::Reached(status.clone()));
                }
                if from != Some(self.target) {
                    return None;
                }
                if state == Some("error") {
                    return Some(Outcome::Failed(status.clone()));
                }
                // busbar's manager answers at once, on `reply_to`.
                (trusted && !has_error(status)).then(|| Outcome::Reached(status.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn st(uuid: Uuid, state: &str) -> Value {
        json!({"status": {"state": state}, "properties": {"uuid": uuid.to_string()}})
    }

    fn reached(o: Option<Outcome>) -> bool {
        matches!(o, Some(Outcome::Reached(_)))
    }

    fn failed(o: Option<Outcome>) -> bool {
        matches!(o, Some(Outcome::Failed(_)))
    }

    #[test]
    fn a_created_component_that_starts_in_error_fails_the_create() {
        let (m, new) = (Uuid::new_v4(), Uuid::new_v4());
        let mut w = Wait::new(m, "id".into(), Goal::Created { follow: new });
        assert_eq!(w.on_grace(), None);
        assert!(failed(w.on_status(None, &st(new, "error"))), "the new component is in error");
        let mut w = Wait::new(m, "id".into(), Goal::Created { follow: new });
        assert_eq!(w.on_grace(), None);
        assert!(reached(w.on_status(None, &st(new, "idle"))));
    }

    #[test]
    fn a_correlated_reply_decides_and_later_statuses_count() {
        let t = Uuid::new_v4();
        let mut w = Wait::new(t, "id".into(), Goal::State("running".into()));
        // An old periodic status in the goal state, before the reply: ignored.
        assert_eq!(w.on_status(None, &st(t, "running")), None);
        assert_eq!(w.on_status(Some("id"), &st(t, "starting")), None);
        assert_eq!(w.on_grace(), None, "already correlated");
        assert!(reached(w.on_status(None, &st(t, "running"))));
    }

    #[test]
    fn without_replies_the_goal_counts_after_another_state_was_seen() {
        let t = Uuid::new_v4();
        let mut w = Wait::new(t, "id".into(), Goal::State("running".into()));
        assert_eq!(w.on_status(None, &st(Uuid::new_v4(), "idle")), None);
        assert_eq!(w.on_status(None, &st(t, "starting")), None);
        assert_eq!(w.on_grace(), None, "starting is not running");
        assert!(reached(w.on_status(None, &st(t, "running"))));

        // Statuses seen during the grace are replayed in order.
        let mut w = Wait::new(t, "id".into(), Goal::State("running".into()));
        w.on_status(None, &st(t, "starting"));
        w.on_status(None, &st(t, "running"));
        assert!(reached(w.on_grace()));
    }

    #[test]
    fn an_old_status_in_the_goal_state_does_not_end_an_uncorrelated_wait() {
        let t = Uuid::new_v4();
        let mut w = Wait::new(t, "id".into(), Goal::State("idle".into()));
        assert_eq!(w.on_status(None, &st(t, "idle")), None);
        assert_eq!(w.on_grace(), None);
        assert_eq!(w.on_status(None, &st(t, "resetting")), None);
        assert!(reached(w.on_status(None, &st(t, "idle"))));
    }

    #[test]
    fn error_ends_any_wait_as_a_failure() {
        let t = Uuid::new_v4();
        let mut w = Wait::new(t, "id".into(), Goal::State("running".into()));
        w.on_grace();
        assert!(failed(w.on_status(None, &st(t, "error"))));
        let mut w = Wait::new(t, "id".into(), Goal::State("running".into()));
        assert!(failed(w.on_status(Some("id"), &st(t, "error"))));
    }

    #[test]
    fn a_create_ends_with_the_new_component_or_the_managers_answer() {
        let (m, new) = (Uuid::new_v4(), Uuid::new_v4());
        // busbar: the correlated reply; a refusal carries the error.
        let mut w = Wait::new(m, "id".into(), Goal::Created { follow: new });
        assert!(reached(w.on_status(Some("id"), &st(m, "idle"))));
        let mut w = Wait::new(m, "id".into(), Goal::Created { follow: new });
        let mut refused = st(m, "idle");
        refused["status"]["error"] = json!({"msg": "Duplicate uuid"});
        assert!(failed(w.on_status(Some("id"), &refused)));
        // Python: no reply; the client pings the new uuid until it answers.
        let mut w = Wait::new(m, "id".into(), Goal::Created { follow: new });
        assert_eq!(w.follow(), None, "no pings before the grace");
        assert_eq!(w.on_status(None, &st(m, "idle")), None);
        assert_eq!(w.on_grace(), None, "an uncorrelated manager status says nothing");
        assert_eq!(w.follow(), Some(new));
        assert!(reached(w.on_status(None, &st(new, "idle"))));
    }

    #[test]
    fn a_delete_ends_with_gone_or_the_managers_answer() {
        let (m, old) = (Uuid::new_v4(), Uuid::new_v4());
        let mut w = Wait::new(m, "id".into(), Goal::Deleted { follow: old });
        w.on_grace();
        assert_eq!(w.on_status(None, &st(old, "idle")), None);
        assert!(reached(w.on_status(None, &st(old, "gone"))));
        let mut w = Wait::new(m, "id".into(), Goal::Deleted { follow: old });
        let mut refused = st(m, "idle");
        refused["status"]["error"] = json!({"msg": "Unknown component"});
        assert!(failed(w.on_status(Some("id"), &refused)));
    }
}
