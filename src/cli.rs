//! The command line: one binary, one verb per job. `main.rs` only parses and calls [`execute`].

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::ops;
use crate::settings::Settings;
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "prism-sync",
    version,
    about = "Drains a transactional outbox into the Micro Prism bulk-update API: never loses a change, never applies one twice, never out of order.",
    after_help = "Configuration: built-in defaults < config/default.toml or --config < PRISM_SYNC__SECTION__KEY, DATABASE_URL, MICRO_API_KEY, MICRO_TEAM_ID, MICRO_BASE_URL."
)]
pub struct Cli {
    /// A TOML configuration file (default: config/default.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (migrates first unless --no-migrate); SIGTERM/SIGINT drain and exit 0.
    Run(RunArgs),
    /// Apply the migrations for the database in DATABASE_URL.
    Migrate,
    /// Read JSON lines {"record_id": ..., "patch": {...}} from a file or stdin into the outbox.
    Enqueue(ops::enqueue::EnqueueArgs),
    /// Counts by state, oldest pending age, batches in flight, dead rows by error code.
    Status(ops::status::StatusArgs),
    /// One row, or one batch with its key, body, attempts and outcomes.
    Inspect(ops::inspect::InspectArgs),
    /// Requeue dead (or, with --include-retrying, waiting) rows into new batches.
    Replay(ops::replay::ReplayArgs),
    /// Delete finished rows older than a cutoff, and the batches no row refers to.
    Purge(ops::purge::PurgeArgs),
    /// Find and export rows: a table, --json lines or --csv, a page at a time.
    Rows(ops::rows::RowsArgs),
    /// Move chosen pending or retrying rows to dead as `discarded`: they are never sent.
    Discard(ops::discard::DiscardArgs),
    /// List operator actions (replay, purge, discard, pause, resume, …), newest first.
    Audit(ops::audit::AuditArgs),
    /// Stop sending for a team or one lane of it, on every replica, until `resume`.
    Pause(ops::pause::PauseArgs),
    /// Lift a pause (a team's resume lifts its lanes' pauses too).
    Resume(ops::pause::PauseArgs),
    /// One record's timeline: its changes, the batches and keys that carried them, every attempt, the outcomes.
    History(ops::history::HistoryArgs),
    /// A live view of the fleet: rows/s by outcome and team, batches in flight, concurrency,
    /// pauses, lag, the replicas and what each holds.
    Top(crate::fleet::top::TopArgs),
    /// Print the shell completion script for SHELL.
    Completions(ops::completions::CompletionsArgs),
    /// Print the man page, or write one page per verb into a directory.
    Man(ops::completions::ManArgs),
    /// Serve the Micro API simulator.
    Simulate(Box<crate::sim::SimulateArgs>),
    /// The newcomer's first command: simulator + embedded SQLite + sample changes, synced live.
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Do not apply migrations at start (a separate `prism-sync migrate` owns the schema).
    #[arg(long)]
    pub no_migrate: bool,
}

fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    Settings::load(cli.config.as_deref()).context("loading configuration")
}

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    Store::connect(&settings.database).await.with_context(|| {
        format!(
            "connecting to the database {}",
            crate::store::redact_url(&settings.database.url)
        )
    })
}

/// The store for a verb that reads or writes prism-sync's tables. A database that lacks this
/// version's migrations (a `DATABASE_URL` naming the wrong database, or an upgrade not migrated
/// yet) gets one error that says so and what to do, not the SQL error of the first missing
/// table or column.
async fn open_migrated_store(settings: &Settings) -> anyhow::Result<Store> {
    let store = open_store(settings).await?;
    let current = store
        .migrations_current()
        .await
        .context("reading the database's applied migrations")?;
    if !current {
        anyhow::bail!(
            "the database {} lacks prism-sync's tables, or migrations of this version ({}): \
             run `prism-sync migrate` (or `prism-sync run`, which migrates first), or check \
             DATABASE_URL",
            crate::store::redact_url(&settings.database.url),
            env!("CARGO_PKG_VERSION")
        );
    }
    Ok(store)
}

/// Whether `e` says the command was asked wrongly (a replay or discard without any filter):
/// exit code 2, as clap gives a wrong flag, apart from 1 ("not confirmed", or a failure).
pub fn is_usage_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<ops::replay::ReplayError>(),
            Some(ops::replay::ReplayError::NoFilter)
        ) || matches!(
            cause.downcast_ref::<ops::replay::ReplayCommandError>(),
            Some(ops::replay::ReplayCommandError::Replay(
                ops::replay::ReplayError::NoFilter
            ))
        ) || matches!(
            cause.downcast_ref::<ops::discard::DiscardError>(),
            Some(ops::discard::DiscardError::NoFilter)
        )
    })
}

