//! Driver reactions, sans-IO: what a driver event does to a component's
//! state. Next to [`crate::state`] (which answers actions), these answer
//! what the world reports: a child process was spawned or exited, a Job
//! was observed, the IoT agent applied an action.
//!
//! Each rule is a pure function of the current state and the event. It
//! returns a [`Reaction`]; the component task applies it through its one
//! checked entry (`Component::go`), which accepts only edges of the VILLAS
//! table ([`State::can_transition_to`]) and the declared [`Observed`] edges,
//! and publishes every state it passes through, in order. The tests below
//! check every (state, event) pair against tables written out separately,
//! and that every path a rule returns is made of allowed edges.

pub use crate::state::Observed;
use crate::state::State;

/// What a driver event does to the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Nothing changes.
    Stay,
    /// Walk these states in order, each a table edge from the one before.
    Path(&'static [State]),
    /// Enter a declared observed edge.
    Observe(Observed, State),
    /// Enter `error` (with the event's message).
    Fail,
    /// The work must not go on: kill it, and wait for its end (process
    /// spawned after a stop or reset was accepted).
    Kill,
}

impl Reaction {
    /// Whether every edge of this reaction, taken from `from`, is allowed.
    pub fn is_allowed_from(self, from: State) -> bool {
        match self {
            Reaction::Stay | Reaction::Kill => true,
            Reaction::Fail => Observed::Failed.allows(from, State::Error),
            Reaction::Observe(why, to) => why.allows(from, to),
            Reaction::Path(path) => {
                let mut at = from;
                path.iter().all(|&to| {
                    let ok = at.can_transition_to(to);
                    at = to;
                    ok
                })
            }
        }
    }
}

/// What the run of a process simulator (generic, script, dpsim) reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcessEvent {
    /// The child was spawned.
    Spawned,
    /// Preparing or spawning the child failed (download, unpack, exec).
    SpawnFailed,
    /// SIGSTOP or SIGCONT was delivered for a pause or resume.
    Signalled,
    /// A stop, reset or shutdown found no child to end.
    NothingRuns,
    /// The child exited after busbar asked it to (stop, reset).
    ExitedAsAsked,
    /// The child exited by itself with code 0.
    ExitedOk,
    /// The child exited by itself with another code, or by a signal.
    ExitedBadly,
    /// The results were uploaded, or there were none to upload.
    ResultsDone,
    /// Uploading the results failed.
    UploadFailed,
}

impl ProcessEvent {
    /// Every event, for exhaustive tests.
    pub const ALL: [ProcessEvent; 9] = [
        ProcessEvent::Spawned,
        ProcessEvent::SpawnFailed,
        ProcessEvent::Signalled,
        ProcessEvent::NothingRuns,
        ProcessEvent::ExitedAsAsked,
        ProcessEvent::ExitedOk,
        ProcessEvent::ExitedBadly,
        ProcessEvent::ResultsDone,
        ProcessEvent::UploadFailed,
    ];
}

/// The process driver's rules.
pub fn process(state: State, event: ProcessEvent) -> Reaction {
    use ProcessEvent as E;
    use State::*;
    match (event, state) {
        (_, Gone) => Reaction::Stay,
        (E::Spawned, Starting) => Reaction::Path(&[Running]),
        // A stop or reset arrived while the child was being prepared.
        (E::Spawned, Stopping | Resetting) => Reaction::Kill,
        (E::Spawned, _) => Reaction::Stay,
        (E::SpawnFailed, Stopping | Resetting) => Reaction::Path(&[Idle]),
        (E::SpawnFailed, _) => Reaction::Fail,
        (E::Signalled, Pausing) => Reaction::Path(&[Paused]),
        (E::Signalled, Resuming) => Reaction::Path(&[Running]),
        (E::Signalled, _) => Reaction::Stay,
        (E::NothingRuns | E::ExitedAsAsked, Stopping | Resetting) => Reaction::Path(&[Idle]),
        (E::NothingRuns, ShuttingDown) => Reaction::Path(&[Shutdown]),
        (E::NothingRuns | E::ExitedAsAsked, _) => Reaction::Stay,
        // The simulation ended by itself: stopping, then results.
        (E::ExitedOk, Running | Paused) => Reaction::Path(&[Stopping]),
        (E::ExitedOk, Starting | Resuming) => Reaction::Path(&[Running, Stopping]),
        (E::ExitedOk, Pausing) => Reaction::Path(&[Paused, Stopping]),
        (E::ExitedOk, _) => Reaction::Stay,
        (E::ExitedBadly, Idle | Error) => Reaction::Stay,
        (E::ExitedBadly, _) => Reaction::Fail,
        (E::ResultsDone, Stopping) => Reaction::Path(&[Idle]),
        (E::ResultsDone, _) => Reaction::Stay,
        (E::UploadFailed, Idle | Error) => Reaction::Stay,
        (E::UploadFailed, _) => Reaction::Fail,
    }
}

