//! The operator commands' statements on Postgres (see `store/ops_api.rs` for what each means).
//! An operator's write transaction never waits for a row lock (`SKIP LOCKED`): a claim holds
//! its heads while it waits for their followers' locks, so waiting here could deadlock with it.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Postgres, QueryBuilder, Row, Transaction};
use uuid::Uuid;

use super::PgStore;
use crate::model::RowState;
use crate::store::views::{
    AttemptView, AuditEntry, BatchView, Change, DeadCodeCount, NewerRow, OpenBatch, Page,
    PurgeAudit, PurgeCut, RowFilter, RowSummary, RowView, StateCount,
};
use crate::store::{StoreError, StoreResult};

/// As in the SQLite store. Whether the row `$t` counts as applied by the API: `succeeded`, or `dead` as
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
/// through). Both probes are index ranges of the record's dead rows (claim rows, and rows that
/// died before migration 0015), not of its history.
macro_rules! no_dead_before {
    ($t:literal) => {
        concat!(
            "NOT (",
            applied!($t),
            " AND (EXISTS (
             SELECT 1 FROM prism_outbox_claims AS d
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
            ".team_id)
             OR EXISTS (
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
            ".team_id
               AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims AS dc WHERE dc.id = d.id))))"
        )
    };
}

/// The ids of the rows of batch `$b` (an expression): its claim rows, and rows stored with it
/// before migration 0015; read `prism_outbox_rows`' `batch_id` to keep those still of it.
macro_rules! batch_row_ids {
    ($b:literal) => {
        concat!(
            "SELECT c.id FROM prism_outbox_claims c WHERE c.batch_id = ",
            $b,
            " UNION ALL SELECT o.id FROM prism_outbox o WHERE o.batch_id = ",
            $b
        )
    };
}

/// The ids of rows that may have finished before `$1` (a timestamptz), through indexes: the
/// rows of batches that ended before it, the dead claim rows, and rows that finished before
/// migration 0015 (stored state, no claim row). Read their state in `prism_outbox_rows`.
macro_rules! finished_candidates {
    () => {
        "SELECT c.id FROM prism_batches b JOIN prism_outbox_claims c ON c.batch_id = b.id
         WHERE b.state <> 'open' AND b.completed_at < $1::timestamptz
         UNION ALL
         SELECT c.id FROM prism_outbox_claims c WHERE c.state = 'dead'
         UNION ALL
         SELECT o.id FROM prism_outbox o
         WHERE o.completed_at < $1::timestamptz
           AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)"
    };
}

const ROW_COLUMNS: &str = "SELECT id, record_id::text, object_type, state, attempts::bigint,
    enqueued_at::text, next_attempt_at::text, completed_at::text, batch_id::text, last_error_code,
    last_error_message, left(patch::text, 65536), operation, team_id FROM prism_outbox_rows";

/// A `timestamptz` as RFC 3339 text in UTC, the form SQLite stores: exports read alike from
/// either engine.
macro_rules! utc_text {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

const SUMMARY_COLUMNS: &str = concat!(
    "SELECT id, record_id::text, object_type, operation, team_id, state, attempts::bigint,
     last_error_code, last_error_message, ",
    utc_text!("enqueued_at"),
    ", ",
    utc_text!("completed_at"),
    ", batch_id::text FROM prism_outbox_rows"
);

fn states(from: &[RowState]) -> Vec<&'static str> {
    from.iter().map(|s| s.as_str()).collect()
}

