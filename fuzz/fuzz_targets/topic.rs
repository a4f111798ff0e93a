//! MQTT topics and AMQP routing keys of the south side: an address or
//! nothing.
#![no_main]

use busbar::iot::mapping::{parse_routing_key, parse_topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = parse_topic(s, false);
    let _ = parse_topic(s, true);
    let _ = parse_routing_key(s);
});
