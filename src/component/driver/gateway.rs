//! `gateway/iot-agent`: the component side of an IoT agent
//! ([`crate::iot::Agent`]). The agent starts with the component; `start`
//! and `resume` let measures in, `stop`, `pause`, `reset` and `shutdown`
//! refuse them (MQTT unsubscribes, HTTP answers 503), while provisioning
//! stays available. Deleting the gateway makes its devices `gone`.

use serde_json::{Map, Value};
use tracing::{info, warn};

use super::{Driver, Fut};
use crate::component::core::Cx;
use crate::iot::Agent;
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::react::{self, GatewayEvent};
use crate::state::Action;

fn agent_failed() -> ErrorInfo {
    ErrorInfo::new("The IoT agent failed")
}

#[derive(Default)]
pub(super) struct Gateway {
    agent: Option<Box<Agent>>,
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
            self.agent = Some(Box::new(agent));
        }
        if self.agent.is_none() && action == Action::Resume {
            return Err(ErrorInfo::new("The IoT agent is not running; see the previous error"));
        }
        cx.begin(action)?;
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

    /// The agent's counters and listeners.
    fn live_status(&self) -> Option<Map<String, Value>> {
        self.agent.as_ref().map(|a| a.status())
    }

    /// A device of this gateway.
    fn member_status(&self, uuid: uuid::Uuid, info: &crate::protocol::DaemonInfo) -> Option<Value> {
        self.agent.as_ref()?.device_status(uuid, info)
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
