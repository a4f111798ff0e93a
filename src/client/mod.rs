//! Client side of the protocol, used by the CLI: ping, monitor, and actions
//! that wait for a target state. Client queues are server-named, exclusive
//! and auto-delete, so nothing outlives the process.

use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

mod wait;
pub use wait::{CORRELATION_GRACE, Goal, NO_ANSWER, Wait};

use crate::amqp::{consume, declare_bound_queue, declare_exchange};
use crate::protocol::headers::headers_to_json;
use crate::protocol::{self, Filter};
use crate::{Error, Result};

/// The categories a ping without a filter reaches.
pub const DISCOVERY_CATEGORIES: [&str; 3] = ["simulator", "manager", "gateway"];

/// One message seen by a client.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Receipt time, Unix seconds.
    pub time: f64,
    /// The decoded body (or the raw text as a string if it is not JSON).
    pub payload: Value,
    /// AMQP headers as JSON (void → null).
    pub headers: Value,
    /// The AMQP headers as received, for routing decisions.
    pub amqp_headers: FieldTable,
    /// `correlation_id`, if any.
    pub correlation_id: Option<String>,
    /// `content_type`, if any.
    pub content_type: Option<String>,
}

impl Seen {
    /// The monitor line, in VILLAScontroller's `monitor` format.
    pub fn monitor_json(&self) -> Value {
        json!({
            "time": self.time,
            "payload": self.payload,
            "content_type": self.content_type,
            "content_encoding": protocol::CONTENT_ENCODING,
            "application_headers": self.headers,
        })
    }

    /// Whether this is a status message (not an action).
    pub fn is_status(&self) -> bool {
        self.payload.get("action").is_none() && self.payload.get("status").is_some()
    }

    /// `status.state` of a status message.
    pub fn state(&self) -> Option<&str> {
        self.payload.pointer("/status/state").and_then(Value::as_str)
    }
}

/// A connected client.
pub struct Client {
    conn: Connection,
    ch: Channel,
    exchange: String,
}

/// A client queue receiving messages.
pub struct Listener {
    /// The server-named queue (usable as `reply_to`).
    pub queue: String,
    consumer: lapin::Consumer,
}

impl Listener {
    /// The next message, or `None` at `deadline` (or if the queue ends).
    pub async fn next_until(&mut self, deadline: Instant) -> Option<Seen> {
        let d = tokio::time::timeout_at(deadline, self.consumer.next()).await.ok()??.ok()?;
        let payload = serde_json::from_slice(&d.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.data).into_owned()));
        let amqp_headers = d.properties.headers().clone().unwrap_or_default();
        Some(Seen {
            time: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            payload,
            headers: headers_to_json(&amqp_headers),
            amqp_headers,
            correlation_id: d.properties.correlation_id().as_ref().map(|c| c.to_string()),
            content_type: d.properties.content_type().as_ref().map(|c| c.to_string()),
        })
    }
}

/// A client queue on a federation data exchange (`busbar monitor --data`).
pub struct DataListener {
    consumer: lapin::Consumer,
}

/// One federation message.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSeen {
    /// Its routing key (`realm.service.entity_type.device_id`).
    pub routing_key: String,
    /// The `device-data` body (or the raw text if it is not JSON).
    pub body: Value,
}

impl DataListener {
    /// The next message, or `None` at `deadline` (or if the queue ends).
    pub async fn next_until(&mut self, deadline: Instant) -> Option<DataSeen> {
        let d = tokio::time::timeout_at(deadline, self.consumer.next()).await.ok()??.ok()?;
        let body = serde_json::from_slice(&d.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.data).into_owned()));
        Some(DataSeen { routing_key: d.routing_key.to_string(), body })
    }
}

/// How an awaited action ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The target state was reached; the last status.
    Reached(Value),
    /// The component went to `error`; the status.
    Failed(Value),
}

impl Client {
    /// Connect and declare the exchange.
    pub async fn connect(url: &str, exchange: &str) -> Result<Client> {
        let conn = crate::amqp::connect(url, &format!("busbar client exchange={exchange}")).await?;
        let ch = conn.create_channel().await?;
        declare_exchange(&ch, exchange).await?;
        Ok(Client { conn, ch, exchange: exchange.to_owned() })
    }

