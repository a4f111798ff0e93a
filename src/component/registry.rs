//! The registry of running components: one handle per uuid, in creation
//! order. The bus looks up who a message reaches, the API and managers find
//! components by uuid; only the daemon adds and removes.

use indexmap::IndexMap;
use std::sync::RwLock;
use uuid::Uuid;

use super::ComponentHandle;
use crate::protocol::Addressed;

/// Every running component of one daemon.
#[derive(Debug, Default)]
pub struct Registry(RwLock<IndexMap<Uuid, ComponentHandle>>);

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, IndexMap<Uuid, ComponentHandle>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IndexMap<Uuid, ComponentHandle>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle of component `uuid`.
    pub fn lookup(&self, uuid: Uuid) -> Option<ComponentHandle> {
        self.read().get(&uuid).cloned()
    }

    /// Every component, in creation order.
    pub fn handles(&self) -> Vec<ComponentHandle> {
        self.read().values().cloned().collect()
    }

    /// How many components run.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether none runs.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// The components a message with routing headers `to` reaches (shared
    /// topology: what the exchange would deliver to each component queue).
    /// Only the matches are cloned out of the registry.
    pub fn addressed(&self, to: &Addressed<'_>) -> Vec<ComponentHandle> {
        if let Some(uuid) = to.uuid
            && to.category.is_none()
            && to.kind.is_none()
            && to.realm.is_none()
        {
            return self.lookup(uuid).into_iter().collect();
        }
        self.read().values().filter(|h| h.keys.matches_addressed(to)).cloned().collect()
    }

    /// The uuids of the components managed by `manager`.
    pub fn managed_by(&self, manager: Uuid) -> Vec<Uuid> {
        self.read().values().filter(|h| h.managed_by == Some(manager)).map(|h| h.uuid()).collect()
    }

    /// Add (or replace) a component.
    pub(crate) fn insert(&self, handle: ComponentHandle) {
        self.write().insert(handle.uuid(), handle);
    }

    /// Take a component out.
    pub(crate) fn remove(&self, uuid: Uuid) -> Option<ComponentHandle> {
        self.write().shift_remove(&uuid)
    }
}
