//! The embedded store: SQLite in the data directory. It keeps what must
//! survive a restart: components created at runtime, uuids generated for
//! components that were configured without one, and the groups and devices
//! provisioned in each IoT gateway.
//!
//! Calls are small and synchronous; async callers go through
//! [`tokio::task::spawn_blocking`] so a slow disk never stalls a runtime thread.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row holds something that is not what we wrote.
    #[error("store: corrupt row {0}")]
    Corrupt(String),
    /// The blocking task died.
    #[error("store task failed: {0}")]
    Join(String),
}

/// A component created at runtime, as persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredComponent {
    /// Its uuid.
    pub uuid: Uuid,
    /// The manager that created it.
    pub manager: Uuid,
    /// The create parameters (with the uuid filled in).
    pub spec: Map<String, Value>,
}

/// A provisioned IoT group or device, as persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct IotRecord {
    /// `group` or `device`.
    pub kind: String,
    /// Its unique key within the gateway and kind.
    pub key: String,
    /// Its tenant's `fiware-service`.
    pub service: String,
    /// Its tenant's `fiware-servicepath`.
    pub servicepath: String,
    /// The provisioned object, as JSON text.
    pub body: String,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Open (or create) `dir/busbar.sqlite3`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.to_owned(), source })?;
        let conn = Connection::open(dir.join("busbar.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The store is tiny and rarely read; keep its page cache small.
        conn.pragma_update(None, "cache_size", -256)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS components (
                uuid TEXT PRIMARY KEY,
                manager TEXT NOT NULL,
                spec TEXT NOT NULL,
                created_at INTEGER NOT NULL DEFAULT (unixepoch())
             );
             CREATE TABLE IF NOT EXISTS identities (
                key TEXT PRIMARY KEY,
                uuid TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS iot_records (
                gateway TEXT NOT NULL,
                kind TEXT NOT NULL,
                key TEXT NOT NULL,
                service TEXT NOT NULL,
                servicepath TEXT NOT NULL,
                body TEXT NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (gateway, kind, key)
             );
             -- Each insert reads MAX(seq): without this index that is a
             -- scan per row, and a bulk provisioning quadratic.
             CREATE INDEX IF NOT EXISTS iot_records_seq ON iot_records (seq);
             -- The process group of each component's running child, so a
             -- daemon restarted after a crash finds what it left running.
             CREATE TABLE IF NOT EXISTS runs (
                component TEXT PRIMARY KEY,
                pgid INTEGER NOT NULL,
                dir TEXT NOT NULL,
                started_at INTEGER NOT NULL DEFAULT (unixepoch())
             );
             -- Each IoT gateway's Context Broker requests not yet
             -- accepted, in order: a CB that is down loses nothing.
             CREATE TABLE IF NOT EXISTS ngsi_queue (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                gateway TEXT NOT NULL,
                request TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS ngsi_queue_gateway ON ngsi_queue (gateway, id);
             -- Each IoT gateway's command ledger: a command is stored
             -- before it is acknowledged, and each change before it is told.
             CREATE TABLE IF NOT EXISTS iot_commands (
                id TEXT PRIMARY KEY,
                gateway TEXT NOT NULL,
                body TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS iot_commands_gateway ON iot_commands (gateway);",
        )?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.with(f)).await.map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Persist a created component. Returns `false` if the uuid is taken.
    pub async fn insert_component(&self, c: StoredComponent) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let n = conn.execute(
                "INSERT OR IGNORE INTO components (uuid, manager, spec) VALUES (?1, ?2, ?3)",
                params![c.uuid.to_string(), c.manager.to_string(), Value::Object(c.spec).to_string()],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Forget a created component. Returns whether it existed.
    pub async fn delete_component(&self, uuid: Uuid) -> Result<bool, StoreError> {
        self.run(move |conn| Ok(conn.execute("DELETE FROM components WHERE uuid = ?1", [uuid.to_string()])? == 1)).await
    }

    /// Every created component, oldest first.
    pub fn components(&self) -> Result<Vec<StoredComponent>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare("SELECT uuid, manager, spec FROM components ORDER BY created_at, rowid")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (u, m, s) = row?;
                let parse = |s: &str| Uuid::parse_str(s).map_err(|_| StoreError::Corrupt(s.to_owned()));
                let spec = match serde_json::from_str(&s) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err(StoreError::Corrupt(u)),
                };
                out.push(StoredComponent { uuid: parse(&u)?, manager: parse(&m)?, spec });
            }
            Ok(out)
        })
    }

    /// Record that `component`'s child runs as process group `pgid` in run
    /// directory `dir`. Synchronous: one small write (WAL), done when the
    /// child has just spawned.
    pub fn put_run(&self, component: Uuid, pgid: i32, dir: &Path) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO runs (component, pgid, dir) VALUES (?1, ?2, ?3)",
                params![component.to_string(), pgid, dir.to_string_lossy()],
            )?;
            Ok(())
        })
    }

    /// The recorded running child of `component`: (process group, run
    /// directory).
    pub fn run_of(&self, component: Uuid) -> Result<Option<(i32, PathBuf)>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare("SELECT pgid, dir FROM runs WHERE component = ?1")?;
            let mut rows = stmt.query([component.to_string()])?;
            Ok(match rows.next()? {
                Some(r) => Some((r.get(0)?, PathBuf::from(r.get::<_, String>(1)?))),
                None => None,
            })
        })
    }

    /// Forget `component`'s child (it ended, or was stopped).
    pub fn delete_run(&self, component: Uuid) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute("DELETE FROM runs WHERE component = ?1", [component.to_string()])?;
            Ok(())
        })
    }

    /// Insert or replace IoT records of `gateway`, in one transaction.
    pub async fn iot_put(&self, gateway: Uuid, records: Vec<IotRecord>) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.unchecked_transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO iot_records (gateway, kind, key, service, servicepath, body, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6,
                       COALESCE((SELECT seq FROM iot_records WHERE gateway = ?1 AND kind = ?2 AND key = ?3),
                                (SELECT COALESCE(MAX(seq), 0) + 1 FROM iot_records)))",
                )?;
                let gateway = gateway.to_string();
                for r in records {
                    insert.execute(params![gateway, r.kind, r.key, r.service, r.servicepath, r.body])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Delete IoT records `(kind, key)` of `gateway`, in one transaction.
    pub async fn iot_delete(&self, gateway: Uuid, keys: Vec<(String, String)>) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.unchecked_transaction()?;
            for (kind, key) in keys {
                tx.execute(
                    "DELETE FROM iot_records WHERE gateway = ?1 AND kind = ?2 AND key = ?3",
                    params![gateway.to_string(), kind, key],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Every IoT record of `gateway`, in creation order.
    pub fn iot_load(&self, gateway: Uuid) -> Result<Vec<IotRecord>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT kind, key, service, servicepath, body FROM iot_records WHERE gateway = ?1 ORDER BY seq",
            )?;
            let rows = stmt.query_map([gateway.to_string()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get::<_, String>(4)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (kind, key, service, servicepath, body) = row?;
                out.push(IotRecord { kind, key, service, servicepath, body });
            }
            Ok(out)
        })
    }

    /// Append Context Broker requests (JSON) to `gateway`'s queue, in one
    /// transaction.
    pub async fn ngsi_push(&self, gateway: Uuid, requests: Vec<String>) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.unchecked_transaction()?;
            {
                let mut insert = tx.prepare_cached("INSERT INTO ngsi_queue (gateway, request) VALUES (?1, ?2)")?;
                let gateway = gateway.to_string();
                for r in requests {
                    insert.execute(params![gateway, r])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The oldest `limit` queued requests of `gateway`, with their ids.
    pub async fn ngsi_peek(&self, gateway: Uuid, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.run(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, request FROM ngsi_queue WHERE gateway = ?1 ORDER BY id LIMIT ?2")?;
            let rows = stmt.query_map(params![gateway.to_string(), limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
        })
        .await
    }

    /// Remove a sent request.
    pub async fn ngsi_pop(&self, id: i64) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.execute("DELETE FROM ngsi_queue WHERE id = ?1", [id])?;
            Ok(())
        })
        .await
    }

    /// How many requests `gateway` has queued.
    pub async fn ngsi_len(&self, gateway: Uuid) -> Result<u64, StoreError> {
        self.run(move |conn| {
            let n: i64 =
                conn.query_row("SELECT COUNT(*) FROM ngsi_queue WHERE gateway = ?1", [gateway.to_string()], |r| {
                    r.get(0)
                })?;
            Ok(n as u64)
        })
        .await
    }

    /// Store command `id` of `gateway` (its JSON), replacing what was.
    pub async fn command_put(&self, gateway: Uuid, id: Uuid, body: String) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.prepare_cached("INSERT OR REPLACE INTO iot_commands (id, gateway, body) VALUES (?1, ?2, ?3)")?
                .execute(params![id.to_string(), gateway.to_string(), body])?;
            Ok(())
        })
        .await
    }

    /// Forget commands.
    pub async fn commands_delete(&self, ids: Vec<Uuid>) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.unchecked_transaction()?;
            {
                let mut del = tx.prepare_cached("DELETE FROM iot_commands WHERE id = ?1")?;
                for id in ids {
                    del.execute([id.to_string()])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Every stored command of `gateway` (JSON).
    pub fn commands_load(&self, gateway: Uuid) -> Result<Vec<String>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare("SELECT body FROM iot_commands WHERE gateway = ?1")?;
            let rows = stmt.query_map([gateway.to_string()], |r| r.get(0))?;
            rows.collect::<Result<Vec<String>, _>>().map_err(Into::into)
        })
    }

    /// The uuid stored under `key`, generating and storing a v4 on first use.
    pub fn identity(&self, key: &str) -> Result<Uuid, StoreError> {
        self.with(|conn| {
            let existing: Option<String> =
                conn.query_row("SELECT uuid FROM identities WHERE key = ?1", [key], |r| r.get(0)).optional()?;
            if let Some(u) = existing {
                return Uuid::parse_str(&u).map_err(|_| StoreError::Corrupt(u));
            }
            let u = Uuid::new_v4();
            conn.execute("INSERT INTO identities (key, uuid) VALUES (?1, ?2)", params![key, u.to_string()])?;
            Ok(u)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn components_and_identities_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let u = Uuid::new_v4();
        let m = Uuid::new_v4();
        let spec = json!({"category": "simulator", "type": "dummy", "uuid": u.to_string()});
        let id = {
            let s = Store::open(dir.path()).unwrap();
            let c = StoredComponent { uuid: u, manager: m, spec: spec.as_object().unwrap().clone() };
            assert!(s.insert_component(c.clone()).await.unwrap());
            assert!(!s.insert_component(c).await.unwrap(), "duplicate refused");
            s.identity("config:simulator/dummy/x").unwrap()
        };
        let s = Store::open(dir.path()).unwrap();
        let all = s.components().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].uuid, u);
        assert_eq!(all[0].manager, m);
        assert_eq!(Value::Object(all[0].spec.clone()), spec);
        assert_eq!(s.identity("config:simulator/dummy/x").unwrap(), id);
        assert_ne!(s.identity("other").unwrap(), id);
        assert!(s.delete_component(u).await.unwrap());
        assert!(!s.delete_component(u).await.unwrap());
        assert!(s.components().unwrap().is_empty());
    }
}
