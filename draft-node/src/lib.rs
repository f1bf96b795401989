//! The edgespec draft node: an OpenAI-compatible HTTP API in front of a small draft model, and
//! the drafting loop that proposes γ tokens per round to the coordinator over one multiplexed
//! gRPC stream, applies the verdicts and streams the committed text to the client.
//!
//! Map: [`settings`] (typed config) → [`App`] (assembly, `build`/`run`) → `http` (axum, OpenAI
//! format, SSE) → [`Node`] (admission) → `session` (one task per generation: drafting, verdicts,
//! pipelining, resync) → `engine` (batched draft forwards on the model thread) and `connection`
//! (the shared coordinator stream, reconnects, routing by session id).
#![forbid(unsafe_code)]

mod app;
mod connection;
mod engine;
pub mod error;
mod http;
mod lookup;
pub mod metrics;
mod node;
pub mod session;
pub mod settings;
mod suffix_cache;

pub use app::App;
pub use error::{Error, GenError};
pub use http::{router, ApiError};
pub use node::Node;
pub use session::{FinishReason, GenEvent, GenStats, GenerateRequest, Summary};
pub use settings::{load_settings, Settings};
