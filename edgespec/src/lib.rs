//! `edgespec` library half: the pieces the operator CLI is built from — the local cluster, a
//! small OpenAI-API client, the link emulator and the benchmark harness.
#![forbid(unsafe_code)]

pub mod bench;
pub mod chaos;
pub mod client;
pub mod cluster;
pub mod linkemu;
pub mod procs;
pub mod reference;
