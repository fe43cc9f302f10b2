//! The operator's verbs that change rows, `replay` and `purge`, on both databases: what they
//! choose, what they leave alone, what they show before asking, and what they write to the audit
//! log. Verbs run as the real binary; the sync runs against the simulator over real HTTP.

mod common;

use std::time::Duration;

use common::*;
use prism_sync::model::{ObjectType, Operation};
use prism_sync::ops::enqueue::{Change, insert};
use prism_sync::ops::{purge, replay};
use prism_sync::sim::FaultProfile;
use prism_sync::store::{RawPool, Store};
use serde_json::{Value, json};
use uuid::Uuid;

const FINISH: Duration = Duration::from_secs(60);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not one JSON value ({e}): {text}"))
}

fn state_of(rows: &[RowState], id: i64) -> (&str, i64) {
    let r = rows
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("row {id} is gone"));
    (r.state.as_str(), r.attempts)
}

/// Runs a verb that must succeed; returns its stdout.
async fn verb_ok(db: &TestDb, sim: &prism_sync::sim::SimHandle, args: &[&str]) -> String {
    let (code, out, err) = verb(db, sim, args, "").await;
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// The stored patch of row `id`, as JSON.
async fn patch_of(store: &Store, id: i64) -> Value {
    let text: String = match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query_scalar("SELECT patch FROM prism_outbox WHERE id = ?1")
            .bind(id)
            .fetch_one(p)
            .await
            .unwrap(),
        RawPool::Postgres(p) => {
            sqlx::query_scalar("SELECT patch::text FROM prism_outbox WHERE id = $1")
                .bind(id)
                .fetch_one(p)
                .await
                .unwrap()
        }
    };
    json(&text)
}

/// `(actor, action, filter, rows)` of every audit entry, oldest first.
async fn audit(store: &Store) -> Vec<(String, String, Value, i64)> {
    let rows: Vec<(String, String, String, i64)> = match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => {
            sqlx::query_as("SELECT actor, action, filter, rows FROM prism_audit ORDER BY id")
                .fetch_all(p)
                .await
                .unwrap()
        }
        RawPool::Postgres(p) => {
            sqlx::query_as("SELECT actor, action, filter::text, rows FROM prism_audit ORDER BY id")
                .fetch_all(p)
                .await
                .unwrap()
        }
    };
    rows.into_iter()
        .map(|(actor, action, filter, rows)| (actor, action, json(&filter), rows))
        .collect()
}

/// Sets one row's columns by hand, as the daemon would have left them: on Postgres, where
/// the daemon keeps a row's progress on its claim row (migration 0015), there (`in_flight` is
/// a claim row that follows its batch), and `enqueued_at` on the outbox row.
async fn set_row(store: &Store, id: i64, set: &str) {
    if matches!(
        store.raw_pool_for_tests(),
        prism_sync::store::RawPool::Sqlite(_)
    ) {
        exec(
            store,
            &format!("UPDATE prism_outbox SET {set} WHERE id = {id}"),
        )
        .await;
        return;
    }
    let (mut claim, mut outbox) = (Vec::new(), Vec::new());
    let (mut succeeded, mut batch, mut completed) = (false, None, "now()".to_owned());
    for assignment in set.split(',').map(str::trim) {
        let value = assignment.split_once('=').map_or("", |(_, v)| v.trim());
        if assignment.starts_with("enqueued_at") {
            outbox.push(assignment.to_owned());
        } else if assignment == "state = 'in_flight'" {
            claim.push("state = NULL".to_owned());
        } else if assignment == "state = 'succeeded'" {
            // A success is its batch's: the claim row follows a batch that ended `done`.
            succeeded = true;
            claim.push("state = NULL".to_owned());
        } else {
            if assignment.starts_with("batch_id") {
                batch = Some(value.to_owned());
            }
            if assignment.starts_with("completed_at") {
                completed = value.to_owned();
            }
            claim.push(assignment.to_owned());
        }
    }
    if succeeded {
        let given = batch.is_some();
        let batch = batch.unwrap_or_else(|| format!("'{}'", uuid::Uuid::new_v4()));
        exec(
            store,
            &format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count,
                                            row_count, state, completed_at)
                 VALUES ({batch}, gen_random_uuid()::text, 'contact', '\\x7b7d'::bytea, '[]', 1, 1,
                         'done', {completed})
                 ON CONFLICT (id) DO UPDATE SET state = 'done', completed_at = {completed}"
            ),
        )
        .await;
        if !given {
            claim.push(format!("batch_id = {batch}"));
        }
    }
    exec(
        store,
        &format!(
            "INSERT INTO prism_outbox_claims (id, team_id, object_type, record_id)
             SELECT id, team_id, object_type, record_id FROM prism_outbox WHERE id = {id}
             ON CONFLICT (id) DO NOTHING"
        ),
    )
    .await;
    if !claim.is_empty() {
        exec(
            store,
            &format!(
                "UPDATE prism_outbox_claims SET {} WHERE id = {id}",
                claim.join(", ")
            ),
        )
        .await;
    }
    if !outbox.is_empty() {
        exec(
            store,
            &format!(
                "UPDATE prism_outbox SET {} WHERE id = {id}",
                outbox.join(", ")
            ),
        )
        .await;
    }
}

