//! What every edgespec node binary shares, so the coordinator, the verify node and the draft
//! node do it the same way:
//!
//! - [`settings`]: layered settings (embedded defaults → `--config` file → `EDGESPEC__*` env);
//! - [`telemetry`]: the tracing subscriber;
//! - [`shutdown`]: the Ctrl-C / SIGTERM future handed to `App::run`;
//! - [`ops`]: `/metrics`, `/healthz` and `/readyz` over HTTP from prometheus-client registries;
//! - [`tls`]: transport security between nodes (mTLS settings, certificates, endpoints, servers).
#![forbid(unsafe_code)]

pub mod ops;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use settings::{ConfigArg, SettingsError, Sources};
pub use shutdown::shutdown_signal;
pub use telemetry::{init_tracing, LogOutput};
