//! Who may use busbar's HTTP listeners: JWT bearer tokens with two roles.
//!
//! A listener that binds a non-loopback address must be configured with
//! `auth: {jwt: …}` or say `auth: none` (checked in `config`). With JWT:
//!
//! - the algorithm is taken from an explicit allow-list (RS256, ES256,
//!   EdDSA; HS256 only with a configured secret), and each key is bound to
//!   the one algorithm of its type, so a token cannot choose how it is
//!   checked (`alg: none`, or HS256 "signed" with the RSA public key, the
//!   classic confusion, find no key);
//! - `aud` must be the instance name, `exp` is required, `nbf` is checked
//!   when present, with a small leeway for clock skew;
//! - the roles claim grants `viewer` (read, subscribe) or `operator`
//!   (actions too).
//!
//! A refusal says as little as possible ("invalid token"); the reason is
//! logged at debug level, never the token. Browsers cannot set headers on
//! a WebSocket, so a token buys a single-use, short-lived [`Tickets`]
//! ticket for one (dojot kafka-ws does the same).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::debug;

/// Longest token looked at; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The `auth:` setting of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthConfig {
    /// No authentication; on a non-loopback listener it must be said.
    None,
    /// JWT bearer tokens.
    Jwt(JwtConfig),
}

/// `auth: {jwt: …}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Public keys: PEM files (RSA, P-256 or Ed25519 public keys) or JWKS
    /// JSON files (`{"keys": […]}`, matched by `kid`).
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// A file holding an HS256 secret (at least 32 bytes). HS256 tokens
    /// are refused unless one is configured.
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// Accepted algorithms, a subset of RS256, ES256, EdDSA and HS256
    /// (default: those the configured keys use).
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    /// The `aud` a token must carry (default: the instance name, the
    /// config's `site` or else the host name).
    #[serde(default)]
    pub audience: Option<String>,
    /// The claim that holds the roles (a string or an array of strings).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The role name that grants reading and subscribing.
    #[serde(default = "default_viewer")]
    pub viewer_role: String,
    /// The role name that also grants actions.
    #[serde(default = "default_operator")]
    pub operator_role: String,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: u64,
}

fn default_roles_claim() -> String {
    "roles".into()
}
fn default_viewer() -> String {
    "viewer".into()
}
fn default_operator() -> String {
    "operator".into()
}
fn default_leeway() -> u64 {
    30
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read statuses, subscribe to events.
    Viewer,
    /// Also act on components.
    Operator,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        })
    }
}

/// Why a request was refused. The messages are what the client sees:
/// nothing that tells an attacker which check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all.
    #[error("authentication required")]
    Missing,
    /// Credentials that do not verify; the reason is for the debug log.
    #[error("invalid token")]
    Invalid(&'static str),
    /// A valid token without the role this needs.
    #[error("this needs the {0} role")]
    Forbidden(Role),
}

/// A key bound to the one algorithm it may verify.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// A configuration error of `auth`, naming the key and file.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct AuthConfigError {
    /// The config key (`api.auth.jwt.keys[0]`).
    pub key: String,
    /// What is wrong.
    pub msg: String,
}

fn bad(key: impl Into<String>, msg: impl Into<String>) -> AuthConfigError {
    AuthConfigError { key: key.into(), msg: msg.into() }
}

/// Checks bearer tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    algorithms: Vec<Algorithm>,
    audience: String,
    roles_claim: String,
    viewer_role: String,
    operator_role: String,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never key material.
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("algorithms", &self.algorithms)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

const SUPPORTED: [Algorithm; 4] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA, Algorithm::HS256];

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        Algorithm::HS256 => "HS256",
        _ => "other",
    }
}

