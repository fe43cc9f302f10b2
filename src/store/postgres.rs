//! The Postgres store: any number of replicas share one outbox. Claims use
//! `FOR UPDATE SKIP LOCKED` below the visibility watermark; batch rows carry a lease that the
//! owner extends and another replica takes over when it lapses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::dialect::{Dialect, StillWaiting};
use super::{
    BatchEnd, ClaimRequest, DeferBatch, DueRequest, FinishBatch, Gauges, Lane, LeasedBatch,
    RowColumns, RowUpdate, StoreResult, lease,
};
use crate::batch::{CandidateRow, DeadRow, NewBatch};
use crate::linger::{Backlog, RecentBatch};
use crate::model::{RowState, codes};
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
/// settings hold for the one transaction only. Plans are kept generic: the statements take
/// `unnest` arrays, whose custom plans the plan cache judged cheaper than a generic one, so it
/// planned several of a claim's statements again at every claim, at about the cost of running
/// them (ARCHITECTURE.md, "Performance notes").
const INDEX_WALKS_ONLY: &str = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
    SET LOCAL enable_sort = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
    SET LOCAL plan_cache_mode = force_generic_plan";

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

/// The columns a claim reads of a candidate row `o`; `$attempts` is where its tries are counted
/// (the outbox row's own until it is first claimed, its claim row's after). Its patch as text
/// once (`pt`, [`record_neighbour!`]), NULL past `$2` bytes; `has_later` from the neighbour
/// probe `nb`.
macro_rules! head_columns {
    ($attempts:literal) => {
        concat!(
            "o.id, o.record_id::text AS record_id,
             CASE WHEN octet_length(pt.text) > $2 THEN NULL ELSE pt.text END AS patch,
             o.object_type, o.operation, o.team_id, ",
            $attempts,
            " AS attempts, nb.id IS NOT NULL AS has_later"
        )
    };
}

/// Whether an outbox row with the claim row `$c` (NULL columns when it has none) still waits
/// to be sent: never claimed (its stored state is then a waiting one), or waiting again after
/// its claim (replayed, or retrying).
macro_rules! waiting {
    ($c:literal) => {
        concat!(
            "(",
            $c,
            ".id IS NULL OR ",
            $c,
            ".state IN ('pending', 'retrying'))"
        )
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
/// table: 1.2 s instead of 1 ms per claim). An older row of the record is unfinished when it
/// waits (never claimed, or waiting again), or follows a batch that has not ended `done` (in
/// flight). `prism_outbox_record` holds every row whose stored state is not final, which
/// since migration 0015 is every row inserted since: the probe reads the record's older rows
/// from `prism_unfinished_bound()` on (below it every row has finished), not its history.
macro_rules! record_guard {
    () => {
        "(SELECT 1 FROM prism_outbox p
            LEFT JOIN prism_outbox_claims pc ON pc.id = p.id
            LEFT JOIN prism_batches pb ON pb.id = pc.batch_id AND pc.state IS NULL
          WHERE p.record_id = o.record_id AND p.id < o.id
            AND p.id >= (SELECT prism_unfinished_bound())
            AND p.state IN ('pending', 'retrying', 'in_flight')
            AND (pc.id IS NULL OR pc.state IN ('pending', 'retrying')
                 OR (pc.state IS NULL AND pb.state IS DISTINCT FROM 'done'))
          LIMIT 1) IS NULL"
    };
}

/// A lane's floor and late txid (see `prism_lane_floors`, migration 0015) as the columns
/// `floor_id` and `late_txid` of a one-row subquery, for the lane `$t`, `$y`: (0, 0) before
/// its first claim.
macro_rules! lane_floor {
    ($t:literal, $y:literal) => {
        concat!(
            "(SELECT COALESCE(max(f.floor_id), 0) AS floor_id,
                     COALESCE(max(f.late_txid), '0'::xid8) AS late_txid
              FROM prism_lane_floors f WHERE f.team_id = ",
            $t,
            " AND f.object_type = ",
            $y,
            ")"
        )
    };
}

/// The conditions the two sources of never-claimed rows share: waiting as stored, no claim
/// row, due, below the watermark, and no older row of the record unfinished. The claim-row
/// test is a scalar subquery, as the guard is, not NOT EXISTS: both are then tests on the
/// walked row, cheapest first, so that a row another claim took (a floor left behind by
/// overlapping claims) costs one probe of the claim rows' key, not the guard's probe too (as
/// an anti-join it ran after every other test).
macro_rules! takable_unclaimed {
    () => {
        concat!(takable_unclaimed!(unguarded), " AND ", record_guard!())
    };
    (unguarded) => {
        takable_unclaimed!(
            unguarded,
            "(SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id) IS NULL"
        )
    };
    // A walk from `$from` on tests the claim row of each row only when a claim row exists at
    // or past `$from` at all, in any lane (one probe of the claim rows' key for the statement):
    // a claim walks from its lane's floor, moved on past the rows claimed so far and past the
    // span of the claim in flight before it, so while one process drains one lane there is
    // none, and the test costs nothing a row. Claims of other lanes or other replicas, or a
    // retry's claim row, past `$from` bring the row-by-row test back. The same snapshot answers
    // both ways, so the rows taken are the same.
    (unguarded from $from:literal) => {
        takable_unclaimed!(
            unguarded,
            concat!(
                "(NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id >= ",
                $from,
                ") OR (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id) IS NULL)"
            )
        )
    };
    (unguarded, $unclaimed:expr) => {
        concat!(
            " AND o.state IN ('pending', 'retrying') AND ",
            $unclaimed,
            " AND o.next_attempt_at <= now() AND ",
            below_watermark!()
        )
    };
}

/// A head's one probe of its record's other rows, in place of the per-record guard and a
/// second probe for `has_later`, joined to the candidate `o` as `nb` (with `pt`, its patch as
/// text, computed once: `OFFSET 0` keeps the planner from copying the cast into each use). The
/// record's first row from `prism_unfinished_bound()` on, other than `o`, that is either older
/// and unfinished (the guard's test: `o` is held) or later and waiting (`o` has a follower):
/// one walk of the record index in id order that stops at the first, where the guard and the
/// follower probe were a walk each. `o` may be taken when there is none or it is later
/// ([`record_neighbour!`]`(test)`).
macro_rules! record_neighbour {
    () => {
        " LEFT JOIN LATERAL (
             SELECT p.id FROM prism_outbox p
             LEFT JOIN prism_outbox_claims pc ON pc.id = p.id
             LEFT JOIN prism_batches pb ON pb.id = pc.batch_id AND pc.state IS NULL
             WHERE p.record_id = o.record_id AND p.id <> o.id
               AND p.id >= (SELECT prism_unfinished_bound())
               AND p.state IN ('pending', 'retrying', 'in_flight')
               AND CASE WHEN p.id < o.id
                        THEN pc.id IS NULL OR pc.state IN ('pending', 'retrying')
                             OR (pc.state IS NULL AND pb.state IS DISTINCT FROM 'done')
                        ELSE (p.state || '') <> 'in_flight'
                             AND (pc.id IS NULL OR pc.state IN ('pending', 'retrying')) END
             ORDER BY p.id LIMIT 1) nb ON true
           CROSS JOIN LATERAL (SELECT o.patch::text AS text OFFSET 0) pt"
    };
    (test) => {
        " AND (nb.id IS NULL OR nb.id > o.id)"
    };
}

