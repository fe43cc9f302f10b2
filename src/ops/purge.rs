//! `prism-sync purge` and the retention schedule inside `run`: deletes terminal rows finished
//! before a cutoff in small chunks (no long locks on a live outbox), then the batches no row
//! refers to. Every purge that deletes anything is written to `prism_audit` (action `purge`;
//! the schedule's actor is `retention`).
//!
//! A chunk's ids are chosen first and deleted after, and the `DELETE` itself checks again that
//! each row is still terminal, in a purged state and finished before the cutoff: a row that an
//! operator replayed in between (back to `pending`) is kept, on both engines.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::RowState;
use crate::settings::RetentionSettings;
use crate::store::{OpsTx, Store, StoreError, StoreKind};

/// A succeeded row is kept while an older row of its record is dead: that row may still be
/// replayed, and replay judges it against the newer changes the API applied (rebased or left
/// dead as superseded). With the newer change gone, a replay would put the record back to older
/// values. The row goes once the dead row is purged (or replayed and through).
macro_rules! no_dead_before {
    () => {
        "NOT (prism_outbox.state = 'succeeded' AND EXISTS (
             SELECT 1 FROM prism_outbox AS d
             WHERE d.record_id = prism_outbox.record_id AND d.id < prism_outbox.id
               AND d.state = 'dead' AND d.object_type = prism_outbox.object_type
               AND d.team_id = prism_outbox.team_id))"
    };
}

const CHUNK: i64 = 2000;

/// What to purge: rows in `states` (terminal ones only) finished before `cutoff`.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeScope {
    /// `succeeded` and/or `dead`; others are never purged.
    pub states: Vec<&'static str>,
    /// As given (`7d`), for the audit entry.
    pub older_than: String,
    /// The database's clock minus `older_than`, fixed when the purge was planned, in the form
    /// the engine stores (SQLite text; an RFC 3339 time on Postgres).
    pub cutoff: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    pub rows: u64,
    pub batches: u64,
}

/// What a purge would delete now.
#[derive(Debug, Clone, Serialize)]
pub struct PurgePreview {
    pub rows: i64,
    pub by_state: BTreeMap<String, i64>,
    /// Finished batches older than the cutoff that no row will refer to any more.
    pub batches: i64,
    pub cutoff: String,
}

/// Fixes the cutoff for rows in `states` finished more than `older_than` ago, by the
/// database's clock.
pub async fn scope(
    store: &Store,
    states: &[RowState],
    older_than: Duration,
) -> Result<PurgeScope, StoreError> {
    let states = states
        .iter()
        .filter(|s| matches!(s, RowState::Succeeded | RowState::Dead))
        .map(|s| s.as_str())
        .collect();
    let secs = older_than.as_secs_f64();
    let cutoff = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => {
            sqlx::query_scalar(
                "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ?1))",
            )
            .bind(secs)
            .fetch_one(pool)
            .await?
        }
        StoreKind::Postgres(pool) => {
            sqlx::query_scalar(
                "SELECT to_char((now() - make_interval(secs => $1)) AT TIME ZONE 'UTC',
                                'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            )
            .bind(secs)
            .fetch_one(pool)
            .await?
        }
    };
    Ok(PurgeScope {
        states,
        older_than: humantime::format_duration(older_than).to_string(),
        cutoff,
    })
}

