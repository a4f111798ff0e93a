//! The groups and devices of one gateway: an in-memory index for the hot
//! southbound path, written through to the embedded store so nothing
//! provisioned is lost (not even by `kill -9`).
//!
//! Tenancy is enforced here, once, for every path: north calls name their
//! tenant; a southbound apikey belongs to exactly one tenant (apikeys are
//! unique per gateway), and devices are looked up only within that tenant.

use indexmap::IndexMap;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::IngestError;
use super::mapping::Address;
use super::model::{ApiError, Device, Group, Tenant, parse_device, parse_group};
use crate::store::{IotRecord, Store};

/// Namespace of device IC uuids (UUIDv5 of `service|servicepath|device_id`).
pub const DEVICE_NAMESPACE: Uuid = Uuid::from_u128(0x6b7a_61b2_3c4e_4d7a_9f3c_2b1e_0d9c_8a71);

/// The stable uuid of a device's infrastructure component.
pub fn device_uuid(tenant: &Tenant, device_id: &str) -> Uuid {
    Uuid::new_v5(&DEVICE_NAMESPACE, format!("{}|{}|{}", tenant.service, tenant.servicepath, device_id).as_bytes())
}

/// The last value of each attribute: name → (type, value, time in ms).
pub type LastValues = IndexMap<String, (String, Value, i64)>;

/// A device with its tenant and what it last reported.
#[derive(Debug)]
pub struct DeviceRecord {
    /// Its tenant.
    pub tenant: Tenant,
    /// The provisioned device.
    pub device: Device,
    /// Its IC uuid.
    pub uuid: Uuid,
    /// Last values, for the device IC's status.
    pub last: Mutex<LastValues>,
}

/// What changed, for the device ICs.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A device was created (`new`) or updated.
    Upsert {
        /// Its IC uuid.
        uuid: Uuid,
        /// Whether it did not exist before.
        new: bool,
    },
    /// A device was deleted.
    Removed {
        /// Its IC uuid.
        uuid: Uuid,
        /// Its entity type (its IC's `type`).
        kind: String,
    },
}

/// A device resolved for a measure.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The device.
    pub record: Arc<DeviceRecord>,
    /// Its group, if any.
    pub group: Option<Arc<Group>>,
}

#[derive(Default)]
struct Inner {
    /// (resource, apikey) → group.
    groups: IndexMap<(String, String), (Tenant, Arc<Group>)>,
    /// apikey → its tenant (unique across tenants).
    apikeys: HashMap<String, Tenant>,
    devices: IndexMap<(Tenant, String), Arc<DeviceRecord>>,
    by_uuid: HashMap<Uuid, Arc<DeviceRecord>>,
    /// (apikey, device_id) of devices with an apikey of their own.
    by_key: HashMap<(String, String), Arc<DeviceRecord>>,
    /// (service, device_id) → the device in each servicepath other than `/`
    /// (devices in `/` are found in `devices`), for dojot's topics, which
    /// name only the service. Empty in the usual one-level dojot setup.
    by_service: HashMap<(String, String), Vec<Arc<DeviceRecord>>>,
}

/// A device's key in `Inner::by_service`; devices in servicepath `/` have none.
fn service_key(rec: &DeviceRecord) -> Option<(String, String)> {
    (rec.tenant.servicepath != "/").then(|| (rec.tenant.service.clone(), rec.device.device_id.clone()))
}

impl Inner {
    /// Add (or replace) a device in every index.
    fn index(&mut self, rec: Arc<DeviceRecord>) {
        let key = (rec.tenant.clone(), rec.device.device_id.clone());
        if let Some(old) = self.devices.get(&key).cloned() {
            self.unindex_keys(&old);
        }
        self.by_uuid.insert(rec.uuid, rec.clone());
        if let Some(k) = &rec.device.apikey {
            self.by_key.insert((k.clone(), rec.device.device_id.clone()), rec.clone());
        }
        if let Some(service) = service_key(&rec) {
            self.by_service.entry(service).or_default().push(rec.clone());
        }
        self.devices.insert(key, rec);
    }

