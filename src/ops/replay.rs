//! `prism-sync replay`: an operator puts `dead` rows (and, if asked, rows waiting to retry) back
//! to `pending`, attempts reset, to travel in new batches under new keys, in their original
//! order. In-flight rows are never touched. Every replay is written to `prism_audit`.

use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::status::AnyRow;
use crate::model::{ObjectType, Operation};
use crate::store::{Store, StoreError, StoreKind};

/// Which rows to replay. At least one criterion (or `all`) is required.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayFilter {
    pub ids: Vec<i64>,
    pub batch: Option<Uuid>,
    pub error_code: Option<String>,
    pub record_id: Option<Uuid>,
    pub object_type: Option<ObjectType>,
    /// `team_id` values as stored (`''` is the default team); empty: any team.
    pub teams: Vec<String>,
    pub operation: Option<Operation>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    pub include_retrying: bool,
    pub all: bool,
}

impl ReplayFilter {
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub id: i64,
    pub record_id: String,
    pub object_type: String,
    pub state: String,
    pub attempts: i64,
    pub last_error_code: Option<String>,
    pub enqueued_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "choose the rows to replay: --id, --batch, --error-code, --record-id, --object-type, --team, --operation, --since/--until, or --all"
    )]
    NoFilter,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ReplayError {
    fn from(e: sqlx::Error) -> Self {
        ReplayError::Store(e.into())
    }
}

const WHERE_SQLITE: &str = " WHERE (state = 'dead' OR (?1 AND state = 'retrying'))
    AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))
    AND (?3 IS NULL OR batch_id = ?3)
    AND (?4 IS NULL OR last_error_code = ?4)
    AND (?5 IS NULL OR lower(record_id) = ?5)
    AND (?6 IS NULL OR object_type = ?6)
    AND (?7 IS NULL OR enqueued_at >= ?7)
    AND (?8 IS NULL OR enqueued_at < ?8)
    AND (?9 IS NULL OR team_id IN (SELECT value FROM json_each(?9)))
    AND (?10 IS NULL OR operation = ?10)";

const WHERE_PG: &str = " WHERE (state = 'dead' OR ($1 AND state = 'retrying'))
    AND ($2::bigint[] IS NULL OR id = ANY($2))
    AND ($3::uuid IS NULL OR batch_id = $3)
    AND ($4::text IS NULL OR last_error_code = $4)
    AND ($5::uuid IS NULL OR record_id = $5)
    AND ($6::text IS NULL OR object_type = $6)
    AND ($7::timestamptz IS NULL OR enqueued_at >= $7)
    AND ($8::timestamptz IS NULL OR enqueued_at < $8)
    AND ($9::text[] IS NULL OR team_id = ANY($9))
    AND ($10::text IS NULL OR operation = $10)";

macro_rules! bind_filter {
    (sqlite, $q:expr, $f:expr) => {
        $q.bind($f.include_retrying)
            .bind((!$f.ids.is_empty()).then(|| serde_json::to_string(&$f.ids).expect("serialises")))
            .bind($f.batch.map(|b| b.to_string()))
            .bind($f.error_code.clone())
            .bind($f.record_id.map(|r| r.to_string()))
            .bind($f.object_type.map(|t| t.as_str()))
            .bind($f.since.map(super::sqlite_time))
            .bind($f.until.map(super::sqlite_time))
            .bind(
                (!$f.teams.is_empty())
                    .then(|| serde_json::to_string(&$f.teams).expect("serialises")),
            )
            .bind($f.operation.map(|o| o.as_str()))
    };
    (pg, $q:expr, $f:expr) => {
        $q.bind($f.include_retrying)
            .bind((!$f.ids.is_empty()).then(|| $f.ids.clone()))
            .bind($f.batch)
            .bind($f.error_code.clone())
            .bind($f.record_id)
            .bind($f.object_type.map(|t| t.as_str()))
            .bind($f.since)
            .bind($f.until)
            .bind((!$f.teams.is_empty()).then(|| $f.teams.clone()))
            .bind($f.operation.map(|o| o.as_str()))
    };
}

