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
