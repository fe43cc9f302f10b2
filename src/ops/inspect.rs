//! `prism-sync inspect ROW_ID` and `inspect --batch BATCH_ID`: everything known about one row or
//! one batch: its key, its stored request body, each HTTP attempt and each row's outcome.

use serde::Serialize;
use uuid::Uuid;

use super::status::AnyRow;
use crate::store::{Store, StoreError, StoreKind};

#[derive(Debug, Clone, Serialize)]
pub struct RowView {
    pub id: i64,
    pub record_id: String,
    pub object_type: String,
    pub operation: String,
    /// As stored: empty for the configured default team.
    pub team_id: String,
    pub state: String,
    pub attempts: i64,
    pub enqueued_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub completed_at: Option<String>,
    pub batch_id: Option<String>,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub patch: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub attempt: i64,
    pub owner: String,
    pub finished_at: String,
    pub http_status: Option<i64>,
    pub outcome: String,
    pub detail: Option<String>,
    pub replay: bool,
    pub duration_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchView {
    pub id: String,
    pub idempotency_key: String,
    pub object_type: String,
    pub operation: String,
    /// As stored: empty for the configured default team.
    pub team_id: String,
    pub state: String,
    pub attempts: i64,
    pub item_count: i64,
    pub row_count: i64,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<String>,
    pub parent_id: Option<String>,
    pub children: Vec<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    /// The exact request bytes (as text; they are JSON).
    pub body: serde_json::Value,
    pub http_attempts: Vec<AttemptView>,
    pub rows: Vec<RowView>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no outbox row with id {0}")]
    NoRow(i64),
    #[error("no batch with id {0}")]
    NoBatch(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for InspectError {
    fn from(e: sqlx::Error) -> Self {
        InspectError::Store(e.into())
    }
}

const ROW_COLUMNS_SQLITE: &str =
    "SELECT id, CAST(record_id AS BLOB), CAST(object_type AS BLOB), state, attempts,
    enqueued_at, next_attempt_at, completed_at, batch_id, last_error_code, last_error_message,
    CAST(substr(CAST(patch AS BLOB), 1, 65536) AS BLOB), CAST(operation AS BLOB), CAST(team_id AS BLOB)
    FROM prism_outbox";
const ROW_COLUMNS_PG: &str = "SELECT id, record_id::text, object_type, state, attempts::bigint,
    enqueued_at::text, next_attempt_at::text, completed_at::text, batch_id::text, last_error_code,
    last_error_message, left(patch::text, 65536), operation, team_id FROM prism_outbox";

fn row_view(r: &AnyRow) -> Result<RowView, sqlx::Error> {
    Ok(RowView {
        id: r.int(0)?.unwrap_or(0),
        record_id: r.lossy(1)?.unwrap_or_default(),
        object_type: r.lossy(2)?.unwrap_or_default(),
        operation: r.lossy(12)?.unwrap_or_default(),
        team_id: r.lossy(13)?.unwrap_or_default(),
        state: r.text(3)?.unwrap_or_default(),
        attempts: r.int(4)?.unwrap_or(0),
        enqueued_at: r.text(5)?,
        next_attempt_at: r.text(6)?,
        completed_at: r.text(7)?,
        batch_id: r.text(8)?,
        last_error_code: r.text(9)?,
        last_error_message: r.text(10)?,
        patch: r.lossy(11)?,
    })
}

pub async fn row(store: &Store, id: i64) -> Result<RowView, InspectError> {
    let found = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ROW_COLUMNS_SQLITE} WHERE id = ?1"
        )))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(AnyRow::Sqlite),
        StoreKind::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ROW_COLUMNS_PG} WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(AnyRow::Postgres),
    };
    match found {
        Some(r) => Ok(row_view(&r)?),
        None => Err(InspectError::NoRow(id)),
    }
}