/// The keys of one PEM file: every public key block in it.
fn pem_keys(text: &str, at: &str) -> Result<Vec<Key>, AuthConfigError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block_end = rest[start..]
            .find("-----END ")
            .and_then(|e| rest[start + e..].find('\n').map(|n| start + e + n + 1).or(Some(rest.len())))
            .ok_or_else(|| bad(at, "an unterminated PEM block"))?;
        let block = &rest[start..block_end];
        rest = &rest[block_end..];
        if block.contains("PRIVATE KEY") {
            return Err(bad(at, "holds a private key; give busbar the public key only"));
        }
        let b = block.as_bytes();
        let key = if let Ok(k) = DecodingKey::from_rsa_pem(b) {
            Key { kid: None, alg: Algorithm::RS256, key: k }
        } else if let Ok(k) = DecodingKey::from_ec_pem(b) {
            Key { kid: None, alg: Algorithm::ES256, key: k }
        } else if let Ok(k) = DecodingKey::from_ed_pem(b) {
            Key { kid: None, alg: Algorithm::EdDSA, key: k }
        } else {
            return Err(bad(at, "a PEM block that is not an RSA, P-256 or Ed25519 public key"));
        };
        out.push(key);
    }
    if out.is_empty() {
        return Err(bad(at, "no PEM public key in the file"));
    }
    Ok(out)
}

/// The keys of a JWKS file; symmetric keys are refused (HS256 has its own
/// setting, so a JWKS can never turn it on).
fn jwks_keys(text: &str, at: &str) -> Result<Vec<Key>, AuthConfigError> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
    let set: JwkSet = serde_json::from_str(text).map_err(|e| bad(at, format!("not a JWKS document: {e}")))?;
    let mut out = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            AlgorithmParameters::OctetKey(_) => {
                return Err(bad(format!("{at}: keys[{i}]"), "a symmetric key; use hs256_secret_file for HS256"));
            }
            _ => return Err(bad(format!("{at}: keys[{i}]"), "not an RSA, P-256 or Ed25519 key")),
        };
        if let Some(declared) = jwk.common.key_algorithm
            && declared.to_string() != alg_name(alg)
        {
            return Err(bad(
                format!("{at}: keys[{i}]"),
                format!("declares {declared}, but its key is for {}", alg_name(alg)),
            ));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("{at}: keys[{i}]"), e.to_string()))?;
        out.push(Key { kid: jwk.common.key_id.clone(), alg, key });
    }
    if out.is_empty() {
        return Err(bad(at, "the JWKS has no keys"));
    }
    Ok(out)
}

