//! `prism-sync inspect ROW_ID` and `inspect --batch BATCH_ID`: everything known about one row or
//! one batch: its key, its stored request body, each HTTP attempt and each row's outcome.

use uuid::Uuid;

pub use crate::store::views::{AttemptView, BatchView, RowView};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no outbox row with id {0}")]
    NoRow(i64),
    #[error("no batch with id {0}")]
    NoBatch(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `prism-sync inspect`'s command line.
#[derive(Debug, clap::Args)]
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

#[derive(Debug, thiserror::Error)]
pub enum InspectCommandError {
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("give a ROW_ID or --batch BATCH_ID")]
    NothingChosen,
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// `prism-sync inspect`: one batch (`--batch`) or one row, as text or JSON.
pub async fn run(
    store: &Store,
    args: &InspectArgs,
    out: &mut impl std::io::Write,
) -> Result<(), InspectCommandError> {
    match (args.row_id, args.batch) {
        (_, Some(id)) => {
            let view = batch(store, id).await?;
            if args.json {
                writeln!(out, "{}", pretty(&view))?;
            } else {
                render_batch(&view, out)?;
            }
        }
        (Some(id), None) => {
            let view = row(store, id).await?;
            if args.json {
                writeln!(out, "{}", pretty(&view))?;
            } else {
                render_row(&view, out)?;
            }
        }
        (None, None) => return Err(InspectCommandError::NothingChosen),
    }
    Ok(())
}

/// A view as `--json` prints it.
fn pretty(view: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(view).expect("a view serialises")
}

pub async fn row(store: &Store, id: i64) -> Result<RowView, InspectError> {
    store.row(id).await?.ok_or(InspectError::NoRow(id))
}

pub async fn batch(store: &Store, id: Uuid) -> Result<BatchView, InspectError> {
    store.batch(id).await?.ok_or(InspectError::NoBatch(id))
}

pub fn render_row(r: &RowView, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    writeln!(out, "outbox row {}", r.id)?;
    writeln!(out, "  record:        {} {}", r.object_type, r.record_id)?;
    writeln!(
        out,
        "  change:        {} for team {}",
        r.operation,
        super::team_name(&r.team_id)
    )?;
    writeln!(
        out,
        "  state:         {} after {} attempt(s)",
        r.state, r.attempts
    )?;
    writeln!(out, "  enqueued:      {}", o(&r.enqueued_at))?;
    writeln!(out, "  next attempt:  {}", o(&r.next_attempt_at))?;
    writeln!(out, "  completed:     {}", o(&r.completed_at))?;
    writeln!(out, "  last batch:    {}", o(&r.batch_id))?;
    writeln!(
        out,
        "  last error:    {} {}",
        o(&r.last_error_code),
        r.last_error_message.clone().unwrap_or_default()
    )?;
    writeln!(out, "  patch:         {}", o(&r.patch))?;
    if let Some(b) = &r.batch_id {
        writeln!(
            out,
            "\n  the batch that last carried it: prism-sync inspect --batch {b}"
        )?;
    }
    if r.state == "dead" {
        writeln!(
            out,
            "  requeue it once the cause is fixed: prism-sync replay --id {} --dry-run",
            r.id
        )?;
    }
    Ok(())
}

pub fn render_batch(b: &BatchView, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "batch {} ({} {}, team {})",
        b.id,
        b.object_type,
        b.operation,
        super::team_name(&b.team_id)
    )?;
    writeln!(out, "  idempotency key: {}", b.idempotency_key)?;
    writeln!(
        out,
        "  state:           {} after {} counted attempt(s)",
        b.state, b.attempts
    )?;
    writeln!(out, "  items / rows:    {} / {}", b.item_count, b.row_count)?;
    writeln!(out, "  created:         {}", b.created_at)?;
    writeln!(out, "  completed:       {}", o(&b.completed_at))?;
    if b.state == "open" {
        writeln!(out, "  next attempt:    {}", o(&b.next_attempt_at))?;
        writeln!(
            out,
            "  lease:           {} until {}",
            o(&b.lease_owner),
            o(&b.lease_expires_at)
        )?;
    }
    if let Some(p) = &b.parent_id {
        writeln!(out, "  split from:      {p}")?;
    }
    if !b.children.is_empty() {
        writeln!(out, "  split into:      {}", b.children.join(", "))?;
    }
    writeln!(
        out,
        "  last answer:     {} {}",
        b.last_status.map_or("-".into(), |s| s.to_string()),
        o(&b.last_error)
    )?;
    render_attempts(b, out)?;
    writeln!(out, "\n  rows:")?;
    let rows: Vec<Vec<String>> = b
        .rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.record_id.clone(),
                r.state.clone(),
                r.attempts.to_string(),
                format!(
                    "{} {}",
                    o(&r.last_error_code),
                    r.last_error_message.clone().unwrap_or_default()
                ),
            ]
        })
        .collect();
    super::table(
        out,
        &["row", "record", "state", "attempts", "last error"],
        &rows,
    )?;
    writeln!(
        out,
        "\n  request body ({} bytes, sent as stored on every attempt):",
        serde_json::to_string(&b.body).map_or(0, |s| s.len())
    )?;
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&b.body).unwrap_or_default()
    )?;
    Ok(())
}

/// Each HTTP try of the batch.
fn render_attempts(b: &BatchView, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, "\n  HTTP attempts:")?;
    let rows: Vec<Vec<String>> = b
        .http_attempts
        .iter()
        .map(|a| {
            vec![
                a.attempt.to_string(),
                a.finished_at.clone(),
                a.http_status.map_or("-".into(), |s| s.to_string()),
                a.outcome.clone(),
                if a.replay {
                    "replay".into()
                } else {
                    String::new()
                },
                format!("{}ms", a.duration_ms),
                a.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    super::table(
        out,
        &["#", "at", "status", "outcome", "", "took", "detail"],
        &rows,
    )?;
    Ok(())
}