/// The outbox rows `o` of the lane `$t`, `$y` below its floor `$floor` whose transaction is at
/// or past its late txid `$late`, waiting as stored: a short range of the txid index
/// (`prism_outbox_lane_txid`), however long the lane's history. Both steers keep the planner
/// off a walk of the lane index from the lane's first row, which it otherwise picks on a table
/// whose statistics say it is small (every row the lane ever had, 5 ms a walk at 30,000 rows):
/// `o.id + 0` so that the floor is no range of it, and the state test spelt so that it does not
/// imply that partial index's predicate. (No claim-row test: each use adds its own. The claim's
/// own late source, `source_late!`, also carries the plain state test of `takable_unclaimed!`;
/// its `ORDER BY o.txid`, with the claim's sorts off, keeps it on the txid index.)
macro_rules! late_rows {
    ($t:literal, $y:literal, $floor:literal, $late:literal) => {
        concat!(
            "o.team_id = ",
            $t,
            " AND o.object_type = ",
            $y,
            " AND o.txid >= ",
            $late,
            " AND o.id + 0 < ",
            $floor,
            " AND (o.state || '') IN ('pending', 'retrying')"
        )
    };
}

/// The rows `o` of the lane `$t`, `$y` from the id `$from` on that wait as stored (so within
/// the lane index `prism_outbox_lane`, (team_id, object_type, id), partial on that state).
/// Ordered by [`lane_order!`], they are a walk of that index from `$from` to the lane's end.
///
/// The team is matched as `= ANY(ARRAY[...])`, not `=`. With `=` on both columns the planner
/// takes team and type for constants of the walk and keeps only `id` as the order wanted,
/// which the primary key gives as well. Once the table's statistics are fresh and say that
/// most rows are of one lane, it rates the two walks alike and may take the primary key from
/// `$from`, filtering for the lane: every row of every lane since `$from` is read when this
/// lane has none there (each empty lane walked from 0, a quiet lane's floor behind a busy
/// lane's rows: 380–676 ms a claim at 200,000 finished rows, `--mode claim-cost`). The array
/// match is no such constant, so the order wanted is (team_id, id), which only the lane index
/// gives; the btree still treats it as an equality, so every bound of the walk (the type, the
/// ids) ends the scan where it fails, as with `=`. A range on the type (`BETWEEN`) would steer
/// the planner too, but its id bounds would then only filter: an upper one would read the
/// lane past it.
///
/// `key`: the lane and the id bound alone, for a walk that tests the state itself (the
/// claim's first source, through [`takable_unclaimed!`]).
macro_rules! lane_rows {
    ($t:literal, $y:literal, $from:literal) => {
        concat!(
            lane_rows!(key $t, $y, $from),
            " AND o.state IN ('pending', 'retrying')"
        )
    };
    (key $t:literal, $y:literal, $from:literal) => {
        concat!(
            "o.team_id = ANY(ARRAY[",
            $t,
            "]) AND o.object_type = ",
            $y,
            " AND o.id >= ",
            $from
        )
    };
}

/// The order of a walk of [`lane_rows!`]: id order within the lane (`desc`: from its last row).
macro_rules! lane_order {
    () => {
        " ORDER BY o.team_id, o.id"
    };
    (desc) => {
        " ORDER BY o.team_id DESC, o.id DESC"
    };
}

/// The rows a claim of the lane `$t`, `$y` may take, from its three sources, each a `FROM ...
/// WHERE ...` over the outbox row `o` (and `c`, its claim row, in the third); `$floor` and
/// `$late` are the lane's floor and late txid (from a [`lane_floor!`]). Due, below the
/// watermark, and no older row of the record unfinished.
///
/// 1. `fresh`: rows never claimed, walked in the lane from its floor;
/// 2. `late`: rows never claimed below the floor whose transaction is at or past the floor's
///    late txid (they committed after the floor passed them; [`late_rows!`]);
/// 3. `again`: rows waiting again (replayed, retrying), from their claim rows.
macro_rules! source_fresh {
    ($t:literal, $y:literal, $floor:literal) => {
        concat!(
            " FROM prism_outbox o WHERE ",
            lane_rows!(key $t, $y, $floor),
            takable_unclaimed!()
        )
    };
    ($t:literal, $y:literal, $floor:literal, heads) => {
        concat!(
            " FROM prism_outbox o",
            record_neighbour!(),
            " WHERE ",
            lane_rows!(key $t, $y, $floor),
            takable_unclaimed!(unguarded from $floor),
            record_neighbour!(test)
        )
    };
}
macro_rules! source_late {
    ($t:literal, $y:literal, $floor:literal, $late:literal) => {
        concat!(
            " FROM prism_outbox o WHERE ",
            late_rows!($t, $y, $floor, $late),
            takable_unclaimed!()
        )
    };
    ($t:literal, $y:literal, $floor:literal, $late:literal, heads) => {
        concat!(
            " FROM prism_outbox o",
            record_neighbour!(),
            " WHERE ",
            late_rows!($t, $y, $floor, $late),
            takable_unclaimed!(unguarded),
            record_neighbour!(test)
        )
    };
}
macro_rules! source_again {
    ($t:literal, $y:literal) => {
        concat!(
            " FROM prism_outbox_claims c JOIN prism_outbox o ON o.id = c.id WHERE ",
            source_again!(lane $t, $y),
            " AND ",
            record_guard!()
        )
    };
    ($t:literal, $y:literal, heads) => {
        concat!(
            " FROM prism_outbox_claims c JOIN prism_outbox o ON o.id = c.id",
            record_neighbour!(),
            " WHERE ",
            source_again!(lane $t, $y),
            record_neighbour!(test)
        )
    };
    (lane $t:literal, $y:literal) => {
        concat!(
            "c.team_id = ",
            $t,
            " AND c.object_type = ",
            $y,
            " AND c.state IN ('pending', 'retrying') AND c.next_attempt_at <= now()"
        )
    };
}

/// `mark_in_flight`'s insert of the claim rows of the outbox rows `$ids` in flight in the
/// batches `$batches` (arrays, same order): the row's lane, record and tries from its outbox row.
/// For rows that may have a claim row already (the caller moves those: `ON CONFLICT`); the
/// never-claimed rows of a claim are inserted from what the claim read.
macro_rules! claim_rows_insert {
    ($ids:literal, $batches:literal) => {
        concat!(
            "INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, batch_id,
                                              attempts, first_attempt_at)
             SELECT o.id, o.team_id, o.object_type, o.record_id, u.batch_id, o.attempts, now()
             FROM unnest(",
            $ids,
            "::bigint[], ",
            $batches,
            "::uuid[]) AS u(id, batch_id) JOIN prism_outbox o ON o.id = u.id"
        )
    };
}

