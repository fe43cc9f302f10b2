//! Overlapping claim rounds (`sync.claims_in_flight`): with two rounds at once every row is
//! still synced exactly once and in per-record order, no team's buffer holds more than its size
//! (in batches, and in bytes: `sync.max_buffer_bytes`), a claim held up in the database does not
//! hold up the others, and a shutdown with rounds in flight loses nothing. Real SQLite files
//! and a real Postgres, the simulator over HTTP.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prism_sync::engine::Engine;
use prism_sync::settings::Settings;
use prism_sync::sim::FaultProfile;
use prism_sync::store::{RawPool, Store};

const FINISH: Duration = Duration::from_secs(90);

/// The test settings with two claim rounds at once.
fn overlapping(db: &TestDb, sim: &prism_sync::sim::SimHandle) -> Settings {
    let mut s = settings(db, sim);
    s.sync.claims_in_flight = Some(2);
    s.validate()
        .expect("two claims in flight is a valid setting");
    s
}

/// Changes to `records` records, `per_record` each, in turns (so that a record's chain is spread
/// over the whole outbox): most are `default`-only updates (they may merge), every fifth also
/// changes a list (it may not), so chains both coalesce and go out as separate items in order.
fn chains(records: usize, per_record: usize) -> (Vec<String>, Vec<(String, String)>) {
    let ids: Vec<String> = (0..records).map(|_| uuid()).collect();
    let mut rows = Vec::new();
    for rev in 0..records * per_record {
        let record = ids[rev % records].clone();
        let p = if rev % 5 == 0 {
            format!(r#"{{"default": {{"revision": {rev}}}, "list": {{"tags": ["t{rev}"]}}}}"#)
        } else {
            patch(rev)
        };
        rows.push((record, p));
    }
    (ids, rows)
}

both_backends! {
    async fn with_two_claims_in_flight_every_change_is_synced_once_in_record_order(db) {
        let sim = sim(FaultProfile { latency: Duration::from_millis(2), ..FaultProfile::default() }).await;
        let store = db.store().await;
        let (records, rows) = chains(300, 10);
        insert_rows_together(&store, &rows).await;
        wait_below_watermark(&store).await;
        let mut s = overlapping(&db, &sim);
        // Small buffers: many rounds, most of them overlapping.
        s.sync.max_in_flight = 2;
        let engine = start_engine(&s).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded" && r.attempts == 1), "every row succeeded at its first attempt");
        assert_eq!(done.len(), 3000);
        let applied = assert_applied_in_order_once(&sim);
        assert!(applied <= 3000);
        for (i, record) in records.iter().enumerate() {
            let last = (0..3000).rev().find(|rev| rev % 300 == i).unwrap();
            let got = sim.record(prism_sync::sim::ObjectType::Contact, record.parse().unwrap()).unwrap();
            assert_eq!(got["default"]["revision"], serde_json::json!(last), "record {record} ends at its last change");
        }
        // No request carried a record twice, and no key was sent for two different batches.
        let mut keys = std::collections::HashSet::new();
        for r in sim.requests() {
            if let Some(key) = &r.idempotency_key {
                keys.insert(key.clone());
            }
        }
        assert_eq!(keys.len(), sim.requests().len(), "one request per batch (no batch sent twice)");
    }

    async fn with_two_claims_in_flight_a_buffer_never_holds_more_than_its_batches_per_worker(db) {
        // Each request takes 600 ms: the two workers are busy while the claimer refills the
        // buffer (four batches per worker on Postgres, two on SQLite), so two rounds that both
        // took the whole free room would leave twice that waiting behind the two on the wire.
        let per_worker = match db.backend {
            Backend::Postgres => 4,
            Backend::Sqlite => 2,
        };
        let most_held = 2 + 2 * per_worker;
        let sim = sim(FaultProfile { latency: Duration::from_millis(600), ..FaultProfile::default() }).await;
        let store = db.store().await;
        insert_rows_together(&store, &distinct_records(2200)).await;
        wait_below_watermark(&store).await;
        let mut s = overlapping(&db, &sim);
        s.sync.max_in_flight = 2;
        s.batch.coalesce = false;
        let (engine, probe) = start_engine_with(&s, Engine::load_probe).await;
        // Batches held = on the wire (2) + buffered (at most 8 or 4) + answered ones waiting for
        // their outcome write (a few milliseconds after each answer). The least held over each
        // 150 ms window leaves those moments out.
        let mut windows = Vec::new();
        let started = Instant::now();
        while started.elapsed() < FINISH {
            let mut least = usize::MAX;
            let window = Instant::now();
            while window.elapsed() < Duration::from_millis(150) {
                least = least.min(probe().batches_held);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            windows.push(least);
            let left = rows(&store).await.iter().filter(|r| r.state != "succeeded").count();
            if left == 0 {
                break;
            }
        }
        engine.stop().await;
        let most = windows.iter().copied().max().unwrap_or(0);
        assert!(most <= most_held, "held {most} batches for a whole window: more than 2 sending and {per_worker} per worker buffered ({windows:?})");
        assert!(windows.contains(&most_held), "the buffer was kept full behind the workers ({windows:?})");
        let done = rows(&store).await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "every row succeeded");
        assert_eq!(assert_applied_in_order_once(&sim), 2200);
    }

    async fn a_buffer_holds_no_more_than_max_buffer_bytes_of_claimed_changes(db) {
        // Changes of about 10 KB each, a buffer of 64 KiB behind two workers whose requests
        // take 300 ms: a claim takes rows only up to the buffer's free bytes (about six), so
        // the process holds a few dozen changes at most. By batches alone (two or four per
        // worker, 100 rows each) it would hold all 120 at once.
        let sim = sim(FaultProfile { latency: Duration::from_millis(300), ..FaultProfile::default() }).await;
        let store = db.store().await;
        insert_rows_together(&store, &large_changes(120, 10_000)).await;
        wait_below_watermark(&store).await;
        let mut s = overlapping(&db, &sim);
        s.sync.max_in_flight = 2;
        s.batch.max_patch_bytes = 16 * 1024;
        s.sync.max_buffer_bytes = 64 * 1024;
        s.validate().expect("a buffer of 64 KiB holds the largest patch");
        let engine = start_engine(&s).await;
        // Rows in flight = on the wire (two batches, each at most a round's share of the
        // bytes) + buffered (64 KiB, plus the one change a round always takes) + answered ones
        // waiting for their outcome write; the least over each 150 ms window leaves the last
        // out. 6 rows fit 64 KiB; 7 per batch on the wire, 8 in the buffer: 22.
        let mut windows = Vec::new();
        let started = Instant::now();
        while started.elapsed() < FINISH {
            let mut least = usize::MAX;
            let window = Instant::now();
            let mut finished = false;
            while window.elapsed() < Duration::from_millis(150) {
                let now = rows(&store).await;
                least = least.min(now.iter().filter(|r| r.state == "in_flight").count());
                finished = now.iter().all(|r| r.state == "succeeded");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            windows.push(least);
            if finished {
                break;
            }
        }
        engine.stop().await;
        let most = windows.iter().copied().max().unwrap_or(0);
        assert!(most <= 22, "held {most} changes of 10 KB for a whole window: more than two sending batches and 64 KiB buffered ({windows:?})");
        assert!(most >= 8, "the buffer was used at all ({windows:?})");
        let done = rows(&store).await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "every row succeeded");
        assert_eq!(assert_applied_in_order_once(&sim), 120);
        let largest = sim.requests().iter().map(|r| r.items).max().unwrap_or(0);
        assert!(largest <= 7, "a request carried {largest} changes of 10 KB: more than a round's share of 64 KiB");
    }

    async fn a_shutdown_with_claim_rounds_in_flight_loses_nothing(db) {
        let sim = sim(FaultProfile { latency: Duration::from_millis(5), ..FaultProfile::default() }).await;
        let store = db.store().await;
        let (_, rows_in) = chains(400, 5);
        insert_rows_together(&store, &rows_in).await;
        wait_below_watermark(&store).await;
        let mut s = overlapping(&db, &sim);
        s.sync.max_in_flight = 2;
        // Stopped while busy (rounds in flight), a few times over, then left to finish.
        for _ in 0..3 {
            let engine = start_engine(&s).await;
            let before = rows(&store).await.iter().filter(|r| r.state == "succeeded").count();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let now = rows(&store).await.iter().filter(|r| r.state == "succeeded").count();
                if now >= before + 200 || now == 2000 || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            engine.stop().await;
        }
        let engine = start_engine(&s).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "every row succeeded");
        assert_applied_in_order_once(&sim);
    }
}

