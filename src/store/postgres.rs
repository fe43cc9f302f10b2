//! The Postgres store: any number of replicas share one outbox. Claims use
//! `FOR UPDATE SKIP LOCKED` below the visibility watermark; batch rows carry a lease that the
//! owner extends and another replica takes over when it lapses.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::dialect::Dialect;
use super::{
    ClaimRequest, DeferBatch, DueRequest, FinishBatch, Gauges, Lane, LeasedBatch, RowColumns,
    RowUpdate, StoreResult, lease,
};
use crate::batch::{CandidateRow, DeadRow, NewBatch};
use crate::linger::{Backlog, RecentBatch};
use crate::model::codes;
use crate::settings::DatabaseSettings;

mod controls;
mod fleet;
mod migrate;
pub(super) mod ops;

mod nodelay {
    //! sqlx 0.9.0 stopped setting `TCP_NODELAY` on its sockets (launchbadge/sqlx#4335; fixed
    //! upstream, not yet released). With Nagle's algorithm on, a statement whose message leaves
    //! in two writes waits for the server's delayed ACK: 40 ms per claim or outcome write, a
    //! 5× loss of throughput here. Until a release carries the fix, every new database
    //! connection sets it on the process's TCP sockets (sqlx gives no access to its socket;
    //! hyper and axum set it on theirs already, so setting it again changes nothing there).

    /// Sets `TCP_NODELAY` on every TCP socket this process holds.
    pub fn set_on_every_tcp_socket() {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::c_int>().ok())
            else {
                continue;
            };
            if is_tcp(fd) {
                let on: libc::c_int = 1;
                // SAFETY: setsockopt on a descriptor number with a valid pointer and length; on
                // a descriptor that is not (or no longer) a TCP socket it fails harmlessly.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_TCP,
                        libc::TCP_NODELAY,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
        }
    }

    fn is_tcp(fd: libc::c_int) -> bool {
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt/getsockname write at most `len` bytes into the buffers given.
        let stream = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0
            && kind == libc::SOCK_STREAM;
        if !stream {
            return false;
        }
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut alen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let named = unsafe {
            libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut alen,
            )
        } == 0;
        named
            && (i32::from(addr.ss_family) == libc::AF_INET
                || i32::from(addr.ss_family) == libc::AF_INET6)
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Every statement of a claim or an outcome write is an index walk in `id` order or a primary-key
/// lookup. A queue table changes faster than its statistics (a bulk load of a million rows is
/// planned as if the table were empty until autovacuum analyses it), and the planner then picks
/// bitmap scans, sorts of the whole backlog and hash joins that cost 50-100× more. These
/// settings hold for the one transaction only.
const INDEX_WALKS_ONLY: &str = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
    SET LOCAL enable_sort = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(INDEX_WALKS_ONLY).execute(&mut *tx).await?;
    Ok(tx)
}

/// The claim gate, an advisory lock in a class of prism-sync's own (`b"prcg"`, key 0). Every
/// claim holds it shared for its transaction; an operator's write transaction (`replay`,
/// `discard`) takes it exclusively before it reads anything. A claim's statements see the
/// outbox as of their start (READ COMMITTED) and a row lock taken on a row that was only
/// locked, never updated, re-checks nothing: a claim that read a record's older row as `dead`
/// before a replay committed it back to `pending` could otherwise lock and send the record's
/// newer row first, and the replayed older one would then overwrite it. With the gate no claim
/// runs while an operator's change is being made: the operator waits for the claims in
/// progress (milliseconds), and new claims wait for the operator's commit.
pub(crate) const CLAIM_GATE: (i32, i32) = (0x7072_6367, 0);

/// How long an operator's write transaction waits for the claims in progress before it gives
/// up (nothing changed). Claims queue behind a waiting operator, so this also bounds how long
/// an operator can hold every claim back before its own work starts.
pub(crate) const CLAIM_GATE_WAIT: &str = "10s";

