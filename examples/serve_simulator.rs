//! Serves the Prism API simulator with the same flags as `prism-sync simulate`, until Ctrl-C.
//!
//! `cargo run --example serve_simulator -- --listen 127.0.0.1:8787 --api-key K --team T`

use clap::Parser;
use prism_sync::sim::{SimulateArgs, run_simulate};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Serve the Prism API simulator")]
struct Cli {
    #[command(flatten)]
    simulate: SimulateArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    run_simulate(cli.simulate, shutdown).await
}
