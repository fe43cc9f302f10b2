//! The database goes away under a running daemon: a private Postgres cluster is stopped with
//! `-m immediate` (a crash: every backend killed, recovery from the WAL on the next start) and
//! started again, several times; a SQLite file is write-locked by another process for seconds.
//! While it lasts `/readyz` must say not-ready and nothing new may be claimed and sent; after
//! it the daemon reconnects by itself and finishes, with no outcome lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prism_sync::sim::FaultProfile;
use rand::Rng;

use crate::checker::Expect;
use crate::common::Backend;
use crate::harness::*;

const MAX_IN_FLIGHT: usize = 4;

/// Waits until `more` rows have succeeded since now, or everything inserted so far is done; a
/// daemon that makes no progress for 30 s fails the scenario (with its log tail and the
/// database's state) instead of the next outage landing on an idle daemon.
async fn progress(sc: &Scenario, db: &Db, daemon: &Daemon, more: i64) {
    let base = db.progress().await.map_or(0, |(_, _, ok)| ok);
    let moved = until(
        &format!("{more} more rows to succeed before the next outage"),
        Duration::from_secs(30),
        || async {
            db.progress()
                .await
                .is_some_and(|(done, all, ok)| ok >= base + more || done == all)
        },
    )
    .await;
    if let Err(e) = moved {
        sc.fail(format!(
            "{e}; {}; log tail:\n{}",
            db.diagnose().await,
            daemon.tail(15)
        ));
    }
}

/// A window of wall-clock time in which the database was away.
struct Outage {
    from: time::OffsetDateTime,
    to: time::OffsetDateTime,
}

/// Keys first sent inside an outage: batches claimed before it, or new claims that should not
/// exist. At most the claim-ahead buffer and the batches on the wire can be sent: 2 × in flight.
/// Notes the counts on the scenario and returns a violation for each outage over the bound.
async fn fresh_key_violations(
    sc: &mut Scenario,
    sim: &Sim,
    outages: &[Outage],
    during: &str,
) -> Vec<String> {
    let mut first: std::collections::HashMap<String, time::OffsetDateTime> = Default::default();
    for r in sim.requests().await {
        if let (Some(k), Ok(at)) = (
            r.idempotency_key,
            time::OffsetDateTime::parse(&r.at, &time::format_description::well_known::Rfc3339),
        ) {
            first.entry(k).or_insert(at);
        }
    }
    let fresh: Vec<usize> = outages
        .iter()
        .map(|o| {
            first
                .values()
                .filter(|at| **at >= o.from && **at <= o.to)
                .count()
        })
        .collect();
    sc.note(format!(
        "batches first sent {during}, per outage: {fresh:?} (at most {} allowed: the claim-ahead buffer and the requests on the wire)",
        2 * MAX_IN_FLIGHT
    ));
    fresh
        .into_iter()
        .filter(|n| *n > 2 * MAX_IN_FLIGHT)
        .map(|n| {
            format!(
                "{n} batches were first sent {during}: new work was claimed and sent without a database"
            )
        })
        .collect()
}

