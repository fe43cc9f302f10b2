//! `prism-sync audit`: the operator actions in `prism_audit` (replay, purge, discard, and what
//! other verbs record), newest first: who, when, what, how many rows.

use serde::Serialize;

use crate::store::views::AuditEntry;
use crate::store::{Store, StoreError};

/// `prism-sync audit`'s command line.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Entries to list at most, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Only entries older than this one (the next page: the last id of the one before).
    #[arg(long, value_name = "ENTRY_ID")]
    pub before_id: Option<i64>,
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// One entry as `--json` prints it: the filter as JSON, not as text.
#[derive(Serialize)]
struct Line<'a> {
    id: i64,
    at: &'a str,
    actor: &'a str,
    action: &'a str,
    rows: i64,
    filter: serde_json::Value,
}

/// `prism-sync audit`: the entries as a table or JSON lines.
pub async fn run(
    store: &Store,
    args: &AuditArgs,
    out: &mut impl std::io::Write,
) -> Result<(), AuditError> {
    let entries = store.audit_entries(args.limit, args.before_id).await?;
    if args.json {
        for e in &entries {
            let line = Line {
                id: e.id,
                at: &e.at,
                actor: &e.actor,
                action: &e.action,
                rows: e.rows,
                filter: serde_json::from_str(&e.filter)
                    .unwrap_or_else(|_| serde_json::Value::String(e.filter.clone())),
            };
            writeln!(out, "{}", serde_json::to_string(&line).expect("serialises"))?;
        }
        return Ok(());
    }
    render(&entries, args.limit, out)?;
    Ok(())
}

fn render(
    entries: &[AuditEntry],
    limit: u32,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    if entries.is_empty() {
        return writeln!(out, "no operator actions recorded");
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.at.clone(),
                a.actor.clone(),
                a.action.clone(),
                a.rows.to_string(),
                // A replay's filter lists every row it rebased; `--json` carries all of it.
                crate::batch::truncate(&a.filter, 100),
            ]
        })
        .collect();
    super::table(
        out,
        &["id", "at", "actor", "action", "rows", "filter"],
        &rows,
    )?;
    if entries.len() == limit as usize
        && let Some(last) = entries.last()
    {
        writeln!(
            out,
            "older entries: the same command with --before-id {}",
            last.id
        )?;
    }
    Ok(())
}
