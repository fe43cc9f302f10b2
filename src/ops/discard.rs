//! `prism-sync discard`: an operator drops known-bad changes that are still waiting (`pending`
//! or `retrying`): they go `dead` with the code `discarded` and are never sent. In-flight rows
//! are never touched (their batch owns them). Each discard is written to `prism_audit`, and a
//! discarded row can be brought back like any dead row (`replay --error-code discarded`).
//!
//! Filters, preview (`--dry-run`) and confirmation work as `replay`'s.

use std::collections::HashSet;

use serde::Serialize;

use super::select::RowSelection;
use crate::model::RowState;
use crate::store::views::{RowFilter, RowSummary};
use crate::store::{Store, StoreError};

/// The code a discarded row carries.
pub const DISCARDED: &str = "discarded";

/// The states a discard takes rows from.
const WAITING: [RowState; 2] = [RowState::Pending, RowState::Retrying];

/// How many rows the preview lists.
const SAMPLE: usize = 20;

/// `prism-sync discard`'s command line.
#[derive(Debug, clap::Args)]
pub struct DiscardArgs {
    #[command(flatten)]
    pub rows: RowSelection,
    /// Every pending and retrying row (needed when no other filter is given).
    #[arg(long)]
    pub all: bool,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Who is discarding, for the audit log (default: PRISM_SYNC_ACTOR or the login name).
    #[arg(long)]
    pub actor: Option<String>,
    /// One JSON object on stdout (the preview and the question, if asked, go to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Which rows to discard: those the filter names that are still waiting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiscardFilter {
    pub ids: Vec<i64>,
    pub batch: Option<uuid::Uuid>,
    pub error_code: Option<String>,
    pub record_id: Option<uuid::Uuid>,
    pub object_type: Option<crate::model::ObjectType>,
    /// `team_id` values as stored (`''` is the default team); empty: any team.
    pub teams: Vec<String>,
    pub operation: Option<crate::model::Operation>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<time::OffsetDateTime>,
    pub all: bool,
}