/// What the Job task of a Kubernetes simulator reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobEvent {
    /// The Job's pods run.
    PhaseRunning,
    /// The Job is suspended.
    PhaseSuspended,
    /// The Job completed.
    PhaseSucceeded,
    /// The Job failed.
    PhaseFailed,
    /// The suspend (`true`) or unsuspend (`false`) patch was applied.
    SuspendApplied(bool),
    /// The Job finished and its watch ended.
    Finished,
    /// The Job disappeared (deleted outside busbar).
    Vanished,
    /// busbar deleted the Job (stop, reset, shutdown).
    Deleted,
    /// The Kubernetes API failed.
    ApiFailed,
}

impl JobEvent {
    /// Every event, for exhaustive tests.
    pub const ALL: [JobEvent; 10] = [
        JobEvent::PhaseRunning,
        JobEvent::PhaseSuspended,
        JobEvent::PhaseSucceeded,
        JobEvent::PhaseFailed,
        JobEvent::SuspendApplied(true),
        JobEvent::SuspendApplied(false),
        JobEvent::Finished,
        JobEvent::Vanished,
        JobEvent::Deleted,
        JobEvent::ApiFailed,
    ];
}

/// The Kubernetes Job driver's rules. `adopting` is true while the
/// component watches a Job it found at start-up rather than one it started:
/// only then may `idle` jump to what the Job is doing.
pub fn kubernetes(state: State, event: JobEvent, adopting: bool) -> Reaction {
    use JobEvent as E;
    use State::*;
    match (event, state) {
        (_, Gone) => Reaction::Stay,
        (E::PhaseRunning, Starting | Resuming) => Reaction::Path(&[Running]),
        (E::PhaseRunning, Idle) if adopting => Reaction::Observe(Observed::Adopted, Running),
        (E::PhaseRunning, _) => Reaction::Stay,
        (E::PhaseSuspended | E::SuspendApplied(true), Pausing) => Reaction::Path(&[Paused]),
        (E::PhaseSuspended, Idle) if adopting => Reaction::Observe(Observed::Adopted, Paused),
        (E::PhaseSuspended | E::SuspendApplied(true), _) => Reaction::Stay,
        (E::SuspendApplied(false), Resuming) => Reaction::Path(&[Running]),
        (E::SuspendApplied(false), _) => Reaction::Stay,
        (E::PhaseSucceeded, Running | Paused) => Reaction::Path(&[Stopping]),
        (E::PhaseSucceeded, Starting | Resuming) => Reaction::Path(&[Running, Stopping]),
        (E::PhaseSucceeded, Pausing) => Reaction::Path(&[Paused, Stopping]),
        (E::PhaseSucceeded, _) => Reaction::Stay,
        (E::PhaseFailed, Stopping | Resetting | Idle | Error) => Reaction::Stay,
        (E::PhaseFailed, _) => Reaction::Fail,
        (E::Finished, Stopping) => Reaction::Path(&[Idle]),
        (E::Finished, _) => Reaction::Stay,
        (E::Vanished, Idle | Stopping | Resetting | Error) => Reaction::Stay,
        (E::Vanished, _) => Reaction::Fail,
        (E::Deleted, Stopping | Resetting) => Reaction::Path(&[Idle]),
        (E::Deleted, ShuttingDown) => Reaction::Path(&[Shutdown]),
        (E::Deleted, _) => Reaction::Stay,
        (E::ApiFailed, _) => Reaction::Fail,
    }
}

