//! Postgres statements of the operator controls and record history (see `store/controls.rs`).

use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::PgStore;
use crate::store::StoreResult;
use crate::store::controls::{
    BatchRow, ChangeRow, HistoryAttempt, KeptResponse, Pause, PauseTarget, ResponseRow,
};

/// A `timestamptz` column as RFC 3339 text in UTC, the form SQLite stores.
macro_rules! utc {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

impl PgStore {
    pub(crate) async fn pauses(&self) -> StoreResult<Vec<Pause>> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(concat!(
            "SELECT team_id, object_type, actor, ",
            utc!("since"),
            " FROM prism_pauses ORDER BY team_id, object_type"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, o, a, s)| Pause::from_stored(t, o, a, s))
            .collect())
    }

    pub(crate) async fn pause(&self, target: &PauseTarget, actor: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let added = sqlx::query(
            "INSERT INTO prism_pauses (team_id, object_type, actor) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&target.team_id)
        .bind(target.stored_type())
        .bind(actor)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        audit(&mut tx, actor, "pause", &target.audit_filter(), added).await?;
        tx.commit().await?;
        Ok(added > 0)
    }

    pub(crate) async fn resume(
        &self,
        target: &PauseTarget,
        actor: &str,
    ) -> StoreResult<Vec<Pause>> {
        let mut tx = self.pool.begin().await?;
        // A team's resume (object type NULL) lifts the team and every lane of it.
        let lifted: Vec<(String, String, String, String)> = sqlx::query_as(concat!(
            "DELETE FROM prism_pauses WHERE team_id = ANY($1) AND ($2::text IS NULL OR object_type = $2)
             RETURNING team_id, object_type, actor, ",
            utc!("since")
        ))
        .bind(target.team_ids())
        .bind(target.object_type.map(|t| t.as_str()))
        .fetch_all(&mut *tx)
        .await?;
        let lifted: Vec<Pause> = lifted
            .into_iter()
            .map(|(t, o, a, s)| Pause::from_stored(t, o, a, s))
            .collect();
        if !lifted.is_empty() {
            super::ops::notify_claimers(&mut tx).await?;
        }
        audit(
            &mut tx,
            actor,
            "resume",
            &target.audit_filter(),
            lifted.len() as u64,
        )
        .await?;
        tx.commit().await?;
        Ok(lifted)
    }

    pub(crate) async fn hand_back(&self, owner: &str, batch: Uuid) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE prism_batches SET lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND lease_owner = $2 AND state = 'open'",
        )
        .bind(batch)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn keep_responses(&self, kept: &[KeptResponse]) -> StoreResult<()> {
        // A replayed answer repeats what is kept already: the first stays.
        sqlx::query(
            "INSERT INTO prism_responses (record_id, batch_id, row_ids, record)
             SELECT u.record_id, u.batch_id,
                    ARRAY(SELECT jsonb_array_elements_text(u.row_ids::jsonb)::bigint), u.record
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
                  AS u(record_id, batch_id, row_ids, record)
             ON CONFLICT DO NOTHING",
        )
        .bind(kept.iter().map(|k| k.record_id).collect::<Vec<_>>())
        .bind(kept.iter().map(|k| k.batch_id).collect::<Vec<_>>())
        .bind(
            kept.iter()
                .map(|k| serde_json::to_string(&k.rows).expect("serialises"))
                .collect::<Vec<_>>(),
        )
        .bind(kept.iter().map(|k| k.record.clone()).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn purge_responses(&self, before: Uuid) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM prism_responses WHERE batch_id < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The record's rows in id order, and its first enqueue time (Unix seconds).
    pub(crate) async fn history_rows(
        &self,
        record: Uuid,
    ) -> StoreResult<(Vec<ChangeRow>, Option<f64>)> {
        let rows = sqlx::query(concat!(
            "SELECT id, state, object_type, operation, team_id, attempts::bigint, ",
            utc!("enqueued_at"),
            ", ",
            utc!("completed_at"),
            ", last_error_code, last_error_message, left(patch::text, 65536),
                    extract(epoch FROM enqueued_at)::float8
             FROM prism_outbox_rows WHERE record_id = $1 ORDER BY id"
        ))
        .bind(record)
        .fetch_all(&self.pool)
        .await?;
        let mut first: Option<f64> = None;
        let mut changes = Vec::with_capacity(rows.len());
        for r in &rows {
            let t: f64 = r.try_get(11)?;
            first = Some(first.map_or(t, |f| f.min(t)));
            changes.push(ChangeRow {
                id: r.try_get(0)?,
                state: r.try_get(1)?,
                object_type: r.try_get(2)?,
                operation: r.try_get(3)?,
                team_id: r.try_get(4)?,
                attempts: r.try_get(5)?,
                enqueued_at: r.try_get(6)?,
                completed_at: r.try_get(7)?,
                last_error_code: r.try_get(8)?,
                last_error_message: r.try_get(9)?,
                patch: r.try_get(10)?,
            });
        }
        Ok((changes, first))
    }

    /// Batches created since `since` (a UUIDv7 bound on the primary key) whose items name the
    /// record.
    pub(crate) async fn history_batches(
        &self,
        record: Uuid,
        since: Uuid,
    ) -> StoreResult<Vec<BatchRow>> {
        let rows = sqlx::query(concat!(
            "SELECT id, idempotency_key, state, ",
            utc!("created_at"),
            ", ",
            utc!("completed_at"),
            ", parent_id::text, items
             FROM prism_batches WHERE id >= $1 AND strpos(items, $2) > 0 ORDER BY id"
        ))
        .bind(since)
        .bind(format!("\"r\":\"{record}\""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BatchRow {
                    id: r.try_get(0)?,
                    idempotency_key: r.try_get(1)?,
                    state: r.try_get(2)?,
                    created_at: r.try_get(3)?,
                    completed_at: r.try_get(4)?,
                    parent_id: r.try_get(5)?,
                    items: r.try_get(6)?,
                })
            })
            .collect()
    }

    pub(crate) async fn history_attempts(
        &self,
        batches: &[Uuid],
    ) -> StoreResult<Vec<(Uuid, HistoryAttempt)>> {
        let rows = sqlx::query(concat!(
            "SELECT batch_id, attempt::bigint, ",
            utc!("finished_at"),
            ", http_status::bigint, outcome, detail, replay, duration_ms::bigint, owner
             FROM prism_batch_attempts WHERE batch_id = ANY($1) ORDER BY batch_id, attempt"
        ))
        .bind(batches)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    HistoryAttempt {
                        attempt: r.try_get(1)?,
                        at: r.try_get(2)?,
                        http_status: r.try_get(3)?,
                        outcome: r.try_get(4)?,
                        detail: r.try_get(5)?,
                        replay: r.try_get(6)?,
                        duration_ms: r.try_get(7)?,
                        owner: r.try_get(8)?,
                    },
                ))
            })
            .collect()
    }

    pub(crate) async fn history_responses(
        &self,
        record: Uuid,
        batches: &[Uuid],
    ) -> StoreResult<Vec<ResponseRow>> {
        let rows: Vec<ResponseRow> = sqlx::query_as(concat!(
            "SELECT batch_id, row_ids, record, ",
            utc!("stored_at"),
            " FROM prism_responses WHERE batch_id = ANY($1) AND record_id = $2 ORDER BY batch_id"
        ))
        .bind(batches)
        .bind(record)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// One `prism_audit` entry, in the caller's transaction.
async fn audit(
    tx: &mut Transaction<'static, Postgres>,
    actor: &str,
    action: &str,
    filter: &str,
    rows: u64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO prism_audit (actor, action, filter, rows) VALUES ($1, $2, $3::jsonb, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(filter)
    .bind(i64::try_from(rows).unwrap_or(i64::MAX))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
