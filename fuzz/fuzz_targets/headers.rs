//! AMQP header tables as the broker would deliver them: decoded by the
//! wire parser, then read and matched by busbar's routing code.
#![no_main]

use busbar::protocol::RoutingKeys;
use busbar::protocol::headers::header_str;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_, table)) = amq_protocol_types::parsing::parse_field_table(data) else { return };
    for key in ["uuid", "realm", "category", "type", "x-match"] {
        let _ = header_str(&table, key);
    }
    let keys = RoutingKeys {
        category: "simulator".into(),
        kind: "dummy".into(),
        uuid: uuid::Uuid::nil(),
        realm: Some("lab".into()),
    };
    let _ = keys.matches(&table);
});
