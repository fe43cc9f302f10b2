//! The SQLite store: one host, WAL with `synchronous=FULL` (a stored batch survives power loss),
//! every write transaction `BEGIN IMMEDIATE` so two processes on one file serialise their claims
//! instead of failing on a lock upgrade.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tracing::debug;
use uuid::Uuid;

use super::dialect::Dialect;
use super::{
    ClaimRequest, DeferBatch, DueRequest, FinishBatch, Gauges, Lane, LeasedBatch, RowColumns,
    StoreError, StoreResult, lease,
};
use crate::batch::{CandidateRow, DeadRow, NewBatch};
use crate::linger::{Backlog, RecentBatch};
use crate::model::codes;
use crate::settings::DatabaseSettings;

mod controls;
mod fleet;
pub(super) mod ops;

/// The database's clock, in the text form every timestamp column uses.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}
/// The database's clock plus a bound number of seconds (a float).
macro_rules! now_plus {
    ($arg:literal) => {
        concat!(
            "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('%+.3f seconds', ",
            $arg,
            "))"
        )
    };
}

/// In an outcome write: the row would retry (`u.state`), but it was first tried more than
/// `u.give_up` seconds ago.
macro_rules! gave_up {
    () => {
        concat!(
            "(u.state = 'retrying' AND prism_outbox.first_attempt_at <= ",
            now_plus!("-u.give_up"),
            ")"
        )
    };
}

/// Whether a later waiting row of the same record exists.
macro_rules! has_later {
    () => {
        "EXISTS (SELECT 1 FROM prism_outbox AS q INDEXED BY prism_outbox_record
                 WHERE q.record_id = o.record_id AND q.id > o.id
                   AND q.state IN ('pending', 'retrying'))"
    };
}
/// A lane's claimable rows (`?1` limit, `?3` team, `?4` object type), oldest first.
macro_rules! lane_from {
    () => {
        concat!(
            "FROM prism_outbox AS o INDEXED BY prism_outbox_lane
             WHERE o.team_id = ?3 AND o.object_type = ?4
               AND o.state IN ('pending', 'retrying') AND o.next_attempt_at <= ",
            now!(),
            " AND ",
            record_guard!(),
            " ORDER BY o.id LIMIT ?1"
        )
    };
}
/// The patch as text, or NULL past `?2` bytes (only its size is read, from the record header).
macro_rules! packed_patch {
    () => {
        "CASE WHEN octet_length(o.patch) > ?2 THEN NULL ELSE o.patch END"
    };
}
/// The rows after each wanted head (`?1`: JSON `[[record_id, head_id], ...]`), at most `?3 - 1`
/// per record. The window numbers ids only: SQLite materialises every column a window query's
/// result refers to, and a raw `patch` there would copy each oversized patch into memory at
/// once. The patch is read (or, past the limit, only its size) in the outer query, row by row.
macro_rules! followers_from {
    () => {
        "FROM (SELECT o.id, row_number() OVER (PARTITION BY o.record_id ORDER BY o.id) AS rn
               FROM json_each(?1) AS h
               JOIN prism_outbox AS o INDEXED BY prism_outbox_record
                 ON o.record_id = json_extract(h.value, '$[0]') AND o.id > json_extract(h.value, '$[1]')
               WHERE o.state IN ('pending', 'retrying')) AS w
         JOIN prism_outbox AS o ON o.id = w.id
         WHERE w.rn < ?3"
    };
}
/// The columns a claim reads of a candidate row (as bytes: nothing about it is trusted yet),
/// but for `has_later`.
macro_rules! row_columns {
    () => {
        "o.id, CAST(o.record_id AS BLOB) AS record_id,
         CASE WHEN octet_length(o.patch) > ?2 THEN NULL ELSE CAST(o.patch AS BLOB) END AS patch,
         CAST(o.object_type AS BLOB) AS object_type, CAST(o.operation AS BLOB) AS operation,
         CAST(o.team_id AS BLOB) AS team_id, o.attempts"
    };
}
/// A head's columns: its row's, and whether a later waiting row of its record exists.
macro_rules! head_columns {
    () => {
        concat!(row_columns!(), ", ", has_later!(), " AS has_later")
    };
}
/// The per-record order guard: no older row of the record is waiting or in flight.
macro_rules! record_guard {
    () => {
        "NOT EXISTS (SELECT 1 FROM prism_outbox AS p INDEXED BY prism_outbox_record
                     WHERE p.record_id = o.record_id AND p.id < o.id
                       AND p.state IN ('pending', 'retrying', 'in_flight'))"
    };
}

/// The writer's page cache (negative: KiB): the claim's indexes and the rows in flight.
const WRITER_CACHE_KIB: &str = "-16384";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads (gauges, operator commands) and migrations.
    pool: SqlitePool,
    /// The one connection every write of this process goes through. SQLite drops a connection's
    /// whole page cache when another connection has written since its last transaction; with
    /// writes spread over a pool, every claim and outcome write started cold and re-read its
    /// pages from the OS. One writer keeps its cache warm.
    writer: SqlitePool,
    /// One writer at a time inside this process. SQLite allows one writer anyway; without this
    /// gate, concurrent `BEGIN IMMEDIATE`s fall into SQLite's busy handler, which sleeps in
    /// growing steps instead of queueing, and throughput collapses. Other processes on the same
    /// file still wait through `busy_timeout`.
    write_gate: Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction and the in-process gate it holds.
