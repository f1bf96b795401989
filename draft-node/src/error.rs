//! The draft node's errors: [`Error`] for startup and serving, [`GenError`] for why one
//! generation failed (mapped to HTTP in exactly one place, `http::error`).

/// Startup and serving failures of the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings could not be loaded or are invalid (the message names the key).
    #[error("invalid settings: {0}")]
    Settings(String),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] edgespec_runtime::tls::TlsError),
    /// Loading the draft model or its tokenizer failed.
    #[error("cannot load the draft model: {0}")]
    LoadModel(String),
    /// Binding a listener failed.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The verify fleet serves a model whose tokenizer differs from the draft model's.
    #[error(
        "model mismatch: the draft model's tokenizer fingerprint is {draft} but the verify \
         fleet's is {fleet}; draft and target models must share one tokenizer"
    )]
    ModelMismatch {
        /// Our fingerprint.
        draft: String,
        /// The fleet's fingerprint (or the coordinator's explanation).
        fleet: String,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Why one generation could not complete. Messages are client-safe: no internals, no text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    /// The coordinator (or any verify node) stayed unreachable, silent or refusing past the
    /// deadline.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests at once on this node.
    #[error("{0}")]
    Overloaded(String),
    /// The request itself is unacceptable (found only once generation started).
    #[error("{0}")]
    InvalidRequest(String),
    /// The verify fleet's model does not match the draft model.
    #[error("{0}")]
    ModelMismatch(String),
    /// An unexpected failure on this node or the serving side.
    #[error("{0}")]
    Internal(String),
}
