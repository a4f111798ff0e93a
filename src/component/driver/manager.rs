//! Managers: create, persist and delete components. `manager/generic`
//! takes component parameters as they are; the Kubernetes managers shape
//! theirs first (see `kubernetes.rs`).
//!
//! A manager stays `idle`: a refused create or delete is answered with the
//! error (and shown in `status.error` until the next action succeeds) but
//! leaves it usable. Only a panic puts it in `error`, and `reset`
//! (`resetting → idle`) clears that.

use serde_json::{Map, Value};
use tracing::info;
use uuid::Uuid;

use super::{Driver, Fut};
use crate::component::core::{Cx, Request, Spawn};
use crate::config::ComponentSpec;
use crate::metrics::Fault;
use crate::protocol::{ActionRequest, ErrorInfo};
use crate::state::{Action, State, TransitionError};
use crate::store::StoredComponent;

/// How a manager turns create parameters into a component spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// `manager/generic`: as given.
    AsGiven,
    /// `manager/kubernetes`: lift `properties.*`, add the Job template.
    KubernetesJob,
    /// `manager/kubernetes-simple`: VILLASweb's flat duplication
    /// parameters.
    KubernetesSimple,
}

pub(super) struct Manager {
    shape: Shape,
}

impl Manager {
    pub(super) fn new(shape: Shape) -> Self {
        Manager { shape }
    }

    async fn act(&self, mut cx: Cx<'_>, action: Action, req: &ActionRequest) -> Result<(), ErrorInfo> {
        match action {
            Action::Create => {
                let spawn = self.create(&cx, req).await?;
                cx.request(Request::Spawn(Box::new(spawn)));
            }
            Action::Delete => {
                let uuid = delete(&cx, req).await?;
                cx.request(Request::Remove(uuid));
            }
            Action::Reset => {
                cx.begin(Action::Reset)?;
                cx.go(State::Idle);
            }
            other => {
                cx.env.metrics.error(Fault::UnsupportedAction);
                return Err(ErrorInfo::from(&TransitionError::Unsupported {
                    action: other,
                    kind: cx.core.kind_name(),
                }));
            }
        }
        cx.core.error = None;
        Ok(())
    }

    /// The component spec a create asks for.
    fn shape(&self, cx: &Cx<'_>, params: &Map<String, Value>) -> Result<Map<String, Value>, ErrorInfo> {
        let manager = &cx.core.properties;
        Ok(match self.shape {
            Shape::AsGiven => params.clone(),
            Shape::KubernetesJob => super::kubernetes::simulator_spec(params, manager),
            Shape::KubernetesSimple => super::kubernetes::simple_simulator_spec(params, manager)
                .inspect_err(|_| cx.env.metrics.error(Fault::InvalidCreate))?,
        })
    }

    /// Check and persist a create; the component to start.
    async fn create(&self, cx: &Cx<'_>, req: &ActionRequest) -> Result<Spawn, ErrorInfo> {
        let env = cx.env;
        // The Kubernetes manager lifts `properties.*` into the new component.
        let may_set = &env.settings.create_may_set;
        let lifted = req.parameters.get("properties").and_then(Value::as_object);
        for params in std::iter::once(&req.parameters).chain(lifted) {
            crate::sandbox::check_create(params, may_set).inspect_err(|_| env.metrics.error(Fault::RefusedCreate))?;
        }
        let mut params = self.shape(cx, &req.parameters)?;
        let spec = ComponentSpec::from_map(params.clone()).map_err(|e| {
            env.metrics.error(Fault::InvalidCreate);
            ErrorInfo::new(format!("Invalid create parameters: {} {}", e.key, e.msg))
                .with("path", format!("$.{}", e.key))
        })?;
        let kind = env.kinds.check(&spec).map_err(|e| {
            env.metrics.error(Fault::UnknownType);
            ErrorInfo::new(format!("Cannot create component: {}", e.msg)).with("path", format!("$.{}", e.key))
        })?;
        crate::sandbox::check_create_for(&kind.driver, &spec.properties, may_set)
            .inspect_err(|_| env.metrics.error(Fault::RefusedCreate))?;
        // A Kubernetes simulator that could never reach a cluster (no
        // kubeconfig, a path that does not exist) is refused here, in the
        // create's answer, not left to fail on its own a moment later.
        if self.shape != Shape::AsGiven {
            let kubeconfig = params.get("kubeconfig").and_then(Value::as_str).filter(|s| !s.is_empty());
            env.kube.get(kubeconfig).await.map_err(|e| {
                env.metrics.error(Fault::KubernetesApi);
                ErrorInfo::new(format!("Cannot create a Kubernetes simulator: {}", e.msg()))
            })?;
        }
        let uuid = spec.uuid.unwrap_or_else(Uuid::new_v4);
        params.insert("uuid".into(), Value::String(uuid.to_string()));
        let spec = ComponentSpec { uuid: Some(uuid), properties: params.clone(), ..spec };
        let duplicate =
            || ErrorInfo::new("Duplicate uuid: a component with this uuid exists").with("uuid", uuid.to_string());
        if env.components.lookup(uuid).is_some() {
            env.metrics.error(Fault::DuplicateUuid);
            return Err(duplicate());
        }
        let manager = cx.core.keys.uuid;
        let stored = StoredComponent { uuid, manager, spec: params };
        match env.store.insert_component(stored).await {
            Ok(true) => {}
            Ok(false) => {
                env.metrics.error(Fault::DuplicateUuid);
                return Err(duplicate());
            }
            Err(e) => {
                env.metrics.error(Fault::Store);
                return Err(ErrorInfo::new(format!("Cannot persist component: {e}")));
            }
        }
        info!(created = %uuid, category = %spec.category, r#type = %spec.kind, "component created");
        Ok(Spawn { spec, kind, uuid, first: None })
    }
}

/// Check and unpersist a delete; the component to remove.
async fn delete(cx: &Cx<'_>, req: &ActionRequest) -> Result<Uuid, ErrorInfo> {
    let env = cx.env;
    let invalid = |msg: &str| ErrorInfo::new(msg.to_owned()).with("path", "$.uuid");
    let uuid = match req.parameters.get("uuid") {
        Some(Value::String(s)) => Uuid::parse_str(s).map_err(|_| invalid("Invalid uuid"))?,
        _ => return Err(invalid("Missing uuid")),
    };
    let Some(handle) = env.components.lookup(uuid) else {
        env.metrics.error(Fault::UnknownComponent);
        return Err(ErrorInfo::new("Unknown component").with("uuid", uuid.to_string()));
    };
    if handle.managed_by != Some(cx.core.keys.uuid) {
        env.metrics.error(Fault::NotManaged);
        return Err(ErrorInfo::new("Component is not managed by this manager").with("uuid", uuid.to_string()));
    }
    if !handle.persisted {
        env.metrics.error(Fault::ConfiguredComponent);
        return Err(ErrorInfo::new("Component is defined in the configuration file and cannot be deleted")
            .with("uuid", uuid.to_string()));
    }
    if let Err(e) = env.store.delete_component(uuid).await {
        env.metrics.error(Fault::Store);
        return Err(ErrorInfo::new(format!("Cannot delete component: {e}")));
    }
    info!(deleted = %uuid, "component deleted");
    Ok(uuid)
}

impl Driver for Manager {
    fn act<'a>(&'a mut self, cx: Cx<'a>, action: Action, req: &'a ActionRequest) -> Fut<'a, Result<(), ErrorInfo>> {
        Box::pin(Manager::act(self, cx, action, req))
    }
}
