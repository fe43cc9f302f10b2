//! The Postgres store: any number of replicas share one outbox. Claims use
//! `FOR UPDATE SKIP LOCKED` below the visibility watermark; batch rows carry a lease that the
//! owner extends and another replica takes over when it lapses.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    ClaimOutcome, ClaimRequest, DeferBatch, DueRequest, FinishBatch, Gauges, LeasedBatch,
    RowColumns, RowUpdate, StoreError, StoreResult,
};
use crate::batch::{self, BatchItem, CandidateRow, NewBatch};
use crate::model::codes;
use crate::settings::DatabaseSettings;

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

/// The channel the outbox's insert trigger notifies.
pub const NOTIFY_CHANNEL: &str = "prism_outbox";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
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
        Ok(PgStore { pool })
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

    pub async fn claim(&self, req: &ClaimRequest<'_>) -> StoreResult<ClaimOutcome> {
        let mut tx = begin(&self.pool).await?;
        let max_patch = i32::try_from(req.limits.max_patch_bytes).unwrap_or(i32::MAX);
        let limit = i64::try_from(req.max_records).unwrap_or(i64::MAX);
        // Which of the lanes hold waiting rows at all: one index probe each, one round trip.
        let (teams, types): (Vec<&str>, Vec<&str>) = req
            .lanes
            .iter()
            .map(|l| (l.team.as_str(), l.object_type.as_str()))
            .unzip();
        let busy: Vec<(String, String)> = sqlx::query_as(
            "SELECT l.team_id, l.object_type FROM unnest($1::text[], $2::text[]) AS l(team_id, object_type)
             WHERE EXISTS (SELECT 1 FROM prism_outbox o
                           WHERE o.team_id = l.team_id AND o.object_type = l.object_type
                             AND o.state IN ('pending', 'retrying'))",
        )
        .bind(&teams)
        .bind(&types)
        .fetch_all(&mut *tx)
        .await?;
        let mut per_lane = Vec::with_capacity(busy.len() + 1);
        for (team, object_type) in &busy {
            let heads = sqlx::query(concat!(
                "SELECT ",
                head_columns!(),
                " FROM prism_outbox o
                 WHERE o.team_id = $3 AND o.object_type = $4
                   AND o.state IN ('pending', 'retrying') AND o.next_attempt_at <= now()
                   AND o.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))
                   AND ",
                record_guard!(),
                " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
            ))
            .bind(limit)
            .bind(max_patch)
            .bind(team)
            .bind(object_type)
            .fetch_all(&mut *tx)
            .await?;
            per_lane.push(heads.iter().map(candidate).collect::<Result<Vec<_>, _>>()?);
        }
        if req.strays {
            // Rows no lane holds (an unknown team or object type): a scan of every waiting row,
            // so the engine asks for it only now and then. They go dead in this claim.
            let known_teams: Vec<&str> = req.teams.iter().collect();
            let strays = sqlx::query(concat!(
                "SELECT ",
                head_columns!(),
                " FROM prism_outbox o
                 WHERE o.state IN ('pending', 'retrying') AND o.next_attempt_at <= now()
                   AND o.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))
                   AND NOT (o.team_id = ANY($3) AND o.object_type = ANY($4))
                   AND ",
                record_guard!(),
                " LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
            ))
            .bind(limit)
            .bind(max_patch)
            .bind(&known_teams)
            .bind(ClaimRequest::known_types())
            .fetch_all(&mut *tx)
            .await?;
            per_lane.push(
                strays
                    .iter()
                    .map(candidate)
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        let heads = batch::fair_share(per_lane, req.max_records);
        if heads.is_empty() {
            tx.rollback().await?;
            return Ok(ClaimOutcome::default());
        }
        let mut followers = Vec::new();
        if req.limits.coalesce && req.limits.max_coalesce > 1 {
            let (records, head_ids): (Vec<Uuid>, Vec<i64>) = heads
                .iter()
                .filter(|h| h.has_later && h.may_coalesce())
                .filter_map(|h| {
                    std::str::from_utf8(&h.record_id_raw)
                        .ok()
                        .and_then(|r| Uuid::parse_str(r).ok())
                        .map(|r| (r, h.id))
                })
                .unzip();
            if !records.is_empty() {
                let rows = sqlx::query(
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
                           AND o.txid < (SELECT prism_outbox_watermark(pg_current_snapshot()))
                         ORDER BY o.record_id, o.id
                         LIMIT $4
                         FOR UPDATE OF o) f",
                )
                .bind(&records)
                .bind(&head_ids)
                .bind(max_patch)
                .bind(i64::try_from(req.limits.max_coalesce - 1).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await?;
                for row in &rows {
                    followers.push(candidate(row)?);
                }
            }
        }
        let chains = batch::record_chains(heads, followers);
        let plan = batch::plan_batches(chains, req.limits, req.teams);
        insert_batches(&mut tx, &plan.batches, req.owner, req.lease, None).await?;
        mark_in_flight(&mut tx, &plan.batches).await?;
        if !plan.dead.is_empty() {
            let ids: Vec<i64> = plan.dead.iter().map(|d| d.id).collect();
            let codes: Vec<&str> = plan.dead.iter().map(|d| d.code).collect();
            let messages: Vec<&str> = plan.dead.iter().map(|d| d.message.as_str()).collect();
            sqlx::query(
                "UPDATE prism_outbox o SET state = 'dead', completed_at = now(),
                        last_error_code = u.code, last_error_message = u.message
                 FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, code, message)
                 WHERE o.id = u.id",
            )
            .bind(&ids)
            .bind(&codes)
            .bind(&messages)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(ClaimOutcome {
            batches: plan.batches.into_iter().map(LeasedBatch::fresh).collect(),
            dead: plan.dead,
        })
    }

    pub async fn lease_due_batches(&self, req: &DueRequest<'_>) -> StoreResult<Vec<LeasedBatch>> {
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT id FROM prism_batches
                 WHERE state = 'open' AND next_attempt_at <= now()
                   AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                   AND team_id = ANY($4)
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
        .fetch_all(&self.pool)
        .await?;
        let (batches, corrupt) = super::readable(rows.iter().map(leased))?;
        for (batch, reason) in corrupt {
            self.end_corrupt_batch(batch, &reason).await?;
        }
        Ok(batches)
    }

    /// Ends a stored batch that cannot be read back: see [`super::corrupt_message`].
    async fn end_corrupt_batch(&self, batch: Uuid, reason: &str) -> StoreResult<()> {
        let message = super::corrupt_message(batch, reason);
        let mut tx = self.pool.begin().await?;
        end_batches_dead(&mut tx, &[batch], codes::CORRUPT_BATCH, &message).await?;
        tx.commit().await?;
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

    /// Records a group of batch ends in one transaction, in three statements whatever the
    /// group's size (fence, attempts, rows): each statement is a round trip, and a group of
    /// eight batches written batch by batch took 24.
    pub async fn finish_batches(&self, batches: &[FinishBatch]) -> StoreResult<Vec<bool>> {
        let mut tx = begin(&self.pool).await?;
        let mut written = vec![false; batches.len()];
        // A batch ended twice in one group is written in rounds: each round holds the next end
        // of each batch, so a later end meets the fence as the earlier one left it, as when
        // written one after the other.
        let mut left: Vec<usize> = (0..batches.len()).collect();
        while !left.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, later): (Vec<usize>, Vec<usize>) = left
                .into_iter()
                .partition(|&i| seen.insert(batches[i].batch_id));
            let ends: Vec<&FinishBatch> = round.iter().map(|&i| &batches[i]).collect();
            for (i, ok) in round.iter().zip(finish_group(&mut tx, &ends).await?) {
                written[*i] = ok;
            }
            left = later;
        }
        crash_point!("mid_outcomes");
        tx.commit().await?;
        Ok(written)
    }
}

