//! busbar: a VILLAScontroller-compatible controller for distributed
//! co-simulation labs, speaking the VILLAS protocol on an AMQP headers
//! exchange.
//!
//! # Layout
//! - [`protocol`]: wire types: routing headers, action decoding, the status
//!   envelope. Pure; no I/O.
//! - [`state`]: the sans-IO simulator lifecycle (transition table).
//! - [`component`]: one owning task per component behind a handle; the
//!   type registry ([`component::kinds`]) with its JSON Schemas; drivers.
//! - [`bus`]: the AMQP connection supervisor: topology, consumers,
//!   reconnection, publishing.
//! - [`daemon`]: wiring and graceful shutdown.
//! - [`directory`]: the federation directory, every IC of every site as
//!   heard on the status stream.
//! - [`api`]: the HTTP API (`/api/v1`, `/metrics`).
//! - [`client`]: the client side used by the CLI (ping, monitor, actions).
//! - [`k8s`]: the Kubernetes Job simulator: pure object builders, API
//!   clients, and the task that creates, watches and deletes a Job.
//! - [`iot`]: the embedded IoT device platform run by `gateway/iot-agent`
//!   components (north API, MQTT/HTTP/AMQP south, federation, device ICs).
//! - [`sandbox`]: what a bus or HTTP request may make the daemon do (paths,
//!   environment, privileged create properties, secrets in statuses).
//! - [`serve`]: the limits every HTTP listener shares (connection cap,
//!   header timeout, JSON errors for oversized requests).
//! - [`supervise`]: a panic costs one message, never a loop.
//! - [`config`], [`store`], [`metrics`], [`telemetry`], [`http`]: the usual.
//!
//! `ARCHITECTURE.md` follows one ping from the socket to the reply, and one
//! device measure from MQTT to the federation.

pub mod amqp;
pub mod api;
pub mod auth;
pub mod bus;
pub mod client;
pub mod component;
pub mod config;
pub mod daemon;
pub mod directory;
pub mod error;
pub mod events;
pub mod http;
pub mod iot;
pub mod k8s;
pub mod metrics;
pub mod protocol;
pub mod react;
pub mod sandbox;
pub mod serve;
pub mod state;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod villas;
pub mod web;

pub use error::{Error, Result};