fn record(sim: &prism_sync::sim::SimHandle, id: Uuid) -> Option<Value> {
    sim.record(ObjectType::Contact, id)
}

/// Runs a verb that asks for confirmation, runs `meanwhile` once the question is on screen,
/// then answers `y`; returns its stdout.
async fn answer_when_asked(
    db: &TestDb,
    sim: &prism_sync::sim::SimHandle,
    args: &[&str],
    meanwhile: impl std::future::Future<Output = ()>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut child, _dir) = spawn_verb(db, sim, args);
    let mut stdout = child.stdout.take().unwrap();
    let mut shown = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&shown).contains("[y/N]") {
        let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut chunk))
            .await
            .expect("the verb asks")
            .unwrap();
        assert!(
            n > 0,
            "the verb ended without asking: {}",
            String::from_utf8_lossy(&shown)
        );
        shown.extend_from_slice(&chunk[..n]);
    }
    meanwhile.await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"y\n").await.unwrap();
    drop(stdin);
    stdout.read_to_end(&mut shown).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the verb ends")
        .unwrap();
    let text = String::from_utf8_lossy(&shown).into_owned();
    assert_eq!(status.code(), Some(0), "{text}");
    text
}

both_backends! {
    async fn replaying_updates_superseded_by_applied_changes_never_puts_a_record_back(db) {
        // Ten contacts whose first change died; then newer changes of nine of them succeeded.
        let contacts: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
        let sim = sim(FaultProfile {
            item_errors_for_ids: contacts.iter().map(|c| (c.to_string(), "not_found".to_owned())).collect(),
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        let old: Vec<Change> = contacts
            .iter()
            .enumerate()
            .map(|(i, c)| Change::update(*c, format!(r#"{{"default": {{"email": "old-{i}", "phone": "old-{i}"}}}}"#)))
            .collect();
        insert(&store, &old).await.unwrap();
        let engine = start_engine(&settings(&db, &sim)).await;
        let first = wait_until_finished(&store, FINISH).await;
        assert!(first.iter().all(|r| r.state == "dead"), "{first:?}");
        sim.set_faults(FaultProfile::default());
        sim.seed_record(ObjectType::Contact, contacts[8], serde_json::Map::new());
        let newer: Vec<Change> = contacts[..9]
            .iter()
            .enumerate()
            .map(|(i, c)| match i {
                // 0-4 set the email again; 5-7 every key; 8 deletes the contact; 9 has no newer change.
                0..5 => Change::update(*c, format!(r#"{{"default": {{"email": "new-{i}"}}}}"#)),
                5..8 => Change::update(*c, format!(r#"{{"default": {{"email": "new-{i}", "phone": "new-{i}"}}}}"#)),
                _ => Change { operation: Operation::Delete, ..Change::update(*c, "{}".into()) },
            })
            .collect();
        insert(&store, &newer).await.unwrap();
        wait_below_watermark(&store).await;
        let done = wait_until_finished(&store, FINISH).await;
        assert!(done[10..].iter().all(|r| r.state == "succeeded"), "{done:?}");
        let dead_ids: Vec<i64> = done[..10].iter().map(|r| r.id).collect();

        let (code, out, _) = verb(&db, &sim, &["replay", "--all", "--dry-run"], "").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("6 row(s) would go back to pending"), "{out}");
        assert!(out.contains("1 as they are, 5 rebased; 4 left dead as superseded"), "{out}");
        assert!(out.contains(&format!("row {} ({}): drops default.email (set by row {})", dead_ids[0], contacts[0], done[10].id)), "{out}");
        assert!(out.contains(&format!("row {} ({}): the record was deleted since (row {})", dead_ids[8], contacts[8], done[18].id)), "{out}");
        assert!(out.contains("nothing changed"), "{out}");
        assert_eq!(rows(&store).await, done, "a dry run changes nothing");

        let (code, out, _) = verb(&db, &sim, &["replay", "--all", "--actor", "oncall-ana"], "y\n").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("Replay these 6 row(s)? [y/N]"), "{out}");
        assert!(out.contains("replayed 6 row(s) as oncall-ana (1 as they were, 5 rebased)"), "{out}");
        assert!(out.contains("4 row(s) left dead as superseded"), "{out}");
        let after = wait_until_finished(&store, FINISH).await;
        engine.stop().await;

        for (i, c) in contacts.iter().enumerate() {
            let (email, phone) = match i {
                0..5 => (format!("new-{i}"), format!("old-{i}")),
                5..8 => (format!("new-{i}"), format!("new-{i}")),
                8 => {
                    assert_eq!(record(&sim, *c), None, "the deleted contact stays deleted");
                    continue;
                }
                _ => (format!("old-{i}"), format!("old-{i}")),
            };
            let r = record(&sim, *c).unwrap_or_else(|| panic!("contact {i} exists"));
            assert_eq!((r["default"]["email"].as_str(), r["default"]["phone"].as_str()), (Some(email.as_str()), Some(phone.as_str())), "contact {i}");
        }
        let states: Vec<&str> = after[..10].iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["succeeded", "succeeded", "succeeded", "succeeded", "succeeded", "dead", "dead", "dead", "dead", "succeeded"]);
        assert_eq!(patch_of(&store, dead_ids[0]).await, json!({"default": {"phone": "old-0"}}), "the rebase is stored");
        let (actor, action, filter, n) = audit(&store).await.pop().expect("an audit entry");
        assert_eq!((actor.as_str(), action.as_str(), n), ("oncall-ana", "replay", 6));
        assert_eq!(filter["rebased"][0]["id"], dead_ids[0]);
        assert_eq!(filter["rebased"][0]["original_patch"], json!({"default": {"email": "old-0", "phone": "old-0"}}), "the original is kept");
        assert_eq!(filter["superseded"].as_array().map(Vec::len), Some(4));
        assert!(filter["all"].as_bool().unwrap_or(false), "the filter is still recorded: {filter}");
    }

    async fn a_newer_change_in_flight_holds_the_replay_until_it_has_ended(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let record = uuid();
        let ids = insert_rows(&store, &[
            (record.clone(), r#"{"default": {"email": "old", "phone": "old"}}"#.into()),
            (record.clone(), r#"{"default": {"email": "new"}}"#.into()),
        ]).await;
        set_row(&store, ids[0], "state = 'dead', last_error_code = 'not_found', attempts = 1").await;
        set_row(&store, ids[1], &format!("state = 'in_flight', batch_id = '{}', attempts = 1", uuid())).await;
        let id = ids[0].to_string();
        let out = verb_ok(&db, &sim, &["replay", "--id", &id, "--yes"]).await;
        assert!(out.contains(&format!("row {} of this record is in flight", ids[1])) && out.contains("nothing to replay"), "{out}");
        assert_eq!(state_of(&rows(&store).await, ids[0]).0, "dead");
        set_row(&store, ids[1], "state = 'succeeded', completed_at = '2026-01-01T00:00:00.000Z'").await;
        let out = verb_ok(&db, &sim, &["replay", "--id", &id, "--yes"]).await;
        assert!(out.contains("replayed 1 row(s)") && out.contains("(0 as they were, 1 rebased)"), "{out}");
        assert_eq!(state_of(&rows(&store).await, ids[0]), ("pending", 0));
        assert_eq!(patch_of(&store, ids[0]).await, json!({"default": {"phone": "old"}}));
    }

    async fn replay_json_prints_one_json_object_and_nothing_else(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let ids = insert_rows(&store, &[(uuid(), patch(1)), (uuid(), patch(2))]).await;
        for id in &ids {
            set_row(&store, *id, "state = 'dead', last_error_code = 'not_found', attempts = 1").await;
        }
        let (code, out, _) = verb(&db, &sim, &["replay", "--all", "--json", "--dry-run"], "").await;
        assert_eq!(code, 0);
        assert_eq!(json(&out)["would_replay"], 2);
        let sample: Vec<i64> = json(&out)["plan"]["sample"].as_array().map(|a| a.iter().filter_map(|c| c["id"].as_i64()).collect()).unwrap_or_default();
        assert_eq!(sample, ids, "the preview lists the rows it would replay");
        let (code, out, err) = verb(&db, &sim, &["replay", "--all", "--json"], "n\n").await;
        assert_eq!(code, 1, "not confirmed: {err}");
        assert!(out.is_empty(), "nothing on stdout: {out}");
        assert!(err.contains("Replay these 2 row(s)? [y/N]") && err.contains("not confirmed"), "{err}");
        let (code, out, err) = verb(&db, &sim, &["replay", "--all", "--json", "--actor", "bo"], "y\n").await;
        assert_eq!(code, 0, "{err}");
        let done = json(&out);
        assert_eq!((done["replayed"].as_u64(), done["actor"].as_str()), (Some(2), Some("bo")));
        assert!(err.contains("2 row(s) would go back to pending"), "the preview went to stderr: {err}");
    }

    async fn replay_filters_choose_exactly_their_rows_and_never_touch_in_flight_ones(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (x, y) = (uuid(), uuid());
        let ids = insert_rows(&store, &(0..7).map(|i| (uuid(), patch(i))).collect::<Vec<_>>()).await;
        let [dead_x, retrying_x, in_flight_x, dead_y, jan1, jan2, jan3] = ids[..] else { unreachable!() };
        let finished = "completed_at = '2026-01-05T00:00:00.000Z', last_error_code = 'internal_error', attempts = 3";
        set_row(&store, dead_x, &format!("state = 'dead', batch_id = '{x}', {finished}")).await;
        set_row(&store, retrying_x, &format!("state = 'retrying', batch_id = '{x}', attempts = 3, next_attempt_at = '2099-01-01T00:00:00.000Z'")).await;
        set_row(&store, in_flight_x, &format!("state = 'in_flight', batch_id = '{x}', attempts = 3")).await;
        set_row(&store, dead_y, &format!("state = 'dead', batch_id = '{y}', {finished}")).await;
        for (id, day) in [(jan1, "01T12"), (jan2, "02T12"), (jan3, "03T00")] {
            set_row(&store, id, &format!("state = 'dead', enqueued_at = '2026-01-{day}:00:00.000Z', {finished}")).await;
        }
        let out = verb_ok(&db, &sim, &["replay", "--batch", &x, "--yes"]).await;
        assert!(out.contains("replayed 1 row(s)"), "{out}");
        let now = rows(&store).await;
        assert_eq!(state_of(&now, dead_x), ("pending", 0));
        assert_eq!(state_of(&now, retrying_x), ("retrying", 3), "waiting rows only with --include-retrying");
        assert_eq!(state_of(&now, dead_y), ("dead", 3), "another batch");

        let out = verb_ok(&db, &sim, &["replay", "--batch", &x, "--include-retrying", "--yes"]).await;
        assert!(out.contains("replayed 1 row(s)"), "{out}");
        let now = rows(&store).await;
        assert_eq!(state_of(&now, retrying_x), ("pending", 0), "attempts reset");
        assert_eq!(state_of(&now, in_flight_x), ("in_flight", 3));

        let out = verb_ok(&db, &sim, &["replay", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-03T00:00:00Z", "--yes"]).await;
        assert!(out.contains("replayed 1 row(s)"), "{out}");
        let now = rows(&store).await;
        assert_eq!(state_of(&now, jan2).0, "pending");
        assert_eq!((state_of(&now, jan1).0, state_of(&now, jan3).0), ("dead", "dead"), "--since is inclusive, --until exclusive");

        let out = verb_ok(&db, &sim, &["replay", "--all", "--include-retrying", "--yes"]).await;
        assert!(out.contains("replayed 3 row(s)"), "{out}");
        let now = rows(&store).await;
        assert_eq!(state_of(&now, in_flight_x), ("in_flight", 3), "in-flight rows are never touched");
        assert_eq!(now.iter().find(|r| r.id == in_flight_x).and_then(|r| r.batch_id.clone()), Some(x));
        assert!(now.iter().filter(|r| r.id != in_flight_x).all(|r| r.state == "pending"), "{now:?}");
    }

    async fn purge_shows_what_it_would_delete_asks_unless_yes_and_is_audited(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let ids = insert_rows(&store, &(0..4).map(|i| (uuid(), patch(i))).collect::<Vec<_>>()).await;
        let old = "completed_at = '2020-01-01T00:00:00.000Z'";
        set_row(&store, ids[0], &format!("state = 'succeeded', {old}")).await;
        set_row(&store, ids[1], &format!("state = 'succeeded', {old}")).await;
        set_row(&store, ids[2], &format!("state = 'dead', last_error_code = 'not_found', {old}")).await;
        let before = rows(&store).await;

        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h", "--dry-run"], "").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("3 row(s) finished before") && out.contains("would be deleted (dead: 1, succeeded: 2)"), "{out}");
        assert!(out.contains("dry run: nothing changed"), "{out}");
        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h", "--dry-run", "--json"], "").await;
        assert_eq!(code, 0);
        assert_eq!(json(&out)["would_purge"]["rows"], 3);
        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h"], "n\n").await;
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("Delete these 3 row(s)") && out.contains("not confirmed"), "{out}");
        assert_eq!(rows(&store).await, before, "nothing deleted");
        assert!(audit(&store).await.is_empty(), "nothing done, nothing audited");

        let (code, out, err) = verb(&db, &sim, &["purge", "--older-than", "1h", "--json", "--actor", "ops-bo"], "y\n").await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(json(&out)["rows"], 3, "stdout is one JSON object");
        assert!(err.contains("Delete these 3 row(s)"), "{err}");
        let left = rows(&store).await;
        assert_eq!(left.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[3]], "the pending row stays");
        let (actor, action, filter, n) = audit(&store).await.pop().expect("audited");
        assert_eq!((actor.as_str(), action.as_str(), n), ("ops-bo", "purge", 3));
        assert_eq!(filter["states"], json!(["succeeded", "dead"]));

        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h", "--yes"], "").await;
        assert_eq!(code, 0);
        assert!(out.contains("nothing to purge"), "{out}");
        assert_eq!(audit(&store).await.len(), 1, "an empty purge is not audited");
    }

    async fn purge_keeps_a_row_that_was_replayed_after_it_was_chosen(db) {
        let store = db.store().await;
        let ids = insert_rows(&store, &(0..3).map(|i| (uuid(), patch(i))).collect::<Vec<_>>()).await;
        let old = "completed_at = '2020-01-01T00:00:00.000Z'";
        set_row(&store, ids[0], &format!("state = 'succeeded', {old}")).await;
        set_row(&store, ids[1], &format!("state = 'dead', last_error_code = 'not_found', {old}")).await;
        set_row(&store, ids[2], &format!("state = 'dead', last_error_code = 'not_found', {old}")).await;
        let scope = purge::scope(&store, &[prism_sync::model::RowState::Succeeded, prism_sync::model::RowState::Dead], Duration::from_secs(3600)).await.unwrap();
        let mut chosen = purge::finished_before(&store, &scope, 100).await.unwrap();
        chosen.sort_unstable();
        assert_eq!(chosen, ids, "all three are terminal and old");
        // An operator replays one of them before the purge's DELETE runs.
        let filter = replay::ReplayFilter { ids: vec![ids[1]], ..Default::default() };
        assert_eq!(replay::apply(&store, &filter, "oncall").await.unwrap(), 1);
        let deleted = purge::delete_chosen(&store, &scope, &chosen, "ops").await.unwrap();
        assert_eq!(deleted, 2);
        let left = rows(&store).await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!((left[0].id, left[0].state.as_str()), (ids[1], "pending"), "the replayed row is kept");
        let entries = audit(&store).await;
        assert_eq!(entries.last().map(|(a, act, _, n)| (a.as_str(), act.as_str(), *n)), Some(("ops", "purge", 2)));
    }

    async fn purge_keeps_a_succeeded_row_while_an_older_row_of_its_record_is_dead(db) {
        // Replay judges a dead row against the newer changes the API applied: purging those
        // first would let a replay put the record back to older values.
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (x, y) = (uuid(), uuid());
        let ids = insert_rows(&store, &[(x.clone(), patch(1)), (x.clone(), patch(2)), (y, patch(1))]).await;
        let old = "completed_at = '2020-01-01T00:00:00.000Z'";
        // Each succeeded row came in a batch of its own, finished long ago.
        let (kept_batch, gone_batch) = (Uuid::new_v4(), Uuid::new_v4());
        for (batch, key) in [(kept_batch, "k1"), (gone_batch, "k2")] {
            let body = match db.backend { Backend::Sqlite => "CAST('{}' AS BLOB)", Backend::Postgres => "'\\x7b7d'::bytea" };
            exec(&store, &format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count, state, completed_at)
                 VALUES ('{batch}', '{key}', 'contact', {body}, '[]', 1, 1, 'done', '2020-01-01T00:00:00.000Z')")).await;
        }
        set_row(&store, ids[0], &format!("state = 'dead', last_error_code = 'validation_error', {old}")).await;
        set_row(&store, ids[1], &format!("state = 'succeeded', batch_id = '{kept_batch}', {old}")).await;
        set_row(&store, ids[2], &format!("state = 'succeeded', batch_id = '{gone_batch}', {old}")).await;
        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h", "--state", "succeeded", "--dry-run", "--json"], "").await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(json(&out)["would_purge"]["rows"], 1, "the preview counts only what goes: {out}");
        assert_eq!(json(&out)["would_purge"]["batches"], 1, "and only the batches that go: {out}");
        let (_, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h", "--state", "succeeded", "--yes", "--json"], "").await;
        assert_eq!((json(&out)["rows"].clone(), json(&out)["batches"].clone()), (json!(1), json!(1)), "{out}");
        let left: Vec<i64> = rows(&store).await.iter().map(|r| r.id).collect();
        assert_eq!(left, ids[..2], "the succeeded row behind the dead one stays");
        verb_ok(&db, &sim, &["purge", "--older-than", "1h", "--state", "dead", "--yes"]).await;
        verb_ok(&db, &sim, &["purge", "--older-than", "1h", "--state", "succeeded", "--yes"]).await;
        assert!(rows(&store).await.is_empty(), "it goes once the dead row is gone");
    }

    async fn the_retention_schedule_purges_through_run_and_is_audited(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &(0..5).map(|i| (uuid(), patch(i))).collect::<Vec<_>>()).await;
        let mut daemon = spawn_daemon(&db, &sim, &[
            ("PRISM_SYNC__RETENTION__SUCCEEDED", "1ms"),
            ("PRISM_SYNC__RETENTION__INTERVAL", "100ms"),
        ]);
        let deadline = std::time::Instant::now() + FINISH;
        while !rows(&store).await.is_empty() {
            assert!(std::time::Instant::now() < deadline, "rows never purged: {}", daemon.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
        assert_eq!(sim.applied_log().len(), 5, "synced before purged");
        let entries = audit(&store).await;
        assert!(!entries.is_empty(), "retention purges are audited");
        assert!(entries.iter().all(|(actor, action, filter, _)| actor == "retention" && action == "purge" && filter["states"] == json!(["succeeded"])), "{entries:?}");
        assert_eq!(entries.iter().map(|e| e.3).sum::<i64>(), 5);
    }

    async fn replay_counts_a_newer_change_answered_2xx_but_unreadable_as_applied(db) {
        // The API answered the newer change's batch 2xx (its body could not be read): it most
        // likely applied it. Replaying the older change as it is would put the record back.
        let store = db.store().await;
        let record = uuid();
        let ids = insert_rows(&store, &[(record.clone(), patch(1)), (record.clone(), patch(2))]).await;
        set_row(&store, ids[0], "state = 'dead', last_error_code = 'validation_error', completed_at = CURRENT_TIMESTAMP").await;
        set_row(&store, ids[1], "state = 'dead', last_error_code = 'unreadable_response', completed_at = CURRENT_TIMESTAMP").await;
        let filter = replay::ReplayFilter { ids: vec![ids[0]], ..Default::default() };
        let done = replay::replay(&store, &filter, "oncall", 10).await.unwrap();
        assert_eq!(done.replayed, 0, "{:?}", done.plan);
        assert_eq!(done.plan.superseded.len(), 1, "every key it sets was set again: {:?}", done.plan);
        assert!(rows(&store).await.iter().all(|r| r.state == "dead"));
        // Nor may purge take the newer row away while the older can still be replayed.
        set_row(&store, ids[1], "completed_at = '2020-01-01T00:00:00.000Z'").await;
        let scope = purge::scope(&store, &[prism_sync::model::RowState::Dead], Duration::from_secs(3600)).await.unwrap();
        let chosen = purge::finished_before(&store, &scope, 100).await.unwrap();
        assert!(!chosen.contains(&ids[1]), "{chosen:?}");
        // A newer row that died of a real rejection was never applied: replayed as it is.
        set_row(&store, ids[1], "last_error_code = 'validation_error'").await;
        assert_eq!(replay::replay(&store, &filter, "oncall", 10).await.unwrap().replayed, 1);
    }

    async fn a_confirmed_discard_takes_only_the_rows_its_preview_showed(db) {
        // The application enqueues another change of the record while the operator reads the
        // preview: `discard --record-id` used to choose again after the answer, and dropped
        // the new change too, unseen.
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let record = uuid();
        let first = insert_rows(&store, &[(record.clone(), patch(1))]).await[0];
        let mut later = 0;
        let out = answer_when_asked(&db, &sim, &["discard", "--record-id", &record], async {
            later = insert_rows(&store, &[(record.clone(), patch(2))]).await[0];
        })
        .await;
        assert!(out.contains("discarded 1 row(s)"), "{out}");
        let states: Vec<(i64, String)> = rows(&store).await.into_iter().map(|r| (r.id, r.state)).collect();
        assert_eq!(states, [(first, "dead".to_owned()), (later, "pending".to_owned())]);
        assert_eq!(audit(&store).await[0].3, 1, "the audit entry counts what was discarded");
    }

    async fn a_confirmed_replay_takes_only_the_rows_its_preview_showed(db) {
        // A row that dies after the preview, with the same code, waits for a replay of its own.
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let ids = insert_rows(&store, &[(uuid(), patch(1)), (uuid(), patch(1))]).await;
        set_row(&store, ids[0], "state = 'dead', last_error_code = 'timeout', completed_at = CURRENT_TIMESTAMP").await;
        let out = answer_when_asked(&db, &sim, &["replay", "--error-code", "timeout"], async {
            set_row(&store, ids[1], "state = 'dead', last_error_code = 'timeout', completed_at = CURRENT_TIMESTAMP").await;
        })
        .await;
        assert!(out.contains("replayed 1 row(s)"), "{out}");
        let states: Vec<(i64, String)> = rows(&store).await.into_iter().map(|r| (r.id, r.state)).collect();
        assert_eq!(states, [(ids[0], "pending".to_owned()), (ids[1], "dead".to_owned())]);
    }
}

/// Two changes of one record, the first `dead` as `not_found`: (the record, their ids).
async fn a_dead_change_and_a_newer_one(store: &Store) -> (String, Vec<i64>) {
    let record = uuid();
    let ids = insert_rows(
        store,
        &[(record.clone(), patch(1)), (record.clone(), patch(2))],
    )
    .await;
    set_row(
        store,
        ids[0],
        "state = 'dead', last_error_code = 'not_found', completed_at = CURRENT_TIMESTAMP",
    )
    .await;
    (record, ids)
}

/// A claim holds its heads while it waits for their followers' locks: a replay that waited for a
/// row lock could deadlock with it. It never waits; a newer row someone holds counts as in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_never_waits_for_a_row_a_claim_holds() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let (_, ids) = a_dead_change_and_a_newer_one(&store).await;
    let RawPool::Postgres(pool) = store.raw_pool_for_tests() else {
        unreachable!()
    };
    let mut claim = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM prism_outbox WHERE id = $1 FOR UPDATE")
        .bind(ids[1])
        .execute(&mut *claim)
        .await
        .unwrap();
    let filter = replay::ReplayFilter {
        ids: vec![ids[0]],
        ..Default::default()
    };
    let held = tokio::time::timeout(
        Duration::from_secs(10),
        replay::replay(&store, &filter, "oncall", 10),
    )
    .await
    .expect("the replay does not wait for the claim")
    .unwrap();
    assert_eq!(held.replayed, 0);
    assert!(
        held.plan.superseded[0].reason.contains("in flight"),
        "{:?}",
        held.plan.superseded
    );
    claim.rollback().await.unwrap();
    let done = replay::replay(&store, &filter, "oncall", 10).await.unwrap();
    assert_eq!(
        (done.replayed, done.plan.as_is),
        (1, 1),
        "once the claim let go, the pending newer row goes after it"
    );
}

/// A claim reads the outbox from its statement's snapshot and locks rows after: a claim that
/// started while a replay was putting a record's older row back to `pending` read that row as
/// `dead`, took the record's newer row (only locked by the replay, never updated, so nothing
/// made the claim look again) and sent it first; the replayed older row then overwrote it. The
/// replay's transaction now holds the claim gate: the claim waits for its commit, and then sees
/// the older row waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_during_a_replay_waits_for_it_and_sends_the_replayed_older_change_first() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let store = db.store().await;
    let (record, ids) = a_dead_change_and_a_newer_one(&store).await;
    set_row(&store, ids[1], "state = 'succeeded', completed_at = now()").await;
    // The replay's transaction, as `replay::replay` runs it, held open between its reads and
    // its update.
    let mut tx = store.begin_ops_write().await.unwrap();
    let filter = prism_sync::store::views::RowFilter {
        ids: vec![ids[0]],
        ..Default::default()
    };
    assert_eq!(tx.select_rows(&filter).await.unwrap().len(), 1);
    tx.newer_rows(&[record.as_str()], ids[0]).await.unwrap();
    // Meanwhile the application commits a newer change of the record, and a daemon claims.
    let newer = insert_rows(&store, &[(record.clone(), patch(3))]).await[0];
    wait_below_watermark(&store).await;
    let claim = tokio::spawn({
        let store = store.clone();
        async move { claim_as(&store, "daemon", Duration::from_secs(60), "", 10, 10).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claimed_during_the_replay = claim.is_finished();
    tx.requeue(&[ids[0]], &[], &[prism_sync::model::RowState::Dead])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    claim.await.unwrap();
    let states: Vec<(i64, String)> = rows(&store)
        .await
        .into_iter()
        .map(|r| (r.id, r.state))
        .collect();
    let state = |id: i64| states.iter().find(|(i, _)| *i == id).unwrap().1.clone();
    assert!(
        state(newer) != "in_flight" || state(ids[0]) == "in_flight",
        "the newer change was claimed while the replayed older one waited: {states:?}"
    );
    assert!(
        !claimed_during_the_replay,
        "the claim waited for the replay"
    );
    assert_eq!(state(ids[0]), "in_flight", "{states:?}");
}
