//! Any text as a YAML and as a JSON config file: a config or an error that
//! names file and key, never a panic.
#![no_main]

use busbar::config::Config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Deeply nested YAML is refused by the parser's own limits.
    let _ = Config::parse(text, Path::new("fuzz.yaml"));
    let _ = Config::parse(text, Path::new("fuzz.json"));
});