    /// Bind a private queue to the federation topic exchange `exchange`
    /// with routing key pattern `key` (`#`, `*.lab.#`, …) and consume it.
    pub async fn listen_data(&self, exchange: &str, key: &str) -> Result<DataListener> {
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        self.ch.exchange_declare(exchange.into(), lapin::ExchangeKind::Topic, durable, FieldTable::default()).await?;
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = self.ch.queue_declare("".into(), opts, FieldTable::default()).await?;
        let name = q.name().clone();
        self.ch
            .queue_bind(name.clone(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
        Ok(DataListener { consumer: consume(&self.ch, name).await? })
    }

    /// Bind a private queue with `binding` and start consuming it.
    pub async fn listen(&self, binding: FieldTable) -> Result<Listener> {
        let q = declare_bound_queue(&self.ch, &self.exchange, binding).await?;
        let consumer = consume(&self.ch, q.clone()).await?;
        Ok(Listener { queue: q.to_string(), consumer })
    }

    /// Listen to every status on the exchange (local and federated) and ask
    /// everyone to announce themselves (VILLASweb's broadcast ping): what
    /// `busbar sites` and `busbar components` feed a [`Directory`] with.
    ///
    /// [`Directory`]: crate::directory::Directory
    pub async fn survey(&self) -> Result<Listener> {
        let mut any_uuid = FieldTable::default();
        any_uuid.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
        any_uuid.insert("uuid".into(), AMQPValue::Void);
        let listener = self.listen(any_uuid).await?;
        let mut broadcast = FieldTable::default();
        broadcast.insert("uuid".into(), AMQPValue::LongString(LongString::from("")));
        self.publish(broadcast, &json!({"action": "ping"}), None).await?;
        Ok(listener)
    }

    /// Send one action body (with one `when`) to several components and
    /// read back when each entered `entry` (the action's transient state,
    /// `starting` for a start), from the `since` of its status: the skew a
    /// coordinated start achieved. Ends when every target was seen there,
    /// or at `timeout` (those not seen are `None`).
    pub async fn act_on_all(
        &self,
        uuids: &[String],
        body: &Value,
        entry: &str,
        timeout: Duration,
    ) -> Result<Vec<(String, Option<f64>)>> {
        let mut any_uuid = FieldTable::default();
        any_uuid.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
        any_uuid.insert("uuid".into(), AMQPValue::Void);
        let mut listener = self.listen(any_uuid).await?;
        for uuid in uuids {
            let to = Filter { uuid: Some(uuid.clone()), ..Default::default() };
            self.publish(to.action_headers(), body, None).await?;
        }
        let mut seen: Vec<(String, Option<f64>)> = uuids.iter().map(|u| (u.clone(), None)).collect();
        let end = Instant::now() + timeout;
        while seen.iter().any(|(_, t)| t.is_none()) {
            let Some(msg) = listener.next_until(end).await else { break };
            if !msg.is_status() || msg.state() != Some(entry) {
                continue;
            }
            let from = msg.payload.pointer("/properties/uuid").and_then(Value::as_str);
            let since = msg.payload.pointer("/status/since").and_then(Value::as_f64);
            if let Some(slot) = seen.iter_mut().find(|(u, t)| Some(u.as_str()) == from && t.is_none()) {
                slot.1 = since.or(Some(msg.time));
            }
        }
        Ok(seen)
    }

    /// Publish an action body with `headers`, optionally asking for a reply
    /// (`(reply_to, correlation_id)`).
    pub async fn publish(&self, headers: FieldTable, body: &Value, reply: Option<(&str, &str)>) -> Result<()> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Internal(e.to_string()))?;
        self.publish_raw(headers, Some(protocol::CONTENT_TYPE), &bytes, reply).await
    }

