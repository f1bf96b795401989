//! What every edgespec node binary shares, so the coordinator, the verify node and the draft
//! node do it the same way: transport security between nodes ([`tls`]).
#![forbid(unsafe_code)]

pub mod tls;
