//! Any text as a component type manifest: a type or a ManifestError.
#![no_main]

use busbar::component::kinds::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(kind) = Kind::from_manifest("fuzz.yaml", text) {
        let _ = kind.validate(busbar::state::Action::Start, &serde_json::Map::new());
    }
});
