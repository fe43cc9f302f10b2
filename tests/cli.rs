//! The operator's verbs as real processes, on both databases, including while a daemon runs.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use prism_sync::sim::FaultProfile;
use serde_json::Value;

const FINISH: Duration = Duration::from_secs(60);

/// 20 changes, of which the 3 for `refused` die with `not_found`; returns (sim, refused record).
async fn synced_with_dead_rows(db: &TestDb) -> (prism_sync::sim::SimHandle, String) {
    let refused = uuid();
    let faults = FaultProfile {
        item_errors_for_ids: BTreeMap::from([(refused.clone(), "not_found".to_owned())]),
        ..FaultProfile::default()
    };
    let sim = sim(faults).await;
    let store = db.store().await;
    let mut rows: Vec<(String, String)> = (0..17).map(|i| (uuid(), patch(i))).collect();
    for rev in 17..20 {
        rows.push((
            refused.clone(),
            format!(r#"{{"default": {{"revision": {rev}}}, "list": {{}}}}"#),
        ));
    }
    insert_rows(&store, &rows).await;
    let engine = start_engine(&settings(db, &sim)).await;
    wait_until_finished(&store, FINISH).await;
    engine.stop().await;
    (sim, refused)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

both_backends! {
    async fn enqueue_validates_every_line_and_writes_all_or_nothing(db) {
        let sim = sim(FaultProfile::default()).await;
        let (code, out, _) = verb(&db, &sim, &["migrate"], "").await;
        assert_eq!(code, 0, "{out}");
        let good = format!(r#"{{"record_id": "{}", "patch": {{"default": {{"a": 1}}}}}}"#, uuid());
        let bad = r#"{"record_id": "nope", "patch": {}}"#;
        let input = format!("{good}\n\n{bad}\n{good}\n");
        let (code, _, err) = verb(&db, &sim, &["enqueue"], &input).await;
        assert_ne!(code, 0);
        assert!(err.contains("line 3") && err.contains("not a UUID") && err.contains("nothing was enqueued"), "{err}");
        let store = db.store().await;
        assert!(rows(&store).await.is_empty(), "nothing half-written");
        let (code, out, _) = verb(&db, &sim, &["enqueue", "--skip-invalid", "-"], &input).await;
        assert_eq!(code, 0);
        assert!(out.contains("skipped line 3") && out.contains("enqueued 2 change(s)"), "{out}");
        assert_eq!(rows(&store).await.len(), 2);
    }

    async fn a_line_that_is_not_utf8_is_named_or_skipped_like_any_bad_line(db) {
        // It used to end the whole input as "stream did not contain valid UTF-8", with no line
        // named, even with --skip-invalid.
        use prism_sync::ops::enqueue::enqueue;
        let store = db.store().await;
        let good = format!(r#"{{"record_id": "{}", "patch": {{"default": {{"a": 1}}}}}}"#, uuid());
        let mut input = format!("{good}\r\n").into_bytes();
        input.extend_from_slice(b"{\"record_id\": \"\xff\", \"patch\": {}}\n");
        input.extend_from_slice(format!("{good}\n").as_bytes());
        let err = enqueue(&store, &input[..], 1 << 20, false).await.unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("not UTF-8"), "{err}");
        assert!(rows(&store).await.is_empty(), "nothing half-written");
        let report = enqueue(&store, &input[..], 1 << 20, true).await.unwrap();
        assert_eq!(report.enqueued, 2);
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].0, 2, "{:?}", report.skipped);
        assert_eq!(rows(&store).await.len(), 2);
    }

    async fn what_enqueue_accepts_never_goes_dead_as_too_large(db) {
        let sim = sim(FaultProfile::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prism-sync.toml");
        std::fs::write(&config, "[batch]\nmax_patch_bytes = 200\n").unwrap();
        let config = config.to_str().unwrap();
        // 173 bytes as written; 213 as Postgres' jsonb gives it back (a space after each `:`
        // and `,`), which is what the daemon measures there.
        let keys: Vec<String> = (0..20).map(|i| format!(r#""k{i:02}":0"#)).collect();
        let wide = format!(r#"{{"default":{{{}}}}}"#, keys.join(","));
        assert_eq!(wide.len(), 173);
        let input = format!(
            "{{\"record_id\": \"{}\", \"patch\": {wide}}}\n{{\"record_id\": \"{}\", \"patch\": {{\"default\": {{\"a\": 1}}}}}}\n{{\"record_id\": \"{}\", \"operation\": \"delete\"}}\n",
            uuid(), uuid(), uuid()
        );
        let (code, out, err) = verb(&db, &sim, &["migrate"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        let (code, _, err) = verb(&db, &sim, &["--config", config, "enqueue"], &input).await;
        let store = db.store().await;
        match db.backend {
            Backend::Sqlite => assert_eq!(code, 0, "173 bytes stored as written fit: {err}"),
            Backend::Postgres => {
                assert_ne!(code, 0);
                assert!(err.contains("line 1") && err.contains("213 bytes") && err.contains("batch.max_patch_bytes (200)"), "{err}");
                assert!(rows(&store).await.is_empty(), "nothing was enqueued");
                let (code, out, err) = verb(&db, &sim, &["--config", config, "enqueue", "--skip-invalid"], &input).await;
                assert_eq!(code, 0, "{out}{err}");
                assert!(out.contains("skipped line 1") && out.contains("enqueued 2 change(s)"), "{out}");
            }
        }
        let mut settings = settings(&db, &sim);
        settings.batch.max_patch_bytes = 200;
        let engine = start_engine(&settings).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(!done.is_empty() && done.iter().all(|r| r.state == "succeeded"), "accepted means sendable: {done:?}");
    }

    async fn status_reports_states_dead_codes_and_says_so_in_its_exit_code(db) {
        let (sim, _) = synced_with_dead_rows(&db).await;
        let (code, out, _) = verb(&db, &sim, &["status", "--json"], "").await;
        assert_eq!(code, 3, "dead rows exist: {out}");
        let s = json(&out);
        assert_eq!(s["rows"]["succeeded"], 17);
        assert_eq!(s["rows"]["dead"], 3);
        assert_eq!(s["rows"]["pending"], 0);
        assert_eq!(s["dead_by_error_code"]["not_found"], 3);
        assert!(s["oldest_pending_age_seconds"].is_number());
        assert_eq!(s["batches_in_flight"], 0);
        let (code, out, _) = verb(&db, &sim, &["status"], "").await;
        assert_eq!(code, 3);
        assert!(out.contains("not_found") && out.contains("succeeded"), "{out}");
    }

    async fn the_oldest_waiting_age_counts_a_row_whose_batch_is_in_flight(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        insert_rows(&store, &[(uuid(), patch(1))]).await;
        wait_below_watermark(&store).await;
        let claimed = claim_as(&store, "held", Duration::from_secs(3600), "", 100, 100).await;
        assert_eq!(claimed.batches.len(), 1, "the row is in flight, unanswered");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (code, out, _) = verb(&db, &sim, &["status", "--json", "--stuck-after", "1s"], "").await;
        assert_eq!(json(&out)["rows"]["in_flight"], 1, "{out}");
        assert!(json(&out)["oldest_pending_age_seconds"].as_f64().unwrap() >= 1.0, "{out}");
        assert_eq!(code, 4, "a change in flight longer than --stuck-after: {out}");
    }

    async fn a_verb_on_a_database_without_the_schema_says_to_migrate(db) {
        let sim = sim(FaultProfile::default()).await;
        let verbs: [&[&str]; 3] = [&["status"], &["rows"], &["replay", "--all", "--yes"]];
        for args in verbs {
            let (code, out, err) = verb(&db, &sim, args, "").await;
            assert_eq!(code, 1, "{args:?}: {out}{err}");
            assert!(
                err.contains("lacks prism-sync's tables") && err.contains("run `prism-sync migrate`"),
                "{args:?}: one clear error, not a missing table's: {err}"
            );
        }
        let (code, out, err) = verb(&db, &sim, &["migrate"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = verb(&db, &sim, &["status"], "").await;
        assert_eq!(code, 0, "{out}{err}");
    }

    async fn the_row_gauges_count_each_state_and_the_succeeded_rows_apart(db) {
        let store = db.store().await;
        insert_rows(&store, &[(uuid(), patch(1)), (uuid(), patch(2))]).await;
        wait_below_watermark(&store).await;
        let claimed = claim_as(&store, "held", Duration::from_secs(3600), "", 100, 100).await;
        assert_eq!(claimed.batches.len(), 1, "rows 1 and 2 are in flight");
        let more: Vec<_> = (3..=8).map(|n| (uuid(), patch(n))).collect();
        insert_rows(&store, &more).await;
        exec(&store, "UPDATE prism_outbox SET state = 'retrying', attempts = 1 WHERE id = 3").await;
        exec(&store, "UPDATE prism_outbox SET state = 'dead', last_error_code = 'not_found' WHERE id = 4").await;
        exec(&store, "UPDATE prism_outbox SET state = 'dead' WHERE id = 5").await;
        exec(&store, "UPDATE prism_outbox SET state = 'succeeded' WHERE id IN (6, 7)").await;
        let g = store.gauges().await.expect("gauges");
        let count = |state: &str| g.rows_by_state.iter().find(|(s, _)| s == state).map(|(_, n)| *n);
        assert_eq!(count("pending"), Some(1), "{g:?}");
        assert_eq!(count("retrying"), Some(1), "{g:?}");
        assert_eq!(count("in_flight"), Some(2), "{g:?}");
        assert_eq!(count("dead"), Some(2), "{g:?}");
        assert_eq!(count("succeeded"), None, "counted apart: {g:?}");
        assert_eq!(store.succeeded_rows().await.expect("succeeded rows"), 2);
    }

    async fn status_tells_a_lapsed_lease_from_a_batch_being_sent(db) {
        // A replica killed while it held a batch leaves its name on it; until another leases
        // it (its lane paused, say), status used to call it "sending".
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (lapsed, live) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (body, past, future) = match db.backend {
            Backend::Sqlite => ("CAST('{}' AS BLOB)", "'2020-01-01T00:00:00.000Z'", "'2999-01-01T00:00:00.000Z'"),
            Backend::Postgres => ("'\\x7b7d'::bytea", "now() - interval '2 hours'", "now() + interval '1 hour'"),
        };
        for (batch, key, owner, until) in [(lapsed, "k1", "deadhost:1:x", past), (live, "k2", "livehost:2:y", future)] {
            exec(&store, &format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count, lease_owner, lease_expires_at)
                 VALUES ('{batch}', '{key}', 'contact', {body}, '[]', 1, 1, '{owner}', {until})")).await;
        }
        let (_, out, err) = verb(&db, &sim, &["status"], "").await;
        assert!(out.contains("lease lapsed (deadhost:1:x)"), "{out}{err}");
        assert_eq!(out.matches("sending").count(), 1, "only the live lease is sending: {out}");
    }

    async fn status_exits_4_while_a_change_or_a_batch_key_is_stuck(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (code, out, err) = verb(&db, &sim, &["status"], "").await;
        assert_eq!(code, 0, "an empty outbox is healthy: {out}{err}");
        insert_rows(&store, &[(uuid(), patch(1)), (uuid(), patch(2))]).await;
        let (code, out, _) = verb(&db, &sim, &["status", "--stuck-after", "1h"], "").await;
        assert_eq!(code, 0, "waiting, but not for long: {out}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (code, out, _) = verb(&db, &sim, &["status", "--json", "--stuck-after", "1s"], "").await;
        assert_eq!(code, 4, "a change waiting longer than --stuck-after: {out}");
        assert!(json(&out)["oldest_pending_age_seconds"].as_f64().unwrap() >= 1.0, "{out}");
        exec(&store, "UPDATE prism_outbox SET state = 'dead', last_error_code = 'not_found' WHERE id = 2").await;
        let (code, out, _) = verb(&db, &sim, &["status", "--stuck-after", "1s"], "").await;
        assert_eq!(code, 4, "stuck outranks dead rows: {out}");
        exec(&store, "UPDATE prism_outbox SET state = 'succeeded' WHERE id = 1").await;
        let (code, out, _) = verb(&db, &sim, &["status", "--stuck-after", "1s"], "").await;
        assert_eq!(code, 3, "nothing waits, a row is dead: {out}");
        // An open batch whose key is 21 hours old: within hours of the server forgetting it.
        let batch = match db.backend {
            Backend::Sqlite => format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count, created_at)
                 VALUES ('{}', 'old-key', 'contact', CAST('{{}}' AS BLOB), '[]', 0, 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-21 hours'))",
                uuid::Uuid::new_v4()
            ),
            Backend::Postgres => format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count, created_at)
                 VALUES ('{}', 'old-key', 'contact', convert_to('{{}}', 'UTF8'), '[]', 0, 0, now() - interval '21 hours')",
                uuid::Uuid::new_v4()
            ),
        };
        exec(&store, &batch).await;
        let (code, out, _) = verb(&db, &sim, &["status"], "").await;
        assert_eq!(code, 4, "a batch key older than 20h, with the default --stuck-after: {out}");
    }

    async fn inspect_shows_a_row_and_its_batch_with_key_body_and_attempts(db) {
        let (sim, refused) = synced_with_dead_rows(&db).await;
        let store = db.store().await;
        let dead = rows(&store).await.into_iter().find(|r| r.state == "dead").unwrap();
        let (code, out, _) = verb(&db, &sim, &["inspect", &dead.id.to_string(), "--json"], "").await;
        assert_eq!(code, 0);
        let row = json(&out);
        assert_eq!(row["record_id"], refused);
        assert_eq!(row["last_error_code"], "not_found");
        let batch_id = row["batch_id"].as_str().unwrap().to_owned();
        let (code, out, _) = verb(&db, &sim, &["inspect", "--batch", &batch_id, "--json"], "").await;
        assert_eq!(code, 0);
        let batch = json(&out);
        let key = batch["idempotency_key"].as_str().unwrap();
        assert!(sim.requests().iter().any(|r| r.idempotency_key.as_deref() == Some(key)), "the key is the one sent");
        assert!(batch["body"]["items"].is_array());
        assert_eq!(batch["http_attempts"][0]["http_status"], 200);
        assert!(batch["rows"].as_array().unwrap().iter().any(|r| r["id"] == dead.id));
        let (code, out, _) = verb(&db, &sim, &["inspect", "--batch", &batch_id], "").await;
        assert_eq!(code, 0);
        assert!(out.contains(key) && out.contains("request body"), "{out}");
        let (code, _, err) = verb(&db, &sim, &["inspect", "999999"], "").await;
        assert_ne!(code, 0);
        assert!(err.contains("no outbox row with id 999999"), "{err}");
    }

    async fn replay_dry_run_and_a_refused_confirmation_change_nothing(db) {
        let (sim, _) = synced_with_dead_rows(&db).await;
        let store = db.store().await;
        let before = rows(&store).await;
        let (code, out, _) = verb(&db, &sim, &["replay", "--error-code", "not_found", "--dry-run"], "").await;
        assert_eq!(code, 0);
        assert!(out.contains("3 row(s) would go back to pending") && out.contains("nothing changed"), "{out}");
        let (code, out, _) = verb(&db, &sim, &["replay", "--error-code", "not_found"], "n\n").await;
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("not confirmed"), "{out}");
        assert_eq!(rows(&store).await, before);
        let (code, _, err) = verb(&db, &sim, &["replay"], "").await;
        assert_eq!(code, 2, "no filter is a usage error, apart from 'not confirmed': {err}");
        assert!(err.contains("choose the rows"), "{err}");
        let (code, _, err) = verb(&db, &sim, &["replay", "--since", "yesterday-ish", "--dry-run"], "").await;
        assert_eq!(code, 2, "a bad flag value is a usage error");
        assert!(err.contains("yesterday-ish"), "{err}");
        let (code, _, err) = verb(&db, &sim, &["replay", "--frobnicate"], "").await;
        assert_eq!(code, 2);
        assert!(err.contains("--frobnicate"), "{err}");
    }

    async fn replay_while_the_daemon_runs_requeues_in_order_and_is_audited(db) {
        let (sim, refused) = synced_with_dead_rows(&db).await;
        sim.set_faults(FaultProfile::default());
        let store = db.store().await;
        let mut daemon = spawn_daemon(&db, &sim, &[]);
        let (code, out, _) = verb(&db, &sim, &["replay", "--record-id", &refused, "--actor", "oncall-ana"], "y\n").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("replayed 3 row(s) as oncall-ana"), "{out}");
        let done = wait_until_finished(&store, FINISH).await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        let applied: Vec<i64> = sim
            .applied_log()
            .iter()
            .filter(|c| c.record_id.to_string() == refused)
            .filter_map(|c| c.item.pointer("/default/revision").and_then(Value::as_i64))
            .collect();
        assert_eq!(applied, vec![17, 18, 19], "replayed rows go out in their original order");
        let (_, out, _) = verb(&db, &sim, &["status", "--json"], "").await;
        let audit = &json(&out)["recent_audit"][0];
        assert_eq!(audit["actor"], "oncall-ana");
        assert_eq!(audit["action"], "replay");
        assert_eq!(audit["rows"], 3);
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
    }

    async fn purge_deletes_old_finished_rows_and_their_batches(db) {
        let (sim, _) = synced_with_dead_rows(&db).await;
        let store = db.store().await;
        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "1h"], "").await;
        assert_eq!(code, 0);
        assert!(out.contains("nothing to purge"), "nothing is that old yet: {out}");
        let (code, out, _) = verb(&db, &sim, &["purge", "--older-than", "0s", "--state", "succeeded", "--json", "--yes"], "").await;
        assert_eq!(code, 0);
        assert_eq!(json(&out)["rows"], 17);
        let left = rows(&store).await;
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|r| r.state == "dead"));
        let (code, out, _) = verb(&db, &sim, &["inspect", "--batch", left[0].batch_id.as_deref().unwrap()], "").await;
        assert_eq!(code, 0, "a batch still referred to by a row is kept: {out}");
        let (code, _, err) = verb(&db, &sim, &["purge", "--older-than", "0s", "--state", "pending"], "").await;
        assert_eq!(code, 2, "only terminal states can be purged");
        assert!(err.contains("pending"), "{err}");
    }
}

/// The README's first command, smaller: it finishes, checks itself against the simulator and
/// says what to try next.
#[tokio::test]
async fn the_demo_syncs_its_sample_and_proves_the_guarantees() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(bin())
        .args(["demo", "--changes", "1500", "--contacts", "100"])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("(0 wrong), 0 applied out of order, 0 applied twice, 0 rows unfinished"),
        "{text}"
    );
    assert!(
        text.contains("replay --error-code not_found --dry-run"),
        "{text}"
    );
    assert!(dir.path().join("prism-sync-demo.db").exists());
    // The export it suggests works on its database: a header, then only dead rows.
    assert!(text.contains("rows --state dead --csv"), "{text}");
    let csv = tokio::process::Command::new(bin())
        .args(["rows", "--state", "dead", "--csv", "--limit", "0"])
        .env("DATABASE_URL", "sqlite://prism-sync-demo.db")
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let csv = String::from_utf8_lossy(&csv.stdout);
    let mut lines = csv.lines();
    assert!(lines.next().is_some_and(|h| h.starts_with("id,")), "{csv}");
    let rows: Vec<&str> = lines.collect();
    assert!(!rows.is_empty(), "the demo leaves dead rows: {csv}");
    assert!(rows.iter().all(|r| r.contains(",dead,")), "{csv}");
}

