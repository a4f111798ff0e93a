//! The status page in headless Chromium against a running daemon with JWT
//! auth, RabbitMQ and an IoT gateway: it loads, lists the components, shows
//! `busbar action` and device measures without a reload, lets an operator
//! start a component, and gives a viewer no action buttons (a forged
//! action from the viewer's page gets 403). Screenshots are saved under
//! the target directory (`web-screenshots/`).

mod common;

use common::browser::Browser;
use common::iot::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::path::PathBuf;

fn token(role: &str) -> String {
    let pem = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/rsa.key")).unwrap();
    let claims = json!({"aud": "lab1", "exp": jsonwebtoken::get_current_timestamp() + 3600, "roles": [role]});
    encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots")
}

/// The row state of `uuid` in the page, as JS.
fn row_state(uuid: impl std::fmt::Display) -> String {
    format!("const r = document.querySelector('tr.ic[data-uuid=\"{uuid}\"]'); return r ? r.dataset.state : null;")
}

/// JS that is truthy once the row of `uuid` shows `state`.
fn row_in(uuid: impl std::fmt::Display, state: &str) -> String {
    format!(
        "const r = document.querySelector('tr.ic[data-uuid=\"{uuid}\"]'); return r !== null && r.dataset.state === '{state}';"
    )
}

async fn sign_in(b: &Browser, base: &str, role: &str) {
    b.client.goto(&format!("{base}/")).await.unwrap();
    b.until("the sign-in form", WAIT, "return document.getElementById('login').classList.contains('show');").await;
    let field = b.client.find(fantoccini::Locator::Id("token")).await.unwrap();
    field.send_keys(&token(role)).await.unwrap();
    b.click("#signin").await;
    b.until("the live stream", WAIT, "return document.getElementById('live').textContent === 'live';").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_live_and_honours_roles() {
    let Some(b) = Browser::start().await else { return };
    let gw = Gw::new();
    let mut cfg = gw.config_value();
    cfg["site"] = json!("lab1");
    cfg["api"]["auth"] =
        json!({"jwt": {"keys": [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/rsa.pub")]}});
    let data = Data::bind(&gw.data).await;
    let d = gw.env.start_with(gw.env.config_of(&cfg)).await;
    let g = Gateway::of(&d, gw.uuid).await;
    let base = format!("http://{}", d.api_addr.unwrap());
    let k = format!("k{}", gw.env.id);
    g.provision(
        LAB,
        json!({"resource": "/iot/json", "apikey": k, "entity_type": "Meter"}),
        json!([{"device_id": "m1", "entity_name": "meter-m1", "attributes": [{"object_id": "p", "name": "power", "type": "Number"}]}]),
    )
    .await;
    assert_eq!(g.measure(&k, "m1", json!({"p": 1})).await.0, 200);
    let device = busbar::iot::registry::device_uuid(
        &busbar::iot::model::Tenant { service: LAB.0.into(), servicepath: LAB.1.into() },
        "m1",
    );

    // An operator's page: the dummy and the device are listed.
    sign_in(&b, &base, "operator").await;
    let dummy = gw.env.dummy;
    assert_eq!(b.until("the dummy simulator", WAIT, &row_state(dummy)).await, "idle");
    b.until("the device", WAIT, &row_state(device)).await;
    b.until("the site with its controller", WAIT,
        "const r = document.querySelector('#sites tr[data-site=\"lab1\"]'); return r !== null && r.textContent.includes('running');").await;
    // A filter: equipment only.
    let shown = b
        .client
        .execute(
            "const f = document.getElementById('f-category'); f.value = 'equipment'; f.dispatchEvent(new Event('input'));
             return 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(shown, 1);
    b.until(
        "only the device",
        WAIT,
        &format!(
            "const rows = [...document.querySelectorAll('tr.ic')];
        return rows.length === 1 && rows[0].dataset.uuid === '{device}';"
        ),
    )
    .await;
    b.screenshot(&shots().join("1-loaded-equipment.png")).await;
    b.client
        .execute("const f = document.getElementById('f-category'); f.value = ''; f.dispatchEvent(new Event('input')); return 1;", vec![])
        .await
        .unwrap();

    // `busbar action start` shows without a reload.
    let marker: Value = b.client.execute("window.__noReload = 1; return 1;", vec![]).await.unwrap();
    assert_eq!(marker, 1);
    let o = cli(&gw.env, &["action", "start", "-u", &dummy.to_string(), "--wait", "running"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    b.until("the dummy running", WAIT, &row_in(dummy, "running")).await;

    // A device measure updates its value.
    assert_eq!(g.measure(&k, "m1", json!({"p": 42.5})).await.0, 200);
    b.until(
        "the new power value",
        WAIT,
        &format!("const r = document.querySelector('tr.ic[data-uuid=\"{device}\"] td.values'); return r && r.textContent.includes('42.5');"),
    )
    .await;

    // Stopped from the shell, started from the page.
    let o = cli(&gw.env, &["action", "stop", "-u", &dummy.to_string(), "--wait", "idle"]).await;
    assert!(o.status.success());
    b.until("the dummy idle", WAIT, &row_in(dummy, "idle")).await;
    b.click(&format!("tr.ic[data-uuid=\"{dummy}\"]")).await;
    b.until("the action buttons", WAIT, "return document.querySelector('button[data-action=start]') !== null;").await;
    b.click("button[data-action=start]").await;
    b.until("the dummy running again", WAIT, &row_in(dummy, "running")).await;
    let same: Value = b.client.execute("return window.__noReload === 1;", vec![]).await.unwrap();
    assert_eq!(same, true, "no reload happened");
    b.screenshot(&shots().join("2-operator.png")).await;

    // A viewer's page: no buttons, and a forged action gets 403.
    b.client.execute("sessionStorage.clear(); return 1;", vec![]).await.unwrap();
    sign_in(&b, &base, "viewer").await;
    b.until("the dummy", WAIT, &row_state(dummy)).await;
    b.until(
        "the device's last value right after loading",
        WAIT,
        &format!("const r = document.querySelector('tr.ic[data-uuid=\"{device}\"] td.values'); return r && r.textContent.includes('42.5');"),
    )
    .await;
    b.click(&format!("tr.ic[data-uuid=\"{dummy}\"]")).await;
    b.until("the detail", WAIT, &format!("return document.querySelector('#detail').textContent.includes('{dummy}');"))
        .await;
    let buttons: Value =
        b.client.execute("return document.querySelectorAll('button[data-action]').length;", vec![]).await.unwrap();
    assert_eq!(buttons, 0, "a viewer gets no action buttons");
    let forged = b
        .client
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 fetch('/api/v1/component/{dummy}', {{method: 'POST', headers: {{'Content-Type': 'application/json',
                   'Authorization': 'Bearer ' + sessionStorage.getItem('busbar-token')}},
                   body: JSON.stringify({{action: 'stop'}})}})
                 .then(async r => done([r.status, await r.json()]));"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(forged[0], 403, "{forged}");
    assert_eq!(forged[1]["error"]["msg"], "this needs the operator role");
    b.screenshot(&shots().join("3-viewer.png")).await;
    assert_eq!(b.until("the dummy still running", WAIT, &row_state(dummy)).await, "running");

    b.close().await;
    data.close().await;
    d.stop().await.unwrap();
}
