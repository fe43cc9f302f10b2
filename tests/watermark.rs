//! The Postgres visibility watermark: only transactions that may still commit outbox rows hold
//! changes back. A long write transaction in another database of the server, or one in the
//! outbox's database that writes other tables, must not delay syncing; an open transaction that
//! inserted an older change of a record must hold the newer change back until it commits, and
//! the two then reach the API in order. Postgres only (SQLite has no watermark); each test runs
//! the engine in-process against the simulator over real HTTP.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prism_sync::settings::Settings;
use prism_sync::sim::{FaultProfile, SimHandle};
use prism_sync::store::Store;
use sqlx::{Connection, PgConnection, Postgres, Transaction};

/// A change the watermark does not hold back is claimed within a poll or two (20 ms each); the
/// old, server-wide watermark held it for as long as the unrelated transaction stayed open.
const PROMPTLY: Duration = Duration::from_secs(5);
/// How long the open transactions stay open before the gauges are read.
const HELD_OPEN: Duration = Duration::from_millis(1500);

/// Inserts one change inside `tx` as an application would, returning its id.
async fn insert_in(tx: &mut Transaction<'_, Postgres>, record: &str, revision: usize) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO prism_outbox (record_id, patch) VALUES ($1::uuid, $2::jsonb) RETURNING id",
    )
    .bind(record)
    .bind(patch(revision))
    .fetch_one(&mut **tx)
    .await
    .expect("insert")
}

/// The revisions the API applied to `record`, in apply order.
fn applied_revisions(sim: &SimHandle, record: &str) -> Vec<i64> {
    sim.applied_log()
        .iter()
        .filter(|c| c.record_id.to_string() == record)
        .map(|c| {
            c.item
                .pointer("/default/revision")
                .and_then(|v| v.as_i64())
                .unwrap_or(-1)
        })
        .collect()
}

async fn watermark_lag(store: &Store) -> f64 {
    store.gauges().await.expect("gauges").watermark_lag_seconds
}

/// Sleeps until `since` is `HELD_OPEN` ago.
async fn until_held_open(since: Instant) {
    tokio::time::sleep(HELD_OPEN.saturating_sub(since.elapsed())).await;
}

