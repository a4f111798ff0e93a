//! No task dies silently.
//!
//! busbar's loops (a component's task, a bus forwarder, a gateway's MQTT,
//! AMQP and federation loops) each handle one message at a time. A bug
//! that panics on one message must cost that message, not the loop: the
//! loop would otherwise be gone for good, and with it every component it
//! feeds. So each message is handled under [`catch`], a panic is logged
//! with its message and location (see [`install_panic_hook`]), counted in
//! `busbar_errors{kind="panic"}`, and the loop carries on; a component
//! that panicked enters `error`, from which `reset` recovers it.

use futures_util::FutureExt;
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

/// Run `fut`; a panic inside it becomes `Err` with the panic's message.
///
/// `AssertUnwindSafe` is sound here in the sense that matters: whatever the
/// future left half-updated belongs to the one loop that calls this, and
/// that loop treats a panic as an error of its own state (a component
/// enters `error`, a publisher reconnects), never as success.
pub async fn catch<F: Future>(fut: F) -> Result<F::Output, String> {
    AssertUnwindSafe(fut).catch_unwind().await.map_err(panic_message)
}

/// The message of a panic payload.
pub fn panic_message(p: Box<dyn Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map_or_else(|| "panic".to_owned(), |s| (*s).to_owned()),
    }
}

/// Log panics through `tracing` (with their location), besides the
/// default hook's stderr line, so they reach the daemon's log format.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        tracing::error!(panic = msg, %location, thread = std::thread::current().name().unwrap_or("?"), "a task panicked");
        default(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        assert_eq!(catch(async { 7 }).await, Ok(7));
        let r: Result<(), String> = catch(async { panic!("boom {}", 1) }).await;
        assert_eq!(r, Err("boom 1".to_owned()));
        let r: Result<(), String> = catch(async { std::panic::panic_any(3u8) }).await;
        assert_eq!(r, Err("panic".to_owned()));
    }
}
