//! The edgespec verify node: the target model behind the `edgespec.v1.Verifier` gRPC service.
//!
//! It keeps a KV cache per session, verifies the draft blocks of many sessions (and of concurrent
//! calls) in ONE batched forward, applies the greedy or lossless-sampling acceptance rule, keeps
//! KV memory within a budget by evicting idle sessions, and registers with coordinators.
//!
//! Map: [`settings`] (typed config) → [`App`] (wiring, lifecycle) → `service` (gRPC edge) →
//! [`batcher`] (one task, one forward per batch) → [`sessions`] (per-session state and checks) and
//! [`verdict`] (acceptance rule, per-round RNG); [`load`] (load reports); [`metrics`] (Prometheus metrics); `registration`
//! (coordinator edge).
#![forbid(unsafe_code)]

mod app;
pub mod batcher;
mod error;
pub mod load;
pub mod metrics;
mod registration;
mod service;
pub mod sessions;
pub mod settings;
pub mod verdict;

pub use app::{App, NodeFacts};
pub use error::Error;
pub use settings::{load_settings, Settings};