impl Verifier {
    /// Load the keys of `cfg`; `at` is the config key (`api.auth.jwt`) and
    /// `instance` the default audience.
    pub fn load(cfg: &JwtConfig, at: &str, instance: &str) -> Result<Verifier, AuthConfigError> {
        let mut keys = Vec::new();
        for (i, path) in cfg.keys.iter().enumerate() {
            let key_at = format!("{at}.keys[{i}] ({})", path.display());
            let text = read(path, &key_at)?;
            keys.extend(if text.trim_start().starts_with('{') {
                jwks_keys(&text, &key_at)?
            } else {
                pem_keys(&text, &key_at)?
            });
        }
        if let Some(path) = &cfg.hs256_secret_file {
            let key_at = format!("{at}.hs256_secret_file ({})", path.display());
            let secret = read(path, &key_at)?;
            let secret = secret.trim_end_matches(['\n', '\r']);
            if secret.len() < 32 {
                return Err(bad(key_at, "an HS256 secret must be at least 32 bytes"));
            }
            let key = DecodingKey::from_secret(secret.as_bytes()).map_err(|e| bad(&key_at, e.to_string()))?;
            keys.push(Key { kid: None, alg: Algorithm::HS256, key });
        }
        if keys.is_empty() {
            return Err(bad(format!("{at}.keys"), "no key configured: give a PEM or JWKS file"));
        }
        let algorithms = match &cfg.algorithms {
            None => SUPPORTED.iter().copied().filter(|a| keys.iter().any(|k| k.alg == *a)).collect(),
            Some(names) => {
                let mut algs = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    let a = SUPPORTED.iter().copied().find(|a| alg_name(*a) == n).ok_or_else(|| {
                        bad(format!("{at}.algorithms[{i}]"), format!("{n:?} is not one of RS256, ES256, EdDSA, HS256"))
                    })?;
                    if a == Algorithm::HS256 && cfg.hs256_secret_file.is_none() {
                        return Err(bad(format!("{at}.algorithms[{i}]"), "HS256 needs hs256_secret_file"));
                    }
                    algs.push(a);
                }
                algs
            }
        };
        let audience = cfg.audience.clone().unwrap_or_else(|| instance.to_owned());
        if audience.is_empty() {
            return Err(bad(format!("{at}.audience"), "must not be empty"));
        }
        if cfg.leeway > 300 {
            return Err(bad(format!("{at}.leeway"), "at most 300 seconds"));
        }
        Ok(Verifier {
            keys,
            algorithms,
            audience,
            roles_claim: cfg.roles_claim.clone(),
            viewer_role: cfg.viewer_role.clone(),
            operator_role: cfg.operator_role.clone(),
            leeway: cfg.leeway,
        })
    }

    /// The audience tokens must name.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Check `token` and return the role it grants.
    pub fn verify(&self, token: &str) -> Result<Role, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("token too long"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("malformed header"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid("algorithm not allowed"));
        }
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => true,
                (None, _) => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::Invalid(if header.kid.is_some() {
                "unknown kid"
            } else {
                "no key for the algorithm"
            }));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        let mut last = AuthError::Invalid("no key verified it");
        for k in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &validation) {
                Ok(data) => return self.role_of(&data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = AuthError::Invalid(match e.kind() {
                        K::ExpiredSignature => "expired",
                        K::ImmatureSignature => "not yet valid",
                        K::InvalidAudience => "wrong audience",
                        K::MissingRequiredClaim(_) => "a required claim is missing",
                        K::InvalidSignature => "bad signature",
                        K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed",
                        _ => "rejected",
                    });
                }
            }
        }
        Err(last)
    }

    fn role_of(&self, claims: &Map<String, Value>) -> Result<Role, AuthError> {
        let has = |name: &str| match claims.get(&self.roles_claim) {
            Some(Value::String(s)) => s == name,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(name)),
            _ => false,
        };
        if has(&self.operator_role) {
            Ok(Role::Operator)
        } else if has(&self.viewer_role) {
            Ok(Role::Viewer)
        } else {
            Err(AuthError::Forbidden(Role::Viewer))
        }
    }
}

fn read(path: &Path, at: &str) -> Result<String, AuthConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| bad(at, format!("cannot read: {e}")))?;
    if meta.len() > 1 << 20 {
        return Err(bad(at, "larger than 1 MiB"));
    }
    std::fs::read_to_string(path).map_err(|e| bad(at, format!("cannot read: {e}")))
}

/// Single-use WebSocket tickets: a token buys one, valid for
/// [`Tickets::TTL`], with the token's role.
#[derive(Debug, Default)]
pub struct Tickets(Mutex<HashMap<String, (Instant, Role)>>);

impl Tickets {
    /// How long a ticket is good for.
    pub const TTL: Duration = Duration::from_secs(30);
    /// Most tickets outstanding.
    pub const MAX: usize = 10_000;

    /// A new ticket (64 hex digits from the OS's random source), or `None`
    /// when too many are outstanding.
    pub fn issue(&self, role: Role) -> Option<String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, (at, _)| now.duration_since(*at) < Self::TTL);
        if map.len() >= Self::MAX {
            return None;
        }
        let ticket = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        map.insert(ticket.clone(), (now, role));
        Some(ticket)
    }

    /// Use `ticket` up: its role if it was issued and has not expired.
    pub fn take(&self, ticket: &str) -> Option<Role> {
        let (at, role) = self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(ticket)?;
        (at.elapsed() < Self::TTL).then_some(role)
    }
}