    /// Remove a device from every index.
    fn unindex(&mut self, tenant: &Tenant, id: &str) -> Option<Arc<DeviceRecord>> {
        let rec = self.devices.shift_remove(&(tenant.clone(), id.to_owned()))?;
        self.unindex_keys(&rec);
        Some(rec)
    }

    fn unindex_keys(&mut self, rec: &DeviceRecord) {
        self.by_uuid.remove(&rec.uuid);
        if let Some(k) = &rec.device.apikey {
            self.by_key.remove(&(k.clone(), rec.device.device_id.clone()));
        }
        if let Some(service) = service_key(rec)
            && let Some(recs) = self.by_service.get_mut(&service)
        {
            recs.retain(|r| r.uuid != rec.uuid);
            if recs.is_empty() {
                self.by_service.remove(&service);
            }
        }
    }

    fn group_by_apikey(&self, apikey: &str) -> Option<Arc<Group>> {
        self.groups.iter().find(|((_, k), _)| k == apikey).map(|(_, (_, g))| g.clone())
    }

    /// The group a device takes its defaults from: its apikey's, else the
    /// first of its tenant.
    fn group_of(&self, record: &DeviceRecord) -> Option<Arc<Group>> {
        record
            .device
            .apikey
            .as_deref()
            .and_then(|k| self.group_by_apikey(k))
            .or_else(|| self.groups.values().find(|(t, _)| *t == record.tenant).map(|(_, g)| g.clone()))
    }
}

/// The registry of one gateway.
pub struct Registry {
    gateway: Uuid,
    /// Bytes a federation routing key leaves for service, entity type and
    /// device id: 255 less the realm and the three dots.
    key_budget: usize,
    store: Store,
    inner: RwLock<Inner>,
    changes: mpsc::UnboundedSender<Change>,
    /// Serialises changes: each checks, persists and indexes as one step,
    /// so two concurrent creates of one device cannot both succeed.
    writer: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("gateway", &self.gateway).finish_non_exhaustive()
    }
}

fn group_key(g: &Group) -> String {
    format!("{}\u{1f}{}", g.resource, g.apikey)
}

fn device_key(t: &Tenant, id: &str) -> String {
    format!("{}\u{1f}{}\u{1f}{}", t.service, t.servicepath, id)
}

fn store_err(e: crate::store::StoreError) -> ApiError {
    ApiError::new(500, "INTERNAL_DB_ERROR", format!("Cannot persist: {e}"))
}

/// Whether `tenant` is selected by a north request's tenant (`/*` selects
/// every servicepath of the service).
pub fn selects(request: &Tenant, t: &Tenant) -> bool {
    request.service == t.service && (request.servicepath == "/*" || request.servicepath == t.servicepath)
}

