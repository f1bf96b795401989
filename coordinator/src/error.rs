//! The crate's error type and its mapping to gRPC status (the one place it happens; the HTTP
//! mapping lives in `admin.rs`).

use crate::policy::PolicyError;
use edgespec_proto::ProtocolError;

/// Everything that can fail in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or validating settings failed.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] edgespec_runtime::tls::TlsError),
    /// Binding a listener failed.
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Requested address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    ServeGrpc(#[from] tonic::transport::Error),
    /// The admin HTTP server failed.
    #[error("admin HTTP server failed: {0}")]
    ServeHttp(std::io::Error),
    /// A draft node's model differs from the verify fleet's.
    #[error("model mismatch: draft {draft} vs verify fleet {fleet}")]
    DraftMismatch {
        /// Draft fingerprint.
        draft: String,
        /// Fleet fingerprint.
        fleet: String,
    },
    /// A verify node's model differs from the verify fleet's.
    #[error(
        "model mismatch: verifier {node} has fingerprint {got} but the verify fleet has {fleet}; \
         all verify nodes of one coordinator must serve the same model"
    )]
    VerifierMismatch {
        /// Node id.
        node: String,
        /// Its fingerprint.
        got: String,
        /// Fleet fingerprint.
        fleet: String,
    },
    /// A registration was malformed.
    #[error("invalid verifier registration: {0}")]
    InvalidRegistration(String),
    /// A draft stream broke the protocol.
    #[error("invalid draft stream: {0}")]
    DraftProtocol(String),
    /// A wire message failed validation.
    #[error("invalid message: {0}")]
    Protocol(#[from] ProtocolError),
    /// A policy update was refused.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// An admin request named an unknown verifier.
    #[error("unknown verifier `{0}`")]
    UnknownVerifier(String),
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            Error::DraftMismatch { .. } | Error::VerifierMismatch { .. } => {
                Status::failed_precondition(msg)
            }
            Error::InvalidRegistration(_) | Error::DraftProtocol(_) | Error::Protocol(_) => {
                Status::invalid_argument(msg)
            }
            Error::Policy(_) => Status::invalid_argument(msg),
            Error::UnknownVerifier(_) => Status::not_found(msg),
            Error::ShuttingDown => Status::unavailable(msg),
            Error::Settings(_)
            | Error::Tls(_)
            | Error::Bind { .. }
            | Error::ServeGrpc(_)
            | Error::ServeHttp(_) => Status::internal("internal error"),
        }
    }
}