impl PgStore {
    /// A read-only transaction with one snapshot for all its statements.
    pub(crate) async fn begin_read_only(&self) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }

    /// An operator's write transaction, holding the claim gate exclusively (see
    /// `super::CLAIM_GATE`) from its first statement to its commit.
    pub(crate) async fn begin_ops_write(&self) -> StoreResult<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{}'",
            super::CLAIM_GATE_WAIT
        )))
        .execute(&mut *tx)
        .await?;
        let gate = sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(super::CLAIM_GATE.0)
            .bind(super::CLAIM_GATE.1)
            .execute(&mut *tx)
            .await;
        if let Err(e) = gate {
            let timed_out =
                matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55P03"));
            if timed_out {
                return Err(StoreError::Invalid(format!(
                    "the daemons' claims in progress did not finish within {}: nothing was changed; try again",
                    super::CLAIM_GATE_WAIT
                )));
            }
            return Err(e.into());
        }
        sqlx::raw_sql("SET LOCAL lock_timeout TO DEFAULT")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    pub(crate) async fn count_rows(&self) -> StoreResult<Vec<StateCount>> {
        let rows: Vec<(String, String, i64, String, String)> = sqlx::query_as(
            "SELECT object_type, state, count(*), team_id, operation
             FROM prism_outbox_rows GROUP BY 1, 2, 4, 5",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(object_type, state, rows, team_id, operation)| StateCount {
                    object_type,
                    state,
                    team_id,
                    operation,
                    rows,
                },
            )
            .collect())
    }

    pub(crate) async fn dead_codes(&self) -> StoreResult<Vec<DeadCodeCount>> {
        let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
            "SELECT code, count(*), max(message) FROM (
                 SELECT COALESCE(last_error_code, 'unknown') AS code, last_error_message AS message
                 FROM prism_outbox_claims WHERE state = 'dead'
                 UNION ALL
                 SELECT COALESCE(o.last_error_code, 'unknown'), o.last_error_message
                 FROM prism_outbox o
                 WHERE o.state = 'dead'
                   AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)) d
             GROUP BY 1",
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
            "SELECT id::text, idempotency_key, object_type, item_count::bigint, row_count::bigint, attempts::bigint,
                    extract(epoch FROM now() - created_at)::float8, lease_owner,
                    greatest(0, extract(epoch FROM next_attempt_at - now()))::float8, last_status::bigint, last_error,
                    team_id, operation,
                    lease_owner IS NOT NULL AND (lease_expires_at IS NULL OR lease_expires_at <= now())
             FROM prism_batches WHERE state = 'open' ORDER BY created_at LIMIT $1",
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
        let rows: Vec<(i64, String, String, String, String, i64)> = sqlx::query_as(concat!(
            "SELECT id, ",
            utc_text!("at"),
            ", actor, action, filter::text, rows FROM prism_audit
                 WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2"
        ))
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
        let found = sqlx::query(sqlx::AssertSqlSafe(format!("{ROW_COLUMNS} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.as_ref().map(row_view).transpose()?)
    }

    pub(crate) async fn batch(&self, id: Uuid) -> StoreResult<Option<BatchView>> {
        let Some(h) = sqlx::query(
            "SELECT id::text, idempotency_key, object_type, state, attempts::bigint, item_count::bigint,
                    row_count::bigint, created_at::text, completed_at::text, next_attempt_at::text, lease_owner,
                    lease_expires_at::text, parent_id::text, last_status::bigint, last_error, body, items,
                    operation, team_id
             FROM prism_batches WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let attempts = sqlx::query(
            "SELECT attempt::bigint, owner, finished_at::text, http_status::bigint, outcome, detail,
                    replay, duration_ms::bigint
             FROM prism_batch_attempts WHERE batch_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let children: Vec<String> =
            sqlx::query_scalar("SELECT id::text FROM prism_batches WHERE parent_id = $1")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        let row_ids = BatchView::row_ids(&h.try_get::<String, _>(16)?);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ROW_COLUMNS} WHERE id = ANY($1) ORDER BY id"
        )))
        .bind(&row_ids)
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
        select_rows(&mut c, filter, page, false).await
    }

    pub(crate) async fn stored_patch_bytes(&self, patches: &[&str]) -> StoreResult<Vec<usize>> {
        let mut sizes = Vec::with_capacity(patches.len());
        for chunk in patches.chunks(5000) {
            let chunk_sizes: Vec<i64> = sqlx::query_scalar(
                "SELECT octet_length(p.patch::jsonb::text)::bigint
                 FROM unnest($1::text[]) WITH ORDINALITY AS p(patch, n) ORDER BY p.n",
            )
            .bind(chunk)
            .fetch_all(&self.pool)
            .await?;
            sizes.extend(
                chunk_sizes
                    .into_iter()
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            );
        }
        Ok(sizes)
    }

    pub(crate) async fn insert_changes(&self, changes: &[Change]) -> StoreResult<()> {
        const CHUNK: usize = 5000;
        let mut tx = self.pool.begin().await?;
        for chunk in changes.chunks(CHUNK) {
            let ids: Vec<Uuid> = chunk.iter().map(|c| c.record_id).collect();
            let patches: Vec<&str> = chunk.iter().map(|c| c.patch.as_str()).collect();
            let types: Vec<&str> = chunk.iter().map(|c| c.object_type.as_str()).collect();
            let operations: Vec<&str> = chunk.iter().map(|c| c.operation.as_str()).collect();
            let teams: Vec<&str> = chunk.iter().map(|c| c.team_id.as_str()).collect();
            sqlx::query(
                "INSERT INTO prism_outbox (record_id, patch, object_type, operation, team_id)
                 SELECT u.record_id, u.patch::jsonb, u.object_type, u.operation, u.team_id
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
                      WITH ORDINALITY AS u(record_id, patch, object_type, operation, team_id, n)
                 ORDER BY u.n",
            )
            .bind(&ids)
            .bind(&patches)
            .bind(&types)
            .bind(&operations)
            .bind(&teams)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn purge_cutoff(&self, older_than: Duration) -> StoreResult<String> {
        Ok(sqlx::query_scalar(
            "SELECT to_char((now() - make_interval(secs => $1)) AT TIME ZONE 'UTC',
                            'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .bind(older_than.as_secs_f64())
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn purge_counts(
        &self,
        cut: PurgeCut<'_>,
    ) -> StoreResult<(Vec<(String, i64)>, i64)> {
        let by_state = sqlx::query_as(concat!(
            "SELECT r.state, count(*) FROM prism_outbox_rows r WHERE r.id IN (",
            finished_candidates!(),
            ") AND r.completed_at < $1::timestamptz AND r.state = ANY($2) AND ",
            no_dead_before!("r"),
            " GROUP BY r.state"
        ))
        .bind(cut.cutoff)
        .bind(cut.states)
        .fetch_all(&self.pool)
        .await?;
        let batches = sqlx::query_scalar(concat!(
            "SELECT count(*) FROM prism_batches b
             WHERE b.state <> 'open' AND b.completed_at < $1::timestamptz
               AND NOT EXISTS (SELECT 1 FROM prism_outbox_rows o
                               WHERE o.id IN (",
            batch_row_ids!("b.id"),
            ") AND o.batch_id = b.id
                                 AND (o.completed_at IS NULL OR o.completed_at >= $1::timestamptz
                                      OR o.state <> ALL($2)
                                      OR NOT ",
            no_dead_before!("o"),
            "))"
        ))
        .bind(cut.cutoff)
        .bind(cut.states)
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
            "SELECT r.id FROM prism_outbox_rows r WHERE r.id IN (",
            finished_candidates!(),
            ") AND r.completed_at < $1::timestamptz AND r.state = ANY($2) AND ",
            no_dead_before!("r"),
            " LIMIT $3"
        ))
        .bind(cut.cutoff)
        .bind(cut.states)
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
        // With the claim gate held, as a replay or a discard: a row's state is its claim row's
        // (and its batch's), which the DELETE below does not lock, so a replay committing
        // meanwhile is kept out instead; what is deleted is finished as of this transaction.
        let mut tx = self.begin_ops_write().await?;
        let deleted: Vec<i64> = sqlx::query_scalar(concat!(
            "DELETE FROM prism_outbox WHERE id IN (
                 SELECT r.id FROM prism_outbox_rows r
                 WHERE r.id = ANY($1)
                   AND r.state IN ('succeeded', 'dead') AND r.state = ANY($2)
                   AND r.completed_at IS NOT NULL AND r.completed_at < $3::timestamptz AND ",
            no_dead_before!("r"),
            ") RETURNING id"
        ))
        .bind(ids)
        .bind(cut.states)
        .bind(cut.cutoff)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM prism_outbox_claims WHERE id = ANY($1)")
            .bind(&deleted)
            .execute(&mut *tx)
            .await?;
        let n = deleted.len() as u64;
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
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM prism_batches WHERE id IN (
               SELECT b.id FROM prism_batches b
               WHERE b.state <> 'open' AND b.completed_at < $1::timestamptz
                 AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.batch_id = b.id)
                 AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id)
               LIMIT $2)
             RETURNING id",
        )
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM prism_batch_attempts WHERE batch_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let n = ids.len() as u64;
        purge_audit(&mut tx, audit, 0, n).await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// Writes the purge's audit entry with its first deletion, and grows it with each after.
async fn purge_audit(
    c: &mut PgConnection,
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
                     VALUES ($1, 'purge', jsonb_set($2::jsonb, '{batches}', to_jsonb($4::bigint)), $3)
                     RETURNING id",
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
                "UPDATE prism_audit SET rows = rows + $2,
                   filter = jsonb_set(filter, '{batches}', to_jsonb((filter->>'batches')::bigint + $3))
                 WHERE id = $1",
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

fn row_view(r: &PgRow) -> Result<RowView, sqlx::Error> {
    Ok(RowView {
        id: r.try_get(0)?,
        record_id: r.try_get(1)?,
        object_type: r.try_get(2)?,
        state: r.try_get(3)?,
        attempts: r.try_get(4)?,
        enqueued_at: r.try_get(5)?,
        next_attempt_at: r.try_get(6)?,
        completed_at: r.try_get(7)?,
        batch_id: r.try_get(8)?,
        last_error_code: r.try_get(9)?,
        last_error_message: r.try_get(10)?,
        patch: r.try_get(11)?,
        operation: r.try_get(12)?,
        team_id: r.try_get(13)?,
    })
}

fn attempt_view(a: &PgRow) -> Result<AttemptView, sqlx::Error> {
    Ok(AttemptView {
        attempt: a.try_get(0)?,
        owner: a.try_get(1)?,
        finished_at: a.try_get(2)?,
        http_status: a.try_get(3)?,
        outcome: a.try_get(4)?,
        detail: a.try_get(5)?,
        replay: a.try_get(6)?,
        duration_ms: a.try_get(7)?,
    })
}

fn summary(r: &PgRow) -> Result<RowSummary, sqlx::Error> {
    Ok(RowSummary {
        id: r.try_get(0)?,
        record_id: r.try_get(1)?,
        object_type: r.try_get(2)?,
        operation: r.try_get(3)?,
        team_id: r.try_get(4)?,
        state: r.try_get(5)?,
        attempts: r.try_get(6)?,
        last_error_code: r.try_get(7)?,
        last_error_message: r.try_get(8)?,
        enqueued_at: r.try_get(9)?,
        completed_at: r.try_get(10)?,
        batch_id: r.try_get(11)?,
    })
}

/// `WHERE …` for `filter` and `page`: only the criteria given, so that the planner sees each
/// as it is and uses the index that serves it (see README, "rows": which filters scan).
fn push_filter(q: &mut QueryBuilder<Postgres>, f: &RowFilter, page: Page) {
    q.push(" WHERE id > ").push_bind(page.after_id);
    push_conditions(q, f);
    q.push(" ORDER BY id");
    if let Some(limit) = page.limit {
        q.push(" LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

/// The filter's criteria, each as ` AND …`. A batch, and the dead rows, are looked up through
/// their rows' ids (the view's columns are derived, and no index serves them).
fn push_conditions(q: &mut QueryBuilder<Postgres>, f: &RowFilter) {
    if !f.states.is_empty() {
        q.push(" AND state = ANY(")
            .push_bind(states(&f.states))
            .push(")");
    }
    if f.states == [RowState::Dead] {
        // Dead rows through their indexes: claim rows (`prism_outbox_claims_dead`) and rows
        // that died before migration 0015 (`prism_outbox_dead_record`).
        q.push(
            " AND id IN (SELECT c.id FROM prism_outbox_claims c WHERE c.state = 'dead'
                         UNION ALL SELECT o.id FROM prism_outbox o WHERE o.state = 'dead')",
        );
    }
    if !f.ids.is_empty() {
        q.push(" AND id = ANY(").push_bind(&f.ids).push(")");
    }
    if let Some(b) = f.batch {
        q.push(" AND id IN (SELECT c.id FROM prism_outbox_claims c WHERE c.batch_id = ")
            .push_bind(b)
            .push(" UNION ALL SELECT o.id FROM prism_outbox o WHERE o.batch_id = ")
            .push_bind(b)
            .push(") AND batch_id = ")
            .push_bind(b);
    }
    if let Some(code) = &f.error_code {
        q.push(" AND last_error_code = ").push_bind(code.as_str());
    }
    if let Some(r) = f.record_id {
        q.push(" AND record_id = ").push_bind(r);
    }
    if let Some(t) = f.object_type {
        q.push(" AND object_type = ").push_bind(t.as_str());
    }
    if !f.teams.is_empty() {
        q.push(" AND team_id = ANY(").push_bind(&f.teams).push(")");
    }
    if let Some(o) = f.operation {
        q.push(" AND operation = ").push_bind(o.as_str());
    }
    if let Some(t) = f.since {
        q.push(" AND enqueued_at >= ").push_bind(t);
    }
    if let Some(t) = f.until {
        q.push(" AND enqueued_at < ").push_bind(t);
    }
    if let Some(text) = &f.message_contains {
        q.push(" AND strpos(lower(last_error_message), lower(")
            .push_bind(text.as_str())
            .push(")) > 0");
    }
}

/// `lock`: each row is locked without waiting; a row someone else holds is left out.
pub(crate) async fn select_rows(
    c: &mut PgConnection,
    f: &RowFilter,
    page: Page,
    lock: bool,
) -> StoreResult<Vec<RowSummary>> {
    let mut q = QueryBuilder::new(SUMMARY_COLUMNS);
    push_filter(&mut q, f, page);
    let mut rows = q.build().fetch_all(&mut *c).await?;
    if lock && !rows.is_empty() {
        // The rows' outbox rows are locked without waiting (the view's outer joins cannot be
        // locked through it), and the rows read again as locked.
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        let mut again = QueryBuilder::new(SUMMARY_COLUMNS);
        again
            .push(" WHERE id IN (SELECT o.id FROM prism_outbox o WHERE o.id = ANY(")
            .push_bind(ids)
            .push(") ORDER BY o.id FOR UPDATE SKIP LOCKED)");
        push_conditions(&mut again, f);
        again.push(" ORDER BY id");
        rows = again.build().fetch_all(&mut *c).await?;
    }
    Ok(rows.iter().map(summary).collect::<Result<_, _>>()?)
}

/// `id, record_id, object_type, team_id, operation, state, patch`.
type NewerColumns = (i64, String, String, String, String, String, Option<String>);

/// `lock`: the rows are then locked without waiting and their state read again as locked: a
/// claim skips them (SKIP LOCKED) until the transaction ends. A row someone else holds is
/// being claimed or its outcome written right now (or it is gone): it reads as `in_flight`.
/// Rows in flight are not locked (they read as `in_flight` either way): their batch's outcome
/// write would wait for the operator, and the process's lease heartbeat behind it.
pub(crate) async fn newer_rows(
    c: &mut PgConnection,
    records: &[&str],
    after_id: i64,
    lock: bool,
) -> StoreResult<Vec<NewerRow>> {
    let rows: Vec<NewerColumns> = sqlx::query_as(concat!(
        "SELECT id, record_id::text, object_type, team_id, operation, CASE WHEN ",
        applied!("prism_outbox"),
        " THEN 'succeeded' ELSE state END, patch::text
             FROM prism_outbox_rows prism_outbox
             WHERE record_id = ANY($1::text[]::uuid[]) AND id > $2
               AND (state <> 'dead' OR ",
        applied!("prism_outbox"),
        ")
             ORDER BY id"
    ))
    .bind(records)
    .bind(after_id)
    .fetch_all(&mut *c)
    .await?;
    let mut newer: Vec<NewerRow> = rows
        .into_iter()
        .map(
            |(id, record_id, object_type, team_id, operation, state, patch)| NewerRow {
                id,
                record_id,
                object_type,
                team_id,
                operation,
                state,
                patch: patch.map(String::into_bytes),
            },
        )
        .collect();
    if lock {
        let ids: Vec<i64> = newer.iter().map(|n| n.id).collect();
        // The outbox rows are locked (a row's state is read from the view, which cannot be
        // locked through its outer joins), then their state read again as locked.
        let locked: HashMap<i64, String> = sqlx::query_as(concat!(
            "SELECT prism_outbox.id, CASE WHEN ",
            applied!("prism_outbox"),
            " THEN 'succeeded' ELSE state END
             FROM prism_outbox_rows prism_outbox
             WHERE prism_outbox.id IN (SELECT o.id FROM prism_outbox o WHERE o.id = ANY($1)
                                       ORDER BY o.id FOR UPDATE SKIP LOCKED)
               AND state <> 'in_flight'"
        ))
        .bind(&ids)
        .fetch_all(&mut *c)
        .await?
        .into_iter()
        .collect();
        for n in &mut newer {
            n.state = locked
                .get(&n.id)
                .cloned()
                .unwrap_or_else(|| "in_flight".into());
        }
    }
    Ok(newer)
}

pub(crate) async fn patches(
    c: &mut PgConnection,
    ids: &[i64],
) -> StoreResult<HashMap<i64, Vec<u8>>> {
    let rows: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, patch::text FROM prism_outbox WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&mut *c)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, p)| Some((id, p?.into_bytes())))
        .collect())
}

/// Tells every listening daemon, at this transaction's commit, that rows may be claimable now
/// (the channel the outbox's insert trigger notifies): an idle daemon then looks at once
/// rather than at its next, stretched, poll.
pub(crate) async fn notify_claimers(c: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(super::NOTIFY_CHANNEL)
        .execute(&mut *c)
        .await?;
    Ok(())
}

pub(crate) async fn requeue(
    c: &mut PgConnection,
    as_is: &[i64],
    rebased: &[(i64, String)],
    from: &[RowState],
) -> StoreResult<u64> {
    // A row waits again through its claim row (the claims' third source), whether or not it
    // had one: an outbox row below its lane's floor is not walked again. `prism_outbox_rows`
    // reads the claim row's state.
    let from = states(from);
    let mut ids: Vec<i64> = as_is.to_vec();
    ids.extend(rebased.iter().map(|(id, _)| *id));
    let changed: Vec<i64> = sqlx::query_scalar(
        "WITH r AS (SELECT o.id, o.team_id, o.object_type, o.record_id, v.last_error_code,
                           v.last_error_message
                    FROM prism_outbox_rows v JOIN prism_outbox o ON o.id = v.id
                    WHERE v.id = ANY($1) AND v.state = ANY($2))
         INSERT INTO prism_outbox_claims AS c (id, team_id, object_type, record_id, state, attempts,
                                               next_attempt_at, last_error_code, last_error_message)
         SELECT id, team_id, object_type, record_id, 'pending', 0, now(), last_error_code,
                last_error_message
         FROM r
         ON CONFLICT (id) DO UPDATE SET state = 'pending', attempts = 0, next_attempt_at = now(),
             completed_at = NULL, first_attempt_at = NULL
         RETURNING c.id",
    )
    .bind(&ids)
    .bind(&from)
    .fetch_all(&mut *c)
    .await?;
    // A row that finished before migration 0015 keeps its final state stored; stored as
    // waiting again, it is back in `prism_outbox_record`, where the claims' per-record guard
    // looks for a record's unfinished older rows.
    sqlx::query(
        "UPDATE prism_outbox SET state = 'pending' WHERE id = ANY($1) AND state <> 'pending'",
    )
    .bind(&changed)
    .execute(&mut *c)
    .await?;
    for (id, patch) in rebased.iter().filter(|(id, _)| changed.contains(id)) {
        sqlx::query("UPDATE prism_outbox SET patch = $2::jsonb WHERE id = $1")
            .bind(id)
            .bind(patch)
            .execute(&mut *c)
            .await?;
    }
    let changed = changed.len() as u64;
    if changed > 0 {
        notify_claimers(c).await?;
    }
    Ok(changed)
}

pub(crate) async fn discard(
    c: &mut PgConnection,
    ids: &[i64],
    from: &[RowState],
    code: &str,
    message: &str,
) -> StoreResult<u64> {
    Ok(sqlx::query(
        "INSERT INTO prism_outbox_claims AS c (id, team_id, object_type, record_id, batch_id, state,
                                               attempts, last_error_code, last_error_message,
                                               completed_at)
         SELECT o.id, o.team_id, o.object_type, o.record_id, v.batch_id, 'dead', v.attempts, $3, $4,
                now()
         FROM prism_outbox_rows v JOIN prism_outbox o ON o.id = v.id
         WHERE v.id = ANY($1) AND v.state = ANY($2) AND v.state <> 'in_flight'
         ON CONFLICT (id) DO UPDATE SET state = 'dead', last_error_code = $3,
             last_error_message = $4, completed_at = now()",
    )
    .bind(ids)
    .bind(states(from))
    .bind(code)
    .bind(message)
    .execute(&mut *c)
    .await?
    .rows_affected())
}

pub(crate) async fn audit(
    c: &mut PgConnection,
    actor: &str,
    action: &str,
    filter: &str,
    rows: i64,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO prism_audit (actor, action, filter, rows) VALUES ($1, $2, $3::jsonb, $4) RETURNING id",
    )
    .bind(actor)
    .bind(action)
    .bind(filter)
    .bind(rows)
    .fetch_one(&mut *c)
    .await?)
}