/// Merge a PUT body into an object: top-level keys replace.
fn merged(base: Value, patch: &Map<String, Value>) -> Value {
    let mut base = base;
    if let Value::Object(b) = &mut base {
        for (k, v) in patch {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

impl Registry {
    /// Load the registry of `gateway` from the store.
    pub fn load(
        gateway: Uuid,
        realm: &str,
        store: Store,
        changes: mpsc::UnboundedSender<Change>,
    ) -> Result<Registry, ApiError> {
        let mut inner = Inner::default();
        for r in store.iot_load(gateway).map_err(store_err)? {
            let tenant = Tenant { service: r.service, servicepath: r.servicepath };
            match r.kind.as_str() {
                "group" => {
                    let g = Group::from_json(&r.body)?;
                    inner.apikeys.insert(g.apikey.clone(), tenant.clone());
                    inner.groups.insert((g.resource.clone(), g.apikey.clone()), (tenant, Arc::new(g)));
                }
                _ => {
                    let d = Device::from_json(&r.body)?;
                    let uuid = device_uuid(&tenant, &d.device_id);
                    inner.index(Arc::new(DeviceRecord { tenant, device: d, uuid, last: Mutex::default() }));
                }
            }
        }
        if inner.devices.len() > 100 {
            super::trim_heap();
        }
        Ok(Registry {
            gateway,
            key_budget: super::federation::MAX_ROUTING_KEY.saturating_sub(realm.len() + 3),
            store,
            inner: RwLock::new(inner),
            changes,
            writer: tokio::sync::Mutex::new(()),
        })
    }

    /// Refuse a device whose federation routing key
    /// (`{realm}.{service}.{entity_type}.{device_id}`) would not fit in an
    /// AMQP short string: it could never be published.
    fn fits(&self, tenant: &Tenant, device: &Device, group: Option<&Group>) -> Result<(), ApiError> {
        let used = tenant.service.len() + device.entity_type(group).len() + device.device_id.len();
        if used <= self.key_budget {
            return Ok(());
        }
        Err(ApiError::new(
            400,
            "ID_TOO_LONG",
            format!(
                "service, entity type and device id take {used} bytes; the federation routing key leaves {} in this realm",
                self.key_budget
            ),
        ))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The store the registry persists to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The device `device_id` presenting `apikey`, without autoprovisioning
    /// (command results and polls come from devices that exist).
    pub fn find(&self, apikey: &str, device_id: &str) -> Option<Resolved> {
        let inner = self.read();
        let record = match inner.apikeys.get(apikey) {
            Some(tenant) => inner.devices.get(&(tenant.clone(), device_id.to_owned())).cloned(),
            None => inner.by_key.get(&(apikey.to_owned(), device_id.to_owned())).cloned(),
        }?;
        if record.device.apikey.as_deref().is_some_and(|k| k != apikey) {
            return None;
        }
        let group = inner.group_of(&record);
        Some(Resolved { record, group })
    }

    /// How many devices are provisioned.
    pub fn device_count(&self) -> usize {
        self.read().devices.len()
    }

    /// The device with IC uuid `uuid`.
    pub fn device_by_uuid(&self, uuid: Uuid) -> Option<Resolved> {
        let inner = self.read();
        let record = inner.by_uuid.get(&uuid)?.clone();
        let group = inner.group_of(&record);
        Some(Resolved { record, group })
    }

    /// The device of `tenant` whose entity is `id` (and `kind`, when
    /// given): what the Context Broker names in its forwarded commands,
    /// queries and notifications.
    pub fn by_entity(&self, tenant: &Tenant, id: &str, kind: Option<&str>) -> Option<Resolved> {
        let inner = self.read();
        inner.devices.values().filter(|r| r.tenant == *tenant).find_map(|r| {
            // Most devices are ruled out without building their entity name.
            let named = match &r.device.entity_name {
                Some(n) => n == id,
                None => id.strip_suffix(r.device.device_id.as_str()).is_some_and(|t| t.ends_with(':')),
            };
            if !named {
                return None;
            }
            let group = inner.group_of(r);
            let d = &r.device;
            let g = group.as_deref();
            (d.entity_name(g) == id && kind.is_none_or(|k| k == d.entity_type(g)))
                .then(|| Resolved { record: r.clone(), group })
        })
    }

    /// Every device with its group.
    pub fn resolved(&self) -> Vec<Resolved> {
        let inner = self.read();
        inner.devices.values().map(|r| Resolved { record: r.clone(), group: inner.group_of(r) }).collect()
    }

    // ----- north: groups -----

    /// Create groups (all or none).
    pub async fn create_groups(&self, tenant: &Tenant, groups: Vec<Group>) -> Result<(), ApiError> {
        let _writer = self.writer.lock().await;
        {
            let inner = self.read();
            let mut seen = std::collections::HashSet::new();
            for g in &groups {
                let taken_elsewhere = inner.apikeys.get(&g.apikey).is_some_and(|t| t != tenant);
                let k = (g.resource.clone(), g.apikey.clone());
                if taken_elsewhere || inner.groups.contains_key(&k) || seen.contains(&k) {
                    return Err(ApiError::new(
                        409,
                        "DUPLICATE_GROUP",
                        format!(
                            "A device configuration already exists for resource {} and API Key {}",
                            g.resource, g.apikey
                        ),
                    ));
                }
                seen.insert(k);
            }
        }
        let records = groups.iter().map(|g| self.group_record(tenant, g)).collect();
        self.store.iot_put(self.gateway, records).await.map_err(store_err)?;
        let mut inner = self.write();
        for g in groups {
            inner.apikeys.insert(g.apikey.clone(), tenant.clone());
            inner.groups.insert((g.resource.clone(), g.apikey.clone()), (tenant.clone(), Arc::new(g)));
        }
        Ok(())
    }

    fn group_record(&self, tenant: &Tenant, g: &Group) -> IotRecord {
        IotRecord {
            kind: "group".into(),
            key: group_key(g),
            service: tenant.service.clone(),
            servicepath: tenant.servicepath.clone(),
            body: serde_json::to_string(g).unwrap_or_default(),
        }
    }

    /// The groups of `tenant` (with `/*`: of every servicepath).
    pub fn groups(&self, tenant: &Tenant) -> Vec<Value> {
        self.read()
            .groups
            .values()
            .filter(|(t, _)| selects(tenant, t))
            .map(|(t, g)| {
                let mut v = serde_json::to_value(g.as_ref()).unwrap_or_default();
                v["service"] = t.service.clone().into();
                v["subservice"] = t.servicepath.clone().into();
                v
            })
            .collect()
    }

    fn find_group(&self, tenant: &Tenant, resource: &str, apikey: &str) -> Result<Arc<Group>, ApiError> {
        let inner = self.read();
        match inner.groups.get(&(resource.to_owned(), apikey.to_owned())) {
            Some((t, g)) if t == tenant => Ok(g.clone()),
            Some(_) => Err(ApiError::new(
                403,
                "MISMATCHED_SERVICE",
                "The declared service didn't match the stored one in the entity",
            )),
            None => Err(ApiError::group_not_found(&format!("resource {resource} and apikey {apikey}"))),
        }
    }

    /// Update a group (top-level fields of `patch` replace).
    pub async fn update_group(
        &self,
        tenant: &Tenant,
        resource: &str,
        apikey: &str,
        patch: &Map<String, Value>,
    ) -> Result<(), ApiError> {
        let _writer = self.writer.lock().await;
        let old = self.find_group(tenant, resource, apikey)?;
        let mut patch = patch.clone();
        // The key of a group cannot move.
        patch.insert("resource".into(), resource.into());
        patch.insert("apikey".into(), apikey.into());
        let g = parse_group(&merged(serde_json::to_value(old.as_ref()).unwrap_or_default(), &patch))?;
        self.store.iot_put(self.gateway, vec![self.group_record(tenant, &g)]).await.map_err(store_err)?;
        self.write().groups.insert((resource.to_owned(), apikey.to_owned()), (tenant.clone(), Arc::new(g)));
        Ok(())
    }

    /// Delete a group and, with `devices`, the devices using its apikey.
    pub async fn delete_group(
        &self,
        tenant: &Tenant,
        resource: &str,
        apikey: &str,
        devices: bool,
    ) -> Result<(), ApiError> {
        let _writer = self.writer.lock().await;
        let g = self.find_group(tenant, resource, apikey)?;
        let doomed: Vec<String> = if devices {
            self.read()
                .devices
                .values()
                .filter(|r| r.tenant == *tenant && r.device.apikey.as_deref().is_none_or(|k| k == g.apikey))
                .map(|r| r.device.device_id.clone())
                .collect()
        } else {
            Vec::new()
        };
        let mut keys = vec![("group".to_owned(), group_key(&g))];
        keys.extend(doomed.iter().map(|id| ("device".to_owned(), device_key(tenant, id))));
        self.store.iot_delete(self.gateway, keys).await.map_err(store_err)?;
        let mut inner = self.write();
        inner.groups.shift_remove(&(resource.to_owned(), apikey.to_owned()));
        if !inner.groups.keys().any(|(_, k)| k == apikey) {
            inner.apikeys.remove(apikey);
        }
        for id in doomed {
            self.forget(&mut inner, tenant, &id);
        }
        Ok(())
    }

    // ----- north: devices -----

    /// Create devices (all or none).
    pub async fn create_devices(&self, tenant: &Tenant, devices: Vec<Device>) -> Result<(), ApiError> {
        let _writer = self.writer.lock().await;
        {
            let inner = self.read();
            let mut seen = std::collections::HashSet::new();
            for d in &devices {
                let k = (tenant.clone(), d.device_id.clone());
                if inner.devices.contains_key(&k) || seen.contains(&k) {
                    return Err(ApiError::new(
                        409,
                        "DUPLICATE_DEVICE_ID",
                        format!(
                            "A device with the same info (DeviceId, ApiKey, Service, Subservice) was found:{}",
                            d.device_id
                        ),
                    ));
                }
                let group = d
                    .apikey
                    .as_deref()
                    .and_then(|k| inner.group_by_apikey(k))
                    .or_else(|| inner.groups.values().find(|(t, _)| t == tenant).map(|(_, g)| g.clone()));
                self.fits(tenant, d, group.as_deref())?;
                if let Some(key) = &d.apikey
                    && (inner.apikeys.get(key).is_some_and(|t| t != tenant)
                        || inner.by_key.get(&(key.clone(), d.device_id.clone())).is_some_and(|r| r.tenant != *tenant))
                {
                    return Err(ApiError::new(
                        403,
                        "MISMATCHED_SERVICE",
                        "The declared service didn't match the stored one in the entity",
                    ));
                }
                seen.insert(k);
            }
        }
        self.put_devices(tenant, devices).await
    }

    async fn put_devices(&self, tenant: &Tenant, devices: Vec<Device>) -> Result<(), ApiError> {
        let records = devices
            .iter()
            .map(|d| IotRecord {
                kind: "device".into(),
                key: device_key(tenant, &d.device_id),
                service: tenant.service.clone(),
                servicepath: tenant.servicepath.clone(),
                body: serde_json::to_string(d).unwrap_or_default(),
            })
            .collect();
        self.store.iot_put(self.gateway, records).await.map_err(store_err)?;
        let mut inner = self.write();
        for d in devices {
            let uuid = device_uuid(tenant, &d.device_id);
            let key = (tenant.clone(), d.device_id.clone());
            let last = inner.devices.get(&key).map(|r| r.last.lock().unwrap_or_else(|p| p.into_inner()).clone());
            let new = last.is_none();
            let rec = Arc::new(DeviceRecord {
                tenant: tenant.clone(),
                device: d,
                uuid,
                last: Mutex::new(last.unwrap_or_default()),
            });
            inner.index(rec);
            let _ = self.changes.send(Change::Upsert { uuid, new });
        }
        Ok(())
    }

    /// The devices of `tenant`, with their tenancy fields.
    pub fn list_devices(&self, tenant: &Tenant) -> Vec<Value> {
        self.read().devices.values().filter(|r| selects(tenant, &r.tenant)).map(|r| device_json(r)).collect()
    }

    /// One device of `tenant`.
    pub fn get_device(&self, tenant: &Tenant, id: &str) -> Result<Value, ApiError> {
        self.read()
            .devices
            .get(&(tenant.clone(), id.to_owned()))
            .map(|r| device_json(r))
            .ok_or_else(|| ApiError::device_not_found(id))
    }

    /// Update a device (top-level fields of `patch` replace).
    pub async fn update_device(&self, tenant: &Tenant, id: &str, patch: &Map<String, Value>) -> Result<(), ApiError> {
        let _writer = self.writer.lock().await;
        let old = self
            .read()
            .devices
            .get(&(tenant.clone(), id.to_owned()))
            .cloned()
            .ok_or_else(|| ApiError::device_not_found(id))?;
        if patch.get("device_id").is_some_and(|v| v.as_str() != Some(id)) {
            return Err(ApiError::new(400, "BAD_REQUEST", "Can't change the ID of a provisioned device"));
        }
        let d = parse_device(&merged(serde_json::to_value(&old.device).unwrap_or_default(), patch))?;
        let group = self.read().group_of(&old);
        self.fits(tenant, &d, group.as_deref())?;
        self.put_devices(tenant, vec![d]).await
    }

    /// Delete devices of `tenant`; the ids not found are returned.
    pub async fn delete_devices(&self, tenant: &Tenant, ids: &[String]) -> Result<Vec<String>, ApiError> {
        let _writer = self.writer.lock().await;
        let (found, missing): (Vec<String>, Vec<String>) = {
            let inner = self.read();
            ids.iter().cloned().partition(|id| inner.devices.contains_key(&(tenant.clone(), id.clone())))
        };
        let keys = found.iter().map(|id| ("device".to_owned(), device_key(tenant, id))).collect();
        self.store.iot_delete(self.gateway, keys).await.map_err(store_err)?;
        let mut inner = self.write();
        for id in &found {
            self.forget(&mut inner, tenant, id);
        }
        Ok(missing)
    }

    fn forget(&self, inner: &mut Inner, tenant: &Tenant, id: &str) {
        if let Some(r) = inner.unindex(tenant, id) {
            let kind = r.device.entity_type(inner.group_of(&r).as_deref()).to_owned();
            let _ = self.changes.send(Change::Removed { uuid: r.uuid, kind });
        }
    }

    // ----- south -----

    /// The device a measure is for, creating it if its group autoprovisions.
    pub async fn resolve(&self, addr: &Address) -> Result<Resolved, IngestError> {
        match addr {
            Address::Apikey { apikey, device_id, .. } => {
                let group_hit = {
                    let inner = self.read();
                    match inner.apikeys.get(apikey) {
                        Some(tenant) => {
                            let group = inner.group_by_apikey(apikey);
                            let record = inner.devices.get(&(tenant.clone(), device_id.clone())).cloned();
                            Some((tenant.clone(), group, record))
                        }
                        None => None,
                    }
                };
                match group_hit {
                    Some((_, group, Some(record))) => {
                        if record.device.apikey.as_deref().is_some_and(|k| k != apikey) {
                            return Err(IngestError::UnknownDevice(device_id.clone()));
                        }
                        Ok(Resolved { record, group })
                    }
                    Some((tenant, Some(group), None)) => {
                        if group.autoprovision == Some(false) {
                            return Err(IngestError::UnknownDevice(device_id.clone()));
                        }
                        self.autoprovision(&tenant, device_id, group).await.map_err(IngestError::Autoprovision)
                    }
                    Some((_, None, None)) => Err(IngestError::UnknownDevice(device_id.clone())),
                    None => {
                        // A device with its own apikey and no group.
                        let record = self.read().by_key.get(&(apikey.clone(), device_id.clone())).cloned();
                        record
                            .map(|record| Resolved { record, group: None })
                            .ok_or_else(|| IngestError::UnknownApikey(apikey.clone()))
                    }
                }
            }
            Address::Dojot { tenant, device_id } => {
                let inner = self.read();
                // dojot has one level of tenancy: servicepath `/` first, then
                // any path of the service.
                let root = Tenant { service: tenant.clone(), servicepath: "/".into() };
                let record = inner
                    .devices
                    .get(&(root, device_id.clone()))
                    .or_else(|| inner.by_service.get(&(tenant.clone(), device_id.clone()))?.first())
                    .cloned()
                    .ok_or_else(|| IngestError::UnknownDevice(device_id.clone()))?;
                let group = record.device.apikey.as_deref().and_then(|k| inner.group_by_apikey(k));
                Ok(Resolved { record, group })
            }
        }
    }

    async fn autoprovision(&self, tenant: &Tenant, id: &str, group: Arc<Group>) -> Result<Resolved, ApiError> {
        let _writer = self.writer.lock().await;
        let device = parse_device(&serde_json::json!({"device_id": id}))?;
        self.fits(tenant, &device, Some(&group))?;
        // Two first measures may race: the second finds the first's device.
        if let Some(record) = self.read().devices.get(&(tenant.clone(), id.to_owned())).cloned() {
            return Ok(Resolved { record, group: Some(group) });
        }
        self.put_devices(tenant, vec![device]).await?;
        let record = self
            .read()
            .devices
            .get(&(tenant.clone(), id.to_owned()))
            .cloned()
            .ok_or_else(|| ApiError::device_not_found(id))?;
        tracing::info!(device = %id, service = %tenant.service, servicepath = %tenant.servicepath, "autoprovisioned device");
        Ok(Resolved { record, group: Some(group) })
    }
}

fn device_json(r: &DeviceRecord) -> Value {
    let mut v = serde_json::to_value(&r.device).unwrap_or_default();
    v["service"] = r.tenant.service.clone().into();
    v["service_path"] = r.tenant.servicepath.clone().into();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry(dir: &std::path::Path) -> Registry {
        let (tx, _rx) = mpsc::unbounded_channel();
        Registry::load(Uuid::nil(), "test.realm", Store::open(dir).unwrap(), tx).unwrap()
    }

    fn key(apikey: &str, id: &str) -> Address {
        Address::Apikey { apikey: apikey.into(), device_id: id.into(), attr: None }
    }

    #[tokio::test]
    async fn devices_with_their_own_apikey_follow_it_and_stay_in_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let (a, b) = (
            Tenant { service: "a".into(), servicepath: "/".into() },
            Tenant { service: "b".into(), servicepath: "/".into() },
        );
        let dev = |v: Value| parse_device(&v).unwrap();
        r.create_devices(&a, vec![dev(json!({"device_id": "d", "apikey": "own"}))]).await.unwrap();
        assert_eq!(r.resolve(&key("own", "d")).await.unwrap().record.tenant, a);
        // The same key and id in another tenant would be ambiguous in the south.
        let e = r.create_devices(&b, vec![dev(json!({"device_id": "d", "apikey": "own"}))]).await.unwrap_err();
        assert_eq!(e.name, "MISMATCHED_SERVICE");
        // A new apikey replaces the old one in the index.
        let patch = json!({"apikey": "new"});
        r.update_device(&a, "d", patch.as_object().unwrap()).await.unwrap();
        assert!(matches!(r.resolve(&key("own", "d")).await.unwrap_err(), IngestError::UnknownApikey(k) if k == "own"));
        assert_eq!(r.resolve(&key("new", "d")).await.unwrap().record.device.device_id, "d");
        // Deleted: gone from every index; reloading from the store gives the same.
        let r2 = registry(dir.path());
        let got = r2.resolve(&key("new", "d")).await;
        assert!(got.is_ok(), "persisted: {got:?} {}", r2.device_count());
        assert_eq!(r.delete_devices(&a, &["d".into()]).await.unwrap(), Vec::<String>::new());
        assert!(r.resolve(&key("new", "d")).await.is_err());
        assert!(r.device_by_uuid(device_uuid(&a, "d")).is_none());
        assert_eq!(registry(dir.path()).device_count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_of_one_device_give_one_success_and_one_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(registry(dir.path()));
        let t = Tenant { service: "s".into(), servicepath: "/".into() };
        for round in 0..20 {
            let id = format!("d{round}");
            let make = |r: Arc<Registry>, t: Tenant, id: String| {
                tokio::spawn(async move {
                    r.create_devices(&t, vec![parse_device(&json!({"device_id": id})).unwrap()]).await
                })
            };
            let (a, b) = (make(r.clone(), t.clone(), id.clone()), make(r.clone(), t.clone(), id));
            let results = [a.await.unwrap(), b.await.unwrap()];
            assert_eq!(results.iter().filter(|x| x.is_ok()).count(), 1, "{results:?}");
            assert_eq!(results.iter().filter_map(|x| x.as_ref().err()).next().unwrap().name, "DUPLICATE_DEVICE_ID");
        }
    }

    #[tokio::test]
    async fn devices_are_found_by_the_entity_the_context_broker_names() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let t = Tenant { service: "lab".into(), servicepath: "/".into() };
        let other = Tenant { service: "lab".into(), servicepath: "/b".into() };
        let g = parse_group(&json!({"resource": "/iot/json", "apikey": "k", "entity_type": "Meter"})).unwrap();
        r.create_groups(&t, vec![g]).await.unwrap();
        let devices = vec![
            parse_device(&json!({"device_id": "m1", "apikey": "k"})).unwrap(),
            parse_device(&json!({"device_id": "s1", "entity_name": "urn:lab:s1", "entity_type": "Sensor"})).unwrap(),
        ];
        r.create_devices(&t, devices).await.unwrap();
        let id = |e: Option<Resolved>| e.map(|r| r.record.device.device_id.clone());
        assert_eq!(id(r.by_entity(&t, "Meter:m1", None)), Some("m1".into()), "the group's type");
        assert_eq!(id(r.by_entity(&t, "Meter:m1", Some("Meter"))), Some("m1".into()));
        assert_eq!(id(r.by_entity(&t, "Meter:m1", Some("Sensor"))), None, "another type");
        assert_eq!(id(r.by_entity(&t, "urn:lab:s1", None)), Some("s1".into()), "its own entity name");
        assert_eq!(id(r.by_entity(&t, "Sensor:s1", None)), None, "not the default name when it has its own");
        assert_eq!(id(r.by_entity(&t, "Thing:m1", None)), None);
        assert_eq!(id(r.by_entity(&other, "Meter:m1", None)), None, "another tenant");
    }

    #[tokio::test]
    async fn dojot_addresses_find_provisioned_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let t = Tenant { service: "admin".into(), servicepath: "/".into() };
        r.create_devices(&t, vec![parse_device(&json!({"device_id": "efac"})).unwrap()]).await.unwrap();
        let found = r.resolve(&Address::Dojot { tenant: "admin".into(), device_id: "efac".into() }).await.unwrap();
        assert_eq!(found.record.tenant, t);
        let e = r.resolve(&Address::Dojot { tenant: "admin".into(), device_id: "nope".into() }).await.unwrap_err();
        assert!(matches!(e, IngestError::UnknownDevice(_)), "{e}");
        let e = r.resolve(&Address::Dojot { tenant: "other".into(), device_id: "efac".into() }).await.unwrap_err();
        assert!(matches!(e, IngestError::UnknownDevice(_)), "{e}");
        // A device in another servicepath of the service is found too; with
        // the same id in `/` as well, the one in `/` wins.
        let rig = Tenant { service: "admin".into(), servicepath: "/rig1".into() };
        let dojot = |id: &str| Address::Dojot { tenant: "admin".into(), device_id: id.into() };
        r.create_devices(&rig, vec![parse_device(&json!({"device_id": "deep"})).unwrap()]).await.unwrap();
        assert_eq!(r.resolve(&dojot("deep")).await.unwrap().record.tenant, rig);
        r.create_devices(&rig, vec![parse_device(&json!({"device_id": "efac"})).unwrap()]).await.unwrap();
        assert_eq!(r.resolve(&dojot("efac")).await.unwrap().record.tenant, t);
        r.delete_devices(&t, &["efac".into()]).await.unwrap();
        assert_eq!(r.resolve(&dojot("efac")).await.unwrap().record.tenant, rig);
        r.delete_devices(&rig, &["deep".into(), "efac".into()]).await.unwrap();
        assert!(matches!(r.resolve(&dojot("deep")).await.unwrap_err(), IngestError::UnknownDevice(_)));
        assert!(matches!(r.resolve(&dojot("efac")).await.unwrap_err(), IngestError::UnknownDevice(_)));
        // Reloaded from the store, the index is rebuilt.
        r.create_devices(&rig, vec![parse_device(&json!({"device_id": "deep"})).unwrap()]).await.unwrap();
        assert_eq!(registry(dir.path()).resolve(&dojot("deep")).await.unwrap().record.tenant, rig);
    }
}
