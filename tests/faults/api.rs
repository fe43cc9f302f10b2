//! API faults while syncing: a seeded schedule of phases, each switching the simulator to one
//! kind of misbehaviour while new changes keep arriving, with a poison record (its batch is
//! refused whole) throughout. A phase lasts until the simulator has really injected its faults.
//! Then everything heals and the checker runs: only the poison record's rows may be dead.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prism_sync::sim::FaultProfile;
use rand::Rng;
use rand::seq::SliceRandom;
use uuid::Uuid;

use crate::checker::Expect;
use crate::common::Backend;
use crate::harness::*;

struct Phase {
    name: &'static str,
    faults: fn(&mut FaultProfile),
    /// Simulator fault kinds of which at least one must be injected before the phase ends.
    kinds: &'static [&'static str],
    revoke_key: bool,
}

const PHASES: &[Phase] = &[
    Phase {
        name: "429_storm_retry_after",
        faults: |p| {
            p.rate_limit_rate = 0.8;
            p.retry_after = Some(1);
        },
        kinds: &["rate_limit"],
        revoke_key: false,
    },
    Phase {
        name: "429_storm_retry_after_ms",
        faults: |p| {
            p.rate_limit_rate = 0.6;
            p.retry_after_ms = Some(150);
        },
        kinds: &["rate_limit"],
        revoke_key: false,
    },
    Phase {
        name: "5xx_burst",
        faults: |p| {
            p.error_500_rate = 0.4;
            p.error_503_rate = 0.3;
        },
        kinds: &["error_500", "error_503"],
        revoke_key: false,
    },
    Phase {
        // The answer, already applied and cached, arrives after the client gave up (1 s).
        name: "timeouts_after_apply",
        faults: |p| {
            p.slow_response_rate = 0.5;
            p.slow_response = Duration::from_millis(1500);
        },
        kinds: &["slow_response"],
        revoke_key: false,
    },
    Phase {
        // The server works longer than the client waits; the work still completes, and a
        // retry meanwhile finds the key in use (409) or, later, the cached answer.
        name: "timeouts_while_working",
        faults: |p| {
            p.latency = Duration::from_millis(1200);
        },
        kinds: &["latency"],
        revoke_key: false,
    },
    Phase {
        name: "slow_answers",
        faults: |p| {
            p.slow_response_rate = 0.6;
            p.slow_response = Duration::from_millis(400);
        },
        kinds: &["slow_response"],
        revoke_key: false,
    },
    Phase {
        name: "dropped_after_apply",
        faults: |p| p.drop_after_apply_rate = 0.5,
        kinds: &["drop_after_apply"],
        revoke_key: false,
    },
    Phase {
        name: "truncated_and_non_json_200s",
        faults: |p| {
            p.truncated_body_rate = 0.35;
            p.non_json_body_rate = 0.35;
        },
        kinds: &["truncated_body", "non_json_body"],
        revoke_key: false,
    },
    Phase {
        name: "lying_200s",
        faults: |p| {
            p.missing_results_rate = 0.35;
            p.duplicate_result_rate = 0.35;
            p.unknown_result_id_rate = 0.35;
            p.wrong_summary_rate = 0.35;
        },
        kinds: &[
            "missing_results",
            "duplicate_result",
            "unknown_result_id",
            "wrong_summary",
        ],
        revoke_key: false,
    },
    Phase {
        name: "retryable_item_errors",
        faults: |p| {
            p.item_error_rate = 0.25;
            p.item_error_codes = vec![
                "rate_limited".into(),
                "internal_error".into(),
                "unavailable".into(),
            ];
        },
        kinds: &["item_error"],
        revoke_key: false,
    },
    Phase {
        name: "revoked_key",
        faults: |_| {},
        kinds: &[],
        revoke_key: true,
    },
];

