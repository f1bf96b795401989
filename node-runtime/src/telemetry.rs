//! Logging setup: one `tracing` subscriber per process, filtered by `RUST_LOG` (e.g.
//! `RUST_LOG=edgespec_coordinator=debug`) or else by the binary's default level.

use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Standard output (the node binaries: their output is their log).
    Stdout,
    /// Standard error (the operator CLI, whose standard output is the result).
    Stderr,
}

/// Installs the process's subscriber: `RUST_LOG` if set and valid, else `default_filter`
/// (e.g. `"info"`). Call once, first thing in `main`.
pub fn init_tracing(default_filter: &str, output: LogOutput) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match output {
        LogOutput::Stdout => builder.init(),
        LogOutput::Stderr => builder.with_writer(std::io::stderr).init(),
    }
}