/// The ends of distinct batches, fenced together: which of them are still open and leased to
/// their writer (`false`, and nothing written, for the others).
async fn finish_group(
    tx: &mut Transaction<'static, Postgres>,
    batches: &[&FinishBatch],
) -> StoreResult<Vec<bool>> {
    // In id order, so that two processes fencing overlapping groups (a lease taken over while
    // its first owner was still writing) lock the batch rows in the same order.
    let mut order: Vec<&FinishBatch> = batches.to_vec();
    order.sort_unstable_by_key(|f| f.batch_id);
    let fenced: std::collections::HashSet<Uuid> = sqlx::query_scalar(
        "UPDATE prism_batches b SET state = u.end_state, completed_at = now(), lease_owner = NULL,
                lease_expires_at = NULL, last_status = u.status, last_error = u.error
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[])
              AS u(id, owner, end_state, status, error)
         WHERE b.id = u.id AND b.lease_owner = u.owner AND b.state = 'open'
         RETURNING b.id",
    )
    .bind(order.iter().map(|f| f.batch_id).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.owner.as_str()).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.end.as_str()).collect::<Vec<_>>())
    .bind(
        order
            .iter()
            .map(|f| f.attempt.http_status.map(i32::from))
            .collect::<Vec<_>>(),
    )
    .bind(
        order
            .iter()
            .map(|f| f.attempt.stored_detail())
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let ours: Vec<&FinishBatch> = order
        .into_iter()
        .filter(|f| fenced.contains(&f.batch_id))
        .collect();
    if !ours.is_empty() {
        insert_attempts(tx, &ours).await?;
        let rows: Vec<(&FinishBatch, &RowUpdate)> = ours
            .iter()
            .flat_map(|f| f.rows.iter().map(move |r| (*f, r)))
            .collect();
        if !rows.is_empty() {
            let c = RowColumns::of(rows.iter().map(|(f, r)| (*r, f.give_up_after)));
            let batch_ids: Vec<Uuid> = rows.iter().map(|(f, _)| f.batch_id).collect();
            update_rows(tx, &c, &batch_ids).await?;
        }
        for f in ours.iter().filter(|f| !f.children.is_empty()) {
            insert_batches(tx, &f.children, &f.owner, f.lease, Some(f.batch_id)).await?;
            mark_in_flight(tx, &f.children).await?;
        }
    }
    Ok(batches
        .iter()
        .map(|f| fenced.contains(&f.batch_id))
        .collect())
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

impl PgStore {
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
        let rows = sqlx::query("SELECT state, count(*) FROM prism_outbox GROUP BY state")
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
                  SELECT min(o.enqueued_at) FROM prism_batches b JOIN prism_outbox o ON o.batch_id = b.id
                  WHERE b.state = 'open' AND o.state = 'in_flight') AS ages),
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

