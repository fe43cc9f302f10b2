//! The lane floor (Postgres migration 0015, ARCHITECTURE.md "The lane floor"): claims walk each
//! lane from the first row not yet claimed, and a row the floor passed is still found when it
//! commits late, when it was held behind an older change of its record, or when it is replayed.
//! Two claims that overlap never take a row twice: a claim locks an outbox row it does not
//! update, so it checks the claim rows again after its locks. Postgres only; the engine runs
//! in-process against the simulator over real HTTP.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use prism_sync::sim::FaultProfile;
use prism_sync::store::{RawPool, Store};
use sqlx::{Connection, PgConnection};

/// The default lane's floor (`0` before its first claim).
async fn floor(store: &Store) -> i64 {
    scalar_i64(
        store,
        "SELECT COALESCE((SELECT floor_id FROM prism_lane_floors
                          WHERE team_id = '' AND object_type = 'contact'), 0)",
    )
    .await
}

async fn scalar_i64(store: &Store, sql: &str) -> i64 {
    let RawPool::Postgres(pool) = store.raw_pool_for_tests() else {
        panic!("Postgres only");
    };
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .expect("scalar")
}

/// Waits until `cond` (a database read, say) holds, failing after `within`.
async fn wait_for_async<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The order the API applied `record`'s revisions in.
fn applied(sim: &prism_sync::sim::SimHandle, record: &str) -> Vec<i64> {
    sim.applied_log()
        .iter()
        .filter(|c| c.record_id.to_string() == record)
        .filter_map(|c| c.item.pointer("/default/revision").and_then(|v| v.as_i64()))
        .collect()
}

/// A row whose id was drawn before another transaction's rows, and which commits only after a
/// claim took those rows and moved the floor past it, is still sent (found by its txid, at or
/// past the floor's late txid), and its record's changes reach the API in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_commits_after_the_floor_passed_it_is_still_sent() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let sim = sim(FaultProfile::default()).await;
    let mut s = settings(&db, &sim);
    s.batch.coalesce = false; // each change its own item, to see their order
    let engine = start_engine(&s).await;
    let record = uuid();
    // T_B takes its xid first, so that T_A, the late writer, is younger: once T_B commits,
    // T_B's row is below the watermark (T_A's xid) and claimed while T_A is still open.
    let mut b_conn = PgConnection::connect(&db.url).await.expect("connect");
    let mut t_b = b_conn.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *t_b)
        .await
        .expect("xid");
    let mut a_conn = PgConnection::connect(&db.url).await.expect("connect");
    let mut t_a = a_conn.begin().await.expect("begin");
    let late: i64 = sqlx::query_scalar(
        "INSERT INTO prism_outbox (record_id, patch) VALUES ($1::uuid, $2::jsonb) RETURNING id",
    )
    .bind(&record)
    .bind(patch(1))
    .fetch_one(&mut *t_a)
    .await
    .expect("insert the late change");
    let other = uuid();
    let passed: i64 = sqlx::query_scalar(
        "INSERT INTO prism_outbox (record_id, patch) VALUES ($1::uuid, $2::jsonb) RETURNING id",
    )
    .bind(&other)
    .bind(patch(1))
    .fetch_one(&mut *t_b)
    .await
    .expect("insert");
    t_b.commit().await.expect("commit T_B");
    assert!(late < passed, "ids {late} then {passed}");
    // A newer change of the late row's record, committed now: above the watermark until T_A
    // ends, so the floor may pass it too.
    insert_rows(&store, &[(record.clone(), patch(2))]).await;
    wait_for(
        "T_B's row to be applied while T_A is open",
        Duration::from_secs(10),
        || applied(&sim, &other) == [1],
    )
    .await;
    wait_for_async(
        "the floor to pass the late row",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move { floor(&store).await > late }
        },
    )
    .await;
    assert!(
        applied(&sim, &record).is_empty(),
        "nothing of the record before T_A commits"
    );
    t_a.commit().await.expect("commit T_A");
    let rows = wait_until_finished(&store, Duration::from_secs(30)).await;
    engine.stop().await;
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(applied(&sim, &record), [1, 2], "in id order");
    assert_eq!(assert_applied_in_order_once(&sim), 3);
}

