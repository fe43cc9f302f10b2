//! Hostile input in the outbox, against the real process: record ids that are not UUIDs (text,
//! empty, NUL, invalid UTF-8), patches that are not objects, carry `id`, are not JSON, are not
//! UTF-8 or hold NUL bytes, are 10 MB large or nested 10,000 deep, and unknown object types.
//! Each such row goes `dead` with its own code while the good rows around it (some of the very
//! same records) keep syncing, and the daemon's peak memory stays bounded although the outbox
//! holds 80 MB of oversized patches.

use std::sync::Arc;
use std::time::Duration;

use prism_sync::sim::FaultProfile;

use crate::checker::Expect;
use crate::common::Backend;
use crate::harness::*;
use prism_sync::store::RawPool;

/// Peak resident memory the daemon (a debug build) may reach in this scenario, with 80 MB of
/// oversized patches in the outbox. Measured: about 30 MiB without them; 60-133 MiB with 8,
/// 16, 24 or 32 of them on SQLite (each dead-marking UPDATE rewrites its 10 MB row inside
/// SQLite, and the allocator keeps some of that), 29 MiB on Postgres. Before the fix to the
/// SQLite follower look-up: 250-360 MiB, growing with the oversized followers of one record
/// (every one of them was copied into memory at once).
const MAX_PEAK_MIB: u64 = 200;
fn huge_rows() -> usize {
    if soak() { 24 } else { 8 }
}

/// `(record_id, patch, object_type)` as SQL expressions, and the code the row must die with.
/// `{r}` is replaced by a good record id of the workload.
fn hostile(backend: Backend) -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    let mut rows = match backend {
        Backend::Sqlite => vec![
            ("'not-a-uuid'", "'{}'", "'contact'", "invalid_record_id"),
            ("''", "'{}'", "'contact'", "invalid_record_id"),
            (
                "'182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e' || char(0)",
                "'{}'",
                "'contact'",
                "invalid_record_id",
            ),
            (
                "X'FFFE3138326264'",
                "'{}'",
                "'contact'",
                "invalid_record_id",
            ),
            ("'{r}'", "'[1, 2]'", "'contact'", "invalid_patch"),
            ("'{r}'", "'\"a string\"'", "'contact'", "invalid_patch"),
            ("'{r}'", "'42'", "'contact'", "invalid_patch"),
            ("'{r}'", "'null'", "'contact'", "invalid_patch"),
            (
                "'{r}'",
                "'{\"id\": \"x\", \"default\": {\"n\": 0}}'",
                "'contact'",
                "invalid_patch",
            ),
            ("'{r}'", "'{\"default\": '", "'contact'", "invalid_patch"),
            (
                "'{r}'",
                "CAST(X'7B22FF227D' AS TEXT)",
                "'contact'",
                "invalid_patch",
            ),
            (
                "'{r}'",
                "X'7B2264656661756C74223A7B7D7DFF'",
                "'contact'",
                "invalid_patch",
            ),
            (
                "'{r}'",
                "'{\"default\": {\"a\": \"x' || char(0) || 'y\"}}'",
                "'contact'",
                "invalid_patch",
            ),
            (
                "'{r}'",
                "'a' || char(0) || 'b'",
                "'contact'",
                "invalid_patch",
            ),
            (
                "'{r}'",
                "'{\"default\": ' || replace(hex(zeroblob(10000)), '00', '[') || replace(hex(zeroblob(10000)), '00', ']') || '}'",
                "'contact'",
                "invalid_patch",
            ),
            ("'{r}'", "'{}'", "'spaceship'", "invalid_object_type"),
            ("'{r}'", "'{}'", "'Contact'", "invalid_object_type"),
            ("'{r}'", "'{}'", "''", "invalid_object_type"),
            (
                "'{r}'",
                "'{}'",
                "'contact' || char(0)",
                "invalid_object_type",
            ),
        ],
        Backend::Postgres => vec![
            ("'{r}'", "'[1, 2]'", "'contact'", "invalid_patch"),
            ("'{r}'", "'\"a string\"'", "'contact'", "invalid_patch"),
            ("'{r}'", "'42'", "'contact'", "invalid_patch"),
            ("'{r}'", "'null'", "'contact'", "invalid_patch"),
            (
                "'{r}'",
                "'{\"id\": \"x\", \"default\": {\"n\": 0}}'",
                "'contact'",
                "invalid_patch",
            ),
            (
                "'{r}'",
                "jsonb_build_object('default', (repeat('[', 10000) || repeat(']', 10000))::jsonb)",
                "'contact'",
                "invalid_patch",
            ),
            ("'{r}'", "'{}'", "'spaceship'", "invalid_object_type"),
            ("'{r}'", "'{}'", "'Contact'", "invalid_object_type"),
            ("'{r}'", "'{}'", "''", "invalid_object_type"),
        ],
    };
    let huge = match backend {
        Backend::Sqlite => "'{\"default\": {\"a\": \"' || hex(zeroblob(5000000)) || '\"}}'",
        Backend::Postgres => {
            "jsonb_build_object('default', jsonb_build_object('a', repeat('x', 10000000)))"
        }
    };
    for _ in 0..huge_rows() {
        // All on one record, after a good change of it: followers of one head, the worst case
        // for a claim that looks ahead for changes to merge.
        rows.push(("'{heavy}'", huge, "'contact'", "patch_too_large"));
    }
    rows
}

