//! In-process integration tests: a real coordinator on 127.0.0.1:0 with scripted (no-model)
//! verify nodes and scripted draft streams.

mod admin;
mod batching;
mod failover;
mod limits;
mod methods;
mod placement;
mod restart;
mod support;
