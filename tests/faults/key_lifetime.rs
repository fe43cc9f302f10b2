//! Batch key lifetime: the simulator forgets keys after a short TTL and the daemon's
//! `batch.max_key_age` is shorter still. A batch that stays unanswered until its key is too old
//! (5xx after 5xx; or its daemon killed while the API held an already-applied answer) is
//! released: its rows travel again under new keys, no key is ever sent after the API could have
//! forgotten it, and every record still ends at its last change.

use std::sync::Arc;
use std::time::Duration;

use prism_sync::sim::FaultProfile;
use rand::Rng;

use crate::checker::{Expect, Releases};
use crate::common::Backend;
use crate::harness::*;

const SIM_TTL: Duration = Duration::from_secs(8);
const KEY_AGE: &str = "2s";

#[derive(Clone, Copy)]
enum Unanswered {
    /// Every request is answered 503 until the keys are too old.
    ServerErrors,
    /// The API applies and holds the answer; the daemon is killed meanwhile.
    KilledWhileHeld,
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("PRISM_SYNC__BATCH__MAX_KEY_AGE", KEY_AGE),
        // Releases count as tries; none of these rows may die of them.
        ("PRISM_SYNC__RETRY__MAX_ATTEMPTS", "1000"),
        ("PRISM_SYNC__BATCH__MAX_ATTEMPTS", "1000"),
    ]
}

async fn key_lifetime(how: Unanswered, backend: Backend, round: u64) {
    let (what, faults) = match how {
        Unanswered::ServerErrors => (
            "5xx_until_the_key_is_old",
            FaultProfile {
                error_503_rate: 1.0,
                ..FaultProfile::default()
            },
        ),
        Unanswered::KilledWhileHeld => (
            "killed_while_the_answer_is_held",
            FaultProfile {
                slow_response_rate: 1.0,
                slow_response: Duration::from_secs(30),
                ..FaultProfile::default()
            },
        ),
    };
    let mut sc = Scenario::new(scenario_name("key_lifetime", what, backend, round));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let sim = Sim::start(&mut sc, faults, Some(SIM_TTL)).await;
    let rows = workload(&mut sc.rng, scale(20), scale(160));
    db.insert_retrying(&rows).await;
    let mut daemon = Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &env());
    let mut extra = Vec::new();
    match how {
        Unanswered::ServerErrors => {
            let storm = Duration::from_millis(sc.rng.random_range(3500..5500));
            tokio::time::sleep(storm).await;
            sc.inject("503_storm", 1);
            sc.note(format!("every request answered 503 for {storm:?}"));
        }
        Unanswered::KilledWhileHeld => {
            let wanted = sc.rng.random_range(2..5);
            let held = until(
                &format!("the simulator to hold {wanted} answers"),
                Duration::from_secs(30),
                || async { sim.fault_count("slow_response").await >= wanted },
            )
            .await;
            if let Err(e) = held {
                sc.fail(format!("{e}; log tail:\n{}", daemon.tail(15)));
            }
            if let Err(e) = daemon.kill9().await {
                sc.fail(e);
            }
            sc.inject("kill:while_held", 1);
            daemon = Daemon::spawn(&sc, "restarted", &bin(), &db, &sim, &env());
        }
    }
    sim.set_faults(FaultProfile::default());
    extra.extend(finish_and_stop(&db, &mut daemon, rows.len(), Duration::from_secs(90)).await);
    // The one scenario that must release batches (and so may re-apply their changes).
    let expect = Expect {
        sim_ttl: Some(SIM_TTL),
        releases: Releases::Required,
        ..Expect::default()
    };
    let (stats, verdict) = check(&db, &sim, &expect, extra).await;
    sc.finish(&stats, verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_batches_are_released_before_the_api_forgets_their_keys() {
    for round in 0..rounds() {
        let a = tokio::spawn(async move {
            on_both_backends(move |b| key_lifetime(Unanswered::ServerErrors, b, round)).await
        });
        let b = tokio::spawn(async move {
            on_both_backends(move |b| key_lifetime(Unanswered::KilledWhileHeld, b, round)).await
        });
        let (a, b) = (a.await, b.await);
        for r in [a, b] {
            if let Err(e) = r {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}