/// What the IoT agent of a gateway reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GatewayEvent {
    /// The agent started with the component and lets measures in.
    Started,
    /// The agent applied an action (measures let in or refused).
    Applied,
    /// The agent could not start.
    StartFailed,
    /// The MQTT broker has been unreachable for the gateway's grace
    /// period.
    MqttLost,
    /// The MQTT broker is reachable again after a [`GatewayEvent::MqttLost`]
    /// that put the gateway in `error` (the driver sends it only then).
    MqttBack,
}

impl GatewayEvent {
    /// Every event, for exhaustive tests.
    pub const ALL: [GatewayEvent; 5] = [
        GatewayEvent::Started,
        GatewayEvent::Applied,
        GatewayEvent::StartFailed,
        GatewayEvent::MqttLost,
        GatewayEvent::MqttBack,
    ];
}

/// The IoT gateway's rules: the agent acts at once, so every transient
/// state settles as soon as the agent has applied it. At start-up the
/// gateway walks `idle → starting → running`, as if started. A running
/// gateway whose MQTT broker stays unreachable is in `error` (HTTP and
/// AMQP measures still go in), and returns to `running` by itself when
/// the broker is back; a stopped or paused one does not need MQTT.
pub fn gateway(state: State, event: GatewayEvent) -> Reaction {
    use GatewayEvent as E;
    use State::*;
    match (event, state) {
        (_, Gone) => Reaction::Stay,
        (E::Started, Idle) => Reaction::Path(&[Starting, Running]),
        (E::Started, _) => Reaction::Stay,
        (E::Applied, Starting | Resuming) => Reaction::Path(&[Running]),
        (E::Applied, Pausing) => Reaction::Path(&[Paused]),
        (E::Applied, Stopping | Resetting) => Reaction::Path(&[Idle]),
        (E::Applied, ShuttingDown) => Reaction::Path(&[Shutdown]),
        (E::Applied, _) => Reaction::Stay,
        (E::StartFailed, _) => Reaction::Fail,
        (E::MqttLost, Running) => Reaction::Fail,
        (E::MqttLost, _) => Reaction::Stay,
        (E::MqttBack, Error) => Reaction::Observe(Observed::Recovered, Running),
        (E::MqttBack, _) => Reaction::Stay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    /// Where each reaction ends (`None`: stays or kills, `Some(Error)`:
    /// fails), written out as the table of the driver's documented
    /// behaviour rather than derived from the code.
    fn end(r: Reaction, from: State) -> State {
        match r {
            Reaction::Stay | Reaction::Kill => from,
            Reaction::Fail => Error,
            Reaction::Observe(_, to) => to,
            Reaction::Path(p) => *p.last().unwrap(),
        }
    }

    const PROCESS: &[(ProcessEvent, &[(State, State)])] = {
        use ProcessEvent as E;
        &[
            (E::Spawned, &[(Starting, Running)]),
            (
                E::SpawnFailed,
                &[
                    (Idle, Error),
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (Stopping, Idle),
                    (Resetting, Idle),
                    (Error, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
            (E::Signalled, &[(Pausing, Paused), (Resuming, Running)]),
            (E::NothingRuns, &[(Stopping, Idle), (Resetting, Idle), (ShuttingDown, Shutdown)]),
            (E::ExitedAsAsked, &[(Stopping, Idle), (Resetting, Idle)]),
            (
                E::ExitedOk,
                &[
                    (Starting, Stopping),
                    (Running, Stopping),
                    (Pausing, Stopping),
                    (Paused, Stopping),
                    (Resuming, Stopping),
                ],
            ),
            (
                E::ExitedBadly,
                &[
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (Stopping, Error),
                    (Resetting, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
            (E::ResultsDone, &[(Stopping, Idle)]),
            (
                E::UploadFailed,
                &[
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (Stopping, Error),
                    (Resetting, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
        ]
    };

    fn expected<E: PartialEq + Copy>(table: &[(E, &[(State, State)])], e: E, s: State) -> State {
        let row = table.iter().find(|(ev, _)| *ev == e).map(|(_, r)| *r).unwrap_or(&[]);
        row.iter().find(|(from, _)| *from == s).map_or(s, |(_, to)| *to)
    }

    #[test]
    fn every_process_event_in_every_state_follows_the_table() {
        for e in ProcessEvent::ALL {
            for s in State::ALL {
                let r = process(s, e);
                assert_eq!(end(r, s), expected(PROCESS, e, s), "{e:?} in {s}: {r:?}");
                assert!(r.is_allowed_from(s), "{e:?} in {s}: {r:?} leaves the table");
            }
        }
        assert_eq!(process(Stopping, ProcessEvent::Spawned), Reaction::Kill);
        assert_eq!(process(Resetting, ProcessEvent::Spawned), Reaction::Kill);
    }

    const JOB: &[(JobEvent, &[(State, State)])] = {
        use JobEvent as E;
        &[
            (E::PhaseRunning, &[(Starting, Running), (Resuming, Running)]),
            (E::PhaseSuspended, &[(Pausing, Paused)]),
            (E::SuspendApplied(true), &[(Pausing, Paused)]),
            (E::SuspendApplied(false), &[(Resuming, Running)]),
            (
                E::PhaseSucceeded,
                &[
                    (Starting, Stopping),
                    (Running, Stopping),
                    (Pausing, Stopping),
                    (Paused, Stopping),
                    (Resuming, Stopping),
                ],
            ),
            (
                E::PhaseFailed,
                &[
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
            (E::Finished, &[(Stopping, Idle)]),
            (
                E::Vanished,
                &[
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
            (E::Deleted, &[(Stopping, Idle), (Resetting, Idle), (ShuttingDown, Shutdown)]),
            (
                E::ApiFailed,
                &[
                    (Idle, Error),
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (Stopping, Error),
                    (Resetting, Error),
                    (Error, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
        ]
    };

    #[test]
    fn every_job_event_in_every_state_follows_the_table() {
        for adopting in [false, true] {
            for e in JobEvent::ALL {
                for s in State::ALL {
                    let r = kubernetes(s, e, adopting);
                    let want = match (adopting, s, e) {
                        (true, Idle, JobEvent::PhaseRunning) => Running,
                        (true, Idle, JobEvent::PhaseSuspended) => Paused,
                        _ => expected(JOB, e, s),
                    };
                    assert_eq!(end(r, s), want, "{e:?} in {s} (adopting {adopting}): {r:?}");
                    assert!(r.is_allowed_from(s), "{e:?} in {s}: {r:?} leaves the table");
                }
            }
        }
    }

    #[test]
    fn every_gateway_event_in_every_state_follows_the_table() {
        use GatewayEvent as E;
        let table: &[(E, &[(State, State)])] = &[
            (E::Started, &[(Idle, Running)]),
            (
                E::Applied,
                &[
                    (Starting, Running),
                    (Resuming, Running),
                    (Pausing, Paused),
                    (Stopping, Idle),
                    (Resetting, Idle),
                    (ShuttingDown, Shutdown),
                ],
            ),
            (
                E::StartFailed,
                &[
                    (Idle, Error),
                    (Starting, Error),
                    (Running, Error),
                    (Pausing, Error),
                    (Paused, Error),
                    (Resuming, Error),
                    (Stopping, Error),
                    (Resetting, Error),
                    (Error, Error),
                    (ShuttingDown, Error),
                    (Shutdown, Error),
                ],
            ),
            (E::MqttLost, &[(Running, Error)]),
            (E::MqttBack, &[(Error, Running)]),
        ];
        for e in E::ALL {
            for s in State::ALL {
                let r = gateway(s, e);
                assert_eq!(end(r, s), expected(table, e, s), "{e:?} in {s}: {r:?}");
                assert!(r.is_allowed_from(s), "{e:?} in {s}: {r:?} leaves the table");
            }
        }
        assert_eq!(gateway(Idle, E::Started), Reaction::Path(&[Starting, Running]), "start-up is published as a start");
    }
}