/// The columns a claim reads of a candidate row.
macro_rules! head_columns {
    () => {
        "o.id, o.record_id::text AS record_id,
         CASE WHEN octet_length(o.patch::text) > $2 THEN NULL ELSE o.patch::text END AS patch,
         o.object_type, o.operation, o.team_id, o.attempts,
         (SELECT 1 FROM prism_outbox q
          WHERE q.record_id = o.record_id AND q.id > o.id
            AND q.state IN ('pending', 'retrying', 'in_flight') AND (q.state || '') <> 'in_flight'
          LIMIT 1) IS NOT NULL AS has_later"
    };
}
/// Whether the candidate `o` may be claimed as far as visibility goes: inserted below the
/// watermark (no transaction that may still commit an older row is open), or inserted on
/// another cluster. A row restored with `pg_dump` or copied by logical replication keeps the
/// `txid` its first cluster gave it, which can lie past every xid this cluster has handed out:
/// compared with this cluster's watermark it would wait until this cluster had used as many.
/// A row this statement can see was committed before its snapshot, so a `txid` at or past the
/// snapshot's `xmax` cannot be this cluster's: it is old, and claimable.
macro_rules! below_watermark {
    () => {
        "(o.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))
          OR o.txid >= (SELECT pg_snapshot_xmax(pg_current_snapshot())))"
    };
}

/// The per-record order guard as a scalar subquery, not NOT EXISTS: the planner cannot turn it
/// into an anti-join, so it stays one index probe per candidate however stale the statistics
/// are (as an anti-join it degraded to a full index scan per candidate on a freshly loaded
/// table: 1.2 s instead of 1 ms per claim).
macro_rules! record_guard {
    () => {
        "(SELECT 1 FROM prism_outbox p
          WHERE p.record_id = o.record_id AND p.id < o.id
            AND p.state IN ('pending', 'retrying', 'in_flight')
          LIMIT 1) IS NULL"
    };
}

/// The advisory lock class of a lane's tail claim (`b"pris"`), see `try_lock_lane`.
const LANE_TAIL_LOCK_CLASS: i32 = 0x7072_6973;

/// The channel the outbox's insert trigger notifies.
pub const NOTIFY_CHANNEL: &str = "prism_outbox";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// One claim of this process at a time locks its rows ([`Dialect::scan_gate`]).
    scan_gate: Arc<tokio::sync::Mutex<()>>,
}