    /// Publish an action body with a `correlation_id` and no `reply_to`:
    /// the answers come as statuses on the (federated) exchange, from any
    /// site (a distributed request).
    pub async fn publish_correlated(&self, headers: FieldTable, body: &Value, correlation: &str) -> Result<()> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Internal(e.to_string()))?;
        let props = BasicProperties::default()
            .with_content_type(protocol::CONTENT_TYPE.into())
            .with_content_encoding(protocol::CONTENT_ENCODING.into())
            .with_correlation_id(correlation.into())
            .with_headers(headers);
        self.ch
            .basic_publish(self.exchange.as_str().into(), "".into(), BasicPublishOptions::default(), &bytes, props)
            .await?;
        Ok(())
    }

    /// Publish arbitrary bytes with an arbitrary content type (or none).
    pub async fn publish_raw(
        &self,
        headers: FieldTable,
        content_type: Option<&str>,
        body: &[u8],
        reply: Option<(&str, &str)>,
    ) -> Result<()> {
        let mut props = BasicProperties::default()
            .with_content_encoding(protocol::CONTENT_ENCODING.into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(headers);
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.into());
        }
        if let Some((queue, id)) = reply {
            props = props.with_reply_to(queue.into()).with_correlation_id(id.into());
        }
        self.ch
            .basic_publish(self.exchange.as_str().into(), "".into(), BasicPublishOptions::default(), body, props)
            .await?;
        Ok(())
    }

    /// Ping the components selected by `filter`, calling `on_reply` for the
    /// first status of each component; returns how many answered. Ends at
    /// `timeout`, or after `quiet` without a new reply.
    pub async fn ping(
        &self,
        filter: &Filter,
        timeout: Duration,
        quiet: Duration,
        mut on_reply: impl FnMut(&Seen),
    ) -> Result<usize> {
        let mut l = self.listen(filter.binding()).await?;
        if filter.is_empty() {
            // Everyone: by category, because the Python VILLAScontroller
            // ignores the broadcast `uuid: ""` that busbar answers. (Devices
            // are left out, as from busbar's broadcast: there can be
            // thousands; `--category equipment` lists them.)
            for category in DISCOVERY_CATEGORIES {
                let by = Filter { category: Some(category.into()), ..Default::default() };
                self.publish(by.action_headers(), &json!({"action": "ping"}), None).await?;
            }
        } else {
            self.publish(filter.action_headers(), &json!({"action": "ping"}), None).await?;
        }
        let end = Instant::now() + timeout;
        // One reply per component: a status that was already on its way
        // (an announcement) may arrive besides the answer.
        let mut seen_uuids = std::collections::HashSet::new();
        loop {
            let deadline = end.min(Instant::now() + quiet);
            let Some(seen) = l.next_until(deadline).await else {
                break;
            };
            let uuid = seen.payload.pointer("/properties/uuid").and_then(Value::as_str).unwrap_or_default().to_owned();
            if seen.is_status() && filter.matches(&seen.amqp_headers) && seen_uuids.insert(uuid) {
                on_reply(&seen);
            }
        }
        Ok(seen_uuids.len())
    }

    /// Send `body` to component `uuid` and wait for `goal` (see [`Wait`]):
    /// `Reached` with the status that ended the wait, `Failed` with the
    /// status carrying the error. Works against busbar (correlated replies)
    /// and against daemons that only publish state changes (the Python
    /// VILLAScontroller).
    pub async fn act_and_wait(&self, uuid: &str, body: &Value, goal: Goal, timeout: Duration) -> Result<Outcome> {
        let target = uuid::Uuid::try_parse(uuid).map_err(|e| Error::Usage(format!("invalid uuid {uuid:?}: {e}")))?;
        let only = |u: &str| {
            let mut b = FieldTable::default();
            b.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
            b.insert("uuid".into(), AMQPValue::LongString(LongString::from(u)));
            b
        };
        let mut l = self.listen(only(uuid)).await?;
        let follow = match &goal {
            Goal::Created { follow } | Goal::Deleted { follow } => Some(*follow),
            Goal::State(_) => None,
        };
        if let Some(f) = follow {
            let binding = only(&f.to_string());
            self.ch
                .queue_bind(
                    l.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    "".into(),
                    Default::default(),
                    binding,
                )
                .await?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let mut wait = Wait::new(target, id.clone(), goal);
        let filter = Filter { uuid: Some(uuid.to_owned()), ..Default::default() };
        self.publish(filter.action_headers(), body, Some((&l.queue, &id))).await?;
        let sent = Instant::now();
        let end = sent + timeout;
        let mut grace = Some(sent + CORRELATION_GRACE);
        let absent_at = sent + NO_ANSWER;
        let mut next_ping = Instant::now();
        loop {
            let deadline = grace.unwrap_or(end).min(end);
            let deadline = if wait.heard() { deadline } else { deadline.min(absent_at) };
            let seen = l.next_until(deadline).await;
            if let Some(seen) = seen {
                if seen.is_status()
                    && let Some(done) = wait.on_status(seen.correlation_id.as_deref(), &seen.payload)
                {
                    return Ok(done);
                }
            } else if Instant::now() >= end {
                return Err(if wait.heard() { Error::Timeout(timeout) } else { Error::NoAnswer(target) });
            }
            if grace.is_some_and(|g| Instant::now() >= g) {
                grace = None;
                if let Some(done) = wait.on_grace() {
                    return Ok(done);
                }
                // Silent so far: is anyone there at all?
                if !wait.heard() {
                    self.publish(filter.action_headers(), &json!({"action": "ping"}), None).await?;
                }
            }
            if !wait.heard() && Instant::now() >= absent_at {
                return Err(Error::NoAnswer(target));
            }
            // A Python component announces nothing when created: ask it.
            if let Some(f) = wait.follow()
                && Instant::now() >= next_ping
            {
                next_ping = Instant::now() + Duration::from_secs(1);
                let to = Filter { uuid: Some(f.to_string()), ..Default::default() };
                self.publish(to.action_headers(), &json!({"action": "ping"}), None).await?;
            }
            if Instant::now() >= end {
                return Err(if wait.heard() { Error::Timeout(timeout) } else { Error::NoAnswer(target) });
            }
        }
    }

    /// Send a `command` action to device `uuid` (`{"name", "value",
    /// "expiration"?}`) and return the device's answer: the status with
    /// `status.command` (`PENDING`), or with `wait` the one that finished
    /// it (`OK`, `ERROR`, `EXPIRED`). A refused command comes back as a
    /// status with `status.error` and no `command`.
    pub async fn command(&self, uuid: &str, parameters: Value, wait: bool, timeout: Duration) -> Result<Value> {
        let target = uuid::Uuid::try_parse(uuid).map_err(|e| Error::Usage(format!("invalid uuid {uuid:?}: {e}")))?;
        let mut only = FieldTable::default();
        only.insert("x-match".into(), AMQPValue::LongString(LongString::from("all")));
        only.insert("uuid".into(), AMQPValue::LongString(LongString::from(uuid)));
        let mut l = self.listen(only).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let filter = Filter { uuid: Some(uuid.to_owned()), ..Default::default() };
        let body = json!({"action": "command", "parameters": parameters});
        self.publish(filter.action_headers(), &body, Some((&l.queue, &id))).await?;
        let end = Instant::now() + timeout;
        let mut ours: Option<String> = None;
        while let Some(seen) = l.next_until(end).await {
            if !seen.is_status() || seen.correlation_id.as_deref() != Some(id.as_str()) {
                continue;
            }
            let cmd = seen.payload.pointer("/status/command");
            let Some(cmd) = cmd else {
                // Refused: the status says why.
                return Ok(seen.payload);
            };
            let cmd_id = cmd["id"].as_str().map(str::to_owned);
            if ours.is_none() {
                ours = cmd_id.clone();
            }
            let finished = matches!(cmd["state"].as_str(), Some("OK" | "ERROR" | "EXPIRED"));
            if cmd_id == ours && (!wait || finished) {
                return Ok(seen.payload);
            }
        }
        Err(if ours.is_some() { Error::Timeout(timeout) } else { Error::NoAnswer(target) })
    }

    /// Close the connection (the private queues go with it).
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
