//! placeholder, replaced by the node implementation.
#![forbid(unsafe_code)]