pub async fn batch(store: &Store, id: Uuid) -> Result<BatchView, InspectError> {
    let (head, attempts, children) = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => {
            let key = id.to_string();
            let head = sqlx::query(
                "SELECT id, idempotency_key, object_type, state, attempts, item_count, row_count, created_at,
                        completed_at, next_attempt_at, lease_owner, lease_expires_at, parent_id, last_status,
                        last_error, body, items, operation, team_id
                 FROM prism_batches WHERE id = ?1",
            )
            .bind(&key)
            .fetch_optional(pool)
            .await?
            .map(AnyRow::Sqlite);
            let attempts = sqlx::query(
                "SELECT attempt, owner, finished_at, http_status, outcome, detail, replay, duration_ms
                 FROM prism_batch_attempts WHERE batch_id = ?1 ORDER BY attempt",
            )
            .bind(&key)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(AnyRow::Sqlite)
            .collect::<Vec<_>>();
            let children = sqlx::query("SELECT id FROM prism_batches WHERE parent_id = ?1")
                .bind(&key)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(AnyRow::Sqlite)
                .collect::<Vec<_>>();
            (head, attempts, children)
        }
        StoreKind::Postgres(pool) => {
            let head = sqlx::query(
                "SELECT id::text, idempotency_key, object_type, state, attempts::bigint, item_count::bigint,
                        row_count::bigint, created_at::text, completed_at::text, next_attempt_at::text, lease_owner,
                        lease_expires_at::text, parent_id::text, last_status::bigint, last_error, body, items,
                        operation, team_id
                 FROM prism_batches WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
            .map(AnyRow::Postgres);
            let attempts = sqlx::query(
                "SELECT attempt::bigint, owner, finished_at::text, http_status::bigint, outcome, detail,
                        replay::int::bigint, duration_ms::bigint
                 FROM prism_batch_attempts WHERE batch_id = $1 ORDER BY attempt",
            )
            .bind(id)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(AnyRow::Postgres)
            .collect::<Vec<_>>();
            let children = sqlx::query("SELECT id::text FROM prism_batches WHERE parent_id = $1")
                .bind(id)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(AnyRow::Postgres)
                .collect::<Vec<_>>();
            (head, attempts, children)
        }
    };
    let Some(h) = head else {
        return Err(InspectError::NoBatch(id));
    };
    let body_bytes = match &h {
        AnyRow::Sqlite(r) => sqlx::Row::try_get::<Vec<u8>, _>(r, 15)?,
        AnyRow::Postgres(r) => sqlx::Row::try_get::<Vec<u8>, _>(r, 15)?,
    };
    let body = serde_json::from_slice(&body_bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&body_bytes).into_owned())
    });
    let items: Vec<crate::batch::BatchItem> =
        serde_json::from_str(&h.text(16)?.unwrap_or_default()).unwrap_or_default();
    let row_ids: Vec<i64> = items.iter().flat_map(|i| i.rows.iter().copied()).collect();
    let rows = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ROW_COLUMNS_SQLITE} WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
        )))
        .bind(serde_json::to_string(&row_ids).expect("serialises"))
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(AnyRow::Sqlite)
        .collect::<Vec<_>>(),
        StoreKind::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ROW_COLUMNS_PG} WHERE id = ANY($1) ORDER BY id"
        )))
        .bind(&row_ids)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(AnyRow::Postgres)
        .collect::<Vec<_>>(),
    };
    Ok(BatchView {
        id: h.text(0)?.unwrap_or_default(),
        idempotency_key: h.text(1)?.unwrap_or_default(),
        object_type: h.text(2)?.unwrap_or_default(),
        operation: h.text(17)?.unwrap_or_default(),
        team_id: h.text(18)?.unwrap_or_default(),
        state: h.text(3)?.unwrap_or_default(),
        attempts: h.int(4)?.unwrap_or(0),
        item_count: h.int(5)?.unwrap_or(0),
        row_count: h.int(6)?.unwrap_or(0),
        created_at: h.text(7)?.unwrap_or_default(),
        completed_at: h.text(8)?,
        next_attempt_at: h.text(9)?,
        lease_owner: h.text(10)?,
        lease_expires_at: h.text(11)?,
        parent_id: h.text(12)?,
        children: children
            .iter()
            .map(|c| c.text(0))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect(),
        last_status: h.int(13)?,
        last_error: h.text(14)?,
        body,
        http_attempts: attempts
            .iter()
            .map(|a| {
                Ok(AttemptView {
                    attempt: a.int(0)?.unwrap_or(0),
                    owner: a.text(1)?.unwrap_or_default(),
                    finished_at: a.text(2)?.unwrap_or_default(),
                    http_status: a.int(3)?,
                    outcome: a.text(4)?.unwrap_or_default(),
                    detail: a.text(5)?,
                    replay: a.int(6)?.unwrap_or(0) != 0,
                    duration_ms: a.int(7)?.unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?,
        rows: rows.iter().map(row_view).collect::<Result<Vec<_>, _>>()?,
    })
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
