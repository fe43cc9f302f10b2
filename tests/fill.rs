//! Batch fill (`batch.linger`): under a trickle, a flowing lane's partial batch waits to fill,
//! while a lone change after quiet goes at once and no row waits for ever. Each test runs against
//! a real SQLite file and a fresh Postgres database, with the project's simulator over real HTTP.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prism_sync::settings::Settings;
use prism_sync::sim::{FaultProfile, SimHandle};
use prism_sync::store::Store;

const FINISH: Duration = Duration::from_secs(60);

/// Test settings with small batches (a quarter batch is 3 rows) and `linger`.
fn fill_settings(db: &TestDb, sim: &SimHandle, linger: Duration) -> Settings {
    let mut s = settings(db, sim);
    s.batch.size = 10;
    s.batch.linger = linger;
    s.validate().expect("valid settings");
    s
}

/// Items of each update request the simulator saw, in order.
fn request_items(sim: &SimHandle) -> Vec<usize> {
    sim.requests()
        .iter()
        .filter(|r| r.path.ends_with("/batch/update"))
        .map(|r| r.items)
        .collect()
}

/// Inserts `n` changes of distinct records, one transaction each, `gap` apart.
async fn trickle(store: &Store, n: usize, gap: Duration) {
    for row in distinct_records(n) {
        insert_rows(store, &[row]).await;
        tokio::time::sleep(gap).await;
    }
}

/// Stores a finished batch of the default team's contact lane made `ago` before now, carrying
/// `rows` rows: the lane's recent history as the flowing test reads it.
async fn seed_batch(store: &Store, rows: i32, ago: Duration) {
    let key = uuid();
    let sql = match store.kind() {
        "postgres" => format!(
            "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count,
                                        state, created_at, completed_at, team_id)
             VALUES ('{key}', '{key}', 'contact', '\\x7b7d', '[]', {rows}, {rows}, 'done',
                     now() - interval '{ms} milliseconds', now(), '')",
            ms = ago.as_millis()
        ),
        _ => format!(
            "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count,
                                        state, created_at, completed_at, team_id)
             VALUES ('{key}', '{key}', 'contact', X'7b7d', '[]', {rows}, {rows}, 'done',
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{s:.3} seconds'),
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), '')",
            s = ago.as_secs_f64()
        ),
    };
    exec(store, &sql).await;
}

/// Makes rows `ids` retries that come due `after` from now (no wake-up announces them).
async fn come_due_in(store: &Store, ids: &[i64], after: Duration) {
    let ids = ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let due = match store.kind() {
        "postgres" => format!("now() + interval '{} milliseconds'", after.as_millis()),
        _ => format!(
            "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+{:.3} seconds')",
            after.as_secs_f64()
        ),
    };
    exec(
        store,
        &format!(
            "UPDATE prism_outbox SET state = 'retrying', attempts = 1, next_attempt_at = {due}
             WHERE id IN ({ids})"
        ),
    )
    .await;
}

