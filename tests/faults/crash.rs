//! Crashes: the process dies at each phase boundary of a batch (failpoints build, armed to abort
//! at the n-th hit, n drawn from the seed), and with `kill -9` while the answer to a request the
//! API has already applied is still on the wire. After each crash the daemon is restarted
//! *without* the failpoint and must finish everything.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use prism_sync::sim::FaultProfile;
use rand::Rng;

use crate::checker::Expect;
use crate::common::Backend;
use crate::harness::*;

async fn crash_at(point: &'static str, backend: Backend, round: u64) {
    let mut sc = Scenario::new(scenario_name("crash", point, backend, round));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let latency = Duration::from_millis(sc.rng.random_range(0..15));
    let sim = Sim::start(
        &mut sc,
        FaultProfile {
            latency,
            ..FaultProfile::default()
        },
        None,
    )
    .await;
    let kills = repeats(1, 3) as usize;
    let rows = workload(&mut sc.rng, scale(25), scale(200));
    let mut queue: std::collections::VecDeque<PlannedRow> = rows.iter().cloned().collect();
    let mut take = |n: usize| -> Vec<PlannedRow> { queue.drain(..n.min(queue.len())).collect() };
    let failpoints = failpoints_bin();
    for i in 0..kills {
        let first = sc.rng.random_range(30..60);
        db.insert_retrying(&take(first)).await;
        // Abort at the (skip+1)-th time the point is reached, so the crash lands mid-run.
        let skip: u32 = sc.rng.random_range(0..3);
        let spec = if skip == 0 {
            format!("{point}=return")
        } else {
            format!("{point}={skip}*off->return")
        };
        let mut daemon = Daemon::spawn(
            &sc,
            &format!("armed-{i}"),
            &failpoints,
            &db,
            &sim,
            &[("FAILPOINTS", &spec)],
        );
        // More work arrives until the point has been reached often enough.
        let status = loop {
            if let Some(status) = daemon.wait_exit(Duration::from_secs(2)).await {
                break Some(status);
            }
            let more = take(30);
            if more.is_empty() {
                break daemon.wait_exit(Duration::from_secs(20)).await;
            }
            db.insert_retrying(&more).await;
        };
        let aborted = status.is_some_and(|s| s.signal() == Some(libc::SIGABRT))
            && daemon
                .logs()
                .contains(&format!("failpoint {point}: aborting"));
        if !aborted {
            let killed = daemon.kill9().await;
            sc.fail(format!(
                "the daemon armed with FAILPOINTS={spec} did not die there (status {status:?}, then kill -9: {killed:?}); log tail:\n{}",
                daemon.tail(15)
            ));
        }
        sc.inject(format!("kill:{point}"), 1);
    }
    let rest = take(usize::MAX);
    // The restart, without the failpoint; the last part of the workload arrives while it runs.
    let mut daemon = Daemon::spawn(&sc, "restarted", &bin(), &db, &sim, &[]);
    let rest = chunks(&mut sc.rng, &rest, 4);
    feed(&db, rest, Duration::from_millis(100))
        .await
        .expect("feeder");
    let mut extra = Vec::new();
    extra.extend(finish_and_stop(&db, &mut daemon, rows.len(), Duration::from_secs(90)).await);
    let (stats, verdict) = check(&db, &sim, &Expect::default(), extra).await;
    sc.finish(&stats, verdict);
}

macro_rules! crash_tests {
    ($($name:ident => $point:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            for round in 0..rounds() {
                on_both_backends(move |backend| crash_at($point, backend, round)).await;
            }
        }
    )*};
}

crash_tests! {
    kill_9_after_claim => "after_claim",
    kill_9_before_send => "before_send",
    kill_9_after_response => "after_response",
    kill_9_before_outcomes => "before_outcomes",
    kill_9_mid_outcomes => "mid_outcomes",
    kill_9_after_outcomes => "after_outcomes",
}

#[derive(Clone, Copy)]
enum OnTheWire {
    /// The API applied the batch and holds the answer (`slow_response` > `http.timeout`).
    HeldAnswer,
    /// The API applied the batch and drops the connection before answering.
    DroppedAnswer,
}

async fn kill_on_the_wire(how: OnTheWire, backend: Backend, round: u64) {
    let (what, kind, faults) = match how {
        OnTheWire::HeldAnswer => (
            "held_answer",
            "slow_response",
            FaultProfile {
                slow_response_rate: 1.0,
                slow_response: Duration::from_secs(20),
                ..FaultProfile::default()
            },
        ),
        OnTheWire::DroppedAnswer => (
            "dropped_answer",
            "drop_after_apply",
            FaultProfile {
                drop_after_apply_rate: 1.0,
                ..FaultProfile::default()
            },
        ),
    };
    let mut sc = Scenario::new(scenario_name("crash", what, backend, round));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let sim = Sim::start(&mut sc, faults, None).await;
    let rows = workload(&mut sc.rng, scale(20), scale(120));
    db.insert_retrying(&rows).await;
    let kills = repeats(1, 3);
    for i in 0..kills {
        let mut daemon = Daemon::spawn(&sc, &format!("victim-{i}"), &bin(), &db, &sim, &[]);
        let seen = sim.fault_count(kind).await;
        let wanted = seen + sc.rng.random_range(2..5);
        let hit = until(
            &format!("the simulator to inject {wanted} {kind} faults"),
            Duration::from_secs(30),
            || async { sim.fault_count(kind).await >= wanted },
        )
        .await;
        if let Err(e) = hit {
            sc.fail(format!("{e}; log tail:\n{}", daemon.tail(15)));
        }
        // Requests time out after 1 s and are re-sent at once: one is on the wire now.
        tokio::time::sleep(Duration::from_millis(sc.rng.random_range(0..300))).await;
        if let Err(e) = daemon.kill9().await {
            sc.fail(e);
        }
        sc.inject(format!("kill:{what}"), 1);
    }
    sim.set_faults(FaultProfile::default());
    let mut daemon = Daemon::spawn(&sc, "restarted", &bin(), &db, &sim, &[]);
    let mut extra = Vec::new();
    extra.extend(finish_and_stop(&db, &mut daemon, rows.len(), Duration::from_secs(90)).await);
    let (stats, verdict) = check(&db, &sim, &Expect::default(), extra).await;
    if stats["replays"].as_u64().unwrap_or(0) == 0 && verdict.violations.is_empty() {
        sc.fail("no idempotent replay happened: the scenario did not re-send an applied batch");
    }
    sc.finish(&stats, verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_an_applied_batch_waits_for_its_answer() {
    for round in 0..rounds() {
        on_both_backends(move |b| kill_on_the_wire(OnTheWire::HeldAnswer, b, round)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_apply_with_the_connection_dropped() {
    for round in 0..rounds() {
        on_both_backends(move |b| kill_on_the_wire(OnTheWire::DroppedAnswer, b, round)).await;
    }
}
