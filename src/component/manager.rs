//! Managers: create, persist and delete components. `manager/generic`
//! takes component parameters as they are; the Kubernetes managers shape
//! theirs first (see `kubernetes.rs`).

use serde_json::Value;
use tracing::info;
use uuid::Uuid;

use super::Component;
use super::kinds::Driver;
use crate::config::ComponentSpec;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::state::{Action, State, TransitionError};
use crate::store::StoredComponent;

impl Component {
    /// Run a manager action. A manager stays `idle`: a refused create or
    /// delete is answered with the error (and shown in `status.error` until
    /// the next action succeeds) but leaves it usable. Only a panic puts it
    /// in `error`, and `reset` (`resetting → idle`) clears that.
    pub(super) async fn manage(&mut self, action: Action, req: &ActionRequest) -> Result<(), ErrorInfo> {
        match action {
            Action::Create => self.create(req).await?,
            Action::Delete => self.delete(req).await?,
            Action::Reset => {
                self.begin(Action::Reset)?;
                self.go(State::Idle);
            }
            other => {
                self.shared.metrics.error("unsupported_action");
                return Err(ErrorInfo::from(&TransitionError::Unsupported {
                    action: other,
                    kind: format!("{}/{}", self.keys.category, self.keys.kind),
                }));
            }
        }
        self.error = None;
        Ok(())
    }

    async fn create(&mut self, req: &ActionRequest) -> Result<(), ErrorInfo> {
        // The Kubernetes manager lifts `properties.*` into the new component.
        let may_set = &self.shared.config.sandbox.create_may_set;
        let lifted = req.parameters.get("properties").and_then(Value::as_object);
        for params in std::iter::once(&req.parameters).chain(lifted) {
            crate::sandbox::check_create(params, may_set)
                .inspect_err(|_| self.shared.metrics.error("refused_create"))?;
        }
        let mut params = match self.kind.driver {
            Driver::KubernetesManager => super::kubernetes::simulator_spec(&req.parameters, &self.properties),
            Driver::KubernetesSimpleManager => {
                super::kubernetes::simple_simulator_spec(&req.parameters, &self.properties).inspect_err(|_| {
                    self.shared.metrics.error("invalid_create");
                })?
            }
            _ => req.parameters.clone(),
        };
        let spec = ComponentSpec::from_map(params.clone()).map_err(|(key, msg)| {
            self.shared.metrics.error("invalid_create");
            ErrorInfo::new(format!("Invalid create parameters: {key} {msg}")).with("path", format!("$.{key}"))
        })?;
        let kind = self.shared.kinds.check(&spec).map_err(|(key, msg)| {
            self.shared.metrics.error("unknown_type");
            ErrorInfo::new(format!("Cannot create component: {msg}")).with("path", format!("$.{key}"))
        })?;
        let uuid = spec.uuid.unwrap_or_else(Uuid::new_v4);
        params.insert("uuid".into(), Value::String(uuid.to_string()));
        let spec = ComponentSpec { uuid: Some(uuid), properties: params.clone(), ..spec };
        let duplicate =
            || ErrorInfo::new("Duplicate uuid: a component with this uuid exists").with("uuid", uuid.to_string());
        if self.shared.lookup(uuid).is_some() {
            self.shared.metrics.error("duplicate_uuid");
            return Err(duplicate());
        }
        let stored = StoredComponent { uuid, manager: self.keys.uuid, spec: params };
        match self.shared.store.insert_component(stored).await {
            Ok(true) => {}
            Ok(false) => {
                self.shared.metrics.error("duplicate_uuid");
                return Err(duplicate());
            }
            Err(e) => {
                self.shared.metrics.error("store");
                return Err(ErrorInfo::new(format!("Cannot persist component: {e}")));
            }
        }
        self.shared.add_component(&spec, kind, uuid, Some(self.keys.uuid), true).await;
        info!(created = %uuid, category = %spec.category, r#type = %spec.kind, "component created");
        Ok(())
    }

    async fn delete(&mut self, req: &ActionRequest) -> Result<(), ErrorInfo> {
        let invalid = |msg: &str| ErrorInfo::new(msg.to_owned()).with("path", "$.uuid");
        let uuid = match req.parameters.get("uuid") {
            Some(Value::String(s)) => Uuid::parse_str(s).map_err(|_| invalid("Invalid uuid"))?,
            _ => return Err(invalid("Missing uuid")),
        };
        let Some(handle) = self.shared.lookup(uuid) else {
            self.shared.metrics.error("unknown_component");
            return Err(ErrorInfo::new("Unknown component").with("uuid", uuid.to_string()));
        };
        if handle.managed_by != Some(self.keys.uuid) {
            self.shared.metrics.error("not_managed");
            return Err(ErrorInfo::new("Component is not managed by this manager").with("uuid", uuid.to_string()));
        }
        if !handle.persisted {
            self.shared.metrics.error("configured_component");
            return Err(ErrorInfo::new("Component is defined in the configuration file and cannot be deleted")
                .with("uuid", uuid.to_string()));
        }
        if let Err(e) = self.shared.store.delete_component(uuid).await {
            self.shared.metrics.error("store");
            return Err(ErrorInfo::new(format!("Cannot delete component: {e}")));
        }
        self.shared.remove_component(uuid).await;
        info!(deleted = %uuid, "component deleted");
        Ok(())
    }
}
