//! Several daemons on one outbox (two and three on one Postgres database, two on one SQLite
//! file) under mild API faults, and `kill -9` of one of them mid-run: the others take its
//! batches over when their leases lapse and re-send them under their own keys. The checker's
//! per-row apply accounting proves no row was sent (applied) twice under different keys.

use std::sync::Arc;
use std::time::Duration;

use prism_sync::sim::FaultProfile;
use rand::Rng;

use crate::checker::Expect;
use crate::common::Backend;
use crate::harness::*;

async fn replicas(backend: Backend, count: usize, round: u64) {
    let mut sc = Scenario::new(scenario_name(
        "replicas",
        &format!("{count}_daemons_one_killed"),
        backend,
        round,
    ));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let sim = Sim::start(
        &mut sc,
        FaultProfile {
            latency: Duration::from_millis(5),
            latency_jitter: Duration::from_millis(25),
            error_503_rate: 0.05,
            drop_after_apply_rate: 0.03,
            missing_results_rate: 0.03,
            ..FaultProfile::default()
        },
        None,
    )
    .await;
    let rows = workload(&mut sc.rng, scale(50), scale(600));
    let mut parts = chunks(&mut sc.rng, &rows, 10);
    db.insert_retrying(&parts.remove(0)).await;
    let feeder = feed(&db, parts, Duration::from_millis(250));
    let mut daemons: Vec<Daemon> = (0..count)
        .map(|i| {
            Daemon::spawn(
                &sc,
                &format!("replica-{i}"),
                &bin(),
                &db,
                &sim,
                &[("PRISM_SYNC__SYNC__MAX_IN_FLIGHT", "3")],
            )
        })
        .collect();
    // Kill one once a seeded share of the rows has succeeded, at a moment it holds batches
    // (so the others must take them over when their leases lapse).
    let victim = sc.rng.random_range(0..count);
    let share = sc.rng.random_range(0.2..0.6);
    let target = (rows.len() as f64 * share) as i64;
    let reached = until(
        &format!("{target} of {} rows to succeed", rows.len()),
        Duration::from_secs(60),
        || async { db.progress().await.is_some_and(|(_, _, ok)| ok >= target) },
    )
    .await;
    if let Err(e) = reached {
        sc.fail(format!("{e}; {}", db.diagnose().await));
    }
    let held = kill_while_holding(&mut sc, &db, &mut daemons, victim).await;
    sc.note(format!(
        "killed replica-{victim} after {target}+ of {} rows succeeded, holding {held} open batch(es)",
        rows.len()
    ));
    if crate::harness::soak() {
        // Soak: it comes back later and competes again.
        tokio::time::sleep(Duration::from_millis(sc.rng.random_range(500..3000))).await;
        daemons[victim] = Daemon::spawn(
            &sc,
            &format!("replica-{victim}-again"),
            &bin(),
            &db,
            &sim,
            &[("PRISM_SYNC__SYNC__MAX_IN_FLIGHT", "3")],
        );
    }
    feeder.await.expect("feeder");
    let mut extra = Vec::new();
    if let Err(e) = db.wait_finished(rows.len(), Duration::from_secs(90)).await {
        extra.push(e);
    }
    for d in &mut daemons {
        extra.extend(stop_daemon(d).await);
    }
    let (stats, verdict) = check(&db, &sim, &Expect::default(), extra).await;
    sc.finish(&stats, verdict);
}

/// Kills `daemons[victim]` while it holds open batches, and returns how many it held. The look
/// and the kill cannot race: the victim is frozen (SIGSTOP) first, so it can neither finish nor
/// commit anything between them; the look waits a moment after the freeze, so that a COMMIT it
/// sent just before has been applied by the database. If it held nothing, it goes on (SIGCONT)
/// and the look is tried again shortly. If it never held a batch within 20 s, the scenario fails
/// rather than pass without a takeover.
async fn kill_while_holding(
    sc: &mut Scenario,
    db: &Db,
    daemons: &mut [Daemon],
    victim: usize,
) -> i64 {
    let pid = daemons[victim].pid;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut looks = 0u32;
    while tokio::time::Instant::now() < deadline {
        if db.leased_by(pid).await == 0 {
            tokio::time::sleep(Duration::from_millis(sc.rng.random_range(5..40))).await;
            continue;
        }
        looks += 1;
        if let Err(e) = daemons[victim].pause() {
            sc.fail(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = db.leased_by(pid).await;
        if held > 0 {
            if let Err(e) = daemons[victim].kill9().await {
                sc.fail(e);
            }
            sc.inject("kill:replica", 1);
            if looks > 1 {
                sc.note(format!(
                    "replica-{victim} was frozen {looks} times before it was frozen holding a batch"
                ));
            }
            return held;
        }
        if let Err(e) = daemons[victim].resume() {
            sc.fail(e);
        }
    }
    sc.fail(format!(
        "replica-{victim} (pid {pid}) held no open batch when frozen within 20 s ({looks} tries): no takeover was tested; {}; log tail:\n{}",
        db.diagnose().await,
        daemons[victim].tail(15)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_daemons_on_one_postgres_one_killed() {
    let two = tokio::spawn(async {
        for round in 0..rounds() {
            replicas(Backend::Postgres, 2, round).await;
        }
    });
    let three = tokio::spawn(async {
        for round in 0..rounds() {
            replicas(Backend::Postgres, 3, round).await;
        }
    });
    let (a, b) = (two.await, three.await);
    for r in [a, b] {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_sqlite_file_one_killed() {
    for round in 0..rounds() {
        replicas(Backend::Sqlite, 2, round).await;
    }
}
