//! Provisioning bodies (groups and devices) of the north API: parsed and
//! checked, or refused with an API error.
#![no_main]

use busbar::iot::model::{check_id, check_service, check_servicepath, parse_device, parse_group};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = check_service(s);
        let _ = check_servicepath(s, true);
        let _ = check_id("device_id", s);
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let _ = parse_group(&v);
    let _ = parse_device(&v);
    if let Some(items) = v.as_array() {
        for item in items {
            let _ = parse_group(item);
            let _ = parse_device(item);
        }
    }
});
