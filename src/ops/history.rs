//! `prism-sync history RECORD_ID`: one record's timeline, read from the outbox, the stored
//! batches (every batch whose items carried the record, found by their UUIDv7 ids from the
//! record's first change on), their attempts, and the answers kept for it while
//! `history.keep_responses` is on. Also the retention of those kept answers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use clap::Args;
use uuid::Uuid;

use super::human_age;
use crate::store::{RecordHistory, Store};

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The record's UUID, in any spelling (case, braces, hyphens, urn:uuid:).
    pub record_id: Uuid,
    /// One JSON object: {"record_id": ..., "changes": [...]}.
    #[arg(long)]
    pub json: bool,
}

/// `prism-sync history RECORD_ID`: the timeline as a table, or one JSON object.
pub async fn run(
    store: &Store,
    args: &HistoryArgs,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let history = store.record_history(args.record_id).await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&history)?)?;
    } else {
        render(&history, out)?;
    }
    Ok(())
}

/// The readable view: each change, then each batch that carried it and its attempts.
pub fn render(h: &RecordHistory, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "record {}: {} change(s) in the outbox",
        h.record_id,
        h.changes.len()
    )?;
    if h.changes.is_empty() {
        writeln!(
            out,
            "  none: never enqueued, or purged (retention.succeeded / retention.dead, prism-sync purge)"
        )?;
    }
    for c in &h.changes {
        writeln!(out)?;
        let team = if c.team == "default" {
            String::new()
        } else {
            format!(" (team {})", c.team)
        };
        writeln!(
            out,
            "#{} {} {}{team}: {} after {} attempt(s); enqueued {}{}",
            c.id,
            c.object_type,
            c.operation,
            c.state,
            c.attempts,
            c.enqueued_at.as_deref().unwrap_or("?"),
            c.completed_at
                .as_deref()
                .map(|t| format!(", finished {t}"))
                .unwrap_or_default()
        )?;
        if let Some(code) = &c.last_error_code {
            writeln!(
                out,
                "  last error: {code}: {}",
                c.last_error_message.as_deref().unwrap_or("")
            )?;
        }
        if c.batches.is_empty() {
            writeln!(out, "  no batch carried it yet")?;
        }
        for b in &c.batches {
            writeln!(
                out,
                "  batch {} key {} ({}, {} item(s){}), created {}",
                b.batch_id,
                b.idempotency_key,
                b.state,
                b.items,
                b.parent_id
                    .as_deref()
                    .map(|p| format!(", split from {p}"))
                    .unwrap_or_default(),
                b.created_at.as_deref().unwrap_or("?")
            )?;
            for a in &b.attempts {
                writeln!(
                    out,
                    "    attempt {} at {}: {} {}{} in {}{}",
                    a.attempt,
                    a.at,
                    a.http_status
                        .map(|s| format!("HTTP {s}"))
                        .unwrap_or_else(|| "no answer".into()),
                    a.outcome,
                    if a.replay { " (idempotent replay)" } else { "" },
                    human_age(a.duration_ms as f64 / 1000.0),
                    a.detail
                        .as_deref()
                        .map(|d| format!(": {}", crate::batch::truncate(d, 200)))
                        .unwrap_or_default()
                )?;
            }
            if let Some(r) = &b.response {
                let record = r
                    .record
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "(no record returned, or too large to keep)".into());
                writeln!(out, "    the API returned (kept {}): {record}", r.stored_at)?;
            }
        }
    }
    Ok(())
}

/// Deletes kept answers older than `retention` every `every`, until `stop`. Runs whether or
/// not `history.keep_responses` is on, so that answers kept before it was turned off still go.
pub async fn response_retention_loop(
    store: Store,
    retention: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        match store.purge_responses(retention).await {
            Ok(0) => {}
            Ok(n) => info!(responses = n, "retention deleted kept API answers"),
            Err(e) => {
                warn!(error = %e, "deleting old kept API answers failed; trying again next interval")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {},
        }
    }
}
