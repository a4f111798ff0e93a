//! Attribute expressions (JEXL) as a provisioning user could write them:
//! checked, then evaluated against a measure's context; refused or
//! evaluated, never a panic or a stack overflow.
#![no_main]

use busbar::iot::expression::{check, evaluate};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(expr) = std::str::from_utf8(data) else { return };
    if check(expr).is_err() {
        return;
    }
    let ctx: Map<String, Value> = json!({"t": 20, "s": " Lab ", "n": 2.5, "a": [1, 2], "o": {"k": "v"}, "z": 0})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let _ = evaluate(expr, &ctx);
});
