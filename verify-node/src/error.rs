//! The crate's one error type: what can stop the verify node from starting or serving.
//! Per-session problems are not errors here; they are answered as `SessionError`s.

use edgespec_model::ModelError;

/// Starting or running the verify node failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings could not be read, or a value is invalid.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// The target model could not be loaded.
    #[error("cannot load the target model {path}: {source}")]
    LoadModel {
        /// The GGUF path.
        path: String,
        /// Why.
        #[source]
        source: ModelError,
    },
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] edgespec_runtime::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Building the reflection service failed.
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    /// The gRPC server stopped with an error.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The batcher (or the model behind it) has stopped: the node is shutting down.
    #[error("the verify node is shutting down")]
    Stopped,
    /// In-flight work did not finish within the shutdown grace period.
    #[error("shutdown: in-flight batches did not finish within {0:?}")]
    ShutdownTimeout(std::time::Duration),
}
