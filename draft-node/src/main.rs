//! `edgespec-draft-node --config <file>`: serves the OpenAI-compatible API until Ctrl-C/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use edgespec_draft_node::{load_settings, App};
use tracing_subscriber::EnvFilter;

/// edgespec draft node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML settings file (overrides the built-in defaults; EDGESPEC__SECTION__KEY overrides both).
    #[arg(long, env = "EDGESPEC_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists: size candle's pool to this process's CPU affinity.
    edgespec_model::configure_cpu_threads();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let settings = load_settings(args.config.as_deref()).context("loading settings")?;
    let app = App::build(settings)
        .await
        .context("starting the draft node")?;
    app.run(shutdown_signal()).await?;
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
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
