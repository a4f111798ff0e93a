//! Harness for the IoT gateway: a daemon with one `gateway/iot-agent`
//! whose listeners are on free ports, MQTT topics under a unique prefix and
//! federation exchange unique to the test; HTTP, MQTT and federation helpers.

use super::*;
use busbar::client::{Client, Listener};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// One gateway test.
pub struct Gw {
    /// The environment (exchange, realm, data dir).
    pub env: TestEnv,
    /// The gateway's uuid.
    pub uuid: Uuid,
    /// The federation exchange.
    pub data: String,
    /// The MQTT topic prefix.
    pub prefix: String,
    /// Extra gateway properties, over the defaults.
    pub extra: Value,
}

/// A fiware tenant.
pub const LAB: (&str, &str) = ("lab", "/rig1");

impl Gw {
    /// A gateway with the default settings.
    pub fn new() -> Gw {
        Gw::with(json!({}))
    }

    /// A gateway with extra properties (`json!({"dojot": true})`).
    pub fn with(extra: Value) -> Gw {
        let env = TestEnv::new();
        Gw { uuid: Uuid::new_v4(), data: format!("data-{}", env.id), prefix: format!("t{}", env.id), extra, env }
    }

    /// The gateway component: listeners on free ports, this test's topic
    /// prefix and federation exchange, then `extra`.
    pub fn component(&self) -> Value {
        let mut c = json!({"category": "gateway", "type": "iot-agent", "name": "IoT Agent", "uuid": self.uuid,
            "north_bind": "127.0.0.1:0", "south_bind": "127.0.0.1:0", "mqtt_prefix": self.prefix,
            "federation_exchange": self.data});
        for (k, v) in self.extra.as_object().expect("extra properties are an object") {
            c[k] = v.clone();
        }
        c
    }

    /// The daemon config, as a value to adjust.
    pub fn config_value(&self) -> Value {
        self.env.config_value_with(vec![self.component()])
    }

    /// The daemon config.
    pub fn config(&self) -> Config {
        self.env.config_of(&self.config_value())
    }

    /// Start the daemon, a client, a listener on `villas`, and a consumer
    /// on the federation exchange.
    pub async fn up(&self) -> (Running, Gateway, Client, Listener, Data) {
        let data = Data::bind(&self.data).await;
        let d = self.env.start_with(self.config()).await;
        let gw = Gateway::of(&d, self.uuid).await;
        let c = self.env.client().await;
        let l = self.env.listen_all(&c).await;
        (d, gw, c, l, data)
    }

    /// An MQTT topic under this test's prefix (`rest` without leading slash).
    pub fn topic(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }
}

/// The gateway's addresses, read from its status.
#[derive(Clone)]
pub struct Gateway {
    /// `http://127.0.0.1:port` of the north API.
    pub north: String,
    /// `http://127.0.0.1:port/iot/json` of the south API.
    pub south: String,
    http: reqwest::Client,
}

impl Gateway {
    /// Wait until the gateway of `uuid` reports its listeners and MQTT is up.
    pub async fn of(d: &Running, uuid: Uuid) -> Gateway {
        eventually(WAIT, "the gateway listens and its MQTT and federation links are up", async || {
            let st = d.shared.env.components.lookup(uuid).expect("gateway exists").status().await.expect("status");
            let (n, s) = (st["status"]["north_url"].as_str()?, st["status"]["south_url"].as_str()?);
            (st["status"]["mqtt_connected"] == true && st["status"]["federation_connected"] == true).then(|| Gateway {
                north: n.to_owned(),
                south: s.to_owned(),
                http: reqwest::Client::new(),
            })
        })
        .await
    }

    /// A north API call as tenant `t` (`None`: no fiware headers).
    pub async fn north(&self, method: &str, path: &str, t: Option<(&str, &str)>, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.north);
        let mut rb = self.http.request(method.parse().unwrap(), url);
        if let Some((s, p)) = t {
            rb = rb.header("fiware-service", s).header("fiware-servicepath", p);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        send(rb).await
    }