/// Runs a verb. Output goes to `out` (stdout in production); logs go to stderr.
pub async fn execute(
    cli: Cli,
    out: &mut impl Write,
    input: &mut impl BufRead,
) -> anyhow::Result<ExitCode> {
    if let Some(code) = execute_without_settings(&cli.command, out).await? {
        return Ok(code);
    }
    let settings = load_settings(&cli)?;
    crate::telemetry::init_logging(&settings.log);
    match cli.command {
        Command::Run(args) => {
            let token = CancellationToken::new();
            crate::daemon::cancel_on_signals(token.clone());
            crate::daemon::run(
                settings,
                crate::daemon::RunOptions {
                    no_migrate: args.no_migrate,
                },
                token,
            )
            .await?;
        }
        Command::Migrate => {
            let store = open_store(&settings).await?;
            store.migrate().await.context("applying migrations")?;
            writeln!(out, "migrations applied ({})", store.kind())?;
        }
        Command::Enqueue(args) => {
            let store = open_migrated_store(&settings).await?;
            let max_patch_bytes = settings.batch.max_patch_bytes;
            ops::enqueue::run(&store, &args, max_patch_bytes, out, input).await?;
        }
        Command::Status(args) => {
            let store = open_migrated_store(&settings).await?;
            let code = ops::status::run(&store, &args, out).await?;
            return Ok(ExitCode::from(code));
        }
        Command::Inspect(args) => {
            let store = open_migrated_store(&settings).await?;
            ops::inspect::run(&store, &args, out).await?;
        }
        Command::Replay(args) => {
            let store = open_migrated_store(&settings).await?;
            let team = &settings.micro.team_id;
            let code = ops::replay::run(&store, &args, team, out, input).await?;
            return Ok(ExitCode::from(code));
        }
        Command::Purge(args) => {
            let store = open_migrated_store(&settings).await?;
            let code = ops::purge::run(&store, &args, out, input).await?;
            return Ok(ExitCode::from(code));
        }
        Command::Rows(args) => {
            let store = open_migrated_store(&settings).await?;
            let team = &settings.micro.team_id;
            ops::rows::run(&store, &args, team, out, &mut std::io::stderr()).await?;
        }
        Command::Discard(args) => {
            let store = open_migrated_store(&settings).await?;
            let team = &settings.micro.team_id;
            let notes = &mut std::io::stderr();
            let code = ops::discard::run(&store, &args, team, out, notes, input).await?;
            return Ok(ExitCode::from(code));
        }
        Command::Audit(args) => {
            let store = open_migrated_store(&settings).await?;
            ops::audit::run(&store, &args, out).await?;
        }
        Command::Pause(args) => {
            let store = open_migrated_store(&settings).await?;
            ops::pause::run_pause(&store, &args, &settings, out).await?;
        }
        Command::Resume(args) => {
            let store = open_migrated_store(&settings).await?;
            ops::pause::run_resume(&store, &args, &settings, out).await?;
        }
        Command::History(args) => {
            let store = open_migrated_store(&settings).await?;
            ops::history::run(&store, &args, out).await?;
        }
        Command::Top(args) => {
            let store = open_migrated_store(&settings).await?;
            crate::fleet::top::run(&store, &args, out).await?;
        }
        Command::Simulate(_) | Command::Demo(_) | Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled by execute_without_settings")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The verbs that need no configuration (the simulator, the demo, completions and man pages):
/// `Some` exit code when `command` is one of them and has run.
async fn execute_without_settings(
    command: &Command,
    out: &mut impl Write,
) -> anyhow::Result<Option<ExitCode>> {
    match command {
        Command::Simulate(args) => {
            crate::telemetry::init_logging(&Default::default());
            let token = CancellationToken::new();
            crate::daemon::cancel_on_signals(token.clone());
            crate::sim::run_simulate((**args).clone(), token).await?;
        }
        Command::Demo(args) => return Ok(Some(crate::demo::run(args.clone(), out).await?)),
        Command::Completions(args) => ops::completions::completions(args.shell, out)?,
        Command::Man(args) => ops::completions::run_man(args, out)?,
        _ => return Ok(None),
    }
    Ok(Some(ExitCode::SUCCESS))
}
