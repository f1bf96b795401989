//! `edgespec-coordinator`: loads settings, binds, serves until Ctrl-C or SIGTERM.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use edgespec_coordinator::{load_settings, App};
use edgespec_runtime::{init_tracing, shutdown_signal, ConfigArg, LogOutput};

/// The edgespec coordinator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArg,
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
    init_tracing("info", LogOutput::Stdout);
    let settings = load_settings(args.config.config.as_deref()).context("loading settings")?;
    let app = App::build(settings)
        .await
        .context("starting the coordinator")?;
    app.run(shutdown_signal())
        .await
        .context("running the coordinator")?;
    Ok(())
}
