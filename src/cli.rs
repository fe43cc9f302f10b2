//! The command line: one binary, one verb per job. `main.rs` only parses and calls [`execute`].

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::{ObjectType, Operation, RowState, team_id_values};
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
    Enqueue(EnqueueArgs),
    /// Counts by state, oldest pending age, batches in flight, dead rows by error code.
    Status(StatusArgs),
    /// One row, or one batch with its key, body, attempts and outcomes.
    Inspect(InspectArgs),
    /// Requeue dead (or, with --include-retrying, waiting) rows into new batches.
    Replay(ReplayArgs),
    /// Delete finished rows older than a cutoff, and the batches no row refers to.
    Purge(PurgeArgs),
    /// Stop sending for a team or one lane of it, on every replica, until `resume`.
    Pause(PauseArgs),
    /// Lift a pause (a team's resume lifts its lanes' pauses too).
    Resume(PauseArgs),
    /// One record's timeline: its changes, the batches and keys that carried them, every attempt, the outcomes.
    History(HistoryArgs),
    /// Print the shell completion script for SHELL.
    Completions(CompletionsArgs),
    /// Print the man page, or write one page per verb into a directory.
    Man(ManArgs),
    /// A live view of the fleet: rows/s by outcome and team, batches in flight, concurrency,
    /// pauses, lag, the replicas and what each holds.
    Top(TopArgs),
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

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// JSON-lines file; `-` or nothing reads stdin.
    pub file: Option<PathBuf>,
    /// Enqueue the valid lines and report the invalid ones, instead of refusing the whole input.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// An unfinished change older than this counts as stuck (exit code 4).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub stuck_after: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often to refresh (and the span rates are measured over).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
    /// Print one snapshot (rates over one interval) and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["row_id", "batch"])))]
