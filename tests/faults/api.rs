//! API faults while syncing: a seeded schedule of phases, each switching the simulator to one
//! kind of misbehaviour while new changes keep arriving, with a poison record (its batch is
//! refused whole) throughout. A phase lasts until the simulator has really injected its faults
//! and its promised effect has been seen; before a 429 phase the faults heal long enough for
//! every answer of the last phase to be given, so that the request log can be read phase by
//! phase.
//! Then everything heals and the checker runs: only the poison record's rows may be dead, no
//! batch is released, and each phase kept its promise (`effects.rs`): a 429 held back every
//! batch of the team for the pause it asked for, never longer than `http.max_retry_after`, and a
//! 409 for a key in use was followed by a re-send under the same key that got an answer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prism_sync::sim::FaultProfile;
use rand::Rng;
use rand::seq::SliceRandom;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::checker::Expect;
use crate::common::Backend;
use crate::effects;
use crate::harness::*;

/// What a phase promises beyond the checker's universal promises, and must be seen doing
/// before it ends.
#[derive(Clone, Copy)]
enum Effect {
    None,
    /// Its 429s ask for this pause: no request of the team may be sent during it (capped at
    /// `http.max_retry_after`), and one must come soon after the cap if the pause asked is longer.
    Pause(Duration),
    /// The simulator answers `409 idempotency_key_in_use` (a re-send came while the first
    /// request was still being worked on): the key is sent again and answered.
    KeyInUse,
}

struct Phase {
    name: &'static str,
    faults: fn(&mut FaultProfile),
    /// Simulator fault kinds of which at least one must be injected before the phase ends.
    kinds: &'static [&'static str],
    revoke_key: bool,
    effect: Effect,
}

/// Before a 429 phase the faults heal for this long: longer than any phase's latency (0.8 s)
/// and any 429 phase's answer, so that a 429 logged up to this long after its phase ended
/// belongs to it. Then the phase also waits until no request is still at work (the slow work of
/// `timeouts_while_working` runs for [`SLOW_WORK`]), so that every answer of the phase before is
/// logged before it begins.
const DRAIN: Duration = Duration::from_millis(2500);

/// How long the work of a slow request of `timeouts_while_working` takes, while its key is held:
/// longer than the daemon's request timeout (1 s), its retry backoff (at most 250 ms) and a
/// queue of the process's other batches in flight at one each (at most 3 more, under
/// `sync.max_in_flight = 4`, each answered or timed out within 1 s), so that a re-send of a
/// timed-out batch meets its first request still at work.
const SLOW_WORK: Duration = Duration::from_secs(5);

/// How long a phase may take to show its faults and its effect before the scenario fails.
const PHASE_BUDGET: Duration = Duration::from_secs(45);

const PHASES: &[Phase] = &[
    Phase {
        name: "429_storm_retry_after",
        faults: |p| {
            p.rate_limit_rate = 0.8;
            p.retry_after = Some(1);
        },
        kinds: &["rate_limit"],
        revoke_key: false,
        effect: Effect::Pause(Duration::from_secs(1)),
    },
    Phase {
        // Long enough to tell a pause from the daemon's own backoff (20-250 ms).
        name: "429_storm_retry_after_ms",
        faults: |p| {
            p.rate_limit_rate = 0.6;
            p.retry_after_ms = Some(600);
        },
        kinds: &["rate_limit"],
        revoke_key: false,
        effect: Effect::Pause(Duration::from_millis(600)),
    },
    Phase {
        // An hour asked for: the daemon waits `http.max_retry_after` (1 s), no longer.
        name: "429_storm_huge_retry_after",
        faults: |p| {
            p.rate_limit_rate = 0.5;
            p.retry_after = Some(3600);
        },
        kinds: &["rate_limit"],
        revoke_key: false,
        effect: Effect::Pause(Duration::from_secs(3600)),
    },
    Phase {
        name: "5xx_burst",
        faults: |p| {
            p.error_500_rate = 0.4;
            p.error_503_rate = 0.3;
        },
        kinds: &["error_500", "error_503"],
        revoke_key: false,
        effect: Effect::None,
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
        effect: Effect::None,
    },
    Phase {
        // Half the requests work longer than the client waits (SLOW_WORK against a 1 s timeout);
        // the work still completes, and the re-send of the timed-out batch meets it at work:
        // a 409 for the key in use (answered within the latency, 0.2-0.8 s, so the daemon reads
        // it), then, once the work is done, the cached answer. The others are answered in time.
        // The overlap is forced, not left to chance: every slow request's re-send comes while
        // it works (see SLOW_WORK).
        name: "timeouts_while_working",
        faults: |p| {
            p.latency = Duration::from_millis(200);
            p.latency_jitter = Duration::from_millis(600);
            p.slow_work_rate = 0.5;
            p.slow_work = SLOW_WORK;
        },
        kinds: &["slow_work"],
        revoke_key: false,
        effect: Effect::KeyInUse,
    },
    Phase {
        name: "slow_answers",
        faults: |p| {
            p.slow_response_rate = 0.6;
            p.slow_response = Duration::from_millis(400);
        },
        kinds: &["slow_response"],
        revoke_key: false,
        effect: Effect::None,
    },
    Phase {
        name: "dropped_after_apply",
        faults: |p| p.drop_after_apply_rate = 0.5,
        kinds: &["drop_after_apply"],
        revoke_key: false,
        effect: Effect::None,
    },
    Phase {
        name: "truncated_and_non_json_200s",
        faults: |p| {
            p.truncated_body_rate = 0.35;
            p.non_json_body_rate = 0.35;
        },
        kinds: &["truncated_body", "non_json_body"],
        revoke_key: false,
        effect: Effect::None,
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
        effect: Effect::None,
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
        effect: Effect::None,
    },
    Phase {
        name: "revoked_key",
        faults: |_| {},
        kinds: &[],
        revoke_key: true,
        effect: Effect::None,
    },
];