/// Inserts one row, retrying while SQLite is busy (as an application would).
async fn insert_returning(db: &Db, sql: &str) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let inserted: Result<i64, sqlx::Error> = match db.store.raw_pool_for_tests() {
            RawPool::Sqlite(p) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(p)
                    .await
            }
            RawPool::Postgres(p) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(p)
                    .await
            }
        };
        match inserted {
            Ok(id) => return id,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}: {sql:.200}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn hostile_rows(backend: Backend, round: u64) {
    let mut sc = Scenario::new(scenario_name("hostile_rows", "outbox", backend, round));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let sim = Sim::start(&mut sc, FaultProfile::default(), None).await;
    let good = workload(&mut sc.rng, scale(20), scale(200));
    let bad = hostile(backend);
    let pieces = chunks(&mut sc.rng, &good, bad.len() + 1);
    let mut expect = Expect::default();
    let mut daemon = None;
    // Good and hostile rows alternate; the daemon starts halfway, so some arrive while it runs.
    let mut last_record = good[0].record.clone();
    for i in 0..pieces.len().max(bad.len()) {
        if let Some(piece) = pieces.get(i) {
            db.insert_retrying(piece).await;
            if let Some(p) = piece.last() {
                last_record.clone_from(&p.record);
            }
        }
        if let Some((record, patch, object_type, code)) = bad.get(i) {
            let r = &last_record;
            let sql = format!(
                "INSERT INTO prism_outbox (record_id, patch, object_type) VALUES ({}, {}, {}) RETURNING id",
                record.replace("{r}", r).replace("{heavy}", &good[0].record),
                patch,
                object_type
            );
            let id = insert_returning(&db, &sql).await;
            expect.dead.insert(id, (*code).to_owned());
        }
        if i == pieces.len() / 2 {
            daemon = Some(Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &[]));
        }
    }
    let mut daemon = daemon.unwrap_or_else(|| Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &[]));
    sc.inject("hostile_rows", bad.len() as u64);
    let mut extra = Vec::new();
    if let Err(e) = db
        .wait_finished(good.len() + bad.len(), Duration::from_secs(90))
        .await
    {
        extra.push(format!("{e}; log tail:\n{}", daemon.tail(15)));
    }
    // The gauge sampler reads the table too: let it run a few more rounds before measuring.
    tokio::time::sleep(Duration::from_millis(800)).await;
    match daemon.memory_kib() {
        Some((peak, rss)) => {
            sc.note(format!(
                "daemon memory: peak (VmHWM) {:.1} MiB, now (VmRSS) {:.1} MiB; {} × 10 MB patches in the outbox",
                peak as f64 / 1024.0,
                rss as f64 / 1024.0,
                huge_rows()
            ));
            if peak > MAX_PEAK_MIB * 1024 {
                extra.push(format!(
                    "the daemon's peak memory reached {:.1} MiB (bound {MAX_PEAK_MIB} MiB)",
                    peak as f64 / 1024.0
                ));
            }
        }
        None => extra.push("could not read the daemon's /proc/<pid>/status".into()),
    }
    extra.extend(stop_daemon(&mut daemon).await);
    let (stats, verdict) = check(&db, &sim, &expect, extra).await;
    sc.finish(&stats, verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_go_dead_with_their_code_and_memory_stays_bounded() {
    for round in 0..rounds() {
        on_both_backends(move |b| hostile_rows(b, round)).await;
    }
}
