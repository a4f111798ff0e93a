//! Authentication of the HTTP API, its WebSocket and the page, against the
//! real daemon binary with debug logs: every named bad-token case gets 401
//! or 403 with a JSON error that says nothing useful to an attacker, good
//! tokens get their role, and no token or key reaches a log line.
//!
//! The cases are listed in the README ("Web page and events").

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt").join(name)
}

fn key(alg: Algorithm, file: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(file)).unwrap();
    match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(role: &str) -> Value {
    json!({"aud": "lab1", "exp": now() + 600, "sub": "tester", "roles": [role]})
}

fn rs(claims: &Value) -> String {
    encode(&Header::new(Algorithm::RS256), claims, &key(Algorithm::RS256, "rsa.key")).unwrap()
}

/// A token from raw parts (for the forgeries).
fn raw(header: &Value, claims: &Value, sig: &str) -> String {
    format!("{}.{}.{sig}", B64.encode(header.to_string()), B64.encode(claims.to_string()))
}

/// A running daemon binary with JWT auth on its API.
struct Daemon {
    child: tokio::process::Child,
    api: String,
    log: PathBuf,
}

impl Daemon {
    async fn start(env: &TestEnv) -> Daemon {
        // A JWKS with the P-256 key under kid "ec1"; the RSA and Ed25519
        // keys as PEM files.
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key(Algorithm::ES256, "ec.key"), Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("ec1".into());
        let jwks = env.dir.path().join("keys.jwks.json");
        std::fs::write(&jwks, serde_json::to_vec(&json!({"keys": [jwk]})).unwrap()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cfg = env.config_value();
        cfg["site"] = json!("lab1");
        cfg["api"] = json!({"bind": format!("127.0.0.1:{port}"),
            "auth": {"jwt": {"keys": [fixture("rsa.pub"), jwks, fixture("ed.pub")], "leeway": 5}}});
        let path = env.dir.path().join("auth.yaml");
        std::fs::write(&path, text_of(&cfg)).unwrap();
        let log = env.dir.path().join("daemon.log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_busbar"))
            .args(["--log-level", "debug", "daemon", "-c"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(env.dir.path().join("daemon.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let d = Daemon { child, api: format!("http://127.0.0.1:{port}"), log };
        let http = reqwest::Client::new();
        eventually(WAIT, "the API answers", async || {
            http.get(format!("{}/api/v1/health", d.api)).send().await.ok().map(|_| ())
        })
        .await;
        d
    }

    async fn stop(mut self) -> String {
        let pid = self.child.id().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "clean shutdown: {status}");
        let mut text = std::fs::read_to_string(&self.log).unwrap();
        text.push_str(&std::fs::read_to_string(self.log.with_file_name("daemon.out")).unwrap_or_default());
        text
    }
}

/// A request of one case.
enum Req {
    /// `GET /api/v1` with this Authorization header value.
    Get(Option<String>),
    /// `POST` a start to the dummy with this bearer token.
    Act(String),
    /// A WebSocket upgrade of `/api/v1/events` with this query.
    Ws(String),
    /// `GET /api/v1/health` with this query and no header.
    Query(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_without_detail_and_never_logged() {
    let env = TestEnv::new();
    let d = Daemon::start(&env).await;
    let http = reqwest::Client::new();

    let viewer = rs(&claims("viewer"));
    let operator = rs(&claims("operator"));
    let public_pem = std::fs::read(fixture("rsa.pub")).unwrap();
    let tampered = {
        let parts: Vec<&str> = viewer.split('.').collect();
        format!("{}.{}.{}", parts[0], B64.encode(claims("operator").to_string()), parts[2])
    };
    let es = |kid: Option<&str>, file: &str, c: &Value| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_owned);
        encode(&h, c, &key(Algorithm::ES256, file)).unwrap()
    };
    let es_sig = es(Some("ec1"), "ec.key", &claims("operator")).rsplit('.').next().unwrap().to_owned();
    let ticket = |token: &str| {
        let (http, api, token) = (http.clone(), d.api.clone(), token.to_owned());
        async move {
            let r = http.post(format!("{api}/api/v1/events/ticket")).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["ticket"].as_str().unwrap().to_owned()
        }
    };
    let used = ticket(&viewer).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws{}/api/v1/events?ticket={used}", &d.api[4..])).await.unwrap();
    ws.close(None).await.unwrap();
    let plain_ticket = ticket(&viewer).await;
    let b = |t: &str| Some(format!("Bearer {t}"));

    let cases: Vec<(&str, Req, u16)> = vec![
        ("no token", Req::Get(None), 401),
        ("alg none", Req::Get(b(&raw(&json!({"alg": "none", "typ": "JWT"}), &claims("operator"), ""))), 401),
        ("alg None (case)", Req::Get(b(&raw(&json!({"alg": "None"}), &claims("operator"), ""))), 401),
        (
            "HS256 signed with the RSA public key",
            Req::Get(b(&encode(
                &Header::new(Algorithm::HS256),
                &claims("operator"),
                &EncodingKey::from_secret(&public_pem).unwrap(),
            )
            .unwrap())),
            401,
        ),
        (
            "HS256 when not configured",
            Req::Get(b(&encode(
                &Header::new(Algorithm::HS256),
                &claims("operator"),
                &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap(),
            )
            .unwrap())),
            401,
        ),
        ("wrong aud", Req::Get(b(&rs(&json!({"aud": "lab2", "exp": now() + 600, "roles": ["operator"]})))), 401),
        ("missing aud", Req::Get(b(&rs(&json!({"exp": now() + 600, "roles": ["operator"]})))), 401),
        ("expired", Req::Get(b(&rs(&json!({"aud": "lab1", "exp": now() - 60, "roles": ["operator"]})))), 401),
        (
            "not yet valid",
            Req::Get(b(&rs(&json!({"aud": "lab1", "exp": now() + 600, "nbf": now() + 60, "roles": ["operator"]})))),
            401,
        ),
        ("missing exp", Req::Get(b(&rs(&json!({"aud": "lab1", "roles": ["operator"]})))), 401),
        (
            "exp as a string",
            Req::Get(b(&rs(&json!({"aud": "lab1", "exp": "99999999999", "roles": ["operator"]})))),
            401,
        ),
        (
            "wrong RSA key",
            Req::Get(b(&encode(
                &Header::new(Algorithm::RS256),
                &claims("operator"),
                &key(Algorithm::RS256, "other-rsa.key"),
            )
            .unwrap())),
            401,
        ),
        ("wrong P-256 key", Req::Get(b(&es(Some("ec1"), "other-ec.key", &claims("operator")))), 401),
        ("unknown kid", Req::Get(b(&es(Some("nope"), "ec.key", &claims("operator")))), 401),
        ("truncated", Req::Get(b(&viewer[..viewer.len() - 10])), 401),
        ("bad base64", Req::Get(b(&format!("{}.!!!.{}", viewer.split('.').next().unwrap(), "AAAA"))), 401),
        ("payload changed after signing", Req::Get(b(&tampered)), 401),
        ("two segments", Req::Get(b(viewer.rsplit_once('.').unwrap().0)), 401),
        ("five segments (JWE)", Req::Get(b(&format!("{viewer}.AAAA.BBBB"))), 401),
        (
            "huge token",
            Req::Get(b(&rs(
                &json!({"aud": "lab1", "exp": now() + 600, "roles": ["operator"], "pad": "x".repeat(12_000)}),
            ))),
            401,
        ),
        (
            "RS384 (not allowed) with the right key",
            Req::Get(b(&encode(
                &Header::new(Algorithm::RS384),
                &claims("operator"),
                &key(Algorithm::RS256, "rsa.key"),
            )
            .unwrap())),
            401,
        ),
        (
            "RS256 header over an ES256 signature",
            Req::Get(b(&format!("{}.{es_sig}", operator.rsplit_once('.').unwrap().0))),
            401,
        ),
        ("Basic scheme", Req::Get(Some("Basic dXNlcjpwYXNz".into())), 401),
        ("empty bearer", Req::Get(Some("Bearer ".into())), 401),
        ("token in the query string", Req::Query(format!("verbose&access_token={operator}")), 401),
        ("verbose health without a token", Req::Query("verbose".into()), 401),
        ("valid token, no role", Req::Get(b(&rs(&json!({"aud": "lab1", "exp": now() + 600})))), 403),
        ("valid token, unknown role", Req::Get(b(&rs(&claims("admin")))), 403),
        ("viewer acting", Req::Act(viewer.clone()), 403),
        ("used ticket", Req::Ws(format!("ticket={used}")), 401),
        ("unknown ticket", Req::Ws(format!("ticket={}", "0".repeat(64))), 401),
        ("ticket on a plain request", Req::Query(format!("verbose&ticket={plain_ticket}")), 401),
        ("WebSocket without credentials", Req::Ws(String::new()), 401),
    ];
    assert!(cases.len() >= 25, "at least 25 named cases");
    let mut secrets = vec![operator.clone(), viewer.clone()];
    for (name, req, want) in &cases {
        let (status, body) = match req {
            Req::Get(h) => {
                let mut rb = http.get(format!("{}/api/v1", d.api));
                if let Some(h) = h {
                    rb = rb.header("Authorization", h);
                    secrets.push(h.trim_start_matches("Bearer ").to_owned());
                }
                let r = rb.send().await.unwrap();
                if r.status() == 401 {
                    let www = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
                    assert!(www.as_deref().is_some_and(|w| w.starts_with("Bearer realm=\"lab1\"")), "{name}: {www:?}");
                }
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
            Req::Act(t) => {
                let r = http
                    .post(format!("{}/api/v1/component/{}", d.api, env.dummy))
                    .bearer_auth(t)
                    .json(&json!({"action": "start"}))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
            Req::Query(q) => {
                let r = http.get(format!("{}/api/v1/health?{q}", d.api)).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
            Req::Ws(q) => {
                match tokio_tungstenite::connect_async(format!("ws{}/api/v1/events?{q}", &d.api[4..])).await {
                    Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                        let body = r.body().as_ref().map(|b| serde_json::from_slice(b).unwrap()).unwrap_or(Value::Null);
                        (r.status().as_u16(), body)
                    }
                    other => panic!("{name}: the upgrade was not refused: {:?}", other.map(|(_, r)| r.status())),
                }
            }
        };
        assert_eq!(status, *want, "{name}: {body}");
        let msg = body["error"]["msg"].as_str().unwrap_or_else(|| panic!("{name}: a JSON error: {body}"));
        let allowed =
            ["authentication required", "invalid token", "this needs the viewer role", "this needs the operator role"];
        assert!(allowed.contains(&msg), "{name}: the message says no more than that: {msg}");
        assert_eq!(body["error"]["code"], *want, "{name}");
    }

    // Good tokens: each algorithm, each role.
    for (t, role) in [
        (viewer.clone(), "viewer"),
        (es(Some("ec1"), "ec.key", &claims("operator")), "operator"),
        (
            encode(&Header::new(Algorithm::EdDSA), &claims("viewer"), &key(Algorithm::EdDSA, "ed.key")).unwrap(),
            "viewer",
        ),
    ] {
        let r = http.get(format!("{}/api/v1/auth", d.api)).bearer_auth(&t).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"auth": "jwt", "role": role}));
        secrets.push(t);
    }
    let r = http
        .post(format!("{}/api/v1/component/{}", d.api, env.dummy))
        .bearer_auth(&operator)
        .json(&json!({"action": "start"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "an operator acts");
    let r = http.get(format!("{}/api/v1/health", d.api)).send().await.unwrap();
    assert_eq!(r.status(), 200, "probes need no token");
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}), "and learn nothing but ok");
    let r = http.get(format!("{}/api/v1/health?verbose", d.api)).bearer_auth(&viewer).send().await.unwrap();
    assert_eq!(r.status(), 200, "a viewer reads the details");
    let r = http.get(format!("{}/", d.api)).send().await.unwrap();
    assert_eq!(r.status(), 200, "the page itself holds no data and needs no token");
    assert!(r.text().await.unwrap().contains("<title>busbar</title>"));

    let log = d.stop().await;
    assert!(log.contains("refused a token"), "refusals are logged (at debug), so the check below has lines to read");
    for s in secrets {
        // Any part of a token long enough to be one.
        for part in s.split('.').filter(|p| p.len() >= 16) {
            assert!(!log.contains(part), "a token part reached the log: {part}");
        }
    }
    assert!(!log.contains("BEGIN"), "no key material in the log");
}

/// A listener on a non-loopback address needs `auth`, or `auth: none`.
#[tokio::test]
async fn a_non_loopback_api_without_auth_is_a_config_error() {
    let env = TestEnv::new();
    let mut cfg = env.config_value();
    cfg["api"] = json!({"bind": "0.0.0.0:0"});
    let e = busbar::config::Config::parse(&text_of(&cfg), std::path::Path::new("lab.yaml")).unwrap_err().to_string();
    assert!(e.starts_with("lab.yaml: api.auth: required because api.bind 0.0.0.0:0 is not a loopback address"), "{e}");
    cfg["api"]["auth"] = json!("none");
    busbar::config::Config::parse(&text_of(&cfg), std::path::Path::new("lab.yaml")).expect("said explicitly");
    cfg["api"]["auth"] = json!({"jwt": {"keys": ["/nonexistent.pem"]}});
    let e = busbar::config::Config::parse(&text_of(&cfg), std::path::Path::new("lab.yaml")).unwrap_err().to_string();
    assert!(e.starts_with("lab.yaml: api.auth.jwt.keys[0] (/nonexistent.pem): cannot read"), "{e}");
}

/// The IoT north API with `north_auth`: reads need a viewer, changes an
/// operator, `/ready` stays open for probes; a north API beyond loopback
/// without `north_auth` is the gateway's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_north_api_takes_the_same_tokens() {
    use common::iot::*;
    let gw = Gw::with(json!({"north_auth": {"jwt": {"keys": [fixture("rsa.pub")], "audience": "lab1"}}}));
    let data = Data::bind(&gw.data).await;
    let d = gw.env.start_with(gw.config()).await;
    let g = Gateway::of(&d, gw.uuid).await;
    let http = reqwest::Client::new();
    let call = async |method: &str, path: &str, token: Option<&str>| {
        let mut rb = http
            .request(method.parse().unwrap(), format!("{}{path}", g.north))
            .header("fiware-service", "lab")
            .header("fiware-servicepath", "/rig1");
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if method == "POST" {
            rb = rb.json(&json!({"groups": [{"resource": "/iot/json", "apikey": "k1", "entity_type": "T"}]}));
        }
        rb.send().await.unwrap().status().as_u16()
    };
    let (viewer, operator) = (rs(&claims("viewer")), rs(&claims("operator")));
    assert_eq!(call("GET", "/iot/groups", None).await, 401);
    assert_eq!(call("GET", "/iot/groups", Some(&viewer)).await, 200);
    assert_eq!(call("POST", "/iot/groups", Some(&viewer)).await, 403);
    assert_eq!(call("POST", "/iot/groups", Some(&operator)).await, 201);
    assert_eq!(call("GET", "/ready", None).await, 200, "probes need no token");
    data.close().await;
    d.stop().await.unwrap();

    let gw = Gw::with(json!({"north_bind": "0.0.0.0:0"}));
    let (d, _c, _l) = gw.env.up_with(gw.config()).await;
    let st = eventually(WAIT, "the gateway's error", async || {
        let st = d.shared.env.components.lookup(gw.uuid).unwrap().status().await.unwrap();
        (st["status"]["state"] == "error").then_some(st)
    })
    .await;
    assert!(
        st["status"]["error"]["msg"].as_str().unwrap().starts_with("north_auth is required because north_bind"),
        "{st}"
    );
    d.stop().await.unwrap();
}