/// Counts what [`purge`] of `scope` would delete now.
pub async fn preview(store: &Store, scope: &PurgeScope) -> Result<PurgePreview, StoreError> {
    let states = serde_json::to_string(&scope.states).expect("serialises");
    let (by_state, batches): (Vec<(String, i64)>, i64) = match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => (
            sqlx::query_as(
                concat!(
                    "SELECT state, count(*) FROM prism_outbox INDEXED BY prism_outbox_completed
                     WHERE completed_at < ?1 AND state IN (SELECT value FROM json_each(?2)) AND ",
                    no_dead_before!(),
                    " GROUP BY state"
                ),
            )
            .bind(&scope.cutoff)
            .bind(&states)
            .fetch_all(pool)
            .await?,
            sqlx::query_scalar(
                "SELECT count(*) FROM prism_batches b
                 WHERE b.state <> 'open' AND b.completed_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id
                                     AND (o.completed_at IS NULL OR o.completed_at >= ?1
                                          OR o.state NOT IN (SELECT value FROM json_each(?2))))",
            )
            .bind(&scope.cutoff)
            .bind(&states)
            .fetch_one(pool)
            .await?,
        ),
        StoreKind::Postgres(pool) => (
            sqlx::query_as(
                concat!(
                    "SELECT state, count(*) FROM prism_outbox
                     WHERE completed_at < $1::timestamptz AND state = ANY($2) AND ",
                    no_dead_before!(),
                    " GROUP BY state"
                ),
            )
            .bind(&scope.cutoff)
            .bind(&scope.states)
            .fetch_all(pool)
            .await?,
            sqlx::query_scalar(
                "SELECT count(*) FROM prism_batches b
                 WHERE b.state <> 'open' AND b.completed_at < $1::timestamptz
                   AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id
                                     AND (o.completed_at IS NULL OR o.completed_at >= $1::timestamptz
                                          OR o.state <> ALL($2)))",
            )
            .bind(&scope.cutoff)
            .bind(&scope.states)
            .fetch_one(pool)
            .await?,
        ),
    };
    Ok(PurgePreview {
        rows: by_state.iter().map(|(_, n)| n).sum(),
        by_state: by_state.into_iter().collect(),
        batches,
        cutoff: scope.cutoff.clone(),
    })
}

/// Deletes what `scope` names, chunk by chunk, and records it in `prism_audit` as `actor`
/// (one entry, whose `rows` grows with each chunk's own transaction; none if nothing went).
pub async fn purge(
    store: &Store,
    scope: &PurgeScope,
    actor: &str,
) -> Result<PurgeReport, StoreError> {
    let mut report = PurgeReport::default();
    let mut audit = Audit::new(actor, scope);
    if scope.states.is_empty() {
        return Ok(report);
    }
    loop {
        let ids = finished_before(store, scope, CHUNK).await?;
        report.rows += delete_rows(store, scope, &ids, &mut audit).await?;
        if (ids.len() as i64) < CHUNK {
            break;
        }
    }
    loop {
        let deleted = delete_batches(store, scope, &mut audit).await?;
        report.batches += deleted;
        if (deleted as i64) < CHUNK {
            break;
        }
    }
    Ok(report)
}