/// A change held behind an older change of its record that keeps failing does not hold the
/// floor: it is parked (a claim row `pending`), the floor moves on with the lane's other rows,
/// and the held change goes once the older one has gone through, after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_held_behind_a_failing_older_one_does_not_hold_the_floor() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let record = uuid();
    let sim = sim(FaultProfile {
        item_errors_for_ids: BTreeMap::from([(record.clone(), "internal_error".to_owned())]),
        ..FaultProfile::default()
    })
    .await;
    let mut s = settings(&db, &sim);
    s.batch.coalesce = false;
    let engine = start_engine(&s).await;
    let ids = insert_rows(
        &store,
        &[(record.clone(), patch(1)), (record.clone(), patch(2))],
    )
    .await;
    let older = ids[0];
    wait_for_async(
        "the older change to be retrying",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move {
                rows(&store)
                    .await
                    .iter()
                    .any(|r| r.id == older && r.state == "retrying")
            }
        },
    )
    .await;
    let later = insert_rows(&store, &distinct_records(5)).await;
    wait_for_async(
        "the floor to pass the held change",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            let last = *later.last().unwrap();
            async move { floor(&store).await > last }
        },
    )
    .await;
    let parked = scalar_i64(
        &store,
        &format!(
            "SELECT count(*) FROM prism_outbox_claims WHERE id = {} AND state = 'pending'",
            ids[1]
        ),
    )
    .await;
    assert_eq!(parked, 1, "the held change waits on a claim row");
    assert!(applied(&sim, &record).is_empty());
    sim.set_faults(FaultProfile::default());
    let rows = wait_until_finished(&store, Duration::from_secs(30)).await;
    engine.stop().await;
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(applied(&sim, &record), [1, 2]);
    assert_eq!(assert_applied_in_order_once(&sim), 7);
}

/// Claims that run at once on one lane never take a row twice, and together take every row.
/// (A claim locks rows it does not update: one that read the outbox before another claim
/// committed, and locked a row only once that claim let it go, must see the claim row the
/// other wrote. Without the check after the lock, this took rows twice within a few rounds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_claims_of_one_lane_never_take_a_row_twice() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    for round in 0..15 {
        let inserted = insert_rows(&store, &distinct_records(400)).await;
        wait_below_watermark(&store).await;
        let mut taken: Vec<i64> = Vec::new();
        while taken.len() < inserted.len() {
            let claims: Vec<_> = (0..4)
                .map(|n| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        claim_as(
                            &store,
                            &format!("c{n}"),
                            Duration::from_secs(600),
                            "",
                            60,
                            20,
                        )
                        .await
                    })
                })
                .collect();
            let before = taken.len();
            for c in claims {
                let outcome = c.await.expect("claim task");
                taken.extend(
                    outcome
                        .batches
                        .iter()
                        .flat_map(|b| b.items.iter().flat_map(|i| i.rows.iter().copied())),
                );
            }
            assert!(
                taken.len() > before,
                "round {round}: claims took nothing with rows left"
            );
        }
        let distinct: HashSet<i64> = taken.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            taken.len(),
            "round {round}: a row was taken twice"
        );
        assert!(
            inserted.iter().all(|id| distinct.contains(id)),
            "round {round}: a row was left"
        );
    }
}

/// A row that arrives below its lane's floor with an old `txid` (a restore, logical
/// replication, an explicit id) is reached by no claim source; the floor audit, which every
/// daemon runs now and then, moves the floor back to it and it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_arrives_below_the_floor_out_of_id_order_is_found_by_the_audit() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let sim = sim(FaultProfile::default()).await;
    let engine = start_engine(&settings(&db, &sim)).await;
    insert_rows(&store, &distinct_records(3)).await;
    exec(
        &store,
        &format!(
            "INSERT INTO prism_outbox (id, record_id, patch) VALUES (1000, '{}', '{}')",
            uuid(),
            patch(1)
        ),
    )
    .await;
    wait_until_finished(&store, Duration::from_secs(30)).await;
    wait_for_async("the floor to pass id 1000", Duration::from_secs(10), || {
        let store = store.clone();
        async move { floor(&store).await > 1000 }
    })
    .await;
    let restored = uuid();
    exec(
        &store,
        &format!(
            "INSERT INTO prism_outbox (id, record_id, patch, txid) VALUES (500, '{restored}', '{}', '3'::xid8)",
            patch(1)
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        applied(&sim, &restored).is_empty(),
        "no claim source reaches it"
    );
    assert_eq!(
        store.audit_floors().await.expect("audit"),
        1,
        "one lane moved back"
    );
    let rows = wait_until_finished(&store, Duration::from_secs(30)).await;
    engine.stop().await;
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    assert_eq!(applied(&sim, &restored), [1]);
    assert_eq!(
        store.audit_floors().await.expect("audit"),
        0,
        "at most once per period"
    );
}