async fn postgres_restarts(round: u64) {
    let sc = Scenario::new(scenario_name(
        "database",
        "pg_restart",
        Backend::Postgres,
        round,
    ));
    let Ok((mut sc, cluster)) = cluster_or_skip(sc) else {
        return;
    };
    let db = Arc::new(Db::on_cluster(&cluster).await);
    let sim = Sim::start(
        &mut sc,
        FaultProfile {
            latency: Duration::from_millis(10),
            latency_jitter: Duration::from_millis(30),
            ..FaultProfile::default()
        },
        None,
    )
    .await;
    let rows = workload(&mut sc.rng, scale(30), scale(360));
    let mut parts = chunks(&mut sc.rng, &rows, 12);
    db.insert_retrying(&parts.remove(0)).await;
    let feeder = feed(&db, parts, Duration::from_millis(400));
    let mut daemon = Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &[]);
    let mut extra = Vec::new();
    let mut outages = Vec::new();
    for _ in 0..repeats(2, 5) {
        progress(&sc, &db, &daemon, 20).await;
        let from = time::OffsetDateTime::now_utc();
        if let Err(e) = cluster.stop_immediate() {
            sc.fail(format!("pg_ctl stop: {e}"));
        }
        sc.inject("pg_restart", 1);
        let down_for = Duration::from_millis(sc.rng.random_range(2000..4500));
        let back_at = Instant::now() + down_for;
        let mut not_ready = false;
        while Instant::now() < back_at {
            if daemon.readyz().await == 503 {
                not_ready = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let to = time::OffsetDateTime::now_utc();
        if let Err(e) = cluster.start() {
            sc.fail(format!("pg_ctl start: {e}"));
        }
        outages.push(Outage { from, to });
        if !not_ready {
            extra.push(format!(
                "/readyz never said not-ready during a {down_for:?} Postgres outage"
            ));
        }
        if !daemon.wait_readyz(200, Duration::from_secs(30)).await {
            extra.push(format!(
                "/readyz did not return to 200 within 30 s of Postgres starting again; log tail:\n{}",
                daemon.tail(15)
            ));
        }
    }
    feeder.await.expect("feeder");
    extra.extend(finish_and_stop(&db, &mut daemon, rows.len(), Duration::from_secs(120)).await);
    extra.extend(fresh_key_violations(&mut sc, &sim, &outages, "while Postgres was down").await);
    let (stats, verdict) = check(&db, &sim, &Expect::default(), extra).await;
    sc.finish(&stats, verdict);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_the_daemon() {
    for round in 0..rounds() {
        postgres_restarts(round).await;
    }
}

async fn sqlite_locked(round: u64) {
    let mut sc = Scenario::new(scenario_name(
        "database",
        "sqlite_lock",
        Backend::Sqlite,
        round,
    ));
    let db = Arc::new(Db::new(Backend::Sqlite).await.expect("sqlite"));
    let sim = Sim::start(
        &mut sc,
        FaultProfile {
            latency: Duration::from_millis(5),
            latency_jitter: Duration::from_millis(20),
            ..FaultProfile::default()
        },
        None,
    )
    .await;
    let rows = workload(&mut sc.rng, scale(30), scale(360));
    let mut parts = chunks(&mut sc.rng, &rows, 12);
    db.insert_retrying(&parts.remove(0)).await;
    let feeder = feed(&db, parts, Duration::from_millis(400));
    // A short busy timeout, so that a lock of seconds is an outage rather than a wait.
    let mut daemon = Daemon::spawn(
        &sc,
        "daemon",
        &bin(),
        &db,
        &sim,
        &[("PRISM_SYNC__DATABASE__BUSY_TIMEOUT", "250ms")],
    );
    let mut extra = Vec::new();
    let mut outages = Vec::new();
    for _ in 0..repeats(2, 5) {
        progress(&sc, &db, &daemon, 20).await;
        let hold = Duration::from_millis(sc.rng.random_range(2500..4500));
        let url = db.url.clone();
        let (held, got_it) = tokio::sync::oneshot::channel();
        let locker = tokio::spawn(async move { hold_sqlite_lock(&url, hold, held).await });
        let from = got_it.await.expect("the lock holder got the lock");
        sc.inject("sqlite_lock", 1);
        let mut not_ready = false;
        while !locker.is_finished() {
            if daemon.readyz().await == 503 {
                not_ready = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        locker.await.expect("lock holder");
        outages.push(Outage {
            from,
            to: time::OffsetDateTime::now_utc(),
        });
        if !not_ready {
            extra.push(format!(
                "/readyz never said not-ready while another process held the write lock for {hold:?}"
            ));
        }
        if !daemon.wait_readyz(200, Duration::from_secs(20)).await {
            extra.push("/readyz did not return to 200 after the lock was released".into());
        }
    }
    feeder.await.expect("feeder");
    extra.extend(finish_and_stop(&db, &mut daemon, rows.len(), Duration::from_secs(90)).await);
    extra.extend(
        fresh_key_violations(&mut sc, &sim, &outages, "while the SQLite file was locked").await,
    );
    let (stats, verdict) = check(&db, &sim, &Expect::default(), extra).await;
    sc.finish(&stats, verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_locked_by_another_process() {
    for round in 0..rounds() {
        sqlite_locked(round).await;
    }
}