/// A change committed while an unrelated write transaction is open reaches the API promptly,
/// and the lag gauge does not blame the unrelated transaction.
async fn syncs_promptly_beside(db: &TestDb, store: &Store, blocker: Transaction<'_, Postgres>) {
    let opened = Instant::now();
    let sim = sim(FaultProfile::default()).await;
    let engine = start_engine(&settings(db, &sim)).await;
    let record = uuid();
    insert_rows(store, &[(record.clone(), patch(1))]).await;
    let waited = Instant::now();
    wait_for(
        "a change committed beside an unrelated open transaction to reach the API",
        PROMPTLY,
        || applied_revisions(&sim, &record) == [1],
    )
    .await;
    let took = waited.elapsed();
    until_held_open(opened).await;
    let lag = watermark_lag(store).await;
    assert!(
        lag < 1.0,
        "the unrelated transaction, open {:?}, showed as watermark lag {lag} s",
        opened.elapsed()
    );
    blocker
        .rollback()
        .await
        .expect("end the unrelated transaction");
    engine.stop().await;
    eprintln!("synced {took:?} after the insert, beside an open unrelated transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_transaction_in_another_database_does_not_hold_changes_back() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let Some(elsewhere) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    // A nightly batch job in another database of the same server: it has written (so it holds
    // an xid) and stays open.
    let mut job = PgConnection::connect(&elsewhere.url)
        .await
        .expect("connect");
    sqlx::raw_sql("CREATE TABLE nightly_totals (day date, total bigint)")
        .execute(&mut job)
        .await
        .expect("create");
    let mut job_tx = job.begin().await.expect("begin");
    sqlx::query("INSERT INTO nightly_totals VALUES (current_date, 1)")
        .execute(&mut *job_tx)
        .await
        .expect("write");
    syncs_promptly_beside(&db, &store, job_tx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_that_writes_other_tables_of_the_outbox_database_does_not_hold_changes_back()
 {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    exec(&store, "CREATE TABLE app_audit (at timestamptz, what text)").await;
    // The application's own long transaction: it writes another table and reads the outbox,
    // but never inserts into it.
    let mut app = PgConnection::connect(&db.url).await.expect("connect");
    let mut app_tx = app.begin().await.expect("begin");
    sqlx::query("INSERT INTO app_audit VALUES (now(), 'report started')")
        .execute(&mut *app_tx)
        .await
        .expect("write");
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM prism_outbox")
        .fetch_one(&mut *app_tx)
        .await
        .expect("read");
    syncs_promptly_beside(&db, &store, app_tx).await;
}

/// Settings that send each row as its own item, so that the apply log shows every revision.
fn one_item_per_row(db: &TestDb, sim: &SimHandle) -> Settings {
    let mut s = settings(db, sim);
    s.batch.coalesce = false;
    s
}

/// An open transaction inserts the older change of a record (`in_savepoint`: inside a released
/// savepoint, as ORMs nest them); a newer change of the record then commits. The newer one
/// must not reach the API before the older one, which it does only once its transaction commits.
async fn an_open_older_change_holds_the_newer_back(in_savepoint: bool) {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let sim = sim(FaultProfile::default()).await;
    let engine = start_engine(&one_item_per_row(&db, &sim)).await;
    let record = uuid();
    let mut writer = PgConnection::connect(&db.url).await.expect("connect");
    let mut slow = writer.begin().await.expect("begin");
    let opened = Instant::now();
    if in_savepoint {
        sqlx::raw_sql("SAVEPOINT orm_nested")
            .execute(&mut *slow)
            .await
            .expect("savepoint");
    }
    let older = insert_in(&mut slow, &record, 1).await;
    if in_savepoint {
        sqlx::raw_sql("RELEASE SAVEPOINT orm_nested")
            .execute(&mut *slow)
            .await
            .expect("release");
    }
    let newer = insert_rows(&store, &[(record.clone(), patch(2))]).await[0];
    assert!(older < newer, "ids {older} then {newer}");
    until_held_open(opened).await;
    assert_eq!(
        applied_revisions(&sim, &record),
        Vec::<i64>::new(),
        "the newer change overtook the older one, still uncommitted"
    );
    let lag = watermark_lag(&store).await;
    assert!(
        lag >= 1.0,
        "the open writer, open {:?}, showed as watermark lag {lag} s",
        opened.elapsed()
    );
    slow.commit().await.expect("commit the older change");
    let rows = wait_until_finished(&store, Duration::from_secs(30)).await;
    engine.stop().await;
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(
        applied_revisions(&sim, &record),
        [1, 2],
        "applied in id order"
    );
    assert_eq!(assert_applied_in_order_once(&sim), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_with_an_older_change_of_a_record_holds_the_newer_change_back() {
    an_open_older_change_holds_the_newer_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_change_inserted_in_a_savepoint_holds_the_newer_change_back_too() {
    an_open_older_change_holds_the_newer_back(true).await;
}

/// For each of a few records at once, round after round: a slow transaction inserts a change
/// and, before it commits, a fast one inserts the record's next change and commits; meanwhile a
/// write transaction in another database stays open. Every record's changes reach the API in
/// id order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_fast_writers_of_the_same_records_reach_the_api_in_id_order() {
    const RECORDS: usize = 4;
    const ROUNDS: usize = 15;
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let Some(elsewhere) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let mut job = PgConnection::connect(&elsewhere.url)
        .await
        .expect("connect");
    let mut job_tx = job.begin().await.expect("begin");
    sqlx::raw_sql("CREATE TABLE nightly_totals (day date)")
        .execute(&mut *job_tx)
        .await
        .expect("write elsewhere");
    let sim = sim(FaultProfile::default()).await;
    let engine = start_engine(&one_item_per_row(&db, &sim)).await;
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..RECORDS {
        let url = db.url.clone();
        writers.spawn(async move {
            let record = uuid();
            let mut slow = PgConnection::connect(&url).await.expect("connect");
            let mut fast = PgConnection::connect(&url).await.expect("connect");
            for round in 0..ROUNDS {
                let mut slow_tx = slow.begin().await.expect("begin");
                let older = insert_in(&mut slow_tx, &record, 2 * round).await;
                let mut fast_tx = fast.begin().await.expect("begin");
                let newer = insert_in(&mut fast_tx, &record, 2 * round + 1).await;
                assert!(older < newer);
                fast_tx.commit().await.expect("commit the newer change");
                // Long enough for several claims (a poll every 20 ms, and a NOTIFY per commit).
                tokio::time::sleep(Duration::from_millis(60)).await;
                slow_tx.commit().await.expect("commit the older change");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let rows = wait_until_finished(&store, Duration::from_secs(60)).await;
    engine.stop().await;
    job_tx.rollback().await.expect("end the job");
    assert_eq!(rows.len(), RECORDS * ROUNDS * 2);
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(assert_applied_in_order_once(&sim), RECORDS * ROUNDS * 2);
}

/// Rows restored from another cluster (`pg_dump`, logical replication) keep the `txid` that
/// cluster gave them, which can lie far past every xid this one has handed out: compared with
/// this cluster's watermark they were never claimed, and every later change of their records
/// waited behind them, while the lag gauge read 0. A visible row whose `txid` is past the
/// claim's snapshot cannot be this cluster's; it is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_restored_from_another_cluster_are_synced_in_order() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let sim = sim(FaultProfile::default()).await;
    let store = db.store().await;
    let record = uuid();
    let ids = insert_rows(
        &store,
        &[
            (record.clone(), patch(1)),
            (uuid(), patch(1)),
            (record.clone(), patch(2)),
        ],
    )
    .await;
    // The first two as a restore leaves them: txids 2^32 and 2^33 past this cluster's.
    exec(
        &store,
        &format!(
            "UPDATE prism_outbox SET txid = (pg_current_xact_id()::text::numeric + 4294967296 * id)::text::xid8
             WHERE id IN ({}, {})",
            ids[0], ids[1]
        ),
    )
    .await;
    let mut s = settings(&db, &sim);
    s.batch.coalesce = false; // each change its own item, to see their order
    let engine = start_engine(&s).await;
    let rows = wait_until_finished(&store, Duration::from_secs(30)).await;
    engine.stop().await;
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(applied_revisions(&sim, &record), [1, 2]);
}
