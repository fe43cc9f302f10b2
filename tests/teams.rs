//! Deletes, several teams and the 0002 migration, end to end: real SQLite files and a real
//! Postgres, the simulator over real HTTP, the engine in-process.

mod common;

use std::time::Duration;

use common::*;
use prism_sync::model::{ObjectType, Operation};
use prism_sync::ops::enqueue::{Change, insert};
use prism_sync::ops::replay::{ReplayFilter, apply};
use prism_sync::settings::{Settings, TeamSettings};
use prism_sync::sim::{FaultProfile, SimConfig, SimHandle, SimTeam, Simulator};
use prism_sync::store::{RawPool, Store};
use sqlx::Row;
use uuid::Uuid;

const FINISH: Duration = Duration::from_secs(60);
const TEAM_B: &str = "00000000-0000-4000-8000-00000000000b";
const TEAM_C: &str = "00000000-0000-4000-8000-00000000000c";

fn change(record: Uuid, operation: Operation, n: u32) -> Change {
    Change {
        operation,
        patch: match operation {
            Operation::Update => format!(r#"{{"default": {{"n": {n}}}}}"#),
            Operation::Delete => "{}".into(),
        },
        ..Change::update(record, String::new())
    }
}

fn for_team(mut c: Change, team: &str) -> Change {
    c.team_id = team.to_owned();
    c
}

/// `(operation, n)` of every change the simulator applied to `record` of `team`, in order.
fn applied(sim: &SimHandle, team: &str, record: Uuid) -> Vec<(Operation, Option<u64>)> {
    sim.applied_to_for_team(team, ObjectType::Contact, record)
        .expect("known team")
        .iter()
        .map(|c| (c.operation, c.item["default"]["n"].as_u64()))
        .collect()
}

async fn three_team_sim(faults: FaultProfile) -> SimHandle {
    let config = SimConfig {
        faults,
        seed: 7,
        extra_teams: vec![
            SimTeam {
                team_id: TEAM_B.into(),
                api_key: "key-b".into(),
            },
            SimTeam {
                team_id: TEAM_C.into(),
                api_key: "key-c".into(),
            },
        ],
        ..SimConfig::default()
    };
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator")
}

fn with_teams(mut s: Settings) -> Settings {
    for (team, key) in [(TEAM_B, "key-b"), (TEAM_C, "key-c")] {
        s.teams.insert(
            team.into(),
            TeamSettings {
                api_key: Some(key.to_owned().into()),
                max_in_flight: Some(2),
                ..TeamSettings::default()
            },
        );
    }
    s.validate().expect("valid");
    s
}

/// `(team_id, state, count)` of every row.
async fn states_by_team(store: &Store) -> Vec<(String, String, i64)> {
    let sql = "SELECT team_id, state, count(*) FROM prism_outbox_rows GROUP BY 1, 2 ORDER BY 1, 2";
    match store.raw_pool_for_tests() {
        RawPool::Sqlite(p) => sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        RawPool::Postgres(p) => sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
    }
}

async fn unfinished_of(store: &Store, team: &str) -> i64 {
    states_by_team(store)
        .await
        .iter()
        .filter(|(t, s, _)| t == team && s != "succeeded" && s != "dead")
        .map(|(_, _, n)| n)
        .sum()
}

both_backends! {
    async fn a_delete_waits_for_the_updates_before_it_and_the_updates_after_it_wait_for_it(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        insert(&store, &[
            change(a, Operation::Update, 1),
            change(a, Operation::Update, 2),
            change(b, Operation::Update, 1),
            change(a, Operation::Delete, 3),
            change(a, Operation::Update, 4),
            change(b, Operation::Delete, 2),
        ]).await.unwrap();
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        let team = sim.team_id().to_owned();
        // 1 and 2 coalesce (both default-only updates); the delete travels alone, after them;
        // the update after the delete waits for it and re-creates the record.
        assert_eq!(
            applied(&sim, &team, a),
            [(Operation::Update, Some(2)), (Operation::Delete, None), (Operation::Update, Some(4))]
        );
        assert_eq!(applied(&sim, &team, b), [(Operation::Update, Some(1)), (Operation::Delete, None)]);
        assert!(sim.record(ObjectType::Contact, a).is_some(), "a exists again");
        assert!(sim.record(ObjectType::Contact, b).is_none(), "b is gone");
        let deletes = sim.requests().iter().filter(|r| r.path.ends_with("/contact/batch/delete")).count();
        assert!(deletes >= 1);
    }

    async fn a_delete_of_a_record_already_gone_succeeds_and_a_refused_one_is_dead_until_replayed(db) {
        let refused = Uuid::new_v4();
        let sim = sim(FaultProfile {
            item_errors_for_ids: [(refused.to_string(), "forbidden".to_owned())].into(),
            ..FaultProfile::default()
        })
        .await;
        let store = db.store().await;
        let never_existed = Uuid::new_v4();
        insert(&store, &[
            change(never_existed, Operation::Delete, 1),
            change(refused, Operation::Update, 1),
        ]).await.unwrap();
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        assert_eq!(done[0].state, "succeeded", "not_found on a delete means the record is gone: {done:?}");
        assert_eq!((done[1].state.as_str(), done[1].code.as_deref()), ("dead", Some("forbidden")));
        // A dead delete, then the operator replays the deletes once the cause is fixed.
        insert(&store, &[change(refused, Operation::Delete, 2)]).await.unwrap();
        let done = wait_until_finished(&store, FINISH).await;
        assert_eq!((done[2].state.as_str(), done[2].code.as_deref()), ("dead", Some("forbidden")));
        sim.set_faults(FaultProfile::default());
        let filter = ReplayFilter { operation: Some(Operation::Delete), error_code: Some("forbidden".into()), ..ReplayFilter::default() };
        assert_eq!(apply(&store, &filter, "test").await.unwrap(), 1, "only the delete is replayed");
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert_eq!(done[2].state, "succeeded");
        assert_eq!(done[1].state, "dead", "the update was not chosen");
        assert_eq!(applied(&sim, sim.team_id(), refused), [], "the update never applied; the delete found nothing");
    }

    async fn one_teams_revoked_key_or_429_storm_pauses_only_that_team(db) {
        let sim = three_team_sim(FaultProfile::default()).await;
        // Team B's key is revoked; team C is in a 429 storm; the default team is healthy.
        sim.set_api_key_for_team(TEAM_B, "rotated").unwrap();
        sim.set_faults_for_team(TEAM_C, FaultProfile {
            rate_limit_rate: 1.0,
            retry_after: Some(1),
            ..FaultProfile::default()
        }).unwrap();
        let store = db.store().await;
        let mut changes = Vec::new();
        for i in 0..300 {
            changes.push(for_team(change(Uuid::new_v4(), Operation::Update, i), TEAM_B));
            changes.push(for_team(change(Uuid::new_v4(), Operation::Update, i), TEAM_C));
        }
        // The healthy team's changes come last: behind 600 rows of paused teams.
        for i in 0..600 {
            changes.push(change(Uuid::new_v4(), Operation::Update, i));
        }
        insert(&store, &changes).await.unwrap();
        let settings = with_teams(settings(&db, &sim));
        let started = std::time::Instant::now();
        let engine = start_engine(&settings).await;
        let deadline = std::time::Instant::now() + FINISH;
        while unfinished_of(&store, "").await > 0 {
            assert!(std::time::Instant::now() < deadline, "the healthy team did not finish: {:?}", states_by_team(&store).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let states = states_by_team(&store).await;
        assert!(states.iter().all(|(_, s, _)| s != "dead"), "a pause never kills rows: {states:?}");
        assert_eq!(unfinished_of(&store, TEAM_B).await, 300, "team B sent nothing: {states:?}");
        assert!(unfinished_of(&store, TEAM_C).await > 0, "team C is held back by its 429s: {states:?}");
        assert!(engine.health.credentials_refused(), "a refused team shows in readiness");
        let b = sim.stats_for_team(TEAM_B).unwrap();
        // The first batch of B, then one probe per auth.probe_interval (plus slack for timing).
        let probes_allowed = 3 + (started.elapsed().as_secs_f64() / settings.auth.probe_interval.as_secs_f64()) as u64;
        let refused = b.status_count(401);
        assert!((1..=probes_allowed).contains(&refused), "one probe at a time: {refused} 401s, at most {probes_allowed}: {b:?}");
        assert_eq!(b.status_count(200), 0);
        // The storm ends and the key is restored: both teams finish, in order, without loss.
        sim.set_api_key_for_team(TEAM_B, "key-b").unwrap();
        sim.clear_faults_for_team(TEAM_C).unwrap();
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{:?}", states_by_team(&store).await);
        for team in [TEAM_B, TEAM_C] {
            assert_eq!(sim.applied_log_for_team(team).unwrap().len(), 300, "team {team}");
        }
        assert!(sim.requests().iter().all(|r| r.team.as_deref() == Some(sim.team_id()) || r.path.contains(TEAM_B) || r.path.contains(TEAM_C)));
    }

    async fn a_team_id_holding_url_syntax_stays_one_path_segment(db) {
        // Before the team id was percent-encoded, `/`, `?` and `#` cut the path short (the
        // request went to `/v2/prism/odd/team`, with a query and a fragment) and nothing synced.
        const ODD: &str = "odd/team?x=1#frag ment%2F";
        let config = SimConfig {
            seed: 7,
            extra_teams: vec![SimTeam { team_id: ODD.into(), api_key: "key-odd".into() }],
            ..SimConfig::default()
        };
        let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap()).await.expect("simulator");
        let store = db.store().await;
        let records: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let changes: Vec<Change> = records.iter().map(|r| for_team(change(*r, Operation::Update, 1), ODD)).collect();
        insert(&store, &changes).await.unwrap();
        let mut settings = settings(&db, &sim);
        settings.teams.insert(ODD.into(), TeamSettings { api_key: Some("key-odd".to_owned().into()), ..TeamSettings::default() });
        settings.validate().expect("valid");
        let engine = start_engine(&settings).await;
        let done = wait_until_finished(&store, Duration::from_secs(30)).await;
        engine.stop().await;
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        for record in records {
            assert_eq!(applied(&sim, ODD, record), [(Operation::Update, Some(1))]);
        }
        let paths: Vec<_> = sim.requests().iter().map(|r| (r.path.clone(), r.team.clone())).collect();
        assert!(!paths.is_empty() && paths.iter().all(|(_, team)| team.as_deref() == Some(ODD)), "{paths:?}");
    }

    async fn rows_of_an_unknown_team_or_operation_go_dead_and_the_rest_sync(db) {
        let sim = sim(FaultProfile::default()).await;
        let store = db.store().await;
        let good = Uuid::new_v4();
        insert(&store, &[
            for_team(change(Uuid::new_v4(), Operation::Update, 1), "no-such-team"),
            change(good, Operation::Update, 1),
        ]).await.unwrap();
        let odd = match db.backend {
            Backend::Sqlite => format!("INSERT INTO prism_outbox (record_id, patch, operation) VALUES ('{}', '{{}}', 'upsert')", Uuid::new_v4()),
            Backend::Postgres => format!("INSERT INTO prism_outbox (record_id, patch, operation) VALUES ('{}', '{{}}', 'upsert')", Uuid::new_v4()),
        };
        exec(&store, &odd).await;
        let engine = start_engine(&settings(&db, &sim)).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let codes: Vec<_> = done.iter().map(|r| (r.state.as_str(), r.code.as_deref())).collect();
        assert_eq!(codes, [("dead", Some("unknown_team")), ("succeeded", None), ("dead", Some("invalid_operation"))]);
    }

    async fn a_populated_outbox_of_the_previous_schema_migrates_in_place_and_syncs(db) {
        let sim = sim(FaultProfile::default()).await;
        // The schema as the previous release left it: only migration 0001 applied.
        let previous = tempfile::tempdir().unwrap();
        let dir = match db.backend { Backend::Sqlite => "sqlite", Backend::Postgres => "postgres" };
        std::fs::copy(
            format!("{}/migrations/{dir}/0001_outbox.sql", env!("CARGO_MANIFEST_DIR")),
            previous.path().join("0001_outbox.sql"),
        ).unwrap();
        let old = sqlx::migrate::Migrator::new(previous.path()).await.unwrap();
        let settings = settings(&db, &sim);
        let store = Store::connect(&settings.database).await.unwrap();
        match store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => old.run(p).await.unwrap(),
            RawPool::Postgres(p) => old.run(p).await.unwrap(),
        }
        // Rows written by an application, and a batch a daemon of the previous release stored,
        // leased and then died with (its lease has lapsed).
        let records: Vec<(String, String)> = (0..50)
            .map(|i| (Uuid::new_v4().to_string(), format!(r#"{{"default": {{"n": {i}}}}}"#)))
            .collect();
        insert_rows(&store, &records).await;
        let stored = Uuid::new_v4();
        let body = format!(r#"{{"items":[{{"id":"{}","default":{{"n":0}}}}]}}"#, records[0].0);
        let items = format!(r#"[{{"r":"{}","rows":[1],"a":0}}]"#, records[0].0);
        let batch = match db.backend {
            Backend::Sqlite => format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count, lease_owner, lease_expires_at)
                 VALUES ('{stored}', 'old-key', 'contact', CAST('{body}' AS BLOB), '{items}', 1, 1, 'dead-daemon', '2000-01-01T00:00:00.000Z');
                 UPDATE prism_outbox SET state = 'in_flight', batch_id = '{stored}' WHERE id = 1;"),
            Backend::Postgres => format!(
                "INSERT INTO prism_batches (id, idempotency_key, object_type, body, items, item_count, row_count, lease_owner, lease_expires_at)
                 VALUES ('{stored}', 'old-key', 'contact', convert_to('{body}', 'UTF8'), '{items}', 1, 1, 'dead-daemon', now() - interval '1 hour');
                 UPDATE prism_outbox SET state = 'in_flight', batch_id = '{stored}' WHERE id = 1;"),
        };
        exec(&store, &batch).await;
        // The new release migrates (0002 adds columns with defaults; nothing is rewritten) and
        // an application that still inserts only (record_id, patch) keeps working.
        store.migrate().await.unwrap();
        let late = Uuid::new_v4().to_string();
        insert_rows(&store, &[(late.clone(), r#"{"default": {"n": 99}}"#.into())]).await;
        let engine = start_engine(&settings).await;
        let done = wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        assert_eq!(done.len(), 51);
        assert!(done.iter().all(|r| r.state == "succeeded"), "{done:?}");
        let keys: Vec<_> = sim.requests().iter().filter_map(|r| r.idempotency_key.clone()).collect();
        assert!(keys.contains(&"old-key".to_owned()), "the stored batch is re-sent under its own key");
        assert_eq!(sim.applied_log().len(), 51, "each change applied once");
    }

    async fn the_command_line_enqueues_deletes_and_reports_and_replays_by_team_and_operation(db) {
        let sim = sim(FaultProfile::default()).await;
        let (code, out, err) = verb(&db, &sim, &["migrate"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        let record = Uuid::new_v4();
        let input = format!(
            "{{\"record_id\": \"{record}\", \"patch\": {{\"default\": {{\"n\": 1}}}}}}\n\
             {{\"record_id\": \"{record}\", \"operation\": \"delete\"}}\n\
             {{\"record_id\": \"{}\", \"patch\": {{}}, \"team_id\": \"{TEAM_B}\"}}\n",
            Uuid::new_v4()
        );
        let (code, out, err) = verb(&db, &sim, &["enqueue"], &input).await;
        assert_eq!(code, 0, "{out}{err}");
        // Team B has no key configured here: its row dies as unknown_team; the rest syncs.
        let store = db.store().await;
        let engine = start_engine(&settings(&db, &sim)).await;
        wait_until_finished(&store, FINISH).await;
        engine.stop().await;
        let (_, out, _) = verb(&db, &sim, &["status", "--json"], "").await;
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(status["rows_by_operation"]["delete"]["succeeded"], 1, "{out}");
        assert_eq!(status["rows_by_team"][TEAM_B]["dead"], 1, "{out}");
        assert_eq!(status["rows_by_team"]["default"]["succeeded"], 2, "{out}");
        assert_eq!(status["dead_by_error_code"]["unknown_team"], 1, "{out}");
        let (code, out, _) = verb(&db, &sim, &["status"], "").await;
        assert_eq!(code, 3, "dead rows: {out}");
        assert!(out.contains("operation delete") && out.contains(&format!("team {TEAM_B}")), "{out}");
        // Replay chooses by team and operation.
        let (code, out, _) = verb(&db, &sim, &["replay", "--operation", "delete", "--dry-run", "--json"], "").await;
        assert_eq!(code, 0);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["would_replay"], 0, "the delete is not dead");
        let (code, out, err) = verb(&db, &sim, &["replay", "--team", TEAM_B, "--yes"], "").await;
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(rows(&store).await.iter().filter(|r| r.state == "pending").count(), 1, "{out}");
        let (code, _, err) = verb(&db, &sim, &["replay", "--operation", "upsert"], "").await;
        assert_eq!(code, 2, "a wrong flag is a usage error: {err}");
    }
}

fn pg(store: &Store) -> &sqlx::PgPool {
    match store.raw_pool_for_tests() {
        RawPool::Postgres(p) => p,
        RawPool::Sqlite(_) => panic!("a Postgres test"),
    }
}

/// `(name, definition, valid)` of every index of the outbox and batch tables.
async fn indexes(store: &Store) -> Vec<(String, String, bool)> {
    sqlx::query(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid), i.indisvalid
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid IN ('prism_outbox'::regclass, 'prism_batches'::regclass) ORDER BY 1",
    )
    .fetch_all(pg(store))
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn postgres_migrations() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres")
}

/// Databases that applied migration 0002 as first released (it built the lane index inside its
/// transaction) keep migrating and syncing, and end with the indexes a fresh database gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_database_that_applied_the_released_0002_migrates_to_the_indexes_of_a_fresh_one()
{
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let previous = tempfile::tempdir().unwrap();
    std::fs::copy(
        postgres_migrations().join("0001_outbox.sql"),
        previous.path().join("0001_outbox.sql"),
    )
    .unwrap();
    std::fs::copy(
        format!(
            "{}/tests/migrations/postgres_0002_as_released.sql",
            env!("CARGO_MANIFEST_DIR")
        ),
        previous.path().join("0002_operations_and_teams.sql"),
    )
    .unwrap();
    let sim = sim(FaultProfile::default()).await;
    let settings = settings(&db, &sim);
    let store = Store::connect(&settings.database).await.unwrap();
    sqlx::migrate::Migrator::new(previous.path())
        .await
        .unwrap()
        .run(pg(&store))
        .await
        .unwrap();
    let records: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                Uuid::new_v4().to_string(),
                format!(r#"{{"default": {{"n": {i}}}}}"#),
            )
        })
        .collect();
    insert_rows(&store, &records).await;
    store
        .migrate()
        .await
        .expect("the released 0002's checksum is accepted");
    store
        .migrate()
        .await
        .expect("and migrating again is a no-op");
    let engine = start_engine(&settings).await;
    let done = wait_until_finished(&store, FINISH).await;
    engine.stop().await;
    assert!(
        done.len() == 20 && done.iter().all(|r| r.state == "succeeded"),
        "{done:?}"
    );

    let Some(fresh_db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let fresh = fresh_db.store().await;
    let (upgraded, fresh) = (indexes(&store).await, indexes(&fresh).await);
    assert_eq!(upgraded, fresh, "the same indexes either way");
    let names: Vec<&str> = fresh.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(
        names.contains(&"prism_outbox_lane") && !names.contains(&"prism_outbox_active"),
        "{names:?}"
    );
    // 0012/0013: the batch index holds only rows of a batch, so the application's insert (a
    // row with no batch yet) writes no entry into it.
    let batched = fresh.iter().find(|(n, _, _)| n == "prism_outbox_batched");
    assert!(
        batched.is_some_and(|(_, def, _)| def.contains("WHERE (batch_id IS NOT NULL)"))
            && !names.contains(&"prism_outbox_batch"),
        "{fresh:?}"
    );
    assert!(fresh.iter().all(|(_, _, valid)| *valid), "{fresh:?}");
}

/// Every Postgres migration after the first that builds or drops an index does it
/// CONCURRENTLY, alone, outside a transaction: a plain CREATE INDEX holds the application's
/// inserts back while it reads the whole outbox.
#[tokio::test]
async fn postgres_index_migrations_run_concurrently_outside_a_transaction() {
    let migrator = sqlx::migrate::Migrator::new(postgres_migrations())
        .await
        .unwrap();
    let mut checked = 0;
    for m in migrator.iter().filter(|m| m.version > 1) {
        let sql: String = m
            .sql
            .as_str()
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n")
            .to_uppercase();
        // An index of a table the same migration creates holds nothing back (the table is
        // new and empty), and is built in its transaction.
        let on_new_tables = sql
            .lines()
            .filter(|l| l.contains("CREATE INDEX") || l.contains("CREATE UNIQUE INDEX"))
            .all(|l| {
                l.split(" ON ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .is_some_and(|table| sql.contains(&format!("CREATE TABLE {table} ")))
            });
        if (sql.contains("CREATE INDEX") || sql.contains("CREATE UNIQUE INDEX"))
            && on_new_tables
            && !sql.contains("DROP INDEX")
        {
            continue;
        }
        if sql.contains("CREATE INDEX")
            || sql.contains("DROP INDEX")
            || sql.contains("CREATE UNIQUE INDEX")
        {
            assert!(
                m.no_tx,
                "migration {} ({}) must start with -- no-transaction",
                m.version, m.description
            );
            assert!(
                sql.contains("INDEX CONCURRENTLY"),
                "migration {} builds or drops an index without CONCURRENTLY",
                m.version
            );
            assert_eq!(
                sql.matches(';').count(),
                1,
                "migration {}: one statement per no-transaction migration",
                m.version
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "the lane index build and the old index's drop"
    );
}

/// The lane index is built while an application's write transaction is open: the application
/// keeps inserting meanwhile, and a second replica migrating at the same time neither
/// deadlocks with the build nor fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_index_build_lets_inserts_through_and_two_migrators_do_not_deadlock() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let settings = prism_sync::settings::DatabaseSettings {
        url: db.url.clone(),
        ..Default::default()
    };
    let store = Store::connect(&settings).await.unwrap();
    sqlx::migrate::Migrator::new(postgres_migrations())
        .await
        .unwrap()
        .run_to(3, pg(&store))
        .await
        .unwrap();
    let records: Vec<(String, String)> = (0..200)
        .map(|i| {
            (
                Uuid::new_v4().to_string(),
                format!(r#"{{"default": {{"n": {i}}}}}"#),
            )
        })
        .collect();
    insert_rows(&store, &records).await;
    // An application's transaction that wrote to the outbox and is still open.
    let mut writer = pg(&store).begin().await.unwrap();
    sqlx::query("INSERT INTO prism_outbox (record_id, patch) VALUES (gen_random_uuid(), '{}')")
        .execute(&mut *writer)
        .await
        .unwrap();

    let first = {
        let store = Store::connect(&settings).await.unwrap();
        tokio::spawn(async move { store.migrate().await })
    };
    let mut building = false;
    for _ in 0..250 {
        building = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE '%CREATE INDEX%prism_outbox_lane%' AND wait_event_type = 'Lock')",
        )
        .fetch_one(pg(&store))
        .await
        .unwrap();
        if building {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(building, "the index build waits for the open writer");
    let insert =
        sqlx::query("INSERT INTO prism_outbox (record_id, patch) VALUES (gen_random_uuid(), '{}')")
            .execute(pg(&store));
    tokio::time::timeout(Duration::from_secs(5), insert)
        .await
        .expect("an INSERT during the index build is not held back")
        .unwrap();

    let second = {
        let store = Store::connect(&settings).await.unwrap();
        tokio::spawn(async move { store.migrate().await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writer.commit().await.unwrap();
    for (name, migrator) in [("first", first), ("second", second)] {
        tokio::time::timeout(Duration::from_secs(30), migrator)
            .await
            .unwrap_or_else(|_| panic!("the {name} migrator finishes"))
            .unwrap()
            .unwrap_or_else(|e| panic!("the {name} migrator: {e}"));
    }
    let built = indexes(&store).await;
    assert!(
        built
            .iter()
            .any(|(n, _, valid)| n == "prism_outbox_lane" && *valid),
        "{built:?}"
    );
    assert!(
        !built.iter().any(|(n, _, _)| n == "prism_outbox_active"),
        "{built:?}"
    );
    assert!(store.migrations_current().await.unwrap());
}

/// An index build that was interrupted (a crash, a cancel, a deadlock) leaves an INVALID index
/// behind; the next migration builds it again instead of keeping it (IF NOT EXISTS alone would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_interrupted_index_build_is_redone_by_the_next_migration() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let settings = prism_sync::settings::DatabaseSettings {
        url: db.url.clone(),
        ..Default::default()
    };
    let store = Store::connect(&settings).await.unwrap();
    sqlx::migrate::Migrator::new(postgres_migrations())
        .await
        .unwrap()
        .run_to(3, pg(&store))
        .await
        .unwrap();
    let mut writer = pg(&store).begin().await.unwrap();
    sqlx::query("INSERT INTO prism_outbox (record_id, patch) VALUES (gen_random_uuid(), '{}')")
        .execute(&mut *writer)
        .await
        .unwrap();
    let interrupted = {
        let store = Store::connect(&settings).await.unwrap();
        tokio::spawn(async move { store.migrate().await })
    };
    let mut cancelled = false;
    for _ in 0..250 {
        cancelled = sqlx::query_scalar(
            "SELECT COALESCE(bool_or(pg_cancel_backend(pid)), false) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE '%CREATE INDEX%prism_outbox_lane%' AND wait_event_type = 'Lock'",
        )
        .fetch_one(pg(&store))
        .await
        .unwrap();
        if cancelled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled, "the build was caught waiting");
    assert!(
        interrupted.await.unwrap().is_err(),
        "the cancelled migration fails"
    );
    writer.commit().await.unwrap();
    assert!(
        indexes(&store)
            .await
            .iter()
            .any(|(n, _, valid)| n == "prism_outbox_lane" && !*valid),
        "left invalid"
    );
    store.migrate().await.expect("the next migration");
    let built = indexes(&store).await;
    assert!(
        built
            .iter()
            .any(|(n, _, valid)| n == "prism_outbox_lane" && *valid),
        "{built:?}"
    );
    assert!(built.iter().all(|(_, _, valid)| *valid), "{built:?}");
}

/// Migration 0003 adds a column: it needs the outbox's lock for an instant, and while it waits
/// for an application transaction, the application's next inserts would queue behind it. It
/// waits at most its `lock_timeout` and is tried again, so inserts get through meanwhile, and it
/// is applied once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_adding_a_column_waits_for_an_open_writer_without_blocking_inserts() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let settings = prism_sync::settings::DatabaseSettings {
        url: db.url.clone(),
        ..Default::default()
    };
    let store = Store::connect(&settings).await.unwrap();
    sqlx::migrate::Migrator::new(postgres_migrations())
        .await
        .unwrap()
        .run_to(2, pg(&store))
        .await
        .unwrap();
    let mut writer = pg(&store).begin().await.unwrap();
    sqlx::query("INSERT INTO prism_outbox (record_id, patch) VALUES (gen_random_uuid(), '{}')")
        .execute(&mut *writer)
        .await
        .unwrap();
    let migrating = {
        let store = Store::connect(&settings).await.unwrap();
        tokio::spawn(async move { store.migrate().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Between the migration's tries (each waits at most 2 s), an insert goes through.
    let insert =
        sqlx::query("INSERT INTO prism_outbox (record_id, patch) VALUES (gen_random_uuid(), '{}')")
            .execute(pg(&store));
    tokio::time::timeout(Duration::from_secs(8), insert)
        .await
        .expect("an insert is not held behind the waiting ALTER TABLE for long")
        .unwrap();
    assert!(
        !migrating.is_finished(),
        "the migration waits for the open writer"
    );
    writer.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), migrating)
        .await
        .expect("the migration is applied once the writer has ended")
        .unwrap()
        .unwrap();
    assert!(store.migrations_current().await.unwrap());
}