/// The gate of one listener: its verifier (none: open) and its tickets.
#[derive(Debug, Clone)]
pub struct Gate {
    verifier: Option<Arc<Verifier>>,
    /// The WebSocket tickets this listener issued.
    pub tickets: Arc<Tickets>,
    realm: HeaderValue,
}

/// The role a request was let in with (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Granted(pub Role);

impl Gate {
    /// An open gate (`auth: none`, or a loopback listener without `auth`).
    pub fn open() -> Gate {
        Gate { verifier: None, tickets: Arc::default(), realm: HeaderValue::from_static("Bearer realm=\"busbar\"") }
    }

    /// A gate checking tokens with `verifier`.
    pub fn jwt(verifier: Verifier) -> Gate {
        let realm = HeaderValue::from_str(&format!("Bearer realm=\"{}\"", verifier.audience().replace('"', "")))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"busbar\""));
        Gate { verifier: Some(Arc::new(verifier)), tickets: Arc::default(), realm }
    }

    /// Whether tokens are checked.
    pub fn is_open(&self) -> bool {
        self.verifier.is_none()
    }

    /// The role `headers` (a bearer token) or `ticket` grant. An open gate
    /// grants operator.
    pub fn check(&self, headers: &HeaderMap, ticket: Option<&str>) -> Result<Role, AuthError> {
        let Some(v) = &self.verifier else { return Ok(Role::Operator) };
        match headers.get(header::AUTHORIZATION) {
            Some(h) => {
                let h = h.to_str().map_err(|_| AuthError::Invalid("not text"))?;
                let token = h
                    .strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
                    .ok_or(AuthError::Invalid("not a bearer token"))?;
                v.verify(token.trim())
            }
            None => match ticket {
                Some(t) => self.tickets.take(t).ok_or(AuthError::Invalid("unknown or used ticket")),
                None => Err(AuthError::Missing),
            },
        }
    }

    /// The refusal, as JSON with `WWW-Authenticate` for 401.
    pub fn refuse(&self, e: &AuthError) -> Response {
        let status = match e {
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        if let AuthError::Invalid(reason) = e {
            debug!(reason, "refused a token");
        }
        let body = axum::Json(serde_json::json!({"error": {"msg": e.to_string(), "code": status.as_u16()}}));
        let mut r = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            let v = if matches!(e, AuthError::Missing) {
                self.realm.clone()
            } else {
                let s = format!("{}, error=\"invalid_token\"", self.realm.to_str().unwrap_or("Bearer"));
                HeaderValue::from_str(&s).unwrap_or_else(|_| self.realm.clone())
            };
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }
}

/// Middleware: let the request in if it grants `need`, with [`Granted`]
/// as an extension. A WebSocket upgrade may carry `?ticket=` instead of a
/// header.
pub async fn require(State((gate, need)): State<(Gate, Role)>, mut req: Request, next: Next) -> Response {
    let ticket = if req.headers().contains_key(header::UPGRADE) {
        req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ticket=")).map(str::to_owned))
    } else {
        None
    };
    match gate.check(req.headers(), ticket.as_deref()) {
        Ok(role) if role >= need => {
            req.extensions_mut().insert(Granted(role));
            next.run(req).await
        }
        Ok(_) => gate.refuse(&AuthError::Forbidden(need)),
        Err(e) => gate.refuse(&e),
    }
}

/// Middleware for APIs whose reads and writes differ by method (the IoT
/// north API): `GET` and `HEAD` need the viewer role, anything else the
/// operator role; `/ready` stays open for health probes.
pub async fn require_by_method(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/ready" {
        return next.run(req).await;
    }
    let need = if matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        Role::Viewer
    } else {
        Role::Operator
    };
    require(State((gate, need)), req, next).await
}

#[cfg(test)]
mod tests;
