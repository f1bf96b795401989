//! The model crate's one error type. Variants are named after the operation that failed.

use crate::SessionId;

/// Everything that can go wrong loading, fetching or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or parsing a GGUF file failed, or it lacks a required key/tensor.
    #[error("cannot load model {path}: {reason}")]
    Load { path: String, reason: String },
    /// The architecture in the GGUF is not one we implement.
    #[error("unsupported model architecture `{0}` (supported: qwen2, llama)")]
    UnsupportedArch(String),
    /// Building the tokenizer from GGUF metadata failed.
    #[error("cannot build tokenizer: {0}")]
    Tokenizer(String),
    /// A token id outside the vocabulary. The id itself is not kept: it belongs to someone's
    /// request, and no token id may reach a log or an error message.
    #[error("a token id is outside the vocabulary (size {vocab_size})")]
    TokenOutOfVocab { vocab_size: usize },
    /// A request refers to a session the model does not hold.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// A request's start position does not fit the session's cache.
    #[error("session {session}: start {start} is beyond the {cached} cached tokens")]
    BadStart {
        session: SessionId,
        start: usize,
        cached: usize,
    },
    /// The session would exceed the model's context window.
    #[error("session {session}: {len} tokens exceed the context window of {max}")]
    ContextOverflow {
        session: SessionId,
        len: usize,
        max: usize,
    },
    /// A malformed batch (empty token list, a session twice, ...).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A candle operation failed during a forward.
    #[error("forward failed: {0}")]
    Forward(String),
    /// Downloading, assembling or verifying model files failed.
    #[error("model fetch failed: {0}")]
    Fetch(String),
    /// The model thread is gone (panicked or shut down).
    #[error("model thread is not running")]
    ThreadGone,
    /// Model code panicked on the model thread; the model is no longer served.
    #[error("model panicked: {0}")]
    Panicked(String),
    /// The requested compute device cannot be opened (e.g. CUDA in a CPU-only build).
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    /// Writing a synthetic test model failed.
    #[error("cannot write synthetic model: {0}")]
    Synthetic(String),
    /// Filesystem error with context.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Forward(e.to_string())
    }
}