    /// A raw north call (body as given, with a content type).
    pub async fn north_raw(&self, method: &str, path: &str, t: (&str, &str), ct: &str, body: &str) -> (u16, Value) {
        let rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.north))
            .header("fiware-service", t.0)
            .header("fiware-servicepath", t.1)
            .header("content-type", ct)
            .body(body.to_owned());
        send(rb).await
    }

    /// `POST /iot/json?k=&i=[&t=]` with a JSON body.
    pub async fn measure(&self, k: &str, i: &str, body: Value) -> (u16, Value) {
        send(self.http.post(format!("{}?k={k}&i={i}", self.south)).json(&body)).await
    }

    /// A raw southbound POST.
    pub async fn south_raw(&self, path_query: &str, ct: &str, body: Vec<u8>) -> (u16, Value) {
        let base = self.south.trim_end_matches("/iot/json");
        send(self.http.post(format!("{base}{path_query}")).header("content-type", ct).body(body)).await
    }

    /// A southbound GET.
    pub async fn south_get(&self, path_query: &str) -> (u16, Value) {
        let base = self.south.trim_end_matches("/iot/json");
        send(self.http.get(format!("{base}{path_query}"))).await
    }

    /// Provision a group and a device in `t`.
    pub async fn provision(&self, t: (&str, &str), group: Value, devices: Value) {
        if !group.is_null() {
            let (s, b) = self.north("POST", "/iot/groups", Some(t), Some(json!({"groups": [group]}))).await;
            assert_eq!(s, 201, "{b}");
        }
        if !devices.is_null() {
            let (s, b) = self.north("POST", "/iot/devices", Some(t), Some(json!({"devices": devices}))).await;
            assert_eq!(s, 201, "{b}");
        }
    }
}

async fn send(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A consumer of everything on a federation exchange.
pub struct Data {
    conn: lapin::Connection,
    consumer: lapin::Consumer,
    exchange: String,
}

/// One federation message.
#[derive(Debug, Clone)]
pub struct DataMsg {
    /// Its routing key.
    pub key: String,
    /// Its body.
    pub body: Value,
}

impl Data {
    /// Declare `exchange` (durable topic) and consume `#`.
    pub async fn bind(exchange: &str) -> Data {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(exchange.into(), lapin::ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = ch.queue_declare("".into(), opts, FieldTable::default()).await.unwrap();
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Data { conn, consumer, exchange: exchange.to_owned() }
    }

    /// The next message within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<DataMsg> {
        let d = tokio::time::timeout(within, self.consumer.next()).await.ok()??.ok()?;
        Some(DataMsg { key: d.routing_key.to_string(), body: serde_json::from_slice(&d.data).unwrap_or(Value::Null) })
    }

    /// The next message (within the default wait).
    pub async fn next(&mut self) -> DataMsg {
        self.next_within(WAIT).await.expect("a federation message")
    }

    /// Assert that nothing arrives for a while.
    pub async fn quiet(&mut self, window: Duration) {
        if let Some(m) = self.next_within(window).await {
            panic!("unexpected federation message {m:?}");
        }
    }

    /// Delete the exchange and close.
    pub async fn close(self) {
        if let Ok(ch) = self.conn.create_channel().await {
            let _ = ch.exchange_delete(self.exchange.as_str().into(), Default::default()).await;
        }
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// An MQTT publisher on the local Mosquitto (or `port`).
pub struct Mqtt {
    /// The client.
    pub client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Mqtt {
    /// Connect to 127.0.0.1:`port` with a persistent session.
    pub async fn connect(port: u16) -> Mqtt {
        let mut opts = MqttOptions::new(format!("test-{}", Uuid::new_v4().simple()), "127.0.0.1", port);
        // Large packets allowed: tests send oversized measures on purpose.
        opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(false).set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut events) = AsyncClient::new(opts, 10_000);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx).await.expect("MQTT connects").unwrap();
        Mqtt { client, task }
    }

    /// Publish.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8) {
        let q = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        self.client.publish(topic, q, false, payload.into()).await.expect("publish");
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Ping `uuid` on `villas` and return its first status satisfying `pred`.
pub async fn ping_status(c: &Client, l: &mut Listener, uuid: Uuid, pred: impl Fn(&Value) -> bool) -> Value {
    c.publish(to_uuid(uuid), &action("ping", json!({})), None).await.unwrap();
    status_of(l, uuid, pred).await
}

/// A private Mosquitto on a free port, with persistence in `dir`.
pub struct Broker {
    /// Its port.
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Broker {
    /// Start one that keeps its state in `dir`.
    pub fn start(dir: &std::path::Path) -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut b = Broker { port, dir: dir.to_owned(), child: None };
        b.restart();
        b
    }

    /// Start it (again).
    pub fn restart(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nuser root\nlog_dest none\n",
                self.port,
                self.dir.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto").arg("-c").arg(&conf).spawn().expect("mosquitto runs");
        self.child = Some(child);
        let end = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < end, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (Mosquitto saves its sessions) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