pub(crate) struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _gate: tokio::sync::OwnedMutexGuard<()>,
}

impl std::ops::Deref for WriteTx {
    type Target = Transaction<'static, Sqlite>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl WriteTx {
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
    async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// Creates the database file owner-only (0600) when prism-sync is what creates it (`mode=rwc`
/// and no file yet): it holds contact data, and SQLite would create it with the process umask
/// (often world-readable). SQLite gives its `-wal` and `-shm` files the database file's mode.
/// An existing file keeps the mode its owner chose. A failure here is left to the connect that
/// follows, which reports it in its own words.
fn create_owner_only(options: &SqliteConnectOptions) {
    #[cfg(unix)]
    {
        use sqlx::ConnectOptions;
        use std::os::unix::fs::OpenOptionsExt;
        let creates = options
            .to_url_lossy()
            .query_pairs()
            .any(|(k, v)| k == "mode" && v == "rwc");
        if creates {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(options.get_filename());
        }
    }
}

impl SqliteStore {
    pub async fn connect(settings: &DatabaseSettings) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(&settings.url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(settings.busy_timeout)
            .foreign_keys(false);
        create_owner_only(&options);
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .acquire_timeout(settings.busy_timeout + Duration::from_secs(5))
            .connect_with(options.clone())
            .await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.busy_timeout + Duration::from_secs(5))
            .connect_with(
                options
                    .pragma("cache_size", WRITER_CACHE_KIB)
                    // Statement journals (a multi-row UPDATE inside a transaction keeps one,
                    // to undo just that statement on error) in memory, not in a temp file.
                    .pragma("temp_store", "MEMORY"),
            )
            .await?;
        Ok(SqliteStore {
            pool,
            writer,
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Applies the migrations on the writer connection, under the gate like every other write.
    pub async fn migrate(&self) -> StoreResult<()> {
        let _gate = self.write_gate.lock().await;
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    pub async fn migrations_current(&self) -> StoreResult<bool> {
        let applied: Vec<i64> =
            match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
            {
                Ok(v) => v,
                Err(sqlx::Error::Database(e)) if e.message().contains("no such table") => {
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
        Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
    }

    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A write transaction on the writer connection, under the gate (`BEGIN IMMEDIATE`). The
    /// operator commands (`replay`, `purge`, the retention schedule) write through it too, so
    /// that they queue behind the claim and outcome writes instead of racing them from the pool.
    pub(crate) async fn begin_write(&self) -> StoreResult<WriteTx> {
        let gate = self.write_gate.clone().lock_owned().await;
        Ok(WriteTx {
            tx: self.writer.begin_with("BEGIN IMMEDIATE").await?,
            _gate: gate,
        })
    }

    /// Runs one statement under the write gate (autocommit).
    async fn write_one<'q>(
        &self,
        query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> StoreResult<sqlx::sqlite::SqliteQueryResult> {
        let _gate = self.write_gate.lock().await;
        Ok(query.execute(&self.writer).await?)
    }

    pub async fn extend_leases(
        &self,
        owner: &str,
        lease: Duration,
        batches: &[Uuid],
    ) -> StoreResult<u64> {
        let ids: Vec<String> = batches.iter().map(Uuid::to_string).collect();
        let done = self
            .write_one(
                sqlx::query(concat!(
                    "UPDATE prism_batches SET lease_expires_at = ",
                    now_plus!("?2"),
                    " WHERE lease_owner = ?1 AND state = 'open' AND id IN (SELECT value FROM json_each(?3))"
                ))
                .bind(owner)
                .bind(lease.as_secs_f64())
                .bind(serde_json::to_string(&ids).expect("serialises")),
            )
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn drop_leases(&self, owner: &str) -> StoreResult<u64> {
        let done = self
            .write_one(
                sqlx::query(
                    "UPDATE prism_batches SET lease_owner = NULL, lease_expires_at = NULL
                     WHERE lease_owner = ?1 AND state = 'open'",
                )
                .bind(owner),
            )
            .await?;
        Ok(done.rows_affected())
    }
    pub async fn defer_batch(&self, d: &DeferBatch<'_>) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let batch = d.batch_id.to_string();
        let fenced = sqlx::query(concat!(
            "UPDATE prism_batches SET attempts = attempts + ?3, next_attempt_at = ",
            now_plus!("?4"),
            ", lease_owner = NULL, lease_expires_at = NULL, last_status = ?5, last_error = ?6
             WHERE id = ?1 AND lease_owner = ?2 AND state = 'open'"
        ))
        .bind(&batch)
        .bind(d.owner)
        .bind(i64::from(d.count_attempt))
        .bind(d.retry_in.as_secs_f64())
        .bind(d.attempt.http_status.map(i64::from))
        .bind(d.attempt.stored_detail())
        .execute(&mut **tx)
        .await?;
        if fenced.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_attempt(&mut tx, &batch, d.owner, &d.attempt).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn end_stranded_batches(&self, teams: &crate::batch::TeamSet) -> StoreResult<u64> {
        let teams = serde_json::to_string(&teams.iter().collect::<Vec<_>>()).expect("serialises");
        let mut tx = self.begin_write().await?;
        // Open batches of no configured team whose lease lapsed (no live process holds them),
        // chosen under the write lock that ends them.
        let stranded: Vec<String> = sqlx::query_scalar(concat!(
            "SELECT id FROM prism_batches INDEXED BY prism_batches_open
             WHERE state = 'open' AND team_id NOT IN (SELECT value FROM json_each(?1))
               AND (lease_expires_at IS NULL OR lease_expires_at <= ",
            now!(),
            ")"
        ))
        .bind(&teams)
        .fetch_all(&mut **tx)
        .await?;
        let dead = end_batches_dead(
            &mut tx,
            &stranded,
            codes::UNKNOWN_TEAM,
            super::STRANDED_MESSAGE,
        )
        .await?;
        tx.commit().await?;
        Ok(dead)
    }

    pub async fn gauges(&self) -> StoreResult<Gauges> {
        let mut g = Gauges::default();
        // Waiting rows through the lanes' index, rows in flight through the open batches, dead
        // rows through prism_outbox_dead: bounded by the backlog and the dead, not by the
        // finished rows kept (see `succeeded_rows`).
        let rows = sqlx::query(
            "SELECT state, count(*) FROM prism_outbox INDEXED BY prism_outbox_lane
             WHERE state IN ('pending', 'retrying') GROUP BY state
             UNION ALL
             SELECT 'in_flight', count(*) FROM prism_batches b
               JOIN prism_outbox o INDEXED BY prism_outbox_batch ON o.batch_id = b.id
             WHERE b.state = 'open' AND o.state = 'in_flight'",
        )
        .fetch_all(&self.pool)
        .await?;
        g.rows_by_state = super::text_counts(&rows)?;
        let rows = sqlx::query(
            "SELECT COALESCE(last_error_code, 'unknown'), count(*) FROM prism_outbox
             WHERE state = 'dead' GROUP BY 1 ORDER BY 2 DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        g.dead_by_code = super::text_counts(&rows)?;
        g.count_dead();
        let row = sqlx::query(
            // Index walks only, so sampling stays cheap with a million-row backlog: the oldest
            // waiting row is the oldest of the lanes' first rows (teams found by a skip scan), the oldest in-flight one is among the
            // open batches' rows, and held-back rows are counted among the first 10,000 waiting.
            "SELECT
               (SELECT COALESCE((julianday('now') - julianday(min(t))) * 86400.0, 0.0) FROM (
                  SELECT (SELECT enqueued_at FROM prism_outbox WHERE id = (
                            SELECT min(first) FROM (
                              WITH RECURSIVE teams(t) AS (
                                SELECT (SELECT team_id FROM prism_outbox INDEXED BY prism_outbox_lane
                                        WHERE state IN ('pending', 'retrying') ORDER BY team_id LIMIT 1)
                                UNION ALL
                                SELECT (SELECT team_id FROM prism_outbox INDEXED BY prism_outbox_lane
                                        WHERE state IN ('pending', 'retrying') AND team_id > teams.t
                                        ORDER BY team_id LIMIT 1)
                                FROM teams WHERE teams.t IS NOT NULL)
                              SELECT (SELECT min(id) FROM prism_outbox INDEXED BY prism_outbox_lane
                                      WHERE team_id = teams.t AND object_type = types.value
                                        AND state IN ('pending', 'retrying')) AS first
                              FROM teams, json_each(?1) AS types WHERE teams.t IS NOT NULL))) AS t
                  UNION ALL
                  SELECT min(o.enqueued_at) FROM prism_batches AS b INDEXED BY prism_batches_open
                  JOIN prism_outbox AS o INDEXED BY prism_outbox_batch ON o.batch_id = b.id
                  WHERE b.state = 'open' AND o.state = 'in_flight')),
               (SELECT COALESCE(max((julianday('now') - julianday(created_at)) * 86400.0), 0.0)
                  FROM prism_batches WHERE state = 'open'),
               (SELECT count(*) FROM prism_batches WHERE state = 'open'),
               (SELECT count(*) FROM (
                  SELECT o.id, o.record_id FROM prism_outbox AS o INDEXED BY prism_outbox_lane
                  WHERE o.state IN ('pending', 'retrying') LIMIT 10000) AS w
                WHERE EXISTS (
                    SELECT 1 FROM prism_outbox AS p INDEXED BY prism_outbox_record
                    WHERE p.record_id = w.record_id AND p.id < w.id
                      AND p.state IN ('pending', 'retrying', 'in_flight'))),
               (SELECT COALESCE(sum(rows), 0) FROM prism_audit WHERE action = 'replay')",
        )
        .bind(serde_json::to_string(&ClaimRequest::known_types()).expect("serialises"))
        .fetch_one(&self.pool)
        .await?;
        g.oldest_pending_age_seconds = row.try_get::<f64, _>(0)?.max(0.0);
        g.oldest_batch_key_age_seconds = row.try_get::<f64, _>(1)?.max(0.0);
        g.batches_in_flight = row.try_get(2)?;
        g.rows_held_back = row.try_get(3)?;
        g.operator_replayed_rows = row.try_get(4)?;
        Ok(g)
    }
}

/// The SQLite statements. Sets travel as one JSON parameter (`json_each`); the statements with
/// no set-valued form here (a batch's insert, its fence, its attempt, its rows) run once per
/// batch: on SQLite a statement is no network round trip, only a message to the connection's
/// thread.
impl Dialect for SqliteStore {
    type Tx = WriteTx;

    fn scan_gate(&self) -> Option<&tokio::sync::Mutex<()>> {
        None
    }

    async fn begin(&self) -> StoreResult<Self::Tx> {
        self.begin_write().await
    }

    async fn commit(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.rollback().await?)
    }

    async fn busy_lanes(
        &self,
        tx: &mut Self::Tx,
        lanes: &[Lane],
    ) -> StoreResult<Vec<(String, String)>> {
        let lanes: Vec<(String, String)> = lanes
            .iter()
            .map(|l| (l.team.clone(), l.object_type.as_str().to_owned()))
            .collect();
        Ok(sqlx::query_as(
            "SELECT json_extract(l.value, '$[0]'), json_extract(l.value, '$[1]') FROM json_each(?1) AS l
             WHERE EXISTS (SELECT 1 FROM prism_outbox INDEXED BY prism_outbox_lane
                           WHERE team_id = json_extract(l.value, '$[0]')
                             AND object_type = json_extract(l.value, '$[1]')
                             AND state IN ('pending', 'retrying'))",
        )
        .bind(serde_json::to_string(&lanes).expect("serialises"))
        .fetch_all(&mut ***tx)
        .await?)
    }

    async fn lane_fill(
        &self,
        tx: &mut Self::Tx,
        lanes: &[(String, String)],
        recent: usize,
    ) -> StoreResult<Vec<Vec<RecentBatch>>> {
        // One statement a lane (SQLite has no LATERAL): a few index entries each, through
        // prism_batches_lane (team, type, created_at).
        let mut out = Vec::with_capacity(lanes.len());
        for (team, object_type) in lanes {
            let rows: Vec<(i64, f64)> = sqlx::query_as(concat!(
                "SELECT row_count, (julianday(",
                now!(),
                ") - julianday(created_at)) * 86400.0
                 FROM prism_batches INDEXED BY prism_batches_lane
                 WHERE team_id = ?1 AND object_type = ?2
                 ORDER BY created_at DESC LIMIT ?3"
            ))
            .bind(team)
            .bind(object_type)
            .bind(i64::try_from(recent).unwrap_or(i64::MAX))
            .fetch_all(&mut ***tx)
            .await?;
            out.push(
                rows.into_iter()
                    .map(|(rows, age)| RecentBatch {
                        rows: usize::try_from(rows).unwrap_or(0),
                        age: seconds(age),
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    async fn lane_backlog(
        &self,
        tx: &mut Self::Tx,
        lanes: &[(String, String)],
        cap: usize,
    ) -> StoreResult<Vec<Backlog>> {
        let mut out = Vec::with_capacity(lanes.len());
        for (team, object_type) in lanes {
            // lane_heads' rows (`lane_from!`), counted, with how long the longest-due has waited.
            let (due, oldest): (i64, Option<f64>) = sqlx::query_as(concat!(
                "SELECT count(*), (julianday(",
                now!(),
                ") - julianday(min(next_attempt_at))) * 86400.0
                 FROM (SELECT o.next_attempt_at ",
                lane_from!(),
                ")"
            ))
            .bind(i64::try_from(cap).unwrap_or(i64::MAX))
            .bind(0_i64)
            .bind(team)
            .bind(object_type)
            .fetch_one(&mut ***tx)
            .await?;
            out.push(Backlog {
                due: usize::try_from(due).unwrap_or(0),
                oldest_due: seconds(oldest.unwrap_or(0.0)),
            });
        }
        Ok(out)
    }

    async fn try_lock_lane(&self, _: &mut Self::Tx, _: &(String, String)) -> StoreResult<bool> {
        // A claim is a write transaction (`BEGIN IMMEDIATE`): it already holds the database alone.
        Ok(true)
    }

    async fn oldest_due(&self, tx: &mut Self::Tx, ids: &[i64]) -> StoreResult<Duration> {
        let age: Option<f64> = sqlx::query_scalar(concat!(
            "SELECT (julianday(",
            now!(),
            ") - julianday(min(next_attempt_at))) * 86400.0
             FROM prism_outbox WHERE id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(serde_json::to_string(ids).expect("serialises"))
        .fetch_one(&mut ***tx)
        .await?;
        Ok(seconds(age.unwrap_or(0.0)))
    }

    async fn lane_heads(
        &self,
        tx: &mut Self::Tx,
        (team, object_type): &(String, String),
        req: &ClaimRequest<'_>,
        // One writer: a claim never meets another one's locked rows.
        _spans: Option<&super::dialect::ClaimSpans>,
    ) -> StoreResult<Vec<CandidateRow>> {
        let (limit, max_patch) = (claim_limit(req), max_patch(req));
        let mut heads = fetch_candidates(
            tx,
            sqlx::query_scalar(concat!(
                "SELECT json_group_array(json_array(id, record_id, patch, object_type, operation,
                                                    team_id, attempts, has_later))
                 FROM (SELECT o.id, o.record_id, ",
                packed_patch!(),
                " AS patch, o.object_type, o.operation, o.team_id, o.attempts, ",
                has_later!(),
                " AS has_later ",
                lane_from!(),
                ")"
            ))
            .bind(limit)
            .bind(max_patch)
            .bind(team)
            .bind(object_type),
            sqlx::query(concat!("SELECT ", head_columns!(), " ", lane_from!()))
                .bind(limit)
                .bind(max_patch)
                .bind(team)
                .bind(object_type),
        )
        .await?;
        heads.sort_unstable_by_key(|r| r.id);
        Ok(heads)
    }

    async fn strays(
        &self,
        tx: &mut Self::Tx,
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>> {
        let known = |v: Vec<&str>| serde_json::to_string(&v).expect("serialises");
        let strays = sqlx::query(concat!(
            "SELECT ",
            head_columns!(),
            " FROM prism_outbox AS o INDEXED BY prism_outbox_lane
             WHERE o.state IN ('pending', 'retrying') AND o.next_attempt_at <= ",
            now!(),
            " AND NOT (o.team_id IN (SELECT value FROM json_each(?3))
                       AND o.object_type IN (SELECT value FROM json_each(?4)))
               AND ",
            record_guard!(),
            " LIMIT ?1"
        ))
        .bind(claim_limit(req))
        .bind(max_patch(req))
        .bind(known(req.teams.iter().collect()))
        .bind(known(ClaimRequest::known_types()))
        .fetch_all(&mut ***tx)
        .await?;
        Ok(strays
            .iter()
            .map(candidate)
            .collect::<Result<Vec<_>, _>>()?)
    }

    async fn followers(
        &self,
        tx: &mut Self::Tx,
        heads: &[&CandidateRow],
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>> {
        // A record id that is not UTF-8 cannot be a JSON string: such a head has no followers.
        let wanted: Vec<(String, i64)> = heads
            .iter()
            .filter_map(|h| {
                String::from_utf8(h.record_id_raw.clone())
                    .ok()
                    .map(|r| (r, h.id))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let wanted = serde_json::to_string(&wanted).expect("serialises");
        let max_patch = max_patch(req);
        let max_coalesce = i64::try_from(req.limits.max_coalesce).unwrap_or(i64::MAX);
        fetch_candidates(
            tx,
            sqlx::query_scalar(concat!(
                "SELECT json_group_array(json_array(o.id, o.record_id, ",
                packed_patch!(),
                ", o.object_type, o.operation, o.team_id, o.attempts, 1)) ",
                followers_from!()
            ))
            .bind(&wanted)
            .bind(max_patch)
            .bind(max_coalesce),
            sqlx::query(concat!(
                "SELECT ",
                row_columns!(),
                ", 1 AS has_later ",
                followers_from!()
            ))
            .bind(&wanted)
            .bind(max_patch)
            .bind(max_coalesce),
        )
        .await
    }

    async fn insert_batches(
        &self,
        tx: &mut Self::Tx,
        batches: &[NewBatch],
        owner: &str,
        lease: Duration,
        parent: Option<Uuid>,
    ) -> StoreResult<()> {
        let parent = parent.map(|p| p.to_string());
        for b in batches {
            insert_batch(tx, b, owner, lease, parent.as_deref()).await?;
        }
        Ok(())
    }

    async fn mark_in_flight(
        &self,
        tx: &mut Self::Tx,
        batches: &[NewBatch],
        _unclaimed: Option<&HashMap<i64, i32>>,
    ) -> StoreResult<()> {
        let assignments: Vec<(i64, String)> = batches
            .iter()
            .flat_map(|b| b.row_assignments())
            .map(|(row, batch)| (row, batch.to_string()))
            .collect();
        if assignments.is_empty() {
            return Ok(());
        }
        sqlx::query(concat!(
            "UPDATE prism_outbox SET state = 'in_flight', batch_id = json_extract(j.value, '$[1]'),
                        first_attempt_at = COALESCE(first_attempt_at, ",
            now!(),
            ") FROM json_each(?1) AS j WHERE prism_outbox.id = json_extract(j.value, '$[0]')"
        ))
        .bind(serde_json::to_string(&assignments).expect("serialises"))
        .execute(&mut ***tx)
        .await?;
        Ok(())
    }

    async fn mark_dead(&self, tx: &mut Self::Tx, rows: &[DeadRow]) -> StoreResult<()> {
        let dead: Vec<(i64, &str, &str)> = rows
            .iter()
            .map(|d| (d.id, d.code, d.message.as_str()))
            .collect();
        sqlx::query(concat!(
            "UPDATE prism_outbox SET state = 'dead', completed_at = ",
            now!(),
            ", last_error_code = json_extract(j.value, '$[1]'),
               last_error_message = json_extract(j.value, '$[2]')
             FROM json_each(?1) AS j
             WHERE prism_outbox.id = json_extract(j.value, '$[0]')"
        ))
        .bind(serde_json::to_string(&dead).expect("serialises"))
        .execute(&mut ***tx)
        .await?;
        Ok(())
    }

    async fn fence(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<HashSet<Uuid>> {
        let mut fenced = HashSet::with_capacity(ends.len());
        for f in ends {
            let done = sqlx::query(concat!(
                "UPDATE prism_batches SET state = ?3, completed_at = ",
                now!(),
                ", lease_owner = NULL, lease_expires_at = NULL, last_status = ?4, last_error = ?5
                 WHERE id = ?1 AND lease_owner = ?2 AND state = 'open'"
            ))
            .bind(f.batch_id.to_string())
            .bind(&f.owner)
            .bind(f.end.as_str())
            .bind(f.attempt.http_status.map(i64::from))
            .bind(f.attempt.stored_detail())
            .execute(&mut ***tx)
            .await?;
            if done.rows_affected() > 0 {
                fenced.insert(f.batch_id);
            }
        }
        Ok(fenced)
    }

    async fn write_attempts(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<()> {
        for f in ends {
            insert_attempt(tx, &f.batch_id.to_string(), &f.owner, &f.attempt).await?;
        }
        Ok(())
    }

    async fn write_rows(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<()> {
        for f in ends.iter().filter(|f| !f.rows.is_empty()) {
            update_rows(tx, f).await?;
        }
        Ok(())
    }

    async fn lease_due(&self, req: &DueRequest<'_>) -> StoreResult<Vec<StoreResult<LeasedBatch>>> {
        let rows = sqlx::query(concat!(
            "UPDATE prism_batches SET lease_owner = ?1, lease_expires_at = ",
            now_plus!("?2"),
            " WHERE id IN (
                 SELECT id FROM prism_batches INDEXED BY prism_batches_open
                 WHERE state = 'open' AND next_attempt_at <= ",
            now!(),
            " AND (lease_expires_at IS NULL OR lease_expires_at <= ",
            now!(),
            ") AND team_id IN (SELECT value FROM json_each(?4))
               AND NOT EXISTS (SELECT 1 FROM json_each(?5) AS s
                               WHERE json_extract(s.value, '$[0]') = team_id
                                 AND json_extract(s.value, '$[1]') = object_type)
             ORDER BY next_attempt_at LIMIT ?3)
             RETURNING id, idempotency_key, team_id, object_type, operation, body, items, attempts,
                       (julianday('now') - julianday(created_at)) * 86400.0 AS key_age,
                       EXISTS (SELECT 1 FROM prism_batch_attempts AS a
                               WHERE a.batch_id = prism_batches.id
                                 AND a.http_status BETWEEN 200 AND 299) AS answered,
                       (SELECT COALESCE((julianday('now') - julianday(min(o.first_attempt_at))) * 86400.0, 0.0)
                        FROM prism_outbox AS o INDEXED BY prism_outbox_batch
                        WHERE o.batch_id = prism_batches.id AND o.state = 'in_flight') AS oldest_row_age"
        ))
        .bind(req.owner)
        .bind(req.lease.as_secs_f64())
        .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
        .bind(serde_json::to_string(req.teams).expect("serialises"))
        .bind(super::lane_pairs(req.skip_lanes));
        let rows = {
            let _gate = self.write_gate.lock().await;
            rows.fetch_all(&self.writer).await?
        };
        Ok(rows
            .iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let id = Uuid::parse_str(&id)
                    .map_err(|e| StoreError::Invalid(format!("batch id {id:?}: {e}")))?;
                lease::leased(row, id)
            })
            .collect())
    }

    async fn end_batch_dead(&self, batch: Uuid, code: &str, message: &str) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        end_batches_dead(&mut tx, &[batch.to_string()], code, message).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// How many heads a lane statement may return.
fn claim_limit(req: &ClaimRequest<'_>) -> i64 {
    i64::try_from(req.max_records).unwrap_or(i64::MAX)
}

/// A number of seconds the database computed as a duration (negative: zero).
fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1e9))
}

/// The largest patch a claim reads (a larger one is read as NULL, and goes dead).
fn max_patch(req: &ClaimRequest<'_>) -> i64 {
    i64::try_from(req.limits.max_patch_bytes).unwrap_or(i64::MAX)
}

/// One batch's rows after its end (only rows still in flight in it).
async fn update_rows(tx: &mut WriteTx, f: &FinishBatch) -> StoreResult<()> {
    let c = RowColumns::of(f.rows.iter().map(|r| (r, f.give_up_after)));
    let packed: Vec<_> = (0..c.ids.len())
        .map(|i| {
            (
                c.ids[i],
                c.states[i],
                &c.codes[i],
                &c.messages[i],
                c.retry_in[i],
                c.give_up_after[i],
            )
        })
        .collect();
    // `u` is read once (a subquery over json_each) and each row found by its rowid; the
    // unary `+` keeps the planner from driving the join from the batch_id index, which
    // would re-parse the JSON once per row.
    // A row that would retry but was first tried longer than `retry.give_up_after` ago
    // goes dead with its code instead (`gave_up`).
    sqlx::query(concat!(
        "UPDATE prism_outbox SET
           state = CASE WHEN ",
        gave_up!(),
        " THEN 'dead' ELSE u.state END,
           attempts = attempts + 1,
           next_attempt_at = CASE WHEN u.state = 'retrying' THEN ",
        now_plus!("u.retry_in"),
        " ELSE next_attempt_at END,
           completed_at = CASE WHEN u.state IN ('succeeded', 'dead') OR ",
        gave_up!(),
        " THEN ",
        now!(),
        " ELSE NULL END,
           last_error_code = COALESCE(u.code, last_error_code),
           last_error_message = CASE WHEN ",
        gave_up!(),
        " THEN 'gave up (retry.give_up_after): ' || COALESCE(u.message, last_error_message, '')
             ELSE COALESCE(u.message, last_error_message) END
         FROM (SELECT json_extract(value, '$[0]') AS row_id, json_extract(value, '$[1]') AS state,
                      json_extract(value, '$[2]') AS code, json_extract(value, '$[3]') AS message,
                      json_extract(value, '$[4]') AS retry_in, json_extract(value, '$[5]') AS give_up
               FROM json_each(?1)) AS u
         WHERE prism_outbox.id = u.row_id
           AND +prism_outbox.batch_id = ?2 AND prism_outbox.state = 'in_flight'"
    ))
    .bind(serde_json::to_string(&packed).expect("serialises"))
    .bind(f.batch_id.to_string())
    .execute(&mut ***tx)
    .await?;
    Ok(())
}

fn candidate(row: &sqlx::sqlite::SqliteRow) -> Result<CandidateRow, sqlx::Error> {
    Ok(CandidateRow {
        id: row.try_get("id")?,
        record_id_raw: row
            .try_get::<Option<Vec<u8>>, _>("record_id")?
            .unwrap_or_default(),
        patch: row.try_get("patch")?,
        object_type: row
            .try_get::<Option<Vec<u8>>, _>("object_type")?
            .unwrap_or_default(),
        operation: row
            .try_get::<Option<Vec<u8>>, _>("operation")?
            .unwrap_or_default(),
        team_id: row
            .try_get::<Option<Vec<u8>>, _>("team_id")?
            .unwrap_or_default(),
        attempts: row.try_get("attempts")?,
        has_later: row.try_get("has_later")?,
    })
}

/// Candidate rows, read through `packed`: one result row holding a JSON array of
/// `[id, record_id, patch, object_type, operation, team_id, attempts, has_later]` arrays.
///
/// sqlx runs a SQLite connection on a thread of its own and hands each result row to the async
/// side as a message of owned values; for a claim of hundreds of rows that traffic cost more
/// than the query itself. Where JSON cannot carry the rows faithfully (a BLOB value, text that
/// is not UTF-8: `packed` fails or does not parse), `rows` reads the same rows one by one, as
/// bytes, so a malformed row still reaches the planner and goes dead with its code.
async fn fetch_candidates<'q>(
    tx: &mut WriteTx,
    packed: sqlx::query::QueryScalar<'q, Sqlite, Vec<u8>, sqlx::sqlite::SqliteArguments>,
    rows: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
) -> StoreResult<Vec<CandidateRow>> {
    match packed.fetch_one(&mut ***tx).await {
        Ok(json) => {
            if let Some(rows) = unpack_candidates(&json) {
                return Ok(rows);
            }
            debug!("a claimed row does not fit JSON; reading the rows one by one");
        }
        Err(sqlx::Error::Database(e)) => {
            debug!(error = %e, "a claimed row does not fit JSON; reading the rows one by one");
        }
        Err(e) => return Err(e.into()),
    }
    let rows = rows.fetch_all(&mut ***tx).await?;
    Ok(rows.iter().map(candidate).collect::<Result<Vec<_>, _>>()?)
}

/// Candidates from `fetch_candidates`' JSON, or `None` if the JSON is not what the query
/// makes of well-formed rows.
fn unpack_candidates(json: &[u8]) -> Option<Vec<CandidateRow>> {
    type Packed = (
        i64,
        serde_json::Value,
        serde_json::Value,
        serde_json::Value,
        serde_json::Value,
        serde_json::Value,
        i32,
        i64,
    );
    // A text column as the bytes `CAST(x AS BLOB)` gives; numbers are invalid in every column
    // that reaches here and only need to stay invalid.
    fn raw(v: serde_json::Value) -> Option<Vec<u8>> {
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.into_bytes()),
            other => Some(other.to_string().into_bytes()),
        }
    }
    let packed: Vec<Packed> = serde_json::from_slice(json).ok()?;
    Some(
        packed
            .into_iter()
            .map(
                |(id, record_id, patch, object_type, operation, team_id, attempts, has_later)| {
                    CandidateRow {
                        id,
                        record_id_raw: raw(record_id).unwrap_or_default(),
                        patch: raw(patch),
                        object_type: raw(object_type).unwrap_or_default(),
                        operation: raw(operation).unwrap_or_default(),
                        team_id: raw(team_id).unwrap_or_default(),
                        attempts,
                        has_later: has_later != 0,
                    }
                },
            )
            .collect(),
    )
}

async fn insert_batch(
    tx: &mut WriteTx,
    b: &NewBatch,
    owner: &str,
    lease: Duration,
    parent: Option<&str>,
) -> StoreResult<()> {
    sqlx::query(concat!(
        "INSERT INTO prism_batches
           (id, idempotency_key, object_type, body, items, item_count, row_count, lease_owner, lease_expires_at, parent_id,
            team_id, operation)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ",
        now_plus!("?9"),
        ", ?10, ?11, ?12)"
    ))
    .bind(b.id.to_string())
    .bind(&b.idempotency_key)
    .bind(b.object_type.as_str())
    .bind(&b.body)
    .bind(b.items_json())
    .bind(i64::try_from(b.items.len()).unwrap_or(i64::MAX))
    .bind(i64::try_from(b.row_count()).unwrap_or(i64::MAX))
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(parent)
    .bind(&b.team)
    .bind(b.operation.as_str())
    .execute(&mut ***tx)
    .await?;
    Ok(())
}

/// Ends open batches for good, inside `tx`: their rows still in flight go `dead` with `code`
/// and `message`, the batches end `released`. Returns how many rows went dead.
async fn end_batches_dead(
    tx: &mut WriteTx,
    batches: &[String],
    code: &str,
    message: &str,
) -> StoreResult<u64> {
    if batches.is_empty() {
        return Ok(0);
    }
    let ids = serde_json::to_string(batches).expect("serialises");
    let dead = sqlx::query(concat!(
        "UPDATE prism_outbox SET state = 'dead', completed_at = ",
        now!(),
        ", last_error_code = ?2, last_error_message = ?3
         WHERE state = 'in_flight' AND batch_id IN (SELECT value FROM json_each(?1))"
    ))
    .bind(&ids)
    .bind(code)
    .bind(message)
    .execute(&mut ***tx)
    .await?
    .rows_affected();
    sqlx::query(concat!(
        "UPDATE prism_batches SET state = 'released', completed_at = ",
        now!(),
        ", lease_owner = NULL, lease_expires_at = NULL, last_error = ?2
         WHERE state = 'open' AND id IN (SELECT value FROM json_each(?1))"
    ))
    .bind(&ids)
    .bind(message)
    .execute(&mut ***tx)
    .await?;
    Ok(dead)
}

async fn insert_attempt(
    tx: &mut WriteTx,
    batch: &str,
    owner: &str,
    a: &super::AttemptRecord,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO prism_batch_attempts (batch_id, attempt, owner, http_status, outcome, detail, replay, duration_ms)
         VALUES (?1, (SELECT COALESCE(max(attempt), 0) + 1 FROM prism_batch_attempts WHERE batch_id = ?1),
                 ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(batch)
    .bind(owner)
    .bind(a.http_status.map(i64::from))
    .bind(a.stored_outcome())
    .bind(a.stored_detail())
    .bind(a.replay)
    .bind(i64::try_from(a.duration.as_millis()).unwrap_or(i64::MAX))
    .execute(&mut ***tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unpack_candidates;

    #[test]
    fn packed_candidates_keep_text_as_its_bytes_and_mark_oversized_patches() {
        let json = br#"[[7,"rec","{\"default\":{\"a\":\"\u0000\"}}","contact","update","",2,1],
                        [3,"rec2",null,"contact","delete","team-b",0,0]]"#;
        let rows = unpack_candidates(json).expect("well-formed");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, 7);
        assert_eq!(rows[0].record_id_raw, b"rec");
        assert_eq!(
            rows[0].patch.as_deref(),
            Some(&b"{\"default\":{\"a\":\"\0\"}}"[..])
        );
        assert_eq!(rows[0].attempts, 2);
        assert!(rows[0].has_later);
        assert_eq!(rows[1].patch, None, "NULL: past the size limit");
        assert_eq!(rows[1].team_id, b"team-b");
        assert!(!rows[1].has_later);
    }

    #[test]
    fn packed_candidates_pass_numbers_on_as_text_and_refuse_what_the_query_never_makes() {
        // A number stored where text belongs stays invalid for the planner to reject.
        let rows = unpack_candidates(br#"[[1,42,12.5,"contact","update","",0,0]]"#).unwrap();
        assert_eq!(rows[0].record_id_raw, b"42");
        assert_eq!(rows[0].patch.as_deref(), Some(&b"12.5"[..]));
        // Anything else sends the caller to the row-by-row read.
        assert!(unpack_candidates(b"[[1,\"r\"]]").is_none());
        assert!(
            unpack_candidates(b"[[\"x\",\"r\",\"{}\",\"contact\",\"update\",\"\",0,0]]").is_none()
        );
        assert!(
            unpack_candidates(b"[[1,\"\xff\",\"{}\",\"contact\",\"update\",\"\",0,0]]").is_none()
        );
        assert!(
            unpack_candidates(b"[[1,\"r\",\"{}\",\"contact\",\"update\",\"\",99999999999,0]]")
                .is_none()
        );
        assert_eq!(unpack_candidates(b"[]").map(|r| r.len()), Some(0));
    }
}
