//! `gateway/iot-agent`: the component side of an IoT agent
//! ([`crate::iot::Agent`]). The agent starts with the component; `start`
//! and `resume` let measures in, `stop`, `pause`, `reset` and `shutdown`
//! refuse them (MQTT unsubscribes, HTTP answers 503), while provisioning
//! stays available. Deleting the gateway makes its devices `gone`.

use serde_json::{Map, Value};
use tracing::info;

use super::Component;
use crate::iot::Agent;
use crate::protocol::ErrorInfo;
use crate::react::{self, GatewayEvent};
use crate::state::Action;

fn agent_failed() -> ErrorInfo {
    ErrorInfo::new("The IoT agent failed")
}

impl Component {
    /// Start the agent (once, when the component task starts).
    pub(super) async fn start_agent(&mut self) {
        let props = self.driver_properties().into_owned();
        match Agent::start(&self.shared, self.keys.uuid, self.keys.realm.clone(), &props).await {
            Ok(agent) => {
                info!(gateway = %self.keys.uuid, north = %agent.north_addr, south = %agent.south_addr, "IoT agent started");
                let running = *agent.core.running.borrow();
                self.agent = Some(Box::new(agent));
                if running && self.react(react::gateway(self.lifecycle.state(), GatewayEvent::Started), agent_failed) {
                    self.publish(None).await;
                }
            }
            Err(info) => {
                self.shared.metrics.error("gateway_start");
                self.react(react::gateway(self.lifecycle.state(), GatewayEvent::StartFailed), || info);
                self.publish(None).await;
            }
        }
    }

    /// Run a gateway action. An agent that could not start (a port in use,
    /// say) is tried again by `reset` and `start`.
    pub(super) async fn gateway(&mut self, action: Action) -> Result<(), ErrorInfo> {
        // An agent whose I/O thread ended (a bug, logged) is replaced.
        if matches!(action, Action::Start | Action::Reset) && self.agent.as_ref().is_some_and(|a| a.io_dead()) {
            tracing::warn!(gateway = %self.keys.uuid, "the IoT agent's I/O thread had ended; starting a new agent");
            self.agent = None;
        }
        if self.agent.is_none() && matches!(action, Action::Start | Action::Reset) {
            let props = self.driver_properties().into_owned();
            let agent = Agent::start(&self.shared, self.keys.uuid, self.keys.realm.clone(), &props).await?;
            agent.set_running(false);
            self.agent = Some(Box::new(agent));
        }
        if self.agent.is_none() && action == Action::Resume {
            return Err(ErrorInfo::new("The IoT agent is not running; see the previous error"));
        }
        self.begin(action)?;
        let on = matches!(action, Action::Start | Action::Resume);
        if let Some(agent) = &self.agent {
            agent.set_running(on);
        }
        self.react(react::gateway(self.lifecycle.state(), GatewayEvent::Applied), agent_failed);
        Ok(())
    }

    /// The gateway's live status fields (counters, listeners), merged over
    /// the stored ones.
    pub(super) fn agent_status(&self) -> Option<Map<String, Value>> {
        let agent = self.agent.as_ref()?;
        let mut m = self.extra.clone();
        m.extend(agent.status());
        Some(m)
    }

    /// The gateway is deleted: its devices go `gone`, its tasks stop.
    pub(super) async fn remove_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.remove().await;
        }
    }
}
