//! `edgespec-draft-node --config <file>`: serves the OpenAI-compatible API until Ctrl-C/SIGTERM.

use anyhow::Context;
use clap::Parser;
use edgespec_draft_node::{load_settings, App};
use edgespec_runtime::{init_tracing, shutdown_signal, ConfigArg, LogOutput};

/// edgespec draft node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
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
    let args = Args::parse();
    let settings = load_settings(args.config.config.as_deref()).context("loading settings")?;
    let app = App::build(settings)
        .await
        .context("starting the draft node")?;
    app.run(shutdown_signal()).await?;
    Ok(())
}
