//! The edgespec coordinator: the draft nodes' gRPC streams, the verify-node registry,
//! placement (on-prem first, cloud burst), cross-site batching, the network-aware γ controller,
//! failover and the admin HTTP API.
//!
//! Shape: [`core::Core`] is the whole state as a plain struct with synchronous methods (unit
//! tested directly); one actor task owns it; the gRPC and HTTP edges talk to the actor through a
//! bounded command channel. [`App`] binds the listeners and runs everything.
#![forbid(unsafe_code)]

mod actor;
mod admin;
mod app;
pub mod batching;
pub mod core;
mod error;
mod grpc;
mod https;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod registry;
mod settings;

pub use app::App;
pub use error::Error;
pub use policy::{Policy, PolicyPatch};
pub use settings::{load_settings, Settings, DEFAULT_TOML};
