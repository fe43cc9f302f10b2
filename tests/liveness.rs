//! Liveness: every row reaches `succeeded` or `dead` in bounded time, whatever the API answers,
//! whatever the configuration or the database does meanwhile. Each test runs against a real
//! SQLite file and a fresh Postgres database, with the project's simulator over real HTTP, and
//! each would hang (or fail its bound) on the release before these fixes.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use prism_sync::sim::FaultProfile;
use prism_sync::store::{RawPool, Store};
use sqlx::Row;

const FINISH: Duration = Duration::from_secs(60);

/// `(id, state, code, message)` of every row, in id order.
async fn outcomes(store: &Store) -> Vec<(i64, String, Option<String>, Option<String>)> {
    let sql =
        "SELECT id, state, last_error_code, last_error_message FROM prism_outbox_rows ORDER BY id";
    let map = |r: &dyn Fn(usize) -> Option<String>, id: i64, state: String| (id, state, r(2), r(3));
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|row| map(&|i| row.get(i), row.get(0), row.get(1)))
            .collect(),
        RawPool::Postgres(p) => sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|row| map(&|i| row.get(i), row.get(0), row.get(1)))
            .collect(),
    }
}

/// Stores a batch of every waiting row of `team` as a process that then died: it is open,
/// leased for a moment, and its rows are in flight.
async fn store_batch_of_dead_process(store: &Store, team: &str) {
    let claimed = claim_as(
        store,
        "dead-process",
        Duration::from_millis(10),
        team,
        100,
        100,
    )
    .await;
    assert_eq!(claimed.batches.len(), 1, "one batch stored");
    let waiting = rows(store)
        .await
        .iter()
        .filter(|r| r.state == "pending")
        .count();
    assert_eq!(
        waiting, 0,
        "the dead process's batch took every waiting row"
    );
}

/// Holds the outbox's write lock on a connection of its own (SQLite: the database's write lock;
/// Postgres: a lock on `prism_outbox` that lets readers through) until `release` returns.
async fn while_outbox_locked<F: std::future::Future<Output = ()>>(db: &TestDb, release: F) {
    use sqlx::Connection;
    match db.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url)
                .await
                .expect("connect");
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut c)
                .await
                .expect("lock");
            release.await;
            sqlx::raw_sql("COMMIT")
                .execute(&mut c)
                .await
                .expect("unlock");
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.expect("connect");
            // The outcome of a row is written on its claim row (Postgres migration 0015).
            sqlx::raw_sql("BEGIN; LOCK TABLE prism_outbox, prism_outbox_claims IN EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .expect("lock");
            release.await;
            sqlx::raw_sql("COMMIT")
                .execute(&mut c)
                .await
                .expect("unlock");
        }
    }
}

/// A 429 storm (`profile`) ends its new rows `dead` as `http_429` at `retry.give_up_after`
/// (4 s), and the team backs off meanwhile: a handful of requests, not a hot loop.
async fn storm_backs_off(db: &TestDb, profile: FaultProfile) {
    let sim = sim(profile).await;
    let store = db.store().await;
    insert_rows(&store, &distinct_records(5)).await;
    wait_below_watermark(&store).await;
    let mut s = settings(db, &sim);
    s.retry.base_delay = Duration::from_millis(50);
    s.retry.max_delay = Duration::from_secs(5);
    s.retry.give_up_after = Duration::from_secs(4);
    let started = Instant::now();
    let engine = start_engine(&s).await;
    let all = wait_until_finished(&store, FINISH).await;
    let took = started.elapsed();
    engine.stop().await;
    assert!(
        all.iter()
            .all(|r| r.state == "dead" && r.code.as_deref() == Some("http_429")),
        "{all:?}"
    );
    let sent = sim.requests().len();
    // Pauses from 25-50 ms doubling per 429: about eight sends in four seconds. A pause
    // that never grows (0-50 ms) sends ~80.
    assert!(sent <= 20, "{sent} requests in {took:?}: no backoff");
    assert!(sent >= 3, "{sent} requests: it kept trying");
}

