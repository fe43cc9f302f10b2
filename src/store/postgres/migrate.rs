//! Running the Postgres migrations: one prism-sync migrator at a time without a blocking wait,
//! migration 0002's checksum as first released, and interrupted concurrent index builds.
//!
//! Some migrations build indexes `CONCURRENTLY` (outside a transaction, so that the
//! application's inserts go on meanwhile). Such a build waits for every transaction that holds
//! an older snapshot, and a session blocked in `pg_advisory_lock` (sqlx's migration lock) holds
//! one: two replicas starting at once would deadlock, one waiting for the other's lock and the
//! other's index build waiting for it. So prism-sync first takes a lock of its own by polling
//! `pg_try_advisory_lock`, which holds no snapshot between tries, and runs sqlx's migrator
//! (whose own lock is then uncontended) on the same connection.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};

use crate::store::StoreResult;

/// The session advisory lock that serialises prism-sync's migrators (`b"prism_mg"`).
const MIGRATE_LOCK: i64 = 0x7072_6973_6d5f_6d67;

/// SHA-384 (sqlx's migration checksum) of migration 0002 as first released, when it still
/// built `prism_outbox_lane` inside its transaction. The index build moved to 0004; databases
/// that applied the first form have the same schema, but sqlx refuses to run when an applied
/// migration's checksum differs from its file's, so theirs is updated to the current file's.
const RELEASED_0002_CHECKSUM: &str = "871a241441a799773933f9a7dd4bfda88b3d12b5fdca27e5653a7adb60c61b1dd0110894b906ea66fc44cd6c5066e8ea";

/// Indexes that a migration builds `CONCURRENTLY ... IF NOT EXISTS`. An interrupted build
/// leaves the index behind, marked invalid, and `IF NOT EXISTS` would then keep it as it is.
const CONCURRENT_INDEXES: [&str; 6] = [
    "prism_outbox_lane",
    "prism_outbox_dead_record",
    "prism_outbox_record_all",
    "prism_batches_lane",
    "prism_outbox_batched",
    "prism_outbox_lane_txid",
];

/// Applies `migrator` on a connection of its own, which is closed afterwards (releasing the
/// lock whatever happened).
pub async fn run(pool: &PgPool, migrator: &Migrator) -> StoreResult<()> {
    let mut conn = pool.acquire().await?.detach();
    let result = run_locked(&mut conn, migrator).await;
    let _ = conn.close().await;
    result
}

async fn run_locked(conn: &mut PgConnection, migrator: &Migrator) -> StoreResult<()> {
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .fetch_one(&mut *conn)
        .await?
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if let Some(current) = migrator.iter().find(|m| m.version == 2)
        && recorded
    {
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1
             WHERE version = 2 AND checksum = decode($2, 'hex')",
        )
        .bind(&*current.checksum)
        .bind(RELEASED_0002_CHECKSUM)
        .execute(&mut *conn)
        .await?;
    }
    for index in CONCURRENT_INDEXES {
        let invalid: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($1) AND NOT indisvalid)",
        )
        .bind(index)
        .fetch_one(&mut *conn)
        .await?;
        if invalid {
            tracing::warn!(
                index,
                "dropping an index an interrupted migration left invalid; it is built again"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {index}"
            )))
            .execute(&mut *conn)
            .await?;
        }
    }
    // `run_direct` is what `run` calls once it has a connection; `run` itself, given a
    // `&mut PgConnection`, makes a future the compiler cannot prove `Send` (sqlx's own note).
    // A migration that needs a table lock waits for it at most `lock_timeout` (so that the
    // application's inserts do not queue behind it for long), then is tried again.
    let mut tries = 0u32;
    loop {
        match migrator.run_direct(None, &mut *conn, false).await {
            Ok(()) => return Ok(()),
            Err(e) if lock_not_available(&e) && tries < LOCK_TRIES => {
                tries += 1;
                tracing::warn!(
                    tries,
                    "a migration waits for transactions that hold the outbox; trying again"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How often a migration that could not get its table lock is tried (about ten minutes).
const LOCK_TRIES: u32 = 200;

/// The migration gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03).
fn lock_not_available(e: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let db = match e {
        MigrateError::Execute(sqlx::Error::Database(d))
        | MigrateError::ExecuteMigration(sqlx::Error::Database(d), _) => d,
        _ => return false,
    };
    db.code().as_deref() == Some("55P03")
}
