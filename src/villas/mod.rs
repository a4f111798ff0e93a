//! VILLASnode and VILLASrelay, as busbar sees them: the HTTP APIs it polls
//! and acts through (`api`), and the pure rules that turn what they report
//! into gateway components (`reconcile`). The drivers are
//! `component::driver::villas`.
//!
//! What the Python VILLAScontroller gets wrong and busbar does not
//! (`../shared/reference/villas-node-relay.md` §2.8): gateway actions reach
//! VILLASnode (`POST /api/v2/node/{uuid}/{action}`, no body, no
//! `Content-Length`, only to a node the API just showed, never `stop` to a
//! stopped node); vanished nodes and sessions say `gone` once; a relay with
//! no session is `running`, not `paused`; every request has a timeout; no
//! upstream failure reaches the bus consumer.

pub mod api;
pub mod reconcile;

/// The uuid a VILLASnode or VILLASrelay manager adopts when its config sets
/// none: the instance's own (`status.uuid`, the relay's `uuid`), as
/// VILLAScontroller does. `None` when the API does not answer within a
/// second (the daemon then uses a generated uuid it keeps).
pub async fn instance_uuid(relay: bool, api_url: &str) -> Option<uuid::Uuid> {
    let api = api::Api::new(api_url, std::time::Duration::from_secs(1)).ok()?;
    let v = if relay { api.relay().await.ok()? } else { api.status().await.ok()? };
    reconcile::uuid_of(&v)
}
