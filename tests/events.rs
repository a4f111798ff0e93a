//! The WebSocket event stream `GET /api/v1/events` against a running
//! daemon, RabbitMQ and a gateway: ALMANAC's subscriptions and
//! confirmation, statuses and measures in order, and a slow viewer
//! dropped while memory stays flat.

mod common;

use common::iot::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(d: &busbar::daemon::Running) -> Ws {
    let url = format!("ws://{}/api/v1/events", d.api_addr.unwrap());
    tokio_tungstenite::connect_async(url).await.expect("the upgrade succeeds").0
}

/// The next JSON text frame within `within`.
async fn next_json(ws: &mut Ws, within: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(within, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("frames are JSON")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn subscribe(ws: &mut Ws, req: Value) -> Value {
    ws.send(Message::Text(req.to_string().into())).await.unwrap();
    next_json(ws, WAIT).await.expect("a confirmation")
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_get_statuses_and_measures_in_order() {
    let gw = Gw::new();
    let (d, g, c, _l, data) = gw.up().await;
    let realm = gw.env.realm.clone();
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Meter"}),
        json!([{"device_id": "m1", "attributes": [{"object_id": "p", "name": "power", "type": "Number"}]}]),
    )
    .await;
    let mut ws = connect(&d).await;
    let dummy = format!("/status/{realm}/simulator/dummy/{}", gw.env.dummy);
    let conf = subscribe(&mut ws, json!({"topic": dummy})).await;
    assert_eq!(conf, json!({"subscriptions": {&dummy: true}, "subscriptionsRegex": {}}));
    let pattern = format!("/data/{}/lab/.*", regex::escape(&realm));
    let conf = subscribe(&mut ws, json!({"topic": pattern, "matching": "regex"})).await;
    assert_eq!(conf, json!({"subscriptions": {&dummy: true}, "subscriptionsRegex": {&pattern: {}}}));
    let bad = subscribe(&mut ws, json!({"topic": "/(", "matching": "regex"})).await;
    assert!(bad["error"]["msg"].as_str().unwrap().starts_with("invalid regex"), "{bad}");

    // Interleave an action's statuses with measures.
    c.publish(to_uuid(gw.env.dummy), &action("start", json!({})), None).await.unwrap();
    let mut states = Vec::new();
    while states.last().is_none_or(|s| s != "running") {
        let f = next_json(&mut ws, WAIT).await.expect("the start's statuses");
        assert_eq!(f["topic"], dummy.as_str(), "{f}");
        states.push(f["payload"]["status"]["state"].as_str().unwrap().to_owned());
    }
    for p in 1..=5 {
        assert_eq!(g.measure(&k, "m1", json!({"p": p})).await.0, 200);
    }
    c.publish(to_uuid(gw.env.dummy), &action("stop", json!({})), None).await.unwrap();
    let mut powers = Vec::new();
    while !(states.last().is_some_and(|s| s == "idle") && states.len() >= 4 && powers.len() == 5) {
        let f = next_json(&mut ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("more events (states {states:?}, powers {powers:?})"));
        let topic = f["topic"].as_str().unwrap();
        if topic == dummy {
            assert_eq!(f["payload"]["properties"]["uuid"], json!(gw.env.dummy), "{f}");
            states.push(f["payload"]["status"]["state"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(topic, format!("/data/{realm}/lab/Meter/m1"), "only what was subscribed: {f}");
            powers.push(f["payload"]["attrs"]["power"].as_f64().unwrap());
        }
    }
    // Pings may add statuses; the transitions are in order, and so are
    // the measures.
    let transitions: Vec<&str> = states.iter().map(String::as_str).collect();
    let at = |s: &str| transitions.iter().position(|x| *x == s).unwrap_or_else(|| panic!("{s} in {transitions:?}"));
    assert!(at("starting") < at("running") && at("running") < at("stopping"), "{transitions:?}");
    assert_eq!(powers, [1.0, 2.0, 3.0, 4.0, 5.0]);
    ws.close(None).await.unwrap();
    data.close().await;
    d.stop().await.unwrap();
}

/// Read `ws` until it ends, sleeping `pause` after each frame: the frames
/// read and the close code, if one came.
async fn drain(mut ws: Ws, pause: Duration) -> (u64, Option<u16>) {
    let mut frames = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("the viewer is ended") {
            Some(Ok(Message::Text(_))) => {
                frames += 1;
                tokio::time::sleep(pause).await;
            }
            Some(Ok(Message::Close(f))) => return (frames, f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return (frames, None),
        }
    }
}

/// Three viewers of a 20,000-status flood: one keeps up and misses
/// nothing; one reads slowly, falls behind the ring and is closed with
/// code 4008; one stops reading and is disconnected once a frame waits
/// longer than the send timeout. Memory stays bounded by the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_viewers_are_dropped_and_memory_stays_flat() {
    let env = TestEnv::new();
    let d = env.start().await;
    let c = env.client().await;
    let all = json!({"topic": "/status/.*", "matching": "regex"});
    let (mut fast, mut slow, mut stalled) = (connect(&d).await, connect(&d).await, connect(&d).await);
    for ws in [&mut fast, &mut slow, &mut stalled] {
        subscribe(ws, all.clone()).await;
    }
    // The fast viewer reads everything as it comes (a substring check: a
    // debug build's JSON parsing must not be what makes it slow).
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while n < 20_000 {
            match tokio::time::timeout(Duration::from_secs(10), fast.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"flood\"") => n += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        (n, fast)
    });
    let slow = tokio::spawn(drain(slow, Duration::from_millis(1)));
    let before = rss_kib();
    // 20,000 statuses of 2 KiB heard by the directory: far more than the
    // ring holds and a viewer's socket buffers take.
    let uuid = Uuid::new_v4();
    let body = json!({"status": {"state": "running", "pad": "x".repeat(2048)},
        "properties": {"uuid": uuid, "name": "flood", "category": "simulator", "type": "dummy", "realm": env.realm}});
    // At most ≈4,000 a second: a reader that keeps up can, and the slow
    // one (≈1,000 a second) falls behind by thousands within seconds.
    for i in 0..20_000 {
        c.publish(to_uuid(uuid), &body, None).await.unwrap();
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (seen, mut fast) = reader.await.unwrap();
    assert_eq!(seen, 20_000, "a viewer that keeps up misses nothing");
    let grown = rss_kib().saturating_sub(before);
    let (slow_frames, slow_code) = slow.await.unwrap();
    let (stalled_frames, stalled_code) = drain(stalled, Duration::ZERO).await;
    eprintln!(
        "slow: {slow_frames} frames, close {slow_code:?}; stalled: {stalled_frames} frames, close {stalled_code:?}; memory +{grown} KiB"
    );
    // The ring holds 4,096 frames of ≈2.3 KiB (≈9 MiB) at most.
    assert!(grown < 48 * 1024, "memory grew by {grown} KiB");
    assert!(slow_frames < 20_000, "the slow viewer was dropped before the end ({slow_frames} frames)");
    assert_eq!(slow_code, Some(busbar::web::CLOSE_TOO_SLOW), "a viewer that falls behind is told why");
    assert!(stalled_frames < 20_000, "the stalled viewer was dropped ({stalled_frames} frames)");
    // The daemon and the fast viewer carry on.
    c.publish(to_uuid(env.dummy), &action("ping", json!({})), None).await.unwrap();
    let f = next_json(&mut fast, WAIT).await.expect("the fast viewer still gets events");
    assert!(f["topic"].as_str().unwrap().starts_with("/status/"));
    // A stopping daemon says goodbye to the viewers it still has.
    let (stopped, end) = tokio::join!(d.stop(), drain(fast, Duration::ZERO));
    stopped.unwrap();
    assert_eq!(end.1, Some(1001), "going away");
}