/// A replica of an earlier version, left running after migration 0015, claims by setting
/// `prism_outbox.state = 'in_flight'`: refused, with a message that says what to do, rather
/// than sending again rows a current replica has claimed.
#[tokio::test]
async fn a_claim_by_an_earlier_version_is_refused() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let id = insert_rows(&store, &distinct_records(1)).await[0];
    let RawPool::Postgres(pool) = store.raw_pool_for_tests() else {
        unreachable!()
    };
    let refused = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE prism_outbox SET state = 'in_flight', batch_id = gen_random_uuid() WHERE id = {id}"
    )))
    .execute(pool)
    .await
    .expect_err("an earlier version's claim is refused");
    assert!(
        refused
            .to_string()
            .contains("stop replicas of earlier versions"),
        "{refused}"
    );
    assert_eq!(rows(&store).await[0].state, "pending");
}

/// The index tuples the server has counted read through `index` of this test's database, once
/// every other connection to it has gone (a backend reports its counts when it exits) and the
/// count stands still.
async fn index_tuples_read(url: &str, index: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let mut last = -1;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (others, read): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()),
                    (SELECT COALESCE(sum(idx_tup_read), 0)::int8 FROM pg_stat_user_indexes
                     WHERE indexrelname = $1)",
        )
        .bind(index)
        .fetch_one(&mut conn)
        .await
        .expect("stats");
        // Each read is of a snapshot of the counts taken in its own transaction.
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut conn)
            .await
            .expect("clear snapshot");
        if others == 0 && read == last {
            conn.close().await.ok();
            return read;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the counts of {index} never settled ({others} other connections)"
        );
        last = if others == 0 { read } else { -1 };
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Closes `store`'s connections (each backend reports its statistics when it exits).
async fn close(store: Store) {
    let RawPool::Postgres(pool) = store.raw_pool_for_tests() else {
        panic!("Postgres only");
    };
    pool.close().await;
}