/// Up to `limit` ids of rows `scope` names, read now: a hint for [`delete_rows`], which checks
/// each again.
pub async fn finished_before(
    store: &Store,
    scope: &PurgeScope,
    limit: i64,
) -> Result<Vec<i64>, StoreError> {
    Ok(match store.sqlx_kind() {
        StoreKind::Sqlite(pool) => {
            sqlx::query_scalar(concat!(
                "SELECT id FROM prism_outbox INDEXED BY prism_outbox_completed
                     WHERE completed_at < ?1 AND state IN (SELECT value FROM json_each(?2)) AND ",
                no_dead_before!(),
                " LIMIT ?3"
            ))
            .bind(&scope.cutoff)
            .bind(serde_json::to_string(&scope.states).expect("serialises"))
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        StoreKind::Postgres(pool) => {
            sqlx::query_scalar(concat!(
                "SELECT id FROM prism_outbox
                     WHERE completed_at < $1::timestamptz AND state = ANY($2) AND ",
                no_dead_before!(),
                " LIMIT $3"
            ))
            .bind(&scope.cutoff)
            .bind(&scope.states)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    })
}

/// Deletes those of `ids` (from [`finished_before`], perhaps a while ago) that `scope` still
/// names, as `actor`: one chunk of [`purge`], on its own.
pub async fn delete_chosen(
    store: &Store,
    scope: &PurgeScope,
    ids: &[i64],
    actor: &str,
) -> Result<u64, StoreError> {
    delete_rows(store, scope, ids, &mut Audit::new(actor, scope)).await
}

/// The audit entry of one purge, written with its first deletion and grown with each after.
struct Audit<'a> {
    actor: &'a str,
    id: Option<i64>,
    filter: String,
}

impl<'a> Audit<'a> {
    fn new(actor: &'a str, scope: &PurgeScope) -> Audit<'a> {
        Audit {
            actor,
            id: None,
            filter: serde_json::json!({
                "older_than": scope.older_than,
                "states": scope.states,
                "cutoff": scope.cutoff,
                "batches": 0,
            })
            .to_string(),
        }
    }
}

/// Deletes those of `ids` that are still terminal, in `scope`'s states and finished before its
/// cutoff, in one transaction with the audit entry. Returns how many went.
async fn delete_rows(
    store: &Store,
    scope: &PurgeScope,
    ids: &[i64],
    audit: &mut Audit<'_>,
) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut tx = store.begin_ops_write().await?;
    let deleted = match &mut tx {
        OpsTx::Sqlite(tx) => {
            let c: &mut SqliteConnection = tx;
            let n = sqlx::query(
                concat!(
                    "DELETE FROM prism_outbox
                     WHERE id IN (SELECT value FROM json_each(?1))
                       AND state IN ('succeeded', 'dead') AND state IN (SELECT value FROM json_each(?2))
                       AND completed_at IS NOT NULL AND completed_at < ?3 AND ",
                    no_dead_before!()
                ),
            )
            .bind(serde_json::to_string(ids).expect("serialises"))
            .bind(serde_json::to_string(&scope.states).expect("serialises"))
            .bind(&scope.cutoff)
            .execute(&mut *c)
            .await?
            .rows_affected();
            audit_sqlite(c, audit, n, 0).await?;
            n
        }
        OpsTx::Postgres(tx) => {
            // The state is checked on the row as it is when the DELETE locks it: a row a
            // replay committed as `pending` meanwhile fails it and stays.
            let n = sqlx::query(concat!(
                "DELETE FROM prism_outbox
                     WHERE id = ANY($1)
                       AND state IN ('succeeded', 'dead') AND state = ANY($2)
                       AND completed_at IS NOT NULL AND completed_at < $3::timestamptz AND ",
                no_dead_before!()
            ))
            .bind(ids)
            .bind(&scope.states)
            .bind(&scope.cutoff)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            audit_pg(tx, audit, n, 0).await?;
            n
        }
    };
    tx.commit().await?;
    Ok(deleted)
}

/// Deletes up to a chunk of finished batches older than the cutoff that no row refers to, and
/// their attempts, in one transaction with the audit entry.
async fn delete_batches(
    store: &Store,
    scope: &PurgeScope,
    audit: &mut Audit<'_>,
) -> Result<u64, StoreError> {
    let mut tx = store.begin_ops_write().await?;
    let deleted = match &mut tx {
        OpsTx::Sqlite(tx) => {
            let c: &mut SqliteConnection = tx;
            let ids: Vec<String> = sqlx::query_scalar(
                "DELETE FROM prism_batches WHERE id IN (
                   SELECT b.id FROM prism_batches b
                   WHERE b.state <> 'open' AND b.completed_at < ?1
                     AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id)
                   LIMIT ?2)
                 RETURNING id",
            )
            .bind(&scope.cutoff)
            .bind(CHUNK)
            .fetch_all(&mut *c)
            .await?;
            sqlx::query("DELETE FROM prism_batch_attempts WHERE batch_id IN (SELECT value FROM json_each(?1))")
                .bind(serde_json::to_string(&ids).expect("serialises"))
                .execute(&mut *c)
                .await?;
            let n = ids.len() as u64;
            audit_sqlite(c, audit, 0, n).await?;
            n
        }
        OpsTx::Postgres(tx) => {
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
                "DELETE FROM prism_batches WHERE id IN (
                   SELECT b.id FROM prism_batches b
                   WHERE b.state <> 'open' AND b.completed_at < $1::timestamptz
                     AND NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.batch_id = b.id)
                   LIMIT $2)
                 RETURNING id",
            )
            .bind(&scope.cutoff)
            .bind(CHUNK)
            .fetch_all(&mut **tx)
            .await?;
            sqlx::query("DELETE FROM prism_batch_attempts WHERE batch_id = ANY($1)")
                .bind(&ids)
                .execute(&mut **tx)
                .await?;
            let n = ids.len() as u64;
            audit_pg(tx, audit, 0, n).await?;
            n
        }
    };
    tx.commit().await?;
    Ok(deleted)
}