both_backends! {
    async fn an_api_message_with_nul_and_bytes_that_are_not_utf8_is_stored_and_every_row_ends(db) {
        // Every other item fails with a hostile message: a NUL (Postgres `text` refuses it), an
        // escape sequence and raw bytes that are not UTF-8. Before, one such message made the
        // whole group write fail and every batch's rows stayed in flight.
        let sim = sim(FaultProfile {
            item_error_rate: 0.5,
            item_error_codes: vec!["validation_error".into()],
            hostile_messages: true,
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(300)).await;
        wait_below_watermark(&store).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let all = outcomes(&store).await;
        let dead: Vec<_> = all.iter().filter(|r| r.1 == "dead").collect();
        assert!(!dead.is_empty() && dead.len() < all.len(), "some items failed, some succeeded");
        for (id, _, code, message) in dead {
            assert_eq!(code.as_deref(), Some("validation_error"), "row {id}");
            let message = message.as_deref().unwrap_or_default();
            assert!(message.contains('\u{FFFD}') && !message.contains('\0') && !message.contains('\u{1b}'), "row {id}: {message:?}");
            assert!(message.starts_with("A property value failed validation."), "row {id}: {message:?}");
        }
    }

    async fn a_record_the_api_always_refuses_with_a_retryable_code_ends_dead_and_lets_the_next_through(db) {
        let stuck = uuid();
        let sim = sim(FaultProfile {
            item_errors_for_ids: BTreeMap::from([(stuck.clone(), "internal_error".into())]),
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        let other = uuid();
        insert_rows(&store, &[(stuck.clone(), patch(1)), (other.clone(), patch(1))]).await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.retry.max_attempts = 1000;
        s.retry.give_up_after = Duration::from_secs(2);
        let started = Instant::now();
        let engine = start_engine(&s).await;
        let all = wait_until_finished(&store, FINISH).await;
        let took = started.elapsed();
        engine.stop().await;
        let all_outcomes = outcomes(&store).await;
        let (_, state, code, message) = &all_outcomes[0];
        assert_eq!((state.as_str(), code.as_deref()), ("dead", Some("internal_error")), "{all:?}");
        assert!(message.as_deref().unwrap_or_default().starts_with("gave up (retry.give_up_after)"), "{message:?}");
        assert_eq!(all[1].state, "succeeded");
        assert!(all[0].attempts > 1, "it was retried before giving up: {all:?}");
        assert!(took < Duration::from_secs(30), "ended in bounded time: {took:?}");
    }

    async fn a_batch_the_api_never_answers_ends_dead_once_give_up_after_has_passed(db) {
        // Every request is a 503 (retried under the same key) and releases never come (a huge
        // batch.max_attempts): only retry.give_up_after can end the rows.
        let sim = sim(FaultProfile { error_503_rate: 1.0, ..FaultProfile::default() }).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(5)).await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.batch.max_attempts = 100_000;
        s.retry.max_attempts = 100_000;
        s.retry.give_up_after = Duration::from_secs(2);
        let engine = start_engine(&s).await;
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(all.iter().all(|r| r.state == "dead" && r.code.as_deref() == Some("http_503")), "{all:?}");
        assert!(sim.applied_log().is_empty());
    }

    async fn a_429_storm_without_retry_after_backs_off_and_its_rows_still_end(db) {
        // 429s burn no attempt, so without a growing pause the same batch was sent ~13 times a
        // second, and its rows never ended.
        storm_backs_off(&db, FaultProfile { rate_limit_rate: 1.0, ..FaultProfile::default() }).await;
    }

    async fn a_429_storm_that_says_retry_after_0_backs_off_as_without_it(db) {
        // `retry-after: 0` (or `retry-after-ms: 0`, or a date already past, as from a clock a
        // second ahead of the server's) was honoured as "now": no pause, no attempt burned,
        // the batch due at once and the claimer woken at once: hundreds of requests in four
        // seconds, each with a database write.
        storm_backs_off(&db, FaultProfile { rate_limit_rate: 1.0, retry_after: Some(0), ..FaultProfile::default() }).await;
        storm_backs_off(&db, FaultProfile { rate_limit_rate: 1.0, retry_after_ms: Some(0), ..FaultProfile::default() }).await;
    }

    async fn a_2xx_that_cannot_be_read_is_never_sent_under_a_new_key(db) {
        // One record's answers are always too large to read: its whole batch's 200 is. The API
        // applied the batch on the first send; re-sending under a new key would apply it again.
        let big = uuid();
        let sim = sim(FaultProfile {
            oversized_answer_ids: vec![big.clone()],
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        let mut records = distinct_records(9);
        records.push((big.clone(), patch(1)));
        insert_rows(&store, &records).await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.batch.max_attempts = 3;
        s.http.max_response_bytes = 1 << 20;
        let engine = start_engine(&s).await;
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(all.iter().all(|r| r.state == "dead" && r.code.as_deref() == Some("unreadable_response")), "{all:?}");
        let keys: HashSet<_> = sim.requests().iter().map(|r| r.idempotency_key.clone()).collect();
        assert_eq!(keys.len(), 1, "one key, re-sent and never released");
        assert_eq!(sim.requests().len(), 3, "batch.max_attempts sends");
        assert_eq!(assert_applied_in_order_once(&sim), 10, "each change applied once");
    }

    async fn spellings_of_one_uuid_are_one_record(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let id = uuid::Uuid::new_v4();
        let upper = id.hyphenated().to_string().to_uppercase();
        let braced = format!("{{{}}}", id.hyphenated());
        let simple = id.simple().to_string().to_uppercase();
        let canonical = id.hyphenated().to_string();
        let spellings = [upper, braced, simple, canonical.clone(), format!("urn:uuid:{canonical}")];
        let rows: Vec<(String, String)> = spellings.iter().enumerate().map(|(rev, s)| (s.clone(), patch(rev))).collect();
        if db.backend == Backend::Postgres {
            // A uuid column takes every spelling Postgres accepts as one value already.
            insert_rows(&store, &rows[..4]).await;
        } else {
            insert_rows(&store, &rows).await;
            // Surrounding whitespace (a line of a CRLF file, a padded column) and a BLOB: each
            // used to be stored as written and taken as a record of its own.
            let n = rows.len();
            insert_rows(&store, &[(format!(" {canonical}\r\n"), patch(n))]).await;
            exec(&store, &format!("INSERT INTO prism_outbox (record_id, patch) VALUES (CAST('{}' AS BLOB), '{}')", id.simple(), patch(n + 1))).await;
        }
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.batch.coalesce = false;
        let engine = start_engine(&s).await;
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(all.iter().all(|r| r.state == "succeeded"), "{all:?}");
        let applied = assert_applied_in_order_once(&sim);
        assert_eq!(applied, all.len(), "every change applied once, in order");
        assert!(sim.applied_log().iter().all(|c| c.record_id == id));
        // One record: never two of its changes in one request.
        assert!(sim.requests().iter().all(|r| r.items == 1), "{:?}", sim.requests());
    }

    async fn a_batch_of_a_team_removed_from_the_configuration_ends_dead_as_unknown_team(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows_together(&store, &distinct_records(3)).await;
        exec(&store, "UPDATE prism_outbox SET team_id = 'gone'").await;
        wait_below_watermark(&store).await;
        // The previous configuration had team `gone`; its process stored a batch and stopped.
        store_batch_of_dead_process(&store, "gone").await;
        let mut later = distinct_records(1);
        later[0].0 = uuid();
        insert_rows(&store, &later).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let (gone, ours) = all.split_at(3);
        assert!(gone.iter().all(|r| r.state == "dead" && r.code.as_deref() == Some("unknown_team")), "{gone:?}");
        assert_eq!(ours[0].state, "succeeded");
        assert!(sim.requests().len() == 1, "nothing of the removed team was sent");
    }

    async fn a_chain_of_strays_of_one_record_ends_in_rounds_not_sweeps(db) {
        // Rows of a team no longer configured, all of one record: each waits for the one before
        // it (per-record order), so a sweep can end only the oldest. The sweep that ended one is
        // followed by another at once; before, each waited for the next 30 s sweep (4 rows: 90 s).
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let record = uuid();
        let chain: Vec<(String, String)> = (0..4)
            .map(|i| (record.clone(), format!(r#"{{"default": {{"n": {i}}}}}"#)))
            .collect();
        insert_rows_together(&store, &chain).await;
        exec(&store, "UPDATE prism_outbox SET team_id = 'gone'").await;
        wait_below_watermark(&store).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        // Well inside one 30 s sweep interval: only sweeps that follow each other at once end
        // all four in time.
        let all = wait_until_finished(&store, Duration::from_secs(20)).await;
        engine.stop().await;
        assert!(all.iter().all(|r| r.state == "dead" && r.code.as_deref() == Some("unknown_team")), "{all:?}");
        assert!(sim.requests().is_empty(), "nothing of the removed team was sent");
    }

    async fn a_refused_team_with_nothing_stored_probes_with_a_new_batch(db) {
        let sim = sim(FaultProfile::default()).await;
        sim.set_api_key("rotated");
        let store = db.store().await;
        insert_rows(&store, &distinct_records(1)).await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.retry.give_up_after = Duration::from_secs(1);
        let engine = start_engine(&s).await;
        // The only batch is refused, probed, then given up: nothing stored is left to probe with.
        let first = wait_until_finished(&store, FINISH).await;
        assert_eq!(first[0].code.as_deref(), Some("http_401"), "{first:?}");
        sim.set_api_key(prism_sync::sim::DEFAULT_API_KEY);
        insert_rows(&store, &distinct_records(2)).await;
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(all[1..].iter().all(|r| r.state == "succeeded"), "the key works again and new changes flow: {all:?}");
    }

    async fn a_failing_claim_does_not_hold_back_batches_leased_just_before_it(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows_together(&store, &distinct_records(5)).await;
        wait_below_watermark(&store).await;
        store_batch_of_dead_process(&store, "").await;
        insert_rows(&store, &distinct_records(5)).await;
        // Claims of new rows fail (the database refuses to put rows in flight); leasing the
        // stored batch still works.
        let refuse = match db.backend {
            Backend::Sqlite => "CREATE TRIGGER refuse_claims BEFORE UPDATE OF state ON prism_outbox
                WHEN NEW.state = 'in_flight' BEGIN SELECT RAISE(ABORT, 'claims refused by the test'); END;",
            // A claim puts a row in flight on its claim row (migration 0015): state NULL.
            Backend::Postgres => "CREATE FUNCTION refuse_claims() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'claims refused by the test'; END $$;
                CREATE TRIGGER refuse_claims BEFORE INSERT OR UPDATE ON prism_outbox_claims FOR EACH ROW
                WHEN (NEW.state IS NULL) EXECUTE FUNCTION refuse_claims();",
        };
        exec(&store, refuse).await;
        let mut s = settings(&db, &sim);
        s.sync.lease = Duration::from_secs(60);
        let engine = start_engine(&s).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = rows(&store).await;
            if all[..5].iter().all(|r| r.state == "succeeded") {
                assert!(all[5..].iter().all(|r| r.state == "pending"), "{all:?}");
                break;
            }
            assert!(Instant::now() < deadline, "the stored batch waited for its lease to lapse: {all:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        exec(&store, match db.backend {
            Backend::Sqlite => "DROP TRIGGER refuse_claims",
            Backend::Postgres => "DROP TRIGGER refuse_claims ON prism_outbox_claims; DROP FUNCTION refuse_claims()",
        })
        .await;
        wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert_eq!(assert_applied_in_order_once(&sim), 10);
    }

    async fn a_stored_batch_that_cannot_be_read_back_ends_alone_and_the_rest_flows(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows_together(&store, &distinct_records(3)).await;
        wait_below_watermark(&store).await;
        store_batch_of_dead_process(&store, "").await;
        exec(&store, "UPDATE prism_batches SET items = 'not what prism-sync wrote'").await;
        insert_rows(&store, &distinct_records(4)).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let all = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let (corrupt, rest) = all.split_at(3);
        assert!(corrupt.iter().all(|r| r.state == "dead" && r.code.as_deref() == Some("corrupt_batch")), "{corrupt:?}");
        assert!(rest.iter().all(|r| r.state == "succeeded"), "{rest:?}");
    }

    async fn a_batch_end_the_database_refuses_is_written_without_texts_and_holds_no_other_back(db) {
        // The database refuses one row's outcome while it carries the API's message (here a
        // trigger; in the field a byte sequence or a size the sanitising missed). Every batch
        // is answered while the outbox is locked, so their ends queue up and go to the database
        // as groups: the refused group is written batch by batch, the refused batch without the
        // API's texts. Before, the group's other batches stayed in flight until their lease
        // lapsed, and the refused batch was re-sent and refused for ever.
        let poison = uuid();
        let sim = sim(FaultProfile {
            latency: Duration::from_millis(500),
            item_errors_for_ids: BTreeMap::from([(poison.clone(), "validation_error".into())]),
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        let mut records = distinct_records(11);
        records.insert(5, (poison.clone(), patch(1)));
        insert_rows(&store, &records).await;
        exec(&store, &match db.backend {
            Backend::Sqlite => format!("CREATE TRIGGER refuse_outcome BEFORE UPDATE ON prism_outbox
                WHEN NEW.record_id = '{poison}' AND NEW.last_error_message IS NOT NULL
                BEGIN SELECT RAISE(ABORT, 'outcome refused by the test'); END;"),
            // A row's outcome is written on its claim row (migration 0015).
            Backend::Postgres => format!("CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF (SELECT record_id FROM prism_outbox WHERE id = NEW.id) = '{poison}' THEN
                        RAISE EXCEPTION 'outcome refused by the test';
                    END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER refuse_outcome BEFORE UPDATE ON prism_outbox_claims FOR EACH ROW
                WHEN (NEW.last_error_message IS NOT NULL)
                EXECUTE FUNCTION refuse_outcome();"),
        })
        .await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.batch.size = 1;
        s.sync.max_in_flight = records.len();
        // An end that is not written leaves its batch stored until the lease lapses: far
        // beyond the bound below.
        s.sync.lease = Duration::from_secs(90);
        let engine = start_engine(&s).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !rows(&store).await.iter().all(|r| r.state == "in_flight") {
            assert!(Instant::now() < deadline, "every row claimed at once: {:?}", rows(&store).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while_outbox_locked(&db, async {
            wait_for("every batch answered", Duration::from_secs(20), || sim.requests().len() >= records.len()).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
        .await;
        let all = wait_until_finished(&store, Duration::from_secs(40)).await;
        engine.stop().await;
        assert_eq!(sim.requests().len(), records.len(), "each batch sent once");
        let all_outcomes = outcomes(&store).await;
        let (_, state, code, message) = &all_outcomes[5];
        assert_eq!((state.as_str(), code.as_deref(), message.as_deref()), ("dead", Some("validation_error"), None), "{all:?}");
        assert!(all.iter().enumerate().all(|(i, r)| i == 5 || r.state == "succeeded"), "{all:?}");
    }
}

/// SQLite rewrites spellings as they are inserted; rows an application stored before that
/// migration (0003) are rewritten once by it, so an upgrade does not keep two records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_spellings_stored_before_the_upgrade_become_one_record() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let sim = sim(FaultProfile::default()).await;
    let mut s = settings(&db, &sim);
    s.batch.coalesce = false;
    let previous = tempfile::tempdir().expect("temp dir");
    for file in ["0001_outbox.sql", "0002_operations_and_teams.sql"] {
        let from = format!("{}/migrations/sqlite/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(from, previous.path().join(file)).expect("copy migration");
    }
    let store = Store::connect(&s.database).await.expect("connect");
    let RawPool::Sqlite(pool) = store.raw_pool_for_tests() else {
        unreachable!("a SQLite test database")
    };
    let before = sqlx::migrate::Migrator::new(previous.path())
        .await
        .expect("migrator");
    before
        .run(pool)
        .await
        .expect("the previous release's schema");
    let id = uuid::Uuid::new_v4();
    let canonical = id.hyphenated().to_string();
    let spellings = [
        canonical.to_uppercase(),
        format!("{{{canonical}}}"),
        id.simple().to_string(),
        format!("urn:uuid:{canonical}"),
        canonical.clone(),
    ];
    let rows: Vec<(String, String)> = spellings
        .iter()
        .enumerate()
        .map(|(rev, s)| (s.clone(), patch(rev)))
        .collect();
    insert_rows(&store, &rows).await;
    store.migrate().await.expect("upgrade");
    let stored: Vec<String> = sqlx::query_scalar("SELECT DISTINCT record_id FROM prism_outbox")
        .fetch_all(pool)
        .await
        .expect("read");
    assert_eq!(stored, [canonical], "every spelling stored canonically");
    let engine = start_engine(&s).await;
    let all = wait_until_finished(&store, FINISH).await;
    engine.stop().await;
    assert!(all.iter().all(|r| r.state == "succeeded"), "{all:?}");
    assert_eq!(assert_applied_in_order_once(&sim), spellings.len());
    assert!(
        sim.requests().iter().all(|r| r.items == 1),
        "one change of the record a request: {:?}",
        sim.requests()
    );
}