fn leased(row: &sqlx::postgres::PgRow) -> StoreResult<LeasedBatch> {
    let id: Uuid = row.try_get("id")?;
    let corrupt = |reason: String| StoreError::CorruptBatch { batch: id, reason };
    let object_type: String = row.try_get("object_type")?;
    let operation: String = row.try_get("operation")?;
    let items: String = row.try_get("items")?;
    let body: Vec<u8> = row.try_get("body")?;
    Ok(LeasedBatch {
        id,
        idempotency_key: row.try_get("idempotency_key")?,
        team: row.try_get("team_id")?,
        object_type: object_type
            .parse()
            .map_err(|e: crate::model::UnknownObjectType| corrupt(e.to_string()))?,
        operation: operation
            .parse()
            .map_err(|e: crate::model::UnknownOperation| corrupt(e.to_string()))?,
        body: body.into(),
        items: serde_json::from_str::<Vec<BatchItem>>(&items)
            .map_err(|e| corrupt(e.to_string()))?,
        attempts: row.try_get("attempts")?,
        key_age: Duration::from_secs_f64(row.try_get::<f64, _>("key_age")?.clamp(0.0, 1e9)),
        answered: row.try_get("answered")?,
        oldest_row_age: Duration::from_secs_f64(
            row.try_get::<f64, _>("oldest_row_age")?.clamp(0.0, 1e11),
        ),
        leased_at: std::time::Instant::now(),
    })
}

async fn insert_batches(
    tx: &mut Transaction<'static, Postgres>,
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

async fn mark_in_flight(
    tx: &mut Transaction<'static, Postgres>,
    batches: &[NewBatch],
) -> StoreResult<()> {
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

/// One attempt row for each of these batch ends.
async fn insert_attempts(
    tx: &mut Transaction<'static, Postgres>,
    ends: &[&FinishBatch],
) -> StoreResult<()> {
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
