//! The engine's behaviour suite: each test runs against a real SQLite file and a fresh database
//! on the real Postgres, with the project's simulator over real HTTP.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use prism_sync::sim::FaultProfile;
use prism_sync::store::{ClaimOutcome, FinishBatch, RawPool, Store};

const FINISH: Duration = Duration::from_secs(60);

/// Claims for the default team as process `owner` would.
async fn claim(
    store: &Store,
    owner: &str,
    lease: Duration,
    max_records: usize,
    batch_size: usize,
) -> ClaimOutcome {
    claim_as(store, owner, lease, "", max_records, batch_size).await
}

/// Attempts recorded for a batch.
async fn attempts_of(store: &Store, batch: uuid::Uuid) -> i64 {
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            sqlx::query_scalar("SELECT count(*) FROM prism_batch_attempts WHERE batch_id = ?1")
                .bind(batch.to_string())
                .fetch_one(p)
                .await
                .unwrap()
        }
        RawPool::Postgres(p) => {
            sqlx::query_scalar("SELECT count(*) FROM prism_batch_attempts WHERE batch_id = $1")
                .bind(batch)
                .fetch_one(p)
                .await
                .unwrap()
        }
    }
}

both_backends! {
    async fn a_group_of_outcomes_writes_only_the_batches_still_leased_to_their_writer(db) {
        let store = db.store().await;
        insert_rows(&store, &distinct_records(30)).await;
        wait_below_watermark(&store).await;
        let claimed = claim(&store, "a", Duration::from_secs(60), 30, 10).await;
        let [b0, b1, b2] = &claimed.batches[..] else { panic!("three batches: {:?}", claimed.batches.len()) };
        // b1's lease lapsed and process b took it over while a was still sending it.
        exec(&store, &format!("UPDATE prism_batches SET lease_owner = 'b' WHERE id = '{}'", b1.id)).await;
        let written = store.finish_batches(&[FinishBatch::all_succeeded(b0, "a"), FinishBatch::all_succeeded(b1, "a"), FinishBatch::all_succeeded(b2, "a")]).await.unwrap();
        assert_eq!(written, [true, false, true], "one transaction, each batch fenced on its own");
        let by_batch = |id: uuid::Uuid| {
            let id = id.to_string();
            move |r: &&RowState| r.batch_id.as_deref() == Some(id.as_str())
        };
        let after = rows(&store).await;
        for (b, state, attempts) in [(b0, "succeeded", 1), (b1, "in_flight", 0), (b2, "succeeded", 1)] {
            let mine: Vec<_> = after.iter().filter(by_batch(b.id)).collect();
            assert_eq!(mine.len(), 10);
            assert!(mine.iter().all(|r| r.state == state && r.attempts == attempts), "{mine:?}");
            assert_eq!(attempts_of(&store, b.id).await, attempts);
        }
        // An end written twice in one group (or again later) passes the fence once.
        let written = store.finish_batches(&[FinishBatch::all_succeeded(b1, "b"), FinishBatch::all_succeeded(b1, "b"), FinishBatch::all_succeeded(b0, "a")]).await.unwrap();
        assert_eq!(written, [true, false, false]);
        assert_eq!(attempts_of(&store, b1.id).await, 1);
        assert_eq!(attempts_of(&store, b0.id).await, 1);
        let after = rows(&store).await;
        assert!(after.iter().all(|r| r.state == "succeeded" && r.attempts == 1), "{after:?}");
    }

    async fn a_backlog_goes_out_in_full_batches_and_every_row_succeeds(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(250)).await;
        // On Postgres the visibility watermark can keep the newest rows out of a claim for a
        // moment (a transaction caught ending counts); start once the whole backlog is claimable.
        wait_below_watermark(&store).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let rows = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(rows.iter().all(|r| r.state == "succeeded" && r.attempts == 1), "{rows:?}");
        let mut sizes: Vec<u64> = sim.requests().iter().map(|r| r.items as u64).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![50, 100, 100], "a backlog fills batches to 100");
        assert_eq!(assert_applied_in_order_once(&sim), 250);
    }

    async fn large_patches_go_in_requests_whose_answers_can_be_read(db) {
        // The API answers each item with its record, at least as large as its patch. 60 changes
        // of 3 KB in one request would be answered with about 190 KB, over this 64 KiB cap on
        // answers: the answer could never be read, and every row would end `dead` as
        // `unreadable_response`. A request's patches stay within half of the cap.
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &large_changes(60, 3_000)).await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.http.max_response_bytes = 64 * 1024;
        let engine = start_engine(&s).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded" && r.attempts == 1), "{done:?}");
        assert_eq!(assert_applied_in_order_once(&sim), 60);
        let sizes: Vec<u64> = sim.requests().iter().map(|r| r.items as u64).collect();
        assert!(sizes.iter().all(|&n| (1..=10).contains(&n)), "items per request: {sizes:?}");
    }

    async fn changes_to_one_record_are_applied_in_order_and_merged_only_when_safe(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let records: Vec<String> = (0..20).map(|_| uuid()).collect();
        let mut rows = Vec::new();
        for rev in 0..200 {
            let record = records[rev % records.len()].clone();
            let p = if rev % 7 == 0 {
                format!(r#"{{"default": {{"revision": {rev}}}, "list": {{"tags": ["t{rev}"]}}}}"#)
            } else {
                patch(rev)
            };
            rows.push((record, p));
        }
        insert_rows(&store, &rows).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"));
        let applied = assert_applied_in_order_once(&sim);
        assert!(applied < 200, "default-only neighbours were merged ({applied} items for 200 rows)");
        for (i, record) in records.iter().enumerate() {
            let last = (0..200).rev().find(|rev| rev % 20 == i).unwrap();
            let got = sim.record(prism_sync::sim::ObjectType::Contact, record.parse().unwrap()).unwrap();
            assert_eq!(got["default"]["revision"], serde_json::json!(last), "record {record} ends at its last change");
        }
    }

    async fn each_item_gets_its_own_outcome(db) {
        let refused = uuid();
        let invalid = uuid();
        let faults = FaultProfile {
            item_errors_for_ids: BTreeMap::from([
                (refused.clone(), "not_found".to_owned()),
                (invalid.clone(), "validation_error".to_owned()),
            ]),
            ..FaultProfile::default()
        };
        let sim = sim(faults).await;
        let store = db.store().await;
        let mut rows = distinct_records(30);
        rows.push((refused.clone(), patch(100)));
        rows.push((invalid.clone(), patch(101)));
        let ids = insert_rows(&store, &rows).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let by_id: BTreeMap<i64, &RowState> = done.iter().map(|r| (r.id, r)).collect();
        assert_eq!(by_id[&ids[30]].code.as_deref(), Some("not_found"));
        assert_eq!(by_id[&ids[30]].state, "dead");
        assert_eq!(by_id[&ids[31]].code.as_deref(), Some("validation_error"));
        assert_eq!(done.iter().filter(|r| r.state == "succeeded").count(), 30);
    }

    async fn retryable_item_errors_and_missing_results_retry_until_they_succeed(db) {
        let faults = FaultProfile {
            item_error_rate: 0.3,
            item_error_codes: vec!["rate_limited".into(), "internal_error".into()],
            missing_results_rate: 0.3,
            ..FaultProfile::default()
        };
        let sim = sim(faults).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(300)).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{:?}", done.iter().find(|r| r.state != "succeeded"));
        assert!(done.iter().any(|r| r.attempts > 1), "some rows needed a retry");
        assert_eq!(assert_applied_in_order_once(&sim), 300, "nothing applied twice");
    }

    async fn server_faults_retry_the_same_batch_with_the_same_key_and_bytes(db) {
        let faults = FaultProfile {
            error_500_rate: 0.25,
            error_503_rate: 0.15,
            rate_limit_rate: 0.2,
            retry_after_ms: Some(30),
            drop_after_apply_rate: 0.2,
            truncated_body_rate: 0.1,
            non_json_body_rate: 0.1,
            ..FaultProfile::default()
        };
        let sim = sim(faults).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(400)).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{:?}", done.iter().find(|r| r.state != "succeeded"));
        let stats = sim.stats();
        assert_eq!(stats.idempotency_mismatches, 0, "a key is never reused with another body");
        assert!(stats.replays > 0, "dropped answers were recovered by idempotent replays: {stats:?}");
        assert_eq!(assert_applied_in_order_once(&sim), 400, "each change applied exactly once");
        let keys: HashSet<String> = sim.requests().iter().filter_map(|r| r.idempotency_key.clone()).collect();
        assert!(keys.len() < sim.requests().len(), "retries reused their batch's key");
    }

    async fn a_refused_key_pauses_without_burning_attempts_and_resumes_when_it_works(db) {
        let sim = sim(FaultProfile::default()).await;
        sim.set_api_key("rotated-key");
        let store = db.store().await;
        insert_rows(&store, &distinct_records(150)).await;
        let mut s = settings(&db, &sim);
        s.auth.probe_interval = Duration::from_secs(1);
        let engine = start_engine(&s).await;
        let health = engine.health.clone();
        wait_for("the refusal to be noticed", Duration::from_secs(10), || health.credentials_refused()).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let waiting = rows(&store).await;
        assert!(waiting.iter().all(|r| r.attempts == 0 && r.state != "dead"), "no attempt burned: {:?}", waiting.first());
        let refused = sim.requests().len();
        // The two batches that were in flight when the key was refused, then one probe a second.
        assert!(refused <= 3, "while refused it only probes ({refused} requests)");
        sim.set_api_key(prism_sync::sim::DEFAULT_API_KEY);
        let done = wait_until_finished(&store, FINISH).await;
        assert!(!health.credentials_refused());
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded" && r.attempts == 1));
    }

    async fn a_batch_rejected_whole_is_bisected_until_the_poison_item_stands_alone(db) {
        let poison = uuid();
        let faults = FaultProfile { poison_ids: vec![poison.clone()], poison_status: 400, ..FaultProfile::default() };
        let sim = sim(faults).await;
        let store = db.store().await;
        let mut rows = distinct_records(99);
        rows.insert(37, (poison.clone(), patch(1000)));
        let ids = insert_rows(&store, &rows).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let dead: Vec<&RowState> = done.iter().filter(|r| r.state == "dead").collect();
        assert_eq!(dead.len(), 1, "only the poison item dies: {dead:?}");
        assert_eq!(dead[0].id, ids[37]);
        assert_eq!(dead[0].code.as_deref(), Some("http_400"));
        assert_eq!(assert_applied_in_order_once(&sim), 99);
        let rejected = sim.requests().iter().filter(|r| r.status == 400).count();
        assert!(rejected <= 8, "bisection takes about log2(100) rejected requests, not 100 ({rejected})");
    }

    async fn malformed_rows_go_dead_at_once_and_the_rest_still_sync(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let good = uuid();
        let sql = match db.backend {
            Backend::Sqlite => format!(
                "INSERT INTO prism_outbox (record_id, patch) VALUES ('not-a-uuid', '{{}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '[1, 2]');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"id\": \"x\"}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"default\": ');
                 INSERT INTO prism_outbox (record_id, patch, object_type) VALUES ('{good}', '{{}}', 'spaceship');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', CAST(X'7B22FF227D' AS TEXT));
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"default\": {{\"a\": \"' || hex(zeroblob(5000000)) || '\"}}}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"default\": ' || replace(hex(zeroblob(10000)), '00', '[') || replace(hex(zeroblob(10000)), '00', ']') || '}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', 'a' || char(0) || 'b');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"default\": {{\"a\": \"' || CAST(X'FF' AS TEXT) || '\"}}}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', X'5B315D');
                 INSERT INTO prism_outbox (record_id, patch) VALUES (X'6E6F', '{{}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', 42);
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"default\": {{\"revision\": 1}}}}');"
            ),
            Backend::Postgres => format!(
                "INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '[1, 2]');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"id\": \"x\"}}');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '\"a string\"');
                 INSERT INTO prism_outbox (record_id, patch, object_type) VALUES ('{good}', '{{}}', 'spaceship');
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', jsonb_build_object('default', jsonb_build_object('a', repeat('x', 10000000))));
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', jsonb_build_object('default', (repeat('[', 10000) || repeat(']', 10000))::jsonb));
                 INSERT INTO prism_outbox (record_id, patch) VALUES ('{good}', '{{\"default\": {{\"revision\": 1}}}}');"
            ),
        };
        exec(&store, &sql).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let (last, bad) = done.split_last().unwrap();
        assert_eq!(last.state, "succeeded", "the good row behind the bad ones still syncs");
        for row in bad {
            assert_eq!(row.state, "dead", "{row:?}");
            assert!(
                matches!(row.code.as_deref(), Some("invalid_record_id" | "invalid_patch" | "invalid_object_type" | "patch_too_large")),
                "{row:?}"
            );
        }
        assert_eq!(sim.applied_log().len(), 1);
    }

    async fn a_stored_batch_whose_owner_died_is_resent_with_its_own_key(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(40)).await;
        // A process claims and stores a batch, then dies before sending it (its lease is short).
        let claimed = claim(&store, "crashed-process", Duration::from_millis(300), 40, 100).await;
        let key = claimed.batches[0].idempotency_key.clone();
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"));
        let requests = sim.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].idempotency_key.as_deref(), Some(key.as_str()), "re-sent under the stored key");
    }

    async fn a_batch_near_the_key_lifetime_is_released_to_new_keys(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(10)).await;
        let claimed = claim(&store, "crashed-process", Duration::from_millis(10), 10, 100).await;
        let old_key = claimed.batches[0].idempotency_key.clone();
        let age = match db.backend {
            Backend::Sqlite => "UPDATE prism_batches SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-23 hours', '-30 minutes')",
            Backend::Postgres => "UPDATE prism_batches SET created_at = now() - interval '23 hours 30 minutes'",
        };
        exec(&store, age).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"));
        assert!(sim.requests().iter().all(|r| r.idempotency_key.as_deref() != Some(old_key.as_str())), "the expiring key is never sent");
        assert_eq!(assert_applied_in_order_once(&sim), 10);
    }

    async fn two_daemons_on_one_database_never_send_a_row_twice(db) {
        let faults = FaultProfile {
            latency: Duration::from_millis(5),
            latency_jitter: Duration::from_millis(20),
            error_503_rate: 0.1,
            ..FaultProfile::default()
        };
        let sim = sim(faults).await;
        let store = db.store().await;
        let records: Vec<String> = (0..60).map(|_| uuid()).collect();
        let rows: Vec<(String, String)> = (0..900).map(|rev| (records[rev % 60].clone(), if rev % 3 == 0 {
            format!(r#"{{"default": {{"revision": {rev}}}, "list": {{}}}}"#)
        } else { patch(rev) })).collect();
        insert_rows(&store, &rows).await;
        let mut s = settings(&db, &sim);
        s.batch.size = 20;
        s.sync.max_in_flight = 3;
        let a = start_engine(&s).await;
        let b = start_engine(&s).await;
        let done = wait_until_finished(&store, FINISH).await;
        a.stop().await;
        b.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"));
        assert_applied_in_order_once(&sim);
        assert_eq!(sim.stats().idempotency_mismatches, 0);
        for (i, record) in records.iter().enumerate() {
            let last = (0..900).rev().find(|rev| rev % 60 == i).unwrap();
            let got = sim.record(prism_sync::sim::ObjectType::Contact, record.parse().unwrap()).unwrap();
            assert_eq!(got["default"]["revision"], serde_json::json!(last));
        }
    }

    async fn a_key_mismatch_releases_the_rows_to_a_new_key_and_nothing_is_applied_twice(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(4)).await;
        wait_below_watermark(&store).await;
        let claimed = claim(&store, "crashed-process", Duration::from_millis(10), 4, 100).await;
        let key = claimed.batches[0].idempotency_key.clone();
        // Someone else used the stored key with another body first (never expected: prism-sync
        // stores its bytes), so the API answers the stored bytes 409 idempotency_key_mismatch.
        let url = format!("{}/v2/prism/{}/contact/batch/update", sim.base_url(), sim.team_id());
        let other = reqwest::Client::new()
            .post(url)
            .header("x-api-key", prism_sync::sim::DEFAULT_API_KEY)
            .header("idempotency-key", &key)
            .header("content-type", "application/json")
            .body(format!(r#"{{"items":[{{"id":"{}","default":{{"x":1}}}}]}}"#, uuid()))
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 200);
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        let mut to_batch = BTreeMap::new();
        for r in sim.requests().iter().skip(1) {
            *to_batch.entry(r.idempotency_key.clone().unwrap_or_default()).or_insert(0) += 1;
        }
        assert_eq!(to_batch.get(&key), Some(&1), "the stored key was sent once: {to_batch:?}");
        // (Released rows come due one by one, with jitter: one or more new batches.)
        assert!(to_batch.len() >= 2 && to_batch.values().all(|n| *n == 1), "then the rows went out under new keys: {to_batch:?}");
        assert_eq!(sim.stats().idempotency_mismatches, 1);
        assert_eq!(assert_applied_in_order_once(&sim), 5, "four changes and the other body, each once");
        assert_eq!(attempts_of(&store, claimed.batches[0].id).await, 1);
    }

    async fn a_batch_that_fails_batch_max_attempts_times_is_released_to_a_new_key(db) {
        let sim = sim(FaultProfile { error_503_rate: 1.0, ..FaultProfile::default() }).await;
        let store = db.store().await;
        insert_rows(&store, &distinct_records(3)).await;
        wait_below_watermark(&store).await;
        let mut s = settings(&db, &sim);
        s.batch.max_attempts = 3;
        let engine = start_engine(&s).await;
        let first_key = loop {
            let keys: Vec<Option<String>> = sim.requests().iter().map(|r| r.idempotency_key.clone()).collect();
            if keys.len() >= 3 {
                break keys[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Once it has failed three times under its key, the batch is released; the API heals.
        wait_for("the first batch to be released", FINISH, || {
            sim.requests().iter().any(|r| r.idempotency_key != first_key)
        })
        .await;
        sim.set_faults(FaultProfile::default());
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        let under_first = sim.requests().iter().filter(|r| r.idempotency_key == first_key).count();
        assert_eq!(under_first, 3, "sent batch.max_attempts times under its key, never again");
        assert_eq!(assert_applied_in_order_once(&sim), 3);
    }
}
