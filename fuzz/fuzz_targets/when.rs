//! `when` as any JSON value or any string: parsed or rejected, never a
//! panic (a `when` of 1e20 once killed the decoding task).
#![no_main]

use busbar::protocol::When;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::time::{Duration, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        let _ = When::parse(Some(&v), now);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = When::parse(Some(&Value::String(s.to_owned())), now);
    }
    if data.len() >= 8 {
        let f = f64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        if let Some(n) = serde_json::Number::from_f64(f) {
            let _ = When::parse(Some(&Value::Number(n)), now);
        }
    }
});