/// A claim's cost does not grow with the finished rows kept. With fresh statistics saying
/// nearly every row of the table is of one lane (the default team's contacts, finished), the
/// planner once walked the other lanes, each with nothing waiting and never claimed (floor 0),
/// through the primary key from their floor, filtering for the lane: every finished row read
/// once a lane, each claim (380–676 ms at 200,000 finished rows, `--mode claim-cost`). Counted,
/// not timed: the tuples read through `prism_outbox_pkey` while a claim of every lane takes the
/// waiting rows and their batch is recorded, and while the gauges are sampled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_does_not_read_the_finished_rows_of_other_lanes() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    const FINISHED: i64 = 20_000;
    let store = db.store().await;
    // As prism-sync leaves them: the outbox row as inserted, a claim row that follows a batch
    // that ended `done`, and the lane's floor past them.
    exec(
        &store,
        &format!(
            "WITH b AS (INSERT INTO prism_batches (id, idempotency_key, object_type, body, items,
                                                   item_count, row_count, state, completed_at)
                        VALUES (gen_random_uuid(), gen_random_uuid()::text, 'contact',
                                '\\x7b7d'::bytea, '[]', 1, 1, 'done', now())
                        RETURNING id),
                  o AS (INSERT INTO prism_outbox (record_id, patch)
                        SELECT gen_random_uuid(), '{{\"default\": {{\"old\": true}}}}'
                        FROM generate_series(1, {FINISHED})
                        RETURNING id, team_id, object_type, record_id)
             INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id, batch_id)
             SELECT o.id, o.team_id, o.object_type, o.record_id, b.id FROM o, b;
             INSERT INTO prism_lane_floors (team_id, object_type, floor_id, late_txid)
             SELECT team_id, object_type, max(id) + 1, pg_current_xact_id()
             FROM prism_outbox GROUP BY 1, 2;"
        ),
    )
    .await;
    let waiting = insert_rows_together(&store, &distinct_records(100)).await;
    exec(&store, "VACUUM ANALYZE prism_outbox, prism_outbox_claims").await;
    close(store).await;
    let before = index_tuples_read(&db.url, "prism_outbox_pkey").await;

    let store = db.store().await;
    let claimed = claim_as(&store, "test", Duration::from_secs(60), "", 100, 100).await;
    let taken: usize = claimed
        .batches
        .iter()
        .flat_map(|b| b.items.iter().map(|i| i.rows.len()))
        .sum();
    assert_eq!(taken, waiting.len(), "the claim takes every waiting row");
    // And a sample of the gauges (backlog, oldest waiting row), which walk every lane too.
    let gauges = store.gauges().await.expect("gauges");
    let in_flight = gauges
        .rows_by_state
        .iter()
        .find(|(state, _)| state == "in_flight")
        .map(|(_, n)| *n);
    assert_eq!(in_flight, Some(waiting.len() as i64), "{gauges:?}");
    close(store).await;
    let read = index_tuples_read(&db.url, "prism_outbox_pkey").await - before;
    assert!(
        read < FINISHED / 10,
        "one claim read {read} tuples through the primary key, with {FINISHED} finished rows"
    );
}

/// A never-claimed row's claim row is written from what the claim read of the row (its lane,
/// its record, its tries), not read again from the outbox: it must say what the outbox row
/// says. Rows of two teams and two object types, three changes a record (coalesced into one
/// item, whose own tries are the highest of its rows'), each row with tries of its own (as a
/// row retried by a version before the claim rows, migration 0015, keeps them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_row_records_its_outbox_rows_lane_record_and_tries() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    exec(
        &store,
        "INSERT INTO prism_outbox (record_id, patch, team_id, object_type, attempts)
         SELECT r.id, jsonb_build_object('default', jsonb_build_object('n', g)),
                CASE WHEN r.n % 2 = 0 THEN '' ELSE 'acme' END,
                CASE WHEN r.n % 4 < 2 THEN 'contact' ELSE 'deal' END, g % 3
         FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, 40) n) r,
              generate_series(1, 3) g
         ORDER BY r.n, g",
    )
    .await;
    let mut carried = BTreeMap::new();
    let mut coalesced = 0;
    for team in ["", "acme"] {
        let claimed = claim_as(&store, "test", Duration::from_secs(60), team, 100, 100).await;
        for batch in &claimed.batches {
            for item in &batch.items {
                coalesced += usize::from(item.rows.len() == 3);
                for row in &item.rows {
                    assert!(carried.insert(*row, batch.id).is_none(), "row {row} twice");
                }
            }
        }
    }
    assert_eq!(carried.len(), 120, "every row claimed");
    assert_eq!(coalesced, 40, "each record's three changes in one item");
    let RawPool::Postgres(pool) = store.raw_pool_for_tests() else {
        panic!("Postgres only");
    };
    let claims: Vec<(i64, Option<uuid::Uuid>, bool)> = sqlx::query_as(
        "SELECT o.id, c.batch_id,
                (c.team_id, c.object_type, c.record_id, c.attempts)
                  IS NOT DISTINCT FROM (o.team_id, o.object_type, o.record_id, o.attempts)
         FROM prism_outbox o LEFT JOIN prism_outbox_claims c ON c.id = o.id ORDER BY o.id",
    )
    .fetch_all(pool)
    .await
    .expect("claim rows");
    assert_eq!(claims.len(), 120);
    for (id, batch, same) in claims {
        assert_eq!(batch, carried.get(&id).copied(), "row {id}'s batch");
        assert!(same, "row {id}'s claim row differs from its outbox row");
    }
}
