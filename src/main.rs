//! The `prism-sync` binary: parse the command line, run the verb, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = prism_sync::cli::Cli::parse();
    let mut stdout = std::io::stdout();
    let mut stdin = std::io::stdin().lock();
    match prism_sync::cli::execute(cli, &mut stdout, &mut stdin).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if prism_sync::cli::is_usage_error(&e) {
                // As clap does for a wrong flag: the command was not run as written.
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
