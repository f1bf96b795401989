//! The edgespec wire protocol (`edgespec.v1`): generated prost/tonic code in [`pb`], and the
//! conversions between wire messages and validated domain types in [`domain`].
//!
//! Only this crate and the gRPC edges of the nodes know prost types. Everything behind an edge
//! works on [`domain`] values, which are valid by construction: `TryFrom` rejects malformed
//! messages with a typed [`ProtocolError`] that says what was wrong.
#![forbid(unsafe_code)]

pub mod auth;
pub mod domain;
mod error;

pub use error::ProtocolError;

/// Generated code for package `edgespec.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("edgespec.v1");
}

/// Encoded `FileDescriptorSet` of the protocol, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("edgespec_v1_descriptor");
