//! Wire types of the VILLAS controller protocol: routing headers, action
//! messages and the status envelope. Pure data and parsing; no I/O.

pub mod action;
pub mod headers;
pub mod status;

pub use action::{ActionName, ActionRequest, Rejection, ReplyTo, When, decode};
pub use headers::{Addressed, Filter, RoutingKeys};
pub use status::{DaemonInfo, ErrorInfo};

/// `content_type` of every message busbar publishes.
pub const CONTENT_TYPE: &str = "application/json";
/// `content_encoding` of every message busbar publishes.
pub const CONTENT_ENCODING: &str = "utf-8";
