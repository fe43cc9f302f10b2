//! SQLite statements of the operator controls and record history (see `store/controls.rs`).

use sqlx::Row;
use uuid::Uuid;

use super::SqliteStore;
use crate::store::StoreResult;
use crate::store::controls::{
    BatchRow, ChangeRow, HistoryAttempt, KeptResponse, Pause, PauseTarget, ResponseRow,
};

/// Text SQLite may hold as bytes that are not UTF-8 (an application wrote it), read lossily.
fn lossy(row: &sqlx::sqlite::SqliteRow, i: usize) -> Result<Option<String>, sqlx::Error> {
    Ok(row
        .try_get::<Option<Vec<u8>>, _>(i)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

impl SqliteStore {
    pub(crate) async fn pauses(&self) -> StoreResult<Vec<Pause>> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT team_id, object_type, actor, since FROM prism_pauses ORDER BY team_id, object_type",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, o, a, s)| Pause::from_stored(t, o, a, s))
            .collect())
    }

    pub(crate) async fn pause(&self, target: &PauseTarget, actor: &str) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let added = sqlx::query(
            "INSERT INTO prism_pauses (team_id, object_type, actor) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&target.team_id)
        .bind(target.stored_type())
        .bind(actor)
        .execute(&mut **tx)
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
        let mut tx = self.begin_write().await?;
        // A team's resume (object type NULL) lifts the team and every lane of it.
        let lifted: Vec<(String, String, String, String)> = sqlx::query_as(
            "DELETE FROM prism_pauses WHERE team_id IN (SELECT value FROM json_each(?1))
               AND (?2 IS NULL OR object_type = ?2)
             RETURNING team_id, object_type, actor, since",
        )
        .bind(serde_json::to_string(&target.team_ids()).expect("names serialise"))
        .bind(target.object_type.map(|t| t.as_str()))
        .fetch_all(&mut **tx)
        .await?;
        let lifted: Vec<Pause> = lifted
            .into_iter()
            .map(|(t, o, a, s)| Pause::from_stored(t, o, a, s))
            .collect();
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
        let done = self
            .write_one(
                sqlx::query(
                    "UPDATE prism_batches SET lease_owner = NULL, lease_expires_at = NULL
                     WHERE id = ?1 AND lease_owner = ?2 AND state = 'open'",
                )
                .bind(batch.to_string())
                .bind(owner),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn keep_responses(&self, kept: &[KeptResponse]) -> StoreResult<()> {
        let packed: Vec<(String, String, String, Option<&str>)> = kept
            .iter()
            .map(|k| {
                (
                    k.record_id.to_string(),
                    k.batch_id.to_string(),
                    serde_json::to_string(&k.rows).expect("serialises"),
                    k.record.as_deref(),
                )
            })
            .collect();
        // A replayed answer repeats what is kept already: the first stays.
        self.write_one(
            sqlx::query(
                "INSERT INTO prism_responses (record_id, batch_id, row_ids, record)
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                        json_extract(value, '$[2]'), json_extract(value, '$[3]')
                 FROM json_each(?1) WHERE true
                 ON CONFLICT DO NOTHING",
            )
            .bind(serde_json::to_string(&packed).expect("serialises")),
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn purge_responses(&self, before: Uuid) -> StoreResult<u64> {
        let done = self
            .write_one(
                sqlx::query("DELETE FROM prism_responses WHERE batch_id < ?1")
                    .bind(before.to_string()),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// The record's rows in id order, and its first enqueue time (Unix seconds).
    pub(crate) async fn history_rows(
        &self,
        record: Uuid,
    ) -> StoreResult<(Vec<ChangeRow>, Option<f64>)> {
        let rows = sqlx::query(
            "SELECT id, state, CAST(object_type AS BLOB), CAST(operation AS BLOB), CAST(team_id AS BLOB),
                    attempts, enqueued_at, completed_at, last_error_code, last_error_message,
                    CAST(substr(CAST(patch AS BLOB), 1, 65536) AS BLOB),
                    (julianday(enqueued_at) - 2440587.5) * 86400.0
             FROM prism_outbox INDEXED BY prism_outbox_record WHERE record_id = ?1 ORDER BY id",
        )
        .bind(record.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut first: Option<f64> = None;
        let mut changes = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Some(t) = r.try_get::<Option<f64>, _>(11)? {
                first = Some(first.map_or(t, |f| f.min(t)));
            }
            changes.push(ChangeRow {
                id: r.try_get(0)?,
                state: r.try_get(1)?,
                object_type: lossy(r, 2)?.unwrap_or_default(),
                operation: lossy(r, 3)?.unwrap_or_default(),
                team_id: lossy(r, 4)?.unwrap_or_default(),
                attempts: r.try_get(5)?,
                enqueued_at: r.try_get(6)?,
                completed_at: r.try_get(7)?,
                last_error_code: r.try_get(8)?,
                last_error_message: r.try_get(9)?,
                patch: lossy(r, 10)?,
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
        let rows = sqlx::query(
            "SELECT id, idempotency_key, state, created_at, completed_at, parent_id, items
             FROM prism_batches WHERE id >= ?1 AND instr(items, ?2) > 0 ORDER BY id",
        )
        .bind(since.to_string())
        .bind(format!("\"r\":\"{record}\""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .filter_map(|r| {
                let id: String = match r.try_get(0) {
                    Ok(id) => id,
                    Err(e) => return Some(Err(e.into())),
                };
                let id = Uuid::parse_str(&id).ok()?;
                Some(batch_row(r, id))
            })
            .collect()
    }

    pub(crate) async fn history_attempts(
        &self,
        batches: &[Uuid],
    ) -> StoreResult<Vec<(Uuid, HistoryAttempt)>> {
        let ids: Vec<String> = batches.iter().map(Uuid::to_string).collect();
        let rows = sqlx::query(
            "SELECT batch_id, attempt, finished_at, http_status, outcome, detail, replay, duration_ms, owner
             FROM prism_batch_attempts
             WHERE batch_id IN (SELECT value FROM json_each(?1)) ORDER BY batch_id, attempt",
        )
        .bind(serde_json::to_string(&ids).expect("serialises"))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let Ok(batch) = Uuid::parse_str(&r.try_get::<String, _>(0)?) else {
                continue;
            };
            out.push((
                batch,
                HistoryAttempt {
                    attempt: r.try_get(1)?,
                    at: r.try_get(2)?,
                    http_status: r.try_get(3)?,
                    outcome: r.try_get(4)?,
                    detail: r.try_get(5)?,
                    replay: r.try_get::<i64, _>(6)? != 0,
                    duration_ms: r.try_get(7)?,
                    owner: r.try_get(8)?,
                },
            ));
        }
        Ok(out)
    }

    pub(crate) async fn history_responses(
        &self,
        record: Uuid,
        batches: &[Uuid],
    ) -> StoreResult<Vec<ResponseRow>> {
        let ids: Vec<String> = batches.iter().map(Uuid::to_string).collect();
        let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT batch_id, row_ids, record, stored_at FROM prism_responses
             WHERE batch_id IN (SELECT value FROM json_each(?1)) AND record_id = ?2
             ORDER BY batch_id",
        )
        .bind(serde_json::to_string(&ids).expect("serialises"))
        .bind(record.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(batch, rows, record, at)| {
                let batch = Uuid::parse_str(&batch).ok()?;
                let rows = serde_json::from_str(&rows).unwrap_or_default();
                Some((batch, rows, record, at))
            })
            .collect())
    }
}

fn batch_row(r: &sqlx::sqlite::SqliteRow, id: Uuid) -> StoreResult<BatchRow> {
    Ok(BatchRow {
        id,
        idempotency_key: r.try_get(1)?,
        state: r.try_get(2)?,
        created_at: r.try_get(3)?,
        completed_at: r.try_get(4)?,
        parent_id: r.try_get(5)?,
        items: lossy(r, 6)?.unwrap_or_default(),
    })
}

/// One `prism_audit` entry, in the caller's transaction.
async fn audit(
    tx: &mut super::WriteTx,
    actor: &str,
    action: &str,
    filter: &str,
    rows: u64,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO prism_audit (actor, action, filter, rows) VALUES (?1, ?2, ?3, ?4)")
        .bind(actor)
        .bind(action)
        .bind(filter)
        .bind(i64::try_from(rows).unwrap_or(i64::MAX))
        .execute(&mut ***tx)
        .await?;
    Ok(())
}
