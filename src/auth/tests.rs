//! The verifier against tokens made here with test keys
//! (`tests/fixtures/jwt`); the HTTP side and the full list of bad tokens
//! are in `tests/auth.rs`.

use super::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt").join(name)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn verifier(extra: impl FnOnce(&mut JwtConfig)) -> Verifier {
    let mut cfg: JwtConfig =
        serde_json::from_value(json!({"keys": [fixture("rsa.pub"), fixture("ec.pub"), fixture("ed.pub")]})).unwrap();
    extra(&mut cfg);
    Verifier::load(&cfg, "api.auth.jwt", "lab1").unwrap()
}

fn sign(alg: Algorithm, key_file: &str, claims: Value) -> String {
    let pem = std::fs::read(fixture(key_file)).unwrap();
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        _ => unreachable!(),
    };
    encode(&Header::new(alg), &claims, &key).unwrap()
}

fn good(role: &str) -> Value {
    json!({"aud": "lab1", "exp": now() + 600, "roles": [role]})
}

#[test]
fn each_allowed_algorithm_verifies_with_its_own_key_and_grants_the_role() {
    let v = verifier(|_| {});
    assert_eq!(v.verify(&sign(Algorithm::RS256, "rsa.key", good("operator"))), Ok(Role::Operator));
    assert_eq!(v.verify(&sign(Algorithm::ES256, "ec.key", good("viewer"))), Ok(Role::Viewer));
    assert_eq!(v.verify(&sign(Algorithm::EdDSA, "ed.key", good("operator"))), Ok(Role::Operator));
    let one = json!({"aud": "lab1", "exp": now() + 600, "roles": "viewer"});
    assert_eq!(v.verify(&sign(Algorithm::RS256, "rsa.key", one)), Ok(Role::Viewer), "a single role as a string");
}

#[test]
fn the_leeway_allows_small_clock_skew_only() {
    let v = verifier(|c| c.leeway = 30);
    let skewed = json!({"aud": "lab1", "exp": now() - 10, "nbf": now() + 10, "roles": ["viewer"]});
    assert_eq!(v.verify(&sign(Algorithm::RS256, "rsa.key", skewed)), Ok(Role::Viewer));
    let old = json!({"aud": "lab1", "exp": now() - 60, "roles": ["viewer"]});
    assert_eq!(v.verify(&sign(Algorithm::RS256, "rsa.key", old)), Err(AuthError::Invalid("expired")));
}

#[test]
fn hs256_signed_with_the_public_key_finds_no_key() {
    // The classic confusion: the RSA public key's bytes as an HMAC secret.
    let v = verifier(|_| {});
    let public = std::fs::read(fixture("rsa.pub")).unwrap();
    let forged =
        encode(&Header::new(Algorithm::HS256), &good("operator"), &EncodingKey::from_secret(&public).unwrap()).unwrap();
    assert_eq!(v.verify(&forged), Err(AuthError::Invalid("algorithm not allowed")));
    // Even with HS256 configured, the RSA key is not an HMAC key.
    let secret = std::env::temp_dir().join(format!("busbar-hs-{}", std::process::id()));
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-secret").unwrap();
    let v = verifier(|c| c.hs256_secret_file = Some(secret.clone()));
    let _ = std::fs::remove_file(&secret);
    assert_eq!(v.verify(&forged), Err(AuthError::Invalid("bad signature")));
}

#[test]
fn a_jwks_is_matched_by_kid_and_may_not_carry_a_secret() {
    use jsonwebtoken::jwk::Jwk;
    let pem = std::fs::read(fixture("rsa.key")).unwrap();
    let enc = EncodingKey::from_rsa_pem(&pem).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, serde_json::to_vec(&json!({"keys": [jwk]})).unwrap()).unwrap();
    let cfg: JwtConfig = serde_json::from_value(json!({"keys": [file]})).unwrap();
    let v = Verifier::load(&cfg, "api.auth.jwt", "lab1").unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("k1".into());
    assert_eq!(v.verify(&encode(&h, &good("viewer"), &enc).unwrap()), Ok(Role::Viewer));
    h.kid = Some("k2".into());
    assert_eq!(v.verify(&encode(&h, &good("viewer"), &enc).unwrap()), Err(AuthError::Invalid("unknown kid")));
    std::fs::write(&file, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    let e = Verifier::load(&cfg, "api.auth.jwt", "lab1").unwrap_err().to_string();
    assert!(e.contains("a symmetric key"), "{e}");
}

#[test]
fn configuration_mistakes_name_the_key() {
    let load =
        |v: Value| Verifier::load(&serde_json::from_value(v).unwrap(), "api.auth.jwt", "lab1").unwrap_err().to_string();
    assert!(load(json!({})).starts_with("api.auth.jwt.keys: no key configured"));
    assert!(load(json!({"keys": [fixture("rsa.key")]})).contains("holds a private key"));
    assert!(
        load(json!({"keys": ["/nonexistent.pem"]})).starts_with("api.auth.jwt.keys[0] (/nonexistent.pem): cannot read")
    );
    let e = load(json!({"keys": [fixture("rsa.pub")], "algorithms": ["HS256"]}));
    assert_eq!(e, "api.auth.jwt.algorithms[0]: HS256 needs hs256_secret_file");
    let e = load(json!({"keys": [fixture("rsa.pub")], "algorithms": ["none"]}));
    assert!(e.contains("\"none\" is not one of"), "{e}");
}

#[test]
fn tickets_are_single_use() {
    let t = Tickets::default();
    let ticket = t.issue(Role::Viewer).unwrap();
    assert_eq!(ticket.len(), 64);
    assert_eq!(t.take(&ticket), Some(Role::Viewer));
    assert_eq!(t.take(&ticket), None, "used up");
    assert_eq!(t.take("0000"), None);
}