/// The SQLite file holds contact data: prism-sync creates it owner-only, whatever the umask,
/// and leaves the mode of a file that already exists alone.
#[tokio::test]
async fn the_sqlite_file_prism_sync_creates_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let sim = sim(FaultProfile::default()).await;
    let created = TestDb::new(Backend::Sqlite).await.unwrap();
    let path = std::path::PathBuf::from(
        created
            .url
            .trim_start_matches("sqlite://")
            .trim_end_matches("?mode=rwc"),
    );
    assert!(!path.exists());
    let (code, out, err) = verb(&created, &sim, &["migrate"], "").await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(mode(&path), 0o600, "a new database file is owner-only");
    let mut wal = path.clone().into_os_string();
    wal.push("-wal");
    if std::path::Path::new(&wal).exists() {
        assert_eq!(mode(std::path::Path::new(&wal)), 0o600, "so is its WAL");
    }

    let existing = TestDb::new(Backend::Sqlite).await.unwrap();
    let path = std::path::PathBuf::from(
        existing
            .url
            .trim_start_matches("sqlite://")
            .trim_end_matches("?mode=rwc"),
    );
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out, err) = verb(&existing, &sim, &["migrate"], "").await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        mode(&path),
        0o640,
        "an existing file keeps its owner's choice"
    );
}
