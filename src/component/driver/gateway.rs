//! `gateway/iot-agent`: the component side of an IoT agent
//! ([`crate::iot::Agent`]). The agent starts with the component; `start`
//! and `resume` let measures in, `stop`, `pause`, `reset` and `shutdown`
//! refuse them (MQTT unsubscribes, HTTP answers 503), while provisioning
//! stays available. Deleting the gateway makes its devices `gone`.
//!
//! A running gateway whose MQTT broker stays unreachable for `mqtt_grace`
//! enters `error` with the reason (HTTP and AMQP measures still go in),
//! and returns to `running` by itself once the broker answers: the state
//! says what a dashboard needs to know, not only a counter.

use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Driver, Event, Fut};
use crate::component::core::Cx;
use crate::iot::{Agent, MqttLink};
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::react::{self, GatewayEvent};
use crate::state::{Action, State};

fn agent_failed() -> ErrorInfo {
    ErrorInfo::new("The IoT agent failed")
}

#[derive(Default)]
pub(super) struct Gateway {
    agent: Option<Box<Agent>>,
    mqtt: Mqtt,
}

/// What the driver knows of the agent's MQTT link.
#[derive(Default)]
struct Mqtt {
    /// The agent's link; `None` without MQTT (or without an agent).
    link: Option<watch::Receiver<MqttLink>>,
    /// Down since, and why.
    down: Option<(Instant, String)>,
    /// This outage was checked against the grace (once per outage and
    /// per action).
    checked: bool,
    /// The gateway is in `error` because of this link (so it is the
    /// driver's to leave when the link is back).
    failed: bool,
    grace: std::time::Duration,
}

impl Mqtt {
    fn watch(&mut self, agent: &Agent) {
        self.link = agent.mqtt_link();
        self.grace = agent.core.settings.mqtt_grace;
        // A link that went down before this subscription is seen too.
        self.down = match self.link.as_ref().map(|l| l.borrow().clone()) {
            Some(MqttLink::Down(why)) => Some((Instant::now(), why)),
            _ => None,
        };
        self.checked = false;
        self.failed = false;
    }

    /// The message of the error state: what is wrong, what still works,
    /// and that no action is needed.
    fn error(&self, url: &str, why: &str) -> ErrorInfo {
        ErrorInfo::new(format!(
            "Cannot reach the MQTT broker {url} ({why}); measures over HTTP and AMQP are still taken. \
             busbar keeps trying and the gateway returns to running by itself when the broker answers"
        ))
        .with("mqtt_url", url)
    }
}

impl Gateway {
    async fn start_agent(cx: &Cx<'_>) -> Result<Agent, ErrorInfo> {
        let props = cx.core.driver_properties().into_owned();
        Agent::start(cx.env, cx.core.keys.uuid, cx.core.keys.realm.clone(), &props).await
    }

    /// Run a gateway action. An agent that could not start (a port in use,
    /// say) is tried again by `reset` and `start`.
    async fn act(&mut self, mut cx: Cx<'_>, action: Action) -> Result<(), ErrorInfo> {
        // An agent whose I/O thread ended (a bug, logged) is replaced.
        if matches!(action, Action::Start | Action::Reset) && self.agent.as_ref().is_some_and(|a| a.io_dead()) {
            warn!(gateway = %cx.core.keys.uuid, "the IoT agent's I/O thread had ended; starting a new agent");
            self.agent = None;
        }
        if self.agent.is_none() && matches!(action, Action::Start | Action::Reset) {
            let agent = Self::start_agent(&cx).await?;
            agent.set_running(false);
            self.mqtt.watch(&agent);
            self.agent = Some(Box::new(agent));
        }
        if self.agent.is_none() && action == Action::Resume {
            return Err(ErrorInfo::new("The IoT agent is not running; see the previous error"));
        }
        cx.begin(action)?;
        // An action clears the error; a broker still down counts again from
        // now (a start of a gateway whose broker is down fails after the
        // grace, not at once).
        self.mqtt.failed = false;
        self.mqtt.checked = false;
        if let Some((since, _)) = &mut self.mqtt.down {
            *since = Instant::now();
        }
        if let Some(agent) = &self.agent {
            agent.set_running(matches!(action, Action::Start | Action::Resume));
        }
        cx.react(react::gateway(cx.core.state(), GatewayEvent::Applied), agent_failed);
        Ok(())
    }
}

