//! `edgespec-verify-node`: serves the target model to coordinators until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::Parser;
use edgespec_runtime::{init_tracing, shutdown_signal, ConfigArg, LogOutput};
use edgespec_verify_node::{load_settings, App};

/// edgespec verify node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArg,
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists: size candle's pool to this process's CPU affinity.
    edgespec_model::configure_cpu_threads();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    init_tracing("info", LogOutput::Stdout);
    let cli = Cli::parse();
    let settings = load_settings(cli.config.config.as_deref()).context("loading settings")?;
    let app = App::build(settings)
        .await
        .context("starting the verify node")?;
    app.run(shutdown_signal()).await.context("serving")?;
    Ok(())
}