/// The rows the filter selects now (what a replay would change), at most `limit` shown.
pub async fn preview(
    store: &Store,
    f: &ReplayFilter,
    limit: i64,
) -> Result<(i64, Vec<Candidate>), ReplayError> {
    if f.is_empty() {
        return Err(ReplayError::NoFilter);
    }
    let (count, rows) = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => {
            let count: i64 = bind_filter!(
                sqlite,
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM prism_outbox{WHERE_SQLITE}"
                ))),
                f
            )
            .fetch_one(pool)
            .await?;
            let rows = bind_filter!(
                sqlite,
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB), state, attempts, last_error_code, enqueued_at
                     FROM prism_outbox{WHERE_SQLITE} ORDER BY id LIMIT {limit}"
                ))),
                f
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(AnyRow::Sqlite)
            .collect::<Vec<_>>();
            (count, rows)
        }
        StoreKind::Postgres(pool) => {
            let count: i64 = bind_filter!(
                pg,
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM prism_outbox{WHERE_PG}"
                ))),
                f
            )
            .fetch_one(pool)
            .await?;
            let rows = bind_filter!(
                pg,
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT id, record_id::text, object_type, state, attempts::bigint, last_error_code, enqueued_at::text
                     FROM prism_outbox{WHERE_PG} ORDER BY id LIMIT {limit}"
                ))),
                f
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(AnyRow::Postgres)
            .collect::<Vec<_>>();
            (count, rows)
        }
    };
    let rows = rows
        .iter()
        .map(|r| {
            Ok(Candidate {
                id: r.int(0)?.unwrap_or(0),
                record_id: r.lossy(1)?.unwrap_or_default(),
                object_type: r.lossy(2)?.unwrap_or_default(),
                state: r.text(3)?.unwrap_or_default(),
                attempts: r.int(4)?.unwrap_or(0),
                last_error_code: r.text(5)?,
                enqueued_at: r.text(6)?.unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((count, rows))
}

/// Requeues the selected rows and writes the audit entry, in one transaction. Returns how many
/// rows changed (rows claimed meanwhile by a daemon are left alone).
pub async fn apply(store: &Store, f: &ReplayFilter, actor: &str) -> Result<u64, ReplayError> {
    if f.is_empty() {
        return Err(ReplayError::NoFilter);
    }
    let filter = serde_json::to_string(f).expect("serialises");
    let changed = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            let done = bind_filter!(
                sqlite,
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE prism_outbox SET state = 'pending', attempts = 0,
                       next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), completed_at = NULL{WHERE_SQLITE}"
                ))),
                f
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO prism_audit (actor, action, filter, rows) VALUES (?1, 'replay', ?2, ?3)")
                .bind(actor)
                .bind(&filter)
                .bind(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            done.rows_affected()
        }
        StoreKind::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            let done = bind_filter!(
                pg,
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE prism_outbox SET state = 'pending', attempts = 0, next_attempt_at = now(),
                       completed_at = NULL{WHERE_PG}"
                ))),
                f
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO prism_audit (actor, action, filter, rows) VALUES ($1, 'replay', $2::jsonb, $3)")
                .bind(actor)
                .bind(&filter)
                .bind(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            done.rows_affected()
        }
    };
    Ok(changed)
}

pub fn render_preview(
    count: i64,
    rows: &[Candidate],
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{count} row(s) would go back to pending (attempts reset, new batches, new keys):"
    )?;
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.object_type.clone(),
                c.record_id.clone(),
                c.state.clone(),
                c.attempts.to_string(),
                c.last_error_code.clone().unwrap_or_default(),
                c.enqueued_at.clone(),
            ]
        })
        .collect();
    super::table(
        out,
        &[
            "row",
            "type",
            "record",
            "state",
            "attempts",
            "last error",
            "enqueued",
        ],
        &table,
    )?;
    if count > rows.len() as i64 {
        writeln!(out, "  … and {} more", count - rows.len() as i64)?;
    }
    Ok(())
}