pub struct InspectArgs {
    /// The outbox row id.
    pub row_id: Option<i64>,
    /// A batch id instead of a row.
    #[arg(long, value_name = "BATCH_ID")]
    pub batch: Option<Uuid>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A row id (repeatable).
    #[arg(long = "id", value_name = "ROW_ID")]
    pub ids: Vec<i64>,
    /// Rows last carried by this batch.
    #[arg(long, value_name = "BATCH_ID")]
    pub batch: Option<Uuid>,
    /// Rows whose last error has this code (e.g. not_found, http_400).
    #[arg(long)]
    pub error_code: Option<String>,
    #[arg(long)]
    pub record_id: Option<Uuid>,
    #[arg(long)]
    pub object_type: Option<ObjectType>,
    /// Rows of this team (its id; the default team's rows include those with an empty team_id).
    #[arg(long, value_name = "TEAM_ID")]
    pub team: Option<String>,
    /// Only updates or only deletes.
    #[arg(long)]
    pub operation: Option<Operation>,
    /// Enqueued at or after: an RFC 3339 time or a duration ago (2h).
    #[arg(long, value_parser = ops::parse_time)]
    pub since: Option<time::OffsetDateTime>,
    /// Enqueued before: an RFC 3339 time or a duration ago.
    #[arg(long, value_parser = ops::parse_time)]
    pub until: Option<time::OffsetDateTime>,
    /// Also requeue rows waiting to retry (their attempts are reset).
    #[arg(long)]
    pub include_retrying: bool,
    /// Every dead row (needed when no other filter is given).
    #[arg(long)]
    pub all: bool,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Who is replaying, for the audit log (default: PRISM_SYNC_ACTOR or the login name).
    #[arg(long)]
    pub actor: Option<String>,
    /// One JSON object on stdout (the preview and the question, if asked, go to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PurgeState {
    Succeeded,
    Dead,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Delete rows finished longer ago than this (e.g. 7d, 12h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: std::time::Duration,
    /// Only this state (default: both succeeded and dead).
    #[arg(long)]
    pub state: Option<PurgeState>,
    /// Show what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Who is purging, for the audit log (default: PRISM_SYNC_ACTOR or the login name).
    #[arg(long)]
    pub actor: Option<String>,
    /// One JSON object on stdout (the preview and the question, if asked, go to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The team: its id, or `default` for the default team (micro.team_id).
    #[arg(long, value_name = "TEAM_ID")]
    pub team: String,
    /// Only this lane (object type) of the team.
    #[arg(long)]
    pub object_type: Option<ObjectType>,
    /// Who, for the audit log (default: PRISM_SYNC_ACTOR or the login name).
    #[arg(long)]
    pub actor: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The record's UUID, in any spelling (case, braces, hyphens, urn:uuid:).
    pub record_id: Uuid,
    /// One JSON object: {"record_id": ..., "changes": [...]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: ops::completions::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write prism-sync.1 and one prism-sync-VERB.1 per verb here instead of printing.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
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

/// A pause of a team this configuration does not know is stored all the same (the daemons may
/// be configured apart from this shell), with a note in case it is a typo.
fn note_unknown_team(settings: &Settings, team_id: &str) {
    if !team_id.is_empty() && !settings.teams.contains_key(team_id) {
        eprintln!(
            "note: team {team_id:?} is neither micro.team_id nor a [teams] entry in this configuration; the pause is stored for it anyway"
        );
    }
}

/// Runs a verb. Output goes to `out` (stdout in production); logs go to stderr.
pub async fn execute(
    cli: Cli,
    out: &mut impl Write,
    input: &mut impl BufRead,
) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Simulate(args) => {
            crate::telemetry::init_logging(&Default::default());
            let token = CancellationToken::new();
            crate::daemon::cancel_on_signals(token.clone());
            crate::sim::run_simulate((**args).clone(), token).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Demo(args) => {
            return crate::demo::run(args.clone(), out).await;
        }
        Command::Completions(args) => {
            ops::completions::completions(args.shell, out)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man(args) => {
            match &args.dir {
                Some(dir) => {
                    let pages = ops::completions::man_pages(dir)
                        .with_context(|| format!("writing man pages into {}", dir.display()))?;
                    for page in pages {
                        writeln!(out, "{}", page.display())?;
                    }
                }
                None => ops::completions::man(out)?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
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
            let store = open_store(&settings).await?;
            let report = match args.file.as_deref() {
                None => {
                    ops::enqueue::enqueue(
                        &store,
                        input,
                        settings.batch.max_patch_bytes,
                        args.skip_invalid,
                    )
                    .await
                }
                Some(p) if p.as_os_str() == "-" => {
                    ops::enqueue::enqueue(
                        &store,
                        input,
                        settings.batch.max_patch_bytes,
                        args.skip_invalid,
                    )
                    .await
                }
                Some(p) => {
                    let file = std::fs::File::open(p)
                        .with_context(|| format!("opening {}", p.display()))?;
                    ops::enqueue::enqueue(
                        &store,
                        std::io::BufReader::new(file),
                        settings.batch.max_patch_bytes,
                        args.skip_invalid,
                    )
                    .await
                }
            };
            let report = match report {
                Ok(r) => r,
                Err(e @ ops::enqueue::EnqueueError::Invalid { .. }) => {
                    bail!("{e}; nothing was enqueued (fix the line, or pass --skip-invalid)")
                }
                Err(e) => return Err(e.into()),
            };
            for (line, reason) in &report.skipped {
                writeln!(out, "skipped line {line}: {reason}")?;
            }
            writeln!(out, "enqueued {} change(s)", report.enqueued)?;
        }
        Command::Status(args) => {
            let store = open_store(&settings).await?;
            let report = ops::status::status(&store).await?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                ops::status::render(&report, out)?;
            }
            return Ok(ExitCode::from(
                report.exit_code(args.stuck_after.as_secs_f64()),
            ));
        }
        Command::Top(args) => {
            if args.interval.is_zero() {
                bail!("--interval must be above zero");
            }
            let store = open_store(&settings).await?;
            let token = CancellationToken::new();
            crate::fleet::top::stop_on_signals(token.clone());
            let options = crate::fleet::top::TopOptions {
                interval: args.interval,
                once: args.once,
                tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            };
            crate::fleet::top::command(&store, options, out, token).await?;
        }
        Command::Inspect(args) => {
            let store = open_store(&settings).await?;
            match (args.row_id, args.batch) {
                (_, Some(batch)) => {
                    let view = ops::inspect::batch(&store, batch).await?;
                    if args.json {
                        writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
                    } else {
                        ops::inspect::render_batch(&view, out)?;
                    }
                }
                (Some(id), None) => {
                    let view = ops::inspect::row(&store, id).await?;
                    if args.json {
                        writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
                    } else {
                        ops::inspect::render_row(&view, out)?;
                    }
                }
                (None, None) => bail!("give a ROW_ID or --batch BATCH_ID"),
            }
        }
        Command::Replay(args) => {
            let store = open_store(&settings).await?;
            let filter = ops::replay::ReplayFilter {
                ids: args.ids.clone(),
                batch: args.batch,
                error_code: args.error_code.clone(),
                record_id: args.record_id,
                object_type: args.object_type,
                teams: match args.team.as_deref() {
                    Some(team) if team == settings.micro.team_id || team.is_empty() => {
                        team_id_values(&settings.micro.team_id, true)
                    }
                    Some(team) => team_id_values(team, false),
                    None => Vec::new(),
                },
                operation: args.operation,
                since: args.since,
                until: args.until,
                include_retrying: args.include_retrying,
                all: args.all,
            };
            let options = ops::replay::ReplayOptions {
                dry_run: args.dry_run,
                yes: args.yes,
                json: args.json,
                actor: ops::actor(args.actor.as_deref()),
            };
            let code = ops::replay::command(
                &store,
                &filter,
                &options,
                out,
                &mut std::io::stderr(),
                input,
            )
            .await?;
            return Ok(ExitCode::from(code));
        }
        Command::Purge(args) => {
            let store = open_store(&settings).await?;
            let states = match args.state {
                Some(PurgeState::Succeeded) => vec![RowState::Succeeded],
                Some(PurgeState::Dead) => vec![RowState::Dead],
                None => vec![RowState::Succeeded, RowState::Dead],
            };
            let scope = ops::purge::scope(&store, &states, args.older_than).await?;
            let options = ops::purge::PurgeOptions {
                dry_run: args.dry_run,
                yes: args.yes,
                json: args.json,
                actor: ops::actor(args.actor.as_deref()),
            };
            let code =
                ops::purge::command(&store, &scope, &options, out, &mut std::io::stderr(), input)
                    .await?;
            return Ok(ExitCode::from(code));
        }
        Command::Pause(args) | Command::Resume(args) if args.team.trim().is_empty() => {
            bail!("--team needs a team id, or `default` for the default team")
        }
        Command::Pause(args) => {
            let store = open_store(&settings).await?;
            let target = ops::pause::target(&args.team, args.object_type, &settings.micro.team_id);
            note_unknown_team(&settings, &target.team_id);
            ops::pause::pause(&store, &target, &ops::actor(args.actor.as_deref()), out).await?;
        }
        Command::Resume(args) => {
            let store = open_store(&settings).await?;
            let target = ops::pause::target(&args.team, args.object_type, &settings.micro.team_id);
            ops::pause::resume(&store, &target, &ops::actor(args.actor.as_deref()), out).await?;
        }
        Command::History(args) => {
            let store = open_store(&settings).await?;
            let history = store.record_history(args.record_id).await?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string(&history)?)?;
            } else {
                ops::history::render(&history, out)?;
            }
        }
        Command::Simulate(_) | Command::Demo(_) | Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled above")
        }
    }
    Ok(ExitCode::SUCCESS)
}
