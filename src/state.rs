//! The sans-IO simulator lifecycle: states, actions and the transition table.
//!
//! Nothing here touches a socket, a clock or a process. A component task feeds
//! actions in and gets back either the state to enter or a typed
//! [`TransitionError`]; drivers then decide when a transient state settles.
//! The table is the one of VILLAScontroller's `components/simulator.py`
//! (reference §5.1), which VILLASweb and existing scripts depend on.

use std::fmt;
use std::str::FromStr;

/// A component state as published in `status.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Ready; nothing runs.
    Idle,
    /// A start was accepted and is in progress.
    Starting,
    /// The simulation runs.
    Running,
    /// A pause was accepted and is in progress.
    Pausing,
    /// The simulation is paused.
    Paused,
    /// A resume was accepted and is in progress.
    Resuming,
    /// A stop was accepted (or the run ended) and is in progress.
    Stopping,
    /// A reset was accepted and is in progress.
    Resetting,
    /// Something failed; `status.error` says what. `reset` leaves it.
    Error,
    /// A shutdown was accepted and is in progress.
    ShuttingDown,
    /// The component was shut down; only `start` revives it.
    Shutdown,
    /// The component was deleted. Terminal.
    Gone,
}

impl State {
    /// Every state, in table order.
    pub const ALL: [State; 12] = [
        State::Idle,
        State::Starting,
        State::Running,
        State::Pausing,
        State::Paused,
        State::Resuming,
        State::Stopping,
        State::Resetting,
        State::Error,
        State::ShuttingDown,
        State::Shutdown,
        State::Gone,
    ];

    /// The position in [`State::ALL`] (for an atomic copy of a state).
    pub fn index(self) -> u8 {
        State::ALL.iter().position(|s| *s == self).unwrap_or(0) as u8
    }

    /// The state at `index` in [`State::ALL`]; `idle` if out of range.
    pub fn from_index(index: u8) -> State {
        State::ALL.get(usize::from(index)).copied().unwrap_or(State::Idle)
    }

    /// The wire name (`"shuttingdown"`, not `"shutting_down"`).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Starting => "starting",
            State::Running => "running",
            State::Pausing => "pausing",
            State::Paused => "paused",
            State::Resuming => "resuming",
            State::Stopping => "stopping",
            State::Resetting => "resetting",
            State::Error => "error",
            State::ShuttingDown => "shuttingdown",
            State::Shutdown => "shutdown",
            State::Gone => "gone",
        }
    }

    /// Whether the simulator table allows `self → next` (reference §5.1).
    pub fn can_transition_to(self, next: State) -> bool {
        use State::*;
        let allowed: &[State] = match self {
            Error => &[Resetting, Error, Gone],
            Idle => &[Resetting, Error, Idle, Starting, ShuttingDown, Gone],
            Starting => &[Resetting, Error, Running, Gone],
            Running => &[Resetting, Error, Pausing, Stopping, Gone],
            Pausing => &[Resetting, Error, Paused, Gone],
            Paused => &[Resetting, Error, Resuming, Stopping, Gone],
            Resuming => &[Resetting, Error, Running, Gone],
            Stopping => &[Resetting, Error, Idle, Gone],
            Resetting => &[Resetting, Error, Idle, Gone],
            ShuttingDown => &[Shutdown, Error, Gone],
            Shutdown => &[Starting, Error, Gone],
            Gone => &[],
        };
        allowed.contains(&next)
    }

    /// The state a transient state settles into once its work is done
    /// (`starting → running`, `stopping → idle`, …); `None` for stable states.
    pub fn settled(self) -> Option<State> {
        match self {
            State::Starting | State::Resuming => Some(State::Running),
            State::Pausing => Some(State::Paused),
            State::Stopping | State::Resetting => Some(State::Idle),
            State::ShuttingDown => Some(State::Shutdown),
            _ => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A string that names no [`State`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

/// An action of the VILLAS protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Publish the current status.
    Ping,
    /// Start a simulation.
    Start,
    /// Stop a running or paused simulation.
    Stop,
    /// Pause a running simulation.
    Pause,
    /// Resume a paused simulation.
    Resume,
    /// Abort whatever runs and return to idle, also from `error`.
    Reset,
    /// Shut the component down.
    Shutdown,
    /// Manager only: create a component.
    Create,
    /// Manager only: delete a component.
    Delete,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 9] = [
        Action::Ping,
        Action::Start,
        Action::Stop,
        Action::Pause,
        Action::Resume,
        Action::Reset,
        Action::Shutdown,
        Action::Create,
        Action::Delete,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ping => "ping",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Reset => "reset",
            Action::Shutdown => "shutdown",
            Action::Create => "create",
            Action::Delete => "delete",
        }
    }

    /// The transient state a simulator enters when it accepts this action.
    pub fn entry_state(self) -> Option<State> {
        match self {
            Action::Start => Some(State::Starting),
            Action::Stop => Some(State::Stopping),
            Action::Pause => Some(State::Pausing),
            Action::Resume => Some(State::Resuming),
            Action::Reset => Some(State::Resetting),
            Action::Shutdown => Some(State::ShuttingDown),
            Action::Ping | Action::Create | Action::Delete => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = TransitionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| TransitionError::UnknownAction(s.to_owned()))
    }
}