impl PgStore {
    pub async fn connect(settings: &DatabaseSettings) -> StoreResult<PgStore> {
        let options: PgConnectOptions = settings.url.parse()?;
        // JIT compilation costs tens to hundreds of milliseconds and pays off only for long
        // analytical queries; every statement here is a short index walk.
        let options = options
            .application_name("prism-sync")
            .options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .after_connect(|_, _| {
                Box::pin(async {
                    nodelay::set_on_every_tcp_socket();
                    Ok(())
                })
            })
            .max_connections(settings.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(PgStore {
            pool,
            scan_gate: Arc::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn listener(&self) -> StoreResult<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        migrate::run(&self.pool, &MIGRATOR).await
    }

    pub async fn migrations_current(&self) -> StoreResult<bool> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Ok(false);
        }
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?;
        Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
    }

    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn extend_leases(
        &self,
        owner: &str,
        lease: Duration,
        batches: &[Uuid],
    ) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE prism_batches SET lease_expires_at = now() + make_interval(secs => $2)
             WHERE lease_owner = $1 AND state = 'open' AND id = ANY($3)",
        )
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(batches)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn drop_leases(&self, owner: &str) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE prism_batches SET lease_owner = NULL, lease_expires_at = NULL
             WHERE lease_owner = $1 AND state = 'open'",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn defer_batch(&self, d: &DeferBatch<'_>) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let fenced = sqlx::query(
            "UPDATE prism_batches SET attempts = attempts + $3,
                    next_attempt_at = now() + make_interval(secs => $4),
                    lease_owner = NULL, lease_expires_at = NULL, last_status = $5, last_error = $6
             WHERE id = $1 AND lease_owner = $2 AND state = 'open'",
        )
        .bind(d.batch_id)
        .bind(d.owner)
        .bind(i32::from(d.count_attempt))
        .bind(d.retry_in.as_secs_f64())
        .bind(d.attempt.http_status.map(i32::from))
        .bind(d.attempt.stored_detail())
        .execute(&mut *tx)
        .await?;
        if fenced.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_attempt(&mut tx, d.batch_id, d.owner, &d.attempt).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn end_stranded_batches(&self, teams: &crate::batch::TeamSet) -> StoreResult<u64> {
        let teams: Vec<&str> = teams.iter().collect();
        let mut tx = self.pool.begin().await?;
        // Locked, skipping any a live process is writing, so two replicas sweep apart.
        let stranded: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM prism_batches
             WHERE state = 'open' AND NOT (team_id = ANY($1))
               AND (lease_expires_at IS NULL OR lease_expires_at <= now())
             FOR UPDATE SKIP LOCKED",
        )
        .bind(&teams)
        .fetch_all(&mut *tx)
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
        // Unfinished rows through prism_outbox_record (its predicate is exactly these states)
        // and dead ones through prism_outbox_dead_record: bounded by the backlog and the dead,
        // not by the finished rows kept (see `succeeded_rows`).
        let rows = sqlx::query(
            "SELECT state, count(*) FROM prism_outbox
             WHERE state IN ('pending', 'retrying', 'in_flight') GROUP BY state",
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
            "SELECT
               (SELECT COALESCE(extract(epoch FROM now() - min(t)), 0)::float8 FROM (
                  SELECT (SELECT enqueued_at FROM prism_outbox WHERE id = (
                    -- The oldest of the lanes' first rows, teams found by a skip scan.
                    WITH RECURSIVE teams(t) AS (
                        (SELECT team_id FROM prism_outbox WHERE state IN ('pending', 'retrying')
                         ORDER BY team_id LIMIT 1)
                        UNION ALL
                        SELECT (SELECT team_id FROM prism_outbox
                                WHERE state IN ('pending', 'retrying') AND team_id > teams.t
                                ORDER BY team_id LIMIT 1)
                        FROM teams WHERE teams.t IS NOT NULL)
                    SELECT min((SELECT min(id) FROM prism_outbox
                                WHERE team_id = teams.t AND object_type = ty
                                  AND state IN ('pending', 'retrying')))
                    FROM teams, unnest($1::text[]) AS ty WHERE teams.t IS NOT NULL)) AS t
                  UNION ALL
                  -- Per open batch, through its rows' index: bounded by the rows in flight.
                  -- `IS TRUE` keeps the planner off prism_outbox_record (its predicate names
                  -- in_flight), whose bitmap it would AND in, reading every waiting row's entry
                  -- once per batch; as a join it chose a scan of the whole outbox instead.
                  SELECT min((SELECT min(o.enqueued_at) FROM prism_outbox o
                              WHERE o.batch_id = b.id AND (o.state = 'in_flight') IS TRUE))
                  FROM prism_batches b WHERE b.state = 'open') AS ages),
               (SELECT COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8
                  FROM prism_batches WHERE state = 'open'),
               (SELECT count(*) FROM prism_batches WHERE state = 'open'),
               (SELECT count(*) FROM (
                  SELECT o.id, o.record_id FROM prism_outbox o WHERE o.state IN ('pending', 'retrying')
                  LIMIT 10000) w
                WHERE EXISTS (
                    SELECT 1 FROM prism_outbox p WHERE p.record_id = w.record_id AND p.id < w.id
                      AND p.state IN ('pending', 'retrying', 'in_flight'))),
               (SELECT COALESCE(sum(rows), 0)::bigint FROM prism_audit WHERE action = 'replay'),
               -- How long the transaction the watermark waits for (an open outbox writer) has run.
               (SELECT COALESCE(extract(epoch FROM now() - min(held.since)), 0)::float8
                  FROM (SELECT prism_outbox_watermark(pg_current_snapshot())::xid AS xid) w,
                       LATERAL (SELECT a.xact_start AS since FROM pg_stat_activity a
                                WHERE a.backend_xid = w.xid
                                UNION ALL
                                SELECT p.prepared FROM pg_prepared_xacts p
                                WHERE p.transaction = w.xid) held)",
        )
        .bind(ClaimRequest::known_types())
        .fetch_one(&self.pool)
        .await?;
        g.oldest_pending_age_seconds = row.try_get::<f64, _>(0)?.max(0.0);
        g.oldest_batch_key_age_seconds = row.try_get::<f64, _>(1)?.max(0.0);
        g.batches_in_flight = row.try_get(2)?;
        g.rows_held_back = row.try_get(3)?;
        g.operator_replayed_rows = row.try_get(4)?;
        g.watermark_lag_seconds = row.try_get::<f64, _>(5)?.max(0.0);
        Ok(g)
    }
}

/// The Postgres statements: each works on a whole set at once (`unnest` arrays), so a claim or
/// a round of batch ends costs a fixed number of round trips whatever its size.
impl Dialect for PgStore {
    type Tx = Transaction<'static, Postgres>;