/// The changes of the scenario, handed out from the front as it goes.
struct Pool {
    rows: VecDeque<PlannedRow>,
    inserted: usize,
}

impl Pool {
    fn take(&mut self, n: usize) -> Vec<PlannedRow> {
        let rows: Vec<PlannedRow> = self.rows.drain(..n.min(self.rows.len())).collect();
        self.inserted += rows.len();
        rows
    }
}

/// One phase as it ran: when its faults were switched on and off (wall clock, as the
/// simulator's log).
struct Window {
    phase: &'static Phase,
    from: OffsetDateTime,
    to: OffsetDateTime,
}

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
    let mut order: Vec<&'static Phase> = PHASES.iter().collect();
    order.shuffle(&mut sc.rng);
    // A pool of changes drawn from the front as the scenario goes: each phase gets some, and
    // more while it waits for its faults, so no phase runs without traffic.
    let mut pool = Pool {
        rows: workload(&mut sc.rng, scale(40), scale(2000)).into(),
        inserted: 0,
    };
    // The poison record changes a few times, at random places early in the stream.
    for _ in 0..3 {
        let at = sc.rng.random_range(0..300.min(pool.rows.len()));
        let n = sc.rng.random_range(1..1000);
        pool.rows.insert(
            at,
            PlannedRow {
                record: poison.clone(),
                patch: format!(r#"{{"default": {{"n": {n}}}}}"#),
            },
        );
    }
    let first = sc.rng.random_range(20..60);
    db.insert_retrying(&pool.take(first)).await;
    let mut daemon = Daemon::spawn(&sc, "daemon", &bin(), &db, &sim, &[]);
    let mut extra = Vec::new();
    let mut windows = Vec::new();
    for phase in order {
        if matches!(phase.effect, Effect::Pause(_)) {
            // Healed since the last phase: let its slowest answers be logged before a pause
            // phase begins, so that none of them looks like a request sent during a pause.
            tokio::time::sleep(DRAIN).await;
            let at_work = until("no request at work", SLOW_WORK * 3, || async {
                sim.stats().await["idempotency_keys_in_progress"].as_u64() == Some(0)
            })
            .await;
            if let Err(e) = at_work {
                sc.fail(format!("before phase {}: {e}", phase.name));
            }
        }
        let mut profile = base.clone();
        (phase.faults)(&mut profile);
        let from = OffsetDateTime::now_utc();
        sim.set_faults(profile);
        if phase.revoke_key {
            sim.put_api_key("revoked-key").await;
        }
        sc.inject(format!("phase:{}", phase.name), 1);
        run_phase(&mut sc, phase, &db, &sim, &mut daemon, &mut pool, from).await;
        let to = OffsetDateTime::now_utc();
        sim.set_faults(base.clone());
        if phase.revoke_key {
            sim.put_api_key(prism_sync::sim::DEFAULT_API_KEY).await;
            if !daemon.wait_readyz(200, Duration::from_secs(15)).await {
                extra.push("/readyz did not return to 200 after the key was restored".into());
            }
        }
        windows.push(Window { phase, from, to });
    }
    // Heal (the poison record stays poison) and let everything finish, with a last few changes.
    let n = sc.rng.random_range(10..50);
    db.insert_retrying(&pool.take(n)).await;
    extra.extend(finish_and_stop(&db, &mut daemon, pool.inserted, Duration::from_secs(120)).await);
    extra.extend(effect_violations(&mut sc, &db, &sim, &windows).await);
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

/// Runs one phase (its faults already switched on at `from`) until its faults were injected,
/// its effect was seen and a seeded minimum time has passed, feeding changes all along; fails
/// the scenario after 20 s without them.
async fn run_phase(
    sc: &mut Scenario,
    phase: &Phase,
    db: &Db,
    sim: &Sim,
    daemon: &mut Daemon,
    pool: &mut Pool,
    from: OffsetDateTime,
) {
    let before = sim.stats().await;
    let count = |stats: &serde_json::Value, kind: &str| {
        stats["faults_injected"][kind].as_u64().unwrap_or(0)
    };
    let in_use = |stats: &serde_json::Value| stats["idempotency_in_progress"].as_u64().unwrap_or(0);
    // Fresh changes arrive during every phase, so that every phase meets traffic; a pause
    // phase gets more, so that other batches are ready while one is told to wait.
    let mut n = sc.rng.random_range(5..40);
    if matches!(phase.effect, Effect::Pause(_)) {
        n += 60;
    }
    db.insert_retrying(&pool.take(n)).await;
    let min = Duration::from_millis(sc.rng.random_range(800..1600));
    let started = Instant::now();
    let mut not_ready = false;
    let mut effect_seen = false;
    let mut fed = Instant::now();
    loop {
        if fed.elapsed() > Duration::from_millis(500) {
            // A key-in-use phase feeds one small wave at a time: a re-send queued behind other
            // batches would come after the first request ended, and meet its cached answer.
            let idle = db
                .progress()
                .await
                .is_some_and(|(done, all, _)| done == all);
            if !matches!(phase.effect, Effect::KeyInUse) || idle {
                db.insert_retrying(&pool.take(10)).await;
            }
            fed = Instant::now();
            effect_seen = effect_seen
                || match phase.effect {
                    Effect::None => true,
                    Effect::Pause(asked) => {
                        let pause = asked.min(MAX_RETRY_AFTER);
                        let log = sim.requests().await;
                        let now = OffsetDateTime::now_utc();
                        effects::batches_held_back(&log, from, now, pause) > 0
                    }
                    Effect::KeyInUse => in_use(&sim.stats().await) > in_use(&before),
                };
        }
        let now = sim.stats().await;
        let injected = phase
            .kinds
            .iter()
            .all(|k| count(&now, k) > count(&before, k));
        if phase.revoke_key && daemon.readyz().await == 503 {
            not_ready = true;
        }
        let enough = injected && effect_seen && (!phase.revoke_key || not_ready);
        if started.elapsed() >= min && enough {
            return;
        }
        if started.elapsed() > PHASE_BUDGET {
            let missing: Vec<&&str> = phase
                .kinds
                .iter()
                .filter(|k| count(&now, k) <= count(&before, k))
                .collect();
            let effect = match phase.effect {
                Effect::None => "none",
                Effect::Pause(_) => "a 429's pause holding back another batch, released at its end",
                Effect::KeyInUse => "a 409 for a key in use",
            };
            let exited = daemon.try_exit();
            sc.fail(format!(
                "phase {} in {PHASE_BUDGET:?}: injected no {missing:?}; effect ({effect}) seen: {effect_seen}; ready-check seen: {not_ready}; daemon exit: {exited:?}; sim stats {now}; {}; log tail:\n{}",
                phase.name,
                db.diagnose().await,
                daemon.tail(10)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each phase's promise, read from the simulator's request log once everything has finished.
async fn effect_violations(
    sc: &mut Scenario,
    db: &Db,
    sim: &Sim,
    windows: &[Window],
) -> Vec<String> {
    let log = sim.requests().await;
    let log_end = OffsetDateTime::now_utc();
    let mut violations = Vec::new();
    let total = sim.stats().await["requests_total"].as_u64().unwrap_or(0);
    let oldest = log.first().and_then(effects::at);
    for w in windows {
        let Effect::Pause(asked) = w.phase.effect else {
            continue;
        };
        // The log is bounded: a phase it no longer reaches cannot be checked.
        if total > log.len() as u64 && oldest.is_none_or(|t| t > w.from) {
            violations.push(format!(
                "the simulator's request log ({} entries of {total}) no longer reaches back to phase {}: its pauses could not be checked",
                log.len(),
                w.phase.name
            ));
            continue;
        }
        let pause = asked.min(MAX_RETRY_AFTER);
        // A 429 drawn before the faults healed is logged soon after; the next 429 phase begins
        // only after a drain.
        let to = w.to + time::Duration::try_from(DRAIN).unwrap_or(time::Duration::ZERO);
        let (checked, during) = effects::requests_during_pauses(&log, w.from, to, pause);
        let held_back = effects::batches_held_back(&log, w.from, to, pause);
        sc.note(format!(
            "phase {}: {checked} 429s asking {asked:?} (pause {pause:?}), {held_back} of them holding back another batch until the pause ended, {} requests inside a pause",
            w.phase.name,
            during.len()
        ));
        if checked == 0 {
            violations.push(format!(
                "phase {}: no 429 in the request log to check its pause on",
                w.phase.name
            ));
        }
        violations.extend(during);
        if asked > MAX_RETRY_AFTER {
            violations.extend(effects::stalls_past_the_cap(
                &log,
                w.from,
                to,
                MAX_RETRY_AFTER,
                log_end,
            ));
        }
    }
    let (keys, not_resent) = effects::key_in_use_not_resent(&log);
    sc.note(format!(
        "{keys} keys answered 409 (in use), {} of them read by the daemon (the others it had timed out on), {} not re-sent and answered",
        db.keys_answered(409).await.len(),
        not_resent.len()
    ));
    if keys == 0 {
        violations.push("no key was answered 409 (in use): the 409 promise was not tested".into());
    }
    violations.extend(not_resent);
    violations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_while_syncing_with_a_poison_item() {
    for round in 0..rounds() {
        on_both_backends(move |b| api_faults(b, round)).await;
    }
}
