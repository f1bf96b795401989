//! Test support for the whole workspace, in one place and never in a node's production build.
//!
//! - [`scripted`]: a **no-model verify node** ([`scripted::ScriptedVerifier`], a real tonic
//!   `Verifier` whose "target" is a deterministic function) and **scripted draft streams**
//!   ([`scripted::DraftClient`]) with the one session driver ([`scripted::DraftClient::drive`])
//!   that the coordinator's tests, its overhead benchmark and the server benchmark's replayed
//!   drafts all use.
//! - [`harness`]: the start/stop harness of in-process servers ([`harness::Running`]) and
//!   bounded polling ([`harness::eventually`]).
//! - [`fleet`]: waiting until a coordinator's admin API lists a fleet as up.
//! - [`stats`]: median and quantiles for the benchmarks.
//! - [`wire`]: verify items built by hand.
//! - With the `tls` feature: [`ca`], a throwaway certificate authority for the mTLS tests.
//! - With the `model` feature (links candle through `edgespec-model`): [`tiny`], tiny synthetic
//!   GGUF models in a temporary folder, and [`reference`], the one target-only greedy decoder
//!   every exactness check compares with.
//!
//! The node libraries use this crate only as a dev-dependency; the `edgespec` binary depends on
//! it for its benchmarks and chaos soak, which drive synthetic fleets.
#![forbid(unsafe_code)]

#[cfg(feature = "tls")]
pub mod ca;
pub mod fleet;
pub mod harness;
#[cfg(feature = "model")]
pub mod reference;
pub mod scripted;
/// Order statistics (`median`, `quantile`), from `specdec` so production tools share them.
pub mod stats {
    pub use edgespec_specdec::stats::{median, quantile};
}
#[cfg(feature = "model")]
pub mod tiny;
pub mod wire;
