//! The operator commands' statements on SQLite (see `store/ops_api.rs` for what each means).
//! Reads run on the pool; every write runs on the writer connection under the gate
//! ([`SqliteStore::begin_write`]). Text an application wrote is read as bytes (`CAST(… AS
//! BLOB)`) and shown lossily: SQLite keeps whatever it was given.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;
use uuid::Uuid;

use super::SqliteStore;
use crate::model::RowState;
use crate::store::StoreResult;
use crate::store::views::{
    AttemptView, AuditEntry, BatchView, Change, DeadCodeCount, NewerRow, OpenBatch, Page,
    PurgeAudit, PurgeCut, RowFilter, RowSummary, RowView, StateCount,
};

/// Whether the row `$t` counts as applied by the API: `succeeded`, or `dead` as
/// `unreadable_response` (answered 2xx, its body unreadable). Replay judges a dead row against
/// the newer rows of its record that count as applied, and purge keeps those (below).
macro_rules! applied {
    ($t:literal) => {
        concat!(
            "(",
            $t,
            ".state = 'succeeded' OR (",
            $t,
            ".state = 'dead' AND ",
            $t,
            ".last_error_code = 'unreadable_response'))"
        )
    };
}

/// A row `$t` that counts as applied is kept while an older row of its record is dead: that
/// row may still be replayed, and replay judges it against the newer changes the API applied
/// (rebased or left dead as superseded). With the newer change gone, a replay would put the
/// record back to older values. The row goes once the dead row is purged (or replayed and
/// through).
macro_rules! no_dead_before {
    ($t:literal) => {
        concat!(
            "NOT (",
            applied!($t),
            " AND EXISTS (
             SELECT 1 FROM prism_outbox AS d
             WHERE d.record_id = ",
            $t,
            ".record_id AND d.id < ",
            $t,
            ".id
               AND d.state = 'dead' AND d.object_type = ",
            $t,
            ".object_type
               AND d.team_id = ",
            $t,
            ".team_id))"
        )
    };
}

const ROW_COLUMNS: &str =
    "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB), state, attempts,
    enqueued_at, next_attempt_at, completed_at, batch_id, last_error_code, last_error_message,
    CAST(substr(CAST(patch AS BLOB), 1, 65536) AS BLOB), CAST(operation AS BLOB), CAST(team_id AS BLOB)
    FROM prism_outbox";

const SUMMARY_COLUMNS: &str = "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB),
    CAST(operation AS BLOB), CAST(team_id AS BLOB), state, attempts, last_error_code,
    last_error_message, enqueued_at, completed_at, batch_id FROM prism_outbox";