impl Driver for Gateway {
    /// Start the agent with the component.
    fn started<'a>(&'a mut self, mut cx: Cx<'a>) -> Fut<'a, bool> {
        Box::pin(async move {
            match Self::start_agent(&cx).await {
                Ok(agent) => {
                    info!(gateway = %cx.core.keys.uuid, north = %agent.north_addr, south = %agent.south_addr, "IoT agent started");
                    let running = *agent.core.running.borrow();
                    self.mqtt.watch(&agent);
                    self.agent = Some(Box::new(agent));
                    running && cx.react(react::gateway(cx.core.state(), GatewayEvent::Started), agent_failed)
                }
                Err(info) => {
                    cx.env.metrics.error(Fault::GatewayStart);
                    cx.react(react::gateway(cx.core.state(), GatewayEvent::StartFailed), || info);
                    true
                }
            }
        })
    }

    fn act<'a>(&'a mut self, cx: Cx<'a>, action: Action, _req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>> {
        Box::pin(Gateway::act(self, cx, action))
    }

    /// A change of the MQTT link. Cancel-safe: `changed` is.
    fn next_event(&mut self) -> Fut<'_, Event> {
        Box::pin(async move {
            let Some(link) = self.mqtt.link.as_mut() else { return std::future::pending().await };
            if link.changed().await.is_err() {
                // The agent is gone; nothing more to watch.
                self.mqtt.link = None;
                return std::future::pending().await;
            }
            Event::Mqtt(link.borrow_and_update().clone())
        })
    }

    /// The link went down (the grace starts) or came back (a gateway in
    /// `error` for it returns to `running`).
    fn on_event(&mut self, mut cx: Cx<'_>, event: Event) -> bool {
        let Event::Mqtt(link) = event else { return false };
        match link {
            MqttLink::Down(why) => {
                match &mut self.mqtt.down {
                    Some((_, w)) => *w = why,
                    None => self.mqtt.down = Some((Instant::now(), why)),
                }
                false
            }
            MqttLink::Up | MqttLink::Connecting => {
                self.mqtt.down = None;
                self.mqtt.checked = false;
                if !std::mem::take(&mut self.mqtt.failed) {
                    return false;
                }
                info!(gateway = %cx.core.keys.uuid, "the MQTT broker answers again");
                let changed = cx.react(react::gateway(cx.core.state(), GatewayEvent::MqttBack), agent_failed);
                if changed {
                    cx.core.error = None;
                }
                changed
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.mqtt.down {
            Some((since, _)) if !self.mqtt.checked => Some(*since + self.mqtt.grace),
            _ => None,
        }
    }

    /// The broker stayed unreachable for the grace: a running gateway
    /// enters `error` (a stopped or paused one does not need MQTT).
    fn on_deadline(&mut self, mut cx: Cx<'_>, _now: Instant) -> bool {
        let Some((_, why)) = &self.mqtt.down else { return false };
        self.mqtt.checked = true;
        if cx.core.state() != State::Running {
            return false;
        }
        let url = self.agent.as_ref().and_then(|a| a.core.settings.mqtt_url.as_deref()).unwrap_or_default();
        let info = self.mqtt.error(&crate::config::redact_url(url), why);
        self.mqtt.failed = cx.react(react::gateway(State::Running, GatewayEvent::MqttLost), || info);
        self.mqtt.failed
    }

    /// Entered `error` from elsewhere: not the link's to leave.
    fn failed(&mut self) {
        self.mqtt.failed = false;
    }

    /// The agent's counters and listeners.
    fn live_status(&self) -> Option<Map<String, Value>> {
        self.agent.as_ref().map(|a| a.status())
    }

    /// A device of this gateway.
    fn member_status(&self, uuid: uuid::Uuid, info: &crate::protocol::DaemonInfo) -> Option<Value> {
        self.agent.as_ref()?.device_status(uuid, info)
    }

    /// The agent's shared state.
    fn devices(&self) -> Option<std::sync::Arc<crate::iot::Core>> {
        self.agent.as_ref().map(|a| a.core.clone())
    }

    /// The gateway is deleted: its devices go `gone`, its tasks stop.
    fn remove<'a>(&'a mut self, _cx: Cx<'a>) -> Fut<'a, ()> {
        Box::pin(async move {
            if let Some(agent) = self.agent.take() {
                agent.remove().await;
            }
        })
    }
}