/// The two CTEs that open the statements moving lanes on from their floors (`park_held`,
/// `advance_floors`), over the lanes `$1`, `$2` (text arrays): `s`, the statement's watermark
/// `w` and snapshot `xmax`; `cur`, each lane with its floor and late txid ((0, 0) before its
/// first claim). Ends after `cur`, without a comma.
macro_rules! floor_ctes {
    () => {
        "WITH s AS (SELECT prism_outbox_watermark(pg_current_snapshot()) AS w,
                    pg_snapshot_xmax(pg_current_snapshot()) AS xmax),
             cur AS (
                 SELECT l.team_id, l.object_type, COALESCE(f.floor_id, 0) AS floor_id,
                        COALESCE(f.late_txid, '0'::xid8) AS late_txid
                 FROM unnest($1::text[], $2::text[]) AS l(team_id, object_type)
                 LEFT JOIN prism_lane_floors f
                        ON f.team_id = l.team_id AND f.object_type = l.object_type)"
    };
}

/// `lanes(team_id, object_type)`: every lane that holds rows, by a skip scan of the lane index
/// (a few index probes a lane, however many rows it holds), in a `WITH RECURSIVE`.
macro_rules! lanes_cte {
    () => {
        "lanes(team_id, object_type) AS (
             (SELECT team_id, object_type FROM prism_outbox
              WHERE state IN ('pending', 'retrying') ORDER BY team_id, object_type LIMIT 1)
             UNION ALL
             SELECT n.team_id, n.object_type FROM lanes CROSS JOIN LATERAL (
                 SELECT o.team_id, o.object_type FROM prism_outbox o
                 WHERE o.state IN ('pending', 'retrying')
                   AND (o.team_id, o.object_type) > (lanes.team_id, lanes.object_type)
                 ORDER BY o.team_id, o.object_type LIMIT 1) n)"
    };
}

/// How often a process parks held rows ([`PgStore::settle`]) while every floor it moves on
/// moves: a held row stops the floor it sits at, and that floor's next move fails and parks
/// it at once; this bounds how long a held row at a lane this process does not claim from (or
/// when it is idle) holds its floor.
const PARK_EVERY: Duration = Duration::from_secs(1);

/// The advisory lock class of a lane's tail claim (`b"pris"`), see `try_lock_lane`.
const LANE_TAIL_LOCK_CLASS: i32 = 0x7072_6973;

