//! `prism-sync purge` and the retention schedule inside `run`: deletes terminal rows older than a
//! cutoff in small chunks (no long locks on a live outbox), then the batches no row refers to.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::RowState;
use crate::settings::RetentionSettings;
use crate::store::{Store, StoreError, StoreKind};

const CHUNK: i64 = 2000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    pub rows: u64,
    pub batches: u64,
}

/// Deletes rows in `states` (terminal ones only) completed more than `older_than` ago.
pub async fn purge(
    store: &Store,
    states: &[RowState],
    older_than: Duration,
) -> Result<PurgeReport, StoreError> {
    let states: Vec<&str> = states
        .iter()
        .filter(|s| matches!(s, RowState::Succeeded | RowState::Dead))
        .map(|s| s.as_str())
        .collect();
    let mut report = PurgeReport::default();
    if states.is_empty() {
        return Ok(report);
    }
    let secs = older_than.as_secs_f64();
    match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => {
            let states_json = serde_json::to_string(&states).expect("serialises");
            loop {
                let done = sqlx::query(
                    "DELETE FROM prism_outbox WHERE id IN (
                       SELECT id FROM prism_outbox INDEXED BY prism_outbox_completed
                       WHERE completed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ?1))
                         AND state IN (SELECT value FROM json_each(?2))
                       LIMIT ?3)",
                )
                .bind(secs)
                .bind(&states_json)
                .bind(CHUNK)
                .execute(pool)
                .await?;
                report.rows += done.rows_affected();
                if done.rows_affected() < CHUNK as u64 {
                    break;
                }
            }
            loop {
                let ids: Vec<String> = sqlx::query_scalar(
                    "DELETE FROM prism_batches WHERE id IN (
                       SELECT b.id FROM prism_batches b
                       WHERE b.state <> 'open'
                         AND b.completed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ?1))
                         AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id)
                       LIMIT ?2)
                     RETURNING id",
                )
                .bind(secs)
                .bind(CHUNK)
                .fetch_all(pool)
                .await?;
                sqlx::query("DELETE FROM prism_batch_attempts WHERE batch_id IN (SELECT value FROM json_each(?1))")
                    .bind(serde_json::to_string(&ids).expect("serialises"))
                    .execute(pool)
                    .await?;
                report.batches += ids.len() as u64;
                if (ids.len() as i64) < CHUNK {
                    break;
                }
            }
        }
        StoreKind::Postgres(pool) => {
            loop {
                let done = sqlx::query(
                    "DELETE FROM prism_outbox WHERE id IN (
                       SELECT id FROM prism_outbox
                       WHERE completed_at < now() - make_interval(secs => $1) AND state = ANY($2)
                       LIMIT $3)",
                )
                .bind(secs)
                .bind(&states)
                .bind(CHUNK)
                .execute(pool)
                .await?;
                report.rows += done.rows_affected();
                if done.rows_affected() < CHUNK as u64 {
                    break;
                }
            }
            loop {
                let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
                    "DELETE FROM prism_batches WHERE id IN (
                       SELECT b.id FROM prism_batches b
                       WHERE b.state <> 'open' AND b.completed_at < now() - make_interval(secs => $1)
                         AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id)
                       LIMIT $2)
                     RETURNING id",
                )
                .bind(secs)
                .bind(CHUNK)
                .fetch_all(pool)
                .await?;
                sqlx::query("DELETE FROM prism_batch_attempts WHERE batch_id = ANY($1)")
                    .bind(&ids)
                    .execute(pool)
                    .await?;
                report.batches += ids.len() as u64;
                if (ids.len() as i64) < CHUNK {
                    break;
                }
            }
        }
    }
    Ok(report)
}

/// Runs the configured retention every `retention.interval` until `stop`.
pub async fn retention_loop(store: Store, retention: RetentionSettings, stop: CancellationToken) {
    loop {
        for (state, age) in [
            (RowState::Succeeded, retention.succeeded),
            (RowState::Dead, retention.dead),
        ] {
            let Some(age) = age else { continue };
            match purge(&store, &[state], age).await {
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
