//! `edgespec` library half: the pieces the operator CLI is built from — the local cluster, a
//! small OpenAI-API client, and the link emulator.
#![forbid(unsafe_code)]

pub mod client;
pub mod cluster;
pub mod linkemu;
