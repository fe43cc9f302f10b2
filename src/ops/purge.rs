//! `prism-sync purge` and the retention schedule inside `run`: deletes terminal rows finished
//! before a cutoff in small chunks (no long locks on a live outbox), then the batches no row
//! refers to. Every purge that deletes anything is written to `prism_audit` (action `purge`;
//! the schedule's actor is `retention`).
//!
//! A chunk's ids are chosen first and deleted after, and the `DELETE` itself checks again that
//! each row is still terminal, in a purged state and finished before the cutoff: a row that an
//! operator replayed in between (back to `pending`) is kept, on both engines.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::RowState;
use crate::settings::RetentionSettings;
use crate::store::views::{PurgeAudit, PurgeCut};
use crate::store::{Store, StoreError};

const CHUNK: i64 = 2000;

/// What to purge: rows in `states` (terminal ones only) finished before `cutoff`.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeScope {
    /// `succeeded` and/or `dead`; others are never purged.
    pub states: Vec<&'static str>,
    /// As given (`7d`), for the audit entry.
    pub older_than: String,
    /// The database's clock minus `older_than`, fixed when the purge was planned, in the form
    /// the engine stores (SQLite text; an RFC 3339 time on Postgres).
    pub cutoff: String,
}

impl PurgeScope {
    fn cut(&self) -> PurgeCut<'_> {
        PurgeCut {
            states: &self.states,
            cutoff: &self.cutoff,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    pub rows: u64,
    pub batches: u64,
}

/// What a purge would delete now.
#[derive(Debug, Clone, Serialize)]
pub struct PurgePreview {
    pub rows: i64,
    pub by_state: BTreeMap<String, i64>,
    /// Finished batches older than the cutoff that no row will refer to any more.
    pub batches: i64,
    pub cutoff: String,
}

/// Fixes the cutoff for rows in `states` finished more than `older_than` ago, by the
/// database's clock.
pub async fn scope(
    store: &Store,
    states: &[RowState],
    older_than: Duration,
) -> Result<PurgeScope, StoreError> {
    let states = states
        .iter()
        .filter(|s| matches!(s, RowState::Succeeded | RowState::Dead))
        .map(|s| s.as_str())
        .collect();
    let cutoff = store.purge_cutoff(older_than).await?;
    Ok(PurgeScope {
        states,
        older_than: humantime::format_duration(older_than).to_string(),
        cutoff,
    })
}

/// Counts what [`purge`] of `scope` would delete now.
pub async fn preview(store: &Store, scope: &PurgeScope) -> Result<PurgePreview, StoreError> {
    let (by_state, batches) = store.purge_counts(scope.cut()).await?;
    Ok(PurgePreview {
        rows: by_state.iter().map(|(_, n)| n).sum(),
        by_state: by_state.into_iter().collect(),
        batches,
        cutoff: scope.cutoff.clone(),
    })
}

/// Deletes what `scope` names, chunk by chunk, and records it in `prism_audit` as `actor`
/// (one entry, whose `rows` grows with each chunk's own transaction; none if nothing went).
pub async fn purge(
    store: &Store,
    scope: &PurgeScope,
    actor: &str,
) -> Result<PurgeReport, StoreError> {
    let mut report = PurgeReport::default();
    let mut audit = audit(actor, scope);
    if scope.states.is_empty() {
        return Ok(report);
    }
    loop {
        let ids = finished_before(store, scope, CHUNK).await?;
        report.rows += store
            .delete_finished_rows(scope.cut(), &ids, &mut audit)
            .await?;
        if (ids.len() as i64) < CHUNK {
            break;
        }
    }
    loop {
        let deleted = store
            .delete_orphan_batches(&scope.cutoff, CHUNK, &mut audit)
            .await?;
        report.batches += deleted;
        if (deleted as i64) < CHUNK {
            break;
        }
    }
    Ok(report)
}

/// Up to `limit` ids of rows `scope` names, read now: a hint for [`delete_rows`], which checks
/// each again.
pub async fn finished_before(
    store: &Store,
    scope: &PurgeScope,
    limit: i64,
) -> Result<Vec<i64>, StoreError> {
    store.finished_before(scope.cut(), limit).await
}

/// Deletes those of `ids` (from [`finished_before`], perhaps a while ago) that `scope` still
/// names, as `actor`: one chunk of [`purge`], on its own.
pub async fn delete_chosen(
    store: &Store,
    scope: &PurgeScope,
    ids: &[i64],
    actor: &str,
) -> Result<u64, StoreError> {
    store
        .delete_finished_rows(scope.cut(), ids, &mut audit(actor, scope))
        .await
}

/// The audit entry of one purge as `actor`, written with its first deletion and grown with each
/// after (its `batches` count too).
fn audit(actor: &str, scope: &PurgeScope) -> PurgeAudit {
    PurgeAudit {
        actor: actor.to_owned(),
        id: None,
        filter: serde_json::json!({
            "older_than": scope.older_than,
            "states": scope.states,
            "cutoff": scope.cutoff,
            "batches": 0,
        })
        .to_string(),
    }
}

/// Deletes rows in `states` finished more than `older_than` ago, and the batches left with no
/// row, as `actor`: [`scope`] then [`purge`], with no preview (the retention schedule).
pub async fn purge_older_than(
    store: &Store,
    states: &[RowState],
    older_than: Duration,
    actor: &str,
) -> Result<PurgeReport, StoreError> {
    let scope = scope(store, states, older_than).await?;
    purge(store, &scope, actor).await
}

/// The actor of the retention schedule's purges in `prism_audit`.
pub const RETENTION_ACTOR: &str = "retention";

/// Runs the configured retention every `retention.interval` until `stop`.
pub async fn retention_loop(store: Store, retention: RetentionSettings, stop: CancellationToken) {
    loop {
        for (state, age) in [
            (RowState::Succeeded, retention.succeeded),
            (RowState::Dead, retention.dead),
        ] {
            let Some(age) = age else { continue };
            match purge_older_than(&store, &[state], age, RETENTION_ACTOR).await {
                Ok(r) if r.rows + r.batches > 0 => {
                    info!(
                        state = state.as_str(),
                        rows = r.rows,
                        batches = r.batches,
                        "retention purged finished rows"
                    )
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "retention purge failed; trying again next interval"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retention.interval) => {},
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PurgeState {
    Succeeded,
    Dead,
}

/// `prism-sync purge`'s command line.
#[derive(Debug, clap::Args)]
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

/// `prism-sync purge` from its command line: the cutoff fixed now, then [`command`].
pub async fn run(
    store: &Store,
    args: &PurgeArgs,
    out: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> Result<u8, PurgeCommandError> {
    let states = match args.state {
        Some(PurgeState::Succeeded) => vec![RowState::Succeeded],
        Some(PurgeState::Dead) => vec![RowState::Dead],
        None => vec![RowState::Succeeded, RowState::Dead],
    };
    let scope = scope(store, &states, args.older_than).await?;
    let options = PurgeOptions {
        dry_run: args.dry_run,
        yes: args.yes,
        json: args.json,
        actor: super::actor(args.actor.as_deref()),
    };
    command(store, &scope, &options, out, &mut std::io::stderr(), input).await
}

/// How `prism-sync purge` runs.
#[derive(Debug, Clone)]
pub struct PurgeOptions {
    pub dry_run: bool,
    pub yes: bool,
    pub json: bool,
    pub actor: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeCommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// `prism-sync purge`, shaped like `replay`: preview, `--dry-run`, confirmation unless `--yes`,
/// then the purge of exactly what was previewed (same cutoff). With `--json`, stdout carries one
/// JSON object and the preview and question go to `notes` (stderr). Returns the exit code: 0
/// done (or nothing to do), 1 not confirmed.
pub async fn command(
    store: &Store,
    scope: &PurgeScope,
    o: &PurgeOptions,
    out: &mut impl std::io::Write,
    notes: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> Result<u8, PurgeCommandError> {
    let preview = preview(store, scope).await?;
    if o.dry_run && o.json {
        writeln!(out, "{}", serde_json::json!({ "would_purge": preview }))?;
        return Ok(0);
    }
    let mut shown: &mut dyn std::io::Write = if o.json { &mut *notes } else { &mut *out };
    render_preview(&preview, &mut shown)?;
    if o.dry_run {
        writeln!(shown, "dry run: nothing changed")?;
        return Ok(0);
    }
    if preview.rows + preview.batches == 0 {
        writeln!(shown, "nothing to purge")?;
        if o.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string(&PurgeReport::default()).expect("serialises")
            )?;
        }
        return Ok(0);
    }
    let question = format!(
        "Delete these {} row(s) and {} batch(es)?",
        preview.rows, preview.batches
    );
    if !o.yes && !super::confirm(&question, &mut shown, input)? {
        writeln!(shown, "not confirmed: nothing changed")?;
        return Ok(1);
    }
    let report = purge(store, scope, &o.actor).await?;
    if o.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"rows": report.rows, "batches": report.batches, "actor": o.actor})
        )?;
    } else {
        writeln!(
            out,
            "purged {} row(s) and {} batch(es) as {}",
            report.rows, report.batches, o.actor
        )?;
    }
    Ok(0)
}

pub fn render_preview(p: &PurgePreview, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let by_state: Vec<String> = p
        .by_state
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    let by_state = if by_state.is_empty() {
        String::new()
    } else {
        format!(" ({})", by_state.join(", "))
    };
    writeln!(
        out,
        "{} row(s) finished before {} would be deleted{by_state}, and {} batch(es) no row would refer to any more",
        p.rows, p.cutoff, p.batches
    )
}