    fn scan_gate(&self) -> Option<&tokio::sync::Mutex<()>> {
        Some(&self.scan_gate)
    }

    async fn begin(&self) -> StoreResult<Self::Tx> {
        Ok(begin(&self.pool).await?)
    }

    async fn begin_claim(&self) -> StoreResult<Self::Tx> {
        let mut tx = self.pool.begin().await?;
        // Before the claim's first statement, so that every snapshot it reads from is taken
        // with the gate held (see CLAIM_GATE); in the same round trip as the settings.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "{INDEX_WALKS_ONLY}; SELECT pg_advisory_xact_lock_shared({}, {})",
            CLAIM_GATE.0, CLAIM_GATE.1
        )))
        .execute(&mut *tx)
        .await?;
        Ok(tx)
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
        let (teams, types): (Vec<&str>, Vec<&str>) = lanes
            .iter()
            .map(|l| (l.team.as_str(), l.object_type.as_str()))
            .unzip();
        Ok(sqlx::query_as(
            "SELECT l.team_id, l.object_type FROM unnest($1::text[], $2::text[]) AS l(team_id, object_type)
             WHERE EXISTS (SELECT 1 FROM prism_outbox o
                           WHERE o.team_id = l.team_id AND o.object_type = l.object_type
                             AND o.state IN ('pending', 'retrying'))",
        )
        .bind(&teams)
        .bind(&types)
        .fetch_all(&mut **tx)
        .await?)
    }

    async fn lane_fill(
        &self,
        tx: &mut Self::Tx,
        lanes: &[(String, String)],
        recent: usize,
    ) -> StoreResult<Vec<Vec<RecentBatch>>> {
        let (teams, types): (Vec<&str>, Vec<&str>) =
            lanes.iter().map(|(t, o)| (t.as_str(), o.as_str())).unzip();
        // The newest batches of each lane, through prism_batches_lane (team, type, created_at).
        let rows = sqlx::query(
            "SELECT l.n, b.row_count, extract(epoch FROM now() - b.created_at)::float8 AS age
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(team_id, object_type, n)
             CROSS JOIN LATERAL (
                 SELECT row_count, created_at FROM prism_batches
                 WHERE team_id = l.team_id AND object_type = l.object_type
                 ORDER BY created_at DESC LIMIT $3) b",
        )
        .bind(&teams)
        .bind(&types)
        .bind(i64::try_from(recent).unwrap_or(i64::MAX))
        .fetch_all(&mut **tx)
        .await?;
        let mut out = vec![Vec::new(); lanes.len()];
        for row in &rows {
            let n: i64 = row.try_get(0)?;
            let rows: i32 = row.try_get(1)?;
            let age: f64 = row.try_get(2)?;
            if let Some(lane) = usize::try_from(n - 1).ok().and_then(|i| out.get_mut(i)) {
                lane.push(RecentBatch {
                    rows: usize::try_from(rows).unwrap_or(0),
                    age: seconds(age),
                });
            }
        }
        Ok(out)
    }

    async fn lane_backlog(
        &self,
        tx: &mut Self::Tx,
        lanes: &[(String, String)],
        cap: usize,
    ) -> StoreResult<Vec<Backlog>> {
        let (teams, types): (Vec<&str>, Vec<&str>) =
            lanes.iter().map(|(t, o)| (t.as_str(), o.as_str())).unzip();
        // lane_heads' conditions without its lock: a plain read that leaves no trace.
        let rows = sqlx::query(concat!(
            "SELECT l.n, d.due, d.oldest
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(team_id, object_type, n)
             CROSS JOIN LATERAL (
                 SELECT count(*) AS due,
                        COALESCE(extract(epoch FROM now() - min(c.next_attempt_at)), 0)::float8 AS oldest
                 FROM (SELECT o.next_attempt_at FROM prism_outbox o
                       WHERE o.team_id = l.team_id AND o.object_type = l.object_type
                         AND o.state IN ('pending', 'retrying') AND o.next_attempt_at <= now()
                         AND ",
                         below_watermark!(),
                         "
                         AND ",
            record_guard!(),
            " ORDER BY o.id LIMIT $3) c) d"
        ))
        .bind(&teams)
        .bind(&types)
        .bind(i64::try_from(cap).unwrap_or(i64::MAX))
        .fetch_all(&mut **tx)
        .await?;
        let mut out = vec![
            Backlog {
                due: 0,
                oldest_due: Duration::ZERO,
            };
            lanes.len()
        ];
        for row in &rows {
            let n: i64 = row.try_get(0)?;
            let due: i64 = row.try_get(1)?;
            let oldest: f64 = row.try_get(2)?;
            if let Some(lane) = usize::try_from(n - 1).ok().and_then(|i| out.get_mut(i)) {
                *lane = Backlog {
                    due: usize::try_from(due).unwrap_or(0),
                    oldest_due: seconds(oldest),
                };
            }
        }
        Ok(out)
    }

    async fn try_lock_lane(
        &self,
        tx: &mut Self::Tx,
        (team, object_type): &(String, String),
    ) -> StoreResult<bool> {
        // A transaction-level advisory lock in a class of prism-sync's own (two-key form: it
        // cannot meet the migrators' one-key lock or an application's bigint locks).
        Ok(sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock($1, hashtext($2 || chr(31) || $3))",
        )
        .bind(LANE_TAIL_LOCK_CLASS)
        .bind(team)
        .bind(object_type)
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn oldest_due(&self, tx: &mut Self::Tx, ids: &[i64]) -> StoreResult<Duration> {
        let age: f64 = sqlx::query_scalar(
            "SELECT COALESCE(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8
             FROM prism_outbox WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(&mut **tx)
        .await?;
        Ok(seconds(age))
    }

    async fn lane_heads(
        &self,
        tx: &mut Self::Tx,
        (team, object_type): &(String, String),
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>> {
        let heads = sqlx::query(concat!(
            "SELECT ",
            head_columns!(),
            " FROM prism_outbox o
             WHERE o.team_id = $3 AND o.object_type = $4
               AND o.state IN ('pending', 'retrying') AND o.next_attempt_at <= now()
               AND ",
            below_watermark!(),
            "
               AND ",
            record_guard!(),
            " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
        ))
        .bind(claim_limit(req))
        .bind(max_patch(req))
        .bind(team)
        .bind(object_type)
        .fetch_all(&mut **tx)
        .await?;
        Ok(heads.iter().map(candidate).collect::<Result<Vec<_>, _>>()?)
    }

    async fn strays(
        &self,
        tx: &mut Self::Tx,
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>> {
        let known_teams: Vec<&str> = req.teams.iter().collect();
        let strays = sqlx::query(concat!(
            "SELECT ",
            head_columns!(),
            " FROM prism_outbox o
             WHERE o.state IN ('pending', 'retrying') AND o.next_attempt_at <= now()
               AND ",
            below_watermark!(),
            "
               AND NOT (o.team_id = ANY($3) AND o.object_type = ANY($4))
               AND ",
            record_guard!(),
            " LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
        ))
        .bind(claim_limit(req))
        .bind(max_patch(req))
        .bind(&known_teams)
        .bind(ClaimRequest::known_types())
        .fetch_all(&mut **tx)
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
        // `record_id` is a uuid column: a head whose record id is not one has no followers.
        let (records, head_ids): (Vec<Uuid>, Vec<i64>) = heads
            .iter()
            .filter_map(|h| {
                std::str::from_utf8(&h.record_id_raw)
                    .ok()
                    .and_then(|r| Uuid::parse_str(r).ok())
                    .map(|r| (r, h.id))
            })
            .unzip();
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(concat!(
            "SELECT f.id, f.record_id, f.patch, f.object_type, f.operation, f.team_id, f.attempts,
                    true AS has_later
             FROM unnest($1::uuid[], $2::bigint[]) AS h(record_id, head_id)
             CROSS JOIN LATERAL (
                 SELECT o.id, o.record_id::text AS record_id,
                        CASE WHEN octet_length(o.patch::text) > $3 THEN NULL ELSE o.patch::text END AS patch,
                        o.object_type, o.operation, o.team_id, o.attempts
                 FROM prism_outbox o
                 -- The state test is spelt so that it implies the record index's predicate
                 -- but not the lane index's: with stale statistics the planner otherwise
                 -- walked every waiting row for every head (1 ms a head).
                 WHERE o.record_id = h.record_id AND o.id > h.head_id
                   AND o.state IN ('pending', 'retrying', 'in_flight') AND (o.state || '') <> 'in_flight'
                   AND ",
               below_watermark!(),
               "
                 ORDER BY o.record_id, o.id
                 LIMIT $4
                 FOR UPDATE OF o) f"
        ))
        .bind(&records)
        .bind(&head_ids)
        .bind(max_patch(req))
        .bind(i64::try_from(req.limits.max_coalesce - 1).unwrap_or(i64::MAX))
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows.iter().map(candidate).collect::<Result<Vec<_>, _>>()?)
    }

    async fn insert_batches(
        &self,
        tx: &mut Self::Tx,
        batches: &[NewBatch],
        owner: &str,
        lease: Duration,
        parent: Option<Uuid>,
    ) -> StoreResult<()> {
        if batches.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = batches.iter().map(|b| b.id).collect();
        let keys: Vec<&str> = batches.iter().map(|b| b.idempotency_key.as_str()).collect();
        let types: Vec<&str> = batches.iter().map(|b| b.object_type.as_str()).collect();
        let teams: Vec<&str> = batches.iter().map(|b| b.team.as_str()).collect();
        let operations: Vec<&str> = batches.iter().map(|b| b.operation.as_str()).collect();
        let bodies: Vec<&[u8]> = batches.iter().map(|b| b.body.as_slice()).collect();
        let items: Vec<String> = batches.iter().map(NewBatch::items_json).collect();
        let item_counts: Vec<i32> = batches
            .iter()
            .map(|b| i32::try_from(b.items.len()).unwrap_or(i32::MAX))
            .collect();
        let row_counts: Vec<i32> = batches
            .iter()
            .map(|b| i32::try_from(b.row_count()).unwrap_or(i32::MAX))
            .collect();
        sqlx::query(
            "INSERT INTO prism_batches
               (id, idempotency_key, object_type, body, items, item_count, row_count, lease_owner, lease_expires_at, parent_id,
                team_id, operation)
             SELECT b.id, b.key, b.object_type, b.body, b.items, b.item_count, b.row_count,
                    $8, now() + make_interval(secs => $9), $10, b.team_id, b.operation
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int[], $7::int[],
                         $11::text[], $12::text[])
                  AS b(id, key, object_type, body, items, item_count, row_count, team_id, operation)",
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&types)
        .bind(&bodies)
        .bind(&items)
        .bind(&item_counts)
        .bind(&row_counts)
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(parent)
        .bind(&teams)
        .bind(&operations)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn mark_in_flight(&self, tx: &mut Self::Tx, batches: &[NewBatch]) -> StoreResult<()> {
        let (rows, owners): (Vec<i64>, Vec<Uuid>) =
            batches.iter().flat_map(|b| b.row_assignments()).unzip();
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE prism_outbox o SET state = 'in_flight', batch_id = u.batch_id,
                    first_attempt_at = COALESCE(o.first_attempt_at, now())
             FROM unnest($1::bigint[], $2::uuid[]) AS u(id, batch_id) WHERE o.id = u.id",
        )
        .bind(&rows)
        .bind(&owners)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn mark_dead(&self, tx: &mut Self::Tx, rows: &[DeadRow]) -> StoreResult<()> {
        let ids: Vec<i64> = rows.iter().map(|d| d.id).collect();
        let codes: Vec<&str> = rows.iter().map(|d| d.code).collect();
        let messages: Vec<&str> = rows.iter().map(|d| d.message.as_str()).collect();
        sqlx::query(
            "UPDATE prism_outbox o SET state = 'dead', completed_at = now(),
                    last_error_code = u.code, last_error_message = u.message
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, code, message)
             WHERE o.id = u.id",
        )
        .bind(&ids)
        .bind(&codes)
        .bind(&messages)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn fence(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<HashSet<Uuid>> {
        Ok(sqlx::query_scalar(
            "UPDATE prism_batches b SET state = u.end_state, completed_at = now(), lease_owner = NULL,
                    lease_expires_at = NULL, last_status = u.status, last_error = u.error
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[])
                  AS u(id, owner, end_state, status, error)
             WHERE b.id = u.id AND b.lease_owner = u.owner AND b.state = 'open'
             RETURNING b.id",
        )
        .bind(ends.iter().map(|f| f.batch_id).collect::<Vec<_>>())
        .bind(ends.iter().map(|f| f.owner.as_str()).collect::<Vec<_>>())
        .bind(ends.iter().map(|f| f.end.as_str()).collect::<Vec<_>>())
        .bind(
            ends.iter()
                .map(|f| f.attempt.http_status.map(i32::from))
                .collect::<Vec<_>>(),
        )
        .bind(
            ends.iter()
                .map(|f| f.attempt.stored_detail())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect())
    }

    async fn write_attempts(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO prism_batch_attempts (batch_id, attempt, owner, http_status, outcome, detail, replay, duration_ms)
             SELECT u.batch_id,
                    (SELECT COALESCE(max(a.attempt), 0) + 1 FROM prism_batch_attempts a WHERE a.batch_id = u.batch_id),
                    u.owner, u.http_status, u.outcome, u.detail, u.replay, u.duration_ms
             FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bool[], $7::int[])
                  AS u(batch_id, owner, http_status, outcome, detail, replay, duration_ms)",
        )
        .bind(ends.iter().map(|f| f.batch_id).collect::<Vec<_>>())
        .bind(ends.iter().map(|f| f.owner.as_str()).collect::<Vec<_>>())
        .bind(
            ends.iter()
                .map(|f| f.attempt.http_status.map(i32::from))
                .collect::<Vec<_>>(),
        )
        .bind(ends.iter().map(|f| f.attempt.stored_outcome()).collect::<Vec<_>>())
        .bind(ends.iter().map(|f| f.attempt.stored_detail()).collect::<Vec<_>>())
        .bind(ends.iter().map(|f| f.attempt.replay).collect::<Vec<_>>())
        .bind(
            ends.iter()
                .map(|f| i32::try_from(f.attempt.duration.as_millis()).unwrap_or(i32::MAX))
                .collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn write_rows(&self, tx: &mut Self::Tx, ends: &[&FinishBatch]) -> StoreResult<()> {
        let rows: Vec<(&FinishBatch, &RowUpdate)> = ends
            .iter()
            .flat_map(|f| f.rows.iter().map(move |r| (*f, r)))
            .collect();
        let c = RowColumns::of(rows.iter().map(|(f, r)| (*r, f.give_up_after)));
        let batch_ids: Vec<Uuid> = rows.iter().map(|(f, _)| f.batch_id).collect();
        update_rows(tx, &c, &batch_ids).await
    }

    async fn lease_due(&self, req: &DueRequest<'_>) -> StoreResult<Vec<StoreResult<LeasedBatch>>> {
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT id FROM prism_batches
                 WHERE state = 'open' AND next_attempt_at <= now()
                   AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                   AND team_id = ANY($4)
                   AND (team_id, object_type) NOT IN (SELECT * FROM unnest($5::text[], $6::text[]))
                 ORDER BY next_attempt_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE prism_batches b SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
             FROM due WHERE b.id = due.id
             RETURNING b.id, b.idempotency_key, b.team_id, b.object_type, b.operation, b.body, b.items, b.attempts,
                       extract(epoch FROM now() - b.created_at)::float8 AS key_age,
                       EXISTS (SELECT 1 FROM prism_batch_attempts a
                               WHERE a.batch_id = b.id AND a.http_status BETWEEN 200 AND 299) AS answered,
                       (SELECT COALESCE(extract(epoch FROM now() - min(o.first_attempt_at)), 0)::float8
                        FROM prism_outbox o WHERE o.batch_id = b.id AND o.state = 'in_flight') AS oldest_row_age",
        )
        .bind(req.owner)
        .bind(req.lease.as_secs_f64())
        .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
        .bind(req.teams)
        .bind(req.skip_lanes.iter().map(|l| l.team.as_str()).collect::<Vec<_>>())
        .bind(req.skip_lanes.iter().map(|l| l.object_type.as_str()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| lease::leased(row, row.try_get("id")?))
            .collect())
    }

    async fn end_batch_dead(&self, batch: Uuid, code: &str, message: &str) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        end_batches_dead(&mut tx, &[batch], code, message).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// A number of seconds the database computed as a duration (negative: zero).
fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1e9))
}

/// How many heads a lane statement may return.
fn claim_limit(req: &ClaimRequest<'_>) -> i64 {
    i64::try_from(req.max_records).unwrap_or(i64::MAX)
}

/// The largest patch a claim reads (a larger one is read as NULL, and goes dead).
fn max_patch(req: &ClaimRequest<'_>) -> i32 {
    i32::try_from(req.limits.max_patch_bytes).unwrap_or(i32::MAX)
}

fn candidate(row: &sqlx::postgres::PgRow) -> Result<CandidateRow, sqlx::Error> {
    Ok(CandidateRow {
        id: row.try_get("id")?,
        record_id_raw: row.try_get::<String, _>("record_id")?.into_bytes(),
        patch: row
            .try_get::<Option<String>, _>("patch")?
            .map(String::into_bytes),
        object_type: row.try_get::<String, _>("object_type")?.into_bytes(),
        operation: row.try_get::<String, _>("operation")?.into_bytes(),
        team_id: row.try_get::<String, _>("team_id")?.into_bytes(),
        attempts: row.try_get("attempts")?,
        has_later: row.try_get("has_later")?,
    })
}

/// Ends open batches for good, inside `tx`: their rows still in flight go `dead` with `code`
/// and `message`, the batches end `released`. Returns how many rows went dead.
async fn end_batches_dead(
    tx: &mut Transaction<'static, Postgres>,
    batches: &[Uuid],
    code: &str,
    message: &str,
) -> StoreResult<u64> {
    if batches.is_empty() {
        return Ok(0);
    }
    let dead = sqlx::query(
        "UPDATE prism_outbox SET state = 'dead', completed_at = now(),
                last_error_code = $2, last_error_message = $3
         WHERE state = 'in_flight' AND batch_id = ANY($1)",
    )
    .bind(batches)
    .bind(code)
    .bind(message)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE prism_batches SET state = 'released', completed_at = now(), lease_owner = NULL,
                lease_expires_at = NULL, last_error = $2
         WHERE state = 'open' AND id = ANY($1)",
    )
    .bind(batches)
    .bind(message)
    .execute(&mut **tx)
    .await?;
    Ok(dead)
}

async fn insert_attempt(
    tx: &mut Transaction<'static, Postgres>,
    batch: Uuid,
    owner: &str,
    a: &super::AttemptRecord,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO prism_batch_attempts (batch_id, attempt, owner, http_status, outcome, detail, replay, duration_ms)
         VALUES ($1, (SELECT COALESCE(max(attempt), 0) + 1 FROM prism_batch_attempts WHERE batch_id = $1),
                 $2, $3, $4, $5, $6, $7)",
    )
    .bind(batch)
    .bind(owner)
    .bind(a.http_status.map(i32::from))
    .bind(a.stored_outcome())
    .bind(a.stored_detail())
    .bind(a.replay)
    .bind(i32::try_from(a.duration.as_millis()).unwrap_or(i32::MAX))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Each row's new state after its batch's end; only rows still in flight in that batch.
async fn update_rows(
    tx: &mut Transaction<'static, Postgres>,
    c: &RowColumns,
    batch_ids: &[Uuid],
) -> StoreResult<()> {
    // A row that would retry but was first tried longer than `retry.give_up_after` ago goes
    // dead with its code instead (`gave_up`).
    macro_rules! gave_up {
        () => {
            "(u.state = 'retrying' AND o.first_attempt_at <= now() - make_interval(secs => u.give_up))"
        };
    }
    sqlx::query(concat!(
        "UPDATE prism_outbox o SET
            state = CASE WHEN ",
        gave_up!(),
        " THEN 'dead' ELSE u.state END,
            attempts = o.attempts + 1,
            next_attempt_at = CASE WHEN u.state = 'retrying'
                THEN now() + make_interval(secs => u.retry_in) ELSE o.next_attempt_at END,
            completed_at = CASE WHEN u.state IN ('succeeded', 'dead') OR ",
        gave_up!(),
        " THEN now() ELSE NULL END,
            last_error_code = COALESCE(u.code, o.last_error_code),
            last_error_message = CASE WHEN ",
        gave_up!(),
        " THEN 'gave up (retry.give_up_after): ' || COALESCE(u.message, o.last_error_message, '')
                ELSE COALESCE(u.message, o.last_error_message) END
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::uuid[],
                     $7::float8[])
              AS u(id, state, code, message, retry_in, batch_id, give_up)
         WHERE o.id = u.id AND o.batch_id = u.batch_id AND o.state = 'in_flight'",
    ))
    .bind(&c.ids)
    .bind(&c.states)
    .bind(&c.codes)
    .bind(&c.messages)
    .bind(&c.retry_in)
    .bind(batch_ids)
    .bind(&c.give_up_after)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