mod postgres_only {
    use super::*;

    /// A connection that holds the lock of one outbox row until [`RowLock::release`].
    struct RowLock {
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
    }

    impl RowLock {
        async fn take(db: &TestDb, id: i64) -> RowLock {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("SELECT id FROM prism_outbox WHERE id = $1 FOR UPDATE")
                .bind(id)
                .execute(&mut *tx)
                .await
                .expect("lock the row");
            RowLock { tx }
        }

        async fn release(self) {
            self.tx.rollback().await.expect("release the row");
        }
    }

    /// Record `x`'s two `default`-only changes first (a claim that takes the first as a head
    /// also takes the second to merge it, waiting for its row lock), then `others` changes of
    /// other records. Returns the ids of x's two rows.
    async fn held_up_record(store: &Store, others: usize) -> (String, [i64; 2]) {
        let x = uuid();
        let mut rows = vec![(x.clone(), patch(0)), (x.clone(), patch(1))];
        rows.extend(distinct_records(others));
        let ids = insert_rows_together(store, &rows).await;
        wait_below_watermark(store).await;
        (x, [ids[0], ids[1]])
    }

    fn state_of(all: &[RowState], id: i64) -> RowState {
        all.iter().find(|r| r.id == id).cloned().expect("row")
    }

    /// With one claim round at a time, the round that took x's first row waits for the lock of
    /// its second, and nothing else is claimed until the lock goes; with two, the other round
    /// keeps claiming every other record meanwhile, except the heads the waiting round holds
    /// (its share: at most half of the 32 buffer places, 1,600 rows).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_held_up_in_the_database_does_not_hold_up_the_others() {
        let Some(db) = TestDb::new(Backend::Postgres).await else {
            return;
        };
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (x, [x1, x2]) = held_up_record(&store, 4000).await;
        let lock = RowLock::take(&db, x2).await;
        let engine = start_engine(&overlapping(&db, &sim)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = rows(&store).await;
            let others_done = all.iter().filter(|r| r.state == "succeeded").count() >= 2000;
            if others_done {
                assert_eq!(
                    state_of(&all, x1).state,
                    "pending",
                    "x's claim is still waiting for the lock"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the other records were not synced while one claim waited for a row lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lock.release().await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(
            done.iter().all(|r| r.state == "succeeded"),
            "every row succeeded"
        );
        assert_applied_in_order_once(&sim);
        let got = sim
            .record(prism_sync::sim::ObjectType::Contact, x.parse().unwrap())
            .unwrap();
        assert_eq!(
            got["default"]["revision"],
            serde_json::json!(1),
            "x ends at its last change"
        );
    }

    /// Two claims of one process at once over one lane: each takes a run of the lane's rows in
    /// order, the second starting where the first stopped, so 250 due rows go as 100 + 100 and
    /// 50 however the two meet. (Scanning side by side under `SKIP LOCKED`, they would lock
    /// alternate rows and cut them at random, 130 + 120 as 100 + 30 and 100 + 20.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_claims_at_once_cut_a_lane_into_whole_batches() {
        let Some(db) = TestDb::new(Backend::Postgres).await else {
            return;
        };
        let store = db.store().await;
        for round in 0..6 {
            let ids = insert_rows_together(&store, &distinct_records(2550)).await;
            wait_below_watermark(&store).await;
            let lease = Duration::from_secs(600);
            let (a, b) = tokio::join!(
                claim_as(&store, "a", lease, "", 2000, 100),
                claim_as(&store, "b", lease, "", 2000, 100)
            );
            let mut sizes: Vec<usize> = a
                .batches
                .iter()
                .chain(&b.batches)
                .map(|batch| batch.items.len())
                .collect();
            sizes.sort_unstable();
            let mut whole = vec![100; 25];
            whole.insert(0, 50);
            assert_eq!(sizes, whole, "round {round}");
            // Each claim holds one run of the rows, in id order.
            let all = rows(&store).await;
            let claim_of = |id: i64| {
                let row = all.iter().find(|r| r.id == id).expect("row");
                let batch = row.batch_id.as_deref().expect("claimed");
                a.batches.iter().any(|x| x.id.to_string() == batch)
            };
            let switches = ids
                .windows(2)
                .filter(|w| claim_of(w[0]) != claim_of(w[1]))
                .count();
            assert_eq!(
                switches, 1,
                "round {round}: one claim's rows, then the other's"
            );
        }
    }

    /// Stopped while a round waits in the database: the stop waits for it, and its batch (stored
    /// and leased when the lock goes) is kept and sent by the next start under its own key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_in_flight_at_shutdown_is_awaited_and_its_batch_is_sent_by_the_next_start() {
        let Some(db) = TestDb::new(Backend::Postgres).await else {
            return;
        };
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (_, [x1, x2]) = held_up_record(&store, 4000).await;
        let lock = RowLock::take(&db, x2).await;
        let s = overlapping(&db, &sim);
        let engine = start_engine(&s).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while rows(&store)
            .await
            .iter()
            .filter(|r| r.state == "succeeded")
            .count()
            < 2000
        {
            assert!(Instant::now() < deadline, "the other records were synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stopping = tokio::spawn(engine.stop());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !stopping.is_finished(),
            "the stop waits for the claim round in flight"
        );
        lock.release().await;
        stopping.await.expect("engine stopped");
        let after = rows(&store).await;
        let (r1, r2) = (state_of(&after, x1), state_of(&after, x2));
        assert_eq!(
            (r1.state.as_str(), r2.state.as_str()),
            ("in_flight", "in_flight"),
            "the round's claim was committed, not abandoned"
        );
        assert_eq!(
            r1.batch_id, r2.batch_id,
            "x's two changes share one stored batch"
        );
        let batch = r1.batch_id.clone().expect("a batch");
        let engine = start_engine(&s).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(
            done.iter().all(|r| r.state == "succeeded"),
            "every row succeeded"
        );
        assert_eq!(
            state_of(&done, x1).batch_id.as_deref(),
            Some(batch.as_str()),
            "the batch claimed at shutdown was the one sent"
        );
        assert_applied_in_order_once(&sim);
        let RawPool::Postgres(p) = store.raw_pool_for_tests() else {
            unreachable!()
        };
        let attempts: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM prism_batch_attempts WHERE batch_id = $1::uuid",
        )
        .bind(&batch)
        .fetch_one(p)
        .await
        .unwrap();
        assert_eq!(attempts, 1, "sent once, by the next start");
    }
}