async fn api_faults(backend: Backend, round: u64) {
    let mut sc = Scenario::new(scenario_name("api", "fault_schedule", backend, round));
    let Some(db) = Db::new(backend).await else {
        return sc.skip("PRISM_SYNC_TEST_DATABASE_URL is unset");
    };
    let db = Arc::new(db);
    let poison = Uuid::from_u128(sc.rng.random()).to_string();
    let poison_status = [400u16, 413, 422][sc.rng.random_range(0..3)];
    let base = FaultProfile {
        poison_ids: vec![poison.clone()],
        poison_status,
        latency_jitter: Duration::from_millis(10),
        ..FaultProfile::default()
    };
    let sim = Sim::start(&mut sc, base.clone(), None).await;
    let mut order: Vec<&Phase> = PHASES.iter().collect();
    order.shuffle(&mut sc.rng);
    // A pool of changes drawn from the front as the scenario goes: each phase gets some, and
    // more while it waits for its faults, so no phase runs without traffic.
    let mut pool: VecDeque<PlannedRow> = workload(&mut sc.rng, scale(40), scale(2000)).into();
    // The poison record changes a few times, at random places early in the stream.
    for _ in 0..3 {
        let at = sc.rng.random_range(0..300.min(pool.len()));
        let n = sc.rng.random_range(1..1000);
        pool.insert(
            at,
            PlannedRow {
                record: poison.clone(),
                patch: format!(r#"{{"default": {{"n": {n}}}}}"#),
            },
        );
    }
    let mut inserted = 0;
    let mut take = |n: usize| -> Vec<PlannedRow> {
        let rows: Vec<PlannedRow> = pool.drain(..n.min(pool.len())).collect();
        inserted += rows.len();
        rows
    };
    let first = sc.rng.random_range(20..60);
    db.insert_retrying(&take(first)).await;
    let mut daemon = Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &[]);
    let mut extra = Vec::new();
    for phase in &order {
        let mut profile = base.clone();
        (phase.faults)(&mut profile);
        let before = sim.stats().await;
        let count = |stats: &serde_json::Value, kind: &str| {
            stats["faults_injected"][kind].as_u64().unwrap_or(0)
        };
        sim.set_faults(profile);
        if phase.revoke_key {
            sim.put_api_key("revoked-key").await;
        }
        sc.inject(format!("phase:{}", phase.name), 1);
        // Fresh changes arrive during every phase, so that every phase meets traffic.
        let n = sc.rng.random_range(5..40);
        db.insert_retrying(&take(n)).await;
        let min = Duration::from_millis(sc.rng.random_range(800..1600));
        let started = Instant::now();
        let mut not_ready = false;
        let mut fed = Instant::now();
        loop {
            if fed.elapsed() > Duration::from_millis(500) {
                db.insert_retrying(&take(10)).await;
                fed = Instant::now();
            }
            let now = sim.stats().await;
            let injected = phase.kinds.is_empty()
                || phase
                    .kinds
                    .iter()
                    .all(|k| count(&now, k) > count(&before, k));
            if phase.revoke_key && daemon.readyz().await == 503 {
                not_ready = true;
            }
            let enough = injected && (!phase.revoke_key || not_ready);
            if started.elapsed() >= min && enough {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let missing: Vec<&&str> = phase
                    .kinds
                    .iter()
                    .filter(|k| count(&now, k) <= count(&before, k))
                    .collect();
                let exited = daemon.try_exit();
                sc.fail(format!(
                    "phase {} injected no {missing:?} (ready-check seen: {not_ready}) in 20 s; daemon exit: {exited:?}; sim stats {now}; {}; log tail:\n{}",
                    phase.name,
                    db.diagnose().await,
                    daemon.tail(10)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if phase.revoke_key {
            sim.put_api_key(prism_sync::sim::DEFAULT_API_KEY).await;
            if !daemon.wait_readyz(200, Duration::from_secs(15)).await {
                extra.push("/readyz did not return to 200 after the key was restored".into());
            }
        }
    }
    // Heal (the poison record stays poison) and let everything finish, with a last few changes.
    sim.set_faults(base);
    let n = sc.rng.random_range(10..50);
    db.insert_retrying(&take(n)).await;
    extra.extend(finish_and_stop(&db, &mut daemon, inserted, Duration::from_secs(120)).await);
    let snapshot = db.snapshot().await;
    let expect = Expect {
        dead: snapshot
            .rows
            .iter()
            .filter(|r| r.record == poison)
            .map(|r| (r.id, format!("http_{poison_status}")))
            .collect(),
        ..Expect::default()
    };
    let (stats, verdict) = check(&db, &sim, &expect, extra).await;
    sc.finish(&stats, verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_while_syncing_with_a_poison_item() {
    for round in 0..rounds() {
        on_both_backends(move |b| api_faults(b, round)).await;
    }
}
