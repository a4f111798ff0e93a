//! A measure body of any shape against a device with attribute mappings,
//! static attributes and explicitAttrs, then the federation message built
//! from it: mapped or refused, never a panic.
#![no_main]

use busbar::iot::mapping::{Origin, map_measures, single_value};
use busbar::iot::model::{Tenant, parse_device, parse_group};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let group = parse_group(&json!({"resource": "/iot/json", "apikey": "k", "entity_type": "Meter",
        "attributes": [{"object_id": "t", "name": "temperature", "type": "Number"}],
        "static_attributes": [{"name": "site", "type": "Text", "value": "lab"}]}))
    .expect("a valid group");
    let device = parse_device(&json!({"device_id": "d1", "timestamp": true,
        "attributes": [{"object_id": "p", "name": "power", "type": "Number"}], "explicitAttrs": ["power", "t"]}))
    .expect("a valid device");
    let _ = single_value(data, false);
    let _ = single_value(data, true);
    let Ok(body) = serde_json::from_slice::<Value>(data) else { return };
    let t = body.get("t").and_then(Value::as_str).map(str::to_owned);
    for g in [Some(&group), None] {
        if let Ok(measures) = map_measures(&body, &device, g, t.as_deref(), 1_800_000_000_000) {
            let tenant = Tenant { service: "lab".into(), servicepath: "/".into() };
            let origin = Origin {
                tenant: &tenant,
                device_id: "d1",
                entity_name: "Meter:d1",
                entity_type: "Meter",
                gateway: uuid::Uuid::nil(),
                realm: "lab",
            };
            for m in &measures {
                let _ = origin.device_data(m);
            }
        }
    }
});
