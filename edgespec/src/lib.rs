//! `edgespec` library half: the pieces the operator CLI is built from.
#![forbid(unsafe_code)]

pub mod linkemu;