async fn audit_sqlite(
    c: &mut SqliteConnection,
    audit: &mut Audit<'_>,
    rows: u64,
    batches: u64,
) -> Result<(), sqlx::Error> {
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
                .bind(audit.actor)
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

async fn audit_pg(
    c: &mut PgConnection,
    audit: &mut Audit<'_>,
    rows: u64,
    batches: u64,
) -> Result<(), sqlx::Error> {
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
                .bind(audit.actor)
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

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Deletes rows in `states` finished more than `older_than` ago, and the batches left with no
/// row, as `actor`: [`scope`] then [`purge`], with no preview (the retention schedule).
pub async fn purge_older_than(
    store: &Store,
    states: &[RowState],
    older_than: Duration,
    actor: &str,
) -> Result<PurgeReport, StoreError> {
    let scope = scope(store, states, older_than).await?;
    purge(store, &scope, actor).await
}

/// The actor of the retention schedule's purges in `prism_audit`.
pub const RETENTION_ACTOR: &str = "retention";

/// Runs the configured retention every `retention.interval` until `stop`.
pub async fn retention_loop(store: Store, retention: RetentionSettings, stop: CancellationToken) {
    loop {
        for (state, age) in [
            (RowState::Succeeded, retention.succeeded),
            (RowState::Dead, retention.dead),
        ] {
            let Some(age) = age else { continue };
            match purge_older_than(&store, &[state], age, RETENTION_ACTOR).await {
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

/// How `prism-sync purge` runs.
#[derive(Debug, Clone)]
pub struct PurgeOptions {
    pub dry_run: bool,
    pub yes: bool,
    pub json: bool,
    pub actor: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeCommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// `prism-sync purge`, shaped like `replay`: preview, `--dry-run`, confirmation unless `--yes`,
/// then the purge of exactly what was previewed (same cutoff). With `--json`, stdout carries one
/// JSON object and the preview and question go to `notes` (stderr). Returns the exit code: 0
/// done (or nothing to do), 1 not confirmed.
pub async fn command(
    store: &Store,
    scope: &PurgeScope,
    o: &PurgeOptions,
    out: &mut impl std::io::Write,
    notes: &mut impl std::io::Write,
    input: &mut impl std::io::BufRead,
) -> Result<u8, PurgeCommandError> {
    let preview = preview(store, scope).await?;
    if o.dry_run && o.json {
        writeln!(out, "{}", serde_json::json!({ "would_purge": preview }))?;
        return Ok(0);
    }
    let mut shown: &mut dyn std::io::Write = if o.json { &mut *notes } else { &mut *out };
    render_preview(&preview, &mut shown)?;
    if o.dry_run {
        writeln!(shown, "dry run: nothing changed")?;
        return Ok(0);
    }
    if preview.rows + preview.batches == 0 {
        writeln!(shown, "nothing to purge")?;
        if o.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string(&PurgeReport::default()).expect("serialises")
            )?;
        }
        return Ok(0);
    }
    let question = format!(
        "Delete these {} row(s) and {} batch(es)?",
        preview.rows, preview.batches
    );
    if !o.yes && !super::confirm(&question, &mut shown, input)? {
        writeln!(shown, "not confirmed: nothing changed")?;
        return Ok(1);
    }
    let report = purge(store, scope, &o.actor).await?;
    if o.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"rows": report.rows, "batches": report.batches, "actor": o.actor})
        )?;
    } else {
        writeln!(
            out,
            "purged {} row(s) and {} batch(es) as {}",
            report.rows, report.batches, o.actor
        )?;
    }
    Ok(0)
}

pub fn render_preview(p: &PurgePreview, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let by_state: Vec<String> = p
        .by_state
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    let by_state = if by_state.is_empty() {
        String::new()
    } else {
        format!(" ({})", by_state.join(", "))
    };
    writeln!(
        out,
        "{} row(s) finished before {} would be deleted{by_state}, and {} batch(es) no row would refer to any more",
        p.rows, p.cutoff, p.batches
    )
}