both_backends! {
    async fn a_trickle_into_a_flowing_lane_is_sent_in_full_batches(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let engine = start_engine(&fill_settings(&db, &sim, Duration::from_secs(1))).await;
        // 50 changes/s: a batch of 10 fills in 200 ms, well within the 1 s linger.
        trickle(&store, 60, Duration::from_millis(20)).await;
        wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert_eq!(assert_applied_in_order_once(&sim), 60, "every change applied once");
        let items = request_items(&sim);
        assert_eq!(items.iter().sum::<usize>(), 60);
        // The first few changes go alone (the lane is not flowing yet); then full batches.
        let full = items.iter().filter(|&&n| n == 10).count();
        assert!(
            items.len() <= 15 && full >= 4,
            "requests carried {items:?}: a flowing lane's tail should have waited to fill"
        );
    }

    async fn with_linger_0s_a_trickle_is_sent_as_it_comes_as_before(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let engine = start_engine(&fill_settings(&db, &sim, Duration::ZERO)).await;
        trickle(&store, 40, Duration::from_millis(50)).await;
        wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert_eq!(assert_applied_in_order_once(&sim), 40, "every change applied once");
        let items = request_items(&sim);
        assert!(
            items.len() >= 20,
            "without a linger each change (50 ms apart) goes as it comes: {items:?}"
        );
    }

    async fn a_lone_change_after_quiet_goes_without_waiting_for_the_linger(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        // The lane was busy, but its last batch is older than two lingers: quiet since.
        seed_batch(&store, 100, Duration::from_secs(10)).await;
        let engine = start_engine(&fill_settings(&db, &sim, Duration::from_secs(4))).await;
        let started = Instant::now();
        insert_rows(&store, &distinct_records(1)).await;
        wait_until_finished(&store, FINISH).await;
        let took = started.elapsed();
        engine.stop().await;
        assert_eq!(request_items(&sim), vec![1]);
        assert!(
            took < Duration::from_secs(3),
            "a lone change after quiet took {took:?}: it waited for the 4 s linger"
        );
    }

    async fn a_lingering_tail_is_sent_after_the_linger_even_if_nothing_else_arrives(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        // A flowing lane (a batch of 10 just now), then a tail of 3 and nothing after it. The
        // poll interval is a minute: only the claimer's own look at the lingering tail can send
        // it on time.
        seed_batch(&store, 10, Duration::ZERO).await;
        insert_rows_together(&store, &distinct_records(3)).await;
        wait_below_watermark(&store).await;
        let inserted = Instant::now();
        let mut s = fill_settings(&db, &sim, Duration::from_secs(1));
        s.poll.interval = Duration::from_secs(60);
        let engine = start_engine(&s).await;
        wait_until_finished(&store, Duration::from_secs(15)).await;
        let took = inserted.elapsed();
        engine.stop().await;
        assert_eq!(request_items(&sim), vec![3], "the tail went as one request");
        assert!(
            took >= Duration::from_millis(900),
            "the tail of a flowing lane went after {took:?}, before the 1 s linger"
        );
    }

    async fn per_record_order_holds_across_lingering_tails_and_retries(db) {
        // A third of the items fail with a retryable code: their rows retry (jittered) and come
        // due in a lane whose tails linger, with later changes of their records behind them.
        let sim = sim(FaultProfile {
            item_error_rate: 0.3,
            item_error_codes: vec!["internal_error".into()],
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        let mut s = fill_settings(&db, &sim, Duration::from_millis(500));
        s.retry.max_attempts = 1000;
        let engine = start_engine(&s).await;
        let records: Vec<String> = (0..8).map(|_| uuid()).collect();
        for i in 0..80 {
            insert_rows(&store, &[(records[i % records.len()].clone(), patch(i))]).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(all.iter().all(|r| r.state == "succeeded"), "{all:?}");
        assert!(all.iter().any(|r| r.attempts > 1), "some rows were retried");
        assert_applied_in_order_once(&sim);
        for record in &records {
            let applied = sim.applied_to(
                prism_sync::model::ObjectType::Contact,
                record.parse().unwrap(),
            );
            let last = applied.last().and_then(|c| c.item.pointer("/default/revision").cloned());
            let newest = (0..80).rev().find(|i| records[i % records.len()] == *record);
            assert_eq!(
                last.and_then(|v| v.as_u64()),
                newest.map(|i| i as u64),
                "record {record} ends at its newest change"
            );
        }
    }

    async fn rows_past_a_whole_batch_when_a_tail_is_due_wait_for_their_own_linger(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        // A flowing lane with a tail of 7; 5 retries come due just before the tail's 2 s linger
        // runs out, with no wake-up, so the look at the due tail finds 12 rows: a whole batch
        // and 2 retries due for 0.1 s. Those 2 wait for their own linger and ride with the 5
        // changes inserted meanwhile: [10, 7], not [10, 2] and then [5].
        seed_batch(&store, 10, Duration::ZERO).await;
        insert_rows_together(&store, &distinct_records(7)).await;
        let retries = insert_rows_together(&store, &distinct_records(5)).await;
        come_due_in(&store, &retries, Duration::from_millis(1900)).await;
        let due_from = Instant::now();
        wait_below_watermark(&store).await;
        let mut s = fill_settings(&db, &sim, Duration::from_secs(2));
        s.poll.interval = Duration::from_secs(60);
        let engine = start_engine(&s).await;
        tokio::time::sleep((due_from + Duration::from_millis(2900)).saturating_duration_since(Instant::now())).await;
        insert_rows_together(&store, &distinct_records(5)).await;
        wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert_eq!(assert_applied_in_order_once(&sim), 17, "every change applied once");
        assert_eq!(
            request_items(&sim),
            vec![10, 7],
            "the rows past the whole batch were sent alone instead of waiting for the next tail"
        );
    }
}