impl DiscardFilter {
    pub fn from_args(args: &DiscardArgs, default_team: &str) -> DiscardFilter {
        let r = &args.rows;
        DiscardFilter {
            ids: r.ids.clone(),
            batch: r.batch,
            error_code: r.error_code.clone(),
            record_id: r.record_id,
            object_type: r.object_type,
            teams: r.teams(default_team),
            operation: r.operation,
            since: r.since,
            until: r.until,
            all: args.all,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.batch.is_none()
            && self.error_code.is_none()
            && self.record_id.is_none()
            && self.object_type.is_none()
            && self.teams.is_empty()
            && self.operation.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && !self.all
    }

    fn rows(&self) -> RowFilter {
        RowFilter {
            states: WAITING.to_vec(),
            ids: self.ids.clone(),
            batch: self.batch,
            error_code: self.error_code.clone(),
            record_id: self.record_id,
            object_type: self.object_type,
            teams: self.teams.clone(),
            operation: self.operation,
            since: self.since,
            until: self.until,
            message_contains: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error(
        "choose the rows to discard: --id, --batch, --error-code, --record-id, --object-type, --team, --operation, --since/--until, or --all"
    )]
    NoFilter,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// What a discard would do now.
#[derive(Debug, Clone, Serialize)]
pub struct DiscardPreview {
    /// Waiting rows the filter names now.
    pub rows: u64,
    /// The first of them.
    pub sample: Vec<RowSummary>,
    /// All of them: what a confirmed discard may touch.
    #[serde(skip)]
    ids: Vec<i64>,
}

/// The rows a discard of `f` would move to `dead` now.
pub async fn preview(store: &Store, f: &DiscardFilter) -> Result<DiscardPreview, DiscardError> {
    if f.is_empty() {
        return Err(DiscardError::NoFilter);
    }
    let mut tx = store.begin_ops_read().await?;
    let rows = tx.select_rows(&f.rows()).await?;
    tx.commit().await?;
    Ok(DiscardPreview {
        rows: rows.len() as u64,
        ids: rows.iter().map(|r| r.id).collect(),
        sample: rows.into_iter().take(SAMPLE).collect(),
    })
}

/// Moves the waiting rows `f` names to `dead` as `discarded`, as `actor`, with the audit entry,
/// in one transaction. Rows that were claimed meanwhile (in flight now) are left to their
/// batch. Returns how many went.
pub async fn discard(store: &Store, f: &DiscardFilter, actor: &str) -> Result<u64, DiscardError> {
    discard_in(store, f, actor, None).await
}

/// [`discard`] of the rows `previewed` showed, and only those: a change the application
/// enqueued after the operator saw the preview is left waiting, whatever the filter says now.
pub async fn discard_previewed(
    store: &Store,
    f: &DiscardFilter,
    previewed: &DiscardPreview,
    actor: &str,
) -> Result<u64, DiscardError> {
    let only: HashSet<i64> = previewed.ids.iter().copied().collect();
    discard_in(store, f, actor, Some(&only)).await
}

/// The rows `f` names (of `only`, when given) to `dead`, with the audit entry, in one write
/// transaction.
async fn discard_in(
    store: &Store,
    f: &DiscardFilter,
    actor: &str,
    only: Option<&HashSet<i64>>,
) -> Result<u64, DiscardError> {
    if f.is_empty() {
        return Err(DiscardError::NoFilter);
    }
    let mut tx = store.begin_ops_write().await?;
    let ids: Vec<i64> = tx
        .select_rows(&f.rows())
        .await?
        .iter()
        .map(|r| r.id)
        .filter(|id| only.is_none_or(|only| only.contains(id)))
        .collect();
    let message = format!("discarded by {actor}: never sent");
    let n = tx.discard(&ids, &WAITING, DISCARDED, &message).await?;
    let note = serde_json::to_string(f).expect("a filter serialises");
    tx.audit(actor, "discard", &note, n).await?;
    tx.commit().await?;
    Ok(n)
}

/// `prism-sync discard`: preview, confirmation, discard, like `replay`. With `--json`, stdout
/// carries one JSON object; the preview and the question go to `notes`. Returns the exit code:
/// 0 done (or nothing to do), 1 not confirmed.
pub async fn run(
    store: &Store,
    args: &DiscardArgs,
    default_team: &str,
    out: &mut impl std::io::Write,
    notes: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> Result<u8, DiscardError> {
    let f = DiscardFilter::from_args(args, default_team);
    let actor = super::actor(args.actor.as_deref());
    let plan = preview(store, &f).await?;
    if args.dry_run && args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"would_discard": plan.rows, "sample": plan.sample})
        )?;
        return Ok(0);
    }
    let mut shown: &mut dyn std::io::Write = if args.json { &mut *notes } else { &mut *out };
    render_preview(&plan, &mut shown)?;
    if args.dry_run {
        writeln!(shown, "dry run: nothing changed")?;
        return Ok(0);
    }
    if plan.rows == 0 {
        writeln!(shown, "nothing to discard")?;
        if args.json {
            writeln!(
                out,
                "{}",
                serde_json::json!({"discarded": 0, "actor": actor})
            )?;
        }
        return Ok(0);
    }
    let question = format!(
        "Discard these {} row(s)? They will never be sent.",
        plan.rows
    );
    if !args.yes && !super::confirm(&question, &mut shown, input)? {
        writeln!(shown, "not confirmed: nothing changed")?;
        return Ok(1);
    }
    let n = discard_previewed(store, &f, &plan, &actor).await?;
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"discarded": n, "actor": actor})
        )?;
    } else {
        writeln!(
            out,
            "discarded {n} row(s) as {actor}: dead as {DISCARDED}; bring them back with prism-sync replay --error-code {DISCARDED}"
        )?;
    }
    Ok(0)
}

pub fn render_preview(p: &DiscardPreview, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{} waiting row(s) would go dead as {DISCARDED} (never sent; rows in flight are left to their batch):",
        p.rows
    )?;
    let table: Vec<Vec<String>> = p
        .sample
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                format!("{} {}", r.object_type, r.operation),
                super::team_name(&r.team_id).to_owned(),
                r.record_id.clone(),
                r.state.clone(),
                r.attempts.to_string(),
                r.last_error_code.clone().unwrap_or_default(),
                r.enqueued_at.clone(),
            ]
        })
        .collect();
    super::table(
        out,
        &[
            "row",
            "what",
            "team",
            "record",
            "state",
            "attempts",
            "last error",
            "enqueued",
        ],
        &table,
    )?;
    if p.rows > p.sample.len() as u64 {
        writeln!(out, "  … and {} more", p.rows - p.sample.len() as u64)?;
    }
    Ok(())
}