/// The channel the outbox's insert trigger notifies.
pub const NOTIFY_CHANNEL: &str = "prism_outbox";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// One claim of this process at a time locks its rows ([`Dialect::scan_gate`]).
    scan_gate: Arc<tokio::sync::Mutex<()>>,
    /// When this process last checked the floors ([`PgStore::audit_floors`]).
    floor_audit: Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
    /// The rows this process's claims in flight have locked ([`Dialect::in_flight_spans`]).
    in_flight: Arc<std::sync::Mutex<super::dialect::InFlightSpans>>,
    /// The lanes this process's committed claims took rows from whose floors have not been
    /// moved on since ([`Dialect::claimed_from`], [`Dialect::settle_floors`]).
    floors_behind: Arc<std::sync::Mutex<HashSet<(String, String)>>>,
    /// When this process last parked held rows ([`PgStore::settle`]).
    last_park: Arc<std::sync::Mutex<Option<Instant>>>,
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
            floor_audit: Arc::default(),
            in_flight: Arc::default(),
            floors_behind: Arc::default(),
            last_park: Arc::default(),
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

    /// See [`super::Store::audit_floors`]; also deletes the claim rows of outbox rows an
    /// application deleted itself. Runs when `every` has passed since this process last ran
    /// it (the first call runs it).
    pub async fn audit_floors(&self, every: Duration) -> StoreResult<u64> {
        {
            let mut last = self.floor_audit.lock().await;
            if last.is_some_and(|t| t.elapsed() < every) {
                return Ok(0);
            }
            *last = Some(std::time::Instant::now());
        }
        // Per floor, the lowest row below it with no claim row and a txid below the late txid
        // (the rows source two does not read): none can exist when ids are drawn in commit
        // order on this cluster. The floor goes back to it, so that the lane's walk (and the
        // record guard's bound) covers it again; the next claims move the floor on.
        let moved: Vec<(String, String, i64)> = sqlx::query_as(concat!(
            "WITH lost AS (
                 SELECT f.team_id, f.object_type,
                        (SELECT o.id FROM prism_outbox o WHERE ",
            lane_rows!("f.team_id", "f.object_type", "0"),
            " AND o.id < f.floor_id AND o.txid < f.late_txid
                           AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)",
            lane_order!(),
            " LIMIT 1) AS id
                 FROM prism_lane_floors f)
             UPDATE prism_lane_floors f SET floor_id = lost.id
             FROM lost
             WHERE f.team_id = lost.team_id AND f.object_type = lost.object_type
               AND lost.id IS NOT NULL AND lost.id < f.floor_id
             RETURNING f.team_id, f.object_type, lost.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        // Claim rows whose outbox row an application deleted itself (purge deletes both):
        // they would count as dead or waiting rows that are not there.
        let orphans = sqlx::query(
            "DELETE FROM prism_outbox_claims c
             WHERE NOT EXISTS (SELECT 1 FROM prism_outbox o WHERE o.id = c.id)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        if orphans > 0 {
            tracing::info!(
                claim_rows = orphans,
                "deleted the claim rows of outbox rows deleted outside prism-sync"
            );
        }
        for (team, object_type, id) in &moved {
            tracing::warn!(
                team,
                object_type,
                row = id,
                "a change lay below its lane's floor where no claim reached it (it arrived out of id order: restored, copied by replication, or moved between lanes by an UPDATE); the floor is moved back to it"
            );
        }
        Ok(moved.len() as u64)
    }

    pub async fn gauges(&self) -> StoreResult<Gauges> {
        let mut g = Gauges::default();
        // Bounded by the backlog, not by the finished rows kept (see `succeeded_rows`): rows
        // never claimed from each lane's floor (and late below it), rows waiting again and
        // retrying through their claim rows' index, rows in flight through the open batches.
        let rows = sqlx::query(concat!(
            "WITH RECURSIVE ",
            lanes_cte!(),
            ", fl AS (SELECT l.team_id, l.object_type, COALESCE(f.floor_id, 0) AS floor_id,
                            COALESCE(f.late_txid, '0'::xid8) AS late_txid
                     FROM lanes l LEFT JOIN prism_lane_floors f
                          ON f.team_id = l.team_id AND f.object_type = l.object_type)
             SELECT x.state, count(*) FROM fl CROSS JOIN LATERAL (
                 SELECT o.state FROM prism_outbox o WHERE ",
            lane_rows!("fl.team_id", "fl.object_type", "fl.floor_id"),
            " AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)
                 UNION ALL
                 SELECT o.state FROM prism_outbox o
                 WHERE ",
            late_rows!(
                "fl.team_id",
                "fl.object_type",
                "fl.floor_id",
                "fl.late_txid"
            ),
            "
                   AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)) x
             GROUP BY 1
             UNION ALL
             SELECT state, count(*) FROM prism_outbox_claims
             WHERE state IN ('pending', 'retrying') GROUP BY 1
             UNION ALL
             SELECT 'in_flight', count(*) FROM prism_batches b
                 JOIN prism_outbox_claims c ON c.batch_id = b.id
             WHERE b.state = 'open' AND c.state IS NULL"
        ))
        .fetch_all(&self.pool)
        .await?;
        // A state counted from two places (never claimed, and through claim rows) is summed.
        let mut by_state: Vec<(String, i64)> = Vec::new();
        for (state, n) in super::text_counts(&rows)? {
            match by_state.iter_mut().find(|(s, _)| *s == state) {
                Some((_, sum)) => *sum += n,
                None if n > 0 => by_state.push((state, n)),
                None => {}
            }
        }
        g.rows_by_state = by_state;
        // Dead rows: claim rows, and rows that died before migration 0015 (no claim row).
        let rows = sqlx::query(
            "SELECT code, count(*) FROM (
                 SELECT COALESCE(last_error_code, 'unknown') AS code FROM prism_outbox_claims
                 WHERE state = 'dead'
                 UNION ALL
                 SELECT COALESCE(o.last_error_code, 'unknown') FROM prism_outbox o
                 WHERE o.state = 'dead'
                   AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)) d
             GROUP BY 1 ORDER BY 2 DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        g.dead_by_code = super::text_counts(&rows)?;
        g.count_dead();
        let row = sqlx::query(concat!(
            "WITH RECURSIVE ",
            lanes_cte!(),
            ", fl AS (SELECT l.team_id, l.object_type, COALESCE(f.floor_id, 0) AS floor_id,
                            COALESCE(f.late_txid, '0'::xid8) AS late_txid
                     FROM lanes l LEFT JOIN prism_lane_floors f
                          ON f.team_id = l.team_id AND f.object_type = l.object_type
                     WHERE l.object_type = ANY($1))
             SELECT
               (SELECT COALESCE(extract(epoch FROM now() - min(t)), 0)::float8 FROM (
                  -- Each lane's first row never claimed, and its late rows.
                  SELECT (SELECT o.enqueued_at FROM prism_outbox o WHERE ",
            lane_rows!("fl.team_id", "fl.object_type", "fl.floor_id"),
            " AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)",
            lane_order!(),
            " LIMIT 1) AS t FROM fl
                  UNION ALL
                  SELECT (SELECT min(o.enqueued_at) FROM prism_outbox o
                          WHERE ",
            late_rows!(
                "fl.team_id",
                "fl.object_type",
                "fl.floor_id",
                "fl.late_txid"
            ),
            "
                            AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id))
                  FROM fl
                  UNION ALL
                  -- Rows waiting again: the oldest change of them.
                  SELECT (SELECT o.enqueued_at FROM prism_outbox o WHERE o.id = (
                              SELECT min(c.id) FROM prism_outbox_claims c
                              WHERE c.state IN ('pending', 'retrying')))
                  UNION ALL
                  -- Per open batch, through its claim rows: bounded by the rows in flight.
                  SELECT min((SELECT min(o.enqueued_at) FROM prism_outbox_claims c
                              JOIN prism_outbox o ON o.id = c.id
                              WHERE c.batch_id = b.id AND c.state IS NULL))
                  FROM prism_batches b WHERE b.state = 'open') AS ages),
               (SELECT COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8
                  FROM prism_batches WHERE state = 'open'),
               (SELECT count(*) FROM prism_batches WHERE state = 'open'),
               (SELECT count(*) FROM (
                  SELECT w.id, w.record_id FROM (
                      SELECT x.id, x.record_id FROM fl CROSS JOIN LATERAL (
                          SELECT o.id, o.record_id FROM prism_outbox o WHERE ",
            lane_rows!("fl.team_id", "fl.object_type", "fl.floor_id"),
            " AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)",
            lane_order!(),
            " LIMIT 10000) x
                      UNION ALL
                      SELECT o.id, o.record_id FROM prism_outbox_claims c
                      JOIN prism_outbox o ON o.id = c.id WHERE c.state IN ('pending', 'retrying')) w
                  LIMIT 10000) o
                WHERE NOT ",
            record_guard!(),
            "),
               (SELECT COALESCE(sum(rows), 0)::bigint FROM prism_audit WHERE action = 'replay'),
               -- How long the transaction the watermark waits for (an open outbox writer) has run.
               (SELECT COALESCE(extract(epoch FROM now() - min(held.since)), 0)::float8
                  FROM (SELECT prism_outbox_watermark(pg_current_snapshot())::xid AS xid) w,
                       LATERAL (SELECT a.xact_start AS since FROM pg_stat_activity a
                                WHERE a.backend_xid = w.xid
                                UNION ALL
                                SELECT p.prepared FROM pg_prepared_xacts p
                                WHERE p.transaction = w.xid) held)"
        ))
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

    fn in_flight_spans(&self) -> Option<&Arc<std::sync::Mutex<super::dialect::InFlightSpans>>> {
        Some(&self.in_flight)
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
        // Waiting: never claimed (from the floor, or late below it), or waiting again; due or
        // not, as the claimer's idle rule wants (`ClaimOutcome::waiting`). The first source in
        // id order, not EXISTS: an EXISTS was planned on a table with stale statistics as a
        // walk of the lane's every row through the txid index (8 ms a claim at 50,000 rows);
        // an order only the lane index gives keeps it on that index.
        Ok(sqlx::query_as(concat!(
            "SELECT l.team_id, l.object_type FROM unnest($1::text[], $2::text[]) AS l(team_id, object_type)
             CROSS JOIN LATERAL ",
            lane_floor!("l.team_id", "l.object_type"),
            " fl
             WHERE (SELECT o.id FROM prism_outbox o WHERE ",
            lane_rows!("l.team_id", "l.object_type", "fl.floor_id"),
            " AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)",
            lane_order!(),
            " LIMIT 1) IS NOT NULL
                OR EXISTS (SELECT 1 FROM prism_outbox_claims c
                           WHERE c.team_id = l.team_id AND c.object_type = l.object_type
                             AND c.state IN ('pending', 'retrying'))
                OR EXISTS (SELECT 1 FROM prism_outbox o WHERE ",
            late_rows!("l.team_id", "l.object_type", "fl.floor_id", "fl.late_txid"),
            "
                             AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id))"
        ))
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
        let cap_i64 = i64::try_from(cap).unwrap_or(i64::MAX);
        let mut out = vec![
            Backlog {
                due: 0,
                oldest_due: Duration::ZERO,
            };
            lanes.len()
        ];
        // First a cheap depth: the never-claimed due rows from each lane's floor, up to `cap`,
        // without the watermark (a read of the lock table) and the per-record guard (a probe
        // per row). Its count is at least the exact one's first source, so a lane it finds at
        // `cap` is deep: in a deep backlog, where every claim of a flowing lane counted `cap`
        // rows with the guard before taking them, this is all the look costs.
        let (teams, types): (Vec<&str>, Vec<&str>) =
            lanes.iter().map(|(t, o)| (t.as_str(), o.as_str())).unzip();
        let depths: Vec<i64> = sqlx::query_scalar(concat!(
            "SELECT (SELECT count(*) FROM (
                         SELECT 1 FROM prism_outbox o WHERE ",
            lane_rows!("l.team_id", "l.object_type", "fl.floor_id"),
            " AND (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id) IS NULL
                           AND o.next_attempt_at <= now()",
            lane_order!(),
            " LIMIT $3) d)
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(team_id, object_type, n)
             CROSS JOIN LATERAL ",
            lane_floor!("l.team_id", "l.object_type"),
            " fl
             ORDER BY l.n"
        ))
        .bind(&teams)
        .bind(&types)
        .bind(cap_i64)
        .fetch_all(&mut **tx)
        .await?;
        let mut shallow = Vec::new();
        for (i, depth) in depths.into_iter().enumerate() {
            if depth >= cap_i64 {
                out[i].due = cap;
            } else {
                shallow.push(i);
            }
        }
        if shallow.is_empty() {
            return Ok(out);
        }
        let (teams, types): (Vec<&str>, Vec<&str>) = shallow
            .iter()
            .map(|&i| (lanes[i].0.as_str(), lanes[i].1.as_str()))
            .unzip();
        // lane_heads' conditions without its lock: a plain read that leaves no trace.
        let rows = sqlx::query(concat!(
            "SELECT l.n, d.due, d.oldest
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(team_id, object_type, n)
             CROSS JOIN LATERAL ",
            lane_floor!("l.team_id", "l.object_type"),
            " fl
             CROSS JOIN LATERAL (
                 SELECT count(*) AS due,
                        COALESCE(extract(epoch FROM now() - min(r.due_at)), 0)::float8 AS oldest
                 FROM ((SELECT o.id, o.next_attempt_at AS due_at",
            source_fresh!("l.team_id", "l.object_type", "fl.floor_id"),
            lane_order!(),
            " LIMIT $3)
                       UNION ALL
                       (SELECT o.id, o.next_attempt_at",
            source_late!("l.team_id", "l.object_type", "fl.floor_id", "fl.late_txid"),
            " ORDER BY o.txid LIMIT $3)
                       UNION ALL
                       (SELECT c.id, c.next_attempt_at",
            source_again!("l.team_id", "l.object_type"),
            " ORDER BY c.id LIMIT $3)
                       ORDER BY 1 LIMIT $3) r) d"
        ))
        .bind(&teams)
        .bind(&types)
        .bind(cap_i64)
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            let n: i64 = row.try_get(0)?;
            let due: i64 = row.try_get(1)?;
            let oldest: f64 = row.try_get(2)?;
            let at = usize::try_from(n - 1).ok().and_then(|k| shallow.get(k));
            if let Some(lane) = at.and_then(|&i| out.get_mut(i)) {
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
            "SELECT COALESCE(extract(epoch FROM now() - min(COALESCE(c.next_attempt_at, o.next_attempt_at))), 0)::float8
             FROM prism_outbox o LEFT JOIN prism_outbox_claims c ON c.id = o.id WHERE o.id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(&mut **tx)
        .await?;
        Ok(seconds(age))
    }

    async fn lane_heads(
        &self,
        tx: &mut Self::Tx,
        lane: &(String, String),
        req: &ClaimRequest<'_>,
        spans: Option<&super::dialect::ClaimSpans>,
    ) -> StoreResult<Vec<CandidateRow>> {
        let (team, object_type) = lane;
        // Each source locks what it takes (SKIP LOCKED: another claimer's rows are left to it);
        // the three are merged in id order. A row a source locked past the merge's limit stays
        // unclaimed, locked until this transaction ends. The first source passes over the span
        // this process's other claims in flight have locked (`InFlightSpans`; empty: 0 to -1):
        // where the span covers the floor (the claim before this one took the rows from
        // there), the walk starts past it, through the index; otherwise a test a row skips it.
        let (skip_from, skip_to) = spans.and_then(|s| s.others(lane)).unwrap_or((0, -1));
        let rows = sqlx::query(concat!(
            "WITH fl0 AS ",
            lane_floor!("$3", "$4"),
            ",
             fl AS (SELECT floor_id, late_txid,
                           CASE WHEN $5 <= floor_id AND floor_id <= $6 THEN $6 + 1
                                ELSE floor_id END AS walk_from
                    FROM fl0),
             fresh AS (SELECT ",
            head_columns!("o.attempts"),
            ", true AS fresh",
            source_fresh!("$3", "$4", "(SELECT walk_from FROM fl)", heads),
            " AND NOT (o.id BETWEEN $5 AND $6)",
            lane_order!(),
            " LIMIT $1 FOR UPDATE OF o SKIP LOCKED),
             late AS (SELECT ",
            head_columns!("o.attempts"),
            ", false AS fresh",
            source_late!(
                "$3",
                "$4",
                "(SELECT floor_id FROM fl)",
                "(SELECT late_txid FROM fl)",
                heads
            ),
            " ORDER BY o.txid LIMIT $1 FOR UPDATE OF o SKIP LOCKED),
             again AS (SELECT ",
            head_columns!("c.attempts"),
            ", false AS fresh",
            source_again!("$3", "$4", heads),
            " ORDER BY c.id LIMIT $1 FOR UPDATE OF o, c SKIP LOCKED)
             SELECT * FROM fresh UNION ALL SELECT * FROM late UNION ALL SELECT * FROM again
             ORDER BY id LIMIT $1"
        ))
        .bind(claim_limit(req))
        .bind(max_patch(req))
        .bind(team)
        .bind(object_type)
        .bind(skip_from)
        .bind(skip_to)
        .fetch_all(&mut **tx)
        .await?;
        // The first source's rows stay locked until this claim ends, whatever the claim keeps
        // of them: its span is held until then.
        let fresh = rows
            .iter()
            .filter(|r| r.try_get::<bool, _>("fresh").unwrap_or(false))
            .map(|r| r.try_get::<i64, _>("id"))
            .collect::<Result<Vec<_>, _>>()?;
        if let (Some(spans), Some(&lo), Some(&hi)) = (spans, fresh.iter().min(), fresh.iter().max())
        {
            spans.hold(lane, lo, hi);
        }
        Ok(rows.iter().map(candidate).collect::<Result<Vec<_>, _>>()?)
    }

    async fn strays(
        &self,
        tx: &mut Self::Tx,
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<CandidateRow>> {
        // The lanes that hold rows at all, by a skip scan of the lane index (a lane is a few
        // index probes, however many rows it has), and those with rows waiting again.
        let lanes: Vec<(String, String)> = sqlx::query_as(concat!(
            "WITH RECURSIVE ",
            lanes_cte!(),
            " SELECT team_id, object_type FROM lanes
             UNION
             SELECT DISTINCT team_id, object_type FROM prism_outbox_claims
             WHERE state IN ('pending', 'retrying')"
        ))
        .fetch_all(&mut **tx)
        .await?;
        let known_types = ClaimRequest::known_types();
        let mut strays = Vec::new();
        for lane in lanes {
            let known =
                req.teams.iter().any(|t| t == lane.0) && known_types.iter().any(|y| *y == lane.1);
            if known || strays.len() >= req.max_records {
                continue;
            }
            let left = ClaimRequest {
                max_records: req.max_records - strays.len(),
                ..*req
            };
            strays.extend(self.lane_heads(tx, &lane, &left, None).await?);
        }
        Ok(strays)
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
                        o.object_type, o.operation, o.team_id, COALESCE(fc.attempts, o.attempts) AS attempts
                 FROM prism_outbox o LEFT JOIN prism_outbox_claims fc ON fc.id = o.id
                 -- The state test is spelt so that it implies the record index's predicate
                 -- but not the lane index's: with stale statistics the planner otherwise
                 -- walked every waiting row for every head (1 ms a head).
                 WHERE o.record_id = h.record_id AND o.id > h.head_id
                   AND o.state IN ('pending', 'retrying', 'in_flight') AND (o.state || '') <> 'in_flight'
                   AND ",
               waiting!("fc"),
               " AND ",
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

    async fn still_waiting(
        &self,
        tx: &mut Self::Tx,
        ids: &[i64],
    ) -> StoreResult<Option<StillWaiting>> {
        // A statement of its own: its snapshot is taken after this claim's locks, so it sees
        // every claim that took one of these rows before the lock was granted, and every
        // claim row a park of another process wrote for one (the rows' claim rows cannot
        // change after it: this claim holds the rows, and only their holder writes them).
        // When no claim row lies in the span of `ids` at all (one probe of the claim rows'
        // key; the common case, the claim's rows being past what was claimed before), every
        // row still waits, unclaimed, and none is probed one by one.
        let (lo, hi) = (
            ids.iter().copied().min().unwrap_or(0),
            ids.iter().copied().max().unwrap_or(-1),
        );
        let rows: Vec<(i64, bool)> = sqlx::query_as(concat!(
            "WITH s AS (SELECT EXISTS (SELECT 1 FROM prism_outbox_claims
                                       WHERE id BETWEEN $2 AND $3) AS claimed)
             SELECT u.id, true FROM unnest($1::bigint[]) AS u(id) WHERE NOT (SELECT claimed FROM s)
             UNION ALL
             SELECT u.id, c.id IS NULL FROM unnest($1::bigint[]) AS u(id)
             LEFT JOIN prism_outbox_claims c ON c.id = u.id
             WHERE (SELECT claimed FROM s) AND ",
            waiting!("c")
        ))
        .bind(ids)
        .bind(lo)
        .bind(hi)
        .fetch_all(&mut **tx)
        .await?;
        let mut still = StillWaiting::default();
        for (id, unclaimed) in rows {
            still.waiting.insert(id);
            if unclaimed {
                still.unclaimed.insert(id);
            }
        }
        Ok(Some(still))
    }

    async fn settle_floors(&self, lanes: &[Lane]) -> StoreResult<()> {
        if lanes.is_empty() {
            return Ok(());
        }
        // First the floors of the lanes this process's claims took rows from (all committed
        // by now, with the claims' that ran beside them), so that the park and the claim walk
        // from after those rows: each claimed row is walked past once, here, and not by every
        // statement of the next claims. Taken from the set now; put back unless the settle
        // commits (an error, or the claim dropped mid-way at shutdown).
        let mut behind = Behind {
            store: self,
            lanes: std::mem::take(
                &mut *self
                    .floors_behind
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .into_iter()
            .collect(),
            settled: false,
        };
        self.settle(lanes, &behind.lanes).await?;
        behind.settled = true;
        Ok(())
    }

    fn claimed_from(&self, lanes: &[(Vec<u8>, Vec<u8>)]) {
        self.claimed_lanes(lanes.iter().map(|(t, y)| {
            (
                String::from_utf8_lossy(t).into_owned(),
                String::from_utf8_lossy(y).into_owned(),
            )
        }));
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
        let first_rows: Vec<Option<i64>> = batches
            .iter()
            .map(|b| b.items.iter().flat_map(|i| i.rows.iter().copied()).min())
            .collect();
        sqlx::query(
            "INSERT INTO prism_batches
               (id, idempotency_key, object_type, body, items, item_count, row_count, lease_owner, lease_expires_at, parent_id,
                team_id, operation, first_row_id)
             SELECT b.id, b.key, b.object_type, b.body, b.items, b.item_count, b.row_count,
                    $8, now() + make_interval(secs => $9), $10, b.team_id, b.operation, b.first_row_id
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int[], $7::int[],
                         $11::text[], $12::text[], $13::bigint[])
                  AS b(id, key, object_type, body, items, item_count, row_count, team_id, operation,
                       first_row_id)",
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
        .bind(&first_rows)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn mark_in_flight(
        &self,
        tx: &mut Self::Tx,
        batches: &[NewBatch],
        unclaimed: Option<&HashMap<i64, i32>>,
    ) -> StoreResult<()> {
        // In id order (each of the two inserts below), as the park inserts claim rows. Only
        // the holder of a row's lock writes its claim row, so two claims never wait for each
        // other here; sorted all the same, as every writer of claim rows does. Sorted here: the
        // statement's plan keeps the array's order (an ORDER BY would be planned as a walk of
        // the whole outbox in id order, the transaction's sorts being off).
        let mut assigned: Vec<Assigned<'_>> = batches
            .iter()
            .flat_map(|b| {
                b.items.iter().flat_map(move |i| {
                    i.rows.iter().map(move |&id| Assigned {
                        id,
                        batch: b.id,
                        team: &b.team,
                        object_type: b.object_type.as_str(),
                        record: i.record_id,
                    })
                })
            })
            .collect();
        assigned.sort_unstable_by_key(|a| a.id);
        if assigned.is_empty() {
            return Ok(());
        }
        // A row's first claim inserts its claim row; one that has one (a row waiting again or
        // parked, or a split's rows moving to its children) follows the new batch. Where the
        // claim knows which rows have none (`StillWaiting`), theirs is a plain insert of what
        // the claim read (a batch's rows are of its team and type, an item's of its record):
        // an upsert's conflict check and speculative insertion cost about 1.3 µs and 50 bytes
        // of WAL a row, and reading each row's lane, record and tries from its outbox row
        // another 1.4 µs. Should one have a claim row after all, the insert fails and the
        // claim rolls back (nothing is lost; the next claim reads it afresh).
        let mut new = NewClaimRows::default();
        let (mut old_rows, mut old_batches) = (Vec::new(), Vec::new());
        for a in assigned {
            match unclaimed.and_then(|u| u.get(&a.id)) {
                Some(&attempts) => new.push(a, attempts),
                None => {
                    old_rows.push(a.id);
                    old_batches.push(a.batch);
                }
            }
        }
        sqlx::query(concat!(
            "WITH moved AS (",
            claim_rows_insert!("$1", "$2"),
            " ON CONFLICT (id) DO UPDATE SET batch_id = EXCLUDED.batch_id, state = NULL,
                   first_attempt_at = COALESCE(prism_outbox_claims.first_attempt_at, now()))
             INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, batch_id,
                                              attempts, first_attempt_at)
             SELECT u.id, u.team_id, u.object_type, u.record_id, u.batch_id, u.attempts, now()
             FROM unnest($3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::uuid[], $8::int[])
                  AS u(id, batch_id, team_id, object_type, record_id, attempts)"
        ))
        .bind(&old_rows)
        .bind(&old_batches)
        .bind(&new.ids)
        .bind(&new.batches)
        .bind(&new.teams)
        .bind(&new.object_types)
        .bind(&new.records)
        .bind(&new.attempts)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn mark_dead(&self, tx: &mut Self::Tx, rows: &[DeadRow]) -> StoreResult<()> {
        // In id order, as `mark_in_flight` (and for the same reason, sorted here).
        let mut rows: Vec<&DeadRow> = rows.iter().collect();
        rows.sort_unstable_by_key(|d| d.id);
        let ids: Vec<i64> = rows.iter().map(|d| d.id).collect();
        let codes: Vec<&str> = rows.iter().map(|d| d.code).collect();
        let messages: Vec<&str> = rows.iter().map(|d| d.message.as_str()).collect();
        sqlx::query(
            "WITH u AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, code, message)),
             ended AS (
                 UPDATE prism_outbox_claims c SET state = 'dead', completed_at = now(),
                        last_error_code = u.code, last_error_message = u.message
                 FROM u WHERE c.id = u.id
                 RETURNING c.id)
             INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, state, attempts,
                                              completed_at, last_error_code, last_error_message)
             SELECT o.id, o.team_id, o.object_type, o.record_id, 'dead', o.attempts, now(), u.code,
                    u.message
             FROM u JOIN prism_outbox o ON o.id = u.id
             WHERE NOT EXISTS (SELECT 1 FROM ended WHERE ended.id = u.id)
             ON CONFLICT (id) DO UPDATE SET state = 'dead', completed_at = now(),
                 last_error_code = EXCLUDED.last_error_code,
                 last_error_message = EXCLUDED.last_error_message",
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
        // A row that succeeded in a batch that ended `done` is written by nothing: its claim
        // row follows the batch, and the batch's state says it (`prism_outbox_rows`). Only the
        // rows whose outcome is not their batch's are written, one by one.
        let rows: Vec<(&FinishBatch, &RowUpdate)> = ends
            .iter()
            .flat_map(|f| f.rows.iter().map(move |r| (*f, r)))
            .filter(|(f, r)| !(f.end == BatchEnd::Done && r.state == RowState::Succeeded))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
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
                       (SELECT COALESCE(extract(epoch FROM now() - min(c.first_attempt_at)), 0)::float8
                        FROM prism_outbox_claims c WHERE c.batch_id = b.id AND c.state IS NULL) AS oldest_row_age",
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

impl PgStore {
    fn claimed_lanes(&self, lanes: impl IntoIterator<Item = (String, String)>) {
        self.floors_behind
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(lanes);
    }

    /// [`Dialect::settle_floors`]: the floors of `behind` moved on; then, when one of them
    /// could not move (a held row may stop it) or the last park is [`PARK_EVERY`] ago, the
    /// held rows at the floors of `lanes` parked, and, when any were, those floors moved past
    /// them. One short transaction, committed before the claim begins; none at all when there
    /// is nothing to do (an idle poll between parks).
    async fn settle(&self, lanes: &[Lane], behind: &[(String, String)]) -> StoreResult<()> {
        let park_due = self
            .last_park
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() >= PARK_EVERY);
        if behind.is_empty() && !park_due {
            return Ok(());
        }
        let mut tx = self.begin_claim().await?;
        let moved = advance_floors(
            &mut tx,
            behind.iter().map(|(t, y)| (t.as_str(), y.as_str())),
        )
        .await?;
        let parks = park_due || behind.iter().any(|lane| !moved.contains(lane));
        if parks {
            // The claim's lanes and the ones behind (a lane of rows no configured team holds,
            // whose rows the claims take as strays, has a floor too).
            let mut park: Vec<(&str, &str)> = lanes
                .iter()
                .map(|l| (l.team.as_str(), l.object_type.as_str()))
                .chain(behind.iter().map(|(t, y)| (t.as_str(), y.as_str())))
                .collect();
            park.sort_unstable();
            park.dedup();
            if park_held(&mut tx, park.iter().copied()).await? > 0 {
                advance_floors(&mut tx, park.iter().copied()).await?;
            }
        }
        tx.commit().await?;
        if parks {
            *self
                .last_park
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        }
        Ok(())
    }
}

/// The lanes a settle took from [`PgStore`]'s `floors_behind`: put back when it does not
/// commit, so that a later settle moves their floors on.
struct Behind<'a> {
    store: &'a PgStore,
    lanes: Vec<(String, String)>,
    settled: bool,
}

impl Drop for Behind<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.store.claimed_lanes(std::mem::take(&mut self.lanes));
        }
    }
}

/// Parks the rows at the floors of `lanes` that would hold the floor back for as long as an
/// older change of their record is unfinished (retrying for hours, say): the rows from the
/// floor up to the first one a claim could take, that have no claim row and that the
/// per-record guard holds. They get a claim row `pending`, found again by the claims' third
/// source once their record's older change has ended. Returns how many were parked.
///
/// In [`Dialect::settle_floors`]' short transaction, before the claim and after the floors
/// moved past the rows claimed so far (so the walk is short), committed at once: the claim
/// sees the parked rows, and no lock of the park is held while a claim waits for anything.
/// Each parked row is locked (`SKIP LOCKED`: a row a claim is taking is left to it) only until
/// that commit, so no claim-row insert of a claim can wait for the park, and the park waits
/// for nothing. (A claim that takes a parked row later follows its claim row,
/// `mark_in_flight`.) The claim-row test comes before the guard: the walk may pass rows other
/// processes' claims took since the floor last moved, one probe each.
async fn park_held<'a>(
    tx: &mut Transaction<'static, Postgres>,
    lanes: impl Iterator<Item = (&'a str, &'a str)>,
) -> StoreResult<u64> {
    let (teams, types): (Vec<&str>, Vec<&str>) = lanes.unzip();
    if teams.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(concat!(
            floor_ctes!(),
            ",
             stop AS (
                 SELECT cur.*, (SELECT o.id FROM prism_outbox o WHERE ",
            lane_rows!("cur.team_id", "cur.object_type", "cur.floor_id"),
            " AND (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id) IS NULL
                                  AND (o.txid < s.w OR o.txid >= s.xmax) AND ",
            record_guard!(),
            lane_order!(),
            " LIMIT 1) AS first_free
                 FROM cur, s)
             INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, state, attempts,
                                              next_attempt_at)
             SELECT o.id, o.team_id, o.object_type, o.record_id, 'pending', o.attempts, o.next_attempt_at
             FROM (SELECT o.* FROM stop, s, LATERAL (
                       SELECT o.* FROM prism_outbox o WHERE ",
            lane_rows!("stop.team_id", "stop.object_type", "stop.floor_id"),
            " AND o.id < COALESCE(stop.first_free, 9223372036854775807)
                         AND (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id) IS NULL
                         AND (o.txid < s.w OR o.txid >= s.xmax) AND NOT ",
            record_guard!(),
            lane_order!(),
            " LIMIT 1000 FOR UPDATE OF o SKIP LOCKED) o
                   UNION ALL
                   -- Held late rows too (below the floor, never claimed): each would hold the
                   -- lane's late txid back, and every claim would read the rows since.
                   SELECT o.* FROM stop, s, LATERAL (
                       SELECT o.* FROM prism_outbox o WHERE ",
            late_rows!("stop.team_id", "stop.object_type", "stop.floor_id", "stop.late_txid"),
            "
                         AND (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id) IS NULL
                         AND (o.txid < s.w OR o.txid >= s.xmax) AND NOT ",
            record_guard!(),
            "
                       ORDER BY o.txid LIMIT 1000 FOR UPDATE OF o SKIP LOCKED) o) o
             ORDER BY o.id
             ON CONFLICT (id) DO NOTHING"
        ))
        .bind(&teams)
        .bind(&types)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// Moves the floors of `lanes` (team, object type) on past the rows claimed so far.
///
/// The proposal (ARCHITECTURE.md, "The lane floor"), from this statement's snapshot S and
/// watermark W: the new floor is the lane's first row from the old floor on that S shows, that
/// has no claim row and that a claim could take as far as visibility goes (below W, or from
/// another cluster), else the lane's last row + 1; the new late txid is the least of W and the
/// txids of the rows below the new floor that still have no claim row (through the txid index,
/// from the old late txid). A floor row only moves forward: (floor, late) as a pair, so a
/// proposal behind another claimer's is dropped; a floor row another transaction is moving
/// right now is skipped (SKIP LOCKED), never waited for.
async fn advance_floors<'a>(
    tx: &mut Transaction<'static, Postgres>,
    lanes: impl Iterator<Item = (&'a str, &'a str)>,
) -> StoreResult<HashSet<(String, String)>> {
    let (teams, types): (Vec<&str>, Vec<&str>) = lanes.unzip();
    if teams.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sqlx::query_as(concat!(
        floor_ctes!(),
        ",
             next_floor AS (
                 SELECT cur.*, COALESCE(
                     (SELECT o.id FROM prism_outbox o WHERE ",
        lane_rows!("cur.team_id", "cur.object_type", "cur.floor_id"),
        " AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c WHERE c.id = o.id)
                        AND (o.txid < s.w OR o.txid >= s.xmax)",
        lane_order!(),
        " LIMIT 1),
                     (SELECT o.id + 1 FROM prism_outbox o WHERE ",
        lane_rows!("cur.team_id", "cur.object_type", "cur.floor_id"),
        lane_order!(desc),
        " LIMIT 1),
                     cur.floor_id) AS floor_next
                 FROM cur, s),
             proposal AS (
                 SELECT n.team_id, n.object_type, n.floor_id AS old_floor,
                        greatest(n.floor_next, n.floor_id) AS floor_id,
                        least(s.w, (SELECT min(o.txid) FROM prism_outbox o WHERE ",
        late_rows!(
            "n.team_id",
            "n.object_type",
            "greatest(n.floor_next, n.floor_id)",
            "n.late_txid"
        ),
        "
                                      AND NOT EXISTS (SELECT 1 FROM prism_outbox_claims c
                                                      WHERE c.id = o.id))) AS late_txid
                 FROM next_floor n, s),
             free AS (
                 SELECT f.team_id, f.object_type FROM prism_lane_floors f
                 JOIN proposal p ON p.team_id = f.team_id AND p.object_type = f.object_type
                 ORDER BY f.team_id, f.object_type
                 FOR UPDATE OF f SKIP LOCKED),
             moved AS (
                 UPDATE prism_lane_floors f SET floor_id = p.floor_id, late_txid = p.late_txid
                 FROM proposal p, free
                 WHERE f.team_id = free.team_id AND f.object_type = free.object_type
                   AND p.team_id = f.team_id AND p.object_type = f.object_type
                   AND (f.floor_id, f.late_txid) < (p.floor_id, p.late_txid)
                 RETURNING f.team_id, f.object_type, p.floor_id > p.old_floor AS forward),
             added AS (
                 INSERT INTO prism_lane_floors (team_id, object_type, floor_id, late_txid)
                 SELECT p.team_id, p.object_type, p.floor_id, p.late_txid FROM proposal p
                 WHERE NOT EXISTS (SELECT 1 FROM prism_lane_floors f
                                   WHERE f.team_id = p.team_id AND f.object_type = p.object_type)
                 ORDER BY p.team_id, p.object_type
                 ON CONFLICT (team_id, object_type) DO NOTHING
                 RETURNING team_id, object_type, floor_id > 0 AS forward)
             SELECT team_id, object_type FROM moved WHERE forward
             UNION ALL
             SELECT team_id, object_type FROM added WHERE forward"
    ))
    .bind(&teams)
    .bind(&types)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect())
}

/// A row a new batch carries, with what its claim row records ([`PgStore::mark_in_flight`]).
struct Assigned<'a> {
    id: i64,
    batch: Uuid,
    team: &'a str,
    object_type: &'a str,
    record: Uuid,
}

/// The claim rows `mark_in_flight` inserts, as the statement's arrays.
#[derive(Default)]
struct NewClaimRows<'a> {
    ids: Vec<i64>,
    batches: Vec<Uuid>,
    teams: Vec<&'a str>,
    object_types: Vec<&'a str>,
    records: Vec<Uuid>,
    attempts: Vec<i32>,
}

impl<'a> NewClaimRows<'a> {
    fn push(&mut self, a: Assigned<'a>, attempts: i32) {
        self.ids.push(a.id);
        self.batches.push(a.batch);
        self.teams.push(a.team);
        self.object_types.push(a.object_type);
        self.records.push(a.record);
        self.attempts.push(attempts);
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
        "UPDATE prism_outbox_claims SET state = 'dead', completed_at = now(),
                last_error_code = $2, last_error_message = $3
         WHERE state IS NULL AND batch_id = ANY($1)",
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
        "UPDATE prism_outbox_claims o SET
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
         WHERE o.id = u.id AND o.batch_id = u.batch_id AND o.state IS NULL",
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
