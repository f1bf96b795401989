//! `edgespec-coordinator`: loads settings, binds, serves until Ctrl-C or SIGTERM.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use edgespec_coordinator::{load_settings, App};
use std::path::PathBuf;

/// The edgespec coordinator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML) layered over the built-in defaults.
    #[arg(long, env = "EDGESPEC_CONFIG")]
    config: Option<PathBuf>,
    /// Print the built-in default settings and exit.
    #[arg(long)]
    print_defaults: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_defaults {
        print!("{}", edgespec_coordinator::DEFAULT_TOML);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let settings = load_settings(args.config.as_deref()).context("loading settings")?;
    let app = App::build(settings)
        .await
        .context("starting the coordinator")?;
    app.run(shutdown_signal())
        .await
        .context("running the coordinator")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
