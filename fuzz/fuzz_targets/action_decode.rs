//! Any bytes, with any content type, through the action decoder: it must
//! return a decoded request or a typed rejection, never panic.
#![no_main]

use busbar::protocol::{ReplyTo, decode};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    let (ct, body) = match data.split_first() {
        Some((0, rest)) => (None, rest),
        Some((1, rest)) => (Some("application/json; charset=utf-8"), rest),
        Some((_, rest)) => (Some("application/json"), rest),
        None => (None, data),
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let _ = decode(ct, body, 64 * 1024, ReplyTo::default(), now);
});