/// Why the lifecycle refused an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The table has no edge `current → next`.
    #[error("Invalid state transition")]
    Invalid {
        /// The state the component was in.
        current: State,
        /// The state the action asked for.
        next: State,
    },
    /// The action name is not part of the protocol.
    #[error("Unknown action")]
    UnknownAction(String),
    /// The action exists but this component type does not implement it.
    #[error("Unsupported action")]
    Unsupported {
        /// The action.
        action: Action,
        /// The component type, e.g. `manager/generic`.
        kind: String,
    },
}

/// Edges outside the VILLAS table that a driver may take because it
/// *observed* them rather than decided them. Nothing else leaves the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Work found already running after a daemon restart (a Kubernetes Job
    /// that outlived the daemon): `idle → running` or `idle → paused`.
    Adopted,
    /// Something failed: any state but `gone` → `error`.
    Failed,
    /// The component was deleted: any state → `gone`.
    Deleted,
    /// The component mirrors a system that keeps its own state (a
    /// VILLASnode instance, node or relay session): any state but `gone`
    /// → `idle`, `running` or `paused`, as that system reports.
    Mirrored,
    /// A fault the driver itself observed and reported has cleared (the
    /// IoT gateway's MQTT broker is reachable again): `error → running`.
    /// Only the driver that entered `error` for that fault takes it.
    Recovered,
}

impl Observed {
    /// Whether this observation allows `from → to`.
    pub fn allows(self, from: State, to: State) -> bool {
        match self {
            Observed::Adopted => from == State::Idle && matches!(to, State::Running | State::Paused),
            Observed::Failed => from != State::Gone && to == State::Error,
            Observed::Deleted => to == State::Gone,
            Observed::Mirrored => from != State::Gone && matches!(to, State::Idle | State::Running | State::Paused),
            Observed::Recovered => from == State::Error && to == State::Running,
        }
    }
}

/// The lifecycle of one simulator, with checked transitions. Drivers call
/// [`Lifecycle::begin`] for an action and [`Lifecycle::advance`] (or
/// [`Lifecycle::settle`]) when their work moves the state on.
///
/// ```
/// use busbar::state::{Action, Lifecycle, State, TransitionError};
///
/// let mut sim = Lifecycle::default();
/// assert_eq!(sim.begin(Action::Start), Ok(State::Starting));
/// assert_eq!(sim.settle(), Some(State::Running));
/// // "start while running" is refused, and changes nothing.
/// assert_eq!(
///     sim.begin(Action::Start),
///     Err(TransitionError::Invalid { current: State::Running, next: State::Starting })
/// );
/// assert_eq!(sim.state(), State::Running);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    state: State,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { state: State::Idle }
    }
}