/// The text form SQLite timestamp columns use (`strftime('%Y-%m-%dT%H:%M:%fZ')`).
fn sqlite_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Text as bytes (any column an application wrote), shown lossily.
fn lossy(r: &SqliteRow, i: usize) -> Result<Option<String>, sqlx::Error> {
    Ok(r.try_get::<Option<Vec<u8>>, _>(i)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain values serialise")
}

fn states(from: &[RowState]) -> String {
    json(&from.iter().map(|s| s.as_str()).collect::<Vec<_>>())
}

impl SqliteStore {
    pub(crate) async fn count_rows(&self) -> StoreResult<Vec<StateCount>> {
        let rows = sqlx::query(
            "SELECT CAST(object_type AS BLOB), state, count(*), CAST(team_id AS BLOB), CAST(operation AS BLOB)
             FROM prism_outbox GROUP BY 1, 2, 4, 5",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StateCount {
                    object_type: lossy(r, 0)?.unwrap_or_default(),
                    state: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                    rows: r.try_get(2)?,
                    team_id: lossy(r, 3)?.unwrap_or_default(),
                    operation: lossy(r, 4)?.unwrap_or_default(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    pub(crate) async fn dead_codes(&self) -> StoreResult<Vec<DeadCodeCount>> {
        let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
            "SELECT COALESCE(last_error_code, 'unknown'), count(*), max(last_error_message)
             FROM prism_outbox WHERE state = 'dead' GROUP BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(code, rows, sample_message)| DeadCodeCount {
                code,
                rows,
                sample_message,
            })
            .collect())
    }

    pub(crate) async fn open_batches(&self, limit: u32) -> StoreResult<Vec<OpenBatch>> {
        let rows = sqlx::query(
            "SELECT id, idempotency_key, object_type, item_count, row_count, attempts,
                    (julianday('now') - julianday(created_at)) * 86400.0, lease_owner,
                    max(0.0, (julianday(next_attempt_at) - julianday('now')) * 86400.0), last_status, last_error,
                    team_id, operation,
                    lease_owner IS NOT NULL AND (lease_expires_at IS NULL
                        OR lease_expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             FROM prism_batches WHERE state = 'open' ORDER BY created_at LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OpenBatch {
                    id: r.try_get(0)?,
                    idempotency_key: r.try_get(1)?,
                    object_type: r.try_get(2)?,
                    items: r.try_get(3)?,
                    rows: r.try_get(4)?,
                    attempts: r.try_get(5)?,
                    age_seconds: r.try_get(6)?,
                    lease_owner: r.try_get(7)?,
                    next_attempt_in_seconds: r.try_get(8)?,
                    last_status: r.try_get(9)?,
                    last_error: r.try_get(10)?,
                    team: r.try_get(11)?,
                    operation: r.try_get(12)?,
                    lease_lapsed: r.try_get(13)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    pub(crate) async fn audit_entries(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> StoreResult<Vec<AuditEntry>> {
        let rows: Vec<(i64, String, String, String, String, i64)> = sqlx::query_as(
            "SELECT id, at, actor, action, filter, rows FROM prism_audit
             WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2",
        )
        .bind(before_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at, actor, action, filter, rows)| AuditEntry {
                id,
                at,
                actor,
                action,
                filter,
                rows,
            })
            .collect())
    }

    pub(crate) async fn row(&self, id: i64) -> StoreResult<Option<RowView>> {
        let found = sqlx::query(sqlx::AssertSqlSafe(format!("{ROW_COLUMNS} WHERE id = ?1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.as_ref().map(row_view).transpose()?)
    }

    pub(crate) async fn batch(&self, id: Uuid) -> StoreResult<Option<BatchView>> {
        let key = id.to_string();
        let Some(h) = sqlx::query(
            "SELECT id, idempotency_key, object_type, state, attempts, item_count, row_count, created_at,
                    completed_at, next_attempt_at, lease_owner, lease_expires_at, parent_id, last_status,
                    last_error, body, items, operation, team_id
             FROM prism_batches WHERE id = ?1",
        )
        .bind(&key)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let attempts = sqlx::query(
            "SELECT attempt, owner, finished_at, http_status, outcome, detail, replay, duration_ms
             FROM prism_batch_attempts WHERE batch_id = ?1 ORDER BY attempt",
        )
        .bind(&key)
        .fetch_all(&self.pool)
        .await?;
        let children: Vec<String> =
            sqlx::query_scalar("SELECT id FROM prism_batches WHERE parent_id = ?1")
                .bind(&key)
                .fetch_all(&self.pool)
                .await?;
        let row_ids = BatchView::row_ids(&h.try_get::<String, _>(16)?);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ROW_COLUMNS} WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
        )))
        .bind(json(&row_ids))
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(BatchView {
            id: h.try_get(0)?,
            idempotency_key: h.try_get(1)?,
            object_type: h.try_get(2)?,
            state: h.try_get(3)?,
            attempts: h.try_get(4)?,
            item_count: h.try_get(5)?,
            row_count: h.try_get(6)?,
            created_at: h.try_get(7)?,
            completed_at: h.try_get(8)?,
            next_attempt_at: h.try_get(9)?,
            lease_owner: h.try_get(10)?,
            lease_expires_at: h.try_get(11)?,
            parent_id: h.try_get(12)?,
            last_status: h.try_get(13)?,
            last_error: h.try_get(14)?,
            body: BatchView::body_value(&h.try_get::<Vec<u8>, _>(15)?),
            operation: h.try_get(17)?,
            team_id: h.try_get(18)?,
            children,
            http_attempts: attempts
                .iter()
                .map(attempt_view)
                .collect::<Result<_, _>>()?,
            rows: rows.iter().map(row_view).collect::<Result<_, _>>()?,
        }))
    }

    pub(crate) async fn find_rows(
        &self,
        filter: &RowFilter,
        page: Page,
    ) -> StoreResult<Vec<RowSummary>> {
        let mut c = self.pool.acquire().await?;
        select_rows(&mut c, filter, page).await
    }

    pub(crate) async fn insert_changes(&self, changes: &[Change]) -> StoreResult<()> {
        const CHUNK: usize = 5000;
        let mut tx = self.begin_write().await?;
        for chunk in changes.chunks(CHUNK) {
            let packed: Vec<(String, &str, &str, &str, &str)> = chunk
                .iter()
                .map(|c| {
                    (
                        c.record_id.to_string(),
                        c.patch.as_str(),
                        c.object_type.as_str(),
                        c.operation.as_str(),
                        c.team_id.as_str(),
                    )
                })
                .collect();
            sqlx::query(
                "INSERT INTO prism_outbox (record_id, patch, object_type, operation, team_id)
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
                        json_extract(value, '$[3]'), json_extract(value, '$[4]')
                 FROM json_each(?1) ORDER BY key",
            )
            .bind(json(&packed))
            .execute(&mut **tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn purge_cutoff(&self, older_than: Duration) -> StoreResult<String> {
        Ok(sqlx::query_scalar(
            "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ?1))",
        )
        .bind(older_than.as_secs_f64())
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn purge_counts(
        &self,
        cut: PurgeCut<'_>,
    ) -> StoreResult<(Vec<(String, i64)>, i64)> {
        let states = json(cut.states);
        let by_state = sqlx::query_as(concat!(
            "SELECT state, count(*) FROM prism_outbox INDEXED BY prism_outbox_completed
             WHERE completed_at < ?1 AND state IN (SELECT value FROM json_each(?2)) AND ",
            no_dead_before!("prism_outbox"),
            " GROUP BY state"
        ))
        .bind(cut.cutoff)
        .bind(&states)
        .fetch_all(&self.pool)
        .await?;
        let batches = sqlx::query_scalar(concat!(
            "SELECT count(*) FROM prism_batches b
             WHERE b.state <> 'open' AND b.completed_at < ?1
               AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id
                                 AND (o.completed_at IS NULL OR o.completed_at >= ?1
                                      OR o.state NOT IN (SELECT value FROM json_each(?2))
                                      OR NOT ",
            no_dead_before!("o"),
            "))"
        ))
        .bind(cut.cutoff)
        .bind(&states)
        .fetch_one(&self.pool)
        .await?;
        Ok((by_state, batches))
    }

    pub(crate) async fn finished_before(
        &self,
        cut: PurgeCut<'_>,
        limit: i64,
    ) -> StoreResult<Vec<i64>> {
        Ok(sqlx::query_scalar(concat!(
            "SELECT id FROM prism_outbox INDEXED BY prism_outbox_completed
             WHERE completed_at < ?1 AND state IN (SELECT value FROM json_each(?2)) AND ",
            no_dead_before!("prism_outbox"),
            " LIMIT ?3"
        ))
        .bind(cut.cutoff)
        .bind(json(cut.states))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn delete_finished_rows(
        &self,
        cut: PurgeCut<'_>,
        ids: &[i64],
        audit: &mut PurgeAudit,
    ) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(concat!(
            "DELETE FROM prism_outbox
             WHERE id IN (SELECT value FROM json_each(?1))
               AND state IN ('succeeded', 'dead') AND state IN (SELECT value FROM json_each(?2))
               AND completed_at IS NOT NULL AND completed_at < ?3 AND ",
            no_dead_before!("prism_outbox")
        ))
        .bind(json(ids))
        .bind(json(cut.states))
        .bind(cut.cutoff)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        purge_audit(&mut tx, audit, n, 0).await?;
        tx.commit().await?;
        Ok(n)
    }

    pub(crate) async fn delete_orphan_batches(
        &self,
        cutoff: &str,
        limit: i64,
        audit: &mut PurgeAudit,
    ) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM prism_batches WHERE id IN (
               SELECT b.id FROM prism_batches b
               WHERE b.state <> 'open' AND b.completed_at < ?1
                 AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id)
               LIMIT ?2)
             RETURNING id",
        )
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?;
        sqlx::query(
            "DELETE FROM prism_batch_attempts WHERE batch_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json(&ids))
        .execute(&mut **tx)
        .await?;
        let n = ids.len() as u64;
        purge_audit(&mut tx, audit, 0, n).await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// Writes the purge's audit entry with its first deletion, and grows it with each after.
async fn purge_audit(
    c: &mut SqliteConnection,
    audit: &mut PurgeAudit,
    rows: u64,
    batches: u64,
) -> Result<(), sqlx::Error> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let (rows, batches) = (count(rows), count(batches));
    if rows + batches == 0 {
        return Ok(());
    }
    match audit.id {
        None => {
            audit.id = Some(
                sqlx::query_scalar(
                    "INSERT INTO prism_audit (actor, action, filter, rows)
                     VALUES (?1, 'purge', json_set(?2, '$.batches', ?4), ?3) RETURNING id",
                )
                .bind(&audit.actor)
                .bind(&audit.filter)
                .bind(rows)
                .bind(batches)
                .fetch_one(&mut *c)
                .await?,
            )
        }
        Some(id) => {
            sqlx::query(
                "UPDATE prism_audit SET rows = rows + ?2,
                   filter = json_set(filter, '$.batches', json_extract(filter, '$.batches') + ?3)
                 WHERE id = ?1",
            )
            .bind(id)
            .bind(rows)
            .bind(batches)
            .execute(&mut *c)
            .await?;
        }
    }
    Ok(())
}

fn row_view(r: &SqliteRow) -> Result<RowView, sqlx::Error> {
    Ok(RowView {
        id: r.try_get(0)?,
        record_id: lossy(r, 1)?.unwrap_or_default(),
        object_type: lossy(r, 2)?.unwrap_or_default(),
        state: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
        attempts: r.try_get(4)?,
        enqueued_at: r.try_get(5)?,
        next_attempt_at: r.try_get(6)?,
        completed_at: r.try_get(7)?,
        batch_id: r.try_get(8)?,
        last_error_code: r.try_get(9)?,
        last_error_message: r.try_get(10)?,
        patch: lossy(r, 11)?,
        operation: lossy(r, 12)?.unwrap_or_default(),
        team_id: lossy(r, 13)?.unwrap_or_default(),
    })
}

fn attempt_view(a: &SqliteRow) -> Result<AttemptView, sqlx::Error> {
    Ok(AttemptView {
        attempt: a.try_get(0)?,
        owner: a.try_get(1)?,
        finished_at: a.try_get(2)?,
        http_status: a.try_get(3)?,
        outcome: a.try_get(4)?,
        detail: a.try_get(5)?,
        replay: a.try_get::<i64, _>(6)? != 0,
        duration_ms: a.try_get(7)?,
    })
}

fn summary(r: &SqliteRow) -> Result<RowSummary, sqlx::Error> {
    Ok(RowSummary {
        id: r.try_get(0)?,
        record_id: lossy(r, 1)?.unwrap_or_default(),
        object_type: lossy(r, 2)?.unwrap_or_default(),
        operation: lossy(r, 3)?.unwrap_or_default(),
        team_id: lossy(r, 4)?.unwrap_or_default(),
        state: r.try_get::<Option<String>, _>(5)?.unwrap_or_default(),
        attempts: r.try_get(6)?,
        last_error_code: r.try_get(7)?,
        last_error_message: r.try_get(8)?,
        enqueued_at: r.try_get::<Option<String>, _>(9)?.unwrap_or_default(),
        completed_at: r.try_get(10)?,
        batch_id: r.try_get(11)?,
    })
}

/// `WHERE …` for `filter` and `page`: only the criteria given, so that the planner sees each
/// as it is and uses the index that serves it (see README, "rows": which filters scan).
fn push_filter(q: &mut QueryBuilder<Sqlite>, f: &RowFilter, page: Page) {
    q.push(" WHERE id > ").push_bind(page.after_id);
    match f.states.as_slice() {
        [] => {}
        // Spelled as the partial indexes spell their predicates, so that they can serve.
        [RowState::Dead] => {
            q.push(" AND state = 'dead'");
        }
        [RowState::Pending, RowState::Retrying] | [RowState::Retrying, RowState::Pending] => {
            q.push(" AND state IN ('pending', 'retrying')");
        }
        states => {
            // Closed enum values: literals, no injection possible.
            let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
            q.push(format!(" AND state IN ({})", list.join(", ")));
        }
    }
    if !f.ids.is_empty() {
        q.push(" AND id IN (SELECT value FROM json_each(")
            .push_bind(json(&f.ids))
            .push("))");
    }
    if let Some(b) = f.batch {
        q.push(" AND batch_id = ").push_bind(b.to_string());
    }
    if let Some(code) = &f.error_code {
        q.push(" AND last_error_code = ").push_bind(code.as_str());
    }
    if let Some(r) = f.record_id {
        // Stored canonical (lowercase, hyphenated) since migration 0003.
        q.push(" AND record_id = ").push_bind(r.to_string());
    }
    if let Some(t) = f.object_type {
        q.push(" AND object_type = ").push_bind(t.as_str());
    }
    if !f.teams.is_empty() {
        q.push(" AND team_id IN (SELECT value FROM json_each(")
            .push_bind(json(&f.teams))
            .push("))");
    }
    if let Some(o) = f.operation {
        q.push(" AND operation = ").push_bind(o.as_str());
    }
    if let Some(t) = f.since {
        q.push(" AND enqueued_at >= ").push_bind(sqlite_time(t));
    }
    if let Some(t) = f.until {
        q.push(" AND enqueued_at < ").push_bind(sqlite_time(t));
    }
    if let Some(text) = &f.message_contains {
        q.push(" AND instr(lower(last_error_message), lower(")
            .push_bind(text.as_str())
            .push(")) > 0");
    }
    q.push(" ORDER BY id");
    if let Some(limit) = page.limit {
        q.push(" LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

pub(crate) async fn select_rows(
    c: &mut SqliteConnection,
    f: &RowFilter,
    page: Page,
) -> StoreResult<Vec<RowSummary>> {
    let mut q = QueryBuilder::new(SUMMARY_COLUMNS);
    push_filter(&mut q, f, page);
    let rows = q.build().fetch_all(&mut *c).await?;
    Ok(rows.iter().map(summary).collect::<Result<_, _>>()?)
}

pub(crate) async fn newer_rows(
    c: &mut SqliteConnection,
    records: &[&str],
    after_id: i64,
) -> StoreResult<Vec<NewerRow>> {
    let rows = sqlx::query(concat!(
        "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB), CAST(team_id AS BLOB),
                CAST(operation AS BLOB), CASE WHEN ",
        applied!("prism_outbox"),
        " THEN 'succeeded' ELSE state END, CAST(patch AS BLOB)
         FROM prism_outbox
         WHERE record_id IN (SELECT value FROM json_each(?1)) AND id > ?2
           AND (state <> 'dead' OR ",
        applied!("prism_outbox"),
        ")
         ORDER BY id"
    ))
    .bind(json(records))
    .bind(after_id)
    .fetch_all(&mut *c)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(NewerRow {
                id: r.try_get(0)?,
                record_id: lossy(r, 1)?.unwrap_or_default(),
                object_type: lossy(r, 2)?.unwrap_or_default(),
                team_id: lossy(r, 3)?.unwrap_or_default(),
                operation: lossy(r, 4)?.unwrap_or_default(),
                state: r.try_get::<Option<String>, _>(5)?.unwrap_or_default(),
                patch: r.try_get(6)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

pub(crate) async fn patches(
    c: &mut SqliteConnection,
    ids: &[i64],
) -> StoreResult<HashMap<i64, Vec<u8>>> {
    let rows: Vec<(i64, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT id, CAST(patch AS BLOB) FROM prism_outbox WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(json(ids))
    .fetch_all(&mut *c)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, p)| Some((id, p?)))
        .collect())
}

pub(crate) async fn requeue(
    c: &mut SqliteConnection,
    as_is: &[i64],
    rebased: &[(i64, String)],
    from: &[RowState],
) -> StoreResult<u64> {
    const REQUEUE: &str = "UPDATE prism_outbox SET state = 'pending', attempts = 0,
           next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), completed_at = NULL,
           first_attempt_at = NULL";
    const STILL: &str = "state IN (SELECT value FROM json_each(?2))";
    let from = states(from);
    let mut changed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{REQUEUE} WHERE id IN (SELECT value FROM json_each(?1)) AND {STILL}"
    )))
    .bind(json(as_is))
    .bind(&from)
    .execute(&mut *c)
    .await?
    .rows_affected();
    for (id, patch) in rebased {
        changed += sqlx::query(sqlx::AssertSqlSafe(format!(
            "{REQUEUE}, patch = ?3 WHERE id = ?1 AND {STILL}"
        )))
        .bind(id)
        .bind(&from)
        .bind(patch)
        .execute(&mut *c)
        .await?
        .rows_affected();
    }
    Ok(changed)
}

pub(crate) async fn discard(
    c: &mut SqliteConnection,
    ids: &[i64],
    from: &[RowState],
    code: &str,
    message: &str,
) -> StoreResult<u64> {
    Ok(sqlx::query(
        "UPDATE prism_outbox SET state = 'dead', last_error_code = ?3, last_error_message = ?4,
                completed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE id IN (SELECT value FROM json_each(?1)) AND state IN (SELECT value FROM json_each(?2))
           AND state <> 'in_flight'",
    )
    .bind(json(ids))
    .bind(states(from))
    .bind(code)
    .bind(message)
    .execute(&mut *c)
    .await?
    .rows_affected())
}

pub(crate) async fn audit(
    c: &mut SqliteConnection,
    actor: &str,
    action: &str,
    filter: &str,
    rows: i64,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO prism_audit (actor, action, filter, rows) VALUES (?1, ?2, ?3, ?4) RETURNING id",
    )
    .bind(actor)
    .bind(action)
    .bind(filter)
    .bind(rows)
    .fetch_one(&mut *c)
    .await?)
}