impl Lifecycle {
    /// A lifecycle in `state`.
    pub fn new(state: State) -> Self {
        Self { state }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Accept `action`: enter its transient state, or refuse it.
    /// `ping`, `create` and `delete` have no entry state and leave the state alone.
    pub fn begin(&mut self, action: Action) -> Result<State, TransitionError> {
        match action.entry_state() {
            Some(next) => self.advance(next),
            None => Ok(self.state),
        }
    }

    /// Move to `next` if the table allows it.
    pub fn advance(&mut self, next: State) -> Result<State, TransitionError> {
        if self.state.can_transition_to(next) {
            self.state = next;
            Ok(next)
        } else {
            Err(TransitionError::Invalid { current: self.state, next })
        }
    }

    /// Settle a transient state (`starting → running`, …). Returns the new
    /// state, or `None` if the current state is stable.
    pub fn settle(&mut self) -> Option<State> {
        let next = self.state.settled()?;
        self.advance(next).ok()
    }

    /// Take a declared observed edge (see [`Observed`]); anything else is
    /// refused and changes nothing.
    pub fn observe(&mut self, why: Observed, next: State) -> Result<State, TransitionError> {
        if why.allows(self.state, next) {
            self.state = next;
            Ok(next)
        } else {
            Err(TransitionError::Invalid { current: self.state, next })
        }
    }

    /// Enter `error` ([`Observed::Failed`]); allowed from everywhere but `gone`.
    pub fn fail(&mut self) -> State {
        if self.state != State::Gone {
            self.state = State::Error;
        }
        self.state
    }

    /// Enter `gone` (delete, [`Observed::Deleted`]). Terminal.
    pub fn gone(&mut self) {
        self.state = State::Gone;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    /// The table of reference §5.1, written out independently of the code.
    const TABLE: &[(State, &[State])] = &[
        (Error, &[Resetting, Error, Gone]),
        (Idle, &[Resetting, Error, Idle, Starting, ShuttingDown, Gone]),
        (Starting, &[Resetting, Error, Running, Gone]),
        (Running, &[Resetting, Error, Pausing, Stopping, Gone]),
        (Pausing, &[Resetting, Error, Paused, Gone]),
        (Paused, &[Resetting, Error, Resuming, Stopping, Gone]),
        (Resuming, &[Resetting, Error, Running, Gone]),
        (Stopping, &[Resetting, Error, Idle, Gone]),
        (Resetting, &[Resetting, Error, Idle, Gone]),
        (ShuttingDown, &[Shutdown, Error, Gone]),
        (Shutdown, &[Starting, Error, Gone]),
        (Gone, &[]),
    ];

    #[test]
    fn every_pair_of_states_follows_the_reference_table() {
        assert_eq!(TABLE.len(), State::ALL.len());
        for &(from, allowed) in TABLE {
            for to in State::ALL {
                assert_eq!(from.can_transition_to(to), allowed.contains(&to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn every_action_from_every_state_is_accepted_exactly_when_the_table_allows() {
        for from in State::ALL {
            for action in Action::ALL {
                let mut lc = Lifecycle::new(from);
                let result = lc.begin(action);
                match action.entry_state() {
                    None => assert_eq!(result, Ok(from), "{action} leaves {from} alone"),
                    Some(next) if from.can_transition_to(next) => {
                        assert_eq!(result, Ok(next));
                        assert_eq!(lc.state(), next);
                    }
                    Some(next) => {
                        assert_eq!(result, Err(TransitionError::Invalid { current: from, next }));
                        assert_eq!(lc.state(), from, "a refused action changes nothing");
                    }
                }
            }
        }
    }

    #[test]
    fn transient_states_settle_into_their_targets_and_stable_ones_do_not() {
        let expect = [
            (Starting, Some(Running)),
            (Resuming, Some(Running)),
            (Pausing, Some(Paused)),
            (Stopping, Some(Idle)),
            (Resetting, Some(Idle)),
            (ShuttingDown, Some(Shutdown)),
        ];
        for from in State::ALL {
            let want = expect.iter().find(|(s, _)| *s == from).and_then(|(_, t)| *t);
            let mut lc = Lifecycle::new(from);
            assert_eq!(lc.settle(), want, "{from}");
            if let Some(t) = want {
                assert!(from.can_transition_to(t), "settling {from} must be a legal edge");
            }
        }
    }

    #[test]
    fn a_full_dummy_run_walks_the_happy_path() {
        let mut lc = Lifecycle::default();
        assert_eq!(lc.begin(Action::Start), Ok(Starting));
        assert_eq!(lc.settle(), Some(Running));
        assert_eq!(lc.begin(Action::Pause), Ok(Pausing));
        assert_eq!(lc.settle(), Some(Paused));
        assert_eq!(lc.begin(Action::Resume), Ok(Resuming));
        assert_eq!(lc.settle(), Some(Running));
        assert_eq!(lc.begin(Action::Stop), Ok(Stopping));
        assert_eq!(lc.settle(), Some(Idle));
        assert_eq!(lc.begin(Action::Shutdown), Ok(ShuttingDown));
        assert_eq!(lc.settle(), Some(Shutdown));
        assert_eq!(lc.begin(Action::Start), Ok(Starting));
    }

    #[test]
    fn error_is_left_only_by_reset() {
        let mut lc = Lifecycle::new(Idle);
        assert_eq!(lc.fail(), Error);
        for action in [Action::Start, Action::Stop, Action::Pause, Action::Resume, Action::Shutdown] {
            assert!(lc.clone().begin(action).is_err(), "{action} from error");
        }
        assert_eq!(lc.begin(Action::Reset), Ok(Resetting));
        assert_eq!(lc.settle(), Some(Idle));
    }

    #[test]
    fn gone_is_terminal_even_for_errors() {
        let mut lc = Lifecycle::new(Running);
        lc.gone();
        assert_eq!(lc.fail(), Gone);
        for action in Action::ALL {
            if action.entry_state().is_some() {
                assert!(lc.clone().begin(action).is_err());
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_typed_errors() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>(), Ok(s));
        }
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert_eq!("foo".parse::<Action>(), Err(TransitionError::UnknownAction("foo".into())));
        assert!("stopped".parse::<State>().is_err());
    }

    #[test]
    fn observed_edges_are_exactly_the_declared_ones() {
        for from in State::ALL {
            for to in State::ALL {
                assert_eq!(Observed::Adopted.allows(from, to), from == Idle && matches!(to, Running | Paused));
                assert_eq!(Observed::Failed.allows(from, to), from != Gone && to == Error);
                assert_eq!(Observed::Deleted.allows(from, to), to == Gone);
                assert_eq!(Observed::Mirrored.allows(from, to), from != Gone && matches!(to, Idle | Running | Paused));
                assert_eq!(Observed::Recovered.allows(from, to), from == Error && to == Running);
            }
        }
        // Not an edge of the table: only an observation may take it.
        assert!(!Idle.can_transition_to(Running));
        let mut l = Lifecycle::default();
        assert!(l.advance(Running).is_err());
        assert!(l.observe(Observed::Failed, Running).is_err());
        assert_eq!(l.observe(Observed::Adopted, Running), Ok(Running));
        assert!(l.observe(Observed::Adopted, Paused).is_err(), "adoption starts from idle only");
    }
}
